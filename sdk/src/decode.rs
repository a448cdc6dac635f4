//! Request decoding: the JSON body into a plugin's own typed struct, and small
//! validators that collect *every* problem before answering.
//!
//! Every error names the exact field as a `/`-separated JSON path (`width`,
//! `loras/0/name`), so the host can answer one 400 listing all of them. This module
//! never decides defaults or ranges: the plugin's types and checks do.
//!
//! ```
//! use flowhost_sdk::decode::{decode, Checks};
//! #[derive(serde::Deserialize)]
//! #[serde(deny_unknown_fields)]
//! struct Body { prompt: String, #[serde(default = "w")] width: u32 }
//! fn w() -> u32 { 1024 }
//!
//! let body: Body = decode(r#"{"prompt": "a cat", "width": 1000}"#).unwrap();
//! let mut checks = Checks::new();
//! checks.non_empty("prompt", &body.prompt).range("width", body.width, 256, 2048).multiple_of("width", body.width as u64, 16);
//! let err = checks.finish().unwrap_err();
//! ```

use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::{BuildError, FieldError};

/// A [`FieldError`] from a field path and a message.
pub fn field_error(field: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        message: message.into(),
    }
}

/// The field name used for problems with the body as a whole (not JSON, not an object).
pub const BODY_FIELD: &str = "body";

/// Decode the JSON body (which must be an object) into `T`. A serde failure becomes
/// `InvalidRequest` with one [`FieldError`] naming the field's path (unknown fields
/// are named themselves, missing ones too). `T` may borrow from the body
/// (`#[serde(borrow)] image: Cow<'a, str>`) so large fields are not copied.
pub fn decode<'de, T: Deserialize<'de>>(body: &'de str) -> Result<T, BuildError> {
    let body_error =
        |message: String| BuildError::InvalidRequest(vec![field_error(BODY_FIELD, message)]);
    if !body.trim_start().starts_with('{') {
        return Err(body_error("the body must be a JSON object".into()));
    }
    // Straight from the text (no intermediate `Value`): a 10 MiB data URL is held once, not twice.
    let mut deserializer = serde_json::Deserializer::from_str(body);
    let decoded: T = serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
        let path = json_path(e.path());
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            body_error(format!("the body is not valid JSON: {inner}"))
        } else {
            BuildError::InvalidRequest(vec![serde_field_error(
                &path,
                &message_without_position(&inner),
            )])
        }
    })?;
    deserializer
        .end()
        .map_err(|e| body_error(format!("the body is not valid JSON: {e}")))?;
    Ok(decoded)
}

/// serde_json's message without its ` at line L column C` suffix.
fn message_without_position(error: &serde_json::Error) -> String {
    let text = error.to_string();
    let suffix = format!(" at line {} column {}", error.line(), error.column());
    text.strip_suffix(&suffix)
        .map(str::to_string)
        .unwrap_or(text)
}

/// Like [`decode`], from an already-parsed JSON value.
pub fn decode_value<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, BuildError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = json_path(e.path());
        BuildError::InvalidRequest(vec![serde_field_error(&path, &e.inner().to_string())])
    })
}

/// `a.b[0]` (serde_path_to_error's notation) as `a/b/0`; the root is empty.
fn json_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let parts: Vec<String> = path
        .iter()
        .filter_map(|segment| match segment {
            Segment::Seq { index } => Some(index.to_string()),
            Segment::Map { key } => Some(key.clone()),
            Segment::Enum { variant } => Some(variant.clone()),
            Segment::Unknown => None,
        })
        .collect();
    parts.join("/")
}

/// Turn serde's message into a field error; `unknown field` and `missing field`
/// messages name the field inside the path they were found at.
fn serde_field_error(path: &str, message: &str) -> FieldError {
    let join = |name: &str| {
        if path.is_empty() {
            name.to_string()
        } else {
            format!("{path}/{name}")
        }
    };
    if let Some(rest) = message.strip_prefix("unknown field `")
        && let Some((name, tail)) = rest.split_once('`')
    {
        let expected = tail.trim_start_matches(", ");
        let hint = if expected.is_empty() {
            String::new()
        } else {
            format!("; {expected}")
        };
        // The path already ends at the unknown field itself.
        let field = if path.rsplit('/').next() == Some(name) {
            path.to_string()
        } else {
            join(name)
        };
        return field_error(field, format!("unknown field{hint}"));
    }
    if let Some(rest) = message.strip_prefix("missing field `")
        && let Some((name, _)) = rest.split_once('`')
    {
        return field_error(join(name), "this field is required");
    }
    let field = if path.is_empty() {
        BODY_FIELD.to_string()
    } else {
        path.to_string()
    };
    field_error(field, message)
}

/// Collects field problems; [`Checks::finish`] turns them into one `InvalidRequest`.
#[derive(Debug, Default, Clone)]
pub struct Checks {
    errors: Vec<FieldError>,
}

impl Checks {
    pub fn new() -> Self {
        Self::default()
    }

    /// Record a problem with `field`.
    pub fn fail(&mut self, field: &str, message: impl Into<String>) -> &mut Self {
        self.errors.push(field_error(field, message));
        self
    }

    /// `min <= value <= max`.
    pub fn range<T: PartialOrd + std::fmt::Display>(
        &mut self,
        field: &str,
        value: T,
        min: T,
        max: T,
    ) -> &mut Self {
        if value < min || value > max {
            self.fail(
                field,
                format!("must be between {min} and {max} (inclusive), got {value}"),
            );
        }
        self
    }

    /// `value` is a multiple of `step` (`step` 0 accepts everything).
    pub fn multiple_of(&mut self, field: &str, value: u64, step: u64) -> &mut Self {
        if step != 0 && !value.is_multiple_of(step) {
            let lower = value - value % step;
            self.fail(
                field,
                format!(
                    "must be a multiple of {step}, got {value} (nearest: {lower} or {})",
                    lower + step
                ),
            );
        }
        self
    }

    /// The text has something besides whitespace.
    pub fn non_empty(&mut self, field: &str, value: &str) -> &mut Self {
        if value.trim().is_empty() {
            self.fail(field, "must not be empty");
        }
        self
    }

    /// At most `max` characters (Unicode scalar values).
    pub fn max_chars(&mut self, field: &str, value: &str, max: usize) -> &mut Self {
        let count = value.chars().count();
        if count > max {
            self.fail(
                field,
                format!("must be at most {max} characters, got {count}"),
            );
        }
        self
    }

    /// `value` is one of `allowed`.
    pub fn one_of(&mut self, field: &str, value: &str, allowed: &[&str]) -> &mut Self {
        if !allowed.contains(&value) {
            self.fail(
                field,
                format!("must be one of {}, got {value:?}", allowed.join(", ")),
            );
        }
        self
    }

    /// Problems recorded so far.
    pub fn errors(&self) -> &[FieldError] {
        &self.errors
    }

    pub fn is_ok(&self) -> bool {
        self.errors.is_empty()
    }

    /// `Ok` when nothing failed, else every problem in one `InvalidRequest`.
    pub fn finish(self) -> Result<(), BuildError> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(BuildError::InvalidRequest(self.errors))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        prompt: String,
        #[serde(default)]
        width: Option<u32>,
        #[serde(default)]
        #[allow(dead_code)]
        loras: Vec<Lora>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Lora {
        #[allow(dead_code)]
        name: String,
    }

    fn field_errors(result: Result<Body, BuildError>) -> Vec<FieldError> {
        match result {
            Err(BuildError::InvalidRequest(errors)) => errors,
            other => panic!("expected InvalidRequest, got {other:?}"),
        }
    }

    #[test]
    fn a_valid_body_decodes() {
        let body: Body = decode(r#"{"prompt": "a cat", "width": 512}"#).unwrap();
        assert_eq!(body.prompt, "a cat");
        assert_eq!(body.width, Some(512));
    }

    #[test]
    fn an_unknown_field_is_named_itself() {
        let errors = field_errors(decode(r#"{"prompt": "a", "guidance_scale": 3}"#));
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].field, "guidance_scale");
        assert!(
            errors[0].message.contains("unknown field"),
            "{}",
            errors[0].message
        );
        assert!(
            errors[0].message.contains("prompt"),
            "lists the expected fields: {}",
            errors[0].message
        );
    }

    #[test]
    fn a_missing_field_is_named() {
        let errors = field_errors(decode(r#"{"width": 512}"#));
        assert_eq!(errors[0].field, "prompt");
        assert_eq!(errors[0].message, "this field is required");
    }

    #[test]
    fn a_wrongly_typed_field_is_named_by_path() {
        let errors = field_errors(decode(r#"{"prompt": "a", "width": "wide"}"#));
        assert_eq!(errors[0].field, "width");
        assert!(
            !errors[0].message.contains(" at line "),
            "{}",
            errors[0].message
        );
        assert!(
            errors[0].message.contains("invalid type"),
            "{}",
            errors[0].message
        );
        let errors = field_errors(decode(r#"{"prompt": "a", "width": -1}"#));
        assert_eq!(errors[0].field, "width");
        let errors = field_errors(decode(
            r#"{"prompt": "a", "loras": [{"name": "x"}, {"name": 3}]}"#,
        ));
        assert_eq!(errors[0].field, "loras/1/name");
        let errors = field_errors(decode(
            r#"{"prompt": "a", "loras": [{"name": "x", "nmae": 1}]}"#,
        ));
        assert_eq!(errors[0].field, "loras/0/nmae");
    }

    #[test]
    fn a_body_that_is_not_json_or_not_an_object_names_the_body() {
        let errors = field_errors(decode("{not json"));
        assert_eq!(errors[0].field, BODY_FIELD);
        let errors = field_errors(decode("[1, 2]"));
        assert_eq!(errors[0].field, BODY_FIELD);
        let errors = field_errors(decode(r#"{"prompt": "a"} trailing"#));
        assert_eq!(errors[0].field, BODY_FIELD);
    }

    #[test]
    fn checks_collect_every_problem_in_order() {
        let mut checks = Checks::new();
        checks
            .non_empty("prompt", "  ")
            .range("width", 255u32, 256, 2048)
            .multiple_of("width", 255, 16)
            .range("height", 1024u32, 256, 2048)
            .max_chars("negative_prompt", "abc", 2)
            .one_of("face_provider", "TPU", &["CPU", "CUDA"]);
        let fields: Vec<&str> = checks.errors().iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            vec![
                "prompt",
                "width",
                "width",
                "negative_prompt",
                "face_provider"
            ]
        );
        assert!(
            checks.errors()[2].message.contains("240 or 256"),
            "{}",
            checks.errors()[2].message
        );
        assert!(matches!(checks.finish(), Err(BuildError::InvalidRequest(e)) if e.len() == 5));
    }

    #[test]
    fn range_edges_are_inclusive() {
        let mut checks = Checks::new();
        checks
            .range("a", 256, 256, 2048)
            .range("b", 2048, 256, 2048)
            .range("c", 0.0, 0.0, 1.0)
            .range("d", 1.0, 0.0, 1.0);
        assert!(checks.is_ok());
        checks
            .range("e", 2049, 256, 2048)
            .range("f", 1.01, 0.0, 1.0);
        assert_eq!(checks.errors().len(), 2);
    }

    #[test]
    fn empty_checks_finish_ok() {
        assert!(Checks::new().finish().is_ok());
    }
}
