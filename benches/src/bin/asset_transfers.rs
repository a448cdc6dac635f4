//! Memory of asset transfers (issue #22): peak RSS of the `flowhost` process while 20
//! clients download one 99 MiB asset at once and while 10 clients upload a 99 MiB file
//! each at once (`/api/v2/assets`, local blob store). The server is the binary named by
//! `FLOWHOST_BIN` (default: this workspace's debug build), run as a child so its RSS is its
//! own; RSS is read from `/proc/<pid>/status` every 10 ms. The clients stream their upload
//! bodies from a generator, so only the server's memory grows with what it holds.
//!
//! `FLOWHOST_BIN=target/debug/flowhost cargo run --release -p flowhost-benches --bin asset_transfers`

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use flowhost_benches::row;
use futures::StreamExt;
use serde_json::Value;

const SIZE: u64 = 99 << 20;
const DOWNLOADS: usize = 20;
const UPLOADS: usize = 10;
const CHUNK: usize = 256 << 10;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok()).unwrap_or(0)
}

/// The highest RSS seen while `work` runs.
async fn peak_during<F: std::future::Future<Output = Result<()>>>(pid: u32, work: F) -> Result<(u64, Duration)> {
    let peak = Arc::new(AtomicU64::new(rss_kib(pid)));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, stop) = (peak.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let started = Instant::now();
    let outcome = work.await;
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    sampler.await?;
    outcome?;
    Ok((peak.load(Ordering::Relaxed), took))
}

/// `SIZE` bytes unique to `seed`, generated as they are sent.
fn body(seed: u64) -> reqwest::Body {
    let chunks = (0..SIZE.div_ceil(CHUNK as u64)).map(move |n| {
        let len = (SIZE - n * CHUNK as u64).min(CHUNK as u64) as usize;
        let fill = (seed.wrapping_mul(31).wrapping_add(n)) as u8;
        Ok::<_, std::io::Error>(bytes::Bytes::from(vec![fill; len]))
    });
    reqwest::Body::wrap_stream(futures::stream::iter(chunks))
}

async fn upload(client: &reqwest::Client, base: &str, seed: u64) -> Result<String> {
    let part = reqwest::multipart::Part::stream_with_length(body(seed), SIZE).file_name("big.bin").mime_str("application/octet-stream")?;
    let form = reqwest::multipart::Form::new().part("file", part).text("content_type", "application/octet-stream").text("file_path", "big.bin");
    let response = client.post(format!("{base}/api/v2/assets")).multipart(form).send().await?;
    let status = response.status();
    let answer: Value = response.json().await?;
    if !status.is_success() {
        bail!("upload answered {status}: {answer}");
    }
    Ok(answer["id"].as_str().context("asset id")?.to_string())
}

async fn download(client: &reqwest::Client, url: &str) -> Result<()> {
    let response = client.get(url).send().await?;
    if response.status() != 200 {
        bail!("download answered {}", response.status());
    }
    let mut stream = response.bytes_stream();
    let mut got = 0u64;
    while let Some(chunk) = stream.next().await {
        got += chunk?.len() as u64;
    }
    if got != SIZE {
        bail!("downloaded {got} of {SIZE} bytes");
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let bin = std::env::var("FLOWHOST_BIN").map(std::path::PathBuf::from).unwrap_or_else(|_| flowhost_tests::flowhost_binary());
    let dir = tempfile::tempdir()?;
    std::fs::create_dir_all(dir.path().join("plugins"))?;
    let port = flowhost_tests::free_port();
    let child = Command::new(&bin)
        .args(["serve", "--simulate", "--warm-up", "off", "--listen", &format!("127.0.0.1:{port}"), "--plugins"])
        .arg(dir.path().join("plugins"))
        .arg("--cache-dir")
        .arg(dir.path().join("cache"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .env_remove("FLOWHOST_API_KEYS")
        .env_remove("FLOWHOST_ADMIN_KEYS")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let child = flowhost_tests::KillOnDrop(child);
    let pid = child.0.id();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let started = Instant::now();
    while client.get(format!("{base}/api/v2/health")).send().await.map(|r| r.status() != 200).unwrap_or(true) {
        if started.elapsed() > Duration::from_secs(60) {
            bail!("flowhost did not become healthy");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let idle = rss_kib(pid);
    let (one_upload, _) = peak_during(pid, async { upload(&client, &base, 0).await.map(|_| ()) }).await?;
    let id = upload(&client, &base, 0).await?;
    let url = format!("{base}/api/v2/assets/{id}/content");
    let before_downloads = rss_kib(pid);
    let (downloads, took_down) = peak_during(pid, async {
        let all = futures::future::join_all((0..DOWNLOADS).map(|_| download(&client, &url))).await;
        all.into_iter().collect::<Result<Vec<()>>>().map(|_| ())
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before_uploads = rss_kib(pid);
    let (uploads, took_up) = peak_during(pid, async {
        let all = futures::future::join_all((1..=UPLOADS as u64).map(|seed| upload(&client, &base, seed))).await;
        all.into_iter().collect::<Result<Vec<String>>>().map(|_| ())
    })
    .await?;
    let mib = |kib: u64| format!("{:.0}", kib as f64 / 1024.0);
    row(&["binary".into(), "idle RSS MiB".into(), "1 upload peak".into(), "20 downloads: before → peak".into(), "wall".into(), "10 uploads: before → peak".into(), "wall".into()]);
    row(&["---".into(), "---".into(), "---".into(), "---".into(), "---".into(), "---".into(), "---".into()]);
    row(&[
        bin.display().to_string(),
        mib(idle),
        mib(one_upload),
        format!("{} → {}", mib(before_downloads), mib(downloads)),
        format!("{:.1} s", took_down.as_secs_f64()),
        format!("{} → {}", mib(before_uploads), mib(uploads)),
        format!("{:.1} s", took_up.as_secs_f64()),
    ]);
    Ok(())
}
