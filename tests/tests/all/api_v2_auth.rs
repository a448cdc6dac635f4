//! `/api/v2` with API keys on: the existing keys are bearer tokens, refusals use the v2
//! envelope, `/api/v2/health` stays open. The keys come from the environment at start-up,
//! so this runs the `flowhost` binary as a child with them: setting them in this process
//! would hand them to every other test's in-process server.

use std::process::{Command, Stdio};
use std::time::Duration;

use flowhost_tests::contract::V2Client;
use flowhost_tests::{KillOnDrop, eventually, free_port};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_are_bearer_tokens_and_refusals_use_the_envelope() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _child = KillOnDrop(
        Command::new(flowhost_tests::flowhost_binary())
            .args(["serve", "--simulate", "--warm-up", "off", "--listen", &format!("127.0.0.1:{port}"), "--plugins"])
            .arg({
                let plugins = dir.path().join("plugins");
                std::fs::create_dir_all(&plugins).unwrap();
                plugins
            })
            .arg("--cache-dir")
            .arg(dir.path().join("cache"))
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .env("FLOWHOST_API_KEYS", "alice:k-alice-v2")
            .env_remove("FLOWHOST_ADMIN_KEYS")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let base = format!("http://127.0.0.1:{port}");

    let anonymous = V2Client::new(&base);
    // Until the child listens a request fails to connect: not ready yet, not a failure
    // (`get` would panic on it).
    let healthy = eventually(Duration::from_secs(60), || async {
        let answer = anonymous.send(anonymous.request(reqwest::Method::GET, "/api/v2/health")).await.ok()?;
        (answer.status == 200).then_some(())
    })
    .await;
    assert!(healthy.is_some(), "health is open without a key");
    assert_eq!(anonymous.get("/api/v2/health").await.status, 200);
    let refused = anonymous.get("/api/v2/jobs").await;
    assert_eq!((refused.status, refused.code().as_str()), (401, "unauthorized"));
    assert!(refused.header("www-authenticate").is_some_and(|v| v.starts_with("Bearer")));

    let wrong = V2Client::new(&base).with_key("k-mallory");
    assert_eq!(wrong.get("/api/v2/jobs").await.code(), "unauthorized");

    let alice = V2Client::new(&base).with_key("k-alice-v2");
    assert_eq!(alice.get("/api/v2/jobs").await.status, 200);
    let workflow = json!({
        "5": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "auth"}}
    });
    let created = alice.post_json("/api/v2/jobs", &json!({"workflow": workflow})).await;
    assert_eq!(created.status, 201, "{}", created.json());
    let id = created.json()["id"].as_str().unwrap().to_string();
    assert_eq!(anonymous.get(&format!("/api/v2/jobs/{id}")).await.status, 401, "a job is not readable without a key");
    assert_eq!(alice.get(&format!("/api/v2/jobs/{id}")).await.status, 200);
}
