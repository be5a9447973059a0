//! One module per subcommand.

mod crds;
mod render;
mod validate;

use std::path::PathBuf;

use crate::Outcome;

/// The subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Render every active row into manifests: to a directory (--out) or stdout.
    Render(render::Args),
    /// Check a configuration: load it, compile every template, check the
    /// dependency graphs, render sample rows; report every error found.
    Validate(validate::Args),
    /// Print the CustomResourceDefinitions of Kiln's kinds as YAML.
    Crds(crds::Args),
}

impl Command {
    /// Runs the command.
    pub fn run(self) -> anyhow::Result<Outcome> {
        match self {
            Command::Render(args) => render::run(&args),
            Command::Validate(args) => validate::run(&args),
            Command::Crds(args) => crds::run(&args),
        }
    }
}

/// Where the configuration comes from, shared by every command that reads it.
#[derive(Debug, clap::Args)]
pub struct ConfigArgs {
    /// A YAML file or a directory of them (repeatable), as `kubectl -f`.
    #[arg(
        short = 'f',
        long = "filename",
        value_name = "FILE_OR_DIR",
        required = true
    )]
    pub files: Vec<PathBuf>,
    /// Render only these blueprints (repeatable); default: all.
    #[arg(long = "blueprint", value_name = "NAME")]
    pub blueprints: Vec<String>,
}

/// Output formats of commands that print a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// For people, on stderr.
    Text,
    /// For programs, on stdout.
    Json,
}

/// A runtime for the async parts (database drivers).
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}
