//! Which contract version a component speaks, decided from what its type
//! exports (as Spin's `HandlerType::from_instance_pre` does), and the one
//! dispatch point over the per-version handlers. Adding a contract version adds
//! a variant here and a `since_v*` module; nothing else in the host branches on
//! versions.

use wasmtime::Store;
use wasmtime::component::types::ComponentItem;
use wasmtime::component::{Component, InstancePre};

use super::bindings::{CONTRACT_PACKAGE, SUPPORTED_RANGE};
use super::calls::{BuildError, ExecutionFailure, UserError};
use super::engine::PluginEngine;
use super::lifting::LiftError;
use super::manifest::{RawJob, RawManifest};
use super::sandbox::SandboxState;
use super::{since_v0_1, since_v0_2, since_v0_3};

/// The contract versions this host serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandlerType {
    V0_1,
    V0_2,
    V0_3,
}

/// An interface name as the component model spells it: `ns:pkg/iface@version`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct InterfaceName<'a> {
    package: &'a str,
    interface: &'a str,
    version: Option<(u64, u64, &'a str)>,
}

fn parse_interface_name(name: &str) -> Option<InterfaceName<'_>> {
    let (path, version) = match name.split_once('@') {
        Some((path, version)) => (path, Some(version)),
        None => (name, None),
    };
    let (package, interface) = path.split_once('/')?;
    let version = match version {
        None => None,
        Some(v) => {
            let mut parts = v.split(['.', '-', '+']);
            let major = parts.next()?.parse().ok()?;
            let minor = parts.next()?.parse().ok()?;
            Some((major, minor, v))
        }
    };
    Some(InterfaceName { package, interface, version })
}

impl HandlerType {
    /// The handler for a component: the version of its `flowhost:plugin/endpoint`
    /// instance export, and every import either WASI or this same version's
    /// `flowhost:plugin` interfaces. The error names what the component exports
    /// and imports, and the supported range, since that is what its author needs.
    pub fn from_component(engine: &PluginEngine, component: &Component) -> Result<(Self, String), String> {
        let ty = component.component_type();
        let engine = engine.engine();
        let exports: Vec<(String, bool)> =
            ty.exports(engine).map(|(name, item)| (name.to_string(), matches!(item.ty, ComponentItem::ComponentInstance(_)))).collect();
        let imports: Vec<String> = ty.imports(engine).map(|(name, _)| name.to_string()).collect();
        let listing = || {
            format!(
                "exports [{}], imports [{}]",
                exports.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", "),
                imports.join(", ")
            )
        };
        let endpoint = exports.iter().find_map(|(name, is_instance)| {
            let parsed = parse_interface_name(name)?;
            (*is_instance && parsed.package == CONTRACT_PACKAGE && parsed.interface == "endpoint").then_some((name, parsed))
        });
        let Some((export, parsed)) = endpoint else {
            return Err(format!(
                "not a flowhost plugin: expected an instance export `{CONTRACT_PACKAGE}/endpoint@<version>` \
                 (this host supports {CONTRACT_PACKAGE} {SUPPORTED_RANGE}), but the component {}",
                listing()
            ));
        };
        let Some((major, minor, version)) = parsed.version else {
            return Err(format!("exports {export} without a version; this host supports {CONTRACT_PACKAGE} {SUPPORTED_RANGE} ({})", listing()));
        };
        let handler = match (major, minor) {
            (0, 1) => HandlerType::V0_1,
            (0, 2) => HandlerType::V0_2,
            (0, 3) => HandlerType::V0_3,
            _ => {
                return Err(format!(
                    "exports {export}; this host supports {CONTRACT_PACKAGE} {SUPPORTED_RANGE}: rebuild the plugin against \
                     a supported flowhost-sdk, or upgrade flowhost ({})",
                    listing()
                ));
            }
        };
        for import in &imports {
            if import.starts_with("wasi:") {
                continue;
            }
            let same_contract = parse_interface_name(import)
                .is_some_and(|i| i.package == CONTRACT_PACKAGE && i.version.is_some_and(|(a, b, _)| (a, b) == (major, minor)));
            if !same_contract {
                return Err(format!(
                    "imports `{import}`, which the flowhost sandbox does not provide to a {CONTRACT_PACKAGE}@{version} plugin \
                     (allowed: WASI and {CONTRACT_PACKAGE}/host@{version})"
                ));
            }
        }
        Ok((handler, version.to_string()))
    }
}

/// A pre-instantiated plugin of one of the supported versions.
pub enum Handler {
    V0_1(since_v0_1::Handler),
    V0_2(since_v0_2::Handler),
    V0_3(since_v0_3::Handler),
}

impl Handler {
    pub fn new(kind: HandlerType, pre: InstancePre<SandboxState>) -> wasmtime::Result<Self> {
        Ok(match kind {
            HandlerType::V0_1 => Handler::V0_1(since_v0_1::Handler::new(pre)?),
            HandlerType::V0_2 => Handler::V0_2(since_v0_2::Handler::new(pre)?),
            HandlerType::V0_3 => Handler::V0_3(since_v0_3::Handler::new(pre)?),
        })
    }

    pub fn describe(&self, store: &mut Store<SandboxState>) -> wasmtime::Result<RawManifest> {
        match self {
            Handler::V0_1(h) => h.describe(store),
            Handler::V0_2(h) => h.describe(store),
            Handler::V0_3(h) => h.describe(store),
        }
    }

    /// `cap`: the most bytes the answer may carry (see [`super::lifting`]).
    pub fn build(&self, store: &mut Store<SandboxState>, body: &str, seed: u64, request_id: &str, cap: usize) -> wasmtime::Result<Result<Result<RawJob, BuildError>, LiftError>> {
        match self {
            Handler::V0_1(h) => h.build(store, body, seed, request_id, cap),
            Handler::V0_2(h) => h.build(store, body, seed, request_id, cap),
            Handler::V0_3(h) => h.build(store, body, seed, request_id, cap),
        }
    }

    pub fn explain_failure(&self, store: &mut Store<SandboxState>, failure: &ExecutionFailure) -> wasmtime::Result<Option<UserError>> {
        match self {
            Handler::V0_1(h) => h.explain_failure(store, failure),
            Handler::V0_2(h) => h.explain_failure(store, failure),
            Handler::V0_3(h) => h.explain_failure(store, failure),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_interface_name;

    #[test]
    fn interface_names_parse_into_package_interface_and_version() {
        let n = parse_interface_name("flowhost:plugin/endpoint@0.2.3").unwrap();
        assert_eq!((n.package, n.interface, n.version.map(|v| (v.0, v.1))), ("flowhost:plugin", "endpoint", Some((0, 2))));
        // A prefix look-alike is not the contract's package.
        assert_ne!(parse_interface_name("flowhost:plugin-extra/endpoint@0.1.0").unwrap().package, "flowhost:plugin");
        assert!(parse_interface_name("add").is_none());
        assert!(parse_interface_name("flowhost:plugin/endpoint@garbage").is_none());
    }
}
