//! Assembling the service from its rooms and running it: the plugin engine and
//! watcher, the job runner, the router, the listener, and an orderly shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::sync::oneshot;

use flowhost_comfy::{BackendConfig, BackendHealth, BackendMode, ComfyBackend, SupervisorConfig};

use crate::app::cli::ServeArgs;
use crate::auth::AccessKeys;
use crate::events::{Analytics, Event};
use crate::http::{AppState, HttpLimits};
use crate::jobs::{JobConfig, JobService};
use crate::metrics::Metrics;
use crate::models::ModelVolume;
use crate::plugins::compiled_cache::CompiledCache;
use crate::plugins::engine::AllocatorChoice;
use crate::plugins::watcher::{LoadContext, LoadEvent};
use crate::plugins::{ModelLister, NoModels, PluginEngine, PluginLimits, PluginRegistry, PluginWatcher};

/// A running service.
pub struct Server {
    pub addr: SocketAddr,
    pub state: AppState,
    shutdown: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<()>>,
    _watcher: PluginWatcher,
    /// The embedded ComfyUI doubles in `--simulate` mode (kept alive here).
    simulated: Vec<crate::app::simulate::SimulatedComfy>,
    /// Warms each worker whenever it (re)starts serving (`warm_up.rs`).
    warm_up: Vec<tokio::task::JoinHandle<()>>,
    /// The `--state-dir` lock, released when the server is dropped.
    _state_lock: crate::state_lock::StateDirLock,
}

impl Server {
    /// Stop accepting, finish in-flight requests, stop background work, flush analytics.
    pub async fn shutdown(mut self) -> Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let served = (&mut self.task).await.context("server task panicked")?;
        for task in self.warm_up.drain(..) {
            task.abort();
        }
        self.state.jobs.shutdown();
        if let Some(webhooks) = &self.state.webhooks {
            webhooks.stop();
        }
        self.state.jobs.analytics.shutdown().await;
        for worker in self.state.jobs.pool().workers() {
            worker.backend.shutdown().await;
        }
        for simulated in self.simulated.drain(..) {
            simulated.shutdown().await;
        }
        served
    }
}

/// The model volume as plugins see it (`list-models`).
pub struct VolumeLister(pub Arc<ModelVolume>);

impl ModelLister for VolumeLister {
    fn list_models(&self, folder: &str) -> Vec<(String, u64)> {
        self.0.list(folder).into_iter().map(|f| (f.name, f.size)).collect()
    }
}

/// Start the service and return once it is listening with its plugins loaded.
pub async fn start(args: ServeArgs) -> Result<Server> {
    let keys = AccessKeys::from_env().context("reading FLOWHOST_API_KEYS / FLOWHOST_ADMIN_KEYS")?;
    crate::auth::check_listen_policy(args.listen, keys.is_configured(), args.insecure_no_auth)?;
    let analytics = Analytics::from_env();
    let metrics = Metrics::new(analytics.clone());

    let simulate = args.simulate;
    if !simulate && args.comfyui_url.is_empty() && args.comfyui_dir.is_none() {
        anyhow::bail!(
            "no ComfyUI backend chosen: pass --comfyui-url URL (use a running ComfyUI), --comfyui-dir DIR \
             (flowhost runs ComfyUI from that folder), or --simulate (the embedded test double: no GPU, synthetic images)"
        );
    }
    if args.workers > 1 && !simulate {
        anyhow::bail!("--workers runs a pool of embedded doubles and needs --simulate; for real ComfyUIs repeat --comfyui-url or give --comfyui-dir with --gpus");
    }
    #[cfg(not(feature = "simulate"))]
    if simulate {
        anyhow::bail!("--simulate is not available: this flowhost was built without the `simulate` feature (release builds leave the test double out)");
    }
    let warm_up_plan = crate::warm_up::WarmUpPlan::from_args(args.warm_up, &args.warm_up_requests)?;
    // One process per state dir (a second would run and reconcile this one's jobs): checked
    // before anything starts, ComfyUI included.
    let state_lock = crate::state_lock::acquire(&args.state_dir)?;
    // --simulate without --models gets a scratch volume, provisioned below.
    let scratch_models = if simulate && args.models.is_none() { Some(tempfile::Builder::new().prefix("flowhost-sim-models-").tempdir()?) } else { None };
    let models_root = args.models.clone().or_else(|| scratch_models.as_ref().map(|d| d.path().to_path_buf()));
    let volume = models_root.as_ref().map(|root| Arc::new(ModelVolume::new(root.clone())));

    let limits = PluginLimits {
        memory_bytes: args.plugin_memory_mb << 20,
        call_timeout: Duration::from_millis(args.plugin_timeout_ms),
        host_budget_bytes: args.plugin_memory_budget_mb << 20,
        ..PluginLimits::default()
    };
    let engine = PluginEngine::new(limits, AllocatorChoice::Auto)?;
    let cache = match CompiledCache::new(&args.cache_dir) {
        Ok(cache) => Some(cache),
        Err(err) => {
            tracing::warn!(error = %format!("{err:#}"), "compiled cache disabled");
            None
        }
    };
    let registry = Arc::new(PluginRegistry::new());
    let lister: Arc<dyn ModelLister> = match &volume {
        Some(volume) => Arc::new(VolumeLister(volume.clone())),
        None => Arc::new(NoModels),
    };
    let on_load: Arc<dyn Fn(&LoadEvent) + Send + Sync> = {
        let metrics = metrics.clone();
        Arc::new(move |event: &LoadEvent| match event {
            LoadEvent::Loaded { plugin, .. } => metrics.plugin_loaded(plugin),
            LoadEvent::Rejected { kind, .. } => metrics.plugin_rejected(kind.label()),
            LoadEvent::Removed { .. } => {}
        })
    };
    // In simulation with a scratch volume, every plugin that loads (at start or
    // hot-loaded later) gets placeholder files for the models it declares.
    let on_loaded: Option<Arc<dyn Fn(&crate::plugins::LoadedPlugin) + Send + Sync>> = match (&scratch_models, &models_root) {
        (Some(_), Some(root)) => {
            let root = root.clone();
            Some(Arc::new(move |plugin: &crate::plugins::LoadedPlugin| {
                if let Err(err) = crate::app::simulate::provision_placeholder_models(
                    &root,
                    std::slice::from_ref(&plugin.manifest),
                ) {
                    tracing::warn!(plugin = %plugin.label, error = %format!("{err:#}"), "could not provision placeholder models");
                }
            }))
        }
        _ => None,
    };
    check_plugin_folder(&args.plugins)?;
    let watcher = PluginWatcher::start(
        LoadContext {
            dir: args.plugins.clone(),
            engine: engine.clone(),
            cache,
            models: lister,
            registry: registry.clone(),
            route_owners: Some(crate::plugins::route_owners::RouteOwners::in_dir(&args.state_dir)),
            on_load: Some(on_load),
            on_loaded,
        },
        Duration::from_secs(args.rescan_interval.max(1)),
    )
    .await?;

    // Files requests name by reference: the guarded fetcher, and the model cache's folders
    // (made before ComfyUI starts, which reads them through extra_model_paths).
    let fetcher = args.fetch.fetcher()?;
    let cache_config = args.fetch.config()?;
    if let Some(config) = &cache_config {
        crate::models::cache::prepare(&config.root).with_context(|| format!("creating the model cache in {}", config.root.display()))?;
    }
    let cache_root = cache_config.as_ref().map(|c| c.root.clone());
    let (workers, simulated) = start_workers(&args, models_root.as_deref(), cache_root.as_deref(), scratch_models).await?;
    let mut backends = Vec::with_capacity(workers.len());
    for (mode, input_dir, output_dir, gpu) in workers {
        let mut backend_config = BackendConfig::new(mode);
        backend_config.input_dir = input_dir;
        backend_config.output_dir = output_dir;
        let backend = ComfyBackend::start(backend_config).await.context("starting the ComfyUI backend")?;
        spawn_restart_counter(&backend, metrics.clone());
        backends.push((backend, gpu));
    }
    if backends.len() > 1 {
        tracing::info!(workers = backends.len(), dispatch = args.dispatch.as_str(), wait_bound_s = args.affinity_wait_bound, "ComfyUI worker pool");
    }

    // Durable state first: every accepted job is recovered before we listen.
    let backing = crate::app::backing::open(&args.backing, &args.state_dir).await?;
    let retention = Duration::from_secs_f64((args.retention_hours.max(0.0) * 3600.0).min(1e9));
    let dispatch = crate::jobs::DispatchRule { policy: args.dispatch, wait_bound: Duration::from_secs_f64(args.affinity_wait_bound.clamp(0.0, 1e9)) };
    // Where queued jobs wait: this process's memory, or the shared PostgreSQL queue every
    // instance claims from (issue #12).
    let shared_queue = match (args.backing.work_queue()?, &backing.pg) {
        (crate::app::backing::WorkQueueKind::Shared, Some((pool, owner))) => {
            let lease = Duration::from_secs(args.backing.lease_seconds);
            tracing::info!(lease_s = args.backing.lease_seconds, "work queue: shared (PostgreSQL)");
            Some(Arc::new(crate::jobs::shared_queue::PgQueue::new(pool.clone(), owner.clone(), dispatch, lease)))
        }
        _ => None,
    };
    // Files requests name by reference: the cache is opened before the job service that
    // uses it (every part is complete when the service is built).
    let cache_stats = metrics.model_cache_stats();
    let model_cache = match cache_config {
        Some(config) => {
            let cache = crate::models::cache::ModelCache::open(config, fetcher.clone(), Some(Arc::new(crate::jobs::blobs::BlobAssets(backing.blobs.clone()))), cache_stats.clone())?;
            let (used, files, cap) = cache.usage();
            tracing::info!(root = %cache.root().display(), used_bytes = used, files, cap_bytes = cap, "model cache");
            Some(cache)
        }
        None => None,
    };
    let volume_refresh = args.fetch.models_refresh_url.as_deref().map(crate::models::refresh::VolumeRefresh::new).transpose()?.map(Arc::new);
    let references = crate::jobs::references::References { fetcher, cache: model_cache, stats: cache_stats, volume_refresh };
    // Webhooks before the job service and its recovery: jobs reconciled at startup send
    // their events too.
    let webhook_settings = crate::webhooks::WebhookSettings::from_args(&args.webhooks)?;
    let webhooks = crate::webhooks::Webhooks::start(
        webhook_settings,
        backing.outbox.clone(),
        metrics.clone(),
    )?;
    let messages = crate::webhooks::job_messages::JobMessages::new(
        webhooks.clone(),
        crate::jobs::view::Links::relative(crate::http::v2::V2),
    );
    let jobs = JobService::from_parts(crate::jobs::JobServiceParts {
        store: backing.store.clone(),
        blobs: backing.blobs.clone(),
        pool: crate::jobs::WorkerPool::new(backends),
        queue: match &shared_queue {
            Some(queue) => crate::jobs::Queue::Shared(queue.clone()),
            None => crate::jobs::Queue::Local,
        },
        config: JobConfig {
            max_in_flight: args.max_in_flight,
            queue_depth: args.queue_depth,
            job_timeout: Duration::from_secs(args.job_timeout.max(1)),
            jpeg_quality: args.jpeg_quality,
            raster_outputs: args.output_transport == crate::app::cli::OutputTransport::Auto,
            inputs: args.inputs.clone(),
            retention,
            dispatch,
            speed: speed_routing(&args)?,
        },
        models: volume,
        registry: Some(registry.clone()),
        messages: Some(Arc::new(messages)),
        metrics,
        references: Some(references),
        analytics: analytics.clone(),
    });
    match &shared_queue {
        // Shared: queued jobs wait in the database already, and a job that was running
        // on an instance that stopped is settled when its lease runs out.
        Some(queue) => jobs.start_lease_keeper(queue.clone()),
        None => {
            jobs.recover().await.map_err(|e| anyhow::anyhow!("recovering jobs: {e}"))?;
        }
    }
    jobs.start_workers();
    jobs.start_sweeper();
    let worker_names: Vec<String> = jobs.pool().workers().iter().map(|w| w.name.clone()).collect();
    let warm_up_status = crate::warm_up::WarmUps::new(warm_up_plan.mode, &worker_names);
    let warm_up: Vec<tokio::task::JoinHandle<()>> = jobs
        .pool()
        .workers()
        .iter()
        .enumerate()
        .filter_map(|(i, worker)| {
            let status = warm_up_status.worker(i)?;
            crate::warm_up::spawn(jobs.clone(), registry.clone(), worker.backend.clone(), warm_up_plan.clone(), status)
        })
        .collect();
    let state = AppState {
        registry: registry.clone(),
        engine,
        call_slots: Arc::new(crate::plugins::call_slots::CallSlots::new(args.plugin_concurrency, args.plugin_concurrency_total)),
        limits: HttpLimits { max_body_bytes: args.max_body_bytes, body_read_timeout: Duration::from_secs(args.body_read_timeout.max(1)) },
        jobs,
        keys,
        started_at: Instant::now(),
        simulated: simulate,
        webhooks: Some(webhooks),
        warm_up: warm_up_status,
        transfers: crate::http::v2::transfers::Transfers::new(args.max_transfers),
        streams: crate::http::v2::events::StreamSlots::new(args.max_event_streams, args.max_event_streams_per_job),
    };
    let app = crate::http::router(state.clone());
    let listener = tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("listening on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        crate::http::listener::serve(listener, app, Duration::from_secs(args.header_read_timeout.max(1)), async move {
            let _ = rx.await;
        })
        .await
        .context("HTTP server failed")
    });
    let plugins: Vec<(String, String, String)> = registry
        .snapshot()
        .plugins()
        .iter()
        .map(|p| (p.manifest.name.clone(), p.manifest.version.clone(), p.manifest.route.clone()))
        .collect();
    analytics.emit(Event::app_deployed(env!("CARGO_PKG_VERSION"), &plugins));
    tracing::info!(%addr, plugins = %args.plugins.display(), endpoints = plugins.len(), "flowhost listening");
    Ok(Server { addr, state, shutdown: Some(tx), task, _watcher: watcher, simulated, warm_up, _state_lock: state_lock })
}

/// The default `--plugins` folder, created on a first run.
const DEFAULT_PLUGIN_FOLDER: &str = ".flowhost/plugins";

/// A `--plugins` folder named on the command line must exist: a mistyped path would
/// otherwise be created empty and the service would be ready serving 0 endpoints (issue
/// #22). Only the default folder is created for a first run.
pub(crate) fn check_plugin_folder(folder: &std::path::Path) -> Result<()> {
    if folder.is_dir() || folder == std::path::Path::new(DEFAULT_PLUGIN_FOLDER) {
        return Ok(());
    }
    if folder.exists() {
        anyhow::bail!("--plugins {}: not a folder", folder.display());
    }
    anyhow::bail!("--plugins {}: no such folder (check the path; create it first to start with no plugins)", folder.display())
}

/// One ComfyUI worker to start: where it is, its folders as seen from here, its GPU.
type WorkerSpec = (BackendMode, Option<std::path::PathBuf>, Option<std::path::PathBuf>, Option<String>);

/// The ComfyUI workers the arguments ask for: `--workers` embedded doubles
/// (`--simulate`), every `--comfyui-url`, or one supervised ComfyUI from `--comfyui-dir`
/// per `--gpus` entry (one seeing every GPU without it).
async fn start_workers(
    args: &ServeArgs,
    models_root: Option<&std::path::Path>,
    cache_root: Option<&std::path::Path>,
    scratch: Option<tempfile::TempDir>,
) -> Result<(Vec<WorkerSpec>, Vec<crate::app::simulate::SimulatedComfy>)> {
    if args.simulate {
        let root = models_root.context("simulate mode has a models folder")?;
        // The double reads the volume as its models folder and the model cache through
        // extra_model_paths, as a ComfyUI flowhost starts does.
        let extra_model_paths = match cache_root {
            Some(cache) => {
                let file = args.cache_dir.join("extra_model_paths.yaml");
                std::fs::create_dir_all(&args.cache_dir)?;
                crate::models::write_extra_model_paths(None, Some(cache), &file)?;
                Some(file)
            }
            None => None,
        };
        let mut scratch = scratch;
        let (mut specs, mut sims) = (Vec::new(), Vec::new());
        for _ in 0..args.workers.max(1) {
            // The first double keeps the scratch volume alive; all share it.
            let sim = crate::app::simulate::SimulatedComfy::start(root, extra_model_paths.as_deref(), scratch.take()).await?;
            tracing::warn!(url = %sim.url(), models = %root.display(), "SIMULATED ComfyUI (test double): outputs are synthetic images, not generations");
            specs.push((BackendMode::Url(sim.url()), Some(sim.input_dir()), Some(sim.output_dir()), None));
            sims.push(sim);
        }
        return Ok((specs, sims));
    }
    if !args.comfyui_url.is_empty() {
        let specs = args
            .comfyui_url
            .iter()
            .enumerate()
            .map(|(i, url)| (BackendMode::Url(url.clone()), args.comfyui_input_dir.get(i).cloned(), args.comfyui_output_dir.get(i).cloned(), None))
            .collect();
        return Ok((specs, Vec::new()));
    }
    let dir = args.comfyui_dir.clone().context("--comfyui-dir")?;
    let extra_model_paths = if models_root.is_some() || cache_root.is_some() {
        let file = args.cache_dir.join("extra_model_paths.yaml");
        std::fs::create_dir_all(&args.cache_dir)?;
        crate::models::write_extra_model_paths(models_root, cache_root, &file)?;
        Some(file)
    } else {
        None
    };
    // flowhost's output node, rewritten on every start (an upgraded flowhost ships its node).
    let flowhost_nodes = match args.output_transport {
        crate::app::cli::OutputTransport::Auto => {
            let folder = args.cache_dir.join("comfyui-nodes");
            Some(flowhost_comfy::raster::install(&folder).with_context(|| format!("installing flowhost's ComfyUI node in {}", folder.display()))?)
        }
        crate::app::cli::OutputTransport::Files => None,
    };
    let gpus: Vec<Option<&String>> = if args.gpus.is_empty() { vec![None] } else { args.gpus.iter().map(Some).collect() };
    let mut specs = Vec::new();
    // A GPU may be listed twice (two ComfyUIs sharing one big card): each still gets its
    // own folders (`gpu-0`, then `gpu-0-2`).
    let mut seen: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for gpu in gpus {
        let mut sup = SupervisorConfig::new(dir.clone(), free_loopback_port()?);
        sup.python = args.comfyui_python.clone().into();
        sup.profile = args.comfyui_profile.unwrap_or_default();
        // Compiled kernels on the state dir's volume: a restarted container reuses them.
        let compile_cache = args.state_dir.join("compile-cache");
        sup.env.extend(flowhost_comfy::profile::compile_cache_env(sup.profile, &compile_cache, |var| std::env::var_os(var).is_some()));
        if sup.profile.compiles() {
            std::fs::create_dir_all(&compile_cache).with_context(|| format!("creating {}", compile_cache.display()))?;
        }
        sup.preview = args.comfyui_preview_method;
        sup.extra_args = args.comfyui_args.clone();
        sup.startup_timeout = Duration::from_secs(args.comfyui_startup_timeout);
        sup.extra_model_paths_config = extra_model_paths.clone();
        sup.flowhost_nodes_config = flowhost_nodes.clone();
        if let Some(gpu) = gpu {
            if gpu.is_empty() || !gpu.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
                anyhow::bail!("--gpus: {gpu:?} is not a GPU index or UUID");
            }
            // Its own folders, so two ComfyUIs never number or delete each other's files.
            let n = seen.entry(gpu.clone()).or_insert(0);
            *n += 1;
            let folder_name = if *n == 1 { format!("gpu-{gpu}") } else { format!("gpu-{gpu}-{n}") };
            let root = args.state_dir.join("comfyui").join(folder_name);
            for (flag, sub) in [("--input-directory", "input"), ("--output-directory", "output"), ("--temp-directory", "temp")] {
                let folder = root.join(sub);
                std::fs::create_dir_all(&folder).with_context(|| format!("creating {}", folder.display()))?;
                sup.extra_args.extend([flag.to_string(), folder.display().to_string()]);
            }
            sup.env.push(("CUDA_VISIBLE_DEVICES".into(), gpu.clone()));
        }
        tracing::info!(profile = %sup.profile, args = ?sup.profile.args(), gpu = gpu.map(String::as_str), "ComfyUI launch profile");
        specs.push((BackendMode::Supervised(sup), None, None, gpu.cloned()));
    }
    Ok((specs, Vec::new()))
}

/// Count ComfyUI restarts: every transition from Down back to serving.
fn spawn_restart_counter(backend: &Arc<ComfyBackend>, metrics: Metrics) {
    let mut watch = backend.health_watch();
    tokio::spawn(async move {
        let mut was_down = false;
        while watch.changed().await.is_ok() {
            let health = watch.borrow().clone();
            match health {
                BackendHealth::Down { .. } => was_down = true,
                h if h.is_serving() && was_down => {
                    was_down = false;
                    metrics.comfyui_restarted();
                }
                _ => {}
            }
        }
    });
}

/// The speed profiles' graph transform and the routes it applies to; a `--speed-*` option
/// that the chosen profile would not use is refused rather than ignored.
fn speed_routing(args: &ServeArgs) -> anyhow::Result<Option<crate::jobs::SpeedRouting>> {
    use flowhost_comfy::LaunchProfile;
    let profile = args.comfyui_profile.unwrap_or_default();
    if !matches!(profile, LaunchProfile::Speed | LaunchProfile::SpeedCompiled) && args.speed_step_cache.is_some() {
        anyhow::bail!("--speed-step-cache needs --comfyui-profile speed or speed-compiled (got {profile})");
    }
    if !matches!(profile, LaunchProfile::Speed | LaunchProfile::SpeedCompiled) && !args.speed_routes.is_empty() {
        anyhow::bail!("--speed-routes needs --comfyui-profile speed or speed-compiled (got {profile})");
    }
    // Unset: `speed` takes EasyCache's default threshold, `speed-compiled` runs no step cache.
    let step_cache = args.speed_step_cache;
    let routes = args.speed_routes.iter().map(|r| if r.starts_with('/') { r.clone() } else { format!("/{r}") }).collect();
    Ok(profile.graph_transform(step_cache).map(|graph| crate::jobs::SpeedRouting { graph, routes }))
}

fn free_loopback_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port for ComfyUI")?;
    Ok(listener.local_addr()?.port())
}

/// Run until SIGINT/SIGTERM.
pub async fn run(args: ServeArgs) -> Result<()> {
    let server = start(args).await?;
    wait_for_signal().await;
    tracing::info!("shutting down");
    server.shutdown().await
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(term) => term,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
