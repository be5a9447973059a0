//! `kiln watch`: the template author's loop. Every save of a configuration
//! file, template or file source renders again in memory and prints what
//! changed: since the previous render, or against a rendered directory or
//! branch. A broken template prints its error and the line, and the watch
//! goes on.

use std::collections::BTreeSet;
use std::io::{IsTerminal as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use kiln_render::diff::{self, Report};
use kiln_render::tree::{Summary, Tree};
use notify::{RecursiveMode, Watcher as _};

use super::ConfigArgs;
use super::target::{self, GitArgs};
use crate::Outcome;

/// Arguments of `kiln watch`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    config: ConfigArgs,
    /// Render only the row with this key (repeatable; `BLUEPRINT/KEY` picks
    /// one blueprint's instance).
    #[arg(long = "instance", value_name = "KEY")]
    instances: Vec<String>,
    /// Compare every render with this rendered directory instead of the
    /// previous render.
    #[arg(long, value_name = "DIR", conflicts_with = "repo")]
    against: Option<PathBuf>,
    /// Compare every render with the branch of this repository (with
    /// --branch and --path) instead of the previous render.
    #[command(flatten)]
    git: GitArgs,
    /// How long the files must stay quiet before a render (editors write
    /// a file in several steps).
    #[arg(long, value_name = "DURATION", default_value = "100ms")]
    debounce: String,
}

/// What a render is compared with.
enum Reference {
    /// The previous good render.
    Previous(Option<Tree>),
    /// A directory, read again each time.
    Dir(PathBuf),
    /// A branch.
    Git,
}

pub fn run(args: &Args) -> anyhow::Result<Outcome> {
    let debounce = kiln_render::source::parse_duration(&args.debounce)
        .map_err(|e| anyhow::anyhow!("--debounce: {e}"))?;
    let colour = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let (tx, events) = mpsc::channel();
    let mut watcher = notify::recommended_watcher(move |event| {
        let _ = tx.send(event);
    })?;
    let mut watched: BTreeSet<(PathBuf, bool)> = BTreeSet::new();
    let mut reference = match (&args.against, args.git.repo.is_some()) {
        (Some(dir), _) => Reference::Dir(dir.clone()),
        (None, true) => Reference::Git,
        (None, false) => Reference::Previous(None),
    };
    loop {
        let (files, outcome) = render(args);
        follow(&mut watcher, &mut watched, &args.config.files, &files);
        match outcome {
            Ok(tree) => show(args, &mut reference, tree, colour)?,
            Err(error) => {
                eprintln!("error: {}", super::one_line(&error));
                if let Some(excerpt) = error
                    .chain()
                    .find_map(|e| e.downcast_ref::<kiln_render::Error>())
                    .and_then(kiln_render::Error::excerpt)
                {
                    eprintln!("{excerpt}");
                }
                eprintln!(
                    "kiln watch: waiting for a fix ({} files watched)",
                    files.len()
                );
            }
        }
        if !wait(&events, debounce)? {
            return Ok(Outcome::Clean);
        }
    }
}

/// Loads and renders; returns the files the configuration reads (those
/// known, even when it failed) and the tree.
fn render(args: &Args) -> (BTreeSet<PathBuf>, anyhow::Result<Tree>) {
    let mut files = BTreeSet::new();
    let result = (|| {
        let config = args.config.load()?;
        for blueprint in config.blueprints.values() {
            files.insert(blueprint.file.clone());
            for resource in &blueprint.spec.resources {
                if let Some(file) = &resource.template_file {
                    files.insert(blueprint.resolve(file));
                }
            }
        }
        for source in config.sources.values() {
            files.insert(source.file.clone());
            files.extend(kiln_render::source::local_files(source));
        }
        for pipeline in config.pipelines.values() {
            files.insert(pipeline.file.clone());
        }
        let mut loaded = super::render::load(&args.config)?;
        if !args.instances.is_empty() {
            loaded.keep_instances(&args.instances)?;
        }
        let rendering = loaded.render()?;
        let mut tree = rendering.tree;
        if !args.instances.is_empty() {
            tree = instances_only(&tree, &tree);
        }
        anyhow::Ok(tree)
    })();
    (files, result)
}

/// The files of `tree` inside the instance directories `of` has.
fn instances_only(tree: &Tree, of: &Tree) -> Tree {
    let dirs: BTreeSet<&str> = of
        .files
        .keys()
        .filter(|p| p.matches('/').count() == 2)
        .filter_map(|p| p.rsplit_once('/').map(|(dir, _)| dir))
        .collect();
    Tree {
        files: tree
            .files
            .iter()
            .filter(|(path, _)| {
                path.rsplit_once('/')
                    .is_some_and(|(dir, _)| dirs.contains(dir))
            })
            .map(|(p, c)| (p.clone(), c.clone()))
            .collect(),
        ..Tree::default()
    }
}

/// Prints what `tree` changes against the reference.
fn show(args: &Args, reference: &mut Reference, tree: Tree, colour: bool) -> anyhow::Result<()> {
    let (changes, summary, against) = match reference {
        Reference::Previous(previous) => {
            let Some(old) = previous.replace(tree.clone()) else {
                eprintln!(
                    "kiln watch: rendered {} objects; watching for changes",
                    tree.objects()
                );
                return Ok(());
            };
            let changes = diff::changes(&old, &tree);
            (
                changes,
                Summary::between(&old, &tree),
                "the previous render".to_string(),
            )
        }
        Reference::Dir(dir) => {
            let mut old = kiln_render::tree::read_dir(dir)?;
            if !args.instances.is_empty() {
                old = instances_only(&old, &tree);
            }
            let changes = diff::changes(&old, &tree);
            (
                changes,
                Summary::between(&old, &tree),
                dir.display().to_string(),
            )
        }
        Reference::Git => {
            let target = target::resolve(&args.git, None)?;
            let mut old = target.tree(None)?;
            old.files
                .retain(|path, _| !path.starts_with(&format!("{}/", kiln_render::tree::EMIT_DIR)));
            if !args.instances.is_empty() {
                old = instances_only(&old, &tree);
            }
            let changes = diff::changes(&old, &tree);
            let label = target.refname()?.short().to_string();
            (changes, Summary::between(&old, &tree), label)
        }
    };
    let report = Report::new(&summary, &changes);
    if report.is_empty() {
        eprintln!("kiln watch: no change against {against}");
        return Ok(());
    }
    let text = report.format(diff::Format::Unified, "");
    let mut out = std::io::stdout().lock();
    if colour {
        out.write_all(paint(&text).as_bytes())?;
    } else {
        out.write_all(text.as_bytes())?;
    }
    out.flush()?;
    eprintln!(
        "kiln watch: against {against}: instances: {} added, {} changed, {} removed; {} files differ",
        summary.added.len(),
        summary.changed.len(),
        summary.removed.len(),
        report.files.len()
    );
    Ok(())
}

/// A unified diff with ANSI colours: additions green, deletions red, hunk
/// headers cyan, file headers bold.
fn paint(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + text.len() / 8);
    for line in text.split_inclusive('\n') {
        let code = if line.starts_with("+++") || line.starts_with("---") {
            "1"
        } else if line.starts_with('+') {
            "32"
        } else if line.starts_with('-') {
            "31"
        } else if line.starts_with("@@") {
            "36"
        } else {
            out.push_str(line);
            continue;
        };
        let body = line.trim_end_matches('\n');
        out.push_str(&format!("\x1b[{code}m{body}\x1b[0m"));
        if line.ends_with('\n') {
            out.push('\n');
        }
    }
    out
}

/// Watches the directories of `files` (an editor that saves by writing a
/// new file and renaming it over the old one replaces the file, so the
/// directory is what can be watched), and the directories given with -f.
fn follow(
    watcher: &mut notify::RecommendedWatcher,
    watched: &mut BTreeSet<(PathBuf, bool)>,
    given: &[PathBuf],
    files: &BTreeSet<PathBuf>,
) {
    let mut wanted = BTreeSet::new();
    for path in given {
        if path.is_dir() {
            wanted.insert((path.clone(), true));
        } else {
            wanted.insert((parent(path), false));
        }
    }
    for file in files {
        wanted.insert((parent(file), false));
    }
    for (dir, recursive) in &wanted {
        if watched.contains(&(dir.clone(), *recursive)) || !dir.is_dir() {
            continue;
        }
        let mode = if *recursive {
            RecursiveMode::Recursive
        } else {
            RecursiveMode::NonRecursive
        };
        match watcher.watch(dir, mode) {
            Ok(()) => {
                watched.insert((dir.clone(), *recursive));
            }
            Err(e) => eprintln!("kiln watch: cannot watch {}: {e}", dir.display()),
        }
    }
}

fn parent(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Waits for a change worth a render, then for `debounce` of quiet.
/// False when the watcher is gone.
fn wait(
    events: &mpsc::Receiver<notify::Result<notify::Event>>,
    debounce: Duration,
) -> anyhow::Result<bool> {
    loop {
        let Ok(event) = events.recv() else {
            return Ok(false);
        };
        if !worth_a_render(&event) {
            continue;
        }
        // Quiet for `debounce`: the editor has finished writing.
        loop {
            match events.recv_timeout(debounce) {
                Ok(_) => continue,
                Err(mpsc::RecvTimeoutError::Timeout) => return Ok(true),
                Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(false),
            }
        }
    }
}

/// Whether an event may change a render: not a read, not an editor's swap
/// or backup file, not SQLite's journal, not Git's own files.
fn worth_a_render(event: &notify::Result<notify::Event>) -> bool {
    let Ok(event) = event else {
        return true;
    };
    if matches!(event.kind, notify::EventKind::Access(_)) {
        return false;
    }
    event.paths.iter().any(|path| {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let ignored = name.ends_with('~')
            || name.ends_with(".swp")
            || name.ends_with(".swx")
            || name == "4913"
            || name.ends_with("-journal")
            || name.ends_with("-wal")
            || name.ends_with("-shm")
            || name.contains(".seeding-")
            || path.components().any(|c| c.as_os_str() == ".git");
        !ignored
    })
}
