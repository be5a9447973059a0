//! One module per subcommand.

mod apply;
mod cluster;
mod completions;
mod controller;
mod crds;
mod diff;
mod drift;
mod history;
mod render;
mod resume;
mod rollback;
mod rollout;
mod sync;
mod target;
mod validate;
mod watch;

use std::path::PathBuf;

use crate::Outcome;

/// The subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Render every active row into manifests: a commit on a Git branch
    /// (--git), a directory (--out) or stdout.
    Render(render::Args),
    /// Render in memory and show what would change on the branch.
    Diff(diff::Args),
    /// Show changes under the render directory that Kiln did not make, or
    /// (--cluster) live objects that differ from the tree.
    Drift(drift::Args),
    /// Apply a rendered tree (--dir or --git) to a cluster with Server-Side
    /// Apply: waves, policies, readiness, inventory and prune.
    Apply(apply::Args),
    /// Loop: poll sources, render, commit (--git), apply, correct drift.
    Sync(sync::Args),
    /// List Kiln's commits on a branch.
    History(history::Args),
    /// Restore an earlier render with a new commit and pin the branch there.
    Rollback(rollback::Args),
    /// End a rollback's pin.
    Resume(resume::Args),
    /// A Pipeline's progressive rollout: `plan` shows its waves.
    Rollout(rollout::Args),
    /// Check a configuration: load it, compile every template, check the
    /// dependency graphs, render sample rows; report every error found.
    Validate(validate::Args),
    /// Run in a cluster: follow Kiln's Pipelines, Blueprints and Sources,
    /// render and apply each Pipeline, report in its status and Events.
    Controller(controller::Args),
    /// Print the CustomResourceDefinitions of Kiln's kinds as YAML.
    Crds(crds::Args),
    /// Render again on every change of the configuration, its templates or
    /// file sources, and print what changed (the template author's loop).
    Watch(watch::Args),
    /// Print a completion script for a shell (bash, zsh, fish, powershell, elvish).
    Completions(completions::Args),
    /// Print kiln's man page (roff), e.g. `kiln man > kiln.1`.
    Man(completions::ManArgs),
}

impl Command {
    /// What is logged when KILN_LOG does not say: a long-running
    /// controller tells what it does; a command only what went wrong.
    pub fn default_log(&self) -> &'static str {
        match self {
            Command::Controller(_) => "info,kube=warn,sqlx::query=error",
            _ => "warn,sqlx::query=error",
        }
    }

    /// Whether progress bars help: long work, run by a person (the
    /// controller's output is a log; watch prints diffs).
    pub fn shows_progress(&self) -> bool {
        !matches!(
            self,
            Command::Controller(_)
                | Command::Watch(_)
                | Command::Completions(_)
                | Command::Man(_)
                | Command::Crds(_)
        )
    }

    /// Runs the command.
    pub fn run(self) -> anyhow::Result<Outcome> {
        match self {
            Command::Render(args) => render::run(&args),
            Command::Diff(args) => diff::run(&args),
            Command::Drift(args) => drift::run(&args),
            Command::Apply(args) => apply::run(&args),
            Command::Sync(args) => sync::run(&args),
            Command::History(args) => history::run(&args),
            Command::Rollback(args) => rollback::run(&args),
            Command::Resume(args) => resume::run(&args),
            Command::Rollout(args) => rollout::run(&args),
            Command::Validate(args) => validate::run(&args),
            Command::Crds(args) => crds::run(&args),
            Command::Controller(args) => controller::run(&args),
            Command::Watch(args) => watch::run(&args),
            Command::Completions(args) => completions::run(&args),
            Command::Man(args) => completions::man(&args),
        }
    }
}

/// An error as one line: the outermost context first, each cause after it
/// (unless it only repeats what is said).
pub fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain().map(ToString::to_string) {
        if line.contains(&cause) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&cause);
    }
    line
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
    /// Render only these blueprints (repeatable); default: the Pipeline's, else all.
    #[arg(long = "blueprint", value_name = "NAME")]
    pub blueprints: Vec<String>,
    /// The Pipeline to follow when the configuration has several.
    #[arg(long, value_name = "NAME")]
    pub pipeline: Option<String>,
    /// Template instructions one object may take, for every blueprint (in
    /// place of spec.limits.fuel).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub fuel: Option<u64>,
    /// Bytes of template output one object may take, for every blueprint
    /// (in place of spec.limits.maxObjectBytes).
    #[arg(long, value_name = "BYTES", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_object_bytes: Option<u64>,
    /// Bytes of template output a blueprint's objects may take in one
    /// render (in place of spec.limits.maxRenderBytes).
    #[arg(long, value_name = "BYTES", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_render_bytes: Option<u64>,
}

impl ConfigArgs {
    /// Loads the configuration, with the limits the flags set.
    pub fn load(&self) -> anyhow::Result<kiln_render::config::Config> {
        let mut config = kiln_render::config::Config::load(&self.files)?;
        let raised = kiln_render::api::RenderLimits {
            fuel: self.fuel,
            max_object_bytes: self.max_object_bytes,
            max_render_bytes: self.max_render_bytes,
        };
        if raised != kiln_render::api::RenderLimits::default() {
            for blueprint in config.blueprints.values_mut() {
                let limits = blueprint.spec.limits.take().unwrap_or_default();
                blueprint.spec.limits = Some(limits.overridden_by(&raised));
            }
        }
        Ok(config)
    }
}

/// Output formats of commands that print a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// For people, on stderr.
    Text,
    /// For programs, on stdout.
    Json,
}

/// What lists the Kubernetes objects `blueprints` read as rows, connected
/// through the kubeconfig (KUBECONFIG, ~/.kube/config, in-cluster) only
/// when one of their sources reads objects.
async fn cluster_objects(
    blueprints: &[kiln_render::render::Compiled],
    config: &kiln_render::config::Config,
) -> anyhow::Result<Option<kiln_sync::rows::ClusterObjects>> {
    let wants_cluster = blueprints.iter().any(|b| {
        config
            .sources
            .get(&b.spec.source)
            .is_some_and(|s| s.spec.kubernetes.is_some())
    });
    if !wants_cluster {
        return Ok(None);
    }
    let cluster = cluster::connect(None, None).await?;
    Ok(Some(kiln_sync::rows::ClusterObjects::new(cluster)))
}

/// A runtime for the async parts (database drivers).
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// The reader of stdout went away (`kiln render | head`): not an error to
/// report; the command ends as one ended by SIGPIPE does.
#[derive(Debug)]
pub struct StdoutClosed;

impl std::fmt::Display for StdoutClosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("stdout was closed")
    }
}

impl std::error::Error for StdoutClosed {}

/// A write to stdout's result: a closed pipe becomes [`StdoutClosed`].
pub fn to_stdout<T>(result: std::io::Result<T>) -> anyhow::Result<T> {
    result.map_err(|e| match e.kind() {
        std::io::ErrorKind::BrokenPipe => anyhow::Error::new(StdoutClosed),
        _ => anyhow::Error::new(e),
    })
}
