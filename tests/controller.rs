//! `kiln controller` as a process against the test environment's API
//! server, configured only through Kiln's custom resources: rows in
//! PostgreSQL behind a Secret, templates in a ConfigMap, status and Events
//! read back with kubectl, leader election between two replicas.
//!
//! Each test runs its own controller(s) with a `--selector` of its own, so
//! that tests running side by side never reconcile each other's Pipelines.

#![allow(clippy::unwrap_used)] // a test that cannot go on fails, with the cause

mod common;

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    Running, eventually, free_addr, http_get, kiln, kubectl, kubectl_ok, metric, postgres, sql,
    stderr, stdout,
};
use serde_json::Value;

/// `kubectl apply` of a YAML text.
fn apply(yaml: &str) {
    common::kubectl_apply(yaml);
}

fn get(namespace: &str, kind: &str, name: &str) -> Option<Value> {
    let out = kubectl(&["get", kind, name, "-n", namespace, "-o", "json"]);
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).unwrap())
}

/// A namespace of the test's own, with Kiln's CRDs installed, and the
/// label its controllers select Pipelines by.
struct Scene {
    namespace: String,
    selector: String,
    /// The controllers' `--cache-dir`.
    cache: tempfile::TempDir,
}

impl Scene {
    fn new(hint: &str) -> Self {
        let namespace = kiln_testenv::unique_name(hint);
        let crds = concat!(env!("CARGO_MANIFEST_DIR"), "/crds/kiln.dev.yaml");
        kubectl_ok(&["apply", "--server-side", "--force-conflicts", "-f", crds]);
        kubectl_ok(&["create", "namespace", &namespace]);
        // The CRDs may take a moment to be served after their first apply.
        eventually(
            "the Pipeline kind is served",
            Duration::from_secs(30),
            || {
                kubectl(&["get", "pipelines", "-n", &namespace])
                    .status
                    .success()
            },
        );
        let selector = format!("kiln.test/scene={namespace}");
        Scene {
            namespace,
            selector,
            cache: tempfile::tempdir().unwrap(),
        }
    }

    /// Starts a controller for this scene's Pipelines.
    fn controller(&self, metrics: &str, extra: &[&str]) -> Running {
        let cluster = kiln_testenv::cluster();
        common::kiln_command()
            .args(["controller", "--kubeconfig"])
            .arg(&cluster.kubeconfig)
            .args(["--selector", &self.selector])
            .args(["--namespace", &self.namespace])
            .args(["--metrics-addr", metrics])
            .arg("--cache-dir")
            .arg(self.cache.path())
            .args(extra)
            .env("KILN_LOG", "info,kube=warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map(Running::new)
            .unwrap()
    }

    /// A Pipeline of this scene (labelled for its controllers).
    fn pipeline(&self, name: &str, spec: &str) -> String {
        format!(
            "apiVersion: kiln.dev/v1alpha1\nkind: Pipeline\nmetadata:\n  name: {name}\n  namespace: {ns}\n  labels: {{kiln.test/scene: {ns}}}\nspec: {spec}\n",
            ns = self.namespace
        )
    }

    fn status(&self, pipeline: &str) -> Value {
        get(&self.namespace, "pipelines.kiln.dev", pipeline)
            .map(|p| p["status"].clone())
            .unwrap_or(Value::Null)
    }

    fn condition(&self, pipeline: &str, kind: &str) -> (String, String) {
        let status = self.status(pipeline);
        status["conditions"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == kind))
            .map(|c| {
                (
                    c["status"].as_str().unwrap_or_default().to_string(),
                    c["reason"].as_str().unwrap_or_default().to_string(),
                )
            })
            .unwrap_or_default()
    }

    /// Waits for `count` more passes of the Pipeline: its
    /// `lastReconcileTime` (whole seconds) moves on that many times.
    fn passes(&self, pipeline: &str, count: usize) {
        let mut last = self.status(pipeline)["lastReconcileTime"].clone();
        for _ in 0..count {
            eventually("another pass", Duration::from_secs(30), || {
                let now = self.status(pipeline)["lastReconcileTime"].clone();
                std::mem::replace(&mut last, now.clone()) != now && !now.is_null()
            });
        }
    }

    fn config_map_data(&self, name: &str) -> Option<Value> {
        get(&self.namespace, "configmap", name).map(|c| c["data"].clone())
    }

    /// Reasons of the Events on the Pipeline.
    fn event_reasons(&self, pipeline: &str) -> Vec<(String, String)> {
        let out = kubectl_ok(&[
            "get",
            "events.events.k8s.io",
            "-n",
            &self.namespace,
            "--field-selector",
            &format!("regarding.name={pipeline},regarding.kind=Pipeline"),
            "-o",
            "json",
        ]);
        let list: Value = serde_json::from_str(&out).unwrap();
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["type"].as_str().unwrap_or_default().to_string(),
                    e["reason"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect()
    }
}

impl Drop for Scene {
    fn drop(&mut self) {
        let _ = kubectl(&["delete", "namespace", &self.namespace, "--wait=false"]);
    }
}

const TEMPLATE: &str = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: \"plan-{{ key }}\"}\ndata: {plan: \"{{ row.plan }}\"}\n";

/// A Secret holding `url`, a ConfigMap holding `template`, a Source and a
/// Blueprint reading them.
fn tenants_configuration(scene: &Scene, url: &str, template: &str) -> String {
    let indented = indent(template, 4);
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: db, namespace: {ns}}}\nstringData: {{url: \"{url}\"}}\n---\n\
         apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: templates, namespace: {ns}}}\ndata:\n  plan.yaml: |\n{indented}---\n\
         apiVersion: kiln.dev/v1alpha1\nkind: Source\nmetadata: {{name: tenants, namespace: {ns}}}\n\
         spec: {{urlFrom: {{secretKeyRef: {{name: db, key: url}}}}, query: \"SELECT id, plan, active FROM tenants\", key: id, active: active, interval: 1s}}\n---\n\
         apiVersion: kiln.dev/v1alpha1\nkind: Blueprint\nmetadata: {{name: app, namespace: {ns}}}\n\
         spec:\n  source: tenants\n  namespace: {ns}\n  resources:\n  - id: plan\n    templateFrom: {{configMapKeyRef: {{name: templates, key: plan.yaml}}}}\n",
        ns = scene.namespace
    )
}

/// A Source reading a YAML file of one row (`a`) and a Blueprint whose one
/// resource `plan` is `resource` (its template field). The file's
/// directory lives as long as the first value.
fn file_configuration(scene: &Scene, resource: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let rows = tempfile::tempdir().unwrap();
    let file = rows.path().join("rows.yaml");
    std::fs::write(&file, "- {id: a, plan: gold}\n").unwrap();
    apply(&format!(
        "apiVersion: kiln.dev/v1alpha1\nkind: Source\nmetadata: {{name: rows, namespace: {ns}}}\n\
         spec: {{url: \"file:{file}\", key: id, interval: 1s}}\n---\n\
         apiVersion: kiln.dev/v1alpha1\nkind: Blueprint\nmetadata: {{name: app, namespace: {ns}}}\n\
         spec:\n  source: rows\n  namespace: {ns}\n  resources:\n  - id: plan\n{resource}",
        ns = scene.namespace,
        file = file.display()
    ));
    (rows, file)
}

/// [`file_configuration`] with [`TEMPLATE`] inline.
fn inline_configuration(scene: &Scene) -> (tempfile::TempDir, std::path::PathBuf) {
    file_configuration(scene, &format!("    template: |\n{}", indent(TEMPLATE, 6)))
}

/// Every line of `text` indented by `spaces`, for YAML block scalars.
fn indent(text: &str, spaces: usize) -> String {
    text.lines()
        .map(|l| format!("{:spaces$}{l}\n", ""))
        .collect()
}

#[test]
fn the_controller_follows_rows_templates_and_secrets_and_reports_in_status_and_events() {
    let scene = Scene::new("ctl");
    let url = postgres("ctl");
    sql(
        &url,
        "CREATE TABLE tenants (id TEXT PRIMARY KEY, plan TEXT, active BOOLEAN);\
         INSERT INTO tenants VALUES ('acme', 'gold', true), ('globex', 'silver', true);",
    );
    apply(&tenants_configuration(&scene, &url, TEMPLATE));
    apply(&scene.pipeline("main", "{}"));
    let addr = free_addr();
    let mut controller = scene.controller(&addr, &[]);
    let plan = |key: &str| {
        scene
            .config_map_data(&format!("plan-{key}"))
            .map(|d| d["plan"].as_str().unwrap_or_default().to_string())
    };

    eventually("the first pass", Duration::from_secs(60), || {
        plan("acme").as_deref() == Some("gold") && plan("globex").as_deref() == Some("silver")
    });
    eventually("Ready", Duration::from_secs(20), || {
        scene.condition("main", "Ready") == ("True".into(), "Succeeded".into())
    });
    let status = scene.status("main");
    assert_eq!(status["instances"], 2, "{status}");
    assert_eq!(status["objects"], 2, "{status}");
    assert_eq!(status["sources"][0]["name"], "tenants", "{status}");
    assert_eq!(status["sources"][0]["rows"], 2, "{status}");
    let pipeline = get(&scene.namespace, "pipelines.kiln.dev", "main").unwrap();
    assert_eq!(
        status["observedGeneration"], pipeline["metadata"]["generation"],
        "{status}"
    );
    let first_revision = status["lastAppliedRevision"].as_str().unwrap().to_string();
    assert!(first_revision.starts_with("sha256:"), "{status}");
    assert_eq!(scene.condition("main", "Stalled").0, "False");
    let columns = kubectl_ok(&["get", "pipelines", "-n", &scene.namespace]);
    assert!(columns.contains("READY"), "{columns}");
    assert!(columns.contains("INSTANCES"), "{columns}");
    assert!(
        columns.lines().nth(1).unwrap().contains("True"),
        "{columns}"
    );

    // A row added, one changed, one deactivated: each within seconds.
    sql(
        &url,
        "INSERT INTO tenants VALUES ('initech', 'bronze', true);\
         UPDATE tenants SET plan = 'platinum' WHERE id = 'acme';\
         UPDATE tenants SET active = false WHERE id = 'globex';",
    );
    // Deactivating one of two instances is more than the deletion guard's
    // 20%: the render is refused and the last state kept, until the
    // Pipeline allows it.
    eventually("MassDeletion", Duration::from_secs(20), || {
        scene.condition("main", "Ready") == ("False".into(), "MassDeletion".into())
    });
    assert_eq!(plan("globex").as_deref(), Some("silver"));
    assert_eq!(plan("initech"), None);
    kubectl_ok(&[
        "annotate",
        "pipeline",
        "main",
        "-n",
        &scene.namespace,
        "kiln.dev/allow-mass-delete=true",
    ]);
    eventually("the rows' changes", Duration::from_secs(20), || {
        plan("initech").as_deref() == Some("bronze")
            && plan("acme").as_deref() == Some("platinum")
            && plan("globex").is_none()
    });
    eventually("the status follows", Duration::from_secs(20), || {
        let status = scene.status("main");
        status["instances"] == 2 && status["lastAppliedRevision"] != first_revision.as_str()
    });

    kubectl_ok(&[
        "annotate",
        "pipeline",
        "main",
        "-n",
        &scene.namespace,
        "kiln.dev/allow-mass-delete-",
    ]);

    // A template change in the ConfigMap reaches every instance.
    let changed = TEMPLATE.replace(
        "plan: \"{{ row.plan }}\"",
        "plan: \"{{ row.plan | upper }}\"",
    );
    apply(&tenants_configuration(&scene, &url, &changed));
    eventually("the template change", Duration::from_secs(20), || {
        plan("acme").as_deref() == Some("PLATINUM") && plan("initech").as_deref() == Some("BRONZE")
    });

    // Someone else's edit of a managed object is put back.
    kubectl_ok(&[
        "patch",
        "configmap",
        "plan-acme",
        "-n",
        &scene.namespace,
        "--type=merge",
        "-p",
        r#"{"data":{"plan":"edited"}}"#,
    ]);
    eventually("the edit put back", Duration::from_secs(20), || {
        plan("acme").as_deref() == Some("PLATINUM")
    });

    // A database that cannot be reached: the last state stays, nothing is
    // pruned, and the status says why.
    let broken = tenants_configuration(&scene, "postgres://kiln:wrong@127.0.0.1:1/none", &changed);
    apply(&broken);
    eventually("SourceFailed", Duration::from_secs(30), || {
        scene.condition("main", "Ready") == ("False".into(), "SourceFailed".into())
    });
    let status = scene.status("main");
    assert!(
        status["sources"][0]["lastError"]
            .as_str()
            .is_some_and(|e| e.contains("tenants") && !e.contains("wrong")),
        "the error names the source and hides the password: {status}"
    );
    // Two more passes with the source down prune nothing either.
    scene.passes("main", 2);
    assert_eq!(plan("acme").as_deref(), Some("PLATINUM"));
    assert_eq!(plan("initech").as_deref(), Some("BRONZE"));
    apply(&tenants_configuration(&scene, &url, &changed));
    eventually("Ready again", Duration::from_secs(30), || {
        scene.condition("main", "Ready").0 == "True"
    });

    // A row removed from the table is pruned, once the Pipeline's guard
    // allows one instance of two.
    apply(&scene.pipeline("main", "{deletionGuard: {maxPercent: 50}}"));
    sql(&url, "DELETE FROM tenants WHERE id = 'initech';");
    eventually("the prune", Duration::from_secs(20), || {
        plan("initech").is_none()
    });

    let reasons = scene.event_reasons("main");
    for (kind, reason) in [
        ("Normal", "Rendered"),
        ("Normal", "Applied"),
        ("Normal", "Pruned"),
        ("Normal", "DriftCorrected"),
        ("Warning", "SourceFailed"),
        ("Warning", "MassDeletion"),
    ] {
        assert!(
            reasons.contains(&(kind.to_string(), reason.to_string())),
            "no {kind} {reason} event: {reasons:?}"
        );
    }
    let described = kubectl_ok(&["describe", "pipeline", "main", "-n", &scene.namespace]);
    assert!(described.contains("SourceFailed"), "{described}");
    assert!(
        metric(
            &addr,
            &format!(
                "kiln_reconciles_total{{pipeline=\"{}/main\"}}",
                scene.namespace
            )
        )
        .is_some_and(|n| n > 0.0)
    );
    assert!(
        metric(
            &addr,
            &format!(
                "kiln_source_rows{{pipeline=\"{}/main\",source=\"tenants\"}}",
                scene.namespace
            )
        ) == Some(2.0)
    );
    let out = controller.terminate();
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn a_postgres_notification_reaches_the_controller_at_once() {
    let scene = Scene::new("ctlnotify");
    let url = postgres("ctlnotify");
    sql(
        &url,
        "CREATE TABLE tenants (id TEXT PRIMARY KEY, plan TEXT, active BOOLEAN);\
         INSERT INTO tenants VALUES ('acme', 'gold', true);\
         CREATE FUNCTION kiln_notify() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN PERFORM pg_notify(TG_ARGV[0], ''); RETURN NULL; END $$;\
         CREATE TRIGGER tenants_changed AFTER INSERT OR UPDATE OR DELETE ON tenants \
         FOR EACH STATEMENT EXECUTE FUNCTION kiln_notify('tenants_changed');",
    );
    // Polled once an hour: only the notification can bring the change.
    let configuration = tenants_configuration(&scene, &url, TEMPLATE).replace(
        "interval: 1s}",
        "interval: 1h, notify: {channel: tenants_changed}}",
    );
    assert!(configuration.contains("notify"));
    apply(&configuration);
    apply(&scene.pipeline("main", "{}"));
    let addr = free_addr();
    let mut controller = scene.controller(&addr, &[]);
    let plan = || {
        scene
            .config_map_data("plan-acme")
            .map(|d| d["plan"].as_str().unwrap_or_default().to_string())
    };
    eventually("the first pass", Duration::from_secs(60), || {
        plan().as_deref() == Some("gold") && scene.condition("main", "Ready").0 == "True"
    });
    sql(
        &url,
        "UPDATE tenants SET plan = 'platinum' WHERE id = 'acme';",
    );
    eventually("the notified change", Duration::from_secs(5), || {
        plan().as_deref() == Some("platinum")
    });
    let out = controller.terminate();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        !stderr(&out).contains(url.split('@').next().unwrap()),
        "the URL's password was logged"
    );
}

#[test]
fn a_missing_configmap_stalls_the_pipeline_until_it_is_created() {
    let scene = Scene::new("ctlref");
    let (_rows, _) = file_configuration(
        &scene,
        "    templateFrom: {configMapKeyRef: {name: later, key: plan.yaml}}\n",
    );
    apply(&scene.pipeline("main", "{}"));
    let addr = free_addr();
    let mut controller = scene.controller(&addr, &[]);
    eventually("ReferenceNotFound", Duration::from_secs(60), || {
        scene.condition("main", "Ready") == ("False".into(), "ReferenceNotFound".into())
    });
    assert_eq!(
        scene.condition("main", "Stalled"),
        ("True".into(), "ReferenceNotFound".into())
    );
    let ready = |reason: &str| {
        format!(
            "kiln_pipeline_ready{{pipeline=\"{}/main\",reason=\"{reason}\"}}",
            scene.namespace
        )
    };
    eventually("the Ready gauge", Duration::from_secs(15), || {
        metric(&addr, &ready("ReferenceNotFound")) == Some(0.0)
    });
    let message = scene.status("main")["conditions"][0]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        message.contains("Blueprint app") && message.contains("later"),
        "{message}"
    );
    // The ConfigMap appears: the watch on ConfigMaps starts a pass.
    let indented = indent(TEMPLATE, 4);
    apply(&format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: later, namespace: {}}}\ndata:\n  plan.yaml: |\n{indented}",
        scene.namespace
    ));
    eventually("the object", Duration::from_secs(15), || {
        scene.config_map_data("plan-a").is_some()
    });
    eventually("Ready", Duration::from_secs(15), || {
        scene.condition("main", "Ready").0 == "True"
    });
    eventually("the Ready gauge", Duration::from_secs(15), || {
        metric(&addr, &ready("Succeeded")) == Some(1.0)
            && metric(&addr, &ready("ReferenceNotFound")).is_none()
    });
    // A relative file path means nothing in a cluster: refused by name.
    apply(&format!(
        "apiVersion: kiln.dev/v1alpha1\nkind: Source\nmetadata: {{name: rows, namespace: {ns}}}\n\
         spec: {{url: \"file:rows.yaml\", key: id, interval: 1s}}\n",
        ns = scene.namespace
    ));
    eventually("InvalidConfiguration", Duration::from_secs(15), || {
        scene.condition("main", "Ready") == ("False".into(), "InvalidConfiguration".into())
    });
    assert!(
        scene.config_map_data("plan-a").is_some(),
        "a bad configuration keeps the last state"
    );
    controller.terminate();
}

/// A file source of five rows (`a`..`e`) and a Blueprint whose ConfigMap
/// `plan-<key>` carries `rev`.
fn rollout_configuration(scene: &Scene, file: &std::path::Path, rev: &str) {
    apply(&format!(
        "apiVersion: kiln.dev/v1alpha1\nkind: Source\nmetadata: {{name: rows, namespace: {ns}}}\n\
         spec: {{url: \"file:{file}\", key: id, interval: 1s}}\n---\n\
         apiVersion: kiln.dev/v1alpha1\nkind: Blueprint\nmetadata: {{name: app, namespace: {ns}}}\n\
         spec:\n  source: rows\n  namespace: {ns}\n  resources:\n  - id: plan\n    template: |\n      \
         apiVersion: v1\n      kind: ConfigMap\n      metadata: {{name: \"plan-{{{{ key }}}}\"}}\n      \
         data: {{rev: {rev}}}\n",
        ns = scene.namespace,
        file = file.display()
    ));
}

#[test]
fn the_controller_runs_a_rollout_and_takes_requests_through_the_pipeline() {
    let scene = Scene::new("ctlroll");
    let rows = tempfile::tempdir().unwrap();
    let file = rows.path().join("rows.yaml");
    std::fs::write(
        &file,
        "- {id: a}\n- {id: b}\n- {id: c}\n- {id: d}\n- {id: e}\n",
    )
    .unwrap();
    rollout_configuration(&scene, &file, "v1");
    apply(&scene.pipeline(
        "main",
        "{rollout: {waves: [{name: canary, instances: [a]}, {name: rest, maxConcurrent: 2, gates: [{approval: {}}]}]}}",
    ));
    let addr = free_addr();
    let mut controller = scene.controller(&addr, &[]);
    let rev = |key: &str| {
        scene
            .config_map_data(&format!("plan-{key}"))
            .map(|d| d["rev"].as_str().unwrap_or_default().to_string())
            .unwrap_or_default()
    };
    let rollout = || scene.status("main")["rollout"].clone();
    eventually(
        "the first revision everywhere",
        Duration::from_secs(60),
        || rollout()["phase"] == "Done" && ["a", "b", "c", "d", "e"].iter().all(|k| rev(k) == "v1"),
    );
    let v1 = rollout()["revision"].as_str().unwrap().to_string();

    // A template change: the canary, then the rest waits for approval.
    rollout_configuration(&scene, &file, "v2");
    eventually(
        "the rest waits for approval",
        Duration::from_secs(60),
        || {
            let r = rollout();
            r["revision"] != v1.as_str()
                && r["waiting"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("approval")
                && rev("a") == "v2"
        },
    );
    let status = rollout();
    assert_eq!(status["previousRevision"], v1.as_str(), "{status}");
    assert_eq!(status["wave"], "rest", "{status}");
    assert_eq!(status["instances"]["pending"], 4, "{status}");
    for key in ["b", "c", "d", "e"] {
        assert_eq!(rev(key), "v1", "{key} moved before the approval");
    }
    let cluster = kiln_testenv::cluster();
    let pipeline = format!("{}/main", scene.namespace);
    let verb = |args: &[&str]| {
        let mut all = vec!["rollout"];
        all.extend_from_slice(args);
        all.extend_from_slice(&[
            "--controller",
            &pipeline,
            "--kubeconfig",
            cluster.kubeconfig.to_str().unwrap(),
        ]);
        kiln(&all)
    };
    // An approval of another revision is refused, and said so.
    let refused = verb(&["approve", "--revision", &v1]);
    assert_eq!(refused.status.code(), Some(2), "{}", stderr(&refused));
    assert!(
        stderr(&refused).contains("an approval is for the revision it names"),
        "{}",
        stderr(&refused)
    );
    assert_eq!(rollout()["request"]["done"], false);
    let approved = verb(&["approve"]);
    assert!(approved.status.success(), "{}", stderr(&approved));
    eventually("every instance on v2", Duration::from_secs(60), || {
        rollout()["phase"] == "Done" && ["a", "b", "c", "d", "e"].iter().all(|k| rev(k) == "v2")
    });
    let shown = verb(&["status", "--format", "json"]);
    assert!(shown.status.success(), "{}", stderr(&shown));
    let shown: Value = serde_json::from_str(&stdout(&shown)).unwrap();
    assert_eq!(shown["phase"], "Done");
    assert_eq!(shown["instances"]["healthy"], 5);
    let reasons = scene.event_reasons("main");
    assert!(reasons.iter().any(|(_, r)| r == "Rollout"), "{reasons:?}");

    // Paused through the Pipeline, a new revision waits where it is.
    rollout_configuration(&scene, &file, "v3");
    eventually("the canary on v3", Duration::from_secs(60), || {
        rev("a") == "v3"
    });
    let paused = verb(&["pause"]);
    assert!(paused.status.success(), "{}", stderr(&paused));
    assert_eq!(rollout()["phase"], "Paused");
    let aborted = verb(&["abort"]);
    assert!(aborted.status.success(), "{}", stderr(&aborted));
    eventually("the canary back on v2", Duration::from_secs(60), || {
        rev("a") == "v2"
    });
    controller.terminate();
}

#[test]
fn two_replicas_elect_one_leader_which_a_standby_replaces() {
    let scene = Scene::new("ctlha");
    let (_rows, file) = inline_configuration(&scene);
    apply(&scene.pipeline("main", "{}"));
    let election = ["--leader-elect", "--lease-duration", "3s"];
    let (first, second) = (free_addr(), free_addr());
    let mut one = scene.controller(&first, &[&election[..], &["--identity", "one"]].concat());
    eventually("one leads", Duration::from_secs(30), || {
        metric(&first, "kiln_leader") == Some(1.0)
    });
    let mut two = scene.controller(&second, &[&election[..], &["--identity", "two"]].concat());
    eventually("two stands by", Duration::from_secs(30), || {
        metric(&second, "kiln_leader") == Some(0.0)
    });
    eventually("the leader's pass", Duration::from_secs(30), || {
        scene.config_map_data("plan-a").is_some()
    });
    let holder = || {
        get(&scene.namespace, "lease", "kiln-controller")
            .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_string))
    };
    assert_eq!(holder().as_deref(), Some("one"));
    // The standby writes nothing: while the leader makes two more passes,
    // its reconcile counter stays absent.
    scene.passes("main", 2);
    assert!(
        !http_get(&second, "/metrics").contains("kiln_reconciles_total"),
        "the standby reconciled"
    );

    // kill -9 the leader: the standby takes over within the Lease's
    // duration (and a few renewal periods), and applies a new row.
    one.kill();
    let killed = Instant::now();
    eventually("two leads", Duration::from_secs(15), || {
        metric(&second, "kiln_leader") == Some(1.0)
    });
    let took = killed.elapsed();
    assert!(
        took >= Duration::from_secs(2),
        "took over too early: {took:?}"
    );
    assert_eq!(holder().as_deref(), Some("two"));
    std::fs::write(&file, "- {id: a, plan: gold}\n- {id: b, plan: silver}\n").unwrap();
    eventually("the new leader's pass", Duration::from_secs(20), || {
        scene.config_map_data("plan-b").is_some()
    });

    // SIGTERM gives the Lease up at once.
    let out = two.terminate();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(holder(), None, "the Lease was not released");
}

/// The `Tenant` kind of the tests: a CRD of its own group, namespaced.
fn tenant_crd() {
    apply(
        "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\n\
         metadata: {name: tenants.kiln-test.example.com}\n\
         spec:\n  group: kiln-test.example.com\n  scope: Namespaced\n\
         \x20 names: {plural: tenants, singular: tenant, kind: Tenant}\n\
         \x20 versions:\n  - name: v1\n    served: true\n    storage: true\n\
         \x20   subresources: {status: {}}\n\
         \x20   additionalPrinterColumns: [{name: Ready, type: string, jsonPath: \".status.conditions[?(@.type==\\\"Ready\\\")].status\"}]\n\
         \x20   schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}\n",
    );
    eventually("the Tenant kind is served", Duration::from_secs(30), || {
        kubectl(&["get", "tenants.kiln-test.example.com", "-A"])
            .status
            .success()
    });
}

fn tenant(namespace: &str, name: &str, plan: &str, labels: &str) -> String {
    format!(
        "apiVersion: kiln-test.example.com/v1\nkind: Tenant\n\
         metadata: {{name: {name}, namespace: {namespace}, labels: {{{labels}}}}}\n\
         spec: {{plan: {plan}, active: true}}\n"
    )
}

/// A Source of the Tenants of `namespace` labelled `kiln.test/tenant=yes`
/// (read every hour: only the watch can make a change show within seconds)
/// and a Blueprint of one ConfigMap per Tenant in `target`.
fn tenants_as_rows(namespace: &str, source_namespace: &str, target: &str) -> String {
    format!(
        "apiVersion: kiln.dev/v1alpha1\nkind: Source\nmetadata: {{name: tenants, namespace: {source_namespace}}}\n\
         spec:\n  kubernetes: {{apiVersion: kiln-test.example.com/v1, kind: Tenant, namespace: {namespace}, labelSelector: kiln.test/tenant=yes, writeStatus: true}}\n\
         \x20 active: spec.active\n  interval: 1h\n---\n\
         apiVersion: kiln.dev/v1alpha1\nkind: Blueprint\nmetadata: {{name: app, namespace: {source_namespace}}}\n\
         spec:\n  source: tenants\n  namespace: {target}\n  resources:\n  - id: plan\n    template: |\n\
         \x20     apiVersion: v1\n      kind: ConfigMap\n      metadata: {{name: \"tenant-{{{{ row.metadata.name }}}}\"}}\n\
         \x20     data: {{plan: \"{{{{ row.spec.plan }}}}\", key: \"{{{{ key }}}}\"}}\n"
    )
}

#[test]
fn custom_resources_are_rows_for_render_sync_and_the_controller() {
    tenant_crd();
    let scene = Scene::new("ctlcr");
    let ns = scene.namespace.clone();
    apply(&tenant(&ns, "acme", "gold", "kiln.test/tenant: \"yes\""));
    apply(&tenant(
        &ns,
        "globex",
        "silver",
        "kiln.test/tenant: \"yes\"",
    ));
    apply(&tenant(&ns, "stray", "none", ""));

    // The CLI reads them through the kubeconfig.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kiln.yaml");
    let elsewhere = kiln_testenv::unique_name("ctlcr-sync");
    kubectl_ok(&["create", "namespace", &elsewhere]);
    std::fs::write(&config, tenants_as_rows(&ns, "default", &elsewhere)).unwrap();
    let cluster = kiln_testenv::cluster();
    let out = common::kiln_command()
        .args(["render", "-f"])
        .arg(&config)
        .env("KUBECONFIG", &cluster.kubeconfig)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let rendered = String::from_utf8_lossy(&out.stdout);
    assert!(rendered.contains("name: tenant-acme"), "{rendered}");
    assert!(rendered.contains("plan: silver"), "{rendered}");
    assert!(
        rendered.contains(&format!("key: {ns}/acme")),
        "the key is namespace/name: {rendered}"
    );
    assert!(
        !rendered.contains("tenant-stray"),
        "the label selector: {rendered}"
    );

    // `kiln sync` watches them: a change is applied within seconds.
    let mut sync = Running::new(
        common::kiln_command()
            .args(["sync", "-f"])
            .arg(&config)
            .arg("--kubeconfig")
            .arg(&cluster.kubeconfig)
            .args(["--inventory", &elsewhere])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let synced = |name: &str| {
        get(&elsewhere, "configmap", &format!("tenant-{name}"))
            .map(|c| c["data"]["plan"].as_str().unwrap_or_default().to_string())
    };
    eventually("the sync's first pass", Duration::from_secs(30), || {
        synced("globex").as_deref() == Some("silver")
    });
    apply(&tenant(&ns, "globex", "gold", "kiln.test/tenant: \"yes\""));
    eventually("the sync follows a Tenant", Duration::from_secs(10), || {
        synced("globex").as_deref() == Some("gold")
    });
    let out = sync.terminate();
    assert!(out.status.success(), "{}", stderr(&out));
    let _ = kubectl(&["delete", "namespace", &elsewhere, "--wait=false"]);
    apply(&tenant(
        &ns,
        "globex",
        "silver",
        "kiln.test/tenant: \"yes\"",
    ));

    // The controller watches them: a change shows within seconds though the
    // Source is read every hour.
    apply(&tenants_as_rows(&ns, &ns, &ns));
    apply(&scene.pipeline("main", "{deletionGuard: {maxPercent: 100}}"));
    let addr = free_addr();
    let mut controller = scene.controller(&addr, &[]);
    let plan = |name: &str| {
        scene
            .config_map_data(&format!("tenant-{name}"))
            .map(|d| d["plan"].as_str().unwrap_or_default().to_string())
    };
    eventually("the first pass", Duration::from_secs(60), || {
        plan("acme").as_deref() == Some("gold") && plan("globex").as_deref() == Some("silver")
    });
    assert_eq!(plan("stray"), None);
    apply(&tenant(
        &ns,
        "acme",
        "platinum",
        "kiln.test/tenant: \"yes\"",
    ));
    eventually("a changed Tenant", Duration::from_secs(10), || {
        plan("acme").as_deref() == Some("platinum")
    });
    apply(&tenant(
        &ns,
        "initech",
        "bronze",
        "kiln.test/tenant: \"yes\"",
    ));
    eventually("a new Tenant", Duration::from_secs(10), || {
        plan("initech").as_deref() == Some("bronze")
    });
    kubectl_ok(&[
        "delete",
        "tenants.kiln-test.example.com",
        "globex",
        "-n",
        &ns,
    ]);
    eventually("a deleted Tenant", Duration::from_secs(10), || {
        plan("globex").is_none()
    });
    assert_eq!(scene.status("main")["instances"], 2);

    // Each Tenant is told how its objects are (writeStatus).
    eventually("the Tenant's status", Duration::from_secs(10), || {
        get(&ns, "tenants.kiln-test.example.com", "acme").is_some_and(|t| {
            t["status"]["kiln"]["objects"] == 1
                && t["status"]["kiln"]["pipeline"] == format!("{ns}/main").as_str()
                && t["status"]["conditions"].as_array().is_some_and(|c| {
                    c.iter()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True")
                })
        })
    });
    // The kind's own conditions stay: Kiln adds its Ready beside them.
    kubectl_ok(&[
        "patch",
        "tenants.kiln-test.example.com",
        "acme",
        "-n",
        &ns,
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"conditions":[{"type":"Provisioned","status":"True"}]}}"#,
    ]);
    eventually("both conditions", Duration::from_secs(10), || {
        get(&ns, "tenants.kiln-test.example.com", "acme").is_some_and(|t| {
            let types: Vec<&str> = t["status"]["conditions"]
                .as_array()
                .map(|c| c.iter().filter_map(|c| c["type"].as_str()).collect())
                .unwrap_or_default();
            types == ["Provisioned", "Ready"]
        })
    });
    let listed = kubectl_ok(&["get", "tenants.kiln-test.example.com", "-n", &ns]);
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with("acme") && l.contains("True")),
        "{listed}"
    );

    // A Source may not read another namespace's objects.
    apply(&tenants_as_rows("default", &ns, &ns));
    eventually("InvalidConfiguration", Duration::from_secs(15), || {
        scene.condition("main", "Ready") == ("False".into(), "InvalidConfiguration".into())
    });
    assert_eq!(
        plan("acme").as_deref(),
        Some("platinum"),
        "the last state stays"
    );
    controller.terminate();
}

/// Starts a server that is to listen on loopback `port`, and waits until it
/// does.
fn listening(command: &mut Command, port: u16, what: &str) -> Running {
    let process = command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(Running::new)
        .unwrap();
    eventually(&format!("{what} listens"), Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    process
}

/// `git daemon` serving the bare repositories under a directory, pushes
/// allowed, on a loopback port; stopped when dropped.
struct GitDaemon {
    root: tempfile::TempDir,
    port: u16,
    _process: Running,
}

impl GitDaemon {
    fn start() -> Self {
        let root = tempfile::tempdir().unwrap();
        let port: u16 = free_addr().rsplit(':').next().unwrap().parse().unwrap();
        let mut process = Command::new("git");
        process
            .args([
                "daemon",
                "--reuseaddr",
                "--export-all",
                "--enable=receive-pack",
                "--listen=127.0.0.1",
            ])
            .arg(format!("--port={port}"))
            .arg(format!("--base-path={}", root.path().display()))
            .arg(root.path());
        let process = listening(&mut process, port, "git daemon");
        GitDaemon {
            root,
            port,
            _process: process,
        }
    }

    /// A bare repository whose `main` holds one commit of someone's.
    fn repository(&self, name: &str) -> String {
        let bare = self.root.path().join(name);
        common::git(
            self.root.path(),
            &["init", "-q", "--bare", "-b", "main", name],
        );
        let work = tempfile::tempdir().unwrap();
        common::git(work.path(), &["init", "-q", "-b", "main"]);
        std::fs::write(work.path().join("README.md"), "the fleet\n").unwrap();
        common::git(work.path(), &["add", "README.md"]);
        common::git(work.path(), &["commit", "-q", "-m", "start"]);
        common::git(work.path(), &["push", "-q", bare.to_str().unwrap(), "main"]);
        format!("git://127.0.0.1:{}/{name}", self.port)
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.root.path().join(name)
    }
}

#[test]
fn a_pipeline_with_git_commits_pushes_over_the_network_and_then_applies() {
    let daemon = GitDaemon::start();
    let url = daemon.repository("fleet.git");
    let bare = daemon.path("fleet.git");
    let scene = Scene::new("ctlgit");
    let (_rows, file) = inline_configuration(&scene);
    std::fs::write(
        &file,
        "- {id: a, plan: gold}\n- {id: b, plan: silver}\n- {id: c, plan: bronze}\n",
    )
    .unwrap();
    apply(&scene.pipeline(
        "main",
        &format!("{{git: {{url: \"{url}\", branch: main, path: fleet}}, deletionGuard: {{maxPercent: 40}}}}"),
    ));
    let addr = free_addr();
    let mut controller = scene.controller(&addr, &[]);
    let remote_tip = || common::git(&bare, &["rev-parse", "main"]);
    let remote_file = |path: &str| {
        let out = Command::new("git")
            .arg("-C")
            .arg(&bare)
            .args(["show", &format!("main:{path}")])
            .output()
            .unwrap();
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    };
    eventually("the commit and the apply", Duration::from_secs(60), || {
        scene.condition("main", "Ready").0 == "True"
    });
    let status = scene.status("main");
    let tip = remote_tip();
    assert_eq!(status["lastCommit"], tip.as_str(), "{status}");
    assert_eq!(
        status["lastAppliedRevision"].as_str().unwrap(),
        &tip[..12],
        "{status}"
    );
    assert!(
        remote_file("fleet/app/a/plan.yaml")
            .unwrap()
            .contains("plan: gold")
    );
    assert_eq!(remote_file("README.md").as_deref(), Some("the fleet\n"));
    assert!(
        scene.config_map_data("plan-a").is_some(),
        "applied from the branch"
    );
    assert!(
        scene
            .event_reasons("main")
            .contains(&("Normal".into(), "Committed".into())),
        "{:?}",
        scene.event_reasons("main")
    );

    // Someone pushes to the branch; Kiln's next commit goes on top of it.
    let work = tempfile::tempdir().unwrap();
    common::git(work.path(), &["clone", "-q", bare.to_str().unwrap(), "."]);
    std::fs::write(work.path().join("NOTES.md"), "on call: someone\n").unwrap();
    common::git(work.path(), &["add", "NOTES.md"]);
    common::git(work.path(), &["commit", "-q", "-m", "notes"]);
    common::git(work.path(), &["push", "-q", "origin", "main"]);
    let theirs = remote_tip();
    std::fs::write(
        &file,
        "- {id: a, plan: platinum}\n- {id: b, plan: silver}\n- {id: c, plan: bronze}\n",
    )
    .unwrap();
    eventually("a commit on top of theirs", Duration::from_secs(20), || {
        remote_file("fleet/app/a/plan.yaml").is_some_and(|f| f.contains("platinum"))
    });
    assert_eq!(
        common::git(&bare, &["rev-parse", "main^"]),
        theirs,
        "a fast-forward of their commit"
    );
    assert_eq!(
        remote_file("NOTES.md").as_deref(),
        Some("on call: someone\n")
    );
    eventually(
        "the apply of the new commit",
        Duration::from_secs(20),
        || {
            scene
                .config_map_data("plan-a")
                .is_some_and(|d| d["plan"] == "platinum")
        },
    );

    // The remote moves while Kiln pushes (a hook of the server commits
    // first, once): the push is refused, and Kiln fetches, commits on top
    // and pushes again in the same pass.
    let hook = bare.join("hooks/pre-receive");
    std::fs::write(
        &hook,
        "#!/bin/sh\n\
         [ -e \"$GIT_DIR/moved-once\" ] && exit 0\n\
         touch \"$GIT_DIR/moved-once\"\n\
         unset GIT_QUARANTINE_PATH GIT_OBJECT_DIRECTORY GIT_ALTERNATE_OBJECT_DIRECTORIES\n\
         tree=$(git rev-parse main^{tree})\n\
         commit=$(echo racing | GIT_AUTHOR_NAME=x GIT_AUTHOR_EMAIL=x@y GIT_COMMITTER_NAME=x GIT_COMMITTER_EMAIL=x@y git commit-tree \"$tree\" -p main)\n\
         git update-ref refs/heads/main \"$commit\"\n",
    )
    .unwrap();
    Command::new("chmod")
        .arg("755")
        .arg(&hook)
        .status()
        .unwrap();
    std::fs::write(
        &file,
        "- {id: a, plan: diamond}\n- {id: b, plan: silver}\n- {id: c, plan: bronze}\n",
    )
    .unwrap();
    eventually("a commit after the race", Duration::from_secs(20), || {
        remote_file("fleet/app/a/plan.yaml").is_some_and(|f| f.contains("diamond"))
    });
    assert!(bare.join("moved-once").exists(), "the hook ran");
    assert_eq!(
        common::git(&bare, &["log", "-1", "--format=%s", "main^"]),
        "racing",
        "Kiln's commit is on top of the one that raced it"
    );
    std::fs::remove_file(&hook).unwrap();

    // Two rows of three gone is more than the guard allows: nothing is
    // committed or pushed, and the status says why.
    let before = remote_tip();
    std::fs::write(&file, "- {id: a, plan: platinum}\n").unwrap();
    eventually("MassDeletion", Duration::from_secs(20), || {
        scene.condition("main", "Ready") == ("False".into(), "MassDeletion".into())
    });
    assert_eq!(remote_tip(), before);
    assert!(scene.config_map_data("plan-b").is_some());
    let out = controller.terminate();
    let log = stderr(&out);
    assert!(
        log.contains("the remote refused the push"),
        "the retry happened within a pass: {log}"
    );
}

#[test]
fn through_git_the_controller_commits_a_rollout_step_by_step() {
    let daemon = GitDaemon::start();
    let url = daemon.repository("fleet.git");
    let bare = daemon.path("fleet.git");
    let scene = Scene::new("ctlgitroll");
    let rows = tempfile::tempdir().unwrap();
    let file = rows.path().join("rows.yaml");
    std::fs::write(
        &file,
        "- {id: a}\n- {id: b}\n- {id: c}\n- {id: d}\n- {id: e}\n",
    )
    .unwrap();
    rollout_configuration(&scene, &file, "v1");
    apply(&scene.pipeline(
        "main",
        &format!(
            "{{git: {{url: \"{url}\", branch: main}}, rollout: {{waves: [{{name: canary, instances: [a]}}, {{name: rest, maxConcurrent: 2}}]}}}}"
        ),
    ));
    let addr = free_addr();
    let mut controller = scene.controller(&addr, &[]);
    let rollout = || scene.status("main")["rollout"].clone();
    eventually(
        "the first revision committed and applied",
        Duration::from_secs(60),
        || rollout()["phase"] == "Done" && scene.condition("main", "Ready").0 == "True",
    );
    let before = common::git(&bare, &["rev-parse", "main"]);
    let v1 = rollout()["revision"].as_str().unwrap().to_string();
    rollout_configuration(&scene, &file, "v2");
    eventually("v2 rolled out", Duration::from_secs(120), || {
        let r = rollout();
        r["revision"] != v1.as_str() && r["phase"] == "Done"
    });
    let v2 = rollout()["revision"].as_str().unwrap().to_string();
    // The remote's history: the canary alone, then the rest two at a time,
    // each commit carrying the rollout.
    let log = common::git(
        &bare,
        &["rev-list", "--reverse", &format!("{before}..main")],
    );
    let commits: Vec<&str> = log.lines().collect();
    assert_eq!(commits.len(), 3, "canary, two, two: {log}");
    let on_v2 = |commit: &str| -> Vec<String> {
        ["a", "b", "c", "d", "e"]
            .iter()
            .filter(|k| {
                common::git(&bare, &["show", &format!("{commit}:app/{k}/plan.yaml")])
                    .contains("rev: v2")
            })
            .map(|k| k.to_string())
            .collect()
    };
    assert_eq!(on_v2(commits[0]), ["a"]);
    assert_eq!(on_v2(commits[1]).len(), 3);
    assert_eq!(on_v2(commits[2]).len(), 5);
    for commit in &commits {
        let message = common::git(&bare, &["log", "-1", "--format=%B", commit]);
        assert!(
            message.contains(&format!("Kiln-Rollout: {v2}")),
            "{message}"
        );
    }
    for key in ["a", "b", "c", "d", "e"] {
        assert_eq!(
            scene.config_map_data(&format!("plan-{key}")).unwrap()["rev"],
            "v2"
        );
    }
    controller.terminate();
}

#[test]
fn a_pipeline_that_leaves_applying_to_others_only_commits() {
    let daemon = GitDaemon::start();
    let url = daemon.repository("fleet.git");
    let bare = daemon.path("fleet.git");
    let scene = Scene::new("ctlgitonly");
    let (_rows, _) = inline_configuration(&scene);
    apply(&scene.pipeline(
        "main",
        &format!("{{git: {{url: \"{url}\", branch: rendered}}, apply: false}}"),
    ));
    let addr = free_addr();
    let mut controller = scene.controller(&addr, &[]);
    eventually("Committed", Duration::from_secs(60), || {
        scene.condition("main", "Ready") == ("True".into(), "Committed".into())
    });
    let tip = common::git(&bare, &["rev-parse", "rendered"]);
    assert_eq!(scene.status("main")["lastCommit"], tip.as_str());
    let listed = common::git(&bare, &["ls-tree", "-r", "--name-only", "rendered"]);
    assert!(listed.contains("app/a/plan.yaml"), "{listed}");
    // The pass that committed is over (its status is written): it applied
    // nothing, nor do the next ones.
    scene.passes("main", 1);
    assert!(
        scene.config_map_data("plan-a").is_none(),
        "spec.apply: false applies nothing"
    );
    controller.terminate();
}

/// A Git server over HTTP on loopback: `git http-backend` run as a CGI
/// program for each request, behind Basic authentication with one user and
/// token. Requests without them get 401, as a hosted Git service answers.
struct GitHttp {
    root: tempfile::TempDir,
    addr: String,
    refused: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl GitHttp {
    fn start(user: &str, token: &str) -> Self {
        use base64::Engine as _;
        let root = tempfile::tempdir().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let expected = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{token}"))
        );
        let project_root = root.path().to_path_buf();
        let refused = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = refused.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (project_root, expected, counter) =
                    (project_root.clone(), expected.clone(), counter.clone());
                std::thread::spawn(move || {
                    let _ = serve_git_http(stream, &project_root, &expected, &counter);
                });
            }
        });
        GitHttp {
            root,
            addr,
            refused,
        }
    }
}

/// One request: read it, check its credentials, run `git http-backend`
/// with the CGI variables, and send its answer back.
fn serve_git_http(
    mut stream: std::net::TcpStream,
    project_root: &std::path::Path,
    expected: &str,
    refused: &std::sync::atomic::AtomicUsize,
) -> std::io::Result<()> {
    use std::io::{BufRead as _, BufReader, Read as _};
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut parts = request_line.split_whitespace();
    let (method, target) = (
        parts.next().unwrap_or_default().to_string(),
        parts.next().unwrap_or_default().to_string(),
    );
    let mut headers = std::collections::HashMap::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_string());
        }
    }
    let mut body = Vec::new();
    if headers
        .get("transfer-encoding")
        .is_some_and(|t| t.eq_ignore_ascii_case("chunked"))
    {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size)?;
            let size = usize::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16)
                .unwrap_or(0);
            let mut chunk = vec![0; size + 2];
            reader.read_exact(&mut chunk)?;
            if size == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..size]);
        }
    } else if let Some(length) = headers.get("content-length") {
        let mut chunk = vec![0; length.parse().unwrap_or(0)];
        reader.read_exact(&mut chunk)?;
        body = chunk;
    }
    if headers.get("authorization").map(String::as_str) != Some(expected) {
        refused.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        stream.write_all(
            b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"git\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )?;
        return Ok(());
    }
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let mut cgi = Command::new("git")
        .arg("http-backend")
        .env("GIT_PROJECT_ROOT", project_root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("REQUEST_METHOD", &method)
        .env("PATH_INFO", path)
        .env("QUERY_STRING", query)
        .env("REMOTE_USER", "kiln")
        .env("REMOTE_ADDR", "127.0.0.1")
        .env(
            "CONTENT_TYPE",
            headers.get("content-type").cloned().unwrap_or_default(),
        )
        .env("CONTENT_LENGTH", body.len().to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    cgi.stdin.take().unwrap().write_all(&body)?;
    let output = cgi.wait_with_output()?;
    let split = output
        .stdout
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| (p, 4))
        .or_else(|| {
            output
                .stdout
                .windows(2)
                .position(|w| w == b"\n\n")
                .map(|p| (p, 2))
        });
    let Some((at, gap)) = split else {
        stream.write_all(
            b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )?;
        return Ok(());
    };
    let head = String::from_utf8_lossy(&output.stdout[..at]).into_owned();
    let content = &output.stdout[at + gap..];
    let mut status = "200 OK".to_string();
    let mut response = String::new();
    for line in head.lines() {
        match line.split_once(':') {
            Some((name, value)) if name.eq_ignore_ascii_case("status") => {
                status = value.trim().to_string();
            }
            Some(_) => {
                response.push_str(line.trim_end());
                response.push_str("\r\n");
            }
            None => {}
        }
    }
    stream.write_all(
        format!(
            "HTTP/1.1 {status}\r\n{response}Content-Length: {}\r\nConnection: close\r\n\r\n",
            content.len()
        )
        .as_bytes(),
    )?;
    stream.write_all(content)
}

#[test]
fn a_token_from_a_secret_pushes_over_https_style_authentication() {
    let server = GitHttp::start("kiln-bot", "t0ken-from-the-secret");
    common::git(
        server.root.path(),
        &["init", "-q", "--bare", "-b", "main", "fleet.git"],
    );
    common::git(
        &server.root.path().join("fleet.git"),
        &["config", "http.receivepack", "true"],
    );
    let url = format!("http://{}/fleet.git", server.addr);
    let scene = Scene::new("ctlhttp");
    let (_rows, _) = inline_configuration(&scene);
    apply(&format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: fleet-git, namespace: {}}}\n\
         stringData: {{username: kiln-bot, password: wrong}}\n",
        scene.namespace
    ));
    apply(&scene.pipeline(
        "main",
        &format!("{{git: {{url: \"{url}\", secretRef: {{name: fleet-git}}}}, apply: false}}"),
    ));
    let addr = free_addr();
    let mut controller = scene.controller(&addr, &[]);
    // A wrong token: refused by the server, said in the status, never shown.
    eventually("GitFailed", Duration::from_secs(60), || {
        scene.condition("main", "Ready") == ("False".into(), "GitFailed".into())
    });
    assert!(server.refused.load(std::sync::atomic::Ordering::SeqCst) > 0);
    let status = scene.status("main").to_string();
    assert!(!status.contains("wrong"), "{status}");
    // The right token, through the Secret: the watch on Secrets starts a
    // pass, which pushes.
    apply(&format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: fleet-git, namespace: {}}}\n\
         stringData: {{username: kiln-bot, password: t0ken-from-the-secret}}\n",
        scene.namespace
    ));
    eventually("Committed", Duration::from_secs(30), || {
        scene.condition("main", "Ready") == ("True".into(), "Committed".into())
    });
    let bare = server.root.path().join("fleet.git");
    let listed = common::git(&bare, &["ls-tree", "-r", "--name-only", "main"]);
    assert!(listed.contains("app/a/plan.yaml"), "{listed}");
    controller.terminate();
}

/// An SSH server on loopback that lets this test's user in with one key:
/// `sshd` run by the test (as whoever runs it), its host key and the
/// client's key made here.
struct SshServer {
    dir: tempfile::TempDir,
    port: u16,
    user: String,
    _process: Running,
}

impl SshServer {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = |name: &str| dir.path().join(name);
        for key in ["host", "client"] {
            let out = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(path(key))
                .output()
                .unwrap();
            assert!(out.status.success(), "ssh-keygen: {}", stderr(&out));
        }
        std::fs::copy(path("client.pub"), path("authorized_keys")).unwrap();
        let user = String::from_utf8(Command::new("id").arg("-un").output().unwrap().stdout)
            .unwrap()
            .trim()
            .to_string();
        let port: u16 = free_addr().rsplit(':').next().unwrap().parse().unwrap();
        std::fs::write(
            path("sshd_config"),
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {host}\nAuthorizedKeysFile {keys}\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n\
                 PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\nPidFile {pid}\n",
                host = path("host").display(),
                keys = path("authorized_keys").display(),
                pid = path("sshd.pid").display(),
            ),
        )
        .unwrap();
        // Run as root, sshd wants its privilege separation directory.
        let _ = std::fs::create_dir_all("/run/sshd");
        let mut process = Command::new("/usr/sbin/sshd");
        process.args(["-D", "-e", "-f"]).arg(path("sshd_config"));
        let process = listening(&mut process, port, "sshd");
        SshServer {
            dir,
            port,
            user,
            _process: process,
        }
    }

    /// `known_hosts` lines naming this server's host key.
    fn known_hosts(&self) -> String {
        let key = std::fs::read_to_string(self.dir.path().join("host.pub")).unwrap();
        let mut fields = key.split_whitespace();
        let (kind, data) = (fields.next().unwrap(), fields.next().unwrap());
        format!("[127.0.0.1]:{} {kind} {data}\n", self.port)
    }

    fn identity(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("client")).unwrap()
    }
}

#[test]
fn an_ssh_key_and_known_hosts_from_a_secret_push_over_ssh() {
    let server = SshServer::start();
    let repos = tempfile::tempdir().unwrap();
    common::git(
        repos.path(),
        &["init", "-q", "--bare", "-b", "main", "fleet.git"],
    );
    let bare = repos.path().join("fleet.git");
    let url = format!(
        "ssh://{}@127.0.0.1:{}{}",
        server.user,
        server.port,
        bare.display()
    );
    let scene = Scene::new("ctlssh");
    let (_rows, _) = inline_configuration(&scene);
    let secret = |known_hosts: &str| {
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: fleet-ssh, namespace: {}}}\nstringData:\n  identity: |\n{}  known_hosts: |\n{}",
            scene.namespace,
            indent(&server.identity(), 4),
            indent(known_hosts, 4)
        )
    };
    // A known_hosts that lists another key for this host: refused.
    let other = SshServer::start();
    let impostor = other
        .known_hosts()
        .replace(&format!(":{}", other.port), &format!(":{}", server.port));
    apply(&secret(&impostor));
    apply(&scene.pipeline(
        "main",
        &format!("{{git: {{url: \"{url}\", secretRef: {{name: fleet-ssh}}}}, apply: false}}"),
    ));
    let addr = free_addr();
    let mut controller = scene.controller(&addr, &[]);
    eventually("GitFailed", Duration::from_secs(60), || {
        scene.condition("main", "Ready") == ("False".into(), "GitFailed".into())
    });
    let message = scene.status("main")["conditions"][0]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(message.contains("known_hosts"), "{message}");
    // The server's own key: the pass pushes.
    apply(&secret(&server.known_hosts()));
    eventually("Committed", Duration::from_secs(30), || {
        scene.condition("main", "Ready") == ("True".into(), "Committed".into())
    });
    let listed = common::git(&bare, &["ls-tree", "-r", "--name-only", "main"]);
    assert!(listed.contains("app/a/plan.yaml"), "{listed}");
    controller.terminate();
}

/// A ServiceAccount of the scene's namespace that may manage ConfigMaps
/// there and nowhere else.
fn confined_account(scene: &Scene, name: &str) {
    apply(&format!(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: {name}, namespace: {ns}}}\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata: {{name: {name}, namespace: {ns}}}\n\
         rules:\n- {{apiGroups: [\"\"], resources: [configmaps], verbs: [get, list, watch, create, update, patch, delete]}}\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {{name: {name}, namespace: {ns}}}\n\
         roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: {name}}}\n\
         subjects:\n- {{kind: ServiceAccount, name: {name}, namespace: {ns}}}\n",
        ns = scene.namespace
    ));
}

#[test]
fn a_pipeline_acts_as_its_service_account_and_cannot_reach_beyond_it() {
    let scene = Scene::new("ctlsa");
    let elsewhere = kiln_testenv::unique_name("ctlsa-other");
    kubectl_ok(&["create", "namespace", &elsewhere]);
    confined_account(&scene, "deployer");
    let ns = &scene.namespace;
    let rows = |list: &[(&str, &str, &str)]| {
        list.iter()
            .map(|(id, plan, ns)| format!("- {{id: {id}, plan: {plan}, ns: {ns}}}\n"))
            .collect::<String>()
    };
    let (_dir, file) = file_configuration(
        &scene,
        "    template: |\n      apiVersion: v1\n      kind: ConfigMap\n      metadata: {name: \"plan-{{ key }}\", namespace: \"{{ row.ns }}\"}\n      data: {plan: \"{{ row.plan }}\"}\n",
    );
    std::fs::write(
        &file,
        rows(&[
            ("a", "gold", ns),
            ("b", "gold", &elsewhere),
            ("c", "gold", ns),
        ]),
    )
    .unwrap();
    let plan = |namespace: &str, name: &str| {
        get(namespace, "configmap", name).map(|c| c["data"]["plan"].as_str().unwrap().to_string())
    };

    // Without a ServiceAccount the Pipeline acts as the controller, which
    // may write anywhere.
    apply(&scene.pipeline("main", "{deletionGuard: {maxPercent: 50}}"));
    let addr = free_addr();
    let mut controller = scene.controller(&addr, &[]);
    eventually(
        "every object, elsewhere too",
        Duration::from_secs(60),
        || plan(&elsewhere, "plan-b").is_some() && scene.condition("main", "Ready").0 == "True",
    );

    // As `deployer`: its own namespace is written, the other refused by
    // the API server, with the verb, the resource and the account named.
    apply(&scene.pipeline(
        "main",
        "{deletionGuard: {maxPercent: 50}, serviceAccountName: deployer}",
    ));
    std::fs::write(
        &file,
        rows(&[
            ("a", "silver", ns),
            ("b", "silver", &elsewhere),
            ("c", "silver", ns),
        ]),
    )
    .unwrap();
    eventually("ApplyFailed", Duration::from_secs(60), || {
        scene.condition("main", "Ready") == ("False".into(), "ApplyFailed".into())
            && plan(ns, "plan-a").as_deref() == Some("silver")
    });
    let message = scene.status("main")["conditions"][0]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        message.contains(&format!("system:serviceaccount:{ns}:deployer"))
            && message.contains("cannot patch resource \"configmaps\"")
            && message.contains(&elsewhere),
        "{message}"
    );
    assert_eq!(plan(ns, "plan-c").as_deref(), Some("silver"));
    assert_eq!(
        plan(&elsewhere, "plan-b").as_deref(),
        Some("gold"),
        "nothing written outside the account's rights"
    );

    // The row leaves: pruning it is beyond the account's rights too.
    std::fs::write(&file, rows(&[("a", "silver", ns), ("c", "silver", ns)])).unwrap();
    scene.passes("main", 2);
    assert_eq!(
        plan(&elsewhere, "plan-b").as_deref(),
        Some("gold"),
        "nothing deleted outside the account's rights"
    );
    let message = scene.status("main")["conditions"][0]["message"]
        .as_str()
        .unwrap()
        .to_string();
    // Prune reads the object before deleting it: the read is refused.
    assert!(
        message.contains(&format!("{elsewhere}/plan-b"))
            && message.contains("cannot get resource \"configmaps\""),
        "{message}"
    );
    controller.terminate();

    // A controller that requires a ServiceAccount refuses a Pipeline
    // without one; a default account makes it act as that one.
    kubectl_ok(&[
        "patch",
        "pipeline.kiln.dev",
        "main",
        "-n",
        ns,
        "--type=json",
        "-p",
        r#"[{"op": "remove", "path": "/spec/serviceAccountName"}]"#,
    ]);
    let mut controller = scene.controller(&free_addr(), &["--require-service-account"]);
    eventually("ServiceAccountRequired", Duration::from_secs(60), || {
        scene.condition("main", "Stalled") == ("True".into(), "ServiceAccountRequired".into())
    });
    controller.terminate();
    let mut controller = scene.controller(
        &free_addr(),
        &[
            "--require-service-account",
            "--default-service-account",
            "deployer",
        ],
    );
    eventually(
        "acting as the default account",
        Duration::from_secs(60),
        || {
            let status = scene.status("main");
            status["conditions"][0]["message"]
                .as_str()
                .is_some_and(|m| m.contains(&format!("system:serviceaccount:{ns}:deployer")))
        },
    );
    assert!(plan(&elsewhere, "plan-b").is_some());
    controller.terminate();
    let _ = kubectl(&["delete", "namespace", &elsewhere, "--wait=false"]);
}
