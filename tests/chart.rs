//! The Helm chart: linted, its values checked by its schema, its CRDs the
//! project's, and installed into the test environment's API server with
//! `helm template | kubectl apply --server-side`. The controller then runs
//! as a process with a token of the chart's ServiceAccount (TokenRequest)
//! and the arguments of the chart's Deployment, so it has exactly the
//! chart's rights; Pipelines act as their own ServiceAccounts, and the
//! chart's admission policy refuses what tenants may not ask for.

#![allow(clippy::unwrap_used)] // a test that cannot go on fails, with the cause

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{
    Running, eventually, free_addr, http_get, kubectl, kubectl_ok, kubectl_stdin, stderr,
};
use serde_json::Value;

fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/kiln")
}

/// helm, built from the Go module proxy into the test cache (or found there).
fn helm() -> Command {
    static HELM: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let path = HELM.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bench/helm/build.sh");
        let out = Command::new("bash").arg(script).output().unwrap();
        assert!(out.status.success(), "building helm: {}", stderr(&out));
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    });
    let mut command = Command::new(path);
    // helm keeps nothing of the developer's: no repositories, no plugins.
    let home = std::env::temp_dir().join("kiln-test-helm");
    command
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"))
        .env_remove("KUBECONFIG");
    command
}

fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {}{}",
        stderr(&out),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn apply(yaml: &str) {
    ok(
        kubectl_stdin(&["apply", "--server-side", "-f", "-"], yaml),
        &format!("kubectl apply\n{yaml}"),
    );
}

/// The API server's answer while a new admission policy binding has not
/// seen its parameters yet (`parameterNotFoundAction: Deny`): the policy is
/// not in effect yet, which says nothing about the object.
const PARAMS_NOT_SEEN: &str = "no params found for policy binding";

/// [`apply`] of objects a new admission policy covers: tried again while
/// the policy has not seen its parameters yet.
fn apply_admitted(yaml: &str) {
    let mut last = None;
    eventually(
        "the admission policy's parameters",
        Duration::from_secs(30),
        || {
            let out = kubectl_stdin(&["apply", "--server-side", "-f", "-"], yaml);
            let waiting = !out.status.success() && stderr(&out).contains(PARAMS_NOT_SEEN);
            last = Some(out);
            !waiting
        },
    );
    ok(last.unwrap(), &format!("kubectl apply\n{yaml}"));
}

/// Whether the API server admits `yaml` (a dry run: nothing is stored),
/// and what it said.
fn admits(yaml: &str) -> (bool, String) {
    let out = kubectl_stdin(&["create", "--dry-run=server", "-f", "-"], yaml);
    (out.status.success(), stderr(&out))
}

/// What the API server says when it refuses `yaml`. A new admission policy
/// takes a moment to be enforced: until then the dry run passes.
fn refusal(yaml: &str) -> String {
    let mut said = String::new();
    eventually("a refusal", Duration::from_secs(30), || {
        let (admitted, message) = admits(yaml);
        let waiting = message.contains(PARAMS_NOT_SEEN);
        said = message;
        !admitted && !waiting
    });
    said
}

#[test]
fn the_chart_carries_the_projects_crds() {
    let ours = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("crds/kiln.dev.yaml"));
    let charted = std::fs::read(chart().join("crds/kiln.dev.yaml"));
    assert!(
        ours.unwrap() == charted.unwrap(),
        "charts/kiln/crds/kiln.dev.yaml differs from crds/kiln.dev.yaml: cp crds/kiln.dev.yaml charts/kiln/crds/"
    );
}

#[test]
fn the_chart_lints_clean_and_its_schema_refuses_wrong_values() {
    let every = "admissionPolicy.enabled=true,prometheusRule.enabled=true,dashboard.enabled=true,metrics.serviceMonitor.enabled=true";
    for set in ["replicas=2", every] {
        let out = helm()
            .args(["lint", "--strict"])
            .arg(chart())
            .args(["--set", set])
            .output()
            .unwrap();
        let text = ok(out, "helm lint");
        assert!(
            !text.contains("[WARNING]") && !text.contains("[ERROR]"),
            "{text}"
        );
    }
    for (set, says) in [
        ("replicas=0", "/replicas"),
        ("tenancy.requireServiceAcount=false", "requireServiceAcount"),
        ("resources.limits.memory=lots", "/resources/limits/memory"),
        (
            "leaderElection.leaseDuration=soon",
            "/leaderElection/leaseDuration",
        ),
        ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
        (
            "tenancy.defaultServiceAccount=Not_A_Name",
            "/tenancy/defaultServiceAccount",
        ),
    ] {
        let out = helm()
            .args(["template", "kiln"])
            .arg(chart())
            .args(["--set", set])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{set} was accepted");
        let message = stderr(&out);
        assert!(
            message.contains("schema") && message.contains(says),
            "{set}: {message}"
        );
    }
}

/// The chart rendered for `release` in `namespace` with `sets`, CRDs
/// included.
fn template(release: &str, namespace: &str, sets: &[&str]) -> String {
    let mut command = helm();
    command.args(["template", release]).arg(chart()).args([
        "--namespace",
        namespace,
        "--include-crds",
    ]);
    for set in sets {
        command.args(["--set", set]);
    }
    ok(command.output().unwrap(), "helm template")
}

/// The documents of a YAML stream as JSON values.
fn documents(yaml: &str) -> Vec<Value> {
    kiln_render::yaml::from_str_multi::<Value>(yaml, "helm template")
        .unwrap()
        .into_iter()
        .filter(Value::is_object)
        .collect()
}

/// A kubeconfig of the test cluster whose user is `token`.
fn token_kubeconfig(dir: &Path, token: &str) -> PathBuf {
    let admin = std::fs::read_to_string(&kiln_testenv::cluster().kubeconfig).unwrap();
    let text: String = admin
        .lines()
        .map(|line| match line.find("token: ") {
            Some(at) => format!("{}token: {token}\n", &line[..at]),
            None => format!("{line}\n"),
        })
        .collect();
    assert!(text.contains(token));
    let path = dir.join("kubeconfig");
    std::fs::write(&path, text).unwrap();
    path
}

struct Namespaces(Vec<String>);

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = kubectl(&["delete", "namespace", ns, "--wait=false"]);
        }
    }
}

/// The Ready condition of a Pipeline: status, reason, message.
fn ready(namespace: &str, name: &str) -> (String, String, String) {
    let out = kubectl(&[
        "get",
        "pipeline.kiln.dev",
        name,
        "-n",
        namespace,
        "-o",
        "json",
    ]);
    if !out.status.success() {
        return Default::default();
    }
    let pipeline: Value = serde_json::from_slice(&out.stdout).unwrap();
    pipeline["status"]["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "Ready"))
        .map(|c| {
            let field = |k: &str| c[k].as_str().unwrap_or_default().to_string();
            (field("status"), field("reason"), field("message"))
        })
        .unwrap_or_default()
}

#[test]
fn the_installed_chart_runs_the_controller_with_its_rights_only() {
    let release = kiln_testenv::unique_name("kc");
    let system = kiln_testenv::unique_name("kiln-sys");
    let tenant = kiln_testenv::unique_name("team");
    let other = kiln_testenv::unique_name("other");
    let _cleanup = Namespaces(vec![system.clone(), tenant.clone(), other.clone()]);
    kubectl_ok(&["create", "namespace", &system]);
    let selector = format!("kiln.test/release={release}");
    let manifests = template(
        &release,
        &system,
        &[
            "admissionPolicy.enabled=true",
            &format!(
                "admissionPolicy.namespaceSelector.matchLabels.kiln\\.test/tenant-of={release}"
            ),
            "admissionPolicy.allowedGitUrlPrefixes[0]=https://git.example.com/",
            &format!("selector={selector}"),
        ],
    );
    let objects = documents(&manifests);
    apply(&manifests);
    let deployment = objects.iter().find(|o| o["kind"] == "Deployment").unwrap();
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    // The pod is hardened as the chart promises.
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(
        container["securityContext"]["allowPrivilegeEscalation"],
        false
    );
    assert_eq!(
        container["securityContext"]["capabilities"]["drop"][0],
        "ALL"
    );
    assert_eq!(deployment["spec"]["replicas"], 2);
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert!(objects.iter().any(|o| o["kind"] == "PodDisruptionBudget"));
    let account = pod["serviceAccountName"].as_str().unwrap().to_string();

    // The controller runs with a token of the chart's ServiceAccount and the
    // Deployment's own arguments (the pod's addresses and paths aside).
    let token = kubectl_ok(&["create", "token", &account, "-n", &system, "--duration=1h"]);
    let work = tempfile::tempdir().unwrap();
    let kubeconfig = token_kubeconfig(work.path(), token.trim());
    let addr = free_addr();
    let args: Vec<String> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .map(|a| {
            if a.starts_with("--metrics-addr=") {
                format!("--metrics-addr={addr}")
            } else if a.starts_with("--cache-dir=") {
                format!("--cache-dir={}", work.path().join("cache").display())
            } else {
                a
            }
        })
        .collect();
    assert!(
        args.contains(&"--require-service-account".to_string()),
        "{args:?}"
    );
    assert!(args.contains(&"--leader-elect".to_string()), "{args:?}");
    let log = work.path().join("controller.log");
    let mut controller = common::kiln_command()
        .args(&args)
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .env("KILN_LOG", "info,kube=warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .map(Running::new)
        .unwrap();

    // A tenant: a namespace the policy covers, an account that may manage
    // ConfigMaps there, rows in a file.
    kubectl_ok(&["create", "namespace", &tenant]);
    kubectl_ok(&[
        "label",
        "namespace",
        &tenant,
        "kiln.dev/tenant=true",
        &format!("kiln.test/tenant-of={release}"),
    ]);
    kubectl_ok(&["create", "namespace", &other]);
    apply(&format!(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: deployer, namespace: {tenant}}}\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata: {{name: deployer, namespace: {tenant}}}\n\
         rules:\n- {{apiGroups: [\"\"], resources: [configmaps], verbs: [get, list, watch, create, update, patch, delete]}}\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {{name: deployer, namespace: {tenant}}}\n\
         roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: deployer}}\n\
         subjects:\n- {{kind: ServiceAccount, name: deployer, namespace: {tenant}}}\n"
    ));
    let rows = work.path().join("rows.yaml");
    std::fs::write(
        &rows,
        format!("- {{id: a, plan: gold, ns: {tenant}}}\n- {{id: b, plan: gold, ns: {tenant}}}\n"),
    )
    .unwrap();
    let template = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: \"plan-{{ key }}\", namespace: \"{{ row.ns }}\"}\ndata: {plan: \"{{ row.plan }}\"}\n";
    let blueprint = |extra: &str| {
        format!(
            "apiVersion: kiln.dev/v1alpha1\nkind: Blueprint\nmetadata: {{name: app, namespace: {tenant}}}\n\
             spec:\n  source: rows\n  resources:\n  - id: plan\n    template: |\n{}{extra}",
            template
                .lines()
                .map(|l| format!("      {l}\n"))
                .collect::<String>()
        )
    };
    apply_admitted(&format!(
        "apiVersion: kiln.dev/v1alpha1\nkind: Source\nmetadata: {{name: rows, namespace: {tenant}}}\n\
         spec: {{url: \"file:{}\", key: id, interval: 1s}}\n---\n{}",
        rows.display(),
        blueprint("")
    ));
    let pipeline = |spec: &str| {
        format!(
            "apiVersion: kiln.dev/v1alpha1\nkind: Pipeline\nmetadata:\n  name: main\n  namespace: {tenant}\n  labels: {{kiln.test/release: {release}}}\nspec: {spec}\n"
        )
    };

    // The admission policy refuses what tenants may not ask for, each with
    // its message.
    let message = refusal(&pipeline("{}"));
    assert!(message.contains("must name a ServiceAccount"), "{message}");
    let message = refusal(&pipeline(
        "{serviceAccountName: deployer, git: {url: \"https://elsewhere.example.com/x.git\"}}",
    ));
    assert!(
        message.contains("is not under a Git URL allowed for tenants"),
        "{message}"
    );
    let forced = blueprint("    conflictPolicy: Force\n").replace("name: app", "name: forced");
    let message = refusal(&forced);
    assert!(message.contains("conflictPolicy: Force"), "{message}");
    let cluster_scoped = blueprint("")
        .replace("name: app", "name: namespaces")
        .replace("kind: ConfigMap", "kind: Namespace");
    let message = refusal(&cluster_scoped);
    assert!(
        message.contains("may not render cluster-scoped objects"),
        "{message}"
    );
    let declared = blueprint("    clusterScoped: true\n").replace("name: app", "name: declared");
    let message = refusal(&declared);
    assert!(
        message.contains("may not render cluster-scoped objects"),
        "{message}"
    );
    // Outside the tenants' namespaces the policy does not apply.
    let (admitted, message) = admits(&forced.replace(&tenant, &other));
    assert!(admitted, "{message}");

    // Within its rights the Pipeline is applied.
    apply(&pipeline("{serviceAccountName: deployer}"));
    eventually("Ready", Duration::from_secs(90), || {
        ready(&tenant, "main").0 == "True"
    });
    let plan = |ns: &str, name: &str| {
        let out = kubectl(&[
            "get",
            "configmap",
            name,
            "-n",
            ns,
            "-o",
            "jsonpath={.data.plan}",
        ]);
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    };
    assert_eq!(plan(&tenant, "plan-a").as_deref(), Some("gold"));
    assert_eq!(plan(&tenant, "plan-b").as_deref(), Some("gold"));
    // Events on the Pipeline, with the chart's rights.
    let events = kubectl_ok(&[
        "get",
        "events.events.k8s.io",
        "-n",
        &tenant,
        "--field-selector",
        "regarding.name=main,regarding.kind=Pipeline",
        "-o",
        "jsonpath={.items[*].reason}",
    ]);
    assert!(events.contains("Applied"), "events: {events}");
    // The inventory is the controller's, in its own namespace.
    let inventories = kubectl_ok(&[
        "get",
        "configmaps",
        "-n",
        &system,
        "-l",
        "kiln.dev/inventory-of",
        "-o",
        "name",
    ]);
    assert!(!inventories.trim().is_empty(), "no inventory in {system}");

    // A row reaches beyond the account: refused by the API server, named in
    // the status, nothing created there; the rest still applied.
    std::fs::write(
        &rows,
        format!(
            "- {{id: a, plan: silver, ns: {tenant}}}\n- {{id: b, plan: silver, ns: {other}}}\n"
        ),
    )
    .unwrap();
    eventually("ApplyFailed", Duration::from_secs(60), || {
        let (status, reason, _) = ready(&tenant, "main");
        status == "False" && reason == "ApplyFailed"
    });
    let (_, _, message) = ready(&tenant, "main");
    assert!(
        message.contains(&format!("system:serviceaccount:{tenant}:deployer"))
            && message.contains("configmaps")
            && message.contains(&other),
        "{message}"
    );
    assert_eq!(plan(&tenant, "plan-a").as_deref(), Some("silver"));
    assert_eq!(
        plan(&other, "plan-b"),
        None,
        "nothing outside the account's rights"
    );

    // The metrics served answer every name the dashboard and the alerts use.
    let served = http_get(&addr, "/metrics");
    for file in ["files/dashboard.json", "files/alerts.yaml"] {
        let text = std::fs::read_to_string(chart().join(file)).unwrap();
        let names = metric_names(&text);
        assert!(!names.is_empty(), "{file} names no metric");
        for name in names {
            assert!(
                served
                    .lines()
                    .any(|l| l.starts_with(&format!("{name}{{"))
                        || l.starts_with(&format!("{name} "))),
                "{file} uses {name}, which the controller does not export:\n{served}"
            );
        }
    }
    let out = controller.terminate();
    assert!(
        out.status.success(),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(
        !log.contains(token.trim()),
        "the token must not appear in the log"
    );
    for object in objects.iter().filter(|o| {
        matches!(
            o["kind"].as_str(),
            Some(
                "ClusterRole"
                    | "ClusterRoleBinding"
                    | "ValidatingAdmissionPolicy"
                    | "ValidatingAdmissionPolicyBinding"
            )
        )
    }) {
        let kind = object["kind"].as_str().unwrap().to_lowercase();
        let name = object["metadata"]["name"].as_str().unwrap();
        let _ = kubectl(&["delete", &kind, name, "--wait=false"]);
    }
}

/// The names of Kiln's metrics an expression text uses (histogram series
/// by their exported names, `_bucket` included).
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("kiln_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let before = rest[..at].chars().last();
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            names.insert(tail[..end].to_string());
        }
        rest = &tail[end..];
    }
    names
}

/// promtool, built from the Go module proxy into the test cache (or found
/// there).
fn promtool() -> Command {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/promtool/build.sh");
    let out = Command::new("bash").arg(script).output().unwrap();
    assert!(out.status.success(), "building promtool: {}", stderr(&out));
    Command::new(String::from_utf8(out.stdout).unwrap().trim())
}

#[test]
fn the_alerts_are_valid_rules_and_their_unit_tests_pass() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let checked = promtool()
        .args(["check", "rules"])
        .arg(chart().join("files/alerts.yaml"))
        .output()
        .unwrap();
    let text = ok(checked, "promtool check rules");
    assert!(text.contains("SUCCESS: 11 rules found"), "{text}");
    let tested = promtool()
        .args(["test", "rules"])
        .arg(root.join("tests/promtool/alerts_test.yaml"))
        .output()
        .unwrap();
    let text = ok(tested, "promtool test rules");
    assert!(text.contains("SUCCESS"), "{text}");
}
