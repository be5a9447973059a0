//! `kiln history`: Kiln's commits on a branch, newest first.

use kiln_render::git::history::{self, Action};

use super::Format;
use super::target::{self, GitArgs};
use crate::Outcome;

/// Arguments of `kiln history`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    git: GitArgs,
    /// Show at most this many commits.
    #[arg(long, short = 'n', value_name = "N", default_value_t = 50)]
    limit: usize,
    /// Text (on stdout) or JSON.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

pub fn run(args: &Args) -> anyhow::Result<Outcome> {
    let target = target::resolve(&args.git, None)?;
    let path = target.options.path.as_str();
    let refname = target.refname()?;
    let records = target.history(args.limit)?;
    if args.format == Format::Json {
        println!("{}", serde_json::to_string_pretty(&records)?);
        return Ok(Outcome::Clean);
    }
    let pinned = matches!(
        records.first().map(|r| &r.action),
        Some(Action::Rollback { .. })
    );
    for (i, record) in records.iter().enumerate() {
        let what = match &record.action {
            Action::Render { .. } => "render",
            Action::Rollback { .. } if i == 0 && pinned => "rollback (pinned)",
            Action::Rollback { .. } => "rollback",
            Action::Resume => "resume",
        };
        println!("{}  {what:<17}  {}", record.commit.short(), record.subject);
        for line in record.body.lines().filter(|l| !l.is_empty()) {
            println!("{:14}{:19}{line}", "", "");
        }
    }
    if records.is_empty() {
        eprintln!(
            "no Kiln commits for {}/ on {}",
            history::path_label(path),
            refname.short()
        );
    }
    Ok(Outcome::Clean)
}
