//! The Comfy API v2 view of a [`Job`]: field names and shapes of the v2 `Job`,
//! `Output`, `Progress` and `JobError` schemas, with host-relative links under
//! `/api/v2`. The typed routes' `202 Accepted` answers with it; the `/api/v2`
//! surface owns this file's final form.

use std::time::{Duration, SystemTime};

use serde_json::{Value, json};

use crate::jobs::{Asset, Job};
use crate::timestamp::rfc3339_utc;

/// How long an output or asset `url` is said to be valid (it is proxy-served, so
/// it stays valid while the asset exists; this is what clients plan around).
const URL_VALIDITY: Duration = Duration::from_secs(3600);

/// Host-relative link to a job.
pub fn job_url(id: &uuid::Uuid) -> String {
    format!("/api/v2/jobs/{id}")
}

/// The v2 `OutputType` of a media type.
pub fn output_type(content_type: &str) -> &'static str {
    match content_type.split('/').next().unwrap_or_default() {
        "image" => "image",
        "video" => "video",
        "audio" => "audio",
        "text" => "text",
        _ => "file",
    }
}

/// The v2 `Output` of an output asset.
pub fn output_json(asset: &Asset) -> Value {
    let url_expires = SystemTime::now() + URL_VALIDITY;
    json!({
        "node_id": asset.node_id.clone().unwrap_or_default(),
        "name": asset.name.clone().unwrap_or_default(),
        "type": output_type(&asset.content_type),
        "content_type": asset.content_type,
        "size_bytes": asset.size_bytes,
        "id": asset.id.to_string(),
        "hash": asset.hash,
        "url": format!("/api/v2/assets/{}/content", asset.id),
        "url_expires_at": rfc3339_utc(asset.expires_at.map_or(url_expires, |e| e.min(url_expires))),
        "job_id": asset.job_id.map(|j| j.to_string()),
    })
}

/// The v2 `Job` object.
pub fn job_json(job: &Job) -> Value {
    let base = job_url(&job.id);
    let error = job.error.as_ref().map(|e| {
        json!({
            "code": e.code(),
            "message": e.message(),
            "node_id": e.node_id(),
            "class_type": e.class_type(),
            "traceback": e.traceback(),
        })
    });
    json!({
        "id": job.id.to_string(),
        "status": job.status.as_str(),
        "created_at": rfc3339_utc(job.created_at),
        "started_at": job.started_at.map(rfc3339_utc),
        "completed_at": job.completed_at.map(rfc3339_utc),
        "expires_at": rfc3339_utc(job.expires_at),
        "queue_position": job.queue_position,
        "progress": job.progress.as_ref().map(|p| serde_json::to_value(p).unwrap_or(Value::Null)),
        "outputs": job.outputs.iter().map(output_json).collect::<Vec<_>>(),
        "error": error,
        "metrics": job.metrics.to_map(),
        "urls": {
            "self": base,
            "events": format!("{base}/events"),
            "cancel": format!("{base}/cancel"),
        },
    })
}
