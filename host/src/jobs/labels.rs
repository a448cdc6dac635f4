//! Job labels: caller metadata (`{"batch": "nightly", "character": "c-123"}`) kept with a
//! job, returned on it, and filterable in the job list — a flowhost extension beside the
//! Comfy API v2 contract (the contract has no field for it; clients that ignore the
//! `metadata` member see a conforming Job).
//!
//! Owns the bounds (key count, key and value sizes, key characters) and their error. Must
//! never let a label name anything (a path, a column): labels are matched as values only.

use std::collections::BTreeMap;

/// At most this many labels on one job.
pub const MAX_LABELS: usize = 16;
/// Longest key, in bytes (keys are `A-Z a-z 0-9 _ - .`).
pub const MAX_KEY_BYTES: usize = 64;
/// Longest value, in bytes (any printable text).
pub const MAX_VALUE_BYTES: usize = 256;

/// A job's labels, sorted by key.
pub type Labels = BTreeMap<String, String>;

/// Why a set of labels was refused; `field` is what the caller wrote (`metadata.batch`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct LabelError {
    pub field: String,
    pub reason: String,
}

fn refuse(field: impl Into<String>, reason: impl Into<String>) -> LabelError {
    LabelError { field: field.into(), reason: reason.into() }
}

/// A key as accepted: 1–64 bytes of `A-Z a-z 0-9 _ - .`.
pub fn check_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > MAX_KEY_BYTES || !key.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')) {
        return Err(format!("keys are 1 to {MAX_KEY_BYTES} characters of A-Z, a-z, 0-9, '_', '-', '.'"));
    }
    Ok(())
}

/// A value as accepted: at most 256 bytes, no control characters.
pub fn check_value(value: &str) -> Result<(), String> {
    if value.len() > MAX_VALUE_BYTES || value.chars().any(char::is_control) {
        return Err(format!("values are strings of at most {MAX_VALUE_BYTES} bytes without control characters"));
    }
    Ok(())
}

/// Labels from a JSON object of strings (`field` prefixes each error: `metadata`).
pub fn from_json(field: &str, value: &serde_json::Value) -> Result<Labels, LabelError> {
    let Some(object) = value.as_object() else {
        return Err(refuse(field, "must be an object of string values"));
    };
    if object.len() > MAX_LABELS {
        return Err(refuse(field, format!("at most {MAX_LABELS} keys (got {})", object.len())));
    }
    let mut labels = Labels::new();
    for (key, value) in object {
        let name = || format!("{field}.{}", key.chars().take(MAX_KEY_BYTES).collect::<String>());
        check_key(key).map_err(|reason| refuse(name(), reason))?;
        let Some(value) = value.as_str() else {
            return Err(refuse(name(), "values must be strings"));
        };
        check_value(value).map_err(|reason| refuse(name(), reason))?;
        labels.insert(key.clone(), value.to_string());
    }
    Ok(labels)
}

/// Labels from `key=value` pairs (the typed routes' `Flowhost-Label` header, one pair per
/// value, comma-separated pairs allowed).
pub fn from_pairs<'a>(field: &str, pairs: impl IntoIterator<Item = &'a str>) -> Result<Labels, LabelError> {
    let mut labels = Labels::new();
    for pair in pairs.into_iter().flat_map(|v| v.split(',')).map(str::trim).filter(|p| !p.is_empty()) {
        let Some((key, value)) = pair.split_once('=') else {
            return Err(refuse(field, "write each label as key=value"));
        };
        let (key, value) = (key.trim(), value.trim());
        check_key(key).map_err(|reason| refuse(format!("{field} {key}"), reason))?;
        check_value(value).map_err(|reason| refuse(format!("{field} {key}"), reason))?;
        labels.insert(key.to_string(), value.to_string());
        if labels.len() > MAX_LABELS {
            return Err(refuse(field, format!("at most {MAX_LABELS} labels")));
        }
    }
    Ok(labels)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn labels_are_bounded_and_named_in_errors() {
        let ok = from_json("metadata", &json!({"batch": "nightly", "character.id": "c-123"})).unwrap();
        assert_eq!(ok["batch"], "nightly");
        let many: serde_json::Map<String, serde_json::Value> = (0..17).map(|i| (format!("k{i}"), json!("v"))).collect();
        assert_eq!(from_json("metadata", &serde_json::Value::Object(many)).unwrap_err().field, "metadata");
        assert_eq!(from_json("metadata", &json!({"a b": "v"})).unwrap_err().field, "metadata.a b");
        assert_eq!(from_json("metadata", &json!({"k": 1})).unwrap_err().field, "metadata.k");
        assert!(from_json("metadata", &json!({"k": "x".repeat(257)})).is_err());
        assert!(from_json("metadata", &json!({"k".repeat(65): "v"})).is_err());
        assert!(from_json("metadata", &json!(["k"])).is_err());
    }

    #[test]
    fn header_pairs_read_like_the_body() {
        let labels = from_pairs("Flowhost-Label", ["batch=nightly, character=c-1", "run=7"]).unwrap();
        assert_eq!(labels.len(), 3);
        assert_eq!(labels["character"], "c-1");
        assert!(from_pairs("Flowhost-Label", ["novalue"]).is_err());
        assert!(from_pairs("Flowhost-Label", ["a/b=1"]).is_err());
    }
}
