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

use super::problem::{FieldProblem, MAX_ERROR_TEXT, Problem, truncate_chars};
use super::{AppState, REQUEST_ID, body_shape, request_schema};
use crate::auth::Caller;
use crate::events::{FailureKind, GenerationEvents, JobTimings, distinct_id};
use crate::jobs::JobContext;
use crate::plugins::bindings::wit::BuildError;
use crate::plugins::call_slots::{Busy, CallSlots};
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

/// `/{route}` with a method other than POST: 404 if nothing is served there (`GET /anything`),
/// else 405 with `Allow: POST`.
pub async fn other_method(State(state): State<AppState>, Path(segment): Path<String>, method: axum::http::Method) -> Response {
    let route = format!("/{segment}");
    if state.registry.lookup(&route).is_none() {
        return Problem::not_found_route(&route).into_response();
    }
    let mut response = Problem::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "Method not allowed", format!("{method} is not supported on {route}; it takes POST"))
        .into_response();
    response.headers_mut().insert(header::ALLOW, super::edge::allow_post());
    response
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

    let bytes = read_body(body, &headers, &state.limits).await?;
    // Bounded shape before a tree is built or a schema walks it (a million unknown keys would be
    // a million error entries).
    if let Err(violation) = body_shape::check(&bytes) {
        return Err(Problem::new(StatusCode::BAD_REQUEST, "body_too_complex", "The body is too complex", violation.detail()));
    }
    let mut body: Value = serde_json::from_slice(&bytes).map_err(|e| Problem::bad_json(format!("{e} (line {}, column {})", e.line(), e.column())))?;
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
    // The plugin gets the caller's own text (valid UTF-8: it just parsed as JSON), not a
    // re-serialisation of it — unless it holds whole-number floats (`320.0`): JSON Schema counts
    // them as integers, so they passed the schema, and the plugin must see them as integers too.
    let text = if integralize_whole_floats(&mut body) {
        body.to_string()
    } else {
        String::from_utf8(bytes.to_vec()).unwrap_or_else(|_| body.to_string())
    };
    let job = match call_build(&state.call_slots, plugin.clone(), text, rand::random::<u64>(), request_id.clone()).await {
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
/// Refused with 503 at once when the plugin (or all plugins) already run as many calls as allowed.
pub async fn call_build(slots: &CallSlots, plugin: Arc<LoadedPlugin>, body: String, seed: u64, request_id: String) -> Result<PluginJob, Problem> {
    let label = plugin.label.clone();
    let permit = slots.try_acquire(&plugin.manifest.name).map_err(|busy| busy_problem(busy, &plugin.manifest.name))?;
    let outcome = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        plugin.build(&body, seed, &request_id)
    })
    .await;
    match outcome {
        Ok(Ok(job)) => Ok(job),
        Ok(Err(err)) => Err(call_error_problem(err, &label)),
        Err(join) => Err(Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "plugin_failed", "The plugin failed", format!("plugin {label} crashed the call: {join}"))),
    }
}

/// Seconds a caller should wait after a 503 for full call slots: calls last at most the plugin
/// deadline (a second by default).
const RETRY_AFTER_BUSY: u64 = 1;

fn busy_problem(busy: Busy, plugin: &str) -> Problem {
    let detail = match busy {
        Busy::Plugin { limit } => format!("plugin {plugin} already runs {limit} calls at once, its limit; retry shortly"),
        Busy::AllPlugins { limit } => format!("the plugins already run {limit} calls at once, the service's limit; retry shortly"),
    };
    Problem::new(StatusCode::SERVICE_UNAVAILABLE, "plugin_busy", "The endpoint is busy", detail).with("plugin", plugin.to_string()).retry_after(RETRY_AFTER_BUSY)
}

/// Map a plugin call error to the problem the caller sees.
///
/// Every text a plugin wrote is cut to [`MAX_ERROR_TEXT`] characters (and at most
/// [`super::problem::MAX_REPORTED_ERRORS`] field errors are listed): a plugin must not be able to
/// make an answer megabytes long.
pub fn call_error_problem(err: CallError, label: &str) -> Problem {
    let plugin_name = label.split('@').next().unwrap_or(label).to_string();
    let cap = |text: &str| truncate_chars(text, MAX_ERROR_TEXT);
    match err {
        CallError::Refused(BuildError::InvalidRequest(errors)) => Problem::invalid_request(
            errors.into_iter().map(|e| FieldProblem { field: e.field, message: e.message }).collect(),
        )
        .with("plugin", plugin_name),
        CallError::Refused(BuildError::NotFound(e)) => {
            let (field, message) = (cap(&e.field), cap(&e.message));
            Problem::new(StatusCode::NOT_FOUND, "not_found", "Not found", format!("{field}: {message}"))
                .with("errors", json!([{"field": field, "message": message}]))
                .with("plugin", plugin_name)
        }
        CallError::Refused(BuildError::Unavailable(reason)) => {
            Problem::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "The endpoint cannot serve right now", cap(&reason))
                .with("plugin", plugin_name)
                .retry_after(30)
        }
        CallError::Refused(BuildError::Internal(reason)) => Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "plugin_internal_error",
            "The plugin reported an internal error",
            format!("plugin {label}: {}", cap(&reason)),
        )
        .with("plugin", plugin_name),
        CallError::Failed { plugin, version, kind, detail } => Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "plugin_failed",
            "The plugin failed",
            format!("plugin {plugin} {version} failed: {}", cap(&detail)),
        )
        .with("plugin", plugin)
        .with("version", version)
        .with("failure", serde_json::to_value(kind).unwrap_or(Value::Null)),
    }
}

/// Turn every whole-number float (`320.0`) into the integer it equals, as JSON Schema's `integer`
/// sees it; returns whether anything changed. Depth is bounded by `body_shape`.
fn integralize_whole_floats(value: &mut Value) -> bool {
    match value {
        Value::Number(n) if n.is_f64() => {
            let f = n.as_f64().unwrap_or(f64::NAN);
            // 2^53: beyond it a float no longer names one integer exactly.
            if f.fract() == 0.0 && f.abs() <= 9_007_199_254_740_992.0 {
                *value = if f < 0.0 { Value::from(f as i64) } else { Value::from(f as u64) };
                true
            } else {
                false
            }
        }
        Value::Array(items) => items.iter_mut().fold(false, |changed, v| integralize_whole_floats(v) | changed),
        Value::Object(map) => map.values_mut().fold(false, |changed, v| integralize_whole_floats(v) | changed),
        _ => false,
    }
}

/// `?dry_run=true|false|1|0`. An empty value (`?dry_run=`) is refused, not taken as true: a
/// template left unfilled must not silently skip the generation (or run it).
fn parse_dry_run(query: &HashMap<String, String>) -> Result<bool, Problem> {
    match query.get("dry_run").map(|v| v.to_ascii_lowercase()) {
        None => Ok(false),
        Some(v) if v == "true" || v == "1" => Ok(true),
        Some(v) if v == "false" || v == "0" => Ok(false),
        Some(v) => Err(Problem::new(StatusCode::BAD_REQUEST, "invalid_query", "Invalid query parameter", format!("dry_run must be true or false, not {:?}", truncate_chars(&v, 50)))
            .with("errors", json!([{"field": "dry_run", "message": "must be true or false"}]))),
    }
}

fn too_large(limit: usize) -> Problem {
    Problem::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        "The body is too large",
        format!("Bodies are limited to {limit} bytes; send large images as inputs-volume paths instead of data URLs."),
    )
}

/// Read the body within the size limit and the read deadline. A declared `Content-Length` over the
/// limit is refused before a byte is read; a body that stops arriving is cut off at the deadline
/// (408); a body that breaks off (bad chunking, reset) is the caller's 400, not a 413.
async fn read_body(body: Body, headers: &HeaderMap, limits: &super::HttpLimits) -> Result<axum::body::Bytes, Problem> {
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_body_bytes as u64) {
        return Err(too_large(limits.max_body_bytes));
    }
    match tokio::time::timeout(limits.body_read_timeout, axum::body::to_bytes(body, limits.max_body_bytes)).await {
        Err(_) => Err(Problem::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            "The body did not arrive in time",
            format!("the whole body must arrive within {} s", limits.body_read_timeout.as_secs_f64()),
        )),
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(e)) if is_length_limit(&e) => Err(too_large(limits.max_body_bytes)),
        Ok(Err(_)) => Err(Problem::new(StatusCode::BAD_REQUEST, "body_unreadable", "The body could not be read", "the request body broke off or was malformed (chunked encoding, connection reset); send it again")),
    }
}

/// Whether a body-read error is the size limit (and not a broken body).
fn is_length_limit(e: &axum::Error) -> bool {
    use std::error::Error as _;
    let mut source: Option<&(dyn std::error::Error + 'static)> = e.source();
    while let Some(err) = source {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = err.source();
    }
    false
}

/// Accept `application/json` and structured-syntax `application/<subtype>+json`, with well-formed
/// `name=value` parameters and, if a charset is named, UTF-8. No content type at all is taken as JSON.
fn check_content_type(headers: &HeaderMap) -> Result<(), Problem> {
    let Some(ct) = headers.get(header::CONTENT_TYPE) else { return Ok(()) };
    let text = ct.to_str().unwrap_or_default();
    if is_json_media_type(text) {
        return Ok(());
    }
    Err(Problem::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        "Unsupported media type",
        format!("send the request as application/json, not {:?}", truncate_chars(text, 100)),
    ))
}

fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
}

pub(crate) fn is_json_media_type(text: &str) -> bool {
    let mut parts = text.split(';');
    let essence = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
    let Some(subtype) = essence.strip_prefix("application/") else { return false };
    let json = subtype == "json" || subtype.strip_suffix("+json").is_some_and(|x| is_token(x) && !x.contains('+'));
    if !json {
        return false;
    }
    parts.all(|param| {
        let param = param.trim();
        let Some((name, value)) = param.split_once('=') else { return false };
        let (name, value) = (name.trim(), value.trim().trim_matches('"'));
        is_token(name) && (!name.eq_ignore_ascii_case("charset") || value.eq_ignore_ascii_case("utf-8"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_type_smuggling_is_refused() {
        for bad in ["application/jsonp", "text/html; x=+json", "text/plain", "application/json-seq", "application/+json", "application/json; charset=latin1", "application/json; garbage", "application/x+y+json"] {
            assert!(!is_json_media_type(bad), "{bad} accepted");
        }
        for good in ["application/json", "Application/JSON", "application/json; charset=utf-8", "application/json;charset=\"UTF-8\"", "application/problem+json", "application/vnd.api+json; v=1"] {
            assert!(is_json_media_type(good), "{good} refused");
        }
    }

    #[test]
    fn whole_number_floats_reach_the_plugin_as_integers() {
        let mut body = json!({"width": 320.0, "height": 512, "guidance": 3.5, "loras": [{"strength": 1.0}], "neg": -2.0});
        assert!(integralize_whole_floats(&mut body));
        assert_eq!(body.to_string(), r#"{"width":320,"height":512,"guidance":3.5,"loras":[{"strength":1}],"neg":-2}"#);
        let mut plain = json!({"width": 320, "guidance": 3.5});
        assert!(!integralize_whole_floats(&mut plain));
    }

    #[test]
    fn empty_dry_run_is_refused_not_true() {
        let q = |v: &str| HashMap::from([("dry_run".to_string(), v.to_string())]);
        assert_eq!(parse_dry_run(&q("")).unwrap_err().status, StatusCode::BAD_REQUEST);
        assert!(parse_dry_run(&q("true")).unwrap());
        assert!(!parse_dry_run(&q("0")).unwrap());
        assert!(!parse_dry_run(&HashMap::new()).unwrap());
    }
}
