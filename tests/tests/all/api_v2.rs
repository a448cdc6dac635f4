//! The Comfy API v2 at `/api/v2` end to end through a real `flowhost serve` and the ComfyUI
//! double: every endpoint's happy path and errors. Every response goes through
//! [`V2Client`], which checks it against the vendored OpenAPI document (the conformance
//! harness, `tests/support/contract.rs`), and every SSE event against its catalog schema.

use std::time::Duration;

use flowhost_tests::contract::{Contract, V2Client, V2Response};
use flowhost_tests::{ExternalComfy, TestServer, eventually};
use futures::StreamExt;
use serde_json::{Value, json};

/// A service on the embedded double (`--simulate`), no plugins needed for /api/v2.
async fn simulated(extra: &[&str]) -> (TestServer, V2Client) {
    let mut args = vec!["--simulate"];
    args.extend_from_slice(extra);
    let server = TestServer::start(&[], &args).await.unwrap();
    let client = V2Client::new(&server.base);
    wait_healthy(&client).await;
    (server, client)
}

/// A service on a double the test holds (to arm faults and read what the double saw).
async fn external(extra: &[&str]) -> (TestServer, V2Client, ExternalComfy) {
    let comfy = ExternalComfy::start().await.unwrap();
    let mut args: Vec<String> = comfy.args();
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = TestServer::start(&[], &refs).await.unwrap();
    let client = V2Client::new(&server.base);
    wait_healthy(&client).await;
    (server, client, comfy)
}

async fn wait_healthy(client: &V2Client) {
    let ready = eventually(Duration::from_secs(20), || async { (client.get("/api/v2/health").await.status == 200).then_some(()) }).await;
    assert!(ready.is_some(), "/api/v2/health never said ok");
}

fn png(width: u32, height: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(width, height, |x, y| image::Rgb([(x * 3) as u8, (y * 5) as u8, 90]));
    let mut out = Vec::new();
    image::DynamicImage::ImageRgb8(img).write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
    out
}

fn blake3_of(bytes: &[u8]) -> String {
    flowhost::jobs::blobs::hash_of(bytes)
}

async fn upload(client: &V2Client, bytes: &[u8], name: &str, expected_hash: Option<&str>) -> V2Response {
    let part = reqwest::multipart::Part::bytes(bytes.to_vec()).file_name(name.to_string()).mime_str("image/png").unwrap();
    let mut form = reqwest::multipart::Form::new().part("file", part).text("content_type", "image/png").text("file_path", name.to_string());
    if let Some(hash) = expected_hash {
        form = form.text("expected_hash", hash.to_string());
    }
    client.send(client.request(reqwest::Method::POST, "/api/v2/assets").multipart(form)).await.unwrap()
}

fn asset_ref(id: &str) -> Value {
    json!({"__type": "core/ASSET", "info": {"id": id}})
}

/// LoadImage(asset) → SaveImage: the output is the uploaded image as ComfyUI loaded it.
fn load_and_save(asset_id: &str) -> Value {
    json!({
        "1": {"class_type": "LoadImage", "inputs": {"image": asset_ref(asset_id)}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "v2"}}
    })
}

/// EmptyImage → SaveImage: no assets needed.
fn empty_image(width: u32) -> Value {
    json!({
        "5": {"class_type": "EmptyImage", "inputs": {"width": width, "height": 32, "batch_size": 1, "color": 255}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "v2"}}
    })
}

async fn submit(client: &V2Client, workflow: &Value) -> V2Response {
    client.post_json("/api/v2/jobs", &json!({"workflow": workflow})).await
}

async fn submit_ok(client: &V2Client, workflow: &Value) -> Value {
    let response = submit(client, workflow).await;
    assert_eq!(response.status, 201, "{}", response.json());
    response.json()
}

async fn wait_status(client: &V2Client, id: &str, done: impl Fn(&str) -> bool) -> Value {
    let path = format!("/api/v2/jobs/{id}");
    eventually(Duration::from_secs(30), || async {
        let job = client.get(&path).await.json();
        done(job["status"].as_str().unwrap_or_default()).then_some(job)
    })
    .await
    .unwrap_or_else(|| panic!("job {id} never reached the wanted status"))
}

async fn wait_terminal(client: &V2Client, id: &str) -> Value {
    wait_status(client, id, |s| matches!(s, "succeeded" | "failed" | "canceled" | "expired")).await
}

/// Read an SSE stream to its end: (event, data) pairs, each checked against the contract.
async fn read_events(client: &V2Client, path: &str, on_first: impl FnOnce()) -> Vec<(String, Value)> {
    let response = client.request(reqwest::Method::GET, path).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut stream = response.bytes_stream();
    let mut buffer = String::new();
    let mut events = Vec::new();
    let mut on_first = Some(on_first);
    let read = tokio::time::timeout(Duration::from_secs(30), async {
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
                    } else if line.starts_with("id:") {
                        panic!("SSE events must carry no id: {frame}");
                    }
                }
                if name.is_empty() {
                    continue; // keep-alive comment
                }
                let value: Value = serde_json::from_str(&data).unwrap();
                Contract::get().check_event(&name, &value).unwrap();
                events.push((name, value));
                if let Some(f) = on_first.take() {
                    f();
                }
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the stream did not end after the terminal status: {events:?}");
    events
}

mod happy_path {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_uploaded_asset_runs_through_a_job_and_its_output_downloads() {
        let (server, client) = simulated(&[]).await;
        let image = png(40, 24);

        let first = upload(&client, &image, "photo.png", Some(&blake3_of(&image))).await;
        assert_eq!(first.status, 201, "new bytes: 201");
        let first = first.json();
        assert_eq!(first["created_new"], true);
        assert_eq!(first["hash"], blake3_of(&image));
        assert_eq!(first["size_bytes"], image.len());
        assert!(first["url"].as_str().unwrap().starts_with(&server.base), "absolute content url: {}", first["url"]);

        let again = upload(&client, &image, "photo-2.png", None).await;
        assert_eq!(again.status, 200, "deduplicated bytes: 200");
        assert_eq!(again.json()["created_new"], false);
        assert_ne!(again.json()["id"], first["id"]);

        let head = client.send(client.request(reqwest::Method::HEAD, &format!("/api/v2/assets/by-hash/{}", blake3_of(&image)))).await.unwrap();
        assert_eq!(head.status, 200);
        let minted = client.post_json("/api/v2/assets/from-hash", &json!({"hash": blake3_of(&image), "file_path": "p.png"})).await;
        assert_eq!(minted.status, 201);
        assert_eq!(minted.json()["created_new"], false);
        let meta = client.get(&format!("/api/v2/assets/{}", minted.json()["id"].as_str().unwrap())).await;
        assert_eq!(meta.status, 200);
        assert_eq!(meta.json()["file_path"], "p.png");

        let job = submit_ok(&client, &load_and_save(first["id"].as_str().unwrap())).await;
        let id = job["id"].as_str().unwrap().to_string();
        assert_eq!(job["urls"]["self"], format!("/api/v2/jobs/{id}"));
        assert_eq!(job["urls"]["events"], format!("/api/v2/jobs/{id}/events"));
        assert_eq!(job["urls"]["cancel"], format!("/api/v2/jobs/{id}/cancel"));
        let done = wait_terminal(&client, &id).await;
        assert_eq!(done["status"], "succeeded", "{done}");
        assert!(done["completed_at"].is_string() && done["started_at"].is_string());
        let outputs = done["outputs"].as_array().unwrap();
        assert_eq!(outputs.len(), 1, "{done}");
        assert_eq!(outputs[0]["node_id"], "2");
        assert_eq!(outputs[0]["type"], "image");
        assert_eq!(outputs[0]["job_id"], id.as_str());

        let content = client.get(&format!("/api/v2/assets/{}/content", outputs[0]["id"].as_str().unwrap())).await;
        assert_eq!(content.status, 200);
        assert_eq!(content.body.len() as u64, outputs[0]["size_bytes"].as_u64().unwrap());
        let decoded = image::load_from_memory(&content.body).expect("a real image");
        assert_eq!((decoded.width(), decoded.height()), (40, 24), "ComfyUI loaded the uploaded asset");

        let workflow = client.get(&format!("/api/v2/jobs/{id}/workflow")).await.json();
        assert_eq!(workflow["format"], "api");
        assert_eq!(workflow["workflow"]["2"]["class_type"], "SaveImage");

        let listed = client.get("/api/v2/jobs").await.json();
        assert!(listed["jobs"].as_array().unwrap().iter().any(|j| j["id"] == id.as_str()), "{listed}");
        let filtered = client.get("/api/v2/jobs?status=failed").await.json();
        assert!(!filtered["jobs"].as_array().unwrap().iter().any(|j| j["id"] == id.as_str()));

        let canceled_after = client.post(&format!("/api/v2/jobs/{id}/cancel")).await;
        assert_eq!(canceled_after.status, 200);
        assert_eq!(canceled_after.json()["status"], "succeeded", "cancel of a finished job is a no-op");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_job_list_pages_with_a_cursor() {
        let (_server, client) = simulated(&[]).await;
        let mut ids = Vec::new();
        for width in [8, 9, 10] {
            ids.push(submit_ok(&client, &empty_image(width)).await["id"].as_str().unwrap().to_string());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let page = client.get("/api/v2/jobs?limit=2").await.json();
        let first: Vec<&str> = page["jobs"].as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap()).collect();
        assert_eq!(first, vec![ids[2].as_str(), ids[1].as_str()], "newest first");
        let cursor = page["next_cursor"].as_str().expect("a next page");
        let rest = client.get(&format!("/api/v2/jobs?limit=2&cursor={cursor}")).await.json();
        assert_eq!(rest["jobs"][0]["id"], ids[0].as_str());
        assert!(rest.get("next_cursor").is_none(), "the last page has no cursor");
        let bad = client.get("/api/v2/jobs?limit=1000").await;
        assert_eq!((bad.status, bad.code().as_str()), (422, "invalid_request"));
    }
}

mod ranges {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn range_requests_get_206_suffixes_and_416() {
        let (_server, client) = simulated(&[]).await;
        let bytes = png(16, 16);
        let size = bytes.len();
        let asset = upload(&client, &bytes, "r.png", None).await.json();
        let path = format!("/api/v2/assets/{}/content", asset["id"].as_str().unwrap());
        let ranged = |range: &str| client.send(client.request(reqwest::Method::GET, &path).header("Range", range));

        let part = ranged("bytes=0-9").await.unwrap();
        assert_eq!(part.status, 206);
        assert_eq!(&part.body[..], &bytes[..10]);
        assert_eq!(part.header("content-range").unwrap(), format!("bytes 0-9/{size}"));

        let suffix = ranged("bytes=-5").await.unwrap();
        assert_eq!(suffix.status, 206);
        assert_eq!(&suffix.body[..], &bytes[size - 5..]);

        let open = ranged(&format!("bytes={}-", size - 3)).await.unwrap();
        assert_eq!((open.status, &open.body[..]), (206, &bytes[size - 3..]));

        let beyond = ranged(&format!("bytes={size}-")).await.unwrap();
        assert_eq!(beyond.status, 416);
        assert_eq!(beyond.header("content-range").unwrap(), format!("bytes */{size}"));

        let full = client.get(&path).await;
        assert_eq!((full.status, full.body.len()), (200, size));
        assert_eq!(full.header("accept-ranges").as_deref(), Some("bytes"));
    }
}

mod events {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_stream_opens_with_a_snapshot_ends_after_the_terminal_status_and_replays_the_end() {
        let (_server, client, comfy) = external(&[]).await;
        comfy.double.faults().hang(true);
        let job = submit_ok(&client, &empty_image(20)).await;
        let id = job["id"].as_str().unwrap().to_string();
        wait_status(&client, &id, |s| s == "running").await;

        let faults = comfy.double.faults().clone();
        let events = read_events(&client, &format!("/api/v2/jobs/{id}/events"), move || faults.hang(false)).await;
        assert_eq!(events[0].0, "status", "snapshot first: {events:?}");
        assert_eq!(events[0].1["status"], "running");
        let (last_name, last) = events.last().unwrap();
        assert_eq!(last_name, "status");
        assert_eq!(last["status"], "succeeded", "{events:?}");
        assert_eq!(last["outputs"].as_array().map(Vec::len), Some(1), "the terminal status carries the outputs");

        let after = read_events(&client, &format!("/api/v2/jobs/{id}/events"), || {}).await;
        assert_eq!(after.len(), 1, "a stream opened after the end: just the terminal status: {after:?}");
        assert_eq!(after[0].1["status"], "succeeded");

        let missing = client.get(&format!("/api/v2/jobs/{UNKNOWN_ID}/events")).await;
        assert_eq!((missing.status, missing.code().as_str()), (404, "not_found"));
    }
}

mod previews {
    use super::*;

    /// A sampler with `steps` steps whose image is saved: previews come from node 3 (KSampler),
    /// the output from node 9 (SaveImage).
    fn sampled(steps: u32) -> Value {
        json!({
            "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
            "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse", "clip": ["4", 1]}},
            "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
            "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "3": {"class_type": "KSampler", "inputs": {"model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0],
                "seed": 1, "steps": steps, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
            "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
            "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "v2"}}
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_multi_step_job_streams_throttled_previews_and_its_outputs_are_the_real_ones() {
        // ComfyUI started with --preview-method: the sampler sends a JPEG preview per step.
        let comfy = ExternalComfy::start_with_argv(&["--preview-method", "latent2rgb"]).await.unwrap();
        let mut args: Vec<String> = comfy.args();
        args.extend(["--warm-up".to_string(), "off".to_string()]);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let server = TestServer::start(&[], &refs).await.unwrap();
        let client = V2Client::new(&server.base);
        wait_healthy(&client).await;
        // 12 steps of 200 ms: 2.4 s of sampling, 12 preview frames from ComfyUI.
        comfy.double.faults().set_step_latency(Duration::from_millis(200));
        comfy.double.faults().hang(true);
        let job = submit_ok(&client, &sampled(12)).await;
        let id = job["id"].as_str().unwrap().to_string();
        wait_status(&client, &id, |s| s == "running").await;
        let faults = comfy.double.faults().clone();
        let events = read_events(&client, &format!("/api/v2/jobs/{id}/events"), move || faults.hang(false)).await;

        let previews: Vec<&Value> = events.iter().filter(|(name, _)| name == "preview").map(|(_, v)| v).collect();
        assert!(previews.len() >= 2, "previews while sampling: {:?}", events.iter().map(|(n, _)| n).collect::<Vec<_>>());
        assert!(previews.len() < 12, "throttled: fewer previews than the 12 frames ComfyUI sent ({})", previews.len());
        for preview in &previews {
            assert_eq!(preview["node_id"], "3", "from the sampler: {preview}");
            assert_eq!(preview["content_type"], "image/jpeg");
            let bytes = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, preview["data_base64"].as_str().unwrap()).unwrap();
            assert_eq!(&bytes[..2], &[0xFF, 0xD8], "a JPEG");
        }
        // The outputs are exactly the SaveImage output, no preview among them.
        let (_, last) = events.last().unwrap();
        assert_eq!(last["status"], "succeeded", "{last}");
        let outputs = last["outputs"].as_array().unwrap();
        assert_eq!(outputs.len(), 1, "one output (the SaveImage file), not the previews: {last}");
        let done = wait_terminal(&client, &id).await;
        let asset = &done["outputs"][0];
        assert_eq!(asset["node_id"], "9", "{done}");
        let content = client.get(&format!("/api/v2/assets/{}/content", asset["id"].as_str().unwrap())).await;
        assert_eq!(content.status, 200);
        let bytes = content.body.clone();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "the PNG ComfyUI saved");
        assert_eq!(image::load_from_memory(&bytes).unwrap().width(), 64);
    }

    /// The events a stream sends within `within` (it may stay open longer).
    async fn first_events(client: &V2Client, path: &str, within: Duration) -> Vec<(String, Value)> {
        let response = client.request(reqwest::Method::GET, path).send().await.unwrap();
        assert_eq!(response.status(), 200);
        let mut stream = response.bytes_stream();
        let mut buffer = String::new();
        let mut events = Vec::new();
        let _ = tokio::time::timeout(within, async {
            while let Some(Ok(chunk)) = stream.next().await {
                buffer.push_str(&String::from_utf8_lossy(&chunk));
                while let Some(end) = buffer.find("\n\n") {
                    let frame: String = buffer.drain(..end + 2).collect();
                    let name = frame.lines().find_map(|l| l.strip_prefix("event:")).map(|v| v.trim().to_string()).unwrap_or_default();
                    let data: String = frame.lines().filter_map(|l| l.strip_prefix("data:")).map(str::trim_start).collect();
                    if !name.is_empty() {
                        let value: Value = serde_json::from_str(&data).unwrap();
                        Contract::get().check_event(&name, &value).unwrap();
                        events.push((name, value));
                    }
                }
            }
        })
        .await;
        events
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stream_opened_after_sampling_gets_the_latest_preview_in_its_snapshot() {
        let comfy = ExternalComfy::start_with_argv(&["--preview-method", "taesd"]).await.unwrap();
        let mut args: Vec<String> = comfy.args();
        args.extend(["--warm-up".to_string(), "off".to_string()]);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let server = TestServer::start(&[], &refs).await.unwrap();
        let client = V2Client::new(&server.base);
        wait_healthy(&client).await;
        // The output fetch hangs: the job stays running after its sampler sent its last preview.
        comfy.double.faults().set_view_delay(Duration::from_secs(60));
        let job = submit_ok(&client, &sampled(4)).await;
        let id = job["id"].as_str().unwrap().to_string();
        let prompt_id = eventually(Duration::from_secs(20), || async { comfy.double.record().prompts.first().map(|(p, _)| p.clone()) }).await.expect("the prompt reached ComfyUI");
        let http = reqwest::Client::new();
        let executed = eventually(Duration::from_secs(20), || async {
            let history: Value = http.get(format!("{}/history/{prompt_id}", comfy.double.url())).send().await.ok()?.json().await.ok()?;
            history.get(&prompt_id).map(|_| ())
        })
        .await;
        assert!(executed.is_some(), "the prompt finished executing in ComfyUI");
        // No preview is sent any more; a new stream still gets the latest one, with the status.
        let events = first_events(&client, &format!("/api/v2/jobs/{id}/events"), Duration::from_millis(1500)).await;
        assert_eq!(events.first().map(|(n, v)| (n.as_str(), v["status"].clone())), Some(("status", json!("running"))), "{events:?}");
        let preview = events.iter().find(|(n, _)| n == "preview").map(|(_, v)| v.clone()).unwrap_or_else(|| panic!("no preview in the snapshot: {events:?}"));
        assert_eq!(preview["node_id"], "3");
        assert_eq!(preview["content_type"], "image/jpeg");
    }
}

/// A well-formed id no job or asset has.
const UNKNOWN_ID: &str = "7f3d2c1b-9a8e-4d6f-b012-3c4d5e6f7a8b";

mod load {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_hundred_concurrent_pollers_all_get_the_job() {
        let (_server, client) = simulated(&[]).await;
        let job = submit_ok(&client, &empty_image(12)).await;
        let path = format!("/api/v2/jobs/{}", job["id"].as_str().unwrap());
        let polls = (0..200).map(|_| {
            let client = client.clone();
            let path = path.clone();
            tokio::spawn(async move { client.get(&path).await })
        });
        let answers = futures::future::join_all(polls).await;
        for answer in answers {
            let answer = answer.unwrap();
            assert_eq!(answer.status, 200);
            assert_eq!(answer.json()["id"], job["id"]);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_queue_answers_429_with_retry_after_and_releases_the_key() {
        let (_server, client, comfy) = external(&["--max-in-flight", "1", "--queue-depth", "1"]).await;
        comfy.double.faults().hang(true);
        let running = submit_ok(&client, &empty_image(21)).await;
        wait_status(&client, running["id"].as_str().unwrap(), |s| s == "running").await;
        let _queued = submit_ok(&client, &empty_image(22)).await;

        let body = json!({"workflow": empty_image(23)});
        let refused = client.send(client.request(reqwest::Method::POST, "/api/v2/jobs").header("Idempotency-Key", "k-full").json(&body)).await.unwrap();
        assert_eq!((refused.status, refused.code().as_str()), (429, "queue_full"));
        let retry_after: u64 = refused.header("retry-after").expect("Retry-After").parse().expect("seconds");
        assert!(retry_after >= 1);

        comfy.double.faults().hang(false);
        wait_terminal(&client, running["id"].as_str().unwrap()).await;
        let retried = client.send(client.request(reqwest::Method::POST, "/api/v2/jobs").header("Idempotency-Key", "k-full").json(&body)).await.unwrap();
        assert_eq!(retried.status, 201, "a key refused with queue_full was released: {}", retried.json());
    }
}

mod cancel {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cancel_dequeues_a_queued_job_and_interrupts_a_running_one() {
        let (_server, client, comfy) = external(&["--max-in-flight", "1"]).await;
        comfy.double.faults().hang(true);
        let running = submit_ok(&client, &empty_image(31)).await;
        let running_id = running["id"].as_str().unwrap().to_string();
        wait_status(&client, &running_id, |s| s == "running").await;
        let queued = submit_ok(&client, &empty_image(32)).await;
        let queued_id = queued["id"].as_str().unwrap().to_string();
        assert_eq!(queued["status"], "queued");

        let canceled = client.post(&format!("/api/v2/jobs/{queued_id}/cancel")).await;
        assert_eq!(canceled.status, 200);
        assert_eq!(canceled.json()["status"], "canceled", "a queued job is canceled at once");
        let prompts = comfy.double.record().prompts.len();
        assert_eq!(prompts, 1, "the canceled job never reached ComfyUI");

        let canceling = client.post(&format!("/api/v2/jobs/{running_id}/cancel")).await.json();
        assert!(matches!(canceling["status"].as_str(), Some("canceling" | "canceled")), "{canceling}");
        let done = wait_terminal(&client, &running_id).await;
        assert_eq!(done["status"], "canceled", "{done}");
        assert!(!comfy.double.record().interrupts.is_empty(), "ComfyUI was told to interrupt");
        let again = client.post(&format!("/api/v2/jobs/{running_id}/cancel")).await.json();
        assert_eq!(again["status"], "canceled", "cancel is idempotent");
        comfy.double.faults().hang(false);
    }
}

mod idempotency {
    use super::*;

    async fn keyed(client: &V2Client, key: &str, workflow: &Value) -> V2Response {
        client.send(client.request(reqwest::Method::POST, "/api/v2/jobs").header("Idempotency-Key", key).json(&json!({"workflow": workflow}))).await.unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_key_is_single_use_and_released_when_the_submission_failed() {
        let (_server, client) = simulated(&[]).await;
        assert_eq!(keyed(&client, "k-1", &empty_image(40)).await.status, 201);
        let same = keyed(&client, "k-1", &empty_image(40)).await;
        assert_eq!((same.status, same.code().as_str()), (422, "idempotency_key_reuse"), "a retry is refused, not replayed");
        let other = keyed(&client, "k-1", &empty_image(41)).await;
        assert_eq!(other.code(), "idempotency_key_reuse", "another body under the same key is refused too");

        let invalid = json!({"5": {"class_type": "NoSuchNode", "inputs": {}}});
        assert_eq!(keyed(&client, "k-2", &invalid).await.code(), "invalid_workflow");
        assert_eq!(keyed(&client, "k-2", &empty_image(42)).await.status, 201, "a key whose submission failed validation is free again");
    }
}

mod refusals {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bad_submissions_get_the_envelope_code_that_says_why() {
        let (_server, client) = simulated(&[]).await;
        let ui = json!({"last_node_id": 2, "last_link_id": 1, "nodes": [{"id": 1, "type": "EmptyImage"}], "links": [[1, 1, 0, 2, 0, "IMAGE"]]});
        let refused = submit(&client, &ui).await;
        assert_eq!((refused.status, refused.code().as_str()), (422, "workflow_format_ui"));

        for field in ["webhook_url", "inputs"] {
            let refused = client.post_json("/api/v2/jobs", &json!({"workflow": empty_image(8), field: "x"})).await;
            assert_eq!(refused.status, 422);
            assert_eq!(refused.json()["error"]["details"]["field"], field);
            assert_eq!(refused.json()["error"]["details"]["reason"], "reserved");
        }
        let extra = client.post_json("/api/v2/jobs", &json!({"workflow": empty_image(8), "extra_data": {"client_id": "x"}})).await;
        assert_eq!(extra.status, 422);
        assert_eq!(extra.json()["error"]["details"]["field"], "extra_data.client_id");

        let missing = submit(&client, &load_and_save("9f8a1c0d-2b3e-4f56-8a7b-1c2d3e4f5a6b")).await;
        assert_eq!((missing.status, missing.code().as_str()), (422, "missing_asset"));
        assert_eq!(missing.json()["error"]["details"]["node_id"], "1");

        let invalid = submit(&client, &json!({
            "5": {"class_type": "EmptyImage", "inputs": {"width": 0, "height": 32, "batch_size": 1, "color": 0}},
            "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "x"}}
        }))
        .await;
        assert_eq!((invalid.status, invalid.code().as_str()), (422, "invalid_workflow"));
        let body = invalid.json();
        assert!(body["error"]["message"].as_str().unwrap().contains("Node 5 (EmptyImage)"), "{body}");
        assert_eq!(body["error"]["details"]["node_errors"]["5"][0]["field"], "width");

        let not_json = client.send(client.request(reqwest::Method::POST, "/api/v2/jobs").body("{nope")).await.unwrap();
        assert_eq!((not_json.status, not_json.code().as_str()), (422, "invalid_workflow"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn asset_errors_hash_mismatch_blob_not_found_and_delete_holds() {
        let (_server, client) = simulated(&[]).await;
        let bytes = png(8, 8);
        let wrong = format!("blake3:{}", "0".repeat(64));
        let mismatch = upload(&client, &bytes, "m.png", Some(&wrong)).await;
        assert_eq!((mismatch.status, mismatch.code().as_str()), (409, "hash_mismatch"));
        let head = client.send(client.request(reqwest::Method::HEAD, &format!("/api/v2/assets/by-hash/{}", blake3_of(&bytes)))).await.unwrap();
        assert_eq!(head.status, 404, "a refused upload stored nothing");
        let none = client.post_json("/api/v2/assets/from-hash", &json!({"hash": wrong})).await;
        assert_eq!((none.status, none.code().as_str()), (404, "blob_not_found"));
        let garbage = client.post_json("/api/v2/assets/from-hash", &json!({"hash": "../../etc/passwd"})).await;
        assert_eq!(garbage.code(), "blob_not_found");

        let asset = upload(&client, &bytes, "d.png", None).await.json();
        let path = format!("/api/v2/assets/{}", asset["id"].as_str().unwrap());
        let delete = client.send(client.request(reqwest::Method::DELETE, &path)).await.unwrap();
        assert_eq!(delete.status, 204);
        let twice = client.send(client.request(reqwest::Method::DELETE, &path)).await.unwrap();
        assert_eq!((twice.status, twice.code().as_str()), (404, "not_found"));
        assert_eq!(client.get(&path).await.status, 404);

        let job = submit_ok(&client, &empty_image(9)).await;
        let done = wait_terminal(&client, job["id"].as_str().unwrap()).await;
        let output = done["outputs"][0]["id"].as_str().unwrap();
        let held = client.send(client.request(reqwest::Method::DELETE, &format!("/api/v2/assets/{output}"))).await.unwrap();
        assert_eq!((held.status, held.code().as_str()), (409, "asset_in_use"));

        let unknown = client.get("/api/v2/jobs/not-a-uuid").await;
        assert_eq!((unknown.status, unknown.code().as_str()), (404, "not_found"));
    }
}

/// Issue #23: what SDK users write (file names, from-hash dedup, labels) and what flowhost
/// can refuse at submit.
mod sdk_faithful {
    use super::*;

    fn load_named(node_class: &str, input: &str, name: &str) -> Value {
        match node_class {
            "LoadAudio" => json!({
                "1": {"class_type": "LoadAudio", "inputs": {input: name}},
                "2": {"class_type": "SaveAudio", "inputs": {"audio": ["1", 0], "filename_prefix": "v2"}}
            }),
            _ => json!({
                "1": {"class_type": node_class, "inputs": {input: name}},
                "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "v2"}}
            }),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_file_name_is_the_newest_upload_so_named_and_an_unknown_one_is_refused_at_submit() {
        let (_server, client) = simulated(&[]).await;
        assert_eq!(upload(&client, &png(8, 8), "portrait.png", None).await.status, 201);
        assert_eq!(upload(&client, &png(12, 10), "portrait.png", None).await.status, 201);

        let job = submit_ok(&client, &load_named("LoadImage", "image", "portrait.png")).await;
        let done = wait_terminal(&client, job["id"].as_str().unwrap()).await;
        assert_eq!(done["status"], "succeeded", "{done}");
        let content = client.get(&format!("/api/v2/assets/{}/content", done["outputs"][0]["id"].as_str().unwrap())).await;
        let decoded = image::load_from_memory(&content.body).expect("a real image");
        assert_eq!((decoded.width(), decoded.height()), (12, 10), "the newest upload named portrait.png was loaded");
        let workflow = client.get(&format!("/api/v2/jobs/{}/workflow", job["id"].as_str().unwrap())).await.json();
        let executed = workflow["workflow"]["1"]["inputs"]["image"].as_str().unwrap();
        assert!(executed.ends_with("-portrait.png") && executed != "portrait.png", "the executed graph loads the job's copy of the asset: {executed}");

        // Not only LoadImage: every input ComfyUI reads from its input folder.
        let mask = submit(&client, &json!({
            "1": {"class_type": "LoadImageMask", "inputs": {"image": "portrait.png", "channel": "alpha"}},
            "3": {"class_type": "MaskToImage", "inputs": {"mask": ["1", 0]}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "v2"}}
        }))
        .await;
        assert_eq!(mask.status, 201, "LoadImageMask resolves the name too: {}", mask.json());
        for (class, input) in [("LoadImage", "image"), ("LoadAudio", "audio")] {
            let refused = submit(&client, &load_named(class, input, "nobody-uploaded-this.png")).await;
            assert_eq!((refused.status, refused.code().as_str()), (422, "invalid_workflow"), "{class}: {}", refused.json());
            let body = refused.json();
            let issue = &body["error"]["details"]["node_errors"]["1"][0];
            assert_eq!(issue["field"], input, "{body}");
            assert_eq!(issue["reason"], "file_not_found", "{body}");
            assert_eq!(issue["class_type"], class, "{body}");
            assert!(body["error"]["message"].as_str().unwrap().contains("nobody-uploaded-this.png"), "{body}");
        }
        assert_eq!(upload(&client, b"RIFF....WAVEfmt ", "voice.wav", None).await.status, 201);
        let audio = submit(&client, &load_named("LoadAudio", "audio", "voice.wav")).await;
        assert_eq!(audio.status, 201, "an uploaded audio file name resolves too: {}", audio.json());

        // A string that is no file name of an input-folder input passes unchanged.
        let prefix = json!({
            "5": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
            "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "portrait.png"}}
        });
        assert_eq!(submit(&client, &prefix).await.status, 201);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn from_hash_returns_an_identical_reference_as_is_and_answers_only_documented_statuses() {
        let (_server, client) = simulated(&[]).await;
        let bytes = png(9, 9);
        let hash = blake3_of(&bytes);
        let first = upload(&client, &bytes, "a.png", None).await.json();

        let same = client.post_json("/api/v2/assets/from-hash", &json!({"hash": hash, "file_path": "a.png"})).await;
        assert_eq!(same.status, 200, "{}", same.json());
        assert_eq!(same.json()["id"], first["id"], "the existing asset, as is");
        assert_eq!(same.json()["created_new"], false);

        let other = client.post_json("/api/v2/assets/from-hash", &json!({"hash": hash, "file_path": "b.png"})).await;
        assert_eq!(other.status, 201);
        assert_ne!(other.json()["id"], first["id"]);
        let again = client.post_json("/api/v2/assets/from-hash", &json!({"hash": hash, "file_path": "b.png"})).await;
        assert_eq!((again.status, again.json()["id"].clone()), (200, other.json()["id"].clone()));

        for body in [json!({}), json!({"hash": 7}), json!({"hash": hash, "file_path": 7}), json!({"hash": hash, "file_path": "c.png", "expires_in": 5})] {
            let refused = client.post_json("/api/v2/assets/from-hash", &body).await;
            assert_eq!((refused.status, refused.code().as_str()), (404, "blob_not_found"), "{body}");
            assert!(refused.json()["error"]["details"]["field"].is_string(), "{}", refused.json());
        }
        let not_json = client.send(client.request(reqwest::Method::POST, "/api/v2/assets/from-hash").body("{nope")).await.unwrap();
        assert_eq!((not_json.status, not_json.code().as_str()), (404, "blob_not_found"));

        let malformed = upload(&client, &bytes, "m.png", Some("blake3:nothex")).await;
        assert_eq!((malformed.status, malformed.code().as_str()), (409, "hash_mismatch"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn graph_errors_name_no_empty_node_and_what_flowhost_knows_is_refused_at_submit() {
        let (_server, client) = simulated(&[]).await;
        let no_outputs = submit(&client, &json!({"5": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}}})).await;
        assert_eq!((no_outputs.status, no_outputs.code().as_str()), (422, "invalid_workflow"));
        let details = no_outputs.json()["error"]["details"].clone();
        assert_eq!(details["node_errors"], json!({}), "{details}");
        assert_eq!(details["graph_errors"][0]["reason"], "prompt_no_outputs", "{details}");

        let cases = [
            (json!({"6": {"class_type": "NoSuchNode", "inputs": {}}}), "6", None),
            (json!({"6": {"class_type": "SaveImage", "inputs": {"images": ["42", 0], "filename_prefix": "x"}}}), "6", Some("images")),
            (
                json!({
                    "5": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
                    "7": {"class_type": "ImageScale", "inputs": {"image": ["5", 0], "upscale_method": "sideways", "width": 8, "height": 8, "crop": "disabled"}},
                    "6": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "x"}}
                }),
                "7",
                Some("upscale_method"),
            ),
        ];
        for (graph, node, field) in cases {
            let refused = submit(&client, &graph).await;
            assert_eq!((refused.status, refused.code().as_str()), (422, "invalid_workflow"), "{graph}");
            let body = refused.json();
            let issue = &body["error"]["details"]["node_errors"][node][0];
            assert!(issue.is_object(), "{body}");
            if let Some(field) = field {
                assert_eq!(issue["field"], field, "{body}");
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn labels_are_kept_returned_bounded_and_filter_the_list() {
        let (_server, client) = simulated(&[]).await;
        let labeled = |batch: &str, width: u32| json!({"workflow": empty_image(width), "metadata": {"batch": batch, "character": "c-1"}});
        let a = client.post_json("/api/v2/jobs", &labeled("nightly", 8)).await;
        assert_eq!(a.status, 201, "{}", a.json());
        assert_eq!(a.json()["metadata"]["batch"], "nightly");
        let b = client.post_json("/api/v2/jobs", &labeled("nightly", 9)).await.json();
        let other = client.post_json("/api/v2/jobs", &labeled("weekly", 10)).await.json();
        let plain = submit_ok(&client, &empty_image(11)).await;
        assert!(plain.get("metadata").is_none(), "a job without labels is exactly the contract's Job");

        let got = client.get(&format!("/api/v2/jobs/{}", b["id"].as_str().unwrap())).await.json();
        assert_eq!(got["metadata"], json!({"batch": "nightly", "character": "c-1"}));

        let listed = client.get("/api/v2/jobs?metadata%5Bbatch%5D=nightly").await;
        assert_eq!(listed.status, 200);
        let ids: Vec<String> = listed.json()["jobs"].as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap().to_string()).collect();
        assert_eq!(ids, vec![b["id"].as_str().unwrap().to_string(), a.json()["id"].as_str().unwrap().to_string()]);
        let both = client.get("/api/v2/jobs?metadata[batch]=weekly&metadata[character]=c-1").await.json();
        assert_eq!(both["jobs"].as_array().unwrap().len(), 1);
        assert_eq!(both["jobs"][0]["id"], other["id"]);
        let none = client.get("/api/v2/jobs?metadata[batch]=nightly&metadata[character]=c-2").await.json();
        assert_eq!(none["jobs"], json!([]));

        let many: serde_json::Map<String, Value> = (0..17).map(|i| (format!("k{i}"), json!("v"))).collect();
        for (metadata, field) in [(Value::Object(many), "metadata"), (json!({"batch": 1}), "metadata.batch"), (json!({"batch": "x".repeat(300)}), "metadata.batch")] {
            let refused = client.post_json("/api/v2/jobs", &json!({"workflow": empty_image(8), "metadata": metadata})).await;
            assert_eq!((refused.status, refused.code().as_str()), (422, "invalid_request"));
            assert_eq!(refused.json()["error"]["details"]["field"], field);
        }
        let bad_filter = client.get("/api/v2/jobs?metadata[a%20b]=x").await;
        assert_eq!((bad_filter.status, bad_filter.code().as_str()), (422, "invalid_request"));
    }
}

mod conformance {
    use super::*;

    #[test]
    fn the_harness_refuses_what_the_contract_does_not_allow() {
        let contract = Contract::get();
        let envelope = br#"{"error": {"code": "not_found", "message": "x", "details": null}}"#;
        assert!(contract.check("GET", "/api/v2/jobs/abc", 404, Some("application/json"), envelope).is_ok());
        assert!(contract.check("GET", "/api/v2/jobs/abc", 418, Some("application/json"), envelope).is_err(), "undocumented status");
        assert!(contract.check("GET", "/api/v2/jobs/abc", 404, Some("application/problem+json"), envelope).is_err(), "wrong media type");
        let job_without_urls = json!({
            "id": "x", "status": "queued", "created_at": "2026-12-01T00:00:00.000Z", "started_at": null, "completed_at": null,
            "expires_at": "2026-12-02T00:00:00.000Z", "queue_position": 0, "progress": null, "outputs": [], "error": null
        });
        let body = serde_json::to_vec(&job_without_urls).unwrap();
        assert!(contract.check("GET", "/api/v2/jobs/x", 200, Some("application/json"), &body).is_err(), "urls are required");
        let mut bad_time = job_without_urls.clone();
        bad_time["urls"] = json!({"self": "/a", "events": "/b", "cancel": "/c"});
        assert!(contract.check("GET", "/api/v2/jobs/x", 200, Some("application/json"), &serde_json::to_vec(&bad_time).unwrap()).is_ok());
        bad_time["created_at"] = json!("yesterday");
        assert!(contract.check("GET", "/api/v2/jobs/x", 200, Some("application/json"), &serde_json::to_vec(&bad_time).unwrap()).is_err(), "date-time is asserted");
        assert_eq!(contract.template_of("POST", "/api/v2/assets/from-hash"), Some("/api/v2/assets/from-hash"));
        assert_eq!(contract.template_of("GET", "/api/v2/assets/abc"), Some("/api/v2/assets/{id}"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn flowhost_openapi_lists_the_v2_paths() {
        let (server, _client) = simulated(&[]).await;
        let doc = server.get_json("/openapi.json").await.unwrap();
        for path in ["/api/v2/jobs", "/api/v2/jobs/{id}", "/api/v2/jobs/{id}/events", "/api/v2/jobs/{id}/cancel", "/api/v2/assets", "/api/v2/assets/{id}/content", "/api/v2/health"] {
            assert!(doc["paths"].get(path).is_some(), "{path} missing from /openapi.json");
        }
        assert!(doc["components"]["schemas"].get("Job").is_some());
    }
}
