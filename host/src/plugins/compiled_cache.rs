//! Compiled components on disk, so a restart (or a Modal cold start) skips
//! Cranelift.
//!
//! Key: sha256 of the `.wasm` plus the engine's compatibility digest (wasmtime
//! version, target, and every setting that changes generated code). Entries are
//! written to a temp file and renamed, so a crash never leaves a half entry, and
//! any failure to read one is simply a miss. The cache lives in a host-owned
//! folder, never in the watched plugin folder.
//!
//! Eviction, so the folder does not grow one entry per plugin version forever:
//! when a plugin file loads a new version, the entry of its previous version
//! is removed; at start, entries not used for [`EvictionPolicy::max_age`] are
//! removed, then the oldest until the folder is under
//! [`EvictionPolicy::max_bytes`]. A hit refreshes the entry's mtime ("last used").

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use wasmtime::component::Component;

use super::engine::{PluginEngine, WasmtimeContext};

/// When entries are removed.
#[derive(Debug, Clone, Copy)]
pub struct EvictionPolicy {
    /// Entries unused for longer are removed at start.
    pub max_age: Duration,
    /// Total size the folder is trimmed to at start (oldest first).
    pub max_bytes: u64,
}

impl Default for EvictionPolicy {
    fn default() -> Self {
        Self { max_age: Duration::from_secs(14 * 24 * 3600), max_bytes: 2 << 30 }
    }
}

/// A folder of `*.cwasm` files.
#[derive(Debug, Clone)]
pub struct CompiledCache {
    dir: PathBuf,
    /// Plugin file → the entry its serving version uses.
    in_use: Arc<Mutex<HashMap<PathBuf, PathBuf>>>,
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
        Self::with_policy(dir, EvictionPolicy::default())
    }

    /// Open the folder and evict by `policy`.
    pub fn with_policy(dir: impl Into<PathBuf>, policy: EvictionPolicy) -> Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).with_context(|| format!("creating compiled cache folder {}", dir.display()))?;
        let cache = Self { dir, in_use: Arc::default() };
        let removed = cache.evict(policy, SystemTime::now());
        if removed > 0 {
            tracing::info!(removed, dir = %cache.dir.display(), "evicted old compiled cache entries");
        }
        Ok(cache)
    }

    /// Remove entries older than `max_age` (by mtime = last use), then the
    /// oldest until under `max_bytes`. Returns how many were removed.
    pub fn evict(&self, policy: EvictionPolicy, now: SystemTime) -> usize {
        let Ok(read) = std::fs::read_dir(&self.dir) else { return 0 };
        let mut entries: Vec<(PathBuf, SystemTime, u64)> = read
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "cwasm"))
            .filter_map(|e| {
                let meta = e.metadata().ok()?;
                Some((e.path(), meta.modified().unwrap_or(SystemTime::UNIX_EPOCH), meta.len()))
            })
            .collect();
        entries.sort_by_key(|(_, mtime, _)| std::cmp::Reverse(*mtime));
        let mut removed = 0;
        let mut kept_bytes = 0u64;
        for (path, mtime, len) in entries {
            let too_old = now.duration_since(mtime).is_ok_and(|age| age > policy.max_age);
            if too_old || kept_bytes + len > policy.max_bytes {
                if std::fs::remove_file(&path).is_ok() {
                    removed += 1;
                }
            } else {
                kept_bytes += len;
            }
        }
        removed
    }

    /// A file loaded the version whose entry is `sha256`: the entry its
    /// previous version used is no longer needed.
    pub fn note_loaded(&self, file: &Path, engine: &PluginEngine, wasm_sha256: &str) {
        let entry = self.entry_path(engine, wasm_sha256);
        let previous = match self.in_use.lock() {
            Ok(mut map) => map.insert(file.to_path_buf(), entry.clone()),
            Err(_) => return,
        };
        let still_used = |old: &PathBuf| self.in_use.lock().map(|m| m.values().any(|p| p == old)).unwrap_or(true);
        if let Some(old) = previous.filter(|old| *old != entry && !still_used(old)) {
            match std::fs::remove_file(&old) {
                Ok(()) => tracing::debug!(entry = %old.display(), "removed the compiled entry of a replaced plugin version"),
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => tracing::warn!(entry = %old.display(), error = %err, "could not remove an old compiled cache entry"),
            }
        }
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
                Ok(component) => {
                    // mtime = last use, for eviction by age.
                    if let Ok(file) = std::fs::File::options().append(true).open(&path) {
                        let _ = file.set_modified(SystemTime::now());
                    }
                    return Ok((component, CacheOutcome::Hit));
                }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugins::engine::{AllocatorChoice, PluginLimits};

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> =
            std::fs::read_dir(dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    }

    fn set_age(path: &Path, age: Duration) {
        let file = std::fs::File::options().append(true).open(path).unwrap();
        file.set_modified(SystemTime::now() - age).unwrap();
    }

    #[test]
    fn entries_unused_for_longer_than_max_age_are_evicted_at_start() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("old-x.cwasm"), b"old").unwrap();
        std::fs::write(dir.path().join("new-x.cwasm"), b"new").unwrap();
        std::fs::write(dir.path().join("keep.txt"), b"not an entry").unwrap();
        set_age(&dir.path().join("old-x.cwasm"), Duration::from_secs(30 * 24 * 3600));
        set_age(&dir.path().join("new-x.cwasm"), Duration::from_secs(24 * 3600));
        CompiledCache::with_policy(dir.path(), EvictionPolicy { max_age: Duration::from_secs(14 * 24 * 3600), max_bytes: 1 << 30 }).unwrap();
        assert_eq!(entries(dir.path()), vec!["keep.txt", "new-x.cwasm"]);
    }

    #[test]
    fn the_folder_is_trimmed_to_max_bytes_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        for (name, days) in [("a.cwasm", 3), ("b.cwasm", 2), ("c.cwasm", 1)] {
            std::fs::write(dir.path().join(name), vec![0u8; 100]).unwrap();
            set_age(&dir.path().join(name), Duration::from_secs(days * 24 * 3600));
        }
        CompiledCache::with_policy(dir.path(), EvictionPolicy { max_age: Duration::from_secs(30 * 24 * 3600), max_bytes: 250 }).unwrap();
        assert_eq!(entries(dir.path()), vec!["b.cwasm", "c.cwasm"]);
    }

    #[test]
    fn loading_a_new_version_of_a_file_removes_the_old_versions_entry() {
        let engine = PluginEngine::new(PluginLimits::default(), AllocatorChoice::OnDemand).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cache = CompiledCache::new(dir.path()).unwrap();
        let (v1, v2, other) = (cache.entry_path(&engine, "aaa"), cache.entry_path(&engine, "bbb"), cache.entry_path(&engine, "ccc"));
        for path in [&v1, &v2, &other] {
            std::fs::write(path, b"compiled").unwrap();
        }
        cache.note_loaded(Path::new("/plugins/echo.wasm"), &engine, "aaa");
        cache.note_loaded(Path::new("/plugins/other.wasm"), &engine, "ccc");
        cache.note_loaded(Path::new("/plugins/echo.wasm"), &engine, "bbb");
        assert!(!v1.exists(), "the replaced version's entry is removed");
        assert!(v2.exists() && other.exists(), "entries in use stay");
    }
}
