//! Rendering into real Git repositories, end to end with the release-shaped
//! binary, checked with the git CLI: commits and no-ops, bare and non-bare
//! repositories, pushes, races, a killed render, determinism, drift,
//! rollback with a pin, and the guards.

#![allow(clippy::unwrap_used)] // a test that cannot go on fails, with the cause

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::{git, kiln, stderr, stdout};

fn bare_repo(parent: &Path, name: &str) -> PathBuf {
    let path = parent.join(name);
    git(parent, &["init", "-q", "--bare", path.to_str().unwrap()]);
    path
}

/// A configuration directory: a SQLite source seeded from SQL, a blueprint
/// with a Namespace, a ConfigMap and (with `secret`) a Secret.
struct Project {
    dir: tempfile::TempDir,
}

impl Project {
    fn new(tenants: &[(&str, u32)], secret: bool) -> Project {
        let project = Project {
            dir: tempfile::tempdir().unwrap(),
        };
        std::fs::write(
            project.path().join("source.yaml"),
            "apiVersion: kiln.dev/v1alpha1\nkind: Source\nmetadata: {name: tenants}\nspec:\n  url: sqlite://tenants.db\n  seedFile: seed.sql\n  query: SELECT slug, replicas FROM tenants ORDER BY slug\n  key: slug\n",
        )
        .unwrap();
        let mut resources = String::from(
            "  - id: namespace\n    template: |\n      apiVersion: v1\n      kind: Namespace\n      metadata: {name: \"tenant-{{ key }}\"}\n  - id: config\n    dependsOn: [namespace]\n    template: |\n      apiVersion: v1\n      kind: ConfigMap\n      metadata: {name: settings}\n      data:\n        replicas: \"{{ row.replicas }}\"\n",
        );
        if secret {
            resources.push_str("  - id: credentials\n    dependsOn: [namespace]\n    template: |\n      apiVersion: v1\n      kind: Secret\n      metadata: {name: credentials}\n      stringData:\n        password: \"hunter{{ row.replicas }}\"\n");
        }
        std::fs::write(
            project.path().join("blueprint.yaml"),
            format!("apiVersion: kiln.dev/v1alpha1\nkind: Blueprint\nmetadata: {{name: web}}\nspec:\n  source: tenants\n  namespace: \"tenant-{{{{ key }}}}\"\n  resources:\n{resources}"),
        )
        .unwrap();
        project.rows(tenants);
        project
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn arg(&self) -> &str {
        self.path().to_str().unwrap()
    }

    /// Replaces the table's rows (the database is recreated from the seed).
    fn rows(&self, tenants: &[(&str, u32)]) {
        let mut seed = String::from(
            "CREATE TABLE tenants (slug TEXT PRIMARY KEY, replicas INTEGER);\nBEGIN;\n",
        );
        for (slug, replicas) in tenants {
            seed.push_str(&format!(
                "INSERT INTO tenants VALUES ('{slug}', {replicas});\n"
            ));
        }
        seed.push_str("COMMIT;\n");
        std::fs::write(self.path().join("seed.sql"), seed).unwrap();
        let _ = std::fs::remove_file(self.path().join("tenants.db"));
    }
}

fn tenants(n: usize) -> Vec<(String, u32)> {
    (0..n).map(|i| (format!("t{i:03}"), 1)).collect()
}

fn as_refs(rows: &[(String, u32)]) -> Vec<(&str, u32)> {
    rows.iter().map(|(s, r)| (s.as_str(), *r)).collect()
}

fn render(project: &Project, repo: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "render",
        "-f",
        project.arg(),
        "--git",
        repo.to_str().unwrap(),
        "--branch",
        "rendered",
    ];
    args.extend_from_slice(extra);
    kiln(&args)
}

fn commits(repo: &Path) -> usize {
    git(repo, &["rev-list", "--count", "rendered"])
        .parse()
        .unwrap()
}

#[test]
fn commits_only_what_changed_and_nothing_when_nothing_did() {
    let work = tempfile::tempdir().unwrap();
    let repo = bare_repo(work.path(), "repo.git");
    let project = Project::new(&[("acme", 1), ("globex", 2)], false);

    let output = render(&project, &repo, &[]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(commits(&repo), 1);
    let files = git(&repo, &["ls-tree", "-r", "--name-only", "rendered"]);
    assert_eq!(
        files.lines().collect::<Vec<_>>(),
        [
            "kustomization.yaml",
            "web/acme/config.yaml",
            "web/acme/kustomization.yaml",
            "web/acme/namespace.yaml",
            "web/globex/config.yaml",
            "web/globex/kustomization.yaml",
            "web/globex/namespace.yaml",
            "web/kustomization.yaml",
        ]
    );
    let message = git(&repo, &["log", "-1", "--format=%B", "rendered"]);
    assert!(
        message.starts_with("kiln: render web +2 ~0 -0\n"),
        "{message}"
    );
    for trailer in [
        "Kiln-Render: ",
        "Kiln-Path: .",
        "Kiln-Tree: ",
        "Kiln-Config: sha256:",
        "Kiln-Source: tenants sha256:",
    ] {
        assert!(message.contains(trailer), "{trailer} missing: {message}");
    }
    assert_eq!(
        git(&repo, &["log", "-1", "--format=%an <%ae>", "rendered"]),
        "Kiln Test <kiln@example.com>"
    );
    git(&repo, &["fsck", "--strict"]);

    // A no-op render makes no commit.
    let output = render(&project, &repo, &[]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(commits(&repo), 1, "{}", stderr(&output));

    // One row changed: one commit touching only that instance's file; the
    // other instance's subtree is the very same tree object.
    let globex_before = git(&repo, &["rev-parse", "rendered:web/globex"]);
    project.rows(&[("acme", 3), ("globex", 2)]);
    let output = render(&project, &repo, &["--format", "json"]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let published: serde_json::Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(published["changed"], serde_json::json!(["web/acme"]));
    assert_eq!(published["written"], 1);
    assert_eq!(commits(&repo), 2);
    assert_eq!(
        git(&repo, &["diff", "--name-only", "rendered~1", "rendered"]),
        "web/acme/config.yaml"
    );
    assert_eq!(
        git(&repo, &["rev-parse", "rendered:web/globex"]),
        globex_before
    );
    let tree = git(&repo, &["rev-parse", "rendered^{tree}"]);
    assert_eq!(
        published["tree"],
        tree.as_str(),
        "the root is the rendered tree"
    );
}

#[test]
fn only_the_render_path_is_replaced_and_other_files_stay() {
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("repo");
    git(
        work.path(),
        &["init", "-q", "-b", "main", repo.to_str().unwrap()],
    );
    std::fs::write(repo.join("README.md"), "ours\n").unwrap();
    std::fs::create_dir_all(repo.join("clusters/prod")).unwrap();
    std::fs::write(repo.join("clusters/prod/notes.txt"), "also ours\n").unwrap();
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-qm", "start"]);
    let project = Project::new(&[("acme", 1)], false);

    // The checked-out branch of a non-bare repository: the work tree follows.
    let args = [
        "render",
        "-f",
        project.arg(),
        "--git",
        repo.to_str().unwrap(),
        "--path",
        "clusters/prod",
    ];
    let output = kiln(&args);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(
        git(&repo, &["status", "--porcelain"]),
        "",
        "work tree and index follow the commit"
    );
    assert!(repo.join("clusters/prod/web/acme/config.yaml").exists());
    assert_eq!(
        std::fs::read_to_string(repo.join("README.md")).unwrap(),
        "ours\n"
    );
    assert!(repo.join("clusters/prod/notes.txt").exists());
    assert_eq!(git(&repo, &["rev-list", "--count", "main"]), "2");

    // Uncommitted changes under the path are never overwritten.
    std::fs::write(repo.join("clusters/prod/web/acme/config.yaml"), "edited\n").unwrap();
    project.rows(&[("acme", 2)]);
    let output = kiln(&args);
    assert_eq!(output.status.code(), Some(2));
    let message = stderr(&output);
    assert!(
        message.contains("uncommitted changes under clusters/prod/"),
        "{message}"
    );
    assert!(
        message.contains("clusters/prod/web/acme/config.yaml"),
        "{message}"
    );
    assert_eq!(git(&repo, &["rev-list", "--count", "main"]), "2");
    assert_eq!(
        std::fs::read_to_string(repo.join("clusters/prod/web/acme/config.yaml")).unwrap(),
        "edited\n"
    );
}

#[test]
fn the_same_render_has_the_same_tree_id_in_two_repositories() {
    let work = tempfile::tempdir().unwrap();
    let project = Project::new(&as_refs(&tenants(30)), false);
    let mut trees = Vec::new();
    for name in ["one.git", "two.git"] {
        let repo = bare_repo(work.path(), name);
        let output = render(&project, &repo, &[]);
        assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
        trees.push(git(&repo, &["rev-parse", "rendered^{tree}"]));
    }
    assert_eq!(trees[0], trees[1]);
}

#[test]
fn push_goes_to_a_file_remote_and_refuses_non_fast_forwards() {
    let work = tempfile::tempdir().unwrap();
    let remote = bare_repo(work.path(), "remote.git");
    let local = bare_repo(work.path(), "local.git");
    let url = format!("file://{}", remote.display());
    git(&local, &["remote", "add", "origin", &url]);
    let project = Project::new(&[("acme", 1)], false);

    let output = render(&project, &local, &["--push"]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(
        git(&remote, &["rev-parse", "rendered"]),
        git(&local, &["rev-parse", "rendered"])
    );

    // Someone else pushes to the remote branch; ours is no longer a fast-forward.
    let other = work.path().join("other");
    git(
        work.path(),
        &[
            "clone",
            "-q",
            "-b",
            "rendered",
            &url,
            other.to_str().unwrap(),
        ],
    );
    std::fs::write(other.join("README.md"), "x\n").unwrap();
    git(&other, &["add", "README.md"]);
    git(&other, &["commit", "-qm", "readme"]);
    git(&other, &["push", "-q", "origin", "rendered"]);
    let remote_tip = git(&remote, &["rev-parse", "rendered"]);
    project.rows(&[("acme", 2)]);
    let output = render(&project, &local, &["--push"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("not a fast-forward"),
        "{}",
        stderr(&output)
    );
    assert_eq!(
        git(&remote, &["rev-parse", "rendered"]),
        remote_tip,
        "the remote keeps its commit"
    );
}

#[test]
fn concurrent_renders_on_one_branch_lose_no_commit() {
    // Four renders race for one branch; the race must make at least one
    // of them see the branch move and retry (its log says so). A round in
    // which they happened to take turns runs again.
    for round in 1..=5 {
        if race_four_renders() {
            return;
        }
        eprintln!("round {round}: no render had to retry; again");
    }
    panic!("in five rounds no render saw the branch move under it");
}

/// Four renders into one branch at once; whether one of them retried.
fn race_four_renders() -> bool {
    let work = tempfile::tempdir().unwrap();
    let repo = bare_repo(work.path(), "repo.git");
    // Renders long enough to overlap even when a loaded machine starts
    // the four processes one after another.
    let projects: Vec<Project> = (0..4)
        .map(|_| Project::new(&as_refs(&tenants(400)), false))
        .collect();
    let children: Vec<common::Running> = projects
        .iter()
        .enumerate()
        .map(|(i, p)| {
            common::kiln_command()
                .args([
                    "render",
                    "-f",
                    p.arg(),
                    "--git",
                    repo.to_str().unwrap(),
                    "--branch",
                    "rendered",
                ])
                .args(["--path", &format!("cluster-{i}")])
                .env("KILN_LOG", "info")
                .stderr(std::process::Stdio::piped())
                .spawn()
                .map(common::Running::new)
                .unwrap()
        })
        .collect();
    let mut retried = false;
    for mut child in children {
        let output = child.wait();
        assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
        retried |= stderr(&output).contains("the branch moved during the");
    }
    assert_eq!(commits(&repo), 4, "every render's commit is on the branch");
    for i in 0..4 {
        git(
            &repo,
            &[
                "rev-parse",
                &format!("rendered:cluster-{i}/web/t039/config.yaml"),
            ],
        );
    }
    git(&repo, &["fsck", "--strict"]);
    retried
}

#[test]
fn a_killed_render_leaves_the_repository_as_it_was() {
    let work = tempfile::tempdir().unwrap();
    let repo = bare_repo(work.path(), "repo.git");
    let project = Project::new(&[("acme", 1)], false);
    let output = render(&project, &repo, &[]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    // What the object database holds: a kill after Kiln began writing
    // objects changes it, even when the branch stays where it was.
    let objects = || {
        let mut files = Vec::new();
        let mut dirs = vec![repo.join("objects")];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).unwrap().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    dirs.push(path);
                } else {
                    files.push((path, entry.metadata().map(|m| m.len()).unwrap_or(0)));
                }
            }
        }
        files.sort();
        files
    };
    // Kill at a moment that moves until it lands after the render began
    // writing objects: later when a kill came too early, earlier when the
    // render had finished. Every attempt changes every tenant, so there is
    // always something to write.
    let (mut early, mut late) = (0u64, None::<u64>);
    let mut delay = 300u64;
    let mut killed_while_writing = false;
    for attempt in 0..40u32 {
        // Timing noise can close the interval around a window it never
        // hit (a render that finished sooner than one killed earlier):
        // search it again.
        if late.is_some_and(|late| late <= early + 1) {
            (early, late, delay) = (0, None, 300);
        }
        let many: Vec<(String, u32)> = (0..3000)
            .map(|i| (format!("t{i:03}"), attempt + 2))
            .chain([("acme".to_string(), 1)])
            .collect();
        project.rows(&as_refs(&many));
        let _ = std::fs::remove_file(project.path().join("tenants.db"));
        let before = git(&repo, &["rev-parse", "rendered"]);
        let written_before = objects();
        let mut child = common::kiln_command()
            .args([
                "render",
                "-f",
                project.arg(),
                "--git",
                repo.to_str().unwrap(),
                "--branch",
                "rendered",
            ])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay));
        let _ = child.kill();
        let status = child.wait().unwrap();
        let tip = git(&repo, &["rev-parse", "rendered"]);
        git(&repo, &["fsck", "--strict", "--no-dangling"]);
        if status.success() || tip != before {
            // It moved the branch before the kill (it may have been killed
            // while it reported): then the commit is whole, every tenant in it.
            assert_ne!(tip, before, "a render that succeeded committed nothing");
            let files = git(&repo, &["ls-tree", "-r", "--name-only", "rendered"]);
            assert_eq!(
                files
                    .lines()
                    .filter(|f| f.ends_with("/config.yaml"))
                    .count(),
                3001
            );
            late = Some(delay);
            delay = (early + delay) / 2;
            continue;
        }
        if objects() != written_before {
            killed_while_writing = true;
            break;
        }
        early = delay;
        delay = late.map_or(delay * 2, |late| (delay + late).div_ceil(2));
    }
    assert!(
        killed_while_writing,
        "no kill landed after the render began writing objects (last delay {delay} ms)"
    );
    let _ = std::fs::remove_file(project.path().join("tenants.db"));
    let output = render(&project, &repo, &[]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    git(&repo, &["fsck", "--strict", "--no-dangling"]);
}

#[test]
fn drift_is_reported_and_render_refuses_to_overwrite_it() {
    let work = tempfile::tempdir().unwrap();
    let repo = bare_repo(work.path(), "repo.git");
    let project = Project::new(&[("acme", 1), ("globex", 1)], false);
    assert_eq!(render(&project, &repo, &[]).status.code(), Some(0));
    let drift = |extra: &[&str]| {
        let mut args = vec![
            "drift",
            "--git",
            repo.to_str().unwrap(),
            "--branch",
            "rendered",
            "--exit-code",
        ];
        args.extend_from_slice(extra);
        kiln(&args)
    };
    assert_eq!(drift(&[]).status.code(), Some(0), "{}", stderr(&drift(&[])));

    // A hand-made commit under the render directory.
    let clone = work.path().join("clone");
    git(
        work.path(),
        &[
            "clone",
            "-q",
            "-b",
            "rendered",
            repo.to_str().unwrap(),
            clone.to_str().unwrap(),
        ],
    );
    let file = clone.join("web/acme/config.yaml");
    let text = std::fs::read_to_string(&file)
        .unwrap()
        .replace("replicas: \"1\"", "replicas: \"5\"");
    std::fs::write(&file, text).unwrap();
    git(&clone, &["commit", "-qam", "hotfix acme"]);
    git(&clone, &["push", "-q", "origin", "rendered"]);

    let output = drift(&[]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("hotfix acme"),
        "{}",
        stderr(&output)
    );
    assert!(
        stdout(&output).contains("+  replicas: \"5\""),
        "{}",
        stdout(&output)
    );
    let json: serde_json::Value =
        serde_json::from_str(&stdout(&drift(&["--format", "json"]))).unwrap();
    assert_eq!(json["files"][0]["path"], "web/acme/config.yaml");
    assert_eq!(json["commits"][0]["subject"], "hotfix acme");

    project.rows(&[("acme", 1), ("globex", 2)]);
    let tip = git(&repo, &["rev-parse", "rendered"]);
    let output = render(&project, &repo, &[]);
    assert_eq!(output.status.code(), Some(2));
    let message = stderr(&output);
    assert_eq!(message.lines().count(), 1, "{message}");
    assert!(
        message.contains("web/acme/config.yaml") && message.contains("hotfix acme"),
        "{message}"
    );
    assert_eq!(git(&repo, &["rev-parse", "rendered"]), tip);

    let output = render(&project, &repo, &["--overwrite-drift"]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(drift(&[]).status.code(), Some(0));
    assert!(git(&repo, &["show", "rendered:web/acme/config.yaml"]).contains("replicas: \"1\""));
}

#[test]
fn rollback_pins_the_branch_until_resume() {
    let work = tempfile::tempdir().unwrap();
    let repo = bare_repo(work.path(), "repo.git");
    let r = repo.to_str().unwrap();
    let project = Project::new(&[("acme", 1)], false);
    assert_eq!(render(&project, &repo, &[]).status.code(), Some(0));
    let first = git(&repo, &["rev-parse", "rendered"]);
    project.rows(&[("acme", 2), ("globex", 1)]);
    assert_eq!(render(&project, &repo, &[]).status.code(), Some(0));

    let output = kiln(&[
        "rollback",
        "--git",
        r,
        "--branch",
        "rendered",
        "--to",
        &first[..10],
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(commits(&repo), 3);
    assert_eq!(
        git(&repo, &["rev-parse", "rendered^{tree}"]),
        git(&repo, &["rev-parse", &format!("{first}^{{tree}}")]),
        "the tree of the first render is back"
    );
    assert!(
        git(&repo, &["log", "-1", "--format=%B", "rendered"])
            .contains(&format!("Kiln-Rollback: {first}"))
    );

    // Pinned: render refuses and says how to resume; diff still works.
    let output = render(&project, &repo, &[]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("pinned") && stderr(&output).contains("kiln resume"),
        "{}",
        stderr(&output)
    );
    assert_eq!(commits(&repo), 3);
    let output = kiln(&[
        "diff",
        "-f",
        project.arg(),
        "--git",
        r,
        "--branch",
        "rendered",
        "--exit-code",
    ]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(
        stdout(&output).contains("+++ b/web/globex/config.yaml"),
        "{}",
        stdout(&output)
    );

    // A rollback target must be a Kiln commit: not a name that resolves to
    // nothing, not someone else's commit.
    let output = kiln(&[
        "rollback",
        "--git",
        r,
        "--branch",
        "rendered",
        "--to",
        "does-not-exist",
    ]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("does-not-exist"),
        "{}",
        stderr(&output)
    );
    let work = tempfile::tempdir().unwrap();
    let clone = work.path().join("clone");
    git(
        work.path(),
        &[
            "clone",
            "-q",
            "--branch",
            "rendered",
            r,
            clone.to_str().unwrap(),
        ],
    );
    std::fs::write(clone.join("notes.txt"), "by hand\n").unwrap();
    git(&clone, &["add", "notes.txt"]);
    git(&clone, &["commit", "-qm", "a person's commit"]);
    let foreign = git(&clone, &["rev-parse", "HEAD"]);
    git(&clone, &["push", "-q", "origin", "HEAD:refs/heads/foreign"]);
    let before = git(&repo, &["rev-parse", "rendered"]);
    let output = kiln(&[
        "rollback", "--git", r, "--branch", "rendered", "--to", &foreign,
    ]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("is not a Kiln render or rollback"),
        "{}",
        stderr(&output)
    );
    assert_eq!(
        git(&repo, &["rev-parse", "rendered"]),
        before,
        "the branch moved"
    );

    let output = kiln(&["resume", "--git", r, "--branch", "rendered"]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(commits(&repo), 4);
    let output = render(&project, &repo, &[]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(commits(&repo), 5);
    let history = kiln(&[
        "history", "--git", r, "--branch", "rendered", "--format", "json",
    ]);
    let records: serde_json::Value = serde_json::from_slice(&history.stdout).unwrap();
    let actions: Vec<&str> = records
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        ["render", "resume", "rollback", "render", "render"]
    );
}

#[test]
fn emptying_the_table_is_refused_without_allow_mass_delete() {
    let work = tempfile::tempdir().unwrap();
    let repo = bare_repo(work.path(), "repo.git");
    let project = Project::new(&as_refs(&tenants(10)), false);
    assert_eq!(render(&project, &repo, &[]).status.code(), Some(0));
    let tip = git(&repo, &["rev-parse", "rendered"]);

    project.rows(&[]);
    let output = render(&project, &repo, &[]);
    assert_eq!(output.status.code(), Some(2));
    let message = stderr(&output);
    assert!(
        message.contains("refusing to remove all 10 instances"),
        "{message}"
    );
    assert!(message.contains("--allow-mass-delete"), "{message}");
    assert_eq!(git(&repo, &["rev-parse", "rendered"]), tip, "no commit");

    // Three of ten is more than the default 20%; two is not.
    project.rows(&as_refs(&tenants(7)));
    let output = render(&project, &repo, &[]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("refusing to remove 3 of 10 instances (30%"),
        "{}",
        stderr(&output)
    );
    project.rows(&as_refs(&tenants(8)));
    let output = render(&project, &repo, &[]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));

    project.rows(&[]);
    let output = render(&project, &repo, &["--allow-mass-delete"]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(
        git(&repo, &["ls-tree", "--name-only", "rendered:web"]),
        "kustomization.yaml"
    );
}

#[test]
fn secrets_are_refused_in_git_and_masked_in_diffs() {
    let work = tempfile::tempdir().unwrap();
    let repo = bare_repo(work.path(), "repo.git");
    let r = repo.to_str().unwrap();
    let project = Project::new(&[("acme", 1)], true);
    let output = render(&project, &repo, &[]);
    assert_eq!(output.status.code(), Some(2));
    let message = stderr(&output);
    assert!(
        message.contains("web/acme/credentials.yaml (row acme)"),
        "{message}"
    );
    assert!(message.contains("--allow-plaintext-secrets"), "{message}");
    assert!(
        git(&repo, &["branch", "--list"]).is_empty(),
        "nothing committed"
    );
    // `data` (base64) is plain text too.
    let blueprint = project.path().join("blueprint.yaml");
    let with_string_data = std::fs::read_to_string(&blueprint).unwrap();
    std::fs::write(
        &blueprint,
        with_string_data.replace(
            "stringData:\n        password: \"hunter{{ row.replicas }}\"",
            "data:\n        password: aHVudGVyMg==",
        ),
    )
    .unwrap();
    assert_ne!(
        std::fs::read_to_string(&blueprint).unwrap(),
        with_string_data
    );
    let output = render(&project, &repo, &[]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("web/acme/credentials.yaml (row acme)"),
        "{}",
        stderr(&output)
    );
    std::fs::write(&blueprint, with_string_data).unwrap();

    assert_eq!(
        render(&project, &repo, &["--allow-plaintext-secrets"])
            .status
            .code(),
        Some(0)
    );
    project.rows(&[("acme", 2)]);
    let output = kiln(&[
        "diff",
        "-f",
        project.arg(),
        "--git",
        r,
        "--branch",
        "rendered",
        "--format",
        "stat",
    ]);
    let text = stdout(&output);
    assert!(
        text.contains("web/acme/credentials.yaml") && !text.contains("hunter"),
        "{text}"
    );
    // `kiln drift` shows a hand-made edit of the Secret masked too.
    let clone = work.path().join("clone");
    git(
        work.path(),
        &["clone", "-q", "-b", "rendered", r, clone.to_str().unwrap()],
    );
    let file = clone.join("web/acme/credentials.yaml");
    let text = std::fs::read_to_string(&file)
        .unwrap()
        .replace("hunter1", "swordfish");
    std::fs::write(&file, text).unwrap();
    git(&clone, &["commit", "-qam", "rotate by hand"]);
    git(&clone, &["push", "-q", "origin", "rendered"]);
    let output = kiln(&["drift", "--git", r, "--branch", "rendered"]);
    let text = stdout(&output);
    assert!(text.contains("password: (masked, changed)"), "{text}");
    assert!(
        !text.contains("hunter") && !text.contains("swordfish"),
        "{text}"
    );
    for format in ["unified", "markdown", "json"] {
        let output = kiln(&[
            "diff",
            "-f",
            project.arg(),
            "--git",
            r,
            "--branch",
            "rendered",
            "--format",
            format,
        ]);
        assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
        let text = stdout(&output);
        assert!(
            !text.contains("hunter"),
            "{format} shows a secret value: {text}"
        );
        assert!(
            text.contains("password: (masked, changed)"),
            "{format}: {text}"
        );
    }
}

#[test]
fn diff_exit_code_follows_the_branch() {
    let work = tempfile::tempdir().unwrap();
    let repo = bare_repo(work.path(), "repo.git");
    let r = repo.to_str().unwrap();
    let project = Project::new(&[("acme", 1)], false);
    let diff = |format: &str| {
        kiln(&[
            "diff",
            "-f",
            project.arg(),
            "--git",
            r,
            "--branch",
            "rendered",
            "--exit-code",
            "--format",
            format,
        ])
    };
    let output = diff("stat");
    assert_eq!(
        output.status.code(),
        Some(1),
        "a missing branch differs: {}",
        stderr(&output)
    );
    // One line per file, lines added and removed, and the totals.
    let stat = stdout(&output);
    let config_line = stat
        .lines()
        .find(|l| l.trim_start().starts_with("web/acme/config.yaml "))
        .unwrap_or_else(|| panic!("no line for web/acme/config.yaml: {stat}"));
    let (_, counts) = config_line.split_once(" | ").unwrap();
    let (count, bar) = counts.trim_start().split_once(' ').unwrap();
    let added: usize = count.parse().unwrap();
    assert!(
        added > 0 && bar == "+".repeat(added.min(40)),
        "{config_line}"
    );
    let files = stat.lines().count() - 1;
    assert!(
        stat.lines()
            .last()
            .unwrap()
            .starts_with(&format!(" {files} files changed, ")),
        "{stat}"
    );
    assert!(stat.contains(" 0 deletions(-)"), "{stat}");
    assert_eq!(render(&project, &repo, &[]).status.code(), Some(0));
    let output = diff("unified");
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(stdout(&output), "");
    project.rows(&[("acme", 1), ("globex", 1)]);
    let output = diff("markdown");
    assert_eq!(output.status.code(), Some(1));
    let text = stdout(&output);
    assert!(text.contains("| `web` | 1 | 0 | 0 | 2 | 0 | 0 |"), "{text}");
    assert!(
        text.contains("<details><summary><code>web/globex/config.yaml</code> (added"),
        "{text}"
    );
    let output = kiln(&[
        "diff",
        "-f",
        project.arg(),
        "--git",
        r,
        "--branch",
        "rendered",
        "--base",
        "no-such-rev",
    ]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("--base no-such-rev"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn a_pipeline_names_the_repository_branch_path_and_guard() {
    let work = tempfile::tempdir().unwrap();
    let repo = bare_repo(work.path(), "repo.git");
    let project = Project::new(&as_refs(&tenants(10)), false);
    std::fs::write(
        project.path().join("pipeline.yaml"),
        format!(
            "apiVersion: kiln.dev/v1alpha1\nkind: Pipeline\nmetadata: {{name: prod}}\nspec:\n  blueprints: [web]\n  git: {{url: {}, branch: rendered/prod, path: clusters/prod}}\n  deletionGuard: {{maxPercent: 50}}\n",
            repo.display()
        ),
    )
    .unwrap();
    let output = kiln(&["render", "-f", project.arg(), "-m", "first render of prod"]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(
        git(&repo, &["log", "-1", "--format=%s", "rendered/prod"]),
        "first render of prod"
    );
    git(
        &repo,
        &[
            "rev-parse",
            "rendered/prod:clusters/prod/web/t009/config.yaml",
        ],
    );

    // maxPercent 50 lets 4 of 10 go, where the default 20 would not.
    project.rows(&as_refs(&tenants(6)));
    let output = kiln(&["render", "-f", project.arg()]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    project.rows(&as_refs(&tenants(2)));
    let output = kiln(&["render", "-f", project.arg()]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("more than deletionGuard.maxPercent 50%"),
        "{}",
        stderr(&output)
    );

    // diff and history find the same place.
    let output = kiln(&[
        "diff",
        "-f",
        project.arg(),
        "--format",
        "stat",
        "--exit-code",
    ]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let output = kiln(&[
        "history",
        "--git",
        repo.to_str().unwrap(),
        "--branch",
        "rendered/prod",
        "--path",
        "clusters/prod",
        "--format",
        "json",
    ]);
    let records: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(records.as_array().unwrap().len(), 2);
}

#[test]
fn unchanged_inputs_skip_the_render_and_a_changed_source_spec_does_not() {
    let work = tempfile::tempdir().unwrap();
    let repo = bare_repo(work.path(), "repo.git");
    let project = Project::new(&[("acme", 1)], false);
    let rendered = |project: &Project| {
        let output = common::kiln_command()
            .args([
                "render",
                "-f",
                project.arg(),
                "--git",
                repo.to_str().unwrap(),
                "--branch",
                "rendered",
            ])
            .env("KILN_LOG", "kiln=debug")
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
        stderr(&output).contains("tree built")
    };
    assert!(rendered(&project), "a first render renders");
    assert!(
        !rendered(&project),
        "the same inputs are not rendered again"
    );

    // The source's spec changes the inputs but not the tree: rendered once,
    // no commit, and remembered, so the next run skips the render again.
    let source = project.path().join("source.yaml");
    let text = std::fs::read_to_string(&source).unwrap();
    std::fs::write(&source, format!("{text}  interval: 5m\n")).unwrap();
    assert!(rendered(&project));
    assert!(!rendered(&project));
    assert_eq!(commits(&repo), 1);

    // A new row is new input: rendered and committed.
    project.rows(&[("acme", 1), ("globex", 1)]);
    assert!(rendered(&project));
    assert_eq!(commits(&repo), 2);
}

/// A non-bare repository whose checked-out `main` has `project` rendered
/// under `out/`; returns its path and the render's arguments.
fn checked_out_render(work: &Path, project: &Project) -> (PathBuf, Vec<String>) {
    let repo = work.join("checkout");
    git(work, &["init", "-q", "-b", "main", repo.to_str().unwrap()]);
    let args: Vec<String> = [
        "render",
        "-f",
        project.arg(),
        "--git",
        repo.to_str().unwrap(),
        "--path",
        "out",
    ]
    .map(String::from)
    .to_vec();
    let output = kiln(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    (repo, args)
}

#[test]
fn a_checkout_left_behind_by_an_interrupted_render_is_brought_up_to_date() {
    let work = tempfile::tempdir().unwrap();
    let project = Project::new(&[("acme", 1), ("globex", 1), ("initech", 1)], false);
    let (repo, args) = checked_out_render(work.path(), &project);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let before = git(&repo, &["rev-parse", "main"]);

    // The state a render stopped after moving the branch leaves: Kiln's
    // commit at the tip, the index and work tree half old, half new.
    let next = work.path().join("next.git");
    git(
        &repo,
        &["clone", "-q", "--bare", ".", next.to_str().unwrap()],
    );
    project.rows(&[("acme", 2), ("globex", 2), ("umbrella", 1)]);
    let mut elsewhere = vec![
        "render",
        "-f",
        project.arg(),
        "--git",
        next.to_str().unwrap(),
    ];
    elsewhere.extend(["--branch", "main", "--path", "out", "--allow-mass-delete"]);
    let output = kiln(&elsewhere);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    git(
        &repo,
        &[
            "fetch",
            "-q",
            "--update-head-ok",
            next.to_str().unwrap(),
            "main:main",
        ],
    );
    let tip = git(&repo, &["rev-parse", "main"]);
    assert_ne!(tip, before);
    // acme's file is new on disk and in the index; globex's only on disk;
    // umbrella's appeared; initech's is still there.
    for file in ["out/web/acme/config.yaml", "out/web/globex/config.yaml"] {
        let content = git(&repo, &["show", &format!("main:{file}")]);
        std::fs::write(repo.join(file), format!("{content}\n")).unwrap();
    }
    git(&repo, &["add", "out/web/acme/config.yaml"]);
    std::fs::create_dir_all(repo.join("out/web/umbrella")).unwrap();
    let content = git(&repo, &["show", "main:out/web/umbrella/config.yaml"]);
    std::fs::write(
        repo.join("out/web/umbrella/config.yaml"),
        format!("{content}\n"),
    )
    .unwrap();
    let stale = git(&repo, &["status", "--porcelain"]);
    assert!(stale.contains("out/web/initech"), "{stale}");

    // A person's edit among them is refused, and the message says how to
    // set it aside.
    std::fs::write(repo.join("out/web/globex/namespace.yaml"), "mine\n").unwrap();
    let output = kiln(&args);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    let message = stderr(&output);
    assert!(
        message.contains("uncommitted changes under out/")
            && message.contains("stash push --include-untracked -- out"),
        "{message}"
    );
    assert_eq!(
        std::fs::read_to_string(repo.join("out/web/globex/namespace.yaml")).unwrap(),
        "mine\n"
    );

    // Without it, the next render (nothing changed: it would say "up to
    // date") first finishes the checkout, and says so.
    git(&repo, &["checkout", "--", "out/web/globex/namespace.yaml"]);
    let output = kiln(&args);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let message = stderr(&output);
    assert!(
        message.contains(&format!("up to Kiln's commit {}", &tip[..12]))
            && message.contains("under out/"),
        "{message}"
    );
    assert_eq!(git(&repo, &["status", "--porcelain"]), "");
    assert_eq!(git(&repo, &["rev-parse", "main"]), tip);
    assert!(!repo.join("out/web/initech").exists());
    git(&repo, &["diff", "--exit-code", "main", "--", "out"]);
}

#[test]
fn a_render_killed_while_it_updates_a_checkout_is_repaired_by_the_next() {
    let work = tempfile::tempdir().unwrap();
    let project = Project::new(&[("acme", 1)], false);
    let (repo, args) = checked_out_render(work.path(), &project);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut many = tenants(3000);
    many.push(("acme".to_string(), 1));
    project.rows(&as_refs(&many));
    let tip_file = repo.join(".git/refs/heads/main");
    let before = std::fs::read_to_string(&tip_file).unwrap();
    // Kill the render the moment the branch moves, while the work tree
    // follows; repeat until a kill lands in that window.
    let mut hit = false;
    for _ in 0..20 {
        let _ = std::fs::remove_file(project.path().join("tenants.db"));
        let mut child = common::kiln_command()
            .args(&args)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        loop {
            if std::fs::read_to_string(&tip_file).unwrap_or_default() != before {
                let _ = child.kill();
                break;
            }
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        let _ = child.wait();
        let moved = std::fs::read_to_string(&tip_file).unwrap_or_default() != before;
        if moved && !git(&repo, &["status", "--porcelain"]).is_empty() {
            hit = true;
            break;
        }
        if moved {
            // It finished first: go back and try again.
            git(&repo, &["reset", "-q", "--hard", before.trim()]);
        }
    }
    assert!(
        hit,
        "no kill landed between the branch moving and the work tree following"
    );
    let _ = std::fs::remove_file(project.path().join("tenants.db"));
    let output = kiln(&args);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("up to Kiln's commit"),
        "{}",
        stderr(&output)
    );
    assert_eq!(git(&repo, &["status", "--porcelain"]), "");
    assert!(repo.join("out/web/t2999/config.yaml").exists());
}

#[test]
fn the_author_comes_from_the_flag_else_the_environment_else_the_repository() {
    let work = tempfile::tempdir().unwrap();
    let repo = bare_repo(work.path(), "repo.git");
    let project = Project::new(&[("acme", 1)], false);
    let author = || git(&repo, &["log", "-1", "--format=%an <%ae>", "rendered"]);
    let output = render(
        &project,
        &repo,
        &["--author", "Ann Example <ann@example.com>"],
    );
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(author(), "Ann Example <ann@example.com>");

    // GIT_AUTHOR_NAME and GIT_AUTHOR_EMAIL (the tests' own).
    project.rows(&[("acme", 2)]);
    let output = render(&project, &repo, &[]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(author(), "Kiln Test <kiln@example.com>");

    // Neither: the repository's user.name and user.email.
    git(&repo, &["config", "user.name", "Repo Owner"]);
    git(&repo, &["config", "user.email", "owner@example.com"]);
    project.rows(&[("acme", 3)]);
    let output = common::kiln_command()
        .env_remove("GIT_AUTHOR_NAME")
        .env_remove("GIT_AUTHOR_EMAIL")
        .args([
            "render",
            "-f",
            project.arg(),
            "--git",
            repo.to_str().unwrap(),
            "--branch",
            "rendered",
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(author(), "Repo Owner <owner@example.com>");

    // A malformed --author is refused before anything is written.
    project.rows(&[("acme", 4)]);
    let before = git(&repo, &["rev-parse", "rendered"]);
    let output = render(&project, &repo, &["--author", "no email"]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(stderr(&output).contains("--author"), "{}", stderr(&output));
    assert_eq!(git(&repo, &["rev-parse", "rendered"]), before);
}

#[test]
fn a_rollback_pin_travels_with_git_push() {
    let work = tempfile::tempdir().unwrap();
    let repo = bare_repo(work.path(), "repo.git");
    let project = Project::new(&[("acme", 1)], false);
    assert_eq!(render(&project, &repo, &[]).status.code(), Some(0));
    let first = git(&repo, &["rev-parse", "rendered"]);
    project.rows(&[("acme", 2)]);
    assert_eq!(render(&project, &repo, &[]).status.code(), Some(0));
    let output = kiln(&[
        "rollback",
        "--git",
        repo.to_str().unwrap(),
        "--branch",
        "rendered",
        "--to",
        &first,
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    // Pushed with the git CLI to another repository: the pin is in the
    // commit, so a render there is refused too.
    let mirror = bare_repo(work.path(), "mirror.git");
    git(&repo, &["push", "-q", mirror.to_str().unwrap(), "rendered"]);
    project.rows(&[("acme", 3)]);
    let output = render(&project, &mirror, &[]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(stderr(&output).contains("pinned"), "{}", stderr(&output));
    // And resumed there, it renders.
    let output = kiln(&[
        "resume",
        "--git",
        mirror.to_str().unwrap(),
        "--branch",
        "rendered",
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(render(&project, &mirror, &[]).status.code(), Some(0));
}

/// A project whose Widgets' scope comes from a CRD one row may render.
fn widget_project(dir: &Path) {
    std::fs::write(
        dir.join("source.yaml"),
        "apiVersion: kiln.dev/v1alpha1\nkind: Source\nmetadata: {name: tenants}\nspec:\n  url: sqlite://tenants.db\n  seedFile: seed.sql\n  query: SELECT slug, replicas, crd FROM tenants ORDER BY slug\n  key: slug\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("blueprint.yaml"),
        r#"apiVersion: kiln.dev/v1alpha1
kind: Blueprint
metadata: {name: web}
spec:
  source: tenants
  namespace: "tenant-{{ key }}"
  resources:
  - id: config
    templateFile: templates/config.yaml
  - id: widget
    template: |
      apiVersion: example.com/v1
      kind: Widget
      metadata: {name: "w-{{ key }}"}
      spec: {replicas: {{ row.replicas }}}
  - id: crd
    template: |
      {% if row.crd %}
      apiVersion: apiextensions.k8s.io/v1
      kind: CustomResourceDefinition
      metadata: {name: widgets.example.com}
      spec:
        group: example.com
        scope: {{ row.crd }}
        names: {kind: Widget, plural: widgets}
        versions: [{name: v1, served: true, storage: true, schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}}]
      {% endif %}
"#,
    )
    .unwrap();
    widget_template(dir, "");
}

fn widget_template(dir: &Path, extra: &str) {
    std::fs::create_dir_all(dir.join("templates")).unwrap();
    std::fs::write(
        dir.join("templates/config.yaml"),
        format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: settings}}\ndata:\n  replicas: \"{{{{ row.replicas }}}}\"\n{extra}"),
    )
    .unwrap();
}

fn widget_rows(dir: &Path, rows: &[(String, u32, &str)]) {
    let mut seed = String::from(
        "CREATE TABLE tenants (slug TEXT PRIMARY KEY, replicas INTEGER, crd TEXT);\nBEGIN;\n",
    );
    for (slug, replicas, crd) in rows {
        seed.push_str(&format!(
            "INSERT INTO tenants VALUES ('{slug}', {replicas}, '{crd}');\n"
        ));
    }
    seed.push_str("COMMIT;\n");
    std::fs::write(dir.join("seed.sql"), seed).unwrap();
    let _ = std::fs::remove_file(dir.join("tenants.db"));
}

/// Renders `dir` into `repo` with `program`; returns how many instances
/// came from the memo.
fn render_counting_reuse(program: &Path, dir: &Path, repo: &Path) -> usize {
    let output = common::kiln_command_of(program)
        .args([
            "render",
            "-f",
            dir.to_str().unwrap(),
            "--git",
            repo.to_str().unwrap(),
        ])
        .args(["--branch", "rendered"])
        .env("KILN_LOG", "kiln=debug")
        .output()
        .unwrap();
    let log = stderr(&output);
    assert_eq!(output.status.code(), Some(0), "{log}");
    let line = log
        .lines()
        .find(|l| l.contains(" rendered") && l.contains("reused="))
        .unwrap_or_else(|| panic!("no render in: {log}"));
    line.split("reused=")
        .nth(1)
        .unwrap()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// The per-instance memo files of a repository.
fn instance_memos(repo: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(repo.join("kiln"))
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "instances"))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_tree_built_with_the_instance_memo_is_the_tree_built_without_it() {
    let work = tempfile::tempdir().unwrap();
    let project = work.path().join("project");
    std::fs::create_dir(&project).unwrap();
    widget_project(&project);
    let kiln = PathBuf::from(env!("CARGO_BIN_EXE_kiln"));
    let remembering = bare_repo(work.path(), "remembering.git");
    let forgetting = bare_repo(work.path(), "forgetting.git");
    let mut rows: Vec<(String, u32, &str)> = (0..20).map(|i| (format!("t{i:02}"), 1, "")).collect();

    // Renders into both repositories, the second without its memo, and
    // checks the commits hold the same tree and say the same; returns how
    // many instances the first took from its memo.
    let both = |program: &Path, what: &str| -> usize {
        for memo in instance_memos(&forgetting) {
            std::fs::remove_file(memo).unwrap();
        }
        let reused = render_counting_reuse(program, &project, &remembering);
        assert_eq!(render_counting_reuse(program, &project, &forgetting), 0);
        assert_eq!(
            git(&remembering, &["rev-parse", "rendered^{tree}"]),
            git(&forgetting, &["rev-parse", "rendered^{tree}"]),
            "{what}: the memo changed the tree"
        );
        assert_eq!(
            git(&remembering, &["log", "-1", "--format=%B", "rendered"]),
            git(&forgetting, &["log", "-1", "--format=%B", "rendered"]),
            "{what}: the memo changed the commit message"
        );
        reused
    };
    let widget = |key: &str| {
        git(
            &remembering,
            &["show", &format!("rendered:web/{key}/widget.yaml")],
        )
    };

    widget_rows(&project, &rows);
    assert_eq!(both(&kiln, "first render"), 0);
    assert!(
        !instance_memos(&remembering).is_empty(),
        "a render into Git remembers its instances"
    );

    rows[3].1 = 2;
    widget_rows(&project, &rows);
    assert_eq!(
        both(&kiln, "one row changed"),
        19,
        "only the changed row renders"
    );

    widget_template(&project, "  tier: \"gold\"\n");
    assert_eq!(
        both(&kiln, "template changed"),
        0,
        "a template change renders every instance"
    );

    // One row renders a CRD that makes every instance's Widget
    // cluster-scoped: no instance may keep its namespaced Widget.
    assert!(widget("t05").contains("namespace: tenant-t05"));
    rows[0].2 = "Cluster";
    widget_rows(&project, &rows);
    assert_eq!(both(&kiln, "CRD scope changed"), 0);
    assert!(!widget("t05").contains("namespace:"), "{}", widget("t05"));

    // The instance with the CRD renders every time; the rest come back.
    rows[7].1 = 3;
    widget_rows(&project, &rows);
    assert_eq!(both(&kiln, "a row changed beside a CRD"), 18);

    rows[0].2 = "";
    widget_rows(&project, &rows);
    assert_eq!(both(&kiln, "CRD gone"), 0);
    assert!(widget("t05").contains("namespace: tenant-t05"));

    // Another build of Kiln never takes what this one rendered.
    let other = work.path().join("kiln-other-build");
    std::fs::copy(&kiln, &other).unwrap();
    rows[9].1 = 4;
    widget_rows(&project, &rows);
    assert_eq!(both(&other, "another build"), 0);

    // A damaged memo is not used, and the next render remembers again.
    rows[9].1 = 5;
    widget_rows(&project, &rows);
    for memo in instance_memos(&remembering) {
        let mut bytes = std::fs::read(&memo).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x55;
        std::fs::write(&memo, bytes).unwrap();
    }
    assert_eq!(both(&kiln, "damaged memo"), 0);
    rows[9].1 = 6;
    widget_rows(&project, &rows);
    assert_eq!(both(&kiln, "after a damaged memo"), 19);

    // A memo whose trees the repository lacks is not used: copied into a
    // new repository, it renders everything and commits the same tree.
    let elsewhere = bare_repo(work.path(), "elsewhere.git");
    std::fs::create_dir_all(elsewhere.join("kiln")).unwrap();
    for memo in instance_memos(&remembering) {
        std::fs::copy(
            &memo,
            elsewhere.join("kiln").join(memo.file_name().unwrap()),
        )
        .unwrap();
    }
    assert!(!instance_memos(&elsewhere).is_empty());
    assert_eq!(render_counting_reuse(&kiln, &project, &elsewhere), 0);
    assert_eq!(
        git(&elsewhere, &["rev-parse", "rendered^{tree}"]),
        git(&remembering, &["rev-parse", "rendered^{tree}"])
    );
    git(&elsewhere, &["fsck", "--strict", "--no-dangling"]);
    git(&remembering, &["fsck", "--strict", "--no-dangling"]);
}
