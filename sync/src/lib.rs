//! Kiln's reconcile half: everything that talks to a Kubernetes cluster.

pub mod client;

/// What went wrong while talking to a cluster.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kubeconfig could not be read or has no usable context.
    #[error("failed to load kubeconfig: {source}")]
    Kubeconfig {
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// No configuration was found at all (no kubeconfig, not in a cluster).
    #[error("no cluster configuration found: {source}")]
    NoConfig {
        #[source]
        source: kube::config::InferConfigError,
    },
    /// The client could not be built from a valid configuration.
    #[error("failed to create a Kubernetes client: {source}")]
    Client {
        #[source]
        source: kube::Error,
    },
}

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
