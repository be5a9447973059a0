//! The components kiln-render builds on work here for real: sqlx against
//! SQLite, PostgreSQL and MariaDB, and git2 writing a commit that the git CLI
//! reads back.

#![allow(clippy::unwrap_used)] // a test that cannot go on fails, with the cause

use std::process::Command;

use sqlx::{Connection, Row};

/// What every driver must give back, whatever its column types are called.
#[derive(Debug, PartialEq)]
struct Tenant {
    id: i64,
    name: String,
    active: bool,
    ratio: f64,
    note: Option<String>,
}

fn expected() -> Vec<Tenant> {
    vec![
        Tenant {
            id: 1,
            name: "acme".into(),
            active: true,
            ratio: 0.5,
            note: None,
        },
        Tenant {
            id: 2,
            name: "ünïcode ☃".into(),
            active: false,
            ratio: -2.25,
            note: Some("pro".into()),
        },
    ]
}

/// Inserts the rows of [`expected`] with bound parameters and reads them back.
macro_rules! round_trip {
    ($conn:expr, $create:expr, $insert:expr) => {{
        let conn = $conn;
        sqlx::raw_sql($create).execute(&mut *conn).await.unwrap();
        for t in expected() {
            sqlx::query($insert)
                .bind(t.id)
                .bind(&t.name)
                .bind(t.active)
                .bind(t.ratio)
                .bind(&t.note)
                .execute(&mut *conn)
                .await
                .unwrap();
        }
        let rows = sqlx::query("SELECT id, name, active, ratio, note FROM tenants ORDER BY id")
            .fetch_all(&mut *conn)
            .await
            .unwrap();
        let tenants: Vec<Tenant> = rows
            .iter()
            .map(|r| Tenant {
                id: r.get("id"),
                name: r.get("name"),
                active: r.get("active"),
                ratio: r.get("ratio"),
                note: r.get("note"),
            })
            .collect();
        assert_eq!(tenants, expected());
    }};
}

#[tokio::test]
async fn sqlite_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("tenants.db").display()
    );
    let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
    round_trip!(
        &mut conn,
        "CREATE TABLE tenants (id INTEGER PRIMARY KEY, name TEXT NOT NULL, active BOOLEAN NOT NULL, ratio REAL NOT NULL, note TEXT)",
        "INSERT INTO tenants VALUES (?, ?, ?, ?, ?)"
    );
}

#[tokio::test]
async fn postgres_round_trip() {
    let url = kiln_testenv::postgres()
        .database("round-trip")
        .await
        .unwrap();
    let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
    round_trip!(
        &mut conn,
        "CREATE TABLE tenants (id BIGINT PRIMARY KEY, name TEXT NOT NULL, active BOOLEAN NOT NULL, ratio DOUBLE PRECISION NOT NULL, note TEXT)",
        "INSERT INTO tenants VALUES ($1, $2, $3, $4, $5)"
    );
}

#[tokio::test]
async fn mariadb_round_trip() {
    let url = kiln_testenv::mariadb()
        .database("round-trip")
        .await
        .unwrap();
    let mut conn = sqlx::MySqlConnection::connect(&url).await.unwrap();
    round_trip!(
        &mut conn,
        "CREATE TABLE tenants (id BIGINT PRIMARY KEY, name VARCHAR(64) NOT NULL, active BOOLEAN NOT NULL, ratio DOUBLE NOT NULL, note TEXT) CHARACTER SET utf8mb4",
        "INSERT INTO tenants VALUES (?, ?, ?, ?, ?)"
    );
}

#[test]
fn git2_commit_is_read_back_by_the_git_cli() {
    let dir = tempfile::tempdir().unwrap();
    let repo = git2::Repository::init_bare(dir.path()).unwrap();
    let blob = repo.blob(b"apiVersion: v1\nkind: Namespace\n").unwrap();
    let mut inner = repo.treebuilder(None).unwrap();
    inner.insert("namespace.yaml", blob, 0o100644).unwrap();
    let inner = inner.write().unwrap();
    let mut root = repo.treebuilder(None).unwrap();
    root.insert("tenant-a", inner, 0o040000).unwrap();
    let tree = repo.find_tree(root.write().unwrap()).unwrap();
    let who = git2::Signature::now("Kiln", "kiln@example.com").unwrap();
    let commit = repo
        .commit(
            Some("refs/heads/main"),
            &who,
            &who,
            "render: 1 instance added",
            &tree,
            &[],
        )
        .unwrap();

    let git = |args: &[&str]| {
        let out = Command::new("git")
            .arg("--git-dir")
            .arg(dir.path())
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(git(&["rev-parse", "main"]).trim(), commit.to_string());
    assert_eq!(
        git(&["show", "main:tenant-a/namespace.yaml"]),
        "apiVersion: v1\nkind: Namespace\n"
    );
    assert_eq!(
        git(&["log", "--format=%an <%ae> %s", "main"]).trim(),
        "Kiln <kiln@example.com> render: 1 instance added"
    );
    git(&["fsck", "--strict"]);
}
