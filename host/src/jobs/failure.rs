//! Every way a job can fail or be refused, in domain terms: what happened and the
//! facts the caller needs (field, node + class, model file, traceback). Statuses
//! are decided once at the edge (`http::job_errors` for problem+json, the v2
//! envelope in `http/`), never here. Classification is by *whose* fault it is,
//! never by searching error text:
//! - the caller's own graph failing validation → [`JobFailure::InvalidWorkflow`] with `caller_fault`;
//! - a graph the plugin built failing validation → the same with `caller_fault: false`;
//! - a model file the graph names missing from the volume → [`JobFailure::ModelMissing`].
//!
//! Persisted with the job (serde), so a job read back after a restart carries the
//! same failure a sync caller saw.

use flowhost_comfy::{ComfyError, NodeIssue};
use serde::{Deserialize, Serialize};

use crate::events::FailureKind;

/// Seconds a caller should wait after ComfyUI was found down.
pub const RETRY_AFTER_DOWN: u64 = 10;

/// `reason` without where ComfyUI lives: URLs (`http://127.0.0.1:8188/system_stats`) and bare
/// `host:port` pairs are internal detail a caller must not see (they stay in the log).
pub fn public_reason(reason: &str) -> String {
    let words: Vec<String> = reason
        .split(' ')
        .map(|word| {
            let bare = word.trim_matches(|c: char| matches!(c, '(' | ')' | ',' | ';' | '"' | '\'' | '[' | ']'));
            let is_url = ["http://", "https://", "ws://", "wss://"].iter().any(|s| bare.contains(s));
            let is_host_port = bare.rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty() && !port.is_empty() && port.chars().all(|c| c.is_ascii_digit()) && host.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '[' | ']' | ':'))
            });
            if is_url || is_host_port { word.replace(bare, "(ComfyUI)") } else { word.to_string() }
        })
        .collect();
    words.join(" ")
}

/// A job failure or refusal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum JobFailure {
    /// The queue is full; try again after `retry_after_s` (estimated from recent job durations).
    #[error("the queue is full ({depth} jobs waiting)")]
    QueueFull { retry_after_s: u64, depth: usize },
    /// No ComfyUI backend configured, or it is down.
    #[error("ComfyUI is not available: {detail}")]
    ComfyUnavailable { detail: String, retry_after_s: u64 },
    /// ComfyUI has not answered yet.
    #[error("ComfyUI is starting")]
    ComfyStarting { retry_after_s: u64 },
    /// The endpoint lacks node classes or model files.
    #[error("{route} cannot run: {}", missing.join("; "))]
    NotReady { route: String, plugin: String, missing: Vec<String> },
    /// An input the job needs is unusable (bad image, missing file on the inputs volume).
    #[error("{field}: {message}")]
    Input { field: String, message: String, not_found: bool },
    /// A file the request names by reference (a model or an image, by URL or asset) could
    /// not be fetched or used: `reason` says whose fault and how (the edge picks the status).
    #[error("{field}: {message}")]
    Fetch { field: String, message: String, reason: FetchReason },
    /// The graph fails validation (flowhost's preflight or ComfyUI's).
    #[error("the workflow is invalid ({error_type}): {}", summary(issues))]
    InvalidWorkflow { issues: Vec<NodeIssue>, error_type: String, caller_fault: bool },
    /// A model file the graph names is not on the volume.
    #[error("a model file is missing: {}", summary(issues))]
    ModelMissing { issues: Vec<NodeIssue> },
    /// A node raised while executing.
    #[error("node {node_id} ({class_type}) raised {exception_type}: {exception_message}")]
    Execution { prompt_id: String, node_id: String, class_type: String, exception_type: String, exception_message: String, traceback: Vec<String> },
    /// An execution error the plugin explained in its own words (`explain-failure`).
    #[error("{title}: {detail}")]
    Explained { status: u16, title: String, detail: String, field: Option<String>, node_id: String, class_type: String },
    /// Interrupted in ComfyUI by someone else.
    #[error("prompt {prompt_id} was interrupted in ComfyUI")]
    Interrupted { prompt_id: String, node_id: Option<String>, class_type: Option<String> },
    /// The deadline passed (queue wait, uploads, execution or output fetching): which
    /// phase ran out and the limit that applied, so a 504 names the slow part.
    #[error("{}", timeout_message(prompt_id.as_deref(), *waited_ms, *phase, *limit))]
    Timeout {
        prompt_id: Option<String>,
        waited_ms: u64,
        /// The phase the job was in when its time ran out (absent in jobs stored before it was recorded).
        #[serde(default)]
        phase: Option<RunPhase>,
        /// The limit that ran out.
        #[serde(default)]
        limit: Option<TimeLimit>,
    },
    /// ComfyUI answered something flowhost does not understand.
    #[error("ComfyUI answered unexpectedly: {detail}")]
    Protocol { detail: String },
    /// The workflow finished without the expected output.
    #[error("output node {node_id} produced no image or video")]
    OutputMissing {
        node_id: String,
        /// The caller wrote the graph (`/workflow`, v2): their mistake, not the plugin's.
        #[serde(default)]
        caller_fault: bool,
    },
    /// ComfyUI's output could not be decoded/encoded.
    #[error("ComfyUI's output could not be encoded: {detail}")]
    OutputUnreadable { detail: String },
    /// The job was canceled (a sync waiter sees this).
    #[error("the job was canceled")]
    Canceled,
    /// flowhost restarted while the job ran and ComfyUI no longer knew the prompt.
    #[error("flowhost restarted while the job was running and ComfyUI no longer has its prompt")]
    HostRestarted,
    /// The instance running the job stopped renewing its lease (it died or lost the
    /// shared store) twice: the job was re-queued once, then given up on. Issue #12.
    #[error("the flowhost instance running the job was lost (the job was retried once)")]
    WorkerLost,
    /// The plugin needed to finish the job failed.
    #[error("the plugin failed: {detail}")]
    PluginFailed { detail: String },
    /// A flowhost-internal failure (store, blob store, task).
    #[error("internal error: {detail}")]
    Internal { detail: String },
}

/// Why a fetched file failed, by whose fault (each maps to one status at the edge).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FetchReason {
    /// The reference is malformed, not https, or this server takes no such reference (400).
    Malformed,
    /// The destination guard refused the URL or a redirect (400).
    Refused,
    /// No such asset or volume file (404).
    NotFound,
    /// Larger than the cap (413).
    TooLarge,
    /// The bytes do not match the digest named, or are no file of the kind needed (422).
    Unusable,
    /// The upstream server failed or answered an error (502).
    Upstream,
    /// The deadline passed while fetching (504).
    Timeout,
    /// Flowhost's own storage failed (500) or the blob store is unreachable (503).
    Internal,
    Unavailable,
}

/// Where a job stood when its deadline passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunPhase {
    /// Waiting in flowhost's queue for a free slot; nothing ran.
    Queue,
    /// Uploading the job's inputs to ComfyUI.
    Upload,
    /// Validated, submitted, queued or executing in ComfyUI.
    ComfyUi,
    /// Fetching, encoding and storing the outputs.
    OutputFetch,
}

impl RunPhase {
    /// The phase in words, as it ends "the job ran out of time while …".
    pub fn doing(self) -> &'static str {
        match self {
            RunPhase::Queue => "waiting in the queue for a free slot",
            RunPhase::Upload => "uploading its inputs to ComfyUI",
            RunPhase::ComfyUi => "running in ComfyUI",
            RunPhase::OutputFetch => "fetching its outputs from ComfyUI",
        }
    }
}

/// The limit a job ran under: the operator's `--job-timeout`, or a synchronous request's
/// own (shorter) deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimeLimit {
    pub ms: u64,
    pub source: LimitSource,
}

/// Which limit applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitSource {
    /// `--job-timeout`.
    JobTimeout,
    /// The synchronous request's deadline (admission plus `--job-timeout`).
    RequestDeadline,
}

impl std::fmt::Display for TimeLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = self.ms as f64 / 1000.0;
        let by = match self.source {
            LimitSource::JobTimeout => "--job-timeout",
            LimitSource::RequestDeadline => "the request's deadline",
        };
        if self.ms.is_multiple_of(1000) { write!(f, "limit {} s, {by}", self.ms / 1000) } else { write!(f, "limit {secs:.1} s, {by}") }
    }
}

/// A timeout in words: the phase that ran out and the real limit when known, else the wait.
pub fn timeout_message(prompt_id: Option<&str>, waited_ms: u64, phase: Option<RunPhase>, limit: Option<TimeLimit>) -> String {
    let nothing_ran = if phase == Some(RunPhase::Queue) { "; nothing ran" } else { "" };
    match (phase, limit) {
        (Some(phase), Some(limit)) => format!("the job ran out of time while {} ({limit}){nothing_ran}", phase.doing()),
        (Some(phase), None) => format!("the job ran out of time while {} (after {} s){nothing_ran}", phase.doing(), waited_ms / 1000),
        (None, _) => match prompt_id {
            Some(p) => format!("prompt {p} did not finish within {} s", waited_ms / 1000),
            None => format!("the job did not finish within {waited_ms} ms"),
        },
    }
}

fn summary(issues: &[NodeIssue]) -> String {
    issues.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

impl JobFailure {
    /// The stable machine-readable code (the v2 `JobError.code`).
    pub fn code(&self) -> &'static str {
        match self {
            JobFailure::QueueFull { .. } => "queue_full",
            JobFailure::ComfyUnavailable { .. } => "comfyui_unavailable",
            JobFailure::ComfyStarting { .. } => "comfyui_starting",
            JobFailure::NotReady { .. } => "endpoint_not_ready",
            JobFailure::Input { .. } => "invalid_input",
            JobFailure::Fetch { reason, .. } => match reason {
                FetchReason::Malformed | FetchReason::Refused | FetchReason::Unusable | FetchReason::TooLarge => "invalid_input",
                FetchReason::NotFound => "not_found",
                FetchReason::Upstream => "fetch_failed",
                FetchReason::Timeout => "timeout",
                FetchReason::Internal | FetchReason::Unavailable => "internal",
            },
            JobFailure::InvalidWorkflow { .. } => "invalid_workflow",
            JobFailure::ModelMissing { .. } => "model_missing",
            JobFailure::Execution { .. } => "node_execution_error",
            JobFailure::Explained { .. } => "node_execution_error",
            JobFailure::Interrupted { .. } => "interrupted",
            JobFailure::Timeout { .. } => "timeout",
            JobFailure::Protocol { .. } => "comfyui_protocol_error",
            JobFailure::OutputMissing { .. } => "output_missing",
            JobFailure::OutputUnreadable { .. } => "output_unreadable",
            JobFailure::Canceled => "canceled",
            JobFailure::HostRestarted => "host_restarted",
            JobFailure::WorkerLost => "worker_lost",
            JobFailure::PluginFailed { .. } => "plugin_failed",
            JobFailure::Internal { .. } => "internal",
        }
    }

    /// A message for people (no hosts, ports or paths).
    pub fn message(&self) -> String {
        self.to_string()
    }

    /// The node concerned, when there is one.
    pub fn node_id(&self) -> Option<&str> {
        match self {
            JobFailure::Execution { node_id, .. } | JobFailure::Explained { node_id, .. } => Some(node_id),
            JobFailure::Interrupted { node_id, .. } => node_id.as_deref(),
            JobFailure::OutputMissing { node_id, .. } => Some(node_id),
            JobFailure::InvalidWorkflow { issues, .. } | JobFailure::ModelMissing { issues } => issues.first().map(|i| i.node_id.as_str()).filter(|s| !s.is_empty()),
            _ => None,
        }
    }

    pub fn class_type(&self) -> Option<&str> {
        match self {
            JobFailure::Execution { class_type, .. } | JobFailure::Explained { class_type, .. } => Some(class_type),
            JobFailure::Interrupted { class_type, .. } => class_type.as_deref(),
            JobFailure::InvalidWorkflow { issues, .. } | JobFailure::ModelMissing { issues } => issues.first().map(|i| i.class_type.as_str()).filter(|s| !s.is_empty()),
            _ => None,
        }
    }

    /// ComfyUI's traceback, joined, when it gave one.
    pub fn traceback(&self) -> Option<String> {
        match self {
            JobFailure::Execution { traceback, .. } if !traceback.is_empty() => Some(traceback.concat()),
            _ => None,
        }
    }

    /// The prompt concerned, when there is one.
    pub fn prompt_id(&self) -> Option<&str> {
        match self {
            JobFailure::Execution { prompt_id, .. } | JobFailure::Interrupted { prompt_id, .. } => Some(prompt_id),
            JobFailure::Timeout { prompt_id, .. } => prompt_id.as_deref(),
            _ => None,
        }
    }

    /// The seed's analytics `error_type`.
    pub fn failure_kind(&self) -> FailureKind {
        match self {
            JobFailure::Timeout { .. } => FailureKind::Timeout,
            JobFailure::ModelMissing { .. } | JobFailure::NotReady { .. } => FailureKind::ModelError,
            JobFailure::Execution { class_type, .. } if class_type.contains("Loader") => FailureKind::ModelError,
            _ => FailureKind::WorkflowError,
        }
    }

    /// Refused before any work (the caller may retry later): no job is worth keeping.
    pub fn is_refusal(&self) -> bool {
        matches!(self, JobFailure::QueueFull { .. } | JobFailure::ComfyUnavailable { .. } | JobFailure::ComfyStarting { .. } | JobFailure::NotReady { .. })
    }

    pub fn internal(detail: impl std::fmt::Display) -> JobFailure {
        JobFailure::Internal { detail: detail.to_string() }
    }
}

/// Is this issue a model file that is not on the volume? Model names are plain
/// combos in ComfyUI, so "value not in list" on a loader's `*_name` input is it.
pub fn is_missing_model(issue: &NodeIssue) -> bool {
    issue.kind == "value_not_in_list" && (issue.class_type.contains("Loader") || issue.input_name.as_deref().is_some_and(|i| i.ends_with("_name")))
}

/// Classify validation issues by whose fault they are.
pub fn validation_failure(issues: Vec<NodeIssue>, caller_nodes: &[String], error_type: &str) -> JobFailure {
    let caller_fault = !caller_nodes.is_empty() && issues.iter().all(|i| i.node_id.is_empty() || caller_nodes.contains(&i.node_id));
    let all_models = !issues.is_empty() && issues.iter().all(is_missing_model);
    if !caller_fault && all_models {
        return JobFailure::ModelMissing { issues };
    }
    JobFailure::InvalidWorkflow { issues, error_type: error_type.to_string(), caller_fault }
}

/// Classify a ComfyUI failure. `Execution` is usually offered to the plugin's
/// `explain-failure` first; this is the generic answer.
pub fn from_comfy(err: ComfyError, caller_nodes: &[String]) -> JobFailure {
    match err {
        ComfyError::Unavailable { detail } => JobFailure::ComfyUnavailable { detail, retry_after_s: RETRY_AFTER_DOWN },
        ComfyError::Validation { error_type, message, node_errors } => {
            let issues = if node_errors.is_empty() {
                vec![NodeIssue { node_id: String::new(), class_type: String::new(), kind: error_type.clone(), input_name: None, message }]
            } else {
                node_errors
            };
            validation_failure(issues, caller_nodes, &error_type)
        }
        ComfyError::Execution { prompt_id, node_id, node_type, exception_type, exception_message, traceback } => {
            JobFailure::Execution { prompt_id, node_id, class_type: node_type, exception_type, exception_message, traceback }
        }
        ComfyError::Interrupted { prompt_id, node_id, node_type } => JobFailure::Interrupted { prompt_id, node_id, class_type: node_type },
        ComfyError::Timeout { prompt_id, waited } => JobFailure::Timeout { prompt_id: Some(prompt_id), waited_ms: waited.as_millis() as u64, phase: None, limit: None },
        ComfyError::Protocol { detail } => JobFailure::Protocol { detail },
        ComfyError::OutputMissing { node_id } => JobFailure::OutputMissing { node_id, caller_fault: !caller_nodes.is_empty() },
        // The backend re-runs such a prompt with files; reaching here means it could not.
        e @ ComfyError::OutputsLost { .. } => JobFailure::ComfyUnavailable { detail: e.to_string(), retry_after_s: RETRY_AFTER_DOWN },
    }
}

/// The limit a job runs under and the instant it ends: `--job-timeout` from the start of
/// the run, or a synchronous request's deadline when that comes first. A sync request's
/// deadline is `--job-timeout` counted from admission (the queue wait included): reported as
/// `--job-timeout` when it is exactly that, else as the request's own deadline.
/// The failure of a job whose time ran out before it left the queue: how long it waited and
/// the limit it was under ([`job_limit`]). Takes the job's times, not the job: the job model
/// imports this module.
pub(super) fn queue_timeout(
    job_timeout: std::time::Duration,
    created_at: std::time::SystemTime,
    request_deadline: Option<std::time::SystemTime>,
) -> JobFailure {
    let waited_ms = created_at.elapsed().unwrap_or_default().as_millis() as u64;
    let (_, limit) = job_limit(job_timeout, created_at, request_deadline);
    JobFailure::Timeout { prompt_id: None, waited_ms, phase: Some(RunPhase::Queue), limit: Some(limit) }
}

pub(super) fn job_limit(
    job_timeout: std::time::Duration,
    created_at: std::time::SystemTime,
    request_deadline: Option<std::time::SystemTime>,
) -> (std::time::Instant, TimeLimit) {
    let now = std::time::Instant::now();
    let mut deadline = now + job_timeout;
    let mut limit = TimeLimit {
        ms: job_timeout.as_millis() as u64,
        source: LimitSource::JobTimeout,
    };
    if let Some(at) = request_deadline {
        let left = at
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default();
        if now + left < deadline {
            deadline = now + left;
            let total = at.duration_since(created_at).unwrap_or_default();
            if total.abs_diff(job_timeout) > std::time::Duration::from_millis(100) {
                limit = TimeLimit {
                    ms: total.as_millis() as u64,
                    source: LimitSource::RequestDeadline,
                };
            }
        }
    }
    (deadline, limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issue(node: &str, class: &str, kind: &str, input: &str) -> NodeIssue {
        NodeIssue { node_id: node.into(), class_type: class.into(), kind: kind.into(), input_name: Some(input.into()), message: format!("{input}: bad") }
    }

    #[test]
    fn whose_fault_decides_the_kind() {
        let f = validation_failure(vec![issue("5", "KSampler", "value_bigger_than_max", "steps")], &["5".into()], "x");
        assert!(matches!(f, JobFailure::InvalidWorkflow { caller_fault: true, .. }));
        let f = validation_failure(vec![issue("5", "KSampler", "value_bigger_than_max", "steps")], &[], "x");
        assert!(matches!(f, JobFailure::InvalidWorkflow { caller_fault: false, .. }));
        let f = validation_failure(vec![issue("1", "UNETLoader", "value_not_in_list", "unet_name")], &[], "x");
        assert!(matches!(f, JobFailure::ModelMissing { .. }));
        assert_eq!(f.failure_kind(), FailureKind::ModelError);
    }

    #[test]
    fn a_failure_survives_the_store_round_trip() {
        let f = JobFailure::Execution {
            prompt_id: "p".into(),
            node_id: "9".into(),
            class_type: "KSampler".into(),
            exception_type: "RuntimeError".into(),
            exception_message: "HTTP 503 from somewhere".into(),
            traceback: vec!["a\n".into(), "b\n".into()],
        };
        let back: JobFailure = serde_json::from_value(serde_json::to_value(&f).unwrap()).unwrap();
        assert_eq!(back, f);
        assert_eq!(back.code(), "node_execution_error");
        assert_eq!(back.node_id(), Some("9"));
        assert_eq!(back.traceback().as_deref(), Some("a\nb\n"));
    }

    #[test]
    fn a_timeout_names_its_phase_and_limit_and_old_documents_still_read() {
        let f = JobFailure::Timeout {
            prompt_id: None,
            waited_ms: 5100,
            phase: Some(RunPhase::Upload),
            limit: Some(TimeLimit { ms: 5000, source: LimitSource::JobTimeout }),
        };
        assert_eq!(f.message(), "the job ran out of time while uploading its inputs to ComfyUI (limit 5 s, --job-timeout)");
        let back: JobFailure = serde_json::from_value(serde_json::to_value(&f).unwrap()).unwrap();
        assert_eq!(back, f);
        // A job stored before phases were recorded reads back with none.
        let old: JobFailure = serde_json::from_value(serde_json::json!({"kind": "timeout", "prompt_id": "p", "waited_ms": 4000})).unwrap();
        assert_eq!(old, JobFailure::Timeout { prompt_id: Some("p".into()), waited_ms: 4000, phase: None, limit: None });
        assert_eq!(old.message(), "prompt p did not finish within 4 s");
        let queued = JobFailure::Timeout { prompt_id: None, waited_ms: 2000, phase: Some(RunPhase::Queue), limit: Some(TimeLimit { ms: 2000, source: LimitSource::JobTimeout }) };
        assert_eq!(queued.message(), "the job ran out of time while waiting in the queue for a free slot (limit 2 s, --job-timeout); nothing ran");
        let sync = TimeLimit { ms: 2500, source: LimitSource::RequestDeadline };
        assert_eq!(sync.to_string(), "limit 2.5 s, the request's deadline");
    }
}
