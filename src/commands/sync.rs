//! `kiln sync`: the loop. Poll each source at its interval, render, commit
//! (with --git), apply, and put back what changes under Kiln's objects.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use kiln_render::config::Config;
use kiln_render::publish::{self, DEFAULT_MAX_DELETE_PERCENT, Inputs};
use kiln_render::source::{self, Row};
use kiln_render::tree::{self, Tree};
use kiln_render::{history, render};
use kiln_sync::apply::Options;
use kiln_sync::apply::{self, Status};
use kiln_sync::cluster::Cluster;
use kiln_sync::desired::{self, Desired};
use kiln_sync::inventory::Inventory;
use kiln_sync::metrics::{self, Metrics};
use kiln_sync::watch::Watches;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::ConfigArgs;
use super::cluster::ClusterArgs;
use super::render::check_selection;
use super::target::{self, GitArgs, Target};
use crate::Outcome;

/// How often a source is read when it does not say.
const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);

/// Arguments of `kiln sync`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(flatten)]
    git: GitArgs,
    #[command(flatten)]
    cluster: ClusterArgs,
    /// One pass (read, render, commit, apply), then exit: 2 when anything
    /// failed.
    #[arg(long)]
    once: bool,
    /// Report drift of live objects, do not put it back.
    #[arg(long)]
    detect_only: bool,
    /// Serve /metrics, /healthz and /readyz here, e.g. 127.0.0.1:9090.
    #[arg(long, value_name = "ADDR", env = "KILN_METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,
    /// Never delete objects that left the tree.
    #[arg(long)]
    no_prune: bool,
    /// Let one render remove more instances than deletionGuard.maxPercent
    /// allows, or all of them.
    #[arg(long)]
    allow_mass_delete: bool,
    /// Commit Secrets that carry data in plain text.
    #[arg(long)]
    allow_plaintext_secrets: bool,
    /// The commits' author, "Name <email>".
    #[arg(long, value_name = "AUTHOR")]
    author: Option<String>,
}

/// Sends `true` on SIGTERM or Ctrl-C: writes in flight finish, no new ones
/// start.
pub fn stop_on_signal(stop: watch::Sender<bool>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            match signal(SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = tokio::signal::ctrl_c() => {}
                    }
                }
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        tracing::warn!("stopping: finishing the writes in flight");
        let _ = stop.send(true);
    })
}

/// One source the loop polls.
struct Polled {
    name: String,
    interval: Duration,
    due: Instant,
}

/// What the loop keeps between passes.
struct State {
    rows: BTreeMap<String, Vec<Row>>,
    inputs: Option<Inputs>,
    tip: Option<String>,
    /// Whether a source was read since the last pass.
    read_any: bool,
    /// The last commit this loop made.
    committed: Option<String>,
    desired: Option<Vec<Desired>>,
    pinned_reported: bool,
}

pub fn run(args: &Args) -> anyhow::Result<Outcome> {
    let config = args.config.load()?;
    check_selection(&config, &args.config.blueprints)?;
    let pipeline = target::pipeline(&config, args.config.pipeline.as_deref())?.cloned();
    let mut selected = args.config.blueprints.clone();
    if selected.is_empty()
        && let Some(p) = &pipeline
    {
        selected = p.spec.blueprints.clone();
    }
    let blueprints = render::compile(&config, &selected)?;
    let git = if args.git.repo.is_some() || pipeline.as_ref().is_some_and(|p| p.spec.git.is_some())
    {
        let mut target = target::resolve(&args.git, pipeline.as_ref())?;
        target.options.author = args.author.clone();
        target.options.allow_mass_delete = args.allow_mass_delete;
        Some(target)
    } else {
        None
    };
    let max_delete = pipeline
        .as_ref()
        .and_then(|p| p.spec.deletion_guard.as_ref())
        .map_or(DEFAULT_MAX_DELETE_PERCENT, |g| g.max_percent);
    let mut options = args
        .cluster
        .options(pipeline.as_ref().map_or("default", |p| p.name.as_str()))?;
    options.detect_only = args.detect_only;
    options.allow_mass_delete = args.allow_mass_delete;
    options.max_delete_percent = max_delete;

    let mut polled = Vec::new();
    for name in blueprints
        .iter()
        .map(|b| b.spec.source.clone())
        .collect::<std::collections::BTreeSet<_>>()
    {
        let spec = &config.sources[&name];
        let interval = match &spec.spec.interval {
            Some(text) => source::parse_duration(text).map_err(|e| {
                anyhow::anyhow!("{}: Source {name}: spec.interval: {e}", spec.file.display())
            })?,
            None => DEFAULT_INTERVAL,
        };
        polled.push(Polled {
            name,
            interval: interval.max(Duration::from_secs(1)),
            due: Instant::now(),
        });
    }

    super::runtime()?.block_on(async move {
        let cluster = args.cluster.connect().await?;
        let metrics = Metrics::default();
        let server = match args.metrics_addr {
            Some(addr) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("--metrics-addr {addr}"))?;
                Some(tokio::spawn(metrics::serve(listener, metrics.clone())))
            }
            None => None,
        };
        let (stop_tx, mut stop) = watch::channel(false);
        let stopper = stop_on_signal(stop_tx);
        let (changed_tx, mut changed) = mpsc::channel(1);
        let mut watches = Watches::new(cluster.clone(), &options.inventory, changed_tx);
        let mut state = State {
            rows: BTreeMap::new(),
            inputs: None,
            tip: None,
            read_any: false,
            committed: None,
            desired: None,
            pinned_reported: false,
        };
        let result = loop {
            // Read the sources that are due; one that fails keeps its last rows.
            let mut failures = Vec::new();
            for p in polled.iter_mut().filter(|p| p.due <= Instant::now()) {
                p.due = Instant::now() + p.interval;
                match source::read(&config.sources[&p.name], None).await {
                    Ok(rows) => {
                        metrics.source_rows(&p.name, rows.len());
                        state.rows.insert(p.name.clone(), rows);
                        state.read_any = true;
                    }
                    Err(e) => {
                        metrics.source_error(&p.name);
                        failures.push(e.to_string());
                    }
                }
            }
            if args.once && !failures.is_empty() {
                break Err(anyhow::anyhow!(failures.join("; ")));
            }
            for failure in &failures {
                eprintln!("error: {failure}; keeping its last rows and pruning nothing");
            }
            let mut degraded = !failures.is_empty();
            let pass = pass(
                args,
                &config,
                &blueprints,
                git.as_ref(),
                (&cluster, &options),
                &mut state,
                &metrics,
            )
            .await;
            let desired = match pass {
                Ok(()) => state.desired.clone(),
                Err(e) if args.once => break Err(e),
                Err(e) => {
                    eprintln!("error: {e:#}; keeping the last desired state");
                    degraded = true;
                    state.desired.clone()
                }
            };
            if let Some(desired) = desired {
                options.prune = !args.no_prune && !degraded;
                let started = std::time::Instant::now();
                let count = desired.len();
                match apply::apply(&cluster, desired.clone(), &options, &stop).await {
                    Ok(report) => {
                        metrics.applied(count, started.elapsed(), &report);
                        for line in report.lines() {
                            println!("{line}");
                        }
                        if report.lines().next().is_some() || args.once {
                            eprintln!("sync: {}", report.summary());
                        }
                        if args.once {
                            break if report.failed() {
                                Err(anyhow::anyhow!(
                                    "{} objects failed",
                                    report.count(Status::Failed)
                                ))
                            } else {
                                Ok(())
                            };
                        }
                    }
                    Err(e) if args.once => break Err(e.into()),
                    Err(e) => eprintln!("error: {e}"),
                }
                if let Err(e) = watches.cover(&desired).await {
                    tracing::warn!("cannot watch: {e}");
                }
            } else if args.once {
                break Err(anyhow::anyhow!("nothing to apply: no source has been read"));
            }
            if *stop.borrow() {
                break Ok(());
            }
            let next = polled
                .iter()
                .map(|p| p.due)
                .min()
                .unwrap_or_else(|| Instant::now() + DEFAULT_INTERVAL);
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {}
                Some(()) = changed.recv() => {
                    // Let a burst of changes settle into one pass.
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    while changed.try_recv().is_ok() {}
                }
                _ = stop.changed() => {}
            }
            if *stop.borrow() {
                break Ok(());
            }
        };
        stopper.abort();
        if let Some(server) = server {
            server.abort();
        }
        result.map(|()| Outcome::Clean)
    })
}

/// Renders when the rows changed, commits when there is a repository, and
/// settles `state.desired`: the branch's tree with --git (so a rollback's
/// pin holds), else the render.
async fn pass(
    args: &Args,
    config: &Config,
    blueprints: &[render::Compiled],
    git: Option<&Target>,
    (cluster, options): (&Cluster, &Options),
    state: &mut State,
    metrics: &Metrics,
) -> anyhow::Result<()> {
    if state.rows.len()
        < blueprints
            .iter()
            .map(|b| &b.spec.source)
            .collect::<std::collections::BTreeSet<_>>()
            .len()
    {
        anyhow::bail!("not every source has been read yet");
    }
    // Rows not read again since the last render cannot have changed: a pass
    // started by a watch need not hash them.
    let read_any = std::mem::take(&mut state.read_any);
    let inputs = (read_any || state.inputs.is_none())
        .then(|| Inputs::digest(blueprints, config, &state.rows))
        .filter(|inputs| state.inputs.as_ref() != Some(inputs));
    if let Some(inputs) = inputs {
        let started = std::time::Instant::now();
        let rendered =
            tokio::task::block_in_place(|| render::render(blueprints, config, &state.rows, true))?;
        match git {
            Some(target) => {
                let tree = tree::build(&rendered)?;
                metrics.rendered(started.elapsed());
                if !args.allow_plaintext_secrets {
                    publish::check_secrets(&rendered)?;
                }
                tokio::task::block_in_place(|| commit(target, &tree, &inputs, state))?;
            }
            None => {
                metrics.rendered(started.elapsed());
                let desired = desired::from_rendered(&rendered)?;
                // The guard compares with the inventory, not with the last
                // render: it holds across restarts, and a refused render
                // keeps the last desired state of this process (if any).
                if !args.no_prune && !args.allow_mass_delete {
                    let inventory =
                        Inventory::read(cluster, &options.inventory_namespace, &options.inventory)
                            .await?;
                    kiln_sync::guard::check(
                        &options.inventory,
                        &inventory.entries,
                        &desired,
                        options.max_delete_percent,
                    )?;
                }
                state.desired = Some(desired);
            }
        }
        state.inputs = Some(inputs);
    }
    if let Some(target) = git {
        tokio::task::block_in_place(|| read_tip(target, state))?;
    }
    Ok(())
}

/// Commits the render unless a rollback pins the branch.
fn commit(target: &Target, tree: &Tree, inputs: &Inputs, state: &mut State) -> anyhow::Result<()> {
    let repo = &target.repo;
    let refname = repo.branch_ref(target.options.branch.as_deref())?;
    let tip = repo.tip(&refname)?;
    if let Some(pin) = history::pin(tip.as_ref(), &target.options.path)? {
        if !state.pinned_reported {
            eprintln!(
                "{} is pinned by rollback commit {}: applying it and committing nothing until `kiln resume`",
                refname.trim_start_matches("refs/heads/"),
                &pin.commit[..12]
            );
            state.pinned_reported = true;
        }
        return Ok(());
    }
    state.pinned_reported = false;
    // As `kiln render --git` does: never commit over someone's uncommitted
    // edit of a checked-out work tree (the update after the commit would
    // discard it).
    if target.recover_work_tree()? {
        repo.check_clean(&target.options.path)?;
    }
    let published = publish::publish(repo, tree, inputs, &target.options)?;
    state.committed = published.commit.clone();
    if let Some(commit) = &published.commit {
        eprintln!(
            "committed {} to {}: {}",
            &commit[..12],
            published.branch.trim_start_matches("refs/heads/"),
            published.summary.line()
        );
        if repo.checked_out(&published.branch) {
            repo.update_work_tree(&target.options.path)?;
        }
    }
    Ok(())
}

/// Reads the branch's tree when its tip moved (a render, a rollback, a
/// resume, someone else's commit).
fn read_tip(target: &Target, state: &mut State) -> anyhow::Result<()> {
    let repo = &target.repo;
    let refname = repo.branch_ref(target.options.branch.as_deref())?;
    let Some(tip) = repo.tip(&refname)? else {
        return Ok(());
    };
    let id = tip.id().to_string();
    if state.tip.as_deref() == Some(id.as_str()) && state.desired.is_some() {
        return Ok(());
    }
    let Some(dir) = repo.tree_at(Some(&tip), &target.options.path)? else {
        return Ok(());
    };
    let tree = repo.read_tree(&dir)?;
    state.desired = Some(desired::from_tree(&tree)?);
    // Someone else moved the branch (a rollback, a resume): what was last
    // rendered says nothing about it, so the next pass renders again.
    if state.tip.is_some() && state.committed.as_deref() != Some(id.as_str()) {
        state.inputs = None;
    }
    state.tip = Some(id);
    Ok(())
}
