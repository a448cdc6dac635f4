//! flowhost-comfy: everything flowhost knows about ComfyUI — protocol types, the HTTP + websocket
//! client with history fallback, the node catalogue and preflight, the process supervisor, and the
//! `ComfyBackend` the host holds. Knows nothing of plugins or HTTP serving.
//!
//! Typical use by the host:
//! ```ignore
//! let backend = ComfyBackend::start(BackendConfig::new(BackendMode::Url(url))).await?;
//! backend.preflight(&graph).await?;                       // Vec<NodeIssue> on failure
//! let reference = backend.upload_image(bytes, "face.png", &subfolder).await?;
//! let result = backend.run(RunRequest::new(graph, Duration::from_secs(300))).await?;
//! backend.remove_uploads(&subfolder).await?;
//! ```

// `ComfyError::Execution` carries ComfyUI's traceback by value so the host can match on plain fields;
// errors are rare, so the size of the `Err` variant does not matter.
#![allow(clippy::result_large_err)]

pub mod backend;
pub mod catalogue;
pub mod client;
pub mod error;
pub mod graph_shape;
pub mod health;
pub mod media;
pub mod preflight;
pub mod profile;
pub mod protocol;
pub mod raster;
pub mod run;
pub mod speed;
pub mod supervisor;
pub mod tracker;

pub use backend::{BackendConfig, BackendHealth, BackendMode, ComfyBackend};
pub use catalogue::{Catalogue, ClassInfo, FileInput, InputKind, InputSpec};
pub use client::{ClientConfig, ComfyClient, WsState};
pub use error::{ComfyError, NodeIssue};
pub use run::{OutputMedia, Preview, PreviewFn, Progress, ProgressFn, RunRequest, RunResult, RunTimings};
pub use profile::{LaunchProfile, PreviewMethod};
pub use speed::SpeedGraph;
pub use supervisor::{ProcessState, Supervisor, SupervisorConfig};
pub use tracker::{PromptEvent, PromptTracker};
