//! The route table: which loaded plugin serves which route, plus the status of
//! every plugin file (loaded or rejected, and why).
//!
//! The whole table is one immutable [`PluginSet`] behind an `ArcSwap`: a request
//! takes the `Arc<LoadedPlugin>` for its route once and finishes on that version
//! even if a new one is published a microsecond later; publishing never blocks
//! readers.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::SystemTime;

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

/// RFC 3339 (UTC, seconds) without pulling in a date crate.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (h, m, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if mo <= 2 { y + 1 } else { y };
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}Z")
}

#[cfg(test)]
mod tests {
    use super::rfc3339;
    use std::time::{Duration, SystemTime};

    #[test]
    fn formats_known_instants() {
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_737_600)), "2026-11-27T00:00:00Z");
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400 + 3661)), "2000-02-29T01:01:01Z");
    }
}
