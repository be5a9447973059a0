//! What Kiln did to a branch, read back from its commits: the trailers each
//! render, rollback and resume commit carries, the pin a rollback sets, and
//! repo drift (changes under the render directory that Kiln did not make).
//!
//! State lives in the commits themselves, so it travels with `git push` and
//! needs no other ref or file.

use std::collections::BTreeMap;

use git2::Oid;
use serde::Serialize;

use crate::git::repo::{self, Change, CommitId, Item, Repo, git};
use crate::{Error, Result};

/// Trailer naming a render: its id.
pub const RENDER: &str = "Kiln-Render";
/// Trailer of a rollback commit: the commit whose tree it restored.
pub const ROLLBACK: &str = "Kiln-Rollback";
/// Trailer of a resume commit: the rollback it ends.
pub const RESUME: &str = "Kiln-Resume";
/// The render directory a commit is about (`.` for the root).
pub const PATH: &str = "Kiln-Path";
/// The id of the tree Kiln wrote there.
pub const TREE: &str = "Kiln-Tree";
/// Digest of the configuration (blueprints and templates).
pub const CONFIG: &str = "Kiln-Config";
/// `<source> sha256:<digest>` of the rows a source returned, one per source.
pub const SOURCE: &str = "Kiln-Source";
/// The revision a rollout commit rolls out.
pub const ROLLOUT: &str = "Kiln-Rollout";
/// The revision it replaces.
pub const ROLLOUT_PREVIOUS: &str = "Kiln-Rollout-Previous";
/// The wave it is in.
pub const ROLLOUT_WAVE: &str = "Kiln-Rollout-Wave";
/// Where each instance is, as JSON on one line.
pub const ROLLOUT_STATE: &str = "Kiln-Rollout-State";

/// What a Kiln commit did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase", tag = "action")]
pub enum Action {
    /// A render.
    Render {
        /// The render's id.
        render: String,
    },
    /// A rollback to an earlier Kiln commit; pins the branch.
    Rollback {
        /// The commit restored.
        to: String,
    },
    /// The end of a pin.
    Resume,
}

/// One Kiln commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Record {
    /// The commit.
    pub commit: CommitId,
    /// What it did.
    #[serde(flatten)]
    pub action: Action,
    /// The render directory (`.` for the root).
    pub path: String,
    /// The tree Kiln recorded there.
    pub tree: String,
    /// The commit's first line.
    pub subject: String,
    /// The rest of its message before the trailers.
    pub body: String,
    /// Commit time, seconds since the epoch.
    pub time: i64,
    /// Every trailer, in order.
    pub trailers: Vec<(String, String)>,
}

impl Record {
    /// Whether this commit pins the branch: a rollback, not yet resumed
    /// when it is the latest Kiln commit.
    pub fn pins(&self) -> bool {
        matches!(self.action, Action::Rollback { .. })
    }

    /// The tree's id.
    pub fn tree_id(&self) -> Result<Oid> {
        Oid::from_str(&self.tree).map_err(git)
    }
}

pub use crate::git::repo::path_label;

/// Reads a commit's Kiln record for `path`, if it is one.
pub(crate) fn record(commit: &git2::Commit<'_>, path: &str) -> Option<Record> {
    let message = commit.message().ok()?;
    let trailers: Vec<(String, String)> = git2::message_trailers_strs(message)
        .ok()?
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let get = |key: &str| {
        trailers
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    };
    if get(PATH)? != path_label(path) {
        return None;
    }
    let tree = get(TREE)?;
    let action = if let Some(render) = get(RENDER) {
        Action::Render { render }
    } else if let Some(to) = get(ROLLBACK) {
        Action::Rollback { to }
    } else if get(RESUME).is_some() {
        Action::Resume
    } else {
        return None;
    };
    let subject = commit
        .summary()
        .ok()
        .flatten()
        .unwrap_or_default()
        .to_string();
    let body = commit
        .body()
        .ok()
        .flatten()
        .unwrap_or_default()
        .lines()
        .take_while(|line| {
            !trailers
                .iter()
                .any(|(k, _)| line.starts_with(&format!("{k}: ")))
        })
        .collect::<Vec<_>>()
        .join("\n")
        .trim_end()
        .to_string();
    Some(Record {
        commit: CommitId::from(commit.id()),
        action,
        path: path_label(path).to_string(),
        tree,
        subject,
        body,
        time: commit.time().seconds(),
        trailers,
    })
}

/// Kiln's commits for `path` on the first-parent line from `tip`, newest
/// first, at most `limit` of them.
pub(crate) fn records(
    tip: Option<&git2::Commit<'_>>,
    path: &str,
    limit: usize,
) -> Result<Vec<Record>> {
    let mut out = Vec::new();
    let mut next = tip.cloned();
    while let Some(commit) = next {
        if out.len() >= limit {
            break;
        }
        if let Some(record) = record(&commit, path) {
            out.push(record);
        }
        next = commit.parents().next();
    }
    Ok(out)
}

/// The latest Kiln commit for `path`.
pub(crate) fn last(tip: Option<&git2::Commit<'_>>, path: &str) -> Result<Option<Record>> {
    Ok(records(tip, path, 1)?.into_iter().next())
}

/// The rollback pinning `path`, when the latest Kiln commit is one.
pub(crate) fn pin(tip: Option<&git2::Commit<'_>>, path: &str) -> Result<Option<Record>> {
    Ok(last(tip, path)?.filter(Record::pins))
}

/// A commit after the last Kiln commit that changed the render directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Foreign {
    /// The commit.
    pub commit: CommitId,
    /// Its first line.
    pub subject: String,
    /// Its author.
    pub author: String,
}

/// Changes under the render directory that Kiln did not make.
#[derive(Debug, Clone)]
pub struct Drift {
    /// The last Kiln commit, if any.
    pub last: Option<Record>,
    /// Commits since then that touched the directory, newest first.
    pub commits: Vec<Foreign>,
    /// Files that differ from what Kiln recorded.
    pub changes: Vec<Change>,
}

impl Drift {
    /// One line naming the files and the commits, for an error.
    pub fn line(&self) -> String {
        let files: Vec<&str> = self.changes.iter().map(|c| c.path.as_str()).collect();
        let text = crate::abbreviate(&files, 5);
        let commits: Vec<String> = self
            .commits
            .iter()
            .take(5)
            .map(|c| {
                format!(
                    "{} {:?}",
                    &c.commit.as_str()[..c.commit.as_str().len().min(10)],
                    c.subject
                )
            })
            .collect();
        if commits.is_empty() {
            format!(
                "{} file(s) differ from Kiln's last commit: {text}",
                self.changes.len()
            )
        } else {
            format!(
                "{} file(s) changed by commits Kiln did not make ({}): {text}",
                self.changes.len(),
                commits.join(", ")
            )
        }
    }
}

/// Repo drift of `path` on the branch at `tip`: None when the directory
/// holds exactly what `last` (Kiln's latest commit there, from [`last`])
/// recorded.
pub(crate) fn drift(
    repo: &Repo,
    tip: Option<&git2::Commit<'_>>,
    path: &str,
    last: Option<&Record>,
) -> Result<Option<Drift>> {
    let current = repo.owned_at(tip, path)?;
    let recorded: BTreeMap<String, Item<'_>> = match last {
        Some(record) => {
            let id = record.tree_id()?;
            if repo.git.find_tree(id).is_err() {
                return Err(Error::Git {
                    message: format!(
                        "commit {} records tree {id}, which is not in the repository",
                        record.commit
                    ),
                });
            }
            Item::Stored {
                repo: &repo.git,
                id,
                tree: true,
            }
            .entries()?
        }
        None => BTreeMap::new(),
    };
    let same = current.len() == recorded.len()
        && current
            .iter()
            .all(|(name, item)| recorded.get(name).is_some_and(|r| r.id() == item.id()));
    if same {
        return Ok(None);
    }
    let changes = repo::compare(&recorded, &current)?;
    let stop = last.and_then(|r| Oid::from_str(r.commit.as_str()).ok());
    let mut commits = Vec::new();
    let mut next = tip.cloned();
    while let Some(commit) = next {
        if Some(commit.id()) == stop {
            break;
        }
        let parent = commit.parents().next();
        let here = repo.tree_at(Some(&commit), path)?.map(|t| t.id());
        let before = repo.tree_at(parent.as_ref(), path)?.map(|t| t.id());
        if here != before {
            commits.push(Foreign {
                commit: CommitId::from(commit.id()),
                subject: commit
                    .summary()
                    .ok()
                    .flatten()
                    .unwrap_or_default()
                    .to_string(),
                author: commit.author().name().unwrap_or_default().to_string(),
            });
        }
        next = parent;
    }
    Ok(Some(Drift {
        last: last.cloned(),
        commits,
        changes,
    }))
}
