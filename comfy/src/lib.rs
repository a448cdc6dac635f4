//! ComfyUI backend (see Cargo.toml description). Filled in by the ComfyUI backend issue.
