//! `POST /{route}`: where an HTTP request becomes a plugin call and then a job.
//!
//! Order matters and is the same for every plugin: find the plugin (404), read the
//! body within the size limit (413), parse JSON (400), check the plugin's schema
//! (400 with every field), call the plugin in its sandbox (its own 400/404/503,
//! or 500 `plugin_failed`), then either return the built job (`?dry_run=true`) or
//! hand it to the job runner.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::body::Body;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::problem::{FieldProblem, Problem};
use super::{AppState, REQUEST_ID, request_schema};
use crate::auth::Caller;
use crate::events::{FailureKind, GenerationEvents, JobTimings, distinct_id};
use crate::jobs::JobContext;
use crate::plugins::bindings::wit::BuildError;
use crate::plugins::{CallError, LoadedPlugin, PluginJob};

pub async fn generate(
    State(state): State<AppState>,
    Path(segment): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    caller: Option<Extension<Caller>>,
    body: Body,
) -> Response {
    match handle(state, segment, query, headers, caller.map(|Extension(c)| c), body).await {
        Ok(response) => response,
        Err(problem) => problem.into_response(),
    }
}

async fn handle(
    state: AppState,
    segment: String,
    query: HashMap<String, String>,
    headers: HeaderMap,
    caller: Option<Caller>,
    body: Body,
) -> Result<Response, Problem> {
    let started = Instant::now();
    let route = format!("/{segment}");
    let plugin = state.registry.lookup(&route).ok_or_else(|| Problem::not_found_route(&route))?;
    let dry_run = parse_dry_run(&query)?;
    check_content_type(&headers)?;

    let bytes = axum::body::to_bytes(body, state.limits.max_body_bytes).await.map_err(|_| {
        Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "The body is too large",
            format!("Bodies are limited to {} bytes; send large images as inputs-volume paths instead of data URLs.", state.limits.max_body_bytes),
        )
    })?;
    let body: Value = serde_json::from_slice(&bytes).map_err(|e| Problem::bad_json(format!("{e} (line {}, column {})", e.line(), e.column())))?;
    let problems = request_schema::check(&plugin.validator, &plugin.manifest.request_schema, &body);
    if !problems.is_empty() {
        return Err(Problem::invalid_request(problems).with("plugin", plugin.manifest.name.clone()));
    }

    let request_id = headers.get(&REQUEST_ID).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    // Dry runs are an authoring tool: they are not generations, so no events.
    let events = (!dry_run).then(|| GenerationEvents {
        prefix: plugin.manifest.analytics_prefix.clone(),
        plugin: plugin.manifest.name.clone(),
        plugin_version: plugin.manifest.version.clone(),
        route: plugin.manifest.route.clone(),
        request_id: request_id.clone(),
        distinct_id: distinct_id(&headers, caller.as_ref()),
    });
    if let Some(events) = &events {
        state.jobs.analytics.emit(events.requested());
    }
    if !dry_run {
        // Not ready (ComfyUI down, custom node or model missing): say so before
        // the plugin runs, with the reason that matters most.
        if let Err(problem) = state.jobs.check_ready(&plugin) {
            if let Some(events) = &events {
                let timings = JobTimings { total: Some(started.elapsed()), ..JobTimings::default() };
                state.jobs.analytics.emit(events.failed(&serde_json::Map::new(), &timings, FailureKind::ModelError, &problem.detail));
            }
            return Err(problem);
        }
    }
    let build_started = Instant::now();
    // The plugin gets the caller's own text (valid UTF-8: it just parsed as JSON),
    // not a re-serialisation of it.
    let text = String::from_utf8(bytes.to_vec()).unwrap_or_else(|_| body.to_string());
    let job = match call_build(plugin.clone(), text, rand::random::<u64>(), request_id.clone()).await {
        Ok(job) => job,
        Err(problem) => {
            if let Some(events) = &events {
                let timings = JobTimings { plugin_build: Some(build_started.elapsed()), total: Some(started.elapsed()), ..JobTimings::default() };
                state.jobs.analytics.emit(events.failed(&serde_json::Map::new(), &timings, FailureKind::WorkflowError, &problem.detail));
            }
            return Err(problem);
        }
    };
    let plugin_build = build_started.elapsed();
    tracing::debug!(plugin = %plugin.label, build_us = plugin_build.as_micros() as u64, "plugin built the job");

    if dry_run {
        let mut out = job.dry_run_json();
        if let Value::Object(map) = &mut out {
            map.insert("plugin".into(), json!({"name": plugin.manifest.name, "version": plugin.manifest.version}));
            map.insert("preflight".into(), state.jobs.dry_run_preflight(&job).await);
        }
        let mut response = Json(out).into_response();
        if let Some(seed) = job.seed {
            response.headers_mut().insert("x-seed", seed.into());
        }
        return Ok(response);
    }
    state.jobs.run(plugin, job, JobContext { request_id, started, plugin_build, events }).await
}

/// Run the plugin's `build` on a blocking thread (it is CPU work with a
/// deadline, and must never stall the async runtime).
pub async fn call_build(plugin: Arc<LoadedPlugin>, body: String, seed: u64, request_id: String) -> Result<PluginJob, Problem> {
    let label = plugin.label.clone();
    let outcome = tokio::task::spawn_blocking(move || plugin.build(&body, seed, &request_id)).await;
    match outcome {
        Ok(Ok(job)) => Ok(job),
        Ok(Err(err)) => Err(call_error_problem(err, &label)),
        Err(join) => Err(Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "plugin_failed", "The plugin failed", format!("plugin {label} crashed the call: {join}"))),
    }
}

/// Map a plugin call error to the problem the caller sees.
pub fn call_error_problem(err: CallError, label: &str) -> Problem {
    let plugin_name = label.split('@').next().unwrap_or(label).to_string();
    match err {
        CallError::Refused(BuildError::InvalidRequest(errors)) => Problem::invalid_request(
            errors.into_iter().map(|e| FieldProblem { field: e.field, message: e.message }).collect(),
        )
        .with("plugin", plugin_name),
        CallError::Refused(BuildError::NotFound(e)) => Problem::new(StatusCode::NOT_FOUND, "not_found", "Not found", format!("{}: {}", e.field, e.message))
            .with("errors", json!([{"field": e.field, "message": e.message}]))
            .with("plugin", plugin_name),
        CallError::Refused(BuildError::Unavailable(reason)) => {
            Problem::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "The endpoint cannot serve right now", reason)
                .with("plugin", plugin_name)
                .retry_after(30)
        }
        CallError::Refused(BuildError::Internal(reason)) => Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "plugin_internal_error",
            "The plugin reported an internal error",
            format!("plugin {label}: {reason}"),
        )
        .with("plugin", plugin_name),
        CallError::Failed { plugin, version, kind, detail } => Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "plugin_failed",
            "The plugin failed",
            format!("plugin {plugin} {version} failed: {detail}"),
        )
        .with("plugin", plugin)
        .with("version", version)
        .with("failure", serde_json::to_value(kind).unwrap_or(Value::Null)),
    }
}

fn parse_dry_run(query: &HashMap<String, String>) -> Result<bool, Problem> {
    match query.get("dry_run").map(|v| v.to_ascii_lowercase()) {
        None => Ok(false),
        Some(v) if v.is_empty() || v == "true" || v == "1" => Ok(true),
        Some(v) if v == "false" || v == "0" => Ok(false),
        Some(v) => Err(Problem::new(StatusCode::BAD_REQUEST, "invalid_query", "Invalid query parameter", format!("dry_run must be true or false, not {v:?}"))
            .with("errors", json!([{"field": "dry_run", "message": "must be true or false"}]))),
    }
}

fn check_content_type(headers: &HeaderMap) -> Result<(), Problem> {
    let Some(ct) = headers.get(header::CONTENT_TYPE) else { return Ok(()) };
    let ct = ct.to_str().unwrap_or_default().to_ascii_lowercase();
    if ct.starts_with("application/json") || ct.contains("+json") {
        return Ok(());
    }
    Err(Problem::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        "Unsupported media type",
        format!("send the request as application/json, not {ct}"),
    ))
}
