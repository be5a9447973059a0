//! `kiln apply`: apply a rendered tree to a cluster with Server-Side Apply.

use kiln_sync::apply;

use super::Format;
use super::cluster::{ClusterArgs, TreeArgs};
use crate::Outcome;

/// Arguments of `kiln apply`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    tree: TreeArgs,
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Print the plan (create, update, drift, skip, prune) and write nothing.
    #[arg(long)]
    dry_run: bool,
    /// Leave objects that left the tree in the cluster (and the inventory).
    #[arg(long)]
    no_prune: bool,
    /// Let this apply remove more of the inventory's instances than
    /// --max-delete-percent allows, or all of them.
    #[arg(long)]
    allow_mass_delete: bool,
    /// The share of the inventory's instances one apply may remove.
    #[arg(long, value_name = "PERCENT", default_value_t = kiln_render::git::publish::DEFAULT_MAX_DELETE_PERCENT,
          value_parser = clap::value_parser!(u32).range(0..=100))]
    max_delete_percent: u32,
    /// text (people) or json (programs), on stdout.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

pub fn run(args: &Args) -> anyhow::Result<Outcome> {
    let desired = args.tree.desired()?;
    let mut options = args.cluster.options("default")?;
    options.prune = !args.no_prune;
    options.allow_mass_delete = args.allow_mass_delete;
    options.max_delete_percent = args.max_delete_percent;
    super::runtime()?.block_on(async {
        let cluster = args.cluster.connect().await?;
        let prepared = apply::prepare(&cluster, desired, &options).await?;
        if args.dry_run {
            print_plan(&prepared.plan, args.format)?;
            return Ok(Outcome::Clean);
        }
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        let stopper = super::sync::stop_on_signal(stop_tx);
        let report = apply::execute(&cluster, prepared, &options, &stop).await?;
        stopper.abort();
        print_report(&report, args.format)?;
        if report.failed() {
            anyhow::bail!(
                "{} of {} objects failed",
                report.count(apply::Status::Failed),
                report.outcomes.len()
            );
        }
        Ok(Outcome::Clean)
    })
}

fn print_plan(plan: &kiln_sync::plan::Plan, format: Format) -> anyhow::Result<()> {
    let counts = plan.counts();
    match format {
        Format::Json => {
            let steps: Vec<serde_json::Value> = plan
                .steps
                .iter()
                .map(|s| {
                    serde_json::json!({
                        "wave": s.wave,
                        "action": s.action.to_string(),
                        "object": s.desired.identity.to_string(),
                        "owner": s.desired.owner.to_string(),
                    })
                })
                .collect();
            let prune: Vec<serde_json::Value> = plan
                .prune
                .iter()
                .map(|p| {
                    serde_json::json!({
                        "action": if p.retain { "retain" } else { "prune" },
                        "object": p.entry.identity.to_string(),
                        "owner": p.entry.owner.to_string(),
                    })
                })
                .collect();
            println!(
                "{}",
                serde_json::to_string_pretty(
                    &serde_json::json!({"counts": counts, "steps": steps, "prune": prune})
                )?
            );
        }
        Format::Text => {
            for line in plan.lines() {
                println!("{line}");
            }
            let counts: Vec<String> = counts.iter().map(|(k, v)| format!("{k} {v}")).collect();
            eprintln!("plan ({} waves): {}", plan.waves, counts.join(", "));
        }
    }
    Ok(())
}

fn print_report(report: &apply::Report, format: Format) -> anyhow::Result<()> {
    match format {
        Format::Json => {
            let outcomes: Vec<serde_json::Value> = report
                .outcomes
                .iter()
                .map(|o| {
                    serde_json::json!({
                        "status": format!("{:?}", o.status).to_lowercase(),
                        "object": o.object(),
                        "detail": o.detail,
                    })
                })
                .collect();
            println!(
                "{}",
                serde_json::to_string_pretty(
                    &serde_json::json!({"summary": report.summary(), "outcomes": outcomes})
                )?
            );
        }
        Format::Text => {
            for line in report.lines() {
                println!("{line}");
            }
            eprintln!("{}", report.summary());
        }
    }
    Ok(())
}
