//! The Comfy API v2 error envelope: `{"error": {"code", "message", "details"}}`, the only
//! error shape `/api/v2` speaks (never problem+json).
//!
//! Owns the closed set of codes ([`ErrorCode`]), the status each one goes with, and the one
//! shape of the answer. Must never put internal detail into a 5xx
//! message: an `upstream_error` always says the same generic sentence and the cause goes to
//! the log, tied to the request id. The mapping from domain errors is in `errors.rs`.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// The codes `/api/v2` answers with. Every one is named in the vendored spec
/// (`components.schemas.ErrorEnvelope` and the operations' response descriptions), except
/// `invalid_request`: the spec's "validation failure" for request bodies and query strings
/// that are not workflows names no code, and `invalid_request` is what the self-hosted
/// `comfy-api-proxy` answers there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    InvalidWorkflow,
    WorkflowFormatUi,
    MissingAsset,
    HashMismatch,
    BlobNotFound,
    IdempotencyKeyReuse,
    QueueFull,
    DeploymentNotReady,
    NotFound,
    Unauthorized,
    Forbidden,
    AssetInUse,
    TooManyStreams,
    UpstreamError,
    InvalidRequest,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidWorkflow => "invalid_workflow",
            Self::WorkflowFormatUi => "workflow_format_ui",
            Self::MissingAsset => "missing_asset",
            Self::HashMismatch => "hash_mismatch",
            Self::BlobNotFound => "blob_not_found",
            Self::IdempotencyKeyReuse => "idempotency_key_reuse",
            Self::QueueFull => "queue_full",
            Self::DeploymentNotReady => "deployment_not_ready",
            Self::NotFound => "not_found",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::AssetInUse => "asset_in_use",
            Self::TooManyStreams => "too_many_streams",
            Self::UpstreamError => "upstream_error",
            Self::InvalidRequest => "invalid_request",
        }
    }

    /// The status the spec pairs with the code.
    pub fn status(self) -> StatusCode {
        match self {
            Self::InvalidWorkflow | Self::WorkflowFormatUi | Self::MissingAsset | Self::IdempotencyKeyReuse | Self::InvalidRequest => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            Self::HashMismatch | Self::AssetInUse => StatusCode::CONFLICT,
            Self::BlobNotFound | Self::NotFound => StatusCode::NOT_FOUND,
            Self::QueueFull | Self::DeploymentNotReady | Self::TooManyStreams => StatusCode::TOO_MANY_REQUESTS,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Forbidden => StatusCode::FORBIDDEN,
            Self::UpstreamError => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// The one sentence every 5xx says; the cause is in the log line with the request id.
pub const GENERIC_UPSTREAM_MESSAGE: &str = "The request could not be completed because of an internal error; retry later. The X-Request-Id header identifies it in the service's logs.";

/// Longest `message` sent; longer ones (e.g. a node's exception text) are cut at a char boundary.
const MAX_MESSAGE_BYTES: usize = 2048;

/// One v2 error answer.
#[derive(Debug, Clone)]
pub struct V2Error {
    pub code: ErrorCode,
    /// The status; normally `code.status()`, except `invalid_request` for a wrong method (405)
    /// or an oversized body (413).
    pub status: StatusCode,
    pub message: String,
    pub details: Option<Value>,
    pub retry_after: Option<u64>,
}

impl V2Error {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, status: code.status(), message: bounded(message.into()), details: None, retry_after: None }
    }

    pub fn with_details(mut self, details: Value) -> Self {
        self.details = Some(details);
        self
    }

    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs.max(1));
        self
    }

    pub fn not_found(what: &str) -> Self {
        Self::new(ErrorCode::NotFound, format!("No {what} with that id (it may never have existed, or has expired)."))
    }

    /// A request field that is wrong, outside a workflow (asset form fields, query parameters).
    pub fn invalid_request(field: &str, message: impl Into<String>) -> Self {
        let message = message.into();
        Self::new(ErrorCode::InvalidRequest, format!("{field}: {message}")).with_details(json!({"field": field, "reason": message}))
    }

    /// A submission body that is wrong outside the graph itself (reserved fields,
    /// `extra_data` keys, `workflow` not an object).
    pub fn invalid_submission(field: &str, reason: &str, message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidWorkflow, message).with_details(json!({"field": field, "reason": reason}))
    }

    /// An internal failure: logged here with its cause, answered with the generic sentence.
    pub fn internal(cause: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "v2 request failed");
        Self::new(ErrorCode::UpstreamError, GENERIC_UPSTREAM_MESSAGE)
    }

    pub fn body(&self) -> Value {
        json!({"error": {"code": self.code.as_str(), "message": self.message, "details": self.details}})
    }
}

fn bounded(mut message: String) -> String {
    if message.len() > MAX_MESSAGE_BYTES {
        let mut cut = MAX_MESSAGE_BYTES;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
        message.push('…');
    }
    message
}

impl IntoResponse for V2Error {
    fn into_response(self) -> Response {
        let mut response = (self.status, self.body().to_string()).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(secs) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.code == ErrorCode::Unauthorized {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"flowhost\""));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_carry_the_spec_statuses() {
        assert_eq!(ErrorCode::QueueFull.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(ErrorCode::HashMismatch.status(), StatusCode::CONFLICT);
        assert_eq!(ErrorCode::BlobNotFound.status(), StatusCode::NOT_FOUND);
        assert_eq!(ErrorCode::IdempotencyKeyReuse.status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(ErrorCode::WorkflowFormatUi.as_str(), "workflow_format_ui");
    }

    #[test]
    fn the_envelope_has_code_message_and_details() {
        let error = V2Error::new(ErrorCode::MissingAsset, "asset x is unknown").with_details(json!({"asset_id": "x"}));
        assert_eq!(error.body(), json!({"error": {"code": "missing_asset", "message": "asset x is unknown", "details": {"asset_id": "x"}}}));
    }

    #[test]
    fn an_internal_error_never_shows_its_cause() {
        let error = V2Error::internal(&"connect to 10.0.0.7:8188 refused");
        assert_eq!(error.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!error.body().to_string().contains("10.0.0.7"));
    }

    #[test]
    fn long_messages_are_bounded() {
        let error = V2Error::new(ErrorCode::InvalidWorkflow, "é".repeat(5000));
        assert!(error.message.len() <= MAX_MESSAGE_BYTES + '…'.len_utf8());
    }

    #[test]
    fn queue_full_says_when_to_retry() {
        let response = V2Error::new(ErrorCode::QueueFull, "full").retry_after(7).into_response();
        assert_eq!(response.status(), 429);
        assert_eq!(response.headers()[header::RETRY_AFTER], "7");
    }
}
