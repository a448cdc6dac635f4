//! `/livez` (liveness) against `/health` (readiness), through the real binary with
//! API keys configured and no ComfyUI answering: an orchestrator that probes
//! liveness must not kill a process whose ComfyUI is down or still loading.

use std::process::{Command, Stdio};
use std::time::Duration;

use flowhost_tests::{KillOnDrop as Child, eventually, free_port};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn livez_is_200_without_a_key_while_health_says_not_ready() {
    let plugins = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let port = free_port();
    // A ComfyUI URL nothing listens on: the service is alive but not ready.
    let comfy = format!("http://127.0.0.1:{}", free_port());
    let _child = Child(
        Command::new(flowhost_tests::flowhost_binary())
            .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--comfyui-url", &comfy, "--plugins"])
            .arg(plugins.path())
            .arg("--cache-dir")
            .arg(cache.path())
            // Its own state dir: the default one is locked by whichever flowhost holds it.
            .arg("--state-dir")
            .arg(cache.path().join("state"))
            .env("FLOWHOST_API_KEYS", "app:user-secret-1")
            .env("FLOWHOST_ADMIN_KEYS", "ops:admin-secret-2")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let live = eventually(Duration::from_secs(60), || async { client.get(format!("{base}/livez")).send().await.ok() }).await;
    let live = live.expect("the binary did not come up");
    assert_eq!(live.status(), 200, "alive, no key needed");
    assert!(live.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    let body = live.bytes().await.unwrap();
    assert_eq!(&body[..], b"ok\n", "a tiny body");

    let health = client.get(format!("{base}/health")).send().await.unwrap();
    assert_eq!(health.status(), 503, "not ready: ComfyUI does not answer");
    // Still alive a while later (ComfyUI still down): liveness never follows readiness.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(client.get(format!("{base}/livez")).send().await.unwrap().status(), 200);
}
