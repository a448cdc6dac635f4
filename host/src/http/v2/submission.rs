//! Reading a `POST /api/v2/jobs` body into a [`Submission`]: the API-format graph verbatim,
//! the closed `extra_data`, the reserved fields refused, a UI-format export recognised, and
//! every `core/ASSET` reference found (the runner writes the filename ComfyUI sees into
//! that input once the asset is uploaded for the job).
//!
//! Owns the shape rules of the submission body. Must never look anything up (assets, the
//! node catalogue): the handler resolves references and runs the preflight, so this stays a
//! pure function that unit tests can pin down.

use serde_json::{Map, Value, json};

use super::envelope::{ErrorCode, V2Error};

/// Fields the spec reserves for later and requires servers to refuse today.
const RESERVED: [&str; 2] = ["webhook_url", "inputs"];
/// The only key `extra_data` may hold.
const EXTRA_DATA_KEYS: [&str; 1] = ["api_key_comfy_org"];
/// Longest `extra_data.api_key_comfy_org` (partner keys are well under 100 characters; the
/// value is held in memory per job until it runs).
pub const MAX_PARTNER_KEY_BYTES: usize = 1024;
/// Most node issues an `invalid_workflow` answer lists; the rest are counted
/// (`details.omitted_issues`), so 5,000 unknown classes do not make a megabyte of error.
pub const MAX_LISTED_ISSUES: usize = 50;
/// Longest text of one listed issue (a node's own message may be long).
const MAX_ISSUE_TEXT: usize = 300;

/// A submission, read and checked for shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Submission {
    /// The graph exactly as submitted ("verbatim" is the contract), references included.
    pub workflow: Map<String, Value>,
    /// The partner-node key, forwarded to ComfyUI per prompt and never persisted.
    pub api_key_comfy_org: Option<String>,
    pub asset_refs: Vec<AssetRef>,
    /// The caller's labels (`metadata`, a flowhost extension: [`crate::jobs::labels`]).
    pub labels: crate::jobs::labels::Labels,
}

/// One `{"__type": "core/ASSET", "info": {"id": ...}}` found in a node's inputs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssetRef {
    pub node_id: String,
    pub input: String,
    pub asset_id: String,
}

/// What a reference reads as until the asset is uploaded for the job: a plain file name, so
/// the preflight (which cannot see ComfyUI's disk) treats the input like any other upload.
pub const ASSET_PLACEHOLDER: &str = "flowhost-asset-placeholder.png";

/// Parse and shape-check a submission body (already parsed as JSON).
pub fn parse(body: Value) -> Result<Submission, V2Error> {
    let Value::Object(mut body) = body else {
        return Err(V2Error::invalid_submission("", "not_an_object", "The body must be a JSON object with a `workflow` member."));
    };
    for field in RESERVED {
        // An explicit null is no value (comfy-api-proxy accepts it too).
        if body.get(field).is_some_and(Value::is_null) {
            body.remove(field);
        }
        if body.contains_key(field) {
            // The contract's 422 for a submission is `invalid_workflow` (as comfy-api-proxy answers).
            return Err(V2Error::invalid_submission(field, "reserved", format!("`{field}` is reserved by the Comfy API v2 and not accepted yet; remove it.")));
        }
    }
    if body.get("workflow").is_none() && looks_like_ui_export(&body) {
        return Err(ui_format());
    }
    let workflow = match body.remove("workflow") {
        Some(Value::Object(workflow)) => workflow,
        Some(_) => return Err(V2Error::invalid_submission("workflow", "not_an_object", "`workflow` must be the API-format graph: a JSON object of nodes.")),
        None => return Err(V2Error::invalid_submission("workflow", "missing", "The body has no `workflow`; send the API-format graph under `workflow`.")),
    };
    let api_key_comfy_org = match body.remove("extra_data") {
        None | Some(Value::Null) => None,
        Some(Value::Object(extra)) => extra_data(extra)?,
        Some(_) => return Err(request_field("extra_data", "not_an_object", "`extra_data` must be an object.")),
    };
    let labels = match body.remove("metadata") {
        None | Some(Value::Null) => Default::default(),
        Some(metadata) => crate::jobs::labels::from_json("metadata", &metadata).map_err(|e| request_field(&e.field, "invalid_label", &format!("`{}`: {}.", e.field, e.reason)))?,
    };
    if let Some(field) = body.keys().next() {
        return Err(request_field(field, "unknown_field", &format!("`{field}` is not a field of a job submission (accepted: workflow, extra_data, metadata).")));
    }
    if looks_like_ui_export(&workflow) {
        return Err(ui_format());
    }
    check_filename_prefixes(&workflow)?;
    let asset_refs = asset_refs(&workflow)?;
    Ok(Submission { workflow, api_key_comfy_org, asset_refs, labels })
}

fn request_field(field: &str, reason: &str, message: &str) -> V2Error {
    V2Error::new(ErrorCode::InvalidRequest, message).with_details(json!({"field": field, "reason": reason}))
}

fn extra_data(extra: Map<String, Value>) -> Result<Option<String>, V2Error> {
    if let Some(key) = extra.keys().find(|k| !EXTRA_DATA_KEYS.contains(&k.as_str())) {
        return Err(request_field(
            &format!("extra_data.{key}"),
            "unknown_field",
            &format!("`extra_data` is a closed object; `{key}` is not accepted (accepted: api_key_comfy_org)."),
        ));
    }
    match extra.get("api_key_comfy_org") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(key)) if key.len() > MAX_PARTNER_KEY_BYTES => Err(request_field(
            "extra_data.api_key_comfy_org",
            "too_long",
            &format!("`extra_data.api_key_comfy_org` is longer than {MAX_PARTNER_KEY_BYTES} bytes."),
        )),
        Some(Value::String(key)) => Ok(Some(key.clone())),
        Some(_) => Err(request_field("extra_data.api_key_comfy_org", "not_a_string", "`extra_data.api_key_comfy_org` must be a string.")),
    }
}

/// Every `filename_prefix` input is a name under ComfyUI's output folder: no NUL, no
/// absolute path, no `..` segment (ComfyUI would refuse it only after the job ran, with
/// the server's absolute output path in its message).
fn check_filename_prefixes(graph: &Map<String, Value>) -> Result<(), V2Error> {
    for (node_id, node) in graph {
        let Some(Value::String(prefix)) = node.get("inputs").and_then(|inputs| inputs.get("filename_prefix")) else { continue };
        let absolute = prefix.starts_with(['/', '\\']) || prefix.as_bytes().get(1) == Some(&b':');
        let traverses = prefix.split(['/', '\\']).any(|segment| segment == "..");
        if prefix.contains('\0') || absolute || traverses {
            let class_type = node.get("class_type").and_then(Value::as_str).unwrap_or_default();
            return Err(V2Error::new(
                ErrorCode::InvalidWorkflow,
                format!("Node {node_id} ({class_type}) input `filename_prefix`: must be a relative name without `..` segments or NUL characters."),
            )
            .with_details(json!({"node_errors": {node_id.clone(): [{"class_type": class_type, "field": "filename_prefix", "reason": "invalid_filename_prefix", "message": "must be a relative name without `..` segments or NUL characters"}]}})));
        }
    }
    Ok(())
}

/// At most `max` bytes of `text`, cut at a character boundary.
fn clipped(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut cut = max;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}…", &text[..cut])
}

/// The ComfyUI editor's export (`nodes` array + `links`), as opposed to the API format's flat
/// `{node_id: {class_type, inputs}}` map.
fn looks_like_ui_export(graph: &Map<String, Value>) -> bool {
    graph.get("nodes").is_some_and(Value::is_array) && graph.contains_key("links")
}

fn ui_format() -> V2Error {
    V2Error::new(
        ErrorCode::WorkflowFormatUi,
        "This is the ComfyUI editor's UI-format export (`nodes`/`links`). Submit the API-format graph instead (in ComfyUI: Workflow → Export (API)).",
    )
}

impl Submission {
    /// The graph as the preflight sees it: each reference replaced by [`ASSET_PLACEHOLDER`].
    pub fn preflight_graph(&self) -> Value {
        let mut graph = self.workflow.clone();
        for reference in &self.asset_refs {
            if let Some(Value::Object(inputs)) = graph.get_mut(&reference.node_id).and_then(|node| node.get_mut("inputs")) {
                inputs.insert(reference.input.clone(), Value::String(ASSET_PLACEHOLDER.into()));
            }
        }
        Value::Object(graph)
    }
}

/// Find every `core/ASSET` reference among the nodes' direct input values and check its shape.
fn asset_refs(workflow: &Map<String, Value>) -> Result<Vec<AssetRef>, V2Error> {
    let mut refs = Vec::new();
    for (node_id, node) in workflow {
        let Some(Value::Object(inputs)) = node.get("inputs") else { continue };
        for (input, value) in inputs {
            let Value::Object(object) = value else { continue };
            if object.get("__type").and_then(Value::as_str) != Some("core/ASSET") {
                continue;
            }
            let asset_id = object.get("info").and_then(|info| info.get("id")).and_then(Value::as_str).filter(|id| !id.is_empty());
            let Some(asset_id) = asset_id else {
                return Err(V2Error::new(
                    ErrorCode::MissingAsset,
                    format!("Node {node_id} input `{input}`: a core/ASSET reference needs `info.id` (the asset's id)."),
                )
                .with_details(json!({"node_id": node_id, "input": input, "reason": "malformed_reference"})));
            };
            refs.push(AssetRef { node_id: node_id.clone(), input: input.clone(), asset_id: asset_id.to_string() });
        }
    }
    Ok(refs)
}

/// `invalid_workflow` from preflight issues: one sentence naming the first node, every
/// node's issues under `details.node_errors[node_id]`, and graph-wide issues (no outputs,
/// a cycle, too many nodes: ComfyUI names no node for them) under `details.graph_errors`
/// rather than under an empty node id.
pub fn invalid_workflow(issues: &[flowhost_comfy::NodeIssue]) -> V2Error {
    let mut node_errors = Map::new();
    let mut graph_errors = Vec::new();
    for issue in issues.iter().take(MAX_LISTED_ISSUES) {
        if issue.node_id.is_empty() {
            graph_errors.push(json!({"reason": issue.kind, "message": clipped(&issue.message, MAX_ISSUE_TEXT)}));
            continue;
        }
        let entry = node_errors.entry(clipped(&issue.node_id, MAX_ISSUE_TEXT)).or_insert_with(|| Value::Array(Vec::new()));
        if let Value::Array(list) = entry {
            list.push(json!({
                "class_type": (!issue.class_type.is_empty()).then(|| clipped(&issue.class_type, MAX_ISSUE_TEXT)),
                "field": issue.input_name.as_deref().map(|f| clipped(f, MAX_ISSUE_TEXT)),
                "reason": issue.kind,
                "message": clipped(&issue.message, MAX_ISSUE_TEXT),
            }));
        }
    }
    let message = match issues.first() {
        Some(first) if !first.node_id.is_empty() => {
            let class = if first.class_type.is_empty() { String::new() } else { format!(" ({})", first.class_type) };
            let more = if issues.len() > 1 { format!(" (and {} more)", issues.len() - 1) } else { String::new() };
            format!("Node {}{class}: {}{more}", clipped(&first.node_id, MAX_ISSUE_TEXT), clipped(&first.message, MAX_ISSUE_TEXT))
        }
        Some(first) => clipped(&first.message, MAX_ISSUE_TEXT),
        None => "The workflow is invalid.".into(),
    };
    let mut details = json!({"node_errors": node_errors});
    if !graph_errors.is_empty() {
        details["graph_errors"] = Value::Array(graph_errors);
    }
    if issues.len() > MAX_LISTED_ISSUES {
        details["omitted_issues"] = json!(issues.len() - MAX_LISTED_ISSUES);
    }
    V2Error::new(ErrorCode::InvalidWorkflow, message).with_details(details)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code_of(body: Value) -> (String, Value) {
        let error = parse(body).expect_err("should be refused");
        (error.code.as_str().to_string(), error.details.unwrap_or(Value::Null))
    }

    #[test]
    fn the_graph_is_kept_verbatim() {
        let graph = json!({"9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "x"}}});
        let submission = parse(json!({"workflow": graph.clone()})).unwrap();
        assert_eq!(Value::Object(submission.workflow), graph);
        assert!(submission.asset_refs.is_empty());
        assert_eq!(submission.api_key_comfy_org, None);
    }

    #[test]
    fn reserved_fields_are_refused() {
        for field in ["webhook_url", "inputs"] {
            let (code, details) = code_of(json!({"workflow": {}, field: "x"}));
            assert_eq!(code, "invalid_workflow", "the contract's code for a refused submission");
            assert_eq!(details["field"], field);
            assert_eq!(details["reason"], "reserved");
        }
        // An explicit null is no value: accepted, as comfy-api-proxy does.
        assert!(parse(json!({"workflow": {}, "webhook_url": null})).is_ok());
    }

    #[test]
    fn extra_data_is_closed() {
        let submission = parse(json!({"workflow": {}, "extra_data": {"api_key_comfy_org": "k"}})).unwrap();
        assert_eq!(submission.api_key_comfy_org.as_deref(), Some("k"));
        let (code, details) = code_of(json!({"workflow": {}, "extra_data": {"client_id": "x"}}));
        assert_eq!(code, "invalid_request");
        assert_eq!(details["field"], "extra_data.client_id");
    }

    #[test]
    fn unknown_top_level_fields_are_named() {
        let (_, details) = code_of(json!({"workflow": {}, "labels": {"a": "b"}}));
        assert_eq!(details["field"], "labels");
    }

    #[test]
    fn metadata_becomes_bounded_labels() {
        let submission = parse(json!({"workflow": {}, "metadata": {"batch": "nightly"}})).unwrap();
        assert_eq!(submission.labels["batch"], "nightly");
        let (code, details) = code_of(json!({"workflow": {}, "metadata": {"batch": 7}}));
        assert_eq!((code.as_str(), details["field"].as_str()), ("invalid_request", Some("metadata.batch")));
    }

    #[test]
    fn ui_exports_are_recognised_inside_and_outside_workflow() {
        let ui = json!({"last_node_id": 9, "nodes": [{"id": 9, "type": "SaveImage"}], "links": []});
        assert_eq!(code_of(json!({"workflow": ui.clone()})).0, "workflow_format_ui");
        assert_eq!(code_of(ui).0, "workflow_format_ui");
    }

    #[test]
    fn a_missing_or_wrong_workflow_is_invalid_workflow() {
        assert_eq!(code_of(json!({})).0, "invalid_workflow");
        assert_eq!(code_of(json!({"workflow": [1]})).0, "invalid_workflow");
        assert_eq!(code_of(json!([1])).0, "invalid_workflow");
    }

    #[test]
    fn asset_references_are_found_and_kept_verbatim() {
        let reference = json!({"__type": "core/ASSET", "info": {"id": "a-1", "file_path": "photo.png"}});
        let submission = parse(json!({"workflow": {"10": {"class_type": "LoadImage", "inputs": {"image": reference}}}})).unwrap();
        assert_eq!(submission.asset_refs, vec![AssetRef { node_id: "10".into(), input: "image".into(), asset_id: "a-1".into() }]);
        assert_eq!(submission.workflow["10"]["inputs"]["image"]["info"]["id"], "a-1");
        assert_eq!(submission.preflight_graph()["10"]["inputs"]["image"], ASSET_PLACEHOLDER);
    }

    #[test]
    fn a_reference_without_an_id_is_missing_asset() {
        let reference = json!({"__type": "core/ASSET", "info": {"hash": "blake3:00"}});
        let (code, details) = code_of(json!({"workflow": {"10": {"class_type": "LoadImage", "inputs": {"image": reference}}}}));
        assert_eq!(code, "missing_asset");
        assert_eq!(details["node_id"], "10");
    }

    #[test]
    fn preflight_issues_become_per_node_details() {
        let issues = vec![flowhost_comfy::NodeIssue {
            node_id: "12".into(),
            class_type: "KSampler".into(),
            kind: "required_input_missing".into(),
            input_name: Some("model".into()),
            message: "Required input is missing: model".into(),
        }];
        let error = invalid_workflow(&issues);
        assert_eq!(error.code, ErrorCode::InvalidWorkflow);
        assert!(error.message.starts_with("Node 12 (KSampler):"), "{}", error.message);
        let details = error.details.unwrap();
        assert_eq!(details["node_errors"]["12"][0]["field"], "model");
        assert_eq!(details["node_errors"]["12"][0]["reason"], "required_input_missing");
    }

    #[test]
    fn graph_wide_issues_name_no_empty_node() {
        let issues = vec![flowhost_comfy::NodeIssue {
            node_id: String::new(),
            class_type: String::new(),
            kind: "prompt_no_outputs".into(),
            input_name: None,
            message: "Prompt has no outputs".into(),
        }];
        let details = invalid_workflow(&issues).details.unwrap();
        assert_eq!(details["node_errors"], json!({}));
        assert_eq!(details["graph_errors"][0]["reason"], "prompt_no_outputs");
    }
}
