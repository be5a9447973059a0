//! How a resource's dependencies and policies travel with its object.
//!
//! `kiln apply` may read a tree rendered long before, from Git or a
//! directory, without the configuration that rendered it. So everything apply
//! needs beyond the object itself rides along as annotations, written only
//! when it differs from the default so that plain trees stay plain:
//!
//! ```text
//! kiln.dev/depends-on: namespace,config      # resource ids of the same instance
//! kiln.dev/creation-policy: Once
//! kiln.dev/deletion-policy: Retain
//! kiln.dev/conflict-policy: Force
//! kiln.dev/patch-strategy: merge             # or replace
//! kiln.dev/wait-for-ready: "true"
//! kiln.dev/timeout: 5m
//! kiln.dev/ignore-fields: /spec/replicas,/data/extra
//! ```

use std::time::Duration;

use serde_json::{Map, Value};

use crate::api::{ConflictPolicy, CreationPolicy, DeletionPolicy, PatchStrategy, ResourceSpec};
use crate::source::parse_duration;

/// Resource ids this object's resource depends on, comma-separated.
pub const DEPENDS_ON: &str = "kiln.dev/depends-on";
/// `Once` when the object is created and never updated.
pub const CREATION_POLICY: &str = "kiln.dev/creation-policy";
/// `Retain` when the object stays in the cluster after it leaves the tree.
pub const DELETION_POLICY: &str = "kiln.dev/deletion-policy";
/// `Force` when Kiln takes fields other managers own.
pub const CONFLICT_POLICY: &str = "kiln.dev/conflict-policy";
/// `merge` or `replace` when the object is not written by Server-Side Apply.
pub const PATCH_STRATEGY: &str = "kiln.dev/patch-strategy";
/// `"true"` when dependents wait until the object is healthy.
pub const WAIT_FOR_READY: &str = "kiln.dev/wait-for-ready";
/// How long readiness may take, e.g. `5m`.
pub const TIMEOUT: &str = "kiln.dev/timeout";
/// JSON pointers, comma-separated, left out of drift detection.
pub const IGNORE_FIELDS: &str = "kiln.dev/ignore-fields";

/// How long readiness may take when no timeout is given.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// What apply needs to know about one object besides the object itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Policies {
    /// Resource ids of the same instance that are applied first.
    pub depends_on: Vec<String>,
    /// Create only, or create and update.
    pub creation: CreationPolicy,
    /// Delete or retain when no longer rendered.
    pub deletion: DeletionPolicy,
    /// Report or take conflicting fields.
    pub conflict: ConflictPolicy,
    /// Server-Side Apply, merge patch or replace.
    pub patch: PatchStrategy,
    /// Dependents wait until this object is healthy.
    pub wait_for_ready: bool,
    /// How long readiness may take.
    pub timeout: Duration,
    /// JSON pointers left out of drift detection and not overwritten.
    pub ignore_fields: Vec<String>,
}

impl Policies {
    /// The policies a resource declares; `Err` names the field at fault.
    pub fn of(resource: &ResourceSpec) -> Result<Self, String> {
        let timeout = match &resource.timeout {
            Some(text) => parse_duration(text).map_err(|e| format!("timeout: {e}"))?,
            None => DEFAULT_TIMEOUT,
        };
        for pointer in &resource.ignore_fields {
            check_pointer(pointer).map_err(|e| format!("ignoreFields: {e}"))?;
        }
        Ok(Self {
            depends_on: resource.depends_on.clone(),
            creation: resource.creation_policy,
            deletion: resource.deletion_policy,
            conflict: resource.conflict_policy,
            patch: resource.patch_strategy,
            wait_for_ready: resource.wait_for_ready,
            timeout,
            ignore_fields: resource.ignore_fields.clone(),
        })
    }

    /// The annotations that carry these policies, defaults left out.
    pub fn annotations(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if !self.depends_on.is_empty() {
            out.push((DEPENDS_ON, self.depends_on.join(",")));
        }
        if self.creation == CreationPolicy::Once {
            out.push((CREATION_POLICY, "Once".into()));
        }
        if self.deletion == DeletionPolicy::Retain {
            out.push((DELETION_POLICY, "Retain".into()));
        }
        if self.conflict == ConflictPolicy::Force {
            out.push((CONFLICT_POLICY, "Force".into()));
        }
        match self.patch {
            PatchStrategy::Apply => {}
            PatchStrategy::Merge => out.push((PATCH_STRATEGY, "merge".into())),
            PatchStrategy::Replace => out.push((PATCH_STRATEGY, "replace".into())),
        }
        if self.wait_for_ready {
            out.push((WAIT_FOR_READY, "true".into()));
        }
        if self.timeout != DEFAULT_TIMEOUT {
            out.push((TIMEOUT, format_duration(self.timeout)));
        }
        if !self.ignore_fields.is_empty() {
            out.push((IGNORE_FIELDS, self.ignore_fields.join(",")));
        }
        out
    }

    /// Reads the policies back from an object's annotations; `Err` names the
    /// annotation at fault.
    pub fn from_annotations(annotations: Option<&Map<String, Value>>) -> Result<Self, String> {
        let mut policies = Self {
            timeout: DEFAULT_TIMEOUT,
            ..Self::default()
        };
        let Some(annotations) = annotations else {
            return Ok(policies);
        };
        let get = |key: &str| annotations.get(key).and_then(Value::as_str);
        let bad = |key: &str, value: &str, expected: &str| {
            format!("annotation {key}: {value:?} is not {expected}")
        };
        let list = |text: &str| -> Vec<String> {
            let mut list: Vec<String> = text
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect();
            // Held per object: a collected Vec starts at room for four.
            list.shrink_to_fit();
            list
        };
        if let Some(text) = get(DEPENDS_ON) {
            policies.depends_on = list(text);
        }
        if let Some(text) = get(CREATION_POLICY) {
            policies.creation = match text {
                "Once" => CreationPolicy::Once,
                "WhenNeeded" => CreationPolicy::WhenNeeded,
                other => return Err(bad(CREATION_POLICY, other, "Once or WhenNeeded")),
            };
        }
        if let Some(text) = get(DELETION_POLICY) {
            policies.deletion = match text {
                "Retain" => DeletionPolicy::Retain,
                "Delete" => DeletionPolicy::Delete,
                other => return Err(bad(DELETION_POLICY, other, "Retain or Delete")),
            };
        }
        if let Some(text) = get(CONFLICT_POLICY) {
            policies.conflict = match text {
                "Force" => ConflictPolicy::Force,
                "Stuck" => ConflictPolicy::Stuck,
                other => return Err(bad(CONFLICT_POLICY, other, "Force or Stuck")),
            };
        }
        if let Some(text) = get(PATCH_STRATEGY) {
            policies.patch = match text {
                "apply" => PatchStrategy::Apply,
                "merge" => PatchStrategy::Merge,
                "replace" => PatchStrategy::Replace,
                other => return Err(bad(PATCH_STRATEGY, other, "apply, merge or replace")),
            };
        }
        if let Some(text) = get(WAIT_FOR_READY) {
            policies.wait_for_ready = match text {
                "true" => true,
                "false" => false,
                other => return Err(bad(WAIT_FOR_READY, other, "\"true\" or \"false\"")),
            };
        }
        if let Some(text) = get(TIMEOUT) {
            policies.timeout =
                parse_duration(text).map_err(|e| format!("annotation {TIMEOUT}: {e}"))?;
        }
        if let Some(text) = get(IGNORE_FIELDS) {
            policies.ignore_fields = list(text);
            for pointer in &policies.ignore_fields {
                check_pointer(pointer).map_err(|e| format!("annotation {IGNORE_FIELDS}: {e}"))?;
            }
        }
        Ok(policies)
    }
}

fn check_pointer(pointer: &str) -> Result<(), String> {
    if !pointer.starts_with('/') {
        return Err(format!(
            "{pointer:?} is not a JSON pointer (it must start with /)"
        ));
    }
    if pointer.contains(',') {
        return Err(format!(
            "{pointer:?} contains a comma, which Kiln does not support"
        ));
    }
    Ok(())
}

/// `90s`, `5m`, `1h`: the largest unit that divides evenly.
pub fn format_duration(duration: Duration) -> String {
    let ms = duration.as_millis();
    if !ms.is_multiple_of(1000) {
        return format!("{ms}ms");
    }
    let s = duration.as_secs();
    if s.is_multiple_of(3600) && s > 0 {
        format!("{}h", s / 3600)
    } else if s.is_multiple_of(60) && s > 0 {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resource(yaml: &str) -> ResourceSpec {
        crate::yaml::from_str(yaml, "test").unwrap()
    }

    #[test]
    fn defaults_add_no_annotations() {
        let policies = Policies::of(&resource("id: app\ntemplate: x\n")).unwrap();
        assert!(policies.annotations().is_empty());
        assert_eq!(Policies::from_annotations(None).unwrap(), policies);
    }

    #[test]
    fn every_policy_survives_the_round_trip_through_annotations() {
        let policies = Policies::of(&resource(
            "id: app\ntemplate: x\ndependsOn: [namespace, config]\ncreationPolicy: Once\n\
             deletionPolicy: Retain\nconflictPolicy: Force\npatchStrategy: merge\n\
             waitForReady: true\ntimeout: 90s\nignoreFields: [/spec/replicas, /data/x]\n",
        ))
        .unwrap();
        let annotations: Map<String, Value> = policies
            .annotations()
            .into_iter()
            .map(|(k, v)| (k.to_string(), Value::String(v)))
            .collect();
        assert_eq!(annotations.len(), 8);
        assert_eq!(annotations[TIMEOUT], "90s");
        assert_eq!(annotations[DEPENDS_ON], "namespace,config");
        assert_eq!(
            Policies::from_annotations(Some(&annotations)).unwrap(),
            policies
        );
    }

    #[test]
    fn bad_policies_name_the_field() {
        let err = Policies::of(&resource("id: a\ntemplate: x\ntimeout: soon\n")).unwrap_err();
        assert!(err.starts_with("timeout:"), "{err}");
        let err = Policies::of(&resource(
            "id: a\ntemplate: x\nignoreFields: [spec.replicas]\n",
        ))
        .unwrap_err();
        assert!(err.contains("not a JSON pointer"), "{err}");
        let mut annotations = Map::new();
        annotations.insert(CREATION_POLICY.into(), "Sometimes".into());
        let err = Policies::from_annotations(Some(&annotations)).unwrap_err();
        assert!(err.contains(CREATION_POLICY), "{err}");
    }
}
