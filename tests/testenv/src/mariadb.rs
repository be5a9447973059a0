//! MariaDB from Debian's server binaries, in a temporary data directory.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use sqlx::Connection;
use sqlx::mysql::MySqlConnection;

use crate::process::{Tier, find_program, free_port, mkdir, run, spawn, write};
use crate::{Result, random_hex, sql, unique_name, wait_for_sql, with_database};

/// A running MariaDB server (or an existing MySQL-compatible one named by a URL).
#[derive(Debug, Clone)]
pub struct MariaDb {
    /// URL of the `kiln` database as a user with every privilege, password
    /// included.
    pub url: String,
}

impl MariaDb {
    pub(crate) fn existing(url: String) -> Self {
        Self { url }
    }

    /// The `mariadb` client command line for this server: the client takes
    /// options, not URLs.
    pub fn client_command(&self) -> String {
        let rest = self.url.split_once("://").map_or("", |(_, rest)| rest);
        let (credentials, location) = rest.rsplit_once('@').unwrap_or(("", rest));
        let (user, password) = credentials.split_once(':').unwrap_or((credentials, ""));
        let (address, database) = location.split_once('/').unwrap_or((location, ""));
        let database = database.split('?').next().unwrap_or_default();
        let (host, port) = address.rsplit_once(':').unwrap_or((address, "3306"));
        format!(
            "mariadb --host={host} --port={port} --user={user} --password={password} {database}"
        )
    }

    /// Creates an empty database of its own for one test and returns its URL.
    pub async fn database(&self, hint: &str) -> Result<String> {
        let name = unique_name(hint).replace('-', "_");
        let mut admin = MySqlConnection::connect(&self.url)
            .await
            .map_err(|e| sql("connect to the test MariaDB server", e))?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "CREATE DATABASE `{name}` CHARACTER SET utf8mb4"
        )))
        .execute(&mut admin)
        .await
        .map_err(|e| sql(&format!("create database {name}"), e))?;
        Ok(with_database(&self.url, &name))
    }

    /// Initialises a data directory under `root` and starts the server on a
    /// free port, with a password user `kiln` created at start-up.
    pub(crate) fn start(root: &Path) -> Result<Self> {
        let install_db = find_program("mariadb-install-db")?;
        let server = find_program("mariadbd")?;
        let dir = mkdir(&root.join("mariadb"))?;
        let data = dir.join("data");
        let log = dir.join("mariadb.log");
        // mariadbd runs as root only when told so explicitly.
        let user = whoami();

        run(
            "mariadb-install-db",
            Command::new(install_db)
                .arg("--no-defaults")
                .arg(format!("--datadir={}", data.display()))
                .arg(format!("--user={user}"))
                .args(["--auth-root-authentication-method=normal", "--skip-test-db"])
                .current_dir(&dir),
            &log,
        )?;

        let password = random_hex(12);
        let init = dir.join("init.sql");
        write(
            &init,
            format!(
                "CREATE USER IF NOT EXISTS 'kiln'@'127.0.0.1' IDENTIFIED BY '{password}';\n\
                 CREATE USER IF NOT EXISTS 'kiln'@'localhost' IDENTIFIED BY '{password}';\n\
                 GRANT ALL PRIVILEGES ON *.* TO 'kiln'@'127.0.0.1' WITH GRANT OPTION;\n\
                 GRANT ALL PRIVILEGES ON *.* TO 'kiln'@'localhost' WITH GRANT OPTION;\n\
                 CREATE DATABASE IF NOT EXISTS kiln CHARACTER SET utf8mb4;\n"
            ),
        )?;
        let port = free_port()?;
        spawn(
            "mariadbd",
            Tier::Server,
            Command::new(server)
                .arg("--no-defaults")
                .arg(format!("--datadir={}", data.display()))
                .arg(format!("--user={user}"))
                .arg(format!("--port={port}"))
                .arg("--bind-address=127.0.0.1")
                .arg(format!("--socket={}", dir.join("mariadb.sock").display()))
                .arg(format!("--pid-file={}", dir.join("mariadb.pid").display()))
                .arg(format!("--init-file={}", init.display()))
                .args(["--skip-name-resolve", "--character-set-server=utf8mb4"])
                // Test data need not survive a power cut.
                .args([
                    "--innodb-flush-log-at-trx-commit=0",
                    "--innodb-buffer-pool-size=128M",
                ])
                .arg("--max-connections=300"),
            root,
            &log,
        )?;
        let url = format!("mysql://kiln:{password}@127.0.0.1:{port}/kiln");
        let probe = url.clone();
        wait_for_sql("mariadbd", &log, Duration::from_secs(60), move || {
            let url = probe.clone();
            async move { MySqlConnection::connect(&url).await?.ping().await }
        })?;
        Ok(Self { url })
    }
}

fn whoami() -> String {
    Command::new("id")
        .arg("-un")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "root".to_string())
}
