//! What the render engine's tests share.

use kiln_render::config::Config;
use kiln_render::render::{self, Rendered};

/// Loads the configuration at `path`, reads its sources and renders every
/// row, as `kiln render` does; the first error as text.
pub fn render_config(path: &std::path::Path) -> Result<Rendered, String> {
    let config = Config::load(&[path.to_path_buf()]).map_err(|e| e.to_string())?;
    let blueprints = render::compile(&config, &[]).map_err(|e| e.to_string())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let rows = runtime
        .block_on(render::read_sources(&blueprints, &config, None, None))
        .map_err(|e| e.to_string())?;
    render::render(&blueprints, &config, &rows, true).map_err(|e| e.to_string())
}
