//! "A typed request becomes a job", protocol-free: the request checked against the plugin's
//! schema ([`request_schema`]) and the job the plugin built turned into a [`JobSpec`]
//! ([`spec_for`]). The typed route (`http/generate.rs`), warm-up (`warm_up.rs`) and
//! `flowhost check-plugin` all go through here, so the three cannot drift (warm-up once
//! dropped the plugin's declared model set and was dispatched by a different affinity key).
//!
//! Owns: the request-schema check and its per-field problems, the `PluginJob → JobSpec` map.
//! Must never: import `http` (it sits below it), read headers, know a status code, or touch
//! the job store.

pub mod request_schema;

use crate::jobs::{JobSpec, OutputEncoding, affinity};
use crate::plugins::manifest::OutputFormat;
use crate::plugins::{LoadedPlugin, PluginJob};

/// One failing field of a request (or of what a plugin refused).
#[derive(Debug, Clone, serde::Serialize, PartialEq, Eq)]
pub struct FieldProblem {
    /// Field path, `/`-separated (`width`, `loras/0/name`); empty for the body.
    pub field: String,
    pub message: String,
}

/// `s` cut to `max` characters (not bytes), with `…` when cut.
pub fn truncate_chars(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &s[..at]),
        None => s.to_string(),
    }
}

/// The job spec for what `plugin` built, the same for every caller of a plugin: graph,
/// declared model set (what affinity dispatch routes by), outputs and their encoding, the
/// nodes the caller owns (fault attribution), seed and analytics, and the plugin's label in
/// `extra_data`. Callers add only what is theirs: request id, events, deadline, uploads.
/// The uploads are returned apart: reading their bytes is the caller's (it may block).
pub fn spec_for(plugin: &LoadedPlugin, job: PluginJob) -> (JobSpec, Vec<crate::plugins::manifest::PluginUpload>) {
    let mut spec = JobSpec::new(job.workflow);
    spec.model_key = affinity::model_key(&job.models);
    spec.model_label = affinity::model_label(&job.models);
    spec.outputs = job.outputs;
    spec.encoding = match job.output_format {
        OutputFormat::Jpeg => OutputEncoding::Jpeg,
        OutputFormat::Png => OutputEncoding::Png,
        OutputFormat::Original => OutputEncoding::Original,
    };
    spec.caller_nodes = job.caller_nodes;
    spec.seed = job.seed;
    spec.analytics = job.analytics;
    spec.extra_data = serde_json::json!({"plugin": plugin.label.to_string()});
    (spec, job.uploads)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_counts_characters() {
        assert_eq!(truncate_chars("日本語です", 3), "日本語…");
        assert_eq!(truncate_chars("abc", 3), "abc");
    }
}
