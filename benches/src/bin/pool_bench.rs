//! Worker pool and affinity dispatch (issue #13), against ComfyUI doubles that pay for a
//! model switch: 40 jobs over 4 LoRAs through `/api/v2/jobs` on 1 and on 4 workers,
//! FIFO vs affinity dispatch. Scaled down from an H200 (a LoRA switch 9–22 s, a job a
//! few seconds) to a 200 ms switch and a ~50 ms job; the wait bound is scaled with it
//! (5 s: longer than one worker needs for all 40 jobs under affinity, so it never cuts
//! in; the table shows the longest wait against it).
//!
//! Reports per run: total time (first submit to last job done), model switches the
//! doubles paid for, p95 and max queue wait (admission to dispatch), throughput.
//!
//! `cargo run --release -p flowhost-benches --bin pool_bench`

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use comfyui_double::{ComfyDouble, DoubleConfig};
use flowhost::jobs::JobStatus;
use flowhost_benches::{percentile, row};
use serde_json::{Value, json};

const SWITCH: Duration = Duration::from_millis(200);
/// Per executed node and sampler step: 7 nodes + 3 steps ≈ 50 ms a job.
const STEP: Duration = Duration::from_millis(5);
const STEPS: u32 = 3;
const JOBS: usize = 40;
const LORAS: usize = 4;
const WAIT_BOUND_S: f64 = 5.0;

fn graph(lora: usize, seed: u64) -> Value {
    json!({
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
        "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": format!("style-{lora}.safetensors"), "strength_model": 0.8, "strength_clip": 0.8}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": "a lighthouse at dawn"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": ""}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["2", 0], "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0], "seed": seed, "steps": STEPS, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "bench"}}
    })
}

/// The LoRA of each of the 40 jobs: ten of each, interleaved.
fn order(shuffled: bool) -> Vec<usize> {
    let mut order: Vec<usize> = (0..JOBS).map(|i| i % LORAS).collect();
    if shuffled {
        // Fisher–Yates with a fixed LCG: the same "random" arrival order every run.
        let mut state: u64 = 13;
        for i in (1..order.len()).rev() {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let j = (state >> 33) as usize % (i + 1);
            order.swap(i, j);
        }
    }
    order
}

struct Outcome {
    total: Duration,
    switches: u64,
    waits: Vec<Duration>,
}

async fn run(workers: usize, dispatch: &str, shuffled: bool) -> Result<Outcome> {
    let models = tempfile::tempdir()?;
    let mut files = vec![("checkpoints".to_string(), "sd_xl_base_1.0.safetensors".to_string())];
    files.extend((0..LORAS).map(|l| ("loras".to_string(), format!("style-{l}.safetensors"))));
    for (folder, name) in &files {
        let path = models.path().join(folder).join(name);
        std::fs::create_dir_all(path.parent().context("parent")?)?;
        std::fs::write(path, b"placeholder weights")?;
    }
    let mut doubles = Vec::new();
    for _ in 0..workers {
        let double = ComfyDouble::start(DoubleConfig { models_dir: Some(models.path().to_path_buf()), keep_record: false, ..Default::default() }).await?;
        double.faults().set_model_switch_cost(SWITCH);
        double.faults().set_step_latency(STEP);
        doubles.push(double);
    }
    let mut args: Vec<String> = Vec::new();
    for d in &doubles {
        args.extend(["--comfyui-url".into(), d.url()]);
    }
    let bound = WAIT_BOUND_S.to_string();
    args.extend(["--models", &models.path().to_string_lossy(), "--max-in-flight", "1", "--dispatch", dispatch, "--affinity-wait-bound", &bound].map(String::from));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = flowhost_tests::TestServer::start(&[], &refs).await?;
    let base = server.base.clone();
    let client = reqwest::Client::new();
    let ready = flowhost_tests::eventually(Duration::from_secs(60), || async {
        let h: Value = client.get(format!("{base}/health")).send().await.ok()?.json().await.ok()?;
        let all = h["workers"].as_array()?.iter().all(|w| w["status"] == "ready");
        all.then_some(())
    })
    .await;
    if ready.is_none() {
        bail!("the pool never became ready");
    }
    let started = Instant::now();
    let mut ids = Vec::new();
    for (i, lora) in order(shuffled).into_iter().enumerate() {
        let response = client.post(format!("{base}/api/v2/jobs")).json(&json!({"workflow": graph(lora, i as u64)})).send().await?;
        if response.status() != 201 {
            bail!("submit answered {}: {}", response.status(), response.text().await?);
        }
        let job: Value = response.json().await?;
        ids.push(uuid::Uuid::parse_str(job["id"].as_str().context("id")?)?);
    }
    let jobs = server.server.state.jobs.clone();
    let mut waits = Vec::new();
    for id in ids {
        let job = loop {
            match jobs.get(id).await {
                Ok(Some(job)) if job.status.is_terminal() => break job,
                _ => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        };
        if job.status != JobStatus::Succeeded {
            bail!("job {id} ended {}: {:?}", job.status.as_str(), job.error);
        }
        waits.push(Duration::from_millis(job.metrics.queue_ms.unwrap_or(0)));
    }
    let total = started.elapsed();
    let switches = doubles.iter().map(|d| d.model_state().switches).sum();
    server.server.shutdown().await?;
    Ok(Outcome { total, switches, waits })
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    row(&["arrival", "workers", "dispatch", "total s", "jobs/s", "switches", "p95 wait s", "max wait s"].map(String::from));
    row(&["---", "---:", "---", "---:", "---:", "---:", "---:", "---:"].map(String::from));
    let mut results = Vec::new();
    for shuffled in [false, true] {
        for workers in [1, 4] {
            for dispatch in ["fifo", "affinity"] {
                let mut outcome = run(workers, dispatch, shuffled).await?;
                outcome.waits.sort();
                let p95 = percentile(&outcome.waits, 95.0);
                let max = outcome.waits.last().copied().unwrap_or_default();
                row(&[
                    if shuffled { "shuffled (seed 13)" } else { "round-robin" }.to_string(),
                    workers.to_string(),
                    dispatch.to_string(),
                    format!("{:.2}", outcome.total.as_secs_f64()),
                    format!("{:.1}", JOBS as f64 / outcome.total.as_secs_f64()),
                    outcome.switches.to_string(),
                    format!("{:.2}", p95.as_secs_f64()),
                    format!("{:.2}", max.as_secs_f64()),
                ]);
                results.push((shuffled, workers, dispatch, outcome.total, outcome.switches, max));
            }
        }
    }
    let find = |s: bool, w: usize, d: &str| results.iter().find(|r| r.0 == s && r.1 == w && r.2 == d).copied().context("a run");
    let mut summary = String::from("\n");
    for shuffled in [false, true] {
        for workers in [1, 4] {
            let (fifo, affinity) = (find(shuffled, workers, "fifo")?, find(shuffled, workers, "affinity")?);
            summary += &format!(
                "- {} on {workers} worker(s): FIFO {} switches, affinity {} ({:.1}× fewer); longest wait {:.2} s (bound {WAIT_BOUND_S} s)\n",
                if shuffled { "shuffled" } else { "round-robin" },
                fifo.4,
                affinity.4,
                fifo.4 as f64 / affinity.4.max(1) as f64,
                affinity.5.as_secs_f64()
            );
        }
        let (one, four) = (find(shuffled, 1, "affinity")?, find(shuffled, 4, "affinity")?);
        summary += &format!("- {}: 4 workers vs 1 under affinity: {:.2}× the throughput\n", if shuffled { "shuffled" } else { "round-robin" }, one.3.as_secs_f64() / four.3.as_secs_f64());
    }
    std::io::Write::write_all(&mut std::io::stdout(), summary.as_bytes())?;
    Ok(())
}
