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

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};
use wasmtime::Store;
use wasmtime::component::Component;

use super::bindings::{CONTRACT_PACKAGE, CONTRACT_VERSION, PluginPre, wit};
use super::compiled_cache::{CacheOutcome, CompiledCache};
use super::engine::{PluginEngine, WasmtimeContext};
use super::manifest::{PluginJob, PluginManifest};
use super::sandbox::{ModelLister, SandboxState};

/// Largest `.wasm` file accepted.
pub const MAX_COMPONENT_BYTES: usize = 64 << 20;

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
    pre: PluginPre<SandboxState>,
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
    Refused(wit::BuildError),
    /// The plugin misbehaved: trapped, panicked, ran out of time or memory, or
    /// returned something unusable. Always a 500 `plugin_failed`.
    Failed { plugin: String, version: String, kind: FailureKind, detail: String },
}

/// How a plugin call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    Timeout,
    MemoryLimit,
    Trap,
    InvalidJob,
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Refused(e) => write!(f, "plugin refused the request: {e:?}"),
            CallError::Failed { plugin, version, detail, .. } => write!(f, "plugin {plugin} {version} failed: {detail}"),
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
    ) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        Self::load_bytes(engine, cache, path, &bytes, models)
    }

    /// Load a plugin from bytes (`path` is only a label).
    pub fn load_bytes(
        engine: &PluginEngine,
        cache: Option<&CompiledCache>,
        path: &Path,
        bytes: &[u8],
        models: Arc<dyn ModelLister>,
    ) -> Result<Self> {
        if bytes.len() > MAX_COMPONENT_BYTES {
            bail!("{} bytes is over the {} byte limit for a plugin", bytes.len(), MAX_COMPONENT_BYTES);
        }
        if bytes.is_empty() {
            bail!("the file is empty");
        }
        let sha256 = hex::encode(Sha256::digest(bytes));
        let started = Instant::now();
        let (component, cache_outcome) = CompiledCache::load_or_compile(cache, engine, bytes, &sha256)?;
        check_contract(engine, &component)?;
        let instance_pre = engine
            .linker()
            .instantiate_pre(&component)
            .wt_context("linking the component against the flowhost host (it imports something the sandbox does not provide)")?;
        let pre = PluginPre::new(instance_pre).wt_context("the component does not export the flowhost endpoint")?;

        let provisional: Arc<str> = Arc::from(path.file_name().and_then(|n| n.to_str()).unwrap_or("plugin"));
        let mut store = new_store(engine, provisional, "describe".into(), models.clone());
        let described = pre
            .instantiate(&mut store)
            .and_then(|p| p.flowhost_plugin_endpoint().call_describe(&mut store));
        store.data().flush_output();
        let manifest = described.map_err(|e| anyhow::anyhow!(describe_trap(&e, store.data())))
            .context("calling describe()")?;
        let manifest = PluginManifest::from_wit(manifest).context("invalid manifest")?;
        let validator = jsonschema::validator_for(&manifest.request_schema)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("plugin {}: the request schema is not a valid JSON Schema", manifest.name))?;
        let label: Arc<str> = Arc::from(format!("{}@{}", manifest.name, manifest.version));
        tracing::info!(
            plugin = %label, route = %manifest.route, file = %path.display(), cache = ?cache_outcome,
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
            pre,
            models,
        })
    }

    /// Run `build` for one request in a fresh sandbox. Blocking.
    pub fn build(&self, body: &str, random_seed: u64, request_id: &str) -> Result<PluginJob, CallError> {
        let mut store = new_store(&self.engine, self.label.clone(), request_id.to_string(), self.models.clone());
        let request = wit::Request { body: body.to_string(), random_seed, request_id: request_id.to_string() };
        let result = self
            .pre
            .instantiate(&mut store)
            .and_then(|p| p.flowhost_plugin_endpoint().call_build(&mut store, &request));
        store.data().flush_output();
        match result {
            Ok(Ok(job)) => PluginJob::from_wit(job).map_err(|e| self.failed(FailureKind::InvalidJob, format!("{e:#}"))),
            Ok(Err(refusal)) => Err(CallError::Refused(refusal)),
            Err(err) => Err(self.classify_trap(&err, store.data())),
        }
    }

    /// Ask the plugin to explain an execution failure of its graph. Blocking.
    /// A plugin that fails here is logged and treated as having no explanation.
    pub fn explain_failure(&self, failure: &wit::ExecutionFailure, request_id: &str) -> Option<wit::UserError> {
        let mut store = new_store(&self.engine, self.label.clone(), request_id.to_string(), self.models.clone());
        let result = self
            .pre
            .instantiate(&mut store)
            .and_then(|p| p.flowhost_plugin_endpoint().call_explain_failure(&mut store, failure));
        store.data().flush_output();
        match result {
            Ok(explained) => explained.filter(|e| (400..=599).contains(&e.status)),
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
        let (kind, detail) = classify(err, state, self.engine.limits());
        self.failed(kind, detail)
    }
}

fn new_store(engine: &PluginEngine, plugin: Arc<str>, request_id: String, models: Arc<dyn ModelLister>) -> Store<SandboxState> {
    let limits = engine.limits();
    let mut store = Store::new(engine.engine(), SandboxState::new(plugin, request_id, limits, models));
    store.limiter(|state| &mut state.limits);
    store.set_epoch_deadline(limits.deadline_ticks());
    store.epoch_deadline_trap();
    store
}

fn classify(err: &wasmtime::Error, state: &SandboxState, limits: &super::engine::PluginLimits) -> (FailureKind, String) {
    if let Some(wasmtime::Trap::Interrupt) = err.downcast_ref::<wasmtime::Trap>() {
        return (FailureKind::Timeout, format!("did not finish within {} ms and was stopped", limits.call_timeout.as_millis()));
    }
    let text = format!("{err:#}");
    if text.contains("growing memory") || text.contains("memory limit") {
        return (
            FailureKind::MemoryLimit,
            format!("tried to grow its memory beyond the {} MiB limit", limits.memory_bytes >> 20),
        );
    }
    // A Rust panic prints its message to stderr before trapping: that is the
    // most useful thing to show.
    let panic = state.last_stderr_line().filter(|l| l.contains("panicked"));
    match panic {
        Some(line) => (FailureKind::Trap, line),
        None => (FailureKind::Trap, format!("trapped: {}", first_line(&text))),
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

/// Check that a component was built for our world: it must export
/// `flowhost:plugin/endpoint` at a compatible version, and import nothing but
/// WASI and `flowhost:plugin/*`. The messages name what we expected and what the
/// component has, since that is what its author needs to fix the build.
pub fn check_contract(engine: &PluginEngine, component: &Component) -> Result<()> {
    let ty = component.component_type();
    let engine = engine.engine();
    let exports: Vec<String> = ty.exports(engine).map(|(name, _)| name.to_string()).collect();
    let imports: Vec<String> = ty
        .imports(engine)
        .map(|(name, _)| name.to_string())
        .collect();
    let expected = format!("{CONTRACT_PACKAGE}/endpoint@{CONTRACT_VERSION}");
    let endpoint = exports.iter().find(|e| e.starts_with(&format!("{CONTRACT_PACKAGE}/endpoint")));
    let Some(endpoint) = endpoint else {
        bail!(
            "not a flowhost plugin: expected an export of `{expected}` (world `{CONTRACT_PACKAGE}/plugin@{CONTRACT_VERSION}`), \
             but the component exports [{}] and imports [{}]",
            exports.join(", "),
            imports.join(", ")
        );
    };
    let version = endpoint.split_once('@').map(|(_, v)| v).unwrap_or("(unversioned)");
    if !compatible(version, CONTRACT_VERSION) {
        bail!(
            "built for contract {CONTRACT_PACKAGE}@{version}, but this host speaks {CONTRACT_PACKAGE}@{CONTRACT_VERSION}; \
             rebuild the plugin against a compatible flowhost-sdk (exports [{}], imports [{}])",
            exports.join(", "),
            imports.join(", ")
        );
    }
    for import in &imports {
        let allowed = import.starts_with("wasi:") || import.starts_with(&format!("{CONTRACT_PACKAGE}/"));
        if !allowed {
            bail!(
                "imports `{import}`, which the flowhost sandbox does not provide (allowed: WASI and {CONTRACT_PACKAGE}/host@{CONTRACT_VERSION})"
            );
        }
        if let Some(v) = import.strip_prefix(&format!("{CONTRACT_PACKAGE}/")).and_then(|i| i.split_once('@')).map(|(_, v)| v) {
            if !compatible(v, CONTRACT_VERSION) {
                bail!("imports `{import}`, but this host speaks {CONTRACT_PACKAGE}@{CONTRACT_VERSION}");
            }
        }
    }
    Ok(())
}

/// Semver compatibility as the component model applies it: same major, and for
/// 0.x the same minor.
fn compatible(version: &str, ours: &str) -> bool {
    let parse = |v: &str| -> Option<(u64, u64)> {
        let mut parts = v.split(['.', '-', '+']);
        Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
    };
    match (parse(version), parse(ours)) {
        (Some((0, a)), Some((0, b))) => a == b,
        (Some((a, _)), Some((b, _))) => a == b,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::compatible;

    #[test]
    fn contract_versions_follow_component_semver() {
        assert!(compatible("0.1.0", "0.1.0"));
        assert!(compatible("0.1.7", "0.1.0"));
        assert!(!compatible("0.2.0", "0.1.0"));
        assert!(!compatible("1.0.0", "0.1.0"));
        assert!(!compatible("garbage", "0.1.0"));
    }
}
