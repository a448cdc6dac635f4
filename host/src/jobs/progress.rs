//! Turning ComfyUI's per-node events into one job-wide progress snapshot, weighted
//! by node count and sampler steps: every node weighs 1, a node with a `steps`
//! input weighs 1 + steps (sampling is where the time goes). Pure computation.

use std::collections::{HashMap, HashSet};

use flowhost_comfy::Progress as ComfyProgress;
use serde_json::{Map, Value};

use super::model::Progress;

/// Progress state of one running prompt.
#[derive(Debug, Clone)]
pub struct ProgressTracker {
    weights: HashMap<String, f64>,
    classes: HashMap<String, String>,
    total: f64,
    done: HashSet<String>,
    current: Option<String>,
    step: Option<(f64, f64)>,
}

impl ProgressTracker {
    pub fn new(graph: &Map<String, Value>) -> Self {
        let mut weights = HashMap::new();
        let mut classes = HashMap::new();
        for (id, node) in graph {
            let steps = node.pointer("/inputs/steps").and_then(Value::as_f64).unwrap_or(0.0).clamp(0.0, 10_000.0);
            weights.insert(id.clone(), 1.0 + steps);
            if let Some(class) = node.get("class_type").and_then(Value::as_str) {
                classes.insert(id.clone(), class.to_string());
            }
        }
        let total = weights.values().sum::<f64>().max(1.0);
        ProgressTracker { weights, classes, total, done: HashSet::new(), current: None, step: None }
    }

    /// Apply one event; returns the new snapshot.
    pub fn apply(&mut self, event: &ComfyProgress) -> Progress {
        match event {
            ComfyProgress::Started => {}
            ComfyProgress::Node { node_id } => {
                if let Some(previous) = self.current.replace(node_id.clone()) {
                    self.done.insert(previous);
                }
                self.step = None;
            }
            ComfyProgress::Step { node_id, value, max } => {
                if let Some(node) = node_id
                    && self.current.as_ref() != Some(node)
                {
                    if let Some(previous) = self.current.replace(node.clone()) {
                        self.done.insert(previous);
                    }
                }
                self.step = Some((*value, *max));
            }
        }
        self.snapshot()
    }

    pub fn snapshot(&self) -> Progress {
        let weight = |id: &str| self.weights.get(id).copied().unwrap_or(1.0);
        let mut done: f64 = self.done.iter().map(|id| weight(id)).sum();
        if let (Some(current), Some((value, max))) = (&self.current, self.step)
            && max > 0.0
        {
            done += weight(current) * (value / max).clamp(0.0, 1.0);
        }
        let class = self.current.as_ref().and_then(|c| self.classes.get(c)).cloned();
        let (step, steps) = match self.step {
            Some((v, m)) if m > 0.0 => (Some(v.max(0.0) as u32), Some(m as u32)),
            _ => (None, None),
        };
        let message = match (&class, step, steps) {
            (Some(class), Some(step), Some(steps)) => Some(format!("{class} {step}/{steps}")),
            (Some(class), _, _) => Some(class.clone()),
            _ => None,
        };
        Progress {
            value: (done / self.total).clamp(0.0, 0.999),
            nodes_done: self.done.len() as u32,
            nodes_total: self.weights.len() as u32,
            current_node: self.current.clone(),
            current_node_class: class,
            step,
            steps,
            message,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sampler_steps_weigh_more_than_other_nodes() {
        let graph = json!({
            "1": {"class_type": "EmptyLatentImage", "inputs": {}},
            "2": {"class_type": "KSampler", "inputs": {"steps": 8}},
            "3": {"class_type": "SaveImage", "inputs": {}}
        });
        let mut t = ProgressTracker::new(graph.as_object().unwrap());
        t.apply(&ComfyProgress::Node { node_id: "1".into() });
        t.apply(&ComfyProgress::Node { node_id: "2".into() });
        let half = t.apply(&ComfyProgress::Step { node_id: Some("2".into()), value: 4.0, max: 8.0 });
        // done: node 1 (1) + half of node 2 (9 / 2) out of 1 + 9 + 1.
        assert!((half.value - 5.5 / 11.0).abs() < 1e-9, "{half:?}");
        assert_eq!(half.message.as_deref(), Some("KSampler 4/8"));
        assert_eq!((half.nodes_done, half.nodes_total), (1, 3));
        let later = t.apply(&ComfyProgress::Node { node_id: "3".into() });
        assert!(later.value > half.value);
    }
}
