//! `/api/v2` under hostile input and load (issue #22): a declared huge body is refused at
//! once, a stalled body is dropped, a body's shape and the error it causes are bounded,
//! `extra_data.api_key_comfy_org` is bounded, `filename_prefix` cannot leave the output
//! folder, asset bytes stream in and out (never as an inline page), and the caps on
//! transfers and on event streams answer 503 / 429 with Retry-After.

use std::time::Duration;

use flowhost_tests::contract::V2Client;
use flowhost_tests::{ExternalComfy, TestServer, eventually};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn simulated(extra: &[&str]) -> (TestServer, V2Client) {
    let mut args = vec!["--simulate"];
    args.extend_from_slice(extra);
    let server = TestServer::start(&[], &args).await.unwrap();
    let client = V2Client::new(&server.base);
    let ready = eventually(Duration::from_secs(20), || async { (client.get("/api/v2/health").await.status == 200).then_some(()) }).await;
    assert!(ready.is_some(), "/api/v2/health never said ok");
    (server, client)
}

/// Send `head` (request line and headers, without the blank line) and `body`, then read
/// the answer's status line; `None` when none came within `wait`.
async fn raw_status(addr: std::net::SocketAddr, head: &str, body: &[u8], wait: Duration) -> Option<String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(format!("{head}\r\nhost: {addr}\r\n\r\n").as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let mut buf = vec![0u8; 512];
    let n = tokio::time::timeout(wait, stream.read(&mut buf)).await.ok()?.ok()?;
    String::from_utf8_lossy(&buf[..n]).lines().next().map(str::to_string)
}

fn addr_of(server: &TestServer) -> std::net::SocketAddr {
    server.base.trim_start_matches("http://").parse().unwrap()
}

async fn upload(client: &V2Client, bytes: Vec<u8>, content_type: &str) -> Value {
    let part = reqwest::multipart::Part::bytes(bytes).file_name("f.bin").mime_str(content_type).unwrap();
    let form = reqwest::multipart::Form::new().part("file", part).text("content_type", content_type.to_string()).text("file_path", "f.bin");
    let response = client.request(reqwest::Method::POST, "/api/v2/assets").multipart(form).send().await.unwrap();
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap();
    assert!(status == 201 || status == 200, "upload: {status} {body}");
    body
}

fn save(prefix: &str) -> Value {
    json!({
        "5": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": prefix}}
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_huge_body_is_refused_at_once_and_a_stalled_body_is_dropped() {
    let (server, _client) = simulated(&["--body-read-timeout", "1"]).await;
    let addr = addr_of(&server);
    let huge = "content-length: 99000000000\r\ncontent-type: application/json";
    let jobs = raw_status(addr, &format!("POST /api/v2/jobs HTTP/1.1\r\n{huge}"), b"", Duration::from_secs(10)).await;
    assert!(jobs.as_deref().is_some_and(|s| s.contains(" 413")), "jobs: {jobs:?}");
    let assets = raw_status(addr, "POST /api/v2/assets HTTP/1.1\r\ncontent-length: 99000000000\r\ncontent-type: multipart/form-data; boundary=x", b"", Duration::from_secs(10)).await;
    assert!(assets.as_deref().is_some_and(|s| s.contains(" 413")), "assets: {assets:?}");
    // Ten bytes of a declared hundred, then nothing: dropped with 408 after the body timeout.
    let stalled = raw_status(addr, "POST /api/v2/jobs HTTP/1.1\r\ncontent-length: 100\r\ncontent-type: application/json", b"{\"workflow", Duration::from_secs(15)).await;
    assert!(stalled.as_deref().is_some_and(|s| s.contains(" 408")), "stalled: {stalled:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_body_shape_the_error_size_and_the_partner_key_are_bounded() {
    let (_server, client) = simulated(&[]).await;
    // 20,000 keys in one node's inputs: refused by shape, with a short answer.
    let inputs: serde_json::Map<String, Value> = (0..20_000).map(|i| (format!("k{i}"), json!(i))).collect();
    let wide = client.post_json("/api/v2/jobs", &json!({"workflow": {"1": {"class_type": "EmptyImage", "inputs": inputs}}})).await;
    assert_eq!((wide.status, wide.code().as_str()), (422, "invalid_request"), "{}", wide.json());
    assert!(wide.body.len() < 2048, "the refusal is short: {} bytes", wide.body.len());

    // 4,999 nodes of unknown classes: the error lists a bounded number and counts the rest.
    let mut graph = serde_json::Map::new();
    for i in 0..4_999 {
        graph.insert(format!("{i}"), json!({"class_type": format!("NoSuchNode{i}"), "inputs": {}}));
    }
    let unknown = client.post_json("/api/v2/jobs", &json!({"workflow": graph})).await;
    assert_eq!((unknown.status, unknown.code().as_str()), (422, "invalid_workflow"));
    assert!(unknown.body.len() < 64 << 10, "bounded error: {} bytes", unknown.body.len());
    let details = &unknown.json()["error"]["details"];
    let listed: usize = details["node_errors"].as_object().unwrap().values().map(|v| v.as_array().unwrap().len()).sum();
    assert!(listed >= 1 && listed <= 50, "{listed} listed");
    assert!(details["omitted_issues"].as_u64().is_some_and(|n| n as usize + listed >= 4_999), "the rest are counted: {details}");

    let long_key = "k".repeat(4096);
    let partner = client.post_json("/api/v2/jobs", &json!({"workflow": save("ok"), "extra_data": {"api_key_comfy_org": long_key}})).await;
    assert_eq!((partner.status, partner.code().as_str()), (422, "invalid_request"));
    assert_eq!(partner.json()["error"]["details"]["field"], "extra_data.api_key_comfy_org");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filename_prefix_leaving_the_output_folder_is_refused_naming_node_and_input() {
    let (_server, client) = simulated(&[]).await;
    for prefix in ["../../etc/flowhost", "/tmp/abs", "a\u{0}b", "x/../../y"] {
        let refused = client.post_json("/api/v2/jobs", &json!({"workflow": save(prefix)})).await;
        assert_eq!((refused.status, refused.code().as_str()), (422, "invalid_workflow"), "{prefix:?}");
        let error = refused.json()["error"].clone();
        let message = error["message"].as_str().unwrap();
        assert!(message.contains("Node 6") && message.contains("filename_prefix"), "{message}");
        assert_eq!(error["details"]["node_errors"]["6"][0]["field"], "filename_prefix");
        assert!(!refused.body.windows(5).any(|w| w == b"/tmp/" || w == b"/home"), "no server path: {error}");
    }
    assert_eq!(client.post_json("/api/v2/jobs", &json!({"workflow": save("fine/sub-folder")})).await.status, 201);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assets_stream_in_and_out_as_attachments_and_transfers_are_capped() {
    let (server, client) = simulated(&["--max-transfers", "1"]).await;
    // 24 MiB of varied bytes (more than any socket buffer between here and the server).
    let bytes: Vec<u8> = (0..24u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let asset = upload(&client, bytes.clone(), "text/html").await;
    assert_eq!(asset["hash"], flowhost::jobs::blobs::hash_of(&bytes), "hashed as the bytes passed");
    let id = asset["id"].as_str().unwrap();
    let url = server.url(&format!("/api/v2/assets/{id}/content"));
    let http = reqwest::Client::new();

    // A download whose body is not read holds the one transfer slot.
    let held = http.get(&url).send().await.unwrap();
    assert_eq!(held.status(), 200);
    assert_eq!(held.headers()["x-content-type-options"], "nosniff");
    assert!(held.headers()["content-disposition"].to_str().unwrap().starts_with("attachment"), "never rendered inline");
    assert_eq!(held.headers()["content-length"], (24u64 << 20).to_string().as_str());
    let refused = http.get(&url).send().await.unwrap();
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().get("retry-after").is_some());
    let envelope: Value = refused.json().await.unwrap();
    assert!(envelope["error"]["code"].is_string(), "{envelope}");
    let whole = held.bytes().await.unwrap();
    assert!(whole[..] == bytes[..], "the streamed download is the upload");

    // The slot is free again once the body is sent; a range is a part of the same bytes.
    let part = eventually(Duration::from_secs(10), || async {
        let response = http.get(&url).header("range", "bytes=1000-1999").send().await.unwrap();
        (response.status() == 206).then_some(response)
    })
    .await
    .expect("the slot is released with the first body");
    assert_eq!(part.headers()["content-range"], format!("bytes 1000-1999/{}", 24u64 << 20).as_str());
    assert!(part.bytes().await.unwrap()[..] == bytes[1000..2000]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_streams_are_capped_per_job_with_too_many_streams() {
    let comfy = ExternalComfy::start().await.unwrap();
    let mut args = comfy.args();
    args.extend(["--max-event-streams-per-job".to_string(), "2".to_string()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = TestServer::start(&[], &refs).await.unwrap();
    let client = V2Client::new(&server.base);
    let ready = eventually(Duration::from_secs(20), || async { (client.get("/api/v2/health").await.status == 200).then_some(()) }).await;
    assert!(ready.is_some());
    comfy.double.faults().hang(true);
    let created = client.post_json("/api/v2/jobs", &json!({"workflow": save("sse")})).await;
    assert_eq!(created.status, 201);
    let id = created.json()["id"].as_str().unwrap().to_string();
    let url = server.url(&format!("/api/v2/jobs/{id}/events"));
    let http = reqwest::Client::new();
    let first = http.get(&url).send().await.unwrap();
    let second = http.get(&url).send().await.unwrap();
    assert_eq!((first.status(), second.status()), (reqwest::StatusCode::OK, reqwest::StatusCode::OK));
    let third = http.get(&url).send().await.unwrap();
    assert_eq!(third.status(), 429);
    assert!(third.headers().get("retry-after").is_some());
    let envelope: Value = third.json().await.unwrap();
    assert_eq!(envelope["error"]["code"], "too_many_streams");
    assert_eq!(client.get(&format!("/api/v2/jobs/{id}")).await.status, 200, "a plain poll stays available");
    // A client that leaves frees its slot.
    drop(first);
    let reopened = eventually(Duration::from_secs(10), || async {
        let response = http.get(&url).send().await.unwrap();
        (response.status() == 200).then_some(response)
    })
    .await;
    assert!(reopened.is_some(), "the slot of a closed stream is freed");
    comfy.double.faults().hang(false);
}
