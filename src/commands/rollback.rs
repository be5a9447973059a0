//! `kiln rollback`: restore an earlier render and pin the branch there.

use kiln_render::git::publish;

use super::target::{self, GitArgs};
use crate::Outcome;

/// Arguments of `kiln rollback`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    git: GitArgs,
    /// The Kiln render or rollback commit to restore.
    #[arg(long, value_name = "REV")]
    to: String,
    /// The commit's author, "Name <email>".
    #[arg(long, value_name = "AUTHOR")]
    author: Option<String>,
}

pub fn run(args: &Args) -> anyhow::Result<Outcome> {
    let mut target = target::resolve(&args.git, None)?;
    target.options.author = args.author.clone();
    let repo = &target.repo;
    let checked_out = target::prepare_work_tree(&target)?;
    if checked_out {
        repo.check_clean(&target.options.path)?;
    }
    let published = publish::rollback(repo, &target.options, &args.to)?;
    if checked_out {
        repo.update_work_tree(&target.options.path)?;
    }
    let branch = published.branch.short();
    eprintln!(
        "rolled back {branch} to {} with commit {}; renders are refused until `kiln resume`",
        args.to,
        published.commit.as_ref().map_or("", |c| c.as_str())
    );
    Ok(Outcome::Clean)
}
