//! What durable state a `flowhost serve` stands on (issue #12): the embedded default
//! (SQLite and a blob folder under `--state-dir`, one instance) or the shared setup
//! (PostgreSQL via `--database-url` and an S3-compatible bucket via `--blob-store`),
//! with which many instances behind one URL serve the same jobs and outputs.
//!
//! Owns: the serve flags for that choice and opening the stores. Must never: log a
//! database URL or credentials (both carry secrets), or decide anything about jobs.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::jobs::blobs::{BlobStore, FsBlobStore};
use crate::jobs::blobs_s3::{S3BlobStore, S3Location, S3Options};
use crate::jobs::store::JobStore;
use crate::jobs::{PostgresStore, SqliteStore};
use crate::webhooks::outbox::{OutboxStore, PgOutbox, SqliteOutbox};

/// `serve` flags for shared state.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct BackingArgs {
    /// PostgreSQL job store shared by every instance (`postgres://user:pass@host:5432/db`).
    /// Default: SQLite under --state-dir (jobs end with this machine's disk).
    #[arg(long, env = "FLOWHOST_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// S3-compatible bucket for outputs and uploads (`s3://bucket/prefix`), credentials
    /// from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, endpoint from AWS_ENDPOINT_URL
    /// (R2, MinIO), region from AWS_REGION. Default: a folder under --state-dir.
    #[arg(long, env = "FLOWHOST_BLOB_STORE")]
    pub blob_store: Option<String>,
    /// Path-style bucket requests (endpoint/bucket/key), as MinIO needs. Default true.
    #[arg(long, env = "FLOWHOST_S3_PATH_STYLE")]
    pub s3_path_style: Option<bool>,
    /// Asset downloads answer 302 to a presigned bucket URL instead of streaming the
    /// bytes through flowhost (with --blob-store only).
    #[arg(long, env = "FLOWHOST_BLOB_PRESIGN", requires = "blob_store")]
    pub blob_presign: bool,
    /// How long a presigned download URL stays valid, seconds.
    #[arg(long, env = "FLOWHOST_BLOB_PRESIGN_SECONDS", default_value_t = 300)]
    pub blob_presign_seconds: u64,
    /// With --database-url: how long an instance holds a job it runs without renewing
    /// (it renews several times a lease). A job whose instance died is re-queued once
    /// after this, then failed `worker_lost`.
    #[arg(long, env = "FLOWHOST_LEASE_SECONDS", default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub lease_seconds: u64,
    /// With --database-url: the most PostgreSQL connections this instance opens (its
    /// share of the server's `max_connections`: N instances open up to N × this).
    #[arg(long, env = "FLOWHOST_DATABASE_MAX_CONNECTIONS", default_value_t = 16, value_parser = clap::value_parser!(u32).range(2..=1000))]
    pub database_max_connections: u32,
    /// Where queued jobs wait: `shared` (rows of the PostgreSQL store that every instance
    /// claims from; the default with --database-url) or `local` (this process's memory;
    /// the default otherwise, and the only choice without --database-url).
    #[arg(long, env = "FLOWHOST_WORK_QUEUE", value_enum)]
    pub work_queue: Option<WorkQueueKind>,
}

/// `--work-queue`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WorkQueueKind {
    Local,
    Shared,
}

impl BackingArgs {
    /// The queue these flags choose; `shared` needs the PostgreSQL store.
    pub fn work_queue(&self) -> Result<WorkQueueKind> {
        let has_database = self.database_url.as_deref().is_some_and(|u| !u.is_empty());
        match (self.work_queue, has_database) {
            (Some(WorkQueueKind::Shared), false) => anyhow::bail!("--work-queue shared needs --database-url (the queue is rows of the shared job store)"),
            (Some(kind), _) => Ok(kind),
            (None, true) => Ok(WorkQueueKind::Shared),
            (None, false) => Ok(WorkQueueKind::Local),
        }
    }
}

/// The opened stores.
pub struct Backing {
    pub store: Arc<dyn JobStore>,
    pub blobs: Arc<dyn BlobStore>,
    pub outbox: Arc<dyn OutboxStore>,
    /// The PostgreSQL pool and this instance's lease name when the store is shared
    /// (the shared work queue uses them).
    pub pg: Option<(sqlx::PgPool, String)>,
}

/// Open what `args` names, the embedded defaults under `state_dir` otherwise.
pub async fn open(args: &BackingArgs, state_dir: &Path) -> Result<Backing> {
    let (store, outbox, pg): (Arc<dyn JobStore>, Arc<dyn OutboxStore>, Option<(sqlx::PgPool, String)>) = match args.database_url.as_deref().filter(|u| !u.is_empty()) {
        Some(url) => {
            let store = PostgresStore::open_with(url, args.database_max_connections).await.map_err(|e| anyhow::anyhow!("opening the PostgreSQL job store: {e}"))?;
            let pool = store.pool();
            tracing::info!("job store: PostgreSQL (shared)");
            let owner = store.instance_id().to_string();
            (Arc::new(store), Arc::new(PgOutbox::new(pool.clone())), Some((pool, owner)))
        }
        None => {
            let store = SqliteStore::open(&state_dir.join("jobs.db")).await.with_context(|| format!("opening the job store in {}", state_dir.display()))?;
            let outbox = SqliteOutbox::new(store.pool());
            (Arc::new(store), Arc::new(outbox), None)
        }
    };
    let blobs: Arc<dyn BlobStore> = match args.blob_store.as_deref().filter(|b| !b.is_empty()) {
        Some(value) => {
            let location = S3Location::parse(value).map_err(|e| anyhow::anyhow!("--blob-store: {e}"))?;
            let options = S3Options {
                path_style: args.s3_path_style,
                presign_for: args.blob_presign.then(|| Duration::from_secs(args.blob_presign_seconds.clamp(1, 7 * 24 * 3600))),
            };
            tracing::info!(bucket = %location.bucket, "blob store: S3-compatible bucket");
            let s3 = S3BlobStore::from_env(&location, &options).map_err(|e| anyhow::anyhow!("--blob-store: {e}"))?;
            s3.verify_bucket().await.map_err(|e| anyhow::anyhow!("--blob-store: bucket {:?}: {e}", location.bucket))?;
            Arc::new(s3)
        }
        None => Arc::new(FsBlobStore::new(state_dir.join("blobs")).with_context(|| format!("opening the blob store in {}", state_dir.display()))?),
    };
    Ok(Backing { store, blobs, outbox, pg })
}

