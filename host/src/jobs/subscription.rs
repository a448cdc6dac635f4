//! What a job's webhook subscription says: the events it asks for and where they go. Stored
//! with the job (its document) and read when the job's state changes, so it belongs to the
//! jobs; `webhooks` vets destinations and sends.

use serde::{Deserialize, Serialize};

/// A job event a subscription may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum JobEventType {
    #[serde(rename = "job.started")]
    Started,
    #[serde(rename = "job.succeeded")]
    Succeeded,
    #[serde(rename = "job.failed")]
    Failed,
    #[serde(rename = "job.canceled")]
    Canceled,
}

impl JobEventType {
    pub const TERMINAL: [JobEventType; 3] = [
        JobEventType::Succeeded,
        JobEventType::Failed,
        JobEventType::Canceled,
    ];
    pub const ALL: [JobEventType; 4] = [
        JobEventType::Started,
        JobEventType::Succeeded,
        JobEventType::Failed,
        JobEventType::Canceled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobEventType::Started => "job.started",
            JobEventType::Succeeded => "job.succeeded",
            JobEventType::Failed => "job.failed",
            JobEventType::Canceled => "job.canceled",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|event| event.as_str() == text)
    }

    /// The event a job's new v2 status means, if any (`expired` and the intermediate
    /// states send nothing).
    pub fn for_status(status: &str) -> Option<Self> {
        match status {
            "running" => Some(JobEventType::Started),
            "succeeded" => Some(JobEventType::Succeeded),
            "failed" => Some(JobEventType::Failed),
            "canceled" => Some(JobEventType::Canceled),
            _ => None,
        }
    }
}

/// A caller's subscription for one job, stored with the job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscription {
    pub url: String,
    pub events: Vec<JobEventType>,
}
