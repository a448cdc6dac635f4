//! Replays the captures of a real ComfyUI 0.3.64 (`fixtures/`) against the double over real sockets on
//! 127.0.0.1 and asserts the same shapes: validation answers, websocket message order and routing, history,
//! /view, uploads, queue/interrupt semantics, SaveImageWebsocket frames, model combos, and each fault.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use comfyui_double::{ComfyDouble, DoubleConfig};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// Hang protection for waits that must end on their own (not a speed assertion).
const FAILSAFE: Duration = Duration::from_secs(30);

mod support {
    use super::*;

    pub fn fixture(name: &str) -> String {
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name)).unwrap()
    }

    pub fn fixture_json(name: &str) -> Value {
        serde_json::from_str(&fixture(name)).unwrap()
    }

    pub fn transcript(name: &str) -> Vec<Value> {
        fixture(name).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    /// Text frames received in a transcript, in order.
    pub fn transcript_frames(name: &str) -> Vec<Value> {
        transcript(name).into_iter().filter(|e| e["dir"] == "ws_recv" && e["frame"] == "text").map(|e| e["data"].clone()).collect()
    }

    /// The model files present while the captures were recorded.
    pub const CAPTURED_MODELS: &[&str] = &[
        "diffusion_models/flux1-dev.safetensors",
        "text_encoders/clip_l.safetensors",
        "text_encoders/t5xxl_fp16.safetensors",
        "vae/ae.safetensors",
        "checkpoints/flux1-dev-fp8.safetensors",
        "checkpoints/garbage.safetensors",
        "loras/character-123.safetensors",
        "instantid/ip-adapter.bin",
        "controlnet/instantid/diffusion_pytorch_model.safetensors",
        "pulid/pulid_flux_v0.9.0.safetensors",
    ];

    pub struct Rig {
        pub double: ComfyDouble,
        pub http: reqwest::Client,
        pub models: tempfile::TempDir,
    }

    pub async fn rig() -> Rig {
        rig_with(false).await
    }

    /// A rig whose ComfyUI has flowhost's `FlowhostImageOutput` installed (or not).
    pub async fn rig_with(flowhost_nodes: bool) -> Rig {
        let models = tempfile::tempdir().unwrap();
        for f in CAPTURED_MODELS {
            let p = models.path().join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, b"").unwrap();
        }
        let double = ComfyDouble::start(DoubleConfig { models_dir: Some(models.path().to_path_buf()), flowhost_nodes, ..Default::default() }).await.unwrap();
        Rig { double, http: reqwest::Client::new(), models }
    }

    pub enum Frame {
        Text(Value),
        Binary(Vec<u8>),
        Closed,
    }

    impl Frame {
        pub fn text(&self) -> Option<&Value> {
            match self {
                Frame::Text(v) => Some(v),
                _ => None,
            }
        }
    }

    pub struct Ws {
        pub stream: tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    }

    impl Ws {
        pub async fn next(&mut self) -> Frame {
            loop {
                match tokio::time::timeout(FAILSAFE, self.stream.next()).await.expect("websocket went silent") {
                    Some(Ok(Message::Text(t))) => return Frame::Text(serde_json::from_str(t.as_str()).unwrap()),
                    Some(Ok(Message::Binary(b))) => return Frame::Binary(b.to_vec()),
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return Frame::Closed,
                    Some(Ok(_)) => continue,
                }
            }
        }

        pub async fn next_text(&mut self) -> Value {
            loop {
                match self.next().await {
                    Frame::Text(v) => return v,
                    Frame::Binary(_) => continue,
                    Frame::Closed => panic!("socket closed"),
                }
            }
        }

        /// Every frame up to and including `executing(null)` of `prompt_id`.
        pub async fn until_done(&mut self, prompt_id: &str) -> Vec<Frame> {
            let mut out = Vec::new();
            loop {
                let f = self.next().await;
                let done = matches!(&f, Frame::Text(v) if v["type"] == "executing" && v["data"]["node"].is_null() && v["data"]["prompt_id"] == prompt_id);
                let closed = matches!(f, Frame::Closed);
                out.push(f);
                if done || closed {
                    return out;
                }
            }
        }
    }

    pub fn texts(frames: &[Frame]) -> Vec<Value> {
        frames.iter().filter_map(|f| f.text().cloned()).collect()
    }

    pub fn types(frames: &[Value]) -> Vec<String> {
        frames.iter().map(|f| f["type"].as_str().unwrap().to_string()).collect()
    }

    impl Rig {
        pub fn url(&self, path: &str) -> String {
            format!("{}{path}", self.double.url())
        }

        pub async fn ws(&self, client_id: &str) -> Ws {
            let url = format!("ws://{}/ws?clientId={client_id}", self.double.addr());
            let (stream, _) = tokio_tungstenite::connect_async(url).await.unwrap();
            let mut ws = Ws { stream };
            let hello = ws.next_text().await;
            assert_eq!(hello["type"], "status");
            assert_eq!(hello["data"]["sid"], client_id);
            ws
        }

        pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
            let r = self.http.post(self.url(path)).json(body).send().await.unwrap();
            let status = r.status().as_u16();
            let text = r.text().await.unwrap();
            (status, if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::String(text)) })
        }

        pub async fn get(&self, path: &str) -> (u16, Value) {
            let r = self.http.get(self.url(path)).send().await.unwrap();
            let status = r.status().as_u16();
            let text = r.text().await.unwrap();
            (status, if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::String(text)) })
        }

        /// POST /prompt that must be accepted; returns the prompt id.
        pub async fn submit(&self, body: Value) -> String {
            let (status, r) = self.post("/prompt", &body).await;
            assert_eq!(status, 200, "{r}");
            r["prompt_id"].as_str().unwrap().to_string()
        }

        pub async fn history(&self, prompt_id: &str) -> Value {
            for _ in 0..1500 {
                let (_, h) = self.get(&format!("/history/{prompt_id}")).await;
                if let Some(entry) = h.get(prompt_id) {
                    return entry.clone();
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            panic!("prompt {prompt_id} never reached history");
        }

        pub async fn view(&self, image: &Value) -> reqwest::Response {
            self.http
                .get(self.url("/view"))
                .query(&[("filename", image["filename"].as_str().unwrap()), ("subfolder", image["subfolder"].as_str().unwrap()), ("type", image["type"].as_str().unwrap())])
                .send()
                .await
                .unwrap()
        }
    }

    pub fn png_size(bytes: &[u8]) -> (u32, u32) {
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        (u32::from_be_bytes(bytes[16..20].try_into().unwrap()), u32::from_be_bytes(bytes[20..24].try_into().unwrap()))
    }

    pub fn png_pixels(bytes: &[u8]) -> (u32, u32, Vec<u8>) {
        let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        buf.truncate(info.buffer_size());
        (info.width, info.height, buf)
    }

    /// Same JSON shape: objects with the same keys (recursively), arrays compared element-wise by shape.
    pub fn assert_same_shape(got: &Value, want: &Value, path: &str) {
        match (got, want) {
            (Value::Object(g), Value::Object(w)) => {
                let gk: BTreeSet<_> = g.keys().collect();
                let wk: BTreeSet<_> = w.keys().collect();
                assert_eq!(gk, wk, "keys at {path}");
                for k in w.keys() {
                    assert_same_shape(&g[k], &w[k], &format!("{path}.{k}"));
                }
            }
            (Value::Array(g), Value::Array(w)) => {
                if let (Some(g0), Some(w0)) = (g.first(), w.first()) {
                    assert_same_shape(g0, w0, &format!("{path}[0]"));
                }
            }
            (g, w) => {
                let kind = |v: &Value| match v {
                    Value::Number(_) => "number",
                    Value::String(_) => "string",
                    Value::Bool(_) => "bool",
                    Value::Null => "null",
                    _ => "other",
                };
                assert_eq!(kind(g), kind(w), "type at {path}: {g} vs {w}");
            }
        }
    }

    /// node_errors equal to the capture, with dependent_outputs compared as sets (ComfyUI uses a Python set).
    pub fn assert_node_errors_match(got: &Value, want: &Value, case: &str) {
        let g = got.as_object().unwrap();
        let w = want.as_object().unwrap();
        assert_eq!(g.keys().collect::<BTreeSet<_>>(), w.keys().collect::<BTreeSet<_>>(), "{case}: node_errors keys");
        for (id, we) in w {
            let ge = &g[id];
            assert_eq!(ge["class_type"], we["class_type"], "{case}: class_type of {id}");
            let set = |v: &Value| v.as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_string()).collect::<BTreeSet<_>>();
            assert_eq!(set(&ge["dependent_outputs"]), set(&we["dependent_outputs"]), "{case}: dependent_outputs of {id}");
            assert_eq!(ge["errors"], we["errors"], "{case}: errors of {id}");
        }
    }
}

use support::*;

mod validation {
    use super::*;

    #[tokio::test]
    async fn every_captured_prompt_error_case_gets_the_same_answer() {
        let rig = rig().await;
        let cases = fixture_json("prompt-errors.json");
        for case in cases.as_array().unwrap() {
            let name = case["case"].as_str().unwrap();
            let request = rig.http.post(rig.url("/prompt"));
            let request = match case.get("request_raw") {
                Some(raw) => request.header("content-type", "application/json").body(raw.as_str().unwrap().to_string()),
                None => request.json(&case["request"]),
            };
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            assert_eq!(status, case["status"].as_u64().unwrap() as u16, "{name}");
            let content_type = response.headers().get("content-type").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
            let body = response.text().await.unwrap();
            let want = &case["response"];
            if status == 500 {
                assert!(content_type.starts_with("text/plain"), "{name}: {content_type}");
                assert_eq!(body, want["_non_json_body"].as_str().unwrap(), "{name}");
                continue;
            }
            let got: Value = serde_json::from_str(&body).unwrap();
            if status == 400 {
                assert_eq!(got["error"], want["error"], "{name}: error");
            } else {
                assert!(got["prompt_id"].is_string() && got["number"].is_number(), "{name}: {got}");
            }
            assert_node_errors_match(&got["node_errors"], &want["node_errors"], name);
        }
        rig.double.shutdown().await;
    }

    #[tokio::test]
    async fn flux_graphs_validate_and_invalid_variants_are_rejected_like_the_capture() {
        let rig = rig().await;
        std::fs::create_dir_all(rig.double.input_dir().join("faces")).unwrap();
        std::fs::write(rig.double.input_dir().join("faces/face.png"), include_bytes!("../fixtures/stretch-partial-weights-output.png")).unwrap();
        std::fs::write(rig.double.input_dir().join("einstein.jpg"), include_bytes!("../fixtures/stretch-partial-weights-output.png")).unwrap();
        let cases = fixture_json("flux-validation.json");
        for (name, case) in cases.as_object().unwrap() {
            let (status, got) = rig.post("/prompt", &case["request"]).await;
            assert_eq!(status as u64, case["post_status"].as_u64().unwrap(), "{name}: {got}");
            let want = &case["post_response"];
            if status == 400 {
                assert_eq!(got["error"], want["error"], "{name}");
            }
            assert_node_errors_match(&got["node_errors"], &want["node_errors"], name);
            if status != 200 {
                continue;
            }
            // The double runs what ComfyUI accepted to a saved image sized from the graph's latent.
            let entry = rig.history(got["prompt_id"].as_str().unwrap()).await;
            assert_eq!(entry["status"]["status_str"], "success", "{name}");
            let prompt = case["request"]["prompt"].as_object().unwrap();
            let latent = prompt.values().find(|n| n["class_type"].as_str().unwrap().contains("LatentImage")).unwrap();
            let size = (latent["inputs"]["width"].as_u64().unwrap() as u32, latent["inputs"]["height"].as_u64().unwrap() as u32);
            let images: Vec<Value> = entry["outputs"].as_object().unwrap().values().flat_map(|o| o["images"].as_array().unwrap().clone()).collect();
            assert!(!images.is_empty(), "{name}: no output image");
            let bytes = rig.view(&images[0]).await.bytes().await.unwrap();
            assert_eq!(png_size(&bytes), size, "{name}");
        }
        rig.double.shutdown().await;
    }

    #[tokio::test]
    async fn number_counts_every_post_and_client_prompt_ids_are_accepted() {
        let rig = rig().await;
        let graph = json!({"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 77}},
                           "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "cap_pid"}}});
        let (_, first) = rig.post("/prompt", &json!({"prompt": graph})).await;
        let (rejected, _) = rig.post("/prompt", &json!({"prompt": {}})).await;
        assert_eq!(rejected, 400);
        let pid = "11111111-2222-3333-4444-555555555555";
        let (_, chosen) = rig.post("/prompt", &json!({"prompt": graph, "prompt_id": pid, "client_id": "x"})).await;
        assert_eq!(chosen["prompt_id"], pid);
        assert_eq!(chosen["number"].as_i64().unwrap(), first["number"].as_i64().unwrap() + 2);
        let (_, front) = rig.post("/prompt", &json!({"prompt": graph, "front": true})).await;
        assert_eq!(front["number"].as_i64().unwrap(), -(first["number"].as_i64().unwrap() + 3));
        let entry = rig.history(pid).await;
        assert_eq!(entry["prompt"][3], json!({"client_id": "x"}));
        // Re-using a prompt id is accepted too.
        let (status, again) = rig.post("/prompt", &json!({"prompt": graph, "prompt_id": pid})).await;
        assert_eq!((status, again["prompt_id"].as_str()), (200, Some(pid)));
        let last = rig.submit(json!({"prompt": graph})).await;
        rig.history(&last).await;
        let (_, newest) = rig.get("/history?max_items=1").await;
        assert_eq!(newest.as_object().unwrap().keys().collect::<Vec<_>>(), [&last]);
        let (_, all) = rig.get("/history").await;
        assert_eq!(all.as_object().unwrap().keys().next().unwrap(), first["prompt_id"].as_str().unwrap(), "oldest first");
        assert_eq!(rig.post("/history", &json!({"delete": [last]})).await, (200, Value::Null));
        assert_eq!(rig.get(&format!("/history/{last}")).await.1, json!({}));
        assert_eq!(rig.post("/history", &json!({"clear": true})).await, (200, Value::Null));
        assert_eq!(rig.get("/history").await.1, json!({}));
        rig.double.shutdown().await;
    }

    #[tokio::test]
    async fn model_combos_come_from_the_models_folder_and_see_new_files() {
        let rig = rig().await;
        let graph = |vae: &str| {
            json!({"prompt": {
                "1": {"class_type": "VAELoader", "inputs": {"vae_name": vae}},
                "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
                "3": {"class_type": "VAEDecode", "inputs": {"samples": ["2", 0], "vae": ["1", 0]}},
                "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "m"}}}})
        };
        let (status, r) = rig.post("/prompt", &graph("new-vae.safetensors")).await;
        assert_eq!(status, 400);
        let err = &r["node_errors"]["1"]["errors"][0];
        assert_eq!(err["type"], "value_not_in_list");
        assert_eq!(err["details"], "vae_name: 'new-vae.safetensors' not in ['ae.safetensors', 'pixel_space']");

        std::fs::write(rig.models.path().join("vae/new-vae.safetensors"), b"").unwrap();
        let (status, r) = rig.post("/prompt", &graph("new-vae.safetensors")).await;
        assert_eq!(status, 200, "{r}");
        let (_, info) = rig.get("/object_info/VAELoader").await;
        assert_eq!(info["VAELoader"]["input"]["required"]["vae_name"][0], json!(["ae.safetensors", "new-vae.safetensors", "pixel_space"]));
        let (_, listing) = rig.get("/api/models/vae").await;
        assert_eq!(listing, json!(["ae.safetensors", "new-vae.safetensors"]));
        let (_, controlnet) = rig.get("/models/controlnet").await;
        assert_eq!(controlnet, json!(["instantid/diffusion_pytorch_model.safetensors"]));
        rig.double.shutdown().await;
    }

    #[tokio::test]
    async fn extra_model_paths_yaml_feeds_the_combos() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("store/unet")).unwrap();
        std::fs::write(root.path().join("store/unet/other.safetensors"), b"").unwrap();
        let yaml = root.path().join("extra_model_paths.yaml");
        std::fs::write(&yaml, "mine:\n    base_path: store\n    unet: unet/\n").unwrap();
        let double = ComfyDouble::start(DoubleConfig { extra_model_paths: Some(yaml), ..Default::default() }).await.unwrap();
        let http = reqwest::Client::new();
        let info: Value = http.get(format!("{}/object_info/UNETLoader", double.url())).send().await.unwrap().json().await.unwrap();
        assert_eq!(info["UNETLoader"]["input"]["required"]["unet_name"][0], json!(["other.safetensors"]));
        double.shutdown().await;
    }

    #[tokio::test]
    async fn read_endpoints_answer_like_comfyui() {
        let rig = rig().await;
        assert_eq!(rig.get("/object_info/NoSuchNode").await, (200, json!({})));
        assert_eq!(rig.get("/models/not_a_folder").await, (404, Value::Null));
        assert_eq!(rig.get("/history/unknown").await, (200, json!({})));
        assert_eq!(rig.get("/api/features").await, (200, fixture_json("features.json")["/features"].clone()));
        assert_eq!(rig.get("/queue").await, (200, json!({"queue_running": [], "queue_pending": []})));
        assert_eq!(rig.get("/prompt").await, (200, json!({"exec_info": {"queue_remaining": 0}})));
        assert_eq!(rig.get("/embeddings").await, (200, json!([])));
        let (_, models) = rig.get("/models").await;
        assert_eq!(models, fixture_json("identity-nodes.models.json")["/models"]["body"]);
        let (_, stats) = rig.get("/system_stats").await;
        assert_same_shape(&stats, &fixture_json("system_stats.json"), "system_stats");
        let (_, all) = rig.get("/object_info").await;
        let fixture: Value = serde_json::from_str(comfyui_double::object_info_fixture()).unwrap();
        assert_eq!(all.as_object().unwrap().len(), fixture.as_object().unwrap().len());
        assert_eq!(all["ImageScale"], fixture["ImageScale"]);
        rig.double.shutdown().await;
    }
}

mod execution {
    use super::*;

    fn success_request(client_id: &str) -> Value {
        let mut r = fixture_json("post-prompt-success.json")["request"].clone();
        r["client_id"] = json!(client_id);
        r
    }

    #[tokio::test]
    async fn success_run_matches_the_captured_message_sequence_history_and_view() {
        let rig = rig().await;
        let mut ws = rig.ws("rust-client-success").await;
        let pid = rig.submit(success_request("rust-client-success")).await;
        let got = texts(&ws.until_done(&pid).await);
        let want: Vec<Value> = transcript_frames("transcript-success.jsonl")[1..].to_vec();
        assert_eq!(types(&got), types(&want));
        for (g, w) in got.iter().zip(&want) {
            assert_same_shape(g, w, g["type"].as_str().unwrap());
            if g["type"] == "progress_state" {
                let states = |v: &Value| v["data"]["nodes"].as_object().unwrap().iter().map(|(k, n)| (k.clone(), n["state"].clone(), n["value"].clone())).collect::<Vec<_>>();
                assert_eq!(states(g), states(w));
            }
        }
        assert_eq!(got[got.len() - 2], json!({"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}}}));

        let entry = rig.history(&pid).await;
        let captured = fixture_json("history-success.json")["response"].as_object().unwrap().values().next().unwrap().clone();
        assert_same_shape(&entry, &captured, "history");
        assert_eq!(entry["outputs"], captured["outputs"]);
        assert_eq!(entry["prompt"][2], captured["prompt"][2]);
        assert_eq!(entry["prompt"][3], captured["prompt"][3]);
        let msgs: Vec<&str> = entry["status"]["messages"].as_array().unwrap().iter().map(|m| m[0].as_str().unwrap()).collect();
        assert_eq!(msgs, ["execution_start", "execution_cached", "execution_success"]);

        let image = &entry["outputs"]["3"]["images"][0];
        let view = rig.view(image).await;
        assert_eq!(view.status(), 200);
        let headers = view.headers().clone();
        assert_eq!(headers["content-type"], "image/png");
        assert_eq!(headers["content-disposition"], "filename=\"cap_success_00001_.png\"");
        for h in ["etag", "last-modified", "accept-ranges", "content-length"] {
            assert!(headers.contains_key(h), "missing {h}");
        }
        let bytes = view.bytes().await.unwrap();
        let marker = b"tEXtprompt\0{\"1\": {\"class_type\": \"EmptyImage\", \"inputs\": {\"width\": 64,";
        assert!(bytes.windows(marker.len()).any(|w| w == marker), "SaveImage embeds the prompt like ComfyUI (json.dumps format)");
        let (w, h, pixels) = png_pixels(&bytes);
        assert_eq!((w, h), (32, 24));
        assert_eq!(&pixels[..3], &[0xff, 0x80, 0x00], "EmptyImage color 16744448 = #FF8000");
        assert!(rig.double.output_dir().join("cap_success_00001_.png").is_file());
        let preview = rig
            .http
            .get(rig.url("/view"))
            .query(&[("filename", "cap_success_00001_.png"), ("subfolder", ""), ("type", "output"), ("preview", "webp;50")])
            .send()
            .await
            .unwrap();
        assert_eq!(preview.headers()["content-type"], "image/webp");
        assert_eq!(&preview.bytes().await.unwrap()[8..12], b"WEBP");
        rig.double.shutdown().await;
    }

    #[tokio::test]
    async fn same_prompt_again_is_fully_cached_and_reports_the_same_file() {
        let rig = rig().await;
        let mut ws = rig.ws("rust-client-cached").await;
        let first = rig.submit(success_request("rust-client-cached")).await;
        ws.until_done(&first).await;
        let second = rig.submit(success_request("rust-client-cached")).await;
        let got = texts(&ws.until_done(&second).await);
        let want = transcript_frames("transcript-cached.jsonl")[1..].to_vec();
        assert_eq!(types(&got), types(&want));
        let cached = got.iter().find(|m| m["type"] == "execution_cached").unwrap();
        assert_eq!(cached["data"]["nodes"], json!(["1", "2", "3"]));
        let executed = got.iter().find(|m| m["type"] == "executed").unwrap();
        assert_eq!(executed["data"]["output"]["images"][0]["filename"], "cap_success_00001_.png");
        // A changed input runs again and the SaveImage counter continues.
        let mut changed = success_request("rust-client-cached");
        changed["prompt"]["2"]["inputs"]["width"] = json!(16);
        let third = rig.submit(changed).await;
        let got = texts(&ws.until_done(&third).await);
        let cached = got.iter().find(|m| m["type"] == "execution_cached").unwrap();
        assert_eq!(cached["data"]["nodes"], json!(["1"]));
        let executed = got.iter().find(|m| m["type"] == "executed").unwrap();
        assert_eq!(executed["data"]["output"]["images"][0]["filename"], "cap_success_00002_.png");
        rig.double.shutdown().await;
    }

    #[tokio::test]
    async fn events_go_only_to_the_prompts_client_and_broadcasts_without_one() {
        let rig = rig().await;
        let mut observer = rig.ws("observer-no-client-id").await;
        let mut request = success_request("x");
        request.as_object_mut().unwrap().remove("client_id");
        let pid = rig.submit(request).await;
        rig.history(&pid).await;
        let mut got = Vec::new();
        loop {
            let m = observer.next_text().await;
            let last = m["type"] == "status" && m["data"]["status"]["exec_info"]["queue_remaining"] == 0;
            got.push(m);
            if last {
                break;
            }
        }
        let want = transcript_frames("transcript-no-client-id.jsonl")[1..].to_vec();
        assert_eq!(types(&got), types(&want));

        // With a client id, another socket sees only the status broadcasts.
        let mut client = rig.ws("the-client").await;
        let pid = rig.submit(success_request("the-client")).await;
        let client_types = types(&texts(&client.until_done(&pid).await));
        assert!(client_types.contains(&"execution_success".to_string()));
        let mut seen = Vec::new();
        loop {
            let m = observer.next_text().await;
            let last = m["type"] == "status" && m["data"]["status"]["exec_info"]["queue_remaining"] == 0;
            seen.push(m["type"].as_str().unwrap().to_string());
            if last {
                break;
            }
        }
        assert_eq!(seen, ["status", "status", "status"]);
        rig.double.shutdown().await;
    }

    #[tokio::test]
    async fn partial_acceptance_runs_only_the_valid_branch() {
        let rig = rig().await;
        let case = fixture_json("prompt-errors.json").as_array().unwrap().iter().find(|c| c["case"].as_str().unwrap().starts_with("partial")).unwrap().clone();
        let (status, r) = rig.post("/prompt", &case["request"]).await;
        assert_eq!(status, 200);
        assert_eq!(r["node_errors"]["4"]["errors"][0]["type"], "value_not_in_list");
        let entry = rig.history(r["prompt_id"].as_str().unwrap()).await;
        assert_eq!(entry["prompt"][4], json!(["2"]));
        assert_eq!(entry["outputs"].as_object().unwrap().keys().collect::<Vec<_>>(), ["2"]);
        assert!(rig.double.output_dir().join("partial_ok_00001_.png").is_file());
        assert!(!rig.double.output_dir().join("partial_bad_00001_.png").exists());
        rig.double.shutdown().await;
    }

    #[tokio::test]
    async fn sampler_reports_step_progress_and_the_seed_decides_the_pixels() {
        let rig = rig().await;
        let mut ws = rig.ws("sampler").await;
        let graph = |seed: u64| {
            json!({"client_id": "sampler", "prompt": {
                "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-dev.safetensors", "weight_dtype": "default"}},
                "2": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "clip_l.safetensors", "clip_name2": "t5xxl_fp16.safetensors", "type": "flux"}},
                "3": {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}},
                "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["2", 0]}},
                "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 96, "height": 64, "batch_size": 1}},
                "6": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": seed, "steps": 3, "cfg": 1.0, "sampler_name": "euler",
                      "scheduler": "simple", "positive": ["4", 0], "negative": ["4", 0], "latent_image": ["5", 0], "denoise": 1.0}},
                "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["3", 0]}},
                "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "flux"}}}})
        };
        let mut files = Vec::new();
        for seed in [7u64, 8, 7] {
            let pid = rig.submit(graph(seed)).await;
            let got = texts(&ws.until_done(&pid).await);
            let progress: Vec<(Value, Value)> =
                got.iter().filter(|m| m["type"] == "progress").map(|m| (m["data"]["value"].clone(), m["data"]["max"].clone())).collect();
            if seed == 7 && files.is_empty() {
                assert_eq!(progress, vec![(json!(1), json!(3)), (json!(2), json!(3)), (json!(3), json!(3))]);
            }
            let entry = rig.history(&pid).await;
            let bytes = rig.view(&entry["outputs"]["8"]["images"][0]).await.bytes().await.unwrap();
            assert_eq!(png_size(&bytes), (96, 64));
            files.push(png_pixels(&bytes).2);
        }
        assert_ne!(files[0], files[1], "different seeds, different images");
        assert_eq!(files[0], files[2], "same seed, same image");
        rig.double.shutdown().await;
    }

    #[tokio::test]
    async fn save_image_websocket_frames_match_the_captured_layout() {
        let rig = rig().await;
        for (variant, handshake) in [("no_feature_flags", false), ("feature_flags_supports_preview_metadata", true)] {
            let mut ws = rig.ws(&format!("savews-{variant}")).await;
            if handshake {
                ws.stream.send(Message::Text(r#"{"type":"feature_flags","data":{"supports_preview_metadata":true,"client":"rust-test"}}"#.into())).await.unwrap();
                let answer = ws.next_text().await;
                assert_eq!(answer, json!({"type": "feature_flags", "data": {"supports_preview_metadata": true, "max_upload_size": 104857600}}));
            }
            let captured = transcript(&format!("transcript-savews-{variant}.jsonl"));
            let request = captured.iter().find(|e| e["dir"] == "http" && e["path"] == "/prompt").unwrap()["request"].clone();
            let captured_pid = captured.iter().find(|e| e["dir"] == "http" && e["path"] == "/prompt").unwrap()["response"]["prompt_id"].clone();
            let mut request = request;
            request["client_id"] = json!(format!("savews-{variant}"));
            request["prompt_id"] = captured_pid.clone();
            let pid = rig.submit(request).await;
            let frames = ws.until_done(&pid).await;
            let binaries: Vec<&Vec<u8>> = frames.iter().filter_map(|f| if let Frame::Binary(b) = f { Some(b) } else { None }).collect();
            assert_eq!(binaries.len(), 2, "{variant}");
            let want = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("fixtures/savews-frame-{variant}-0.bin"))).unwrap();
            let offset = if handshake { 8 + u32::from_be_bytes(want[4..8].try_into().unwrap()) as usize } else { 8 };
            for b in binaries {
                assert_eq!(&b[..offset], &want[..offset], "{variant}: header/metadata bytes");
                assert_eq!(png_pixels(&b[offset..]), png_pixels(&want[offset..]), "{variant}: image");
            }
            // Binary frames sit just before their progress frame; no `executed`, nothing in history outputs.
            let order: Vec<String> = frames
                .iter()
                .filter_map(|f| match f {
                    Frame::Binary(_) => Some("binary".to_string()),
                    Frame::Text(v) if v["type"] != "progress_state" => Some(v["type"].as_str().unwrap().to_string()),
                    _ => None,
                })
                .collect();
            assert!(order.windows(2).filter(|w| w[0] == "binary").all(|w| w[1] == "progress"), "{order:?}");
            assert!(!order.contains(&"executed".to_string()));
            assert_eq!(rig.history(&pid).await["outputs"], json!({}));
        }
        rig.double.shutdown().await;
    }

    #[tokio::test]
    async fn animated_webp_output_is_a_real_webp() {
        let rig = rig().await;
        let pid = rig
            .submit(json!({"prompt": {
                "1": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 8, "batch_size": 3, "color": 255}},
                "2": {"class_type": "SaveAnimatedWEBP", "inputs": {"images": ["1", 0], "filename_prefix": "anim", "fps": 6.0, "lossless": true, "quality": 80, "method": "default"}},
                "3": {"class_type": "SaveAnimatedPNG", "inputs": {"images": ["1", 0], "filename_prefix": "apng", "fps": 6.0, "compress_level": 4}}}}))
            .await;
        let entry = rig.history(&pid).await;
        assert_eq!(entry["outputs"]["2"]["animated"], json!([true]));
        let view = rig.view(&entry["outputs"]["2"]["images"][0]).await;
        assert_eq!(view.headers()["content-type"], "image/webp");
        let bytes = view.bytes().await.unwrap();
        assert_eq!((&bytes[..4], &bytes[8..12]), (&b"RIFF"[..], &b"WEBP"[..]));
        assert_eq!(bytes.windows(4).filter(|w| w == b"ANMF").count(), 3);
        let apng = rig.view(&entry["outputs"]["3"]["images"][0]).await.bytes().await.unwrap();
        assert_eq!(png_size(&apng), (16, 8));
        assert_eq!(apng.windows(4).filter(|w| w == b"fcTL").count(), 3, "one frame per batch image");
        rig.double.shutdown().await;
    }

    #[tokio::test]
    async fn view_refuses_traversal_and_misses_with_empty_bodies() {
        let rig = rig().await;
        for (query, status) in [("filename=nope.png&type=output", 404), ("filename=..%2Fmain.py&type=output", 400)] {
            let r = rig.http.get(rig.url(&format!("/view?{query}"))).send().await.unwrap();
            assert_eq!(r.status().as_u16(), status, "{query}");
            assert!(r.bytes().await.unwrap().is_empty());
        }
        rig.double.shutdown().await;
    }

    #[tokio::test]
    async fn uploads_rename_on_conflict_and_load_image_finds_them() {
        let rig = rig().await;
        let png = include_bytes!("../fixtures/stretch-partial-weights-output.png").to_vec();
        let upload = |bytes: Vec<u8>, fields: &[(&str, &str)]| {
            let mut form = reqwest::multipart::Form::new().part("image", reqwest::multipart::Part::bytes(bytes).file_name("face.png").mime_str("image/png").unwrap());
            for (k, v) in fields {
                form = form.text(k.to_string(), v.to_string());
            }
            rig.http.post(rig.url("/upload/image")).multipart(form).send()
        };
        let r = upload(png.clone(), &[("subfolder", "faces"), ("type", "input")]).await.unwrap();
        assert_eq!(r.json::<Value>().await.unwrap(), json!({"name": "face.png", "subfolder": "faces", "type": "input"}));
        let r = upload(png.clone(), &[("subfolder", "faces"), ("overwrite", "false")]).await.unwrap();
        assert_eq!(r.json::<Value>().await.unwrap()["name"], "face.png", "identical content keeps the name");
        let r = upload(b"other".to_vec(), &[("subfolder", "faces")]).await.unwrap();
        assert_eq!(r.json::<Value>().await.unwrap()["name"], "face (1).png");
        let r = upload(b"third".to_vec(), &[("subfolder", "faces"), ("overwrite", "true")]).await.unwrap();
        assert_eq!(r.json::<Value>().await.unwrap()["name"], "face.png");
        let r = upload(png.clone(), &[("subfolder", "../escape")]).await.unwrap();
        assert_eq!(r.status(), 400);
        assert!(r.bytes().await.unwrap().is_empty());
        let r = rig.http.post(rig.url("/upload/image")).multipart(reqwest::multipart::Form::new().text("type", "input")).send().await.unwrap();
        assert_eq!(r.status(), 400);
        assert_eq!(rig.double.record().uploads.len(), 4);

        let r = upload(png.clone(), &[("subfolder", "run"), ("overwrite", "true")]).await.unwrap();
        assert_eq!(r.status(), 200);
        for reference in ["run/face.png", "run/face.png [input]"] {
            let pid = rig
                .submit(json!({"prompt": {
                    "1": {"class_type": "LoadImage", "inputs": {"image": reference}},
                    "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}}))
                .await;
            let entry = rig.history(&pid).await;
            let image = &entry["outputs"]["2"]["images"][0];
            assert_eq!(image["type"], "temp");
            assert!(image["filename"].as_str().unwrap().starts_with("ComfyUI_temp_"));
            let bytes = rig.view(image).await.bytes().await.unwrap();
            assert_eq!(png_size(&bytes), png_size(&png), "LoadImage keeps the uploaded size");
        }
        rig.double.shutdown().await;
    }

    #[tokio::test]
    async fn load_image_of_a_file_removed_after_validation_fails_like_comfyui() {
        let rig = rig().await;
        let png = include_bytes!("../fixtures/stretch-partial-weights-output.png").to_vec();
        let form = reqwest::multipart::Form::new()
            .part("image", reqwest::multipart::Part::bytes(png).file_name("face.png").mime_str("image/png").unwrap())
            .text("subfolder", "gone")
            .text("overwrite", "true");
        assert_eq!(rig.http.post(rig.url("/upload/image")).multipart(form).send().await.unwrap().status(), 200);
        rig.double.faults().hang(true);
        let pid = rig
            .submit(json!({"prompt": {
                "1": {"class_type": "LoadImage", "inputs": {"image": "gone/face.png"}},
                "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}}))
            .await;
        for _ in 0..500 {
            if rig.get("/queue").await.1["queue_running"][0][1] == pid.as_str() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Another request's cleanup removes the file after validation accepted it.
        std::fs::remove_file(rig.double.input_dir().join("gone/face.png")).unwrap();
        rig.double.faults().hang(false);
        let entry = rig.history(&pid).await;
        assert_eq!(entry["status"]["status_str"], "error", "{entry}");
        let messages = entry["status"]["messages"].as_array().unwrap();
        let error = messages.iter().find(|m| m[0] == "execution_error").expect("an execution_error");
        assert_eq!(error[1]["node_type"], "LoadImage");
        assert_eq!(error[1]["exception_type"], "FileNotFoundError");
        assert!(error[1]["exception_message"].as_str().unwrap().starts_with("[Errno 2] No such file or directory"));
        rig.double.shutdown().await;
    }

    #[tokio::test]
    async fn queue_delete_clear_and_interrupt_behave_like_the_capture() {
        let rig = rig().await;
        let mut ws = rig.ws("rust-client-queue").await;
        rig.double.faults().hang(true);
        let graph = |color: u32| {
            json!({"client_id": "rust-client-queue", "prompt": {
                "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": color}},
                "10": {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 31, "sigma": 8.0}},
                "99": {"class_type": "SaveImage", "inputs": {"images": ["10", 0], "filename_prefix": "q"}}}})
        };
        let p1 = rig.submit(graph(1)).await;
        loop {
            let m = ws.next_text().await;
            if m["type"] == "executing" && m["data"]["node"] == "1" {
                break;
            }
        }
        let p2 = rig.submit(graph(2)).await;
        let p3 = rig.submit(graph(3)).await;
        let (_, front) = rig.post("/prompt", &{
            let mut g = graph(4);
            g["front"] = json!(true);
            g
        })
        .await;
        let p4 = front["prompt_id"].as_str().unwrap().to_string();
        assert!(front["number"].as_i64().unwrap() < 0);

        let (_, queue) = rig.get("/queue").await;
        assert_eq!(queue["queue_running"][0][1], p1.as_str());
        assert_eq!(queue["queue_running"][0][4], json!(["99"]));
        assert_eq!(queue["queue_pending"].as_array().unwrap().len(), 3);
        assert_same_shape(&queue, &fixture_json("queue-interrupt-free.json")["queue_while_running"], "queue");
        assert_eq!(rig.get("/prompt").await.1, json!({"exec_info": {"queue_remaining": 4}}));

        assert_eq!(rig.post("/queue", &json!({"delete": [p2]})).await, (200, Value::Null));
        assert_eq!(rig.post("/queue", &json!({"delete": [p1]})).await.0, 200, "the running prompt cannot be deleted");
        let (_, queue) = rig.get("/queue").await;
        let pending: Vec<&str> = queue["queue_pending"].as_array().unwrap().iter().map(|i| i[1].as_str().unwrap()).collect();
        assert!(!pending.contains(&p2.as_str()) && pending.len() == 2);
        assert_eq!(queue["queue_running"][0][1], p1.as_str());

        assert_eq!(rig.post("/interrupt", &json!({"prompt_id": p3})).await, (200, Value::Null));
        assert_eq!(rig.post("/queue", &json!({"clear": true})).await, (200, Value::Null));
        let (_, queue) = rig.get("/queue").await;
        assert_eq!(queue["queue_pending"], json!([]));
        assert_eq!(queue["queue_running"][0][1], p1.as_str(), "a targeted interrupt of another prompt does nothing");

        // Reconnecting as the running prompt's client gets `executing` for the current node.
        let mut again = rig.ws("rust-client-queue").await;
        assert_eq!(again.next_text().await, json!({"type": "executing", "data": {"node": "1"}}));

        assert_eq!(rig.post("/interrupt", &json!({"prompt_id": p1})).await, (200, Value::Null));
        let got = texts(&again.until_done(&p1).await);
        let tail: Vec<String> = types(&got).into_iter().filter(|t| t != "progress_state").collect();
        assert_eq!(tail, ["execution_interrupted", "status", "executing"]);
        let interrupted = got.iter().find(|m| m["type"] == "execution_interrupted").unwrap();
        assert_eq!((interrupted["data"]["node_id"].as_str(), interrupted["data"]["node_type"].as_str()), (Some("1"), Some("EmptyImage")));

        let entry = rig.history(&p1).await;
        let captured = fixture_json("queue-interrupt-free.json")["history_interrupted"].as_object().unwrap().values().next().unwrap().clone();
        assert_same_shape(&entry["status"], &captured["status"], "interrupted status");
        assert_eq!((entry["status"]["status_str"].as_str(), entry["status"]["completed"].as_bool()), (Some("error"), Some(false)));
        for p in [&p2, &p3, &p4] {
            assert_eq!(rig.get(&format!("/history/{p}")).await.1, json!({}), "deleted/cleared prompts have no history");
        }
        assert_eq!(rig.post("/free", &json!({"unload_models": true, "free_memory": true})).await, (200, Value::Null));
        let r = rig.http.post(rig.url("/interrupt")).send().await.unwrap();
        assert_eq!(r.status(), 200);

        let record = rig.double.record();
        assert_eq!(record.interrupts, vec![Some(p3.clone()), Some(p1.clone()), None]);
        assert_eq!(record.queue_deletes, vec![p2.clone(), p1.clone()]);
        assert_eq!(record.prompts.len(), 4);
        rig.double.shutdown().await;
    }
}

mod faults {
    use super::*;

    fn scale(client: &str) -> Value {
        json!({"client_id": client, "prompt": {
            "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 48, "batch_size": 1, "color": 0}},
            "2": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "nearest-exact", "width": 20, "height": 10, "crop": "disabled"}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "f"}}}})
    }

    #[tokio::test]
    async fn fail_at_node_produces_execution_error_and_error_history() {
        let rig = rig().await;
        let mut ws = rig.ws("err").await;
        rig.double.faults().fail_at("ImageScale", "RuntimeError", "scaler exploded");
        let pid = rig.submit(scale("err")).await;
        let got = texts(&ws.until_done(&pid).await);
        let no_progress: Vec<String> = types(&got).into_iter().filter(|t| t != "progress_state").collect();
        assert_eq!(no_progress, ["status", "status", "execution_start", "execution_cached", "executing", "executing", "execution_error", "status", "executing"]);
        let error = got.iter().find(|m| m["type"] == "execution_error").unwrap();
        let captured_error = transcript_frames("transcript-error.jsonl").into_iter().find(|m| m["type"] == "execution_error").unwrap();
        let without_inputs = |v: &Value| {
            let mut v = v.clone();
            assert!(v["current_inputs"].is_object());
            v["current_inputs"] = json!({});
            v
        };
        assert_same_shape(&without_inputs(&error["data"]), &without_inputs(&captured_error["data"]), "execution_error");
        assert_eq!(error["data"]["node_id"], "2");
        assert_eq!(error["data"]["exception_type"], "RuntimeError");
        assert_eq!(error["data"]["exception_message"], "scaler exploded");
        assert_eq!(error["data"]["executed"], json!(["1"]));
        let entry = rig.history(&pid).await;
        let mut captured = fixture_json("history-error.json")["response"].as_object().unwrap().values().next().unwrap().clone();
        let mut entry = entry;
        entry["status"]["messages"][2][1]["current_inputs"] = json!({});
        captured["status"]["messages"][2][1]["current_inputs"] = json!({});
        assert_same_shape(&entry, &captured, "history-error");

        // By node id, after clearing the class fault; the cache does not hide an armed fault.
        rig.double.faults().clear();
        let ok = rig.submit(scale("err")).await;
        ws.until_done(&ok).await;
        rig.double.faults().fail_at("3", "OSError", "disk full");
        let pid = rig.submit(scale("err")).await;
        let got = texts(&ws.until_done(&pid).await);
        let error = got.iter().find(|m| m["type"] == "execution_error").unwrap();
        assert_eq!((error["data"]["node_id"].as_str(), error["data"]["node_type"].as_str()), (Some("3"), Some("SaveImage")));
        rig.double.shutdown().await;
    }

    #[tokio::test]
    async fn step_latency_keeps_a_prompt_running_until_interrupted() {
        let rig = rig().await;
        let mut ws = rig.ws("slow").await;
        rig.double.faults().set_step_latency(Duration::from_secs(3600));
        let pid = rig.submit(scale("slow")).await;
        loop {
            let m = ws.next_text().await;
            if m["type"] == "executing" {
                break;
            }
        }
        assert_eq!(rig.get("/queue").await.1["queue_running"][0][1], pid.as_str());
        rig.post("/interrupt", &json!({})).await;
        let got = texts(&ws.until_done(&pid).await);
        assert!(types(&got).contains(&"execution_interrupted".to_string()));
        rig.double.shutdown().await;
    }

    #[tokio::test]
    async fn dropped_websocket_mid_run_still_completes_into_history() {
        let rig = rig().await;
        let mut ws = rig.ws("dropme").await;
        rig.double.faults().drop_ws_after(Some(2));
        let pid = rig.submit(scale("dropme")).await;
        let frames = ws.until_done(&pid).await;
        assert!(matches!(frames.last(), Some(Frame::Closed)), "the server closed the socket before the prompt finished");
        let entry = rig.history(&pid).await;
        assert_eq!(entry["status"]["status_str"], "success");
        let bytes = rig.view(&entry["outputs"]["3"]["images"][0]).await.bytes().await.unwrap();
        assert_eq!(png_size(&bytes), (20, 10));
        rig.double.shutdown().await;
    }

    #[tokio::test]
    async fn crash_drops_connections_and_stops_answering() {
        let rig = rig().await;
        let mut ws = rig.ws("victim").await;
        rig.double.faults().hang(true);
        let pid = rig.submit(scale("victim")).await;
        loop {
            let m = ws.next_text().await;
            if m["type"] == "executing" {
                break;
            }
        }
        rig.double.faults().crash();
        let rest = ws.until_done(&pid).await;
        assert!(matches!(rest.last(), Some(Frame::Closed)));
        let fresh = reqwest::Client::new();
        assert!(fresh.get(rig.url("/system_stats")).timeout(FAILSAFE).send().await.is_err(), "a crashed double must not answer");
    }

    #[tokio::test]
    async fn slow_view_delays_the_answer() {
        let rig = rig().await;
        let pid = rig.submit(scale("v")).await;
        let entry = rig.history(&pid).await;
        let image = entry["outputs"]["3"]["images"][0].clone();
        rig.double.faults().set_view_delay(Duration::from_secs(3600));
        let slow = rig.http.get(rig.url("/view")).query(&[("filename", image["filename"].as_str().unwrap()), ("type", "output")]).timeout(Duration::from_millis(300)).send().await;
        assert!(slow.is_err_and(|e| e.is_timeout()));
        rig.double.faults().clear();
        assert_eq!(rig.view(&image).await.status(), 200);
        rig.double.shutdown().await;
    }
}

mod binary {
    use super::*;
    use tokio::io::AsyncBufReadExt;

    #[tokio::test]
    async fn binary_starts_like_comfyui_and_serves() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let input = tempfile::tempdir().unwrap();
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_comfyui-double"))
            .args(["main.py", "--listen", "127.0.0.1", "--port", &port.to_string(), "--cpu", "--input-directory"])
            .arg(input.path())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let url = loop {
            let line = tokio::time::timeout(FAILSAFE, lines.next_line()).await.unwrap().unwrap().expect("stdout ended before the GUI line");
            if let Some(url) = line.strip_prefix("To see the GUI go to: ") {
                break url.to_string();
            }
        };
        assert_eq!(url, format!("http://127.0.0.1:{port}"));
        let stats: Value = reqwest::get(format!("{url}/system_stats")).await.unwrap().json().await.unwrap();
        assert_eq!(stats["system"]["argv"][0], "main.py");
        assert!(stats["system"]["argv"].as_array().unwrap().contains(&json!("--cpu")));
        child.kill().await.unwrap();
    }
}

mod long_running {
    use super::support::*;
    use super::*;

    /// An embedded double serving for hours (`flowhost serve --simulate`) must not keep every
    /// prompt: `/history` keeps the newest `max_history`, and no test record is kept.
    #[tokio::test]
    async fn history_and_record_stay_bounded_over_many_prompts() {
        let double = ComfyDouble::start(DoubleConfig { max_history: 3, keep_record: false, ..Default::default() }).await.unwrap();
        let rig = Rig { double, http: reqwest::Client::new(), models: tempfile::tempdir().unwrap() };
        let mut ids = Vec::new();
        for color in 0..6 {
            let graph = json!({"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": color}},
                               "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "bounded"}}});
            let id = rig.submit(json!({"prompt": graph})).await;
            rig.history(&id).await;
            ids.push(id);
        }
        let (_, all) = rig.get("/history").await;
        let kept: Vec<&String> = all.as_object().unwrap().keys().collect();
        assert_eq!(kept, ids[3..].iter().collect::<Vec<_>>(), "the newest three, oldest first");
        assert!(rig.double.record().prompts.is_empty());
        assert!(rig.double.record().uploads.is_empty());
    }
}

/// flowhost's own ComfyUI node against what a real ComfyUI 0.3.64 with it loaded answered
/// (`fixtures/*flowhost*`: object_info, the websocket transcript and history of one prompt).
mod flowhost_node {
    use super::*;

    /// The captured prompt: node 1 EmptyImage 67×45 ×2, node 2 FlowhostImageOutput, node 3 SaveImage.
    fn captured() -> (String, Value, Vec<Value>) {
        let history = fixture_json("history-flowhost-raster.json");
        let (pid, entry) = history.as_object().unwrap().iter().next().unwrap();
        let lines = transcript("transcript-flowhost-raster.jsonl");
        (pid.clone(), entry.clone(), lines)
    }

    #[tokio::test]
    async fn it_is_listed_and_accepted_only_where_installed() {
        let with = rig_with(true).await;
        let (status, info) = with.get("/object_info/FlowhostImageOutput").await;
        assert_eq!(status, 200);
        assert_eq!(info, fixture_json("flowhost-image-output.object_info.json"));
        let stock = rig().await;
        assert_eq!(stock.get("/object_info/FlowhostImageOutput").await.1, json!({}));
        let (_, entry, _) = captured();
        let (status, body) = stock.post("/prompt", &json!({"prompt": entry["prompt"][2]})).await;
        assert_eq!(status, 400);
        assert_eq!(body["error"]["message"], "Cannot execute because node FlowhostImageOutput does not exist.");
        with.double.shutdown().await;
        stock.double.shutdown().await;
    }

    #[tokio::test]
    async fn its_frames_history_and_pixels_are_the_real_nodes() {
        let rig = rig_with(true).await;
        let (real_pid, entry, lines) = captured();
        let mut ws = rig.ws("raster-client").await;
        let pid = rig.submit(json!({"prompt": entry["prompt"][2], "client_id": "raster-client"})).await;
        let frames = ws.until_done(&pid).await;

        // The same frames: event type, header (its own prompt id), payload size.
        let real: Vec<&Value> = lines.iter().filter_map(|l| l.get("binary")).collect();
        let ours: Vec<&Vec<u8>> = frames.iter().filter_map(|f| if let Frame::Binary(b) = f { Some(b) } else { None }).collect();
        assert_eq!(ours.len(), real.len(), "one frame per image");
        let saved = rig.history(&pid).await["outputs"]["3"]["images"].clone();
        for (i, (frame, want)) in ours.iter().zip(&real).enumerate() {
            assert_eq!(u32::from_be_bytes(frame[..4].try_into().unwrap()) as u64, want["event_type"].as_u64().unwrap());
            let len = u32::from_be_bytes(frame[4..8].try_into().unwrap()) as usize;
            let mut header: Value = serde_json::from_slice(&frame[8..8 + len]).unwrap();
            assert_eq!(header["prompt_id"], pid);
            header["prompt_id"] = json!(real_pid);
            assert_eq!(header, want["header"]);
            let pixels = &frame[8 + len..];
            assert_eq!(pixels.len() as u64, want["payload_len"].as_u64().unwrap());
            // The pixels are exactly what SaveImage wrote for the same image.
            let png = rig.view(&saved[i]).await.bytes().await.unwrap();
            assert_eq!(png_pixels(&png).2, pixels, "image {i}");
        }

        // The same order of messages around them.
        let kinds = |items: Vec<String>| items.into_iter().filter(|k| k != "progress_state" && k != "status").collect::<Vec<_>>();
        let real_order = kinds(lines.iter().map(|l| match l.get("binary") {
            Some(_) => "binary".to_string(),
            None => l["text"]["type"].as_str().unwrap().to_string(),
        }).collect());
        let our_order = kinds(frames.iter().filter_map(|f| match f {
            Frame::Binary(_) => Some("binary".to_string()),
            Frame::Text(v) => Some(v["type"].as_str().unwrap().to_string()),
            Frame::Closed => None,
        }).collect());
        assert_eq!(our_order, real_order);
        assert_eq!(rig.history(&pid).await["outputs"]["2"], entry["outputs"]["2"]);

        // IS_CHANGED is NaN: the same prompt again sends its frames again (the image comes from the cache).
        let again = rig.submit(json!({"prompt": entry["prompt"][2], "client_id": "raster-client"})).await;
        let frames = ws.until_done(&again).await;
        assert_eq!(frames.iter().filter(|f| matches!(f, Frame::Binary(_))).count(), 2);
        let cached = texts(&frames).into_iter().find(|v| v["type"] == "execution_cached").unwrap();
        assert!(cached["data"]["nodes"].as_array().unwrap().contains(&json!("1")), "{cached}");
        rig.double.shutdown().await;
    }

    #[tokio::test]
    async fn a_prompt_without_a_client_broadcasts_no_pixels_and_lists_none() {
        let rig = rig_with(true).await;
        let (_, entry, _) = captured();
        let mut ws = rig.ws("bystander").await;
        let pid = rig.submit(json!({"prompt": entry["prompt"][2]})).await;
        let done = rig.history(&pid).await;
        assert_eq!(done["outputs"]["2"], json!({"flowhost_rasters": []}));
        // What the bystander got by then: status broadcasts at most, never a raster frame.
        while let Ok(frame) = tokio::time::timeout(Duration::from_millis(200), ws.next()).await {
            assert!(!matches!(frame, Frame::Binary(_)), "pixels broadcast to a socket that did not submit");
            if matches!(frame, Frame::Closed) {
                break;
            }
        }
        rig.double.shutdown().await;
    }
}

/// The simple image nodes the double claims work on the real pixels of their input (an
/// ImageInvert of an upload is that upload inverted), and its synthetic generations carry a
/// visible "SIMULATED" band (issue #27).
mod image_nodes {
    use super::*;

    /// A `w`×`h` RGB PNG: the left half red, the right half blue.
    fn halves(w: u32, h: u32) -> Vec<u8> {
        let mut rgb = Vec::new();
        for _ in 0..h {
            for x in 0..w {
                rgb.extend_from_slice(if x < w / 2 { &[200, 10, 20] } else { &[5, 30, 220] });
            }
        }
        let mut out = Vec::new();
        let mut encoder = png::Encoder::new(&mut out, w, h);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        encoder.write_header().unwrap().write_image_data(&rgb).unwrap();
        out
    }

    async fn upload(rig: &Rig, name: &str, png: Vec<u8>) {
        let form = reqwest::multipart::Form::new()
            .part("image", reqwest::multipart::Part::bytes(png).file_name(name.to_string()).mime_str("image/png").unwrap())
            .text("overwrite", "true");
        assert_eq!(rig.http.post(rig.url("/upload/image")).multipart(form).send().await.unwrap().status(), 200);
    }

    /// Run `node` (its `image` input linked to LoadImage of `file`) into SaveImage; the saved pixels.
    async fn through(rig: &Rig, file: &str, node: Value) -> (u32, u32, Vec<u8>) {
        let mut node = node;
        node["inputs"]["image"] = json!(["1", 0]);
        let pid = rig
            .submit(json!({"prompt": {
                "1": {"class_type": "LoadImage", "inputs": {"image": file}},
                "2": node,
                "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "nodes"}}}}))
            .await;
        let entry = rig.history(&pid).await;
        assert_eq!(entry["status"]["status_str"], "success", "{entry}");
        let bytes = rig.view(&entry["outputs"]["3"]["images"][0]).await.bytes().await.unwrap();
        png_pixels(&bytes)
    }

    fn at(rgb: &[u8], w: u32, x: u32, y: u32) -> [u8; 3] {
        let i = ((y * w + x) * 3) as usize;
        [rgb[i], rgb[i + 1], rgb[i + 2]]
    }

    #[tokio::test]
    async fn image_invert_of_an_upload_is_the_upload_inverted() {
        let rig = rig().await;
        let png = halves(64, 32);
        upload(&rig, "halves.png", png.clone()).await;
        let (w, h, got) = through(&rig, "halves.png", json!({"class_type": "ImageInvert", "inputs": {}})).await;
        let (_, _, original) = png_pixels(&png);
        assert_eq!((w, h), (64, 32));
        assert_eq!(got, original.iter().map(|v| 255 - v).collect::<Vec<u8>>(), "every channel inverted");
        rig.double.shutdown().await;
    }

    #[tokio::test]
    async fn crop_scale_and_blur_work_on_the_uploaded_pixels() {
        let rig = rig().await;
        upload(&rig, "halves.png", halves(64, 32)).await;

        // A crop inside the right (blue) half is all blue; one past the edge is clipped.
        let (w, h, rgb) = through(&rig, "halves.png", json!({"class_type": "ImageCrop", "inputs": {"width": 16, "height": 8, "x": 40, "y": 4}})).await;
        assert_eq!((w, h), (16, 8));
        assert!(rgb.chunks(3).all(|p| p == [5, 30, 220]), "the crop is not the blue half");
        let (w, h, _) = through(&rig, "halves.png", json!({"class_type": "ImageCrop", "inputs": {"width": 32, "height": 32, "x": 48, "y": 16}})).await;
        assert_eq!((w, h), (16, 16), "clipped at the image's edges like ComfyUI");

        // Scaled: the halves stay where they were, at the new size.
        let (w, h, rgb) = through(
            &rig,
            "halves.png",
            json!({"class_type": "ImageScale", "inputs": {"upscale_method": "nearest-exact", "width": 32, "height": 16, "crop": "disabled"}}),
        )
        .await;
        assert_eq!((w, h), (32, 16));
        assert_eq!(at(&rgb, w, 2, 8), [200, 10, 20]);
        assert_eq!(at(&rgb, w, 29, 8), [5, 30, 220]);

        // Blurred: the edge between the halves mixes both colours; far from it nothing changes.
        let (w, h, rgb) = through(&rig, "halves.png", json!({"class_type": "ImageBlur", "inputs": {"blur_radius": 3, "sigma": 2.0}})).await;
        assert_eq!((w, h), (64, 32));
        let edge = at(&rgb, w, 32, 16);
        assert!(edge[0] > 20 && edge[0] < 190 && edge[2] > 30 && edge[2] < 210, "the edge is not blurred: {edge:?}");
        assert_eq!(at(&rgb, w, 4, 16), [200, 10, 20]);
        rig.double.shutdown().await;
    }

    #[tokio::test]
    async fn empty_image_has_its_colour_and_no_band() {
        let rig = rig().await;
        let pid = rig
            .submit(json!({"prompt": {
                "1": {"class_type": "EmptyImage", "inputs": {"width": 24, "height": 16, "batch_size": 1, "color": 0x336699}},
                "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
                "3": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "empty"}},
                "4": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "inverted"}}}}))
            .await;
        let entry = rig.history(&pid).await;
        let (_, _, plain) = png_pixels(&rig.view(&entry["outputs"]["3"]["images"][0]).await.bytes().await.unwrap());
        let (_, _, inverted) = png_pixels(&rig.view(&entry["outputs"]["4"]["images"][0]).await.bytes().await.unwrap());
        assert!(plain.chunks(3).all(|p| p == [0x33, 0x66, 0x99]), "EmptyImage is its colour, unstamped");
        assert!(inverted.chunks(3).all(|p| p == [0xcc, 0x99, 0x66]));
        rig.double.shutdown().await;
    }

    #[tokio::test]
    async fn sampled_images_carry_a_simulated_band() {
        let rig = rig().await;
        let pid = rig
            .submit(json!({"prompt": {
                "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-dev.safetensors", "weight_dtype": "default"}},
                "2": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "clip_l.safetensors", "clip_name2": "t5xxl_fp16.safetensors", "type": "flux"}},
                "3": {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}},
                "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["2", 0]}},
                "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 256, "height": 128, "batch_size": 1}},
                "6": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": 3, "steps": 1, "cfg": 1.0, "sampler_name": "euler",
                      "scheduler": "simple", "positive": ["4", 0], "negative": ["4", 0], "latent_image": ["5", 0], "denoise": 1.0}},
                "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["3", 0]}},
                "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "flux"}}}}))
            .await;
        let entry = rig.history(&pid).await;
        let (w, h, rgb) = png_pixels(&rig.view(&entry["outputs"]["8"]["images"][0]).await.bytes().await.unwrap());
        assert_eq!((w, h), (256, 128));
        // The bottom rows: amber band with black lettering; the top: the synthetic pattern.
        let bottom: Vec<[u8; 3]> = (0..w).map(|x| at(&rgb, w, x, h - 1)).collect();
        assert!(bottom.iter().all(|p| *p == [255, 193, 7]), "no band on the last row");
        let band_row = h - 8;
        let row: Vec<[u8; 3]> = (0..w).map(|x| at(&rgb, w, x, band_row)).collect();
        let ink = row.iter().filter(|p| **p == [0, 0, 0]).count();
        assert!(ink > 10 && row.iter().all(|p| *p == [0, 0, 0] || *p == [255, 193, 7]), "no lettering in the band: {ink} ink pixels");
        let top_amber = (0..w).filter(|x| at(&rgb, w, *x, 2) == [255, 193, 7]).count();
        assert!(top_amber < w as usize / 2, "the band covers the image");
        rig.double.shutdown().await;
    }
}
