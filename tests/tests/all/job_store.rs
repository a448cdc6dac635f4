//! The job store and the webhook outbox on both dialects: every test here runs once on
//! SQLite (a file in a temp dir) and once on PostgreSQL (a throw-away cluster started by
//! tests/support/pg.rs). The same assertions, one body: what the embedded default
//! promises, the shared store promises too.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use flowhost::jobs::store::JobStore;
use flowhost::jobs::{Asset, AssetRole, IdempotencyClaim, Job, JobFilter, JobSource, JobSpec, JobStatus, PostgresStore, SqliteStore};
use flowhost::webhooks::outbox::{NewDelivery, OutboxStore, PgOutbox, SqliteOutbox};
use flowhost_tests::pg::PgCluster;
use uuid::Uuid;

#[derive(Clone, Copy)]
enum Dialect {
    Sqlite,
    Postgres,
}

/// One database of either dialect that can be opened (again) as a store.
struct Db {
    _dir: tempfile::TempDir,
    _cluster: Option<PgCluster>,
    sqlite_path: std::path::PathBuf,
    pg_url: Option<String>,
}

impl Db {
    async fn new(dialect: Dialect) -> Db {
        let dir = tempfile::tempdir().unwrap();
        let sqlite_path = dir.path().join("jobs.db");
        match dialect {
            Dialect::Sqlite => Db { _dir: dir, _cluster: None, sqlite_path, pg_url: None },
            Dialect::Postgres => {
                let cluster = PgCluster::start().await.expect("a PostgreSQL test cluster starts");
                let url = cluster.fresh_database().await.unwrap();
                Db { _dir: dir, _cluster: Some(cluster), sqlite_path, pg_url: Some(url) }
            }
        }
    }

    /// The store and its outbox over the same database.
    async fn open(&self) -> (Arc<dyn JobStore>, Arc<dyn OutboxStore>) {
        match &self.pg_url {
            None => {
                let store = SqliteStore::open(&self.sqlite_path).await.unwrap();
                let outbox = SqliteOutbox::new(store.pool());
                (Arc::new(store), Arc::new(outbox))
            }
            Some(url) => {
                let store = PostgresStore::open(url).await.unwrap();
                let outbox = PgOutbox::new(store.pool());
                (Arc::new(store), Arc::new(outbox))
            }
        }
    }
}

/// Each named test once per dialect: `sqlite::name` and `postgres::name`.
macro_rules! on_both_dialects {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(super::Dialect::Sqlite).await })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(super::Dialect::Postgres).await })*
        }
    };
}

on_both_dialects!(
    a_job_and_its_outputs_survive_reopening_the_database,
    an_idempotency_key_names_one_job_until_it_expires,
    concurrent_claims_of_one_idempotency_key_give_it_to_exactly_one_job,
    sweeping_removes_expired_terminal_jobs_and_their_assets_only,
    listing_filters_by_status_and_pages_newest_first,
    a_state_change_and_its_webhook_messages_commit_together,
    two_dispatchers_claiming_at_once_never_get_the_same_message,
    uploads_are_listed_newest_first_and_found_by_hash,
    paging_with_a_small_limit_lists_every_job_of_one_millisecond,
    a_terminal_state_is_final_whatever_is_written_later,
);

/// The retention sweep truncates SQLite's write-ahead log: without it, the WAL stays as large as
/// the biggest burst of writes since the service started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_truncates_the_sqlite_write_ahead_log() {
    let db = Db::new(Dialect::Sqlite).await;
    let (store, _outbox) = db.open().await;
    for _ in 0..200 {
        store.insert_job(&job(), &[]).await.unwrap();
    }
    let wal = db.sqlite_path.with_extension("db-wal");
    let before = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
    assert!(before > 0, "200 inserts went through the WAL");
    store.sweep_expired(SystemTime::now()).await.unwrap();
    assert_eq!(std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0), 0, "the WAL was {before} bytes before the sweep");
}

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
        tenant: None,
    }
}

async fn a_job_and_its_outputs_survive_reopening_the_database(dialect: Dialect) {
    let db = Db::new(dialect).await;
    let mut j = job();
    {
        let (store, _) = db.open().await;
        store.insert_job(&j, &[asset(Some(j.id), AssetRole::Input, "blake3:in")]).await.unwrap();
        j.status = JobStatus::Succeeded;
        j.prompt_id = Some("p-1".into());
        store.update_job(&j).await.unwrap();
        store.insert_asset(&asset(Some(j.id), AssetRole::Output, "blake3:aa")).await.unwrap();
        store.insert_asset(&asset(Some(j.id), AssetRole::Output, "blake3:bb")).await.unwrap();
    }
    let (store, _) = db.open().await;
    let back = store.get_job(j.id).await.unwrap().expect("still there");
    assert_eq!(back.status, JobStatus::Succeeded);
    assert_eq!(back.prompt_id.as_deref(), Some("p-1"));
    assert_eq!(back.outputs.iter().map(|a| a.hash.as_str()).collect::<Vec<_>>(), vec!["blake3:aa", "blake3:bb"], "outputs in insertion order");
    assert_eq!(back.spec, j.spec);
    assert_eq!(store.job_inputs(j.id).await.unwrap().len(), 1);
    assert!(store.get_job(Uuid::new_v4()).await.unwrap().is_none());
}

async fn an_idempotency_key_names_one_job_until_it_expires(dialect: Dialect) {
    let db = Db::new(dialect).await;
    let (store, _) = db.open().await;
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

/// Two instances retrying one request at once: one job gets the key, every other
/// claimer is told which.
async fn concurrent_claims_of_one_idempotency_key_give_it_to_exactly_one_job(dialect: Dialect) {
    let db = Db::new(dialect).await;
    let (first, _) = db.open().await;
    let (second, _) = db.open().await;
    let later = SystemTime::now() + Duration::from_secs(60);
    let mut tasks = Vec::new();
    for n in 0..16 {
        let store = if n % 2 == 0 { first.clone() } else { second.clone() };
        tasks.push(tokio::spawn(async move {
            let id = Uuid::new_v4();
            (id, store.claim_idempotency_key("v2", "same-key", "fp", id, later).await.unwrap())
        }));
    }
    let mut winners = Vec::new();
    let mut named = std::collections::HashSet::new();
    for task in tasks {
        match task.await.unwrap() {
            (id, IdempotencyClaim::Claimed) => winners.push(id),
            (_, IdempotencyClaim::Existing { job_id, .. }) => {
                named.insert(job_id);
            }
        }
    }
    assert_eq!(winners.len(), 1, "exactly one claimer wins");
    assert!(named.iter().all(|id| *id == winners[0]), "every loser is told the winner's job");
}

async fn sweeping_removes_expired_terminal_jobs_and_their_assets_only(dialect: Dialect) {
    let db = Db::new(dialect).await;
    let (store, _) = db.open().await;
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
    let mut stale_upload = asset(None, AssetRole::Upload, "blake3:stale");
    stale_upload.expires_at = Some(SystemTime::now() - Duration::from_secs(1));
    store.insert_asset(&stale_upload).await.unwrap();
    store.claim_idempotency_key("s", "gone", "fp", old.id, SystemTime::now() - Duration::from_secs(1)).await.unwrap();
    let report = store.sweep_expired(SystemTime::now()).await.unwrap();
    assert_eq!(report.jobs, vec![old.id]);
    assert_eq!(report.assets, 2, "the old job's output and the stale upload");
    assert_eq!(report.keys, 1);
    assert!(store.get_job(old.id).await.unwrap().is_none());
    assert!(store.get_job(running.id).await.unwrap().is_some(), "a running job is never swept");
    let hashes = store.referenced_hashes().await.unwrap();
    assert!(hashes.contains("blake3:fresh") && !hashes.contains("blake3:old") && !hashes.contains("blake3:stale"));
}

async fn listing_filters_by_status_and_pages_newest_first(dialect: Dialect) {
    let db = Db::new(dialect).await;
    let (store, _) = db.open().await;
    let base = SystemTime::now() - Duration::from_secs(100);
    let mut ids = Vec::new();
    for n in 0..5u64 {
        let mut j = job();
        j.created_at = base + Duration::from_secs(n);
        j.status = if n % 2 == 0 { JobStatus::Succeeded } else { JobStatus::Queued };
        store.insert_job(&j, &[]).await.unwrap();
        ids.push(j.id);
    }
    let all = store.list_jobs(&JobFilter { limit: 10, ..Default::default() }).await.unwrap();
    assert_eq!(all.iter().map(|j| j.id).collect::<Vec<_>>(), ids.iter().rev().copied().collect::<Vec<_>>(), "newest first");
    let succeeded = store.list_jobs(&JobFilter { statuses: vec![JobStatus::Succeeded], limit: 10, ..Default::default() }).await.unwrap();
    assert_eq!(succeeded.iter().map(|j| j.id).collect::<Vec<_>>(), vec![ids[4], ids[2], ids[0]]);
    let page = store
        .list_jobs(&JobFilter { statuses: vec![JobStatus::Succeeded, JobStatus::Queued], limit: 2, created_before: Some(base + Duration::from_secs(3)), ..Default::default() })
        .await
        .unwrap();
    assert_eq!(page.iter().map(|j| j.id).collect::<Vec<_>>(), vec![ids[2], ids[1]], "the cursor and the limit together");
    let queued = store.jobs_with_status(&[JobStatus::Queued]).await.unwrap();
    assert_eq!(queued.iter().map(|j| j.id).collect::<Vec<_>>(), vec![ids[1], ids[3]], "oldest first for recovery");
}

async fn a_state_change_and_its_webhook_messages_commit_together(dialect: Dialect) {
    let db = Db::new(dialect).await;
    let (store, outbox) = db.open().await;
    let mut j = job();
    store.insert_job(&j, &[]).await.unwrap();
    j.status = JobStatus::Succeeded;
    let message = NewDelivery {
        message_id: "msg_1".into(),
        job_id: j.id.to_string(),
        event_type: "job.succeeded".into(),
        url: "https://hooks.example.com/h".into(),
        payload: "{}".into(),
        created_at_ms: 1000,
    };
    store.update_job_with_messages(&j, std::slice::from_ref(&message)).await.unwrap();
    assert_eq!(store.get_job(j.id).await.unwrap().unwrap().status, JobStatus::Succeeded);
    assert_eq!(outbox.counts().await.unwrap().pending, 1);
    // The same message id again violates the outbox's uniqueness: the whole transaction,
    // the job's state change included, is rolled back.
    j.status = JobStatus::Failed;
    assert!(store.update_job_with_messages(&j, &[message]).await.is_err());
    assert_eq!(store.get_job(j.id).await.unwrap().unwrap().status, JobStatus::Succeeded, "the state change went with the failed enqueue");
    assert_eq!(outbox.counts().await.unwrap().pending, 1);
}

/// Two instances' dispatchers polling one outbox: each due message is leased to one.
async fn two_dispatchers_claiming_at_once_never_get_the_same_message(dialect: Dialect) {
    let db = Db::new(dialect).await;
    let (_, outbox_a) = db.open().await;
    let (_, outbox_b) = db.open().await;
    let messages: Vec<NewDelivery> = (0..60)
        .map(|n| NewDelivery {
            message_id: format!("msg_{n}"),
            job_id: format!("job-{n}"),
            event_type: "job.succeeded".into(),
            url: "https://hooks.example.com/h".into(),
            payload: format!("{{\"n\":{n}}}"),
            created_at_ms: 1000,
        })
        .collect();
    outbox_a.enqueue(&messages).await.unwrap();
    let mut tasks = Vec::new();
    for outbox in [outbox_a.clone(), outbox_b.clone(), outbox_a, outbox_b] {
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            for _ in 0..10 {
                mine.extend(outbox.claim_due(2000, Duration::from_secs(60), 4).await.unwrap().into_iter().map(|d| d.message_id));
            }
            mine
        }));
    }
    let mut claimed = Vec::new();
    for task in tasks {
        claimed.extend(task.await.unwrap());
    }
    let unique: std::collections::HashSet<_> = claimed.iter().collect();
    assert_eq!(unique.len(), claimed.len(), "no message leased twice");
    assert_eq!(claimed.len(), 60, "every message leased");
}

async fn uploads_are_listed_newest_first_and_found_by_hash(dialect: Dialect) {
    let db = Db::new(dialect).await;
    let (store, _) = db.open().await;
    let first = asset(None, AssetRole::Upload, "blake3:u1");
    let second = asset(None, AssetRole::Upload, "blake3:u1");
    let output = asset(Some(Uuid::new_v4()), AssetRole::Output, "blake3:o");
    for a in [&first, &second, &output] {
        store.insert_asset(a).await.unwrap();
    }
    let listed = store.list_assets(10, 0).await.unwrap();
    assert_eq!(listed.iter().map(|a| a.id).collect::<Vec<_>>(), vec![second.id, first.id], "uploads only, newest first");
    assert_eq!(store.list_assets(10, 1).await.unwrap().len(), 1, "offset");
    assert_eq!(store.asset_by_hash("blake3:u1", None).await.unwrap().map(|a| a.id), Some(second.id));
    let until = SystemTime::now() + Duration::from_secs(3600);
    store.extend_asset(first.id, until).await.unwrap();
    let extended = store.get_asset(first.id).await.unwrap().unwrap();
    assert!(extended.expires_at.unwrap() > SystemTime::now() + Duration::from_secs(3000));
    assert!(store.delete_asset(first.id).await.unwrap());
    assert!(!store.delete_asset(first.id).await.unwrap(), "already gone");
}

/// Issue #22: the cursor was a millisecond, and jobs created in the same millisecond as a
/// page's last item were never listed. Paged by (created_at, id), 40 jobs of one
/// millisecond come out 7 at a time, every one exactly once, newest first.
async fn paging_with_a_small_limit_lists_every_job_of_one_millisecond(dialect: Dialect) {
    let db = Db::new(dialect).await;
    let (store, _) = db.open().await;
    let same_ms = SystemTime::now() - Duration::from_secs(10);
    let mut ids = std::collections::HashSet::new();
    for _ in 0..40 {
        let mut j = job();
        j.created_at = same_ms;
        store.insert_job(&j, &[]).await.unwrap();
        ids.insert(j.id);
    }
    let mut listed = Vec::new();
    let mut cursor: Option<(SystemTime, Uuid)> = None;
    loop {
        let page = store
            .list_jobs(&JobFilter { limit: 7, created_before: cursor.map(|c| c.0), before_id: cursor.map(|c| c.1), ..Default::default() })
            .await
            .unwrap();
        let Some(last) = page.last() else { break };
        cursor = Some((last.created_at, last.id));
        listed.extend(page.iter().map(|j| j.id));
        assert!(listed.len() <= 40, "a page repeated jobs: {}", listed.len());
    }
    assert_eq!(listed.len(), 40, "every job listed once");
    assert_eq!(listed.iter().copied().collect::<std::collections::HashSet<_>>(), ids);
}

/// Issue #22: a cancel racing the end of a job wrote `canceling` over `canceled`. A
/// terminal state is final in the store itself: a later write is refused (`Ended`) and
/// the record keeps its end.
async fn a_terminal_state_is_final_whatever_is_written_later(dialect: Dialect) {
    let db = Db::new(dialect).await;
    let (store, _) = db.open().await;
    let mut j = job();
    store.insert_job(&j, &[]).await.unwrap();
    j.status = JobStatus::Running;
    store.update_job(&j).await.unwrap();
    j.status = JobStatus::Succeeded;
    store.update_job(&j).await.unwrap();
    for late in [JobStatus::Canceling, JobStatus::Canceled, JobStatus::Running, JobStatus::Failed] {
        let mut stale = j.clone();
        stale.status = late;
        match store.update_job(&stale).await {
            Err(flowhost::jobs::store::StoreError::Ended) => {}
            other => panic!("writing {late:?} over succeeded: {other:?}"),
        }
        let output = asset(Some(j.id), AssetRole::Output, "blake3:late");
        assert!(matches!(store.insert_output(&output).await, Err(flowhost::jobs::store::StoreError::Ended)), "no output after the end");
    }
    let stored = store.get_job(j.id).await.unwrap().unwrap();
    assert_eq!(stored.status, JobStatus::Succeeded);
    assert!(stored.outputs.is_empty());
}
