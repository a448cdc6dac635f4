//! A test plugin that misbehaves on request: `POST /misbehave {"mode": "..."}`.
//! Each mode is one way a real plugin can go wrong; the host must survive all of
//! them and keep serving.

use flowhost_sdk::{BuildError, Host, Job, Manifest, OutputFormat, Plugin, Request};

struct Misbehave;

impl Plugin for Misbehave {
    fn manifest() -> Manifest {
        Manifest {
            name: "misbehave".into(),
            version: "0.1.0".into(),
            route: "/misbehave".into(),
            summary: "Test plugin that loops, panics, grows memory or opens files".into(),
            request_schema: serde_json::json!({
                "type": "object",
                "required": ["mode"],
                "properties": {
                    "mode": {"enum": ["ok", "loop", "memory-bomb", "memory-some", "panic", "open-file", "read-env", "garbage-json", "stdout", "bad-graph", "memory-pages"]},
                    "megabytes": {"type": "integer", "minimum": 0},
                    "pages": {"type": "integer", "minimum": 0}
                }
            })
            .to_string(),
            response_media_types: vec!["image/jpeg".into()],
            analytics_prefix: "misbehave".into(),
            node_classes: vec![],
            models: vec![],
            warm_up: None,
        }
    }

    fn build(request: &Request, _host: &dyn Host) -> Result<Job, BuildError> {
        let body: serde_json::Value =
            serde_json::from_str(&request.body).map_err(|e| BuildError::Internal(e.to_string()))?;
        let mut workflow = serde_json::json!({
            "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "misbehave"}},
        })
        .to_string();
        match body["mode"].as_str().unwrap_or("ok") {
            "loop" => {
                let mut x: u64 = 0;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
            "memory-bomb" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            "memory-some" => {
                let mb = body["megabytes"].as_u64().unwrap_or(1) as usize;
                let v = vec![1u8; mb << 20];
                std::hint::black_box(&v);
            }
            // Grow linear memory to exactly `pages` 64 KiB pages (the memory
            // limit's boundary tests). The answer is built first, so nothing
            // allocates after the growth.
            "memory-pages" => {
                let job = Job {
                    workflow,
                    uploads: vec![],
                    outputs: vec!["2".into()],
                    output_format: OutputFormat::Jpeg,
                    seed: Some(request.random_seed),
                    analytics: "{}".into(),
                    caller_nodes: vec![],
                    models: Default::default(),
                    progress: vec![],
                    fetches: vec![],
                };
                #[cfg(target_arch = "wasm32")]
                {
                    let target = body["pages"].as_u64().unwrap_or(0) as usize;
                    let current = core::arch::wasm32::memory_size(0);
                    if target > current && core::arch::wasm32::memory_grow(0, target - current) == usize::MAX {
                        return Err(BuildError::Internal("memory.grow refused".into()));
                    }
                }
                return Ok(job);
            }
            "panic" => panic!("the plugin panicked on purpose"),
            "open-file" => {
                let text = std::fs::read_to_string("/etc/passwd")
                    .map_err(|e| BuildError::Internal(format!("open-file: {e}")))?;
                workflow = text;
            }
            "read-env" => {
                let vars: Vec<String> = std::env::vars().map(|(k, _)| k).collect();
                return Err(BuildError::Internal(format!("env: {vars:?}")));
            }
            "garbage-json" => workflow = "{this is not json".into(),
            // A well-formed graph ComfyUI would refuse: width above EmptyImage's max.
            "bad-graph" => {
                workflow = serde_json::json!({
                    "1": {"class_type": "EmptyImage", "inputs": {"width": 999999, "height": 8, "batch_size": 1, "color": 0}},
                    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "misbehave"}},
                })
                .to_string()
            }
            "stdout" => {
                println!("hello from the plugin's stdout");
                eprintln!("hello from the plugin's stderr");
            }
            _ => {}
        }
        Ok(Job {
            workflow,
            uploads: vec![],
            outputs: vec!["2".into()],
            output_format: OutputFormat::Jpeg,
            seed: Some(request.random_seed),
            analytics: "{}".into(),
            caller_nodes: vec![],
            models: Default::default(),
            progress: vec![],
            fetches: vec![],
        })
    }
}

flowhost_sdk::register!(Misbehave);
