//! The Comfy API v2 contract as data: the vendored OpenAPI 3.0.3 document
//! (`host/api/comfy-api-v2.yaml`, MIT, unchanged), flowhost's additions to it (the job list
//! and `GET /api/v2/health`, which the spec does not carry), and the conversion of its
//! schemas to JSON Schema 2020-12 (`nullable: true` → `anyOf [.., null]`).
//!
//! Used by `/openapi.json` (so flowhost describes the v2 paths with the spec's own schemas)
//! and by the conformance harness in `tests/support` (which validates every v2 response a
//! test sees). Must never be edited to make a response pass: the vendored file is the
//! authority; additions go in [`extensions`] only for paths the spec does not have.

use std::sync::OnceLock;

use serde_json::{Map, Value, json};

/// The vendored document, verbatim.
pub const VENDORED_YAML: &str = include_str!("../../../api/comfy-api-v2.yaml");

/// The vendored document parsed to JSON (an empty object if it could not be parsed, which
/// the unit test below rules out for the file shipped).
pub fn vendored() -> &'static Value {
    static DOC: OnceLock<Value> = OnceLock::new();
    DOC.get_or_init(|| match serde_norway::from_str::<Value>(VENDORED_YAML) {
        Ok(doc) => doc,
        Err(err) => {
            tracing::error!(error = %err, "the vendored Comfy API v2 document does not parse");
            json!({})
        }
    })
}

/// The vendored document's paths plus flowhost's additions, in OpenAPI 3.0 form (schemas
/// still use `nullable`; run them through [`to_json_schema`]).
pub fn paths() -> Map<String, Value> {
    let mut paths = vendored().get("paths").and_then(Value::as_object).cloned().unwrap_or_default();
    for (path, item) in extensions() {
        let entry = paths.entry(path).or_insert_with(|| json!({}));
        if let (Value::Object(existing), Value::Object(added)) = (entry, item) {
            for (method, operation) in added {
                existing.entry(method).or_insert(operation); // never replace the spec's own
            }
        }
    }
    paths
}

/// The component schemas in JSON Schema form, keyed by name.
pub fn component_schemas() -> Map<String, Value> {
    let mut schemas = vendored()
        .pointer("/components/schemas")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    schemas.insert("JobList".into(), job_list_schema());
    schemas.insert("V2Health".into(), health_schema());
    schemas.into_iter().map(|(name, schema)| (name, to_json_schema(&schema))).collect()
}

/// A response object with `$ref: '#/components/responses/X'` resolved.
pub fn resolve_response(response: &Value) -> Value {
    if let Some(reference) = response.get("$ref").and_then(Value::as_str) {
        if let Some(name) = reference.strip_prefix("#/components/responses/") {
            return vendored().pointer(&format!("/components/responses/{name}")).cloned().unwrap_or(Value::Null);
        }
    }
    response.clone()
}

/// OpenAPI 3.0 schema → JSON Schema: `nullable: true` becomes `anyOf [schema, {type: null}]`,
/// recursively; `$ref`s keep pointing at `#/components/schemas/..` (the caller embeds the
/// converted components under that pointer).
pub fn to_json_schema(schema: &Value) -> Value {
    match schema {
        Value::Object(object) => {
            let mut converted = Map::new();
            let mut nullable = false;
            for (key, value) in object {
                match key.as_str() {
                    "nullable" => nullable = value.as_bool() == Some(true),
                    "example" => {}
                    "properties" | "patternProperties" => {
                        let props = value
                            .as_object()
                            .map(|props| props.iter().map(|(k, v)| (k.clone(), to_json_schema(v))).collect::<Map<_, _>>())
                            .unwrap_or_default();
                        converted.insert(key.clone(), Value::Object(props));
                    }
                    _ => {
                        converted.insert(key.clone(), to_json_schema(value));
                    }
                }
            }
            if nullable {
                json!({"anyOf": [Value::Object(converted), {"type": "null"}]})
            } else {
                Value::Object(converted)
            }
        }
        Value::Array(items) => Value::Array(items.iter().map(to_json_schema).collect()),
        other => other.clone(),
    }
}

fn error_response(description: &str) -> Value {
    json!({"description": description, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorEnvelope"}}}})
}

fn job_list_schema() -> Value {
    json!({
        "type": "object",
        "description": "One page of jobs, newest first. `next_cursor` is absent on the last page.",
        "required": ["jobs"],
        "properties": {
            "jobs": {"type": "array", "items": {"$ref": "#/components/schemas/Job"}},
            "next_cursor": {"type": "string"}
        }
    })
}

fn health_schema() -> Value {
    json!({
        "type": "object",
        "required": ["status"],
        "properties": {
            "status": {"type": "string", "enum": ["ok", "degraded", "unavailable"]},
            "version": {"type": "string"},
            "comfyui": {"type": "string"}
        }
    })
}

/// flowhost's additions under `/api/v2` (OpenAPI 3.0 form, like the vendored paths).
pub fn extensions() -> Map<String, Value> {
    let mut paths = Map::new();
    paths.insert(
        "/api/v2/jobs".into(),
        json!({"get": {
            "operationId": "listJobs",
            "tags": ["jobs"],
            "summary": "List jobs, newest first (flowhost addition; the shape comfy-sdk's list_jobs reads)",
            "parameters": [
                {"name": "status", "in": "query", "required": false, "schema": {"$ref": "#/components/schemas/JobStatus"}, "description": "Only jobs in this status."},
                {"name": "limit", "in": "query", "required": false, "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 50}},
                {"name": "cursor", "in": "query", "required": false, "schema": {"type": "string"}, "description": "`next_cursor` of the previous page."},
                {"name": "metadata", "in": "query", "required": false, "style": "deepObject", "explode": true,
                 "schema": {"type": "object", "additionalProperties": {"type": "string", "maxLength": 256}, "maxProperties": 16},
                 "description": "flowhost's label extension: `metadata[key]=value` keeps only jobs submitted with that label (`metadata` on POST /api/v2/jobs, `Flowhost-Label` on typed routes); several filters must all match."}
            ],
            "responses": {
                "200": {"description": "One page.", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/JobList"}}}},
                "401": {"$ref": "#/components/responses/Unauthorized"},
                "422": error_response("`invalid_request`: a query parameter is wrong (named in `details.field`)."),
                "500": {"$ref": "#/components/responses/UpstreamError"}
            }
        }}),
    );
    paths.insert(
        "/api/v2/health".into(),
        json!({"get": {
            "operationId": "getHealth",
            "summary": "Whether this surface can take jobs now (flowhost addition)",
            "security": [{}],
            "responses": {
                "200": {"description": "Serving.", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/V2Health"}}}},
                "503": {"description": "Not serving (ComfyUI down).", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/V2Health"}}}}
            }
        }}),
    );
    paths
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vendored_document_parses_with_every_v2_path() {
        let doc = vendored();
        assert_eq!(doc["openapi"], "3.0.3");
        assert_eq!(doc["info"]["version"], "2.0.0");
        let paths = paths();
        for path in ["/api/v2/jobs", "/api/v2/jobs/{id}", "/api/v2/jobs/{id}/events", "/api/v2/assets/{id}/content", "/api/v2/health"] {
            assert!(paths.contains_key(path), "{path}");
        }
        // The addition sits beside the spec's own POST, never replacing it.
        assert_eq!(paths["/api/v2/jobs"]["post"]["operationId"], "postJobs");
        assert_eq!(paths["/api/v2/jobs"]["get"]["operationId"], "listJobs");
    }

    #[test]
    fn nullable_becomes_a_null_alternative() {
        let converted = to_json_schema(&json!({"type": "string", "nullable": true, "example": "x"}));
        assert_eq!(converted, json!({"anyOf": [{"type": "string"}, {"type": "null"}]}));
        let nested = to_json_schema(&json!({"type": "object", "properties": {"nullable": {"type": "integer", "nullable": true}}}));
        assert_eq!(nested["properties"]["nullable"]["anyOf"][1], json!({"type": "null"}));
    }

    #[test]
    fn job_schema_allows_null_progress_but_not_a_missing_one() {
        let schemas = component_schemas();
        let progress = &schemas["Job"]["properties"]["progress"];
        assert_eq!(progress["anyOf"][1], json!({"type": "null"}));
        assert!(schemas["Job"]["required"].as_array().unwrap().contains(&json!("progress")));
    }
}
