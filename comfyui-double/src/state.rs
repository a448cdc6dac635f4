//! The server's in-memory state (queue, history, sockets, executor status, cache) and event delivery
//! with ComfyUI's routing rules (by `client_id`; `status` broadcast).
//!
//! Must never: block on I/O while holding a lock, or buffer events for sockets that are not connected.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// `FlowhostImageOutput`'s binary event type (big-endian "FLWR").
pub(crate) const RASTER_EVENT: u32 = 0x464C_5752;

use axum::extract::ws::Message;
use serde_json::{Map, Value, json};
use tokio::sync::{Notify, mpsc};

use crate::faults::{Faults, Record};
use crate::models::ModelPaths;

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One queued prompt; serialised as ComfyUI's positional array.
#[derive(Clone, Debug)]
pub(crate) struct QueueItem {
    pub number: Value,
    pub seq: u64,
    pub prompt_id: String,
    pub prompt: Value,
    pub extra_data: Value,
    pub outputs: Vec<String>,
}

impl QueueItem {
    pub fn to_json(&self) -> Value {
        json!([self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs])
    }

    pub fn client_id(&self) -> Option<String> {
        self.extra_data.get("client_id").and_then(Value::as_str).map(str::to_string)
    }

    fn priority(&self) -> (f64, u64) {
        (self.number.as_f64().unwrap_or(0.0), self.seq)
    }
}

#[derive(Default)]
pub(crate) struct QueueState {
    pub pending: Vec<QueueItem>,
    pub running: Option<QueueItem>,
    /// ComfyUI's `number` counter (increments on every POST /prompt without an explicit number).
    pub number: i64,
    pub seq: u64,
    /// prompt_id → history entry, oldest first.
    pub history: Map<String, Value>,
}

impl QueueState {
    pub fn remaining(&self) -> usize {
        self.pending.len() + usize::from(self.running.is_some())
    }

    /// Removes and returns the pending item ComfyUI's heap would pop next.
    pub fn pop_next(&mut self) -> Option<QueueItem> {
        let idx = (0..self.pending.len()).min_by(|&a, &b| {
            let (pa, pb) = (self.pending[a].priority(), self.pending[b].priority());
            pa.0.total_cmp(&pb.0).then(pa.1.cmp(&pb.1))
        })?;
        Some(self.pending.remove(idx))
    }
}

/// A connected websocket.
pub(crate) struct SocketHandle {
    pub conn: u64,
    pub tx: mpsc::UnboundedSender<Message>,
    /// Set by the `feature_flags` handshake: previews go out as binary type 4.
    pub preview_metadata: Arc<AtomicBool>,
}

/// What the executor is doing right now (for reconnects and targeted interrupts).
#[derive(Default)]
pub(crate) struct ExecState {
    pub prompt_id: Option<String>,
    pub client_id: Option<String>,
    pub last_node: Option<String>,
}

pub(crate) struct Shared {
    pub input_dir: PathBuf,
    pub output_dir: PathBuf,
    pub temp_dir: PathBuf,
    pub models: ModelPaths,
    pub faults: Faults,
    pub record: Mutex<Record>,
    pub queue: Mutex<QueueState>,
    pub queue_notify: Notify,
    pub sockets: Mutex<HashMap<String, SocketHandle>>,
    pub exec: Mutex<ExecState>,
    /// ComfyUI's global `interrupt_processing` flag.
    pub interrupt: AtomicBool,
    /// Input signature → UI output of the last prompts' nodes (ComfyUI's classic cache).
    pub cache: Mutex<HashMap<String, Option<Value>>>,
    /// PreviewImage's random name part (`_temp_xxxxx`), fixed for the process as in ComfyUI.
    pub temp_prefix: String,
    pub next_conn: AtomicU64,
    pub argv: Vec<String>,
    /// `--preview-method` from argv, unless `none`: samplers then send a JPEG preview per step.
    pub preview_method: Option<String>,
    /// Most `/history` entries kept (oldest dropped first).
    pub max_history: usize,
    /// Whether prompts and uploads are recorded for tests.
    pub keep_record: bool,
    /// flowhost's `FlowhostImageOutput` is installed (in the catalogue, executable).
    pub flowhost_nodes: bool,
    /// The model set the last executed prompt loaded, and how often it changed.
    pub loaded_models: Mutex<ModelState>,
}

/// What the double's "GPU" has loaded: the model-set signature of the last prompt that
/// loaded any, and the number of switches (the first load counts: it costs too).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModelState {
    pub loaded: Option<String>,
    pub switches: u64,
}

pub(crate) fn text_frame(kind: &str, data: Value) -> Message {
    Message::Text(json!({"type": kind, "data": data}).to_string().into())
}

impl Shared {
    pub fn record(&self) -> MutexGuard<'_, Record> {
        lock(&self.record)
    }

    /// Sends to the socket `sid`, or to every socket when `sid` is None. Unknown sid → dropped.
    pub fn send(&self, message: Message, sid: Option<&str>) {
        let sockets = lock(&self.sockets);
        match sid {
            Some(sid) => {
                if let Some(s) = sockets.get(sid) {
                    let _ = s.tx.send(message);
                }
            }
            None => {
                for s in sockets.values() {
                    let _ = s.tx.send(message.clone());
                }
            }
        }
    }

    pub fn send_json(&self, kind: &str, data: Value, sid: Option<&str>) {
        self.send(text_frame(kind, data), sid);
    }

    /// A preview image for `sid` (or everyone): type 4 with metadata for sockets that did the handshake, else type 1.
    pub fn send_preview(&self, png: &[u8], metadata_json: &str, sid: Option<&str>) {
        self.send_image(png, 2, metadata_json, sid);
    }

    /// As [`Shared::send_preview`] for an image of type-1 `format` (1 = JPEG, 2 = PNG), as ComfyUI's
    /// latent previews (JPEG) and SaveImageWebsocket (PNG) go out.
    pub fn send_image(&self, png: &[u8], format: u32, metadata_json: &str, sid: Option<&str>) {
        let sockets = lock(&self.sockets);
        let frame = |with_metadata: bool| -> Message {
            let mut out = Vec::with_capacity(png.len() + metadata_json.len() + 8);
            if with_metadata {
                out.extend_from_slice(&4u32.to_be_bytes());
                out.extend_from_slice(&(metadata_json.len() as u32).to_be_bytes());
                out.extend_from_slice(metadata_json.as_bytes());
            } else {
                out.extend_from_slice(&1u32.to_be_bytes());
                out.extend_from_slice(&format.to_be_bytes());
            }
            out.extend_from_slice(png);
            Message::Binary(out.into())
        };
        for (id, s) in sockets.iter() {
            if sid.is_none_or(|sid| sid == id) {
                let _ = s.tx.send(frame(s.preview_metadata.load(Ordering::SeqCst)));
            }
        }
    }

    /// One `FlowhostImageOutput` raster frame (event `FLWR`, header length, JSON header, pixels)
    /// for `sid`, or everyone when the prompt has no client, as `send_sync(..., server.client_id)`.
    pub fn send_raster(&self, header_json: &str, pixels: &[u8], sid: Option<&str>) {
        let mut out = Vec::with_capacity(pixels.len() + header_json.len() + 8);
        out.extend_from_slice(&RASTER_EVENT.to_be_bytes());
        out.extend_from_slice(&(header_json.len() as u32).to_be_bytes());
        out.extend_from_slice(header_json.as_bytes());
        out.extend_from_slice(pixels);
        let frame = Message::Binary(out.into());
        let sockets = lock(&self.sockets);
        for (id, s) in sockets.iter() {
            if sid.is_none_or(|sid| sid == id) {
                let _ = s.tx.send(frame.clone());
            }
        }
    }

    pub fn status_data(&self, sid: Option<&str>) -> Value {
        let remaining = lock(&self.queue).remaining();
        let mut data = json!({"status": {"exec_info": {"queue_remaining": remaining}}});
        if let Some(sid) = sid {
            data["sid"] = Value::from(sid);
        }
        data
    }

    /// ComfyUI's `queue_updated()`: a `status` broadcast.
    pub fn broadcast_status(&self) {
        let data = self.status_data(None);
        self.send_json("status", data, None);
    }

    /// Closes every client websocket abruptly (no close frame).
    pub fn drop_all_sockets(&self) {
        lock(&self.sockets).clear();
    }
}
