//! What an apply will do, decided without an API server: for each desired
//! object an action and a wave, and the objects to prune.
//!
//! Waves follow the dependency graph: a resource's `dependsOn` (within its
//! instance), a namespaced object's Namespace and a custom resource's CRD
//! when they are in the same tree. An object's wave is its depth in that
//! graph; the apply starts each object once its own dependencies are done,
//! and skips one whose dependency failed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use kiln_render::api::CreationPolicy;
use kiln_render::manifest::Identity;
use serde_json::Value;

use crate::compare::holds;
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
    /// The object as it is in the cluster, if it exists.
    pub live: Option<LiveObject>,
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

/// A desired object's live state, as the plan is made from it.
#[derive(Debug, Clone, PartialEq)]
pub enum LiveObject {
    /// As read (boxed: a parsed object is several times the size of a uid,
    /// and most of a resync's objects are settled).
    Read(Box<Value>),
    /// Known to need nothing (see [`settled`]): only its uid is kept, so
    /// that a resync of a large tree holds little of it in memory.
    Settled {
        /// Its uid.
        uid: String,
    },
}

impl LiveObject {
    /// The object, when it was kept.
    pub fn object(&self) -> Option<&Value> {
        match self {
            LiveObject::Read(object) => Some(object),
            LiveObject::Settled { .. } => None,
        }
    }

    /// Its uid.
    pub fn uid(&self) -> Option<&str> {
        match self {
            LiveObject::Read(object) => object["metadata"]["uid"].as_str(),
            LiveObject::Settled { uid } => Some(uid.as_str()),
        }
        .filter(|u| !u.is_empty())
    }
}

/// Live state the plan is made from: for each desired object, in the same
/// order, what exists of it.
pub type Live = Vec<Option<LiveObject>>;

/// Whether `live` needs nothing: unchanged, nobody waits on it, no orphan
/// marker. Such objects need not be kept in memory; their uid stands for
/// them.
pub fn settled(desired: &Desired, live: &Value) -> bool {
    !desired.policies.wait_for_ready
        && live["metadata"]["labels"][ORPHANED_LABEL].is_null()
        && action_on(desired, live) == Action::Unchanged
}

impl Plan {
    /// Decides every step. `prune` false leaves objects that left the tree.
    pub fn new(
        desired: Vec<Desired>,
        mut live: Live,
        inventory: &[Entry],
        prune: bool,
    ) -> Result<Self> {
        live.resize_with(desired.len(), || None);
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
            .zip(live)
            .enumerate()
            .map(|(i, ((desired, dependencies), current))| {
                let adopt = current
                    .as_ref()
                    .and_then(LiveObject::object)
                    .is_some_and(|l| !l["metadata"]["labels"][ORPHANED_LABEL].is_null());
                let action = action(&desired, current.as_ref());
                let wait = desired.policies.wait_for_ready
                    || (has_dependents[i] && desired.defines.is_some());
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
                    live: current,
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
        drop(order);
        for step in &mut steps {
            for d in &mut step.dependencies {
                *d = position[*d];
            }
        }
        // Each step to its place, following the permutation's cycles: no
        // second vector of steps.
        for i in 0..steps.len() {
            while position[i] != i {
                let j = position[i];
                steps.swap(i, j);
                position.swap(i, j);
            }
        }
        let count = steps.iter().map(|s| s.wave + 1).max().unwrap_or(0);
        Ok(Plan {
            steps,
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
        if let Some(defines) = &d.defines {
            crds.insert((&defines.0, &defines.1), i);
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

fn action(desired: &Desired, live: Option<&LiveObject>) -> Action {
    match live {
        None => Action::Create,
        Some(LiveObject::Settled { .. }) => Action::Unchanged,
        Some(LiveObject::Read(object)) => action_on(desired, object),
    }
}

fn action_on(desired: &Desired, live: &Value) -> Action {
    if desired.policies.creation == CreationPolicy::Once {
        return Action::Skip("creationPolicy Once and it exists".into());
    }
    let applied = live["metadata"]["annotations"][DIGEST_ANNOTATION].as_str();
    if !applied.is_some_and(|a| desired.digest.is(a)) {
        return Action::Update;
    }
    if holds(&desired.object(), live, &desired.policies.ignore_fields) {
        Action::Unchanged
    } else {
        Action::Drift
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
        let plan = Plan::new(tree(), Live::new(), &[], true).unwrap();
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
            .map(|d| Some(LiveObject::Read(Box::new(live_of(d)))))
            .collect();
        let plan = Plan::new(desired.clone(), live.clone(), &[], true).unwrap();
        assert!(
            plan.steps.iter().all(|s| s.action == Action::Unchanged),
            "{:?}",
            plan.lines()
        );

        if let Some(LiveObject::Read(object)) = &mut live[1] {
            object["data"]["k"] = "edited".into();
        }
        let plan = Plan::new(desired.clone(), live.clone(), &[], true).unwrap();
        assert_eq!(plan.counts()["drift"], 1);

        if let Some(LiveObject::Read(object)) = &mut live[1] {
            object["metadata"]["annotations"][DIGEST_ANNOTATION] = "old".into();
        }
        let plan = Plan::new(desired, live, &[], true).unwrap();
        assert_eq!(plan.counts()["update"], 1);
    }

    #[test]
    fn only_inventory_entries_that_left_the_tree_are_pruned_deepest_first() {
        let desired = tree();
        let entry = |name: &str, wave: usize, retain: bool| Entry {
            identity: Identity {
                group: Default::default(),
                kind: "ConfigMap".into(),
                namespace: "t-a".into(),
                name: name.into(),
            },
            version: "v1".into(),
            owner: Owner::default(),
            wave,
            retain,
            uid: Default::default(),
        };
        let inventory = vec![
            entry("config", 1, false),
            entry("old", 1, false),
            entry("kept", 2, true),
        ];
        let plan = Plan::new(desired.clone(), Live::new(), &inventory, true).unwrap();
        let names: Vec<(&str, bool)> = plan
            .prune
            .iter()
            .map(|p| (p.entry.identity.name.as_str(), p.retain))
            .collect();
        assert_eq!(names, [("kept", true), ("old", false)]);
        assert!(
            Plan::new(desired, Live::new(), &inventory, false)
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
            .map(|d| Some(LiveObject::Read(Box::new(live_of(d)))))
            .collect();
        let plan = Plan::new(desired, live, &[], true).unwrap();
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
        let err = Plan::new(cyclic, Live::new(), &[], true)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("dependency cycle between ConfigMap n/a"),
            "{err}"
        );
    }
}
