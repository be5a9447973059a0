//! The `kiln` command line.

mod commands;

use std::process::ExitCode;

use clap::Parser;

/// Kiln: render datasource rows into Kubernetes manifests, commit them to Git,
/// and optionally apply them with Server-Side Apply.
#[derive(Debug, Parser)]
#[command(name = "kiln", version, about)]
struct Cli {
    #[command(subcommand)]
    command: commands::Command,
}

/// What a command found, as its exit code says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Done, nothing to report: exit 0.
    Clean,
    /// Differences or drift found (with `--exit-code`): exit 1.
    Differences,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_log = cli.command.default_log();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_log)),
        )
        // sqlx warns about slow statements with their full text, which for a
        // seed file is pages of SQL; its errors still show.
        .without_time()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command.run() {
        Ok(Outcome::Clean) => ExitCode::SUCCESS,
        Ok(Outcome::Differences) => ExitCode::from(1),
        Err(error) => {
            // One line: the outermost context first, each cause after it
            // (unless it only repeats what is said).
            let mut line = String::new();
            for cause in error.chain().map(ToString::to_string) {
                if line.contains(&cause) {
                    continue;
                }
                if !line.is_empty() {
                    line.push_str(": ");
                }
                line.push_str(&cause);
            }
            eprintln!("error: {line}");
            ExitCode::from(2)
        }
    }
}
