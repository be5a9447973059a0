//! The objects to apply: read from a rendered tree (a directory, a Git tree)
//! or straight from a render, each with its owner, policies and digest.

use std::collections::HashMap;
use std::fmt;

use kiln_render::manifest::{
    BLUEPRINT_LABEL, INSTANCE_LABEL, Identity, RESOURCE_ID_ANNOTATION, group_of,
};
use kiln_render::policy::Policies;
use kiln_render::render::Rendered;
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
    pub blueprint: String,
    /// The instance (row key as a DNS label).
    pub instance: String,
    /// The resource id.
    pub resource: String,
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.blueprint, self.instance, self.resource)
    }
}

/// One object to apply. A clone shares the object (the desired state a
/// sync loop keeps and the copy an apply works on are one in memory).
#[derive(Debug, Clone)]
pub struct Desired(std::sync::Arc<Object>);

/// What [`Desired`] holds.
#[derive(Debug, Clone)]
pub struct Object {
    /// Group, kind, namespace and name.
    pub identity: Identity,
    /// The object's `apiVersion`.
    pub api_version: String,
    /// The object as rendered, as compact JSON: a parsed object takes
    /// several times the memory, and most objects of a resync are only
    /// compared by digest. [`Desired::object`] parses it.
    json: Box<str>,
    /// For a CustomResourceDefinition, the group and kind it defines.
    pub defines: Option<Box<(String, String)>>,
    /// Where it comes from.
    pub owner: Owner,
    /// Its dependencies and policies.
    pub policies: Policies,
    /// SHA-256 (first 32 hex digits) of the object as rendered.
    pub digest: String,
    /// The file it was read from, for messages.
    pub origin: String,
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
        let invalid = |message: String| Error::InvalidObject {
            origin: origin.to_string(),
            message,
        };
        let Value::Object(map) = &object else {
            return Err(invalid(
                "not a mapping with apiVersion, kind and metadata".into(),
            ));
        };
        let text = |field: &str| map.get(field).and_then(Value::as_str).unwrap_or_default();
        let api_version = text("apiVersion").to_string();
        let kind = text("kind").to_string();
        let metadata = map.get("metadata").and_then(Value::as_object);
        let meta = |field: &str| {
            metadata
                .and_then(|m| m.get(field))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        let name = meta("name");
        for (field, value) in [
            ("apiVersion", &api_version),
            ("kind", &kind),
            ("metadata.name", &name),
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
                .to_string(),
            instance: label(INSTANCE_LABEL)
                .or(from_path.get(1).copied())
                .unwrap_or_default()
                .to_string(),
            resource: annotations
                .and_then(|a| a.get(RESOURCE_ID_ANNOTATION))
                .and_then(Value::as_str)
                .or(from_path.first().copied())
                .unwrap_or_default()
                .to_string(),
        };
        let policies = Policies::from_annotations(annotations).map_err(invalid)?;
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
        let digest = digest_of(json.as_bytes());
        Ok(Self(std::sync::Arc::new(Object {
            identity: Identity {
                group: group_of(&api_version).to_string(),
                kind,
                namespace: meta("namespace"),
                name,
            },
            api_version,
            json: json.into_boxed_str(),
            defines,
            owner,
            policies,
            digest,
            origin: origin.to_string(),
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
        std::sync::Arc::make_mut(&mut self.0)
    }

    /// The body to send: the object with the digest annotation and the
    /// label of the inventory that applies it.
    pub fn body(&self, inventory: &str) -> Value {
        let mut body = self.object();
        if let Some(metadata) = body.get_mut("metadata").and_then(Value::as_object_mut) {
            for (field, key, value) in [
                ("annotations", DIGEST_ANNOTATION, &self.digest),
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

/// SHA-256 of an object's JSON, shortened: what decides whether an applied
/// object is still what was rendered.
pub fn digest(object: &Value) -> String {
    digest_of(&serde_json::to_vec(object).unwrap_or_default())
}

fn digest_of(json: &[u8]) -> String {
    let hash = sha2::Sha256::digest(json);
    hash.iter().take(16).map(|b| format!("{b:02x}")).collect()
}

/// The objects of a rendered tree: every YAML file but the kustomizations
/// and what `render --emit` wrote.
pub fn from_tree(tree: &Tree) -> Result<Vec<Desired>> {
    let files: Vec<(&String, &Vec<u8>)> = tree
        .files
        .iter()
        .filter(|(path, _)| {
            (path.ends_with(".yaml") || path.ends_with(".yml"))
                && !path.ends_with(KUSTOMIZATION)
                && !path.starts_with(kiln_render::emit::DIR)
        })
        .collect();
    let mut objects = Vec::with_capacity(files.len());
    for (path, bytes) in files {
        let text = std::str::from_utf8(bytes).map_err(|_| Error::InvalidObject {
            origin: path.clone(),
            message: "not UTF-8".into(),
        })?;
        let documents: Vec<Value> = kiln_render::yaml::from_str_multi(text, path)?;
        for document in documents.into_iter().filter(|d| !d.is_null()) {
            objects.push(Desired::new(document, path)?);
        }
    }
    check_unique(&objects)?;
    Ok(objects)
}

/// The objects of a render, without writing them anywhere first.
pub fn from_rendered(rendered: &Rendered) -> Result<Vec<Desired>> {
    let mut objects = Vec::new();
    for instance in &rendered.instances {
        for object in &instance.objects {
            let origin = format!(
                "{}/{}/{}.yaml",
                instance.blueprint, instance.name, object.resource
            );
            objects.push(Desired::new(object.value()?, &origin)?);
        }
    }
    check_unique(&objects)?;
    Ok(objects)
}

/// Refuses the same object twice, naming both places.
pub fn check_unique(objects: &[Desired]) -> Result<()> {
    let mut seen: HashMap<&Identity, &str> = HashMap::with_capacity(objects.len());
    for object in objects {
        if let Some(first) = seen.insert(&object.identity, &object.origin) {
            return Err(Error::InvalidObject {
                origin: object.origin.clone(),
                message: format!("{} is also rendered by {first}", object.identity),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
            desired.digest
        );
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
        let err = from_tree(&tree).unwrap_err().to_string();
        assert!(
            err.starts_with("web/b/c.yaml: ConfigMap ns/x is also rendered by web/a/c.yaml"),
            "{err}"
        );
    }
}
