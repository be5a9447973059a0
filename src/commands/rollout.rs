//! `kiln rollout`: a Pipeline's progressive rollout (`spec.rollout`).

use kiln_render::rollout::{Gate, Progress, Strategy, Take, Wave};
use kiln_sync::metrics::ROLLOUT_INSTANCE_PHASES;
use kiln_sync::rollout::{Command, Place, Stored};
use serde_json::{Value, json};

use super::{ConfigArgs, Format, target};
use crate::Outcome;

/// Arguments of `kiln rollout`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    verb: Verb,
}

#[derive(Debug, clap::Subcommand)]
enum Verb {
    /// Show the waves of the Pipeline's rollout as the rows are now: which
    /// instances each takes, in the order they are updated, with its
    /// concurrency, quorum and gates (a window says whether it is open).
    Plan(PlanArgs),
    /// Show where the rollout `kiln sync` runs is: the revision, each
    /// wave's instances pending, asked to release, updating, healthy,
    /// failed and rolled back, and what it waits for. With --git, from the
    /// branch's rollout commits alone (no cluster).
    #[command(mut_arg("files", |a| a.required(false).required_unless_present("controller")))]
    Status(StatusArgs),
    /// Pause the rollout: nothing more is updated until it is resumed.
    #[command(mut_arg("files", |a| a.required(false).required_unless_present("controller")))]
    Pause(StateArgs),
    /// Resume a paused rollout; failed and rolled back instances are tried
    /// again (after an abort, from the first wave).
    #[command(mut_arg("files", |a| a.required(false).required_unless_present("controller")))]
    Resume(StateArgs),
    /// Approve a wave's approval gate for the revision being rolled out.
    #[command(mut_arg("files", |a| a.required(false).required_unless_present("controller")))]
    Approve(ApproveArgs),
    /// Abort the rollout: every instance it reached goes back to the
    /// previous revision, and it stays paused.
    #[command(mut_arg("files", |a| a.required(false).required_unless_present("controller")))]
    Abort(StateArgs),
}

#[derive(Debug, clap::Args)]
struct StateArgs {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(flatten)]
    cluster: super::cluster::ClusterArgs,
    /// `text` (stdout) or `json` (stdout): the rollout's status.
    #[arg(long, value_enum, default_value = "text")]
    format: Format,
    /// The Pipeline object `kiln controller` runs, instead of -f: the
    /// request goes through its `kiln.dev/rollout-request` annotation and
    /// the status comes from its `status.rollout`.
    #[arg(long, value_name = "NS/NAME", conflicts_with = "files")]
    controller: Option<String>,
}

#[derive(Debug, clap::Args)]
struct StatusArgs {
    #[command(flatten)]
    state: StateArgs,
    #[command(flatten)]
    git: target::GitArgs,
}

#[derive(Debug, clap::Args)]
struct ApproveArgs {
    #[command(flatten)]
    state: StateArgs,
    /// The wave (default: the one waiting for approval).
    #[arg(long, value_name = "W")]
    wave: Option<String>,
    /// The revision approved (default: the one being rolled out); refused
    /// unless it is the one being rolled out.
    #[arg(long, value_name = "R")]
    revision: Option<String>,
}

#[derive(Debug, clap::Args)]
struct PlanArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// How many instances of each wave the text output names.
    #[arg(long, value_name = "N", default_value_t = 10)]
    show: usize,
    /// `text` (stdout) or `json` (stdout).
    #[arg(long, value_enum, default_value = "text")]
    format: Format,
}

pub fn run(args: &Args) -> anyhow::Result<Outcome> {
    let (state, asked) = match &args.verb {
        Verb::Plan(plan) => return run_plan(plan),
        Verb::Status(a) if a.git.repo.is_some() && a.state.controller.is_none() => {
            return status_from_git(a);
        }
        Verb::Status(a) => (&a.state, None),
        Verb::Pause(a) => (a, Some(Command::Pause)),
        Verb::Resume(a) => (a, Some(Command::Resume)),
        Verb::Abort(a) => (a, Some(Command::Abort)),
        Verb::Approve(a) => (
            &a.state,
            Some(Command::Approve {
                wave: a.wave.clone(),
                revision: a.revision.clone(),
            }),
        ),
    };
    match asked {
        _ if state.controller.is_some() => through_pipeline(state, asked),
        None => change(state, |_, _| Ok(None)),
        Some(asked) => change(state, |stored, strategy| {
            asked.apply(stored, strategy).map(Some)
        }),
    }
}

/// The Pipeline (`--pipeline`, or the only one) and its checked strategy.
fn strategy_of(
    config: &kiln_render::config::Config,
    wanted: Option<&str>,
) -> anyhow::Result<(
    kiln_render::config::Named<kiln_render::api::PipelineSpec>,
    Strategy,
)> {
    let Some(pipeline) = target::pipeline(config, wanted)?.cloned() else {
        anyhow::bail!("the configuration has no Pipeline: a rollout is a Pipeline's spec.rollout");
    };
    let Some(strategy) = Strategy::of(&pipeline, &config.blueprints_of(&pipeline))? else {
        anyhow::bail!(
            "Pipeline {} has no spec.rollout: every instance is updated in one pass",
            pipeline.name
        );
    };
    Ok((pipeline, strategy))
}

fn run_plan(args: &PlanArgs) -> anyhow::Result<Outcome> {
    let config = args.config.load()?;
    let (pipeline, strategy) = strategy_of(&config, args.config.pipeline.as_deref())?;
    let loaded = super::render::read(config, &args.config)?;
    let instances = loaded.instances();
    let waves = strategy.assign(&instances).map_err(|e| {
        anyhow::anyhow!(
            "{}: Pipeline {}: spec.rollout: {}",
            pipeline.file.display(),
            pipeline.name,
            e
        )
    })?;
    let now = jiff::Timestamp::now();
    let described: Vec<Value> = strategy
        .waves
        .iter()
        .zip(&waves)
        .map(|(wave, members)| {
            let keys: Vec<String> = members
                .iter()
                .map(|m| format!("{}/{}", m.blueprint, m.row.key))
                .collect();
            describe(wave, &keys, now)
        })
        .collect();
    let plan = json!({
        "pipeline": pipeline.name,
        "instances": instances.len(),
        "progressDeadline": format!("{}s", strategy.progress_deadline.as_secs()),
        "onFailure": format!("{:?}", strategy.on_failure),
        "waves": described,
    });
    match args.format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&plan)?),
        Format::Text => print_plan(&plan, args.show),
    }
    Ok(Outcome::Clean)
}

/// The controller's side: asks `command` of the Pipeline's rollout through
/// its annotation and waits (a minute at most) for the controller to say
/// what came of it in `status.rollout.request`; then shows
/// `status.rollout`.
fn through_pipeline(args: &StateArgs, command: Option<Command>) -> anyhow::Result<Outcome> {
    let reference = args.controller.as_deref().unwrap_or_default();
    let Some((namespace, name)) = reference.split_once('/') else {
        anyhow::bail!("--controller {reference:?}: must be NAMESPACE/NAME of a Pipeline");
    };
    let rollout = super::runtime()?.block_on(async {
        let cluster = args.cluster.connect().await?;
        let read = || kiln_sync::rollout::reported(&cluster, namespace, name);
        let Some(command) = command else {
            return anyhow::Ok(read().await?);
        };
        read().await?;
        let id = format!(
            "{:x}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        );
        let request = format!("{id} {}", command.text());
        kiln_sync::rollout::request(&cluster, namespace, name, &request).await?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let rollout = read().await?;
            if let Some(handled) = rollout
                .as_ref()
                .and_then(|r| r.request.as_ref())
                .filter(|h| h.id == id)
            {
                if !handled.done {
                    anyhow::bail!("Pipeline {reference}: rollout: {}", handled.message);
                }
                eprintln!("rollout: {}", handled.message);
                return Ok(rollout);
            }
            if std::time::Instant::now() > deadline {
                anyhow::bail!(
                    "Pipeline {reference}: the controller did not take the request {request:?} within a minute (is it running, and does its --selector take this Pipeline?)"
                );
            }
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        }
    })?;
    let Some(rollout) = rollout else {
        anyhow::bail!("Pipeline {reference}: the controller has not reported a rollout yet");
    };
    match args.format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&rollout)?),
        Format::Text => {
            println!(
                "Pipeline {reference}: revision {} (from {}): {}",
                rollout.revision,
                rollout.previous_revision.as_deref().unwrap_or("none"),
                rollout.phase
            );
            if let Some(wave) = &rollout.wave {
                println!("wave: {wave}");
            }
            if let Some(paused) = &rollout.paused {
                println!("paused: {paused}");
            }
            if let Some(waiting) = &rollout.waiting {
                println!("waiting: {waiting}");
            }
            let counts: Vec<String> = rollout
                .instances
                .iter()
                .filter(|(_, n)| **n > 0)
                .map(|(phase, n)| format!("{n} {phase}"))
                .collect();
            println!("instances: {}", counts.join(", "));
        }
    }
    Ok(Outcome::Clean)
}

/// Loads the Pipeline's strategy and the rollout's state, applies
/// `change` (a compare-and-swap; `Ok(None)` changes nothing), says what it
/// did and prints the status.
fn change(
    args: &StateArgs,
    change: impl Fn(&mut Stored, &Strategy) -> Result<Option<String>, String>,
) -> anyhow::Result<Outcome> {
    let config = args.config.load()?;
    let (pipeline, strategy) = strategy_of(&config, args.config.pipeline.as_deref())?;
    let options = args.cluster.options(&pipeline.name)?;
    let place = Place::of(&options.inventory_namespace, &options.inventory);
    let at = |e: &dyn std::fmt::Display| {
        anyhow::anyhow!(
            "{}: Pipeline {}: rollout: {e}",
            pipeline.file.display(),
            pipeline.name
        )
    };
    let stored = super::runtime()?.block_on(async {
        let cluster = args.cluster.connect().await?;
        let said = place
            .update(&cluster, |stored| change(stored, &strategy))
            .await
            .map_err(|e| at(&e))?;
        if let Some(line) = said {
            eprintln!("rollout: {line}");
        }
        let (stored, _) = place
            .load(&cluster)
            .await
            .map_err(|e| at(&e))?
            .ok_or_else(|| at(&"the rollout state is gone"))?;
        anyhow::Ok(stored)
    })?;
    let loaded = super::render::read(config, &args.config)?;
    let status = status(&pipeline.name, &strategy, &stored, &loaded.instances())?;
    match args.format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&status)?),
        Format::Text => print_status(&status),
    }
    Ok(Outcome::Clean)
}

/// `status --git`: the rollout as the branch's commits carry it. The
/// newest Kiln commit for the path with rollout trailers says where it
/// was at its last step; a later Kiln commit without them means it was
/// done.
fn status_from_git(args: &StatusArgs) -> anyhow::Result<Outcome> {
    use kiln_render::git::history;
    let config = args.state.config.load()?;
    let (pipeline, strategy) = strategy_of(&config, args.state.config.pipeline.as_deref())?;
    let target = target::resolve(&args.git, Some(&pipeline))?;
    let records = target.history(1000)?;
    let trailer = |r: &history::Record, key: &str| {
        r.trailers
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    };
    let Some((newest, record)) = records
        .iter()
        .enumerate()
        .find(|(_, r)| trailer(r, history::ROLLOUT).is_some())
    else {
        anyhow::bail!(
            "no rollout commit on {} for path {}: no rollout has gone through this branch",
            target.refname()?.short(),
            history::path_label(&target.options.path)
        );
    };
    let state: kiln_render::rollout::State =
        serde_json::from_str(&trailer(record, history::ROLLOUT_STATE).unwrap_or_default())
            .map_err(|e| {
                anyhow::anyhow!(
                    "commit {}: {}: {e}",
                    record.commit.short(),
                    history::ROLLOUT_STATE
                )
            })?;
    let loaded = super::render::read(config, &args.state.config)?;
    let instances = loaded.instances();
    let wave_name = trailer(record, history::ROLLOUT_WAVE).unwrap_or_default();
    let stored = Stored {
        current: kiln_sync::rollout::Revision {
            id: trailer(record, history::ROLLOUT).unwrap_or_default(),
            blueprints: Vec::new(),
        },
        previous: trailer(record, history::ROLLOUT_PREVIOUS).map(|id| {
            kiln_sync::rollout::Revision {
                id,
                blueprints: Vec::new(),
            }
        }),
        members: instances
            .iter()
            .map(|(b, r)| format!("{b}/{}", r.key))
            .collect(),
        wave: strategy
            .waves
            .iter()
            .position(|w| w.name == wave_name)
            .map_or(1, |i| i + 1),
        done: newest > 0,
        state,
        ..Stored::default()
    };
    let mut status = status(&pipeline.name, &strategy, &stored, &instances)?;
    status["commit"] = record.commit.as_str().into();
    match args.state.format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&status)?),
        Format::Text => {
            println!(
                "as of commit {}{}",
                record.commit.short(),
                if newest > 0 {
                    " (later commits render the rollout's revision everywhere)"
                } else {
                    ""
                }
            );
            print_status(&status);
        }
    }
    Ok(Outcome::Clean)
}

/// The rollout's status as JSON: the revisions, what it waits for, and
/// each wave's instances by phase.
fn status(
    pipeline: &str,
    strategy: &Strategy,
    stored: &Stored,
    instances: &[(&str, &kiln_render::source::Row)],
) -> anyhow::Result<Value> {
    let members: Vec<(&str, &kiln_render::source::Row)> = instances
        .iter()
        .filter(|(b, r)| stored.members.contains(&format!("{b}/{}", r.key)))
        .copied()
        .collect();
    let waves = strategy
        .assign_present(&members)
        .map_err(|e| anyhow::anyhow!("Pipeline {pipeline}: spec.rollout: {e}"))?;
    let mut failed = Vec::new();
    let mut rolled_back = Vec::new();
    let described: Vec<Value> = strategy
        .waves
        .iter()
        .zip(&waves)
        .map(|(wave, members)| {
            let mut counts: std::collections::BTreeMap<&str, u64> = ROLLOUT_INSTANCE_PHASES
                .iter()
                .map(|phase| (*phase, 0))
                .collect();
            for m in members {
                let id = format!("{}/{}", m.blueprint, m.row.key);
                let phase = match stored.state.progress(&id) {
                    _ if stored.done => "healthy",
                    Progress::Pending => "pending",
                    Progress::Requested { .. } => "requested",
                    Progress::Updating { .. } => "updating",
                    Progress::Healthy => "healthy",
                    Progress::Failed { reason } => {
                        failed.push(json!({"instance": id, "reason": reason}));
                        "failed"
                    }
                    Progress::RolledBack => {
                        rolled_back.push(id.clone());
                        "rolledBack"
                    }
                };
                *counts.entry(phase).or_default() += 1;
            }
            let needed = wave.quorum.needed(members.len());
            json!({
                "name": wave.name,
                "instances": members.len(),
                "healthyNeeded": needed,
                "maxConcurrent": wave.max_concurrent,
                "approved": stored.state.approved.contains(&wave.name),
                "counts": counts,
            })
        })
        .collect();
    let phase = if stored.done {
        "Done"
    } else if stored.state.paused.is_some() {
        "Paused"
    } else {
        "Progressing"
    };
    Ok(json!({
        "pipeline": pipeline,
        "revision": stored.current.id,
        "previousRevision": stored.previous.as_ref().map(|p| p.id.clone()),
        "phase": phase,
        "wave": if stored.done { strategy.waves.len() } else { stored.wave.max(1) },
        "paused": stored.state.paused,
        "waiting": stored.waiting.as_ref().map(|(w, why)| json!({"wave": w, "reason": why})),
        "instances": stored.members.len(),
        "waves": described,
        "failed": failed,
        "rolledBack": rolled_back,
    }))
}

fn print_status(status: &Value) {
    println!(
        "Pipeline {}: revision {} (from {}): {}",
        status["pipeline"].as_str().unwrap_or_default(),
        status["revision"].as_str().unwrap_or_default(),
        status["previousRevision"].as_str().unwrap_or("none"),
        status["phase"].as_str().unwrap_or_default()
    );
    if let Some(reason) = status["paused"].as_str() {
        println!("paused: {reason}");
    }
    if let Some(waiting) = status["waiting"].as_object() {
        let wave = waiting["wave"].as_str().unwrap_or_default();
        let reason = waiting["reason"].as_str().unwrap_or_default();
        if wave.is_empty() {
            println!("waiting: {reason}");
        } else {
            println!("waiting: wave {wave}: {reason}");
        }
    }
    for (i, wave) in status["waves"].as_array().into_iter().flatten().enumerate() {
        let counts = &wave["counts"];
        let mut parts = Vec::new();
        for phase in ROLLOUT_INSTANCE_PHASES {
            if let Some(n) = counts[phase].as_u64().filter(|n| *n > 0) {
                parts.push(format!("{n} {phase}"));
            }
        }
        let count = wave["instances"].as_u64().unwrap_or_default();
        println!(
            "wave {} {}: {count} {} ({}), {} healthy needed{}",
            i + 1,
            wave["name"].as_str().unwrap_or_default(),
            if count == 1 { "instance" } else { "instances" },
            if parts.is_empty() {
                "none".to_string()
            } else {
                parts.join(", ")
            },
            wave["healthyNeeded"],
            if wave["approved"] == true {
                ", approved"
            } else {
                ""
            }
        );
    }
    let back: Vec<&str> = status["rolledBack"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    if !back.is_empty() {
        println!("rolled back: {}", back.join(", "));
    }
    for f in status["failed"].as_array().into_iter().flatten() {
        println!(
            "failed: {}: {}",
            f["instance"].as_str().unwrap_or_default(),
            f["reason"].as_str().unwrap_or_default()
        );
    }
}

fn describe(wave: &Wave, keys: &[String], now: jiff::Timestamp) -> Value {
    let takes = match &wave.take {
        Take::Instances(k) => json!({"instances": k}),
        Take::Select(e) => json!({"select": e}),
        Take::Percent(p) => json!({"percent": p}),
        Take::Rest => json!({"rest": true}),
    };
    json!({
        "name": wave.name,
        "takes": takes,
        "count": keys.len(),
        "instances": keys,
        "maxConcurrent": wave.max_concurrent,
        "quorum": wave.quorum.to_string(),
        "healthyNeeded": wave.quorum.needed(keys.len()),
        "gates": wave.gates.iter().map(|g| gate(g, now)).collect::<Vec<_>>(),
    })
}

/// A gate as the plan shows it: what it is, and for a window whether it
/// is open now (the others depend on the rollout's state or the cluster).
fn gate(g: &Gate, now: jiff::Timestamp) -> Value {
    match g {
        Gate::Approval => json!({"approval": "needs `kiln rollout approve` for the revision"}),
        Gate::Window(w) => json!({"window": w.to_string(), "openNow": w.is_open(now)}),
        Gate::Condition(c) => json!({"condition": format!(
            "{} {} {}: {}",
            c.api_version,
            c.kind,
            c.namespace.as_ref().map_or(c.name.clone(), |n| format!("{n}/{}", c.name)),
            c.expression
        )}),
        Gate::Release { resource } => json!({"release": format!(
            "each instance's {resource} object acknowledges the update"
        )}),
        Gate::AllOf(gates) => {
            json!({"allOf": gates.iter().map(|g| gate(g, now)).collect::<Vec<_>>()})
        }
        Gate::AnyOf(gates) => {
            json!({"anyOf": gates.iter().map(|g| gate(g, now)).collect::<Vec<_>>()})
        }
    }
}

fn print_plan(plan: &Value, show: usize) {
    println!(
        "Pipeline {}: {} instances, progressDeadline {}, onFailure {}",
        plan["pipeline"].as_str().unwrap_or_default(),
        plan["instances"],
        plan["progressDeadline"].as_str().unwrap_or_default(),
        plan["onFailure"].as_str().unwrap_or_default()
    );
    for (i, wave) in plan["waves"].as_array().into_iter().flatten().enumerate() {
        let takes = match &wave["takes"] {
            Value::Object(m) => m
                .iter()
                .map(|(k, v)| match k.as_str() {
                    "rest" => "the rest".to_string(),
                    "percent" => format!("{v}%"),
                    _ => format!("{k} {v}"),
                })
                .collect::<String>(),
            _ => String::new(),
        };
        let concurrency = match wave["maxConcurrent"].as_u64() {
            Some(n) => format!("at most {n} at once"),
            None => "all at once".to_string(),
        };
        println!(
            "wave {} {}: {} ({takes}), {concurrency}, quorum {} ({} healthy)",
            i + 1,
            wave["name"].as_str().unwrap_or_default(),
            match wave["count"].as_u64() {
                Some(1) => "1 instance".to_string(),
                n => format!("{} instances", n.unwrap_or_default()),
            },
            wave["quorum"].as_str().unwrap_or_default(),
            wave["healthyNeeded"]
        );
        let keys: Vec<String> = wave["instances"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|k| k.as_str().map(str::to_string))
            .collect();
        if !keys.is_empty() {
            println!("  {}", kiln_render::abbreviate(&keys, show));
        }
        for g in wave["gates"].as_array().into_iter().flatten() {
            println!("  gate {}", gate_line(g));
        }
    }
}

fn gate_line(g: &Value) -> String {
    let Value::Object(m) = g else {
        return g.to_string();
    };
    let mut parts = Vec::new();
    for (kind, v) in m {
        match (kind.as_str(), v) {
            ("openNow", Value::Bool(open)) => {
                parts.push(if *open { "(open now)" } else { "(closed now)" }.to_string());
            }
            ("allOf" | "anyOf", Value::Array(inner)) => parts.push(format!(
                "{kind}: [{}]",
                inner.iter().map(gate_line).collect::<Vec<_>>().join("; ")
            )),
            (_, Value::String(s)) => parts.push(format!("{kind}: {s}")),
            (_, other) => parts.push(format!("{kind}: {other}")),
        }
    }
    parts.join(" ")
}
