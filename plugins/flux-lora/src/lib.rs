//! The `/flux-lora` endpoint: Flux.1-dev text-to-image with one character LoRA.
//!
//! Owns the `/flux-lora` request contract: the Flux fields plus the LoRA — `lora_id`, a file
//! of the model volume (`loras/{lora_id}.safetensors` as listed by the host; a plain file
//! stem, never a path), or `lora`, a reference the host fetches into its model cache (an
//! https URL or an uploaded asset, with optional `sha256`/`blake3`) — and `lora_strength`,
//! `trigger_word`. Never reads files or opens sockets itself: a referenced LoRA is a
//! `ModelFetch` the host carries out.

use flowhost_sdk::decode::{Checks, decode};
use flowhost_sdk::flux::{self, FluxSampling};
use flowhost_sdk::graph::Graph;
use flowhost_sdk::models::find_model;
use flowhost_sdk::references::{self, FileReference};
use flowhost_sdk::{
    BuildError, FieldError, Host, Job, Manifest, OutputFormat, Plugin, Request, schema,
    seed_or_random,
};
use serde::Deserialize;
use serde_json::json;

pub const NAME: &str = "flux-lora";
pub const ROUTE: &str = "/flux-lora";
pub const ANALYTICS_PREFIX: &str = "modal_lora";
/// The model folder LoRAs live in.
pub const LORA_FOLDER: &str = "loras";
pub const LORA_ID_MAX_CHARS: usize = 128;
pub const TRIGGER_WORD_MAX_CHARS: usize = 200;

/// The `/flux-lora` request body.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FluxLoraRequest {
    pub prompt: String,
    #[serde(default)]
    pub lora_id: Option<String>,
    #[serde(default)]
    pub lora: Option<FileReference>,
    #[serde(default = "default_lora_strength")]
    pub lora_strength: f64,
    #[serde(default)]
    pub trigger_word: Option<String>,
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

fn default_lora_strength() -> f64 {
    1.0
}

/// The prompt with the trigger word prepended (`"{trigger}, {prompt}"`), unless the
/// prompt already contains it (case-insensitive) or there is none.
pub fn prompt_with_trigger(prompt: &str, trigger_word: Option<&str>) -> String {
    match trigger_word.map(str::trim).filter(|t| !t.is_empty()) {
        Some(trigger) if !prompt.to_lowercase().contains(&trigger.to_lowercase()) => {
            format!("{trigger}, {prompt}")
        }
        _ => prompt.to_string(),
    }
}

/// Why `lora_id` is not a plain file stem (letters, digits, `.`, `_`, `-`; no `..`).
pub fn lora_id_problem(lora_id: &str) -> Option<String> {
    if lora_id.is_empty() {
        return Some("must not be empty".into());
    }
    if lora_id.chars().count() > LORA_ID_MAX_CHARS {
        return Some(format!("must be at most {LORA_ID_MAX_CHARS} characters"));
    }
    if let Some(bad) = lora_id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Some(format!(
            "must be a LoRA file stem of letters, digits, `.`, `_` and `-` (e.g. `character-123`); {bad:?} is not allowed"
        ));
    }
    if lora_id.contains("..") || lora_id.starts_with('.') || lora_id.ends_with('.') {
        return Some("must not start or end with `.` or contain `..`".into());
    }
    None
}

fn schema_properties() -> serde_json::Map<String, serde_json::Value> {
    let mut p = flux::schema_properties();
    p.insert(
        "lora_id".into(),
        json!({
            "type": "string", "minLength": 1, "maxLength": LORA_ID_MAX_CHARS,
            "pattern": "^[A-Za-z0-9_-]+(\\.[A-Za-z0-9_-]+)*$",
            "description": "The LoRA to apply from the model volume: the stem of `loras/{lora_id}.safetensors` (e.g. `character-123`). Give this or `lora`."
        }),
    );
    p.insert(
        "lora".into(),
        references::schema("The LoRA to apply, by reference: `{\"url\": \"https://…/character.safetensors\"}` or `{\"asset\": \"<id or blake3:…>\"}` (a .safetensors uploaded to /api/v2/assets), optionally with `sha256`/`blake3`. Fetched once per server and cached. Give this or `lora_id`."),
    );
    p.insert(
        "lora_strength".into(),
        json!({"type": "number", "minimum": 0.0, "maximum": 1.0, "default": 1.0, "description": "How strongly the LoRA changes the model."}),
    );
    p.insert(
        "trigger_word".into(),
        json!({"type": "string", "minLength": 1, "maxLength": TRIGGER_WORD_MAX_CHARS, "pattern": flowhost_sdk::schema::NOT_BLANK, "description": "Prepended to the prompt (`trigger, prompt`) unless the prompt already contains it."}),
    );
    p
}

pub struct FluxLora;

impl Plugin for FluxLora {
    fn manifest() -> Manifest {
        let mut node_classes: Vec<String> =
            flux::NODE_CLASSES.iter().map(|c| c.to_string()).collect();
        node_classes.extend(["LoraLoaderModelOnly".to_string(), "SaveImage".to_string()]);
        Manifest {
            name: NAME.into(),
            version: env!("CARGO_PKG_VERSION").into(),
            route: ROUTE.into(),
            summary: "Flux.1-dev text-to-image with a character LoRA".into(),
            request_schema: schema::strict_object(&["prompt"], schema_properties())
                .to_string(),
            response_media_types: vec!["image/jpeg".into()],
            analytics_prefix: ANALYTICS_PREFIX.into(),
            node_classes,
            // The LoRA itself is per request (404 when missing), not a readiness requirement.
            models: flux::flux_model_requirements(),
            // A LoRA is per request; the warm-up loads the demo one every
            // simulated volume has (a real volume without it answers 404 and
            // the worker is warmed by flux-dev's warm-up instead).
            warm_up: Some(
                json!({"prompt": "warm-up", "lora_id": "character-123", "width": 256, "height": 256, "steps": 1, "seed": 0})
                    .to_string(),
            ),
        }
    }

    fn build(request: &Request, host: &dyn Host) -> Result<Job, BuildError> {
        let body: FluxLoraRequest = decode(&request.body)?;
        let seed = seed_or_random(body.seed, request);
        let prompt = prompt_with_trigger(&body.prompt, body.trigger_word.as_deref());
        let sampling = FluxSampling {
            prompt: &prompt,
            negative_prompt: &body.negative_prompt,
            width: body.width,
            height: body.height,
            steps: body.steps,
            cfg: body.cfg,
            guidance: body.guidance,
            seed,
        };
        let mut checks = Checks::new();
        flux::check_sampling(
            &mut checks,
            &FluxSampling {
                prompt: &body.prompt,
                ..sampling.clone()
            },
        );
        match (&body.lora_id, &body.lora) {
            (Some(_), Some(_)) => {
                checks.fail("lora", "give either `lora_id` (a volume file) or `lora` (a reference), not both");
            }
            (None, None) => {
                checks.fail("lora_id", "give `lora_id` (a LoRA file of the model volume) or `lora` (a URL or an uploaded asset)");
            }
            (Some(lora_id), None) => {
                if let Some(problem) = lora_id_problem(lora_id) {
                    checks.fail("lora_id", problem);
                }
            }
            (None, Some(reference)) => reference.check("lora", &mut checks),
        }
        checks.range("lora_strength", body.lora_strength, 0.0, 1.0);
        if let Some(trigger) = &body.trigger_word {
            checks.non_empty("trigger_word", trigger).max_chars(
                "trigger_word",
                trigger,
                TRIGGER_WORD_MAX_CHARS,
            );
        }
        checks.finish()?;

        // A volume file is looked up now (404 naming it); a reference gets a placeholder
        // the host replaces with the fetched file's cached name.
        let (lora_name, lora_file_size) = match (&body.lora_id, &body.lora) {
            (Some(lora_id), _) => {
                let lora_name = format!("{lora_id}.safetensors");
                let file = find_model(host, LORA_FOLDER, &lora_name).ok_or_else(|| {
                    BuildError::NotFound(FieldError {
                        field: "lora_id".into(),
                        message: format!(
                            "no LoRA `{lora_id}`: the file {LORA_FOLDER}/{lora_name} is not on the model volume"
                        ),
                    })
                })?;
                (lora_name, Some(file.size))
            }
            _ => (references::placeholder("lora"), None),
        };
        let models = flux::pick_flux_models(host)?;

        let mut g = Graph::new();
        let mut loaders = flux::add_loaders(&mut g, &models);
        let lora = g.node(
            "LoraLoaderModelOnly",
            json!({"model": loaders.model, "lora_name": lora_name, "strength_model": body.lora_strength}),
        );
        loaders.model = lora.out(0);
        let image = flux::add_text_to_image(&mut g, &loaders, &sampling);
        let save = g.node(
            "SaveImage",
            json!({"images": image, "filename_prefix": NAME}),
        );

        let analytics = json!({
            "workflow_type": "flux-lora",
            "prompt_length": body.prompt.chars().count(),
            "width": body.width,
            "height": body.height,
            "steps": body.steps,
            "cfg": body.cfg,
            "has_seed": body.seed.is_some(),
            "lora_id": body.lora_id,
            "lora_by_reference": body.lora.is_some(),
            "lora_strength": body.lora_strength,
            "lora_file_size": lora_file_size,
        });
        let fetches = match &body.lora {
            Some(reference) => vec![references::model_fetch("lora", LORA_FOLDER, reference, lora.as_str(), "lora_name")],
            None => vec![],
        };
        Ok(Job {
            workflow: g.to_json_string(),
            uploads: vec![],
            outputs: vec![save.into()],
            output_format: OutputFormat::Jpeg,
            seed: Some(seed),
            analytics: analytics.to_string(),
            caller_nodes: vec![],
            models: g.model_set(),
            progress: g.sampler_progress(),
            fetches,
        })
    }
}

flowhost_sdk::register!(FluxLora);

#[cfg(test)]
mod tests {
    use super::*;
    use flowhost_sdk::host::FakeHost;
    use flowhost_sdk::testing::{self, invalid_fields, the_node, workflow as graph};
    use serde_json::Value;

    fn volume() -> FakeHost {
        FakeHost::new().with_flux_dev_models()
            .with_model("loras", "character-123.safetensors", 4321)
    }

    fn build_on(host: &FakeHost, body: Value) -> Result<Job, BuildError> {
        FluxLora::build(&testing::request(&body, 11), host)
    }

    fn build(body: Value) -> Result<Job, BuildError> {
        build_on(&volume(), body)
    }


    fn node<'a>(g: &'a Value, class: &str) -> &'a Value {
        the_node(g, class).1
    }

    fn positive_text(g: &Value) -> String {
        let guidance = node(g, "KSampler")["inputs"]["positive"][0]
            .as_str()
            .unwrap();
        let encoder = g[guidance]["inputs"]["conditioning"][0].as_str().unwrap();
        g[encoder]["inputs"]["text"].as_str().unwrap().to_string()
    }


    #[test]
    fn the_lora_sits_between_the_model_loader_and_the_sampler() {
        let job = build(json!({"prompt": "portrait", "lora_id": "character-123"})).unwrap();
        let g = graph(&job);
        let lora = node(&g, "LoraLoaderModelOnly");
        assert_eq!(lora["inputs"]["lora_name"], "character-123.safetensors");
        assert_eq!(lora["inputs"]["strength_model"], 1.0);
        let unet_id = lora["inputs"]["model"][0].as_str().unwrap();
        assert_eq!(g[unet_id]["class_type"], "UNETLoader");
        let model_id = node(&g, "KSampler")["inputs"]["model"][0].as_str().unwrap();
        assert_eq!(g[model_id]["class_type"], "LoraLoaderModelOnly");
        assert_eq!(job.seed, Some(11));
    }

    #[test]
    fn a_lora_by_reference_is_a_fetch_the_host_fills_in() {
        let sha = "a".repeat(64);
        let job = build(json!({"prompt": "portrait", "lora": {"url": "https://files.example.com/alice.safetensors", "sha256": sha}})).unwrap();
        let g = graph(&job);
        let (id, lora) = the_node(&g, "LoraLoaderModelOnly");
        assert_eq!(lora["inputs"]["lora_name"], "lora@fetch");
        assert_eq!(job.fetches.len(), 1);
        let fetch = &job.fetches[0];
        assert_eq!((fetch.field.as_str(), fetch.folder.as_str(), fetch.node_id.as_str(), fetch.input_name.as_str()), ("lora", "loras", id.as_str(), "lora_name"));
        assert_eq!(fetch.file.source, flowhost_sdk::FileSource::Url("https://files.example.com/alice.safetensors".into()));
        assert_eq!(fetch.file.sha256.as_deref(), Some(sha.as_str()));
        // The model set names the placeholder, which the host replaces with the file's hash.
        assert_eq!(job.models.loras[0].model.name, "lora@fetch");
        let by_asset = build(json!({"prompt": "p", "lora": {"asset": "blake3:abc"}})).unwrap();
        assert_eq!(by_asset.fetches[0].file.source, flowhost_sdk::FileSource::Asset("blake3:abc".into()));
    }

    #[test]
    fn a_lora_is_named_exactly_once_and_its_reference_well_formed() {
        assert_eq!(invalid_fields(build(json!({"prompt": "p", "lora_id": "character-123", "lora": {"url": "https://x/y"}}))), vec!["lora"]);
        assert_eq!(invalid_fields(build(json!({"prompt": "p", "lora": {"url": "https://x/y", "sha256": "abc"}}))), vec!["lora/sha256"]);
        assert_eq!(invalid_fields(build(json!({"prompt": "p", "lora": {}}))), vec!["lora"]);
        assert!(build(json!({"prompt": "p", "lora_id": "character-123"})).unwrap().fetches.is_empty());
    }

    #[test]
    fn lora_strength_edges() {
        for ok in [0.0, 0.5, 1.0] {
            let job =
                build(json!({"prompt": "p", "lora_id": "character-123", "lora_strength": ok}))
                    .unwrap();
            assert_eq!(
                node(&graph(&job), "LoraLoaderModelOnly")["inputs"]["strength_model"],
                ok
            );
        }
        for bad in [-0.01, 1.01] {
            assert_eq!(
                invalid_fields(build(
                    json!({"prompt": "p", "lora_id": "character-123", "lora_strength": bad})
                )),
                vec!["lora_strength"]
            );
        }
    }

    #[test]
    fn the_trigger_word_is_prepended_once() {
        let g = graph(
            &build(
                json!({"prompt": "portrait", "lora_id": "character-123", "trigger_word": "ch4r"}),
            )
            .unwrap(),
        );
        assert_eq!(positive_text(&g), "ch4r, portrait");
        let g = graph(&build(json!({"prompt": "a CH4R portrait", "lora_id": "character-123", "trigger_word": "ch4r"})).unwrap());
        assert_eq!(positive_text(&g), "a CH4R portrait");
        let g = graph(&build(json!({"prompt": "portrait", "lora_id": "character-123"})).unwrap());
        assert_eq!(positive_text(&g), "portrait");
        assert_eq!(
            invalid_fields(build(
                json!({"prompt": "p", "lora_id": "character-123", "trigger_word": "  "})
            )),
            vec!["trigger_word"]
        );
    }

    #[test]
    fn the_trigger_word_does_not_count_in_prompt_length() {
        let job =
            build(json!({"prompt": "abc", "lora_id": "character-123", "trigger_word": "ch4r"}))
                .unwrap();
        let a: Value = serde_json::from_str(&job.analytics).unwrap();
        assert_eq!(a["prompt_length"], 3);
    }

    #[test]
    fn lora_ids_that_are_paths_or_odd_are_refused_naming_lora_id() {
        for bad in [
            "../secret",
            "a/b",
            "/abs",
            "a..b",
            ".hidden",
            "trailing.",
            "tab\there",
            "nul\u{0}",
            "sp ace",
            "ünï",
            "",
        ] {
            assert_eq!(
                invalid_fields(build(json!({"prompt": "p", "lora_id": bad}))),
                vec!["lora_id"],
                "{bad:?}"
            );
        }
        assert_eq!(
            invalid_fields(build(json!({"prompt": "p", "lora_id": "x".repeat(129)}))),
            vec!["lora_id"]
        );
    }

    #[test]
    fn plain_stems_are_accepted() {
        let host = volume().with_model("loras", "Style_v1.2-final.safetensors", 1);
        assert!(build_on(&host, json!({"prompt": "p", "lora_id": "Style_v1.2-final"})).is_ok());
    }

    #[test]
    fn a_missing_lora_is_not_found_naming_the_expected_file() {
        let Err(BuildError::NotFound(error)) =
            build(json!({"prompt": "p", "lora_id": "character-999"}))
        else {
            panic!("expected NotFound")
        };
        assert_eq!(error.field, "lora_id");
        assert!(
            error.message.contains("loras/character-999.safetensors"),
            "{}",
            error.message
        );
    }

    #[test]
    fn a_missing_lora_id_and_other_errors_are_reported_together() {
        assert_eq!(
            invalid_fields(build(json!({"prompt": "p"}))),
            vec!["lora_id"]
        );
        assert_eq!(
            invalid_fields(build(
                json!({"prompt": "p", "lora_id": "a/b", "width": 17, "lora_strength": 2.0})
            )),
            vec!["width", "width", "lora_id", "lora_strength"]
        );
    }

    #[test]
    fn flux_field_edges_are_shared_with_flux_dev() {
        assert!(build(json!({"prompt": "p", "lora_id": "character-123", "width": 2048, "height": 256, "steps": 100, "cfg": 30.0, "guidance": 100.0})).is_ok());
        assert_eq!(
            invalid_fields(build(
                json!({"prompt": "p", "lora_id": "character-123", "steps": 101})
            )),
            vec!["steps"]
        );
        assert_eq!(
            invalid_fields(build(
                json!({"prompt": "p", "lora_id": "character-123", "guidance_scale": 1})
            )),
            vec!["guidance_scale"]
        );
    }

    #[test]
    fn no_flux_models_is_unavailable() {
        let host = FakeHost::new().with_model("loras", "character-123.safetensors", 1);
        assert!(matches!(
            build_on(&host, json!({"prompt": "p", "lora_id": "character-123"})),
            Err(BuildError::Unavailable(_))
        ));
    }

    #[test]
    fn analytics_carry_the_lora_facts() {
        let job = build(
            json!({"prompt": "p", "lora_id": "character-123", "lora_strength": 0.7, "seed": 3}),
        )
        .unwrap();
        let a: Value = serde_json::from_str(&job.analytics).unwrap();
        assert_eq!(a["lora_id"], "character-123");
        assert_eq!(a["lora_strength"], 0.7);
        assert_eq!(a["lora_file_size"], 4321);
        assert_eq!(a["has_seed"], true);
        assert_eq!(a["workflow_type"], "flux-lora");
        for key in ["prompt_length", "width", "height", "steps", "cfg"] {
            assert!(a.get(key).is_some(), "{key}");
        }
    }

    #[test]
    fn the_manifest_declares_the_lora_loader() {
        let m = FluxLora::manifest();
        assert_eq!(
            (m.route.as_str(), m.analytics_prefix.as_str()),
            ("/flux-lora", "modal_lora")
        );
        assert!(m.node_classes.iter().any(|c| c == "LoraLoaderModelOnly"));
        let s: Value = serde_json::from_str(&m.request_schema).unwrap();
        // The LoRA is `lora_id` or `lora` (exactly one, checked by `build`).
        assert_eq!(s["required"], json!(["prompt"]));
        assert_eq!(s["additionalProperties"], false);
        assert_eq!(s["properties"]["lora"]["type"], "object");
    }
}
