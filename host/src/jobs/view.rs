//! The Comfy API v2 view of flowhost's domain objects: `Job`, `Output`, `Asset`, `Progress`,
//! `JobError` exactly as the vendored spec's schemas say (every required member present,
//! `null` where the spec says nullable, RFC 3339 UTC times, embedded links).
//!
//! Owns the field mapping only; it lives with the jobs because the API's responses, its
//! event stream and the webhook messages all carry this one document. Where the API is
//! mounted and who asks come in as plain data ([`Links`]). Must never read a store or the
//! clock (links' expiry is the record's own retention), and never show what the spec does
//! not carry (the executed workflow, the plugin's internals, the ComfyUI prompt id).

use std::time::SystemTime;

use serde_json::{Map, Value, json};

use super::{Asset, Job, JobFailure, JobStatus, Progress};
use crate::timestamp::rfc3339_utc;

/// Where a document's links point: `origin` (`scheme://host`, or empty for host-relative
/// links) and `prefix`, the path the v2 API is mounted at. Content links are absolute when
/// an origin is known; job links are always host-relative (as the contract's examples).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Links {
    pub origin: String,
    pub prefix: String,
}

impl Links {
    /// Host-relative links under `prefix` (a webhook message has no caller to ask).
    pub fn relative(prefix: &str) -> Links {
        Links {
            origin: String::new(),
            prefix: prefix.to_string(),
        }
    }

    /// An asset's content link.
    pub fn content_url(&self, asset_id: &uuid::Uuid) -> String {
        format!("{}{}/assets/{asset_id}/content", self.origin, self.prefix)
    }

    /// A job's host-relative link.
    pub fn job_url(&self, id: &uuid::Uuid) -> String {
        format!("{}/jobs/{id}", self.prefix)
    }
}

fn time(t: SystemTime) -> Value {
    Value::String(rfc3339_utc(t))
}

fn opt_time(t: Option<SystemTime>) -> Value {
    t.map(time).unwrap_or(Value::Null)
}

/// The spec's normalized output kind from a media type (nothing silently dropped: anything
/// unrecognised is a `file`).
pub fn output_type(content_type: &str, name: Option<&str>) -> &'static str {
    let media = content_type.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    if name.is_some_and(|n| n.ends_with(".latent")) {
        return "latent";
    }
    match media.split('/').next().unwrap_or_default() {
        "image" => "image",
        "video" => "video",
        "audio" => "audio",
        "text" => "text",
        _ if media == "application/json" => "text",
        _ => "file",
    }
}

/// When an asset's link stops working: when the asset itself expires (the content endpoint
/// is not signed; it serves as long as the record exists). A non-expiring asset's link is
/// given the job's (or the creation time's) horizon so the required field is a real time.
fn url_expiry(asset: &Asset, fallback: SystemTime) -> SystemTime {
    asset.expires_at.unwrap_or(fallback)
}

/// One `Output` (an output asset of a job).
pub fn output_json(asset: &Asset, job: &Job, origin: &Links) -> Value {
    json!({
        "node_id": asset.node_id.clone().unwrap_or_default(),
        "name": asset.name.clone().unwrap_or_else(|| format!("{}", asset.id)),
        "type": output_type(&asset.content_type, asset.name.as_deref()),
        "content_type": asset.content_type,
        "size_bytes": asset.size_bytes,
        "id": asset.id.to_string(),
        "hash": asset.hash,
        "url": origin.content_url(&asset.id),
        "url_expires_at": time(url_expiry(asset, job.expires_at)),
        "job_id": job.id.to_string(),
    })
}

/// One `Asset`. `created_new` only on create responses (`Some`).
pub fn asset_json(asset: &Asset, origin: &Links, created_new: Option<bool>) -> Value {
    let mut body = json!({
        "id": asset.id.to_string(),
        "hash": asset.hash,
        "size_bytes": asset.size_bytes,
        "content_type": asset.content_type,
        "file_path": asset.name,
        "created_at": time(asset.created_at),
        "url": origin.content_url(&asset.id),
        "url_expires_at": time(url_expiry(asset, asset.created_at + std::time::Duration::from_secs(24 * 3600))),
        "expires_at": opt_time(asset.expires_at),
        "job_id": asset.job_id.map(|id| id.to_string()),
    });
    if let (Some(created_new), Value::Object(map)) = (created_new, &mut body) {
        map.insert("created_new".into(), Value::Bool(created_new));
    }
    body
}

/// One `Progress` snapshot (`value` clamped into 0..=1 as the schema demands).
pub fn progress_json(progress: &Progress) -> Value {
    let value = if progress.value.is_finite() { progress.value.clamp(0.0, 1.0) } else { 0.0 };
    json!({
        "value": value,
        "nodes_done": progress.nodes_done,
        "nodes_total": progress.nodes_total,
        "current_node": progress.current_node,
        "current_node_class": progress.current_node_class,
        "step": progress.step,
        "steps": progress.steps,
        "message": progress.message,
    })
}

/// The job's follow-up links (host-relative).
pub fn job_urls(job: &Job, links: &Links) -> Value {
    let base = links.job_url(&job.id);
    json!({"self": base, "events": format!("{base}/events"), "cancel": format!("{base}/cancel")})
}

/// The SSE `status` payload.
pub fn status_event_json(job: &Job) -> Value {
    json!({"status": job.status.as_str(), "queue_position": queue_position(job)})
}

fn queue_position(job: &Job) -> Value {
    match job.status {
        JobStatus::Queued => job.queue_position.map(Value::from).unwrap_or(Value::Null),
        _ => Value::Null,
    }
}

/// A `JobError`. Internal failures say only that they happened (the cause is in the log).
pub fn job_error_json(failure: &JobFailure) -> Value {
    let message = match failure {
        JobFailure::Internal { .. } => "The job failed because of an internal error in flowhost.".to_string(),
        other => other.message(),
    };
    json!({
        "code": failure.code(),
        "message": message,
        "node_id": failure.node_id(),
        "class_type": failure.class_type(),
        "traceback": failure.traceback(),
    })
}

/// The full v2 `Job`, content links absolute against the caller's origin when known.
pub fn job_json(job: &Job, origin: &Links) -> Value {
    let metrics: Map<String, Value> = job
        .metrics
        .to_map()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.map(Value::from).unwrap_or(Value::Null)))
        .collect();
    let error = job.error.as_ref().map(job_error_json);
    let mut body = json!({
        "id": job.id.to_string(),
        "status": job.status.as_str(),
        "created_at": time(job.created_at),
        "started_at": opt_time(job.started_at),
        "completed_at": opt_time(job.completed_at),
        "expires_at": time(job.expires_at),
        "queue_position": queue_position(job),
        "progress": job.progress.as_ref().map(progress_json),
        "outputs": job.outputs.iter().map(|asset| output_json(asset, job, origin)).collect::<Vec<_>>(),
        "error": error,
        "metrics": metrics,
        "urls": job_urls(job, origin),
    });
    // flowhost's label extension: present only on jobs that carry labels, so a job
    // without them is exactly the contract's Job.
    if !job.spec.labels.is_empty() {
        body["metadata"] = json!(job.spec.labels);
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_types_map_to_the_spec_kinds() {
        assert_eq!(output_type("image/png", Some("a.png")), "image");
        assert_eq!(output_type("video/mp4", None), "video");
        assert_eq!(output_type("audio/flac", None), "audio");
        assert_eq!(output_type("application/octet-stream", Some("x.latent")), "latent");
        assert_eq!(output_type("application/zip", None), "file");
    }
}
