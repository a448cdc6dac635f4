//! The raster output transport: finished images as raw pixels over the websocket instead of
//! PNG files. `SaveImage` costs every image a zlib pass inside ComfyUI (≈ 200 ms at 1024² on an
//! H200 host), a disk write, a `/view` fetch and a PNG decode here before the JPEG the caller
//! wants can be encoded. `FlowhostImageOutput` (the Python node in `comfy/comfyui_nodes/`, shipped
//! inside this crate) sends the 8-bit pixels `SaveImage` would have written, and nothing else.
//!
//! This module only rewrites graphs and installs the node; the run loop collects the frames and
//! falls back to the original graph when one was lost (see `run.rs`). Must never: change a graph
//! whose ComfyUI lacks the node, or touch any node other than `SaveImage`.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

/// The node's class name in ComfyUI.
pub const RASTER_NODE: &str = "FlowhostImageOutput";

/// The node's source, written into the folder a supervised ComfyUI loads custom nodes from.
pub const NODE_SOURCE: &str = include_str!("../comfyui_nodes/flowhost/__init__.py");

/// `graph` with every `SaveImage` replaced by [`RASTER_NODE`] (same id, same `images` link and
/// `filename_prefix`); None when it has no `SaveImage` (nothing to gain).
pub fn with_raster_outputs(graph: &Value) -> Option<Value> {
    let nodes = graph.as_object()?;
    let mut changed = false;
    let mut out = Map::with_capacity(nodes.len());
    for (id, node) in nodes {
        if node.get("class_type").and_then(Value::as_str) != Some("SaveImage") {
            out.insert(id.clone(), node.clone());
            continue;
        }
        let mut inputs = Map::new();
        if let Some(given) = node.get("inputs").and_then(Value::as_object) {
            for key in ["images", "filename_prefix"] {
                if let Some(v) = given.get(key) {
                    inputs.insert(key.to_string(), v.clone());
                }
            }
        }
        let mut replaced = Map::new();
        replaced.insert("class_type".into(), Value::from(RASTER_NODE));
        replaced.insert("inputs".into(), Value::Object(inputs));
        if let Some(meta) = node.get("_meta") {
            replaced.insert("_meta".into(), meta.clone());
        }
        out.insert(id.clone(), Value::Object(replaced));
        changed = true;
    }
    changed.then_some(Value::Object(out))
}

/// The prompt id a graph re-run with file outputs goes under, after `prompt_id`'s rasters were
/// lost: derived, so cleanup and a restarted flowhost can find it from the recorded id alone.
pub fn files_prompt_id(prompt_id: &str) -> String {
    format!("{prompt_id}-files")
}

/// How many rasters a node's history output says it sent (`ui.flowhost_rasters`); None for a
/// node that is not a raster node.
pub fn rasters_sent(ui_output: &Value) -> Option<usize> {
    ui_output.get("flowhost_rasters").and_then(Value::as_array).map(Vec::len)
}

/// Write the node package under `dir` (`dir/custom_nodes/flowhost/__init__.py`) and a ComfyUI
/// `extra_model_paths` file naming that `custom_nodes` folder; returns the file's path, for
/// `--extra-model-paths-config` (ComfyUI accepts the option more than once, so an operator's own
/// file still applies). Rewritten on every start, so an upgraded flowhost ships its node.
pub fn install(dir: &Path) -> std::io::Result<PathBuf> {
    let nodes = dir.join("custom_nodes");
    let package = nodes.join("flowhost");
    std::fs::create_dir_all(&package)?;
    std::fs::write(package.join("__init__.py"), NODE_SOURCE)?;
    let absolute = std::path::absolute(&nodes)?;
    // YAML single-quoted scalar: only `'` needs escaping (doubled).
    let quoted = absolute.display().to_string().replace('\'', "''");
    let config = dir.join("flowhost-nodes.yaml");
    std::fs::write(&config, format!("# Written by flowhost: the folder holding its FlowhostImageOutput node.\nflowhost:\n  custom_nodes: '{quoted}'\n"))?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_save_image_nodes_are_replaced_and_their_links_are_kept() {
        let graph = json!({
            "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
            "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "flux"}, "_meta": {"title": "Save"}},
            "10": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}}
        });
        let out = with_raster_outputs(&graph).unwrap();
        assert_eq!(out["9"], json!({"class_type": RASTER_NODE, "inputs": {"images": ["8", 0], "filename_prefix": "flux"}, "_meta": {"title": "Save"}}));
        assert_eq!(out["8"], graph["8"]);
        assert_eq!(out["10"], graph["10"]);
        assert!(with_raster_outputs(&json!({"1": {"class_type": "PreviewImage", "inputs": {}}})).is_none());
    }

    #[test]
    fn the_python_node_sends_the_event_type_this_client_reads() {
        let line = NODE_SOURCE.lines().find(|l| l.starts_with("EVENT_RASTER = ")).unwrap();
        let hex = line.trim_start_matches("EVENT_RASTER = 0x").split_whitespace().next().unwrap();
        assert_eq!(u32::from_str_radix(hex, 16).unwrap(), crate::protocol::RASTER_EVENT);
    }

    #[test]
    fn install_writes_the_node_and_a_config_naming_its_folder() {
        let dir = tempfile::tempdir().unwrap();
        let config = install(&dir.path().join("comfy it's")).unwrap();
        let node = std::fs::read_to_string(dir.path().join("comfy it's/custom_nodes/flowhost/__init__.py")).unwrap();
        assert!(node.contains("class FlowhostImageOutput") && node.contains("0x464C5752"));
        let yaml = std::fs::read_to_string(config).unwrap();
        assert!(yaml.contains("custom_nodes: '") && yaml.contains("comfy it''s/custom_nodes'"), "{yaml}");
    }
}
