//! `kiln resume`: end a rollback's pin so renders move the branch again.

use kiln_render::git::publish;

use super::target::{self, GitArgs};
use crate::Outcome;

/// Arguments of `kiln resume`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    git: GitArgs,
    /// The commit's author, "Name <email>".
    #[arg(long, value_name = "AUTHOR")]
    author: Option<String>,
}

pub fn run(args: &Args) -> anyhow::Result<Outcome> {
    let mut target = target::resolve(&args.git, None)?;
    target.options.author = args.author.clone();
    let published = publish::resume(&target.repo, &target.options)?;
    eprintln!(
        "resumed {} with commit {}: the next render moves it again",
        published.branch.short(),
        published.commit.as_ref().map_or("", |c| c.as_str())
    );
    Ok(Outcome::Clean)
}
