//! The Flux.1-dev text-to-image recipe shared by the Flux endpoints: which model
//! files to use (picked from the volume), the loader nodes, the sampling chain, and
//! the request fields every Flux endpoint has (schema + checks from one set of
//! constants, so schema and plugin can never disagree).
//!
//! Model choice (documented in `docs/write-a-plugin.md`): separate loaders
//! (`UNETLoader` + `DualCLIPLoader(type flux)` + `VAELoader`) when the diffusion model,
//! both text encoders and the VAE are present; otherwise the all-in-one
//! `checkpoints/flux1-dev-fp8.safetensors` through `CheckpointLoaderSimple`
//! (it carries CLIP-L, T5 and the VAE). Never mixes the two.
//!
//! This module only builds graph pieces; it never decides routes or analytics.

use serde_json::{Map, Value, json};

use crate::decode::Checks;
use crate::graph::{Graph, Link};
use crate::models::{describe_candidates, pick_model, requirement};
use crate::schema::NOT_BLANK;
use crate::{BuildError, Host, ModelRef, ModelRequirement};

/// Diffusion models for `UNETLoader`, preferred first.
pub const DIFFUSION_MODELS: &[(&str, &str)] = &[
    ("diffusion_models", "flux1-dev.safetensors"),
    ("diffusion_models", "flux1-dev-fp8.safetensors"),
];
/// CLIP-L text encoders (`clip` is ComfyUI's legacy name of `text_encoders`).
pub const CLIP_L: &[(&str, &str)] = &[
    ("text_encoders", "clip_l.safetensors"),
    ("clip", "clip_l.safetensors"),
];
/// T5-XXL text encoders, fp16 preferred over fp8.
pub const T5XXL: &[(&str, &str)] = &[
    ("text_encoders", "t5xxl_fp16.safetensors"),
    ("text_encoders", "t5xxl_fp8_e4m3fn.safetensors"),
    ("text_encoders", "t5xxl_fp8_e4m3fn_scaled.safetensors"),
    ("clip", "t5xxl_fp16.safetensors"),
    ("clip", "t5xxl_fp8_e4m3fn.safetensors"),
    ("clip", "t5xxl_fp8_e4m3fn_scaled.safetensors"),
];
/// The Flux autoencoder.
pub const VAE: &[(&str, &str)] = &[("vae", "ae.safetensors")];
/// All-in-one checkpoints (diffusion model + CLIP-L + T5 + VAE) for `CheckpointLoaderSimple`.
pub const ALL_IN_ONE: &[(&str, &str)] = &[("checkpoints", "flux1-dev-fp8.safetensors")];

/// Node classes the Flux text-to-image graphs may use (both loader variants).
pub const NODE_CLASSES: &[&str] = &[
    "UNETLoader",
    "DualCLIPLoader",
    "VAELoader",
    "CheckpointLoaderSimple",
    "CLIPTextEncode",
    "FluxGuidance",
    "EmptySD3LatentImage",
    "KSampler",
    "VAEDecode",
];

/// Request field limits shared by the Flux endpoints.
pub const PROMPT_MAX_CHARS: usize = 10_000;
pub const SIZE_MIN: u32 = 256;
pub const SIZE_MAX: u32 = 2048;
pub const SIZE_STEP: u32 = 16;
pub const SIZE_DEFAULT: u32 = 1024;
pub const STEPS_MIN: u32 = 1;
pub const STEPS_MAX: u32 = 100;
pub const STEPS_DEFAULT: u32 = 20;
pub const CFG_MIN: f64 = 0.0;
pub const CFG_MAX: f64 = 30.0;
pub const CFG_DEFAULT: f64 = 1.0;
pub const GUIDANCE_MIN: f64 = 0.0;
pub const GUIDANCE_MAX: f64 = 100.0;
pub const GUIDANCE_DEFAULT: f64 = 3.5;

/// The model files a Flux graph loads.
#[derive(Debug, Clone, PartialEq)]
pub enum FluxModels {
    Separate {
        diffusion_model: ModelRef,
        clip_l: ModelRef,
        t5xxl: ModelRef,
        vae: ModelRef,
    },
    AllInOne {
        checkpoint: ModelRef,
    },
}

impl FluxModels {
    /// The file names for analytics/logs (`diffusion_models/flux1-dev.safetensors`, ...).
    pub fn describe(&self) -> String {
        let path = |m: &ModelRef| format!("{}/{}", m.folder, m.name);
        match self {
            FluxModels::Separate {
                diffusion_model,
                clip_l,
                t5xxl,
                vae,
            } => {
                format!(
                    "{} + {} + {} + {}",
                    path(diffusion_model),
                    path(clip_l),
                    path(t5xxl),
                    path(vae)
                )
            }
            FluxModels::AllInOne { checkpoint } => path(checkpoint),
        }
    }
}

/// Pick the Flux files from the volume (see the module doc for the rule).
/// Nothing usable → `Unavailable` naming every missing file.
pub fn pick_flux_models(host: &dyn Host) -> Result<FluxModels, BuildError> {
    let diffusion_model = pick_model(host, DIFFUSION_MODELS);
    let clip_l = pick_model(host, CLIP_L);
    let t5xxl = pick_model(host, T5XXL);
    let vae = pick_model(host, VAE);
    if let (Some(diffusion_model), Some(clip_l), Some(t5xxl), Some(vae)) = (
        diffusion_model.clone(),
        clip_l.clone(),
        t5xxl.clone(),
        vae.clone(),
    ) {
        return Ok(FluxModels::Separate {
            diffusion_model,
            clip_l,
            t5xxl,
            vae,
        });
    }
    if let Some(checkpoint) = pick_model(host, ALL_IN_ONE) {
        return Ok(FluxModels::AllInOne { checkpoint });
    }
    let missing: Vec<String> = [
        (
            "the Flux diffusion model",
            diffusion_model.is_none(),
            DIFFUSION_MODELS,
        ),
        ("the CLIP-L text encoder", clip_l.is_none(), CLIP_L),
        ("the T5-XXL text encoder", t5xxl.is_none(), &T5XXL[..3]),
        ("the Flux VAE", vae.is_none(), VAE),
    ]
    .into_iter()
    .filter(|(_, is_missing, _)| *is_missing)
    .map(|(what, _, candidates)| format!("{what} ({})", describe_candidates(candidates)))
    .collect();
    Err(BuildError::Unavailable(format!(
        "Flux.1-dev model files are missing from the model volume: {}; alternatively provide the all-in-one {}",
        missing.join(", "),
        describe_candidates(ALL_IN_ONE)
    )))
}

/// The manifest's model requirements for a Flux graph. Each is also met by the
/// all-in-one checkpoint.
pub fn flux_model_requirements() -> Vec<ModelRequirement> {
    let with_all_in_one = |candidates: &[(&'static str, &'static str)]| {
        let mut all = candidates.to_vec();
        all.extend_from_slice(ALL_IN_ONE);
        all
    };
    vec![
        requirement(
            "Flux.1-dev diffusion model",
            &with_all_in_one(DIFFUSION_MODELS),
        ),
        requirement("CLIP-L text encoder", &with_all_in_one(CLIP_L)),
        requirement("T5-XXL text encoder", &with_all_in_one(T5XXL)),
        requirement("Flux VAE", &with_all_in_one(VAE)),
    ]
}

/// The outputs of the loader nodes.
#[derive(Debug, Clone)]
pub struct FluxLoaders {
    pub model: Link,
    pub clip: Link,
    pub vae: Link,
}

/// Add the loader nodes for `models`.
pub fn add_loaders(g: &mut Graph, models: &FluxModels) -> FluxLoaders {
    match models {
        FluxModels::Separate {
            diffusion_model,
            clip_l,
            t5xxl,
            vae,
        } => {
            let unet = g.node(
                "UNETLoader",
                json!({"unet_name": diffusion_model.name, "weight_dtype": "default"}),
            );
            let clip = g.node(
                "DualCLIPLoader",
                json!({"clip_name1": clip_l.name, "clip_name2": t5xxl.name, "type": "flux"}),
            );
            let vae = g.node("VAELoader", json!({"vae_name": vae.name}));
            FluxLoaders {
                model: unet.out(0),
                clip: clip.out(0),
                vae: vae.out(0),
            }
        }
        FluxModels::AllInOne { checkpoint } => {
            let ckpt = g.node(
                "CheckpointLoaderSimple",
                json!({"ckpt_name": checkpoint.name}),
            );
            FluxLoaders {
                model: ckpt.out(0),
                clip: ckpt.out(1),
                vae: ckpt.out(2),
            }
        }
    }
}

/// Sampling settings of one Flux text-to-image pass.
#[derive(Debug, Clone, PartialEq)]
pub struct FluxSampling<'a> {
    pub prompt: &'a str,
    pub negative_prompt: &'a str,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub cfg: f64,
    pub guidance: f64,
    pub seed: u64,
}

/// Add the text encoders, `FluxGuidance`, the empty latent, `KSampler`
/// (euler/simple, full denoise) and `VAEDecode`. Returns the decoded IMAGE.
pub fn add_text_to_image(g: &mut Graph, loaders: &FluxLoaders, s: &FluxSampling<'_>) -> Link {
    let positive = g.node(
        "CLIPTextEncode",
        json!({"text": s.prompt, "clip": loaders.clip}),
    );
    let guided = g.node(
        "FluxGuidance",
        json!({"conditioning": positive.out(0), "guidance": s.guidance}),
    );
    let negative = g.node(
        "CLIPTextEncode",
        json!({"text": s.negative_prompt, "clip": loaders.clip}),
    );
    let latent = g.node(
        "EmptySD3LatentImage",
        json!({"width": s.width, "height": s.height, "batch_size": 1}),
    );
    let sampler = g.node(
        "KSampler",
        json!({
            "model": loaders.model,
            "seed": s.seed,
            "steps": s.steps,
            "cfg": s.cfg,
            "sampler_name": "euler",
            "scheduler": "simple",
            "positive": guided.out(0),
            "negative": negative.out(0),
            "latent_image": latent.out(0),
            "denoise": 1.0,
        }),
    );
    let decoded = g.node(
        "VAEDecode",
        json!({"samples": sampler.out(0), "vae": loaders.vae}),
    );
    decoded.out(0)
}

/// JSON Schema properties of the common Flux fields (`prompt`, `negative_prompt`,
/// `width`, `height`, `steps`, `cfg`, `seed`, `guidance`), in that order.
pub fn schema_properties() -> Map<String, Value> {
    let size = |what: &str| {
        json!({
            "type": "integer", "minimum": SIZE_MIN, "maximum": SIZE_MAX, "multipleOf": SIZE_STEP,
            "default": SIZE_DEFAULT,
            "description": format!("Image {what} in pixels, a multiple of {SIZE_STEP}.")
        })
    };
    let mut p = Map::new();
    p.insert(
        "prompt".into(),
        json!({"type": "string", "minLength": 1, "maxLength": PROMPT_MAX_CHARS, "pattern": NOT_BLANK, "description": "What the image shows."}),
    );
    p.insert(
        "negative_prompt".into(),
        json!({"type": "string", "maxLength": PROMPT_MAX_CHARS, "default": "", "description": "What the image should not show (weak with Flux at cfg 1)."}),
    );
    p.insert("width".into(), size("width"));
    p.insert("height".into(), size("height"));
    p.insert(
        "steps".into(),
        json!({"type": "integer", "minimum": STEPS_MIN, "maximum": STEPS_MAX, "default": STEPS_DEFAULT, "description": "Sampling steps."}),
    );
    p.insert(
        "cfg".into(),
        json!({"type": "number", "minimum": CFG_MIN, "maximum": CFG_MAX, "default": CFG_DEFAULT, "description": "Classifier-free guidance scale of the sampler (Flux.1-dev is distilled: keep 1.0 and use `guidance`)."}),
    );
    p.insert("seed".into(), crate::seed_schema());
    p.insert(
        "guidance".into(),
        json!({"type": "number", "minimum": GUIDANCE_MIN, "maximum": GUIDANCE_MAX, "default": GUIDANCE_DEFAULT, "description": "Flux distilled guidance (FluxGuidance node)."}),
    );
    p
}

/// Check the common Flux fields (the same limits as [`schema_properties`]).
pub fn check_sampling(checks: &mut Checks, s: &FluxSampling<'_>) {
    checks
        .non_empty("prompt", s.prompt)
        .max_chars("prompt", s.prompt, PROMPT_MAX_CHARS)
        .max_chars("negative_prompt", s.negative_prompt, PROMPT_MAX_CHARS);
    check_size(checks, "width", s.width);
    check_size(checks, "height", s.height);
    checks
        .range("steps", s.steps, STEPS_MIN, STEPS_MAX)
        .range("cfg", s.cfg, CFG_MIN, CFG_MAX)
        .range("guidance", s.guidance, GUIDANCE_MIN, GUIDANCE_MAX);
}

/// A width/height: in range and a multiple of [`SIZE_STEP`].
pub fn check_size(checks: &mut Checks, field: &str, value: u32) {
    checks.range(field, value, SIZE_MIN, SIZE_MAX).multiple_of(
        field,
        u64::from(value),
        u64::from(SIZE_STEP),
    );
}

pub fn default_size() -> u32 {
    SIZE_DEFAULT
}
pub fn default_steps() -> u32 {
    STEPS_DEFAULT
}
pub fn default_cfg() -> f64 {
    CFG_DEFAULT
}
pub fn default_guidance() -> f64 {
    GUIDANCE_DEFAULT
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::FakeHost;

    fn full_volume() -> FakeHost {
        FakeHost::new()
            .with_model("diffusion_models", "flux1-dev.safetensors", 1)
            .with_model("text_encoders", "clip_l.safetensors", 1)
            .with_model("text_encoders", "t5xxl_fp16.safetensors", 1)
            .with_model("vae", "ae.safetensors", 1)
    }

    #[test]
    fn separate_files_are_preferred() {
        let host = full_volume().with_model("checkpoints", "flux1-dev-fp8.safetensors", 1);
        let models = pick_flux_models(&host).unwrap();
        assert!(
            matches!(models, FluxModels::Separate { ref t5xxl, .. } if t5xxl.name == "t5xxl_fp16.safetensors")
        );
    }

    #[test]
    fn fp8_files_and_the_legacy_clip_folder_are_used() {
        let host = FakeHost::new()
            .with_model("diffusion_models", "flux1-dev-fp8.safetensors", 1)
            .with_model("clip", "clip_l.safetensors", 1)
            .with_model("clip", "t5xxl_fp8_e4m3fn.safetensors", 1)
            .with_model("vae", "ae.safetensors", 1);
        assert_eq!(
            pick_flux_models(&host).unwrap().describe(),
            "diffusion_models/flux1-dev-fp8.safetensors + clip/clip_l.safetensors + clip/t5xxl_fp8_e4m3fn.safetensors + vae/ae.safetensors"
        );
    }

    #[test]
    fn an_incomplete_set_falls_back_to_the_all_in_one_checkpoint() {
        let host = FakeHost::new()
            .with_model("diffusion_models", "flux1-dev.safetensors", 1)
            .with_model("checkpoints", "flux1-dev-fp8.safetensors", 1);
        assert!(matches!(
            pick_flux_models(&host).unwrap(),
            FluxModels::AllInOne { .. }
        ));
    }

    #[test]
    fn nothing_usable_is_unavailable_naming_what_is_missing() {
        let host = FakeHost::new().with_model("diffusion_models", "flux1-dev.safetensors", 1);
        let Err(BuildError::Unavailable(message)) = pick_flux_models(&host) else {
            panic!("expected Unavailable")
        };
        assert!(message.contains("vae/ae.safetensors"), "{message}");
        assert!(
            message.contains("text_encoders/clip_l.safetensors"),
            "{message}"
        );
        assert!(message.contains("t5xxl_fp16"), "{message}");
        assert!(
            !message.contains("the Flux diffusion model"),
            "present files are not listed as missing: {message}"
        );
        assert!(
            message.contains("checkpoints/flux1-dev-fp8.safetensors"),
            "{message}"
        );
    }

    #[test]
    fn the_all_in_one_graph_takes_clip_and_vae_from_the_checkpoint() {
        let mut g = Graph::new();
        let loaders = add_loaders(
            &mut g,
            &FluxModels::AllInOne {
                checkpoint: crate::models::model_ref("checkpoints", "flux1-dev-fp8.safetensors"),
            },
        );
        assert_eq!(
            (
                loaders.model.output,
                loaders.clip.output,
                loaders.vae.output
            ),
            (0, 1, 2)
        );
        assert_eq!(g.len(), 1);
    }

    #[test]
    fn every_requirement_is_met_by_the_all_in_one_checkpoint() {
        for r in flux_model_requirements() {
            assert!(
                r.any_of.iter().any(|m| m.folder == "checkpoints"),
                "{}",
                r.purpose
            );
        }
    }

    #[test]
    fn schema_defaults_pass_the_checks() {
        let p = schema_properties();
        let s = FluxSampling {
            prompt: "x",
            negative_prompt: "",
            width: p["width"]["default"].as_u64().unwrap() as u32,
            height: p["height"]["default"].as_u64().unwrap() as u32,
            steps: p["steps"]["default"].as_u64().unwrap() as u32,
            cfg: p["cfg"]["default"].as_f64().unwrap(),
            guidance: p["guidance"]["default"].as_f64().unwrap(),
            seed: 0,
        };
        let mut checks = Checks::new();
        check_sampling(&mut checks, &s);
        assert!(checks.is_ok(), "{:?}", checks.errors());
    }
}
