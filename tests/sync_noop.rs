//! Applying the same tree twice sends no write the second time, as the API
//! server's own request counters tell. Alone in its test binary so that no
//! other test writes while it counts.

#![allow(clippy::unwrap_used)] // a test that cannot go on fails, with the cause

mod common;

use common::{has_count, kiln, stderr};

/// Writes (anything but reads and watches, dry-runs included) the API
/// server has answered for `resources`.
fn writes(resources: &[&str]) -> u64 {
    let out = kiln_testenv::cluster()
        .kubectl()
        .args(["get", "--raw", "/metrics"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    text.lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
        .filter(|l| {
            [
                "POST",
                "PUT",
                "PATCH",
                "APPLY",
                "DELETE",
                "DELETECOLLECTION",
            ]
            .iter()
            .any(|v| l.contains(&format!("verb=\"{v}\"")))
        })
        .filter(|l| {
            resources
                .iter()
                .any(|r| l.contains(&format!("resource=\"{r}\"")))
        })
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap() as u64)
        .sum()
}

#[test]
fn a_second_apply_of_the_same_tree_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = kiln_testenv::unique_name("noop");
    let cfg = common::tenants(
        dir.path(),
        &prefix,
        20,
        "  - id: config\n    dependsOn: [namespace]\n    template: |\n      apiVersion: v1\n      kind: ConfigMap\n      metadata: {name: config}\n      data: {key: \"{{ key }}\"}\n\
         \x20\x20- id: secret\n    dependsOn: [namespace]\n    template: |\n      apiVersion: v1\n      kind: Secret\n      metadata: {name: secret}\n      stringData: {password: \"{{ key }}\"}\n\
         \x20\x20- id: service\n    dependsOn: [namespace]\n    template: |\n      apiVersion: v1\n      kind: Service\n      metadata: {name: web}\n      spec: {ports: [{port: 80}], selector: {app: web}}\n\
         \x20\x20- id: app\n    dependsOn: [config]\n    template: |\n      apiVersion: apps/v1\n      kind: Deployment\n      metadata: {name: web}\n      spec:\n        replicas: 0\n        selector: {matchLabels: {app: web}}\n        template:\n          metadata: {labels: {app: web}}\n          spec:\n            containers:\n            - name: web\n              image: nginx\n              resources: {requests: {cpu: 0.5, memory: 64Mi}}\n",
    );
    let out_dir = dir.path().join("out");
    let render = kiln(&[
        "render",
        "-f",
        cfg.to_str().unwrap(),
        "--out",
        out_dir.to_str().unwrap(),
        "--allow-plaintext-secrets",
    ]);
    assert!(render.status.success(), "{}", stderr(&render));
    let cluster = kiln_testenv::cluster();
    let apply = || {
        kiln(&[
            "apply",
            "--dir",
            out_dir.to_str().unwrap(),
            "--kubeconfig",
            cluster.kubeconfig.to_str().unwrap(),
            "--inventory",
            &prefix,
        ])
    };
    let resources = [
        "namespaces",
        "configmaps",
        "secrets",
        "services",
        "deployments",
    ];

    let first = apply();
    assert!(first.status.success(), "{}", stderr(&first));
    assert!(
        has_count(&stderr(&first), "created", 100),
        "{}",
        stderr(&first)
    );
    // The controllers finish with the new namespaces: each has its
    // default ServiceAccount.
    common::eventually(
        "every namespace's default ServiceAccount",
        std::time::Duration::from_secs(60),
        || {
            let out = cluster
                .kubectl()
                .args([
                    "get",
                    "serviceaccounts",
                    "-A",
                    "--field-selector",
                    "metadata.name=default",
                    "-o",
                    "jsonpath={range .items[*]}{.metadata.namespace}{\"\\n\"}{end}",
                ])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|ns| ns.starts_with(&format!("{prefix}-")))
                .count()
                == 20
        },
    );

    let before = writes(&resources);
    let second = apply();
    assert!(second.status.success(), "{}", stderr(&second));
    assert!(
        has_count(&stderr(&second), "unchanged", 100),
        "{}",
        stderr(&second)
    );
    let after = writes(&resources);
    assert_eq!(after - before, 0, "the no-op apply wrote");
    assert!(
        before > 100,
        "the counters saw the first apply's writes ({before})"
    );
}
