//! Following a job through the store when it is not live in this process (issue #12):
//! in the shared setup a job runs on whichever instance claimed it, and a request on
//! another instance — a sync waiter, an SSE stream — reads its progress and its end from
//! the shared store, polled at [`POLL`] (the runner stores progress at most every
//! `PROGRESS_INTERVAL`; this reads at more than twice that rate).
//!
//! Owns: the polling followers. Must never: write the job (the holder does), or keep
//! polling for a stream nobody reads.

use std::time::{Duration, Instant};

use tokio::sync::broadcast;
use uuid::Uuid;

use super::failure::JobFailure;
use super::model::{Job, JobEvent};
use super::service::JobService;

/// How often a follower reads the job (4 Hz).
pub const POLL: Duration = Duration::from_millis(250);

impl JobService {
    /// Poll the store until the job is terminal or `deadline` passes; the job as last
    /// read (`None`: it vanished).
    pub(super) async fn follow_until_terminal(&self, id: Uuid, deadline: Option<Instant>) -> Result<Option<Job>, JobFailure> {
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
    pub(super) fn follow_events(&self, job: &Job) -> broadcast::Receiver<JobEvent> {
        let (tx, rx) = broadcast::channel(64);
        let store = self.store.clone();
        let mut last = job.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(POLL).await;
                if tx.receiver_count() == 0 {
                    return;
                }
                let Ok(Some(now)) = store.get_job(last.id).await else { return };
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
                    return;
                }
            }
        });
        rx
    }
}
