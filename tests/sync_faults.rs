//! Faults during an apply, on a cluster of this test binary's own: the API
//! server restarting in the middle. Nothing is lost: the apply retries,
//! finishes, and every object and the inventory are there.

#![allow(clippy::unwrap_used)] // a test that cannot go on fails, with the cause

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::stderr;

#[test]
fn an_api_server_restart_in_the_middle_of_an_apply_loses_nothing() {
    // The restart must land while objects are being written: the report
    // counts the requests the server did not answer. When an attempt misses
    // that window (the apply finished first), it runs again.
    for attempt in 1..=3 {
        if restart_during_apply() {
            return;
        }
        eprintln!("attempt {attempt}: the restart missed the apply; again");
    }
    panic!("in three attempts the restart never landed during the apply");
}

/// The number in "… and N it did not answer" of an apply report.
fn unanswered(report: &str) -> u64 {
    report
        .split("requests throttled by the API server (429) and ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// One apply with a restart of the API server after its first objects;
/// false when the apply was over before the restart began.
fn restart_during_apply() -> bool {
    let cluster = kiln_testenv::own_cluster();
    let dir = tempfile::tempdir().unwrap();
    let prefix = kiln_testenv::unique_name("restart");
    let n = 60;
    let cfg = common::tenants(
        dir.path(),
        &prefix,
        n,
        "  - id: one\n    dependsOn: [namespace]\n    template: |\n      apiVersion: v1\n      kind: ConfigMap\n      metadata: {name: one}\n\
         \x20\x20- id: two\n    dependsOn: [one]\n    template: |\n      apiVersion: v1\n      kind: ConfigMap\n      metadata: {name: two}\n\
         \x20\x20- id: three\n    dependsOn: [two]\n    template: |\n      apiVersion: v1\n      kind: ConfigMap\n      metadata: {name: three}\n",
    );
    let out = dir.path().join("out");
    let render = common::kiln(&[
        "render",
        "-f",
        cfg.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(render.status.success(), "{}", stderr(&render));

    // One write at a time, so that the apply is still going when the
    // server goes away.
    let mut apply = common::kiln_command()
        .args([
            "apply",
            "--dir",
            out.to_str().unwrap(),
            "--concurrency",
            "1",
            "--inventory",
            &prefix,
        ])
        .arg("--kubeconfig")
        .arg(&cluster.kubeconfig)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map(common::Running::new)
        .unwrap();
    let namespaces = || {
        let out = cluster
            .kubectl()
            .args(["get", "namespaces", "-o", "name"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .matches(&prefix)
            .count()
    };
    let start = Instant::now();
    while namespaces() < 5 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the apply did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    cluster.restart_api_server(Duration::from_secs(2)).unwrap();
    let result = apply.wait();
    assert!(result.status.success(), "{}", stderr(&result));
    if unanswered(&stderr(&result)) == 0 {
        return false;
    }
    assert!(
        stderr(&result).contains(&format!("created {}", n * 4)),
        "{}",
        stderr(&result)
    );
    let objects = cluster
        .kubectl()
        .args([
            "get",
            "configmaps",
            "-A",
            "-o",
            "name",
            "-l",
            "kiln.dev/blueprint=app",
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&objects.stdout).lines().count(),
        n * 3
    );
    let inventory = cluster
        .kubectl()
        .args([
            "get",
            "configmaps",
            "-n",
            "kiln-system",
            "-l",
            &format!("kiln.dev/inventory-of={prefix}"),
            "-o",
            "jsonpath={.items[*].data.entries}",
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&inventory.stdout)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .count(),
        n * 4
    );
    true
}
