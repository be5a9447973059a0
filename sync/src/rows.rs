//! Kubernetes objects as rows: what a Source with `spec.kubernetes` reads,
//! listed through Kiln's client (the render crate never talks to a
//! cluster), and a watch that says when they changed, so that the loops
//! read them again at once instead of at the next poll; likewise a
//! PostgreSQL source's notifications.

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

/// Listens for a PostgreSQL source's notifications (`spec.notify`), sending
/// the source's name for each, and once each time it listens again after
/// losing the connection (what was sent meanwhile is lost). It tries again
/// after 1 s, doubling up to 30 s; polling at the source's interval stays
/// the safety net.
pub fn listen(
    source: kiln_render::config::Named<kiln_render::api::SourceSpec>,
    changed: UnboundedSender<String>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut delay = std::time::Duration::from_secs(1);
        let mut reconnected = false;
        loop {
            let mut listening = false;
            let mut notified = || {
                listening = true;
                changed.send(source.name.clone()).is_ok()
            };
            match kiln_render::source::listen(&source, reconnected, &mut notified).await {
                Ok(()) => return,
                Err(e) => tracing::warn!("{e}; trying again in {}s", delay.as_secs()),
            }
            if changed.is_closed() {
                return;
            }
            if listening {
                delay = std::time::Duration::from_secs(1);
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(std::time::Duration::from_secs(30));
            reconnected = true;
        }
    })
}

/// What one row object is told of its instance's objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowHealth {
    /// Objects of the instance in the desired state.
    pub objects: usize,
    /// Of them, failed in the last apply.
    pub failed: usize,
    /// The first failure, for the condition's message.
    pub first_failure: Option<String>,
}

impl RowHealth {
    /// The Ready condition's status, reason and message.
    fn condition(&self) -> (&'static str, &'static str, String) {
        if self.failed == 0 {
            return (
                "True",
                "Applied",
                format!("{} objects applied by Kiln", self.objects),
            );
        }
        (
            "False",
            "ApplyFailed",
            format!(
                "{} of {} objects failed{}",
                self.failed,
                self.objects,
                self.first_failure
                    .as_ref()
                    .map(|f| format!(", first: {f}"))
                    .unwrap_or_default()
            ),
        )
    }

    /// Whether the row object's status already says this.
    fn written_in(&self, object: &Map<String, Value>, pipeline: &str) -> bool {
        let (status, _, message) = self.condition();
        let current = object.get("status");
        current.and_then(|s| s.get("kiln")).is_some_and(|k| {
            k["objects"] == self.objects && k["failed"] == self.failed && k["pipeline"] == pipeline
        }) && current
            .and_then(|s| s.get("conditions"))
            .and_then(Value::as_array)
            .and_then(|c| c.iter().find(|c| c["type"] == "Ready"))
            .is_some_and(|c| c["status"] == status && c["message"] == message.as_str())
    }
}

impl ClusterObjects {
    /// Writes into the status of the object a row came from: a `Ready`
    /// condition among its conditions (the others kept) and Kiln's counts
    /// for its instance under `status.kiln`, with field manager
    /// `kiln-status`. [`healths`] leaves out what is written already.
    async fn write_health(
        &self,
        spec: &ObjectsSpec,
        object: &Map<String, Value>,
        pipeline: &str,
        health: &RowHealth,
    ) -> Result<bool, String> {
        let (kind, _) = self.resolve(spec).await?;
        let meta = |f: &str| {
            object
                .get("metadata")
                .and_then(|m| m.get(f))
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        let Some(name) = meta("name") else {
            return Ok(false);
        };
        let namespace = meta("namespace");
        let (status, reason, message) = health.condition();
        let current = object.get("status");
        let since = current
            .and_then(|s| s.get("conditions"))
            .and_then(Value::as_array)
            .and_then(|c| {
                c.iter()
                    .find(|c| c["type"] == "Ready" && c["status"] == status)
            })
            .and_then(|c| c.get("lastTransitionTime").cloned())
            .unwrap_or_else(|| Value::String(k8s_openapi::jiff::Timestamp::now().to_string()));
        let time = since
            .as_str()
            .map(|t| {
                t.split('.')
                    .next()
                    .unwrap_or(t)
                    .trim_end_matches('Z')
                    .to_string()
                    + "Z"
            })
            .unwrap_or_default();
        // Other conditions (the kind's own controller's) are kept as they
        // were read; only Ready is Kiln's.
        let mut conditions: Vec<Value> = current
            .and_then(|s| s.get("conditions"))
            .and_then(Value::as_array)
            .map(|c| c.iter().filter(|c| c["type"] != "Ready").cloned().collect())
            .unwrap_or_default();
        conditions.push(serde_json::json!({
            "type": "Ready",
            "status": status,
            "reason": reason,
            "message": message,
            "lastTransitionTime": time,
        }));
        let body = serde_json::json!({
            "status": {
                "conditions": conditions,
                "kiln": {
                    "pipeline": pipeline,
                    "objects": health.objects,
                    "failed": health.failed,
                },
            },
        });
        let client = self.cluster.client().clone();
        let api: Api<DynamicObject> = match &namespace {
            Some(ns) => Api::namespaced_with(client, ns, &kind.resource),
            None => Api::all_with(client, &kind.resource),
        };
        // A merge patch, not Server-Side Apply: a list of conditions is
        // atomic in most CRDs, and applying it would take every condition
        // from the manager that owns the others.
        api.patch_status(
            &name,
            &kube::api::PatchParams {
                field_manager: Some("kiln-status".into()),
                ..kube::api::PatchParams::default()
            },
            &kube::api::Patch::Merge(&body),
        )
        .await
        .map_err(|e| {
            format!(
                "write the status of {} {name}: {}",
                spec.kind,
                crate::cluster::message(&e)
            )
        })?;
        Ok(true)
    }
}

/// What one row object's status is to say.
#[derive(Debug, Clone)]
pub struct HealthWrite {
    pipeline: String,
    spec: ObjectsSpec,
    object: Map<String, Value>,
    health: RowHealth,
}

/// After an apply: the health of the instance of each active row of every
/// `writeStatus` source, to write with [`write_back`].
pub fn healths(
    reconciler: &crate::reconcile::Reconciler,
    report: &crate::report::Report,
) -> Vec<HealthWrite> {
    use std::collections::HashMap;
    let Some(desired) = reconciler.desired() else {
        return Vec::new();
    };
    let config = reconciler.config();
    let mut counts: HashMap<(&str, &str), RowHealth> = HashMap::new();
    for d in desired {
        counts
            .entry((d.owner.blueprint.as_str(), d.owner.instance.as_str()))
            .or_insert(RowHealth {
                objects: 0,
                failed: 0,
                first_failure: None,
            })
            .objects += 1;
    }
    for outcome in report
        .outcomes
        .iter()
        .filter(|o| o.status == crate::report::Status::Failed)
    {
        if let Some(health) = counts.get_mut(&(
            outcome.owner().blueprint.as_str(),
            outcome.owner().instance.as_str(),
        )) {
            health.failed += 1;
            health
                .first_failure
                .get_or_insert_with(|| outcome.to_string());
        }
    }
    let pipeline = &reconciler.settings().pipeline;
    let mut writes = Vec::new();
    for name in reconciler.sources() {
        let Some(source) = config.sources.get(name) else {
            continue;
        };
        let Some(spec) = source.spec.kubernetes.as_ref().filter(|s| s.write_status) else {
            continue;
        };
        let blueprints: Vec<&str> = config
            .blueprints
            .values()
            .filter(|b| b.spec.source == *name)
            .map(|b| b.name.as_str())
            .collect();
        for row in reconciler
            .rows(name)
            .unwrap_or_default()
            .iter()
            .filter(|r| r.active)
        {
            let instance = kiln_render::template::dns_label(&row.key);
            let mut health = RowHealth {
                objects: 0,
                failed: 0,
                first_failure: None,
            };
            for blueprint in &blueprints {
                if let Some(h) = counts.get(&(*blueprint, instance.as_str())) {
                    health.objects += h.objects;
                    health.failed += h.failed;
                    if health.first_failure.is_none() {
                        health.first_failure.clone_from(&h.first_failure);
                    }
                }
            }
            // Only what changes is cloned and written.
            if !health.written_in(&row.values, pipeline) {
                writes.push(HealthWrite {
                    pipeline: pipeline.clone(),
                    spec: spec.clone(),
                    object: row.values.clone(),
                    health,
                });
            }
        }
    }
    writes
}

/// Writes each row object's health, 8 at a time; what could not be
/// written, one line each.
pub async fn write_back(objects: &ClusterObjects, writes: Vec<HealthWrite>) -> Vec<String> {
    futures_util::stream::iter(writes)
        .map(|w| async move {
            objects
                .write_health(&w.spec, &w.object, &w.pipeline, &w.health)
                .await
                .err()
        })
        .buffer_unordered(8)
        .filter_map(|e| async move { e })
        .collect()
        .await
}
