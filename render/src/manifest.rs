//! Canonical objects: Kiln's labels and annotations, the default namespace,
//! identities, and byte-for-byte deterministic YAML that keeps the
//! template's key order.

use std::collections::HashSet;
use std::fmt;

use compact_str::CompactString;

use serde_json::{Map, Value};

/// `app.kubernetes.io/managed-by`, set to `kiln` on every object.
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// The blueprint label.
pub const BLUEPRINT_LABEL: &str = "kiln.dev/blueprint";
/// The instance label.
pub const INSTANCE_LABEL: &str = "kiln.dev/instance";
/// The resource id annotation.
pub const RESOURCE_ID_ANNOTATION: &str = "kiln.dev/resource-id";
/// ArgoCD's sync wave annotation, set to the resource's depth.
pub const SYNC_WAVE_ANNOTATION: &str = "argocd.argoproj.io/sync-wave";

/// Built-in kinds that are cluster-scoped, by (group, kind).
const CLUSTER_SCOPED: &[(&str, &str)] = &[
    ("", "Namespace"),
    ("", "Node"),
    ("", "PersistentVolume"),
    ("", "ComponentStatus"),
    ("rbac.authorization.k8s.io", "ClusterRole"),
    ("rbac.authorization.k8s.io", "ClusterRoleBinding"),
    ("apiextensions.k8s.io", "CustomResourceDefinition"),
    ("apiregistration.k8s.io", "APIService"),
    ("storage.k8s.io", "StorageClass"),
    ("storage.k8s.io", "CSIDriver"),
    ("storage.k8s.io", "CSINode"),
    ("storage.k8s.io", "VolumeAttachment"),
    ("storage.k8s.io", "VolumeAttributesClass"),
    ("scheduling.k8s.io", "PriorityClass"),
    ("node.k8s.io", "RuntimeClass"),
    ("networking.k8s.io", "IngressClass"),
    ("networking.k8s.io", "ServiceCIDR"),
    ("networking.k8s.io", "IPAddress"),
    (
        "admissionregistration.k8s.io",
        "ValidatingWebhookConfiguration",
    ),
    (
        "admissionregistration.k8s.io",
        "MutatingWebhookConfiguration",
    ),
    ("admissionregistration.k8s.io", "ValidatingAdmissionPolicy"),
    (
        "admissionregistration.k8s.io",
        "ValidatingAdmissionPolicyBinding",
    ),
    ("admissionregistration.k8s.io", "MutatingAdmissionPolicy"),
    (
        "admissionregistration.k8s.io",
        "MutatingAdmissionPolicyBinding",
    ),
    ("certificates.k8s.io", "CertificateSigningRequest"),
    ("certificates.k8s.io", "ClusterTrustBundle"),
    ("flowcontrol.apiserver.k8s.io", "FlowSchema"),
    ("flowcontrol.apiserver.k8s.io", "PriorityLevelConfiguration"),
    ("resource.k8s.io", "DeviceClass"),
    ("resource.k8s.io", "ResourceSlice"),
    ("storagemigration.k8s.io", "StorageVersionMigration"),
    ("internal.apiserver.k8s.io", "StorageVersion"),
];

/// What identifies an object in a cluster.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    /// API group, empty for the core group.
    pub group: CompactString,
    /// Kind.
    pub kind: CompactString,
    /// Namespace, empty for cluster-scoped objects.
    pub namespace: CompactString,
    /// Name.
    pub name: CompactString,
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.group.is_empty() {
            self.kind.to_string()
        } else {
            format!("{}.{}", self.kind, self.group)
        };
        if self.namespace.is_empty() {
            write!(f, "{kind} {}", self.name)
        } else {
            write!(f, "{kind} {}/{}", self.namespace, self.name)
        }
    }
}

/// The group of an `apiVersion`: `apps/v1` is `apps`, `v1` the core group.
pub fn group_of(api_version: &str) -> &str {
    api_version.rsplit_once('/').map_or("", |(group, _)| group)
}

/// The version of an `apiVersion`: `v1` of `apps/v1` and of `v1`.
pub fn version_of(api_version: &str) -> &str {
    api_version
        .rsplit_once('/')
        .map_or(api_version, |(_, version)| version)
}

/// Which (group, kind) pairs are cluster-scoped: the built-in ones, plus the
/// CRDs of one render.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scopes {
    cluster: HashSet<(String, String)>,
}

impl Default for Scopes {
    fn default() -> Self {
        Self {
            cluster: CLUSTER_SCOPED
                .iter()
                .map(|(g, k)| (g.to_string(), k.to_string()))
                .collect(),
        }
    }
}

impl Scopes {
    /// Learns from a rendered object when it is a CustomResourceDefinition.
    pub fn learn(&mut self, object: &Map<String, Value>) {
        if !is_crd(object) {
            return;
        }
        let spec = &object["spec"];
        if let (Some(group), Some(kind), Some(scope)) = (
            spec["group"].as_str(),
            spec["names"]["kind"].as_str(),
            spec["scope"].as_str(),
        ) {
            let key = (group.to_string(), kind.to_string());
            if scope == "Cluster" {
                self.cluster.insert(key);
            } else {
                self.cluster.remove(&key);
            }
        }
    }

    /// The (group, kind) pairs it holds cluster-scoped, sorted.
    pub fn cluster_scoped(&self) -> impl Iterator<Item = &(String, String)> {
        let mut kinds: Vec<&(String, String)> = self.cluster.iter().collect();
        kinds.sort_unstable();
        kinds.into_iter()
    }

    /// Scopes in which exactly these (group, kind) pairs are cluster-scoped.
    pub fn with_cluster_scoped(kinds: Vec<(String, String)>) -> Scopes {
        Scopes {
            cluster: kinds.into_iter().collect(),
        }
    }

    /// Whether objects of this group and kind are cluster-scoped.
    pub fn is_cluster_scoped(&self, group: &str, kind: &str) -> bool {
        self.cluster
            .contains(&(group.to_string(), kind.to_string()))
    }
}

/// Whether an object is a CustomResourceDefinition.
pub fn is_crd(object: &Map<String, Value>) -> bool {
    object.get("kind").and_then(Value::as_str) == Some("CustomResourceDefinition")
        && object
            .get("apiVersion")
            .and_then(Value::as_str)
            .map(group_of)
            == Some("apiextensions.k8s.io")
}

/// What Kiln stamps on an object.
#[derive(Debug, Clone, Copy)]
pub struct Stamp<'a> {
    /// The blueprint's name.
    pub blueprint: &'a str,
    /// The instance (the row key made a DNS label).
    pub instance: &'a str,
    /// The resource id.
    pub resource: &'a str,
    /// Depth in the dependency graph.
    pub wave: usize,
    /// The blueprint's namespace for this row, if it has one.
    pub namespace: Option<&'a str>,
    /// The resource declares itself cluster-scoped.
    pub cluster_scoped: bool,
    /// Annotations that carry the resource's dependencies and policies.
    pub policies: &'a [(&'static str, String)],
}

/// Adds Kiln's labels and annotations and the default namespace, in place,
/// and returns the object's identity.
pub fn stamp(object: &mut Map<String, Value>, stamp: &Stamp<'_>, scopes: &Scopes) -> Identity {
    let api_version = object
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let kind = object
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let group = group_of(&api_version).to_string();
    let cluster_scoped = stamp.cluster_scoped || scopes.is_cluster_scoped(&group, &kind);

    let metadata = object
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()));
    if !metadata.is_object() {
        *metadata = Value::Object(Map::new());
    }
    let Value::Object(metadata) = metadata else {
        unreachable_object()
    };
    let name = metadata
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    if !cluster_scoped
        && !metadata.contains_key("namespace")
        && let Some(namespace) = stamp.namespace
    {
        insert_after(
            metadata,
            "name",
            "namespace",
            Value::String(namespace.to_string()),
        );
    }
    let namespace = if cluster_scoped {
        String::new()
    } else {
        metadata
            .get("namespace")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let labels = sub_map(metadata, "labels");
    labels.insert(MANAGED_BY.into(), "kiln".into());
    labels.insert(BLUEPRINT_LABEL.into(), stamp.blueprint.into());
    labels.insert(INSTANCE_LABEL.into(), stamp.instance.into());
    let annotations = sub_map(metadata, "annotations");
    annotations.insert(RESOURCE_ID_ANNOTATION.into(), stamp.resource.into());
    annotations.insert(SYNC_WAVE_ANNOTATION.into(), stamp.wave.to_string().into());
    for (key, value) in stamp.policies {
        annotations.insert((*key).into(), value.clone().into());
    }
    Identity {
        group: group.into(),
        kind: kind.into(),
        namespace: namespace.into(),
        name: name.into(),
    }
}

fn unreachable_object() -> ! {
    unreachable!("metadata was just made a mapping")
}

fn sub_map<'m>(parent: &'m mut Map<String, Value>, key: &str) -> &'m mut Map<String, Value> {
    let entry = parent
        .entry(key)
        .or_insert_with(|| Value::Object(Map::new()));
    if !entry.is_object() {
        *entry = Value::Object(Map::new());
    }
    match entry {
        Value::Object(map) => map,
        _ => unreachable_object(),
    }
}

/// Inserts `key` right after `after` (or at the end), keeping the order of
/// everything else.
fn insert_after(map: &mut Map<String, Value>, after: &str, key: &str, value: Value) {
    let old = std::mem::take(map);
    let mut placed = false;
    for (k, v) in old {
        let here = k == after;
        map.insert(k, v);
        if here {
            map.insert(key.to_string(), value.clone());
            placed = true;
        }
    }
    if !placed {
        map.insert(key.to_string(), value);
    }
}

/// Whether an object is a core `Secret`.
pub fn is_secret(value: &serde_json::Value) -> bool {
    value["kind"] == "Secret" && value["apiVersion"] == "v1"
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn stamped(object: Value, cluster_scoped: bool) -> (Value, Identity) {
        let Value::Object(mut map) = object else {
            panic!()
        };
        let identity = stamp(
            &mut map,
            &Stamp {
                blueprint: "web",
                instance: "acme",
                resource: "app",
                wave: 2,
                namespace: Some("tenant-acme"),
                cluster_scoped,
                policies: &[],
            },
            &Scopes::default(),
        );
        (Value::Object(map), identity)
    }

    #[test]
    fn namespaced_objects_get_the_default_namespace_after_their_name() {
        let (object, identity) = stamped(
            json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "labels": {"app": "web"}}}),
            false,
        );
        let keys: Vec<&String> = object["metadata"].as_object().unwrap().keys().collect();
        assert_eq!(keys, ["name", "namespace", "labels", "annotations"]);
        assert_eq!(
            object["metadata"]["labels"],
            json!({"app": "web", MANAGED_BY: "kiln", BLUEPRINT_LABEL: "web", INSTANCE_LABEL: "acme"})
        );
        assert_eq!(
            object["metadata"]["annotations"],
            json!({RESOURCE_ID_ANNOTATION: "app", SYNC_WAVE_ANNOTATION: "2"})
        );
        assert_eq!(identity.to_string(), "Deployment.apps tenant-acme/web");
    }

    #[test]
    fn cluster_scoped_objects_get_no_namespace() {
        let (object, identity) = stamped(
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "tenant-acme"}}),
            false,
        );
        assert!(object["metadata"].get("namespace").is_none());
        assert_eq!(identity.to_string(), "Namespace tenant-acme");
        let (object, _) = stamped(
            json!({"apiVersion": "x.io/v1", "kind": "Thing", "metadata": {"name": "t"}}),
            true,
        );
        assert!(object["metadata"].get("namespace").is_none());
    }

    #[test]
    fn rendered_crds_teach_scopes() {
        let mut scopes = Scopes::default();
        let crd = json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "spec": {"group": "x.io", "names": {"kind": "Thing"}, "scope": "Cluster"}});
        if let Some(map) = crd.as_object() {
            scopes.learn(map);
        }
        assert!(scopes.is_cluster_scoped("x.io", "Thing"));
        assert!(!scopes.is_cluster_scoped("x.io", "Other"));
    }
}
