//! `kiln sync` running a Pipeline's rollout against the test environment's
//! API server. No controller runs there: a thread of the test plays the
//! Deployment controller, marking each Deployment it sees written
//! available, and records what the API server showed it: the order
//! instances reached the new revision and how many were updating at once.

#![allow(clippy::unwrap_used)] // a test that cannot go on fails, with the cause

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Running, eventually, kiln, kubectl, kubectl_ok, stderr, stdout};
use serde_json::Value;

/// A fleet of `count` tenants (`t000`...), each a Deployment named after
/// it in one namespace; every tenth is `internal`.
struct Fleet {
    dir: tempfile::TempDir,
    ns: String,
    count: usize,
    /// Where the running `kiln sync` serves its metrics.
    metrics: Mutex<String>,
}

impl Fleet {
    fn new(hint: &str, count: usize, rollout: &str) -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let ns = kiln_testenv::unique_name(hint);
        kubectl_ok(&["create", "namespace", &ns]);
        let fleet = Fleet {
            dir,
            ns,
            count,
            metrics: Mutex::new(String::new()),
        };
        let rows: String = (0..count)
            .map(|i| {
                let tier = if i % 10 == 3 { "internal" } else { "pro" };
                format!("- {{id: t{i:03}, tier: {tier}}}\n")
            })
            .collect();
        std::fs::create_dir_all(fleet.path("cfg")).unwrap();
        std::fs::write(fleet.path("rows.yaml"), rows).unwrap();
        fleet.pipeline(rollout);
        fleet.revision("v1");
        fleet
    }

    /// Writes the Pipeline with `rollout` (`NS` is the fleet's namespace).
    fn pipeline(&self, rollout: &str) {
        self.pipeline_with("", rollout);
    }

    /// [`Fleet::pipeline`] with more of the spec (`extra`, indented).
    fn pipeline_with(&self, extra: &str, rollout: &str) {
        let rollout = rollout.replace("NS", &self.ns);
        std::fs::write(
            self.path("cfg/pipeline.yaml"),
            format!(
                "apiVersion: kiln.dev/v1alpha1\nkind: Pipeline\nmetadata: {{name: fleet}}\n\
                 spec:\n  blueprints: [app]\n{extra}  rollout:\n{rollout}"
            ),
        )
        .unwrap();
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// Writes the blueprint with `rev` in the pod template: a change that
    /// touches every instance.
    fn revision(&self, rev: &str) {
        let config = format!(
            "apiVersion: kiln.dev/v1alpha1\nkind: Source\nmetadata: {{name: rows}}\n\
             spec: {{url: \"file:../rows.yaml\", key: id, interval: 1h}}\n---\n\
             apiVersion: kiln.dev/v1alpha1\nkind: Blueprint\nmetadata: {{name: app}}\n\
             spec:\n  source: rows\n  resources:\n  - id: web\n    template: |\n      \
             apiVersion: apps/v1\n      kind: Deployment\n      \
             metadata: {{name: \"{{{{ key }}}}\", namespace: {ns}}}\n      \
             spec:\n        replicas: 1\n        selector: {{matchLabels: {{app: \"{{{{ key }}}}\"}}}}\n        \
             template:\n          metadata:\n            labels: {{app: \"{{{{ key }}}}\"}}\n            \
             annotations: {{rev: {rev}}}\n          \
             spec: {{containers: [{{name: web, image: \"web:1\"}}]}}\n",
            ns = self.ns
        );
        std::fs::write(self.path("cfg/kiln.yaml"), config).unwrap();
    }

    fn args(&self) -> Vec<String> {
        vec![
            "-f".into(),
            self.path("cfg").display().to_string(),
            "--kubeconfig".into(),
            kiln_testenv::cluster().kubeconfig.display().to_string(),
            "--inventory".into(),
            self.ns.clone(),
        ]
    }

    fn sync(&self) -> Running {
        self.sync_with(&[])
    }

    fn sync_with(&self, extra: &[&str]) -> Running {
        let log = std::fs::File::create(self.path("sync.log")).unwrap();
        let mut command = common::kiln_command();
        command.arg("sync").args(self.args()).args(extra);
        match extra.iter().position(|a| *a == "--metrics-addr") {
            Some(i) => *self.metrics.lock().unwrap() = extra[i + 1].to_string(),
            None => {
                let addr = common::free_addr();
                command.args(["--metrics-addr", &addr]);
                *self.metrics.lock().unwrap() = addr;
            }
        }
        command
            .env("KILN_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map(Running::new)
            .unwrap()
    }

    /// Waits for `n` more passes of the running `kiln sync` (each renders
    /// once): what a check that nothing moved waits for, instead of a
    /// sleep that proves nothing when the loop was slow.
    fn passes(&self, n: u32) {
        let addr = self.metrics.lock().unwrap().clone();
        let count = || common::metric(&addr, "kiln_render_duration_seconds_count").unwrap_or(0.0);
        let start = count();
        eventually(
            &format!("{n} more passes of kiln sync"),
            Duration::from_secs(60),
            || count() >= start + f64::from(n),
        );
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.path("sync.log")).unwrap_or_default()
    }

    /// `kiln rollout VERB ... --format json`.
    fn rollout(&self, verb: &str, extra: &[&str]) -> std::process::Output {
        let mut args = vec!["rollout".to_string(), verb.to_string()];
        args.extend(self.args());
        args.extend(["--format".to_string(), "json".to_string()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        kiln(&args.iter().map(String::as_str).collect::<Vec<_>>())
    }

    fn status(&self) -> Value {
        let out = self.rollout("status", &[]);
        assert!(out.status.success(), "rollout status: {}", stderr(&out));
        serde_json::from_str(&stdout(&out)).unwrap()
    }

    /// Waits for a rollout of a revision other than `old` to be done.
    fn wait_done_after(&self, old: &str, limit: Duration) -> Value {
        let start = std::time::Instant::now();
        loop {
            let status = self.wait_phase("Done", limit);
            if status["revision"] != old {
                return status;
            }
            assert!(
                start.elapsed() < limit,
                "no new revision was rolled out within {limit:?}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    fn wait_phase(&self, phase: &str, limit: Duration) -> Value {
        let mut last = Value::Null;
        let start = std::time::Instant::now();
        while start.elapsed() < limit {
            let out = self.rollout("status", &[]);
            if out.status.success() {
                last = serde_json::from_str(&stdout(&out)).unwrap();
                if last["phase"] == phase {
                    return last;
                }
            } else {
                last = stderr(&out).into();
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        panic!(
            "the rollout was not {phase} within {limit:?}: {last:#}\n{}",
            self.log()
        );
    }
}

/// A Deployment as the API server shows it.
#[derive(Debug, Clone)]
struct Seen {
    rev: String,
    generation: i64,
    observed: i64,
}

fn deployments(ns: &str) -> BTreeMap<String, Seen> {
    let out = kubectl_ok(&["get", "deployments", "-n", ns, "-o", "json"]);
    let list: Value = serde_json::from_str(&out).unwrap();
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["metadata"]["name"].as_str().unwrap().to_string(),
                Seen {
                    rev: d["spec"]["template"]["metadata"]["annotations"]["rev"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    generation: d["metadata"]["generation"].as_i64().unwrap(),
                    observed: d["status"]["observedGeneration"].as_i64().unwrap_or(0),
                },
            )
        })
        .collect()
}

/// What the stand-in Deployment controller saw.
#[derive(Debug, Default)]
struct Observations {
    /// Per revision, each instance with the poll it was first seen on it.
    first_seen: BTreeMap<String, BTreeMap<String, usize>>,
    /// Per revision, the most instances seen on it at once and not yet
    /// available.
    most_updating: BTreeMap<String, usize>,
    /// Per revision, the most not-yet-available instances of one wave seen
    /// at once, by the wave's members given.
    most_updating_in: BTreeMap<(String, String), usize>,
}

/// Plays the Deployment controller: every Deployment whose generation it
/// has not observed is marked available (unless `never` names it), after
/// recording what it saw.
struct Controller {
    stop: Arc<AtomicBool>,
    never: Arc<Mutex<BTreeSet<String>>>,
    seen: Arc<Mutex<Observations>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Controller {
    fn start(ns: &str, waves: BTreeMap<String, BTreeSet<String>>) -> Controller {
        let stop = Arc::new(AtomicBool::new(false));
        let never: Arc<Mutex<BTreeSet<String>>> = Arc::default();
        let seen: Arc<Mutex<Observations>> = Arc::default();
        let (ns, s, n, o) = (ns.to_string(), stop.clone(), never.clone(), seen.clone());
        let thread = std::thread::spawn(move || {
            let mut poll = 0;
            while !s.load(Ordering::SeqCst) {
                poll += 1;
                let now = deployments(&ns);
                let pending: Vec<(String, Seen)> = now
                    .iter()
                    .filter(|(_, d)| d.observed < d.generation)
                    .map(|(k, d)| (k.clone(), d.clone()))
                    .collect();
                {
                    let mut o = o.lock().unwrap();
                    for (name, d) in &now {
                        o.first_seen
                            .entry(d.rev.clone())
                            .or_default()
                            .entry(name.clone())
                            .or_insert(poll);
                    }
                    let mut per_rev: BTreeMap<String, usize> = BTreeMap::new();
                    let mut per_wave: BTreeMap<(String, String), usize> = BTreeMap::new();
                    for (name, d) in &pending {
                        *per_rev.entry(d.rev.clone()).or_default() += 1;
                        for (wave, members) in &waves {
                            if members.contains(name) {
                                *per_wave.entry((d.rev.clone(), wave.clone())).or_default() += 1;
                            }
                        }
                    }
                    for (rev, count) in per_rev {
                        let most = o.most_updating.entry(rev).or_default();
                        *most = (*most).max(count);
                    }
                    for (key, count) in per_wave {
                        let most = o.most_updating_in.entry(key).or_default();
                        *most = (*most).max(count);
                    }
                }
                let never = n.lock().unwrap().clone();
                let todo: Vec<(String, i64)> = pending
                    .into_iter()
                    .filter(|(name, _)| !never.contains(name))
                    .map(|(name, d)| (name, d.generation))
                    .collect();
                // Eight at a time, as a controller's workers would.
                for chunk in todo.chunks(8) {
                    std::thread::scope(|scope| {
                        for (name, generation) in chunk {
                            let ns = &ns;
                            scope.spawn(move || available(ns, name, *generation));
                        }
                    });
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Controller {
            stop,
            never,
            seen,
            thread: Some(thread),
        }
    }

    fn never(&self, names: &[&str]) {
        let mut never = self.never.lock().unwrap();
        never.clear();
        never.extend(names.iter().map(|s| s.to_string()));
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Marks a Deployment available at `generation`, as its controller would.
fn available(ns: &str, name: &str, generation: i64) {
    let status = format!(
        r#"{{"status":{{"observedGeneration":{generation},"replicas":1,"updatedReplicas":1,"readyReplicas":1,"availableReplicas":1}}}}"#
    );
    // A Deployment deleted meanwhile is no error.
    let _ = kubectl(&[
        "patch",
        "deployment",
        name,
        "-n",
        ns,
        "--subresource=status",
        "--type=merge",
        "-p",
        &status,
    ]);
}

fn names(status: &Value, wave: &str) -> usize {
    status["waves"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == wave)
        .map(|w| w["instances"].as_u64().unwrap() as usize)
        .unwrap()
}

#[test]
fn a_template_change_rolls_out_wave_by_wave_within_its_bounds_and_gates() {
    let fleet = Fleet::new(
        "roll",
        200,
        concat!(
            "    waves:\n",
            "    - {name: canary, instances: [t000]}\n",
            "    - {name: early, select: \"row.tier == 'internal'\", maxConcurrent: 5}\n",
            "    - {name: ten-percent, percent: 10, gates: [{approval: {}}]}\n",
            "    - {name: rest, maxConcurrent: 50, quorum: 95%}\n",
            "    progressDeadline: 2m\n",
        ),
    );
    // Which wave each instance is in, as the plan says.
    let plan = kiln(&[
        "rollout",
        "plan",
        "-f",
        fleet.path("cfg").to_str().unwrap(),
        "--format",
        "json",
    ]);
    assert!(plan.status.success(), "{}", stderr(&plan));
    let plan: Value = serde_json::from_str(&stdout(&plan)).unwrap();
    let waves: BTreeMap<String, BTreeSet<String>> = plan["waves"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            (
                w["name"].as_str().unwrap().to_string(),
                w["instances"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|k| k.as_str().unwrap().trim_start_matches("app/").to_string())
                    .collect(),
            )
        })
        .collect();
    assert_eq!(waves["canary"].len(), 1);
    assert_eq!(waves["early"].len(), 20);
    assert_eq!(waves["ten-percent"].len(), 20);
    assert_eq!(waves["rest"].len(), 159);

    let controller = Controller::start(&fleet.ns, waves.clone());
    let _sync = fleet.sync();
    // The first revision has nothing to roll from: every instance at once.
    let settled = fleet.wait_phase("Done", Duration::from_secs(120));
    assert_eq!(settled["instances"], 0, "{settled:#}");
    eventually("200 deployments", Duration::from_secs(60), || {
        deployments(&fleet.ns).len() == fleet.count
    });
    let v1 = settled["revision"].as_str().unwrap().to_string();

    fleet.revision("v2");
    let waiting = {
        let start = std::time::Instant::now();
        loop {
            let status = fleet.status();
            if status["revision"] != v1.as_str()
                && status["waiting"]["wave"] == "ten-percent"
                && status["waiting"]["reason"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("approval")
            {
                break status;
            }
            assert!(
                start.elapsed() < Duration::from_secs(180),
                "the rollout never waited for approval: {status:#}\n{}",
                fleet.log()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    };
    let v2 = waiting["revision"].as_str().unwrap().to_string();
    assert_eq!(waiting["previousRevision"], v1.as_str());
    assert_eq!(waiting["instances"], 200);
    assert_eq!(names(&waiting, "early"), 20);
    // From the API server: the first two waves are on v2, nothing else is.
    let now = deployments(&fleet.ns);
    for (name, d) in &now {
        let reached = waves["canary"].contains(name) || waves["early"].contains(name);
        assert_eq!(
            d.rev == "v2",
            reached,
            "{name} is on {} while ten-percent waits for approval",
            d.rev
        );
    }
    // An approval names the revision it approves: another is refused.
    let refused = fleet.rollout(
        "approve",
        &["--wave", "ten-percent", "--revision", v1.as_str()],
    );
    assert_eq!(refused.status.code(), Some(2), "{}", stderr(&refused));
    assert!(stderr(&refused).contains("approval is for the revision"));
    fleet.passes(2);
    assert!(
        deployments(&fleet.ns)
            .iter()
            .filter(|(n, _)| waves["ten-percent"].contains(*n))
            .all(|(_, d)| d.rev == "v1"),
        "an approval of another revision let the wave through"
    );
    let approved = fleet.rollout("approve", &["--revision", &v2]);
    assert!(approved.status.success(), "{}", stderr(&approved));
    let done = fleet.wait_phase("Done", Duration::from_secs(300));
    assert_eq!(done["revision"], v2.as_str());
    // Done, with the same rows: a pass (started by an edit of one of
    // Kiln's objects) applies without rendering or stepping again. The
    // pass that found the rollout done has counted its render once the
    // metrics say Done; of two edits' passes, at least one starts after it.
    let addr = fleet.metrics.lock().unwrap().clone();
    let count = |name: &str| common::metric(&addr, name).unwrap_or(0.0);
    let done_metric = format!("kiln_rollout_phase{{phase=\"Done\",revision=\"{v2}\"}}");
    eventually(
        "the metrics of the finished rollout",
        Duration::from_secs(30),
        || common::metric(&addr, &done_metric) == Some(1.0),
    );
    let renders = count("kiln_render_duration_seconds_count");
    for edit in ["touched=1", "touched=2"] {
        let applies = count("kiln_apply_duration_seconds_count");
        kubectl_ok(&[
            "label",
            "--overwrite",
            "deployment",
            "t000",
            "-n",
            &fleet.ns,
            edit,
        ]);
        eventually("a pass after the edit", Duration::from_secs(30), || {
            count("kiln_apply_duration_seconds_count") > applies
        });
    }
    assert_eq!(
        count("kiln_render_duration_seconds_count"),
        renders,
        "a finished rollout rendered again with nothing changed"
    );

    // Every instance went to v2 exactly once: one spec change each.
    let now = deployments(&fleet.ns);
    assert_eq!(now.len(), 200);
    for (name, d) in &now {
        assert_eq!(d.rev, "v2", "{name}");
        assert_eq!(d.generation, 2, "{name} was written more than once");
    }
    let seen = std::mem::take(&mut *controller.seen.lock().unwrap());
    drop(controller);
    // Wave order, as the API server showed it: no instance of a wave
    // reached v2 before every instance of the wave before it had.
    let first = &seen.first_seen["v2"];
    let order = ["canary", "early", "ten-percent", "rest"];
    for pair in order.windows(2) {
        let last_of = waves[pair[0]].iter().map(|n| first[n]).max().unwrap();
        let first_of = waves[pair[1]].iter().map(|n| first[n]).min().unwrap();
        assert!(
            last_of < first_of,
            "wave {} started (poll {first_of}) before wave {} was done (poll {last_of})",
            pair[1],
            pair[0]
        );
    }
    // maxConcurrent, as the API server showed it.
    let most = |wave: &str| {
        seen.most_updating_in
            .get(&("v2".to_string(), wave.to_string()))
            .copied()
            .unwrap_or_default()
    };
    eprintln!(
        "most updating at once: early {}, rest {}; polls {}",
        most("early"),
        most("rest"),
        first.values().max().unwrap()
    );
    assert!(most("early") <= 5, "early had {} updating", most("early"));
    assert!(most("early") >= 2, "early never ran two at once");
    assert!(most("rest") <= 50, "rest had {} updating", most("rest"));
    assert!(most("rest") > 5, "rest never ran more than five at once");
}

/// Each Deployment's revision and generation: `(rev, generation)`.
fn revisions(ns: &str) -> BTreeMap<String, (String, i64)> {
    deployments(ns)
        .into_iter()
        .map(|(name, d)| (name, (d.rev, d.generation)))
        .collect()
}

fn wave<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["waves"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == name)
        .unwrap()
}

#[test]
fn a_failed_instance_rolls_back_the_updating_ones_and_pauses_until_resumed_or_aborted() {
    let fleet = Fleet::new(
        "rollback",
        12,
        concat!(
            "    waves:\n",
            "    - {name: canary, instances: [t000]}\n",
            "    - {name: rest, maxConcurrent: 1, gates: [{approval: {}}]}\n",
            "    progressDeadline: 4s\n",
            "    onFailure: Rollback\n",
        ),
    );
    let controller = Controller::start(&fleet.ns, BTreeMap::new());
    let addr = common::free_addr();
    let _sync = fleet.sync_with(&["--metrics-addr", &addr]);
    fleet.wait_phase("Done", Duration::from_secs(120));
    eventually("12 deployments", Duration::from_secs(60), || {
        revisions(&fleet.ns).len() == 12
    });

    // t005 never becomes available on the new revision.
    controller.never(&["t005"]);
    fleet.revision("v2");
    eventually(
        "the rest to wait for approval",
        Duration::from_secs(120),
        || {
            let status = fleet.status();
            status["waiting"]["wave"] == "rest" && wave(&status, "canary")["counts"]["healthy"] == 1
        },
    );
    let approved = fleet.rollout("approve", &[]);
    assert!(approved.status.success(), "{}", stderr(&approved));
    let paused = fleet.wait_phase("Paused", Duration::from_secs(120));
    assert_eq!(
        paused["paused"],
        "instance app/t005 failed: not healthy within progressDeadline (4s)"
    );
    assert_eq!(paused["rolledBack"], serde_json::json!(["app/t005"]));
    // From the API server: the instances before it are on v2, written
    // once; t005 went to v2 and back (generation 3); the rest were never
    // touched.
    let check_paused = || {
        let now = revisions(&fleet.ns);
        for (name, (rev, generation)) in &now {
            let expected = match name.as_str() {
                "t000" | "t001" | "t002" | "t003" | "t004" => ("v2", 2),
                "t005" => ("v1", 3),
                _ => ("v1", 1),
            };
            assert_eq!(
                (rev.as_str(), *generation),
                expected,
                "{name}\n{}",
                fleet.log()
            );
        }
    };
    eventually("t005 back on v1", Duration::from_secs(30), || {
        revisions(&fleet.ns)["t005"] == ("v1".to_string(), 3)
    });
    check_paused();
    assert!(
        fleet.log().contains("rolled back 1 instances"),
        "{}",
        fleet.log()
    );
    // The metrics say the same.
    let revision = paused["revision"].as_str().unwrap();
    eventually("the metrics of the pause", Duration::from_secs(10), || {
        common::metric(
            &addr,
            &format!("kiln_rollout_phase{{phase=\"Paused\",revision=\"{revision}\"}}"),
        ) == Some(1.0)
    });
    for (phase, count) in [
        ("healthy", 5.0),
        ("rolledBack", 1.0),
        ("pending", 6.0),
        ("updating", 0.0),
    ] {
        assert_eq!(
            common::metric(
                &addr,
                &format!("kiln_rollout_instances{{phase=\"{phase}\"}}")
            ),
            Some(count),
            "{phase}"
        );
    }
    assert_eq!(common::metric(&addr, "kiln_rollout_wave"), Some(2.0));
    // Paused, it stays where it is.
    fleet.passes(2);
    check_paused();
    assert_eq!(fleet.status()["phase"], "Paused");

    // Fixed, and resumed: t005 goes again, then the rest.
    controller.never(&[]);
    let resumed = fleet.rollout("resume", &[]);
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    fleet.wait_phase("Done", Duration::from_secs(120));
    for (name, (rev, generation)) in revisions(&fleet.ns) {
        assert_eq!(rev, "v2", "{name}");
        let expected = if name == "t005" { 4 } else { 2 };
        assert_eq!(generation, expected, "{name}");
    }

    // Aborted mid-way: the canary goes back to v2; the rest never moved.
    fleet.revision("v3");
    eventually("the canary on v3", Duration::from_secs(120), || {
        let status = fleet.status();
        status["waiting"]["wave"] == "rest" && wave(&status, "canary")["counts"]["healthy"] == 1
    });
    let aborted = fleet.rollout("abort", &[]);
    assert!(aborted.status.success(), "{}", stderr(&aborted));
    assert!(
        stderr(&aborted).contains("1 instances go back"),
        "{}",
        stderr(&aborted)
    );
    eventually("the canary back on v2", Duration::from_secs(30), || {
        revisions(&fleet.ns)["t000"] == ("v2".to_string(), 4)
    });
    let status = fleet.status();
    assert_eq!(status["phase"], "Paused");
    assert!(status["paused"].as_str().unwrap().contains("aborted"));
    for (name, (rev, _)) in revisions(&fleet.ns) {
        assert_eq!(rev, "v2", "{name}");
    }
    // An aborted rollout resumes from the first wave.
    let resumed = fleet.rollout("resume", &[]);
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    eventually("the canary on v3 again", Duration::from_secs(60), || {
        revisions(&fleet.ns)["t000"].0 == "v3"
    });
}

/// A Deployment's annotation, as the API server has it.
fn annotation(ns: &str, name: &str, key: &str) -> Option<String> {
    let out = kubectl_ok(&["get", "deployment", name, "-n", ns, "-o", "json"]);
    let object: Value = serde_json::from_str(&out).unwrap();
    object["metadata"]["annotations"][key]
        .as_str()
        .map(str::to_string)
}

#[test]
fn gates_hold_their_waves_until_the_application_answers_the_condition_holds_and_the_window_opens() {
    // A window that is closed all day today: the day after tomorrow only.
    let days = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
    let today = {
        let out = std::process::Command::new("date")
            .args(["-u", "+%u"])
            .output()
            .unwrap();
        stdout(&out).trim().parse::<usize>().unwrap() - 1
    };
    let closed_day = days[(today + 2) % 7];
    let strategy = |window: bool| {
        format!(
            "    waves:\n\
             \x20   - {{name: canary, instances: [t000], gates: [{{release: {{resource: web}}}}]}}\n\
             \x20   - name: analysed\n\
             \x20     instances: [t001, t002]\n\
             \x20     gates: [{{condition: {{apiVersion: v1, kind: ConfigMap, namespace: NS, name: analysis, expression: \"object.data.phase == 'Succeeded'\"}}}}]\n\
             \x20   - {{name: rest{}}}\n",
            if window {
                format!(
                    ", gates: [{{window: {{days: {closed_day}, from: \"00:00\", to: \"23:59\", timeZone: UTC}}}}]"
                )
            } else {
                String::new()
            }
        )
    };
    let fleet = Fleet::new("gates", 6, &strategy(true));
    let _controller = Controller::start(&fleet.ns, BTreeMap::new());
    let _sync = fleet.sync();
    fleet.wait_phase("Done", Duration::from_secs(120));
    eventually("6 deployments", Duration::from_secs(60), || {
        revisions(&fleet.ns).len() == 6
    });

    // The release handshake: Kiln asks t000's application, and waits.
    fleet.revision("v2");
    let mut revision = String::new();
    eventually(
        "t000 asked to release",
        Duration::from_secs(60),
        || match annotation(&fleet.ns, "t000", "kiln.dev/update-requested") {
            Some(r) => {
                revision = r;
                true
            }
            None => false,
        },
    );
    assert_eq!(fleet.status()["revision"], revision.as_str());
    fleet.passes(2);
    assert_eq!(
        revisions(&fleet.ns)["t000"].0,
        "v1",
        "t000 was written before its application answered"
    );
    // An answer for another revision is no answer.
    kubectl_ok(&[
        "annotate",
        "deployment",
        "t000",
        "-n",
        &fleet.ns,
        "kiln.dev/update-acknowledged=someother",
    ]);
    fleet.passes(2);
    assert_eq!(revisions(&fleet.ns)["t000"].0, "v1");
    kubectl_ok(&[
        "annotate",
        "--overwrite",
        "deployment",
        "t000",
        "-n",
        &fleet.ns,
        &format!("kiln.dev/update-acknowledged={revision}"),
    ]);
    eventually("t000 on v2", Duration::from_secs(60), || {
        revisions(&fleet.ns)["t000"].0 == "v2"
    });
    // Written, the request is gone: Kiln owned it.
    eventually("the request withdrawn", Duration::from_secs(30), || {
        annotation(&fleet.ns, "t000", "kiln.dev/update-requested").is_none()
    });

    // The condition: closed while the object is missing or says otherwise.
    eventually(
        "analysed waits for its condition",
        Duration::from_secs(60),
        || {
            let status = fleet.status();
            status["waiting"]["wave"] == "analysed"
                && status["waiting"]["reason"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("does not exist")
        },
    );
    kubectl_ok(&[
        "create",
        "configmap",
        "analysis",
        "-n",
        &fleet.ns,
        "--from-literal=phase=Running",
    ]);
    eventually("the condition read false", Duration::from_secs(60), || {
        fleet.status()["waiting"]["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("is false")
    });
    assert_eq!(revisions(&fleet.ns)["t001"].0, "v1");
    assert!(
        fleet
            .log()
            .contains("rollout: wave analysed waits: condition"),
        "the gate holding its wave is said: {}",
        fleet.log()
    );
    kubectl_ok(&[
        "patch",
        "configmap",
        "analysis",
        "-n",
        &fleet.ns,
        "--type=merge",
        "-p",
        r#"{"data":{"phase":"Succeeded"}}"#,
    ]);

    // The window: closed all day today, the rest waits.
    eventually("rest waits for its window", Duration::from_secs(60), || {
        let status = fleet.status();
        status["waiting"]["wave"] == "rest"
            && status["waiting"]["reason"]
                .as_str()
                .unwrap_or_default()
                .contains("outside the window")
    });
    let now = revisions(&fleet.ns);
    for (name, (rev, _)) in &now {
        let reached = matches!(name.as_str(), "t000" | "t001" | "t002");
        assert_eq!(rev == "v2", reached, "{name} on {rev}");
    }
    // Without the window (a Pipeline change is no new revision), it goes on.
    fleet.pipeline(&strategy(false));
    let done = fleet.wait_phase("Done", Duration::from_secs(120));
    assert_eq!(done["revision"], revision.as_str());
    for (name, (rev, generation)) in revisions(&fleet.ns) {
        assert_eq!(rev, "v2", "{name}");
        // A Deployment's annotations count as its generation: t000's
        // request and answers did.
        if name != "t000" {
            assert_eq!(generation, 2, "{name} was written more than once");
        }
    }
}

#[test]
fn a_kill_in_the_middle_of_a_wave_resumes_where_it_stopped() {
    let fleet = Fleet::new(
        "resume",
        40,
        concat!(
            "    waves:\n",
            "    - {name: canary, instances: [t000]}\n",
            "    - {name: rest, maxConcurrent: 3}\n",
        ),
    );
    let waves = BTreeMap::from([(
        "rest".to_string(),
        (1..40).map(|i| format!("t{i:03}")).collect::<BTreeSet<_>>(),
    )]);
    let controller = Controller::start(&fleet.ns, waves);
    let mut sync = fleet.sync();
    fleet.wait_phase("Done", Duration::from_secs(120));
    eventually("40 deployments", Duration::from_secs(60), || {
        revisions(&fleet.ns).len() == 40
    });
    fleet.revision("v2");
    eventually("the rest wave under way", Duration::from_secs(120), || {
        let on_v2 = revisions(&fleet.ns)
            .values()
            .filter(|(rev, _)| rev == "v2")
            .count();
        (4..30).contains(&on_v2)
    });
    sync.kill();
    let before = revisions(&fleet.ns);
    let reached = before.values().filter(|(rev, _)| rev == "v2").count();
    assert!(reached < 40, "the kill came too late: {reached} on v2");
    let _sync = fleet.sync();
    fleet.wait_phase("Done", Duration::from_secs(180));
    // No instance skipped, none written twice, the bound kept across the
    // restart.
    for (name, (rev, generation)) in revisions(&fleet.ns) {
        assert_eq!((rev.as_str(), generation), ("v2", 2), "{name}");
    }
    let seen = std::mem::take(&mut *controller.seen.lock().unwrap());
    drop(controller);
    let most = seen.most_updating_in[&("v2".to_string(), "rest".to_string())];
    assert!(most <= 3, "rest had {most} updating at once");
}

/// `git` in `dir`, which must succeed; its stdout.
fn git(dir: &std::path::Path, args: &[&str]) -> String {
    common::git(dir, args)
}

#[test]
fn through_git_each_step_is_a_commit_and_instances_not_reached_keep_their_files() {
    let fleet = Fleet::new(
        "staged",
        30,
        concat!(
            "    waves:\n",
            "    - {name: canary, instances: [t000]}\n",
            "    - {name: early, select: \"row.tier == 'internal'\"}\n",
            "    - {name: rest, maxConcurrent: 10}\n",
        ),
    );
    let repo = fleet.path("repo");
    std::fs::create_dir_all(&repo).unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    let _controller = Controller::start(&fleet.ns, BTreeMap::new());
    let _sync = fleet.sync_with(&["--git", repo.to_str().unwrap()]);
    let v1 = fleet.wait_phase("Done", Duration::from_secs(120))["revision"]
        .as_str()
        .unwrap()
        .to_string();
    eventually("30 deployments", Duration::from_secs(60), || {
        revisions(&fleet.ns).len() == 30
    });
    let before = git(&repo, &["rev-parse", "main"]);
    let blob = |commit: &str, key: &str| {
        git(
            &repo,
            &["rev-parse", &format!("{commit}:app/{key}/web.yaml")],
        )
    };
    let v1_blobs: BTreeMap<String, String> = (0..30)
        .map(|i| {
            let key = format!("t{i:03}");
            let id = blob(&before, &key);
            (key, id)
        })
        .collect();

    fleet.revision("v2");
    let done = fleet.wait_done_after(&v1, Duration::from_secs(300));
    let revision = done["revision"].as_str().unwrap().to_string();
    // The history since: one commit per step, oldest first.
    let log = git(
        &repo,
        &["rev-list", "--reverse", &format!("{before}..main")],
    );
    let commits: Vec<&str> = log.lines().collect();
    assert!(commits.len() >= 5, "{} commits: {log}", commits.len());
    let early: BTreeSet<String> = (0..30)
        .filter(|i| i % 10 == 3)
        .map(|i| format!("t{i:03}"))
        .collect();
    let mut reached: BTreeSet<String> = BTreeSet::new();
    for commit in &commits {
        let message = git(&repo, &["log", "-1", "--format=%B", commit]);
        assert!(
            message.contains(&format!("Kiln-Rollout: {revision}")),
            "{commit}: {message}"
        );
        let now: BTreeSet<String> = v1_blobs
            .keys()
            .filter(|key| {
                git(&repo, &["show", &format!("{commit}:app/{key}/web.yaml")]).contains("rev: v2")
            })
            .cloned()
            .collect();
        // Instances not reached keep their files byte for byte.
        for key in v1_blobs.keys().filter(|k| !now.contains(*k)) {
            assert_eq!(blob(commit, key), v1_blobs[key], "{commit}: {key}");
        }
        assert!(now.is_superset(&reached), "{commit} put an instance back");
        let added: BTreeSet<String> = now.difference(&reached).cloned().collect();
        // Waves in order: the canary alone first; the rest only once every
        // early instance is there; at most ten of the rest per step.
        if reached.is_empty() {
            assert_eq!(added, BTreeSet::from(["t000".to_string()]), "{commit}");
        }
        let rest: Vec<&String> = added
            .iter()
            .filter(|k| *k != "t000" && !early.contains(*k))
            .collect();
        if !rest.is_empty() {
            assert!(
                reached.is_superset(&early),
                "{commit}: the rest before early was done"
            );
            assert!(
                rest.len() <= 10,
                "{commit} wrote {} of the rest at once",
                rest.len()
            );
        }
        let wave = message
            .lines()
            .find_map(|l| l.strip_prefix("Kiln-Rollout-Wave: "))
            .unwrap_or_default();
        assert!(
            ["canary", "early", "rest"].contains(&wave),
            "{commit}: {message}"
        );
        reached = now;
    }
    assert_eq!(
        reached.len(),
        30,
        "the last commit has every instance on v2"
    );
    // A clone, with no cluster, says where the rollout went.
    let clone = fleet.path("clone");
    let cloned = std::process::Command::new("git")
        .args(["clone", "-q"])
        .arg(&repo)
        .arg(&clone)
        .status()
        .unwrap();
    assert!(cloned.success());
    let out = kiln(&[
        "rollout",
        "status",
        "-f",
        fleet.path("cfg").to_str().unwrap(),
        "--git",
        clone.to_str().unwrap(),
        "--format",
        "json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let from_git: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(from_git["revision"], revision.as_str());
    assert_eq!(from_git["previousRevision"], v1.as_str());
    assert_eq!(from_git["commit"], commits.last().unwrap().trim());
    assert_eq!(from_git["wave"], 3);
    let pending: u64 = from_git["waves"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["counts"]["pending"].as_u64().unwrap())
        .sum();
    assert_eq!(pending, 0, "{from_git:#}");
    for (name, (rev, generation)) in revisions(&fleet.ns) {
        assert_eq!((rev.as_str(), generation), ("v2", 2), "{name}");
    }
}

/// Plays ArgoCD: applies the branch's tree each time it moves, with
/// `kubectl apply --server-side -k`, as its own field manager.
struct Applier {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Applier {
    fn start(repo: PathBuf, work: PathBuf) -> Applier {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut applied = String::new();
            while !s.load(Ordering::SeqCst) {
                let tip = std::process::Command::new("git")
                    .arg("-C")
                    .arg(&repo)
                    .args(["rev-parse", "--verify", "-q", "main"])
                    .output()
                    .unwrap();
                let tip = stdout(&tip).trim().to_string();
                if !tip.is_empty() && tip != applied {
                    let _ = std::fs::remove_dir_all(&work);
                    std::fs::create_dir_all(&work).unwrap();
                    let archive = std::process::Command::new("sh")
                        .arg("-c")
                        .arg(format!(
                            "git -C '{}' archive {tip} | tar -x -C '{}'",
                            repo.display(),
                            work.display()
                        ))
                        .status()
                        .unwrap();
                    assert!(archive.success());
                    let out = kubectl(&[
                        "apply",
                        "--server-side",
                        "--field-manager=argocd-controller",
                        "-k",
                        work.to_str().unwrap(),
                    ]);
                    if out.status.success() {
                        applied = tip;
                    }
                }
                std::thread::sleep(Duration::from_millis(300));
            }
        });
        Applier {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Applier {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn with_apply_false_another_tool_applies_each_commit_and_kiln_follows_its_health() {
    let rollout = concat!(
        "    waves:\n",
        "    - {name: canary, instances: [t000]}\n",
        "    - {name: rest, maxConcurrent: 4}\n",
    );
    let fleet = Fleet::new("argo", 12, rollout);
    fleet.pipeline_with("  apply: false\n", rollout);
    let repo = fleet.path("repo");
    std::fs::create_dir_all(&repo).unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    let _controller = Controller::start(&fleet.ns, BTreeMap::new());
    let _argocd = Applier::start(repo.clone(), fleet.path("argocd"));
    let _sync = fleet.sync_with(&["--git", repo.to_str().unwrap()]);
    let v1 = fleet.wait_phase("Done", Duration::from_secs(120))["revision"]
        .as_str()
        .unwrap()
        .to_string();
    eventually("12 deployments", Duration::from_secs(60), || {
        revisions(&fleet.ns).len() == 12
    });
    let before = git(&repo, &["rev-parse", "main"]);
    fleet.revision("v2");
    fleet.wait_done_after(&v1, Duration::from_secs(300));
    for (name, (rev, generation)) in revisions(&fleet.ns) {
        assert_eq!((rev.as_str(), generation), ("v2", 2), "{name}");
        // Kiln wrote none of them: no digest of its own on any.
        assert!(
            annotation(&fleet.ns, &name, "kiln.dev/applied-digest").is_none(),
            "{name} was applied by Kiln"
        );
    }
    let log = git(&repo, &["rev-list", &format!("{before}..main")]);
    assert!(
        log.lines().count() >= 4,
        "canary and three steps of four: {log}"
    );
}

#[test]
fn a_wave_short_of_full_health_opens_the_next_once_its_quorum_is_healthy() {
    let fleet = Fleet::new(
        "quorum",
        8,
        concat!(
            "    waves:\n",
            "    - {name: canary, instances: [t000, t001, t002], quorum: 2}\n",
            "    - {name: rest}\n",
            "    progressDeadline: 5m\n",
        ),
    );
    let controller = Controller::start(&fleet.ns, BTreeMap::new());
    let _sync = fleet.sync();
    let v1 = fleet.wait_phase("Done", Duration::from_secs(120))["revision"]
        .as_str()
        .unwrap()
        .to_string();
    eventually("8 deployments", Duration::from_secs(60), || {
        revisions(&fleet.ns).len() == 8
    });
    // t002 stays unavailable on the new revision; two of three suffice.
    controller.never(&["t002"]);
    fleet.revision("v2");
    eventually("the rest on v2", Duration::from_secs(120), || {
        revisions(&fleet.ns).iter().all(|(_, (rev, _))| rev == "v2")
    });
    let status = fleet.status();
    assert_eq!(status["phase"], "Progressing", "{status:#}");
    assert_eq!(
        wave(&status, "canary")["counts"]["updating"],
        1,
        "{status:#}"
    );
    // Without the quorum, the rest would wait for t002: one with the
    // whole wave as quorum holds it.
    controller.never(&[]);
    let done = fleet.wait_done_after(&v1, Duration::from_secs(120));
    assert_eq!(done["revision"], status["revision"]);
    let stuck = Fleet::new(
        "quorumall",
        4,
        concat!(
            "    waves:\n",
            "    - {name: canary, instances: [t000, t001]}\n",
            "    - {name: rest}\n",
            "    progressDeadline: 5m\n",
        ),
    );
    let controller = Controller::start(&stuck.ns, BTreeMap::new());
    let _sync = stuck.sync();
    stuck.wait_phase("Done", Duration::from_secs(120));
    eventually("4 deployments", Duration::from_secs(60), || {
        revisions(&stuck.ns).len() == 4
    });
    controller.never(&["t001"]);
    stuck.revision("v2");
    eventually(
        "the canary wave waits for its quorum",
        Duration::from_secs(60),
        || {
            let status = stuck.status();
            status["waiting"]["wave"] == "canary"
                && status["waiting"]["reason"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("1 of 2 instances healthy")
        },
    );
    stuck.passes(2);
    for key in ["t002", "t003"] {
        assert_eq!(
            revisions(&stuck.ns)[key].0,
            "v1",
            "{key} went before the quorum"
        );
    }
}

#[test]
fn a_revision_arriving_mid_rollout_moves_no_instance_back() {
    let fleet = Fleet::new(
        "midway",
        6,
        concat!(
            "    waves:\n",
            "    - {name: canary, instances: [t000, t001], gates: [{approval: {}}]}\n",
            "    - {name: rest, gates: [{approval: {}}]}\n",
        ),
    );
    let _controller = Controller::start(&fleet.ns, BTreeMap::new());
    let _sync = fleet.sync();
    let v1 = fleet.wait_phase("Done", Duration::from_secs(120))["revision"]
        .as_str()
        .unwrap()
        .to_string();
    eventually("6 deployments", Duration::from_secs(60), || {
        revisions(&fleet.ns).len() == 6
    });
    let waits = |wave_name: &str, old: &str| {
        eventually(
            &format!("{wave_name} to wait for approval"),
            Duration::from_secs(60),
            || {
                let status = fleet.status();
                status["revision"] != old
                    && status["waiting"]["wave"] == wave_name
                    && status["waiting"]["reason"]
                        .as_str()
                        .unwrap_or_default()
                        .contains("approval")
            },
        );
        fleet.status()["revision"].as_str().unwrap().to_string()
    };
    let approve = || {
        let approved = fleet.rollout("approve", &[]);
        assert!(approved.status.success(), "{}", stderr(&approved));
    };
    fleet.revision("v2");
    let v2 = waits("canary", &v1);
    approve();
    eventually("the canary on v2", Duration::from_secs(60), || {
        let status = fleet.status();
        status["waiting"]["wave"] == "rest" && wave(&status, "canary")["counts"]["healthy"] == 2
    });
    // v3 before the rest was approved for v2: while v3 waits for its own
    // approval, the canary stays on v2 (nothing goes back to v1).
    fleet.revision("v3");
    waits("canary", &v2);
    let status = fleet.status();
    assert_eq!(status["previousRevision"], v1.as_str(), "{status:#}");
    fleet.passes(2);
    for (name, (rev, generation)) in revisions(&fleet.ns) {
        let expected = if name == "t000" || name == "t001" {
            ("v2", 2)
        } else {
            ("v1", 1)
        };
        assert_eq!((rev.as_str(), generation), expected, "{name}");
    }
    approve();
    eventually(
        "the rest waits for approval of v3",
        Duration::from_secs(60),
        || {
            let status = fleet.status();
            status["waiting"]["wave"] == "rest" && wave(&status, "canary")["counts"]["healthy"] == 2
        },
    );
    approve();
    fleet.wait_phase("Done", Duration::from_secs(120));
    for (name, (rev, generation)) in revisions(&fleet.ns) {
        assert_eq!(rev, "v3", "{name}");
        // One write per revision the instance went through.
        let expected = if name == "t000" || name == "t001" {
            3
        } else {
            2
        };
        assert_eq!(generation, expected, "{name} went back or twice");
    }
}
