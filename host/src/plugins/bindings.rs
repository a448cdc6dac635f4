//! Host-side bindings generated from `wit/flowhost.wit`: the one place where the
//! contract's types enter the host. Everything else uses [`super::manifest`]'s
//! host-owned types, so a contract change touches this file and the converters.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "plugin",
});

pub use exports::flowhost::plugin::endpoint as endpoint;
pub use flowhost::plugin::host as host_imports;
pub use flowhost::plugin::types as wit;

/// The package every plugin must be built against, and the versions we accept.
pub const CONTRACT_PACKAGE: &str = "flowhost:plugin";
/// The contract version this host implements.
pub const CONTRACT_VERSION: &str = "0.1.0";
