//! Access to the host's imports behind a trait, so plugin logic runs natively in tests.

use crate::bindings::flowhost::plugin::host as imports;
pub use imports::LogLevel;

/// A model file present on the volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelFile {
    pub name: String,
    pub size: u64,
}

/// The host's capabilities, as a plugin sees them.
pub trait Host {
    /// Model files present in a model folder (`loras`, `checkpoints`, ...).
    fn list_models(&self, folder: &str) -> Vec<ModelFile>;
    /// Log through the host's tracing.
    fn log(&self, level: LogLevel, message: &str);
}

/// The real host, reached through the component's imports. Only usable inside a
/// wasm component; natively the imports do not exist.
pub struct ComponentHost;

impl Host for ComponentHost {
    fn list_models(&self, folder: &str) -> Vec<ModelFile> {
        imports::list_models(folder)
            .into_iter()
            .map(|f| ModelFile {
                name: f.name,
                size: f.size,
            })
            .collect()
    }
    fn log(&self, level: LogLevel, message: &str) {
        imports::log(level, message)
    }
}

/// An in-memory host for native unit tests: a fixed model listing; logs are kept.
#[derive(Debug, Default)]
pub struct FakeHost {
    models: std::collections::BTreeMap<String, Vec<ModelFile>>,
    logs: std::sync::Mutex<Vec<String>>,
}

impl FakeHost {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a file of `size` bytes to `folder`.
    pub fn with_model(mut self, folder: &str, name: &str, size: u64) -> Self {
        self.models
            .entry(folder.to_string())
            .or_default()
            .push(ModelFile {
                name: name.to_string(),
                size,
            });
        self
    }

    /// Add the Flux.1-dev set a typical volume holds (separate diffusion model,
    /// both text encoders, VAE), 10 bytes each: the starting point of the Flux
    /// plugins' tests.
    pub fn with_flux_dev_models(self) -> Self {
        self.with_model("diffusion_models", "flux1-dev.safetensors", 10)
            .with_model("text_encoders", "clip_l.safetensors", 10)
            .with_model("text_encoders", "t5xxl_fp16.safetensors", 10)
            .with_model("vae", "ae.safetensors", 10)
    }

    /// Messages logged so far.
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

impl Host for FakeHost {
    fn list_models(&self, folder: &str) -> Vec<ModelFile> {
        self.models.get(folder).cloned().unwrap_or_default()
    }
    fn log(&self, _level: LogLevel, message: &str) {
        if let Ok(mut logs) = self.logs.lock() {
            logs.push(message.to_string());
        }
    }
}
