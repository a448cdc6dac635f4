//! The plugin runtime: everything between a `.wasm` file on disk and a
//! [`PluginJob`] in memory.
//!
//! - [`engine`]: one wasmtime `Engine` (pooling allocator when the OS lets us
//!   reserve it), epoch ticker, the linker with WASI stripped of every capability.
//! - [`sandbox`]: the per-call store state and the host imports a plugin may use
//!   (implemented once for every contract version).
//! - [`budget`]: the bound on what all calls in flight together make the host hold.
//! - [`lifting`]: a call's answer measured in guest memory before it is copied.
//! - [`handler`]: which contract version a component speaks (from its exports),
//!   dispatching to [`since_v0_1`] / [`since_v0_2`] / [`since_v0_3`], each generated from its
//!   frozen `wit/deps/flowhost-plugin@*` and adapting into [`manifest`]'s model.
//! - [`compiled_cache`]: compiled components on disk, so restarts skip Cranelift.
//! - [`loader`]: file → checked, described, pre-instantiated [`LoadedPlugin`].
//! - [`registry`]: the route table, swapped atomically.
//! - [`watcher`]: hot reload (inotify + periodic rescan).
//!
//! This room knows nothing of ComfyUI or HTTP: it hands out plugins and runs
//! their `build`, nothing else.

pub mod bindings;
pub mod budget;
pub mod call_slots;
pub mod calls;
pub mod capped_output;
pub mod compiled_cache;
pub mod engine;
pub mod handler;
pub mod lifting;
pub mod limits;
pub mod loader;
pub mod log_budget;
pub mod manifest;
pub mod registry;
pub mod route_owners;
pub mod sandbox;
pub mod since_v0_1;
pub mod since_v0_2;
pub mod since_v0_3;
pub mod watcher;

pub use engine::{PluginEngine, PluginLimits};
pub use loader::{CallError, LoadError, LoadErrorKind, LoadedPlugin};
pub use manifest::{FileRef, FileSource, Lora, ModelFetch, ModelSet, PluginJob, PluginManifest, PluginUpload, SamplerProgress, UploadSource};
pub use registry::{PluginRegistry, PluginStatus};
pub use sandbox::{ModelLister, NoModels};
pub use watcher::PluginWatcher;
