//! The one job model every surface shares: a typed sync request, an async typed
//! request (`Prefer: respond-async`) and a Comfy API v2 submission all create a
//! [`Job`]. Field names follow the v2 `Job` schema so that the v2 view is a thin
//! mapping. Pure data: no I/O, no HTTP types.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use super::failure::JobFailure;

/// Lifecycle: `queued → running → succeeded | failed | expired`; a cancel moves
/// `queued → canceled` at once and `running → canceling → canceled`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Canceling,
    Canceled,
    Expired,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Canceling => "canceling",
            JobStatus::Canceled => "canceled",
            JobStatus::Expired => "expired",
        }
    }

    pub fn parse(s: &str) -> Option<JobStatus> {
        Some(match s {
            "queued" => JobStatus::Queued,
            "running" => JobStatus::Running,
            "succeeded" => JobStatus::Succeeded,
            "failed" => JobStatus::Failed,
            "canceling" => JobStatus::Canceling,
            "canceled" => JobStatus::Canceled,
            "expired" => JobStatus::Expired,
            _ => return None,
        })
    }

    /// Succeeded, failed, canceled and expired never change again.
    pub fn is_terminal(self) -> bool {
        matches!(self, JobStatus::Succeeded | JobStatus::Failed | JobStatus::Canceled | JobStatus::Expired)
    }
}

/// What created the job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum JobSource {
    /// A typed endpoint: the route and the plugin (name, version) that built the graph.
    Route { route: String, plugin: String, version: String },
    /// A Comfy API v2 submission (the caller's own graph).
    Api,
    /// A warm-up run of a route's plugin before the service is ready (`warm_up.rs`):
    /// no analytics, no webhooks, its own metrics label.
    WarmUp { route: String, plugin: String, version: String },
}

impl JobSource {
    /// The metrics label: the route, or `/api/v2/jobs`.
    pub fn route_label(&self) -> &str {
        match self {
            JobSource::Route { route, .. } => route,
            JobSource::Api => "/api/v2/jobs",
            JobSource::WarmUp { .. } => "warm-up",
        }
    }

    /// The route whose plugin built the graph (a warm-up's too); `None` for Comfy API v2 prompts.
    pub fn route(&self) -> Option<&str> {
        match self {
            JobSource::Route { route, .. } | JobSource::WarmUp { route, .. } => Some(route),
            JobSource::Api => None,
        }
    }

    /// A warm-up run, not a user's job.
    pub fn is_warm_up(&self) -> bool {
        matches!(self, JobSource::WarmUp { .. })
    }

    pub fn plugin_name(&self) -> Option<&str> {
        match self {
            JobSource::Route { plugin, .. } | JobSource::WarmUp { plugin, .. } => Some(plugin),
            JobSource::Api => None,
        }
    }
}

/// How image outputs are stored: re-encoded (typed routes: the plugin's media type)
/// or as ComfyUI made them (v2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OutputEncoding {
    Jpeg,
    Png,
    #[default]
    Original,
}

/// One input image the job uploads to ComfyUI before submission. The bytes live
/// in the blob store (`hash`), so a queued job survives a restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadSpec {
    /// The node and input the uploaded file name is written into.
    pub node_id: String,
    pub input_name: String,
    /// A safe file name (no path parts); the folder is per job and server-made.
    pub filename: String,
    /// `blake3:<hex>` of the bytes in the blob store.
    pub hash: String,
}

/// A model file the job loads from the model cache, fetched by reference when the job was
/// admitted: where its cached name goes, its content hash, and where to fetch it again (the
/// runner places it before the run, so a job claimed by another instance, or one whose file
/// was evicted across a restart, finds it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelFileSpec {
    /// The request field that named it (errors name it).
    pub field: String,
    pub folder: String,
    pub node_id: String,
    pub input_name: String,
    /// Lowercase hex of the file's blake3: its name in the cache.
    pub blake3: String,
    pub source: StoredSource,
}

/// Where a cached model file's bytes come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StoredSource {
    Url { url: String },
    /// A blob of the blob store (`blake3:<hex>`, an uploaded asset's).
    Blob { hash: String },
}

/// Everything needed to run the job, persisted with it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    /// The API-format graph as built or submitted (before upload names are filled in).
    pub workflow: Map<String, Value>,
    #[serde(default)]
    pub uploads: Vec<UploadSpec>,
    /// Model files from the model cache (names already in `workflow`), placed again
    /// before the run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub model_files: Vec<ModelFileSpec>,
    /// Output node ids whose media are the job's outputs; empty = the last node that made media.
    #[serde(default)]
    pub outputs: Vec<String>,
    #[serde(default)]
    pub encoding: OutputEncoding,
    /// Nodes that came from the caller (`/workflow`, v2): their validation errors are the caller's fault.
    #[serde(default)]
    pub caller_nodes: Vec<String>,
    #[serde(default)]
    pub seed: Option<u64>,
    /// The plugin's analytics properties.
    #[serde(default)]
    pub analytics: Map<String, Value>,
    /// The caller's request id (logs only; never names anything).
    #[serde(default)]
    pub request_id: String,
    /// Whole-job deadline (sync typed requests: admission + job timeout). Execution
    /// is bounded by the job timeout in any case.
    #[serde(default, with = "opt_ms")]
    pub deadline: Option<SystemTime>,
    /// Sent to ComfyUI as `extra_data`.
    #[serde(default)]
    pub extra_data: Value,
    /// Seed analytics (`…_generation_completed/failed`), when the job came from a typed route.
    #[serde(default)]
    pub events: Option<crate::events::GenerationEvents>,
    /// The caller's webhook (`Flowhost-Webhook-Url` on an async typed request), kept with
    /// the job so its messages are made when the job changes state, even after a restart.
    #[serde(default)]
    pub webhook: Option<super::subscription::Subscription>,
    /// The stable key of the models the job loads ([`super::affinity::model_key`]): declared
    /// by the plugin or read off the graph's loader nodes at admission. Kept with the job
    /// so dispatch by model affinity survives a restart. `None`: the job loads no model.
    #[serde(default)]
    pub model_key: Option<String>,
    /// The same set in words (base model + LoRAs), for `/health`'s workers and logs.
    #[serde(default)]
    pub model_label: Option<String>,
    /// The caller's labels (v2 `metadata`, typed `Flowhost-Label`): returned on the job and
    /// matched by the job list's `metadata[key]=value` filter ([`super::labels`]).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: super::labels::Labels,
    /// The API key (its name) that submitted the job, its tenant; `None` when no keys were
    /// configured. See docs/operations.md, "Tenants".
    #[serde(default)]
    pub tenant: Option<String>,
}

impl JobSpec {
    /// A spec for a graph with no uploads and default settings.
    pub fn new(workflow: Map<String, Value>) -> Self {
        JobSpec {
            workflow,
            uploads: Vec::new(),
            model_files: Vec::new(),
            outputs: Vec::new(),
            encoding: OutputEncoding::Original,
            caller_nodes: Vec::new(),
            seed: None,
            analytics: Map::new(),
            request_id: String::new(),
            deadline: None,
            extra_data: Value::Null,
            events: None,
            webhook: None,
            model_key: None,
            model_label: None,
            labels: Default::default(),
            tenant: None,
        }
    }
}

/// Server-computed progress snapshot (node-count and sampler-step weighted).
/// Complete per snapshot: one fully re-syncs a client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Progress {
    /// Overall fraction 0..=1.
    pub value: f64,
    pub nodes_done: u32,
    pub nodes_total: u32,
    pub current_node: Option<String>,
    pub current_node_class: Option<String>,
    pub step: Option<u32>,
    pub steps: Option<u32>,
    pub message: Option<String>,
}

/// Where the time went, in milliseconds; `None` = not (yet) measured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct JobMetrics {
    /// Waiting in flowhost's queue (admission → a dispatch slot).
    pub queue_ms: Option<u64>,
    /// Uploads + waiting in ComfyUI's own queue.
    pub comfyui_queue_ms: Option<u64>,
    /// ComfyUI execution.
    pub execution_ms: Option<u64>,
    /// Fetching, encoding and storing the outputs.
    pub fetch_ms: Option<u64>,
    /// Admission → terminal.
    pub total_ms: Option<u64>,
    /// The plugin's `build` call (typed routes).
    pub build_ms: Option<u64>,
    /// ComfyUI's execution by its own clock (`execution_start` → `execution_success` stamps);
    /// `execution_ms` is the same span as flowhost saw it. Not in the v2 `metrics` object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comfyui_clock_ms: Option<u64>,
}

impl JobMetrics {
    /// As a map of integers (the v2 `metrics` object).
    pub fn to_map(&self) -> BTreeMap<&'static str, Option<u64>> {
        BTreeMap::from([
            ("queue_ms", self.queue_ms),
            ("comfyui_queue_ms", self.comfyui_queue_ms),
            ("execution_ms", self.execution_ms),
            ("fetch_ms", self.fetch_ms),
            ("total_ms", self.total_ms),
            ("build_ms", self.build_ms),
        ])
    }
}

/// Why an asset exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AssetRole {
    /// A job's output.
    Output,
    /// An image a typed job uploads to ComfyUI (kept so a queued job survives a restart).
    Input,
    /// Uploaded by a caller (v2 `POST /assets`).
    Upload,
}

impl AssetRole {
    pub fn as_str(self) -> &'static str {
        match self {
            AssetRole::Output => "output",
            AssetRole::Input => "input",
            AssetRole::Upload => "upload",
        }
    }
    pub fn parse(s: &str) -> AssetRole {
        match s {
            "output" => AssetRole::Output,
            "input" => AssetRole::Input,
            _ => AssetRole::Upload,
        }
    }
}

/// A UUID record over a content-addressed blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Asset {
    pub id: Uuid,
    /// `blake3:<hex>`.
    pub hash: String,
    pub size_bytes: u64,
    pub content_type: String,
    /// File name (output file name, or the uploaded file's name).
    pub name: Option<String>,
    /// The job that produced (or uses) it.
    pub job_id: Option<Uuid>,
    /// Output node id, for outputs.
    pub node_id: Option<String>,
    pub role: AssetRole,
    #[serde(with = "ms")]
    pub created_at: SystemTime,
    #[serde(default, with = "opt_ms")]
    pub expires_at: Option<SystemTime>,
    /// The API key (its name) that owns it: the uploader, or the owner of the job it
    /// belongs to. `None`: made while no keys were configured (only an admin key sees it
    /// once keys are on). See docs/operations.md, "Tenants".
    #[serde(default)]
    pub tenant: Option<String>,
}

/// One job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: Uuid,
    pub status: JobStatus,
    #[serde(with = "ms")]
    pub created_at: SystemTime,
    #[serde(default, with = "opt_ms")]
    pub started_at: Option<SystemTime>,
    #[serde(default, with = "opt_ms")]
    pub completed_at: Option<SystemTime>,
    #[serde(with = "ms")]
    pub expires_at: SystemTime,
    /// 0 = next to run; `None` unless queued. Filled in live from the queue.
    pub queue_position: Option<u32>,
    pub progress: Option<Progress>,
    /// Output assets in output order.
    pub outputs: Vec<Asset>,
    pub error: Option<JobFailure>,
    pub metrics: JobMetrics,
    pub source: JobSource,
    /// The ComfyUI prompt id, chosen by flowhost before submission (so a restart can reconcile).
    pub prompt_id: Option<String>,
    /// The graph as executed (upload names filled in); the submitted graph until then.
    pub workflow: Value,
    pub spec: JobSpec,
}

impl Job {
    /// A new queued job.
    pub fn new(source: JobSource, spec: JobSpec, retention: Duration) -> Job {
        let now = SystemTime::now();
        Job {
            id: Uuid::new_v4(),
            status: JobStatus::Queued,
            created_at: now,
            started_at: None,
            completed_at: None,
            expires_at: now + retention,
            queue_position: None,
            progress: None,
            outputs: Vec::new(),
            error: None,
            metrics: JobMetrics::default(),
            source,
            prompt_id: None,
            workflow: Value::Object(spec.workflow.clone()),
            spec,
        }
    }

    /// The first output (typed routes answer with it).
    pub fn first_output(&self) -> Option<&Asset> {
        self.outputs.first()
    }
}

/// What a subscriber to one job receives (jobs-v2 turns these into SSE).
#[derive(Debug, Clone)]
pub enum JobEvent {
    /// The job changed status (the whole job, as now).
    Status(Box<Job>),
    /// A new progress snapshot (throttled to ~2 per second).
    Progress(Progress),
    /// A preview image ComfyUI sent while running.
    Preview { bytes: bytes::Bytes, media_type: String, node_id: Option<String> },
    /// An output was committed to the store.
    Output(Asset),
}

/// Milliseconds since the Unix epoch.
pub fn to_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

pub fn from_ms(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)
}

pub(crate) mod ms {
    use super::*;
    pub fn serialize<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i64(to_ms(*t))
    }
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        Ok(from_ms(i64::deserialize(d)?))
    }
}

pub(crate) mod opt_ms {
    use super::*;
    pub fn serialize<S: serde::Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.serialize_some(&to_ms(*t)),
            None => s.serialize_none(),
        }
    }
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<SystemTime>, D::Error> {
        Ok(Option::<i64>::deserialize(d)?.map(from_ms))
    }
}
