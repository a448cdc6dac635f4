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
use crate::jobs::view::job_json;
use crate::jobs::{
    IdempotencyClaim, JobFailure, JobFilter, JobService, JobSource, JobSpec, JobStatus,
    OutputEncoding, UploadSpec,
};

/// Longest Idempotency-Key accepted (the SDK's own bound).
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

/// The `Idempotency-Key` header ([`crate::http::idempotency`]), refused in the v2 envelope.
pub(super) fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, V2Error> {
    crate::http::idempotency::parse(headers).map_err(|refused| V2Error::invalid_request("Idempotency-Key", refused.message()))
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

/// Plain strings in the inputs ComfyUI loads from its input folder
/// ([`flowhost_comfy::Catalogue::file_inputs`]: `LoadImage.image`, `LoadAudio.audio`,
/// `LoadVideo.file`, …): the newest upload the caller may read whose `file_path` is that
/// string becomes the input (as a `core/ASSET` reference would); a string ComfyUI lists in
/// its input folder stays as written; anything else is 422 `invalid_workflow` naming the
/// node and input (`reason: file_not_found`), at submit rather than as a failed job.
async fn resolve_file_names(
    service: &JobService,
    backend: &flowhost_comfy::ComfyBackend,
    workflow: &serde_json::Map<String, Value>,
    viewer: &crate::jobs::Viewer,
    first_index: usize,
) -> Result<Vec<UploadSpec>, V2Error> {
    let mut uploads = Vec::new();
    let mut absent = Vec::new();
    for file in backend.catalogue().file_inputs(workflow) {
        match service.upload_named(&file.value, viewer).await {
            Ok(Some(asset)) => uploads.push(UploadSpec {
                node_id: file.node_id,
                input_name: file.input,
                filename: upload_filename(first_index + uploads.len(), asset.name.as_deref(), &asset.id),
                hash: asset.hash,
            }),
            Ok(None) if file.listed == Some(false) => absent.push(file),
            Ok(None) => {}
            Err(e) => return Err(asset_error(&e, AssetContext::Record)),
        }
    }
    let issues: Vec<flowhost_comfy::NodeIssue> = backend
        .still_absent(workflow, &absent)
        .await
        .into_iter()
        .map(|file| flowhost_comfy::NodeIssue {
            message: format!(
                "`{}` is neither the file_path of an uploaded asset nor a file in ComfyUI's input folder; upload it first (POST /api/v2/assets with that file_path) or reference an asset",
                file.value
            ),
            node_id: file.node_id,
            class_type: file.class_type,
            kind: "file_not_found".into(),
            input_name: Some(file.input),
        })
        .collect();
    if issues.is_empty() { Ok(uploads) } else { Err(submission::invalid_workflow(&issues)) }
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
    let mut uploads = resolve_assets(&service, &super::viewer(caller.as_deref()), &submission.asset_refs).await?;
    if let Some(backend) = service.backend() {
        if let Err(issues) = backend.preflight(&submission.preflight_graph()).await {
            return Err(submission::invalid_workflow(&issues));
        }
        let viewer = super::viewer(caller.as_deref());
        let named = resolve_file_names(&service, backend, &submission.workflow, &viewer, uploads.len()).await?;
        uploads.extend(named);
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

    let Submission { workflow, api_key_comfy_org, labels, .. } = submission;
    let mut spec = JobSpec::new(workflow);
    spec.labels = labels;
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
    /// Cursor: the last listed job's creation (ms) and id; the next page starts after it.
    before_ms: Option<u64>,
    before_id: Option<Uuid>,
    /// `metadata[key]=value` filters (flowhost's label extension): every one must match.
    labels: Vec<(String, String)>,
}

fn parse_list_query(raw: Option<&str>) -> Result<ListQuery, V2Error> {
    let mut query = ListQuery { statuses: Vec::new(), limit: DEFAULT_PAGE, before_ms: None, before_id: None, labels: Vec::new() };
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
                // `t<ms>_<id>`: many jobs share a millisecond, and a cursor of the time alone
                // skipped those after the page's last one. (`t<ms>`, an older cursor, still reads.)
                let bad = || V2Error::invalid_request("cursor", "not a cursor this server issued");
                let rest = value.strip_prefix('t').ok_or_else(bad)?;
                let (ms, id) = match rest.split_once('_') {
                    Some((ms, id)) => (ms, Some(Uuid::parse_str(id).map_err(|_| bad())?)),
                    None => (rest, None),
                };
                query.before_ms = Some(ms.parse().map_err(|_| bad())?);
                query.before_id = id;
            }
            other if other.starts_with("metadata[") && other.ends_with(']') => {
                let key = &other["metadata[".len()..other.len() - 1];
                crate::jobs::labels::check_key(key).map_err(|reason| V2Error::invalid_request(other, reason))?;
                crate::jobs::labels::check_value(&value).map_err(|reason| V2Error::invalid_request(other, reason))?;
                if query.labels.len() == crate::jobs::labels::MAX_LABELS {
                    return Err(V2Error::invalid_request(other, format!("at most {} metadata filters", crate::jobs::labels::MAX_LABELS)));
                }
                query.labels.push((key.to_string(), value.into_owned()));
            }
            other => return Err(V2Error::invalid_request(other, "unknown query parameter (accepted: status, limit, cursor, metadata[key])")),
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
    let filter = JobFilter {
        statuses: query.statuses,
        limit: query.limit + 1,
        created_before: query.before_ms.map(|ms| UNIX_EPOCH + Duration::from_millis(ms)),
        labels: query.labels,
        before_id: query.before_id,
        tenant: super::viewer(caller.as_deref()).only().map(str::to_string),
    };
    let mut jobs = state.jobs.list(&filter).await.map_err(|f| job_failure(&f))?;
    let more = jobs.len() > query.limit;
    jobs.truncate(query.limit);
    let mut body = json!({"jobs": jobs.iter().map(|job| job_json(job, &origin)).collect::<Vec<_>>()});
    if let (true, Some(last)) = (more, jobs.last()) {
        body["next_cursor"] = Value::String(format!("t{}_{}", millis(last.created_at), last.id));
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
        assert_eq!(parse_list_query(Some("metadata%5Bclient%5D=acme")).unwrap().labels, vec![("client".to_string(), "acme".to_string())]);
        assert!(parse_list_query(Some("metadata%5Ba%20b%5D=x")).is_err());
        let id = Uuid::new_v4();
        let query = parse_list_query(Some(&format!("cursor=t1234_{id}"))).unwrap();
        assert_eq!((query.before_ms, query.before_id), (Some(1234), Some(id)), "time and id: no job of that millisecond is skipped");
        for bad in ["limit=0", "limit=101", "status=done", "cursor=xyz", "cursor=t12_nope", "color=red"] {
            assert!(parse_list_query(Some(bad)).is_err(), "{bad}");
        }
    }
}
