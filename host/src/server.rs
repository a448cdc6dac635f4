//! Assembling the service from its rooms and running it: the plugin engine and
//! watcher, the job runner, the router, the listener, and an orderly shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::sync::oneshot;

use crate::cli::ServeArgs;
use crate::http::{AppState, HttpLimits};
use crate::jobs::JobRunner;
use crate::plugins::compiled_cache::CompiledCache;
use crate::plugins::engine::AllocatorChoice;
use crate::plugins::watcher::LoadContext;
use crate::plugins::{ModelLister, NoModels, PluginEngine, PluginLimits, PluginRegistry, PluginWatcher};

/// A running service.
pub struct Server {
    pub addr: SocketAddr,
    pub state: AppState,
    shutdown: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<()>>,
    _watcher: PluginWatcher,
}

impl Server {
    /// Stop accepting, finish in-flight requests, stop background work.
    pub async fn shutdown(mut self) -> Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        (&mut self.task).await.context("server task panicked")??;
        Ok(())
    }
}

/// Start the service and return once it is listening with its plugins loaded.
pub async fn start(args: ServeArgs) -> Result<Server> {
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
    let models: Arc<dyn ModelLister> = Arc::new(NoModels);
    let watcher = PluginWatcher::start(
        LoadContext {
            dir: args.plugins.clone(),
            engine: engine.clone(),
            cache,
            models,
            registry: registry.clone(),
            on_load: None,
        },
        Duration::from_secs(args.rescan_interval.max(1)),
    )
    .await?;

    let state = AppState {
        registry,
        engine,
        limits: HttpLimits { max_body_bytes: args.max_body_bytes },
        jobs: Arc::new(JobRunner::without_backend()),
        started_at: Instant::now(),
    };
    let app = crate::http::router(state.clone());
    let listener = tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("listening on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = rx.await;
            })
            .await
            .context("HTTP server failed")
    });
    tracing::info!(%addr, plugins = %args.plugins.display(), "flowhost listening");
    Ok(Server { addr, state, shutdown: Some(tx), task, _watcher: watcher })
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
