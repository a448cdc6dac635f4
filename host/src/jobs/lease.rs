//! Leases of the shared work queue, kept by every instance (issue #12): renew what this
//! instance runs, act on cancel requests other instances left on those jobs, stop what
//! it no longer holds, and settle jobs whose holder died — re-queued once, then failed
//! `worker_lost`.
//!
//! Owns: the lease-keeping task. Must never: run a job (the dispatch loops do), settle a
//! job another live instance holds (only expired leases are taken over), or keep running
//! a prompt after its lease could not be renewed for most of a lease (another instance
//! may have it by then: that would run it twice at once).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use uuid::Uuid;

use super::failure::JobFailure;
use super::model::JobStatus;
use super::service::{JobService, candidate, lock};
use super::shared_queue::{ExpiredLease, PgQueue};
use super::queue::WorkQueue;

/// How often leases are renewed and expired ones looked for: several times a lease, at
/// most every 2 s, at least every 200 ms (cancel requests ride on the renewal, so this
/// also bounds how long a cancel from another instance takes to arrive).
pub fn renew_interval(lease: Duration) -> Duration {
    (lease / 4).clamp(Duration::from_millis(200), Duration::from_secs(1))
}

impl JobService {
    /// Start keeping this instance's leases (the shared queue only).
    pub fn start_lease_keeper(self: &Arc<Self>, queue: Arc<PgQueue>) {
        let this = self.clone();
        let task = tokio::spawn(async move { this.keep_leases(queue).await });
        lock(&self.tasks).push(task);
    }

    /// Jobs whose prompt runs here now (live here and past `queued`): in the shared
    /// setup a job is live on an instance only while that instance runs it.
    fn running_here(&self) -> Vec<Uuid> {
        lock(&self.live).iter().filter(|(_, l)| matches!(l.snapshot.borrow().status, JobStatus::Running | JobStatus::Canceling)).map(|(id, _)| *id).collect()
    }

    /// Interrupt a job here without recording anything (its lease is gone: the new
    /// holder records what happens to it).
    fn stop_here(&self, id: Uuid, why: &str) {
        if let Some(live) = lock(&self.live).get(&id) {
            tracing::warn!(job_id = %id, why, "stopping a job this instance no longer holds");
            live.cancel.send_replace(true);
        }
    }

    async fn keep_leases(self: Arc<Self>, queue: Arc<PgQueue>) {
        let lease = queue.lease();
        let mut tick = tokio::time::interval(renew_interval(lease));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_renewed = Instant::now();
        loop {
            tick.tick().await;
            // Before renewing: a job claimed while the renewal runs is not in what it
            // returns, and must not be taken for one whose lease was taken over (it was
            // stopped and ended `canceled` that way). Whatever runs here now was claimed
            // (committed) before the renewal starts, so the renewal sees its lease.
            let running_before = self.running_here();
            match queue.renew().await {
                Ok((held, cancel)) => {
                    last_renewed = Instant::now();
                    let held: HashSet<Uuid> = held.into_iter().collect();
                    for id in running_before {
                        // Not renewed is not proof of a takeover (the job may have ended, or
                        // its lease may have changed hands here, between the two reads; a
                        // job stopped on that inference ended `canceled` in the 3 x 50 test):
                        // stop it only if another instance holds it now.
                        if !held.contains(&id) {
                            match queue.held_elsewhere(id).await {
                                Ok(true) => self.stop_here(id, "its lease was taken over"),
                                Ok(false) => tracing::debug!(job_id = %id, "not renewed, but no other instance holds it"),
                                Err(e) => tracing::warn!(job_id = %id, error = %e, "reading who holds a job failed"),
                            }
                        }
                    }
                    for id in cancel {
                        if lock(&self.live).contains_key(&id) {
                            if let Err(e) = self.cancel(id).await {
                                tracing::warn!(job_id = %id, error = %e, "acting on a cancel request failed");
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "renewing leases failed");
                    // Fence ourselves before anyone can take the jobs over.
                    if last_renewed.elapsed() > lease * 3 / 4 {
                        for id in self.running_here() {
                            self.stop_here(id, "its lease could not be renewed");
                        }
                    }
                }
            }
            match queue.take_expired().await {
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
        let outcome = if job.status == JobStatus::Canceling {
            JobStatus::Canceled
        } else if lost.claims <= 1 {
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
        if let Err(e) = self.commit(&job).await {
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
