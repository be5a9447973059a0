//! `kiln diff`: render in memory and show what would change on the branch.

use kiln_render::diff::{self, Report};
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
    let path = target.options.path.as_str();
    let label = match &args.base {
        Some(rev) => rev.clone(),
        None => target.refname()?.short().to_string(),
    };
    let comparison = target
        .compare(args.base.as_deref(), &rendering.tree)
        .map_err(|e| match &args.base {
            Some(_) => anyhow::anyhow!("--base {e}"),
            None => e.into(),
        })?;
    let (changes, summary) = (comparison.changes, comparison.summary);
    let report = Report::new(&summary, &changes);
    let title = format!(
        "Kiln diff against `{label}` ({}/)",
        kiln_render::git::history::path_label(path)
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
