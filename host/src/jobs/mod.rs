//! Where a plugin's job meets ComfyUI: admission, readiness, uploads, preflight,
//! submission with a deadline, outputs, encoding, and translating every failure
//! into a problem the caller can act on ([`comfy_errors`]). Analytics and metrics
//! are recorded on the side and never change the answer.

pub mod comfy_errors;
pub mod inputs;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use flowhost_comfy::{BackendHealth, ComfyBackend, ComfyError, RunRequest};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::Semaphore;

use crate::events::{Analytics, FailureKind, GenerationEvents, JobTimings};
use crate::http::Problem;
use crate::media;
use crate::metrics::Metrics;
use crate::models::{ModelVolume, PluginNeeds, Requirement};
use crate::plugins::bindings::wit;
use crate::plugins::manifest::OutputFormat;
use crate::plugins::{LoadedPlugin, PluginJob};

/// Settings of the job runner.
#[derive(Debug, Clone)]
pub struct JobConfig {
    /// Jobs in flight at once; beyond that, 503 + Retry-After.
    pub max_in_flight: usize,
    /// Per-job deadline, from submission to the last output byte.
    pub job_timeout: Duration,
    pub jpeg_quality: u8,
    /// The inputs volume for path-valued image fields.
    pub inputs: Option<PathBuf>,
}

/// Runs jobs against ComfyUI.
pub struct JobRunner {
    backend: Option<Arc<ComfyBackend>>,
    admission: Arc<Semaphore>,
    config: JobConfig,
    models: Option<Arc<ModelVolume>>,
    pub metrics: Metrics,
    pub analytics: Analytics,
}

/// Per-request facts the runner needs beside the job.
pub struct JobContext {
    pub request_id: String,
    pub started: Instant,
    pub plugin_build: Duration,
    pub events: Option<GenerationEvents>,
}

/// What `/health` reports.
#[derive(Debug, Serialize)]
pub struct HealthReport {
    pub ready: bool,
    pub status: &'static str,
    pub comfyui: Value,
    pub endpoints: Vec<Value>,
}

impl JobRunner {
    pub fn new(backend: Option<Arc<ComfyBackend>>, config: JobConfig, models: Option<Arc<ModelVolume>>, metrics: Metrics, analytics: Analytics) -> Self {
        Self { backend, admission: Arc::new(Semaphore::new(config.max_in_flight.max(1))), config, models, metrics, analytics }
    }

    /// A runner with no ComfyUI: every run is a 503 (only dry runs work).
    pub fn without_backend() -> Self {
        let analytics = Analytics::disabled();
        let metrics = Metrics::new(analytics.clone());
        Self::new(None, JobConfig { max_in_flight: 1, job_timeout: Duration::from_secs(120), jpeg_quality: 90, inputs: None }, None, metrics, analytics)
    }

    pub fn backend(&self) -> Option<&Arc<ComfyBackend>> {
        self.backend.as_ref()
    }

    /// Run a job to its media response. Records events and metrics either way.
    pub async fn run(&self, plugin: Arc<LoadedPlugin>, job: PluginJob, ctx: JobContext) -> Result<Response, Problem> {
        let _in_flight = self.metrics.job_started();
        let mut timings = JobTimings { plugin_build: Some(ctx.plugin_build), ..JobTimings::default() };
        let outcome = self.execute(&plugin, &job, &ctx, &mut timings).await;
        timings.total = Some(ctx.started.elapsed());
        self.metrics.observe_job(&plugin.manifest.route, &timings);
        if let Some(events) = &ctx.events {
            match &outcome {
                Ok(_) => self.analytics.emit(events.completed(&job.analytics, &timings)),
                Err((problem, kind)) => self.analytics.emit(events.failed(&job.analytics, &timings, *kind, &problem.detail)),
            }
        }
        outcome.map_err(|(problem, _)| problem)
    }

    async fn execute(&self, plugin: &Arc<LoadedPlugin>, job: &PluginJob, ctx: &JobContext, timings: &mut JobTimings) -> Result<Response, (Problem, FailureKind)> {
        let name = plugin.manifest.name.as_str();
        let _permit = self.admission.clone().try_acquire_owned().map_err(|_| {
            (
                Problem::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "at_capacity",
                    "At capacity",
                    format!("{} generations are already running on this instance; retry shortly", self.config.max_in_flight),
                )
                .retry_after(2),
                FailureKind::WorkflowError,
            )
        })?;
        let backend = self.backend.as_ref().ok_or_else(|| {
            (
                Problem::new(StatusCode::SERVICE_UNAVAILABLE, "comfyui_unavailable", "ComfyUI is not available", "no ComfyUI backend is configured; only ?dry_run=true works")
                    .retry_after(30),
                FailureKind::WorkflowError,
            )
        })?;
        // Readiness was checked before the plugin built the job; ComfyUI may have
        // gone down since, which `run` reports as Unavailable.
        if let Some(events) = &ctx.events {
            if let Some(event) = events.resolved(&job.analytics) {
                self.analytics.emit(event);
            }
        }

        let queue_started = Instant::now();
        let mut workflow = job.workflow.clone();
        let subfolder = upload_subfolder(&ctx.request_id);
        let uploaded = !job.uploads.is_empty();
        let result = async {
            for upload in &job.uploads {
                let inputs = self.config.inputs.clone();
                let upload_owned = upload.clone();
                let bytes = tokio::task::spawn_blocking(move || inputs::upload_bytes(&upload_owned, inputs.as_deref()))
                    .await
                    .map_err(|e| (Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "Internal error", e.to_string()), FailureKind::WorkflowError))?
                    .map_err(|p| (p, FailureKind::WorkflowError))?;
                let reference = backend
                    .upload_image(bytes.into(), &safe_filename(&upload.filename), &subfolder)
                    .await
                    .map_err(|e| comfy_errors::comfy_problem(name, &e, &job.caller_nodes))?;
                if let Some(Value::Object(node)) = workflow.get_mut(&upload.node_id) {
                    if let Some(Value::Object(inputs)) = node.get_mut("inputs") {
                        inputs.insert(upload.input_name.clone(), Value::String(reference));
                    }
                }
            }
            let graph = Value::Object(workflow);
            if let Err(issues) = backend.preflight(&graph).await {
                return Err(comfy_errors::validation_problem(name, &issues, &job.caller_nodes, "preflight"));
            }
            let mut request = RunRequest::new(graph, self.config.job_timeout);
            request.outputs = job.outputs.clone();
            request.extra_data = json!({"flowhost": {"request_id": ctx.request_id, "plugin": plugin.label.to_string()}});
            match backend.run(request).await {
                Ok(result) => Ok(result),
                Err(ComfyError::Execution { prompt_id, node_id, node_type, exception_type, exception_message, traceback }) => {
                    let failure = wit::ExecutionFailure {
                        node_id: node_id.clone(),
                        node_type: node_type.clone(),
                        exception_type: exception_type.clone(),
                        exception_message: exception_message.clone(),
                    };
                    let explained = {
                        let plugin = plugin.clone();
                        let rid = ctx.request_id.clone();
                        tokio::task::spawn_blocking(move || plugin.explain_failure(&failure, &rid)).await.ok().flatten()
                    };
                    match explained {
                        Some(user) => Err((explained_problem(name, &user, &node_id, &node_type), FailureKind::WorkflowError)),
                        None => Err(comfy_errors::comfy_problem(
                            name,
                            &ComfyError::Execution { prompt_id, node_id, node_type, exception_type, exception_message, traceback },
                            &job.caller_nodes,
                        )),
                    }
                }
                Err(err) => Err(comfy_errors::comfy_problem(name, &err, &job.caller_nodes)),
            }
        }
        .await;
        if uploaded {
            if let Err(err) = backend.remove_uploads(&subfolder).await {
                tracing::warn!(subfolder, error = %format!("{err:#}"), "could not remove uploads");
            }
        }
        let result = result?;
        timings.queue_wait = result.timings.queued.or(Some(queue_started.elapsed().saturating_sub(result.timings.executing + result.timings.fetching)));
        timings.execution = Some(result.timings.executing);

        let encode_started = Instant::now();
        let Some(output) = result.media.into_iter().next() else {
            return Err(comfy_errors::comfy_problem(name, &ComfyError::OutputMissing { node_id: job.outputs.first().cloned().unwrap_or_default() }, &job.caller_nodes));
        };
        let (bytes, media_type) = self.encode(output.bytes.to_vec(), &output.media_type, job.output_format).await.map_err(|p| (p, FailureKind::WorkflowError))?;
        timings.encode = Some(result.timings.fetching + encode_started.elapsed());

        let mut response = (StatusCode::OK, bytes).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_str(&media_type).unwrap_or(HeaderValue::from_static("application/octet-stream")));
        if let Some(seed) = job.seed {
            headers.insert("x-seed", HeaderValue::from(seed));
        }
        headers.insert("x-generation-ms", HeaderValue::from(ctx.started.elapsed().as_millis() as u64));
        if let Ok(v) = HeaderValue::from_str(&result.prompt_id) {
            headers.insert("x-prompt-id", v);
        }
        let server_timing = timings_header(timings, ctx.plugin_build, encode_started.elapsed());
        if let Ok(v) = HeaderValue::from_str(&server_timing) {
            headers.insert("server-timing", v);
        }
        Ok(response)
    }

    /// For `?dry_run=true`: what ComfyUI's validation would say of the built
    /// graph, when a node catalogue is at hand (uploads are not made, so image
    /// inputs that reference uploads are not checked for existence).
    pub async fn dry_run_preflight(&self, job: &PluginJob) -> Value {
        let Some(backend) = &self.backend else {
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

    /// PNG → JPEG (or PNG) per the job's preference; other media pass through.
    async fn encode(&self, bytes: Vec<u8>, media_type: &str, format: OutputFormat) -> Result<(Vec<u8>, String), Problem> {
        let sniffed = media::sniff_media_type(&bytes);
        let media_type = if sniffed == "application/octet-stream" { media_type.to_string() } else { sniffed.to_string() };
        if media_type != "image/png" || format != OutputFormat::Jpeg {
            return Ok((bytes, media_type));
        }
        let quality = self.config.jpeg_quality;
        let encoded = tokio::task::spawn_blocking(move || media::png_to_jpeg(&bytes, quality)).await;
        match encoded {
            Ok(Ok(jpeg)) => Ok((jpeg, "image/jpeg".into())),
            Ok(Err(err)) => Err(Problem::new(StatusCode::BAD_GATEWAY, "output_unreadable", "ComfyUI's output could not be encoded", format!("{err:#}"))),
            Err(err) => Err(Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "Internal error", err.to_string())),
        }
    }

    /// Checked before the plugin builds a job that will run, so the caller hears
    /// the real reason first: ComfyUI down (503 `comfyui_unavailable`) before a
    /// missing node class or model file (503 `endpoint_not_ready`, naming it).
    pub fn check_ready(&self, plugin: &LoadedPlugin) -> Result<(), Problem> {
        let Some(backend) = &self.backend else {
            return Err(Problem::new(StatusCode::SERVICE_UNAVAILABLE, "comfyui_unavailable", "ComfyUI is not available", "no ComfyUI backend is configured; only ?dry_run=true works")
                .retry_after(30));
        };
        match backend.health() {
            BackendHealth::Down { reason } => {
                return Err(Problem::new(StatusCode::SERVICE_UNAVAILABLE, "comfyui_unavailable", "ComfyUI is not available", comfy_errors::public_reason(&reason))
                    .retry_after(comfy_errors::RETRY_AFTER_DOWN));
            }
            BackendHealth::Starting => {
                return Err(Problem::new(StatusCode::SERVICE_UNAVAILABLE, "comfyui_starting", "ComfyUI is starting", "ComfyUI has not answered yet; retry shortly")
                    .retry_after(comfy_errors::RETRY_AFTER_DOWN));
            }
            BackendHealth::Ready { .. } | BackendHealth::Degraded { .. } => {}
        }
        let missing = self.missing_for(backend, plugin);
        if missing.is_empty() {
            return Ok(());
        }
        Err(Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "endpoint_not_ready",
            "This endpoint is not ready",
            format!("{} cannot run: {}", plugin.manifest.route, missing.join("; ")),
        )
        .with("plugin", plugin.manifest.name.clone())
        .with("missing", missing)
        .retry_after(60))
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
    pub async fn health(&self, plugins: &[Arc<LoadedPlugin>]) -> HealthReport {
        let Some(backend) = &self.backend else {
            return HealthReport {
                ready: false,
                status: "down",
                comfyui: json!({"status": "not_configured"}),
                endpoints: plugins.iter().map(|p| json!({"route": p.manifest.route, "plugin": p.manifest.name, "version": p.manifest.version, "ready": false, "missing": ["ComfyUI"]})).collect(),
            };
        };
        let health = backend.health();
        let comfyui = match &health {
            BackendHealth::Starting => json!({"status": "starting"}),
            BackendHealth::Ready { version, queue_remaining } => json!({"status": "ready", "version": version, "queue_remaining": queue_remaining}),
            BackendHealth::Degraded { reason } => json!({"status": "degraded", "reason": comfy_errors::public_reason(&reason)}),
            BackendHealth::Down { reason } => json!({"status": "down", "reason": comfy_errors::public_reason(&reason)}),
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
        HealthReport { ready, status, comfyui, endpoints }
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

fn explained_problem(plugin: &str, user: &wit::UserError, node_id: &str, node_type: &str) -> Problem {
    let status = StatusCode::from_u16(user.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let slug = if status.is_client_error() { "input_rejected" } else { "workflow_failed" };
    let mut problem = Problem::new(status, slug, user.title.clone(), user.detail.clone())
        .with("plugin", plugin)
        .with("node", json!({"id": node_id, "class_type": node_type}));
    if let Some(field) = &user.field {
        problem = problem.with("errors", json!([{"field": field, "message": user.detail}]));
    }
    problem
}

/// The per-request upload folder: unique, and safe as a path segment.
fn upload_subfolder(request_id: &str) -> String {
    let clean: String = request_id.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').take(64).collect();
    if clean.is_empty() { format!("flowhost-{}", uuid::Uuid::new_v4()) } else { format!("flowhost-{clean}") }
}

fn safe_filename(name: &str) -> String {
    let clean: String = name.chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')).take(100).collect();
    let clean = clean.trim_start_matches('.').to_string();
    if clean.is_empty() { "input.png".into() } else { clean }
}

fn timings_header(t: &JobTimings, build: Duration, encode: Duration) -> String {
    let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1000.0).unwrap_or(0.0);
    format!(
        "build;dur={:.2}, queue;dur={:.1}, comfyui;dur={:.1}, encode;dur={:.2}",
        build.as_secs_f64() * 1000.0,
        ms(t.queue_wait),
        ms(t.execution),
        encode.as_secs_f64() * 1000.0
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_names_cannot_escape_their_folder() {
        assert_eq!(safe_filename("../../etc/passwd"), "etcpasswd");
        assert_eq!(safe_filename(".hidden.png"), "hidden.png");
        assert_eq!(safe_filename(""), "input.png");
        assert_eq!(upload_subfolder("../x"), "flowhost-x");
        assert!(upload_subfolder("").starts_with("flowhost-"));
    }
}
