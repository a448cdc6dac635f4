//! flowhost: serve ComfyUI workflows as HTTP endpoints, one sandboxed WebAssembly
//! component per endpoint.

pub mod auth;
pub mod events;
pub mod metrics;
pub mod models;
