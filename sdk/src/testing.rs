//! Helpers for a plugin's native unit tests (`cargo test`, no wasm): build a
//! [`Request`], read the built workflow, find nodes by class, and list the
//! fields a refusal names. Together with [`crate::host::FakeHost`] they are
//! what every bundled plugin's tests use.
//!
//! These helpers panic with a message on anything unexpected: they are for
//! tests, never for plugin code paths.

use serde_json::Value;

use crate::{BuildError, FieldError, Job, Request};

/// A request carrying `body`, as the host would send it after schema checks.
pub fn request(body: &Value, random_seed: u64) -> Request {
    Request { body: body.to_string(), random_seed, request_id: "test-request".into() }
}

/// The job's workflow as JSON.
pub fn workflow(job: &Job) -> Value {
    serde_json::from_str(&job.workflow).unwrap_or_else(|e| panic!("the built workflow is not JSON: {e}"))
}

/// Every node of `class` in the workflow, with its id.
pub fn nodes_of<'a>(workflow: &'a Value, class: &str) -> Vec<(&'a String, &'a Value)> {
    workflow
        .as_object()
        .map(|nodes| nodes.iter().filter(|(_, n)| n["class_type"] == class).collect())
        .unwrap_or_default()
}

/// The one node of `class` (panics unless there is exactly one).
pub fn the_node<'a>(workflow: &'a Value, class: &str) -> (&'a String, &'a Value) {
    let found = nodes_of(workflow, class);
    assert_eq!(found.len(), 1, "exactly one {class}");
    found[0]
}

/// The field errors of an `InvalidRequest` refusal (panics on anything else).
pub fn invalid_request(result: Result<Job, BuildError>) -> Vec<FieldError> {
    match result {
        Err(BuildError::InvalidRequest(errors)) => errors,
        other => panic!("expected InvalidRequest, got {other:?}"),
    }
}

/// The fields an `InvalidRequest` refusal names, in order.
pub fn invalid_fields(result: Result<Job, BuildError>) -> Vec<String> {
    invalid_request(result).into_iter().map(|e| e.field).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn finds_nodes_by_class() {
        let g = json!({"1": {"class_type": "A"}, "2": {"class_type": "B"}, "3": {"class_type": "A"}});
        assert_eq!(nodes_of(&g, "A").len(), 2);
        assert_eq!(the_node(&g, "B").0, "2");
    }

    #[test]
    fn lists_refused_fields() {
        let refusal = Err(BuildError::InvalidRequest(vec![FieldError { field: "width".into(), message: "m".into() }]));
        assert_eq!(invalid_fields(refusal), vec!["width".to_string()]);
    }
}
