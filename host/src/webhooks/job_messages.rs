//! The bridge from the job service to the outbox: which messages a job's state change
//! makes (the job's own subscription and the operator's), with the v2 Job as `data`.
//!
//! Owns only that mapping. Must never do I/O: it runs inside the job store's transition
//! step, whose transaction also stores the messages.

use std::time::SystemTime;

use super::outbox::NewDelivery;
use super::{JobEventType, Webhooks};
use crate::jobs::view::{Links, job_json};
use crate::jobs::{Job, TransitionMessages};

/// [`TransitionMessages`] over [`Webhooks`]; the message's `data` is the v2 Job document
/// with links under `links` (host-relative: a webhook has no caller's origin).
pub struct JobMessages {
    webhooks: Webhooks,
    links: Links,
}

impl JobMessages {
    pub fn new(webhooks: Webhooks, links: Links) -> Self {
        Self { webhooks, links }
    }
}

impl TransitionMessages for JobMessages {
    fn messages_for(&self, job: &Job) -> Vec<NewDelivery> {
        let Some(event) = JobEventType::for_status(job.status.as_str()) else { return Vec::new() };
        // A warm-up run is the service's own, not a user's job: no message for it.
        if !self.webhooks.enabled() || job.source.is_warm_up() {
            return Vec::new();
        }
        let at = match event {
            JobEventType::Started => job.started_at,
            _ => job.completed_at,
        }
        .unwrap_or_else(SystemTime::now);
        self.webhooks.messages_for(
            &job.id.to_string(),
            event,
            &job_json(job, &self.links),
            job.spec.webhook.as_ref(),
            at,
        )
    }

    fn committed(&self) {
        self.webhooks.committed();
    }
}
