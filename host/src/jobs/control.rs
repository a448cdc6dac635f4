//! A job after its admission, as callers see it and change it: read (`get`, `list`, with
//! the live queue position), followed (`subscribe`, `wait`: through its live channels
//! when this instance holds it, else through the store), canceled, and failed `Timeout`
//! when a waiter's deadline passes while it is still queued.
//!
//! Owns: the cancel rules (queued → canceled at once; running here → canceling, then the
//! runner ends it; running on another instance → the flag its holder's lease renewal
//! reads) and the follower of jobs other instances run ([`Follow`]).
//! Must never: run a job, hold a lock across an await, or write `canceling` over a job
//! that ended (the store guards it; the end stands).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::broadcast;
use uuid::Uuid;

use super::admission::Admission;
use super::failure::JobFailure;
use super::follow::Follow;
use super::live::LiveJobs;
use super::model::{Job, JobEvent, JobStatus};
use super::shared_queue::PgQueue;
use super::store::{JobFilter, JobStore, StoreError};

/// The job service's part that answers about jobs and cancels them.
pub struct Control {
    store: Arc<dyn JobStore>,
    admission: Arc<Admission>,
    live: Arc<LiveJobs>,
    /// Jobs followed through the store while another instance runs them.
    follow: Follow,
    /// The shared queue's cancel requests (issue #12), when instances share one.
    shared: Option<Arc<PgQueue>>,
    job_timeout: Duration,
}

impl Control {
    pub fn new(store: Arc<dyn JobStore>, admission: Arc<Admission>, live: Arc<LiveJobs>, shared: Option<Arc<PgQueue>>, job_timeout: Duration) -> Control {
        let follow = Follow::new(store.clone());
        Control { store, admission, live, follow, shared, job_timeout }
    }

    /// A job as now (live queue position filled in).
    pub(super) async fn get(&self, id: Uuid) -> Result<Option<Job>, JobFailure> {
        let job = self.store.get_job(id).await.map_err(JobFailure::internal)?;
        match job {
            Some(j) => Ok(Some(self.admission.with_position(j).await)),
            None => Ok(None),
        }
    }

    /// Jobs newest first.
    pub(super) async fn list(&self, filter: &JobFilter) -> Result<Vec<Job>, JobFailure> {
        let jobs = self.store.list_jobs(filter).await.map_err(JobFailure::internal)?;
        let mut out = Vec::with_capacity(jobs.len());
        for job in jobs {
            out.push(self.admission.with_position(job).await);
        }
        Ok(out)
    }

    /// The job as now and a receiver of its events from now on. A terminal job's
    /// receiver is closed at once (nothing more will happen). `None`: no such job.
    pub(super) async fn subscribe(&self, id: Uuid) -> Result<Option<(Job, broadcast::Receiver<JobEvent>)>, JobFailure> {
        if let Some((job, rx)) = self.live.subscribe(id) {
            // The store has the outputs committed so far.
            let stored = self.store.get_job(id).await.map_err(JobFailure::internal)?;
            let mut job = stored.filter(|s| s.status == job.status).unwrap_or(job);
            if job.progress.is_none() {
                job.progress = self.live.progress(id);
            }
            return Ok(Some((self.admission.with_position(job).await, rx)));
        }
        let Some(job) = self.get(id).await? else { return Ok(None) };
        if !job.status.is_terminal() {
            // Running on another instance (shared queue): follow it through the store.
            let rx = self.follow.events(&job);
            return Ok(Some((job, rx)));
        }
        let (tx, rx) = broadcast::channel(1);
        drop(tx);
        Ok(Some((job, rx)))
    }

    /// Wait until the job is terminal and return it. `deadline`: give up waiting
    /// then (a job still queued at its deadline is failed `Timeout`; one running is
    /// bounded by its own deadline).
    pub(super) async fn wait(&self, id: Uuid, deadline: Option<Instant>) -> Result<Job, JobFailure> {
        let rx = self.live.snapshots(id);
        if let Some(mut rx) = rx {
            let waited = async { rx.wait_for(|j| j.status.is_terminal()).await.map(|j| j.clone()).ok() };
            let outcome = match deadline {
                Some(at) => match tokio::time::timeout_at(at.into(), waited).await {
                    Ok(done) => done,
                    Err(_) => {
                        self.time_out_if_queued(id).await;
                        let rx = self.live.snapshots(id);
                        match rx {
                            Some(mut rx) => tokio::time::timeout(Duration::from_secs(10), async { rx.wait_for(|j| j.status.is_terminal()).await.map(|j| j.clone()).ok() }).await.ok().flatten(),
                            None => None,
                        }
                    }
                },
                None => waited.await,
            };
            if outcome.is_some() {
                // Read back: the store has the outputs.
                if let Some(job) = self.get(id).await? {
                    if job.status.is_terminal() {
                        return Ok(job);
                    }
                }
            }
        } else {
            // Not live here (another instance runs it, shared queue): follow the store.
            let followed = self.follow.until_terminal(id, deadline).await?;
            if followed.is_some_and(|j| !j.status.is_terminal()) {
                self.time_out_if_queued(id).await;
                self.follow
                    .until_terminal(id, Some(Instant::now() + Duration::from_secs(10)))
                    .await?;
            }
        }
        match self.get(id).await? {
            Some(job) if job.status.is_terminal() => Ok(job),
            Some(_) => Err(JobFailure::Timeout { prompt_id: None, waited_ms: 0, phase: None, limit: None }),
            None => Err(JobFailure::internal(format!("job {id} vanished"))),
        }
    }

    async fn time_out_if_queued(&self, id: Uuid) {
        if self.admission.take_from_queue(id).await {
            if let Ok(Some(job)) = self.store.get_job(id).await {
                let failure = super::failure::queue_timeout(self.job_timeout, job.created_at, job.spec.deadline);
                let _ = self.live.finish_unrun(job, JobStatus::Failed, Some(failure)).await;
            }
        }
    }

    /// Cancel: idempotent. Queued → canceled at once; running → canceling, then
    /// interrupted in ComfyUI → canceled; terminal → as is. `None`: no such job.
    /// A job another instance runs gets the cancel flag its holder's lease renewal reads
    /// (docs/operations.md). The `canceling` write is guarded in SQL: it never lands on a
    /// job that ended meanwhile (a cancel racing the end of a job leaves the end).
    pub(super) async fn cancel(&self, id: Uuid) -> Result<Option<Job>, JobFailure> {
        if self.admission.take_from_queue(id).await {
            let Some(job) = self.store.get_job(id).await.map_err(JobFailure::internal)? else { return Ok(None) };
            return self.live.finish_unrun(job, JobStatus::Canceled, None).await.map(Some);
        }
        let Some(mut job) = self.get(id).await? else { return Ok(None) };
        if job.status.is_terminal() {
            return Ok(Some(job));
        }
        if self.shared.as_ref().is_some() && !self.live.contains(id) {
            return self.request_cancel_elsewhere(job).await.map(Some);
        }
        match job.status {
            JobStatus::Running => {
                job.status = JobStatus::Canceling;
                match self.live.commit_typed(&job).await {
                    Ok(()) => {}
                    // Ended meanwhile: the end stands.
                    Err(StoreError::Ended) => return self.get(id).await,
                    // Taken over by another instance: leave it the flag.
                    Err(StoreError::LeaseLost) => {
                        job.status = JobStatus::Running;
                        return self.request_cancel_elsewhere(job).await.map(Some);
                    }
                    Err(e) => return Err(JobFailure::internal(e)),
                }
                self.live.request_cancel(id);
                Ok(Some(job))
            }
            // Canceling: asked already. Queued but out of the queue: claimed here and
            // about to start; the runner reads the signal as it starts.
            JobStatus::Canceling | JobStatus::Queued => {
                self.live.request_cancel(id);
                Ok(Some(job))
            }
            _ => Ok(Some(job)),
        }
    }

    /// Another instance holds the job: leave the request where its lease renewal reads it.
    async fn request_cancel_elsewhere(&self, mut job: Job) -> Result<Job, JobFailure> {
        let Some(shared) = self.shared.as_ref() else {
            return Ok(job);
        };
        if shared
            .request_cancel(job.id)
            .await
            .map_err(JobFailure::internal)?
            && job.status == JobStatus::Running
        {
            job.status = JobStatus::Canceling;
            return Ok(job);
        }
        // Nobody holds it (it ended, or went back to the queue meanwhile): as it is now.
        Ok(self.get(job.id).await?.unwrap_or(job))
    }
}
