//! `kiln watch` as a process: files edited the ways editors do (written in
//! place, or written beside and renamed over), and what it prints.

#![allow(clippy::unwrap_used)] // a test that cannot go on fails, with the cause

mod common;

use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Running, eventually};

/// What a process printed so far, read by a thread as it comes.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<String>>);

impl Captured {
    fn follow(stream: impl std::io::Read + Send + 'static) -> Self {
        let captured = Captured::default();
        let text = captured.0.clone();
        std::thread::spawn(move || {
            let mut stream = stream;
            let mut buffer = [0u8; 4096];
            while let Ok(n) = stream.read(&mut buffer) {
                if n == 0 {
                    break;
                }
                text.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buffer[..n]));
            }
        });
        captured
    }

    fn text(&self) -> String {
        self.0.lock().unwrap().clone()
    }

    /// What was printed after `mark` bytes.
    fn since(&self, mark: usize) -> String {
        self.text().get(mark..).unwrap_or_default().to_string()
    }

    fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

/// `kiln watch -f CONFIG ARGS…` running, with what it prints (stdout,
/// stderr) captured as it comes.
fn watch(config: &Path, args: &[&str]) -> (Running, Captured, Captured) {
    let mut child = common::kiln_command()
        .args(["watch", "-f"])
        .arg(config)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = Captured::follow(child.stdout.take().unwrap());
    let err = Captured::follow(child.stderr.take().unwrap());
    (Running::new(child), out, err)
}

const TEMPLATE: &str = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: \"plan-{{ key }}\"}\ndata:\n  plan: {{ row.plan | quote }}\n";

/// Writes `text` the way many editors save: to a file beside, renamed over.
fn save_by_rename(path: &Path, text: &str) {
    let beside = path.with_extension("swp-new");
    std::fs::write(&beside, text).unwrap();
    std::fs::rename(&beside, path).unwrap();
}

#[test]
fn watch_shows_each_saved_change_and_survives_a_broken_template() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rows.csv"), "id,plan\na,gold\nb,silver\n").unwrap();
    std::fs::create_dir(dir.path().join("templates")).unwrap();
    let template = dir.path().join("templates/plan.yaml.j2");
    std::fs::write(&template, TEMPLATE).unwrap();
    std::fs::write(
        dir.path().join("kiln.yaml"),
        "apiVersion: kiln.dev/v1alpha1\nkind: Source\nmetadata: {name: rows}\nspec: {url: \"file:rows.csv\", key: id}\n---\n\
         apiVersion: kiln.dev/v1alpha1\nkind: Blueprint\nmetadata: {name: app}\n\
         spec:\n  source: rows\n  namespace: \"t-{{ key }}\"\n  resources:\n  - id: plan\n    templateFile: templates/plan.yaml.j2\n",
    )
    .unwrap();
    let (mut watch, out, err) = watch(&dir.path().join("kiln.yaml"), &[]);
    eventually("the first render", Duration::from_secs(30), || {
        err.text().contains("rendered 2 objects")
    });

    // A template edited in place: both instances change, as a diff.
    let (mark_out, mark_err) = (out.len(), err.len());
    std::fs::write(&template, TEMPLATE.replace("plan:", "tier:")).unwrap();
    eventually("the template's diff", Duration::from_secs(10), || {
        let diff = out.since(mark_out);
        diff.contains("--- a/app/a/plan.yaml")
            && diff.contains("--- a/app/b/plan.yaml")
            && diff.contains("-  plan: gold")
            && diff.contains("+  tier: gold")
    });
    eventually("its summary", Duration::from_secs(10), || {
        err.since(mark_err).contains("2 changed")
    });
    // Plain text when stdout is not a terminal.
    assert!(!out.text().contains('\x1b'), "{}", out.text());

    // Broken, saved by rename: the error with the template's line and a
    // caret under the fault, and the watch goes on.
    let mark_err = err.len();
    let broken = TEMPLATE
        .replace("plan:", "tier:")
        .replace("{{ row.plan | quote }}", "{{ row.plan | quote }");
    save_by_rename(&template, &broken);
    eventually("the error", Duration::from_secs(10), || {
        let said = err.since(mark_err);
        said.contains("templates/plan.yaml.j2:5") && said.contains("does not compile")
    });
    let said = err.since(mark_err);
    let excerpt: Vec<&str> = said
        .lines()
        .skip_while(|l| !l.starts_with("5 | "))
        .take(2)
        .collect();
    assert_eq!(excerpt.len(), 2, "{said}");
    assert_eq!(excerpt[0], "5 |   tier: {{ row.plan | quote }");
    assert!(
        excerpt[1].trim_start().starts_with('^') && excerpt[1].len() > 30,
        "a caret under the fault: {said}"
    );

    // Fixed: rendered again; nothing changed against the last good render.
    let (mark_out, mark_err) = (out.len(), err.len());
    save_by_rename(&template, &TEMPLATE.replace("plan:", "tier:"));
    eventually("the fix", Duration::from_secs(10), || {
        err.since(mark_err).contains("no change")
    });
    assert_eq!(
        out.since(mark_out),
        "",
        "nothing differs from the last good render"
    );

    // One row of the CSV: one instance changes.
    let mark_out = out.len();
    std::fs::write(dir.path().join("rows.csv"), "id,plan\na,gold\nb,bronze\n").unwrap();
    eventually("the row's diff", Duration::from_secs(10), || {
        let diff = out.since(mark_out);
        diff.contains("+  tier: bronze") && diff.contains("--- a/app/b/plan.yaml")
    });
    assert!(
        !out.since(mark_out).contains("app/a/"),
        "{}",
        out.since(mark_out)
    );

    // A new row: a new instance.
    let mark_out = out.len();
    std::fs::write(
        dir.path().join("rows.csv"),
        "id,plan\na,gold\nb,bronze\nc,gold\n",
    )
    .unwrap();
    eventually("the new instance", Duration::from_secs(10), || {
        out.since(mark_out).contains("+++ b/app/c/plan.yaml")
    });
    watch.kill();
}

#[test]
fn watch_compares_with_a_rendered_directory_and_one_instance() {
    let dir = tempfile::tempdir().unwrap();
    let config = common::tenants(
        dir.path(),
        "w",
        3,
        "  - id: config\n    template: |\n      apiVersion: v1\n      kind: ConfigMap\n      metadata: {name: cfg}\n      data: {v: \"1\"}\n",
    );
    let rendered = dir.path().join("rendered");
    let out = common::kiln(&[
        "render",
        "-f",
        config.to_str().unwrap(),
        "--out",
        rendered.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let (mut watch, out, err) = watch(
        &config,
        &["--against", rendered.to_str().unwrap(), "--instance", "t1"],
    );
    eventually("the first comparison", Duration::from_secs(30), || {
        err.text().contains("no change")
    });
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("data: {v: \"1\"}", "data: {v: \"2\"}"),
    )
    .unwrap();
    eventually("only t1's diff", Duration::from_secs(10), || {
        out.text().contains("+++ b/app/t1/config.yaml")
    });
    let diff = out.text();
    assert!(diff.contains("+  v: \"2\""), "{diff}");
    assert!(
        !diff.contains("app/t0/") && !diff.contains("app/t2/") && !diff.contains("kustomization"),
        "only the instance asked for: {diff}"
    );
    watch.kill();
}

#[test]
fn completions_and_the_man_page_cover_every_command() {
    for shell in ["bash", "zsh", "fish", "powershell"] {
        let out = common::kiln(&["completions", shell]);
        assert!(out.status.success(), "{shell}: {}", common::stderr(&out));
        let script = common::stdout(&out);
        for command in ["render", "watch", "controller", "rollback", "completions"] {
            assert!(script.contains(command), "{shell} completes no {command}");
        }
    }
    let out = common::kiln(&["man"]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let page = common::stdout(&out);
    assert!(page.contains(".TH kiln 1"), "{page}");
    assert!(page.contains("watch"), "{page}");
    let out = common::kiln(&["completions", "tcsh"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn render_one_instance_prints_only_its_objects() {
    let dir = tempfile::tempdir().unwrap();
    let config = common::tenants(
        dir.path(),
        "one",
        3,
        "  - id: config\n    template: |\n      apiVersion: v1\n      kind: ConfigMap\n      metadata: {name: \"cfg-{{ key }}\"}\n",
    );
    let config = config.to_str().unwrap();
    let out = common::kiln(&["render", "-f", config, "--instance", "t1"]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let text = common::stdout(&out);
    assert_eq!(text.matches("\n---\n").count() + 1, 2, "{text}");
    assert!(
        text.contains("name: one-t1") && text.contains("name: cfg-t1"),
        "{text}"
    );
    assert!(!text.contains("t0") && !text.contains("t2"), "{text}");
    let out = common::kiln(&[
        "render",
        "-f",
        config,
        "--instance",
        "app/t2",
        "--instance",
        "t0",
    ]);
    let text = common::stdout(&out);
    assert!(
        text.contains("cfg-t0") && text.contains("cfg-t2") && !text.contains("cfg-t1"),
        "{text}"
    );
    let out = common::kiln(&["render", "-f", config, "--instance", "t9"]);
    assert_eq!(out.status.code(), Some(2));
    let message = common::stderr(&out);
    assert_eq!(message.trim_end().lines().count(), 1, "{message}");
    assert!(
        message.contains("--instance t9") && message.contains("Blueprint app"),
        "{message}"
    );
}

#[test]
fn progress_is_drawn_on_a_terminal_and_absent_from_a_pipe() {
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/demo");
    let dir = tempfile::tempdir().unwrap();
    // A pseudo-terminal from util-linux's `script`, which logs what the
    // program drew on it.
    let typescript = dir.path().join("typescript");
    let command = format!(
        "{} render -f {} --out {}",
        env!("CARGO_BIN_EXE_kiln"),
        demo.display(),
        dir.path().join("tty").display()
    );
    let out = std::process::Command::new("script")
        .args(["-q", "-e", "-c", &command])
        .arg(&typescript)
        .env_remove("KILN_LOG")
        .stdout(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::stderr(&out));
    let drawn = std::fs::read_to_string(&typescript).unwrap();
    assert!(
        drawn.contains("reading sources")
            && drawn.contains("rendering instances")
            && drawn.contains("/45"),
        "{drawn}"
    );
    assert!(drawn.contains("rendered "), "{drawn}");

    let out = common::kiln(&[
        "render",
        "-f",
        demo.to_str().unwrap(),
        "--out",
        dir.path().join("pipe").to_str().unwrap(),
    ]);
    assert!(out.status.success());
    let said = common::stderr(&out);
    assert_eq!(said.lines().count(), 1, "only the summary: {said}");
    assert!(
        !said.contains("rendering instances") && !said.contains('\x1b'),
        "{said}"
    );
}

#[test]
fn watch_compares_with_a_branch() {
    let dir = tempfile::tempdir().unwrap();
    let config = common::tenants(
        dir.path(),
        "g",
        2,
        "  - id: config\n    template: |\n      apiVersion: v1\n      kind: ConfigMap\n      metadata: {name: cfg}\n      data: {v: \"1\"}\n",
    );
    let repo = dir.path().join("repo.git");
    common::git(
        dir.path(),
        &["init", "-q", "--bare", repo.to_str().unwrap()],
    );
    let out = common::kiln(&[
        "render",
        "-f",
        config.to_str().unwrap(),
        "--git",
        repo.to_str().unwrap(),
        "--branch",
        "rendered",
        "--path",
        "prod",
    ]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let (mut watch, out, err) = watch(
        &config,
        &[
            "--git",
            repo.to_str().unwrap(),
            "--branch",
            "rendered",
            "--path",
            "prod",
        ],
    );
    eventually("the branch matches", Duration::from_secs(30), || {
        err.text().contains("no change against rendered")
    });
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("data: {v: \"1\"}", "data: {v: \"2\"}"),
    )
    .unwrap();
    eventually(
        "both instances differ from the branch",
        Duration::from_secs(10),
        || {
            let diff = out.text();
            diff.contains("+++ b/app/t0/config.yaml") && diff.contains("+++ b/app/t1/config.yaml")
        },
    );
    watch.kill();
}
