//! Where Git commands work: the repository, branch and directory from flags,
//! else from the selected Pipeline's `spec.git`.

use std::path::PathBuf;

use anyhow::bail;
use kiln_render::api::PipelineSpec;
use kiln_render::config::{Config, Named};
use kiln_render::git::publish::Options;
use kiln_render::git::repo::{CommitId, Repo};

/// The repository, branch and directory.
#[derive(Debug, Clone, clap::Args)]
pub struct GitArgs {
    /// The Git repository, bare or not (default: the Pipeline's spec.git.url).
    #[arg(long = "git", value_name = "REPO", env = "KILN_GIT")]
    pub repo: Option<PathBuf>,
    /// The branch (default: the Pipeline's, else the one HEAD names).
    #[arg(long, value_name = "B")]
    pub branch: Option<String>,
    /// The directory inside the repository (default: the Pipeline's, else the root).
    #[arg(long, value_name = "P")]
    pub path: Option<String>,
}

pub use kiln_render::git::publish::Target;

/// Prepares the target's work tree (see [`Target::prepare_work_tree`]) and
/// says what it brought up to date. Returns whether the branch is checked
/// out.
pub fn prepare_work_tree(target: &Target) -> anyhow::Result<bool> {
    let work_tree = target.prepare_work_tree()?;
    if let Some((files, commit)) = &work_tree.recovered {
        let place = Place::of(target);
        eprintln!("{}", place.recovered(*files, commit));
    }
    Ok(work_tree.checked_out)
}

/// Where a target commits, for messages.
#[derive(Debug, Clone, Default)]
pub struct Place {
    location: PathBuf,
    path: String,
    branch: String,
}

impl Place {
    /// The target's repository, path and branch.
    pub fn of(target: &Target) -> Place {
        Place {
            location: target.repo.location.clone(),
            path: target.options.path.clone(),
            branch: target
                .refname()
                .map(|b| b.short().to_string())
                .unwrap_or_default(),
        }
    }

    /// What a person reads when Kiln finished an interrupted checkout.
    pub fn recovered(&self, files: usize, commit: &CommitId) -> String {
        format!(
            "{}: brought {files} files under {}/ up to Kiln's commit {} on {}: a render was stopped before the work tree followed it",
            self.location.display(),
            kiln_render::git::history::path_label(&self.path),
            commit.short(),
            self.branch
        )
    }
}

/// The Pipeline a command follows: the one named, else the only one.
pub fn pipeline<'c>(
    config: &'c Config,
    name: Option<&str>,
) -> anyhow::Result<Option<&'c Named<PipelineSpec>>> {
    match name {
        Some(name) => match config.pipelines.get(name) {
            Some(p) => Ok(Some(p)),
            None => bail!("--pipeline {name}: no Pipeline of that name in the configuration"),
        },
        None if config.pipelines.len() > 1 => bail!(
            "the configuration has {} Pipelines ({}); name one with --pipeline",
            config.pipelines.len(),
            config
                .pipelines
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        ),
        None => Ok(config.pipelines.values().next()),
    }
}

/// Opens the repository and settles branch and path.
pub fn resolve(args: &GitArgs, pipeline: Option<&Named<PipelineSpec>>) -> anyhow::Result<Target> {
    let spec = pipeline.and_then(|p| p.spec.git.as_ref());
    let repo = match (&args.repo, spec.and_then(|g| g.url.as_deref())) {
        (Some(repo), _) => repo.clone(),
        (None, Some(url)) if url.contains("://") || url.contains('@') => bail!(
            "Pipeline spec.git.url {url} is remote: pass --git with a local clone and --push to publish to it"
        ),
        (None, Some(url)) => pipeline
            .map(|p| p.resolve(url))
            .unwrap_or_else(|| url.into()),
        (None, None) => bail!("no repository: pass --git REPO or set a Pipeline's spec.git.url"),
    };
    let path = args
        .path
        .clone()
        .or_else(|| spec.and_then(|g| g.path.clone()))
        .unwrap_or_default();
    let path = normalise(&path)?;
    let options = Options {
        branch: args
            .branch
            .clone()
            .or_else(|| spec.and_then(|g| g.branch.clone())),
        path,
        max_delete_percent: kiln_render::git::publish::max_delete_percent(pipeline),
        ..Options::default()
    };
    Ok(Target {
        repo: Repo::open(&repo)?,
        options,
        remote: None,
    })
}

/// `a//b/` → `a/b`; `.` and `/` → the root; `..` is refused.
fn normalise(path: &str) -> anyhow::Result<String> {
    kiln_render::git::publish::normalise_path(path).map_err(|e| anyhow::anyhow!("--path {e}"))
}
