//! Event streams followed from another instance (issue #22: 500 listeners on a second
//! instance made 23,028 PostgreSQL commits in 10 s, and 2,000 listeners held 850 MB).
//! Instance A runs one job that does not end (its ComfyUI double hangs); instance B — the
//! binary named by `FLOWHOST_BIN`, default this workspace's debug build, plus the flags in
//! `FLOWHOST_EXTRA_ARGS` — serves `STREAMS` SSE streams of that job. Both share one
//! throw-away PostgreSQL cluster. Measured on B: RSS before and after the streams opened
//! (`/proc/<pid>/status`), and PostgreSQL transactions per second over 10 s with no stream
//! and with the streams (`pg_stat_database`: every statement outside a transaction is one),
//! so queries/s per remote stream = (with − without) / streams.
//!
//! `FLOWHOST_BIN=… STREAMS=60 cargo run --release -p flowhost-benches --bin event_streams`

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use flowhost_benches::row;
use flowhost_tests::pg::PgCluster;
use flowhost_tests::{ExternalComfy, KillOnDrop, free_port};
use futures::StreamExt;
use serde_json::{Value, json};

const WINDOW: Duration = Duration::from_secs(10);

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok()).unwrap_or(0)
}

fn instance(bin: &std::path::Path, dir: &std::path::Path, comfy: &ExternalComfy, database_url: &str, extra: &[String]) -> Result<(KillOnDrop, String)> {
    let port = free_port();
    for sub in ["plugins", "cache", "state"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    let child = Command::new(bin)
        .args(["serve", "--warm-up", "off", "--listen", &format!("127.0.0.1:{port}"), "--plugins"])
        .arg(dir.join("plugins"))
        .arg("--cache-dir")
        .arg(dir.join("cache"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .args(comfy.args())
        .args(["--database-url", database_url])
        .args(extra)
        .env_remove("FLOWHOST_API_KEYS")
        .env_remove("FLOWHOST_ADMIN_KEYS")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    Ok((KillOnDrop(child), format!("http://127.0.0.1:{port}")))
}

async fn healthy(client: &reqwest::Client, base: &str) -> Result<()> {
    let started = Instant::now();
    loop {
        if let Ok(r) = client.get(format!("{base}/health")).send().await {
            if let Ok(h) = r.json::<Value>().await {
                if h["comfyui"]["status"] == "ready" {
                    return Ok(());
                }
            }
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("{base} never became ready");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn transactions(pool: &sqlx::PgPool) -> Result<i64> {
    // Stats are flushed by each backend about once a second: wait them out before reading.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let _: Option<()> = sqlx::query_scalar("SELECT pg_stat_clear_snapshot()").fetch_optional(pool).await.ok().flatten();
    Ok(sqlx::query_scalar("SELECT (xact_commit + xact_rollback)::bigint FROM pg_stat_database WHERE datname = current_database()").fetch_one(pool).await?)
}

/// Transactions per second over [`WINDOW`] (this bench's own reads are two of them).
async fn rate(pool: &sqlx::PgPool) -> Result<f64> {
    let before = transactions(pool).await?;
    tokio::time::sleep(WINDOW).await;
    let after = transactions(pool).await?;
    Ok((after - before - 2) as f64 / (WINDOW.as_secs_f64() + 1.5))
}

#[tokio::main]
async fn main() -> Result<()> {
    let bin = std::env::var("FLOWHOST_BIN").map(std::path::PathBuf::from).unwrap_or_else(|_| flowhost_tests::flowhost_binary());
    // Instance A runs the job; the same build as B unless named (`FLOWHOST_RUNNER`): two
    // builds must agree on the database's migrations.
    let runner = std::env::var("FLOWHOST_RUNNER").map(std::path::PathBuf::from).unwrap_or_else(|_| bin.clone());
    let streams: usize = std::env::var("STREAMS").ok().and_then(|s| s.parse().ok()).unwrap_or(500);
    let extra: Vec<String> = std::env::var("FLOWHOST_EXTRA_ARGS").unwrap_or_default().split_whitespace().map(str::to_string).collect();
    let pg = PgCluster::start().await?;
    let database_url = pg.fresh_database().await?;
    let pool = sqlx::PgPool::connect(&database_url).await?;
    let comfy = ExternalComfy::start().await?;
    comfy.double.faults().hang(true);
    let dirs = (tempfile::tempdir()?, tempfile::tempdir()?);
    let client = reqwest::Client::new();

    let (_a, a) = instance(&runner, dirs.0.path(), &comfy, &database_url, &[])?;
    healthy(&client, &a).await?;
    let workflow = json!({
        "5": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "sse"}}
    });
    let job: Value = client.post(format!("{a}/api/v2/jobs")).json(&json!({"workflow": workflow})).send().await?.json().await?;
    let id = job["id"].as_str().context("job id")?.to_string();
    let started = Instant::now();
    while client.get(format!("{a}/api/v2/jobs/{id}")).send().await?.json::<Value>().await?["status"] != "running" {
        if started.elapsed() > Duration::from_secs(30) {
            bail!("the job never ran on A");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (b_child, b) = instance(&bin, dirs.1.path(), &comfy, &database_url, &extra)?;
    let pid = b_child.0.id();
    healthy(&client, &b).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let without = rate(&pool).await?;
    let rss_before = rss_kib(pid);

    let mut open = Vec::with_capacity(streams);
    let mut refused = 0usize;
    for _ in 0..streams {
        let response = client.get(format!("{b}/api/v2/jobs/{id}/events")).send().await?;
        if response.status() != 200 {
            refused += 1;
            continue;
        }
        let mut body = response.bytes_stream();
        let _snapshot = body.next().await;
        open.push(body);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = rss_kib(pid);
    let with = rate(&pool).await?;
    let served = open.len();
    row(&["binary".into(), "streams asked / served / refused".into(), "RSS before → after (MiB)".into(), "RSS per stream (KiB)".into(), "PG xact/s without → with".into(), "per remote stream".into()]);
    row(&["---".into(), "---".into(), "---".into(), "---".into(), "---".into(), "---".into()]);
    row(&[
        bin.display().to_string(),
        format!("{streams} / {served} / {refused}"),
        format!("{:.0} → {:.0}", rss_before as f64 / 1024.0, rss_after as f64 / 1024.0),
        format!("{:.1}", (rss_after.saturating_sub(rss_before)) as f64 / served.max(1) as f64),
        format!("{without:.1} → {with:.1}"),
        format!("{:.3}", (with - without) / served.max(1) as f64),
    ]);
    drop(open);
    comfy.double.faults().hang(false);
    Ok(())
}
