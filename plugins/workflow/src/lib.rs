//! The `/workflow` endpoint: run a caller's ComfyUI API-format graph.
//!
//! Owns the checks that need no node catalogue (API vs UI format, node shape,
//! `output_node`), the optional prompt injection, and the output format choice.
//! Everything about classes, inputs and links is the host's preflight (a failure
//! there is the caller's: every node is listed in `Job.caller_nodes`).
//!
//! Prompt injection: `prompt` replaces the text of the text-encoder nodes
//! (`CLIPTextEncode` and its family) that feed a **positive** input — a `positive`
//! input of any node, `BasicGuider.conditioning` or `DualCFGGuider.cond1` — traced
//! upstream through links: through nodes with `positive`/`negative` inputs only along
//! the same polarity, through other nodes along inputs named `cond*` (FluxGuidance,
//! ConditioningCombine, ControlNetApply, ...). Negatives are traced the same way (a
//! `ConditioningZeroOut` ends a negative trace: its output does not depend on text).
//! An encoder on both paths is refused rather than changing the negative.
//!
//! Output format: `output_format` if given; otherwise JPEG, unless every output node
//! of the graph (or the chosen `output_node`) produces animation/video/audio, which is
//! passed through unchanged (`original`).

use std::collections::{BTreeMap, BTreeSet};

use flowhost_sdk::decode::{Checks, decode};
use flowhost_sdk::graph::as_link;
use flowhost_sdk::{BuildError, Host, Job, Manifest, OutputFormat, Plugin, Request, schema};
use serde::Deserialize;
use serde_json::{Map, Value, json};

pub const NAME: &str = "workflow";
pub const ROUTE: &str = "/workflow";
pub const ANALYTICS_PREFIX: &str = "modal_workflow";
pub const PROMPT_MAX_CHARS: usize = 10_000;

/// How the caller wants image outputs encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputChoice {
    Jpeg,
    Png,
    Original,
}

/// The `/workflow` request body.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkflowRequest {
    pub workflow: Map<String, Value>,
    #[serde(default)]
    pub prompt: Option<String>,
    #[serde(default)]
    pub output_node: Option<String>,
    #[serde(default)]
    pub output_format: Option<OutputChoice>,
}

/// Node classes ComfyUI marks as output nodes (from a real ComfyUI 0.3.64 catalogue),
/// plus common custom ones. Any class starting with `Save` or `Preview` counts too.
const OUTPUT_CLASSES: &[&str] = &[
    "SaveImage",
    "PreviewImage",
    "SaveLatent",
    "MaskPreview",
    "SaveAnimatedWEBP",
    "SaveAnimatedPNG",
    "SaveSVGNode",
    "SaveAudio",
    "SaveAudioMP3",
    "SaveAudioOpus",
    "PreviewAudio",
    "SaveWEBM",
    "SaveVideo",
    "SaveGLB",
    "PreviewAny",
    "SaveImageWebsocket",
    "VHS_VideoCombine",
    "Image Save",
];

/// Output classes whose media is not a still image: passed through by default.
const MOVING_OUTPUT_CLASSES: &[&str] = &[
    "SaveAnimatedWEBP",
    "SaveAnimatedPNG",
    "SaveWEBM",
    "SaveVideo",
    "VHS_VideoCombine",
    "SaveAudio",
    "SaveAudioMP3",
    "SaveAudioOpus",
    "PreviewAudio",
];

/// Whether a node of `class_type` is an output node.
pub fn is_output_class(class_type: &str) -> bool {
    OUTPUT_CLASSES.contains(&class_type)
        || class_type.starts_with("Save")
        || class_type.starts_with("Preview")
}

/// The prompt inputs of a text-encoder class (`None`: not a text encoder).
pub fn text_inputs(class_type: &str) -> Option<&'static [&'static str]> {
    Some(match class_type {
        "CLIPTextEncode"
        | "CLIPTextEncodeSDXLRefiner"
        | "CLIPTextEncodePixArtAlpha"
        | "CLIPTextEncodeControlnet" => &["text"],
        "CLIPTextEncodeSDXL" => &["text_g", "text_l"],
        "CLIPTextEncodeFlux" => &["clip_l", "t5xxl"],
        "CLIPTextEncodeSD3" => &["clip_l", "clip_g", "t5xxl"],
        "CLIPTextEncodeHiDream" => &["clip_l", "clip_g", "t5xxl", "llama"],
        "CLIPTextEncodeHunyuanDiT" => &["bert", "mt5xl"],
        "CLIPTextEncodeLumina2" => &["user_prompt"],
        other if other.starts_with("CLIPTextEncode") => &["text"],
        _ => return None,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Polarity {
    Positive,
    Negative,
}

fn inputs_of(node: &Value) -> Option<&Map<String, Value>> {
    node.get("inputs")?.as_object()
}

fn class_of(node: &Value) -> &str {
    node.get("class_type")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// Text-encoder node ids on the `polarity` side of every sampler/guider.
fn encoders_feeding(workflow: &Map<String, Value>, polarity: Polarity) -> BTreeSet<String> {
    let mut stack: Vec<String> = Vec::new();
    for node in workflow.values() {
        let Some(inputs) = inputs_of(node) else {
            continue;
        };
        let class = class_of(node);
        for (name, value) in inputs {
            let is_root = match polarity {
                Polarity::Positive => {
                    name == "positive"
                        || (class == "BasicGuider" && name == "conditioning")
                        || (class == "DualCFGGuider" && name == "cond1")
                }
                Polarity::Negative => name == "negative",
            };
            if is_root && let Some((id, _)) = as_link(value) {
                stack.push(id.to_string());
            }
        }
    }
    let mut visited = BTreeSet::new();
    let mut encoders = BTreeSet::new();
    while let Some(id) = stack.pop() {
        if !visited.insert(id.clone()) {
            continue;
        }
        let Some(node) = workflow.get(&id) else {
            continue;
        };
        let class = class_of(node);
        if text_inputs(class).is_some() {
            encoders.insert(id);
            continue;
        }
        if polarity == Polarity::Negative && class == "ConditioningZeroOut" {
            continue;
        }
        let Some(inputs) = inputs_of(node) else {
            continue;
        };
        let has_pair = inputs.contains_key("positive") && inputs.contains_key("negative");
        for (name, value) in inputs {
            let follow = if has_pair {
                name == if polarity == Polarity::Positive {
                    "positive"
                } else {
                    "negative"
                }
            } else {
                name.starts_with("cond")
            };
            if follow && let Some((upstream, _)) = as_link(value) {
                stack.push(upstream.to_string());
            }
        }
    }
    encoders
}

fn is_ui_format(workflow: &Map<String, Value>) -> bool {
    workflow.get("nodes").is_some_and(Value::is_array)
        || workflow.get("links").is_some_and(Value::is_array)
}

const UI_FORMAT_MESSAGE: &str = "this is a UI-format workflow (it has `nodes`/`links`); send the API format instead: \
in ComfyUI use Workflow → Export (API) (older menus: enable dev mode options in the settings, then \"Save (API Format)\")";

/// Structural checks of the caller's graph: every entry is a node with a
/// `class_type` and an `inputs` object.
fn check_nodes(checks: &mut Checks, workflow: &Map<String, Value>) {
    if workflow.is_empty() {
        checks.fail("workflow", "the workflow has no nodes");
    }
    for (id, node) in workflow {
        let field = format!("workflow/{id}");
        let Some(node) = node.as_object() else {
            checks.fail(
                &field,
                "must be a node object {\"class_type\": ..., \"inputs\": {...}}",
            );
            continue;
        };
        match node.get("class_type") {
            Some(Value::String(class)) if !class.trim().is_empty() => {}
            _ => {
                checks.fail(
                    &format!("{field}/class_type"),
                    "every node needs a non-empty string `class_type`",
                );
            }
        }
        match node.get("inputs") {
            Some(Value::Object(inputs)) => {
                if let Some(Value::String(prefix)) = inputs.get("filename_prefix") {
                    check_filename_prefix(checks, &format!("{field}/inputs/filename_prefix"), class_of(&Value::Object(node.clone())), prefix);
                }
            }
            _ => {
                checks.fail(
                    &format!("{field}/inputs"),
                    "every node needs an `inputs` object",
                );
            }
        }
    }
}

/// Longest `filename_prefix` accepted (ComfyUI builds file names from it; the file system's own
/// limit is 255 bytes per name).
pub const FILENAME_PREFIX_MAX_CHARS: usize = 120;

/// A save node's `filename_prefix` names a file under ComfyUI's output folder: it must stay there
/// (no `..`, no absolute path, no `\`) and be a sane length — the caller hears which node is wrong
/// instead of ComfyUI failing the run.
fn check_filename_prefix(checks: &mut Checks, field: &str, class: &str, prefix: &str) {
    let problem = if prefix.split(['/', '\\']).any(|segment| segment == "..") || prefix.starts_with('/') || prefix.contains('\\') {
        Some(format!("{class}'s filename_prefix must stay inside ComfyUI's output folder (no `..`, no leading `/`, no `\\`)"))
    } else if prefix.chars().any(char::is_control) {
        Some(format!("{class}'s filename_prefix must not contain control characters"))
    } else if prefix.chars().count() > FILENAME_PREFIX_MAX_CHARS {
        Some(format!("{class}'s filename_prefix is {} characters; at most {FILENAME_PREFIX_MAX_CHARS} are accepted", prefix.chars().count()))
    } else {
        None
    };
    if let Some(message) = problem {
        checks.fail(field, &message);
    }
}

fn output_format_for(
    workflow: &Map<String, Value>,
    output_node: Option<&str>,
    choice: Option<OutputChoice>,
) -> OutputFormat {
    match choice {
        Some(OutputChoice::Jpeg) => OutputFormat::Jpeg,
        Some(OutputChoice::Png) => OutputFormat::Png,
        Some(OutputChoice::Original) => OutputFormat::Original,
        None => {
            let outputs: Vec<&str> = match output_node {
                Some(id) => workflow.get(id).map(class_of).into_iter().collect(),
                None => workflow
                    .values()
                    .map(class_of)
                    .filter(|c| is_output_class(c))
                    .collect(),
            };
            if !outputs.is_empty() && outputs.iter().all(|c| MOVING_OUTPUT_CLASSES.contains(c)) {
                OutputFormat::Original
            } else {
                OutputFormat::Jpeg
            }
        }
    }
}

fn output_format_name(format: OutputFormat) -> &'static str {
    match format {
        OutputFormat::Jpeg => "jpeg",
        OutputFormat::Png => "png",
        OutputFormat::Original => "original",
    }
}

fn request_schema() -> Value {
    let mut p = Map::new();
    p.insert(
        "workflow".into(),
        json!({"type": "object", "description": "A ComfyUI API-format graph: node id → {\"class_type\", \"inputs\"} (Workflow → Export (API))."}),
    );
    p.insert(
        "prompt".into(),
        json!({"type": "string", "minLength": 1, "maxLength": PROMPT_MAX_CHARS, "pattern": schema::NOT_BLANK,
               "description": "Replaces the text of the text encoders feeding the samplers' positive inputs (never negatives)."}),
    );
    p.insert(
        "output_node".into(),
        json!({"type": "string", "minLength": 1, "description": "Id of the output node whose media is returned. Default: the last output node that produced media."}),
    );
    p.insert(
        "output_format".into(),
        json!({"type": "string", "enum": ["jpeg", "png", "original"],
               "description": "Image encoding. Default: jpeg, or original when every output node makes animation/video/audio."}),
    );
    schema::strict_object(&["workflow"], p)
}

pub struct Workflow;

impl Plugin for Workflow {
    fn manifest() -> Manifest {
        Manifest {
            name: NAME.into(),
            version: env!("CARGO_PKG_VERSION").into(),
            route: ROUTE.into(),
            summary: "Run a ComfyUI API-format workflow".into(),
            request_schema: request_schema().to_string(),
            response_media_types: vec![
                "image/jpeg".into(),
                "image/png".into(),
                "image/webp".into(),
                "image/gif".into(),
                "video/mp4".into(),
                "video/webm".into(),
            ],
            analytics_prefix: ANALYTICS_PREFIX.into(),
            node_classes: vec![],
            models: vec![],
            // The graph is the caller's: there is nothing of ours to warm.
            warm_up: None,
        }
    }

    fn build(request: &Request, _host: &dyn Host) -> Result<Job, BuildError> {
        let body: WorkflowRequest = decode(&request.body)?;
        let mut workflow = body.workflow;
        let mut checks = Checks::new();
        if is_ui_format(&workflow) {
            checks.fail("workflow", UI_FORMAT_MESSAGE);
            return Err(BuildError::InvalidRequest(checks.errors().to_vec()));
        }
        check_nodes(&mut checks, &workflow);
        if let Some(prompt) = &body.prompt {
            checks
                .non_empty("prompt", prompt)
                .max_chars("prompt", prompt, PROMPT_MAX_CHARS);
        }
        if let Some(id) = &body.output_node {
            match workflow.get(id) {
                None => {
                    let ids: Vec<&str> = workflow.keys().map(String::as_str).take(20).collect();
                    checks.fail(
                        "output_node",
                        format!(
                            "no node `{id}` in the workflow (node ids: {})",
                            ids.join(", ")
                        ),
                    );
                }
                Some(node) if !is_output_class(class_of(node)) => {
                    checks.fail(
                        "output_node",
                        format!("node `{id}` ({}) is not an output node (e.g. SaveImage, PreviewImage, SaveAnimatedWEBP)", class_of(node)),
                    );
                }
                Some(_) => {}
            }
        }
        checks.finish()?;

        let mut injected: Vec<String> = Vec::new();
        if let Some(prompt) = &body.prompt {
            let positive = encoders_feeding(&workflow, Polarity::Positive);
            let negative = encoders_feeding(&workflow, Polarity::Negative);
            if positive.is_empty() {
                return Err(BuildError::InvalidRequest(vec![
                    flowhost_sdk::decode::field_error(
                        "prompt",
                        "the workflow has no text encoder (CLIPTextEncode) feeding a sampler's positive input, so there is nowhere to put the prompt; leave `prompt` out or add one",
                    ),
                ]));
            }
            let shared: Vec<&String> = positive.intersection(&negative).collect();
            if !shared.is_empty() {
                let ids: Vec<&str> = shared.iter().map(|s| s.as_str()).collect();
                return Err(BuildError::InvalidRequest(vec![
                    flowhost_sdk::decode::field_error(
                        "prompt",
                        format!(
                            "text encoder node(s) {} feed both a positive and a negative input; injecting the prompt would change the negative too. Give the negative its own CLIPTextEncode",
                            ids.join(", ")
                        ),
                    ),
                ]));
            }
            for id in positive {
                let Some(node) = workflow.get_mut(&id) else {
                    continue;
                };
                let class = class_of(node).to_string();
                let names = text_inputs(&class).unwrap_or(&[]);
                if let Some(inputs) = node.get_mut("inputs").and_then(Value::as_object_mut) {
                    for name in names {
                        inputs.insert(name.to_string(), Value::String(prompt.clone()));
                    }
                }
                injected.push(id);
            }
        }

        let output_format =
            output_format_for(&workflow, body.output_node.as_deref(), body.output_format);
        let caller_nodes: Vec<String> = workflow.keys().cloned().collect();
        let classes: BTreeMap<&str, usize> =
            workflow
                .values()
                .map(class_of)
                .fold(BTreeMap::new(), |mut m, c| {
                    *m.entry(c).or_default() += 1;
                    m
                });
        let analytics = json!({
            "workflow_type": "workflow",
            "node_count": workflow.len(),
            "class_count": classes.len(),
            "has_prompt": body.prompt.is_some(),
            "prompt_length": body.prompt.as_ref().map(|p| p.chars().count()).unwrap_or(0),
            "prompt_nodes": injected.len(),
            "has_output_node": body.output_node.is_some(),
            "output_format": output_format_name(output_format),
        });
        let models = flowhost_sdk::hints::model_set_of(&workflow);
        let progress = flowhost_sdk::hints::sampler_progress_of(&workflow);
        Ok(Job {
            workflow: Value::Object(workflow).to_string(),
            uploads: vec![],
            outputs: body.output_node.into_iter().collect(),
            output_format,
            seed: None,
            analytics: analytics.to_string(),
            caller_nodes,
            models,
            progress,
            fetches: vec![],
        })
    }
}

flowhost_sdk::register!(Workflow);

#[cfg(test)]
mod tests {
    use super::*;
    use flowhost_sdk::host::FakeHost;
    use flowhost_sdk::testing::{self, invalid_request, workflow as graph};

    /// The flux-validation graph (a): FluxGuidance between the positive encoder and the sampler.
    fn flux_graph() -> Value {
        json!({
            "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-dev.safetensors", "weight_dtype": "default"}},
            "2": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "clip_l.safetensors", "clip_name2": "t5xxl_fp16.safetensors", "type": "flux"}},
            "3": {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}},
            "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "old positive", "clip": ["2", 0]}},
            "5": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["4", 0], "guidance": 3.5}},
            "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "old negative", "clip": ["2", 0]}},
            "7": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1}},
            "8": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": 42, "steps": 20, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "positive": ["5", 0], "negative": ["6", 0], "latent_image": ["7", 0], "denoise": 1.0}},
            "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["3", 0]}},
            "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "flux_a"}, "_meta": {"title": "Save Image"}}
        })
    }

    fn build(body: Value) -> Result<Job, BuildError> {
        Workflow::build(&testing::request(&body, 1), &FakeHost::new())
    }


    fn invalid(result: Result<Job, BuildError>) -> Vec<(String, String)> {
        invalid_request(result).into_iter().map(|e| (e.field, e.message)).collect()
    }

    fn fields(result: Result<Job, BuildError>) -> Vec<String> {
        invalid(result).into_iter().map(|(f, _)| f).collect()
    }

    #[test]
    fn the_graph_passes_through_unchanged_without_a_prompt() {
        let job = build(json!({"workflow": flux_graph()})).unwrap();
        assert_eq!(graph(&job), flux_graph());
        assert_eq!(job.caller_nodes.len(), 10);
        assert!(
            job.outputs.is_empty(),
            "the host picks the last output node"
        );
        assert_eq!(job.output_format, OutputFormat::Jpeg);
        assert_eq!(job.seed, None);
    }

    #[test]
    fn the_prompt_reaches_the_positive_encoder_through_flux_guidance_and_never_the_negative() {
        let g = graph(&build(json!({"workflow": flux_graph(), "prompt": "a lighthouse"})).unwrap());
        assert_eq!(g["4"]["inputs"]["text"], "a lighthouse");
        assert_eq!(g["6"]["inputs"]["text"], "old negative");
    }

    #[test]
    fn the_prompt_follows_combines_and_controlnets_along_the_positive_side() {
        let mut w = flux_graph();
        w["11"] =
            json!({"class_type": "CLIPTextEncode", "inputs": {"text": "style", "clip": ["2", 0]}});
        w["12"] = json!({"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["5", 0], "conditioning_2": ["11", 0]}});
        w["13"] = json!({"class_type": "ControlNetApplyAdvanced", "inputs": {"positive": ["12", 0], "negative": ["6", 0], "control_net": ["99", 0], "image": ["98", 0], "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}});
        w["8"]["inputs"]["positive"] = json!(["13", 0]);
        w["8"]["inputs"]["negative"] = json!(["13", 1]);
        let job = build(json!({"workflow": w, "prompt": "new"})).unwrap();
        let g = graph(&job);
        assert_eq!(
            (
                g["4"]["inputs"]["text"].as_str(),
                g["11"]["inputs"]["text"].as_str()
            ),
            (Some("new"), Some("new"))
        );
        assert_eq!(g["6"]["inputs"]["text"], "old negative");
        let a: Value = serde_json::from_str(&job.analytics).unwrap();
        assert_eq!(a["prompt_nodes"], 2);
    }

    #[test]
    fn a_zeroed_negative_from_the_positive_encoder_is_fine() {
        let mut w = flux_graph();
        w["6"] = json!({"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["4", 0]}});
        let g = graph(&build(json!({"workflow": w, "prompt": "new"})).unwrap());
        assert_eq!(g["4"]["inputs"]["text"], "new");
    }

    #[test]
    fn an_encoder_feeding_both_sides_is_refused() {
        let mut w = flux_graph();
        w["8"]["inputs"]["negative"] = json!(["4", 0]);
        let errors = invalid(build(json!({"workflow": w, "prompt": "new"})));
        assert_eq!(errors[0].0, "prompt");
        assert!(
            errors[0].1.contains("both a positive and a negative"),
            "{}",
            errors[0].1
        );
    }

    #[test]
    fn a_prompt_with_no_positive_encoder_is_refused() {
        let w = json!({
            "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}
        });
        assert_eq!(
            fields(build(json!({"workflow": w.clone(), "prompt": "p"}))),
            vec!["prompt"]
        );
        assert!(build(json!({"workflow": w})).is_ok());
    }

    #[test]
    fn guiders_and_other_encoders_are_understood() {
        let w = json!({
            "1": {"class_type": "CLIPTextEncodeFlux", "inputs": {"clip": ["9", 0], "clip_l": "a", "t5xxl": "b", "guidance": 3.5}},
            "2": {"class_type": "BasicGuider", "inputs": {"model": ["8", 0], "conditioning": ["1", 0]}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "x"}}
        });
        let g = graph(&build(json!({"workflow": w, "prompt": "new"})).unwrap());
        assert_eq!(
            (
                g["1"]["inputs"]["clip_l"].as_str(),
                g["1"]["inputs"]["t5xxl"].as_str()
            ),
            (Some("new"), Some("new"))
        );
    }

    #[test]
    fn ui_format_exports_are_refused_with_how_to_export_api_format() {
        let ui = json!({"last_node_id": 9, "last_link_id": 9, "nodes": [{"id": 1, "type": "KSampler"}], "links": [[1, 1, 0, 2, 0, "MODEL"]], "version": 0.4});
        let errors = invalid(build(json!({"workflow": ui})));
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].0, "workflow");
        assert!(
            errors[0].1.contains("Export (API)") && errors[0].1.contains("Save (API Format)"),
            "{}",
            errors[0].1
        );
    }

    #[test]
    fn malformed_nodes_are_named_one_by_one() {
        let w = json!({
            "1": {"class_type": "EmptyImage"},
            "2": {"inputs": {}},
            "3": "SaveImage",
            "4": {"class_type": "", "inputs": {}}
        });
        assert_eq!(
            fields(build(json!({"workflow": w}))),
            vec![
                "workflow/1/inputs",
                "workflow/2/class_type",
                "workflow/3",
                "workflow/4/class_type"
            ]
        );
        assert_eq!(fields(build(json!({"workflow": {}}))), vec!["workflow"]);
        assert_eq!(fields(build(json!({"workflow": [1, 2]}))), vec!["workflow"]);
        assert_eq!(fields(build(json!({"prompt": "p"}))), vec!["workflow"]);
    }

    fn save_with_prefix(prefix: &str) -> Value {
        json!({"workflow": {
            "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
            "9": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}}
        }})
    }

    #[test]
    fn filename_prefix_traversal_is_refused_naming_the_node() {
        for bad in ["../../etc/x", "a/../../b", "/tmp/x", "a\\b", "x\u{0}y"] {
            let errors = invalid(build(save_with_prefix(bad)));
            assert_eq!(errors.len(), 1, "{bad}: {errors:?}");
            assert_eq!(errors[0].0, "workflow/9/inputs/filename_prefix");
            assert!(errors[0].1.contains("SaveImage"), "{errors:?}");
        }
        assert!(build(save_with_prefix("portraits/alice")).is_ok());
    }

    #[test]
    fn filename_prefix_length_limit_obeyed() {
        assert!(build(save_with_prefix(&"p".repeat(FILENAME_PREFIX_MAX_CHARS))).is_ok());
    }

    #[test]
    fn filename_prefix_length_limit_violated() {
        let errors = invalid(build(save_with_prefix(&"p".repeat(1 << 20))));
        assert_eq!(errors[0].0, "workflow/9/inputs/filename_prefix");
        assert!(errors[0].1.contains("at most"), "{errors:?}");
    }

    #[test]
    fn output_node_must_exist_and_be_an_output() {
        let job = build(json!({"workflow": flux_graph(), "output_node": "10"})).unwrap();
        assert_eq!(job.outputs, vec!["10"]);
        let errors = invalid(build(
            json!({"workflow": flux_graph(), "output_node": "77"}),
        ));
        assert_eq!(errors[0].0, "output_node");
        assert!(errors[0].1.contains("no node `77`"));
        let errors = invalid(build(json!({"workflow": flux_graph(), "output_node": "9"})));
        assert_eq!(errors[0].0, "output_node");
        assert!(errors[0].1.contains("VAEDecode"));
    }

    #[test]
    fn output_formats() {
        for (given, expected) in [
            ("jpeg", OutputFormat::Jpeg),
            ("png", OutputFormat::Png),
            ("original", OutputFormat::Original),
        ] {
            assert_eq!(
                build(json!({"workflow": flux_graph(), "output_format": given}))
                    .unwrap()
                    .output_format,
                expected
            );
        }
        assert_eq!(
            fields(build(
                json!({"workflow": flux_graph(), "output_format": "gif"})
            )),
            vec!["output_format"]
        );
        let mut animated = flux_graph();
        animated["10"] = json!({"class_type": "SaveAnimatedWEBP", "inputs": {"images": ["9", 0], "filename_prefix": "a", "fps": 6.0, "lossless": false, "quality": 80, "method": "default"}});
        assert_eq!(
            build(json!({"workflow": animated.clone()}))
                .unwrap()
                .output_format,
            OutputFormat::Original
        );
        assert_eq!(
            build(json!({"workflow": animated, "output_format": "jpeg"}))
                .unwrap()
                .output_format,
            OutputFormat::Jpeg
        );
    }

    #[test]
    fn unknown_fields_are_refused() {
        assert_eq!(
            fields(build(
                json!({"workflow": flux_graph(), "negative_prompt": "x"})
            )),
            vec!["negative_prompt"]
        );
    }

    #[test]
    fn the_manifest_requires_only_the_workflow() {
        let m = Workflow::manifest();
        assert_eq!(
            (m.route.as_str(), m.analytics_prefix.as_str()),
            ("/workflow", "modal_workflow")
        );
        let s: Value = serde_json::from_str(&m.request_schema).unwrap();
        assert_eq!(s["required"], json!(["workflow"]));
        assert_eq!(s["additionalProperties"], false);
    }
}
