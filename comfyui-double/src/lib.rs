//! A protocol-faithful ComfyUI 0.3.64 test double on loopback: the real HTTP + websocket surface,
//! validation against the captured node catalogue, a queue worker that "executes" prompts into real,
//! deterministic image files with ComfyUI's exact message sequence, and runtime fault injection.
//!
//! Source of truth: `fixtures/` (captures of a real server; `fixtures/PROTOCOL.md`). This crate is an
//! independent implementation of the server side and must never depend on the client crate, nor allow
//! anything the real server would not.

mod catalogue;
mod execute;
mod faults;
mod http;
mod models;
mod render;
mod state;
mod validate;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};

use anyhow::Context;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

pub use catalogue::object_info_fixture;
pub use faults::{FaultSettings, Faults, InjectedFailure, Record, UploadRecord};
pub use models::{ModelPaths, parse_extra_model_paths};
pub use state::ModelState;

use faults::KillSwitch;
use state::Shared;

/// Where the double listens and which folders it uses (temporary dirs when None).
#[derive(Clone, Debug)]
pub struct DoubleConfig {
    /// Default 127.0.0.1:0 (an ephemeral port).
    pub listen: SocketAddr,
    /// A folder with ComfyUI's model folder names (`checkpoints/`, `loras/`, `diffusion_models/`, ...).
    pub models_dir: Option<PathBuf>,
    /// ComfyUI's `extra_model_paths.yaml` (simple subset).
    pub extra_model_paths: Option<PathBuf>,
    pub input_dir: Option<PathBuf>,
    pub output_dir: Option<PathBuf>,
    /// Most finished prompts kept in `/history`, oldest dropped first (ComfyUI's
    /// `MAXIMUM_HISTORY_SIZE` is 10,000). An embedded double serving for a long time keeps fewer.
    pub max_history: usize,
    /// Whether to keep the observation [`Record`] of every prompt and upload (for tests). A double
    /// serving for a long time (`flowhost serve --simulate`) keeps none, so memory stays flat.
    pub keep_record: bool,
    /// Whether flowhost's custom node (`FlowhostImageOutput`, raw pixels over the websocket) is
    /// installed, as in a ComfyUI that flowhost starts. A stock ComfyUI does not have it.
    pub flowhost_nodes: bool,
}

/// ComfyUI's `MAXIMUM_HISTORY_SIZE`.
pub const MAXIMUM_HISTORY_SIZE: usize = 10_000;

impl Default for DoubleConfig {
    fn default() -> Self {
        DoubleConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            models_dir: None,
            extra_model_paths: None,
            input_dir: None,
            output_dir: None,
            max_history: MAXIMUM_HISTORY_SIZE,
            keep_record: true,
            flowhost_nodes: false,
        }
    }
}

/// A running double. Dropping it kills it (like [`Faults::crash`]); [`ComfyDouble::shutdown`] also waits for its tasks.
pub struct ComfyDouble {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: JoinHandle<()>,
    worker: JoinHandle<()>,
    _temp_dirs: Vec<tempfile::TempDir>,
}

fn dir_or_temp(given: &Option<PathBuf>, temps: &mut Vec<tempfile::TempDir>, what: &str) -> anyhow::Result<PathBuf> {
    match given {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {what} dir {}", dir.display()))?;
            Ok(dir.clone())
        }
        None => {
            let t = tempfile::Builder::new().prefix(&format!("comfyui-double-{what}-")).tempdir().with_context(|| format!("temp {what} dir"))?;
            let path = t.path().to_path_buf();
            temps.push(t);
            Ok(path)
        }
    }
}

impl ComfyDouble {
    /// Binds, starts the HTTP server and the queue worker.
    pub async fn start(cfg: DoubleConfig) -> anyhow::Result<ComfyDouble> {
        Self::start_with_argv(cfg, vec!["main.py".into()]).await
    }

    /// As [`ComfyDouble::start`], reporting `argv` in `/system_stats`.
    pub async fn start_with_argv(cfg: DoubleConfig, argv: Vec<String>) -> anyhow::Result<ComfyDouble> {
        let mut temps = Vec::new();
        let input_dir = dir_or_temp(&cfg.input_dir, &mut temps, "input")?;
        let output_dir = dir_or_temp(&cfg.output_dir, &mut temps, "output")?;
        let temp_dir = dir_or_temp(&None, &mut temps, "temp")?;
        let models = ModelPaths::new(cfg.models_dir.as_deref(), cfg.extra_model_paths.as_deref())?;
        let kill = Arc::new(KillSwitch::default());
        let listener = TcpListener::bind(cfg.listen).await.with_context(|| format!("binding {}", cfg.listen))?;
        let addr = listener.local_addr().context("local addr")?;
        let temp_prefix: String = {
            use rand::Rng;
            const LETTERS: &[u8] = b"abcdefghijklmnopqrstupvxyz";
            let mut rng = rand::rng();
            let tail: String = (0..5).map(|_| LETTERS[rng.random_range(0..LETTERS.len())] as char).collect();
            format!("_temp_{tail}")
        };
        let shared = Arc::new(Shared {
            input_dir,
            output_dir,
            temp_dir,
            models,
            faults: Faults::new(kill.clone()),
            record: Mutex::new(Record::default()),
            queue: Mutex::new(Default::default()),
            queue_notify: Notify::new(),
            sockets: Mutex::new(HashMap::new()),
            exec: Mutex::new(Default::default()),
            interrupt: AtomicBool::new(false),
            cache: Mutex::new(HashMap::new()),
            temp_prefix,
            next_conn: AtomicU64::new(0),
            preview_method: preview_method_of(&argv),
            argv,
            max_history: cfg.max_history.max(1),
            keep_record: cfg.keep_record,
            flowhost_nodes: cfg.flowhost_nodes,
            loaded_models: Mutex::new(ModelState::default()),
        });
        let app = http::router(shared.clone());
        let listener = KillableListener { inner: listener, kill: kill.clone() };
        let server = tokio::spawn({
            let kill = kill.clone();
            async move {
                tokio::select! {
                    r = axum::serve(listener, app) => { if let Err(e) = r { tracing::warn!(error = %e, "double server ended"); } }
                    _ = kill.wait() => {}
                }
            }
        });
        let worker = tokio::spawn({
            let shared = shared.clone();
            let kill = kill.clone();
            async move {
                tokio::select! {
                    _ = execute::worker(shared.clone()) => {}
                    _ = kill.wait() => { shared.drop_all_sockets(); }
                }
            }
        });
        tracing::info!(%addr, "ComfyUI double listening");
        Ok(ComfyDouble { addr, shared, server, worker, _temp_dirs: temps })
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn faults(&self) -> &Faults {
        &self.shared.faults
    }

    /// What the double has loaded and how many model switches it paid for so far.
    pub fn model_state(&self) -> ModelState {
        state::lock(&self.shared.loaded_models).clone()
    }

    /// A snapshot of what the double received so far.
    pub fn record(&self) -> Record {
        self.shared.record().clone()
    }

    pub fn input_dir(&self) -> &Path {
        &self.shared.input_dir
    }

    pub fn output_dir(&self) -> &Path {
        &self.shared.output_dir
    }

    /// PreviewImage's folder (`type=temp`).
    pub fn temp_dir(&self) -> &Path {
        &self.shared.temp_dir
    }

    /// Resolves once the double has crashed or been shut down (for a binary that serves until killed).
    pub async fn stopped(&self) {
        self.shared.faults.kill.clone().wait().await;
    }

    /// Stops answering, drops every connection and the worker.
    pub async fn shutdown(mut self) {
        self.shared.faults.kill.kill();
        let _ = (&mut self.server).await;
        let _ = (&mut self.worker).await;
    }
}

impl Drop for ComfyDouble {
    /// A dropped double behaves like a killed process (its temporary folders go away with it).
    fn drop(&mut self) {
        self.shared.faults.kill.kill();
        self.server.abort();
        self.worker.abort();
    }
}

/// The TCP listener, whose connections all fail once the kill switch fires.
struct KillableListener {
    inner: TcpListener,
    kill: Arc<KillSwitch>,
}

impl axum::serve::Listener for KillableListener {
    type Io = KillableStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    let _ = stream.set_nodelay(true);
                    let dead: Pin<Box<dyn Future<Output = ()> + Send>> = Box::pin(self.kill.clone().wait());
                    return (KillableStream { inner: stream, dead, is_dead: false }, addr);
                }
                Err(e) => {
                    tracing::debug!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// A TCP stream that errors on every operation once the double is killed (like a dead peer).
pub(crate) struct KillableStream {
    inner: TcpStream,
    dead: Pin<Box<dyn Future<Output = ()> + Send>>,
    /// `dead` has completed; it must never be polled again (an async fn panics
    /// when resumed after completion).
    is_dead: bool,
}

impl KillableStream {
    fn killed(&mut self, cx: &mut TaskContext<'_>) -> bool {
        if !self.is_dead && self.dead.as_mut().poll(cx).is_ready() {
            self.is_dead = true;
        }
        self.is_dead
    }
}

fn reset() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::ConnectionReset, "ComfyUI double crashed")
}

impl AsyncRead for KillableStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if self.killed(cx) {
            return Poll::Ready(Err(reset()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for KillableStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        if self.killed(cx) {
            return Poll::Ready(Err(reset()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        if self.killed(cx) {
            return Poll::Ready(Err(reset()));
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// ComfyUI's `--preview-method` (`--preview-method X` or `--preview-method=X`), unless `none`.
fn preview_method_of(argv: &[String]) -> Option<String> {
    let value = argv.iter().enumerate().find_map(|(i, a)| {
        if a == "--preview-method" { argv.get(i + 1).cloned() } else { a.strip_prefix("--preview-method=").map(str::to_string) }
    })?;
    (value != "none").then_some(value)
}
