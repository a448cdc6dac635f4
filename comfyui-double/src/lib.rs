//! TEMPORARY compile stub (not committed).
use std::path::{Path, PathBuf};
#[derive(Default)]
pub struct DoubleConfig { pub listen: Option<std::net::SocketAddr>, pub models_dir: Option<PathBuf>, pub extra_model_paths: Option<PathBuf>, pub input_dir: Option<PathBuf>, pub output_dir: Option<PathBuf> }
pub struct ComfyDouble { p: PathBuf }
impl ComfyDouble {
    pub async fn start(_c: DoubleConfig) -> anyhow::Result<ComfyDouble> { anyhow::bail!("stub") }
    pub fn url(&self) -> String { String::new() }
    pub fn input_dir(&self) -> &Path { &self.p }
    pub async fn shutdown(self) {}
}
pub fn object_info_fixture() -> &'static str { "{}" }
