//! The jobs this instance holds now, and every change of a job's state: stored first,
//! then published to the job's subscribers. Shared (by `Arc`) by the parts of the job
//! service that make a job live (admission, dispatch, recovery), run it (the runner),
//! signal it (cancel, the lease keeper's fence) or read it (subscribe, wait).
//!
//! Owns: the per-job channels ([`Live`]: snapshot, events, cancel, fence, newest preview)
//! of jobs not terminal that this instance holds; the commit of a transition with its
//! webhook messages ([`TransitionMessages`]); the end of a job that never ran.
//! Must never: hold its lock across an await, publish a transition the store refused, or
//! keep the channels of a job that ended or that another instance holds.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::{broadcast, watch};
use uuid::Uuid;

use super::failure::JobFailure;
use super::lock;
use super::model::{Job, JobEvent, JobStatus};
use super::store::{JobStore, StoreError};
use crate::events::Analytics;
use crate::metrics::Metrics;

/// Makes the outbox messages (webhooks) a job's state change sends; they are stored in the
/// same transaction as the change. Given at construction (`JobServiceParts::messages`).
pub trait TransitionMessages: Send + Sync {
    /// The messages for `job`'s new state (empty for most states).
    fn messages_for(&self, job: &Job) -> Vec<crate::jobs::outbox::NewDelivery>;
    /// Messages were committed: deliver them.
    fn committed(&self);
}

/// Subscribers may lag; a progress burst must not block the runner.
const EVENT_BUFFER: usize = 64;

/// Per-job channels while a job is not terminal.
struct Live {
    snapshot: watch::Sender<Job>,
    events: broadcast::Sender<JobEvent>,
    cancel: watch::Sender<bool>,
    /// Set by the lease keeper when this instance may no longer hold the job (its lease
    /// could not be renewed by the local deadline, or another instance holds it): the
    /// runner interrupts the prompt and records nothing unless it had already finished.
    fence: watch::Sender<bool>,
    /// The newest preview (the v2 stream pushes it on connect; never stored).
    latest_preview: Option<JobEvent>,
}

/// The job service's part that holds live jobs and commits their transitions.
pub struct LiveJobs {
    store: Arc<dyn JobStore>,
    /// Webhooks (issue #14): none, no messages.
    messages: Option<Arc<dyn TransitionMessages>>,
    live: Mutex<HashMap<Uuid, Live>>,
    metrics: Metrics,
    analytics: Analytics,
}

impl LiveJobs {
    pub fn new(store: Arc<dyn JobStore>, messages: Option<Arc<dyn TransitionMessages>>, metrics: Metrics, analytics: Analytics) -> LiveJobs {
        LiveJobs { store, messages, live: Mutex::new(HashMap::new()), metrics, analytics }
    }

    /// Hold `job` here: fresh channels (a job live already gets new ones).
    pub(super) fn make_live(&self, job: &Job) {
        let (snapshot, _) = watch::channel(job.clone());
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let (cancel, _) = watch::channel(false);
        let (fence, _) = watch::channel(false);
        lock(&self.live).insert(job.id, Live { snapshot, events, cancel, fence, latest_preview: None });
    }

    /// Whether this instance holds job `id` now.
    pub(super) fn contains(&self, id: Uuid) -> bool {
        lock(&self.live).contains_key(&id)
    }

    /// Jobs this instance holds now (in the shared setup a job is live on an instance only
    /// from its claim to its end).
    pub(super) fn ids(&self) -> Vec<Uuid> {
        lock(&self.live).keys().copied().collect()
    }

    /// Store the job, then tell subscribers. Terminal: the live entry goes.
    pub(super) async fn commit(&self, job: &Job) -> Result<(), JobFailure> {
        self.commit_typed(job).await.map_err(JobFailure::internal)
    }

    /// [`LiveJobs::commit`] with the store's refusal as it is. A refused write (the job
    /// ended already, or another instance holds it) is not this instance's to report any
    /// more: its live entry goes (nothing here will end it), and it is not an error to log.
    pub(super) async fn commit_typed(&self, job: &Job) -> Result<(), StoreError> {
        let hook = self.messages.as_ref();
        let messages = hook.map(|h| h.messages_for(job)).unwrap_or_default();
        let stored = if messages.is_empty() { self.store.update_job(job).await } else { self.store.update_job_with_messages(job, &messages).await };
        match stored {
            Ok(()) => {}
            Err(e @ (StoreError::LeaseLost | StoreError::Ended)) => {
                tracing::info!(job_id = %job.id, status = job.status.as_str(), why = %e, "a job transition was not recorded");
                self.forget(job.id);
                return Err(e);
            }
            Err(e) => {
                tracing::error!(job_id = %job.id, error = %e, "storing a job transition failed");
                return Err(e);
            }
        }
        if let (Some(hook), false) = (hook, messages.is_empty()) {
            hook.committed();
        }
        self.publish(job);
        Ok(())
    }

    /// Stop treating a job as this instance's (no live entry: not renewed, not canceled
    /// here, followed through the store like any other instance's job).
    pub(super) fn forget(&self, id: Uuid) {
        lock(&self.live).remove(&id);
    }

    fn publish(&self, job: &Job) {
        let mut live = lock(&self.live);
        if let Some(l) = live.get(&job.id) {
            let _ = l.events.send(JobEvent::Status(Box::new(job.clone())));
            l.snapshot.send_replace(job.clone());
        }
        if job.status.is_terminal() {
            live.remove(&job.id);
        }
    }

    pub(super) fn send_event(&self, id: Uuid, event: JobEvent) {
        if let Some(l) = lock(&self.live).get_mut(&id) {
            match &event {
                JobEvent::Progress(p) => l.snapshot.send_modify(|j| j.progress = Some(p.clone())),
                JobEvent::Preview { .. } => l.latest_preview = Some(event.clone()),
                _ => {}
            }
            let _ = l.events.send(event);
        }
    }

    /// The newest preview of a running job (`JobEvent::Preview`), if it sent one.
    pub(super) fn latest_preview(&self, id: Uuid) -> Option<JobEvent> {
        lock(&self.live).get(&id).and_then(|l| l.latest_preview.clone())
    }

    /// A live job's snapshot and a receiver of its events from now on.
    pub(super) fn subscribe(&self, id: Uuid) -> Option<(Job, broadcast::Receiver<JobEvent>)> {
        lock(&self.live).get(&id).map(|l| (l.snapshot.borrow().clone(), l.events.subscribe()))
    }

    /// A live job's progress as last sent.
    pub(super) fn progress(&self, id: Uuid) -> Option<super::model::Progress> {
        lock(&self.live).get(&id).and_then(|l| l.snapshot.borrow().progress.clone())
    }

    /// A receiver of a live job's snapshots (for waiting until it is terminal).
    pub(super) fn snapshots(&self, id: Uuid) -> Option<watch::Receiver<Job>> {
        lock(&self.live).get(&id).map(|l| l.snapshot.subscribe())
    }

    pub(super) fn cancel_requested(&self, id: Uuid) -> Option<watch::Receiver<bool>> {
        lock(&self.live).get(&id).map(|l| l.cancel.subscribe())
    }

    /// Ask the run of a live job to stop (canceled); no-op for a job not live here.
    pub(super) fn request_cancel(&self, id: Uuid) {
        if let Some(l) = lock(&self.live).get(&id) {
            l.cancel.send_replace(true);
        }
    }

    /// The runner's two stop signals: the cancel a caller asked for, and the fence the
    /// lease keeper raises when this instance may no longer hold the job.
    pub(super) fn signals(&self, id: Uuid) -> Option<(watch::Receiver<bool>, watch::Receiver<bool>)> {
        lock(&self.live).get(&id).map(|l| (l.cancel.subscribe(), l.fence.subscribe()))
    }

    pub(super) fn is_fenced(&self, id: Uuid) -> bool {
        lock(&self.live).get(&id).is_some_and(|l| *l.fence.borrow())
    }

    /// Raise the fence of a job this instance runs (see [`LiveJobs::signals`]).
    pub(super) fn fence(&self, id: Uuid, why: &str) {
        if let Some(live) = lock(&self.live).get(&id)
            && !live.fence.send_replace(true)
        {
            tracing::warn!(job_id = %id, why, "stopping a job this instance may no longer hold");
        }
    }

    /// Finish a job that never ran (canceled or timed out in the queue).
    pub(super) async fn finish_unrun(&self, mut job: Job, status: JobStatus, error: Option<JobFailure>) -> Result<Job, JobFailure> {
        job.status = status;
        job.completed_at = Some(SystemTime::now());
        job.error = error;
        job.queue_position = None;
        job.metrics.total_ms = Some(job.created_at.elapsed().unwrap_or_default().as_millis() as u64);
        self.commit(&job).await?;
        self.metrics.job_finished(job.source.route_label(), status.as_str());
        if let (Some(events), Some(error)) = (&job.spec.events, &job.error) {
            let timings = crate::events::JobTimings { total: job.metrics.total_ms.map(Duration::from_millis), ..Default::default() };
            self.analytics.emit(events.failed(&job.spec.analytics, &timings, error.failure_kind(), &error.message()));
        }
        Ok(job)
    }
}
