//! flowhost: serve ComfyUI workflows as HTTP endpoints, one sandboxed WebAssembly
//! component per endpoint.

pub mod models;
