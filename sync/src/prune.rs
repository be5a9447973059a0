//! Prune: objects of the inventory that left the tree are deleted, deepest
//! wave first, or kept and marked orphaned when their deletion policy says
//! Retain. Only inventory objects still labelled as Kiln's are touched, and a
//! deletion carries a precondition on the uid Kiln saw.

use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use kiln_render::manifest::{BLUEPRINT_LABEL, INSTANCE_LABEL, MANAGED_BY};
use serde_json::json;
use tokio::sync::Semaphore;

use crate::cluster::Cluster;
use crate::desired::INVENTORY_LABEL;
use crate::inventory::Entry;
use crate::plan::{ORPHANED_LABEL, Prune};
use crate::report::{Outcome, Report, Status};

/// When an object was orphaned.
pub const ORPHANED_AT: &str = "kiln.dev/orphaned-at";
/// Why an object was orphaned.
pub const ORPHANED_REASON: &str = "kiln.dev/orphaned-reason";

/// Prunes, deepest wave first, each wave concurrently. Returns the entries
/// that stay in the inventory (the deletions that failed).
pub(crate) async fn prune(
    cluster: &Cluster,
    prune: &[Prune],
    semaphore: &Semaphore,
    report: &mut Report,
) -> Vec<Entry> {
    let mut kept = Vec::new();
    let mut start = 0;
    while start < prune.len() {
        let wave = prune[start].entry.wave;
        let end = prune[start..]
            .iter()
            .position(|p| p.entry.wave != wave)
            .map_or(prune.len(), |p| start + p);
        let mut running: FuturesUnordered<_> = prune[start..end]
            .iter()
            .map(|p| async move {
                let _permit = semaphore.acquire().await;
                (p, prune_one(cluster, p).await)
            })
            .collect();
        while let Some((p, result)) = running.next().await {
            let object = format!("{} ({})", p.entry.identity, p.entry.owner);
            match result {
                Ok(Some(status)) => report.outcomes.push(Outcome {
                    status,
                    object,
                    detail: String::new(),
                }),
                Ok(None) => {}
                Err(detail) => {
                    kept.push(p.entry.clone());
                    report.outcomes.push(Outcome {
                        status: Status::Failed,
                        object,
                        detail,
                    });
                }
            }
        }
        start = end;
    }
    kept
}

async fn prune_one(
    cluster: &Cluster,
    prune: &Prune,
) -> std::result::Result<Option<Status>, String> {
    let entry = &prune.entry;
    let id = &entry.identity;
    let Some(kind) = cluster
        .kind(&entry.api_version(), &id.kind)
        .await
        .map_err(|e| e.to_string())?
    else {
        return Ok(None); // the kind is gone, and its objects with it
    };
    let live = match cluster.get(&kind, &id.namespace, &id.name).await {
        Ok(Some(live)) => live,
        // Never created (its apply failed after the inventory named it), or
        // deleted by someone else: nothing was pruned, and the entry goes.
        Ok(None) => {
            tracing::debug!(object = %id, "already gone: dropped from the inventory");
            return Ok(None);
        }
        Err(f) => return Err(f.to_string()),
    };
    if live["metadata"]["labels"][MANAGED_BY] != "kiln" {
        tracing::warn!(object = %id, "no longer labelled {MANAGED_BY}=kiln: left alone and dropped from the inventory");
        return Ok(None);
    }
    if prune.retain {
        let at = k8s_openapi::jiff::Timestamp::now()
            .round(k8s_openapi::jiff::Unit::Second)
            .map_err(|e| e.to_string())?;
        let patch = json!({"metadata": {
            "labels": {MANAGED_BY: null, BLUEPRINT_LABEL: null, INSTANCE_LABEL: null, INVENTORY_LABEL: null, ORPHANED_LABEL: "true"},
            "annotations": {
                ORPHANED_AT: at.to_string(),
                ORPHANED_REASON: orphan_reason(entry),
            },
        }});
        cluster
            .patch_metadata(&kind, &id.namespace, &id.name, &patch)
            .await
            .map_err(|f| f.to_string())?;
        cluster
            .release(&kind, &id.namespace, &id.name)
            .await
            .map_err(|f| format!("orphaned, but failed to give up its fields: {f}"))?;
        return Ok(Some(Status::Orphaned));
    }
    let uid = live["metadata"]["uid"].as_str().unwrap_or_default();
    cluster
        .delete(&kind, &id.namespace, &id.name, uid)
        .await
        .map_err(|f| f.to_string())?;
    Ok(Some(Status::Pruned))
}

/// Why a retained object was orphaned, for its marker.
pub fn orphan_reason(entry: &Entry) -> String {
    format!(
        "no longer rendered by blueprint {}, instance {}, resource {}",
        entry.owner.blueprint, entry.owner.instance, entry.owner.resource
    )
}
