//! `kiln controller`: Kiln's CRDs drive the very pass `kiln sync` runs
//! ([`Reconciler`]), one per Pipeline, with kube-runtime's [`Controller`].
//!
//! A pass runs when the Pipeline changes, when a Blueprint or Source of its
//! namespace changes, when a ConfigMap or Secret it references changes, when
//! someone else changes one of its objects, and when a source is due. A
//! status write (the controller's own) starts none. One replica leads
//! through a Lease ([`crate::lease`]); the others wait.

pub mod gather;
pub mod status;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kiln_render::api::{API_VERSION, Blueprint, Pipeline, PipelineStatus, Source, SourceState};
use kube::api::{Api, Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Resource as _, ResourceExt as _};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use self::gather::{Reference, one_line};
use self::status::{Pass, Shape, Trouble};
use crate::apply;
use crate::cluster::Cluster;
use crate::lease::Elector;
use crate::metrics::Metrics;
use crate::reconcile::{DEFAULT_INTERVAL, Event, Polled, Reconciler, Settings};
use crate::rollout::{Driver, Place, REQUEST_ANNOTATION};
use crate::rows::{self, ClusterObjects};
use crate::watch::{Note, Watches};
use crate::{Error, Result};
use kiln_render::git::publish::Target;
use kiln_render::git::remote::{Credentials, Remote};

/// The annotation that lets a Pipeline's next passes remove more instances
/// than its deletion guard allows (remove it afterwards).
pub const ALLOW_MASS_DELETE: &str = "kiln.dev/allow-mass-delete";

/// The field manager of status writes.
const STATUS_MANAGER: &str = "kiln-controller";

/// How the controller runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Where inventories are kept.
    pub inventory_namespace: String,
    /// Writes in flight at most, per Pipeline.
    pub concurrency: usize,
    /// Only Pipelines matching this label selector.
    pub selector: Option<String>,
    /// This replica's name in events and the Lease.
    pub identity: String,
    /// Leader election; without it this replica always leads.
    pub lease: Option<LeaseOptions>,
    /// Where clones of Pipelines' Git remotes are kept.
    pub cache_dir: std::path::PathBuf,
    /// The ServiceAccount a Pipeline without `serviceAccountName` acts as.
    pub default_service_account: Option<String>,
    /// Refuse Pipelines that name no ServiceAccount when there is no
    /// default (instead of acting as the controller itself).
    pub require_service_account: bool,
}

/// The Lease replicas elect a leader through.
#[derive(Debug, Clone)]
pub struct LeaseOptions {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// How long a leader keeps it without renewing.
    pub duration: Duration,
}

/// Runs until `stop` turns true (then gives the Lease up) or the Lease is
/// lost (an error: the process should exit and start again as a follower).
pub async fn run(
    cluster: Cluster,
    options: Options,
    metrics: Metrics,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    metrics.set_ready();
    let elector = match &options.lease {
        Some(lease) => {
            // The Lease's namespace may not exist yet on a fresh cluster.
            if let Err(e) = cluster.ensure_namespace(&lease.namespace).await {
                tracing::warn!("leader election: {e}");
            }
            let mut elector = Elector::new(
                cluster.client().clone(),
                &lease.namespace,
                &lease.name,
                &options.identity,
                lease.duration,
            );
            metrics.set_leader(false);
            let retry = retry_period(lease.duration);
            loop {
                match elector.try_lead().await {
                    Ok(true) => break,
                    Ok(false) => {}
                    Err(e) => tracing::warn!("leader election: {e}"),
                }
                tokio::select! {
                    _ = tokio::time::sleep(retry) => {}
                    _ = stop.changed() => return Ok(()),
                }
                if *stop.borrow() {
                    return Ok(());
                }
            }
            tracing::info!(identity = %options.identity, lease = %lease.name, "leading");
            metrics.set_leader(true);
            Some(Arc::new(tokio::sync::Mutex::new(elector)))
        }
        None => None,
    };
    // `halt` stops the controller and the writes of a pass: on a signal, or
    // when the Lease is lost.
    let (halt_tx, halt) = watch::channel(false);
    let (lost_tx, mut lost) = watch::channel(false);
    let renewer = elector.clone().map(|elector| {
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let duration = elector.lock().await.duration();
            let deadline = duration.mul_f64(2.0 / 3.0);
            let mut renewed = Instant::now();
            loop {
                tokio::time::sleep(retry_period(duration)).await;
                let held = elector.lock().await.try_lead().await;
                match held {
                    Ok(true) => renewed = Instant::now(),
                    Ok(false) => break,
                    Err(e) if renewed.elapsed() < deadline => {
                        tracing::warn!("cannot renew the Lease yet: {e}");
                    }
                    Err(e) => {
                        tracing::error!("cannot renew the Lease: {e}");
                        break;
                    }
                }
            }
            metrics.set_leader(false);
            let _ = lost_tx.send(true);
        })
    });
    let halter = {
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let lost = async move {
                // Without leader election nothing sends, and the sender is
                // gone: nothing is ever lost.
                let closed = lost.wait_for(|l| *l).await.is_err();
                if closed {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                _ = stop.wait_for(|s| *s) => {}
                _ = lost => {
                    tracing::error!("lost the Lease: stopping before another replica writes");
                }
            }
            let _ = halt_tx.send(true);
        })
    };
    let result = serve(cluster, options, metrics, halt).await;
    halter.abort();
    if let Some(renewer) = renewer {
        renewer.abort();
    }
    let stopped = *stop.borrow();
    if let Some(elector) = elector {
        if !stopped {
            return result.and(Err(Error::InvalidPlan {
                message: "lost the controller's Lease".into(),
            }));
        }
        if let Err(e) = elector.lock().await.release().await {
            tracing::warn!("cannot give the Lease up: {e}");
        }
    }
    result
}

/// Renew or retry this often: several times within a Lease's duration.
fn retry_period(duration: Duration) -> Duration {
    (duration / 5).max(Duration::from_millis(200))
}

/// What the controller shares between reconciles.
struct Context {
    cluster: Cluster,
    options: Options,
    recorder: Recorder,
    metrics: Metrics,
    halt: watch::Receiver<bool>,
    slots: Arc<Mutex<HashMap<ObjectRef<Pipeline>, Arc<Slot>>>>,
    store: Store<Pipeline>,
    wake: mpsc::UnboundedSender<ObjectRef<Pipeline>>,
}

/// One Pipeline's engine, and why it should pass again.
#[derive(Default)]
struct Slot {
    /// Its configuration may have changed: read it again.
    reconfigure: AtomicBool,
    /// One of its objects changed: apply again.
    poked: AtomicBool,
    /// Sources whose objects changed: read them now.
    stale: Mutex<BTreeSet<String>>,
    /// The ConfigMaps and Secrets it names.
    references: Mutex<BTreeSet<Reference>>,
    /// Why the configuration could not be read or built, until it can: each
    /// pass reports it and tries again.
    problem: Mutex<Option<(Trouble, Instant)>>,
    /// The status this replica last wrote: the cached Pipeline may not show
    /// it yet.
    written: Mutex<Option<PipelineStatus>>,
    state: tokio::sync::Mutex<Option<State>>,
}

/// A Pipeline's engine, built from one configuration.
struct State {
    digest: String,
    /// The cluster as the Pipeline's ServiceAccount.
    cluster: Cluster,
    trigger: (Option<i64>, bool, Option<String>),
    reconciler: Reconciler,
    watches: Watches,
    /// What lists the objects of `kubernetes` sources, and writes their
    /// status.
    objects: ClusterObjects,
    /// The tasks that turn watch events into passes.
    tasks: Vec<JoinHandle<()>>,
    polled: Vec<Polled>,
    sources: BTreeMap<String, SourceState>,
    shape: Option<Shape>,
    /// When the rollout was last stepped, with `spec.rollout`.
    stepped: Option<Instant>,
}

impl State {
    /// When a rollout under way should be stepped again (it moves with
    /// health, gates and time, not only with the rows).
    fn rollout_due(&self) -> Option<Instant> {
        if !self.reconciler.rollout().is_some_and(|r| r.active()) {
            return None;
        }
        Some(
            self.stepped
                .map_or_else(Instant::now, |at| at + ROLLOUT_TICK),
        )
    }
}

/// How often a rollout under way is stepped.
const ROLLOUT_TICK: Duration = Duration::from_secs(2);

impl Drop for State {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

async fn serve(
    cluster: Cluster,
    options: Options,
    metrics: Metrics,
    halt: watch::Receiver<bool>,
) -> Result<()> {
    let client = cluster.client().clone();
    let mut config = watcher::Config::default();
    if let Some(selector) = &options.selector {
        config = config.labels(selector);
    }
    let controller = Controller::new(Api::<Pipeline>::all(client.clone()), config);
    let store = controller.store();
    let slots: Arc<Mutex<HashMap<ObjectRef<Pipeline>, Arc<Slot>>>> = Arc::default();
    let (wake, woken) = mpsc::unbounded_channel();
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "kiln".into(),
            instance: Some(options.identity.clone()),
        },
    );
    let context = Arc::new(Context {
        cluster,
        options,
        recorder,
        metrics,
        halt: halt.clone(),
        slots: slots.clone(),
        store: store.clone(),
        wake,
    });
    let in_namespace = |store: Store<Pipeline>, slots: Arc<Mutex<HashMap<_, Arc<Slot>>>>| {
        move |namespace: Option<String>| {
            let refs: Vec<ObjectRef<Pipeline>> = store
                .state()
                .iter()
                .filter(|p| p.namespace() == namespace)
                .map(|p| ObjectRef::from_obj(&**p))
                .collect();
            mark(&slots, &refs, |s| &s.reconfigure);
            refs
        }
    };
    let on_blueprint = in_namespace(store.clone(), slots.clone());
    let on_source = in_namespace(store.clone(), slots.clone());
    let referring = |slots: Arc<Mutex<HashMap<ObjectRef<Pipeline>, Arc<Slot>>>>,
                     reference: fn(String) -> Reference| {
        move |namespace: Option<String>, name: String| {
            let wanted = reference(name);
            let refs = referrers(&slots, namespace.as_deref(), &wanted);
            mark(&slots, &refs, |s| &s.reconfigure);
            refs
        }
    };
    let on_config_map = referring(slots.clone(), Reference::ConfigMap);
    let on_secret = referring(slots.clone(), Reference::Secret);
    let woken =
        futures_util::stream::unfold(
            woken,
            |mut rx| async move { rx.recv().await.map(|r| (r, rx)) },
        );
    let mut halted = halt.clone();
    controller
        .watches(
            Api::<Blueprint>::all(client.clone()),
            watcher::Config::default(),
            move |b| on_blueprint(b.namespace()),
        )
        .watches(
            Api::<Source>::all(client.clone()),
            watcher::Config::default(),
            move |s| on_source(s.namespace()),
        )
        .watches_stream(
            watcher(
                Api::<PartialObjectMeta<ConfigMap>>::all(client.clone()),
                watcher::Config::default(),
            )
            .default_backoff()
            .touched_objects(),
            move |c| on_config_map(c.namespace(), c.name_any()),
        )
        .watches_stream(
            watcher(
                Api::<PartialObjectMeta<Secret>>::all(client.clone()),
                watcher::Config::default(),
            )
            .default_backoff()
            .touched_objects(),
            move |s| on_secret(s.namespace(), s.name_any()),
        )
        .reconcile_on(woken)
        .graceful_shutdown_on(async move {
            let _ = halted.wait_for(|h| *h).await;
        })
        .run(reconcile, error_policy, context)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!("controller: {e}");
            }
        })
        .await;
    Ok(())
}

/// The Pipelines of `namespace` that name `wanted`.
fn referrers(
    slots: &Mutex<HashMap<ObjectRef<Pipeline>, Arc<Slot>>>,
    namespace: Option<&str>,
    wanted: &Reference,
) -> Vec<ObjectRef<Pipeline>> {
    let mut refs = Vec::new();
    if let Ok(slots) = slots.lock() {
        for (key, slot) in slots.iter() {
            if key.namespace.as_deref() == namespace
                && slot.references.lock().is_ok_and(|r| r.contains(wanted))
            {
                refs.push(key.clone());
            }
        }
    }
    refs
}

fn mark(
    slots: &Mutex<HashMap<ObjectRef<Pipeline>, Arc<Slot>>>,
    refs: &[ObjectRef<Pipeline>],
    flag: fn(&Slot) -> &AtomicBool,
) {
    if let Ok(slots) = slots.lock() {
        for r in refs {
            if let Some(slot) = slots.get(r) {
                flag(slot).store(true, Ordering::SeqCst);
            }
        }
    }
}

fn error_policy(_: Arc<Pipeline>, error: &Error, _: Arc<Context>) -> Action {
    tracing::warn!("reconcile failed: {error}");
    Action::requeue(Duration::from_secs(10))
}

async fn reconcile(pipeline: Arc<Pipeline>, context: Arc<Context>) -> Result<Action> {
    let key = ObjectRef::from_obj(&*pipeline);
    let slot = context.slot(&key);
    let mut state = slot.state.lock().await;
    // A configuration that could not be read is read again every few
    // seconds (a transient API failure heals without a change).
    let retry = slot
        .problem
        .lock()
        .is_ok_and(|p| p.as_ref().is_some_and(|(_, at)| *at <= Instant::now()));
    let reconfigure = slot.reconfigure.swap(false, Ordering::SeqCst) || retry;
    let poked = slot.poked.swap(false, Ordering::SeqCst);
    let changed = state
        .as_ref()
        .is_none_or(|s| s.trigger != trigger(&pipeline));
    let stale = slot
        .stale
        .lock()
        .map(|mut s| std::mem::take(&mut *s))
        .unwrap_or_default();
    if let Some(s) = state.as_mut() {
        for p in s.polled.iter_mut().filter(|p| stale.contains(&p.name)) {
            p.due = Instant::now();
        }
    }
    let due = state.as_ref().is_some_and(|s| {
        s.polled.iter().any(|p| p.due <= Instant::now())
            || s.rollout_due().is_some_and(|at| at <= Instant::now())
    });
    if !(reconfigure || poked || changed || due) {
        // A status write of ours, or a wake for a pass already made.
        return Ok(Action::requeue(next_due(state.as_ref(), &slot)));
    }
    let started = Instant::now();
    let metrics = context.metrics.pipeline(&label(&key));
    let previous = slot
        .written
        .lock()
        .ok()
        .and_then(|w| w.clone())
        .or_else(|| pipeline.status.clone());
    // A new spec: say so before a pass that may take minutes.
    if previous.as_ref().and_then(|p| p.observed_generation) != pipeline.metadata.generation {
        let progressing = status::progressing(previous.as_ref(), pipeline.metadata.generation);
        context.write_status(&pipeline, &progressing).await?;
    }
    let pass = context
        .pass(
            &pipeline,
            key.clone(),
            slot.clone(),
            &mut state,
            reconfigure || changed,
            poked || changed || due,
        )
        .await;
    let Some(pass) = pass else {
        // The configuration was read again and had not changed.
        return Ok(Action::requeue(next_due(state.as_ref(), &slot)));
    };
    let ok = pass.trouble.is_none()
        && pass.source_failures.is_empty()
        && (pass.commit_only || pass.report.as_ref().is_some_and(|r| !r.failed()));
    metrics.reconciled(started.elapsed(), ok);
    let (shape, sources) = match state.as_ref() {
        Some(s) => (s.shape.clone(), s.sources.clone()),
        None => (None, BTreeMap::new()),
    };
    let status = status::status(
        previous.as_ref(),
        pipeline.metadata.generation,
        &pass,
        shape.as_ref(),
        &sources,
    );
    if let Some(ready) = status.conditions.iter().find(|c| c.type_ == "Ready") {
        metrics.condition(ready.status == "True", &ready.reason);
    }
    context.publish(&pipeline, &pass).await;
    context.write_status(&pipeline, &status).await?;
    if let Ok(mut written) = slot.written.lock() {
        *written = Some(status);
    }
    Ok(Action::requeue(next_due(state.as_ref(), &slot)))
}

/// What of the Pipeline object, besides references, asks for a pass: its
/// generation (the spec), whether it allows a mass deletion, and a
/// request of its rollout.
fn trigger(pipeline: &Pipeline) -> (Option<i64>, bool, Option<String>) {
    (
        pipeline.metadata.generation,
        pipeline
            .annotations()
            .get(ALLOW_MASS_DELETE)
            .is_some_and(|v| v == "true"),
        pipeline.annotations().get(REQUEST_ANNOTATION).cloned(),
    )
}

/// How soon a configuration that could not be read is read again.
const RETRY_CONFIGURATION: Duration = Duration::from_secs(5);

/// `namespace/name`, as metrics and spans name a Pipeline.
fn label(key: &ObjectRef<Pipeline>) -> String {
    format!("{}/{}", key.namespace.as_deref().unwrap_or(""), key.name)
}

fn next_due(state: Option<&State>, slot: &Slot) -> Duration {
    let retry = slot
        .problem
        .lock()
        .ok()
        .and_then(|p| p.as_ref().map(|(_, at)| *at));
    state
        .and_then(|s| s.polled.iter().map(|p| p.due).chain(s.rollout_due()).min())
        .into_iter()
        .chain(retry)
        .min()
        .map_or(DEFAULT_INTERVAL, |due| {
            due.saturating_duration_since(Instant::now())
                .max(Duration::from_millis(100))
        })
}

impl Context {
    /// The Pipeline's slot; slots of Pipelines gone from the cache are
    /// dropped (their engines and watches stop; their objects stay).
    fn slot(&self, key: &ObjectRef<Pipeline>) -> Arc<Slot> {
        let Ok(mut slots) = self.slots.lock() else {
            return Arc::default();
        };
        slots.retain(|k, _| {
            let keep = k == key || self.store.get(k).is_some();
            if !keep {
                self.metrics.pipeline(&label(k)).forget();
            }
            keep
        });
        slots.entry(key.clone()).or_default().clone()
    }

    async fn pass(
        &self,
        pipeline: &Pipeline,
        key: ObjectRef<Pipeline>,
        slot: Arc<Slot>,
        state: &mut Option<State>,
        reconfigure: bool,
        needed: bool,
    ) -> Option<Pass> {
        let metrics = &self.metrics.pipeline(&label(&key));
        let mut pass = Pass::default();
        let mut same = false;
        if reconfigure {
            let (references, gathered) = gather::gather(self.cluster.client(), pipeline).await;
            if let Ok(mut r) = slot.references.lock() {
                *r = references;
            }
            let rebuilt = match gathered {
                Ok(g) if state.as_ref().is_some_and(|s| s.digest == g.digest) => {
                    same = true;
                    Ok(None)
                }
                Ok(g) => self.build(pipeline, &key, &slot, g, metrics).map(Some),
                Err(problem) => Err(problem),
            };
            match rebuilt {
                Ok(Some(new)) => *state = Some(new),
                Ok(None) => {}
                Err(problem) => {
                    pass.trouble = Some(problem);
                }
            }
            if let Some(s) = state.as_mut() {
                s.trigger = trigger(pipeline);
                s.reconciler.allow_mass_delete(s.trigger.1);
            }
            let mut had_problem = false;
            if let Ok(mut problem) = slot.problem.lock() {
                had_problem = problem.is_some();
                *problem = pass
                    .trouble
                    .clone()
                    .map(|t| (t, Instant::now() + RETRY_CONFIGURATION));
            }
            if same && !had_problem && !needed {
                return None;
            }
        } else if let Ok(problem) = slot.problem.lock() {
            pass.trouble = problem.as_ref().map(|(t, _)| t.clone());
        }
        let Some(s) = state.as_mut() else {
            return Some(pass);
        };
        let now = Instant::now();
        for p in s.polled.iter_mut().filter(|p| p.due <= now) {
            p.due = now + p.interval;
            let entry = s
                .sources
                .entry(p.name.clone())
                .or_insert_with(|| SourceState {
                    name: p.name.clone(),
                    ..SourceState::default()
                });
            match s.reconciler.read(&p.name).await {
                Ok(rows) => {
                    entry.rows = Some(rows as u64);
                    entry.last_error = None;
                }
                Err(e) => {
                    let why = one_line(&e);
                    entry.last_error = Some(status::truncate(&why, 512));
                    pass.source_failures.push((p.name.clone(), why));
                }
            }
        }
        let all_read = s.polled.iter().all(|p| {
            s.sources
                .get(&p.name)
                .is_some_and(|state| state.rows.is_some())
        });
        let mut degraded = pass.trouble.is_some() || !pass.source_failures.is_empty();
        // A person's request of the rollout, once.
        if let (Some(driver), Some(request)) = (
            s.reconciler.rollout(),
            pipeline.annotations().get(REQUEST_ANNOTATION),
        ) && let Err(e) = driver.handle(&self.cluster, request).await
        {
            tracing::warn!("rollout request of {}: {e}", key.name);
        }
        if pass.trouble.is_none() && all_read {
            match s.reconciler.render(&s.cluster).await {
                Ok(events) => {
                    for event in &events {
                        if let Event::Committed(published) = event {
                            pass.committed =
                                published.commit.as_ref().map(|c| c.as_str().to_string());
                        }
                    }
                    pass.notes.extend(events.iter().map(note));
                }
                Err(e) => {
                    let reason = e.reason();
                    pass.trouble = Some(Trouble::of(reason, &e));
                    degraded = true;
                }
            }
        }
        if let Some(driver) = s.reconciler.rollout() {
            s.stepped = Some(Instant::now());
            pass.rollout = driver.status();
        }
        pass.commit_only = pipeline.spec.apply == Some(false);
        let applied = if pass.commit_only {
            None
        } else {
            s.reconciler.apply(&s.cluster, !degraded, &self.halt).await
        };
        match applied {
            Some(Ok(report)) => {
                let writes = rows::healths(&s.reconciler, &report);
                for failure in rows::write_back(&s.objects, writes).await {
                    tracing::warn!("{failure}");
                }
                pass.report = Some(report);
            }
            Some(Err(e)) => {
                let reason = e.reason();
                pass.trouble = Some(Trouble::of(reason, &e));
            }
            None => {}
        }
        if let Some(desired) = s.reconciler.desired() {
            let tip = s.reconciler.tip().map(|t| t.short().to_string());
            s.shape = Some(Shape::of(desired, tip.as_deref()));
            if pass.commit_only {
                // Nothing of ours to watch: ArgoCD or Flux applies.
            } else if let Err(e) = s.watches.cover(desired).await {
                tracing::warn!("cannot watch the objects of {}: {e}", key.name);
            }
        }
        Some(pass)
    }

    /// A new engine for a configuration.
    fn build(
        &self,
        pipeline: &Pipeline,
        key: &ObjectRef<Pipeline>,
        slot: &Arc<Slot>,
        gathered: gather::Gathered,
        metrics: &Metrics,
    ) -> std::result::Result<State, Trouble> {
        let config = gathered.config;
        let blueprints = kiln_render::render::compile(&config, &gathered.selected)
            .map_err(|e| Trouble::of(e.reason(), &e))?;
        let named = config.pipelines.values().next();
        let inventory = inventory_name(key.namespace.as_deref().unwrap_or_default(), &key.name);
        let polled = Polled::all(&config, &blueprints).map_err(|e| Trouble::of(e.reason(), &e))?;
        let git = match &pipeline.spec.git {
            Some(spec) => Some(self.git_target(
                spec,
                gathered.git_credentials.unwrap_or_default(),
                &inventory,
                named,
            )?),
            None => None,
        };
        let settings = Settings {
            pipeline: label(key),
            apply: apply::Options {
                concurrency: self.options.concurrency.max(1),
                inventory: inventory.clone(),
                inventory_namespace: self.options.inventory_namespace.clone(),
                allow_mass_delete: trigger(pipeline).1,
                max_delete_percent: kiln_render::git::publish::max_delete_percent(named),
                ..apply::Options::default()
            },
            no_prune: false,
            allow_plaintext_secrets: false,
            git,
        };
        let strategy = match named {
            Some(named) => kiln_render::rollout::Strategy::of(named, &config.blueprints_of(named))
                .map_err(|e| Trouble {
                    reason: "InvalidRollout",
                    message: one_line(&e),
                    stalled: true,
                })?,
            None => None,
        };
        let acting = self.acting_for(pipeline)?;
        let (notes_tx, notes) = mpsc::unbounded_channel();
        let watches = Watches::new(acting.clone(), &inventory, notes_tx);
        let mut tasks = vec![tokio::spawn(forward(
            notes,
            Arc::downgrade(slot),
            key.clone(),
            self.cluster.clone(),
            self.wake.clone(),
        ))];
        // Sources of Kubernetes objects are watched, not only polled.
        let objects =
            ClusterObjects::confined(acting.clone(), key.namespace.as_deref().unwrap_or_default());
        let (rows_tx, rows_changed) = mpsc::unbounded_channel();
        for p in &polled {
            let source = &config.sources[&p.name];
            if let Some(spec) = source.spec.kubernetes.clone() {
                tasks.push(rows::watch(
                    objects.clone(),
                    spec,
                    p.name.clone(),
                    rows_tx.clone(),
                ));
            }
            // PostgreSQL sources with spec.notify: a notification reads them
            // at once.
            if source.spec.notify.is_some() {
                tasks.push(rows::listen(source.clone(), rows_tx.clone()));
            }
        }
        tasks.push(tokio::spawn(mark_stale(
            rows_changed,
            Arc::downgrade(slot),
            key.clone(),
            self.wake.clone(),
        )));
        Ok(State {
            digest: gathered.digest,
            cluster: acting,
            trigger: (None, false, None),
            reconciler: {
                let reconciler = Reconciler::new(config, blueprints, settings, metrics.clone())
                    .with_objects(Arc::new(objects.clone()));
                match strategy {
                    Some(strategy) => reconciler.with_rollout(Driver::new(
                        strategy,
                        Place::of(&self.options.inventory_namespace, &inventory),
                    )),
                    None => reconciler,
                }
            },
            stepped: None,
            objects,
            watches,
            tasks,
            polled,
            sources: BTreeMap::new(),
            shape: None,
        })
    }

    /// The cluster as the ServiceAccount the Pipeline acts as: its own
    /// `serviceAccountName`, else the controller's default, else the
    /// controller itself (unless a ServiceAccount is required).
    fn acting_for(&self, pipeline: &Pipeline) -> std::result::Result<Cluster, Trouble> {
        let account = pipeline
            .spec
            .service_account_name
            .as_ref()
            .or(self.options.default_service_account.as_ref());
        let Some(account) = account else {
            if self.options.require_service_account {
                return Err(Trouble {
                    reason: "ServiceAccountRequired",
                    message: "Pipeline: spec.serviceAccountName is required by this controller (--require-service-account)".into(),
                    stalled: true,
                });
            }
            return Ok(self.cluster.clone());
        };
        let namespace = pipeline.namespace().unwrap_or_default();
        self.cluster
            .impersonating(&format!("system:serviceaccount:{namespace}:{account}"))
            .map_err(|e| Trouble::of(e.reason(), &e))
    }

    /// The Pipeline's remote branch, through a clone in the cache directory.
    fn git_target(
        &self,
        spec: &kiln_render::api::GitTarget,
        credentials: Credentials,
        inventory: &str,
        named: Option<&kiln_render::config::Named<kiln_render::api::PipelineSpec>>,
    ) -> std::result::Result<Target, Trouble> {
        let invalid = |message: String| Trouble {
            reason: "InvalidConfiguration",
            message: format!("Pipeline: spec.git: {message}"),
            stalled: true,
        };
        let url = spec
            .url
            .clone()
            .filter(|u| !u.is_empty())
            .ok_or_else(|| invalid("url is required in the cluster".into()))?;
        if !(url.contains("://") || url.contains('@') || url.starts_with('/')) {
            return Err(invalid(format!(
                "url {url}: a remote URL (https://, ssh://, git@host:path, git://) or an absolute path"
            )));
        }
        let branch = spec.branch.clone().unwrap_or_else(|| "main".into());
        let path = kiln_render::git::publish::normalise_path(spec.path.as_deref().unwrap_or(""))
            .map_err(|e| invalid(format!("path {e}")))?;
        let remote = Remote { url, credentials };
        let repo = remote
            .cache(&self.options.cache_dir.join(inventory), &branch)
            .map_err(|e| Trouble::of(e.reason(), &e))?;
        Ok(Target {
            repo,
            options: kiln_render::git::publish::Options {
                branch: Some(branch),
                path,
                max_delete_percent: kiln_render::git::publish::max_delete_percent(named),
                ..kiln_render::git::publish::Options::default()
            },
            remote: Some(remote),
        })
    }

    async fn publish(&self, pipeline: &Pipeline, pass: &Pass) {
        let reference = pipeline.object_ref(&());
        for (warning, reason, note) in status::events(pass) {
            let event = KubeEvent {
                type_: if warning {
                    EventType::Warning
                } else {
                    EventType::Normal
                },
                reason: reason.to_string(),
                note: Some(status::truncate(&note, 1000)),
                action: "Reconcile".into(),
                secondary: None,
            };
            if let Err(e) = self.recorder.publish(&event, &reference).await {
                tracing::warn!("cannot publish an event on {}: {e}", pipeline.name_any());
            }
        }
    }

    async fn write_status(&self, pipeline: &Pipeline, status: &PipelineStatus) -> Result<()> {
        let api: Api<Pipeline> = Api::namespaced(
            self.cluster.client().clone(),
            &pipeline.namespace().unwrap_or_default(),
        );
        let body = serde_json::json!({
            "apiVersion": API_VERSION,
            "kind": "Pipeline",
            "status": status,
        });
        match api
            .patch_status(
                &pipeline.name_any(),
                &PatchParams::apply(STATUS_MANAGER).force(),
                &Patch::Apply(&body),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => {
                let failure = crate::cluster::Failure::from(e);
                if failure.is_not_found() {
                    return Ok(());
                }
                Err(Error::Api {
                    what: format!("write the status of Pipeline {}", pipeline.name_any()),
                    failure,
                })
            }
        }
    }
}

/// Wakes the Pipeline when someone else changed one of its objects. A note
/// is judged once the pass in flight is over: the events of Kiln's own
/// writes may arrive before the answers to them.
async fn forward(
    mut notes: mpsc::UnboundedReceiver<Note>,
    slot: Weak<Slot>,
    key: ObjectRef<Pipeline>,
    cluster: Cluster,
    wake: mpsc::UnboundedSender<ObjectRef<Pipeline>>,
) {
    while let Some(first) = notes.recv().await {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut batch = vec![first];
        while let Ok(note) = notes.try_recv() {
            batch.push(note);
        }
        let Some(slot) = slot.upgrade() else {
            return;
        };
        drop(slot.state.lock().await);
        if batch.iter().any(|n| !n.is_own(&cluster)) {
            slot.poked.store(true, Ordering::SeqCst);
            if wake.send(key.clone()).is_err() {
                return;
            }
        }
    }
}

/// Marks sources whose objects changed for the next pass, and wakes it.
async fn mark_stale(
    mut changed: mpsc::UnboundedReceiver<String>,
    slot: Weak<Slot>,
    key: ObjectRef<Pipeline>,
    wake: mpsc::UnboundedSender<ObjectRef<Pipeline>>,
) {
    while let Some(first) = changed.recv().await {
        // A transaction's notifications, or a burst of object events,
        // arrive together: one pass.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let Some(slot) = slot.upgrade() else {
            return;
        };
        if let Ok(mut stale) = slot.stale.lock() {
            stale.insert(first);
            while let Ok(name) = changed.try_recv() {
                stale.insert(name);
            }
        }
        if wake.send(key.clone()).is_err() {
            return;
        }
    }
}

/// A render's event as an Event's reason and note.
fn note(event: &Event) -> (&'static str, String) {
    match event {
        Event::Rendered {
            instances,
            objects,
            elapsed,
        } => (
            "Rendered",
            format!(
                "rendered {objects} objects of {instances} instances in {} ms",
                elapsed.as_millis()
            ),
        ),
        Event::Recovered { files, commit } => (
            "Recovered",
            format!(
                "brought {files} files up to Kiln's commit {}",
                commit.short()
            ),
        ),
        Event::Committed(published) => (
            "Committed",
            format!(
                "committed {} to {}: {}",
                published.commit.as_ref().map_or("", |c| c.short()),
                published.branch.short(),
                published.summary.line()
            ),
        ),
        Event::Rollout(line) => ("Rollout", line.clone()),
        Event::Pinned { branch, commit } => (
            "Pinned",
            format!(
                "{branch} is pinned by rollback commit {}: applying it, committing nothing",
                commit.short()
            ),
        ),
    }
}

/// The inventory of Pipeline `namespace/name`: readable, at most 40
/// characters, and distinct for distinct Pipelines (a digest of both names
/// ends it).
pub fn inventory_name(namespace: &str, name: &str) -> String {
    use sha2::Digest as _;
    let digest = format!(
        "{:x}",
        sha2::Sha256::digest(format!("{namespace}/{name}").as_bytes())
    );
    let mut readable = format!("{namespace}-{name}");
    readable.truncate(31);
    let readable = readable.trim_end_matches('-');
    format!("{readable}-{}", &digest[..8])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inventory_names_are_labels_and_distinct() {
        let a = inventory_name("a-b", "c");
        let b = inventory_name("a", "b-c");
        assert_ne!(a, b);
        assert!(a.starts_with("a-b-c-"), "{a}");
        let long = inventory_name(&"n".repeat(63), &"p".repeat(63));
        assert!(long.len() <= 40, "{long}");
        assert!(kiln_render::template::is_dns_label(&long), "{long}");
    }
}
