//! Executing a plan: each object as soon as its own dependencies are done
//! (at most `concurrency` writes in flight across all of them), dependents
//! of a failed object skipped, then prune in reverse wave order of every
//! instance that finished, with the inventory written before (what may be
//! created) and after (what exists).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use kiln_render::api::{ConflictPolicy, DeletionPolicy, PatchStrategy};
use kiln_render::manifest::Identity;
use serde_json::{Value, json};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use crate::cluster::{Cluster, Kind, Write};
use crate::compare::same;
use crate::desired::{Desired, INVENTORY_LABEL};
use crate::health::{Health, health};
use crate::inventory::{Entry, Inventory, Record};
use crate::plan::{Action, Live, LiveObject, ORPHANED_LABEL, Plan, Prune, Step};
use crate::prune::{ORPHANED_AT, ORPHANED_REASON, prune};
pub use crate::report::{Outcome, Report, Status, Subject};
use crate::{Error, Result};

/// How an apply runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Writes in flight at most.
    pub concurrency: usize,
    /// Delete (or orphan) inventory objects that left the tree.
    pub prune: bool,
    /// Report drift but do not correct it.
    pub detect_only: bool,
    /// The namespace of the inventory's ConfigMaps.
    pub inventory_namespace: String,
    /// The inventory's name.
    pub inventory: String,
    /// Let one apply remove more than `max_delete_percent` of the
    /// inventory's instances, or all of them.
    pub allow_mass_delete: bool,
    /// `deletionGuard.maxPercent`.
    pub max_delete_percent: u32,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            concurrency: 16,
            prune: true,
            detect_only: false,
            inventory_namespace: "kiln-system".into(),
            inventory: "default".into(),
            allow_mass_delete: false,
            max_delete_percent: kiln_render::git::publish::DEFAULT_MAX_DELETE_PERCENT,
        }
    }
}

/// Everything an apply reads before it decides.
#[derive(Debug)]
pub struct Prepared {
    /// The plan, with the live objects it was made from.
    pub plan: Plan,
    /// The inventory as read.
    pub inventory: Inventory,
}

/// Reads the inventory and the live objects and makes the plan.
pub async fn prepare(
    cluster: &Cluster,
    mut desired: Vec<Desired>,
    options: &Options,
) -> Result<Prepared> {
    let inventory =
        Inventory::read(cluster, &options.inventory_namespace, &options.inventory).await?;
    crate::guard::check_apply(options, &inventory.entries, &desired)?;
    let live = read_live(
        cluster,
        &mut desired,
        &options.inventory,
        Some(&inventory.entries),
    )
    .await?;
    let plan = Plan::new(desired, live, &inventory.entries, options.prune)?;
    Ok(Prepared { plan, inventory })
}

/// Reads the live state of `desired`, setting the namespace of namespaced
/// objects that have none to `default` and dropping it from cluster-scoped
/// ones, as kubectl does.
///
/// With `compact` (the inventory's entries), objects that need nothing are
/// kept as their uid (see [`crate::plan::settled`]), or as nothing when
/// the inventory records that uid already, so that a resync of a large
/// tree holds little of it in memory.
pub async fn read_live(
    cluster: &Cluster,
    desired: &mut [Desired],
    inventory: &str,
    compact: Option<&[Entry]>,
) -> Result<Live> {
    let mut by_kind: BTreeMap<(String, String), Vec<usize>> = BTreeMap::new();
    for (i, d) in desired.iter().enumerate() {
        by_kind
            .entry((d.api_version.to_string(), d.identity.kind.to_string()))
            .or_default()
            .push(i);
    }
    let mut kinds = HashMap::new();
    for (api_version, kind) in by_kind.keys() {
        kinds.insert(
            (api_version.clone(), kind.clone()),
            cluster.kind(api_version, kind).await?,
        );
    }
    for ((api_version, kind), indices) in &by_kind {
        if let Some(Some(k)) = kinds.get(&(api_version.clone(), kind.clone())) {
            for &i in indices {
                normalise_namespace(&mut desired[i], k.namespaced);
            }
        }
    }
    let desired: &[Desired] = desired;
    // Each kind's objects sorted by identity, to look listed objects up by
    // binary search (no table per object while the lists are read).
    for indices in by_kind.values_mut() {
        indices.sort_unstable_by(|&a, &b| desired[a].identity.cmp(&desired[b].identity));
    }
    let reads = by_kind.iter().filter_map(|(key, indices)| {
        let kind = kinds.get(key).cloned().flatten()?;
        Some(async move {
            let wanted = |identity: &Identity| {
                indices
                    .binary_search_by(|&i| desired[i].identity.cmp(identity))
                    .ok()
                    .map(|at| indices[at])
            };
            let namespaces: HashSet<&str> = indices
                .iter()
                .map(|&i| desired[i].identity.namespace.as_str())
                .collect();
            let mut found: Vec<(usize, LiveObject)> = Vec::with_capacity(indices.len());
            for selector in [
                format!("{INVENTORY_LABEL}={inventory}"),
                format!("{ORPHANED_LABEL}=true"),
            ] {
                list_where(cluster, &kind, &namespaces, &selector, |object| {
                    let identity = identity_of(&object, &kind);
                    if let Some(i) = wanted(&identity) {
                        let object = if let Some(entries) = compact
                            && crate::plan::settled(&desired[i], &object)
                        {
                            let uid = object["metadata"]["uid"].as_str().unwrap_or_default();
                            // The inventory's uid is not kept twice.
                            let recorded = Entry::find(entries, &identity).map(|e| e.uid.as_str());
                            let uid = if recorded == Some(uid) {
                                String::new()
                            } else {
                                uid.to_string()
                            };
                            LiveObject::Settled { uid }
                        } else {
                            LiveObject::Read(Box::new(object))
                        };
                        found.push((i, object));
                    }
                })
                .await?;
            }
            // A few objects not labelled as Kiln's may still exist (made by
            // someone else): look them up so that the plan says so.
            let mut listed = vec![false; desired.len()];
            for (i, _) in &found {
                listed[*i] = true;
            }
            let missing: Vec<usize> = indices
                .iter()
                .copied()
                .filter(|&i| !listed[i])
                .take(51)
                .collect();
            if missing.len() <= 50 {
                for i in missing {
                    let identity = &desired[i].identity;
                    if let Ok(Some(object)) = cluster
                        .get(&kind, &identity.namespace, &identity.name)
                        .await
                    {
                        found.push((i, LiveObject::Read(Box::new(object))));
                    }
                }
            }
            Ok::<_, Error>(found)
        })
    });
    let mut live: Live = Vec::new();
    live.resize_with(desired.len(), || None);
    let mut reads: FuturesUnordered<_> = reads.collect();
    while let Some(found) = reads.next().await {
        for (i, object) in found? {
            live[i] = Some(object);
        }
    }
    Ok(live)
}

/// The objects of `kind` matching `selector` in `namespaces`: one list
/// across all namespaces when there are several and the identity may, else
/// one per namespace. A namespace the identity may not list is left out:
/// its objects look missing, and writing them fails with the API server's
/// own words for what was refused.
async fn list_where(
    cluster: &Cluster,
    kind: &crate::cluster::Kind,
    namespaces: &HashSet<&str>,
    selector: &str,
    mut each: impl FnMut(Value),
) -> Result<()> {
    if namespaces.len() > 1 {
        match cluster
            .list_each(kind, None, Some(selector), None, &mut each)
            .await
        {
            Err(Error::Api { failure, .. }) if failure.is_forbidden() => {}
            other => return other,
        }
    }
    for namespace in namespaces {
        match cluster
            .list_each(kind, Some(namespace), Some(selector), None, &mut each)
            .await
        {
            Ok(()) => {}
            Err(Error::Api { failure, .. }) if failure.is_forbidden() => {
                tracing::debug!(namespace, kind = %kind.resource.kind, "not allowed to list");
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn normalise_namespace(desired: &mut Desired, namespaced: bool) {
    if namespaced && desired.identity.namespace.is_empty() {
        desired.own().identity.namespace = "default".into();
        desired.edit(|object| {
            if let Some(metadata) = object.get_mut("metadata").and_then(Value::as_object_mut) {
                metadata.insert("namespace".into(), "default".into());
            }
        });
    } else if !namespaced && !desired.identity.namespace.is_empty() {
        desired.own().identity.namespace.clear();
        desired.edit(|object| {
            if let Some(metadata) = object.get_mut("metadata").and_then(Value::as_object_mut) {
                metadata.remove("namespace");
            }
        });
    }
}

fn identity_of(object: &Value, kind: &Kind) -> Identity {
    Identity {
        group: kind.resource.group.as_str().into(),
        kind: kind.resource.kind.as_str().into(),
        namespace: object["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .into(),
        name: object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .into(),
    }
}

/// Runs a prepared plan. `stop` turning true lets writes in flight finish
/// and starts no more.
pub async fn execute(
    cluster: &Cluster,
    prepared: Prepared,
    options: &Options,
    stop: &watch::Receiver<bool>,
) -> Result<Report> {
    let Prepared {
        plan,
        mut inventory,
    } = prepared;
    // The inventory as read: what this apply records beside its own
    // objects, before and after the writes.
    let known = std::mem::take(&mut inventory.entries);
    // Whether each step's object was in the inventory before this apply.
    let recorded = |step: &Step| Entry::find(&known, &step.desired.identity);
    let inventoried: Vec<bool> = plan.steps.iter().map(|s| recorded(s).is_some()).collect();
    // The uids Kiln recorded after writing (the inventory's, not copied):
    // an object keeps its own until Kiln writes it again.
    let mut uids: Vec<Cow<str>> = plan
        .steps
        .iter()
        .map(|s| Cow::Borrowed(recorded(s).map_or("", |e| e.uid.as_str())))
        .collect();

    let retries_before = cluster.retries();
    // Record first what this apply may create, so that a crash leaves no
    // object Kiln made but does not know of.
    let before: Vec<Line> = Line::applied(&plan, &uids)
        .chain(known.iter().map(Line::Kept))
        .collect();
    inventory.write(cluster, before).await?;

    let semaphore = Arc::new(Semaphore::new(options.concurrency.max(1)));
    let count = plan.steps.len();
    let mut statuses: Vec<Option<Status>> = vec![None; count];
    let mut outcomes: Vec<Option<Outcome>> = vec![None; count];
    // Each step starts as soon as its own dependencies are done, not when
    // the whole fleet's previous wave is: one instance waiting minutes for
    // a Deployment holds back only what depends on that Deployment. The
    // semaphore bounds the writes in flight across all of them.
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); count];
    let mut waiting: Vec<usize> = vec![0; count];
    for (i, step) in plan.steps.iter().enumerate() {
        waiting[i] = step.dependencies.len();
        for &d in &step.dependencies {
            dependents[d].push(i);
        }
    }
    // Steps are in wave then identity order, so the first to start are
    // always the same ones.
    let mut startable: std::collections::VecDeque<usize> =
        (0..count).filter(|&i| waiting[i] == 0).collect();
    let progress = kiln_render::progress::phase("applying", count as u64);
    let mut running = FuturesUnordered::new();
    // A step that writes starts once it holds a permit, so that the tasks
    // alive are the writes in flight and the waits for readiness, not one
    // per object of a cold apply.
    let mut spare: Option<OwnedSemaphorePermit> = None;
    loop {
        let mut done: Vec<(usize, Outcome, Option<String>)> = Vec::new();
        let mut held = false;
        while let Some(i) = startable.pop_front() {
            let step = &plan.steps[i];
            let not_run = |status: Status, detail: String| Outcome {
                status,
                subject: Subject::Desired(step.desired.clone()),
                detail,
            };
            if *stop.borrow() {
                done.push((i, not_run(Status::Stopped, String::new()), None));
                continue;
            }
            let blocked = step
                .dependencies
                .iter()
                .find(|&&d| !statuses[d].is_some_and(Status::lets_dependents_go));
            if let Some(&d) = blocked {
                let why = format!(
                    "dependency {} did not succeed",
                    plan.steps[d].desired.identity
                );
                done.push((i, not_run(Status::Skipped, why), None));
                continue;
            }
            let live = step.live.as_ref();
            // Nothing to write, wait for or adopt: done here, without a
            // task (a resync of a large tree holds no task per object).
            if step.action == Action::Unchanged && !step.wait && !step.adopt {
                let uid = live.and_then(LiveObject::uid).map(str::to_string);
                done.push((i, not_run(Status::Unchanged, String::new()), uid));
                continue;
            }
            let missing_drift =
                options.detect_only && step.action == Action::Create && inventoried[i];
            let writes = matches!(step.action, Action::Create | Action::Update | Action::Drift)
                && !missing_drift;
            let permit = if writes {
                match spare
                    .take()
                    .or_else(|| semaphore.clone().try_acquire_owned().ok())
                {
                    Some(permit) => Some(permit),
                    None => {
                        startable.push_front(i);
                        held = true;
                        break;
                    }
                }
            } else {
                None
            };
            running.push(async move {
                let (outcome, uid) =
                    run_step(cluster, step, live, options, missing_drift, (permit, stop)).await;
                (i, outcome, uid)
            });
        }
        if done.is_empty() {
            if held {
                // Whichever comes first: a step done, or a write done
                // (its step may go on waiting for readiness).
                tokio::select! {
                    finished = running.next() => done.extend(finished),
                    permit = semaphore.clone().acquire_owned() => {
                        spare = permit.ok();
                        continue;
                    }
                }
            } else {
                match running.next().await {
                    Some(finished) => done.push(finished),
                    None => break,
                }
            }
        }
        for (i, outcome, uid) in done {
            progress.advance(1);
            statuses[i] = Some(outcome.status);
            // A write gives the uid; an unchanged object gives it only to an
            // inventory that had none (written before uids were recorded).
            if let Some(uid) = uid
                && (outcome.status != Status::Unchanged || uids[i].is_empty())
            {
                uids[i] = Cow::Owned(uid);
            }
            outcomes[i] = Some(outcome);
            for &j in &dependents[i] {
                waiting[j] -= 1;
                if waiting[j] == 0 {
                    startable.push_back(j);
                }
            }
        }
    }
    drop(running);
    drop(spare);
    let hold = Unfinished::new(&plan, &statuses);
    let mut report = Report {
        outcomes: {
            let mut list = Vec::with_capacity(count);
            list.extend(outcomes.into_iter().flatten());
            list
        },
        ..Report::default()
    };

    // What the inventory keeps besides this apply's objects.
    let mut staying: Vec<&Entry> = Vec::new();
    let mut kept: Vec<Entry> = Vec::new();
    if !options.prune {
        // Not pruning (--no-prune, or a source failed): what left the tree
        // stays in the inventory, so that a later apply can prune it.
        let wanted: HashSet<&Identity> = plan.steps.iter().map(|s| &s.desired.identity).collect();
        staying.extend(known.iter().filter(|e| !wanted.contains(&e.identity)));
    } else if plan.prune.is_empty() {
        // nothing left the tree
    } else if *stop.borrow() {
        report.postponed = Some(format!(
            "{} objects that left the tree are kept until a pass that is not stopped",
            plan.prune.len()
        ));
        staying.extend(plan.prune.iter().map(|p| &p.entry));
    } else {
        // A failed instance may be half a rename: its old objects stay
        // until the new ones exist. Other instances prune as usual, so one
        // stuck tenant does not keep a deleted tenant's objects alive.
        let (held, free): (Vec<&Prune>, Vec<&Prune>) =
            plan.prune.iter().partition(|p| hold.holds(&p.entry));
        if !held.is_empty() {
            let instances: std::collections::BTreeSet<String> =
                held.iter().map(|p| p.entry.owner.instance_path()).collect();
            report.postponed = Some(format!(
                "{} objects that left the tree are kept until their instances apply cleanly ({})",
                held.len(),
                kiln_render::abbreviate(&instances.into_iter().collect::<Vec<_>>(), 3)
            ));
            staying.extend(held.iter().map(|p| &p.entry));
        }
        // A retained object is no longer Kiln's: deleting its Namespace
        // would delete what Retain promised to keep.
        let mut ours: crate::prune::Ours = known
            .iter()
            .map(Line::Kept)
            .chain(Line::applied(&plan, &uids))
            .chain(staying.iter().copied().map(Line::Kept))
            .map(|l| (l.identity().clone(), l.uid().into()))
            .collect();
        for p in plan.prune.iter().filter(|p| p.retain) {
            ours.remove(&p.entry.identity);
        }
        let free: Vec<Prune> = free.into_iter().cloned().collect();
        kept = prune(cluster, &free, ours, &semaphore, &mut report).await;
    }
    let after: Vec<Line> = Line::applied(&plan, &uids)
        .chain(staying.into_iter().map(Line::Kept))
        .chain(kept.iter().map(Line::Kept))
        .collect();
    inventory.write(cluster, after).await?;
    report.retries = cluster.retries() - retries_before;
    Ok(report)
}

/// What an apply did not finish, and so may not prune: the instances in
/// which a step failed (or was skipped because a dependency failed), the
/// Namespaces their objects live in and the API groups they use, whose
/// CRDs they may still need.
struct Unfinished<'a> {
    instances: HashSet<(&'a str, &'a str)>,
    namespaces: HashSet<&'a str>,
    groups: HashSet<&'a str>,
}

impl<'a> Unfinished<'a> {
    fn new(plan: &'a Plan, statuses: &[Option<Status>]) -> Self {
        let instances: HashSet<(&str, &str)> = plan
            .steps
            .iter()
            .zip(statuses)
            .filter(|(step, status)| match status {
                Some(Status::Failed) => true,
                // Skipped by its own policy is done; skipped for a failed
                // dependency is not.
                Some(Status::Skipped) => !matches!(step.action, Action::Skip(_)),
                _ => false,
            })
            .map(|(step, _)| {
                (
                    &*step.desired.owner.blueprint,
                    &*step.desired.owner.instance,
                )
            })
            .collect();
        let mut namespaces = HashSet::new();
        let mut groups = HashSet::new();
        for step in &plan.steps {
            let owner = &step.desired.owner;
            if instances.contains(&(&*owner.blueprint, &*owner.instance)) {
                namespaces.insert(step.desired.identity.namespace.as_str());
                groups.insert(step.desired.identity.group.as_str());
            }
        }
        for p in &plan.prune {
            let owner = &p.entry.owner;
            if instances.contains(&(&*owner.blueprint, &*owner.instance)) {
                namespaces.insert(p.entry.identity.namespace.as_str());
            }
        }
        Self {
            instances,
            namespaces,
            groups,
        }
    }

    /// Whether `entry`, which left the tree, must wait.
    fn holds(&self, entry: &Entry) -> bool {
        let id = &entry.identity;
        let owner = &entry.owner;
        self.instances
            .contains(&(owner.blueprint.as_str(), owner.instance.as_str()))
            || (id.group.is_empty()
                && id.kind == "Namespace"
                && self.namespaces.contains(id.name.as_str()))
            || (id.group == "apiextensions.k8s.io"
                && id.kind == "CustomResourceDefinition"
                && id
                    .name
                    .split_once('.')
                    .is_some_and(|(_, group)| self.groups.contains(group)))
    }
}

/// A line of the inventory an apply writes.
enum Line<'a> {
    /// An object of the plan, with its uid as last seen.
    Applied(&'a Step, &'a str),
    /// An entry kept as it was.
    Kept(&'a Entry),
}

impl<'a> Line<'a> {
    /// The plan's objects, with `uids` aligned to its steps.
    fn applied(plan: &'a Plan, uids: &'a [Cow<'_, str>]) -> impl Iterator<Item = Self> + 'a {
        plan.steps
            .iter()
            .zip(uids)
            .map(|(step, uid)| Self::Applied(step, uid))
    }
}

impl Record for Line<'_> {
    fn identity(&self) -> &Identity {
        match self {
            Self::Applied(step, _) => &step.desired.identity,
            Self::Kept(entry) => &entry.identity,
        }
    }

    fn uid(&self) -> &str {
        match self {
            Self::Applied(_, uid) => uid,
            Self::Kept(entry) => &entry.uid,
        }
    }

    fn line(&self) -> String {
        match self {
            Self::Applied(step, uid) => {
                let desired = &step.desired;
                crate::inventory::line(
                    &desired.identity,
                    kiln_render::manifest::version_of(&desired.api_version),
                    &desired.owner,
                    step.wave,
                    desired.policies.deletion == DeletionPolicy::Retain,
                    uid,
                )
            }
            Self::Kept(entry) => entry.line(),
        }
    }
}

async fn run_step(
    cluster: &Cluster,
    step: &Step,
    live: Option<&LiveObject>,
    options: &Options,
    missing_drift: bool,
    (permit, stop): (Option<OwnedSemaphorePermit>, &watch::Receiver<bool>),
) -> (Outcome, Option<String>) {
    let desired = &step.desired;
    let settled_uid = live.and_then(LiveObject::uid).map(str::to_string);
    let exists = live.is_some();
    let live = live.and_then(LiveObject::object);
    let outcome = |status: Status, detail: String| {
        let outcome = Outcome {
            status,
            subject: Subject::Desired(desired.clone()),
            detail,
        };
        (outcome, None)
    };
    let kind = match cluster
        .kind(&desired.api_version, &desired.identity.kind)
        .await
    {
        Ok(Some(kind)) => kind,
        Ok(None) => {
            return outcome(
                Status::Failed,
                format!(
                    "the API server does not serve kind {} in {}",
                    desired.identity.kind, desired.api_version
                ),
            );
        }
        Err(e) => return outcome(Status::Failed, e.to_string()),
    };
    let how = match desired.policies.patch {
        PatchStrategy::Apply => Write::Apply {
            force: desired.policies.conflict == ConflictPolicy::Force,
        },
        PatchStrategy::Merge => Write::Merge,
        PatchStrategy::Replace => Write::Replace,
    };
    // Built only for the steps that send it: a resync of an unchanged tree
    // copies no object.
    let body = || {
        let mut body = desired.body(&options.inventory);
        if let Some(live) = live {
            keep_ignored(&mut body, live, &desired.policies.ignore_fields);
        }
        body
    };
    let written = match &step.action {
        Action::Unchanged => None,
        Action::Skip(why) => return outcome(Status::Skipped, why.clone()),
        Action::Create if missing_drift => {
            return outcome(Status::Drifted, "deleted out of band".into());
        }
        Action::Create | Action::Update => {
            let body = body();
            let _permit = permit;
            // Writes in flight finish; none starts once Kiln is stopping.
            if *stop.borrow() {
                return outcome(Status::Stopped, String::new());
            }
            match cluster.write(&kind, &body, how, live, false).await {
                Ok(object) => Some((
                    if exists {
                        Status::Updated
                    } else {
                        Status::Created
                    },
                    object,
                )),
                Err(message) if message.is_conflict() => {
                    return outcome(
                        Status::Failed,
                        format!(
                            "conflict: {message} (conflictPolicy Stuck; set conflictPolicy: Force to take these fields)"
                        ),
                    );
                }
                Err(f) => return outcome(Status::Failed, f.to_string()),
            }
        }
        Action::Drift => {
            // Kiln applied exactly this body before: the fields that moved
            // were Kiln's, so it takes them back.
            let how = match how {
                Write::Apply { .. } => Write::Apply { force: true },
                other => other,
            };
            let body = body();
            let _permit = permit;
            // Writes in flight finish; none starts once Kiln is stopping.
            if *stop.borrow() {
                return outcome(Status::Stopped, String::new());
            }
            let after = match cluster.write(&kind, &body, how, live, true).await {
                Ok(after) => after,
                Err(f) => return outcome(Status::Failed, f.to_string()),
            };
            match live {
                Some(live) if same(live, &after, &desired.policies.ignore_fields) => None,
                _ if options.detect_only => {
                    return outcome(Status::Drifted, "live fields differ from the tree".into());
                }
                _ => match cluster.write(&kind, &body, how, live, false).await {
                    Ok(object) => Some((Status::Corrected, object)),
                    Err(f) => return outcome(Status::Failed, f.to_string()),
                },
            }
        }
    };
    let (status, current) = match written {
        Some((status, object)) => (status, Some(object)),
        None => (Status::Unchanged, live.cloned()),
    };
    // The uid of what Kiln wrote (or found unchanged), for the inventory.
    let uid = match &current {
        Some(object) => object["metadata"]["uid"].as_str().map(str::to_string),
        None => settled_uid,
    };
    let outcome = |status: Status, detail: String| {
        let outcome = Outcome {
            status,
            subject: Subject::Desired(desired.clone()),
            detail,
        };
        (outcome, uid.clone())
    };
    if step.adopt {
        let patch = json!({"metadata": {
            "labels": {ORPHANED_LABEL: null},
            "annotations": {ORPHANED_AT: null, ORPHANED_REASON: null},
        }});
        if let Err(f) = cluster
            .patch_metadata(
                &kind,
                &desired.identity.namespace,
                &desired.identity.name,
                &patch,
            )
            .await
        {
            return outcome(
                Status::Failed,
                format!("failed to remove the orphan marker: {f}"),
            );
        }
    }
    if step.wait {
        match wait_ready(cluster, &kind, desired, current, stop.clone()).await {
            Ok(Waited::Ready) => {}
            // Its dependents wait for the next pass.
            Ok(Waited::Stopped) => {
                return outcome(
                    Status::Stopped,
                    "stopped while waiting for readiness".into(),
                );
            }
            Err(why) => {
                let why = match status {
                    Status::Unchanged => why,
                    written => format!("{} but {why}", written.verb()),
                };
                return outcome(Status::Failed, why);
            }
        }
    }
    outcome(status, String::new())
}

/// Resolves once `stop` turns true; never when no one can stop Kiln any
/// more (the sender is gone).
async fn stopping(stop: &mut watch::Receiver<bool>) {
    while !*stop.borrow() {
        if stop.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// How a wait for readiness ended, when not in failure.
enum Waited {
    Ready,
    /// Kiln is stopping (SIGTERM, a lost Lease): a wait of minutes is not
    /// a write in flight, and ends at once.
    Stopped,
}

/// Ignored fields keep their live values, so that Kiln does not fight the
/// controller (an autoscaler, say) that owns them.
fn keep_ignored(body: &mut Value, live: &Value, ignore: &[String]) {
    for pointer in ignore {
        if let (Some(live_value), Some(slot)) = (live.pointer(pointer), body.pointer_mut(pointer)) {
            *slot = live_value.clone();
        }
    }
}

async fn wait_ready(
    cluster: &Cluster,
    kind: &Kind,
    desired: &Desired,
    current: Option<Value>,
    mut stop: watch::Receiver<bool>,
) -> std::result::Result<Waited, String> {
    let timeout = desired.policies.timeout;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut delay = Duration::from_millis(250);
    let mut object = current;
    let mut said = false;
    loop {
        let why = match object.as_ref().map(health) {
            Some(Health::Ready) => return Ok(Waited::Ready),
            Some(Health::Failed(why)) => return Err(format!("not healthy: {why}")),
            Some(Health::Progressing(why)) => why,
            None => "not found".to_string(),
        };
        if !std::mem::replace(&mut said, true) {
            tracing::info!(object = %desired.identity, %why, "waiting for readiness before its dependents");
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Err(format!(
                "not ready after {}: {why}",
                kiln_render::policy::format_duration(timeout)
            ));
        }
        if *stop.borrow() {
            return Ok(Waited::Stopped);
        }
        tokio::select! {
            _ = tokio::time::sleep(delay.min(deadline - now)) => {}
            _ = stopping(&mut stop) => return Ok(Waited::Stopped),
        }
        delay = (delay * 2).min(Duration::from_secs(2));
        object = cluster
            .get(kind, &desired.identity.namespace, &desired.identity.name)
            .await
            .ok()
            .flatten();
    }
}

/// Prepares and executes in one go.
pub async fn apply(
    cluster: &Cluster,
    desired: Vec<Desired>,
    options: &Options,
    stop: &watch::Receiver<bool>,
) -> Result<Report> {
    let prepared = prepare(cluster, desired, options).await?;
    execute(cluster, prepared, options, stop).await
}
