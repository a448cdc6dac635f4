//! The ComfyUI test double (see Cargo.toml description).
