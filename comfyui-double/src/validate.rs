//! `POST /prompt` validation, reproducing ComfyUI 0.3.64's `validate_prompt` / `validate_inputs`:
//! the same error types, messages, details and extra_info, the same recursion (and its quirks: a bad link
//! two levels down is reported on the intermediate node with the downstream input's config), value
//! coercion (32.7 → 32 for INT), and partial acceptance of independent output branches.
//!
//! Must never: touch the queue or the filesystem beyond existence checks, or accept what ComfyUI rejects.

use std::collections::{HashMap, HashSet};
use std::path::{Component, Path, PathBuf};

use serde_json::{Map, Value, json};

use crate::catalogue::{model_combos, model_options};
use crate::models::ModelPaths;

/// What validation needs to know about the server's disk.
pub(crate) struct ValidationContext<'a> {
    /// The node classes this ComfyUI has (with or without flowhost's node).
    pub catalogue: &'a Map<String, Value>,
    pub models: &'a ModelPaths,
    pub input_dir: &'a Path,
    pub output_dir: &'a Path,
    pub temp_dir: &'a Path,
}

/// Outcome of a prompt that ComfyUI would not answer with a 500.
#[derive(Debug)]
pub(crate) enum PromptCheck {
    /// 200: queue `outputs`; `node_errors` may be non-empty (partial acceptance).
    Accepted { outputs: Vec<String>, node_errors: Map<String, Value> },
    /// 400 `{"error", "node_errors"}`.
    Rejected { error: Value, node_errors: Map<String, Value> },
}

/// A Python exception raised during validation (caught one level up, as in ComfyUI).
#[derive(Clone, Debug)]
struct PyError {
    kind: &'static str,
    message: String,
    traceback: Vec<String>,
}

/// The reason a prompt makes ComfyUI answer 500 (an uncaught exception in the handler).
#[derive(Debug)]
pub(crate) struct InternalError(pub String);

/// `validated` in ComfyUI: node id → (valid, reasons), in insertion order.
#[derive(Default)]
struct Validated {
    order: Vec<String>,
    results: HashMap<String, (bool, Vec<Value>)>,
}

impl Validated {
    fn get(&self, id: &str) -> Option<(bool, Vec<Value>)> {
        self.results.get(id).cloned()
    }
    fn set(&mut self, id: &str, value: (bool, Vec<Value>)) {
        if !self.results.contains_key(id) {
            self.order.push(id.to_string());
        }
        self.results.insert(id.to_string(), value);
    }
}

fn error_obj(kind: &str, message: &str, details: &str, extra_info: Value) -> Value {
    json!({"type": kind, "message": message, "details": details, "extra_info": extra_info})
}

/// Python's `repr()` of a JSON value (strings in single quotes, None/True/False).
pub(crate) fn py_repr(v: &Value) -> String {
    match v {
        Value::String(s) => {
            if s.contains('\'') && !s.contains('"') {
                format!("\"{s}\"")
            } else {
                format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
            }
        }
        Value::Array(items) => format!("[{}]", items.iter().map(py_repr).collect::<Vec<_>>().join(", ")),
        Value::Object(map) => {
            format!("{{{}}}", map.iter().map(|(k, v)| format!("{}: {}", py_repr(&Value::from(k.as_str())), py_repr(v))).collect::<Vec<_>>().join(", "))
        }
        other => py_str(other),
    }
}

/// Python's `str()` of a JSON value.
pub(crate) fn py_str(v: &Value) -> String {
    match v {
        Value::Null => "None".into(),
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        Value::Number(n) => {
            if n.is_f64() {
                let f = n.as_f64().unwrap_or(0.0);
                if f.is_finite() && f.fract() == 0.0 && f.abs() < 1e16 { format!("{f:.1}") } else { format!("{f}") }
            } else {
                n.to_string()
            }
        }
        Value::String(s) => s.clone(),
        other => py_repr(other),
    }
}

fn py_type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "NoneType",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_f64() => "float",
        Value::Number(_) => "int",
        Value::String(_) => "str",
        Value::Array(_) => "list",
        Value::Object(_) => "dict",
    }
}

fn parse_py_int(s: &str) -> Option<i128> {
    let t = s.trim().replace('_', "");
    let t = t.strip_prefix('+').unwrap_or(&t);
    t.parse::<i128>().ok()
}

fn parse_py_float(s: &str) -> Option<f64> {
    let t = s.trim().replace('_', "");
    match t.to_ascii_lowercase().as_str() {
        "inf" | "+inf" | "infinity" | "+infinity" => return Some(f64::INFINITY),
        "-inf" | "-infinity" => return Some(f64::NEG_INFINITY),
        "nan" | "+nan" | "-nan" => return Some(f64::NAN),
        _ => {}
    }
    t.parse::<f64>().ok().filter(|_| !t.is_empty())
}

fn int_value(i: i128) -> Value {
    if let Ok(v) = i64::try_from(i) {
        Value::from(v)
    } else if let Ok(v) = u64::try_from(i) {
        Value::from(v)
    } else {
        Value::from(i as f64)
    }
}

/// `int(val)`, `float(val)`, `str(val)`, `bool(val)` as the executor applies them; Err = the exception message.
fn convert(input_type: &str, val: &Value) -> Result<Option<Value>, String> {
    match input_type {
        "INT" => match val {
            Value::Bool(b) => Ok(Some(Value::from(*b as i64))),
            Value::Number(n) => {
                if let Some(i) = n.as_i64() {
                    Ok(Some(Value::from(i)))
                } else if let Some(u) = n.as_u64() {
                    Ok(Some(Value::from(u)))
                } else {
                    Ok(Some(int_value(n.as_f64().unwrap_or(0.0).trunc() as i128)))
                }
            }
            Value::String(s) => parse_py_int(s).map(|i| Some(int_value(i))).ok_or_else(|| format!("invalid literal for int() with base 10: {}", py_repr(val))),
            other => Err(format!("int() argument must be a string, a bytes-like object or a real number, not '{}'", py_type_name(other))),
        },
        "FLOAT" => match val {
            Value::Bool(b) => Ok(Some(json!(if *b { 1.0 } else { 0.0 }))),
            Value::Number(n) => Ok(Some(serde_json::Number::from_f64(n.as_f64().unwrap_or(0.0)).map(Value::Number).unwrap_or(Value::Null))),
            Value::String(s) => match parse_py_float(s) {
                Some(f) => Ok(Some(serde_json::Number::from_f64(f).map(Value::Number).unwrap_or_else(|| Value::String(s.clone())))),
                None => Err(format!("could not convert string to float: {}", py_repr(val))),
            },
            other => Err(format!("float() argument must be a string or a real number, not '{}'", py_type_name(other))),
        },
        "STRING" => Ok(Some(Value::String(py_str(val)))),
        "BOOLEAN" => Ok(Some(Value::Bool(match val {
            Value::Null => false,
            Value::Bool(b) => *b,
            Value::Number(n) => n.as_f64().unwrap_or(0.0) != 0.0,
            Value::String(s) => !s.is_empty(),
            Value::Array(a) => !a.is_empty(),
            Value::Object(o) => !o.is_empty(),
        }))),
        _ => Ok(None),
    }
}

enum Num {
    Int(i128),
    Float(f64),
}

fn num(v: &Value) -> Option<Num> {
    match v {
        Value::Bool(b) => Some(Num::Int(*b as i128)),
        Value::Number(n) => n.as_i64().map(|i| Num::Int(i as i128)).or_else(|| n.as_u64().map(|u| Num::Int(u as i128))).or_else(|| n.as_f64().map(Num::Float)),
        _ => None,
    }
}

fn cmp_num(a: &Num, b: &Num) -> Option<std::cmp::Ordering> {
    match (a, b) {
        (Num::Int(x), Num::Int(y)) => Some(x.cmp(y)),
        (Num::Int(x), Num::Float(y)) => (*x as f64).partial_cmp(y),
        (Num::Float(x), Num::Int(y)) => x.partial_cmp(&(*y as f64)),
        (Num::Float(x), Num::Float(y)) => x.partial_cmp(y),
    }
}

/// Python `==` between JSON values (1 == 1.0).
fn py_eq(a: &Value, b: &Value) -> bool {
    match (num(a), num(b)) {
        (Some(x), Some(y)) if !matches!(a, Value::Bool(_)) || matches!(b, Value::Bool(_)) => cmp_num(&x, &y) == Some(std::cmp::Ordering::Equal),
        _ => a == b,
    }
}

/// ComfyUI's `validate_node_input`: exact match, `*`, or overlapping comma-separated type lists.
fn types_compatible(received: &Value, input_type: &Value) -> bool {
    if received == input_type {
        return true;
    }
    let (Some(r), Some(i)) = (received.as_str(), input_type.as_str()) else { return false };
    if r == "*" || i == "*" {
        return true;
    }
    let rs: HashSet<&str> = r.split(',').map(str::trim).collect();
    let is: HashSet<&str> = i.split(',').map(str::trim).collect();
    rs.intersection(&is).next().is_some()
}

/// Resolves a LoadImage value (`sub/name.png`, optional ` [input]|[output]|[temp]` suffix) to a file path.
pub(crate) fn annotated_path(value: &str, ctx_input: &Path, ctx_output: &Path, ctx_temp: &Path) -> Option<PathBuf> {
    let (name, root) = if let Some(n) = value.strip_suffix(" [input]") {
        (n, ctx_input)
    } else if let Some(n) = value.strip_suffix(" [output]") {
        (n, ctx_output)
    } else if let Some(n) = value.strip_suffix(" [temp]") {
        (n, ctx_temp)
    } else {
        (value, ctx_input)
    };
    let rel = Path::new(name);
    if name.is_empty() || rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        return None;
    }
    Some(root.join(rel))
}

struct Validator<'a, 'p> {
    prompt: &'p Map<String, Value>,
    ctx: &'a ValidationContext<'a>,
    validated: Validated,
    /// (node, input, converted value) to write back into the queued prompt, as ComfyUI mutates it.
    conversions: Vec<(String, String, Value)>,
    stack: Vec<String>,
}

const TB_INNER_CALL: &str = "  File \"/opt/ComfyUI/execution.py\", line 808, in validate_inputs\n    r = await validate_inputs(prompt_id, prompt, o_id, validated)\n        ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n";
const TB_KEY: &str = "  File \"/opt/ComfyUI/execution.py\", line 788, in validate_inputs\n    o_class_type = prompt[o_id]['class_type']\n                   ~~~~~~^^^^^^\n";
const TB_INDEX: &str = "  File \"/opt/ComfyUI/execution.py\", line 790, in validate_inputs\n    received_type = r[val[1]]\n                    ~^^^^^^^^\n";
const TB_PROMPT: &str = "  File \"/opt/ComfyUI/execution.py\", line 872, in validate_prompt\n    m = await validate_inputs(prompt_id, prompt, o, validated)\n        ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n";
const TB_INPUTS: &str = "  File \"/opt/ComfyUI/execution.py\", line 717, in validate_inputs\n    inputs = prompt[unique_id]['inputs']\n             ~~~~~~~~~~~~~~~~~^^^^^^^^^^\n";

impl Validator<'_, '_> {
    fn input_specs(&self, class: &str) -> Vec<(String, Value, bool)> {
        let Some(info) = self.ctx.catalogue.get(class) else { return Vec::new() };
        let mut out = Vec::new();
        for (category, required) in [("required", true), ("optional", false)] {
            let Some(inputs) = info.get("input").and_then(|i| i.get(category)).and_then(Value::as_object) else { continue };
            for (name, spec) in inputs {
                let mut spec = spec.clone();
                if let Some(combo) = model_combos().get(&(class.to_string(), name.clone())) {
                    let opts = model_options(combo, self.ctx.models);
                    match spec.get_mut(0) {
                        Some(Value::Array(list)) => *list = opts,
                        Some(Value::String(s)) if s == "COMBO" => {
                            if let Some(Value::Object(o)) = spec.get_mut(1) {
                                o.insert("options".into(), Value::Array(opts));
                            }
                        }
                        _ => {}
                    }
                }
                out.push((name.clone(), spec, required));
            }
        }
        out
    }

    fn validate_inputs(&mut self, id: &str) -> Result<(bool, Vec<Value>), PyError> {
        if let Some(r) = self.validated.get(id) {
            return Ok(r);
        }
        // A cycle recurses until Python's limit; so does a chain deeper than the limit.
        if self.stack.len() >= PY_RECURSION_DEPTH || self.stack.iter().any(|s| s == id) {
            return Err(PyError { kind: "RecursionError", message: "maximum recursion depth exceeded".into(), traceback: vec![TB_INNER_CALL.into()] });
        }
        let prompt = self.prompt;
        let node = prompt.get(id).ok_or_else(|| PyError { kind: "KeyError", message: py_repr(&Value::from(id)), traceback: vec![TB_KEY.into()] })?;
        let inputs = match node.get("inputs") {
            Some(Value::Object(m)) => m.clone(),
            Some(_) => Map::new(),
            None => return Err(PyError { kind: "KeyError", message: "'inputs'".into(), traceback: vec![TB_INPUTS.into()] }),
        };
        let class = node.get("class_type").and_then(Value::as_str).unwrap_or_default().to_string();
        self.stack.push(id.to_string());
        let result = self.validate_node(id, &class, &inputs);
        self.stack.pop();
        let ret = result?;
        self.validated.set(id, ret.clone());
        Ok(ret)
    }

    fn validate_node(&mut self, id: &str, class: &str, inputs: &Map<String, Value>) -> Result<(bool, Vec<Value>), PyError> {
        let mut errors: Vec<Value> = Vec::new();
        let mut valid = true;
        let custom_validated = matches!(class, "LoadImage" | "LoadImageMask");
        for (name, spec, required) in self.input_specs(class) {
            let input_type = spec.get(0).cloned().unwrap_or(Value::Null);
            let extra = spec.get(1).cloned().filter(Value::is_object).unwrap_or_else(|| json!({}));
            let info = json!([input_type.clone(), extra.clone()]);
            let Some(val) = inputs.get(&name) else {
                if required {
                    errors.push(error_obj("required_input_missing", "Required input is missing", &name, json!({"input_name": name})));
                }
                continue;
            };
            if let Value::Array(link) = val {
                if link.len() != 2 {
                    errors.push(error_obj(
                        "bad_linked_input",
                        "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                        &name,
                        json!({"input_name": name, "input_config": info, "received_value": val}),
                    ));
                    continue;
                }
                let o_id = match link[0].as_str().and_then(|s| self.prompt.get(s).map(|_| s.to_string())) {
                    Some(o) => o,
                    None => return Err(PyError { kind: "KeyError", message: py_repr(&link[0]), traceback: vec![TB_KEY.into()] }),
                };
                let o_class = self.prompt[&o_id].get("class_type").and_then(Value::as_str).unwrap_or_default();
                let outputs = self.ctx.catalogue.get(o_class).and_then(|i| i.get("output")).and_then(Value::as_array).cloned().unwrap_or_default();
                let index = match &link[1] {
                    Value::Number(n) if n.as_i64().is_some() => n.as_i64().unwrap_or(0),
                    other => {
                        return Err(PyError {
                            kind: "TypeError",
                            message: format!("tuple indices must be integers or slices, not {}", py_type_name(other)),
                            traceback: vec![TB_INDEX.into()],
                        });
                    }
                };
                let len = outputs.len() as i64;
                let resolved = if index < 0 { index + len } else { index };
                if resolved < 0 || resolved >= len {
                    return Err(PyError { kind: "IndexError", message: "tuple index out of range".into(), traceback: vec![TB_INDEX.into()] });
                }
                let received = outputs[resolved as usize].clone();
                if !types_compatible(&received, &input_type) {
                    let received_str = py_str(&received);
                    let input_str = py_str(&input_type);
                    errors.push(error_obj(
                        "return_type_mismatch",
                        "Return type mismatch between linked nodes",
                        &format!("{name}, received_type({received_str}) mismatch input_type({input_str})"),
                        json!({"input_name": name, "input_config": info, "received_type": received, "linked_node": val}),
                    ));
                    continue;
                }
                match self.validate_inputs(&o_id) {
                    Ok((true, _)) => {}
                    Ok((false, _)) => valid = false,
                    Err(ex) => {
                        valid = false;
                        let mut traceback = vec![TB_INNER_CALL.to_string()];
                        traceback.extend(ex.traceback.iter().cloned());
                        let reason = error_obj(
                            "exception_during_inner_validation",
                            "Exception when validating inner node",
                            &ex.message,
                            json!({
                                "input_name": name, "input_config": info, "exception_message": ex.message,
                                "exception_type": ex.kind, "traceback": traceback, "linked_node": val
                            }),
                        );
                        self.validated.set(&o_id, (false, vec![reason]));
                    }
                }
                continue;
            }

            let mut val = val.clone();
            if let Some(inner) = val.get("__value__") {
                val = inner.clone();
            }
            let type_name = input_type.as_str().unwrap_or_default();
            match convert(type_name, &val) {
                Ok(Some(converted)) => {
                    if converted != val {
                        self.conversions.push((id.to_string(), name.clone(), converted.clone()));
                    }
                    val = converted;
                }
                Ok(None) => {}
                Err(message) => {
                    errors.push(error_obj(
                        "invalid_input_type",
                        &format!("Failed to convert an input value to a {type_name} value"),
                        &format!("{name}, {}, {message}", py_str(&val)),
                        json!({"input_name": name, "input_config": info, "received_value": val, "exception_message": message}),
                    ));
                    continue;
                }
            }
            if custom_validated && name == "image" {
                let exists = val
                    .as_str()
                    .and_then(|s| annotated_path(s, self.ctx.input_dir, self.ctx.output_dir, self.ctx.temp_dir))
                    .is_some_and(|p| p.is_file());
                if !exists {
                    errors.push(error_obj(
                        "custom_validation_failed",
                        "Custom validation failed for node",
                        &format!("{name} - Invalid image file: {}", py_str(&val)),
                        json!({"input_name": name}),
                    ));
                }
                continue;
            }
            if let Some(v) = num(&val) {
                if let Some(min) = extra.get("min").and_then(num)
                    && cmp_num(&v, &min) == Some(std::cmp::Ordering::Less)
                {
                    errors.push(error_obj(
                        "value_smaller_than_min",
                        &format!("Value {} smaller than min of {}", py_str(&val), py_str(&extra["min"])),
                        &name,
                        json!({"input_name": name, "input_config": info, "received_value": val}),
                    ));
                    continue;
                }
                if let Some(max) = extra.get("max").and_then(num)
                    && cmp_num(&v, &max) == Some(std::cmp::Ordering::Greater)
                {
                    errors.push(error_obj(
                        "value_bigger_than_max",
                        &format!("Value {} bigger than max of {}", py_str(&val), py_str(&extra["max"])),
                        &name,
                        json!({"input_name": name, "input_config": info, "received_value": val}),
                    ));
                    continue;
                }
            }
            let options = match &input_type {
                Value::Array(list) => Some(list.clone()),
                Value::String(s) if s == "COMBO" => Some(extra.get("options").and_then(Value::as_array).cloned().unwrap_or_default()),
                _ => None,
            };
            if let Some(options) = options
                && !options.iter().any(|o| py_eq(o, &val))
            {
                let (list_info, input_config) = if options.len() > 20 {
                    (format!("(list of length {})", options.len()), Value::Null)
                } else {
                    (py_repr(&Value::Array(options.clone())), info.clone())
                };
                errors.push(error_obj(
                    "value_not_in_list",
                    "Value not in list",
                    &format!("{name}: {} not in {list_info}", py_repr(&val)),
                    json!({"input_name": name, "input_config": input_config, "received_value": val}),
                ));
                continue;
            }
        }
        Ok((valid && errors.is_empty(), errors))
    }
}

/// `id` and every node it links to, transitively.
fn upstream_of(graph: &Map<String, Value>, id: &str) -> HashSet<String> {
    let mut seen = HashSet::new();
    let mut todo = vec![id.to_string()];
    while let Some(n) = todo.pop() {
        if !seen.insert(n.clone()) {
            continue;
        }
        if let Some(inputs) = graph.get(&n).and_then(|n| n.get("inputs")).and_then(Value::as_object) {
            for v in inputs.values() {
                if let Some(src) = v.as_array().filter(|a| a.len() == 2).and_then(|a| a[0].as_str()) {
                    todo.push(src.to_string());
                }
            }
        }
    }
    seen
}

/// How many nested `validate_inputs` calls ComfyUI gets through before Python raises `RecursionError`:
/// its default limit of 1,000 frames, less the ~25 of the event loop, aiohttp and `post_prompt` under
/// the first call. A chain of links deeper than this fails validation in ComfyUI, and so here.
pub(crate) const PY_RECURSION_DEPTH: usize = 975;

/// Stack for one validation: [`PY_RECURSION_DEPTH`] nested frames of [`Validator::validate_inputs`]
/// need more than the 2 MiB of a runtime worker thread; the recursion is bounded by that limit, so
/// this bounds the stack whatever the graph (no request can overflow it and abort the process).
const VALIDATION_STACK_BYTES: usize = 64 << 20;

/// Validates a prompt as ComfyUI's `validate_prompt` does. On acceptance the returned graph carries the
/// coerced values (ComfyUI queues the mutated prompt). Err = ComfyUI would answer 500.
///
/// Runs on a thread of its own with a stack sized for ComfyUI's recursion limit (see
/// [`VALIDATION_STACK_BYTES`]).
pub(crate) fn validate_prompt(
    prompt: &Value,
    partial_targets: Option<&[String]>,
    ctx: &ValidationContext<'_>,
) -> Result<(PromptCheck, Value), InternalError> {
    std::thread::scope(|scope| {
        let worker = std::thread::Builder::new()
            .name("prompt-validation".into())
            .stack_size(VALIDATION_STACK_BYTES)
            .spawn_scoped(scope, || validate_prompt_here(prompt, partial_targets, ctx));
        match worker {
            Ok(handle) => handle.join().unwrap_or_else(|_| Err(InternalError("validation panicked".into()))),
            Err(e) => Err(InternalError(format!("no thread for validation: {e}"))),
        }
    })
}

fn validate_prompt_here(
    prompt: &Value,
    partial_targets: Option<&[String]>,
    ctx: &ValidationContext<'_>,
) -> Result<(PromptCheck, Value), InternalError> {
    let Value::Object(graph) = prompt else {
        return Err(InternalError(format!("prompt is a {}, not a dict", py_type_name(prompt))));
    };
    let mut outputs = Vec::new();
    for (id, node) in graph {
        let Value::Object(node) = node else {
            return Err(InternalError(format!("node {id} is a {}, not a dict", py_type_name(node))));
        };
        let Some(class) = node.get("class_type") else {
            let error = error_obj(
                "invalid_prompt",
                "Cannot execute because a node is missing the class_type property.",
                &format!("Node ID '#{id}'"),
                json!({}),
            );
            return Ok((PromptCheck::Rejected { error, node_errors: Map::new() }, prompt.clone()));
        };
        let class_name = py_str(class);
        let Some(info) = ctx.catalogue.get(&class_name) else {
            let error = error_obj(
                "invalid_prompt",
                &format!("Cannot execute because node {class_name} does not exist."),
                &format!("Node ID '#{id}'"),
                json!({}),
            );
            return Ok((PromptCheck::Rejected { error, node_errors: Map::new() }, prompt.clone()));
        };
        if info.get("output_node").and_then(Value::as_bool) == Some(true) && partial_targets.is_none_or(|t| t.iter().any(|x| x == id)) {
            outputs.push(id.clone());
        }
    }
    if outputs.is_empty() {
        let error = error_obj("prompt_no_outputs", "Prompt has no outputs", "", json!({}));
        return Ok((PromptCheck::Rejected { error, node_errors: Map::new() }, prompt.clone()));
    }

    let mut v = Validator { prompt: graph, ctx, validated: Validated::default(), conversions: Vec::new(), stack: Vec::new() };
    let mut good = Vec::new();
    let mut failed: Vec<(String, Vec<Value>)> = Vec::new();
    let mut node_errors = Map::new();
    for o in &outputs {
        let (valid, reasons) = match v.validate_inputs(o) {
            Ok(r) => r,
            Err(ex) => {
                let mut traceback = vec![TB_PROMPT.to_string()];
                traceback.extend(ex.traceback.iter().cloned());
                let reasons = vec![error_obj(
                    "exception_during_validation",
                    "Exception when validating node",
                    &ex.message,
                    json!({"exception_type": ex.kind, "traceback": traceback}),
                )];
                v.validated.set(o, (false, reasons.clone()));
                (false, reasons)
            }
        };
        if valid {
            good.push(o.clone());
            continue;
        }
        failed.push((o.clone(), reasons));
        // ComfyUI appends `o` to every failing node validated so far, which makes the answer depend on
        // Python's set order; the captures agree with "the failing nodes `o` depends on", used here.
        let upstream = upstream_of(graph, o);
        for node_id in v.validated.order.clone() {
            let Some((ok, reasons)) = v.validated.get(&node_id) else { continue };
            if ok || reasons.is_empty() || !upstream.contains(&node_id) {
                continue;
            }
            let entry = node_errors.entry(node_id.clone()).or_insert_with(|| {
                let class = graph.get(&node_id).and_then(|n| n.get("class_type")).cloned().unwrap_or(Value::Null);
                json!({"errors": reasons, "dependent_outputs": [], "class_type": class})
            });
            if let Some(deps) = entry.get_mut("dependent_outputs").and_then(Value::as_array_mut) {
                deps.push(Value::from(o.as_str()));
            }
        }
    }

    let mut coerced = prompt.clone();
    for (node, input, value) in &v.conversions {
        if let Some(slot) = coerced.get_mut(node).and_then(|n| n.get_mut("inputs")).and_then(|i| i.get_mut(input)) {
            *slot = value.clone();
        }
    }
    if good.is_empty() {
        let details: Vec<String> = failed
            .iter()
            .flat_map(|(_, reasons)| reasons.iter().map(|r| format!("{}: {}", py_str(&r["message"]), py_str(&r["details"]))))
            .collect();
        let error = error_obj("prompt_outputs_failed_validation", "Prompt outputs failed validation", &details.join("\n"), json!({}));
        return Ok((PromptCheck::Rejected { error, node_errors }, coerced));
    }
    Ok((PromptCheck::Accepted { outputs: good, node_errors }, coerced))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dirs {
        input: tempfile::TempDir,
        models: ModelPaths,
    }

    fn dirs() -> Dirs {
        Dirs { input: tempfile::tempdir().unwrap(), models: ModelPaths::default() }
    }

    fn check(d: &Dirs, prompt: Value) -> (PromptCheck, Value) {
        let ctx = ValidationContext { catalogue: crate::catalogue::catalogue(false), models: &d.models, input_dir: d.input.path(), output_dir: d.input.path(), temp_dir: d.input.path() };
        validate_prompt(&prompt, None, &ctx).unwrap()
    }

    fn scale(width: Value, method: &str) -> Value {
        json!({
            "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 48, "batch_size": 1, "color": 0}},
            "2": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": method, "width": width, "height": 24, "crop": "disabled"}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}}
        })
    }

    #[test]
    fn float_for_int_is_truncated_and_accepted() {
        let d = dirs();
        let (check, coerced) = check(&d, scale(json!(32.7), "nearest-exact"));
        assert!(matches!(check, PromptCheck::Accepted { ref node_errors, .. } if node_errors.is_empty()), "{check:?}");
        assert_eq!(coerced["2"]["inputs"]["width"], json!(32));
    }

    #[test]
    fn numeric_string_for_int_is_accepted_but_words_are_not() {
        let d = dirs();
        assert!(matches!(check(&d, scale(json!("40"), "nearest-exact")).0, PromptCheck::Accepted { .. }));
        let (PromptCheck::Rejected { node_errors, .. }, _) = check(&d, scale(json!("abc"), "nearest-exact")) else { panic!() };
        assert_eq!(node_errors["2"]["errors"][0]["details"], "width, abc, invalid literal for int() with base 10: 'abc'");
    }

    #[test]
    fn bounds_are_inclusive() {
        let d = dirs();
        assert!(matches!(check(&d, scale(json!(16384), "nearest-exact")).0, PromptCheck::Accepted { .. }));
        let (PromptCheck::Rejected { node_errors, .. }, _) = check(&d, scale(json!(16385), "nearest-exact")) else { panic!() };
        assert_eq!(node_errors["2"]["errors"][0]["message"], "Value 16385 bigger than max of 16384");
    }

    #[test]
    fn combo_message_lists_the_options_in_python_repr() {
        let d = dirs();
        let (PromptCheck::Rejected { node_errors, .. }, _) = check(&d, scale(json!(8), "it's")) else { panic!() };
        assert_eq!(
            node_errors["2"]["errors"][0]["details"],
            "upscale_method: \"it's\" not in ['nearest-exact', 'bilinear', 'area', 'bicubic', 'lanczos']"
        );
    }

    #[test]
    fn link_from_an_output_node_directly_is_an_exception_during_validation() {
        let d = dirs();
        let prompt = json!({
            "3": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "x"}}
        });
        let (PromptCheck::Rejected { error, node_errors }, _) = check(&d, prompt) else { panic!() };
        assert_eq!(error["details"], "Exception when validating node: '9'");
        assert_eq!(node_errors["3"]["errors"][0]["type"], "exception_during_validation");
        assert_eq!(node_errors["3"]["errors"][0]["extra_info"]["exception_type"], "KeyError");
    }

    #[test]
    fn a_cycle_does_not_overflow() {
        let d = dirs();
        let prompt = json!({
            "1": {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}},
            "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}}
        });
        assert!(matches!(check(&d, prompt).0, PromptCheck::Rejected { .. }));
    }

    fn chain(n: usize) -> Value {
        let mut g = Map::new();
        g.insert("0".into(), json!({"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}}));
        for i in 1..n {
            g.insert(i.to_string(), json!({"class_type": "ImageInvert", "inputs": {"image": [(i - 1).to_string(), 0]}}));
        }
        g.insert("save".into(), json!({"class_type": "SaveImage", "inputs": {"images": [(n - 1).to_string(), 0], "filename_prefix": "x"}}));
        Value::Object(g)
    }

    #[test]
    fn a_chain_within_pythons_recursion_limit_is_accepted() {
        let d = dirs();
        assert!(matches!(check(&d, chain(PY_RECURSION_DEPTH - 1)).0, PromptCheck::Accepted { .. }));
    }

    #[test]
    fn a_thousand_node_chain_fails_like_python_without_overflowing() {
        let d = dirs();
        let PromptCheck::Rejected { node_errors, .. } = check(&d, chain(1_000)).0 else { panic!("accepted") };
        let reasons = node_errors.values().flat_map(|n| n["errors"].as_array().cloned().unwrap_or_default()).collect::<Vec<_>>();
        assert!(reasons.iter().any(|r| r["extra_info"]["exception_type"] == "RecursionError"), "{node_errors:?}");
    }

    #[test]
    fn a_hundred_thousand_node_chain_does_not_abort() {
        let d = dirs();
        assert!(matches!(check(&d, chain(100_000)).0, PromptCheck::Rejected { .. }));
    }

    #[test]
    fn load_image_validates_by_existence_with_annotations() {
        let d = dirs();
        std::fs::create_dir_all(d.input.path().join("faces")).unwrap();
        std::fs::write(d.input.path().join("faces/face.png"), b"png").unwrap();
        for (value, ok) in [("faces/face.png", true), ("faces/face.png [input]", true), ("face.png", false), ("../x.png", false)] {
            let prompt = json!({
                "1": {"class_type": "LoadImage", "inputs": {"image": value}},
                "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}
            });
            assert_eq!(matches!(check(&d, prompt).0, PromptCheck::Accepted { .. }), ok, "{value}");
        }
    }

    #[test]
    fn v3_combo_shape_is_checked_against_the_models_folder() {
        let mut d = dirs();
        let models = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(models.path().join("upscale_models")).unwrap();
        std::fs::write(models.path().join("upscale_models/4x.pth"), b"").unwrap();
        d.models = ModelPaths::new(Some(models.path()), None).unwrap();
        let prompt = |name: &str| {
            json!({
                "1": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": name}},
                "2": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
                "3": {"class_type": "ImageUpscaleWithModel", "inputs": {"upscale_model": ["1", 0], "image": ["2", 0]}},
                "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "x"}}
            })
        };
        assert!(matches!(check(&d, prompt("4x.pth")).0, PromptCheck::Accepted { .. }));
        let (PromptCheck::Rejected { node_errors, .. }, _) = check(&d, prompt("2x.pth")) else { panic!() };
        let err = &node_errors["1"]["errors"][0];
        assert_eq!(err["type"], "value_not_in_list");
        assert_eq!(err["details"], "model_name: '2x.pth' not in ['4x.pth']");
        assert_eq!(err["extra_info"]["input_config"], json!(["COMBO", {"multiselect": false, "options": ["4x.pth"]}]));
        assert_eq!(node_errors["1"]["dependent_outputs"], json!(["4"]));
    }

    #[test]
    fn long_combo_lists_are_summarised() {
        let d = dirs();
        let prompt = json!({
            "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "x"}},
            "3": {"class_type": "KSampler", "inputs": {"model": ["2", 0], "seed": 1, "steps": 1, "cfg": 1.0, "sampler_name": "no-such-sampler",
                  "scheduler": "simple", "positive": ["4", 0], "negative": ["4", 0], "latent_image": ["1", 0], "denoise": 1.0}},
            "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["2", 1]}},
            "5": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["2", 2]}},
            "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "x"}}
        });
        let (PromptCheck::Rejected { node_errors, .. }, _) = check(&d, prompt) else { panic!() };
        let err = &node_errors["3"]["errors"][0];
        assert!(err["details"].as_str().unwrap().starts_with("sampler_name: 'no-such-sampler' not in (list of length "), "{err}");
        assert!(err["extra_info"]["input_config"].is_null());
        assert_eq!(node_errors["2"]["errors"][0]["details"], "ckpt_name: 'x' not in []");
    }

    #[test]
    fn python_reprs() {
        assert_eq!(py_str(&json!(100.0)), "100.0");
        assert_eq!(py_str(&json!(0.01)), "0.01");
        assert_eq!(py_repr(&json!(["a", 1, null, true])), "['a', 1, None, True]");
        assert!(types_compatible(&json!("IMAGE,MASK"), &json!("MASK")));
        assert!(!types_compatible(&json!("LATENT"), &json!("IMAGE")));
    }
}
