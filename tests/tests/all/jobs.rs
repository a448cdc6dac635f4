//! Durable jobs end to end: a real `flowhost serve` (in-process, or the binary when
//! the test must kill it like a crash) against a ComfyUI double the test controls,
//! real plugins, real sockets, a real job store: every test runs twice, on the embedded
//! SQLite store in a temporary state dir (`sqlite::…`) and on a PostgreSQL store in a
//! throw-away cluster (`postgres::…`, tests/support/pg.rs) with this instance's own
//! (local) work queue — the store is what differs, the behaviour asserted is the same.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use base64::Engine;
use flowhost::jobs::{Job, JobStatus};
use flowhost_tests::pg::PgCluster;
use flowhost_tests::{ExternalComfy, TestServer, component, eventually, problem};
use serde_json::{Value, json};
use uuid::Uuid;

#[derive(Clone, Copy)]
enum Dialect {
    Sqlite,
    Postgres,
}

/// Each named test once per store: `sqlite::name` and `postgres::name`.
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(super::Dialect::Sqlite).await })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(super::Dialect::Postgres).await })*
        }
    };
}

on_both_stores!(
    a_queued_job_runs_and_a_running_one_is_reconciled_from_history_after_a_crash,
    a_job_running_when_flowhost_died_that_comfyui_lost_ends_host_restarted,
    a_job_whose_pixels_went_to_a_dead_flowhost_is_recovered_with_files_after_the_restart,
    an_async_typed_request_is_followed_to_a_jpeg,
    typed_requests_carry_their_labels_into_the_filtered_job_list,
    a_sync_request_on_a_busy_queue_waits_then_succeeds,
    queue_full_is_a_503_with_retry_after,
    cancel_of_a_queued_and_of_a_running_job_reaches_comfyui,
    an_idempotent_retry_starts_no_second_prompt_and_another_body_is_422,
    concurrent_requests_sharing_an_x_request_id_each_get_their_own_reference_image,
    a_jobs_comfyui_files_go_when_it_ends_and_retention_sweeps_records_and_blobs,
    progress_snapshots_reach_subscribers_and_the_store_while_a_job_runs,
);

/// Where a test's flowhost keeps its state (the same across the test's restarts): the
/// state dir always (blobs, and SQLite's `jobs.db`), plus a PostgreSQL database for the
/// `postgres` variant.
struct State {
    dir: tempfile::TempDir,
    postgres: Option<(PgCluster, String)>,
}

impl State {
    async fn new(dialect: Dialect) -> State {
        let dir = tempfile::tempdir().unwrap();
        let postgres = match dialect {
            Dialect::Sqlite => None,
            Dialect::Postgres => {
                let cluster = PgCluster::start().await.expect("a PostgreSQL test cluster starts");
                let url = cluster.fresh_database().await.unwrap();
                Some((cluster, url))
            }
        };
        State { dir, postgres }
    }

    fn args(&self) -> Vec<String> {
        let mut args = vec!["--state-dir".to_string(), self.dir.path().to_string_lossy().to_string()];
        if let Some((_, url)) = &self.postgres {
            args.extend(["--database-url".to_string(), url.clone(), "--work-queue".to_string(), "local".to_string()]);
        }
        args
    }
}



fn plugin_files() -> Vec<(&'static str, PathBuf)> {
    vec![("flux-dev.wasm", component("flux-dev")), ("flux-instantid.wasm", component("flux-instantid"))]
}

async fn wait_ready(base: &str) {
    let client = reqwest::Client::new();
    let ready = eventually(Duration::from_secs(30), || async {
        let h: Value = client.get(format!("{base}/health")).send().await.ok()?.json().await.ok()?;
        (h["comfyui"]["status"] == "ready").then_some(())
    })
    .await;
    assert!(ready.is_some(), "ComfyUI never became ready for {base}");
}

/// An in-process flowhost against `comfy` with `state` as its state dir.
async fn serve(comfy: &ExternalComfy, state: &State, extra: &[&str]) -> TestServer {
    let mut args: Vec<String> = comfy.args();
    args.extend(state.args());
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let files = plugin_files();
    let files: Vec<(&str, &Path)> = files.iter().map(|(n, p)| (*n, p.as_path())).collect();
    let server = TestServer::start(&files, &args).await.unwrap();
    wait_ready(&server.base).await;
    server
}

/// The flowhost binary as a child process (so the test can kill it like a crash).
struct Flowhost {
    child: std::process::Child,
    base: String,
    _plugins: tempfile::TempDir,
    _cache: tempfile::TempDir,
}

impl Drop for Flowhost {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Flowhost {
    async fn start(comfy: &ExternalComfy, state: &State, extra: &[&str]) -> Flowhost {
        let plugins = tempfile::tempdir().unwrap();
        for (name, path) in plugin_files() {
            std::fs::copy(path, plugins.path().join(name)).unwrap();
        }
        let cache = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new(flowhost_tests::flowhost_binary())
            .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--plugins"])
            .arg(plugins.path())
            .arg("--cache-dir")
            .arg(cache.path())
            .args(state.args())
            .args(comfy.args())
            // The test arms faults and counts prompts: no warm-up prompt of flowhost's own.
            .args(["--warm-up", "off"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("flowhost binary starts");
        let base = format!("http://127.0.0.1:{port}");
        let fh = Flowhost { child, base, _plugins: plugins, _cache: cache };
        wait_ready(&fh.base).await;
        fh
    }

    /// SIGKILL: no shutdown, nothing finalised — like a crash or an OOM kill.
    fn crash(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn flux(seed: u64) -> Value {
    json!({"prompt": "a lighthouse at dawn", "width": 512, "height": 256, "steps": 2, "seed": seed})
}

/// POST with `Prefer: respond-async`; returns the v2 Job body.
async fn post_async(client: &reqwest::Client, base: &str, route: &str, body: &Value) -> Value {
    let response = client.post(format!("{base}{route}")).header("prefer", "respond-async").json(body).send().await.unwrap();
    assert_eq!(response.status(), 202, "{:?}", response.text().await);
    response.json().await.unwrap()
}

fn job_id(job: &Value) -> Uuid {
    Uuid::parse_str(job["id"].as_str().expect("job id")).unwrap()
}

async fn job_eventually(server: &TestServer, id: Uuid, what: &str, check: impl Fn(&Job) -> bool) -> Job {
    let jobs = server.server.state.jobs.clone();
    let found = eventually(Duration::from_secs(30), || {
        let jobs = jobs.clone();
        let check = &check;
        async move { jobs.get(id).await.ok().flatten().filter(|j| check(j)) }
    })
    .await;
    match found {
        Some(job) => job,
        None => panic!("job {id} never became {what}: {:?}", jobs.get(id).await),
    }
}

async fn output_jpeg(server: &TestServer, job: &Job) -> (u32, u32) {
    let output = job.first_output().expect("an output asset");
    assert_eq!(output.content_type, "image/jpeg");
    assert!(output.hash.starts_with("blake3:"), "{}", output.hash);
    let bytes = server.server.state.jobs.blobs().get(&output.hash).await.expect("the blob is stored");
    assert_eq!(bytes.len() as u64, output.size_bytes);
    let image = image::load_from_memory_with_format(&bytes, image::ImageFormat::Jpeg).expect("a real JPEG");
    (image.width(), image.height())
}

async fn a_queued_job_runs_and_a_running_one_is_reconciled_from_history_after_a_crash(dialect: Dialect) {
    let comfy = ExternalComfy::start().await.unwrap();
    let state = State::new(dialect).await;
    comfy.double.faults().hang(true);
    let first = Flowhost::start(&comfy, &state, &["--max-in-flight", "1"]).await;
    let client = reqwest::Client::new();
    let running = post_async(&client, &first.base, "/flux-dev", &flux(1)).await;
    let submitted = eventually(Duration::from_secs(10), || async { (comfy.double.record().prompts.len() == 1).then_some(()) }).await;
    assert!(submitted.is_some(), "the first job reached ComfyUI");
    let queued = post_async(&client, &first.base, "/flux-dev", &flux(2)).await;
    assert_eq!(queued["status"], "queued", "{queued}");
    assert_eq!(queued["queue_position"], 0, "{queued}");
    first.crash();

    // ComfyUI finishes the prompt while flowhost is down; it keeps it in /history.
    let_the_orphaned_prompt_finish(&comfy).await;

    let second = serve(&comfy, &state, &["--max-in-flight", "1"]).await;
    let reconciled = job_eventually(&second, job_id(&running), "succeeded", |j| j.status == JobStatus::Succeeded).await;
    assert_eq!(output_jpeg(&second, &reconciled).await, (512, 256));
    let ran = job_eventually(&second, job_id(&queued), "succeeded", |j| j.status == JobStatus::Succeeded).await;
    assert_eq!(output_jpeg(&second, &ran).await, (512, 256));
    assert_eq!(comfy.double.record().prompts.len(), 2, "the reconciled job was not submitted again");
    second.server.shutdown().await.unwrap();

    // A finished job is still readable, with its output, after another restart.
    let third = serve(&comfy, &state, &[]).await;
    let again = third.server.state.jobs.get(job_id(&queued)).await.unwrap().expect("still stored");
    assert_eq!(again.status, JobStatus::Succeeded);
    assert_eq!(output_jpeg(&third, &again).await, (512, 256));
}

/// ComfyUI (hung so far) finishes the prompt of a flowhost that died; it keeps it in /history.
async fn let_the_orphaned_prompt_finish(comfy: &ExternalComfy) {
    comfy.double.faults().hang(false);
    let finished = eventually(Duration::from_secs(10), || async {
        let history: Value = reqwest::get(format!("{}/history", comfy.double.url())).await.ok()?.json().await.ok()?;
        (history.as_object()?.len() == 1).then_some(())
    })
    .await;
    assert!(finished.is_some(), "the double finished the orphaned prompt");
}

/// The raster transport's pixels exist only on the websocket: a flowhost that died while its
/// ComfyUI ran the prompt never got them. After the restart the job still succeeds, from one
/// re-run of the graph with file outputs (the derived `{prompt_id}-files` prompt).
async fn a_job_whose_pixels_went_to_a_dead_flowhost_is_recovered_with_files_after_the_restart(dialect: Dialect) {
    let comfy = ExternalComfy::start_with_flowhost_nodes().await.unwrap();
    let state = State::new(dialect).await;
    comfy.double.faults().hang(true);
    let first = Flowhost::start(&comfy, &state, &["--max-in-flight", "1"]).await;
    let client = reqwest::Client::new();
    let running = post_async(&client, &first.base, "/flux-dev", &flux(1)).await;
    let submitted = eventually(Duration::from_secs(10), || async { (comfy.double.record().prompts.len() == 1).then_some(()) }).await;
    assert!(submitted.is_some(), "the job reached ComfyUI");
    first.crash();
    let_the_orphaned_prompt_finish(&comfy).await;

    let second = serve(&comfy, &state, &["--max-in-flight", "1"]).await;
    let recovered = job_eventually(&second, job_id(&running), "succeeded", |j| j.status == JobStatus::Succeeded).await;
    assert_eq!(output_jpeg(&second, &recovered).await, (512, 256));
    let prompts = comfy.double.record().prompts;
    assert_eq!(prompts.len(), 2, "one re-run, no more");
    assert_eq!(flowhost_tests::nodes_of_class(&prompts[0].1, "FlowhostImageOutput"), 1, "the first run sent pixels");
    assert!(prompts[1].0.ends_with("-files"), "the re-run is the derived prompt: {}", prompts[1].0);
    assert_eq!(flowhost_tests::nodes_of_class(&prompts[1].1, "SaveImage"), 1, "the re-run saves a file");
    second.server.shutdown().await.unwrap();
}

async fn a_job_running_when_flowhost_died_that_comfyui_lost_ends_host_restarted(dialect: Dialect) {
    let comfy = ExternalComfy::start().await.unwrap();
    let state = State::new(dialect).await;
    comfy.double.faults().hang(true);
    let first = Flowhost::start(&comfy, &state, &[]).await;
    let client = reqwest::Client::new();
    let running = post_async(&client, &first.base, "/flux-dev", &flux(1)).await;
    let submitted = eventually(Duration::from_secs(10), || async { (comfy.double.record().prompts.len() == 1).then_some(()) }).await;
    assert!(submitted.is_some());
    first.crash();
    drop(comfy); // ComfyUI died too: a new one knows nothing of the prompt.

    let fresh = ExternalComfy::start().await.unwrap();
    let second = serve(&fresh, &state, &[]).await;
    let job = job_eventually(&second, job_id(&running), "failed", |j| j.status == JobStatus::Failed).await;
    assert_eq!(job.error.as_ref().map(|e| e.code()), Some("host_restarted"), "{job:?}");
    assert!(fresh.double.record().prompts.is_empty(), "it is not run again behind the caller's back");
}

async fn an_async_typed_request_is_followed_to_a_jpeg(dialect: Dialect) {
    let comfy = ExternalComfy::start().await.unwrap();
    let state = State::new(dialect).await;
    let server = serve(&comfy, &state, &[]).await;
    let response = server.client.post(server.url("/flux-dev")).header("prefer", "respond-async").json(&flux(7)).send().await.unwrap();
    assert_eq!(response.status(), 202);
    assert_eq!(response.headers()["preference-applied"], "respond-async");
    let location = response.headers()["location"].to_str().unwrap().to_string();
    let body: Value = response.json().await.unwrap();
    let id = job_id(&body);
    assert_eq!(location, format!("/api/v2/jobs/{id}"));
    assert_eq!(body["urls"]["self"], location);
    assert_eq!(body["urls"]["cancel"], format!("{location}/cancel"));
    assert!(["queued", "running"].contains(&body["status"].as_str().unwrap()), "{body}");
    let job = job_eventually(&server, id, "succeeded", |j| j.status == JobStatus::Succeeded).await;
    assert_eq!(output_jpeg(&server, &job).await, (512, 256));
    assert!(job.metrics.execution_ms.is_some() && job.metrics.queue_ms.is_some(), "{:?}", job.metrics);
}

/// Issue #23: `Flowhost-Label` on a typed request labels its job (v2 `metadata`), and the
/// v2 job list finds it by `metadata[key]=value` on either store (migration 0006).
async fn typed_requests_carry_their_labels_into_the_filtered_job_list(dialect: Dialect) {
    let comfy = ExternalComfy::start().await.unwrap();
    let state = State::new(dialect).await;
    let server = serve(&comfy, &state, &[]).await;
    let labeled = |seed: u64, labels: &'static str| {
        server.client.post(server.url("/flux-dev")).header("prefer", "respond-async").header("flowhost-label", labels).json(&flux(seed)).send()
    };
    let a = labeled(1, "batch=nightly, character=c-1").await.unwrap();
    assert_eq!(a.status(), 202, "{:?}", a.text().await);
    let a: Value = a.json().await.unwrap();
    assert_eq!(a["metadata"], json!({"batch": "nightly", "character": "c-1"}));
    let b: Value = labeled(2, "batch=weekly").await.unwrap().json().await.unwrap();
    post_async(&server.client, &server.base, "/flux-dev", &flux(3)).await;

    let listed: Value = server.client.get(server.url("/api/v2/jobs?metadata[batch]=nightly")).send().await.unwrap().json().await.unwrap();
    let ids: Vec<&str> = listed["jobs"].as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec![a["id"].as_str().unwrap()], "{listed}");
    let weekly: Value = server.client.get(server.url("/api/v2/jobs?metadata[batch]=weekly")).send().await.unwrap().json().await.unwrap();
    assert_eq!(weekly["jobs"][0]["id"], b["id"]);
    assert_eq!(weekly["jobs"][0]["metadata"]["batch"], "weekly");

    let (status, body) = problem(labeled(4, "no value here").await.unwrap()).await.unwrap();
    assert_eq!(status, 400);
    assert!(body["type"].as_str().is_some_and(|t| t.ends_with("invalid_label")), "{body}");
}

async fn a_sync_request_on_a_busy_queue_waits_then_succeeds(dialect: Dialect) {
    let comfy = ExternalComfy::start().await.unwrap();
    comfy.double.faults().set_step_latency(Duration::from_millis(100));
    let state = State::new(dialect).await;
    let server = serve(&comfy, &state, &["--max-in-flight", "1"]).await;
    let (one, two) = (flux(1), flux(2));
    let (a, b) = tokio::join!(server.post_json("/flux-dev", &one), server.post_json("/flux-dev", &two));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.status(), 200, "{:?}", a.text().await);
    assert_eq!(b.status(), 200, "the second waited in the queue instead of a 503: {:?}", b.text().await);
    assert_ne!(a.headers()["x-job-id"], b.headers()["x-job-id"]);
    assert_eq!(comfy.double.record().prompts.len(), 2);
}

async fn queue_full_is_a_503_with_retry_after(dialect: Dialect) {
    let comfy = ExternalComfy::start().await.unwrap();
    comfy.double.faults().hang(true);
    let state = State::new(dialect).await;
    let server = serve(&comfy, &state, &["--max-in-flight", "1", "--queue-depth", "1"]).await;
    let client = server.client.clone();
    post_async(&client, &server.base, "/flux-dev", &flux(1)).await;
    let submitted = eventually(Duration::from_secs(10), || async { (comfy.double.record().prompts.len() == 1).then_some(()) }).await;
    assert!(submitted.is_some());
    post_async(&client, &server.base, "/flux-dev", &flux(2)).await; // waits: depth 1 obeyed
    let response = server.post_json("/flux-dev", &flux(3)).await.unwrap(); // depth 1 violated
    let retry_after: u64 = response.headers()["retry-after"].to_str().unwrap().parse().expect("Retry-After is seconds");
    assert!(retry_after >= 1);
    let (status, body) = problem(response).await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["type"], "https://flowhost.dev/problems/at_capacity");
    comfy.double.faults().hang(false);
}

async fn cancel_of_a_queued_and_of_a_running_job_reaches_comfyui(dialect: Dialect) {
    let comfy = ExternalComfy::start().await.unwrap();
    comfy.double.faults().hang(true);
    let state = State::new(dialect).await;
    let server = serve(&comfy, &state, &["--max-in-flight", "1"]).await;
    let client = server.client.clone();
    let running = job_id(&post_async(&client, &server.base, "/flux-dev", &flux(1)).await);
    let submitted = eventually(Duration::from_secs(10), || async { (comfy.double.record().prompts.len() == 1).then_some(()) }).await;
    assert!(submitted.is_some());
    let queued = job_id(&post_async(&client, &server.base, "/flux-dev", &flux(2)).await);
    let jobs = server.server.state.jobs.clone();

    let canceled = jobs.cancel(queued).await.unwrap().expect("the job exists");
    assert_eq!(canceled.status, JobStatus::Canceled, "a queued job is canceled at once");
    let again = jobs.cancel(queued).await.unwrap().unwrap();
    assert_eq!(again.status, JobStatus::Canceled, "cancel is idempotent");

    let canceling = jobs.cancel(running).await.unwrap().unwrap();
    assert_eq!(canceling.status, JobStatus::Canceling);
    let prompt_id = canceling.prompt_id.clone().expect("a running job has its prompt id");
    let done = job_eventually(&server, running, "canceled", |j| j.status == JobStatus::Canceled).await;
    assert!(done.completed_at.is_some());
    let record = comfy.double.record();
    assert!(record.interrupts.iter().any(|i| i.as_deref() == Some(prompt_id.as_str())), "ComfyUI was told to interrupt {prompt_id}: {:?}", record.interrupts);
    assert_eq!(record.prompts.len(), 1, "the canceled queued job never reached ComfyUI");
    comfy.double.faults().hang(false);
}

async fn an_idempotent_retry_starts_no_second_prompt_and_another_body_is_422(dialect: Dialect) {
    let comfy = ExternalComfy::start().await.unwrap();
    comfy.double.faults().set_step_latency(Duration::from_millis(50));
    let state = State::new(dialect).await;
    let server = serve(&comfy, &state, &[]).await;
    let send = |body: Value| server.client.post(server.url("/flux-dev")).header("idempotency-key", "\"order-42\"").json(&body).send();
    // The retry arrives while the first is still running: it waits for that job.
    let (first, retry) = tokio::join!(send(flux(5)), async {
        tokio::time::sleep(Duration::from_millis(150)).await;
        send(flux(5)).await
    });
    let (first, retry) = (first.unwrap(), retry.unwrap());
    assert_eq!(first.status(), 200);
    assert_eq!(retry.status(), 200);
    assert_eq!(first.headers()["x-job-id"], retry.headers()["x-job-id"], "the same job");
    let (a, b) = (first.bytes().await.unwrap(), retry.bytes().await.unwrap());
    assert_eq!(a, b);
    // And after it finished.
    let late = send(flux(5)).await.unwrap();
    assert_eq!(late.status(), 200);
    assert_eq!(late.bytes().await.unwrap(), a);
    assert_eq!(comfy.double.record().prompts.len(), 1, "one generation for three requests");
    let (status, body) = problem(send(flux(6)).await.unwrap()).await.unwrap();
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["type"], "https://flowhost.dev/problems/idempotency_key_reused");
    assert_eq!(comfy.double.record().prompts.len(), 1);
}

fn png_data_url(width: u32, height: u32, shade: u8) -> (String, usize) {
    let img = image::RgbImage::from_fn(width, height, |x, y| image::Rgb([(x * 3) as u8, (y * 5) as u8, shade]));
    let mut png = Vec::new();
    image::DynamicImage::ImageRgb8(img).write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
    (format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(&png)), png.len())
}

/// The LoadImage value of a prompt the double received.
fn load_image_of(graph: &Value) -> String {
    graph.as_object().unwrap().values().find(|n| n["class_type"] == "LoadImage").and_then(|n| n["inputs"]["image"].as_str()).expect("a LoadImage node").to_string()
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() { stack.push(path) } else { out.push(path) }
        }
    }
    out
}

async fn concurrent_requests_sharing_an_x_request_id_each_get_their_own_reference_image(dialect: Dialect) {
    let comfy = ExternalComfy::start().await.unwrap();
    comfy.double.faults().set_step_latency(Duration::from_millis(30));
    let state = State::new(dialect).await;
    let server = serve(&comfy, &state, &["--max-in-flight", "2"]).await;
    let (image_a, size_a) = png_data_url(64, 64, 10);
    let (image_b, size_b) = png_data_url(96, 80, 200);
    assert_ne!(size_a, size_b);
    let send = |image: String| {
        server
            .client
            .post(server.url("/flux-instantid"))
            .header("x-request-id", "same-id-on-purpose")
            .json(&json!({"prompt": "a portrait", "reference_image": image, "width": 256, "height": 256, "steps": 3}))
            .send()
    };
    let (a, b) = tokio::join!(send(image_a), send(image_b));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.status(), 200, "{:?}", a.text().await);
    assert_eq!(b.status(), 200, "{:?}", b.text().await);
    let record = comfy.double.record();
    assert_eq!(record.prompts.len(), 2);
    let paths: Vec<String> = record.prompts.iter().map(|(_, graph)| load_image_of(graph)).collect();
    assert_ne!(paths[0], paths[1], "each job has its own upload folder");
    for path in &paths {
        assert!(!path.contains("same-id-on-purpose"), "a caller's id never names a folder: {path}");
    }
    // Each prompt's LoadImage names exactly the bytes its own request sent.
    let mut sizes: Vec<usize> = paths
        .iter()
        .map(|path| {
            let (folder, name) = path.rsplit_once('/').expect("subfolder/name");
            record.uploads.iter().find(|u| u.subfolder == folder && u.name == name).map(|u| u.size).expect("the upload the prompt names")
        })
        .collect();
    sizes.sort_unstable();
    let mut expected = vec![size_a, size_b];
    expected.sort_unstable();
    assert_eq!(sizes, expected);
}

async fn a_jobs_comfyui_files_go_when_it_ends_and_retention_sweeps_records_and_blobs(dialect: Dialect) {
    let comfy = ExternalComfy::start().await.unwrap();
    let state = State::new(dialect).await;
    let input_dir = comfy.double.input_dir().to_string_lossy().to_string();
    let output_dir = comfy.double.output_dir().to_string_lossy().to_string();
    let server = serve(&comfy, &state, &["--comfyui-input-dir", &input_dir, "--comfyui-output-dir", &output_dir]).await;
    let (image, _) = png_data_url(64, 64, 90);
    let response = server.post_json("/flux-instantid", &json!({"prompt": "a portrait", "reference_image": image, "width": 256, "height": 256, "steps": 1})).await.unwrap();
    assert_eq!(response.status(), 200, "{:?}", response.text().await);
    let id = Uuid::parse_str(response.headers()["x-job-id"].to_str().unwrap()).unwrap();
    // ComfyUI's side is clean: no upload folder, no output file, no history entry.
    assert!(!comfy.double.record().uploads.is_empty(), "the job did upload its reference");
    let history_url = format!("{}/history", comfy.double.url());
    let cleaned = eventually(Duration::from_secs(10), || async {
        let history: Value = reqwest::get(&history_url).await.ok()?.json().await.ok()?;
        (files_under(comfy.double.input_dir()).is_empty() && files_under(comfy.double.output_dir()).is_empty() && history == json!({})).then_some(())
    })
    .await;
    assert!(cleaned.is_some(), "left behind: {:?} {:?}", files_under(comfy.double.input_dir()), files_under(comfy.double.output_dir()));

    // flowhost kept the bytes; retention removes the record and then the blobs.
    let jobs = server.server.state.jobs.clone();
    let job = jobs.get(id).await.unwrap().expect("the job is stored");
    let output = job.first_output().unwrap().hash.clone();
    assert!(jobs.blobs().exists(&output).await.unwrap());
    let (report, blobs) = jobs.sweep_at(SystemTime::now()).await.unwrap();
    assert!(report.jobs.is_empty() && blobs == 0, "nothing is swept before its time");
    let (report, blobs) = jobs.sweep_at(SystemTime::now() + Duration::from_secs(25 * 3600)).await.unwrap();
    assert_eq!(report.jobs, vec![id]);
    assert!(blobs >= 2, "the output and the reference image: {blobs}");
    assert!(jobs.get(id).await.unwrap().is_none());
    assert!(!jobs.blobs().exists(&output).await.unwrap());
}

async fn progress_snapshots_reach_subscribers_and_the_store_while_a_job_runs(dialect: Dialect) {
    let comfy = ExternalComfy::start().await.unwrap();
    comfy.double.faults().set_step_latency(Duration::from_millis(150));
    let state = State::new(dialect).await;
    let server = serve(&comfy, &state, &[]).await;
    let job = post_async(&server.client, &server.base, "/flux-dev", &json!({"prompt": "p", "width": 256, "height": 256, "steps": 12, "seed": 3})).await;
    let id = job_id(&job);
    let (snapshot, mut events) = server.server.state.jobs.subscribe(id).await.unwrap().expect("the job exists");
    assert!(!snapshot.status.is_terminal());
    let mut values = Vec::new();
    let mut saw_output = false;
    let mut last_status = snapshot.status;
    while let Ok(Ok(event)) = tokio::time::timeout(Duration::from_secs(30), events.recv()).await {
        match event {
            flowhost::jobs::JobEvent::Progress(p) => {
                assert!(p.nodes_total > 0 && (0.0..=1.0).contains(&p.value), "{p:?}");
                values.push(p.value);
            }
            flowhost::jobs::JobEvent::Output(asset) => saw_output = asset.content_type == "image/jpeg",
            flowhost::jobs::JobEvent::Status(j) => last_status = j.status,
            flowhost::jobs::JobEvent::Preview { .. } => {}
        }
    }
    assert_eq!(last_status, JobStatus::Succeeded, "the stream ends after the terminal status");
    assert!(saw_output, "the output was announced");
    assert!(values.len() >= 2, "throttled, but more than one snapshot over ~3 s: {values:?}");
    assert!(values.windows(2).all(|w| w[1] >= w[0]), "progress never goes back: {values:?}");
    let stored = server.server.state.jobs.get(id).await.unwrap().unwrap();
    assert_eq!(stored.progress.map(|p| p.value), Some(1.0), "the stored snapshot ends at 1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_flowhost_on_the_same_state_dir_fails_at_start_naming_it() {
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().to_string_lossy().to_string();
    let first = TestServer::start(&[], &["--simulate", "--state-dir", &dir]).await.unwrap();
    let second = TestServer::start(&[], &["--simulate", "--state-dir", &dir]).await;
    let err = format!("{:#}", second.err().expect("the second flowhost must not start on a locked state dir"));
    assert!(err.contains("in use by another flowhost") && err.contains(&dir), "{err}");
    // The first keeps serving; once it is gone the directory is free again.
    assert_eq!(first.client.get(first.url("/livez")).send().await.unwrap().status(), 200);
    first.server.shutdown().await.unwrap();
    let third = TestServer::start(&[], &["--simulate", "--state-dir", &dir]).await;
    assert!(third.is_ok(), "free again after the first shut down: {:?}", third.err());
}
