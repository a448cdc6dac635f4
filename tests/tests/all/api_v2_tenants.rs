//! API keys are tenants (issue #22): a job or asset belongs to the key that made it; every
//! `/api/v2` job and asset route answers another key's object with 404 (exactly as for an
//! id that does not exist), lists only the caller's own jobs, and an admin key sees all.
//! The keys come from the environment at start-up, so the `flowhost` binary runs as a
//! child with them (see `api_v2_auth`).

use std::process::{Command, Stdio};
use std::time::Duration;

use flowhost_tests::contract::{V2Client, V2Response};
use flowhost_tests::{KillOnDrop, eventually, free_port};
use serde_json::{Value, json};

fn png() -> Vec<u8> {
    let img = image::RgbImage::from_fn(4, 4, |x, y| image::Rgb([(x * 40) as u8, (y * 40) as u8, 7]));
    let mut out = Vec::new();
    image::DynamicImage::ImageRgb8(img).write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
    out
}

async fn upload(client: &V2Client, bytes: &[u8]) -> V2Response {
    let part = reqwest::multipart::Part::bytes(bytes.to_vec()).file_name("mine.png").mime_str("image/png").unwrap();
    let form = reqwest::multipart::Form::new().part("file", part).text("content_type", "image/png").text("file_path", "mine.png");
    client.send(client.request(reqwest::Method::POST, "/api/v2/assets").multipart(form)).await.unwrap()
}

async fn head(client: &V2Client, path: &str) -> u16 {
    client.request(reqwest::Method::HEAD, path).send().await.unwrap().status().as_u16()
}

async fn delete(client: &V2Client, path: &str) -> V2Response {
    client.send(client.request(reqwest::Method::DELETE, path)).await.unwrap()
}

fn job_ids(list: &V2Response) -> Vec<String> {
    list.json()["jobs"].as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap().to_string()).collect()
}

/// LoadImage(asset) → SaveImage.
fn graph(asset_id: &str) -> Value {
    json!({
        "1": {"class_type": "LoadImage", "inputs": {"image": {"__type": "core/ASSET", "info": {"id": asset_id}}}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "tenant"}}
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_job_and_asset_route_refuses_another_keys_objects_and_an_admin_sees_all() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("plugins")).unwrap();
    let port = free_port();
    let _child = KillOnDrop(
        Command::new(flowhost_tests::flowhost_binary())
            .args(["serve", "--simulate", "--warm-up", "off", "--listen", &format!("127.0.0.1:{port}"), "--plugins"])
            .arg(dir.path().join("plugins"))
            .arg("--cache-dir")
            .arg(dir.path().join("cache"))
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .env("FLOWHOST_API_KEYS", "alice:k-alice-tenant,bob:k-bob-tenant")
            .env("FLOWHOST_ADMIN_KEYS", "ops:k-ops-tenant")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let base = format!("http://127.0.0.1:{port}");
    let alice = V2Client::new(&base).with_key("k-alice-tenant");
    let bob = V2Client::new(&base).with_key("k-bob-tenant");
    let ops = V2Client::new(&base).with_key("k-ops-tenant");
    // A plain client while the child starts (V2Client panics on a refused connection).
    let probe = reqwest::Client::new();
    let healthy = eventually(Duration::from_secs(60), || async {
        let status = probe.get(format!("{base}/api/v2/health")).send().await.ok()?.status();
        (status == 200).then_some(())
    })
    .await;
    assert!(healthy.is_some(), "the service came up");

    // Alice's upload, and a job of hers that uses it and makes an output.
    let bytes = png();
    let uploaded = upload(&alice, &bytes).await;
    assert_eq!(uploaded.status, 201, "{}", uploaded.json());
    let asset = uploaded.json()["id"].as_str().unwrap().to_string();
    let hash = uploaded.json()["hash"].as_str().unwrap().to_string();
    let created = alice.post_json("/api/v2/jobs", &json!({"workflow": graph(&asset)})).await;
    assert_eq!(created.status, 201, "{}", created.json());
    let job = created.json()["id"].as_str().unwrap().to_string();
    let done = eventually(Duration::from_secs(60), || async {
        let got = alice.get(&format!("/api/v2/jobs/{job}")).await.json();
        (got["status"] == "succeeded").then_some(got)
    })
    .await
    .expect("alice's job succeeds");
    let output = done["outputs"][0]["id"].as_str().expect("the job has an output").to_string();

    // Bob: every route answers 404, as for an id that does not exist.
    let unknown = "00000000-0000-4000-8000-000000000000";
    for path in [
        format!("/api/v2/jobs/{job}"),
        format!("/api/v2/jobs/{job}/workflow"),
        format!("/api/v2/jobs/{job}/events"),
        format!("/api/v2/assets/{asset}"),
        format!("/api/v2/assets/{asset}/content"),
        format!("/api/v2/assets/{output}"),
        format!("/api/v2/assets/{output}/content"),
    ] {
        let refused = bob.get(&path).await;
        assert_eq!((refused.status, refused.code().as_str()), (404, "not_found"), "bob GET {path}");
        let absent = bob.get(&path.replace(&job, unknown).replace(&asset, unknown).replace(&output, unknown)).await;
        assert_eq!(refused.body, absent.body, "another key's object reads exactly like a missing one ({path})");
    }
    let cancel = bob.post(&format!("/api/v2/jobs/{job}/cancel")).await;
    assert_eq!((cancel.status, cancel.code().as_str()), (404, "not_found"));
    let deleted = delete(&bob, &format!("/api/v2/assets/{asset}")).await;
    assert_eq!((deleted.status, deleted.code().as_str()), (404, "not_found"));
    assert_eq!(alice.get(&format!("/api/v2/assets/{asset}")).await.status, 200, "bob's delete removed nothing");
    assert_eq!(head(&bob, &format!("/api/v2/assets/by-hash/{hash}")).await, 404);
    assert_eq!(head(&alice, &format!("/api/v2/assets/by-hash/{hash}")).await, 200);
    let claimed = bob.post_json("/api/v2/assets/from-hash", &json!({"hash": hash})).await;
    assert_eq!((claimed.status, claimed.code().as_str()), (404, "blob_not_found"), "bob cannot claim alice's bytes by their hash");
    let borrowed = bob.post_json("/api/v2/jobs", &json!({"workflow": graph(&asset)})).await;
    assert_eq!((borrowed.status, borrowed.code().as_str()), (422, "missing_asset"), "bob cannot run a job on alice's asset");
    assert!(job_ids(&bob.get("/api/v2/jobs").await).is_empty(), "bob's list has none of alice's jobs");

    // Bob's own objects are his; alice does not see them either.
    let bob_upload = upload(&bob, &bytes).await;
    assert_eq!(bob_upload.status, 200, "the same bytes are deduplicated, under bob's own record");
    let bob_asset = bob_upload.json()["id"].as_str().unwrap().to_string();
    let bob_job = bob.post_json("/api/v2/jobs", &json!({"workflow": graph(&bob_asset)})).await;
    assert_eq!(bob_job.status, 201, "{}", bob_job.json());
    let bob_job = bob_job.json()["id"].as_str().unwrap().to_string();
    assert_eq!(alice.get(&format!("/api/v2/jobs/{bob_job}")).await.status, 404);
    assert_eq!(alice.get(&format!("/api/v2/assets/{bob_asset}")).await.status, 404);
    assert_eq!(job_ids(&alice.get("/api/v2/jobs").await), vec![job.clone()]);
    assert_eq!(job_ids(&bob.get("/api/v2/jobs").await), vec![bob_job.clone()]);

    // The admin key sees everyone's.
    let all = job_ids(&ops.get("/api/v2/jobs").await);
    assert!(all.contains(&job) && all.contains(&bob_job), "{all:?}");
    for path in [format!("/api/v2/jobs/{job}"), format!("/api/v2/jobs/{bob_job}/workflow"), format!("/api/v2/assets/{asset}"), format!("/api/v2/assets/{output}/content")] {
        assert_eq!(ops.get(&path).await.status, 200, "admin GET {path}");
    }
    assert_eq!(head(&ops, &format!("/api/v2/assets/by-hash/{hash}")).await, 200);
    assert_eq!(ops.post(&format!("/api/v2/jobs/{bob_job}/cancel")).await.status, 200);
    assert_eq!(delete(&alice, &format!("/api/v2/assets/{asset}")).await.status, 204, "the owner may delete");
}
