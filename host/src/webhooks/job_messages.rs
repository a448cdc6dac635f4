//! The bridge from the job service to the outbox: which messages a job's state change
//! makes (the job's own subscription and the operator's), with the v2 Job as `data`.
//!
//! Owns only that mapping. Must never do I/O: it runs inside the job store's transition
//! step, whose transaction also stores the messages.

use std::time::SystemTime;

use serde_json::Value;

use super::outbox::NewDelivery;
use super::{JobEventType, Webhooks};
use crate::jobs::{Job, TransitionMessages};

/// [`TransitionMessages`] over [`Webhooks`]; `view` renders the v2 Job object (it lives in
/// `http/`, which this room must not import, so the assembly hands it in).
pub struct JobMessages {
    webhooks: Webhooks,
    view: fn(&Job) -> Value,
}

impl JobMessages {
    pub fn new(webhooks: Webhooks, view: fn(&Job) -> Value) -> Self {
        Self { webhooks, view }
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
        self.webhooks.messages_for(&job.id.to_string(), event, &(self.view)(job), job.spec.webhook.as_ref(), at)
    }

    fn committed(&self) {
        self.webhooks.committed();
    }
}
