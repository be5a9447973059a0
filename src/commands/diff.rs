//! `kiln diff`: render in memory and show what would change on the branch.

use std::collections::BTreeMap;

use kiln_render::diff::{self, Report};
use kiln_render::repo::{self, Item, Node};
use kiln_render::tree::Summary;

use super::ConfigArgs;
use super::render::render_all;
use super::target::{self, GitArgs};
use crate::Outcome;

/// Arguments of `kiln diff`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(flatten)]
    git: GitArgs,
    /// Compare with this revision instead of the branch head.
    #[arg(long, value_name = "REV")]
    base: Option<String>,
    /// unified, stat, markdown (a pull request comment) or json.
    #[arg(long, value_enum, default_value_t = DiffFormat::Unified)]
    format: DiffFormat,
    /// Exit 1 when anything differs.
    #[arg(long)]
    exit_code: bool,
}

/// Output formats of `kiln diff` and `kiln drift`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DiffFormat {
    /// `diff -u` of every file.
    Unified,
    /// Files with lines added and removed.
    Stat,
    /// A report for a pull request comment.
    Markdown,
    /// For programs.
    Json,
}

impl From<DiffFormat> for diff::Format {
    fn from(format: DiffFormat) -> Self {
        match format {
            DiffFormat::Unified => diff::Format::Unified,
            DiffFormat::Stat => diff::Format::Stat,
            DiffFormat::Markdown => diff::Format::Markdown,
            DiffFormat::Json => diff::Format::Json,
        }
    }
}

pub fn run(args: &Args) -> anyhow::Result<Outcome> {
    let rendering = render_all(&args.config)?;
    let pipeline = rendering.pipeline(&args.config)?;
    let target = target::resolve(&args.git, pipeline)?;
    let repo = &target.repo;
    let path = target.options.path.as_str();
    let (base, label) = match &args.base {
        Some(rev) => {
            let commit = repo
                .git
                .revparse_single(rev)
                .and_then(|o| o.peel_to_commit())
                .map_err(|e| anyhow::anyhow!("--base {rev}: {}", e.message()))?;
            (Some(commit), rev.clone())
        }
        None => {
            let refname = repo.branch_ref(target.options.branch.as_deref())?;
            let label = refname.short().to_string();
            (repo.tip(&refname)?, label)
        }
    };
    let dir = repo.tree_at(base.as_ref(), path)?;
    let mut old = repo::owned(&repo.git, dir.as_ref())?;
    let node = Node::build(&rendering.tree)?;
    let new: BTreeMap<String, Item<'_>> = Item::Rendered(&node).entries()?;
    // What `render --emit` wrote is not rendered from the configuration;
    // a diff compares what is.
    old.remove(kiln_render::emit::DIR);
    let changes = repo::compare(&old, &new)?;
    let summary = Summary::of_instances(&repo::instances(&old)?, &repo::instances(&new)?);
    let report = Report::new(&summary, &changes);
    let title = format!(
        "Kiln diff against `{label}` ({}/)",
        kiln_render::history::path_label(path)
    );
    print!("{}", report.format(args.format.into(), &title));
    if args.format == DiffFormat::Unified || args.format == DiffFormat::Stat {
        eprintln!("{}", summary_line(&summary, &report));
    }
    Ok(if args.exit_code && !report.is_empty() {
        Outcome::Differences
    } else {
        Outcome::Clean
    })
}

fn summary_line(summary: &Summary, report: &Report) -> String {
    format!(
        "instances: {} added, {} changed, {} removed, {} unchanged; {} files differ",
        summary.added.len(),
        summary.changed.len(),
        summary.removed.len(),
        summary.unchanged,
        report.files.len()
    )
}
