//! Admission: a job is stored (its input bytes as blobs first), then queued — or refused
//! with `QueueFull` and a Retry-After estimated from recent durations when the queue is
//! at its depth and no slot is free. Also the queue's side of the rest of a job's life:
//! what dispatch claims and gives back, what cancel and the sweeper take out, what
//! recovery puts back, and the live queue position.
//!
//! Owns: the work queue (in memory, or the shared PostgreSQL one), this process's slots
//! (admissions in progress, jobs running), the duration estimate behind Retry-After.
//! Must never: hold a lock across an await, queue a job before it is stored (a job is in
//! the store before it is in the queue), or touch a shared-queue lease when announcing a
//! new job.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use uuid::Uuid;

use super::affinity::Candidate;
use super::blobs::BlobStore;
use super::config::JobConfig;
use super::failure::JobFailure;
use super::live::LiveJobs;
use super::lock;
use super::model::{Asset, AssetRole, Job, JobSource, JobSpec, JobStatus, UploadSpec};
use super::queue::WorkQueue;
use super::shared_queue::PgQueue;
use super::store::{JobStore, StoreError};
use crate::metrics::Metrics;

/// An image to upload for a new job, with its bytes.
#[derive(Debug, Clone)]
pub struct NewUpload {
    pub node_id: String,
    pub input_name: String,
    pub filename: String,
    pub bytes: Bytes,
    pub media_type: String,
}

/// A job to admit.
#[derive(Debug, Clone)]
pub struct Submission {
    /// Preassigned id (e.g. after claiming an idempotency key); a fresh one when None.
    pub id: Option<Uuid>,
    pub source: JobSource,
    pub spec: JobSpec,
    /// Bytes to store as the job's input assets and upload to ComfyUI. (Uploads of
    /// already-stored assets go straight into `spec.uploads`.)
    pub uploads: Vec<NewUpload>,
    /// The plugin's `build` time, for metrics.
    pub build_ms: Option<u64>,
}

/// This process's share of the load: what admission counts beside the queue's depth.
#[derive(Default)]
struct Slots {
    /// Admissions between the capacity check and the push.
    admitting: usize,
    /// Jobs claimed by this process's dispatch loops and not finished.
    running: usize,
}

/// Recent execution durations, for Retry-After.
struct DurationEstimate {
    ewma_ms: Option<f64>,
}

impl DurationEstimate {
    fn observe(&mut self, d: Duration) {
        let ms = d.as_secs_f64() * 1000.0;
        self.ewma_ms = Some(match self.ewma_ms {
            Some(prev) => prev * 0.8 + ms * 0.2,
            None => ms,
        });
    }
}

/// A stored job as the queue holds it: id, model key, age (its creation: a requeued
/// job keeps its place).
pub(super) fn candidate(job: &Job) -> Candidate {
    Candidate { id: job.id, model_key: job.spec.model_key.clone(), queued_at: job.created_at }
}

/// The job service's part that admits jobs and keeps the queue.
pub struct Admission {
    store: Arc<dyn JobStore>,
    blobs: Arc<dyn BlobStore>,
    queue: Arc<dyn WorkQueue>,
    /// The shared queue (issue #12), when instances share one: then a job is live here
    /// only while this instance runs it, and a new job is announced, not pushed.
    shared: Option<Arc<PgQueue>>,
    live: Arc<LiveJobs>,
    slots: Mutex<Slots>,
    estimate: Mutex<DurationEstimate>,
    /// Every prompt slot of this process: `max_in_flight` per worker (at least one).
    total_slots: usize,
    queue_depth: usize,
    retention: Duration,
    metrics: Metrics,
}

impl Admission {
    /// `workers`: how many ComfyUI workers the pool has (their slots count as capacity).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: &JobConfig,
        workers: usize,
        store: Arc<dyn JobStore>,
        blobs: Arc<dyn BlobStore>,
        queue: Arc<dyn WorkQueue>,
        shared: Option<Arc<PgQueue>>,
        live: Arc<LiveJobs>,
        metrics: Metrics,
    ) -> Admission {
        Admission {
            store,
            blobs,
            queue,
            shared,
            live,
            slots: Mutex::new(Slots::default()),
            estimate: Mutex::new(DurationEstimate { ewma_ms: None }),
            total_slots: config.max_in_flight.max(1) * workers.max(1),
            queue_depth: config.queue_depth,
            retention: config.retention,
            metrics,
        }
    }

    /// Seconds until a slot is likely free: recent execution time × jobs ahead per slot.
    pub(super) async fn retry_after(&self) -> u64 {
        let depth = self.queue.depth().await.unwrap_or(0);
        let waiting = depth + lock(&self.slots).admitting;
        self.retry_after_for(waiting)
    }

    fn retry_after_for(&self, waiting: usize) -> u64 {
        let slots = self.total_slots as f64;
        let per_job_ms = lock(&self.estimate).ewma_ms.unwrap_or(5_000.0);
        let secs = per_job_ms * (waiting as f64 + 1.0) / slots / 1000.0;
        secs.ceil().clamp(1.0, 3600.0) as u64
    }

    /// Jobs waiting for a slot now.
    pub(super) async fn queue_depth(&self) -> usize {
        self.queue.depth().await.unwrap_or(0)
    }

    /// Admit a job: store it (with its input bytes) and queue it. `QueueFull` when
    /// the queue is at its depth and no slot is free.
    pub(super) async fn submit(&self, submission: Submission) -> Result<Job, JobFailure> {
        let depth = self.queue.depth().await.map_err(JobFailure::internal)?;
        {
            let mut slots = lock(&self.slots);
            let free_slots = self.total_slots.saturating_sub(slots.running);
            let waiting = depth + slots.admitting;
            if waiting >= self.queue_depth + free_slots {
                drop(slots);
                self.metrics.job_refused("queue_full");
                return Err(JobFailure::QueueFull { retry_after_s: self.retry_after_for(waiting), depth: waiting });
            }
            slots.admitting += 1;
        }
        let result = match self.admit(submission, None).await {
            Ok(mut job) => match self.enqueue_new(&job).await {
                Ok(position) => {
                    job.queue_position = Some(position as u32);
                    Ok(job)
                }
                // Stored as queued: the next start's recovery queues it again.
                Err(e) => Err(JobFailure::internal(format!("queueing job {}: {e}", job.id))),
            },
            Err(e) => Err(e),
        };
        lock(&self.slots).admitting -= 1;
        self.refresh_depth_metric().await;
        result
    }

    /// Make a just-stored job claimable. With the shared queue the stored row is claimable
    /// already (another instance, or this one, may hold it by now): announce it, never
    /// touch a lease — a push here once cleared the lease of a job this instance had
    /// just claimed, and a second claimer took it while the first started it.
    async fn enqueue_new(&self, job: &Job) -> Result<usize, StoreError> {
        match self.shared.as_ref() {
            Some(shared) => shared.announce(&candidate(job)).await,
            None => self.queue.push(candidate(job)).await,
        }
    }

    pub(super) async fn refresh_depth_metric(&self) {
        if let Ok(depth) = self.queue.depth().await {
            self.metrics.set_queue_depth(depth);
        }
    }

    /// Store a new job (its uploads to blobs first). `pinned_until`: already leased by
    /// this instance until then (see [`JobStore::insert_pinned_job`]).
    pub(super) async fn admit(&self, submission: Submission, pinned_until: Option<SystemTime>) -> Result<Job, JobFailure> {
        let Submission { id, source, mut spec, uploads, build_ms } = submission;
        let mut job = Job::new(source, JobSpec::new(Default::default()), self.retention);
        if let Some(id) = id {
            job.id = id;
        }
        let mut inputs = Vec::with_capacity(uploads.len());
        for upload in uploads {
            let size = upload.bytes.len() as u64;
            let (hash, _) = self.blobs.put(upload.bytes).await.map_err(JobFailure::internal)?;
            inputs.push(Asset {
                id: Uuid::new_v4(),
                hash: hash.clone(),
                size_bytes: size,
                content_type: upload.media_type,
                name: Some(upload.filename.clone()),
                job_id: Some(job.id),
                node_id: Some(upload.node_id.clone()),
                role: AssetRole::Input,
                created_at: job.created_at,
                expires_at: Some(job.expires_at),
                tenant: spec.tenant.clone(),
            });
            spec.uploads.push(UploadSpec { node_id: upload.node_id, input_name: upload.input_name, filename: upload.filename, hash });
        }
        if spec.model_key.is_none() {
            // v2 and /workflow graphs (and plugins that said nothing): read the loaders.
            let set = crate::plugins::ModelSet::inferred_from_workflow(&spec.workflow);
            spec.model_key = super::affinity::model_key(&set);
            spec.model_label = super::affinity::model_label(&set);
        }
        job.workflow = serde_json::Value::Object(spec.workflow.clone());
        job.metrics.build_ms = build_ms;
        job.spec = spec;
        match pinned_until {
            Some(until) => self.store.insert_pinned_job(&job, &inputs, until).await,
            None => self.store.insert_job(&job, &inputs).await,
        }
        .map_err(JobFailure::internal)?;
        // Shared queue: whichever instance claims the job makes it live there; here it
        // is followed through the store.
        if self.shared.as_ref().is_none() {
            self.live.make_live(&job);
        }
        Ok(job)
    }

    /// Put a stored queued job back in the queue (restart recovery).
    pub(super) async fn requeue(&self, job: &Job) -> Result<(), JobFailure> {
        self.live.make_live(job);
        self.queue.push(candidate(job)).await.map_err(JobFailure::internal)?;
        self.refresh_depth_metric().await;
        Ok(())
    }

    /// The next job for worker `name` (which has `loaded` models in memory).
    pub(super) async fn claim(&self, name: &str, loaded: Option<&str>) -> Result<Candidate, StoreError> {
        self.queue.claim(name, loaded).await
    }

    /// Give a claimed job back to the queue (its worker cannot run it).
    pub(super) async fn give_back(&self, claimed: Candidate) -> Result<usize, StoreError> {
        self.queue.push(claimed).await
    }

    /// A dispatch loop starts running a claimed job: one slot fewer is free.
    pub(super) fn started_running(&self) {
        lock(&self.slots).running += 1;
    }

    /// A dispatch loop's job took `took` to run: the estimate learns it, the slot is free.
    pub(super) fn finished_running(&self, took: Duration) {
        self.observe_duration(took);
        lock(&self.slots).running -= 1;
    }

    pub(super) fn observe_duration(&self, d: Duration) {
        lock(&self.estimate).observe(d);
    }

    /// Take a job out of the queue; whether it was there (then it never ran here).
    pub(super) async fn take_from_queue(&self, id: Uuid) -> bool {
        let taken = match self.queue.remove(id).await {
            Ok(taken) => taken,
            Err(e) => {
                tracing::warn!(job_id = %id, error = %e, "taking a job out of the queue failed");
                false
            }
        };
        self.refresh_depth_metric().await;
        taken
    }

    /// The job with its live queue position (none unless it is queued).
    pub(super) async fn with_position(&self, mut job: Job) -> Job {
        job.queue_position = if job.status == JobStatus::Queued { self.queue.position(job.id).await.ok().flatten().map(|p| p as u32) } else { None };
        job
    }
}
