//! Kiln's output in a Git repository. Trees are hashed in memory and only
//! the objects the object database lacks are written, straight into it,
//! never through a work tree or an index: an unchanged instance directory
//! has the same tree id as before and costs one lookup. Branches move by
//! compare-and-swap, so two renders racing on one branch never lose a commit.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use git2::{ErrorCode, ObjectType, Oid, Repository, Signature};

use crate::tree::{KUSTOMIZATION, Tree};
use crate::{Error, Result, yaml};

const MODE_BLOB: i32 = 0o100_644;
const MODE_TREE: i32 = 0o040_000;

/// A tree or file hashed in memory, with the id Git gives it.
#[derive(Debug)]
pub(crate) struct Node<'a> {
    /// The object id.
    pub id: Oid,
    kind: Kind<'a>,
}

#[derive(Debug)]
enum Kind<'a> {
    Blob(&'a [u8]),
    /// Entries in Git's order, and the tree object's bytes.
    Tree(Vec<(String, Node<'a>)>, Vec<u8>),
    /// A directory that is a tree of this repository already.
    Stored(Stored<'a>),
}

/// The repository a stored directory is in.
#[derive(Clone, Copy)]
struct Stored<'a>(&'a Repository);

impl std::fmt::Debug for Stored<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Stored")
    }
}

#[derive(Default)]
struct Dir<'a> {
    files: Vec<(&'a str, &'a [u8], Oid)>,
    dirs: BTreeMap<&'a str, Dir<'a>>,
    stored: Vec<(&'a str, Oid)>,
}

impl<'a> Node<'a> {
    /// Hashes a rendered tree; nothing is written. Its stored directories
    /// are trees of `repo`.
    pub fn build(tree: &'a Tree, repo: Option<&'a Repository>) -> Result<Node<'a>> {
        // Hashing every file is most of the work: share it between the cores.
        let files: Vec<(&String, &Vec<u8>)> = tree.files.iter().collect();
        let progress = crate::progress::phase("hashing files", files.len() as u64);
        let ids: Vec<Oid> = crate::parallel::chunks(&files, |part| {
            let ids = part
                .iter()
                .map(|(_, content)| Oid::hash_object(ObjectType::Blob, content))
                .collect::<Result<Vec<Oid>, git2::Error>>();
            progress.advance(part.len() as u64);
            ids
        })
        .into_iter()
        .collect::<Result<Vec<Vec<Oid>>, git2::Error>>()
        .map_err(git)?
        .into_iter()
        .flatten()
        .collect();
        let mut root = Dir::default();
        for ((path, content), id) in files.into_iter().zip(ids) {
            let (dir, name) = root.parent_of(path);
            dir.files.push((name, content, id));
        }
        if !tree.stored.is_empty() && repo.is_none() {
            return Err(Error::Git {
                message:
                    "a tree with directories taken from a repository's memo needs that repository"
                        .into(),
            });
        }
        for (path, stored) in &tree.stored {
            let (dir, name) = root.parent_of(path);
            dir.stored.push((name, stored.id));
        }
        Node::directory(root, repo)
    }

    fn directory(dir: Dir<'a>, repo: Option<&'a Repository>) -> Result<Node<'a>> {
        let mut entries = Vec::with_capacity(dir.files.len() + dir.dirs.len());
        for (name, content, id) in dir.files {
            entries.push((
                name.to_string(),
                Node {
                    id,
                    kind: Kind::Blob(content),
                },
            ));
        }
        for (name, sub) in dir.dirs {
            entries.push((name.to_string(), Node::directory(sub, repo)?));
        }
        for (name, id) in dir.stored {
            if let Some(repo) = repo {
                entries.push((
                    name.to_string(),
                    Node {
                        id,
                        kind: Kind::Stored(Stored(repo)),
                    },
                ));
            }
        }
        entries.sort_by_cached_key(|(name, node)| git_order(name, node.is_tree()));
        let mut raw = Vec::with_capacity(entries.len() * 48);
        for (name, node) in &entries {
            let mode = if node.is_tree() { MODE_TREE } else { MODE_BLOB };
            raw.extend_from_slice(format!("{mode:o} {name}\0").as_bytes());
            raw.extend_from_slice(node.id.as_bytes());
        }
        let id = Oid::hash_object(ObjectType::Tree, &raw).map_err(git)?;
        Ok(Node {
            id,
            kind: Kind::Tree(entries, raw),
        })
    }

    /// Whether this is a directory.
    pub fn is_tree(&self) -> bool {
        matches!(self.kind, Kind::Tree(..) | Kind::Stored(_))
    }

    /// The entries of a directory hashed here (none for a file or a stored
    /// directory).
    pub fn entries(&self) -> &[(String, Node<'a>)] {
        match &self.kind {
            Kind::Tree(entries, _) => entries,
            Kind::Blob(_) | Kind::Stored(_) => &[],
        }
    }

    /// The node as one side of a comparison.
    fn item(&'a self) -> Item<'a> {
        match self.kind {
            Kind::Stored(Stored(repo)) => Item::Stored {
                repo,
                id: self.id,
                tree: true,
            },
            _ => Item::Rendered(self),
        }
    }

    /// Writes every object of this tree that the repository lacks and returns
    /// how many it wrote: loose when they are few, else as one pack. A
    /// subtree already there is not descended into.
    pub(crate) fn write(&self, odb: &git2::Odb<'_>) -> Result<usize> {
        // One rescan of the pack directory up front; every lookup after it
        // skips the rescan libgit2 otherwise makes on each miss.
        odb.refresh().map_err(git)?;
        let mut missing = Vec::new();
        self.collect_missing(odb, &mut std::collections::HashSet::new(), &mut missing);
        if missing.len() >= PACK_THRESHOLD {
            crate::git::pack::write(odb, &missing)?;
        } else {
            for (kind, bytes) in &missing {
                odb.write(*kind, bytes).map_err(git)?;
            }
        }
        Ok(missing.len())
    }

    /// Objects the repository lacks, each once (equal files share a blob),
    /// children before their trees.
    fn collect_missing<'s>(
        &'s self,
        odb: &git2::Odb<'_>,
        seen: &mut std::collections::HashSet<Oid>,
        out: &mut Vec<(ObjectType, &'s [u8])>,
    ) {
        if !seen.insert(self.id) || odb.exists_ext(self.id, git2::OdbLookupFlags::NO_REFRESH) {
            return;
        }
        match &self.kind {
            Kind::Blob(content) => out.push((ObjectType::Blob, content)),
            // The memo that named it found it in the repository.
            Kind::Stored(_) => {}
            Kind::Tree(entries, raw) => {
                for (_, node) in entries {
                    node.collect_missing(odb, seen, out);
                }
                out.push((ObjectType::Tree, raw));
            }
        }
    }
}

/// From this many new objects on, they go into one pack instead of a file
/// each (Git's own fetch uses the same cut-off).
const PACK_THRESHOLD: usize = 100;

impl<'a> Dir<'a> {
    /// The directory that holds `path`, made as needed, and the last part.
    fn parent_of(&mut self, path: &'a str) -> (&mut Dir<'a>, &'a str) {
        let (parents, name) = path.rsplit_once('/').unwrap_or(("", path));
        let mut dir = self;
        for part in parents.split('/').filter(|p| !p.is_empty()) {
            dir = dir.dirs.entry(part).or_default();
        }
        (dir, name)
    }
}

/// Git sorts a directory as if its name ended in `/`.
fn git_order(name: &str, tree: bool) -> Vec<u8> {
    let mut key = name.as_bytes().to_vec();
    if tree {
        key.push(b'/');
    }
    key
}

fn checkout_error(file: &Path, error: &std::io::Error) -> Error {
    Error::Git {
        message: format!("cannot bring {} up to date: {error}", file.display()),
    }
}

/// A branch, by its full ref name (`refs/heads/main`); it prints as its
/// short name (`main`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(transparent)]
pub struct Branch(String);

impl Branch {
    /// The full ref name.
    pub fn refname(&self) -> &str {
        &self.0
    }

    /// The name people use: `main`.
    pub fn short(&self) -> &str {
        self.0.strip_prefix("refs/heads/").unwrap_or(&self.0)
    }
}

impl std::fmt::Display for Branch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.short())
    }
}

/// A commit's full id (which it prints as); [`CommitId::short`] is how
/// Kiln's messages name commits.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct CommitId(String);

impl CommitId {
    /// From a full id.
    pub fn new(id: impl Into<String>) -> CommitId {
        CommitId(id.into())
    }

    /// The full id.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first 12 characters.
    pub fn short(&self) -> &str {
        &self.0[..self.0.len().min(12)]
    }
}

impl From<Oid> for CommitId {
    fn from(id: Oid) -> Self {
        CommitId(id.to_string())
    }
}

impl std::fmt::Display for CommitId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Instances added, changed and removed from `old` to `new` (entries of a
/// render directory).
pub(crate) fn summarize(
    old: &BTreeMap<String, Item<'_>>,
    new: &BTreeMap<String, Item<'_>>,
) -> Result<crate::tree::Summary> {
    Ok(crate::tree::Summary::of_instances(
        &instances(old)?,
        &instances(new)?,
    ))
}

/// `path` as trailers and messages name it: `.` for the root.
pub fn path_label(path: &str) -> &str {
    if path.is_empty() { "." } else { path }
}

pub(crate) fn git(error: git2::Error) -> Error {
    Error::from(error)
}

/// What [`Repo::recover_work_tree`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recovery {
    /// Nothing to do: nothing under the path differs from the tip (or the
    /// repository has no work tree).
    Nothing,
    /// Files under the path were behind Kiln's commit and were brought up
    /// to it.
    Recovered {
        /// How many.
        files: usize,
        /// The commit.
        tip: CommitId,
    },
    /// Something under the path holds what neither the tip nor its parent
    /// holds: someone's edit.
    Edited,
}

/// A repository Kiln renders into.
pub struct Repo {
    /// The libgit2 handle: nothing outside this crate touches libgit2.
    pub(crate) git: Repository,
    /// Where it was opened, as the user gave it.
    pub location: PathBuf,
}

impl std::fmt::Debug for Repo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repo")
            .field("location", &self.location)
            .finish_non_exhaustive()
    }
}

/// One entry of a directory, on either side of a comparison.
#[derive(Clone, Copy)]
pub(crate) enum Item<'r> {
    /// An object in the repository.
    Stored {
        /// The repository.
        repo: &'r Repository,
        /// Its id.
        id: Oid,
        /// Whether it is a tree.
        tree: bool,
    },
    /// A node of a render not yet written.
    Rendered(&'r Node<'r>),
}

impl std::fmt::Debug for Item<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Item({})", self.id())
    }
}

impl<'r> Item<'r> {
    /// The object id.
    pub fn id(&self) -> Oid {
        match self {
            Item::Stored { id, .. } => *id,
            Item::Rendered(node) => node.id,
        }
    }

    /// Whether it is a directory.
    pub fn is_tree(&self) -> bool {
        match self {
            Item::Stored { tree, .. } => *tree,
            Item::Rendered(node) => node.is_tree(),
        }
    }

    /// The entries of a directory, by name.
    pub fn entries(&self) -> Result<BTreeMap<String, Item<'r>>> {
        Ok(match self {
            Item::Stored {
                repo,
                id,
                tree: true,
            } => stored_entries(repo, &repo.find_tree(*id).map_err(git)?),
            Item::Stored { .. } => BTreeMap::new(),
            Item::Rendered(node) => node
                .entries()
                .iter()
                .map(|(name, n)| (name.clone(), n.item()))
                .collect(),
        })
    }

    /// A file's content.
    pub fn content(&self) -> Result<Vec<u8>> {
        match self {
            Item::Stored { repo, id, .. } => {
                Ok(repo.find_blob(*id).map_err(git)?.content().to_vec())
            }
            Item::Rendered(Node {
                kind: Kind::Blob(content),
                ..
            }) => Ok(content.to_vec()),
            Item::Rendered(_) => Ok(Vec::new()),
        }
    }
}

fn stored_entries<'r>(repo: &'r Repository, tree: &git2::Tree<'_>) -> BTreeMap<String, Item<'r>> {
    tree.iter()
        .filter_map(|entry| {
            let name = entry.name().ok()?.to_string();
            let kind = entry.kind()?;
            (kind == ObjectType::Tree || kind == ObjectType::Blob).then(|| {
                (
                    name,
                    Item::Stored {
                        repo,
                        id: entry.id(),
                        tree: kind == ObjectType::Tree,
                    },
                )
            })
        })
        .collect()
}

/// A file that differs between two trees; `None` on the side it is missing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Its path below the render's directory.
    pub path: String,
    /// The content before.
    pub old: Option<Vec<u8>>,
    /// The content after.
    pub new: Option<Vec<u8>>,
}

/// Every file that differs between two listings of a directory, in path
/// order; subtrees with equal ids are skipped without being read.
pub(crate) fn compare(
    old: &BTreeMap<String, Item<'_>>,
    new: &BTreeMap<String, Item<'_>>,
) -> Result<Vec<Change>> {
    let mut changes = Vec::new();
    compare_into(old, new, "", &mut changes)?;
    Ok(changes)
}

fn compare_into(
    old: &BTreeMap<String, Item<'_>>,
    new: &BTreeMap<String, Item<'_>>,
    prefix: &str,
    out: &mut Vec<Change>,
) -> Result<()> {
    let mut names: Vec<&String> = old.keys().chain(new.keys()).collect();
    names.sort_unstable();
    names.dedup();
    for name in names {
        let path = format!("{prefix}{name}");
        let (before, after) = (old.get(name), new.get(name));
        if let (Some(b), Some(a)) = (before, after)
            && b.id() == a.id()
            && b.is_tree() == a.is_tree()
        {
            continue;
        }
        if before.is_some_and(Item::is_tree) || after.is_some_and(Item::is_tree) {
            compare_into(
                &tree_of(before)?,
                &tree_of(after)?,
                &format!("{path}/"),
                out,
            )?;
        }
        let (b, a) = (file_of(before)?, file_of(after)?);
        if b.is_some() || a.is_some() {
            out.push(Change {
                path,
                old: b,
                new: a,
            });
        }
    }
    Ok(())
}

/// How many files of `new` are missing from `old` or differ, without
/// reading any of them.
pub(crate) fn files_written(
    old: &BTreeMap<String, Item<'_>>,
    new: &BTreeMap<String, Item<'_>>,
) -> Result<usize> {
    let mut count = 0;
    for (name, item) in new {
        let before = old.get(name);
        if before.is_some_and(|b| b.id() == item.id()) {
            continue;
        }
        if item.is_tree() {
            count += files_written(&tree_of(before)?, &item.entries()?)?;
        } else {
            count += 1;
        }
    }
    Ok(count)
}

fn tree_of<'r>(item: Option<&Item<'r>>) -> Result<BTreeMap<String, Item<'r>>> {
    match item {
        Some(i) if i.is_tree() => i.entries(),
        _ => Ok(BTreeMap::new()),
    }
}

fn file_of(item: Option<&Item<'_>>) -> Result<Option<Vec<u8>>> {
    match item {
        Some(i) if !i.is_tree() => i.content().map(Some),
        _ => Ok(None),
    }
}

/// The entries Kiln owns in a render directory: the root kustomization,
/// the blueprint directories it lists and the emitted `_kiln` directory. Everything else there belongs to
/// someone else and is kept.
pub(crate) fn owned<'r>(
    repo: &'r Repository,
    dir: Option<&git2::Tree<'_>>,
) -> Result<BTreeMap<String, Item<'r>>> {
    let Some(dir) = dir else {
        return Ok(BTreeMap::new());
    };
    let mut all = stored_entries(repo, dir);
    let Some(root) = all.remove(KUSTOMIZATION) else {
        return Ok(BTreeMap::new());
    };
    let text = root.content()?;
    let listed: serde_json::Value =
        yaml::from_str(&String::from_utf8_lossy(&text), KUSTOMIZATION).unwrap_or_default();
    let mut owned: BTreeMap<String, Item<'r>> = listed["resources"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(serde_json::Value::as_str)
        .filter_map(|name| Some((name.to_string(), *all.get(name).filter(|i| i.is_tree())?)))
        .collect();
    owned.insert(KUSTOMIZATION.to_string(), root);
    if let Some(emitted) = all.get(crate::tree::EMIT_DIR).filter(|i| i.is_tree()) {
        owned.insert(crate::tree::EMIT_DIR.to_string(), *emitted);
    }
    Ok(owned)
}

/// Instance directories (`blueprint/instance`) of a listing, with their ids.
pub(crate) fn instances(listing: &BTreeMap<String, Item<'_>>) -> Result<BTreeMap<String, Oid>> {
    let mut out = BTreeMap::new();
    for (blueprint, item) in listing.iter().filter(|(_, i)| i.is_tree()) {
        for (name, instance) in item.entries()? {
            if instance.is_tree() {
                out.insert(format!("{blueprint}/{name}"), instance.id());
            }
        }
    }
    Ok(out)
}

impl Repo {
    /// Opens a repository, bare or not.
    pub fn open(location: &Path) -> Result<Repo> {
        let git = Repository::open(location).map_err(|e| Error::Git {
            message: format!(
                "--git {}: not a Git repository ({}); create one with `git init --bare {}`",
                location.display(),
                e.message(),
                location.display()
            ),
        })?;
        Ok(Repo {
            git,
            location: location.to_path_buf(),
        })
    }

    /// The full ref name of `branch`, or of the branch HEAD names (which
    /// may not exist yet) when none is given.
    pub fn branch_ref(&self, branch: Option<&str>) -> Result<Branch> {
        let name = match branch {
            Some(b) => format!("refs/heads/{}", b.trim_start_matches("refs/heads/")),
            None => match self
                .git
                .find_reference("HEAD")
                .map_err(git)?
                .symbolic_target()
                .ok()
                .flatten()
            {
                Some(target) => target.to_string(),
                None => {
                    return Err(Error::Git {
                        message: format!(
                            "{}: HEAD is detached; name a branch with --branch",
                            self.location.display()
                        ),
                    });
                }
            },
        };
        if !git2::Reference::is_valid_name(&name) {
            return Err(Error::Git {
                message: format!("--branch: {name:?} is not a valid branch name"),
            });
        }
        Ok(Branch(name))
    }

    /// The URL of remote `name`, if it has one.
    pub fn remote_url(&self, name: &str) -> Option<String> {
        let remote = self.git.find_remote(name).ok()?;
        remote.url().ok().map(str::to_string)
    }

    /// The entries Kiln owns under `path` at `commit` (none without one).
    pub(crate) fn owned_at(
        &self,
        commit: Option<&git2::Commit<'_>>,
        path: &str,
    ) -> Result<BTreeMap<String, Item<'_>>> {
        let dir = self.tree_at(commit, path)?;
        owned(&self.git, dir.as_ref())
    }

    /// The commit a ref points to, if the ref exists.
    pub(crate) fn tip(&self, refname: &Branch) -> Result<Option<git2::Commit<'_>>> {
        match self.git.find_reference(refname.refname()) {
            Ok(reference) => Ok(Some(reference.peel_to_commit().map_err(git)?)),
            Err(e) if e.code() == ErrorCode::NotFound => Ok(None),
            Err(e) => Err(git(e)),
        }
    }

    /// The tree at `path` ("" is the root) of a commit, if there is one.
    pub(crate) fn tree_at<'s>(
        &'s self,
        commit: Option<&git2::Commit<'s>>,
        path: &str,
    ) -> Result<Option<git2::Tree<'s>>> {
        let Some(commit) = commit else {
            return Ok(None);
        };
        let root = commit.tree().map_err(git)?;
        if path.is_empty() {
            return Ok(Some(root));
        }
        match root.get_path(Path::new(path)) {
            Ok(entry) if entry.kind() == Some(ObjectType::Tree) => {
                Ok(Some(self.git.find_tree(entry.id()).map_err(git)?))
            }
            Ok(_) => Err(Error::Git {
                message: format!("--path {path}: is a file in {}", commit.id()),
            }),
            Err(e) if e.code() == ErrorCode::NotFound => Ok(None),
            Err(e) => Err(git(e)),
        }
    }

    /// Every file under `tree`, by path relative to it.
    pub(crate) fn read_tree(&self, tree: &git2::Tree<'_>) -> Result<Tree> {
        let mut files = BTreeMap::new();
        let mut failure = None;
        tree.walk(git2::TreeWalkMode::PreOrder, |dir, entry| {
            if entry.kind() != Some(ObjectType::Blob) {
                return git2::TreeWalkResult::Ok;
            }
            match self.git.find_blob(entry.id()) {
                Ok(blob) => {
                    let name = entry.name().unwrap_or_default();
                    files.insert(format!("{dir}{name}"), blob.content().to_vec());
                    git2::TreeWalkResult::Ok
                }
                Err(e) => {
                    failure = Some(git(e));
                    git2::TreeWalkResult::Abort
                }
            }
        })
        .map_err(git)?;
        match failure {
            Some(e) => Err(e),
            None => Ok(Tree {
                files,
                ..Tree::default()
            }),
        }
    }

    /// The root tree of a commit whose `path` directory is `dir`'s entries
    /// with `owned` ones replaced by `entries`; the rest of the branch is
    /// kept. Returns the new root tree id.
    pub fn graft(
        &self,
        base: Option<&git2::Commit<'_>>,
        path: &str,
        replace: &[String],
        entries: &[(String, Oid, bool)],
    ) -> Result<Oid> {
        let root = match base {
            Some(c) => Some(c.tree().map_err(git)?),
            None => None,
        };
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        self.graft_in(root.as_ref(), &parts, replace, entries)
    }

    fn graft_in(
        &self,
        dir: Option<&git2::Tree<'_>>,
        parts: &[&str],
        replace: &[String],
        entries: &[(String, Oid, bool)],
    ) -> Result<Oid> {
        let mut builder = self.git.treebuilder(dir).map_err(git)?;
        match parts.split_first() {
            None => {
                for name in replace {
                    if builder.get(name).map_err(git)?.is_some() {
                        builder.remove(name).map_err(git)?;
                    }
                }
                for (name, id, tree) in entries {
                    builder
                        .insert(name, *id, if *tree { MODE_TREE } else { MODE_BLOB })
                        .map_err(git)?;
                }
            }
            Some((first, rest)) => {
                let child = match builder.get(first).map_err(git)? {
                    Some(entry) if entry.kind() == Some(ObjectType::Tree) => {
                        Some(self.git.find_tree(entry.id()).map_err(git)?)
                    }
                    _ => None,
                };
                let id = self.graft_in(child.as_ref(), rest, replace, entries)?;
                let empty = self.git.find_tree(id).map_err(git)?.is_empty();
                if empty {
                    if builder.get(first).map_err(git)?.is_some() {
                        builder.remove(first).map_err(git)?;
                    }
                } else {
                    builder.insert(first, id, MODE_TREE).map_err(git)?;
                }
            }
        }
        builder.write().map_err(git)
    }

    /// Writes a commit of `tree` on `parent` without moving any ref.
    pub(crate) fn commit(
        &self,
        tree: Oid,
        parent: Option<&git2::Commit<'_>>,
        message: &str,
        author: &Signature<'_>,
        committer: &Signature<'_>,
    ) -> Result<Oid> {
        let tree = self.git.find_tree(tree).map_err(git)?;
        let parents: Vec<&git2::Commit<'_>> = parent.into_iter().collect();
        self.git
            .commit(None, author, committer, message, &tree, &parents)
            .map_err(git)
    }

    /// Moves `refname` from `expected` (None: it must not exist) to `new`.
    /// Returns false, moving nothing, when someone else moved it first.
    pub fn advance(
        &self,
        refname: &Branch,
        expected: Option<Oid>,
        new: Oid,
        log: &str,
    ) -> Result<bool> {
        // The compare happens under the reference's lock. A branch that
        // must not exist yet is compared with the zero id: creating it with
        // `force` false checks for it before taking the lock, so two
        // writers creating it at once could both succeed, the second
        // silently dropping the first one's commit.
        let current = expected.unwrap_or(Oid::ZERO_SHA1);
        let result = self
            .git
            .reference_matching(refname.refname(), new, true, current, log)
            .map(|_| ());
        match result {
            Ok(()) => Ok(true),
            Err(e)
                if matches!(
                    e.code(),
                    ErrorCode::Modified | ErrorCode::Exists | ErrorCode::Locked
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(git(e)),
        }
    }

    /// The signatures of a new commit: `author` ("Name <email>") when given,
    /// else `GIT_AUTHOR_NAME`/`GIT_AUTHOR_EMAIL`, else the repository's
    /// `user.name`/`user.email`, else `kiln <kiln@localhost>`; the committer
    /// likewise from `GIT_COMMITTER_*`, falling back to the author.
    pub fn signatures(
        &self,
        author: Option<&str>,
    ) -> Result<(Signature<'static>, Signature<'static>)> {
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let configured = self.git.signature().ok();
        let fallback_name = configured
            .as_ref()
            .and_then(|s| s.name().ok().map(str::to_string))
            .unwrap_or_else(|| "kiln".to_string());
        let fallback_email = configured
            .as_ref()
            .and_then(|s| s.email().ok().map(str::to_string))
            .unwrap_or_else(|| "kiln@localhost".to_string());
        let (author_name, author_email) = match author {
            Some(text) => parse_identity(text)?,
            None => (
                env("GIT_AUTHOR_NAME").unwrap_or(fallback_name),
                env("GIT_AUTHOR_EMAIL").unwrap_or(fallback_email),
            ),
        };
        let committer_name = env("GIT_COMMITTER_NAME").unwrap_or_else(|| author_name.clone());
        let committer_email = env("GIT_COMMITTER_EMAIL").unwrap_or_else(|| author_email.clone());
        Ok((
            Signature::now(&author_name, &author_email).map_err(git)?,
            Signature::now(&committer_name, &committer_email).map_err(git)?,
        ))
    }
}

/// Work trees and remotes.
impl Repo {
    /// Whether `refname` is the branch checked out in this repository's work
    /// tree (never for a bare repository).
    pub fn checked_out(&self, refname: &Branch) -> bool {
        !self.git.is_bare()
            && self
                .git
                .find_reference("HEAD")
                .ok()
                .and_then(|h| {
                    h.symbolic_target()
                        .ok()
                        .flatten()
                        .map(|t| t == refname.refname())
                })
                .unwrap_or(false)
    }

    /// Refuses when the work tree or index has changes under `path` that a
    /// commit would leave stale or overwrite.
    pub fn check_clean(&self, path: &str) -> Result<()> {
        let dirty = self.dirty(path)?;
        if dirty.is_empty() {
            return Ok(());
        }
        Err(Error::from(crate::Refusal::DirtyWorkTree {
            repo: self.location.display().to_string(),
            path: path_label(path).to_string(),
            files: dirty,
        }))
    }

    /// Finishes the checkout of an interrupted render. The caller knows the
    /// checked-out branch's tip is Kiln's commit for `path`: when every
    /// changed file under `path` (in the index and the work tree) holds what
    /// that commit or its parent holds there, Kiln moved the branch and was
    /// stopped before the work tree followed. Those files are brought up to
    /// the tip; returns how many, and the tip. When a changed file holds
    /// anything else (a person's edit) nothing is touched and the answer
    /// says so.
    pub(crate) fn recover_work_tree(&self, tip: &git2::Commit<'_>, path: &str) -> Result<Recovery> {
        let dirty = self.dirty(path)?;
        if dirty.is_empty() {
            return Ok(Recovery::Nothing);
        }
        let Some(workdir) = self.git.workdir().map(Path::to_path_buf) else {
            return Ok(Recovery::Nothing);
        };
        let tip_tree = tip.tree().map_err(git)?;
        let parent_tree = match tip.parent(0) {
            Ok(parent) => Some(parent.tree().map_err(git)?),
            Err(_) => None,
        };
        let blob = |tree: Option<&git2::Tree<'_>>, file: &str| {
            tree.and_then(|t| t.get_path(Path::new(file)).ok())
                .filter(|e| e.kind() == Some(git2::ObjectType::Blob))
                .map(|e| e.id())
        };
        let mut index = self.git.index().map_err(git)?;
        for file in &dirty {
            let ours = [
                blob(Some(&tip_tree), file),
                blob(parent_tree.as_ref(), file),
            ];
            let staged = index.get_path(Path::new(file), 0).map(|e| e.id);
            let on_disk = workdir.join(file);
            let written = if on_disk.is_file() {
                Some(Oid::hash_file(git2::ObjectType::Blob, &on_disk).map_err(git)?)
            } else if on_disk.exists() {
                return Ok(Recovery::Edited);
            } else {
                None
            };
            if !ours.contains(&staged) || !ours.contains(&written) {
                return Ok(Recovery::Edited);
            }
        }
        for file in &dirty {
            let on_disk = workdir.join(file);
            match blob(Some(&tip_tree), file) {
                Some(id) => {
                    let content = self.git.find_blob(id).map_err(git)?;
                    if let Some(dir) = on_disk.parent() {
                        std::fs::create_dir_all(dir).map_err(|e| checkout_error(&on_disk, &e))?;
                    }
                    std::fs::write(&on_disk, content.content())
                        .map_err(|e| checkout_error(&on_disk, &e))?;
                    index.add_path(Path::new(file)).map_err(git)?;
                }
                None => {
                    if on_disk.exists() {
                        std::fs::remove_file(&on_disk).map_err(|e| checkout_error(&on_disk, &e))?;
                    }
                    // Directories it leaves empty go too, as a checkout does.
                    let root = workdir.join(path);
                    let mut dir = on_disk.parent();
                    while let Some(d) = dir.filter(|d| d.starts_with(&root) && *d != root) {
                        if std::fs::remove_dir(d).is_err() {
                            break;
                        }
                        dir = d.parent();
                    }
                    if index.get_path(Path::new(file), 0).is_some() {
                        index.remove_path(Path::new(file)).map_err(git)?;
                    }
                }
            }
        }
        index.write().map_err(git)?;
        Ok(Recovery::Recovered {
            files: dirty.len(),
            tip: CommitId::from(tip.id()),
        })
    }

    /// Paths under `path` whose index or work tree differs from HEAD
    /// (untracked files included).
    fn dirty(&self, path: &str) -> Result<Vec<String>> {
        let mut options = git2::StatusOptions::new();
        options.include_untracked(true).recurse_untracked_dirs(true);
        if !path.is_empty() {
            options.pathspec(path);
        }
        let statuses = self.git.statuses(Some(&mut options)).map_err(git)?;
        Ok(statuses
            .iter()
            .filter(|s| !s.status().is_ignored())
            .filter_map(|s| s.path().ok().map(str::to_string))
            .collect())
    }

    /// Brings the index and work tree under `path` to HEAD after Kiln moved
    /// the checked-out branch.
    pub fn update_work_tree(&self, path: &str) -> Result<()> {
        let mut checkout = git2::build::CheckoutBuilder::new();
        checkout.force();
        if !path.is_empty() {
            checkout.path(path);
        }
        self.git.checkout_head(Some(&mut checkout)).map_err(git)
    }

    /// Pushes `refname` to the remote of that name (or URL), refusing
    /// anything but a fast-forward. Credentials come from the usual places:
    /// the SSH agent, Git's credential helpers, the default identity.
    pub fn push(&self, remote: &str, refname: &Branch) -> Result<()> {
        let mut target = match self.git.find_remote(remote) {
            Ok(r) => r,
            Err(_) => self.git.remote_anonymous(remote).map_err(|e| Error::Git {
                message: format!("--remote {remote}: no such remote ({})", e.message()),
            })?,
        };
        let config = self.git.config().map_err(git)?;
        let rejected = std::cell::RefCell::new(None::<String>);
        let mut callbacks = git2::RemoteCallbacks::new();
        callbacks.credentials(|url, username, allowed| {
            if allowed.contains(git2::CredentialType::SSH_KEY) {
                return git2::Cred::ssh_key_from_agent(username.unwrap_or("git"));
            }
            if allowed.contains(git2::CredentialType::USER_PASS_PLAINTEXT) {
                return git2::Cred::credential_helper(&config, url, username);
            }
            git2::Cred::default()
        });
        callbacks.push_update_reference(|_, status| {
            if let Some(status) = status {
                *rejected.borrow_mut() = Some(status.to_string());
            }
            Ok(())
        });
        let mut options = git2::PushOptions::new();
        options.remote_callbacks(callbacks);
        let branch = refname.short();
        let refusal = |reason: &str| Error::Git {
            message: format!(
                "push of {branch} to {remote} refused: {reason}; fetch, resolve, and render again"
            ),
        };
        match target.push(&[format!("{0}:{0}", refname.refname())], Some(&mut options)) {
            Ok(()) => {}
            Err(e)
                if e.code() == ErrorCode::NotFastForward
                    || e.message().contains("not present locally")
                    || e.message().contains("fastforward") =>
            {
                return Err(refusal(
                    "the remote branch has commits this repository lacks (not a fast-forward)",
                ));
            }
            Err(e) => {
                return Err(Error::Git {
                    message: format!("push of {branch} to {remote} failed: {}", e.message()),
                });
            }
        }
        drop(options);
        if let Some(reason) = rejected.into_inner() {
            return Err(refusal(&reason));
        }
        Ok(())
    }
}

fn parse_identity(text: &str) -> Result<(String, String)> {
    let bad = || Error::Git {
        message: format!("--author {text:?}: expected \"Name <email>\""),
    };
    let (name, rest) = text.split_once('<').ok_or_else(bad)?;
    let email = rest.strip_suffix('>').ok_or_else(bad)?;
    Ok((name.trim().to_string(), email.trim().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(files: &[(&str, &str)]) -> Tree {
        Tree {
            files: files
                .iter()
                .map(|(p, c)| (p.to_string(), c.as_bytes().to_vec()))
                .collect(),
            ..Tree::default()
        }
    }

    #[test]
    fn in_memory_ids_are_the_ids_git_gives() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let repo = Repository::init_bare(dir.path())?;
        // `a-b` sorts before the directory `a` in Git's order, not after it.
        let files = tree(&[
            ("a/x.yaml", "1\n"),
            ("a-b", "2\n"),
            ("a.c/y", "3\n"),
            ("k.yaml", "4\n"),
        ]);
        let node = Node::build(&files, None)?;
        let odb = repo.odb()?;
        assert_eq!(node.write(&odb)?, 7, "4 blobs and 3 trees");
        assert_eq!(repo.find_tree(node.id)?.len(), 4);
        let mut index = git2::Index::new()?;
        for (path, content) in &files.files {
            let blob = repo.blob(content)?;
            index.add(&git2::IndexEntry {
                ctime: git2::IndexTime::new(0, 0),
                mtime: git2::IndexTime::new(0, 0),
                dev: 0,
                ino: 0,
                mode: 0o100_644,
                uid: 0,
                gid: 0,
                file_size: 0,
                id: blob,
                flags: path.len() as u16,
                flags_extended: 0,
                path: path.as_bytes().to_vec(),
            })?;
        }
        assert_eq!(
            index.write_tree_to(&repo)?,
            node.id,
            "libgit2's own tree of the same files"
        );
        assert_eq!(node.write(&odb)?, 0, "nothing is written twice");
        Ok(())
    }

    #[test]
    fn compare_lists_changed_files_only() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let repo = Repository::init_bare(dir.path())?;
        let before = tree(&[
            ("web/a/x.yaml", "1\n"),
            ("web/b/x.yaml", "2\n"),
            ("web/c/x.yaml", "3\n"),
        ]);
        let after = tree(&[
            ("web/a/x.yaml", "1\n"),
            ("web/b/x.yaml", "22\n"),
            ("web/d/x.yaml", "4\n"),
        ]);
        let stored = Node::build(&before, None)?;
        stored.write(&repo.odb()?)?;
        let rendered = Node::build(&after, None)?;
        let old = Item::Stored {
            repo: &repo,
            id: stored.id,
            tree: true,
        }
        .entries()?;
        let changes = compare(&old, &Item::Rendered(&rendered).entries()?)?;
        let paths: Vec<(&str, bool, bool)> = changes
            .iter()
            .map(|c| (c.path.as_str(), c.old.is_some(), c.new.is_some()))
            .collect();
        assert_eq!(
            paths,
            [
                ("web/b/x.yaml", true, true),
                ("web/c/x.yaml", true, false),
                ("web/d/x.yaml", false, true)
            ]
        );
        assert_eq!(changes[0].new.as_deref(), Some(&b"22\n"[..]));
        Ok(())
    }

    #[test]
    fn writers_creating_one_branch_at_once_leave_exactly_one_winner()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let repo = Repository::init_bare(dir.path())?;
        let tree = repo.treebuilder(None)?.write()?;
        let who = Signature::now("t", "t@example.com")?;
        let commits: Vec<Oid> = (0..6)
            .map(|i| {
                let tree = repo.find_tree(tree)?;
                repo.commit(None, &who, &who, &format!("c{i}"), &tree, &[])
            })
            .collect::<Result<_, _>>()?;
        for round in 0..150 {
            let branch = Branch(format!("refs/heads/race-{round}"));
            let barrier = std::sync::Barrier::new(commits.len());
            let won: Vec<bool> = std::thread::scope(|scope| {
                let writers: Vec<_> = commits
                    .iter()
                    .map(|&commit| {
                        let (branch, barrier, path) = (&branch, &barrier, dir.path());
                        scope.spawn(move || {
                            let repo = Repo::open(path).unwrap();
                            barrier.wait();
                            repo.advance(branch, None, commit, "race").unwrap()
                        })
                    })
                    .collect();
                writers.into_iter().map(|w| w.join().unwrap()).collect()
            });
            let winners = won.iter().filter(|w| **w).count();
            assert_eq!(winners, 1, "round {round}: {won:?}");
            let tip = repo.refname_to_id(branch.refname())?;
            assert_eq!(Some(tip), won.iter().position(|w| *w).map(|i| commits[i]));
        }
        Ok(())
    }
}
