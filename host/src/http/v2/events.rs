//! `GET /api/v2/jobs/{id}/events`: the live SSE stream of one job. On connect: the current
//! `status` (+ the latest `progress`); then `status` on every change, `progress` at most
//! ~2 per second (each a complete snapshot, the newest one wins), `preview` (also
//! throttled), `output` as each is committed; the stream ends after the terminal `status`,
//! which carries the complete `outputs` (and `error`). A stream opened after the end gets the
//! terminal status and closes. Events carry no `id` (no replay, as the spec says).
//!
//! Must never be the source of truth (a lagging listener re-syncs from the job service, it
//! is never told a partial story), and never block the runner: it reads a broadcast
//! channel the job service writes without waiting.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use futures::{SinkExt, StreamExt};
use futures::channel::mpsc;
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;
use tokio::time::Instant;
use uuid::Uuid;

use super::Origin;
use super::envelope::{ErrorCode, V2Error};
use super::errors::job_failure;
use crate::http::AppState;
use crate::jobs::view::{job_error_json, output_json, progress_json, status_event_json};
use crate::jobs::{Job, JobEvent, JobService};

/// At most one `progress` (and one `preview`) per this interval: the spec's "~2/s".
pub const PROGRESS_INTERVAL: Duration = Duration::from_millis(500);
/// Comment frames keep idle connections (and proxies) open.
const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// How often a quiet stream looks whether its client is still there.
const CLOSED_CHECK: Duration = Duration::from_secs(1);
/// Default `--max-event-streams`: open SSE streams on this instance in all.
pub const DEFAULT_MAX_STREAMS: usize = 1024;
/// Default `--max-event-streams-per-job`.
pub const DEFAULT_MAX_STREAMS_PER_JOB: usize = 64;
/// What a refused stream is told to wait.
const STREAMS_RETRY_AFTER_S: u64 = 5;

/// The caps on concurrent event streams (issue #22: 2,000 listeners on one job held
/// 850 MB): one past either cap is answered `too_many_streams` (429 + Retry-After), and a
/// plain `GET /api/v2/jobs/{id}` poll stays available. Cheap to clone.
#[derive(Clone)]
pub struct StreamSlots {
    open: Arc<Mutex<OpenStreams>>,
    total: usize,
    per_job: usize,
}

#[derive(Default)]
struct OpenStreams {
    total: usize,
    per_job: HashMap<Uuid, usize>,
}

/// One open stream; its slot frees when dropped (with the response body).
pub struct StreamSlot {
    open: Arc<Mutex<OpenStreams>>,
    job: Uuid,
}

impl StreamSlots {
    pub fn new(total: usize, per_job: usize) -> StreamSlots {
        StreamSlots { open: Arc::default(), total: total.max(1), per_job: per_job.max(1) }
    }

    /// A slot for a stream of `job`, or `too_many_streams`.
    pub fn open(&self, job: Uuid) -> Result<StreamSlot, V2Error> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let on_job = open.per_job.get(&job).copied().unwrap_or(0);
        let refused = if open.total >= self.total {
            Some(format!("This service already has {} event streams open, the most it serves at once.", self.total))
        } else if on_job >= self.per_job {
            Some(format!("This job already has {} event streams open, the most one job serves at once.", self.per_job))
        } else {
            None
        };
        if let Some(why) = refused {
            tracing::info!(job_id = %job, total = open.total, on_job, "event stream refused: too many streams");
            return Err(V2Error::new(ErrorCode::TooManyStreams, format!("{why} Close one, or poll GET /api/v2/jobs/{job} instead.")).retry_after(STREAMS_RETRY_AFTER_S));
        }
        open.total += 1;
        *open.per_job.entry(job).or_insert(0) += 1;
        Ok(StreamSlot { open: self.open.clone(), job })
    }

    /// Streams open now.
    pub fn open_now(&self) -> usize {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).total
    }
}

impl Default for StreamSlots {
    fn default() -> StreamSlots {
        StreamSlots::new(DEFAULT_MAX_STREAMS, DEFAULT_MAX_STREAMS_PER_JOB)
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.per_job.get_mut(&self.job) {
            *n -= 1;
            if *n == 0 {
                open.per_job.remove(&self.job);
            }
        }
    }
}

fn event(name: &str, data: &Value) -> Event {
    Event::default().event(name).data(data.to_string())
}

/// The `status` payload; the terminal one also carries the complete outputs and the error.
fn status_event(job: &Job, origin: &Origin) -> Event {
    let mut data = status_event_json(job);
    if job.status.is_terminal() {
        data["outputs"] = Value::Array(job.outputs.iter().map(|asset| output_json(asset, job, origin)).collect());
        data["error"] = job.error.as_ref().map(job_error_json).unwrap_or(Value::Null);
    }
    event("status", &data)
}

/// The `preview` payload (`PreviewEvent`).
fn preview_json(bytes: &[u8], media_type: String, node_id: Option<String>) -> Value {
    json!({
        "node_id": node_id.unwrap_or_default(),
        "content_type": media_type,
        "data_base64": base64::engine::general_purpose::STANDARD.encode(bytes),
    })
}

/// What the stream sends next for one job, from the service's events.
struct Stream {
    service: std::sync::Arc<JobService>,
    origin: Origin,
    job: Job,
    tx: mpsc::Sender<Result<Event, std::convert::Infallible>>,
    last_status: Value,
    last_progress_at: Option<Instant>,
    pending_progress: Option<crate::jobs::Progress>,
    last_preview_at: Option<Instant>,
    pending_preview: Option<Value>,
}

impl Stream {
    /// False when the client went away.
    async fn send(&mut self, event: Event) -> bool {
        self.tx.send(Ok(event)).await.is_ok()
    }

    async fn send_status(&mut self) -> bool {
        let payload = status_event_json(&self.job);
        if payload == self.last_status && !self.job.status.is_terminal() {
            return true;
        }
        self.last_status = payload;
        let event = status_event(&self.job, &self.origin);
        self.send(event).await
    }

    async fn flush_progress(&mut self, now: Instant) -> bool {
        if let Some(progress) = self.pending_progress.take() {
            self.last_progress_at = Some(now);
            return self.send(event("progress", &progress_json(&progress))).await;
        }
        true
    }

    async fn flush_preview(&mut self, now: Instant) -> bool {
        if let Some(preview) = self.pending_preview.take() {
            self.last_preview_at = Some(now);
            return self.send(event("preview", &preview)).await;
        }
        true
    }

    fn next_flush(&self) -> Option<Instant> {
        let due = |at: Option<Instant>| at.map_or_else(Instant::now, |at| at + PROGRESS_INTERVAL);
        let progress = self.pending_progress.as_ref().map(|_| due(self.last_progress_at));
        let preview = self.pending_preview.as_ref().map(|_| due(self.last_preview_at));
        match (progress, preview) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Re-read the job (after a lag or a closed channel) and say where it stands.
    async fn resync(&mut self) -> bool {
        match self.service.get(self.job.id).await {
            Ok(Some(job)) => {
                self.job = job;
                if let Some(progress) = self.job.progress.clone() {
                    self.pending_progress = Some(progress);
                }
                self.send_status().await
            }
            _ => false,
        }
    }

    async fn run(mut self, mut rx: tokio::sync::broadcast::Receiver<JobEvent>) {
        // The snapshot: status, then the latest progress.
        if !self.send_status().await || self.job.status.is_terminal() {
            return;
        }
        if let Some(progress) = self.job.progress.clone() {
            self.pending_progress = Some(progress);
            if !self.flush_progress(Instant::now()).await {
                return;
            }
        }
        // The spec: the most recent preview, if any, is part of the snapshot.
        if let Some(JobEvent::Preview { bytes, media_type, node_id }) = self.service.latest_preview(self.job.id) {
            self.pending_preview = Some(preview_json(&bytes, media_type, node_id));
            if !self.flush_preview(Instant::now()).await {
                return;
            }
        }
        loop {
            // Wake at the next flush, and at least every CLOSED_CHECK to notice a client that
            // left while the job was quiet (its slot and its follower's listener go with it).
            let check_at = Instant::now() + CLOSED_CHECK;
            let wake_at = self.next_flush().map_or(check_at, |at| at.min(check_at));
            let received = tokio::select! {
                received = rx.recv() => Some(received),
                _ = tokio::time::sleep_until(wake_at) => None,
            };
            let now = Instant::now();
            let alive = match received {
                None => !self.tx.is_closed() && self.flush_progress_if_due(now).await && self.flush_preview_if_due(now).await,
                Some(Ok(JobEvent::Status(job))) => {
                    self.job = *job;
                    if self.job.status.is_terminal() {
                        // Outputs first-class on the terminal status; pending progress is moot.
                        let _ = self.send_status().await;
                        return;
                    }
                    self.send_status().await
                }
                Some(Ok(JobEvent::Progress(progress))) => {
                    self.job.progress = Some(progress.clone());
                    self.pending_progress = Some(progress);
                    self.flush_progress_if_due(now).await
                }
                Some(Ok(JobEvent::Preview { bytes, media_type, node_id })) => {
                    self.pending_preview = Some(preview_json(&bytes, media_type, node_id));
                    self.flush_preview_if_due(now).await
                }
                Some(Ok(JobEvent::Output(asset))) => {
                    let data = output_json(&asset, &self.job, &self.origin);
                    self.send(event("output", &data)).await
                }
                Some(Err(RecvError::Lagged(_))) => self.resync().await,
                Some(Err(RecvError::Closed)) => {
                    // The job's channel is gone: it ended (normally after its terminal status,
                    // which we would have seen). Say the final word from the store.
                    let _ = self.resync().await;
                    return;
                }
            };
            if !alive {
                return;
            }
        }
    }

    async fn flush_progress_if_due(&mut self, now: Instant) -> bool {
        let due = self.last_progress_at.is_none_or(|at| now >= at + PROGRESS_INTERVAL);
        if due { self.flush_progress(now).await } else { true }
    }

    async fn flush_preview_if_due(&mut self, now: Instant) -> bool {
        let due = self.last_preview_at.is_none_or(|at| now >= at + PROGRESS_INTERVAL);
        if due { self.flush_preview(now).await } else { true }
    }
}

/// `GET /api/v2/jobs/{id}/events`.
pub async fn events(State(state): State<AppState>, caller: Option<axum::extract::Extension<crate::auth::Caller>>, Path(raw): Path<String>, origin: Origin) -> Result<Response, V2Error> {
    let id = super::jobs::visible_job(&state, caller.as_deref(), &raw).await?.id;
    let slot = state.streams.open(id)?;
    let (job, rx) = state.jobs.subscribe(id).await.map_err(|f| job_failure(&f))?.ok_or_else(|| V2Error::not_found("job"))?;
    let (tx, stream) = mpsc::channel(16);
    let worker = Stream {
        service: state.jobs.clone(),
        origin,
        job,
        tx,
        last_status: Value::Null,
        last_progress_at: None,
        pending_progress: None,
        last_preview_at: None,
        pending_preview: None,
    };
    tokio::spawn(worker.run(rx));
    // The slot goes with the body: freed when the stream ends or the client leaves.
    let stream = stream.map(move |event| {
        let _held = &slot;
        event
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)).into_response())
}

#[cfg(test)]
mod stream_cap_tests {
    use super::*;

    #[test]
    fn streams_are_capped_per_job_and_in_all_and_freed_when_dropped() {
        let slots = StreamSlots::new(3, 2);
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let first = slots.open(a).unwrap();
        let _second = slots.open(a).unwrap();
        let refused = slots.open(a).err().expect("a third stream of one job is refused");
        assert_eq!((refused.code, refused.status.as_u16(), refused.retry_after), (ErrorCode::TooManyStreams, 429, Some(STREAMS_RETRY_AFTER_S)));
        let _third = slots.open(b).unwrap();
        assert!(slots.open(b).is_err(), "the total cap holds across jobs");
        drop(first);
        assert!(slots.open(a).is_ok());
        assert_eq!(slots.open_now(), 2, "a dropped slot is free again");
    }
}
