//! Kiln's render engine: rows in, a deterministic tree of manifests out.
//!
//! This crate never talks to a cluster; `kiln-sync` builds on it.

pub mod api;
pub mod config;
pub mod diff;
pub mod emit;
pub mod git;
pub mod graph;
pub mod manifest;
pub mod memo;
mod parallel;
pub mod policy;
pub mod printed;
pub mod progress;
pub mod render;
pub mod rollout;
pub mod source;
pub mod template;
pub mod tree;
pub mod yaml;

use std::fmt::Display;

/// What went wrong while loading or rendering.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A YAML document could not be parsed.
    #[error("invalid YAML in {origin}: {message}")]
    InvalidYaml { origin: String, message: String },
    /// A value could not be written as YAML.
    #[error("failed to write YAML: {message}")]
    YamlOutput { message: String },
    /// The configuration is wrong: `origin` names the file and object.
    #[error("{origin}: {message}")]
    Config {
        origin: String,
        message: String,
        /// A template's failing line with a caret, when a template failed
        /// to compile (not in the one-line message).
        excerpt: Option<String>,
    },
    /// A source could not be read: its query, file or connection failed.
    #[error("source {source_name}: {message}")]
    QueryFailed {
        source_name: String,
        message: String,
    },
    /// A template failed to render for one row, or rendered something that
    /// is not one Kubernetes object.
    #[error("failed to render blueprint {blueprint}, resource {resource}, row {key}: {message}")]
    TemplateFailed {
        blueprint: String,
        resource: String,
        key: String,
        /// What went wrong, and where: `(template:line)`.
        message: String,
        /// The template's failing line with a caret, for people (not in
        /// the one-line message).
        excerpt: Option<String>,
    },
    /// Two rows of a blueprint map to one instance directory.
    #[error(
        "blueprint {blueprint}: rows {first} and {second} both map to instance {instance}; keys must stay distinct as DNS labels"
    )]
    InstanceCollision {
        blueprint: String,
        first: String,
        second: String,
        instance: String,
    },
    /// Two rows or resources render the same object.
    #[error("{object} is rendered twice: by {first} and by {second}")]
    DuplicateObject {
        object: String,
        first: String,
        second: String,
    },
    /// The rendered tree could not be written.
    #[error("{message}")]
    Output { message: String },
    /// The Git repository is not what Kiln needs (the message says what).
    #[error("{message}")]
    Git { message: String },
    /// libgit2 failed to read or write the repository.
    #[error("{}", source.message())]
    GitFailed {
        #[source]
        source: git2::Error,
    },
    /// A guard refused: which one, and what it found.
    #[error(transparent)]
    Refused(Box<Refusal>),
    /// Several independent problems, one per line.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Many(Vec<Error>),
}

/// Which guard refused, with what it found. Its text is what a person
/// reads; [`Refusal::reason`] is what a status condition says.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// A render or apply would remove too many instances.
    #[error("{0}")]
    MassDeletion(MassDeletion),
    /// Secrets with data in plain text would be committed.
    #[error(
        "refusing to commit {} Secret(s) with data in plain text: {}; render a SealedSecret or ExternalSecret instead, or pass --allow-plaintext-secrets",
        objects.len(),
        abbreviate(objects, 3)
    )]
    PlaintextSecrets {
        /// `blueprint/instance/resource.yaml (row key)` of each.
        objects: Vec<String>,
    },
    /// The render directory holds changes Kiln did not make.
    #[error(
        "repo drift under {path}/ on {branch}: {summary}; see `kiln drift`, or pass --overwrite-drift to replace it"
    )]
    RepoDrift {
        /// The render directory.
        path: String,
        /// The branch.
        branch: String,
        /// What changed, in one line.
        summary: String,
    },
    /// A rollback pins the branch.
    #[error(
        "{branch} is pinned to {} by rollback commit {}; run `kiln resume --git {repo} --branch {branch}{path_flag}` to render again",
        &to[..to.len().min(12)],
        commit.short()
    )]
    Pinned {
        /// The branch.
        branch: String,
        /// What it is pinned to.
        to: String,
        /// The rollback commit.
        commit: crate::git::repo::CommitId,
        /// The repository, as given.
        repo: String,
        /// ` --path P`, or nothing.
        path_flag: String,
    },
    /// The checked-out work tree has someone's uncommitted changes.
    #[error(
        "{repo}: the checked-out work tree has uncommitted changes under {path}/ ({}); commit or discard them first (`git -C {repo} stash push --include-untracked -- {path}` sets them aside), or render into a bare repository",
        abbreviate(files, 3)
    )]
    DirtyWorkTree {
        /// The repository, as given.
        repo: String,
        /// The render directory.
        path: String,
        /// The changed files.
        files: Vec<String>,
    },
    /// A rollback to a commit that is not one of Kiln's renders.
    #[error("{message}")]
    NoSuchRender {
        /// Which commit, and where to look.
        message: String,
    },
    /// A resume of a branch no rollback pins.
    #[error("{branch} is not pinned for {path}/: nothing to resume")]
    NotPinned {
        /// The branch.
        branch: String,
        /// The render directory.
        path: String,
    },
}

impl Refusal {
    /// The guard, as a status condition's `reason`.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::MassDeletion(_) => "MassDeletion",
            Refusal::PlaintextSecrets { .. } => "PlaintextSecrets",
            Refusal::RepoDrift { .. } => "RepoDrift",
            Refusal::Pinned { .. } => "Pinned",
            Refusal::DirtyWorkTree { .. } => "DirtyWorkTree",
            Refusal::NoSuchRender { .. } => "NoSuchRender",
            Refusal::NotPinned { .. } => "NotPinned",
        }
    }
}

/// What the deletion guard found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MassDeletion {
    /// Instances that would go.
    pub removed: usize,
    /// Instances there were.
    pub before: usize,
    /// `deletionGuard.maxPercent`.
    pub max_percent: u32,
    /// The blueprint all of whose instances would go, when that is why.
    pub blueprint: Option<String>,
    /// The instances (`blueprint/instance`) that would go.
    pub names: Vec<String>,
}

impl Display for MassDeletion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names = abbreviate(&self.names, 5);
        let (removed, before) = (self.removed, self.before);
        match &self.blueprint {
            Some(blueprint) => write!(
                f,
                "refusing to remove all {removed} instances of blueprint {blueprint} ({names}): did its source return no rows? pass --allow-mass-delete if this is intended"
            ),
            None if removed == before => write!(
                f,
                "refusing to remove all {before} instances ({names}): did a source return no rows? pass --allow-mass-delete if this is intended"
            ),
            None => write!(
                f,
                "refusing to remove {removed} of {before} instances ({}%, more than deletionGuard.maxPercent {}%): {names}; pass --allow-mass-delete if this is intended",
                removed * 100 / before.max(1),
                self.max_percent
            ),
        }
    }
}

impl From<git2::Error> for Error {
    fn from(source: git2::Error) -> Self {
        Error::GitFailed { source }
    }
}

impl From<Refusal> for Error {
    fn from(refusal: Refusal) -> Self {
        Error::Refused(Box::new(refusal))
    }
}

impl Error {
    /// A configuration error at `origin` (a file, a file and an object).
    pub fn config(origin: impl Display, message: impl Into<String>) -> Self {
        Error::Config {
            excerpt: None,
            origin: origin.to_string(),
            message: message.into(),
        }
    }

    /// A source error.
    pub fn source(name: impl Display, message: impl Into<String>) -> Self {
        Error::QueryFailed {
            source_name: name.to_string(),
            message: message.into(),
        }
    }

    /// `Ok` when `errors` is empty; else the error, or all of them.
    pub fn all(mut errors: Vec<Error>) -> Result<()> {
        match errors.len() {
            0 => Ok(()),
            1 => Err(errors.remove(0)),
            _ => Err(Error::Many(
                errors
                    .into_iter()
                    .flat_map(|e| match e {
                        Error::Many(inner) => inner,
                        other => vec![other],
                    })
                    .collect(),
            )),
        }
    }

    /// A short name for what failed, as a status condition's `reason`.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::InvalidYaml { .. } | Error::YamlOutput { .. } => "InvalidYaml",
            Error::Config { .. } => "InvalidConfiguration",
            Error::QueryFailed { .. } => "QueryFailed",
            Error::TemplateFailed { .. } => "TemplateFailed",
            Error::InstanceCollision { .. } => "InstanceCollision",
            Error::DuplicateObject { .. } => "DuplicateObject",
            Error::Output { .. } => "OutputFailed",
            Error::Git { .. } | Error::GitFailed { .. } => "GitFailed",
            Error::Refused(refusal) => refusal.reason(),
            Error::Many(errors) => errors.first().map_or("Failed", Error::reason),
        }
    }

    /// The failing template line with a caret under the failure, when a
    /// template failed (for people; the message is one line without it).
    pub fn excerpt(&self) -> Option<&str> {
        match self {
            Error::TemplateFailed { excerpt, .. } | Error::Config { excerpt, .. } => {
                excerpt.as_deref()
            }
            Error::Many(errors) => errors.iter().find_map(Error::excerpt),
            _ => None,
        }
    }

    /// Every single problem this error stands for.
    pub fn problems(&self) -> Vec<&Error> {
        match self {
            Error::Many(inner) => inner.iter().flat_map(Error::problems).collect(),
            other => vec![other],
        }
    }
}

/// The first `limit` of `items` joined with commas, then how many more there
/// are: `a, b, c and 7 more`. Keeps messages about many files one line.
pub fn abbreviate<S: AsRef<str>>(items: &[S], limit: usize) -> String {
    let mut text = items
        .iter()
        .take(limit)
        .map(AsRef::as_ref)
        .collect::<Vec<_>>()
        .join(", ");
    if items.len() > limit {
        text.push_str(&format!(" and {} more", items.len() - limit));
    }
    text
}

/// Writes a memo file whole or not at all (a sibling file renamed into
/// place), creating its directory. Best effort: a memo not written costs
/// the next run time only, so a failure is logged at debug and dropped.
pub(crate) fn remember_in(file: &std::path::Path, bytes: impl AsRef<[u8]>, what: &str) {
    let partial = file.with_extension(format!("partial-{}", std::process::id()));
    let written = file
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| std::fs::write(&partial, bytes))
        .and_then(|()| std::fs::rename(&partial, file));
    if let Err(e) = written {
        tracing::debug!(error = %e, file = %file.display(), "could not remember {what}");
        let _ = std::fs::remove_file(&partial);
    }
}

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
