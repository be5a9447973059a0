//! `kiln apply` as an identity that is not a cluster administrator: the test
//! environment's limited user, with only the RBAC each test grants it in a
//! namespace of its own, and throttled hard by API Priority and Fairness.
//! Administrators are exempt from both, so only this identity can show Kiln
//! meeting real 429 answers and real refusals.

#![allow(clippy::unwrap_used)] // a test that cannot go on fails, with the cause

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use common::{has_count, kiln, stderr, stdout};

/// A namespace of the test's own, where the limited identity may do `verbs`
/// to ConfigMaps and nothing else.
struct Grant {
    namespace: String,
}

impl Grant {
    fn new(hint: &str, verbs: &str) -> Self {
        let namespace = kiln_testenv::unique_name(hint);
        admin(&["create", "namespace", &namespace]);
        admin(&[
            "create",
            "role",
            "kiln",
            "-n",
            &namespace,
            &format!("--verb={verbs}"),
            "--resource=configmaps",
        ]);
        admin(&[
            "create",
            "rolebinding",
            "kiln",
            "-n",
            &namespace,
            "--role=kiln",
            &format!("--user={}", kiln_testenv::LIMITED_USER),
        ]);
        wait_allowed("create", &namespace);
        Self { namespace }
    }

    /// Renders `rows` instances of one ConfigMap each, all in the granted
    /// namespace, into `dir/out`.
    fn render(&self, dir: &Path, rows: usize) -> PathBuf {
        let rows: String = (0..rows).map(|i| format!("- {{id: t{i}}}\n")).collect();
        std::fs::write(dir.join("rows.yaml"), rows).unwrap();
        std::fs::write(
            dir.join("kiln.yaml"),
            format!(
                "apiVersion: kiln.dev/v1alpha1\nkind: Source\nmetadata: {{name: rows}}\n\
                 spec: {{url: \"file:rows.yaml\", key: id}}\n---\n\
                 apiVersion: kiln.dev/v1alpha1\nkind: Blueprint\nmetadata: {{name: app}}\n\
                 spec:\n  source: rows\n  namespace: {ns}\n  resources:\n  - id: cm\n    template: |\n      \
                 apiVersion: v1\n      kind: ConfigMap\n      metadata: {{name: \"cm-{{{{ key }}}}\"}}\n      \
                 data: {{key: \"{{{{ key }}}}\"}}\n",
                ns = self.namespace
            ),
        )
        .unwrap();
        let out = dir.join("out");
        let render = kiln(&[
            "render",
            "-f",
            dir.join("kiln.yaml").to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(render.status.success(), "{}", stderr(&render));
        out
    }

    /// `kiln apply` of `out` as the limited identity, with the inventory in
    /// the granted namespace.
    fn apply(&self, out: &Path, concurrency: &str) -> Output {
        kiln(&[
            "apply",
            "--dir",
            out.to_str().unwrap(),
            "--kubeconfig",
            limited_kubeconfig().to_str().unwrap(),
            "--inventory",
            "limited",
            "--inventory-namespace",
            &self.namespace,
            "--concurrency",
            concurrency,
        ])
    }

    fn config_maps(&self) -> Vec<String> {
        let out = admin(&[
            "get",
            "configmaps",
            "-n",
            &self.namespace,
            "-l",
            "kiln.dev/blueprint=app",
            "-o",
            "name",
        ]);
        out.lines().map(str::to_string).collect()
    }

    fn inventory_entries(&self) -> usize {
        admin(&[
            "get",
            "configmaps",
            "-n",
            &self.namespace,
            "-l",
            "kiln.dev/inventory-of=limited",
            "-o",
            "jsonpath={.items[*].data.entries}",
        ])
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count()
    }
}

fn limited_kubeconfig() -> PathBuf {
    kiln_testenv::cluster()
        .limited_kubeconfig
        .clone()
        .unwrap_or_else(|| {
            panic!(
                "the test cluster has no limited identity: set {} (tests/env up prints it)",
                kiln_testenv::LIMITED_KUBECONFIG_VAR
            )
        })
}

/// Waits until the API server's authorizer lets the limited identity `verb`
/// ConfigMaps in `namespace`: a new RoleBinding takes effect once the
/// server's informers have seen it.
fn wait_allowed(verb: &str, namespace: &str) {
    let start = Instant::now();
    loop {
        let out = kiln_testenv::cluster()
            .kubectl()
            .arg("--kubeconfig")
            .arg(limited_kubeconfig())
            .args(["auth", "can-i", verb, "configmaps", "-n", namespace])
            .output()
            .unwrap();
        if stdout(&out).trim() == "yes" {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{verb} configmaps in {namespace} was never allowed: {}{}",
            stdout(&out),
            stderr(&out)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// kubectl as an administrator; panics unless it succeeds; its stdout.
fn admin(args: &[&str]) -> String {
    let out = kiln_testenv::cluster()
        .kubectl()
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "kubectl {args:?}: {}", stderr(&out));
    stdout(&out)
}

/// How many requests API Priority and Fairness rejected at the limited
/// identity's priority level so far, from the API server's own metrics.
fn rejected_at_limited_level() -> u64 {
    let level = format!("priority_level=\"{}\"", kiln_testenv::LIMITED_USER);
    admin(&["get", "--raw", "/metrics"])
        .lines()
        .filter(|l| l.starts_with("apiserver_flowcontrol_rejected_requests_total{"))
        .filter(|l| l.contains(&level))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// The count in "retried N requests throttled" of a summary, 0 without one.
fn throttled_in_summary(text: &str) -> u64 {
    text.split("retried ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[test]
fn the_limited_identity_is_refused_what_it_was_not_granted() {
    let out = kiln_testenv::cluster()
        .kubectl()
        .arg("--kubeconfig")
        .arg(limited_kubeconfig())
        .args(["get", "configmaps", "-n", "kube-system"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains(&format!(
            "User \"{}\" cannot list resource \"configmaps\"",
            kiln_testenv::LIMITED_USER
        )),
        "{}",
        stderr(&out)
    );
}

#[test]
fn an_apply_throttled_with_429_retries_and_applies_everything() {
    let grant = Grant::new("throttled", "get,list,watch,create,update,patch,delete");
    let dir = tempfile::tempdir().unwrap();
    let n = 300;
    let out = grant.render(dir.path(), n);

    let rejected_before = rejected_at_limited_level();
    // Far more writes in flight than the priority level has seats.
    let apply = grant.apply(&out, "32");
    let rejected = rejected_at_limited_level() - rejected_before;
    let log = stderr(&apply);
    assert!(apply.status.success(), "{log}");
    assert!(has_count(&log, "created", n), "{log}");
    assert!(has_count(&log, "failed", 0), "{log}");

    // The server did answer 429, and Kiln says it retried those answers.
    assert!(
        rejected > 0,
        "API Priority and Fairness rejected nothing at the limited level: {log}"
    );
    let throttled = throttled_in_summary(&log);
    assert!(
        throttled > 0,
        "kiln reports no throttled request though the server rejected {rejected}: {log}"
    );
    assert!(
        throttled <= rejected,
        "kiln reports {throttled} throttled requests, the server rejected {rejected}"
    );

    // Nothing lost: every object and every inventory entry is there.
    assert_eq!(grant.config_maps().len(), n);
    assert_eq!(grant.inventory_entries(), n);
}

#[test]
fn a_prune_the_identity_may_not_do_fails_naming_it_and_keeps_the_inventory() {
    // Everything on ConfigMaps but delete.
    let grant = Grant::new("nodelete", "get,list,watch,create,update,patch");
    let dir = tempfile::tempdir().unwrap();
    let out = grant.render(dir.path(), 10);
    let first = grant.apply(&out, "4");
    assert!(first.status.success(), "{}", stderr(&first));
    assert!(
        has_count(&stderr(&first), "created", 10),
        "{}",
        stderr(&first)
    );

    // t9 leaves the tree: its ConfigMap is up for pruning, which is refused.
    let out = grant.render(dir.path(), 9);
    let second = grant.apply(&out, "4");
    let text = format!("{}{}", stdout(&second), stderr(&second));
    assert_eq!(second.status.code(), Some(2), "{text}");
    let refused = format!(
        "cannot delete resource \"configmaps\" in API group \"\" in the namespace \"{}\"",
        grant.namespace
    );
    let line = text
        .lines()
        .find(|l| l.starts_with("failed ConfigMap"))
        .unwrap_or_else(|| panic!("no failed object reported: {text}"));
    assert!(
        line.contains(&format!("{}/cm-t9", grant.namespace)),
        "{line}"
    );
    assert!(line.contains(&refused), "{line}");
    assert!(
        line.contains(&format!("User \"{}\"", kiln_testenv::LIMITED_USER)),
        "{line}"
    );
    assert!(has_count(&stderr(&second), "failed", 1), "{text}");

    // Nothing lost: the object stays, and so does its inventory entry, so
    // that an apply with the right permission prunes it later.
    assert_eq!(grant.config_maps().len(), 10);
    assert_eq!(grant.inventory_entries(), 10);
    admin(&[
        "create",
        "role",
        "kiln-delete",
        "-n",
        &grant.namespace,
        "--verb=delete",
        "--resource=configmaps",
    ]);
    admin(&[
        "create",
        "rolebinding",
        "kiln-delete",
        "-n",
        &grant.namespace,
        "--role=kiln-delete",
        &format!("--user={}", kiln_testenv::LIMITED_USER),
    ]);
    wait_allowed("delete", &grant.namespace);
    let third = grant.apply(&out, "4");
    assert!(third.status.success(), "{}", stderr(&third));
    assert!(
        has_count(&stderr(&third), "pruned", 1),
        "{}",
        stderr(&third)
    );
    assert_eq!(grant.config_maps().len(), 9);
    assert_eq!(grant.inventory_entries(), 9);
}
