//! Benchmark of the ComfyUI backend's own overhead (not ComfyUI's): catalogue parsing, preflight, and
//! a full run round trip against the ComfyUI double on loopback. Prints a table.
//! Run: `cargo run -p flowhost-comfy --example comfy_bench ` (debug build figures are in the report)

use std::time::{Duration, Instant};

use comfyui_double::{ComfyDouble, DoubleConfig};
use flowhost_comfy::{BackendConfig, BackendMode, Catalogue, ComfyBackend, ComfyError, RunRequest};
use serde_json::{Value, json};

fn summarize(mut samples: Vec<Duration>) -> (Duration, Duration) {
    samples.sort();
    let median = samples[samples.len() / 2];
    let p95 = samples[(samples.len() * 95 / 100).min(samples.len() - 1)];
    (median, p95)
}

fn row(name: &str, n: usize, samples: Vec<Duration>) {
    let (median, p95) = summarize(samples);
    println!(
        "| {name:<46} | {n:>5} | {:>10.3} | {:>10.3} |",
        median.as_secs_f64() * 1e3,
        p95.as_secs_f64() * 1e3
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/../comfyui-double/fixtures");
    let object_info = std::fs::read_to_string(format!("{fixtures}/object_info.json"))?;
    let flux: Value = serde_json::from_str(&std::fs::read_to_string(format!(
        "{fixtures}/flux-validation.json"
    ))?)?;

    println!(
        "| operation                                      |     n | median ms  |    p95 ms  |"
    );
    println!(
        "|------------------------------------------------|-------|------------|------------|"
    );

    let mut samples = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let c = Catalogue::from_object_info(&object_info)?;
        samples.push(t.elapsed());
        std::hint::black_box(c);
    }
    row("Catalogue::from_object_info (507 classes)", 20, samples);

    let catalogue = Catalogue::from_object_info(&object_info)?;
    for case in [
        "a_flux_dev_separate_loaders",
        "d_instantid_basic_on_flux",
        "x_missing_model_files",
    ] {
        let graph = &flux[case]["request"]["prompt"];
        let mut samples = Vec::new();
        for _ in 0..1000 {
            let t = Instant::now();
            let r = catalogue.preflight(graph);
            samples.push(t.elapsed());
            std::hint::black_box(r.is_ok());
        }
        row(&format!("preflight {case}"), 1000, samples);
    }

    let models = tempfile::tempdir()?;
    let double = ComfyDouble::start(DoubleConfig {
        models_dir: Some(models.path().to_path_buf()),
        ..Default::default()
    })
    .await?;
    let mut config = BackendConfig::new(BackendMode::Url(url::Url::parse(&double.url())?));
    config.health_interval = Duration::from_millis(200);
    config.history_poll_interval = Duration::from_millis(300);
    let backend = ComfyBackend::start(config).await?;
    anyhow::ensure!(
        backend.wait_ready(Duration::from_secs(30)).await,
        "double not ready"
    );
    let graph = json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 48, "batch_size": 1, "color": 0}},
        "2": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "nearest-exact", "width": 32, "height": 24, "crop": "disabled"}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "bench"}}
    });
    let n = 50;
    let mut samples = Vec::new();
    for i in 0..n {
        let mut g = graph.clone();
        g["1"]["inputs"]["color"] = json!(i); // defeat caching
        let t = Instant::now();
        backend
            .run(RunRequest::new(g, Duration::from_secs(30)))
            .await?;
        samples.push(t.elapsed());
    }
    row("run round trip vs double (3 nodes, 32x24 PNG)", n, samples);

    let mut samples = Vec::new();
    for _ in 0..n {
        double.faults().hang(true);
        let t = Instant::now();
        let r = backend
            .run(RunRequest::new(graph.clone(), Duration::from_millis(200)))
            .await;
        samples.push(t.elapsed().saturating_sub(Duration::from_millis(200)));
        anyhow::ensure!(
            matches!(r, Err(ComfyError::Timeout { .. })),
            "expected timeout"
        );
        double.faults().clear();
    }
    row(
        "deadline expiry -> Timeout (time past deadline)",
        n,
        samples,
    );

    double.faults().hang(true);
    let b = backend.clone();
    let run = tokio::spawn(async move {
        b.run(RunRequest::new(graph, Duration::from_secs(3600)))
            .await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t = Instant::now();
    double.faults().crash();
    let r = run.await?;
    let crash = t.elapsed();
    anyhow::ensure!(
        matches!(r, Err(ComfyError::Unavailable { .. })),
        "expected Unavailable, got {r:?}"
    );
    row("ComfyUI crash -> Unavailable returned", 1, vec![crash]);
    Ok(())
}
