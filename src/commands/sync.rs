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

/// How long the loop lets changed rows settle before it reads them.
const ROWS_SETTLE: Duration = Duration::from_millis(50);

/// How often a rollout under way is stepped when nothing else starts a pass.
const ROLLOUT_TICK: Duration = Duration::from_secs(2);

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

/// What one configuration gives the loop: its engine's parts, and the
/// files it reads.
struct Loaded {
    /// What the engine is made of, until it is.
    parts: Option<(kiln_render::config::Config, Vec<render::Compiled>, Settings)>,
    /// The Pipeline's rollout, when it has one.
    rollout: Option<kiln_sync::rollout::Driver>,
    /// `apply: false`: commit only; ArgoCD or Flux applies the branch.
    commit_only: bool,
    /// Where commits go, for messages.
    place: target::Place,
    /// The `kubernetes` sources read, watched.
    kube_sources: Vec<(String, kiln_render::api::ObjectsSpec)>,
    /// The sources read that name a PostgreSQL channel, listened to.
    notified_sources: Vec<kiln_render::config::Named<kiln_render::api::SourceSpec>>,
    polled: Vec<Polled>,
    /// Configuration and template files: a change reloads everything.
    definitions: std::collections::BTreeSet<std::path::PathBuf>,
    /// File sources' rows, by source: a change reads that source again.
    data: Vec<(String, std::path::PathBuf)>,
}

fn load(args: &Args) -> anyhow::Result<Loaded> {
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
    let commit_only = pipeline
        .as_ref()
        .is_some_and(|p| p.spec.apply == Some(false));
    if let Some(p) = pipeline
        .as_ref()
        .filter(|_| commit_only && settings.git.is_none())
    {
        anyhow::bail!(
            "{}: Pipeline {}: apply: false commits only, so it needs a repository (spec.git or --git)",
            p.file.display(),
            p.name
        );
    }
    let rollout = match &pipeline {
        Some(p) => kiln_render::rollout::Strategy::of(p, &config.blueprints_of(p))?.map(|s| {
            kiln_sync::rollout::Driver::new(
                s,
                kiln_sync::rollout::Place::of(
                    &settings.apply.inventory_namespace,
                    &settings.apply.inventory,
                ),
            )
        }),
        None => None,
    };
    let polled = Polled::all(&config, &blueprints)?;
    let mut definitions = std::collections::BTreeSet::new();
    for blueprint in config.blueprints.values() {
        definitions.insert(absolute(&blueprint.file));
        for resource in &blueprint.spec.resources {
            if let Some(file) = &resource.template_file {
                definitions.insert(absolute(&blueprint.resolve(file)));
            }
        }
    }
    for named in config.sources.values().map(|s| &s.file) {
        definitions.insert(absolute(named));
    }
    for named in config.pipelines.values().map(|p| &p.file) {
        definitions.insert(absolute(named));
    }
    let data = config
        .sources
        .values()
        .filter(|s| polled.iter().any(|p| p.name == s.name))
        .flat_map(|s| {
            kiln_render::source::local_files(s)
                .into_iter()
                .map(|f| (s.name.clone(), absolute(&f)))
        })
        .collect();
    let place = settings
        .git
        .as_ref()
        .map(target::Place::of)
        .unwrap_or_default();
    let kube_sources = config
        .sources
        .values()
        .filter(|s| polled.iter().any(|p| p.name == s.name))
        .filter_map(|s| Some((s.name.clone(), s.spec.kubernetes.clone()?)))
        .collect();
    let notified_sources = config
        .sources
        .values()
        .filter(|s| s.spec.notify.is_some() && polled.iter().any(|p| p.name == s.name))
        .cloned()
        .collect();
    Ok(Loaded {
        parts: Some((config, blueprints, settings)),
        rollout,
        commit_only,
        place,
        kube_sources,
        notified_sources,
        polled,
        definitions,
        data,
    })
}

fn absolute(path: &std::path::Path) -> std::path::PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// Watches the directories of the files a configuration reads (a save by
/// rename replaces the file), sending each change's paths.
fn watch_files(
    loaded: &Loaded,
    given: &[std::path::PathBuf],
    tx: mpsc::UnboundedSender<Vec<std::path::PathBuf>>,
) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher as _;
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event
            && !matches!(event.kind, notify::EventKind::Access(_))
        {
            let _ = tx.send(event.paths);
        }
    })
    .map_err(|e| tracing::warn!("cannot watch files: {e}"))
    .ok()?;
    let mut dirs = std::collections::BTreeSet::new();
    for file in loaded
        .definitions
        .iter()
        .chain(loaded.data.iter().map(|(_, f)| f))
    {
        if let Some(dir) = file.parent() {
            dirs.insert(dir.to_path_buf());
        }
    }
    for path in given {
        let path = absolute(path);
        if path.is_dir() {
            dirs.insert(path);
        }
    }
    for dir in dirs {
        if let Err(e) = watcher.watch(&dir, notify::RecursiveMode::NonRecursive) {
            tracing::warn!("cannot watch {}: {e}", dir.display());
        }
    }
    Some(watcher)
}

/// What changed files ask of the loop.
#[derive(Debug, PartialEq)]
enum FileChange {
    /// A configuration or template file: load everything again.
    Reload,
    /// These sources' files: read them again.
    Sources(Vec<String>),
    Nothing,
}

fn classify(
    loaded: &Loaded,
    given: &[std::path::PathBuf],
    paths: &[std::path::PathBuf],
) -> FileChange {
    let dirs: Vec<std::path::PathBuf> = given
        .iter()
        .map(|p| absolute(p))
        .filter(|p| p.is_dir())
        .collect();
    let mut sources = Vec::new();
    for path in paths {
        let path = absolute(path);
        let yaml = path.extension().is_some_and(|e| e == "yaml" || e == "yml");
        if loaded.definitions.contains(&path)
            || (yaml && path.parent().is_some_and(|p| dirs.iter().any(|d| d == p)))
        {
            return FileChange::Reload;
        }
        for (source, file) in &loaded.data {
            if *file == path && !sources.contains(source) {
                sources.push(source.clone());
            }
        }
    }
    if sources.is_empty() {
        FileChange::Nothing
    } else {
        FileChange::Sources(sources)
    }
}

pub fn run(args: &Args) -> anyhow::Result<Outcome> {
    let loaded = load(args)?;

    super::runtime()?.block_on(async move {
        let mut loaded = loaded;
        let cluster = args.cluster.connect().await?;
        let metrics = Metrics::default();
        let server = serve_metrics(args.metrics_addr, &metrics).await?;
        let (stop_tx, mut stop) = watch::channel(false);
        let stopper = stop_on_signal(stop_tx);
        let (changed_tx, mut changed) = mpsc::unbounded_channel();
        let inventory = loaded
            .parts
            .as_ref()
            .map(|(_, _, s)| s.apply.inventory.clone())
            .unwrap_or_default();
        let mut watches = Watches::new(cluster.clone(), &inventory, changed_tx);
        // Sources of Kubernetes objects are watched: a change reads them at once.
        let objects = ClusterObjects::new(cluster.clone());
        let (rows_tx, mut rows_changed) = mpsc::unbounded_channel();
        // PostgreSQL sources with spec.notify are listened to, likewise.
        let row_watches = |loaded: &Loaded| -> Vec<tokio::task::JoinHandle<()>> {
            let watched = loaded.kube_sources.iter().map(|(name, spec)| {
                rows::watch(objects.clone(), spec.clone(), name.clone(), rows_tx.clone())
            });
            let listened = loaded
                .notified_sources
                .iter()
                .map(|source| rows::listen(source.clone(), rows_tx.clone()));
            watched.chain(listened).collect()
        };
        let mut row_watch_tasks = row_watches(&loaded);
        // Files are watched too: an edited template, configuration or file
        // source starts a pass at once; SQL sources keep their interval.
        let (files_tx, mut files_changed) = mpsc::unbounded_channel();
        let mut file_watcher = watch_files(&loaded, &args.config.files, files_tx.clone());
        let engine = |loaded: &mut Loaded| {
            let (config, blueprints, settings) = loaded.parts.take()?;
            let mut engine = Reconciler::new(config, blueprints, settings, metrics.clone())
                .with_objects(std::sync::Arc::new(objects.clone()));
            if let Some(driver) = loaded.rollout.take() {
                engine = engine.with_rollout(driver);
            }
            Some(engine)
        };
        let Some(mut reconciler) = engine(&mut loaded) else {
            anyhow::bail!("the configuration was already used");
        };
        let mut polled = std::mem::take(&mut loaded.polled);
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
                        if let Some(line) = describe(&event, &loaded.place) {
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
            if loaded.commit_only {
                // ArgoCD or Flux applies what was committed.
                if !degraded {
                    metrics.set_ready();
                }
                if args.once {
                    break if degraded {
                        Err(anyhow::anyhow!("the pass failed"))
                    } else {
                        Ok(())
                    };
                }
            } else {
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
            }
            if let Some(desired) = reconciler.desired()
                && let Err(e) = watches.cover(desired).await
            {
                tracing::warn!("cannot watch: {e}");
            }
            if *stop.borrow() {
                break Ok(());
            }
            let mut next = polled
                .iter()
                .map(|p| p.due)
                .min()
                .unwrap_or_else(|| Instant::now() + DEFAULT_INTERVAL);
            // A rollout under way moves with health, gates and time, not
            // only with the rows: it is stepped again soon.
            if reconciler.rollout().is_some_and(|r| r.active()) {
                next = next.min(Instant::now() + ROLLOUT_TICK);
            }
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(next) => break,
                    Some(first) = rows_changed.recv() => {
                        // A transaction's notifications, or a burst of
                        // object events, arrive together: one pass.
                        tokio::time::sleep(ROWS_SETTLE).await;
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
                        tracing::info!("objects changed by Kiln's own writes; no pass");
                    }
                    Some(first) = files_changed.recv() => {
                        // An editor writes a file in several steps.
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        let mut paths = first;
                        while let Ok(more) = files_changed.try_recv() {
                            paths.extend(more);
                        }
                        match classify(&loaded, &args.config.files, &paths) {
                            FileChange::Nothing => {}
                            FileChange::Sources(names) => {
                                for p in polled.iter_mut().filter(|p| names.contains(&p.name)) {
                                    p.due = Instant::now();
                                }
                                break;
                            }
                            FileChange::Reload => match load(args) {
                                Ok(new) => {
                                    eprintln!("sync: the configuration changed; loaded again");
                                    loaded = new;
                                    if let Some(new) = engine(&mut loaded) {
                                        reconciler = new;
                                    }
                                    polled = std::mem::take(&mut loaded.polled);
                                    for task in row_watch_tasks.drain(..) {
                                        task.abort();
                                    }
                                    row_watch_tasks = row_watches(&loaded);
                                    file_watcher = watch_files(&loaded, &args.config.files, files_tx.clone());
                                    break;
                                }
                                Err(e) => eprintln!(
                                    "error: {}; keeping the configuration loaded before",
                                    super::one_line(&e)
                                ),
                            },
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
        drop(file_watcher);
        for watch in row_watch_tasks {
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
        Event::Rollout(line) => format!("rollout: {line}"),
        Event::Pinned { branch, commit } => format!(
            "{branch} is pinned by rollback commit {}: applying it and committing nothing until `kiln resume`",
            commit.short()
        ),
    })
}
