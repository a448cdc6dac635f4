//! Translating ComfyUI's failures into problems a caller can act on, with the
//! facts ComfyUI gave: node id, class, input, exception. Statuses are decided by
//! *whose* fault it is, never by searching error text (the old service grepped
//! for "503"):
//! - the caller's own graph (`/workflow`) failing validation → 400;
//! - a graph the plugin built failing validation → 500 `plugin_built_invalid_workflow`;
//! - a model file the graph names missing from the volume → 503 `model_missing`;
//! - ComfyUI down → 503 with Retry-After; deadline → 504; execution error → 500
//!   (or what the plugin's `explain-failure` says).

use axum::http::StatusCode;
use flowhost_comfy::{ComfyError, NodeIssue};
use serde_json::{Value, json};

use crate::events::FailureKind;
use crate::http::Problem;

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

/// Seconds a caller should wait after a 503 from ComfyUI being down.
pub const RETRY_AFTER_DOWN: u64 = 10;

fn issue_json(issue: &NodeIssue) -> Value {
    json!({
        "node_id": issue.node_id,
        "class_type": issue.class_type,
        "kind": issue.kind,
        "input": issue.input_name,
        "message": issue.message,
    })
}

/// Is this issue a model file that is not on the volume? Model names are plain
/// combos in ComfyUI, so "value not in list" on a loader's `*_name` input is it.
pub fn is_missing_model(issue: &NodeIssue) -> bool {
    issue.kind == "value_not_in_list"
        && (issue.class_type.contains("Loader") || issue.input_name.as_deref().is_some_and(|i| i.ends_with("_name")))
}

/// The request field an issue concerns: `workflow` for the whole graph, `workflow/<node>` for a
/// node, `workflow/<node>/inputs/<input>` for one of its inputs.
fn issue_field(issue: &NodeIssue) -> String {
    match (issue.node_id.as_str(), issue.input_name.as_deref()) {
        ("", _) => "workflow".to_string(),
        (node, None | Some("")) => format!("workflow/{node}"),
        (node, Some(input)) => format!("workflow/{node}/inputs/{input}"),
    }
}

/// Problems for a graph ComfyUI (or our preflight) refused.
pub fn validation_problem(plugin: &str, issues: &[NodeIssue], caller_nodes: &[String], error_type: &str) -> (Problem, FailureKind) {
    let caller_fault = !caller_nodes.is_empty() && issues.iter().all(|i| i.node_id.is_empty() || caller_nodes.contains(&i.node_id));
    let nodes: Vec<Value> = issues.iter().map(issue_json).collect();
    let summary = issues.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
    let missing_models: Vec<&NodeIssue> = issues.iter().filter(|i| is_missing_model(i)).collect();
    if !caller_fault && !missing_models.is_empty() && missing_models.len() == issues.len() {
        let detail = missing_models.iter().map(|i| format!("node {} ({}) {}: {}", i.node_id, i.class_type, i.input_name.as_deref().unwrap_or("?"), i.message)).collect::<Vec<_>>().join("; ");
        return (
            Problem::new(StatusCode::SERVICE_UNAVAILABLE, "model_missing", "A model file is missing", format!("the model volume lacks a file this endpoint needs — {detail}"))
                .with("plugin", plugin)
                .with("nodes", nodes)
                .retry_after(60),
            FailureKind::ModelError,
        );
    }
    if caller_fault {
        let errors: Vec<Value> = issues
            .iter()
            .map(|i| json!({"field": issue_field(i), "message": i.to_string()}))
            .collect();
        return (
            Problem::new(StatusCode::BAD_REQUEST, "workflow_invalid", "The workflow is invalid", format!("ComfyUI would refuse this workflow ({error_type}): {summary}"))
                .with("plugin", plugin)
                .with("nodes", nodes)
                .with("errors", errors),
            FailureKind::WorkflowError,
        );
    }
    (
        Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "plugin_built_invalid_workflow",
            "The plugin built an invalid workflow",
            format!("plugin {plugin} built a workflow ComfyUI refuses ({error_type}): {summary}"),
        )
        .with("plugin", plugin)
        .with("nodes", nodes),
        FailureKind::WorkflowError,
    )
}

/// The problem for any other ComfyUI failure. `Execution` is handled by the
/// caller first (the plugin may explain it); this gives the generic answer.
pub fn comfy_problem(plugin: &str, err: &ComfyError, caller_nodes: &[String]) -> (Problem, FailureKind) {
    match err {
        ComfyError::Unavailable { detail } => (
            Problem::new(StatusCode::SERVICE_UNAVAILABLE, "comfyui_unavailable", "ComfyUI is not available", public_reason(detail)).retry_after(RETRY_AFTER_DOWN),
            FailureKind::WorkflowError,
        ),
        ComfyError::Validation { error_type, message, node_errors } => {
            if node_errors.is_empty() {
                let issue = NodeIssue { node_id: String::new(), class_type: String::new(), kind: error_type.clone(), input_name: None, message: message.clone() };
                validation_problem(plugin, &[issue], caller_nodes, error_type)
            } else {
                validation_problem(plugin, node_errors, caller_nodes, error_type)
            }
        }
        ComfyError::Execution { node_id, node_type, exception_type, exception_message, prompt_id, .. } => {
            let model_error = node_type.contains("Loader");
            (
                Problem::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "workflow_failed",
                    "The workflow failed in ComfyUI",
                    format!("node {node_id} ({node_type}) raised {exception_type}: {exception_message}"),
                )
                .with("plugin", plugin)
                .with("prompt_id", prompt_id.clone())
                .with("node", json!({"id": node_id, "class_type": node_type, "exception_type": exception_type, "exception_message": exception_message})),
                if model_error { FailureKind::ModelError } else { FailureKind::WorkflowError },
            )
        }
        ComfyError::Interrupted { prompt_id, node_id, node_type } => (
            Problem::new(StatusCode::SERVICE_UNAVAILABLE, "interrupted", "The generation was interrupted", format!("prompt {prompt_id} was interrupted in ComfyUI (not by this request)"))
                .with("prompt_id", prompt_id.clone())
                .with("node", json!({"id": node_id, "class_type": node_type}))
                .retry_after(5),
            FailureKind::WorkflowError,
        ),
        ComfyError::Timeout { prompt_id, waited } => (
            Problem::new(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                "The generation took too long",
                format!("prompt {prompt_id} did not finish within {} s; it was cancelled in ComfyUI", waited.as_secs()),
            )
            .with("prompt_id", prompt_id.clone()),
            FailureKind::Timeout,
        ),
        ComfyError::Protocol { detail } => (
            Problem::new(StatusCode::BAD_GATEWAY, "comfyui_protocol_error", "ComfyUI answered unexpectedly", detail.clone()),
            FailureKind::WorkflowError,
        ),
        // The caller's own graph (`/workflow`) with no media output is the caller's mistake.
        ComfyError::OutputMissing { node_id } if !caller_nodes.is_empty() => (
            Problem::new(
                StatusCode::BAD_REQUEST,
                "output_missing",
                "The workflow produced no output",
                if node_id == "*" {
                    "no node of the workflow produced an image or video; it needs a media output node such as SaveImage".to_string()
                } else {
                    format!("output node {node_id} produced no image or video; it needs to be a media output node such as SaveImage")
                },
            )
            .with("plugin", plugin)
            .with("node", json!({"id": node_id}))
            .with("errors", json!([{"field": if node_id == "*" { "workflow".to_string() } else { format!("workflow/{node_id}") }, "message": "produced no image or video"}])),
            FailureKind::WorkflowError,
        ),
        ComfyError::OutputMissing { node_id } => (
            Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "output_missing", "The workflow produced no output", format!("output node {node_id} produced no image or video"))
                .with("plugin", plugin)
                .with("node", json!({"id": node_id})),
            FailureKind::WorkflowError,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issue(node: &str, class: &str, kind: &str, input: &str) -> NodeIssue {
        NodeIssue { node_id: node.into(), class_type: class.into(), kind: kind.into(), input_name: Some(input.into()), message: format!("{input}: bad") }
    }

    #[test]
    fn the_callers_graph_is_the_callers_fault() {
        let (p, _) = validation_problem("workflow", &[issue("5", "KSampler", "value_bigger_than_max", "steps")], &["5".into(), "6".into()], "prompt_outputs_failed_validation");
        assert_eq!(p.status, StatusCode::BAD_REQUEST);
        assert_eq!(p.body()["nodes"][0]["class_type"], "KSampler");
        assert_eq!(p.body()["errors"][0]["field"], "workflow/5/inputs/steps");
    }

    #[test]
    fn graph_level_errors_name_the_workflow_not_an_empty_node() {
        let whole = NodeIssue { node_id: String::new(), class_type: String::new(), kind: "prompt_no_outputs".into(), input_name: None, message: "Prompt has no outputs".into() };
        let cycle = NodeIssue { node_id: "2".into(), class_type: "VAEDecode".into(), kind: "graph_cycle".into(), input_name: None, message: "cycle".into() };
        let (p, _) = validation_problem("workflow", &[whole, cycle], &["2".into()], "preflight");
        let body = p.body();
        assert_eq!(body["errors"][0]["field"], "workflow");
        assert_eq!(body["errors"][1]["field"], "workflow/2");
        assert!(!body.to_string().contains("node -"), "{body}");
        assert!(!body.to_string().contains("workflow/\""), "{body}");
    }

    #[test]
    fn a_503_never_leaks_where_comfyui_lives() {
        let err = ComfyError::Unavailable { detail: "error sending request for url (http://127.0.0.1:8188/system_stats): connection refused to 127.0.0.1:8188".into() };
        let (p, _) = comfy_problem("x", &err, &[]);
        let body = p.body().to_string();
        assert!(!body.contains("8188") && !body.contains("127.0.0.1"), "{body}");
        assert!(body.contains("connection refused"), "{body}");
    }

    #[test]
    fn a_callers_graph_without_media_output_is_a_400_naming_the_node() {
        let (p, _) = comfy_problem("workflow", &ComfyError::OutputMissing { node_id: "7".into() }, &["7".into()]);
        assert_eq!(p.status, StatusCode::BAD_REQUEST);
        assert_eq!(p.body()["errors"][0]["field"], "workflow/7");
        let (p, _) = comfy_problem("flux-dev", &ComfyError::OutputMissing { node_id: "7".into() }, &[]);
        assert_eq!(p.status, StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[test]
    fn a_plugin_graph_is_the_plugins_fault() {
        let (p, _) = validation_problem("flux-dev", &[issue("5", "KSampler", "value_bigger_than_max", "steps")], &[], "x");
        assert_eq!(p.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(p.slug, "plugin_built_invalid_workflow");
    }

    #[test]
    fn a_missing_model_is_a_503_naming_the_file() {
        let mut i = issue("1", "UNETLoader", "value_not_in_list", "unet_name");
        i.message = "unet_name: 'flux1-dev.safetensors' not in []".into();
        let (p, kind) = validation_problem("flux-dev", &[i], &[], "x");
        assert_eq!(p.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(p.detail.contains("flux1-dev.safetensors"));
        assert_eq!(kind, FailureKind::ModelError);
    }

    #[test]
    fn statuses_come_from_the_error_kind_not_its_text() {
        let (p, _) = comfy_problem("x", &ComfyError::Unavailable { detail: "connection refused".into() }, &[]);
        assert_eq!(p.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(p.retry_after, Some(RETRY_AFTER_DOWN));
        // An execution error whose message happens to contain "503" is still a 500.
        let exec = ComfyError::Execution {
            prompt_id: "p".into(),
            node_id: "9".into(),
            node_type: "KSampler".into(),
            exception_type: "RuntimeError".into(),
            exception_message: "HTTP 503 from somewhere".into(),
            traceback: vec![],
        };
        let (p, _) = comfy_problem("x", &exec, &[]);
        assert_eq!(p.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(p.body()["node"]["id"], "9");
        assert_eq!(p.body()["node"]["class_type"], "KSampler");
    }
}
