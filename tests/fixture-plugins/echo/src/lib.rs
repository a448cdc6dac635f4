//! A well-behaved test plugin: `POST /echo {"prompt": "..."}` builds a tiny
//! EmptyImage → SaveImage graph. Its version and route can be set at build time
//! (`FIXTURE_VERSION`, `FIXTURE_ROUTE`) so tests can hot-swap versions and
//! provoke route conflicts.

use flowhost_sdk::{BuildError, FieldError, Host, Job, Manifest, OutputFormat, Plugin, Request};

struct Echo;

const VERSION: &str = match option_env!("FIXTURE_VERSION") {
    Some(v) => v,
    None => "1.0.0",
};
const ROUTE: &str = match option_env!("FIXTURE_ROUTE") {
    Some(r) => r,
    None => "/echo",
};
const NAME: Option<&str> = option_env!("FIXTURE_NAME");

impl Plugin for Echo {
    fn manifest() -> Manifest {
        Manifest {
            name: NAME.map(str::to_string).unwrap_or_else(|| format!("echo{}", ROUTE.trim_start_matches("/echo"))),
            version: VERSION.into(),
            route: ROUTE.into(),
            summary: "Test plugin: a tiny graph carrying the prompt".into(),
            request_schema: serde_json::json!({
                "type": "object",
                "additionalProperties": false,
                "required": ["prompt"],
                "properties": {
                    "prompt": {"type": "string", "minLength": 1},
                    "width": {"type": "integer", "minimum": 8, "maximum": 4096, "default": 64},
                    "height": {"type": "integer", "minimum": 8, "maximum": 4096, "default": 64},
                    "seed": {"type": "integer", "minimum": 0}
                }
            })
            .to_string(),
            response_media_types: vec!["image/jpeg".into()],
            analytics_prefix: "echo".into(),
            node_classes: vec!["EmptyImage".into(), "SaveImage".into()],
            models: vec![],
            warm_up: None,
        }
    }

    fn build(request: &Request, _host: &dyn Host) -> Result<Job, BuildError> {
        let body: serde_json::Value = serde_json::from_str(&request.body)
            .map_err(|e| BuildError::Internal(format!("body is not JSON: {e}")))?;
        let prompt = body["prompt"].as_str().unwrap_or_default();
        if prompt == "forbidden" {
            return Err(BuildError::InvalidRequest(vec![FieldError {
                field: "prompt".into(),
                message: "this prompt is forbidden by the plugin".into(),
            }]));
        }
        let width = body["width"].as_u64().unwrap_or(64);
        let height = body["height"].as_u64().unwrap_or(64);
        let seed = body["seed"].as_u64().unwrap_or(request.random_seed);
        let workflow = serde_json::json!({
            "1": {"class_type": "EmptyImage", "inputs": {"width": width, "height": height, "batch_size": 1, "color": seed % 16777216}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": format!("echo-{VERSION}")}},
        });
        Ok(Job {
            workflow: workflow.to_string(),
            uploads: vec![],
            outputs: vec!["2".into()],
            output_format: OutputFormat::Jpeg,
            seed: Some(seed),
            analytics: serde_json::json!({"prompt_length": prompt.len(), "version": VERSION}).to_string(),
            caller_nodes: vec![],
            models: Default::default(),
            progress: vec![],
            fetches: vec![],
        })
    }
}

flowhost_sdk::register!(Echo);
