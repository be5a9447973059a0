//! The rendered tree: `kustomization.yaml` files and one YAML file per object,
//! as the README lays it out, written to a directory or compared with one.
//!
//! ```text
//! kustomization.yaml                         lists the blueprint directories
//! <blueprint>/kustomization.yaml             lists the instance directories
//! <blueprint>/<instance>/kustomization.yaml  lists the files in dependency order
//! <blueprint>/<instance>/<resource-id>.yaml
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::Serialize;
use serde_json::{Value, json};

use crate::render::{Object, Rendered};
use crate::{Error, Result, yaml};

/// The name of every kustomization file.
pub const KUSTOMIZATION: &str = "kustomization.yaml";

/// Files by path relative to the tree's root (`/`-separated), sorted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tree {
    /// File contents by path.
    pub files: BTreeMap<String, Vec<u8>>,
    /// Instance directories (`blueprint/instance`) taken whole from a Git
    /// repository's memo instead of rendered: only a render into that
    /// repository has them.
    pub stored: BTreeMap<String, Stored>,
}

/// An instance directory that is a tree in a repository already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    /// The tree.
    pub id: git2::Oid,
    /// How many objects it holds.
    pub objects: usize,
}

impl Tree {
    /// How many objects it holds: the files of instance directories but
    /// their kustomizations.
    pub fn objects(&self) -> usize {
        self.files
            .keys()
            .filter(|p| p.matches('/').count() == 2 && !p.ends_with(KUSTOMIZATION))
            .count()
            + self.stored.values().map(|s| s.objects).sum::<usize>()
    }
}

/// Builds the tree of a render.
pub fn build(rendered: &Rendered) -> Result<Tree> {
    assemble(rendered, |object| object.yaml.clone().into_bytes())
}

/// Builds the tree of a render as [`build`] does, moving each object's YAML
/// into it instead of copying it: `rendered` keeps its instances and
/// objects, without their YAML.
pub fn build_taking(rendered: &mut Rendered) -> Result<Tree> {
    // In the order `assemble` asks for them: instances not taken from a
    // memo, each one's objects in order.
    let mut taken = rendered
        .instances
        .iter_mut()
        .filter(|i| i.stored().is_none())
        .flat_map(|i| i.objects.iter_mut())
        .map(|o| std::mem::take(&mut o.yaml).into_bytes())
        .collect::<Vec<_>>()
        .into_iter();
    assemble(rendered, |_| taken.next().unwrap_or_default())
}

/// The tree of a render, each object's file made by `content`.
fn assemble(rendered: &Rendered, mut content: impl FnMut(&Object) -> Vec<u8>) -> Result<Tree> {
    let mut files = BTreeMap::new();
    let mut by_blueprint: BTreeMap<&str, Vec<&str>> = rendered
        .blueprints
        .iter()
        .map(|b| (b.as_str(), Vec::new()))
        .collect();
    let mut stored = BTreeMap::new();
    for instance in &rendered.instances {
        by_blueprint
            .entry(&instance.blueprint)
            .or_default()
            .push(&instance.name);
        let dir = format!("{}/{}", instance.blueprint, instance.name);
        if let (Some(id), Some(remembered)) = (instance.stored(), &instance.remembered) {
            let objects = remembered.identities.len();
            stored.insert(dir, Stored { id, objects });
            continue;
        }
        let mut listed = Vec::with_capacity(instance.objects.len());
        for object in &instance.objects {
            let file = format!("{}.yaml", object.resource);
            files.insert(format!("{dir}/{file}"), content(object));
            listed.push(file);
        }
        files.insert(format!("{dir}/{KUSTOMIZATION}"), kustomization(&listed)?);
    }
    for (blueprint, instances) in &by_blueprint {
        let mut instances = instances.clone();
        instances.sort_unstable();
        files.insert(
            format!("{blueprint}/{KUSTOMIZATION}"),
            kustomization(&instances)?,
        );
    }
    let blueprints: Vec<&str> = by_blueprint.keys().copied().collect();
    files.insert(KUSTOMIZATION.to_string(), kustomization(&blueprints)?);
    Ok(Tree { files, stored })
}

fn kustomization<T: Serialize>(resources: &[T]) -> Result<Vec<u8>> {
    let value = json!({
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": resources,
    });
    Ok(yaml::to_string(&value)?.into_bytes())
}

/// The directory inside the render path that holds what `--emit` writes
/// for ArgoCD or Flux.
pub const EMIT_DIR: &str = "_kiln";

/// What changed between two trees, by instance directory.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Instances (`blueprint/instance`) that are new.
    pub added: Vec<String>,
    /// Instances whose files changed.
    pub changed: Vec<String>,
    /// Instances that are gone.
    pub removed: Vec<String>,
    /// How many instances are the same.
    pub unchanged: usize,
    /// Objects in the new tree.
    pub objects: usize,
    /// Files (objects and kustomizations) that are new or changed.
    pub written: usize,
    /// Blueprints that had instances and have none left (their source
    /// returned nothing?).
    #[serde(skip)]
    pub emptied: Vec<String>,
}

impl Summary {
    /// Compares `old` (empty for a first render) with `new`.
    pub fn between(old: &Tree, new: &Tree) -> Self {
        let mut summary = Summary::of_instances(&instances(old), &instances(new));
        summary.objects = new.objects();
        summary.written = new
            .files
            .iter()
            .filter(|(path, content)| old.files.get(*path) != Some(*content))
            .count();
        summary
    }

    /// Compares two sets of instances (`blueprint/instance`), each with
    /// something that changes when its files do; objects and files written
    /// are left to the caller.
    pub fn of_instances<T: PartialEq>(
        old: &BTreeMap<String, T>,
        new: &BTreeMap<String, T>,
    ) -> Self {
        let mut summary = Summary::default();
        for (name, content) in new {
            match old.get(name) {
                None => summary.added.push(name.clone()),
                Some(before) if before != content => summary.changed.push(name.clone()),
                Some(_) => summary.unchanged += 1,
            }
        }
        summary.removed = old
            .keys()
            .filter(|n| !new.contains_key(*n))
            .cloned()
            .collect();
        let blueprint = |name: &String| {
            name.split_once('/')
                .map_or(name.clone(), |(b, _)| b.to_string())
        };
        let left: std::collections::BTreeSet<String> = new.keys().map(blueprint).collect();
        summary.emptied = old
            .keys()
            .map(blueprint)
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .filter(|b| !left.contains(b))
            .collect();
        summary
    }

    /// The instances that existed before, for the mass deletion guard.
    pub fn before(&self) -> usize {
        self.changed.len() + self.removed.len() + self.unchanged
    }

    /// Whether anything changed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.changed.is_empty() && self.removed.is_empty()
    }

    /// One line for people:
    /// `instances: 3 added, 1 changed, 0 removed, 46 unchanged; 412 objects, 9 files written`.
    pub fn line(&self) -> String {
        format!(
            "instances: {} added, {} changed, {} removed, {} unchanged; {} objects, {} files written",
            self.added.len(),
            self.changed.len(),
            self.removed.len(),
            self.unchanged,
            self.objects,
            self.written
        )
    }
}

/// Instance directories and their files.
fn instances(tree: &Tree) -> BTreeMap<String, BTreeMap<&str, &[u8]>> {
    let mut out: BTreeMap<String, BTreeMap<&str, &[u8]>> = BTreeMap::new();
    for (path, content) in &tree.files {
        let mut parts = path.splitn(3, '/');
        if let (Some(b), Some(i), Some(file)) = (parts.next(), parts.next(), parts.next()) {
            out.entry(format!("{b}/{i}"))
                .or_default()
                .insert(file, content);
        }
    }
    out
}

/// Reads what an earlier render wrote to `dir`: the blueprint directories its
/// root kustomization lists, and every file in them. A directory with no
/// kustomization is an empty tree.
pub fn read_dir(dir: &Path) -> Result<Tree> {
    let mut tree = Tree::default();
    let root = dir.join(KUSTOMIZATION);
    let Ok(text) = std::fs::read(&root) else {
        return Ok(tree);
    };
    let listed: Value =
        yaml::from_str(&String::from_utf8_lossy(&text), &root.display().to_string())?;
    for blueprint in listed["resources"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
    {
        if !is_plain_name(blueprint) {
            continue;
        }
        walk(&dir.join(blueprint), blueprint, &mut tree)?;
    }
    walk(&dir.join(EMIT_DIR), EMIT_DIR, &mut tree)?;
    tree.files.insert(KUSTOMIZATION.to_string(), text);
    Ok(tree)
}

fn walk(dir: &Path, prefix: &str, tree: &mut Tree) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        let relative = format!("{prefix}/{name}");
        if path.is_dir() {
            walk(&path, &relative, tree)?;
        } else {
            let content = std::fs::read(&path).map_err(|e| io(&path, "read", e))?;
            tree.files.insert(relative, content);
        }
    }
    Ok(())
}

/// Writes `new` to `dir`: files whose content changed, and removes what `old`
/// (read from the same directory) had that `new` does not, with directories
/// left empty.
pub fn write_dir(dir: &Path, old: &Tree, new: &Tree) -> Result<()> {
    if let Some(path) = new.stored.keys().next() {
        return Err(Error::Output {
            message: format!(
                "cannot write {}: {path} was taken from a repository's memo, not rendered",
                dir.display()
            ),
        });
    }
    std::fs::create_dir_all(dir).map_err(|e| io(dir, "create", e))?;
    for (path, content) in &new.files {
        if old.files.get(path) == Some(content) {
            continue;
        }
        let target = dir.join(path);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io(parent, "create", e))?;
        }
        std::fs::write(&target, content).map_err(|e| io(&target, "write", e))?;
    }
    let mut emptied = BTreeSet::new();
    for path in old.files.keys().filter(|p| !new.files.contains_key(*p)) {
        let target = dir.join(path);
        match std::fs::remove_file(&target) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&target, "remove", e)),
        }
        let mut parent = Path::new(path).parent();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            emptied.insert(p.to_path_buf());
            parent = p.parent();
        }
    }
    // Deepest first, so that a blueprint directory empties after its instances.
    for relative in emptied.iter().rev() {
        let _ = std::fs::remove_dir(dir.join(relative));
    }
    Ok(())
}

/// Where `render --out DIR` remembers what it wrote: the inputs it
/// rendered, and each file's size and modification time (with a digest for
/// those written too close to the end to tell a later edit by time). Kept
/// in the user's cache directory (`$XDG_CACHE_HOME`, else `~/.cache`), by
/// the directory's absolute path, so that nothing of it lands in a
/// repository the directory belongs to; `None` without a home.
pub fn memo_file(dir: &Path) -> Option<std::path::PathBuf> {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|c| !c.is_empty())
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))?;
    let absolute = std::path::absolute(dir).ok()?;
    let key = sha256(absolute.as_os_str().as_encoded_bytes());
    Some(cache.join("kiln").join("render-out").join(&key[..32]))
}

const MEMO_HEADER: &str = "kiln render --out memo 1";

/// How close to the memo a file's modification time may be and still be
/// trusted: a file system stamps times in ticks of a few milliseconds, and
/// an edit in the tick Kiln wrote a file would keep its time.
const RACY: std::time::Duration = std::time::Duration::from_millis(100);

/// What [`remembered`] recalls: the summary of a render that changed
/// nothing.
pub fn remembered(dir: &Path, inputs: &str) -> Option<Summary> {
    let text = std::fs::read_to_string(memo_file(dir)?).ok()?;
    let mut lines = text.lines();
    if lines.next()? != MEMO_HEADER || lines.next()? != inputs {
        return None;
    }
    let (instances, objects) = lines.next()?.split_once(' ')?;
    let mut recorded: std::collections::HashMap<&str, (u64, u128, &str)> =
        std::collections::HashMap::new();
    for line in lines {
        let mut fields = line.split('\t');
        let path = fields.next()?;
        let len = fields.next()?.parse().ok()?;
        let mtime = fields.next()?.parse().ok()?;
        let digest = fields.next()?;
        recorded.insert(path, (len, mtime, digest));
    }
    // What a render would read: the top-level directories it wrote, the
    // emitted files, the root kustomization. Anything more or less, or
    // touched, and the render runs.
    let mut roots: BTreeSet<&str> = recorded
        .keys()
        .filter_map(|p| p.split_once('/').map(|(top, _)| top))
        .collect();
    roots.insert(EMIT_DIR);
    let check = |relative: &str, meta: &std::fs::Metadata| -> Option<()> {
        let (len, time, digest) = recorded.get(relative)?;
        if meta.len() != *len || mtime(meta)? != *time {
            return None;
        }
        if *digest != "-" && sha256(&std::fs::read(dir.join(relative)).ok()?) != *digest {
            return None;
        }
        Some(())
    };
    let mut seen = 0;
    for root in roots {
        seen += stat_walk_parallel(&dir.join(root), root, &check)?;
    }
    check(
        KUSTOMIZATION,
        &std::fs::metadata(dir.join(KUSTOMIZATION)).ok()?,
    )?;
    seen += 1;
    if seen != recorded.len() {
        return None;
    }
    Some(Summary {
        unchanged: instances.parse().ok()?,
        objects: objects.parse().ok()?,
        ..Summary::default()
    })
}

/// Records what `render --out` just wrote into `dir` (see [`remembered`]).
/// Best effort: without it the next render just reads the directory.
pub fn remember(dir: &Path, inputs: &str, tree: &Tree) {
    let now = std::time::SystemTime::now();
    let mut text = format!(
        "{MEMO_HEADER}\n{inputs}\n{} {}\n",
        instances(tree).len(),
        tree.objects()
    );
    for (path, content) in &tree.files {
        let Some((len, time)) = std::fs::metadata(dir.join(path))
            .ok()
            .and_then(|m| Some((m.len(), m.modified().ok()?)))
        else {
            return;
        };
        let Ok(nanos) = time.duration_since(std::time::UNIX_EPOCH) else {
            return;
        };
        let racy = now.duration_since(time).map_or(true, |d| d < RACY);
        let digest = if racy { sha256(content) } else { "-".into() };
        text.push_str(&format!("{path}\t{len}\t{}\t{digest}\n", nanos.as_nanos()));
    }
    let Some(file) = memo_file(dir) else {
        return;
    };
    crate::remember_in(&file, text, "the render");
}

/// Forgets what [`remember`] recorded, before the directory changes.
pub fn forget(dir: &Path) -> Result<()> {
    let Some(file) = memo_file(dir) else {
        return Ok(());
    };
    match std::fs::remove_file(&file) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(&file, "remove", e)),
        _ => Ok(()),
    }
}

/// [`stat_walk`] of `dir`, its subdirectories split over the cores (a
/// blueprint directory holds one per instance).
fn stat_walk_parallel(
    dir: &Path,
    prefix: &str,
    check: &(impl Fn(&str, &std::fs::Metadata) -> Option<()> + Sync),
) -> Option<usize> {
    let mut seen = 0;
    let mut subdirectories = Vec::new();
    for entry in entries(dir)? {
        let relative = format!("{prefix}/{}", entry.file_name().to_str()?);
        let meta = entry.metadata().ok()?;
        if meta.is_dir() {
            subdirectories.push((entry.path(), relative));
        } else {
            check(&relative, &meta)?;
            seen += 1;
        }
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = subdirectories.len().div_ceil(threads).max(1);
    let counts: Vec<Option<usize>> = std::thread::scope(|scope| {
        let walkers: Vec<_> = subdirectories
            .chunks(chunk)
            .map(|part| {
                scope.spawn(move || {
                    let mut seen = 0;
                    let mut relative = String::new();
                    for (path, name) in part {
                        relative.clear();
                        relative.push_str(name);
                        seen += stat_walk(path, &mut relative, check)?;
                    }
                    Some(seen)
                })
            })
            .collect();
        walkers
            .into_iter()
            .map(|w| w.join().ok().flatten())
            .collect()
    });
    for count in counts {
        seen += count?;
    }
    Some(seen)
}

/// Calls `check` with each file under `dir` (`relative` is its path from
/// the tree's root) and counts them; `None` as soon as one fails or cannot
/// be read.
fn stat_walk(
    dir: &Path,
    relative: &mut String,
    check: &impl Fn(&str, &std::fs::Metadata) -> Option<()>,
) -> Option<usize> {
    let mut seen = 0;
    for entry in entries(dir)? {
        let name = entry.file_name();
        let length = relative.len();
        relative.push('/');
        relative.push_str(name.to_str()?);
        let meta = entry.metadata().ok()?;
        if meta.is_dir() {
            seen += stat_walk(&entry.path(), relative, check)?;
        } else {
            check(relative, &meta)?;
            seen += 1;
        }
        relative.truncate(length);
    }
    Some(seen)
}

/// The entries of `dir`: none when it does not exist; `None` when it or
/// one of its entries cannot be read.
fn entries(dir: &Path) -> Option<Vec<std::fs::DirEntry>> {
    match std::fs::read_dir(dir) {
        Ok(entries) => entries.map(Result::ok).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(Vec::new()),
        Err(_) => None,
    }
}

fn mtime(meta: &std::fs::Metadata) -> Option<u128> {
    let time = meta.modified().ok()?;
    Some(time.duration_since(std::time::UNIX_EPOCH).ok()?.as_nanos())
}

fn sha256(content: &[u8]) -> String {
    use sha2::Digest as _;
    crate::template::hex(&sha2::Sha256::digest(content))
}

fn is_plain_name(name: &str) -> bool {
    !name.is_empty() && !name.contains('/') && name != "." && name != ".."
}

fn io(path: &Path, what: &str, e: std::io::Error) -> Error {
    Error::Output {
        message: format!("cannot {what} {}: {e}", path.display()),
    }
}
