//! The background loop that drains the outbox: claims due messages, attempts each on its
//! own task under a concurrency bound, and records the outcome (delivered, retry at the
//! next step of the schedule, or dead letter).
//!
//! Owns scheduling and the webhook metrics' updates. Must never block or slow the job
//! runner: jobs only write outbox rows (in their own transaction) and [`wake`] this loop;
//! all network I/O happens here, on its own tasks, bounded by a semaphore.
//!
//! [`wake`]: DispatcherHandle::wake

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{Notify, Semaphore, watch};

use super::delivery::{AttemptOutcome, Deliverer};
use super::outbox::{AttemptRecord, DueDelivery, OutboxStore};
use super::schedule::RetrySchedule;
use crate::metrics::Metrics;

/// Longest the loop sleeps without looking at the outbox (a row written by another
/// connection without a wake-up is still picked up).
const MAX_IDLE: Duration = Duration::from_secs(1);
/// Messages claimed per round.
const CLAIM_BATCH: u32 = 64;
/// Delivered messages are kept this long, dead letters longer (for the admin listing).
const KEEP_DELIVERED: Duration = Duration::from_secs(24 * 3600);
const KEEP_DEAD: Duration = Duration::from_secs(7 * 24 * 3600);
/// How often old messages are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(600);

/// How the dispatcher runs.
#[derive(Debug, Clone)]
pub struct DispatcherConfig {
    /// Attempts in flight at once.
    pub concurrency: usize,
    pub schedule: RetrySchedule,
    /// The lease on a claimed message: longer than one attempt with its redirects.
    pub lease: Duration,
}

impl Default for DispatcherConfig {
    fn default() -> Self {
        Self { concurrency: 16, schedule: RetrySchedule::default(), lease: Duration::from_secs(60) }
    }
}

/// Wakes and stops a running dispatcher. Cheap to clone.
#[derive(Debug, Clone)]
pub struct DispatcherHandle {
    wake: Arc<Notify>,
    stop: watch::Sender<bool>,
}

impl DispatcherHandle {
    /// New messages were committed: look now rather than at the next tick.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Stop claiming; attempts in flight finish on their own (their rows stay leased or
    /// are recorded; a leased row is due again at the next start).
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

/// Start the loop on the current runtime.
pub fn spawn(store: Arc<dyn OutboxStore>, deliverer: Deliverer, config: DispatcherConfig, metrics: Metrics) -> DispatcherHandle {
    let wake = Arc::new(Notify::new());
    let (stop, stopped) = watch::channel(false);
    let handle = DispatcherHandle { wake: wake.clone(), stop };
    tokio::spawn(run(store, deliverer, config, metrics, wake, stopped));
    handle
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)).unwrap_or(0)
}

fn ms(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX / 2)
}

async fn run(store: Arc<dyn OutboxStore>, deliverer: Deliverer, config: DispatcherConfig, metrics: Metrics, wake: Arc<Notify>, mut stopped: watch::Receiver<bool>) {
    // One process owns the embedded store: leases left by a previous run are stale.
    match store.release_leases().await {
        Ok(0) => {}
        Ok(released) => tracing::info!(released, "webhook messages interrupted by the last shutdown are due again"),
        Err(error) => tracing::warn!(%error, "could not release webhook leases; they run out on their own"),
    }
    let permits = Arc::new(Semaphore::new(config.concurrency.max(1)));
    let mut last_sweep = now_ms();
    loop {
        if *stopped.borrow() {
            return;
        }
        refresh_gauges(store.as_ref(), &metrics).await;
        // Claim only as many as there are free permits, so nothing waits leased.
        let free = u32::try_from(permits.available_permits()).unwrap_or(u32::MAX).min(CLAIM_BATCH);
        if free > 0 {
            match store.claim_due(now_ms(), config.lease, free).await {
                Ok(due) => {
                    for message in due {
                        let Ok(permit) = permits.clone().acquire_owned().await else { return };
                        let (store, deliverer, metrics, wake, schedule) = (store.clone(), deliverer.clone(), metrics.clone(), wake.clone(), config.schedule);
                        tokio::spawn(async move {
                            attempt_one(store.as_ref(), &deliverer, &metrics, schedule, message).await;
                            drop(permit);
                            wake.notify_one();
                        });
                    }
                }
                Err(error) => tracing::warn!(%error, "claiming webhook messages failed; trying again shortly"),
            }
        }
        if now_ms() - last_sweep > ms(SWEEP_EVERY) {
            last_sweep = now_ms();
            let now = now_ms();
            if let Err(error) = store.sweep(now - ms(KEEP_DELIVERED), now - ms(KEEP_DEAD)).await {
                tracing::warn!(%error, "sweeping old webhook messages failed");
            }
        }
        // With every permit taken, the next look is when an attempt finishes (its wake).
        let sleep = if permits.available_permits() == 0 {
            MAX_IDLE
        } else {
            match store.next_due_at().await {
                Ok(Some(at)) => Duration::from_millis(u64::try_from(at - now_ms()).unwrap_or(0)).min(MAX_IDLE),
                _ => MAX_IDLE,
            }
        }
        .max(Duration::from_millis(1));
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(sleep) => {}
            _ = stopped.changed() => return,
        }
    }
}

async fn refresh_gauges(store: &dyn OutboxStore, metrics: &Metrics) {
    if let Ok(counts) = store.counts().await {
        metrics.webhook_outbox(counts.pending, counts.dead);
    }
}

async fn attempt_one(store: &dyn OutboxStore, deliverer: &Deliverer, metrics: &Metrics, schedule: RetrySchedule, message: DueDelivery) {
    let outcome = deliverer.attempt(&message.url, &message.message_id, &message.payload).await;
    let attempts_made = message.attempts.saturating_add(1);
    let record = match outcome {
        AttemptOutcome::Delivered { status } => {
            tracing::info!(message_id = %message.message_id, job_id = %message.job_id, event = %message.event_type, status, attempt = attempts_made, "webhook delivered");
            metrics.webhook_delivery("delivered");
            AttemptRecord::Delivered { status }
        }
        AttemptOutcome::Refused(refusal) => {
            tracing::warn!(message_id = %message.message_id, job_id = %message.job_id, reason = %refusal, "webhook destination refused; dead-lettered");
            metrics.webhook_delivery("refused");
            metrics.webhook_delivery("dead_lettered");
            AttemptRecord::Dead { status: None, error: refusal.to_string() }
        }
        AttemptOutcome::Failed { status, reason } => match schedule.random_delay(attempts_made) {
            Some(delay) => {
                tracing::info!(message_id = %message.message_id, job_id = %message.job_id, %reason, attempt = attempts_made, retry_in_ms = delay.as_millis() as u64, "webhook attempt failed; will retry");
                metrics.webhook_delivery("failed");
                AttemptRecord::Retry { status, error: reason, next_attempt_at_ms: now_ms().saturating_add(ms(delay)) }
            }
            None => {
                tracing::warn!(message_id = %message.message_id, job_id = %message.job_id, %reason, attempts = attempts_made, "webhook out of attempts; dead-lettered");
                metrics.webhook_delivery("failed");
                metrics.webhook_delivery("dead_lettered");
                AttemptRecord::Dead { status, error: reason }
            }
        },
    };
    if let Err(error) = store.record(message.row_id, now_ms(), &record).await {
        // The lease runs out and the message is attempted again: at least once.
        tracing::warn!(%error, message_id = %message.message_id, "recording a webhook attempt failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::Analytics;
    use crate::net::destination::DestinationPolicy;
    use crate::webhooks::outbox::tests::{message, scratch_outbox};
    use crate::webhooks::signing::{SigningKeys, WebhookSecret};
    use std::sync::Mutex;
    use std::time::Instant;

    use axum::http::{HeaderMap, StatusCode};

    /// Receiver answering 500 for the first `failures` requests, then 200; records
    /// (arrival, webhook-id).
    async fn flaky_receiver(failures: usize) -> (String, Arc<Mutex<Vec<(Instant, String)>>>) {
        let seen: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
        let app = {
            let seen = seen.clone();
            axum::Router::new().fallback(move |headers: HeaderMap| {
                let seen = seen.clone();
                async move {
                    let mut seen = seen.lock().unwrap();
                    let id = headers.get("webhook-id").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
                    seen.push((Instant::now(), id));
                    if seen.len() <= failures { StatusCode::INTERNAL_SERVER_ERROR } else { StatusCode::OK }
                }
            })
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (base, seen)
    }

    fn deliverer() -> Deliverer {
        let keys = SigningKeys::new(vec![WebhookSecret::generate().parse().unwrap()]);
        Deliverer::new(DestinationPolicy::new(["127.0.0.1".to_owned()]), keys, Duration::from_secs(2)).unwrap()
    }

    async fn wait_for(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
        let start = Instant::now();
        while start.elapsed() < limit {
            if done() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        done()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_receiver_gets_the_same_message_again_with_growing_delays() {
        let (outbox, _dir) = scratch_outbox().await;
        let (base, seen) = flaky_receiver(3).await;
        let mut msg = message(1, now_ms());
        msg.url = format!("{base}/hook");
        outbox.enqueue(&[msg]).await.unwrap();
        let metrics = Metrics::new(Analytics::disabled());
        let config = DispatcherConfig { schedule: RetrySchedule::with_base(Duration::from_millis(40)), ..Default::default() };
        let handle = spawn(Arc::new(outbox.clone()), deliverer(), config, metrics.clone());
        assert!(wait_for(Duration::from_secs(10), || seen.lock().unwrap().len() >= 4).await);
        handle.stop();
        let seen = seen.lock().unwrap().clone();
        assert!(seen.iter().all(|(_, id)| id == "msg_1"), "{seen:?}");
        let gaps: Vec<Duration> = seen.windows(2).map(|w| w[1].0 - w[0].0).collect();
        // 40 ms, 240 ms, 960 ms nominal (+0-25 % jitter).
        assert!(gaps[0] >= Duration::from_millis(40) && gaps[1] >= Duration::from_millis(240) && gaps[2] >= Duration::from_millis(960), "{gaps:?}");
        assert!(gaps[0] < gaps[1] && gaps[1] < gaps[2], "{gaps:?}");
        assert!(wait_for(Duration::from_secs(2), || metrics.render().contains("flowhost_webhook_deliveries_total{outcome=\"delivered\"} 1")).await, "{}", metrics.render());
        assert!(metrics.render().contains("flowhost_webhook_deliveries_total{outcome=\"failed\"} 3"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_message_out_of_attempts_is_dead_lettered_and_counted() {
        let (outbox, _dir) = scratch_outbox().await;
        let (base, seen) = flaky_receiver(usize::MAX).await;
        let mut msg = message(1, now_ms());
        msg.url = format!("{base}/hook");
        outbox.enqueue(&[msg]).await.unwrap();
        let metrics = Metrics::new(Analytics::disabled());
        // The whole production schedule, 1 unit = 20 µs (about 0.3 s in all).
        let config = DispatcherConfig { schedule: RetrySchedule::with_base(Duration::from_micros(20)), ..Default::default() };
        let handle = spawn(Arc::new(outbox.clone()), deliverer(), config, metrics.clone());
        let mut dead = Vec::new();
        for _ in 0..200 {
            dead = outbox.dead_letters(10).await.unwrap();
            if !dead.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert_eq!(dead.len(), 1, "never dead-lettered");
        assert_eq!(dead[0].attempts, RetrySchedule::default().max_attempts());
        assert_eq!(seen.lock().unwrap().len(), RetrySchedule::default().max_attempts() as usize);
        assert_eq!((dead[0].last_status, dead[0].last_error.as_deref()), (Some(500), Some("answered 500")));
        // The gauges are refreshed by the running loop (at its next round, within 1 s).
        assert!(wait_for(Duration::from_secs(3), || metrics.render().contains("flowhost_webhook_dead_letters 1")).await, "{}", metrics.render());
        handle.stop();
        assert!(metrics.render().contains("flowhost_webhook_deliveries_total{outcome=\"dead_lettered\"} 1"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_destination_is_dead_lettered_without_retries() {
        let (outbox, _dir) = scratch_outbox().await;
        let mut msg = message(1, now_ms());
        msg.url = "http://10.0.0.1/hook".into(); // not on the allow-list
        outbox.enqueue(&[msg]).await.unwrap();
        let metrics = Metrics::new(Analytics::disabled());
        let handle = spawn(Arc::new(outbox.clone()), deliverer(), DispatcherConfig::default(), metrics.clone());
        let mut dead = Vec::new();
        for _ in 0..100 {
            dead = outbox.dead_letters(10).await.unwrap();
            if !dead.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        handle.stop();
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].attempts, 1);
        assert_eq!(dead[0].last_error.as_deref(), Some("the URL points to a private address; only public addresses are allowed"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrency_is_bounded() {
        // A receiver that holds every request 200 ms and counts how many it holds at once.
        let (held, peak) = (Arc::new(std::sync::atomic::AtomicUsize::new(0)), Arc::new(std::sync::atomic::AtomicUsize::new(0)));
        let app = {
            let (held, peak) = (held.clone(), peak.clone());
            axum::Router::new().fallback(move || {
                let (held, peak) = (held.clone(), peak.clone());
                async move {
                    let now = held.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                    peak.fetch_max(now, std::sync::atomic::Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    held.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                    StatusCode::OK
                }
            })
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let (outbox, _dir) = scratch_outbox().await;
        let messages: Vec<_> = (0..12).map(|n| {
            let mut m = message(n, now_ms());
            m.url = format!("{base}/hook");
            m
        }).collect();
        outbox.enqueue(&messages).await.unwrap();
        let config = DispatcherConfig { concurrency: 3, ..Default::default() };
        let handle = spawn(Arc::new(outbox.clone()), deliverer(), config, Metrics::new(Analytics::disabled()));
        let mut delivered = 0;
        for _ in 0..200 {
            delivered = outbox.counts().await.unwrap().delivered;
            if delivered == 12 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        handle.stop();
        assert_eq!(delivered, 12);
        assert_eq!(peak.load(std::sync::atomic::Ordering::SeqCst), 3);
    }
}
