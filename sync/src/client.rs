//! Connecting to a cluster as kubectl does: an explicit kubeconfig and
//! context, else `KUBECONFIG` or `~/.kube/config`, else the in-cluster service
//! account.

use std::path::Path;

use kube::config::{Config, KubeConfigOptions, Kubeconfig};

use crate::{Error, Result};

/// The field manager Kiln applies with.
pub const FIELD_MANAGER: &str = "kiln";

/// Builds a client for `kubeconfig` (or the usual places) and `context` (or
/// the current one).
pub async fn connect(kubeconfig: Option<&Path>, context: Option<&str>) -> Result<kube::Client> {
    from_config(config(kubeconfig, context).await?)
}

/// Builds a client for a configuration.
pub fn from_config(config: Config) -> Result<kube::Client> {
    kube::Client::try_from(config).map_err(|e| Error::Client {
        message: e.to_string(),
    })
}

/// The client configuration for `kubeconfig` (or the usual places) and
/// `context` (or the current one).
pub async fn config(kubeconfig: Option<&Path>, context: Option<&str>) -> Result<Config> {
    let options = KubeConfigOptions {
        context: context.map(str::to_string),
        ..KubeConfigOptions::default()
    };
    let config = match kubeconfig {
        Some(path) => {
            let file = Kubeconfig::read_from(path).map_err(|e| Error::Kubeconfig {
                message: e.to_string(),
            })?;
            Config::from_custom_kubeconfig(file, &options)
                .await
                .map_err(|e| Error::Kubeconfig {
                    message: e.to_string(),
                })?
        }
        None if context.is_some() => {
            Config::from_kubeconfig(&options)
                .await
                .map_err(|e| Error::Kubeconfig {
                    message: e.to_string(),
                })?
        }
        None => Config::infer().await.map_err(|e| Error::NoConfig {
            message: e.to_string(),
        })?,
    };
    // One retry policy, Kiln's own (`cluster::retry`): bounded in time,
    // jittered, counted and reported. The client's built-in layer would retry
    // 429s out of sight, up to 15 times, before Kiln's even saw them.
    let mut config = config;
    config.default_retry = false;
    Ok(config)
}
