//! Following a job through the store when it is not live in this process (issue #12):
//! in the shared setup a job runs on whichever instance claimed it, and a request on
//! another instance — a sync waiter, an SSE stream — reads its progress and its end from
//! the shared store, polled at [`POLL`] (the runner stores progress at most every
//! `PROGRESS_INTERVAL`; this reads at more than twice that rate). Every SSE stream of one
//! job on this instance shares one poller (issue #22: 500 streams made 500 pollers), so
//! the store's load grows with the jobs followed, not with their listeners.
//!
//! Owns: the polling followers. Must never: write the job (the holder does), or keep
//! polling for a stream nobody reads.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::broadcast;
use uuid::Uuid;

use super::failure::JobFailure;
use super::lock;
use super::model::{Job, JobEvent};
use super::store::JobStore;

/// How often a follower reads the job (4 Hz).
pub const POLL: Duration = Duration::from_millis(250);

/// The job service's part that follows jobs through the store.
pub struct Follow {
    store: Arc<dyn JobStore>,
    /// One store poller per job followed, shared by its listeners.
    followers: Arc<Mutex<Followers>>,
}

impl Follow {
    pub fn new(store: Arc<dyn JobStore>) -> Follow {
        Follow {
            store,
            followers: Arc::default(),
        }
    }

    /// Poll the store until the job is terminal or `deadline` passes; the job as last
    /// read (`None`: it vanished).
    pub async fn until_terminal(
        &self,
        id: Uuid,
        deadline: Option<Instant>,
    ) -> Result<Option<Job>, JobFailure> {
        loop {
            let job = self.store.get_job(id).await.map_err(JobFailure::internal)?;
            match job {
                Some(job) if !job.status.is_terminal() && deadline.is_none_or(|d| Instant::now() < d) => {}
                other => return Ok(other),
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// A receiver of `job`'s events read from the store: `Status` on every change of
    /// status, `Progress` when the stored progress moves, `Output` for each new output;
    /// closed after the terminal status (or when the job vanishes, or nobody listens).
    /// A listener that joins a job already followed shares its poller.
    pub fn events(&self, job: &Job) -> broadcast::Receiver<JobEvent> {
        let mut followers = lock(&self.followers);
        if let Some(tx) = followers.get(&job.id) {
            return tx.subscribe();
        }
        let (tx, rx) = broadcast::channel(64);
        followers.insert(job.id, tx.clone());
        drop(followers);
        let service = self.followers.clone();
        let store = self.store.clone();
        let mut last = job.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(POLL).await;
                // Nobody listens: leave, unless one joined (under the lock) since.
                if tx.receiver_count() == 0 && retire(&service, last.id, |_| tx.receiver_count() == 0) {
                    return;
                }
                let Ok(Some(now)) = store.get_job(last.id).await else {
                    retire(&service, last.id, |_| true);
                    return;
                };
                for output in now.outputs.iter().skip(last.outputs.len()) {
                    let _ = tx.send(JobEvent::Output(output.clone()));
                }
                if now.progress != last.progress
                    && let Some(progress) = &now.progress
                {
                    let _ = tx.send(JobEvent::Progress(progress.clone()));
                }
                if now.status != last.status {
                    let _ = tx.send(JobEvent::Status(Box::new(now.clone())));
                }
                let done = now.status.is_terminal();
                last = now;
                if done {
                    // A listener joining after this reads a closed channel and re-reads the
                    // (terminal) job from the store.
                    retire(&service, last.id, |_| true);
                    return;
                }
            }
        });
        rx
    }
}

/// The jobs followed through the store, each with the sender its listeners subscribe to.
type Followers = HashMap<Uuid, broadcast::Sender<JobEvent>>;

/// Remove job `id`'s follower when `gone` says so (checked under the lock); whether it did.
fn retire(followers: &Mutex<Followers>, id: Uuid, gone: impl FnOnce(&Followers) -> bool) -> bool {
    let mut followers = lock(followers);
    if !gone(&followers) {
        return false;
    }
    followers.remove(&id);
    true
}
