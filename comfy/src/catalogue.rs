//! The node catalogue: what ComfyUI's `/object_info` says exists (classes, their inputs with types,
//! bounds and combo choices, their outputs, which are output nodes). Immutable once built; a refresh
//! builds a new one. Graph checking lives in `preflight.rs`; this module never talks to the network.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{Context, bail};
use serde_json::{Map, Value};

/// What kind of value an input takes.
#[derive(Debug, Clone, PartialEq)]
pub enum InputKind {
    Int {
        min: Option<Value>,
        max: Option<Value>,
    },
    Float {
        min: Option<Value>,
        max: Option<Value>,
    },
    String,
    Boolean,
    /// A choice. `options: None` = ComfyUI gives no list (accept anything); `free_value` = the node validates
    /// the value itself (uploads: LoadImage accepts `subfolder/name` that is not in the top-level list).
    Combo {
        options: Option<Vec<Value>>,
        free_value: bool,
    },
    /// A data type carried by links (`IMAGE`, `MODEL`, `*`, `IMAGE,MASK`, …).
    Data(String),
}

impl InputKind {
    /// The type name a link into this input must carry.
    pub fn link_type(&self) -> &str {
        match self {
            InputKind::Int { .. } => "INT",
            InputKind::Float { .. } => "FLOAT",
            InputKind::String => "STRING",
            InputKind::Boolean => "BOOLEAN",
            InputKind::Combo { .. } => "COMBO",
            InputKind::Data(t) => t,
        }
    }
}

/// One declared input of a node class.
#[derive(Debug, Clone, PartialEq)]
pub struct InputSpec {
    pub name: String,
    pub required: bool,
    pub kind: InputKind,
    /// The value names a file ComfyUI loads from its input folder (the node declares an
    /// `*_upload` widget and no `remote` source: `LoadImage.image`, `LoadImageMask.image`,
    /// `LoadAudio.audio`, `LoadVideo.file`, `Load3D.model_file`, …). `LoadImageOutput`
    /// declares `remote` (it reads the output folder) and is not one.
    pub input_file: bool,
}

/// One node class.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassInfo {
    pub name: String,
    /// Required inputs first, then optional; hidden inputs are not listed (ComfyUI fills them).
    pub inputs: Vec<InputSpec>,
    /// Output types by index (combo outputs are reported as `COMBO`).
    pub outputs: Vec<String>,
    pub output_node: bool,
}

impl ClassInfo {
    pub fn input(&self, name: &str) -> Option<&InputSpec> {
        self.inputs.iter().find(|i| i.name == name)
    }

    fn from_node_info(name: &str, info: &Value) -> anyhow::Result<ClassInfo> {
        let obj = info
            .as_object()
            .with_context(|| format!("object_info[{name}] is not an object"))?;
        let mut inputs = Vec::new();
        if let Some(input) = obj.get("input").and_then(Value::as_object) {
            for (section, required) in [("required", true), ("optional", false)] {
                let Some(spec_map) = input.get(section).and_then(Value::as_object) else {
                    continue;
                };
                for (input_name, spec) in spec_map {
                    inputs.push(InputSpec {
                        name: input_name.clone(),
                        required,
                        kind: parse_input_kind(spec),
                        input_file: is_input_file(spec),
                    });
                }
            }
        }
        let outputs = obj
            .get("output")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .map(|t| match t {
                        Value::String(s) => s.clone(),
                        Value::Array(_) => "COMBO".to_string(),
                        other => other.to_string(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let output_node = obj
            .get("output_node")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        Ok(ClassInfo {
            name: name.to_string(),
            inputs,
            outputs,
            output_node,
        })
    }
}

/// Whether an input spec (`[type, {options}]`) is a file in ComfyUI's input folder.
fn is_input_file(spec: &Value) -> bool {
    let Some(opts) = spec.as_array().and_then(|a| a.get(1)).and_then(Value::as_object) else {
        return false;
    };
    let upload = opts
        .iter()
        .any(|(k, v)| k.ends_with("_upload") && v.as_bool() == Some(true));
    upload && !opts.contains_key("remote")
}

/// A plain string in an input-folder input ([`InputSpec::input_file`]) of some node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileInput {
    pub node_id: String,
    pub class_type: String,
    pub input: String,
    pub value: String,
    /// Whether ComfyUI lists the file now: `Some(true)` listed, `Some(false)` absent from
    /// the list, `None` not knowable here (no list, or a `sub/dir` or `name [annotated]`
    /// value, which ComfyUI resolves on its own disk).
    pub listed: Option<bool>,
}

fn parse_input_kind(spec: &Value) -> InputKind {
    let (head, opts) = match spec {
        Value::Array(a) => (
            a.first().cloned().unwrap_or(Value::Null),
            a.get(1).and_then(Value::as_object).cloned(),
        ),
        other => (other.clone(), None),
    };
    let opts = opts.unwrap_or_default();
    let free_value = opts
        .iter()
        .any(|(k, v)| k.ends_with("_upload") && v.as_bool() == Some(true));
    let bound = |k: &str| opts.get(k).filter(|v| v.is_number()).cloned();
    match head {
        Value::Array(options) => InputKind::Combo {
            options: Some(options),
            free_value,
        },
        Value::String(t) => match t.as_str() {
            "INT" => InputKind::Int {
                min: bound("min"),
                max: bound("max"),
            },
            "FLOAT" => InputKind::Float {
                min: bound("min"),
                max: bound("max"),
            },
            "STRING" => InputKind::String,
            "BOOLEAN" => InputKind::Boolean,
            "COMBO" => InputKind::Combo {
                options: opts.get("options").and_then(Value::as_array).cloned(),
                free_value,
            },
            _ => InputKind::Data(t),
        },
        _ => InputKind::Data("*".into()),
    }
}

impl Catalogue {
    /// Every plain string value of an input-folder input in `graph` (links, objects and
    /// unknown classes are skipped): what a file-name reference or a missing upload is.
    pub fn file_inputs(&self, graph: &Map<String, Value>) -> Vec<FileInput> {
        let mut found = Vec::new();
        for (node_id, node) in graph {
            let Some(class) = node
                .get("class_type")
                .and_then(Value::as_str)
                .and_then(|c| self.class(c))
            else {
                continue;
            };
            let Some(inputs) = node.get("inputs").and_then(Value::as_object) else {
                continue;
            };
            for spec in class.inputs.iter().filter(|s| s.input_file) {
                let Some(Value::String(value)) = inputs.get(&spec.name) else {
                    continue;
                };
                let annotated = value.contains(['/', '\\']) || value.ends_with(']');
                let listed = match &spec.kind {
                    _ if annotated => None,
                    InputKind::Combo {
                        options: Some(options),
                        ..
                    } => Some(options.iter().any(|o| o.as_str() == Some(value.as_str()))),
                    _ => None,
                };
                found.push(FileInput {
                    node_id: node_id.clone(),
                    class_type: class.name.clone(),
                    input: spec.name.clone(),
                    value: value.clone(),
                    listed,
                });
            }
        }
        found
    }
}

/// All node classes ComfyUI knows, as of one `/object_info` answer.
#[derive(Debug, Clone, Default)]
pub struct Catalogue {
    classes: HashMap<String, Arc<ClassInfo>>,
}

impl Catalogue {
    /// Parse a full `GET /object_info` answer.
    pub fn from_object_info(json: &str) -> anyhow::Result<Catalogue> {
        let value: Value = serde_json::from_str(json).context("object_info is not JSON")?;
        Self::from_object_info_value(&value)
    }

    /// Parse an already-decoded `GET /object_info` answer.
    pub fn from_object_info_value(value: &Value) -> anyhow::Result<Catalogue> {
        let Some(map) = value.as_object() else {
            bail!("object_info is not a JSON object")
        };
        let mut classes = HashMap::with_capacity(map.len());
        for (name, info) in map {
            classes.insert(
                name.clone(),
                Arc::new(ClassInfo::from_node_info(name, info)?),
            );
        }
        Ok(Catalogue { classes })
    }

    /// A copy with the classes in `object_info_subset` (a `GET /object_info/{class}` answer) replaced.
    pub fn with_classes(
        &self,
        object_info_subset: &Map<String, Value>,
    ) -> anyhow::Result<Catalogue> {
        let mut next = self.clone();
        for (name, info) in object_info_subset {
            next.classes.insert(
                name.clone(),
                Arc::new(ClassInfo::from_node_info(name, info)?),
            );
        }
        Ok(next)
    }

    pub fn has_class(&self, class: &str) -> bool {
        self.classes.contains_key(class)
    }

    pub fn class(&self, class: &str) -> Option<&ClassInfo> {
        self.classes.get(class).map(|c| c.as_ref())
    }

    /// Number of known classes.
    pub fn len(&self) -> usize {
        self.classes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.classes.is_empty()
    }

    /// The choices of a combo input (e.g. the LoRA file names of `LoraLoaderModelOnly.lora_name`).
    pub fn combo_options(&self, class: &str, input: &str) -> Option<&[Value]> {
        match &self.class(class)?.input(input)?.kind {
            InputKind::Combo {
                options: Some(o), ..
            } => Some(o),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn real() -> Catalogue {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../comfyui-double/fixtures/object_info.json"
        );
        Catalogue::from_object_info(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    #[test]
    fn input_folder_inputs_are_the_upload_widgets_without_a_remote_source() {
        let c = real();
        let graph = serde_json::json!({
            "1": {"class_type": "LoadImage", "inputs": {"image": "portrait.png"}},
            "2": {"class_type": "LoadImageMask", "inputs": {"image": "example.png", "channel": "alpha"}},
            "3": {"class_type": "LoadAudio", "inputs": {"audio": "voice.wav"}},
            "4": {"class_type": "LoadImageOutput", "inputs": {"image": "out.png [output]"}},
            "5": {"class_type": "LoadImage", "inputs": {"image": "sub/x.png"}},
            "6": {"class_type": "LoadImage", "inputs": {"image": ["9", 0]}},
            "7": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "x.safetensors"}}
        });
        let found = c.file_inputs(graph.as_object().unwrap());
        let seen: Vec<(&str, &str, Option<bool>)> = found
            .iter()
            .map(|f| (f.node_id.as_str(), f.input.as_str(), f.listed))
            .collect();
        assert_eq!(
            seen,
            vec![
                ("1", "image", Some(false)),
                ("2", "image", Some(true)),
                ("3", "audio", Some(false)),
                ("5", "image", None),
            ]
        );
    }

    #[test]
    fn real_object_info_parses_with_both_combo_shapes() {
        let c = real();
        assert_eq!(c.len(), 507);
        assert!(c.has_class("SaveImageWebsocket") && c.has_class("ApplyPulidFlux"));
        assert_eq!(
            c.combo_options("LoraLoaderModelOnly", "lora_name").unwrap(),
            &[Value::from("character-123.safetensors")]
        );
        let load_output = c.class("LoadImageOutput").unwrap().input("image").unwrap();
        assert!(matches!(
            load_output.kind,
            InputKind::Combo { options: None, .. }
        ));
        assert!(c.class("SaveImage").unwrap().output_node);
        assert_eq!(
            c.class("CheckpointLoaderSimple").unwrap().outputs,
            vec!["MODEL", "CLIP", "VAE"]
        );
    }

    #[test]
    fn refresh_replaces_one_class() {
        let c = real();
        let mut info = serde_json::from_str::<Value>(
            &std::fs::read_to_string(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../comfyui-double/fixtures/object_info.json"
            ))
            .unwrap(),
        )
        .unwrap()["LoraLoaderModelOnly"]
            .clone();
        info["input"]["required"]["lora_name"][0] =
            serde_json::json!(["a.safetensors", "b.safetensors"]);
        let mut subset = Map::new();
        subset.insert("LoraLoaderModelOnly".into(), info);
        let next = c.with_classes(&subset).unwrap();
        assert_eq!(
            next.combo_options("LoraLoaderModelOnly", "lora_name")
                .unwrap()
                .len(),
            2
        );
        assert_eq!(
            c.combo_options("LoraLoaderModelOnly", "lora_name")
                .unwrap()
                .len(),
            1
        );
    }
}
