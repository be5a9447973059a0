//! The deletion guard of every path that prunes: what the inventory holds
//! (what Kiln applied, in this process or any earlier one) against what is
//! about to be applied. The same rule as a render into Git: never every
//! instance, never more than `deletionGuard.maxPercent` of them, unless
//! the person asks with `--allow-mass-delete`.

use std::collections::BTreeMap;

use kiln_render::tree::Summary;

use crate::apply::Options;
use crate::cluster::Cluster;
use crate::desired::Desired;
use crate::inventory::{Entry, Inventory};
use crate::{Error, Result};

/// The guard as an apply with `options` runs it: nothing to check when it
/// does not prune or the person allowed it; else [`check`] against the
/// instances of the inventory's `entries`.
pub fn check_apply(options: &Options, entries: &[Entry], desired: &[Desired]) -> Result<()> {
    if !options.prune || options.allow_mass_delete {
        return Ok(());
    }
    let before = entries
        .iter()
        .map(|e| (e.owner.instance_path(), ()))
        .collect();
    check(
        &options.inventory,
        &before,
        desired,
        options.max_delete_percent,
    )
}

/// [`check_apply`], reading the inventory's instances first (only those:
/// the rest of each entry is not kept).
pub async fn check_cluster(
    cluster: &Cluster,
    options: &Options,
    desired: &[Desired],
) -> Result<()> {
    if !options.prune || options.allow_mass_delete {
        return Ok(());
    }
    let before =
        Inventory::instances(cluster, &options.inventory_namespace, &options.inventory).await?;
    check(
        &options.inventory,
        &before,
        desired,
        options.max_delete_percent,
    )
}

/// Refuses to apply `desired` when it would remove too many of the
/// instances (`blueprint/instance`) `before` inventory `name` holds.
pub fn check(
    name: &str,
    before: &BTreeMap<String, ()>,
    desired: &[Desired],
    max_percent: u32,
) -> Result<()> {
    let after: BTreeMap<String, ()> = desired
        .iter()
        .map(|d| (d.owner.instance_path(), ()))
        .collect();
    let summary = Summary::of_instances(before, &after);
    kiln_render::git::publish::check_deletions(&summary, max_percent).map_err(|refusal| {
        Error::Refused {
            inventory: name.to_string(),
            refusal: Box::new(refusal),
        }
    })
}
