//! The raster output transport end to end: a real `flowhost serve` against a ComfyUI double
//! with (or without) flowhost's `FlowhostImageOutput` node. JPEG outputs then leave ComfyUI as
//! raw pixels over the websocket — no PNG, no disk, no `/view` — and must be the very JPEG the
//! file path gives; a lost frame falls back to files; a stock ComfyUI keeps `SaveImage`.

use std::time::Duration;

use flowhost_tests::{ExternalComfy, TestServer, component, eventually, nodes_of_class};
use serde_json::{Value, json};

async fn serve(comfy: &ExternalComfy, extra: &[&str]) -> TestServer {
    let mut args: Vec<String> = comfy.args();
    args.extend(extra.iter().map(|s| s.to_string()));
    args.extend(["--warm-up".to_string(), "off".to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = TestServer::start(&[("flux-dev.wasm", &component("flux-dev"))], &args).await.unwrap();
    let ready = eventually(Duration::from_secs(20), || async {
        let h = server.get_json("/health").await.ok()?;
        (h["comfyui"]["status"] == "ready").then_some(())
    })
    .await;
    assert!(ready.is_some(), "ComfyUI never became ready");
    server
}

fn flux(seed: u64) -> Value {
    json!({"prompt": "a lighthouse at dawn", "width": 512, "height": 256, "steps": 2, "seed": seed})
}

async fn jpeg(server: &TestServer, body: &Value) -> bytes::Bytes {
    let response = server.post_json("/flux-dev", body).await.unwrap();
    let status = response.status();
    if status != 200 {
        panic!("{status}: {}", response.text().await.unwrap_or_default());
    }
    assert_eq!(response.headers()["content-type"], "image/jpeg");
    response.bytes().await.unwrap()
}

/// The classes of the output node of every prompt the double accepted, in order.
fn output_classes(comfy: &ExternalComfy) -> Vec<(String, String)> {
    comfy
        .double
        .record()
        .prompts
        .iter()
        .map(|(id, graph)| {
            let class = ["FlowhostImageOutput", "SaveImage"].into_iter().find(|c| nodes_of_class(graph, c) == 1).unwrap_or("neither");
            (id.clone(), class.to_string())
        })
        .collect()
}

fn metric(text: &str, name_and_labels: &str) -> f64 {
    text.lines().find_map(|l| l.strip_prefix(name_and_labels)).and_then(|v| v.trim().parse().ok()).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jpeg_outputs_come_as_pixels_and_are_the_jpeg_the_file_path_makes() {
    let comfy = ExternalComfy::start_with_flowhost_nodes().await.unwrap();
    let pixels = serve(&comfy, &[]).await;
    let files = serve(&comfy, &["--output-transport", "files"]).await;

    let from_pixels = jpeg(&pixels, &flux(5)).await;
    let from_files = jpeg(&files, &flux(5)).await;
    let image = image::load_from_memory_with_format(&from_pixels, image::ImageFormat::Jpeg).expect("a real JPEG");
    assert_eq!((image.width(), image.height()), (512, 256));
    assert!(from_pixels == from_files, "the same pixels make the same JPEG, whichever way they came");
    assert_eq!(jpeg(&pixels, &flux(6)).await != from_pixels, true, "another seed, another picture");

    let classes: Vec<String> = output_classes(&comfy).into_iter().map(|(_, c)| c).collect();
    assert_eq!(classes, ["FlowhostImageOutput", "SaveImage", "FlowhostImageOutput"], "auto used the node, files did not");
    let text = reqwest::get(pixels.url("/metrics")).await.unwrap().text().await.unwrap();
    assert_eq!(metric(&text, "flowhost_outputs_total{transport=\"raster\"}"), 2.0, "{text}");
    assert_eq!(metric(&text, "flowhost_outputs_total{transport=\"encoded\"}"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pixels_lost_with_a_dropped_websocket_come_again_from_files_and_nothing_is_lost() {
    let comfy = ExternalComfy::start_with_flowhost_nodes().await.unwrap();
    let server = serve(&comfy, &[]).await;
    let reference = jpeg(&server, &flux(9)).await;

    comfy.double.faults().drop_ws_on_raster(true);
    let recovered = jpeg(&server, &flux(9)).await;
    assert!(recovered == reference, "the re-run with files gives the same image");
    let prompts = output_classes(&comfy);
    assert_eq!(prompts.len(), 3, "{prompts:?}");
    assert_eq!(prompts[1].1, "FlowhostImageOutput");
    assert_eq!((prompts[2].0.clone(), prompts[2].1.as_str()), (format!("{}-files", prompts[1].0), "SaveImage"), "one re-run, with files, under the derived id");
    let text = reqwest::get(server.url("/metrics")).await.unwrap().text().await.unwrap();
    assert_eq!(metric(&text, "flowhost_outputs_total{transport=\"encoded\"}"), 1.0, "{text}");

    // The socket comes back and the next job uses pixels again.
    comfy.double.faults().drop_ws_on_raster(false);
    let reconnected = eventually(Duration::from_secs(10), || async {
        (reqwest::get(server.url("/health")).await.ok()?.status() == 200).then_some(())
    })
    .await;
    assert!(reconnected.is_some());
    assert!(jpeg(&server, &flux(9)).await == reference);
    assert_eq!(output_classes(&comfy).last().map(|(_, c)| c.clone()).as_deref(), Some("FlowhostImageOutput"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_comfyui_without_flowhosts_node_keeps_save_image() {
    let comfy = ExternalComfy::start().await.unwrap();
    let server = serve(&comfy, &[]).await;
    let bytes = jpeg(&server, &flux(3)).await;
    assert!(image::load_from_memory_with_format(&bytes, image::ImageFormat::Jpeg).is_ok());
    let classes: Vec<String> = output_classes(&comfy).into_iter().map(|(_, c)| c).collect();
    assert_eq!(classes, ["SaveImage"], "a stock ComfyUI is never sent a node it lacks");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_supervised_comfyui_gets_the_node_installed_and_sends_pixels() {
    let comfyui = flowhost_tests::fake_comfyui_dir().unwrap();
    let models = ExternalComfy::start().await.unwrap(); // only for its provisioned models folder
    let models_dir = models.models.path().to_string_lossy().to_string();
    let dir = comfyui.path().to_string_lossy().to_string();
    let server = TestServer::start(
        &[("flux-dev.wasm", &component("flux-dev"))],
        &["--comfyui-dir", &dir, "--comfyui-python", "python3", "--models", &models_dir, "--comfyui-startup-timeout", "60", "--warm-up", "off"],
    )
    .await
    .unwrap();
    let ready = eventually(Duration::from_secs(60), || async {
        let h = server.get_json("/health").await.ok()?;
        (h["comfyui"]["status"] == "ready").then_some(())
    })
    .await;
    assert!(ready.is_some(), "the supervised ComfyUI never became ready");
    let bytes = jpeg(&server, &flux(4)).await;
    assert!(image::load_from_memory_with_format(&bytes, image::ImageFormat::Jpeg).is_ok());
    let text = reqwest::get(server.url("/metrics")).await.unwrap().text().await.unwrap();
    assert_eq!(metric(&text, "flowhost_outputs_total{transport=\"raster\"}"), 1.0, "the node was installed and used: {text}");
}
