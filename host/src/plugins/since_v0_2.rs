//! Contract `flowhost:plugin@0.2.0` (`wit/deps/flowhost-plugin@0.2.0`, supported):
//! its generated bindings (for the types and `describe`), its host imports (linked
//! by [`super::sandbox`]), and its `build` / `explain-failure` answers read through
//! [`super::lifting`]'s unlifted mirror types into the host's internal model. Never edited once shipped except to keep
//! adapting; a new contract version gets a new module.

use wasmtime::Store;
use wasmtime::component::{ComponentExportIndex, InstancePre, Linker};

use super::calls::{BuildError, ExecutionFailure, UserError};
use super::lifting::{GBuildError, GUserError, JobV0_2, LiftError, build_answer, guarded};
use super::manifest::{ModelRef, ModelRequirement, RawJob, RawManifest};
use super::sandbox::SandboxState;

mod generated {
    wasmtime::component::bindgen!({
        path: "../wit/deps/flowhost-plugin@0.2.0",
        world: "plugin",
    });
}

use generated::flowhost::plugin::types as wit;

/// The export this version's plugins provide.
pub const VERSION: &str = "0.2.0";

/// Link this version's host interface (`flowhost:plugin/host@{VERSION}`), its
/// string arguments taken unlifted (see [`super::sandbox::add_host_interface`]).
pub fn add_to_linker(linker: &mut Linker<SandboxState>) -> wasmtime::Result<()> {
    super::sandbox::add_host_interface(linker, VERSION, true)
}

/// A pre-instantiated 0.2.0 plugin.
pub struct Handler {
    pre: generated::PluginPre<SandboxState>,
    build: ComponentExportIndex,
    explain_failure: ComponentExportIndex,
}

impl Handler {
    /// Type-check the component's export against this version's `endpoint`.
    pub fn new(pre: InstancePre<SandboxState>) -> wasmtime::Result<Self> {
        let component = pre.component();
        let endpoint = component
            .get_export_index(None, &format!("flowhost:plugin/endpoint@{VERSION}"))
            .ok_or_else(|| wasmtime::format_err!("no flowhost:plugin/endpoint@{VERSION} export"))?;
        let func = |name: &str| {
            component.get_export_index(Some(&endpoint), name).ok_or_else(|| wasmtime::format_err!("the endpoint export has no `{name}` function"))
        };
        let (build, explain_failure) = (func("build")?, func("explain-failure")?);
        Ok(Self { pre: generated::PluginPre::new(pre)?, build, explain_failure })
    }

    pub fn describe(&self, store: &mut Store<SandboxState>) -> wasmtime::Result<RawManifest> {
        let m = self.pre.instantiate(&mut *store)?.flowhost_plugin_endpoint().call_describe(&mut *store)?;
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
            warm_up: m.warm_up,
        })
    }

    /// `build`, its answer checked against `cap` and the host budget before any of it is
    /// copied (see [`super::lifting`]).
    pub fn build(&self, store: &mut Store<SandboxState>, body: &str, random_seed: u64, request_id: &str, cap: usize) -> wasmtime::Result<Result<Result<RawJob, BuildError>, LiftError>> {
        let request = wit::Request { body: body.to_string(), random_seed, request_id: request_id.to_string() };
        let instance = self.pre.instance_pre().instantiate(&mut *store)?;
        let func = instance.get_typed_func::<(&wit::Request,), (Result<JobV0_2, GBuildError>,)>(&mut *store, &self.build)?;
        let share = store.data().limits.share.sibling();
        // `_copied` holds the charge for what was copied until the job is handed over.
        let (called, _copied, refused) = guarded(share, cap, || func.call(&mut *store, (&request,)));
        let (answer,) = called?;
        Ok(build_answer(answer, refused, JobV0_2::into_raw))
    }

    /// `explain-failure`, its texts cut while copied.
    pub fn explain_failure(&self, store: &mut Store<SandboxState>, failure: &ExecutionFailure) -> wasmtime::Result<Option<UserError>> {
        let failure = wit::ExecutionFailure {
            node_id: failure.node_id.clone(),
            node_type: failure.node_type.clone(),
            exception_type: failure.exception_type.clone(),
            exception_message: failure.exception_message.clone(),
        };
        let instance = self.pre.instance_pre().instantiate(&mut *store)?;
        let func = instance.get_typed_func::<(&wit::ExecutionFailure,), (Option<GUserError>,)>(&mut *store, &self.explain_failure)?;
        let (explained,) = func.call(&mut *store, (&failure,))?;
        Ok(explained.map(GUserError::into_user_error))
    }
}

fn model_ref(m: wit::ModelRef) -> ModelRef {
    ModelRef { folder: m.folder, name: m.name }
}

fn requirement(r: wit::ModelRequirement) -> ModelRequirement {
    ModelRequirement { purpose: r.purpose, any_of: r.any_of.into_iter().map(model_ref).collect() }
}
