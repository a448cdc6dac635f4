//! `flowhost serve --simulate`: the real service against the embedded ComfyUI
//! test double (the `comfyui-double` crate) over real loopback sockets, so a
//! newcomer without a GPU can call every endpoint. The double validates graphs
//! against the real node catalogue and lists model combos from the models
//! folder exactly as ComfyUI does; without `--models` a scratch folder gets a
//! small placeholder file for every model the loaded plugins declare (plus the
//! demo LoRA `character-123`), so every endpoint works and a missing LoRA still
//! gives the real 404.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use comfyui_double::{ComfyDouble, DoubleConfig};

use crate::plugins::LoadedPlugin;

/// The demo LoRA every simulated volume has.
pub const DEMO_LORA: &str = "character-123.safetensors";

/// Bytes of each placeholder model file (non-empty: zero-byte files count as missing).
const PLACEHOLDER: &[u8] = b"flowhost simulate placeholder: not a real model\n";

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
    pub async fn start(models: &Path, scratch: Option<tempfile::TempDir>) -> Result<Self> {
        let double = ComfyDouble::start(DoubleConfig { models_dir: Some(models.to_path_buf()), ..DoubleConfig::default() })
            .await
            .context("starting the embedded ComfyUI double")?;
        let url = url::Url::parse(&double.url()).context("the double's URL")?;
        let input_dir = double.input_dir().to_path_buf();
        let output_dir = double.output_dir().to_path_buf();
        Ok(Self { url, input_dir, output_dir, double, _scratch: scratch })
    }

    pub async fn shutdown(self) {
        self.double.shutdown().await;
    }
}

/// Create a placeholder for each requirement none of whose alternatives is
/// present (the first alternative's name), and the demo LoRA.
pub fn provision_placeholder_models(root: &Path, plugins: &[Arc<LoadedPlugin>]) -> Result<Vec<PathBuf>> {
    let mut created = Vec::new();
    let mut wanted: Vec<(String, String)> = vec![("loras".into(), DEMO_LORA.into())];
    for plugin in plugins {
        for requirement in &plugin.manifest.models {
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
    tracing::info!(files = created.len(), root = %root.display(), "provisioned placeholder models for simulation");
    Ok(created)
}
