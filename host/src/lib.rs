//! flowhost: serve ComfyUI workflows as HTTP endpoints, one sandboxed WebAssembly
//! component per endpoint.
//!
//! Rooms (arrows point down only): `http` → `jobs` → (`plugins`, `flowhost_comfy`),
//! with `media`, `models`, `events`, `auth` and `metrics` beside them.

pub mod auth;
pub mod backing;
pub mod check_plugin;
pub mod cli;
pub mod events;
pub mod generation;
pub mod http;
pub mod jobs;
pub mod metrics;
pub mod models;
pub mod models_command;
pub mod new_plugin;
pub mod plugins;
pub mod server;
pub mod media;
pub mod simulate;
pub mod state_lock;
pub mod timestamp;
pub mod warm_up;
pub mod webhooks;
