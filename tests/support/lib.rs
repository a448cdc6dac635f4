//! Shared helpers for the end-to-end tests: building plugins as real wasm
//! components, starting a real `flowhost` service on loopback, and talking to it
//! over real sockets.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub mod contract;
pub mod pg;
pub mod s3;

/// The workspace root (this crate lives in `<root>/tests`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from(".."))
}

/// Cargo's target dir as the outer build uses it.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace_root().join("target"))
}

static BUILD_LOCK: Mutex<()> = Mutex::new(());

/// `cargo`, without the package variables `cargo test` gave this process (`CARGO_PKG_*`,
/// `CARGO_MANIFEST_*`, `CARGO_CRATE_NAME`, …). Why: ring's build script watches several of them,
/// so passing them on would rebuild ring, rustls, sqlx and flowhost in here, and again in the
/// next plain `cargo build` (scripts/test.sh builds the binaries before the tests).
fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        let set_by_cargo_test = name.starts_with("CARGO_PKG_")
            || name.starts_with("CARGO_MANIFEST_")
            || matches!(&*name, "CARGO_CRATE_NAME" | "CARGO_BIN_NAME" | "CARGO_PRIMARY_PACKAGE" | "CARGO_TARGET_TMPDIR" | "OUT_DIR");
        if set_by_cargo_test {
            cmd.env_remove(&*name);
        }
    }
    cmd
}

/// Build package `package` for wasm32-wasip2 (release) with extra env vars and
/// return the path of a private copy of the component. Variants with different
/// env get their own target dir so they don't rebuild each other.
pub fn build_component(package: &str, env: &[(&str, &str)]) -> Result<PathBuf> {
    let _guard = BUILD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let variant: String = env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",");
    let (target, label) = if env.is_empty() {
        (target_dir(), package.to_string())
    } else {
        let slug: String = variant.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
        (target_dir().join("fixture-variants").join(&slug), format!("{package}-{slug}"))
    };
    let artifact = target.join("wasm32-wasip2/release").join(format!("{}.wasm", package.replace('-', "_")));
    let mut cmd = cargo();
    cmd.current_dir(workspace_root())
        .args(["build", "--quiet", "--release", "--target", "wasm32-wasip2", "-p", package])
        .env("CARGO_TARGET_DIR", &target);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let status = cmd.status().with_context(|| format!("running cargo build for {package}"))?;
    if !status.success() {
        bail!("building {package} ({variant}) for wasm32-wasip2 failed");
    }
    let copies = target_dir().join("test-components");
    std::fs::create_dir_all(&copies)?;
    let copy = copies.join(format!("{label}.wasm"));
    std::fs::copy(&artifact, &copy).with_context(|| format!("copying {}", artifact.display()))?;
    Ok(copy)
}

/// [`build_component`] without extra env, built once per test binary: the path of
/// `package`'s component (panics if it does not build: every test needing it fails).
pub fn component(package: &str) -> PathBuf {
    static BUILT: std::sync::OnceLock<Mutex<std::collections::HashMap<String, PathBuf>>> = std::sync::OnceLock::new();
    let map = BUILT.get_or_init(Default::default);
    let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
    map.entry(package.to_string()).or_insert_with(|| build_component(package, &[]).expect("component builds")).clone()
}

/// Write `bytes` to `dir/name` atomically (temp file + rename), the way a
/// careful publisher does.
pub fn publish_atomically(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, dir.join(name))?;
    Ok(())
}

/// Poll `check` until it returns `Some` or `limit` passes. For "eventually"
/// conditions only; never used to assert speed.
pub async fn eventually<T, F, Fut>(limit: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return Some(v);
        }
        if start.elapsed() > limit {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A running in-process service and a client for it.
pub struct TestServer {
    pub server: flowhost::app::server::Server,
    pub base: String,
    pub client: reqwest::Client,
    pub plugins: tempfile::TempDir,
    pub cache: tempfile::TempDir,
    /// The job store and blobs, unless the test named its own `--state-dir`.
    pub state: Option<tempfile::TempDir>,
}

impl TestServer {
    /// Start `flowhost serve` (parsed from real CLI args) on 127.0.0.1:0 with the
    /// given plugin files copied in, plus `extra_args`.
    pub async fn start(plugins: &[(&str, &Path)], extra_args: &[&str]) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        for (name, path) in plugins {
            std::fs::copy(path, dir.path().join(name))?;
        }
        let cache = tempfile::tempdir()?;
        Self::start_in(dir, cache, extra_args).await
    }

    pub async fn start_in(plugins: tempfile::TempDir, cache: tempfile::TempDir, extra_args: &[&str]) -> Result<Self> {
        let plugins_dir = plugins.path().to_string_lossy().to_string();
        let cache_dir = cache.path().to_string_lossy().to_string();
        let mut argv = vec!["flowhost", "serve", "--listen", "127.0.0.1:0", "--plugins", &plugins_dir, "--cache-dir", &cache_dir];
        // Simulation is explicit: a test that names no backend runs the double.
        if !extra_args.iter().any(|a| matches!(*a, "--comfyui-url" | "--comfyui-dir" | "--simulate")) {
            argv.push("--simulate");
        }
        // Warm-up runs its own prompts in the double; a test that counts prompts, arms a
        // fault or cancels "the" running job must not meet them, so it is opt-in here.
        if !extra_args.iter().any(|a| a.starts_with("--warm-up")) {
            argv.extend_from_slice(&["--warm-up", "off"]);
        }
        // Each test server gets its own job store unless the test shares one on purpose.
        let state = if extra_args.contains(&"--state-dir") { None } else { Some(tempfile::tempdir()?) };
        let state_dir = state.as_ref().map(|s| s.path().to_string_lossy().to_string());
        if let Some(dir) = &state_dir {
            argv.extend_from_slice(&["--state-dir", dir]);
        }
        argv.extend_from_slice(extra_args);
        let cli = <flowhost::app::cli::Cli as clap::Parser>::try_parse_from(argv)?;
        let flowhost::app::cli::Command::Serve(args) = cli.command else {
            bail!("not a serve command")
        };
        let server = flowhost::app::server::start(args).await?;
        let base = format!("http://{}", server.addr);
        Ok(Self { server, base, client: reqwest::Client::new(), plugins, cache, state })
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub async fn post_json(&self, path: &str, body: &serde_json::Value) -> Result<reqwest::Response> {
        Ok(self.client.post(self.url(path)).json(body).send().await?)
    }

    pub async fn get_json(&self, path: &str) -> Result<serde_json::Value> {
        Ok(self.client.get(self.url(path)).send().await?.json().await?)
    }

    /// The status entry of one plugin file in `GET /plugins`.
    pub async fn plugin_status(&self, file: &str) -> Result<Option<serde_json::Value>> {
        let list = self.get_json("/plugins").await?;
        Ok(list["plugins"].as_array().and_then(|a| a.iter().find(|p| p["file"] == file).cloned()))
    }
}

/// Decode a problem+json response, asserting the content type.
pub async fn problem(response: reqwest::Response) -> Result<(u16, serde_json::Value)> {
    let status = response.status().as_u16();
    let ct = response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    let body: serde_json::Value = response.json().await?;
    if ct != "application/problem+json" {
        bail!("expected application/problem+json, got {ct:?} (status {status}, body {body})");
    }
    Ok((status, body))
}

/// The `flowhost` binary, built (once per test process) from this workspace.
pub fn flowhost_binary() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        let _guard = BUILD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let status = cargo()
            .current_dir(workspace_root())
            .args(["build", "--quiet", "-p", "flowhost", "--bin", "flowhost"])
            .status();
        assert!(status.map(|s| s.success()).unwrap_or(false), "building the flowhost binary failed");
        target_dir().join("debug/flowhost")
    })
    .clone()
}

/// Send raw HTTP/1.1 bytes (for requests a well-behaved client would normalise,
/// such as `..` in a path) and return the status code.
pub async fn raw_request_status(addr: std::net::SocketAddr, request_line_and_headers: &str, body: &str) -> Result<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = format!("{request_line_and_headers}\r\nhost: {addr}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len());
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let text = String::from_utf8_lossy(&response);
    let status = text.split_whitespace().nth(1).context("no status line")?.parse()?;
    Ok(status)
}

/// A ComfyUI double started by the test (so the test can inject faults), with a
/// models folder of placeholder files for the Flux endpoints.
pub struct ExternalComfy {
    pub double: comfyui_double::ComfyDouble,
    pub models: tempfile::TempDir,
}

impl ExternalComfy {
    pub async fn start() -> Result<Self> {
        Self::start_with_argv(&[]).await
    }

    /// As [`ExternalComfy::start`], as if ComfyUI were started with these flags (e.g.
    /// `--preview-method latent2rgb`: samplers then send preview frames).
    pub async fn start_with_argv(flags: &[&str]) -> Result<Self> {
        Self::start_configured(flags, false).await
    }

    /// As [`ExternalComfy::start`], with flowhost's `FlowhostImageOutput` node installed (as in a
    /// ComfyUI that flowhost starts), so JPEG outputs come as raw pixels over the websocket.
    pub async fn start_with_flowhost_nodes() -> Result<Self> {
        Self::start_configured(&[], true).await
    }

    async fn start_configured(flags: &[&str], flowhost_nodes: bool) -> Result<Self> {
        let models = tempfile::tempdir()?;
        for (folder, name) in [
            ("diffusion_models", "flux1-dev.safetensors"),
            ("text_encoders", "clip_l.safetensors"),
            ("text_encoders", "t5xxl_fp16.safetensors"),
            ("vae", "ae.safetensors"),
            ("loras", "character-123.safetensors"),
            ("checkpoints", "sd_xl_base_1.0.safetensors"),
            ("instantid", "ip-adapter.bin"),
            ("controlnet", "instantid/diffusion_pytorch_model.safetensors"),
            ("insightface", "models/antelopev2/scrfd_10g_bnkps.onnx"),
            ("insightface", "models/antelopev2/glintr100.onnx"),
        ] {
            let path = models.path().join(folder).join(name);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(path, b"placeholder weights")?;
        }
        let argv = std::iter::once("main.py").chain(flags.iter().copied()).map(str::to_string).collect();
        let double = comfyui_double::ComfyDouble::start_with_argv(
            comfyui_double::DoubleConfig { models_dir: Some(models.path().to_path_buf()), flowhost_nodes, ..Default::default() },
            argv,
        )
        .await?;
        Ok(Self { double, models })
    }

    /// `serve` arguments pointing flowhost at this double and its models.
    pub fn args(&self) -> Vec<String> {
        vec!["--comfyui-url".into(), self.double.url(), "--models".into(), self.models.path().to_string_lossy().into()]
    }
}

/// The `comfyui-double` binary (a stand-in for ComfyUI's `main.py`), built once.
pub fn double_binary() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        let _guard = BUILD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let status = cargo()
            .current_dir(workspace_root())
            .args(["build", "--quiet", "-p", "comfyui-double", "--bin", "comfyui-double"])
            .status();
        assert!(status.map(|s| s.success()).unwrap_or(false), "building the comfyui-double binary failed");
        target_dir().join("debug/comfyui-double")
    })
    .clone()
}

/// A fake ComfyUI checkout whose `main.py` execs the double binary, so the
/// supervisor's real spawn path (`python3 main.py --listen .. --port ..`) runs.
pub fn fake_comfyui_dir() -> Result<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    let bin = double_binary();
    std::fs::write(
        dir.path().join("main.py"),
        format!("import os, sys\nbinary = {:?}\nos.execv(binary, [binary] + sys.argv[1:])\n", bin.to_string_lossy()),
    )?;
    Ok(dir)
}

/// How many nodes of `class` a ComfyUI API-format workflow has.
pub fn nodes_of_class(workflow: &serde_json::Value, class: &str) -> usize {
    workflow.as_object().map(|nodes| nodes.values().filter(|n| n["class_type"] == class).count()).unwrap_or(0)
}

/// A child process killed (and reaped) when the test lets go of it, pass or fail.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A loopback port free at the moment of asking (for a process the test starts).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free loopback port")
}

