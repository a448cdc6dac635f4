//! The dispatch rule, as one pure function: which queued job a free worker takes, given
//! the model set it has loaded. Every queue implementation (the in-memory
//! [`super::queue::LocalQueue`], a shared SQL queue over the rows it locked) calls
//! [`pick`], so the rule is the same wherever jobs wait.
//!
//! Why affinity: ComfyUI re-patches (or reloads) the model when the next prompt's model
//! set differs from the last one's — 9–22 s on an H200 for a LoRA change. A worker that
//! takes the oldest job *of the set it already has* skips that; a bound on how long any
//! job may be passed over keeps everyone else from starving.
//!
//! Must never: look at a clock, a lock or I/O (callers pass `now`), or pass over a job
//! that has waited longer than the bound.

use std::time::{Duration, SystemTime};

use uuid::Uuid;

use crate::plugins::ModelSet;

/// How a free worker chooses among queued jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DispatchPolicy {
    /// Oldest first, whatever the worker has loaded.
    Fifo,
    /// Oldest job of the worker's loaded model set first, unless a job has waited past the bound.
    #[default]
    Affinity,
}

impl DispatchPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            DispatchPolicy::Fifo => "fifo",
            DispatchPolicy::Affinity => "affinity",
        }
    }
}

impl std::str::FromStr for DispatchPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "fifo" => Ok(DispatchPolicy::Fifo),
            "affinity" => Ok(DispatchPolicy::Affinity),
            other => Err(format!("unknown dispatch policy {other:?}: expected fifo or affinity")),
        }
    }
}

/// The dispatch settings a queue applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DispatchRule {
    pub policy: DispatchPolicy,
    /// A job queued longer than this is taken next by any free worker (no starvation).
    pub wait_bound: Duration,
}

impl Default for DispatchRule {
    fn default() -> Self {
        DispatchRule { policy: DispatchPolicy::Affinity, wait_bound: DEFAULT_WAIT_BOUND }
    }
}

/// `--affinity-wait-bound` default.
pub const DEFAULT_WAIT_BOUND: Duration = Duration::from_secs(30);

/// One queued job as the rule sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub id: Uuid,
    /// The job's model key ([`model_key`]); `None`: the job loads no
    /// model, so it costs no switch on any worker.
    pub model_key: Option<String>,
    /// When the job entered the queue (its creation time: a requeued job keeps its age).
    pub queued_at: SystemTime,
}

/// The index in `candidates` of the job a worker with `loaded` should run next; `None`
/// when there is none for it. Ties in age go to the earlier index (queue order).
///
/// - `Fifo`: the oldest.
/// - `Affinity`: the oldest if it has waited longer than the bound at `now`; else the
///   oldest whose model key equals `loaded` or that loads no model; else the oldest job
///   no *other idle* worker has loaded (`idle_elsewhere`: the model keys of the workers
///   waiting for work besides this one) — that one takes it without a switch, so this
///   worker waits rather than switch for nothing. Pass `&[]` when idle workers are not
///   known (the rule then only loses that refinement).
pub fn pick(candidates: &[Candidate], loaded: Option<&str>, idle_elsewhere: &[&str], now: SystemTime, rule: DispatchRule) -> Option<usize> {
    let oldest = oldest_of(candidates.iter().enumerate())?;
    if rule.policy == DispatchPolicy::Fifo {
        return Some(oldest);
    }
    let waited = now.duration_since(candidates[oldest].queued_at).unwrap_or_default();
    if waited > rule.wait_bound {
        return Some(oldest);
    }
    let hits = candidates.iter().enumerate().filter(|(_, c)| is_hit(c.model_key.as_deref(), loaded));
    if let Some(hit) = oldest_of(hits) {
        return Some(hit);
    }
    let free = candidates.iter().enumerate().filter(|(_, c)| !c.model_key.as_deref().is_some_and(|k| idle_elsewhere.contains(&k)));
    oldest_of(free)
}

fn oldest_of<'a>(candidates: impl Iterator<Item = (usize, &'a Candidate)>) -> Option<usize> {
    candidates.min_by_key(|(i, c)| (c.queued_at, *i)).map(|(i, _)| i)
}

/// The stable key of a model set: a hash of its normalized form (base, LoRAs with their
/// strengths, other loaders — each sorted, so node order does not matter). Two jobs with
/// the same key run on a worker without a model switch. `None`: the set is empty.
/// Strengths are rounded to 1/1000 (ComfyUI re-patches on any change, but a float
/// printed two ways must not split one set in two).
pub fn model_key(set: &ModelSet) -> Option<String> {
    if set.base.is_none() && set.loras.is_empty() && set.others.is_empty() {
        return None;
    }
    let mut loras: Vec<String> =
        set.loras.iter().map(|l| format!("{}/{}@{:.3},{:.3}", l.model.folder, l.model.name, l.strength_model, l.strength_clip)).collect();
    loras.sort();
    let mut others: Vec<String> = set.others.iter().map(|m| format!("{}/{}", m.folder, m.name)).collect();
    others.sort();
    others.dedup();
    let base = set.base.as_ref().map(|m| format!("{}/{}", m.folder, m.name)).unwrap_or_default();
    let normalized = format!("base={base}\nloras={}\nothers={}", loras.join(";"), others.join(";"));
    let hash = blake3::hash(normalized.as_bytes()).to_hex();
    Some(format!("ms1-{}", &hash[..32]))
}

/// The set in words: `flux1-dev.safetensors + character-123.safetensors@0.8`.
pub fn model_label(set: &ModelSet) -> Option<String> {
    let mut parts: Vec<String> = set.base.iter().map(|m| m.name.clone()).collect();
    parts.extend(set.loras.iter().map(|l| format!("{}@{}", l.model.name, l.strength_model)));
    if parts.is_empty() {
        return None;
    }
    let mut label = parts.join(" + ");
    if label.len() > 200 {
        let cut = (0..=200).rev().find(|i| label.is_char_boundary(*i)).unwrap_or(0);
        label.truncate(cut);
        label.push('…');
    }
    Some(label)
}

/// Whether running a job with `job_key` on a worker with `loaded` is an affinity hit
/// (no model switch): same set, or a job that loads none.
pub fn is_hit(job_key: Option<&str>, loaded: Option<&str>) -> bool {
    match (job_key, loaded) {
        (None, _) => true,
        (Some(job), Some(loaded)) => job == loaded,
        (Some(_), None) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t0: SystemTime, s: u64) -> SystemTime {
        t0 + Duration::from_secs(s)
    }

    fn c(t0: SystemTime, s: u64, key: Option<&str>) -> Candidate {
        Candidate { id: Uuid::new_v4(), model_key: key.map(str::to_string), queued_at: at(t0, s) }
    }

    const AFFINITY: DispatchRule = DispatchRule { policy: DispatchPolicy::Affinity, wait_bound: Duration::from_secs(30) };

    #[test]
    fn nothing_queued_picks_nothing() {
        assert_eq!(pick(&[], Some("a"), &[], SystemTime::now(), AFFINITY), None);
    }

    #[test]
    fn affinity_takes_the_oldest_job_of_the_loaded_set() {
        let t0 = SystemTime::UNIX_EPOCH;
        let q = [c(t0, 0, Some("b")), c(t0, 1, Some("a")), c(t0, 2, Some("b")), c(t0, 3, Some("a"))];
        assert_eq!(pick(&q, Some("a"), &[], at(t0, 5), AFFINITY), Some(1));
        assert_eq!(pick(&q, Some("b"), &[], at(t0, 5), AFFINITY), Some(0));
        let fifo = DispatchRule { policy: DispatchPolicy::Fifo, ..AFFINITY };
        assert_eq!(pick(&q, Some("a"), &[], at(t0, 5), fifo), Some(0), "fifo ignores what is loaded");
    }

    #[test]
    fn a_worker_with_nothing_loaded_or_no_match_takes_the_oldest() {
        let t0 = SystemTime::UNIX_EPOCH;
        let q = [c(t0, 4, Some("b")), c(t0, 2, Some("c")), c(t0, 3, Some("b"))];
        assert_eq!(pick(&q, None, &[], at(t0, 5), AFFINITY), Some(1), "by age, not by index");
        assert_eq!(pick(&q, Some("a"), &[], at(t0, 5), AFFINITY), Some(1));
    }

    #[test]
    fn a_job_another_idle_worker_has_loaded_is_left_to_it() {
        let t0 = SystemTime::UNIX_EPOCH;
        let q = [c(t0, 0, Some("b")), c(t0, 1, Some("c"))];
        assert_eq!(pick(&q, Some("a"), &["b"], at(t0, 5), AFFINITY), Some(1), "b waits for the idle worker that has b");
        assert_eq!(pick(&q[..1], Some("a"), &["b"], at(t0, 5), AFFINITY), None, "nothing for this worker: it waits");
        assert_eq!(pick(&q[..1], Some("a"), &["b"], at(t0, 31), AFFINITY), Some(0), "past the bound any free worker takes it");
        assert_eq!(pick(&q, Some("b"), &["b"], at(t0, 5), AFFINITY), Some(0), "a worker with the set itself takes it");
    }

    #[test]
    fn a_job_that_loads_no_model_matches_every_worker() {
        let t0 = SystemTime::UNIX_EPOCH;
        let q = [c(t0, 0, Some("b")), c(t0, 1, None), c(t0, 2, Some("a"))];
        assert_eq!(pick(&q, Some("a"), &[], at(t0, 5), AFFINITY), Some(1));
        assert!(is_hit(None, Some("a")) && is_hit(None, None) && is_hit(Some("a"), Some("a")));
        assert!(!is_hit(Some("a"), None) && !is_hit(Some("a"), Some("b")));
    }

    #[test]
    fn wait_bound_obeyed() {
        // The oldest (b) has waited exactly the bound: not yet overdue, the loaded set wins.
        let t0 = SystemTime::UNIX_EPOCH;
        let q = [c(t0, 0, Some("b")), c(t0, 10, Some("a"))];
        assert_eq!(pick(&q, Some("a"), &[], at(t0, 30), AFFINITY), Some(1));
    }

    #[test]
    fn wait_bound_violated() {
        // Past the bound the oldest job goes first even though it costs a switch.
        let t0 = SystemTime::UNIX_EPOCH;
        let q = [c(t0, 0, Some("b")), c(t0, 10, Some("a"))];
        assert_eq!(pick(&q, Some("a"), &[], at(t0, 31), AFFINITY), Some(0));
    }

    #[test]
    fn equal_ages_keep_queue_order() {
        let t0 = SystemTime::UNIX_EPOCH;
        let q = [c(t0, 1, Some("a")), c(t0, 1, Some("a"))];
        assert_eq!(pick(&q, Some("a"), &[], at(t0, 2), AFFINITY), Some(0));
        assert_eq!(pick(&q, None, &[], at(t0, 2), AFFINITY), Some(0));
    }

    fn set(workflow: serde_json::Value) -> ModelSet {
        ModelSet::inferred_from_workflow(workflow.as_object().unwrap())
    }

    #[test]
    fn the_model_key_ignores_node_order_and_follows_loras_and_strengths() {
        let one = set(serde_json::json!({
            "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-dev.safetensors"}},
            "2": {"class_type": "LoraLoaderModelOnly", "inputs": {"lora_name": "a.safetensors", "strength_model": 0.8}},
            "3": {"class_type": "LoraLoaderModelOnly", "inputs": {"lora_name": "b.safetensors", "strength_model": 1.0}},
        }));
        let reordered = set(serde_json::json!({
            "9": {"class_type": "LoraLoaderModelOnly", "inputs": {"lora_name": "b.safetensors", "strength_model": 1.0}},
            "7": {"class_type": "LoraLoaderModelOnly", "inputs": {"lora_name": "a.safetensors", "strength_model": 0.8000000001}},
            "8": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-dev.safetensors"}},
        }));
        let other_strength = set(serde_json::json!({
            "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-dev.safetensors"}},
            "2": {"class_type": "LoraLoaderModelOnly", "inputs": {"lora_name": "a.safetensors", "strength_model": 0.5}},
            "3": {"class_type": "LoraLoaderModelOnly", "inputs": {"lora_name": "b.safetensors", "strength_model": 1.0}},
        }));
        let no_lora = set(serde_json::json!({"1": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-dev.safetensors"}}}));
        let key = model_key(&one).unwrap();
        assert_eq!(model_key(&reordered).as_deref(), Some(key.as_str()));
        assert_ne!(model_key(&other_strength).as_deref(), Some(key.as_str()));
        assert_ne!(model_key(&no_lora).as_deref(), Some(key.as_str()));
        assert_eq!(model_key(&set(serde_json::json!({"1": {"class_type": "EmptyImage", "inputs": {}}}))), None);
        assert_eq!(model_label(&one).unwrap(), "flux1-dev.safetensors + a.safetensors@0.8 + b.safetensors@1");
    }

    #[test]
    fn policies_parse_by_name() {
        assert_eq!("fifo".parse::<DispatchPolicy>(), Ok(DispatchPolicy::Fifo));
        assert_eq!("affinity".parse::<DispatchPolicy>(), Ok(DispatchPolicy::Affinity));
        assert!("random".parse::<DispatchPolicy>().unwrap_err().contains("fifo or affinity"));
    }
}
