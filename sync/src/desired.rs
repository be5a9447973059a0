//! The objects to apply: read from a rendered tree (a directory, a Git tree)
//! or straight from a render, each with its owner, policies and digest.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use compact_str::CompactString;

use kiln_render::manifest::{
    BLUEPRINT_LABEL, INSTANCE_LABEL, Identity, RESOURCE_ID_ANNOTATION, group_of,
};
use kiln_render::policy::Policies;
use kiln_render::render::{Object as RenderedObject, Rendered};
use kiln_render::tree::{KUSTOMIZATION, Tree};
use serde_json::Value;
use sha2::Digest as _;

use crate::{Error, Result};

/// Kiln records the digest of what it applied here; an object whose digest
/// matches and whose fields still hold the desired values needs no write.
pub const DIGEST_ANNOTATION: &str = "kiln.dev/applied-digest";
/// The inventory that applied an object: what Kiln lists its live objects by.
pub const INVENTORY_LABEL: &str = "kiln.dev/inventory";

/// The blueprint, instance and resource an object comes from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Owner {
    /// The blueprint.
    pub blueprint: CompactString,
    /// The instance (row key as a DNS label).
    pub instance: CompactString,
    /// The resource id.
    pub resource: CompactString,
}

impl Owner {
    /// Its instance as `blueprint/instance`: what the deletion guard counts
    /// and messages name.
    pub fn instance_path(&self) -> String {
        format!("{}/{}", self.blueprint, self.instance)
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.blueprint, self.instance, self.resource)
    }
}

/// One object to apply. A clone shares the object (the desired state a
/// sync loop keeps and the copy an apply works on are one in memory).
#[derive(Debug, Clone)]
pub struct Desired(Arc<Object>);

/// What [`Desired`] holds.
#[derive(Debug, Clone)]
pub struct Object {
    /// Group, kind, namespace and name.
    pub identity: Identity,
    /// The object's `apiVersion`.
    pub api_version: CompactString,
    /// The object as rendered, as compact JSON: a parsed object takes
    /// several times the memory, and most objects of a resync are only
    /// compared by digest. [`Desired::object`] parses it.
    json: Box<str>,
    /// For a CustomResourceDefinition, the group and kind it defines.
    pub defines: Option<Box<(String, String)>>,
    /// Where it comes from.
    pub owner: Owner,
    /// Its dependencies and policies, shared with the objects that declare
    /// the same (see [`Shared`]).
    pub policies: Arc<Policies>,
    /// The digest of the object as rendered.
    pub digest: Digest,
    /// The file it was read from, for messages, when that is not
    /// `blueprint/instance/resource.yaml` of its owner (see
    /// [`Object::origin`]).
    origin: Option<Box<str>>,
}

impl Object {
    /// The file it was read from, for messages.
    pub fn origin(&self) -> std::borrow::Cow<'_, str> {
        match &self.origin {
            Some(origin) => origin.as_ref().into(),
            None => format!("{}.yaml", self.owner).into(),
        }
    }
}

impl std::ops::Deref for Desired {
    type Target = Object;

    fn deref(&self) -> &Object {
        &self.0
    }
}

impl Desired {
    /// Reads one object; `path` (`blueprint/instance/resource.yaml`) supplies
    /// the owner when the object lacks Kiln's labels.
    pub fn new(object: Value, origin: &str) -> Result<Self> {
        Self::read(object, origin, &Shared::default())
    }

    /// [`Desired::new`], sharing what `shared` holds already.
    pub fn read(object: Value, origin: &str, shared: &Shared) -> Result<Self> {
        let invalid = |message: String| Error::InvalidObject {
            origin: origin.into(),
            message,
        };
        let Value::Object(map) = &object else {
            return Err(invalid(
                "not a mapping with apiVersion, kind and metadata".into(),
            ));
        };
        let text = |field: &str| map.get(field).and_then(Value::as_str).unwrap_or_default();
        let api_version = text("apiVersion");
        let kind = text("kind");
        let metadata = map.get("metadata").and_then(Value::as_object);
        let meta = |field: &str| {
            metadata
                .and_then(|m| m.get(field))
                .and_then(Value::as_str)
                .unwrap_or_default()
        };
        let name = meta("name");
        for (field, value) in [
            ("apiVersion", api_version),
            ("kind", kind),
            ("metadata.name", name),
        ] {
            if value.is_empty() {
                return Err(invalid(format!("the object has no {field}")));
            }
        }
        let labels = metadata
            .and_then(|m| m.get("labels"))
            .and_then(Value::as_object);
        let annotations = metadata
            .and_then(|m| m.get("annotations"))
            .and_then(Value::as_object);
        let label = |key: &str| labels.and_then(|l| l.get(key)).and_then(Value::as_str);
        let from_path: Vec<&str> = origin
            .trim_end_matches(".yaml")
            .trim_end_matches(".yml")
            .rsplit('/')
            .take(3)
            .collect();
        let owner = Owner {
            blueprint: label(BLUEPRINT_LABEL)
                .or(from_path.get(2).copied())
                .unwrap_or_default()
                .into(),
            instance: label(INSTANCE_LABEL)
                .or(from_path.get(1).copied())
                .unwrap_or_default()
                .into(),
            resource: annotations
                .and_then(|a| a.get(RESOURCE_ID_ANNOTATION))
                .and_then(Value::as_str)
                .or(from_path.first().copied())
                .unwrap_or_default()
                .into(),
        };
        let policies = shared.policies(Policies::from_annotations(annotations).map_err(invalid)?);
        let defines = kiln_render::manifest::is_crd(map)
            .then(|| {
                let spec = &map.get("spec")?;
                Some(Box::new((
                    spec["group"].as_str()?.to_string(),
                    spec["names"]["kind"].as_str()?.to_string(),
                )))
            })
            .flatten();
        let json = serde_json::to_string(&object).unwrap_or_default();
        let digest = Digest::of(json.as_bytes());
        Ok(Self(Arc::new(Object {
            identity: Identity {
                group: group_of(api_version).into(),
                kind: kind.into(),
                namespace: meta("namespace").into(),
                name: name.into(),
            },
            api_version: api_version.into(),
            // A copy of its length: shrinking the string in place may keep
            // the allocation it grew to (mimalloc does when that is less
            // than twice the length), a quarter more on average.
            json: json.as_str().into(),
            defines,
            policies,
            digest,
            origin: (!owner_path(&owner, origin)).then(|| origin.into()),
            owner,
        })))
    }

    /// The object as rendered.
    pub fn object(&self) -> Value {
        serde_json::from_str(&self.json).unwrap_or_default()
    }

    /// Changes the object (what the digest was taken of stays).
    pub fn edit(&mut self, change: impl FnOnce(&mut Value)) {
        let mut object = self.object();
        change(&mut object);
        self.own().json = serde_json::to_string(&object)
            .unwrap_or_default()
            .into_boxed_str();
    }

    /// This object's own copy, to change.
    pub fn own(&mut self) -> &mut Object {
        Arc::make_mut(&mut self.0)
    }

    /// The body to send: the object with the digest annotation and the
    /// label of the inventory that applies it.
    pub fn body(&self, inventory: &str) -> Value {
        let mut body = self.object();
        if let Some(metadata) = body.get_mut("metadata").and_then(Value::as_object_mut) {
            for (field, key, value) in [
                ("annotations", DIGEST_ANNOTATION, &self.digest.to_string()),
                ("labels", INVENTORY_LABEL, &inventory.to_string()),
            ] {
                let map = metadata
                    .entry(field)
                    .or_insert_with(|| Value::Object(Default::default()));
                if let Some(map) = map.as_object_mut() {
                    map.insert(key.into(), value.clone().into());
                }
            }
        }
        body
    }

    /// `Kind namespace/name (blueprint/instance/resource)`, for reports.
    pub fn label(&self) -> String {
        format!("{} ({})", self.identity, self.owner)
    }
}

/// SHA-256 of an object's JSON, shortened to 16 bytes: what decides
/// whether an applied object is still what was rendered. Written (in the
/// annotation) as 32 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; 16]);

impl Digest {
    /// The digest of `json`.
    pub fn of(json: &[u8]) -> Self {
        let hash = sha2::Sha256::digest(json);
        let mut digest = [0; 16];
        digest.copy_from_slice(&hash[..16]);
        Self(digest)
    }

    /// Whether `text` is this digest written out.
    pub fn is(&self, text: &str) -> bool {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let text = text.as_bytes();
        text.len() == 32
            && self.0.iter().zip(text.chunks(2)).all(|(byte, pair)| {
                pair == [HEX[usize::from(byte >> 4)], HEX[usize::from(byte & 15)]]
            })
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// What the objects of one tree or render share instead of each holding
/// a copy: the policies every instance of a blueprint's resource declares
/// alike, so that 100,000 objects hold a handful.
#[derive(Debug, Default)]
pub struct Shared {
    policies: Mutex<HashSet<Arc<Policies>>>,
}

impl Shared {
    fn policies(&self, policies: Policies) -> Arc<Policies> {
        let mut known = self.policies.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(known) = known.get(&policies) {
            return known.clone();
        }
        let policies = Arc::new(policies);
        known.insert(policies.clone());
        policies
    }
}

/// The objects of a rendered tree: every YAML file but the kustomizations
/// and what `render --emit` wrote. Each file is let go of once read.
pub fn from_tree(tree: Tree) -> Result<Vec<Desired>> {
    let mut objects = Vec::with_capacity(tree.files.len());
    let shared = Shared::default();
    let files = tree.files.into_iter().filter(|(path, _)| {
        (path.ends_with(".yaml") || path.ends_with(".yml"))
            && !path.ends_with(KUSTOMIZATION)
            && !path.starts_with(kiln_render::emit::DIR)
    });
    for (path, bytes) in files {
        let text = std::str::from_utf8(&bytes).map_err(|_| Error::InvalidObject {
            origin: path.clone(),
            message: "not UTF-8".into(),
        })?;
        let documents: Vec<Value> = kiln_render::yaml::from_str_multi(text, &path)?;
        for document in documents.into_iter().filter(|d| !d.is_null()) {
            objects.push(Desired::read(document, &path, &shared)?);
        }
    }
    objects.shrink_to_fit();
    check_unique(&objects)?;
    Ok(objects)
}

/// The objects of a render, without writing them anywhere first.
pub fn from_rendered(rendered: &Rendered) -> Result<Vec<Desired>> {
    let mut objects = Vec::new();
    let shared = Shared::default();
    for instance in &rendered.instances {
        for object in &instance.objects {
            objects.push(read_rendered(
                &instance.blueprint,
                &instance.name,
                object,
                &shared,
            )?);
        }
    }
    objects.shrink_to_fit();
    check_unique(&objects)?;
    Ok(objects)
}

/// One object of a render's instance.
fn read_rendered(
    blueprint: &str,
    instance: &str,
    object: &RenderedObject,
    shared: &Shared,
) -> Result<Desired> {
    let origin = format!("{blueprint}/{instance}/{}.yaml", object.resource);
    Desired::read(object.value()?, &origin, shared)
}

/// One instance's objects, or why they could not be read.
type Read = Result<Vec<Desired>>;

/// The objects of a render, made as each instance renders (see
/// [`kiln_render::render::render_taking`]): on the thread that rendered
/// the instance, which lets go of its YAML at once, so that no fleet's
/// worth of YAML is held and what is let go of is reused by that thread.
#[derive(Debug, Default)]
pub struct Taken {
    shared: Shared,
    /// By blueprint and instance: a second pass replaces the first.
    instances: Mutex<BTreeMap<(String, String), Read>>,
}

impl Taken {
    /// Reads one instance's objects, leaving them without YAML.
    pub fn take(&self, blueprint: &str, instance: &str, objects: &mut [RenderedObject]) {
        let read = objects
            .iter_mut()
            .map(|object| {
                let read = read_rendered(blueprint, instance, object, &self.shared);
                object.yaml = String::new();
                read
            })
            .collect();
        self.instances
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert((blueprint.to_string(), instance.to_string()), read);
    }

    /// Every object taken, in blueprint, instance and render order.
    pub fn objects(self) -> Result<Vec<Desired>> {
        let instances = self
            .instances
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner);
        let count = instances
            .values()
            .map(|read| read.as_ref().map_or(0, Vec::len))
            .sum();
        let mut objects = Vec::with_capacity(count);
        for read in instances.into_values() {
            objects.extend(read?);
        }
        check_unique(&objects)?;
        Ok(objects)
    }
}

/// Whether `origin` is `blueprint/instance/resource.yaml` of `owner`: most
/// objects' is, and it is not kept beside the owner then.
fn owner_path(owner: &Owner, origin: &str) -> bool {
    let rest = origin
        .strip_prefix(owner.blueprint.as_str())
        .and_then(|r| r.strip_prefix('/'))
        .and_then(|r| r.strip_prefix(owner.instance.as_str()))
        .and_then(|r| r.strip_prefix('/'))
        .and_then(|r| r.strip_prefix(owner.resource.as_str()));
    rest == Some(".yaml")
}

/// Refuses the same object twice, naming both places.
pub fn check_unique(objects: &[Desired]) -> Result<()> {
    let mut seen: HashMap<&Identity, &Desired> = HashMap::with_capacity(objects.len());
    for object in objects {
        if let Some(first) = seen.insert(&object.identity, object) {
            return Err(Error::InvalidObject {
                origin: object.origin().into_owned(),
                message: format!("{} is also rendered by {}", object.identity, first.origin()),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_render::config::Config;
    use kiln_render::render;
    use serde_json::json;

    #[test]
    fn objects_taken_as_the_render_goes_are_the_objects_of_the_render() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        // The first: a CRD of the render makes its kind cluster-scoped, so
        // every instance is rendered (and taken) twice.
        for config in [
            "render/tests/inputs/yaml-crd-scope/kiln.yaml",
            "fixtures/demo",
        ] {
            let config = Config::load(&[root.join(config)]).unwrap();
            let blueprints = render::compile(&config, &[]).unwrap();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let rows = runtime
                .block_on(render::read_sources(&blueprints, &config, None, None))
                .unwrap();
            let rendered = render::render(&blueprints, &config, &rows, true).unwrap();
            let expected = from_rendered(&rendered).unwrap();

            let taken = Taken::default();
            let take = |blueprint: &str, instance: &str, objects: &mut [RenderedObject]| {
                taken.take(blueprint, instance, objects);
            };
            let left = render::render_taking(&blueprints, &config, &rows, true, &take).unwrap();
            assert!(
                left.instances
                    .iter()
                    .flat_map(|i| &i.objects)
                    .all(|o| o.yaml.is_empty())
            );
            let objects = taken.objects().unwrap();

            assert!(expected.len() > 3, "{}", expected.len());
            let summary = |objects: &[Desired]| -> Vec<String> {
                objects
                    .iter()
                    .map(|d| {
                        format!(
                            "{} {} {} {} {:?} {}",
                            d.identity,
                            d.origin(),
                            d.owner,
                            d.digest,
                            d.policies,
                            d.object()
                        )
                    })
                    .collect()
            };
            assert_eq!(summary(&objects), summary(&expected));
        }
    }

    #[test]
    fn owner_and_policies_come_from_labels_and_annotations() {
        let object = json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "app", "namespace": "t-a",
                "labels": {"kiln.dev/blueprint": "web", "kiln.dev/instance": "a"},
                "annotations": {"kiln.dev/resource-id": "app", "kiln.dev/depends-on": "namespace",
                    "kiln.dev/wait-for-ready": "true"}},
        });
        let desired = Desired::new(object, "web/a/app.yaml").unwrap();
        assert_eq!(desired.identity.group, "apps");
        assert_eq!(desired.owner.to_string(), "web/a/app");
        assert_eq!(desired.policies.depends_on, ["namespace"]);
        assert!(desired.policies.wait_for_ready);
        assert_eq!(
            desired.body("prod")["metadata"]["annotations"][DIGEST_ANNOTATION],
            desired.digest.to_string()
        );
    }

    #[test]
    fn a_digest_is_its_hex_and_nothing_else() {
        let digest = Digest::of(b"{}");
        let hex = digest.to_string();
        assert_eq!(hex.len(), 32);
        assert!(digest.is(&hex));
        assert!(!digest.is(&hex.to_uppercase()));
        assert!(!digest.is(&hex[..31]));
        assert!(!Digest::of(b"[]").is(&hex));
        let mut last_differs = hex.clone();
        last_differs.replace_range(31.., if hex.ends_with('0') { "1" } else { "0" });
        assert!(!digest.is(&last_differs));
    }

    #[test]
    fn a_file_without_a_name_is_refused_with_its_path() {
        let err = Desired::new(
            json!({"apiVersion": "v1", "kind": "ConfigMap"}),
            "web/a/c.yaml",
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "web/a/c.yaml: the object has no metadata.name"
        );
    }

    #[test]
    fn the_same_object_twice_is_refused() {
        let mut tree = Tree::default();
        let cm = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x, namespace: ns}\n";
        tree.files
            .insert("web/a/c.yaml".into(), cm.as_bytes().to_vec());
        tree.files
            .insert("web/b/c.yaml".into(), cm.as_bytes().to_vec());
        tree.files.insert(
            "web/a/kustomization.yaml".into(),
            b"resources: []\n".to_vec(),
        );
        let err = from_tree(tree).unwrap_err().to_string();
        assert!(
            err.starts_with("web/b/c.yaml: ConfigMap ns/x is also rendered by web/a/c.yaml"),
            "{err}"
        );
    }
}
