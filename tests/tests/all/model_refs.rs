//! Files named by reference (issue #24), end to end: `/flux-lora` with a LoRA by https URL
//! or by uploaded asset, fetched through the destination guard into the model cache
//! (`--model-cache`) that ComfyUI (the double) reads through flowhost's extra_model_paths;
//! `/flux-instantid` with a reference image by URL. The file server is a loopback axum
//! server, allow-listed with `--fetch-allow-host 127.0.0.1`, that counts its requests: the
//! counts are the evidence of "one download" and "a cache hit asks nothing".

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use comfyui_double::{ComfyDouble, DoubleConfig};
use flowhost::jobs::Job;
use flowhost::models::safetensors::synthetic;
use flowhost_tests::{KillOnDrop, TestServer, build_component, eventually, flowhost_binary, free_port, problem};
use serde_json::{Value, json};
use uuid::Uuid;

/// Bytes of each synthetic LoRA the file server hands out.
const LORA_BYTES: usize = 200_000;

fn component(package: &'static str) -> PathBuf {
    static BUILT: OnceLock<Mutex<HashMap<&'static str, PathBuf>>> = OnceLock::new();
    let map = BUILT.get_or_init(Default::default);
    let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
    map.entry(package).or_insert_with(|| build_component(package, &[]).expect("plugin builds")).clone()
}

fn lora_bytes(n: u8) -> Vec<u8> {
    synthetic(LORA_BYTES, n)
}

/// The LoRA `/held` serves: 3 MB.
fn held_bytes() -> Vec<u8> {
    synthetic(3_000_000, 42)
}

fn blake3_hex(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

/// A loopback file server that counts requests per path.
#[derive(Clone)]
struct Files {
    base: String,
    hits: Arc<Mutex<HashMap<String, usize>>>,
    /// `/held`: sends half the file, then waits until this is set (a download to kill).
    release: Arc<AtomicBool>,
    held_started: Arc<AtomicBool>,
}

impl Files {
    fn hits(&self, path: &str) -> usize {
        self.hits.lock().unwrap().get(path).copied().unwrap_or(0)
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

/// A real 64×64 JPEG (a reference image ComfyUI can load; not a LoRA).
fn jpeg() -> Vec<u8> {
    let image = image::RgbImage::from_fn(64, 64, |x, y| image::Rgb([(x * 4) as u8, (y * 4) as u8, 128]));
    let mut out = std::io::Cursor::new(Vec::new());
    image.write_to(&mut out, image::ImageFormat::Jpeg).unwrap();
    out.into_inner()
}

async fn files() -> Files {
    let state = Files { base: String::new(), hits: Arc::default(), release: Arc::default(), held_started: Arc::default() };
    let counted = state.hits.clone();
    let app = axum::Router::new()
        .route("/lora/{n}", get(|UrlPath(n): UrlPath<u8>| async move { lora_bytes(n) }))
        .route("/jpeg", get(|| async { ([("content-type", "image/jpeg")], jpeg()) }))
        .route("/missing", get(|| async { StatusCode::NOT_FOUND }))
        .route("/broken", get(|| async { StatusCode::INTERNAL_SERVER_ERROR }))
        .route("/redirect-private", get(|| async { (StatusCode::FOUND, [("location", "http://10.1.2.3/lora.safetensors")]).into_response() }))
        .route(
            "/endless",
            get(|| async {
                Response::new(Body::from_stream(futures::stream::repeat_with(|| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![7u8; 64 << 10])))))
            }),
        )
        .route(
            "/slow",
            get(|| async {
                // A byte every 100 ms, for ever: never idle long, never done.
                let trickle = futures::stream::unfold((), |()| async {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Some((Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"x")), ()))
                });
                Response::new(Body::from_stream(trickle))
            }),
        )
        .route(
            "/held",
            get(|State(files): State<Files>| async move {
                let bytes = held_bytes();
                if files.release.load(Ordering::SeqCst) {
                    return Response::new(Body::from(bytes));
                }
                // Two thirds: more than the fetcher's 1 MiB write buffer, so some is on disk.
                let half = bytes::Bytes::from(bytes[..bytes.len() * 2 / 3].to_vec());
                let started = files.held_started.clone();
                let first = futures::stream::once(async move {
                    started.store(true, Ordering::SeqCst);
                    Ok::<_, std::io::Error>(half)
                });
                let mut response = Response::new(Body::from_stream(first.chain(futures::stream::pending())));
                response.headers_mut().insert("content-length", bytes.len().into());
                response
            }),
        )
        .layer(axum::middleware::from_fn(move |request: axum::extract::Request, next: axum::middleware::Next| {
            let counted = counted.clone();
            async move {
                *counted.lock().unwrap().entry(request.uri().path().to_string()).or_default() += 1;
                next.run(request).await
            }
        }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let state = Files { base: format!("http://{}", listener.local_addr().unwrap()), ..state };
    let app = app.with_state(state.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    state
}

use futures::StreamExt as _;

/// flowhost (simulated ComfyUI) with `/flux-lora` and `/flux-instantid`, a model cache and
/// the loopback file server allow-listed.
async fn serve(cache: &Path, extra: &[&str]) -> TestServer {
    let cache = cache.to_string_lossy().to_string();
    let mut args = vec!["--model-cache", cache.as_str(), "--fetch-allow-host", "127.0.0.1", "--fetch-max-mb", "1"];
    args.extend_from_slice(extra);
    let lora = component("flux-lora");
    let instantid = component("flux-instantid");
    TestServer::start(&[("flux_lora.wasm", lora.as_path()), ("flux_instantid.wasm", instantid.as_path())], &args).await.unwrap()
}

async fn ready(server: &TestServer) {
    let ok = eventually(Duration::from_secs(30), || async {
        let h = server.get_json("/health").await.ok()?;
        (h["comfyui"]["status"] == "ready").then_some(())
    })
    .await;
    assert!(ok.is_some(), "ComfyUI never became ready");
}

fn lora_request(lora: Value) -> Value {
    json!({"prompt": "a portrait", "lora": lora, "width": 256, "height": 256, "steps": 2, "seed": 5})
}

fn cached_files(cache: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(cache.join("loras/flowhost-cache"))
        .map(|dir| dir.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

async fn metric(server: &TestServer, name: &str) -> f64 {
    let text = server.client.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines().find_map(|l| l.strip_prefix(name).and_then(|rest| rest.trim().parse().ok())).unwrap_or_else(|| panic!("no {name} in {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lora_by_url_is_fetched_once_placed_for_comfyui_and_then_a_cache_hit_asks_nothing() {
    let files = files().await;
    let cache = tempfile::tempdir().unwrap();
    let server = serve(cache.path(), &[]).await;
    ready(&server).await;
    let url = files.url("/lora/1");
    let response = server.post_json("/flux-lora", &lora_request(json!({"url": url}))).await.unwrap();
    assert_eq!(response.status(), 200, "{:?}", response.text().await);
    let timing = response.headers()["server-timing"].to_str().unwrap().to_string();
    assert!(timing.contains("fetch;dur="), "{timing}");
    assert_eq!(&response.bytes().await.unwrap()[..3], &[0xFF, 0xD8, 0xFF]);
    // The double validated the graph's lora_name against what ComfyUI lists: the cached
    // file, named by its content hash, reached through extra_model_paths.
    let name = format!("{}.safetensors", blake3_hex(&lora_bytes(1)));
    assert_eq!(cached_files(cache.path()), vec![name.clone()]);
    assert_eq!(std::fs::read(cache.path().join("loras/flowhost-cache").join(&name)).unwrap(), lora_bytes(1));
    assert_eq!(files.hits("/lora/1"), 1);
    // Again: a cache hit, no request to the file server.
    let again = server.post_json("/flux-lora", &lora_request(json!({"url": url}))).await.unwrap();
    assert_eq!(again.status(), 200);
    assert_eq!(files.hits("/lora/1"), 1, "a cache hit asks nothing");
    let dry: Value = server.post_json("/flux-lora?dry_run=true", &lora_request(json!({"url": url}))).await.unwrap().json().await.unwrap();
    assert_eq!(dry["fetches"][0]["field"], "lora", "{dry}");
    assert_eq!(metric(&server, "flowhost_model_cache_misses_total").await, 1.0);
    assert_eq!(metric(&server, "flowhost_model_cache_hits_total").await, 1.0);
    assert_eq!(metric(&server, "flowhost_model_cache_fetched_bytes_total").await, LORA_BYTES as f64);
    let health = server.get_json("/health").await.unwrap();
    assert_eq!(health["model_cache"]["files"], 1, "{health}");
    assert_eq!(health["model_cache"]["used_bytes"], LORA_BYTES, "{health}");
    assert!(health["model_cache"]["cap_bytes"].as_u64().unwrap() > 0, "{health}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_jobs_on_the_same_lora_make_one_download() {
    let files = files().await;
    let cache = tempfile::tempdir().unwrap();
    let server = serve(cache.path(), &[]).await;
    ready(&server).await;
    let body = lora_request(json!({"url": files.url("/lora/2")}));
    let answers = futures::future::join_all((0..20).map(|_| server.post_json("/flux-lora", &body))).await;
    for answer in answers {
        let answer = answer.unwrap();
        assert_eq!(answer.status(), 200, "{:?}", answer.text().await);
    }
    assert_eq!(files.hits("/lora/2"), 1, "twenty jobs, one download");
    assert_eq!(cached_files(cache.path()).len(), 1);
}

/// Upload `bytes` as a v2 asset; its (id, hash).
async fn upload_asset(server: &TestServer, bytes: Vec<u8>, name: &str) -> (String, String) {
    let part = reqwest::multipart::Part::bytes(bytes).file_name(name.to_string()).mime_str("application/octet-stream").unwrap();
    let form = reqwest::multipart::Form::new().part("file", part).text("content_type", "application/octet-stream").text("file_path", name.to_string());
    let response = server.client.post(server.url("/api/v2/assets")).multipart(form).send().await.unwrap();
    assert!(response.status().is_success(), "{:?}", response.text().await);
    let asset: Value = response.json().await.unwrap();
    (asset["id"].as_str().unwrap().to_string(), asset["hash"].as_str().unwrap().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lora_uploaded_as_an_asset_is_named_by_id_or_hash_and_an_unknown_asset_is_a_404_naming_it() {
    let cache = tempfile::tempdir().unwrap();
    let server = serve(cache.path(), &[]).await;
    ready(&server).await;
    let (id, hash) = upload_asset(&server, lora_bytes(3), "alice.safetensors").await;
    for reference in [json!({"asset": id}), json!({"asset": hash, "blake3": hash})] {
        let response = server.post_json("/flux-lora", &lora_request(reference.clone())).await.unwrap();
        assert_eq!(response.status(), 200, "{reference}: {:?}", response.text().await);
    }
    assert_eq!(cached_files(cache.path()), vec![format!("{}.safetensors", blake3_hex(&lora_bytes(3)))]);
    let unknown = Uuid::new_v4().to_string();
    let (status, body) = problem(server.post_json("/flux-lora", &lora_request(json!({"asset": unknown}))).await.unwrap()).await.unwrap();
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["errors"][0]["field"], "lora", "{body}");
    assert!(body["detail"].as_str().unwrap().contains(&unknown), "{body}");
    // A volume file that is not there is the same 404, naming it.
    let (status, body) = problem(server.post_json("/flux-lora", &json!({"prompt": "p", "lora_id": "nobody"})).await.unwrap()).await.unwrap();
    assert_eq!(status, 404, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("loras/nobody.safetensors"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_failed_fetch_answers_its_status_naming_the_field_and_fails_that_job_only() {
    let files = files().await;
    let cache = tempfile::tempdir().unwrap();
    let server = serve(cache.path(), &["--job-timeout", "2"]).await;
    ready(&server).await;
    let wrong = "0".repeat(64);
    for (lora, status, says) in [
        (json!({"url": "not a url"}), 400, "not an absolute URL"),
        (json!({"url": files.url("/redirect-private")}), 400, "redirected to a destination this server refuses (a private address)"),
        (json!({"url": files.url("/endless")}), 413, "larger than"),
        (json!({"url": files.url("/lora/4"), "sha256": wrong}), 422, "sha256"),
        (json!({"url": files.url("/jpeg")}), 422, "not a safetensors file"),
        (json!({"url": files.url("/missing")}), 502, "answered 404"),
        (json!({"url": files.url("/broken")}), 502, "answered 500"),
        (json!({"url": files.url("/slow")}), 504, "deadline"),
    ] {
        let (got, body) = problem(server.post_json("/flux-lora", &lora_request(lora.clone())).await.unwrap()).await.unwrap();
        assert_eq!(got, status, "{lora}: {body}");
        assert_eq!(body["errors"][0]["field"], "lora", "{lora}: {body}");
        let detail = body["detail"].as_str().unwrap();
        assert!(detail.contains(says), "{lora}: {detail}");
        assert!(!detail.contains("10.1.2.3") && !detail.contains(cache.path().to_str().unwrap()), "no address or path beyond the caller's: {detail}");
    }
    // A malformed digest is the schema's 400 naming the digest's field.
    let (got, body) =
        problem(server.post_json("/flux-lora", &lora_request(json!({"url": files.url("/lora/4"), "sha256": "abc"}))).await.unwrap()).await.unwrap();
    assert_eq!(got, 400, "{body}");
    assert!(body["errors"].as_array().unwrap().iter().any(|e| e["field"] == "lora/sha256"), "{body}");
    // Nothing half-done is left, and the next job is fine.
    assert!(cached_files(cache.path()).is_empty(), "{:?}", cached_files(cache.path()));
    assert_eq!(std::fs::read_dir(cache.path().join("tmp")).unwrap().count(), 0, "no partial download is left");
    let response = server.post_json("/flux-lora", &lora_request(json!({"url": files.url("/lora/4")}))).await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(metric(&server, "flowhost_fetch_refused_destinations_total").await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_allow_list_only_https_to_public_addresses_is_fetched() {
    let cache = tempfile::tempdir().unwrap();
    let cache_arg = cache.path().to_string_lossy().to_string();
    let lora = component("flux-lora");
    let server = TestServer::start(&[("flux_lora.wasm", lora.as_path())], &["--model-cache", &cache_arg]).await.unwrap();
    ready(&server).await;
    for (url, status, says) in [
        ("http://files.example.com/alice.safetensors", 400, "must use https"),
        ("https://169.254.169.254/latest/meta-data/", 400, "link-local (cloud metadata) address"),
        ("https://127.0.0.1:9/alice.safetensors", 400, "loopback address"),
        ("https://localhost/alice.safetensors", 400, "loopback address"),
    ] {
        let (got, body) = problem(server.post_json("/flux-lora", &lora_request(json!({"url": url}))).await.unwrap()).await.unwrap();
        assert_eq!(got, status, "{url}: {body}");
        assert_eq!(body["errors"][0]["field"], "lora", "{body}");
        assert!(body["detail"].as_str().unwrap().contains(says), "{url}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reference_image_by_url_is_fetched_through_the_guard() {
    let files = files().await;
    let cache = tempfile::tempdir().unwrap();
    let server = serve(cache.path(), &[]).await;
    ready(&server).await;
    let body = json!({"prompt": "p", "reference_image": files.url("/jpeg"), "width": 256, "height": 256, "steps": 2});
    let response = server.post_json("/flux-instantid", &body).await.unwrap();
    assert_eq!(response.status(), 200, "{:?}", response.text().await);
    assert_eq!(files.hits("/jpeg"), 1);
    for (url, status) in [(files.url("/endless"), 413), (files.url("/redirect-private"), 400), (files.url("/missing"), 502), (files.url("/lora/1"), 400)] {
        let body = json!({"prompt": "p", "reference_image": url, "width": 256, "height": 256, "steps": 2});
        let (got, problem) = problem(server.post_json("/flux-instantid", &body).await.unwrap()).await.unwrap();
        assert_eq!(got, status, "{url}: {problem}");
        assert_eq!(problem["errors"][0]["field"], "reference_image", "{problem}");
    }
}

/// A double that reads the model cache through extra_model_paths, as a supervised ComfyUI does.
async fn double_reading(cache: &Path, models: &Path) -> ComfyDouble {
    let yaml = cache.join("extra_model_paths.yaml");
    if !yaml.exists() {
        flowhost::models::write_extra_model_paths(None, Some(cache), &yaml).unwrap();
    }
    ComfyDouble::start(DoubleConfig { models_dir: Some(models.to_path_buf()), extra_model_paths: Some(yaml), ..Default::default() }).await.unwrap()
}

fn flux_volume() -> tempfile::TempDir {
    let models = tempfile::tempdir().unwrap();
    for (folder, name) in [
        ("diffusion_models", "flux1-dev.safetensors"),
        ("text_encoders", "clip_l.safetensors"),
        ("text_encoders", "t5xxl_fp16.safetensors"),
        ("vae", "ae.safetensors"),
        ("loras", "lora-b.safetensors"),
    ] {
        let path = models.path().join(folder).join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, b"placeholder weights").unwrap();
    }
    models
}

async fn submit_async(server: &TestServer, body: &Value) -> Uuid {
    let response = server.client.post(server.url("/flux-lora")).header("prefer", "respond-async").json(body).send().await.unwrap();
    assert_eq!(response.status(), 202, "{:?}", response.text().await);
    let job: Value = response.json().await.unwrap();
    Uuid::parse_str(job["id"].as_str().unwrap()).unwrap()
}

async fn wait_terminal(server: &TestServer, id: Uuid) -> Job {
    let jobs = server.server.state.jobs.clone();
    eventually(Duration::from_secs(60), || async { jobs.get(id).await.ok().flatten().filter(|j| j.status.is_terminal()) }).await.expect("the job ends")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_keeps_the_cache_under_its_cap_and_never_removes_a_file_a_queued_or_running_job_needs() {
    let files = files().await;
    let cache = tempfile::tempdir().unwrap();
    let models = flux_volume();
    let double = double_reading(cache.path(), models.path()).await;
    let cache_arg = cache.path().to_string_lossy().to_string();
    let models_arg = models.path().to_string_lossy().to_string();
    let lora = component("flux-lora");
    // Room for two of the 200 kB LoRAs.
    let args = [
        "--comfyui-url",
        &double.url(),
        "--models",
        &models_arg,
        "--model-cache",
        &cache_arg,
        "--model-cache-max-gb",
        "0.00045",
        "--fetch-allow-host",
        "127.0.0.1",
        "--max-in-flight",
        "1",
    ];
    let server = TestServer::start(&[("flux_lora.wasm", lora.as_path())], &args).await.unwrap();
    ready(&server).await;
    double.faults().hang(true);
    // One job running (held in ComfyUI), two queued behind it: three files pinned, over the cap.
    let mut ids = Vec::new();
    for n in [1u8, 2, 3] {
        ids.push(submit_async(&server, &lora_request(json!({"url": files.url(&format!("/lora/{n}"))}))).await);
    }
    let running = eventually(Duration::from_secs(20), || async { (double.record().prompts.len() == 1).then_some(()) }).await;
    assert!(running.is_some(), "the first job reached ComfyUI");
    let names: Vec<String> = [1u8, 2, 3].iter().map(|n| format!("{}.safetensors", blake3_hex(&lora_bytes(*n)))).collect();
    let mut expected = names.clone();
    expected.sort();
    assert_eq!(cached_files(cache.path()), expected, "every file a queued or running job needs stays");
    let health = server.get_json("/health").await.unwrap();
    assert!(health["model_cache"]["used_bytes"].as_u64().unwrap() > health["model_cache"]["cap_bytes"].as_u64().unwrap(), "{health}");
    double.faults().hang(false);
    for id in ids {
        assert_eq!(wait_terminal(&server, id).await.status.as_str(), "succeeded");
    }
    // Released, the cache shrinks to its cap, least recently used first.
    let shrunk = eventually(Duration::from_secs(10), || async { (cached_files(cache.path()).len() == 2).then_some(()) }).await;
    assert!(shrunk.is_some(), "{:?}", cached_files(cache.path()));
    assert!(!cached_files(cache.path()).contains(&names[0]), "the oldest goes: {:?}", cached_files(cache.path()));
    assert_eq!(metric(&server, "flowhost_model_cache_evictions_total").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jobs_naming_one_lora_by_url_and_by_asset_go_to_the_worker_that_has_it_loaded() {
    let files = files().await;
    let cache = tempfile::tempdir().unwrap();
    let models = flux_volume();
    let doubles = vec![double_reading(cache.path(), models.path()).await, double_reading(cache.path(), models.path()).await];
    let cache_arg = cache.path().to_string_lossy().to_string();
    let models_arg = models.path().to_string_lossy().to_string();
    let lora = component("flux-lora");
    let mut args: Vec<String> = Vec::new();
    for d in &doubles {
        args.extend(["--comfyui-url".into(), d.url()]);
    }
    for a in ["--models", &models_arg, "--model-cache", &cache_arg, "--fetch-allow-host", "127.0.0.1", "--max-in-flight", "1"] {
        args.push(a.to_string());
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = TestServer::start(&[("flux_lora.wasm", lora.as_path())], &refs).await.unwrap();
    let all_ready = eventually(Duration::from_secs(30), || async {
        let h = server.get_json("/health").await.ok()?;
        h["workers"].as_array().is_some_and(|w| w.len() == 2 && w.iter().all(|w| w["status"] == "ready")).then_some(())
    })
    .await;
    assert!(all_ready.is_some());
    let (asset_id, _) = upload_asset(&server, lora_bytes(9), "character.safetensors").await;
    let by_url = lora_request(json!({"url": files.url("/lora/9")}));
    let by_asset = lora_request(json!({"asset": asset_id}));
    let volume_b = json!({"prompt": "a portrait", "lora_id": "lora-b", "width": 256, "height": 256, "steps": 2, "seed": 5});
    // Warm both workers: one gets the character's LoRA (by URL), the other lora-b.
    for d in &doubles {
        d.faults().hang(true);
    }
    let a = submit_async(&server, &by_url).await;
    let b = submit_async(&server, &volume_b).await;
    let both = eventually(Duration::from_secs(20), || async { doubles.iter().all(|d| d.record().prompts.len() == 1).then_some(()) }).await;
    assert!(both.is_some(), "each worker got one of the two first jobs");
    for d in &doubles {
        d.faults().hang(false);
    }
    wait_terminal(&server, a).await;
    wait_terminal(&server, b).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    let character = format!("flowhost-cache/{}.safetensors", blake3_hex(&lora_bytes(9)));
    let lora_of = |d: &ComfyDouble| -> Vec<String> {
        d.record()
            .prompts
            .iter()
            .filter_map(|(_, g)| {
                g.as_object()?.values().find(|n| n["class_type"] == "LoraLoaderModelOnly").and_then(|n| n["inputs"]["lora_name"].as_str()).map(str::to_string)
            })
            .collect()
    };
    let has_character = if lora_of(&doubles[0]) == [character.clone()] { 0 } else { 1 };
    // Idle now: lora-b, then the character by asset id, then by URL; each goes where its LoRA is.
    for round in 0..2u64 {
        for body in [&volume_b, &by_asset, &by_url] {
            let mut body = body.clone();
            body["seed"] = json!(10 + round);
            let id = submit_async(&server, &body).await;
            wait_terminal(&server, id).await;
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }
    assert_eq!(lora_of(&doubles[has_character]), vec![character.clone(); 5]);
    assert_eq!(lora_of(&doubles[1 - has_character]), vec!["lora-b.safetensors".to_string(); 3]);
    let switches: u64 = doubles.iter().map(|d| d.model_state().switches).sum();
    assert_eq!(switches, 2, "only the first load on each worker, whichever way the LoRA was named");
    assert_eq!(files.hits("/lora/9"), 1);
}

fn spawn_flowhost(port: u16, dirs: &[&Path; 4]) -> KillOnDrop {
    let [plugins, state, cache_dir, model_cache] = dirs;
    let child = std::process::Command::new(flowhost_binary())
        .args(["serve", "--simulate", "--warm-up", "off", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--plugins")
        .arg(plugins)
        .arg("--state-dir")
        .arg(state)
        .arg("--cache-dir")
        .arg(cache_dir)
        .arg("--model-cache")
        .arg(model_cache)
        .args(["--fetch-allow-host", "127.0.0.1"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("flowhost starts");
    KillOnDrop(child)
}

async fn wait_live(client: &reqwest::Client, base: &str) {
    let up = eventually(Duration::from_secs(60), || async {
        let h: Value = client.get(format!("{base}/health")).send().await.ok()?.json().await.ok()?;
        (h["comfyui"]["status"] == "ready").then_some(())
    })
    .await;
    assert!(up.is_some(), "flowhost never became ready");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_9_mid_download_leaves_no_half_file_and_the_restarted_service_fetches_it_whole() {
    let files = files().await;
    let (plugins, state, cache_dir, model_cache) =
        (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    std::fs::copy(component("flux-lora"), plugins.path().join("flux_lora.wasm")).unwrap();
    let dirs = [plugins.path(), state.path(), cache_dir.path(), model_cache.path()];
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let mut child = spawn_flowhost(port, &dirs);
    wait_live(&client, &base).await;
    let body = lora_request(json!({"url": files.url("/held")}));
    let request = tokio::spawn({
        let (client, url, body) = (client.clone(), format!("{base}/flux-lora"), body.clone());
        async move { client.post(url).json(&body).send().await }
    });
    // Half the file has been sent and written to a temporary name.
    let partial = eventually(Duration::from_secs(20), || async {
        let parts: Vec<u64> = std::fs::read_dir(model_cache.path().join("tmp")).ok()?.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).collect();
        (files.held_started.load(Ordering::SeqCst) && parts.iter().any(|len| *len > 0)).then_some(())
    })
    .await;
    assert!(partial.is_some(), "the download started");
    child.0.kill().unwrap();
    let _ = child.0.wait();
    assert!(request.await.unwrap().is_err(), "the caller saw the connection end");
    assert!(cached_files(model_cache.path()).is_empty(), "no half file where ComfyUI reads");
    // Restarted: the partial download is cleared, and the next request fetches the whole file.
    files.release.store(true, Ordering::SeqCst);
    let _child = spawn_flowhost(port, &dirs);
    wait_live(&client, &base).await;
    assert_eq!(std::fs::read_dir(model_cache.path().join("tmp")).unwrap().count(), 0, "the partial download is gone");
    let response = client.post(format!("{base}/flux-lora")).json(&body).send().await.unwrap();
    assert_eq!(response.status(), 200, "{:?}", response.text().await);
    let whole = held_bytes();
    let name = format!("{}.safetensors", blake3_hex(&whole));
    assert_eq!(cached_files(model_cache.path()), vec![name.clone()]);
    assert_eq!(std::fs::read(model_cache.path().join("loras/flowhost-cache").join(name)).unwrap(), whole);
    assert_eq!(files.hits("/held"), 2);
}
