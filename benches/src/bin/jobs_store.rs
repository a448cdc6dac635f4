//! The durable path's added cost per job, against SQLite (WAL) and the blob folder
//! in a temporary state dir: insert the job, mark it running, write a 256 KiB output
//! blob, record the asset, mark it succeeded — what every generation now pays on top
//! of ComfyUI. Then `get job` (record + outputs), the read behind every poll.
//!
//! `cargo run --release -p flowhost-benches --bin jobs_store`

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Result;
use flowhost::jobs::blobs::{BlobStore, FsBlobStore};
use flowhost::jobs::{Asset, AssetRole, Job, JobSource, JobSpec, JobStatus, JobStore, SqliteStore};
use flowhost_benches::{row, summarize};
use serde_json::json;

const JOBS: usize = 2000;
const WARMUP: usize = 200;

fn graph() -> serde_json::Map<String, serde_json::Value> {
    // The size of a real /flux-dev graph (nine nodes).
    let mut g = serde_json::Map::new();
    for i in 0..9 {
        g.insert(i.to_string(), json!({"class_type": "KSampler", "inputs": {"seed": i, "steps": 20, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0, "model": ["1", 0]}}));
    }
    g
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let store: Arc<dyn JobStore> = Arc::new(SqliteStore::open(&dir.path().join("jobs.db")).await?);
    let blobs: Arc<dyn BlobStore> = Arc::new(FsBlobStore::new(dir.path().join("blobs"))?);
    let source = JobSource::Route { route: "/flux-dev".into(), plugin: "flux-dev".into(), version: "0.1.0".into() };
    let mut path = Vec::with_capacity(JOBS);
    let mut ids = Vec::with_capacity(JOBS);
    for i in 0..JOBS + WARMUP {
        // Distinct bytes per job (a real output never dedups).
        let mut bytes = vec![0u8; 256 << 10];
        bytes[..8].copy_from_slice(&(i as u64).to_le_bytes());
        let started = Instant::now();
        let mut job = Job::new(source.clone(), JobSpec::new(graph()), Duration::from_secs(86_400));
        store.insert_job(&job, &[]).await?;
        job.status = JobStatus::Running;
        job.started_at = Some(SystemTime::now());
        job.prompt_id = Some(uuid_like(i));
        store.update_job(&job).await?;
        let size = bytes.len() as u64;
        let (hash, _) = blobs.put(bytes.into()).await?;
        let asset = Asset {
            id: job.id, // any unique id
            hash,
            size_bytes: size,
            content_type: "image/jpeg".into(),
            name: Some("ComfyUI_00001_.jpg".into()),
            job_id: Some(job.id),
            node_id: Some("9".into()),
            role: AssetRole::Output,
            created_at: SystemTime::now(),
            expires_at: Some(job.expires_at),
            tenant: None,
        };
        store.insert_asset(&asset).await?;
        job.status = JobStatus::Succeeded;
        job.completed_at = Some(SystemTime::now());
        store.update_job(&job).await?;
        if i >= WARMUP {
            path.push(started.elapsed());
            ids.push(job.id);
        }
    }
    let mut gets = Vec::with_capacity(JOBS);
    for id in &ids {
        let started = Instant::now();
        let job = store.get_job(*id).await?;
        gets.push(started.elapsed());
        assert!(job.is_some_and(|j| j.outputs.len() == 1));
    }
    row(&["measure".into(), "p50 µs".into(), "p99 µs".into(), "mean µs".into(), "n".into()]);
    row(&["---".into(), "---:".into(), "---:".into(), "---:".into(), "---:".into()]);
    for (name, samples) in [("durable path per job (insert + running + 256 KiB blob + asset + succeeded)", path), ("get job (record + outputs)", gets)] {
        let s = summarize(samples);
        row(&[name.into(), format!("{:.1}", s.p50_us), format!("{:.1}", s.p99_us), format!("{:.1}", s.mean_us), s.n.to_string()]);
    }
    Ok(())
}

fn uuid_like(i: usize) -> String {
    format!("00000000-0000-4000-8000-{i:012}")
}
