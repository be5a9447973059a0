//! A Pipeline's rollout run from a loop (`kiln sync` without Git): which
//! revision each instance renders at, the rollout's state kept in a
//! ConfigMap beside the inventory (written with a compare-and-swap before
//! any object is), and the cluster answering [`World`]'s questions.
//!
//! A revision is what touches every instance: the blueprints' digests and
//! Kiln's version. Rows are not part of it: a changed row renders at the
//! revision its instance is on, a new row at the newest. The state holds
//! the blueprints of the revision being replaced, so that instances not
//! reached yet, and those rolled back, keep rendering it after a restart.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::ConfigMap;
use kiln_render::api::ConditionGate;
use kiln_render::config::Config;
use kiln_render::render::{self, Compiled, Instance, Rendered, Snapshot};
use kiln_render::rollout::{self, Gate, Health, Progress, State, Step, Strategy, World};
use kiln_render::source::Row;
use kube::api::{Api, PostParams};
use serde_json::Value;

use crate::cluster::Cluster;
use crate::desired::{self, DIGEST_ANNOTATION, Desired};
use crate::{Error, Result};

/// Put on an instance's release object while Kiln waits to update it; the
/// value is the revision.
pub const REQUESTED_ANNOTATION: &str = "kiln.dev/update-requested";
/// The application's answer on the same object: it may be updated to the
/// revision it names.
pub const ACKNOWLEDGED_ANNOTATION: &str = "kiln.dev/update-acknowledged";
/// The ConfigMap's `binaryData` key holding the state, gzipped JSON: the
/// instance names of a fleet compress well, and a ConfigMap holds 1 MiB.
const STATE_KEY: &str = "rollout.json.gz";
/// How many compare-and-swap attempts a step makes before it gives up for
/// this pass.
const ATTEMPTS: usize = 3;
/// How many updating instances' health is read at once.
const READS_AT_ONCE: usize = 16;

/// One revision: its id and the blueprints it renders with.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Revision {
    /// The first 12 hex digits of the digest of Kiln's version and every
    /// blueprint's digest.
    pub id: String,
    /// Its blueprints.
    pub blueprints: Vec<Snapshot>,
}

impl Revision {
    /// The revision `blueprints` are.
    pub fn of(blueprints: &[Compiled]) -> Revision {
        Revision {
            id: revision_id(blueprints),
            blueprints: blueprints.iter().map(|b| (*b.snapshot).clone()).collect(),
        }
    }

    fn digest_of(&self, blueprint: &str) -> Option<String> {
        self.blueprints
            .iter()
            .find(|b| b.name == blueprint)
            .map(Snapshot::digest)
    }
}

/// The id of the revision `blueprints` are.
pub fn revision_id(blueprints: &[Compiled]) -> String {
    use sha2::Digest as _;
    let mut hasher = sha2::Sha256::new();
    hasher.update(env!("CARGO_PKG_VERSION"));
    let mut digests: Vec<(&str, &str)> = blueprints
        .iter()
        .map(|b| (b.name.as_str(), b.digest.as_str()))
        .collect();
    digests.sort_unstable();
    for (name, digest) in digests {
        hasher.update([0]);
        hasher.update(name);
        hasher.update([0]);
        hasher.update(digest);
    }
    hasher
        .finalize()
        .iter()
        .take(6)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What the state ConfigMap holds.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Stored {
    /// The revision being rolled out (or rolled out).
    pub current: Revision,
    /// The revision it replaces: what instances not reached render at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<Revision>,
    /// The instances (`blueprint/key`) the rollout moves: those that were
    /// there when it started, of blueprints that changed.
    #[serde(default)]
    pub members: BTreeSet<String>,
    /// Revisions other than `previous` that some members are on: a
    /// revision that arrived mid-rollout leaves the instances the
    /// interrupted one reached where they were.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bases: Vec<Revision>,
    /// The revision (in `bases`) of each member not on `previous`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub base_of: BTreeMap<String, String>,
    /// Where each member is.
    pub state: State,
    /// The wave that waits and why, as of the last step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<(String, String)>,
    /// Every member healthy on the current revision.
    #[serde(default)]
    pub done: bool,
    /// The wave the rollout is in, from 1: the first with an instance not
    /// healthy on the current revision.
    #[serde(default)]
    pub wave: usize,
    /// When the last step ran (Unix seconds).
    #[serde(default)]
    pub stepped: i64,
    /// The last request made through a Pipeline's annotation, handled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handled: Option<Handled>,
}

/// A request made through [`REQUEST_ANNOTATION`], and what came of it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Handled {
    /// The request's id.
    pub id: String,
    /// Whether it was done.
    pub done: bool,
    /// What was done, or why not.
    pub message: String,
}

/// On a Pipeline the controller runs: `<id> <verb> [args]`, a request the
/// controller carries out once (`pause`, `resume`, `abort`, `approve
/// [wave=W] [revision=R]`); the Pipeline's `status.rollout.request` says
/// what came of the last one.
pub const REQUEST_ANNOTATION: &str = "kiln.dev/rollout-request";

/// What a person asks of a rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Stop where it is.
    Pause,
    /// Go on; failed and rolled back instances are tried again.
    Resume,
    /// Put every instance it reached back, and pause.
    Abort,
    /// Open a wave's approval gate for a revision.
    Approve {
        /// The wave (default: the first waiting for approval).
        wave: Option<String>,
        /// The revision (default: the one being rolled out).
        revision: Option<String>,
    },
}

impl Command {
    /// Reads `<verb> [wave=W] [revision=R]`.
    pub fn parse(text: &str) -> std::result::Result<Command, String> {
        let mut words = text.split_whitespace();
        let verb = words.next().unwrap_or_default();
        let (mut wave, mut revision) = (None, None);
        for word in words {
            match word.split_once('=') {
                Some(("wave", w)) if verb == "approve" => wave = Some(w.to_string()),
                Some(("revision", r)) if verb == "approve" => revision = Some(r.to_string()),
                _ => return Err(format!("{word:?} is not an argument of {verb}")),
            }
        }
        match verb {
            "pause" => Ok(Command::Pause),
            "resume" => Ok(Command::Resume),
            "abort" => Ok(Command::Abort),
            "approve" => Ok(Command::Approve { wave, revision }),
            other => Err(format!(
                "{other:?} is not a rollout verb (pause, resume, abort, approve)"
            )),
        }
    }

    /// The request's text, as [`Command::parse`] reads it.
    pub fn text(&self) -> String {
        match self {
            Command::Pause => "pause".into(),
            Command::Resume => "resume".into(),
            Command::Abort => "abort".into(),
            Command::Approve { wave, revision } => {
                let mut text = "approve".to_string();
                if let Some(w) = wave {
                    text.push_str(&format!(" wave={w}"));
                }
                if let Some(r) = revision {
                    text.push_str(&format!(" revision={r}"));
                }
                text
            }
        }
    }

    /// Carries it out on `stored`; the line says what was done, the error
    /// why it was refused.
    pub fn apply(
        &self,
        stored: &mut Stored,
        strategy: &Strategy,
    ) -> std::result::Result<String, String> {
        let id = stored.current.id.clone();
        match self {
            Command::Pause => {
                if stored.done {
                    return Err(format!("nothing to pause: revision {id} is rolled out"));
                }
                stored.state.pause("paused by a person");
                Ok(format!("paused the rollout of revision {id}"))
            }
            Command::Resume => {
                if stored.state.paused.is_none() {
                    return Err(format!("the rollout of revision {id} is not paused"));
                }
                stored.state.resume();
                stored.done = false;
                Ok(format!("resumed the rollout of revision {id}"))
            }
            Command::Abort => {
                if stored.done {
                    return Err(format!("nothing to abort: revision {id} is rolled out"));
                }
                let back = stored.state.abort();
                Ok(format!(
                    "aborted the rollout of revision {id}: {} instances go back to revision {}",
                    back.len(),
                    stored.previous.as_ref().map_or("?", |p| p.id.as_str())
                ))
            }
            Command::Approve { wave, revision } => {
                let revision = revision
                    .clone()
                    .unwrap_or_else(|| stored.state.revision.clone());
                let wave = match wave {
                    Some(w) => w.clone(),
                    None => waiting_for_approval(stored, strategy)
                        .ok_or_else(|| "no wave waits for approval; name one".to_string())?,
                };
                stored.state.approve(strategy, &wave, &revision)?;
                Ok(format!("approved wave {wave} for revision {revision}"))
            }
        }
    }
}

/// The first wave with an approval gate not approved yet.
fn waiting_for_approval(stored: &Stored, strategy: &Strategy) -> Option<String> {
    fn asks(g: &Gate) -> bool {
        match g {
            Gate::Approval => true,
            Gate::AllOf(gates) | Gate::AnyOf(gates) => gates.iter().any(asks),
            _ => false,
        }
    }
    strategy
        .waves
        .iter()
        .find(|w| w.gates.iter().any(asks) && !stored.state.approved.contains(&w.name))
        .map(|w| w.name.clone())
}

impl Stored {
    /// A state with nothing to roll: `current` is what every instance
    /// renders at.
    pub fn settled(current: Revision) -> Stored {
        Stored {
            state: State::new(&current.id),
            current,
            done: true,
            ..Stored::default()
        }
    }

    /// The revision `instance` is on until the rollout reaches it.
    pub fn base(&self, instance: &str) -> &str {
        self.base_of
            .get(instance)
            .map(String::as_str)
            .or(self.previous.as_ref().map(|p| p.id.as_str()))
            .unwrap_or_default()
    }

    /// Whether `instance` renders at its base revision now (not reached,
    /// asked to release, or rolled back).
    pub fn renders_previous(&self, instance: &str) -> bool {
        !self.done
            && self.previous.is_some()
            && self.members.contains(instance)
            && matches!(
                self.state.progress(instance),
                Progress::Pending | Progress::Requested { .. } | Progress::RolledBack
            )
    }
}

impl Stored {
    /// Where it is, for metrics; `waves` is the strategy's wave names.
    pub fn figures(&self, waves: &[String]) -> crate::metrics::Rollout {
        let mut instances: BTreeMap<&'static str, u64> = BTreeMap::new();
        let mut left = self.members.len() as u64;
        if self.done {
            instances.insert("healthy", left);
            left = 0;
        } else {
            for progress in self.state.instances.values() {
                let phase = match progress {
                    Progress::Pending => continue,
                    Progress::Requested { .. } => "requested",
                    Progress::Updating { .. } => "updating",
                    Progress::Healthy => "healthy",
                    Progress::Failed { .. } => "failed",
                    Progress::RolledBack => "rolledBack",
                };
                *instances.entry(phase).or_default() += 1;
                left = left.saturating_sub(1);
            }
        }
        instances.insert("pending", left);
        let wave = if self.done {
            waves.len()
        } else {
            self.wave.max(1)
        };
        crate::metrics::Rollout {
            revision: self.current.id.clone(),
            phase: if self.done {
                "Done"
            } else if self.state.paused.is_some() {
                "Paused"
            } else {
                "Progressing"
            },
            wave,
            instances,
        }
    }
}

impl Stored {
    /// The Pipeline status's view of it.
    pub fn status(&self, waves: &[String]) -> kiln_render::api::RolloutStatus {
        let figures = self.figures(waves);
        kiln_render::api::RolloutStatus {
            revision: self.current.id.clone(),
            previous_revision: self.previous.as_ref().map(|p| p.id.clone()),
            phase: figures.phase.to_string(),
            wave: waves.get(figures.wave.max(1) - 1).cloned(),
            waiting: self
                .waiting
                .as_ref()
                .filter(|_| !self.done)
                .map(|(w, why)| {
                    if w.is_empty() {
                        why.clone()
                    } else {
                        format!("wave {w}: {why}")
                    }
                }),
            paused: self.state.paused.clone(),
            approved: self.state.approved.iter().cloned().collect(),
            instances: figures
                .instances
                .iter()
                .map(|(k, v)| ((*k).to_string(), *v))
                .collect(),
            request: self
                .handled
                .as_ref()
                .map(|h| kiln_render::api::RolloutRequest {
                    id: h.id.clone(),
                    done: h.done,
                    message: h.message.clone(),
                }),
        }
    }
}

/// Where a Pipeline's rollout state lives: the ConfigMap `<inventory>-rollout`
/// in the inventory's namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Place {
    /// The namespace.
    pub namespace: String,
    /// The ConfigMap's name.
    pub name: String,
}

impl Place {
    /// The place of the rollout of the inventory `inventory`.
    pub fn of(namespace: &str, inventory: &str) -> Place {
        Place {
            namespace: namespace.to_string(),
            name: format!("{inventory}-rollout"),
        }
    }

    /// The ConfigMaps of the namespace, as Kiln itself: the state is
    /// Kiln's, like the inventory, whoever the objects are written as.
    fn api(&self, cluster: &Cluster) -> Api<ConfigMap> {
        Api::namespaced(cluster.home().client().clone(), &self.namespace)
    }

    fn what(&self, verb: &str) -> String {
        format!(
            "{verb} rollout state ConfigMap {}/{}",
            self.namespace, self.name
        )
    }

    /// The state and the ConfigMap's resourceVersion; `None` when there is
    /// none yet.
    pub async fn load(&self, cluster: &Cluster) -> Result<Option<(Stored, String)>> {
        let found = self
            .api(cluster)
            .get_opt(&self.name)
            .await
            .map_err(|e| Error::Api {
                what: self.what("read"),
                failure: crate::cluster::failure(e),
            })?;
        let Some(map) = found else {
            return Ok(None);
        };
        let version = map.metadata.resource_version.clone().unwrap_or_default();
        let wrong = |message: String| Error::InvalidPlan {
            message: format!(
                "rollout state ConfigMap {}/{}: {message}",
                self.namespace, self.name
            ),
        };
        let bytes = map
            .binary_data
            .as_ref()
            .and_then(|d| d.get(STATE_KEY))
            .ok_or_else(|| wrong(format!("no binaryData {STATE_KEY}")))?;
        let stored = decode(&bytes.0).map_err(|e| wrong(format!("{STATE_KEY}: {e}")))?;
        Ok(Some((stored, version)))
    }

    /// Writes `stored` if the ConfigMap is still at `version` (`None`:
    /// absent); false when someone wrote it meanwhile.
    pub async fn store(
        &self,
        cluster: &Cluster,
        stored: &Stored,
        version: Option<&str>,
    ) -> Result<Option<String>> {
        let bytes = encode(stored).map_err(|e| Error::InvalidPlan {
            message: format!("rollout state: {e}"),
        })?;
        let mut map = ConfigMap::default();
        map.metadata.name = Some(self.name.clone());
        map.metadata.namespace = Some(self.namespace.clone());
        map.metadata.labels = Some(BTreeMap::from([(
            "app.kubernetes.io/managed-by".to_string(),
            "kiln".to_string(),
        )]));
        map.binary_data = Some(BTreeMap::from([(
            STATE_KEY.to_string(),
            k8s_openapi::ByteString(bytes),
        )]));
        let api = self.api(cluster);
        let result = match version {
            Some(v) => {
                map.metadata.resource_version = Some(v.to_string());
                api.replace(&self.name, &PostParams::default(), &map).await
            }
            None => {
                cluster.home().ensure_namespace(&self.namespace).await?;
                api.create(&PostParams::default(), &map).await
            }
        };
        match result {
            Ok(written) => Ok(Some(written.metadata.resource_version.unwrap_or_default())),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(None),
            Err(e) => Err(Error::Api {
                what: self.what("write"),
                failure: crate::cluster::failure(e),
            }),
        }
    }

    /// Reads the state, changes it with `change`, and writes it back with
    /// a compare-and-swap, trying again when someone wrote meanwhile.
    pub async fn update<T>(
        &self,
        cluster: &Cluster,
        mut change: impl FnMut(&mut Stored) -> std::result::Result<T, String>,
    ) -> Result<T> {
        for _ in 0..ATTEMPTS {
            let Some((mut stored, version)) = self.load(cluster).await? else {
                return Err(Error::InvalidPlan {
                    message: format!(
                        "no rollout state ConfigMap {}/{}: no loop has run this Pipeline's rollout yet",
                        self.namespace, self.name
                    ),
                });
            };
            let before = stored.clone();
            let answer = change(&mut stored).map_err(|message| Error::InvalidPlan { message })?;
            if stored == before
                || self
                    .store(cluster, &stored, Some(&version))
                    .await?
                    .is_some()
            {
                return Ok(answer);
            }
        }
        Err(Error::InvalidPlan {
            message: format!(
                "rollout state ConfigMap {}/{} kept changing; try again",
                self.namespace, self.name
            ),
        })
    }
}

/// Runs a render where it cannot hold up the loop's other tasks (on a
/// runtime with several workers, this one steps aside for the while).
fn cpu<T>(work: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(work),
        _ => work(),
    }
}

/// The state as the ConfigMap keeps it: gzipped JSON.
fn encode(stored: &Stored) -> std::io::Result<Vec<u8>> {
    use std::io::Write as _;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    serde_json::to_writer(&mut gz, stored)?;
    gz.flush()?;
    gz.finish()
}

fn decode(bytes: &[u8]) -> std::result::Result<Stored, String> {
    let gz = flate2::read::GzDecoder::new(bytes);
    serde_json::from_reader(gz).map_err(|e| e.to_string())
}

/// Runs one Pipeline's rollout, pass after pass.
#[derive(Debug)]
pub struct Driver {
    /// The checked strategy.
    pub strategy: Strategy,
    /// Where the state lives.
    pub place: Place,
    /// Earlier revisions, compiled, by id.
    compiled: BTreeMap<String, std::sync::Arc<Vec<Compiled>>>,
    /// The state as of the last pass.
    last: Option<Stored>,
}

/// What one pass of the rollout gives the loop.
#[derive(Debug)]
pub struct Pass {
    /// Every object, each instance at its revision.
    pub desired: Vec<Desired>,
    /// What happened, one line each.
    pub events: Vec<String>,
    /// The render at the current revision (for the loop's report).
    pub rendered: Rendered,
    /// What to publish: each instance at its revision.
    pub assembled: Rendered,
    /// A commit's subject for it, while a rollout is under way.
    pub subject: Option<String>,
    /// A commit's rollout trailers: the revisions, the wave, the state.
    pub trailers: Vec<(String, String)>,
}

impl Driver {
    /// A driver of `strategy` keeping its state at `place`.
    pub fn new(strategy: Strategy, place: Place) -> Driver {
        Driver {
            strategy,
            place,
            compiled: BTreeMap::new(),
            last: None,
        }
    }

    /// The state as of the last pass.
    pub fn last(&self) -> Option<&Stored> {
        self.last.as_ref()
    }

    /// The Pipeline status's view of the rollout, as of the last pass.
    pub fn status(&self) -> Option<kiln_render::api::RolloutStatus> {
        Some(self.last.as_ref()?.status(&self.wave_names()))
    }

    /// The rollout's metrics, as of the last pass.
    pub fn figures(&self) -> Option<crate::metrics::Rollout> {
        Some(self.last.as_ref()?.figures(&self.wave_names()))
    }

    fn wave_names(&self) -> Vec<String> {
        self.strategy.waves.iter().map(|w| w.name.clone()).collect()
    }

    /// Whether the rollout is under way: the loop should pass again soon
    /// even when nothing changes.
    pub fn active(&self) -> bool {
        self.last.as_ref().is_some_and(|s| !s.done)
    }

    /// One pass at `now` (Unix seconds): renders the current revision, and
    /// the previous one for the rollout's members; reads what the step
    /// needs from the cluster; steps; records the state (compare-and-swap)
    /// before returning the objects to write.
    pub async fn pass(
        &mut self,
        cluster: &Cluster,
        config: &Config,
        blueprints: &[Compiled],
        rows: &BTreeMap<String, Vec<Row>>,
        now: i64,
    ) -> Result<Pass> {
        let current = Revision::of(blueprints);
        tracing::debug!(revision = %current.id, "rollout pass");
        let rendered = cpu(|| render::render(blueprints, config, rows, true))?;
        let mut events = Vec::new();
        for _ in 0..ATTEMPTS {
            events.clear();
            let loaded = self.place.load(cluster).await?;
            let version = loaded.as_ref().map(|(_, v)| v.clone());
            let mut fresh = true;
            let mut stored = match loaded {
                None => Stored::settled(current.clone()),
                Some((stored, _)) if stored.current.id != current.id => {
                    let start = self.start(stored, current.clone(), blueprints, rows);
                    events.push(format!(
                        "rollout of revision {} started: {} instances in {} waves",
                        start.current.id,
                        start.members.len(),
                        self.strategy.waves.len()
                    ));
                    start
                }
                Some((stored, _)) => {
                    fresh = false;
                    stored
                }
            };
            let before = stored.clone();
            let old = match &stored.previous {
                Some(previous) if !stored.done => {
                    let mut old = Rendered {
                        blueprints: Vec::new(),
                        instances: Vec::new(),
                        scopes: None,
                    };
                    for revision in std::iter::once(previous).chain(&stored.bases) {
                        let compiled = self.compiled_of(revision)?;
                        let part = cpu(|| {
                            render::render(
                                &compiled,
                                config,
                                &member_rows(&stored, &compiled, rows, &revision.id),
                                true,
                            )
                        })?;
                        old.instances.extend(part.instances);
                        for b in part.blueprints {
                            if !old.blueprints.contains(&b) {
                                old.blueprints.push(b);
                            }
                        }
                    }
                    Some(old)
                }
                _ => None,
            };
            // The resource each instance's release gate names, by its wave.
            let mut releases: BTreeMap<String, String> = BTreeMap::new();
            if !stored.done {
                let waves = self.waves(&stored, blueprints, rows)?;
                for (wave, members) in self.strategy.waves.iter().zip(&waves) {
                    if let Some(resource) = wave.gates.iter().find_map(release_of) {
                        for m in members {
                            releases.insert(m.clone(), resource.clone());
                        }
                    }
                }
                let world = self
                    .observe(cluster, &stored, &rendered, old.as_ref(), &releases)
                    .await?;
                let step: Step = stored.state.step(&self.strategy, &waves, now, &world);
                // A gate that starts holding a wave is news; a quorum
                // being reached is not.
                let kind = |w: &Option<(String, String)>| {
                    w.as_ref().map(|(wave, why)| {
                        (wave.clone(), why.replace(|c: char| c.is_ascii_digit(), ""))
                    })
                };
                if kind(&step.waiting) != kind(&stored.waiting)
                    && let Some((wave, why)) = &step.waiting
                    && !wave.is_empty()
                    && !why.contains("(quorum ")
                {
                    events.push(format!("wave {wave} waits: {why}"));
                }
                stored.waiting = step.waiting.clone();
                stored.done = step.done;
                stored.wave = waves
                    .iter()
                    .position(|w| {
                        w.iter()
                            .any(|m| *stored.state.progress(m) != Progress::Healthy)
                    })
                    .map_or(waves.len(), |i| i + 1);
                events.extend(step.events.iter().cloned());
                if step.done {
                    events.push(format!(
                        "rollout of revision {} done: every instance healthy",
                        stored.current.id
                    ));
                }
            }
            if fresh || stored != before {
                stored.stepped = now;
                match self
                    .place
                    .store(cluster, &stored, version.as_deref())
                    .await?
                {
                    Some(_) => {}
                    None => continue,
                }
            }
            let assembled = assemble(&stored, &rendered, old.as_ref(), &releases)?;
            let desired = desired::from_rendered(&assembled)?;
            let (subject, trailers) = self.message(&stored);
            self.last = Some(stored);
            return Ok(Pass {
                desired,
                events,
                rendered,
                assembled,
                subject,
                trailers,
            });
        }
        Err(Error::InvalidPlan {
            message: format!(
                "rollout state ConfigMap {}/{} kept changing during the pass; trying again next pass",
                self.place.namespace, self.place.name
            ),
        })
    }

    /// A new rollout of `current`, replacing what `stored` rolled out.
    /// After a finished rollout every instance is on its revision, which
    /// becomes the previous one. Mid-rollout, each instance stays on the
    /// revision it is on (the interrupted one for those it reached, else
    /// theirs) until the new rollout reaches it: nothing goes back.
    fn start(
        &self,
        stored: Stored,
        current: Revision,
        blueprints: &[Compiled],
        rows: &BTreeMap<String, Vec<Row>>,
    ) -> Stored {
        let mid = !stored.done && stored.previous.is_some();
        let previous = match &stored.previous {
            Some(previous) if mid => previous.clone(),
            _ => stored.current.clone(),
        };
        let mut base_of: BTreeMap<String, String> = BTreeMap::new();
        if mid {
            for m in &stored.members {
                let reached = matches!(
                    stored.state.progress(m),
                    Progress::Updating { .. } | Progress::Healthy | Progress::Failed { .. }
                );
                let base = if reached {
                    stored.current.id.as_str()
                } else {
                    stored.base(m)
                };
                if base != previous.id {
                    base_of.insert(m.clone(), base.to_string());
                }
            }
        }
        let known: Vec<&Revision> = std::iter::once(&stored.current)
            .chain(&stored.bases)
            .collect();
        let revision = |id: &str| {
            if id == previous.id {
                Some(&previous)
            } else {
                known.iter().copied().find(|r| r.id == id)
            }
        };
        let mut members = BTreeSet::new();
        for blueprint in blueprints {
            for row in rows.get(&blueprint.spec.source).into_iter().flatten() {
                if !row.active {
                    continue;
                }
                let id = format!("{}/{}", blueprint.name, row.key);
                let base = base_of
                    .get(&id)
                    .map_or(previous.id.as_str(), String::as_str);
                let changed = revision(base)
                    .and_then(|r| r.digest_of(&blueprint.name))
                    .is_some_and(|d| d != blueprint.digest);
                if changed {
                    members.insert(id);
                } else {
                    base_of.remove(&id);
                }
            }
        }
        base_of.retain(|id, _| members.contains(id));
        let used: BTreeSet<&String> = base_of.values().collect();
        let bases = used
            .into_iter()
            .filter_map(|id| revision(id).cloned())
            .collect();
        let done = members.is_empty();
        Stored {
            state: State::new(&current.id),
            current,
            previous: Some(previous),
            members,
            bases,
            base_of,
            done,
            ..Stored::default()
        }
    }

    /// An earlier revision's blueprints, compiled once per revision.
    fn compiled_of(&mut self, revision: &Revision) -> Result<std::sync::Arc<Vec<Compiled>>> {
        if let Some(compiled) = self.compiled.get(&revision.id) {
            return Ok(compiled.clone());
        }
        let origin = format!(
            "rollout state ConfigMap {}/{}, revision {}",
            self.place.namespace, self.place.name, revision.id
        );
        let compiled = revision
            .blueprints
            .iter()
            .map(|s| s.compile(&origin))
            .collect::<kiln_render::Result<Vec<_>>>()?;
        let compiled = std::sync::Arc::new(compiled);
        self.compiled.insert(revision.id.clone(), compiled.clone());
        Ok(compiled)
    }

    /// Each wave's members as the rows are now, in update order.
    fn waves(
        &self,
        stored: &Stored,
        blueprints: &[Compiled],
        rows: &BTreeMap<String, Vec<Row>>,
    ) -> Result<Vec<Vec<String>>> {
        let mut instances = Vec::new();
        for blueprint in blueprints {
            for row in rows.get(&blueprint.spec.source).into_iter().flatten() {
                if row.active
                    && stored
                        .members
                        .contains(&format!("{}/{}", blueprint.name, row.key))
                {
                    instances.push((blueprint.name.as_str(), row));
                }
            }
        }
        let waves = self
            .strategy
            .assign_present(&instances)
            .map_err(|e| Error::InvalidPlan {
                message: format!("spec.rollout: {e}"),
            })?;
        Ok(waves
            .into_iter()
            .map(|members| {
                members
                    .iter()
                    .map(|m| format!("{}/{}", m.blueprint, m.row.key))
                    .collect()
            })
            .collect())
    }

    /// Reads from the cluster what the step asks: the health of updating
    /// instances, the answers of those asked to release, the conditions.
    async fn observe(
        &self,
        cluster: &Cluster,
        stored: &Stored,
        rendered: &Rendered,
        old: Option<&Rendered>,
        releases: &BTreeMap<String, String>,
    ) -> Result<Observed> {
        let mut observed = Observed::default();
        let by_id = |r: &'_ Rendered| -> BTreeMap<String, usize> {
            r.instances
                .iter()
                .enumerate()
                .map(|(i, inst)| (format!("{}/{}", inst.blueprint, inst.key), i))
                .collect()
        };
        let new_index = by_id(rendered);
        let mut asked = Vec::new();
        for (id, progress) in &stored.state.instances {
            if !matches!(progress, Progress::Updating { .. }) {
                continue;
            }
            match new_index.get(id) {
                Some(&i) => asked.push((id.clone(), &rendered.instances[i])),
                // Its row is gone: nothing left to wait for.
                None => {
                    observed.health.insert(id.clone(), Health::Healthy);
                }
            }
        }
        // The updating instances' objects are read a few instances at a
        // time: a wave of fifty is not fifty round trips in a row.
        for chunk in asked.chunks(READS_AT_ONCE) {
            let reads = chunk
                .iter()
                .map(|(_, instance)| instance_health(cluster, instance));
            let healths = futures_util::future::join_all(reads).await;
            for ((id, _), health) in chunk.iter().zip(healths) {
                observed.health.insert(id.clone(), health?);
            }
        }
        if let Some(old) = old {
            let old_index = by_id(old);
            for (id, progress) in &stored.state.instances {
                if !matches!(progress, Progress::Requested { .. }) {
                    continue;
                }
                let (Some(&i), Some(resource)) = (old_index.get(id), releases.get(id)) else {
                    observed.released.insert(id.clone());
                    continue;
                };
                if acknowledged(cluster, &old.instances[i], resource, &stored.current.id).await? {
                    observed.released.insert(id.clone());
                }
            }
        }
        for wave in &self.strategy.waves {
            for gate in &wave.gates {
                collect_conditions(gate, &mut observed.conditions);
            }
        }
        for (key, gate) in observed.conditions.clone() {
            let answer = condition(cluster, &gate).await;
            observed.answers.insert(key, answer);
        }
        Ok(observed)
    }

    /// A commit's subject and trailers for the state: the rollout rides
    /// in the history, so a clone shows where it is.
    fn message(&self, stored: &Stored) -> (Option<String>, Vec<(String, String)>) {
        use kiln_render::git::history;
        let Some(previous) = stored.previous.as_ref().filter(|_| !stored.done) else {
            return (None, Vec::new());
        };
        let wave = self
            .strategy
            .waves
            .get(stored.wave.max(1) - 1)
            .map_or_else(String::new, |w| w.name.clone());
        let on_new = stored
            .members
            .iter()
            .filter(|m| !stored.renders_previous(m))
            .count();
        let subject = format!(
            "kiln: rollout {}, wave {wave}: {on_new} of {} instances on it",
            stored.current.id,
            stored.members.len()
        );
        let state = serde_json::to_string(&stored.state).unwrap_or_default();
        (
            Some(subject),
            vec![
                (history::ROLLOUT.to_string(), stored.current.id.clone()),
                (history::ROLLOUT_PREVIOUS.to_string(), previous.id.clone()),
                (history::ROLLOUT_WAVE.to_string(), wave),
                (history::ROLLOUT_STATE.to_string(), state),
            ],
        )
    }

    /// Carries out the request `<id> <verb> [args]` of a Pipeline's
    /// annotation once: a request already handled (its id recorded) is
    /// left alone. Refused or not, it is recorded with what came of it.
    pub async fn handle(&self, cluster: &Cluster, request: &str) -> Result<()> {
        let (id, text) = request
            .trim()
            .split_once(' ')
            .unwrap_or((request.trim(), ""));
        if self
            .place
            .load(cluster)
            .await?
            .is_some_and(|(s, _)| s.handled.as_ref().is_some_and(|h| h.id == id))
        {
            return Ok(());
        }
        let command = Command::parse(text);
        self.place
            .update(cluster, |stored| {
                let result = command
                    .clone()
                    .and_then(|c| c.apply(stored, &self.strategy));
                stored.handled = Some(Handled {
                    id: id.to_string(),
                    done: result.is_ok(),
                    message: result.unwrap_or_else(|e| e),
                });
                Ok(())
            })
            .await
    }
}

fn release_of(gate: &Gate) -> Option<String> {
    match gate {
        Gate::Release { resource } => Some(resource.clone()),
        Gate::AllOf(gates) | Gate::AnyOf(gates) => gates.iter().find_map(release_of),
        _ => None,
    }
}

fn collect_conditions(gate: &Gate, into: &mut BTreeMap<String, ConditionGate>) {
    match gate {
        Gate::Condition(c) => {
            into.insert(condition_key(c), c.clone());
        }
        Gate::AllOf(gates) | Gate::AnyOf(gates) => {
            for g in gates {
                collect_conditions(g, into);
            }
        }
        _ => {}
    }
}

fn condition_key(c: &ConditionGate) -> String {
    format!(
        "{}\0{}\0{}\0{}\0{}",
        c.api_version,
        c.kind,
        c.namespace.as_deref().unwrap_or_default(),
        c.name,
        c.expression
    )
}

/// The rows of `old`'s blueprints' sources, keeping only the rollout's
/// members on `revision` (a source two blueprints read is filtered by the
/// union; [`assemble`] takes only what each instance needs).
fn member_rows(
    stored: &Stored,
    old: &[Compiled],
    rows: &BTreeMap<String, Vec<Row>>,
    revision: &str,
) -> BTreeMap<String, Vec<Row>> {
    let mut kept: BTreeMap<String, Vec<Row>> = BTreeMap::new();
    for blueprint in old {
        let entry = kept.entry(blueprint.spec.source.clone()).or_default();
        for row in rows.get(&blueprint.spec.source).into_iter().flatten() {
            let id = format!("{}/{}", blueprint.name, row.key);
            if stored.members.contains(&id)
                && stored.base(&id) == revision
                && !entry.iter().any(|r| r.key == row.key)
            {
                entry.push(row.clone());
            }
        }
    }
    kept
}

/// The render to publish: each instance at the revision the state says
/// (the previous revision's render for those not reached and those rolled
/// back); an instance asked to release carries the request on its release
/// object.
fn assemble(
    stored: &Stored,
    rendered: &Rendered,
    old: Option<&Rendered>,
    releases: &BTreeMap<String, String>,
) -> Result<Rendered> {
    let old_by_id: BTreeMap<String, &Instance> = old
        .map(|r| {
            r.instances
                .iter()
                .map(|i| (format!("{}/{}", i.blueprint, i.key), i))
                .collect()
        })
        .unwrap_or_default();
    let mut instances = Vec::with_capacity(rendered.instances.len());
    for instance in &rendered.instances {
        let id = format!("{}/{}", instance.blueprint, instance.key);
        let Some(old) = old_by_id.get(&id).filter(|_| stored.renders_previous(&id)) else {
            instances.push(instance.clone());
            continue;
        };
        let mut chosen = (*old).clone();
        let requested = matches!(stored.state.progress(&id), Progress::Requested { .. });
        if let Some(resource) = releases.get(&id).filter(|_| requested) {
            for object in chosen
                .objects
                .iter_mut()
                .filter(|o| o.resource == *resource)
            {
                let mut value = object.value()?;
                annotate(&mut value, REQUESTED_ANNOTATION, &stored.current.id);
                object.yaml = kiln_render::yaml::value_to_string(&value)?;
            }
        }
        instances.push(chosen);
    }
    Ok(Rendered {
        blueprints: rendered.blueprints.clone(),
        instances,
        scopes: None,
    })
}

fn annotate(object: &mut Value, key: &str, value: &str) {
    if let Some(metadata) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        let annotations = metadata
            .entry("annotations")
            .or_insert_with(|| Value::Object(Default::default()));
        if let Some(map) = annotations.as_object_mut() {
            map.insert(key.to_string(), value.into());
        }
    }
}

/// What the cluster said, for one step.
#[derive(Debug, Default)]
struct Observed {
    health: BTreeMap<String, Health>,
    released: BTreeSet<String>,
    conditions: BTreeMap<String, ConditionGate>,
    answers: BTreeMap<String, std::result::Result<bool, String>>,
}

impl World for Observed {
    fn health(&self, instance: &str) -> Health {
        self.health
            .get(instance)
            .cloned()
            .unwrap_or(Health::Progressing)
    }

    fn released(&self, instance: &str) -> bool {
        self.released.contains(instance)
    }

    fn condition(&self, gate: &ConditionGate) -> std::result::Result<bool, String> {
        self.answers
            .get(&condition_key(gate))
            .cloned()
            .unwrap_or_else(|| Err("not read".into()))
    }
}

/// How an instance written at the current revision looks: healthy when
/// every object carries this revision's digest and is ready.
async fn instance_health(cluster: &Cluster, instance: &Instance) -> Result<Health> {
    let mut progressing = false;
    for object in &instance.objects {
        let origin = format!(
            "{}/{}/{}.yaml",
            instance.blueprint, instance.name, object.resource
        );
        let wanted = Desired::new(object.value()?, &origin)?;
        let Some(live) = live(cluster, &wanted).await? else {
            progressing = true;
            continue;
        };
        // Written by Kiln (its digest), or by whoever applies the branch
        // (ArgoCD, Flux): every field it renders holds.
        let written = live["metadata"]["annotations"][DIGEST_ANNOTATION]
            .as_str()
            .is_some_and(|a| wanted.digest.is(a))
            || crate::compare::holds(&wanted.object(), &live, &wanted.policies.ignore_fields);
        if !written {
            progressing = true;
            continue;
        }
        match crate::health::health(&live) {
            crate::health::Health::Ready => {}
            crate::health::Health::Progressing(_) => progressing = true,
            crate::health::Health::Failed(why) => {
                return Ok(Health::Failed(format!("{}: {why}", wanted.identity)));
            }
        }
    }
    Ok(if progressing {
        Health::Progressing
    } else {
        Health::Healthy
    })
}

/// Whether the application answered the release request of `instance`
/// (its `resource` objects acknowledge `revision`).
async fn acknowledged(
    cluster: &Cluster,
    instance: &Instance,
    resource: &str,
    revision: &str,
) -> Result<bool> {
    let mut any = false;
    for object in instance.objects.iter().filter(|o| o.resource == resource) {
        let origin = format!(
            "{}/{}/{}.yaml",
            instance.blueprint, instance.name, object.resource
        );
        let wanted = Desired::new(object.value()?, &origin)?;
        let Some(live) = live(cluster, &wanted).await? else {
            return Ok(false);
        };
        if live["metadata"]["annotations"][ACKNOWLEDGED_ANNOTATION].as_str() != Some(revision) {
            return Ok(false);
        }
        any = true;
    }
    // An instance whose release resource rendered nothing has no one to ask.
    Ok(any || !instance.objects.iter().any(|o| o.resource == resource))
}

async fn live(cluster: &Cluster, wanted: &Desired) -> Result<Option<Value>> {
    let Some(kind) = cluster
        .kind(&wanted.api_version, &wanted.identity.kind)
        .await?
    else {
        return Ok(None);
    };
    let namespace = wanted.identity.namespace.as_str();
    cluster
        .get(&kind, namespace, &wanted.identity.name)
        .await
        .map_err(|failure| Error::Api {
            what: format!("read {}", wanted.identity),
            failure,
        })
}

/// Whether a condition gate holds: its expression over the object; a
/// missing object keeps the gate closed.
async fn condition(cluster: &Cluster, gate: &ConditionGate) -> std::result::Result<bool, String> {
    let kind = cluster
        .kind(&gate.api_version, &gate.kind)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("the server has no {} in {}", gate.kind, gate.api_version))?;
    let namespace = gate.namespace.as_deref().unwrap_or_default();
    let object = cluster
        .get(&kind, namespace, &gate.name)
        .await
        .map_err(|f| f.to_string())?
        .ok_or_else(|| {
            format!(
                "{} {} does not exist",
                gate.kind,
                gate.namespace
                    .as_ref()
                    .map_or(gate.name.clone(), |n| format!("{n}/{}", gate.name))
            )
        })?;
    rollout::holds(&gate.expression, &object)
}

/// The rollout the controller reports for Pipeline `namespace/name`
/// (`status.rollout`); an error when the Pipeline is missing or has no
/// `spec.rollout`.
pub async fn reported(
    cluster: &Cluster,
    namespace: &str,
    name: &str,
) -> Result<Option<kiln_render::api::RolloutStatus>> {
    let api: Api<kiln_render::api::Pipeline> = Api::namespaced(cluster.client().clone(), namespace);
    let what = format!("read Pipeline {namespace}/{name}");
    let pipeline = api
        .get_opt(name)
        .await
        .map_err(|e| Error::Api {
            what: what.clone(),
            failure: crate::cluster::failure(e),
        })?
        .ok_or_else(|| Error::InvalidPlan {
            message: format!("Pipeline {namespace}/{name} does not exist"),
        })?;
    if pipeline.spec.rollout.is_none() {
        return Err(Error::InvalidPlan {
            message: format!("Pipeline {namespace}/{name} has no spec.rollout"),
        });
    }
    Ok(pipeline.status.and_then(|s| s.rollout))
}

/// Asks the controller running Pipeline `namespace/name` for `request`
/// (`<id> <verb> [args]`) through its [`REQUEST_ANNOTATION`].
pub async fn request(cluster: &Cluster, namespace: &str, name: &str, request: &str) -> Result<()> {
    let api: Api<kiln_render::api::Pipeline> = Api::namespaced(cluster.client().clone(), namespace);
    let patch = serde_json::json!({"metadata": {"annotations": {REQUEST_ANNOTATION: request}}});
    api.patch(
        name,
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&patch),
    )
    .await
    .map(|_| ())
    .map_err(|e| Error::Api {
        what: format!("annotate Pipeline {namespace}/{name}"),
        failure: crate::cluster::failure(e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fleet of 100,000 instances mid-rollout fits a ConfigMap.
    #[test]
    fn the_state_of_a_large_fleet_fits_a_config_map() {
        let mut stored = Stored::settled(Revision {
            id: "0123456789ab".into(),
            blueprints: Vec::new(),
        });
        stored.done = false;
        for i in 0..100_000 {
            let id = format!("tenants/tenant-{i:06}");
            stored.members.insert(id.clone());
            if i % 2 == 0 {
                stored.state.instances.insert(id, Progress::Healthy);
            }
        }
        let bytes = encode(&stored).unwrap();
        assert!(bytes.len() < 512 * 1024, "{} bytes", bytes.len());
        assert_eq!(decode(&bytes).unwrap(), stored);
        assert!(decode(b"not gzip").is_err());
    }
}
