//! Host-owned views of what plugins say: the manifest (checked once at load) and
//! the job (checked after every `build`), one internal model for every contract
//! version. The `since_v*` modules turn their generated types into
//! [`RawManifest`] / [`RawJob`]; the checks live here, once. Generated binding
//! types never reach the rest of the host.

use anyhow::{Context, Result, bail};
use serde::Serialize;

/// What a plugin may say, bounded: its texts end up in `/openapi.json`, `/plugins`, `/health` and
/// error answers, so an oversized manifest is rejected at load, not served to every caller.
pub mod caps {
    /// Longest `summary`, bytes.
    pub const MAX_SUMMARY_BYTES: usize = 1024;
    /// Largest request schema (JSON text), bytes.
    pub const MAX_SCHEMA_BYTES: usize = 256 << 10;
    /// Most entries in each of `node_classes`, `models` (and each requirement's `any_of`) and
    /// `response_media_types`.
    pub const MAX_LIST_ENTRIES: usize = 256;
    /// Longest short string (a class name, a model file name, a media type), bytes.
    pub const MAX_NAME_BYTES: usize = 512;
    /// Largest warm-up request (JSON text), bytes.
    pub const MAX_WARM_UP_BYTES: usize = 64 << 10;
    /// Most uploads one job may ask for.
    pub const MAX_UPLOADS_PER_JOB: usize = 16;
    /// Most bytes the uploads of one job may carry in all.
    pub const MAX_UPLOAD_BYTES_PER_JOB: usize = 64 << 20;
    /// Most model files one job may have fetched (contract 0.3+).
    pub const MAX_FETCHES_PER_JOB: usize = 8;
}

fn check_list<'a>(what: &str, items: impl ExactSizeIterator<Item = &'a str>) -> Result<()> {
    if items.len() > caps::MAX_LIST_ENTRIES {
        bail!("{what} has {} entries; at most {} are accepted", items.len(), caps::MAX_LIST_ENTRIES);
    }
    for item in items {
        if item.len() > caps::MAX_NAME_BYTES {
            bail!("an entry of {what} is {} bytes; at most {} are accepted", item.len(), caps::MAX_NAME_BYTES);
        }
    }
    Ok(())
}

/// The manifest's sizes against [`caps`].
fn check_caps(m: &RawManifest) -> Result<()> {
    if m.summary.len() > caps::MAX_SUMMARY_BYTES {
        bail!("the summary is {} bytes; at most {} are accepted", m.summary.len(), caps::MAX_SUMMARY_BYTES);
    }
    if m.request_schema.len() > caps::MAX_SCHEMA_BYTES {
        bail!("the request schema is {} bytes; at most {} are accepted", m.request_schema.len(), caps::MAX_SCHEMA_BYTES);
    }
    if let Some(w) = &m.warm_up {
        if w.len() > caps::MAX_WARM_UP_BYTES {
            bail!("the warm-up request is {} bytes; at most {} are accepted", w.len(), caps::MAX_WARM_UP_BYTES);
        }
    }
    check_list("node_classes", m.node_classes.iter().map(String::as_str))?;
    check_list("response_media_types", m.response_media_types.iter().map(String::as_str))?;
    check_list("models", m.models.iter().map(|r| r.purpose.as_str()))?;
    for r in &m.models {
        check_list("a model requirement's any_of", r.any_of.iter().map(|f| f.name.as_str()))?;
        check_list("a model requirement's any_of", r.any_of.iter().map(|f| f.folder.as_str()))?;
    }
    Ok(())
}

/// The job's uploads against [`caps`]: a plugin must not make one request upload without end.
fn check_uploads(uploads: &[PluginUpload]) -> Result<()> {
    if uploads.len() > caps::MAX_UPLOADS_PER_JOB {
        bail!("the job asks for {} uploads; at most {} are allowed per job", uploads.len(), caps::MAX_UPLOADS_PER_JOB);
    }
    let bytes: usize = uploads.iter().map(|u| match &u.source { UploadSource::Bytes(b) => b.len(), UploadSource::InputPath(_) | UploadSource::File(_) => 0 }).sum();
    if bytes > caps::MAX_UPLOAD_BYTES_PER_JOB {
        bail!("the job's uploads carry {bytes} bytes; at most {} are allowed per job", caps::MAX_UPLOAD_BYTES_PER_JOB);
    }
    Ok(())
}

/// A model the plugin needs: any one of `any_of` (folder, file name) will do.
#[derive(Debug, Clone, Serialize)]
pub struct ModelRequirement {
    pub purpose: String,
    pub any_of: Vec<ModelRef>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ModelRef {
    pub folder: String,
    pub name: String,
}

/// A LoRA a job applies, with its strengths.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Lora {
    #[serde(flatten)]
    pub model: ModelRef,
    pub strength_model: f64,
    pub strength_clip: f64,
}

/// Where a job's [`ModelSet`] came from.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ModelSetSource {
    /// The plugin said so (contract 0.2+).
    #[default]
    Declared,
    /// Read off the workflow's loader nodes by the host (0.1 plugins say nothing).
    Inferred,
}

/// The models a job loads: what a scheduler needs to route it to a warm worker.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ModelSet {
    /// The diffusion model or checkpoint the graph samples with.
    pub base: Option<ModelRef>,
    pub loras: Vec<Lora>,
    /// VAE, text encoders, controlnets ...
    pub others: Vec<ModelRef>,
    pub source: ModelSetSource,
}

impl ModelSet {
    /// The model set of a workflow whose plugin declared none (contract 0.1):
    /// read from the stock loader nodes. Unknown loaders are not guessed at.
    pub fn inferred_from_workflow(workflow: &serde_json::Map<String, serde_json::Value>) -> Self {
        // The same rule as the SDK's `hints::model_set_of` (what 0.2 plugins declare), so a
        // graph gets one affinity key whoever read it; `tests/tests/all/plugin_graphs.rs`
        // checks the two agree on every graph the bundled plugins build.
        let mut set = ModelSet { source: ModelSetSource::Inferred, ..ModelSet::default() };
        let text = |node: &serde_json::Value, key: &str| node["inputs"][key].as_str().map(str::to_string);
        let model = |folder: &str, name: String| ModelRef { folder: folder.into(), name };
        let mut bases: Vec<ModelRef> = Vec::new();
        for node in workflow.values() {
            match node["class_type"].as_str().unwrap_or_default() {
                "UNETLoader" => bases.extend(text(node, "unet_name").map(|n| model("diffusion_models", n))),
                "CheckpointLoaderSimple" => bases.extend(text(node, "ckpt_name").map(|n| model("checkpoints", n))),
                "LoraLoader" | "LoraLoaderModelOnly" => {
                    if let Some(name) = text(node, "lora_name") {
                        let strength_model = node["inputs"]["strength_model"].as_f64().unwrap_or(1.0);
                        let strength_clip = node["inputs"]["strength_clip"].as_f64().unwrap_or(0.0);
                        set.loras.push(Lora { model: model("loras", name), strength_model, strength_clip });
                    }
                }
                "VAELoader" => set.others.extend(text(node, "vae_name").map(|n| model("vae", n))),
                "DualCLIPLoader" => {
                    set.others.extend(["clip_name1", "clip_name2"].iter().filter_map(|k| text(node, k)).map(|n| model("text_encoders", n)))
                }
                "CLIPLoader" => set.others.extend(text(node, "clip_name").map(|n| model("text_encoders", n))),
                "ControlNetLoader" => set.others.extend(text(node, "control_net_name").map(|n| model("controlnet", n))),
                "InstantIDModelLoader" => set.others.extend(text(node, "instantid_file").map(|n| model("instantid", n))),
                _ => {}
            }
        }
        // The base is the diffusion model when there is one (a second stage's checkpoint,
        // as in InstantID, is just another file), else the checkpoint.
        let first = bases.iter().position(|m| m.folder == "diffusion_models").unwrap_or(0);
        if first < bases.len() {
            set.base = Some(bases.remove(first));
        }
        set.others.extend(bases);
        set
    }
}

/// A sampler node and the steps it runs (progress hint, contract 0.2+).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SamplerProgress {
    pub node_id: String,
    pub steps: u32,
}

/// A manifest as a plugin of any contract version returned it, unchecked.
#[derive(Debug, Clone)]
pub struct RawManifest {
    pub name: String,
    pub version: String,
    pub route: String,
    pub summary: String,
    pub request_schema: String,
    pub response_media_types: Vec<String>,
    pub analytics_prefix: String,
    pub node_classes: Vec<String>,
    pub models: Vec<ModelRequirement>,
    /// Contract 0.2+: a cheap request body (JSON text).
    pub warm_up: Option<String>,
}

/// A job as a plugin of any contract version returned it, unchecked.
#[derive(Debug, Clone)]
pub struct RawJob {
    pub workflow: String,
    pub uploads: Vec<PluginUpload>,
    pub outputs: Vec<String>,
    pub output_format: OutputFormat,
    pub seed: Option<u64>,
    pub analytics: String,
    pub caller_nodes: Vec<String>,
    /// `None` for contract 0.1 (the host infers it from the workflow).
    pub models: Option<ModelSet>,
    pub progress: Vec<SamplerProgress>,
    /// Contract 0.3+: model files the host fetches for the job.
    pub fetches: Vec<ModelFetch>,
}

/// A plugin's manifest, validated: name, route and version are well-formed and
/// the request schema compiles.
#[derive(Debug, Clone, Serialize)]
pub struct PluginManifest {
    pub name: String,
    pub version: String,
    pub route: String,
    pub summary: String,
    /// The request's JSON Schema (as the plugin gave it).
    pub request_schema: serde_json::Value,
    pub response_media_types: Vec<String>,
    pub analytics_prefix: String,
    pub node_classes: Vec<String>,
    pub models: Vec<ModelRequirement>,
    /// The contract version the plugin speaks (`0.1.0`, `0.2.0`, ...), from its export.
    pub contract: String,
    /// A cheap request that warms a worker (contract 0.2+), checked against
    /// `request_schema` at load.
    pub warm_up: Option<serde_json::Value>,
}

impl PluginManifest {
    /// Check and convert a manifest as returned by `describe`. The warm-up
    /// request is checked against the schema by the loader (it owns the
    /// compiled validator).
    pub fn from_raw(m: RawManifest, contract: &str) -> Result<Self> {
        check_caps(&m).with_context(|| format!("plugin {}'s manifest is oversized", m.name.chars().take(64).collect::<String>()))?;
        check_name(&m.name)?;
        check_route(&m.route)?;
        check_semver(&m.version).with_context(|| format!("plugin {} declares version {:?}", m.name, m.version))?;
        if !m.analytics_prefix.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_') {
            bail!("analytics prefix {:?} must be lowercase letters, digits and '_'", m.analytics_prefix);
        }
        let request_schema: serde_json::Value = serde_json::from_str(&m.request_schema)
            .with_context(|| format!("plugin {}: request schema is not JSON", m.name))?;
        let warm_up = match &m.warm_up {
            None => None,
            Some(text) => Some(
                serde_json::from_str::<serde_json::Value>(text)
                    .with_context(|| format!("plugin {}: the warm-up request is not JSON", m.name))?,
            ),
        };
        Ok(Self {
            name: m.name,
            version: m.version,
            route: m.route,
            summary: m.summary,
            request_schema,
            response_media_types: m.response_media_types,
            analytics_prefix: m.analytics_prefix,
            node_classes: m.node_classes,
            models: m.models,
            contract: contract.to_string(),
            warm_up,
        })
    }
}

fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-');
    if !ok {
        bail!("plugin name {name:?} must be 1-64 characters of a-z, 0-9 and '-'");
    }
    Ok(())
}

/// Routes are one path segment, so a plugin can never shadow `/health`,
/// `/plugins` or another plugin's sub-paths.
pub fn check_route(route: &str) -> Result<()> {
    let Some(segment) = route.strip_prefix('/') else {
        bail!("route {route:?} must start with '/'");
    };
    let ok = !segment.is_empty()
        && segment.len() <= 64
        && segment.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if !ok {
        bail!("route {route:?} must be '/' followed by 1-64 characters of a-z, 0-9, '-' and '_'");
    }
    if RESERVED_ROUTES.contains(&segment) {
        bail!("route {route:?} is reserved by the host");
    }
    Ok(())
}

/// Paths the host serves itself.
pub const RESERVED_ROUTES: &[&str] = &["health", "plugins", "openapi.json", "metrics", "models", "admin", "docs"];

fn check_semver(v: &str) -> Result<()> {
    let core = v.split(['-', '+']).next().unwrap_or_default();
    let parts: Vec<&str> = core.split('.').collect();
    if parts.len() != 3 || parts.iter().any(|p| p.is_empty() || p.parse::<u64>().is_err()) {
        bail!("not a semver version (expected MAJOR.MINOR.PATCH)");
    }
    Ok(())
}

/// Where an upload's bytes come from.
#[derive(Debug, Clone)]
pub enum UploadSource {
    Bytes(Vec<u8>),
    /// Relative to the inputs volume; resolved by the host.
    InputPath(String),
    /// A file the host fetches (a URL or an uploaded asset; contract 0.3+).
    File(FileRef),
}

/// Where a file the host fetches for a job comes from (contract 0.3+), as the caller named it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FileSource {
    /// An https URL (http only for an allow-listed host).
    Url(String),
    /// An uploaded asset: its id (UUID) or content hash (`blake3:<hex>`).
    Asset(String),
}

/// A fetched file's source and the digests its bytes must have (as given: checked by the host).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileRef {
    pub source: FileSource,
    pub sha256: Option<String>,
    pub blake3: Option<String>,
}

/// A model file the request names by reference: fetched into the model cache and its
/// cached name written into `workflow[node_id].inputs[input_name]` (contract 0.3+).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModelFetch {
    /// The request field the reference came from, named in errors.
    pub field: String,
    /// The model folder (`loras`).
    pub folder: String,
    pub file: FileRef,
    pub node_id: String,
    pub input_name: String,
}

/// The job's model fetches against [`caps`] and the workflow.
fn check_fetches(fetches: &[ModelFetch], workflow: &serde_json::Map<String, serde_json::Value>) -> Result<()> {
    if fetches.len() > caps::MAX_FETCHES_PER_JOB {
        bail!("the job asks for {} model fetches; at most {} are allowed per job", fetches.len(), caps::MAX_FETCHES_PER_JOB);
    }
    for f in fetches {
        if !crate::models::cache::FOLDERS.contains(&f.folder.as_str()) {
            bail!("a model fetch for field {:?} names folder {:?}; fetched models go to {}", f.field, f.folder, crate::models::cache::FOLDERS.join(", "));
        }
        let Some(node) = workflow.get(&f.node_id) else {
            bail!("the model fetch for field {:?} targets node {:?}, which is not in the workflow", f.field, f.node_id);
        };
        if !node.get("inputs").and_then(|inputs| inputs.get(&f.input_name)).is_some_and(serde_json::Value::is_string) {
            bail!("the model fetch for field {:?} targets input {:?} of node {:?}, which holds no placeholder text", f.field, f.input_name, f.node_id);
        }
    }
    Ok(())
}

/// An image to upload before submission.
#[derive(Debug, Clone)]
pub struct PluginUpload {
    pub field: String,
    pub filename: String,
    pub source: UploadSource,
    pub node_id: String,
    pub input_name: String,
}

/// How image outputs are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    Jpeg,
    Png,
    Original,
}

/// A job as built by a plugin, checked for internal consistency.
#[derive(Debug, Clone)]
pub struct PluginJob {
    /// The API-format graph (a JSON object of nodes).
    pub workflow: serde_json::Map<String, serde_json::Value>,
    pub uploads: Vec<PluginUpload>,
    pub outputs: Vec<String>,
    pub output_format: OutputFormat,
    pub seed: Option<u64>,
    pub analytics: serde_json::Map<String, serde_json::Value>,
    pub caller_nodes: Vec<String>,
    /// The models the job loads (declared by 0.2+ plugins, inferred for 0.1).
    pub models: ModelSet,
    /// Sampler nodes and their steps (empty: no hint).
    pub progress: Vec<SamplerProgress>,
    /// Model files fetched by reference before submission (contract 0.3+).
    pub fetches: Vec<ModelFetch>,
}

impl PluginJob {
    /// Convert and check a job: the workflow must be a JSON object of nodes with
    /// a `class_type` each, and every node id the job mentions must exist. A
    /// failure here is the plugin's bug, reported as such.
    pub fn from_raw(job: RawJob) -> Result<Self> {
        let workflow: serde_json::Value =
            serde_json::from_str(&job.workflow).context("the built workflow is not valid JSON")?;
        let serde_json::Value::Object(workflow) = workflow else {
            bail!("the built workflow is not a JSON object of nodes");
        };
        for (id, node) in &workflow {
            if node.get("class_type").and_then(|c| c.as_str()).is_none() {
                bail!("node {id:?} of the built workflow has no class_type");
            }
        }
        check_uploads(&job.uploads)?;
        for out in &job.outputs {
            if !workflow.contains_key(out) {
                bail!("output node {out:?} is not in the built workflow");
            }
        }
        for u in &job.uploads {
            if !workflow.contains_key(&u.node_id) {
                bail!("upload for field {:?} targets node {:?}, which is not in the workflow", u.field, u.node_id);
            }
        }
        for p in &job.progress {
            if !workflow.contains_key(&p.node_id) {
                bail!("progress hint names node {:?}, which is not in the workflow", p.node_id);
            }
        }
        check_fetches(&job.fetches, &workflow)?;
        let models = match job.models {
            Some(models) => ModelSet { source: ModelSetSource::Declared, ..models },
            None => ModelSet::inferred_from_workflow(&workflow),
        };
        let analytics = if job.analytics.trim().is_empty() {
            serde_json::Map::new()
        } else {
            match serde_json::from_str::<serde_json::Value>(&job.analytics) {
                Ok(serde_json::Value::Object(map)) => map,
                Ok(_) => bail!("analytics properties are not a JSON object"),
                Err(e) => bail!("analytics properties are not JSON: {e}"),
            }
        };
        Ok(Self {
            workflow,
            uploads: job.uploads,
            outputs: job.outputs,
            output_format: job.output_format,
            seed: job.seed,
            analytics,
            caller_nodes: job.caller_nodes,
            models,
            progress: job.progress,
            fetches: job.fetches,
        })
    }

    /// The dry-run view of the job: what would be submitted, without executing.
    pub fn dry_run_json(&self) -> serde_json::Value {
        serde_json::json!({
            "workflow": self.workflow,
            "uploads": self.uploads.iter().map(|u| serde_json::json!({
                "field": u.field,
                "filename": u.filename,
                "node_id": u.node_id,
                "input_name": u.input_name,
                "source": match &u.source {
                    UploadSource::Bytes(b) => serde_json::json!({"bytes": b.len()}),
                    UploadSource::InputPath(p) => serde_json::json!({"input_path": p}),
                    UploadSource::File(f) => serde_json::json!({"file": f}),
                },
            })).collect::<Vec<_>>(),
            "fetches": self.fetches,
            "outputs": self.outputs,
            "output_format": self.output_format,
            "seed": self.seed,
            "analytics": self.analytics,
            "models": self.models,
            "progress": self.progress,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_one_safe_segment() {
        assert!(check_route("/flux-dev").is_ok());
        for bad in ["flux", "/", "/a/b", "/../x", "/Flux", "/health", "/plugins", "/a b", "/a%2f"] {
            assert!(check_route(bad).is_err(), "{bad} should be refused");
        }
    }

    fn manifest() -> RawManifest {
        RawManifest {
            name: "p".into(),
            version: "0.1.0".into(),
            route: "/p".into(),
            summary: "s".into(),
            request_schema: "{}".into(),
            response_media_types: vec!["image/jpeg".into()],
            analytics_prefix: "p".into(),
            node_classes: vec![],
            models: vec![],
            warm_up: None,
        }
    }

    fn job(uploads: usize, bytes_each: usize) -> RawJob {
        RawJob {
            workflow: r#"{"1": {"class_type": "LoadImage", "inputs": {}}}"#.into(),
            uploads: (0..uploads)
                .map(|i| PluginUpload {
                    field: "f".into(),
                    filename: format!("{i}.png"),
                    source: UploadSource::Bytes(vec![0; bytes_each]),
                    node_id: "1".into(),
                    input_name: "image".into(),
                })
                .collect(),
            outputs: vec![],
            output_format: OutputFormat::Jpeg,
            seed: None,
            analytics: String::new(),
            caller_nodes: vec![],
            models: None,
            progress: vec![],
            fetches: vec![],
        }
    }

    #[test]
    fn manifest_summary_cap_obeyed() {
        let mut m = manifest();
        m.summary = "x".repeat(caps::MAX_SUMMARY_BYTES);
        assert!(PluginManifest::from_raw(m, "0.2.0").is_ok());
    }

    #[test]
    fn manifest_summary_cap_violated() {
        let mut m = manifest();
        m.summary = "x".repeat(caps::MAX_SUMMARY_BYTES + 1);
        let err = format!("{:#}", PluginManifest::from_raw(m, "0.2.0").unwrap_err());
        assert!(err.contains("summary") && err.contains(&caps::MAX_SUMMARY_BYTES.to_string()), "{err}");
    }

    #[test]
    fn manifest_schema_cap_violated() {
        let mut m = manifest();
        m.request_schema = format!("{{\"description\": \"{}\"}}", "x".repeat(caps::MAX_SCHEMA_BYTES));
        assert!(format!("{:#}", PluginManifest::from_raw(m, "0.2.0").unwrap_err()).contains("request schema"));
        let mut m = manifest();
        m.node_classes = vec!["C".into(); caps::MAX_LIST_ENTRIES + 1];
        assert!(PluginManifest::from_raw(m, "0.2.0").is_err());
    }

    #[test]
    fn upload_count_limit_obeyed() {
        assert_eq!(PluginJob::from_raw(job(caps::MAX_UPLOADS_PER_JOB, 10)).unwrap().uploads.len(), caps::MAX_UPLOADS_PER_JOB);
    }

    #[test]
    fn upload_count_limit_violated() {
        let err = format!("{:#}", PluginJob::from_raw(job(100_000, 1)).unwrap_err());
        assert!(err.contains("100000 uploads") && err.contains(&format!("at most {}", caps::MAX_UPLOADS_PER_JOB)), "{err}");
    }

    #[test]
    fn upload_bytes_limit_violated() {
        let err = format!("{:#}", PluginJob::from_raw(job(2, caps::MAX_UPLOAD_BYTES_PER_JOB / 2 + 1)).unwrap_err());
        assert!(err.contains("bytes"), "{err}");
        assert!(PluginJob::from_raw(job(2, caps::MAX_UPLOAD_BYTES_PER_JOB / 2)).is_ok());
    }

    #[test]
    fn a_v0_1_job_gets_its_model_set_from_the_loader_nodes() {
        let workflow = serde_json::json!({
            "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-dev.safetensors", "weight_dtype": "default"}},
            "2": {"class_type": "LoraLoader", "inputs": {"lora_name": "a.safetensors", "strength_model": 0.8, "strength_clip": 0.5}},
            "3": {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}},
            "4": {"class_type": "KSampler", "inputs": {}},
        });
        let set = ModelSet::inferred_from_workflow(workflow.as_object().unwrap());
        assert_eq!(set.source, ModelSetSource::Inferred);
        assert_eq!(set.base, Some(ModelRef { folder: "diffusion_models".into(), name: "flux1-dev.safetensors".into() }));
        assert_eq!(set.loras.len(), 1);
        assert_eq!((set.loras[0].model.name.as_str(), set.loras[0].strength_model, set.loras[0].strength_clip), ("a.safetensors", 0.8, 0.5));
        assert_eq!(set.others, vec![ModelRef { folder: "vae".into(), name: "ae.safetensors".into() }]);
    }

    #[test]
    fn a_model_fetch_must_target_a_placeholder_in_the_graph_and_a_cache_folder() {
        let fetch = |folder: &str, node: &str, input: &str| ModelFetch {
            field: "lora".into(),
            folder: folder.into(),
            file: FileRef { source: FileSource::Url("https://example.com/a.safetensors".into()), sha256: None, blake3: None },
            node_id: node.into(),
            input_name: input.into(),
        };
        let with = |fetches: Vec<ModelFetch>| RawJob {
            workflow: r#"{"1": {"class_type": "LoraLoaderModelOnly", "inputs": {"lora_name": "lora@fetch"}}}"#.into(),
            fetches,
            ..job(0, 0)
        };
        assert_eq!(PluginJob::from_raw(with(vec![fetch("loras", "1", "lora_name")])).unwrap().fetches.len(), 1);
        for (bad, says) in [
            (fetch("checkpoints", "1", "lora_name"), "names folder"),
            (fetch("loras", "9", "lora_name"), "not in the workflow"),
            (fetch("loras", "1", "strength_model"), "no placeholder"),
        ] {
            let err = format!("{:#}", PluginJob::from_raw(with(vec![bad])).unwrap_err());
            assert!(err.contains(says), "{err}");
        }
        let err = format!("{:#}", PluginJob::from_raw(with(vec![fetch("loras", "1", "lora_name"); caps::MAX_FETCHES_PER_JOB + 1])).unwrap_err());
        assert!(err.contains(&format!("at most {}", caps::MAX_FETCHES_PER_JOB)), "{err}");
    }

    #[test]
    fn versions_must_be_semver() {
        assert!(check_semver("1.2.3").is_ok());
        assert!(check_semver("0.1.0-beta.1").is_ok());
        for bad in ["1.2", "v1.2.3", "1.x.3", ""] {
            assert!(check_semver(bad).is_err(), "{bad}");
        }
    }
}
