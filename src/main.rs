//! The `kiln` command line.

mod commands;
mod progress;

use std::process::ExitCode;

use clap::{CommandFactory as _, Parser};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Kiln: render datasource rows into Kubernetes manifests, commit them to Git,
/// and optionally apply them with Server-Side Apply.
#[derive(Debug, Parser)]
#[command(name = "kiln", version, about)]
struct Cli {
    #[command(subcommand)]
    command: commands::Command,
}

/// The command line's definition, for completions and the man page.
pub fn cli() -> clap::Command {
    Cli::command()
}

/// What a command found, as its exit code says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Done, nothing to report: exit 0.
    Clean,
    /// Differences or drift found (with `--exit-code`): exit 1.
    Differences,
}

/// A reader that stops early (`kiln render | head`) closes the pipe: stop
/// quietly with the exit code of a command ended by SIGPIPE (141), as
/// other tools do, instead of a panic's "failed printing to stdout".
fn quiet_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if message.contains("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(141);
        }
        default(info);
    }));
}

fn main() -> ExitCode {
    quiet_on_closed_stdout();
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
    if cli.command.shows_progress() && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        kiln_render::progress::install(Box::new(progress::Bars::default()));
    }
    match cli.command.run() {
        Ok(Outcome::Clean) => ExitCode::SUCCESS,
        Ok(Outcome::Differences) => ExitCode::from(1),
        Err(error) if error.is::<commands::StdoutClosed>() => ExitCode::from(141),
        Err(error) => {
            eprintln!("error: {}", commands::one_line(&error));
            ExitCode::from(2)
        }
    }
}
