//! Durable jobs: every generation — a sync typed request, an async typed request,
//! a Comfy API v2 submission — is a [`Job`], stored ([`store`], SQLite by default),
//! admitted and queued in flowhost ([`service`], a facade over its parts: [`admission`],
//! [`dispatch`], [`control`], [`live`]), run against ComfyUI ([`runner`]), its outputs
//! kept as content-addressed [`Asset`]s ([`blobs`], [`assets`]), recovered after a
//! restart and expired by retention ([`recovery`]). Failures are domain values
//! ([`JobFailure`]); `http/` maps them to problem+json or the v2 envelope once.
//! Nothing here imports axum or `crate::http`.
//!
//! # The API the HTTP surfaces call (all on `Arc<JobService>`, `state.jobs`)
//!
//! | call | what |
//! |---|---|
//! | `submit(Submission) -> Result<Job, JobFailure>` | admit a job (`QueueFull { retry_after_s }` when full); returns it `queued` |
//! | `get(id) -> Result<Option<Job>, _>` | a job as now (queue position live) |
//! | `list(&JobFilter) -> Result<Vec<Job>, _>` | newest first; status filter, limit, `created_before` cursor |
//! | `wait(id, deadline) -> Result<Job, _>` | until terminal |
//! | `subscribe(id) -> Result<Option<(Job, broadcast::Receiver<JobEvent>)>, _>` | snapshot + `Status`/`Progress`/`Preview`/`Output` events; closed at once for a terminal job |
//! | `cancel(id) -> Result<Option<Job>, _>` | idempotent: queued → canceled, running → canceling → canceled, terminal as is |
//! | `claim_idempotency_key(scope, key, fingerprint, job_id)` / `release_idempotency_key` | `Claimed` or `Existing { fingerprint, job_id }`; keys live 24 h |
//! | `JobService::fingerprint(&[&[u8]])` | hash of what makes two requests the same |
//! | `store_upload(stream, expected_hash)` then `record_upload(put, name, content_type, tenant)` | → `CreatedAsset { asset, created_new }`, `AssetError::HashMismatch` |
//! | `asset_from_hash(hash, name, content_type, viewer, tenant)` / `asset_exists_by_hash(hash, viewer)` | dedup fast path (`BlobNotFound`, `InvalidHash`) |
//! | `get_asset(id, viewer)` / `open_asset(asset, Some((start, Some(end_inclusive))))` (a stream) / `delete_asset(id)` / `list_assets(limit, offset)` | records and (ranged) bytes; `RangeNotSatisfiable { size }` |
//! | `check_ready(&plugin)`, `health(..)`, `retry_after().await`, `queue_depth().await` | readiness, health, queue state |
//! | `pool()` / `backend()` | the ComfyUI workers / the one that speaks for them (first serving) |
//! | `place_models(&fetches, viewer, deadline)` / `fetch_image(field, &file, viewer, max, deadline)` | files a request names by reference ([`references`]): model files into the model cache, pinned (→ `spec.model_files`), images by URL or asset; `JobFailure::Fetch { field, reason }` |
//!
//! Where jobs wait: [`queue::WorkQueue`] (in memory: [`queue::LocalQueue`]); which one a
//! free worker takes: [`affinity::pick`] (oldest of its loaded model set, unless a job
//! waited past the bound). A job's model set is `spec.model_key` (declared by the plugin,
//! else read off the graph's loader nodes at admission).
//! | `sweep_at(now)` | retention sweep now (tests) |
//!
//! A v2 submission builds `Submission { id, source: JobSource::Api, spec, uploads: vec![], build_ms: None }`
//! with `spec = JobSpec { caller_nodes: <every node id>, encoding: OutputEncoding::Original, .. JobSpec::new(graph) }`;
//! a `core/ASSET` reference becomes a `spec.uploads` entry (`UploadSpec { node_id, input_name, filename, hash }`)
//! naming the asset's blob: the runner uploads it into the job's ComfyUI folder and writes the name in.

pub mod admission;
pub mod affinity;
pub mod assets;
pub mod blobs;
pub mod blobs_s3;
pub mod config;
pub mod control;
pub mod dispatch;
pub mod failure;
pub mod follow;
pub mod inputs;
pub mod labels;
pub mod lease;
pub mod live;
pub mod model;
pub mod outbox;
pub mod pool;
pub mod progress;
pub mod queue;
pub mod readiness;
pub mod recovery;
pub mod references;
pub mod runner;
pub mod service;
pub mod shared_queue;
pub mod store;
pub mod store_pg;
pub mod subscription;
pub mod tenant;
pub mod view;

pub use assets::{AssetError, CreatedAsset};
pub use failure::JobFailure;
pub use affinity::{Candidate, DispatchPolicy, DispatchRule};
pub use pool::{ComfyWorker, WorkerPool};
pub use queue::{LocalQueue, WorkQueue};
pub use model::{Asset, AssetRole, Job, JobEvent, JobMetrics, JobSource, JobSpec, JobStatus, ModelFileSpec, OutputEncoding, Progress, StoredSource, UploadSpec};
pub use readiness::{HealthReport, plugin_needs};
pub use service::{
    CancelOnDrop, JobConfig, JobService, JobServiceParts, NewUpload, Queue, SpeedRouting,
    Submission, TransitionMessages,
};
pub use store::{IdempotencyClaim, JobFilter, JobStore, SqliteStore};
pub use store_pg::PostgresStore;
pub use tenant::Viewer;

/// The old name of the service (one release).
pub type JobRunner = JobService;

/// A mutex's guard, poisoned or not: the data behind this room's mutexes (live channels,
/// slots, queues) stays consistent across a panicking holder, and a poisoned lock must not
/// take the whole job service down.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
