//! The `kiln` command line.

use std::process::ExitCode;

use clap::Parser;

/// Kiln: render datasource rows into Kubernetes manifests, commit them to Git,
/// and optionally apply them with Server-Side Apply.
#[derive(Debug, Parser)]
#[command(name = "kiln", version, about)]
struct Cli {}

fn main() -> ExitCode {
    let _cli = Cli::parse();
    ExitCode::SUCCESS
}
