//! The flowhost plugin SDK.
//!
//! A plugin implements [`Plugin`] and calls [`register!`]; the SDK owns the
//! bindings to the `flowhost:plugin@0.3.0` contract (`wit/deps/flowhost-plugin@0.3.0`) so authors never
//! touch generated code. Everything except [`register!`] works natively, so plugin
//! logic is unit-tested with a plain `cargo test` (see [`host::FakeHost`]).
//!
//! - [`graph`]: build ComfyUI API-format graphs with deterministic node ids.
//! - [`decode`]: the request body into your own serde type; field-named errors; [`decode::Checks`].
//! - [`image`]: `data:image/...;base64` URLs (size cap, magic bytes, dimensions) and input-volume paths.
//! - [`models`]: pick model files from what the host's volume holds.
//! - [`references`]: files a request names by reference (a LoRA by URL or asset), which
//!   the host fetches and places for the plugin.
//! - [`flux`]: the Flux.1-dev text-to-image recipe the Flux endpoints share.
//! - [`identity`]: the reference face (`reference_image`, `face_provider`) the identity endpoints share.
//! - [`schema`], [`seed_or_random`]: manifest and seed helpers.
//!
//! The SDK never does I/O of its own: everything outside the plugin goes through [`Host`].

pub mod bindings {
    //! Bindings generated from the current contract,
    //! `wit/deps/flowhost-plugin@0.3.0`. Authors normally use the re-exports at
    //! the crate root instead.
    wit_bindgen::generate!({
        path: "../wit/deps/flowhost-plugin@0.3.0",
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
pub mod hints;
pub mod host;
pub mod identity;
pub mod image;
pub mod models;
pub mod references;
pub mod schema;
pub mod testing;

pub use bindings::flowhost::plugin::types::{
    BuildError, ExecutionFailure, FieldError, FileRef, FileSource, ImageSource, Job, Lora,
    Manifest, ModelFetch, ModelRef, ModelRequirement, ModelSet, OutputFormat, Request,
    SamplerProgress, Upload, UserError,
};

/// An empty model set (a graph that loads no model files).
impl Default for ModelSet {
    fn default() -> Self {
        ModelSet { base: None, loras: Vec::new(), others: Vec::new() }
    }
}

/// The contract version this SDK builds plugins for.
pub const CONTRACT_VERSION: &str = "0.3.0";

/// A panic hook that reports the message to the host (`report-panic`) before
/// the component traps, so the host classifies the failure as a panic by a
/// flag, not by reading stderr. Installed by [`register!`] on every call.
#[doc(hidden)]
pub fn install_panic_hook() {
    #[cfg(target_arch = "wasm32")]
    std::panic::set_hook(Box::new(|info| {
        let message = info.to_string();
        bindings::flowhost::plugin::host::report_panic(&message);
        eprintln!("{message}");
    }));
}
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
                $crate::install_panic_hook();
                <$plugin as $crate::Plugin>::manifest()
            }
            fn build(request: $crate::Request) -> ::core::result::Result<$crate::Job, $crate::BuildError> {
                $crate::install_panic_hook();
                <$plugin as $crate::Plugin>::build(&request, &$crate::host::ComponentHost)
            }
            fn explain_failure(failure: $crate::ExecutionFailure) -> ::core::option::Option<$crate::UserError> {
                $crate::install_panic_hook();
                <$plugin as $crate::Plugin>::explain_failure(&failure)
            }
        }

        #[cfg(target_arch = "wasm32")]
        $crate::bindings::export!(__FlowhostEndpoint with_types_in $crate::bindings);
    };
}
