//! The HTTP surface: thin handlers over the plugin registry and the job runner.
//!
//! `POST /{route}` is the generation endpoint of whichever plugin serves that
//! route right now (the table changes while the service runs, so the route is
//! looked up per request, not baked into the router). Everything that fails
//! answers `application/problem+json` ([`problem`]).

pub mod generate;
pub mod health;
pub mod job_errors;
pub mod job_view;
pub mod openapi;
pub mod plugin_list;
pub mod problem;
pub mod request_schema;
pub mod webhook_headers;
pub mod webhooks_admin;

use std::sync::Arc;
use std::time::Instant;

use axum::{Router, middleware};
use axum::http::{HeaderName, Request, StatusCode};
use axum::routing::{get, post};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::LatencyUnit;
use tower_http::trace::{DefaultOnFailure, DefaultOnResponse, TraceLayer};

use crate::auth::{self, AccessKeys};
use crate::metrics::Metrics;
use crate::plugins::{PluginEngine, PluginRegistry};
pub use problem::Problem;

/// Limits of the HTTP layer.
#[derive(Debug, Clone)]
pub struct HttpLimits {
    /// Largest request body accepted (413 beyond).
    pub max_body_bytes: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self { max_body_bytes: 16 << 20 }
    }
}

/// What handlers share. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub registry: Arc<PluginRegistry>,
    pub engine: PluginEngine,
    pub limits: HttpLimits,
    pub jobs: Arc<crate::jobs::JobService>,
    pub keys: AccessKeys,
    pub started_at: Instant,
    /// The webhook service (issue #14); `None` when the service runs without a job store.
    pub webhooks: Option<crate::webhooks::Webhooks>,
}

impl axum::extract::FromRef<AppState> for Metrics {
    fn from_ref(state: &AppState) -> Metrics {
        state.jobs.metrics.clone()
    }
}

/// The request id header, accepted from callers or generated.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Build the router: open routes (`/health`, `/openapi.json`), admin routes
/// (`/plugins`, `/metrics`: admin key when keys are configured) and the
/// generation routes (any key when keys are configured).
pub fn router(state: AppState) -> Router {
    let keys = state.keys.clone();
    let metrics = state.jobs.metrics.clone();
    let admin = Router::new()
        .route("/plugins", get(plugin_list::list_plugins))
        .route("/metrics", get(crate::metrics::serve_metrics))
        .route("/admin/webhooks/dead-letters", get(webhooks_admin::dead_letters))
        .route_layer(middleware::from_fn_with_state(keys.clone(), auth::require_admin_key));
    let generation = Router::new()
        .route("/{route}", post(generate::generate))
        .route_layer(middleware::from_fn_with_state(keys, auth::require_api_key));
    Router::new()
        .route("/health", get(health::health))
        .route("/openapi.json", get(openapi::openapi))
        .merge(admin)
        .merge(generation)
        .fallback(fallback)
        .with_state(state)
        .layer(middleware::from_fn_with_state(metrics, crate::metrics::track_http))
        .layer(
            // One span per request carrying its id (so every log line inside it has
            // the id), and one INFO line per response with status and latency.
            TraceLayer::new_for_http()
                .make_span_with(|request: &Request<_>| {
                    let request_id = request.headers().get(&REQUEST_ID).and_then(|v| v.to_str().ok()).unwrap_or("-");
                    tracing::info_span!("http", method = %request.method(), path = %request.uri().path(), request_id = %request_id)
                })
                .on_request(())
                .on_response(DefaultOnResponse::new().level(tracing::Level::INFO).latency_unit(LatencyUnit::Micros))
                // 5xx answers are already in the response line with their status;
                // a health poller during a ComfyUI outage must not flood ERROR.
                .on_failure(DefaultOnFailure::new().level(tracing::Level::DEBUG)),
        )
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
}

async fn fallback(uri: axum::http::Uri, method: axum::http::Method) -> Problem {
    if method != axum::http::Method::POST && method != axum::http::Method::GET {
        return Problem::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "Method not allowed",
            format!("{method} is not supported here; generation endpoints take POST"),
        );
    }
    Problem::not_found_route(uri.path())
}
