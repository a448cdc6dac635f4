//! `GET /health`: is the service ready, and which endpoints are (readiness:
//! 503 until ComfyUI answers with its websocket connected and the warm-up round
//! is done; a failed warm-up stays 503 with its reason). `GET /livez`: is this process alive (liveness:
//! always 200, touches nothing), so an orchestrator restarts a wedged process
//! but not one whose ComfyUI is merely restarting or loading models.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::AppState;

pub async fn health(State(state): State<AppState>) -> Response {
    let report = state.jobs.health(&state.registry.snapshot().plugins()).await;
    // Without its websocket a run waits on history polls: answering is not enough.
    let websocket = state.jobs.backend().map(|b| b.client().ws_state().borrow().connected);
    let warm_up = state.warm_up.report();
    // A bucket that cannot be reached fails every job's outputs: not ready, and said so.
    let blob_store = state.jobs.blobs().check().await;
    let (ready, status) = match (report.ready, websocket, warm_up.state) {
        (false, _, _) => (false, report.status),
        (true, _, _) if blob_store.is_err() => (false, "blob_store_unreachable"),
        (true, Some(false), _) => (false, "websocket_down"),
        (true, _, "failed") => (false, "warm_up_failed"),
        (true, _, _) if !warm_up.ready => (false, "warming_up"),
        (true, _, _) => (true, report.status),
    };
    let status_code = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let body = json!({
        "status": status,
        "ready": ready,
        "reason": warm_up.reason,
        "simulated": state.simulated,
        "uptime_s": state.started_at.elapsed().as_secs(),
        "comfyui": report.comfyui,
        "websocket": {"connected": websocket},
        "warm_up": warm_up,
        "endpoints": report.endpoints,
        "workers": report.workers,
        "plugins_loaded": state.registry.snapshot().plugins().len(),
        "jobs": describe_jobs(state.jobs.store().as_ref(), state.jobs.blobs().as_ref()),
        "blob_store": blob_store_json(state.jobs.blobs().kind(), &blob_store),
        "model_cache": state.jobs.model_cache().map(|cache| {
            let (used, files, cap) = cache.usage();
            json!({"used_bytes": used, "cap_bytes": cap, "files": files})
        }),
    });
    (status_code, Json(body)).into_response()
}

/// The blob store's readiness as `/health` and `/api/v2/health` say it: its kind and
/// whether it answers (the reason names no host, port or key).
pub(crate) fn blob_store_json(kind: &str, checked: &Result<(), crate::jobs::blobs::BlobError>) -> serde_json::Value {
    match checked {
        Ok(()) => json!({"kind": kind, "reachable": true}),
        Err(e) => json!({"kind": kind, "reachable": false, "reason": e.to_string()}),
    }
}

/// Liveness: 200 `ok` whenever the HTTP server can answer at all. Deliberately
/// asks nothing of ComfyUI, the plugins or the job queue: those are readiness.
pub async fn livez() -> Response {
    (StatusCode::OK, [(axum::http::header::CONTENT_TYPE, "text/plain; charset=utf-8")], "ok\n").into_response()
}

/// `/health`'s `jobs` object: where jobs and outputs live and whether they outlive
/// this instance (`durability`: `instance` — they end with this machine's disk, as on
/// a single Modal container — or `shared`).
fn describe_jobs(
    store: &dyn crate::jobs::store::JobStore,
    blobs: &dyn crate::jobs::blobs::BlobStore,
) -> serde_json::Value {
    let shared = store.dialect() == "postgres" && blobs.kind() == "s3";
    serde_json::json!({
        "durability": if shared { "shared" } else { "instance" },
        "store": store.dialect(),
        "blobs": blobs.kind(),
    })
}
