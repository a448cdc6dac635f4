//! A plugin built with wit-bindgen directly against the frozen contract
//! `flowhost:plugin@0.2.0` (`wit/deps/flowhost-plugin@0.2.0`), as plugins were
//! before 0.3.0 shipped: it must keep loading and serving beside 0.1.0 and 0.3.0
//! plugins. `POST /legacy2 {"prompt": "..."}` builds EmptyImage → SaveImage and
//! declares its (empty) model set and no progress hints.
wit_bindgen::generate!({ path: "../../../wit/deps/flowhost-plugin@0.2.0", world: "plugin" });

use exports::flowhost::plugin::endpoint::Guest;
use flowhost::plugin::types::*;

struct Legacy2;

impl Guest for Legacy2 {
    fn describe() -> Manifest {
        Manifest {
            name: "legacy2".into(),
            version: "0.2.5".into(),
            route: "/legacy2".into(),
            summary: "A contract 0.2.0 plugin".into(),
            request_schema: r#"{"type":"object","required":["prompt"],"properties":{"prompt":{"type":"string"}},"additionalProperties":false}"#.into(),
            response_media_types: vec!["image/jpeg".into()],
            analytics_prefix: "legacy2".into(),
            node_classes: vec!["EmptyImage".into(), "SaveImage".into()],
            models: vec![],
            warm_up: None,
        }
    }

    fn build(request: Request) -> Result<Job, BuildError> {
        if request.body.contains("\"forbidden\"") {
            return Err(BuildError::InvalidRequest(vec![FieldError {
                field: "prompt".into(),
                message: "forbidden by the 0.2 plugin".into(),
            }]));
        }
        let color = request.random_seed % 16_777_216;
        Ok(Job {
            workflow: format!(
                r#"{{"1":{{"class_type":"EmptyImage","inputs":{{"width":32,"height":32,"batch_size":1,"color":{color}}}}},"2":{{"class_type":"SaveImage","inputs":{{"images":["1",0],"filename_prefix":"legacy2"}}}}}}"#
            ),
            uploads: vec![],
            outputs: vec!["2".into()],
            output_format: OutputFormat::Jpeg,
            seed: Some(request.random_seed),
            analytics: "{}".into(),
            caller_nodes: vec![],
            models: ModelSet {
                base: None,
                loras: vec![],
                others: vec![],
            },
            progress: vec![],
        })
    }

    fn explain_failure(_failure: ExecutionFailure) -> Option<UserError> {
        None
    }
}

export!(Legacy2);
