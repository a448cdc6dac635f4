//! What a job tells the host beyond the graph (contract 0.2): the model set it
//! loads and the sampler nodes' steps, read off the graph the plugin built so a
//! plugin never has to keep them in sync by hand. Reads stock ComfyUI loader and
//! sampler nodes only; a plugin with custom loaders fills `ModelSet` itself.

use serde_json::{Map, Value};

use crate::{Lora, ModelRef, ModelSet, SamplerProgress};

/// The model set of a ComfyUI API-format graph (`{id: {class_type, inputs}}`).
pub fn model_set_of(nodes: &Map<String, Value>) -> ModelSet {
    let mut set = ModelSet { base: None, loras: vec![], others: vec![] };
    let text = |node: &Value, key: &str| node["inputs"][key].as_str().map(str::to_string);
    let model = |folder: &str, name: String| ModelRef { folder: folder.into(), name };
    let mut bases: Vec<ModelRef> = Vec::new();
    for node in nodes.values() {
        match node["class_type"].as_str().unwrap_or_default() {
            "UNETLoader" => bases.extend(text(node, "unet_name").map(|n| model("diffusion_models", n))),
            "CheckpointLoaderSimple" => bases.extend(text(node, "ckpt_name").map(|n| model("checkpoints", n))),
            "LoraLoader" | "LoraLoaderModelOnly" => {
                if let Some(name) = text(node, "lora_name") {
                    set.loras.push(Lora {
                        model: model("loras", name),
                        strength_model: node["inputs"]["strength_model"].as_f64().unwrap_or(1.0),
                        strength_clip: node["inputs"]["strength_clip"].as_f64().unwrap_or(0.0),
                    });
                }
            }
            "VAELoader" => set.others.extend(text(node, "vae_name").map(|n| model("vae", n))),
            "DualCLIPLoader" => set
                .others
                .extend(["clip_name1", "clip_name2"].iter().filter_map(|k| text(node, k)).map(|n| model("text_encoders", n))),
            "CLIPLoader" => set.others.extend(text(node, "clip_name").map(|n| model("text_encoders", n))),
            "ControlNetLoader" => set.others.extend(text(node, "control_net_name").map(|n| model("controlnet", n))),
            "InstantIDModelLoader" => set.others.extend(text(node, "instantid_file").map(|n| model("instantid", n))),
            _ => {}
        }
    }
    // The base is the diffusion model when there is one (a second stage's
    // checkpoint, as in InstantID, is just another file), else the checkpoint.
    let first = bases.iter().position(|m| m.folder == "diffusion_models").unwrap_or(0);
    if first < bases.len() {
        set.base = Some(bases.remove(first));
    }
    set.others.extend(bases);
    set
}

/// The sampler nodes of a graph and their `steps`, in node-id order.
pub fn sampler_progress_of(nodes: &Map<String, Value>) -> Vec<SamplerProgress> {
    nodes
        .iter()
        .filter(|(_, n)| matches!(n["class_type"].as_str(), Some("KSampler" | "KSamplerAdvanced")))
        .filter_map(|(id, n)| {
            let steps = n["inputs"]["steps"].as_u64()?;
            Some(SamplerProgress { node_id: id.clone(), steps: u32::try_from(steps).ok()? })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_flux_lora_graph_names_its_base_lora_and_files() {
        let graph = json!({
            "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-dev.safetensors"}},
            "2": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "clip_l.safetensors", "clip_name2": "t5.safetensors"}},
            "3": {"class_type": "LoraLoaderModelOnly", "inputs": {"lora_name": "c.safetensors", "strength_model": 0.7}},
            "4": {"class_type": "KSampler", "inputs": {"steps": 20}},
        });
        let set = model_set_of(graph.as_object().unwrap());
        assert_eq!(set.base.unwrap().name, "flux1-dev.safetensors");
        assert_eq!(set.loras[0].model.name, "c.safetensors");
        assert_eq!(set.loras[0].strength_model, 0.7);
        assert_eq!(set.others.len(), 2);
        let progress = sampler_progress_of(graph.as_object().unwrap());
        assert_eq!(progress, vec![SamplerProgress { node_id: "4".into(), steps: 20 }]);
    }
}
