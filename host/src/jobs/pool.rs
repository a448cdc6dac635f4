//! The ComfyUI workers behind one service: one [`ComfyWorker`] per ComfyUI process
//! (`--comfyui-url` repeated, one supervised ComfyUI per GPU, or `--simulate --workers N`).
//! A worker knows its backend and the model set it has loaded (the set of the last job
//! dispatched to it), which is what affinity dispatch asks the queue for.
//!
//! Must never: decide which job runs next (that is [`super::affinity::pick`] via the
//! queue), or name a worker by anything but its index (`w0`, `w1`, … — labels of
//! metrics and `/health` stay bounded and leak no host or port).

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use flowhost_comfy::{BackendHealth, ComfyBackend};
use serde_json::{Value, json};

use super::lock;

/// One ComfyUI process and what flowhost knows it has loaded.
pub struct ComfyWorker {
    /// `w0`, `w1`, …: the worker's name in metrics, logs and `/health`.
    pub name: String,
    pub backend: Arc<ComfyBackend>,
    /// The GPU it was started on (`--gpus`), when flowhost spawned it.
    pub gpu: Option<String>,
    loaded: Mutex<Option<Loaded>>,
    jobs: AtomicU64,
    switches: AtomicU64,
    hits: AtomicU64,
}

#[derive(Clone)]
struct Loaded {
    key: String,
    label: Option<String>,
}

/// What a dispatch did to a worker's model state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dispatch {
    /// The job's model set is the loaded one (or it loads none): no switch.
    Hit,
    /// The worker must load another model set.
    Switch,
}

impl ComfyWorker {
    pub fn new(index: usize, backend: Arc<ComfyBackend>, gpu: Option<String>) -> Self {
        ComfyWorker {
            name: format!("w{index}"),
            backend,
            gpu,
            loaded: Mutex::new(None),
            jobs: AtomicU64::new(0),
            switches: AtomicU64::new(0),
            hits: AtomicU64::new(0),
        }
    }

    /// The model key of the last job dispatched here (what ComfyUI has loaded).
    pub fn loaded_key(&self) -> Option<String> {
        lock(&self.loaded).as_ref().map(|l| l.key.clone())
    }

    /// A job with `key` was dispatched here: count it and remember its set.
    /// A job that loads no model leaves the loaded set as it was.
    pub fn dispatched(&self, key: Option<&str>, label: Option<&str>) -> Dispatch {
        self.jobs.fetch_add(1, Ordering::Relaxed);
        let Some(key) = key else {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Dispatch::Hit;
        };
        let mut loaded = lock(&self.loaded);
        if loaded.as_ref().is_some_and(|l| l.key == key) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Dispatch::Hit;
        }
        *loaded = Some(Loaded { key: key.to_string(), label: label.map(str::to_string) });
        self.switches.fetch_add(1, Ordering::Relaxed);
        Dispatch::Switch
    }

    /// `/health`'s view of this worker.
    pub fn describe(&self) -> Value {
        let health = self.backend.health();
        let (status, reason) = match &health {
            BackendHealth::Starting => ("starting", None),
            BackendHealth::Ready { .. } => ("ready", None),
            BackendHealth::Degraded { reason } => ("degraded", Some(super::failure::public_reason(reason))),
            BackendHealth::Down { reason } => ("down", Some(super::failure::public_reason(reason))),
        };
        let loaded = lock(&self.loaded).clone();
        let mut v = json!({
            "name": self.name,
            "status": status,
            "jobs": self.jobs.load(Ordering::Relaxed),
            "model_switches": self.switches.load(Ordering::Relaxed),
            "affinity_hits": self.hits.load(Ordering::Relaxed),
            "loaded_models": loaded.as_ref().and_then(|l| l.label.clone()),
            "loaded_model_key": loaded.map(|l| l.key),
        });
        if let Some(reason) = reason {
            v["reason"] = Value::from(reason);
        }
        if let Some(gpu) = &self.gpu {
            v["gpu"] = Value::from(gpu.clone());
        }
        v
    }
}

/// The workers of one service (possibly none: `?dry_run=true` only).
#[derive(Default)]
pub struct WorkerPool {
    workers: Vec<Arc<ComfyWorker>>,
}

impl WorkerPool {
    pub fn new(backends: Vec<(Arc<ComfyBackend>, Option<String>)>) -> Self {
        WorkerPool { workers: backends.into_iter().enumerate().map(|(i, (b, gpu))| Arc::new(ComfyWorker::new(i, b, gpu))).collect() }
    }

    pub fn workers(&self) -> &[Arc<ComfyWorker>] {
        &self.workers
    }

    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// The backend that speaks for the pool (validation, the node catalogue, overall
    /// health): the first serving worker, else the first one starting, else the first.
    pub fn primary(&self) -> Option<&Arc<ComfyBackend>> {
        let serving = self.workers.iter().find(|w| w.backend.health().is_serving());
        let starting = || self.workers.iter().find(|w| matches!(w.backend.health(), BackendHealth::Starting));
        serving.or_else(starting).or(self.workers.first()).map(|w| &w.backend)
    }

    /// Whether some worker other than `except` can take prompts now.
    pub fn another_is_serving(&self, except: &str) -> bool {
        self.workers.iter().any(|w| w.name != except && w.backend.health().is_serving())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_switch_is_counted_only_when_the_set_changes() {
        let url = url::Url::parse("http://127.0.0.1:9").unwrap();
        let backend = ComfyBackend::start(flowhost_comfy::BackendConfig::new(flowhost_comfy::BackendMode::Url(url))).await.unwrap();
        let w = ComfyWorker::new(0, backend, None);
        assert_eq!(w.dispatched(Some("a"), Some("A")), Dispatch::Switch, "the first load is a switch");
        assert_eq!(w.dispatched(Some("a"), Some("A")), Dispatch::Hit);
        assert_eq!(w.dispatched(None, None), Dispatch::Hit, "a job without models keeps what is loaded");
        assert_eq!(w.loaded_key().as_deref(), Some("a"));
        assert_eq!(w.dispatched(Some("b"), Some("B")), Dispatch::Switch);
        let d = w.describe();
        assert_eq!((d["jobs"].as_u64(), d["model_switches"].as_u64(), d["affinity_hits"].as_u64()), (Some(4), Some(2), Some(2)));
        assert_eq!(d["loaded_models"], "B");
        assert_eq!(d["name"], "w0");
    }
}
