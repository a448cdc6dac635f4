//! `GET /openapi.json`: the API as it is right now, assembled from the loaded
//! plugins' manifests (their request schemas are JSON Schema 2020-12, which
//! OpenAPI 3.1 embeds as is), plus the Comfy API v2 paths under `/api/v2` from the
//! vendored contract (`http::v2::spec`, its schemas converted to 3.1).

use axum::Json;
use axum::extract::State;
use serde_json::{Map, Value, json};

use super::AppState;

pub async fn openapi(State(state): State<AppState>) -> Json<Value> {
    Json(document(&state))
}

fn problem_response(description: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    })
}

/// The OpenAPI 3.1 document for the current plugin set.
pub fn document(state: &AppState) -> Value {
    let mut paths = Map::new();
    for plugin in state.registry.snapshot().plugins() {
        let m = &plugin.manifest;
        let mut media = Map::new();
        for media_type in &m.response_media_types {
            media.insert(media_type.clone(), json!({"schema": {"type": "string", "format": "binary"}}));
        }
        media.insert("application/json".into(), json!({"schema": {"$ref": "#/components/schemas/DryRun"}}));
        paths.insert(
            m.route.clone(),
            json!({
                "post": {
                    "operationId": m.name,
                    "summary": m.summary,
                    "description": format!("Served by plugin `{}` {}. Add `?dry_run=true` to get the built ComfyUI workflow as JSON instead of running it.", m.name, m.version),
                    "parameters": [{
                        "name": "dry_run", "in": "query", "required": false,
                        "schema": {"type": "boolean", "default": false},
                        "description": "Validate and build the workflow, return it as JSON, run nothing. `true`/`1` or `false`/`0`; anything else (an empty value included) is a 400."
                    }, {
                        "name": "Prefer", "in": "header", "required": false,
                        "schema": {"type": "string", "enum": ["respond-async"]},
                        "description": "`respond-async`: answer 202 with the job instead of waiting for the media."
                    }, {
                        "name": "Idempotency-Key", "in": "header", "required": false,
                        "schema": {"type": "string", "maxLength": 255},
                        "description": "Same key + same body within 24 h → the same job, no second generation; same key + another body → 422."
                    }, {
                        "name": "Flowhost-Label", "in": "header", "required": false,
                        "schema": {"type": "string"},
                        "description": "Labels for the job, `key=value` (repeatable or comma-separated; at most 16, keys 1–64 of A-Z a-z 0-9 _ - ., values ≤ 256 bytes; else 400 invalid_label). Returned as the Job's `metadata`; find the jobs with GET /api/v2/jobs?metadata[key]=value."
                    }],
                    "requestBody": {"required": true, "content": {"application/json": {"schema": m.request_schema}}},
                    "responses": {
                        "200": {
                            "description": "The generated media (or, with `?dry_run=true`, the built job as application/json). Headers: X-Seed (seed used), X-Generation-Ms, X-Request-Id.",
                            "content": media
                        },
                        "202": {
                            "description": "With `Prefer: respond-async` (RFC 7240): accepted as a job. Follow `Location` (the job at /api/v2/jobs/{id}) or the Job's `urls`; its outputs are in this endpoint's media type.",
                            "headers": {"Location": {"schema": {"type": "string", "format": "uri-reference"}}},
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Job"}}}
                        },
                        "400": problem_response("Invalid request: the first failing fields in `errors` (`errors_omitted` counts the rest)"),
                        "401": problem_response("An API key is required (when keys are configured)"),
                        "403": problem_response("The API key is not allowed here"),
                        "404": problem_response("Something the request names does not exist (e.g. a LoRA file)"),
                        "405": problem_response("Only POST is served here (see Allow)"),
                        "408": problem_response("The body did not arrive in time"),
                        "413": problem_response("Body too large"),
                        "414": problem_response("Request target too long"),
                        "415": problem_response("The body must be application/json"),
                        "431": problem_response("Request headers too large"),
                        "422": problem_response("The input cannot be processed (e.g. no face in the reference image)"),
                        "500": problem_response("The plugin or ComfyUI failed; `plugin` and `node` say where"),
                        "502": problem_response("ComfyUI answered something unreadable"),
                        "503": problem_response("Not ready (ComfyUI down, model missing) or at capacity; see Retry-After"),
                        "504": problem_response("The generation exceeded its deadline and was cancelled")
                    }
                }
            }),
        );
    }
    for (path, item) in super::v2::spec::paths() {
        let mut item = super::v2::spec::to_json_schema(&item);
        as_flowhost_serves(&path, &mut item);
        paths.insert(path, item);
    }
    paths.insert("/health".into(), json!({"get": {"summary": "Service, ComfyUI and per-endpoint readiness", "responses": {"200": {"description": "ready"}, "503": {"description": "not ready"}}}}));
    paths.insert("/plugins".into(), json!({"get": {"summary": "Plugin files: loaded or rejected, with reasons", "responses": {"200": {"description": "the list"}}}}));
    json!({
        "openapi": "3.1.0",
        "info": {"title": "flowhost", "version": env!("CARGO_PKG_VERSION"), "description": "ComfyUI workflows as HTTP endpoints; each endpoint is a WebAssembly plugin."},
        "paths": paths,
        "components": components(),
    })
}

/// Where flowhost's answers on a v2 path are more specific than the vendored contract says, the
/// document describes what flowhost does (the vendored file itself stays as published):
/// asset content comes in the asset's own media type; the event stream is SSE frames, not one
/// string; a request refused outside the workflow (`invalid_request`) is a 422 on every
/// operation that takes input.
fn as_flowhost_serves(path: &str, item: &mut Value) {
    let Value::Object(methods) = item else { return };
    for (method, op) in methods.iter_mut() {
        let Some(responses) = op.get_mut("responses").and_then(Value::as_object_mut) else { continue };
        if path.ends_with("/content") {
            for status in ["200", "206"] {
                if let Some(r) = responses.get_mut(status).and_then(Value::as_object_mut) {
                    r.insert("content".into(), json!({"*/*": {"schema": {"type": "string", "contentMediaType": "application/octet-stream"}}}));
                }
            }
        }
        if path.ends_with("/events") {
            if let Some(Value::Object(content)) = responses.get_mut("200").and_then(|r| r.get_mut("content")) {
                for (_, media) in content.iter_mut() {
                    if let Value::Object(media) = media {
                        media.remove("schema");
                    }
                }
            }
        }
        if matches!(method.as_str(), "post" | "put" | "patch" | "delete" | "get") && !responses.contains_key("422") {
            responses.insert(
                "422".into(),
                json!({"description": "The request is refused (`invalid_request`, or the operation's own 422 codes)", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorEnvelope"}}}}),
            );
        }
    }
}

/// The v2 contract's components (schemas converted to 3.1) and flowhost's `Problem`.
fn components() -> Value {
    let vendored = super::v2::spec::vendored().get("components").cloned().unwrap_or_else(|| json!({}));
    let mut components = match super::v2::spec::to_json_schema(&vendored) {
        Value::Object(map) => map,
        _ => Map::new(),
    };
    let mut schemas = super::v2::spec::component_schemas();
    schemas.insert("Problem".into(), problem_schema());
    schemas.insert("DryRun".into(), json!({
        "type": "object",
        "description": "`?dry_run=true`: the job the plugin built, not run",
        "required": ["workflow", "uploads", "outputs", "output_format"],
        "properties": {
            "workflow": {"type": "object"},
            "uploads": {"type": "array"},
            "outputs": {"type": "array", "items": {"type": "string"}},
            "output_format": {"type": "string"},
            "seed": {"type": ["integer", "null"]},
            "analytics": {"type": "object"},
            "plugin": {"type": "object"},
            "preflight": {"type": "object"}
        }
    }));
    components.insert("schemas".into(), Value::Object(schemas));
    Value::Object(components)
}

fn problem_schema() -> Value {
    json!({
            "type": "object",
            "description": "RFC 9457 problem details",
            "required": ["type", "title", "status", "detail"],
            "properties": {
                "type": {"type": "string", "format": "uri"},
                "title": {"type": "string"},
                "status": {"type": "integer"},
                "detail": {"type": "string"},
                "errors": {"type": "array", "items": {"type": "object", "properties": {"field": {"type": "string"}, "message": {"type": "string"}}}},
                "plugin": {"type": "string"},
                "node": {"type": "object"}
            }
    })
}
