//! The model volume: which model files exist (`volume`), where ComfyUI finds them
//! (`extra_paths`), and whether every plugin's declared models are present (`status`);
//! beside it the model cache (`cache`) of files requests name by reference, and the
//! safetensors header check (`safetensors`).
//!
//! Owns reading the volume. Must never write model files on the volume (downloads are
//! `models pull`) and never create symlinks or move files around; `pull` is the one writer
//! to the volume, `cache` the one writer to `--model-cache`, and both install files only by
//! renaming complete, verified downloads into place.

pub mod cache;
pub mod extra_paths;
pub mod folders;
pub mod manifest;
pub mod pull;
pub mod refresh;
pub mod safetensors;
pub mod status;
pub mod volume;

pub use extra_paths::{render_extra_model_paths, write_extra_model_paths};
pub use status::{
    ModelsReport, PluginModelsStatus, PluginNeeds, Requirement, RequirementState,
    RequirementStatus, check, render_text,
};
pub use volume::{ModelFile, ModelVolume};
