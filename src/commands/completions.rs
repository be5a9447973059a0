//! `kiln completions` and `kiln man`: generated from the command line's own
//! definition, so they never fall behind it.

use std::io::Write as _;

use crate::Outcome;

/// Arguments of `kiln completions`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The shell.
    #[arg(value_enum)]
    shell: clap_complete::Shell,
}

/// Arguments of `kiln man`.
#[derive(Debug, clap::Args)]
pub struct ManArgs {}

pub fn run(args: &Args) -> anyhow::Result<Outcome> {
    let mut command = crate::cli();
    let mut out = std::io::stdout().lock();
    clap_complete::generate(args.shell, &mut command, "kiln", &mut out);
    super::to_stdout(out.flush())?;
    Ok(Outcome::Clean)
}

pub fn man(_: &ManArgs) -> anyhow::Result<Outcome> {
    let mut out = std::io::stdout().lock();
    super::to_stdout(clap_mangen::Man::new(crate::cli()).render(&mut out))?;
    super::to_stdout(out.flush())?;
    Ok(Outcome::Clean)
}
