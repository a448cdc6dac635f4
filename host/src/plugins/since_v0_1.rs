//! Contract `flowhost:plugin@0.1.0` (frozen in `wit/deps/flowhost-plugin@0.1.0`):
//! its generated bindings, its host imports (delegating to the one
//! implementation in [`super::sandbox`]) and the adapter from its types into
//! the host's internal model. Never edited once shipped except to keep
//! adapting; a new contract version gets a new module.

use wasmtime::Store;
use wasmtime::component::{HasSelf, InstancePre, Linker};

use super::calls::{BuildError, ExecutionFailure, FieldError, LogLevel, UserError};
use super::manifest::{ModelRef, ModelRequirement, OutputFormat, PluginUpload, RawJob, RawManifest, UploadSource};
use super::sandbox::SandboxState;

mod generated {
    wasmtime::component::bindgen!({
        path: "../wit/deps/flowhost-plugin@0.1.0",
        world: "plugin",
    });
}

use generated::flowhost::plugin::host as imports;
use generated::flowhost::plugin::types as wit;

/// The export this version's plugins provide.
pub const VERSION: &str = "0.1.0";

/// Link this version's host interface (`flowhost:plugin/host@0.1.0`).
pub fn add_to_linker(linker: &mut Linker<SandboxState>) -> wasmtime::Result<()> {
    generated::Plugin::add_to_linker::<_, HasSelf<_>>(linker, |state| state)
}

impl imports::Host for SandboxState {
    fn log(&mut self, level: imports::LogLevel, message: String) {
        let level = match level {
            imports::LogLevel::Trace => LogLevel::Trace,
            imports::LogLevel::Debug => LogLevel::Debug,
            imports::LogLevel::Info => LogLevel::Info,
            imports::LogLevel::Warn => LogLevel::Warn,
            imports::LogLevel::Error => LogLevel::Error,
        };
        SandboxState::log(self, level, message)
    }

    fn list_models(&mut self, folder: String) -> Vec<imports::ModelFile> {
        SandboxState::list_models(self, folder).into_iter().map(|(name, size)| imports::ModelFile { name, size }).collect()
    }
}

impl wit::Host for SandboxState {}

/// A pre-instantiated 0.1.0 plugin.
pub struct Handler(generated::PluginPre<SandboxState>);

impl Handler {
    /// Type-check the component's export against this version's `endpoint`.
    pub fn new(pre: InstancePre<SandboxState>) -> wasmtime::Result<Self> {
        Ok(Self(generated::PluginPre::new(pre)?))
    }

    pub fn describe(&self, store: &mut Store<SandboxState>) -> wasmtime::Result<RawManifest> {
        let m = self.0.instantiate(&mut *store)?.flowhost_plugin_endpoint().call_describe(&mut *store)?;
        Ok(RawManifest {
            name: m.name,
            version: m.version,
            route: m.route,
            summary: m.summary,
            request_schema: m.request_schema,
            response_media_types: m.response_media_types,
            analytics_prefix: m.analytics_prefix,
            node_classes: m.node_classes,
            models: m.models.into_iter().map(requirement).collect(),
            warm_up: None,
        })
    }

    pub fn build(&self, store: &mut Store<SandboxState>, body: &str, random_seed: u64, request_id: &str) -> wasmtime::Result<Result<RawJob, BuildError>> {
        let request = wit::Request { body: body.to_string(), random_seed, request_id: request_id.to_string() };
        let built = self.0.instantiate(&mut *store)?.flowhost_plugin_endpoint().call_build(&mut *store, &request)?;
        Ok(built.map(job).map_err(build_error))
    }

    pub fn explain_failure(&self, store: &mut Store<SandboxState>, failure: &ExecutionFailure) -> wasmtime::Result<Option<UserError>> {
        let failure = wit::ExecutionFailure {
            node_id: failure.node_id.clone(),
            node_type: failure.node_type.clone(),
            exception_type: failure.exception_type.clone(),
            exception_message: failure.exception_message.clone(),
        };
        let explained = self.0.instantiate(&mut *store)?.flowhost_plugin_endpoint().call_explain_failure(&mut *store, &failure)?;
        Ok(explained.map(|e| UserError { status: e.status, title: e.title, detail: e.detail, field: e.field }))
    }
}

fn model_ref(m: wit::ModelRef) -> ModelRef {
    ModelRef { folder: m.folder, name: m.name }
}

fn requirement(r: wit::ModelRequirement) -> ModelRequirement {
    ModelRequirement { purpose: r.purpose, any_of: r.any_of.into_iter().map(model_ref).collect() }
}

fn job(job: wit::Job) -> RawJob {
    RawJob {
        workflow: job.workflow,
        uploads: job
            .uploads
            .into_iter()
            .map(|u| PluginUpload {
                field: u.field,
                filename: u.filename,
                source: match u.source {
                    wit::ImageSource::Bytes(b) => UploadSource::Bytes(b),
                    wit::ImageSource::InputPath(p) => UploadSource::InputPath(p),
                },
                node_id: u.node_id,
                input_name: u.input_name,
            })
            .collect(),
        outputs: job.outputs,
        output_format: match job.output_format {
            wit::OutputFormat::Jpeg => OutputFormat::Jpeg,
            wit::OutputFormat::Png => OutputFormat::Png,
            wit::OutputFormat::Original => OutputFormat::Original,
        },
        seed: job.seed,
        analytics: job.analytics,
        caller_nodes: job.caller_nodes,
        // 0.1.0 says nothing about models or progress: the host infers the set.
        models: None,
        progress: Vec::new(),
    }
}

fn field_error(e: wit::FieldError) -> FieldError {
    FieldError { field: e.field, message: e.message }
}

fn build_error(e: wit::BuildError) -> BuildError {
    match e {
        wit::BuildError::InvalidRequest(errors) => BuildError::InvalidRequest(errors.into_iter().map(field_error).collect()),
        wit::BuildError::NotFound(e) => BuildError::NotFound(field_error(e)),
        wit::BuildError::Unavailable(reason) => BuildError::Unavailable(reason),
        wit::BuildError::Internal(reason) => BuildError::Internal(reason),
    }
}
