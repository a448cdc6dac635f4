//! Host-added latency per generation request: everything except ComfyUI's own
//! execution (HTTP, schema check, plugin call, preflight, submission, websocket
//! tracking, `/view` fetch, PNG → JPEG of a 1024×1024 image), against the
//! zero-latency ComfyUI double on loopback; then throughput with 5 and 20
//! concurrent clients.
//!
//! `cargo run --release -p flowhost-benches --bin host_latency`

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use flowhost_benches::{row, summarize};
use serde_json::json;

fn server_timing(headers: &reqwest::header::HeaderMap, name: &str) -> Option<f64> {
    let value = headers.get("server-timing")?.to_str().ok()?;
    value.split(',').map(str::trim).find_map(|part| {
        let (n, rest) = part.split_once(';')?;
        (n == name).then(|| rest.trim_start_matches("dur=").parse().ok())?
    })
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    let plugins = tempfile::tempdir()?;
    let flux = flowhost_tests::build_component("flux-dev", &[])?;
    std::fs::copy(&flux, plugins.path().join("flux-dev.wasm"))?;
    let cache = tempfile::tempdir()?;
    let server = flowhost_tests::TestServer::start_in(plugins, cache, &["--simulate", "--max-in-flight", "64"]).await?;
    let client = reqwest::Client::new();
    let url = server.url("/flux-dev");
    let body = json!({"prompt": "a lighthouse at dawn", "width": 1024, "height": 1024, "steps": 1, "seed": 1});

    // Warm up (catalogue, connections, caches).
    for _ in 0..5 {
        let r = client.post(&url).json(&body).send().await?;
        if !r.status().is_success() {
            bail!("warm-up request failed: {} {}", r.status(), r.text().await?);
        }
    }

    let mut host_added = Vec::new();
    let mut totals = Vec::new();
    let mut encode = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        let r = client.post(&url).json(&body).send().await?;
        let headers = r.headers().clone();
        let bytes = r.bytes().await?;
        let total = t.elapsed();
        if bytes.len() < 1000 || headers.get("content-type").and_then(|v| v.to_str().ok()) != Some("image/jpeg") {
            bail!("not a JPEG");
        }
        let comfy_ms = server_timing(&headers, "comfyui").context("server-timing comfyui")?;
        encode.push(Duration::from_secs_f64(server_timing(&headers, "encode").unwrap_or(0.0) / 1000.0));
        totals.push(total);
        host_added.push(total.saturating_sub(Duration::from_secs_f64(comfy_ms / 1000.0)));
    }
    row(&["measure (1024×1024, zero-latency double)".into(), "p50 ms".into(), "p99 ms".into(), "mean ms".into(), "n".into()]);
    row(&["---".into(), "---:".into(), "---:".into(), "---:".into(), "---:".into()]);
    for (label, samples) in [("host-added latency (total − ComfyUI execution)", host_added), ("end-to-end request", totals), ("fetch + PNG→JPEG encode", encode)] {
        let s = summarize(samples);
        row(&[label.into(), format!("{:.2}", s.p50_us / 1000.0), format!("{:.2}", s.p99_us / 1000.0), format!("{:.2}", s.mean_us / 1000.0), s.n.to_string()]);
    }

    row(&[String::new(), String::new(), String::new(), String::new(), String::new()]);
    row(&["throughput".into(), "clients".into(), "requests".into(), "req/s".into(), "errors".into()]);
    row(&["---".into(), "---:".into(), "---:".into(), "---:".into(), "---:".into()]);
    for clients in [5usize, 20] {
        let per_client = 40usize;
        let client = Arc::new(client.clone());
        let t = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..clients {
            let (client, url, body) = (client.clone(), url.clone(), body.clone());
            tasks.push(tokio::spawn(async move {
                let mut errors = 0usize;
                for _ in 0..per_client {
                    match client.post(&url).json(&body).send().await {
                        Ok(r) if r.status().is_success() => {
                            let _ = r.bytes().await;
                        }
                        _ => errors += 1,
                    }
                }
                errors
            }));
        }
        let mut errors = 0;
        for task in tasks {
            errors += task.await?;
        }
        let secs = t.elapsed().as_secs_f64();
        let n = clients * per_client;
        row(&["/flux-dev 1024×1024 against the double".into(), clients.to_string(), n.to_string(), format!("{:.1}", n as f64 / secs), errors.to_string()]);
    }
    server.server.shutdown().await?;
    Ok(())
}
