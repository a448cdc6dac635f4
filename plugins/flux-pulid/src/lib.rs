//! The `/flux-pulid` endpoint: one Flux.1-dev pass that keeps the identity of a reference
//! face, through PuLID-Flux (`lldacing/ComfyUI_PuLID_Flux_ll`, pinned in
//! `deploy/identity.lock.json`).
//!
//! Graph: the `/flux-dev` text-to-image graph whose model goes through `ApplyPulidFlux`
//! first. The face is picked once, by `PulidFluxFaceDetector` (InsightFace antelopev2,
//! `PulidFluxOptions` large-small / index 0: **the largest face**, aligned the way
//! `ApplyPulidFlux` aligns it, mode 1), and its aligned crop is the `image` PuLID embeds
//! (EVA02-CLIP-L-336 + the antelopev2 recognition embedding, facexlib's BiSeNet for the
//! face mask).
//!
//! Why the detector sits in front: `ApplyPulidFlux` on a photo without a face only logs a
//! warning and returns the model unchanged, so the caller would get a Flux image without
//! identity and a 200. With the detector's list in front, no face is an empty list, and
//! ComfyUI fails `ApplyPulidFlux` with `IndexError` before any sampling: that failure (and
//! only at `ApplyPulidFlux`) becomes 422 naming `reference_image`.
//!
//! Owns the request contract of `/flux-pulid` and that translation. Never opens files:
//! the reference handling is `flowhost_sdk::identity`, shared with `/flux-instantid`.

use flowhost_sdk::decode::{Checks, decode};
use flowhost_sdk::flux::{self, FluxLoaders, FluxSampling};
use flowhost_sdk::graph::Graph;
use flowhost_sdk::identity::{self, FaceProvider, REFERENCE_FIELD};
use flowhost_sdk::models::{describe_candidates, pick_model, requirement};
use flowhost_sdk::{
    BuildError, ExecutionFailure, Host, Job, Manifest, OutputFormat, Plugin, Request, UserError,
    schema, seed_or_random,
};
use std::borrow::Cow;

use serde::Deserialize;
use serde_json::json;

pub const NAME: &str = "flux-pulid";
pub const ROUTE: &str = "/flux-pulid";
pub const ANALYTICS_PREFIX: &str = "modal_pulid";

/// PuLID-Flux weights, newest first.
pub const PULID_MODELS: &[(&str, &str)] = &[
    ("pulid", "pulid_flux_v0.9.1.safetensors"),
    ("pulid", "pulid_flux_v0.9.0.safetensors"),
];
/// EVA02-CLIP-L-336: `PulidFluxEvaClipLoader` looks for exactly this name among the text
/// encoders (else it would download it into `models/clip`).
pub const EVA_CLIP: &[(&str, &str)] = &[
    ("text_encoders", "EVA02_CLIP_L_336_psz14_s6B.pt"),
    ("clip", "EVA02_CLIP_L_336_psz14_s6B.pt"),
];
/// facexlib's models, which `ApplyPulidFlux` loads from `<ComfyUI>/models/facexlib`
/// (downloading them when absent).
pub const FACEXLIB_DETECTION: &[(&str, &str)] = &[("facexlib", "detection_Resnet50_Final.pth")];
pub const FACEXLIB_PARSING: &[(&str, &str)] = &[("facexlib", "parsing_bisenet.pth")];

pub const STRENGTH_MIN: f64 = -1.0;
pub const STRENGTH_MAX: f64 = 5.0;
pub const STRENGTH_DEFAULT: f64 = 1.0;

const PULID_NODE_CLASSES: &[&str] = &[
    "PulidFluxModelLoader",
    "PulidFluxEvaClipLoader",
    "PulidFluxInsightFaceLoader",
    "PulidFluxOptions",
    "PulidFluxFaceDetector",
    "ApplyPulidFlux",
    "LoadImage",
    "SaveImage",
];

/// The `/flux-pulid` request body.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FluxPulidRequest<'a> {
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
    #[serde(default = "flux::default_cfg")]
    pub cfg: f64,
    #[serde(default = "flux::default_guidance")]
    pub guidance: f64,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default = "default_strength")]
    pub pulid_strength: f64,
    #[serde(default)]
    pub start_at: f64,
    #[serde(default = "default_end_at")]
    pub end_at: f64,
    #[serde(default)]
    pub face_provider: FaceProvider,
}

fn default_strength() -> f64 {
    STRENGTH_DEFAULT
}

fn default_end_at() -> f64 {
    1.0
}

fn schema_properties() -> serde_json::Map<String, serde_json::Value> {
    let mut p = flux::schema_properties();
    p.insert(REFERENCE_FIELD.into(), identity::reference_schema());
    p.insert(
        "pulid_strength".into(),
        json!({"type": "number", "minimum": STRENGTH_MIN, "maximum": STRENGTH_MAX, "default": STRENGTH_DEFAULT,
               "description": "Identity strength (ApplyPulidFlux weight); 0 leaves the Flux image as it would be."}),
    );
    p.insert(
        "start_at".into(),
        json!({"type": "number", "minimum": 0.0, "maximum": 1.0, "default": 0.0,
               "description": "Fraction of the sampling at which the identity starts to apply (at most end_at)."}),
    );
    p.insert(
        "end_at".into(),
        json!({"type": "number", "minimum": 0.0, "maximum": 1.0, "default": 1.0,
               "description": "Fraction of the sampling at which the identity stops applying."}),
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

pub struct FluxPulid;

impl Plugin for FluxPulid {
    fn manifest() -> Manifest {
        let mut node_classes: Vec<String> =
            flux::NODE_CLASSES.iter().map(|c| c.to_string()).collect();
        for class in PULID_NODE_CLASSES {
            if !node_classes.iter().any(|c| c == class) {
                node_classes.push(class.to_string());
            }
        }
        let mut models = flux::flux_model_requirements();
        models.extend([
            requirement("PuLID-Flux weights", PULID_MODELS),
            requirement("EVA02-CLIP-L-336 (PuLID image encoder)", EVA_CLIP),
            requirement("facexlib RetinaFace detection", FACEXLIB_DETECTION),
            requirement("facexlib BiSeNet face parsing", FACEXLIB_PARSING),
            requirement(
                "InsightFace antelopev2 face detector",
                identity::ANTELOPEV2_DETECTOR,
            ),
            requirement(
                "InsightFace antelopev2 face recognition",
                identity::ANTELOPEV2_RECOGNITION,
            ),
        ]);
        Manifest {
            name: NAME.into(),
            version: env!("CARGO_PKG_VERSION").into(),
            route: ROUTE.into(),
            summary:
                "A Flux.1-dev image with the identity of a reference face (PuLID-Flux, one pass)"
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
            // No warm-up: it needs a photo with a face; flux-dev's warm-up loads Flux.
            warm_up: None,
        }
    }

    fn build(request: &Request, host: &dyn Host) -> Result<Job, BuildError> {
        let body: FluxPulidRequest<'_> = decode(&request.body)?;
        let seed = seed_or_random(body.seed, request);
        let sampling = FluxSampling {
            prompt: &body.prompt,
            negative_prompt: &body.negative_prompt,
            width: body.width,
            height: body.height,
            steps: body.steps,
            cfg: body.cfg,
            guidance: body.guidance,
            seed,
        };
        let mut checks = Checks::new();
        flux::check_sampling(&mut checks, &sampling);
        checks
            .range(
                "pulid_strength",
                body.pulid_strength,
                STRENGTH_MIN,
                STRENGTH_MAX,
            )
            .range("start_at", body.start_at, 0.0, 1.0)
            .range("end_at", body.end_at, 0.0, 1.0);
        if (0.0..=1.0).contains(&body.start_at)
            && (0.0..=1.0).contains(&body.end_at)
            && body.start_at > body.end_at
        {
            checks.fail(
                "start_at",
                format!("must be at most end_at ({})", body.end_at),
            );
        }
        let reference = identity::parse_reference(&mut checks, &body.reference_image);
        checks.finish()?;
        let reference = reference
            .ok_or_else(|| BuildError::Internal("reference image checked but absent".into()))?;

        let flux_models = flux::pick_flux_models(host)?;
        let pulid = pick_model(host, PULID_MODELS)
            .ok_or_else(|| unavailable("the PuLID-Flux model", PULID_MODELS))?;
        // The other PuLID files are loaded by name by the node pack itself; they are
        // declared in the manifest (readiness) and not chosen here.

        let mut g = Graph::new();
        let loaders = flux::add_loaders(&mut g, &flux_models);
        let pulid_model = g.node("PulidFluxModelLoader", json!({"pulid_file": pulid.name}));
        let eva_clip = g.node("PulidFluxEvaClipLoader", json!({}));
        let face_analysis = g.node(
            "PulidFluxInsightFaceLoader",
            json!({"provider": body.face_provider.node_value()}),
        );
        let (reference_image, upload) = identity::add_reference(&mut g, reference);
        let options = g.node(
            "PulidFluxOptions",
            json!({"input_faces_order": "large-small", "input_faces_index": 0, "input_faces_align_mode": 1}),
        );
        let detector = g.node(
            "PulidFluxFaceDetector",
            json!({"face_analysis": face_analysis.out(0), "image": reference_image, "options": options.out(0)}),
        );
        let apply = g.node(
            "ApplyPulidFlux",
            json!({
                "model": loaders.model,
                "pulid_flux": pulid_model.out(0),
                "eva_clip": eva_clip.out(0),
                "face_analysis": face_analysis.out(0),
                // align_face: the chosen face, aligned; an empty list when there is none.
                "image": detector.out(1),
                "weight": body.pulid_strength,
                "start_at": body.start_at,
                "end_at": body.end_at,
                "options": options.out(0),
            }),
        );
        let patched = FluxLoaders {
            model: apply.out(0),
            ..loaders
        };
        let image = flux::add_text_to_image(&mut g, &patched, &sampling);
        let save = g.node(
            "SaveImage",
            json!({"images": image, "filename_prefix": NAME}),
        );

        let analytics = json!({
            "workflow_type": "flux-pulid",
            "prompt_length": body.prompt.chars().count(),
            "width": body.width,
            "height": body.height,
            "steps": body.steps,
            "pulid_strength": body.pulid_strength,
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
        // An empty face list (no face in the reference) reaches ApplyPulidFlux as an
        // empty input list, which ComfyUI's executor indexes: IndexError at that node.
        let no_face = failure.node_type == "ApplyPulidFlux"
            && (failure.exception_type.ends_with("IndexError")
                || failure.exception_message.to_lowercase().contains("no face"));
        no_face.then(identity::no_face_error)
    }
}

flowhost_sdk::register!(FluxPulid);

#[cfg(test)]
mod tests {
    use super::*;
    use flowhost_sdk::host::FakeHost;
    use flowhost_sdk::image::samples::{data_url, png_header};
    use flowhost_sdk::testing::{self, invalid_fields, nodes_of, the_node, workflow as graph};
    use flowhost_sdk::{ImageSource, Upload};
    use serde_json::Value;

    fn volume() -> FakeHost {
        FakeHost::new().with_flux_dev_models().with_model(
            "pulid",
            "pulid_flux_v0.9.1.safetensors",
            10,
        )
    }

    fn face() -> String {
        data_url("image/png", &png_header(512, 512))
    }

    fn build_on(host: &FakeHost, body: Value) -> Result<Job, BuildError> {
        FluxPulid::build(&testing::request(&body, 99), host)
    }

    fn build(body: Value) -> Result<Job, BuildError> {
        build_on(&volume(), body)
    }

    #[test]
    fn one_flux_pass_whose_model_goes_through_pulid() {
        let job = build(json!({"prompt": "an astronaut", "reference_image": face()})).unwrap();
        let g = graph(&job);
        let samplers = nodes_of(&g, "KSampler");
        assert_eq!(samplers.len(), 1, "one pass");
        let (_, ks) = samplers[0];
        let model = ks["inputs"]["model"][0].as_str().unwrap();
        assert_eq!(g[model]["class_type"], "ApplyPulidFlux");
        let a = &g[model]["inputs"];
        assert_eq!(
            g[a["model"][0].as_str().unwrap()]["class_type"],
            "UNETLoader"
        );
        assert_eq!(
            g[a["pulid_flux"][0].as_str().unwrap()]["inputs"]["pulid_file"],
            "pulid_flux_v0.9.1.safetensors"
        );
        // The image PuLID embeds is the detector's aligned face (output 1) of the upload.
        let detector = a["image"][0].as_str().unwrap();
        assert_eq!(g[detector]["class_type"], "PulidFluxFaceDetector");
        assert_eq!(a["image"][1], 1);
        let (load_id, _) = the_node(&g, "LoadImage");
        assert_eq!(g[detector]["inputs"]["image"], json!([load_id, 0]));
        // The largest face, aligned like ApplyPulidFlux does, options shared by both nodes.
        let (options_id, options) = the_node(&g, "PulidFluxOptions");
        assert_eq!(
            options["inputs"],
            json!({"input_faces_order": "large-small", "input_faces_index": 0, "input_faces_align_mode": 1})
        );
        assert_eq!(a["options"], json!([options_id, 0]));
        assert_eq!(g[detector]["inputs"]["options"], json!([options_id, 0]));
        assert_eq!(
            (
                a["weight"].as_f64(),
                a["start_at"].as_f64(),
                a["end_at"].as_f64()
            ),
            (Some(1.0), Some(0.0), Some(1.0))
        );
        // Flux sampling as /flux-dev: cfg 1, FluxGuidance 3.5.
        assert_eq!(ks["inputs"]["cfg"], 1.0);
        assert_eq!(the_node(&g, "FluxGuidance").1["inputs"]["guidance"], 3.5);
        let (save_id, _) = the_node(&g, "SaveImage");
        assert_eq!(job.outputs, vec![save_id.clone()]);
    }

    #[test]
    fn the_reference_upload_targets_the_load_image_node() {
        let job = build(json!({"prompt": "p", "reference_image": "faces/alice.png"})).unwrap();
        let g = graph(&job);
        let (load_id, _) = the_node(&g, "LoadImage");
        let Upload {
            field,
            node_id,
            input_name,
            source,
            ..
        } = &job.uploads[0];
        assert_eq!(
            (field.as_str(), node_id.as_str(), input_name.as_str()),
            ("reference_image", load_id.as_str(), "image")
        );
        assert_eq!(source, &ImageSource::InputPath("faces/alice.png".into()));
    }

    #[test]
    fn fields_map_to_the_nodes_with_inclusive_edges() {
        for (strength, start, end) in [(-1.0, 0.0, 0.0), (5.0, 1.0, 1.0), (0.0, 0.25, 0.75)] {
            let job = build(json!({"prompt": "p", "reference_image": face(), "pulid_strength": strength, "start_at": start, "end_at": end, "guidance": 100.0, "cfg": 30.0})).unwrap();
            let g = graph(&job);
            let a = &the_node(&g, "ApplyPulidFlux").1["inputs"];
            assert_eq!(
                (
                    a["weight"].as_f64(),
                    a["start_at"].as_f64(),
                    a["end_at"].as_f64()
                ),
                (Some(strength), Some(start), Some(end))
            );
            assert_eq!(the_node(&g, "FluxGuidance").1["inputs"]["guidance"], 100.0);
            assert_eq!(the_node(&g, "KSampler").1["inputs"]["cfg"], 30.0);
        }
        for (field, bad) in [
            ("pulid_strength", -1.05),
            ("pulid_strength", 5.05),
            ("start_at", -0.1),
            ("end_at", 1.1),
            ("guidance", 100.5),
        ] {
            let mut body = json!({"prompt": "p", "reference_image": face()});
            body[field] = json!(bad);
            assert_eq!(invalid_fields(build(body)), vec![field]);
        }
        assert_eq!(
            invalid_fields(build(
                json!({"prompt": "p", "reference_image": face(), "start_at": 0.6, "end_at": 0.5})
            )),
            vec!["start_at"]
        );
        assert_eq!(
            invalid_fields(build(json!({"prompt": "", "reference_image": "../x.png"}))),
            vec!["prompt", "reference_image"]
        );
    }

    #[test]
    fn face_providers_map_gpu_to_cuda() {
        for (given, node_value) in [("CPU", "CPU"), ("GPU", "CUDA"), ("CUDA", "CUDA")] {
            let job =
                build(json!({"prompt": "p", "reference_image": face(), "face_provider": given}))
                    .unwrap();
            let g = graph(&job);
            assert_eq!(
                the_node(&g, "PulidFluxInsightFaceLoader").1["inputs"]["provider"],
                node_value
            );
        }
        assert_eq!(
            invalid_fields(build(
                json!({"prompt": "p", "reference_image": face(), "face_provider": "ROCM"})
            )),
            vec!["face_provider"]
        );
    }

    #[test]
    fn missing_pulid_weights_are_unavailable_naming_them() {
        let host = FakeHost::new().with_flux_dev_models();
        match build_on(&host, json!({"prompt": "p", "reference_image": face()})) {
            Err(BuildError::Unavailable(message)) => assert!(
                message.contains("pulid/pulid_flux_v0.9.1.safetensors"),
                "{message}"
            ),
            other => panic!("expected Unavailable, got {other:?}"),
        }
    }

    #[test]
    fn no_face_at_apply_pulid_becomes_a_422_naming_reference_image() {
        let failure = ExecutionFailure {
            node_id: "9".into(),
            node_type: "ApplyPulidFlux".into(),
            exception_type: "IndexError".into(),
            exception_message: "list index out of range".into(),
        };
        let error = FluxPulid::explain_failure(&failure).unwrap();
        assert_eq!(
            (error.status, error.field.as_deref()),
            (422, Some("reference_image"))
        );
        let elsewhere = ExecutionFailure {
            node_type: "KSampler".into(),
            ..failure.clone()
        };
        assert_eq!(FluxPulid::explain_failure(&elsewhere), None);
        let other = ExecutionFailure {
            exception_type: "RuntimeError".into(),
            exception_message: "out of memory".into(),
            ..failure
        };
        assert_eq!(FluxPulid::explain_failure(&other), None);
    }

    #[test]
    fn the_manifest_declares_every_class_used_and_the_pulid_models() {
        let m = FluxPulid::manifest();
        assert_eq!(
            (m.route.as_str(), m.analytics_prefix.as_str()),
            ("/flux-pulid", "modal_pulid")
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
        for folder in ["pulid", "text_encoders", "facexlib", "insightface"] {
            assert!(
                m.models
                    .iter()
                    .any(|r| r.any_of.iter().any(|x| x.folder == folder)),
                "{folder}"
            );
        }
        let s: Value = serde_json::from_str(&m.request_schema).unwrap();
        assert_eq!(s["required"], json!(["prompt", "reference_image"]));
        assert_eq!(s["properties"]["pulid_strength"]["maximum"], 5.0);
    }
}
