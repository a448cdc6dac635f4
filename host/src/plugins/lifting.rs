//! What a plugin call returns, measured in guest memory before the host copies any of it.
//!
//! wasmtime's generated bindings lift a whole `result<job, build-error>` into host `String`s and
//! `Vec`s before the host sees a byte of it: 32 calls each returning 50 MiB put 1.6 GB on the host
//! heap, and a list whose entries all point at the same guest string multiplies it further. The
//! types here mirror the contract's with [`WasmStr`] / [`WasmList`] in place of every string and
//! list, so lifting them reads only pointers and lengths. Then:
//!
//! - a job is measured (list lengths first, then string lengths, stopping at the per-call cap),
//!   its size charged to the call's share of the [`super::budget::HostBudget`], and only then
//!   copied;
//! - error texts (field errors, user errors) are copied cut to [`MAX_ERROR_TEXT_BYTES`], at most
//!   [`MAX_FIELD_ERRORS`] of them: the rest is never copied at all.
//!
//! The record types are shared by every contract version where the WIT is the same (type checks
//! are structural: field names and types, not type names); [`JobV0_1`] and [`JobV0_2`] differ.
//!
//! Owns: the lazy mirror types and the measure-charge-copy order. Must never: copy a string or a
//! list before its length has been checked, or know HTTP.

use wasmtime::Store;
use wasmtime::component::{ComponentType, Lift, WasmList, WasmStr};

use super::budget::Refusal;
use super::calls::{BuildError, FieldError, UserError};
use super::manifest::{Lora, ModelRef, ModelSet, ModelSetSource, OutputFormat, PluginUpload, RawJob, SamplerProgress, UploadSource, caps};
use super::sandbox::SandboxState;

/// Longest error text copied from a plugin, bytes (answers cut further, to 500 characters).
pub const MAX_ERROR_TEXT_BYTES: usize = 1024;
/// Most field errors copied from one refusal.
pub const MAX_FIELD_ERRORS: usize = 256;
/// Most entries of any list in a job (uploads have their own, smaller cap).
pub const MAX_JOB_LIST_ENTRIES: usize = caps::MAX_LIST_ENTRIES;
/// Largest workflow (JSON text) a job may carry, bytes: ComfyUI graphs are kilobytes; the
/// workflow is parsed, stored and sent on, so its size is multiplied downstream.
pub const MAX_WORKFLOW_BYTES: usize = 8 << 20;
/// Largest analytics properties (JSON text), bytes.
pub const MAX_ANALYTICS_BYTES: usize = 64 << 10;

#[derive(ComponentType, Lift)]
#[component(record)]
pub struct LazyModelRef {
    folder: WasmStr,
    name: WasmStr,
}

#[derive(ComponentType, Lift)]
#[component(variant)]
pub enum LazyImageSource {
    #[component(name = "bytes")]
    Bytes(WasmList<u8>),
    #[component(name = "input-path")]
    InputPath(WasmStr),
}

#[derive(ComponentType, Lift)]
#[component(record)]
pub struct LazyUpload {
    field: WasmStr,
    filename: WasmStr,
    source: LazyImageSource,
    #[component(name = "node-id")]
    node_id: WasmStr,
    #[component(name = "input-name")]
    input_name: WasmStr,
}

#[derive(ComponentType, Lift)]
#[component(record)]
pub struct LazyLora {
    model: LazyModelRef,
    #[component(name = "strength-model")]
    strength_model: f64,
    #[component(name = "strength-clip")]
    strength_clip: f64,
}

#[derive(ComponentType, Lift)]
#[component(record)]
pub struct LazyModelSet {
    base: Option<LazyModelRef>,
    loras: WasmList<LazyLora>,
    others: WasmList<LazyModelRef>,
}

#[derive(ComponentType, Lift)]
#[component(record)]
pub struct LazySamplerProgress {
    #[component(name = "node-id")]
    node_id: WasmStr,
    steps: u32,
}

#[derive(ComponentType, Lift, Clone, Copy)]
#[component(enum)]
#[repr(u8)]
pub enum LazyOutputFormat {
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
    workflow: WasmStr,
    uploads: WasmList<LazyUpload>,
    outputs: WasmList<WasmStr>,
    #[component(name = "output-format")]
    output_format: LazyOutputFormat,
    seed: Option<u64>,
    analytics: WasmStr,
    #[component(name = "caller-nodes")]
    caller_nodes: WasmList<WasmStr>,
}

/// `job` of contract 0.2: 0.1's fields plus the model set and progress hints.
#[derive(ComponentType, Lift)]
#[component(record)]
pub struct JobV0_2 {
    workflow: WasmStr,
    uploads: WasmList<LazyUpload>,
    outputs: WasmList<WasmStr>,
    #[component(name = "output-format")]
    output_format: LazyOutputFormat,
    seed: Option<u64>,
    analytics: WasmStr,
    #[component(name = "caller-nodes")]
    caller_nodes: WasmList<WasmStr>,
    models: LazyModelSet,
    progress: WasmList<LazySamplerProgress>,
}

#[derive(ComponentType, Lift)]
#[component(record)]
pub struct LazyFieldError {
    field: WasmStr,
    message: WasmStr,
}

#[derive(ComponentType, Lift)]
#[component(variant)]
pub enum LazyBuildError {
    #[component(name = "invalid-request")]
    InvalidRequest(WasmList<LazyFieldError>),
    #[component(name = "not-found")]
    NotFound(LazyFieldError),
    #[component(name = "unavailable")]
    Unavailable(WasmStr),
    #[component(name = "internal")]
    Internal(WasmStr),
}

#[derive(ComponentType, Lift)]
#[component(record)]
pub struct LazyUserError {
    status: u16,
    title: WasmStr,
    detail: WasmStr,
    field: Option<WasmStr>,
}

/// Why a returned value was not copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LiftError {
    /// The plugin returned more than one call may (its own fault: 500).
    TooLarge { cap: usize },
    /// A list of the job has more entries than any job needs (500).
    TooMany { what: &'static str, len: usize, max: usize },
    /// A text of the job is larger than its cap (500).
    FieldTooLarge { what: &'static str, max: usize },
    /// A string is not valid UTF-8, or a value is malformed (500).
    Malformed(String),
    /// The calls in flight hold the whole host budget (503).
    Busy(Refusal),
}

impl std::fmt::Display for LiftError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LiftError::TooLarge { cap } => write!(f, "returned a job of more than {} MiB, the most one call may return", cap >> 20),
            LiftError::FieldTooLarge { what, max } => write!(f, "returned a job whose {what} is larger than {max} bytes, the most accepted"),
            LiftError::TooMany { what, len, max } => write!(f, "returned a job whose {what} has {len} entries; at most {max} are allowed per job"),
            LiftError::Malformed(detail) => write!(f, "returned a malformed value: {detail}"),
            LiftError::Busy(Refusal::Exhausted { limit, .. }) => {
                write!(f, "the plugin calls in flight hold the host's whole plugin memory budget ({} MiB)", limit >> 20)
            }
        }
    }
}

/// Reads lazy values out of one call's store.
pub struct Reader<'s> {
    store: &'s mut Store<SandboxState>,
    /// Bytes of strings and lists seen while measuring; the walk stops past `cap`.
    measured: usize,
    cap: usize,
}

impl<'s> Reader<'s> {
    /// `cap`: the most bytes one call may return.
    pub fn new(store: &'s mut Store<SandboxState>, cap: usize) -> Self {
        Self { store, measured: 0, cap }
    }

    fn add(&mut self, bytes: usize) -> Result<(), LiftError> {
        self.measured = self.measured.saturating_add(bytes);
        if self.measured > self.cap { Err(LiftError::TooLarge { cap: self.cap }) } else { Ok(()) }
    }

    /// Measure a string (validating it, which copies nothing for UTF-8 guests).
    fn measure_str(&mut self, s: &WasmStr) -> Result<(), LiftError> {
        let len = s.to_str(&*self.store).map_err(|e| LiftError::Malformed(format!("{e}")))?.len();
        self.add(len)
    }

    /// Measure a string that has its own cap (checked before anything else is measured).
    fn measure_capped(&mut self, what: &'static str, s: &WasmStr, max: usize) -> Result<(), LiftError> {
        let len = s.to_str(&*self.store).map_err(|e| LiftError::Malformed(format!("{e}")))?.len();
        if len > max {
            return Err(LiftError::FieldTooLarge { what, max });
        }
        self.add(len)
    }

    fn measure_strs(&mut self, what: &'static str, list: &WasmList<WasmStr>) -> Result<(), LiftError> {
        check_len(what, list.len(), MAX_JOB_LIST_ENTRIES)?;
        self.add(list.len() * 8)?;
        for i in 0..list.len() {
            let s = self.item(list, i)?;
            self.measure_str(&s)?;
        }
        Ok(())
    }

    fn measure_model_ref(&mut self, m: &LazyModelRef) -> Result<(), LiftError> {
        self.measure_str(&m.folder)?;
        self.measure_str(&m.name)
    }

    fn item<T: Lift>(&mut self, list: &WasmList<T>, i: usize) -> Result<T, LiftError> {
        match list.get(&mut *self.store, i) {
            Some(Ok(item)) => Ok(item),
            Some(Err(e)) => Err(LiftError::Malformed(format!("{e}"))),
            None => Err(LiftError::Malformed("list shorter than its length".into())),
        }
    }

    fn string(&mut self, s: &WasmStr) -> Result<String, LiftError> {
        Ok(s.to_str(&*self.store).map_err(|e| LiftError::Malformed(format!("{e}")))?.into_owned())
    }

    fn strings(&mut self, list: &WasmList<WasmStr>) -> Result<Vec<String>, LiftError> {
        (0..list.len()).map(|i| self.item(list, i).and_then(|s| self.string(&s))).collect()
    }

    fn model_ref(&mut self, m: &LazyModelRef) -> Result<ModelRef, LiftError> {
        Ok(ModelRef { folder: self.string(&m.folder)?, name: self.string(&m.name)? })
    }

    /// A copy of at most [`MAX_ERROR_TEXT_BYTES`] of `s`.
    fn error_text(&mut self, s: &WasmStr) -> Result<String, LiftError> {
        let text = s.to_str(&*self.store).map_err(|e| LiftError::Malformed(format!("{e}")))?;
        let mut cut = text.len().min(MAX_ERROR_TEXT_BYTES);
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        let mut out = text[..cut].to_string();
        if cut < text.len() {
            out.push('…');
        }
        Ok(out)
    }

    fn field_error(&mut self, e: &LazyFieldError) -> Result<FieldError, LiftError> {
        Ok(FieldError { field: self.error_text(&e.field)?, message: self.error_text(&e.message)? })
    }

    /// A refusal, its texts cut: nothing beyond the kept prefix is copied.
    pub fn build_error(&mut self, e: &LazyBuildError) -> Result<BuildError, LiftError> {
        Ok(match e {
            LazyBuildError::InvalidRequest(list) => {
                let mut errors = Vec::with_capacity(list.len().min(MAX_FIELD_ERRORS));
                for i in 0..list.len().min(MAX_FIELD_ERRORS) {
                    let item = self.item(list, i)?;
                    errors.push(self.field_error(&item)?);
                }
                BuildError::InvalidRequest(errors)
            }
            LazyBuildError::NotFound(e) => BuildError::NotFound(self.field_error(e)?),
            LazyBuildError::Unavailable(s) => BuildError::Unavailable(self.error_text(s)?),
            LazyBuildError::Internal(s) => BuildError::Internal(self.error_text(s)?),
        })
    }

    /// A user error, its texts cut.
    pub fn user_error(&mut self, e: &LazyUserError) -> Result<UserError, LiftError> {
        let field = match &e.field {
            Some(f) => Some(self.error_text(f)?),
            None => None,
        };
        Ok(UserError { status: e.status, title: self.error_text(&e.title)?, detail: self.error_text(&e.detail)?, field })
    }

    fn measure_uploads(&mut self, uploads: &WasmList<LazyUpload>) -> Result<(), LiftError> {
        check_len("uploads", uploads.len(), caps::MAX_UPLOADS_PER_JOB)?;
        for i in 0..uploads.len() {
            let u = self.item(uploads, i)?;
            for s in [&u.field, &u.filename, &u.node_id, &u.input_name] {
                self.measure_str(s)?;
            }
            match &u.source {
                LazyImageSource::Bytes(bytes) => self.add(bytes.len())?,
                LazyImageSource::InputPath(p) => self.measure_str(p)?,
            }
        }
        Ok(())
    }

    fn uploads(&mut self, uploads: &WasmList<LazyUpload>) -> Result<Vec<PluginUpload>, LiftError> {
        let mut out = Vec::with_capacity(uploads.len());
        for i in 0..uploads.len() {
            let u = self.item(uploads, i)?;
            let source = match &u.source {
                LazyImageSource::Bytes(bytes) => UploadSource::Bytes(bytes.as_le_slice(&*self.store).to_vec()),
                LazyImageSource::InputPath(p) => UploadSource::InputPath(self.string(p)?),
            };
            out.push(PluginUpload {
                field: self.string(&u.field)?,
                filename: self.string(&u.filename)?,
                source,
                node_id: self.string(&u.node_id)?,
                input_name: self.string(&u.input_name)?,
            });
        }
        Ok(out)
    }

    /// Measure `measured`'s bytes, charge them to the call's share of the host budget, then copy.
    fn charge(&mut self) -> Result<(), LiftError> {
        let bytes = self.measured;
        self.store.data_mut().limits.share.take(bytes).map_err(LiftError::Busy)
    }

    /// A 0.1 job: measured, charged, copied.
    pub fn job_v0_1(&mut self, job: &JobV0_1) -> Result<RawJob, LiftError> {
        self.measure_capped("workflow", &job.workflow, MAX_WORKFLOW_BYTES)?;
        self.measure_capped("analytics", &job.analytics, MAX_ANALYTICS_BYTES)?;
        self.measure_strs("outputs", &job.outputs)?;
        self.measure_strs("caller_nodes", &job.caller_nodes)?;
        self.measure_uploads(&job.uploads)?;
        self.charge()?;
        Ok(RawJob {
            workflow: self.string(&job.workflow)?,
            uploads: self.uploads(&job.uploads)?,
            outputs: self.strings(&job.outputs)?,
            output_format: output_format(job.output_format),
            seed: job.seed,
            analytics: self.string(&job.analytics)?,
            caller_nodes: self.strings(&job.caller_nodes)?,
            // 0.1.0 says nothing about models or progress: the host infers the set.
            models: None,
            progress: Vec::new(),
        })
    }

    /// A 0.2 job: measured, charged, copied.
    pub fn job_v0_2(&mut self, job: &JobV0_2) -> Result<RawJob, LiftError> {
        self.measure_capped("workflow", &job.workflow, MAX_WORKFLOW_BYTES)?;
        self.measure_capped("analytics", &job.analytics, MAX_ANALYTICS_BYTES)?;
        self.measure_strs("outputs", &job.outputs)?;
        self.measure_strs("caller_nodes", &job.caller_nodes)?;
        self.measure_uploads(&job.uploads)?;
        if let Some(base) = &job.models.base {
            self.measure_model_ref(base)?;
        }
        check_len("models.loras", job.models.loras.len(), MAX_JOB_LIST_ENTRIES)?;
        for i in 0..job.models.loras.len() {
            let lora = self.item(&job.models.loras, i)?;
            self.measure_model_ref(&lora.model)?;
        }
        check_len("models.others", job.models.others.len(), MAX_JOB_LIST_ENTRIES)?;
        for i in 0..job.models.others.len() {
            let other = self.item(&job.models.others, i)?;
            self.measure_model_ref(&other)?;
        }
        check_len("progress", job.progress.len(), MAX_JOB_LIST_ENTRIES)?;
        for i in 0..job.progress.len() {
            let p = self.item(&job.progress, i)?;
            self.measure_str(&p.node_id)?;
        }
        self.charge()?;

        let base = match &job.models.base {
            Some(m) => Some(self.model_ref(m)?),
            None => None,
        };
        let mut loras = Vec::with_capacity(job.models.loras.len());
        for i in 0..job.models.loras.len() {
            let l = self.item(&job.models.loras, i)?;
            loras.push(Lora { model: self.model_ref(&l.model)?, strength_model: l.strength_model, strength_clip: l.strength_clip });
        }
        let mut others = Vec::with_capacity(job.models.others.len());
        for i in 0..job.models.others.len() {
            let m = self.item(&job.models.others, i)?;
            others.push(self.model_ref(&m)?);
        }
        let mut progress = Vec::with_capacity(job.progress.len());
        for i in 0..job.progress.len() {
            let p = self.item(&job.progress, i)?;
            progress.push(SamplerProgress { node_id: self.string(&p.node_id)?, steps: p.steps });
        }
        Ok(RawJob {
            workflow: self.string(&job.workflow)?,
            uploads: self.uploads(&job.uploads)?,
            outputs: self.strings(&job.outputs)?,
            output_format: output_format(job.output_format),
            seed: job.seed,
            analytics: self.string(&job.analytics)?,
            caller_nodes: self.strings(&job.caller_nodes)?,
            models: Some(ModelSet { base, loras, others, source: ModelSetSource::Declared }),
            progress,
        })
    }
}

fn check_len(what: &'static str, len: usize, max: usize) -> Result<(), LiftError> {
    if len > max { Err(LiftError::TooMany { what, len, max }) } else { Ok(()) }
}

fn output_format(f: LazyOutputFormat) -> OutputFormat {
    match f {
        LazyOutputFormat::Jpeg => OutputFormat::Jpeg,
        LazyOutputFormat::Png => OutputFormat::Png,
        LazyOutputFormat::Original => OutputFormat::Original,
    }
}
