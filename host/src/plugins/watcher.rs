//! Hot reload: keep the registry in step with the plugin folder.
//!
//! Two triggers, because neither is enough alone: filesystem events (inotify via
//! `notify`), debounced and coalesced so a file written in many chunks is loaded
//! once; and a periodic rescan, because network volumes (Modal's among them)
//! deliver no events. Each scan compares size + mtime, hashes only changed files,
//! and compiles only new content, on a blocking thread.
//!
//! Failure never takes an endpoint down: a file whose new content fails to load is
//! marked rejected (with the reason) while its previous version keeps serving; a
//! file that claims a route another file already serves is rejected (reported once
//! per content, not on every scan); a removed file's route disappears. Who owns a
//! route is recorded with the state ([`super::route_owners`]), so a restart serves
//! exactly what served before.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use notify::Watcher as _;
use tokio::sync::mpsc;

use super::compiled_cache::CompiledCache;
use super::engine::PluginEngine;
use super::loader::{LoadErrorKind, LoadedPlugin};
use super::registry::{PluginRegistry, PluginSet, PluginStatus};
use super::route_owners::{Owners, RouteOwners};
use crate::timestamp::rfc3339_utc as rfc3339;
use super::sandbox::ModelLister;

/// Quiet time after the last filesystem event before a scan.
pub const DEBOUNCE: Duration = Duration::from_millis(100);

/// Everything a scan needs.
#[derive(Clone)]
pub struct LoadContext {
    pub dir: PathBuf,
    pub engine: PluginEngine,
    pub cache: Option<CompiledCache>,
    pub models: Arc<dyn ModelLister>,
    pub registry: Arc<PluginRegistry>,
    /// Where route ownership is kept across restarts (`None`: in memory only).
    pub route_owners: Option<RouteOwners>,
    /// Called after each scan with (loaded, rejected) counts of *new* outcomes.
    pub on_load: Option<Arc<dyn Fn(&LoadEvent) + Send + Sync>>,
    /// Called with each newly loaded plugin *before* it is published (so what
    /// it prepares, e.g. `--simulate`'s placeholder models, is there by its
    /// first request).
    pub on_loaded: Option<Arc<dyn Fn(&LoadedPlugin) + Send + Sync>>,
}

/// What a scan did to one file, for metrics and events.
#[derive(Debug, Clone)]
pub enum LoadEvent {
    Loaded { file: String, plugin: String, version: String },
    Rejected { file: String, kind: LoadErrorKind, reason: String },
    Removed { file: String },
}

/// Per-file memory between scans.
struct FileState {
    fingerprint: (u64, Option<SystemTime>),
    sha256: Option<String>,
    /// The last version of this file that loaded (serving unless its route is taken).
    good: Option<Arc<LoadedPlugin>>,
    /// Why the current content is unusable, if it is.
    error: Option<(LoadErrorKind, String)>,
    /// The route conflict last reported for this file (its content's sha256 and the
    /// reason): the same conflict of the same content is not reported again.
    reported_conflict: Option<(Option<String>, String)>,
}

/// Keeps the registry in step with the folder until dropped.
pub struct PluginWatcher {
    task: tokio::task::JoinHandle<()>,
    _watcher: Option<notify::RecommendedWatcher>,
}

impl Drop for PluginWatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The scanner's state, shared between the initial scan and the watch task.
pub struct Scanner {
    ctx: LoadContext,
    files: Mutex<HashMap<String, FileState>>,
    /// The route owners as last recorded (read from disk at start).
    owners: Mutex<Owners>,
}

impl Scanner {
    pub fn new(ctx: LoadContext) -> Arc<Self> {
        let owners = ctx.route_owners.as_ref().map(RouteOwners::load).unwrap_or_default();
        Arc::new(Self { ctx, files: Mutex::new(HashMap::new()), owners: Mutex::new(owners) })
    }

    /// Scan the folder once and publish the result. Blocking.
    pub fn scan(&self) -> Result<()> {
        let entries = list_wasm_files(&self.ctx.dir)?;
        let mut files = self.files.lock().map_err(|_| anyhow::anyhow!("plugin scanner state poisoned"))?;
        let mut events = Vec::new();
        let previous = self.ctx.registry.snapshot();

        files.retain(|name, _| {
            let keep = entries.iter().any(|(n, _, _)| n == name);
            if !keep {
                events.push(LoadEvent::Removed { file: name.clone() });
                tracing::info!(file = %name, "plugin file removed");
            }
            keep
        });

        for (name, path, fingerprint) in &entries {
            let state = files.entry(name.clone()).or_insert(FileState {
                fingerprint: (u64::MAX, None),
                sha256: None,
                good: None,
                error: None,
                reported_conflict: None,
            });
            if state.fingerprint == *fingerprint {
                continue;
            }
            state.fingerprint = *fingerprint;
            let bytes = match std::fs::read(path) {
                Ok(bytes) => bytes,
                Err(err) => {
                    state.error = Some((LoadErrorKind::File, format!("cannot read the file: {err}")));
                    continue;
                }
            };
            let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes));
            if state.sha256.as_deref() == Some(sha.as_str()) {
                continue;
            }
            state.sha256 = Some(sha);
            let loaded = LoadedPlugin::load_bytes(&self.ctx.engine, self.ctx.cache.as_ref(), path, &bytes, self.ctx.models.clone())
                .and_then(|plugin| match route_move_refused(state.good.as_deref(), &plugin, &previous) {
                    Some(reason) => Err(super::loader::LoadError::new(LoadErrorKind::RouteConflict, reason)),
                    None => Ok(plugin),
                });
            match loaded {
                Ok(plugin) => {
                    if let Some(prepare) = &self.ctx.on_loaded {
                        prepare(&plugin);
                    }
                    events.push(LoadEvent::Loaded {
                        file: name.clone(),
                        plugin: plugin.manifest.name.clone(),
                        version: plugin.manifest.version.clone(),
                    });
                    state.good = Some(Arc::new(plugin));
                    state.error = None;
                }
                Err(err) => {
                    let reason = err.message.clone();
                    tracing::warn!(file = %name, reason = %reason, still_serving = ?state.good.as_ref().map(|p| p.label.to_string()), "plugin rejected");
                    events.push(LoadEvent::Rejected { file: name.clone(), kind: err.kind, reason: reason.clone() });
                    state.error = Some((err.kind, reason));
                }
            }
        }

        let mut owners = self.owners.lock().map_err(|_| anyhow::anyhow!("plugin scanner state poisoned"))?;
        let (set, now_owned) = assign_routes(&mut files, &self.ctx.registry.snapshot(), &owners, &mut events);
        self.ctx.registry.publish(set);
        if *owners != now_owned {
            if let Some(record) = &self.ctx.route_owners {
                record.save(&now_owned);
            }
            *owners = now_owned;
        }
        drop(owners);
        drop(files);
        if let Some(hook) = &self.ctx.on_load {
            for event in &events {
                hook(event);
            }
        }
        Ok(())
    }
}

/// The ownership rule: a file that serves a route keeps it until the file is removed. New content
/// for that file claiming another route is rejected (its old version keeps serving), so an
/// overwrite by the wrong plugin can neither take the endpoint down nor hand its route to another
/// file that was refused it; to move an endpoint, add the new file and remove the old one.
fn route_move_refused(old: Option<&LoadedPlugin>, new: &LoadedPlugin, previous: &PluginSet) -> Option<String> {
    let old = old?;
    let route = &old.manifest.route;
    let serving = previous.get(route).is_some_and(|owner| owner.file == old.file);
    (serving && new.manifest.route != *route).then(|| {
        format!(
            "this file serves {route} ({}); its new content claims {} instead — a file keeps its route while it serves (to move the endpoint, add a new file and remove this one)",
            old.label, new.manifest.route
        )
    })
}

/// Decide which file serves each route. A route stays with the file that served it
/// before in this process (so a newcomer cannot hijack a live route), else goes to
/// the file recorded as its owner (so a restart serves what served before) — and
/// while that recorded file is in the folder, no other file takes the route, even
/// if the owner's content does not load. Otherwise files are considered in name
/// order. Returns the table and the owners to record.
fn assign_routes(
    files: &mut HashMap<String, FileState>,
    previous: &PluginSet,
    recorded: &Owners,
    events: &mut Vec<LoadEvent>,
) -> (PluginSet, Owners) {
    let rank = |name: &String, state: &FileState| -> u8 {
        let Some(p) = state.good.as_ref() else { return 2 };
        if previous.get(&p.manifest.route).is_some_and(|owner| owner.file == p.file) {
            0
        } else if recorded.get(&p.manifest.route) == Some(name) {
            1
        } else {
            2
        }
    };
    let mut names: Vec<String> = files.keys().cloned().collect();
    names.sort_by_key(|name| (rank(name, &files[name]), name.clone()));

    let mut routes: HashMap<String, Arc<LoadedPlugin>> = HashMap::new();
    // Plugin names are unique (the contract says so; OpenAPI operationIds are names).
    let mut names_served: HashMap<String, Arc<LoadedPlugin>> = HashMap::new();
    let mut statuses = BTreeMap::new();
    for name in &names {
        let state = &files[name];
        let mut status = PluginStatus {
            file: name.clone(),
            status: "rejected",
            name: None,
            version: None,
            route: None,
            sha256: state.sha256.clone(),
            loaded_at: None,
            reason: state.error.as_ref().map(|(_, reason)| reason.clone()),
            rejection: state.error.as_ref().map(|(kind, _)| *kind),
            contract: None,
            warm_up: None,
            still_serving: None,
        };
        let mut conflict_now = None;
        if let Some(plugin) = &state.good {
            let route = plugin.manifest.route.clone();
            status.name = Some(plugin.manifest.name.clone());
            status.route = Some(route.clone());
            status.contract = Some(plugin.manifest.contract.clone());
            status.warm_up = plugin.manifest.warm_up.clone();
            let file_of = |owner: &LoadedPlugin| owner.file.file_name().and_then(|n| n.to_str()).unwrap_or("?").to_string();
            let take_over = |owner_file: &str| {
                format!("to hand the route to this file, replace {owner_file} with this plugin (same file name) or remove {owner_file} from the plugin folder")
            };
            // The recorded owner, still in the folder, keeps the route even while its content is rejected.
            let reserved_for = recorded.get(&route).filter(|owner| *owner != name && still_claims(files, owner, &route));
            let conflict = match (routes.get(&route), reserved_for, names_served.get(&plugin.manifest.name)) {
                (Some(owner), _, _) => Some((
                    LoadErrorKind::RouteConflict,
                    format!("route {route} is already served by {} ({}); {}", file_of(owner), owner.label, take_over(&file_of(owner))),
                )),
                (None, Some(owner_file), _) => Some((
                    LoadErrorKind::RouteConflict,
                    format!("route {route} belongs to {owner_file}, which is still in the plugin folder; {}", take_over(owner_file)),
                )),
                (None, None, Some(owner)) => Some((
                    LoadErrorKind::DuplicateName,
                    format!("plugin name {} is already served by {} ({}); plugin names are unique", plugin.manifest.name, file_of(owner), owner.label),
                )),
                (None, None, None) => None,
            };
            if let Some((kind, reason)) = conflict {
                if status.reason.is_none() {
                    status.rejection = Some(kind);
                    conflict_now = Some((kind, reason.clone()));
                }
                status.reason = Some(status.reason.map_or(reason.clone(), |r| format!("{r}; {reason}")));
                status.version = Some(plugin.manifest.version.clone());
            } else {
                status.version = Some(plugin.manifest.version.clone());
                status.loaded_at = Some(rfc3339(plugin.loaded_at));
                if state.error.is_some() {
                    status.still_serving = Some(plugin.manifest.version.clone());
                } else {
                    status.status = "loaded";
                    status.sha256 = Some(plugin.sha256.clone());
                }
                routes.insert(route, plugin.clone());
                names_served.insert(plugin.manifest.name.clone(), plugin.clone());
            }
        }
        // A conflict is reported (log + rejection event) once per content of the file, not on
        // every scan: the rejection counter counts rejections, not rescans.
        if let Some(state) = files.get_mut(name) {
            match conflict_now {
                Some((kind, reason)) => {
                    let key = (state.sha256.clone(), reason.clone());
                    if state.reported_conflict.as_ref() != Some(&key) {
                        tracing::warn!(file = %name, reason = %reason, "plugin rejected");
                        events.push(LoadEvent::Rejected { file: name.clone(), kind, reason });
                        state.reported_conflict = Some(key);
                    }
                }
                None => state.reported_conflict = None,
            }
        }
        statuses.insert(name.clone(), status);
    }
    // Served routes are owned by their files; a recorded owner no longer serving keeps its
    // route while its file is in the folder.
    let mut owners: Owners = routes
        .iter()
        .filter_map(|(route, p)| p.file.file_name().and_then(|n| n.to_str()).map(|f| (route.clone(), f.to_string())))
        .collect();
    for (route, file) in recorded {
        if !owners.contains_key(route) && still_claims(files, file, route) {
            owners.insert(route.clone(), file.clone());
        }
    }
    (PluginSet::new(routes, statuses), owners)
}

/// Whether `file` is in the folder and does not claim another route than `route` (its content
/// may be rejected: a broken owner keeps its route reserved until it is fixed or removed).
fn still_claims(files: &HashMap<String, FileState>, file: &str, route: &str) -> bool {
    files.get(file).is_some_and(|state| state.good.as_ref().is_none_or(|p| p.manifest.route == route))
}

/// `*.wasm` files directly in `dir` (hidden files skipped), with their
/// size + mtime fingerprint.
fn list_wasm_files(dir: &Path) -> Result<Vec<(String, PathBuf, (u64, Option<SystemTime>))>> {
    let mut out = Vec::new();
    let read = std::fs::read_dir(dir).with_context(|| format!("reading plugin folder {}", dir.display()))?;
    for entry in read.flatten() {
        let path = entry.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()).map(str::to_string) else { continue };
        if name.starts_with('.') || !name.ends_with(".wasm") {
            continue;
        }
        let Ok(meta) = std::fs::metadata(&path) else { continue };
        if !meta.is_file() {
            continue;
        }
        out.push((name, path, (meta.len(), meta.modified().ok())));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

impl PluginWatcher {
    /// Scan once (so the service starts with its plugins), then keep watching.
    pub async fn start(ctx: LoadContext, rescan_interval: Duration) -> Result<Self> {
        std::fs::create_dir_all(&ctx.dir).with_context(|| format!("creating plugin folder {}", ctx.dir.display()))?;
        let dir = ctx.dir.clone();
        let scanner = Scanner::new(ctx);
        run_scan(&scanner).await;

        let (tx, mut rx) = mpsc::unbounded_channel::<()>();
        let watcher = match notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if event.is_ok_and(|e| changes_files(&e.kind)) {
                let _ = tx.send(());
            }
        }) {
            Ok(mut watcher) => match watcher.watch(&dir, notify::RecursiveMode::NonRecursive) {
                Ok(()) => Some(watcher),
                Err(err) => {
                    tracing::warn!(error = %err, "cannot watch the plugin folder; relying on periodic rescans");
                    None
                }
            },
            Err(err) => {
                tracing::warn!(error = %err, "no filesystem watcher; relying on periodic rescans");
                None
            }
        };

        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(rescan_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    Some(()) = rx.recv() => {
                        // Coalesce a burst of events into one scan.
                        loop {
                            match tokio::time::timeout(DEBOUNCE, rx.recv()).await {
                                Ok(Some(())) => continue,
                                _ => break,
                            }
                        }
                    }
                }
                run_scan(&scanner).await;
            }
        });
        Ok(Self { task, _watcher: watcher })
    }
}

/// Whether an event can mean a file changed. Opening or reading a file cannot (and
/// a scan opens the files it loads: reacting to that would rescan for nothing).
fn changes_files(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind};
    !matches!(kind, EventKind::Access(AccessKind::Open(_) | AccessKind::Read | AccessKind::Close(AccessMode::Read)))
}

async fn run_scan(scanner: &Arc<Scanner>) {
    let scanner = scanner.clone();
    match tokio::task::spawn_blocking(move || scanner.scan()).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => tracing::warn!(error = %format!("{err:#}"), "plugin scan failed"),
        Err(err) => tracing::error!(error = %err, "plugin scan panicked"),
    }
}
