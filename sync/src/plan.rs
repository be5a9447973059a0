//! What an apply will do, decided without an API server: for each desired
//! object an action and a wave, and the objects to prune.
//!
//! Waves follow the dependency graph: a resource's `dependsOn` (within its
//! instance), a namespaced object's Namespace and a custom resource's CRD
//! when they are in the same tree. Wave `n` starts when wave `n - 1` is
//! done; an object whose dependency failed is skipped.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use base64::Engine as _;
use kiln_render::api::CreationPolicy;
use kiln_render::manifest::{Identity, is_crd};
use serde_json::Value;

use crate::desired::{DIGEST_ANNOTATION, Desired};
use crate::inventory::Entry;
use crate::{Error, Result};

/// Marks an object Kiln left in the cluster when it left the tree.
pub const ORPHANED_LABEL: &str = "kiln.dev/orphaned";

/// What happens to one desired object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// It does not exist.
    Create,
    /// It exists and differs from what Kiln last applied (or Kiln never
    /// applied it).
    Update,
    /// Kiln applied exactly this before, but live fields no longer hold
    /// its values: drift, confirmed by a dry-run before it is written.
    Drift,
    /// Nothing to do.
    Unchanged,
    /// Left alone, for the reason given.
    Skip(String),
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Create => f.write_str("create"),
            Action::Update => f.write_str("update"),
            Action::Drift => f.write_str("drift"),
            Action::Unchanged => f.write_str("unchanged"),
            Action::Skip(why) => write!(f, "skip ({why})"),
        }
    }
}

/// One desired object and what happens to it.
#[derive(Debug, Clone)]
pub struct Step {
    /// The object.
    pub desired: Desired,
    /// What happens to it.
    pub action: Action,
    /// Its wave.
    pub wave: usize,
    /// Indices of the steps it depends on.
    pub dependencies: Vec<usize>,
    /// Dependents wait until it is healthy: `waitForReady`, or a CRD that
    /// objects of the tree need.
    pub wait: bool,
    /// It carries an orphan marker from an earlier Retain: remove it.
    pub adopt: bool,
}

/// An object of the inventory that left the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prune {
    /// What the inventory recorded.
    pub entry: Entry,
    /// Keep it, orphaned, rather than delete it.
    pub retain: bool,
}

/// The plan of one apply.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// Every desired object, by wave then identity.
    pub steps: Vec<Step>,
    /// Objects to prune, deepest wave first.
    pub prune: Vec<Prune>,
    /// How many waves.
    pub waves: usize,
}

/// Live state the plan is made from: the desired objects that exist, as
/// read, or only their uid (a string) for one already known to be unchanged
/// (see [`settled`]).
pub type Live = HashMap<Identity, Value>;

/// The uid of a live object, or of a settled one kept as its uid alone.
pub fn live_uid(live: &Value) -> Option<&str> {
    live.as_str()
        .or_else(|| live["metadata"]["uid"].as_str())
        .filter(|u| !u.is_empty())
}

/// Whether `live` needs nothing: unchanged, nobody waits on it, no orphan
/// marker. Such objects need not be kept in memory; their uid stands for
/// them.
pub fn settled(desired: &Desired, live: &Value) -> bool {
    !desired.policies.wait_for_ready
        && live["metadata"]["labels"][ORPHANED_LABEL].is_null()
        && action(desired, Some(live)) == Action::Unchanged
}

impl Plan {
    /// Decides every step. `prune` false leaves objects that left the tree.
    pub fn new(
        desired: Vec<Desired>,
        live: &Live,
        inventory: &[Entry],
        prune: bool,
    ) -> Result<Self> {
        let dependencies = dependencies(&desired);
        let waves = waves(&desired, &dependencies)?;
        let mut has_dependents = vec![false; desired.len()];
        for deps in &dependencies {
            for &d in deps {
                has_dependents[d] = true;
            }
        }
        let wanted: HashSet<&Identity> = desired.iter().map(|d| &d.identity).collect();
        let mut pruned: Vec<Prune> = if prune {
            inventory
                .iter()
                .filter(|e| !wanted.contains(&e.identity))
                .map(|e| Prune {
                    entry: e.clone(),
                    retain: e.retain,
                })
                .collect()
        } else {
            Vec::new()
        };
        pruned.sort_by(|a, b| b.entry.wave.cmp(&a.entry.wave).then(a.entry.cmp(&b.entry)));

        let mut steps: Vec<Step> = desired
            .into_iter()
            .zip(dependencies)
            .enumerate()
            .map(|(i, (desired, dependencies))| {
                let current = live.get(&desired.identity);
                let adopt =
                    current.is_some_and(|l| !l["metadata"]["labels"][ORPHANED_LABEL].is_null());
                let action = action(&desired, current);
                let wait = desired.policies.wait_for_ready
                    || (has_dependents[i] && is_crd_value(&desired.object));
                Step {
                    desired,
                    action: if adopt && action == Action::Unchanged {
                        Action::Update
                    } else {
                        action
                    },
                    wave: waves[i],
                    dependencies,
                    wait,
                    adopt,
                }
            })
            .collect();
        // Sort by wave and identity, keeping dependency indices right.
        let mut order: Vec<usize> = (0..steps.len()).collect();
        order.sort_by(|&a, &b| {
            (steps[a].wave, &steps[a].desired.identity)
                .cmp(&(steps[b].wave, &steps[b].desired.identity))
        });
        let mut position = vec![0; steps.len()];
        for (new, &old) in order.iter().enumerate() {
            position[old] = new;
        }
        let mut slots: Vec<Option<Step>> = steps.drain(..).map(Some).collect();
        let mut sorted = Vec::with_capacity(slots.len());
        for &old in &order {
            if let Some(mut step) = slots[old].take() {
                for d in &mut step.dependencies {
                    *d = position[*d];
                }
                sorted.push(step);
            }
        }
        let count = sorted.iter().map(|s| s.wave + 1).max().unwrap_or(0);
        Ok(Plan {
            steps: sorted,
            prune: pruned,
            waves: count,
        })
    }

    /// How many steps take each action, by its name.
    pub fn counts(&self) -> BTreeMap<&'static str, usize> {
        let mut counts = BTreeMap::new();
        for step in &self.steps {
            let name = match step.action {
                Action::Create => "create",
                Action::Update => "update",
                Action::Drift => "drift",
                Action::Unchanged => "unchanged",
                Action::Skip(_) => "skip",
            };
            *counts.entry(name).or_default() += 1;
        }
        let retained = self.prune.iter().filter(|p| p.retain).count();
        if retained > 0 {
            counts.insert("retain", retained);
        }
        if self.prune.len() > retained {
            counts.insert("prune", self.prune.len() - retained);
        }
        counts
    }

    /// The plan as lines for people: every step that does something, by
    /// wave, then what is pruned.
    pub fn lines(&self) -> Vec<String> {
        let mut lines = Vec::new();
        for step in &self.steps {
            if step.action != Action::Unchanged {
                lines.push(format!(
                    "wave {}: {} {}",
                    step.wave,
                    step.action,
                    step.desired.label()
                ));
            }
        }
        for prune in &self.prune {
            let verb = if prune.retain {
                "retain (orphan)"
            } else {
                "prune"
            };
            lines.push(format!(
                "{verb} {} ({})",
                prune.entry.identity, prune.entry.owner
            ));
        }
        lines
    }
}

fn is_crd_value(object: &Value) -> bool {
    object.as_object().is_some_and(is_crd)
}

/// Each object's dependencies, as indices: `dependsOn` within its instance,
/// the Namespace it lives in, the CRD that defines its kind.
fn dependencies(desired: &[Desired]) -> Vec<Vec<usize>> {
    let mut by_resource: HashMap<(&str, &str, &str), usize> = HashMap::new();
    let mut namespaces: HashMap<&str, usize> = HashMap::new();
    let mut crds: HashMap<(&str, &str), usize> = HashMap::new();
    for (i, d) in desired.iter().enumerate() {
        by_resource.insert(
            (&d.owner.blueprint, &d.owner.instance, &d.owner.resource),
            i,
        );
        if d.identity.group.is_empty() && d.identity.kind == "Namespace" {
            namespaces.insert(&d.identity.name, i);
        }
        if is_crd_value(&d.object)
            && let (Some(group), Some(kind)) = (
                d.object["spec"]["group"].as_str(),
                d.object["spec"]["names"]["kind"].as_str(),
            )
        {
            crds.insert((group, kind), i);
        }
    }
    desired
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let mut deps: Vec<usize> = d
                .policies
                .depends_on
                .iter()
                .filter_map(|r| {
                    by_resource
                        .get(&(&*d.owner.blueprint, &*d.owner.instance, r.as_str()))
                        .copied()
                })
                .collect();
            if !d.identity.namespace.is_empty()
                && let Some(&n) = namespaces.get(d.identity.namespace.as_str())
            {
                deps.push(n);
            }
            if let Some(&c) = crds.get(&(d.identity.group.as_str(), d.identity.kind.as_str())) {
                deps.push(c);
            }
            deps.retain(|&x| x != i);
            deps.sort_unstable();
            deps.dedup();
            deps
        })
        .collect()
}

/// Each object's wave: 0 without dependencies, else one more than its
/// deepest dependency. A cycle is an error naming its objects.
fn waves(desired: &[Desired], dependencies: &[Vec<usize>]) -> Result<Vec<usize>> {
    let n = desired.len();
    let mut dependents = vec![Vec::new(); n];
    let mut pending: Vec<usize> = dependencies.iter().map(Vec::len).collect();
    for (i, deps) in dependencies.iter().enumerate() {
        for &d in deps {
            dependents[d].push(i);
        }
    }
    let mut wave = vec![0; n];
    let mut ready: Vec<usize> = (0..n).filter(|&i| pending[i] == 0).collect();
    let mut done = 0;
    while let Some(i) = ready.pop() {
        done += 1;
        for &j in &dependents[i] {
            wave[j] = wave[j].max(wave[i] + 1);
            pending[j] -= 1;
            if pending[j] == 0 {
                ready.push(j);
            }
        }
    }
    if done < n {
        let stuck: Vec<String> = (0..n)
            .filter(|&i| pending[i] > 0)
            .map(|i| desired[i].label())
            .collect();
        return Err(Error::InvalidPlan {
            message: format!(
                "dependency cycle between {}",
                kiln_render::abbreviate(&stuck, 5)
            ),
        });
    }
    Ok(wave)
}

fn action(desired: &Desired, live: Option<&Value>) -> Action {
    let Some(live) = live else {
        return Action::Create;
    };
    if live.is_string() {
        return Action::Unchanged;
    }
    if desired.policies.creation == CreationPolicy::Once {
        return Action::Skip("creationPolicy Once and it exists".into());
    }
    let applied = live["metadata"]["annotations"][DIGEST_ANNOTATION].as_str();
    if applied != Some(desired.digest.as_str()) {
        return Action::Update;
    }
    if holds(&desired.object, live, &desired.policies.ignore_fields) {
        Action::Unchanged
    } else {
        Action::Drift
    }
}

/// Whether every field of `desired` holds the same value in `live`, but
/// the `ignore` pointers and status. A Secret's `stringData` is compared
/// with the `data` the server stores it as.
pub fn holds(desired: &Value, live: &Value, ignore: &[String]) -> bool {
    // Only a Secret with stringData or an object with status needs a
    // rewritten copy; every other object, on every resync, is compared as is.
    let rewrite = desired.get("status").is_some()
        || (desired["kind"] == "Secret" && desired.get("stringData").is_some());
    if !rewrite {
        return subset(desired, live, &mut String::new(), ignore);
    }
    let mut desired = desired.clone();
    fold_string_data(&mut desired);
    if let Some(map) = desired.as_object_mut() {
        map.remove("status");
    }
    subset(&desired, live, &mut String::new(), ignore)
}

fn subset(desired: &Value, live: &Value, path: &mut String, ignore: &[String]) -> bool {
    if ignore.iter().any(|p| p == path) {
        return true;
    }
    match (desired, live) {
        (Value::Object(d), Value::Object(l)) => d.iter().all(|(k, v)| {
            let len = path.len();
            path.push('/');
            path.push_str(&k.replace('~', "~0").replace('/', "~1"));
            let ok = match l.get(k) {
                Some(lv) => subset(v, lv, path, ignore),
                None => v.is_null() || ignored_below(path, ignore) || empty(v),
            };
            path.truncate(len);
            ok
        }),
        (Value::Array(d), Value::Array(l)) => {
            d.len() == l.len()
                && d.iter().zip(l).enumerate().all(|(i, (dv, lv))| {
                    let len = path.len();
                    path.push_str(&format!("/{i}"));
                    let ok = subset(dv, lv, path, ignore);
                    path.truncate(len);
                    ok
                })
        }
        (Value::Number(d), Value::Number(l)) => d.as_f64() == l.as_f64(),
        (d, l) if d == l => true,
        // The server stores resource quantities canonically: `cpu: 0.5`
        // comes back as "500m", `1024Mi` as "1Gi".
        (d, Value::String(l)) if is_quantity_path(path) => {
            let d = match d {
                Value::Number(n) => n.as_f64(),
                Value::String(s) => quantity(s),
                _ => None,
            };
            d.is_some() && d == quantity(l)
        }
        _ => false,
    }
}

fn is_quantity_path(path: &str) -> bool {
    ["/requests/", "/limits/", "/hard/", "/capacity/"]
        .iter()
        .any(|p| path.contains(p))
}

/// A Kubernetes quantity's value: `500m`, `1.5`, `2Gi`, `1e3`.
fn quantity(text: &str) -> Option<f64> {
    const SUFFIXES: [(&str, f64); 15] = [
        ("Ki", 1024.0),
        ("Mi", 1_048_576.0),
        ("Gi", 1_073_741_824.0),
        ("Ti", 1_099_511_627_776.0),
        ("Pi", 1_125_899_906_842_624.0),
        ("Ei", 1_152_921_504_606_846_976.0),
        ("n", 1e-9),
        ("u", 1e-6),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
        ("E", 1e18),
    ];
    let text = text.trim();
    for (suffix, factor) in SUFFIXES {
        if let Some(number) = text.strip_suffix(suffix) {
            return number.parse::<f64>().ok().map(|n| n * factor);
        }
    }
    text.parse::<f64>().ok()
}

/// Empty maps and lists are dropped by the server.
fn empty(value: &Value) -> bool {
    match value {
        Value::Object(m) => m.is_empty(),
        Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

fn ignored_below(path: &str, ignore: &[String]) -> bool {
    ignore
        .iter()
        .any(|p| p.starts_with(path) && p[path.len()..].starts_with('/'))
}

fn fold_string_data(object: &mut Value) {
    if object["kind"] != "Secret" || object["apiVersion"] != "v1" {
        return;
    }
    let Some(map) = object.as_object_mut() else {
        return;
    };
    let Some(Value::Object(string_data)) = map.remove("stringData") else {
        return;
    };
    let data = map
        .entry("data")
        .or_insert_with(|| Value::Object(Default::default()));
    if let Some(data) = data.as_object_mut() {
        for (k, v) in string_data {
            let text = v.as_str().unwrap_or_default();
            data.insert(
                k,
                base64::engine::general_purpose::STANDARD
                    .encode(text)
                    .into(),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::Owner;
    use serde_json::json;

    fn object(kind: &str, name: &str, namespace: &str, resource: &str, extra: Value) -> Desired {
        let mut metadata = json!({"name": name,
            "labels": {"kiln.dev/blueprint": "web", "kiln.dev/instance": "a"},
            "annotations": {"kiln.dev/resource-id": resource}});
        if !namespace.is_empty() {
            metadata["namespace"] = namespace.into();
        }
        if let Some(a) = extra.get("annotations").and_then(Value::as_object) {
            for (k, v) in a {
                metadata["annotations"][k] = v.clone();
            }
        }
        let mut value = json!({"apiVersion": if kind == "Deployment" {"apps/v1"} else {"v1"}, "kind": kind, "metadata": metadata});
        if let Some(data) = extra.get("data") {
            value["data"] = data.clone();
        }
        Desired::new(value, &format!("web/a/{resource}.yaml")).unwrap()
    }

    fn tree() -> Vec<Desired> {
        vec![
            object(
                "Deployment",
                "app",
                "t-a",
                "app",
                json!({"annotations": {"kiln.dev/depends-on": "config"}}),
            ),
            object(
                "ConfigMap",
                "config",
                "t-a",
                "config",
                json!({"data": {"k": "v"}}),
            ),
            object("Namespace", "t-a", "", "namespace", json!({})),
        ]
    }

    fn live_of(d: &Desired) -> Value {
        let mut live = d.body("prod");
        live["metadata"]["uid"] = "u".into();
        live["metadata"]["resourceVersion"] = "1".into();
        live["status"] = json!({"phase": "Active"});
        live
    }

    #[test]
    fn waves_follow_depends_on_and_namespaces() {
        let plan = Plan::new(tree(), &Live::new(), &[], true).unwrap();
        let order: Vec<(usize, &str, &Action)> = plan
            .steps
            .iter()
            .map(|s| (s.wave, s.desired.identity.kind.as_str(), &s.action))
            .collect();
        assert_eq!(
            order,
            [
                (0, "Namespace", &Action::Create),
                (1, "ConfigMap", &Action::Create),
                (2, "Deployment", &Action::Create)
            ]
        );
        assert_eq!(plan.steps[2].dependencies, [1, 0]);
        assert_eq!(plan.waves, 3);
    }

    #[test]
    fn what_kiln_applied_and_still_holds_is_unchanged() {
        let desired = tree();
        let mut live: Live = desired
            .iter()
            .map(|d| (d.identity.clone(), live_of(d)))
            .collect();
        let plan = Plan::new(desired.clone(), &live, &[], true).unwrap();
        assert!(
            plan.steps.iter().all(|s| s.action == Action::Unchanged),
            "{:?}",
            plan.lines()
        );

        let config = &desired[1].identity;
        live.get_mut(config).unwrap()["data"]["k"] = "edited".into();
        let plan = Plan::new(desired.clone(), &live, &[], true).unwrap();
        assert_eq!(plan.counts()["drift"], 1);

        live.get_mut(config).unwrap()["metadata"]["annotations"][DIGEST_ANNOTATION] = "old".into();
        let plan = Plan::new(desired, &live, &[], true).unwrap();
        assert_eq!(plan.counts()["update"], 1);
    }

    #[test]
    fn ignored_fields_and_secret_string_data_are_not_drift() {
        let desired = json!({"spec": {"replicas": 3, "template": {"x": 1}}});
        let live = json!({"spec": {"replicas": 5, "template": {"x": 1, "y": 2}}});
        assert!(!holds(&desired, &live, &[]));
        assert!(holds(&desired, &live, &["/spec/replicas".to_string()]));
        let secret =
            json!({"apiVersion": "v1", "kind": "Secret", "stringData": {"password": "hunter2"}});
        let stored =
            json!({"apiVersion": "v1", "kind": "Secret", "data": {"password": "aHVudGVyMg=="}});
        assert!(holds(&secret, &stored, &[]));
    }

    #[test]
    fn only_inventory_entries_that_left_the_tree_are_pruned_deepest_first() {
        let desired = tree();
        let entry = |name: &str, wave: usize, retain: bool| Entry {
            identity: Identity {
                group: String::new(),
                kind: "ConfigMap".into(),
                namespace: "t-a".into(),
                name: name.into(),
            },
            version: "v1".into(),
            owner: Owner::default(),
            wave,
            retain,
            uid: String::new(),
        };
        let inventory = vec![
            entry("config", 1, false),
            entry("old", 1, false),
            entry("kept", 2, true),
        ];
        let plan = Plan::new(desired.clone(), &Live::new(), &inventory, true).unwrap();
        let names: Vec<(&str, bool)> = plan
            .prune
            .iter()
            .map(|p| (p.entry.identity.name.as_str(), p.retain))
            .collect();
        assert_eq!(names, [("kept", true), ("old", false)]);
        assert!(
            Plan::new(desired, &Live::new(), &inventory, false)
                .unwrap()
                .prune
                .is_empty()
        );
    }

    #[test]
    fn once_skips_existing_objects_and_cycles_are_refused() {
        let mut desired = tree();
        desired[1] = object(
            "ConfigMap",
            "config",
            "t-a",
            "config",
            json!({"annotations": {"kiln.dev/creation-policy": "Once"}}),
        );
        let live: Live = desired
            .iter()
            .map(|d| (d.identity.clone(), live_of(d)))
            .collect();
        let plan = Plan::new(desired, &live, &[], true).unwrap();
        assert!(matches!(plan.steps[1].action, Action::Skip(_)));

        let cyclic = vec![
            object(
                "ConfigMap",
                "a",
                "n",
                "a",
                json!({"annotations": {"kiln.dev/depends-on": "b"}}),
            ),
            object(
                "ConfigMap",
                "b",
                "n",
                "b",
                json!({"annotations": {"kiln.dev/depends-on": "a"}}),
            ),
        ];
        let err = Plan::new(cyclic, &Live::new(), &[], true)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("dependency cycle between ConfigMap n/a"),
            "{err}"
        );
    }
}
