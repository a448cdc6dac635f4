//! The flowhost plugin SDK.
//!
//! A plugin implements [`Plugin`] and calls [`register!`]; the SDK owns the
//! bindings to the `flowhost:plugin` contract (`wit/flowhost.wit`) so authors never
//! touch generated code. Everything except [`register!`] works natively, so plugin
//! logic is unit-tested with a plain `cargo test` (see [`host::FakeHost`]).

pub mod bindings {
    //! Bindings generated from `wit/flowhost.wit`. Authors normally use the
    //! re-exports at the crate root instead.
    wit_bindgen::generate!({
        path: "../wit",
        world: "plugin",
        pub_export_macro: true,
        export_macro_name: "export",
        default_bindings_module: "flowhost_sdk::bindings",
    });
}

pub mod host;

pub use bindings::flowhost::plugin::types::{
    BuildError, ExecutionFailure, FieldError, ImageSource, Job, Manifest, ModelRef,
    ModelRequirement, OutputFormat, Request, Upload, UserError,
};
pub use host::{Host, ModelFile};

/// What a plugin implements. The SDK adapts it to the contract's `endpoint` export.
pub trait Plugin {
    /// Describe the plugin (pure: same answer every time).
    fn manifest() -> Manifest;

    /// Build the job for a request that already passed the manifest's schema.
    /// `host` gives access to the host's imports (model listing, logging) and is
    /// replaced by [`host::FakeHost`] in native tests.
    fn build(request: &Request, host: &dyn Host) -> Result<Job, BuildError>;

    /// Translate a ComfyUI execution failure of this plugin's graph into a
    /// user-facing error. Default: leave it to the host.
    fn explain_failure(_failure: &ExecutionFailure) -> Option<UserError> {
        None
    }
}

/// Export a [`Plugin`] implementation as the component's `endpoint`.
///
/// ```ignore
/// struct MyPlugin;
/// impl flowhost_sdk::Plugin for MyPlugin { /* ... */ }
/// flowhost_sdk::register!(MyPlugin);
/// ```
#[macro_export]
macro_rules! register {
    ($plugin:ty) => {
        #[doc(hidden)]
        pub struct __FlowhostEndpoint;

        impl $crate::bindings::exports::flowhost::plugin::endpoint::Guest for __FlowhostEndpoint {
            fn describe() -> $crate::Manifest {
                <$plugin as $crate::Plugin>::manifest()
            }
            fn build(request: $crate::Request) -> ::core::result::Result<$crate::Job, $crate::BuildError> {
                <$plugin as $crate::Plugin>::build(&request, &$crate::host::ComponentHost)
            }
            fn explain_failure(failure: $crate::ExecutionFailure) -> ::core::option::Option<$crate::UserError> {
                <$plugin as $crate::Plugin>::explain_failure(&failure)
            }
        }

        // Only a wasm component exports the endpoint: natively (unit tests) the
        // exported symbol names are not valid linker symbols.
        #[cfg(target_arch = "wasm32")]
        $crate::bindings::export!(__FlowhostEndpoint with_types_in $crate::bindings);
    };
}
