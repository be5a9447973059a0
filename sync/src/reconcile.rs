//! One pipeline's pass, the same wherever it runs (`kiln sync`, the
//! controller): read the sources that are due, render when the rows
//! changed, guard, commit (with Git), apply, report. The caller owns the
//! timers, the watches, the signals and what a person sees; nothing here
//! prints.
//!
//! A pass whose render fails (a source that cannot be read, a template over
//! its budget, a guard that refuses) keeps the last desired state: the
//! caller still applies it, without pruning, so drift is put back while the
//! rows are wrong.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_render::config::Config;
use kiln_render::git::publish::{self, Inputs, Published, Target};
use kiln_render::git::remote::PUSH_ATTEMPTS;
use kiln_render::git::repo::{Branch, CommitId};
use kiln_render::render::{self, Compiled};
use kiln_render::source::{self, Row};
use kiln_render::tree::{self, Tree};
use tokio::sync::watch;
use tracing::Instrument as _;

use crate::apply::{self, Options, Report};
use crate::cluster::Cluster;
use crate::desired::{self, Desired};
use crate::metrics::Metrics;
use crate::{Error, Result};

/// Everything a pass needs to know, settled once from the flags and the
/// Pipeline.
#[derive(Debug)]
pub struct Settings {
    /// The Pipeline's name (`default` without one): spans and the
    /// inventory's default name carry it.
    pub pipeline: String,
    /// How to apply (inventory, concurrency, the deletion guard, drift).
    pub apply: Options,
    /// Never delete objects that left the tree.
    pub no_prune: bool,
    /// Commit Secrets that carry data in plain text.
    pub allow_plaintext_secrets: bool,
    /// Where renders are committed; without one the render is applied as
    /// it is. [`Reconciler::new`] takes it (it is used from the blocking
    /// pool), so [`Reconciler::settings`] shows `None` here.
    pub git: Option<Target>,
}

/// How often a source is read when it does not say.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);

/// A source a loop reads, how often, and when next.
#[derive(Debug, Clone)]
pub struct Polled {
    /// The Source's name.
    pub name: String,
    /// Its `spec.interval` (default [`DEFAULT_INTERVAL`]), at least a second.
    pub interval: Duration,
    /// When it is read next.
    pub due: tokio::time::Instant,
}

impl Polled {
    /// Every source `blueprints` read, due now.
    pub fn all(config: &Config, blueprints: &[Compiled]) -> kiln_render::Result<Vec<Polled>> {
        let names: BTreeSet<&str> = blueprints.iter().map(|b| b.spec.source.as_str()).collect();
        let mut polled = Vec::new();
        for name in names {
            let Some(spec) = config.sources.get(name) else {
                continue;
            };
            let interval = match &spec.spec.interval {
                Some(text) => source::parse_duration(text).map_err(|e| {
                    kiln_render::Error::config(
                        spec.file.display(),
                        format!("Source {name}: spec.interval: {e}"),
                    )
                })?,
                None => DEFAULT_INTERVAL,
            };
            polled.push(Polled {
                name: name.to_string(),
                interval: interval.max(Duration::from_secs(1)),
                due: tokio::time::Instant::now(),
            });
        }
        Ok(polled)
    }
}

/// What a render did that a person would want to know.
#[derive(Debug, Clone)]
pub enum Event {
    /// Changed rows or configuration were rendered (and, with Git,
    /// committed or found unchanged).
    Rendered {
        /// Instances rendered.
        instances: usize,
        /// Objects rendered.
        objects: usize,
        /// How long rendering took.
        elapsed: Duration,
    },
    /// An interrupted render's work tree was brought up to Kiln's commit.
    Recovered {
        /// Files brought up to date.
        files: usize,
        /// The commit.
        commit: CommitId,
    },
    /// A render was committed.
    Committed(Published),
    /// The rollout moved: a wave started, an instance failed, a rollback.
    Rollout(String),
    /// The branch is pinned by a rollback: its tree is applied, nothing is
    /// committed (told once per pin).
    Pinned {
        /// The branch.
        branch: Branch,
        /// The rollback commit.
        commit: CommitId,
    },
}

/// One pipeline's loop state: the rows last read, what was last rendered
/// and committed, and the desired state being applied.
pub struct Reconciler {
    settings: Settings,
    git: Option<Arc<Mutex<Target>>>,
    config: Arc<Config>,
    blueprints: Arc<Vec<Compiled>>,
    sources: Vec<String>,
    metrics: Metrics,
    objects: Option<Arc<dyn source::Objects>>,
    rows: BTreeMap<String, Vec<Row>>,
    /// Sources whose last read failed: until each reads again, no pass
    /// prunes (their last rows may be stale).
    failing: BTreeSet<String>,
    inputs: Option<Inputs>,
    /// Whether a source was read since the last render.
    read_any: bool,
    /// The branch tip whose tree `desired` is.
    tip: Option<CommitId>,
    /// The last commit this loop made.
    committed: Option<CommitId>,
    desired: Option<Arc<Vec<Desired>>>,
    pinned_reported: bool,
    /// The Pipeline's rollout, when it has one (without Git).
    rollout: Option<crate::rollout::Driver>,
}

impl std::fmt::Debug for Reconciler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reconciler")
            .field("pipeline", &self.settings.pipeline)
            .finish_non_exhaustive()
    }
}

impl Reconciler {
    /// A pipeline of compiled `blueprints` from `config`.
    pub fn new(
        config: Config,
        blueprints: Vec<Compiled>,
        mut settings: Settings,
        metrics: Metrics,
    ) -> Self {
        let sources: BTreeSet<String> = blueprints.iter().map(|b| b.spec.source.clone()).collect();
        let git = settings.git.take().map(|t| Arc::new(Mutex::new(t)));
        Self {
            settings,
            git,
            config: Arc::new(config),
            blueprints: Arc::new(blueprints),
            sources: sources.into_iter().collect(),
            metrics,
            objects: None,
            rows: BTreeMap::new(),
            failing: BTreeSet::new(),
            inputs: None,
            read_any: false,
            tip: None,
            committed: None,
            desired: None,
            pinned_reported: false,
            rollout: None,
        }
    }

    /// Runs the Pipeline's rollout: each pass steps it, and each instance
    /// renders at the revision the rollout has it on.
    pub fn with_rollout(mut self, driver: crate::rollout::Driver) -> Self {
        self.rollout = Some(driver);
        self
    }

    /// The rollout, when the Pipeline has one.
    pub fn rollout(&self) -> Option<&crate::rollout::Driver> {
        self.rollout.as_ref()
    }

    /// Reads `kubernetes` sources through `objects`.
    pub fn with_objects(mut self, objects: Arc<dyn source::Objects>) -> Self {
        self.objects = Some(objects);
        self
    }

    /// The sources the blueprints read, by name.
    pub fn sources(&self) -> &[String] {
        &self.sources
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Lets the next passes remove more instances than the deletion guard
    /// allows (the controller's Pipeline annotation), or not.
    pub fn allow_mass_delete(&mut self, allow: bool) {
        self.settings.apply.allow_mass_delete = allow;
        if let Some(git) = &self.git
            && let Ok(mut target) = git.lock()
        {
            target.options.allow_mass_delete = allow;
        }
    }

    /// The rows a source returned last, if it was read.
    pub fn rows(&self, source: &str) -> Option<&[Row]> {
        self.rows.get(source).map(Vec::as_slice)
    }

    /// With Git, the commit whose tree is the desired state.
    pub fn tip(&self) -> Option<&CommitId> {
        self.tip.as_ref()
    }

    /// The desired state the next apply writes, once there is one.
    pub fn desired(&self) -> Option<&[Desired]> {
        self.desired.as_deref().map(Vec::as_slice)
    }

    /// Reads one source. On failure its last rows stay, and the error is
    /// returned for the caller to report (the pass that follows should not
    /// prune).
    pub async fn read(&mut self, name: &str) -> Result<usize> {
        let spec = self
            .config
            .sources
            .get(name)
            .ok_or_else(|| Error::InvalidPlan {
                message: format!("no Source {name} in the configuration"),
            })?;
        let span = tracing::info_span!("read", pipeline = %self.settings.pipeline, source = %name);
        match source::read(spec, None, self.objects.as_deref())
            .instrument(span)
            .await
        {
            Ok(rows) => {
                self.metrics.source_rows(name, rows.len());
                let count = rows.len();
                self.rows.insert(name.to_string(), rows);
                self.failing.remove(name);
                self.read_any = true;
                Ok(count)
            }
            Err(e) => {
                self.metrics.source_error(name);
                self.failing.insert(name.to_string());
                Err(e.into())
            }
        }
    }

    /// Renders when the rows or the configuration changed, guards, commits
    /// with Git, and settles the desired state (the branch's tree with Git,
    /// so that a rollback's pin holds; else the render). On error the last
    /// desired state stays.
    pub async fn render(&mut self, cluster: &Cluster) -> Result<Vec<Event>> {
        let span = tracing::info_span!("render", pipeline = %self.settings.pipeline);
        self.render_inner(cluster).instrument(span).await
    }

    async fn render_inner(&mut self, cluster: &Cluster) -> Result<Vec<Event>> {
        if self.sources.iter().any(|s| !self.rows.contains_key(s)) {
            return Err(Error::InvalidPlan {
                message: "not every source has been read yet".into(),
            });
        }
        if self.rollout.is_some() {
            return self.render_rollout(cluster).await;
        }
        let mut events = Vec::new();
        // Rows not read again since the last render cannot have changed: a
        // pass started by a watch need not hash them.
        let read_any = std::mem::take(&mut self.read_any);
        // Whether this pass fetched the remote branch (committing does).
        let mut fetched = false;
        // With Git, the tree this pass rendered, and its id.
        let mut made_here = None;
        if read_any || self.inputs.is_none() {
            let rendered = self.render_rows().await?;
            if let Some((inputs, mut rendered, taken, elapsed)) = rendered {
                match self.git.clone() {
                    Some(git) => {
                        self.metrics.rendered(elapsed);
                        let made = rendered_event(&rendered, elapsed);
                        if !self.settings.allow_plaintext_secrets {
                            publish::check_secrets(&rendered)?;
                        }
                        let tree = blocking(move || tree::build_taking(&mut rendered)).await??;
                        let pinned_reported = self.pinned_reported;
                        let commit_inputs = inputs.clone();
                        let (outcome, tree) = blocking(move || {
                            let target = git.lock().map_err(|_| poisoned())?;
                            commit_and_push(&target, &tree, &commit_inputs, pinned_reported)
                                .map(|outcome| (outcome, tree))
                        })
                        .await??;
                        fetched = true;
                        self.pinned_reported = outcome.pinned;
                        if outcome.committed.is_some() {
                            self.committed = outcome.committed;
                        }
                        events.push(made);
                        events.extend(outcome.events);
                        // When the branch holds this render, its files
                        // need not be read back from the repository.
                        made_here = outcome.tree.map(|id| (id, tree));
                    }
                    None => {
                        self.metrics.rendered(elapsed);
                        let made = rendered_event(&rendered, elapsed);
                        let desired = match taken {
                            Some(taken) => taken.objects()?,
                            None => desired::from_rendered(&rendered)?,
                        };
                        drop(rendered);
                        // The guard compares with the inventory, not with
                        // the last render: it holds across restarts, and a
                        // refused render keeps the last desired state.
                        let mut options = self.settings.apply.clone();
                        options.prune = !self.settings.no_prune;
                        crate::guard::check_cluster(cluster, &options, &desired).await?;
                        self.desired = Some(Arc::new(desired));
                        events.push(made);
                    }
                }
                self.inputs = Some(inputs);
            }
        }
        self.settle_tip(fetched, made_here).await?;
        Ok(events)
    }

    /// With Git, takes the branch's tree as the desired state when the tip
    /// moved; `fetched` when this pass fetched the remote already. When the
    /// tree there is the one this pass rendered, `made_here` holds its
    /// files.
    async fn settle_tip(&mut self, fetched: bool, made_here: Option<(String, Tree)>) -> Result<()> {
        let Some(git) = self.git.clone() else {
            return Ok(());
        };
        let known = (self.tip.clone(), self.desired.is_some());
        let read = blocking(move || {
            let target = git.lock().map_err(|_| poisoned())?;
            read_tip(&target, known, !fetched, made_here)
        })
        .await??;
        if let Some((tip, desired)) = read {
            // Someone else moved the branch (a rollback, a resume): what
            // was last rendered says nothing about it, so the next pass
            // renders again.
            if self.tip.is_some() && self.committed.as_ref() != Some(&tip) {
                self.inputs = None;
            }
            self.tip = Some(tip);
            self.desired = Some(Arc::new(desired));
        }
        Ok(())
    }

    /// A pass of the rollout: every pass steps it (health, gates and time
    /// move without the rows changing), so every pass renders.
    async fn render_rollout(&mut self, cluster: &Cluster) -> Result<Vec<Event>> {
        let Some(driver) = self.rollout.as_mut() else {
            return Ok(Vec::new());
        };
        // A finished rollout and the same rows and configuration: nothing
        // can move, so nothing is rendered or stepped (as without one).
        let plain = Inputs::digest(&self.blueprints, &self.config, &self.rows);
        let settled = driver.last().is_some() && !driver.active();
        if settled && self.desired.is_some() && self.inputs.as_ref() == Some(&plain) {
            self.settle_tip(false, None).await?;
            return Ok(Vec::new());
        }
        let started = Instant::now();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        let pass = driver
            .pass(cluster, &self.config, &self.blueprints, &self.rows, now)
            .await?;
        let elapsed = started.elapsed();
        self.metrics.rendered(elapsed);
        if let Some(figures) = driver.figures() {
            self.metrics.rollout(figures);
        }
        let mut events = vec![rendered_event(&pass.rendered, elapsed)];
        events.extend(pass.events.into_iter().map(Event::Rollout));
        let Some(git) = self.git.clone() else {
            let mut options = self.settings.apply.clone();
            options.prune = !self.settings.no_prune;
            crate::guard::check_cluster(cluster, &options, &pass.desired).await?;
            self.desired = Some(Arc::new(pass.desired));
            self.inputs = Some(plain);
            return Ok(events);
        };
        // Through Git, each step that moves instances is a commit of the
        // tree with every instance at its revision, carrying the rollout's
        // state in trailers; what is applied is the branch's tree.
        if !self.settings.allow_plaintext_secrets {
            publish::check_secrets(&pass.assembled)?;
        }
        let mut inputs = plain.clone();
        if let Some(state) = pass.trailers.last() {
            // A half-rolled tree is not the render of these inputs.
            use sha2::Digest as _;
            let mut mixed = sha2::Sha256::new();
            mixed.update(inputs.config.as_bytes());
            mixed.update(state.1.as_bytes());
            inputs.config = format!("sha256:{:x}", mixed.finalize());
        }
        let (assembled, subject, trailers) = (pass.assembled, pass.subject, pass.trailers);
        let pinned_reported = self.pinned_reported;
        let outcome = blocking(move || {
            let tree = tree::build(&assembled)?;
            let mut target = git.lock().map_err(|_| poisoned())?;
            let saved = (
                target.options.message.clone(),
                std::mem::take(&mut target.options.trailers),
            );
            if subject.is_some() {
                target.options.message = subject;
            }
            target.options.trailers = trailers;
            let outcome = commit_and_push(&target, &tree, &inputs, pinned_reported);
            (target.options.message, target.options.trailers) = saved;
            outcome
        })
        .await??;
        self.pinned_reported = outcome.pinned;
        if outcome.committed.is_some() {
            self.committed = outcome.committed;
        }
        events.extend(outcome.events);
        // Committing fetched the remote already.
        self.settle_tip(true, None).await?;
        self.inputs = Some(plain);
        Ok(events)
    }

    /// Renders the rows off the async threads when what shapes the tree
    /// changed; `None` when it did not. Without Git, the objects to apply
    /// are made as each instance renders (see [`desired::Taken`]) and the
    /// render keeps none of their YAML.
    async fn render_rows(&mut self) -> Result<Option<Rendering>> {
        let rows = std::mem::take(&mut self.rows);
        let (blueprints, config) = (self.blueprints.clone(), self.config.clone());
        let previous = self.inputs.clone();
        let direct = self.git.is_none();
        let (rows, result) = blocking(move || {
            let inputs = Inputs::digest(&blueprints, &config, &rows);
            if previous.as_ref() == Some(&inputs) {
                return (rows, Ok(None));
            }
            let started = Instant::now();
            let result = if direct {
                let taken = desired::Taken::default();
                let take = |blueprint: &str, instance: &str, objects: &mut [render::Object]| {
                    taken.take(blueprint, instance, objects);
                };
                render::render_taking(&blueprints, &config, &rows, true, &take)
                    .map(|r| Some((inputs, r, Some(taken), started.elapsed())))
            } else {
                render::render(&blueprints, &config, &rows, true)
                    .map(|r| Some((inputs, r, None, started.elapsed())))
            };
            (rows, result)
        })
        .await?;
        self.rows = rows;
        Ok(result?)
    }

    /// Applies the desired state; `prune` false (the render failed) leaves
    /// what left the tree, as does a source whose last read failed, however
    /// long ago. `None` when there is nothing to
    /// apply yet (no source has been read and rendered).
    pub async fn apply(
        &mut self,
        cluster: &Cluster,
        prune: bool,
        stop: &watch::Receiver<bool>,
    ) -> Option<Result<Report>> {
        let desired = self.desired.clone()?;
        let mut options = self.settings.apply.clone();
        options.prune = prune && !self.settings.no_prune && self.failing.is_empty();
        let started = Instant::now();
        let count = desired.len();
        let span =
            tracing::info_span!("apply", pipeline = %self.settings.pipeline, objects = count);
        let result = apply::apply(cluster, desired.to_vec(), &options, stop)
            .instrument(span)
            .await;
        if let Ok(report) = &result {
            self.metrics.applied(count, started.elapsed(), report);
        }
        Some(result)
    }
}

/// What a render made: the inputs it was made from, the render, the
/// objects to apply when they were made as it rendered, and how long it
/// took.
type Rendering = (Inputs, render::Rendered, Option<desired::Taken>, Duration);

fn rendered_event(rendered: &render::Rendered, elapsed: Duration) -> Event {
    Event::Rendered {
        instances: rendered.instances.len(),
        objects: rendered.instances.iter().map(|i| i.objects.len()).sum(),
        elapsed,
    }
}

/// What one commit attempt did.
struct Committed {
    events: Vec<Event>,
    committed: Option<CommitId>,
    pinned: bool,
    /// The rendered tree's id, when it was published (committed or
    /// already there).
    tree: Option<String>,
}

/// Commits the render, and with a remote pushes it: the branch is fetched
/// first, and fetched and committed again when the remote moved before the
/// push went through.
fn commit_and_push(
    target: &Target,
    tree: &Tree,
    inputs: &Inputs,
    pinned_reported: bool,
) -> Result<Committed> {
    let Some(remote) = &target.remote else {
        return commit(target, tree, inputs, pinned_reported);
    };
    let refname = target.refname()?;
    let mut refused = String::new();
    for attempt in 1..=PUSH_ATTEMPTS {
        remote.fetch(&target.repo, &refname)?;
        let committed = commit(target, tree, inputs, pinned_reported)?;
        if committed.committed.is_none() {
            return Ok(committed);
        }
        match remote.push(&target.repo, &refname)? {
            None => return Ok(committed),
            Some(reason) => {
                tracing::info!(
                    attempt,
                    %reason,
                    "the remote refused the push (it moved?): fetching and committing again"
                );
                refused = reason;
            }
        }
    }
    Err(kiln_render::Error::Git {
        message: format!(
            "push of {} to {} refused {PUSH_ATTEMPTS} times, last: {refused}",
            refname.short(),
            remote.redacted()
        ),
    }
    .into())
}

/// Commits the render unless a rollback pins the branch.
fn commit(
    target: &Target,
    tree: &Tree,
    inputs: &Inputs,
    pinned_reported: bool,
) -> Result<Committed> {
    let mut events = Vec::new();
    let repo = &target.repo;
    let refname = target.refname()?;
    if let Some(pin) = target.pin()? {
        if !pinned_reported {
            events.push(Event::Pinned {
                branch: refname.clone(),
                commit: pin.commit,
            });
        }
        return Ok(Committed {
            events,
            committed: None,
            pinned: true,
            tree: None,
        });
    }
    // As `kiln render --git` does: never commit over someone's uncommitted
    // edit of a checked-out work tree (the update after the commit would
    // discard it).
    let work_tree = target.prepare_work_tree()?;
    if let Some((files, commit)) = work_tree.recovered {
        events.push(Event::Recovered { files, commit });
    }
    if work_tree.checked_out {
        repo.check_clean(&target.options.path)?;
    }
    let published = publish::publish(repo, tree, inputs, &target.options)?;
    let committed = published.commit.clone();
    let tree = Some(published.tree.clone());
    if committed.is_some() {
        if work_tree.checked_out {
            repo.update_work_tree(&target.options.path)?;
        }
        events.push(Event::Committed(published));
    }
    Ok(Committed {
        events,
        committed,
        pinned: false,
        tree,
    })
}

/// The branch's tip and its tree's objects, when the tip moved since
/// `known` (the tip whose tree is applied, and whether there is one).
fn read_tip(
    target: &Target,
    (tip, have_desired): (Option<CommitId>, bool),
    fetch: bool,
    made_here: Option<(String, Tree)>,
) -> Result<Option<(CommitId, Vec<Desired>)>> {
    // A rollback or a resume pushed by someone else is the branch's tip
    // too; a pass that just committed has fetched already.
    if let Some(remote) = target.remote.as_ref().filter(|_| fetch) {
        remote.fetch(&target.repo, &target.refname()?)?;
    }
    let known = tip.filter(|_| have_desired);
    let Some((id, dir)) = target.tip_dir(known.as_ref())? else {
        return Ok(None);
    };
    // The same tree id is the same files, byte for byte (a render that
    // took instances from a memo holds their trees, not their files).
    let tree = match made_here {
        Some((rendered, tree)) if rendered == dir && tree.stored.is_empty() => tree,
        _ => target.read_tree(&dir)?,
    };
    let desired = desired::from_tree(tree)?;
    Ok(Some((id, desired)))
}

/// Runs `work` on the blocking pool: Git and rendering never hold an async
/// worker.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || span.in_scope(work))
        .await
        .map_err(|e| Error::InvalidPlan {
            message: format!("a render or Git task failed: {e}"),
        })
}

fn poisoned() -> Error {
    Error::InvalidPlan {
        message: "the repository's lock was poisoned by an earlier failure".into(),
    }
}
