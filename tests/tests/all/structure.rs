//! The house's map, checked: a room imports only rooms below it, and no two modules import
//! each other, at any depth (issue #21). Read from the source, so a change that adds an
//! upward import or a circle fails here with the arrow that did it, not in review.
//!
//! Imports are `crate::…` and `super::…` paths (and `crate::{a, b}` groups) outside comments
//! and outside the `#[cfg(test)]` tail of a file: tests may reach anywhere.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// `host/src`'s rooms, top to bottom: an import may only point further down this list.
const HOST_ROOMS: &[&str] = &[
    "app", "http", "warm_up", "generation", "webhooks", "jobs", "plugins", "metrics", "models", "net", "media", "events", "auth", "timestamp",
    "state_lock",
];

type Module = Vec<String>;
type Graph = BTreeMap<Module, BTreeSet<Module>>;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .expect("source folder")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module a file defines (`jobs/mod.rs` → `jobs`, `jobs/store.rs` → `jobs::store`) and
/// the module its `super` names.
fn module_of(root: &Path, file: &Path) -> (Module, Module) {
    let rel = file
        .strip_prefix(root)
        .expect("under root")
        .with_extension("");
    let mut parts: Module = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let is_dir_module = matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    );
    if is_dir_module {
        parts.pop();
    }
    // A file's own path: `super` is its parent; `mod.rs` is the folder's module, whose
    // `super` is the folder's parent.
    let mut parent = parts.clone();
    parent.pop();
    (parts, parent)
}

/// Source without comment lines and without the `#[cfg(test)]` tail.
fn code_of(text: &str) -> String {
    let text = match text.find("#[cfg(test)]") {
        Some(i) => &text[..i],
        None => text,
    };
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Every module path the code names: `crate::a::b::Item` → `[a, b, Item]` (resolved from
/// `super::` against `parent`), and each member of `crate::{a, b::c}`.
fn references(code: &str, parent: &Module) -> Vec<Module> {
    let mut out = Vec::new();
    let bytes: Vec<char> = code.chars().collect();
    let mut i = 0;
    while i < bytes.len() {
        let starts_word = i == 0 || !is_ident(bytes[i - 1]) && bytes[i - 1] != ':';
        let rest: String = bytes[i..bytes.len().min(i + 7)].iter().collect();
        let (head, skip) = if starts_word && rest.starts_with("crate::") {
            (Vec::new(), 7)
        } else if starts_word && rest.starts_with("super::") {
            // `super::super::…`
            let mut base = parent.clone();
            let mut j = i;
            loop {
                let tail: String = bytes[j..bytes.len().min(j + 7)].iter().collect();
                if tail == "super::" {
                    j += 7;
                } else {
                    break;
                }
                if j > i + 7 {
                    base.pop();
                }
            }
            let skip = j - i;
            (base, skip)
        } else {
            i += 1;
            continue;
        };
        let mut j = i + skip;
        if bytes.get(j) == Some(&'{') {
            let end = bytes[j..]
                .iter()
                .position(|c| *c == '}')
                .map_or(bytes.len(), |p| j + p);
            let group: String = bytes[j + 1..end].iter().collect();
            for member in group.split(',') {
                let path: Module = member
                    .trim()
                    .split("::")
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty() && s.chars().all(is_ident))
                    .collect();
                if !path.is_empty() {
                    out.push(head.iter().cloned().chain(path).collect());
                }
            }
            i = end;
            continue;
        }
        let mut path = head.clone();
        loop {
            let start = j;
            while j < bytes.len() && is_ident(bytes[j]) {
                j += 1;
            }
            if j == start {
                break;
            }
            path.push(bytes[start..j].iter().collect());
            let sep: String = bytes[j..bytes.len().min(j + 2)].iter().collect();
            if sep == "::" && bytes.get(j + 2).is_some_and(|c| is_ident(*c)) {
                j += 2;
            } else {
                break;
            }
        }
        out.push(path);
        i = j.max(i + 1);
    }
    out
}

/// The import graph of a crate's `src` at `depth` (modules cut to their first `depth` parts;
/// only modules that are `depth` deep take part).
fn graph(src: &Path, depth: usize) -> Graph {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let modules: BTreeSet<Module> = files.iter().map(|f| module_of(src, f).0).collect();
    let mut graph = Graph::new();
    for file in &files {
        let (module, parent) = module_of(src, file);
        let text = std::fs::read_to_string(file).expect("readable source");
        for path in references(&code_of(&text), &parent) {
            // The longest prefix of the path that is a module (the rest is an item).
            let Some(target) = (1..=path.len())
                .rev()
                .map(|n| path[..n].to_vec())
                .find(|p| modules.contains(p))
            else {
                continue;
            };
            if module.len() < depth || target.len() < depth {
                continue;
            }
            let (from, to) = (module[..depth].to_vec(), target[..depth].to_vec());
            if from != to {
                graph.entry(from).or_default().insert(to);
            }
        }
    }
    graph
}

/// Groups of modules that import each other (Tarjan's strongly connected components).
fn circles(graph: &Graph) -> Vec<Vec<String>> {
    struct State<'g> {
        graph: &'g Graph,
        index: BTreeMap<&'g Module, usize>,
        low: BTreeMap<&'g Module, usize>,
        stack: Vec<&'g Module>,
        on_stack: BTreeSet<&'g Module>,
        next: usize,
        found: Vec<Vec<String>>,
    }
    fn visit<'g>(s: &mut State<'g>, v: &'g Module) {
        s.index.insert(v, s.next);
        s.low.insert(v, s.next);
        s.next += 1;
        s.stack.push(v);
        s.on_stack.insert(v);
        if let Some(targets) = s.graph.get(v) {
            for w in targets {
                let w = s.graph.get_key_value(w).map(|(k, _)| k).unwrap_or(w);
                if !s.index.contains_key(w) {
                    visit(s, w);
                    let low = s.low[w].min(s.low[v]);
                    s.low.insert(v, low);
                } else if s.on_stack.contains(w) {
                    let low = s.index[w].min(s.low[v]);
                    s.low.insert(v, low);
                }
            }
        }
        if s.low[v] == s.index[v] {
            let mut group = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                group.push(w.join("::"));
                if w == v {
                    break;
                }
            }
            if group.len() > 1 {
                group.sort();
                s.found.push(group);
            }
        }
    }
    let mut s = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        next: 0,
        found: Vec::new(),
    };
    for v in graph.keys() {
        if !s.index.contains_key(v) {
            visit(&mut s, v);
        }
    }
    s.found
}

fn crate_src(name: &str) -> PathBuf {
    flowhost_tests::workspace_root().join(name).join("src")
}

fn assert_no_circles(krate: &str) {
    let src = crate_src(krate);
    for depth in 1..=3 {
        let graph = graph(&src, depth);
        let found = circles(&graph);
        assert!(
            found.is_empty(),
            "{krate}: modules that import each other (depth {depth}): {found:?}"
        );
    }
}

#[test]
fn no_two_modules_of_the_host_import_each_other() {
    assert_no_circles("host");
}

#[test]
fn no_two_modules_of_the_comfy_client_the_double_or_the_sdk_import_each_other() {
    for krate in ["comfy", "comfyui-double", "sdk"] {
        assert_no_circles(krate);
    }
}

#[test]
fn every_host_import_points_down_the_room_list() {
    let graph = graph(&crate_src("host"), 1);
    let rank = |m: &Module| HOST_ROOMS.iter().position(|r| *r == m[0]);
    let mut upward = Vec::new();
    for (from, targets) in &graph {
        let Some(f) = rank(from) else {
            upward.push(format!("{} is not in the room list", from[0]));
            continue;
        };
        for to in targets {
            match rank(to) {
                Some(t) if t > f => {}
                Some(_) => upward.push(format!("{} -> {} (upward)", from[0], to[0])),
                None => upward.push(format!("{} -> {} (not in the room list)", from[0], to[0])),
            }
        }
    }
    assert!(
        upward.is_empty(),
        "imports against the map in host/src/lib.rs: {upward:#?}"
    );
}

/// The job service is a facade over parts, each a struct of its own file (issue #21): no
/// other file adds methods to `JobService` (which would reach into its fields).
#[test]
fn only_the_facade_implements_the_job_service() {
    let src = crate_src("host");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut found: Vec<String> = files
        .iter()
        .filter(|f| {
            let text = std::fs::read_to_string(f).expect("readable source");
            let code = code_of(&text);
            code.match_indices("impl JobService").any(|(i, m)| !code[i + m.len()..].starts_with(is_ident))
        })
        .map(|f| f.strip_prefix(&src).expect("under src").to_string_lossy().into_owned())
        .collect();
    found.sort();
    assert_eq!(found, vec!["jobs/service.rs".to_string()], "files with `impl JobService`");
}

/// The host's integration tests are modules of the one test binary (`tests/tests/all/`): a
/// `host/tests/` file would be a test binary of its own, another link of wasmtime, sqlx and axum.
#[test]
fn the_host_has_no_integration_tests_of_its_own() {
    let folder = flowhost_tests::workspace_root().join("host/tests");
    assert!(!folder.exists(), "host/tests/ exists: move its tests into tests/tests/all/ as modules");
}

#[test]
fn the_checker_sees_a_circle_and_an_upward_import() {
    // The checker itself: two files that import each other, one through `super::`.
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path();
    std::fs::create_dir_all(src.join("a")).unwrap();
    std::fs::write(src.join("lib.rs"), "pub mod a;\npub mod b;\n").unwrap();
    std::fs::write(src.join("a/mod.rs"), "pub mod x;\npub mod y;\n").unwrap();
    std::fs::write(
        src.join("a/x.rs"),
        "use super::y::Y;\n// use crate::b::B; (a comment)\npub struct X;\n",
    )
    .unwrap();
    std::fs::write(
        src.join("a/y.rs"),
        "pub struct Y(crate::a::x::X);\n#[cfg(test)]\nmod tests { use crate::b::B; }\n",
    )
    .unwrap();
    std::fs::write(
        src.join("b.rs"),
        "use crate::{a::x::X, a::y};\npub struct B;\n",
    )
    .unwrap();
    assert_eq!(
        circles(&graph(src, 2)),
        vec![vec!["a::x".to_string(), "a::y".to_string()]]
    );
    assert!(
        circles(&graph(src, 1)).is_empty(),
        "comments and the test tail are not imports"
    );
    assert_eq!(
        graph(src, 1)
            .get(&vec!["b".to_string()])
            .cloned()
            .unwrap_or_default(),
        BTreeSet::from([vec!["a".to_string()]])
    );
}
