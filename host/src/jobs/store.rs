//! The durable record of jobs, assets and idempotency keys behind one trait,
//! [`JobStore`], with SQLite ([`SqliteStore`], WAL, versioned migrations) as the
//! embedded default and PostgreSQL ([`super::store_pg::PostgresStore`]) for many
//! instances sharing one store. One implementation serves both ([`sql_job_store!`]):
//! plain tables, `$N` placeholders, `ON CONFLICT … DO NOTHING`, integer milliseconds
//! for times, JSON text for the job document.
//!
//! Owns: rows and their consistency. Must never: hold bytes (that is the
//! [`super::blobs::BlobStore`]), know about ComfyUI, or decide HTTP anything.

use std::borrow::Cow;
use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use uuid::Uuid;

use super::model::{Asset, AssetRole, Job, JobStatus, from_ms};

/// A store failure. The two refusals of a fenced write are variants of their own (the
/// caller acts on them: an instance that lost a job stops reporting it; a write after
/// the end is dropped), never compared as text.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed, is unreachable, full or corrupt (the message says which).
    #[error("job store: {0}")]
    Database(String),
    /// The write was refused: this instance does not hold the job's lease (another
    /// instance took it over, or it was put back in the queue).
    #[error("job store: another instance holds this job's lease")]
    LeaseLost,
    /// The write was refused: the job already ended (a terminal state is final).
    #[error("job store: the job has already ended")]
    Ended,
}

/// [`StoreError::Database`] from a message (the constructor most call sites want).
#[allow(non_snake_case)]
pub fn StoreError(message: String) -> StoreError {
    StoreError::Database(message)
}

impl StoreError {
    pub fn is_lease_lost(&self) -> bool {
        matches!(self, StoreError::LeaseLost)
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        StoreError::Database(e.to_string())
    }
}
impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        StoreError::Database(e.to_string())
    }
}
impl From<serde_json::Error> for StoreError {
    fn from(e: serde_json::Error) -> Self {
        StoreError::Database(format!("unreadable record: {e}"))
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// What listing jobs selects. Newest first.
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    pub statuses: Vec<JobStatus>,
    /// At most this many (capped at 1000).
    pub limit: usize,
    /// Only jobs listed after this in newest-first order (cursor pagination): created
    /// strictly before it, or, with `before_id`, in the same millisecond with a smaller id.
    pub created_before: Option<SystemTime>,
    /// Only jobs carrying every one of these `(key, value)` labels.
    pub labels: Vec<(String, String)>,
    /// The id half of the cursor (jobs share milliseconds: a time alone skips some).
    pub before_id: Option<Uuid>,
    /// Only this tenant's jobs (a user key); `None`: everyone's (an admin key, or no keys).
    pub tenant: Option<String>,
}

/// The answer to claiming an idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdempotencyClaim {
    /// The key was free: it now names `job_id` (the one proposed).
    Claimed,
    /// The key was taken: by this fingerprint, for this job.
    Existing { fingerprint: String, job_id: Uuid },
}

/// What a retention sweep removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Jobs whose records were removed (their ComfyUI-side files are gone already).
    pub jobs: Vec<Uuid>,
    /// Assets whose records were removed.
    pub assets: usize,
    /// Idempotency keys removed.
    pub keys: usize,
}

/// The durable store of jobs, assets and idempotency keys.
#[async_trait]
pub trait JobStore: Send + Sync {
    /// Insert a new job with the input assets it uses, atomically.
    async fn insert_job(&self, job: &Job, inputs: &[Asset]) -> StoreResult<()>;
    /// [`JobStore::insert_job`], the job already leased by this instance until
    /// `lease_until`: a job pinned to one of this instance's workers (warm-up). Inserted
    /// unleased, another instance sharing the queue could claim it in the round trip
    /// before this one took it, and warm the wrong GPU.
    async fn insert_pinned_job(&self, job: &Job, inputs: &[Asset], lease_until: SystemTime) -> StoreResult<()>;
    /// Rewrite a job's record (status, times, progress, error, metrics, prompt id, workflow).
    /// Outputs are assets: add them with [`JobStore::insert_asset`].
    async fn update_job(&self, job: &Job) -> StoreResult<()>;
    /// [`JobStore::update_job`] and enqueue webhook messages in one transaction: the
    /// state change and its messages commit together or not at all (issue #14).
    async fn update_job_with_messages(
        &self,
        job: &Job,
        messages: &[crate::jobs::outbox::NewDelivery],
    ) -> StoreResult<()>;
    /// A job with its output assets.
    async fn get_job(&self, id: Uuid) -> StoreResult<Option<Job>>;
    /// Jobs newest first.
    async fn list_jobs(&self, filter: &JobFilter) -> StoreResult<Vec<Job>>;
    /// Every job in one of `statuses`, oldest first (restart recovery).
    async fn jobs_with_status(&self, statuses: &[JobStatus]) -> StoreResult<Vec<Job>>;

    async fn insert_asset(&self, asset: &Asset) -> StoreResult<()>;
    /// An output of a running job, written only under the same fence as its state
    /// ([`JobStore::update_job`]): `LeaseLost`/`Ended` when this instance may not.
    async fn insert_output(&self, asset: &Asset) -> StoreResult<()>;
    async fn get_asset(&self, id: Uuid) -> StoreResult<Option<Asset>>;
    /// The newest asset record over this blob hash, if any.
    async fn asset_by_hash(&self, hash: &str, tenant: Option<&str>) -> StoreResult<Option<Asset>>;
    /// Removes the record; the blob goes when nothing references it (sweep).
    async fn delete_asset(&self, id: Uuid) -> StoreResult<bool>;
    /// Uploaded assets (role `upload`) whose `file_path` is `name`, newest first, at most
    /// `limit` (file-name references and `from-hash`'s identical-reference check).
    async fn uploads_named(&self, name: &str, limit: usize) -> StoreResult<Vec<Asset>>;
    /// Uploaded assets (role `upload`) newest first.
    async fn list_assets(&self, limit: usize, offset: usize) -> StoreResult<Vec<Asset>>;
    /// Input assets of one job (the images it uploads to ComfyUI).
    async fn job_inputs(&self, job_id: Uuid) -> StoreResult<Vec<Asset>>;
    /// Push an asset's retention deadline out to at least `until` (re-referenced content).
    async fn extend_asset(&self, id: Uuid, until: SystemTime) -> StoreResult<()>;

    /// Claim `key` in `scope` for `job_id` with the request's `fingerprint` unless a live
    /// claim exists. Serves both the typed routes' draft semantics (same fingerprint →
    /// same job) and v2's single use (any existing claim → refuse).
    async fn claim_idempotency_key(&self, scope: &str, key: &str, fingerprint: &str, job_id: Uuid, expires_at: SystemTime) -> StoreResult<IdempotencyClaim>;
    /// Free a key whose submission failed without creating a job.
    async fn release_idempotency_key(&self, scope: &str, key: &str) -> StoreResult<()>;

    /// Expire what is past its deadline at `now`: job records (and their assets),
    /// upload assets, idempotency keys. Jobs are returned for ComfyUI-side cleanup.
    async fn sweep_expired(&self, now: SystemTime) -> StoreResult<SweepReport>;
    /// Every blob hash some asset still references.
    async fn referenced_hashes(&self) -> StoreResult<HashSet<String>>;
    /// `sqlite` (this instance's disk) or `postgres` (shared by every instance).
    fn dialect(&self) -> &'static str;
}

/// The SQLite migrations, in order (`migrations/sqlite/`). Never edit a released one:
/// add the next, here and in [`super::store_pg::MIGRATIONS`] (the same version numbers
/// and meaning on both dialects).
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "jobs assets idempotency", include_str!("migrations/sqlite/0001_jobs.sql")),
    (2, "webhook outbox", include_str!("migrations/sqlite/0002_webhook_outbox.sql")),
    (3, "shared queue", include_str!("migrations/sqlite/0003_shared_queue.sql")),
    (5, "tenants", include_str!("migrations/sqlite/0005_tenants.sql")),
    (6, "job labels", include_str!("migrations/sqlite/0006_job_labels.sql")),
];

/// A [`sqlx::migrate::Migrator`] over `(version, description, sql)` triples (hand-built
/// rather than `migrate!` so the SQL is in the binary without compile-time macros).
pub(crate) fn migrator(migrations: &[(i64, &'static str, &'static str)]) -> sqlx::migrate::Migrator {
    sqlx::migrate::Migrator {
        migrations: Cow::Owned(
            migrations
                .iter()
                .map(|(version, description, sql)| {
                    sqlx::migrate::Migration::new(*version, Cow::Borrowed(*description), sqlx::migrate::MigrationType::Simple, Cow::Borrowed(*sql), false)
                })
                .collect(),
        ),
        ..sqlx::migrate::Migrator::DEFAULT
    }
}

/// SQLite in WAL mode under the state directory.
#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// This process's lease name (no SQLite job is ever leased: one process owns the file).
    owner: String,
}

impl SqliteStore {
    /// Open (creating if needed) `path` and bring its schema up to date.
    pub async fn open(path: &Path) -> StoreResult<SqliteStore> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| StoreError(format!("creating {}: {e}", parent.display())))?;
        }
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // WAL + NORMAL: a commit survives a process crash; an OS crash may lose the
            // last transactions, never corrupt the database.
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5));
        let pool = SqlitePoolOptions::new().max_connections(4).min_connections(1).connect_with(options).await?;
        migrator(MIGRATIONS).run(&pool).await?;
        Ok(SqliteStore { pool, owner: format!("sqlite-{}", Uuid::new_v4().simple()) })
    }

    /// The database pool, shared with the webhook outbox (same file, same transactions).
    pub fn pool(&self) -> SqlitePool {
        self.pool.clone()
    }
}

/// The job document: everything but the outputs (those are asset rows).
pub(crate) fn job_doc(job: &Job) -> StoreResult<String> {
    let mut doc = serde_json::to_value(job)?;
    if let Some(map) = doc.as_object_mut() {
        map.remove("outputs");
        map.remove("queue_position");
    }
    Ok(doc.to_string())
}

/// A job from its stored document (outputs empty: the caller adds the asset rows).
pub(crate) fn job_from_doc(doc: &str) -> StoreResult<Job> {
    let mut value: serde_json::Value = serde_json::from_str(doc)?;
    if let Some(map) = value.as_object_mut() {
        map.insert("outputs".into(), serde_json::Value::Array(Vec::new()));
        map.insert("queue_position".into(), serde_json::Value::Null);
    }
    Ok(serde_json::from_value(value)?)
}

/// The columns of an asset row, decoded the same way on every dialect.
pub(crate) struct AssetColumns {
    pub id: String,
    pub hash: String,
    pub size_bytes: i64,
    pub content_type: String,
    pub name: Option<String>,
    pub job_id: Option<String>,
    pub node_id: Option<String>,
    pub role: String,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub tenant: Option<String>,
}

impl AssetColumns {
    pub(crate) fn into_asset(self) -> StoreResult<Asset> {
        Ok(Asset {
            id: Uuid::parse_str(&self.id).map_err(|e| StoreError(format!("asset id {}: {e}", self.id)))?,
            hash: self.hash,
            size_bytes: self.size_bytes.max(0) as u64,
            content_type: self.content_type,
            name: self.name,
            job_id: self.job_id.and_then(|j| Uuid::parse_str(&j).ok()),
            node_id: self.node_id,
            role: AssetRole::parse(&self.role),
            created_at: from_ms(self.created_at),
            expires_at: self.expires_at.map(from_ms),
            tenant: self.tenant,
        })
    }
}

pub(crate) const ASSET_COLUMNS: &str = "id, hash, size_bytes, content_type, name, job_id, node_id, role, created_at, expires_at, tenant";

/// `$from, $from+1, …` (`count` numbered placeholders; both dialects read `$N`).
pub(crate) fn placeholders(from: usize, count: usize) -> String {
    (from..from + count).map(|n| format!("${n}")).collect::<Vec<_>>().join(", ")
}

/// The one implementation of [`JobStore`] over SQL, instantiated per dialect
/// (`sqlx::Sqlite` here, `sqlx::Postgres` in [`super::store_pg`]). The statements
/// are written once in the SQL both dialects accept: `$N` placeholders, integer
/// milliseconds, TEXT ids and documents, `ON CONFLICT … DO NOTHING`. A macro rather
/// than generics over `sqlx::Database`: the bounds those need (`Encode`/`Decode`/
/// `Type` for every bound type, `IntoArguments`, executor lifetimes) would be longer
/// than the statements. `$outbox_insert` enqueues webhook rows on the dialect's
/// connection inside the job's transaction.
macro_rules! sql_job_store {
    ($store:ty, $db:ty, $dialect:literal, $outbox_insert:path) => {
        const _: () = {
            use std::collections::HashSet;
            use std::time::SystemTime;

            use sqlx::Row;
            use uuid::Uuid;

            use $crate::jobs::model::{Asset, Job, JobStatus, to_ms};
            use $crate::jobs::store::{
                ASSET_COLUMNS, AssetColumns, IdempotencyClaim, JobFilter, JobStore, StoreError, StoreResult, SweepReport, job_doc, job_from_doc,
                placeholders,
            };

            type DbRow = <$db as sqlx::Database>::Row;

            fn job_from_row(row: &DbRow) -> StoreResult<Job> {
                let doc: String = row.try_get("doc")?;
                job_from_doc(&doc)
            }

            fn asset_from_row(row: &DbRow) -> StoreResult<Asset> {
                AssetColumns {
                    id: row.try_get("id")?,
                    hash: row.try_get("hash")?,
                    size_bytes: row.try_get("size_bytes")?,
                    content_type: row.try_get("content_type")?,
                    name: row.try_get("name")?,
                    job_id: row.try_get("job_id")?,
                    node_id: row.try_get("node_id")?,
                    role: row.try_get("role")?,
                    created_at: row.try_get("created_at")?,
                    expires_at: row.try_get("expires_at")?,
                    tenant: row.try_get("tenant")?,
                }
                .into_asset()
            }

            async fn insert_asset_on<'e, E: sqlx::Executor<'e, Database = $db>>(executor: E, asset: &Asset) -> StoreResult<()> {
                sqlx::query(&format!("INSERT INTO assets ({ASSET_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"))
                    .bind(asset.id.to_string())
                    .bind(asset.hash.clone())
                    .bind(asset.size_bytes as i64)
                    .bind(asset.content_type.clone())
                    .bind(asset.name.clone())
                    .bind(asset.job_id.map(|j| j.to_string()))
                    .bind(asset.node_id.clone())
                    .bind(asset.role.as_str().to_string())
                    .bind(to_ms(asset.created_at))
                    .bind(asset.expires_at.map(to_ms))
                    .bind(asset.tenant.clone())
                    .execute(executor)
                    .await?;
                Ok(())
            }

            /// Rewrite the job unless it already ended or this instance does not hold it.
            /// A terminal state is final: a late cancel (or a stale instance) can never
            /// write over `succeeded`/`canceled`. The lease fence (shared queue, issue
            /// #12): the write passes when this instance holds the lease, or when nobody
            /// ever claimed the job (`claims = 0`: the embedded store and the local queue,
            /// which never lease). A job claimed before and now unleased was put back in
            /// the queue or released after its end: its old holder's writes are refused.
            async fn fenced_update(tx: &mut sqlx::Transaction<'static, $db>, job: &Job, owner: &str) -> StoreResult<()> {
                let done = sqlx::query(
                    "UPDATE jobs SET status = $1, expires_at = $2, doc = $3 WHERE id = $4 \
                     AND status NOT IN ('succeeded', 'failed', 'canceled', 'expired') \
                     AND (lease_owner = $5 OR (lease_owner IS NULL AND claims = 0))",
                )
                .bind(job.status.as_str().to_string())
                .bind(to_ms(job.expires_at))
                .bind(job_doc(job)?)
                .bind(job.id.to_string())
                .bind(owner.to_string())
                .execute(&mut **tx)
                .await?;
                if done.rows_affected() == 0 {
                    refused(tx, job.id).await?;
                }
                Ok(())
            }

            /// Why a fenced write touched no row: `Ended` or `LeaseLost` (a job that is
            /// gone, swept, is nothing to write: `Ok`).
            async fn refused(tx: &mut sqlx::Transaction<'static, $db>, id: Uuid) -> StoreResult<()> {
                let row = sqlx::query("SELECT status FROM jobs WHERE id = $1").bind(id.to_string()).fetch_optional(&mut **tx).await?;
                match row {
                    None => Ok(()),
                    Some(row) => {
                        let status: String = row.try_get("status")?;
                        Err(if JobStatus::parse(&status).is_some_and(JobStatus::is_terminal) { StoreError::Ended } else { StoreError::LeaseLost })
                    }
                }
            }

            impl $store {
                /// Insert a job (and its inputs and labels) in one transaction; leased to
                /// this instance until `lease_until` (ms) when given, as a claim would.
                async fn insert_job_leased(&self, job: &Job, inputs: &[Asset], lease_until: Option<i64>) -> StoreResult<()> {
                    let mut tx = self.pool.begin().await?;
                    sqlx::query(
                        "INSERT INTO jobs (id, status, created_at, expires_at, doc, tenant, lease_owner, lease_until, claims) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                    )
                    .bind(job.id.to_string())
                    .bind(job.status.as_str().to_string())
                    .bind(to_ms(job.created_at))
                    .bind(to_ms(job.expires_at))
                    .bind(job_doc(job)?)
                    .bind(job.spec.tenant.clone())
                    .bind(lease_until.map(|_| self.owner.clone()))
                    .bind(lease_until)
                    .bind(if lease_until.is_some() { 1_i64 } else { 0_i64 })
                    .execute(&mut *tx)
                    .await?;
                    for asset in inputs {
                        insert_asset_on(&mut *tx, asset).await?;
                    }
                    for (key, value) in &job.spec.labels {
                        sqlx::query("INSERT INTO job_labels (job_id, key, value) VALUES ($1, $2, $3)")
                            .bind(job.id.to_string())
                            .bind(key.clone())
                            .bind(value.clone())
                            .execute(&mut *tx)
                            .await?;
                    }
                    tx.commit().await?;
                    Ok(())
                }

                async fn with_outputs(&self, mut job: Job) -> StoreResult<Job> {
                    let rows = sqlx::query(&format!("SELECT {ASSET_COLUMNS} FROM assets WHERE job_id = $1 AND role = 'output' ORDER BY seq"))
                        .bind(job.id.to_string())
                        .fetch_all(&self.pool)
                        .await?;
                    job.outputs = rows.iter().map(asset_from_row).collect::<StoreResult<_>>()?;
                    Ok(job)
                }

                async fn jobs_from_rows(&self, rows: &[DbRow]) -> StoreResult<Vec<Job>> {
                    let mut jobs = Vec::with_capacity(rows.len());
                    for row in rows {
                        jobs.push(self.with_outputs(job_from_row(row)?).await?);
                    }
                    Ok(jobs)
                }
            }

            #[async_trait::async_trait]
            impl JobStore for $store {
                async fn insert_job(&self, job: &Job, inputs: &[Asset]) -> StoreResult<()> {
                    self.insert_job_leased(job, inputs, None).await
                }

                async fn insert_pinned_job(&self, job: &Job, inputs: &[Asset], lease_until: SystemTime) -> StoreResult<()> {
                    self.insert_job_leased(job, inputs, Some(to_ms(lease_until))).await
                }

                async fn update_job(&self, job: &Job) -> StoreResult<()> {
                    let mut tx = self.pool.begin().await?;
                    fenced_update(&mut tx, job, &self.owner).await?;
                    tx.commit().await?;
                    Ok(())
                }

                async fn update_job_with_messages(&self, job: &Job, messages: &[$crate::jobs::outbox::NewDelivery]) -> StoreResult<()> {
                    let mut tx = self.pool.begin().await?;
                    fenced_update(&mut tx, job, &self.owner).await?;
                    $outbox_insert(&mut tx, messages).await.map_err(|e| StoreError(e.to_string()))?;
                    tx.commit().await?;
                    Ok(())
                }

                async fn get_job(&self, id: Uuid) -> StoreResult<Option<Job>> {
                    let row = sqlx::query("SELECT doc FROM jobs WHERE id = $1").bind(id.to_string()).fetch_optional(&self.pool).await?;
                    match row {
                        Some(row) => Ok(Some(self.with_outputs(job_from_row(&row)?).await?)),
                        None => Ok(None),
                    }
                }

                async fn list_jobs(&self, filter: &JobFilter) -> StoreResult<Vec<Job>> {
                    let mut sql = String::from("SELECT doc FROM jobs WHERE 1 = 1");
                    let mut next = 1;
                    if !filter.statuses.is_empty() {
                        sql.push_str(&format!(" AND status IN ({})", placeholders(next, filter.statuses.len())));
                        next += filter.statuses.len();
                    }
                    match (filter.created_before, filter.before_id) {
                        (Some(_), Some(_)) => {
                            sql.push_str(&format!(" AND (created_at < ${next} OR (created_at = ${next} AND id < ${}))", next + 1));
                            next += 2;
                        }
                        (Some(_), None) => {
                            sql.push_str(&format!(" AND created_at < ${next}"));
                            next += 1;
                        }
                        _ => {}
                    }
                    for _ in &filter.labels {
                        sql.push_str(&format!(" AND id IN (SELECT job_id FROM job_labels WHERE key = ${next} AND value = ${})", next + 1));
                        next += 2;
                    }
                    if filter.tenant.is_some() {
                        sql.push_str(&format!(" AND tenant = ${next}"));
                        next += 1;
                    }
                    sql.push_str(&format!(" ORDER BY created_at DESC, id DESC LIMIT ${next}"));
                    let mut query = sqlx::query(&sql);
                    for status in &filter.statuses {
                        query = query.bind(status.as_str().to_string());
                    }
                    if let Some(before) = filter.created_before {
                        query = query.bind(to_ms(before));
                        if let Some(id) = filter.before_id {
                            query = query.bind(id.to_string());
                        }
                    }
                    for (key, value) in &filter.labels {
                        query = query.bind(key.clone()).bind(value.clone());
                    }
                    if let Some(tenant) = &filter.tenant {
                        query = query.bind(tenant.clone());
                    }
                    let limit = if filter.limit == 0 { 100 } else { filter.limit.min(1000) };
                    let rows = query.bind(limit as i64).fetch_all(&self.pool).await?;
                    self.jobs_from_rows(&rows).await
                }

                async fn jobs_with_status(&self, statuses: &[JobStatus]) -> StoreResult<Vec<Job>> {
                    if statuses.is_empty() {
                        return Ok(Vec::new());
                    }
                    let sql = format!("SELECT doc FROM jobs WHERE status IN ({}) ORDER BY created_at ASC, id ASC", placeholders(1, statuses.len()));
                    let mut query = sqlx::query(&sql);
                    for status in statuses {
                        query = query.bind(status.as_str().to_string());
                    }
                    let rows = query.fetch_all(&self.pool).await?;
                    self.jobs_from_rows(&rows).await
                }

                async fn insert_asset(&self, asset: &Asset) -> StoreResult<()> {
                    insert_asset_on(&self.pool, asset).await
                }

                async fn insert_output(&self, asset: &Asset) -> StoreResult<()> {
                    let Some(job_id) = asset.job_id else { return insert_asset_on(&self.pool, asset).await };
                    let mut tx = self.pool.begin().await?;
                    // A no-op write under the job's fence locks the row and checks it in one.
                    let done = sqlx::query(
                        "UPDATE jobs SET status = status WHERE id = $1 AND status NOT IN ('succeeded', 'failed', 'canceled', 'expired') \
                         AND (lease_owner = $2 OR (lease_owner IS NULL AND claims = 0))",
                    )
                    .bind(job_id.to_string())
                    .bind(self.owner.clone())
                    .execute(&mut *tx)
                    .await?;
                    if done.rows_affected() == 0 {
                        refused(&mut tx, job_id).await?;
                        return Err(StoreError::LeaseLost);
                    }
                    insert_asset_on(&mut *tx, asset).await?;
                    tx.commit().await?;
                    Ok(())
                }

                async fn get_asset(&self, id: Uuid) -> StoreResult<Option<Asset>> {
                    let row = sqlx::query(&format!("SELECT {ASSET_COLUMNS} FROM assets WHERE id = $1")).bind(id.to_string()).fetch_optional(&self.pool).await?;
                    row.as_ref().map(asset_from_row).transpose()
                }

                async fn asset_by_hash(&self, hash: &str, tenant: Option<&str>) -> StoreResult<Option<Asset>> {
                    let only_tenant = if tenant.is_some() { " AND tenant = $2" } else { "" };
                    let sql = format!("SELECT {ASSET_COLUMNS} FROM assets WHERE hash = $1{only_tenant} ORDER BY seq DESC LIMIT 1");
                    let mut query = sqlx::query(&sql).bind(hash.to_string());
                    if let Some(tenant) = tenant {
                        query = query.bind(tenant.to_string());
                    }
                    let row = query.fetch_optional(&self.pool).await?;
                    row.as_ref().map(asset_from_row).transpose()
                }

                async fn delete_asset(&self, id: Uuid) -> StoreResult<bool> {
                    let done = sqlx::query("DELETE FROM assets WHERE id = $1").bind(id.to_string()).execute(&self.pool).await?;
                    Ok(done.rows_affected() > 0)
                }

                async fn uploads_named(&self, name: &str, limit: usize) -> StoreResult<Vec<Asset>> {
                    let rows = sqlx::query(&format!("SELECT {ASSET_COLUMNS} FROM assets WHERE role = 'upload' AND name = $1 ORDER BY seq DESC LIMIT $2"))
                        .bind(name.to_string())
                        .bind(limit.clamp(1, 1000) as i64)
                        .fetch_all(&self.pool)
                        .await?;
                    rows.iter().map(asset_from_row).collect()
                }

                async fn list_assets(&self, limit: usize, offset: usize) -> StoreResult<Vec<Asset>> {
                    let rows = sqlx::query(&format!("SELECT {ASSET_COLUMNS} FROM assets WHERE role = 'upload' ORDER BY seq DESC LIMIT $1 OFFSET $2"))
                        .bind(limit.clamp(1, 1000) as i64)
                        .bind(offset as i64)
                        .fetch_all(&self.pool)
                        .await?;
                    rows.iter().map(asset_from_row).collect()
                }

                async fn job_inputs(&self, job_id: Uuid) -> StoreResult<Vec<Asset>> {
                    let rows = sqlx::query(&format!("SELECT {ASSET_COLUMNS} FROM assets WHERE job_id = $1 AND role = 'input' ORDER BY seq"))
                        .bind(job_id.to_string())
                        .fetch_all(&self.pool)
                        .await?;
                    rows.iter().map(asset_from_row).collect()
                }

                async fn extend_asset(&self, id: Uuid, until: SystemTime) -> StoreResult<()> {
                    sqlx::query("UPDATE assets SET expires_at = $1 WHERE id = $2 AND expires_at IS NOT NULL AND expires_at < $1")
                        .bind(to_ms(until))
                        .bind(id.to_string())
                        .execute(&self.pool)
                        .await?;
                    Ok(())
                }

                async fn claim_idempotency_key(&self, scope: &str, key: &str, fingerprint: &str, job_id: Uuid, expires_at: SystemTime) -> StoreResult<IdempotencyClaim> {
                    let now = to_ms(SystemTime::now());
                    let mut tx = self.pool.begin().await?;
                    sqlx::query("DELETE FROM idempotency_keys WHERE scope = $1 AND key = $2 AND expires_at <= $3")
                        .bind(scope.to_string())
                        .bind(key.to_string())
                        .bind(now)
                        .execute(&mut *tx)
                        .await?;
                    // ON CONFLICT waits for a concurrent claimer of the same key to commit
                    // (PostgreSQL) or is serialised by the write lock (SQLite): one wins.
                    sqlx::query(
                        "INSERT INTO idempotency_keys (scope, key, fingerprint, job_id, created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6) \
                         ON CONFLICT (scope, key) DO NOTHING",
                    )
                    .bind(scope.to_string())
                    .bind(key.to_string())
                    .bind(fingerprint.to_string())
                    .bind(job_id.to_string())
                    .bind(now)
                    .bind(to_ms(expires_at))
                    .execute(&mut *tx)
                    .await?;
                    let row = sqlx::query("SELECT fingerprint, job_id FROM idempotency_keys WHERE scope = $1 AND key = $2")
                        .bind(scope.to_string())
                        .bind(key.to_string())
                        .fetch_one(&mut *tx)
                        .await?;
                    tx.commit().await?;
                    let existing_fp: String = row.try_get("fingerprint")?;
                    let existing_job: String = row.try_get("job_id")?;
                    let existing_job = Uuid::parse_str(&existing_job).map_err(|e| StoreError(format!("idempotency job id: {e}")))?;
                    if existing_job == job_id {
                        Ok(IdempotencyClaim::Claimed)
                    } else {
                        Ok(IdempotencyClaim::Existing { fingerprint: existing_fp, job_id: existing_job })
                    }
                }

                async fn release_idempotency_key(&self, scope: &str, key: &str) -> StoreResult<()> {
                    sqlx::query("DELETE FROM idempotency_keys WHERE scope = $1 AND key = $2")
                        .bind(scope.to_string())
                        .bind(key.to_string())
                        .execute(&self.pool)
                        .await?;
                    Ok(())
                }

                async fn sweep_expired(&self, now: SystemTime) -> StoreResult<SweepReport> {
                    let now = to_ms(now);
                    let mut tx = self.pool.begin().await?;
                    // Only terminal jobs are removed; a job still queued or running past its
                    // retention deadline is expired by the service first.
                    let rows = sqlx::query("SELECT id FROM jobs WHERE expires_at <= $1 AND status IN ('succeeded', 'failed', 'canceled', 'expired')")
                        .bind(now)
                        .fetch_all(&mut *tx)
                        .await?;
                    let mut jobs = Vec::with_capacity(rows.len());
                    let mut assets = 0usize;
                    for row in &rows {
                        let id: String = row.try_get("id")?;
                        let done = sqlx::query("DELETE FROM assets WHERE job_id = $1 AND role IN ('output', 'input')").bind(id.clone()).execute(&mut *tx).await?;
                        assets += done.rows_affected() as usize;
                        sqlx::query("DELETE FROM job_labels WHERE job_id = $1").bind(id.clone()).execute(&mut *tx).await?;
                        sqlx::query("DELETE FROM jobs WHERE id = $1").bind(id.clone()).execute(&mut *tx).await?;
                        if let Ok(uuid) = Uuid::parse_str(&id) {
                            jobs.push(uuid);
                        }
                    }
                    let done = sqlx::query("DELETE FROM assets WHERE role = 'upload' AND expires_at IS NOT NULL AND expires_at <= $1").bind(now).execute(&mut *tx).await?;
                    assets += done.rows_affected() as usize;
                    let keys = sqlx::query("DELETE FROM idempotency_keys WHERE expires_at <= $1").bind(now).execute(&mut *tx).await?.rows_affected() as usize;
                    tx.commit().await?;
                    if $dialect == "sqlite" {
                        // SQLite's automatic checkpoints copy the WAL back but never shrink it:
                        // after a burst it stays as large as the burst was. The sweep is the
                        // quiet moment to truncate it (the pages the deleted rows freed are
                        // reused by new rows, so the database file stays at its peak size).
                        // A busy checkpoint (a reader mid-transaction) is simply retried at the
                        // next sweep.
                        sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)").execute(&self.pool).await?;
                    }
                    Ok(SweepReport { jobs, assets, keys })
                }

                async fn referenced_hashes(&self) -> StoreResult<HashSet<String>> {
                    let rows = sqlx::query("SELECT DISTINCT hash FROM assets").fetch_all(&self.pool).await?;
                    rows.iter().map(|r| r.try_get::<String, _>("hash").map_err(StoreError::from)).collect()
                }

                fn dialect(&self) -> &'static str {
                    $dialect
                }
            }
        };
    };
}
pub(crate) use sql_job_store;

sql_job_store!(
    SqliteStore,
    sqlx::Sqlite,
    "sqlite",
    crate::jobs::outbox::insert_deliveries
);

// The store's tests run against both dialects: tests/tests/all/job_store.rs.
