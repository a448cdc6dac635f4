//! The state behind one plugin call, and the host imports a plugin may use.
//!
//! A fresh [`SandboxState`] (and `Store`) is made for every call and dropped
//! after it: an instance that trapped may have broken invariants, so nothing is
//! ever reused. WASI is present only so that standard toolchains' components link;
//! its context has no preopened directories, no environment, no arguments, no
//! network and no stdin. stdout/stderr go to capped in-memory streams whose content
//! is logged under the plugin's name after the call (what is past the cap is dropped,
//! never refused).
//!
//! The host interface (`log`, `list-models`, `report-panic`) is linked by hand rather
//! than through the generated bindings, so that each string argument arrives as a
//! [`WasmStr`] pointing into guest memory: a 50 MiB log message is cut to its first
//! [`MAX_LOG_MESSAGE`] bytes without ever being copied whole.

use std::sync::Arc;

use wasmtime::component::{ComponentType, Lift, Linker, Lower, ResourceTable, WasmStr};
use wasmtime::{ResourceLimiter, StoreContextMut, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::budget::CallShare;
pub use super::calls::LogLevel;
use super::capped_output::CappedOutput;
use super::limits::PluginLimits;
use super::log_budget::{Admit, LogBudget};

/// Where plugins' `list-models` answers come from (the model volume in the
/// service; a fixed list in tests and benchmarks). Called on every plugin call
/// that asks, from a blocking thread: implementations must be cheap.
pub trait ModelLister: Send + Sync {
    /// Files present in `folder` (relative names, `/`-separated, with sizes).
    /// Zero-byte files and broken links must not be listed.
    fn list_models(&self, folder: &str) -> Vec<(String, u64)>;
}

/// A lister with no models (check-plugin without `--models`).
pub struct NoModels;

impl ModelLister for NoModels {
    fn list_models(&self, _folder: &str) -> Vec<(String, u64)> {
        Vec::new()
    }
}

/// wasmtime's [`StoreLimits`], plus a flag saying the memory limit was what
/// stopped the call: a failure is classified by this flag, never by the
/// wording of wasmtime's error. Every growth the per-call limit allows is then
/// charged to the call's share of the host budget before it happens; a refused
/// charge traps the call and is recorded in the share.
pub(crate) struct CallLimiter {
    inner: StoreLimits,
    pub(crate) memory_limit_hit: bool,
    pub(crate) share: CallShare,
}

impl ResourceLimiter for CallLimiter {
    fn memory_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        let allowed = self.inner.memory_growing(current, desired, maximum);
        if !matches!(allowed, Ok(true)) {
            self.memory_limit_hit = true;
            return allowed;
        }
        match self.share.take(desired.saturating_sub(current)) {
            Ok(()) => Ok(true),
            Err(_) => Err(wasmtime::format_err!("the host's plugin memory budget is exhausted")),
        }
    }
    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.memory_limit_hit = true;
        self.inner.memory_grow_failed(error)
    }
    fn table_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        self.inner.table_growing(current, desired, maximum)
    }
    fn table_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.inner.table_grow_failed(error)
    }
    fn instances(&self) -> usize {
        self.inner.instances()
    }
    fn tables(&self) -> usize {
        self.inner.tables()
    }
    fn memories(&self) -> usize {
        self.inner.memories()
    }
}

/// Per-call store data.
pub struct SandboxState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub(crate) limits: CallLimiter,
    /// What the plugin's panic hook reported (contract 0.2+), bounded.
    pub(crate) panic_message: Option<String>,
    plugin: Arc<str>,
    request_id: String,
    models: Arc<dyn ModelLister>,
    stdout: CappedOutput,
    stderr: CappedOutput,
    /// Log bytes this call may still write (interior: `flush_output` takes `&self`).
    log_budget: std::sync::Mutex<LogBudget>,
}

impl SandboxState {
    /// A state that grants nothing but the flowhost host interface.
    pub fn new(plugin: Arc<str>, request_id: String, limits: &PluginLimits, models: Arc<dyn ModelLister>, share: CallShare) -> Self {
        let stdout = CappedOutput::new(limits.output_capture_bytes);
        let stderr = CappedOutput::new(limits.output_capture_bytes);
        let wasi = WasiCtxBuilder::new()
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        let inner = StoreLimitsBuilder::new()
            .memory_size(limits.memory_bytes)
            .instances(64)
            .trap_on_grow_failure(true)
            .build();
        let limits = CallLimiter { inner, memory_limit_hit: false, share };
        Self { wasi, table: ResourceTable::new(), limits, panic_message: None, plugin, request_id, models, stdout, stderr, log_budget: Default::default() }
    }

    /// Log whatever the plugin wrote to stdout/stderr during the call, and once per
    /// stream how much was dropped past the cap.
    pub fn flush_output(&self) {
        for (stream, pipe) in [("stdout", &self.stdout), ("stderr", &self.stderr)] {
            let dropped = pipe.dropped();
            if dropped > 0 {
                tracing::warn!(target: "plugin", plugin = %self.plugin, request_id = %self.request_id, stream, cap_bytes = pipe.cap(), dropped_bytes = dropped,
                    "the plugin wrote {dropped} bytes to {stream} past the {}-byte cap; they were dropped", pipe.cap());
            }
            let bytes = pipe.contents();
            if bytes.is_empty() {
                continue;
            }
            let text = String::from_utf8_lossy(&bytes);
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                match self.admit(line) {
                    Admit::Log(line) => tracing::info!(target: "plugin", plugin = %self.plugin, request_id = %self.request_id, stream, "{line}"),
                    Admit::Truncated => self.log_truncated(),
                    Admit::Drop => break,
                }
            }
        }
    }
}

impl WasiView for SandboxState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

/// Longest log message accepted from a plugin; longer ones are cut.
const MAX_LOG_MESSAGE: usize = 4096;

/// The host imports, implemented once for every contract version: each
/// `since_v*` module's generated `Host` trait delegates here.
impl SandboxState {
    fn admit(&self, message: &str) -> Admit {
        self.log_budget.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).admit(message)
    }

    fn log_truncated(&self) {
        tracing::warn!(target: "plugin", plugin = %self.plugin, request_id = %self.request_id, "log truncated: the plugin wrote more than {} bytes in this call; the rest is dropped", super::log_budget::BYTES_PER_CALL);
    }

    /// Log one message: cut to [`MAX_LOG_MESSAGE`] bytes *before* anything is
    /// escaped or copied, then admitted against the call's log budget.
    pub(crate) fn log(&self, level: LogLevel, message: &str) {
        let (head, cut) = prefix(message, MAX_LOG_MESSAGE);
        let mut message = match self.admit(head) {
            Admit::Log(text) => text,
            Admit::Truncated => return self.log_truncated(),
            Admit::Drop => return,
        };
        if cut {
            message.push_str(" …(truncated)");
        }
        let (plugin, request_id) = (&*self.plugin, self.request_id.as_str());
        match level {
            LogLevel::Trace => tracing::trace!(target: "plugin", plugin, request_id, "{message}"),
            LogLevel::Debug => tracing::debug!(target: "plugin", plugin, request_id, "{message}"),
            LogLevel::Info => tracing::info!(target: "plugin", plugin, request_id, "{message}"),
            LogLevel::Warn => tracing::warn!(target: "plugin", plugin, request_id, "{message}"),
            LogLevel::Error => tracing::error!(target: "plugin", plugin, request_id, "{message}"),
        }
    }

    pub(crate) fn list_models(&self, folder: &str) -> Vec<(String, u64)> {
        // No model folder has a name this long; a longer one is not looked up at all.
        if folder.len() > MAX_FOLDER_NAME {
            return Vec::new();
        }
        self.models.list_models(folder)
    }

    /// Contract 0.2+: the SDK's panic hook reports the message before the trap.
    pub(crate) fn report_panic(&mut self, message: &str) {
        if self.panic_message.is_none() {
            self.panic_message = Some(prefix(message, MAX_LOG_MESSAGE).0.to_string());
        }
    }
}

/// Longest folder name `list-models` looks up.
const MAX_FOLDER_NAME: usize = 1024;

/// The first `max` bytes of `text` (on a character boundary), and whether it was cut.
fn prefix(text: &str, max: usize) -> (&str, bool) {
    if text.len() <= max {
        return (text, false);
    }
    let mut cut = max;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    (&text[..cut], true)
}

/// `log-level`, the same enum in every contract version (its values are made by
/// wasmtime's lifting, never by host code).
#[allow(dead_code)]
#[derive(ComponentType, Lift, Clone, Copy)]
#[component(enum)]
#[repr(u8)]
enum LogLevelArg {
    #[component(name = "trace")]
    Trace,
    #[component(name = "debug")]
    Debug,
    #[component(name = "info")]
    Info,
    #[component(name = "warn")]
    Warn,
    #[component(name = "error")]
    Error,
}

/// `model-file`, the same record in every contract version.
#[derive(ComponentType, Lower)]
#[component(record)]
struct ModelFileOut {
    name: String,
    size: u64,
}

/// Link `flowhost:plugin/host@{version}` (and the type-only `types` interface) with
/// string arguments taken as [`WasmStr`]. `report_panic`: the interface has
/// `report-panic` (contract 0.2+).
pub(crate) fn add_host_interface(linker: &mut Linker<SandboxState>, version: &str, report_panic: bool) -> wasmtime::Result<()> {
    linker.instance(&format!("flowhost:plugin/types@{version}"))?;
    let mut host = linker.instance(&format!("flowhost:plugin/host@{version}"))?;
    host.func_wrap("log", |cx: StoreContextMut<'_, SandboxState>, (level, message): (LogLevelArg, WasmStr)| {
        let level = match level {
            LogLevelArg::Trace => LogLevel::Trace,
            LogLevelArg::Debug => LogLevel::Debug,
            LogLevelArg::Info => LogLevel::Info,
            LogLevelArg::Warn => LogLevel::Warn,
            LogLevelArg::Error => LogLevel::Error,
        };
        let text = message.to_str(&cx)?;
        cx.data().log(level, &text);
        Ok(())
    })?;
    host.func_wrap("list-models", |cx: StoreContextMut<'_, SandboxState>, (folder,): (WasmStr,)| {
        let folder = folder.to_str(&cx)?;
        let files = cx.data().list_models(&folder);
        Ok((files.into_iter().map(|(name, size)| ModelFileOut { name, size }).collect::<Vec<_>>(),))
    })?;
    if report_panic {
        host.func_wrap("report-panic", |mut cx: StoreContextMut<'_, SandboxState>, (message,): (WasmStr,)| {
            let text = prefix(&message.to_str(&cx)?, MAX_LOG_MESSAGE).0.to_string();
            cx.data_mut().report_panic(&text);
            Ok(())
        })?;
    }
    Ok(())
}

impl SandboxState {
    /// The most telling line the plugin wrote to stderr: a Rust panic's
    /// "panicked at ...: message" (two lines since Rust 1.73, joined), else the
    /// last non-empty line.
    pub fn last_stderr_line(&self) -> Option<String> {
        let bytes = self.stderr.contents();
        let text = String::from_utf8_lossy(&bytes);
        let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
        if let Some(i) = lines.iter().position(|l| l.contains("panicked")) {
            let message = lines.get(i + 1).filter(|l| !l.starts_with("note:")).copied().unwrap_or_default();
            return Some(format!("{} {message}", lines[i]).trim().to_string());
        }
        lines.last().map(|l| l.to_string())
    }
}
