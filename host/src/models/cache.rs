//! The content-addressed model cache (`--model-cache DIR`): model files a request names by
//! reference (an https URL or an uploaded asset) fetched once per container, checked, and
//! stored under their blake3 hash in a folder ComfyUI reads through flowhost's
//! `extra_model_paths.yaml`:
//!
//! ```text
//! DIR/loras/flowhost-cache/<blake3>.safetensors   what ComfyUI lists as `flowhost-cache/<blake3>.safetensors`
//! DIR/tmp/fetch-*.part                              downloads in progress (emptied at start)
//! ```
//!
//! A download is written to a temporary name outside every folder ComfyUI reads, hashed as it
//! streams, its safetensors header checked, and only then renamed into place, so a half or
//! unchecked file is never visible (a `kill -9` mid-download leaves only a `.part`, removed at
//! the next start). Concurrent requests for the same reference share one download. Every
//! placed file is pinned ([`Pinned`]) while a job that needs it is queued or running; the
//! cache is kept under its size cap by evicting the least recently used unpinned files, so
//! a file in use is never removed (while pins hold more than the cap, the cache stays over it
//! until they are released).
//!
//! Owns: the cache folder, its index (in memory, rebuilt from the folder at start), the
//! single-flight map and eviction. Must never: expose a file before its hashes and header are
//! checked, delete a pinned file, build a path from anything but a verified hash, or hold
//! its lock across an await.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::FutureExt as _;
use futures::StreamExt as _;
use futures::future::{BoxFuture, Shared, WeakShared};
use tokio::io::AsyncWriteExt as _;
use tokio::time::Instant;
use url::Url;

use crate::net::fetch::{FetchError, Fetcher, Hashing};

/// Where uploaded model assets are read from: the job store's blob store, seen narrowly so
/// the cache needs nothing of the jobs room (which implements this for its `BlobStore`).
/// `Err(())`: the store cannot be reached now.
#[async_trait::async_trait]
pub trait AssetBytes: Send + Sync {
    /// The asset's size, or `None` when there is no such blob.
    async fn size(&self, hash: &str) -> Result<Option<u64>, ()>;
    /// The asset's first `len` bytes.
    async fn stream(&self, hash: &str, len: u64) -> Result<futures::stream::BoxStream<'static, Result<bytes::Bytes, ()>>, ()>;
}

/// The subfolder of a model folder the cache's files sit in (so their names cannot collide
/// with the volume's, and a workflow's `lora_name` says where the file came from).
pub const CACHE_SUBDIR: &str = "flowhost-cache";
/// Model folders the cache places files in.
pub const FOLDERS: &[&str] = &["loras"];
const TEMP_DIR: &str = "tmp";

/// Where a model's bytes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// An https URL (or an allow-listed host's), fetched through the destination guard.
    Url(Url),
    /// A blob of the job store's blob store (an uploaded v2 asset), `blake3:<hex>`: read from
    /// the shared bucket by any container when the blob store is S3.
    Blob(String),
}

impl ModelSource {
    /// The single-flight key.
    fn key(&self) -> String {
        match self {
            ModelSource::Url(url) => format!("url:{url}"),
            ModelSource::Blob(hash) => format!("blob:{hash}"),
        }
    }
}

/// Digests the caller requires of the bytes (lowercase hex).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Expected {
    pub sha256: Option<String>,
    pub blake3: Option<String>,
}

/// Why a model could not be placed. Messages are safe for the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CacheError {
    #[error("{0}")]
    Fetch(#[from] FetchError),
    /// The bytes do not hash to what the caller said.
    #[error("the file's {algorithm} is {actual}, not the {expected} the request names")]
    HashMismatch { algorithm: &'static str, expected: String, actual: String },
    #[error("{0}")]
    NotSafetensors(String),
    /// The uploaded asset's bytes are not in the blob store (any more).
    #[error("the asset's content is no longer stored")]
    BlobMissing,
    /// The blob store could not be read now.
    #[error("the blob store could not be read")]
    BlobStoreDown,
    /// The request's deadline passed while waiting for a download (shared or its own).
    #[error("the download did not finish before the request's deadline")]
    Deadline,
}

/// Counters and gauges the metrics read at scrape time, and `/health` shows.
#[derive(Debug, Default)]
pub struct CacheStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    /// Bytes fetched (downloads that completed and were checked).
    pub bytes_fetched: AtomicU64,
    pub evictions: AtomicU64,
    /// Fetches refused by the destination guard (the URL or a redirect).
    pub refused: AtomicU64,
    pub used_bytes: AtomicU64,
    pub cap_bytes: AtomicU64,
    pub files: AtomicU64,
}

/// `flowhost serve`'s options for files requests name by reference.
#[derive(Debug, Clone, clap::Args)]
pub struct ModelCacheArgs {
    /// The model cache folder: model files a request names by reference (an https URL or an
    /// uploaded asset) are fetched into it once, checked, and read by ComfyUI from there
    /// (flowhost registers it in ComfyUI's extra_model_paths). Without it, requests name
    /// volume files only.
    #[arg(long = "model-cache", env = "FLOWHOST_MODEL_CACHE")]
    pub model_cache: Option<PathBuf>,
    /// The most the model cache may hold, in GB: least recently used files no queued or
    /// running job needs are evicted beyond it.
    #[arg(long = "model-cache-max-gb", env = "FLOWHOST_MODEL_CACHE_MAX_GB", default_value_t = 50.0)]
    pub model_cache_max_gb: f64,
    /// The largest model file fetched by reference, in MB (larger: 413).
    #[arg(long = "fetch-max-mb", env = "FLOWHOST_FETCH_MAX_MB", default_value_t = 2048)]
    pub fetch_max_mb: u64,
    /// Seconds one model download may take in all (a request also waits no longer than its
    /// own deadline; a download no request waits for any more is dropped).
    #[arg(long = "fetch-timeout", env = "FLOWHOST_FETCH_TIMEOUT", default_value_t = 600.0)]
    pub fetch_timeout: f64,
    /// Seconds a fetch may wait to connect, for an answer, or for the next bytes of a body.
    #[arg(long = "fetch-idle-timeout", env = "FLOWHOST_FETCH_IDLE_TIMEOUT", default_value_t = 30.0)]
    pub fetch_idle_timeout: f64,
    /// Only these hosts may be fetched from (name or IP, exact; any address, http or https).
    /// Repeatable. Without it: https to public addresses only.
    #[arg(long = "fetch-allow-host", env = "FLOWHOST_FETCH_ALLOW_HOSTS", value_delimiter = ',')]
    pub fetch_allow_hosts: Vec<String>,
    /// A loopback URL flowhost POSTs to when a request names a model file the volume does not
    /// show, before answering 404: the platform refreshes the volume (Modal: `reload()`), and
    /// the request is built once more. deploy/modal/app.py serves it.
    #[arg(long = "models-refresh-url", env = "FLOWHOST_MODELS_REFRESH_URL")]
    pub models_refresh_url: Option<String>,
}

impl ModelCacheArgs {
    fn seconds(value: f64, flag: &str) -> anyhow::Result<Duration> {
        if value.is_finite() && value > 0.0 && value <= 86_400.0 {
            Ok(Duration::from_secs_f64(value))
        } else {
            anyhow::bail!("{flag} must be a number of seconds between 0 and 86400")
        }
    }

    /// The fetcher these options describe.
    pub fn fetcher(&self) -> anyhow::Result<Fetcher> {
        let idle = Self::seconds(self.fetch_idle_timeout, "--fetch-idle-timeout")?;
        let policy = crate::net::destination::DestinationPolicy::new(self.fetch_allow_hosts.iter().cloned());
        Fetcher::new(policy, crate::net::fetch::FetchLimits { connect_timeout: idle, idle_timeout: idle })
    }

    /// The cache's configuration, when `--model-cache` is given.
    pub fn config(&self) -> anyhow::Result<Option<CacheConfig>> {
        let Some(root) = &self.model_cache else { return Ok(None) };
        if !(self.model_cache_max_gb.is_finite() && self.model_cache_max_gb > 0.0) {
            anyhow::bail!("--model-cache-max-gb must be a positive number");
        }
        Ok(Some(CacheConfig {
            root: std::path::absolute(root)?,
            cap_bytes: (self.model_cache_max_gb * 1e9) as u64,
            max_file_bytes: self.fetch_max_mb.saturating_mul(1 << 20),
            fetch_timeout: Self::seconds(self.fetch_timeout, "--fetch-timeout")?,
        }))
    }
}

/// Create the cache's folders (before ComfyUI starts reading them).
pub fn prepare(root: &Path) -> std::io::Result<()> {
    for folder in FOLDERS {
        std::fs::create_dir_all(root.join(folder).join(CACHE_SUBDIR))?;
    }
    std::fs::create_dir_all(root.join(TEMP_DIR))
}

/// The cache's bounds.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub root: PathBuf,
    /// Total bytes the cache's files may take (exceeded only while pinned files need it).
    pub cap_bytes: u64,
    /// The largest one file may be.
    pub max_file_bytes: u64,
    /// The longest one shared download may run (each waiter is bounded by its own deadline
    /// too; a download nobody waits for any more is dropped).
    pub fetch_timeout: Duration,
}

/// A placed model file, pinned until dropped.
#[derive(Debug)]
pub struct Pinned {
    /// The name a workflow gives ComfyUI, relative to the model folder:
    /// `flowhost-cache/<blake3>.safetensors`.
    pub name: String,
    pub folder: &'static str,
    pub blake3: String,
    pub size: u64,
    /// Whether the file was already cached (no download).
    pub hit: bool,
    cache: Arc<Inner>,
    key: String,
}

impl Drop for Pinned {
    fn drop(&mut self) {
        let mut state = self.cache.lock();
        if let Some(entry) = state.entries.get_mut(&self.key) {
            entry.pins = entry.pins.saturating_sub(1);
        }
        self.cache.evict(&mut state);
    }
}

#[derive(Debug)]
struct Entry {
    size: u64,
    last_used: u64,
    pins: usize,
}

/// A finished download, shared by everyone who waited for it.
#[derive(Debug, Clone)]
struct Landed {
    key: String,
    blake3: String,
    sha256: String,
}

type Flight = Shared<BoxFuture<'static, Result<Landed, CacheError>>>;

#[derive(Default)]
struct State {
    /// `<folder>/<blake3>` → entry.
    entries: HashMap<String, Entry>,
    /// sha256 hex → entry key (content seen since start).
    by_sha256: HashMap<String, String>,
    /// URL → entry key (what the URL served when fetched; content addressed, so a URL
    /// named again with a digest that differs is fetched again).
    by_url: HashMap<String, String>,
    flights: HashMap<String, WeakShared<BoxFuture<'static, Result<Landed, CacheError>>>>,
    used: u64,
    tick: u64,
}

struct Inner {
    config: CacheConfig,
    fetcher: Fetcher,
    blobs: Option<Arc<dyn AssetBytes>>,
    stats: Arc<CacheStats>,
    state: Mutex<State>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelCache").field("root", &self.config.root).finish_non_exhaustive()
    }
}

/// The cache. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ModelCache {
    inner: Arc<Inner>,
}

/// The name ComfyUI lists a cached file under, relative to its model folder.
pub fn cached_name(blake3: &str) -> String {
    format!("{CACHE_SUBDIR}/{blake3}.safetensors")
}

fn entry_key(folder: &str, blake3: &str) -> String {
    format!("{folder}/{blake3}")
}

fn is_hex64(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl ModelCache {
    /// Open (or create) the cache at `config.root`: leftover partial downloads are removed
    /// and the files present indexed, least recently modified first.
    pub fn open(config: CacheConfig, fetcher: Fetcher, blobs: Option<Arc<dyn AssetBytes>>, stats: Arc<CacheStats>) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let temp = config.root.join(TEMP_DIR);
        if temp.exists() {
            std::fs::remove_dir_all(&temp).with_context(|| format!("clearing {}", temp.display()))?;
        }
        std::fs::create_dir_all(&temp).with_context(|| format!("creating {}", temp.display()))?;
        let mut found: Vec<(SystemTime, String, u64)> = Vec::new();
        for folder in FOLDERS {
            let dir = config.root.join(folder).join(CACHE_SUBDIR);
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            for item in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?.flatten() {
                let name = item.file_name().to_string_lossy().into_owned();
                let Some(hash) = name.strip_suffix(".safetensors").filter(|h| is_hex64(h)) else {
                    tracing::warn!(file = %item.path().display(), "a file in the model cache that the cache did not write; left alone");
                    continue;
                };
                let Ok(meta) = item.metadata() else { continue };
                found.push((meta.modified().unwrap_or(SystemTime::UNIX_EPOCH), entry_key(folder, hash), meta.len()));
            }
        }
        found.sort();
        let mut state = State::default();
        for (_, key, size) in found {
            state.tick += 1;
            state.used += size;
            state.entries.insert(key, Entry { size, last_used: state.tick, pins: 0 });
        }
        let mut config = config;
        // One file never outgrows the whole cache.
        config.max_file_bytes = config.max_file_bytes.min(config.cap_bytes);
        stats.cap_bytes.store(config.cap_bytes, Ordering::Relaxed);
        let inner = Arc::new(Inner { config, fetcher, blobs, stats, state: Mutex::new(state) });
        {
            let mut state = inner.lock();
            inner.evict(&mut state);
        }
        Ok(Self { inner })
    }

    pub fn root(&self) -> &Path {
        &self.inner.config.root
    }

    pub fn stats(&self) -> &Arc<CacheStats> {
        &self.inner.stats
    }

    pub fn fetcher(&self) -> &Fetcher {
        &self.inner.fetcher
    }

    pub fn max_file_bytes(&self) -> u64 {
        self.inner.config.max_file_bytes
    }

    /// The file for `source` in `folder`, fetched unless cached, checked against `expected`,
    /// pinned until the returned value is dropped. Waits at most until `deadline`.
    pub async fn place(&self, folder: &'static str, source: &ModelSource, expected: &Expected, deadline: Instant) -> Result<Pinned, CacheError> {
        self.place_counted(folder, source, expected, deadline, true).await
    }

    /// [`place`](Self::place) for a file a job placed before (the runner pins it again for the
    /// run): a hit is not counted again, a fetch (the file was evicted, or this instance never
    /// had it) is.
    pub async fn place_again(&self, folder: &'static str, source: &ModelSource, expected: &Expected, deadline: Instant) -> Result<Pinned, CacheError> {
        self.place_counted(folder, source, expected, deadline, false).await
    }

    async fn place_counted(
        &self,
        folder: &'static str,
        source: &ModelSource,
        expected: &Expected,
        deadline: Instant,
        count_hit: bool,
    ) -> Result<Pinned, CacheError> {
        if let Some(pinned) = self.lookup(folder, source, expected) {
            if count_hit {
                self.inner.stats.hits.fetch_add(1, Ordering::Relaxed);
            }
            return Ok(pinned);
        }
        // A landed file is unpinned until its waiters pin it; in the instant between, an
        // eviction may take it, and then it is fetched again (once more at most).
        for _ in 0..2 {
            let flight = self.flight(folder, source, expected);
            let landed = match tokio::time::timeout_at(deadline, flight).await {
                Err(_) => return Err(CacheError::Deadline),
                Ok(result) => result?,
            };
            check_expected(expected, &landed)?;
            let mut state = self.inner.lock();
            if let Some(pinned) = self.pin(&mut state, folder, &landed.key, false) {
                self.inner.evict(&mut state);
                return Ok(pinned);
            }
        }
        Err(CacheError::Fetch(FetchError::Local("the model cache is too small for the files in use".into())))
    }

    /// A cached file for `source`, pinned, if its content is known to be here.
    fn lookup(&self, folder: &'static str, source: &ModelSource, expected: &Expected) -> Option<Pinned> {
        let mut state = self.inner.lock();
        let blob = match source {
            ModelSource::Blob(hash) => hash.strip_prefix("blake3:").map(str::to_owned),
            ModelSource::Url(_) => None,
        };
        let by_blake3 = expected.blake3.clone().or(blob).map(|b| entry_key(folder, &b));
        let by_sha256 = expected.sha256.as_ref().and_then(|s| state.by_sha256.get(s).cloned());
        let by_url = match source {
            ModelSource::Url(url) if expected.blake3.is_none() && expected.sha256.is_none() => state.by_url.get(url.as_str()).cloned(),
            _ => None,
        };
        let key = [by_blake3, by_sha256, by_url].into_iter().flatten().find(|key| key.starts_with(folder) && state.entries.contains_key(key))?;
        // A digest the caller named must hold for what is found under another name.
        if let Some(blake3) = &expected.blake3
            && !key.ends_with(blake3.as_str())
        {
            return None;
        }
        self.pin(&mut state, folder, &key, true)
    }

    fn pin(&self, state: &mut State, folder: &'static str, key: &str, hit: bool) -> Option<Pinned> {
        state.tick += 1;
        let tick = state.tick;
        let entry = state.entries.get_mut(key)?;
        entry.pins += 1;
        entry.last_used = tick;
        let blake3 = key.rsplit('/').next().unwrap_or_default().to_owned();
        Some(Pinned { name: cached_name(&blake3), folder, blake3, size: entry.size, hit, cache: self.inner.clone(), key: key.to_owned() })
    }

    /// The download for `source` with the digests `expected`: joined when one runs, started
    /// otherwise. Bytes that fail the digests are not kept (so the digests are part of the key:
    /// a request naming other digests never shares a download that would not keep its file).
    fn flight(&self, folder: &'static str, source: &ModelSource, expected: &Expected) -> Flight {
        let key = format!("{folder}|{}|{}|{}", source.key(), expected.sha256.as_deref().unwrap_or("-"), expected.blake3.as_deref().unwrap_or("-"));
        let mut state = self.inner.lock();
        if let Some(flight) = state.flights.get(&key).and_then(WeakShared::upgrade) {
            return flight;
        }
        self.inner.stats.misses.fetch_add(1, Ordering::Relaxed);
        let (inner, source, expected, flight_key) = (self.inner.clone(), source.clone(), expected.clone(), key.clone());
        let flight: Flight = async move {
            let result = inner.download(folder, &source, &expected).await;
            inner.lock().flights.remove(&flight_key);
            if let Err(CacheError::Fetch(FetchError::Refused(_) | FetchError::RedirectRefused(_))) = &result {
                inner.stats.refused.fetch_add(1, Ordering::Relaxed);
            }
            result
        }
        .boxed()
        .shared();
        if let Some(weak) = flight.downgrade() {
            state.flights.insert(key, weak);
        }
        flight
    }

    /// The cache's use now: (bytes, files, cap).
    pub fn usage(&self) -> (u64, usize, u64) {
        let state = self.inner.lock();
        (state.used, state.entries.len(), self.inner.config.cap_bytes)
    }
}

fn check_expected(expected: &Expected, landed: &Landed) -> Result<(), CacheError> {
    for (algorithm, want, actual) in [("sha256", &expected.sha256, &landed.sha256), ("blake3", &expected.blake3, &landed.blake3)] {
        if let Some(want) = want
            && want != actual
        {
            return Err(CacheError::HashMismatch { algorithm, expected: want.clone(), actual: actual.clone() });
        }
    }
    Ok(())
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves a consistent index (every update is one
        // statement), so a poisoned lock is used as is.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Fetch, check and place one file; the entry is in the index when this returns `Ok`.
    async fn download(self: &Arc<Self>, folder: &'static str, source: &ModelSource, expected: &Expected) -> Result<Landed, CacheError> {
        let started = std::time::Instant::now();
        let deadline = Instant::now() + self.config.fetch_timeout;
        let temp_dir = self.config.root.join(TEMP_DIR);
        let max = self.config.max_file_bytes;
        let (file, size, blake3, sha256) = match source {
            ModelSource::Url(url) => {
                let got = self.fetcher.to_file(url, &temp_dir, max, deadline, true).await?;
                (got.file, got.size, got.blake3, got.sha256.unwrap_or_default())
            }
            ModelSource::Blob(hash) => self.read_blob(hash, &temp_dir, max, deadline).await?,
        };
        // Bytes that are not what the request named are dropped (the temporary file with them).
        check_expected(expected, &Landed { key: String::new(), blake3: blake3.clone(), sha256: sha256.clone() })?;
        let path = file.to_path_buf();
        tokio::task::spawn_blocking(move || super::safetensors::check_file(&path, size))
            .await
            .map_err(|_| CacheError::NotSafetensors("the file could not be checked".into()))?
            .map_err(|e| CacheError::NotSafetensors(e.to_string()))?;
        let key = entry_key(folder, &blake3);
        let final_path = self.config.root.join(folder).join(CACHE_SUBDIR).join(format!("{blake3}.safetensors"));
        let mut state = self.lock();
        if !state.entries.contains_key(&key) {
            // Same file system (DIR/tmp → DIR/<folder>/flowhost-cache): an atomic rename.
            file.persist(&final_path).map_err(|e| CacheError::Fetch(FetchError::Local(e.to_string())))?;
            state.used += size;
            state.tick += 1;
            let tick = state.tick;
            state.entries.insert(key.clone(), Entry { size, last_used: tick, pins: 0 });
            self.stats.bytes_fetched.fetch_add(size, Ordering::Relaxed);
        }
        state.by_sha256.insert(sha256.clone(), key.clone());
        if let ModelSource::Url(url) = source {
            state.by_url.insert(url.to_string(), key.clone());
        }
        // No eviction here: the waiters pin the file first, then evict.
        drop(state);
        tracing::info!(folder, blake3 = %blake3, size, ms = started.elapsed().as_millis() as u64, "model fetched into the cache");
        Ok(Landed { key, blake3, sha256 })
    }

    /// Stream a blob into a temporary file, checking it hashes to its name.
    async fn read_blob(&self, hash: &str, dir: &Path, max: u64, deadline: Instant) -> Result<(tempfile::TempPath, u64, String, String), CacheError> {
        let blobs = self.blobs.as_ref().ok_or(CacheError::BlobMissing)?;
        let work = async {
            let size = blobs.size(hash).await.map_err(|_| CacheError::BlobStoreDown)?.ok_or(CacheError::BlobMissing)?;
            if size > max {
                return Err(CacheError::Fetch(FetchError::TooLarge { cap: max }));
            }
            let mut stream = blobs.stream(hash, size).await.map_err(|_| CacheError::BlobStoreDown)?;
            let local = |e: std::io::Error| CacheError::Fetch(FetchError::Local(e.to_string()));
            let (file, path) = tempfile::Builder::new().prefix("fetch-").suffix(".part").tempfile_in(dir).map_err(local)?.into_parts();
            let mut out = tokio::io::BufWriter::with_capacity(1 << 20, tokio::fs::File::from_std(file));
            let mut hashing = Hashing::new(true);
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|_| CacheError::BlobStoreDown)?;
                hashing.update(&chunk);
                out.write_all(&chunk).await.map_err(local)?;
            }
            out.flush().await.map_err(local)?;
            out.into_inner().sync_data().await.map_err(local)?;
            let (size, blake3, sha256) = hashing.finish();
            if format!("blake3:{blake3}") != hash {
                return Err(CacheError::BlobStoreDown);
            }
            Ok((path, size, blake3, sha256.unwrap_or_default()))
        };
        tokio::time::timeout_at(deadline, work).await.map_err(|_| CacheError::Deadline)?
    }

    /// Remove least recently used unpinned files until the cache fits its cap.
    fn evict(&self, state: &mut State) {
        if state.used > self.config.cap_bytes {
            let mut candidates: Vec<(u64, String)> = state.entries.iter().filter(|(_, e)| e.pins == 0).map(|(k, e)| (e.last_used, k.clone())).collect();
            candidates.sort();
            for (_, key) in candidates {
                if state.used <= self.config.cap_bytes {
                    break;
                }
                let Some((folder, blake3)) = key.split_once('/') else { continue };
                let path = self.config.root.join(folder).join(CACHE_SUBDIR).join(format!("{blake3}.safetensors"));
                match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        tracing::warn!(file = %path.display(), error = %e, "could not evict a cached model");
                        continue;
                    }
                }
                if let Some(entry) = state.entries.remove(&key) {
                    state.used = state.used.saturating_sub(entry.size);
                    self.stats.evictions.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(file = %key, size = entry.size, "evicted from the model cache");
                }
            }
            state.by_sha256.retain(|_, key| state.entries.contains_key(key));
            state.by_url.retain(|_, key| state.entries.contains_key(key));
        }
        self.stats.used_bytes.store(state.used, Ordering::Relaxed);
        self.stats.files.store(state.entries.len() as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::safetensors::synthetic;
    use crate::net::destination::DestinationPolicy;
    use crate::net::fetch::FetchLimits;
    use std::sync::atomic::AtomicUsize;

    use axum::extract::Path as UrlPath;
    use axum::routing::get;

    /// A loopback file server of synthetic LoRAs (`/lora/{n}` is `n`'s file), counting
    /// requests per path, answering after `delay`.
    struct Files {
        base: String,
        hits: Arc<AtomicUsize>,
    }

    async fn files(size: usize, delay: Duration) -> Files {
        let hits = Arc::new(AtomicUsize::new(0));
        let counted = hits.clone();
        let app = axum::Router::new()
            .route(
                "/lora/{n}",
                get(move |UrlPath(n): UrlPath<u8>| {
                    let counted = counted.clone();
                    async move {
                        counted.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(delay).await;
                        synthetic(size, n)
                    }
                }),
            )
            .route("/jpeg", get(|| async { vec![0xffu8, 0xd8, 0xff, 0xe0, 0, 0, 0, 0, 0, 0] }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Files { base, hits }
    }

    fn cache(root: &Path, cap: u64) -> ModelCache {
        let fetcher = Fetcher::new(DestinationPolicy::new(["127.0.0.1".to_owned()]), FetchLimits::default()).unwrap();
        let config = CacheConfig { root: root.to_path_buf(), cap_bytes: cap, max_file_bytes: 1 << 20, fetch_timeout: Duration::from_secs(30) };
        ModelCache::open(config, fetcher, None, Arc::default()).unwrap()
    }

    fn lora(files: &Files, n: u8) -> ModelSource {
        ModelSource::Url(Url::parse(&format!("{}/lora/{n}", files.base)).unwrap())
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(20)
    }

    fn listed(root: &Path) -> Vec<String> {
        let mut names: Vec<String> =
            std::fs::read_dir(root.join("loras").join(CACHE_SUBDIR)).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn twenty_concurrent_requests_for_one_url_share_one_download_and_a_later_one_is_a_hit() {
        let files = files(50_000, Duration::from_millis(200)).await;
        let dir = tempfile::tempdir().unwrap();
        let cache = cache(dir.path(), 10 << 20);
        let source = lora(&files, 1);
        let expected = Expected::default();
        let placed = futures::future::join_all((0..20).map(|_| cache.place("loras", &source, &expected, soon()))).await;
        let placed: Vec<Pinned> = placed.into_iter().map(Result::unwrap).collect();
        assert_eq!(files.hits.load(Ordering::SeqCst), 1, "one download for twenty requests");
        let bytes = synthetic(50_000, 1);
        let blake3 = blake3::hash(&bytes).to_hex().to_string();
        assert!(placed.iter().all(|p| p.blake3 == blake3 && p.name == format!("flowhost-cache/{blake3}.safetensors")));
        assert_eq!(std::fs::read(dir.path().join("loras").join(&placed[0].name)).unwrap(), bytes);
        let again = cache.place("loras", &source, &Expected::default(), soon()).await.unwrap();
        assert!(again.hit);
        assert_eq!(files.hits.load(Ordering::SeqCst), 1, "a cache hit asks nothing");
        assert_eq!(cache.stats().hits.load(Ordering::Relaxed), 1);
        assert_eq!(cache.stats().misses.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn a_digest_names_cached_content_whatever_url_served_it() {
        let files = files(20_000, Duration::ZERO).await;
        let dir = tempfile::tempdir().unwrap();
        let cache = cache(dir.path(), 10 << 20);
        let bytes = synthetic(20_000, 2);
        let sha256 = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes));
        let first = cache.place("loras", &lora(&files, 2), &Expected { sha256: Some(sha256.clone()), blake3: None }, soon()).await.unwrap();
        let other_url = ModelSource::Url(Url::parse(&format!("{}/lora/2?mirror", files.base)).unwrap());
        let second = cache.place("loras", &other_url, &Expected { sha256: Some(sha256), blake3: None }, soon()).await.unwrap();
        assert!(second.hit && second.blake3 == first.blake3);
        assert_eq!(files.hits.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_hash_mismatch_and_a_file_that_is_no_safetensors_are_refused() {
        let files = files(20_000, Duration::ZERO).await;
        let dir = tempfile::tempdir().unwrap();
        let cache = cache(dir.path(), 10 << 20);
        let wrong = Expected { sha256: Some("0".repeat(64)), blake3: None };
        let error = cache.place("loras", &lora(&files, 3), &wrong, soon()).await.unwrap_err();
        assert!(matches!(&error, CacheError::HashMismatch { algorithm: "sha256", .. }), "{error:?}");
        assert!(listed(dir.path()).is_empty(), "bytes that are not what was named are not kept");
        let jpeg = ModelSource::Url(Url::parse(&format!("{}/jpeg", files.base)).unwrap());
        let error = cache.place("loras", &jpeg, &Expected::default(), soon()).await.unwrap_err();
        assert!(matches!(&error, CacheError::NotSafetensors(why) if why.starts_with("not a safetensors file")), "{error:?}");
        assert_eq!(std::fs::read_dir(dir.path().join(TEMP_DIR)).unwrap().count(), 0, "no partial file is left");
    }

    #[tokio::test]
    async fn eviction_keeps_the_cache_under_its_cap_and_never_removes_a_pinned_file() {
        let files = files(40_000, Duration::ZERO).await;
        let dir = tempfile::tempdir().unwrap();
        // Room for two files of ~40 kB.
        let cache = cache(dir.path(), 90_000);
        let one = cache.place("loras", &lora(&files, 1), &Expected::default(), soon()).await.unwrap();
        let two = cache.place("loras", &lora(&files, 2), &Expected::default(), soon()).await.unwrap();
        drop(two);
        // `one` is in use (pinned), `two` is not: the third evicts `two`, never `one`.
        let three = cache.place("loras", &lora(&files, 3), &Expected::default(), soon()).await.unwrap();
        assert_eq!(listed(dir.path()), {
            let mut v = vec![format!("{}.safetensors", one.blake3), format!("{}.safetensors", three.blake3)];
            v.sort();
            v
        });
        // With both pinned, a fourth puts the cache over its cap until a pin is released.
        let four = cache.place("loras", &lora(&files, 4), &Expected::default(), soon()).await.unwrap();
        assert_eq!(listed(dir.path()).len(), 3);
        assert!(cache.usage().0 > 90_000);
        let one_name = format!("{}.safetensors", one.blake3);
        drop(one);
        assert_eq!(listed(dir.path()).len(), 2, "released, the oldest goes");
        assert!(!listed(dir.path()).contains(&one_name));
        assert_eq!(cache.stats().evictions.load(Ordering::Relaxed), 2);
        drop((three, four));
    }

    #[tokio::test]
    async fn an_uploaded_blob_is_read_from_the_blob_store_by_its_hash_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let blobs_dir = tempfile::tempdir().unwrap();
        use crate::jobs::blobs::BlobStore as _;
        let store = Arc::new(crate::jobs::blobs::FsBlobStore::new(blobs_dir.path()).unwrap());
        let blobs: Arc<dyn AssetBytes> = Arc::new(crate::jobs::blobs::BlobAssets(store.clone()));
        let (lora, _) = store.put(bytes::Bytes::from(synthetic(30_000, 8))).await.unwrap();
        let (jpeg, _) = store.put(bytes::Bytes::from_static(b"\xff\xd8\xff\xe0 not a model")).await.unwrap();
        let fetcher = Fetcher::new(DestinationPolicy::default(), FetchLimits::default()).unwrap();
        let config = CacheConfig { root: dir.path().to_path_buf(), cap_bytes: 10 << 20, max_file_bytes: 1 << 20, fetch_timeout: Duration::from_secs(30) };
        let cache = ModelCache::open(config, fetcher, Some(blobs), Arc::default()).unwrap();
        let placed = cache.place("loras", &ModelSource::Blob(lora.clone()), &Expected::default(), soon()).await.unwrap();
        assert_eq!(format!("blake3:{}", placed.blake3), lora);
        assert!(cache.place("loras", &ModelSource::Blob(lora), &Expected::default(), soon()).await.unwrap().hit);
        let error = cache.place("loras", &ModelSource::Blob(jpeg), &Expected::default(), soon()).await.unwrap_err();
        assert!(matches!(error, CacheError::NotSafetensors(_)), "{error:?}");
        let missing = format!("blake3:{}", "0".repeat(64));
        assert_eq!(cache.place("loras", &ModelSource::Blob(missing), &Expected::default(), soon()).await.unwrap_err(), CacheError::BlobMissing);
    }

    #[tokio::test]
    async fn a_restart_keeps_finished_files_and_drops_partial_ones() {
        let files = files(20_000, Duration::ZERO).await;
        let dir = tempfile::tempdir().unwrap();
        let blake3 = {
            let cache = cache(dir.path(), 10 << 20);
            cache.place("loras", &lora(&files, 5), &Expected::default(), soon()).await.unwrap().blake3.clone()
        };
        // What a kill -9 mid-download leaves behind.
        std::fs::write(dir.path().join(TEMP_DIR).join("fetch-x.part"), b"half").unwrap();
        let cache = cache(dir.path(), 10 << 20);
        assert_eq!(std::fs::read_dir(dir.path().join(TEMP_DIR)).unwrap().count(), 0);
        let again = cache.place("loras", &lora(&files, 5), &Expected { blake3: Some(blake3), sha256: None }, soon()).await.unwrap();
        assert!(again.hit);
        assert_eq!(files.hits.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_waiter_past_its_deadline_gets_a_timeout_while_the_download_goes_on_for_others() {
        let files = files(20_000, Duration::from_millis(600)).await;
        let dir = tempfile::tempdir().unwrap();
        let cache = cache(dir.path(), 10 << 20);
        let source = lora(&files, 6);
        let expected = Expected::default();
        let patient = cache.place("loras", &source, &expected, soon());
        let hasty = cache.place("loras", &source, &expected, Instant::now() + Duration::from_millis(100));
        let (patient, hasty) = tokio::join!(patient, hasty);
        assert_eq!(hasty.unwrap_err(), CacheError::Deadline);
        assert!(!patient.unwrap().hit);
        assert_eq!(files.hits.load(Ordering::SeqCst), 1);
    }
}
