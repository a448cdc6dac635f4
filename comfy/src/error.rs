//! The error vocabulary of the ComfyUI backend: every way a run can fail, carrying the facts
//! (node ids, ComfyUI's error kinds, exception texts) the host needs to build problem+json.
//! This module never decides HTTP statuses; it only names what happened.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// One validation problem with one node, in ComfyUI's own terms.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeIssue {
    /// The node id in the graph (empty when the problem concerns the whole graph, e.g. `prompt_no_outputs`).
    pub node_id: String,
    /// The node's `class_type` (empty when unknown).
    pub class_type: String,
    /// ComfyUI's error type, e.g. `value_not_in_list`, `required_input_missing`, `invalid_prompt`.
    pub kind: String,
    /// The input concerned, when there is one.
    pub input_name: Option<String>,
    /// ComfyUI's message plus details, readable by a person.
    pub message: String,
}

impl std::fmt::Display for NodeIssue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A whole-graph issue (no node) is just its message.
        if self.node_id.is_empty() {
            return write!(f, "{} [{}]", self.message, self.kind);
        }
        write!(f, "node {}", self.node_id)?;
        if !self.class_type.is_empty() {
            write!(f, " ({})", self.class_type)?;
        }
        if let Some(input) = &self.input_name {
            write!(f, " input {input}")?;
        }
        write!(f, ": {} [{}]", self.message, self.kind)
    }
}

/// Everything that can go wrong between submitting a graph and holding its output bytes.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ComfyError {
    /// ComfyUI cannot be reached, answered 5xx, restarted, or is known to be down.
    /// The host answers 503 with Retry-After.
    #[error("ComfyUI unavailable: {detail}")]
    Unavailable { detail: String },

    /// ComfyUI rejected the graph (400 from POST /prompt, or a 200 with non-empty `node_errors`).
    #[error(
        "ComfyUI rejected the workflow ({error_type}): {message}{}",
        issues_suffix(node_errors)
    )]
    Validation {
        error_type: String,
        message: String,
        node_errors: Vec<NodeIssue>,
    },

    /// A node raised while executing.
    #[error("node {node_id} ({node_type}) failed: {exception_type}: {exception_message}")]
    Execution {
        prompt_id: String,
        node_id: String,
        node_type: String,
        exception_type: String,
        exception_message: String,
        traceback: Vec<String>,
    },

    /// The prompt was interrupted (by us on a deadline/cancel, or by someone else).
    #[error("prompt {prompt_id} was interrupted{}", node_id.as_ref().map(|n| format!(" at node {n}")).unwrap_or_default())]
    Interrupted {
        prompt_id: String,
        node_id: Option<String>,
        node_type: Option<String>,
    },

    /// The deadline expired; the prompt has been interrupted / removed from the queue.
    #[error("prompt {prompt_id} did not finish within {waited:?}; it was interrupted")]
    Timeout { prompt_id: String, waited: Duration },

    /// ComfyUI said something this client does not understand.
    #[error("unexpected answer from ComfyUI: {detail}")]
    Protocol { detail: String },

    /// The prompt succeeded but a requested output node produced no media.
    #[error("output node {node_id} produced no media")]
    OutputMissing { node_id: String },

    /// The prompt succeeded, but raw-pixel outputs its raster node sent never arrived (the
    /// websocket dropped while they were on it). [`crate::ComfyBackend::run`] re-runs such a
    /// prompt with file outputs, so callers see this only if they call the run loop directly.
    #[error("output node {node_id} sent {sent} images over the websocket; {received} arrived")]
    OutputsLost { prompt_id: String, node_id: String, sent: usize, received: usize },
}

fn issues_suffix(issues: &[NodeIssue]) -> String {
    if issues.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = issues.iter().map(ToString::to_string).collect();
    format!(" — {}", parts.join("; "))
}

impl ComfyError {
    pub(crate) fn unavailable(detail: impl Into<String>) -> Self {
        ComfyError::Unavailable {
            detail: detail.into(),
        }
    }
    pub(crate) fn protocol(detail: impl Into<String>) -> Self {
        ComfyError::Protocol {
            detail: detail.into(),
        }
    }

    /// Classify a reqwest failure: transport problems mean ComfyUI is unavailable.
    pub(crate) fn from_transport(what: &str, err: &reqwest::Error) -> Self {
        if err.is_decode() {
            ComfyError::protocol(format!("{what}: {err}"))
        } else {
            ComfyError::unavailable(format!("{what}: {}", error_chain(err)))
        }
    }
}

/// `err` and all its sources, joined, so "connection refused" is not hidden behind "error sending request".
pub(crate) fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
