//! The `/flux-dev` endpoint: Flux.1-dev text-to-image.
//!
//! Owns the request contract of `/flux-dev` (fields, defaults, ranges, analytics) and
//! turns a request into the Flux graph of `flowhost_sdk::flux`. Never reads files or
//! the network; model files come from `Host::list_models`.

use flowhost_sdk::decode::{Checks, decode};
use flowhost_sdk::flux::{self, FluxSampling};
use flowhost_sdk::graph::Graph;
use flowhost_sdk::{
    BuildError, Host, Job, Manifest, OutputFormat, Plugin, Request, schema, seed_or_random,
};
use serde::Deserialize;
use serde_json::json;

/// The `/flux-dev` request body.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FluxDevRequest {
    pub prompt: String,
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
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default = "flux::default_guidance")]
    pub guidance: f64,
}

impl FluxDevRequest {
    /// The sampling settings with the seed resolved.
    pub fn sampling(&self, seed: u64) -> FluxSampling<'_> {
        FluxSampling {
            prompt: &self.prompt,
            negative_prompt: &self.negative_prompt,
            width: self.width,
            height: self.height,
            steps: self.steps,
            cfg: self.cfg,
            guidance: self.guidance,
            seed,
        }
    }

    /// The analytics properties every Flux text-to-image endpoint reports.
    pub fn analytics(&self, workflow_type: &str) -> serde_json::Map<String, serde_json::Value> {
        let props = json!({
            "workflow_type": workflow_type,
            "prompt_length": self.prompt.chars().count(),
            "width": self.width,
            "height": self.height,
            "steps": self.steps,
            "cfg": self.cfg,
            "has_seed": self.seed.is_some(),
        });
        match props {
            serde_json::Value::Object(map) => map,
            _ => serde_json::Map::new(),
        }
    }
}

/// The name, route and analytics prefix of this endpoint.
pub const NAME: &str = "flux-dev";
pub const ROUTE: &str = "/flux-dev";
pub const ANALYTICS_PREFIX: &str = "modal_flux_dev";

pub struct FluxDev;

impl Plugin for FluxDev {
    fn manifest() -> Manifest {
        let mut node_classes: Vec<String> =
            flux::NODE_CLASSES.iter().map(|c| c.to_string()).collect();
        node_classes.push("SaveImage".into());
        Manifest {
            name: NAME.into(),
            version: env!("CARGO_PKG_VERSION").into(),
            route: ROUTE.into(),
            summary: "Flux.1-dev text-to-image".into(),
            request_schema: schema::strict_object(&["prompt"], flux::schema_properties())
                .to_string(),
            response_media_types: vec!["image/jpeg".into()],
            analytics_prefix: ANALYTICS_PREFIX.into(),
            node_classes,
            models: flux::flux_model_requirements(),
            // The whole graph with the real models, as cheap as it gets.
            warm_up: Some(
                json!({"prompt": "warm-up", "width": 256, "height": 256, "steps": 1, "seed": 0})
                    .to_string(),
            ),
        }
    }

    fn build(request: &Request, host: &dyn Host) -> Result<Job, BuildError> {
        let body: FluxDevRequest = decode(&request.body)?;
        let seed = seed_or_random(body.seed, request);
        let sampling = body.sampling(seed);
        let mut checks = Checks::new();
        flux::check_sampling(&mut checks, &sampling);
        checks.finish()?;

        let models = flux::pick_flux_models(host)?;
        let mut g = Graph::new();
        let loaders = flux::add_loaders(&mut g, &models);
        let image = flux::add_text_to_image(&mut g, &loaders, &sampling);
        let save = g.node(
            "SaveImage",
            json!({"images": image, "filename_prefix": NAME}),
        );

        Ok(Job {
            workflow: g.to_json_string(),
            uploads: vec![],
            outputs: vec![save.into()],
            output_format: OutputFormat::Jpeg,
            seed: Some(seed),
            analytics: serde_json::Value::Object(body.analytics("flux-dev")).to_string(),
            caller_nodes: vec![],
            models: g.model_set(),
            progress: g.sampler_progress(),
            fetches: vec![],
        })
    }
}

flowhost_sdk::register!(FluxDev);

#[cfg(test)]
mod tests {
    use super::*;
    use flowhost_sdk::host::FakeHost;
    use flowhost_sdk::testing::{self, invalid_fields, the_node, workflow as graph};
    use serde_json::Value;

    fn volume() -> FakeHost {
        FakeHost::new().with_flux_dev_models()
    }

    fn request(body: Value) -> Request {
        testing::request(&body, 987_654_321)
    }

    fn build(body: Value) -> Result<Job, BuildError> {
        FluxDev::build(&request(body), &volume())
    }


    fn node<'a>(g: &'a Value, class: &str) -> &'a Value {
        the_node(g, class).1
    }


    #[test]
    fn defaults_build_the_documented_graph() {
        let job = build(json!({"prompt": "a red fox"})).unwrap();
        let g = graph(&job);
        assert_eq!(
            node(&g, "UNETLoader")["inputs"]["unet_name"],
            "flux1-dev.safetensors"
        );
        let clip = &node(&g, "DualCLIPLoader")["inputs"];
        assert_eq!(
            (
                clip["clip_name1"].as_str(),
                clip["clip_name2"].as_str(),
                clip["type"].as_str()
            ),
            (
                Some("clip_l.safetensors"),
                Some("t5xxl_fp16.safetensors"),
                Some("flux")
            )
        );
        assert_eq!(
            node(&g, "VAELoader")["inputs"]["vae_name"],
            "ae.safetensors"
        );
        assert_eq!(node(&g, "FluxGuidance")["inputs"]["guidance"], 3.5);
        let latent = &node(&g, "EmptySD3LatentImage")["inputs"];
        assert_eq!(
            (latent["width"].as_u64(), latent["height"].as_u64()),
            (Some(1024), Some(1024))
        );
        let ks = &node(&g, "KSampler")["inputs"];
        assert_eq!(ks["steps"], 20);
        assert_eq!(ks["cfg"], 1.0);
        assert_eq!(
            (ks["sampler_name"].as_str(), ks["scheduler"].as_str()),
            (Some("euler"), Some("simple"))
        );
        assert_eq!(ks["seed"], 987_654_321u64);
        assert_eq!(job.seed, Some(987_654_321));
        assert_eq!(job.output_format, OutputFormat::Jpeg);
        assert_eq!(job.outputs.len(), 1);
        assert_eq!(g[&job.outputs[0]]["class_type"], "SaveImage");
        assert!(job.uploads.is_empty() && job.caller_nodes.is_empty());
    }

    #[test]
    fn the_prompts_go_to_the_right_encoders() {
        let job = build(json!({"prompt": "a red fox", "negative_prompt": "blurry"})).unwrap();
        let g = graph(&job);
        let ks = &node(&g, "KSampler")["inputs"];
        let guidance_id = ks["positive"][0].as_str().unwrap();
        let positive_id = g[guidance_id]["inputs"]["conditioning"][0]
            .as_str()
            .unwrap();
        assert_eq!(g[positive_id]["inputs"]["text"], "a red fox");
        let negative_id = ks["negative"][0].as_str().unwrap();
        assert_eq!(g[negative_id]["inputs"]["text"], "blurry");
    }

    #[test]
    fn every_field_reaches_the_graph() {
        let job = build(json!({"prompt": "p", "width": 512, "height": 768, "steps": 7, "cfg": 2.5, "seed": 5, "guidance": 4.0})).unwrap();
        let g = graph(&job);
        let latent = &node(&g, "EmptySD3LatentImage")["inputs"];
        assert_eq!(
            (latent["width"].as_u64(), latent["height"].as_u64()),
            (Some(512), Some(768))
        );
        let ks = &node(&g, "KSampler")["inputs"];
        assert_eq!(
            (
                ks["steps"].as_u64(),
                ks["cfg"].as_f64(),
                ks["seed"].as_u64()
            ),
            (Some(7), Some(2.5), Some(5))
        );
        assert_eq!(node(&g, "FluxGuidance")["inputs"]["guidance"], 4.0);
        assert_eq!(job.seed, Some(5));
    }

    #[test]
    fn the_full_seed_range_is_accepted_and_returned() {
        for seed in [0u64, 42, u64::MAX] {
            let job = build(json!({"prompt": "p", "seed": seed})).unwrap();
            assert_eq!(job.seed, Some(seed));
            assert_eq!(
                node(&graph(&job), "KSampler")["inputs"]["seed"].as_u64(),
                Some(seed)
            );
        }
        assert_eq!(
            invalid_fields(build(json!({"prompt": "p", "seed": -1}))),
            vec!["seed"]
        );
        let too_big = Request {
            body: r#"{"prompt": "p", "seed": 18446744073709551616}"#.into(),
            random_seed: 1,
            request_id: "r".into(),
        };
        assert_eq!(
            invalid_fields(FluxDev::build(&too_big, &volume())),
            vec!["seed"]
        );
    }

    #[test]
    fn an_absent_seed_is_the_hosts_random_seed_not_42() {
        let r = Request {
            body: json!({"prompt": "p"}).to_string(),
            random_seed: 77,
            request_id: "r".into(),
        };
        assert_eq!(FluxDev::build(&r, &volume()).unwrap().seed, Some(77));
        let r = Request {
            random_seed: u64::MAX,
            ..r
        };
        assert_eq!(FluxDev::build(&r, &volume()).unwrap().seed, Some(u64::MAX));
    }

    #[test]
    fn range_edges_are_inclusive() {
        for (field, ok) in [
            ("width", json!(256)),
            ("width", json!(2048)),
            ("height", json!(256)),
            ("height", json!(2048)),
            ("steps", json!(1)),
            ("steps", json!(100)),
            ("cfg", json!(0.0)),
            ("cfg", json!(30.0)),
            ("guidance", json!(0.0)),
            ("guidance", json!(100.0)),
        ] {
            let mut body = json!({"prompt": "p"});
            body[field] = ok.clone();
            assert!(build(body).is_ok(), "{field}={ok}");
        }
    }

    #[test]
    fn values_just_outside_the_ranges_name_their_field() {
        for (field, bad) in [
            ("width", json!(240)),
            ("width", json!(2064)),
            ("width", json!(1000)),
            ("height", json!(240)),
            ("height", json!(2064)),
            ("height", json!(1030)),
            ("steps", json!(0)),
            ("steps", json!(101)),
            ("cfg", json!(-0.1)),
            ("cfg", json!(30.1)),
            ("guidance", json!(-0.1)),
            ("guidance", json!(100.1)),
        ] {
            let mut body = json!({"prompt": "p"});
            body[field] = bad.clone();
            assert_eq!(invalid_fields(build(body)), vec![field], "{field}={bad}");
        }
    }

    #[test]
    fn every_bad_field_is_reported_at_once() {
        let fields = invalid_fields(build(
            json!({"prompt": " ", "width": 100, "steps": 500, "cfg": 99.0}),
        ));
        assert_eq!(fields, vec!["prompt", "width", "width", "steps", "cfg"]);
    }

    #[test]
    fn old_misspelled_fields_are_refused_not_ignored() {
        assert_eq!(
            invalid_fields(build(json!({"prompt": "p", "guidance_scale": 3.5}))),
            vec!["guidance_scale"]
        );
        assert_eq!(
            invalid_fields(build(json!({"prompt": "p", "num_inference_steps": 30}))),
            vec!["num_inference_steps"]
        );
    }

    #[test]
    fn wrong_types_and_a_missing_prompt_name_the_field() {
        assert_eq!(invalid_fields(build(json!({"width": 512}))), vec!["prompt"]);
        assert_eq!(invalid_fields(build(json!({"prompt": 3}))), vec!["prompt"]);
        assert_eq!(
            invalid_fields(build(json!({"prompt": "p", "steps": "20"}))),
            vec!["steps"]
        );
        assert_eq!(
            invalid_fields(build(json!({"prompt": "p", "steps": 20.5}))),
            vec!["steps"]
        );
        assert_eq!(invalid_fields(build(json!({"prompt": ""}))), vec!["prompt"]);
    }

    #[test]
    fn the_all_in_one_checkpoint_is_used_when_separate_files_are_missing() {
        let host = FakeHost::new().with_model("checkpoints", "flux1-dev-fp8.safetensors", 10);
        let job = FluxDev::build(&request(json!({"prompt": "p"})), &host).unwrap();
        let g = graph(&job);
        assert_eq!(
            node(&g, "CheckpointLoaderSimple")["inputs"]["ckpt_name"],
            "flux1-dev-fp8.safetensors"
        );
        assert!(
            g.as_object()
                .unwrap()
                .values()
                .all(|n| n["class_type"] != "UNETLoader")
        );
        assert_eq!(node(&g, "VAEDecode")["inputs"]["vae"][1], 2);
    }

    #[test]
    fn no_models_is_unavailable_naming_the_files() {
        let Err(BuildError::Unavailable(message)) =
            FluxDev::build(&request(json!({"prompt": "p"})), &FakeHost::new())
        else {
            panic!("expected Unavailable")
        };
        assert!(
            message.contains("diffusion_models/flux1-dev.safetensors"),
            "{message}"
        );
        assert!(message.contains("vae/ae.safetensors"), "{message}");
    }

    #[test]
    fn analytics_carry_the_documented_properties() {
        let job = build(json!({"prompt": "héllo", "seed": 1})).unwrap();
        let a: Value = serde_json::from_str(&job.analytics).unwrap();
        assert_eq!(
            a,
            json!({"workflow_type": "flux-dev", "prompt_length": 5, "width": 1024, "height": 1024, "steps": 20, "cfg": 1.0, "has_seed": true})
        );
        let a: Value =
            serde_json::from_str(&build(json!({"prompt": "p"})).unwrap().analytics).unwrap();
        assert_eq!(a["has_seed"], false);
    }

    #[test]
    fn the_manifest_is_strict_and_declares_classes_and_models() {
        let m = FluxDev::manifest();
        assert_eq!(
            (
                m.name.as_str(),
                m.route.as_str(),
                m.analytics_prefix.as_str()
            ),
            ("flux-dev", "/flux-dev", "modal_flux_dev")
        );
        let s: Value = serde_json::from_str(&m.request_schema).unwrap();
        assert_eq!(s["additionalProperties"], false);
        assert_eq!(s["required"], json!(["prompt"]));
        assert_eq!(s["properties"]["seed"]["maximum"].as_u64(), Some(u64::MAX));
        assert_eq!(s["properties"]["width"]["multipleOf"], 16);
        let g = graph(&build(json!({"prompt": "p"})).unwrap());
        for n in g.as_object().unwrap().values() {
            assert!(
                m.node_classes
                    .iter()
                    .any(|c| c == n["class_type"].as_str().unwrap()),
                "{}",
                n["class_type"]
            );
        }
        assert_eq!(m.models.len(), 4);
    }

    #[test]
    fn the_same_request_builds_the_same_workflow() {
        let body = json!({"prompt": "p", "seed": 3});
        assert_eq!(
            build(body.clone()).unwrap().workflow,
            build(body).unwrap().workflow
        );
    }
}
