//! `GET /admin/webhooks/dead-letters`: the webhook messages flowhost gave up on, newest
//! first, for an operator (admin key when keys are configured).
//!
//! Owns only the listing's HTTP shape. Must never show a secret or a destination's query
//! string (the outbox strips it), and never read more than [`MAX_LIMIT`] rows.

use axum::Json;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::{AppState, Problem};

/// Most rows one listing returns.
pub const MAX_LIMIT: u32 = 500;
const DEFAULT_LIMIT: u32 = 100;

#[derive(Debug, Deserialize)]
pub struct ListQuery {
    limit: Option<u32>,
}

pub async fn dead_letters(State(state): State<AppState>, Query(query): Query<ListQuery>) -> Response {
    let Some(webhooks) = state.webhooks.as_ref() else {
        return Json(json!({"enabled": false, "dead_letters": []})).into_response();
    };
    let limit = query.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT);
    match webhooks.dead_letters(limit).await {
        Ok(letters) => Json(json!({"enabled": webhooks.enabled(), "dead_letters": letters})).into_response(),
        Err(error) => {
            tracing::error!(%error, "listing webhook dead letters failed");
            Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "store_unavailable", "The job store could not be read", "Listing dead letters failed; see the service log.").into_response()
        }
    }
}
