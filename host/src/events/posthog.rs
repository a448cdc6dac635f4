//! Delivery of analytics events to PostHog's batch capture API
//! (`POST {host}/batch/`, body `{"api_key", "batch": [{"event", "properties": {"distinct_id", ..}, "timestamp", "uuid"}]}`).
//!
//! Owns the bounded event buffer and the one background task that empties it. Must never
//! block the caller of [`Analytics::emit`], never fail a request, and never log the key.
//!
//! - The buffer holds at most `buffer_capacity` events; when full, the *oldest* event is
//!   dropped and counted ([`Analytics::dropped`]).
//! - The task sends when `batch_size` events are waiting or every `flush_interval`.
//! - A batch answered with a network error, 429 or 5xx is retried with exponential
//!   backoff (`initial_backoff` doubling up to `max_backoff`, `max_attempts` in all);
//!   the same `uuid`s are resent, so PostHog deduplicates a batch it did take. Other 4xx
//!   answers (bad key, bad payload) are not retried. Events given up on are counted as dropped.
//! - [`Analytics::shutdown`] sends what is buffered (bounded by `shutdown_timeout`);
//!   events emitted afterwards are dropped and counted.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::Event;
use crate::timestamp::rfc3339_utc;

/// PostHog's US cloud ingestion host.
pub const DEFAULT_POSTHOG_HOST: &str = "https://us.i.posthog.com";

/// How analytics are delivered. `api_key: None` (or empty) turns analytics off.
#[derive(Clone)]
pub struct AnalyticsConfig {
    /// PostHog project API key (`phc_...`), from `POSTHOG_API_KEY`.
    pub api_key: Option<String>,
    /// From `POSTHOG_HOST`; default [`DEFAULT_POSTHOG_HOST`].
    pub host: String,
    pub buffer_capacity: usize,
    pub batch_size: usize,
    pub flush_interval: Duration,
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub request_timeout: Duration,
    pub shutdown_timeout: Duration,
}

impl Default for AnalyticsConfig {
    fn default() -> Self {
        Self {
            api_key: None,
            host: DEFAULT_POSTHOG_HOST.to_owned(),
            buffer_capacity: 10_000,
            batch_size: 100,
            flush_interval: Duration::from_secs(2),
            max_attempts: 6,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            request_timeout: Duration::from_secs(10),
            shutdown_timeout: Duration::from_secs(10),
        }
    }
}

impl std::fmt::Debug for AnalyticsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnalyticsConfig")
            .field("api_key", &self.api_key.as_ref().map(|_| "<set>"))
            .field("host", &self.host)
            .field("buffer_capacity", &self.buffer_capacity)
            .field("batch_size", &self.batch_size)
            .field("flush_interval", &self.flush_interval)
            .field("max_attempts", &self.max_attempts)
            .finish_non_exhaustive()
    }
}

impl AnalyticsConfig {
    /// `POSTHOG_API_KEY` and `POSTHOG_HOST` (blank = unset), defaults for the rest.
    pub fn from_env() -> Self {
        let non_blank = |name: &str| {
            std::env::var(name)
                .ok()
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        Self {
            api_key: non_blank("POSTHOG_API_KEY"),
            host: non_blank("POSTHOG_HOST").unwrap_or_else(|| DEFAULT_POSTHOG_HOST.to_owned()),
            ..Self::default()
        }
    }
}

/// The analytics sink. Clones share one buffer and one background task.
#[derive(Clone)]
pub struct Analytics {
    shared: Option<Arc<Shared>>,
}

impl std::fmt::Debug for Analytics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Analytics")
            .field("enabled", &self.is_enabled())
            .field("dropped", &self.dropped())
            .finish()
    }
}

struct Shared {
    config: AnalyticsConfig,
    queue: Mutex<Queue>,
    dropped: AtomicU64,
    /// Events taken by the task and not yet delivered or given up on.
    in_flight: AtomicU64,
    wake: Notify,
    worker: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Default)]
struct Queue {
    events: VecDeque<Event>,
    closed: bool,
}

impl Analytics {
    /// Analytics configured from the environment (see [`AnalyticsConfig::from_env`]).
    pub fn from_env() -> Self {
        Self::new(AnalyticsConfig::from_env())
    }

    /// A sink that does nothing.
    pub fn disabled() -> Self {
        Self { shared: None }
    }

    /// Start delivering to PostHog (spawns the background task on the current tokio
    /// runtime). Without an API key, or outside a runtime, analytics are off.
    pub fn new(config: AnalyticsConfig) -> Self {
        if config
            .api_key
            .as_deref()
            .is_none_or(|key| key.trim().is_empty())
        {
            tracing::info!("analytics off: POSTHOG_API_KEY is not set");
            return Self::disabled();
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!("analytics off: not started inside a tokio runtime");
            return Self::disabled();
        };
        let client = match reqwest::Client::builder()
            .timeout(config.request_timeout)
            .user_agent(concat!("flowhost/", env!("CARGO_PKG_VERSION")))
            .build()
        {
            Ok(client) => client,
            Err(error) => {
                tracing::warn!(%error, "analytics off: cannot build an HTTP client");
                return Self::disabled();
            }
        };
        let url = format!("{}/batch/", config.host.trim_end_matches('/'));
        tracing::info!(%url, batch_size = config.batch_size, "analytics on: sending events to PostHog");
        let shared = Arc::new(Shared {
            config: AnalyticsConfig {
                buffer_capacity: config.buffer_capacity.max(1),
                batch_size: config.batch_size.max(1),
                max_attempts: config.max_attempts.max(1),
                ..config
            },
            queue: Mutex::new(Queue::default()),
            dropped: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            wake: Notify::new(),
            worker: Mutex::new(None),
        });
        let worker = runtime.spawn(run_worker(Arc::clone(&shared), client, url));
        *lock(&shared.worker) = Some(worker);
        Self {
            shared: Some(shared),
        }
    }

    /// Whether events are sent anywhere.
    pub fn is_enabled(&self) -> bool {
        self.shared.is_some()
    }

    /// Queue an event. Never blocks on the network and never fails; when the buffer is
    /// full the oldest event is dropped.
    pub fn emit(&self, event: Event) {
        let Some(shared) = &self.shared else {
            return;
        };
        let wake = {
            let mut queue = lock(&shared.queue);
            if queue.closed {
                shared.dropped.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(event = %event.name, "analytics already shut down; event dropped");
                return;
            }
            if queue.events.len() >= shared.config.buffer_capacity {
                queue.events.pop_front();
                shared.dropped.fetch_add(1, Ordering::Relaxed);
            }
            queue.events.push_back(event);
            queue.events.len() >= shared.config.batch_size
        };
        if wake {
            shared.wake.notify_one();
        }
    }

    /// Send everything buffered, then stop the background task. Waits at most the
    /// configured `shutdown_timeout`; what could not be sent by then is counted as dropped.
    pub async fn shutdown(&self) {
        let Some(shared) = &self.shared else {
            return;
        };
        lock(&shared.queue).closed = true;
        shared.wake.notify_one();
        let worker = lock(&shared.worker).take();
        if let Some(mut worker) = worker
            && tokio::time::timeout(shared.config.shutdown_timeout, &mut worker)
                .await
                .is_err()
        {
            worker.abort();
            let lost = shared.in_flight.swap(0, Ordering::Relaxed);
            shared.dropped.fetch_add(lost, Ordering::Relaxed);
            tracing::warn!(
                timeout = ?shared.config.shutdown_timeout,
                "analytics shutdown timed out; unsent events dropped"
            );
        }
        let left = std::mem::take(&mut lock(&shared.queue).events).len() as u64;
        shared.dropped.fetch_add(left, Ordering::Relaxed);
        tracing::info!(
            dropped_total = shared.dropped.load(Ordering::Relaxed),
            "analytics flushed and stopped"
        );
    }

    /// Events lost so far: buffer overflow, batches given up on, emitted after shutdown.
    pub fn dropped(&self) -> u64 {
        self.shared
            .as_ref()
            .map_or(0, |shared| shared.dropped.load(Ordering::Relaxed))
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves the data consistent, so a poisoned lock is usable.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn run_worker(shared: Arc<Shared>, client: reqwest::Client, url: String) {
    loop {
        let (batch, closed) = {
            let mut queue = lock(&shared.queue);
            let take = queue.events.len().min(shared.config.batch_size);
            let batch: Vec<Event> = queue.events.drain(..take).collect();
            shared
                .in_flight
                .store(batch.len() as u64, Ordering::Relaxed);
            (batch, queue.closed)
        };
        if batch.is_empty() {
            if closed {
                return;
            }
            tokio::select! {
                () = shared.wake.notified() => {}
                () = tokio::time::sleep(shared.config.flush_interval) => {}
            }
            continue;
        }
        deliver(&shared, &client, &url, &batch).await;
        shared.in_flight.store(0, Ordering::Relaxed);
    }
}

/// Send one batch, retrying transient failures; count it as dropped when giving up.
async fn deliver(shared: &Shared, client: &reqwest::Client, url: &str, batch: &[Event]) {
    let config = &shared.config;
    let body = batch_body(config.api_key.as_deref().unwrap_or_default(), batch);
    let count = batch.len() as u64;
    let mut backoff = config.initial_backoff;
    for attempt in 1..=config.max_attempts {
        let outcome = client
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.clone())
            .send()
            .await;
        match outcome {
            Ok(response) if response.status().is_success() => {
                tracing::debug!(events = count, attempt, "analytics batch delivered");
                return;
            }
            Ok(response)
                if response.status().as_u16() == 429 || response.status().is_server_error() =>
            {
                tracing::debug!(status = %response.status(), attempt, "PostHog busy; will retry the batch");
            }
            Ok(response) => {
                let status = response.status();
                let text = response.text().await.unwrap_or_default();
                let excerpt: String = text.chars().take(200).collect();
                tracing::warn!(%status, answer = %excerpt, events = count, "PostHog refused an analytics batch; dropped");
                shared.dropped.fetch_add(count, Ordering::Relaxed);
                return;
            }
            Err(error) => {
                tracing::debug!(%error, attempt, "cannot reach PostHog; will retry the batch");
            }
        }
        if attempt < config.max_attempts {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(config.max_backoff);
        }
    }
    tracing::warn!(
        events = count,
        attempts = config.max_attempts,
        "giving up on an analytics batch; dropped"
    );
    shared.dropped.fetch_add(count, Ordering::Relaxed);
}

/// The JSON body of `POST /batch/`.
fn batch_body(api_key: &str, batch: &[Event]) -> Bytes {
    let events: Vec<Value> = batch
        .iter()
        .map(|event| {
            let mut properties = event.properties.clone();
            properties.insert("distinct_id".into(), event.distinct_id.clone().into());
            properties.insert("$lib".into(), "flowhost".into());
            properties.insert("$lib_version".into(), env!("CARGO_PKG_VERSION").into());
            json!({
                "event": event.name,
                "properties": properties,
                "timestamp": rfc3339_utc(event.timestamp),
                "uuid": uuid::Uuid::new_v4().to_string(),
            })
        })
        .collect();
    Bytes::from(json!({"api_key": api_key, "batch": events}).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn the_batch_body_has_posthogs_shape() {
        let mut event = Event::new(
            "modal_flux_dev_generation_requested",
            "alice",
            serde_json::Map::new(),
        );
        event.timestamp = UNIX_EPOCH + Duration::from_secs(1_798_761_599);
        event.properties.insert("steps".into(), 20.into());
        let body: Value = serde_json::from_slice(&batch_body("phc_test", &[event])).unwrap();
        assert_eq!(body["api_key"], "phc_test");
        let item = &body["batch"][0];
        assert_eq!(item["event"], "modal_flux_dev_generation_requested");
        assert_eq!(item["timestamp"], "2026-12-31T23:59:59.000Z");
        assert_eq!(item["properties"]["distinct_id"], "alice");
        assert_eq!(item["properties"]["steps"], 20);
        assert_eq!(item["properties"]["$lib"], "flowhost");
        assert!(uuid::Uuid::parse_str(item["uuid"].as_str().unwrap()).is_ok());
    }

    #[test]
    fn without_a_key_analytics_are_off_and_emit_is_a_no_op() {
        let analytics = Analytics::new(AnalyticsConfig::default());
        assert!(!analytics.is_enabled());
        analytics.emit(Event::new("x", "y", serde_json::Map::new()));
        assert_eq!(analytics.dropped(), 0);
    }

    #[test]
    fn the_config_debug_output_hides_the_key() {
        let config = AnalyticsConfig {
            api_key: Some("phc_secret".into()),
            ..Default::default()
        };
        assert!(!format!("{config:?}").contains("phc_secret"));
    }
}
