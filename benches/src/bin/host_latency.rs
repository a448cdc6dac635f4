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

    // Wait for the backend to see ComfyUI ready.
    let ready = flowhost_tests::eventually(Duration::from_secs(60), || async {
        let h: serde_json::Value = client.get(server.url("/health")).send().await.ok()?.json().await.ok()?;
        (h["comfyui"]["status"] == "ready").then_some(())
    })
    .await;
    if ready.is_none() {
        bail!("the double never became ready");
    }
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

    // The encoder alone, on a 1024×1024 image like the double's (a busy pattern).
    let (w, h) = (1024usize, 1024usize);
    let mut rgb = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        for x in 0..w {
            rgb.extend_from_slice(&[((x * 37 / 4 + y) & 0xff) as u8, ((y * 11 / 4 + x / 2) & 0xff) as u8, ((x ^ y) & 0xff) as u8]);
        }
    }
    let mut png_bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut png_bytes, w as u32, h as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_compression(png::Compression::Fast);
        let mut writer = enc.write_header()?;
        writer.write_image_data(&rgb)?;
    }
    let samples: Vec<Duration> = (0..50)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(flowhost::media::png_to_jpeg(&png_bytes, 90).expect("encodes"));
            t.elapsed()
        })
        .collect();
    let decode: Vec<Duration> = (0..50)
        .map(|_| {
            let t = Instant::now();
            let mut decoder = png::Decoder::new(std::io::Cursor::new(&png_bytes));
            decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
            let mut reader = decoder.read_info().expect("png");
            let mut buf = vec![0u8; reader.output_buffer_size().expect("size")];
            reader.next_frame(&mut buf).expect("frame");
            std::hint::black_box(buf);
            t.elapsed()
        })
        .collect();
    let d = summarize(decode);
    row(&["  of which PNG decode".into(), format!("{:.2}", d.p50_us / 1000.0), format!("{:.2}", d.p99_us / 1000.0), format!("{:.2}", d.mean_us / 1000.0), d.n.to_string()]);
    let s = summarize(samples);
    row(&[format!("PNG→JPEG alone ({} KiB PNG, q90)", png_bytes.len() / 1024), format!("{:.2}", s.p50_us / 1000.0), format!("{:.2}", s.p99_us / 1000.0), format!("{:.2}", s.mean_us / 1000.0), s.n.to_string()]);

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
