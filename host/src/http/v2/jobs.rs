//! `/api/v2/jobs`: submit (201), list, get, `/workflow`, `/cancel`. Thin: read the request,
//! resolve `core/ASSET` references, preflight, claim the Idempotency-Key, hand the job to the
//! job service, answer with the v2 view.
//!
//! Must never run a job, sleep or poll here, and never let a key outlive a submission that
//! definitively failed without creating a job (the spec's release rule).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::{Extension, Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use uuid::Uuid;

use super::envelope::{ErrorCode, V2Error};
use super::errors::{asset_error, job_failure, AssetContext};
use super::submission::{self, AssetRef, Submission};
use super::Origin;
use crate::auth::Caller;
use crate::http::AppState;
use crate::http::job_view::job_json_at as job_json;
use crate::jobs::{IdempotencyClaim, JobFailure, JobFilter, JobService, JobSource, JobSpec, JobStatus, OutputEncoding, UploadSpec};

/// Longest Idempotency-Key accepted (the SDK's own bound).
const MAX_IDEMPOTENCY_KEY: usize = 255;
/// Default and largest page of `GET /api/v2/jobs`.
const DEFAULT_PAGE: usize = 50;
const MAX_PAGE: usize = 100;

/// A job id from the path: anything that is not a UUID names no job (404, not 422: the
/// spec's answer for an id that does not exist).
pub(super) fn job_id(raw: &str) -> Result<Uuid, V2Error> {
    Uuid::parse_str(raw).map_err(|_| V2Error::not_found("job"))
}

/// The scope Idempotency-Keys live in: per caller (key name) when keys are on.
fn key_scope(kind: &str, caller: Option<&Caller>) -> String {
    match caller {
        Some(caller) => format!("v2-{kind}:{}", caller.name),
        None => format!("v2-{kind}"),
    }
}

/// The `Idempotency-Key` header, checked (printable ASCII, 1–255 characters).
pub(super) fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, V2Error> {
    let mut values = headers.get_all("idempotency-key").iter();
    let Some(value) = values.next() else { return Ok(None) };
    if values.next().is_some() {
        return Err(V2Error::invalid_request("Idempotency-Key", "send the header once"));
    }
    let key = value.to_str().ok().filter(|k| !k.is_empty() && k.len() <= MAX_IDEMPOTENCY_KEY && k.chars().all(|c| c.is_ascii_graphic() || c == ' '));
    match key {
        Some(key) => Ok(Some(key.to_string())),
        None => Err(V2Error::invalid_request("Idempotency-Key", format!("must be 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII characters"))),
    }
}

/// A file name ComfyUI can take for an uploaded asset: the asset's own name reduced to safe
/// characters, prefixed with the reference's position so two references never collide.
fn upload_filename(index: usize, name: Option<&str>, asset_id: &Uuid) -> String {
    let base = name.and_then(|n| n.rsplit(['/', '\\']).next()).unwrap_or_default();
    let cleaned: String = base.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') { c } else { '_' }).take(100).collect();
    let cleaned = cleaned.trim_start_matches('.');
    if cleaned.is_empty() { format!("{index}-{asset_id}.png") } else { format!("{index}-{cleaned}") }
}

/// Every reference resolved to the blob it names, or `missing_asset` naming the first that
/// does not resolve.
async fn resolve_assets(service: &JobService, viewer: &crate::jobs::Viewer, refs: &[AssetRef]) -> Result<Vec<UploadSpec>, V2Error> {
    let mut uploads = Vec::with_capacity(refs.len());
    for (index, reference) in refs.iter().enumerate() {
        let missing = || {
            V2Error::new(
                ErrorCode::MissingAsset,
                format!("Node {} input `{}`: asset {} does not exist (or has expired); upload it first.", reference.node_id, reference.input, reference.asset_id),
            )
            .with_details(json!({"node_id": reference.node_id, "input": reference.input, "asset_id": reference.asset_id}))
        };
        let Ok(id) = Uuid::parse_str(&reference.asset_id) else { return Err(missing()) };
        let asset = match service.get_asset(id, viewer).await {
            Ok(asset) => asset,
            Err(crate::jobs::AssetError::NotFound) => return Err(missing()),
            Err(other) => return Err(asset_error(&other, AssetContext::Record)),
        };
        if asset.expires_at.is_some_and(|at| at <= SystemTime::now()) {
            return Err(missing());
        }
        uploads.push(UploadSpec {
            node_id: reference.node_id.clone(),
            input_name: reference.input.clone(),
            filename: upload_filename(index, asset.name.as_deref(), &asset.id),
            hash: asset.hash.clone(),
        });
    }
    Ok(uploads)
}

fn parse_json(bytes: &[u8]) -> Result<Value, V2Error> {
    serde_json::from_slice(bytes).map_err(|e| V2Error::invalid_submission("", "not_json", format!("The body is not valid JSON ({e}).")))
}

/// `POST /api/v2/jobs`.
pub async fn submit(State(state): State<AppState>, caller: Option<Extension<Caller>>, headers: HeaderMap, body: axum::body::Body) -> Result<Response, V2Error> {
    let key = idempotency_key(&headers)?;
    let body = super::body_bytes(body, &headers, state.limits.max_body_bytes, state.limits.body_read_timeout).await?;
    let submission = submission::parse(parse_json(&body)?)?;
    let service = state.jobs.clone();
    let uploads = resolve_assets(&service, &super::viewer(caller.as_deref()), &submission.asset_refs).await?;
    if let Some(backend) = service.backend() {
        if let Err(issues) = backend.preflight(&submission.preflight_graph()).await {
            return Err(submission::invalid_workflow(&issues));
        }
    }

    let id = Uuid::new_v4();
    let scope = key_scope("jobs", caller.as_deref());
    if let Some(key) = &key {
        // Single use: any earlier claim refuses, whatever its body (no replay).
        let fingerprint = JobService::fingerprint(&[&body]);
        match service.claim_idempotency_key(&scope, key, &fingerprint, id).await.map_err(|f| job_failure(&f))? {
            IdempotencyClaim::Claimed => {}
            IdempotencyClaim::Existing { .. } => {
                return Err(V2Error::new(
                    ErrorCode::IdempotencyKeyReuse,
                    "This Idempotency-Key was already used for a submission; keys are single-use. Poll or list your jobs to find that job.",
                ));
            }
        }
    }

    let Submission { workflow, api_key_comfy_org, .. } = submission;
    let mut spec = JobSpec::new(workflow);
    spec.caller_nodes = spec.workflow.keys().cloned().collect();
    spec.encoding = OutputEncoding::Original;
    spec.uploads = uploads;
    spec.tenant = super::tenant(caller.as_deref());
    spec.request_id = headers.get(crate::http::REQUEST_ID).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    if let Some(partner_key) = api_key_comfy_org {
        // Forwarded to ComfyUI for this prompt, never stored (the spec's rule for extra_data).
        let mut extra = serde_json::Map::new();
        extra.insert("api_key_comfy_org".into(), Value::String(partner_key));
        service.set_transient_extra_data(id, extra);
    }
    let outcome = service.submit(crate::jobs::Submission { id: Some(id), source: JobSource::Api, spec, uploads: Vec::new(), build_ms: None }).await;
    match outcome {
        Ok(job) => {
            tracing::info!(job_id = %job.id, "v2 job submitted");
            Ok((StatusCode::CREATED, Json(job_json(&job, &Origin::of(&headers)))).into_response())
        }
        Err(failure) => {
            // Definitively refused without a job (queue full, not ready): the key is free
            // again. An internal failure leaves it claimed: the job may exist.
            let definitive = !matches!(failure, JobFailure::Internal { .. });
            if let (Some(key), true) = (&key, definitive) {
                if let Err(err) = service.release_idempotency_key(&scope, key).await {
                    tracing::warn!(error = %err, "could not release an idempotency key");
                }
            }
            Err(job_failure(&failure))
        }
    }
}

/// The job when the caller sees it (its tenant's, or any for an admin key); another
/// tenant's job reads exactly like one that does not exist.
pub(super) async fn visible_job(state: &AppState, caller: Option<&Caller>, raw: &str) -> Result<crate::jobs::Job, V2Error> {
    let id = job_id(raw)?;
    let job = state.jobs.get(id).await.map_err(|f| job_failure(&f))?.ok_or_else(|| V2Error::not_found("job"))?;
    if super::viewer(caller).sees(job.spec.tenant.as_deref()) { Ok(job) } else { Err(V2Error::not_found("job")) }
}

/// `GET /api/v2/jobs/{id}`.
pub async fn get(State(state): State<AppState>, caller: Option<Extension<Caller>>, Path(raw): Path<String>, origin: Origin) -> Result<Response, V2Error> {
    let job = visible_job(&state, caller.as_deref(), &raw).await?;
    Ok(Json(job_json(&job, &origin)).into_response())
}

/// `GET /api/v2/jobs/{id}/workflow`: `format: api`, the executed graph (the submitted one
/// until the job ran). Never carries `extra_data`.
pub async fn workflow(State(state): State<AppState>, caller: Option<Extension<Caller>>, Path(raw): Path<String>) -> Result<Response, V2Error> {
    let job = visible_job(&state, caller.as_deref(), &raw).await?;
    let workflow = if job.workflow.is_object() { job.workflow.clone() } else { Value::Object(job.spec.workflow.clone()) };
    Ok(Json(json!({"format": "api", "workflow": workflow})).into_response())
}

/// `POST /api/v2/jobs/{id}/cancel`: idempotent; the job as it is now.
pub async fn cancel(State(state): State<AppState>, caller: Option<Extension<Caller>>, Path(raw): Path<String>, origin: Origin) -> Result<Response, V2Error> {
    let id = visible_job(&state, caller.as_deref(), &raw).await?.id;
    let job = state.jobs.cancel(id).await.map_err(|f| job_failure(&f))?.ok_or_else(|| V2Error::not_found("job"))?;
    Ok(Json(job_json(&job, &origin)).into_response())
}

/// What a list query asks for.
#[derive(Debug, PartialEq)]
struct ListQuery {
    statuses: Vec<JobStatus>,
    limit: usize,
    before_ms: Option<u64>,
    /// `metadata[k]=v` filters: flowhost keeps no labels, so any filter matches nothing.
    label_filter: bool,
}

fn parse_list_query(raw: Option<&str>) -> Result<ListQuery, V2Error> {
    let mut query = ListQuery { statuses: Vec::new(), limit: DEFAULT_PAGE, before_ms: None, label_filter: false };
    for (name, value) in url::form_urlencoded::parse(raw.unwrap_or_default().as_bytes()) {
        match name.as_ref() {
            "status" => {
                for status in value.split(',').filter(|s| !s.is_empty()) {
                    query.statuses.push(JobStatus::parse(status).ok_or_else(|| V2Error::invalid_request("status", format!("`{status}` is not a job status")))?);
                }
            }
            "limit" => {
                query.limit = value.parse().ok().filter(|n| (1..=MAX_PAGE).contains(n)).ok_or_else(|| V2Error::invalid_request("limit", format!("must be an integer from 1 to {MAX_PAGE}")))?;
            }
            "cursor" => {
                query.before_ms = Some(value.strip_prefix("t").and_then(|ms| ms.parse().ok()).ok_or_else(|| V2Error::invalid_request("cursor", "not a cursor this server issued"))?);
            }
            other if other.starts_with("metadata[") && other.ends_with(']') => query.label_filter = true,
            other => return Err(V2Error::invalid_request(other, "unknown query parameter (accepted: status, limit, cursor)")),
        }
    }
    Ok(query)
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

/// `GET /api/v2/jobs`: newest first, `{"jobs": [...], "next_cursor": ...}` (the shape the
/// SDK's `list_jobs` reads).
pub async fn list(State(state): State<AppState>, caller: Option<Extension<Caller>>, RawQuery(raw): RawQuery, origin: Origin) -> Result<Response, V2Error> {
    let query = parse_list_query(raw.as_deref())?;
    if query.label_filter {
        return Ok(Json(json!({"jobs": []})).into_response());
    }
    let filter = JobFilter {
        statuses: query.statuses,
        limit: query.limit + 1,
        created_before: query.before_ms.map(|ms| UNIX_EPOCH + Duration::from_millis(ms)),
        tenant: super::viewer(caller.as_deref()).only().map(str::to_string),
    };
    let mut jobs = state.jobs.list(&filter).await.map_err(|f| job_failure(&f))?;
    let more = jobs.len() > query.limit;
    jobs.truncate(query.limit);
    let mut body = json!({"jobs": jobs.iter().map(|job| job_json(job, &origin)).collect::<Vec<_>>()});
    if let (true, Some(last)) = (more, jobs.last()) {
        body["next_cursor"] = Value::String(format!("t{}", millis(last.created_at)));
    }
    Ok(Json(body).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_names_are_safe_and_distinct() {
        let id = Uuid::nil();
        assert_eq!(upload_filename(0, Some("../../etc/passwd"), &id), "0-passwd");
        assert_eq!(upload_filename(1, Some("my photo.png"), &id), "1-my_photo.png");
        assert_eq!(upload_filename(2, Some("..."), &id), format!("2-{id}.png"));
        assert_eq!(upload_filename(3, None, &id), format!("3-{id}.png"));
    }

    #[test]
    fn list_queries_are_checked() {
        let query = parse_list_query(Some("status=queued,running&limit=10&cursor=t1234")).unwrap();
        assert_eq!(query.statuses, vec![JobStatus::Queued, JobStatus::Running]);
        assert_eq!((query.limit, query.before_ms), (10, Some(1234)));
        assert!(parse_list_query(Some("metadata%5Bclient%5D=acme")).unwrap().label_filter);
        for bad in ["limit=0", "limit=101", "status=done", "cursor=xyz", "color=red"] {
            assert!(parse_list_query(Some(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn idempotency_keys_are_bounded() {
        let mut headers = HeaderMap::new();
        assert_eq!(idempotency_key(&headers).unwrap(), None);
        headers.insert("idempotency-key", "k-1".parse().unwrap());
        assert_eq!(idempotency_key(&headers).unwrap().as_deref(), Some("k-1"));
        headers.insert("idempotency-key", "x".repeat(256).parse().unwrap());
        assert!(idempotency_key(&headers).is_err());
    }
}
