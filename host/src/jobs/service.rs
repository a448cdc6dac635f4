//! [`JobService`]: the lifecycle of every job. Admission (bounded depth, `QueueFull`
//! with a Retry-After estimated from recent durations), dispatch loops that claim from
//! the [`WorkQueue`] for their ComfyUI worker (`max_in_flight` per worker, by model
//! affinity: [`super::affinity`]), status transitions (stored first, then published to
//! subscribers), cancel, waiting, and the per-job event channels. Running one job
//! against ComfyUI is in `runner.rs`; restart recovery and retention in `recovery.rs`;
//! assets in `assets.rs`; the workers in `pool.rs`.
//!
//! Must never: hold a lock across an await, lose an accepted job (a job is in the
//! store before it is in the queue), or know about HTTP.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use flowhost_comfy::{BackendHealth, ComfyBackend};
use tokio::sync::{broadcast, watch};
use uuid::Uuid;

use super::affinity::{Candidate, DispatchRule};
use super::blobs::{BlobStore, hash_of};
use super::failure::{JobFailure, RunPhase};
use super::model::{Asset, AssetRole, Job, JobEvent, JobSource, JobSpec, JobStatus, UploadSpec};
use super::pool::{ComfyWorker, Dispatch, WorkerPool};
use super::queue::{LocalQueue, WorkQueue};
use super::store::{IdempotencyClaim, JobFilter, JobStore, StoreError};
use crate::events::Analytics;
use crate::metrics::Metrics;
use crate::models::ModelVolume;
use crate::plugins::PluginRegistry;

/// Settings of the job service.
#[derive(Debug, Clone)]
pub struct JobConfig {
    /// Prompts in each ComfyUI worker at once (dispatch loops per worker).
    pub max_in_flight: usize,
    /// Jobs waiting beyond the running ones; a full queue refuses with `QueueFull`.
    pub queue_depth: usize,
    /// Per-job deadline: execution (uploads to the last output byte) always; for a sync
    /// typed request also its wait in the queue (admission to the last byte).
    pub job_timeout: Duration,
    pub jpeg_quality: u8,
    /// Ask for JPEG outputs as raw pixels (`--output-transport auto`; used only when
    /// ComfyUI lists the node).
    pub raster_outputs: bool,
    /// The inputs volume for path-valued image fields.
    pub inputs: Option<PathBuf>,
    /// How long jobs and their assets are kept after creation.
    pub retention: Duration,
    /// Which queued job a free worker takes (`--dispatch`, `--affinity-wait-bound`).
    pub dispatch: DispatchRule,
    /// The speed profile's graph transform (`--comfyui-profile speed`): applied to every
    /// job's graph before preflight and submit, on the routes it names. `None`: graphs go as built.
    pub speed: Option<SpeedRouting>,
}

/// Where the speed profile's graph transform applies.
#[derive(Debug, Clone, PartialEq)]
pub struct SpeedRouting {
    pub graph: flowhost_comfy::SpeedGraph,
    /// Routes (`/flux-dev`) whose jobs get it; empty: every route.
    pub routes: Vec<String>,
}

impl SpeedRouting {
    /// The transform for a job of `route` (`None` for a job without one, e.g. `/api/v2`
    /// prompts, only when routes are named).
    pub fn for_route(&self, route: Option<&str>) -> Option<&flowhost_comfy::SpeedGraph> {
        let on = self.routes.is_empty() || route.is_some_and(|r| self.routes.iter().any(|x| x == r));
        on.then_some(&self.graph)
    }
}

impl Default for JobConfig {
    fn default() -> Self {
        JobConfig { max_in_flight: 5, queue_depth: 100, job_timeout: Duration::from_secs(120), jpeg_quality: 90, raster_outputs: true, inputs: None, retention: Duration::from_secs(24 * 3600), dispatch: DispatchRule::default(), speed: None }
    }
}

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

/// Per-job channels while a job is not terminal.
pub(super) struct Live {
    pub snapshot: watch::Sender<Job>,
    pub events: broadcast::Sender<JobEvent>,
    pub cancel: watch::Sender<bool>,
    /// Set by the lease keeper when this instance may no longer hold the job (its lease
    /// could not be renewed by the local deadline, or another instance holds it): the
    /// runner interrupts the prompt and records nothing unless it had already finished.
    pub fence: watch::Sender<bool>,
    /// The newest preview (the v2 stream pushes it on connect; never stored).
    pub latest_preview: Option<JobEvent>,
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

/// The job service. One per process; cheap to share (`Arc`).
pub struct JobService {
    pub(super) store: Arc<dyn JobStore>,
    pub(super) blobs: Arc<dyn BlobStore>,
    pub(super) pool: WorkerPool,
    pub(super) config: JobConfig,
    pub(super) models: Option<Arc<ModelVolume>>,
    /// The plugin registry, for `explain-failure` on jobs whose plugin is still loaded.
    pub(super) plugins: Option<Arc<PluginRegistry>>,
    queue: Arc<dyn WorkQueue>,
    /// The shared queue's leases and cancel requests (issue #12), when instances share
    /// one: then a job is live here only while this instance runs it.
    pub(super) shared: Option<Arc<super::shared_queue::PgQueue>>,
    slots: Mutex<Slots>,
    pub(super) live: Mutex<HashMap<Uuid, Live>>,
    estimate: Mutex<DurationEstimate>,
    /// Per-prompt `extra_data` that must never be stored (v2's `api_key_comfy_org`): held in
    /// memory for the job's run only, so a restart loses it (the job then runs without it).
    transient_extra: Mutex<HashMap<Uuid, serde_json::Map<String, serde_json::Value>>>,
    /// Jobs followed through the store while another instance runs them.
    follow: super::follow::Follow,
    /// Dispatch workers and the sweeper, stopped by [`JobService::shutdown`].
    pub(super) tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    pub metrics: Metrics,
    pub analytics: Analytics,
    /// Webhooks (issue #14).
    pub(super) transition_messages: Option<Arc<dyn TransitionMessages>>,
    /// Fetching files named by reference: the guarded fetcher and the model cache (issue #24).
    pub(super) references: Option<References>,
}

/// The service's fetching side: the guarded fetcher (images by URL) and the model cache
/// (models by reference; `None`: the server runs without `--model-cache`).
#[derive(Debug, Clone)]
pub struct References {
    pub fetcher: crate::net::fetch::Fetcher,
    pub cache: Option<crate::models::cache::ModelCache>,
    /// Counts refused destinations of image fetches (the cache counts its own).
    pub stats: Arc<crate::models::cache::CacheStats>,
    /// Refreshes the model volume on a miss (`--models-refresh-url`).
    pub volume_refresh: Option<Arc<crate::models::refresh::VolumeRefresh>>,
}

/// Where queued jobs wait.
pub enum Queue {
    /// This process's memory, dispatched by the config's rule.
    Local,
    /// The PostgreSQL queue every instance claims from (issue #12): a job is live here only
    /// while this instance runs it, and leases and cancels go through the database.
    Shared(Arc<super::shared_queue::PgQueue>),
}

/// Everything a [`JobService`] is made of, each part complete before the service exists
/// (no part is set later: what the service holds at its first job it holds to its last).
pub struct JobServiceParts {
    pub store: Arc<dyn JobStore>,
    pub blobs: Arc<dyn BlobStore>,
    pub pool: WorkerPool,
    pub queue: Queue,
    pub config: JobConfig,
    pub models: Option<Arc<ModelVolume>>,
    /// For `explain-failure` on a failed job whose plugin is loaded.
    pub registry: Option<Arc<PluginRegistry>>,
    /// Who makes a state change's webhook messages (none: no webhooks).
    pub messages: Option<Arc<dyn TransitionMessages>>,
    /// The guarded fetcher and the model cache for files named by reference (none: a
    /// reference is refused as unsupported here).
    pub references: Option<References>,
    pub metrics: Metrics,
    pub analytics: Analytics,
}

pub(super) use super::lock;

/// Makes the outbox messages (webhooks) a job's state change sends; they are stored in the
/// same transaction as the change. Given at construction ([`JobServiceParts::messages`]).
pub trait TransitionMessages: Send + Sync {
    /// The messages for `job`'s new state (empty for most states).
    fn messages_for(&self, job: &Job) -> Vec<crate::jobs::outbox::NewDelivery>;
    /// Messages were committed: deliver them.
    fn committed(&self);
}

/// Subscribers may lag; a progress burst must not block the runner.
const EVENT_BUFFER: usize = 64;

impl JobService {
    /// A service with one ComfyUI (or none), the in-memory queue, no registry and no
    /// webhooks (tests and tools).
    pub fn new(
        store: Arc<dyn JobStore>,
        blobs: Arc<dyn BlobStore>,
        backend: Option<Arc<ComfyBackend>>,
        config: JobConfig,
        models: Option<Arc<ModelVolume>>,
        metrics: Metrics,
        analytics: Analytics,
    ) -> Arc<JobService> {
        let pool = WorkerPool::new(backend.into_iter().map(|b| (b, None)).collect());
        Self::from_parts(JobServiceParts {
            store,
            blobs,
            pool,
            queue: Queue::Local,
            config,
            models,
            registry: None,
            messages: None,
            references: None,
            metrics,
            analytics,
        })
    }

    /// A service from its parts.
    pub fn from_parts(parts: JobServiceParts) -> Arc<JobService> {
        let JobServiceParts {
            store,
            blobs,
            pool,
            queue,
            config,
            models,
            registry,
            messages,
            references,
            metrics,
            analytics,
        } = parts;
        let (queue, shared): (Arc<dyn WorkQueue>, _) = match queue {
            Queue::Local => (Arc::new(LocalQueue::new(config.dispatch)), None),
            Queue::Shared(queue) => (queue.clone(), Some(queue)),
        };
        let follow = super::follow::Follow::new(store.clone());
        Arc::new(JobService {
            store,
            blobs,
            pool,
            config,
            models,
            plugins: registry,
            queue,
            shared,
            slots: Mutex::new(Slots::default()),
            live: Mutex::new(HashMap::new()),
            estimate: Mutex::new(DurationEstimate { ewma_ms: None }),
            transient_extra: Mutex::new(HashMap::new()),
            follow,
            tasks: Mutex::new(Vec::new()),
            metrics,
            analytics,
            transition_messages: messages,
            references,
        })
    }

    /// The ComfyUI that speaks for the pool (validation, catalogue, overall health):
    /// the first serving worker. See [`WorkerPool::primary`].
    pub fn backend(&self) -> Option<&Arc<ComfyBackend>> {
        self.pool.primary()
    }

    /// The ComfyUI workers.
    pub fn pool(&self) -> &WorkerPool {
        &self.pool
    }

    /// Every prompt slot of this process: `max_in_flight` per worker.
    fn total_slots(&self) -> usize {
        self.config.max_in_flight.max(1) * self.pool.workers().len().max(1)
    }

    pub fn config(&self) -> &JobConfig {
        &self.config
    }

    pub fn store(&self) -> &Arc<dyn JobStore> {
        &self.store
    }

    pub fn blobs(&self) -> &Arc<dyn BlobStore> {
        &self.blobs
    }

    /// Start the dispatch loops, `max_in_flight` per worker (after [`JobService::recover`]).
    /// Without any worker, one loop fails what it claims (`comfyui_unavailable`).
    pub fn start_workers(self: &Arc<Self>) {
        let workers: Vec<Option<Arc<ComfyWorker>>> = if self.pool.is_empty() { vec![None] } else { self.pool.workers().iter().cloned().map(Some).collect() };
        for worker in workers {
            for _ in 0..self.config.max_in_flight.max(1) {
                let this = self.clone();
                let worker = worker.clone();
                let task = tokio::spawn(async move { this.dispatch_loop(worker).await });
                lock(&self.tasks).push(task);
            }
        }
    }

    /// Stop dispatching (the process is stopping). Jobs keep their stored state:
    /// queued ones stay queued and running ones are reconciled at the next start.
    pub fn shutdown(&self) {
        for task in lock(&self.tasks).drain(..) {
            task.abort();
        }
    }

    // ----- admission -----

    /// Seconds until a slot is likely free: recent execution time × jobs ahead per slot.
    pub async fn retry_after(&self) -> u64 {
        let depth = self.queue.depth().await.unwrap_or(0);
        let waiting = depth + lock(&self.slots).admitting;
        self.retry_after_for(waiting)
    }

    fn retry_after_for(&self, waiting: usize) -> u64 {
        let slots = self.total_slots() as f64;
        let per_job_ms = lock(&self.estimate).ewma_ms.unwrap_or(5_000.0);
        let secs = per_job_ms * (waiting as f64 + 1.0) / slots / 1000.0;
        secs.ceil().clamp(1.0, 3600.0) as u64
    }

    /// Jobs waiting for a slot now.
    pub async fn queue_depth(&self) -> usize {
        self.queue.depth().await.unwrap_or(0)
    }

    /// Admit a job: store it (with its input bytes) and queue it. `QueueFull` when
    /// the queue is at its depth and no slot is free.
    pub async fn submit(&self, submission: Submission) -> Result<Job, JobFailure> {
        let depth = self.queue.depth().await.map_err(JobFailure::internal)?;
        {
            let mut slots = lock(&self.slots);
            let free_slots = self.total_slots().saturating_sub(slots.running);
            let waiting = depth + slots.admitting;
            if waiting >= self.config.queue_depth + free_slots {
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

    async fn refresh_depth_metric(&self) {
        if let Ok(depth) = self.queue.depth().await {
            self.metrics.set_queue_depth(depth);
        }
    }

    /// Store a new job (its uploads to blobs first). `pinned_until`: already leased by
    /// this instance until then (see [`JobStore::insert_pinned_job`]).
    async fn admit(&self, submission: Submission, pinned_until: Option<SystemTime>) -> Result<Job, JobFailure> {
        let Submission { id, source, mut spec, uploads, build_ms } = submission;
        let mut job = Job::new(source, JobSpec::new(Default::default()), self.config.retention);
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
            self.make_live(&job);
        }
        Ok(job)
    }

    pub(super) fn make_live(&self, job: &Job) {
        let (snapshot, _) = watch::channel(job.clone());
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let (cancel, _) = watch::channel(false);
        let (fence, _) = watch::channel(false);
        lock(&self.live).insert(job.id, Live { snapshot, events, cancel, fence, latest_preview: None });
    }

    /// Put a stored queued job back in the queue (restart recovery).
    pub(super) async fn requeue(&self, job: &Job) -> Result<(), JobFailure> {
        self.make_live(job);
        self.queue.push(candidate(job)).await.map_err(JobFailure::internal)?;
        self.refresh_depth_metric().await;
        Ok(())
    }

    /// Extra `extra_data` for one job's prompt that is forwarded to ComfyUI and never
    /// persisted (set before [`JobService::submit`] with the job's preassigned id).
    pub fn set_transient_extra_data(&self, id: Uuid, extra: serde_json::Map<String, serde_json::Value>) {
        lock(&self.transient_extra).insert(id, extra);
    }

    pub(super) fn take_transient_extra_data(&self, id: Uuid) -> Option<serde_json::Map<String, serde_json::Value>> {
        lock(&self.transient_extra).remove(&id)
    }

    // ----- reading -----

    /// A job as now (live queue position filled in).
    pub async fn get(&self, id: Uuid) -> Result<Option<Job>, JobFailure> {
        let job = self.store.get_job(id).await.map_err(JobFailure::internal)?;
        match job {
            Some(j) => Ok(Some(self.with_position(j).await)),
            None => Ok(None),
        }
    }

    /// Jobs newest first.
    pub async fn list(&self, filter: &JobFilter) -> Result<Vec<Job>, JobFailure> {
        let jobs = self.store.list_jobs(filter).await.map_err(JobFailure::internal)?;
        let mut out = Vec::with_capacity(jobs.len());
        for job in jobs {
            out.push(self.with_position(job).await);
        }
        Ok(out)
    }

    async fn with_position(&self, mut job: Job) -> Job {
        job.queue_position = if job.status == JobStatus::Queued { self.queue.position(job.id).await.ok().flatten().map(|p| p as u32) } else { None };
        job
    }

    /// The job as now and a receiver of its events from now on. A terminal job's
    /// receiver is closed at once (nothing more will happen). `None`: no such job.
    pub async fn subscribe(&self, id: Uuid) -> Result<Option<(Job, broadcast::Receiver<JobEvent>)>, JobFailure> {
        let live = {
            let live = lock(&self.live);
            live.get(&id).map(|l| (l.snapshot.borrow().clone(), l.events.subscribe()))
        };
        if let Some((job, rx)) = live {
            // The store has the outputs committed so far.
            let stored = self.store.get_job(id).await.map_err(JobFailure::internal)?;
            let mut job = stored.filter(|s| s.status == job.status).unwrap_or(job);
            if job.progress.is_none() {
                job.progress = lock(&self.live).get(&id).and_then(|l| l.snapshot.borrow().progress.clone());
            }
            return Ok(Some((self.with_position(job).await, rx)));
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
    pub async fn wait(&self, id: Uuid, deadline: Option<Instant>) -> Result<Job, JobFailure> {
        let rx = lock(&self.live).get(&id).map(|l| l.snapshot.subscribe());
        if let Some(mut rx) = rx {
            let waited = async { rx.wait_for(|j| j.status.is_terminal()).await.map(|j| j.clone()).ok() };
            let outcome = match deadline {
                Some(at) => match tokio::time::timeout_at(at.into(), waited).await {
                    Ok(done) => done,
                    Err(_) => {
                        self.time_out_if_queued(id).await;
                        let rx = lock(&self.live).get(&id).map(|l| l.snapshot.subscribe());
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

    // ----- transitions -----

    /// Store the job, then tell subscribers. Terminal: the live entry goes.
    pub(super) async fn commit(&self, job: &Job) -> Result<(), JobFailure> {
        self.commit_typed(job).await.map_err(JobFailure::internal)
    }

    /// [`JobService::commit`] with the store's refusal as it is. A refused write (the job
    /// ended already, or another instance holds it) is not this instance's to report any
    /// more: its live entry goes (nothing here will end it), and it is not an error to log.
    pub(super) async fn commit_typed(&self, job: &Job) -> Result<(), StoreError> {
        let hook = self.transition_messages.as_ref();
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

    pub(super) fn publish(&self, job: &Job) {
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
    pub fn latest_preview(&self, id: Uuid) -> Option<JobEvent> {
        lock(&self.live).get(&id).and_then(|l| l.latest_preview.clone())
    }

    pub(super) fn cancel_requested(&self, id: Uuid) -> Option<watch::Receiver<bool>> {
        lock(&self.live).get(&id).map(|l| l.cancel.subscribe())
    }

    /// The runner's two stop signals: the cancel a caller asked for, and the fence the
    /// lease keeper raises when this instance may no longer hold the job.
    pub(super) fn signals(&self, id: Uuid) -> Option<(watch::Receiver<bool>, watch::Receiver<bool>)> {
        lock(&self.live).get(&id).map(|l| (l.cancel.subscribe(), l.fence.subscribe()))
    }

    pub(super) fn is_fenced(&self, id: Uuid) -> bool {
        lock(&self.live).get(&id).is_some_and(|l| *l.fence.borrow())
    }

    /// Raise the fence of a job this instance runs (see [`JobService::signals`]).
    pub(super) fn fence(&self, id: Uuid, why: &str) {
        if let Some(live) = lock(&self.live).get(&id)
            && !live.fence.send_replace(true)
        {
            tracing::warn!(job_id = %id, why, "stopping a job this instance may no longer hold");
        }
    }

    pub(super) fn observe_duration(&self, d: Duration) {
        lock(&self.estimate).observe(d);
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

    async fn time_out_if_queued(&self, id: Uuid) {
        if self.take_from_queue(id).await {
            if let Ok(Some(job)) = self.store.get_job(id).await {
                let waited = job.created_at.elapsed().unwrap_or_default().as_millis() as u64;
                let (_, limit) = super::failure::job_limit(
                    self.config.job_timeout,
                    job.created_at,
                    job.spec.deadline,
                );
                let _ = self
                    .finish_unrun(
                        job,
                        JobStatus::Failed,
                        Some(JobFailure::Timeout {
                            prompt_id: None,
                            waited_ms: waited,
                            phase: Some(RunPhase::Queue),
                            limit: Some(limit),
                        }),
                    )
                    .await;
            }
        }
    }

    /// Cancel: idempotent. Queued → canceled at once; running → canceling, then
    /// interrupted in ComfyUI → canceled; terminal → as is. `None`: no such job.
    /// A job another instance runs gets the cancel flag its holder's lease renewal reads
    /// (docs/operations.md). The `canceling` write is guarded in SQL: it never lands on a
    /// job that ended meanwhile (a cancel racing the end of a job leaves the end).
    pub async fn cancel(&self, id: Uuid) -> Result<Option<Job>, JobFailure> {
        if self.take_from_queue(id).await {
            let Some(job) = self.store.get_job(id).await.map_err(JobFailure::internal)? else { return Ok(None) };
            return self.finish_unrun(job, JobStatus::Canceled, None).await.map(Some);
        }
        let Some(mut job) = self.get(id).await? else { return Ok(None) };
        if job.status.is_terminal() {
            return Ok(Some(job));
        }
        if self.shared.as_ref().is_some() && !lock(&self.live).contains_key(&id) {
            return self.request_cancel_elsewhere(job).await.map(Some);
        }
        match job.status {
            JobStatus::Running => {
                job.status = JobStatus::Canceling;
                match self.commit_typed(&job).await {
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
                if let Some(l) = lock(&self.live).get(&id) {
                    l.cancel.send_replace(true);
                }
                Ok(Some(job))
            }
            // Canceling: asked already. Queued but out of the queue: claimed here and
            // about to start; the runner reads the signal as it starts.
            JobStatus::Canceling | JobStatus::Queued => {
                if let Some(l) = lock(&self.live).get(&id) {
                    l.cancel.send_replace(true);
                }
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

    // ----- idempotency -----

    /// Claim an idempotency key for a new job id. See [`JobStore::claim_idempotency_key`].
    pub async fn claim_idempotency_key(&self, scope: &str, key: &str, fingerprint: &str, job_id: Uuid) -> Result<IdempotencyClaim, JobFailure> {
        let expires = SystemTime::now() + Duration::from_secs(24 * 3600);
        self.store.claim_idempotency_key(scope, key, fingerprint, job_id, expires).await.map_err(JobFailure::internal)
    }

    /// Free a key whose submission failed without creating a job.
    pub async fn release_idempotency_key(&self, scope: &str, key: &str) -> Result<(), JobFailure> {
        self.store.release_idempotency_key(scope, key).await.map_err(JobFailure::internal)
    }

    /// The fingerprint of a request for idempotency: a hash of what makes it the same request.
    pub fn fingerprint(parts: &[&[u8]]) -> String {
        let mut all = Vec::new();
        for part in parts {
            all.extend_from_slice(&(part.len() as u64).to_le_bytes());
            all.extend_from_slice(part);
        }
        hash_of(&all)
    }

    // ----- dispatch -----

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
            let claimed = match self.queue.claim(&name, loaded.as_deref()).await {
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
                if let Err(e) = self.queue.push(claimed).await {
                    tracing::error!(worker = %name, error = %e, "giving a job back to the queue failed; it is requeued at the next start");
                }
                continue;
            }
            lock(&self.slots).running += 1;
            self.refresh_depth_metric().await;
            let started = Instant::now();
            self.run_job(claimed, worker.as_ref()).await;
            self.observe_duration(started.elapsed());
            lock(&self.slots).running -= 1;
        }
    }

    /// Run a job on one given ComfyUI now, outside the queue, and return it terminal.
    /// For warm-up: its point is that *this* worker's GPU holds the weights, and through
    /// the queue any worker (or, with a shared queue, any instance) could take the job.
    /// The job is stored and followed like any other; it takes no queue place (with a
    /// shared queue it is stored leased to this instance).
    pub async fn run_on(&self, submission: Submission, backend: &Arc<ComfyBackend>) -> Result<Job, JobFailure> {
        // With a shared queue every instance may claim a stored queued job: this one is
        // stored already leased by this instance (its lease keeper renews it), so no other
        // instance can take it and warm the wrong GPU.
        let pinned_until = self
            .shared
            .as_ref()
            .map(|queue| SystemTime::now() + queue.lease());
        let job = self.admit(submission, pinned_until).await?;
        let id = job.id;
        if !lock(&self.live).contains_key(&id) {
            self.make_live(&job);
        }
        if let Some(worker) = self.pool.workers().iter().find(|w| Arc::ptr_eq(&w.backend, backend)) {
            let dispatch = worker.dispatched(job.spec.model_key.as_deref(), job.spec.model_label.as_deref());
            self.metrics.worker_dispatch(&worker.name, dispatch == Dispatch::Switch);
        }
        self.execute(job, Some(backend.clone())).await;
        match self.get(id).await? {
            Some(job) => Ok(job),
            None => Err(JobFailure::internal(format!("job {id} vanished"))),
        }
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
        if self.shared.as_ref().is_some() && lock(&self.live).contains_key(&id) {
            tracing::warn!(job_id = %id, "claimed a job this instance still runs; leaving it");
            return;
        }
        if !lock(&self.live).contains_key(&id) {
            self.make_live(&job);
        }
        if let Some(deadline) = job.spec.deadline
            && SystemTime::now() >= deadline
        {
            let waited = job.created_at.elapsed().unwrap_or_default().as_millis() as u64;
            let (_, limit) = super::failure::job_limit(
                self.config.job_timeout,
                job.created_at,
                job.spec.deadline,
            );
            let _ = self
                .finish_unrun(
                    job,
                    JobStatus::Failed,
                    Some(JobFailure::Timeout {
                        prompt_id: None,
                        waited_ms: waited,
                        phase: Some(RunPhase::Queue),
                        limit: Some(limit),
                    }),
                )
                .await;
            return;
        }
        if let Some(worker) = worker
            && let BackendHealth::Down { reason } = worker.backend.health()
        {
            let failure = JobFailure::ComfyUnavailable { detail: reason, retry_after_s: super::failure::RETRY_AFTER_DOWN };
            let _ = self.finish_unrun(job, JobStatus::Failed, Some(failure)).await;
            return;
        }
        self.metrics.observe_dispatch_wait(job.source.route_label(), job.created_at.elapsed().unwrap_or_default());
        if let Some(worker) = worker {
            let dispatch = worker.dispatched(job.spec.model_key.as_deref(), job.spec.model_label.as_deref());
            self.metrics.worker_dispatch(&worker.name, dispatch == Dispatch::Switch);
            tracing::debug!(job_id = %id, worker = %worker.name, switch = dispatch == Dispatch::Switch, "dispatched");
        }
        self.execute(job, worker.map(|w| w.backend.clone())).await;
    }
}

/// A stored job as the queue holds it: id, model key, age (its creation: a requeued
/// job keeps its place).
pub(super) fn candidate(job: &Job) -> Candidate {
    Candidate { id: job.id, model_key: job.spec.model_key.clone(), queued_at: job.created_at }
}

/// Cancels a sync request's job if the request goes away before it finished
/// (the client disconnected): nobody would read its result.
pub struct CancelOnDrop {
    service: Option<Arc<JobService>>,
    id: Uuid,
}

impl CancelOnDrop {
    pub fn new(service: Arc<JobService>, id: Uuid) -> Self {
        CancelOnDrop { service: Some(service), id }
    }
    pub fn disarm(mut self) {
        self.service = None;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(service) = self.service.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let id = self.id;
            tracing::info!(job_id = %id, "caller went away; canceling the job");
            runtime.spawn(async move {
                if let Err(e) = service.cancel(id).await {
                    tracing::warn!(job_id = %id, error = %e, "canceling an abandoned job failed");
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_speed_transform_applies_to_the_named_routes_or_to_all() {
        let graph = flowhost_comfy::SpeedGraph { compile: true, step_cache: None };
        let all = SpeedRouting { graph, routes: vec![] };
        assert!(all.for_route(Some("/flux-dev")).is_some() && all.for_route(None).is_some());
        let some = SpeedRouting { graph, routes: vec!["/flux-dev".into()] };
        assert!(some.for_route(Some("/flux-dev")).is_some());
        assert!(some.for_route(Some("/flux-lora")).is_none());
        assert!(some.for_route(None).is_none(), "v2 prompts have no route");
    }
    use crate::jobs::blobs::FsBlobStore;
    use crate::jobs::store::SqliteStore;

    async fn service(dir: &std::path::Path, config: JobConfig) -> Arc<JobService> {
        let store = SqliteStore::open(&dir.join("jobs.db")).await.unwrap();
        let blobs = FsBlobStore::new(dir.join("blobs")).unwrap();
        let analytics = Analytics::disabled();
        JobService::new(Arc::new(store), Arc::new(blobs), None, config, None, Metrics::new(analytics.clone()), analytics)
    }

    fn submission() -> Submission {
        let mut graph = serde_json::Map::new();
        graph.insert("1".into(), serde_json::json!({"class_type": "EmptyImage", "inputs": {}}));
        Submission { id: None, source: JobSource::Api, spec: JobSpec::new(graph), uploads: Vec::new(), build_ms: None }
    }

    #[tokio::test]
    async fn queue_depth_obeyed_and_violated_with_a_retry_after_from_recent_durations() {
        let dir = tempfile::tempdir().unwrap();
        // No workers: nothing leaves the queue.
        let svc = service(dir.path(), JobConfig { max_in_flight: 2, queue_depth: 1, ..JobConfig::default() }).await;
        svc.observe_duration(Duration::from_secs(10));
        assert_eq!(svc.retry_after().await, 5, "one job of 10 s ahead, shared by 2 slots");
        for _ in 0..3 {
            svc.submit(submission()).await.expect("two free slots + depth 1");
        }
        match svc.submit(submission()).await {
            Err(JobFailure::QueueFull { retry_after_s, depth }) => {
                assert_eq!(depth, 3);
                assert_eq!(retry_after_s, 20, "(3 waiting + 1) × 10 s / 2 slots");
            }
            other => panic!("expected QueueFull, got {other:?}"),
        }
        svc.observe_duration(Duration::from_secs(60));
        assert!(svc.retry_after().await > 20, "longer recent jobs, longer wait");
    }

    #[tokio::test]
    async fn a_queued_job_is_canceled_at_once_and_leaves_the_queue() {
        let dir = tempfile::tempdir().unwrap();
        let svc = service(dir.path(), JobConfig::default()).await;
        let job = svc.submit(submission()).await.unwrap();
        assert_eq!(job.queue_position, Some(0));
        let (snapshot, mut events) = svc.subscribe(job.id).await.unwrap().unwrap();
        assert_eq!(snapshot.status, JobStatus::Queued);
        let canceled = svc.cancel(job.id).await.unwrap().unwrap();
        assert_eq!(canceled.status, JobStatus::Canceled);
        assert_eq!(svc.queue_depth().await, 0);
        match events.recv().await {
            Ok(JobEvent::Status(j)) => assert_eq!(j.status, JobStatus::Canceled),
            other => panic!("expected the status event, got {other:?}"),
        }
        assert!(events.recv().await.is_err(), "the stream ends after the terminal status");
        let stored = svc.get(job.id).await.unwrap().unwrap();
        assert_eq!(stored.status, JobStatus::Canceled);
        assert_eq!(svc.cancel(job.id).await.unwrap().unwrap().status, JobStatus::Canceled, "idempotent");
        assert!(svc.cancel(Uuid::new_v4()).await.unwrap().is_none());
        assert_eq!(svc.wait(job.id, None).await.unwrap().status, JobStatus::Canceled);
    }
}
