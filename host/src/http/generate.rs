//! `POST /{route}`: where an HTTP request becomes a plugin call and then a job.
//!
//! Order matters and is the same for every plugin: find the plugin (404), read the
//! body within the size limit (413), parse JSON (400), check the plugin's schema
//! (400 with every field), call the plugin in its sandbox (its own 400/404/503,
//! or 500 `plugin_failed`), then either return the built job (`?dry_run=true`) or
//! submit it as a durable job: by default the request waits for it (within its
//! deadline, queue wait included) and answers the media bytes; with
//! `Prefer: respond-async` (RFC 7240) it answers `202 Accepted` with the v2 Job
//! and its `Location`. `Idempotency-Key` (IETF httpapi draft): the same key with
//! the same body is the same job — no second generation; with another body, 422.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::Json;
use axum::body::Body;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use uuid::Uuid;

use super::problem::{FieldProblem, MAX_ERROR_TEXT, Problem, truncate_chars};
use super::{AppState, REQUEST_ID, body_shape, job_errors};
use crate::generation::request_schema;
use crate::auth::Caller;
use crate::events::{FailureKind, GenerationEvents, JobTimings, distinct_id};
use crate::jobs::{CancelOnDrop, IdempotencyClaim, Job, JobService, JobSource, JobStatus, NewUpload, Submission, inputs};
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
    let body: Value = serde_json::from_slice(&bytes).map_err(|e| Problem::bad_json(format!("{e} (line {}, column {})", e.line(), e.column())))?;
    let problems = request_schema::check(&plugin.validator, &plugin.manifest.request_schema, &body);
    if !problems.is_empty() {
        return Err(Problem::invalid_request(problems).with("plugin", plugin.manifest.name.clone()));
    }

    let request_id = headers.get(&REQUEST_ID).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    let respond_async = !dry_run && prefers_async(&headers);
    // Webhook headers are vetted (SSRF policy) before any work; dry runs ignore them.
    let webhook = if dry_run { None } else { super::webhook_headers::subscription(&state, &headers, respond_async).await? };
    let labels = job_labels(&headers)?;
    let idempotency = if dry_run { None } else { idempotency_key(&headers)? };
    let caller_name = caller.as_ref().map(|c| c.name.clone()).unwrap_or_else(|| "-".into());
    let claim = match &idempotency {
        Some(key) => {
            let scope = format!("route {route} caller {caller_name}");
            let fingerprint = JobService::fingerprint(&[route.as_bytes(), &bytes[..]]);
            let job_id = Uuid::new_v4();
            match state.jobs.claim_idempotency_key(&scope, key, &fingerprint, job_id).await.map_err(|f| job_errors::problem(&f, None))? {
                IdempotencyClaim::Claimed => Some((scope, key.clone(), job_id)),
                IdempotencyClaim::Existing { fingerprint: theirs, job_id } if theirs == fingerprint => {
                    // A retry: the same job, no second generation.
                    return follow_existing(&state, &plugin, &headers, job_id, respond_async, started).await;
                }
                IdempotencyClaim::Existing { .. } => {
                    return Err(Problem::new(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "idempotency_key_reused",
                        "The idempotency key was used for another request",
                        "this Idempotency-Key was sent with a different body; use a new key for a new request",
                    ));
                }
            }
        }
        None => None,
    };
    let submitted = submit_new(&state, &plugin, &headers, caller.as_ref(), &bytes, &body, dry_run, respond_async, request_id, claim.as_ref().map(|c| c.2), started, webhook, labels).await;
    let job = match submitted {
        Ok(Submitted::DryRun(response)) => return Ok(response),
        Ok(Submitted::Job { job, plugin_build, fetched, pins }) => (job, plugin_build, fetched, pins),
        Err(problem) => {
            // Refused without a job: the key is free again. An internal failure leaves it
            // claimed, as on `/api/v2`: the job may exist, and a retry must find it.
            if let Some((scope, key, _)) = &claim
                && problem.slug != "internal"
                && let Err(e) = state.jobs.release_idempotency_key(scope, key).await
            {
                tracing::warn!(error = %e, "releasing an idempotency key failed");
            }
            return Err(problem);
        }
    };
    let (job, plugin_build, fetched, pins) = job;
    let job = *job;
    // The job's fetched model files stay pinned in the cache until it ends (the runner pins
    // them again for the run; this covers its time in the queue).
    if !pins.is_empty() {
        let (jobs, id) = (state.jobs.clone(), job.id);
        tokio::spawn(async move {
            let _ = jobs.wait(id, None).await;
            drop(pins);
        });
    }
    if respond_async {
        return Ok(accepted(&job, &headers));
    }
    // A sync caller that goes away cancels its job, unless it may come back for it
    // with its idempotency key.
    let guard = claim.is_none().then(|| CancelOnDrop::new(state.jobs.clone(), job.id));
    let done = state.jobs.wait(job.id, wait_deadline(&job)).await;
    if let Some(guard) = guard {
        guard.disarm();
    }
    let done = done.map_err(|f| job_errors::problem(&f, Some(&plugin.manifest.name)))?;
    respond_with(&state, &plugin, &done, started, Some((plugin_build, fetched))).await
}

enum Submitted {
    DryRun(Response),
    /// The admitted job, how long the plugin's build and the fetches of files named by
    /// reference took, and the pins holding its model files in the cache.
    Job { job: Box<Job>, plugin_build: Duration, fetched: Duration, pins: Vec<crate::models::cache::Pinned> },
}

/// `Server-Timing` of a generation, every phase of it named so that a slow request shows where
/// the time went: `build` (the plugin), `fetch` (files the request names by reference: models
/// into the cache, images by URL or asset), `queue` (flowhost's queue), `prepare` (uploads, waiting
/// for the ComfyUI websocket, preflight, submission and ComfyUI's own queue), `comfyui`
/// (execution), `encode` (fetching, encoding and storing the outputs) and `total` (as the caller
/// waited, from the first byte of the request). Outside the sum: `comfyui_clock`, the execution
/// by ComfyUI's own stamps (its messages can reach us late: its event loop waits on the GIL).
fn server_timing(m: &crate::jobs::JobMetrics, timed: Option<(Duration, Duration)>, total: std::time::Duration) -> String {
    let ms = |v: Option<u64>| v.unwrap_or(0) as f64;
    let build = timed.map(|(d, _)| d.as_secs_f64() * 1000.0).unwrap_or(ms(m.build_ms));
    let fetch = timed.map(|(_, d)| d.as_secs_f64() * 1000.0).unwrap_or(0.0);
    let mut header = format!(
        "build;dur={build:.2}, fetch;dur={fetch:.2}, queue;dur={:.1}, prepare;dur={:.1}, comfyui;dur={:.1}, encode;dur={:.1}, total;dur={:.1}",
        ms(m.queue_ms),
        ms(m.comfyui_queue_ms),
        ms(m.execution_ms),
        ms(m.fetch_ms),
        total.as_secs_f64() * 1000.0
    );
    if let Some(clock) = m.comfyui_clock_ms {
        header.push_str(&format!(", comfyui_clock;dur={clock}.0"));
    }
    header
}

/// Readiness, the plugin's build, the dry run or the job's admission.
#[allow(clippy::too_many_arguments)]
async fn submit_new(
    state: &AppState,
    plugin: &Arc<LoadedPlugin>,
    headers: &HeaderMap,
    caller: Option<&Caller>,
    bytes: &[u8],
    body: &Value,
    dry_run: bool,
    respond_async: bool,
    request_id: String,
    job_id: Option<Uuid>,
    started: Instant,
    webhook: Option<crate::webhooks::Subscription>,
    labels: crate::jobs::labels::Labels,
) -> Result<Submitted, Problem> {
    // Dry runs are an authoring tool: they are not generations, so no events.
    let events = (!dry_run).then(|| GenerationEvents {
        prefix: plugin.manifest.analytics_prefix.clone(),
        plugin: plugin.manifest.name.clone(),
        plugin_version: plugin.manifest.version.clone(),
        route: plugin.manifest.route.clone(),
        request_id: request_id.clone(),
        distinct_id: distinct_id(headers, caller),
    });
    if let Some(events) = &events {
        state.jobs.analytics.emit(events.requested());
    }
    let fail = |problem: Problem, kind: FailureKind, build: Option<Duration>| {
        if let Some(events) = &events {
            let timings = JobTimings { plugin_build: build, total: Some(started.elapsed()), ..JobTimings::default() };
            state.jobs.analytics.emit(events.failed(&serde_json::Map::new(), &timings, kind, &problem.detail));
        }
        problem
    };
    if !dry_run {
        // Not ready (ComfyUI down, custom node or model missing): say so before
        // the plugin runs, with the reason that matters most.
        if let Err(failure) = state.jobs.check_ready(plugin) {
            return Err(fail(job_errors::problem(&failure, Some(&plugin.manifest.name)), FailureKind::ModelError, None));
        }
    }
    let build_started = Instant::now();
    // The plugin gets the caller's own text (valid UTF-8: it just parsed as JSON), not a
    // re-serialisation of it — unless it holds whole-number floats (`320.0`): JSON Schema counts
    // them as integers, so they passed the schema, and the plugin must see them as integers too.
    let mut integral = body.clone();
    let text = if integralize_whole_floats(&mut integral) {
        integral.to_string()
    } else {
        String::from_utf8(bytes.to_vec()).unwrap_or_else(|_| body.to_string())
    };
    let seed = rand::random::<u64>();
    let built = match call_build(&state.call_slots, plugin.clone(), text.clone(), seed, request_id.clone()).await {
        // A file the request names is not on the volume: the volume may be stale (a LoRA a
        // trainer committed after this container's last reload). Refresh it once and look again.
        Err(problem) if problem.status == StatusCode::NOT_FOUND && !dry_run => match state.jobs.references().and_then(|r| r.volume_refresh.clone()) {
            Some(refresh) if refresh.refresh(tokio::time::Instant::from_std(build_started)).await => {
                call_build(&state.call_slots, plugin.clone(), text, seed, request_id.clone()).await
            }
            _ => Err(problem),
        },
        other => other,
    };
    let job = match built {
        Ok(job) => job,
        Err(problem) => return Err(fail(problem, FailureKind::WorkflowError, Some(build_started.elapsed()))),
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
        return Ok(Submitted::DryRun(response));
    }
    let fetch_started = Instant::now();
    let submission = match submission_for(state, plugin, job, caller, request_id, events.clone(), respond_async, job_id, plugin_build).await {
        Ok((mut s, pins)) => {
            s.spec.webhook = webhook;
            s.spec.labels = labels;
            // The typed route's job is its key's too (read back through /api/v2/jobs).
            s.spec.tenant = super::v2::tenant(caller);
            (s, pins)
        }
        Err(failure) => return Err(fail(job_errors::problem(&failure, Some(&plugin.manifest.name)), failure.failure_kind(), Some(plugin_build))),
    };
    let (submission, pins) = submission;
    let fetched = fetch_started.elapsed();
    match state.jobs.submit(submission).await {
        Ok(job) => Ok(Submitted::Job { job: Box::new(job), plugin_build, fetched, pins }),
        Err(failure) => Err(fail(job_errors::problem(&failure, Some(&plugin.manifest.name)), failure.failure_kind(), Some(plugin_build))),
    }
}

/// The durable job for what the plugin built: model files it names by reference fetched
/// into the cache (their names and content hashes put into the graph, so the job's model key
/// carries them) and pinned, input bytes read or fetched now (so a queued job survives a
/// restart), the deadline of a sync request fixed at admission.
#[allow(clippy::too_many_arguments)]
async fn submission_for(
    state: &AppState,
    plugin: &LoadedPlugin,
    mut job: PluginJob,
    caller: Option<&Caller>,
    request_id: String,
    events: Option<GenerationEvents>,
    respond_async: bool,
    id: Option<Uuid>,
    plugin_build: Duration,
) -> Result<(Submission, Vec<crate::models::cache::Pinned>), crate::jobs::JobFailure> {
    let viewer = super::v2::viewer(caller);
    // Fetching counts against the request's deadline (a sync request's whole budget).
    let deadline = tokio::time::Instant::now() + state.jobs.config().job_timeout;
    let placed = state.jobs.place_models(&job.fetches, &viewer, deadline).await?;
    let (files, pins): (Vec<_>, Vec<_>) = placed.into_iter().unzip();
    crate::generation::fill_fetched(&mut job, &files);
    let (mut spec, plugin_uploads) = crate::generation::spec_for(plugin, job);
    spec.model_files = files;
    let mut uploads = Vec::with_capacity(plugin_uploads.len());
    for upload in &plugin_uploads {
        let bytes = if let crate::plugins::UploadSource::File(file) = &upload.source {
            let bytes = state.jobs.fetch_image(&upload.field, file, &viewer, inputs::MAX_INPUT_IMAGE_BYTES, deadline).await?;
            inputs::check_image(&upload.field, bytes)?
        } else {
            let inputs_dir = state.jobs.config().inputs.clone();
            let owned = upload.clone();
            tokio::task::spawn_blocking(move || inputs::upload_bytes(&owned, inputs_dir.as_deref())).await.map_err(crate::jobs::JobFailure::internal)??
        };
        let media_type = crate::media::sniff_media_type(&bytes).to_string();
        uploads.push(NewUpload { node_id: upload.node_id.clone(), input_name: upload.input_name.clone(), filename: upload.filename.clone(), bytes: bytes.into(), media_type });
    }
    spec.request_id = request_id;
    spec.events = events;
    if !respond_async {
        spec.deadline = Some(SystemTime::now() + state.jobs.config().job_timeout);
    }
    let submission = Submission {
        id,
        source: JobSource::Route { route: plugin.manifest.route.clone(), plugin: plugin.manifest.name.clone(), version: plugin.manifest.version.clone() },
        spec,
        uploads,
        build_ms: Some(plugin_build.as_millis() as u64),
    };
    Ok((submission, pins))
}

/// A sync wait ends at the job's deadline (plus a moment for the runner's own
/// timeout to land first); an async job followed synchronously waits one timeout.
fn wait_deadline(job: &Job) -> Option<Instant> {
    let grace = Duration::from_secs(2);
    job.spec.deadline.map(|at| Instant::now() + at.duration_since(SystemTime::now()).unwrap_or_default() + grace)
}

/// The same key and body as an earlier request: answer with that job.
async fn follow_existing(state: &AppState, plugin: &Arc<LoadedPlugin>, headers: &HeaderMap, job_id: Uuid, respond_async: bool, started: Instant) -> Result<Response, Problem> {
    // The first request may still be building its job.
    let mut job = None;
    for _ in 0..100 {
        if let Some(found) = state.jobs.get(job_id).await.map_err(|f| job_errors::problem(&f, None))? {
            job = Some(found);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let Some(job) = job else {
        return Err(Problem::new(StatusCode::CONFLICT, "idempotency_key_in_use", "A request with this idempotency key is in progress", "retry shortly")
            .retry_after(1));
    };
    if respond_async {
        return Ok(accepted(&job, headers));
    }
    let deadline = Instant::now() + state.jobs.config().job_timeout + Duration::from_secs(2);
    let done = state.jobs.wait(job.id, Some(deadline)).await.map_err(|f| job_errors::problem(&f, Some(&plugin.manifest.name)))?;
    respond_with(state, plugin, &done, started, None).await
}

/// `202 Accepted` with the v2 Job, its `Location` and `Preference-Applied`.
/// 202 with the v2 Job, its links absolute as the v2 surface gives them (the Job schema's
/// `url`s are URIs, and the SDKs refuse relative ones).
fn accepted(job: &Job, headers: &HeaderMap) -> Response {
    let links = super::v2::Origin::of(headers);
    let location = links.job_url(&job.id);
    let mut response = (
        StatusCode::ACCEPTED,
        Json(crate::jobs::view::job_json(job, &links)),
    )
        .into_response();
    let headers = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&location) {
        headers.insert(header::LOCATION, v);
    }
    headers.insert("preference-applied", HeaderValue::from_static("respond-async"));
    if let Ok(v) = HeaderValue::from_str(&job.id.to_string()) {
        headers.insert("x-job-id", v);
    }
    response
}

/// A terminal job as the typed route's answer: its first output's bytes, or the problem.
async fn respond_with(state: &AppState, plugin: &LoadedPlugin, job: &Job, started: Instant, timed: Option<(Duration, Duration)>) -> Result<Response, Problem> {
    let job_id = HeaderValue::from_str(&job.id.to_string()).ok();
    let with_job_id = |mut problem_response: Response| {
        if let Some(v) = &job_id {
            problem_response.headers_mut().insert("x-job-id", v.clone());
        }
        problem_response
    };
    let failure = match job.status {
        JobStatus::Succeeded => None,
        JobStatus::Canceled => Some(crate::jobs::JobFailure::Canceled),
        JobStatus::Expired => {
            return Ok(with_job_id(Problem::new(StatusCode::GONE, "expired", "The job expired", "the job's retention ended before it ran").into_response()));
        }
        _ => Some(job.error.clone().unwrap_or_else(|| crate::jobs::JobFailure::internal("job failed without an error"))),
    };
    if let Some(failure) = failure {
        return Ok(with_job_id(job_errors::problem(&failure, Some(&plugin.manifest.name)).into_response()));
    }
    let Some(output) = job.first_output() else {
        let failure = crate::jobs::JobFailure::OutputMissing { node_id: job.spec.outputs.first().cloned().unwrap_or_else(|| "*".into()), caller_fault: !job.spec.caller_nodes.is_empty() };
        return Ok(with_job_id(job_errors::problem(&failure, Some(&plugin.manifest.name)).into_response()));
    };
    let bytes = state.jobs.blobs().get(&output.hash).await.map_err(|e| job_errors::problem(&crate::jobs::JobFailure::internal(e), None))?;
    let mut response = (StatusCode::OK, bytes).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_str(&output.content_type).unwrap_or(HeaderValue::from_static("application/octet-stream")));
    if let Some(seed) = job.spec.seed {
        headers.insert("x-seed", HeaderValue::from(seed));
    }
    headers.insert("x-generation-ms", HeaderValue::from(started.elapsed().as_millis() as u64));
    if let Some(v) = job.prompt_id.as_deref().and_then(|p| HeaderValue::from_str(p).ok()) {
        headers.insert("x-prompt-id", v);
    }
    if let Some(v) = job_id {
        headers.insert("x-job-id", v);
    }
    let server_timing = server_timing(&job.metrics, timed, started.elapsed());
    if let Ok(v) = HeaderValue::from_str(&server_timing) {
        headers.insert("server-timing", v);
    }
    Ok(response)
}

/// The job's labels from `Flowhost-Label: key=value` headers (repeatable; comma-separated
/// pairs allowed): the typed routes' spelling of v2's `metadata` ([`crate::jobs::labels`]).
fn job_labels(headers: &HeaderMap) -> Result<crate::jobs::labels::Labels, Problem> {
    let mut values = Vec::new();
    for value in headers.get_all(LABEL_HEADER) {
        let text = value.to_str().map_err(|_| label_problem("Flowhost-Label values are printable ASCII key=value pairs".into()))?;
        values.push(text);
    }
    crate::jobs::labels::from_pairs("Flowhost-Label", values).map_err(|e| label_problem(e.to_string()))
}

/// The typed routes' label header.
pub const LABEL_HEADER: &str = "flowhost-label";

fn label_problem(detail: String) -> Problem {
    Problem::new(StatusCode::BAD_REQUEST, "invalid_label", "A job label is not valid", detail)
}

/// `Prefer: respond-async` (RFC 7240: comma-separated preferences, any header).
fn prefers_async(headers: &HeaderMap) -> bool {
    headers.get_all("prefer").iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')).any(|p| {
        let token = p.split(';').next().unwrap_or_default().split('=').next().unwrap_or_default().trim();
        token.eq_ignore_ascii_case("respond-async")
    })
}

/// The `Idempotency-Key` header ([`super::idempotency`]), refused as problem+json.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, Problem> {
    super::idempotency::parse(headers).map_err(|refused| {
        Problem::new(StatusCode::BAD_REQUEST, "invalid_idempotency_key", "The Idempotency-Key header is invalid", format!("Idempotency-Key: {}", refused.message()))
            .with("errors", json!([{"field": "Idempotency-Key", "message": refused.message()}]))
    })
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
        Err(join) => {
            tracing::warn!(plugin = %label, error = %join, "plugin call crashed its thread");
            Err(Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "plugin_failed", "The plugin failed", format!("plugin {label} crashed the call: {join}")))
        }
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
        CallError::Busy { plugin, budget_bytes } => Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "plugin_busy",
            "The endpoint is busy",
            format!(
                "plugin {plugin}: the plugin calls in flight hold the service's whole plugin memory budget ({} MiB); retry shortly",
                budget_bytes >> 20
            ),
        )
        .with("plugin", plugin)
        .retry_after(RETRY_AFTER_BUSY),
        CallError::Failed { plugin, version, kind, detail } => {
            // A trap, a panic, a deadline or the memory limit: the operator's to see, by name.
            tracing::warn!(plugin = %plugin, version = %version, failure = ?kind, detail = %cap(&detail), "plugin call failed");
            Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "plugin_failed",
            "The plugin failed",
            format!("plugin {plugin} {version} failed: {}", cap(&detail)),
        )
        .with("plugin", plugin)
        .with("version", version)
        .with("failure", serde_json::to_value(kind).unwrap_or(Value::Null))
        }
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

/// Read the body within the size limit and the read deadline ([`super::body::read`]), its
/// refusals as problem+json.
async fn read_body(
    body: Body,
    headers: &HeaderMap,
    limits: &super::HttpLimits,
) -> Result<axum::body::Bytes, Problem> {
    use super::body::BodyError;
    super::body::read(body, headers, limits.max_body_bytes, limits.body_read_timeout).await.map_err(|e| match e {
        BodyError::TooLarge { limit } => too_large(limit),
        BodyError::Timeout { within } => Problem::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            "The body did not arrive in time",
            format!("the whole body must arrive within {} s", within.as_secs_f64()),
        ),
        BodyError::Broken => Problem::new(StatusCode::BAD_REQUEST, "body_unreadable", "The body could not be read", "the request body broke off or was malformed (chunked encoding, connection reset); send it again"),
    })
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

    #[test]
    fn respond_async_is_found_among_other_preferences() {
        let mut h = HeaderMap::new();
        h.append("prefer", HeaderValue::from_static("return=minimal, Respond-Async; x=1"));
        assert!(prefers_async(&h));
        let mut h = HeaderMap::new();
        h.append("prefer", HeaderValue::from_static("wait=10"));
        assert!(!prefers_async(&h));
    }

}
