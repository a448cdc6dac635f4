//! Compiled components on disk, so a restart (or a Modal cold start) skips
//! Cranelift.
//!
//! Key: sha256 of the `.wasm` plus the engine's compatibility digest (wasmtime
//! version, target, and every setting that changes generated code). Entries are
//! written to a temp file and renamed, so a crash never leaves a half entry, and
//! any failure to read one is simply a miss. The cache lives in a host-owned
//! folder, never in the watched plugin folder.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use wasmtime::component::Component;

use super::engine::{PluginEngine, WasmtimeContext};

/// A folder of `*.cwasm` files.
#[derive(Debug, Clone)]
pub struct CompiledCache {
    dir: PathBuf,
}

/// Whether a component came from the cache or was compiled now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CacheOutcome {
    Hit,
    Miss,
    Disabled,
}

impl CompiledCache {
    pub fn new(dir: impl Into<PathBuf>) -> Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).with_context(|| format!("creating compiled cache folder {}", dir.display()))?;
        Ok(Self { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn entry_path(&self, engine: &PluginEngine, wasm_sha256: &str) -> PathBuf {
        self.dir.join(format!("{wasm_sha256}-{}.cwasm", engine.compatibility_digest()))
    }

    /// The compiled component for `wasm`, from the cache or compiled (and stored).
    pub fn load_or_compile(
        cache: Option<&Self>,
        engine: &PluginEngine,
        wasm: &[u8],
        wasm_sha256: &str,
    ) -> Result<(Component, CacheOutcome)> {
        let Some(cache) = cache else {
            return Ok((compile(engine, wasm)?, CacheOutcome::Disabled));
        };
        let path = cache.entry_path(engine, wasm_sha256);
        // Read into memory rather than mmap the file: a cache file truncated or
        // rewritten in place by someone else must not SIGBUS the service.
        if let Ok(bytes) = std::fs::read(&path) {
            // SAFETY: the bytes were written by `Component::serialize` of this
            // very engine configuration (the key includes its compatibility
            // digest) into a folder only the host writes; wasmtime also checks
            // the header and refuses anything it did not produce.
            match unsafe { Component::deserialize(engine.engine(), &bytes) } {
                Ok(component) => return Ok((component, CacheOutcome::Hit)),
                Err(err) => {
                    tracing::warn!(path = %path.display(), error = %err, "unusable compiled cache entry; recompiling");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        let component = compile(engine, wasm)?;
        if let Err(err) = cache.store(&path, &component) {
            tracing::warn!(path = %path.display(), error = %format!("{err:#}"), "could not write compiled cache entry");
        }
        Ok((component, CacheOutcome::Miss))
    }

    fn store(&self, path: &Path, component: &Component) -> Result<()> {
        let bytes = component.serialize().wt_context("serializing compiled component")?;
        let mut tmp = tempfile::NamedTempFile::new_in(&self.dir).context("creating temp file")?;
        std::io::Write::write_all(&mut tmp, &bytes).context("writing compiled component")?;
        tmp.persist(path).context("renaming compiled component into place")?;
        Ok(())
    }
}

fn compile(engine: &PluginEngine, wasm: &[u8]) -> Result<Component> {
    Component::new(engine.engine(), wasm).wt_context("compiling the component")
}
