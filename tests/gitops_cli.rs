//! What ArgoCD and Flux consume: the rendered branch builds with the test
//! environment's `kubectl kustomize` and a real API server accepts the result
//! with server-side apply; the emitted ApplicationSet and Flux objects say
//! what those tools need.

#![allow(clippy::unwrap_used)] // a test that cannot go on fails, with the cause

mod common;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::{git, kiln};
use serde_json::Value;

fn kubectl(args: &[&str], input: Option<&[u8]>) -> Output {
    let cluster = kiln_testenv::cluster();
    let mut child = Command::new(&cluster.kubectl)
        .arg("--kubeconfig")
        .arg(&cluster.kubeconfig)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(input) = input {
        child.stdin.take().unwrap().write_all(input).unwrap();
    } else {
        drop(child.stdin.take());
    }
    child.wait_with_output().unwrap()
}

fn demo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/demo")
}

fn documents(text: &str) -> Vec<Value> {
    kiln_render::yaml::from_str_multi::<Value>(text, "emitted")
        .unwrap()
        .into_iter()
        .filter(|d| !d.is_null())
        .collect()
}

#[test]
fn the_rendered_branch_builds_with_kustomize_and_the_api_server_accepts_it() {
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("repo.git");
    git(
        work.path(),
        &["init", "-q", "--bare", repo.to_str().unwrap()],
    );
    let demo_copy = work.path().join("demo");
    std::fs::create_dir_all(&demo_copy).unwrap();
    for entry in ["source.yaml", "blueprint.yaml", "seed.sql"] {
        std::fs::copy(demo().join(entry), demo_copy.join(entry)).unwrap();
    }
    std::fs::create_dir_all(demo_copy.join("templates")).unwrap();
    for entry in std::fs::read_dir(demo().join("templates")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(
            &path,
            demo_copy.join("templates").join(path.file_name().unwrap()),
        )
        .unwrap();
    }
    let output = kiln(&[
        "render",
        "-f",
        demo_copy.to_str().unwrap(),
        "--git",
        repo.to_str().unwrap(),
        "--branch",
        "rendered",
        "--path",
        "clusters/prod",
        "--emit",
        "argocd",
        "--emit",
        "flux",
        "--repo-url",
        "https://git.example.com/platform/rendered.git",
    ]);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let checkout = work.path().join("checkout");
    git(
        work.path(),
        &[
            "clone",
            "-q",
            "-b",
            "rendered",
            repo.to_str().unwrap(),
            checkout.to_str().unwrap(),
        ],
    );
    let root = checkout.join("clusters/prod");

    let built = kubectl(&["kustomize", root.to_str().unwrap()], None);
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let objects = documents(&String::from_utf8_lossy(&built.stdout));
    assert_eq!(
        objects.len(),
        351,
        "every rendered object, and nothing from _kiln"
    );
    assert!(
        objects
            .iter()
            .all(|o| o["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "kiln")
    );

    // Namespaces exist before a dry run can accept what goes into them.
    let namespaces: Vec<String> = objects
        .iter()
        .filter(|o| o["kind"] == "Namespace")
        .map(|o| kiln_render::yaml::to_string(o).unwrap())
        .collect();
    let created = kubectl(
        &[
            "apply",
            "--server-side",
            "--field-manager",
            "kiln-test",
            "-f",
            "-",
        ],
        Some(format!("---\n{}", namespaces.join("---\n")).as_bytes()),
    );
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let applied = kubectl(
        &["apply", "--server-side", "--dry-run=server", "-f", "-"],
        Some(&built.stdout),
    );
    assert!(
        applied.status.success(),
        "{}",
        String::from_utf8_lossy(&applied.stderr)
    );
    let lines = String::from_utf8_lossy(&applied.stdout).lines().count();
    assert_eq!(lines, 351, "{}", String::from_utf8_lossy(&applied.stdout));
    // Only the namespaces this test created: a label selector would delete
    // every Kiln namespace of the cluster, other tests' included.
    let names: Vec<&str> = objects
        .iter()
        .filter(|o| o["kind"] == "Namespace")
        .filter_map(|o| o["metadata"]["name"].as_str())
        .collect();
    let mut args = vec!["delete", "namespace", "--wait=false"];
    args.extend(&names);
    let deleted = kubectl(&args, None);
    assert!(
        deleted.status.success(),
        "{}",
        String::from_utf8_lossy(&deleted.stderr)
    );

    // ArgoCD: one Application per instance directory, from this branch.
    let argocd = documents(&std::fs::read_to_string(root.join("_kiln/argocd.yaml")).unwrap());
    assert_eq!(argocd.len(), 1);
    let set = &argocd[0];
    assert_eq!(set["kind"], "ApplicationSet");
    let generator = &set["spec"]["generators"][0]["git"];
    assert_eq!(
        generator["repoURL"],
        "https://git.example.com/platform/rendered.git"
    );
    assert_eq!(generator["revision"], "rendered");
    assert_eq!(generator["directories"][0]["path"], "clusters/prod/*/*");
    assert_eq!(
        set["spec"]["template"]["metadata"]["name"],
        "{{ index .path.segments 2 }}-{{ .path.basename }}"
    );
    assert_eq!(
        set["spec"]["template"]["spec"]["source"]["path"],
        "{{ .path.path }}"
    );
    assert_eq!(
        set["spec"]["template"]["spec"]["syncPolicy"]["syncOptions"][0],
        "ServerSideApply=true"
    );
    // Every directory the generator matches holds a kustomization.
    let instances = git(
        &repo,
        &["ls-tree", "-d", "--name-only", "rendered:clusters/prod/web"],
    );
    assert_eq!(instances.lines().count(), 45);
    for instance in instances.lines() {
        assert!(
            root.join("web")
                .join(instance)
                .join("kustomization.yaml")
                .exists()
        );
    }

    // Flux: a source and one Kustomization per blueprint, waiting for health.
    let flux = documents(&std::fs::read_to_string(root.join("_kiln/flux.yaml")).unwrap());
    assert_eq!(flux.len(), 2);
    assert_eq!(flux[0]["kind"], "GitRepository");
    assert_eq!(flux[0]["spec"]["ref"]["branch"], "rendered");
    assert_eq!(flux[1]["kind"], "Kustomization");
    assert_eq!(flux[1]["spec"]["path"], "./clusters/prod/web");
    assert_eq!(
        flux[1]["spec"]["sourceRef"]["name"],
        flux[0]["metadata"]["name"]
    );
    assert_eq!(flux[1]["spec"]["wait"], true);
    assert_eq!(flux[1]["spec"]["prune"], true);

    // A pull request check compares what the configuration renders, not the
    // emitted files.
    let output = kiln(&[
        "diff",
        "-f",
        demo_copy.to_str().unwrap(),
        "--git",
        repo.to_str().unwrap(),
        "--branch",
        "rendered",
        "--path",
        "clusters/prod",
        "--exit-code",
    ]);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );

    // The emitted files are Kiln's: a render without --emit removes them.
    let output = kiln(&[
        "render",
        "-f",
        demo_copy.to_str().unwrap(),
        "--git",
        repo.to_str().unwrap(),
        "--branch",
        "rendered",
        "--path",
        "clusters/prod",
    ]);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let top = git(&repo, &["ls-tree", "--name-only", "rendered:clusters/prod"]);
    assert_eq!(
        top.lines().collect::<Vec<_>>(),
        ["kustomization.yaml", "web"]
    );
}
