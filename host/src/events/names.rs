//! Event names and the properties of generation events.
//!
//! Owns the mapping from a plugin's `analytics_prefix` and a lifecycle stage to an event
//! name, and which properties each event carries. Must never send anything.
//!
//! | stage ([`Stage`])  | every prefix `{p}`          | seed compatibility ([`SEED_EXTRA_EVENTS`]) |
//! |--------------------|-----------------------------|--------------------------------------------|
//! | `Requested`        | `{p}_generation_requested`  |                                            |
//! | `Resolved`         | —                           | `modal_lora` → `modal_lora_loaded`         |
//! | `Completed`        | `{p}_generation_completed`  |                                            |
//! | `Failed`           | `{p}_generation_failed`     |                                            |
//! | startup            | `modal_app_deployed` ([`APP_DEPLOYED`])                                  |
//!
//! With the seed's prefixes (`modal_flux_dev`, `modal_lora`, `modal_instantid`,
//! `modal_workflow`) this yields exactly the seed's names: `modal_flux_dev_generation_*`,
//! `modal_instantid_generation_requested`, `modal_lora_loaded` (the job was built, so
//! the LoRA file was found) and `modal_lora_generation_completed`, and the standard three
//! for every other plugin. `Resolved` means "the plugin built its job" and is named only
//! for prefixes in the table; a new plugin gets the standard three.
//!
//! `{p}_generation_failed` carries `error_type` (`timeout` | `model_error` |
//! `workflow_error`) and `error_message`.

use serde_json::{Map, Value};

use super::{Event, FailureKind, JobTimings};

/// Event emitted once at startup.
pub const APP_DEPLOYED: &str = "modal_app_deployed";

/// Extra event names some prefixes have beyond the standard three (the seed's).
pub const SEED_EXTRA_EVENTS: &[(&str, Stage, &str)] =
    &[("modal_lora", Stage::Resolved, "modal_lora_loaded")];

/// A point in a generation's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The request passed schema validation and reached the plugin.
    Requested,
    /// The plugin built its job: every model/LoRA it names was found.
    Resolved,
    /// The output was returned.
    Completed,
    /// The generation failed after it was requested.
    Failed,
}

/// The event name for `prefix` at `stage`, or `None` when that stage has no event for
/// this prefix.
pub fn event_name(prefix: &str, stage: Stage) -> Option<String> {
    match stage {
        Stage::Requested => Some(standard_name(prefix, "requested")),
        Stage::Completed => Some(standard_name(prefix, "completed")),
        Stage::Failed => Some(standard_name(prefix, "failed")),
        Stage::Resolved => SEED_EXTRA_EVENTS
            .iter()
            .find(|(extra_prefix, extra_stage, _)| *extra_prefix == prefix && *extra_stage == stage)
            .map(|(_, _, name)| (*name).to_owned()),
    }
}

/// The name of a stage every prefix has.
fn standard_name(prefix: &str, stage: &str) -> String {
    format!("{prefix}_generation_{stage}")
}

/// The events of one generation request. Build one per request.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GenerationEvents {
    /// The plugin manifest's `analytics_prefix`.
    pub prefix: String,
    pub plugin: String,
    pub plugin_version: String,
    pub route: String,
    pub request_id: String,
    /// See [`super::distinct_id`].
    pub distinct_id: String,
}

impl GenerationEvents {
    /// `{p}_generation_requested`, before the plugin builds the job.
    pub fn requested(&self) -> Event {
        self.event(standard_name(&self.prefix, "requested"), &Map::new(), None)
    }

    /// The `Resolved` event for prefixes that have one (`modal_lora_loaded`), with the
    /// plugin's properties; `None` for other prefixes.
    pub fn resolved(&self, plugin_properties: &Map<String, Value>) -> Option<Event> {
        let name = event_name(&self.prefix, Stage::Resolved)?;
        Some(self.event(name, plugin_properties, None))
    }

    /// `{p}_generation_completed` with the plugin's properties and the host's timings.
    pub fn completed(&self, plugin_properties: &Map<String, Value>, timings: &JobTimings) -> Event {
        self.event(
            standard_name(&self.prefix, "completed"),
            plugin_properties,
            Some(timings),
        )
    }

    /// `{p}_generation_failed` with `error_type` and `error_message` (plugin properties
    /// are empty when the plugin never built a job).
    pub fn failed(
        &self,
        plugin_properties: &Map<String, Value>,
        timings: &JobTimings,
        kind: FailureKind,
        message: &str,
    ) -> Event {
        let mut event = self.event(
            standard_name(&self.prefix, "failed"),
            plugin_properties,
            Some(timings),
        );
        event
            .properties
            .insert("error_type".into(), kind.as_str().into());
        event
            .properties
            .insert("error_message".into(), message.into());
        event
    }

    fn event(
        &self,
        name: String,
        plugin_properties: &Map<String, Value>,
        timings: Option<&JobTimings>,
    ) -> Event {
        // Plugin properties first; the host's own keys win. PostHog's reserved `$...`
        // keys and `distinct_id` are the host's alone.
        let mut properties: Map<String, Value> = plugin_properties
            .iter()
            .filter(|(key, _)| !key.starts_with('$') && key.as_str() != "distinct_id")
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect();
        properties.insert("route".into(), self.route.clone().into());
        properties.insert("plugin".into(), self.plugin.clone().into());
        properties.insert("plugin_version".into(), self.plugin_version.clone().into());
        properties.insert("request_id".into(), self.request_id.clone().into());
        if let Some(timings) = timings {
            for (property, duration) in timings.phases() {
                properties.insert(property.into(), (duration.as_millis() as u64).into());
            }
        }
        Event::new(name, self.distinct_id.clone(), properties)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn lora_request() -> GenerationEvents {
        GenerationEvents {
            prefix: "modal_lora".into(),
            plugin: "flux-lora".into(),
            plugin_version: "1.0.0".into(),
            route: "/flux-lora".into(),
            request_id: "req-1".into(),
            distinct_id: "alice".into(),
        }
    }

    #[test]
    fn the_seed_prefixes_produce_the_seed_event_names() {
        let names = |prefix: &str| {
            [
                Stage::Requested,
                Stage::Resolved,
                Stage::Completed,
                Stage::Failed,
            ]
            .map(|stage| event_name(prefix, stage))
        };
        assert_eq!(
            names("modal_flux_dev"),
            [
                Some("modal_flux_dev_generation_requested".into()),
                None,
                Some("modal_flux_dev_generation_completed".into()),
                Some("modal_flux_dev_generation_failed".into()),
            ]
        );
        assert_eq!(names("modal_lora")[1], Some("modal_lora_loaded".into()));
        assert_eq!(
            names("modal_lora")[2],
            Some("modal_lora_generation_completed".into())
        );
        assert_eq!(
            names("modal_instantid")[0],
            Some("modal_instantid_generation_requested".into())
        );
        assert_eq!(
            names("echo")[1],
            None,
            "new plugins get only the standard three"
        );
    }

    #[test]
    fn completed_merges_plugin_properties_timings_and_identity() {
        let mut plugin_properties = Map::new();
        plugin_properties.insert("lora_id".into(), "realism".into());
        plugin_properties.insert("route".into(), "/spoofed".into());
        plugin_properties.insert("$set".into(), serde_json::json!({"email": "x"}));
        plugin_properties.insert("distinct_id".into(), "someone-else".into());
        let timings = JobTimings {
            plugin_build: Some(Duration::from_millis(3)),
            execution: Some(Duration::from_millis(8200)),
            total: Some(Duration::from_millis(8700)),
            ..Default::default()
        };
        let event = lora_request().completed(&plugin_properties, &timings);
        assert_eq!(event.name, "modal_lora_generation_completed");
        assert_eq!(event.distinct_id, "alice");
        assert_eq!(
            serde_json::Value::Object(event.properties),
            serde_json::json!({
                "lora_id": "realism",
                "route": "/flux-lora",
                "plugin": "flux-lora",
                "plugin_version": "1.0.0",
                "request_id": "req-1",
                "plugin_build_ms": 3,
                "execution_ms": 8200,
                "total_ms": 8700,
            })
        );
    }

    #[test]
    fn failed_carries_the_error_type_and_message() {
        let event = lora_request().failed(
            &Map::new(),
            &JobTimings::default(),
            FailureKind::Timeout,
            "took longer than 120 s",
        );
        assert_eq!(event.name, "modal_lora_generation_failed");
        assert_eq!(event.properties["error_type"], "timeout");
        assert_eq!(event.properties["error_message"], "took longer than 120 s");
        assert_eq!(FailureKind::ModelError.as_str(), "model_error");
        assert_eq!(FailureKind::WorkflowError.as_str(), "workflow_error");
    }

    #[test]
    fn resolved_exists_only_for_prefixes_that_have_it() {
        assert_eq!(
            lora_request().resolved(&Map::new()).map(|e| e.name),
            Some("modal_lora_loaded".into())
        );
        let flux = GenerationEvents {
            prefix: "modal_flux_dev".into(),
            ..lora_request()
        };
        assert!(flux.resolved(&Map::new()).is_none());
    }
}
