//! A job cut by its deadline (issue #28, point 5): the 504 and the v2 job's error name the
//! phase that ran out (upload, ComfyUI, output fetch) and the real limit, and an upload the
//! deadline cut does not leave its file in ComfyUI's input folder when it lands late.

use std::path::{Path, PathBuf};
use std::time::Duration;

use flowhost_tests::{ExternalComfy, TestServer, component, eventually, problem};
use serde_json::{Value, json};

async fn serve(comfy: &ExternalComfy, extra: &[&str]) -> TestServer {
    let mut args: Vec<String> = comfy.args();
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = TestServer::start(&[("flux-dev.wasm", &component("flux-dev")), ("flux-instantid.wasm", &component("flux-instantid"))], &args).await.unwrap();
    let ready = eventually(Duration::from_secs(20), || async {
        let h = server.get_json("/health").await.ok()?;
        (h["comfyui"]["status"] == "ready").then_some(())
    })
    .await;
    assert!(ready.is_some(), "ComfyUI never became ready");
    server
}

fn png_data_url(width: u32, height: u32) -> String {
    use base64::Engine;
    let img = image::RgbImage::from_fn(width, height, |x, y| image::Rgb([(x * 3) as u8, (y * 5) as u8, 77]));
    let mut png = Vec::new();
    image::DynamicImage::ImageRgb8(img).write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
    format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(&png))
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

fn flux() -> Value {
    json!({"prompt": "a lighthouse at dawn", "width": 256, "height": 256, "steps": 2, "seed": 11})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upload_is_a_504_naming_the_upload_and_its_late_file_is_removed() {
    let comfy = ExternalComfy::start().await.unwrap();
    let input_dir = comfy.double.input_dir().to_string_lossy().to_string();
    let server = serve(&comfy, &["--job-timeout", "2", "--comfyui-input-dir", &input_dir]).await;
    // ComfyUI reads the upload, then takes 4 s to write it: past the 2 s deadline.
    comfy.double.faults().set_upload_delay(Duration::from_secs(4));
    let response = server.post_json("/flux-instantid", &json!({"prompt": "a portrait", "reference_image": png_data_url(64, 64), "width": 256, "height": 256, "steps": 1})).await.unwrap();
    let (status, body) = problem(response).await.unwrap();
    assert_eq!(status, 504, "{body}");
    assert_eq!(body["phase"], "upload", "{body}");
    assert_eq!(body["limit_ms"], 2000, "{body}");
    let detail = body["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("uploading its inputs to ComfyUI (limit 2 s, --job-timeout)"), "{detail}");
    assert!(body.get("prompt_id").is_none(), "no prompt was submitted: {body}");
    assert!(comfy.double.record().prompts.is_empty(), "nothing reached ComfyUI's queue");
    // The upload lands late (the double records it when written); the job's folder goes after it.
    let cleaned = eventually(Duration::from_secs(15), || async {
        let landed = !comfy.double.record().uploads.is_empty();
        (landed && files_under(comfy.double.input_dir()).is_empty()).then_some(())
    })
    .await;
    assert!(cleaned.is_some(), "uploads {:?}; left behind: {:?}", comfy.double.record().uploads.len(), files_under(comfy.double.input_dir()));
    // And it stays gone (no second late write).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(files_under(comfy.double.input_dir()).is_empty(), "{:?}", files_under(comfy.double.input_dir()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_execution_is_a_504_naming_comfyui_and_the_limit() {
    let comfy = ExternalComfy::start().await.unwrap();
    comfy.double.faults().hang(true);
    let server = serve(&comfy, &["--job-timeout", "1"]).await;
    let (status, body) = problem(server.post_json("/flux-dev", &flux()).await.unwrap()).await.unwrap();
    assert_eq!(status, 504, "{body}");
    assert_eq!(body["phase"], "comfy_ui", "{body}");
    assert_eq!(body["limit_ms"], 1000, "{body}");
    let prompt_id = body["prompt_id"].as_str().expect("the prompt ran, so it is named");
    let detail = body["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("running in ComfyUI (limit 1 s, --job-timeout)"), "{detail}");
    assert!(detail.contains(&format!("prompt {prompt_id} was cancelled in ComfyUI")), "{detail}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_output_fetch_is_named_in_the_504_and_in_the_v2_jobs_error() {
    let comfy = ExternalComfy::start().await.unwrap();
    let server = serve(&comfy, &["--job-timeout", "2"]).await;
    // The prompt finishes in ComfyUI; fetching its image (`/view`) outlasts the deadline.
    comfy.double.faults().set_view_delay(Duration::from_secs(6));
    let response = server.post_json("/flux-dev", &flux()).await.unwrap();
    let job_id = response.headers().get("x-job-id").expect("the 504 names its job").to_str().unwrap().to_string();
    let (status, body) = problem(response).await.unwrap();
    assert_eq!(status, 504, "{body}");
    assert_eq!(body["phase"], "output_fetch", "{body}");
    let wording = "the job ran out of time while fetching its outputs from ComfyUI (limit 2 s, --job-timeout)";
    assert!(body["detail"].as_str().unwrap_or_default().contains(wording), "{body}");
    let job = server.get_json(&format!("/api/v2/jobs/{job_id}")).await.unwrap();
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["error"]["code"], "timeout", "{job}");
    assert_eq!(job["error"]["message"], wording, "{job}");
}
