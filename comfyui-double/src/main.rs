//! `comfyui-double`: the test double as a process that behaves like `python main.py` for a supervisor:
//! `--listen ADDR --port P [--extra-model-paths-config FILE]... [--input-directory D] [--output-directory D]`
//! (a `custom_nodes:` folder holding flowhost's `FlowhostImageOutput` package installs that node)
//! (unknown flags and positional arguments such as `main.py` are ignored), a ComfyUI-like startup log on
//! stdout, serves until killed. Env: `COMFYUI_DOUBLE_MODELS_DIR` (a models dir with ComfyUI's folder names),
//! faults: `COMFYUI_DOUBLE_STEP_LATENCY_MS`, `COMFYUI_DOUBLE_FAIL_AT` (`class_or_id:ExceptionType:message`),
//! `COMFYUI_DOUBLE_HANG=1`, `COMFYUI_DOUBLE_VIEW_DELAY_MS`, `COMFYUI_DOUBLE_DROP_WS_AFTER` (progress events);
//! the cost of loading another model set: `--model-switch-ms MS` or `COMFYUI_DOUBLE_MODEL_SWITCH_MS`.
//!
//! Must never: listen anywhere other than what it was told (default 127.0.0.1:8188).

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use comfyui_double::{ComfyDouble, DoubleConfig};

/// Every value of a repeatable flag (ComfyUI appends each `--extra-model-paths-config`).
fn values_of(args: &[String], flag: &str) -> Vec<String> {
    let eq = format!("{flag}=");
    args.iter()
        .enumerate()
        .filter_map(|(i, a)| if a == flag { args.get(i + 1).cloned() } else { a.strip_prefix(&eq).map(str::to_string) })
        .collect()
}

/// The `custom_nodes` folders named in extra_model_paths files that hold flowhost's node
/// package (`flowhost/__init__.py` defining `FlowhostImageOutput`), as ComfyUI would load it.
fn flowhost_node_folders(configs: &[String]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for config in configs {
        let Ok(text) = std::fs::read_to_string(config) else { continue };
        for line in text.lines() {
            let Some(value) = line.trim().strip_prefix("custom_nodes:") else { continue };
            let value = value.trim();
            let folder = match value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')) {
                Some(quoted) => quoted.replace("''", "'"),
                None => value.trim_matches('"').to_string(),
            };
            let package = PathBuf::from(&folder).join("flowhost");
            if std::fs::read_to_string(package.join("__init__.py")).is_ok_and(|src| src.contains("class FlowhostImageOutput")) {
                found.push(package);
            }
        }
    }
    found
}

fn value_of(args: &[String], flag: &str) -> Option<String> {
    let eq = format!("{flag}=");
    args.iter().enumerate().find_map(|(i, a)| {
        if a == flag { args.get(i + 1).cloned() } else { a.strip_prefix(&eq).map(str::to_string) }
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let host: IpAddr = value_of(&args, "--listen").unwrap_or_else(|| "127.0.0.1".into()).parse().context("--listen")?;
    let port: u16 = value_of(&args, "--port").unwrap_or_else(|| "8188".into()).parse().context("--port")?;
    let node_folders = flowhost_node_folders(&values_of(&args, "--extra-model-paths-config"));
    let cfg = DoubleConfig {
        listen: SocketAddr::new(host, port),
        models_dir: std::env::var_os("COMFYUI_DOUBLE_MODELS_DIR").map(PathBuf::from),
        extra_model_paths: value_of(&args, "--extra-model-paths-config").map(PathBuf::from),
        input_dir: value_of(&args, "--input-directory").map(PathBuf::from),
        output_dir: value_of(&args, "--output-directory").map(PathBuf::from),
        flowhost_nodes: !node_folders.is_empty(),
        ..DoubleConfig::default()
    };
    let mut out = std::io::stdout();
    writeln!(out, "Checkpoint files will always be loaded safely.")?;
    writeln!(out, "Total VRAM 0 MB, total RAM 0 MB")?;
    writeln!(out, "Device: cpu")?;
    writeln!(out, "ComfyUI version: 0.3.64 (comfyui-double)")?;
    if let Some(file) = &cfg.extra_model_paths {
        writeln!(out, "Adding extra search path from {}", file.display())?;
    }
    if !node_folders.is_empty() {
        writeln!(out, "\nImport times for custom nodes:")?;
        for folder in &node_folders {
            writeln!(out, "   0.0 seconds: {}", folder.display())?;
        }
    }
    out.flush()?;
    let mut argv = vec!["main.py".to_string()];
    argv.extend(args.iter().filter(|a| *a != "main.py").cloned());
    let double = ComfyDouble::start_with_argv(cfg, argv).await?;
    let env_u64 = |name: &str| std::env::var(name).ok().and_then(|v| v.trim().parse::<u64>().ok());
    if let Some(ms) = env_u64("COMFYUI_DOUBLE_STEP_LATENCY_MS") {
        double.faults().set_step_latency(Duration::from_millis(ms));
    }
    if let Some(ms) = value_of(&args, "--model-switch-ms").and_then(|v| v.trim().parse::<u64>().ok()).or_else(|| env_u64("COMFYUI_DOUBLE_MODEL_SWITCH_MS")) {
        double.faults().set_model_switch_cost(Duration::from_millis(ms));
    }
    if let Some(ms) = env_u64("COMFYUI_DOUBLE_VIEW_DELAY_MS") {
        double.faults().set_view_delay(Duration::from_millis(ms));
    }
    if let Some(n) = env_u64("COMFYUI_DOUBLE_DROP_WS_AFTER") {
        double.faults().drop_ws_after(Some(n.min(u32::MAX as u64) as u32));
    }
    if env_u64("COMFYUI_DOUBLE_HANG") == Some(1) {
        double.faults().hang(true);
    }
    if let Ok(spec) = std::env::var("COMFYUI_DOUBLE_FAIL_AT") {
        let mut parts = spec.splitn(3, ':');
        if let (Some(node), Some(kind), Some(message)) = (parts.next(), parts.next(), parts.next()) {
            double.faults().fail_at(node, kind, message);
        }
    }
    writeln!(out, "Starting server\n")?;
    writeln!(out, "To see the GUI go to: http://{}", double.addr())?;
    out.flush()?;
    double.stopped().await;
    Ok(())
}
