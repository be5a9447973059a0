//! `kiln apply`, `kiln drift --cluster` and `kiln sync` against the test
//! environment's API server: waves, managed fields, policies one by one,
//! readiness, conflicts, prune and Retain, drift, and the loop putting an
//! out-of-band edit back.

#![allow(clippy::unwrap_used)] // a test that cannot go on fails, with the cause

mod common;

use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::time::Duration;

use common::{
    Running, eventually, free_addr, has_count, http_get, kiln, kubectl, metric, postgres, sql,
    stderr, stdout,
};
use serde_json::Value;

/// A configuration with one file source and one blueprint `app`, whose
/// instances live in namespaces `<prefix>-<key>`.
struct Fixture {
    dir: tempfile::TempDir,
    prefix: String,
}

impl Fixture {
    fn new(hint: &str, rows: &str, resources: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let prefix = kiln_testenv::unique_name(hint);
        std::fs::create_dir_all(dir.path().join("cfg")).unwrap();
        let fixture = Self { dir, prefix };
        fixture.rows(rows);
        fixture.resources(resources);
        fixture
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn rows(&self, rows: &str) {
        std::fs::write(self.path("rows.yaml"), rows).unwrap();
    }

    /// Replaces the blueprint's resources; `NS` in them is the namespace
    /// template.
    fn resources(&self, resources: &str) {
        let config = format!(
            "apiVersion: kiln.dev/v1alpha1\nkind: Source\nmetadata: {{name: rows}}\n\
             spec: {{url: \"file:../rows.yaml\", key: id, interval: 1s}}\n---\n\
             apiVersion: kiln.dev/v1alpha1\nkind: Blueprint\nmetadata: {{name: app}}\n\
             spec:\n  source: rows\n  namespace: \"{p}-{{{{ key }}}}\"\n  resources:\n{resources}",
            p = self.prefix
        )
        .replace("NS", &format!("{}-{{{{ key }}}}", self.prefix));
        std::fs::write(self.path("cfg/kiln.yaml"), config).unwrap();
    }

    fn ns(&self, key: &str) -> String {
        format!("{}-{key}", self.prefix)
    }

    fn render(&self) {
        let out = kiln(&[
            "render",
            "-f",
            self.path("cfg").to_str().unwrap(),
            "--out",
            self.path("out").to_str().unwrap(),
            "--allow-mass-delete",
        ]);
        assert!(out.status.success(), "render: {}", stderr(&out));
    }

    fn cluster_args(&self) -> Vec<String> {
        let cluster = kiln_testenv::cluster();
        vec![
            "--kubeconfig".into(),
            cluster.kubeconfig.display().to_string(),
            "--inventory".into(),
            self.prefix.clone(),
        ]
    }

    fn apply(&self, extra: &[&str]) -> Output {
        let mut args: Vec<String> = vec![
            "apply".into(),
            "--dir".into(),
            self.path("out").display().to_string(),
        ];
        args.extend(self.cluster_args());
        args.extend(extra.iter().map(|s| s.to_string()));
        kiln(&args.iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// `spawn`, logging at info into a file; returns the process and a
    /// reader of what it logged so far.
    fn spawn_logged(
        &self,
        command: &str,
        extra: &[&str],
    ) -> (Running, impl Fn() -> String + use<>) {
        let log = self.path(&format!("{command}.log"));
        let mut cmd = common::kiln_command();
        cmd.arg(command);
        if command == "apply" {
            cmd.arg("--dir").arg(self.path("out"));
        } else {
            cmd.arg("-f").arg(self.path("cfg"));
        }
        let running = cmd
            .args(self.cluster_args())
            .args(extra)
            .env("KILN_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .map(Running::new)
            .unwrap();
        (running, move || {
            std::fs::read_to_string(&log).unwrap_or_default()
        })
    }

    fn spawn(&self, command: &str, extra: &[&str]) -> Running {
        let mut cmd = common::kiln_command();
        cmd.arg(command);
        if command == "apply" {
            cmd.arg("--dir").arg(self.path("out"));
        } else {
            cmd.arg("-f").arg(self.path("cfg"));
        }
        cmd.args(self.cluster_args())
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map(Running::new)
            .unwrap()
    }
}

fn kubectl_ok(args: &[&str]) {
    let out = kubectl(args);
    assert!(out.status.success(), "kubectl {args:?}: {}", stderr(&out));
}

/// The live object, if it exists.
fn get(namespace: &str, kind: &str, name: &str) -> Option<Value> {
    let mut args = vec!["get", kind, name, "-o", "json", "--show-managed-fields"];
    if !namespace.is_empty() {
        args.extend(["-n", namespace]);
    }
    let out = kubectl(&args);
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).unwrap())
}

fn finish(mut child: Running) -> Output {
    child.wait()
}

fn rv(object: &Value) -> u64 {
    object["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

const NAMESPACE: &str = "  - id: namespace\n    template: |\n      apiVersion: v1\n      kind: Namespace\n      metadata: {name: \"NS\"}\n";

fn config_map(id: &str, name: &str, extra: &str, data: &str) -> String {
    format!(
        "  - id: {id}\n{extra}    template: |\n      apiVersion: v1\n      kind: ConfigMap\n      metadata: {{name: {name}}}\n      data: {data}\n"
    )
}

fn deployment(extra: &str, replicas: u32) -> String {
    format!(
        "  - id: app\n{extra}    template: |\n      apiVersion: apps/v1\n      kind: Deployment\n      metadata: {{name: app}}\n      spec:\n        replicas: {replicas}\n        selector: {{matchLabels: {{app: web}}}}\n        template:\n          metadata: {{labels: {{app: web}}}}\n          spec: {{containers: [{{name: web, image: nginx}}]}}\n"
    )
}

#[test]
fn apply_goes_wave_by_wave_with_kiln_as_field_manager_and_records_an_inventory() {
    let resources = [
        NAMESPACE.to_string(),
        config_map(
            "config",
            "config",
            "    dependsOn: [namespace]\n",
            "{greeting: \"{{ row.greeting }}\"}",
        ),
        deployment("    dependsOn: [config]\n", 0),
        config_map("after", "after", "    dependsOn: [app]\n", "{}"),
    ]
    .concat();
    let f = Fixture::new("waves", "- {id: a, greeting: hello}\n", &resources);
    f.render();

    let plan = f.apply(&["--dry-run", "--format", "json"]);
    assert!(plan.status.success(), "{}", stderr(&plan));
    let plan: Value = serde_json::from_slice(&plan.stdout).unwrap();
    let waves: Vec<(u64, &str)> = plan["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["wave"].as_u64().unwrap(), s["action"].as_str().unwrap()))
        .collect();
    assert_eq!(
        waves,
        [(0, "create"), (1, "create"), (2, "create"), (3, "create")]
    );
    let ns = f.ns("a");
    assert!(get("", "namespace", &ns).is_none(), "--dry-run wrote");

    let out = f.apply(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        has_count(&stderr(&out), "applied", 4) && has_count(&stderr(&out), "created", 4),
        "{}",
        stderr(&out)
    );
    // Each wave was written after the one before: etcd revisions grow.
    let revisions = [
        rv(&get("", "namespace", &ns).unwrap()),
        rv(&get(&ns, "configmap", "config").unwrap()),
        rv(&get(&ns, "deployment", "app").unwrap()),
        rv(&get(&ns, "configmap", "after").unwrap()),
    ];
    assert!(revisions.is_sorted(), "{revisions:?}");

    let live = get(&ns, "configmap", "config").unwrap();
    let managers: Vec<(&str, &str)> = live["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["manager"].as_str().unwrap(),
                m["operation"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(managers, [("kiln", "Apply")]);
    assert!(live["metadata"]["managedFields"][0]["fieldsV1"]["f:data"]["f:greeting"].is_object());
    assert_eq!(
        live["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "kiln"
    );

    let inventory = kubectl(&[
        "get",
        "configmaps",
        "-n",
        "kiln-system",
        "-l",
        &format!("kiln.dev/inventory-of={}", f.prefix),
        "-o",
        "json",
    ]);
    let inventory: Value = serde_json::from_slice(&inventory.stdout).unwrap();
    let entries = inventory["items"][0]["data"]["entries"].as_str().unwrap();
    assert_eq!(entries.lines().count(), 4, "{entries}");
    assert!(
        entries.contains(&format!(
            "apps\tv1\tDeployment\t{ns}\tapp\tapp\ta\tapp\t2\tDelete"
        )),
        "{entries}"
    );

    let again = f.apply(&["--dry-run"]);
    assert!(stdout(&again).is_empty(), "{}", stdout(&again));
    assert!(
        has_count(&stderr(&again), "unchanged", 4),
        "{}",
        stderr(&again)
    );
}

#[test]
fn creation_once_merge_and_replace_do_what_they_say() {
    let data = "{greeting: \"{{ row.greeting }}\"}";
    let resources = [
        NAMESPACE.to_string(),
        config_map(
            "once",
            "once",
            "    dependsOn: [namespace]\n    creationPolicy: Once\n",
            data,
        ),
        config_map(
            "merged",
            "merged",
            "    dependsOn: [namespace]\n    patchStrategy: merge\n",
            data,
        ),
        config_map(
            "replaced",
            "replaced",
            "    dependsOn: [namespace]\n    patchStrategy: replace\n",
            data,
        ),
    ]
    .concat();
    let f = Fixture::new("policies", "- {id: a, greeting: hello}\n", &resources);
    f.render();
    let out = f.apply(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let ns = f.ns("a");
    for name in ["merged", "replaced"] {
        kubectl_ok(&[
            "patch",
            "configmap",
            name,
            "-n",
            &ns,
            "--type=merge",
            "-p",
            r#"{"data":{"extra":"theirs"}}"#,
        ]);
    }
    f.rows("- {id: a, greeting: goodbye}\n");
    f.render();
    let out = f.apply(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("skipped ConfigMap"),
        "{}",
        stdout(&out)
    );

    let data = |name: &str| get(&ns, "configmap", name).unwrap()["data"].clone();
    assert_eq!(data("once")["greeting"], "hello", "Once must never update");
    assert_eq!(data("merged")["greeting"], "goodbye");
    assert_eq!(
        data("merged")["extra"],
        "theirs",
        "a merge patch keeps what it does not name"
    );
    assert_eq!(data("replaced")["greeting"], "goodbye");
    assert!(
        data("replaced")["extra"].is_null(),
        "replace puts the whole object"
    );
}

#[test]
fn a_conflicting_manager_fails_the_resource_and_its_dependents_unless_forced() {
    let resources = |policy: &str| {
        [
            NAMESPACE.to_string(),
            config_map(
                "taken",
                "taken",
                &format!("    dependsOn: [namespace]\n{policy}"),
                "{greeting: ours}",
            ),
            config_map("dependent", "dependent", "    dependsOn: [taken]\n", "{}"),
        ]
        .concat()
    };
    let f = Fixture::new("conflict", "- {id: a}\n", &resources(""));
    let ns = f.ns("a");
    kubectl_ok(&["create", "namespace", &ns]);
    kubectl_ok(&[
        "create",
        "configmap",
        "taken",
        "-n",
        &ns,
        "--from-literal=greeting=theirs",
    ]);
    f.render();

    let out = f.apply(&[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let report = stdout(&out);
    assert!(report.contains("failed ConfigMap"), "{report}");
    assert!(
        report.contains("conflict")
            && report.contains("kubectl-create")
            && report.contains(".data.greeting"),
        "{report}"
    );
    assert!(
        report.contains("skipped ConfigMap") && report.contains("dependent"),
        "{report}"
    );
    assert_eq!(
        get(&ns, "configmap", "taken").unwrap()["data"]["greeting"],
        "theirs"
    );
    assert!(get(&ns, "configmap", "dependent").is_none());

    f.resources(&resources("    conflictPolicy: Force\n"));
    f.render();
    let out = f.apply(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        get(&ns, "configmap", "taken").unwrap()["data"]["greeting"],
        "ours"
    );
    assert!(get(&ns, "configmap", "dependent").is_some());
}

fn ready_fixture(hint: &str, timeout: &str) -> Fixture {
    let resources = [
        NAMESPACE.to_string(),
        deployment(
            &format!(
                "    dependsOn: [namespace]\n    waitForReady: true\n    timeout: {timeout}\n"
            ),
            1,
        ),
        config_map("after", "after", "    dependsOn: [app]\n", "{}"),
    ]
    .concat();
    let f = Fixture::new(hint, "- {id: a}\n", &resources);
    f.render();
    f
}

#[test]
fn wait_for_ready_holds_dependents_until_the_deployment_is_available() {
    let f = ready_fixture("ready", "2m");
    let ns = f.ns("a");
    let (apply, logged) = f.spawn_logged("apply", &[]);
    eventually(
        "the wait for the deployment",
        Duration::from_secs(30),
        || {
            logged().lines().any(|l| {
                l.contains("waiting for readiness before its dependents")
                    && l.contains("Deployment")
            })
        },
    );
    assert!(
        get(&ns, "configmap", "after").is_none(),
        "a dependent went ahead of an unready deployment"
    );
    // No controller runs in the test cluster: say what it would.
    kubectl_ok(&[
        "patch",
        "deployment",
        "app",
        "-n",
        &ns,
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"observedGeneration":1,"replicas":1,"updatedReplicas":1,"readyReplicas":1,"availableReplicas":1}}"#,
    ]);
    let out = finish(apply);
    assert!(out.status.success(), "{}", logged());
    assert!(get(&ns, "configmap", "after").is_some());
}

const READY: &str = r#"{"status":{"observedGeneration":1,"replicas":1,"updatedReplicas":1,"readyReplicas":1,"availableReplicas":1}}"#;

/// Says, as a controller would, that the instance's Deployment is
/// available, once it exists.
fn make_ready(ns: &str) {
    eventually("the deployment to exist", Duration::from_secs(30), || {
        kubectl(&[
            "patch",
            "deployment",
            "app",
            "-n",
            ns,
            "--subresource=status",
            "--type=merge",
            "-p",
            READY,
        ])
        .status
        .success()
    });
}

#[test]
fn one_instance_waiting_for_readiness_does_not_hold_back_the_others() {
    let resources = [
        NAMESPACE.to_string(),
        deployment(
            "    dependsOn: [namespace]\n    waitForReady: true\n    timeout: 2m\n",
            1,
        ),
        config_map("after", "after", "    dependsOn: [app]\n", "{}"),
    ]
    .concat();
    let f = Fixture::new("perinstance", "- {id: slow}\n- {id: quick}\n", &resources);
    f.render();
    let (slow, quick) = (f.ns("slow"), f.ns("quick"));
    let (mut apply, logged) = f.spawn_logged("apply", &[]);
    make_ready(&quick);
    // Seen from the API server: the quick instance's dependent is written
    // while the slow one's Deployment is still unready and the apply runs.
    eventually(
        "the quick instance's dependent",
        Duration::from_secs(30),
        || get(&quick, "configmap", "after").is_some(),
    );
    assert!(apply.still_running(), "the apply ended early: {}", logged());
    assert!(
        get(&slow, "configmap", "after").is_none(),
        "a dependent went ahead of its unready deployment"
    );
    make_ready(&slow);
    let out = finish(apply);
    assert!(out.status.success(), "{}", logged());
    assert!(get(&slow, "configmap", "after").is_some());
}

/// A Namespace, a ConfigMap `old` (with `old`) that a later tree renames
/// away, and a ConfigMap `taken` whose greeting someone else may take
/// (`force` takes it back).
fn rename_resources(old: bool, force: bool, greeting: &str) -> String {
    let mut r = NAMESPACE.to_string();
    if old {
        r.push_str(&config_map(
            "old",
            "old",
            "    dependsOn: [namespace]\n",
            "{a: b}",
        ));
    }
    let policy = if force {
        "    conflictPolicy: Force\n"
    } else {
        ""
    };
    r.push_str(&config_map(
        "taken",
        "taken",
        &format!("    dependsOn: [namespace]\n{policy}"),
        &format!("{{greeting: {greeting}}}"),
    ));
    r
}

#[test]
fn a_removed_instance_is_pruned_while_another_is_in_conflict() {
    let f = Fixture::new(
        "pruneothers",
        "- {id: gone}\n- {id: fine}\n- {id: stuck}\n",
        &rename_resources(true, false, "ours"),
    );
    f.render();
    let out = f.apply(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (gone, fine, stuck) = (f.ns("gone"), f.ns("fine"), f.ns("stuck"));
    // Someone else takes a field of one tenant: Kiln's next write conflicts.
    kubectl_ok(&[
        "patch",
        "configmap",
        "taken",
        "-n",
        &stuck,
        "--type=merge",
        "-p",
        r#"{"data":{"greeting":"theirs"}}"#,
    ]);
    // One tenant leaves the table; every tenant renames `old` away.
    f.rows("- {id: fine}\n- {id: stuck}\n");
    f.resources(&rename_resources(false, false, "ours again"));
    f.render();
    let out = f.apply(&["--allow-mass-delete"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let report = stdout(&out);
    assert!(
        report.contains(&format!("failed ConfigMap {stuck}/taken")),
        "{report}"
    );
    // The deleted tenant is pruned, and so is the healthy tenant's rename.
    assert!(get(&gone, "configmap", "taken").is_none(), "{report}");
    assert!(get(&gone, "configmap", "old").is_none(), "{report}");
    assert!(
        get("", "namespace", &gone).is_none_or(|ns| !ns["metadata"]["deletionTimestamp"].is_null()),
        "the deleted tenant's namespace stays"
    );
    assert!(get(&fine, "configmap", "old").is_none(), "{report}");
    // The stuck tenant keeps what left its tree: it may be half a rename.
    assert!(get(&stuck, "configmap", "old").is_some(), "{report}");
    let summary = stderr(&out);
    assert!(
        summary.contains(
            "1 objects that left the tree are kept until their instances apply cleanly (app/stuck)"
        ),
        "{summary}"
    );
    assert!(has_count(&summary, "pruned", 4), "{summary}");
    // Once it applies cleanly, its prune goes through.
    f.resources(&rename_resources(false, true, "ours again"));
    f.render();
    let out = f.apply(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(has_count(&stderr(&out), "pruned", 1), "{}", stderr(&out));
    assert!(get(&stuck, "configmap", "old").is_none());
}

/// The trigger the README gives: one notification per statement that
/// changes the table.
const NOTIFY_TRIGGER: &str = "CREATE FUNCTION kiln_notify() RETURNS trigger LANGUAGE plpgsql AS $$ \
     BEGIN PERFORM pg_notify(TG_ARGV[0], ''); RETURN NULL; END $$; \
     CREATE TRIGGER tenants_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON tenants \
     FOR EACH STATEMENT EXECUTE FUNCTION kiln_notify('tenants_changed');";

#[test]
fn a_postgres_notification_reads_the_source_at_once_even_after_a_lost_connection() {
    let url = postgres("notify");
    sql(
        &url,
        &format!(
            "CREATE TABLE tenants (id text PRIMARY KEY, greeting text NOT NULL); \
             INSERT INTO tenants VALUES ('a', 'hello'); {NOTIFY_TRIGGER}"
        ),
    );
    let f = Fixture::new("notify", "[]", "");
    // Polled once an hour: only a notification can bring a change sooner.
    let config = format!(
        "apiVersion: kiln.dev/v1alpha1\nkind: Source\nmetadata: {{name: tenants}}\n\
         spec:\n  url: \"{url}\"\n  query: SELECT id, greeting FROM tenants\n  key: id\n  interval: 1h\n  notify: {{channel: tenants_changed}}\n---\n\
         apiVersion: kiln.dev/v1alpha1\nkind: Blueprint\nmetadata: {{name: app}}\n\
         spec:\n  source: tenants\n  namespace: \"NS\"\n  resources:\n{}{}",
        NAMESPACE,
        config_map(
            "greeting",
            "greeting",
            "    dependsOn: [namespace]\n",
            "{greeting: \"{{ row.greeting }}\"}"
        ),
    )
    .replace("NS", &format!("{}-{{{{ key }}}}", f.prefix));
    std::fs::write(f.path("cfg/kiln.yaml"), config).unwrap();
    let ns = f.ns("a");
    let greeting = || {
        get(&ns, "configmap", "greeting")
            .map(|c| c["data"]["greeting"].as_str().unwrap().to_string())
    };
    let (mut sync, logged) = f.spawn_logged("sync", &[]);
    let listening = || logged().matches("listening for notifications").count();
    eventually("the first pass", Duration::from_secs(30), || {
        greeting().as_deref() == Some("hello") && listening() == 1
    });
    sql(
        &url,
        "UPDATE tenants SET greeting = 'bonjour' WHERE id = 'a'",
    );
    eventually("the notified change", Duration::from_secs(5), || {
        greeting().as_deref() == Some("bonjour")
    });
    // The connection goes: what is sent meanwhile is lost, so Kiln reads
    // the source as soon as it listens again.
    sql(
        &url,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND query LIKE 'LISTEN%'; \
         UPDATE tenants SET greeting = 'hola' WHERE id = 'a';",
    );
    eventually("listening again", Duration::from_secs(15), || {
        listening() == 2
    });
    eventually("the change made while away", Duration::from_secs(5), || {
        greeting().as_deref() == Some("hola")
    });
    sql(&url, "UPDATE tenants SET greeting = 'ciao' WHERE id = 'a'");
    eventually(
        "a change notified after reconnecting",
        Duration::from_secs(5),
        || greeting().as_deref() == Some("ciao"),
    );
    let out = sync.terminate();
    assert!(out.status.success(), "{}", logged());
    assert!(
        !logged().contains(url.split('@').next().unwrap()),
        "the URL's password was logged"
    );
}

#[test]
fn a_readiness_timeout_fails_the_resource_and_skips_its_dependents() {
    let f = ready_fixture("timeout", "2s");
    let out = f.apply(&[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let report = stdout(&out);
    assert!(
        report.contains("not ready after 2s: 0 of 1 replicas"),
        "{report}"
    );
    assert!(
        report.contains("skipped ConfigMap") && report.contains("after"),
        "{report}"
    );
    assert!(
        has_count(&stderr(&out), "failed", 1) && has_count(&stderr(&out), "skipped", 1),
        "{}",
        stderr(&out)
    );
    assert!(get(&f.ns("a"), "configmap", "after").is_none());
}

#[test]
fn custom_resources_wait_for_their_crd_and_their_ready_condition() {
    let f = Fixture::new("crd", "- {id: a}\n", "");
    let group = format!("{}.example.com", f.prefix);
    let crd = format!(
        "  - id: crd\n    template: |\n      apiVersion: apiextensions.k8s.io/v1\n      kind: CustomResourceDefinition\n      metadata: {{name: widgets.{group}}}\n      spec:\n        group: {group}\n        scope: Namespaced\n        names: {{kind: Widget, plural: widgets, singular: widget}}\n        versions:\n        - name: v1\n          served: true\n          storage: true\n          subresources: {{status: {{}}}}\n          schema:\n            openAPIV3Schema:\n              type: object\n              x-kubernetes-preserve-unknown-fields: true\n"
    );
    let widget = format!(
        "  - id: widget\n    waitForReady: true\n    timeout: 2m\n    template: |\n      apiVersion: {group}/v1\n      kind: Widget\n      metadata: {{name: w}}\n      spec: {{size: 1}}\n"
    );
    let resources = [
        crd,
        NAMESPACE.to_string(),
        widget,
        config_map("after", "after", "    dependsOn: [widget]\n", "{}"),
    ]
    .concat();
    f.resources(&resources);
    f.render();
    let ns = f.ns("a");
    let widgets = format!("widgets.{group}");
    let (apply, logged) = f.spawn_logged("apply", &[]);
    eventually("the wait for the widget", Duration::from_secs(60), || {
        logged().lines().any(|l| {
            l.contains("waiting for readiness before its dependents") && l.contains("Widget")
        })
    });
    assert!(get(&ns, &widgets, "w").is_some());
    assert!(
        get(&ns, "configmap", "after").is_none(),
        "a dependent went ahead of an unready widget"
    );
    kubectl_ok(&[
        "patch",
        &widgets,
        "w",
        "-n",
        &ns,
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"conditions":[{"type":"Ready","status":"True"}]}}"#,
    ]);
    let out = finish(apply);
    assert!(out.status.success(), "{}", logged());
    assert!(get(&ns, "configmap", "after").is_some());
}

#[test]
fn prune_deletes_what_left_the_tree_retains_what_says_so_and_adopts_it_back() {
    let resources = [
        NAMESPACE.replace(
            "  - id: namespace\n",
            "  - id: namespace\n    deletionPolicy: Retain\n",
        ),
        config_map("config", "config", "    dependsOn: [namespace]\n", "{}"),
        config_map(
            "keep",
            "keep",
            "    dependsOn: [namespace]\n    deletionPolicy: Retain\n",
            "{}",
        ),
    ]
    .concat();
    let f = Fixture::new("prune", "- {id: a}\n- {id: b}\n", &resources);
    f.render();
    let out = f.apply(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let b = f.ns("b");
    // Labelled as Kiln's, but never applied by this inventory: never deleted.
    kubectl_ok(&["create", "configmap", "stranger", "-n", &b]);
    kubectl_ok(&[
        "label",
        "configmap",
        "stranger",
        "-n",
        &b,
        "app.kubernetes.io/managed-by=kiln",
        "kiln.dev/instance=b",
    ]);

    // Someone else manages a field of the object Retain keeps: after
    // the orphaning, theirs is the only entry left.
    kubectl_ok(&["label", "configmap", "keep", "-n", &b, "team=payments"]);

    f.rows("- {id: a}\n");
    f.render();
    let plan = f.apply(&["--dry-run", "--allow-mass-delete"]);
    assert!(
        stdout(&plan).contains(&format!("prune ConfigMap {b}/config")),
        "{}",
        stdout(&plan)
    );
    // Half the inventory's instances: the deletion guard refuses, in one
    // line, and writes nothing.
    let out = f.apply(&[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let line = stderr(&out);
    assert!(
        line.contains(&format!(
            "inventory {}: refusing to remove 1 of 2 instances",
            f.prefix
        )) && line.contains("app/b")
            && line.contains("--allow-mass-delete"),
        "{line}"
    );
    assert_eq!(line.trim().lines().count(), 1, "{line}");
    assert!(get(&b, "configmap", "config").is_some());
    let out = f.apply(&["--allow-mass-delete"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        has_count(&stderr(&out), "pruned", 1) && has_count(&stderr(&out), "orphaned", 2),
        "{}",
        stderr(&out)
    );
    assert!(get(&b, "configmap", "config").is_none());
    assert!(get(&b, "configmap", "stranger").is_some());
    assert!(get(&f.ns("a"), "configmap", "config").is_some());
    let kept = get(&b, "configmap", "keep").unwrap();
    let meta = &kept["metadata"];
    for label in [
        "app.kubernetes.io/managed-by",
        "kiln.dev/blueprint",
        "kiln.dev/instance",
        "kiln.dev/inventory",
    ] {
        assert!(
            meta["labels"][label].is_null(),
            "{label} left on an orphan: {meta}"
        );
    }
    assert_eq!(meta["labels"]["kiln.dev/orphaned"], "true");
    assert!(
        meta["annotations"]["kiln.dev/orphaned-at"]
            .as_str()
            .unwrap()
            .ends_with('Z')
    );
    assert!(
        meta["annotations"]["kiln.dev/orphaned-reason"]
            .as_str()
            .unwrap()
            .contains("instance b, resource keep")
    );
    let namespace = get("", "namespace", &b).expect("a retained Namespace was deleted");
    assert_eq!(namespace["metadata"]["labels"]["kiln.dev/orphaned"], "true");
    let managers = meta["managedFields"]
        .as_array()
        .expect("the server lists managedFields");
    assert!(
        managers.iter().any(|m| m["manager"] == "kubectl-label"),
        "{meta}"
    );
    assert_eq!(meta["labels"]["team"], "payments");
    assert!(
        !managers.iter().any(|m| m["manager"] == "kiln"),
        "Kiln still owns fields of an orphan: {meta}"
    );

    f.rows("- {id: a}\n- {id: b}\n");
    f.render();
    let out = f.apply(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    for (kind, name) in [("configmap", "keep"), ("namespace", b.as_str())] {
        let adopted = get(if kind == "namespace" { "" } else { &b }, kind, name).unwrap();
        let meta = &adopted["metadata"];
        assert_eq!(
            meta["labels"]["app.kubernetes.io/managed-by"], "kiln",
            "{meta}"
        );
        assert_eq!(
            meta["labels"]["kiln.dev/inventory"],
            f.prefix.as_str(),
            "{meta}"
        );
        assert!(meta["labels"]["kiln.dev/orphaned"].is_null(), "{meta}");
        assert!(
            meta["annotations"]["kiln.dev/orphaned-at"].is_null(),
            "{meta}"
        );
        assert!(
            meta["annotations"]["kiln.dev/orphaned-reason"].is_null(),
            "{meta}"
        );
    }
}

#[test]
fn drift_cluster_reports_edits_to_managed_fields_but_not_ignored_ones() {
    let resources = [
        NAMESPACE.to_string(),
        config_map(
            "config",
            "config",
            "    dependsOn: [namespace]\n",
            "{greeting: hello}",
        ),
        deployment(
            "    dependsOn: [namespace]\n    ignoreFields: [/spec/replicas]\n",
            0,
        ),
    ]
    .concat();
    let f = Fixture::new("drift", "- {id: a}\n", &resources);
    f.render();
    assert!(f.apply(&[]).status.success());
    let drift = |extra: &[&str]| {
        let mut args: Vec<String> = vec![
            "drift".into(),
            "--cluster".into(),
            "--dir".into(),
            f.path("out").display().to_string(),
            "--exit-code".into(),
        ];
        args.extend(f.cluster_args());
        args.extend(extra.iter().map(|s| s.to_string()));
        kiln(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let out = drift(&[]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );

    let ns = f.ns("a");
    kubectl_ok(&["scale", "deployment", "app", "-n", &ns, "--replicas=3"]);
    let out = drift(&[]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "an ignored field drifted: {}",
        stdout(&out)
    );

    kubectl_ok(&[
        "patch",
        "configmap",
        "config",
        "-n",
        &ns,
        "--type=merge",
        "-p",
        r#"{"data":{"greeting":"edited","extra":"theirs"}}"#,
    ]);
    let out = drift(&[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let diff = stdout(&out);
    assert!(
        diff.contains("-  greeting: edited") && diff.contains("+  greeting: hello"),
        "{diff}"
    );
    assert!(
        !diff
            .lines()
            .any(|l| (l.starts_with('-') || l.starts_with('+')) && l.contains("extra")),
        "a field Kiln does not set is not drift: {diff}"
    );

    kubectl_ok(&["delete", "deployment", "app", "-n", &ns]);
    let out = drift(&["--format", "json"]);
    assert_eq!(out.status.code(), Some(1));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let statuses: Vec<&str> = report["objects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["missing", "changed"], "{report}");
}

/// Edits the greeting of ConfigMap `config` in `namespace` by hand.
fn edit_greeting(namespace: &str) {
    kubectl_ok(&[
        "patch",
        "configmap",
        "config",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        r#"{"data":{"greeting":"edited"}}"#,
    ]);
}

/// A Namespace and a ConfigMap `config` saying the row's greeting.
fn greeting_from_rows() -> String {
    [
        NAMESPACE.to_string(),
        config_map(
            "config",
            "config",
            "    dependsOn: [namespace]\n",
            "{greeting: \"{{ row.greeting }}\"}",
        ),
    ]
    .concat()
}

/// A Namespace and a ConfigMap `config` saying hello.
fn greeting_resources() -> String {
    [
        NAMESPACE.to_string(),
        config_map(
            "config",
            "config",
            "    dependsOn: [namespace]\n",
            "{greeting: hello}",
        ),
    ]
    .concat()
}

/// SIGTERM to a running `kiln sync`, which must exit 0; its output.
fn stop(mut sync: Running) -> Output {
    let out = sync.terminate();
    assert!(out.status.success(), "{}", stderr(&out));
    out
}

#[test]
fn sync_puts_an_out_of_band_edit_back_serves_metrics_and_stops_on_sigterm() {
    let resources = greeting_resources();
    let f = Fixture::new("sync", "- {id: a}\n", &resources);
    let addr = free_addr();
    let sync = f.spawn("sync", &["--metrics-addr", &addr]);
    let ns = f.ns("a");
    let greeting = || get(&ns, "configmap", "config").map(|c| c["data"]["greeting"].clone());
    eventually("the first sync", Duration::from_secs(60), || {
        greeting().is_some()
    });
    eventually("readiness", Duration::from_secs(30), || {
        http_get(&addr, "/readyz").starts_with("HTTP/1.1 200")
    });

    edit_greeting(&ns);
    eventually("the edit put back", Duration::from_secs(30), || {
        greeting() == Some("hello".into())
    });

    // The counter is updated when the pass ends, just after the write.
    eventually("the correction counted", Duration::from_secs(10), || {
        metric(&addr, "kiln_objects_corrected_total") == Some(1.0)
    });
    assert_eq!(
        metric(&addr, "kiln_source_rows{source=\"rows\"}"),
        Some(1.0)
    );
    assert!(metric(&addr, "kiln_apply_duration_seconds_count").unwrap_or(0.0) >= 1.0);
    assert!(http_get(&addr, "/healthz").starts_with("HTTP/1.1 200"));

    // A source that fails keeps the last desired state and prunes nothing.
    std::fs::remove_file(f.path("rows.yaml")).unwrap();
    eventually("a source error", Duration::from_secs(30), || {
        metric(&addr, "kiln_source_errors_total{source=\"rows\"}").unwrap_or(0.0) >= 1.0
    });
    more_passes(&addr, 2);
    assert!(greeting().is_some(), "a failing source pruned");

    let out = stop(sync);
    assert!(
        stdout(&out).contains("corrected ConfigMap"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn readiness_waits_for_a_good_pass_and_every_documented_metric_is_served() {
    let f = Fixture::new("ready", "- {id: a}\n", &greeting_resources());
    // The source cannot be read yet: nothing is applied, and the loop is
    // alive but not ready.
    std::fs::remove_file(f.path("rows.yaml")).unwrap();
    let addr = free_addr();
    let sync = f.spawn("sync", &["--metrics-addr", &addr]);
    eventually("a failed read", Duration::from_secs(30), || {
        metric(&addr, "kiln_source_errors_total{source=\"rows\"}").unwrap_or(0.0) >= 1.0
    });
    assert!(http_get(&addr, "/healthz").starts_with("HTTP/1.1 200"));
    let not_ready = http_get(&addr, "/readyz");
    assert!(not_ready.starts_with("HTTP/1.1 503"), "{not_ready}");
    assert_eq!(
        metric(&addr, "kiln_apply_duration_seconds_count").unwrap_or(0.0),
        0.0,
        "nothing was applied"
    );

    f.rows("- {id: a}\n");
    eventually("readiness", Duration::from_secs(30), || {
        http_get(&addr, "/readyz").starts_with("HTTP/1.1 200")
    });
    let served = http_get(&addr, "/metrics");
    for name in [
        "kiln_render_duration_seconds_bucket{le=\"0.01\"}",
        "kiln_render_duration_seconds_sum",
        "kiln_render_duration_seconds_count",
        "kiln_apply_duration_seconds_bucket{le=\"+Inf\"}",
        "kiln_apply_duration_seconds_sum",
        "kiln_apply_duration_seconds_count",
        "kiln_objects_applied_total",
        "kiln_objects_failed_total",
        "kiln_objects_drifted_total",
        "kiln_objects_corrected_total",
        "kiln_objects_pruned_total",
        "kiln_objects_desired",
        "kiln_source_rows{source=\"rows\"}",
        "kiln_source_errors_total{source=\"rows\"}",
    ] {
        assert!(
            served.lines().any(|l| l
                .strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' '))),
            "{name} is not served:\n{served}"
        );
    }
    assert_eq!(metric(&addr, "kiln_objects_desired"), Some(2.0));
    assert_eq!(metric(&addr, "kiln_objects_applied_total"), Some(2.0));
    assert!(
        !served.contains("kiln_leader") && !served.contains("pipeline=\""),
        "controller series in kiln sync:\n{served}"
    );
    stop(sync);
}

#[test]
fn sync_detect_only_reports_drift_and_leaves_it() {
    let resources = greeting_resources();
    let f = Fixture::new("detect", "- {id: a}\n", &resources);
    let out = sync_once(&f, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let ns = f.ns("a");
    edit_greeting(&ns);
    let addr = free_addr();
    let sync = f.spawn("sync", &["--detect-only", "--metrics-addr", &addr]);
    more_passes(&addr, 1);
    let out = stop(sync);
    assert!(
        stdout(&out).contains(&format!("drifted ConfigMap {ns}/config")),
        "{}",
        stdout(&out)
    );
    assert_eq!(
        get(&ns, "configmap", "config").unwrap()["data"]["greeting"],
        "edited"
    );
}

#[test]
fn a_namespace_deleted_under_kiln_is_created_again() {
    let resources = [
        NAMESPACE.to_string(),
        config_map("config", "config", "    dependsOn: [namespace]\n", "{}"),
    ]
    .concat();
    let f = Fixture::new("nsgone", "- {id: a}\n", &resources);
    f.render();
    assert!(f.apply(&[]).status.success());
    let ns = f.ns("a");
    kubectl_ok(&["delete", "namespace", &ns, "--wait=false"]);
    // While it terminates, applies fail cleanly (exit 2); once it is gone,
    // the next one creates everything again.
    eventually("the namespace back", Duration::from_secs(90), || {
        let out = f.apply(&[]);
        assert!(matches!(out.status.code(), Some(0 | 2)), "{}", stderr(&out));
        out.status.success() && get(&ns, "configmap", "config").is_some()
    });
}

#[test]
fn sync_with_git_commits_applies_the_branch_and_holds_a_rollback_pin() {
    let resources = greeting_from_rows();
    let f = Fixture::new("gitsync", "- {id: a, greeting: hello}\n", &resources);
    let repo = f.path("repo.git");
    common::git(
        f.dir.path(),
        &["init", "-q", "--bare", repo.to_str().unwrap()],
    );
    let sync = || {
        sync_once(
            &f,
            &["--git", repo.to_str().unwrap(), "--branch", "rendered"],
        )
    };
    let ns = f.ns("a");
    let greeting = || get(&ns, "configmap", "config").unwrap()["data"]["greeting"].clone();

    let out = sync();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("committed"), "{}", stderr(&out));
    let first = common::git(&repo, &["rev-parse", "rendered"]);
    assert_eq!(greeting(), "hello");

    f.rows("- {id: a, greeting: goodbye}\n");
    let out = sync();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(greeting(), "goodbye");

    let out = kiln(&[
        "rollback",
        "--git",
        repo.to_str().unwrap(),
        "--branch",
        "rendered",
        "--to",
        &first,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let pinned = common::git(&repo, &["rev-parse", "rendered"]);
    let out = sync();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("pinned"), "{}", stderr(&out));
    assert_eq!(
        common::git(&repo, &["rev-parse", "rendered"]),
        pinned,
        "a pinned branch moved"
    );
    assert_eq!(
        greeting(),
        "hello",
        "the rolled-back tree is what is applied"
    );

    let out = kiln(&[
        "resume",
        "--git",
        repo.to_str().unwrap(),
        "--branch",
        "rendered",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = sync();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("committed"), "{}", stderr(&out));
    assert_eq!(greeting(), "goodbye", "after resume the rows rule again");
}

#[test]
fn an_object_that_was_never_created_is_not_reported_pruned() {
    let resources = [
        NAMESPACE.to_string(),
        config_map(
            "config",
            "config",
            "    dependsOn: [namespace]\n",
            "{\"{{ row.k }}\": x}",
        ),
    ]
    .concat();
    // The API server refuses b's ConfigMap: "bad key!" is not a valid key.
    let f = Fixture::new(
        "never",
        "- {id: a, k: good}\n- {id: b, k: \"bad key!\"}\n",
        &resources,
    );
    f.render();
    let out = f.apply(&[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(has_count(&stderr(&out), "created", 3), "{}", stderr(&out));
    assert!(get(&f.ns("b"), "configmap", "config").is_none());

    // b leaves: its Namespace is pruned; its ConfigMap never existed, so the
    // report does not claim it was.
    f.rows("- {id: a, k: good}\n");
    f.render();
    let out = f.apply(&["--allow-mass-delete"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(has_count(&stderr(&out), "pruned", 1), "{}", stderr(&out));
    assert!(
        !stdout(&out).contains(&format!("pruned ConfigMap {}/config", f.ns("b"))),
        "{}",
        stdout(&out)
    );
}

/// Runs `kiln sync --once` on the fixture's configuration.
fn sync_once(f: &Fixture, extra: &[&str]) -> Output {
    let mut args = vec![
        "sync".to_string(),
        "--once".into(),
        "-f".into(),
        f.path("cfg").display().to_string(),
    ];
    args.extend(f.cluster_args());
    args.extend(extra.iter().map(|s| s.to_string()));
    kiln(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

#[test]
fn sync_without_git_refuses_a_mass_deletion_across_restarts() {
    let f = Fixture::new(
        "restart",
        "- {id: a}\n- {id: b}\n- {id: c}\n- {id: d}\n- {id: e}\n",
        &greeting_resources(),
    );
    let out = sync_once(&f, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let all = ["a", "b", "c", "d", "e"];
    let present = |key: &str| get(&f.ns(key), "configmap", "config").is_some();
    assert!(all.iter().all(|k| present(k)));

    // The process that saw five instances is gone; a new one sees two.
    f.rows("- {id: a}\n- {id: b}\n");
    let out = sync_once(&f, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!(
            "inventory {}: refusing to remove 3 of 5 instances",
            f.prefix
        )),
        "{}",
        stderr(&out)
    );
    assert!(all.iter().all(|k| present(k)), "a refused sync deleted");

    // A long-running sync started in that state refuses pass after pass,
    // and keeps running.
    let (sync, logged) = f.spawn_logged("sync", &[]);
    eventually("two refused passes", Duration::from_secs(30), || {
        logged()
            .matches("refusing to remove 3 of 5 instances")
            .count()
            >= 2
    });
    assert!(all.iter().all(|k| present(k)), "a refused sync deleted");
    assert!(stop(sync).status.success(), "{}", logged());
    assert!(all.iter().all(|k| present(k)), "a refused sync deleted");

    // Every instance gone at once is refused whatever the threshold.
    f.rows("[]\n");
    let out = sync_once(&f, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("refusing to remove all 5 instances"),
        "{}",
        stderr(&out)
    );

    f.rows("- {id: a}\n- {id: b}\n");
    let out = sync_once(&f, &["--allow-mass-delete"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(present("a") && present("b"));
    assert!(!present("c") && !present("d") && !present("e"));
}

#[test]
fn prune_deletes_only_what_kiln_made_and_no_namespace_holding_strangers() {
    let resources = [
        "  - id: namespace\n    template: |\n      apiVersion: v1\n      kind: Namespace\n      metadata:\n        name: \"NS\"\n        annotations: {kiln.dev/delete-with-contents: \"{{ row.purge }}\"}\n",
        &config_map("config", "config", "", "{greeting: hello}"),
    ]
    .concat();
    let rows = |keys: &[&str]| {
        keys.iter()
            .map(|k| format!("- {{id: {k}, purge: \"{}\"}}\n", *k == "e"))
            .collect::<String>()
    };
    let f = Fixture::new("made", &rows(&["a", "b", "c", "d", "e"]), &resources);
    f.render();
    let out = f.apply(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (b, c, d, e) = (f.ns("b"), f.ns("c"), f.ns("d"), f.ns("e"));
    let uid = |o: &Value| o["metadata"]["uid"].as_str().unwrap().to_string();

    // b: Kiln's ConfigMap deleted by hand and made again, by hand, with
    // every label Kiln puts on it.
    kubectl_ok(&["delete", "configmap", "config", "-n", &b]);
    kubectl_ok(&["create", "configmap", "config", "-n", &b]);
    let inventory_label = format!("kiln.dev/inventory={}", f.prefix);
    kubectl_ok(&[
        "label",
        "configmap",
        "config",
        "-n",
        &b,
        "app.kubernetes.io/managed-by=kiln",
        "kiln.dev/blueprint=app",
        "kiln.dev/instance=b",
        &inventory_label,
    ]);
    let hand_made = uid(&get(&b, "configmap", "config").unwrap());
    // c: someone took Kiln's ConfigMap over by removing its label.
    kubectl_ok(&[
        "label",
        "configmap",
        "config",
        "-n",
        &c,
        "app.kubernetes.io/managed-by-",
    ]);
    // d and e: a Secret nobody told Kiln about; e's Namespace says its
    // contents may go with it.
    for ns in [&d, &e] {
        kubectl_ok(&[
            "create",
            "secret",
            "generic",
            "hand-made",
            "-n",
            ns,
            "--from-literal=k=v",
        ]);
    }

    f.rows(&rows(&["a"]));
    f.render();
    let out = f.apply(&["--allow-mass-delete"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report = stdout(&out);

    let left = get(&b, "configmap", "config").expect("the hand-made ConfigMap was deleted");
    assert_eq!(uid(&left), hand_made);
    assert!(
        report.contains(&format!("skipped ConfigMap {b}/config"))
            && report.contains("re-created by someone else"),
        "{report}"
    );
    assert!(get(&c, "configmap", "config").is_some());
    assert!(
        report.contains(&format!("skipped ConfigMap {c}/config"))
            && report.contains("no longer labelled"),
        "{report}"
    );
    // b, c and d hold what Kiln did not make: orphaned, not deleted, and
    // the report says why.
    for (ns, stranger) in [
        (&b, "ConfigMap config"),
        (&c, "ConfigMap config"),
        (&d, "Secret hand-made"),
    ] {
        let namespace =
            get("", "namespace", ns).expect("a Namespace holding strangers was deleted");
        assert!(
            namespace["metadata"]["deletionTimestamp"].is_null(),
            "{namespace}"
        );
        assert_eq!(namespace["metadata"]["labels"]["kiln.dev/orphaned"], "true");
        assert!(
            namespace["metadata"]["annotations"]["kiln.dev/orphaned-reason"]
                .as_str()
                .unwrap()
                .contains(stranger),
            "{namespace}"
        );
        assert!(
            report
                .lines()
                .any(|l| l.starts_with(&format!("orphaned Namespace {ns} "))
                    && l.contains("not deleted: it holds objects")
                    && l.contains(stranger)),
            "{report}"
        );
    }
    assert!(get(&d, "secret", "hand-made").is_some());
    assert!(
        get(&d, "configmap", "config").is_none(),
        "d's ConfigMap was Kiln's"
    );
    // e said so: deleted with its contents.
    assert!(
        get("", "namespace", &e).is_none_or(|n| !n["metadata"]["deletionTimestamp"].is_null()),
        "e's Namespace was not deleted"
    );
    assert!(
        report.contains(&format!("pruned Namespace {e}")),
        "{report}"
    );
    assert!(get(&f.ns("a"), "configmap", "config").is_some());
}

#[test]
fn sync_with_git_never_commits_over_an_uncommitted_edit_of_a_checkout() {
    let resources = greeting_from_rows();
    let f = Fixture::new("checkout", "- {id: a, greeting: hello}\n", &resources);
    let repo = f.path("checkout");
    common::git(
        f.dir.path(),
        &["init", "-q", "-b", "main", repo.to_str().unwrap()],
    );
    let out = kiln(&[
        "render",
        "-f",
        f.path("cfg").to_str().unwrap(),
        "--git",
        repo.to_str().unwrap(),
        "--path",
        "out",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let file = repo.join("out/app/a/config.yaml");
    let edited = format!("{}# mine\n", std::fs::read_to_string(&file).unwrap());
    std::fs::write(&file, &edited).unwrap();
    let tip = common::git(&repo, &["rev-parse", "main"]);

    f.rows("- {id: a, greeting: goodbye}\n");
    let repo_arg = repo.to_str().unwrap();
    let out = sync_once(
        &f,
        &["--git", repo_arg, "--branch", "main", "--path", "out"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("uncommitted changes under out/")
            && stderr(&out).contains("out/app/a/config.yaml"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        edited,
        "the edit is gone"
    );
    assert_eq!(
        common::git(&repo, &["rev-parse", "main"]),
        tip,
        "sync committed"
    );
}

#[test]
fn a_render_over_budget_fails_the_pass_and_sync_keeps_the_last_good_state() {
    let resources = [
        NAMESPACE.to_string(),
        config_map(
            "config",
            "config",
            "    dependsOn: [namespace]\n",
            "{greeting: \"{% for i in range(row.n) %}x{% endfor %}\"}",
        ),
    ]
    .concat();
    let f = Fixture::new("budget", "- {id: a, n: 3}\n- {id: b, n: 3}\n", &resources);
    let addr = free_addr();
    let sync = f.spawn(
        "sync",
        &["--max-object-bytes", "2000", "--metrics-addr", &addr],
    );
    let greeting =
        |key: &str| get(&f.ns(key), "configmap", "config").map(|c| c["data"]["greeting"].clone());
    eventually("the first sync", Duration::from_secs(60), || {
        greeting("a") == Some("xxx".into()) && greeting("b") == Some("xxx".into())
    });

    // a's row now makes an object of 5,000 bytes: the whole render fails.
    f.rows("- {id: a, n: 5000}\n- {id: b, n: 4}\n");
    // Two passes after the change (the source is read every second): the
    // render failed in each, and the last good state was applied.
    more_passes(&addr, 2);
    assert_eq!(
        greeting("b"),
        Some("xxx".into()),
        "a failed render was applied"
    );
    // The last good state is still what the loop holds to.
    edit_greeting(&f.ns("a"));
    eventually("the edit put back", Duration::from_secs(30), || {
        greeting("a") == Some("xxx".into())
    });

    f.rows("- {id: a, n: 2}\n- {id: b, n: 2}\n");
    eventually("the fixed rows applied", Duration::from_secs(30), || {
        greeting("a") == Some("xx".into()) && greeting("b") == Some("xx".into())
    });
    let out = stop(sync);
    let log = stderr(&out);
    assert!(
        log.contains("resource config, row a")
            && log.contains("more than 2000 bytes")
            && log.contains("keeping the last desired state"),
        "{log}"
    );
}

#[test]
fn applying_one_blueprint_of_two_into_their_inventory_is_refused() {
    let f = Fixture::new("onebp", "- {id: a}\n- {id: b}\n", &greeting_resources());
    // A second blueprint on the same rows, in the same inventory.
    let mut config = std::fs::read_to_string(f.path("cfg/kiln.yaml")).unwrap();
    config.push_str(&format!(
        "---\napiVersion: kiln.dev/v1alpha1\nkind: Blueprint\nmetadata: {{name: extra}}\n\
         spec:\n  source: rows\n  namespace: \"{p}-{{{{ key }}}}\"\n  resources:\n{c}",
        p = f.prefix,
        c = config_map("more", "more", "", "{}")
    ));
    std::fs::write(f.path("cfg/kiln.yaml"), config).unwrap();
    f.render();
    let out = f.apply(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(get(&f.ns("a"), "configmap", "more").is_some());

    let render_only = |blueprint: &str| {
        let out = kiln(&[
            "render",
            "-f",
            f.path("cfg").to_str().unwrap(),
            "--blueprint",
            blueprint,
            "--out",
            f.path("out").to_str().unwrap(),
            "--allow-mass-delete",
        ]);
        assert!(out.status.success(), "render: {}", stderr(&out));
    };
    render_only("app");
    let out = f.apply(&[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("refusing to remove all 2 instances of blueprint extra"),
        "{}",
        stderr(&out)
    );
    assert!(get(&f.ns("a"), "configmap", "more").is_some());
    assert!(get(&f.ns("b"), "configmap", "more").is_some());
}

#[test]
fn kilns_own_writes_start_no_pass_and_a_stop_is_one_line() {
    let f = Fixture::new("quiet", "- {id: a}\n", &greeting_resources());
    // Passes come from watches only: the source is read once an hour.
    let config = std::fs::read_to_string(f.path("cfg/kiln.yaml")).unwrap();
    std::fs::write(
        f.path("cfg/kiln.yaml"),
        config.replace("interval: 1s", "interval: 1h"),
    )
    .unwrap();
    let addr = free_addr();
    let (sync, logged) = f.spawn_logged("sync", &["--metrics-addr", &addr]);
    let passes = || metric(&addr, "kiln_apply_duration_seconds_count").unwrap_or(0.0) as u64;
    eventually("the first pass", Duration::from_secs(60), || passes() == 1);
    let ns = f.ns("a");
    let own = "objects changed by Kiln's own writes; no pass";
    let quiet_before = logged().matches(own).count();
    edit_greeting(&ns);
    // The source is not read for an hour: only the watch can put it back,
    // and it does at once.
    eventually("the edit put back", Duration::from_secs(5), || {
        get(&ns, "configmap", "config").unwrap()["data"]["greeting"] == "hello"
    });
    // The correction's own write comes back as a watch event, which the
    // loop recognises (it says so) and which starts no third pass.
    eventually(
        "the correction's event seen",
        Duration::from_secs(10),
        || logged().matches(own).count() > quiet_before,
    );
    assert_eq!(passes(), 2, "Kiln's own write started a pass");
    assert!(stop(sync).status.success(), "{}", logged());

    // A stop in the middle of an apply: no line per object left, one count.
    let many: String = (0..300)
        .map(|i| config_map(&format!("c{i}"), &format!("c{i}"), "", "{}"))
        .collect();
    for delay in [300u64, 700, 1200, 2000, 3000] {
        let f = Fixture::new("stop", "- {id: a}\n", &format!("{NAMESPACE}{many}"));
        f.render();
        let apply = f.spawn("apply", &["--concurrency", "1"]);
        std::thread::sleep(Duration::from_millis(delay));
        apply.signal_term();
        let out = finish(apply);
        // Too early (before the handler was installed) or too late (it
        // finished first): try the next delay.
        if std::os::unix::process::ExitStatusExt::signal(&out.status).is_some() {
            continue;
        }
        assert!(out.status.success(), "{}", stderr(&out));
        let summary = stderr(&out);
        if !summary.contains("stopped before") {
            continue;
        }
        assert!(!stdout(&out).contains("stopping"), "{}", stdout(&out));
        assert!(!stdout(&out).contains("skipped"), "{}", stdout(&out));
        assert!(has_count(&summary, "skipped", 0), "{summary}");
        return;
    }
    panic!("no stop landed during an apply");
}

#[test]
fn drift_cluster_and_sync_detect_only_agree() {
    let resources = [
        NAMESPACE.to_string(),
        config_map(
            "config",
            "config",
            "    dependsOn: [namespace]\n    ignoreFields: [/data/replicas]\n",
            "{greeting: hello, replicas: \"1\"}",
        ),
        "  - id: quota\n    dependsOn: [namespace]\n    template: |\n      apiVersion: v1\n      kind: ResourceQuota\n      metadata: {name: quota}\n      spec: {hard: {cpu: \"0.5\", memory: 1024Mi}}\n".to_string(),
    ]
    .concat();
    let f = Fixture::new("agree", "- {id: a}\n", &resources);
    f.render();
    let out = f.apply(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let ns = f.ns("a");
    let quota = get(&ns, "resourcequota", "quota").unwrap();
    assert_eq!(
        quota["spec"]["hard"]["cpu"], "500m",
        "the server normalises"
    );

    // Each answers: is there drift, and which object?
    let drift = || {
        let mut args = vec![
            "drift".to_string(),
            "--cluster".into(),
            "--exit-code".into(),
        ];
        args.extend(["--dir".into(), f.path("out").display().to_string()]);
        args.extend(f.cluster_args());
        let out = kiln(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(matches!(out.status.code(), Some(0 | 1)), "{}", stderr(&out));
        (
            out.status.code() == Some(1),
            stdout(&out).contains("ConfigMap"),
        )
    };
    let detect = || {
        let out = sync_once(&f, &["--detect-only"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let drifted = stdout(&out).contains("drifted");
        (
            drifted,
            stdout(&out).contains(&format!("drifted ConfigMap {ns}/config")),
        )
    };
    let edit = |data: &str| {
        kubectl_ok(&[
            "patch",
            "configmap",
            "config",
            "-n",
            &ns,
            "--type=merge",
            "-p",
            data,
        ]);
    };

    // A value the server normalises (cpu 0.5 as 500m, 1024Mi as 1Gi).
    assert_eq!(drift(), (false, false));
    assert_eq!(detect(), (false, false));
    // An edit of an ignored field.
    edit(r#"{"data":{"replicas":"7"}}"#);
    assert_eq!(drift(), (false, false));
    assert_eq!(detect(), (false, false));
    // An out-of-band edit of a field Kiln set.
    edit(r#"{"data":{"greeting":"edited"}}"#);
    assert_eq!(drift(), (true, true));
    assert_eq!(detect(), (true, true));
    assert_eq!(
        get(&ns, "configmap", "config").unwrap()["data"]["greeting"],
        "edited",
        "--detect-only wrote"
    );
}

/// Waits until the sync serving metrics on `addr` has applied `more`
/// more times: passes, observed rather than slept through.
fn more_passes(addr: &str, more: u64) {
    let applies = || metric(addr, "kiln_apply_duration_seconds_count").unwrap_or(0.0) as u64;
    let target = applies() + more;
    eventually(
        &format!("{more} more passes"),
        Duration::from_secs(30),
        || applies() >= target,
    );
}

#[test]
fn a_failing_source_holds_back_the_prune_of_another() {
    let f = Fixture::new("twosrc", "- {id: a}\n- {id: b}\n", &greeting_resources());
    // A second source and blueprint, beside the first.
    std::fs::write(f.path("more.yaml"), "- {id: x}\n").unwrap();
    let mut config = std::fs::read_to_string(f.path("cfg/kiln.yaml")).unwrap();
    config.push_str(&format!(
        "---\napiVersion: kiln.dev/v1alpha1\nkind: Source\nmetadata: {{name: more}}\n\
         spec: {{url: \"file:../more.yaml\", key: id, interval: 3s}}\n---\n\
         apiVersion: kiln.dev/v1alpha1\nkind: Blueprint\nmetadata: {{name: extra}}\n\
         spec:\n  source: more\n  namespace: \"{p}-{{{{ key }}}}\"\n  resources:\n{n}{c}",
        p = f.prefix,
        n = NAMESPACE.replace("NS", &format!("{}-{{{{ key }}}}", f.prefix)),
        c = config_map("more", "more", "    dependsOn: [namespace]\n", "{}")
    ));
    std::fs::write(f.path("cfg/kiln.yaml"), config).unwrap();
    let addr = free_addr();
    let sync = f.spawn("sync", &["--metrics-addr", &addr, "--allow-mass-delete"]);
    let present = |key: &str| get(&f.ns(key), "configmap", "config").is_some();
    eventually("the first pass", Duration::from_secs(60), || {
        present("a") && present("b") && get(&f.ns("x"), "configmap", "more").is_some()
    });

    // `more` fails while `rows` loses b: no pass may prune b, not even the
    // ones in which only `rows` is due (it is read every second, `more`
    // every three).
    std::fs::remove_file(f.path("more.yaml")).unwrap();
    eventually("more failing", Duration::from_secs(30), || {
        metric(&addr, "kiln_source_errors_total{source=\"more\"}").unwrap_or(0.0) >= 1.0
    });
    f.rows("- {id: a}\n");
    eventually("rows read again", Duration::from_secs(30), || {
        metric(&addr, "kiln_source_rows{source=\"rows\"}") == Some(1.0)
    });
    let passes = metric(&addr, "kiln_apply_duration_seconds_count").unwrap();
    eventually("two more passes", Duration::from_secs(30), || {
        metric(&addr, "kiln_apply_duration_seconds_count").unwrap() >= passes + 2.0
    });
    assert!(present("b"), "a pass with a failing source pruned");

    // Once every source reads again, b goes.
    std::fs::write(f.path("more.yaml"), "- {id: x}\n").unwrap();
    eventually("b pruned", Duration::from_secs(30), || !present("b"));
    assert!(present("a"));
    let out = stop(sync);
    assert!(
        stderr(&out).contains("keeping its last rows and pruning nothing"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn no_prune_leaves_what_left_the_tree_for_a_later_apply() {
    let f = Fixture::new("noprune", "- {id: a}\n- {id: b}\n", &greeting_resources());
    f.render();
    assert!(f.apply(&[]).status.success());
    f.rows("- {id: a}\n");
    f.render();
    let out = f.apply(&["--no-prune"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(has_count(&stderr(&out), "pruned", 0), "{}", stderr(&out));
    assert!(get(&f.ns("b"), "configmap", "config").is_some());
    // The inventory still knows b: the next apply prunes it.
    let out = f.apply(&["--allow-mass-delete"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(&format!("pruned ConfigMap {}/config", f.ns("b"))),
        "{}",
        stdout(&out)
    );
    assert!(get(&f.ns("b"), "configmap", "config").is_none());
}

#[test]
fn sync_reacts_at_once_to_edited_rows_templates_and_configuration() {
    let resources = format!(
        "{NAMESPACE}  - id: config\n    dependsOn: [namespace]\n    templateFile: config.yaml.j2\n"
    );
    let f = Fixture::new("files", "- {id: a, greeting: hi}\n", &resources);
    // A poll an hour away: only the file watches can start these passes.
    let config = std::fs::read_to_string(f.path("cfg/kiln.yaml")).unwrap();
    std::fs::write(
        f.path("cfg/kiln.yaml"),
        config.replace("interval: 1s", "interval: 1h"),
    )
    .unwrap();
    let template = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: config}\ndata: {greeting: \"{{ row.greeting }}\"}\n";
    std::fs::write(f.path("cfg/config.yaml.j2"), template).unwrap();
    let log = f.path("sync.log");
    let mut sync = common::kiln_command()
        .arg("sync")
        .arg("-f")
        .arg(f.path("cfg"))
        .args(f.cluster_args())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .map(Running::new)
        .unwrap();
    let said = || std::fs::read_to_string(&log).unwrap_or_default();
    let ns = f.ns("a");
    let data = || get(&ns, "configmap", "config").map(|c| c["data"].clone());
    eventually("the first sync", Duration::from_secs(60), || {
        data().is_some_and(|d| d["greeting"] == "hi")
    });

    // A row edited in place.
    f.rows("- {id: a, greeting: hello}\n");
    eventually("the row's change applied", Duration::from_secs(15), || {
        data().is_some_and(|d| d["greeting"] == "hello")
    });

    // A template saved by rename.
    let beside = f.path("cfg/config.yaml.j2.new");
    std::fs::write(
        &beside,
        template.replace("\ndata: {", "\ndata: {edited: \"yes\", "),
    )
    .unwrap();
    std::fs::rename(&beside, f.path("cfg/config.yaml.j2")).unwrap();
    eventually(
        "the template's change applied",
        Duration::from_secs(15),
        || data().is_some_and(|d| d["edited"] == "yes" && d["greeting"] == "hello"),
    );

    // A broken configuration is refused and the loaded one kept; fixed, a
    // new resource is applied.
    let good = std::fs::read_to_string(f.path("cfg/kiln.yaml")).unwrap();
    std::fs::write(f.path("cfg/kiln.yaml"), format!("{good}  - id: [broken\n")).unwrap();
    eventually("the broken file refused", Duration::from_secs(15), || {
        said().contains("keeping the configuration loaded before")
    });
    assert!(said().contains("kiln.yaml"), "{}", said());
    std::fs::write(
        f.path("cfg/kiln.yaml"),
        format!(
            "{good}{}",
            config_map(
                "second",
                "second",
                "    dependsOn: [namespace]\n",
                "{n: \"2\"}"
            )
        ),
    )
    .unwrap();
    eventually("the new resource applied", Duration::from_secs(15), || {
        get(&ns, "configmap", "second").is_some()
    });
    let out = sync.terminate();
    assert!(out.status.success(), "{}", said());
    assert!(
        said().contains("the configuration changed; loaded again"),
        "{}",
        said()
    );
}

#[test]
fn an_object_the_schema_refuses_fails_at_once_without_retries() {
    let resources = [
        NAMESPACE.to_string(),
        "  - id: odd\n    dependsOn: [namespace]\n    template: |\n      apiVersion: v1\n      kind: ConfigMap\n      metadata: {name: odd, colour: blue}\n".to_string(),
    ]
    .concat();
    let f = Fixture::new("schema", "- {id: a}\n", &resources);
    f.render();
    let out = f.apply(&[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let said = format!("{}{}", stdout(&out), stderr(&out));
    assert!(said.contains("field not declared in schema"), "{said}");
    // Server-Side Apply answers 500 for it; waiting would change nothing.
    assert!(!said.contains("retried"), "{said}");
}

#[test]
fn ignored_fields_keep_their_live_values_when_the_object_is_written_again() {
    let resources = |note: &str| {
        [
            NAMESPACE.to_string(),
            deployment(
                "    dependsOn: [namespace]\n    ignoreFields: [/spec/replicas]\n",
                1,
            )
            .replace(
                "metadata: {name: app}",
                &format!("metadata: {{name: app, annotations: {{note: {note}}}}}"),
            ),
        ]
        .concat()
    };
    let f = Fixture::new("ignore", "- {id: a}\n", &resources("first"));
    f.render();
    let out = f.apply(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let ns = f.ns("a");
    // Someone (an autoscaler) scales it.
    kubectl_ok(&["scale", "deployment", "app", "-n", &ns, "--replicas=3"]);
    // The template changes: the object is written again, and the ignored
    // field keeps its live value.
    f.resources(&resources("second"));
    f.render();
    let out = f.apply(&["--format", "json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let updated: Vec<&Value> = report["outcomes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["status"] == "updated")
        .collect();
    assert_eq!(updated.len(), 1, "{report}");
    assert!(
        updated[0]["object"]
            .as_str()
            .unwrap()
            .contains("Deployment"),
        "{report}"
    );
    assert!(
        report["summary"].as_str().unwrap().contains("updated 1"),
        "{report}"
    );
    let live = get(&ns, "deployment", "app").unwrap();
    assert_eq!(live["metadata"]["annotations"]["note"], "second");
    assert_eq!(
        live["spec"]["replicas"], 3,
        "the ignored field was overwritten"
    );
}

/// A resource `id` rendering `body` (the object's YAML, indented by six),
/// waited for, and a ConfigMap `after-<id>` that depends on it.
fn waited(id: &str, body: &str) -> String {
    format!(
        "  - id: {id}\n    dependsOn: [namespace]\n    waitForReady: true\n    timeout: 2m\n    template: |\n{body}{}",
        config_map(
            &format!("after-{id}"),
            &format!("after-{id}"),
            &format!("    dependsOn: [{id}]\n"),
            "{}"
        )
    )
}

#[test]
fn readiness_of_each_built_in_kind_holds_its_dependents_until_the_api_server_says_so() {
    let pod = "        selector: {matchLabels: {app: w}}\n        template:\n          metadata: {labels: {app: w}}\n          spec: {containers: [{name: w, image: nginx}]}\n";
    let resources = [
        NAMESPACE.to_string(),
        waited(
            "sts",
            &format!("      apiVersion: apps/v1\n      kind: StatefulSet\n      metadata: {{name: sts}}\n      spec:\n        replicas: 1\n        serviceName: sts\n{pod}"),
        ),
        waited(
            "ds",
            &format!("      apiVersion: apps/v1\n      kind: DaemonSet\n      metadata: {{name: ds}}\n      spec:\n{pod}"),
        ),
        waited(
            "pvc",
            "      apiVersion: v1\n      kind: PersistentVolumeClaim\n      metadata: {name: pvc}\n      spec: {accessModes: [ReadWriteOnce], resources: {requests: {storage: 1Gi}}}\n",
        ),
        waited(
            "done",
            "      apiVersion: batch/v1\n      kind: Job\n      metadata: {name: done}\n      spec:\n        template:\n          spec: {restartPolicy: Never, containers: [{name: j, image: busybox}]}\n",
        ),
        waited(
            "broken",
            "      apiVersion: batch/v1\n      kind: Job\n      metadata: {name: broken}\n      spec:\n        template:\n          spec: {restartPolicy: Never, containers: [{name: j, image: busybox}]}\n",
        ),
        waited(
            "lb",
            "      apiVersion: v1\n      kind: Service\n      metadata: {name: lb}\n      spec: {type: LoadBalancer, ports: [{port: 80}], selector: {app: w}}\n",
        ),
    ]
    .concat();
    let f = Fixture::new("kinds", "- {id: a}\n", &resources);
    f.render();
    let ns = f.ns("a");
    let (apply, logged) = f.spawn_logged("apply", &[]);
    for kind in [
        "StatefulSet",
        "DaemonSet",
        "PersistentVolumeClaim",
        "Job",
        "Service",
    ] {
        eventually(
            &format!("the wait for the {kind}"),
            Duration::from_secs(60),
            || {
                logged().lines().any(|l| {
                    l.contains("waiting for readiness before its dependents") && l.contains(kind)
                })
            },
        );
    }
    for id in ["sts", "ds", "pvc", "done", "broken", "lb"] {
        assert!(
            get(&ns, "configmap", &format!("after-{id}")).is_none(),
            "the dependent of {id} went ahead"
        );
    }
    // No controller runs in the test cluster: say what each would.
    let status = |kind: &str, name: &str, status: &str| {
        kubectl_ok(&[
            "patch",
            kind,
            name,
            "-n",
            &ns,
            "--subresource=status",
            "--type=merge",
            "-p",
            &format!("{{\"status\": {status}}}"),
        ]);
    };
    let now = "2026-01-01T00:00:00Z";
    status(
        "statefulset",
        "sts",
        r#"{"observedGeneration": 1, "replicas": 1, "readyReplicas": 1, "updatedReplicas": 1, "currentReplicas": 1, "availableReplicas": 1}"#,
    );
    status(
        "daemonset",
        "ds",
        r#"{"observedGeneration": 1, "desiredNumberScheduled": 1, "currentNumberScheduled": 1, "numberReady": 1, "updatedNumberScheduled": 1, "numberAvailable": 1, "numberMisscheduled": 0}"#,
    );
    status("persistentvolumeclaim", "pvc", r#"{"phase": "Bound"}"#);
    status(
        "service",
        "lb",
        r#"{"loadBalancer": {"ingress": [{"ip": "192.0.2.10"}]}}"#,
    );
    status(
        "job",
        "done",
        &format!(
            r#"{{"startTime": "{now}", "completionTime": "{now}", "succeeded": 1, "conditions": [{{"type": "SuccessCriteriaMet", "status": "True"}}, {{"type": "Complete", "status": "True"}}]}}"#
        ),
    );
    status(
        "job",
        "broken",
        &format!(
            r#"{{"startTime": "{now}", "failed": 1, "conditions": [{{"type": "FailureTarget", "status": "True", "reason": "BackoffLimitExceeded", "message": "the job ran out of retries"}}, {{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "the job ran out of retries"}}]}}"#
        ),
    );
    let out = finish(apply);
    assert_eq!(out.status.code(), Some(2), "{}", logged());
    for id in ["sts", "ds", "pvc", "done", "lb"] {
        assert!(
            get(&ns, "configmap", &format!("after-{id}")).is_some(),
            "the dependent of a ready {id} was not applied: {}",
            logged()
        );
    }
    assert!(get(&ns, "configmap", "after-broken").is_none());
    let report = stdout(&out);
    assert!(report.contains("the job ran out of retries"), "{report}");
    assert!(
        report.contains("skipped ConfigMap") && report.contains("after-broken"),
        "{report}"
    );
}

#[test]
fn sigterm_during_a_held_readiness_wait_stops_at_once_without_the_dependents() {
    // Ten minutes of patience: a stop that waited for it would outlast the
    // process guard's two minutes and fail the test.
    let f = ready_fixture("heldstop", "10m");
    let ns = f.ns("a");
    let (sync, logged) = f.spawn_logged("sync", &[]);
    eventually(
        "the wait for the deployment",
        Duration::from_secs(60),
        || {
            logged().lines().any(|l| {
                l.contains("waiting for readiness before its dependents")
                    && l.contains("Deployment")
            })
        },
    );
    sync.signal_term();
    let out = finish(sync);
    assert!(out.status.success(), "{}", logged());
    assert!(
        get(&ns, "configmap", "after").is_none(),
        "a dependent was written after the stop"
    );
    assert!(get(&ns, "deployment", "app").is_some());
}

#[test]
fn drift_cluster_masks_secrets_and_names_what_is_no_longer_wanted() {
    let secret = "  - id: creds\n    dependsOn: [namespace]\n    template: |\n      apiVersion: v1\n      kind: Secret\n      metadata: {name: creds}\n      stringData: {password: hunter2}\n";
    let resources = |with_config: bool| {
        let mut r = format!("{NAMESPACE}{secret}");
        if with_config {
            r.push_str(&config_map(
                "config",
                "config",
                "    dependsOn: [namespace]\n",
                "{greeting: hello}",
            ));
        }
        r
    };
    let f = Fixture::new("maskdrift", "- {id: a}\n", &resources(true));
    f.render();
    let out = f.apply(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let ns = f.ns("a");
    // "stolen", base64.
    kubectl_ok(&[
        "patch",
        "secret",
        "creds",
        "-n",
        &ns,
        "--type=merge",
        "-p",
        r#"{"data":{"password":"c3RvbGVu"}}"#,
    ]);
    let drift = || {
        let mut args = vec![
            "drift".to_string(),
            "--cluster".into(),
            "--exit-code".into(),
            "--dir".into(),
            f.path("out").display().to_string(),
        ];
        args.extend(f.cluster_args());
        kiln(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let out = drift();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert!(
        text.contains("Secret") && text.contains("(masked"),
        "{text}"
    );
    for value in ["hunter2", "stolen", "c3RvbGVu", "aHVudGVyMg=="] {
        assert!(
            !text.contains(value),
            "drift --cluster shows {value}: {text}"
        );
    }
    // The ConfigMap leaves the tree: in the inventory and the cluster, it
    // is unwanted until an apply prunes it.
    f.resources(&resources(false));
    f.render();
    let out = drift();
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    assert!(
        text.lines()
            .any(|l| l.starts_with("unwanted ConfigMap") && l.contains("no longer in the tree")),
        "{text}"
    );
}

#[test]
fn a_failed_apply_postpones_prune_until_an_apply_succeeds() {
    let f = Fixture::new(
        "postpone",
        "- {id: a}\n",
        &rename_resources(true, false, "ours"),
    );
    f.render();
    assert!(f.apply(&[]).status.success());
    let ns = f.ns("a");
    // Someone else takes the field: Kiln's next write of it conflicts.
    kubectl_ok(&[
        "patch",
        "configmap",
        "taken",
        "-n",
        &ns,
        "--type=merge",
        "-p",
        r#"{"data":{"greeting":"theirs"}}"#,
    ]);
    f.resources(&rename_resources(false, false, "ours again"));
    f.render();
    let out = f.apply(&[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("failed ConfigMap"),
        "{}",
        stdout(&out)
    );
    // A failed apply may be half a rename: what left the tree stays.
    assert!(
        get(&ns, "configmap", "old").is_some(),
        "pruned after a failure"
    );
    let inventory = kubectl(&[
        "get",
        "configmaps",
        "-n",
        "kiln-system",
        "-l",
        &format!("kiln.dev/inventory-of={}", f.prefix),
        "-o",
        "jsonpath={.items[*].data.entries}",
    ]);
    assert!(
        String::from_utf8_lossy(&inventory.stdout).contains("\told\t"),
        "the inventory forgot it"
    );
    // Once an apply succeeds, it is pruned.
    f.resources(&rename_resources(false, true, "ours again"));
    f.render();
    let out = f.apply(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(has_count(&stderr(&out), "pruned", 1), "{}", stderr(&out));
    assert!(get(&ns, "configmap", "old").is_none());
}

#[test]
fn sync_with_git_refuses_a_mass_deletion_before_committing_or_deleting() {
    let f = Fixture::new(
        "gitguard",
        "- {id: a}\n- {id: b}\n- {id: c}\n- {id: d}\n- {id: e}\n",
        &greeting_resources(),
    );
    let repo = f.path("repo.git");
    common::git(
        f.dir.path(),
        &["init", "-q", "--bare", repo.to_str().unwrap()],
    );
    let sync = || {
        sync_once(
            &f,
            &["--git", repo.to_str().unwrap(), "--branch", "rendered"],
        )
    };
    let out = sync();
    assert!(out.status.success(), "{}", stderr(&out));
    let tip = common::git(&repo, &["rev-parse", "rendered"]);
    // A source that suddenly returns two of five rows.
    f.rows("- {id: a}\n- {id: b}\n");
    let out = sync();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("refusing to remove 3 of 5 instances"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        common::git(&repo, &["rev-parse", "rendered"]),
        tip,
        "a refused render committed"
    );
    for key in ["a", "b", "c", "d", "e"] {
        assert!(
            get(&f.ns(key), "configmap", "config").is_some(),
            "{key} was deleted"
        );
    }
}
