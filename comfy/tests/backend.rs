//! End-to-end tests of the ComfyUI backend against the protocol-faithful double, over real sockets on
//! 127.0.0.1: outputs, validation, execution errors, socket loss, ComfyUI down / crashing, deadlines,
//! cancellation, supervision, uploads and the catalogue refresh.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use comfyui_double::{ComfyDouble, DoubleConfig};
use flowhost_comfy::{
    BackendConfig, BackendHealth, BackendMode, ComfyBackend, ComfyError, RunRequest,
};
use serde_json::{Value, json};
use url::Url;

/// Failsafe for waits that must end on their own; a hang is reported instead of blocking CI.
const FAILSAFE: Duration = Duration::from_secs(60);

mod support {
    use super::*;

    pub struct Rig {
        pub double: ComfyDouble,
        pub backend: Arc<ComfyBackend>,
        pub _models: tempfile::TempDir,
    }

    pub fn write_models(dir: &Path) {
        for f in [
            "diffusion_models/flux1-dev.safetensors",
            "text_encoders/clip_l.safetensors",
            "text_encoders/t5xxl_fp16.safetensors",
            "vae/ae.safetensors",
            "checkpoints/flux1-dev-fp8.safetensors",
            "loras/character-123.safetensors",
        ] {
            let path = dir.join(f);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, b"").unwrap();
        }
    }

    pub fn backend_config(url: Url) -> BackendConfig {
        let mut config = BackendConfig::new(BackendMode::Url(url));
        config.health_interval = Duration::from_millis(200);
        config.history_poll_interval = Duration::from_millis(300);
        config.request_timeout = Duration::from_secs(10);
        config
    }

    pub async fn rig() -> Rig {
        let models = tempfile::tempdir().unwrap();
        write_models(models.path());
        let double = ComfyDouble::start(DoubleConfig {
            models_dir: Some(models.path().to_path_buf()),
            ..Default::default()
        })
        .await
        .unwrap();
        let url = Url::parse(&double.url().to_string()).unwrap();
        let mut config = backend_config(url);
        config.input_dir = Some(double.input_dir().to_path_buf());
        let backend = ComfyBackend::start(config).await.unwrap();
        assert!(
            backend.wait_ready(FAILSAFE).await,
            "backend never became ready: {:?}",
            backend.health()
        );
        Rig {
            double,
            backend,
            _models: models,
        }
    }

    /// EmptyImage 64×48 → ImageScale (w×h) → SaveImage "3".
    pub fn scale_graph(w: u32, h: u32) -> Value {
        json!({
            "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 48, "batch_size": 1, "color": 16744448}},
            "2": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "nearest-exact", "width": w, "height": h, "crop": "disabled"}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "t"}}
        })
    }

    pub fn png_size(bytes: &[u8]) -> (u32, u32) {
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
        let w = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
        let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
        (w, h)
    }

    pub fn request(graph: Value, deadline: Duration) -> RunRequest {
        RunRequest::new(graph, deadline)
    }

    /// The prompt ComfyUI is running (or has pending) right now, once there is one.
    pub async fn wait_for_queued_prompt(backend: &ComfyBackend) -> String {
        let poll = async {
            loop {
                if let Ok(q) = backend.client().queue().await {
                    let item = q.queue_running.first().or(q.queue_pending.first()).cloned();
                    if let Some(id) =
                        item.and_then(|i| i.get(1).and_then(Value::as_str).map(str::to_string))
                    {
                        return id;
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::time::timeout(FAILSAFE, poll)
            .await
            .expect("no prompt ever reached ComfyUI's queue")
    }

    pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
        let poll = async {
            while !check() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::time::timeout(FAILSAFE, poll)
            .await
            .unwrap_or_else(|_| panic!("never happened: {what}"));
    }
}

use support::*;

mod outputs {
    use super::*;

    #[tokio::test]
    async fn success_returns_png_of_the_requested_size() {
        let rig = rig().await;
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut req = request(scale_graph(32, 24), FAILSAFE);
        let sink = seen.clone();
        req.on_progress = Some(Arc::new(move |p| sink.lock().unwrap().push(p)));
        let result = rig.backend.run(req).await.unwrap();
        let seen = seen.lock().unwrap().clone();
        assert_eq!(
            seen.first(),
            Some(&flowhost_comfy::Progress::Started),
            "{seen:?}"
        );
        assert!(
            seen.contains(&flowhost_comfy::Progress::Node {
                node_id: "2".into()
            }),
            "{seen:?}"
        );
        assert_eq!(result.media.len(), 1);
        let m = &result.media[0];
        assert_eq!(
            (m.node_id.as_str(), m.media_type.as_str()),
            ("3", "image/png")
        );
        assert_eq!(png_size(&m.bytes), (32, 24));
        assert!(m.filename.ends_with(".png"), "{}", m.filename);
        rig.double.shutdown().await;
    }

    #[tokio::test]
    async fn save_image_websocket_frames_are_captured_for_the_prompt() {
        let rig = rig().await;
        let graph = json!({
            "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 4, "batch_size": 2, "color": 255}},
            "2": {"class_type": "SaveImageWebsocket", "inputs": {"images": ["1", 0]}}
        });
        let result = rig.backend.run(request(graph, FAILSAFE)).await.unwrap();
        assert_eq!(result.media.len(), 2, "one frame per image of the batch");
        for m in &result.media {
            assert_eq!(
                (m.node_id.as_str(), m.media_type.as_str()),
                ("2", "image/png")
            );
            assert_eq!(png_size(&m.bytes), (8, 4));
        }
        rig.double.shutdown().await;
    }

    #[tokio::test]
    async fn animations_come_back_with_their_true_media_type() {
        let rig = rig().await;
        let graph = json!({
            "1": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 3, "color": 0}},
            "2": {"class_type": "SaveAnimatedWEBP", "inputs": {"images": ["1", 0], "filename_prefix": "anim", "fps": 6.0, "lossless": true, "quality": 80, "method": "default"}}
        });
        rig.backend.preflight(&graph).await.unwrap();
        let result = rig.backend.run(request(graph, FAILSAFE)).await.unwrap();
        assert_eq!(result.media.len(), 1);
        assert_eq!(
            (
                result.media[0].node_id.as_str(),
                result.media[0].media_type.as_str()
            ),
            ("2", "image/webp")
        );
        rig.double.shutdown().await;
    }

    #[tokio::test]
    async fn named_outputs_are_returned_and_a_silent_one_is_reported() {
        let rig = rig().await;
        let mut graph = scale_graph(16, 12);
        graph["4"] = json!({"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "u"}});
        let mut req = request(graph.clone(), FAILSAFE);
        req.outputs = vec!["3".into(), "4".into()];
        let result = rig.backend.run(req).await.unwrap();
        let sizes: Vec<(String, (u32, u32))> = result
            .media
            .iter()
            .map(|m| (m.node_id.clone(), png_size(&m.bytes)))
            .collect();
        assert_eq!(
            sizes,
            vec![("3".to_string(), (16, 12)), ("4".to_string(), (64, 48))]
        );

        let mut req = request(graph, FAILSAFE);
        req.outputs = vec!["2".into()]; // not an output node: produces nothing
        match rig.backend.run(req).await {
            Err(ComfyError::OutputMissing { node_id }) => assert_eq!(node_id, "2"),
            other => panic!("expected OutputMissing, got {other:?}"),
        }
        rig.double.shutdown().await;
    }
}

mod failures {
    use super::*;

    #[tokio::test]
    async fn validation_400_carries_node_issue_facts() {
        let rig = rig().await;
        let mut graph = scale_graph(32, 24);
        graph["2"]["inputs"]["upscale_method"] = json!("super-resolution");
        match rig.backend.run(request(graph, FAILSAFE)).await {
            Err(ComfyError::Validation {
                error_type,
                node_errors,
                ..
            }) => {
                assert_eq!(error_type, "prompt_outputs_failed_validation");
                assert_eq!(node_errors.len(), 1);
                let issue = &node_errors[0];
                assert_eq!(
                    (
                        issue.node_id.as_str(),
                        issue.class_type.as_str(),
                        issue.kind.as_str(),
                        issue.input_name.as_deref()
                    ),
                    (
                        "2",
                        "ImageScale",
                        "value_not_in_list",
                        Some("upscale_method")
                    )
                );
                assert!(
                    issue.message.contains("super-resolution"),
                    "{}",
                    issue.message
                );
            }
            other => panic!("expected Validation, got {other:?}"),
        }
        rig.double.shutdown().await;
    }

    #[tokio::test]
    async fn partial_acceptance_with_node_errors_is_an_error() {
        let rig = rig().await;
        let mut graph = scale_graph(32, 24);
        graph["4"] = json!({"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "nope", "width": 8, "height": 8, "crop": "disabled"}});
        graph["5"] = json!({"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "bad"}});
        match rig.backend.run(request(graph, FAILSAFE)).await {
            Err(ComfyError::Validation { node_errors, .. }) => {
                assert_eq!(
                    node_errors
                        .iter()
                        .map(|i| (i.node_id.as_str(), i.kind.as_str()))
                        .collect::<Vec<_>>(),
                    vec![("4", "value_not_in_list")]
                );
            }
            other => panic!("a 200 with node_errors must be an error, got {other:?}"),
        }
        rig.double.shutdown().await;
    }

    #[tokio::test]
    async fn execution_error_names_node_class_and_exception() {
        let rig = rig().await;
        rig.double
            .faults()
            .fail_at("ImageScale", "RuntimeError", "scaler exploded");
        match rig
            .backend
            .run(request(scale_graph(32, 24), FAILSAFE))
            .await
        {
            Err(ComfyError::Execution {
                node_id,
                node_type,
                exception_type,
                exception_message,
                ..
            }) => {
                assert_eq!(
                    (
                        node_id.as_str(),
                        node_type.as_str(),
                        exception_type.as_str()
                    ),
                    ("2", "ImageScale", "RuntimeError")
                );
                assert!(
                    exception_message.contains("scaler exploded"),
                    "{exception_message}"
                );
            }
            other => panic!("expected Execution, got {other:?}"),
        }
        rig.double.shutdown().await;
    }

    #[tokio::test]
    async fn an_interrupt_from_elsewhere_is_reported_as_interrupted() {
        let rig = rig().await;
        rig.double.faults().hang(true);
        let backend = rig.backend.clone();
        let run = tokio::spawn(async move {
            backend
                .run(request(scale_graph(32, 24), Duration::from_secs(3600)))
                .await
        });
        let prompt_id = wait_for_queued_prompt(&rig.backend).await;
        rig.backend.client().interrupt(&prompt_id).await.unwrap(); // e.g. someone pressed Cancel in ComfyUI's UI
        match tokio::time::timeout(FAILSAFE, run).await.unwrap().unwrap() {
            Err(ComfyError::Interrupted {
                prompt_id: interrupted,
                ..
            }) => assert_eq!(interrupted, prompt_id),
            other => panic!("expected Interrupted, got {other:?}"),
        }
        rig.double.faults().clear();
        rig.double.shutdown().await;
    }

    #[tokio::test]
    async fn comfyui_down_is_unavailable() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let backend = ComfyBackend::start(backend_config(
            Url::parse(&format!("http://127.0.0.1:{port}/")).unwrap(),
        ))
        .await
        .unwrap();
        let mut health = backend.health_watch();
        tokio::time::timeout(
            FAILSAFE,
            health.wait_for(|h| matches!(h, BackendHealth::Down { .. })),
        )
        .await
        .unwrap()
        .unwrap();
        match backend.run(request(scale_graph(8, 8), FAILSAFE)).await {
            Err(ComfyError::Unavailable { detail }) => assert!(!detail.is_empty()),
            other => panic!("expected Unavailable, got {other:?}"),
        }
        backend.shutdown().await;
    }

    #[tokio::test]
    async fn crash_mid_run_fails_promptly_with_unavailable() {
        let rig = rig().await;
        rig.double.faults().hang(true);
        let backend = rig.backend.clone();
        let run = tokio::spawn(async move {
            backend
                .run(request(scale_graph(32, 24), Duration::from_secs(3600)))
                .await
        });
        wait_for_queued_prompt(&rig.backend).await;
        rig.double.faults().crash();
        let outcome = tokio::time::timeout(FAILSAFE, run)
            .await
            .expect("run hung after ComfyUI crashed")
            .unwrap();
        assert!(
            matches!(outcome, Err(ComfyError::Unavailable { .. })),
            "got {outcome:?}"
        );
    }
}

mod resilience {
    use super::*;

    #[tokio::test]
    async fn websocket_drop_mid_run_still_delivers_the_result() {
        let rig = rig().await;
        rig.double
            .faults()
            .set_step_latency(Duration::from_millis(300));
        rig.double.faults().drop_ws_after(Some(3));
        let generation_before = rig.backend.client().ws_state().borrow().generation;
        let result = rig
            .backend
            .run(request(scale_graph(20, 10), FAILSAFE))
            .await
            .unwrap();
        assert_eq!(png_size(&result.media[0].bytes), (20, 10));
        let client = rig.backend.client().clone();
        eventually("the client reconnects its socket", || {
            client.ws_state().borrow().generation > generation_before
        })
        .await;
        rig.double.shutdown().await;
    }

    /// A loopback proxy in front of the double that passes HTTP through but, on `/ws`, forwards only the
    /// upgrade answer and then swallows every frame: a socket that looks alive and says nothing.
    async fn silencing_proxy(upstream: std::net::SocketAddr) -> Url {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        async fn read_head(stream: &mut tokio::net::TcpStream) -> Vec<u8> {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            buf
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = Url::parse(&format!("http://{}/", listener.local_addr().unwrap())).unwrap();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let head = read_head(&mut client).await;
                    let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    if server.write_all(&head).await.is_err() {
                        return;
                    }
                    if head.starts_with(b"GET /ws") {
                        let answer = read_head(&mut server).await;
                        let Some(end) = answer.windows(4).position(|w| w == b"\r\n\r\n") else {
                            return;
                        };
                        if client.write_all(&answer[..end + 4]).await.is_err() {
                            return;
                        }
                        let (mut client_read, _client_write) = client.into_split();
                        let (mut server_read, mut server_write) = server.into_split();
                        let upstream_copy = tokio::spawn(async move {
                            tokio::io::copy(&mut client_read, &mut server_write).await
                        });
                        let _ = tokio::io::copy(&mut server_read, &mut tokio::io::sink()).await; // swallowed
                        upstream_copy.abort();
                    } else {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        url
    }

    #[tokio::test]
    async fn a_socket_that_silently_stops_does_not_lose_the_completion() {
        let rig = rig().await;
        rig.double
            .faults()
            .set_step_latency(Duration::from_millis(100));
        let mut config = backend_config(silencing_proxy(rig.double.addr()).await);
        config.input_dir = Some(rig.double.input_dir().to_path_buf());
        let backend = ComfyBackend::start(config).await.unwrap();
        assert!(backend.wait_ready(FAILSAFE).await);
        assert!(
            backend.client().ws_state().borrow().connected,
            "the silent socket looks alive"
        );
        let result = tokio::time::timeout(
            FAILSAFE,
            backend.run(request(scale_graph(24, 16), FAILSAFE)),
        )
        .await
        .expect("completion lost");
        assert_eq!(png_size(&result.unwrap().media[0].bytes), (24, 16));
        assert_eq!(
            backend.client().tracker().queue_remaining(),
            None,
            "no frame (not even `status`) got through"
        );
        backend.shutdown().await;
        rig.double.shutdown().await;
    }

    #[tokio::test]
    async fn deadline_interrupts_that_prompt_and_dequeues_it() {
        let rig = rig().await;
        rig.double.faults().hang(true);
        let outcome = rig
            .backend
            .run(request(scale_graph(32, 24), Duration::from_millis(1500)))
            .await;
        let Err(ComfyError::Timeout { prompt_id, .. }) = outcome else {
            panic!("expected Timeout, got {outcome:?}")
        };
        let record = rig.double.record();
        assert!(
            record.interrupts.contains(&Some(prompt_id.clone())),
            "interrupts: {:?}",
            record.interrupts
        );
        assert!(
            format!("{:?}", record.queue_deletes).contains(&prompt_id),
            "queue deletes: {:?}",
            record.queue_deletes
        );
        rig.double.faults().clear();
        rig.double.shutdown().await;
    }

    #[tokio::test]
    async fn dropped_wait_cancels_the_prompt() {
        let rig = rig().await;
        rig.double.faults().hang(true);
        let backend = rig.backend.clone();
        let run = tokio::spawn(async move {
            backend
                .run(request(scale_graph(32, 24), Duration::from_secs(3600)))
                .await
        });
        let prompt_id = wait_for_queued_prompt(&rig.backend).await;
        run.abort(); // the HTTP client went away
        let double = &rig.double;
        eventually("the abandoned prompt is interrupted", || {
            double
                .record()
                .interrupts
                .contains(&Some(prompt_id.clone()))
        })
        .await;
        rig.double.faults().clear();
        rig.double.shutdown().await;
    }
}

mod inputs_and_catalogue {
    use super::*;

    #[tokio::test]
    async fn upload_is_referenced_by_load_image_and_removed_afterwards() {
        let rig = rig().await;
        let png = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../comfyui-double/fixtures/stretch-partial-weights-output.png"
        ))
        .unwrap();
        let subfolder = ComfyBackend::new_upload_subfolder();
        let reference = rig
            .backend
            .upload_image(png.clone().into(), "face.png", &subfolder)
            .await
            .unwrap();
        assert_eq!(reference, format!("{subfolder}/face.png"));
        let on_disk = rig.double.input_dir().join(&subfolder).join("face.png");
        assert_eq!(std::fs::read(&on_disk).unwrap(), png);

        let graph = json!({
            "1": {"class_type": "LoadImage", "inputs": {"image": reference}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "echo"}}
        });
        rig.backend.preflight(&graph).await.unwrap();
        let result = rig.backend.run(request(graph, FAILSAFE)).await.unwrap();
        assert_eq!(png_size(&result.media[0].bytes), png_size(&png));

        assert!(rig.backend.remove_uploads(&subfolder).await.unwrap());
        assert!(!on_disk.exists() && !on_disk.parent().unwrap().exists());
        assert!(
            rig.backend.remove_uploads("../escape").await.is_err(),
            "path traversal must be refused"
        );
        rig.double.shutdown().await;
    }

    fn lora_graph(lora: &str) -> Value {
        let fixtures: Value = serde_json::from_str(
            &std::fs::read_to_string(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../comfyui-double/fixtures/flux-validation.json"
            ))
            .unwrap(),
        )
        .unwrap();
        let mut graph = fixtures["c1_flux_lora_model_only"]["request"]["prompt"].clone();
        graph["12"]["inputs"]["lora_name"] = json!(lora);
        graph
    }

    #[tokio::test]
    async fn a_lora_added_while_running_is_found_by_refreshing_its_class() {
        let rig = rig().await;
        rig.backend
            .preflight(&lora_graph("character-123.safetensors"))
            .await
            .unwrap();

        let issues = rig
            .backend
            .preflight(&lora_graph("added-later.safetensors"))
            .await
            .unwrap_err();
        assert_eq!(issues.len(), 1);
        assert_eq!(
            (issues[0].node_id.as_str(), issues[0].kind.as_str()),
            ("12", "value_not_in_list")
        );
        assert_eq!(issues[0].input_name.as_deref(), Some("lora_name"));

        std::fs::write(
            rig._models.path().join("loras/added-later.safetensors"),
            b"",
        )
        .unwrap();
        rig.backend
            .preflight(&lora_graph("added-later.safetensors"))
            .await
            .unwrap();
        assert!(
            rig.backend
                .catalogue()
                .combo_options("LoraLoaderModelOnly", "lora_name")
                .unwrap()
                .contains(&json!("added-later.safetensors"))
        );
        rig.double.shutdown().await;
    }

    #[tokio::test]
    async fn preflight_agrees_with_the_double_on_every_captured_case() {
        let rig = rig().await;
        let cases: Value = serde_json::from_str(
            &std::fs::read_to_string(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../comfyui-double/fixtures/prompt-errors.json"
            ))
            .unwrap(),
        )
        .unwrap();
        for case in cases.as_array().unwrap() {
            let Some(graph) = case["request"].get("prompt").filter(|g| g.is_object()) else {
                continue;
            };
            let name = case["case"].as_str().unwrap();
            let ours = rig.backend.preflight(graph).await;
            let theirs = rig
                .backend
                .client()
                .submit(graph, &uuid::Uuid::new_v4().to_string(), &Value::Null)
                .await;
            let mut ours: Vec<(String, String)> = ours
                .err()
                .unwrap_or_default()
                .into_iter()
                .map(|i| (i.node_id, i.kind))
                .collect();
            let mut theirs: Vec<(String, String)> = match theirs {
                Ok(_) => vec![],
                Err(ComfyError::Validation {
                    node_errors,
                    error_type,
                    ..
                }) if node_errors.is_empty() => vec![(String::new(), error_type)],
                Err(ComfyError::Validation { node_errors, .. }) => node_errors
                    .into_iter()
                    .map(|i| (i.node_id, i.kind))
                    .collect(),
                Err(other) => panic!("{name}: {other:?}"),
            };
            if theirs.iter().any(|(_, k)| k == "custom_validation_failed") {
                continue; // file existence on ComfyUI's disk: only ComfyUI can know
            }
            ours.sort();
            theirs.sort();
            assert_eq!(ours, theirs, "case {name}");
        }
        rig.double.shutdown().await;
    }
}

mod supervision {
    use super::*;

    /// The double's binary, built if needed.
    fn double_binary() -> PathBuf {
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target")));
        let binary = target.join("debug").join("comfyui-double");
        if !binary.exists() {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let status = std::process::Command::new(cargo)
                .args(["build", "-p", "comfyui-double", "--bin", "comfyui-double"])
                .env("CARGO_TARGET_DIR", &target)
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .status()
                .unwrap();
            assert!(status.success(), "building comfyui-double failed");
        }
        binary
    }

    #[tokio::test]
    async fn spawns_restarts_after_kill_and_flags_import_failures() {
        let comfy_dir = tempfile::tempdir().unwrap();
        let models = tempfile::tempdir().unwrap();
        write_models(models.path());
        // A stand-in main.py: reports a broken custom node the way ComfyUI does, then becomes the double
        // (same pid, same command line: --listen/--port/--extra-model-paths-config).
        std::fs::write(
            comfy_dir.path().join("main.py"),
            format!(
                "import os, sys\nprint('Import times for custom nodes:', flush=True)\nprint('   0.0 seconds (IMPORT FAILED): /opt/ComfyUI/custom_nodes/broken-pack', file=sys.stderr, flush=True)\nif os.path.exists('hang-once'):\n    os.remove('hang-once')\n    os.environ['COMFYUI_DOUBLE_HANG'] = '1'\nos.execvp({bin:?}, [{bin:?}] + sys.argv[1:])\n",
                bin = double_binary().display().to_string(),
            ),
        )
        .unwrap();
        let model_paths = comfy_dir.path().join("extra_model_paths.yaml");
        std::fs::write(
            &model_paths,
            format!("flowhost:\n  base_path: {}\n  loras: loras\n  vae: vae\n  diffusion_models: diffusion_models\n  text_encoders: text_encoders\n", models.path().display()),
        )
        .unwrap();
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let mut sup = flowhost_comfy::SupervisorConfig::new(comfy_dir.path().to_path_buf(), port);
        sup.startup_timeout = Duration::from_secs(30);
        sup.restart_backoff_initial = Duration::from_millis(100);
        sup.stop_grace = Duration::from_secs(5);
        sup.extra_model_paths_config = Some(model_paths);
        let mut config = backend_config(sup.url().unwrap());
        config.mode = BackendMode::Supervised(sup);
        std::fs::write(comfy_dir.path().join("hang-once"), b"").unwrap();
        let backend = ComfyBackend::start(config).await.unwrap();
        assert!(
            backend.wait_ready(FAILSAFE).await,
            "never served: {:?}",
            backend.health()
        );

        let supervisor = backend.supervisor().unwrap();
        assert_eq!(
            supervisor.import_failures(),
            vec!["/opt/ComfyUI/custom_nodes/broken-pack".to_string()]
        );
        match backend.health() {
            BackendHealth::Degraded { reason } => {
                assert!(reason.contains("broken-pack"), "{reason}")
            }
            other => panic!("import failures must degrade health, got {other:?}"),
        }
        assert!(backend.catalogue().has_class("SaveImage"));
        let loras = backend
            .catalogue()
            .combo_options("LoraLoaderModelOnly", "lora_name")
            .unwrap()
            .to_vec();
        assert_eq!(
            loras,
            vec![json!("character-123.safetensors")],
            "--extra-model-paths-config reached the process"
        );

        // Kill it mid-run (this first process hangs every prompt): the in-flight prompt fails with
        // Unavailable, health goes down, the supervisor restarts it, prompts run again.
        let first_pid = supervisor.pid().unwrap();
        let running = backend.clone();
        let in_flight = tokio::spawn(async move {
            running
                .run(request(scale_graph(10, 10), Duration::from_secs(3600)))
                .await
        });
        wait_for_queued_prompt(&backend).await;
        let mut health = backend.health_watch();
        std::process::Command::new("kill")
            .args(["-KILL", &first_pid.to_string()])
            .status()
            .unwrap();
        let outcome = tokio::time::timeout(FAILSAFE, in_flight)
            .await
            .expect("in-flight prompt hung after ComfyUI died")
            .unwrap();
        assert!(
            matches!(outcome, Err(ComfyError::Unavailable { .. })),
            "got {outcome:?}"
        );
        tokio::time::timeout(FAILSAFE, health.wait_for(|h| !h.is_serving()))
            .await
            .unwrap()
            .unwrap();
        assert!(
            backend.wait_ready(FAILSAFE).await,
            "not restarted: {:?}",
            backend.health()
        );
        let second_pid = supervisor.pid().unwrap();
        assert_ne!(first_pid, second_pid);
        let result = backend
            .run(request(scale_graph(12, 6), FAILSAFE))
            .await
            .unwrap();
        assert_eq!(png_size(&result.media[0].bytes), (12, 6));

        backend.shutdown().await;
        let alive = std::process::Command::new("kill")
            .args(["-0", &second_pid.to_string()])
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap()
            .success();
        assert!(!alive, "ComfyUI still running after shutdown");
    }
}

mod boot {
    use super::support::*;
    use super::*;

    /// While ComfyUI boots, the websocket's reconnect back-off doubles to seconds; once ComfyUI
    /// answers, the backend must connect the socket at once and never report itself serving
    /// (ready or degraded) before it has — on 6593e1a it answered "degraded: websocket not
    /// connected" and the first request waited out the back-off on history polls.
    #[tokio::test]
    async fn health_is_not_serving_before_the_websocket_connects_after_a_slow_boot() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let url = Url::parse(&format!("http://127.0.0.1:{port}")).unwrap();
        let backend = ComfyBackend::start(backend_config(url)).await.unwrap();
        // ComfyUI "loading models": nothing listens; the socket's back-off grows past 3 s.
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(!backend.health().is_serving());
        let mut health = backend.health_watch();
        let _double = ComfyDouble::start(DoubleConfig {
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            ..Default::default()
        })
        .await
        .unwrap();
        let first_serving = tokio::time::timeout(FAILSAFE, health.wait_for(|h| h.is_serving()))
            .await
            .expect("never served")
            .unwrap()
            .clone();
        assert!(
            backend.client().ws_state().borrow().connected,
            "reported {first_serving:?} before the websocket connected"
        );
        assert!(matches!(first_serving, BackendHealth::Ready { .. }), "{first_serving:?}");
        backend.shutdown().await;
    }
}

mod deadline_covers_outputs {
    use super::support::*;
    use super::*;

    /// A `/view` slower than the job's deadline: the run ends with `Timeout` (the host's 504) at
    /// the deadline instead of returning the image after it (6593e1a: 200 after 6 s with a 5 s
    /// deadline).
    #[tokio::test]
    async fn slow_view_times_out_at_the_deadline_not_after() {
        let rig = rig().await;
        rig.double.faults().set_view_delay(Duration::from_secs(30));
        let outcome = tokio::time::timeout(FAILSAFE, rig.backend.run(request(scale_graph(8, 8), Duration::from_secs(2))))
            .await
            .expect("the run outlived the deadline by far");
        match outcome {
            Err(ComfyError::Timeout { waited, .. }) => assert!(waited < Duration::from_secs(30), "{waited:?}"),
            other => panic!("expected a timeout, got {other:?}"),
        }
        rig.double.shutdown().await;
    }
}
