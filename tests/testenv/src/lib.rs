//! The test environment: real servers for Kiln's tests.
//!
//! etcd, kube-apiserver and kube-controller-manager are the upstream binaries
//! built from Go modules by `tests/envtest/build.sh`; PostgreSQL and MariaDB
//! are Debian's server binaries. Every server listens on 127.0.0.1 on a free
//! port and keeps its data in a temporary directory.
//!
//! In a test binary, [`cluster`], [`postgres`] and [`mariadb`] start their
//! server on first use and share it with every test of that binary; a watchdog
//! stops them all when the binary exits, however it exits. Tests isolate
//! themselves with [`unique_name`]: their own namespace, their own database.
//!
//! The cluster has two identities: an administrator in `system:masters`, and
//! [`LIMITED_USER`], which has only the rights a test grants it and which API
//! Priority and Fairness throttles hard (see [`Cluster::limited_kubeconfig`]).
//!
//! When `KILN_TEST_KUBECONFIG`, `KILN_TEST_POSTGRES_URL` or
//! `KILN_TEST_MYSQL_URL` is set (as `tests/env up` prints them), the servers
//! they name are used instead of starting new ones
//! (`KILN_TEST_LIMITED_KUBECONFIG` names the limited identity's kubeconfig).

mod cluster;
mod mariadb;
mod postgres;
mod process;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use cluster::{Cluster, LIMITED_GROUP, LIMITED_USER};
pub use mariadb::MariaDb;
pub use postgres::Postgres;

/// Why the environment could not be started or stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file-system or socket operation failed.
    #[error("failed to {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A program could not be started at all.
    #[error("failed to start {name} ({program}): {source}")]
    Spawn {
        name: String,
        program: String,
        #[source]
        source: std::io::Error,
    },
    /// A server or set-up step failed or did not become ready.
    #[error("{name} {detail}\n{log}")]
    Failed {
        name: String,
        detail: String,
        log: String,
    },
    /// A program the environment needs is not installed.
    #[error("{what} is not installed ({hint})")]
    Missing { what: String, hint: String },
    /// A statement against a test database failed.
    #[error("failed to {what}: {source}")]
    Sql {
        what: String,
        #[source]
        source: sqlx::Error,
    },
}

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The environment variable naming an existing kubeconfig to test against.
pub const KUBECONFIG_VAR: &str = "KILN_TEST_KUBECONFIG";
/// The environment variable naming an existing PostgreSQL server.
pub const POSTGRES_VAR: &str = "KILN_TEST_POSTGRES_URL";
/// The environment variable naming an existing MariaDB or MySQL server.
pub const MYSQL_VAR: &str = "KILN_TEST_MYSQL_URL";
/// The environment variable naming a kubeconfig for the cluster's limited
/// identity ([`LIMITED_USER`]), when an existing cluster is used.
pub const LIMITED_KUBECONFIG_VAR: &str = "KILN_TEST_LIMITED_KUBECONFIG";
/// The environment variable naming the kubectl that goes with the cluster.
pub const KUBECTL_VAR: &str = "KILN_TEST_KUBECTL";

/// The cluster shared by this test binary, started on first use.
pub fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Result<Cluster, String>> = OnceLock::new();
    shared(&CLUSTER, "kube-apiserver", || {
        match std::env::var_os(KUBECONFIG_VAR) {
            Some(kubeconfig) => Cluster::existing(PathBuf::from(kubeconfig)),
            None => Cluster::start(&shared_root()?, &envtest_bin()?),
        }
    })
}

/// A cluster of this test binary's own, started on first use even when
/// `KILN_TEST_KUBECONFIG` names another: one whose API server a test may
/// restart ([`Cluster::restart_api_server`]).
pub fn own_cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Result<Cluster, String>> = OnceLock::new();
    shared(&CLUSTER, "kube-apiserver", || {
        Cluster::start(&watched_tempdir("kiln-testenv-own-")?, &envtest_bin()?)
    })
}

/// The PostgreSQL server shared by this test binary, started on first use.
pub fn postgres() -> &'static Postgres {
    static POSTGRES: OnceLock<Result<Postgres, String>> = OnceLock::new();
    shared(&POSTGRES, "PostgreSQL", || {
        match std::env::var(POSTGRES_VAR) {
            Ok(url) => Ok(Postgres::existing(url)),
            Err(_) => Postgres::start(&shared_root()?),
        }
    })
}

/// The MariaDB server shared by this test binary, started on first use.
pub fn mariadb() -> &'static MariaDb {
    static MARIADB: OnceLock<Result<MariaDb, String>> = OnceLock::new();
    shared(&MARIADB, "MariaDB", || match std::env::var(MYSQL_VAR) {
        Ok(url) => Ok(MariaDb::existing(url)),
        Err(_) => MariaDb::start(&shared_root()?),
    })
}

/// A name no other test, test binary or recent run uses, and a valid DNS
/// label: `prefix`, the process id, a counter and a few bits of the clock.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    let prefix: String = prefix
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(30)
        .collect();
    format!("{prefix}-{}-{n}-{:x}", std::process::id(), nanos % 0x10000)
}

/// Every server of the environment, started together, for `tests/env up`.
#[derive(Debug)]
pub struct Environment {
    /// The cluster: etcd, kube-apiserver, kube-controller-manager.
    pub cluster: Cluster,
    /// The PostgreSQL server.
    pub postgres: Postgres,
    /// The MariaDB server.
    pub mariadb: MariaDb,
}

impl Environment {
    /// Starts every server under `root` in parallel; on failure, stops the
    /// ones that did start.
    pub fn start(root: &Path) -> Result<Self> {
        process::mkdir(root)?;
        let bin = envtest_bin()?;
        let started = std::thread::scope(|s| {
            let cluster = s.spawn(|| Cluster::start(root, &bin));
            let postgres = s.spawn(|| Postgres::start(root));
            let mariadb = s.spawn(|| MariaDb::start(root));
            (join(cluster), join(postgres), join(mariadb))
        });
        match started {
            (Ok(cluster), Ok(postgres), Ok(mariadb)) => Ok(Self {
                cluster,
                postgres,
                mariadb,
            }),
            (cluster, postgres, mariadb) => {
                let error = [cluster.err(), postgres.err(), mariadb.err()]
                    .into_iter()
                    .flatten()
                    .next();
                let _ = stop(root);
                Err(error.unwrap_or_else(|| Error::Failed {
                    name: "environment".into(),
                    detail: "failed to start".into(),
                    log: String::new(),
                }))
            }
        }
    }

    /// The shell lines that point tools and tests at this environment.
    pub fn exports(&self) -> String {
        let kubeconfig = self.cluster.kubeconfig.display();
        format!(
            "export KUBECONFIG={kubeconfig}\n\
             export {KUBECONFIG_VAR}={kubeconfig}\n\
             export {LIMITED_KUBECONFIG_VAR}={limited}\n\
             export {KUBECTL_VAR}={kubectl}\n\
             export {POSTGRES_VAR}='{postgres}'\n\
             export {MYSQL_VAR}='{mysql}'\n\
             # kubectl: {kubectl}\n\
             # as {LIMITED_USER} (not an administrator; throttled): kubectl --kubeconfig ${LIMITED_KUBECONFIG_VAR}\n\
             # psql \"${POSTGRES_VAR}\"\n\
             # {mariadb}\n",
            kubectl = self.cluster.kubectl.display(),
            limited = self
                .cluster
                .limited_kubeconfig
                .as_deref()
                .unwrap_or(Path::new(""))
                .display(),
            postgres = self.postgres.url,
            mysql = self.mariadb.url,
            mariadb = self.mariadb.client_command(),
        )
    }
}

/// Stops every server started under `root` and removes it.
pub fn stop(root: &Path) -> Result<()> {
    process::teardown(root, Duration::from_secs(10))
}

/// Whether any server started under `root` still runs.
pub fn running(root: &Path) -> bool {
    process::recorded_groups(root)
        .into_iter()
        .any(|(_, group)| process::group_alive(group))
}

/// The directory holding etcd, kube-apiserver, kube-controller-manager and
/// kubectl: `KILN_ENVTEST_BIN`, or what `tests/envtest/build.sh` builds (it
/// answers at once when its cache is warm).
pub fn envtest_bin() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("KILN_ENVTEST_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../envtest/build.sh");
    let output = Command::new("bash")
        .arg(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| Error::Spawn {
            name: "control plane build".into(),
            program: script.display().to_string(),
            source: e,
        })?;
    if !output.status.success() {
        return Err(Error::Failed {
            name: "control plane build".into(),
            detail: format!("({}) exited with {}", script.display(), output.status),
            log: String::new(),
        });
    }
    let dir = String::from_utf8_lossy(&output.stdout).trim().to_string();
    Ok(PathBuf::from(dir))
}

/// One temporary directory per test binary for all its servers, removed with
/// them by the watchdog when the binary exits.
fn shared_root() -> Result<PathBuf> {
    static ROOT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let root = ROOT.get_or_init(|| watched_tempdir("kiln-testenv-").map_err(|e| e.to_string()));
    root.clone().map_err(|detail| Error::Failed {
        name: "test environment".into(),
        detail,
        log: String::new(),
    })
}

/// A temporary directory the watchdog removes, with every server started
/// under it, when this process exits.
fn watched_tempdir(prefix: &str) -> Result<PathBuf> {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .map_err(|e| Error::Io {
            what: "create a temporary directory".into(),
            source: e,
        })?
        .keep();
    process::start_watchdog(std::process::id(), &dir)?;
    Ok(dir)
}

fn shared<T>(
    cell: &'static OnceLock<Result<T, String>>,
    what: &str,
    start: impl FnOnce() -> Result<T>,
) -> &'static T {
    match cell.get_or_init(|| start().map_err(|e| e.to_string())) {
        Ok(server) => server,
        // A test cannot go on without its server: fail it, and every later
        // test of this binary that needs the same server, with the cause.
        Err(e) => panic!("the test environment could not start {what}: {e}"),
    }
}

fn join<T>(handle: std::thread::ScopedJoinHandle<'_, Result<T>>) -> Result<T> {
    handle.join().unwrap_or_else(|_| {
        Err(Error::Failed {
            name: "environment".into(),
            detail: "a start-up thread panicked".into(),
            log: String::new(),
        })
    })
}

/// Runs a future to completion on a runtime of its own, on a thread of its own,
/// so that the blocking start-up code can use async clients even when it is
/// called from inside a test's runtime.
fn block_on<F>(future: F) -> F::Output
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map(|rt| rt.block_on(future))
    })
    .join()
    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    .unwrap_or_else(|e| panic!("failed to build a tokio runtime: {e}"))
}

/// Polls `connect` on a runtime of its own until it succeeds or `timeout`
/// passes.
fn wait_for_sql<F, Fut>(name: &str, log: &Path, timeout: Duration, connect: F) -> Result<()>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), sqlx::Error>> + Send,
{
    let ready = block_on(async move {
        let deadline = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < deadline {
            if connect().await.is_ok() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        false
    });
    if ready {
        Ok(())
    } else {
        Err(process::not_ready(name, log, timeout))
    }
}

fn sql(what: &str, source: sqlx::Error) -> Error {
    Error::Sql {
        what: what.to_string(),
        source,
    }
}

/// Replaces the database of a `scheme://user:password@host:port/db?params` URL.
fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority_end = base.find("://").map_or(0, |i| i + 3);
    let base = match base[authority_end..].find('/') {
        Some(slash) => &base[..authority_end + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{base}/{database}?{query}"),
        None => format!("{base}/{database}"),
    }
}

/// Random hex, for passwords and tokens that need not be cryptographic but
/// must differ between environments.
fn random_hex(bytes: usize) -> String {
    use std::io::Read;
    let mut buf = vec![0u8; bytes];
    let read = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut buf));
    if read.is_err() {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        buf = nanos
            .to_le_bytes()
            .iter()
            .cycle()
            .take(bytes)
            .copied()
            .collect();
    }
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_database_replaces_only_the_path() {
        assert_eq!(
            with_database("postgres://u:p@127.0.0.1:5/postgres", "t1"),
            "postgres://u:p@127.0.0.1:5/t1"
        );
        assert_eq!(
            with_database("mysql://u:p@127.0.0.1:5/kiln?ssl-mode=disabled", "t2"),
            "mysql://u:p@127.0.0.1:5/t2?ssl-mode=disabled"
        );
        assert_eq!(with_database("mysql://u:p@h:5", "t3"), "mysql://u:p@h:5/t3");
    }

    #[test]
    fn unique_names_are_distinct_dns_labels() {
        let a = unique_name("Smoke_Test");
        let b = unique_name("Smoke_Test");
        assert_ne!(a, b);
        for name in [&a, &b] {
            assert!(name.len() <= 63, "{name}");
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
                "{name}"
            );
        }
    }
}
