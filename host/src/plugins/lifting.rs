//! What a plugin call returns, checked against its caps and the host budget before the host
//! copies any of it.
//!
//! wasmtime's generated bindings lift a whole `result<job, build-error>` into host `String`s and
//! `Vec`s at once: 32 calls each returning 50 MiB put 1.6 GB on the host heap. Nor can the host
//! lift lazily ([`wasmtime::component::WasmStr`]) and read afterwards: the guest's post-return
//! frees the returned memory as soon as the call returns. So the types here mirror the contract's
//! with every string and list wrapped in [`Guarded`] (or [`Capped`] for error texts), whose
//! `Lift` reads the length from the pointer pair *first* and copies only what is allowed:
//!
//! - a [`Guarded`] value is copied only if it fits the call's cap (and its own `MAX`, e.g. the
//!   workflow's) and its bytes can be charged to the call's share of the
//!   [`super::budget::HostBudget`]; otherwise nothing is copied and the call fails with the
//!   reason ([`LiftError`]);
//! - a [`Capped`] text (field errors, user errors) is copied cut to its first `N` bytes.
//!
//! The allowance lives in a thread-local for the length of one call ([`guarded`]): lifting has no
//! access to the store, and a call lifts on the thread that made it.
//!
//! Owns: the mirror types and the check-then-copy order. Must never: copy a string or list before
//! its length passed the checks, or know HTTP.

use std::cell::RefCell;

use wasmtime::ValRaw;
use wasmtime::component::__internal::{CanonicalAbiInfo, InstanceType, InterfaceType, LiftContext};
use wasmtime::component::{ComponentType, Lift};

use super::budget::{CallShare, Refusal};
use super::calls::{BuildError, FieldError, UserError};
use super::manifest::{FileRef, FileSource, Lora, ModelFetch, ModelRef, ModelSet, ModelSetSource, OutputFormat, PluginUpload, RawJob, SamplerProgress, UploadSource, caps};

/// Longest error text copied from a plugin, bytes (answers cut further, to 500 characters).
pub const MAX_ERROR_TEXT_BYTES: usize = 1024;
/// Largest workflow (JSON text) a job may carry, bytes: ComfyUI graphs are kilobytes; the
/// workflow is parsed, stored and sent on, so its size is multiplied downstream.
pub const MAX_WORKFLOW_BYTES: usize = 8 << 20;
/// Largest analytics properties (JSON text), bytes.
pub const MAX_ANALYTICS_BYTES: usize = 64 << 10;
/// Most entries of a job's model lists and progress hints.
const MAX_ENTRIES: usize = caps::MAX_LIST_ENTRIES;
/// Most node ids in a job's `outputs` and `caller_nodes`: one per node of the largest graph the
/// host accepts (5,000 nodes, see docs/operations.md), with room to spare.
const MAX_NODE_IDS: usize = 10_000;

/// Why a returned value was not copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LiftError {
    /// The plugin returned more than one call may (its own fault: 500).
    TooLarge { cap: usize },
    /// A text or list of the job is over its own cap (500).
    FieldTooLarge { what: &'static str },
    /// The calls in flight hold the whole host budget (503).
    Busy(Refusal),
}

impl std::fmt::Display for LiftError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LiftError::TooLarge { cap } => write!(f, "returned more than {} MiB, the most one call may return", cap >> 20),
            LiftError::FieldTooLarge { what } => write!(f, "returned a job whose {what} is over its limit ({})", limit_of(what)),
            LiftError::Busy(Refusal::Exhausted { limit, .. }) => {
                write!(f, "the plugin calls in flight hold the host's whole plugin memory budget ({} MiB)", limit >> 20)
            }
        }
    }
}

/// The limit a field has, in words.
fn limit_of(what: &str) -> String {
    match what {
        "workflow" => format!("at most {} bytes", MAX_WORKFLOW_BYTES),
        "analytics" => format!("at most {} bytes", MAX_ANALYTICS_BYTES),
        "uploads" => format!("at most {} are allowed per job", caps::MAX_UPLOADS_PER_JOB),
        "fetches" => format!("at most {} are allowed per job", caps::MAX_FETCHES_PER_JOB),
        "outputs" | "caller_nodes" => format!("at most {MAX_NODE_IDS} entries"),
        "models.loras" | "models.others" | "progress" => format!("at most {MAX_ENTRIES} entries"),
        _ => "the call's cap".into(),
    }
}

/// What one call may still copy.
struct Allowance {
    share: CallShare,
    cap_left: usize,
    cap: usize,
    /// Why the first refused value was refused (`None` for a per-field `MAX`).
    refused: Option<Option<LiftError>>,
}

thread_local! {
    static ALLOWANCE: RefCell<Option<Allowance>> = const { RefCell::new(None) };
}

/// Run `call` (which lifts the answer) with `cap` bytes allowed, charged to `share`. Returns the
/// call's result, the share (holding what was copied) and why a value was refused, if one was.
pub fn guarded<R>(share: CallShare, cap: usize, call: impl FnOnce() -> R) -> (R, CallShare, Option<Option<LiftError>>) {
    ALLOWANCE.with(|a| *a.borrow_mut() = Some(Allowance { share, cap_left: cap, cap, refused: None }));
    let result = call();
    let allowance = ALLOWANCE.with(|a| a.borrow_mut().take()).expect("set above on this thread");
    (result, allowance.share, allowance.refused)
}

/// May `bytes` more be copied (for a value whose own limit is `max`)? Charges them if so.
fn admit(bytes: usize, max: usize) -> bool {
    ALLOWANCE.with(|a| {
        let mut a = a.borrow_mut();
        // Outside `guarded` (never in the service): no bound but the value's own.
        let Some(a) = a.as_mut() else { return bytes <= max };
        if a.refused.is_some() {
            return false;
        }
        if bytes > max {
            a.refused = Some(None);
            return false;
        }
        if bytes > a.cap_left {
            a.refused = Some(Some(LiftError::TooLarge { cap: a.cap }));
            return false;
        }
        if let Err(refusal) = a.share.take(bytes) {
            a.refused = Some(Some(LiftError::Busy(refusal)));
            return false;
        }
        a.cap_left -= bytes;
        true
    })
}

/// What one element of a list costs the host, bytes (its own strings are charged separately).
pub trait Unit {
    const BYTES: usize;
}
impl Unit for u8 {
    const BYTES: usize = 1;
}
impl Unit for String {
    const BYTES: usize = std::mem::size_of::<String>();
}

/// Host bytes of a value of this type whose pointer pair says `len`.
pub trait Measured {
    fn bytes(len: usize) -> usize;
}
impl Measured for String {
    fn bytes(len: usize) -> usize {
        len
    }
}
impl<T: Unit> Measured for Vec<T> {
    fn bytes(len: usize) -> usize {
        len.saturating_mul(T::BYTES)
    }
}

/// A string or list copied only after its length passed the checks; `Refused` when it did not
/// (nothing of it was copied). `MAX`: the value's own limit, bytes.
pub enum Guarded<T, const MAX: usize = { usize::MAX }> {
    Lifted(T),
    Refused,
}

unsafe impl<T: ComponentType<Lower = [ValRaw; 2]>, const MAX: usize> ComponentType for Guarded<T, MAX> {
    type Lower = [ValRaw; 2];
    const ABI: CanonicalAbiInfo = CanonicalAbiInfo::POINTER_PAIR;

    fn typecheck(ty: &InterfaceType, types: &InstanceType<'_>) -> wasmtime::Result<()> {
        T::typecheck(ty, types)
    }
}

unsafe impl<T: Lift<Lower = [ValRaw; 2]> + Measured, const MAX: usize> Lift for Guarded<T, MAX> {
    fn linear_lift_from_flat(cx: &mut LiftContext<'_>, ty: InterfaceType, src: &Self::Lower) -> wasmtime::Result<Self> {
        let len = src[1].get_u32() as usize;
        if !admit(T::bytes(len), MAX) {
            return Ok(Guarded::Refused);
        }
        Ok(Guarded::Lifted(T::linear_lift_from_flat(cx, ty, src)?))
    }

    fn linear_lift_from_memory(cx: &mut LiftContext<'_>, ty: InterfaceType, bytes: &[u8]) -> wasmtime::Result<Self> {
        let len = bytes.get(4..8).and_then(|b| <[u8; 4]>::try_from(b).ok()).map(u32::from_le_bytes).unwrap_or(u32::MAX) as usize;
        if !admit(T::bytes(len), MAX) {
            return Ok(Guarded::Refused);
        }
        Ok(Guarded::Lifted(T::linear_lift_from_memory(cx, ty, bytes)?))
    }
}

/// A text copied cut to its first `N` bytes (on a character boundary, `…` appended when cut); the
/// rest is never copied. Assumes UTF-8 guests (the SDK's) for cut texts.
pub struct Capped<const N: usize>(pub String);

unsafe impl<const N: usize> ComponentType for Capped<N> {
    type Lower = [ValRaw; 2];
    const ABI: CanonicalAbiInfo = CanonicalAbiInfo::POINTER_PAIR;

    fn typecheck(ty: &InterfaceType, types: &InstanceType<'_>) -> wasmtime::Result<()> {
        String::typecheck(ty, types)
    }
}

impl<const N: usize> Capped<N> {
    fn cut(cx: &mut LiftContext<'_>, ptr: usize, len: usize) -> wasmtime::Result<Self> {
        let memory = cx.memory();
        let Some(bytes) = ptr.checked_add(len).filter(|end| *end <= memory.len()).map(|_| &memory[ptr..ptr + N.min(len)]) else {
            wasmtime::bail!("string pointer/length out of bounds of memory");
        };
        let valid = match std::str::from_utf8(bytes) {
            Ok(text) => text,
            // Cut inside a character (or not UTF-8): keep the valid prefix.
            Err(e) => std::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or_default(),
        };
        Ok(Capped(format!("{valid}…")))
    }
}

unsafe impl<const N: usize> Lift for Capped<N> {
    fn linear_lift_from_flat(cx: &mut LiftContext<'_>, ty: InterfaceType, src: &Self::Lower) -> wasmtime::Result<Self> {
        let (ptr, len) = (src[0].get_u32() as usize, src[1].get_u32() as usize);
        if len <= N {
            return Ok(Capped(String::linear_lift_from_flat(cx, ty, src)?));
        }
        Self::cut(cx, ptr, len)
    }

    fn linear_lift_from_memory(cx: &mut LiftContext<'_>, ty: InterfaceType, bytes: &[u8]) -> wasmtime::Result<Self> {
        let word = |at: usize| bytes.get(at..at + 4).and_then(|b| <[u8; 4]>::try_from(b).ok()).map(u32::from_le_bytes).unwrap_or(u32::MAX) as usize;
        let (ptr, len) = (word(0), word(4));
        if len <= N {
            return Ok(Capped(String::linear_lift_from_memory(cx, ty, bytes)?));
        }
        Self::cut(cx, ptr, len)
    }
}

type Text = Guarded<String>;
type ErrorText = Capped<MAX_ERROR_TEXT_BYTES>;

#[derive(ComponentType, Lift)]
#[component(record)]
pub struct GModelRef {
    folder: Text,
    name: Text,
}
impl Unit for GModelRef {
    const BYTES: usize = std::mem::size_of::<ModelRef>();
}

#[derive(ComponentType, Lift)]
#[component(variant)]
pub enum GImageSource {
    #[component(name = "bytes")]
    Bytes(Guarded<Vec<u8>>),
    #[component(name = "input-path")]
    InputPath(Text),
}

#[derive(ComponentType, Lift)]
#[component(record)]
pub struct GUpload {
    field: Text,
    filename: Text,
    source: GImageSource,
    #[component(name = "node-id")]
    node_id: Text,
    #[component(name = "input-name")]
    input_name: Text,
}
impl Unit for GUpload {
    const BYTES: usize = std::mem::size_of::<PluginUpload>();
}

/// 0.3's file reference.
#[derive(ComponentType, Lift)]
#[component(variant)]
pub enum GFileSource {
    #[component(name = "url")]
    Url(Guarded<String, { crate::net::destination::MAX_URL_BYTES }>),
    #[component(name = "asset")]
    Asset(Guarded<String, { caps::MAX_NAME_BYTES }>),
}

#[derive(ComponentType, Lift)]
#[component(record)]
pub struct GFileRef {
    source: GFileSource,
    sha256: Option<Guarded<String, { caps::MAX_NAME_BYTES }>>,
    blake3: Option<Guarded<String, { caps::MAX_NAME_BYTES }>>,
}

/// 0.3's image source: 0.2's plus `file`.
#[derive(ComponentType, Lift)]
#[component(variant)]
pub enum GImageSourceV0_3 {
    #[component(name = "bytes")]
    Bytes(Guarded<Vec<u8>>),
    #[component(name = "input-path")]
    InputPath(Text),
    #[component(name = "file")]
    File(GFileRef),
}

#[derive(ComponentType, Lift)]
#[component(record)]
pub struct GUploadV0_3 {
    field: Text,
    filename: Text,
    source: GImageSourceV0_3,
    #[component(name = "node-id")]
    node_id: Text,
    #[component(name = "input-name")]
    input_name: Text,
}
impl Unit for GUploadV0_3 {
    const BYTES: usize = std::mem::size_of::<PluginUpload>();
}

#[derive(ComponentType, Lift)]
#[component(record)]
pub struct GModelFetch {
    field: Text,
    folder: Text,
    file: GFileRef,
    #[component(name = "node-id")]
    node_id: Text,
    #[component(name = "input-name")]
    input_name: Text,
}
impl Unit for GModelFetch {
    const BYTES: usize = std::mem::size_of::<ModelFetch>();
}

#[derive(ComponentType, Lift)]
#[component(record)]
pub struct GLora {
    model: GModelRef,
    #[component(name = "strength-model")]
    strength_model: f64,
    #[component(name = "strength-clip")]
    strength_clip: f64,
}
impl Unit for GLora {
    const BYTES: usize = std::mem::size_of::<Lora>();
}

/// A list of at most [`MAX_ENTRIES`] entries (of at most 64 bytes each).
type Entries<T> = Guarded<Vec<T>, { MAX_ENTRIES * 64 }>;
/// One node id: each is checked too (entries of a list may all point at one huge string).
type NodeId = Guarded<String, { caps::MAX_NAME_BYTES }>;
impl<const M: usize> Unit for Guarded<String, M> {
    const BYTES: usize = std::mem::size_of::<String>();
}
/// A list of at most [`MAX_NODE_IDS`] node ids.
type NodeIds = Guarded<Vec<NodeId>, { MAX_NODE_IDS * std::mem::size_of::<String>() }>;

#[derive(ComponentType, Lift)]
#[component(record)]
pub struct GModelSet {
    base: Option<GModelRef>,
    loras: Entries<GLora>,
    others: Entries<GModelRef>,
}

#[derive(ComponentType, Lift)]
#[component(record)]
pub struct GSamplerProgress {
    #[component(name = "node-id")]
    node_id: Text,
    steps: u32,
}
impl Unit for GSamplerProgress {
    const BYTES: usize = std::mem::size_of::<SamplerProgress>();
}

#[derive(ComponentType, Lift, Clone, Copy)]
#[component(enum)]
#[repr(u8)]
pub enum GOutputFormat {
    #[component(name = "jpeg")]
    Jpeg,
    #[component(name = "png")]
    Png,
    #[component(name = "original")]
    Original,
}

/// `job` of contract 0.1.
#[derive(ComponentType, Lift)]
#[component(record)]
pub struct JobV0_1 {
    workflow: Guarded<String, MAX_WORKFLOW_BYTES>,
    uploads: Guarded<Vec<GUpload>, { caps::MAX_UPLOADS_PER_JOB * std::mem::size_of::<PluginUpload>() }>,
    outputs: NodeIds,
    #[component(name = "output-format")]
    output_format: GOutputFormat,
    seed: Option<u64>,
    analytics: Guarded<String, MAX_ANALYTICS_BYTES>,
    #[component(name = "caller-nodes")]
    caller_nodes: NodeIds,
}

/// `job` of contract 0.2: 0.1's fields plus the model set and progress hints.
#[derive(ComponentType, Lift)]
#[component(record)]
pub struct JobV0_2 {
    workflow: Guarded<String, MAX_WORKFLOW_BYTES>,
    uploads: Guarded<Vec<GUpload>, { caps::MAX_UPLOADS_PER_JOB * std::mem::size_of::<PluginUpload>() }>,
    outputs: NodeIds,
    #[component(name = "output-format")]
    output_format: GOutputFormat,
    seed: Option<u64>,
    analytics: Guarded<String, MAX_ANALYTICS_BYTES>,
    #[component(name = "caller-nodes")]
    caller_nodes: NodeIds,
    models: GModelSet,
    progress: Entries<GSamplerProgress>,
}

/// `job` of contract 0.3: 0.2's fields, uploads that may name a file, and model fetches.
#[derive(ComponentType, Lift)]
#[component(record)]
pub struct JobV0_3 {
    workflow: Guarded<String, MAX_WORKFLOW_BYTES>,
    uploads: Guarded<Vec<GUploadV0_3>, { caps::MAX_UPLOADS_PER_JOB * std::mem::size_of::<PluginUpload>() }>,
    outputs: NodeIds,
    #[component(name = "output-format")]
    output_format: GOutputFormat,
    seed: Option<u64>,
    analytics: Guarded<String, MAX_ANALYTICS_BYTES>,
    #[component(name = "caller-nodes")]
    caller_nodes: NodeIds,
    models: GModelSet,
    progress: Entries<GSamplerProgress>,
    fetches: Guarded<Vec<GModelFetch>, { caps::MAX_FETCHES_PER_JOB * std::mem::size_of::<ModelFetch>() }>,
}

#[derive(ComponentType, Lift)]
#[component(record)]
pub struct GFieldError {
    field: ErrorText,
    message: ErrorText,
}
impl Unit for GFieldError {
    /// The record and both texts at their cap: a refusal's list is bounded by what it may hold.
    const BYTES: usize = std::mem::size_of::<FieldError>() + 2 * MAX_ERROR_TEXT_BYTES;
}

#[derive(ComponentType, Lift)]
#[component(variant)]
pub enum GBuildError {
    #[component(name = "invalid-request")]
    InvalidRequest(Guarded<Vec<GFieldError>>),
    #[component(name = "not-found")]
    NotFound(GFieldError),
    #[component(name = "unavailable")]
    Unavailable(ErrorText),
    #[component(name = "internal")]
    Internal(ErrorText),
}

#[derive(ComponentType, Lift)]
#[component(record)]
pub struct GUserError {
    status: u16,
    title: ErrorText,
    detail: ErrorText,
    field: Option<ErrorText>,
}

/// The lifted value, or which field was refused.
fn take<T, const MAX: usize>(value: Guarded<T, MAX>, what: &'static str) -> Result<T, &'static str> {
    match value {
        Guarded::Lifted(v) => Ok(v),
        Guarded::Refused => Err(what),
    }
}

fn model_ref(m: GModelRef) -> Result<ModelRef, &'static str> {
    Ok(ModelRef { folder: take(m.folder, "model folder")?, name: take(m.name, "model name")? })
}

fn strings(list: NodeIds, what: &'static str) -> Result<Vec<String>, &'static str> {
    take(list, what)?.into_iter().map(|id| take(id, what)).collect()
}

fn uploads(list: Guarded<Vec<GUpload>, { caps::MAX_UPLOADS_PER_JOB * std::mem::size_of::<PluginUpload>() }>) -> Result<Vec<PluginUpload>, &'static str> {
    take(list, "uploads")?
        .into_iter()
        .map(|u| {
            Ok(PluginUpload {
                field: take(u.field, "upload field")?,
                filename: take(u.filename, "upload filename")?,
                source: match u.source {
                    GImageSource::Bytes(b) => UploadSource::Bytes(take(b, "upload bytes")?),
                    GImageSource::InputPath(p) => UploadSource::InputPath(take(p, "upload input path")?),
                },
                node_id: take(u.node_id, "upload node id")?,
                input_name: take(u.input_name, "upload input name")?,
            })
        })
        .collect()
}

fn file_ref(f: GFileRef) -> Result<FileRef, &'static str> {
    let source = match f.source {
        GFileSource::Url(url) => FileSource::Url(take(url, "file URL")?),
        GFileSource::Asset(asset) => FileSource::Asset(take(asset, "file asset")?),
    };
    Ok(FileRef { source, sha256: f.sha256.map(|d| take(d, "file sha256")).transpose()?, blake3: f.blake3.map(|d| take(d, "file blake3")).transpose()? })
}

fn uploads_v0_3(list: Guarded<Vec<GUploadV0_3>, { caps::MAX_UPLOADS_PER_JOB * std::mem::size_of::<PluginUpload>() }>) -> Result<Vec<PluginUpload>, &'static str> {
    take(list, "uploads")?
        .into_iter()
        .map(|u| {
            Ok(PluginUpload {
                field: take(u.field, "upload field")?,
                filename: take(u.filename, "upload filename")?,
                source: match u.source {
                    GImageSourceV0_3::Bytes(b) => UploadSource::Bytes(take(b, "upload bytes")?),
                    GImageSourceV0_3::InputPath(p) => UploadSource::InputPath(take(p, "upload input path")?),
                    GImageSourceV0_3::File(f) => UploadSource::File(file_ref(f)?),
                },
                node_id: take(u.node_id, "upload node id")?,
                input_name: take(u.input_name, "upload input name")?,
            })
        })
        .collect()
}

fn output_format(f: GOutputFormat) -> OutputFormat {
    match f {
        GOutputFormat::Jpeg => OutputFormat::Jpeg,
        GOutputFormat::Png => OutputFormat::Png,
        GOutputFormat::Original => OutputFormat::Original,
    }
}

impl JobV0_1 {
    /// The job, or the field that was refused while lifting (taken in lift order, as for 0.2).
    pub fn into_raw(self) -> Result<RawJob, &'static str> {
        let workflow = take(self.workflow, "workflow")?;
        let uploads = uploads(self.uploads)?;
        let outputs = strings(self.outputs, "outputs")?;
        let analytics = take(self.analytics, "analytics")?;
        let caller_nodes = strings(self.caller_nodes, "caller_nodes")?;
        Ok(RawJob {
            workflow,
            uploads,
            outputs,
            output_format: output_format(self.output_format),
            seed: self.seed,
            analytics,
            caller_nodes,
            // 0.1.0 says nothing about models or progress: the host infers the set.
            models: None,
            progress: Vec::new(),
            fetches: Vec::new(),
        })
    }
}

impl JobV0_2 {
    /// The job, or the field that was refused while lifting. Fields are taken in the order they
    /// were lifted: once one value is refused every later one is too, so the first refused is
    /// the culprit.
    pub fn into_raw(self) -> Result<RawJob, &'static str> {
        let workflow = take(self.workflow, "workflow")?;
        let uploads = uploads(self.uploads)?;
        let outputs = strings(self.outputs, "outputs")?;
        let analytics = take(self.analytics, "analytics")?;
        let caller_nodes = strings(self.caller_nodes, "caller_nodes")?;
        let base = self.models.base.map(model_ref).transpose()?;
        let loras = take(self.models.loras, "models.loras")?
            .into_iter()
            .map(|l| Ok(Lora { model: model_ref(l.model)?, strength_model: l.strength_model, strength_clip: l.strength_clip }))
            .collect::<Result<Vec<_>, &'static str>>()?;
        let others = take(self.models.others, "models.others")?.into_iter().map(model_ref).collect::<Result<Vec<_>, _>>()?;
        let progress = take(self.progress, "progress")?
            .into_iter()
            .map(|p| Ok(SamplerProgress { node_id: take(p.node_id, "progress node id")?, steps: p.steps }))
            .collect::<Result<Vec<_>, &'static str>>()?;
        Ok(RawJob {
            workflow,
            uploads,
            outputs,
            output_format: output_format(self.output_format),
            seed: self.seed,
            analytics,
            caller_nodes,
            models: Some(ModelSet { base, loras, others, source: ModelSetSource::Declared }),
            progress,
            fetches: Vec::new(),
        })
    }
}

impl JobV0_3 {
    /// The job, or the field that was refused while lifting (taken in lift order, as for 0.2).
    pub fn into_raw(self) -> Result<RawJob, &'static str> {
        let workflow = take(self.workflow, "workflow")?;
        let uploads = uploads_v0_3(self.uploads)?;
        let outputs = strings(self.outputs, "outputs")?;
        let analytics = take(self.analytics, "analytics")?;
        let caller_nodes = strings(self.caller_nodes, "caller_nodes")?;
        let base = self.models.base.map(model_ref).transpose()?;
        let loras = take(self.models.loras, "models.loras")?
            .into_iter()
            .map(|l| Ok(Lora { model: model_ref(l.model)?, strength_model: l.strength_model, strength_clip: l.strength_clip }))
            .collect::<Result<Vec<_>, &'static str>>()?;
        let others = take(self.models.others, "models.others")?.into_iter().map(model_ref).collect::<Result<Vec<_>, _>>()?;
        let progress = take(self.progress, "progress")?
            .into_iter()
            .map(|p| Ok(SamplerProgress { node_id: take(p.node_id, "progress node id")?, steps: p.steps }))
            .collect::<Result<Vec<_>, &'static str>>()?;
        let fetches = take(self.fetches, "fetches")?
            .into_iter()
            .map(|f| {
                Ok(ModelFetch {
                    field: take(f.field, "fetch field")?,
                    folder: take(f.folder, "fetch folder")?,
                    file: file_ref(f.file)?,
                    node_id: take(f.node_id, "fetch node id")?,
                    input_name: take(f.input_name, "fetch input name")?,
                })
            })
            .collect::<Result<Vec<_>, &'static str>>()?;
        Ok(RawJob {
            workflow,
            uploads,
            outputs,
            output_format: output_format(self.output_format),
            seed: self.seed,
            analytics,
            caller_nodes,
            models: Some(ModelSet { base, loras, others, source: ModelSetSource::Declared }),
            progress,
            fetches,
        })
    }
}

fn field_error(e: GFieldError) -> FieldError {
    FieldError { field: e.field.0, message: e.message.0 }
}

impl GBuildError {
    /// The refusal, its texts already cut; `None` when its error list was refused.
    pub fn into_build_error(self) -> Option<BuildError> {
        Some(match self {
            GBuildError::InvalidRequest(list) => BuildError::InvalidRequest(take(list, "errors").ok()?.into_iter().map(field_error).collect()),
            GBuildError::NotFound(e) => BuildError::NotFound(field_error(e)),
            GBuildError::Unavailable(s) => BuildError::Unavailable(s.0),
            GBuildError::Internal(s) => BuildError::Internal(s.0),
        })
    }
}

impl GUserError {
    pub fn into_user_error(self) -> UserError {
        UserError { status: self.status, title: self.title.0, detail: self.detail.0, field: self.field.map(|f| f.0) }
    }
}

/// A build answer, lifted under [`guarded`], into the host's model: the job or refusal, or why a
/// value was not copied (`refused` is what [`guarded`] reported).
pub fn build_answer<J>(
    answer: Result<J, GBuildError>,
    refused: Option<Option<LiftError>>,
    into_raw: impl FnOnce(J) -> Result<RawJob, &'static str>,
) -> Result<Result<RawJob, BuildError>, LiftError> {
    let field_error = |what: &'static str| match &refused {
        Some(Some(reason)) => reason.clone(),
        _ => LiftError::FieldTooLarge { what },
    };
    match answer {
        Ok(job) => into_raw(job).map(Ok).map_err(field_error),
        Err(refusal) => refusal.into_build_error().map(Err).ok_or_else(|| field_error("errors")),
    }
}
