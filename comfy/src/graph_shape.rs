//! The shape of an API-format graph, checked before anything walks it recursively (ComfyUI's own
//! validation recurses once per link, so a 1,000-node chain exhausts Python's recursion limit and a
//! cycle is only reported as a `RecursionError` naming no node): a bounded node count, a bounded
//! depth (the longest chain of links), and no cycles — a cycle is reported naming its nodes.
//!
//! Every walk here is iterative (explicit stacks), so no graph can overflow the stack. This module
//! knows nothing of node classes; it must never reject a graph for what its nodes are, only for how
//! they are linked.

use std::collections::HashMap;

use serde_json::{Map, Value};

use crate::error::NodeIssue;

/// Most nodes a graph may have. Real workflows have tens to a few hundred.
pub const MAX_NODES: usize = 5_000;
/// Longest chain of links (in nodes) a graph may have: well under the ~1,000 Python frames at which
/// ComfyUI's recursive validation fails with a `RecursionError`.
pub const MAX_DEPTH: usize = 500;
/// Most node ids named when reporting a cycle (the rest are counted).
const CYCLE_NAMED: usize = 20;

/// The source node id of a link value (`["4", 0]`), if `value` is a link to a node of `nodes`.
fn link_source<'g>(nodes: &'g Map<String, Value>, value: &Value) -> Option<&'g str> {
    let arr = value.as_array().filter(|a| a.len() == 2)?;
    let source = match &arr[0] {
        Value::String(s) => s.clone(),
        Value::Number(n) if n.is_u64() => n.to_string(),
        _ => return None,
    };
    nodes.get_key_value(source.as_str()).map(|(k, _)| k.as_str())
}

fn sources<'g>(nodes: &'g Map<String, Value>, node: &'g Value) -> Vec<&'g str> {
    node.get("inputs")
        .and_then(Value::as_object)
        .map(|inputs| inputs.values().filter_map(|v| link_source(nodes, v)).collect())
        .unwrap_or_default()
}

fn issue(node_id: &str, class_type: &str, kind: &str, message: String) -> NodeIssue {
    NodeIssue { node_id: node_id.to_string(), class_type: class_type.to_string(), kind: kind.to_string(), input_name: None, message }
}

fn class_of<'g>(nodes: &'g Map<String, Value>, id: &str) -> &'g str {
    nodes.get(id).and_then(|n| n.get("class_type")).and_then(Value::as_str).unwrap_or_default()
}

/// Check the graph's size, depth and acyclicity. `Err` holds one issue: the first limit broken.
pub fn check(graph: &Value) -> Result<(), Vec<NodeIssue>> {
    check_size(graph)?;
    check_links(graph)
}

/// The node count alone (cheap: before any per-node work).
pub fn check_size(graph: &Value) -> Result<(), Vec<NodeIssue>> {
    match graph.as_object() {
        Some(nodes) if nodes.len() > MAX_NODES => Err(vec![issue(
            "",
            "",
            "graph_too_large",
            format!("the workflow has {} nodes; at most {MAX_NODES} are accepted", nodes.len()),
        )]),
        _ => Ok(()),
    }
}

/// Depth and cycles over the links (each link followed whatever its type or slot: a link ComfyUI
/// would refuse for its slot is reported by the per-node checks, which run first when there is a
/// catalogue).
pub fn check_links(graph: &Value) -> Result<(), Vec<NodeIssue>> {
    let Some(nodes) = graph.as_object() else { return Ok(()) };
    // Iterative depth-first walk over links (node → its sources). `depth[id]` is the longest chain
    // of nodes starting at `id`, known once all its sources are done; a source still on the path
    // closes a cycle.
    let ids: Vec<&str> = nodes.keys().map(String::as_str).collect();
    let mut depth: HashMap<&str, usize> = HashMap::with_capacity(ids.len());
    let mut on_path: HashMap<&str, usize> = HashMap::new();
    for &root in &ids {
        if depth.contains_key(root) {
            continue;
        }
        // (node, its sources, next source to visit)
        let mut path: Vec<(&str, Vec<&str>, usize)> = vec![(root, sources(nodes, &nodes[root]), 0)];
        on_path.insert(root, 0);
        while let Some((id, srcs, next)) = path.last_mut() {
            if let Some(&src) = srcs.get(*next) {
                *next += 1;
                if depth.contains_key(src) {
                    continue;
                }
                if let Some(&at) = on_path.get(src) {
                    let cycle: Vec<&str> = path[at..].iter().map(|(n, _, _)| *n).collect();
                    return Err(vec![cycle_issue(nodes, &cycle)]);
                }
                on_path.insert(src, path.len());
                let s = sources(nodes, &nodes[src]);
                path.push((src, s, 0));
                continue;
            }
            let id = *id;
            let d = 1 + srcs.iter().filter_map(|s| depth.get(s)).max().copied().unwrap_or(0);
            if d > MAX_DEPTH {
                return Err(vec![issue(
                    id,
                    class_of(nodes, id),
                    "graph_too_deep",
                    format!("node {id} ends a chain of more than {MAX_DEPTH} linked nodes; at most {MAX_DEPTH} are accepted"),
                )]);
            }
            depth.insert(id, d);
            on_path.remove(id);
            path.pop();
        }
    }
    Ok(())
}

/// The issue for a cycle `cycle[0] → … → cycle[n-1] → cycle[0]` (each node links to the next as its
/// source), reported on the cycle's first node.
fn cycle_issue(nodes: &Map<String, Value>, cycle: &[&str]) -> NodeIssue {
    let mut named: Vec<String> = cycle.iter().take(CYCLE_NAMED).map(|n| n.to_string()).collect();
    if cycle.len() > CYCLE_NAMED {
        named.push(format!("… ({} more)", cycle.len() - CYCLE_NAMED));
    }
    named.push(cycle[0].to_string());
    issue(
        cycle[0],
        class_of(nodes, cycle[0]),
        "graph_cycle",
        format!("the workflow has a cycle: node {} depends on itself through its inputs; ComfyUI cannot run it", named.join(" → ")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn chain(n: usize) -> Value {
        let mut g = Map::new();
        g.insert("0".into(), json!({"class_type": "EmptyLatentImage", "inputs": {}}));
        for i in 1..n {
            g.insert(i.to_string(), json!({"class_type": "X", "inputs": {"samples": [(i - 1).to_string(), 0]}}));
        }
        Value::Object(g)
    }

    #[test]
    fn graph_depth_limit_obeyed() {
        assert_eq!(check(&chain(MAX_DEPTH)), Ok(()));
    }

    #[test]
    fn graph_depth_limit_violated() {
        let issues = check(&chain(MAX_DEPTH + 1)).unwrap_err();
        assert_eq!(issues[0].kind, "graph_too_deep");
        assert_eq!(issues[0].node_id, MAX_DEPTH.to_string());
    }

    #[test]
    fn hundred_thousand_node_chain_is_refused_without_overflowing() {
        let issues = check(&chain(100_000)).unwrap_err();
        assert_eq!(issues[0].kind, "graph_too_large");
    }

    #[test]
    fn graph_size_limit_obeyed_and_violated() {
        let mut g = Map::new();
        for i in 0..MAX_NODES {
            g.insert(i.to_string(), json!({"class_type": "X", "inputs": {}}));
        }
        assert_eq!(check(&Value::Object(g.clone())), Ok(()));
        g.insert("extra".into(), json!({"class_type": "X", "inputs": {}}));
        assert_eq!(check(&Value::Object(g)).unwrap_err()[0].kind, "graph_too_large");
    }

    #[test]
    fn a_cycle_is_named() {
        let g = json!({
            "1": {"class_type": "SaveImage", "inputs": {"images": ["2", 0]}},
            "2": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0]}},
            "3": {"class_type": "KSampler", "inputs": {"latent_image": ["2", 0]}},
        });
        let issues = check(&g).unwrap_err();
        assert_eq!(issues[0].kind, "graph_cycle");
        assert!(issues[0].message.contains("2 → 3 → 2"), "{}", issues[0].message);
        assert_eq!(issues[0].class_type, "VAEDecode");
    }

    #[test]
    fn a_self_link_is_a_cycle() {
        let g = json!({"1": {"class_type": "X", "inputs": {"a": ["1", 0]}}});
        assert!(check(&g).unwrap_err()[0].message.contains("1 → 1"));
    }

    #[test]
    fn diamonds_are_not_cycles() {
        let g = json!({
            "1": {"class_type": "A", "inputs": {}},
            "2": {"class_type": "B", "inputs": {"x": ["1", 0]}},
            "3": {"class_type": "C", "inputs": {"x": ["1", 0]}},
            "4": {"class_type": "D", "inputs": {"x": ["2", 0], "y": ["3", 0], "z": [1, 0]}},
        });
        assert_eq!(check(&g), Ok(()));
    }
}
