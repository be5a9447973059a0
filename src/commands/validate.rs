//! `kiln validate`: every error a configuration has, without writing anything.

use kiln_render::render;

use super::{ConfigArgs, runtime};
use crate::Outcome;

/// Arguments of `kiln validate`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    config: ConfigArgs,
    /// How many rows of each source to render as a check.
    #[arg(long, value_name = "N", default_value_t = 10)]
    sample: usize,
}

pub fn run(args: &Args) -> anyhow::Result<Outcome> {
    let config = args.config.load()?;
    super::render::check_selection(&config, &args.config.blueprints)?;
    let mut errors = Vec::new();
    let blueprints = match render::compile(&config, &args.config.blueprints) {
        Ok(b) => b,
        Err(e) => {
            errors.push(e);
            Vec::new()
        }
    };
    let rows = runtime()?.block_on(async {
        let objects = super::cluster_objects(&blueprints, &config).await?;
        let objects = objects
            .as_ref()
            .map(|o| o as &dyn kiln_render::source::Objects);
        anyhow::Ok(render::read_sources(&blueprints, &config, Some(args.sample), objects).await)
    })?;
    let mut sampled = 0;
    match rows {
        Ok(rows) => {
            sampled = rows.values().map(Vec::len).sum::<usize>();
            if let Err(e) = render::render(&blueprints, &config, &rows, false) {
                errors.push(e);
            }
        }
        Err(e) => errors.push(e),
    }
    if errors.is_empty() {
        eprintln!(
            "valid: {} blueprints, {} sources, {sampled} sample rows rendered",
            config.blueprints.len(),
            config.sources.len()
        );
        return Ok(Outcome::Clean);
    }
    let problems: Vec<String> = errors
        .iter()
        .flat_map(|e| e.problems())
        .map(ToString::to_string)
        .collect();
    for problem in &problems {
        eprintln!("error: {problem}");
    }
    match problems.len() {
        1 => anyhow::bail!("1 problem found"),
        n => anyhow::bail!("{n} problems found"),
    }
}
