//! `kiln drift`: changes under the render directory that Kiln did not make.

use kiln_render::diff::Report;
use kiln_render::history;
use kiln_render::tree::Summary;

use super::diff::DiffFormat;
use super::target::{self, GitArgs};
use crate::Outcome;

/// Arguments of `kiln drift`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    git: GitArgs,
    /// unified, stat, markdown or json.
    #[arg(long, value_enum, default_value_t = DiffFormat::Unified)]
    format: DiffFormat,
    /// Exit 1 when there is drift.
    #[arg(long)]
    exit_code: bool,
}

pub fn run(args: &Args) -> anyhow::Result<Outcome> {
    let target = target::resolve(&args.git, None)?;
    let repo = &target.repo;
    let path = target.options.path.as_str();
    let refname = repo.branch_ref(target.options.branch.as_deref())?;
    let branch = refname.trim_start_matches("refs/heads/");
    let tip = repo.tip(&refname)?;
    let last = history::last(tip.as_ref(), path)?;
    let Some(drift) = history::drift(repo, tip.as_ref(), path, last.as_ref())? else {
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
                format!("since Kiln's commit {}", &r.commit[..12])
            });
        eprintln!(
            "drift under {}/ on {branch} ({since}): {}",
            history::path_label(path),
            drift.line()
        );
        for commit in &drift.commits {
            eprintln!(
                "  {} {} ({})",
                &commit.commit[..12],
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
