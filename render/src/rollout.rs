//! A Pipeline's progressive rollout, settled: the strategy checked and
//! compiled from `spec.rollout`, and which wave each instance belongs to.
//! Running a rollout (the cluster, the state, the gates that read objects)
//! is the sync crate's; nothing here talks to a cluster or keeps state.

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
                        if !known {
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
        Some(text) => quorum(text)?,
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
                    quorum: Some("120%".into()),
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
}
