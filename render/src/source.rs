//! Reading rows: SQLite, PostgreSQL and MySQL/MariaDB through sqlx, and CSV,
//! JSON or YAML files.
//!
//! Values keep their type: integers, floats, booleans, strings, NULL, JSON
//! columns as nested values. Decimals become strings that keep their scale
//! (`12.50`); timestamps with a time zone become RFC 3339 strings in UTC
//! (`2024-05-01T12:00:00Z`), without one `2024-05-01T12:00:00`; dates
//! `2024-05-01`; times `12:00:00`; UUIDs their hyphenated form. CSV cells are
//! strings. SQLite and MariaDB store JSON as text, so JSON columns arrive as
//! strings there (`from_json` in a template turns them into values); from
//! PostgreSQL (`json`, `jsonb`) and MySQL (`JSON`) they arrive as values.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::{Stream, TryStreamExt};
use serde_json::{Map, Value};
use sqlx::{Column, Connection, Row as _, TypeInfo, ValueRef};

use crate::api::{ObjectsSpec, SourceSpec};
use crate::config::Named;
use crate::{Error, Result, yaml};

/// How long a source may take to answer when it does not say.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// One row of a source: its key, whether it is active, and every column.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// The key column's value as a string.
    pub key: String,
    /// Whether the `active` column is truthy (true when there is none).
    pub active: bool,
    /// Every selected column, in the query's order.
    pub values: Map<String, Value>,
}

/// Lists Kubernetes objects for a `kubernetes` source. This crate never
/// talks to a cluster: the binary and the controller provide one.
pub trait Objects: Send + Sync {
    /// Every object `spec` selects, as JSON; an error is one line.
    fn list<'a>(
        &'a self,
        spec: &'a ObjectsSpec,
    ) -> BoxFuture<'a, std::result::Result<Vec<Map<String, Value>>, String>>;
}

/// Reads a source's rows, at most `limit` of them, checking keys. A
/// `kubernetes` source needs `objects`.
pub async fn read(
    source: &Named<SourceSpec>,
    limit: Option<usize>,
    objects: Option<&dyn Objects>,
) -> Result<Vec<Row>> {
    let timeout = match &source.spec.timeout {
        Some(text) => parse_duration(text)
            .map_err(|e| Error::source(&source.name, format!("spec.timeout: {e}")))?,
        None => DEFAULT_TIMEOUT,
    };
    if let Some(spec) = &source.spec.kubernetes {
        let objects = objects.ok_or_else(|| {
            Error::source(
                &source.name,
                format!(
                    "reads {} objects from a cluster, and none was given",
                    spec.kind
                ),
            )
        })?;
        let listed = tokio::time::timeout(timeout, objects.list(spec))
            .await
            .map_err(|_| {
                Error::source(
                    &source.name,
                    format!("no answer within {}s (spec.timeout)", timeout.as_secs_f64()),
                )
            })?
            .map_err(|e| Error::source(&source.name, e))?;
        let mut rows = keyed_objects(source, listed)?;
        if let Some(limit) = limit {
            rows.truncate(limit);
        }
        return Ok(rows);
    }
    let url = url(source)?;
    let read = read_url(source, &url, limit);
    let values = tokio::time::timeout(timeout, read).await.map_err(|_| {
        Error::source(
            &source.name,
            format!("no answer within {}s (spec.timeout)", timeout.as_secs_f64()),
        )
    })??;
    keyed(source, values)
}

/// Parses a duration such as `30s`, `5m`, `1h30m`, `500ms`.
pub fn parse_duration(text: &str) -> std::result::Result<Duration, String> {
    let parsed = kube::core::Duration::from_str(text)
        .map_err(|e| format!("{text:?} is not a duration like 30s or 5m ({e})"))?;
    if parsed.is_negative() {
        return Err(format!("{text:?} is negative"));
    }
    Ok(parsed.into())
}

/// Whether an `active` value counts as true: true, 1, yes, on (any case).
pub fn truthy(value: &Value) -> bool {
    match value {
        Value::Bool(b) => *b,
        Value::Number(n) => {
            n.as_i64() == Some(1) || n.as_u64() == Some(1) || n.as_f64() == Some(1.0)
        }
        Value::String(s) => {
            let s = s.trim();
            ["true", "1", "yes", "on"]
                .iter()
                .any(|t| s.eq_ignore_ascii_case(t))
        }
        _ => false,
    }
}

fn url(source: &Named<SourceSpec>) -> Result<String> {
    if let Some(url) = &source.spec.url {
        return Ok(url.clone());
    }
    match source.spec.url_from.as_ref() {
        Some(from) => match (&from.env, &from.secret_key_ref) {
            (Some(var), _) => std::env::var(var).map_err(|_| {
                Error::source(
                    &source.name,
                    format!("urlFrom.env: environment variable {var} is not set"),
                )
            }),
            (None, Some(secret)) => Err(Error::source(
                &source.name,
                format!(
                    "urlFrom.secretKeyRef ({}/{}) is read by the controller only; use url or urlFrom.env with the CLI",
                    secret.name, secret.key
                ),
            )),
            (None, None) => Err(Error::source(
                &source.name,
                "urlFrom needs env or secretKeyRef",
            )),
        },
        None => Err(Error::source(&source.name, "url or urlFrom is required")),
    }
}

/// What is wrong with a source's `spec.notify`, if anything: it is for
/// PostgreSQL URLs (a `urlFrom` URL is checked when read), and the channel
/// is an identifier.
pub fn notify_problem(spec: &SourceSpec, channel: &str) -> Option<String> {
    if spec.kubernetes.is_some() {
        return Some(
            "spec.notify is for PostgreSQL sources; spec.kubernetes sources are watched".into(),
        );
    }
    if let Some(url) = &spec.url
        && !is_postgres(url)
    {
        return Some(
            "spec.notify is for PostgreSQL sources (LISTEN/NOTIFY); other sources are polled at spec.interval"
                .into(),
        );
    }
    let mut chars = channel.chars();
    let identifier = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && channel.len() <= 63;
    (!identifier).then(|| {
        format!(
            "spec.notify.channel {channel:?} must be a PostgreSQL identifier: letters, digits and '_', not starting with a digit, at most 63"
        )
    })
}

fn is_postgres(url: &str) -> bool {
    let scheme = url.split_once(':').map_or("", |(s, _)| s);
    scheme.eq_ignore_ascii_case("postgres") || scheme.eq_ignore_ascii_case("postgresql")
}

/// Waits for notifications on a PostgreSQL source's `spec.notify.channel`
/// and calls `notified` for each; `notified` returning false ends the wait.
/// With `reconnected`, `notified` is also called as soon as Kiln listens,
/// since what was sent while it was not listening is lost. Ends with an
/// error (one line, no password) when it cannot connect or loses the
/// connection for good; the caller tries again.
pub async fn listen(
    source: &Named<SourceSpec>,
    reconnected: bool,
    notified: &mut (dyn FnMut() -> bool + Send),
) -> Result<()> {
    let Some(notify) = &source.spec.notify else {
        return Ok(());
    };
    let url = url(source)?;
    if !is_postgres(&url) {
        return Err(Error::source(
            &source.name,
            "spec.notify is for PostgreSQL sources (LISTEN/NOTIFY), and the URL is not postgres://",
        ));
    }
    let fail = |what: &str, e: sqlx::Error| {
        Error::source(
            &source.name,
            format!("{what}: {}", redact(&e.to_string(), &url)),
        )
    };
    let mut listener = sqlx::postgres::PgListener::connect(&url)
        .await
        .map_err(|e| fail("cannot connect to listen for notifications", e))?;
    listener
        .listen(&notify.channel)
        .await
        .map_err(|e| fail(&format!("cannot LISTEN on {}", notify.channel), e))?;
    tracing::info!(source = %source.name, channel = %notify.channel, "listening for notifications");
    if reconnected && !notified() {
        return Ok(());
    }
    loop {
        match listener.try_recv().await {
            Ok(Some(_)) => {
                if !notified() {
                    return Ok(());
                }
            }
            // What was sent while the connection was down is lost: the rows
            // may have changed.
            Ok(None) => {
                tracing::info!(source = %source.name, channel = %notify.channel, "the connection was lost and made again; listening for notifications, and reading the source");
                if !notified() {
                    return Ok(());
                }
            }
            Err(e) => return Err(fail("stopped listening for notifications", e)),
        }
    }
}

/// The local files a source reads, when its `url` is a `file:` or
/// `sqlite:` URL (with the seed file): what a watcher follows.
pub fn local_files(source: &Named<SourceSpec>) -> Vec<PathBuf> {
    let Some(url) = &source.spec.url else {
        return Vec::new();
    };
    let (scheme, rest) = url.split_once(':').unwrap_or(("", url));
    let mut files = Vec::new();
    match scheme.to_ascii_lowercase().as_str() {
        "file" => files.push(source.resolve(strip_slashes(rest))),
        "sqlite" => {
            files.push(source.resolve(strip_slashes(rest.split('?').next().unwrap_or_default())));
            if let Some(seed) = &source.spec.seed_file {
                files.push(source.resolve(seed));
            }
        }
        _ => {}
    }
    files
}

async fn read_url(
    source: &Named<SourceSpec>,
    url: &str,
    limit: Option<usize>,
) -> Result<Vec<Map<String, Value>>> {
    let (scheme, rest) = url.split_once(':').unwrap_or(("", url));
    let fail = |what: &str, e: sqlx::Error| {
        Error::source(
            &source.name,
            format!("{what}: {}", redact(&e.to_string(), url)),
        )
    };
    let query = || {
        source
            .spec
            .query
            .as_deref()
            .filter(|q| !q.trim().is_empty())
            .ok_or_else(|| Error::source(&source.name, "spec.query is required for SQL sources"))
    };
    match scheme.to_ascii_lowercase().as_str() {
        "sqlite" => {
            let query = query()?;
            let path = source.resolve(strip_slashes(rest.split('?').next().unwrap_or_default()));
            let mut conn = open_sqlite(source, &path).await?;
            collect(
                source,
                sqlx::query(sqlx::AssertSqlSafe(query)).fetch(&mut conn),
                sqlite_row,
                limit,
                url,
            )
            .await
        }
        "postgres" | "postgresql" => {
            let query = query()?;
            let mut conn = sqlx::PgConnection::connect(url)
                .await
                .map_err(|e| fail("cannot connect", e))?;
            collect(
                source,
                sqlx::query(sqlx::AssertSqlSafe(query)).fetch(&mut conn),
                pg_row,
                limit,
                url,
            )
            .await
        }
        "mysql" | "mariadb" => {
            let query = query()?;
            let url = format!("mysql:{rest}");
            let mut conn = sqlx::MySqlConnection::connect(&url)
                .await
                .map_err(|e| fail("cannot connect", e))?;
            collect(
                source,
                sqlx::query(sqlx::AssertSqlSafe(query)).fetch(&mut conn),
                mysql_row,
                limit,
                &url,
            )
            .await
        }
        "file" => {
            let path = source.resolve(strip_slashes(rest));
            let mut rows = read_file(source, &path)?;
            if let Some(limit) = limit {
                rows.truncate(limit);
            }
            Ok(rows)
        }
        _ => Err(Error::source(
            &source.name,
            format!(
                "url scheme {:?} is not one of sqlite:, postgres:, postgresql:, mysql:, mariadb:, file:",
                scheme
            ),
        )),
    }
}

/// `//path` and `path` both name a path; `///abs` and `//` + `/abs` too.
fn strip_slashes(rest: &str) -> &str {
    rest.strip_prefix("//").unwrap_or(rest)
}

async fn open_sqlite(source: &Named<SourceSpec>, path: &Path) -> Result<sqlx::SqliteConnection> {
    use sqlx::sqlite::SqliteConnectOptions;
    if !path.exists() {
        let Some(seed) = &source.spec.seed_file else {
            return Err(Error::source(
                &source.name,
                format!("database file {} does not exist", path.display()),
            ));
        };
        seed_sqlite(source, path, &source.resolve(seed)).await?;
    }
    // Rows come from SQLite's worker thread through a channel: a deep one
    // lets the worker run ahead instead of waking the reader every few
    // rows (10,000 rows: 88 ms with the default of 50).
    let options = SqliteConnectOptions::new()
        .filename(path)
        .read_only(true)
        .row_buffer_size(4096);
    sqlx::SqliteConnection::connect_with(&options)
        .await
        .map_err(|e| Error::source(&source.name, format!("cannot open {}: {e}", path.display())))
}

/// Creates a SQLite database from a SQL file, atomically: it is built beside
/// the target and renamed into place, so a failed seed leaves nothing behind.
async fn seed_sqlite(source: &Named<SourceSpec>, path: &Path, seed: &Path) -> Result<()> {
    use sqlx::sqlite::SqliteConnectOptions;
    let sql = std::fs::read_to_string(seed)
        .map_err(|e| Error::source(&source.name, format!("seedFile {}: {e}", seed.display())))?;
    let partial = PathBuf::from(format!("{}.seeding-{}", path.display(), std::process::id()));
    let result = async {
        let options = SqliteConnectOptions::new()
            .filename(&partial)
            .create_if_missing(true);
        let mut conn = sqlx::SqliteConnection::connect_with(&options).await?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&mut conn)
            .await?;
        conn.close().await
    }
    .await;
    match result {
        Ok(()) => std::fs::rename(&partial, path).map_err(|e| {
            Error::source(
                &source.name,
                format!("cannot create {}: {e}", path.display()),
            )
        }),
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            Err(Error::source(
                &source.name,
                format!("seedFile {}: {e}", seed.display()),
            ))
        }
    }
}

async fn collect<R>(
    source: &Named<SourceSpec>,
    stream: impl Stream<Item = Result<R, sqlx::Error>>,
    convert: fn(&R) -> Result<Map<String, Value>, String>,
    limit: Option<usize>,
    url: &str,
) -> Result<Vec<Map<String, Value>>> {
    let mut stream = std::pin::pin!(stream);
    let mut rows = Vec::new();
    while limit.is_none_or(|l| rows.len() < l) {
        let next = stream.try_next().await.map_err(|e| {
            Error::source(
                &source.name,
                format!("query failed: {}", redact(&e.to_string(), url)),
            )
        })?;
        let Some(row) = next else { break };
        rows.push(convert(&row).map_err(|e| Error::source(&source.name, e))?);
    }
    Ok(rows)
}

/// Checks keys (present, not NULL, unique) and reads `active`.
/// Kubernetes objects as rows, in key order: the key is the value at the
/// dotted path `spec.key`, else `namespace/name` (`name` without a
/// namespace); `spec.active` is a dotted path too.
fn keyed_objects(source: &Named<SourceSpec>, objects: Vec<Map<String, Value>>) -> Result<Vec<Row>> {
    let mut rows = Vec::with_capacity(objects.len());
    let mut seen = HashSet::with_capacity(objects.len());
    for values in objects {
        let meta = |field: &str| {
            values
                .get("metadata")
                .and_then(|m| m.get(field))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        let (namespace, name) = (meta("namespace"), meta("name"));
        let object = if namespace.is_empty() {
            name.clone()
        } else {
            format!("{namespace}/{name}")
        };
        let key = if source.spec.key.is_empty() {
            object.clone()
        } else {
            match at_path(&values, &source.spec.key) {
                Some(Value::String(s)) if !s.is_empty() => s.clone(),
                Some(v @ (Value::Number(_) | Value::Bool(_))) => v.to_string(),
                other => {
                    return Err(Error::source(
                        &source.name,
                        format!(
                            "{} {object}: key {} must be a string or a number, found {}",
                            values
                                .get("kind")
                                .and_then(Value::as_str)
                                .unwrap_or("object"),
                            source.spec.key,
                            other.map_or("nothing".to_string(), ToString::to_string)
                        ),
                    ));
                }
            }
        };
        let active = source
            .spec
            .active
            .as_deref()
            .is_none_or(|path| at_path(&values, path).is_some_and(truthy));
        if !seen.insert(key.clone()) {
            return Err(Error::source(
                &source.name,
                format!("duplicate key {key} (object {object})"),
            ));
        }
        rows.push(Row {
            key,
            active,
            values,
        });
    }
    rows.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(rows)
}

/// The value at a dotted path: `spec.plan`, `metadata.labels.tier`.
fn at_path<'v>(values: &'v Map<String, Value>, path: &str) -> Option<&'v Value> {
    let mut parts = path.split('.');
    let mut value = values.get(parts.next()?)?;
    for part in parts {
        value = value.get(part)?;
    }
    Some(value)
}

fn keyed(source: &Named<SourceSpec>, rows: Vec<Map<String, Value>>) -> Result<Vec<Row>> {
    let key_column = &source.spec.key;
    let mut seen = HashSet::with_capacity(rows.len());
    let mut out = Vec::with_capacity(rows.len());
    for (index, values) in rows.into_iter().enumerate() {
        let columns = || values.keys().cloned().collect::<Vec<_>>().join(", ");
        let key = match values.get(key_column) {
            None => {
                return Err(Error::source(
                    &source.name,
                    format!(
                        "key column {key_column} is not in the result (columns: {})",
                        columns()
                    ),
                ));
            }
            Some(Value::Null) => {
                return Err(Error::source(
                    &source.name,
                    format!("row {} has a NULL key ({key_column})", index + 1),
                ));
            }
            Some(Value::String(s)) => s.clone(),
            Some(v @ (Value::Number(_) | Value::Bool(_))) => v.to_string(),
            Some(other) => {
                return Err(Error::source(
                    &source.name,
                    format!(
                        "row {}: key {key_column} must be a string or a number, found {other}",
                        index + 1
                    ),
                ));
            }
        };
        let active = match &source.spec.active {
            None => true,
            Some(column) => match values.get(column) {
                Some(value) => truthy(value),
                None => {
                    return Err(Error::source(
                        &source.name,
                        format!(
                            "active column {column} is not in the result (columns: {})",
                            columns()
                        ),
                    ));
                }
            },
        };
        if !seen.insert(key.clone()) {
            return Err(Error::source(
                &source.name,
                format!("duplicate key {key} ({key_column})"),
            ));
        }
        out.push(Row {
            key,
            active,
            values,
        });
    }
    Ok(out)
}

fn read_file(source: &Named<SourceSpec>, path: &Path) -> Result<Vec<Map<String, Value>>> {
    let at =
        |message: String| Error::source(&source.name, format!("{}: {message}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|e| at(format!("cannot read: {e}")))?;
    let extension = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default()
        .to_ascii_lowercase();
    let documents: Value = match extension.as_str() {
        "csv" => return read_csv(&text).map_err(at),
        "json" => serde_json::from_str(&text).map_err(|e| at(format!("invalid JSON: {e}")))?,
        "yaml" | "yml" => yaml::from_str(&text, &path.display().to_string())?,
        other => {
            return Err(at(format!(
                "unknown file type {other:?} (expected .csv, .json, .yaml or .yml)"
            )));
        }
    };
    let Value::Array(items) = documents else {
        return Err(at("expected an array of objects".into()));
    };
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| match item {
            Value::Object(map) => Ok(map),
            other => Err(at(format!("item {} is not an object: {other}", i + 1))),
        })
        .collect()
}

fn read_csv(text: &str) -> Result<Vec<Map<String, Value>>, String> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .from_reader(text.as_bytes());
    let headers: Vec<String> = reader
        .headers()
        .map_err(|e| format!("invalid CSV header: {e}"))?
        .iter()
        .map(|h| h.trim().to_string())
        .collect();
    reader
        .records()
        .enumerate()
        .map(|(i, record)| {
            let record = record.map_err(|e| format!("invalid CSV at record {}: {e}", i + 1))?;
            Ok(headers
                .iter()
                .zip(record.iter())
                .map(|(h, v)| (h.clone(), Value::String(v.to_string())))
                .collect())
        })
        .collect()
}

/// Hides a URL's password in a message, whatever the driver put there.
fn redact(message: &str, url: &str) -> String {
    let password = url
        .split_once("://")
        .and_then(|(_, rest)| rest.split('@').next().filter(|_| rest.contains('@')))
        .and_then(|userinfo| userinfo.split_once(':'))
        .map(|(_, password)| password)
        .filter(|p| !p.is_empty());
    match password {
        Some(password) => message.replace(password, "***"),
        None => message.to_string(),
    }
}

fn unsupported(column: &str, type_name: &str) -> String {
    format!(
        "column {column} has type {type_name}, which Kiln does not read; cast it in the query (to text, a number or JSON)"
    )
}

fn sqlite_row(row: &sqlx::sqlite::SqliteRow) -> Result<Map<String, Value>, String> {
    let mut out = Map::new();
    for (i, column) in row.columns().iter().enumerate() {
        let name = column.name();
        let raw = row.try_get_raw(i).map_err(|e| e.to_string())?;
        let declared = column.type_info().name().to_ascii_uppercase();
        let value = if raw.is_null() {
            Value::Null
        } else {
            let stored = raw.type_info().name().to_string();
            let get = |e: sqlx::Error| format!("column {name}: {e}");
            match stored.as_str() {
                "INTEGER" if declared.contains("BOOL") => {
                    Value::Bool(row.try_get::<i64, _>(i).map_err(get)? != 0)
                }
                "INTEGER" => Value::from(row.try_get::<i64, _>(i).map_err(get)?),
                "REAL" => Value::from(row.try_get::<f64, _>(i).map_err(get)?),
                "TEXT" => Value::String(row.try_get(i).map_err(get)?),
                "BLOB" => Value::String(
                    String::from_utf8_lossy(&row.try_get::<Vec<u8>, _>(i).map_err(get)?)
                        .into_owned(),
                ),
                other => return Err(unsupported(name, other)),
            }
        };
        out.insert(name.to_string(), value);
    }
    Ok(out)
}

fn pg_row(row: &sqlx::postgres::PgRow) -> Result<Map<String, Value>, String> {
    use sqlx::types::chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, Utc};
    let mut out = Map::new();
    for (i, column) in row.columns().iter().enumerate() {
        let name = column.name();
        let type_name = column.type_info().name().to_string();
        let get = |e: sqlx::Error| format!("column {name}: {e}");
        macro_rules! cell {
            ($t:ty, $f:expr) => {
                row.try_get::<Option<$t>, _>(i)
                    .map_err(get)?
                    .map_or(Value::Null, $f)
            };
        }
        let value = match type_name.as_str() {
            "BOOL" => cell!(bool, Value::Bool),
            "INT2" => cell!(i16, Value::from),
            "INT4" => cell!(i32, Value::from),
            "INT8" => cell!(i64, Value::from),
            "OID" => cell!(sqlx::postgres::types::Oid, |o| Value::from(o.0)),
            "FLOAT4" => cell!(f32, |f| Value::from(f64::from(f))),
            "FLOAT8" => cell!(f64, Value::from),
            "NUMERIC" => cell!(sqlx::types::Decimal, |d| Value::String(d.to_string())),
            "TEXT" | "VARCHAR" | "BPCHAR" | "NAME" | "CITEXT" | "CHAR" => {
                cell!(String, Value::String)
            }
            "JSON" | "JSONB" => cell!(Value, |v| v),
            "UUID" => cell!(sqlx::types::Uuid, |u| Value::String(
                u.hyphenated().to_string()
            )),
            "TIMESTAMPTZ" => cell!(DateTime<Utc>, |t| Value::String(
                t.format("%Y-%m-%dT%H:%M:%S%.fZ").to_string()
            )),
            "TIMESTAMP" => cell!(NaiveDateTime, |t| Value::String(
                t.format("%Y-%m-%dT%H:%M:%S%.f").to_string()
            )),
            "DATE" => cell!(NaiveDate, |d| Value::String(
                d.format("%Y-%m-%d").to_string()
            )),
            "TIME" => cell!(NaiveTime, |t| Value::String(
                t.format("%H:%M:%S%.f").to_string()
            )),
            "TEXT[]" | "VARCHAR[]" => cell!(Vec<String>, Value::from),
            "INT4[]" => cell!(Vec<i32>, Value::from),
            "INT8[]" => cell!(Vec<i64>, Value::from),
            "VOID" => Value::Null,
            other => return Err(unsupported(name, other)),
        };
        out.insert(name.to_string(), value);
    }
    Ok(out)
}

fn mysql_row(row: &sqlx::mysql::MySqlRow) -> Result<Map<String, Value>, String> {
    use sqlx::types::chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, Utc};
    let mut out = Map::new();
    for (i, column) in row.columns().iter().enumerate() {
        let name = column.name();
        let type_name = column.type_info().name().to_string();
        let get = |e: sqlx::Error| format!("column {name}: {e}");
        macro_rules! cell {
            ($t:ty, $f:expr) => {
                row.try_get::<Option<$t>, _>(i)
                    .map_err(get)?
                    .map_or(Value::Null, $f)
            };
        }
        let value = match type_name.as_str() {
            "NULL" => Value::Null,
            "BOOLEAN" => cell!(bool, Value::Bool),
            "TINYINT" | "SMALLINT" | "MEDIUMINT" | "INT" | "BIGINT" | "YEAR" => {
                cell!(i64, Value::from)
            }
            "TINYINT UNSIGNED" | "SMALLINT UNSIGNED" | "MEDIUMINT UNSIGNED" | "INT UNSIGNED"
            | "BIGINT UNSIGNED" => {
                cell!(u64, Value::from)
            }
            "FLOAT" => cell!(f32, |f| Value::from(f64::from(f))),
            "DOUBLE" => cell!(f64, Value::from),
            "DECIMAL" => cell!(sqlx::types::Decimal, |d| Value::String(d.to_string())),
            "JSON" => cell!(Value, |v| v),
            "TIMESTAMP" => cell!(DateTime<Utc>, |t| Value::String(
                t.format("%Y-%m-%dT%H:%M:%S%.fZ").to_string()
            )),
            "DATETIME" => cell!(NaiveDateTime, |t| Value::String(
                t.format("%Y-%m-%dT%H:%M:%S%.f").to_string()
            )),
            "DATE" => cell!(NaiveDate, |d| Value::String(
                d.format("%Y-%m-%d").to_string()
            )),
            "TIME" => cell!(NaiveTime, |t| Value::String(
                t.format("%H:%M:%S%.f").to_string()
            )),
            "CHAR" | "VARCHAR" | "TEXT" | "TINYTEXT" | "MEDIUMTEXT" | "LONGTEXT" | "ENUM"
            | "SET" => {
                cell!(String, Value::String)
            }
            "BINARY" | "VARBINARY" | "BLOB" | "TINYBLOB" | "MEDIUMBLOB" | "LONGBLOB" => {
                cell!(Vec<u8>, |b| Value::String(
                    String::from_utf8_lossy(&b).into_owned()
                ))
            }
            other => return Err(unsupported(name, other)),
        };
        out.insert(name.to_string(), value);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn objects_source(key: &str, active: Option<&str>) -> Named<SourceSpec> {
        Named {
            name: "tenants".into(),
            spec: SourceSpec {
                url: None,
                url_from: None,
                kubernetes: Some(ObjectsSpec {
                    api_version: "example.com/v1".into(),
                    kind: "Tenant".into(),
                    ..ObjectsSpec::default()
                }),
                query: None,
                key: key.into(),
                active: active.map(str::to_string),
                interval: None,
                timeout: None,
                seed_file: None,
                notify: None,
            },
            file: "kiln.yaml".into(),
        }
    }

    fn tenant(namespace: Option<&str>, name: &str, spec: Value) -> Map<String, Value> {
        let mut metadata = json!({"name": name});
        if let Some(ns) = namespace {
            metadata["namespace"] = json!(ns);
        }
        let Value::Object(map) = json!({"kind": "Tenant", "metadata": metadata, "spec": spec})
        else {
            unreachable!()
        };
        map
    }

    #[test]
    fn objects_are_keyed_by_namespace_and_name_or_a_dotted_path() {
        let objects = vec![
            tenant(Some("b"), "globex", json!({"id": 7, "on": false})),
            tenant(Some("a"), "acme", json!({"id": 3, "on": "yes"})),
            tenant(None, "cluster-wide", json!({"id": 9})),
        ];
        let rows = keyed_objects(&objects_source("", None), objects.clone()).unwrap();
        let keys: Vec<&str> = rows.iter().map(|r| r.key.as_str()).collect();
        assert_eq!(keys, ["a/acme", "b/globex", "cluster-wide"]);
        assert!(rows.iter().all(|r| r.active));
        assert_eq!(rows[0].values["spec"]["id"], 3, "the row is the object");

        let rows = keyed_objects(&objects_source("spec.id", Some("spec.on")), objects).unwrap();
        let keyed: Vec<(&str, bool)> = rows.iter().map(|r| (r.key.as_str(), r.active)).collect();
        assert_eq!(keyed, [("3", true), ("7", false), ("9", false)]);

        let twice = vec![
            tenant(Some("a"), "x", json!({"id": 1})),
            tenant(Some("b"), "y", json!({"id": 1})),
        ];
        let error = keyed_objects(&objects_source("spec.id", None), twice).unwrap_err();
        assert!(
            error.to_string().contains("duplicate key 1 (object b/y)"),
            "{error}"
        );
        let missing = vec![tenant(Some("a"), "x", json!({}))];
        let error = keyed_objects(&objects_source("spec.id", None), missing).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("Tenant a/x: key spec.id must be a string or a number"),
            "{error}"
        );
    }

    #[test]
    fn truthiness_follows_the_documented_words() {
        for yes in [
            json!(true),
            json!(1),
            json!("TRUE"),
            json!("yes"),
            json!(" On "),
            json!("1"),
        ] {
            assert!(truthy(&yes), "{yes}");
        }
        for no in [
            json!(false),
            json!(0),
            json!(2),
            json!(null),
            json!("no"),
            json!("enabled"),
            json!(""),
        ] {
            assert!(!truthy(&no), "{no}");
        }
    }

    #[test]
    fn passwords_are_redacted() {
        let url = "postgres://kiln:s3cret@db:5432/app";
        assert_eq!(
            redact("auth failed for s3cret at db", url),
            "auth failed for *** at db"
        );
        assert_eq!(redact("plain", "sqlite://x.db"), "plain");
    }

    #[test]
    fn durations_parse_like_kubernetes() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert!(parse_duration("soon").is_err());
    }
}
