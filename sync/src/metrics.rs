//! Prometheus metrics and health endpoints of the sync loop, served by a
//! small HTTP/1.1 server: `/metrics`, `/healthz`, `/readyz`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

use crate::report::{Report, Status};

/// Upper bounds of the duration histograms, in seconds.
const BUCKETS: [f64; 12] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

#[derive(Debug, Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        for (i, bound) in BUCKETS.iter().enumerate() {
            if seconds <= *bound {
                self.counts[i] += 1;
            }
        }
        self.sum += seconds;
        self.count += 1;
    }

    fn write(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (bound, count) in BUCKETS.iter().zip(self.counts) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {count}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", self.sum, self.count);
    }
}

#[derive(Debug, Default)]
struct State {
    render: Histogram,
    apply: Histogram,
    applied: u64,
    failed: u64,
    drifted: u64,
    corrected: u64,
    pruned: u64,
    desired: u64,
    rows: BTreeMap<String, u64>,
    source_errors: BTreeMap<String, u64>,
    ready: bool,
}

/// The loop's metrics, shared with the server.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    state: Arc<Mutex<State>>,
}

impl Metrics {
    fn with(&self, f: impl FnOnce(&mut State)) {
        if let Ok(mut state) = self.state.lock() {
            f(&mut state);
        }
    }

    /// A render took `elapsed`.
    pub fn rendered(&self, elapsed: Duration) {
        self.with(|s| s.render.observe(elapsed.as_secs_f64()));
    }

    /// A source returned `rows` rows.
    pub fn source_rows(&self, source: &str, rows: usize) {
        self.with(|s| {
            s.rows.insert(source.to_string(), rows as u64);
            s.source_errors.entry(source.to_string()).or_default();
        });
    }

    /// A source failed.
    pub fn source_error(&self, source: &str) {
        self.with(|s| *s.source_errors.entry(source.to_string()).or_default() += 1);
    }

    /// An apply of `desired` objects took `elapsed` and did what `report` says.
    pub fn applied(&self, desired: usize, elapsed: Duration, report: &Report) {
        self.with(|s| {
            s.apply.observe(elapsed.as_secs_f64());
            s.desired = desired as u64;
            s.applied += (report.count(Status::Created)
                + report.count(Status::Updated)
                + report.count(Status::Corrected)) as u64;
            s.corrected += report.count(Status::Corrected) as u64;
            s.failed += report.count(Status::Failed) as u64;
            s.drifted += (report.count(Status::Drifted) + report.count(Status::Corrected)) as u64;
            s.pruned += report.count(Status::Pruned) as u64;
            if !report.failed() {
                s.ready = true;
            }
        });
    }

    /// Whether a pass has succeeded.
    pub fn ready(&self) -> bool {
        self.state.lock().map(|s| s.ready).unwrap_or(false)
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let Ok(s) = self.state.lock() else {
            return String::new();
        };
        let mut out = String::new();
        s.render.write(
            &mut out,
            "kiln_render_duration_seconds",
            "Time to render the tree.",
        );
        s.apply.write(
            &mut out,
            "kiln_apply_duration_seconds",
            "Time to apply the tree, prune included.",
        );
        for (name, help, value) in [
            (
                "kiln_objects_applied_total",
                "Objects created, updated or corrected.",
                s.applied,
            ),
            (
                "kiln_objects_failed_total",
                "Objects whose apply failed.",
                s.failed,
            ),
            (
                "kiln_objects_drifted_total",
                "Objects found drifted (corrected or, with --detect-only, reported).",
                s.drifted,
            ),
            (
                "kiln_objects_corrected_total",
                "Drifted objects put back.",
                s.corrected,
            ),
            (
                "kiln_objects_pruned_total",
                "Objects deleted because they left the tree.",
                s.pruned,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP kiln_objects_desired Objects in the tree.\n# TYPE kiln_objects_desired gauge\nkiln_objects_desired {}",
            s.desired
        );
        let _ = writeln!(
            out,
            "# HELP kiln_source_rows Rows a source returned last.\n# TYPE kiln_source_rows gauge"
        );
        for (source, rows) in &s.rows {
            let _ = writeln!(out, "kiln_source_rows{{source=\"{source}\"}} {rows}");
        }
        let _ = writeln!(
            out,
            "# HELP kiln_source_errors_total Failed reads of a source.\n# TYPE kiln_source_errors_total counter"
        );
        for (source, errors) in &s.source_errors {
            let _ = writeln!(
                out,
                "kiln_source_errors_total{{source=\"{source}\"}} {errors}"
            );
        }
        out
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until the task
/// is dropped.
pub async fn serve(listener: TcpListener, metrics: Metrics) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut read = 0;
            while read < buf.len() {
                match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf[read..]))
                    .await
                {
                    Ok(Ok(0)) | Err(_) | Ok(Err(_)) => break,
                    Ok(Ok(n)) => {
                        read += n;
                        if buf[..read].windows(4).any(|w| w == b"\r\n\r\n") {
                            break;
                        }
                    }
                }
            }
            let request = String::from_utf8_lossy(&buf[..read]);
            let path = request.split_whitespace().nth(1).unwrap_or("/");
            let (status, content_type, body) = match path {
                "/metrics" => ("200 OK", "text/plain; version=0.0.4", metrics.render()),
                "/healthz" => ("200 OK", "text/plain", "ok\n".to_string()),
                "/readyz" if metrics.ready() => ("200 OK", "text/plain", "ok\n".to_string()),
                "/readyz" => (
                    "503 Service Unavailable",
                    "text/plain",
                    "no successful sync yet\n".to_string(),
                ),
                _ => ("404 Not Found", "text/plain", "not found\n".to_string()),
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}
