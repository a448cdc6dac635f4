//! Errors as `application/problem+json` (RFC 9457), the only error shape the
//! service speaks. Every problem has a stable `type` URI per kind, a `title`, the
//! HTTP `status`, a `detail` that says what to do, and where it applies the
//! failing `errors` (fields), `plugin`, `node`.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

/// Most field problems listed in one answer; the rest are counted (`errors_omitted`).
pub const MAX_REPORTED_ERRORS: usize = 50;
/// Most characters of one field name or message in an answer (a plugin's text included).
pub const MAX_ERROR_TEXT: usize = 500;

/// The first `max` characters of `s` (never splitting a character), with `…` when cut.
pub use crate::generation::{FieldProblem, truncate_chars};

/// Base of every problem `type`.
pub const PROBLEM_BASE: &str = "https://flowhost.dev/problems/";

/// One problem response.
#[derive(Debug, Clone)]
pub struct Problem {
    pub status: StatusCode,
    pub slug: &'static str,
    pub title: String,
    pub detail: String,
    pub extra: Map<String, Value>,
    pub retry_after: Option<u64>,
}

impl Problem {
    pub fn new(status: StatusCode, slug: &'static str, title: impl Into<String>, detail: impl Into<String>) -> Self {
        Self { status, slug, title: title.into(), detail: detail.into(), extra: Map::new(), retry_after: None }
    }

    /// Add a member (`errors`, `plugin`, `node`, ...).
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.extra.insert(key.to_string(), value.into());
        self
    }

    /// Ask the client to retry after `secs` (503s).
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }

    pub fn body(&self) -> Value {
        let mut body = json!({
            "type": format!("{PROBLEM_BASE}{}", self.slug),
            "title": self.title,
            "status": self.status.as_u16(),
            "detail": self.detail,
        });
        if let Value::Object(map) = &mut body {
            for (k, v) in &self.extra {
                map.insert(k.clone(), v.clone());
            }
        }
        body
    }

    // Common problems.

    pub fn not_found_route(path: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, "unknown_route", "No such endpoint", format!("Nothing is served at {path}; GET /plugins lists the endpoints."))
    }

    pub fn bad_json(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_json", "The body is not valid JSON", detail)
    }

    /// 400 naming the failing fields: the first [`MAX_REPORTED_ERRORS`], each text cut to
    /// [`MAX_ERROR_TEXT`] characters, and how many more there were — an answer's size is bounded
    /// whatever the body (or a plugin) produced.
    pub fn invalid_request(mut errors: Vec<FieldProblem>) -> Self {
        let omitted = errors.len().saturating_sub(MAX_REPORTED_ERRORS);
        errors.truncate(MAX_REPORTED_ERRORS);
        for e in &mut errors {
            e.field = truncate_chars(&e.field, MAX_ERROR_TEXT);
            e.message = truncate_chars(&e.message, MAX_ERROR_TEXT);
        }
        let mut detail = errors.iter().map(|e| format!("{}: {}", display_field(&e.field), e.message)).collect::<Vec<_>>().join("; ");
        if omitted > 0 {
            detail.push_str(&format!("; and {omitted} more"));
        }
        let problem = Self::new(StatusCode::BAD_REQUEST, "invalid_request", "The request is invalid", detail)
            .with("errors", serde_json::to_value(&errors).unwrap_or(Value::Null));
        if omitted > 0 { problem.with("errors_omitted", omitted) } else { problem }
    }
}

fn display_field(field: &str) -> &str {
    if field.is_empty() { "(body)" } else { field }
}


impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = self.body().to_string();
        let mut response = (self.status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        if let Some(secs) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reported_errors_limit_obeyed() {
        let errors = (0..MAX_REPORTED_ERRORS).map(|i| FieldProblem { field: format!("f{i}"), message: "bad".into() }).collect();
        let body = Problem::invalid_request(errors).body();
        assert_eq!(body["errors"].as_array().unwrap().len(), MAX_REPORTED_ERRORS);
        assert!(body.get("errors_omitted").is_none());
    }

    #[test]
    fn reported_errors_limit_violated() {
        let errors = (0..100_000).map(|i| FieldProblem { field: format!("f{i}"), message: "x".repeat(10_000) }).collect();
        let body = Problem::invalid_request(errors).body();
        assert_eq!(body["errors"].as_array().unwrap().len(), MAX_REPORTED_ERRORS);
        assert_eq!(body["errors_omitted"], 100_000 - MAX_REPORTED_ERRORS);
        assert!(body.to_string().len() < 64 << 10, "{} bytes", body.to_string().len());
        assert!(body["detail"].as_str().unwrap().ends_with("and 99950 more"));
    }

    #[test]
    fn truncation_never_splits_a_character() {
    }
}
