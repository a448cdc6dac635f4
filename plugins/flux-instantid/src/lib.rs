//! The `/flux-instantid` endpoint: a Flux scene with the identity of a reference face.
//!
//! InstantID's IP-Adapter and ControlNet are SDXL models; wired into Flux they fail
//! at run time (`mat1 and mat2 shapes cannot be multiplied (1x768 and 2816x1280)`).
//! So the graph has two stages that each run on the models they were made for:
//!
//! 1. **Scene (Flux.1-dev):** the `/flux-dev` text-to-image graph (cfg 1, FluxGuidance 3.5).
//! 2. **Identity (SDXL img2img):** an SDXL checkpoint, `ApplyInstantIDAdvanced` with
//!    `image` = the reference face (LoadImage of the upload) and `image_kps` = the
//!    stage-1 image (face pose), `VAEEncode` of the stage-1 image, `KSampler` at
//!    denoise 0.5 (dpmpp_2m/karras, the request's `cfg`), `VAEDecode`, `SaveImage`.
//!
//! The SDXL checkpoint: the first of [`SDXL_CHECKPOINTS`] on the volume, else the
//! alphabetically first checkpoint whose name contains `xl` and not `flux` or
//! `refiner` (an SD1.5 checkpoint would fail like Flux does, so "any non-flux
//! checkpoint" is not good enough).
//!
//! Several faces in the reference: InstantID's face analysis uses the largest. No face:
//! `ApplyInstantIDAdvanced` raises "Reference Image: No face detected." and the job answers
//! 422 naming `reference_image` (the reference handling is shared with `/flux-pulid`, see
//! `flowhost_sdk::identity`).
//!
//! Owns the request contract of `/flux-instantid` and the translation of InstantID's
//! "No face detected" failure into a 422. Never opens files: the reference image is
//! decoded here from a data URL or handed to the host as an inputs-volume path.

use flowhost_sdk::decode::{Checks, decode};
use flowhost_sdk::flux::{self, FluxSampling};
use flowhost_sdk::graph::Graph;
use flowhost_sdk::identity;
use flowhost_sdk::models::{describe_candidates, model_ref, pick_model, requirement};
use flowhost_sdk::{
    BuildError, ExecutionFailure, Host, Job, Manifest, ModelRef, OutputFormat, Plugin, Request,
    UserError, schema, seed_or_random,
};
use std::borrow::Cow;

use serde::Deserialize;
use serde_json::json;

pub const NAME: &str = "flux-instantid";
pub const ROUTE: &str = "/flux-instantid";
pub const ANALYTICS_PREFIX: &str = "modal_instantid";
/// The request field holding the reference face.
pub use flowhost_sdk::identity::REFERENCE_FIELD;

/// SDXL checkpoints for the identity stage, preferred first.
pub const SDXL_CHECKPOINTS: &[(&str, &str)] = &[
    ("checkpoints", "sd_xl_base_1.0.safetensors"),
    ("checkpoints", "sd_xl_base_1.0_0.9vae.safetensors"),
];
pub const INSTANTID_MODELS: &[(&str, &str)] = &[("instantid", "ip-adapter.bin")];
pub const INSTANTID_CONTROLNETS: &[(&str, &str)] = &[(
    "controlnet",
    "instantid/diffusion_pytorch_model.safetensors",
)];
/// InsightFace's antelopev2 (InstantIDFaceAnalysis loads it from `models/insightface`).
pub use flowhost_sdk::identity::{ANTELOPEV2_DETECTOR, ANTELOPEV2_RECOGNITION};

/// Stage-2 sampling: how much of the Flux scene is re-drawn.
pub const IDENTITY_DENOISE: f64 = 0.5;
pub const CFG_DEFAULT: f64 = 4.5;

const STAGE2_NODE_CLASSES: &[&str] = &[
    "CheckpointLoaderSimple",
    "InstantIDModelLoader",
    "InstantIDFaceAnalysis",
    "ControlNetLoader",
    "LoadImage",
    "ApplyInstantIDAdvanced",
    "VAEEncode",
    "SaveImage",
];

pub use flowhost_sdk::identity::FaceProvider;

/// The `/flux-instantid` request body.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FluxInstantIdRequest<'a> {
    pub prompt: String,
    /// Borrowed from the body when it has no escapes: a 10 MiB data URL is not copied.
    #[serde(borrow)]
    pub reference_image: Cow<'a, str>,
    #[serde(default)]
    pub negative_prompt: String,
    #[serde(default = "flux::default_size")]
    pub width: u32,
    #[serde(default = "flux::default_size")]
    pub height: u32,
    #[serde(default = "flux::default_steps")]
    pub steps: u32,
    #[serde(default = "default_cfg")]
    pub cfg: f64,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default = "default_strength")]
    pub instantid_strength: f64,
    #[serde(default = "default_strength")]
    pub controlnet_strength: f64,
    #[serde(default)]
    pub face_provider: FaceProvider,
}

fn default_cfg() -> f64 {
    CFG_DEFAULT
}

fn default_strength() -> f64 {
    0.8
}

/// The SDXL checkpoint for the identity stage (see the module doc).
pub fn pick_sdxl_checkpoint(host: &dyn Host) -> Option<ModelRef> {
    if let Some(preferred) = pick_model(host, SDXL_CHECKPOINTS) {
        return Some(preferred);
    }
    let mut names: Vec<String> = host
        .list_models("checkpoints")
        .into_iter()
        .map(|f| f.name)
        .filter(|name| {
            let lower = name.to_lowercase();
            lower.contains("xl") && !lower.contains("flux") && !lower.contains("refiner")
        })
        .collect();
    names.sort();
    names.first().map(|name| model_ref("checkpoints", name))
}

fn schema_properties() -> serde_json::Map<String, serde_json::Value> {
    let mut p = flux::schema_properties();
    p.remove("guidance");
    p.insert(
        "cfg".into(),
        json!({"type": "number", "minimum": flux::CFG_MIN, "maximum": flux::CFG_MAX, "default": CFG_DEFAULT,
               "description": "Classifier-free guidance of the SDXL identity stage (the Flux scene stage uses cfg 1 and guidance 3.5)."}),
    );
    p.insert(REFERENCE_FIELD.into(), identity::reference_schema());
    p.insert(
        "instantid_strength".into(),
        json!({"type": "number", "minimum": 0.0, "maximum": 1.0, "default": 0.8, "description": "Identity strength (InstantID ip_weight)."}),
    );
    p.insert(
        "controlnet_strength".into(),
        json!({"type": "number", "minimum": 0.0, "maximum": 1.0, "default": 0.8, "description": "Face-pose ControlNet strength (cn_strength)."}),
    );
    p.insert("face_provider".into(), identity::face_provider_schema());
    p
}

fn unavailable(what: &str, candidates: &[(&str, &str)]) -> BuildError {
    BuildError::Unavailable(format!(
        "{what} is missing from the model volume: {}",
        describe_candidates(candidates)
    ))
}

pub struct FluxInstantId;

impl Plugin for FluxInstantId {
    fn manifest() -> Manifest {
        let mut node_classes: Vec<String> =
            flux::NODE_CLASSES.iter().map(|c| c.to_string()).collect();
        for class in STAGE2_NODE_CLASSES {
            if !node_classes.iter().any(|c| c == class) {
                node_classes.push(class.to_string());
            }
        }
        let mut models = flux::flux_model_requirements();
        models.extend([
            requirement(
                "SDXL checkpoint (InstantID identity stage)",
                SDXL_CHECKPOINTS,
            ),
            requirement("InstantID IP-Adapter", INSTANTID_MODELS),
            requirement("InstantID ControlNet", INSTANTID_CONTROLNETS),
            requirement("InsightFace antelopev2 face detector", ANTELOPEV2_DETECTOR),
            requirement(
                "InsightFace antelopev2 face recognition",
                ANTELOPEV2_RECOGNITION,
            ),
        ]);
        Manifest {
            name: NAME.into(),
            version: env!("CARGO_PKG_VERSION").into(),
            route: ROUTE.into(),
            summary: "A Flux.1-dev scene with the identity of a reference face (InstantID on SDXL)"
                .into(),
            request_schema: schema::strict_object(
                &["prompt", REFERENCE_FIELD],
                schema_properties(),
            )
            .to_string(),
            response_media_types: vec!["image/jpeg".into()],
            analytics_prefix: ANALYTICS_PREFIX.into(),
            node_classes,
            models,
            // No warm-up: the graph needs a photo with a face, and a bundled
            // face image is not worth its bytes; flux-dev's warm-up loads the
            // Flux stage.
            warm_up: None,
        }
    }

    fn build(request: &Request, host: &dyn Host) -> Result<Job, BuildError> {
        let body: FluxInstantIdRequest<'_> = decode(&request.body)?;
        let seed = seed_or_random(body.seed, request);
        let scene = FluxSampling {
            prompt: &body.prompt,
            negative_prompt: &body.negative_prompt,
            width: body.width,
            height: body.height,
            steps: body.steps,
            cfg: flux::CFG_DEFAULT,
            guidance: flux::GUIDANCE_DEFAULT,
            seed,
        };
        let mut checks = Checks::new();
        flux::check_sampling(&mut checks, &scene);
        checks
            .range("cfg", body.cfg, flux::CFG_MIN, flux::CFG_MAX)
            .range("instantid_strength", body.instantid_strength, 0.0, 1.0)
            .range("controlnet_strength", body.controlnet_strength, 0.0, 1.0);
        let reference = identity::parse_reference(&mut checks, &body.reference_image);
        checks.finish()?;
        let reference = reference
            .ok_or_else(|| BuildError::Internal("reference image checked but absent".into()))?;

        let flux_models = flux::pick_flux_models(host)?;
        let sdxl = pick_sdxl_checkpoint(host).ok_or_else(|| {
            BuildError::Unavailable(format!(
                "no SDXL checkpoint for the InstantID identity stage: put {} (or another SDXL checkpoint with `xl` in its name) in checkpoints/",
                describe_candidates(&SDXL_CHECKPOINTS[..1])
            ))
        })?;
        let instantid = pick_model(host, INSTANTID_MODELS)
            .ok_or_else(|| unavailable("the InstantID IP-Adapter", INSTANTID_MODELS))?;
        let controlnet = pick_model(host, INSTANTID_CONTROLNETS)
            .ok_or_else(|| unavailable("the InstantID ControlNet", INSTANTID_CONTROLNETS))?;

        let mut g = Graph::new();
        // Stage 1: the Flux scene.
        let loaders = flux::add_loaders(&mut g, &flux_models);
        let scene_image = flux::add_text_to_image(&mut g, &loaders, &scene);

        // Stage 2: identity on SDXL, img2img over the scene.
        let ckpt = g.node("CheckpointLoaderSimple", json!({"ckpt_name": sdxl.name}));
        let positive = g.node(
            "CLIPTextEncode",
            json!({"text": body.prompt, "clip": ckpt.out(1)}),
        );
        let negative = g.node(
            "CLIPTextEncode",
            json!({"text": body.negative_prompt, "clip": ckpt.out(1)}),
        );
        let instantid = g.node(
            "InstantIDModelLoader",
            json!({"instantid_file": instantid.name}),
        );
        let face_analysis = g.node(
            "InstantIDFaceAnalysis",
            json!({"provider": body.face_provider.node_value()}),
        );
        let controlnet = g.node(
            "ControlNetLoader",
            json!({"control_net_name": controlnet.name}),
        );
        // The host uploads the reference and writes its name into `image`.
        let (reference_image, upload) = identity::add_reference(&mut g, reference);
        let apply = g.node(
            "ApplyInstantIDAdvanced",
            json!({
                "instantid": instantid.out(0),
                "insightface": face_analysis.out(0),
                "control_net": controlnet.out(0),
                "image": reference_image,
                "model": ckpt.out(0),
                "positive": positive.out(0),
                "negative": negative.out(0),
                "ip_weight": body.instantid_strength,
                "cn_strength": body.controlnet_strength,
                "start_at": 0.0,
                "end_at": 1.0,
                "noise": 0.0,
                "combine_embeds": "average",
                "image_kps": scene_image,
            }),
        );
        let scene_latent = g.node(
            "VAEEncode",
            json!({"pixels": scene_image, "vae": ckpt.out(2)}),
        );
        let sampler = g.node(
            "KSampler",
            json!({
                "model": apply.out(0),
                "seed": seed,
                "steps": body.steps,
                "cfg": body.cfg,
                "sampler_name": "dpmpp_2m",
                "scheduler": "karras",
                "positive": apply.out(1),
                "negative": apply.out(2),
                "latent_image": scene_latent.out(0),
                "denoise": IDENTITY_DENOISE,
            }),
        );
        let decoded = g.node(
            "VAEDecode",
            json!({"samples": sampler.out(0), "vae": ckpt.out(2)}),
        );
        let save = g.node(
            "SaveImage",
            json!({"images": decoded.out(0), "filename_prefix": NAME}),
        );

        let analytics = json!({
            "workflow_type": "flux-instantid",
            "prompt_length": body.prompt.chars().count(),
            "instantid_strength": body.instantid_strength,
            "controlnet_strength": body.controlnet_strength,
            "face_provider": body.face_provider.as_str(),
        });
        Ok(Job {
            workflow: g.to_json_string(),
            uploads: vec![upload],
            outputs: vec![save.into()],
            output_format: OutputFormat::Jpeg,
            seed: Some(seed),
            analytics: analytics.to_string(),
            caller_nodes: vec![],
            models: g.model_set(),
            progress: g.sampler_progress(),
            fetches: vec![],
        })
    }

    fn explain_failure(failure: &ExecutionFailure) -> Option<UserError> {
        let from_instantid = failure.node_type.contains("InstantID");
        let no_face = failure
            .exception_message
            .to_lowercase()
            .contains("no face detected");
        (from_instantid && no_face).then(identity::no_face_error)
    }
}

flowhost_sdk::register!(FluxInstantId);

#[cfg(test)]
mod tests {
    use super::*;
    use flowhost_sdk::ImageSource;
    use flowhost_sdk::host::FakeHost;
    use flowhost_sdk::testing::{self, invalid_fields, nodes_of, the_node, workflow as graph};
    use flowhost_sdk::image::DEFAULT_MAX_IMAGE_BYTES;
    use flowhost_sdk::image::samples::{data_url, jpeg_header, png_header};
    use serde_json::Value;

    fn volume() -> FakeHost {
        FakeHost::new().with_flux_dev_models()
            .with_model("checkpoints", "flux1-dev-fp8.safetensors", 10)
            .with_model("checkpoints", "sd_xl_base_1.0.safetensors", 10)
            .with_model("instantid", "ip-adapter.bin", 10)
            .with_model(
                "controlnet",
                "instantid/diffusion_pytorch_model.safetensors",
                10,
            )
    }

    fn face() -> String {
        data_url("image/png", &png_header(512, 512))
    }

    fn build_on(host: &FakeHost, body: Value) -> Result<Job, BuildError> {
        FluxInstantId::build(&testing::request(&body, 99), host)
    }

    fn build(body: Value) -> Result<Job, BuildError> {
        build_on(&volume(), body)
    }


    fn nodes<'a>(g: &'a Value, class: &str) -> Vec<(&'a String, &'a Value)> {
        nodes_of(g, class)
    }

    fn node<'a>(g: &'a Value, class: &str) -> (&'a String, &'a Value) {
        the_node(g, class)
    }


    #[test]
    fn two_stages_flux_scene_then_sdxl_identity() {
        let job =
            build(json!({"prompt": "an astronaut on mars", "reference_image": face()})).unwrap();
        let g = graph(&job);
        let (_, apply) = node(&g, "ApplyInstantIDAdvanced");
        let a = &apply["inputs"];
        // The InstantID model is the SDXL checkpoint, never the Flux UNet.
        let model_id = a["model"][0].as_str().unwrap();
        assert_eq!(
            g[model_id]["inputs"]["ckpt_name"],
            "sd_xl_base_1.0.safetensors"
        );
        // image = the reference upload; image_kps = the decoded Flux scene.
        let (load_id, _) = node(&g, "LoadImage");
        assert_eq!(a["image"], json!([load_id, 0]));
        let kps = a["image_kps"][0].as_str().unwrap();
        assert_eq!(g[kps]["class_type"], "VAEDecode");
        let flux_sampler = g[kps]["inputs"]["samples"][0].as_str().unwrap();
        let flux_model = g[flux_sampler]["inputs"]["model"][0].as_str().unwrap();
        assert_eq!(g[flux_model]["class_type"], "UNETLoader");
        assert_eq!(g[flux_sampler]["inputs"]["denoise"], 1.0);
        // The identity sampler starts from the encoded scene at partial denoise.
        let samplers = nodes(&g, "KSampler");
        assert_eq!(samplers.len(), 2);
        let (_, identity) = samplers
            .iter()
            .find(|(_, n)| n["inputs"]["denoise"] == IDENTITY_DENOISE)
            .unwrap();
        let latent = identity["inputs"]["latent_image"][0].as_str().unwrap();
        assert_eq!(g[latent]["class_type"], "VAEEncode");
        assert_eq!(g[latent]["inputs"]["pixels"], json!([kps, 0]));
        assert_eq!(identity["inputs"]["positive"][1], 1);
        assert_eq!(identity["inputs"]["negative"][1], 2);
        assert_eq!(identity["inputs"]["cfg"], CFG_DEFAULT);
        // Only the final image is saved.
        let (save_id, save) = node(&g, "SaveImage");
        assert_eq!(job.outputs, vec![save_id.clone()]);
        let final_decode = save["inputs"]["images"][0].as_str().unwrap();
        assert_eq!(
            g[final_decode]["inputs"]["samples"][0].as_str(),
            Some(
                samplers
                    .iter()
                    .find(|(_, n)| n["inputs"]["denoise"] == IDENTITY_DENOISE)
                    .unwrap()
                    .0
                    .as_str()
            )
        );
    }

    #[test]
    fn the_reference_upload_targets_the_load_image_node() {
        let job = build(json!({"prompt": "p", "reference_image": data_url("image/jpeg", &jpeg_header(300, 400))})).unwrap();
        let g = graph(&job);
        let (load_id, _) = node(&g, "LoadImage");
        assert_eq!(job.uploads.len(), 1);
        let u = &job.uploads[0];
        assert_eq!(
            (
                u.field.as_str(),
                u.node_id.as_str(),
                u.input_name.as_str(),
                u.filename.as_str()
            ),
            (
                "reference_image",
                load_id.as_str(),
                "image",
                "reference.jpg"
            )
        );
        assert!(matches!(&u.source, ImageSource::Bytes(b) if b.starts_with(&[0xFF, 0xD8])));
    }

    #[test]
    fn an_input_volume_path_is_left_to_the_host() {
        let job = build(json!({"prompt": "p", "reference_image": "faces/alice.png"})).unwrap();
        assert_eq!(
            job.uploads[0].source,
            ImageSource::InputPath("faces/alice.png".into())
        );
    }

    #[test]
    fn a_reference_image_url_is_fetched_by_the_host() {
        let job = build(json!({"prompt": "p", "reference_image": "https://example.com/face.png"})).unwrap();
        assert!(matches!(&job.uploads[0].source, ImageSource::File(f) if f.source == flowhost_sdk::FileSource::Url("https://example.com/face.png".into())));
        assert_eq!(job.uploads[0].field, "reference_image");
    }

    #[test]
    fn bad_reference_images_name_the_field() {
        for bad in [
            "data:image/gif;base64,R0lGODlhAQABAAAAACw=".to_string(),
            data_url("image/png", b"definitely not a png"),
            data_url("image/jpeg", &png_header(8, 8)),
            "../../etc/passwd".to_string(),
            "/abs/face.png".to_string(),
            "ftp://example.com/face.png".to_string(),
        ] {
            assert_eq!(
                invalid_fields(build(json!({"prompt": "p", "reference_image": bad}))),
                vec!["reference_image"],
                "{bad}"
            );
        }
        assert_eq!(
            invalid_fields(build(json!({"prompt": "p"}))),
            vec!["reference_image"]
        );
    }

    #[test]
    fn an_oversized_reference_image_is_refused() {
        let mut big = png_header(64, 64);
        big.resize(DEFAULT_MAX_IMAGE_BYTES + 1, 0);
        let error = invalid_fields(build(
            json!({"prompt": "p", "reference_image": data_url("image/png", &big)}),
        ));
        assert_eq!(error, vec!["reference_image"]);
        let mut fits = png_header(64, 64);
        fits.resize(DEFAULT_MAX_IMAGE_BYTES, 0);
        assert!(
            build(json!({"prompt": "p", "reference_image": data_url("image/png", &fits)})).is_ok()
        );
    }

    #[test]
    fn strengths_map_to_ip_weight_and_cn_strength_with_inclusive_edges() {
        for (iid, cn) in [(0.0, 1.0), (1.0, 0.0), (0.8, 0.8)] {
            let job = build(json!({"prompt": "p", "reference_image": face(), "instantid_strength": iid, "controlnet_strength": cn})).unwrap();
            let g = graph(&job);
            let a = &node(&g, "ApplyInstantIDAdvanced").1["inputs"];
            assert_eq!(
                (a["ip_weight"].as_f64(), a["cn_strength"].as_f64()),
                (Some(iid), Some(cn))
            );
        }
        for field in ["instantid_strength", "controlnet_strength"] {
            for bad in [-0.01, 1.01] {
                let mut body = json!({"prompt": "p", "reference_image": face()});
                body[field] = json!(bad);
                assert_eq!(invalid_fields(build(body)), vec![field]);
            }
        }
    }

    #[test]
    fn face_providers_map_gpu_to_cuda() {
        for (given, node_value) in [("CPU", "CPU"), ("GPU", "CUDA"), ("CUDA", "CUDA")] {
            let job =
                build(json!({"prompt": "p", "reference_image": face(), "face_provider": given}))
                    .unwrap();
            let g = graph(&job);
            assert_eq!(
                node(&g, "InstantIDFaceAnalysis").1["inputs"]["provider"],
                node_value
            );
            let a: Value = serde_json::from_str(&job.analytics).unwrap();
            assert_eq!(a["face_provider"], given);
        }
        let g = graph(&build(json!({"prompt": "p", "reference_image": face()})).unwrap());
        assert_eq!(
            node(&g, "InstantIDFaceAnalysis").1["inputs"]["provider"],
            "CPU"
        );
        assert_eq!(
            invalid_fields(build(
                json!({"prompt": "p", "reference_image": face(), "face_provider": "TPU"})
            )),
            vec!["face_provider"]
        );
        assert_eq!(
            invalid_fields(build(
                json!({"prompt": "p", "reference_image": face(), "face_provider": "cpu"})
            )),
            vec!["face_provider"]
        );
    }

    #[test]
    fn flux_fields_keep_their_ranges_and_guidance_is_not_a_field() {
        assert!(build(json!({"prompt": "p", "reference_image": face(), "width": 256, "height": 2048, "steps": 1, "cfg": 0.0})).is_ok());
        assert!(
            build(json!({"prompt": "p", "reference_image": face(), "steps": 100, "cfg": 30.0}))
                .is_ok()
        );
        assert_eq!(
            invalid_fields(build(
                json!({"prompt": "p", "reference_image": face(), "width": 2064})
            )),
            vec!["width"]
        );
        assert_eq!(
            invalid_fields(build(
                json!({"prompt": "p", "reference_image": face(), "cfg": 30.5})
            )),
            vec!["cfg"]
        );
        assert_eq!(
            invalid_fields(build(
                json!({"prompt": "p", "reference_image": face(), "guidance": 3.5})
            )),
            vec!["guidance"]
        );
        assert_eq!(
            invalid_fields(build(
                json!({"prompt": "", "reference_image": "x/../y.png"})
            )),
            vec!["prompt", "reference_image"]
        );
    }

    #[test]
    fn the_seed_drives_both_samplers_and_is_returned() {
        let job =
            build(json!({"prompt": "p", "reference_image": face(), "seed": u64::MAX})).unwrap();
        assert_eq!(job.seed, Some(u64::MAX));
        for (_, ks) in nodes(&graph(&job), "KSampler") {
            assert_eq!(ks["inputs"]["seed"].as_u64(), Some(u64::MAX));
        }
        assert_eq!(
            build(json!({"prompt": "p", "reference_image": face()}))
                .unwrap()
                .seed,
            Some(99)
        );
    }

    #[test]
    fn sdxl_checkpoint_choice() {
        let host = |names: &[&str]| {
            names
                .iter()
                .fold(FakeHost::new(), |h, n| h.with_model("checkpoints", n, 1))
        };
        assert_eq!(
            pick_sdxl_checkpoint(&host(&[
                "juggernautXL_v9.safetensors",
                "sd_xl_base_1.0.safetensors"
            ]))
            .unwrap()
            .name,
            "sd_xl_base_1.0.safetensors"
        );
        assert_eq!(
            pick_sdxl_checkpoint(&host(&[
                "zz_XL.safetensors",
                "juggernautXL_v9.safetensors",
                "flux1-dev-fp8.safetensors"
            ]))
            .unwrap()
            .name,
            "juggernautXL_v9.safetensors"
        );
        assert_eq!(
            pick_sdxl_checkpoint(&host(&[
                "flux1-dev-fp8.safetensors",
                "garbage.safetensors",
                "sd_xl_refiner_1.0.safetensors",
                "v1-5-pruned.safetensors"
            ])),
            None
        );
    }

    #[test]
    fn missing_models_are_unavailable_naming_them() {
        let without = |folder: &str| {
            let mut host = FakeHost::new();
            for (f, n) in [
                ("diffusion_models", "flux1-dev.safetensors"),
                ("text_encoders", "clip_l.safetensors"),
                ("text_encoders", "t5xxl_fp16.safetensors"),
                ("vae", "ae.safetensors"),
                ("checkpoints", "sd_xl_base_1.0.safetensors"),
                ("instantid", "ip-adapter.bin"),
                (
                    "controlnet",
                    "instantid/diffusion_pytorch_model.safetensors",
                ),
            ] {
                if f != folder {
                    host = host.with_model(f, n, 1);
                }
            }
            match build_on(&host, json!({"prompt": "p", "reference_image": face()})) {
                Err(BuildError::Unavailable(message)) => message,
                other => panic!("expected Unavailable without {folder}, got {other:?}"),
            }
        };
        assert!(without("checkpoints").contains("checkpoints/sd_xl_base_1.0.safetensors"));
        assert!(without("instantid").contains("instantid/ip-adapter.bin"));
        assert!(
            without("controlnet")
                .contains("controlnet/instantid/diffusion_pytorch_model.safetensors")
        );
        assert!(without("vae").contains("vae/ae.safetensors"));
    }

    #[test]
    fn no_face_detected_becomes_a_422_naming_reference_image() {
        let failure = ExecutionFailure {
            node_id: "17".into(),
            node_type: "ApplyInstantIDAdvanced".into(),
            exception_type: "Exception".into(),
            exception_message: "Reference Image: No face detected.".into(),
        };
        let error = FluxInstantId::explain_failure(&failure).unwrap();
        assert_eq!(error.status, 422);
        assert_eq!(error.field.as_deref(), Some("reference_image"));
        let other = ExecutionFailure {
            exception_message: "CUDA out of memory".into(),
            ..failure.clone()
        };
        assert_eq!(FluxInstantId::explain_failure(&other), None);
        let elsewhere = ExecutionFailure {
            node_type: "VAELoader".into(),
            ..failure
        };
        assert_eq!(FluxInstantId::explain_failure(&elsewhere), None);
    }

    #[test]
    fn the_manifest_declares_every_class_used_and_the_instantid_models() {
        let m = FluxInstantId::manifest();
        assert_eq!(
            (m.route.as_str(), m.analytics_prefix.as_str()),
            ("/flux-instantid", "modal_instantid")
        );
        let g = graph(&build(json!({"prompt": "p", "reference_image": face()})).unwrap());
        for n in g.as_object().unwrap().values() {
            assert!(
                m.node_classes
                    .iter()
                    .any(|c| c == n["class_type"].as_str().unwrap()),
                "{}",
                n["class_type"]
            );
        }
        for folder in ["instantid", "controlnet", "checkpoints", "insightface"] {
            assert!(
                m.models
                    .iter()
                    .any(|r| r.any_of.iter().all(|x| x.folder == folder)),
                "{folder}"
            );
        }
        let s: Value = serde_json::from_str(&m.request_schema).unwrap();
        assert_eq!(s["required"], json!(["prompt", "reference_image"]));
        assert_eq!(
            s["properties"]["face_provider"]["enum"],
            json!(["CPU", "GPU", "CUDA"])
        );
        assert!(s["properties"].get("guidance").is_none());
    }

    #[test]
    fn analytics_carry_the_documented_properties() {
        let job =
            build(json!({"prompt": "abc", "reference_image": face(), "instantid_strength": 0.5}))
                .unwrap();
        let a: Value = serde_json::from_str(&job.analytics).unwrap();
        assert_eq!(
            a,
            json!({"workflow_type": "flux-instantid", "prompt_length": 3, "instantid_strength": 0.5, "controlnet_strength": 0.8, "face_provider": "CPU"})
        );
    }
}
