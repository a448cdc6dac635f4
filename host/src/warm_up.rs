//! Warm-up: before the service calls itself ready, one cheap job per route whose
//! plugin declares a warm-up request (or whose operator gave one with
//! `--warm-up-request ROUTE=FILE.json`), run through the normal job path (plugin
//! build, queue, runner, ComfyUI) so the weights are on the GPU before the first
//! user request. Each route's state, duration and failure reason is shown in
//! `/health`; a failure keeps the service not ready. After ComfyUI comes back
//! from a restart (its weights are gone) the round runs again.
//!
//! Owns the warm-up plan (which request per route), the per-round state and the
//! task that runs rounds when a backend (re)starts serving. Must never: send
//! analytics or webhooks as if a warm-up job were a user's (jobs carry
//! [`JobSource::WarmUp`] and no generation events), or decide HTTP statuses
//! (`http/health.rs` reads [`WarmUpStatus::report`]).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use flowhost_comfy::{BackendHealth, ComfyBackend};
use serde::Serialize;
use serde_json::{Value, json};

use crate::jobs::{JobService, JobSource, JobStatus, Submission};
use crate::plugins::{LoadedPlugin, PluginRegistry};

/// Largest `--warm-up-request` file, bytes (a request body, not a payload).
pub const MAX_WARM_UP_FILE_BYTES: u64 = 1 << 20;

/// Extra time a warm-up job gets when the speed profile compiles the model: a cold Inductor
/// compile of Flux takes minutes, and warm-up is where that belongs (before ready), so it must
/// not fail the round on the user-facing `--job-timeout`.
pub const COMPILE_WARM_UP_GRACE: Duration = Duration::from_secs(900);

/// The warm-up's extra time under `config` (none unless the speed transform compiles).
pub fn compile_grace(config: &crate::jobs::JobConfig) -> Duration {
    match &config.speed {
        Some(speed) if speed.graph.compile => COMPILE_WARM_UP_GRACE,
        _ => Duration::ZERO,
    }
}

/// `--warm-up`: whether warm-up runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WarmUpMode {
    /// Routes whose plugin declares a warm-up request, plus `--warm-up-request` ones.
    #[default]
    Auto,
    /// No warm-up: ready as soon as ComfyUI answers with its websocket connected.
    Off,
}

/// `--warm-up-request ROUTE=FILE.json`, as parsed from the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WarmUpOverride {
    pub route: String,
    pub file: PathBuf,
}

impl std::str::FromStr for WarmUpOverride {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (route, file) = s.split_once('=').ok_or_else(|| format!("{s:?}: expected ROUTE=FILE.json, e.g. /flux-dev=warm.json"))?;
        let route = route.trim();
        if file.trim().is_empty() {
            return Err(format!("{s:?}: the file name is empty"));
        }
        let route = if route.starts_with('/') { route.to_string() } else { format!("/{route}") };
        if route.len() < 2 {
            return Err(format!("{s:?}: the route is empty"));
        }
        Ok(WarmUpOverride { route, file: PathBuf::from(file.trim()) })
    }
}

/// Which request warms which route.
#[derive(Debug, Clone, Default)]
pub struct WarmUpPlan {
    pub mode: WarmUpMode,
    /// Operator-given requests by route (they win over the plugin's own).
    pub overrides: BTreeMap<String, Value>,
}

impl WarmUpPlan {
    /// Read the override files now, so a missing or broken file stops the start with
    /// its name instead of surfacing later as a failed warm-up.
    pub fn from_args(mode: WarmUpMode, overrides: &[WarmUpOverride]) -> Result<Self> {
        let mut plan = WarmUpPlan { mode, overrides: BTreeMap::new() };
        for o in overrides {
            let size = std::fs::metadata(&o.file).with_context(|| format!("--warm-up-request {}: reading {}", o.route, o.file.display()))?.len();
            if size > MAX_WARM_UP_FILE_BYTES {
                bail!("--warm-up-request {}: {} is {size} bytes; at most {MAX_WARM_UP_FILE_BYTES} are accepted", o.route, o.file.display());
            }
            let text = std::fs::read_to_string(&o.file).with_context(|| format!("--warm-up-request {}: reading {}", o.route, o.file.display()))?;
            let body: Value = serde_json::from_str(&text).with_context(|| format!("--warm-up-request {}: {} is not JSON", o.route, o.file.display()))?;
            if !body.is_object() {
                bail!("--warm-up-request {}: {} must hold a JSON object (a request body of the route)", o.route, o.file.display());
            }
            plan.overrides.insert(o.route.clone(), body);
        }
        Ok(plan)
    }

    /// The request that warms `plugin`'s route, if any.
    fn request_for(&self, plugin: &LoadedPlugin) -> Option<Value> {
        if self.mode == WarmUpMode::Off {
            return None;
        }
        self.overrides.get(&plugin.manifest.route).cloned().or_else(|| plugin.manifest.warm_up.clone())
    }
}

/// One route's warm-up in the current round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RouteState {
    Pending,
    Running,
    Done,
    /// The plugin's own warm-up request names something this model volume lacks (its 404,
    /// e.g. flux-lora's demo LoRA on a real volume): nothing to warm for it, and no reason
    /// to stay unready — another route warms the shared base model. The reason is shown.
    Skipped,
    Failed,
}

#[derive(Debug, Clone, Serialize)]
pub struct RouteWarmUp {
    pub route: String,
    pub plugin: String,
    pub state: RouteState,
    /// Build to last output byte, when it ended.
    pub duration_ms: Option<u64>,
    /// Why it failed (public text: no hosts, ports or paths).
    pub reason: Option<String>,
    /// The warm-up job (visible in the job API, source `warm_up`).
    pub job_id: Option<String>,
    /// The ComfyUI worker it warmed, when there are several.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Whether a round has been planned since ComfyUI last (re)started serving.
    planned: bool,
    /// Rounds started since the service started (the first, then one per ComfyUI restart).
    rounds: u64,
    routes: Vec<RouteWarmUp>,
    round_ms: Option<u64>,
    /// Operator overrides naming a route no plugin serves (a failure, said in /health).
    unknown_routes: Vec<String>,
}

/// The warm-up's state, shared by the task that runs it and `/health`.
#[derive(Debug)]
pub struct WarmUpStatus {
    mode: WarmUpMode,
    inner: Mutex<Inner>,
}

/// What `/health` shows under `warm_up`.
#[derive(Debug, Clone, Serialize)]
pub struct WarmUpReport {
    pub mode: WarmUpMode,
    /// `off`, `pending` (waiting for ComfyUI), `running`, `done` or `failed`.
    pub state: &'static str,
    /// Off, or every route's warm-up done.
    #[serde(skip)]
    pub ready: bool,
    pub rounds: u64,
    pub duration_ms: Option<u64>,
    pub routes: Vec<RouteWarmUp>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl WarmUpStatus {
    pub fn new(mode: WarmUpMode) -> Arc<Self> {
        Arc::new(WarmUpStatus { mode, inner: Mutex::new(Inner::default()) })
    }

    pub fn report(&self) -> WarmUpReport {
        let inner = lock(&self.inner);
        if self.mode == WarmUpMode::Off {
            return WarmUpReport { mode: self.mode, state: "off", ready: true, rounds: 0, duration_ms: None, routes: Vec::new(), reason: None };
        }
        let failed: Vec<String> = inner
            .routes
            .iter()
            .filter(|r| r.state == RouteState::Failed)
            .map(|r| format!("{}: {}", r.route, r.reason.as_deref().unwrap_or("failed")))
            .chain(inner.unknown_routes.iter().map(|r| format!("{r}: --warm-up-request names a route no plugin serves")))
            .collect();
        let state = if !inner.planned {
            "pending"
        } else if !failed.is_empty() {
            "failed"
        } else if inner.routes.iter().all(|r| matches!(r.state, RouteState::Done | RouteState::Skipped)) {
            "done"
        } else {
            "running"
        };
        let reason = (!failed.is_empty()).then(|| format!("warm-up failed: {}", failed.join("; ")));
        WarmUpReport { mode: self.mode, state, ready: state == "done", rounds: inner.rounds, duration_ms: inner.round_ms, routes: inner.routes.clone(), reason }
    }

    fn plan_round(&self, routes: Vec<RouteWarmUp>, unknown_routes: Vec<String>) {
        let mut inner = lock(&self.inner);
        inner.planned = true;
        inner.rounds += 1;
        inner.routes = routes;
        inner.round_ms = None;
        inner.unknown_routes = unknown_routes;
    }

    /// ComfyUI went away: whatever was warm is gone.
    fn reset(&self) {
        let mut inner = lock(&self.inner);
        inner.planned = false;
        for route in &mut inner.routes {
            route.state = RouteState::Pending;
            route.duration_ms = None;
            route.reason = None;
            route.job_id = None;
        }
    }

    fn update(&self, route: &str, f: impl FnOnce(&mut RouteWarmUp)) {
        let mut inner = lock(&self.inner);
        if let Some(r) = inner.routes.iter_mut().find(|r| r.route == route) {
            f(r);
        }
    }

    fn finish_round(&self, took: Duration) {
        lock(&self.inner).round_ms = Some(took.as_millis() as u64);
    }
}

/// Every worker's warm-up as `/health` shows it: ready once each worker's round is
/// done (a pool is only as warm as the worker the next job lands on).
#[derive(Debug)]
pub struct WarmUps {
    mode: WarmUpMode,
    workers: Vec<(String, Arc<WarmUpStatus>)>,
}

impl WarmUps {
    pub fn new(mode: WarmUpMode, workers: &[String]) -> Arc<Self> {
        Arc::new(WarmUps { mode, workers: workers.iter().map(|w| (w.clone(), WarmUpStatus::new(mode))).collect() })
    }

    /// The status one worker's warm-up task writes.
    pub fn worker(&self, index: usize) -> Option<Arc<WarmUpStatus>> {
        self.workers.get(index).map(|(_, s)| s.clone())
    }

    pub fn report(&self) -> WarmUpReport {
        match self.workers.as_slice() {
            [] => WarmUpStatus::new(self.mode).report(),
            [(_, only)] => only.report(),
            several => {
                let reports: Vec<(String, WarmUpReport)> = several.iter().map(|(name, s)| (name.clone(), s.report())).collect();
                let any = |state: &str| reports.iter().any(|(_, r)| r.state == state);
                let state = if self.mode == WarmUpMode::Off {
                    "off"
                } else if any("failed") {
                    "failed"
                } else if reports.iter().all(|(_, r)| r.state == "done") {
                    "done"
                } else if any("running") {
                    "running"
                } else {
                    "pending"
                };
                let reasons: Vec<String> = reports.iter().filter_map(|(name, r)| r.reason.as_ref().map(|why| format!("worker {name}: {why}"))).collect();
                let durations: Option<Vec<u64>> = reports.iter().map(|(_, r)| r.duration_ms).collect();
                WarmUpReport {
                    mode: self.mode,
                    state,
                    ready: reports.iter().all(|(_, r)| r.ready),
                    rounds: reports.iter().map(|(_, r)| r.rounds).max().unwrap_or(0),
                    duration_ms: durations.and_then(|d| d.into_iter().max()),
                    routes: reports
                        .iter()
                        .flat_map(|(name, r)| r.routes.iter().cloned().map(move |mut route| {
                            route.worker = Some(name.clone());
                            route
                        }))
                        .collect(),
                    reason: (!reasons.is_empty()).then(|| reasons.join("; ")),
                }
            }
        }
    }
}

/// Start the task that warms `backend` whenever it starts serving: now, and after
/// every restart. Returns the task (aborted by the server at shutdown).
///
/// Per backend on purpose: with several ComfyUI workers each gets its own call, so
/// a restarted worker is re-warmed without touching the others.
pub fn spawn(jobs: Arc<JobService>, registry: Arc<PluginRegistry>, backend: Arc<ComfyBackend>, plan: WarmUpPlan, status: Arc<WarmUpStatus>) -> Option<tokio::task::JoinHandle<()>> {
    if plan.mode == WarmUpMode::Off {
        return None;
    }
    Some(tokio::spawn(async move {
        let mut health = backend.health_watch();
        loop {
            // Ready (answering, catalogue loaded, websocket connected) or degraded
            // (answering with a problem a warm-up may well hit and then report).
            if health.wait_for(|h| h.is_serving()).await.is_err() {
                return;
            }
            warm_backend(&jobs, &registry, &backend, &plan, &status).await;
            // Wait for ComfyUI to go away (a crash, a supervised restart): its weights
            // go with it, so the next time it serves the round runs again.
            if health.wait_for(|h| matches!(h, BackendHealth::Down { .. } | BackendHealth::Starting)).await.is_err() {
                return;
            }
            tracing::info!("ComfyUI went away; warm-up runs again once it serves");
            status.reset();
        }
    }))
}

/// One warm-up round against `backend`: every route with a warm-up request, one
/// after the other (they would compete for the same GPU anyway), timed and logged.
pub async fn warm_backend(jobs: &Arc<JobService>, registry: &PluginRegistry, backend: &Arc<ComfyBackend>, plan: &WarmUpPlan, status: &WarmUpStatus) {
    let plugins = registry.snapshot().plugins();
    let mut planned = Vec::new();
    let mut routes = Vec::new();
    for plugin in plugins.iter() {
        if let Some(request) = plan.request_for(plugin) {
            routes.push(RouteWarmUp { route: plugin.manifest.route.clone(), plugin: plugin.manifest.name.clone(), state: RouteState::Pending, duration_ms: None, reason: None, job_id: None, worker: None });
            planned.push((plugin.clone(), request));
        }
    }
    let unknown: Vec<String> = plan.overrides.keys().filter(|route| !plugins.iter().any(|p| &p.manifest.route == *route)).cloned().collect();
    for route in &unknown {
        tracing::error!(%route, "--warm-up-request names a route no plugin serves");
    }
    status.plan_round(routes, unknown);
    let round_started = Instant::now();
    tracing::info!(routes = planned.len(), comfyui = ?backend.health(), "warm-up started");
    for (plugin, request) in planned {
        let route = plugin.manifest.route.clone();
        status.update(&route, |r| r.state = RouteState::Running);
        let started = Instant::now();
        let overridden = plan.overrides.contains_key(&route);
        let outcome = warm_route(jobs, backend, &plugin, request, overridden, |id| status.update(&route, |r| r.job_id = Some(id.to_string()))).await;
        let took = started.elapsed().as_millis() as u64;
        match outcome {
            Ok(WarmOutcome::Skipped(reason)) => {
                tracing::warn!(%route, %reason, "warm-up skipped: its request names something this volume lacks (give one with --warm-up-request)");
                status.update(&route, |r| {
                    r.state = RouteState::Skipped;
                    r.duration_ms = Some(took);
                    r.reason = Some(reason);
                });
            }
            Ok(WarmOutcome::Done) => {
                tracing::info!(%route, duration_ms = took, "warm-up done");
                status.update(&route, |r| {
                    r.state = RouteState::Done;
                    r.duration_ms = Some(took);
                });
            }
            Err(reason) => {
                tracing::error!(%route, duration_ms = took, %reason, "warm-up failed; the service stays not ready");
                status.update(&route, |r| {
                    r.state = RouteState::Failed;
                    r.duration_ms = Some(took);
                    r.reason = Some(reason);
                });
            }
        }
    }
    status.finish_round(round_started.elapsed());
    tracing::info!(duration_ms = round_started.elapsed().as_millis() as u64, "warm-up round ended");
}

/// How one route's warm-up ended when it did not fail.
enum WarmOutcome {
    Done,
    Skipped(String),
}

/// Build the route's job from the warm-up request and run it as a job; `Err` is the
/// public reason it failed.
async fn warm_route(jobs: &Arc<JobService>, backend: &Arc<ComfyBackend>, plugin: &Arc<LoadedPlugin>, request: Value, overridden: bool, on_job: impl FnOnce(uuid::Uuid)) -> Result<WarmOutcome, String> {
    let problems = crate::generation::request_schema::check(&plugin.validator, &plugin.manifest.request_schema, &request);
    if !problems.is_empty() {
        let fields: Vec<String> = problems.iter().take(5).map(|p| format!("{}: {}", p.field, p.message)).collect();
        return Err(format!("the warm-up request does not match the route's schema ({})", fields.join("; ")));
    }
    jobs.check_ready(plugin).map_err(|f| f.message())?;
    let built = {
        let plugin = plugin.clone();
        let body = request.to_string();
        tokio::task::spawn_blocking(move || plugin.build(&body, 0, "warm-up")).await.map_err(|e| format!("the plugin's build crashed: {e}"))?
    };
    let job = match built {
        Ok(job) => job,
        // Only the plugin's *declared* request is skipped this way: an operator's own
        // (--warm-up-request) naming a missing file is a mistake to report.
        Err(crate::plugins::CallError::Refused(crate::plugins::calls::BuildError::NotFound(field))) if !overridden => {
            return Ok(WarmOutcome::Skipped(format!("{}: {}", field.field, field.message)));
        }
        Err(e) => return Err(crate::jobs::failure::public_reason(&e.to_string())),
    };
    if !job.fetches.is_empty() {
        return Err("the warm-up request names model files by reference, which warm-up does not fetch; give a request naming volume files (--warm-up-request)".into());
    }
    let (mut spec, uploads) = crate::generation::spec_for(plugin, job);
    if !uploads.is_empty() {
        return Err("the warm-up request needs image uploads, which warm-up does not make; give a request without images (--warm-up-request)".into());
    }
    spec.request_id = "warm-up".into();
    spec.extra_data["warm_up"] = json!(true);
    // No `events` (no analytics) and no `webhook`: a warm-up is not a user's generation.
    spec.deadline = Some(SystemTime::now() + jobs.config().job_timeout + compile_grace(jobs.config()));
    let submission = Submission {
        id: None,
        source: JobSource::WarmUp { route: plugin.manifest.route.clone(), plugin: plugin.manifest.name.clone(), version: plugin.manifest.version.clone() },
        spec,
        uploads: Vec::new(),
        build_ms: None,
    };
    let submission = Submission { id: Some(uuid::Uuid::new_v4()), ..submission };
    if let Some(id) = submission.id {
        on_job(id);
    }
    // On this backend, not through the queue: another worker or instance warming
    // its own GPU would leave this one cold.
    let done = jobs.run_on(submission, backend).await.map_err(|f| f.message())?;
    match done.status {
        JobStatus::Succeeded => Ok(WarmOutcome::Done),
        status => Err(done.error.map(|e| e.message()).unwrap_or_else(|| format!("the warm-up job ended {}", status.as_str()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_compiling_speed_profile_gives_the_warm_up_time_to_compile() {
        use crate::jobs::{JobConfig, SpeedRouting};
        use flowhost_comfy::SpeedGraph;
        let plain = JobConfig::default();
        assert_eq!(compile_grace(&plain), Duration::ZERO);
        let speed = |compile| JobConfig { speed: Some(SpeedRouting { graph: SpeedGraph { compile, step_cache: Some(0.2) }, routes: vec![] }), ..JobConfig::default() };
        assert_eq!(compile_grace(&speed(true)), COMPILE_WARM_UP_GRACE);
        assert_eq!(compile_grace(&speed(false)), Duration::ZERO, "a step cache alone compiles nothing");
    }

    #[test]
    fn an_override_names_a_route_and_a_file() {
        let o: WarmUpOverride = "/flux-dev=warm.json".parse().unwrap();
        assert_eq!(o, WarmUpOverride { route: "/flux-dev".into(), file: "warm.json".into() });
        let bare: WarmUpOverride = "flux-dev=warm.json".parse().unwrap();
        assert_eq!(bare.route, "/flux-dev", "the leading slash is optional");
        assert!("flux-dev".parse::<WarmUpOverride>().unwrap_err().contains("ROUTE=FILE.json"));
        assert!("/flux-dev=".parse::<WarmUpOverride>().is_err());
    }

    #[test]
    fn a_broken_override_file_stops_the_start_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("warm.json");
        std::fs::write(&file, "{not json").unwrap();
        let err = WarmUpPlan::from_args(WarmUpMode::Auto, &[WarmUpOverride { route: "/flux-dev".into(), file: file.clone() }]).unwrap_err();
        assert!(format!("{err:#}").contains("/flux-dev") && format!("{err:#}").contains("not JSON"), "{err:#}");
        std::fs::write(&file, "[1]").unwrap();
        assert!(WarmUpPlan::from_args(WarmUpMode::Auto, &[WarmUpOverride { route: "/flux-dev".into(), file }]).is_err(), "an array is no request body");
    }

    #[test]
    fn a_pool_is_ready_only_once_every_worker_is_warm() {
        let warm = WarmUps::new(WarmUpMode::Auto, &["w0".into(), "w1".into()]);
        let route = |state| RouteWarmUp { route: "/a".into(), plugin: "a".into(), state, duration_ms: Some(5), reason: None, job_id: None, worker: None };
        warm.worker(0).unwrap().plan_round(vec![route(RouteState::Done)], Vec::new());
        warm.worker(0).unwrap().finish_round(Duration::from_millis(5));
        let report = warm.report();
        assert!(!report.ready, "w1 is still cold");
        assert_eq!(report.state, "pending");
        warm.worker(1).unwrap().plan_round(vec![route(RouteState::Done)], Vec::new());
        warm.worker(1).unwrap().finish_round(Duration::from_millis(7));
        let report = warm.report();
        assert!(report.ready && report.state == "done");
        assert_eq!(report.duration_ms, Some(7), "the slowest worker's round");
        assert_eq!(report.routes.iter().filter_map(|r| r.worker.as_deref()).collect::<Vec<_>>(), ["w0", "w1"]);
        warm.worker(1).unwrap().reset();
        warm.worker(1).unwrap().plan_round(vec![RouteWarmUp { state: RouteState::Failed, reason: Some("boom".into()), ..route(RouteState::Failed) }], Vec::new());
        let report = warm.report();
        assert!(!report.ready && report.state == "failed" && report.reason.unwrap().starts_with("worker w1:"));
    }

    #[test]
    fn off_is_ready_at_once_and_auto_waits_for_a_round() {
        assert!(WarmUpStatus::new(WarmUpMode::Off).report().ready);
        let status = WarmUpStatus::new(WarmUpMode::Auto);
        assert_eq!(status.report().state, "pending");
        assert!(!status.report().ready);
        let route = |state| RouteWarmUp { route: "/a".into(), plugin: "a".into(), state, duration_ms: None, reason: None, job_id: None, worker: None };
        status.plan_round(vec![route(RouteState::Pending)], Vec::new());
        assert_eq!(status.report().state, "running");
        status.update("/a", |r| r.state = RouteState::Done);
        assert!(status.report().ready);
        status.reset();
        assert_eq!(status.report().state, "pending", "a restart makes it cold again");
        status.plan_round(vec![route(RouteState::Failed)], Vec::new());
        let report = status.report();
        assert!(!report.ready && report.state == "failed" && report.reason.unwrap().contains("/a"));
    }
}
