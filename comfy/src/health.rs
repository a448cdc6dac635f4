//! ComfyUI's health as the host sees it: its own module because the backend publishes it and
//! a run reads it (to fail fast when ComfyUI is down), and neither should import the other
//! for it.

/// ComfyUI's health as the host should see it.
#[derive(Debug, Clone, PartialEq)]
pub enum BackendHealth {
    /// Not answered yet (startup).
    Starting,
    /// Answering, catalogue loaded, websocket connected.
    Ready {
        version: String,
        queue_remaining: u64,
    },
    /// Answering but something is off (catalogue not loaded, custom nodes failed to import, no websocket).
    Degraded { reason: String },
    /// Not answering / process dead. Runs fail with `Unavailable`.
    Down { reason: String },
}

impl BackendHealth {
    /// True when prompts can be submitted (Ready or Degraded).
    pub fn is_serving(&self) -> bool {
        matches!(
            self,
            BackendHealth::Ready { .. } | BackendHealth::Degraded { .. }
        )
    }
}
