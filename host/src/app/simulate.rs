//! `flowhost serve --simulate`: the real service against the embedded ComfyUI
//! test double (the `comfyui-double` crate) over real loopback sockets, so a
//! newcomer without a GPU can call every endpoint. The double validates graphs
//! against the real node catalogue and lists model combos from the models
//! folder exactly as ComfyUI does; without `--models` a scratch folder gets a
//! small placeholder file for every model the loaded plugins declare (plus the
//! demo LoRA `character-123`), so every endpoint works and a missing LoRA still
//! gives the real 404.
//!
//! The double is linked only with the `simulate` cargo feature (on by default,
//! so `cargo build`, `scripts/serve.sh` and `scripts/test.sh` have it; release
//! and Modal builds pass `--no-default-features`). Without it `SimulatedComfy`
//! is uninhabited and `--simulate` is refused at start.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::plugins::PluginManifest;

/// The demo LoRA every simulated volume has.
pub const DEMO_LORA: &str = "character-123.safetensors";

/// Milliseconds the double waits per executed node and per sampler step (a slow GPU),
/// for demos and for tests that must catch a job while it runs (e.g. the SDK test's cancel).
pub const STEP_LATENCY_ENV: &str = "FLOWHOST_SIMULATE_STEP_LATENCY_MS";

/// Milliseconds the double takes to load another model set (a LoRA or model change), so a
/// `--simulate --workers N` pool shows what affinity dispatch saves.
pub const MODEL_SWITCH_ENV: &str = "FLOWHOST_SIMULATE_MODEL_SWITCH_MS";

/// Bytes of each placeholder model file (non-empty: zero-byte files count as missing).
const PLACEHOLDER: &[u8] = b"flowhost simulate placeholder: not a real model\n";

#[cfg(feature = "simulate")]
pub use with_double::SimulatedComfy;

#[cfg(feature = "simulate")]
mod with_double {
    use std::path::{Path, PathBuf};

    use anyhow::{Context, Result};
    use comfyui_double::{ComfyDouble, DoubleConfig};

    /// `/history` entries the simulated ComfyUI keeps (flowhost reads each right after its prompt).
    const SIMULATED_HISTORY: usize = 64;

    /// The embedded double and what the backend needs to know about it.
    pub struct SimulatedComfy {
        pub url: url::Url,
        pub input_dir: PathBuf,
        pub output_dir: PathBuf,
        double: ComfyDouble,
        _scratch: Option<tempfile::TempDir>,
    }

    impl SimulatedComfy {
        /// Start the double on 127.0.0.1 with `models` as its models folder.
        pub async fn start(models: &Path, extra_model_paths: Option<&Path>, scratch: Option<tempfile::TempDir>) -> Result<Self> {
            // Latent previews on (`--preview-method auto`), as a ComfyUI started for flowhost can
            // have them: the page and the v2 event stream show preview frames while sampling.
            let argv = vec!["main.py".to_string(), "--preview-method".to_string(), "auto".to_string()];
            let double = ComfyDouble::start_with_argv(DoubleConfig {
                models_dir: Some(models.to_path_buf()),
                extra_model_paths: extra_model_paths.map(Path::to_path_buf),
                // A simulated backend may serve for days: keep a short history and no test record.
                max_history: SIMULATED_HISTORY,
                keep_record: false,
                // flowhost "installed" its output node, as it does in a ComfyUI it starts.
                flowhost_nodes: true,
                ..DoubleConfig::default()
            }, argv)
            .await
                .context("starting the embedded ComfyUI double")?;
            if let Some(ms) = std::env::var(super::STEP_LATENCY_ENV).ok().and_then(|v| v.trim().parse::<u64>().ok()).filter(|ms| *ms > 0) {
                tracing::warn!(ms, "simulated ComfyUI slowed down ({})", super::STEP_LATENCY_ENV);
                double.faults().set_step_latency(std::time::Duration::from_millis(ms));
            }
            if let Some(ms) = std::env::var(super::MODEL_SWITCH_ENV).ok().and_then(|v| v.trim().parse::<u64>().ok()).filter(|ms| *ms > 0) {
                double.faults().set_model_switch_cost(std::time::Duration::from_millis(ms));
            }
            let url = url::Url::parse(&double.url()).context("the double's URL")?;
            let input_dir = double.input_dir().to_path_buf();
            let output_dir = double.output_dir().to_path_buf();
            Ok(Self { url, input_dir, output_dir, double, _scratch: scratch })
        }

        pub async fn shutdown(self) {
            self.double.shutdown().await;
        }

        pub fn url(&self) -> url::Url {
            self.url.clone()
        }

        pub fn input_dir(&self) -> PathBuf {
            self.input_dir.clone()
        }

        pub fn output_dir(&self) -> PathBuf {
            self.output_dir.clone()
        }
    }
}

/// A build without the double can never hold one.
#[cfg(not(feature = "simulate"))]
pub enum SimulatedComfy {}

#[cfg(not(feature = "simulate"))]
impl SimulatedComfy {
    pub async fn start(_models: &Path, _extra_model_paths: Option<&Path>, _scratch: Option<tempfile::TempDir>) -> Result<Self> {
        anyhow::bail!("this flowhost was built without the `simulate` feature")
    }
    pub async fn shutdown(self) {
        match self {}
    }
    pub fn url(&self) -> url::Url {
        match *self {}
    }
    pub fn input_dir(&self) -> PathBuf {
        match *self {}
    }
    pub fn output_dir(&self) -> PathBuf {
        match *self {}
    }
}

/// Create a placeholder for each requirement none of whose alternatives is
/// present (the first alternative's name), and the demo LoRA.
pub fn provision_placeholder_models(root: &Path, plugins: &[PluginManifest]) -> Result<Vec<PathBuf>> {
    let mut created = Vec::new();
    let mut wanted: Vec<(String, String)> = vec![("loras".into(), DEMO_LORA.into())];
    for manifest in plugins {
        for requirement in &manifest.models {
            let present = requirement.any_of.iter().any(|m| root.join(&m.folder).join(&m.name).is_file());
            if let (false, Some(first)) = (present, requirement.any_of.first()) {
                wanted.push((first.folder.clone(), first.name.clone()));
            }
        }
    }
    for (folder, name) in wanted {
        if folder.contains("..") || name.contains("..") || Path::new(&name).is_absolute() {
            continue;
        }
        let path = root.join(&folder).join(&name);
        if path.exists() {
            continue;
        }
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&path, PLACEHOLDER).with_context(|| format!("writing {}", path.display()))?;
        created.push(path);
    }
    if !created.is_empty() {
        tracing::info!(files = created.len(), root = %root.display(), "provisioned placeholder models for simulation");
    }
    Ok(created)
}
