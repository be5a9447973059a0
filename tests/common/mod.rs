//! Running `kiln` and `git` from the end-to-end tests.

#![allow(clippy::unwrap_used, dead_code)] // not every test file uses every helper

use std::path::Path;
use std::process::{Command, Output};

/// Runs the kiln binary with a fixed commit author.
pub fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env("GIT_AUTHOR_NAME", "Kiln Test")
        .env("GIT_AUTHOR_EMAIL", "kiln@example.com")
        .output()
        .unwrap()
}

/// A command's stderr as text.
pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A command's stdout as text.
pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs the git CLI in `dir` as someone other than Kiln; panics with its
/// stderr when it fails, else returns its stdout without the last newline.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let output = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_AUTHOR_NAME", "Someone")
        .env("GIT_AUTHOR_EMAIL", "someone@example.com")
        .env("GIT_COMMITTER_NAME", "Someone")
        .env("GIT_COMMITTER_EMAIL", "someone@example.com")
        .output()
        .unwrap();
    assert!(output.status.success(), "git {args:?}: {}", stderr(&output));
    stdout(&output).trim_end().to_string()
}

/// Writes `kiln.yaml` into `dir`: a file source of `rows` rows (`t0`,
/// `t1`, ...) and a blueprint `app` whose instances each get a Namespace
/// `<prefix>-<key>` and then `resources` (YAML list items). Returns its path.
pub fn tenants(dir: &Path, prefix: &str, rows: usize, resources: &str) -> std::path::PathBuf {
    let rows: String = (0..rows).map(|i| format!("- {{id: t{i}}}\n")).collect();
    std::fs::write(dir.join("rows.yaml"), rows).unwrap();
    let config = dir.join("kiln.yaml");
    std::fs::write(
        &config,
        format!(
            "apiVersion: kiln.dev/v1alpha1\nkind: Source\nmetadata: {{name: rows}}\n\
             spec: {{url: \"file:rows.yaml\", key: id}}\n---\n\
             apiVersion: kiln.dev/v1alpha1\nkind: Blueprint\nmetadata: {{name: app}}\n\
             spec:\n  source: rows\n  namespace: \"{prefix}-{{{{ key }}}}\"\n  resources:\n\
             \x20\x20- id: namespace\n    template: |\n      apiVersion: v1\n      kind: Namespace\n      \
             metadata: {{name: \"{prefix}-{{{{ key }}}}\"}}\n{resources}"
        ),
    )
    .unwrap();
    config
}
