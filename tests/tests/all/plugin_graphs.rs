//! Every endpoint plugin, built natively for many requests (defaults, range edges,
//! enum values), and every graph it builds checked by the host's preflight against
//! the node catalogue a real ComfyUI 0.3.64 reported (`object_info.json`, with the
//! pinned identity packs' classes from `identity-nodes.object_info.json`). The model
//! volume is a `FakeHost` listing exactly the model files in that catalogue's combos,
//! so "the plugin picks what is present" is checked too. Zero preflight issues allowed.
//!
//! Each request body is also validated against the plugin's own manifest schema with
//! the host's JSON Schema crate: the schema must accept what the plugin accepts.

use flowhost_comfy::catalogue::Catalogue;
use flowhost_sdk::host::FakeHost;
use flowhost_sdk::image::samples::{data_url, jpeg_header, png_header};
use flowhost_sdk::{Job, Plugin, Request};
use serde_json::{Value, json};

/// The SDXL checkpoint added to the catalogue for the InstantID identity stage (the
/// captured catalogue only lists `flux1-dev-fp8` and `garbage` checkpoints).
const SDXL: &str = "sd_xl_base_1.0.safetensors";

fn object_info() -> Value {
    serde_json::from_str(comfyui_double::object_info_fixture())
        .expect("object_info fixture is JSON")
}

fn catalogue_from(info: &Value) -> Catalogue {
    Catalogue::from_object_info(&info.to_string()).expect("catalogue from object_info")
}

/// The real catalogue plus an SDXL checkpoint in `CheckpointLoaderSimple.ckpt_name`.
fn object_info_with_sdxl() -> Value {
    let mut info = object_info();
    info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
        .as_array_mut()
        .expect("ckpt_name is a combo")
        .push(json!(SDXL));
    info
}

/// The values of a combo input (`[[...], {...}]` or `["COMBO", {"options": [...]}]`).
fn combo(info: &Value, class: &str, input: &str) -> Vec<String> {
    let spec = &info[class]["input"]["required"][input];
    let values = if spec[0].is_array() {
        &spec[0]
    } else {
        &spec[1]["options"]
    };
    values
        .as_array()
        .unwrap_or_else(|| panic!("{class}.{input} is a combo"))
        .iter()
        .filter_map(|v| v.as_str().map(String::from))
        .collect()
}

/// A model volume holding exactly the files the catalogue's loader combos list.
fn volume_of(info: &Value) -> FakeHost {
    let sources = [
        ("diffusion_models", "UNETLoader", "unet_name"),
        ("text_encoders", "DualCLIPLoader", "clip_name1"),
        ("vae", "VAELoader", "vae_name"),
        ("checkpoints", "CheckpointLoaderSimple", "ckpt_name"),
        ("loras", "LoraLoaderModelOnly", "lora_name"),
        ("instantid", "InstantIDModelLoader", "instantid_file"),
        ("pulid", "PulidFluxModelLoader", "pulid_file"),
        ("controlnet", "ControlNetLoader", "control_net_name"),
    ];
    let mut host = FakeHost::new();
    for (folder, class, input) in sources {
        for name in combo(info, class, input) {
            if name != "pixel_space" {
                host = host.with_model(folder, &name, 1024);
            }
        }
    }
    host
}

fn request(body: &Value) -> Request {
    Request {
        body: body.to_string(),
        random_seed: 1234567890123,
        request_id: "plugin-graphs".into(),
    }
}

/// Build `body` with plugin `P`; check the body against P's schema and the graph
/// against the catalogue. Returns a description of every problem.
fn check<P: Plugin>(
    catalogue: &Catalogue,
    host: &FakeHost,
    body: &Value,
    patch: impl Fn(&Job, &mut Value),
) -> Vec<String> {
    let mut problems = Vec::new();
    let manifest = P::manifest();
    let schema: Value = serde_json::from_str(&manifest.request_schema).expect("schema is JSON");
    let validator = jsonschema::validator_for(&schema).expect("schema compiles");
    for error in validator.iter_errors(body) {
        problems.push(format!("{} {body}: schema refuses: {error}", manifest.name));
    }
    match P::build(&request(body), host) {
        Err(error) => problems.push(format!("{} {body}: build failed: {error:?}", manifest.name)),
        Ok(job) => {
            let mut graph: Value = serde_json::from_str(&job.workflow).expect("workflow is JSON");
            // One model-set rule: the host reading this graph (a v2 or /workflow job, a 0.1
            // plugin) must key it as the plugin declared it, or the same graph is dispatched
            // by two affinity keys.
            let declared = host_model_set(&job.models);
            let inferred = flowhost::plugins::ModelSet::inferred_from_workflow(graph.as_object().expect("a graph is an object"));
            let (declared_key, inferred_key) = (flowhost::jobs::affinity::model_key(&declared), flowhost::jobs::affinity::model_key(&inferred));
            if declared_key != inferred_key {
                problems.push(format!("{} {body}: model set declared {declared:?}, host reads {inferred:?}", manifest.name));
            }
            patch(&job, &mut graph);
            if let Err(issues) = catalogue.preflight(&graph) {
                for issue in issues {
                    problems.push(format!("{} {body}: preflight: {issue:?}", manifest.name));
                }
            }
            for class in graph
                .as_object()
                .into_iter()
                .flat_map(|g| g.values())
                .filter_map(|n| n["class_type"].as_str())
            {
                if manifest.name != "workflow" && !manifest.node_classes.iter().any(|c| c == class)
                {
                    problems.push(format!(
                        "{}: class {class} used but not declared in node_classes",
                        manifest.name
                    ));
                }
            }
        }
    }
    problems
}

/// The SDK's model set as the host lifts it from a 0.2 plugin.
fn host_model_set(set: &flowhost_sdk::ModelSet) -> flowhost::plugins::ModelSet {
    use flowhost::plugins::manifest::{Lora, ModelRef};
    let model = |m: &flowhost_sdk::ModelRef| ModelRef { folder: m.folder.clone(), name: m.name.clone() };
    flowhost::plugins::ModelSet {
        base: set.base.as_ref().map(model),
        loras: set.loras.iter().map(|l| Lora { model: model(&l.model), strength_model: l.strength_model, strength_clip: l.strength_clip }).collect(),
        others: set.others.iter().map(model).collect(),
        ..Default::default()
    }
}

fn no_patch(_: &Job, _: &mut Value) {}

/// What the host does before preflight: write each upload's reference into its node.
/// `example.png` is a file the captured LoadImage combo lists.
fn simulate_uploads(job: &Job, graph: &mut Value) {
    for upload in &job.uploads {
        graph[&upload.node_id]["inputs"][&upload.input_name] = json!("example.png");
    }
}

/// Bodies = `base` with each of `variations` merged in, plus `base` itself.
fn variants(base: Value, variations: &[Value]) -> Vec<Value> {
    let mut all = vec![base.clone()];
    for v in variations {
        let mut body = base.clone();
        for (k, val) in v.as_object().expect("variation is an object") {
            body[k] = val.clone();
        }
        all.push(body);
    }
    all
}

fn flux_variations() -> Vec<Value> {
    vec![
        json!({"width": 256, "height": 256}),
        json!({"width": 2048, "height": 2048}),
        json!({"width": 256, "height": 2048}),
        json!({"width": 1040, "height": 784}),
        json!({"steps": 1}),
        json!({"steps": 100}),
        json!({"cfg": 0.0}),
        json!({"cfg": 30.0}),
        json!({"seed": 0}),
        json!({"seed": u64::MAX}),
        json!({"negative_prompt": "blurry, low quality"}),
        json!({"prompt": "ünïcödé prompt with \"quotes\" and a\nnewline"}),
    ]
}

fn assert_clean(problems: Vec<String>, checked: usize) {
    assert!(checked > 0);
    assert!(
        problems.is_empty(),
        "{} problem(s) in {checked} builds:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

mod flux_dev_graphs {
    use super::*;

    #[test]
    fn every_flux_dev_graph_passes_preflight() {
        let info = object_info();
        let (catalogue, host) = (catalogue_from(&info), volume_of(&info));
        let mut variations = flux_variations();
        variations.extend([json!({"guidance": 0.0}), json!({"guidance": 100.0})]);
        let bodies = variants(json!({"prompt": "a red fox in the snow"}), &variations);
        let problems: Vec<String> = bodies
            .iter()
            .flat_map(|b| check::<flux_dev::FluxDev>(&catalogue, &host, b, no_patch))
            .collect();
        assert_clean(problems, bodies.len());
    }

    #[test]
    fn the_all_in_one_checkpoint_graph_passes_preflight() {
        let info = object_info();
        let catalogue = catalogue_from(&info);
        let host = FakeHost::new().with_model("checkpoints", "flux1-dev-fp8.safetensors", 1024);
        assert_clean(
            check::<flux_dev::FluxDev>(&catalogue, &host, &json!({"prompt": "p"}), no_patch),
            1,
        );
    }

    #[test]
    fn preflight_catches_a_model_the_catalogue_does_not_list() {
        // Proves the check is live: an fp8 T5 on the volume that ComfyUI does not list.
        let info = object_info();
        let catalogue = catalogue_from(&info);
        let host = FakeHost::new()
            .with_model("diffusion_models", "flux1-dev.safetensors", 1)
            .with_model("text_encoders", "clip_l.safetensors", 1)
            .with_model("text_encoders", "t5xxl_fp8_e4m3fn.safetensors", 1)
            .with_model("vae", "ae.safetensors", 1);
        let problems =
            check::<flux_dev::FluxDev>(&catalogue, &host, &json!({"prompt": "p"}), no_patch);
        assert!(
            problems.iter().any(|p| p.contains("DualCLIPLoader")),
            "{problems:?}"
        );
    }
}

mod flux_lora_graphs {
    use super::*;

    #[test]
    fn every_flux_lora_graph_passes_preflight() {
        let info = object_info();
        let (catalogue, host) = (catalogue_from(&info), volume_of(&info));
        let mut variations = flux_variations();
        variations.extend([
            json!({"lora_strength": 0.0}),
            json!({"lora_strength": 1.0}),
            json!({"lora_strength": 0.35}),
            json!({"trigger_word": "ch4r"}),
            json!({"trigger_word": "portrait"}),
            json!({"guidance": 100.0}),
        ]);
        let bodies = variants(
            json!({"prompt": "portrait photo, studio lighting", "lora_id": "character-123"}),
            &variations,
        );
        let problems: Vec<String> = bodies
            .iter()
            .flat_map(|b| check::<flux_lora::FluxLora>(&catalogue, &host, b, no_patch))
            .collect();
        assert_clean(problems, bodies.len());
    }
}

mod flux_instantid_graphs {
    use super::*;

    #[test]
    fn every_flux_instantid_graph_passes_preflight() {
        let info = object_info_with_sdxl();
        let (catalogue, host) = (catalogue_from(&info), volume_of(&info));
        let mut variations = flux_variations();
        variations.extend([
            json!({"face_provider": "CPU"}),
            json!({"face_provider": "GPU"}),
            json!({"face_provider": "CUDA"}),
            json!({"instantid_strength": 0.0, "controlnet_strength": 0.0}),
            json!({"instantid_strength": 1.0, "controlnet_strength": 1.0}),
            json!({"reference_image": data_url("image/jpeg", &jpeg_header(640, 480))}),
            json!({"reference_image": "faces/alice.png"}),
        ]);
        let base = json!({"prompt": "an astronaut on mars", "reference_image": data_url("image/png", &png_header(512, 512))});
        let bodies = variants(base, &variations);
        let problems: Vec<String> = bodies
            .iter()
            .flat_map(|b| {
                check::<flux_instantid::FluxInstantId>(&catalogue, &host, b, simulate_uploads)
            })
            .collect();
        assert_clean(problems, bodies.len());
    }

    #[test]
    fn the_uploaded_reference_is_the_only_load_image() {
        let info = object_info_with_sdxl();
        let host = volume_of(&info);
        let body = json!({"prompt": "p", "reference_image": "faces/alice.png"});
        let job = flux_instantid::FluxInstantId::build(&request(&body), &host).expect("builds");
        let graph: Value = serde_json::from_str(&job.workflow).unwrap();
        let loads: Vec<&String> = graph
            .as_object()
            .unwrap()
            .iter()
            .filter(|(_, n)| n["class_type"] == "LoadImage")
            .map(|(id, _)| id)
            .collect();
        assert_eq!(loads.len(), 1);
        assert_eq!(job.uploads.len(), 1);
        assert_eq!(&job.uploads[0].node_id, loads[0]);
    }
}

mod flux_pulid_graphs {
    use super::*;

    #[test]
    fn every_flux_pulid_graph_passes_preflight() {
        let info = object_info();
        let (catalogue, host) = (catalogue_from(&info), volume_of(&info));
        let mut variations = flux_variations();
        variations.extend([
            json!({"guidance": 0.0}),
            json!({"guidance": 100.0}),
            json!({"face_provider": "CPU"}),
            json!({"face_provider": "GPU"}),
            json!({"face_provider": "CUDA"}),
            json!({"pulid_strength": -1.0}),
            json!({"pulid_strength": 0.0}),
            json!({"pulid_strength": 5.0}),
            json!({"start_at": 0.0, "end_at": 0.0}),
            json!({"start_at": 1.0, "end_at": 1.0}),
            json!({"start_at": 0.25, "end_at": 0.75}),
            json!({"reference_image": data_url("image/jpeg", &jpeg_header(640, 480))}),
            json!({"reference_image": "faces/alice.png"}),
        ]);
        let base = json!({"prompt": "an astronaut on mars", "reference_image": data_url("image/png", &png_header(512, 512))});
        let bodies = variants(base, &variations);
        let problems: Vec<String> = bodies
            .iter()
            .flat_map(|b| check::<flux_pulid::FluxPulid>(&catalogue, &host, b, simulate_uploads))
            .collect();
        assert_clean(problems, bodies.len());
    }

    #[test]
    fn the_pinned_pulid_pack_is_in_the_catalogue() {
        // ApplyPulidFlux of ComfyUI_PuLID_Flux_ll takes `options`; balazik's did not.
        let info = object_info();
        assert_eq!(info["ApplyPulidFlux"]["python_module"], "custom_nodes.ComfyUI_PuLID_Flux_ll");
        assert!(info["ApplyPulidFlux"]["input"]["optional"]["options"].is_array());
        assert_eq!(info["PulidFluxFaceDetector"]["output_is_list"], json!([true, true, true]));
    }

    #[test]
    fn the_uploaded_reference_is_the_only_load_image() {
        let host = volume_of(&object_info());
        let body = json!({"prompt": "p", "reference_image": "faces/alice.png"});
        let job = flux_pulid::FluxPulid::build(&request(&body), &host).expect("builds");
        let graph: Value = serde_json::from_str(&job.workflow).unwrap();
        let loads: Vec<&String> = graph
            .as_object()
            .unwrap()
            .iter()
            .filter(|(_, n)| n["class_type"] == "LoadImage")
            .map(|(id, _)| id)
            .collect();
        assert_eq!((loads.len(), job.uploads.len()), (1, 1));
        assert_eq!(&job.uploads[0].node_id, loads[0]);
    }
}

mod workflow_graphs {
    use super::*;

    /// The captured Flux graphs (a), (b), (c1), (c2) that real ComfyUI validated.
    fn captured_graphs() -> Vec<(String, Value)> {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../comfyui-double/fixtures/flux-validation.json"
        ))
        .expect("flux-validation fixture");
        let cases: Value = serde_json::from_str(&text).expect("fixture is JSON");
        [
            "a_flux_dev_separate_loaders",
            "b_flux_checkpoint_loader",
            "c1_flux_lora_model_only",
            "c2_flux_lora_loader",
        ]
        .iter()
        .map(|name| (name.to_string(), cases[name]["request"]["prompt"].clone()))
        .collect()
    }

    #[test]
    fn captured_graphs_with_every_option_pass_preflight() {
        let info = object_info();
        let (catalogue, host) = (catalogue_from(&info), volume_of(&info));
        let mut checked = 0;
        let mut problems = Vec::new();
        for (name, graph) in captured_graphs() {
            assert!(graph.is_object(), "{name}");
            for extra in [
                json!({}),
                json!({"prompt": "a lighthouse at dusk"}),
                json!({"output_node": "10"}),
                json!({"output_format": "png"}),
                json!({"output_format": "original", "prompt": "x"}),
            ] {
                let mut body = json!({"workflow": graph});
                for (k, v) in extra.as_object().unwrap() {
                    body[k] = v.clone();
                }
                problems.extend(check::<workflow::Workflow>(
                    &catalogue, &host, &body, no_patch,
                ));
                checked += 1;
            }
        }
        assert_clean(problems, checked);
    }

    #[test]
    fn injection_changes_only_the_positive_text_of_captured_graphs() {
        let host = FakeHost::new();
        for (name, graph) in captured_graphs() {
            let body = json!({"workflow": graph, "prompt": "injected"});
            let job = workflow::Workflow::build(&request(&body), &host).expect("builds");
            let built: Value = serde_json::from_str(&job.workflow).unwrap();
            // Node 4 feeds FluxGuidance → KSampler.positive; node 6 is the negative.
            assert_eq!(built["4"]["inputs"]["text"], "injected", "{name}");
            assert_eq!(
                built["6"]["inputs"]["text"], graph["6"]["inputs"]["text"],
                "{name}"
            );
            let mut rest = built.clone();
            rest["4"]["inputs"]["text"] = graph["4"]["inputs"]["text"].clone();
            assert_eq!(rest, graph, "{name}: nothing else changes");
            assert_eq!(job.caller_nodes.len(), graph.as_object().unwrap().len());
        }
    }
}

/// The schema (checked by the host first) and the plugin (checked second) must agree:
/// a body one refuses, the other refuses too, naming the same field.
mod schema_and_plugin_agree {
    use super::*;

    /// Field names the schema's errors point at (`/width` → `width`; for
    /// `additionalProperties` the unexpected names).
    fn schema_fields<P: Plugin>(body: &Value) -> Vec<String> {
        let schema: Value = serde_json::from_str(&P::manifest().request_schema).unwrap();
        let validator = jsonschema::validator_for(&schema).unwrap();
        let mut fields: Vec<String> = validator
            .iter_errors(body)
            .map(|e| {
                let path = e.instance_path().to_string();
                let path = path.trim_start_matches('/').to_string();
                if path.is_empty() {
                    // Root errors: a missing required field or an unexpected one; find its name.
                    let text = e.to_string();
                    text.split('\'')
                        .nth(1)
                        .or_else(|| text.split('"').nth(1))
                        .unwrap_or("body")
                        .to_string()
                } else {
                    path
                }
            })
            .collect();
        fields.sort();
        fields.dedup();
        fields
    }

    fn plugin_fields<P: Plugin>(body: &Value, host: &FakeHost) -> Vec<String> {
        match P::build(&request(body), host) {
            Err(flowhost_sdk::BuildError::InvalidRequest(errors)) => {
                let mut fields: Vec<String> = errors.into_iter().map(|e| e.field).collect();
                fields.sort();
                fields.dedup();
                fields
            }
            other => panic!("{body}: expected InvalidRequest, got {other:?}"),
        }
    }

    fn agree<P: Plugin>(host: &FakeHost, base: Value, bad: &[Value]) {
        for variation in bad {
            let mut body = base.clone();
            for (k, v) in variation.as_object().unwrap() {
                body[k] = v.clone();
            }
            let (schema, plugin) = (schema_fields::<P>(&body), plugin_fields::<P>(&body, host));
            assert_eq!(
                schema, plugin,
                "{body}: schema names {schema:?}, plugin names {plugin:?}"
            );
        }
    }

    fn flux_bad() -> Vec<Value> {
        vec![
            json!({"width": 240}),
            json!({"width": 2064}),
            json!({"height": 1000}),
            json!({"steps": 0}),
            json!({"steps": 101}),
            json!({"cfg": -0.5}),
            json!({"cfg": 30.5}),
            json!({"seed": -1}),
            json!({"prompt": ""}),
            json!({"prompt": " \n\t "}),
            json!({"guidance_scale": 3.5}),
            json!({"num_inference_steps": 28}),
        ]
    }

    #[test]
    fn flux_dev() {
        let host = volume_of(&object_info());
        let mut bad = flux_bad();
        bad.extend([json!({"guidance": -1.0}), json!({"guidance": 100.5})]);
        agree::<flux_dev::FluxDev>(&host, json!({"prompt": "p"}), &bad);
    }

    #[test]
    fn flux_lora() {
        let host = volume_of(&object_info());
        let mut bad = flux_bad();
        bad.extend([
            json!({"lora_id": "../secret"}),
            json!({"lora_id": "a/b"}),
            json!({"lora_id": "a..b"}),
            json!({"lora_id": ".hidden"}),
            json!({"lora_id": "tab\tid"}),
            json!({"lora_id": ""}),
            json!({"lora_strength": 1.5}),
            json!({"lora_strength": -0.1}),
            json!({"trigger_word": ""}),
            json!({"trigger_word": "   "}),
        ]);
        agree::<flux_lora::FluxLora>(
            &host,
            json!({"prompt": "p", "lora_id": "character-123"}),
            &bad,
        );
    }

    #[test]
    fn flux_instantid() {
        let host = volume_of(&object_info_with_sdxl());
        let mut bad = flux_bad();
        bad.retain(|v| {
            v.get("cfg").is_none() || v["cfg"].as_f64().is_some_and(|c| c < 0.0 || c > 30.0)
        });
        bad.extend([
            json!({"face_provider": "TPU"}),
            json!({"instantid_strength": 1.01}),
            json!({"controlnet_strength": -0.01}),
            json!({"guidance": 3.5}),
        ]);
        let face = data_url("image/png", &png_header(64, 64));
        agree::<flux_instantid::FluxInstantId>(
            &host,
            json!({"prompt": "p", "reference_image": face}),
            &bad,
        );
    }

    #[test]
    fn flux_pulid() {
        let host = volume_of(&object_info());
        let mut bad = flux_bad();
        bad.extend([
            json!({"guidance": -1.0}),
            json!({"guidance": 100.5}),
            json!({"face_provider": "ROCM"}),
            json!({"pulid_strength": -1.05}),
            json!({"pulid_strength": 5.05}),
            json!({"start_at": -0.01}),
            json!({"end_at": 1.01}),
            json!({"instantid_strength": 0.8}),
        ]);
        let face = data_url("image/png", &png_header(64, 64));
        agree::<flux_pulid::FluxPulid>(&host, json!({"prompt": "p", "reference_image": face}), &bad);
    }

    #[test]
    fn workflow() {
        let host = FakeHost::new();
        let graph = json!({"1": {"class_type": "SaveImage", "inputs": {}}});
        agree::<workflow::Workflow>(
            &host,
            json!({"workflow": graph}),
            &[
                json!({"output_format": "gif"}),
                json!({"prompt": ""}),
                json!({"prompt": "  "}),
                json!({"workflow": [1]}),
                json!({"negative_prompt": "x"}),
            ],
        );
    }
}

/// `deploy/identity.lock.json` (what the Modal image installs and `check_identity_lock.py`
/// checks) names exactly the node classes each identity route's plugin declares, and the
/// preferred file of every model requirement.
mod identity_lock {
    use super::*;

    fn lock() -> Value {
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/identity.lock.json"))
            .expect("identity lock");
        serde_json::from_str(&text).expect("lock is JSON")
    }

    fn same_route<P: Plugin>(lock: &Value) {
        let manifest = P::manifest();
        let route = &lock["routes"][&manifest.route];
        let mut locked: Vec<String> = route["node_classes"]
            .as_array()
            .unwrap_or_else(|| panic!("{} in the lock", manifest.route))
            .iter()
            .map(|c| c.as_str().unwrap().to_string())
            .collect();
        let mut declared = manifest.node_classes.clone();
        locked.sort();
        declared.sort();
        assert_eq!(locked, declared, "{}", manifest.route);
        let models: Vec<&str> = route["models"].as_array().unwrap().iter().map(|m| m.as_str().unwrap()).collect();
        for requirement in &manifest.models {
            let first = &requirement.any_of[0];
            let path = format!("{}/{}", first.folder, first.name);
            assert!(models.contains(&path.as_str()), "{}: {path} ({}) not in the lock", manifest.route, requirement.purpose);
        }
        // Every pack class a route uses is a class of a pinned pack.
        let pinned: Vec<&str> = lock["custom_nodes"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|p| p["classes"].as_array().unwrap().iter().map(|c| c.as_str().unwrap()))
            .collect();
        let info = object_info();
        for class in &manifest.node_classes {
            let module = info[class]["python_module"].as_str().unwrap_or("");
            if module.starts_with("custom_nodes.") {
                assert!(pinned.contains(&class.as_str()), "{class} comes from {module}, which the lock does not pin");
            }
        }
    }

    #[test]
    fn the_lock_matches_the_identity_plugins() {
        let lock = lock();
        same_route::<flux_instantid::FluxInstantId>(&lock);
        same_route::<flux_pulid::FluxPulid>(&lock);
    }
}
