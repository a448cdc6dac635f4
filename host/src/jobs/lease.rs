//! Leases of the shared work queue, kept by every instance (issue #12): renew what this
//! instance runs, act on cancel requests other instances left on those jobs, stop what
//! it no longer holds, and settle jobs whose holder died — re-queued once, then failed
//! `worker_lost`.
//!
//! Owns: the lease-keeping task and the fence beside it (their handles kept by the
//! service). Must never: run a job (the dispatch loops do), settle a
//! job another live instance holds (only expired leases are taken over), keep running a
//! prompt past the local deadline ([`fence_after`]) when its lease could not be renewed
//! (another instance may have it by then: that would run it twice at once), wait on the
//! database for that deadline, or take a lease over within a lease of its own database
//! outage. The rules: docs/operations.md, "Exactly once".

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use uuid::Uuid;

use tokio::task::JoinHandle;

use super::admission::candidate;
use super::control::Control;
use super::failure::JobFailure;
use super::live::LiveJobs;
use super::lock;
use super::model::JobStatus;
use super::queue::WorkQueue;
use super::shared_queue::{ExpiredLease, PgQueue};
use super::store::JobStore;
use crate::metrics::Metrics;

/// How often leases are renewed and expired ones looked for: several times a lease, at
/// most every second, at least every 200 ms (cancel requests ride on the renewal, so this
/// also bounds how long a cancel from another instance takes to arrive). A renewal that
/// has not answered within this long counts as failed (the pool's acquire timeout is
/// longer than a short lease: renewal must not wait on it).
pub fn renew_interval(lease: Duration) -> Duration {
    (lease / 4).clamp(Duration::from_millis(200), Duration::from_secs(1))
}

/// The local deadline: this long after the last renewal that succeeded was *sent* (the
/// lease runs from then), this instance stops its prompts, checked four times a
/// [`renew_interval`] — so by 9/16 of a lease at the latest, well before any other
/// instance may take a lease over (it expires at 1 lease, and a takeover waits for it).
/// Measured on this process's clock alone: it fires while a database call hangs.
pub fn fence_after(lease: Duration) -> Duration {
    lease / 2
}

/// The job service's part that keeps this instance's leases of the shared queue.
pub struct LeaseKeeper {
    store: Arc<dyn JobStore>,
    live: Arc<LiveJobs>,
    /// Acts on the cancel requests other instances leave on jobs this one runs.
    control: Arc<Control>,
    metrics: Metrics,
}

impl LeaseKeeper {
    pub fn new(store: Arc<dyn JobStore>, live: Arc<LiveJobs>, control: Arc<Control>, metrics: Metrics) -> LeaseKeeper {
        LeaseKeeper { store, live, control, metrics }
    }

    /// Start keeping this instance's leases (the shared queue only): the renewing task,
    /// and beside it the fence, a task on this process's clock alone that no database
    /// call can hold up. Their handles, for stopping them.
    pub(super) fn spawn(self: &Arc<Self>, queue: Arc<PgQueue>) -> [JoinHandle<()>; 2] {
        let renewed = Arc::new(Mutex::new(Instant::now()));
        let this = self.clone();
        let (lease, last) = (queue.lease(), renewed.clone());
        let fence = tokio::spawn(async move { this.fence_on_deadline(lease, last).await });
        let this = self.clone();
        let task = tokio::spawn(async move { this.keep_leases(queue, renewed).await });
        [fence, task]
    }

    /// The local deadline: [`fence_after`] past the last renewal that succeeded, stop every
    /// prompt this instance runs. Checked every ¼ of [`renew_interval`].
    async fn fence_on_deadline(self: Arc<Self>, lease: Duration, renewed: Arc<Mutex<Instant>>) {
        let mut tick = tokio::time::interval(renew_interval(lease) / 4);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let since = lock(&renewed).elapsed();
            if since >= fence_after(lease) {
                for id in self.live.ids() {
                    self.live.fence(id, "its lease could not be renewed in time");
                }
            }
        }
    }

    async fn keep_leases(self: Arc<Self>, queue: Arc<PgQueue>, renewed: Arc<Mutex<Instant>>) {
        let lease = queue.lease();
        let every = renew_interval(lease);
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // When the last renewal that succeeded was sent (the leases it wrote run from then);
        // shared with the fence.
        let mut renewed_at = *lock(&renewed);
        // When the database last failed a renewal: no lease is taken over until it has
        // answered for a whole lease since, so every instance that lost it too has had
        // the time to renew what it still runs (else the first back would take over the
        // others' jobs, their results in hand, the moment the database returns).
        let mut failed_at: Option<Instant> = None;
        loop {
            tick.tick().await;
            // What runs here now was claimed (committed) before the renewal starts, so the
            // renewal sees its lease.
            let running = self.live.ids();
            let sent = Instant::now();
            let outcome = match tokio::time::timeout(every, queue.renew(&running)).await {
                Ok(outcome) => outcome,
                Err(_) => Err(super::store::StoreError::Database("the renewal did not answer in time".into())),
            };
            let (held, cancel) = match outcome {
                Ok(outcome) => outcome,
                Err(e) => {
                    if failed_at.is_none_or(|at| at < renewed_at) {
                        tracing::warn!(error = %e, "renewing leases failed");
                    }
                    failed_at = Some(Instant::now());
                    continue;
                }
            };
            if failed_at.is_some_and(|at| at >= renewed_at) {
                tracing::info!("renewing leases again");
            }
            renewed_at = sent;
            *lock(&renewed) = sent;
            let held: HashSet<Uuid> = held.into_iter().collect();
            for id in running.into_iter().filter(|id| !held.contains(id)) {
                // Not renewed: ended meanwhile, or no longer this instance's. Read who holds
                // it (a job stopped on the inference alone ended `canceled` in the 3 x 50 test).
                let holds = tokio::time::timeout(every, queue.holds(id)).await;
                if self.live.contains(id) && matches!(holds, Ok(Ok(false))) {
                    self.live.fence(id, "another instance holds its lease");
                }
            }
            for id in cancel {
                if self.live.contains(id)
                    && let Err(e) = self.control.cancel(id).await
                {
                    tracing::warn!(job_id = %id, error = %e, "acting on a cancel request failed");
                }
            }
            if failed_at.is_some_and(|at| at.elapsed() < lease) {
                continue;
            }
            match queue.take_expired(&self.live.ids()).await {
                Ok(expired) => {
                    for lost in expired {
                        self.settle_lost(&queue, lost).await;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "looking for expired leases failed"),
            }
        }
    }

    /// A job whose holder stopped renewing (this instance has taken its lease over):
    /// canceling → canceled; claimed once → queued again; claimed before → `worker_lost`.
    async fn settle_lost(&self, queue: &PgQueue, lost: ExpiredLease) {
        let job = match self.store.get_job(lost.id).await {
            Ok(Some(job)) => job,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(job_id = %lost.id, error = %e, "reading a job with an expired lease failed");
                return;
            }
        };
        if job.status.is_terminal() {
            let _ = queue.release(job.id).await;
            return;
        }
        let mut job = job;
        let now = SystemTime::now();
        let outcome = if job.status == JobStatus::Canceling || lost.cancel_requested {
            JobStatus::Canceled
        } else if job.status == JobStatus::Queued || lost.claims <= 1 {
            // Never started (claimed, then its holder was lost), or started once: again.
            JobStatus::Queued
        } else {
            JobStatus::Failed
        };
        job.queue_position = None;
        match outcome {
            JobStatus::Queued => {
                tracing::warn!(job_id = %job.id, "the instance running the job was lost; queueing it again (once)");
                job.status = JobStatus::Queued;
                job.started_at = None;
                job.progress = None;
                job.prompt_id = None;
            }
            status => {
                tracing::warn!(job_id = %job.id, status = status.as_str(), "the instance running the job was lost");
                job.status = status;
                job.completed_at = Some(now);
                job.metrics.total_ms = Some(now.duration_since(job.created_at).unwrap_or_default().as_millis() as u64);
                if status == JobStatus::Failed {
                    job.error = Some(JobFailure::WorkerLost);
                }
            }
        }
        if let Err(e) = self.live.commit(&job).await {
            tracing::warn!(job_id = %job.id, error = %e, "settling a lost job failed; the next pass retries");
            return;
        }
        if job.status == JobStatus::Queued {
            if let Err(e) = queue.push(candidate(&job)).await {
                tracing::warn!(job_id = %job.id, error = %e, "queueing a lost job again failed; its lease runs out and the next pass retries");
            }
        } else {
            self.metrics.job_finished(job.source.route_label(), job.status.as_str());
        }
    }
}
