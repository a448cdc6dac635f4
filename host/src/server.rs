//! Assembling the service from its rooms and running it: the plugin engine and
//! watcher, the job runner, the router, the listener, and an orderly shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::sync::oneshot;

use flowhost_comfy::{BackendConfig, BackendHealth, BackendMode, ComfyBackend, SupervisorConfig};

use crate::auth::AccessKeys;
use crate::cli::ServeArgs;
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
    /// The embedded ComfyUI double in `--simulate` mode (kept alive here).
    simulated: Option<crate::simulate::SimulatedComfy>,
}

impl Server {
    /// Stop accepting, finish in-flight requests, stop background work, flush analytics.
    pub async fn shutdown(mut self) -> Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let served = (&mut self.task).await.context("server task panicked")?;
        self.state.jobs.shutdown();
        if let Some(webhooks) = &self.state.webhooks {
            webhooks.stop();
        }
        self.state.jobs.analytics.shutdown().await;
        if let Some(backend) = self.state.jobs.backend() {
            backend.shutdown().await;
        }
        if let Some(simulated) = self.simulated.take() {
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
    if !simulate && args.comfyui_url.is_none() && args.comfyui_dir.is_none() {
        anyhow::bail!(
            "no ComfyUI backend chosen: pass --comfyui-url URL (use a running ComfyUI), --comfyui-dir DIR \
             (flowhost runs ComfyUI from that folder), or --simulate (the embedded test double: no GPU, synthetic images)"
        );
    }
    #[cfg(not(feature = "simulate"))]
    if simulate {
        anyhow::bail!("--simulate is not available: this flowhost was built without the `simulate` feature (release builds leave the test double out)");
    }
    // --simulate without --models gets a scratch volume, provisioned below.
    let scratch_models = if simulate && args.models.is_none() { Some(tempfile::Builder::new().prefix("flowhost-sim-models-").tempdir()?) } else { None };
    let models_root = args.models.clone().or_else(|| scratch_models.as_ref().map(|d| d.path().to_path_buf()));
    let volume = models_root.as_ref().map(|root| Arc::new(ModelVolume::new(root.clone())));

    let limits = PluginLimits {
        memory_bytes: args.plugin_memory_mb << 20,
        call_timeout: Duration::from_millis(args.plugin_timeout_ms),
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
                if let Err(err) = crate::simulate::provision_placeholder_models(&root, std::slice::from_ref(&plugin.manifest)) {
                    tracing::warn!(plugin = %plugin.label, error = %format!("{err:#}"), "could not provision placeholder models");
                }
            }))
        }
        _ => None,
    };
    let watcher = PluginWatcher::start(
        LoadContext { dir: args.plugins.clone(), engine: engine.clone(), cache, models: lister, registry: registry.clone(), on_load: Some(on_load), on_loaded },
        Duration::from_secs(args.rescan_interval.max(1)),
    )
    .await?;

    let (backend_mode, simulated, input_dir, output_dir) = if simulate {
        let root = models_root.clone().context("simulate mode has a models folder")?;
        let sim = crate::simulate::SimulatedComfy::start(&root, scratch_models).await?;
        tracing::warn!(url = %sim.url(), models = %root.display(), "SIMULATED ComfyUI (test double): outputs are synthetic images, not generations");
        let (url, input_dir, output_dir) = (sim.url(), sim.input_dir(), sim.output_dir());
        (BackendMode::Url(url), Some(sim), Some(input_dir), Some(output_dir))
    } else if let Some(url) = &args.comfyui_url {
        (BackendMode::Url(url.clone()), None, args.comfyui_input_dir.clone(), args.comfyui_output_dir.clone())
    } else {
        let dir = args.comfyui_dir.clone().context("--comfyui-dir")?;
        let port = free_loopback_port()?;
        let mut sup = SupervisorConfig::new(dir, port);
        sup.python = args.comfyui_python.clone().into();
        sup.profile = args.comfyui_profile.unwrap_or_default();
        sup.preview = args.comfyui_preview_method;
        sup.extra_args = args.comfyui_args.clone();
        tracing::info!(profile = %sup.profile, args = ?sup.profile.args(), "ComfyUI launch profile");
        sup.startup_timeout = Duration::from_secs(args.comfyui_startup_timeout);
        if let Some(root) = &models_root {
            let file = args.cache_dir.join("extra_model_paths.yaml");
            std::fs::create_dir_all(&args.cache_dir)?;
            crate::models::write_extra_model_paths(root, &file)?;
            sup.extra_model_paths_config = Some(file);
        }
        (BackendMode::Supervised(sup), None, None, None)
    };
    let mut backend_config = BackendConfig::new(backend_mode);
    backend_config.input_dir = input_dir;
    backend_config.output_dir = output_dir;
    let backend = ComfyBackend::start(backend_config).await.context("starting the ComfyUI backend")?;
    spawn_restart_counter(&backend, metrics.clone());

    // Durable state first: every accepted job is recovered before we listen.
    let backing = crate::backing::open(&args.backing, &args.state_dir).await?;
    let retention = Duration::from_secs_f64((args.retention_hours.max(0.0) * 3600.0).min(1e9));
    let jobs = JobService::new(
        backing.store.clone(),
        backing.blobs.clone(),
        Some(backend),
        JobConfig {
            max_in_flight: args.max_in_flight,
            queue_depth: args.queue_depth,
            job_timeout: Duration::from_secs(args.job_timeout.max(1)),
            jpeg_quality: args.jpeg_quality,
            inputs: args.inputs.clone(),
            retention,
        },
        volume,
        metrics,
        analytics.clone(),
    );
    jobs.set_registry(registry.clone());
    // Webhooks before recovery: jobs reconciled at startup send their events too.
    let webhook_settings = crate::webhooks::WebhookSettings::from_args(&args.webhooks)?;
    let webhooks = crate::webhooks::Webhooks::start(webhook_settings, backing.outbox.clone(), jobs.metrics.clone())?;
    jobs.set_transition_messages(Arc::new(crate::webhooks::job_messages::JobMessages::new(webhooks.clone(), crate::http::job_view::job_json)));
    jobs.recover().await.map_err(|e| anyhow::anyhow!("recovering jobs: {e}"))?;
    jobs.start_workers();
    jobs.start_sweeper();
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
    Ok(Server { addr, state, shutdown: Some(tx), task, _watcher: watcher, simulated })
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
