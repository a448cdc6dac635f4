//! The speed profiles' graph transform: before a job's graph is submitted, put a ComfyUI step
//! cache and/or `TorchCompileModel` (torch.compile, inductor) between every sampler and the
//! model it samples, so an operator who chose `--comfyui-profile speed` (or `speed-compiled`)
//! gets step-cached (or compiled) sampling without touching a plugin or a workflow. All three
//! nodes are core nodes of ComfyUI 0.3.64 (`comfy_extras/nodes_easycache.py`,
//! `nodes_torch_compile.py`); the node catalogue fixture of the ComfyUI double holds their
//! captured `object_info`.
//!
//! Which step cache: `EasyCache` decides in a `DIFFUSION_MODEL` wrapper, i.e. inside the module
//! `TorchCompileModel` compiles, so dynamo traces its Python branches and recompiles as they
//! change (20–80 s per step while warming on the H100; 17 recompiles before it settled in a
//! CPU rehearsal: BENCHMARKS.md). `LazyCache` makes the same kind of decision in a
//! `PREDICT_NOISE` wrapper, outside the compiled module (compiled once, as without a cache). So
//! a compiled model (compiled by this transform or by the workflow itself) gets `LazyCache`, an
//! uncompiled one `EasyCache` (the one measured on a GPU).
//!
//! Owns: which sampler inputs take a model ([`SAMPLER_MODEL_INPUTS`]), which step cache goes
//! with compilation, the ids and inputs of the nodes it inserts. Must never: change a graph
//! when the transform is off (the default profile is exactly ComfyUI's behaviour), add a second
//! step cache or compile node where the workflow has its own, put `EasyCache` into a graph that
//! compiles, or touch anything but the sampler's `model` link.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

/// ComfyUI's torch.compile node (backend `inductor`, `dynamic=None`: the first new shape after
/// the first compile recompiles with dynamic sizes, later ones reuse it).
pub const COMPILE_NODE: &str = "TorchCompileModel";
/// ComfyUI's native step cache: reuses the model's last output change while the input's
/// cumulative change stays under `reuse_threshold`. Decides inside the diffusion model's
/// forward, so only for a model that is not compiled.
pub const STEP_CACHE_NODE: &str = "EasyCache";
/// The step cache for a compiled model: the same inputs as `EasyCache`, deciding around
/// ComfyUI's noise prediction, outside the compiled module.
pub const COMPILED_STEP_CACHE_NODE: &str = "LazyCache";
/// Step caches a workflow may already carry (then none is added).
const STEP_CACHE_NODES: &[&str] = &[STEP_CACHE_NODE, COMPILED_STEP_CACHE_NODE];
/// Nodes whose `model` input is the model the sampler runs.
pub const SAMPLER_MODEL_INPUTS: &[(&str, &str)] = &[
    ("KSampler", "model"),
    ("KSamplerAdvanced", "model"),
    ("BasicGuider", "model"),
    ("CFGGuider", "model"),
    ("DualCFGGuider", "model"),
];
/// EasyCache's own defaults in 0.3.64 for where in the schedule it may skip.
const STEP_CACHE_START: f64 = 0.15;
const STEP_CACHE_END: f64 = 0.95;
/// EasyCache's `reuse_threshold` range in 0.3.64.
pub const STEP_CACHE_MAX: f64 = 3.0;

/// What the transform inserts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SpeedGraph {
    /// Insert `TorchCompileModel` (backend inductor).
    pub compile: bool,
    /// Insert a step cache with this `reuse_threshold` (`None`: no step cache): `EasyCache`,
    /// or `LazyCache` where the graph compiles.
    pub step_cache: Option<f64>,
}

impl SpeedGraph {
    /// Whether the transform changes anything at all.
    pub fn is_noop(&self) -> bool {
        !self.compile && self.step_cache.is_none()
    }

    /// The graph with the speed nodes inserted before every sampler's model, or `None` when
    /// there is nothing to change (no sampler, or the workflow already compiles and caches).
    /// One chain per distinct model link: two samplers of one model share one compiled model.
    pub fn apply(&self, graph: &Value) -> Option<Value> {
        let nodes = graph.as_object()?;
        let has_class = |classes: &[&str]| {
            nodes.values().any(|n| n.get("class_type").and_then(Value::as_str).is_some_and(|c| classes.contains(&c)))
        };
        let step_cache = self.step_cache.filter(|_| !has_class(STEP_CACHE_NODES));
        let own_compile = has_class(&[COMPILE_NODE]);
        let compile = self.compile && !own_compile;
        if !compile && step_cache.is_none() {
            return None;
        }
        let cache_class = if self.compile || own_compile { COMPILED_STEP_CACHE_NODE } else { STEP_CACHE_NODE };
        // (sampler id, input) per model link, in node-id order so the ids are stable.
        let mut by_link: BTreeMap<String, (Value, Vec<String>)> = BTreeMap::new();
        for (id, node) in nodes {
            let Some(class) = node.get("class_type").and_then(Value::as_str) else { continue };
            for (sampler, input) in SAMPLER_MODEL_INPUTS {
                if class != *sampler {
                    continue;
                }
                let Some(link) = node.get("inputs").and_then(|i| i.get(*input)) else { continue };
                if is_link(link) {
                    let entry = by_link.entry(link.to_string()).or_insert_with(|| (link.clone(), Vec::new()));
                    entry.1.push(id.clone());
                }
            }
        }
        if by_link.is_empty() {
            return None;
        }
        let mut out: Map<String, Value> = nodes.clone();
        for (n, (_, (link, samplers))) in by_link.into_iter().enumerate() {
            let mut model = link;
            if let Some(threshold) = step_cache {
                let id = fresh_id(&out, &format!("flowhost_speed_{}_step_cache", n + 1));
                out.insert(id.clone(), json!({
                    "class_type": cache_class,
                    "inputs": {"model": model, "reuse_threshold": threshold, "start_percent": STEP_CACHE_START, "end_percent": STEP_CACHE_END, "verbose": false},
                    "_meta": {"title": "flowhost speed profile: step cache"},
                }));
                model = json!([id, 0]);
            }
            if compile {
                let id = fresh_id(&out, &format!("flowhost_speed_{}_compile", n + 1));
                out.insert(id.clone(), json!({
                    "class_type": COMPILE_NODE,
                    "inputs": {"model": model, "backend": "inductor"},
                    "_meta": {"title": "flowhost speed profile: torch.compile"},
                }));
                model = json!([id, 0]);
            }
            for sampler in samplers {
                if let Some(Value::Object(inputs)) = out.get_mut(&sampler).and_then(|n| n.get_mut("inputs")) {
                    inputs.insert("model".into(), model.clone());
                }
            }
        }
        Some(Value::Object(out))
    }
}

/// `[node_id, output_index]`.
fn is_link(v: &Value) -> bool {
    matches!(v.as_array().map(Vec::as_slice), Some([Value::String(_), Value::Number(_)]))
}

/// `base`, or `base_2`, `base_3`… if the workflow already uses that id.
fn fresh_id(nodes: &Map<String, Value>, base: &str) -> String {
    if !nodes.contains_key(base) {
        return base.to_string();
    }
    (2..).map(|i| format!("{base}_{i}")).find(|id| !nodes.contains_key(id)).unwrap_or_else(|| base.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalogue::Catalogue;

    /// The real `object_info` of ComfyUI 0.3.64 (the double's fixture), models as on a Flux volume.
    fn catalogue() -> Catalogue {
        let mut info: Value = serde_json::from_str(include_str!("../../comfyui-double/fixtures/object_info.json")).unwrap();
        let set = |info: &mut Value, class: &str, input: &str, files: &[&str]| {
            info[class]["input"]["required"][input][0] = json!(files);
        };
        set(&mut info, "UNETLoader", "unet_name", &["flux1-dev.safetensors"]);
        set(&mut info, "DualCLIPLoader", "clip_name1", &["clip_l.safetensors"]);
        set(&mut info, "DualCLIPLoader", "clip_name2", &["t5xxl_fp16.safetensors"]);
        set(&mut info, "VAELoader", "vae_name", &["ae.safetensors"]);
        Catalogue::from_object_info_value(&info).unwrap()
    }

    /// flowhost's `/flux-dev` graph (sdk/src/flux.rs) as the plugin builds it.
    fn flux_graph() -> Value {
        json!({
            "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-dev.safetensors", "weight_dtype": "default"}},
            "2": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "clip_l.safetensors", "clip_name2": "t5xxl_fp16.safetensors", "type": "flux"}},
            "3": {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}},
            "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse", "clip": ["2", 0]}},
            "5": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["4", 0], "guidance": 3.5}},
            "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["2", 0]}},
            "7": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1}},
            "8": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": 7, "steps": 20, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "positive": ["5", 0], "negative": ["6", 0], "latent_image": ["7", 0], "denoise": 1.0}},
            "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["3", 0]}},
            "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "flux-dev"}},
        })
    }

    const FULL: SpeedGraph = SpeedGraph { compile: true, step_cache: Some(0.2) };

    #[test]
    fn flux_graph_gets_lazy_cache_then_compile_before_the_sampler_and_still_validates() {
        let cat = catalogue();
        let g = flux_graph();
        cat.preflight(&g).expect("the plain graph is valid");
        let out = FULL.apply(&g).expect("changed");
        cat.preflight(&out).expect("the transformed graph is valid against ComfyUI 0.3.64's catalogue");
        assert_eq!(out["8"]["inputs"]["model"], json!(["flowhost_speed_1_compile", 0]));
        let compile = &out["flowhost_speed_1_compile"];
        assert_eq!(compile["class_type"], COMPILE_NODE);
        assert_eq!(compile["inputs"], json!({"model": ["flowhost_speed_1_step_cache", 0], "backend": "inductor"}));
        let cache = &out["flowhost_speed_1_step_cache"];
        assert_eq!(cache["class_type"], COMPILED_STEP_CACHE_NODE, "EasyCache would sit inside the compiled model and recompile");
        assert_eq!(cache["inputs"]["model"], json!(["1", 0]));
        assert_eq!(cache["inputs"]["reuse_threshold"], json!(0.2));
        assert_eq!(out.as_object().unwrap().values().filter(|n| n["class_type"] == STEP_CACHE_NODE).count(), 0);
        // Nothing else moved.
        assert_eq!(out.as_object().unwrap().len(), g.as_object().unwrap().len() + 2);
        for (id, node) in g.as_object().unwrap() {
            if id != "8" {
                assert_eq!(&out[id], node, "node {id}");
            }
        }
    }

    #[test]
    fn each_part_alone_and_off_means_the_graph_is_untouched() {
        let g = flux_graph();
        assert!(SpeedGraph { compile: false, step_cache: None }.apply(&g).is_none());
        let only_compile = SpeedGraph { compile: true, step_cache: None }.apply(&g).unwrap();
        assert_eq!(only_compile["8"]["inputs"]["model"], json!(["flowhost_speed_1_compile", 0]));
        assert_eq!(only_compile["flowhost_speed_1_compile"]["inputs"]["model"], json!(["1", 0]));
        let only_cache = SpeedGraph { compile: false, step_cache: Some(0.3) }.apply(&g).unwrap();
        assert_eq!(only_cache["8"]["inputs"]["model"], json!(["flowhost_speed_1_step_cache", 0]));
        assert_eq!(only_cache["flowhost_speed_1_step_cache"]["class_type"], STEP_CACHE_NODE, "no compile: EasyCache, as measured");
        assert!(!only_cache.as_object().unwrap().values().any(|n| n["class_type"] == COMPILE_NODE));
        catalogue().preflight(&only_cache).unwrap();
    }

    #[test]
    fn a_lora_chain_is_compiled_after_the_lora_and_samplers_of_one_model_share_one_chain() {
        let mut g = flux_graph();
        g["11"] = json!({"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": "x.safetensors", "strength_model": 0.8}});
        g["8"]["inputs"]["model"] = json!(["11", 0]);
        // A second pass (hires-fix style) on the same model.
        g["12"] = json!({"class_type": "KSampler", "inputs": {"model": ["11", 0], "seed": 1, "steps": 4, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "positive": ["5", 0], "negative": ["6", 0], "latent_image": ["8", 0], "denoise": 0.5}});
        let out = FULL.apply(&g).unwrap();
        assert_eq!(out["flowhost_speed_1_step_cache"]["inputs"]["model"], json!(["11", 0]), "the LoRA is patched in before compiling");
        assert_eq!(out["8"]["inputs"]["model"], out["12"]["inputs"]["model"]);
        let compiles = out.as_object().unwrap().values().filter(|n| n["class_type"] == COMPILE_NODE).count();
        assert_eq!(compiles, 1);
    }

    #[test]
    fn custom_sampling_guiders_are_covered_and_own_nodes_are_not_doubled() {
        let g = json!({
            "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-dev.safetensors", "weight_dtype": "default"}},
            "2": {"class_type": "BasicGuider", "inputs": {"model": ["1", 0], "conditioning": ["5", 0]}},
        });
        let out = FULL.apply(&g).unwrap();
        assert_eq!(out["2"]["inputs"]["model"], json!(["flowhost_speed_1_compile", 0]));

        // The workflow compiles itself: only the step cache is added, and ids never collide.
        let mut own = flux_graph();
        own["flowhost_speed_1_step_cache"] = json!({"class_type": "TorchCompileModel", "inputs": {"model": ["1", 0], "backend": "cudagraphs"}});
        own["8"]["inputs"]["model"] = json!(["flowhost_speed_1_step_cache", 0]);
        let out = FULL.apply(&own).unwrap();
        let compiles = out.as_object().unwrap().values().filter(|n| n["class_type"] == COMPILE_NODE).count();
        assert_eq!(compiles, 1, "the workflow's own compile node stays the only one");
        assert_eq!(out["8"]["inputs"]["model"], json!(["flowhost_speed_1_step_cache_2", 0]));
        assert_eq!(out["flowhost_speed_1_step_cache_2"]["class_type"], COMPILED_STEP_CACHE_NODE);
        catalogue().preflight(&out).unwrap();

        // The step cache alone (`speed`) on a workflow that compiles itself: LazyCache too.
        let only_cache = SpeedGraph { compile: false, step_cache: Some(0.2) }.apply(&own).unwrap();
        let is_cache = |n: &&Value| STEP_CACHE_NODES.contains(&n["class_type"].as_str().unwrap_or(""));
        let caches: Vec<&Value> = only_cache.as_object().unwrap().values().filter(is_cache).collect();
        assert_eq!(caches.len(), 1);
        assert_eq!(caches[0]["class_type"], COMPILED_STEP_CACHE_NODE, "never EasyCache inside a compiled model");
        catalogue().preflight(&only_cache).unwrap();

        // Already cached and compiled: nothing to do.
        let mut both = own.clone();
        both["20"] = json!({"class_type": "EasyCache", "inputs": {"model": ["1", 0], "reuse_threshold": 0.1, "start_percent": 0.15, "end_percent": 0.95, "verbose": false}});
        assert!(FULL.apply(&both).is_none());
    }
}
