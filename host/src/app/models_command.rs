//! `flowhost models status`: the plugins' model requirements against the volume,
//! the same facts `/health` reports per endpoint.

use std::io::Write;
use std::sync::Arc;

use anyhow::{Context, Result};

use crate::app::cli::ModelsStatusArgs;
use crate::jobs::plugin_needs;
use crate::models::{ModelVolume, check, render_text};
use crate::plugins::engine::AllocatorChoice;
use crate::plugins::{LoadedPlugin, NoModels, PluginEngine, PluginLimits};

/// Returns true when every requirement is met.
pub fn status(args: &ModelsStatusArgs) -> Result<bool> {
    let engine = PluginEngine::new(PluginLimits::default(), AllocatorChoice::Auto)?;
    let mut needs = Vec::new();
    let entries = std::fs::read_dir(&args.plugins).with_context(|| format!("reading plugin folder {}", args.plugins.display()))?;
    let mut files: Vec<_> = entries.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "wasm")).collect();
    files.sort();
    for file in files {
        match LoadedPlugin::load_file(&engine, None, &file, Arc::new(NoModels)) {
            Ok(plugin) => needs.push(plugin_needs(&plugin)),
            Err(err) => tracing::warn!(file = %file.display(), error = %format!("{err:#}"), "skipping a plugin that does not load"),
        }
    }
    let volume = ModelVolume::new(args.models.clone());
    let report = check(&volume, &needs);
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        write!(out, "{}", render_text(&report))?;
    }
    Ok(report.ready)
}
