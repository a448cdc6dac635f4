//! From a `.wasm` file to a [`LoadedPlugin`], and calling it.
//!
//! Loading is all-or-nothing and happens off the async runtime: read, hash,
//! compile (or take from the compiled cache), check the component speaks our
//! contract, pre-instantiate against the capability-free linker, call `describe`
//! in the sandbox and check the manifest. Only a plugin that passed every step is
//! ever handed to the registry.
//!
//! Calling is one fresh `Store` per call, with the memory limit, the epoch
//! deadline and captured stdio. Every way a call can go wrong becomes a
//! [`CallError`] that names the plugin and its version.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use anyhow::Context;
use sha2::{Digest, Sha256};
use wasmtime::Store;

use super::calls::{BuildError, ExecutionFailure, UserError};
use super::compiled_cache::{CacheOutcome, CompiledCache};
use super::engine::{PluginEngine, WasmtimeContext};
use super::handler::{Handler, HandlerType};
use super::lifting::LiftError;
use super::manifest::{PluginJob, PluginManifest};
use super::sandbox::{ModelLister, SandboxState};

/// Largest `.wasm` file accepted.
pub const MAX_COMPONENT_BYTES: usize = 64 << 20;

/// Why a file did not load, as a closed set: the rejection metric's `reason`
/// label and `/plugins`' `rejection` field come from this, never from the
/// wording of the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LoadErrorKind {
    /// Unreadable, empty or over the size limit.
    File,
    /// Not a valid component, or Cranelift refused it.
    Compile,
    /// Not a flowhost plugin, an unsupported contract version, or a forbidden import.
    Contract,
    /// `describe` trapped, or the manifest (or its schema / warm-up) is invalid.
    Manifest,
    /// Another file already serves the route.
    RouteConflict,
    /// Another file already serves a plugin of the same name.
    DuplicateName,
}

impl LoadErrorKind {
    /// The metric label (also documented in `metrics.rs` and docs/operations.md).
    pub fn label(self) -> &'static str {
        match self {
            LoadErrorKind::File => "file",
            LoadErrorKind::Compile => "compile",
            LoadErrorKind::Contract => "contract",
            LoadErrorKind::Manifest => "manifest",
            LoadErrorKind::RouteConflict => "route_conflict",
            LoadErrorKind::DuplicateName => "duplicate_name",
        }
    }
    /// Every label, for documentation tests.
    pub const ALL: [LoadErrorKind; 6] = [
        LoadErrorKind::File,
        LoadErrorKind::Compile,
        LoadErrorKind::Contract,
        LoadErrorKind::Manifest,
        LoadErrorKind::RouteConflict,
        LoadErrorKind::DuplicateName,
    ];
}

#[cfg(test)]
mod tests {
    use super::LoadErrorKind;

    #[test]
    fn documented_rejection_reasons_are_the_emitted_ones() {
        let docs = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/operations.md")).unwrap();
        let line = docs.lines().find(|l| l.starts_with("Rejection reasons (`reason`):")).expect("the documented list");
        let documented: Vec<&str> = line.split(':').nth(1).unwrap().split('`').skip(1).step_by(2).collect();
        let emitted: Vec<&str> = LoadErrorKind::ALL.iter().map(|k| k.label()).collect();
        assert_eq!(documented, emitted);
        for kind in LoadErrorKind::ALL {
            // The /plugins field and the metric label are the same word.
            assert_eq!(serde_json::to_value(kind).unwrap(), kind.label());
        }
    }
}

/// A failed load: what kind of failure, and the message for the author.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct LoadError {
    pub kind: LoadErrorKind,
    pub message: String,
}

impl LoadError {
    pub fn new(kind: LoadErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into() }
    }
    fn from_anyhow(kind: LoadErrorKind, err: anyhow::Error) -> Self {
        Self { kind, message: format!("{err:#}") }
    }
}

/// A plugin ready to serve: compiled, checked, described.
pub struct LoadedPlugin {
    pub manifest: PluginManifest,
    /// The request schema, compiled once.
    pub validator: jsonschema::Validator,
    pub sha256: String,
    pub file: PathBuf,
    pub loaded_at: SystemTime,
    pub cache: CacheOutcome,
    /// `name@version`, the label in errors and logs.
    pub label: Arc<str>,
    engine: PluginEngine,
    handler: Handler,
    models: Arc<dyn ModelLister>,
}

impl std::fmt::Debug for LoadedPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedPlugin").field("label", &self.label).field("file", &self.file).finish_non_exhaustive()
    }
}

/// Why a plugin call produced no job.
#[derive(Debug, Clone)]
pub enum CallError {
    /// The plugin refused the request (its `build-error`).
    Refused(BuildError),
    /// The plugin misbehaved: trapped, panicked, ran out of time or memory, or
    /// returned something unusable. Always a 500 `plugin_failed`.
    Failed { plugin: String, version: String, kind: FailureKind, detail: String },
    /// The calls in flight (of all plugins) hold the whole host budget, so this
    /// call was stopped: a 503 `plugin_busy`, worth retrying.
    Busy { plugin: String, budget_bytes: usize },
}

/// How a plugin call failed. Decided from state flags and trap codes, never
/// from error text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The epoch deadline trap (`Trap::Interrupt`).
    Timeout,
    /// The store's limiter refused a memory growth.
    MemoryLimit,
    /// The plugin's panic hook reported a panic (contract 0.2+).
    Panic,
    /// Any other trap (a 0.1 plugin's panic is an `unreachable` trap).
    Trap,
    InvalidJob,
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Refused(e) => write!(f, "plugin refused the request: {e:?}"),
            CallError::Failed { plugin, version, detail, .. } => write!(f, "plugin {plugin} {version} failed: {detail}"),
            CallError::Busy { plugin, budget_bytes } => {
                write!(f, "plugin {plugin}: the plugin calls in flight hold the host's whole plugin memory budget ({} MiB)", budget_bytes >> 20)
            }
        }
    }
}

impl LoadedPlugin {
    /// Load a plugin file. Blocking (compiles): call from a blocking thread.
    pub fn load_file(
        engine: &PluginEngine,
        cache: Option<&CompiledCache>,
        path: &Path,
        models: Arc<dyn ModelLister>,
    ) -> Result<Self, LoadError> {
        let bytes = std::fs::read(path)
            .map_err(|e| LoadError::new(LoadErrorKind::File, format!("cannot read {}: {e}", path.display())))?;
        Self::load_bytes(engine, cache, path, &bytes, models)
    }

    /// Load a plugin from bytes (`path` is only a label).
    pub fn load_bytes(
        engine: &PluginEngine,
        cache: Option<&CompiledCache>,
        path: &Path,
        bytes: &[u8],
        models: Arc<dyn ModelLister>,
    ) -> Result<Self, LoadError> {
        use LoadErrorKind as K;
        if bytes.len() > MAX_COMPONENT_BYTES {
            return Err(LoadError::new(K::File, format!("{} bytes is over the {} byte limit for a plugin", bytes.len(), MAX_COMPONENT_BYTES)));
        }
        if bytes.is_empty() {
            return Err(LoadError::new(K::File, "the file is empty"));
        }
        let sha256 = hex::encode(Sha256::digest(bytes));
        let started = Instant::now();
        let (component, cache_outcome) =
            CompiledCache::load_or_compile(cache, engine, bytes, &sha256).map_err(|e| LoadError::from_anyhow(K::Compile, e))?;
        let (kind, contract) = HandlerType::from_component(engine, &component).map_err(|m| LoadError::new(K::Contract, m))?;
        let instance_pre = engine
            .linker()
            .instantiate_pre(&component)
            .wt_context("linking the component against the flowhost host (it imports something the sandbox does not provide)")
            .map_err(|e| LoadError::from_anyhow(K::Contract, e))?;
        let handler = Handler::new(kind, instance_pre)
            .wt_context("the component's endpoint export does not match the flowhost contract it names")
            .map_err(|e| LoadError::from_anyhow(K::Contract, e))?;

        let provisional: Arc<str> = Arc::from(path.file_name().and_then(|n| n.to_str()).unwrap_or("plugin"));
        let mut store = new_store(engine, provisional, "describe".into(), models.clone());
        let described = handler.describe(&mut store);
        store.data().flush_output();
        let manifest = described
            .map_err(|e| LoadError::new(K::Manifest, format!("calling describe(): {}", describe_trap(&e, store.data()))))?;
        let manifest = PluginManifest::from_raw(manifest, &contract)
            .context("invalid manifest")
            .map_err(|e| LoadError::from_anyhow(K::Manifest, e))?;
        let validator = jsonschema::validator_for(&manifest.request_schema).map_err(|e| {
            LoadError::new(K::Manifest, format!("plugin {}: the request schema is not a valid JSON Schema: {e}", manifest.name))
        })?;
        if let Some(warm_up) = &manifest.warm_up {
            let problems: Vec<String> = validator.iter_errors(warm_up).map(|e| format!("{}: {e}", e.instance_path())).collect();
            if !problems.is_empty() {
                return Err(LoadError::new(
                    K::Manifest,
                    format!("plugin {}: the warm-up request does not match the request schema: {}", manifest.name, problems.join("; ")),
                ));
            }
        }
        let label: Arc<str> = Arc::from(format!("{}@{}", manifest.name, manifest.version));
        if let Some(cache) = cache {
            cache.note_loaded(path, engine, &sha256);
        }
        tracing::info!(
            plugin = %label, route = %manifest.route, contract = %contract, file = %path.display(), cache = ?cache_outcome,
            ms = started.elapsed().as_millis() as u64, "plugin loaded"
        );
        Ok(Self {
            manifest,
            validator,
            sha256,
            file: path.to_path_buf(),
            loaded_at: SystemTime::now(),
            cache: cache_outcome,
            label,
            engine: engine.clone(),
            handler,
            models,
        })
    }

    /// Run `build` for one request in a fresh sandbox. Blocking.
    ///
    /// The answer is at most the plugin's memory limit in bytes, and is charged to
    /// the engine's [`super::budget::HostBudget`] before it is copied; the call's
    /// charges (its memory and the copy) are given back when it returns.
    pub fn build(&self, body: &str, random_seed: u64, request_id: &str) -> Result<PluginJob, CallError> {
        let mut store = new_store(&self.engine, self.label.clone(), request_id.to_string(), self.models.clone());
        let cap = self.engine.limits().memory_bytes;
        let result = self.handler.build(&mut store, body, random_seed, request_id, cap);
        store.data().flush_output();
        match result {
            Ok(Ok(Ok(job))) => PluginJob::from_raw(job).map_err(|e| self.failed(FailureKind::InvalidJob, format!("{e:#}"))),
            Ok(Ok(Err(refusal))) => Err(CallError::Refused(refusal)),
            Ok(Err(LiftError::Busy(_))) => Err(self.busy()),
            Ok(Err(invalid)) => Err(self.failed(FailureKind::InvalidJob, invalid.to_string())),
            Err(err) => Err(self.classify_trap(&err, store.data())),
        }
    }

    fn busy(&self) -> CallError {
        CallError::Busy { plugin: self.manifest.name.clone(), budget_bytes: self.engine.budget().limit() }
    }

    /// Ask the plugin to explain an execution failure of its graph. Blocking.
    /// A plugin that fails here is logged and treated as having no explanation.
    pub fn explain_failure(&self, failure: &ExecutionFailure, request_id: &str) -> Option<UserError> {
        let mut store = new_store(&self.engine, self.label.clone(), request_id.to_string(), self.models.clone());
        let result = self.handler.explain_failure(&mut store, failure);
        store.data().flush_output();
        match result {
            Ok(explained) => explained.filter(|e| (400..=599).contains(&e.status)).map(UserError::bounded),
            Err(err) => {
                tracing::warn!(plugin = %self.label, error = %self.classify_trap(&err, store.data()), "explain_failure failed");
                None
            }
        }
    }

    fn failed(&self, kind: FailureKind, detail: String) -> CallError {
        CallError::Failed { plugin: self.manifest.name.clone(), version: self.manifest.version.clone(), kind, detail }
    }

    fn classify_trap(&self, err: &wasmtime::Error, state: &SandboxState) -> CallError {
        // Stopped because the other calls filled the host budget: not this plugin's failure.
        if state.limits.share.refused.is_some() && err.downcast_ref::<wasmtime::Trap>() != Some(&wasmtime::Trap::Interrupt) {
            return self.busy();
        }
        let (kind, detail) = classify(err, state, self.engine.limits());
        self.failed(kind, detail)
    }
}

fn new_store(engine: &PluginEngine, plugin: Arc<str>, request_id: String, models: Arc<dyn ModelLister>) -> Store<SandboxState> {
    let limits = engine.limits();
    let share = engine.budget().share();
    let mut store = Store::new(engine.engine(), SandboxState::new(plugin, request_id, limits, models, share));
    store.limiter(|state| &mut state.limits);
    store.set_epoch_deadline(limits.deadline_ticks());
    store.epoch_deadline_trap();
    store
}

/// Classify a failed call by what the store recorded and the trap code.
fn classify(err: &wasmtime::Error, state: &SandboxState, limits: &super::engine::PluginLimits) -> (FailureKind, String) {
    if let Some(wasmtime::Trap::Interrupt) = err.downcast_ref::<wasmtime::Trap>() {
        return (FailureKind::Timeout, format!("did not finish within {} ms and was stopped", limits.call_timeout.as_millis()));
    }
    if state.limits.memory_limit_hit {
        return (
            FailureKind::MemoryLimit,
            format!("tried to grow its memory beyond the {} MiB limit", limits.memory_bytes >> 20),
        );
    }
    if let Some(message) = &state.panic_message {
        return (FailureKind::Panic, format!("panicked: {message}"));
    }
    // A 0.1 plugin's panic prints to stderr and traps `unreachable`: show the
    // plugin's last words as the detail (the kind is the trap's).
    match state.last_stderr_line() {
        Some(line) => (FailureKind::Trap, line),
        None => (FailureKind::Trap, format!("trapped: {}", first_line(&format!("{err:#}")))),
    }
}

fn describe_trap(err: &wasmtime::Error, state: &SandboxState) -> String {
    match state.last_stderr_line() {
        Some(line) => format!("{}: {line}", first_line(&format!("{err:#}"))),
        None => format!("{err:#}"),
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or_default().to_string()
}

