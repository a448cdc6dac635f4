//! Preflight: checks an API-format graph against the `Catalogue` the way ComfyUI's own validation
//! would, before any GPU time is spent — same node ids, same error kinds (`invalid_prompt`,
//! `prompt_no_outputs`, `required_input_missing`, `return_type_mismatch`,
//! `exception_during_inner_validation`, `value_bigger_than_max`, `value_smaller_than_min`,
//! `invalid_input_type`, `value_not_in_list`). Like ComfyUI it only checks nodes an output node depends
//! on. Unlike ComfyUI it is strict: an invalid output branch fails the graph even if another is valid.
//! It cannot check what needs the disk (uploaded files): those nodes validate themselves in ComfyUI.

use std::collections::HashSet;

use serde_json::{Map, Value};

use crate::catalogue::{Catalogue, ClassInfo, InputKind};
use crate::error::NodeIssue;

impl Catalogue {
    /// Check `graph` (`{node_id: {class_type, inputs}}`); every problem found is returned.
    pub fn preflight(&self, graph: &Value) -> Result<(), Vec<NodeIssue>> {
        let Some(nodes) = graph.as_object() else {
            return Err(vec![whole_graph(
                "invalid_prompt",
                "the workflow must be a JSON object of nodes",
            )]);
        };
        // Stage 0: the node count, before any per-node work.
        crate::graph_shape::check_size(graph)?;

        // Stage 1 (ComfyUI: invalid_prompt, reported before anything else).
        let mut issues = Vec::new();
        for (id, node) in nodes {
            match node.get("class_type") {
                Some(Value::String(class)) if self.has_class(class) => {}
                Some(Value::String(class)) => issues.push(NodeIssue {
                    node_id: id.clone(),
                    class_type: class.clone(),
                    kind: "invalid_prompt".into(),
                    input_name: None,
                    message: format!("Cannot execute because node {class} does not exist."),
                }),
                _ => issues.push(NodeIssue {
                    node_id: id.clone(),
                    class_type: String::new(),
                    kind: "invalid_prompt".into(),
                    input_name: None,
                    message: "Cannot execute because a node is missing the class_type property."
                        .into(),
                }),
            }
        }
        if !issues.is_empty() {
            return Err(issues);
        }

        // Stage 2: output nodes.
        let outputs: Vec<&String> = nodes
            .iter()
            .filter(|(_, n)| self.node_class(n).is_some_and(|c| c.output_node))
            .map(|(id, _)| id)
            .collect();
        if outputs.is_empty() {
            return Err(vec![whole_graph(
                "prompt_no_outputs",
                "Prompt has no outputs",
            )]);
        }

        // Stage 3: every node an output depends on.
        let mut visited = HashSet::new();
        let mut stack: Vec<&String> = outputs;
        while let Some(id) = stack.pop() {
            if !visited.insert(id.clone()) {
                continue;
            }
            let Some(node) = nodes.get(id) else { continue };
            let Some(class) = self.node_class(node) else {
                continue;
            };
            let empty = Map::new();
            let inputs = node
                .get("inputs")
                .and_then(Value::as_object)
                .unwrap_or(&empty);
            self.check_node(id, class, inputs, nodes, &mut issues);
            for value in inputs.values() {
                if let Some((source, _)) = as_link(value)
                    && let Some((key, _)) = nodes.get_key_value(source.as_str())
                {
                    stack.push(key);
                }
            }
        }
        if !issues.is_empty() {
            return Err(issues);
        }
        // Stage 4: depth and cycles, which ComfyUI would only meet as a `RecursionError` naming
        // no node (after the per-node checks, which report a bad link the way ComfyUI does).
        crate::graph_shape::check_links(graph)
    }

    fn node_class(&self, node: &Value) -> Option<&ClassInfo> {
        self.class(node.get("class_type")?.as_str()?)
    }

    fn check_node(
        &self,
        id: &str,
        class: &ClassInfo,
        inputs: &Map<String, Value>,
        nodes: &Map<String, Value>,
        issues: &mut Vec<NodeIssue>,
    ) {
        let issue = |kind: &str, input: &str, message: String| NodeIssue {
            node_id: id.to_string(),
            class_type: class.name.clone(),
            kind: kind.to_string(),
            input_name: Some(input.to_string()),
            message,
        };
        for spec in &class.inputs {
            let Some(value) = inputs.get(&spec.name) else {
                if spec.required {
                    issues.push(issue(
                        "required_input_missing",
                        &spec.name,
                        format!("Required input is missing: {}", spec.name),
                    ));
                }
                continue;
            };
            if let Some((source, index)) = as_link(value) {
                let Some(source_class) =
                    nodes.get(source.as_str()).and_then(|n| self.node_class(n))
                else {
                    issues.push(issue(
                        "exception_during_inner_validation",
                        &spec.name,
                        format!("Exception when validating inner node: input {} links to node '{source}', which does not exist", spec.name),
                    ));
                    continue;
                };
                let Some(received) = usize::try_from(index)
                    .ok()
                    .and_then(|i| source_class.outputs.get(i))
                else {
                    issues.push(issue(
                        "exception_during_inner_validation",
                        &spec.name,
                        format!(
                            "Exception when validating inner node: input {} links to output {index} of node {source} ({}), which has {} output(s)",
                            spec.name,
                            source_class.name,
                            source_class.outputs.len()
                        ),
                    ));
                    continue;
                };
                let expected = spec.kind.link_type();
                if !link_types_match(received, expected) {
                    issues.push(issue(
                        "return_type_mismatch",
                        &spec.name,
                        format!(
                            "Return type mismatch between linked nodes: {}, received_type({received}) mismatch input_type({expected})",
                            spec.name
                        ),
                    ));
                }
                continue;
            }
            match &spec.kind {
                InputKind::Int { min, max } => match as_int(value) {
                    Some(n) => check_bounds(n, min, max, &spec.name, value, &mut |k, m| {
                        issues.push(issue(k, &spec.name, m))
                    }),
                    None => issues.push(issue(
                        "invalid_input_type",
                        &spec.name,
                        format!(
                            "Failed to convert an input value to a INT value: {}, {}",
                            spec.name,
                            short(value)
                        ),
                    )),
                },
                InputKind::Float { min, max } => match as_float(value) {
                    Some(n) => check_bounds(n, min, max, &spec.name, value, &mut |k, m| {
                        issues.push(issue(k, &spec.name, m))
                    }),
                    None => issues.push(issue(
                        "invalid_input_type",
                        &spec.name,
                        format!(
                            "Failed to convert an input value to a FLOAT value: {}, {}",
                            spec.name,
                            short(value)
                        ),
                    )),
                },
                InputKind::Combo {
                    options: Some(options),
                    free_value: false,
                } => {
                    if !options.iter().any(|o| combo_equal(o, value)) {
                        let list: Vec<String> = options.iter().take(20).map(short).collect();
                        let more = if options.len() > 20 { ", …" } else { "" };
                        issues.push(issue(
                            "value_not_in_list",
                            &spec.name,
                            format!(
                                "Value not in list: {}: {} not in [{}{more}]",
                                spec.name,
                                short(value),
                                list.join(", ")
                            ),
                        ));
                    }
                }
                InputKind::Combo { .. }
                | InputKind::String
                | InputKind::Boolean
                | InputKind::Data(_) => {}
            }
        }
    }
}

fn whole_graph(kind: &str, message: &str) -> NodeIssue {
    NodeIssue {
        node_id: String::new(),
        class_type: String::new(),
        kind: kind.into(),
        input_name: None,
        message: message.into(),
    }
}

/// `[source_node_id, output_index]` — ComfyUI's link shape.
fn as_link(value: &Value) -> Option<(String, u64)> {
    let arr = value.as_array()?;
    if arr.len() != 2 {
        return None;
    }
    let source = match &arr[0] {
        Value::String(s) => s.clone(),
        Value::Number(n) if n.is_u64() => n.to_string(),
        _ => return None,
    };
    Some((source, arr[1].as_u64()?))
}

/// ComfyUI's non-strict type check: `*` matches anything; comma-separated unions match on any overlap.
fn link_types_match(received: &str, expected: &str) -> bool {
    if received == expected || received == "*" || expected == "*" {
        return true;
    }
    let r: HashSet<&str> = received.split(',').map(str::trim).collect();
    let e: HashSet<&str> = expected.split(',').map(str::trim).collect();
    r.contains("*") || e.contains("*") || !r.is_disjoint(&e)
}

/// A number as ComfyUI's `int(x)` sees it (floats truncate, numeric strings parse, bools are 0/1).
fn as_int(value: &Value) -> Option<f64> {
    match value {
        Value::Number(n) => n
            .as_i64()
            .map(|i| i as f64)
            .or_else(|| n.as_u64().map(|u| u as f64))
            .or_else(|| n.as_f64().map(f64::trunc)),
        Value::String(s) => s.trim().parse::<i128>().ok().map(|i| i as f64),
        Value::Bool(b) => Some(if *b { 1.0 } else { 0.0 }),
        _ => None,
    }
}

/// A number as ComfyUI's `float(x)` sees it.
fn as_float(value: &Value) -> Option<f64> {
    match value {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        Value::Bool(b) => Some(if *b { 1.0 } else { 0.0 }),
        _ => None,
    }
}

/// Exact integer comparison where both sides are integers (seeds reach u64::MAX), float otherwise.
fn compare(value: &Value, converted: f64, bound: &Value) -> std::cmp::Ordering {
    let as_i128 = |v: &Value| {
        v.as_i64()
            .map(i128::from)
            .or_else(|| v.as_u64().map(i128::from))
    };
    if let (Some(a), Some(b)) = (as_i128(value), as_i128(bound)) {
        return a.cmp(&b);
    }
    converted
        .partial_cmp(&bound.as_f64().unwrap_or(f64::NAN))
        .unwrap_or(std::cmp::Ordering::Equal)
}

fn check_bounds(
    converted: f64,
    min: &Option<Value>,
    max: &Option<Value>,
    name: &str,
    value: &Value,
    report: &mut dyn FnMut(&str, String),
) {
    if let Some(min) = min
        && compare(value, converted, min).is_lt()
    {
        report(
            "value_smaller_than_min",
            format!("Value {} smaller than min of {min}: {name}", short(value)),
        );
    }
    if let Some(max) = max
        && compare(value, converted, max).is_gt()
    {
        report(
            "value_bigger_than_max",
            format!("Value {} bigger than max of {max}: {name}", short(value)),
        );
    }
}

fn combo_equal(option: &Value, value: &Value) -> bool {
    match (option, value) {
        (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
        _ => option == value,
    }
}

fn short(value: &Value) -> String {
    match value {
        Value::String(s) => format!("'{s}'"),
        other => {
            let s = other.to_string();
            if s.len() > 80 {
                format!(
                    "{}…",
                    &s[..s.char_indices().nth(80).map_or(s.len(), |(i, _)| i)]
                )
            } else {
                s
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn real() -> Catalogue {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../comfyui-double/fixtures/object_info.json"
        );
        Catalogue::from_object_info(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn kinds(r: Result<(), Vec<NodeIssue>>) -> Vec<(String, String)> {
        let mut v: Vec<_> = r
            .err()
            .unwrap_or_default()
            .into_iter()
            .map(|i| (i.node_id, i.kind))
            .collect();
        v.sort();
        v
    }

    fn fixture(name: &str) -> Value {
        let path = format!(
            "{}/../comfyui-double/fixtures/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    /// What real ComfyUI answered, as (node id, kind) pairs.
    fn expected_from_response(status: u64, response: &Value) -> Vec<(String, String)> {
        let mut v = Vec::new();
        if let Some(ne) = response.get("node_errors").and_then(Value::as_object) {
            for issue in crate::protocol::node_issues_from(ne) {
                v.push((issue.node_id, issue.kind));
            }
        }
        if v.is_empty() && status != 200 {
            match response.pointer("/error/type").and_then(Value::as_str) {
                Some("invalid_prompt") => {
                    let details = response
                        .pointer("/error/details")
                        .and_then(Value::as_str)
                        .unwrap_or("");
                    v.push((
                        crate::protocol::node_id_from_details(details).unwrap_or_default(),
                        "invalid_prompt".into(),
                    ));
                }
                Some(other) => v.push((String::new(), other.to_string())),
                None => v.push((String::new(), "invalid_prompt".into())), // 500: not a graph at all
            }
        }
        v.sort();
        v
    }

    #[test]
    fn agrees_with_every_captured_prompt_error() {
        let cases = fixture("prompt-errors.json");
        let mut checked = 0;
        for case in cases.as_array().unwrap() {
            let name = case["case"].as_str().unwrap();
            let Some(graph) = case.get("request").and_then(|r| r.get("prompt")) else {
                continue;
            }; // no graph to check
            let expected =
                expected_from_response(case["status"].as_u64().unwrap(), &case["response"]);
            let got = kinds(real().preflight(graph));
            if expected
                .iter()
                .any(|(_, k)| k == "custom_validation_failed")
            {
                // LoadImage checks file existence on ComfyUI's disk: not knowable here, the run reports it.
                assert!(got.is_empty(), "{name}: {got:?}");
            } else {
                assert_eq!(got, expected, "case {name}");
            }
            checked += 1;
        }
        assert!(checked >= 17, "only {checked} cases had a graph");
    }

    #[test]
    fn agrees_with_every_captured_flux_validation() {
        let cases = fixture("flux-validation.json");
        for (name, case) in cases.as_object().unwrap() {
            let expected = expected_from_response(
                case["post_status"].as_u64().unwrap(),
                &case["post_response"],
            );
            let got = kinds(real().preflight(&case["request"]["prompt"]));
            assert_eq!(got, expected, "case {name}");
        }
    }

    #[test]
    fn missing_model_is_named() {
        let cases = fixture("flux-validation.json");
        let issues = real()
            .preflight(&cases["x_missing_model_files"]["request"]["prompt"])
            .unwrap_err();
        let vae = issues.iter().find(|i| i.node_id == "3").unwrap();
        assert_eq!(vae.input_name.as_deref(), Some("vae_name"));
        assert!(
            vae.message.contains("missing_vae.safetensors"),
            "{}",
            vae.message
        );
    }

    #[test]
    fn combo_without_options_and_v3_combo_shapes() {
        let c = real();
        // LoadImageOutput.image is ["COMBO", {...}] without options: accept anything.
        let g = json!({"1": {"class_type": "LoadImageOutput", "inputs": {"image": "whatever.png"}},
                       "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}});
        assert_eq!(c.preflight(&g), Ok(()));
        // A V3 combo with options rejects a value outside them.
        let v3 = c.class("ImageStitch").and_then(|cl| {
            cl.inputs
                .iter()
                .find(|i| {
                    matches!(
                        &i.kind,
                        InputKind::Combo {
                            options: Some(_),
                            ..
                        }
                    )
                })
                .cloned()
        });
        if let Some(spec) = v3 {
            let mut inputs = serde_json::Map::new();
            inputs.insert(spec.name.clone(), json!("definitely-not-an-option"));
            let g = json!({"1": {"class_type": "ImageStitch", "inputs": inputs},
                           "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}});
            let issues = c.preflight(&g).unwrap_err();
            assert!(
                issues.iter().any(|i| i.kind == "value_not_in_list"
                    && i.input_name.as_deref() == Some(&spec.name))
            );
        }
    }

    #[test]
    fn seed_at_u64_max_is_accepted_and_beyond_is_not() {
        let c = real();
        let g = |seed: Value| {
            json!({"1": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
                   "2": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
                   "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}}})
        };
        assert_eq!(c.preflight(&g(json!(18446744073709551615u64))), Ok(()));
        // An unreachable node is not checked (ComfyUI would not run it either).
        assert_eq!(c.preflight(&g(json!(-1))), Ok(()));
        let ks = json!({"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
                        "2": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "area", "width": -5, "height": 8, "crop": "disabled"}},
                        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}}});
        assert_eq!(
            kinds(c.preflight(&ks)),
            vec![("2".to_string(), "value_smaller_than_min".to_string())]
        );
    }

    #[test]
    fn wildcard_links_match_anything() {
        assert!(link_types_match("IMAGE", "*"));
        assert!(link_types_match("*", "LATENT"));
        assert!(link_types_match("IMAGE,MASK", "MASK"));
        assert!(!link_types_match("LATENT", "IMAGE"));
    }
}
