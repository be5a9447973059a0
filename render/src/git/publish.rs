//! A render committed to a branch: the guards that refuse it (pin, drift,
//! mass deletion, plaintext Secrets), the commit message with its trailers,
//! and the compare-and-swap that moves the branch.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use git2::Oid;
use serde::Serialize;
use sha2::Digest as _;

use crate::git::history::{self, Action, Record};
use crate::git::repo::{self, Branch, CommitId, Item, Node, Repo, git};
use crate::render::{Compiled, Rendered};
use crate::source::Row;
use crate::template::hex;
use crate::tree::{Summary, Tree};
use crate::{Error, MassDeletion, Refusal, Result};

/// The default `deletionGuard.maxPercent`.
pub const DEFAULT_MAX_DELETE_PERCENT: u32 = 20;

/// The deletion guard's threshold a Pipeline sets, else the default: the
/// one place every path that removes objects reads it from.
pub fn max_delete_percent(
    pipeline: Option<&crate::config::Named<crate::api::PipelineSpec>>,
) -> u32 {
    pipeline
        .and_then(|p| p.spec.deletion_guard.as_ref())
        .map_or(DEFAULT_MAX_DELETE_PERCENT, |g| g.max_percent)
}

/// How many times a render retries when another moved the branch first.
const ATTEMPTS: usize = 8;

/// Where and how to commit.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The branch (None: HEAD's).
    pub branch: Option<String>,
    /// The render directory, `""` for the root.
    pub path: String,
    /// A first line to use instead of the generated one.
    pub message: Option<String>,
    /// `Name <email>` of the author.
    pub author: Option<String>,
    /// Replace changes Kiln did not make.
    pub overwrite_drift: bool,
    /// Let a render remove more than `max_delete_percent` of the instances.
    pub allow_mass_delete: bool,
    /// `deletionGuard.maxPercent`.
    pub max_delete_percent: u32,
    /// More trailers for a render commit (a rollout's state).
    pub trailers: Vec<(String, String)>,
}

/// A directory inside a repository in canonical form: `a//b/` → `a/b`;
/// `.` and `/` → the root; `..` is refused.
pub fn normalise_path(path: &str) -> std::result::Result<String, String> {
    let parts: Vec<&str> = path
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    if parts.contains(&"..") {
        return Err(format!("{path}: must stay inside the repository (no '..')"));
    }
    Ok(parts.join("/"))
}

/// Where renders are committed: an opened repository, and how.
#[derive(Debug)]
pub struct Target {
    /// The repository.
    pub repo: Repo,
    /// Branch, path, guards.
    pub options: Options,
    /// The remote `repo` is a clone of: fetched before a render, pushed
    /// after a commit.
    pub remote: Option<super::remote::Remote>,
}

/// What a render would change on the branch.
#[derive(Debug, Clone)]
pub struct Comparison {
    /// File by file.
    pub changes: Vec<repo::Change>,
    /// Instance by instance.
    pub summary: Summary,
}

/// The work tree of the target branch, as [`Target::prepare_work_tree`]
/// left it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkTree {
    /// The branch is checked out: a commit must pass
    /// [`Repo::check_clean`] and then update the work tree.
    pub checked_out: bool,
    /// Files an interrupted render left behind Kiln's commit, brought up to
    /// it: how many, and the commit.
    pub recovered: Option<(usize, CommitId)>,
}

impl Target {
    /// The branch's full ref name.
    pub fn refname(&self) -> Result<Branch> {
        self.repo.branch_ref(self.options.branch.as_deref())
    }

    /// The commit `rev` names, or the branch's tip (None on a branch with
    /// no commit yet).
    fn commit(&self, rev: Option<&str>) -> Result<Option<git2::Commit<'_>>> {
        match rev {
            Some(rev) => self
                .repo
                .git
                .revparse_single(rev)
                .and_then(|o| o.peel_to_commit())
                .map(Some)
                .map_err(|e| Error::Git {
                    message: format!("{rev}: {}", e.message()),
                }),
            None => self.repo.tip(&self.refname()?),
        }
    }

    /// The rendered tree under the path at `rev` (default: the branch's
    /// tip), for `kiln apply --git`.
    pub fn tree(&self, rev: Option<&str>) -> Result<Tree> {
        let location = self.repo.location.display();
        let Some(commit) = self.commit(rev)? else {
            return Err(Error::Git {
                message: format!("{location}: branch {} has no commits", self.refname()?),
            });
        };
        let path = &self.options.path;
        let Some(dir) = self.repo.tree_at(Some(&commit), path)? else {
            return Err(Error::Git {
                message: format!(
                    "{location}: commit {} has no directory {}",
                    commit.id(),
                    history::path_label(path)
                ),
            });
        };
        self.repo.read_tree(&dir)
    }

    /// The branch's tip and the id of the tree under the path there, when
    /// the tip is not `known`; None when it is, or the branch or the
    /// directory does not exist yet.
    pub fn tip_dir(&self, known: Option<&CommitId>) -> Result<Option<(CommitId, String)>> {
        let Some(commit) = self.commit(None)? else {
            return Ok(None);
        };
        let id = CommitId::from(commit.id());
        if known == Some(&id) {
            return Ok(None);
        }
        let dir = self.repo.tree_at(Some(&commit), &self.options.path)?;
        Ok(dir.map(|dir| (id, dir.id().to_string())))
    }

    /// The files of a tree of the repository (see [`Target::tip_dir`]).
    pub fn read_tree(&self, id: &str) -> Result<Tree> {
        let tree = Oid::from_str(id)
            .and_then(|id| self.repo.git.find_tree(id))
            .map_err(git)?;
        self.repo.read_tree(&tree)
    }

    /// The rollback that pins the branch for the path, if one does.
    pub fn pin(&self) -> Result<Option<Record>> {
        history::pin(self.commit(None)?.as_ref(), &self.options.path)
    }

    /// Kiln's commits for the path, newest first, at most `limit`.
    pub fn history(&self, limit: usize) -> Result<Vec<Record>> {
        history::records(self.commit(None)?.as_ref(), &self.options.path, limit)
    }

    /// Changes under the path that Kiln did not make since its last commit
    /// there (None when there are none).
    pub fn drift(&self) -> Result<Option<history::Drift>> {
        let tip = self.commit(None)?;
        let path = &self.options.path;
        let last = history::last(tip.as_ref(), path)?;
        history::drift(&self.repo, tip.as_ref(), path, last.as_ref())
    }

    /// What `tree` would change under the path at `base` (default: the
    /// branch's tip), leaving out what `--emit` wrote there.
    pub fn compare(&self, base: Option<&str>, tree: &Tree) -> Result<Comparison> {
        let commit = self.commit(base)?;
        let mut old = self.repo.owned_at(commit.as_ref(), &self.options.path)?;
        old.remove(crate::tree::EMIT_DIR);
        let node = Node::build(tree, Some(&self.repo.git))?;
        let new = Item::Rendered(&node).entries()?;
        Ok(Comparison {
            changes: repo::compare(&old, &new)?,
            summary: repo::summarize(&old, &new)?,
        })
    }

    /// Before Kiln touches the branch: when it is checked out, finishes the
    /// work-tree update of a render that was stopped after it moved the
    /// branch. When Kiln's commit is at the tip and the work tree holds
    /// someone's edits, refuses at once: even a render with nothing to
    /// commit must not leave it half updated.
    pub fn prepare_work_tree(&self) -> Result<WorkTree> {
        let refname = self.refname()?;
        if !self.repo.checked_out(&refname) {
            return Ok(WorkTree {
                checked_out: false,
                recovered: None,
            });
        }
        let path = &self.options.path;
        let tip = self.repo.tip(&refname)?;
        // Only Kiln's own commit is finished; anything else is left to the
        // clean-work-tree check before a commit.
        let Some(tip) = tip.filter(|t| history::record(t, path).is_some()) else {
            return Ok(WorkTree {
                checked_out: true,
                recovered: None,
            });
        };
        let recovered = match self.repo.recover_work_tree(&tip, path)? {
            repo::Recovery::Nothing => None,
            repo::Recovery::Recovered { files, tip } => Some((files, tip)),
            repo::Recovery::Edited => {
                self.repo.check_clean(path)?;
                None
            }
        };
        Ok(WorkTree {
            checked_out: true,
            recovered,
        })
    }
}

/// What the render is made of, recorded in trailers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inputs {
    /// `sha256:` digest of the blueprints and templates.
    pub config: String,
    /// `sha256:` digest of each source's rows.
    pub sources: BTreeMap<String, String>,
}

impl Inputs {
    /// Digests the compiled blueprints, the specs of their sources (the key
    /// and active columns shape the output as much as the rows do) and the
    /// rows read.
    pub fn digest(
        blueprints: &[Compiled],
        configuration: &crate::config::Config,
        rows: &BTreeMap<String, Vec<Row>>,
    ) -> Inputs {
        let mut config = sha2::Sha256::new();
        // A new version of Kiln may render the same inputs differently.
        config.update(env!("CARGO_PKG_VERSION").as_bytes());
        config.update([0]);
        for blueprint in blueprints {
            config.update(blueprint.name.as_bytes());
            config.update([0]);
            config.update(blueprint.digest.as_bytes());
        }
        let sources = rows
            .iter()
            .map(|(name, rows)| {
                let mut hasher = sha2::Sha256::new();
                if let Some(source) = configuration.sources.get(name) {
                    hasher.update(serde_json::to_vec(&source.spec).unwrap_or_default());
                    hasher.update(b"\n");
                }
                for row in rows {
                    hasher.update(serde_json::to_vec(&row.values).unwrap_or_default());
                    hasher.update(b"\n");
                }
                (name.clone(), format!("sha256:{}", hex(&hasher.finalize())))
            })
            .collect();
        Inputs {
            config: format!("sha256:{}", hex(&config.finalize())),
            sources,
        }
    }
}

impl Inputs {
    /// Folds anything else that shapes the tree (emitted files, their
    /// settings) into the configuration digest.
    pub fn with(mut self, extra: &str) -> Inputs {
        if !extra.is_empty() {
            let mut config = sha2::Sha256::new();
            config.update(self.config.as_bytes());
            config.update([0]);
            config.update(extra.as_bytes());
            self.config = format!("sha256:{}", hex(&config.finalize()));
        }
        self
    }

    /// The `Kiln-Source` trailer values: `<source> sha256:<digest>`.
    fn source_lines(&self) -> Vec<String> {
        self.sources
            .iter()
            .map(|(name, digest)| format!("{name} {digest}"))
            .collect()
    }

    /// Whether `record` is a render of exactly these inputs.
    pub fn rendered_by(&self, record: &Record) -> bool {
        let trailer = |key: &'static str| {
            record
                .trailers
                .iter()
                .filter(move |(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        };
        let sources = self.source_lines();
        matches!(record.action, Action::Render { .. })
            && trailer(history::CONFIG).eq([self.config.as_str()])
            && trailer(history::SOURCE).eq(sources.iter().map(String::as_str))
    }
}

/// The branch as Kiln's last render left it, when that render had exactly
/// these inputs and nothing changed the directory since: rendering again
/// would give the same tree, so the render itself can be skipped.
pub fn up_to_date(repo: &Repo, options: &Options, inputs: &Inputs) -> Result<Option<Published>> {
    let refname = repo.branch_ref(options.branch.as_deref())?;
    let tip = repo.tip(&refname)?;
    let path = options.path.as_str();
    let Some(last) = history::last(tip.as_ref(), path)? else {
        return Ok(None);
    };
    let remembered = tip
        .as_ref()
        .is_some_and(|t| recall(repo, &refname, path) == Some(memo(t.id(), inputs)));
    if !remembered
        && (!inputs.rendered_by(&last)
            || history::drift(repo, tip.as_ref(), path, Some(&last))?.is_some())
    {
        return Ok(None);
    }
    let instances = repo::instances(&repo.owned_at(tip.as_ref(), path)?)?;
    Ok(Some(Published {
        branch: refname,
        commit: None,
        tree: last.tree,
        summary: Summary {
            unchanged: instances.len(),
            ..Summary::default()
        },
        objects_written: 0,
    }))
}

/// Inputs whose render a commit already holds. Trailers record the inputs
/// of the render that made a commit; a render whose inputs changed but whose
/// tree did not (a column no template reads) makes no commit, so the
/// repository remembers it, per branch and path, in `kiln/` of its Git
/// directory. Local and best effort: a clone without it just renders.
fn memo(tip: Oid, inputs: &Inputs) -> String {
    format!(
        "{tip}\n{}\n{}\n",
        inputs.config,
        inputs.source_lines().join("\n")
    )
}

fn memo_file(repo: &Repo, refname: &Branch, path: &str) -> std::path::PathBuf {
    let key = sha2::Sha256::digest(format!("{}\0{path}", refname.refname()).as_bytes());
    repo.git.path().join("kiln").join(&hex(&key)[..16])
}

fn recall(repo: &Repo, refname: &Branch, path: &str) -> Option<String> {
    std::fs::read_to_string(memo_file(repo, refname, path)).ok()
}

fn remember(repo: &Repo, refname: &Branch, path: &str, tip: Oid, inputs: &Inputs) {
    let file = memo_file(repo, refname, path);
    crate::remember_in(&file, memo(tip, inputs), "the render's inputs");
}

/// The per-instance memo of renders into `options.path` of the branch
/// (see [`crate::memo`]), kept beside the inputs memo in `kiln/` of the Git
/// directory; empty when there is none or it cannot be trusted.
pub fn instance_memo(repo: &Repo, options: &Options) -> Result<crate::memo::Memo> {
    let refname = repo.branch_ref(options.branch.as_deref())?;
    let file = memo_file(repo, &refname, &options.path).with_extension("instances");
    Ok(crate::memo::Memo::load(&repo.git, &file))
}

/// Records what `published` (a render of `rendered` with a memo) holds of
/// each instance, for [`instance_memo`]. Best effort.
pub fn remember_instances(
    repo: &Repo,
    options: &Options,
    rendered: &Rendered,
    published: &Published,
) {
    let Ok(root) = Oid::from_str(&published.tree) else {
        return;
    };
    let file = memo_file(repo, &published.branch, &options.path).with_extension("instances");
    crate::memo::Memo::save(&repo.git, &file, rendered, root);
}

/// What a render did to the branch.
#[derive(Debug, Clone, Serialize)]
pub struct Published {
    /// The branch (its full ref name in JSON).
    pub branch: Branch,
    /// The new commit, or None when nothing changed.
    pub commit: Option<CommitId>,
    /// The rendered tree's id (the same for the same render in any repository).
    pub tree: String,
    /// Instances added, changed, removed.
    #[serde(flatten)]
    pub summary: Summary,
    /// Objects written to the object database.
    pub objects_written: usize,
}

/// Refuses a render that would remove too many instances, or all of them.
pub fn check_deletions(summary: &Summary, max_percent: u32) -> std::result::Result<(), Refusal> {
    let before = summary.before();
    let removed = summary.removed.len();
    if before == 0 || removed == 0 {
        return Ok(());
    }
    let refuse = |blueprint: Option<&String>, names: Vec<String>| {
        Err(Refusal::MassDeletion(MassDeletion {
            removed: names.len(),
            before,
            max_percent,
            blueprint: blueprint.cloned(),
            names,
        }))
    };
    if removed == before {
        return refuse(None, summary.removed.clone());
    }
    if let Some(blueprint) = summary.emptied.first() {
        let prefix = format!("{blueprint}/");
        let gone = summary
            .removed
            .iter()
            .filter(|n| n.starts_with(&prefix))
            .cloned()
            .collect();
        return refuse(Some(blueprint), gone);
    }
    if removed as u64 * 100 > u64::from(max_percent) * before as u64 {
        return refuse(None, summary.removed.clone());
    }
    Ok(())
}

/// Refuses Secrets whose values would be committed in plain text.
pub fn check_secrets(rendered: &Rendered) -> Result<()> {
    let plain: Vec<String> = rendered
        .instances
        .iter()
        .flat_map(|i| i.objects.iter().map(move |o| (i, o)))
        .filter(|(_, o)| o.plaintext_secret)
        .map(|(i, o)| {
            format!(
                "{}/{}/{}.yaml (row {})",
                i.blueprint, i.name, o.resource, i.key
            )
        })
        .collect();
    if plain.is_empty() {
        return Ok(());
    }
    Err(Error::from(Refusal::PlaintextSecrets { objects: plain }))
}

/// Refuses to move a pinned branch.
pub fn check_pin(repo: &Repo, refname: &Branch, path: &str, pin: Option<&Record>) -> Result<()> {
    let Some(pin) = pin else { return Ok(()) };
    let to = match &pin.action {
        Action::Rollback { to } => to.as_str(),
        _ => "?",
    };
    let branch = refname.short();
    let path_flag = if path.is_empty() {
        String::new()
    } else {
        format!(" --path {path}")
    };
    Err(Error::from(Refusal::Pinned {
        branch: branch.to_string(),
        to: to.to_string(),
        commit: pin.commit.clone(),
        repo: repo.location.display().to_string(),
        path_flag,
    }))
}

/// Commits the rendered `tree` under `options.path` of the branch, unless it
/// is unchanged. Guards run against the branch as it is when the commit is
/// made; a render that loses a race re-checks and retries.
pub fn publish(repo: &Repo, tree: &Tree, inputs: &Inputs, options: &Options) -> Result<Published> {
    let refname = repo.branch_ref(options.branch.as_deref())?;
    let node = Node::build(tree, Some(&repo.git))?;
    let (author, committer) = repo.signatures(options.author.as_deref())?;
    until_moved(&refname, "render", || {
        match attempt(
            repo,
            &refname,
            &node,
            tree,
            inputs,
            options,
            (&author, &committer),
        )? {
            Attempt::Unchanged(published, tip) => {
                remember(repo, &refname, &options.path, tip, inputs);
                Ok(Some(published))
            }
            Attempt::Commit {
                commit,
                expected,
                published,
            } => {
                let log = format!("kiln render: {}", published.summary.line());
                if repo.advance(&refname, expected, commit, &log)? {
                    remember(repo, &refname, &options.path, commit, inputs);
                    return Ok(Some(published));
                }
                Ok(None)
            }
        }
    })
}

/// Runs `attempt` until it moves the branch (`Some`) or the attempts run
/// out. A lost race (`None`: another writer moved the branch first) waits a
/// little, longer each time and by a varying amount, so that writers that
/// collided do not collide again at once; the next attempt re-checks every
/// guard against the new tip.
fn until_moved<T>(
    refname: &Branch,
    what: &str,
    mut attempt: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    for round in 0..ATTEMPTS {
        if let Some(done) = attempt()? {
            return Ok(done);
        }
        tracing::info!(branch = %refname, "the branch moved during the {what}; retrying");
        let spread = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::from(d.subsec_nanos()) % 20);
        std::thread::sleep(std::time::Duration::from_millis(
            10 * (round as u64 + 1) + spread,
        ));
    }
    Err(Error::Git {
        message: format!(
            "{refname} kept moving during the {what} ({ATTEMPTS} attempts); try again"
        ),
    })
}

enum Attempt {
    /// Nothing to commit on this tip.
    Unchanged(Published, Oid),
    Commit {
        commit: Oid,
        expected: Option<Oid>,
        published: Published,
    },
}

/// Checks the guards against the branch as it is now and writes a commit
/// on its tip, without moving the branch.
fn attempt(
    repo: &Repo,
    refname: &Branch,
    node: &Node<'_>,
    tree: &Tree,
    inputs: &Inputs,
    options: &Options,
    (author, committer): (&git2::Signature<'_>, &git2::Signature<'_>),
) -> Result<Attempt> {
    let tip = repo.tip(refname)?;
    let path = options.path.as_str();
    let last = history::last(tip.as_ref(), path)?;
    check_pin(repo, refname, path, last.as_ref().filter(|r| r.pins()))?;
    if !options.overwrite_drift
        && let Some(drift) = history::drift(repo, tip.as_ref(), path, last.as_ref())?
    {
        return Err(Error::from(Refusal::RepoDrift {
            path: history::path_label(path).to_string(),
            branch: refname.short().to_string(),
            summary: drift.line(),
        }));
    }
    let old = repo.owned_at(tip.as_ref(), path)?;
    let new = Item::Rendered(node).entries()?;
    let mut summary = repo::summarize(&old, &new)?;
    summary.objects = tree.objects();
    if !options.allow_mass_delete {
        check_deletions(&summary, options.max_delete_percent)?;
    }
    let odb = repo.git.odb().map_err(git)?;
    let objects_written = node.write(&odb)?;
    let replace: Vec<String> = old.keys().cloned().collect();
    let entries: Vec<(String, Oid, bool)> = node
        .entries()
        .iter()
        .map(|(name, n)| (name.clone(), n.id, n.is_tree()))
        .collect();
    let root = repo.graft(tip.as_ref(), path, &replace, &entries)?;
    let unchanged = tip.as_ref().is_some_and(|c| c.tree_id() == root);
    let mut published = Published {
        branch: refname.clone(),
        commit: None,
        tree: node.id.to_string(),
        summary,
        objects_written,
    };
    if let Some(tip) = tip.as_ref().filter(|_| unchanged && last.is_some()) {
        return Ok(Attempt::Unchanged(published, tip.id()));
    }
    published.summary.written = repo::files_written(&old, &new)?;
    let message = message(&published.summary, inputs, options, node.id);
    let commit = repo.commit(root, tip.as_ref(), &message, author, committer)?;
    published.commit = Some(CommitId::new(commit.to_string()));
    Ok(Attempt::Commit {
        commit,
        expected: tip.as_ref().map(|c| c.id()),
        published,
    })
}

/// The render commit's message: a subject, per-blueprint lines, trailers.
/// The trailers every Kiln commit carries: what it did, the render
/// directory and the tree there.
fn trailers((action, value): (&str, &str), path: &str, tree: impl std::fmt::Display) -> String {
    format!(
        "{action}: {value}\n{}: {}\n{}: {tree}\n",
        history::PATH,
        history::path_label(path),
        history::TREE
    )
}

fn message(summary: &Summary, inputs: &Inputs, options: &Options, tree: Oid) -> String {
    let mut per: BTreeMap<&str, [Vec<&str>; 3]> = BTreeMap::new();
    for (i, list) in [&summary.added, &summary.changed, &summary.removed]
        .into_iter()
        .enumerate()
    {
        for name in list {
            let (blueprint, instance) = name.split_once('/').unwrap_or((name, ""));
            per.entry(blueprint).or_default()[i].push(instance);
        }
    }
    let subject = options.message.clone().unwrap_or_else(|| {
        let counts: Vec<String> = per
            .iter()
            .map(|(b, [a, c, r])| format!("{b} +{} ~{} -{}", a.len(), c.len(), r.len()))
            .collect();
        if counts.is_empty() {
            "kiln: render (no instance changed)".to_string()
        } else {
            format!("kiln: render {}", counts.join(", "))
        }
    });
    let mut text = format!("{subject}\n\n");
    for (blueprint, lists) in &per {
        let _ = writeln!(
            text,
            "{blueprint}: {} added, {} changed, {} removed",
            lists[0].len(),
            lists[1].len(),
            lists[2].len()
        );
        for (label, names) in ["added", "changed", "removed"].iter().zip(lists) {
            if names.is_empty() {
                continue;
            }
            let _ = writeln!(text, "  {label}: {}", crate::abbreviate(names, 20));
        }
    }
    let _ = writeln!(
        text,
        "{} instances unchanged; {} objects\n",
        summary.unchanged, summary.objects
    );
    let mut id = sha2::Sha256::new();
    id.update(inputs.config.as_bytes());
    for (name, digest) in &inputs.sources {
        id.update(name.as_bytes());
        id.update(digest.as_bytes());
    }
    id.update(tree.as_bytes());
    let render = &hex(&id.finalize())[..16];
    text.push_str(&trailers((history::RENDER, render), &options.path, tree));
    let _ = writeln!(text, "{}: {}", history::CONFIG, inputs.config);
    for line in inputs.source_lines() {
        let _ = writeln!(text, "{}: {line}", history::SOURCE);
    }
    for (key, value) in &options.trailers {
        let _ = writeln!(text, "{key}: {value}");
    }
    text
}

/// Restores the render directory of `rev` (a Kiln render or rollback commit
/// for the same directory) with a new commit that pins the branch there.
pub fn rollback(repo: &Repo, options: &Options, rev: &str) -> Result<Published> {
    let refname = repo.branch_ref(options.branch.as_deref())?;
    let path = options.path.as_str();
    let (author, committer) = repo.signatures(options.author.as_deref())?;
    let target = repo
        .git
        .revparse_single(rev)
        .and_then(|o| o.peel_to_commit())
        .map_err(|e| Error::Git {
            message: format!("--to {rev}: {}", e.message()),
        })?;
    let restored = match history::record(&target, path) {
        Some(r) if !matches!(r.action, Action::Resume) => r,
        _ => {
            return Err(Error::from(Refusal::NoSuchRender {
                message: format!(
                    "--to {rev}: commit {} is not a Kiln render or rollback of {}/; see `kiln history`",
                    target.id(),
                    history::path_label(path)
                ),
            }));
        }
    };
    let tree = restored.tree_id()?;
    let stored = Item::Stored {
        repo: &repo.git,
        id: tree,
        tree: true,
    };
    let entries: Vec<(String, Oid, bool)> = stored
        .entries()?
        .into_iter()
        .map(|(name, item)| (name, item.id(), item.is_tree()))
        .collect();
    until_moved(&refname, "rollback", || {
        let tip = repo.tip(&refname)?;
        let old = repo.owned_at(tip.as_ref(), path)?;
        let summary = repo::summarize(&old, &stored.entries()?)?;
        let replace: Vec<String> = old.keys().cloned().collect();
        let root = repo.graft(tip.as_ref(), path, &replace, &entries)?;
        let subject = options.message.clone().unwrap_or_else(|| {
            format!(
                "kiln: roll back {}/ to {}",
                history::path_label(path),
                restored.commit.short()
            )
        });
        let message = format!(
            "{subject}\n\nRestores the tree of \"{}\" and pins the branch there until `kiln resume`.\n{} added, {} changed, {} removed\n\n{}",
            restored.subject,
            summary.added.len(),
            summary.changed.len(),
            summary.removed.len(),
            trailers((history::ROLLBACK, restored.commit.as_str()), path, tree),
        );
        let commit = repo.commit(root, tip.as_ref(), &message, &author, &committer)?;
        if repo.advance(
            &refname,
            tip.as_ref().map(|c| c.id()),
            commit,
            &format!("kiln rollback to {}", restored.commit),
        )? {
            return Ok(Some(Published {
                branch: refname.clone(),
                commit: Some(CommitId::new(commit.to_string())),
                tree: tree.to_string(),
                summary,
                objects_written: 0,
            }));
        }
        Ok(None)
    })
}

/// Ends a rollback's pin with a commit that changes no file.
pub fn resume(repo: &Repo, options: &Options) -> Result<Published> {
    let refname = repo.branch_ref(options.branch.as_deref())?;
    let path = options.path.as_str();
    let (author, committer) = repo.signatures(options.author.as_deref())?;
    until_moved(&refname, "resume", || {
        let tip = repo.tip(&refname)?;
        let Some(pin) = history::pin(tip.as_ref(), path)? else {
            return Err(Error::from(Refusal::NotPinned {
                branch: refname.short().to_string(),
                path: history::path_label(path).to_string(),
            }));
        };
        // A pin is a commit: there is a tip.
        let Some(parent) = tip.as_ref() else {
            return Ok(None);
        };
        let message = format!(
            "kiln: resume rendering {}/\n\nEnds the pin of rollback {}.\n\n{}",
            history::path_label(path),
            pin.commit.short(),
            trailers((history::RESUME, pin.commit.as_str()), path, &pin.tree),
        );
        let commit = repo.commit(
            parent.tree_id(),
            Some(parent),
            &message,
            &author,
            &committer,
        )?;
        if repo.advance(&refname, Some(parent.id()), commit, "kiln resume")? {
            return Ok(Some(Published {
                branch: refname.clone(),
                commit: Some(CommitId::new(commit.to_string())),
                tree: pin.tree,
                summary: Summary::default(),
                objects_written: 0,
            }));
        }
        Ok(None)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instances(names: &[&str]) -> BTreeMap<String, ()> {
        names.iter().map(|n| ((*n).to_string(), ())).collect()
    }

    fn check(old: &[&str], new: &[&str], max_percent: u32) -> std::result::Result<(), String> {
        let summary = Summary::of_instances(&instances(old), &instances(new));
        check_deletions(&summary, max_percent).map_err(|e| e.to_string())
    }

    #[test]
    fn the_guard_refuses_everything_too_much_and_a_blueprint_emptied() {
        let ten: Vec<String> = (0..10).map(|i| format!("web/t{i}")).collect();
        let ten: Vec<&str> = ten.iter().map(String::as_str).collect();
        assert!(check(&ten, &ten[..8], 20).is_ok());
        let too_many = check(&ten, &ten[..7], 20).unwrap_err();
        assert!(
            too_many.contains("refusing to remove 3 of 10 instances (30%"),
            "{too_many}"
        );
        let all = check(&ten, &[], 100).unwrap_err();
        assert!(all.contains("refusing to remove all 10 instances"), "{all}");

        // One blueprint's source came back empty: 1 instance of 11 is far
        // below the threshold, and still refused.
        let mut both = ten.clone();
        both.push("db/main");
        let emptied = check(&both, &ten, 20).unwrap_err();
        assert!(
            emptied.contains("refusing to remove all 1 instances of blueprint db (db/main)"),
            "{emptied}"
        );
        assert!(check(&both, &both[1..], 20).is_ok(), "web keeps 9");
        let summary = Summary::of_instances(&instances(&both), &instances(&ten));
        let refusal = check_deletions(&summary, 20).unwrap_err();
        assert_eq!(refusal.reason(), "MassDeletion");
        let Refusal::MassDeletion(found) = refusal else {
            unreachable!()
        };
        assert_eq!((found.removed, found.before), (1, 11));
        assert_eq!(found.blueprint.as_deref(), Some("db"));
    }
}
