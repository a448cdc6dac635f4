//! Helpers for manifests' request schemas (JSON Schema draft 2020-12).
//!
//! Request bodies are strict: `additionalProperties: false`, every field typed and
//! ranged. This module only assembles JSON; it never validates bodies (the host does).

use serde_json::{Map, Value, json};

/// A `pattern` for text that must contain something besides whitespace.
pub const NOT_BLANK: &str = "\\S";

/// The dialect every request schema declares.
pub const DRAFT_2020_12: &str = "https://json-schema.org/draft/2020-12/schema";

/// A strict object schema: `{"$schema", "type": "object", "additionalProperties": false, "required", "properties"}`.
pub fn strict_object(required: &[&str], properties: Map<String, Value>) -> Value {
    json!({
        "$schema": DRAFT_2020_12,
        "type": "object",
        "additionalProperties": false,
        "required": required,
        "properties": properties,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_objects_refuse_unknown_properties() {
        let mut p = Map::new();
        p.insert("prompt".into(), json!({"type": "string"}));
        let s = strict_object(&["prompt"], p);
        assert_eq!(s["additionalProperties"], json!(false));
        assert_eq!(s["required"], json!(["prompt"]));
        assert_eq!(s["properties"]["prompt"]["type"], "string");
    }
}
