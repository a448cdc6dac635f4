//! Readiness that means ready (issue #15): `/health` answers 200 only once ComfyUI
//! answers, its websocket is connected and the warm-up round (one cheap job per
//! route whose plugin declares a warm-up request) is done; a failed warm-up keeps
//! it 503 with the reason; after a supervised ComfyUI restart the round runs
//! again. Real `flowhost serve`, real plugins, the ComfyUI double, real sockets.

use std::time::Duration;

use flowhost_tests::{ExternalComfy, TestServer, component, eventually};
use serde_json::{Value, json};



async fn serve(comfy: &ExternalComfy, extra: &[&str]) -> TestServer {
    let mut args: Vec<String> = comfy.args();
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // flux-dev declares a warm-up request; workflow declares none (not warmed).
    TestServer::start(&[("flux-dev.wasm", &component("flux-dev")), ("workflow.wasm", &component("workflow"))], &args).await.unwrap()
}

async fn health(server: &TestServer) -> (u16, Value) {
    let r = server.client.get(server.url("/health")).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_while_the_warm_up_runs_then_ready_with_it_done_and_timed() {
    let comfy = ExternalComfy::start().await.unwrap();
    // A slow warm-up (every node and step takes 150 ms) leaves time to see it running.
    comfy.double.faults().set_step_latency(Duration::from_millis(150));
    let server = serve(&comfy, &["--warm-up", "auto"]).await;

    // ComfyUI answers with its websocket connected, the warm-up runs: still 503.
    let seen_running = eventually(Duration::from_secs(20), || async {
        let (code, h) = health(&server).await;
        (h["comfyui"]["status"] == "ready" && h["warm_up"]["state"] == "running").then_some((code, h))
    })
    .await;
    let (code, h) = seen_running.expect("the warm-up was never seen running while ComfyUI was ready");
    assert_eq!(code, 503, "not ready while warming up: {h}");
    assert_eq!(h["status"], "warming_up", "{h}");
    assert_eq!(h["websocket"]["connected"], true, "{h}");
    let routes = h["warm_up"]["routes"].as_array().unwrap();
    assert_eq!(routes.len(), 1, "only the plugin that declares a warm-up request is warmed: {h}");
    assert_eq!(routes[0]["route"], "/flux-dev");
    assert!(comfy.double.record().prompts.len() <= 1);

    let ready = eventually(Duration::from_secs(30), || async {
        let (code, h) = health(&server).await;
        (code == 200).then_some(h)
    })
    .await
    .expect("never ready after the warm-up");
    assert_eq!(ready["status"], "ready", "{ready}");
    assert_eq!(ready["warm_up"]["state"], "done", "{ready}");
    let route = &ready["warm_up"]["routes"][0];
    assert_eq!(route["state"], "done", "{ready}");
    // The round ran real prompt work in the double (at least one node + one step at 150 ms).
    assert!(route["duration_ms"].as_u64().unwrap() >= 300, "{ready}");
    // Exactly one prompt reached ComfyUI, before any user request: the warm-up's.
    let prompts = comfy.double.record().prompts;
    assert_eq!(prompts.len(), 1, "one warm-up prompt");
    let sampler_steps = prompts[0].1.as_object().unwrap().values().find(|n| n["class_type"] == "KSampler").map(|n| n["inputs"]["steps"].clone());
    assert_eq!(sampler_steps, Some(json!(1)), "the plugin's cheap warm-up request (1 step) was built into the graph");
    // It went through the normal job path: a durable job, succeeded.
    let job_id = route["job_id"].as_str().expect("the warm-up job's id").to_string();
    let job = server.get_json(&format!("/api/v2/jobs/{job_id}")).await.unwrap();
    assert_eq!(job["status"], "succeeded", "{job}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_warm_up_keeps_the_service_not_ready_with_the_reason() {
    let comfy = ExternalComfy::start().await.unwrap();
    comfy.double.faults().fail_at("VAEDecode", "torch.OutOfMemoryError", "CUDA out of memory. Tried to allocate 2.00 GiB");
    let server = serve(&comfy, &["--warm-up", "auto"]).await;
    let failed = eventually(Duration::from_secs(30), || async {
        let (code, h) = health(&server).await;
        (h["warm_up"]["state"] == "failed").then_some((code, h))
    })
    .await;
    let (code, h) = failed.expect("the warm-up never failed");
    assert_eq!(code, 503, "{h}");
    assert_eq!(h["status"], "warm_up_failed", "{h}");
    assert_eq!(h["comfyui"]["status"], "ready", "ComfyUI itself is fine: {h}");
    let route = &h["warm_up"]["routes"][0];
    assert_eq!(route["state"], "failed", "{h}");
    let reason = h["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("/flux-dev"), "the reason names the route: {h}");
    let route_reason = route["reason"].as_str().unwrap_or_default().to_lowercase();
    assert!(route_reason.contains("memory") || route_reason.contains("vaedecode"), "the reason says what failed: {h}");
    assert!(!h.to_string().contains("127.0.0.1"), "no internal addresses: {h}");
    // It stays not ready (the weights are not known to be loaded).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(health(&server).await.0, 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_until_the_websocket_connects() {
    let comfy = ExternalComfy::start().await.unwrap();
    comfy.double.faults().refuse_websocket(true);
    let server = serve(&comfy, &["--warm-up", "off"]).await;
    // ComfyUI answers HTTP (its catalogue loads) but the socket cannot connect.
    let answering = eventually(Duration::from_secs(20), || async {
        let (code, h) = health(&server).await;
        (h["websocket"]["connected"] == false && server.server.state.jobs.backend()?.catalogue().len() > 0).then_some((code, h))
    })
    .await;
    let (code, h) = answering.expect("ComfyUI never answered");
    assert_eq!(code, 503, "answering without a websocket is not ready: {h}");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(health(&server).await.0, 503, "still not ready without the websocket");
    comfy.double.faults().refuse_websocket(false);
    let ready = eventually(Duration::from_secs(20), || async {
        let (code, h) = health(&server).await;
        (code == 200).then_some(h)
    })
    .await
    .expect("ready once the websocket connects");
    assert_eq!(ready["websocket"]["connected"], true, "{ready}");
    assert_eq!(ready["warm_up"]["state"], "off", "{ready}");
}

/// Milliseconds of one `Server-Timing` phase.
fn phase(header: &str, name: &str) -> f64 {
    header
        .split(',')
        .find_map(|part| {
            let (n, dur) = part.trim().split_once(";dur=")?;
            (n == name).then(|| dur.parse().ok()).flatten()
        })
        .unwrap_or_else(|| panic!("no {name} phase in {header}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supervised_start_first_request_does_not_queue_and_a_restart_warms_again() {
    let comfyui = flowhost_tests::fake_comfyui_dir().unwrap();
    let models = ExternalComfy::start().await.unwrap(); // only for its provisioned models folder
    let models_dir = models.models.path().to_string_lossy().to_string();
    let dir = comfyui.path().to_string_lossy().to_string();
    let server = TestServer::start(
        &[("flux-dev.wasm", &component("flux-dev"))],
        &["--comfyui-dir", &dir, "--comfyui-python", "python3", "--models", &models_dir, "--comfyui-startup-timeout", "60", "--warm-up", "auto"],
    )
    .await
    .unwrap();
    let ready = || async {
        eventually(Duration::from_secs(60), || async {
            let (code, h) = health(&server).await;
            (code == 200).then_some(h)
        })
        .await
    };
    let h = ready().await.expect("supervised start never became ready");
    assert_eq!(h["warm_up"]["state"], "done", "{h}");
    assert_eq!(h["warm_up"]["rounds"], 1, "{h}");

    // Ready means the first user request does not wait behind the warm-up.
    let body = json!({"prompt": "a lighthouse at dawn", "width": 256, "height": 256, "steps": 2, "seed": 11});
    let response = server.post_json("/flux-dev", &body).await.unwrap();
    assert_eq!(response.status(), 200);
    let timing = response.headers()["server-timing"].to_str().unwrap().to_string();
    assert!(phase(&timing, "queue") < 50.0, "the first request after ready queued: {timing}");

    // ComfyUI dies; the supervisor restarts it; its weights are gone, so warm-up runs again
    // before the service is ready again.
    let backend = server.server.state.jobs.backend().expect("backend").clone();
    let pid = backend.supervisor().and_then(|s| s.pid()).expect("a child process");
    assert!(std::process::Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap().success());
    let not_ready = eventually(Duration::from_secs(30), || async {
        let (code, h) = health(&server).await;
        (code == 503).then_some(h)
    })
    .await;
    assert!(not_ready.is_some(), "a dead ComfyUI must make the service not ready");
    let again = eventually(Duration::from_secs(60), || async {
        let (code, h) = health(&server).await;
        (code == 200 && h["warm_up"]["rounds"] == 2).then_some(h)
    })
    .await
    .expect("after the restart the warm-up ran again and the service became ready");
    assert_eq!(again["warm_up"]["state"], "done", "{again}");
    assert_ne!(backend.supervisor().and_then(|s| s.pid()), Some(pid));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_warm_up_naming_a_lora_this_volume_lacks_is_skipped_not_fatal() {
    let comfy = ExternalComfy::start().await.unwrap();
    // flux-lora declares a warm-up with the demo LoRA; a real volume has its own LoRAs only.
    std::fs::remove_file(comfy.models.path().join("loras").join("character-123.safetensors")).unwrap();
    let mut args: Vec<String> = comfy.args();
    args.extend(["--warm-up".to_string(), "auto".to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = TestServer::start(&[("flux-dev.wasm", &component("flux-dev")), ("flux-lora.wasm", &component("flux-lora"))], &args).await.unwrap();
    let ready = eventually(Duration::from_secs(30), || async {
        let (code, h) = health(&server).await;
        (code == 200).then_some(h)
    })
    .await
    .expect("a missing demo LoRA must not keep the service unready");
    let routes = ready["warm_up"]["routes"].as_array().unwrap();
    let state_of = |route: &str| routes.iter().find(|r| r["route"] == route).map(|r| r["state"].clone());
    assert_eq!(state_of("/flux-dev"), Some(json!("done")), "{ready}");
    assert_eq!(state_of("/flux-lora"), Some(json!("skipped")), "{ready}");
    let lora = routes.iter().find(|r| r["route"] == "/flux-lora").unwrap();
    assert!(lora["reason"].as_str().unwrap().contains("character-123"), "the reason names the missing LoRA: {ready}");
    // Only flux-dev's warm-up reached ComfyUI.
    assert_eq!(comfy.double.record().prompts.len(), 1);

    // An operator's own warm-up request naming a missing LoRA is a mistake: reported, not ready.
    drop(server);
    let request = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(request.path(), r#"{"prompt": "w", "lora_id": "character-123", "width": 256, "height": 256, "steps": 1}"#).unwrap();
    let mut args: Vec<String> = comfy.args();
    args.extend(["--warm-up".into(), "auto".into(), "--warm-up-request".into(), format!("/flux-lora={}", request.path().display())]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = TestServer::start(&[("flux-dev.wasm", &component("flux-dev")), ("flux-lora.wasm", &component("flux-lora"))], &args).await.unwrap();
    let failed = eventually(Duration::from_secs(30), || async {
        let (code, h) = health(&server).await;
        (h["warm_up"]["state"] == "failed").then_some((code, h))
    })
    .await;
    let (code, h) = failed.expect("an operator's warm-up naming a missing LoRA fails the warm-up");
    assert_eq!(code, 503, "{h}");
}

/// Warm-up and the typed route make the same job of the same request (one `PluginJob →
/// JobSpec` in `generation/`): the models warm-up loaded are the ones the route's first
/// real request needs, so that request is an affinity hit on the warmed worker, not a
/// second model switch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_request_after_warm_up_finds_its_models_loaded() {
    let comfy = ExternalComfy::start().await.unwrap();
    let server = serve(&comfy, &["--warm-up", "auto"]).await;
    let ready = eventually(Duration::from_secs(30), || async {
        let (code, h) = health(&server).await;
        (code == 200).then_some(h)
    })
    .await
    .expect("never ready after the warm-up");
    let worker = &ready["workers"][0];
    assert_eq!(worker["model_switches"], 1, "the warm-up loaded the route's models once: {ready}");
    let warmed_key = worker["loaded_model_key"].as_str().expect("the warm-up left a model key").to_string();

    let status = server.plugin_status("flux-dev.wasm").await.unwrap().expect("flux-dev listed");
    let body = status["warm_up"].clone();
    assert!(body.is_object(), "flux-dev declares its warm-up request: {status}");
    let response = server.post_json("/flux-dev", &body).await.unwrap();
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());

    let (_, after) = health(&server).await;
    let worker = &after["workers"][0];
    assert_eq!(worker["loaded_model_key"], warmed_key.as_str(), "the typed request keyed its models as warm-up did: {after}");
    assert_eq!(worker["model_switches"], 1, "no second switch: {after}");
    assert_eq!(worker["affinity_hits"], 1, "the request was dispatched to the warmed models: {after}");
}
