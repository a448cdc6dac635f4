//! Many instances, one service (issue #12): real `flowhost serve` processes sharing a
//! real PostgreSQL job store and a real S3-compatible bucket (moto), each against a
//! ComfyUI double of its own that the test watches (its record counts every prompt
//! it was given). A job submitted on one instance is claimed from the shared queue by
//! whichever has a free slot, and polled, streamed, downloaded and canceled through any.

use std::process::{Command, Stdio};
use std::time::Duration;

use flowhost_tests::pg::PgCluster;
use flowhost_tests::s3::S3Server;
use flowhost_tests::{ExternalComfy, KillOnDrop, eventually, free_port};
use futures::StreamExt;
use serde_json::{Value, json};

/// The lease every instance in these tests holds jobs with: short, so a dead instance's
/// job moves on within the test.
const LEASE_S: &str = "2";

/// What the instances share.
struct SharedState {
    _cluster: PgCluster,
    s3: S3Server,
    database_url: String,
}

impl SharedState {
    async fn start() -> SharedState {
        let cluster = PgCluster::start().await.expect("a PostgreSQL test cluster starts");
        let database_url = cluster.fresh_database().await.unwrap();
        let s3 = S3Server::start("flowhost-shared").await.expect("moto starts");
        SharedState { _cluster: cluster, s3, database_url }
    }
}

/// One `flowhost serve` process and the ComfyUI double it drives.
struct Instance {
    process: Option<KillOnDrop>,
    base: String,
    comfy: ExternalComfy,
    _dirs: Vec<tempfile::TempDir>,
}

impl Instance {
    async fn start(shared: &SharedState, extra: &[&str]) -> Instance {
        Self::start_with(shared, extra, &[]).await
    }

    /// With plugin components (`(file name, path)`) in its plugins folder.
    async fn start_with(shared: &SharedState, extra: &[&str], components: &[(&str, std::path::PathBuf)]) -> Instance {
        let comfy = ExternalComfy::start().await.unwrap();
        let (plugins, cache, state) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        for (name, path) in components {
            std::fs::copy(path, plugins.path().join(name)).unwrap();
        }
        let port = free_port();
        let mut command = Command::new(flowhost_tests::flowhost_binary());
        command
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .arg("--plugins")
            .arg(plugins.path())
            .arg("--cache-dir")
            .arg(cache.path())
            .arg("--state-dir")
            .arg(state.path())
            .args(comfy.args())
            .args(["--database-url", &shared.database_url, "--blob-store", &shared.s3.blob_store_url("outputs"), "--lease-seconds", LEASE_S])
            // These tests count prompts on the doubles: no warm-up prompts unless asked.
            .args(if extra.contains(&"--warm-up") { &[][..] } else { &["--warm-up", "off"][..] })
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for (key, value) in shared.s3.aws_vars() {
            command.env(key, value);
        }
        let child = command.spawn().expect("the flowhost binary starts");
        let base = format!("http://127.0.0.1:{port}");
        let instance = Instance { process: Some(KillOnDrop(child)), base, comfy, _dirs: vec![plugins, cache, state] };
        let client = reqwest::Client::new();
        let ready = eventually(Duration::from_secs(60), || async {
            let h: Value = client.get(format!("{}/health", instance.base)).send().await.ok()?.json().await.ok()?;
            (h["comfyui"]["status"] == "ready").then_some(h)
        })
        .await
        .unwrap_or_else(|| panic!("{} never became ready", instance.base));
        assert_eq!(ready["jobs"]["durability"], "shared", "{ready}");
        instance
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// SIGKILL, and its ComfyUI goes with it (a container that vanished).
    fn kill_9(&mut self) {
        self.process.take();
        self.comfy.double.faults().crash();
    }

    fn prompts(&self) -> Vec<Value> {
        self.comfy.double.record().prompts.into_iter().map(|(_, graph)| graph).collect()
    }
}

/// EmptyImage → SaveImage, `width` making each workflow distinct.
fn workflow(width: u32) -> Value {
    json!({
        "5": {"class_type": "EmptyImage", "inputs": {"width": width, "height": 32, "batch_size": 1, "color": 255}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "shared"}}
    })
}

async fn submit(client: &reqwest::Client, on: &Instance, width: u32) -> String {
    let response = client.post(on.url("/api/v2/jobs")).json(&json!({"workflow": workflow(width)})).send().await.unwrap();
    assert_eq!(response.status(), 201, "{:?}", response.text().await);
    let job: Value = response.json().await.unwrap();
    job["id"].as_str().unwrap().to_string()
}

async fn job(client: &reqwest::Client, on: &Instance, id: &str) -> Value {
    client.get(on.url(&format!("/api/v2/jobs/{id}"))).send().await.unwrap().json().await.unwrap()
}

async fn status_eventually(client: &reqwest::Client, on: &Instance, id: &str, limit: Duration, want: impl Fn(&str) -> bool) -> Value {
    eventually(limit, || async {
        let j = job(client, on, id).await;
        want(j["status"].as_str().unwrap_or_default()).then_some(j)
    })
    .await
    .unwrap_or_else(|| panic!("job {id} never reached the wanted status on {}", on.base))
}

/// How many prompts across `instances` were for job `id` (the output prefix names the job).
fn prompts_for(instances: &[&Instance], id: &str) -> usize {
    let short = &id.replace('-', "")[..8];
    instances.iter().flat_map(|i| i.prompts()).filter(|graph| graph.to_string().contains(short)).count()
}

/// The SSE stream of a job to its end: (event, data) pairs.
async fn events(client: &reqwest::Client, on: &Instance, id: &str) -> Vec<(String, Value)> {
    let response = client.get(on.url(&format!("/api/v2/jobs/{id}/events"))).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    let mut buffer = String::new();
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(chunk) = stream.next().await {
            buffer.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
            while let Some(end) = buffer.find("\n\n") {
                let frame: String = buffer.drain(..end + 2).collect();
                let (mut name, mut data) = (String::new(), String::new());
                for line in frame.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        name = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if !name.is_empty() {
                    out.push((name, serde_json::from_str(&data).unwrap()));
                }
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the stream on {} did not end: {out:?}", on.base);
    out
}

async fn download(client: &reqwest::Client, on: &Instance, asset_id: &str) -> Vec<u8> {
    let response = client.get(on.url(&format!("/api/v2/assets/{asset_id}/content"))).send().await.unwrap();
    let status = response.status();
    if status != 200 {
        panic!("asset {asset_id} from {}: {status} {}", on.base, response.text().await.unwrap_or_default());
    }
    response.bytes().await.unwrap().to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_submitted_on_one_instance_is_polled_streamed_downloaded_and_canceled_on_another() {
    let shared = SharedState::start().await;
    let a = Instance::start(&shared, &["--max-in-flight", "1"]).await;
    let b = Instance::start(&shared, &["--max-in-flight", "1"]).await;
    let client = reqwest::Client::new();
    // Occupy both instances' only slot with a stuck job each, then free A's: the job
    // under test can only run on A, and everything about it is asked of B.
    for i in [&a, &b] {
        i.comfy.double.faults().hang(true);
    }
    let blockers = [submit(&client, &a, 60).await, submit(&client, &b, 61).await];
    let both_busy = eventually(Duration::from_secs(30), || async { (a.prompts().len() == 1 && b.prompts().len() == 1).then_some(()) }).await;
    assert!(both_busy.is_some(), "each instance claimed one job from the shared queue: {} / {}", a.prompts().len(), b.prompts().len());
    let id = submit(&client, &b, 64).await;
    a.comfy.double.faults().set_step_latency(Duration::from_millis(700));
    a.comfy.double.faults().hang(false);

    // Stream on B a job A runs: B gets its progress and its terminal status.
    let streamed = events(&client, &b, &id).await;
    assert_eq!(prompts_for(&[&a], &id), 1, "A ran it");
    assert_eq!(prompts_for(&[&b], &id), 0, "B did not");
    let (last_name, last) = streamed.last().expect("at least one event");
    assert_eq!((last_name.as_str(), last["status"].as_str()), ("status", Some("succeeded")), "{streamed:?}");
    assert!(streamed.iter().any(|(name, _)| name == "progress"), "progress crossed instances: {streamed:?}");
    // Poll on B, download on B and on A: the same bytes, from the shared bucket.
    let done = job(&client, &b, &id).await;
    assert_eq!(done["status"], "succeeded");
    let output = done["outputs"][0]["id"].as_str().expect("an output asset").to_string();
    let from_b = download(&client, &b, &output).await;
    assert!(from_b.starts_with(b"\x89PNG"), "a PNG");
    assert_eq!(download(&client, &a, &output).await, from_b);
    let ranged = client.get(b.url(&format!("/api/v2/assets/{output}/content"))).header("range", "bytes=1-3").send().await.unwrap();
    assert_eq!(ranged.status(), 206);
    assert_eq!(&ranged.bytes().await.unwrap()[..], &from_b[1..4]);

    // Cancel on B a job running on A.
    a.comfy.double.faults().hang(true);
    let hung = submit(&client, &b, 65).await;
    let on_a = eventually(Duration::from_secs(30), || async { (prompts_for(&[&a], &hung) == 1).then_some(()) }).await;
    assert!(on_a.is_some(), "A claimed the job (B's slot is still taken)");
    status_eventually(&client, &b, &hung, Duration::from_secs(30), |s| s == "running").await;
    let canceled = client.post(b.url(&format!("/api/v2/jobs/{hung}/cancel"))).send().await.unwrap();
    assert!(canceled.status().is_success(), "{:?}", canceled.text().await);
    let ended = status_eventually(&client, &b, &hung, Duration::from_secs(30), |s| s == "canceled").await;
    assert_eq!(ended["status"], "canceled");
    assert!(!a.comfy.double.record().interrupts.is_empty(), "A interrupted its ComfyUI");
    assert!(b.comfy.double.record().interrupts.is_empty(), "B had nothing to interrupt");
    assert_eq!(prompts_for(&[&a, &b], &hung), 1);
    // The blockers finish once their ComfyUIs do; every job ran exactly once.
    for i in [&a, &b] {
        i.comfy.double.faults().hang(false);
    }
    for blocker in &blockers {
        status_eventually(&client, &a, blocker, Duration::from_secs(30), |s| s == "succeeded").await;
        assert_eq!(prompts_for(&[&a, &b], blocker), 1);
    }
}

/// A sync typed request on B that A runs: B's waiter sees A finish it (through the store)
/// and answers with the image.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sync_typed_request_on_one_instance_is_answered_when_another_runs_it() {
    let shared = SharedState::start().await;
    let flux = vec![("flux-dev.wasm", flowhost_tests::build_component("flux-dev", &[]).expect("the flux-dev component builds"))];
    let a = Instance::start_with(&shared, &["--max-in-flight", "1"], &flux).await;
    let b = Instance::start_with(&shared, &["--max-in-flight", "1"], &flux).await;
    let client = reqwest::Client::new();
    for i in [&a, &b] {
        i.comfy.double.faults().hang(true);
    }
    let blockers = [submit(&client, &a, 70).await, submit(&client, &b, 71).await];
    let both_busy = eventually(Duration::from_secs(30), || async { (a.prompts().len() == 1 && b.prompts().len() == 1).then_some(()) }).await;
    assert!(both_busy.is_some(), "each instance holds one stuck job");
    let request = client.post(b.url("/flux-dev")).json(&json!({"prompt": "a lighthouse", "width": 256, "height": 256, "steps": 2, "seed": 9})).send();
    let release = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        a.comfy.double.faults().hang(false);
    };
    let (response, ()) = tokio::join!(request, release);
    let response = response.unwrap();
    assert_eq!(response.status(), 200, "{:?}", response.text().await);
    assert_eq!(response.headers()["content-type"], "image/jpeg");
    let id = response.headers()["x-job-id"].to_str().unwrap().to_string();
    let bytes = response.bytes().await.unwrap();
    assert!(image::load_from_memory_with_format(&bytes, image::ImageFormat::Jpeg).is_ok(), "a real JPEG");
    assert_eq!(prompts_for(&[&a], &id), 1, "A ran it");
    assert_eq!(prompts_for(&[&b], &id), 0, "B only waited");
    b.comfy.double.faults().hang(false);
    for blocker in &blockers {
        status_eventually(&client, &b, blocker, Duration::from_secs(30), |s| s == "succeeded").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_instances_job_is_rerun_on_another_and_nothing_runs_twice_or_is_lost() {
    let shared = SharedState::start().await;
    let mut instances = vec![Instance::start(&shared, &["--max-in-flight", "1"]).await, Instance::start(&shared, &["--max-in-flight", "1"]).await];
    // Both ComfyUIs are stuck: the first job stays running wherever it was claimed.
    for i in &instances {
        i.comfy.double.faults().hang(true);
    }
    let client = reqwest::Client::new();
    let victim = submit(&client, &instances[0], 80).await;
    let runner = eventually(Duration::from_secs(30), || async { (0..2).find(|n| prompts_for(&[&instances[*n]], &victim) == 1) })
        .await
        .expect("an instance claimed the job and gave it to its ComfyUI");
    let survivor = 1 - runner;
    // More jobs wait behind it (one at a time per instance; the survivor's is stuck too).
    let mut others = Vec::new();
    for w in 81..84 {
        others.push(submit(&client, &instances[survivor], w).await);
    }
    // kill -9 of the instance running the victim (its ComfyUI goes with it); the
    // survivor's ComfyUI gets going again.
    instances[runner].kill_9();
    let dead_prompts = instances[runner].prompts();
    instances[survivor].comfy.double.faults().hang(false);
    let survivor = &instances[survivor];
    let ended = status_eventually(&client, survivor, &victim, Duration::from_secs(60), |s| matches!(s, "succeeded" | "failed")).await;
    match ended["status"].as_str() {
        Some("succeeded") => assert_eq!(prompts_for(&[survivor], &victim), 1, "re-run once, on the survivor"),
        _ => assert_eq!(ended["error"]["code"], "worker_lost", "{ended}"),
    }
    let short = |id: &str| id.replace('-', "")[..8].to_string();
    let on_dead = |id: &str| dead_prompts.iter().filter(|g| g.to_string().contains(&short(id))).count();
    assert_eq!(on_dead(&victim), 1, "the dead instance had run it once");
    for id in &others {
        let j = status_eventually(&client, survivor, id, Duration::from_secs(60), |s| matches!(s, "succeeded" | "failed" | "canceled")).await;
        assert_eq!(j["status"], "succeeded", "a job queued behind the dead instance's: {j}");
        // The survivor's stuck first job was one of these: it ran there once, and every
        // other ran exactly once somewhere.
        assert_eq!(on_dead(id) + prompts_for(&[survivor], id), 1, "job {id} ran exactly once");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_instances_run_fifty_concurrent_submissions_each_exactly_once() {
    let shared = SharedState::start().await;
    let mut instances = Vec::new();
    for _ in 0..3 {
        instances.push(Instance::start(&shared, &["--max-in-flight", "2", "--queue-depth", "200"]).await);
    }
    let client = reqwest::Client::new();
    let submissions = (0..50u32).map(|n| {
        let (client, on) = (client.clone(), &instances[n as usize % 3]);
        async move { submit(&client, on, 100 + n).await }
    });
    let ids: Vec<String> = futures::future::join_all(submissions).await;
    let everyone: Vec<&Instance> = instances.iter().collect();
    for id in &ids {
        let j = status_eventually(&client, &instances[0], id, Duration::from_secs(120), |s| matches!(s, "succeeded" | "failed" | "canceled")).await;
        assert_eq!(j["status"], "succeeded", "{j}");
    }
    let total: usize = instances.iter().map(|i| i.prompts().len()).sum();
    assert_eq!(total, 50, "50 jobs, 50 prompts across the doubles");
    for id in &ids {
        assert_eq!(prompts_for(&everyone, id), 1, "job {id} ran exactly once");
    }
    let ran_on: Vec<usize> = instances.iter().map(|i| i.prompts().len()).collect();
    assert!(ran_on.iter().filter(|n| **n > 0).count() >= 2, "the work spread over the instances: {ran_on:?}");
    for id in &ids {
        let asset = job(&client, &instances[0], id).await["outputs"][0]["id"].as_str().unwrap().to_string();
        let first = download(&client, &instances[0], &asset).await;
        for other in &instances[1..] {
            assert_eq!(download(&client, other, &asset).await, first, "every output downloads from every instance");
        }
    }
}


/// Warm-up warms the instance's own GPU: with a shared queue each instance's warm-up job is
/// pinned to it (another instance taking it would leave this one cold and run it elsewhere).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_instance_warms_its_own_comfyui_through_the_shared_store() {
    let shared = SharedState::start().await;
    let flux = vec![("flux-dev.wasm", flowhost_tests::build_component("flux-dev", &[]).expect("the flux-dev component builds"))];
    let a = Instance::start_with(&shared, &["--warm-up", "auto"], &flux).await;
    let b = Instance::start_with(&shared, &["--warm-up", "auto"], &flux).await;
    let client = reqwest::Client::new();
    for i in [&a, &b] {
        let ready = eventually(Duration::from_secs(60), || async {
            let r = client.get(i.url("/health")).send().await.ok()?;
            (r.status() == 200).then_some(())
        })
        .await;
        assert!(ready.is_some(), "{} never finished its warm-up", i.base);
    }
    // Exactly one prompt on each ComfyUI: its own instance's warm-up, nothing run twice.
    assert_eq!(a.prompts().len(), 1, "A's ComfyUI ran A's warm-up");
    assert_eq!(b.prompts().len(), 1, "B's ComfyUI ran B's warm-up");
    let jobs: Value = client.get(a.url("/api/v2/jobs?limit=10")).send().await.unwrap().json().await.unwrap();
    let succeeded = jobs["jobs"].as_array().expect("a job list").iter().filter(|j| j["status"] == "succeeded").count();
    assert_eq!(succeeded, 2, "both warm-up jobs are in the shared store, succeeded: {jobs}");
}
