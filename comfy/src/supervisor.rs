//! Supervisor for a ComfyUI process we own (`--comfyui-dir` mode): spawns `{python} main.py --listen
//! 127.0.0.1 --port P …`, pipes its output line by line into `tracing` (target "comfyui"), flags
//! custom nodes that failed to import, waits for `/system_stats` within a startup deadline, restarts it
//! with exponential backoff when it dies, and stops it on shutdown (SIGTERM, then kill). It never
//! talks the prompt protocol; `ComfyBackend` watches its `ProcessState`.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;

use crate::profile::{LaunchProfile, PreviewMethod, launch_args};

/// How to run ComfyUI.
#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    /// The ComfyUI checkout (holds `main.py`); also the working directory.
    pub comfyui_dir: PathBuf,
    /// Python interpreter (default `python3`).
    pub python: PathBuf,
    /// Port to listen on (always on 127.0.0.1).
    pub port: u16,
    /// Named bundle of speed options (`--comfyui-profile`), placed before `extra_args`.
    pub profile: LaunchProfile,
    /// `--preview-method` for latent previews; `None` leaves ComfyUI's default (none).
    pub preview: Option<PreviewMethod>,
    /// Extra arguments appended to the command line (e.g. `--cpu`).
    pub extra_args: Vec<String>,
    /// Passed as `--extra-model-paths-config FILE`.
    pub extra_model_paths_config: Option<PathBuf>,
    /// flowhost's own `custom_nodes` config ([`crate::raster::install`]), passed as a second
    /// `--extra-model-paths-config FILE` so the operator's file still applies.
    pub flowhost_nodes_config: Option<PathBuf>,
    /// How long ComfyUI may take to answer `/system_stats` after spawning (real ComfyUI: ~35 s cold).
    pub startup_timeout: Duration,
    pub restart_backoff_initial: Duration,
    pub restart_backoff_max: Duration,
    /// Time between SIGTERM and kill on shutdown.
    pub stop_grace: Duration,
    /// Environment set on the process besides the inherited one (a pool pins each
    /// ComfyUI to its GPU with `CUDA_VISIBLE_DEVICES`).
    pub env: Vec<(String, String)>,
}

impl SupervisorConfig {
    pub fn new(comfyui_dir: PathBuf, port: u16) -> Self {
        SupervisorConfig {
            comfyui_dir,
            python: PathBuf::from("python3"),
            port,
            profile: LaunchProfile::Default,
            preview: None,
            extra_args: Vec::new(),
            extra_model_paths_config: None,
            flowhost_nodes_config: None,
            startup_timeout: Duration::from_secs(180),
            restart_backoff_initial: Duration::from_secs(1),
            restart_backoff_max: Duration::from_secs(60),
            stop_grace: Duration::from_secs(10),
            env: Vec::new(),
        }
    }

    /// The URL the supervised ComfyUI answers on.
    pub fn url(&self) -> anyhow::Result<url::Url> {
        Ok(url::Url::parse(&format!(
            "http://127.0.0.1:{}/",
            self.port
        ))?)
    }

    /// Everything after the interpreter on the command line the supervisor spawns:
    /// `main.py --listen 127.0.0.1 --port P`, the profile's options, the preview
    /// method, the operator's `extra_args`, then `--extra-model-paths-config FILE` for the
    /// models file and for flowhost's nodes.
    pub fn command_args(&self) -> Vec<String> {
        let mut args: Vec<String> = ["main.py", "--listen", "127.0.0.1", "--port"].map(String::from).to_vec();
        args.push(self.port.to_string());
        args.extend(launch_args(self.profile, self.preview));
        args.extend(self.extra_args.iter().cloned());
        for file in [&self.extra_model_paths_config, &self.flowhost_nodes_config].into_iter().flatten() {
            args.push("--extra-model-paths-config".into());
            args.push(file.display().to_string());
        }
        args
    }

    /// ComfyUI's output directory: `--output-directory` if given, else `{comfyui_dir}/output`.
    pub fn output_dir(&self) -> PathBuf {
        let mut args = self.extra_args.iter();
        while let Some(a) = args.next() {
            if a == "--output-directory" {
                if let Some(dir) = args.next() {
                    return PathBuf::from(dir);
                }
            } else if let Some(dir) = a.strip_prefix("--output-directory=") {
                return PathBuf::from(dir);
            }
        }
        self.comfyui_dir.join("output")
    }

    /// ComfyUI's input directory: `--input-directory` if given, else `{comfyui_dir}/input`.
    pub fn input_dir(&self) -> PathBuf {
        let mut args = self.extra_args.iter();
        while let Some(a) = args.next() {
            if a == "--input-directory" {
                if let Some(dir) = args.next() {
                    return PathBuf::from(dir);
                }
            } else if let Some(dir) = a.strip_prefix("--input-directory=") {
                return PathBuf::from(dir);
            }
        }
        self.comfyui_dir.join("input")
    }
}

/// The supervised process's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProcessState {
    /// Spawned (or about to be), not answering yet.
    Starting { attempt: u32 },
    /// Answering `/system_stats`. `generation` increments on every successful start.
    Running { pid: u32, generation: u64 },
    /// Died or failed to start; a restart follows after the backoff.
    Exited {
        reason: String,
        restart_in: Duration,
    },
    /// Stopped on shutdown.
    Stopped,
}

/// Handle to the supervising task.
pub struct Supervisor {
    state: watch::Receiver<ProcessState>,
    import_failures: Arc<Mutex<Vec<String>>>,
    stop: watch::Sender<bool>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Supervisor {
    /// Start supervising (spawns the process immediately).
    pub fn spawn(config: SupervisorConfig) -> Supervisor {
        let (state_tx, state_rx) = watch::channel(ProcessState::Starting { attempt: 1 });
        let (stop_tx, stop_rx) = watch::channel(false);
        let import_failures = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn(supervise(
            config,
            state_tx,
            stop_rx,
            import_failures.clone(),
        ));
        Supervisor {
            state: state_rx,
            import_failures,
            stop: stop_tx,
            task: Mutex::new(Some(task)),
        }
    }

    pub fn state(&self) -> watch::Receiver<ProcessState> {
        self.state.clone()
    }

    /// PID of the running process, if it is up.
    pub fn pid(&self) -> Option<u32> {
        match &*self.state.borrow() {
            ProcessState::Running { pid, .. } => Some(*pid),
            _ => None,
        }
    }

    /// Custom-node paths whose import failed in the current process (from `IMPORT FAILED` lines).
    pub fn import_failures(&self) -> Vec<String> {
        self.import_failures
            .lock()
            .map(|v| v.clone())
            .unwrap_or_default()
    }

    /// Stop the process (SIGTERM, then kill after the grace period) and the supervision.
    pub async fn shutdown(&self) {
        let _ = self.stop.send(true);
        let task = self.task.lock().ok().and_then(|mut t| t.take());
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

async fn supervise(
    config: SupervisorConfig,
    state: watch::Sender<ProcessState>,
    mut stop: watch::Receiver<bool>,
    import_failures: Arc<Mutex<Vec<String>>>,
) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap_or_default();
    let stats_url = format!("http://127.0.0.1:{}/system_stats", config.port);
    let mut backoff = config.restart_backoff_initial;
    let mut attempt = 0u32;
    let mut generation = 0u64;
    loop {
        if *stop.borrow() {
            break;
        }
        attempt += 1;
        state.send_replace(ProcessState::Starting { attempt });
        if let Ok(mut list) = import_failures.lock() {
            list.clear();
        }
        let exit_reason = match spawn_comfyui(&config, &import_failures) {
            Err(e) => format!("could not start ComfyUI: {e:#}"),
            Ok(mut child) => {
                let pid = child.id().unwrap_or(0);
                tracing::info!(target: "comfyui", pid, attempt, "ComfyUI process spawned");
                let spawned = Instant::now();
                match wait_until_answering(
                    &http,
                    &stats_url,
                    &mut child,
                    &mut stop,
                    config.startup_timeout,
                )
                .await
                {
                    Startup::Stopped => {
                        stop_child(&mut child, config.stop_grace).await;
                        break;
                    }
                    Startup::Died(reason) => reason,
                    Startup::TimedOut => {
                        let _ = child.kill().await;
                        format!(
                            "ComfyUI did not answer /system_stats within {:?}",
                            config.startup_timeout
                        )
                    }
                    Startup::Ready => {
                        generation += 1;
                        tracing::info!(target: "comfyui", pid, generation, startup = ?spawned.elapsed(), "ComfyUI is answering");
                        state.send_replace(ProcessState::Running { pid, generation });
                        tokio::select! {
                            status = child.wait() => {
                                if spawned.elapsed() > Duration::from_secs(120) {
                                    backoff = config.restart_backoff_initial; // it ran fine for a while
                                }
                                match status {
                                    Ok(s) => format!("ComfyUI exited: {s}"),
                                    Err(e) => format!("waiting for ComfyUI failed: {e}"),
                                }
                            }
                            _ = stopped(&mut stop) => {
                                stop_child(&mut child, config.stop_grace).await;
                                break;
                            }
                        }
                    }
                }
            }
        };
        tracing::warn!(target: "comfyui", reason = %exit_reason, restart_in = ?backoff, "ComfyUI is down; restarting");
        state.send_replace(ProcessState::Exited {
            reason: exit_reason,
            restart_in: backoff,
        });
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stopped(&mut stop) => break,
        }
        backoff = (backoff * 2).min(config.restart_backoff_max);
    }
    state.send_replace(ProcessState::Stopped);
}

/// Resolves once shutdown was requested.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

enum Startup {
    Ready,
    Died(String),
    TimedOut,
    Stopped,
}

async fn wait_until_answering(
    http: &reqwest::Client,
    url: &str,
    child: &mut Child,
    stop: &mut watch::Receiver<bool>,
    timeout: Duration,
) -> Startup {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Ok(resp) = http.get(url).send().await
            && resp.status().is_success()
        {
            return Startup::Ready;
        }
        tokio::select! {
            status = child.wait() => {
                return Startup::Died(match status {
                    Ok(s) => format!("ComfyUI exited during startup: {s}"),
                    Err(e) => format!("waiting for ComfyUI failed: {e}"),
                });
            }
            _ = stopped(stop) => return Startup::Stopped,
            _ = tokio::time::sleep_until(deadline) => return Startup::TimedOut,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

fn spawn_comfyui(
    config: &SupervisorConfig,
    import_failures: &Arc<Mutex<Vec<String>>>,
) -> anyhow::Result<Child> {
    use anyhow::Context;
    let mut cmd = Command::new(&config.python);
    cmd.args(config.command_args())
        .envs(config.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .current_dir(&config.comfyui_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().with_context(|| {
        format!(
            "spawning {} main.py in {}",
            config.python.display(),
            config.comfyui_dir.display()
        )
    })?;
    if let Some(out) = child.stdout.take() {
        tokio::spawn(forward_lines(out, "stdout", import_failures.clone()));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(forward_lines(err, "stderr", import_failures.clone()));
    }
    Ok(child)
}

/// The custom-node path in a ComfyUI `IMPORT FAILED` line (`   0.1 seconds (IMPORT FAILED): /path`).
pub fn import_failure_in(line: &str) -> Option<String> {
    let idx = line.find("IMPORT FAILED")?;
    let rest = &line[idx + "IMPORT FAILED".len()..];
    let path = rest.trim_start_matches(')').trim_start_matches(':').trim();
    Some(if path.is_empty() {
        line.trim().to_string()
    } else {
        path.to_string()
    })
}

async fn forward_lines(
    stream: impl AsyncRead + Unpin,
    stream_name: &'static str,
    import_failures: Arc<Mutex<Vec<String>>>,
) {
    let mut reader = BufReader::new(stream);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                let line = String::from_utf8_lossy(&buf);
                let line = line.trim_end();
                if let Some(node) = import_failure_in(line) {
                    tracing::warn!(target: "comfyui", stream = stream_name, custom_node = %node, "custom node failed to import: {line}");
                    if let Ok(mut list) = import_failures.lock()
                        && !list.contains(&node)
                    {
                        list.push(node);
                    }
                } else {
                    tracing::info!(target: "comfyui", stream = stream_name, "{line}");
                }
            }
        }
    }
}

/// SIGTERM, wait up to `grace`, then kill.
async fn stop_child(child: &mut Child, grace: Duration) {
    if let Some(pid) = child.id() {
        // A syscall, not the `kill` program: the Modal image (Debian slim) has no procps,
        // so shelling out there would never ask ComfyUI to stop.
        if let Some(pid) = i32::try_from(pid).ok().and_then(rustix::process::Pid::from_raw) {
            if let Err(error) = rustix::process::kill_process(pid, rustix::process::Signal::TERM) {
                tracing::warn!(target: "comfyui", %error, "could not send SIGTERM to ComfyUI");
            }
        }
        if tokio::time::timeout(grace, child.wait()).await.is_ok() {
            tracing::info!(target: "comfyui", pid, "ComfyUI stopped");
            return;
        }
        tracing::warn!(target: "comfyui", pid, "ComfyUI ignored SIGTERM; killing");
    }
    let _ = child.kill().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn import_failed_lines_name_the_custom_node() {
        assert_eq!(
            import_failure_in(
                "   0.0 seconds (IMPORT FAILED): /opt/ComfyUI/custom_nodes/broken-pack"
            )
            .as_deref(),
            Some("/opt/ComfyUI/custom_nodes/broken-pack")
        );
        assert_eq!(
            import_failure_in("   0.9 seconds: /opt/ComfyUI/custom_nodes/ComfyUI_InstantID"),
            None
        );
    }

    /// ComfyUI is asked to stop with SIGTERM (it flushes and exits), not killed: the child
    /// records the signal it got, and stops well inside the grace period.
    #[tokio::test]
    async fn stop_sends_sigterm_before_any_kill() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("signal");
        let script = format!(
            "trap 'echo TERM > {}; exit 0' TERM; touch {}.ready; while :; do sleep 0.05; done",
            marker.display(),
            marker.display()
        );
        let mut child = Command::new("sh").arg("-c").arg(script).spawn().unwrap();
        let ready = marker.with_extension("ready");
        for _ in 0..200 {
            if ready.exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(ready.exists(), "the child never set its trap");
        stop_child(&mut child, Duration::from_secs(30)).await;
        let status = child.wait().await.unwrap();
        assert_eq!(std::fs::read_to_string(&marker).unwrap().trim(), "TERM", "the child got SIGTERM");
        assert!(status.success(), "it exited on its own (trap → exit 0), not by SIGKILL: {status:?}");
    }

    #[test]
    fn input_dir_follows_the_command_line() {
        let mut c = SupervisorConfig::new("/opt/ComfyUI".into(), 8188);
        assert_eq!(c.input_dir(), PathBuf::from("/opt/ComfyUI/input"));
        c.extra_args = vec!["--input-directory".into(), "/data/in".into()];
        assert_eq!(c.input_dir(), PathBuf::from("/data/in"));
    }

    #[test]
    fn flowhost_nodes_come_as_a_second_extra_model_paths_config() {
        let mut c = SupervisorConfig::new("/opt/ComfyUI".into(), 8188);
        c.extra_model_paths_config = Some("/cache/extra_model_paths.yaml".into());
        c.flowhost_nodes_config = Some("/state/comfyui/flowhost-nodes.yaml".into());
        let args = c.command_args();
        let configs: Vec<&str> = args.windows(2).filter(|w| w[0] == "--extra-model-paths-config").map(|w| w[1].as_str()).collect();
        assert_eq!(configs, ["/cache/extra_model_paths.yaml", "/state/comfyui/flowhost-nodes.yaml"]);
        c.extra_model_paths_config = None;
        assert_eq!(c.command_args().iter().filter(|a| *a == "--extra-model-paths-config").count(), 1);
    }
}
