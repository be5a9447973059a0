//! `kiln crds`: the CRDs generated from the API types, as committed in `crds/`.

use std::io::Write;

use crate::Outcome;

/// Arguments of `kiln crds`.
#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_args: &Args) -> anyhow::Result<Outcome> {
    let text = kiln_render::api::crds_yaml()?;
    super::to_stdout(std::io::stdout().write_all(text.as_bytes()))?;
    Ok(Outcome::Clean)
}
