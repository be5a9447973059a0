//! What an apply did, object by object, and in sum.

use std::fmt;

/// What happened to one object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Status {
    /// Created.
    Created,
    /// Updated to a new desired state.
    Updated,
    /// Put back after an out-of-band change.
    Corrected,
    /// Nothing to do.
    Unchanged,
    /// Drift found and left (`--detect-only`).
    Drifted,
    /// Left alone: a policy, a failed dependency, an object prune may not
    /// touch.
    Skipped,
    /// Failed.
    Failed,
    /// Deleted because it left the tree.
    Pruned,
    /// Kept because it left the tree with `deletionPolicy: Retain`.
    Orphaned,
    /// Not written because Kiln was stopping (SIGTERM): the next pass
    /// applies it. Counted in the summary, not listed.
    Stopped,
}

impl Status {
    /// The status as a past participle: `created`, `pruned`.
    pub fn verb(self) -> &'static str {
        match self {
            Status::Created => "created",
            Status::Updated => "updated",
            Status::Corrected => "corrected",
            Status::Unchanged => "unchanged",
            Status::Drifted => "drifted",
            Status::Skipped => "skipped",
            Status::Failed => "failed",
            Status::Pruned => "pruned",
            Status::Orphaned => "orphaned",
            Status::Stopped => "stopped",
        }
    }

    /// Whether dependents may go ahead.
    pub(crate) fn lets_dependents_go(self) -> bool {
        matches!(
            self,
            Status::Created
                | Status::Updated
                | Status::Corrected
                | Status::Unchanged
                | Status::Drifted
        )
    }
}

/// One line of the report.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// What happened.
    pub status: Status,
    /// The object it happened to.
    pub subject: Subject,
    /// Why, for failures and skips.
    pub detail: String,
}

/// The object of an outcome: a desired object (shared with the plan, so
/// that an apply of many unchanged objects copies none of them), or one
/// that left the tree.
#[derive(Debug, Clone)]
pub enum Subject {
    /// An object of the tree.
    Desired(crate::desired::Desired),
    /// An object known otherwise (the inventory): `Kind namespace/name
    /// (blueprint/instance/resource)` and where it comes from.
    Other(Box<(String, crate::desired::Owner)>),
}

impl Outcome {
    /// `Kind namespace/name (blueprint/instance/resource)`.
    pub fn object(&self) -> String {
        match &self.subject {
            Subject::Desired(desired) => desired.label(),
            Subject::Other(other) => other.0.clone(),
        }
    }

    /// Where the object comes from.
    pub fn owner(&self) -> &crate::desired::Owner {
        match &self.subject {
            Subject::Desired(desired) => &desired.owner,
            Subject::Other(other) => &other.1,
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.status.verb(), self.object())?;
        if !self.detail.is_empty() {
            write!(f, ": {}", self.detail)?;
        }
        Ok(())
    }
}

/// What an apply did.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Every object's outcome: steps in plan order, then prunes.
    pub outcomes: Vec<Outcome>,
    /// Objects that left the tree but were not pruned, and why.
    pub postponed: Option<String>,
    /// Requests the API server throttled or failed for a moment, each
    /// retried until it went through.
    pub retries: crate::cluster::RetryCount,
}

impl Report {
    /// How many ended with `status`.
    pub fn count(&self, status: Status) -> usize {
        self.outcomes.iter().filter(|o| o.status == status).count()
    }

    /// Whether anything failed.
    pub fn failed(&self) -> bool {
        self.count(Status::Failed) > 0
    }

    /// Every outcome but the unchanged ones.
    pub fn lines(&self) -> impl Iterator<Item = &Outcome> {
        self.outcomes
            .iter()
            .filter(|o| !matches!(o.status, Status::Unchanged | Status::Stopped))
    }

    /// `applied 3 (created 2, updated 1, corrected 0), unchanged 7, ...`.
    pub fn summary(&self) -> String {
        let c = |s| self.count(s);
        let applied = c(Status::Created) + c(Status::Updated) + c(Status::Corrected);
        let mut line = format!(
            "applied {applied} (created {}, updated {}, corrected {}), unchanged {}, failed {}, skipped {}, pruned {}, orphaned {}",
            c(Status::Created),
            c(Status::Updated),
            c(Status::Corrected),
            c(Status::Unchanged),
            c(Status::Failed),
            c(Status::Skipped),
            c(Status::Pruned),
            c(Status::Orphaned),
        );
        if c(Status::Drifted) > 0 {
            line.push_str(&format!(", drifted {}", c(Status::Drifted)));
        }
        let r = self.retries;
        if r.throttled > 0 || r.unavailable > 0 {
            line.push_str(&format!(
                "; retried {} requests throttled by the API server (429) and {} it did not answer",
                r.throttled, r.unavailable
            ));
        }
        if c(Status::Stopped) > 0 {
            line.push_str(&format!(
                "; stopped before {} objects, which the next pass applies",
                c(Status::Stopped)
            ));
        }
        if let Some(why) = &self.postponed {
            line.push_str(&format!("; {why}"));
        }
        line
    }
}
