//! Readiness and health: whether ComfyUI can take work and whether an endpoint
//! has what it needs (node classes, model files), checked before a plugin builds a
//! job so the caller hears the real reason first; and the dry run's preflight.
//!
//! Owns: nothing that changes. Must never: change a worker or the model volume (it only
//! reads their state).

use std::sync::Arc;

use flowhost_comfy::{BackendHealth, ComfyBackend};
use serde::Serialize;
use serde_json::{Value, json};

use super::failure::{JobFailure, RETRY_AFTER_DOWN};
use super::pool::WorkerPool;
use crate::models::{ModelVolume, PluginNeeds, Requirement};
use crate::plugins::{LoadedPlugin, PluginJob};

/// What `/health` reports.
#[derive(Debug, Serialize)]
pub struct HealthReport {
    pub ready: bool,
    pub status: &'static str,
    pub comfyui: Value,
    pub endpoints: Vec<Value>,
    /// One entry per ComfyUI worker (name, status, loaded models, switches).
    pub workers: Vec<Value>,
}

/// The job service's part that says whether ComfyUI and the endpoints can take work.
pub struct Readiness {
    pool: Arc<WorkerPool>,
    /// The model volume, to check a plugin's model files (none: not checked).
    models: Option<Arc<ModelVolume>>,
}

impl Readiness {
    pub fn new(pool: Arc<WorkerPool>, models: Option<Arc<ModelVolume>>) -> Readiness {
        Readiness { pool, models }
    }

    /// For `?dry_run=true`: what ComfyUI's validation would say of the built
    /// graph, when a node catalogue is at hand (uploads are not made, so image
    /// inputs that reference uploads are not checked for existence).
    pub(super) async fn dry_run_preflight(&self, job: &PluginJob) -> Value {
        let Some(backend) = self.pool.primary() else {
            return json!({"checked": false, "reason": "no ComfyUI backend configured"});
        };
        if backend.catalogue().is_empty() {
            return json!({"checked": false, "reason": "ComfyUI's node catalogue is not loaded yet"});
        }
        let upload_targets: Vec<(&str, &str)> = job.uploads.iter().map(|u| (u.node_id.as_str(), u.input_name.as_str())).collect();
        match backend.preflight(&Value::Object(job.workflow.clone())).await {
            Ok(()) => json!({"checked": true, "ok": true, "issues": []}),
            Err(issues) => {
                let issues: Vec<_> = issues
                    .iter()
                    .filter(|i| !upload_targets.contains(&(i.node_id.as_str(), i.input_name.as_deref().unwrap_or(""))))
                    .map(|i| json!({"node_id": i.node_id, "class_type": i.class_type, "kind": i.kind, "input": i.input_name, "message": i.message}))
                    .collect();
                json!({"checked": true, "ok": issues.is_empty(), "issues": issues})
            }
        }
    }

    /// Checked before the plugin builds a job that will run, so the caller hears
    /// the real reason first: ComfyUI down (503 `comfyui_unavailable`) before a
    /// missing node class or model file (503 `endpoint_not_ready`, naming it).
    pub(super) fn check_ready(&self, plugin: &LoadedPlugin) -> Result<(), JobFailure> {
        let Some(backend) = self.pool.primary() else {
            return Err(JobFailure::ComfyUnavailable { detail: "no ComfyUI backend is configured; only ?dry_run=true works".into(), retry_after_s: 30 });
        };
        match backend.health() {
            BackendHealth::Down { reason } => return Err(JobFailure::ComfyUnavailable { detail: reason, retry_after_s: RETRY_AFTER_DOWN }),
            BackendHealth::Starting => return Err(JobFailure::ComfyStarting { retry_after_s: RETRY_AFTER_DOWN }),
            BackendHealth::Ready { .. } | BackendHealth::Degraded { .. } => {}
        }
        let missing = self.missing_for(backend, plugin);
        if missing.is_empty() {
            return Ok(());
        }
        Err(JobFailure::NotReady { route: plugin.manifest.route.clone(), plugin: plugin.manifest.name.clone(), missing })
    }

    /// Human-readable list of what `plugin` lacks (node classes, model files).
    fn missing_for(&self, backend: &ComfyBackend, plugin: &LoadedPlugin) -> Vec<String> {
        let mut missing = Vec::new();
        let catalogue = backend.catalogue();
        if !catalogue.is_empty() {
            for class in &plugin.manifest.node_classes {
                if !catalogue.has_class(class) {
                    missing.push(format!("ComfyUI node class {class} (custom node not installed or failed to import)"));
                }
            }
        }
        if let Some(volume) = &self.models {
            let report = crate::models::check(volume, &[plugin_needs(plugin)]);
            for plugin_status in &report.plugins {
                for req in &plugin_status.requirements {
                    if let crate::models::RequirementState::Missing { looked_for } = &req.state {
                        let empty = crate::models::status::empty_files(volume, looked_for);
                        let note = if empty.is_empty() { String::new() } else { format!("; {} exists but has 0 bytes (an interrupted download?)", empty.join(", ")) };
                        missing.push(format!("model {} ({}){note}", req.purpose, looked_for.join(" or ")));
                    }
                }
            }
        }
        missing
    }

    /// `/health`: ComfyUI's state and per-endpoint readiness.
    pub(super) async fn health(&self, plugins: &[Arc<LoadedPlugin>]) -> HealthReport {
        let Some(backend) = self.pool.primary() else {
            return HealthReport {
                ready: false,
                status: "down",
                comfyui: json!({"status": "not_configured"}),
                endpoints: plugins.iter().map(|p| json!({"route": p.manifest.route, "plugin": p.manifest.name, "version": p.manifest.version, "ready": false, "missing": ["ComfyUI"]})).collect(),
                workers: Vec::new(),
            };
        };
        let health = backend.health();
        let comfyui = match &health {
            BackendHealth::Starting => json!({"status": "starting"}),
            BackendHealth::Ready { version, queue_remaining } => json!({"status": "ready", "version": version, "queue_remaining": queue_remaining}),
            BackendHealth::Degraded { reason } => json!({"status": "degraded", "reason": super::failure::public_reason(reason)}),
            BackendHealth::Down { reason } => json!({"status": "down", "reason": super::failure::public_reason(reason)}),
        };
        // Without a model volume the host cannot see model files; say so rather
        // than claim readiness the plugin may deny.
        let models_checked = self.models.is_some();
        let endpoints: Vec<Value> = plugins
            .iter()
            .map(|p| {
                let missing = self.missing_for(backend, p);
                json!({
                    "route": p.manifest.route,
                    "plugin": p.manifest.name,
                    "version": p.manifest.version,
                    "ready": missing.is_empty() && health.is_serving(),
                    "missing": missing,
                    "models_checked": models_checked || p.manifest.models.is_empty(),
                })
            })
            .collect();
        let all_ready = endpoints.iter().all(|e| e["ready"] == true);
        let (ready, status) = match &health {
            BackendHealth::Starting => (false, "starting"),
            BackendHealth::Down { .. } => (false, "down"),
            BackendHealth::Degraded { .. } => (true, "degraded"),
            BackendHealth::Ready { .. } if all_ready => (true, "ready"),
            BackendHealth::Ready { .. } => (true, "degraded"),
        };
        let workers = self.pool.workers().iter().map(|w| w.describe()).collect();
        HealthReport { ready, status, comfyui, endpoints, workers }
    }
}

/// A plugin's model requirements in the model volume's terms.
pub fn plugin_needs(plugin: &LoadedPlugin) -> PluginNeeds {
    PluginNeeds {
        plugin: plugin.manifest.name.clone(),
        route: plugin.manifest.route.clone(),
        requirements: plugin
            .manifest
            .models
            .iter()
            .map(|r| Requirement { purpose: r.purpose.clone(), any_of: r.any_of.iter().map(|m| (m.folder.clone(), m.name.clone())).collect() })
            .collect(),
    }
}
