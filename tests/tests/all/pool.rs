//! A pool of ComfyUI workers behind one flowhost (issue #13), end to end: several
//! ComfyUI doubles (one shared model volume) behind one in-process `flowhost serve`
//! with a repeated `--comfyui-url`, real plugins (`/flux-lora`, one LoRA per model
//! set), real sockets. What the doubles saw (prompt order, model switches) is the
//! evidence: it is what a GPU would have paid for.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use comfyui_double::{ComfyDouble, DoubleConfig};
use flowhost::jobs::{Job, JobStatus};
use flowhost_tests::{TestServer, build_component, eventually};
use serde_json::{Value, json};
use uuid::Uuid;

const LORAS: [&str; 4] = ["lora-a", "lora-b", "lora-c", "lora-d"];

fn flux_lora_component() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| build_component("flux-lora", &[]).expect("flux-lora builds")).clone()
}

/// N doubles over one model volume (Flux and four LoRAs), and flowhost in front of them.
struct Pool {
    doubles: Vec<ComfyDouble>,
    server: TestServer,
    _models: tempfile::TempDir,
}

impl Pool {
    async fn start(workers: usize, extra: &[&str]) -> Pool {
        let models = tempfile::tempdir().unwrap();
        let mut files: Vec<(&str, String)> =
            vec![("diffusion_models", "flux1-dev.safetensors".into()), ("text_encoders", "clip_l.safetensors".into()), ("text_encoders", "t5xxl_fp16.safetensors".into()), ("vae", "ae.safetensors".into())];
        files.extend(LORAS.iter().map(|l| ("loras", format!("{l}.safetensors"))));
        for (folder, name) in &files {
            let path = models.path().join(folder).join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, b"placeholder weights").unwrap();
        }
        let mut doubles = Vec::new();
        for _ in 0..workers {
            doubles.push(ComfyDouble::start(DoubleConfig { models_dir: Some(models.path().to_path_buf()), ..Default::default() }).await.unwrap());
        }
        let mut args: Vec<String> = Vec::new();
        for d in &doubles {
            args.extend(["--comfyui-url".into(), d.url()]);
        }
        args.extend(["--models".into(), models.path().to_string_lossy().into(), "--max-in-flight".into(), "1".into()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let component = flux_lora_component();
        let server = TestServer::start(&[("flux-lora.wasm", Path::new(&component))], &refs).await.unwrap();
        let pool = Pool { doubles, server, _models: models };
        pool.wait_workers_ready(workers).await;
        pool
    }

    async fn health(&self) -> Value {
        self.server.client.get(self.server.url("/health")).send().await.unwrap().json().await.unwrap()
    }

    async fn wait_workers_ready(&self, n: usize) {
        let ready = eventually(Duration::from_secs(30), || async {
            let h = self.health().await;
            let workers = h["workers"].as_array()?;
            (workers.len() == n && workers.iter().all(|w| w["status"] == "ready") && h["endpoints"][0]["ready"] == true).then_some(())
        })
        .await;
        assert!(ready.is_some(), "the pool never became ready: {}", self.health().await);
    }

    /// `POST /flux-lora` with `Prefer: respond-async`: the job id.
    async fn submit(&self, lora: &str, seed: u64) -> Uuid {
        let body = json!({"prompt": "a portrait", "lora_id": lora, "width": 256, "height": 256, "steps": 2, "seed": seed});
        let response = self.server.client.post(self.server.url("/flux-lora")).header("prefer", "respond-async").json(&body).send().await.unwrap();
        assert_eq!(response.status(), 202, "{:?}", response.text().await);
        let job: Value = response.json().await.unwrap();
        Uuid::parse_str(job["id"].as_str().expect("a job id")).unwrap()
    }

    async fn wait_terminal(&self, id: &Uuid) -> Job {
        let jobs = self.server.server.state.jobs.clone();
        let done = eventually(Duration::from_secs(60), || async { jobs.get(*id).await.ok().flatten().filter(|j| j.status.is_terminal()) }).await;
        done.unwrap_or_else(|| panic!("job {id} never ended"))
    }

    /// The LoRA of every prompt a double ran, in the order it received them.
    fn loras_run_by(&self, worker: usize) -> Vec<String> {
        self.doubles[worker].record().prompts.iter().filter_map(|(_, graph)| lora_of(graph)).collect()
    }
}

fn lora_of(graph: &Value) -> Option<String> {
    graph.as_object()?.values().find(|n| n["class_type"].as_str().is_some_and(|c| c.starts_with("LoraLoader"))).and_then(|n| n["inputs"]["lora_name"].as_str()).map(|n| n.trim_end_matches(".safetensors").to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn doubles_behind_one_flowhost_share_the_load_and_health_lists_them() {
    let pool = Pool::start(3, &[]).await;
    for d in &pool.doubles {
        d.faults().set_step_latency(Duration::from_millis(20));
    }
    let mut ids = Vec::new();
    for i in 0..12u64 {
        ids.push(pool.submit(LORAS[(i % 3) as usize], i).await);
    }
    for id in &ids {
        let job = pool.wait_terminal(id).await;
        assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");
    }
    let ran: Vec<usize> = (0..3).map(|w| pool.loras_run_by(w).len()).collect();
    assert_eq!(ran.iter().sum::<usize>(), 12, "{ran:?}");
    assert!(ran.iter().all(|n| *n > 0), "every worker took jobs: {ran:?}");
    let health = pool.health().await;
    let workers = health["workers"].as_array().unwrap();
    assert_eq!(workers.iter().map(|w| w["name"].as_str().unwrap()).collect::<Vec<_>>(), ["w0", "w1", "w2"]);
    assert_eq!(workers.iter().map(|w| w["jobs"].as_u64().unwrap()).sum::<u64>(), 12);
    assert!(!health.to_string().contains("127.0.0.1"), "no worker address leaks: {health}");
    let metrics = pool.server.client.get(pool.server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("flowhost_model_switches_total{worker=\"w0\"}"), "{metrics}");
    assert!(metrics.contains("flowhost_dispatch_wait_duration_seconds_count{route=\"/flux-lora\"} 12"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_killed_mid_run_ends_its_job_while_the_others_keep_serving() {
    let pool = Pool::start(2, &[]).await;
    // w0's ComfyUI holds its first prompt until it dies; w1 serves normally. Submit until
    // w0 has one (which worker claims a job first is up to the race of two idle workers).
    pool.doubles[0].faults().hang(true);
    let mut early = Vec::new();
    for i in 0..10u64 {
        early.push(pool.submit(LORAS[(i % 2) as usize], i).await);
        let on_w0 = eventually(Duration::from_millis(500), || async { (!pool.doubles[0].record().prompts.is_empty()).then_some(()) }).await;
        if on_w0.is_some() {
            break;
        }
    }
    assert!(!pool.doubles[0].record().prompts.is_empty(), "w0 never got a prompt");
    pool.doubles[0].faults().crash();
    let mut failed = 0;
    for id in &early {
        let job = pool.wait_terminal(id).await;
        if job.status == JobStatus::Failed {
            failed += 1;
        } else {
            assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");
        }
    }
    assert_eq!(failed, 1, "exactly the job the dead worker held ends failed");
    let down = eventually(Duration::from_secs(20), || async { (pool.health().await["workers"][0]["status"] == "down").then_some(()) }).await;
    assert!(down.is_some(), "w0 never reported down: {}", pool.health().await);
    // The others keep serving: every later job completes, none goes to the dead worker.
    let mut later = Vec::new();
    for i in 0..6u64 {
        later.push(pool.submit(LORAS[(i % 2) as usize], 10 + i).await);
    }
    for id in &later {
        let job = pool.wait_terminal(id).await;
        assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");
    }
    let health = pool.health().await;
    assert_eq!(health["workers"][1]["status"], "ready", "{health}");
    assert_eq!(health["status"], "ready", "one serving worker keeps the service ready: {health}");
}

/// One worker, its ComfyUI held on a `lora-a` job while b, a, b, a queue behind it.
async fn queue_behind_a_held_job(bound: &str) -> Pool {
    let pool = Pool::start(1, &["--affinity-wait-bound", bound]).await;
    pool.doubles[0].faults().hang(true);
    let first = pool.submit("lora-a", 0).await;
    let held = eventually(Duration::from_secs(20), || async { (pool.doubles[0].record().prompts.len() == 1).then_some(()) }).await;
    assert!(held.is_some(), "the first job never reached ComfyUI");
    let mut ids = vec![first];
    for (i, lora) in ["lora-b", "lora-a", "lora-b", "lora-a"].iter().enumerate() {
        ids.push(pool.submit(lora, 1 + i as u64).await);
    }
    // Everyone has waited a little before the worker is free again.
    tokio::time::sleep(Duration::from_millis(300)).await;
    pool.doubles[0].faults().hang(false);
    for id in &ids {
        assert_eq!(pool.wait_terminal(id).await.status, JobStatus::Succeeded);
    }
    pool
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn affinity_wait_bound_obeyed() {
    // Nobody has waited 60 s: the loaded LoRA's jobs go first, one switch to b at the end.
    let pool = queue_behind_a_held_job("60").await;
    assert_eq!(pool.loras_run_by(0), ["lora-a", "lora-a", "lora-a", "lora-b", "lora-b"]);
    assert_eq!(pool.doubles[0].model_state().switches, 2, "load a, then b once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn affinity_wait_bound_violated() {
    // Every queued job has waited past a 0.1 s bound: the oldest goes first, switch or not.
    let pool = queue_behind_a_held_job("0.1").await;
    assert_eq!(pool.loras_run_by(0), ["lora-a", "lora-b", "lora-a", "lora-b", "lora-a"]);
    assert_eq!(pool.doubles[0].model_state().switches, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifo_dispatch_ignores_what_is_loaded() {
    let pool = Pool::start(1, &["--dispatch", "fifo"]).await;
    pool.doubles[0].faults().hang(true);
    let mut ids = vec![pool.submit("lora-a", 0).await];
    let held = eventually(Duration::from_secs(20), || async { (pool.doubles[0].record().prompts.len() == 1).then_some(()) }).await;
    assert!(held.is_some());
    for (i, lora) in ["lora-b", "lora-a"].iter().enumerate() {
        ids.push(pool.submit(lora, 1 + i as u64).await);
    }
    pool.doubles[0].faults().hang(false);
    for id in &ids {
        assert_eq!(pool.wait_terminal(id).await.status, JobStatus::Succeeded);
    }
    assert_eq!(pool.loras_run_by(0), ["lora-a", "lora-b", "lora-a"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lora_request_goes_to_the_worker_that_has_that_lora_loaded() {
    let pool = Pool::start(2, &[]).await;
    // Warm both workers: hold w0 and w1 each on a job so one gets lora-a and the other lora-b.
    for d in &pool.doubles {
        d.faults().hang(true);
    }
    let a = pool.submit("lora-a", 1).await;
    let b = pool.submit("lora-b", 2).await;
    let both = eventually(Duration::from_secs(20), || async { pool.doubles.iter().all(|d| d.record().prompts.len() == 1).then_some(()) }).await;
    assert!(both.is_some(), "each worker got one of the two first jobs");
    for d in &pool.doubles {
        d.faults().hang(false);
    }
    pool.wait_terminal(&a).await;
    pool.wait_terminal(&b).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    let has_a = if pool.loras_run_by(0) == ["lora-a"] { 0 } else { 1 };
    let health = pool.health().await;
    assert!(health["workers"][has_a]["loaded_models"].as_str().unwrap_or_default().contains("lora-a"), "{health}");
    // Both idle now. A lora-b request, then a lora-a one: each goes where its LoRA is.
    for round in 0..3u64 {
        let jb = pool.submit("lora-b", 10 + round).await;
        let ja = pool.submit("lora-a", 20 + round).await;
        pool.wait_terminal(&jb).await;
        pool.wait_terminal(&ja).await;
        // Let both dispatch loops finish their clean-up and wait for work again.
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert_eq!(pool.loras_run_by(has_a), ["lora-a"; 4]);
    assert_eq!(pool.loras_run_by(1 - has_a), ["lora-b"; 4]);
    let switches: u64 = pool.doubles.iter().map(|d| d.model_state().switches).sum();
    assert_eq!(switches, 2, "only the first load on each worker");
}

/// A trivial graph (no models) for `/api/v2/jobs`.
fn tiny_graph(width: u32) -> Value {
    json!({
        "5": {"class_type": "EmptyImage", "inputs": {"width": width, "height": 64, "batch_size": 1, "color": 0}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "pool"}}
    })
}

async fn run_v2(server: &TestServer, width: u32) -> Job {
    let response = server.client.post(server.url("/api/v2/jobs")).json(&json!({"workflow": tiny_graph(width)})).send().await.unwrap();
    assert_eq!(response.status(), 201, "{:?}", response.text().await);
    let job: Value = response.json().await.unwrap();
    let id = Uuid::parse_str(job["id"].as_str().unwrap()).unwrap();
    let jobs = server.server.state.jobs.clone();
    eventually(Duration::from_secs(60), || async { jobs.get(id).await.ok().flatten().filter(|j| j.status.is_terminal()) }).await.expect("the job ends")
}

async fn wait_pool_ready(server: &TestServer, n: usize) -> Value {
    let health = eventually(Duration::from_secs(60), || async {
        let h: Value = server.client.get(server.url("/health")).send().await.ok()?.json().await.ok()?;
        let workers = h["workers"].as_array()?;
        (workers.len() == n && workers.iter().all(|w| w["status"] == "ready")).then_some(h)
    })
    .await;
    health.expect("the pool becomes ready")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn simulate_with_workers_runs_a_pool_of_doubles() {
    let server = TestServer::start(&[], &["--simulate", "--workers", "3"]).await.unwrap();
    let health = wait_pool_ready(&server, 3).await;
    assert_eq!(health["simulated"], true);
    for width in [64, 72, 80] {
        assert_eq!(run_v2(&server, width).await.status, JobStatus::Succeeded);
    }
}

/// A ComfyUI checkout whose main.py notes the GPU it was given (`cuda.txt` beside its input
/// folder), then runs the double.
fn gpu_noting_comfyui() -> tempfile::TempDir {
    let comfyui = tempfile::tempdir().unwrap();
    let bin = flowhost_tests::double_binary();
    let main = format!(
        "import os, sys\nargs = sys.argv[1:]\ninp = args[args.index('--input-directory') + 1]\n\
         open(os.path.join(inp, '..', 'cuda.txt'), 'w').write(os.environ.get('CUDA_VISIBLE_DEVICES', 'unset'))\n\
         binary = {:?}\nos.execv(binary, [binary] + args)\n",
        bin.to_string_lossy()
    );
    std::fs::write(comfyui.path().join("main.py"), main).unwrap();
    comfyui
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_supervised_comfyui_per_gpu_each_pinned_with_its_own_folders() {
    let comfyui = gpu_noting_comfyui();
    let state = tempfile::tempdir().unwrap();
    let (dir, state_dir) = (comfyui.path().to_string_lossy().to_string(), state.path().to_string_lossy().to_string());
    let server = TestServer::start(&[], &["--comfyui-dir", &dir, "--gpus", "0,1", "--state-dir", &state_dir, "--comfyui-startup-timeout", "60"]).await.unwrap();
    let health = wait_pool_ready(&server, 2).await;
    assert_eq!(health["workers"][0]["gpu"], "0");
    assert_eq!(health["workers"][1]["gpu"], "1");
    for gpu in ["0", "1"] {
        let noted = std::fs::read_to_string(state.path().join("comfyui").join(format!("gpu-{gpu}")).join("cuda.txt")).unwrap();
        assert_eq!(noted, gpu, "CUDA_VISIBLE_DEVICES of the ComfyUI for GPU {gpu}");
    }
    for width in [64, 72] {
        assert_eq!(run_v2(&server, width).await.status, JobStatus::Succeeded);
    }
    server.server.shutdown().await.unwrap();
}

/// One big card shared by two ComfyUIs (`--gpus 0,0`): both pinned to it, each with its own
/// folders (`gpu-0`, `gpu-0-2`), so neither numbers nor deletes the other's files.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gpu_listed_twice_gets_two_comfyuis_with_their_own_folders() {
    let comfyui = gpu_noting_comfyui();
    let state = tempfile::tempdir().unwrap();
    let (dir, state_dir) = (comfyui.path().to_string_lossy().to_string(), state.path().to_string_lossy().to_string());
    let server = TestServer::start(&[], &["--comfyui-dir", &dir, "--gpus", "0,0", "--state-dir", &state_dir, "--comfyui-startup-timeout", "60"]).await.unwrap();
    let health = wait_pool_ready(&server, 2).await;
    assert_eq!((health["workers"][0]["gpu"].as_str(), health["workers"][1]["gpu"].as_str()), (Some("0"), Some("0")));
    for folder in ["gpu-0", "gpu-0-2"] {
        let noted = std::fs::read_to_string(state.path().join("comfyui").join(folder).join("cuda.txt")).unwrap();
        assert_eq!(noted, "0", "{folder}'s ComfyUI runs on GPU 0");
    }
    for width in [64, 72] {
        assert_eq!(run_v2(&server, width).await.status, JobStatus::Succeeded);
    }
    server.server.shutdown().await.unwrap();
}
