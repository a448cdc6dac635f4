//! ComfyUI behaviour end to end: a real `flowhost serve` pointed (`--comfyui-url`)
//! at a ComfyUI double the test controls, real plugins, real sockets. Every
//! failure the old service got wrong has a test here, asserting the status and
//! the facts in the problem body.

use std::time::Duration;

use flowhost_tests::{ExternalComfy, TestServer, component, eventually, problem};
use serde_json::{Value, json};



async fn serve(comfy: &ExternalComfy, extra: &[&str]) -> TestServer {
    let mut args: Vec<String> = comfy.args();
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = TestServer::start(
        &[("flux-dev.wasm", &component("flux-dev")), ("workflow.wasm", &component("workflow")), ("misbehave.wasm", &component("fixture-misbehave"))],
        &args,
    )
    .await
    .unwrap();
    // Wait until ComfyUI is seen as ready (the backend probes it at start).
    let ready = eventually(Duration::from_secs(20), || async {
        let h = server.get_json("/health").await.ok()?;
        (h["comfyui"]["status"] == "ready").then_some(())
    })
    .await;
    assert!(ready.is_some(), "ComfyUI never became ready");
    server
}

fn flux(width: u32, height: u32) -> Value {
    json!({"prompt": "a lighthouse at dawn", "width": width, "height": height, "steps": 2, "seed": 11})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn success_returns_a_real_jpeg_of_the_requested_size_with_seed_and_timings() {
    let comfy = ExternalComfy::start().await.unwrap();
    let server = serve(&comfy, &[]).await;
    let response = server.post_json("/flux-dev", &flux(512, 256)).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "image/jpeg");
    assert_eq!(response.headers()["x-seed"], "11");
    assert!(response.headers().contains_key("x-generation-ms"));
    let timing = response.headers()["server-timing"].to_str().unwrap().to_string();
    assert!(timing.contains("comfyui;dur="), "{timing}");
    // ComfyUI's own account of the same span, from its execution_start/success stamps.
    let clock: f64 = timing.split(", ").find_map(|p| p.strip_prefix("comfyui_clock;dur=")).expect("comfyui_clock").parse().unwrap();
    let seen: f64 = timing.split(", ").find_map(|p| p.strip_prefix("comfyui;dur=")).unwrap().parse().unwrap();
    assert!(clock <= seen + 50.0, "{timing}");
    let bytes = response.bytes().await.unwrap();
    let image = image::load_from_memory_with_format(&bytes, image::ImageFormat::Jpeg).expect("a real JPEG");
    assert_eq!((image.width(), image.height()), (512, 256));
    // The same seed gives the same picture; another seed a different one.
    let again = server.post_json("/flux-dev", &flux(512, 256)).await.unwrap().bytes().await.unwrap();
    assert_eq!(bytes, again);
    let mut other = flux(512, 256);
    other["seed"] = json!(12);
    let different = server.post_json("/flux-dev", &other).await.unwrap().bytes().await.unwrap();
    assert_ne!(bytes, different);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_built_invalid_graph_is_a_500_naming_node_and_class_before_any_gpu_time() {
    let comfy = ExternalComfy::start().await.unwrap();
    let server = serve(&comfy, &[]).await;
    let (status, body) = problem(server.post_json("/misbehave", &json!({"mode": "bad-graph"})).await.unwrap()).await.unwrap();
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["type"], "https://flowhost.dev/problems/plugin_built_invalid_workflow");
    assert_eq!(body["nodes"][0]["node_id"], "1");
    assert_eq!(body["nodes"][0]["class_type"], "EmptyImage");
    assert_eq!(body["nodes"][0]["kind"], "value_bigger_than_max");
    assert!(comfy.double.record().prompts.is_empty(), "preflight must stop it before ComfyUI sees it");
    // A dry run shows the same verdict to the plugin author.
    let dry: Value = server.post_json("/misbehave?dry_run=true", &json!({"mode": "bad-graph"})).await.unwrap().json().await.unwrap();
    assert_eq!(dry["preflight"]["ok"], false, "{dry}");
    assert_eq!(dry["preflight"]["issues"][0]["kind"], "value_bigger_than_max");
    let dry: Value = server.post_json("/flux-dev?dry_run=true", &flux(256, 256)).await.unwrap().json().await.unwrap();
    assert_eq!(dry["preflight"]["ok"], true, "{dry}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_invalid_workflow_is_a_400_naming_node_and_input() {
    let comfy = ExternalComfy::start().await.unwrap();
    let server = serve(&comfy, &[]).await;
    let workflow = json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
        "2": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "super-resolution", "width": 32, "height": 32, "crop": "disabled"}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "t"}}
    });
    let (status, body) = problem(server.post_json("/workflow", &json!({"workflow": workflow})).await.unwrap()).await.unwrap();
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["nodes"][0]["node_id"], "2");
    assert_eq!(body["nodes"][0]["class_type"], "ImageScale");
    assert_eq!(body["nodes"][0]["input"], "upscale_method");
    assert_eq!(body["nodes"][0]["kind"], "value_not_in_list");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execution_error_is_a_500_naming_node_class_and_exception() {
    let comfy = ExternalComfy::start().await.unwrap();
    comfy.double.faults().fail_at("VAEDecode", "RuntimeError", "CUDA out of memory");
    let server = serve(&comfy, &[]).await;
    let (status, body) = problem(server.post_json("/flux-dev", &flux(256, 256)).await.unwrap()).await.unwrap();
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["type"], "https://flowhost.dev/problems/workflow_failed");
    assert_eq!(body["node"]["class_type"], "VAEDecode");
    assert_eq!(body["node"]["exception_type"], "RuntimeError");
    assert_eq!(body["node"]["exception_message"], "CUDA out of memory");
    assert!(body["node"]["id"].as_str().is_some_and(|id| !id.is_empty() && id != "unknown"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn comfyui_down_is_a_503_with_retry_after_and_health_says_so() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}");
    let server = TestServer::start(&[("flux-dev.wasm", &component("flux-dev")), ("workflow.wasm", &component("workflow"))], &["--comfyui-url", &url]).await.unwrap();
    let response = server.post_json("/flux-dev", &flux(256, 256)).await.unwrap();
    assert!(response.headers().contains_key("retry-after"));
    let (status, body) = problem(response).await.unwrap();
    assert_eq!(status, 503, "{body}");
    // The reason that matters most comes first: ComfyUI is down (not "model files
    // missing", which the plugin would also say without a volume).
    assert_eq!(body["type"], "https://flowhost.dev/problems/comfyui_unavailable", "{body}");
    let health = server.client.get(server.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 503);
    let health: Value = health.json().await.unwrap();
    assert_ne!(health["comfyui"]["status"], "ready");
    // Dry runs still work: authors can build graphs without ComfyUI.
    let graph = json!({"workflow": {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}}, "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}}});
    assert_eq!(server.post_json("/workflow?dry_run=true", &graph).await.unwrap().status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_mid_run_fails_promptly_with_503_never_hangs() {
    let comfy = ExternalComfy::start().await.unwrap();
    comfy.double.faults().set_step_latency(Duration::from_millis(300));
    let server = serve(&comfy, &["--job-timeout", "60"]).await;
    let body = json!({"prompt": "x", "width": 256, "height": 256, "steps": 50});
    let request = server.post_json("/flux-dev", &body);
    let crash = async {
        tokio::time::sleep(Duration::from_millis(800)).await;
        comfy.double.faults().crash();
    };
    let (response, ()) = tokio::join!(request, crash);
    let (status, body) = problem(response.unwrap()).await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["type"], "https://flowhost.dev/problems/comfyui_unavailable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_interrupts_that_prompt_and_answers_504() {
    let comfy = ExternalComfy::start().await.unwrap();
    comfy.double.faults().hang(true);
    let server = serve(&comfy, &["--job-timeout", "1"]).await;
    let (status, body) = problem(server.post_json("/flux-dev", &flux(256, 256)).await.unwrap()).await.unwrap();
    assert_eq!(status, 504, "{body}");
    let prompt_id = body["prompt_id"].as_str().expect("the problem names the prompt").to_string();
    let interrupted = eventually(Duration::from_secs(10), || async {
        let record = comfy.double.record();
        let hit = record.interrupts.iter().any(|i| i.as_deref() == Some(prompt_id.as_str()))
            || record.queue_deletes.iter().any(|d| d == &prompt_id);
        hit.then_some(())
    })
    .await;
    assert!(interrupted.is_some(), "the double never received an interrupt for {prompt_id}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_cancels_the_prompt() {
    let comfy = ExternalComfy::start().await.unwrap();
    comfy.double.faults().hang(true);
    let server = serve(&comfy, &["--job-timeout", "120"]).await;
    let request = server.client.post(server.url("/flux-dev")).json(&flux(256, 256)).timeout(Duration::from_millis(1500)).send().await;
    assert!(request.is_err(), "the client gave up");
    let submitted = comfy.double.record().prompts.iter().map(|(id, _)| id.clone()).collect::<Vec<_>>();
    assert_eq!(submitted.len(), 1);
    let cancelled = eventually(Duration::from_secs(10), || async {
        let record = comfy.double.record();
        let hit = record.interrupts.iter().any(|i| i.as_deref() == Some(submitted[0].as_str()))
            || record.queue_deletes.iter().any(|d| d == &submitted[0]);
        hit.then_some(())
    })
    .await;
    assert!(cancelled.is_some(), "prompt {} was not cancelled after the client left", submitted[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_limit_obeyed() {
    let comfy = ExternalComfy::start().await.unwrap();
    let server = serve(&comfy, &["--max-in-flight", "2"]).await;
    let body = flux(256, 256);
    let (a, b) = tokio::join!(server.post_json("/flux-dev", &body), server.post_json("/flux-dev", &body));
    assert_eq!(a.unwrap().status(), 200);
    assert_eq!(b.unwrap().status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_limit_violated_gets_503_with_retry_after() {
    let comfy = ExternalComfy::start().await.unwrap();
    comfy.double.faults().hang(true);
    // No room to wait in the queue either (--queue-depth 0): the second is refused.
    let server = std::sync::Arc::new(serve(&comfy, &["--max-in-flight", "1", "--queue-depth", "0", "--job-timeout", "5"]).await);
    let first = {
        let server = server.clone();
        tokio::spawn(async move { server.post_json("/flux-dev", &flux(256, 256)).await.map(|r| r.status().as_u16()) })
    };
    let submitted = eventually(Duration::from_secs(10), || async { (!comfy.double.record().prompts.is_empty()).then_some(()) }).await;
    assert!(submitted.is_some());
    let response = server.post_json("/flux-dev", &flux(256, 256)).await.unwrap();
    assert!(response.headers().contains_key("retry-after"));
    let (status, body) = problem(response).await.unwrap();
    assert_eq!(status, 503);
    assert_eq!(body["type"], "https://flowhost.dev/problems/at_capacity");
    assert_eq!(first.await.unwrap().unwrap(), 504, "the hung one times out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_drop_mid_run_still_delivers_the_image() {
    let comfy = ExternalComfy::start().await.unwrap();
    comfy.double.faults().drop_ws_after(Some(1));
    comfy.double.faults().set_step_latency(Duration::from_millis(50));
    let server = serve(&comfy, &[]).await;
    let response = server.post_json("/flux-dev", &json!({"prompt": "x", "width": 256, "height": 256, "steps": 8, "seed": 3})).await.unwrap();
    assert_eq!(response.status(), 200, "{:?}", response.text().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_model_file_makes_the_endpoint_unready_naming_the_file() {
    let comfy = ExternalComfy::start().await.unwrap();
    std::fs::remove_file(comfy.models.path().join("vae/ae.safetensors")).unwrap();
    let server = serve(&comfy, &[]).await;
    let (status, body) = problem(server.post_json("/flux-dev", &flux(256, 256)).await.unwrap()).await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("ae.safetensors"), "{body}");
    let health = server.get_json("/health").await.unwrap();
    let flux = health["endpoints"].as_array().unwrap().iter().find(|e| e["route"] == "/flux-dev").unwrap().clone();
    assert_eq!(flux["ready"], false);
    assert!(flux["missing"].to_string().contains("ae.safetensors"), "{flux}");
    let workflow = health["endpoints"].as_array().unwrap().iter().find(|e| e["route"] == "/workflow").unwrap().clone();
    assert_eq!(workflow["ready"], true, "other endpoints keep working: {workflow}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supervised_comfyui_crash_is_restarted_and_the_next_request_succeeds() {
    let comfyui = flowhost_tests::fake_comfyui_dir().unwrap();
    let models = ExternalComfy::start().await.unwrap(); // only for its provisioned models folder
    let models_dir = models.models.path().to_string_lossy().to_string();
    let dir = comfyui.path().to_string_lossy().to_string();
    let server = TestServer::start(
        &[("flux-dev.wasm", &component("flux-dev"))],
        &["--comfyui-dir", &dir, "--comfyui-python", "python3", "--models", &models_dir, "--comfyui-startup-timeout", "60"],
    )
    .await
    .unwrap();
    let ready = || async {
        eventually(Duration::from_secs(60), || async {
            let h = server.get_json("/health").await.ok()?;
            (h["comfyui"]["status"] == "ready").then_some(())
        })
        .await
    };
    assert!(ready().await.is_some(), "supervised ComfyUI never became ready");
    assert_eq!(server.post_json("/flux-dev", &flux(256, 256)).await.unwrap().status(), 200);

    let backend = server.server.state.jobs.backend().expect("backend").clone();
    let pid = backend.supervisor().and_then(|s| s.pid()).expect("a child process");
    let killed = std::process::Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap();
    assert!(killed.success());
    let restarted = eventually(Duration::from_secs(60), || async {
        let new_pid = backend.supervisor().and_then(|s| s.pid())?;
        (new_pid != pid && backend.health().is_serving()).then_some(())
    })
    .await;
    assert!(restarted.is_some(), "ComfyUI was not restarted");
    let served = eventually(Duration::from_secs(30), || async {
        let r = server.post_json("/flux-dev", &flux(256, 256)).await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    assert!(served.is_some(), "the next request after the restart must succeed");
    let metrics = server.client.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.lines().any(|l| l.starts_with("flowhost_comfyui_restarts_total") && !l.ends_with(" 0")), "{metrics}");
}

/// Sums the `Server-Timing` phases other than `total`, and returns them with `total`.
fn timing_phases(header: &str) -> (Vec<(String, f64)>, f64) {
    let mut phases = Vec::new();
    let mut total = 0.0;
    for part in header.split(',') {
        let (name, dur) = part.trim().split_once(";dur=").expect("name;dur=ms");
        let dur: f64 = dur.parse().expect("a number");
        match name {
            "total" => total = dur,
            "comfyui_clock" => {} // ComfyUI's own stamps of the comfyui phase: not part of the sum
            _ => phases.push((name.to_string(), dur)),
        }
    }
    (phases, total)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_timing_accounts_for_a_slow_output_fetch() {
    let comfy = ExternalComfy::start().await.unwrap();
    let server = serve(&comfy, &[]).await;
    comfy.double.faults().set_view_delay(Duration::from_millis(600));
    let response = server.post_json("/flux-dev", &flux(256, 256)).await.unwrap();
    assert_eq!(response.status(), 200);
    let header = response.headers()["server-timing"].to_str().unwrap().to_string();
    let (phases, total) = timing_phases(&header);
    let names: Vec<&str> = phases.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["build", "fetch", "queue", "prepare", "comfyui", "encode"], "{header}");
    // The 600 ms spent fetching the output is in a phase, not lost between them.
    let encode = phases.iter().find(|(n, _)| n == "encode").unwrap().1;
    assert!(encode >= 600.0, "{header}");
    let sum: f64 = phases.iter().map(|(_, d)| d).sum();
    assert!(sum <= total + 1.0 && sum >= 0.9 * total, "phases {sum} ms of a {total} ms request: {header}");
}

