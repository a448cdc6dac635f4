//! The shared work queue (issue #12): claim latency and throughput through the
//! PostgreSQL queue with 1, 2 and 4 flowhost instances (in-process, each with its own
//! zero-latency embedded ComfyUI double, `--max-in-flight 1`), poll latency of
//! `GET /api/v2/jobs/{id}`, and the same on the embedded SQLite store with the in-memory
//! queue. PostgreSQL is a throw-away local cluster (tests/support/pg.rs), fsync off:
//! the figures are the queue's and the store's path, not a disk's.
//!
//! - claim latency: one job at a time on an idle service, admission → dispatch
//!   (`metrics.queue_ms`): the NOTIFY wake-up plus the `FOR UPDATE SKIP LOCKED` claim.
//! - throughput: 200 jobs submitted at once, round-robin over the instances, first
//!   submit → last job done.
//! - poll: 500 sequential GETs of a finished job on one instance.
//!
//! `cargo run --release -p flowhost-benches --bin shared_queue`

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use flowhost::jobs::JobStatus;
use flowhost_benches::{percentile, row, summarize};
use flowhost_tests::TestServer;
use flowhost_tests::pg::PgCluster;
use serde_json::{Value, json};

const CLAIMS: usize = 50;
const BURST: usize = 200;
const POLLS: usize = 500;

fn workflow(n: usize) -> Value {
    json!({
        "5": {"class_type": "EmptyImage", "inputs": {"width": 16 + (n % 64) as u32, "height": 16, "batch_size": 1, "color": 255}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "bench"}}
    })
}

async fn submit(client: &reqwest::Client, base: &str, n: usize) -> Result<uuid::Uuid> {
    let response = client.post(format!("{base}/api/v2/jobs")).json(&json!({"workflow": workflow(n)})).send().await?;
    if response.status() != 201 {
        bail!("submit answered {}: {}", response.status(), response.text().await?);
    }
    let job: Value = response.json().await?;
    Ok(uuid::Uuid::parse_str(job["id"].as_str().context("id")?)?)
}

async fn done(server: &TestServer, id: uuid::Uuid) -> Result<flowhost::jobs::Job> {
    let jobs = server.server.state.jobs.clone();
    loop {
        match jobs.get(id).await {
            Ok(Some(job)) if job.status.is_terminal() => {
                if job.status != JobStatus::Succeeded {
                    bail!("job {id} ended {}: {:?}", job.status.as_str(), job.error);
                }
                return Ok(job);
            }
            _ => tokio::time::sleep(Duration::from_millis(2)).await,
        }
    }
}

struct Outcome {
    claim_p50: Duration,
    claim_p95: Duration,
    burst: Duration,
    poll_p50_us: f64,
    poll_p99_us: f64,
}

async fn run(instances: usize, database_url: Option<&str>) -> Result<Outcome> {
    let mut servers = Vec::new();
    for _ in 0..instances {
        let mut args = vec!["--simulate", "--max-in-flight", "1", "--queue-depth", "1000"];
        if let Some(url) = database_url {
            args.extend(["--database-url", url]);
        }
        servers.push(TestServer::start(&[], &args).await?);
    }
    let client = reqwest::Client::new();
    for server in &servers {
        let base = server.base.clone();
        let ready = flowhost_tests::eventually(Duration::from_secs(60), || async {
            let h: Value = client.get(format!("{base}/health")).send().await.ok()?.json().await.ok()?;
            (h["comfyui"]["status"] == "ready").then_some(())
        })
        .await;
        if ready.is_none() {
            bail!("{base} never became ready");
        }
    }
    // Claim latency on an idle service, submitting on each instance in turn.
    let mut claims = Vec::new();
    for n in 0..CLAIMS {
        let server = &servers[n % instances];
        let id = submit(&client, &server.base, n).await?;
        let job = done(server, id).await?;
        claims.push(Duration::from_millis(job.metrics.queue_ms.unwrap_or(0)));
    }
    claims.sort();
    // Throughput: a burst over every instance.
    let started = Instant::now();
    let submits = (0..BURST).map(|n| {
        let (client, base) = (client.clone(), servers[n % instances].base.clone());
        async move { submit(&client, &base, CLAIMS + n).await }
    });
    let ids = futures::future::try_join_all(submits).await?;
    let mut last = None;
    for id in &ids {
        last = Some(done(&servers[0], *id).await?);
    }
    let burst = started.elapsed();
    // Poll latency of one finished job.
    let id = last.context("a job")?.id;
    let url = format!("{}/api/v2/jobs/{id}", servers[0].base);
    let mut polls = Vec::with_capacity(POLLS);
    for _ in 0..POLLS {
        let at = Instant::now();
        let response = client.get(&url).send().await?;
        response.bytes().await?;
        polls.push(at.elapsed());
    }
    let polls = summarize(polls);
    for server in servers {
        server.server.shutdown().await?;
    }
    Ok(Outcome { claim_p50: percentile(&claims, 50.0), claim_p95: percentile(&claims, 95.0), burst, poll_p50_us: polls.p50_us, poll_p99_us: polls.p99_us })
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    let cluster = PgCluster::start().await?;
    row(&["store / queue", "instances", "claim p50 ms", "claim p95 ms", "200 jobs s", "jobs/s", "poll p50 µs", "poll p99 µs"].map(String::from));
    row(&["---", "---:", "---:", "---:", "---:", "---:", "---:", "---:"].map(String::from));
    let mut runs: Vec<(String, usize, Option<String>)> = vec![("SQLite / in-memory".into(), 1, None)];
    for instances in [1, 2, 4] {
        runs.push(("PostgreSQL / shared".into(), instances, Some(cluster.fresh_database().await?)));
    }
    for (label, instances, url) in runs {
        let outcome = run(instances, url.as_deref()).await?;
        row(&[
            label,
            instances.to_string(),
            format!("{:.1}", outcome.claim_p50.as_secs_f64() * 1e3),
            format!("{:.1}", outcome.claim_p95.as_secs_f64() * 1e3),
            format!("{:.2}", outcome.burst.as_secs_f64()),
            format!("{:.0}", BURST as f64 / outcome.burst.as_secs_f64()),
            format!("{:.0}", outcome.poll_p50_us),
            format!("{:.0}", outcome.poll_p99_us),
        ]);
    }
    Ok(())
}
