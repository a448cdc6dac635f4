//! The node catalogue: the real `object_info.json` of ComfyUI 0.3.64, with model-file combos and
//! LoadImage's list replaced by what is actually on disk (as ComfyUI builds them at request time).
//! The identity node packs are the pinned ones (`identity-nodes.object_info.json`, captured from a
//! real ComfyUI 0.3.64 with `cubiq/ComfyUI_InstantID` and `lldacing/ComfyUI_PuLID_Flux_ll` at the
//! commits in `deploy/identity.lock.json`): their classes replace the same-named ones of the first
//! capture (which had `balazik/ComfyUI-PuLID-Flux`).
//!
//! Must never: accept a model-file value that is not in the double's own folders, or change any
//! other part of the captured catalogue.

use std::collections::HashMap;
use std::path::Path;
use std::sync::OnceLock;

use serde_json::{Map, Value};

use crate::models::ModelPaths;

const OBJECT_INFO: &str = include_str!("../fixtures/object_info.json");
/// The classes of the pinned identity node packs, as a real ComfyUI 0.3.64 served them.
const IDENTITY_NODES: &str = include_str!("../fixtures/identity-nodes.object_info.json");
/// `GET /object_info/FlowhostImageOutput` of a real ComfyUI 0.3.64 with flowhost's node loaded.
const FLOWHOST_NODE: &str = include_str!("../fixtures/flowhost-image-output.object_info.json");

/// The real `GET /object_info` answer of ComfyUI 0.3.64 with the pinned custom nodes: the first
/// capture with the identity packs' classes as captured from the pinned commits.
pub fn object_info_fixture() -> &'static str {
    static TEXT: OnceLock<String> = OnceLock::new();
    TEXT.get_or_init(|| Value::Object(base().clone()).to_string())
}

/// The captured catalogue with the pinned identity packs, parsed once.
pub(crate) fn base() -> &'static Map<String, Value> {
    static BASE: OnceLock<Map<String, Value>> = OnceLock::new();
    BASE.get_or_init(|| match serde_json::from_str::<Value>(OBJECT_INFO) {
        Ok(Value::Object(mut map)) => {
            if let Ok(Value::Object(identity)) = serde_json::from_str::<Value>(IDENTITY_NODES) {
                map.extend(identity);
            }
            map
        }
        // The fixture is compiled in and covered by tests; an empty catalogue makes every prompt invalid.
        _ => Map::new(),
    })
}

/// The catalogue of a ComfyUI with (`flowhost_nodes`) or without flowhost's custom node.
pub(crate) fn catalogue(flowhost_nodes: bool) -> &'static Map<String, Value> {
    static WITH: OnceLock<Map<String, Value>> = OnceLock::new();
    if !flowhost_nodes {
        return base();
    }
    WITH.get_or_init(|| {
        let mut all = base().clone();
        if let Ok(Value::Object(extra)) = serde_json::from_str::<Value>(FLOWHOST_NODE) {
            all.extend(extra);
        }
        all
    })
}

/// Folder listings present when object_info was captured (fixtures/models.json); used to recognise which
/// combo inputs are model-file lists.
const CAPTURED_LISTINGS: &[(&str, &[&str])] = &[
    ("checkpoints", &["flux1-dev-fp8.safetensors", "garbage.safetensors"]),
    ("loras", &["character-123.safetensors"]),
    ("vae", &["ae.safetensors"]),
    ("text_encoders", &["clip_l.safetensors", "t5xxl_fp16.safetensors"]),
    ("diffusion_models", &["flux1-dev.safetensors"]),
    ("controlnet", &["instantid/diffusion_pytorch_model.safetensors"]),
    ("instantid", &["ip-adapter.bin"]),
    ("pulid", &["pulid_flux_v0.9.1.safetensors"]),
];

/// Model-file combos whose folder was empty at capture time (so they cannot be recognised by content).
const EMPTY_FOLDER_COMBOS: &[(&str, &str, &str)] = &[
    ("StyleModelLoader", "style_model_name", "style_models"),
    ("CLIPVisionLoader", "clip_name", "clip_vision"),
    ("GLIGENLoader", "gligen_name", "gligen"),
    ("HypernetworkLoader", "hypernetwork_name", "hypernetworks"),
    ("UpscaleModelLoader", "model_name", "upscale_models"),
    ("PhotoMakerLoader", "photomaker_model_name", "photomaker"),
    ("ModelPatchLoader", "name", "model_patches"),
    ("AudioEncoderLoader", "audio_encoder_name", "audio_encoders"),
];

/// A combo input whose options are the files of a model folder (plus fixed extras such as `pixel_space`).
#[derive(Clone, Debug)]
pub(crate) struct ModelCombo {
    pub folder: &'static str,
    /// Non-file options kept after the file list (e.g. VAELoader's `pixel_space`).
    pub extras: Vec<Value>,
}

fn combo_options(spec: &Value) -> Option<&Vec<Value>> {
    let t = spec.get(0)?;
    match t {
        Value::Array(opts) => Some(opts),
        Value::String(s) if s == "COMBO" => spec.get(1)?.get("options")?.as_array(),
        _ => None,
    }
}

/// (class, input) → folder, recognised once from the captured catalogue.
pub(crate) fn model_combos() -> &'static HashMap<(String, String), ModelCombo> {
    static MAP: OnceLock<HashMap<(String, String), ModelCombo>> = OnceLock::new();
    MAP.get_or_init(|| {
        let mut map = HashMap::new();
        for (class, info) in base() {
            for category in ["required", "optional"] {
                let Some(inputs) = info.get("input").and_then(|i| i.get(category)).and_then(Value::as_object) else { continue };
                for (name, spec) in inputs {
                    let Some(opts) = combo_options(spec) else { continue };
                    for (folder, listing) in CAPTURED_LISTINGS {
                        let all_present = listing.iter().all(|f| opts.iter().any(|o| o.as_str() == Some(f)));
                        if !all_present {
                            continue;
                        }
                        let extras: Vec<Value> =
                            opts.iter().filter(|o| !o.as_str().is_some_and(|s| listing.contains(&s))).cloned().collect();
                        let extras_are_files = extras.iter().any(|e| e.as_str().is_some_and(|s| s.ends_with(".safetensors")));
                        if !extras_are_files {
                            map.insert((class.clone(), name.clone()), ModelCombo { folder, extras });
                        }
                    }
                }
            }
            for (c, input, folder) in EMPTY_FOLDER_COMBOS {
                if class == c {
                    map.insert((class.clone(), input.to_string()), ModelCombo { folder, extras: Vec::new() });
                }
            }
        }
        map
    })
}

const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "webp", "gif", "bmp", "tif", "tiff"];

/// LoadImage's combo: the image files at the top level of the input dir, sorted (ComfyUI behaviour).
pub(crate) fn input_images(input_dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(input_dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.path().is_file())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.rsplit_once('.').is_some_and(|(_, ext)| IMAGE_EXTENSIONS.contains(&ext.to_ascii_lowercase().as_str())))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// The live option list of a model combo.
pub(crate) fn model_options(combo: &ModelCombo, models: &ModelPaths) -> Vec<Value> {
    let mut opts: Vec<Value> = models.list(combo.folder).into_iter().map(Value::String).collect();
    opts.extend(combo.extras.iter().cloned());
    opts
}

/// Replaces the option list of an input spec (both combo shapes) with `options`.
fn set_options(spec: &mut Value, options: Vec<Value>) {
    match spec.get_mut(0) {
        Some(Value::Array(list)) => *list = options,
        Some(Value::String(s)) if s == "COMBO" => {
            if let Some(Value::Object(o)) = spec.get_mut(1) {
                o.insert("options".to_string(), Value::Array(options));
            }
        }
        _ => {}
    }
}

/// The NodeInfo of `class` as ComfyUI would serve it right now (live model/input lists).
pub(crate) fn live_node(class: &str, flowhost_nodes: bool, models: &ModelPaths, input_dir: &Path) -> Option<Value> {
    let mut node = catalogue(flowhost_nodes).get(class)?.clone();
    patch_node(class, &mut node, models, input_dir);
    Some(node)
}

fn patch_node(class: &str, node: &mut Value, models: &ModelPaths, input_dir: &Path) {
    for category in ["required", "optional"] {
        let Some(inputs) = node.get_mut("input").and_then(|i| i.get_mut(category)).and_then(Value::as_object_mut) else { continue };
        for (name, spec) in inputs.iter_mut() {
            if let Some(combo) = model_combos().get(&(class.to_string(), name.clone())) {
                set_options(spec, model_options(combo, models));
            } else if class == "LoadImage" && name == "image" {
                set_options(spec, input_images(input_dir).into_iter().map(Value::String).collect());
            }
        }
    }
}

/// The whole live catalogue (`GET /object_info`).
pub(crate) fn live_catalogue(flowhost_nodes: bool, models: &ModelPaths, input_dir: &Path) -> Map<String, Value> {
    let mut all = catalogue(flowhost_nodes).clone();
    for (class, node) in all.iter_mut() {
        patch_node(class, node, models, input_dir);
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loaders_of_the_flux_graphs_are_model_combos() {
        let combos = model_combos();
        for (class, input, folder) in [
            ("CheckpointLoaderSimple", "ckpt_name", "checkpoints"),
            ("UNETLoader", "unet_name", "diffusion_models"),
            ("DualCLIPLoader", "clip_name1", "text_encoders"),
            ("DualCLIPLoader", "clip_name2", "text_encoders"),
            ("CLIPLoader", "clip_name", "text_encoders"),
            ("VAELoader", "vae_name", "vae"),
            ("LoraLoader", "lora_name", "loras"),
            ("LoraLoaderModelOnly", "lora_name", "loras"),
            ("ControlNetLoader", "control_net_name", "controlnet"),
            ("InstantIDModelLoader", "instantid_file", "instantid"),
            ("PulidFluxModelLoader", "pulid_file", "pulid"),
            ("TripleCLIPLoader", "clip_name3", "text_encoders"),
            ("UpscaleModelLoader", "model_name", "upscale_models"),
        ] {
            let got = combos.get(&(class.to_string(), input.to_string())).map(|c| c.folder);
            assert_eq!(got, Some(folder), "{class}.{input}");
        }
        assert_eq!(combos[&("VAELoader".to_string(), "vae_name".to_string())].extras, vec![Value::from("pixel_space")]);
        assert!(!combos.contains_key(&("ImageScale".to_string(), "upscale_method".to_string())));
    }

    #[test]
    fn live_node_lists_the_files_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let input = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("vae")).unwrap();
        std::fs::write(dir.path().join("vae/mine.safetensors"), b"").unwrap();
        std::fs::write(input.path().join("b.png"), b"x").unwrap();
        std::fs::write(input.path().join("a.jpg"), b"x").unwrap();
        std::fs::write(input.path().join("notes.txt"), b"x").unwrap();
        let models = ModelPaths::new(Some(dir.path()), None).unwrap();
        let vae = live_node("VAELoader", false, &models, input.path()).unwrap();
        assert_eq!(vae["input"]["required"]["vae_name"][0], serde_json::json!(["mine.safetensors", "pixel_space"]));
        let load = live_node("LoadImage", false, &models, input.path()).unwrap();
        assert_eq!(load["input"]["required"]["image"][0], serde_json::json!(["a.jpg", "b.png"]));
    }

    #[test]
    fn flowhosts_node_is_listed_only_where_it_is_installed() {
        let (models, input) = (ModelPaths::new(None, None).unwrap(), tempfile::tempdir().unwrap());
        assert!(live_node("FlowhostImageOutput", false, &models, input.path()).is_none());
        let node = live_node("FlowhostImageOutput", true, &models, input.path()).unwrap();
        assert_eq!(node["output_node"], true);
        assert_eq!(node["input"]["required"]["images"][0], "IMAGE");
        assert!(live_catalogue(true, &models, input.path()).contains_key("SaveImage"), "the stock nodes stay");
    }
}
