//! `/api/v2/assets`: multipart upload (blake3 dedup, `expected_hash` verified), `from-hash`,
//! `HEAD by-hash/{hash}`, metadata, delete, and content with Range support (206/416).
//!
//! Owns reading the multipart form and the Range header. Must never trust a caller's hash
//! (the asset service hashes the bytes), never use `file_path` as a path on disk (it is a
//! label), and never delete what a job still depends on (outputs and job inputs: 409
//! `asset_in_use`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::multipart::Field;
use axum::extract::{Extension, Multipart, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use futures::stream::BoxStream;
use serde_json::{Value, json};
use uuid::Uuid;

use super::Origin;
use super::envelope::{ErrorCode, V2Error};
use super::errors::{AssetContext, asset_error};
use super::jobs::idempotency_key;
use crate::auth::Caller;
use crate::http::AppState;
use crate::jobs::blobs::{BlobError, StreamedPut};
use crate::jobs::view::asset_json;
use crate::jobs::{AssetError, AssetRole, IdempotencyClaim, JobService};

/// Largest upload (the spec's "~100 MB single-request expectation").
pub const MAX_UPLOAD_BYTES: usize = 100 << 20;
/// Longest text field of the upload form.
const MAX_TEXT_FIELD: usize = 4096;
/// Bounds of the spec's `expires_in` override.
const EXPIRES_IN: std::ops::RangeInclusive<i64> = 60..=604_800;
/// Largest `from-hash` body (a hash, a name, a few tags).
const FROM_HASH_BODY_BYTES: usize = 64 << 10;

fn asset_id(raw: &str) -> Result<Uuid, V2Error> {
    Uuid::parse_str(raw).map_err(|_| V2Error::not_found("asset"))
}

/// A printable label of at most 255 bytes (`file_path`, `content_type`).
fn label(field: &str, value: String) -> Result<String, V2Error> {
    if value.is_empty() || value.len() > 255 || value.chars().any(char::is_control) {
        return Err(V2Error::invalid_request(field, "must be 1 to 255 printable characters"));
    }
    Ok(value)
}

fn media_type(value: String) -> Result<String, V2Error> {
    let value = label("content_type", value)?;
    let valid = value.split_once('/').is_some_and(|(kind, sub)| !kind.is_empty() && !sub.is_empty() && !value.contains(' '));
    if valid { Ok(value) } else { Err(V2Error::invalid_request("content_type", "must be a media type such as image/png")) }
}

fn expires_in(value: &str) -> Result<i64, V2Error> {
    value.trim().parse().ok().filter(|s| EXPIRES_IN.contains(s)).ok_or_else(|| V2Error::invalid_request("expires_in", "must be an integer number of seconds from 60 to 604800"))
}

/// The upload form, read: the file's bytes already stored (streamed), the rest checked.
struct UploadForm {
    put: StreamedPut,
    content_type: String,
    file_path: String,
}

/// Where a failing upload stream leaves the caller's error for the handler to answer with
/// (the blob store only learns that its source failed).
type SourceError = Arc<Mutex<Option<V2Error>>>;

/// The `file` field as a stream of chunks for the blob store; each chunk must arrive
/// within `idle` (a stalled upload is dropped with 408).
fn field_stream<'a>(field: Field<'a>, idle: Duration, failure: SourceError) -> BoxStream<'a, Result<Bytes, BlobError>> {
    futures::stream::unfold(Some(field), move |field| {
        let failure = failure.clone();
        async move {
            let mut field = field?;
            let fail = |error: V2Error| {
                if let Ok(mut slot) = failure.lock() {
                    *slot = Some(error);
                }
                Some((Err(BlobError::SourceFailed), None))
            };
            match tokio::time::timeout(idle, field.chunk()).await {
                Err(_) => fail(super::body_timeout(idle)),
                Ok(Err(err)) => fail(form_error(err)),
                Ok(Ok(None)) => None,
                Ok(Ok(Some(chunk))) => Some((Ok(chunk), Some(field))),
            }
        }
    })
    .boxed()
}

async fn read_form(mut multipart: Multipart, service: &JobService, idle: Duration) -> Result<UploadForm, V2Error> {
    let (mut put, mut content_type, mut file_path, mut expected_hash) = (None, None, None, None::<String>);
    loop {
        let field = match tokio::time::timeout(idle, multipart.next_field()).await {
            Err(_) => return Err(super::body_timeout(idle)),
            Ok(Ok(Some(field))) => field,
            Ok(Ok(None)) => break,
            Ok(Err(err)) => return Err(form_error(err)),
        };
        let name = field.name().unwrap_or_default().to_string();
        match name.as_str() {
            "file" if put.is_some() => return Err(V2Error::invalid_request("file", "send one file per upload")),
            "file" => {
                let failure = SourceError::default();
                let stored = service.store_upload(field_stream(field, idle, failure.clone()), expected_hash.as_deref()).await;
                match stored {
                    Ok(stored) => put = Some(stored),
                    Err(AssetError::SourceFailed) => {
                        let error = failure.lock().ok().and_then(|mut slot| slot.take());
                        return Err(error.unwrap_or_else(|| V2Error::invalid_request("file", "the upload broke off; send it again")));
                    }
                    Err(other) => return Err(asset_error(&other, AssetContext::Upload)),
                }
            }
            "content_type" | "file_path" | "expected_hash" | "tags" | "expires_in" => {
                let text = match tokio::time::timeout(idle, field.text()).await {
                    Err(_) => return Err(super::body_timeout(idle)),
                    Ok(text) => text.map_err(form_error)?,
                };
                if text.len() > MAX_TEXT_FIELD {
                    return Err(V2Error::invalid_request(&name, format!("is longer than {MAX_TEXT_FIELD} bytes")));
                }
                match name.as_str() {
                    "content_type" => content_type = Some(media_type(text)?),
                    "file_path" => file_path = Some(label("file_path", text)?),
                    "expected_hash" if put.is_some() => {
                        // After the file: checked against the hash the bytes were stored under
                        // (they stay unreferenced, for the sweeper, on a mismatch).
                        let stored = put.as_ref().map(|p: &StreamedPut| p.hash.clone()).unwrap_or_default();
                        if !crate::jobs::blobs::is_valid_hash(&text) {
                            return Err(asset_error(&AssetError::InvalidHash, AssetContext::Upload));
                        }
                        if text != stored {
                            return Err(asset_error(&AssetError::HashMismatch { expected: text, actual: stored }, AssetContext::Upload));
                        }
                    }
                    "expected_hash" => expected_hash = Some(text),
                    // Accepted and not kept: flowhost has no tag index, and retention is the
                    // operator's (the spec lets such implementations ignore `expires_in`).
                    "expires_in" => {
                        expires_in(&text)?;
                    }
                    _ => {}
                }
            }
            other => return Err(V2Error::invalid_request(other, "unknown form field (accepted: file, content_type, file_path, expected_hash, tags, expires_in)")),
        }
    }
    let missing = |field: &str| V2Error::invalid_request(field, "is required");
    Ok(UploadForm {
        put: put.ok_or_else(|| missing("file"))?,
        content_type: content_type.ok_or_else(|| missing("content_type"))?,
        file_path: file_path.ok_or_else(|| missing("file_path"))?,
    })
}

fn form_error(err: axum::extract::multipart::MultipartError) -> V2Error {
    if err.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return V2Error::invalid_request("file", format!("uploads are limited to {} bytes", MAX_UPLOAD_BYTES)).with_status(StatusCode::PAYLOAD_TOO_LARGE);
    }
    V2Error::invalid_request("body", format!("not a readable multipart/form-data body ({})", err.body_text()))
}

fn key_scope(caller: Option<&Caller>) -> String {
    match caller {
        Some(caller) => format!("v2-assets:{}", caller.name),
        None => "v2-assets".into(),
    }
}

/// `POST /api/v2/assets`: 201 new bytes, 200 deduplicated onto bytes already stored. The
/// file streams to the blob store as it arrives (hashed on the way, never held whole),
/// in one of the transfer slots.
pub async fn upload(
    State(state): State<AppState>,
    caller: Option<Extension<Caller>>,
    headers: HeaderMap,
    multipart: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Result<Response, V2Error> {
    super::check_declared_length(&headers, MAX_UPLOAD_BYTES)?;
    let multipart = multipart.map_err(|_| V2Error::invalid_request("Content-Type", "uploads are multipart/form-data with a boundary"))?;
    let key = idempotency_key(&headers)?;
    let _slot = state.transfers.start()?;
    let service = state.jobs.clone();
    let form = read_form(multipart, &service, state.limits.body_read_timeout).await?;
    let scope = key_scope(caller.as_deref());
    if let Some(key) = &key {
        let fingerprint = JobService::fingerprint(&[form.put.hash.as_bytes(), form.file_path.as_bytes()]);
        let claim = service.claim_idempotency_key(&scope, key, &fingerprint, Uuid::new_v4()).await.map_err(|f| super::errors::job_failure(&f))?;
        if let IdempotencyClaim::Existing { .. } = claim {
            return Err(V2Error::new(ErrorCode::IdempotencyKeyReuse, "This Idempotency-Key was already used for an upload; keys are single-use."));
        }
    }
    let created = service.record_upload(&form.put, Some(form.file_path), &form.content_type, super::tenant(caller.as_deref())).await;
    match created {
        Ok(created) => {
            let status = if created.created_new { StatusCode::CREATED } else { StatusCode::OK };
            tracing::info!(asset_id = %created.asset.id, created_new = created.created_new, "v2 asset uploaded");
            Ok((status, Json(asset_json(&created.asset, &Origin::of(&headers), Some(created.created_new)))).into_response())
        }
        Err(err) => {
            if let Some(key) = &key {
                if let Err(e) = service.release_idempotency_key(&scope, key).await {
                    tracing::warn!(error = %e, "could not release an idempotency key");
                }
            }
            Err(asset_error(&err, AssetContext::Upload))
        }
    }
}

/// `POST /api/v2/assets/from-hash`: the identical reference that already exists (200: the
/// same hash under the same `file_path`, readable by the caller), else a new record over
/// stored bytes (201), else 404 `blob_not_found`. The spec documents no 4xx but 404 here,
/// so a body that names no usable blob (not JSON, no `hash`, a bad `file_path` or
/// `expires_in`) is that 404 too, its `details` naming the field.
pub async fn from_hash(State(state): State<AppState>, caller: Option<Extension<Caller>>, headers: HeaderMap, body: Body) -> Result<Response, V2Error> {
    let refuse = |field: &str, why: String| {
        V2Error::new(ErrorCode::BlobNotFound, format!("No blob can be minted from this request: `{field}` {why}.")).with_details(json!({"field": field, "reason": why}))
    };
    let body = super::body_bytes(body, &headers, FROM_HASH_BODY_BYTES, state.limits.body_read_timeout).await.map_err(|_| refuse("body", format!("is over {FROM_HASH_BODY_BYTES} bytes or was not sent in time")))?;
    let request: Value = serde_json::from_slice(&body).map_err(|_| refuse("body", "is not a JSON object".into()))?;
    let Some(hash) = request.get("hash").and_then(Value::as_str) else {
        return Err(refuse("hash", "is required: the content hash, blake3:<64 lowercase hex>".into()));
    };
    let file_path = match request.get("file_path") {
        None | Some(Value::Null) => None,
        Some(Value::String(path)) => Some(label("file_path", path.clone()).map_err(|_| refuse("file_path", "must be 1 to 255 printable characters".into()))?),
        Some(_) => return Err(refuse("file_path", "must be a string".into())),
    };
    if let Some(value) = request.get("expires_in").filter(|v| !v.is_null()) {
        let seconds = value.as_i64().filter(|s| EXPIRES_IN.contains(s));
        if seconds.is_none() {
            return Err(refuse("expires_in", "must be an integer number of seconds from 60 to 604800".into()));
        }
    }
    let caller = caller.as_deref();
    let viewer = super::viewer(caller);
    let origin = Origin::of(&headers);
    if let Some(existing) = state.jobs.identical_reference(hash, file_path.as_deref(), &viewer).await.map_err(|e| asset_error(&e, AssetContext::ByHash))? {
        return Ok((StatusCode::OK, Json(asset_json(&existing, &origin, Some(false)))).into_response());
    }
    let created = state.jobs.asset_from_hash(hash, file_path, None, &viewer, super::tenant(caller)).await.map_err(|e| asset_error(&e, AssetContext::ByHash))?;
    Ok((StatusCode::CREATED, Json(asset_json(&created.asset, &origin, Some(created.created_new)))).into_response())
}

/// `HEAD /api/v2/assets/by-hash/{hash}`: 200 when the bytes are stored under an asset the
/// caller sees, else 404.
pub async fn head_by_hash(State(state): State<AppState>, caller: Option<Extension<Caller>>, Path(hash): Path<String>) -> Response {
    match state.jobs.asset_exists_by_hash(&hash, &super::viewer(caller.as_deref())).await {
        Ok(true) => StatusCode::OK.into_response(),
        Ok(false) | Err(crate::jobs::AssetError::InvalidHash) => StatusCode::NOT_FOUND.into_response(),
        Err(other) => asset_error(&other, AssetContext::ByHash).into_response(),
    }
}

/// `GET /api/v2/assets/{id}`.
pub async fn get(State(state): State<AppState>, caller: Option<Extension<Caller>>, Path(raw): Path<String>, origin: Origin) -> Result<Response, V2Error> {
    let asset = state.jobs.get_asset(asset_id(&raw)?, &super::viewer(caller.as_deref())).await.map_err(|e| asset_error(&e, AssetContext::Record))?;
    Ok(Json(asset_json(&asset, &origin, None)).into_response())
}

/// `DELETE /api/v2/assets/{id}`: uploads only; a job's outputs and inputs are held (409).
pub async fn delete(State(state): State<AppState>, caller: Option<Extension<Caller>>, Path(raw): Path<String>) -> Result<Response, V2Error> {
    let id = asset_id(&raw)?;
    let asset = state.jobs.get_asset(id, &super::viewer(caller.as_deref())).await.map_err(|e| asset_error(&e, AssetContext::Record))?;
    if asset.role != AssetRole::Upload {
        return Err(V2Error::new(ErrorCode::AssetInUse, "This asset cannot be deleted while the platform still depends on it."));
    }
    state.jobs.delete_asset(id).await.map_err(|e| asset_error(&e, AssetContext::Record))?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// A parsed `Range` header against content of `size` bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum RangeRequest {
    /// No (usable) range: the whole content, 200.
    Full,
    /// `start..=end`, 206.
    Part { start: u64, end: u64 },
    /// 416.
    Unsatisfiable,
}

/// One `bytes=` range (first-last, first-, or -suffix). Several ranges or another unit are
/// answered with the whole content (RFC 9110 lets a server ignore Range).
pub fn parse_range(header: Option<&str>, size: u64) -> RangeRequest {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else { return RangeRequest::Full };
    if spec.contains(',') {
        return RangeRequest::Full;
    }
    let Some((first, last)) = spec.trim().split_once('-') else { return RangeRequest::Full };
    let (first, last) = (first.trim(), last.trim());
    match (first.is_empty(), last.is_empty()) {
        (true, true) => RangeRequest::Full,
        (true, false) => match last.parse::<u64>() {
            Ok(n) if n == 0 || size == 0 => RangeRequest::Unsatisfiable,
            Ok(n) => RangeRequest::Part { start: size.saturating_sub(n), end: size - 1 },
            Err(_) => RangeRequest::Full,
        },
        (false, _) => {
            let Ok(start) = first.parse::<u64>() else { return RangeRequest::Full };
            let end = if last.is_empty() {
                u64::MAX
            } else {
                match last.parse::<u64>() {
                    Ok(end) if end >= start => end,
                    _ => return RangeRequest::Full,
                }
            };
            if start >= size { RangeRequest::Unsatisfiable } else { RangeRequest::Part { start, end: end.min(size - 1) } }
        }
    }
}

/// `GET /api/v2/assets/{id}/content`: the bytes (200), a range (206), or 416, streamed
/// from the blob store a chunk at a time in one of the transfer slots (held until the body
/// is sent); or a 302 to a presigned URL of the bucket when the blob store presigns (the
/// client's Range header then goes to the bucket, which honours it too). Always as an
/// attachment with `nosniff`: an uploaded `text/html` is never rendered by a browser on
/// this origin.
pub async fn content(State(state): State<AppState>, caller: Option<Extension<Caller>>, Path(raw): Path<String>, headers: HeaderMap) -> Result<Response, V2Error> {
    let id = asset_id(&raw)?;
    let asset = state.jobs.get_asset(id, &super::viewer(caller.as_deref())).await.map_err(|e| asset_error(&e, AssetContext::Record))?;
    if let Some(url) = state.jobs.asset_download_url(&asset).await.map_err(|e| asset_error(&e, AssetContext::Record))? {
        if let Ok(location) = HeaderValue::from_str(&url) {
            let mut response = Response::new(Body::empty());
            *response.status_mut() = StatusCode::FOUND;
            response.headers_mut().insert(header::LOCATION, location);
            response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("private, no-store"));
            return Ok(response);
        }
    }
    let range = parse_range(headers.get(header::RANGE).and_then(|v| v.to_str().ok()), asset.size_bytes);
    let (status, wanted) = match range {
        RangeRequest::Full => (StatusCode::OK, None),
        RangeRequest::Part { start, end } => (StatusCode::PARTIAL_CONTENT, Some((start, Some(end)))),
        RangeRequest::Unsatisfiable => {
            let mut response = asset_error(&crate::jobs::AssetError::RangeNotSatisfiable { size: asset.size_bytes }, AssetContext::Record).into_response();
            if let Ok(value) = HeaderValue::from_str(&format!("bytes */{}", asset.size_bytes)) {
                response.headers_mut().insert(header::CONTENT_RANGE, value);
            }
            return Ok(response);
        }
    };
    let slot = state.transfers.start()?;
    let content = state.jobs.open_asset(asset, wanted).await.map_err(|e| asset_error(&e, AssetContext::Record))?;
    let length = match content.range {
        Some((start, end)) => end + 1 - start,
        None => content.asset.size_bytes,
    };
    // The slot goes with the body: released when the last chunk is sent or the client leaves.
    let body = content.bytes.map(move |chunk| {
        let _held = &slot;
        chunk
    });
    let mut response = Response::new(Body::from_stream(body));
    *response.status_mut() = status;
    let asset = &content.asset;
    let headers = response.headers_mut();
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_str(&asset.content_type).unwrap_or(HeaderValue::from_static("application/octet-stream")));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::CONTENT_DISPOSITION, content_disposition(asset.name.as_deref()));
    if let Some(hex) = asset.hash.strip_prefix("blake3:") {
        if let Ok(etag) = HeaderValue::from_str(&format!("\"{hex}\"")) {
            headers.insert(header::ETAG, etag);
        }
    }
    if let Some((start, end)) = content.range {
        if let Ok(value) = HeaderValue::from_str(&format!("bytes {start}-{end}/{}", asset.size_bytes)) {
            headers.insert(header::CONTENT_RANGE, value);
        }
    }
    Ok(response)
}

/// `attachment`, with the asset's name reduced to safe characters when it has one.
fn content_disposition(name: Option<&str>) -> HeaderValue {
    let base = name.and_then(|n| n.rsplit(['/', '\\']).next()).unwrap_or_default();
    let cleaned: String = base.chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')).take(100).collect();
    let cleaned = cleaned.trim_start_matches('.');
    if cleaned.is_empty() {
        return HeaderValue::from_static("attachment");
    }
    HeaderValue::from_str(&format!("attachment; filename=\"{cleaned}\"")).unwrap_or(HeaderValue::from_static("attachment"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn downloads_are_attachments_with_safe_names() {
        assert_eq!(content_disposition(Some("../../x/evil page.html")), "attachment; filename=\"evilpage.html\"");
        assert_eq!(content_disposition(Some("...")), "attachment");
        assert_eq!(content_disposition(None), "attachment");
    }

    #[test]
    fn ranges_follow_rfc_9110() {
        use RangeRequest::*;
        assert_eq!(parse_range(None, 10), Full);
        assert_eq!(parse_range(Some("bytes=0-3"), 10), Part { start: 0, end: 3 });
        assert_eq!(parse_range(Some("bytes=4-"), 10), Part { start: 4, end: 9 });
        assert_eq!(parse_range(Some("bytes=5-100"), 10), Part { start: 5, end: 9 });
        assert_eq!(parse_range(Some("bytes=-3"), 10), Part { start: 7, end: 9 });
        assert_eq!(parse_range(Some("bytes=-30"), 10), Part { start: 0, end: 9 });
        assert_eq!(parse_range(Some("bytes=10-"), 10), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=-0"), 10), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=0-1,4-5"), 10), Full);
        assert_eq!(parse_range(Some("items=0-1"), 10), Full);
        assert_eq!(parse_range(Some("bytes=5-2"), 10), Full);
        assert_eq!(parse_range(Some("bytes=0-0"), 0), Unsatisfiable);
    }
}
