//! flowhost-comfy: everything flowhost knows about ComfyUI — protocol types, the HTTP + websocket
//! client with history fallback, the node catalogue and preflight, the process supervisor, and the
//! `ComfyBackend` the host holds. Knows nothing of plugins or HTTP serving.

pub mod catalogue;
pub mod error;
pub mod media;
pub mod preflight;
pub mod protocol;

pub use catalogue::{Catalogue, ClassInfo, InputKind, InputSpec};
pub use error::{ComfyError, NodeIssue};
