//! Where accepted jobs wait for a worker: the [`WorkQueue`] seam and its in-memory
//! implementation [`LocalQueue`]. The queue holds only ids, model keys and ages — the
//! job itself is in the [`super::store::JobStore`] before it is pushed, so a queue
//! lost with the process loses nothing (recovery pushes the stored queued jobs again).
//!
//! Which job a worker claims is decided by [`super::affinity::pick`], the same pure rule
//! for every implementation (a shared SQL queue applies it to the rows it locked).
//!
//! Must never: hold a lock across an await, hand one job to two workers, or decide
//! anything about a job but its order.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use async_trait::async_trait;
use tokio::sync::Notify;
use uuid::Uuid;

use super::affinity::{Candidate, DispatchRule, pick};
use super::lock;
use super::store::StoreResult;

/// The queue of jobs waiting for a worker. Every call is cancel-safe: a `claim` future
/// dropped before it resolved has claimed nothing.
#[async_trait]
pub trait WorkQueue: Send + Sync {
    /// Add a job that is already stored with status `queued`. Returns its position
    /// (0 = next in age order).
    async fn push(&self, job: Candidate) -> StoreResult<usize>;
    /// Wait until a job is queued, then take the one [`pick`] chooses for a worker named
    /// `worker` whose loaded model key is `loaded` (the key of the last job it ran).
    async fn claim(&self, worker: &str, loaded: Option<&str>) -> StoreResult<Candidate>;
    /// Take a queued job out (cancel, a timeout in the queue). `false`: it was not queued
    /// (already claimed, or never pushed).
    async fn remove(&self, id: Uuid) -> StoreResult<bool>;
    /// The job's position in age order, `None` when it is not queued.
    async fn position(&self, id: Uuid) -> StoreResult<Option<usize>>;
    /// Jobs waiting now.
    async fn depth(&self) -> StoreResult<usize>;
}

/// The in-memory queue of one flowhost process.
pub struct LocalQueue {
    rule: DispatchRule,
    inner: Mutex<Inner>,
    changed: Notify,
    next_waiter: AtomicU64,
}

#[derive(Default)]
struct Inner {
    /// Oldest first (recovery pushes in stored order, admission appends).
    order: VecDeque<Candidate>,
    /// Claims waiting now (waiter id → the model key its worker has loaded): a job one of
    /// them has loaded is left to it ([`pick`]'s `idle_elsewhere`).
    idle: Vec<(u64, Option<String>)>,
}

/// Takes a waiting claim out of [`Inner::idle`] however the claim ends (cancel-safe).
struct IdleGuard<'a> {
    queue: &'a LocalQueue,
    waiter: u64,
}

impl Drop for IdleGuard<'_> {
    fn drop(&mut self) {
        lock(&self.queue.inner).idle.retain(|(w, _)| *w != self.waiter);
    }
}

impl LocalQueue {
    pub fn new(rule: DispatchRule) -> Self {
        LocalQueue { rule, inner: Mutex::new(Inner::default()), changed: Notify::new(), next_waiter: AtomicU64::new(0) }
    }

    pub fn rule(&self) -> DispatchRule {
        self.rule
    }

    /// Take now what [`pick`] chooses, if anything; otherwise register `waiter` as idle.
    fn try_claim(&self, waiter: u64, loaded: Option<&str>) -> Option<Candidate> {
        let mut inner = lock(&self.inner);
        let Inner { order, idle } = &mut *inner;
        let elsewhere: Vec<&str> = idle.iter().filter(|(w, _)| *w != waiter).filter_map(|(_, k)| k.as_deref()).collect();
        let index = pick(order.make_contiguous(), loaded, &elsewhere, SystemTime::now(), self.rule);
        match index {
            Some(index) => {
                idle.retain(|(w, _)| *w != waiter);
                order.remove(index)
            }
            None => {
                if !idle.iter().any(|(w, _)| *w == waiter) {
                    idle.push((waiter, loaded.map(str::to_string)));
                }
                None
            }
        }
    }
}

#[async_trait]
impl WorkQueue for LocalQueue {
    async fn push(&self, job: Candidate) -> StoreResult<usize> {
        let position = {
            let mut inner = lock(&self.inner);
            inner.order.push_back(job);
            inner.order.len() - 1
        };
        // Every idle worker looks: the one that finds its own model set first takes it.
        self.changed.notify_waiters();
        Ok(position)
    }

    async fn claim(&self, _worker: &str, loaded: Option<&str>) -> StoreResult<Candidate> {
        let waiter = self.next_waiter.fetch_add(1, Ordering::Relaxed);
        let _idle = IdleGuard { queue: self, waiter };
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(job) = self.try_claim(waiter, loaded) {
                // What this worker left may suit another idle one after all.
                self.changed.notify_waiters();
                return Ok(job);
            }
            notified.await;
        }
    }

    async fn remove(&self, id: Uuid) -> StoreResult<bool> {
        let removed = {
            let mut inner = lock(&self.inner);
            let before = inner.order.len();
            inner.order.retain(|c| c.id != id);
            inner.order.len() != before
        };
        Ok(removed)
    }

    async fn position(&self, id: Uuid) -> StoreResult<Option<usize>> {
        Ok(lock(&self.inner).order.iter().position(|c| c.id == id))
    }

    async fn depth(&self) -> StoreResult<usize> {
        Ok(lock(&self.inner).order.len())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::jobs::affinity::DispatchPolicy;

    fn job(key: &str) -> Candidate {
        Candidate { id: Uuid::new_v4(), model_key: Some(key.into()), queued_at: SystemTime::now() }
    }

    #[tokio::test]
    async fn a_claim_takes_the_loaded_set_and_leaves_the_rest_in_order() {
        let q = LocalQueue::new(DispatchRule::default());
        let (a1, b1, a2) = (job("a"), job("b"), job("a"));
        for j in [&b1, &a1, &a2] {
            q.push(j.clone()).await.unwrap();
        }
        assert_eq!(q.position(a1.id).await.unwrap(), Some(1));
        assert_eq!(q.claim("w0", Some("a")).await.unwrap().id, a1.id);
        assert_eq!(q.claim("w0", Some("a")).await.unwrap().id, a2.id);
        assert_eq!(q.depth().await.unwrap(), 1);
        assert_eq!(q.claim("w0", Some("a")).await.unwrap().id, b1.id, "no match: the oldest");
    }

    #[tokio::test]
    async fn a_job_goes_to_the_idle_worker_that_has_its_models_loaded() {
        let q = Arc::new(LocalQueue::new(DispatchRule::default()));
        // Two idle workers: one with `a` loaded, one with `b`.
        let claim = |loaded: &'static str| {
            let q = q.clone();
            tokio::spawn(async move { q.claim(loaded, Some(loaded)).await.unwrap() })
        };
        let (with_a, with_b) = (claim("a"), claim("b"));
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (b1, a1) = (job("b"), job("a"));
        q.push(b1.clone()).await.unwrap();
        q.push(a1.clone()).await.unwrap();
        let got_b = tokio::time::timeout(Duration::from_secs(5), with_b).await.unwrap().unwrap();
        let got_a = tokio::time::timeout(Duration::from_secs(5), with_a).await.unwrap().unwrap();
        assert_eq!((got_a.id, got_b.id), (a1.id, b1.id), "each took its own set, not the oldest");
    }

    #[tokio::test]
    async fn a_waiting_claim_wakes_on_push_and_a_removed_job_is_never_claimed() {
        let q = Arc::new(LocalQueue::new(DispatchRule { policy: DispatchPolicy::Fifo, ..DispatchRule::default() }));
        let waiting = tokio::spawn({
            let q = q.clone();
            async move { q.claim("w0", None).await.unwrap() }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (gone, kept) = (job("a"), job("b"));
        assert!(!q.remove(gone.id).await.unwrap(), "not queued yet");
        q.push(gone.clone()).await.unwrap();
        let first = tokio::time::timeout(Duration::from_secs(5), waiting).await.unwrap().unwrap();
        assert_eq!(first.id, gone.id);
        q.push(kept.clone()).await.unwrap();
        let other = job("c");
        q.push(other.clone()).await.unwrap();
        assert!(q.remove(kept.id).await.unwrap());
        assert_eq!(q.claim("w0", None).await.unwrap().id, other.id);
        assert_eq!(q.position(kept.id).await.unwrap(), None);
    }
}
