//! `kiln sync`: the loop around [`Reconciler`]'s pass. Poll each source at
//! its interval, pass, and pass again when Kiln's objects change; stop on a
//! signal; say what happened.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use kiln_render::render;
use kiln_sync::apply::Status;
use kiln_sync::metrics::{self, Metrics};
use kiln_sync::reconcile::{DEFAULT_INTERVAL, Event, Polled, Reconciler, Settings};
use kiln_sync::rows::{self, ClusterObjects};
use kiln_sync::watch::Watches;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::ConfigArgs;
use super::cluster::ClusterArgs;
use super::render::check_selection;
use super::target::{self, GitArgs};
use crate::Outcome;

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
    let settings = settings(args, pipeline.as_ref())?;
    let mut polled = Polled::all(&config, &blueprints)?;

    super::runtime()?.block_on(async move {
        let cluster = args.cluster.connect().await?;
        let metrics = Metrics::default();
        let server = serve_metrics(args.metrics_addr, &metrics).await?;
        let (stop_tx, mut stop) = watch::channel(false);
        let stopper = stop_on_signal(stop_tx);
        let (changed_tx, mut changed) = mpsc::unbounded_channel();
        let mut watches = Watches::new(cluster.clone(), &settings.apply.inventory, changed_tx);
        let place = settings
            .git
            .as_ref()
            .map(target::Place::of)
            .unwrap_or_default();
        // Sources of Kubernetes objects are watched: a change reads them at once.
        let objects = ClusterObjects::new(cluster.clone());
        let (rows_tx, mut rows_changed) = mpsc::unbounded_channel();
        let row_watches: Vec<_> = config
            .sources
            .values()
            .filter(|s| polled.iter().any(|p| p.name == s.name))
            .filter_map(|s| {
                let spec = s.spec.kubernetes.clone()?;
                Some(rows::watch(
                    objects.clone(),
                    spec,
                    s.name.clone(),
                    rows_tx.clone(),
                ))
            })
            .collect();
        let mut reconciler = Reconciler::new(config, blueprints, settings, metrics.clone())
            .with_objects(std::sync::Arc::new(objects.clone()));
        let result = loop {
            // Read the sources that are due; one that fails keeps its last rows.
            let mut failures = Vec::new();
            for p in polled.iter_mut().filter(|p| p.due <= Instant::now()) {
                p.due = Instant::now() + p.interval;
                if let Err(e) = reconciler.read(&p.name).await {
                    failures.push(e.to_string());
                }
            }
            if args.once && !failures.is_empty() {
                break Err(anyhow::anyhow!(failures.join("; ")));
            }
            for failure in &failures {
                eprintln!("error: {failure}; keeping its last rows and pruning nothing");
            }
            let mut degraded = !failures.is_empty();
            match reconciler.render(&cluster).await {
                Ok(events) => {
                    for event in events {
                        if let Some(line) = describe(&event, &place) {
                            eprintln!("{line}");
                        }
                    }
                }
                Err(e) if args.once => break Err(e.into()),
                Err(e) => {
                    eprintln!("error: {e}; keeping the last desired state");
                    degraded = true;
                }
            }
            match reconciler.apply(&cluster, !degraded, &stop).await {
                Some(Ok(report)) => {
                    let writes = rows::healths(&reconciler, &report);
                    for failure in rows::write_back(&objects, writes).await {
                        eprintln!("warning: {failure}");
                    }
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
                Some(Err(e)) if args.once => break Err(e.into()),
                Some(Err(e)) => eprintln!("error: {e}"),
                None if args.once => {
                    break Err(anyhow::anyhow!("nothing to apply: no source has been read"));
                }
                None => {}
            }
            if let Some(desired) = reconciler.desired()
                && let Err(e) = watches.cover(desired).await
            {
                tracing::warn!("cannot watch: {e}");
            }
            if *stop.borrow() {
                break Ok(());
            }
            let next = polled
                .iter()
                .map(|p| p.due)
                .min()
                .unwrap_or_else(|| Instant::now() + DEFAULT_INTERVAL);
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(next) => break,
                    Some(first) = rows_changed.recv() => {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        let mut names = vec![first];
                        while let Ok(name) = rows_changed.try_recv() {
                            names.push(name);
                        }
                        for p in polled.iter_mut().filter(|p| names.contains(&p.name)) {
                            p.due = Instant::now();
                        }
                        break;
                    }
                    Some(note) = changed.recv() => {
                        // Let a burst of changes settle into one pass; the
                        // events of Kiln's own writes start none.
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        let mut news = !note.is_own(&cluster);
                        while let Ok(note) = changed.try_recv() {
                            news |= !note.is_own(&cluster);
                        }
                        if news {
                            break;
                        }
                    }
                    _ = stop.changed() => break,
                }
            }
            if *stop.borrow() {
                break Ok(());
            }
        };
        stopper.abort();
        for watch in row_watches {
            watch.abort();
        }
        if let Some(server) = server {
            server.abort();
        }
        result.map(|()| Outcome::Clean)
    })
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `addr`, if given, until
/// the task is aborted.
pub async fn serve_metrics(
    addr: Option<SocketAddr>,
    metrics: &Metrics,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("--metrics-addr {addr}"))?;
    Ok(Some(tokio::spawn(metrics::serve(
        listener,
        metrics.clone(),
    ))))
}

/// The pass's settings from the flags and the Pipeline, settled once.
fn settings(
    args: &Args,
    pipeline: Option<&kiln_render::config::Named<kiln_render::api::PipelineSpec>>,
) -> anyhow::Result<Settings> {
    let git = if args.git.repo.is_some() || pipeline.is_some_and(|p| p.spec.git.is_some()) {
        let mut target = target::resolve(&args.git, pipeline)?;
        target.options.author = args.author.clone();
        target.options.allow_mass_delete = args.allow_mass_delete;
        Some(target)
    } else {
        None
    };
    let name = pipeline.map_or("default", |p| p.name.as_str());
    let mut apply = args.cluster.options(name)?;
    apply.detect_only = args.detect_only;
    apply.allow_mass_delete = args.allow_mass_delete;
    apply.max_delete_percent = kiln_render::git::publish::max_delete_percent(pipeline);
    Ok(Settings {
        pipeline: name.to_string(),
        apply,
        no_prune: args.no_prune,
        allow_plaintext_secrets: args.allow_plaintext_secrets,
        git,
    })
}

/// A render's event as a person reads it; a render alone says nothing
/// (what it changes is in the report that follows).
fn describe(event: &Event, place: &target::Place) -> Option<String> {
    Some(match event {
        Event::Rendered { .. } => return None,
        Event::Recovered { files, commit } => place.recovered(*files, commit),
        Event::Committed(published) => format!(
            "committed {} to {}: {}",
            published.commit.as_ref().map_or("", |c| c.short()),
            published.branch.short(),
            published.summary.line()
        ),
        Event::Pinned { branch, commit } => format!(
            "{branch} is pinned by rollback commit {}: applying it and committing nothing until `kiln resume`",
            commit.short()
        ),
    })
}
