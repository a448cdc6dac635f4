//! The flowhost plugin SDK.
//!
//! A plugin implements [`Plugin`] and calls [`register!`]; the SDK owns the
//! bindings to the `flowhost:plugin` contract (`wit/flowhost.wit`) so authors never
//! touch generated code. Everything except [`register!`] works natively, so plugin
//! logic is unit-tested with a plain `cargo test` (see [`host::FakeHost`]).
//!
//! - [`graph`]: build ComfyUI API-format graphs with deterministic node ids.
//! - [`decode`]: the request body into your own serde type; field-named errors; [`decode::Checks`].
//! - [`image`]: `data:image/...;base64` URLs (size cap, magic bytes, dimensions) and input-volume paths.
//! - [`models`]: pick model files from what the host's volume holds.
//! - [`flux`]: the Flux.1-dev text-to-image recipe the Flux endpoints share.
//! - [`schema`], [`seed_or_random`]: manifest and seed helpers.
//!
//! The SDK never does I/O of its own: everything outside the plugin goes through [`Host`].

pub mod bindings {
    //! Bindings generated from `wit/flowhost.wit`. Authors normally use the
    //! re-exports at the crate root instead.
    wit_bindgen::generate!({
        path: "../wit",
        world: "plugin",
        pub_export_macro: true,
        export_macro_name: "export",
        default_bindings_module: "flowhost_sdk::bindings",
        additional_derives: [PartialEq],
    });
}

pub mod decode;
pub mod flux;
pub mod graph;
pub mod host;
pub mod image;
pub mod models;
pub mod schema;
pub mod testing;

pub use bindings::flowhost::plugin::types::{
    BuildError, ExecutionFailure, FieldError, ImageSource, Job, Manifest, ModelRef,
    ModelRequirement, OutputFormat, Request, Upload, UserError,
};
pub use host::{Host, ModelFile};

/// The seed to use: the caller's, else the host's random draw (`request.random_seed`,
/// full `u64` range). Report it in `Job.seed`.
pub fn seed_or_random(seed: Option<u64>, request: &Request) -> u64 {
    seed.unwrap_or(request.random_seed)
}

/// The JSON Schema of a `seed` field: any `u64` (ComfyUI's KSampler accepts the full range).
pub fn seed_schema() -> serde_json::Value {
    serde_json::json!({
        "type": "integer",
        "minimum": 0,
        "maximum": u64::MAX,
        "description": "Random seed (0..=18446744073709551615). Absent: a random seed, returned in the X-Seed header."
    })
}

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
///
/// The export exists only in wasm builds: natively (unit tests, or a test binary
/// linking several plugin crates) `register!` expands to nothing, so the component
/// export symbols of different plugins never collide.
#[macro_export]
macro_rules! register {
    ($plugin:ty) => {
        #[doc(hidden)]
        #[cfg(target_arch = "wasm32")]
        pub struct __FlowhostEndpoint;

        #[cfg(target_arch = "wasm32")]
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

        #[cfg(target_arch = "wasm32")]
        $crate::bindings::export!(__FlowhostEndpoint with_types_in $crate::bindings);
    };
}
