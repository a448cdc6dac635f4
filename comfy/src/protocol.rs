//! ComfyUI wire types (serde), exactly as ComfyUI 0.3.64 speaks them (see
//! `comfyui-double/fixtures/PROTOCOL.md`): websocket text frames, binary preview frames (types 1 and 4),
//! POST /prompt answers and validation error bodies, history entries with positional `prompt` arrays,
//! queue items, system_stats, upload answers. Pure data and decoding; no I/O here.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::NodeIssue;

/// A websocket text frame: `{"type": T, "data": {...}}`.
#[derive(Debug, Clone, Deserialize)]
pub struct WsTextFrame {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub data: Value,
}

/// A decoded websocket text frame.
#[derive(Debug, Clone, PartialEq)]
pub enum WsMessage {
    Status {
        queue_remaining: Option<u64>,
        sid: Option<String>,
    },
    ExecutionStart {
        prompt_id: String,
        /// ComfyUI's own clock (ms since the epoch), stamped when execution began.
        timestamp: Option<u64>,
    },
    ExecutionCached {
        prompt_id: String,
        nodes: Vec<String>,
    },
    /// `node: None` marks the end of the prompt.
    Executing {
        prompt_id: Option<String>,
        node: Option<String>,
    },
    Progress {
        prompt_id: Option<String>,
        node: Option<String>,
        value: f64,
        max: f64,
    },
    Executed {
        prompt_id: String,
        node: String,
        output: Value,
    },
    ExecutionSuccess {
        prompt_id: String,
        /// ComfyUI's own clock (ms since the epoch), stamped when execution ended.
        timestamp: Option<u64>,
    },
    ExecutionError(ExecutionErrorData),
    ExecutionInterrupted(ExecutionInterruptedData),
    FeatureFlags(Value),
    /// `progress_state` and anything newer: ignored by the client.
    Other {
        kind: String,
    },
}

/// `execution_error` data (identical in the websocket message and in history `status.messages`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ExecutionErrorData {
    pub prompt_id: String,
    #[serde(default, deserialize_with = "de_string_lenient")]
    pub node_id: String,
    #[serde(default, deserialize_with = "de_string_lenient")]
    pub node_type: String,
    #[serde(default)]
    pub exception_message: String,
    #[serde(default)]
    pub exception_type: String,
    #[serde(default)]
    pub traceback: Vec<String>,
    #[serde(default)]
    pub executed: Vec<Value>,
}

/// `execution_interrupted` data.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ExecutionInterruptedData {
    pub prompt_id: String,
    #[serde(default)]
    pub node_id: Option<String>,
    #[serde(default)]
    pub node_type: Option<String>,
}

fn de_string_lenient<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let v = Value::deserialize(d)?;
    Ok(match v {
        Value::String(s) => s,
        Value::Null => String::new(),
        other => other.to_string(),
    })
}

fn str_field(data: &Value, key: &str) -> Option<String> {
    match data.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

impl WsMessage {
    /// Decode a text frame. Unknown types become `Other`; a known type with a malformed body is an error.
    pub fn parse(text: &str) -> Result<WsMessage, String> {
        let frame: WsTextFrame = serde_json::from_str(text)
            .map_err(|e| format!("websocket text frame is not JSON: {e}"))?;
        let d = &frame.data;
        let need_pid =
            || str_field(d, "prompt_id").ok_or_else(|| format!("{} without prompt_id", frame.kind));
        Ok(match frame.kind.as_str() {
            "status" => WsMessage::Status {
                queue_remaining: d
                    .pointer("/status/exec_info/queue_remaining")
                    .and_then(Value::as_u64),
                sid: str_field(d, "sid"),
            },
            "execution_start" => WsMessage::ExecutionStart {
                prompt_id: need_pid()?,
                timestamp: d.get("timestamp").and_then(Value::as_u64),
            },
            "execution_cached" => WsMessage::ExecutionCached {
                prompt_id: need_pid()?,
                nodes: d
                    .get("nodes")
                    .and_then(Value::as_array)
                    .map(|a| a.iter().filter_map(value_as_id).collect())
                    .unwrap_or_default(),
            },
            "executing" => WsMessage::Executing {
                prompt_id: str_field(d, "prompt_id"),
                node: str_field(d, "node"),
            },
            "progress" => WsMessage::Progress {
                prompt_id: str_field(d, "prompt_id"),
                node: str_field(d, "node"),
                value: d.get("value").and_then(Value::as_f64).unwrap_or(0.0),
                max: d.get("max").and_then(Value::as_f64).unwrap_or(0.0),
            },
            "executed" => WsMessage::Executed {
                prompt_id: need_pid()?,
                node: str_field(d, "node").ok_or("executed without node")?,
                output: d.get("output").cloned().unwrap_or(Value::Null),
            },
            "execution_success" => WsMessage::ExecutionSuccess {
                prompt_id: need_pid()?,
                timestamp: d.get("timestamp").and_then(Value::as_u64),
            },
            "execution_error" => WsMessage::ExecutionError(
                serde_json::from_value(d.clone())
                    .map_err(|e| format!("malformed execution_error: {e}"))?,
            ),
            "execution_interrupted" => WsMessage::ExecutionInterrupted(
                serde_json::from_value(d.clone())
                    .map_err(|e| format!("malformed execution_interrupted: {e}"))?,
            ),
            "feature_flags" => WsMessage::FeatureFlags(d.clone()),
            other => WsMessage::Other {
                kind: other.to_string(),
            },
        })
    }

    /// The prompt this message is about, if any.
    pub fn prompt_id(&self) -> Option<&str> {
        match self {
            WsMessage::ExecutionStart { prompt_id, .. }
            | WsMessage::ExecutionCached { prompt_id, .. }
            | WsMessage::Executed { prompt_id, .. }
            | WsMessage::ExecutionSuccess { prompt_id, .. } => Some(prompt_id),
            WsMessage::Executing { prompt_id, .. } | WsMessage::Progress { prompt_id, .. } => {
                prompt_id.as_deref()
            }
            WsMessage::ExecutionError(e) => Some(&e.prompt_id),
            WsMessage::ExecutionInterrupted(e) => Some(&e.prompt_id),
            WsMessage::Status { .. } | WsMessage::FeatureFlags(_) | WsMessage::Other { .. } => None,
        }
    }
}

fn value_as_id(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// A decoded binary websocket frame.
#[derive(Debug, Clone, PartialEq)]
pub enum BinaryFrame {
    /// Type 1 `PREVIEW_IMAGE`: format (1 = JPEG, 2 = PNG) and the encoded image. Not attributed to a node
    /// on the wire: the receiver attributes it to the node currently executing.
    PreviewImage { format: u32, image: bytes::Bytes },
    /// Type 4 `PREVIEW_IMAGE_WITH_METADATA`: metadata names node and prompt.
    PreviewImageWithMetadata {
        metadata: PreviewMetadata,
        image: bytes::Bytes,
    },
    /// Type 3 `TEXT`.
    Text { node_id: String, text: String },
    /// flowhost's own [`RASTER_EVENT`]: one image's raw pixels from `FlowhostImageOutput`
    /// (`comfy/comfyui_nodes/flowhost`); the header names prompt, node and shape.
    Raster { header: RasterHeader, pixels: bytes::Bytes },
    /// Anything else (type 2 is internal; newer types may appear).
    Unknown { event_type: u32 },
}

/// Metadata JSON of a type-4 binary frame.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
pub struct PreviewMetadata {
    #[serde(default)]
    pub node_id: Option<String>,
    #[serde(default)]
    pub prompt_id: Option<String>,
    #[serde(default)]
    pub display_node_id: Option<String>,
    #[serde(default)]
    pub real_node_id: Option<String>,
    #[serde(default)]
    pub image_type: Option<String>,
}

/// The binary event type `FlowhostImageOutput` sends its pixels under: big-endian "FLWR",
/// far from ComfyUI's own small integers.
pub const RASTER_EVENT: u32 = 0x464C_5752;
/// The raster header versions this client reads.
const RASTER_VERSION: u32 = 1;

/// The JSON header of a [`BinaryFrame::Raster`] frame.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct RasterHeader {
    pub version: u32,
    #[serde(default)]
    pub prompt_id: Option<String>,
    #[serde(deserialize_with = "id_string")]
    pub node_id: String,
    pub index: u32,
    pub count: u32,
    pub width: u32,
    pub height: u32,
    pub channels: u8,
    pub dtype: String,
    pub layout: String,
    #[serde(default)]
    pub filename: Option<String>,
}

fn id_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let v = Value::deserialize(d)?;
    value_as_id(&v).ok_or_else(|| serde::de::Error::custom("node_id is neither a string nor a number"))
}

/// Decode and check a raster frame's body (after the event type): the header must be a
/// version this client knows, 8-bit HWC with 1–4 channels, and the pixels exactly its shape.
fn parse_raster(frame: &bytes::Bytes) -> Result<BinaryFrame, String> {
    let len = be_u32(frame, 4).ok_or("raster frame without header length")? as usize;
    let end = 8usize.checked_add(len).filter(|e| *e <= frame.len()).ok_or("raster header length beyond frame")?;
    let header: RasterHeader = serde_json::from_slice(&frame[8..end]).map_err(|e| format!("raster header is not valid: {e}"))?;
    if header.version != RASTER_VERSION {
        return Err(format!("raster header version {} is not {RASTER_VERSION}", header.version));
    }
    if header.dtype != "uint8" || header.layout != "hwc" || !(1..=4).contains(&header.channels) {
        return Err(format!("raster of {} {} with {} channels is not 8-bit HWC with 1-4 channels", header.dtype, header.layout, header.channels));
    }
    let expected = (header.width as u64).checked_mul(header.height as u64).and_then(|n| n.checked_mul(header.channels as u64));
    let pixels = frame.slice(end..);
    if header.width == 0 || header.height == 0 || expected != Some(pixels.len() as u64) {
        return Err(format!("raster {}x{}x{} carries {} bytes", header.width, header.height, header.channels, pixels.len()));
    }
    Ok(BinaryFrame::Raster { header, pixels })
}

fn be_u32(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at + 4)?;
    Some(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

impl BinaryFrame {
    /// Decode a binary frame (layout in PROTOCOL.md: big-endian u32 event type, then a type-specific body).
    pub fn parse(frame: &bytes::Bytes) -> Result<BinaryFrame, String> {
        let event_type = be_u32(frame, 0).ok_or("binary frame shorter than 4 bytes")?;
        match event_type {
            1 => {
                let format = be_u32(frame, 4).ok_or("PREVIEW_IMAGE frame without format")?;
                Ok(BinaryFrame::PreviewImage {
                    format,
                    image: frame.slice(8..),
                })
            }
            4 => {
                let len = be_u32(frame, 4)
                    .ok_or("PREVIEW_IMAGE_WITH_METADATA frame without length")?
                    as usize;
                let end = 8usize
                    .checked_add(len)
                    .filter(|e| *e <= frame.len())
                    .ok_or("metadata length beyond frame")?;
                let metadata: PreviewMetadata = serde_json::from_slice(&frame[8..end])
                    .map_err(|e| format!("preview metadata is not JSON: {e}"))?;
                Ok(BinaryFrame::PreviewImageWithMetadata {
                    metadata,
                    image: frame.slice(end..),
                })
            }
            3 => {
                let len = be_u32(frame, 4).ok_or("TEXT frame without node id length")? as usize;
                let end = 8usize
                    .checked_add(len)
                    .filter(|e| *e <= frame.len())
                    .ok_or("node id length beyond frame")?;
                Ok(BinaryFrame::Text {
                    node_id: String::from_utf8_lossy(&frame[8..end]).into_owned(),
                    text: String::from_utf8_lossy(&frame[end..]).into_owned(),
                })
            }
            RASTER_EVENT => parse_raster(frame),
            other => Ok(BinaryFrame::Unknown { event_type: other }),
        }
    }
}

/// POST /prompt request body.
#[derive(Debug, Clone, Serialize)]
pub struct PromptRequest<'a> {
    pub prompt: &'a Value,
    pub client_id: &'a str,
    pub prompt_id: &'a str,
    #[serde(skip_serializing_if = "Value::is_null")]
    pub extra_data: Value,
}

/// POST /prompt 200 answer.
#[derive(Debug, Clone, Deserialize)]
pub struct PromptAccepted {
    pub prompt_id: String,
    #[serde(default)]
    pub number: Option<f64>,
    #[serde(default)]
    pub node_errors: Map<String, Value>,
}

/// A `{type, message, details, extra_info}` error object (top-level `error` and each node error).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ErrorObject {
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub details: String,
    #[serde(default)]
    pub extra_info: Map<String, Value>,
}

/// One entry of `node_errors`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct NodeErrorEntry {
    #[serde(default)]
    pub errors: Vec<ErrorObject>,
    #[serde(default)]
    pub dependent_outputs: Vec<Value>,
    #[serde(default)]
    pub class_type: String,
}

/// POST /prompt 400 answer.
#[derive(Debug, Clone, Deserialize)]
pub struct PromptRejected {
    pub error: ErrorObject,
    #[serde(default)]
    pub node_errors: Map<String, Value>,
}

/// Flatten ComfyUI's `node_errors` map into `NodeIssue`s (one per error, node order preserved).
pub fn node_issues_from(node_errors: &Map<String, Value>) -> Vec<NodeIssue> {
    let mut out = Vec::new();
    for (node_id, entry) in node_errors {
        let entry: NodeErrorEntry = serde_json::from_value(entry.clone()).unwrap_or_default();
        if entry.errors.is_empty() {
            out.push(NodeIssue {
                node_id: node_id.clone(),
                class_type: entry.class_type.clone(),
                kind: "unknown".into(),
                input_name: None,
                message: "ComfyUI reported this node without details".into(),
            });
        }
        for e in entry.errors {
            let input_name = e
                .extra_info
                .get("input_name")
                .and_then(Value::as_str)
                .map(str::to_string);
            let message = if e.details.is_empty() {
                e.message.clone()
            } else {
                format!("{}: {}", e.message, e.details)
            };
            out.push(NodeIssue {
                node_id: node_id.clone(),
                class_type: entry.class_type.clone(),
                kind: e.kind,
                input_name,
                message,
            });
        }
    }
    out
}

/// The node id named in an `invalid_prompt` error's details (`"Node ID '#2'"`).
pub fn node_id_from_details(details: &str) -> Option<String> {
    let rest = details.split("Node ID '#").nth(1)?;
    Some(rest.split('\'').next()?.to_string())
}

/// One entry of GET /history/{id}.
#[derive(Debug, Clone, Deserialize)]
pub struct HistoryEntry {
    /// Positional: `[number, prompt_id, graph, extra_data, outputs_to_execute]`.
    #[serde(default)]
    pub prompt: Vec<Value>,
    /// `{node_id: ui_output}` in execution order.
    #[serde(default)]
    pub outputs: Map<String, Value>,
    #[serde(default)]
    pub status: Option<HistoryStatus>,
}

/// `status` of a history entry.
#[derive(Debug, Clone, Deserialize)]
pub struct HistoryStatus {
    #[serde(default)]
    pub status_str: String,
    #[serde(default)]
    pub completed: bool,
    /// `[event_name, data]` pairs.
    #[serde(default)]
    pub messages: Vec<(String, Value)>,
}

/// How a finished prompt ended.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptOutcome {
    Success,
    Error(ExecutionErrorData),
    Interrupted(ExecutionInterruptedData),
}

impl HistoryEntry {
    /// How the prompt ended, read from `status.messages` (falling back to `status_str`).
    pub fn outcome(&self, prompt_id: &str) -> Option<PromptOutcome> {
        let status = self.status.as_ref()?;
        for (name, data) in status.messages.iter().rev() {
            match name.as_str() {
                "execution_success" => return Some(PromptOutcome::Success),
                "execution_error" => {
                    let mut e: ExecutionErrorData =
                        serde_json::from_value(data.clone()).unwrap_or_default();
                    if e.prompt_id.is_empty() {
                        e.prompt_id = prompt_id.to_string();
                    }
                    return Some(PromptOutcome::Error(e));
                }
                "execution_interrupted" => {
                    let mut e: ExecutionInterruptedData =
                        serde_json::from_value(data.clone()).unwrap_or_default();
                    if e.prompt_id.is_empty() {
                        e.prompt_id = prompt_id.to_string();
                    }
                    return Some(PromptOutcome::Interrupted(e));
                }
                _ => {}
            }
        }
        match (status.status_str.as_str(), status.completed) {
            ("success", _) => Some(PromptOutcome::Success),
            ("error", _) => Some(PromptOutcome::Error(ExecutionErrorData {
                prompt_id: prompt_id.to_string(),
                exception_type: "unknown".into(),
                exception_message: "ComfyUI recorded an error without an execution_error message"
                    .into(),
                ..Default::default()
            })),
            _ => None,
        }
    }
}

/// GET /queue answer. Items are positional arrays `[number, prompt_id, graph, extra_data, outputs]`.
#[derive(Debug, Clone, Deserialize, Default)]
pub struct QueueState {
    #[serde(default)]
    pub queue_running: Vec<Vec<Value>>,
    #[serde(default)]
    pub queue_pending: Vec<Vec<Value>>,
}

impl QueueState {
    fn has(items: &[Vec<Value>], id: &str) -> bool {
        items
            .iter()
            .any(|i| i.get(1).and_then(Value::as_str) == Some(id))
    }
    pub fn is_running(&self, id: &str) -> bool {
        Self::has(&self.queue_running, id)
    }
    pub fn is_pending(&self, id: &str) -> bool {
        Self::has(&self.queue_pending, id)
    }
}

/// GET /system_stats answer (only the fields we use; the rest is kept raw).
#[derive(Debug, Clone, Deserialize)]
pub struct SystemStats {
    pub system: SystemInfo,
    #[serde(default)]
    pub devices: Vec<Value>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct SystemInfo {
    #[serde(default)]
    pub comfyui_version: String,
    #[serde(default)]
    pub python_version: String,
    #[serde(default)]
    pub argv: Vec<String>,
}

/// POST /upload/image answer.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct UploadAnswer {
    pub name: String,
    #[serde(default)]
    pub subfolder: String,
    #[serde(rename = "type", default)]
    pub kind: String,
}

/// A file reference inside a node's UI output (`{"filename","subfolder","type"}`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct FileRef {
    pub filename: String,
    #[serde(default)]
    pub subfolder: String,
    #[serde(rename = "type", default = "default_output")]
    pub kind: String,
}

fn default_output() -> String {
    "output".into()
}

/// Every file a node's UI output names, whatever the key (`images`, `gifs`, `videos`, `animated`, `audio`, …).
pub fn file_refs_in_ui_output(output: &Value) -> Vec<FileRef> {
    let mut refs = Vec::new();
    if let Some(obj) = output.as_object() {
        for value in obj.values() {
            if let Some(items) = value.as_array() {
                for item in items {
                    if item.get("filename").is_some()
                        && let Ok(r) = serde_json::from_value::<FileRef>(item.clone())
                    {
                        refs.push(r);
                    }
                }
            }
        }
    }
    refs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn execution_error_from_real_transcript_names_node_and_exception() {
        let text = r#"{"type":"execution_error","data":{"prompt_id":"p","node_id":"3","node_type":"VAELoader","executed":[],"exception_message":"header too small\n","exception_type":"safetensors._safetensors_rust.SafetensorError","traceback":["a","b"],"current_inputs":{},"current_outputs":[],"timestamp":1}}"#;
        let WsMessage::ExecutionError(e) = WsMessage::parse(text).unwrap() else {
            panic!("wrong kind")
        };
        assert_eq!(
            (e.node_id.as_str(), e.node_type.as_str()),
            ("3", "VAELoader")
        );
        assert_eq!(
            e.exception_type,
            "safetensors._safetensors_rust.SafetensorError"
        );
        assert_eq!(e.traceback.len(), 2);
    }

    #[test]
    fn executing_null_is_end_marker() {
        let m = WsMessage::parse(
            r#"{"type":"executing","data":{"node":null,"display_node":null,"prompt_id":"p"}}"#,
        )
        .unwrap();
        assert_eq!(
            m,
            WsMessage::Executing {
                prompt_id: Some("p".into()),
                node: None
            }
        );
    }

    #[test]
    fn real_binary_frames_decode() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../comfyui-double/fixtures/");
        let t1 = bytes::Bytes::from(
            std::fs::read(format!("{dir}savews-frame-no_feature_flags-0.bin")).unwrap(),
        );
        let BinaryFrame::PreviewImage { format, image } = BinaryFrame::parse(&t1).unwrap() else {
            panic!()
        };
        assert_eq!(format, 2);
        assert_eq!(&image[..4], b"\x89PNG");
        let t4 = bytes::Bytes::from(
            std::fs::read(format!(
                "{dir}savews-frame-feature_flags_supports_preview_metadata-0.bin"
            ))
            .unwrap(),
        );
        let BinaryFrame::PreviewImageWithMetadata { metadata, image } =
            BinaryFrame::parse(&t4).unwrap()
        else {
            panic!()
        };
        assert_eq!(metadata.node_id.as_deref(), Some("2"));
        assert_eq!(
            metadata.prompt_id.as_deref(),
            Some("09894ee1-c504-47e8-8483-f36c925eb309")
        );
        assert_eq!(&image[..4], b"\x89PNG");
    }

    #[test]
    fn real_history_entries_give_outcomes() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../comfyui-double/fixtures/");
        let ok: Value = serde_json::from_str(
            &std::fs::read_to_string(format!("{dir}history-success.json")).unwrap(),
        )
        .unwrap();
        let (pid, entry) = ok["response"].as_object().unwrap().iter().next().unwrap();
        let entry: HistoryEntry = serde_json::from_value(entry.clone()).unwrap();
        assert_eq!(entry.outcome(pid), Some(PromptOutcome::Success));
        assert_eq!(
            file_refs_in_ui_output(&entry.outputs["3"])[0].filename,
            "cap_success_00001_.png"
        );

        let err: Value = serde_json::from_str(
            &std::fs::read_to_string(format!("{dir}history-error.json")).unwrap(),
        )
        .unwrap();
        let resp = err.get("response").unwrap_or(&err);
        let (pid, entry) = resp.as_object().unwrap().iter().next().unwrap();
        let entry: HistoryEntry = serde_json::from_value(entry.clone()).unwrap();
        let Some(PromptOutcome::Error(e)) = entry.outcome(pid) else {
            panic!("expected error outcome")
        };
        assert!(!e.node_id.is_empty() && !e.exception_type.is_empty());
    }

    #[test]
    fn invalid_prompt_details_name_the_node() {
        assert_eq!(node_id_from_details("Node ID '#2'").as_deref(), Some("2"));
    }

    fn raster_frame(header: &str, pixels: &[u8]) -> bytes::Bytes {
        let mut out = RASTER_EVENT.to_be_bytes().to_vec();
        out.extend_from_slice(&(header.len() as u32).to_be_bytes());
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(pixels);
        out.into()
    }

    const HEADER_2X1: &str = r#"{"version": 1, "prompt_id": "p", "node_id": "9", "index": 0, "count": 1, "width": 2, "height": 1, "channels": 3, "dtype": "uint8", "layout": "hwc", "filename": "x_00001_.png"}"#;

    #[test]
    fn raster_frames_carry_their_prompt_node_and_exact_pixels() {
        let frame = raster_frame(HEADER_2X1, &[1, 2, 3, 4, 5, 6]);
        let BinaryFrame::Raster { header, pixels } = BinaryFrame::parse(&frame).unwrap() else { panic!("not a raster") };
        assert_eq!((header.prompt_id.as_deref(), header.node_id.as_str(), header.width, header.height, header.channels), (Some("p"), "9", 2, 1, 3));
        assert_eq!(&pixels[..], &[1, 2, 3, 4, 5, 6]);
        // A numeric node id (as ComfyUI may send) reads as its string.
        let numeric = HEADER_2X1.replace(r#""node_id": "9""#, r#""node_id": 9"#);
        let BinaryFrame::Raster { header, .. } = BinaryFrame::parse(&raster_frame(&numeric, &[0; 6])).unwrap() else { panic!() };
        assert_eq!(header.node_id, "9");
    }

    #[test]
    fn raster_frames_whose_pixels_do_not_match_their_header_are_refused() {
        assert!(BinaryFrame::parse(&raster_frame(HEADER_2X1, &[0; 5])).unwrap_err().contains("2x1x3 carries 5 bytes"));
        assert!(BinaryFrame::parse(&raster_frame(HEADER_2X1, &[0; 7])).is_err());
        let v2 = HEADER_2X1.replace(r#""version": 1"#, r#""version": 2"#);
        assert!(BinaryFrame::parse(&raster_frame(&v2, &[0; 6])).unwrap_err().contains("version 2"));
        let f32s = HEADER_2X1.replace("uint8", "float32");
        assert!(BinaryFrame::parse(&raster_frame(&f32s, &[0; 6])).is_err());
        let huge = HEADER_2X1.replace(r#""width": 2"#, r#""width": 4294967295"#).replace(r#""height": 1"#, r#""height": 4294967295"#);
        assert!(BinaryFrame::parse(&raster_frame(&huge, &[0; 6])).is_err());
        let mut short = RASTER_EVENT.to_be_bytes().to_vec();
        short.extend_from_slice(&100u32.to_be_bytes());
        assert!(BinaryFrame::parse(&short.into()).unwrap_err().contains("beyond frame"));
    }

    #[test]
    fn execution_start_and_success_carry_comfyuis_own_stamps() {
        let start = WsMessage::parse(r#"{"type":"execution_start","data":{"prompt_id":"p","timestamp":1796216180785}}"#).unwrap();
        assert_eq!(start, WsMessage::ExecutionStart { prompt_id: "p".into(), timestamp: Some(1796216180785) });
        let done = WsMessage::parse(r#"{"type":"execution_success","data":{"prompt_id":"p"}}"#).unwrap();
        assert_eq!(done, WsMessage::ExecutionSuccess { prompt_id: "p".into(), timestamp: None });
    }
}
