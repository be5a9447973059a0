//! `kiln render`: rows in, a tree of manifests out.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context as _;
use kiln_render::config::Config;
use kiln_render::{render, tree};

use super::{ConfigArgs, Format, runtime};
use crate::Outcome;

/// Arguments of `kiln render`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    config: ConfigArgs,
    /// Write the tree to this directory, replacing what an earlier render
    /// wrote there; without it, the objects go to stdout as one YAML stream.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// The summary: text on stderr, or JSON on stdout.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

pub fn run(args: &Args) -> anyhow::Result<Outcome> {
    let config = Config::load(&args.config.files)?;
    check_selection(&config, &args.config.blueprints)?;
    let blueprints = render::compile(&config, &args.config.blueprints)?;
    let rows = runtime()?.block_on(render::read_sources(&blueprints, &config, None))?;
    let rendered = render::render(&blueprints, &config, &rows, true)?;
    let new = tree::build(&rendered)?;

    let Some(out) = &args.out else {
        let mut stdout = std::io::stdout().lock();
        for object in rendered.instances.iter().flat_map(|i| &i.objects) {
            stdout.write_all(b"---\n")?;
            stdout.write_all(kiln_render::yaml::to_string(&object.value)?.as_bytes())?;
        }
        return Ok(Outcome::Clean);
    };
    let old = tree::read_dir(out)?;
    let summary = tree::Summary::between(&old, &new);
    tree::write_dir(out, &old, &new)
        .with_context(|| format!("failed to write {}", out.display()))?;
    match args.format {
        Format::Text => eprintln!("rendered {}: {}", out.display(), summary.line()),
        Format::Json => println!("{}", serde_json::to_string_pretty(&summary)?),
    }
    Ok(Outcome::Clean)
}

/// `--blueprint` must name blueprints that exist.
pub fn check_selection(config: &Config, selected: &[String]) -> anyhow::Result<()> {
    for name in selected {
        if !config.blueprints.contains_key(name) {
            anyhow::bail!("--blueprint {name}: no Blueprint of that name in the configuration");
        }
    }
    Ok(())
}
