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

/// The rows of `query` on `url`, as the source reads them.
async fn rows_of(
    url: &str,
    query: &str,
) -> kiln_render::Result<Vec<serde_json::Map<String, serde_json::Value>>> {
    rows_with(url, query, "").await
}

/// [`rows_of`] with more lines of the Source's spec.
async fn rows_with(
    url: &str,
    query: &str,
    spec: &str,
) -> kiln_render::Result<Vec<serde_json::Map<String, serde_json::Value>>> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("source.yaml"),
        format!(
            "apiVersion: kiln.dev/v1alpha1\nkind: Source\nmetadata: {{name: db}}\nspec:\n  url: \"{url}\"\n  query: \"{query}\"\n  key: id\n{spec}"
        ),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("blueprint.yaml"),
        "apiVersion: kiln.dev/v1alpha1\nkind: Blueprint\nmetadata: {name: b}\nspec:\n  source: db\n  resources:\n  - {id: x, template: \"\"}\n",
    )
    .unwrap();
    let config = Config::load(&[dir.path().to_path_buf()]).unwrap();
    let blueprints = render::compile(&config, &[]).unwrap();
    let rows = render::read_sources(&blueprints, &config, None, None).await?;
    Ok(rows["db"].iter().map(|r| r.values.clone()).collect())
}

#[tokio::test]
async fn each_postgres_column_type_reads_as_the_readme_says_and_others_name_their_column() {
    let url = kiln_testenv::postgres().database("types").await.unwrap();
    let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::raw_sql(
        "CREATE TABLE t (id INT, price NUMERIC(10,2), doc JSONB, at TIMESTAMPTZ, local TIMESTAMP, day DATE, clock TIME, uid UUID, flag BOOLEAN, size SMALLINT, big BIGINT, ratio REAL, kind CHAR(3), where_at POINT);
         INSERT INTO t VALUES (1, 12.5, '{\"a\": [1, true]}', '2024-05-01 14:00:00+02', '2024-05-01 12:00:00', '2024-05-01', '12:00:00', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', TRUE, 7, 9007199254740993, 0.25, 'abc', '(1,2)');",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let rows = rows_of(
        &url,
        "SELECT id, price, doc, at, local, day, clock, uid, flag, size, big, ratio, kind FROM t",
    )
    .await
    .unwrap();
    let row = serde_json::Value::Object(rows[0].clone());
    let expected = serde_json::json!({
        "id": 1, "price": "12.50", "doc": {"a": [1, true]}, "at": "2024-05-01T12:00:00Z",
        "local": "2024-05-01T12:00:00", "day": "2024-05-01", "clock": "12:00:00",
        "uid": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "flag": true, "size": 7,
        "big": 9007199254740993_i64, "ratio": 0.25, "kind": "abc",
    });
    assert_eq!(row, expected);
    let error = rows_of(&url, "SELECT id, where_at FROM t")
        .await
        .unwrap_err();
    let message = error.to_string();
    assert!(
        message.contains("where_at") && message.contains("source db"),
        "{message}"
    );
}

#[tokio::test]
async fn each_mariadb_column_type_reads_as_the_readme_says() {
    let url = kiln_testenv::mariadb().database("types").await.unwrap();
    let mut conn = sqlx::MySqlConnection::connect(&url).await.unwrap();
    sqlx::raw_sql(
        "CREATE TABLE t (id INT, price DECIMAL(10,2), doc JSON, at TIMESTAMP NULL, local DATETIME, day DATE, clock TIME, flag BOOLEAN, kind ENUM('gold', 'silver'), note VARCHAR(10));
         INSERT INTO t VALUES (1, 12.5, '{\"a\": 1}', '2024-05-01 12:00:00', '2024-05-01 12:00:00', '2024-05-01', '12:00:00', TRUE, 'gold', NULL);",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let rows = rows_of(
        &url,
        "SELECT id, price, doc, at, local, day, clock, flag, kind, note FROM t",
    )
    .await
    .unwrap();
    let row = serde_json::Value::Object(rows[0].clone());
    // MariaDB keeps JSON as text (use from_json); TIMESTAMP is UTC.
    let expected = serde_json::json!({
        "id": 1, "price": "12.50", "doc": "{\"a\": 1}", "at": "2024-05-01T12:00:00Z",
        "local": "2024-05-01T12:00:00", "day": "2024-05-01", "clock": "12:00:00",
        "flag": true, "kind": "gold", "note": null,
    });
    assert_eq!(row, expected);
}

#[tokio::test]
async fn a_query_slower_than_the_source_timeout_fails_naming_the_source() {
    let url = kiln_testenv::postgres().database("timeout").await.unwrap();
    let error = rows_with(&url, "SELECT 1 AS id, pg_sleep(30)", "  timeout: 1s\n")
        .await
        .unwrap_err();
    let message = error.to_string();
    assert!(
        message.contains("source db") && message.contains("1s"),
        "{message}"
    );
    assert!(
        !message.contains("kiln:"),
        "no password or user in {message}"
    );
}
