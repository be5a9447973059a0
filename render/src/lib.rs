//! Kiln's render engine: rows in, a deterministic tree of manifests out.
//!
//! This crate never talks to a cluster; `kiln-sync` builds on it.

pub mod api;
pub mod config;
pub mod diff;
pub mod emit;
pub mod graph;
pub mod history;
pub mod manifest;
pub mod pack;
mod parallel;
pub mod policy;
pub mod printed;
pub mod publish;
pub mod render;
pub mod repo;
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
    Config { origin: String, message: String },
    /// A source could not be read.
    #[error("source {source_name}: {message}")]
    Source {
        source_name: String,
        message: String,
    },
    /// A template failed to compile or render, or rendered something that is
    /// not one Kubernetes object.
    #[error("{message}")]
    Template { message: String },
    /// The rendered tree could not be written.
    #[error("{message}")]
    Output { message: String },
    /// The Git repository could not be read or written.
    #[error("{message}")]
    Git { message: String },
    /// A guard refused the render: too many deletions, plaintext secrets,
    /// drift, a pin.
    #[error("{message}")]
    Refused { message: String },
    /// Several independent problems, one per line.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Many(Vec<Error>),
}

impl Error {
    /// A configuration error at `origin` (a file, a file and an object).
    pub fn config(origin: impl Display, message: impl Into<String>) -> Self {
        Error::Config {
            origin: origin.to_string(),
            message: message.into(),
        }
    }

    /// A source error.
    pub fn source(name: impl Display, message: impl Into<String>) -> Self {
        Error::Source {
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

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
