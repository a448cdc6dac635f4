//! Which contract versions this host speaks, and the host-owned call types
//! under the name the rest of the host has always used (`bindings::wit`).
//!
//! The generated bindings themselves live one module per shipped version
//! ([`super::since_v0_1`], [`super::since_v0_2`], [`super::since_v0_3`]); this module never includes
//! generated code, so a new contract version touches a new `since_v*` module,
//! [`super::handler`] and the converters, not the callers.

/// Host-owned types for what crosses a call (kept under this path so callers in
/// `jobs/` and `http/` need no change when a contract version is added).
pub mod wit {
    pub use super::super::calls::{BuildError, ExecutionFailure, FieldError, UserError};
}

/// The package every plugin must be built against.
pub const CONTRACT_PACKAGE: &str = "flowhost:plugin";
/// The contract version plugins should target today (what the SDK builds).
pub const CONTRACT_VERSION: &str = "0.3.0";
/// The supported range, as named in rejections.
pub const SUPPORTED_RANGE: &str = "0.1.0–0.3.x";
