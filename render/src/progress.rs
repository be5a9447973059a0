//! Progress of long work (rows read, instances rendered, files committed,
//! objects applied), reported to whatever the program installed: the
//! binary draws bars on a terminal; libraries and tests install nothing,
//! and then reporting costs an atomic load.

use std::sync::OnceLock;

/// Where progress goes.
pub trait Sink: Send + Sync {
    /// A phase starts: `what` is done `total` times (0: unknown).
    fn begin(&self, what: &str, total: u64);
    /// `n` more done in the current phase.
    fn advance(&self, n: u64);
    /// The current phase ended.
    fn end(&self);
}

static SINK: OnceLock<Box<dyn Sink>> = OnceLock::new();

/// Installs the process's sink; the first one stays.
pub fn install(sink: Box<dyn Sink>) {
    let _ = SINK.set(sink);
}

/// A phase of work; it ends when dropped.
#[must_use = "the phase ends when this is dropped"]
pub struct Phase(Option<&'static dyn Sink>);

/// Starts a phase of `total` steps (0: unknown).
pub fn phase(what: &str, total: u64) -> Phase {
    let sink = SINK.get().map(|s| &**s);
    if let Some(s) = sink {
        s.begin(what, total);
    }
    Phase(sink)
}

impl std::fmt::Debug for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Phase")
            .field("reported", &self.0.is_some())
            .finish()
    }
}

impl Phase {
    /// `n` more steps done.
    pub fn advance(&self, n: u64) {
        if let Some(s) = self.0 {
            s.advance(n);
        }
    }
}

impl Drop for Phase {
    fn drop(&mut self) {
        if let Some(s) = self.0 {
            s.end();
        }
    }
}
