//! `ComfyBackend`: what the host holds. Owns the client, the current `Catalogue` (fetched on startup
//! and whenever ComfyUI (re)starts), a health watch, uploads and their cleanup, and — in supervised
//! mode — the `Supervisor`. Runs prompts via `run.rs`. Knows nothing of plugins or HTTP serving.

use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;
use tokio::sync::watch;
use url::Url;

use crate::catalogue::Catalogue;
use crate::client::{ClientConfig, ComfyClient};
use crate::error::{ComfyError, NodeIssue};
use crate::run::{RunRequest, RunResult, run_prompt};
use crate::supervisor::{ProcessState, Supervisor, SupervisorConfig};

/// Where ComfyUI comes from.
#[derive(Debug, Clone)]
pub enum BackendMode {
    /// An external ComfyUI (`--comfyui-url`).
    Url(Url),
    /// A ComfyUI process we spawn and supervise (`--comfyui-dir`).
    Supervised(SupervisorConfig),
}

/// Backend settings.
#[derive(Debug, Clone)]
pub struct BackendConfig {
    pub mode: BackendMode,
    /// ComfyUI's input directory on this machine, if reachable: upload subfolders are removed from it
    /// after a run. Supervised mode defaults to the supervisor's input directory.
    pub input_dir: Option<PathBuf>,
    /// ComfyUI's output directory on this machine, if reachable: a finished prompt's output files are
    /// removed from it (`remove_prompt_files`). Supervised mode defaults to the supervisor's.
    pub output_dir: Option<PathBuf>,
    /// How often health is probed (`/system_stats` + `/prompt`).
    pub health_interval: Duration,
    /// How often a waiting run polls history while the socket looks alive.
    pub history_poll_interval: Duration,
    /// Timeout of one ordinary HTTP request to ComfyUI.
    pub request_timeout: Duration,
}

impl BackendConfig {
    pub fn new(mode: BackendMode) -> Self {
        BackendConfig {
            mode,
            input_dir: None,
            output_dir: None,
            health_interval: Duration::from_secs(5),
            history_poll_interval: Duration::from_secs(2),
            request_timeout: Duration::from_secs(30),
        }
    }
}

pub use crate::health::BackendHealth;

struct AbortOnDrop(tokio::task::JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The ComfyUI backend.
pub struct ComfyBackend {
    client: Arc<ComfyClient>,
    catalogue: RwLock<Arc<Catalogue>>,
    health: watch::Sender<BackendHealth>,
    supervisor: Option<Supervisor>,
    input_dir: Option<PathBuf>,
    output_dir: Option<PathBuf>,
    monitor: Mutex<Option<AbortOnDrop>>,
}

impl std::fmt::Debug for ComfyBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ComfyBackend")
            .field("client", &self.client)
            .field("health", &*self.health.borrow())
            .finish_non_exhaustive()
    }
}

impl ComfyBackend {
    /// Start the backend. Does not wait for ComfyUI: health starts as `Starting` and the monitor keeps
    /// probing (use `wait_ready`). Fails only on configuration errors.
    pub async fn start(config: BackendConfig) -> anyhow::Result<Arc<ComfyBackend>> {
        let (base_url, supervisor, default_input_dir, default_output_dir) = match &config.mode {
            BackendMode::Url(url) => (url.clone(), None, None, None),
            BackendMode::Supervised(sup) => (
                sup.url()?,
                Some(Supervisor::spawn(sup.clone())),
                Some(sup.input_dir()),
                Some(sup.output_dir()),
            ),
        };
        let mut client_config = ClientConfig::new(base_url);
        client_config.history_poll_interval = config.history_poll_interval;
        client_config.request_timeout = config.request_timeout;
        let client = ComfyClient::new(client_config)?;
        let (health, _) = watch::channel(BackendHealth::Starting);
        let backend = Arc::new(ComfyBackend {
            client,
            catalogue: RwLock::new(Arc::new(Catalogue::default())),
            health,
            supervisor,
            input_dir: config.input_dir.clone().or(default_input_dir),
            output_dir: config.output_dir.clone().or(default_output_dir),
            monitor: Mutex::new(None),
        });
        let weak = Arc::downgrade(&backend);
        let task = tokio::spawn(monitor_health(weak, config.health_interval));
        if let Ok(mut slot) = backend.monitor.lock() {
            *slot = Some(AbortOnDrop(task));
        }
        Ok(backend)
    }

    pub fn client(&self) -> &Arc<ComfyClient> {
        &self.client
    }

    pub fn health(&self) -> BackendHealth {
        self.health.borrow().clone()
    }

    /// Subscribe to health changes.
    pub fn health_watch(&self) -> watch::Receiver<BackendHealth> {
        self.health.subscribe()
    }

    /// Wait until health is Ready or Degraded, at most `timeout`.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let mut rx = self.health.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(BackendHealth::is_serving))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// The catalogue as last fetched (empty before the first successful fetch).
    pub fn catalogue(&self) -> Arc<Catalogue> {
        self.catalogue.read().map(|c| c.clone()).unwrap_or_default()
    }

    fn set_catalogue(&self, catalogue: Catalogue) {
        if let Ok(mut slot) = self.catalogue.write() {
            *slot = Arc::new(catalogue);
        }
    }

    /// Fetch `/object_info` and replace the catalogue.
    pub async fn refresh_catalogue(&self) -> Result<Arc<Catalogue>, ComfyError> {
        let info = self.client.object_info().await?;
        let catalogue = Catalogue::from_object_info_value(&info)
            .map_err(|e| ComfyError::protocol(format!("object_info: {e:#}")))?;
        tracing::info!(classes = catalogue.len(), "ComfyUI node catalogue loaded");
        self.set_catalogue(catalogue);
        Ok(self.catalogue())
    }

    /// Supervised mode: the supervisor (for pid, import failures, process state).
    pub fn supervisor(&self) -> Option<&Supervisor> {
        self.supervisor.as_ref()
    }

    /// Check a graph against the live catalogue. On a combo miss (e.g. a LoRA added to the volume since
    /// the catalogue was fetched) the classes concerned are refetched once before reporting.
    pub async fn preflight(&self, graph: &Value) -> Result<(), Vec<NodeIssue>> {
        let mut catalogue = self.catalogue();
        if catalogue.is_empty() {
            match self.refresh_catalogue().await {
                Ok(c) => catalogue = c,
                Err(e) => {
                    tracing::warn!(error = %e, "no node catalogue; skipping preflight (ComfyUI still validates)");
                    // The graph's shape needs no catalogue, and must hold before ComfyUI recurses.
                    return crate::graph_shape::check(graph);
                }
            }
        }
        let issues = match catalogue.preflight(graph) {
            Ok(()) => return Ok(()),
            Err(issues) => issues,
        };
        let mut stale: Vec<&str> = issues
            .iter()
            .filter(|i| i.kind == "value_not_in_list")
            .map(|i| i.class_type.as_str())
            .collect();
        stale.sort_unstable();
        stale.dedup();
        if stale.is_empty() {
            return Err(issues);
        }
        let refreshed = self.refresh_classes(&catalogue, &stale).await;
        refreshed.preflight(graph)
    }

    /// Of `absent` (input-folder files the catalogue did not list, [`Catalogue::file_inputs`]),
    /// those still absent after their classes are refetched once: a file put into ComfyUI's
    /// input folder since the catalogue was fetched is listed then.
    pub async fn still_absent(&self, graph: &serde_json::Map<String, Value>, absent: &[crate::FileInput]) -> Vec<crate::FileInput> {
        if absent.is_empty() {
            return Vec::new();
        }
        let mut classes: Vec<&str> = absent.iter().map(|f| f.class_type.as_str()).collect();
        classes.sort_unstable();
        classes.dedup();
        let refreshed = self.refresh_classes(&self.catalogue(), &classes).await;
        refreshed
            .file_inputs(graph)
            .into_iter()
            .filter(|f| f.listed == Some(false) && absent.iter().any(|a| a.node_id == f.node_id && a.input == f.input))
            .collect()
    }

    /// `catalogue` with `classes` refetched from ComfyUI (each failure logged and the old
    /// entry kept), installed as the live catalogue.
    async fn refresh_classes(&self, catalogue: &Catalogue, classes: &[&str]) -> Arc<Catalogue> {
        let mut refreshed = catalogue.clone();
        for class in classes {
            let class = *class;
            match self.client.object_info_class(class).await {
                Ok(subset) if !subset.is_empty() => match refreshed.with_classes(&subset) {
                    Ok(next) => refreshed = next,
                    Err(e) => tracing::warn!(class, error = %e, "unreadable object_info for class"),
                },
                Ok(_) => {}
                Err(e) => tracing::warn!(class, error = %e, "refreshing class from ComfyUI failed"),
            }
        }
        self.set_catalogue(refreshed);
        self.catalogue()
    }

    /// A fresh per-request upload subfolder name.
    pub fn new_upload_subfolder() -> String {
        format!("flowhost-{}", uuid::Uuid::new_v4())
    }

    /// Upload an input image into `subfolder`; returns the string to put in LoadImage's `image` input.
    pub async fn upload_image(
        &self,
        bytes: Bytes,
        filename: &str,
        subfolder: &str,
    ) -> Result<String, ComfyError> {
        check_relative(subfolder)
            .map_err(|e| ComfyError::protocol(format!("upload subfolder {subfolder:?}: {e}")))?;
        check_relative(filename)
            .map_err(|e| ComfyError::protocol(format!("upload file name {filename:?}: {e}")))?;
        let answer = self.client.upload_image(bytes, filename, subfolder).await?;
        Ok(answer.load_image_reference())
    }

    /// Remove an upload subfolder from ComfyUI's input directory (ComfyUI has no delete API). Returns
    /// whether something was removed; `Ok(false)` when the input directory is not known here.
    pub async fn remove_uploads(&self, subfolder: &str) -> anyhow::Result<bool> {
        use anyhow::Context;
        let Some(input_dir) = &self.input_dir else {
            return Ok(false);
        };
        check_relative(subfolder)
            .map_err(|e| anyhow::anyhow!("upload subfolder {subfolder:?}: {e}"))?;
        if subfolder.is_empty() {
            anyhow::bail!("refusing to remove ComfyUI's whole input directory");
        }
        let dir = input_dir.join(subfolder);
        match tokio::fs::remove_dir_all(&dir).await {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e).with_context(|| format!("removing uploads in {}", dir.display())),
        }
    }

    /// After a prompt ended: delete its output files (type `output`, every node, from history) from
    /// ComfyUI's output directory when it is reachable here, then its history entry. Best effort; returns
    /// the number of files removed. ComfyUI has no file delete API, hence the directory.
    /// A prompt re-run with files after its rasters were lost (`{prompt_id}-files`) is removed too.
    pub async fn remove_prompt_files(&self, prompt_id: &str) -> anyhow::Result<usize> {
        let mut removed = self.remove_one_prompt_files(prompt_id).await?;
        removed += self.remove_one_prompt_files(&crate::raster::files_prompt_id(prompt_id)).await?;
        Ok(removed)
    }

    async fn remove_one_prompt_files(&self, prompt_id: &str) -> anyhow::Result<usize> {
        use anyhow::Context;
        let mut removed = 0;
        let entry = self.client.history(prompt_id).await?;
        if let (Some(entry), Some(output_dir)) = (&entry, &self.output_dir) {
            for output in entry.outputs.values() {
                for file in crate::protocol::file_refs_in_ui_output(output) {
                    if file.kind != "output" {
                        continue;
                    }
                    let relative = if file.subfolder.is_empty() {
                        file.filename.clone()
                    } else {
                        format!("{}/{}", file.subfolder, file.filename)
                    };
                    if check_relative(&relative).is_err() || file.filename.is_empty() {
                        tracing::warn!(prompt_id, file = %relative, "not removing an output outside ComfyUI's output directory");
                        continue;
                    }
                    let path = output_dir.join(&relative);
                    match tokio::fs::remove_file(&path).await {
                        Ok(()) => removed += 1,
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => return Err(e).with_context(|| format!("removing output {relative}")),
                    }
                }
            }
        }
        if entry.is_some() {
            self.client.delete_history(&[prompt_id]).await?;
        }
        Ok(removed)
    }

    /// Whether output files can be removed here (the output directory is known).
    pub fn can_remove_outputs(&self) -> bool {
        self.output_dir.is_some()
    }

    /// Submit a graph and wait for its outputs (see `run.rs`). Fails at once with `Unavailable` while down.
    ///
    /// With `raster_outputs` and a ComfyUI that lists [`crate::raster::RASTER_NODE`], `SaveImage`
    /// outputs come as raw pixels. If any were lost on the way (a dropped websocket), the
    /// original graph runs once more under `{prompt_id}-files`: ComfyUI's cache answers every
    /// node but the save, so the retry costs about one PNG, and the outputs come from files.
    pub async fn run(&self, mut req: RunRequest) -> Result<RunResult, ComfyError> {
        if let BackendHealth::Down { reason } = self.health() {
            return Err(ComfyError::unavailable(reason));
        }
        // Pixels sent while the socket is down reach no one: without a socket, files.
        let socket = req.raster_outputs && self.client.wait_ws_connected(std::time::Duration::from_secs(2).min(req.deadline)).await;
        let rewritten = match socket && self.catalogue().has_class(crate::raster::RASTER_NODE) {
            true => crate::raster::with_raster_outputs(&req.graph),
            false => None,
        };
        let Some(rewritten) = rewritten else {
            return run_prompt(&self.client, req, self.health.subscribe()).await;
        };
        let started = std::time::Instant::now();
        let mut files = req.clone();
        files.raster_outputs = false;
        req.graph = rewritten;
        match run_prompt(&self.client, req, self.health.subscribe()).await {
            Err(ComfyError::OutputsLost { prompt_id, node_id, sent, received }) => {
                tracing::warn!(prompt_id, node_id, sent, received, "raster outputs lost on the websocket; running the graph again with file outputs");
                let left = files.deadline.saturating_sub(started.elapsed());
                if left.is_zero() {
                    return Err(ComfyError::Timeout { prompt_id, waited: started.elapsed() });
                }
                files.deadline = left;
                files.prompt_id = Some(crate::raster::files_prompt_id(&prompt_id));
                let mut result = run_prompt(&self.client, files, self.health.subscribe()).await?;
                result.timings.total = started.elapsed();
                Ok(result)
            }
            other => other,
        }
    }

    /// Stop monitoring and, in supervised mode, stop ComfyUI.
    pub async fn shutdown(&self) {
        if let Ok(mut slot) = self.monitor.lock() {
            slot.take();
        }
        if let Some(sup) = &self.supervisor {
            sup.shutdown().await;
        }
        self.health.send_replace(BackendHealth::Down {
            reason: "flowhost is shutting down".into(),
        });
    }
}

/// A relative path of normal components only (no `..`, no root, no backslashes).
fn check_relative(path: &str) -> Result<(), &'static str> {
    if path.contains('\\') || path.contains('\0') {
        return Err("must not contain backslashes or NUL");
    }
    if Path::new(path)
        .components()
        .all(|c| matches!(c, Component::Normal(_)))
    {
        Ok(())
    } else {
        Err("must be a relative path without '..'")
    }
}

/// Probe health periodically and whenever the supervised process or the socket changes state.
async fn monitor_health(backend: std::sync::Weak<ComfyBackend>, interval: Duration) {
    let (mut process, mut ws) = match backend.upgrade() {
        Some(b) => (
            b.supervisor.as_ref().map(Supervisor::state),
            b.client.ws_state(),
        ),
        None => return,
    };
    let mut catalogue_fresh_for: Option<u64> = None; // process generation / probe epoch the catalogue belongs to
    let mut epoch = 0u64; // increments each time ComfyUI comes back after being unreachable
    let mut was_up = false;
    let mut last_ws_generation = 0u64;
    // Whether the websocket has connected since ComfyUI (re)started answering: until it has, the
    // backend is still starting, not ready (a run would wait on history polls).
    let mut ws_up_this_epoch = false;
    loop {
        let Some(b) = backend.upgrade() else { return };
        let process_state = process.as_mut().map(|p| p.borrow_and_update().clone());
        let ws_state = *ws.borrow_and_update();
        let next = match &process_state {
            Some(ProcessState::Starting { .. }) => {
                was_up = false;
                BackendHealth::Starting
            }
            Some(ProcessState::Exited { reason, .. }) => {
                was_up = false;
                BackendHealth::Down {
                    reason: reason.clone(),
                }
            }
            Some(ProcessState::Stopped) => BackendHealth::Down {
                reason: "ComfyUI was stopped".into(),
            },
            Some(ProcessState::Running { .. }) | None => match b.client.system_stats().await {
                Err(e) => {
                    was_up = false;
                    BackendHealth::Down {
                        reason: e.to_string(),
                    }
                }
                Ok(stats) => {
                    if !was_up {
                        epoch += 1;
                        was_up = true;
                        ws_up_this_epoch = false;
                    }
                    // A socket that reconnected may mean ComfyUI restarted behind our back.
                    if ws_state.generation > last_ws_generation + 1
                        || (last_ws_generation > 0 && ws_state.generation != last_ws_generation)
                    {
                        catalogue_fresh_for = None;
                    }
                    last_ws_generation = ws_state.generation;
                    let key = match &process_state {
                        Some(ProcessState::Running { generation, .. }) => {
                            *generation * 1_000_000 + epoch
                        }
                        _ => epoch,
                    };
                    let mut problems = Vec::new();
                    if catalogue_fresh_for != Some(key) {
                        match b.refresh_catalogue().await {
                            Ok(_) => catalogue_fresh_for = Some(key),
                            Err(e) => problems.push(format!("node catalogue not loaded: {e}")),
                        }
                    }
                    let failures = b
                        .supervisor
                        .as_ref()
                        .map(Supervisor::import_failures)
                        .unwrap_or_default();
                    if !failures.is_empty() {
                        problems.push(format!(
                            "custom nodes failed to import: {}",
                            failures.join(", ")
                        ));
                    }
                    // ComfyUI answers, so the socket can connect now: cut its back-off short and give it
                    // a moment before calling it missing.
                    let ws_connected = ws_state.connected || {
                        b.client.reconnect_ws_now();
                        b.client.wait_ws_connected(Duration::from_millis(500)).await
                    };
                    ws_up_this_epoch |= ws_connected;
                    if !ws_connected {
                        problems.push("websocket to ComfyUI not connected".into());
                    }
                    match b.client.queue_remaining().await {
                        // Never connected since ComfyUI came up: still starting, not degraded.
                        Ok(_) if !ws_up_this_epoch => BackendHealth::Starting,
                        Ok(queue_remaining) if problems.is_empty() => BackendHealth::Ready {
                            version: stats.system.comfyui_version.clone(),
                            queue_remaining,
                        },
                        Ok(_) => BackendHealth::Degraded {
                            reason: problems.join("; "),
                        },
                        Err(e) => BackendHealth::Down {
                            reason: e.to_string(),
                        },
                    }
                }
            },
        };
        b.health.send_if_modified(|current| {
            if *current != next {
                match &next {
                    BackendHealth::Down { reason } => tracing::warn!(%reason, "ComfyUI is down"),
                    BackendHealth::Degraded { reason } => {
                        tracing::warn!(%reason, "ComfyUI is degraded")
                    }
                    other => tracing::info!(health = ?other, "ComfyUI health changed"),
                }
                *current = next;
                true
            } else {
                false
            }
        });
        drop(b);
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            changed = async { match process.as_mut() { Some(p) => p.changed().await, None => std::future::pending().await } } => {
                if changed.is_err() { process = None; }
            }
            changed = ws.changed() => {
                if changed.is_err() { return; }
            }
        }
    }
}
