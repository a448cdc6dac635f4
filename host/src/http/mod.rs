//! The HTTP surface: thin handlers over the plugin registry and the job runner.
//!
//! `POST /{route}` is the generation endpoint of whichever plugin serves that
//! route right now (the table changes while the service runs, so the route is
//! looked up per request, not baked into the router). Everything that fails
//! answers `application/problem+json` ([`problem`]).

pub mod access;
pub mod body;
pub mod body_shape;
pub mod edge;
pub mod generate;
pub mod health;
pub mod idempotency;
pub mod job_errors;
pub mod listener;
pub mod openapi;
pub mod page;
pub mod plugin_list;
pub mod problem;
#[cfg(test)]
mod router_tests;
pub mod v2;
pub mod webhook_headers;
pub mod webhooks_admin;

use std::sync::Arc;
use std::time::Instant;

use axum::{Router, middleware};
use axum::http::{HeaderName, Request};
use axum::routing::{get, post};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::LatencyUnit;
use tower_http::trace::{DefaultOnFailure, DefaultOnResponse, TraceLayer};

use crate::auth::AccessKeys;
use crate::metrics::Metrics;
use crate::plugins::{PluginEngine, PluginRegistry};
pub use problem::Problem;

/// Limits of the HTTP layer.
#[derive(Debug, Clone)]
pub struct HttpLimits {
    /// Largest request body accepted (413 beyond).
    pub max_body_bytes: usize,
    /// Longest a request body may take to arrive, from the handler's first read (408 beyond).
    pub body_read_timeout: std::time::Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self { max_body_bytes: 16 << 20, body_read_timeout: std::time::Duration::from_secs(30) }
    }
}

/// What handlers share. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub registry: Arc<PluginRegistry>,
    pub engine: PluginEngine,
    /// Bounds on concurrent plugin calls (503 when full).
    pub call_slots: Arc<crate::plugins::call_slots::CallSlots>,
    pub limits: HttpLimits,
    pub jobs: Arc<crate::jobs::JobService>,
    pub keys: AccessKeys,
    pub started_at: Instant,
    /// `--simulate`: ComfyUI is the embedded test double (said in `/health`
    /// and in an `X-Flowhost-Simulated` header on generation responses).
    pub simulated: bool,
    /// The webhook service (issue #14); `None` when the service runs without a job store.
    pub webhooks: Option<crate::webhooks::Webhooks>,
    /// Warm-up rounds (`warm_up.rs`): `/health` is not ready until the current one is done.
    pub warm_up: Arc<crate::warm_up::WarmUps>,
    /// Slots of concurrent asset transfers (`/api/v2/assets` uploads and downloads).
    pub transfers: v2::transfers::Transfers,
    /// Caps on concurrent `/api/v2/jobs/{id}/events` streams.
    pub streams: v2::events::StreamSlots,
}

/// The header marking responses produced by the simulated ComfyUI.
pub const SIMULATED: HeaderName = HeaderName::from_static("x-flowhost-simulated");

async fn mark_simulated(
    axum::extract::State(simulated): axum::extract::State<bool>,
    request: axum::extract::Request,
    next: middleware::Next,
) -> axum::response::Response {
    let mut response = next.run(request).await;
    if simulated {
        response.headers_mut().insert(SIMULATED, axum::http::HeaderValue::from_static("true"));
    }
    response
}

impl axum::extract::FromRef<AppState> for Metrics {
    fn from_ref(state: &AppState) -> Metrics {
        state.jobs.metrics.clone()
    }
}

/// The request id header, accepted from callers or generated.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Build the router: open routes (`/health`, `/livez`, `/openapi.json`), admin routes
/// (`/plugins`, `/metrics`: admin key when keys are configured) and the
/// generation routes (any key when keys are configured).
pub fn router(state: AppState) -> Router {
    let keys = state.keys.clone();
    let metrics = state.jobs.metrics.clone();
    let admin = Router::new()
        .route("/plugins", get(plugin_list::list_plugins))
        .route("/metrics", get(crate::metrics::serve_metrics))
        .route("/admin/webhooks/dead-letters", get(webhooks_admin::dead_letters))
        .route_layer(middleware::from_fn_with_state(keys.clone(), access::require_admin_key));
    let generation = Router::new()
        .route("/{route}", post(generate::generate).fallback(generate::other_method))
        .route_layer(middleware::from_fn_with_state(keys, access::require_api_key))
        .route_layer(middleware::from_fn_with_state(state.simulated, mark_simulated));
    let v2 = v2::router(state.keys.clone());
    Router::new()
        .route("/health", get(health::health))
        .route("/livez", get(health::livez))
        .nest("/api/v2", v2)
        .route("/openapi.json", get(openapi::openapi))
        .route("/", get(page::index).fallback(fallback))
        .route(page::SCRIPT_PATH, get(page::script))
        .route(page::STYLE_PATH, get(page::style))
        .merge(admin)
        .merge(generation)
        .fallback(fallback)
        .with_state(state.clone())
        .layer(middleware::from_fn(edge::guard))
        .layer(middleware::from_fn_with_state((metrics, state.registry.clone()), track_http_by_route))
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

/// The `route` label of plugin requests: the plugin's own route (`/flux-dev`)
/// when a loaded plugin serves it, else `other`, so the series stay bounded by
/// the number of loaded plugins. Every other request keeps its matched pattern.
pub const OTHER_PLUGIN_ROUTE: &str = "other";

async fn track_http_by_route(
    axum::extract::State((metrics, registry)): axum::extract::State<(Metrics, Arc<PluginRegistry>)>,
    request: axum::extract::Request,
    next: middleware::Next,
) -> axum::response::Response {
    use axum::extract::MatchedPath;
    let matched = request.extensions().get::<MatchedPath>().map(|m| m.as_str().to_owned());
    let label = match matched.as_deref() {
        Some("/{route}") => {
            let path = request.uri().path();
            if registry.lookup(path).is_some() { path.to_owned() } else { OTHER_PLUGIN_ROUTE.to_owned() }
        }
        Some(pattern) => pattern.to_owned(),
        None => crate::metrics::UNMATCHED_ROUTE.to_owned(),
    };
    let response = next.run(request).await;
    metrics.record_http(&label, response.status().as_u16());
    response
}

/// Paths no route matches: 404 whatever the method (there is nothing there to allow).
async fn fallback(uri: axum::http::Uri) -> Problem {
    Problem::not_found_route(uri.path())
}
