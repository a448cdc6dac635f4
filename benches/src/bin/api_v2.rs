//! The Comfy API v2 over HTTP, against the zero-latency ComfyUI double on loopback:
//! `GET /api/v2/jobs/{id}` latency (the polling workhorse), SSE fan-out to 100 listeners
//! (a status change → all 100 have it), and a trivial graph end to end through
//! `/api/v2/jobs` + poll + download vs the synchronous `POST /workflow`.
//!
//! `cargo run --release -p flowhost-benches --bin api_v2`

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use flowhost_benches::{row, summarize};
use futures::StreamExt;
use serde_json::{Value, json};

fn graph(width: u32) -> Value {
    json!({
        "5": {"class_type": "EmptyImage", "inputs": {"width": width, "height": 64, "batch_size": 1, "color": 0}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "bench"}}
    })
}

fn table_header() {
    row(&["measure".into(), "p50 ms".into(), "p99 ms".into(), "mean ms".into(), "n".into()]);
    row(&["---".into(), "---:".into(), "---:".into(), "---:".into(), "---:".into()]);
}

fn table_row(label: &str, samples: Vec<Duration>) {
    let s = summarize(samples);
    row(&[label.into(), format!("{:.3}", s.p50_us / 1000.0), format!("{:.3}", s.p99_us / 1000.0), format!("{:.3}", s.mean_us / 1000.0), s.n.to_string()]);
}

async fn submit(client: &reqwest::Client, base: &str, workflow: &Value) -> Result<Value> {
    let response = client.post(format!("{base}/api/v2/jobs")).json(&json!({"workflow": workflow})).send().await?;
    if response.status() != 201 {
        bail!("submit answered {}: {}", response.status(), response.text().await?);
    }
    Ok(response.json().await?)
}

async fn poll_until(client: &reqwest::Client, base: &str, id: &str, done: &[&str], every: Duration) -> Result<Value> {
    loop {
        let job: Value = client.get(format!("{base}/api/v2/jobs/{id}")).send().await?.json().await?;
        if done.contains(&job["status"].as_str().unwrap_or_default()) {
            return Ok(job);
        }
        tokio::time::sleep(every).await;
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    let comfy = flowhost_tests::ExternalComfy::start().await?;
    let plugins = tempfile::tempdir()?;
    let workflow_plugin = flowhost_tests::build_component("workflow", &[])?;
    std::fs::copy(&workflow_plugin, plugins.path().join("workflow.wasm"))?;
    let cache = tempfile::tempdir()?;
    let mut args = comfy.args();
    // 100 listeners on one job: above the default per-job stream cap (64, issue #22).
    args.extend(["--max-in-flight", "8", "--max-event-streams-per-job", "128"].map(String::from));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = flowhost_tests::TestServer::start_in(plugins, cache, &refs).await?;
    let base = server.base.clone();
    let client = reqwest::Client::new();
    let ready = flowhost_tests::eventually(Duration::from_secs(60), || async {
        (client.get(format!("{base}/api/v2/health")).send().await.ok()?.status() == 200).then_some(())
    })
    .await;
    if ready.is_none() {
        bail!("the double never became ready");
    }

    // 1. GET /api/v2/jobs/{id} on a finished job with one output.
    let job = submit(&client, &base, &graph(64)).await?;
    let id = job["id"].as_str().context("id")?.to_string();
    poll_until(&client, &base, &id, &["succeeded"], Duration::from_millis(5)).await?;
    let url = format!("{base}/api/v2/jobs/{id}");
    for _ in 0..200 {
        client.get(&url).send().await?.bytes().await?;
    }
    let mut gets = Vec::new();
    for _ in 0..2000 {
        let t = Instant::now();
        let response = client.get(&url).send().await?;
        let status = response.status();
        response.bytes().await?;
        gets.push(t.elapsed());
        if status != 200 {
            bail!("GET job answered {status}");
        }
    }

    // 2. SSE fan-out: 100 listeners on a running job; cancel it (the status change is
    // committed and published by the cancel call) and time until all 100 saw `canceling`.
    let mut fanout = Vec::new();
    for _ in 0..10 {
        comfy.double.faults().hang(true);
        let job = submit(&client, &base, &graph(65)).await?;
        let id = job["id"].as_str().context("id")?.to_string();
        poll_until(&client, &base, &id, &["running"], Duration::from_millis(2)).await?;
        let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(100);
        let mut listeners = Vec::new();
        for _ in 0..100 {
            let client = client.clone();
            let url = format!("{base}/api/v2/jobs/{id}/events");
            let ready_tx = ready_tx.clone();
            listeners.push(tokio::spawn(async move {
                let response = client.get(url).send().await.ok()?;
                if !response.status().is_success() {
                    return None;
                }
                let mut stream = response.bytes_stream();
                let mut text = String::new();
                let mut announced = false;
                while let Some(chunk) = stream.next().await {
                    text.push_str(&String::from_utf8_lossy(&chunk.ok()?));
                    if !announced && text.contains("\"running\"") {
                        announced = true;
                        ready_tx.send(()).await.ok()?;
                    }
                    if text.contains("\"canceling\"") || text.contains("\"canceled\"") {
                        return Some(Instant::now());
                    }
                }
                None
            }));
        }
        // Only the listeners hold senders now: one that is refused ends the wait instead of
        // leaving it hanging.
        drop(ready_tx);
        for _ in 0..100 {
            ready_rx.recv().await.context("a listener never connected (refused, or the stream ended)")?;
        }
        let t0 = Instant::now();
        let response = client.post(format!("{base}/api/v2/jobs/{id}/cancel")).send().await?;
        if response.status() != 200 {
            bail!("cancel answered {}", response.status());
        }
        let mut last = t0;
        for listener in listeners {
            let seen = listener.await?.context("a listener missed the status change")?;
            last = last.max(seen);
        }
        fanout.push(last - t0);
        comfy.double.faults().hang(false);
        poll_until(&client, &base, &id, &["canceled"], Duration::from_millis(5)).await?;
    }

    // 3. Trivial graph end to end: v2 submit + poll (every 2 ms) + download, vs POST /workflow.
    let mut v2_e2e = Vec::new();
    let mut sync_e2e = Vec::new();
    // The sync request's own Server-Timing phases: where a trivial job's time goes.
    let mut phases: std::collections::BTreeMap<String, Vec<Duration>> = std::collections::BTreeMap::new();
    let body = json!({"workflow": graph(66), "output_format": "original"});
    for i in 0..100 {
        // Distinct widths defeat the double's execution cache in both paths alike.
        let width = 100 + i;
        let t = Instant::now();
        let job = submit(&client, &base, &graph(width)).await?;
        let id = job["id"].as_str().context("id")?.to_string();
        let done = poll_until(&client, &base, &id, &["succeeded", "failed"], Duration::from_millis(2)).await?;
        let content = done["outputs"][0]["url"].as_str().context("output url")?.to_string();
        let bytes = client.get(content).send().await?.bytes().await?;
        v2_e2e.push(t.elapsed());
        if bytes.len() < 8 {
            bail!("empty output");
        }

        let mut sync_body = body.clone();
        sync_body["workflow"] = graph(width + 1000);
        let t = Instant::now();
        let response = client.post(format!("{base}/workflow")).json(&sync_body).send().await?;
        let status = response.status();
        if let Some(timing) = response.headers().get("server-timing").and_then(|v| v.to_str().ok()) {
            for part in timing.split(',') {
                let mut fields = part.trim().split(';');
                let name = fields.next().unwrap_or_default().to_string();
                if let Some(ms) = fields.find_map(|f| f.trim().strip_prefix("dur=")).and_then(|d| d.parse::<f64>().ok()) {
                    phases.entry(name).or_default().push(Duration::from_secs_f64(ms / 1000.0));
                }
            }
        }
        let bytes = response.bytes().await?;
        sync_e2e.push(t.elapsed());
        if status != 200 || bytes.len() < 8 {
            bail!("POST /workflow answered {status}: {}", String::from_utf8_lossy(&bytes[..bytes.len().min(300)]));
        }
    }

    table_header();
    table_row("`GET /api/v2/jobs/{id}` (finished job, 1 output)", gets);
    table_row("SSE fan-out: cancel → all 100 listeners have `canceling`", fanout);
    table_row("trivial graph via `/api/v2/jobs` + poll (2 ms) + download", v2_e2e);
    table_row("same graph via sync `POST /workflow` (PNG as is)", sync_e2e);
    for (name, samples) in phases {
        table_row(&format!("  of which Server-Timing `{name}`"), samples);
    }
    Ok(())
}
