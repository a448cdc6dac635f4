//! [`JobService`]: the lifecycle of every job, behind one facade. The service is made of
//! parts, each built complete in its own file by [`JobService::from_parts`] and never set
//! later; its methods (the API `http/`, `app/`, warm-up, webhooks and tests call) hand
//! each call to the part that does it:
//!
//! | part | file | does |
//! |---|---|---|
//! | [`LiveJobs`] | `live.rs` | the jobs this instance holds (per-job channels) and every committed transition |
//! | [`Admission`] | `admission.rs` | store then queue a job, or `QueueFull`; the queue, slots and Retry-After |
//! | [`Control`] | `control.rs` | get, list, subscribe, wait, cancel |
//! | [`Dispatch`] | `dispatch.rs` | the loops that claim for each worker; warm-up's run on one worker |
//! | [`Runner`] | `runner.rs` | one job against ComfyUI, to its committed end |
//! | [`Recovery`] | `recovery.rs` | restart recovery and the retention sweep |
//! | [`LeaseKeeper`] | `lease.rs` | the shared queue's leases, fence and lost jobs |
//! | [`Assets`] | `assets.rs` | the asset API |
//! | [`ReferencedFiles`] | `references.rs` | files a request names by reference |
//! | [`Readiness`] | `readiness.rs` | readiness, health, the dry run's preflight |
//!
//! The parts share state only by `Arc` and only where named in their fields: the store,
//! the blob store, the workers, and [`LiveJobs`] (which every part that makes a job live,
//! runs, signals or reads it needs). No part holds the service: spawned loops hold their
//! own part, so nothing refers back to the facade.
//!
//! Owns: the parts, and the handles of the tasks they spawn (dispatch loops, the sweeper,
//! the lease keeper), stopped by [`JobService::shutdown`].
//! Must never: hold a lock across an await, lose an accepted job (a job is in the store
//! before it is in the queue), know about HTTP, or decide anything a part decides.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use flowhost_comfy::ComfyBackend;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio::time::Instant as TokioInstant;
use uuid::Uuid;

use super::admission::Admission;
use super::assets::{AssetContent, AssetError, Assets, CreatedAsset};
use super::blobs::{BlobError, BlobStore, StreamedPut, hash_of};
use super::control::Control;
use super::dispatch::Dispatch;
use super::failure::JobFailure;
use super::lease::LeaseKeeper;
use super::live::LiveJobs;
use super::lock;
use super::model::{Asset, Job, JobEvent, ModelFileSpec};
use super::pool::WorkerPool;
use super::queue::{LocalQueue, WorkQueue};
use super::readiness::{HealthReport, Readiness};
use super::recovery::{Recovery, RecoveryReport};
use super::references::{ReferencedFiles, References};
use super::runner::Runner;
use super::shared_queue::PgQueue;
use super::store::{IdempotencyClaim, JobFilter, JobStore, SweepReport};
use super::tenant::Viewer;
use crate::events::Analytics;
use crate::metrics::Metrics;
use crate::models::ModelVolume;
use crate::models::cache::{ModelCache, Pinned};
use crate::plugins::{FileRef, LoadedPlugin, ModelFetch, PluginJob, PluginRegistry};

pub use super::admission::{NewUpload, Submission};
pub use super::config::{JobConfig, SpeedRouting};
pub use super::live::TransitionMessages;

/// The job service. One per process; cheap to share (`Arc`). Every field is set once, in
/// [`JobService::from_parts`]; none is visible outside this file.
pub struct JobService {
    store: Arc<dyn JobStore>,
    blobs: Arc<dyn BlobStore>,
    pool: Arc<WorkerPool>,
    config: JobConfig,
    live: Arc<LiveJobs>,
    admission: Arc<Admission>,
    control: Arc<Control>,
    dispatch: Arc<Dispatch>,
    runner: Arc<Runner>,
    recovery: Arc<Recovery>,
    leases: Arc<LeaseKeeper>,
    assets: Arc<Assets>,
    references: Arc<ReferencedFiles>,
    readiness: Readiness,
    /// Dispatch loops, the sweeper and the lease keeper, stopped by [`JobService::shutdown`].
    tasks: Mutex<Vec<JoinHandle<()>>>,
    pub metrics: Metrics,
    pub analytics: Analytics,
}

/// Where queued jobs wait.
pub enum Queue {
    /// This process's memory, dispatched by the config's rule.
    Local,
    /// The PostgreSQL queue every instance claims from (issue #12): a job is live here only
    /// while this instance runs it, and leases and cancels go through the database.
    Shared(Arc<PgQueue>),
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

    /// A service from its parts: each part built here, complete, in the order they need
    /// each other (no part needs one built after it).
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
        let pool = Arc::new(pool);
        let live = Arc::new(LiveJobs::new(store.clone(), messages, metrics.clone(), analytics.clone()));
        let admission = Arc::new(Admission::new(
            &config,
            pool.workers().len(),
            store.clone(),
            blobs.clone(),
            queue,
            shared.clone(),
            live.clone(),
            metrics.clone(),
        ));
        let control = Arc::new(Control::new(store.clone(), admission.clone(), live.clone(), shared.clone(), config.job_timeout));
        let assets = Arc::new(Assets::new(store.clone(), blobs.clone(), config.retention));
        let references = Arc::new(ReferencedFiles::new(references, store.clone(), blobs.clone(), assets.clone()));
        let runner = Arc::new(Runner::new(
            &config,
            store.clone(),
            blobs.clone(),
            live.clone(),
            references.clone(),
            registry,
            shared.is_some(),
            metrics.clone(),
            analytics.clone(),
        ));
        let dispatch = Arc::new(Dispatch::new(
            &config,
            store.clone(),
            pool.clone(),
            admission.clone(),
            runner.clone(),
            live.clone(),
            shared,
            metrics.clone(),
        ));
        let recovery = Arc::new(Recovery::new(
            &config,
            store.clone(),
            blobs.clone(),
            pool.clone(),
            admission.clone(),
            live.clone(),
            runner.clone(),
            metrics.clone(),
        ));
        let leases = Arc::new(LeaseKeeper::new(store.clone(), live.clone(), control.clone(), metrics.clone()));
        let readiness = Readiness::new(pool.clone(), models);
        Arc::new(JobService {
            store,
            blobs,
            pool,
            config,
            live,
            admission,
            control,
            dispatch,
            runner,
            recovery,
            leases,
            assets,
            references,
            readiness,
            tasks: Mutex::new(Vec::new()),
            metrics,
            analytics,
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

    pub fn config(&self) -> &JobConfig {
        &self.config
    }

    pub fn store(&self) -> &Arc<dyn JobStore> {
        &self.store
    }

    pub fn blobs(&self) -> &Arc<dyn BlobStore> {
        &self.blobs
    }

    // ----- tasks -----

    /// Start the dispatch loops, `max_in_flight` per worker (after [`JobService::recover`]).
    /// Without any worker, one loop fails what it claims (`comfyui_unavailable`).
    pub fn start_workers(self: &Arc<Self>) {
        let loops = self.dispatch.spawn_loops();
        lock(&self.tasks).extend(loops);
    }

    /// Sweep now and then, forever (spawned by the server).
    pub fn start_sweeper(self: &Arc<Self>) {
        let task = self.recovery.spawn_sweeper();
        lock(&self.tasks).push(task);
    }

    /// Start keeping this instance's leases (the shared queue only). See [`super::lease`].
    pub fn start_lease_keeper(self: &Arc<Self>, queue: Arc<PgQueue>) {
        let tasks = self.leases.spawn(queue);
        lock(&self.tasks).extend(tasks);
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
        self.admission.retry_after().await
    }

    /// Jobs waiting for a slot now.
    pub async fn queue_depth(&self) -> usize {
        self.admission.queue_depth().await
    }

    /// Admit a job: store it (with its input bytes) and queue it. `QueueFull` when
    /// the queue is at its depth and no slot is free.
    pub async fn submit(&self, submission: Submission) -> Result<Job, JobFailure> {
        self.admission.submit(submission).await
    }

    /// Extra `extra_data` for one job's prompt that is forwarded to ComfyUI and never
    /// persisted (set before [`JobService::submit`] with the job's preassigned id).
    pub fn set_transient_extra_data(&self, id: Uuid, extra: serde_json::Map<String, serde_json::Value>) {
        self.runner.set_transient_extra_data(id, extra);
    }

    /// Run a job on one given ComfyUI now, outside the queue, and return it terminal.
    /// For warm-up: see [`Dispatch::run_on`].
    pub async fn run_on(&self, submission: Submission, backend: &Arc<ComfyBackend>) -> Result<Job, JobFailure> {
        let id = self.dispatch.run_on(submission, backend).await?;
        match self.control.get(id).await? {
            Some(job) => Ok(job),
            None => Err(JobFailure::internal(format!("job {id} vanished"))),
        }
    }

    // ----- reading, waiting, cancel -----

    /// A job as now (live queue position filled in).
    pub async fn get(&self, id: Uuid) -> Result<Option<Job>, JobFailure> {
        self.control.get(id).await
    }

    /// Jobs newest first.
    pub async fn list(&self, filter: &JobFilter) -> Result<Vec<Job>, JobFailure> {
        self.control.list(filter).await
    }

    /// The job as now and a receiver of its events from now on. A terminal job's
    /// receiver is closed at once (nothing more will happen). `None`: no such job.
    pub async fn subscribe(&self, id: Uuid) -> Result<Option<(Job, broadcast::Receiver<JobEvent>)>, JobFailure> {
        self.control.subscribe(id).await
    }

    /// Wait until the job is terminal and return it. `deadline`: give up waiting
    /// then (a job still queued at its deadline is failed `Timeout`; one running is
    /// bounded by its own deadline).
    pub async fn wait(&self, id: Uuid, deadline: Option<Instant>) -> Result<Job, JobFailure> {
        self.control.wait(id, deadline).await
    }

    /// The newest preview of a running job (`JobEvent::Preview`), if it sent one.
    pub fn latest_preview(&self, id: Uuid) -> Option<JobEvent> {
        self.live.latest_preview(id)
    }

    /// Cancel: idempotent. Queued → canceled at once; running → canceling, then
    /// interrupted in ComfyUI → canceled; terminal → as is. `None`: no such job.
    /// See [`Control::cancel`].
    pub async fn cancel(&self, id: Uuid) -> Result<Option<Job>, JobFailure> {
        self.control.cancel(id).await
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

    // ----- recovery and retention -----

    /// Requeue queued jobs; reconcile jobs that were running (in the background,
    /// once ComfyUI answers). Call before listening and before `start_workers`.
    pub async fn recover(self: &Arc<Self>) -> Result<RecoveryReport, JobFailure> {
        self.recovery.recover().await
    }

    /// Expire what is past retention at `now`, then every unreferenced blob. See
    /// [`Recovery::sweep_at`].
    pub async fn sweep_at(&self, now: SystemTime) -> Result<(SweepReport, usize), JobFailure> {
        self.recovery.sweep_at(now).await
    }

    // ----- assets -----

    /// Store an upload's bytes as they arrive (hashed on the way, never held whole).
    /// `expected_hash`, when given, must match or nothing is kept. The record is made by
    /// [`JobService::record_upload`] once the rest of the form is read.
    pub async fn store_upload(&self, chunks: futures::stream::BoxStream<'_, Result<bytes::Bytes, BlobError>>, expected_hash: Option<&str>) -> Result<StreamedPut, AssetError> {
        self.assets.store_upload(chunks, expected_hash).await
    }

    /// The record of stored upload bytes, owned by `tenant`.
    pub async fn record_upload(&self, put: &StreamedPut, name: Option<String>, content_type: &str, tenant: Option<String>) -> Result<CreatedAsset, AssetError> {
        self.assets.record_upload(put, name, content_type, tenant).await
    }

    /// A new asset over bytes the server already has (v2 `from-hash`).
    pub async fn asset_from_hash(&self, hash: &str, name: Option<String>, content_type: Option<&str>, viewer: &Viewer, tenant: Option<String>) -> Result<CreatedAsset, AssetError> {
        self.assets.asset_from_hash(hash, name, content_type, viewer, tenant).await
    }

    /// The asset a file name refers to (the newest live upload of that name `viewer` may read).
    pub async fn upload_named(&self, name: &str, viewer: &Viewer) -> Result<Option<Asset>, AssetError> {
        self.assets.upload_named(name, viewer).await
    }

    /// An upload record over `hash` that `from-hash` with the same `hash` and `file_path`
    /// would duplicate. See [`Assets::identical_reference`].
    pub async fn identical_reference(&self, hash: &str, name: Option<&str>, viewer: &Viewer) -> Result<Option<Asset>, AssetError> {
        self.assets.identical_reference(hash, name, viewer).await
    }

    /// Whether bytes with this hash are stored under an asset the viewer sees.
    pub async fn asset_exists_by_hash(&self, hash: &str, viewer: &Viewer) -> Result<bool, AssetError> {
        self.assets.asset_exists_by_hash(hash, viewer).await
    }

    /// An asset's record, when the viewer sees it.
    pub async fn get_asset(&self, id: Uuid, viewer: &Viewer) -> Result<Asset, AssetError> {
        self.assets.get_asset(id, viewer).await
    }

    /// An asset's bytes as a stream: all, or `range = (start, end_inclusive)` clamped to
    /// the size.
    pub async fn open_asset(&self, asset: Asset, range: Option<(u64, Option<u64>)>) -> Result<AssetContent, AssetError> {
        self.assets.open_asset(asset, range).await
    }

    /// A presigned URL the asset's bytes can be fetched from directly, when the blob
    /// store hands those out; `None`: stream them through.
    pub async fn asset_download_url(&self, asset: &Asset) -> Result<Option<String>, AssetError> {
        self.assets.asset_download_url(asset).await
    }

    /// Remove an asset record (the blob goes at the next sweep if unreferenced).
    pub async fn delete_asset(&self, id: Uuid) -> Result<(), AssetError> {
        self.assets.delete_asset(id).await
    }

    /// Uploaded assets, newest first.
    pub async fn list_assets(&self, limit: usize, offset: usize) -> Result<Vec<Asset>, AssetError> {
        self.assets.list_assets(limit, offset).await
    }

    // ----- files named by reference -----

    pub fn references(&self) -> Option<&References> {
        self.references.references()
    }

    /// The model cache, when the server has one.
    pub fn model_cache(&self) -> Option<&ModelCache> {
        self.references.model_cache()
    }

    /// Fetch (or find in the cache) the job's model files, each pinned until the returned
    /// values are dropped, before `deadline`.
    pub async fn place_models(&self, fetches: &[ModelFetch], viewer: &Viewer, deadline: TokioInstant) -> Result<Vec<(ModelFileSpec, Pinned)>, JobFailure> {
        self.references.place_models(fetches, viewer, deadline).await
    }

    /// An image named by reference: an asset's bytes, or a URL fetched through the guard,
    /// at most `max_bytes`, before `deadline`.
    pub async fn fetch_image(&self, field: &str, file: &FileRef, viewer: &Viewer, max_bytes: u64, deadline: TokioInstant) -> Result<Vec<u8>, JobFailure> {
        self.references.fetch_image(field, file, viewer, max_bytes, deadline).await
    }

    // ----- readiness -----

    /// For `?dry_run=true`: what ComfyUI's validation would say of the built graph.
    pub async fn dry_run_preflight(&self, job: &PluginJob) -> serde_json::Value {
        self.readiness.dry_run_preflight(job).await
    }

    /// Checked before the plugin builds a job that will run, so the caller hears
    /// the real reason first. See [`Readiness::check_ready`].
    #[allow(clippy::result_large_err)] // JobFailure is the service's one failure type
    pub fn check_ready(&self, plugin: &LoadedPlugin) -> Result<(), JobFailure> {
        self.readiness.check_ready(plugin)
    }

    /// `/health`: ComfyUI's state and per-endpoint readiness.
    pub async fn health(&self, plugins: &[Arc<LoadedPlugin>]) -> HealthReport {
        self.readiness.health(plugins).await
    }
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
    use crate::jobs::model::{JobSource, JobSpec, JobStatus};

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
        svc.admission.observe_duration(Duration::from_secs(10));
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
        svc.admission.observe_duration(Duration::from_secs(60));
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
