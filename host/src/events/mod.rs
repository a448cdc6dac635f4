//! Product analytics: the events a generation emits (named per plugin from its
//! manifest's `analytics_prefix`) and their delivery to PostHog in the background.
//!
//! Owns event naming, event properties and delivery. Must never block or fail a request:
//! [`Analytics::emit`] is synchronous and cheap, a full buffer drops the oldest event
//! (counted in [`Analytics::dropped`]), and a PostHog outage only costs events.
//!
//! Use: build a [`GenerationEvents`] per request and emit its events:
//! ```ignore
//! let events = GenerationEvents { prefix, plugin, plugin_version, route, request_id,
//!                                 distinct_id: events::distinct_id(&headers, caller) };
//! analytics.emit(events.requested());
//! // after `build` succeeded:
//! if let Some(event) = events.resolved(&props) { analytics.emit(event) }
//! analytics.emit(events.completed(&props, &timings));   // or events.failed(..)
//! ```

mod names;
mod posthog;


use std::time::{Duration, SystemTime};

use axum::http::HeaderMap;
use serde_json::{Map, Value};

use crate::auth::Caller;

pub use names::{APP_DEPLOYED, GenerationEvents, SEED_EXTRA_EVENTS, Stage, event_name};
pub use posthog::{Analytics, AnalyticsConfig, DEFAULT_POSTHOG_HOST};

/// Header a caller may set to name the end user behind a request.
pub const DISTINCT_ID_HEADER: &str = "x-distinct-id";
/// `distinct_id` of requests with neither a header nor a named key.
pub const ANONYMOUS: &str = "anonymous";
/// Longest accepted `X-Distinct-Id`; longer values are ignored.
pub const MAX_DISTINCT_ID_LEN: usize = 200;

/// One analytics event, ready to send.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Full event name (`modal_flux_dev_generation_completed`).
    pub name: String,
    pub distinct_id: String,
    pub properties: Map<String, Value>,
    pub timestamp: SystemTime,
}

impl Event {
    /// An event named `name` happening now.
    pub fn new(
        name: impl Into<String>,
        distinct_id: impl Into<String>,
        properties: Map<String, Value>,
    ) -> Self {
        Self {
            name: name.into(),
            distinct_id: distinct_id.into(),
            properties,
            timestamp: SystemTime::now(),
        }
    }

    /// `modal_app_deployed`, emitted once at startup with the plugins being served
    /// (`(name, version, route)` each). Its `distinct_id` is `flowhost` (the service itself).
    pub fn app_deployed(flowhost_version: &str, plugins: &[(String, String, String)]) -> Self {
        let mut properties = Map::new();
        properties.insert("flowhost_version".into(), flowhost_version.into());
        properties.insert("plugin_count".into(), plugins.len().into());
        properties.insert(
            "plugins".into(),
            plugins
                .iter()
                .map(|(name, version, route)| serde_json::json!({"name": name, "version": version, "route": route}))
                .collect(),
        );
        Self::new(APP_DEPLOYED, "flowhost", properties)
    }
}

/// How long each phase of a generation took; `None` = the phase did not run.
/// Sent as `{phase}_ms` properties and observed by the metrics histograms.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JobTimings {
    /// The plugin's `build` call (wasm).
    pub plugin_build: Option<Duration>,
    /// Uploads + waiting in ComfyUI's queue until execution started.
    pub queue_wait: Option<Duration>,
    /// ComfyUI execution.
    pub execution: Option<Duration>,
    /// Fetching and encoding outputs.
    pub encode: Option<Duration>,
    /// The whole request.
    pub total: Option<Duration>,
}

impl JobTimings {
    /// `(property name, duration)` for each phase that ran.
    pub fn phases(&self) -> impl Iterator<Item = (&'static str, Duration)> {
        [
            ("plugin_build_ms", self.plugin_build),
            ("queue_wait_ms", self.queue_wait),
            ("execution_ms", self.execution),
            ("encode_ms", self.encode),
            ("total_ms", self.total),
        ]
        .into_iter()
        .filter_map(|(name, duration)| duration.map(|d| (name, d)))
    }
}

/// Why a generation failed, as the seed's `error_type` property.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The job exceeded its time limit (504).
    Timeout,
    /// A model file is missing or failed to load (503 missing model; execution errors in
    /// model loader nodes).
    ModelError,
    /// Anything else: invalid graph, execution error, upload or output failure.
    WorkflowError,
}

impl FailureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Timeout => "timeout",
            FailureKind::ModelError => "model_error",
            FailureKind::WorkflowError => "workflow_error",
        }
    }
}

/// The `distinct_id` of a request: the `X-Distinct-Id` header when usable (1–200
/// printable characters), else the authenticated key's name, else `anonymous`.
pub fn distinct_id(headers: &HeaderMap, caller: Option<&Caller>) -> String {
    headers
        .get(DISTINCT_ID_HEADER)
        .and_then(|value| value.to_str().ok())
        .map(str::trim)
        .filter(|id| {
            !id.is_empty() && id.len() <= MAX_DISTINCT_ID_LEN && !id.chars().any(char::is_control)
        })
        .map(str::to_owned)
        .or_else(|| caller.map(|caller| caller.name.clone()))
        .unwrap_or_else(|| ANONYMOUS.to_owned())
}

/// A plugin's `job.analytics` text as properties. Text that is not a JSON object gives
/// no properties (and a warning): a plugin bug must not fail the request.
pub fn parse_plugin_properties(plugin: &str, analytics_json: &str) -> Map<String, Value> {
    if analytics_json.trim().is_empty() {
        return Map::new();
    }
    match serde_json::from_str::<Value>(analytics_json) {
        Ok(Value::Object(properties)) => properties,
        Ok(other) => {
            tracing::warn!(
                plugin,
                kind = json_kind(&other),
                "plugin analytics are not a JSON object; ignored"
            );
            Map::new()
        }
        Err(error) => {
            tracing::warn!(plugin, %error, "plugin analytics are not valid JSON; ignored");
            Map::new()
        }
    }
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Role;

    #[test]
    fn distinct_id_prefers_the_header_then_the_key_name() {
        let caller = Caller {
            name: "alice".into(),
            role: Role::User,
        };
        let mut headers = HeaderMap::new();
        assert_eq!(distinct_id(&headers, None), "anonymous");
        assert_eq!(distinct_id(&headers, Some(&caller)), "alice");
        headers.insert("X-Distinct-Id", "user-42".parse().unwrap());
        assert_eq!(distinct_id(&headers, Some(&caller)), "user-42");
        headers.insert("X-Distinct-Id", "  ".parse().unwrap());
        assert_eq!(distinct_id(&headers, Some(&caller)), "alice");
        headers.insert("X-Distinct-Id", "x".repeat(201).parse().unwrap());
        assert_eq!(distinct_id(&headers, None), "anonymous");
    }

    #[test]
    fn app_deployed_lists_the_served_plugins() {
        let plugins = vec![(
            "flux-dev".to_owned(),
            "1.0.0".to_owned(),
            "/flux-dev".to_owned(),
        )];
        let event = Event::app_deployed("0.1.0", &plugins);
        assert_eq!(event.name, "modal_app_deployed");
        assert_eq!(event.properties["plugin_count"], 1);
        assert_eq!(event.properties["plugins"][0]["route"], "/flux-dev");
        assert_eq!(event.properties["flowhost_version"], "0.1.0");
    }

    #[test]
    fn plugin_properties_that_are_not_an_object_are_ignored() {
        assert_eq!(
            parse_plugin_properties("p", r#"{"steps": 20}"#)["steps"],
            20
        );
        assert!(parse_plugin_properties("p", "[1,2]").is_empty());
        assert!(parse_plugin_properties("p", "{not json").is_empty());
        assert!(parse_plugin_properties("p", "").is_empty());
    }
}
