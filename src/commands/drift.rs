//! `kiln drift`: changes under the render directory that Kiln did not make,
//! or with `--cluster`, live objects that differ from the rendered tree.

use kiln_render::diff::Report;
use kiln_render::git::history;
use kiln_render::tree::Summary;

use super::cluster::{ClusterArgs, TreeArgs};
use super::diff::DiffFormat;
use super::target;
use crate::Outcome;

/// Arguments of `kiln drift`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    tree: TreeArgs,
    /// Compare the tree (--dir, or --git at --rev) with the live cluster
    /// instead of the branch with Kiln's last commit.
    #[arg(long)]
    cluster: bool,
    #[command(flatten)]
    cluster_args: ClusterArgs,
    /// unified, stat, markdown or json (with --cluster: unified or json).
    #[arg(long, value_enum, default_value_t = DiffFormat::Unified)]
    format: DiffFormat,
    /// Exit 1 when there is drift.
    #[arg(long)]
    exit_code: bool,
}

pub fn run(args: &Args) -> anyhow::Result<Outcome> {
    if args.cluster {
        return cluster(args);
    }
    if args.tree.dir.is_some() || args.tree.rev.is_some() {
        anyhow::bail!("--dir and --rev go with --cluster");
    }
    let target = target::resolve(&args.tree.git, None)?;
    let path = target.options.path.as_str();
    let refname = target.refname()?;
    let branch = refname.short();
    let Some(drift) = target.drift()? else {
        if args.format == DiffFormat::Json {
            println!(
                "{}",
                serde_json::json!({"drift": false, "commits": [], "files": []})
            );
        } else {
            eprintln!(
                "no drift: {}/ on {branch} is what Kiln last committed",
                history::path_label(path)
            );
        }
        return Ok(Outcome::Clean);
    };
    let report = Report::new(&Summary::default(), &drift.changes);
    if args.format == DiffFormat::Json {
        let value = serde_json::json!({
            "drift": true,
            "last": drift.last,
            "commits": drift.commits,
            "files": report.files,
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        let since = drift
            .last
            .as_ref()
            .map_or("Kiln never committed here".to_string(), |r| {
                format!("since Kiln's commit {}", r.commit.short())
            });
        eprintln!(
            "drift under {}/ on {branch} ({since}): {}",
            history::path_label(path),
            drift.line()
        );
        for commit in &drift.commits {
            eprintln!(
                "  {} {} ({})",
                commit.commit.short(),
                commit.subject,
                commit.author
            );
        }
        let title = format!("Drift under `{}/` on `{branch}`", history::path_label(path));
        print!("{}", report.format(args.format.into(), &title));
    }
    Ok(if args.exit_code {
        Outcome::Differences
    } else {
        Outcome::Clean
    })
}

fn cluster(args: &Args) -> anyhow::Result<Outcome> {
    if !matches!(args.format, DiffFormat::Unified | DiffFormat::Json) {
        anyhow::bail!("--cluster reports drift as unified or json");
    }
    let desired = args.tree.desired()?;
    let options = args.cluster_args.options("default")?;
    let checked = desired.len();
    let drifted = super::runtime()?.block_on(async {
        let cluster = args.cluster_args.connect().await?;
        anyhow::Ok(kiln_sync::drift::detect(&cluster, desired, &options).await?)
    })?;
    if args.format == DiffFormat::Json {
        let value = serde_json::json!({"drift": !drifted.is_empty(), "objects": drifted});
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        print!("{}", kiln_sync::drift::unified(&drifted));
        eprintln!("{} of {checked} objects drifted", drifted.len());
    }
    Ok(if args.exit_code && !drifted.is_empty() {
        Outcome::Differences
    } else {
        Outcome::Clean
    })
}
