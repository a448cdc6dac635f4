//! The host's own types for what crosses a plugin call (refusals, execution
//! failures, user errors, log levels), whichever contract version the plugin
//! speaks. Each `since_v*` module converts its generated types into these, so
//! the rest of the host never sees generated code and never branches on a
//! version. Nothing here calls a plugin.

/// One problem with one request field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

/// Why `build` refused a request; mapped to HTTP once, in `http/generate.rs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildError {
    /// 400: every problem, one per field.
    InvalidRequest(Vec<FieldError>),
    /// 404: something the request names does not exist.
    NotFound(FieldError),
    /// 503: the plugin cannot serve right now.
    Unavailable(String),
    /// 500: a bug in the plugin.
    Internal(String),
}

/// A ComfyUI `execution_error` in a plugin's graph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecutionFailure {
    pub node_id: String,
    pub node_type: String,
    pub exception_type: String,
    pub exception_message: String,
}

/// A user-facing error a plugin derives from an execution failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserError {
    pub status: u16,
    pub title: String,
    pub detail: String,
    pub field: Option<String>,
}

/// Log levels of the `log` host import (the same in every contract version).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}
