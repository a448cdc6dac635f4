//! The one mapping from flowhost's domain errors ([`JobFailure`], [`AssetError`]) to the v2
//! envelope: which code, which status, which details. Handlers call these and nothing else
//! decides a v2 error status.
//!
//! Must never copy internal detail (store errors, ComfyUI transport text) into a message:
//! those become `upstream_error` with the generic sentence, the cause logged.

use serde_json::json;

use super::envelope::{ErrorCode, V2Error};
use super::submission;
use crate::jobs::{AssetError, JobFailure};

/// A job-service failure as a v2 answer.
pub fn job_failure(failure: &JobFailure) -> V2Error {
    match failure {
        JobFailure::QueueFull { retry_after_s, depth } => {
            V2Error::new(ErrorCode::QueueFull, format!("The queue is full ({depth} jobs waiting); retry after the Retry-After seconds.")).retry_after(*retry_after_s)
        }
        JobFailure::ComfyStarting { retry_after_s } | JobFailure::ComfyUnavailable { retry_after_s, .. } => {
            if let JobFailure::ComfyUnavailable { detail, .. } = failure {
                tracing::warn!(detail, "v2 request refused: ComfyUI unavailable");
            }
            V2Error::new(ErrorCode::DeploymentNotReady, "ComfyUI is not ready to run jobs yet; retry after the Retry-After seconds.").retry_after(*retry_after_s)
        }
        JobFailure::InvalidWorkflow { issues, .. } | JobFailure::ModelMissing { issues } => submission::invalid_workflow(issues),
        other => V2Error::internal(other),
    }
}

/// Where an asset error happened, because the same domain error reads differently: a missing
/// blob is `blob_not_found` for `from-hash` but plain `not_found` for a record's content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AssetContext {
    /// `GET`/`DELETE /assets/{id}`, `/content`.
    Record,
    /// `POST /assets/from-hash`, `HEAD /assets/by-hash/{hash}`.
    ByHash,
    /// `POST /assets`.
    Upload,
}

/// What a caller is told to wait while the blob store is unreachable.
const BLOB_STORE_RETRY_AFTER_S: u64 = 5;

/// An asset-service failure as a v2 answer.
pub fn asset_error(error: &AssetError, context: AssetContext) -> V2Error {
    match (error, context) {
        (AssetError::NotFound, _) => V2Error::not_found("asset"),
        (AssetError::BlobNotFound(_) | AssetError::InvalidHash, AssetContext::ByHash) => V2Error::new(
            ErrorCode::BlobNotFound,
            "No stored content has this hash (hashes are written blake3:<64 lowercase hex>); upload the bytes instead.",
        ),
        (AssetError::BlobNotFound(_), _) => V2Error::not_found("asset content"),
        // The spec lists 409 `hash_mismatch` as the upload's answer to an `expected_hash`
        // that does not match; one that cannot match (malformed) is answered the same way.
        (AssetError::InvalidHash, _) => V2Error::new(
            ErrorCode::HashMismatch,
            "`expected_hash` is not a blake3 hash (blake3:<64 lowercase hex>), so the bytes cannot match it; nothing was stored.",
        )
        .with_details(json!({"field": "expected_hash", "reason": "malformed"})),
        (AssetError::HashMismatch { expected, actual }, _) => V2Error::new(
            ErrorCode::HashMismatch,
            format!("The uploaded bytes hash to {actual}, not the expected {expected}; nothing was stored."),
        )
        .with_details(json!({"expected_hash": expected, "actual_hash": actual})),
        (AssetError::RangeNotSatisfiable { size }, _) => {
            V2Error::invalid_request("Range", format!("not satisfiable for content of {size} bytes")).with_status(axum::http::StatusCode::RANGE_NOT_SATISFIABLE)
        }
        (AssetError::SourceFailed, _) => V2Error::invalid_request("file", "the upload broke off; send it again").with_status(axum::http::StatusCode::BAD_REQUEST),
        (AssetError::BlobStoreDown(detail), _) => {
            tracing::warn!(detail, "v2 asset request refused: the blob store is unreachable");
            V2Error::new(ErrorCode::UpstreamError, "The asset store cannot be reached right now; retry after the Retry-After seconds.")
                .with_status(axum::http::StatusCode::SERVICE_UNAVAILABLE)
                .retry_after(BLOB_STORE_RETRY_AFTER_S)
        }
        (AssetError::Unavailable(_), _) => V2Error::internal(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_full_is_429_with_the_services_estimate() {
        let error = job_failure(&JobFailure::QueueFull { retry_after_s: 12, depth: 5 });
        assert_eq!(error.status, 429);
        assert_eq!(error.code, ErrorCode::QueueFull);
        assert_eq!(error.retry_after, Some(12));
    }

    #[test]
    fn internal_failures_are_generic() {
        let error = job_failure(&JobFailure::Internal { detail: "disk /var/lib/flowhost full".into() });
        assert_eq!(error.code, ErrorCode::UpstreamError);
        assert!(!error.message.contains("/var/lib"));
    }

    #[test]
    fn a_missing_blob_reads_by_context() {
        let missing = AssetError::BlobNotFound("blake3:00".into());
        assert_eq!(asset_error(&missing, AssetContext::ByHash).code, ErrorCode::BlobNotFound);
        assert_eq!(asset_error(&missing, AssetContext::Record).code, ErrorCode::NotFound);
        let mismatch = AssetError::HashMismatch { expected: "blake3:aa".into(), actual: "blake3:bb".into() };
        assert_eq!(asset_error(&mismatch, AssetContext::Upload).status, 409);
        let malformed = asset_error(&AssetError::InvalidHash, AssetContext::Upload);
        assert_eq!(malformed.status, 409);
        assert_eq!(malformed.code, ErrorCode::HashMismatch);
    }
}
