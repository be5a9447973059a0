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
const BUCKETS: [f64; 14] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
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

    /// The series of one label set; `labels` is `pipeline="x",` or empty.
    fn write(&self, out: &mut String, name: &str, labels: &str) {
        for (bound, count) in BUCKETS.iter().zip(self.counts) {
            let _ = writeln!(out, "{name}_bucket{{{labels}le=\"{bound}\"}} {count}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels}le=\"+Inf\"}} {}", self.count);
        let labels = braces(labels);
        let _ = writeln!(
            out,
            "{name}_sum{labels} {}\n{name}_count{labels} {}",
            self.sum, self.count
        );
    }
}

/// `{a="b"}` from `a="b",`; nothing from nothing.
fn braces(labels: &str) -> String {
    match labels.strip_suffix(',') {
        Some(inner) => format!("{{{inner}}}"),
        None => String::new(),
    }
}

/// Whether a pipeline's series is written: the controller's own
/// (reconciles) only for pipelines the controller reconciled, so that
/// `kiln sync` serves none of them.
fn shown(state: &State, controller_only: bool) -> bool {
    !controller_only || state.reconciles > 0
}

/// A metric read off each pipeline's figures: name, help, type, value.
type Series = (&'static str, &'static str, &'static str, fn(&State) -> u64);

/// One pipeline's figures.
#[derive(Debug, Default)]
struct State {
    render: Histogram,
    apply: Histogram,
    reconcile: Histogram,
    reconciles: u64,
    reconcile_errors: u64,
    applied: u64,
    failed: u64,
    drifted: u64,
    corrected: u64,
    pruned: u64,
    desired: u64,
    rows: BTreeMap<String, u64>,
    source_errors: BTreeMap<String, u64>,
    /// The Pipeline's Ready condition: whether true, and its reason.
    condition: Option<(bool, String)>,
    /// The rollout, when the Pipeline has one.
    rollout: Option<Rollout>,
}

/// Where a rollout is, for its metrics.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Rollout {
    /// The revision being rolled out.
    pub revision: String,
    /// `Progressing`, `Paused` or `Done`.
    pub phase: &'static str,
    /// The wave it is in, from 1 (the last when done).
    pub wave: usize,
    /// Its instances by phase: `pending`, `requested`, `updating`,
    /// `healthy`, `failed`, `rolledBack`.
    pub instances: BTreeMap<&'static str, u64>,
}

/// The phases of a rollout's instances, in the order they are written.
pub const ROLLOUT_INSTANCE_PHASES: [&str; 6] = [
    "pending",
    "requested",
    "updating",
    "healthy",
    "failed",
    "rolledBack",
];

#[derive(Debug, Default)]
struct Registry {
    /// By label set: empty for `kiln sync`, `pipeline="ns/name",` in the
    /// controller.
    pipelines: BTreeMap<String, State>,
    /// Whether a pass has succeeded (`kiln sync`), or the controller runs.
    ready: bool,
    /// The controller's leader state; absent in `kiln sync`.
    leader: Option<bool>,
}

/// The figures of a loop or of one of the controller's pipelines, shared
/// with the server.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    registry: Arc<Mutex<Registry>>,
    labels: String,
}

impl Metrics {
    fn with(&self, f: impl FnOnce(&mut State)) {
        if let Ok(mut registry) = self.registry.lock() {
            f(registry.pipelines.entry(self.labels.clone()).or_default());
        }
    }

    /// The same registry, with figures of `pipeline` labelled by it.
    pub fn pipeline(&self, pipeline: &str) -> Metrics {
        let escaped = pipeline.replace('\\', "\\\\").replace('"', "\\\"");
        Metrics {
            registry: self.registry.clone(),
            labels: format!("pipeline=\"{escaped}\","),
        }
    }

    /// Drops the figures of this handle's pipeline (it was deleted).
    pub fn forget(&self) {
        if let Ok(mut registry) = self.registry.lock() {
            registry.pipelines.remove(&self.labels);
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
        });
        if !report.failed() {
            self.set_ready();
        }
    }

    /// A controller's reconcile took `elapsed`; `ok` whether it succeeded.
    pub fn reconciled(&self, elapsed: Duration, ok: bool) {
        self.with(|s| {
            s.reconcile.observe(elapsed.as_secs_f64());
            s.reconciles += 1;
            if !ok {
                s.reconcile_errors += 1;
            }
        });
    }

    /// The Pipeline's Ready condition as its status now says (controller).
    pub fn condition(&self, ready: bool, reason: &str) {
        self.with(|s| s.condition = Some((ready, reason.to_string())));
    }

    /// Where the Pipeline's rollout is now.
    pub fn rollout(&self, rollout: Rollout) {
        self.with(|s| s.rollout = Some(rollout));
    }

    /// Marks the process ready for `/readyz`.
    pub fn set_ready(&self) {
        if let Ok(mut registry) = self.registry.lock() {
            registry.ready = true;
        }
    }

    /// Records whether this replica leads.
    pub fn set_leader(&self, leading: bool) {
        if let Ok(mut registry) = self.registry.lock() {
            registry.leader = Some(leading);
        }
    }

    /// Whether `/readyz` answers ok.
    pub fn ready(&self) -> bool {
        self.registry.lock().map(|r| r.ready).unwrap_or(false)
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let Ok(registry) = self.registry.lock() else {
            return String::new();
        };
        let states = &registry.pipelines;
        let mut out = String::new();
        let histogram = |out: &mut String,
                         name: &str,
                         help: &str,
                         pick: fn(&State) -> &Histogram,
                         controller_only: bool| {
            let mut header = false;
            for (labels, state) in states {
                if !shown(state, controller_only) {
                    continue;
                }
                let h = pick(state);
                if !std::mem::replace(&mut header, true) {
                    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
                }
                h.write(out, name, labels);
            }
        };
        histogram(
            &mut out,
            "kiln_render_duration_seconds",
            "Time to render the tree.",
            |s| &s.render,
            false,
        );
        histogram(
            &mut out,
            "kiln_apply_duration_seconds",
            "Time to apply the tree, prune included.",
            |s| &s.apply,
            false,
        );
        histogram(
            &mut out,
            "kiln_reconcile_duration_seconds",
            "Time of one controller reconcile of a Pipeline.",
            |s| &s.reconcile,
            true,
        );
        let counters: [(Series, bool); 8] = [
            (
                (
                    "kiln_objects_applied_total",
                    "Objects created, updated or corrected.",
                    "counter",
                    |s| s.applied,
                ),
                false,
            ),
            (
                (
                    "kiln_objects_failed_total",
                    "Objects whose apply failed.",
                    "counter",
                    |s| s.failed,
                ),
                false,
            ),
            (
                (
                    "kiln_objects_drifted_total",
                    "Objects found drifted (corrected or, with --detect-only, reported).",
                    "counter",
                    |s| s.drifted,
                ),
                false,
            ),
            (
                (
                    "kiln_objects_corrected_total",
                    "Drifted objects put back.",
                    "counter",
                    |s| s.corrected,
                ),
                false,
            ),
            (
                (
                    "kiln_objects_pruned_total",
                    "Objects deleted because they left the tree.",
                    "counter",
                    |s| s.pruned,
                ),
                false,
            ),
            (
                (
                    "kiln_objects_desired",
                    "Objects in the tree.",
                    "gauge",
                    |s| s.desired,
                ),
                false,
            ),
            (
                (
                    "kiln_reconciles_total",
                    "Controller reconciles of a Pipeline.",
                    "counter",
                    |s| s.reconciles,
                ),
                true,
            ),
            (
                (
                    "kiln_reconcile_errors_total",
                    "Controller reconciles of a Pipeline that failed.",
                    "counter",
                    |s| s.reconcile_errors,
                ),
                true,
            ),
        ];
        for ((name, help, kind, value), controller_only) in counters {
            let mut header = false;
            for (labels, state) in states {
                if !shown(state, controller_only) {
                    continue;
                }
                if !std::mem::replace(&mut header, true) {
                    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
                }
                let _ = writeln!(out, "{name}{} {}", braces(labels), value(state));
            }
        }
        let _ = writeln!(
            out,
            "# HELP kiln_source_rows Rows a source returned last.\n# TYPE kiln_source_rows gauge"
        );
        for (labels, state) in states {
            for (source, rows) in &state.rows {
                let _ = writeln!(
                    out,
                    "kiln_source_rows{{{labels}source=\"{source}\"}} {rows}"
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP kiln_source_errors_total Failed reads of a source.\n# TYPE kiln_source_errors_total counter"
        );
        for (labels, state) in states {
            for (source, errors) in &state.source_errors {
                let _ = writeln!(
                    out,
                    "kiln_source_errors_total{{{labels}source=\"{source}\"}} {errors}"
                );
            }
        }
        let mut header = false;
        for (labels, state) in states {
            let Some((ready, reason)) = &state.condition else {
                continue;
            };
            if !std::mem::replace(&mut header, true) {
                let _ = writeln!(
                    out,
                    "# HELP kiln_pipeline_ready Whether the Pipeline's Ready condition is true (1) or not (0), with its reason.\n# TYPE kiln_pipeline_ready gauge"
                );
            }
            let _ = writeln!(
                out,
                "kiln_pipeline_ready{{{labels}reason=\"{reason}\"}} {}",
                u8::from(*ready)
            );
        }
        let rollouts: Vec<(&String, &Rollout)> = states
            .iter()
            .filter_map(|(labels, state)| Some((labels, state.rollout.as_ref()?)))
            .collect();
        if !rollouts.is_empty() {
            let _ = writeln!(
                out,
                "# HELP kiln_rollout_phase The rollout's phase (1 for the one it is in), with the revision it rolls out.\n# TYPE kiln_rollout_phase gauge"
            );
            for (labels, r) in &rollouts {
                for phase in ["Progressing", "Paused", "Done"] {
                    let _ = writeln!(
                        out,
                        "kiln_rollout_phase{{{labels}phase=\"{phase}\",revision=\"{}\"}} {}",
                        r.revision,
                        u8::from(r.phase == phase)
                    );
                }
            }
            let _ = writeln!(
                out,
                "# HELP kiln_rollout_wave The wave the rollout is in, from 1.\n# TYPE kiln_rollout_wave gauge"
            );
            for (labels, r) in &rollouts {
                let _ = writeln!(out, "kiln_rollout_wave{} {}", braces(labels), r.wave);
            }
            let _ = writeln!(
                out,
                "# HELP kiln_rollout_instances The rollout's instances by phase.\n# TYPE kiln_rollout_instances gauge"
            );
            for (labels, r) in &rollouts {
                for phase in ROLLOUT_INSTANCE_PHASES {
                    let _ = writeln!(
                        out,
                        "kiln_rollout_instances{{{labels}phase=\"{phase}\"}} {}",
                        r.instances.get(phase).copied().unwrap_or_default()
                    );
                }
            }
        }
        if let Some(leader) = registry.leader {
            let _ = writeln!(
                out,
                "# HELP kiln_leader Whether this replica holds the controller's Lease.\n# TYPE kiln_leader gauge\nkiln_leader {}",
                u8::from(leader)
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
