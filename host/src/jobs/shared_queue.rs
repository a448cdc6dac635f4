//! The work queue every instance pulls from (issue #12): queued jobs are rows of the
//! shared PostgreSQL job store, and an instance with a free ComfyUI slot claims one
//! inside a transaction — the oldest eligible rows locked `FOR UPDATE SKIP LOCKED` (rows
//! another instance is claiming are skipped, never waited on), [`pick`] (the same
//! affinity rule as the in-memory queue) applied to what it locked, a lease written on
//! the chosen one, commit. The holder renews the lease while the job runs ([`PgQueue::renew`],
//! which also reads cancel requests); a job whose lease ran out is re-queued once and
//! then failed `worker_lost` ([`PgQueue::take_expired`] hands them to the service).
//!
//! Owns: the queue columns of `jobs` (`model_key`, `lease_owner`, `lease_until`,
//! `claims`, `cancel_requested`) and the `flowhost_queue` notification. Must never: let
//! two instances hold one job, clear a lease another live instance holds, or decide a
//! job's state (the service does, through the fenced store writes).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use sqlx::{PgPool, Row};
use tokio::sync::Notify;
use uuid::Uuid;

use super::affinity::{Candidate, DispatchRule, pick};
use super::model::{from_ms, to_ms};
use super::queue::WorkQueue;
use super::store::{StoreError, StoreResult};

/// The channel a push notifies, so idle instances claim at once instead of at their
/// next poll.
const CHANNEL: &str = "flowhost_queue";
/// How many of the oldest waiting rows a claim locks and picks among.
const CLAIM_WINDOW: i64 = 32;
/// An idle claimer looks again at least this often (a missed notification, a lease
/// that ran out).
const POLL: Duration = Duration::from_millis(250);

/// A job this instance holds whose lease ran out elsewhere, or one whose holder died:
/// for the service to re-queue or fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpiredLease {
    pub id: Uuid,
    /// How often the job was claimed (1: re-queue it; more: `worker_lost`).
    pub claims: i64,
    /// Someone asked to cancel it (the flag its holder never read): it ends `canceled`.
    pub cancel_requested: bool,
}

/// The shared queue over the job store's PostgreSQL database.
pub struct PgQueue {
    pool: PgPool,
    owner: String,
    rule: DispatchRule,
    lease: Duration,
    wake: Arc<Notify>,
    listener: tokio::task::JoinHandle<()>,
}

impl Drop for PgQueue {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

impl PgQueue {
    /// A queue for instance `owner` (the store's [`super::store_pg::PostgresStore::instance_id`])
    /// holding leases of `lease`. Starts listening for pushes.
    pub fn new(pool: PgPool, owner: String, rule: DispatchRule, lease: Duration) -> PgQueue {
        let wake = Arc::new(Notify::new());
        let listener = tokio::spawn(listen(pool.clone(), wake.clone()));
        PgQueue { pool, owner, rule, lease, wake, listener }
    }

    pub fn owner(&self) -> &str {
        &self.owner
    }

    pub fn lease(&self) -> Duration {
        self.lease
    }

    fn until(&self) -> i64 {
        to_ms(SystemTime::now() + self.lease)
    }

    /// One claim attempt: lock the oldest waiting rows, pick, lease the chosen one.
    async fn try_claim(&self, loaded: Option<&str>) -> StoreResult<Option<Candidate>> {
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(
            "SELECT id, model_key, created_at FROM jobs WHERE status = 'queued' AND lease_owner IS NULL \
             ORDER BY created_at, id LIMIT $1 FOR UPDATE SKIP LOCKED",
        )
        .bind(CLAIM_WINDOW)
        .fetch_all(&mut *tx)
        .await?;
        let mut candidates = Vec::with_capacity(rows.len());
        for row in &rows {
            let id: String = row.try_get("id")?;
            let Ok(id) = Uuid::parse_str(&id) else { continue };
            candidates.push(Candidate { id, model_key: row.try_get("model_key")?, queued_at: from_ms(row.try_get("created_at")?) });
        }
        let Some(index) = pick(&candidates, loaded, &[], SystemTime::now(), self.rule) else {
            tx.rollback().await?;
            return Ok(None);
        };
        let chosen = candidates.swap_remove(index);
        // The cancel flag stays: a cancel asked before a takeover reaches the new holder.
        sqlx::query("UPDATE jobs SET lease_owner = $1, lease_until = $2, claims = claims + 1 WHERE id = $3")
            .bind(&self.owner)
            .bind(self.until())
            .bind(chosen.id.to_string())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Some(chosen))
    }

    /// Renew the leases of `running` (the jobs this instance runs now) that it still
    /// holds; returns those and, of them, the ones someone asked to cancel. Only what runs
    /// here: a job this instance stopped (fenced) or forgot keeps its lease no longer and
    /// is taken over when it lapses.
    pub async fn renew(&self, running: &[Uuid]) -> StoreResult<(Vec<Uuid>, Vec<Uuid>)> {
        if running.is_empty() {
            // Still a round trip: the renewal is also how the keeper knows the database answers.
            sqlx::query("SELECT 1").execute(&self.pool).await?;
            return Ok((Vec::new(), Vec::new()));
        }
        let ids: Vec<String> = running.iter().map(Uuid::to_string).collect();
        let rows = sqlx::query(
            "UPDATE jobs SET lease_until = $1 WHERE lease_owner = $2 AND status IN ('queued', 'running', 'canceling') AND id = ANY($3) \
             RETURNING id, cancel_requested",
        )
        .bind(self.until())
        .bind(&self.owner)
        .bind(ids)
        .fetch_all(&self.pool)
        .await?;
        let (mut held, mut cancel) = (Vec::new(), Vec::new());
        for row in &rows {
            let id: String = row.try_get("id")?;
            let Ok(id) = Uuid::parse_str(&id) else { continue };
            if row.try_get::<i64, _>("cancel_requested")? != 0 {
                cancel.push(id);
            }
            held.push(id);
        }
        Ok((held, cancel))
    }

    /// Make a just-stored queued job claimable at once: its model key (for affinity) and a
    /// notification. Touches no lease (the row is claimable since it was stored; a claimer,
    /// this instance's own included, may hold it already). Returns its queue position.
    pub async fn announce(&self, job: &Candidate) -> StoreResult<usize> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("UPDATE jobs SET model_key = $1 WHERE id = $2 AND status = 'queued' AND lease_owner IS NULL")
            .bind(job.model_key.clone())
            .bind(job.id.to_string())
            .execute(&mut *tx)
            .await?;
        sqlx::query("SELECT pg_notify($1, $2)").bind(CHANNEL).bind(job.id.to_string()).execute(&mut *tx).await?;
        tx.commit().await?;
        self.wake.notify_waiters();
        Ok(self.position(job.id).await?.unwrap_or(0))
    }

    /// Ask the holder of `id` to cancel it (read with its next renewal). `false`: the
    /// job is not held by anyone (queued, or finished).
    pub async fn request_cancel(&self, id: Uuid) -> StoreResult<bool> {
        let done = sqlx::query("UPDATE jobs SET cancel_requested = 1 WHERE id = $1 AND lease_owner IS NOT NULL AND status IN ('queued', 'running', 'canceling')")
            .bind(id.to_string())
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Jobs whose holder stopped renewing: this instance takes each over (a fresh lease
    /// of its own, so its fenced writes pass) for the service to re-queue or fail. Never
    /// one of `running` (this instance's own runs, still unwinding): a job is re-claimed
    /// only once nothing of it runs here.
    pub async fn take_expired(&self, running: &[Uuid]) -> StoreResult<Vec<ExpiredLease>> {
        let ids: Vec<String> = running.iter().map(Uuid::to_string).collect();
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(
            "SELECT id, claims, cancel_requested FROM jobs WHERE lease_owner IS NOT NULL AND lease_until < $1 \
             AND status IN ('queued', 'running', 'canceling') AND NOT (id = ANY($2)) FOR UPDATE SKIP LOCKED",
        )
        .bind(to_ms(SystemTime::now()))
        .bind(ids)
        .fetch_all(&mut *tx)
        .await?;
        let mut expired = Vec::with_capacity(rows.len());
        for row in &rows {
            let id: String = row.try_get("id")?;
            let Ok(uuid) = Uuid::parse_str(&id) else { continue };
            sqlx::query("UPDATE jobs SET lease_owner = $1, lease_until = $2 WHERE id = $3").bind(&self.owner).bind(self.until()).bind(&id).execute(&mut *tx).await?;
            expired.push(ExpiredLease { id: uuid, claims: row.try_get("claims")?, cancel_requested: row.try_get::<i64, _>("cancel_requested")? != 0 });
        }
        tx.commit().await?;
        Ok(expired)
    }

    /// Whether this instance holds `id`'s lease now (read fresh, not inferred from a
    /// renewal's result set). `false`: another instance took it over, or it went back to
    /// the queue.
    pub async fn holds(&self, id: Uuid) -> StoreResult<bool> {
        let owner: Option<Option<String>> = sqlx::query_scalar("SELECT lease_owner FROM jobs WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        Ok(matches!(owner, Some(Some(o)) if o == self.owner))
    }

    /// Let go of a job this instance holds (it finished, or was put back).
    pub async fn release(&self, id: Uuid) -> StoreResult<()> {
        sqlx::query("UPDATE jobs SET lease_owner = NULL, lease_until = NULL WHERE id = $1 AND lease_owner = $2")
            .bind(id.to_string())
            .bind(&self.owner)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

/// Wake local claimers whenever any instance pushes (LISTEN on the shared database).
/// A lost connection is re-made; claimers poll meanwhile.
async fn listen(pool: PgPool, wake: Arc<Notify>) {
    loop {
        match sqlx::postgres::PgListener::connect_with(&pool).await {
            Ok(mut listener) => {
                if listener.listen(CHANNEL).await.is_ok() {
                    while listener.recv().await.is_ok() {
                        wake.notify_waiters();
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "listening for queue notifications failed; polling"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[async_trait]
impl WorkQueue for PgQueue {
    async fn push(&self, job: Candidate) -> StoreResult<usize> {
        // Idempotent, and never takes a job from a live holder: only a job nobody holds,
        // one this instance holds (putting it back), or one whose lease ran out.
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE jobs SET model_key = $1, lease_owner = NULL, lease_until = NULL \
             WHERE id = $2 AND status = 'queued' AND (lease_owner IS NULL OR lease_owner = $3 OR lease_until < $4)",
        )
        .bind(job.model_key.clone())
        .bind(job.id.to_string())
        .bind(&self.owner)
        .bind(to_ms(SystemTime::now()))
        .execute(&mut *tx)
        .await?;
        sqlx::query("SELECT pg_notify($1, $2)").bind(CHANNEL).bind(job.id.to_string()).execute(&mut *tx).await?;
        tx.commit().await?;
        self.wake.notify_waiters();
        Ok(self.position(job.id).await?.unwrap_or(0))
    }

    async fn claim(&self, _worker: &str, loaded: Option<&str>) -> StoreResult<Candidate> {
        loop {
            let notified = self.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.try_claim(loaded).await {
                Ok(Some(job)) => return Ok(job),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "claiming from the shared queue failed; retrying");
                }
            }
            let _ = tokio::time::timeout(POLL, notified).await;
        }
    }

    async fn remove(&self, id: Uuid) -> StoreResult<bool> {
        // Taking a job out is claiming it for this instance (so no one else can, and the
        // service's fenced write of `canceled` passes).
        let done = sqlx::query(
            "UPDATE jobs SET lease_owner = $1, lease_until = $2, cancel_requested = 0 WHERE id = $3 AND status = 'queued' AND lease_owner IS NULL",
        )
        .bind(&self.owner)
        .bind(self.until())
        .bind(id.to_string())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn position(&self, id: Uuid) -> StoreResult<Option<usize>> {
        let row = sqlx::query(
            "SELECT (SELECT COUNT(*) FROM jobs o WHERE o.status = 'queued' AND o.lease_owner IS NULL AND (o.created_at, o.id) < (j.created_at, j.id)) AS ahead \
             FROM jobs j WHERE j.id = $1 AND j.status = 'queued' AND j.lease_owner IS NULL",
        )
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => Ok(Some(usize::try_from(row.try_get::<i64, _>("ahead")?).map_err(|e| StoreError(e.to_string()))?)),
            None => Ok(None),
        }
    }

    async fn depth(&self) -> StoreResult<usize> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM jobs WHERE status = 'queued' AND lease_owner IS NULL").fetch_one(&self.pool).await?;
        Ok(usize::try_from(n).unwrap_or(0))
    }
}
