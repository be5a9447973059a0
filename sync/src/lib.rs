//! Kiln's reconcile half: everything that talks to a Kubernetes cluster.
//!
//! The deciding parts are synchronous and need no API server: [`desired`]
//! reads a rendered tree into objects with their policies, [`plan`] decides
//! what to create, update, leave, skip and prune and in which wave,
//! [`health`] judges readiness, [`inventory`] encodes what Kiln applied.
//! [`cluster`] is the thin layer over the API server, and [`apply`],
//! [`drift`] and [`metrics`] wire them together. [`reconcile`] is one
//! pipeline's pass, from rows to applied objects, for every way Kiln runs.

pub mod apply;
pub mod client;
pub mod cluster;
pub mod compare;
pub mod controller;
pub mod desired;
pub mod drift;
pub mod guard;
pub mod health;
pub mod inventory;
pub mod lease;
pub mod metrics;
pub mod plan;
pub mod prune;
pub mod reconcile;
pub mod report;
pub mod rollout;
pub mod rows;
pub mod watch;

/// What went wrong while talking to a cluster.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kubeconfig could not be read or has no usable context.
    #[error("failed to load kubeconfig: {message}")]
    Kubeconfig { message: String },
    /// No configuration was found at all (no kubeconfig, not in a cluster).
    #[error(
        "no cluster configuration found (no --kubeconfig, KUBECONFIG, ~/.kube/config or in-cluster service account): {message}"
    )]
    NoConfig { message: String },
    /// The client could not be built from a valid configuration.
    #[error("failed to create a Kubernetes client: {message}")]
    Client { message: String },
    /// A file of the tree to apply is not a valid object.
    #[error("{origin}: {message}")]
    InvalidObject { origin: String, message: String },
    /// The objects to apply cannot be ordered or are contradictory.
    #[error("{message}")]
    InvalidPlan { message: String },
    /// The deletion guard refused, against inventory `inventory`.
    #[error("inventory {inventory}: {refusal}")]
    Refused {
        inventory: String,
        refusal: Box<kiln_render::Refusal>,
    },
    /// An API request failed for good (after retries where they make
    /// sense); the server's answer is kept.
    #[error("failed to {what}: {failure}")]
    Api {
        what: String,
        #[source]
        failure: cluster::Failure,
    },
    /// The inventory in the cluster cannot be read.
    #[error("inventory {name}: {message}")]
    Inventory { name: String, message: String },
    /// Rendering or reading the tree failed.
    #[error(transparent)]
    Render(Box<kiln_render::Error>),
}

impl From<kiln_render::Error> for Error {
    fn from(error: kiln_render::Error) -> Self {
        Error::Render(Box::new(error))
    }
}

impl Error {
    /// A short name for what failed, as a status condition's `reason`:
    /// the guard that refused, or the API's answer.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Kubeconfig { .. } | Error::NoConfig { .. } | Error::Client { .. } => {
                "ClusterUnreachable"
            }
            Error::InvalidObject { .. } => "InvalidObject",
            Error::InvalidPlan { .. } => "InvalidPlan",
            Error::Refused { refusal, .. } => refusal.reason(),
            Error::Api { failure, .. } if failure.is_forbidden() => "Forbidden",
            Error::Api { failure, .. } if failure.is_conflict() => "Conflict",
            Error::Api { .. } => "ApiFailed",
            Error::Inventory { .. } => "InventoryUnreadable",
            Error::Render(e) => e.reason(),
        }
    }
}

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
