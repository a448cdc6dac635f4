//! The bundled endpoints end to end through `flowhost serve` and the
//! ComfyUI double: JPEGs of the requested size, the LoRA, InstantID and PuLID paths,
//! `/workflow` media passthrough, and the user-facing errors with their fields.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use base64::Engine as _;
use flowhost_tests::{ExternalComfy, TestServer, build_component, eventually, problem};
use serde_json::{Value, json};

fn bundled() -> Vec<(String, PathBuf)> {
    static BUILT: OnceLock<Vec<(String, PathBuf)>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            ["flux-dev", "flux-lora", "flux-instantid", "flux-pulid", "workflow"]
                .iter()
                .map(|p| (format!("{p}.wasm"), build_component(p, &[]).expect("plugin builds")))
                .collect()
        })
        .clone()
}

async fn start(extra: &[&str]) -> TestServer {
    let plugins = bundled();
    let refs: Vec<(&str, &std::path::Path)> = plugins.iter().map(|(n, p)| (n.as_str(), p.as_path())).collect();
    let server = TestServer::start(&refs, extra).await.unwrap();
    let ready = eventually(Duration::from_secs(20), || async {
        let h = server.get_json("/health").await.ok()?;
        (h["comfyui"]["status"] == "ready").then_some(())
    })
    .await;
    assert!(ready.is_some(), "ComfyUI never became ready");
    server
}

async fn jpeg_size(response: reqwest::Response) -> (u32, u32) {
    let status = response.status();
    let ct = response.headers().get("content-type").map(|v| v.to_str().unwrap().to_string());
    let bytes = response.bytes().await.unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&bytes));
    assert_eq!(ct.as_deref(), Some("image/jpeg"));
    let image = image::load_from_memory_with_format(&bytes, image::ImageFormat::Jpeg).expect("a real JPEG");
    (image.width(), image.height())
}

fn face_png_data_url() -> String {
    let img = image::RgbImage::from_fn(64, 64, |x, y| image::Rgb([(x * 4) as u8, (y * 4) as u8, 128]));
    let mut png = Vec::new();
    image::DynamicImage::ImageRgb8(img).write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
    format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(png))
}

mod simulate {
    use super::*;

    /// ComfyUI answers an identical prompt from its cache, naming the earlier prompt's output
    /// files; flowhost deleted those when the earlier job ended. The repeat must still get its image.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_identical_repeat_request_gets_its_image_after_the_first_jobs_files_were_deleted() {
        let server = start(&["--simulate"]).await;
        let body = json!({"prompt": "the same lighthouse", "width": 256, "height": 256, "steps": 2, "seed": 7});
        let first = server.post_json("/flux-dev", &body).await.unwrap();
        assert_eq!(first.status(), 200);
        let first = first.bytes().await.unwrap();
        for _ in 0..3 {
            let again = server.post_json("/flux-dev", &body).await.unwrap();
            assert_eq!(again.status(), 200, "{:?}", again.text().await);
            assert_eq!(again.bytes().await.unwrap(), first, "the same seed gives the same picture");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_endpoint_returns_a_jpeg_of_the_requested_size() {
        let server = start(&["--simulate"]).await;
        let size = jpeg_size(server.post_json("/flux-dev", &json!({"prompt": "a lighthouse", "width": 512, "height": 768, "steps": 2})).await.unwrap()).await;
        assert_eq!(size, (512, 768));
        let size = jpeg_size(server.post_json("/flux-lora", &json!({"prompt": "a portrait", "lora_id": "character-123", "width": 384, "height": 256, "steps": 2})).await.unwrap()).await;
        assert_eq!(size, (384, 256));
        let size = jpeg_size(server.post_json("/flux-instantid", &json!({"prompt": "a portrait", "reference_image": face_png_data_url(), "width": 512, "height": 512, "steps": 2})).await.unwrap()).await;
        assert_eq!(size, (512, 512));
        let workflow = json!({
            "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 320, "height": 192, "batch_size": 1}},
            "2": {"class_type": "EmptyImage", "inputs": {"width": 320, "height": 192, "batch_size": 1, "color": 255}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "wf"}}
        });
        let size = jpeg_size(server.post_json("/workflow", &json!({"workflow": workflow})).await.unwrap()).await;
        assert_eq!(size, (320, 192));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn workflow_with_an_animated_webp_output_returns_image_webp() {
        let server = start(&["--simulate"]).await;
        let workflow = json!({
            "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 4, "color": 1234}},
            "2": {"class_type": "SaveAnimatedWEBP", "inputs": {"images": ["1", 0], "filename_prefix": "anim", "fps": 6.0, "lossless": false, "quality": 80, "method": "default"}}
        });
        let response = server.post_json("/workflow", &json!({"workflow": workflow})).await.unwrap();
        let status = response.status();
        let ct = response.headers().get("content-type").map(|v| v.to_str().unwrap().to_string());
        let bytes = response.bytes().await.unwrap();
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&bytes));
        assert_eq!(ct.as_deref(), Some("image/webp"));
        assert_eq!(&bytes[..4], b"RIFF");
        assert_eq!(&bytes[8..12], b"WEBP");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn simulation_says_so_in_health_and_in_a_response_header() {
        let server = start(&["--simulate"]).await;
        let health = server.get_json("/health").await.unwrap();
        assert_eq!(health["simulated"], true, "{health}");
        let response = server.post_json("/flux-dev", &json!({"prompt": "p", "width": 256, "height": 256, "steps": 1})).await.unwrap();
        assert_eq!(response.headers().get("x-flowhost-simulated").map(|v| v.to_str().unwrap()), Some("true"));
        assert_eq!(jpeg_size(response).await, (256, 256));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_plugin_hot_loaded_after_start_gets_placeholder_models() {
        let server = TestServer::start(&[], &["--simulate"]).await.unwrap();
        let flux = bundled().into_iter().find(|(n, _)| n == "flux-dev.wasm").unwrap().1;
        flowhost_tests::publish_atomically(server.plugins.path(), "flux_dev.wasm", &std::fs::read(flux).unwrap()).unwrap();
        let loaded = eventually(Duration::from_secs(30), || async {
            let status = server.plugin_status("flux_dev.wasm").await.ok()??;
            (status["status"] == "loaded").then_some(())
        })
        .await;
        assert!(loaded.is_some(), "the new file was never loaded");
        let response = server.post_json("/flux-dev?dry_run=true", &json!({"prompt": "p"})).await.unwrap();
        assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
        let response = server.post_json("/flux-dev", &json!({"prompt": "p", "width": 256, "height": 256, "steps": 1})).await.unwrap();
        assert_eq!(jpeg_size(response).await, (256, 256));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn contract_0_2_and_0_3_fields_are_visible_in_plugins_and_dry_runs() {
        let server = start(&["--simulate"]).await;
        let flux = server.plugin_status("flux-dev.wasm").await.unwrap().unwrap();
        assert_eq!(flux["contract"], "0.3.0", "{flux}");
        assert_eq!(flux["warm_up"], json!({"prompt": "warm-up", "width": 256, "height": 256, "steps": 1, "seed": 0}), "{flux}");
        let job: Value = server.post_json("/flux-lora?dry_run=true", &json!({"prompt": "p", "lora_id": "character-123", "lora_strength": 0.6, "steps": 7})).await.unwrap().json().await.unwrap();
        assert_eq!(job["models"]["source"], "declared", "{job}");
        assert_eq!(job["models"]["base"], json!({"folder": "diffusion_models", "name": "flux1-dev.safetensors"}), "{job}");
        assert_eq!(job["models"]["loras"][0]["name"], "character-123.safetensors", "{job}");
        assert_eq!(job["models"]["loras"][0]["strength_model"], 0.6, "{job}");
        let sampler = job["progress"][0]["node_id"].as_str().expect("a sampler hint");
        assert_eq!(job["workflow"][sampler]["class_type"], "KSampler");
        assert_eq!(job["progress"][0]["steps"], 7);
        assert_eq!(job["fetches"], json!([]), "a volume LoRA is no fetch: {job}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn missing_lora_is_a_404_naming_the_expected_file() {
        let server = start(&["--simulate"]).await;
        let (status, body) = problem(server.post_json("/flux-lora", &json!({"prompt": "x", "lora_id": "nobody-999"})).await.unwrap()).await.unwrap();
        assert_eq!(status, 404, "{body}");
        assert_eq!(body["errors"][0]["field"], "lora_id");
        assert!(body["detail"].as_str().unwrap().contains("loras/nobody-999.safetensors"), "{body}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lora_id_path_traversal_is_a_400() {
        let server = start(&["--simulate"]).await;
        for bad in ["../secrets", "a/b", "..", "x\u{7}y"] {
            let (status, body) = problem(server.post_json("/flux-lora", &json!({"prompt": "x", "lora_id": bad})).await.unwrap()).await.unwrap();
            assert_eq!(status, 400, "{bad}: {body}");
            assert!(body["errors"].to_string().contains("lora_id"), "{body}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn misspelled_fields_of_the_old_service_get_suggestions() {
        let server = start(&["--simulate"]).await;
        let (status, body) = problem(server.post_json("/flux-dev", &json!({"prompt": "x", "guidance_scale": 3.5, "num_inference_steps": 30})).await.unwrap()).await.unwrap();
        assert_eq!(status, 400);
        let errors = body["errors"].to_string();
        assert!(errors.contains("guidance_scale") && errors.contains("did you mean `guidance`"), "{errors}");
        assert!(errors.contains("num_inference_steps") && errors.contains("did you mean `steps`"), "{errors}");
    }
}

mod external_comfy {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lora_written_while_serving_is_usable_without_restart() {
        let comfy = ExternalComfy::start().await.unwrap();
        let args = comfy.args();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let server = start(&args).await;
        let body = json!({"prompt": "x", "lora_id": "hero-7", "width": 256, "height": 256, "steps": 1});
        let (status, _) = problem(server.post_json("/flux-lora", &body).await.unwrap()).await.unwrap();
        assert_eq!(status, 404);
        std::fs::write(comfy.models.path().join("loras/hero-7.safetensors"), b"new lora").unwrap();
        let served = eventually(Duration::from_secs(10), || async {
            let r = server.post_json("/flux-lora", &body).await.ok()?;
            (r.status() == 200).then_some(())
        })
        .await;
        assert!(served.is_some(), "a LoRA added to the volume must be usable without restart");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_face_detected_is_a_422_naming_reference_image() {
        let comfy = ExternalComfy::start().await.unwrap();
        comfy.double.faults().fail_at("ApplyInstantIDAdvanced", "Exception", "Reference Image: No face detected.");
        let args = comfy.args();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let server = start(&args).await;
        let response = server.post_json("/flux-instantid", &json!({"prompt": "a portrait", "reference_image": face_png_data_url(), "width": 256, "height": 256, "steps": 1})).await.unwrap();
        let (status, body) = problem(response).await.unwrap();
        assert_eq!(status, 422, "{body}");
        assert_eq!(body["errors"][0]["field"], "reference_image", "{body}");
    }

    /// The files `/flux-pulid` declares beyond Flux and antelopev2, on the double's volume.
    fn with_pulid_files(comfy: &ExternalComfy, except: &[&str]) {
        for rel in [
            "pulid/pulid_flux_v0.9.1.safetensors",
            "text_encoders/EVA02_CLIP_L_336_psz14_s6B.pt",
            "facexlib/detection_Resnet50_Final.pth",
            "facexlib/parsing_bisenet.pth",
        ] {
            if !except.contains(&rel) {
                let path = comfy.models.path().join(rel);
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(path, b"placeholder weights").unwrap();
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn flux_pulid_returns_a_jpeg_and_no_face_is_a_422_naming_reference_image() {
        let comfy = ExternalComfy::start().await.unwrap();
        with_pulid_files(&comfy, &[]);
        let args = comfy.args();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let server = start(&args).await;
        let body = |seed: u64| json!({"prompt": "a portrait", "reference_image": face_png_data_url(), "width": 256, "height": 384, "steps": 1, "seed": seed});
        assert_eq!(jpeg_size(server.post_json("/flux-pulid", &body(1)).await.unwrap()).await, (256, 384));
        let (_, graph) = comfy.double.record().prompts.last().cloned().expect("the job's prompt");
        let classes: Vec<&str> = graph.as_object().unwrap().values().filter_map(|n| n["class_type"].as_str()).collect();
        assert!(classes.contains(&"ApplyPulidFlux") && classes.contains(&"PulidFluxFaceDetector"), "{classes:?}");
        // What a real ComfyUI 0.3.64 answers when the detector found no face: its empty list
        // reaches ApplyPulidFlux, and the executor's indexing fails there.
        comfy.double.faults().fail_at("ApplyPulidFlux", "IndexError", "list index out of range");
        let (status, problem_body) = problem(server.post_json("/flux-pulid", &body(2)).await.unwrap()).await.unwrap();
        assert_eq!(status, 422, "{problem_body}");
        assert_eq!(problem_body["errors"][0]["field"], "reference_image", "{problem_body}");
        // The same exception elsewhere is not a face problem.
        comfy.double.faults().clear();
        comfy.double.faults().fail_at("KSampler", "IndexError", "list index out of range");
        let (status, problem_body) = problem(server.post_json("/flux-pulid", &body(3)).await.unwrap()).await.unwrap();
        assert_eq!(status, 500, "{problem_body}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn flux_pulid_is_ready_only_with_facexlib_on_the_volume() {
        let comfy = ExternalComfy::start().await.unwrap();
        with_pulid_files(&comfy, &["facexlib/parsing_bisenet.pth"]);
        let args = comfy.args();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let server = start(&args).await;
        let body = json!({"prompt": "p", "reference_image": face_png_data_url(), "width": 256, "height": 256, "steps": 1});
        let (status, problem_body) = problem(server.post_json("/flux-pulid", &body).await.unwrap()).await.unwrap();
        assert_eq!(status, 503, "{problem_body}");
        assert!(problem_body["detail"].as_str().unwrap().contains("facexlib/parsing_bisenet.pth"), "{problem_body}");
        let health = server.get_json("/health").await.unwrap();
        let pulid = health["endpoints"].as_array().unwrap().iter().find(|e| e["route"] == "/flux-pulid").unwrap().clone();
        assert_eq!(pulid["ready"], false, "{pulid}");
        assert!(pulid["missing"].to_string().contains("facexlib/parsing_bisenet.pth"), "{pulid}");
        std::fs::write(comfy.models.path().join("facexlib/parsing_bisenet.pth"), b"placeholder weights").unwrap();
        let ready = eventually(Duration::from_secs(10), || async {
            let h = server.get_json("/health").await.ok()?;
            h["endpoints"].as_array()?.iter().any(|e| e["route"] == "/flux-pulid" && e["ready"] == true).then_some(())
        })
        .await;
        assert!(ready.is_some(), "facexlib/ is a model folder flowhost lists");
        assert_eq!(jpeg_size(server.post_json("/flux-pulid", &body).await.unwrap()).await, (256, 256));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reference_image_from_the_inputs_volume_is_resolved_safely() {
        let comfy = ExternalComfy::start().await.unwrap();
        let inputs = tempfile::tempdir().unwrap();
        std::fs::create_dir(inputs.path().join("faces")).unwrap();
        let data_url = face_png_data_url();
        let png = base64::engine::general_purpose::STANDARD.decode(data_url.split_once(',').unwrap().1).unwrap();
        let png_len = png.len();
        std::fs::write(inputs.path().join("faces/alice.png"), png).unwrap();
        let mut args = comfy.args();
        args.extend(["--inputs".to_string(), inputs.path().to_string_lossy().to_string()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let server = start(&args).await;
        let ok = server.post_json("/flux-instantid", &json!({"prompt": "p", "reference_image": "faces/alice.png", "width": 256, "height": 256, "steps": 1})).await.unwrap();
        assert_eq!(jpeg_size(ok).await, (256, 256));
        let record = comfy.double.record();
        assert_eq!(record.uploads.len(), 1, "the host uploaded the reference image once: {:?}", record.uploads);
        let upload = &record.uploads[0];
        assert_eq!((upload.kind.as_str(), upload.size), ("input", png_len), "the volume file's bytes, into ComfyUI's input folder");
        let (_, graph) = record.prompts.last().expect("the job's prompt");
        let loaded: Vec<&Value> = graph.as_object().unwrap().values().filter(|n| n["class_type"] == "LoadImage").map(|n| &n["inputs"]["image"]).collect();
        assert_eq!(loaded, [&json!(format!("{}/{}", upload.subfolder, upload.name))], "the graph's LoadImage reads the uploaded file");
        let (status, body) = problem(server.post_json("/flux-instantid", &json!({"prompt": "p", "reference_image": "faces/nobody.png"})).await.unwrap()).await.unwrap();
        assert_eq!(status, 404, "{body}");
        assert_eq!(body["errors"][0]["field"], "reference_image");
        let (status, body) = problem(server.post_json("/flux-instantid", &json!({"prompt": "p", "reference_image": "../../etc/passwd"})).await.unwrap()).await.unwrap();
        assert!(status == 400, "{status} {body}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn broken_reference_image_is_a_400_naming_the_field() {
        let server = start(&["--simulate"]).await;
        let bad = format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(b"definitely not a png"));
        let (status, body) = problem(server.post_json("/flux-instantid", &json!({"prompt": "p", "reference_image": bad})).await.unwrap()).await.unwrap();
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["errors"][0]["field"], "reference_image");
        let _: Value = body;
    }
}
