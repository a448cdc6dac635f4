//! `PromptTracker`: routes websocket traffic to the run waiting for that prompt_id. Binary previews of
//! type 4 name their prompt and node; type 1 frames do not, so they are attributed to the node the
//! socket last reported as executing. Holds no network handles and never blocks.

use std::collections::HashMap;
use std::sync::Mutex;

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::media::Raster;
use crate::protocol::{BinaryFrame, WsMessage};

/// What a waiting run receives.
#[derive(Debug, Clone)]
pub enum PromptEvent {
    Message(WsMessage),
    /// An image sent over the socket (SaveImageWebsocket), attributed to a node when known.
    Image {
        node_id: Option<String>,
        bytes: Bytes,
        /// From the frame (type 1's format, type 4's `image_type`), when it says.
        media_type: Option<String>,
    },
    /// One image's raw pixels from `FlowhostImageOutput` (always an output, never a preview).
    Raster {
        node_id: String,
        /// The name the node gave it (`{filename_prefix}_{n:05}_.png`), when it did.
        filename: Option<String>,
        raster: Raster,
    },
}

#[derive(Default)]
struct TrackerState {
    prompts: HashMap<String, mpsc::UnboundedSender<PromptEvent>>,
    /// (prompt_id, node_id) of the node currently executing, for type-1 binary frames.
    executing: Option<(String, String)>,
    queue_remaining: Option<u64>,
}

/// Routes events per prompt_id. Register before POST /prompt so no event can be missed.
#[derive(Default)]
pub struct PromptTracker {
    state: Mutex<TrackerState>,
}

impl PromptTracker {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TrackerState> {
        // A panic while holding this lock cannot leave the maps inconsistent; keep serving.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Start receiving events for `prompt_id`.
    pub fn register(&self, prompt_id: &str) -> mpsc::UnboundedReceiver<PromptEvent> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.lock().prompts.insert(prompt_id.to_string(), tx);
        rx
    }

    pub fn unregister(&self, prompt_id: &str) {
        self.lock().prompts.remove(prompt_id);
    }

    /// Number of prompts being waited for.
    pub fn waiting(&self) -> usize {
        self.lock().prompts.len()
    }

    /// Last `queue_remaining` ComfyUI broadcast.
    pub fn queue_remaining(&self) -> Option<u64> {
        self.lock().queue_remaining
    }

    /// Route one decoded text frame.
    pub fn route_message(&self, message: WsMessage) {
        let mut state = self.lock();
        match &message {
            WsMessage::Status {
                queue_remaining, ..
            } => {
                if queue_remaining.is_some() {
                    state.queue_remaining = *queue_remaining;
                }
                return;
            }
            WsMessage::Executing {
                prompt_id: Some(p),
                node: Some(n),
            } => state.executing = Some((p.clone(), n.clone())),
            WsMessage::Executing { node: None, .. }
            | WsMessage::ExecutionSuccess { .. }
            | WsMessage::ExecutionError(_)
            | WsMessage::ExecutionInterrupted(_) => state.executing = None,
            _ => {}
        }
        if let Some(pid) = message.prompt_id()
            && let Some(tx) = state.prompts.get(pid)
        {
            let _ = tx.send(PromptEvent::Message(message));
        }
    }

    /// Route one decoded binary frame.
    pub fn route_binary(&self, frame: BinaryFrame) {
        let state = self.lock();
        let (prompt_id, node_id, bytes, media_type) = match frame {
            BinaryFrame::PreviewImageWithMetadata { metadata, image } => {
                let node = metadata.real_node_id.or(metadata.node_id);
                let media_type = metadata.image_type.filter(|t| t.starts_with("image/"));
                match metadata.prompt_id {
                    Some(p) => (p, node, image, media_type),
                    None => match &state.executing {
                        Some((p, _)) => (p.clone(), node, image, media_type),
                        None => return,
                    },
                }
            }
            BinaryFrame::PreviewImage { image, format } => {
                // ComfyUI's PREVIEW_IMAGE formats: 1 = JPEG, 2 = PNG.
                let media_type = match format {
                    1 => Some("image/jpeg".to_string()),
                    2 => Some("image/png".to_string()),
                    _ => None,
                };
                match &state.executing {
                    Some((p, n)) => (p.clone(), Some(n.clone()), image, media_type),
                    None => return,
                }
            }
            BinaryFrame::Raster { header, pixels } => {
                // The header names its prompt; the executing node is the fallback for a node
                // that could not read its context.
                let prompt_id = match header.prompt_id.or_else(|| state.executing.as_ref().map(|(p, _)| p.clone())) {
                    Some(p) => p,
                    None => return,
                };
                if let Some(tx) = state.prompts.get(&prompt_id) {
                    let raster = Raster { width: header.width, height: header.height, channels: header.channels, pixels };
                    let _ = tx.send(PromptEvent::Raster { node_id: header.node_id, filename: header.filename, raster });
                }
                return;
            }
            BinaryFrame::Text { .. } | BinaryFrame::Unknown { .. } => return,
        };
        if let Some(tx) = state.prompts.get(&prompt_id) {
            let _ = tx.send(PromptEvent::Image { node_id, bytes, media_type });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_reach_only_their_prompt_and_type1_images_follow_executing() {
        let t = PromptTracker::new();
        let mut a = t.register("a");
        let mut b = t.register("b");
        t.route_message(WsMessage::ExecutionStart {
            prompt_id: "a".into(),
            timestamp: None,
        });
        t.route_message(WsMessage::Executing {
            prompt_id: Some("a".into()),
            node: Some("7".into()),
        });
        t.route_binary(BinaryFrame::PreviewImage {
            format: 2,
            image: Bytes::from_static(b"\x89PNG"),
        });
        assert!(matches!(
            a.try_recv(),
            Ok(PromptEvent::Message(WsMessage::ExecutionStart { .. }))
        ));
        assert!(matches!(
            a.try_recv(),
            Ok(PromptEvent::Message(WsMessage::Executing { .. }))
        ));
        match a.try_recv() {
            Ok(PromptEvent::Image { node_id, .. }) => assert_eq!(node_id.as_deref(), Some("7")),
            other => panic!("expected image, got {other:?}"),
        }
        assert!(b.try_recv().is_err());
    }
}
