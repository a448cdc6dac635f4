//! After a restart, and as time passes: every accepted job is accounted for.
//! - [`Recovery::recover`] (before listening): queued jobs go back in the queue
//!   in their order; jobs that were running are reconciled with ComfyUI's
//!   `/history` — if ComfyUI still has their prompt, its outcome (and outputs) are
//!   taken; if it is still running there, it is followed to its end; otherwise the
//!   job ends `failed` with `host_restarted`.
//! - [`Recovery::sweep_at`] (periodically, or on demand in tests): expired
//!   records go, then every blob no record references.
//!
//! Owns: the reconciling tasks and the sweeper's loop (its handle kept by the service).
//! Must never: run a prompt twice, or delete a blob a record still references.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use flowhost_comfy::protocol::{PromptOutcome, file_refs_in_ui_output};
use tokio::task::JoinHandle;

use super::admission::Admission;
use super::blobs::BlobStore;
use super::config::JobConfig;
use super::failure::{JobFailure, RETRY_AFTER_DOWN, RunPhase};
use super::live::LiveJobs;
use super::model::{Job, JobStatus};
use super::pool::WorkerPool;
use super::runner::{FetchedOutput, Runner, clean_comfy_side};
use super::store::{JobStore, SweepReport};
use crate::metrics::Metrics;

/// What recovery found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RecoveryReport {
    pub requeued: usize,
    pub reconciling: usize,
}

/// How long recovery waits for ComfyUI to answer before giving up on reconciling.
const RECONCILE_WAIT: Duration = Duration::from_secs(120);
/// Blobs younger than this are never swept (an upload whose record is being written).
const BLOB_GRACE: Duration = Duration::from_secs(600);

/// The job service's part that accounts for every job after a restart and past retention.
pub struct Recovery {
    store: Arc<dyn JobStore>,
    blobs: Arc<dyn BlobStore>,
    pool: Arc<WorkerPool>,
    admission: Arc<Admission>,
    live: Arc<LiveJobs>,
    /// Stores the outputs of a prompt that finished while flowhost was down.
    runner: Arc<Runner>,
    job_timeout: Duration,
    retention: Duration,
    metrics: Metrics,
}

impl Recovery {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: &JobConfig,
        store: Arc<dyn JobStore>,
        blobs: Arc<dyn BlobStore>,
        pool: Arc<WorkerPool>,
        admission: Arc<Admission>,
        live: Arc<LiveJobs>,
        runner: Arc<Runner>,
        metrics: Metrics,
    ) -> Recovery {
        Recovery { store, blobs, pool, admission, live, runner, job_timeout: config.job_timeout, retention: config.retention, metrics }
    }

    /// Requeue queued jobs; reconcile jobs that were running (in the background,
    /// once ComfyUI answers). Call before listening and before `start_workers`.
    pub(super) async fn recover(self: &Arc<Self>) -> Result<RecoveryReport, JobFailure> {
        let mut report = RecoveryReport::default();
        for job in self.store.jobs_with_status(&[JobStatus::Queued]).await.map_err(JobFailure::internal)? {
            self.admission.requeue(&job).await?;
            report.requeued += 1;
        }
        for job in self.store.jobs_with_status(&[JobStatus::Running, JobStatus::Canceling]).await.map_err(JobFailure::internal)? {
            self.live.make_live(&job);
            report.reconciling += 1;
            let this = self.clone();
            tokio::spawn(async move { this.reconcile(job).await });
        }
        if report.requeued + report.reconciling > 0 {
            tracing::info!(requeued = report.requeued, reconciling = report.reconciling, "recovered jobs from the store");
        }
        Ok(report)
    }

    /// Settle one job that was running when flowhost stopped.
    async fn reconcile(self: Arc<Self>, mut job: Job) {
        let backend = self.backend_of_prompt(job.prompt_id.as_deref()).await;
        let outcome = self.reconcile_outcome(&mut job, backend.clone()).await;
        let now = SystemTime::now();
        job.completed_at = Some(now);
        job.metrics.total_ms = Some(now.duration_since(job.created_at).unwrap_or_default().as_millis() as u64);
        match outcome {
            Ok(()) => job.status = JobStatus::Succeeded,
            Err(JobFailure::Canceled) => job.status = JobStatus::Canceled,
            Err(failure) => {
                job.status = JobStatus::Failed;
                job.error = Some(failure);
            }
        }
        tracing::info!(job_id = %job.id, status = job.status.as_str(), "reconciled a job that was running before the restart");
        let _ = self.live.commit(&job).await;
        self.metrics.job_finished(job.source.route_label(), job.status.as_str());
        if let Some(backend) = &backend {
            clean_comfy_side(backend, job.id, job.prompt_id.as_deref(), !job.spec.uploads.is_empty()).await;
        }
    }

    /// The worker that ran `prompt_id` before the restart: the one whose ComfyUI has it in
    /// its history or queue; the pool's primary when none says so (or only one worker).
    async fn backend_of_prompt(&self, prompt_id: Option<&str>) -> Option<Arc<flowhost_comfy::ComfyBackend>> {
        let workers = self.pool.workers();
        if let (Some(prompt_id), true) = (prompt_id, workers.len() > 1) {
            let primary = self.pool.primary().cloned()?;
            primary.wait_ready(RECONCILE_WAIT).await;
            for worker in workers {
                if !worker.backend.health().is_serving() {
                    continue;
                }
                let client = worker.backend.client();
                let known = matches!(client.history(prompt_id).await, Ok(Some(_)))
                    || client.queue().await.is_ok_and(|q| q.is_running(prompt_id) || q.is_pending(prompt_id));
                if known {
                    return Some(worker.backend.clone());
                }
            }
        }
        self.pool.primary().cloned()
    }

    async fn reconcile_outcome(&self, job: &mut Job, backend: Option<Arc<flowhost_comfy::ComfyBackend>>) -> Result<(), JobFailure> {
        let (Some(backend), Some(prompt_id)) = (backend, job.prompt_id.clone()) else {
            return Err(JobFailure::HostRestarted);
        };
        if !backend.wait_ready(RECONCILE_WAIT).await {
            return Err(JobFailure::HostRestarted);
        }
        let client = backend.client().clone();
        let limit = job.started_at.unwrap_or(job.created_at) + self.job_timeout;
        loop {
            let entry = client.history(&prompt_id).await.map_err(|e| JobFailure::ComfyUnavailable { detail: e.to_string(), retry_after_s: RETRY_AFTER_DOWN })?;
            if let Some(entry) = entry
                && let Some(outcome) = entry.outcome(&prompt_id)
            {
                return match outcome {
                    PromptOutcome::Success if entry.outputs.values().any(|o| flowhost_comfy::raster::rasters_sent(o).is_some()) => {
                        // Its pixels went to the socket of the flowhost that stopped: run the
                        // graph again with file outputs (ComfyUI's cache answers all but the save).
                        let outputs = self.rerun_with_files(&backend, job, &prompt_id, limit).await?;
                        self.runner.store_outputs(job, outputs).await
                    }
                    PromptOutcome::Success => {
                        let outputs = self.collect_history_outputs(&client, job, &entry).await?;
                        self.runner.store_outputs(job, outputs).await
                    }
                    PromptOutcome::Error(e) => Err(JobFailure::Execution {
                        prompt_id,
                        node_id: e.node_id,
                        class_type: e.node_type,
                        exception_type: e.exception_type,
                        exception_message: e.exception_message.trim_end().to_string(),
                        traceback: e.traceback,
                    }),
                    PromptOutcome::Interrupted(e) if job.status == JobStatus::Canceling => {
                        let _ = e;
                        Err(JobFailure::Canceled)
                    }
                    PromptOutcome::Interrupted(e) => Err(JobFailure::Interrupted { prompt_id, node_id: e.node_id, class_type: e.node_type }),
                };
            }
            // Not finished: still in ComfyUI's queue? Then follow it to its end.
            let queue = client.queue().await.map_err(|e| JobFailure::ComfyUnavailable { detail: e.to_string(), retry_after_s: RETRY_AFTER_DOWN })?;
            if !(queue.is_running(&prompt_id) || queue.is_pending(&prompt_id)) {
                return Err(JobFailure::HostRestarted);
            }
            let canceled = job.status == JobStatus::Canceling || self.live.cancel_requested(job.id).is_some_and(|rx| *rx.borrow());
            if canceled || SystemTime::now() >= limit {
                client.cancel(&prompt_id).await;
                if canceled {
                    return Err(JobFailure::Canceled);
                }
                return Err(JobFailure::Timeout { prompt_id: Some(prompt_id), waited_ms: job.created_at.elapsed().unwrap_or_default().as_millis() as u64, phase: Some(RunPhase::ComfyUi), limit: None });
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Run the job's executed graph once more with `SaveImage` files, under the derived
    /// `{prompt_id}-files` id, within what is left of the job's time.
    async fn rerun_with_files(&self, backend: &flowhost_comfy::ComfyBackend, job: &Job, prompt_id: &str, limit: SystemTime) -> Result<Vec<FetchedOutput>, JobFailure> {
        let left = limit.duration_since(SystemTime::now()).unwrap_or_default();
        if left.is_zero() {
            return Err(JobFailure::Timeout { prompt_id: Some(prompt_id.to_string()), waited_ms: job.created_at.elapsed().unwrap_or_default().as_millis() as u64, phase: Some(RunPhase::ComfyUi), limit: None });
        }
        tracing::info!(job_id = %job.id, prompt_id, "outputs were sent as pixels to the stopped flowhost; running the graph again with files");
        let mut request = flowhost_comfy::RunRequest::new(super::runner::with_job_output_names(job.workflow.clone(), job.id), left);
        request.outputs = job.spec.outputs.clone();
        request.prompt_id = Some(flowhost_comfy::raster::files_prompt_id(prompt_id));
        let result = backend.run(request).await.map_err(|e| super::failure::from_comfy(e, &job.spec.caller_nodes))?;
        Ok(result.media.into_iter().map(FetchedOutput::from).collect())
    }

    /// The job's outputs from a history entry: the requested nodes, else the last node with media.
    async fn collect_history_outputs(&self, client: &flowhost_comfy::ComfyClient, job: &Job, entry: &flowhost_comfy::protocol::HistoryEntry) -> Result<Vec<FetchedOutput>, JobFailure> {
        let mut nodes: Vec<(&String, Vec<flowhost_comfy::protocol::FileRef>)> =
            entry.outputs.iter().map(|(node, output)| (node, file_refs_in_ui_output(output))).filter(|(_, files)| !files.is_empty()).collect();
        if !job.spec.outputs.is_empty() {
            let mut picked = Vec::new();
            for wanted in &job.spec.outputs {
                let Some(pos) = nodes.iter().position(|(n, _)| *n == wanted) else {
                    return Err(JobFailure::OutputMissing { node_id: wanted.clone(), caller_fault: !job.spec.caller_nodes.is_empty() });
                };
                picked.push(nodes.swap_remove(pos));
            }
            nodes = picked;
        } else {
            nodes = nodes.pop().into_iter().collect();
        }
        let mut out = Vec::new();
        for (node, files) in nodes {
            for file in files {
                let bytes = client.view(&file).await.map_err(|e| super::failure::from_comfy(e, &[]))?;
                let media_type = flowhost_comfy::media::sniff_media_type(&bytes).to_string();
                out.push(FetchedOutput { node_id: node.clone(), filename: file.filename.clone(), bytes, media_type, raster: None });
            }
        }
        if out.is_empty() {
            return Err(JobFailure::OutputMissing { node_id: "*".into(), caller_fault: !job.spec.caller_nodes.is_empty() });
        }
        Ok(out)
    }

    /// Expire what is past retention at `now` (queued jobs past it become `expired`),
    /// remove the records, then every blob no record references (older than a grace
    /// period before `now`), and retry ComfyUI-side cleanup of the removed jobs.
    pub(super) async fn sweep_at(&self, now: SystemTime) -> Result<(SweepReport, usize), JobFailure> {
        for job in self.store.jobs_with_status(&[JobStatus::Queued]).await.map_err(JobFailure::internal)? {
            // Out of the queue, then `expired` (one terminal write: a terminal state is final).
            if job.expires_at <= now && self.admission.take_from_queue(job.id).await {
                if let Ok(Some(job)) = self.store.get_job(job.id).await {
                    let _ = self.live.finish_unrun(job, JobStatus::Expired, None).await;
                }
            }
        }
        let report = self.store.sweep_expired(now).await.map_err(JobFailure::internal)?;
        let referenced = self.store.referenced_hashes().await.map_err(JobFailure::internal)?;
        let mut blobs_removed = 0;
        for (hash, modified) in self.blobs.list().await.map_err(JobFailure::internal)? {
            if referenced.contains(&hash) || modified + BLOB_GRACE > now {
                continue;
            }
            if self.blobs.delete(&hash).await.map_err(JobFailure::internal)? {
                blobs_removed += 1;
            }
        }
        for worker in self.pool.workers() {
            for id in &report.jobs {
                // Outputs went when the job ended; uploads folders are retried here.
                clean_comfy_side(&worker.backend, *id, None, true).await;
            }
        }
        if !report.jobs.is_empty() || blobs_removed > 0 {
            tracing::info!(jobs = report.jobs.len(), assets = report.assets, blobs = blobs_removed, "retention sweep");
        }
        Ok((report, blobs_removed))
    }

    /// Sweep now and then, forever: the spawned task's handle, for stopping it.
    pub(super) fn spawn_sweeper(self: &Arc<Self>) -> JoinHandle<()> {
        let this = self.clone();
        let every = (self.retention / 10).clamp(Duration::from_secs(10), Duration::from_secs(300));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if let Err(e) = this.sweep_at(SystemTime::now()).await {
                    tracing::warn!(error = %e, "retention sweep failed");
                }
            }
        })
    }
}
