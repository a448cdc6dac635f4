//! Where a plugin's job meets ComfyUI: uploads, preflight, submission under an
//! admission limit, waiting with a deadline, outputs, encoding, and translating
//! every failure into a problem the caller can act on.

use std::sync::Arc;
use std::time::Instant;

use axum::http::StatusCode;
use axum::response::Response;
use serde::Serialize;

use crate::http::Problem;
use crate::plugins::{LoadedPlugin, PluginJob};

/// Runs jobs against ComfyUI.
pub struct JobRunner {}

/// What `/health` reports.
#[derive(Debug, Serialize)]
pub struct HealthReport {
    pub ready: bool,
    pub status: &'static str,
    pub comfyui: serde_json::Value,
    pub endpoints: Vec<serde_json::Value>,
}

impl JobRunner {
    pub fn without_backend() -> Self {
        Self {}
    }

    pub async fn run(&self, plugin: Arc<LoadedPlugin>, _job: PluginJob, _request_id: String, _started: Instant) -> Result<Response, Problem> {
        Err(Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "comfyui_unavailable",
            "ComfyUI is not available",
            format!("no ComfyUI backend is configured; {} can only answer ?dry_run=true", plugin.manifest.route),
        )
        .retry_after(30))
    }

    pub async fn health(&self, plugins: &[Arc<LoadedPlugin>]) -> HealthReport {
        HealthReport {
            ready: true,
            status: "ready",
            comfyui: serde_json::json!({"status": "none"}),
            endpoints: plugins
                .iter()
                .map(|p| serde_json::json!({"route": p.manifest.route, "plugin": p.manifest.name, "version": p.manifest.version, "ready": true}))
                .collect(),
        }
    }
}
