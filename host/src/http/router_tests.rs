//! The router without a socket (`tower::ServiceExt::oneshot`): what every caller sees at the
//! edge — problem+json on typed routes, the v2 envelope under `/api/v2`, keys, limits — where
//! a real connection adds nothing. (Slow clients, stalled bodies and the real ComfyUI paths
//! stay in the end-to-end tests, over sockets.)

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use serde_json::Value;
use tower::ServiceExt;

use super::{AppState, HttpLimits, router};
use crate::auth::AccessKeys;
use crate::events::Analytics;
use crate::jobs::blobs::FsBlobStore;
use crate::jobs::store::SqliteStore;
use crate::jobs::{JobConfig, JobService};
use crate::metrics::Metrics;
use crate::plugins::engine::AllocatorChoice;
use crate::plugins::{PluginEngine, PluginLimits, PluginRegistry};

/// A state with no plugins, no ComfyUI, an SQLite store in `dir`, and `keys`.
async fn state(dir: &std::path::Path, keys: AccessKeys) -> AppState {
    let store = SqliteStore::open(&dir.join("jobs.db"))
        .await
        .expect("store");
    let blobs = FsBlobStore::new(dir.join("blobs")).expect("blobs");
    let analytics = Analytics::disabled();
    let jobs = JobService::new(
        Arc::new(store),
        Arc::new(blobs),
        None,
        JobConfig::default(),
        None,
        Metrics::new(analytics.clone()),
        analytics,
    );
    AppState {
        registry: Arc::new(PluginRegistry::new()),
        engine: PluginEngine::new(PluginLimits::default(), AllocatorChoice::OnDemand)
            .expect("engine"),
        call_slots: Arc::new(crate::plugins::call_slots::CallSlots::new(4, 16)),
        limits: HttpLimits {
            max_body_bytes: 1024,
            body_read_timeout: Duration::from_secs(5),
        },
        jobs,
        keys,
        started_at: Instant::now(),
        simulated: false,
        webhooks: None,
        warm_up: crate::warm_up::WarmUps::new(crate::warm_up::WarmUpMode::Off, &[]),
        transfers: super::v2::transfers::Transfers::new(4),
        streams: super::v2::events::StreamSlots::new(8, 2),
    }
}

async fn call(state: &AppState, request: Request<Body>) -> (StatusCode, Option<String>, Value) {
    let response = router(state.clone())
        .oneshot(request)
        .await
        .expect("infallible");
    let status = response.status();
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .expect("body");
    (
        status,
        content_type,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn get(uri: &str) -> Request<Body> {
    Request::get(uri).body(Body::empty()).expect("request")
}

#[tokio::test]
async fn an_unknown_typed_route_is_a_problem_naming_it_and_an_unknown_v2_job_an_envelope() {
    let dir = tempfile::tempdir().unwrap();
    let state = state(dir.path(), AccessKeys::parse(None, None).unwrap()).await;
    let post = Request::post("/no-such-route")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from("{}"))
        .unwrap();
    let (status, content_type, body) = call(&state, post).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(content_type.as_deref(), Some("application/problem+json"));
    assert!(
        body["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("/no-such-route"),
        "{body}"
    );

    let (status, content_type, body) = call(
        &state,
        get("/api/v2/jobs/00000000-0000-4000-8000-000000000000"),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(content_type.as_deref(), Some("application/json"));
    assert_eq!(
        body["error"]["code"], "not_found",
        "the v2 envelope, not problem+json: {body}"
    );
}

#[tokio::test]
async fn a_declared_body_over_the_limit_is_413_before_anything_is_read_on_both_protocols() {
    let dir = tempfile::tempdir().unwrap();
    let state = state(dir.path(), AccessKeys::parse(None, None).unwrap()).await;
    let typed = Request::post("/flux-dev")
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, "4096")
        .body(Body::from("{}"))
        .unwrap();
    let (status, content_type, _) = call(&state, typed).await;
    // No plugin serves /flux-dev here: the route is unknown before the body matters.
    assert_eq!(
        (status, content_type.as_deref()),
        (StatusCode::NOT_FOUND, Some("application/problem+json"))
    );

    let v2 = Request::post("/api/v2/jobs")
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, "4096")
        .body(Body::from("{}"))
        .unwrap();
    let (status, _, body) = call(&state, v2).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("1024"),
        "names the limit: {body}"
    );
}

#[tokio::test]
async fn with_keys_a_request_without_one_is_401_and_health_and_livez_stay_open() {
    let dir = tempfile::tempdir().unwrap();
    let state = state(
        dir.path(),
        AccessKeys::parse(
            Some("user-key-0123456789abcdef"),
            Some("admin-key-0123456789abcdef"),
        )
        .unwrap(),
    )
    .await;
    let (status, content_type, _) = call(&state, get("/api/v2/jobs")).await;
    assert_eq!(
        (status, content_type.as_deref()),
        (StatusCode::UNAUTHORIZED, Some("application/json"))
    );
    let (status, _, _) = call(&state, get("/plugins")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _, _) = call(&state, get("/livez")).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, body) = call(&state, get("/health")).await;
    // No ComfyUI: not ready, but it answers, and says where jobs live.
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["jobs"]["store"], "sqlite");
    assert_eq!(body["jobs"]["durability"], "instance");
}

#[tokio::test]
async fn a_wrong_method_is_a_problem_with_allow_and_an_oversized_target_is_414() {
    let dir = tempfile::tempdir().unwrap();
    let state = state(dir.path(), AccessKeys::parse(None, None).unwrap()).await;
    let response = router(state.clone())
        .oneshot(Request::post("/health").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert!(
        response.headers().get(header::ALLOW).is_some(),
        "Allow kept"
    );
    assert_eq!(
        response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok()),
        Some("application/problem+json")
    );
    let long = format!("/{}", "a".repeat(super::edge::MAX_URI_BYTES + 1));
    let (status, content_type, _) = call(&state, get(&long)).await;
    assert_eq!(
        (status, content_type.as_deref()),
        (StatusCode::URI_TOO_LONG, Some("application/problem+json"))
    );
}
