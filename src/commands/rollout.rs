//! `kiln rollout`: a Pipeline's progressive rollout (`spec.rollout`).

use kiln_render::rollout::{Gate, Strategy, Take, Wave};
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
    match &args.verb {
        Verb::Plan(plan) => run_plan(plan),
    }
}

fn run_plan(args: &PlanArgs) -> anyhow::Result<Outcome> {
    let config = args.config.load()?;
    let Some(pipeline) = target::pipeline(&config, args.config.pipeline.as_deref())?.cloned()
    else {
        anyhow::bail!("the configuration has no Pipeline: a rollout is a Pipeline's spec.rollout");
    };
    let Some(strategy) = Strategy::of(&pipeline, &config.blueprints_of(&pipeline))? else {
        anyhow::bail!(
            "Pipeline {} has no spec.rollout: every instance is updated in one pass",
            pipeline.name
        );
    };
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
