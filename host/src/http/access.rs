//! The access-control middlewares of the typed and admin routes: a request without the key
//! its route needs is refused as problem+json with a `WWW-Authenticate` challenge, like every
//! other typed-route error. Key parsing and comparison stay in `crate::auth`.
//!
//! Owns: the 401/403 answers of the problem+json surfaces. Must never log or echo a key.

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::problem::Problem;
use crate::auth::{AccessKeys, Refusal, Role, check_request};

/// Middleware for generation routes: when keys are configured, a valid user or admin key
/// is required; the caller goes into the request's extensions.
///
/// `axum::middleware::from_fn_with_state(access_keys.clone(), http::access::require_api_key)`
pub async fn require_api_key(
    State(keys): State<AccessKeys>,
    request: Request,
    next: Next,
) -> Response {
    authorize(&keys, Role::User, request, next).await
}

/// Middleware for admin routes (`/metrics`, `/plugins`, ...): when keys are configured,
/// an admin key is required (a user key gets 403).
///
/// `axum::middleware::from_fn_with_state(access_keys.clone(), http::access::require_admin_key)`
pub async fn require_admin_key(
    State(keys): State<AccessKeys>,
    request: Request,
    next: Next,
) -> Response {
    authorize(&keys, Role::Admin, request, next).await
}

async fn authorize(keys: &AccessKeys, needed: Role, mut request: Request, next: Next) -> Response {
    if !keys.is_configured() {
        return next.run(request).await;
    }
    match check_request(keys, needed, request.headers()) {
        Ok(caller) => {
            tracing::debug!(caller = %caller.name, "request authenticated");
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        Err(refusal) => {
            tracing::info!(?refusal, path = %request.uri().path(), "request refused by access control");
            refusal_response(refusal)
        }
    }
}

fn refusal_response(refusal: Refusal) -> Response {
    let (status, slug, title, detail, challenge) = match refusal {
        Refusal::Missing => (
            StatusCode::UNAUTHORIZED,
            "missing-api-key",
            "API key required",
            "Send your API key as `Authorization: Bearer <key>`.",
            "Bearer realm=\"flowhost\"",
        ),
        Refusal::Malformed => (
            StatusCode::UNAUTHORIZED,
            "malformed-authorization",
            "Malformed Authorization header",
            "Send exactly one header `Authorization: Bearer <key>` (one space, no padding). Keys in the query string are not accepted.",
            "Bearer realm=\"flowhost\", error=\"invalid_request\"",
        ),
        Refusal::UnknownKey => (
            StatusCode::UNAUTHORIZED,
            "invalid-api-key",
            "Invalid API key",
            "The API key is not valid. Check it for typos, or ask the operator for a key.",
            "Bearer realm=\"flowhost\", error=\"invalid_token\"",
        ),
        Refusal::NotAdmin => (
            StatusCode::FORBIDDEN,
            "admin-key-required",
            "Admin key required",
            "This route needs an admin key (FLOWHOST_ADMIN_KEYS); your key may only call generation routes.",
            "Bearer realm=\"flowhost\", error=\"insufficient_scope\"",
        ),
    };
    let mut response = Problem::new(status, slug, title, detail).into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(challenge),
    );
    response
}
