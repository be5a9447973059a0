//! Running `kiln` and `git` from the end-to-end tests.

#![allow(clippy::unwrap_used, dead_code)] // not every test file uses every helper

use std::io::{Read as _, Write as _};
use std::path::Path;
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

/// The kiln binary with nothing of the developer's shell that would change
/// what it does: every `KILN_*` variable (`KILN_GIT`, `KILN_LOG`,
/// `KILN_INVENTORY`, `KILN_METRICS_ADDR`, …) but the test environment's, and
/// `KUBECONFIG` (a test names its cluster); a fixed commit author; a cache
/// directory of the tests' own.
pub fn kiln_command() -> Command {
    kiln_command_of(Path::new(env!("CARGO_BIN_EXE_kiln")))
}

/// [`kiln_command`] for a copy of the kiln binary at `program`.
pub fn kiln_command_of(program: &Path) -> Command {
    let mut command = Command::new(program);
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        let ours = name.starts_with("KILN_TEST_") || name == "KILN_ENVTEST_BIN";
        if (name.starts_with("KILN_") && !ours) || name == "KUBECONFIG" {
            command.env_remove(name.as_ref());
        }
    }
    command
        .env("GIT_AUTHOR_NAME", "Kiln Test")
        .env("GIT_AUTHOR_EMAIL", "kiln@example.com")
        // What `render --out` remembers goes here, not into the user's cache.
        .env(
            "XDG_CACHE_HOME",
            std::env::temp_dir().join("kiln-test-cache"),
        );
    command
}

/// Runs the kiln binary (see [`kiln_command`]).
pub fn kiln(args: &[&str]) -> Output {
    kiln_command().args(args).output().unwrap()
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

/// kubectl against the test environment's API server.
pub fn kubectl(args: &[&str]) -> Output {
    kiln_testenv::cluster()
        .kubectl()
        .args(args)
        .output()
        .unwrap()
}

/// kubectl, which must succeed; its stdout.
pub fn kubectl_ok(args: &[&str]) -> String {
    let out = kubectl(args);
    assert!(out.status.success(), "kubectl {args:?}: {}", stderr(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// kubectl with `input` on its standard input.
pub fn kubectl_stdin(args: &[&str], input: &str) -> Output {
    let mut child = kiln_testenv::cluster()
        .kubectl()
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// `kubectl apply` of a YAML text, which must succeed.
pub fn kubectl_apply(yaml: &str) {
    let out = kubectl_stdin(&["apply", "-f", "-"], yaml);
    assert!(
        out.status.success(),
        "kubectl apply: {}\n{yaml}",
        stderr(&out)
    );
}

/// Waits for `check` to hold, polling every 200 ms; panics after `limit`.
pub fn eventually(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < limit {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("{what} did not happen within {limit:?}");
}

/// A GET's whole answer, headers included; empty when nothing listens.
pub fn http_get(addr: &str, path: &str) -> String {
    let Ok(mut stream) = std::net::TcpStream::connect(addr) else {
        return String::new();
    };
    write!(stream, "GET {path} HTTP/1.1\r\nHost: kiln\r\n\r\n").unwrap();
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text);
    text
}

/// The value of a metric line, exactly as named (labels included).
pub fn metric(addr: &str, name: &str) -> Option<f64> {
    http_get(addr, "/metrics")
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// A loopback address nothing listens on (yet).
pub fn free_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

/// A spawned process that cannot outlive its test: dropped (a failed
/// assertion included), it is killed; waiting for it has a deadline.
#[derive(Debug)]
pub struct Running(Option<Child>);

/// How long a process may take to exit once asked.
const EXIT_DEADLINE: Duration = Duration::from_secs(120);

impl Running {
    /// Guards `child`.
    pub fn new(child: Child) -> Self {
        Running(Some(child))
    }

    /// Its process id.
    pub fn id(&self) -> u32 {
        self.0.as_ref().map_or(0, Child::id)
    }

    /// Whether it has not exited yet.
    pub fn still_running(&mut self) -> bool {
        self.0
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// Sends SIGTERM.
    pub fn signal_term(&self) {
        Command::new("kill")
            .args(["-TERM", &self.id().to_string()])
            .status()
            .unwrap();
    }

    /// SIGTERM, then its output once it exits.
    pub fn terminate(&mut self) -> Output {
        self.signal_term();
        self.wait()
    }

    /// kill -9, and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.0.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// Its output once it exits; killed, and the test failed, if it has not
    /// within two minutes.
    pub fn wait(&mut self) -> Output {
        let child = self.0.take().expect("the process was already waited for");
        let pid = child.id();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        match rx.recv_timeout(EXIT_DEADLINE) {
            Ok(output) => output.unwrap(),
            Err(_) => {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
                panic!("process {pid} did not exit within {EXIT_DEADLINE:?}");
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Whether a report's text says `word N` with exactly this `n` somewhere:
/// `has_count("failed 10, skipped 0", "failed", 1)` is false, where a
/// `contains("failed 1")` would match.
pub fn has_count(text: &str, word: &str, n: usize) -> bool {
    text.split([',', '(', ')', ';', ':', '\n'])
        .filter_map(|part| part.trim().strip_prefix(word)?.strip_prefix(' '))
        .any(|number| number.trim().parse() == Ok(n))
}

/// Runs SQL statements on a PostgreSQL database.
pub fn sql(url: &str, statements: &str) {
    use sqlx::Connection as _;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(statements.to_string()))
            .execute(&mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();
    });
}

/// A PostgreSQL database of the test's own, by URL.
pub fn postgres(hint: &str) -> String {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime
        .block_on(kiln_testenv::postgres().database(hint))
        .unwrap()
}
