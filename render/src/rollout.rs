//! A Pipeline's progressive rollout: the strategy checked and compiled from
//! `spec.rollout`, which wave each instance belongs to, and the rollout's
//! steps as pure logic over a [`State`] the caller keeps ([`State::step`]:
//! observe, fail past the deadline, roll back, open gates, start instances
//! within each wave's concurrency and quorum). Nothing here talks to a
//! cluster or a repository: the caller answers through [`World`], writes
//! what a step says and stores the state.

use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

use minijinja::Value;
use sha2::{Digest as _, Sha256};

use crate::api::{
    GateSpec, LeafGateSpec, OnFailure, PipelineSpec, RolloutSpec, WaveSpec, WindowGate,
};
use crate::config::Named;
use crate::source::Row;
use crate::{Error, Result};

/// How long an instance may stay updating when the strategy does not say.
pub const DEFAULT_PROGRESS_DEADLINE: Duration = Duration::from_secs(600);

/// Why `kiln render --git` refuses a Pipeline with `spec.rollout`: it
/// renders once and has no cluster to read health from, and committing
/// every instance at once would break the strategy's promise.
pub const NOT_RUN: &str = "spec.rollout is run by `kiln sync` (with or without --git: one commit per step) and by the controller, which read health from the cluster between steps; `kiln render --git` renders once and cannot step it, so it refuses rather than commit every instance at once";

/// [`NOT_RUN`] for `pipeline`, naming its file, when it has a rollout.
pub fn not_run(pipeline: &Named<PipelineSpec>) -> Option<String> {
    pipeline.spec.rollout.as_ref().map(|_| {
        format!(
            "{}: Pipeline {}: {NOT_RUN}",
            pipeline.file.display(),
            pipeline.name
        )
    })
}

/// A checked rollout strategy.
#[derive(Debug, Clone)]
pub struct Strategy {
    /// The waves, in order; the last takes every instance no earlier one
    /// took.
    pub waves: Vec<Wave>,
    /// How long an instance may stay updating before it fails.
    pub progress_deadline: Duration,
    /// What a failed instance does.
    pub on_failure: OnFailure,
}

/// One wave of a [`Strategy`].
#[derive(Debug, Clone)]
pub struct Wave {
    /// Its name.
    pub name: String,
    /// Which instances it takes.
    pub take: Take,
    /// At most this many of its instances updating at once (`None`: all).
    pub max_concurrent: Option<usize>,
    /// How many must be healthy before the next wave starts.
    pub quorum: Quorum,
    /// What must hold before it starts, all of them.
    pub gates: Vec<Gate>,
}

/// How a wave takes its instances from those no earlier wave took.
#[derive(Debug, Clone)]
pub enum Take {
    /// These keys (`KEY` or `BLUEPRINT/KEY`).
    Instances(Vec<String>),
    /// Those for which the expression is true.
    Select(String),
    /// This share of every instance, in percent.
    Percent(u32),
    /// All of them.
    Rest,
}

/// How many of a wave's instances must be healthy on the new revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quorum {
    /// This many (all of them when the wave is smaller).
    Count(usize),
    /// This share, in percent, rounded up.
    Percent(u32),
}

impl Quorum {
    /// How many of `members` instances must be healthy.
    pub fn needed(self, members: usize) -> usize {
        match self {
            Quorum::Count(n) => n.min(members),
            Quorum::Percent(p) => (members * p as usize).div_ceil(100),
        }
    }
}

impl fmt::Display for Quorum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Quorum::Count(n) => write!(f, "{n}"),
            Quorum::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// A precondition of a wave.
#[derive(Debug, Clone)]
pub enum Gate {
    /// A person approved the wave for the revision being rolled out.
    Approval,
    /// Inside a time window.
    Window(Window),
    /// An expression over a cluster object is true.
    Condition(crate::api::ConditionGate),
    /// Per instance: the application acknowledged the update request on
    /// the object of this resource.
    Release {
        /// The resource id.
        resource: String,
    },
    /// Every one of these.
    AllOf(Vec<Gate>),
    /// One of these.
    AnyOf(Vec<Gate>),
}

/// A checked time window.
#[derive(Debug, Clone)]
pub struct Window {
    /// Monday first.
    days: [bool; 7],
    /// Minutes after midnight.
    from: u16,
    to: u16,
    zone: jiff::tz::TimeZone,
    /// As written, for messages.
    text: String,
}

impl Window {
    /// Whether the window is open at `now`.
    pub fn is_open(&self, now: jiff::Timestamp) -> bool {
        let local = now.to_zoned(self.zone.clone());
        let minute = u16::from(local.hour() as u8) * 60 + u16::from(local.minute() as u8);
        let today = local.weekday().to_monday_zero_offset() as usize;
        let yesterday = (today + 6) % 7;
        if self.from < self.to {
            self.days[today] && (self.from..self.to).contains(&minute)
        } else {
            // Past midnight: it opened on one of its days and closes the
            // next morning.
            (self.days[today] && minute >= self.from) || (self.days[yesterday] && minute < self.to)
        }
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Strategy {
    /// The strategy of `pipeline`, checked; `None` without `spec.rollout`.
    /// `blueprints` are the blueprints the Pipeline renders, whose
    /// resources a release gate may name.
    pub fn of(
        pipeline: &Named<PipelineSpec>,
        blueprints: &[&crate::api::BlueprintSpec],
    ) -> Result<Option<Strategy>> {
        let Some(spec) = &pipeline.spec.rollout else {
            return Ok(None);
        };
        let at = |message: String| {
            Error::config(
                pipeline.file.display(),
                format!("Pipeline {}: spec.rollout: {message}", pipeline.name),
            )
        };
        Strategy::from_spec(spec, blueprints).map(Some).map_err(at)
    }

    fn from_spec(
        spec: &RolloutSpec,
        blueprints: &[&crate::api::BlueprintSpec],
    ) -> std::result::Result<Strategy, String> {
        if spec.waves.is_empty() {
            return Err("waves must hold at least one wave".into());
        }
        let progress_deadline = match &spec.progress_deadline {
            Some(text) => {
                crate::source::parse_duration(text).map_err(|e| format!("progressDeadline: {e}"))?
            }
            None => DEFAULT_PROGRESS_DEADLINE,
        };
        if progress_deadline.is_zero() {
            return Err("progressDeadline must be longer than 0s".into());
        }
        let mut names = BTreeSet::new();
        let mut waves = Vec::with_capacity(spec.waves.len());
        let last = spec.waves.len() - 1;
        for (i, w) in spec.waves.iter().enumerate() {
            let wave = compile_wave(w, blueprints).map_err(|e| format!("wave {}: {e}", w.name))?;
            if !names.insert(w.name.clone()) {
                return Err(format!("wave {}: the name is used twice", w.name));
            }
            match (&wave.take, i == last) {
                (Take::Rest, false) => {
                    return Err(format!(
                        "wave {} takes every remaining instance (no instances, select or percent), so the waves after it would be empty; only the last wave may",
                        w.name
                    ));
                }
                (Take::Rest, true) => {}
                (_, true) => {
                    return Err(format!(
                        "the last wave ({}) must take every remaining instance (no instances, select or percent), so that no instance is left out",
                        w.name
                    ));
                }
                (_, false) => {}
            }
            waves.push(wave);
        }
        Ok(Strategy {
            waves,
            progress_deadline,
            on_failure: spec.on_failure,
        })
    }

    /// The waves' instances: `instances` (blueprint, row) are every
    /// instance of the Pipeline. Each wave's are sorted by blueprint, then
    /// key: the order they are updated in. The error is one line.
    pub fn assign<'a>(
        &self,
        instances: &[(&'a str, &'a Row)],
    ) -> std::result::Result<Vec<Vec<Member<'a>>>, String> {
        self.assign_checked(instances, true)
    }

    /// [`Strategy::assign`] for a rollout under way: a key that no
    /// instance has any more (its row was removed, or it is not one the
    /// rollout moves) takes nothing instead of being an error.
    pub fn assign_present<'a>(
        &self,
        instances: &[(&'a str, &'a Row)],
    ) -> std::result::Result<Vec<Vec<Member<'a>>>, String> {
        self.assign_checked(instances, false)
    }

    fn assign_checked<'a>(
        &self,
        instances: &[(&'a str, &'a Row)],
        strict: bool,
    ) -> std::result::Result<Vec<Vec<Member<'a>>>, String> {
        let mut remaining: Vec<Member<'a>> = instances
            .iter()
            .map(|&(blueprint, row)| Member { blueprint, row })
            .collect();
        remaining.sort_by(|a, b| (a.blueprint, &a.row.key).cmp(&(b.blueprint, &b.row.key)));
        let total = remaining.len();
        let mut assigned = Vec::with_capacity(self.waves.len());
        for wave in &self.waves {
            let at = |message: String| format!("wave {}: {message}", wave.name);
            let taken: Vec<bool> = match &wave.take {
                Take::Rest => vec![true; remaining.len()],
                Take::Instances(keys) => {
                    for wanted in keys {
                        let known = instances
                            .iter()
                            .any(|&(blueprint, row)| names(wanted, blueprint, &row.key));
                        if strict && !known {
                            return Err(at(format!("no instance has the key {wanted:?}")));
                        }
                    }
                    remaining
                        .iter()
                        .map(|m| keys.iter().any(|k| names(k, m.blueprint, &m.row.key)))
                        .collect()
                }
                Take::Select(expression) => {
                    let compiled = crate::template::expression(expression)
                        .map_err(|e| at(format!("select: {e}")))?;
                    let mut taken = Vec::with_capacity(remaining.len());
                    for m in &remaining {
                        let context = minijinja::context! {
                            row => Value::from(minijinja::value::Serde(&m.row.values)),
                            key => m.row.key.as_str(),
                            blueprint => m.blueprint,
                        };
                        let value = compiled.eval(context).map_err(|e| {
                            at(format!(
                                "select, blueprint {}, row key {}: {}",
                                m.blueprint,
                                m.row.key,
                                crate::template::one_line(&e)
                            ))
                        })?;
                        taken.push(value.is_true());
                    }
                    taken
                }
                Take::Percent(p) => {
                    let want = (total * *p as usize).div_ceil(100).max(1);
                    let mut by_hash: Vec<(String, usize)> = remaining
                        .iter()
                        .enumerate()
                        .map(|(i, m)| (spread(m.blueprint, &m.row.key), i))
                        .collect();
                    by_hash.sort_unstable();
                    let mut taken = vec![false; remaining.len()];
                    for (_, i) in by_hash.into_iter().take(want) {
                        taken[i] = true;
                    }
                    taken
                }
            };
            let mut members = Vec::new();
            let mut left = Vec::with_capacity(remaining.len());
            for (m, take) in remaining.into_iter().zip(taken) {
                if take { members.push(m) } else { left.push(m) }
            }
            remaining = left;
            assigned.push(members);
        }
        Ok(assigned)
    }
}

/// An instance in a wave.
#[derive(Debug, Clone, Copy)]
pub struct Member<'a> {
    /// Its blueprint.
    pub blueprint: &'a str,
    /// Its row.
    pub row: &'a Row,
}

/// Whether `wanted` (`KEY` or `BLUEPRINT/KEY`) names this instance. A key
/// may hold `/` itself: `BLUEPRINT/KEY` is tried first, then the key whole.
fn names(wanted: &str, blueprint: &str, key: &str) -> bool {
    wanted == key
        || wanted
            .split_once('/')
            .is_some_and(|(b, k)| b == blueprint && k == key)
}

/// Where an instance falls in a `percent` wave's draw: the same every time,
/// and spread over the fleet rather than its first keys.
fn spread(blueprint: &str, key: &str) -> String {
    let mut hash = Sha256::new();
    hash.update(blueprint.as_bytes());
    hash.update([0]);
    hash.update(key.as_bytes());
    crate::template::hex(&hash.finalize())
}

fn compile_wave(
    w: &WaveSpec,
    blueprints: &[&crate::api::BlueprintSpec],
) -> std::result::Result<Wave, String> {
    if !crate::template::is_dns_label(&w.name) {
        return Err("the name must be a DNS label: lowercase letters, digits and '-'".into());
    }
    let take = match (w.instances.is_empty(), &w.select, w.percent) {
        (true, None, None) => Take::Rest,
        (false, None, None) => {
            if let Some(empty) = w.instances.iter().find(|k| k.is_empty()) {
                return Err(format!("instances: {empty:?} is not a key"));
            }
            Take::Instances(w.instances.clone())
        }
        (true, Some(select), None) => {
            crate::template::expression(select).map_err(|e| format!("select: {e}"))?;
            Take::Select(select.clone())
        }
        (true, None, Some(p)) if (1..=100).contains(&p) => Take::Percent(p),
        (true, None, Some(p)) => {
            return Err(format!("percent must be between 1 and 100, found {p}"));
        }
        _ => {
            return Err(
                "a wave takes its instances by at most one of instances, select and percent".into(),
            );
        }
    };
    let max_concurrent = match w.max_concurrent {
        Some(0) => return Err("maxConcurrent must be at least 1".into()),
        Some(n) => Some(n as usize),
        None => None,
    };
    let quorum = match &w.quorum {
        None => Quorum::Percent(100),
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(text)) => {
            quorum(text)?
        }
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n)) => {
            quorum(&n.to_string())?
        }
    };
    let mut gates = Vec::with_capacity(w.gates.len());
    for (i, g) in w.gates.iter().enumerate() {
        gates.push(gate(g, blueprints).map_err(|e| format!("gates[{i}]: {e}"))?);
    }
    Ok(Wave {
        name: w.name.clone(),
        take,
        max_concurrent,
        quorum,
        gates,
    })
}

fn quorum(text: &str) -> std::result::Result<Quorum, String> {
    let wrong = || format!("quorum {text:?} must be a count (3) or a percentage (95%)");
    match text.strip_suffix('%') {
        Some(p) => {
            let p: u32 = p.parse().map_err(|_| wrong())?;
            if p > 100 {
                return Err(wrong());
            }
            Ok(Quorum::Percent(p))
        }
        None => text.parse().map(Quorum::Count).map_err(|_| wrong()),
    }
}

fn gate(
    g: &GateSpec,
    blueprints: &[&crate::api::BlueprintSpec],
) -> std::result::Result<Gate, String> {
    let leaf = LeafGateSpec {
        approval: g.approval.clone(),
        window: g.window.clone(),
        condition: g.condition.clone(),
        release: g.release.clone(),
    };
    let set = [
        g.approval.is_some(),
        g.window.is_some(),
        g.condition.is_some(),
        g.release.is_some(),
        g.all_of.is_some(),
        g.any_of.is_some(),
    ];
    if set.iter().filter(|s| **s).count() != 1 {
        return Err(
            "a gate is exactly one of approval, window, condition, release, allOf and anyOf".into(),
        );
    }
    let group = |gates: &[LeafGateSpec], what: &str| {
        if gates.is_empty() {
            return Err(format!("{what} must hold at least one gate"));
        }
        gates
            .iter()
            .enumerate()
            .map(|(i, g)| leaf_gate(g, blueprints).map_err(|e| format!("{what}[{i}]: {e}")))
            .collect::<std::result::Result<Vec<Gate>, String>>()
    };
    match (&g.all_of, &g.any_of) {
        (Some(gates), _) => Ok(Gate::AllOf(group(gates, "allOf")?)),
        (_, Some(gates)) => Ok(Gate::AnyOf(group(gates, "anyOf")?)),
        _ => leaf_gate(&leaf, blueprints),
    }
}

fn leaf_gate(
    g: &LeafGateSpec,
    blueprints: &[&crate::api::BlueprintSpec],
) -> std::result::Result<Gate, String> {
    match (&g.approval, &g.window, &g.condition, &g.release) {
        (Some(_), None, None, None) => Ok(Gate::Approval),
        (None, Some(w), None, None) => window(w).map(Gate::Window),
        (None, None, Some(c), None) => {
            for (field, value) in [
                ("apiVersion", &c.api_version),
                ("kind", &c.kind),
                ("name", &c.name),
            ] {
                if value.is_empty() {
                    return Err(format!("condition.{field} must not be empty"));
                }
            }
            crate::template::expression(&c.expression)
                .map_err(|e| format!("condition.expression: {e}"))?;
            Ok(Gate::Condition(c.clone()))
        }
        (None, None, None, Some(r)) => {
            let known = blueprints
                .iter()
                .any(|b| b.resources.iter().any(|res| res.id == r.resource));
            if !known {
                return Err(format!(
                    "release.resource: no blueprint of the Pipeline has a resource {:?}",
                    r.resource
                ));
            }
            Ok(Gate::Release {
                resource: r.resource.clone(),
            })
        }
        _ => Err(
            "a gate in allOf or anyOf is exactly one of approval, window, condition and release"
                .into(),
        ),
    }
}

fn window(w: &WindowGate) -> std::result::Result<Window, String> {
    let zone_name = w.time_zone.as_deref().unwrap_or("UTC");
    let zone = jiff::tz::TimeZone::get(zone_name)
        .map_err(|_| format!("window.timeZone: {zone_name:?} is not a known IANA time zone"))?;
    let from = clock(&w.from).map_err(|e| format!("window.from: {e}"))?;
    let to = clock(&w.to).map_err(|e| format!("window.to: {e}"))?;
    if from == to {
        return Err("window.from and window.to must differ".into());
    }
    let days = match &w.days {
        None => [true; 7],
        Some(text) => days(text).map_err(|e| format!("window.days: {e}"))?,
    };
    let text = format!(
        "{} {}-{} {zone_name}",
        w.days.as_deref().unwrap_or("every day"),
        w.from,
        w.to
    );
    Ok(Window {
        days,
        from,
        to,
        zone,
        text,
    })
}

/// `HH:MM`, as minutes after midnight.
fn clock(text: &str) -> std::result::Result<u16, String> {
    let wrong = || format!("{text:?} is not a time like 09:00");
    let (h, m) = text.split_once(':').ok_or_else(wrong)?;
    if h.len() != 2 || m.len() != 2 {
        return Err(wrong());
    }
    let (h, m): (u16, u16) = (
        h.parse().map_err(|_| wrong())?,
        m.parse().map_err(|_| wrong())?,
    );
    if h > 23 || m > 59 {
        return Err(wrong());
    }
    Ok(h * 60 + m)
}

const DAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];

/// `Mon-Fri`, `Sat,Sun`, `Mon,Wed-Fri`: Monday first.
fn days(text: &str) -> std::result::Result<[bool; 7], String> {
    let day = |name: &str| {
        DAYS.iter()
            .position(|d| d.eq_ignore_ascii_case(name.trim()))
            .ok_or_else(|| format!("{:?} is not a day (Mon, Tue, ... Sun)", name.trim()))
    };
    let mut days = [false; 7];
    for part in text.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (day(a)?, day(b)?);
                // Fri-Mon wraps over the weekend.
                let mut d = a;
                loop {
                    days[d] = true;
                    if d == b {
                        break;
                    }
                    d = (d + 1) % 7;
                }
            }
            None => days[day(part)?] = true,
        }
    }
    Ok(days)
}

/// Where one instance is in a rollout of one revision.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "phase", rename_all = "camelCase")]
pub enum Progress {
    /// Not reached: its objects are the previous revision's.
    Pending,
    /// Its application was asked to release it (the release gate) at
    /// `since` (Unix seconds); it is written once it acknowledges.
    Requested {
        /// When.
        since: i64,
    },
    /// Written on the new revision at `since`, not healthy yet.
    Updating {
        /// When.
        since: i64,
    },
    /// Healthy on the new revision.
    Healthy,
    /// Not healthy within the deadline, or its release was not
    /// acknowledged in time.
    Failed {
        /// Why.
        reason: String,
    },
    /// Put back on the previous revision after a failure.
    RolledBack,
}

/// A rollout of one revision: what a loop keeps between passes (and across
/// restarts). Approvals belong to the revision: a new revision starts a
/// new state.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct State {
    /// The revision being rolled out.
    pub revision: String,
    /// Why it is paused (a failure, a person); `None` while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<String>,
    /// The waves a person approved for this revision.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub approved: BTreeSet<String>,
    /// Every instance that left `Pending`, by `blueprint/key`.
    #[serde(default)]
    pub instances: std::collections::BTreeMap<String, Progress>,
}

/// How an updating instance looks from the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Every object is healthy.
    Healthy,
    /// Not yet.
    Progressing,
    /// It cannot become healthy (a failed object).
    Failed(String),
}

/// What the world says, asked by [`State::step`].
pub trait World {
    /// The health of an instance written on the new revision.
    fn health(&self, instance: &str) -> Health;
    /// Whether the application acknowledged the release of `instance`.
    fn released(&self, instance: &str) -> bool;
    /// Whether a `condition` gate holds, and if not why; an error (the
    /// object cannot be read) keeps the gate closed.
    fn condition(&self, gate: &crate::api::ConditionGate) -> std::result::Result<bool, String>;
}

/// What one step decided.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Step {
    /// Instances to write on the new revision now, in order.
    pub update: Vec<String>,
    /// Instances whose release to request now (annotate their object).
    pub request: Vec<String>,
    /// Instances to put back on the previous revision.
    pub rollback: Vec<String>,
    /// What happened, for Events and logs, one line each.
    pub events: Vec<String>,
    /// The wave that waits, and why (a closed gate, the quorum of the one
    /// before); `None` when nothing waits.
    pub waiting: Option<(String, String)>,
    /// Every instance healthy on the new revision.
    pub done: bool,
}

impl State {
    /// A rollout of `revision` with nothing done yet.
    pub fn new(revision: &str) -> State {
        State {
            revision: revision.to_string(),
            ..State::default()
        }
    }

    /// Where `instance` is.
    pub fn progress(&self, instance: &str) -> &Progress {
        self.instances.get(instance).unwrap_or(&Progress::Pending)
    }

    /// Approves `wave` for `revision`: refused unless `revision` is the one
    /// being rolled out, so approving one never lets another through.
    pub fn approve(
        &mut self,
        strategy: &Strategy,
        wave: &str,
        revision: &str,
    ) -> std::result::Result<(), String> {
        if revision != self.revision {
            return Err(format!(
                "the rollout is of revision {}, not {revision}: an approval is for the revision it names",
                self.revision
            ));
        }
        if !strategy.waves.iter().any(|w| w.name == wave) {
            return Err(format!("the rollout has no wave {wave}"));
        }
        self.approved.insert(wave.to_string());
        Ok(())
    }

    /// Resumes a paused rollout: failed and rolled back instances are
    /// tried again.
    pub fn resume(&mut self) {
        self.paused = None;
        self.instances
            .retain(|_, p| !matches!(p, Progress::Failed { .. } | Progress::RolledBack));
    }

    /// Pauses the rollout for `reason`; nothing is written until it is
    /// resumed.
    pub fn pause(&mut self, reason: &str) {
        self.paused = Some(reason.to_string());
    }

    /// Aborts the rollout: every instance that left `Pending` goes back to
    /// the previous revision, and the rollout stays paused; resuming it
    /// starts again from the first wave. Returns the instances put back.
    pub fn abort(&mut self) -> Vec<String> {
        let mut back = Vec::new();
        for (id, progress) in &mut self.instances {
            if !matches!(progress, Progress::Pending | Progress::RolledBack) {
                *progress = Progress::RolledBack;
                back.push(id.clone());
            }
        }
        self.paused = Some("aborted: every instance is back on the previous revision; `kiln rollout resume` starts again from the first wave".into());
        back
    }

    /// One step of the rollout at `now` (Unix seconds) over `waves` (each
    /// wave's instances, `blueprint/key`, in update order): observes the
    /// updating instances, fails those past the deadline, and decides what
    /// to request, write and roll back. A caller does what the step says
    /// and records the state before it writes anything, so that a restart
    /// neither skips an instance nor updates one twice.
    pub fn step(
        &mut self,
        strategy: &Strategy,
        waves: &[Vec<String>],
        now: i64,
        world: &dyn World,
    ) -> Step {
        let mut step = Step::default();
        let deadline = i64::try_from(strategy.progress_deadline.as_secs()).unwrap_or(i64::MAX);
        if self.paused.is_none()
            && self.observe(now, deadline, world, &mut step)
            && strategy.on_failure == OnFailure::Rollback
        {
            // Every instance written on the new revision and not healthy
            // goes back; healthy ones and those not reached stay.
            for (id, progress) in &mut self.instances {
                if matches!(
                    progress,
                    Progress::Updating { .. } | Progress::Failed { .. }
                ) {
                    step.rollback.push(id.clone());
                    *progress = Progress::RolledBack;
                }
            }
            step.events.push(format!(
                "rolled back {} instances to the previous revision",
                step.rollback.len()
            ));
        }
        if let Some(reason) = &self.paused {
            step.waiting = Some((String::new(), format!("paused: {reason}")));
            return step;
        }
        for (wave, members) in strategy.waves.iter().zip(waves) {
            let open = self.gates_open(wave, now, world);
            let started = members
                .iter()
                .any(|m| !matches!(self.progress(m), Progress::Pending));
            if let Err(why) = open {
                step.waiting = Some((wave.name.clone(), why));
                break;
            }
            let limit = wave.max_concurrent.unwrap_or(members.len()).max(1);
            let mut busy = members
                .iter()
                .filter(|m| {
                    matches!(
                        self.progress(m),
                        Progress::Requested { .. } | Progress::Updating { .. }
                    )
                })
                .count();
            let handshake = wave.gates.iter().any(needs_release);
            let mut announced = started;
            // Released instances are written first: they hold a slot.
            for m in members {
                if matches!(self.progress(m), Progress::Requested { .. }) && world.released(m) {
                    self.instances
                        .insert(m.clone(), Progress::Updating { since: now });
                    step.update.push(m.clone());
                }
            }
            for m in members {
                if busy >= limit {
                    break;
                }
                if *self.progress(m) != Progress::Pending {
                    continue;
                }
                if !announced {
                    step.events.push(format!("wave {} started", wave.name));
                    announced = true;
                }
                if handshake {
                    self.instances
                        .insert(m.clone(), Progress::Requested { since: now });
                    step.request.push(m.clone());
                } else {
                    self.instances
                        .insert(m.clone(), Progress::Updating { since: now });
                    step.update.push(m.clone());
                }
                busy += 1;
            }
            let healthy = members
                .iter()
                .filter(|m| *self.progress(m) == Progress::Healthy)
                .count();
            let needed = wave.quorum.needed(members.len());
            if healthy < needed {
                step.waiting = Some((
                    wave.name.clone(),
                    format!(
                        "{healthy} of {needed} instances healthy (quorum {})",
                        wave.quorum
                    ),
                ));
                break;
            }
        }
        step.done = waves
            .iter()
            .flatten()
            .all(|m| *self.progress(m) == Progress::Healthy);
        step
    }

    /// Moves updating instances to healthy or failed; true when one
    /// failed (the rollout is paused then).
    fn observe(&mut self, now: i64, deadline: i64, world: &dyn World, step: &mut Step) -> bool {
        let mut failed = Vec::new();
        for (id, progress) in &mut self.instances {
            match progress {
                Progress::Updating { since } => match world.health(id) {
                    Health::Healthy => *progress = Progress::Healthy,
                    Health::Failed(reason) => failed.push((id.clone(), reason)),
                    Health::Progressing if now - *since > deadline => failed.push((
                        id.clone(),
                        format!("not healthy within progressDeadline ({deadline}s)"),
                    )),
                    Health::Progressing => {}
                },
                Progress::Requested { since } if now - *since > deadline && !world.released(id) => {
                    failed.push((
                        id.clone(),
                        format!("release not acknowledged within progressDeadline ({deadline}s)"),
                    ));
                }
                _ => {}
            }
        }
        if failed.is_empty() {
            return false;
        }
        for (id, reason) in &failed {
            step.events.push(format!("instance {id} failed: {reason}"));
            self.instances.insert(
                id.clone(),
                Progress::Failed {
                    reason: reason.clone(),
                },
            );
        }
        self.paused = Some(format!("instance {} failed: {}", failed[0].0, failed[0].1));
        true
    }

    fn gates_open(
        &self,
        wave: &Wave,
        now: i64,
        world: &dyn World,
    ) -> std::result::Result<(), String> {
        for gate in &wave.gates {
            self.gate_open(gate, &wave.name, now, world)?;
        }
        Ok(())
    }

    fn gate_open(
        &self,
        gate: &Gate,
        wave: &str,
        now: i64,
        world: &dyn World,
    ) -> std::result::Result<(), String> {
        match gate {
            Gate::Approval if self.approved.contains(wave) => Ok(()),
            Gate::Approval => Err(format!(
                "waiting for approval of wave {wave} for revision {}",
                self.revision
            )),
            Gate::Window(w) => {
                let at = jiff::Timestamp::from_second(now).map_err(|e| e.to_string())?;
                if w.is_open(at) {
                    Ok(())
                } else {
                    Err(format!("outside the window {w}"))
                }
            }
            Gate::Condition(c) => match world.condition(c) {
                Ok(true) => Ok(()),
                Ok(false) => Err(format!("condition {} is false", c.expression)),
                Err(e) => Err(format!("condition {}: {e}", c.expression)),
            },
            // Per instance: asked and answered in `step`.
            Gate::Release { .. } => Ok(()),
            Gate::AllOf(gates) => gates
                .iter()
                .try_for_each(|g| self.gate_open(g, wave, now, world)),
            Gate::AnyOf(gates) => {
                let mut why = Vec::new();
                for g in gates {
                    match self.gate_open(g, wave, now, world) {
                        Ok(()) => return Ok(()),
                        Err(e) => why.push(e),
                    }
                }
                Err(format!("none of: {}", why.join("; ")))
            }
        }
    }
}

/// Whether a `condition` gate's expression holds over `object` (as read
/// from the cluster); the error is one line.
pub fn holds(expression: &str, object: &serde_json::Value) -> std::result::Result<bool, String> {
    let compiled = crate::template::expression(expression)?;
    let value = compiled
        .eval(minijinja::context! { object => Value::from(minijinja::value::Serde(object)) })
        .map_err(|e| crate::template::one_line(&e))?;
    Ok(value.is_true())
}

/// Whether a gate asks each instance's application before writing it.
fn needs_release(gate: &Gate) -> bool {
    match gate {
        Gate::Release { .. } => true,
        Gate::AllOf(gates) | Gate::AnyOf(gates) => gates.iter().any(needs_release),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ApprovalGate, ReleaseGate};

    fn row(key: &str, tier: &str) -> Row {
        let mut values = serde_json::Map::new();
        values.insert("id".into(), key.into());
        values.insert("tier".into(), tier.into());
        Row {
            key: key.into(),
            active: true,
            values,
        }
    }

    fn wave(name: &str) -> WaveSpec {
        WaveSpec {
            name: name.into(),
            ..WaveSpec::default()
        }
    }

    fn strategy(waves: Vec<WaveSpec>) -> std::result::Result<Strategy, String> {
        Strategy::from_spec(
            &RolloutSpec {
                waves,
                progress_deadline: None,
                on_failure: OnFailure::Pause,
            },
            &[],
        )
    }

    #[test]
    fn waves_take_instances_in_order_and_the_last_takes_the_rest() {
        let rows: Vec<Row> = (0..40)
            .map(|i| {
                row(
                    &format!("t{i:02}"),
                    if i % 10 == 3 { "internal" } else { "pro" },
                )
            })
            .collect();
        let instances: Vec<(&str, &Row)> = rows.iter().map(|r| ("web", r)).collect();
        let s = strategy(vec![
            WaveSpec {
                instances: vec!["t13".into(), "web/t05".into()],
                ..wave("canary")
            },
            WaveSpec {
                select: Some("row.tier == 'internal'".into()),
                max_concurrent: Some(2),
                ..wave("early")
            },
            WaveSpec {
                percent: Some(10),
                ..wave("ten-percent")
            },
            wave("rest"),
        ])
        .unwrap();
        let waves = s.assign(&instances).unwrap();
        let keys = |w: &[Member<'_>]| w.iter().map(|m| m.row.key.clone()).collect::<Vec<_>>();
        assert_eq!(keys(&waves[0]), ["t05", "t13"]);
        // t13 went to the canary already.
        assert_eq!(keys(&waves[1]), ["t03", "t23", "t33"]);
        assert_eq!(waves[2].len(), 4, "10% of 40");
        assert_eq!(waves.iter().map(Vec::len).sum::<usize>(), 40);
        let again = s.assign(&instances).unwrap();
        assert_eq!(
            keys(&waves[2]),
            keys(&again[2]),
            "the draw is the same every time"
        );
        // Adding rows moves few instances between waves: the draw is by
        // hash, not position.
        let more: Vec<Row> = (40..44).map(|i| row(&format!("t{i:02}"), "pro")).collect();
        let mut bigger = instances.clone();
        bigger.extend(more.iter().map(|r| ("web", r)));
        let grown = s.assign(&bigger).unwrap();
        assert_eq!(grown[2].len(), 5);
        let kept = keys(&waves[2])
            .iter()
            .filter(|k| keys(&grown[2]).contains(k))
            .count();
        assert!(
            kept >= 3,
            "{:?} then {:?}",
            keys(&waves[2]),
            keys(&grown[2])
        );
    }

    #[test]
    fn a_wrong_strategy_is_named() {
        let cases: Vec<(Vec<WaveSpec>, &str)> = vec![
            (
                vec![wave("all"), wave("rest")],
                "wave all takes every remaining instance",
            ),
            (
                vec![WaveSpec {
                    percent: Some(10),
                    ..wave("ten")
                }],
                "the last wave (ten) must take every remaining instance",
            ),
            (
                vec![
                    WaveSpec {
                        percent: Some(10),
                        select: Some("true".into()),
                        ..wave("both")
                    },
                    wave("rest"),
                ],
                "wave both: a wave takes its instances by at most one of",
            ),
            (
                vec![
                    WaveSpec {
                        select: Some("row.tier ==".into()),
                        ..wave("early")
                    },
                    wave("rest"),
                ],
                "wave early: select:",
            ),
            (
                vec![WaveSpec {
                    quorum: Some(
                        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(
                            "120%".into(),
                        ),
                    ),
                    ..wave("rest")
                }],
                "wave rest: quorum \"120%\" must be a count (3) or a percentage (95%)",
            ),
            (
                vec![WaveSpec {
                    gates: vec![GateSpec {
                        approval: Some(ApprovalGate {}),
                        window: Some(WindowGate::default()),
                        ..GateSpec::default()
                    }],
                    ..wave("rest")
                }],
                "wave rest: gates[0]: a gate is exactly one of",
            ),
            (
                vec![WaveSpec {
                    gates: vec![GateSpec {
                        window: Some(WindowGate {
                            days: Some("Mon-Fry".into()),
                            from: "09:00".into(),
                            to: "16:00".into(),
                            time_zone: None,
                        }),
                        ..GateSpec::default()
                    }],
                    ..wave("rest")
                }],
                "wave rest: gates[0]: window.days: \"Fry\" is not a day",
            ),
            (
                vec![WaveSpec {
                    gates: vec![GateSpec {
                        any_of: Some(vec![LeafGateSpec {
                            release: Some(ReleaseGate {
                                resource: "db".into(),
                            }),
                            ..LeafGateSpec::default()
                        }]),
                        ..GateSpec::default()
                    }],
                    ..wave("rest")
                }],
                "wave rest: gates[0]: anyOf[0]: release.resource: no blueprint of the Pipeline has a resource \"db\"",
            ),
            (
                vec![wave("rest"), wave("rest")],
                "wave rest takes every remaining instance",
            ),
        ];
        for (waves, expected) in cases {
            let error = strategy(waves).unwrap_err();
            assert!(error.contains(expected), "{error:?} lacks {expected:?}");
        }
    }

    #[test]
    fn an_unknown_canary_key_and_a_failing_select_are_named() {
        let rows = [row("acme", "pro")];
        let instances: Vec<(&str, &Row)> = rows.iter().map(|r| ("web", r)).collect();
        let s = strategy(vec![
            WaveSpec {
                instances: vec!["acne".into()],
                ..wave("canary")
            },
            wave("rest"),
        ])
        .unwrap();
        let error = s.assign(&instances).unwrap_err().to_string();
        assert!(
            error.contains("wave canary: no instance has the key \"acne\""),
            "{error}"
        );
        let s = strategy(vec![
            WaveSpec {
                select: Some("row.teir == 'internal'".into()),
                ..wave("early")
            },
            wave("rest"),
        ])
        .unwrap();
        let error = s.assign(&instances).unwrap_err().to_string();
        assert!(
            error.contains("wave early: select, blueprint web, row key acme:"),
            "{error}"
        );
    }

    #[test]
    fn quorum_rounds_up() {
        assert_eq!(Quorum::Percent(95).needed(10), 10);
        assert_eq!(Quorum::Percent(95).needed(100), 95);
        assert_eq!(Quorum::Percent(0).needed(10), 0);
        assert_eq!(Quorum::Count(3).needed(2), 2);
        assert_eq!(quorum("3").unwrap(), Quorum::Count(3));
        assert!(quorum("-1").is_err());
    }

    #[test]
    fn a_window_opens_on_its_days_and_hours_in_its_zone() {
        let w = window(&WindowGate {
            days: Some("Mon-Fri".into()),
            from: "09:00".into(),
            to: "16:00".into(),
            time_zone: Some("Europe/Berlin".into()),
        })
        .unwrap();
        let at = |text: &str| text.parse::<jiff::Timestamp>().unwrap();
        // 2026-12-01 is a Tuesday; Berlin is UTC+1 in December.
        assert!(w.is_open(at("2026-12-01T08:00:00Z")));
        assert!(!w.is_open(at("2026-12-01T07:59:00Z")));
        assert!(!w.is_open(at("2026-12-01T15:00:00Z")));
        assert!(!w.is_open(at("2026-12-05T10:00:00Z")), "a Saturday");
        let night = window(&WindowGate {
            days: Some("Fri".into()),
            from: "22:00".into(),
            to: "02:00".into(),
            time_zone: None,
        })
        .unwrap();
        assert!(night.is_open(at("2026-12-04T23:00:00Z")), "Friday night");
        assert!(
            night.is_open(at("2026-12-05T01:59:00Z")),
            "and Saturday morning"
        );
        assert!(
            !night.is_open(at("2026-12-05T23:00:00Z")),
            "not Saturday night"
        );
        assert!(days("Fri-Mon").unwrap() == [true, false, false, false, true, true, true]);
        let error = window(&WindowGate {
            days: None,
            from: "9:00".into(),
            to: "16:00".into(),
            time_zone: Some("Mars/Olympus".into()),
        })
        .unwrap_err();
        assert!(
            error.contains("\"Mars/Olympus\" is not a known IANA time zone"),
            "{error}"
        );
    }

    /// A cluster in a test: an instance is healthy one step after it was
    /// written, unless it fails; releases and the condition as set.
    #[derive(Default)]
    struct Fleet {
        written: std::cell::RefCell<std::collections::BTreeMap<String, i64>>,
        now: std::cell::Cell<i64>,
        failing: BTreeSet<String>,
        stuck: BTreeSet<String>,
        released: std::cell::RefCell<BTreeSet<String>>,
    }

    impl World for Fleet {
        fn health(&self, instance: &str) -> Health {
            if self.failing.contains(instance) {
                return Health::Failed("Deployment web: ProgressDeadlineExceeded".into());
            }
            match self.written.borrow().get(instance) {
                Some(&at) if at < self.now.get() && !self.stuck.contains(instance) => {
                    Health::Healthy
                }
                _ => Health::Progressing,
            }
        }
        fn released(&self, instance: &str) -> bool {
            self.released.borrow().contains(instance)
        }
        fn condition(&self, _: &crate::api::ConditionGate) -> std::result::Result<bool, String> {
            Ok(true)
        }
    }

    impl Fleet {
        /// One step at `now`; what it wrote is recorded as written then.
        fn step(
            &self,
            state: &mut State,
            strategy: &Strategy,
            waves: &[Vec<String>],
            now: i64,
        ) -> Step {
            self.now.set(now);
            let step = state.step(strategy, waves, now, self);
            for id in &step.update {
                self.written.borrow_mut().insert(id.clone(), now);
            }
            for id in &step.rollback {
                self.written.borrow_mut().remove(id);
            }
            step
        }
    }

    fn ids(range: std::ops::Range<usize>) -> Vec<String> {
        range.map(|i| format!("web/i{i:02}")).collect()
    }

    #[test]
    fn waves_go_in_order_within_their_concurrency_until_every_instance_is_healthy() {
        let s = strategy(vec![
            WaveSpec {
                instances: vec!["i00".into()],
                ..wave("canary")
            },
            WaveSpec {
                percent: Some(20),
                max_concurrent: Some(2),
                ..wave("early")
            },
            WaveSpec {
                max_concurrent: Some(5),
                ..wave("rest")
            },
        ])
        .unwrap();
        let waves = vec![ids(0..1), ids(1..5), ids(5..20)];
        let fleet = Fleet::default();
        let mut state = State::new("r2");
        let mut first_write: std::collections::BTreeMap<String, i64> = Default::default();
        let mut done = false;
        for now in 0..40 {
            let step = fleet.step(&mut state, &s, &waves, now);
            for id in &step.update {
                assert!(
                    first_write.insert(id.clone(), now).is_none(),
                    "{id} written twice"
                );
            }
            for (wave, limit) in waves.iter().zip([1, 2, 5]) {
                let busy = wave
                    .iter()
                    .filter(|m| matches!(state.progress(m), Progress::Updating { .. }))
                    .count();
                assert!(busy <= limit, "step {now}: {busy} updating, limit {limit}");
            }
            if step.done {
                done = true;
                break;
            }
        }
        assert!(done, "{state:?}");
        assert_eq!(first_write.len(), 20, "every instance written once");
        for pair in waves.windows(2) {
            let last = pair[0].iter().map(|m| first_write[m]).max().unwrap();
            let next = pair[1].iter().map(|m| first_write[m]).min().unwrap();
            assert!(last < next, "a wave starts after the one before is healthy");
        }
        // Inside a wave, instances go in the order given.
        let order: Vec<i64> = waves[2].iter().map(|m| first_write[m]).collect();
        assert!(order.windows(2).all(|w| w[0] <= w[1]), "{order:?}");
    }

    #[test]
    fn a_failed_instance_rolls_back_exactly_the_updating_ones_and_pauses_until_resumed() {
        let mut s = strategy(vec![WaveSpec {
            max_concurrent: Some(3),
            ..wave("rest")
        }])
        .unwrap();
        s.on_failure = OnFailure::Rollback;
        let waves = vec![ids(0..9)];
        let mut fleet = Fleet::default();
        fleet.failing.insert("web/i04".into());
        fleet.stuck.insert("web/i05".into());
        let mut state = State::new("r2");
        let first = fleet.step(&mut state, &s, &waves, 0);
        assert_eq!(first.update, ids(0..3));
        let second = fleet.step(&mut state, &s, &waves, 1);
        assert_eq!(second.update, ids(3..6), "three healthy, three more");
        let third = fleet.step(&mut state, &s, &waves, 2);
        // i04 failed while i05 was still updating; i03 became healthy.
        assert_eq!(third.rollback, ["web/i04", "web/i05"]);
        assert_eq!(*state.progress("web/i03"), Progress::Healthy);
        assert!(third.update.is_empty());
        assert!(
            third
                .events
                .iter()
                .any(|e| e.contains("instance web/i04 failed")),
            "{:?}",
            third.events
        );
        assert!(state.paused.is_some());
        assert_eq!(
            *state.progress("web/i00"),
            Progress::Healthy,
            "healthy ones stay"
        );
        assert_eq!(
            *state.progress("web/i06"),
            Progress::Pending,
            "nothing outside is touched"
        );
        let paused = fleet.step(&mut state, &s, &waves, 3);
        assert!(paused.update.is_empty() && paused.rollback.is_empty());
        assert!(
            paused
                .waiting
                .unwrap()
                .1
                .starts_with("paused: instance web/i04 failed")
        );
        fleet.failing.clear();
        fleet.stuck.clear();
        state.resume();
        let resumed = fleet.step(&mut state, &s, &waves, 4);
        assert_eq!(
            resumed.update,
            ["web/i04", "web/i05", "web/i06"],
            "the rolled back ones are tried again first"
        );
        let mut done = false;
        for now in 5..20 {
            if fleet.step(&mut state, &s, &waves, now).done {
                done = true;
                break;
            }
        }
        assert!(done, "{state:?}");
    }

    #[test]
    fn an_instance_past_the_deadline_fails_and_pause_keeps_it_where_it_is() {
        let s = strategy(vec![wave("rest")]).unwrap();
        let waves = vec![ids(0..2)];
        let mut fleet = Fleet::default();
        fleet.stuck.insert("web/i01".into());
        let mut state = State::new("r2");
        fleet.step(&mut state, &s, &waves, 0);
        let early = fleet.step(&mut state, &s, &waves, 600);
        assert!(early.events.is_empty(), "{:?}", early.events);
        let late = fleet.step(&mut state, &s, &waves, 601);
        assert!(late.rollback.is_empty(), "Pause rolls nothing back");
        assert!(
            matches!(state.progress("web/i01"), Progress::Failed { reason } if reason.contains("progressDeadline")),
            "{state:?}"
        );
    }

    #[test]
    fn an_approval_opens_its_wave_for_its_revision_only() {
        let s = strategy(vec![
            WaveSpec {
                instances: vec!["i00".into()],
                ..wave("canary")
            },
            WaveSpec {
                gates: vec![GateSpec {
                    approval: Some(ApprovalGate {}),
                    ..GateSpec::default()
                }],
                ..wave("rest")
            },
        ])
        .unwrap();
        let waves = vec![ids(0..1), ids(1..4)];
        let fleet = Fleet::default();
        let mut state = State::new("r2");
        fleet.step(&mut state, &s, &waves, 0);
        let waiting = fleet.step(&mut state, &s, &waves, 1);
        assert!(waiting.update.is_empty());
        let (wave, why) = waiting.waiting.unwrap();
        assert_eq!(wave, "rest");
        assert!(
            why.contains("waiting for approval of wave rest for revision r2"),
            "{why}"
        );
        let error = state.approve(&s, "rest", "r1").unwrap_err();
        assert!(
            error.contains("the rollout is of revision r2, not r1"),
            "{error}"
        );
        assert!(fleet.step(&mut state, &s, &waves, 2).update.is_empty());
        assert!(state.approve(&s, "later", "r2").is_err());
        state.approve(&s, "rest", "r2").unwrap();
        assert_eq!(fleet.step(&mut state, &s, &waves, 3).update, ids(1..4));
        // A new revision starts without the approvals of the last.
        assert!(State::new("r3").approved.is_empty());
    }

    #[test]
    fn the_release_handshake_writes_an_instance_only_once_its_application_answers() {
        let s = Strategy::from_spec(
            &RolloutSpec {
                waves: vec![WaveSpec {
                    gates: vec![GateSpec {
                        release: Some(ReleaseGate {
                            resource: "config".into(),
                        }),
                        ..GateSpec::default()
                    }],
                    ..wave("rest")
                }],
                progress_deadline: Some("60s".into()),
                on_failure: OnFailure::Pause,
            },
            &[&serde_json::from_value(serde_json::json!({
                "source": "tenants",
                "resources": [{"id": "config", "template": "x"}],
            }))
            .unwrap()],
        )
        .unwrap();
        let waves = vec![ids(0..2)];
        let fleet = Fleet::default();
        let mut state = State::new("r2");
        let asked = fleet.step(&mut state, &s, &waves, 0);
        assert_eq!(asked.request, ids(0..2));
        assert!(
            asked.update.is_empty(),
            "nothing is written before the answer"
        );
        assert!(fleet.step(&mut state, &s, &waves, 10).update.is_empty());
        fleet.released.borrow_mut().insert("web/i01".into());
        assert_eq!(fleet.step(&mut state, &s, &waves, 20).update, ["web/i01"]);
        // i00 never answers: past the deadline it fails.
        fleet.step(&mut state, &s, &waves, 61);
        assert!(
            matches!(state.progress("web/i00"), Progress::Failed { reason } if reason.contains("release not acknowledged")),
            "{state:?}"
        );
    }

    #[test]
    fn a_closed_window_holds_its_wave() {
        let s = strategy(vec![WaveSpec {
            gates: vec![GateSpec {
                window: Some(WindowGate {
                    days: None,
                    from: "09:00".into(),
                    to: "10:00".into(),
                    time_zone: None,
                }),
                ..GateSpec::default()
            }],
            ..wave("rest")
        }])
        .unwrap();
        let waves = vec![ids(0..2)];
        let fleet = Fleet::default();
        let mut state = State::new("r2");
        let nine = "2026-12-01T09:30:00Z"
            .parse::<jiff::Timestamp>()
            .unwrap()
            .as_second();
        let closed = fleet.step(&mut state, &s, &waves, nine - 3600);
        assert!(closed.update.is_empty());
        assert!(
            closed
                .waiting
                .unwrap()
                .1
                .contains("outside the window every day 09:00-10:00 UTC")
        );
        assert_eq!(fleet.step(&mut state, &s, &waves, nine).update, ids(0..2));
    }
}
