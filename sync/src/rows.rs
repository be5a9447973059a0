//! Kubernetes objects as rows: what a Source with `spec.kubernetes` reads,
//! listed through Kiln's client (the render crate never talks to a
//! cluster), and a watch that says when they changed, so that the loops
//! read them again at once instead of at the next poll.

use futures_util::StreamExt as _;
use futures_util::future::BoxFuture;
use kiln_render::api::ObjectsSpec;
use kiln_render::source::Objects;
use kube::api::{Api, DynamicObject};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};
use serde_json::{Map, Value};
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinHandle;

use crate::cluster::{Cluster, Kind};

/// Lists the objects a `kubernetes` source selects.
#[derive(Debug, Clone)]
pub struct ClusterObjects {
    cluster: Cluster,
    confine: Option<String>,
}

impl ClusterObjects {
    /// Objects of any namespace the client may read.
    pub fn new(cluster: Cluster) -> Self {
        Self {
            cluster,
            confine: None,
        }
    }

    /// Objects of `namespace` only: the controller reads a Source's own
    /// namespace and no other, and no cluster-scoped kinds.
    pub fn confined(cluster: Cluster, namespace: &str) -> Self {
        Self {
            cluster,
            confine: Some(namespace.to_string()),
        }
    }

    async fn resolve(&self, spec: &ObjectsSpec) -> Result<(Kind, Option<String>), String> {
        let kind = self
            .cluster
            .kind(&spec.api_version, &spec.kind)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| {
                format!(
                    "the API server serves no kind {} in {}",
                    spec.kind, spec.api_version
                )
            })?;
        let namespace = match (&self.confine, &spec.namespace) {
            (Some(own), _) if !kind.namespaced => {
                return Err(format!(
                    "{} is cluster-scoped: a Source in namespace {own} reads objects of its own namespace only",
                    spec.kind
                ));
            }
            (Some(own), Some(other)) if own != other => {
                return Err(format!(
                    "spec.kubernetes.namespace {other}: a Source in namespace {own} reads objects of its own namespace only"
                ));
            }
            (Some(own), _) => Some(own.clone()),
            (None, namespace) if kind.namespaced => namespace.clone(),
            (None, _) => None,
        };
        Ok((kind, namespace))
    }
}

impl Objects for ClusterObjects {
    fn list<'a>(
        &'a self,
        spec: &'a ObjectsSpec,
    ) -> BoxFuture<'a, Result<Vec<Map<String, Value>>, String>> {
        Box::pin(async move {
            let (kind, namespace) = self.resolve(spec).await?;
            let listed = self
                .cluster
                .list_selected(
                    &kind,
                    namespace.as_deref(),
                    spec.label_selector.as_deref(),
                    spec.field_selector.as_deref(),
                )
                .await
                .map_err(|e| e.to_string())?;
            Ok(listed.into_iter().filter_map(row).collect())
        })
    }
}

/// An object as a row: what changes on every write of anyone
/// (`managedFields`, `resourceVersion`) left out, so that a row changes when
/// the object does.
fn row(object: Value) -> Option<Map<String, Value>> {
    let Value::Object(mut map) = object else {
        return None;
    };
    if let Some(Value::Object(meta)) = map.get_mut("metadata") {
        meta.remove("managedFields");
        meta.remove("resourceVersion");
    }
    Some(map)
}

/// Sends `source` on `changed` whenever an object `spec` selects is
/// created, changed or deleted (not for the first listing), until the task
/// is aborted or nobody listens.
pub fn watch(
    objects: ClusterObjects,
    spec: ObjectsSpec,
    source: String,
    changed: UnboundedSender<String>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let (kind, namespace) = match objects.resolve(&spec).await {
            Ok(resolved) => resolved,
            Err(e) => {
                tracing::warn!("cannot watch the objects of Source {source}: {e}");
                return;
            }
        };
        let client = objects.cluster.client().clone();
        let api: Api<DynamicObject> = match &namespace {
            Some(ns) => Api::namespaced_with(client, ns, &kind.resource),
            None => Api::all_with(client, &kind.resource),
        };
        let mut config = watcher::Config::default();
        if let Some(labels) = &spec.label_selector {
            config = config.labels(labels);
        }
        if let Some(fields) = &spec.field_selector {
            config = config.fields(fields);
        }
        let mut stream = watcher::watcher(api, config).default_backoff().boxed();
        let mut listed = false;
        while let Some(event) = stream.next().await {
            let news = match event {
                Ok(Event::Apply(_) | Event::Delete(_)) => listed,
                Ok(Event::InitDone) => std::mem::replace(&mut listed, true),
                Ok(_) => false,
                Err(e) => {
                    tracing::debug!(error = %e, "watch of Source {source} interrupted; it resumes by itself");
                    false
                }
            };
            if news && changed.send(source.clone()).is_err() {
                return;
            }
        }
    })
}
