//! The PostgreSQL work queue itself (issue #12), two "instances" (two queues with their
//! own lease names) over one real database: every job is claimed exactly once however
//! many claimers race, claims follow the affinity rule over the rows locked, a lease that
//! is not renewed is taken over, and a cancel request reaches the holder's renewal.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use flowhost::jobs::shared_queue::PgQueue;
use flowhost::jobs::store::JobStore;
use flowhost::jobs::{Candidate, DispatchPolicy, DispatchRule, Job, JobSource, JobSpec, PostgresStore, WorkQueue};
use flowhost_tests::pg::PgCluster;
use uuid::Uuid;

const AFFINITY: DispatchRule = DispatchRule { policy: DispatchPolicy::Affinity, wait_bound: Duration::from_secs(3600) };

async fn database() -> (PgCluster, PostgresStore) {
    let cluster = PgCluster::start().await.expect("a PostgreSQL test cluster starts");
    let url = cluster.fresh_database().await.unwrap();
    let store = PostgresStore::open(&url).await.unwrap();
    (cluster, store)
}

fn queue(store: &PostgresStore, name: &str, lease: Duration) -> Arc<PgQueue> {
    Arc::new(PgQueue::new(store.pool(), name.to_string(), AFFINITY, lease))
}

/// A stored queued job, pushed; `age` seconds old, with `model_key`.
async fn queued(store: &PostgresStore, queue: &PgQueue, age: u64, model_key: Option<&str>) -> Uuid {
    let mut workflow = serde_json::Map::new();
    workflow.insert("1".into(), serde_json::json!({"class_type": "EmptyImage", "inputs": {}}));
    let mut job = Job::new(JobSource::Api, JobSpec::new(workflow), Duration::from_secs(3600));
    job.created_at = SystemTime::now() - Duration::from_secs(age);
    store.insert_job(&job, &[]).await.unwrap();
    queue.push(Candidate { id: job.id, model_key: model_key.map(str::to_string), queued_at: job.created_at }).await.unwrap();
    job.id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_claimers_on_two_instances_take_every_job_exactly_once() {
    let (_cluster, store) = database().await;
    let (a, b) = (queue(&store, "a", Duration::from_secs(30)), queue(&store, "b", Duration::from_secs(30)));
    let mut ids = HashSet::new();
    for n in 0..60 {
        ids.insert(queued(&store, &a, 1000 - n, None).await);
    }
    assert_eq!(a.depth().await.unwrap(), 60);
    let mut claimers = Vec::new();
    for n in 0..8 {
        let q = if n % 2 == 0 { a.clone() } else { b.clone() };
        claimers.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            while let Ok(Ok(job)) = tokio::time::timeout(Duration::from_millis(600), q.claim("w", None)).await {
                mine.push(job.id);
            }
            mine
        }));
    }
    let mut claimed = Vec::new();
    for c in claimers {
        claimed.extend(c.await.unwrap());
    }
    let unique: HashSet<Uuid> = claimed.iter().copied().collect();
    assert_eq!(unique.len(), claimed.len(), "no job claimed twice");
    assert_eq!(unique, ids, "every job claimed");
    assert_eq!(a.depth().await.unwrap(), 0);
    assert!(!a.remove(claimed[0]).await.unwrap(), "a claimed job is no longer queued");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_prefers_the_oldest_job_of_the_model_set_the_instance_has_loaded() {
    let (_cluster, store) = database().await;
    let q = queue(&store, "a", Duration::from_secs(30));
    let oldest_other = queued(&store, &q, 30, Some("ms1-other")).await;
    let mine = queued(&store, &q, 20, Some("ms1-mine")).await;
    let _newer_mine = queued(&store, &q, 10, Some("ms1-mine")).await;
    assert_eq!(q.position(oldest_other).await.unwrap(), Some(0));
    assert_eq!(q.position(mine).await.unwrap(), Some(1));
    assert_eq!(q.claim("w", Some("ms1-mine")).await.unwrap().id, mine, "affinity over the rows it locked");
    assert_eq!(q.claim("w", None).await.unwrap().id, oldest_other, "nothing loaded: the oldest");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_that_is_not_renewed_is_taken_over_and_a_renewed_one_is_not() {
    let (_cluster, store) = database().await;
    let short = Duration::from_millis(400);
    let (dead, alive, reaper) = (queue(&store, "dead", short), queue(&store, "alive", short), queue(&store, "reaper", short));
    let lost = queued(&store, &dead, 20, None).await;
    let kept = queued(&store, &alive, 10, None).await;
    assert_eq!(dead.claim("w", None).await.unwrap().id, lost);
    assert_eq!(alive.claim("w", None).await.unwrap().id, kept);
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (held, _) = alive.renew(&[kept]).await.unwrap();
        assert_eq!(held, vec![kept]);
    }
    let expired = reaper.take_expired(&[]).await.unwrap();
    assert_eq!(expired.iter().map(|e| (e.id, e.claims)).collect::<Vec<_>>(), vec![(lost, 1)], "only the unrenewed lease, claimed once");
    let (held, _) = dead.renew(&[lost]).await.unwrap();
    assert!(held.is_empty(), "the dead holder holds nothing any more");
    assert!(reaper.take_expired(&[]).await.unwrap().is_empty(), "taken over once, by one instance");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_request_reaches_the_holder_with_its_next_renewal() {
    let (_cluster, store) = database().await;
    let (holder, other) = (queue(&store, "holder", Duration::from_secs(30)), queue(&store, "other", Duration::from_secs(30)));
    let id = queued(&store, &holder, 5, None).await;
    assert!(!other.request_cancel(id).await.unwrap(), "a job nobody holds is canceled through the queue, not by request");
    assert_eq!(holder.claim("w", None).await.unwrap().id, id);
    assert_eq!(holder.renew(&[id]).await.unwrap(), (vec![id], vec![]));
    assert!(other.request_cancel(id).await.unwrap());
    assert_eq!(holder.renew(&[id]).await.unwrap(), (vec![id], vec![id]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_job_is_stored_leased_to_its_own_instance_and_no_other_instance_claims_it() {
    // Warm-up pins a job to one instance's worker: stored unleased, another instance could
    // claim it between the insert and the pin, and warm the wrong GPU.
    let (_cluster, store) = database().await;
    let other = queue(&store, "other", Duration::from_secs(30));
    let own = queue(&store, store.instance_id(), Duration::from_secs(30));
    let mut workflow = serde_json::Map::new();
    workflow.insert("1".into(), serde_json::json!({"class_type": "EmptyImage", "inputs": {}}));
    let job = Job::new(JobSource::Api, JobSpec::new(workflow), Duration::from_secs(3600));
    store.insert_pinned_job(&job, &[], SystemTime::now() + Duration::from_secs(30)).await.unwrap();
    assert!(tokio::time::timeout(Duration::from_millis(800), other.claim("w", None)).await.is_err(), "another instance claimed a pinned job");
    assert_eq!(own.renew(&[job.id]).await.unwrap(), (vec![job.id], vec![]), "the pinning instance holds its lease");
}
