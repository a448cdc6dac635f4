//! The `/flux-lora` endpoint (to be written).
