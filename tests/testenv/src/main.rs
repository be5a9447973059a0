//! `kiln-testenv up|down|status`: the test environment by hand (see
//! `tests/env`). `up` starts every server and prints the `export` lines that
//! point kubectl, psql, the mariadb client and `cargo test` at them; the
//! servers keep running until `down`.

use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "usage: kiln-testenv up|down|status   (state in $KILN_TESTENV_DIR, default $TMPDIR/kiln-testenv)";

fn main() -> ExitCode {
    let root = std::env::var_os("KILN_TESTENV_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("kiln-testenv"));
    let exports = root.join("env.sh");
    let result = match std::env::args().nth(1).as_deref() {
        Some("up") => {
            if kiln_testenv::running(&root) {
                eprintln!("kiln-testenv: already up in {}", root.display());
                std::fs::read_to_string(&exports)
                    .map(|text| print!("{text}"))
                    .map_err(|e| kiln_testenv::Error::Io {
                        what: format!("read {}", exports.display()),
                        source: e,
                    })
            } else {
                up(&root, &exports)
            }
        }
        Some("down") if root.exists() => kiln_testenv::stop(&root),
        Some("down") => Ok(()),
        Some("status") => {
            let up = kiln_testenv::running(&root);
            println!("{}", if up { "up" } else { "down" });
            return if up {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            };
        }
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kiln-testenv: {e}");
            ExitCode::from(2)
        }
    }
}

fn up(root: &std::path::Path, exports: &std::path::Path) -> kiln_testenv::Result<()> {
    if root.exists() {
        // What an earlier environment left behind after a crash or a reboot.
        kiln_testenv::stop(root)?;
    }
    eprintln!(
        "kiln-testenv: starting etcd, kube-apiserver, kube-controller-manager, PostgreSQL, MariaDB in {}",
        root.display()
    );
    let env = kiln_testenv::Environment::start(root)?;
    let text = env.exports();
    std::fs::write(exports, &text).map_err(|e| kiln_testenv::Error::Io {
        what: format!("write {}", exports.display()),
        source: e,
    })?;
    print!("{text}");
    Ok(())
}
