//! Checking a request body against a plugin's JSON Schema, with errors a person
//! can act on: one entry per failing field, the field named by its path, and for
//! an unknown field the closest known name ("did you mean `guidance`?") — the old
//! service silently dropped `guidance_scale` and `num_inference_steps`.

use jsonschema::error::ValidationErrorKind;
use serde_json::Value;

use super::{FieldProblem, truncate_chars};

/// Most characters of a caller's value (or unknown field name) echoed in one message.
pub const ECHO_CHARS: usize = 200;

/// `value` as a message may quote it: JSON, cut to [`ECHO_CHARS`] characters.
fn echo(value: &Value) -> String {
    match value {
        Value::String(s) if s.len() > ECHO_CHARS => format!("\"{}…\" ({} characters)", truncate_chars(s, ECHO_CHARS), s.chars().count()),
        Value::Array(_) | Value::Object(_) | Value::String(_) => truncate_chars(&value.to_string(), ECHO_CHARS),
        other => other.to_string(),
    }
}

/// Every way `body` fails `schema` (compiled as `validator`); empty = valid.
pub fn check(validator: &jsonschema::Validator, schema: &Value, body: &Value) -> Vec<FieldProblem> {
    let mut problems: Vec<FieldProblem> = Vec::new();
    for error in validator.iter_errors(body) {
        let path = error.instance_path().to_string();
        let base = path.trim_start_matches('/').to_string();
        match error.kind() {
            ValidationErrorKind::AdditionalProperties { unexpected } => {
                let known = known_properties(schema, &base);
                for name in unexpected {
                    let name = &truncate_chars(name, ECHO_CHARS);
                    let field = join(&base, name);
                    let message = match closest(name, &known) {
                        Some(suggestion) => format!("unknown field `{name}`; did you mean `{suggestion}`?"),
                        None if known.is_empty() => format!("unknown field `{name}`"),
                        None => format!("unknown field `{name}`; known fields: {}", known.join(", ")),
                    };
                    problems.push(FieldProblem { field, message });
                }
            }
            ValidationErrorKind::Required { property } => {
                let name = property.as_str().map(str::to_string).unwrap_or_else(|| property.to_string());
                problems.push(FieldProblem { field: join(&base, &name), message: "is required".into() });
            }
            _ => {
                let message = error.masked_with(echo(error.instance())).to_string();
                problems.push(FieldProblem { field: base, message });
            }
        }
    }
    problems.dedup();
    problems
}

fn join(base: &str, name: &str) -> String {
    if base.is_empty() { name.to_string() } else { format!("{base}/{name}") }
}

/// The property names the schema allows at `path` (top level, or nested objects
/// reached through `properties`).
fn known_properties(schema: &Value, path: &str) -> Vec<String> {
    let mut node = schema;
    if !path.is_empty() {
        for segment in path.split('/') {
            match node.get("properties").and_then(|p| p.get(segment)) {
                Some(next) => node = next,
                None => return Vec::new(),
            }
        }
    }
    node.get("properties")
        .and_then(Value::as_object)
        .map(|props| props.keys().cloned().collect())
        .unwrap_or_default()
}

/// The known name closest to `name`, if it is close enough to be a likely typo
/// or a synonym sharing most of its letters (`guidance_scale` → `guidance`,
/// `num_inference_steps` → `steps`).
fn closest(name: &str, known: &[String]) -> Option<String> {
    let lower = name.to_ascii_lowercase();
    let mut best: Option<(f64, &String)> = None;
    for candidate in known {
        let mut score = strsim::jaro_winkler(&lower, candidate);
        // A known name contained in the unknown one (`guidance` in
        // `guidance_scale`) is a strong hint.
        if candidate.len() >= 4 && lower.contains(candidate.as_str()) {
            score = score.max(0.9);
        }
        if best.is_none_or(|(s, _)| score > s) {
            best = Some((score, candidate));
        }
    }
    best.filter(|(score, _)| *score >= 0.8).map(|(_, c)| c.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Value {
        json!({
            "type": "object",
            "additionalProperties": false,
            "required": ["prompt"],
            "properties": {
                "prompt": {"type": "string", "minLength": 1},
                "steps": {"type": "integer", "minimum": 1, "maximum": 100},
                "guidance": {"type": "number"},
                "width": {"type": "integer", "multipleOf": 16}
            }
        })
    }

    fn run(body: Value) -> Vec<FieldProblem> {
        let s = schema();
        let v = jsonschema::validator_for(&s).unwrap();
        check(&v, &s, &body)
    }

    #[test]
    fn names_every_failing_field_at_once() {
        let problems = run(json!({"steps": 0, "width": 1000}));
        let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
        assert!(fields.contains(&"prompt"), "{problems:?}");
        assert!(fields.contains(&"steps"), "{problems:?}");
        assert!(fields.contains(&"width"), "{problems:?}");
    }

    #[test]
    fn unknown_fields_get_a_suggestion() {
        let problems = run(json!({"prompt": "x", "guidance_scale": 3.5, "num_inference_steps": 20, "zzz": 1}));
        let msg = |f: &str| problems.iter().find(|p| p.field == f).map(|p| p.message.clone()).unwrap_or_default();
        assert!(msg("guidance_scale").contains("did you mean `guidance`"), "{problems:?}");
        assert!(msg("num_inference_steps").contains("did you mean `steps`"), "{problems:?}");
        assert!(msg("zzz").contains("known fields"), "{problems:?}");
    }

    #[test]
    fn wrong_types_are_reported_with_the_field() {
        let problems = run(json!({"prompt": 5}));
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].field, "prompt");
        assert!(problems[0].message.contains("string"), "{problems:?}");
    }

    #[test]
    fn a_ten_megabyte_prompt_is_not_echoed_back() {
        let s = json!({"type": "object", "properties": {"prompt": {"type": "string", "maxLength": 100}}});
        let v = jsonschema::validator_for(&s).unwrap();
        let problems = check(&v, &s, &json!({"prompt": "a".repeat(10 << 20)}));
        assert_eq!(problems.len(), 1);
        assert!(problems[0].message.len() < 2 * ECHO_CHARS + 100, "{} bytes", problems[0].message.len());
        assert!(problems[0].message.contains("longer than 100"), "{}", problems[0].message);
    }

    #[test]
    fn a_huge_unknown_field_name_is_cut() {
        let problems = run(json!({"prompt": "x", "k".repeat(100_000): 1}));
        assert_eq!(problems.len(), 1);
        assert!(problems[0].field.chars().count() <= ECHO_CHARS + 1, "{}", problems[0].field.len());
    }

    #[test]
    fn a_valid_body_passes() {
        assert!(run(json!({"prompt": "a cat", "steps": 20})).is_empty());
    }
}
