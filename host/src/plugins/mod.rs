//! The plugin runtime: everything between a `.wasm` file on disk and a
//! [`PluginJob`] in memory.
//!
//! - [`engine`]: one wasmtime `Engine` (pooling allocator when the OS lets us
//!   reserve it), epoch ticker, the linker with WASI stripped of every capability.
//! - [`sandbox`]: the per-call store state and the host imports a plugin may use.
//! - [`compiled_cache`]: compiled components on disk, so restarts skip Cranelift.
//! - [`loader`]: file → checked, described, pre-instantiated [`LoadedPlugin`].
//! - [`registry`]: the route table, swapped atomically.
//! - [`watcher`]: hot reload (inotify + periodic rescan).
//!
//! This room knows nothing of ComfyUI or HTTP: it hands out plugins and runs
//! their `build`, nothing else.

pub mod bindings;
pub mod call_slots;
pub mod compiled_cache;
pub mod engine;
pub mod loader;
pub mod log_budget;
pub mod manifest;
pub mod registry;
pub mod sandbox;
pub mod watcher;

pub use engine::{PluginEngine, PluginLimits};
pub use loader::{CallError, LoadedPlugin};
pub use manifest::{PluginJob, PluginManifest, PluginUpload, UploadSource};
pub use registry::{PluginRegistry, PluginStatus};
pub use sandbox::{ModelLister, NoModels};
pub use watcher::PluginWatcher;
