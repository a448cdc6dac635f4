//! `GET /health`: is the service ready, and which endpoints are.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::AppState;

pub async fn health(State(state): State<AppState>) -> Response {
    let report = state.jobs.health(&state.registry.snapshot().plugins()).await;
    let status = if report.ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let body = json!({
        "status": report.status,
        "simulated": state.simulated,
        "uptime_s": state.started_at.elapsed().as_secs(),
        "comfyui": report.comfyui,
        "endpoints": report.endpoints,
        "plugins_loaded": state.registry.snapshot().plugins().len(),
    });
    (status, Json(body)).into_response()
}
