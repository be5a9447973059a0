//! Server processes: spawning them in process groups of their own, waiting for
//! them to be ready, and stopping them so that nothing is left behind.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::{Error, Result};

/// The file, inside an environment's root directory, that lists the process
/// groups to stop, one `tier pid` per line.
pub(crate) const GROUPS_FILE: &str = "process-groups";

/// When a server stops: servers of a higher tier stop first, together, and
/// those of lower tiers after them, so that the API server can still reach
/// etcd while it shuts down (without it, it retries for over a minute).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Tier {
    /// Storage that other servers of the environment use: etcd.
    Storage = 0,
    /// Everything else.
    Server = 1,
}

/// Returns a TCP port on 127.0.0.1 that was free a moment ago.
pub(crate) fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| Error::Io {
        what: "bind a free port on 127.0.0.1".into(),
        source: e,
    })?;
    let port = listener
        .local_addr()
        .map_err(|e| Error::Io {
            what: "read a free port".into(),
            source: e,
        })?
        .port();
    Ok(port)
}

/// Starts `cmd` as the leader of a new process group, with stdin closed and
/// stdout and stderr appended to `log`, and records the group in `root` so that
/// teardown (by hand or by the watchdog) stops it and every child it forks.
pub(crate) fn spawn(
    name: &str,
    tier: Tier,
    cmd: &mut Command,
    root: &Path,
    log: &Path,
) -> Result<u32> {
    // The child is reaped by whoever stops the group; dropping the handle
    // neither waits for it nor kills it.
    spawn_child(name, tier, cmd, root, log).map(|child| child.id())
}

/// As [`spawn`], keeping the handle so that the caller can stop and reap it.
pub(crate) fn spawn_child(
    name: &str,
    tier: Tier,
    cmd: &mut Command,
    root: &Path,
    log: &Path,
) -> Result<std::process::Child> {
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| Error::Io {
            what: format!("open {}", log.display()),
            source: e,
        })?;
    let err = out.try_clone().map_err(|e| Error::Io {
        what: format!("open {}", log.display()),
        source: e,
    })?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .map_err(|e| Error::Spawn {
            name: name.to_string(),
            program: cmd.get_program().to_string_lossy().into_owned(),
            source: e,
        })?;
    let pid = child.id();
    let mut groups = OpenOptions::new()
        .create(true)
        .append(true)
        .open(root.join(GROUPS_FILE))
        .map_err(|e| Error::Io {
            what: format!("record process group in {}", root.display()),
            source: e,
        })?;
    writeln!(groups, "{} {pid}", tier as u8).map_err(|e| Error::Io {
        what: format!("record process group in {}", root.display()),
        source: e,
    })?;
    Ok(child)
}

/// Runs a short-lived command to completion, with its output in `log`; an exit
/// status other than success is an error that quotes the end of the log.
pub(crate) fn run(name: &str, cmd: &mut Command, log: &Path) -> Result<()> {
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| Error::Io {
            what: format!("open {}", log.display()),
            source: e,
        })?;
    let err = out.try_clone().map_err(|e| Error::Io {
        what: format!("open {}", log.display()),
        source: e,
    })?;
    let status = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .status()
        .map_err(|e| Error::Spawn {
            name: name.to_string(),
            program: cmd.get_program().to_string_lossy().into_owned(),
            source: e,
        })?;
    if status.success() {
        Ok(())
    } else {
        Err(Error::Failed {
            name: name.to_string(),
            detail: format!("exited with {status}"),
            log: tail(log),
        })
    }
}

/// Polls `probe` until it returns true or `timeout` passes; on time-out the
/// error quotes the end of the server's log.
pub(crate) fn wait_until(
    name: &str,
    log: &Path,
    timeout: Duration,
    mut probe: impl FnMut() -> bool,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if probe() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(not_ready(name, log, timeout));
        }
        sleep(Duration::from_millis(200));
    }
}

/// The error for a server that did not become ready in time.
pub(crate) fn not_ready(name: &str, log: &Path, timeout: Duration) -> Error {
    Error::Failed {
        name: name.to_string(),
        detail: format!("not ready after {}s", timeout.as_secs()),
        log: tail(log),
    }
}

/// A plain HTTP/1.0 GET on 127.0.0.1, for health endpoints served without TLS.
pub(crate) fn http_get(port: u16, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.lines().next()?.split(' ').nth(1)?;
    (status == "200").then(|| body.to_string())
}

/// The last lines of a log file, for error messages.
pub(crate) fn tail(log: &Path) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(15);
    format!("{}:\n{}", log.display(), lines[start..].join("\n"))
}

/// Signals every process group recorded under `root`, waits for them to exit
/// (escalating to SIGKILL after `grace`) and removes `root`.
pub(crate) fn teardown(root: &Path, grace: Duration) -> Result<()> {
    let mut recorded = recorded_groups(root);
    recorded.sort_by_key(|(tier, _)| std::cmp::Reverse(*tier));
    for tier in recorded.chunk_by(|a, b| a.0 == b.0) {
        let groups: Vec<u32> = tier.iter().map(|(_, group)| *group).collect();
        stop_groups(&groups, grace)?;
    }
    fs::remove_dir_all(root).map_err(|e| Error::Io {
        what: format!("remove {}", root.display()),
        source: e,
    })
}

/// Sends SIGTERM to `groups`, waits for them all, and sends SIGKILL to those
/// still there after `grace`.
fn stop_groups(groups: &[u32], grace: Duration) -> Result<()> {
    for group in groups {
        signal_group(*group, "TERM");
    }
    let deadline = Instant::now() + grace;
    while groups.iter().any(|g| group_alive(*g)) && Instant::now() < deadline {
        sleep(Duration::from_millis(50));
    }
    for group in groups.iter().filter(|g| group_alive(**g)) {
        signal_group(*group, "KILL");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while groups.iter().any(|g| group_alive(*g)) && Instant::now() < deadline {
        sleep(Duration::from_millis(50));
    }
    match groups.iter().find(|g| group_alive(**g)) {
        Some(group) => Err(Error::Failed {
            name: "teardown".into(),
            detail: format!("process group {group} survived SIGKILL"),
            log: String::new(),
        }),
        None => Ok(()),
    }
}

/// Starts a detached watchdog that tears the environment under `root` down
/// once process `owner` has exited, however it exits: a test binary cannot run
/// destructors for shared state, and may be killed.
pub(crate) fn start_watchdog(owner: u32, root: &Path) -> Result<()> {
    const SCRIPT: &str = r#"
owner=$1 root=$2
while kill -0 "$owner" 2>/dev/null; do sleep 0.3; done
for tier in 1 0; do
  groups=$(awk -v t="$tier" '$1 == t { print $2 }' "$root/process-groups" 2>/dev/null)
  for g in $groups; do kill -TERM -- "-$g" 2>/dev/null; done
  for _ in $(seq 100); do
    alive=
    for g in $groups; do kill -0 -- "-$g" 2>/dev/null && alive=1; done
    [ -z "$alive" ] && break
    sleep 0.1
  done
  for g in $groups; do kill -KILL -- "-$g" 2>/dev/null; done
done
sleep 0.2
rm -rf "$root"
"#;
    Command::new("bash")
        .arg("-c")
        .arg(SCRIPT)
        .arg("kiln-testenv-watchdog")
        .arg(owner.to_string())
        .arg(root)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| Error::Spawn {
            name: "watchdog".into(),
            program: "sh".into(),
            source: e,
        })?;
    Ok(())
}

/// The process groups recorded under `root`, with their tiers.
pub(crate) fn recorded_groups(root: &Path) -> Vec<(u8, u32)> {
    fs::read_to_string(root.join(GROUPS_FILE))
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let (tier, group) = line.split_once(' ')?;
            Some((tier.parse().ok()?, group.parse().ok()?))
        })
        .collect()
}

/// Sends `signal` to process group `group` with bash's kill builtin: std has no
/// signal API, this crate forbids unsafe code, and a kill program is not on
/// every machine. Whether the signal was delivered is the answer.
fn kill(signal: &str, group: u32) -> bool {
    Command::new("bash")
        .arg("-c")
        .arg(format!("kill -{signal} -- -{group}"))
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

pub(crate) fn signal_group(group: u32, signal: &str) {
    // A group that is already gone is not an error.
    kill(signal, group);
}

pub(crate) fn group_alive(group: u32) -> bool {
    kill("0", group)
}

/// Creates a directory (and its parents), mapping the error.
pub(crate) fn mkdir(path: &Path) -> Result<PathBuf> {
    fs::create_dir_all(path).map_err(|e| Error::Io {
        what: format!("create {}", path.display()),
        source: e,
    })?;
    Ok(path.to_path_buf())
}

/// Writes a file, mapping the error.
pub(crate) fn write(path: &Path, contents: impl AsRef<[u8]>) -> Result<()> {
    let mut file = File::create(path).map_err(|e| Error::Io {
        what: format!("write {}", path.display()),
        source: e,
    })?;
    file.write_all(contents.as_ref()).map_err(|e| Error::Io {
        what: format!("write {}", path.display()),
        source: e,
    })
}

/// Finds a program in PATH or the sbin directories, which are not always in a
/// non-root user's PATH although Debian puts server binaries there.
pub(crate) fn find_program(name: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| Error::Missing {
            what: name.to_string(),
            hint: "run tests/install-deps.sh".into(),
        })
}
