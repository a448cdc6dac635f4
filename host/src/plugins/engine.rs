//! The wasmtime engine every plugin runs in, and the limits each call obeys.
//!
//! One engine serves all plugins and all requests. It prefers the pooling
//! allocator (instantiation in microseconds, no mmap per request) but probes for
//! it at start: some hosts refuse the large virtual reservation, and then we fall
//! back to on-demand allocation instead of refusing to start. Wall-clock limits use
//! epoch interruption, advanced by a dedicated ticker thread, so a looping plugin
//! is trapped at its deadline without any cooperation.

use std::sync::{Arc, Weak};

use anyhow::{Context, Result};
use wasmtime::component::Linker;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use super::budget::HostBudget;
use super::sandbox::SandboxState;
use super::{since_v0_1, since_v0_2, since_v0_3};

/// `anyhow::Context` for `wasmtime::Result` (wasmtime 48 has its own error type).
pub(crate) trait WasmtimeContext<T> {
    fn wt_context(self, msg: &'static str) -> Result<T>;
}

impl<T> WasmtimeContext<T> for wasmtime::Result<T> {
    fn wt_context(self, msg: &'static str) -> Result<T> {
        self.map_err(anyhow::Error::from).context(msg)
    }
}

/// Component instances the pooling allocator reserves: the most plugin calls (and loads) that can
/// hold an instance at once. `call_slots` keeps concurrent calls below it.
pub const POOL_COMPONENT_INSTANCES: u32 = 256;

pub use super::limits::{EPOCH_TICK, PluginLimits};

/// Which instance allocator the engine ended up with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AllocatorKind {
    Pooling,
    OnDemand,
}

/// Allocator preference for [`PluginEngine::new`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllocatorChoice {
    /// Pooling if the OS allows the reservation, else on-demand.
    Auto,
    /// On-demand only (used by benchmarks to compare).
    OnDemand,
}

/// The engine, its linker and the limits, shared by every loaded plugin.
#[derive(Clone)]
pub struct PluginEngine {
    inner: Arc<EngineInner>,
}

struct EngineInner {
    engine: Engine,
    linker: Linker<SandboxState>,
    limits: PluginLimits,
    allocator: AllocatorKind,
    budget: Arc<HostBudget>,
}

impl PluginEngine {
    /// Build the engine (probing the pooling allocator), the linker and start the
    /// epoch ticker. The ticker stops by itself when the last clone is dropped.
    pub fn new(limits: PluginLimits, choice: AllocatorChoice) -> Result<Self> {
        let (engine, allocator) = match choice {
            AllocatorChoice::Auto => match Engine::new(&base_config(&limits, true)) {
                Ok(engine) => (engine, AllocatorKind::Pooling),
                Err(err) => {
                    tracing::warn!(error = %err, "pooling allocator unavailable; using on-demand allocation");
                    (Engine::new(&base_config(&limits, false)).wt_context("creating the wasm engine")?, AllocatorKind::OnDemand)
                }
            },
            AllocatorChoice::OnDemand => {
                (Engine::new(&base_config(&limits, false)).wt_context("creating the wasm engine")?, AllocatorKind::OnDemand)
            }
        };
        let linker = build_linker(&engine)?;
        let budget = HostBudget::new(limits.host_budget_bytes);
        let inner = Arc::new(EngineInner { engine, linker, limits, allocator, budget });
        spawn_epoch_ticker(Arc::downgrade(&inner))?;
        tracing::info!(allocator = ?allocator, "plugin engine ready");
        Ok(Self { inner })
    }

    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }
    pub fn linker(&self) -> &Linker<SandboxState> {
        &self.inner.linker
    }
    pub fn limits(&self) -> &PluginLimits {
        &self.inner.limits
    }
    pub fn allocator(&self) -> AllocatorKind {
        self.inner.allocator
    }
    /// The budget every call of every plugin on this engine draws from.
    pub fn budget(&self) -> &Arc<HostBudget> {
        &self.inner.budget
    }

    /// A short hex digest identifying what compiled code this engine accepts;
    /// part of the compiled-artifact cache key.
    pub fn compatibility_digest(&self) -> String {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        self.inner.engine.precompile_compatibility_hash().hash(&mut hasher);
        format!("{:016x}", hasher.finish())
    }
}

fn base_config(limits: &PluginLimits, pooling: bool) -> Config {
    let mut config = Config::new();
    config.wasm_component_model(true);
    config.epoch_interruption(true);
    config.parallel_compilation(true);
    if pooling {
        let mut pool = PoolingAllocationConfig::new();
        // Enough slots for every request a 2-core container can have in flight
        // plus loads; a plugin call lasts microseconds, so slots free up fast.
        pool.total_component_instances(POOL_COMPONENT_INSTANCES);
        pool.total_core_instances(2048);
        pool.total_memories(512);
        pool.total_tables(1024);
        pool.max_memories_per_component(4);
        pool.max_tables_per_component(16);
        pool.max_core_instances_per_component(32);
        pool.max_memory_size(limits.memory_bytes);
        // A plugin call touches ~1 MiB and its instance slot is reused at once.
        // Resetting dirty pages in place (found with PAGEMAP_SCAN on Linux ≥ 6.7)
        // instead of madvise-ing them away keeps them resident, so the next call
        // takes no page faults; older kernels fall back to madvise.
        pool.linear_memory_keep_resident(4 << 20);
        pool.table_keep_resident(256 << 10);
        pool.pagemap_scan(wasmtime::Enabled::Auto);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    }
    config
}

fn build_linker(engine: &Engine) -> Result<Linker<SandboxState>> {
    let mut linker = Linker::new(engine);
    // WASI is linked so components built by standard toolchains instantiate, but
    // the context behind it grants nothing (see `SandboxState::new`).
    wasmtime_wasi::p2::add_to_linker_sync(&mut linker).wt_context("linking WASI")?;
    // Every supported contract version's host interface, side by side (0.x
    // minors are distinct semver tracks, so the linker keeps both).
    since_v0_1::add_to_linker(&mut linker).wt_context("linking the flowhost host interface 0.1")?;
    since_v0_2::add_to_linker(&mut linker).wt_context("linking the flowhost host interface 0.2")?;
    since_v0_3::add_to_linker(&mut linker).wt_context("linking the flowhost host interface 0.3")?;
    Ok(linker)
}

/// Without the ticker deadlines never fire, so failing to start it is fatal.
fn spawn_epoch_ticker(inner: Weak<EngineInner>) -> Result<()> {
    std::thread::Builder::new()
        .name("flowhost-epoch".into())
        .spawn(move || {
            loop {
                std::thread::sleep(EPOCH_TICK);
                match inner.upgrade() {
                    Some(inner) => inner.engine.increment_epoch(),
                    None => break,
                }
            }
        })
        .context("starting the epoch ticker thread")?;
    Ok(())
}
