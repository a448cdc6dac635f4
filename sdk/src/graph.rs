//! A builder for ComfyUI API-format graphs (`{id: {"class_type", "inputs"}}`).
//!
//! Owns node-id allocation (deterministic: `"1"`, `"2"`, ... in the order nodes are
//! added) and the `["id", output]` link shape. It never checks node classes or input
//! names: that is the host's preflight against the live catalogue.
//!
//! ```
//! use flowhost_sdk::graph::Graph;
//! use serde_json::json;
//!
//! let mut g = Graph::new();
//! let image = g.node("EmptyImage", json!({"width": 64, "height": 64, "batch_size": 1, "color": 0}));
//! let save = g.node("SaveImage", json!({"images": image.out(0), "filename_prefix": "demo"}));
//! let workflow = g.into_json();
//! assert_eq!(workflow["2"]["inputs"]["images"], json!(["1", 0]));
//! assert_eq!(save.as_str(), "2");
//! ```

use serde::{Serialize, Serializer};
use serde_json::{Map, Value};

/// The id of a node in a [`Graph`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(String);

impl NodeId {
    /// A link to output `index` of this node (`["id", index]`).
    pub fn out(&self, index: u32) -> Link {
        Link {
            node: self.0.clone(),
            output: index,
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<NodeId> for String {
    fn from(id: NodeId) -> String {
        id.0
    }
}

/// A link to one output of a node; serializes as ComfyUI's `["id", index]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Link {
    pub node: String,
    pub output: u32,
}

impl Serialize for Link {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        (&self.node, self.output).serialize(serializer)
    }
}

impl From<Link> for Value {
    fn from(link: Link) -> Value {
        Value::Array(vec![Value::String(link.node), Value::from(link.output)])
    }
}

/// A ComfyUI API-format graph under construction.
#[derive(Debug, Clone, Default)]
pub struct Graph {
    nodes: Map<String, Value>,
    next_id: u64,
}

impl Graph {
    pub fn new() -> Self {
        Self {
            nodes: Map::new(),
            next_id: 1,
        }
    }

    /// Add a node of `class_type` with `inputs` (a JSON object; links as
    /// [`NodeId::out`]). Returns its id, the next free number.
    pub fn node(&mut self, class_type: &str, inputs: Value) -> NodeId {
        let mut id = self.next_id;
        while self.nodes.contains_key(&id.to_string()) {
            id += 1;
        }
        self.next_id = id + 1;
        let id = id.to_string();
        self.nodes.insert(id.clone(), json_node(class_type, inputs));
        NodeId(id)
    }

    /// Set (or replace) one input of an existing node. Does nothing for an unknown node.
    pub fn set_input(&mut self, node: &NodeId, name: &str, value: impl Into<Value>) {
        if let Some(inputs) = self
            .nodes
            .get_mut(node.as_str())
            .and_then(|n| n.get_mut("inputs"))
            .and_then(Value::as_object_mut)
        {
            inputs.insert(name.to_string(), value.into());
        }
    }

    /// One input of a node, if both exist.
    pub fn input(&self, node: &NodeId, name: &str) -> Option<&Value> {
        self.nodes.get(node.as_str())?.get("inputs")?.get(name)
    }

    /// The class of a node, if it exists.
    pub fn class_type(&self, node: &NodeId) -> Option<&str> {
        self.nodes.get(node.as_str())?.get("class_type")?.as_str()
    }

    /// Ids of every node, in insertion order.
    pub fn ids(&self) -> Vec<String> {
        self.nodes.keys().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The graph as a JSON value.
    pub fn into_json(self) -> Value {
        Value::Object(self.nodes)
    }

    /// The graph as JSON text (what `Job.workflow` carries).
    /// The models this graph loads (see [`crate::hints::model_set_of`]).
    pub fn model_set(&self) -> crate::ModelSet {
        crate::hints::model_set_of(&self.nodes)
    }

    /// The sampler nodes and their steps (see [`crate::hints::sampler_progress_of`]).
    pub fn sampler_progress(&self) -> Vec<crate::SamplerProgress> {
        crate::hints::sampler_progress_of(&self.nodes)
    }

    pub fn to_json_string(&self) -> String {
        // Serializing a `Map<String, Value>` cannot fail.
        serde_json::to_string(&self.nodes).unwrap_or_default()
    }
}

impl std::fmt::Display for Graph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_json_string())
    }
}

fn json_node(class_type: &str, inputs: Value) -> Value {
    let mut node = Map::new();
    node.insert("class_type".into(), Value::String(class_type.to_string()));
    node.insert("inputs".into(), inputs);
    Value::Object(node)
}

/// If `value` is a ComfyUI link (`["id", n]`), its parts.
pub fn as_link(value: &Value) -> Option<(&str, u64)> {
    match value.as_array()?.as_slice() {
        [Value::String(id), Value::Number(n)] => Some((id.as_str(), n.as_u64()?)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn node_ids_count_up_from_one_in_insertion_order() {
        let mut g = Graph::new();
        let a = g.node("A", json!({}));
        let b = g.node("B", json!({"x": a.out(2)}));
        assert_eq!((a.as_str(), b.as_str()), ("1", "2"));
        assert_eq!(g.ids(), vec!["1", "2"]);
        assert_eq!(g.input(&b, "x"), Some(&json!(["1", 2])));
    }

    #[test]
    fn the_same_building_steps_give_the_same_text() {
        let build = || {
            let mut g = Graph::new();
            let a = g.node("A", json!({"v": 1}));
            g.node("B", json!({"in": a.out(0)}));
            g.to_json_string()
        };
        assert_eq!(build(), build());
        assert_eq!(
            build(),
            r#"{"1":{"class_type":"A","inputs":{"v":1}},"2":{"class_type":"B","inputs":{"in":["1",0]}}}"#
        );
    }

    #[test]
    fn set_input_replaces_and_adds_inputs() {
        let mut g = Graph::new();
        let a = g.node("A", json!({"v": 1}));
        let b = g.node("B", json!({"v": 1}));
        g.set_input(&b, "v", 2);
        g.set_input(&b, "link", a.out(1));
        assert_eq!(g.input(&b, "v"), Some(&json!(2)));
        assert_eq!(g.input(&b, "link"), Some(&json!(["1", 1])));
        assert_eq!(g.class_type(&b), Some("B"));
        assert_eq!(g.class_type(&NodeId("9".into())), None);
    }

    #[test]
    fn as_link_recognises_only_id_index_pairs() {
        assert_eq!(as_link(&json!(["4", 1])), Some(("4", 1)));
        assert_eq!(as_link(&json!([4, 1])), None);
        assert_eq!(as_link(&json!(["4"])), None);
        assert_eq!(as_link(&json!("4")), None);
    }
}
