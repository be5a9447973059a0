//! The same rows in SQLite, PostgreSQL and MariaDB render byte-identical
//! trees: every driver keeps integers, floats, booleans, strings, NULL and
//! dates the same way.

#![allow(clippy::unwrap_used)] // a test that cannot go on fails, with the cause

use std::path::Path;

use kiln_render::config::Config;
use kiln_render::{render, tree};
use sqlx::Connection;

const ROWS: &str =
    "INSERT INTO tenants (id, slug, plan, replicas, ratio, active, note, since) VALUES
  (1, 'acme', 'pro', 3, 0.5, TRUE, NULL, '2024-05-01'),
  (2, 'globex', 'free', 1, -2.25, TRUE, 'on', '2023-12-31'),
  (3, 'initech', 'enterprise', 12, 1e-3, FALSE, 'say \"hi\"', '2020-02-29')";

const BLUEPRINT: &str = r#"
apiVersion: kiln.dev/v1alpha1
kind: Blueprint
metadata: {name: tenants}
spec:
  source: db
  namespace: "t-{{ row.slug }}"
  resources:
  - id: tenant
    template: |
      apiVersion: example.com/v1
      kind: Tenant
      metadata: {name: "{{ row.slug }}"}
      spec: {{ row | to_json }}
      replicas: {{ row.replicas }}
      note: {{ row.note }}
"#;

/// Renders the blueprint over `url` and returns the tree.
async fn render_from(dir: &Path, url: &str) -> tree::Tree {
    let source = format!(
        "apiVersion: kiln.dev/v1alpha1\nkind: Source\nmetadata: {{name: db}}\nspec:\n  url: \"{url}\"\n  query: SELECT id, slug, plan, replicas, ratio, active, note, since FROM tenants ORDER BY id\n  key: id\n  active: active\n"
    );
    std::fs::write(dir.join("source.yaml"), source).unwrap();
    std::fs::write(dir.join("blueprint.yaml"), BLUEPRINT).unwrap();
    let config = Config::load(&[dir.to_path_buf()]).unwrap();
    let blueprints = render::compile(&config, &[]).unwrap();
    let rows = render::read_sources(&blueprints, &config, None, None)
        .await
        .unwrap();
    let rendered = render::render(&blueprints, &config, &rows, true).unwrap();
    tree::build(&rendered).unwrap()
}

#[tokio::test]
async fn sqlite_postgres_and_mariadb_render_identical_trees() {
    let sqlite_dir = tempfile::tempdir().unwrap();
    let db = sqlite_dir.path().join("tenants.db");
    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}?mode=rwc", db.display()))
        .await
        .unwrap();
    sqlx::raw_sql(
        "CREATE TABLE tenants (id INTEGER PRIMARY KEY, slug TEXT, plan TEXT, replicas INTEGER, ratio REAL, active BOOLEAN, note TEXT, since TEXT)",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    sqlx::raw_sql(ROWS).execute(&mut conn).await.unwrap();
    conn.close().await.unwrap();
    let sqlite = render_from(sqlite_dir.path(), "sqlite://tenants.db").await;

    let url = kiln_testenv::postgres()
        .database("identical")
        .await
        .unwrap();
    let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::raw_sql(
        "CREATE TABLE tenants (id BIGINT PRIMARY KEY, slug TEXT, plan VARCHAR(20), replicas INT, ratio DOUBLE PRECISION, active BOOLEAN, note TEXT, since DATE)",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    sqlx::raw_sql(ROWS).execute(&mut conn).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let postgres = render_from(dir.path(), &url).await;

    let url = kiln_testenv::mariadb().database("identical").await.unwrap();
    let mut conn = sqlx::MySqlConnection::connect(&url).await.unwrap();
    sqlx::raw_sql(
        "CREATE TABLE tenants (id BIGINT PRIMARY KEY, slug TEXT, plan VARCHAR(20), replicas INT, ratio DOUBLE, active BOOLEAN, note TEXT, since DATE)",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    sqlx::raw_sql(ROWS).execute(&mut conn).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    // mariadb: is the same driver as mysql:.
    let mariadb = render_from(dir.path(), &url.replacen("mysql:", "mariadb:", 1)).await;

    let acme = String::from_utf8(sqlite.files["tenants/1/tenant.yaml"].clone()).unwrap();
    let typed = "spec:\n  id: 1\n  slug: acme\n  plan: pro\n  replicas: 3\n  ratio: 0.5\n  active: true\n  note: null\n  since: \"2024-05-01\"\nreplicas: 3\nnote: null\n";
    assert!(acme.ends_with(typed), "{acme}");
    let globex = String::from_utf8(sqlite.files["tenants/2/tenant.yaml"].clone()).unwrap();
    assert!(
        globex.contains("  note: \"on\"\n"),
        "a string that reads as a boolean stays quoted: {globex}"
    );
    assert!(
        !sqlite.files.keys().any(|k| k.starts_with("tenants/3/")),
        "inactive rows are not rendered"
    );
    assert_eq!(sqlite, postgres, "SQLite and PostgreSQL differ");
    assert_eq!(sqlite, mariadb, "SQLite and MariaDB differ");
}
