//! The Comfy API v2 at `/api/v2/` (the vendored spec, `host/api/comfy-api-v2.yaml`, is the
//! authority): thin handlers over the job service, the v2 error envelope, bearer-key access.
//!
//! Owns the v2 request/response shapes and the mapping from domain errors to the envelope
//! ([`envelope`], [`errors`]). Must never decide anything about jobs itself (queueing,
//! idempotency, retention live in `jobs/`), never answer problem+json, and never build a
//! response body by hand outside `jobs::view`.

pub mod assets;
pub mod envelope;
pub mod errors;
pub mod events;
pub mod jobs;
pub mod spec;
pub mod submission;
pub mod transfers;

use axum::Router;
use axum::extract::{FromRequestParts, OriginalUri, Request, State};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, head, post};
use axum::Json;
use serde_json::json;

use crate::auth::{self, AccessKeys, Refusal, Role};
use crate::http::AppState;
use envelope::{ErrorCode, V2Error};

/// The `/api/v2` prefix every link carries.
pub const V2: &str = "/api/v2";

/// Where links point: the scheme and authority the caller used (`http://127.0.0.1:8000`) and
/// the `/api/v2` prefix. Asset and output `url`s are absolute (the spec says `format: uri`,
/// and the SDK parses them as absolute URLs); the job's `urls` are host-relative
/// (`uri-reference`). The document itself is the jobs' ([`crate::jobs::view`]).
pub use crate::jobs::view::Links as Origin;

impl Origin {
    /// The caller's origin, for absolute links: `X-Forwarded-Proto` (http/https only) or
    /// http, and the `Host` header when it is a plain authority (else `localhost`).
    pub fn of(headers: &axum::http::HeaderMap) -> Origin {
        let scheme = match headers.get("x-forwarded-proto").and_then(|v| v.to_str().ok()) {
            Some("https") => "https",
            _ => "http",
        };
        let host = headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .filter(|h| !h.is_empty() && h.len() <= 255 && h.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']')))
            .unwrap_or("localhost");
        Origin {
            origin: format!("{scheme}://{host}"),
            prefix: V2.to_string(),
        }
    }
}

/// The v2 routes, to be nested under `/api/v2`. `/health` is open; everything else needs a
/// key when keys are configured.
pub fn router(keys: AccessKeys) -> Router<AppState> {
    let protected: Router<AppState> = Router::new()
        .route("/jobs", post(jobs::submit).get(jobs::list))
        .route("/jobs/{id}", get(jobs::get))
        .route("/jobs/{id}/workflow", get(jobs::workflow))
        .route("/jobs/{id}/events", get(events::events))
        .route("/jobs/{id}/cancel", post(jobs::cancel))
        .route("/assets", post(assets::upload).layer(DefaultBodyLimit::max(assets::MAX_UPLOAD_BYTES)))
        .route("/assets/from-hash", post(assets::from_hash))
        .route("/assets/by-hash/{hash}", head(assets::head_by_hash))
        .route("/assets/{id}", get(assets::get).delete(assets::delete))
        .route("/assets/{id}/content", get(assets::content))
        .route_layer(middleware::from_fn_with_state(keys, require_key));
    Router::new()
        .route("/health", get(health))
        .merge(protected)
        .fallback(fallback)
        .method_not_allowed_fallback(fallback)
}

/// Who the caller is as far as ownership goes (`docs/operations.md`, "Tenants"): a user
/// key sees what its name owns; an admin key, or a service without keys, sees everything.
pub(crate) fn viewer(caller: Option<&auth::Caller>) -> crate::jobs::Viewer {
    match caller {
        Some(caller) if caller.role != Role::Admin => crate::jobs::Viewer::Tenant(caller.name.clone()),
        _ => crate::jobs::Viewer::Everyone,
    }
}

/// The tenant new jobs and assets are owned by: the key's name, `None` without keys.
pub(crate) fn tenant(caller: Option<&auth::Caller>) -> Option<String> {
    caller.map(|caller| caller.name.clone())
}

/// The envelope's 413 for a body over `limit` bytes.
pub(crate) fn too_large(limit: usize) -> V2Error {
    V2Error::invalid_request("body", format!("bodies are limited to {limit} bytes")).with_status(StatusCode::PAYLOAD_TOO_LARGE)
}

/// 413 at once when the declared `Content-Length` is over `limit` (nothing is read).
pub(crate) fn check_declared_length(
    headers: &axum::http::HeaderMap,
    limit: usize,
) -> Result<(), V2Error> {
    crate::http::body::check_declared_length(headers, limit).map_err(body_error)
}

/// The envelope's 408: a body (or an upload's next chunk) did not arrive in time.
pub(crate) fn body_timeout(within: std::time::Duration) -> V2Error {
    V2Error::invalid_request("body", format!("the body did not arrive within {} s; send it again", within.as_secs_f64())).with_status(StatusCode::REQUEST_TIMEOUT)
}

/// A body that was not read, in the envelope.
fn body_error(e: crate::http::body::BodyError) -> V2Error {
    use crate::http::body::BodyError;
    match e {
        BodyError::TooLarge { limit } => too_large(limit),
        BodyError::Timeout { within } => body_timeout(within),
        BodyError::Broken => V2Error::invalid_request(
            "body",
            "the request body broke off or was malformed; send it again",
        )
        .with_status(StatusCode::BAD_REQUEST),
    }
}

/// A JSON request body with the typed routes' limits ([`crate::http::body::read`]: 413 over
/// `limit`, declared or counted; 408 past `within`; 400 broken), and its shape (depth,
/// members, values: [`crate::http::body_shape`]) bounded before it is parsed (422).
pub(crate) async fn body_bytes(
    body: axum::body::Body,
    headers: &axum::http::HeaderMap,
    limit: usize,
    within: std::time::Duration,
) -> Result<axum::body::Bytes, V2Error> {
    let bytes = crate::http::body::read(body, headers, limit, within)
        .await
        .map_err(body_error)?;
    crate::http::body_shape::check(&bytes)
        .map_err(|violation| V2Error::invalid_request("body", violation.detail()))?;
    Ok(bytes)
}

/// Bearer-key check answering in the v2 envelope (the same keys as the typed routes).
async fn require_key(State(keys): State<AccessKeys>, mut request: Request, next: Next) -> Response {
    if !keys.is_configured() {
        return next.run(request).await;
    }
    match auth::check_request(&keys, Role::User, request.headers()) {
        Ok(caller) => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        Err(refusal) => {
            tracing::info!(?refusal, path = %request.uri().path(), "v2 request refused by access control");
            let message = match refusal {
                Refusal::Missing => "An API key is required: send `Authorization: Bearer <key>`.",
                Refusal::Malformed => "Malformed Authorization header: send exactly one `Authorization: Bearer <key>`.",
                Refusal::UnknownKey => "The API key is not valid.",
                Refusal::NotAdmin => "This key may not call this route.",
            };
            let code = if refusal == Refusal::NotAdmin { ErrorCode::Forbidden } else { ErrorCode::Unauthorized };
            V2Error::new(code, message).into_response()
        }
    }
}

async fn fallback(method: Method, OriginalUri(uri): OriginalUri) -> V2Error {
    let path = uri.path();
    if crate::http::v2::spec::paths().keys().any(|template| matches_template(template, path)) {
        return V2Error::new(ErrorCode::InvalidRequest, format!("{method} is not supported on {path}.")).with_status(StatusCode::METHOD_NOT_ALLOWED);
    }
    V2Error::new(ErrorCode::NotFound, format!("Nothing is served at {path}."))
}

fn matches_template(template: &str, path: &str) -> bool {
    let (t, p): (Vec<&str>, Vec<&str>) = (template.split('/').collect(), path.split('/').collect());
    t.len() == p.len() && t.iter().zip(&p).all(|(t, p)| (t.starts_with('{') && !p.is_empty()) || t == p)
}

/// `GET /api/v2/health`: whether jobs can run now (ComfyUI serving).
async fn health(State(state): State<AppState>) -> Response {
    let (status, comfyui) = match state.jobs.backend().map(|b| b.health()) {
        Some(health) if health.is_serving() => ("ok", if matches!(health, flowhost_comfy::BackendHealth::Ready { .. }) { "ready" } else { "degraded" }),
        Some(flowhost_comfy::BackendHealth::Starting) => ("unavailable", "starting"),
        Some(_) => ("unavailable", "down"),
        None => ("unavailable", "not_configured"),
    };
    let blobs = state.jobs.blobs();
    let blob_store = blobs.check().await;
    // ComfyUI serving but the bucket unreachable: jobs cannot keep their outputs.
    let status = if status == "ok" && blob_store.is_err() { "degraded" } else { status };
    let code = if status == "ok" { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let blob_store = crate::http::health::blob_store_json(blobs.kind(), &blob_store);
    (code, Json(json!({"status": status, "version": env!("CARGO_PKG_VERSION"), "comfyui": comfyui, "blob_store": blob_store}))).into_response()
}

impl<S: Send + Sync> FromRequestParts<S> for Origin {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(Origin::of(&parts.headers))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_match_their_paths_only() {
        assert!(matches_template("/api/v2/jobs/{id}", "/api/v2/jobs/abc"));
        assert!(!matches_template("/api/v2/jobs/{id}", "/api/v2/jobs/abc/events"));
        assert!(!matches_template("/api/v2/jobs/{id}", "/api/v2/jobs/"));
    }
}
