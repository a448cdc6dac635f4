//! The route table: which loaded plugin serves which route, plus the status of
//! every plugin file (loaded or rejected, and why).
//!
//! The whole table is one immutable [`PluginSet`] behind an `ArcSwap`: a request
//! takes the `Arc<LoadedPlugin>` for its route once and finishes on that version
//! even if a new one is published a microsecond later; publishing never blocks
//! readers.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arc_swap::ArcSwap;
use serde::Serialize;

use super::loader::LoadedPlugin;

/// Status of one plugin file, as shown by `GET /plugins`.
#[derive(Debug, Clone, Serialize)]
pub struct PluginStatus {
    /// File name inside the plugin folder.
    pub file: String,
    /// `loaded` (serving) or `rejected`.
    pub status: &'static str,
    pub name: Option<String>,
    pub version: Option<String>,
    pub route: Option<String>,
    /// sha256 of the file's current content.
    pub sha256: Option<String>,
    /// When the serving version was loaded (RFC 3339).
    pub loaded_at: Option<String>,
    /// Why the current content was rejected.
    pub reason: Option<String>,
    /// The class of the rejection (the metric's `reason` label).
    pub rejection: Option<super::loader::LoadErrorKind>,
    /// The contract version the plugin speaks (`0.1.0`, `0.2.0`).
    pub contract: Option<String>,
    /// The plugin's warm-up request (contract 0.2+).
    pub warm_up: Option<serde_json::Value>,
    /// For a rejected file whose previous version still serves: that version.
    pub still_serving: Option<String>,
}

/// One immutable generation of the route table.
#[derive(Default)]
pub struct PluginSet {
    routes: HashMap<String, Arc<LoadedPlugin>>,
    files: BTreeMap<String, PluginStatus>,
}

impl PluginSet {
    pub fn new(routes: HashMap<String, Arc<LoadedPlugin>>, files: BTreeMap<String, PluginStatus>) -> Self {
        Self { routes, files }
    }
    /// The plugin serving `route` (e.g. `/flux-dev`).
    pub fn get(&self, route: &str) -> Option<&Arc<LoadedPlugin>> {
        self.routes.get(route)
    }
    /// Serving plugins, sorted by route.
    pub fn plugins(&self) -> Vec<Arc<LoadedPlugin>> {
        let mut all: Vec<_> = self.routes.values().cloned().collect();
        all.sort_by(|a, b| a.manifest.route.cmp(&b.manifest.route));
        all
    }
    /// Status of every plugin file, sorted by file name.
    pub fn statuses(&self) -> Vec<PluginStatus> {
        self.files.values().cloned().collect()
    }
}

/// The current route table.
#[derive(Default)]
pub struct PluginRegistry {
    current: ArcSwap<PluginSet>,
}

impl PluginRegistry {
    pub fn new() -> Self {
        Self::default()
    }
    /// The plugin serving `route`, pinned for the caller's whole request.
    pub fn lookup(&self, route: &str) -> Option<Arc<LoadedPlugin>> {
        self.current.load().get(route).cloned()
    }
    /// The current generation.
    pub fn snapshot(&self) -> Arc<PluginSet> {
        self.current.load_full()
    }
    /// Replace the table atomically.
    pub fn publish(&self, set: PluginSet) {
        self.current.store(Arc::new(set));
    }
}
