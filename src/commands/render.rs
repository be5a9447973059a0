//! `kiln render`: rows in, a tree of manifests out: to stdout, a directory,
//! or a commit on a Git branch.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context as _;
use kiln_render::api::PipelineSpec;
use kiln_render::config::{Config, Named};
use kiln_render::git::publish::{self, Inputs};
use kiln_render::git::repo;
use kiln_render::render;
use kiln_render::render::Rendered;
use kiln_render::tree::{self, Tree};

use super::target::{self, GitArgs};
use super::{ConfigArgs, Format, runtime};
use crate::Outcome;

/// Arguments of `kiln render`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    config: ConfigArgs,
    /// Write the tree to this directory, replacing what an earlier render
    /// wrote there; without it (or --git), the objects go to stdout as one
    /// YAML stream.
    #[arg(long, value_name = "DIR", conflicts_with = "repo")]
    out: Option<PathBuf>,
    #[command(flatten)]
    git: GitArgs,
    /// The commit message's first line (default: a summary of the change).
    #[arg(long, short = 'm', value_name = "M")]
    message: Option<String>,
    /// The commit's author, "Name <email>" (default: GIT_AUTHOR_NAME and
    /// GIT_AUTHOR_EMAIL, else the repository's user.name and user.email).
    #[arg(long, value_name = "AUTHOR")]
    author: Option<String>,
    /// Push the branch after committing (fast-forward only).
    #[arg(long)]
    push: bool,
    /// The remote to push to: a name or a URL.
    #[arg(long, value_name = "R", default_value = "origin", requires = "push")]
    remote: String,
    /// Replace changes under the render directory that Kiln did not make.
    #[arg(long)]
    overwrite_drift: bool,
    /// Let one render remove more instances than deletionGuard.maxPercent
    /// allows, or all of them.
    #[arg(long)]
    allow_mass_delete: bool,
    /// Commit Secrets that carry data in plain text.
    #[arg(long)]
    allow_plaintext_secrets: bool,
    /// Also write what ArgoCD or Flux need to deploy the tree, into
    /// `<path>/_kiln/` (repeatable).
    #[arg(long, value_enum, value_name = "TOOL")]
    emit: Vec<Emit>,
    /// The URL ArgoCD or Flux clones (default: the repository's `origin`
    /// remote, else the Pipeline's spec.git.url).
    #[arg(long, value_name = "URL")]
    repo_url: Option<String>,
    /// The summary: text on stderr, or JSON on stdout.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
    /// Render only the row with this key (repeatable) and print its
    /// objects: a template tried against real rows. `BLUEPRINT/KEY` picks
    /// one blueprint's instance.
    #[arg(long = "instance", value_name = "KEY", conflicts_with_all = ["out", "repo", "emit"])]
    instances: Vec<String>,
}

/// What `--emit` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Emit {
    /// An ApplicationSet with a Git directory generator over the instances.
    Argocd,
    /// A GitRepository and one Kustomization per blueprint.
    Flux,
}

/// A configuration rendered in memory.
pub struct Rendering {
    /// The configuration.
    pub config: Config,
    /// Every object.
    pub rendered: Rendered,
    /// The files.
    pub tree: Tree,
    /// Digests for trailers.
    pub inputs: Inputs,
}

impl Rendering {
    /// The Pipeline the configuration selects, if any.
    pub fn pipeline(&self, args: &ConfigArgs) -> anyhow::Result<Option<&Named<PipelineSpec>>> {
        target::pipeline(&self.config, args.pipeline.as_deref())
    }
}

/// A configuration loaded, compiled and read, not yet rendered.
pub struct Loaded {
    /// The configuration.
    pub config: Config,
    blueprints: Vec<render::Compiled>,
    rows: std::collections::BTreeMap<String, Vec<kiln_render::source::Row>>,
    /// Digests for trailers.
    pub inputs: Inputs,
}

/// Loads, compiles and reads every source.
pub fn load(args: &ConfigArgs) -> anyhow::Result<Loaded> {
    read(args.load()?, args)
}

/// Compiles `config`, loaded from `args`, and reads every source.
pub fn read(config: Config, args: &ConfigArgs) -> anyhow::Result<Loaded> {
    check_selection(&config, &args.blueprints)?;
    let mut selected = args.blueprints.clone();
    if selected.is_empty()
        && let Some(pipeline) = target::pipeline(&config, args.pipeline.as_deref())?
    {
        selected = pipeline.spec.blueprints.clone();
    }
    let blueprints = render::compile(&config, &selected)?;
    let started = std::time::Instant::now();
    let rows = runtime()?.block_on(async {
        let objects = super::cluster_objects(&blueprints, &config).await?;
        let objects = objects
            .as_ref()
            .map(|o| o as &dyn kiln_render::source::Objects);
        anyhow::Ok(render::read_sources(&blueprints, &config, None, objects).await?)
    })?;
    tracing::debug!(elapsed = ?started.elapsed(), "sources read");
    let inputs = Inputs::digest(&blueprints, &config, &rows);
    Ok(Loaded {
        config,
        blueprints,
        rows,
        inputs,
    })
}

impl Loaded {
    /// Every instance: each blueprint's active rows, as (blueprint, row).
    pub fn instances(&self) -> Vec<(&str, &kiln_render::source::Row)> {
        let mut instances = Vec::new();
        for blueprint in &self.blueprints {
            for row in self.rows.get(&blueprint.spec.source).into_iter().flatten() {
                if row.active {
                    instances.push((blueprint.name.as_str(), row));
                }
            }
        }
        instances
    }

    /// Keeps only the rows `wanted` names (`KEY` or `BLUEPRINT/KEY`); a name
    /// that matches no active row is an error.
    pub fn keep_instances(&mut self, wanted: &[String]) -> anyhow::Result<()> {
        let mut found = vec![false; wanted.len()];
        let sources: std::collections::BTreeMap<&str, Vec<&str>> =
            self.blueprints.iter().fold(Default::default(), |mut m, b| {
                m.entry(b.spec.source.as_str())
                    .or_default()
                    .push(b.name.as_str());
                m
            });
        for (source, rows) in &mut self.rows {
            let blueprints = sources.get(source.as_str()).cloned().unwrap_or_default();
            rows.retain(|row| {
                let mut keep = false;
                for (i, name) in wanted.iter().enumerate() {
                    let hit = blueprints.iter().any(|b| names_instance(name, b, &row.key));
                    if hit && row.active {
                        found[i] = true;
                        keep = true;
                    }
                }
                keep
            });
        }
        if let Some(i) = found.iter().position(|f| !f) {
            anyhow::bail!(
                "--instance {}: no active row has that key (in the sources of {})",
                wanted[i],
                self.blueprints
                    .iter()
                    .map(|b| format!("Blueprint {}", b.name))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        Ok(())
    }

    /// Renders every active row into the tree, which takes the objects'
    /// YAML (see [`tree::build_taking`]).
    pub fn render(self) -> anyhow::Result<Rendering> {
        self.render_remembering(None)
    }

    /// Renders every active row, taking from `memo` the instances whose
    /// inputs it holds (see [`kiln_render::memo`]), into the tree.
    pub fn render_remembering(
        self,
        memo: Option<&kiln_render::memo::Memo>,
    ) -> anyhow::Result<Rendering> {
        self.render_into(memo, Files::Take)
    }

    fn render_into(
        self,
        memo: Option<&kiln_render::memo::Memo>,
        files: Files,
    ) -> anyhow::Result<Rendering> {
        let started = std::time::Instant::now();
        let mut rendered =
            render::render_remembering(&self.blueprints, &self.config, &self.rows, true, memo)?;
        tracing::debug!(
            elapsed = ?started.elapsed(),
            reused = rendered.instances.iter().filter(|i| i.stored().is_some()).count(),
            "rendered"
        );
        let tree = match files {
            Files::Take => tree::build_taking(&mut rendered)?,
            Files::Copy => tree::build(&rendered)?,
            Files::None => Tree::default(),
        };
        tracing::debug!(elapsed = ?started.elapsed(), "tree built");
        Ok(Rendering {
            config: self.config,
            rendered,
            tree,
            inputs: self.inputs,
        })
    }
}

/// What the tree of a render holds.
#[derive(Debug, Clone, Copy)]
enum Files {
    /// The objects' YAML, taken from them.
    Take,
    /// A copy of the objects' YAML, which they keep (to be printed).
    Copy,
    /// Nothing: the objects are printed and nothing is written.
    None,
}

/// Whether `--instance NAME` names the instance `key` of `blueprint`.
fn names_instance(name: &str, blueprint: &str, key: &str) -> bool {
    name == key || name.split_once('/') == Some((blueprint, key))
}

/// Loads, compiles, reads every source and renders.
pub fn render_all(args: &ConfigArgs) -> anyhow::Result<Rendering> {
    load(args)?.render()
}

pub fn run(args: &Args) -> anyhow::Result<Outcome> {
    let config = args.config.load()?;
    // The Pipeline outlives the configuration, which rendering consumes.
    let pipeline = target::pipeline(&config, args.config.pipeline.as_deref())?.cloned();
    let pipeline = pipeline.as_ref();
    let git_target = args.git.repo.is_some()
        || (args.out.is_none() && pipeline.is_some_and(|p| p.spec.git.is_some()));
    if git_target {
        // Each wave would be its own commit: one commit of every instance
        // is what the strategy forbids.
        if let Some(refusal) = pipeline.and_then(kiln_render::rollout::not_run) {
            anyhow::bail!(refusal);
        }
        // Opening the repository and reading its instance memo take about
        // as long as reading the rows: both at once.
        let (loaded, opened) = std::thread::scope(|scope| {
            let opened = scope.spawn(|| open(args, pipeline));
            let loaded = read_kept(config, args);
            let opened = opened
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            (loaded, opened)
        });
        return commit(args, loaded?, opened?, pipeline);
    }
    let loaded = read_kept(config, args)?;
    // A directory that holds exactly what the last render of these inputs
    // wrote needs no render: the same tree would come out.
    let memo_key = out_memo_key(&loaded.inputs);
    if let Some(out) = &args.out
        && args.emit.is_empty()
        && let Some(summary) = tree::remembered(out, &memo_key)
    {
        tracing::debug!("the directory holds this render already");
        return report_out(args, out, &summary);
    }
    // Printed objects keep their YAML; the tree is needed only to be
    // written (or for `--emit`'s checks).
    let files = match (&args.out, args.emit.is_empty()) {
        (Some(_), _) => Files::Take,
        (None, false) => Files::Copy,
        (None, true) => Files::None,
    };
    let mut rendering = loaded.render_into(None, files)?;
    if !args.emit.is_empty() {
        let spec = pipeline.and_then(|p| p.spec.git.as_ref());
        let branch = args
            .git
            .branch
            .clone()
            .or_else(|| spec.and_then(|g| g.branch.clone()))
            .unwrap_or_else(|| "main".to_string());
        let path = args
            .git
            .path
            .clone()
            .or_else(|| spec.and_then(|g| g.path.clone()))
            .unwrap_or_default();
        emit(
            args,
            &mut rendering,
            pipeline,
            None,
            &branch,
            path.trim_matches('/'),
        )?;
    }
    let Some(out) = &args.out else {
        let mut stdout = std::io::stdout().lock();
        let shown = rendering.rendered.instances.iter().filter(|i| {
            args.instances.is_empty()
                || args
                    .instances
                    .iter()
                    .any(|name| names_instance(name, &i.blueprint, &i.key))
        });
        for object in shown.flat_map(|i| &i.objects) {
            super::to_stdout(stdout.write_all(b"---\n"))?;
            super::to_stdout(stdout.write_all(object.yaml.as_bytes()))?;
        }
        return Ok(Outcome::Clean);
    };
    let old = tree::read_dir(out)?;
    let summary = tree::Summary::between(&old, &rendering.tree);
    if !args.allow_mass_delete {
        publish::check_deletions(&summary, publish::max_delete_percent(pipeline))?;
    }
    tree::forget(out)?;
    tree::write_dir(out, &old, &rendering.tree)
        .with_context(|| format!("failed to write {}", out.display()))?;
    if args.emit.is_empty() {
        tree::remember(out, &memo_key, &rendering.tree);
    }
    report_out(args, out, &summary)
}

/// What a render of these inputs into a directory is remembered by.
fn out_memo_key(inputs: &Inputs) -> String {
    let mut key = inputs.config.clone();
    for (source, digest) in &inputs.sources {
        key.push_str(&format!(" {source}={digest}"));
    }
    key
}

fn report_out(
    args: &Args,
    out: &std::path::Path,
    summary: &tree::Summary,
) -> anyhow::Result<Outcome> {
    match args.format {
        Format::Text => eprintln!("rendered {}: {}", out.display(), summary.line()),
        Format::Json => println!("{}", serde_json::to_string_pretty(summary)?),
    }
    Ok(Outcome::Clean)
}

/// Adds the `--emit` files to the rendered tree.
fn emit(
    args: &Args,
    rendering: &mut Rendering,
    pipeline: Option<&Named<PipelineSpec>>,
    repo: Option<&repo::Repo>,
    branch: &str,
    path: &str,
) -> anyhow::Result<()> {
    let origin = repo.and_then(|r| r.remote_url("origin"));
    let from_pipeline = pipeline
        .and_then(|p| p.spec.git.as_ref())
        .and_then(|g| g.url.clone())
        .filter(|u| u.contains("://") || u.contains('@'));
    let Some(repo_url) = args.repo_url.clone().or(origin).or(from_pipeline) else {
        anyhow::bail!(
            "--emit needs the URL ArgoCD or Flux clones: pass --repo-url (or give the repository an origin remote)"
        );
    };
    let target = kiln_render::emit::Target {
        name: pipeline.map_or("render", |p| p.name.as_str()),
        repo_url: &repo_url,
        branch,
        path,
    };
    let argocd = args
        .emit
        .contains(&Emit::Argocd)
        .then(|| kiln_render::emit::argocd(&target));
    let flux = args
        .emit
        .contains(&Emit::Flux)
        .then(|| kiln_render::emit::flux(&target, &rendering.rendered.blueprints));
    kiln_render::emit::add(&mut rendering.tree, argocd, flux)?;
    Ok(())
}

/// The rows read, only of the instances `--instance` names when it does.
fn read_kept(config: Config, args: &Args) -> anyhow::Result<Loaded> {
    let mut loaded = read(config, &args.config)?;
    if !args.instances.is_empty() {
        loaded.keep_instances(&args.instances)?;
    }
    Ok(loaded)
}

/// The repository a render commits to, opened, and its instance memo.
struct Opened {
    target: target::Target,
    memo: kiln_render::memo::Memo,
}

fn open(args: &Args, pipeline: Option<&Named<PipelineSpec>>) -> anyhow::Result<Opened> {
    let target = target::resolve(&args.git, pipeline)?;
    let memo = publish::instance_memo(&target.repo, &target.options)?;
    Ok(Opened { target, memo })
}

fn commit(
    args: &Args,
    mut loaded: Loaded,
    opened: Opened,
    pipeline: Option<&Named<PipelineSpec>>,
) -> anyhow::Result<Outcome> {
    let Opened { mut target, memo } = opened;
    if !args.emit.is_empty() {
        let emitted = format!("emit {:?} {:?}", args.emit, args.repo_url);
        loaded.inputs = loaded.inputs.with(&emitted);
    }
    let checked_out = target::prepare_work_tree(&target)?;
    // Nothing that shapes the tree changed since Kiln's last render here:
    // the same tree would come out, so skip rendering it.
    if let Some(published) = publish::up_to_date(&target.repo, &target.options, &loaded.inputs)? {
        if args.push {
            target.repo.push(&args.remote, &published.branch)?;
        }
        return report(args, &published);
    }
    let mut rendering = loaded.render_remembering(Some(&memo))?;
    drop(memo);
    let rendering = &mut rendering;
    if !args.emit.is_empty() {
        let refname = target.repo.branch_ref(target.options.branch.as_deref())?;
        let branch = refname.short().to_string();
        let path = target.options.path.clone();
        emit(
            args,
            rendering,
            pipeline,
            Some(&target.repo),
            &branch,
            &path,
        )?;
    }
    let options = &mut target.options;
    options.message = args.message.clone();
    options.author = args.author.clone();
    options.overwrite_drift = args.overwrite_drift;
    options.allow_mass_delete = args.allow_mass_delete;
    if !args.allow_plaintext_secrets {
        publish::check_secrets(&rendering.rendered)?;
    }
    let repo = &target.repo;
    if checked_out {
        repo.check_clean(&options.path)?;
    }
    let started = std::time::Instant::now();
    let published = publish::publish(repo, &rendering.tree, &rendering.inputs, options)?;
    publish::remember_instances(repo, options, &rendering.rendered, &published);
    tracing::debug!(
        git_ms = started.elapsed().as_secs_f64() * 1000.0,
        "hashed, checked and committed"
    );
    if checked_out && published.commit.is_some() {
        repo.update_work_tree(&options.path)?;
    }
    if args.push {
        repo.push(&args.remote, &published.branch)?;
    }
    report(args, &published)
}

fn report(args: &Args, published: &publish::Published) -> anyhow::Result<Outcome> {
    let branch = published.branch.short();
    match args.format {
        Format::Text => match &published.commit {
            Some(commit) => eprintln!(
                "committed {} to {branch}{}: {}",
                commit.short(),
                if args.push {
                    format!(" and pushed to {}", args.remote)
                } else {
                    String::new()
                },
                published.summary.line()
            ),
            None => eprintln!("{branch} is up to date: nothing to commit"),
        },
        Format::Json => println!("{}", serde_json::to_string_pretty(published)?),
    }
    Ok(Outcome::Clean)
}

/// `--blueprint` must name blueprints that exist.
pub fn check_selection(config: &Config, selected: &[String]) -> anyhow::Result<()> {
    for name in selected {
        if !config.blueprints.contains_key(name) {
            anyhow::bail!("--blueprint {name}: no Blueprint of that name in the configuration");
        }
    }
    Ok(())
}
