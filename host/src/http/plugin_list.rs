//! `GET /plugins`: every plugin file, loaded or rejected (with the reason).

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use super::AppState;

pub async fn list_plugins(State(state): State<AppState>) -> Json<Value> {
    let set = state.registry.snapshot();
    Json(json!({
        "plugins": set.statuses(),
        "allocator": state.engine.allocator(),
    }))
}
