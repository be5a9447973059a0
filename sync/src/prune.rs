//! Prune: objects of the inventory that left the tree are deleted, deepest
//! wave first, or kept and marked orphaned when their deletion policy says
//! Retain. Only the very object Kiln wrote is touched: it must still carry
//! Kiln's label and the uid the inventory recorded (an object of the same
//! name someone else made since is left alone), and the deletion carries
//! that uid as a precondition.
//!
//! Deleting a Namespace deletes everything in it, so a Namespace that holds
//! objects this inventory does not know is not deleted but orphaned, and the
//! report names them, unless it carries [`DELETE_WITH_CONTENTS`].

use std::collections::HashMap;

use compact_str::CompactString;
use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use kiln_render::manifest::{BLUEPRINT_LABEL, INSTANCE_LABEL, Identity, MANAGED_BY};
use serde_json::json;
use tokio::sync::Semaphore;

use crate::cluster::Cluster;
use crate::desired::INVENTORY_LABEL;
use crate::inventory::Entry;
use crate::plan::{ORPHANED_LABEL, Prune};
use crate::report::{Outcome, Report, Status, Subject};

/// When an object was orphaned.
pub const ORPHANED_AT: &str = "kiln.dev/orphaned-at";
/// Why an object was orphaned.
pub const ORPHANED_REASON: &str = "kiln.dev/orphaned-reason";
/// On a Namespace, `"true"` lets prune delete it with objects Kiln did not
/// make inside.
pub const DELETE_WITH_CONTENTS: &str = "kiln.dev/delete-with-contents";

/// Kiln's objects by identity, with the uid Kiln recorded ("" when not
/// known): what a Namespace may hold and still be pruned.
pub(crate) type Ours = HashMap<Identity, CompactString>;

/// Prunes, deepest wave first, each wave concurrently. `ours` is every
/// object of the inventory and the tree but those retained now; the objects
/// prune leaves alone leave it. Returns the entries that stay in the
/// inventory (the deletions that failed).
pub(crate) async fn prune(
    cluster: &Cluster,
    prune: &[Prune],
    mut ours: Ours,
    semaphore: &Semaphore,
    report: &mut Report,
) -> Vec<Entry> {
    let mut kept = Vec::new();
    let mut start = 0;
    let progress = kiln_render::progress::phase("pruning", prune.len() as u64);
    while start < prune.len() {
        let wave = prune[start].entry.wave;
        let end = prune[start..]
            .iter()
            .position(|p| p.entry.wave != wave)
            .map_or(prune.len(), |p| start + p);
        let shared = &ours;
        let mut running: FuturesUnordered<_> = prune[start..end]
            .iter()
            .map(|p| async move {
                let _permit = semaphore.acquire().await;
                (p, prune_one(cluster, p, shared).await)
            })
            .collect();
        let mut left_alone = Vec::new();
        while let Some((p, result)) = running.next().await {
            progress.advance(1);
            match result {
                Ok(Some((status, detail))) => {
                    if status == Status::Skipped {
                        left_alone.push(p.entry.identity.clone());
                    }
                    report.outcomes.push(Outcome {
                        status,
                        subject: subject(p),
                        detail,
                    });
                }
                Ok(None) => {}
                Err(detail) => {
                    kept.push(p.entry.clone());
                    report.outcomes.push(Outcome {
                        status: Status::Failed,
                        subject: subject(p),
                        detail,
                    });
                }
            }
        }
        drop(running);
        // What was left alone in a Namespace is not Kiln's to delete with it.
        for identity in left_alone {
            ours.remove(&identity);
        }
        start = end;
    }
    kept
}

/// What pruning one object did, and why when it is not the obvious.
type Pruned = Option<(Status, String)>;

async fn prune_one(
    cluster: &Cluster,
    prune: &Prune,
    ours: &Ours,
) -> std::result::Result<Pruned, String> {
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
        let why = format!("no longer labelled {MANAGED_BY}=kiln: left alone");
        tracing::warn!(object = %id, "{why}");
        return Ok(Some((Status::Skipped, why)));
    }
    let uid = live["metadata"]["uid"].as_str().unwrap_or_default();
    if !entry.uid.is_empty() && uid != entry.uid {
        let why = format!(
            "not the object Kiln made (uid {uid}, Kiln wrote {}): re-created by someone else, left alone",
            entry.uid
        );
        tracing::warn!(object = %id, "{why}");
        return Ok(Some((Status::Skipped, why)));
    }
    let mut held = None;
    if !prune.retain
        && id.group.is_empty()
        && id.kind == "Namespace"
        && live["metadata"]["annotations"][DELETE_WITH_CONTENTS] != "true"
    {
        let strangers = strangers(cluster, &id.name, ours).await?;
        if !strangers.is_empty() {
            held = Some(format!(
                "it holds objects its inventory does not know ({}), which deleting it would delete",
                kiln_render::abbreviate(&strangers, 3)
            ));
        }
    }
    if prune.retain || held.is_some() {
        // It leaves the watched set: Kiln's doing, not news.
        cluster.own_writes().removing(uid);
        let at = k8s_openapi::jiff::Timestamp::now()
            .round(k8s_openapi::jiff::Unit::Second)
            .map_err(|e| e.to_string())?;
        let why = held.clone().unwrap_or_else(|| orphan_reason(entry));
        let patch = json!({"metadata": {
            "labels": {MANAGED_BY: null, BLUEPRINT_LABEL: null, INSTANCE_LABEL: null, INVENTORY_LABEL: null, ORPHANED_LABEL: "true"},
            "annotations": {
                ORPHANED_AT: at.to_string(),
                ORPHANED_REASON: why,
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
        let detail = held.map_or_else(String::new, |why| {
            format!(
                "not deleted: {why}; delete it by hand, or annotate it {DELETE_WITH_CONTENTS}: \"true\" in its template"
            )
        });
        return Ok(Some((Status::Orphaned, detail)));
    }
    cluster
        .delete(&kind, &id.namespace, &id.name, uid)
        .await
        .map_err(|f| f.to_string())?;
    Ok(Some((Status::Pruned, String::new())))
}

/// What lives in `namespace` that `ours` does not name: objects no
/// controller owns (what a controller made goes with its owner), besides
/// what Kubernetes puts in every namespace.
async fn strangers(
    cluster: &Cluster,
    namespace: &str,
    ours: &Ours,
) -> std::result::Result<Vec<String>, String> {
    let kinds = cluster
        .namespaced_kinds()
        .await
        .map_err(|e| format!("cannot tell what the namespace holds: {e}"))?;
    // Each future owns its kind: a future borrowing from the closure's
    // argument would not be `Send` for every lifetime, which the
    // controller's spawned passes need.
    let lists = futures_util::stream::iter(kinds.iter().cloned().map(|kind| async move {
        let objects = cluster.list_metadata(&kind, namespace, 20).await;
        (kind, objects)
    }))
    .buffer_unordered(8)
    .collect::<Vec<_>>()
    .await;
    let mut found = Vec::new();
    for (kind, objects) in lists {
        let objects = objects.map_err(|f| {
            format!(
                "cannot tell what the namespace holds: list {}: {f}",
                kind.resource.plural
            )
        })?;
        for object in objects {
            let meta = &object["metadata"];
            let name = meta["name"].as_str().unwrap_or_default();
            let identity = Identity {
                group: kind.resource.group.as_str().into(),
                kind: kind.resource.kind.as_str().into(),
                namespace: namespace.into(),
                name: name.into(),
            };
            let owned = meta["ownerReferences"]
                .as_array()
                .is_some_and(|o| !o.is_empty());
            let going = !meta["deletionTimestamp"].is_null();
            let core = kind.resource.group.is_empty();
            let standard = core
                && matches!(
                    (kind.resource.kind.as_str(), name),
                    ("ServiceAccount", "default") | ("ConfigMap", "kube-root-ca.crt")
                );
            // The endpoints controller names a Service's Endpoints after it
            // and sets no owner.
            let endpoints_of_ours = core
                && kind.resource.kind == "Endpoints"
                && ours.contains_key(&Identity {
                    kind: "Service".into(),
                    ..identity.clone()
                });
            let uid = meta["uid"].as_str().unwrap_or_default();
            let mine = ours
                .get(&identity)
                .is_some_and(|recorded| recorded.is_empty() || recorded == uid);
            if !(owned || going || standard || endpoints_of_ours || mine) {
                found.push(format!("{} {name}", kind.resource.kind));
            }
        }
    }
    found.sort();
    Ok(found)
}

/// Why a retained object was orphaned, for its marker.
pub fn orphan_reason(entry: &Entry) -> String {
    format!(
        "no longer rendered by blueprint {}, instance {}, resource {}",
        entry.owner.blueprint, entry.owner.instance, entry.owner.resource
    )
}

/// What an outcome of pruning `p` is about.
fn subject(p: &Prune) -> Subject {
    Subject::Other(Box::new((
        format!("{} ({})", p.entry.identity, p.entry.owner),
        p.entry.owner.clone(),
    )))
}
