//! PostgreSQL from Debian's server binaries, in a temporary data directory.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use sqlx::Connection;
use sqlx::postgres::PgConnection;

use crate::process::{Tier, free_port, mkdir, run, spawn, write};
use crate::{Error, Result, random_hex, sql, unique_name, wait_for_sql, with_database};

/// A running PostgreSQL server (or an existing one named by a URL).
#[derive(Debug, Clone)]
pub struct Postgres {
    /// URL of the `postgres` database as a superuser, password included.
    pub url: String,
}

impl Postgres {
    pub(crate) fn existing(url: String) -> Self {
        Self { url }
    }

    /// Creates an empty database of its own for one test and returns its URL.
    pub async fn database(&self, hint: &str) -> Result<String> {
        let name = unique_name(hint).replace('-', "_");
        let mut admin = PgConnection::connect(&self.url)
            .await
            .map_err(|e| sql("connect to the test PostgreSQL server", e))?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut admin)
            .await
            .map_err(|e| sql(&format!("create database {name}"), e))?;
        Ok(with_database(&self.url, &name))
    }

    /// Initialises a cluster under `root` and starts the server on a free port.
    pub(crate) fn start(root: &Path) -> Result<Self> {
        let bin = server_bin_dir()?;
        let dir = mkdir(&root.join("postgres"))?;
        let data = dir.join("data");
        let password = random_hex(12);
        let pwfile = dir.join("password");
        write(&pwfile, &password)?;

        // PostgreSQL refuses to run as root; as root, run it as the postgres
        // user that Debian's package creates, in a directory it owns.
        let owner = (is_root()).then(postgres_user).transpose()?;
        if let Some((uid, gid)) = owner {
            allow_traversal(root)?;
            for path in [&dir, &pwfile] {
                std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(|e| Error::Io {
                    what: format!("hand {} to the postgres user", path.display()),
                    source: e,
                })?;
            }
        }
        let command = |program: &str| {
            let mut cmd = match owner {
                Some(_) => {
                    let mut cmd = Command::new("setpriv");
                    cmd.args(["--reuid=postgres", "--regid=postgres", "--init-groups"]);
                    cmd.arg(bin.join(program));
                    cmd
                }
                None => Command::new(bin.join(program)),
            };
            cmd.current_dir(&dir);
            cmd
        };

        let log = dir.join("postgres.log");
        run(
            "initdb",
            command("initdb")
                .arg("--pgdata")
                .arg(&data)
                .args(["--username=kiln", "--auth=scram-sha-256", "--encoding=UTF8"])
                .args(["--locale=C", "--no-sync"])
                .arg(format!("--pwfile={}", pwfile.display())),
            &log,
        )?;
        let port = free_port()?;
        spawn(
            "postgres",
            Tier::Server,
            command("postgres")
                .arg("-D")
                .arg(&data)
                .arg("-p")
                .arg(port.to_string())
                .args(["-c", "listen_addresses=127.0.0.1"])
                .args(["-c", "unix_socket_directories="])
                // Test data need not survive a power cut.
                .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
                .args(["-c", "full_page_writes=off", "-c", "max_connections=300"]),
            root,
            &log,
        )?;
        let url = format!("postgres://kiln:{password}@127.0.0.1:{port}/postgres");
        let probe = url.clone();
        wait_for_sql("postgres", &log, Duration::from_secs(30), move || {
            let url = probe.clone();
            async move { PgConnection::connect(&url).await?.ping().await }
        })?;
        Ok(Self { url })
    }
}

/// The newest `/usr/lib/postgresql/<version>/bin` that has initdb.
fn server_bin_dir() -> Result<PathBuf> {
    let versions = fs::read_dir("/usr/lib/postgresql").map_err(|_| Error::Missing {
        what: "PostgreSQL server (initdb, postgres)".into(),
        hint: "run tests/install-deps.sh".into(),
    })?;
    versions
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| {
            let version: u32 = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .max_by_key(|(version, _)| *version)
        .map(|(_, bin)| bin)
        .ok_or_else(|| Error::Missing {
            what: "PostgreSQL server (initdb, postgres)".into(),
            hint: "run tests/install-deps.sh".into(),
        })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

fn postgres_user() -> Result<(u32, u32)> {
    let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
    passwd
        .lines()
        .map(|line| line.split(':').collect::<Vec<_>>())
        .find(|fields| fields.first() == Some(&"postgres"))
        .and_then(|fields| Some((fields.get(2)?.parse().ok()?, fields.get(3)?.parse().ok()?)))
        .ok_or_else(|| Error::Missing {
            what: "the postgres system user".into(),
            hint: "run tests/install-deps.sh, which installs Debian's postgresql package".into(),
        })
}

/// Lets another user reach a directory inside `root` (a 0700 temp dir).
fn allow_traversal(root: &Path) -> Result<()> {
    let mut permissions = fs::metadata(root)
        .map_err(|e| Error::Io {
            what: format!("read {}", root.display()),
            source: e,
        })?
        .permissions();
    permissions.set_mode(permissions.mode() | 0o711);
    fs::set_permissions(root, permissions).map_err(|e| Error::Io {
        what: format!("open {} to the postgres user", root.display()),
        source: e,
    })
}
