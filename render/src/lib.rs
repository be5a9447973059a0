//! Kiln's render engine: rows in, a deterministic tree of manifests out.
//!
//! This crate never talks to a cluster; `kiln-sync` builds on it.

pub mod yaml;

/// What went wrong while rendering.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A YAML document could not be parsed.
    #[error("invalid YAML in {origin}: {message}")]
    InvalidYaml { origin: String, message: String },
    /// A value could not be written as YAML.
    #[error("failed to write YAML: {message}")]
    YamlOutput { message: String },
}

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
