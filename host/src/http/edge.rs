//! The outermost checks, before routing: a request head too large to be reasonable gets its 414
//! or 431 as problem+json (hyper's own parser limits are far higher and answer with no body), and
//! the router's bare 405 (no body) becomes problem+json keeping its `Allow`.
//!
//! This module must never read bodies or know about plugins.

use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::Problem;

/// Longest request target (path and query) accepted.
pub const MAX_URI_BYTES: usize = 8 << 10;
/// Most bytes of header names and values accepted in one request.
pub const MAX_HEADER_BYTES: usize = 32 << 10;

pub async fn guard(request: Request, next: Next) -> Response {
    let uri_len = request.uri().path_and_query().map_or(0, |pq| pq.as_str().len());
    if uri_len > MAX_URI_BYTES {
        return Problem::new(
            StatusCode::URI_TOO_LONG,
            "uri_too_long",
            "The request target is too long",
            format!("the path and query are {uri_len} bytes; at most {MAX_URI_BYTES} are accepted (parameters go in the JSON body)"),
        )
        .into_response();
    }
    let header_bytes: usize = request.headers().iter().map(|(k, v)| k.as_str().len() + v.len() + 4).sum();
    if header_bytes > MAX_HEADER_BYTES {
        return Problem::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            "The request headers are too large",
            format!("the headers are {header_bytes} bytes; at most {MAX_HEADER_BYTES} are accepted"),
        )
        .into_response();
    }
    let method = request.method().clone();
    let response = next.run(request).await;
    if response.status() == StatusCode::METHOD_NOT_ALLOWED && !response.headers().contains_key(header::CONTENT_TYPE) {
        let allow = response.headers().get(header::ALLOW).cloned();
        let allowed = allow.as_ref().and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let mut problem = Problem::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "Method not allowed",
            format!("{method} is not supported here; allowed: {allowed}"),
        )
        .into_response();
        if let Some(allow) = allow {
            problem.headers_mut().insert(header::ALLOW, allow);
        }
        return problem;
    }
    response
}

/// `Allow: POST`, for the generation routes.
pub fn allow_post() -> HeaderValue {
    HeaderValue::from_static("POST")
}
