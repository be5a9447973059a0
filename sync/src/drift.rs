//! Cluster drift: desired versus live, object by object, limited to what
//! applying the tree would change. Each object is applied as a dry-run
//! (Server-Side Apply, forced, as Kiln would correct it) and the result is
//! compared with the live object: fields Kiln does not set, fields the server
//! defaults and status come out the same on both sides, so only the fields
//! Kiln manages can differ. `ignoreFields` are left out.

use std::collections::HashSet;

use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use kiln_render::api::{CreationPolicy, PatchStrategy};
use kiln_render::manifest::Identity;
use serde::Serialize;
use serde_json::Value;
use similar::TextDiff;

use crate::Result;
use crate::apply::{Options, read_live};
use crate::cluster::{Cluster, Write};
use crate::compare::comparable;
use crate::desired::Desired;
use crate::inventory::Inventory;

/// How an object drifted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Live fields differ from the tree.
    Changed,
    /// In the tree, not in the cluster.
    Missing,
    /// In the inventory and the cluster, no longer in the tree.
    Unwanted,
}

/// One drifted object.
#[derive(Debug, Clone, Serialize)]
pub struct Drifted {
    /// `Kind namespace/name`.
    pub object: String,
    /// `blueprint/instance/resource`.
    pub owner: String,
    /// How.
    pub status: Kind,
    /// A unified diff from live to desired (for `changed`).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub diff: String,
}

/// Every drifted object, in plan order.
pub async fn detect(
    cluster: &Cluster,
    mut desired: Vec<Desired>,
    options: &Options,
) -> Result<Vec<Drifted>> {
    let inventory =
        Inventory::read(cluster, &options.inventory_namespace, &options.inventory).await?;
    let live = read_live(cluster, &mut desired, &options.inventory, None).await?;
    let semaphore = tokio::sync::Semaphore::new(options.concurrency.max(1));
    let mut checks: FuturesUnordered<_> = desired
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let live = live
                .get(i)
                .and_then(Option::as_ref)
                .and_then(crate::plan::LiveObject::object);
            let semaphore = &semaphore;
            async move {
                let _permit = semaphore.acquire().await;
                (i, check(cluster, d, live, &options.inventory).await)
            }
        })
        .collect();
    let mut found: Vec<(usize, Drifted)> = Vec::new();
    while let Some((i, result)) = checks.next().await {
        if let Some(drifted) = result? {
            found.push((i, drifted));
        }
    }
    found.sort_by_key(|(i, _)| *i);
    let mut drifted: Vec<Drifted> = found.into_iter().map(|(_, d)| d).collect();

    let wanted: HashSet<&Identity> = desired.iter().map(|d| &d.identity).collect();
    for entry in inventory
        .entries
        .iter()
        .filter(|e| !wanted.contains(&e.identity))
    {
        let Some(kind) = cluster
            .kind(&entry.api_version(), &entry.identity.kind)
            .await?
        else {
            continue;
        };
        let id = &entry.identity;
        if let Ok(Some(_)) = cluster.get(&kind, &id.namespace, &id.name).await {
            drifted.push(Drifted {
                object: id.to_string(),
                owner: entry.owner.to_string(),
                status: Kind::Unwanted,
                diff: String::new(),
            });
        }
    }
    Ok(drifted)
}

async fn check(
    cluster: &Cluster,
    desired: &Desired,
    live: Option<&Value>,
    inventory: &str,
) -> Result<Option<Drifted>> {
    let drifted = |status, diff| Drifted {
        object: desired.identity.to_string(),
        owner: desired.owner.to_string(),
        status,
        diff,
    };
    let Some(live) = live else {
        return Ok(Some(drifted(Kind::Missing, String::new())));
    };
    if desired.policies.creation == CreationPolicy::Once {
        return Ok(None);
    }
    let Some(kind) = cluster
        .kind(&desired.api_version, &desired.identity.kind)
        .await?
    else {
        return Ok(Some(drifted(Kind::Missing, String::new())));
    };
    let how = match desired.policies.patch {
        PatchStrategy::Apply => Write::Apply { force: true },
        PatchStrategy::Merge => Write::Merge,
        PatchStrategy::Replace => Write::Replace,
    };
    let after = cluster
        .write(&kind, &desired.body(inventory), how, Some(live), true)
        .await
        .map_err(|f| crate::Error::Api {
            what: format!("dry-run apply {}", desired.label()),
            failure: f,
        })?;
    let ignore = &desired.policies.ignore_fields;
    let (before, after) = (comparable(live, ignore), comparable(&after, ignore));
    if before == after {
        return Ok(None);
    }
    let text = |v: &Value| kiln_render::yaml::to_string(v).unwrap_or_default();
    let (old, new) = kiln_render::diff::mask(
        Some(text(&before).as_bytes()),
        Some(text(&after).as_bytes()),
    );
    let label = desired.identity.to_string();
    let diff = TextDiff::from_lines(&old, &new)
        .unified_diff()
        .header(&format!("live/{label}"), &format!("desired/{label}"))
        .to_string();
    Ok(Some(drifted(Kind::Changed, diff)))
}

/// The drift as `diff -u` text, one object after another.
pub fn unified(drifted: &[Drifted]) -> String {
    let mut out = String::new();
    for d in drifted {
        match d.status {
            Kind::Changed => out.push_str(&d.diff),
            Kind::Missing => out.push_str(&format!(
                "missing {} ({}): in the tree, not in the cluster\n",
                d.object, d.owner
            )),
            Kind::Unwanted => out.push_str(&format!(
                "unwanted {} ({}): in the inventory and the cluster, no longer in the tree\n",
                d.object, d.owner
            )),
        }
    }
    out
}
