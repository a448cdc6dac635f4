//! The durable record of jobs, assets and idempotency keys behind one trait,
//! [`JobStore`], with SQLite ([`SqliteStore`], WAL, versioned migrations) as the
//! embedded default. The scale-out work adds PostgreSQL behind the same trait, so
//! the SQL here stays portable: plain tables, `ON CONFLICT … DO NOTHING`, integer
//! milliseconds for times, JSON text for the job document.
//!
//! Owns: rows and their consistency. Must never: hold bytes (that is the
//! [`super::blobs::BlobStore`]), know about ComfyUI, or decide HTTP anything.

use std::borrow::Cow;
use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous};
use sqlx::{Row, SqlitePool};
use uuid::Uuid;

use super::model::{Asset, AssetRole, Job, JobStatus, from_ms, to_ms};

/// A store failure (the database is unreadable, full, or corrupt).
#[derive(Debug, thiserror::Error)]
#[error("job store: {0}")]
pub struct StoreError(pub String);

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        StoreError(e.to_string())
    }
}
impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        StoreError(e.to_string())
    }
}
impl From<serde_json::Error> for StoreError {
    fn from(e: serde_json::Error) -> Self {
        StoreError(format!("unreadable record: {e}"))
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// What listing jobs selects. Newest first.
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    pub statuses: Vec<JobStatus>,
    /// At most this many (capped at 1000).
    pub limit: usize,
    /// Only jobs created strictly before this (cursor pagination).
    pub created_before: Option<SystemTime>,
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
    /// Rewrite a job's record (status, times, progress, error, metrics, prompt id, workflow).
    /// Outputs are assets: add them with [`JobStore::insert_asset`].
    async fn update_job(&self, job: &Job) -> StoreResult<()>;
    /// [`JobStore::update_job`] and enqueue webhook messages in one transaction: the
    /// state change and its messages commit together or not at all (issue #14).
    async fn update_job_with_messages(&self, job: &Job, messages: &[crate::webhooks::outbox::NewDelivery]) -> StoreResult<()>;
    /// A job with its output assets.
    async fn get_job(&self, id: Uuid) -> StoreResult<Option<Job>>;
    /// Jobs newest first.
    async fn list_jobs(&self, filter: &JobFilter) -> StoreResult<Vec<Job>>;
    /// Every job in one of `statuses`, oldest first (restart recovery).
    async fn jobs_with_status(&self, statuses: &[JobStatus]) -> StoreResult<Vec<Job>>;

    async fn insert_asset(&self, asset: &Asset) -> StoreResult<()>;
    async fn get_asset(&self, id: Uuid) -> StoreResult<Option<Asset>>;
    /// The newest asset record over this blob hash, if any.
    async fn asset_by_hash(&self, hash: &str) -> StoreResult<Option<Asset>>;
    /// Removes the record; the blob goes when nothing references it (sweep).
    async fn delete_asset(&self, id: Uuid) -> StoreResult<bool>;
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
}

/// The migrations, in order. Never edit a released one: add the next.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "jobs assets idempotency", include_str!("migrations/0001_jobs.sql")),
    (2, "webhook outbox", include_str!("migrations/0002_webhook_outbox.sql")),
];

/// SQLite in WAL mode under the state directory.
#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
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
        let migrator = sqlx::migrate::Migrator {
            migrations: Cow::Owned(
                MIGRATIONS
                    .iter()
                    .map(|(version, description, sql)| {
                        sqlx::migrate::Migration::new(*version, Cow::Borrowed(*description), sqlx::migrate::MigrationType::Simple, Cow::Borrowed(*sql), false)
                    })
                    .collect(),
            ),
            ..sqlx::migrate::Migrator::DEFAULT
        };
        migrator.run(&pool).await?;
        Ok(SqliteStore { pool })
    }

    /// The database pool, shared with the webhook outbox (same file, same transactions).
    pub fn pool(&self) -> SqlitePool {
        self.pool.clone()
    }
}

/// The job document: everything but the outputs (those are asset rows).
fn job_doc(job: &Job) -> StoreResult<String> {
    let mut doc = serde_json::to_value(job)?;
    if let Some(map) = doc.as_object_mut() {
        map.remove("outputs");
        map.remove("queue_position");
    }
    Ok(doc.to_string())
}

fn job_from_row(row: &SqliteRow) -> StoreResult<Job> {
    let doc: String = row.try_get("doc")?;
    let mut value: serde_json::Value = serde_json::from_str(&doc)?;
    if let Some(map) = value.as_object_mut() {
        map.insert("outputs".into(), serde_json::Value::Array(Vec::new()));
        map.insert("queue_position".into(), serde_json::Value::Null);
    }
    Ok(serde_json::from_value(value)?)
}

fn asset_from_row(row: &SqliteRow) -> StoreResult<Asset> {
    let id: String = row.try_get("id")?;
    let job_id: Option<String> = row.try_get("job_id")?;
    let expires_at: Option<i64> = row.try_get("expires_at")?;
    let size: i64 = row.try_get("size_bytes")?;
    let role: String = row.try_get("role")?;
    Ok(Asset {
        id: Uuid::parse_str(&id).map_err(|e| StoreError(format!("asset id {id}: {e}")))?,
        hash: row.try_get("hash")?,
        size_bytes: size.max(0) as u64,
        content_type: row.try_get("content_type")?,
        name: row.try_get("name")?,
        job_id: job_id.and_then(|j| Uuid::parse_str(&j).ok()),
        node_id: row.try_get("node_id")?,
        role: AssetRole::parse(&role),
        created_at: from_ms(row.try_get("created_at")?),
        expires_at: expires_at.map(from_ms),
    })
}

const ASSET_COLUMNS: &str = "id, hash, size_bytes, content_type, name, job_id, node_id, role, created_at, expires_at";

async fn insert_asset_on<'e, E: sqlx::Executor<'e, Database = sqlx::Sqlite>>(executor: E, asset: &Asset) -> StoreResult<()> {
    sqlx::query(&format!("INSERT INTO assets ({ASSET_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"))
        .bind(asset.id.to_string())
        .bind(&asset.hash)
        .bind(asset.size_bytes as i64)
        .bind(&asset.content_type)
        .bind(&asset.name)
        .bind(asset.job_id.map(|j| j.to_string()))
        .bind(&asset.node_id)
        .bind(asset.role.as_str())
        .bind(to_ms(asset.created_at))
        .bind(asset.expires_at.map(to_ms))
        .execute(executor)
        .await?;
    Ok(())
}

impl SqliteStore {
    async fn with_outputs(&self, mut job: Job) -> StoreResult<Job> {
        let rows = sqlx::query(&format!("SELECT {ASSET_COLUMNS} FROM assets WHERE job_id = ? AND role = 'output' ORDER BY seq"))
            .bind(job.id.to_string())
            .fetch_all(&self.pool)
            .await?;
        job.outputs = rows.iter().map(asset_from_row).collect::<StoreResult<_>>()?;
        Ok(job)
    }
}

#[async_trait]
impl JobStore for SqliteStore {
    async fn insert_job(&self, job: &Job, inputs: &[Asset]) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("INSERT INTO jobs (id, status, created_at, expires_at, doc) VALUES (?, ?, ?, ?, ?)")
            .bind(job.id.to_string())
            .bind(job.status.as_str())
            .bind(to_ms(job.created_at))
            .bind(to_ms(job.expires_at))
            .bind(job_doc(job)?)
            .execute(&mut *tx)
            .await?;
        for asset in inputs {
            insert_asset_on(&mut *tx, asset).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn update_job(&self, job: &Job) -> StoreResult<()> {
        sqlx::query("UPDATE jobs SET status = ?, expires_at = ?, doc = ? WHERE id = ?")
            .bind(job.status.as_str())
            .bind(to_ms(job.expires_at))
            .bind(job_doc(job)?)
            .bind(job.id.to_string())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn update_job_with_messages(&self, job: &Job, messages: &[crate::webhooks::outbox::NewDelivery]) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("UPDATE jobs SET status = ?, expires_at = ?, doc = ? WHERE id = ?")
            .bind(job.status.as_str())
            .bind(to_ms(job.expires_at))
            .bind(job_doc(job)?)
            .bind(job.id.to_string())
            .execute(&mut *tx)
            .await?;
        crate::webhooks::outbox::insert_deliveries(&mut tx, messages).await.map_err(|e| StoreError(e.to_string()))?;
        tx.commit().await?;
        Ok(())
    }

    async fn get_job(&self, id: Uuid) -> StoreResult<Option<Job>> {
        let row = sqlx::query("SELECT doc FROM jobs WHERE id = ?").bind(id.to_string()).fetch_optional(&self.pool).await?;
        match row {
            Some(row) => Ok(Some(self.with_outputs(job_from_row(&row)?).await?)),
            None => Ok(None),
        }
    }

    async fn list_jobs(&self, filter: &JobFilter) -> StoreResult<Vec<Job>> {
        let mut sql = String::from("SELECT doc FROM jobs WHERE 1 = 1");
        if !filter.statuses.is_empty() {
            sql.push_str(" AND status IN (");
            sql.push_str(&vec!["?"; filter.statuses.len()].join(", "));
            sql.push(')');
        }
        if filter.created_before.is_some() {
            sql.push_str(" AND created_at < ?");
        }
        sql.push_str(" ORDER BY created_at DESC, id DESC LIMIT ?");
        let mut query = sqlx::query(&sql);
        for status in &filter.statuses {
            query = query.bind(status.as_str());
        }
        if let Some(before) = filter.created_before {
            query = query.bind(to_ms(before));
        }
        let limit = if filter.limit == 0 { 100 } else { filter.limit.min(1000) };
        let rows = query.bind(limit as i64).fetch_all(&self.pool).await?;
        let mut jobs = Vec::with_capacity(rows.len());
        for row in &rows {
            jobs.push(self.with_outputs(job_from_row(row)?).await?);
        }
        Ok(jobs)
    }

    async fn jobs_with_status(&self, statuses: &[JobStatus]) -> StoreResult<Vec<Job>> {
        if statuses.is_empty() {
            return Ok(Vec::new());
        }
        let sql = format!("SELECT doc FROM jobs WHERE status IN ({}) ORDER BY created_at ASC, id ASC", vec!["?"; statuses.len()].join(", "));
        let mut query = sqlx::query(&sql);
        for status in statuses {
            query = query.bind(status.as_str());
        }
        let rows = query.fetch_all(&self.pool).await?;
        let mut jobs = Vec::with_capacity(rows.len());
        for row in &rows {
            jobs.push(self.with_outputs(job_from_row(row)?).await?);
        }
        Ok(jobs)
    }

    async fn insert_asset(&self, asset: &Asset) -> StoreResult<()> {
        insert_asset_on(&self.pool, asset).await
    }

    async fn get_asset(&self, id: Uuid) -> StoreResult<Option<Asset>> {
        let row = sqlx::query(&format!("SELECT {ASSET_COLUMNS} FROM assets WHERE id = ?")).bind(id.to_string()).fetch_optional(&self.pool).await?;
        row.as_ref().map(asset_from_row).transpose()
    }

    async fn asset_by_hash(&self, hash: &str) -> StoreResult<Option<Asset>> {
        let row = sqlx::query(&format!("SELECT {ASSET_COLUMNS} FROM assets WHERE hash = ? ORDER BY seq DESC LIMIT 1")).bind(hash).fetch_optional(&self.pool).await?;
        row.as_ref().map(asset_from_row).transpose()
    }

    async fn delete_asset(&self, id: Uuid) -> StoreResult<bool> {
        let done = sqlx::query("DELETE FROM assets WHERE id = ?").bind(id.to_string()).execute(&self.pool).await?;
        Ok(done.rows_affected() > 0)
    }

    async fn list_assets(&self, limit: usize, offset: usize) -> StoreResult<Vec<Asset>> {
        let rows = sqlx::query(&format!("SELECT {ASSET_COLUMNS} FROM assets WHERE role = 'upload' ORDER BY seq DESC LIMIT ? OFFSET ?"))
            .bind(limit.clamp(1, 1000) as i64)
            .bind(offset as i64)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(asset_from_row).collect()
    }

    async fn job_inputs(&self, job_id: Uuid) -> StoreResult<Vec<Asset>> {
        let rows = sqlx::query(&format!("SELECT {ASSET_COLUMNS} FROM assets WHERE job_id = ? AND role = 'input' ORDER BY seq"))
            .bind(job_id.to_string())
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(asset_from_row).collect()
    }

    async fn extend_asset(&self, id: Uuid, until: SystemTime) -> StoreResult<()> {
        sqlx::query("UPDATE assets SET expires_at = ? WHERE id = ? AND expires_at IS NOT NULL AND expires_at < ?")
            .bind(to_ms(until))
            .bind(id.to_string())
            .bind(to_ms(until))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn claim_idempotency_key(&self, scope: &str, key: &str, fingerprint: &str, job_id: Uuid, expires_at: SystemTime) -> StoreResult<IdempotencyClaim> {
        let now = to_ms(SystemTime::now());
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM idempotency_keys WHERE scope = ? AND key = ? AND expires_at <= ?").bind(scope).bind(key).bind(now).execute(&mut *tx).await?;
        sqlx::query("INSERT INTO idempotency_keys (scope, key, fingerprint, job_id, created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (scope, key) DO NOTHING")
            .bind(scope)
            .bind(key)
            .bind(fingerprint)
            .bind(job_id.to_string())
            .bind(now)
            .bind(to_ms(expires_at))
            .execute(&mut *tx)
            .await?;
        let row = sqlx::query("SELECT fingerprint, job_id FROM idempotency_keys WHERE scope = ? AND key = ?").bind(scope).bind(key).fetch_one(&mut *tx).await?;
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
        sqlx::query("DELETE FROM idempotency_keys WHERE scope = ? AND key = ?").bind(scope).bind(key).execute(&self.pool).await?;
        Ok(())
    }

    async fn sweep_expired(&self, now: SystemTime) -> StoreResult<SweepReport> {
        let now = to_ms(now);
        let mut tx = self.pool.begin().await?;
        // Only terminal jobs are removed; a job still queued or running past its
        // retention deadline is expired by the service first.
        let rows = sqlx::query("SELECT id FROM jobs WHERE expires_at <= ? AND status IN ('succeeded', 'failed', 'canceled', 'expired')").bind(now).fetch_all(&mut *tx).await?;
        let mut jobs = Vec::with_capacity(rows.len());
        let mut assets = 0usize;
        for row in &rows {
            let id: String = row.try_get("id")?;
            let done = sqlx::query("DELETE FROM assets WHERE job_id = ? AND role IN ('output', 'input')").bind(&id).execute(&mut *tx).await?;
            assets += done.rows_affected() as usize;
            sqlx::query("DELETE FROM jobs WHERE id = ?").bind(&id).execute(&mut *tx).await?;
            if let Ok(uuid) = Uuid::parse_str(&id) {
                jobs.push(uuid);
            }
        }
        let done = sqlx::query("DELETE FROM assets WHERE role = 'upload' AND expires_at IS NOT NULL AND expires_at <= ?").bind(now).execute(&mut *tx).await?;
        assets += done.rows_affected() as usize;
        let keys = sqlx::query("DELETE FROM idempotency_keys WHERE expires_at <= ?").bind(now).execute(&mut *tx).await?.rows_affected() as usize;
        tx.commit().await?;
        Ok(SweepReport { jobs, assets, keys })
    }

    async fn referenced_hashes(&self) -> StoreResult<HashSet<String>> {
        let rows = sqlx::query("SELECT DISTINCT hash FROM assets").fetch_all(&self.pool).await?;
        rows.iter().map(|r| r.try_get::<String, _>("hash").map_err(StoreError::from)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::model::{JobSource, JobSpec};

    fn job() -> Job {
        let mut workflow = serde_json::Map::new();
        workflow.insert("1".into(), serde_json::json!({"class_type": "EmptyImage", "inputs": {}}));
        Job::new(JobSource::Api, JobSpec::new(workflow), Duration::from_secs(3600))
    }

    fn asset(job: Option<Uuid>, role: AssetRole, hash: &str) -> Asset {
        Asset {
            id: Uuid::new_v4(),
            hash: hash.into(),
            size_bytes: 3,
            content_type: "image/png".into(),
            name: Some("a.png".into()),
            job_id: job,
            node_id: Some("9".into()),
            role,
            created_at: SystemTime::now(),
            expires_at: Some(SystemTime::now() + Duration::from_secs(60)),
        }
    }

    #[tokio::test]
    async fn a_job_and_its_outputs_survive_reopening_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.db");
        let mut j = job();
        {
            let store = SqliteStore::open(&path).await.unwrap();
            store.insert_job(&j, &[]).await.unwrap();
            j.status = JobStatus::Succeeded;
            j.prompt_id = Some("p-1".into());
            store.update_job(&j).await.unwrap();
            store.insert_asset(&asset(Some(j.id), AssetRole::Output, "blake3:aa")).await.unwrap();
            store.pool.close().await;
        }
        let store = SqliteStore::open(&path).await.unwrap();
        let back = store.get_job(j.id).await.unwrap().expect("still there");
        assert_eq!(back.status, JobStatus::Succeeded);
        assert_eq!(back.prompt_id.as_deref(), Some("p-1"));
        assert_eq!(back.outputs.len(), 1);
        assert_eq!(back.outputs[0].hash, "blake3:aa");
        assert_eq!(back.spec, j.spec);
    }

    #[tokio::test]
    async fn an_idempotency_key_names_one_job_until_it_expires() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("jobs.db")).await.unwrap();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let later = SystemTime::now() + Duration::from_secs(60);
        assert_eq!(store.claim_idempotency_key("s", "k", "fp1", a, later).await.unwrap(), IdempotencyClaim::Claimed);
        assert_eq!(store.claim_idempotency_key("s", "k", "fp2", b, later).await.unwrap(), IdempotencyClaim::Existing { fingerprint: "fp1".into(), job_id: a });
        assert_eq!(store.claim_idempotency_key("other", "k", "fp2", b, later).await.unwrap(), IdempotencyClaim::Claimed, "scopes are separate");
        store.release_idempotency_key("s", "k").await.unwrap();
        assert_eq!(store.claim_idempotency_key("s", "k", "fp2", b, later).await.unwrap(), IdempotencyClaim::Claimed);
        let past = SystemTime::now() - Duration::from_secs(1);
        let c = Uuid::new_v4();
        assert_eq!(store.claim_idempotency_key("s", "old", "fp", c, past).await.unwrap(), IdempotencyClaim::Claimed);
        assert_eq!(store.claim_idempotency_key("s", "old", "fp", a, later).await.unwrap(), IdempotencyClaim::Claimed, "an expired claim is free again");
    }

    #[tokio::test]
    async fn sweeping_removes_expired_terminal_jobs_and_their_assets_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("jobs.db")).await.unwrap();
        let mut old = job();
        old.status = JobStatus::Succeeded;
        old.expires_at = SystemTime::now() - Duration::from_secs(1);
        let mut running = job();
        running.status = JobStatus::Running;
        running.expires_at = SystemTime::now() - Duration::from_secs(1);
        let fresh = job();
        for j in [&old, &running, &fresh] {
            store.insert_job(j, &[]).await.unwrap();
        }
        store.insert_asset(&asset(Some(old.id), AssetRole::Output, "blake3:old")).await.unwrap();
        store.insert_asset(&asset(Some(fresh.id), AssetRole::Output, "blake3:fresh")).await.unwrap();
        let report = store.sweep_expired(SystemTime::now()).await.unwrap();
        assert_eq!(report.jobs, vec![old.id]);
        assert_eq!(report.assets, 1);
        assert!(store.get_job(old.id).await.unwrap().is_none());
        assert!(store.get_job(running.id).await.unwrap().is_some(), "a running job is never swept");
        let hashes = store.referenced_hashes().await.unwrap();
        assert!(hashes.contains("blake3:fresh") && !hashes.contains("blake3:old"));
    }
}
