//! `flowhost check-plugin`: the plugin author's dry run, in the same sandbox and
//! with the same checks as the service, without a service.
//!
//! Models: without `--models` the files the manifest declares are taken as
//! present (the first alternative of each requirement), and the output says so;
//! `--models DIR` lists a real volume instead.

use std::io::Write;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::json;

use crate::app::cli::CheckPluginArgs;
use crate::http::generate::call_error_problem;
use crate::generation::request_schema;
use crate::plugins::engine::AllocatorChoice;
use crate::plugins::{LoadedPlugin, ModelLister, PluginEngine, PluginLimits};

/// The files a manifest declares, as if present (filled once the plugin has
/// described itself; before that, nothing is listed).
#[derive(Default)]
pub struct DeclaredModels {
    files: OnceLock<Vec<(String, String)>>,
}

impl DeclaredModels {
    fn fill(&self, plugin: &LoadedPlugin) {
        let files = plugin.manifest.models.iter().filter_map(|r| r.any_of.first()).map(|m| (m.folder.clone(), m.name.clone())).collect();
        let _ = self.files.set(files);
    }
}

impl ModelLister for DeclaredModels {
    fn list_models(&self, folder: &str) -> Vec<(String, u64)> {
        let files = self.files.get().map(Vec::as_slice).unwrap_or_default();
        files.iter().filter(|(f, _)| f == folder).map(|(_, name)| (name.clone(), 1)).collect()
    }
}

/// Run the check; the returned bool is "passed". Output goes to stdout as JSON
/// documents a person or a script can read.
pub fn run(args: &CheckPluginArgs, models: Option<Arc<dyn ModelLister>>) -> Result<bool> {
    let limits = PluginLimits {
        memory_bytes: args.plugin_memory_mb << 20,
        call_timeout: Duration::from_millis(args.plugin_timeout_ms),
        ..PluginLimits::default()
    };
    let engine = PluginEngine::new(limits, AllocatorChoice::Auto)?;
    let declared = Arc::new(DeclaredModels::default());
    let models_note = match &args.models {
        Some(dir) => json!({"source": "volume", "volume": dir}),
        None => json!({
            "source": "declared",
            "note": "the model files the manifest declares are taken as present; pass --models DIR to check a real volume"
        }),
    };
    let lister: Arc<dyn ModelLister> = models.unwrap_or_else(|| declared.clone());
    let mut out = std::io::stdout().lock();
    let plugin = match LoadedPlugin::load_file(&engine, None, &args.file, lister) {
        Ok(plugin) => {
            declared.fill(&plugin);
            plugin
        }
        Err(err) => {
            writeln!(out, "{}", serde_json::to_string_pretty(&json!({"ok": false, "stage": "load", "error": format!("{err:#}")}))?)?;
            return Ok(false);
        }
    };
    writeln!(out, "{}", serde_json::to_string_pretty(&json!({"ok": true, "stage": "load", "sha256": plugin.sha256, "manifest": plugin.manifest, "models": models_note}))?)?;

    let Some(request) = &args.request else { return Ok(true) };
    let text = match request.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path).with_context(|| format!("reading request file {path}"))?,
        None => request.clone(),
    };
    let body: serde_json::Value = match serde_json::from_str(&text) {
        Ok(body) => body,
        Err(err) => {
            writeln!(out, "{}", serde_json::to_string_pretty(&json!({"ok": false, "stage": "request", "error": format!("the request is not JSON: {err}")}))?)?;
            return Ok(false);
        }
    };
    let problems = request_schema::check(&plugin.validator, &plugin.manifest.request_schema, &body);
    if !problems.is_empty() {
        writeln!(out, "{}", serde_json::to_string_pretty(&json!({"ok": false, "stage": "schema", "status": 400, "errors": problems}))?)?;
        return Ok(false);
    }
    match plugin.build(&body.to_string(), rand::random(), "check-plugin") {
        Ok(job) => {
            writeln!(out, "{}", serde_json::to_string_pretty(&json!({"ok": true, "stage": "build", "job": job.dry_run_json(), "models": models_note}))?)?;
            Ok(true)
        }
        Err(err) => {
            let problem = call_error_problem(err, &plugin.label);
            writeln!(out, "{}", serde_json::to_string_pretty(&json!({"ok": false, "stage": "build", "problem": problem.body(), "models": models_note}))?)?;
            Ok(false)
        }
    }
}
