//! Dispatch: `max_in_flight` loops per ComfyUI worker, each claiming from the queue by
//! the worker's loaded models ([`super::affinity`]), checking the claimed job (still
//! queued, deadline not passed, worker up) and handing it to the runner; and the warm-up
//! path that runs a job on one given worker outside the queue.
//!
//! Owns: the dispatch loops (spawned here, their handles kept by the service to stop
//! them) and the choice to give a claimed job back for a live worker.
//! Must never: run a job twice on this instance (a job still live here is left to its
//! first run), or let a worker that is (re)starting claim while another one serves.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use flowhost_comfy::{BackendHealth, ComfyBackend};
use tokio::task::JoinHandle;
use uuid::Uuid;

use super::admission::{Admission, Submission};
use super::affinity::Candidate;
use super::config::JobConfig;
use super::failure::JobFailure;
use super::live::LiveJobs;
use super::model::JobStatus;
use super::pool::{ComfyWorker, Dispatch as WorkerDispatch, WorkerPool};
use super::runner::Runner;
use super::shared_queue::PgQueue;
use super::store::JobStore;
use crate::metrics::Metrics;

/// The job service's part that hands queued jobs to the runner.
pub struct Dispatch {
    store: Arc<dyn JobStore>,
    pool: Arc<WorkerPool>,
    admission: Arc<Admission>,
    runner: Arc<Runner>,
    live: Arc<LiveJobs>,
    /// The shared queue (issue #12), when instances share one: a warm-up job is stored
    /// leased to this instance, and a claimed job still live here is left alone.
    shared: Option<Arc<PgQueue>>,
    max_in_flight: usize,
    job_timeout: Duration,
    metrics: Metrics,
}

impl Dispatch {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: &JobConfig,
        store: Arc<dyn JobStore>,
        pool: Arc<WorkerPool>,
        admission: Arc<Admission>,
        runner: Arc<Runner>,
        live: Arc<LiveJobs>,
        shared: Option<Arc<PgQueue>>,
        metrics: Metrics,
    ) -> Dispatch {
        Dispatch { store, pool, admission, runner, live, shared, max_in_flight: config.max_in_flight, job_timeout: config.job_timeout, metrics }
    }

    /// Spawn the dispatch loops, `max_in_flight` per worker; their handles, for stopping
    /// them. Without any worker, one loop fails what it claims (`comfyui_unavailable`).
    pub(super) fn spawn_loops(self: &Arc<Self>) -> Vec<JoinHandle<()>> {
        let workers: Vec<Option<Arc<ComfyWorker>>> = if self.pool.is_empty() { vec![None] } else { self.pool.workers().iter().cloned().map(Some).collect() };
        let mut tasks = Vec::new();
        for worker in workers {
            for _ in 0..self.max_in_flight.max(1) {
                let this = self.clone();
                let worker = worker.clone();
                tasks.push(tokio::spawn(async move { this.dispatch_loop(worker).await }));
            }
        }
        tasks
    }

    /// Wait until `worker` should claim: its ComfyUI is serving, or — so that jobs end
    /// rather than wait forever, as with a single ComfyUI — it is down and no other
    /// worker serves. A (re)starting worker lets the queue wait.
    async fn wait_until_claimable(&self, worker: &ComfyWorker) {
        loop {
            match worker.backend.health() {
                BackendHealth::Starting => {
                    worker.backend.wait_ready(Duration::from_secs(1)).await;
                }
                BackendHealth::Down { .. } if self.pool.another_is_serving(&worker.name) => {
                    worker.backend.wait_ready(Duration::from_secs(1)).await;
                }
                _ => return,
            }
        }
    }

    /// One prompt slot of one worker: claim (by the worker's loaded models), run, repeat.
    async fn dispatch_loop(self: Arc<Self>, worker: Option<Arc<ComfyWorker>>) {
        let name = worker.as_ref().map(|w| w.name.clone()).unwrap_or_else(|| "none".into());
        loop {
            if let Some(worker) = &worker {
                self.wait_until_claimable(worker).await;
            }
            let loaded = worker.as_ref().and_then(|w| w.loaded_key());
            let claimed = match self.admission.claim(&name, loaded.as_deref()).await {
                Ok(claimed) => claimed,
                Err(e) => {
                    tracing::warn!(worker = %name, error = %e, "claiming a job failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            // A worker whose ComfyUI died while it waited: give the job back for a live one.
            if let Some(w) = &worker
                && matches!(w.backend.health(), BackendHealth::Down { .. })
                && self.pool.another_is_serving(&w.name)
            {
                if let Err(e) = self.admission.give_back(claimed).await {
                    tracing::error!(worker = %name, error = %e, "giving a job back to the queue failed; it is requeued at the next start");
                }
                continue;
            }
            self.admission.started_running();
            self.admission.refresh_depth_metric().await;
            let started = Instant::now();
            self.run_job(claimed, worker.as_ref()).await;
            self.admission.finished_running(started.elapsed());
        }
    }

    /// Run a job on one given ComfyUI now, outside the queue, to its end; its id.
    /// For warm-up: its point is that *this* worker's GPU holds the weights, and through
    /// the queue any worker (or, with a shared queue, any instance) could take the job.
    /// The job is stored and followed like any other; it takes no queue place (with a
    /// shared queue it is stored leased to this instance).
    pub(super) async fn run_on(&self, submission: Submission, backend: &Arc<ComfyBackend>) -> Result<Uuid, JobFailure> {
        // With a shared queue every instance may claim a stored queued job: this one is
        // stored already leased by this instance (its lease keeper renews it), so no other
        // instance can take it and warm the wrong GPU.
        let pinned_until = self
            .shared
            .as_ref()
            .map(|queue| SystemTime::now() + queue.lease());
        let job = self.admission.admit(submission, pinned_until).await?;
        let id = job.id;
        if !self.live.contains(id) {
            self.live.make_live(&job);
        }
        if let Some(worker) = self.pool.workers().iter().find(|w| Arc::ptr_eq(&w.backend, backend)) {
            let dispatch = worker.dispatched(job.spec.model_key.as_deref(), job.spec.model_label.as_deref());
            self.metrics.worker_dispatch(&worker.name, dispatch == WorkerDispatch::Switch);
        }
        self.runner.execute(job, Some(backend.clone())).await;
        Ok(id)
    }

    /// A claimed job whose stored status is queued: run it on `worker` unless its
    /// deadline passed or the worker is down.
    async fn run_job(&self, claimed: Candidate, worker: Option<&Arc<ComfyWorker>>) {
        let id = claimed.id;
        let job = match self.store.get_job(id).await {
            Ok(Some(job)) if job.status == JobStatus::Queued => job,
            Ok(_) => return,
            Err(e) => {
                tracing::error!(job_id = %id, error = %e, "reading a queued job failed");
                return;
            }
        };
        // Claimed from the shared queue: live here from now on (it was followed before).
        // Already live here: this instance still runs it (a run it was fenced from has
        // not unwound yet); never a second run beside it. Its lease lapses and the job is
        // settled again once the first run is gone.
        if self.shared.as_ref().is_some() && self.live.contains(id) {
            tracing::warn!(job_id = %id, "claimed a job this instance still runs; leaving it");
            return;
        }
        if !self.live.contains(id) {
            self.live.make_live(&job);
        }
        if let Some(deadline) = job.spec.deadline
            && SystemTime::now() >= deadline
        {
            let failure = super::failure::queue_timeout(self.job_timeout, job.created_at, job.spec.deadline);
            let _ = self.live.finish_unrun(job, JobStatus::Failed, Some(failure)).await;
            return;
        }
        if let Some(worker) = worker
            && let BackendHealth::Down { reason } = worker.backend.health()
        {
            let failure = JobFailure::ComfyUnavailable { detail: reason, retry_after_s: super::failure::RETRY_AFTER_DOWN };
            let _ = self.live.finish_unrun(job, JobStatus::Failed, Some(failure)).await;
            return;
        }
        self.metrics.observe_dispatch_wait(job.source.route_label(), job.created_at.elapsed().unwrap_or_default());
        if let Some(worker) = worker {
            let dispatch = worker.dispatched(job.spec.model_key.as_deref(), job.spec.model_label.as_deref());
            self.metrics.worker_dispatch(&worker.name, dispatch == WorkerDispatch::Switch);
            tracing::debug!(job_id = %id, worker = %worker.name, switch = dispatch == WorkerDispatch::Switch, "dispatched");
        }
        self.runner.execute(job, worker.map(|w| w.backend.clone())).await;
    }
}
