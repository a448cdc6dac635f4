//! A test plugin that attacks the host on request: `POST /hostile {"mode": "...", "n": N}`.
//! Each mode is one way a hostile (or badly broken) plugin can try to hurt the service — flood
//! the log, forge log lines, answer with enormous texts, ask for endless uploads, hold its call
//! slot, make the host copy tens of MiB per call, print a dump to stderr — and the host must
//! bound each one. Built with `HOSTILE_HUGE_MANIFEST=1` its manifest
//! itself is oversized (a 2 MB summary), which the loader must reject.

use flowhost_sdk::host::LogLevel;
use flowhost_sdk::{BuildError, FieldError, Host, ImageSource, Job, Manifest, OutputFormat, Plugin, Request, Upload};

struct Hostile;

/// Markup and script a page must show as text: if any of it ran, `window.__pwned` would be set
/// (or an `<img id="pwned">` would exist).
pub const MARKUP: &str = r#"<img id="pwned" src="x" onerror="window.__pwned=1"><script>window.__pwned=2</script><b>bold</b>"#;

/// A tiny valid PNG (1×1), so uploads pass the host's checks.
const PNG_1X1: &[u8] = &[
    0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x48, 0x44, 0x52, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00,
    0x01, 0x08, 0x06, 0x00, 0x00, 0x00, 0x1f, 0x15, 0xc4, 0x89, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x44, 0x41, 0x54, 0x78, 0x9c, 0x63, 0x00, 0x01,
    0x00, 0x00, 0x05, 0x00, 0x01, 0x0d, 0x0a, 0x2d, 0xb4, 0x00, 0x00, 0x00, 0x00, 0x49, 0x45, 0x4e, 0x44, 0xae, 0x42, 0x60, 0x82,
];

impl Plugin for Hostile {
    fn manifest() -> Manifest {
        let summary = match option_env!("HOSTILE_HUGE_MANIFEST") {
            Some(_) => "x".repeat(2 << 20),
            // Markup in every text a page shows (issue #27): a page must render it inert.
            None => format!("Test plugin that floods logs, forges log lines, answers huge texts or asks for endless uploads {MARKUP}"),
        };
        Manifest {
            name: "hostile".into(),
            version: "0.1.0".into(),
            route: "/hostile".into(),
            summary,
            request_schema: serde_json::json!({
                "type": "object",
                "required": ["mode"],
                "properties": {
                    "mode": {"enum": ["ok", "slow", "log-flood", "log-forge", "huge-error", "uploads", "markup-error", "big-log", "big-upload", "big-workflow", "stderr-flood"], "description": format!("What to attack. {MARKUP}")},
                    "n": {"type": "integer", "minimum": 0, "description": MARKUP}
                }
            })
            .to_string(),
            response_media_types: vec!["image/jpeg".into()],
            analytics_prefix: "hostile".into(),
            node_classes: vec![],
            models: vec![],
            warm_up: None,
        }
    }

    fn build(request: &Request, host: &dyn Host) -> Result<Job, BuildError> {
        let body: serde_json::Value = serde_json::from_str(&request.body).map_err(|e| BuildError::Internal(e.to_string()))?;
        let n = body["n"].as_u64().unwrap_or(1) as usize;
        let mut uploads = Vec::new();
        let mut padding = 0;
        match body["mode"].as_str().unwrap_or("ok") {
            // Hold the call (and its instance slot) until the host's deadline traps it.
            "slow" => {
                let mut x: u64 = 0;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
            "log-flood" => {
                let line = "f".repeat(4000);
                for _ in 0..n {
                    host.log(LogLevel::Info, &line);
                }
            }
            "markup-error" => {
                return Err(BuildError::InvalidRequest(vec![
                    FieldError { field: "mode".into(), message: format!("refused: {MARKUP}") },
                    FieldError { field: MARKUP.into(), message: MARKUP.into() },
                ]));
            }
            "log-forge" => host.log(LogLevel::Info, "innocent\nERROR forged line: admin logged in\r\x1b[2Jcleared"),
            "huge-error" => {
                let text = "e".repeat(n);
                return Err(BuildError::InvalidRequest(vec![FieldError { field: text.clone(), message: text }]));
            }
            "uploads" => {
                for i in 0..n {
                    uploads.push(Upload {
                        field: "mode".into(),
                        filename: format!("u{i}.png"),
                        source: ImageSource::Bytes(PNG_1X1.to_vec()),
                        node_id: "3".into(),
                        input_name: "image".into(),
                    });
                }
            }
            // One log message of n bytes (the host must not copy it whole).
            "big-log" => host.log(LogLevel::Info, &"l".repeat(n)),
            // One upload of n bytes: a legitimate size the host must copy, so it is charged.
            "big-upload" => {
                let mut bytes = PNG_1X1.to_vec();
                bytes.resize(n.max(PNG_1X1.len()), 0);
                uploads.push(Upload {
                    field: "mode".into(),
                    filename: "big.png".into(),
                    source: ImageSource::Bytes(bytes),
                    node_id: "3".into(),
                    input_name: "image".into(),
                });
            }
            // A workflow padded to n bytes (a node's input holds the padding).
            "big-workflow" => padding = n,
            // n bytes to stderr in 1 MiB writes, like a plugin printing a debug dump; a broken
            // pipe would panic here (`eprint!` panics when the write fails).
            "stderr-flood" => {
                let chunk = "e".repeat(1 << 20);
                let mut left = n;
                while left > 0 {
                    let part = left.min(chunk.len());
                    eprint!("{}", &chunk[..part]);
                    left -= part;
                }
                eprintln!();
            }
            _ => {}
        }
        let workflow = serde_json::json!({
            "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "hostile"}},
            "3": {"class_type": "LoadImage", "inputs": {"image": "placeholder.png"}},
        });
        let workflow = if padding == 0 {
            workflow.to_string()
        } else {
            // Spliced in rather than built as JSON, so the guest holds the padding once.
            let text = workflow.to_string();
            let mut padded = String::with_capacity(padding + text.len() + 64);
            padded.push_str("{\"pad\": {\"class_type\": \"Note\", \"inputs\": {\"text\": \"");
            padded.extend(std::iter::repeat_n('w', padding));
            padded.push_str("\"}}, ");
            padded.push_str(&text[1..]);
            padded
        };
        Ok(Job {
            workflow,
            uploads,
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

flowhost_sdk::register!(Hostile);
