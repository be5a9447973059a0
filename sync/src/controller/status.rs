//! What a pass tells the people watching a Pipeline: its status (of a
//! size that does not grow with the fleet) and Kubernetes Events.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kiln_render::api::{PipelineStatus, SourceState};

use crate::desired::Desired;
use crate::report::{Outcome, Report, Status};

/// A failure that ends a pass early or spoils it.
#[derive(Debug, Clone)]
pub struct Trouble {
    /// A condition's reason: what failed.
    pub reason: &'static str,
    /// One line.
    pub message: String,
    /// Retrying without a change cannot help (a bad template, a refusal).
    pub stalled: bool,
}

impl Trouble {
    /// A failure of `reason`, said in one line; stalled when retrying
    /// without a change cannot help.
    pub fn of(reason: &'static str, error: &dyn std::fmt::Display) -> Trouble {
        Trouble {
            reason,
            message: super::gather::one_line(error),
            stalled: stalls(reason),
        }
    }
}

/// Whether a failure of this reason needs a change before a retry can
/// succeed.
fn stalls(reason: &str) -> bool {
    matches!(
        reason,
        "InvalidConfiguration"
            | "ReferenceNotFound"
            | "TemplateFailed"
            | "InstanceCollision"
            | "DuplicateObject"
            | "InvalidYaml"
            | "InvalidObject"
            | "InvalidPlan"
            | "MassDeletion"
            | "PlaintextSecrets"
            | "Unsupported"
    )
}

/// What one pass found, for the status and the events.
#[derive(Debug, Default)]
pub struct Pass {
    /// The configuration or render failed: the last desired state was kept.
    pub trouble: Option<Trouble>,
    /// Sources whose read failed, with why.
    pub source_failures: Vec<(String, String)>,
    /// What the apply did, when there was one.
    pub report: Option<Report>,
    /// Render notes for events: commits, pins.
    pub notes: Vec<(&'static str, String)>,
    /// The commit this pass made (with Git).
    pub committed: Option<String>,
    /// Applying is left to others (`spec.apply: false`).
    pub commit_only: bool,
    /// Where the rollout is, with `spec.rollout`; else the last status's.
    pub rollout: Option<kiln_render::api::RolloutStatus>,
}

/// Figures of the desired state.
#[derive(Debug, Default, Clone)]
pub struct Shape {
    /// Distinct `blueprint/instance`s.
    pub instances: u64,
    /// Objects.
    pub objects: u64,
    /// The commit whose tree is applied (with Git), else a digest of every
    /// object.
    pub revision: String,
}

impl Shape {
    /// The figures of `desired`, the tree of commit `tip` if there is one.
    pub fn of(desired: &[Desired], tip: Option<&str>) -> Shape {
        use sha2::Digest as _;
        let instances: BTreeSet<(&str, &str)> = desired
            .iter()
            .map(|d| (d.owner.blueprint.as_str(), d.owner.instance.as_str()))
            .collect();
        let mut digests: Vec<(String, String)> = desired
            .iter()
            .map(|d| (d.digest.to_string(), d.identity.to_string()))
            .collect();
        digests.sort();
        let mut hasher = sha2::Sha256::new();
        for (digest, identity) in digests {
            hasher.update(identity.as_bytes());
            hasher.update([0]);
            hasher.update(digest.as_bytes());
            hasher.update([0]);
        }
        let hex = format!("{:x}", hasher.finalize());
        Shape {
            instances: instances.len() as u64,
            objects: desired.len() as u64,
            revision: tip.map_or_else(|| format!("sha256:{}", &hex[..12]), str::to_string),
        }
    }
}

/// The Pipeline's new status after `pass`, keeping each condition's
/// transition time while its status holds.
pub fn status(
    previous: Option<&PipelineStatus>,
    generation: Option<i64>,
    pass: &Pass,
    shape: Option<&Shape>,
    sources: &BTreeMap<String, SourceState>,
) -> PipelineStatus {
    let mut status = PipelineStatus {
        observed_generation: generation,
        last_reconcile_time: Some(Time(Timestamp::now())),
        last_commit: pass
            .committed
            .clone()
            .or_else(|| previous.and_then(|p| p.last_commit.clone())),
        last_applied_revision: previous.and_then(|p| p.last_applied_revision.clone()),
        sources: sources.values().cloned().collect(),
        rollout: pass.rollout.clone(),
        ..PipelineStatus::default()
    };
    if let Some(shape) = shape {
        status.instances = Some(shape.instances);
        status.objects = Some(shape.objects);
    }
    if let Some(report) = &pass.report {
        let c = |s| report.count(s) as u64;
        status.applied = Some(c(Status::Created) + c(Status::Updated) + c(Status::Corrected));
        status.failed = Some(c(Status::Failed));
        status.drifted = Some(c(Status::Drifted) + c(Status::Corrected));
        status.pruned = Some(c(Status::Pruned));
        let failing: BTreeSet<String> = report
            .outcomes
            .iter()
            .filter(|o| o.status == Status::Failed)
            .map(|o| format!("{}/{}", o.owner().blueprint, o.owner().instance))
            .collect();
        status.failing_instances = Some(failing.len() as u64);
        status.failing = failing
            .into_iter()
            .take(PipelineStatus::MAX_NAMED)
            .collect();
        if !report.failed() && pass.trouble.is_none() && c(Status::Stopped) == 0 {
            status.last_applied_revision = shape.map(|s| s.revision.clone());
        }
    }
    let (ready, reason, message) = verdict(pass, shape);
    let stalled = pass.trouble.as_ref().is_some_and(|t| t.stalled);
    let previous = previous.map(|p| p.conditions.as_slice()).unwrap_or(&[]);
    let condition = |kind: &str, value: bool, reason: &str, message: &str| {
        condition(previous, generation, kind, value, reason, message)
    };
    status.conditions = vec![
        condition("Ready", ready, reason, &message),
        condition("Reconciling", false, reason, &message),
        condition(
            "Stalled",
            stalled,
            if stalled { reason } else { "NotStalled" },
            if stalled { &message } else { "" },
        ),
    ];
    status
}

/// The status while a pass for generation `generation` runs: what was
/// known before, with `Reconciling` true.
pub fn progressing(previous: Option<&PipelineStatus>, generation: Option<i64>) -> PipelineStatus {
    let mut status = previous.cloned().unwrap_or_default();
    let conditions = std::mem::take(&mut status.conditions);
    status.conditions = conditions
        .iter()
        .filter(|c| c.type_ != "Reconciling")
        .cloned()
        .collect();
    if !status.conditions.iter().any(|c| c.type_ == "Ready") {
        status.conditions.push(condition(
            &conditions,
            generation,
            "Ready",
            false,
            "Progressing",
            "the first pass is running",
        ));
    }
    status.conditions.push(condition(
        &conditions,
        generation,
        "Reconciling",
        true,
        "Progressing",
        &format!("reconciling generation {}", generation.unwrap_or_default()),
    ));
    status
}

/// Ready or not, why, and what to say.
fn verdict(pass: &Pass, shape: Option<&Shape>) -> (bool, &'static str, String) {
    if let Some(trouble) = &pass.trouble {
        return (
            false,
            trouble.reason,
            format!("{}; the last desired state is kept", trouble.message),
        );
    }
    if let Some((name, why)) = pass.source_failures.first() {
        return (
            false,
            "SourceFailed",
            format!(
                "Source {name}: {why}; its last rows are kept and nothing is pruned{}",
                if pass.source_failures.len() > 1 {
                    format!(" ({} sources failing)", pass.source_failures.len())
                } else {
                    String::new()
                }
            ),
        );
    }
    if pass.commit_only {
        return (
            true,
            "Committed",
            format!(
                "{} objects of {} instances rendered into Git; applying is left to ArgoCD or Flux (spec.apply: false)",
                shape.map_or(0, |s| s.objects),
                shape.map_or(0, |s| s.instances)
            ),
        );
    }
    match &pass.report {
        Some(report) if report.failed() => {
            let first = report
                .outcomes
                .iter()
                .find(|o| o.status == Status::Failed)
                .map(ToString::to_string)
                .unwrap_or_default();
            (
                false,
                "ApplyFailed",
                format!(
                    "{} objects failed, first: {first}",
                    report.count(Status::Failed)
                ),
            )
        }
        Some(report) => {
            let shape = shape.cloned().unwrap_or_default();
            (
                true,
                "Succeeded",
                format!(
                    "{} objects of {} instances applied: {}",
                    shape.objects,
                    shape.instances,
                    report.summary()
                ),
            )
        }
        None => (false, "Progressing", "no desired state yet".into()),
    }
}

fn condition(
    previous: &[Condition],
    generation: Option<i64>,
    kind: &str,
    value: bool,
    reason: &str,
    message: &str,
) -> Condition {
    let status = if value { "True" } else { "False" };
    let since = previous
        .iter()
        .find(|c| c.type_ == kind && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| Time(Timestamp::now()));
    Condition {
        type_: kind.to_string(),
        status: status.to_string(),
        reason: reason.to_string(),
        message: truncate(message, 1024),
        observed_generation: generation,
        last_transition_time: since,
    }
}

/// At most `limit` bytes, cut at a character boundary.
pub fn truncate(text: &str, limit: usize) -> String {
    if text.len() <= limit {
        return text.to_string();
    }
    let mut end = limit.saturating_sub(3);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

/// The events a pass publishes on its Pipeline: a type, a reason and a
/// note. One per kind of happening, never one per object.
pub fn events(pass: &Pass) -> Vec<(bool, &'static str, String)> {
    let mut events = Vec::new();
    for (reason, note) in &pass.notes {
        events.push((false, *reason, note.clone()));
    }
    if let Some(trouble) = &pass.trouble {
        events.push((true, trouble.reason, trouble.message.clone()));
    }
    for (name, why) in &pass.source_failures {
        events.push((
            true,
            "SourceFailed",
            format!("Source {name}: {why}; keeping its last rows, pruning nothing"),
        ));
    }
    if let Some(report) = &pass.report {
        let c = |s| report.count(s);
        let written = c(Status::Created) + c(Status::Updated);
        if written > 0 {
            events.push((
                false,
                "Applied",
                format!(
                    "created {}, updated {}",
                    c(Status::Created),
                    c(Status::Updated)
                ),
            ));
        }
        if c(Status::Corrected) > 0 {
            events.push((
                false,
                "DriftCorrected",
                format!(
                    "put back {} objects changed outside Kiln",
                    c(Status::Corrected)
                ),
            ));
        }
        let left: Vec<String> = report
            .outcomes
            .iter()
            .filter(|o| matches!(o.status, Status::Pruned | Status::Orphaned))
            .map(Outcome::object)
            .collect();
        if !left.is_empty() {
            events.push((
                false,
                "Pruned",
                format!(
                    "pruned {}, orphaned {}: {}",
                    c(Status::Pruned),
                    c(Status::Orphaned),
                    kiln_render::abbreviate(&left, 5)
                ),
            ));
        }
        if report.failed() {
            let failed: Vec<String> = report
                .outcomes
                .iter()
                .filter(|o| o.status == Status::Failed)
                .map(ToString::to_string)
                .collect();
            events.push((
                true,
                "ApplyFailed",
                format!(
                    "{} objects failed: {}",
                    failed.len(),
                    kiln_render::abbreviate(&failed, 3)
                ),
            ));
        }
    }
    events
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::Owner;
    use crate::report::Subject;

    /// 10,000 instances, each with a failed object: the status names ten,
    /// counts them all, and stays a few KB.
    #[test]
    fn the_status_does_not_grow_with_the_fleet() {
        let outcome = |i: usize, status: Status| Outcome {
            status,
            subject: Subject::Other(Box::new((
                format!("ConfigMap t-{i}/plan (app/t-{i}/plan)"),
                Owner {
                    blueprint: "app".into(),
                    instance: format!("t-{i}").into(),
                    resource: "plan".into(),
                },
            ))),
            detail: "the server said no".into(),
        };
        let mut report = Report::default();
        for i in 0..10_000 {
            report.outcomes.push(outcome(i, Status::Failed));
            report.outcomes.push(outcome(i, Status::Unchanged));
        }
        let pass = Pass {
            report: Some(report),
            ..Pass::default()
        };
        let shape = Shape {
            instances: 10_000,
            objects: 20_000,
            revision: "sha256:0123456789ab".into(),
        };
        let sources = BTreeMap::from([(
            "rows".to_string(),
            SourceState {
                name: "rows".into(),
                rows: Some(10_000),
                last_error: None,
            },
        )]);
        let status = status(None, Some(3), &pass, Some(&shape), &sources);
        assert_eq!(status.failing_instances, Some(10_000));
        assert_eq!(status.failing.len(), PipelineStatus::MAX_NAMED);
        assert_eq!(status.failed, Some(10_000));
        assert_eq!(status.instances, Some(10_000));
        let ready = &status.conditions[0];
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "ApplyFailed")
        );
        let size = serde_json::to_vec(&status).unwrap().len();
        assert!(size < 4096, "{size} bytes");
        // The revision is kept from before when the apply was not whole.
        assert_eq!(status.last_applied_revision, None);
    }

    #[test]
    fn a_new_generation_is_reconciling_until_its_pass_ends() {
        let done = Pass {
            report: Some(Report::default()),
            ..Pass::default()
        };
        let before = status(None, Some(1), &done, None, &BTreeMap::new());
        let during = progressing(Some(&before), Some(2));
        let find = |s: &PipelineStatus, kind: &str| {
            s.conditions
                .iter()
                .find(|c| c.type_ == kind)
                .map(|c| (c.status.clone(), c.reason.clone()))
        };
        assert_eq!(during.observed_generation, Some(1), "not observed yet");
        assert_eq!(
            find(&during, "Reconciling"),
            Some(("True".into(), "Progressing".into()))
        );
        assert_eq!(find(&during, "Ready"), find(&before, "Ready"), "kept");
        let first = progressing(None, Some(1));
        assert_eq!(
            find(&first, "Ready"),
            Some(("False".into(), "Progressing".into()))
        );
        let after = status(Some(&during), Some(2), &done, None, &BTreeMap::new());
        assert_eq!(find(&after, "Reconciling").unwrap().0, "False");
        assert_eq!(after.observed_generation, Some(2));
    }

    #[test]
    fn a_condition_keeps_its_transition_time_while_it_holds() {
        let pass = Pass {
            report: Some(Report::default()),
            ..Pass::default()
        };
        let first = status(None, Some(1), &pass, None, &BTreeMap::new());
        std::thread::sleep(std::time::Duration::from_millis(5));
        let second = status(Some(&first), Some(1), &pass, None, &BTreeMap::new());
        assert_eq!(first.conditions, second.conditions);
        let failing = Pass {
            trouble: Some(Trouble {
                reason: "TemplateFailed",
                message: "Blueprint app: resource plan: row a: undefined value".into(),
                stalled: true,
            }),
            ..Pass::default()
        };
        let third = status(Some(&second), Some(2), &failing, None, &BTreeMap::new());
        assert_ne!(
            third.conditions[0].last_transition_time,
            second.conditions[0].last_transition_time
        );
        assert_eq!(third.conditions[2].status, "True", "Stalled");
        assert_eq!(third.conditions[2].reason, "TemplateFailed");
    }
}
