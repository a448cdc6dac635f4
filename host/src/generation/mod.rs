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

/// Put the cached names of the job's fetched model files into the graph: each into its
/// node input, and into every entry of the declared model set that names the placeholder
/// that input held, so the job's model key (affinity dispatch) carries the file's content
/// hash whichever reference form the caller used. `files` are the job's fetches, placed.
pub fn fill_fetched(job: &mut PluginJob, files: &[crate::jobs::ModelFileSpec]) {
    for file in files {
        let name = crate::models::cache::cached_name(&file.blake3);
        let Some(input) = job.workflow.get_mut(&file.node_id).and_then(|node| node.get_mut("inputs")).and_then(|inputs| inputs.get_mut(&file.input_name)) else {
            continue;
        };
        let placeholder = input.as_str().map(str::to_owned);
        *input = serde_json::Value::String(name.clone());
        let Some(placeholder) = placeholder else { continue };
        let models = &mut job.models;
        let refs = models.base.iter_mut().chain(models.loras.iter_mut().map(|l| &mut l.model)).chain(models.others.iter_mut());
        for model in refs {
            if model.folder == file.folder && model.name == placeholder {
                model.name = name.clone();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugins::manifest::{Lora, ModelRef, ModelSet};

    #[test]
    fn a_fetched_lora_is_named_by_its_hash_in_the_graph_and_in_the_model_key() {
        let workflow = serde_json::json!({"1": {"class_type": "LoraLoaderModelOnly", "inputs": {"lora_name": "lora@fetch", "strength_model": 1.0}}});
        let lora = |name: &str| Lora { model: ModelRef { folder: "loras".into(), name: name.into() }, strength_model: 1.0, strength_clip: 0.0 };
        let mut job = PluginJob {
            workflow: workflow.as_object().unwrap().clone(),
            uploads: vec![],
            outputs: vec![],
            output_format: OutputFormat::Jpeg,
            seed: None,
            analytics: Default::default(),
            caller_nodes: vec![],
            models: ModelSet { loras: vec![lora("lora@fetch")], ..ModelSet::default() },
            progress: vec![],
            fetches: vec![],
        };
        let file = crate::jobs::ModelFileSpec {
            field: "lora".into(),
            folder: "loras".into(),
            node_id: "1".into(),
            input_name: "lora_name".into(),
            blake3: "ab".repeat(32),
            source: crate::jobs::StoredSource::Blob { hash: format!("blake3:{}", "ab".repeat(32)) },
        };
        fill_fetched(&mut job, std::slice::from_ref(&file));
        let name = format!("flowhost-cache/{}.safetensors", "ab".repeat(32));
        assert_eq!(job.workflow["1"]["inputs"]["lora_name"], serde_json::json!(name));
        assert_eq!(job.models.loras, vec![lora(&name)]);
        assert!(affinity::model_label(&job.models).is_some_and(|label| label.contains(&"ab".repeat(32))));
    }

    #[test]
    fn truncation_counts_characters() {
        assert_eq!(truncate_chars("日本語です", 3), "日本語…");
        assert_eq!(truncate_chars("abc", 3), "abc");
    }
}
