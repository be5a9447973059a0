//! Everything that reads or writes a Git repository, and the only place
//! that touches libgit2: the repository and its trees ([`repo`]), packs of
//! new objects ([`pack`]), Kiln's commits and their trailers ([`history`]),
//! and committing a render with its guards, rollback and resume
//! ([`publish`]). Callers outside hold a [`publish::Target`] and ask it.

pub mod history;
pub(crate) mod pack;
pub mod publish;
pub mod remote;
pub mod repo;
