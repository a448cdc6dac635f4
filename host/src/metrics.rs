//! Prometheus metrics (OpenMetrics text at `/metrics`): HTTP requests, job phase
//! durations, jobs in flight, ComfyUI restarts, plugin loads/rejections and analytics drops.
//!
//! Owns the metric families and their names/labels. Must never take a label value from
//! caller input (only matched routes, status codes, plugin names and fixed reasons), so
//! the number of series stays bounded, and never hold a lock across an await.
//!
//! | family                                          | type      | labels          |
//! |-------------------------------------------------|-----------|-----------------|
//! | `flowhost_http_requests_total`                  | counter   | `route, status` |
//! | `flowhost_plugin_build_duration_seconds`        | histogram | `route`         |
//! | `flowhost_queue_wait_duration_seconds`          | histogram | `route`         |
//! | `flowhost_comfyui_execution_duration_seconds`   | histogram | `route`         |
//! | `flowhost_output_encoding_duration_seconds`     | histogram | `route`         |
//! | `flowhost_request_duration_seconds`             | histogram | `route`         |
//! | `flowhost_jobs_in_flight`                       | gauge     |                 |
//! | `flowhost_queue_depth`                          | gauge     |                 |
//! | `flowhost_jobs_finished_total`                  | counter   | `route, status` |
//! | `flowhost_jobs_refused_total`                   | counter   | `reason`        |
//! | `flowhost_comfyui_restarts_total`               | counter   |                 |
//! | `flowhost_dispatch_wait_duration_seconds`       | histogram | `route`         |
//! | `flowhost_model_switches_total`                 | counter   | `worker`        |
//! | `flowhost_affinity_hits_total`                  | counter   | `worker`        |
//! | `flowhost_plugin_loads_total`                   | counter   | `plugin`        |
//! | `flowhost_plugin_rejections_total`              | counter   | `reason`        |
//!
//! `route` on `flowhost_http_requests_total` is the matched pattern (`/health`), a loaded
//! plugin's route (`/flux-dev`), `other` for a plugin-shaped path no plugin serves, or
//! `unmatched`. `reason` is one of `file`, `compile`, `contract`, `manifest`,
//! `route_conflict`, `duplicate_name` (`plugins::LoadErrorKind::label`).
//! | `flowhost_analytics_dropped_events_total`       | counter   |                 |
//! | `flowhost_webhook_deliveries_total`             | counter   | `outcome`       |
//! | `flowhost_webhook_pending`                      | gauge     |                 |
//! | `flowhost_webhook_dead_letters`                 | gauge     |                 |
//! | `flowhost_model_cache_hits_total`               | counter   |                 |
//! | `flowhost_model_cache_misses_total`             | counter   |                 |
//! | `flowhost_model_cache_fetched_bytes_total`      | counter   |                 |
//! | `flowhost_model_cache_evictions_total`          | counter   |                 |
//! | `flowhost_model_cache_used_bytes`               | gauge     |                 |
//! | `flowhost_model_cache_cap_bytes`                | gauge     |                 |
//! | `flowhost_fetch_refused_destinations_total`     | counter   |                 |

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::events::{Analytics, JobTimings};

/// `Content-Type` of [`Metrics::render`]'s text.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Route label of requests no route matched (never the raw path: unbounded).
pub const UNMATCHED_ROUTE: &str = "unmatched";

/// Bucket bounds (seconds) shared by every duration histogram: 5 ms to 10 min.
const DURATION_BUCKETS: [f64; 16] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    route: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    route: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PluginLabels {
    plugin: String,
}

/// `transport`: `raster` or `encoded`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransportLabels {
    transport: String,
}

/// `worker` is the pool index name (`w0`, `w1`, …): bounded, and no host or port.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkerLabels {
    worker: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

type DurationFamily = Family<RouteLabels, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

/// All metrics of the service. Cheap to clone (shared).
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    http_requests: Family<HttpLabels, Counter>,
    plugin_build: DurationFamily,
    queue_wait: DurationFamily,
    execution: DurationFamily,
    encoding: DurationFamily,
    request: DurationFamily,
    jobs_in_flight: Gauge,
    queue_depth: Gauge,
    jobs_finished: Family<OutcomeLabels, Counter>,
    jobs_refused: Family<ReasonLabels, Counter>,
    comfyui_restarts: Counter,
    plugin_loads: Family<PluginLabels, Counter>,
    plugin_rejections: Family<ReasonLabels, Counter>,
    webhooks: WebhookMetrics,
    dispatch_wait: DurationFamily,
    model_switches: Family<WorkerLabels, Counter>,
    affinity_hits: Family<WorkerLabels, Counter>,
    outputs: Family<TransportLabels, Counter>,
    model_cache: Arc<crate::models::cache::CacheStats>,
}

/// The webhook outbox's metrics (issue #14). `outcome` is one of a fixed set:
/// `delivered`, `failed` (an attempt failed), `refused` (destination refused by the SSRF
/// policy), `dead_lettered` (given up).
struct WebhookMetrics {
    deliveries: Family<WebhookOutcomeLabels, Counter>,
    pending: Gauge,
    dead_letters: Gauge,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WebhookOutcomeLabels {
    outcome: String,
}

impl WebhookMetrics {
    fn register(registry: &mut Registry) -> Self {
        let deliveries = Family::<WebhookOutcomeLabels, Counter>::default();
        registry.register(
            "webhook_deliveries",
            "Webhook delivery attempts by outcome (delivered, failed, refused), and messages given up on (dead_lettered)",
            deliveries.clone(),
        );
        let pending = Gauge::default();
        registry.register("webhook_pending", "Webhook messages waiting for delivery (in the outbox)", pending.clone());
        let dead_letters = Gauge::default();
        registry.register("webhook_dead_letters", "Webhook messages given up on and kept for inspection (GET /admin/webhooks/dead-letters)", dead_letters.clone());
        Self { deliveries, pending, dead_letters }
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// Reads the analytics drop count at scrape time.
#[derive(Debug)]
struct AnalyticsDrops(Analytics);

impl Collector for AnalyticsDrops {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counter = ConstCounter::new(self.0.dropped());
        let metric = encoder.encode_descriptor(
            "analytics_dropped_events",
            "Analytics events lost (buffer full, PostHog unreachable or refusing, after shutdown)",
            None,
            counter.metric_type(),
        )?;
        counter.encode(metric)
    }
}

/// Reads the model cache's counters at scrape time (`models::cache::CacheStats`).
#[derive(Debug)]
struct ModelCacheCollector(Arc<crate::models::cache::CacheStats>);

impl Collector for ModelCacheCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use prometheus_client::metrics::gauge::ConstGauge;
        use std::sync::atomic::Ordering::Relaxed;
        let stats = &self.0;
        for (name, help, value) in [
            ("model_cache_hits", "Model files named by reference that were already in the model cache", &stats.hits),
            ("model_cache_misses", "Downloads into the model cache (one per file, however many jobs waited for it)", &stats.misses),
            ("model_cache_fetched_bytes", "Bytes fetched into the model cache (complete, checked files)", &stats.bytes_fetched),
            ("model_cache_evictions", "Files evicted from the model cache to keep it under its cap", &stats.evictions),
            ("fetch_refused_destinations", "Fetches of models or images refused by the destination guard (the URL or a redirect)", &stats.refused),
        ] {
            let counter = ConstCounter::new(value.load(Relaxed));
            let metric = encoder.encode_descriptor(name, help, None, counter.metric_type())?;
            counter.encode(metric)?;
        }
        for (name, help, value) in [
            ("model_cache_used_bytes", "Bytes the model cache holds now", &stats.used_bytes),
            ("model_cache_cap_bytes", "The model cache's size cap (--model-cache-max-gb; 0: no cache)", &stats.cap_bytes),
        ] {
            let gauge = ConstGauge::new(i64::try_from(value.load(Relaxed)).unwrap_or(i64::MAX));
            let metric = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
            gauge.encode(metric)?;
        }
        Ok(())
    }
}

impl Metrics {
    /// The model cache's and the fetcher's counters, read at every scrape.
    pub fn model_cache_stats(&self) -> Arc<crate::models::cache::CacheStats> {
        self.inner.model_cache.clone()
    }

    /// Every family registered, reading analytics drops from `analytics`.
    pub fn new(analytics: Analytics) -> Self {
        let mut registry = Registry::with_prefix("flowhost");
        let http_requests = Family::<HttpLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests answered, by matched route and status code",
            http_requests.clone(),
        );
        let mut duration = |name: &str, help: &str| {
            let family = DurationFamily::new_with_constructor(duration_histogram);
            registry.register_with_unit(name, help, Unit::Seconds, family.clone());
            family
        };
        let plugin_build = duration(
            "plugin_build_duration",
            "Time in the plugin's `build` call, by route.",
        );
        let queue_wait = duration(
            "queue_wait_duration",
            "Time from handing a job to ComfyUI (uploads included) until it started executing, by route",
        );
        let execution = duration(
            "comfyui_execution_duration",
            "ComfyUI execution time, by route.",
        );
        let encoding = duration(
            "output_encoding_duration",
            "Time fetching and encoding outputs, by route.",
        );
        let request = duration(
            "request_duration",
            "Total time of generation requests, by route.",
        );
        let dispatch_wait = duration(
            "dispatch_wait_duration",
            "Time a job waited in flowhost's queue until a worker claimed it (every outcome), by route",
        );
        let jobs_in_flight = Gauge::default();
        registry.register(
            "jobs_in_flight",
            "Generation jobs running now",
            jobs_in_flight.clone(),
        );
        let queue_depth = Gauge::default();
        registry.register("queue_depth", "Jobs waiting in flowhost's queue for a slot", queue_depth.clone());
        let jobs_finished = Family::<OutcomeLabels, Counter>::default();
        registry.register("jobs_finished", "Jobs that reached a terminal status, by route and status", jobs_finished.clone());
        let jobs_refused = Family::<ReasonLabels, Counter>::default();
        registry.register("jobs_refused", "Jobs refused at admission, by reason", jobs_refused.clone());
        let comfyui_restarts = Counter::default();
        registry.register(
            "comfyui_restarts",
            "Times the supervisor restarted ComfyUI",
            comfyui_restarts.clone(),
        );
        let plugin_loads = Family::<PluginLabels, Counter>::default();
        registry.register(
            "plugin_loads",
            "Plugins loaded (or reloaded), by plugin",
            plugin_loads.clone(),
        );
        let plugin_rejections = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "plugin_rejections",
            "Plugin files refused at load time, by reason",
            plugin_rejections.clone(),
        );
        registry.register_collector(Box::new(AnalyticsDrops(analytics)));
        let model_cache = Arc::new(crate::models::cache::CacheStats::default());
        registry.register_collector(Box::new(ModelCacheCollector(model_cache.clone())));
        let webhooks = WebhookMetrics::register(&mut registry);
        let model_switches = Family::<WorkerLabels, Counter>::default();
        registry.register(
            "model_switches",
            "Jobs dispatched to a ComfyUI worker that had another model set loaded (a LoRA or model change), by worker",
            model_switches.clone(),
        );
        let outputs = Family::<TransportLabels, Counter>::default();
        registry.register(
            "outputs",
            "Outputs stored, by how they left ComfyUI: `raster` (raw pixels from flowhost's node, encoded here) or `encoded` (media ComfyUI encoded: SaveImage files, websocket images, videos)",
            outputs.clone(),
        );
        let affinity_hits = Family::<WorkerLabels, Counter>::default();
        registry.register(
            "affinity_hits",
            "Jobs dispatched to a ComfyUI worker that already had their model set loaded, by worker",
            affinity_hits.clone(),
        );
        Self {
            inner: Arc::new(Inner {
                registry,
                http_requests,
                plugin_build,
                queue_wait,
                execution,
                encoding,
                request,
                jobs_in_flight,
                queue_depth,
                jobs_finished,
                jobs_refused,
                comfyui_restarts,
                plugin_loads,
                plugin_rejections,
                webhooks,
                dispatch_wait,
                model_switches,
                affinity_hits,
                outputs,
                model_cache,
            }),
        }
    }

    /// Count one answered HTTP request. `route` must be a matched route pattern.
    pub fn record_http(&self, route: &str, status: u16) {
        self.inner
            .http_requests
            .get_or_create(&HttpLabels {
                route: route.to_owned(),
                status,
            })
            .inc();
    }

    /// Observe the phases of one generation job that ran.
    pub fn observe_job(&self, route: &str, timings: &JobTimings) {
        let labels = RouteLabels {
            route: route.to_owned(),
        };
        let inner = &self.inner;
        for (family, duration) in [
            (&inner.plugin_build, timings.plugin_build),
            (&inner.queue_wait, timings.queue_wait),
            (&inner.execution, timings.execution),
            (&inner.encoding, timings.encode),
            (&inner.request, timings.total),
        ] {
            if let Some(duration) = duration {
                family
                    .get_or_create(&labels)
                    .observe(duration.as_secs_f64());
            }
        }
    }

    /// Mark a job as running until the returned guard is dropped.
    pub fn job_started(&self) -> InFlightJob {
        self.inner.jobs_in_flight.inc();
        InFlightJob {
            gauge: self.inner.jobs_in_flight.clone(),
        }
    }

    /// A job went to `worker` (a pool name, `w0`…): a model switch or an affinity hit.
    pub fn worker_dispatch(&self, worker: &str, switch: bool) {
        let labels = WorkerLabels { worker: worker.to_owned() };
        let family = if switch { &self.inner.model_switches } else { &self.inner.affinity_hits };
        family.get_or_create(&labels).inc();
    }

    /// One output stored; `transport` is `raster` or `encoded` (see the family's help).
    pub fn output_stored(&self, transport: &'static str) {
        self.inner.outputs.get_or_create(&TransportLabels { transport: transport.to_owned() }).inc();
    }

    /// How long a job of `route` waited in the queue before a worker claimed it.
    pub fn observe_dispatch_wait(&self, route: &str, waited: std::time::Duration) {
        self.inner.dispatch_wait.get_or_create(&RouteLabels { route: route.to_owned() }).observe(waited.as_secs_f64());
    }

    /// The number of jobs waiting in the queue now.
    pub fn set_queue_depth(&self, depth: usize) {
        self.inner.queue_depth.set(depth as i64);
    }

    /// Count a job reaching a terminal `status` (`succeeded`, `failed`, `canceled`, `expired`).
    pub fn job_finished(&self, route: &str, status: &str) {
        self.inner.jobs_finished.get_or_create(&OutcomeLabels { route: route.to_owned(), status: status.to_owned() }).inc();
    }

    /// Count a job refused at admission; `reason` from a fixed set (`queue_full`).
    pub fn job_refused(&self, reason: &str) {
        self.inner.jobs_refused.get_or_create(&ReasonLabels { reason: reason.to_owned() }).inc();
    }

    /// Count a ComfyUI restart by the supervisor.
    pub fn comfyui_restarted(&self) {
        self.inner.comfyui_restarts.inc();
    }

    /// Count a plugin (re)load.
    pub fn plugin_loaded(&self, plugin: &str) {
        self.inner
            .plugin_loads
            .get_or_create(&PluginLabels {
                plugin: plugin.to_owned(),
            })
            .inc();
    }

    /// Count a plugin file refused at load time. `reason` must come from a small fixed
    /// set (`LoadErrorKind::label`: `file`, `compile`, `contract`, `manifest`, `route_conflict`, ...).
    pub fn plugin_rejected(&self, reason: &str) {
        self.inner
            .plugin_rejections
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// Count one webhook attempt's outcome (`delivered`, `failed`, `refused`) or a message
    /// given up on (`dead_lettered`).
    pub fn webhook_delivery(&self, outcome: &'static str) {
        self.inner.webhooks.deliveries.get_or_create(&WebhookOutcomeLabels { outcome: outcome.to_owned() }).inc();
    }

    /// The outbox's current sizes.
    pub fn webhook_outbox(&self, pending: u64, dead_letters: u64) {
        self.inner.webhooks.pending.set(i64::try_from(pending).unwrap_or(i64::MAX));
        self.inner.webhooks.dead_letters.set(i64::try_from(dead_letters).unwrap_or(i64::MAX));
    }

    /// The OpenMetrics text exposition (ends with `# EOF`).
    pub fn render(&self) -> String {
        let mut text = String::new();
        if let Err(error) =
            prometheus_client::encoding::text::encode(&mut text, &self.inner.registry)
        {
            // Writing into a String cannot fail; a failing metric encoder is a bug.
            tracing::error!(%error, "encoding metrics failed");
        }
        text
    }

    /// The `/metrics` response: [`Metrics::render`] with the OpenMetrics content type.
    pub fn response(&self) -> Response {
        (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static(OPENMETRICS_CONTENT_TYPE),
            )],
            self.render(),
        )
            .into_response()
    }
}

/// Counts a running job in `flowhost_jobs_in_flight` while alive.
#[derive(Debug)]
pub struct InFlightJob {
    gauge: Gauge,
}

impl Drop for InFlightJob {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// Handler for `GET /metrics` (`.route("/metrics", get(metrics::serve_metrics))` with
/// `Metrics` reachable through `FromRef` from the router state).
pub async fn serve_metrics(State(metrics): State<Metrics>) -> Response {
    metrics.response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn line_value(text: &str, line_start: &str) -> Option<String> {
        text.lines()
            .find(|line| line.starts_with(line_start))
            .and_then(|line| line.rsplit(' ').next())
            .map(str::to_owned)
    }

    #[test]
    fn recorded_values_appear_with_their_labels() {
        let metrics = Metrics::new(Analytics::disabled());
        metrics.record_http("/flux-dev", 200);
        metrics.record_http("/flux-dev", 200);
        metrics.record_http("/flux-dev", 503);
        metrics.observe_job(
            "/flux-dev",
            &JobTimings {
                plugin_build: Some(Duration::from_millis(4)),
                execution: Some(Duration::from_secs(8)),
                total: Some(Duration::from_secs(9)),
                ..Default::default()
            },
        );
        metrics.comfyui_restarted();
        metrics.plugin_loaded("flux-dev");
        metrics.plugin_rejected(crate::plugins::loader::LoadErrorKind::Contract.label());
        let text = metrics.render();
        assert_eq!(
            line_value(
                &text,
                "flowhost_http_requests_total{route=\"/flux-dev\",status=\"200\"}"
            ),
            Some("2".into()),
            "{text}"
        );
        assert_eq!(
            line_value(
                &text,
                "flowhost_http_requests_total{route=\"/flux-dev\",status=\"503\"}"
            ),
            Some("1".into())
        );
        assert_eq!(
            line_value(
                &text,
                "flowhost_comfyui_execution_duration_seconds_count{route=\"/flux-dev\"}"
            ),
            Some("1".into()),
            "{text}"
        );
        assert_eq!(
            line_value(
                &text,
                "flowhost_comfyui_execution_duration_seconds_bucket{le=\"5.0\",route=\"/flux-dev\"}"
            ),
            Some("0".into()),
            "{text}"
        );
        assert_eq!(
            line_value(
                &text,
                "flowhost_comfyui_execution_duration_seconds_bucket{le=\"10.0\",route=\"/flux-dev\"}"
            ),
            Some("1".into())
        );
        assert!(
            text.contains("flowhost_plugin_build_duration_seconds_count{route=\"/flux-dev\"} 1"),
            "{text}"
        );
        assert!(text.contains("flowhost_request_duration_seconds_count{route=\"/flux-dev\"} 1"));
        assert!(
            !text.contains("flowhost_queue_wait_duration_seconds_count{"),
            "a phase that did not run is not observed"
        );
        assert!(text.contains("flowhost_comfyui_restarts_total 1"));
        assert!(text.contains("flowhost_plugin_loads_total{plugin=\"flux-dev\"} 1"));
        assert!(
            text.contains("flowhost_plugin_rejections_total{reason=\"contract\"} 1")
        );
        assert!(
            text.contains("flowhost_analytics_dropped_events_total 0"),
            "{text}"
        );
        assert!(text.trim_end().ends_with("# EOF"));
    }

    #[test]
    fn queue_depth_outcomes_and_refusals_are_exposed() {
        let metrics = Metrics::new(Analytics::disabled());
        metrics.set_queue_depth(3);
        metrics.job_finished("/flux-dev", "succeeded");
        metrics.job_finished("/flux-dev", "succeeded");
        metrics.job_finished("/flux-dev", "canceled");
        metrics.job_refused("queue_full");
        let text = metrics.render();
        assert!(text.contains("flowhost_queue_depth 3"), "{text}");
        assert_eq!(line_value(&text, "flowhost_jobs_finished_total{route=\"/flux-dev\",status=\"succeeded\"}"), Some("2".into()), "{text}");
        assert_eq!(line_value(&text, "flowhost_jobs_finished_total{route=\"/flux-dev\",status=\"canceled\"}"), Some("1".into()));
        assert!(text.contains("flowhost_jobs_refused_total{reason=\"queue_full\"} 1"), "{text}");
        metrics.set_queue_depth(0);
        assert!(metrics.render().contains("flowhost_queue_depth 0"));
    }

    #[test]
    fn the_in_flight_gauge_follows_running_jobs() {
        let metrics = Metrics::new(Analytics::disabled());
        let first = metrics.job_started();
        let second = metrics.job_started();
        assert!(metrics.render().contains("flowhost_jobs_in_flight 2"));
        drop(first);
        assert!(metrics.render().contains("flowhost_jobs_in_flight 1"));
        drop(second);
        assert!(metrics.render().contains("flowhost_jobs_in_flight 0"));
    }
}
