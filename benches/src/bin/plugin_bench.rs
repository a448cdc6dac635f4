//! Plugin runtime benchmark: one plugin call (fresh store + instantiate +
//! schema validation + `build`) with the real `flux-dev` request, pooling vs
//! on-demand, against the same builder compiled natively; hot-swap latency;
//! startup with a cold and a warm compiled cache.
//!
//! `cargo run --release -p flowhost-benches --bin plugin_bench`

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use flowhost::generation::request_schema;
use flowhost::plugins::compiled_cache::CompiledCache;
use flowhost::plugins::engine::AllocatorChoice;
use flowhost::plugins::watcher::{LoadContext, Scanner};
use flowhost::plugins::{LoadedPlugin, ModelLister, PluginEngine, PluginLimits, PluginRegistry};
use flowhost_benches::{row, summarize};
use flowhost_sdk::Plugin;
use serde_json::json;

/// The model volume of a typical deployment, answered from memory.
struct FluxVolume;

impl ModelLister for FluxVolume {
    fn list_models(&self, folder: &str) -> Vec<(String, u64)> {
        match folder {
            "diffusion_models" => vec![("flux1-dev.safetensors".into(), 23_802_932_552)],
            "text_encoders" => vec![("clip_l.safetensors".into(), 246_144_152), ("t5xxl_fp16.safetensors".into(), 9_787_841_024)],
            "vae" => vec![("ae.safetensors".into(), 335_304_388)],
            _ => vec![],
        }
    }
}

fn request() -> serde_json::Value {
    json!({"prompt": "a lighthouse on a cliff at dawn, volumetric light", "width": 1024, "height": 1024, "steps": 20, "cfg": 1.0, "guidance": 3.5, "seed": 42})
}

fn bench_wasm(plugin: &LoadedPlugin, iterations: usize) -> Vec<Duration> {
    let body = request();
    let text = body.to_string();
    let mut samples = Vec::with_capacity(iterations);
    for i in 0..iterations + iterations / 10 {
        let t = Instant::now();
        let problems = request_schema::check(&plugin.validator, &plugin.manifest.request_schema, &body);
        assert!(problems.is_empty(), "{problems:?}");
        let job = plugin.build(&text, 7, "bench").expect("flux-dev builds");
        std::hint::black_box(job);
        if i >= iterations / 10 {
            samples.push(t.elapsed());
        }
    }
    samples
}

fn bench_native(iterations: usize) -> Vec<Duration> {
    let host = flowhost_sdk::host::FakeHost::new()
        .with_model("diffusion_models", "flux1-dev.safetensors", 23_802_932_552)
        .with_model("text_encoders", "clip_l.safetensors", 246_144_152)
        .with_model("text_encoders", "t5xxl_fp16.safetensors", 9_787_841_024)
        .with_model("vae", "ae.safetensors", 335_304_388);
    let request = flowhost_sdk::Request { body: request().to_string(), random_seed: 7, request_id: "bench".into() };
    let mut samples = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let t = Instant::now();
        let job = flux_dev::FluxDev::build(&request, &host).expect("native build");
        std::hint::black_box(job);
        samples.push(t.elapsed());
    }
    samples
}

fn main() -> Result<()> {
    let wasm = flowhost_tests::build_component("flux-dev", &[]).context("building flux-dev")?;
    let bytes = std::fs::read(&wasm)?;
    let lister: Arc<dyn ModelLister> = Arc::new(FluxVolume);
    let iterations = 5000;

    row(&["measure".into(), "p50 µs".into(), "p99 µs".into(), "mean µs".into(), "n".into()]);
    row(&["---".into(), "---:".into(), "---:".into(), "---:".into(), "---:".into()]);
    let mut p50s = Vec::new();
    for (label, choice) in [("wasm call, pooling allocator", AllocatorChoice::Auto), ("wasm call, on-demand allocator", AllocatorChoice::OnDemand)] {
        let engine = PluginEngine::new(PluginLimits::default(), choice)?;
        let plugin = LoadedPlugin::load_bytes(&engine, None, &wasm, &bytes, lister.clone())?;
        let s = summarize(bench_wasm(&plugin, iterations));
        let label = format!("{label} ({:?})", engine.allocator());
        row(&[label, format!("{:.1}", s.p50_us), format!("{:.1}", s.p99_us), format!("{:.1}", s.mean_us), s.n.to_string()]);
        p50s.push(s.p50_us);
        if engine.allocator() == flowhost::plugins::engine::AllocatorKind::Pooling {
            // Where the time goes: the schema check alone, and a fresh store +
            // instantiation + a trivial export call (explain-failure).
            let body = request();
            let schema: Vec<Duration> = (0..iterations)
                .map(|_| {
                    let t = Instant::now();
                    std::hint::black_box(request_schema::check(&plugin.validator, &plugin.manifest.request_schema, &body));
                    t.elapsed()
                })
                .collect();
            let s = summarize(schema);
            row(&["  of which: JSON Schema check".into(), format!("{:.1}", s.p50_us), format!("{:.1}", s.p99_us), format!("{:.1}", s.mean_us), s.n.to_string()]);
            let failure = flowhost::plugins::bindings::wit::ExecutionFailure {
                node_id: "1".into(),
                node_type: "KSampler".into(),
                exception_type: "RuntimeError".into(),
                exception_message: "x".into(),
            };
            let instantiate: Vec<Duration> = (0..iterations)
                .map(|_| {
                    let t = Instant::now();
                    std::hint::black_box(plugin.explain_failure(&failure, "bench"));
                    t.elapsed()
                })
                .collect();
            let s = summarize(instantiate);
            row(&["  of which: fresh store + instantiate + trivial call".into(), format!("{:.1}", s.p50_us), format!("{:.1}", s.p99_us), format!("{:.1}", s.mean_us), s.n.to_string()]);
        }
    }
    let native = summarize(bench_native(iterations));
    row(&["same builder, native (no sandbox, no schema check)".into(), format!("{:.1}", native.p50_us), format!("{:.1}", native.p99_us), format!("{:.1}", native.mean_us), native.n.to_string()]);
    row(&["ratio wasm(pooling) / native, p50".into(), format!("{:.1}×", p50s[0] / native.p50_us.max(0.001)), String::new(), String::new(), String::new()]);

    // Hot swap: write a new version, measure until the registry serves it.
    // A second version with different bytes: the same component plus a custom
    // section (valid anywhere in a component), so its sha256 differs.
    let mut v2_bytes = bytes.clone();
    v2_bytes.extend_from_slice(&[0x00, 0x0d, 0x05]);
    v2_bytes.extend_from_slice(b"bench");
    v2_bytes.extend_from_slice(b"v2-swap");
    let dir = tempfile::tempdir()?;
    let cache_dir = tempfile::tempdir()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let engine = PluginEngine::new(PluginLimits::default(), AllocatorChoice::Auto)?;
    let registry = Arc::new(PluginRegistry::new());
    let ctx = LoadContext {
        dir: dir.path().to_path_buf(),
        engine: engine.clone(),
        cache: Some(CompiledCache::new(cache_dir.path())?),
        models: lister.clone(),
        registry: registry.clone(),
        route_owners: None,
        on_load: None, on_loaded: None,
    };
    std::fs::write(dir.path().join("flux-dev.wasm"), &bytes)?;
    let swaps = runtime.block_on(async {
        let _watcher = flowhost::plugins::PluginWatcher::start(ctx.clone(), Duration::from_secs(2)).await?;
        let mut samples = Vec::new();
        for i in 0..10 {
            let content = if i % 2 == 0 { &v2_bytes } else { &bytes };
            let before = registry.lookup("/flux-dev").map(|p| p.sha256.clone());
            let t = Instant::now();
            flowhost_tests::publish_atomically(dir.path(), "flux-dev.wasm", content)?;
            loop {
                let now = registry.lookup("/flux-dev").map(|p| p.sha256.clone());
                if now != before {
                    break;
                }
                if t.elapsed() > Duration::from_secs(30) {
                    anyhow::bail!("swap never became visible");
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            samples.push(t.elapsed());
        }
        anyhow::Ok(samples)
    })?;
    let s = summarize(swaps);
    row(&["hot swap: write → new version served (inotify, compiled cache warm after first)".into(), format!("{:.0}", s.p50_us), format!("{:.0}", s.p99_us), format!("{:.0}", s.mean_us), s.n.to_string()]);

    // Startup: initial scan of the bundled plugins, cold vs warm compiled cache.
    let plugins_dir = tempfile::tempdir()?;
    for name in ["flux-dev", "flux-lora", "flux-instantid", "workflow"] {
        let path = flowhost_tests::build_component(name, &[])?;
        std::fs::copy(&path, plugins_dir.path().join(format!("{name}.wasm")))?;
    }
    let startup_cache = tempfile::tempdir()?;
    for label in ["startup (4 plugins), cold compiled cache", "startup (4 plugins), warm compiled cache"] {
        let engine = PluginEngine::new(PluginLimits::default(), AllocatorChoice::Auto)?;
        let registry = Arc::new(PluginRegistry::new());
        let t = Instant::now();
        let scanner = Scanner::new(LoadContext {
            dir: plugins_dir.path().to_path_buf(),
            engine,
            cache: Some(CompiledCache::new(startup_cache.path())?),
            models: lister.clone(),
            registry: registry.clone(),
            route_owners: None,
            on_load: None, on_loaded: None,
        });
        scanner.scan()?;
        let took = t.elapsed();
        assert_eq!(registry.snapshot().plugins().len(), 4);
        row(&[label.into(), format!("{:.0}", took.as_secs_f64() * 1e6), String::new(), String::new(), "1".into()]);
    }
    Ok(())
}
