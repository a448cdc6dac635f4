//! The one place a job's domain failure ([`JobFailure`]) becomes problem+json on
//! the typed routes: status, `type` slug and the members the caller needs
//! (`plugin`, `nodes`, `node`, `errors`, `prompt_id`, `missing`), with
//! Retry-After where waiting helps. Statuses follow whose fault it is:
//! the caller's graph → 400; the plugin's graph → 500; a missing model → 503;
//! ComfyUI down or the queue full → 503; the deadline → 504.

use axum::http::StatusCode;
use flowhost_comfy::NodeIssue;
use serde_json::{Value, json};

use super::problem::Problem;
use crate::jobs::JobFailure;
use crate::jobs::failure::RunPhase;

/// The request field an issue concerns: `workflow` for the whole graph, `workflow/<node>` for a
/// node, `workflow/<node>/inputs/<input>` for one of its inputs.
fn issue_field(issue: &NodeIssue) -> String {
    match (issue.node_id.as_str(), issue.input_name.as_deref()) {
        ("", _) => "workflow".to_string(),
        (node, None | Some("")) => format!("workflow/{node}"),
        (node, Some(input)) => format!("workflow/{node}/inputs/{input}"),
    }
}

fn issue_json(issue: &NodeIssue) -> Value {
    json!({
        "node_id": issue.node_id,
        "class_type": issue.class_type,
        "kind": issue.kind,
        "input": issue.input_name,
        "message": issue.message,
    })
}

/// The problem for `failure` of a job built by `plugin` (None for v2/api jobs).
pub fn problem(failure: &JobFailure, plugin: Option<&str>) -> Problem {
    let with_plugin = |p: Problem| match plugin {
        Some(name) => p.with("plugin", name),
        None => p,
    };
    match failure {
        JobFailure::QueueFull { retry_after_s, depth } => Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "at_capacity",
            "At capacity",
            format!("every generation slot is busy and {depth} jobs are waiting; retry in about {retry_after_s} s"),
        )
        .retry_after(*retry_after_s),
        JobFailure::ComfyUnavailable { detail, retry_after_s } => {
            Problem::new(StatusCode::SERVICE_UNAVAILABLE, "comfyui_unavailable", "ComfyUI is not available", crate::jobs::failure::public_reason(detail)).retry_after(*retry_after_s)
        }
        JobFailure::ComfyStarting { retry_after_s } => {
            Problem::new(StatusCode::SERVICE_UNAVAILABLE, "comfyui_starting", "ComfyUI is starting", "ComfyUI has not answered yet; retry shortly").retry_after(*retry_after_s)
        }
        JobFailure::NotReady { route, plugin, missing } => Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "endpoint_not_ready",
            "This endpoint is not ready",
            format!("{route} cannot run: {}", missing.join("; ")),
        )
        .with("plugin", plugin.clone())
        .with("missing", missing.clone())
        .retry_after(60),
        JobFailure::Input { field, message, not_found } => {
            let (status, slug, title) =
                if *not_found { (StatusCode::NOT_FOUND, "not_found", "Not found") } else { (StatusCode::BAD_REQUEST, "invalid_request", "The request is invalid") };
            Problem::new(status, slug, title, format!("{field}: {message}")).with("errors", json!([{"field": field, "message": message}]))
        }
        JobFailure::Fetch { field, message, reason } => {
            use crate::jobs::failure::FetchReason;
            let (status, slug, title) = match reason {
                FetchReason::Malformed => (StatusCode::BAD_REQUEST, "invalid_request", "The request is invalid"),
                FetchReason::Refused => (StatusCode::BAD_REQUEST, "destination_refused", "The URL's destination is refused"),
                FetchReason::NotFound => (StatusCode::NOT_FOUND, "not_found", "Not found"),
                FetchReason::TooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "file_too_large", "The file is too large"),
                FetchReason::Unusable => (StatusCode::UNPROCESSABLE_ENTITY, "file_unusable", "The file cannot be used"),
                FetchReason::Upstream => (StatusCode::BAD_GATEWAY, "fetch_failed", "The file could not be fetched"),
                FetchReason::Timeout => (StatusCode::GATEWAY_TIMEOUT, "timeout", "The file did not arrive in time"),
                FetchReason::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "blob_store_unavailable", "Stored files cannot be read now"),
                FetchReason::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "internal", "Internal error"),
            };
            let mut p = with_plugin(Problem::new(status, slug, title, format!("{field}: {message}")).with("errors", json!([{"field": field, "message": message}])));
            if *reason == FetchReason::Unavailable {
                p = p.retry_after(5);
            }
            p
        }
        JobFailure::InvalidWorkflow { issues, error_type, caller_fault } => {
            let nodes: Vec<Value> = issues.iter().map(issue_json).collect();
            let summary = issues.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
            if *caller_fault {
                let errors: Vec<Value> = issues
                    .iter()
                    .map(|i| json!({"field": issue_field(i), "message": i.to_string()}))
                    .collect();
                with_plugin(
                    Problem::new(StatusCode::BAD_REQUEST, "workflow_invalid", "The workflow is invalid", format!("ComfyUI would refuse this workflow ({error_type}): {summary}"))
                        .with("nodes", nodes)
                        .with("errors", errors),
                )
            } else {
                with_plugin(
                    Problem::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "plugin_built_invalid_workflow",
                        "The plugin built an invalid workflow",
                        format!("plugin {} built a workflow ComfyUI refuses ({error_type}): {summary}", plugin.unwrap_or("-")),
                    )
                    .with("nodes", nodes),
                )
            }
        }
        JobFailure::ModelMissing { issues } => {
            let detail = issues.iter().map(|i| format!("node {} ({}) {}: {}", i.node_id, i.class_type, i.input_name.as_deref().unwrap_or("?"), i.message)).collect::<Vec<_>>().join("; ");
            with_plugin(
                Problem::new(StatusCode::SERVICE_UNAVAILABLE, "model_missing", "A model file is missing", format!("the model volume lacks a file this endpoint needs — {detail}"))
                    .with("nodes", issues.iter().map(issue_json).collect::<Vec<_>>())
                    .retry_after(60),
            )
        }
        JobFailure::Execution { prompt_id, node_id, class_type, exception_type, exception_message, .. } => with_plugin(
            Problem::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "workflow_failed",
                "The workflow failed in ComfyUI",
                format!("node {node_id} ({class_type}) raised {exception_type}: {exception_message}"),
            )
            .with("prompt_id", prompt_id.clone())
            .with("node", json!({"id": node_id, "class_type": class_type, "exception_type": exception_type, "exception_message": exception_message})),
        ),
        JobFailure::Explained { status, title, detail, field, node_id, class_type } => {
            let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let slug = if status.is_client_error() { "input_rejected" } else { "workflow_failed" };
            let mut p = with_plugin(Problem::new(status, slug, title.clone(), detail.clone()).with("node", json!({"id": node_id, "class_type": class_type})));
            if let Some(field) = field {
                p = p.with("errors", json!([{"field": field, "message": detail}]));
            }
            p
        }
        JobFailure::Interrupted { prompt_id, node_id, class_type } => Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "interrupted",
            "The generation was interrupted",
            format!("prompt {prompt_id} was interrupted in ComfyUI (not by this request)"),
        )
        .with("prompt_id", prompt_id.clone())
        .with("node", json!({"id": node_id, "class_type": class_type}))
        .retry_after(5),
        JobFailure::Timeout { prompt_id, waited_ms, phase, limit } => {
            let secs = waited_ms / 1000;
            let detail = match (phase, prompt_id) {
                (Some(RunPhase::ComfyUi), Some(p)) => format!("{failure}; prompt {p} was cancelled in ComfyUI"),
                (Some(_), _) => failure.to_string(),
                (None, Some(p)) => format!("prompt {p} did not finish within {secs} s; it was cancelled in ComfyUI"),
                (None, None) => format!("the job waited {secs} s in the queue without a free slot; nothing ran"),
            };
            let mut p = Problem::new(StatusCode::GATEWAY_TIMEOUT, "timeout", "The generation took too long", detail);
            if let Some(phase) = phase {
                p = p.with("phase", json!(phase));
            }
            if let Some(limit) = limit {
                p = p.with("limit_ms", limit.ms);
            }
            match prompt_id {
                Some(id) => p.with("prompt_id", id.clone()),
                None => p,
            }
        }
        JobFailure::Protocol { detail } => Problem::new(StatusCode::BAD_GATEWAY, "comfyui_protocol_error", "ComfyUI answered unexpectedly", detail.clone()),
        // The caller's own graph (`/workflow`) with no media output is the caller's mistake.
        JobFailure::OutputMissing { node_id, caller_fault: true } => with_plugin(
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
            .with("node", json!({"id": node_id}))
            .with("errors", json!([{"field": if node_id == "*" { "workflow".to_string() } else { format!("workflow/{node_id}") }, "message": "produced no image or video"}])),
        ),
        JobFailure::OutputMissing { node_id, .. } => with_plugin(
            Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "output_missing", "The workflow produced no output", format!("output node {node_id} produced no image or video"))
                .with("node", json!({"id": node_id})),
        ),
        JobFailure::OutputUnreadable { detail } => Problem::new(StatusCode::BAD_GATEWAY, "output_unreadable", "ComfyUI's output could not be encoded", detail.clone()),
        JobFailure::Canceled => Problem::new(StatusCode::CONFLICT, "canceled", "The job was canceled", "the job was canceled before it finished"),
        JobFailure::HostRestarted => Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "host_restarted",
            "flowhost restarted during the job",
            "flowhost restarted while the job was running and ComfyUI no longer had it; submit it again",
        )
        .retry_after(5),
        JobFailure::WorkerLost => Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "worker_lost",
            "The instance running the job was lost",
            "the flowhost instance running the job stopped (it was retried once on another); submit it again",
        )
        .retry_after(5),
        JobFailure::PluginFailed { detail } => with_plugin(Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "plugin_failed", "The plugin failed", detail.clone())),
        JobFailure::Internal { detail } => {
            tracing::error!(%detail, "internal job failure");
            Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "Internal error", "flowhost failed internally; the log has the details")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::failure::{from_comfy, validation_failure};
    use flowhost_comfy::ComfyError;

    fn issue(node: &str, class: &str, kind: &str, input: &str) -> NodeIssue {
        NodeIssue { node_id: node.into(), class_type: class.into(), kind: kind.into(), input_name: Some(input.into()), message: format!("{input}: bad") }
    }

    #[test]
    fn the_callers_graph_is_the_callers_fault() {
        let f = validation_failure(vec![issue("5", "KSampler", "value_bigger_than_max", "steps")], &["5".into(), "6".into()], "prompt_outputs_failed_validation");
        let p = problem(&f, Some("workflow"));
        assert_eq!(p.status, StatusCode::BAD_REQUEST);
        assert_eq!(p.body()["nodes"][0]["class_type"], "KSampler");
        assert_eq!(p.body()["errors"][0]["field"], "workflow/5/inputs/steps");
    }

    #[test]
    fn graph_level_errors_name_the_workflow_not_an_empty_node() {
        let whole = NodeIssue { node_id: String::new(), class_type: String::new(), kind: "prompt_no_outputs".into(), input_name: None, message: "Prompt has no outputs".into() };
        let cycle = NodeIssue { node_id: "2".into(), class_type: "VAEDecode".into(), kind: "graph_cycle".into(), input_name: None, message: "cycle".into() };
        let p = problem(&validation_failure(vec![whole, cycle], &["2".into()], "preflight"), Some("workflow"));
        let body = p.body();
        assert_eq!(body["errors"][0]["field"], "workflow");
        assert_eq!(body["errors"][1]["field"], "workflow/2");
        assert!(!body.to_string().contains("node -"), "{body}");
        assert!(!body.to_string().contains("workflow/\""), "{body}");
    }

    #[test]
    fn a_503_never_leaks_where_comfyui_lives() {
        let err = ComfyError::Unavailable { detail: "error sending request for url (http://127.0.0.1:8188/system_stats): connection refused to 127.0.0.1:8188".into() };
        let body = problem(&from_comfy(err, &[]), Some("x")).body().to_string();
        assert!(!body.contains("8188") && !body.contains("127.0.0.1"), "{body}");
        assert!(body.contains("connection refused"), "{body}");
    }

    #[test]
    fn a_callers_graph_without_media_output_is_a_400_naming_the_node() {
        let p = problem(&from_comfy(ComfyError::OutputMissing { node_id: "7".into() }, &["7".into()]), Some("workflow"));
        assert_eq!(p.status, StatusCode::BAD_REQUEST);
        assert_eq!(p.body()["errors"][0]["field"], "workflow/7");
        let p = problem(&from_comfy(ComfyError::OutputMissing { node_id: "7".into() }, &[]), Some("flux-dev"));
        assert_eq!(p.status, StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[test]
    fn a_plugin_graph_is_the_plugins_fault() {
        let f = validation_failure(vec![issue("5", "KSampler", "value_bigger_than_max", "steps")], &[], "x");
        let p = problem(&f, Some("flux-dev"));
        assert_eq!(p.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(p.slug, "plugin_built_invalid_workflow");
    }

    #[test]
    fn a_missing_model_is_a_503_naming_the_file() {
        let mut i = issue("1", "UNETLoader", "value_not_in_list", "unet_name");
        i.message = "unet_name: 'flux1-dev.safetensors' not in []".into();
        let p = problem(&validation_failure(vec![i], &[], "x"), Some("flux-dev"));
        assert_eq!(p.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(p.detail.contains("flux1-dev.safetensors"));
    }

    #[test]
    fn statuses_come_from_the_error_kind_not_its_text() {
        let p = problem(&from_comfy(ComfyError::Unavailable { detail: "connection refused".into() }, &[]), None);
        assert_eq!(p.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(p.retry_after, Some(crate::jobs::failure::RETRY_AFTER_DOWN));
        // An execution error whose message happens to contain "503" is still a 500.
        let exec = ComfyError::Execution {
            prompt_id: "p".into(),
            node_id: "9".into(),
            node_type: "KSampler".into(),
            exception_type: "RuntimeError".into(),
            exception_message: "HTTP 503 from somewhere".into(),
            traceback: vec![],
        };
        let p = problem(&from_comfy(exec, &[]), Some("x"));
        assert_eq!(p.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(p.body()["node"]["id"], "9");
        assert_eq!(p.body()["node"]["class_type"], "KSampler");
    }

    #[test]
    fn a_full_queue_is_a_503_with_the_estimated_retry_after() {
        let p = problem(&JobFailure::QueueFull { retry_after_s: 17, depth: 3 }, Some("flux-dev"));
        assert_eq!((p.status, p.slug, p.retry_after), (StatusCode::SERVICE_UNAVAILABLE, "at_capacity", Some(17)));
    }
}
