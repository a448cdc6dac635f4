//! The table of model folders flowhost knows: the name a plugin (and ComfyUI) uses,
//! the directories of the volume that hold it, and which files ComfyUI lists in it.
//!
//! Owns only this static table. Must never touch the file system.

/// File extensions ComfyUI lists in weight folders (`folder_paths.supported_pt_extensions`).
pub const WEIGHT_EXTENSIONS: &[&str] = &[
    "ckpt",
    "pt",
    "pt2",
    "bin",
    "pth",
    "safetensors",
    "pkl",
    "sft",
];

/// Which files of a folder count as model files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileFilter {
    /// Only weight files ([`WEIGHT_EXTENSIONS`]), as ComfyUI filters its combos.
    Weights,
    /// Every regular file (e.g. insightface's `.onnx` models, read by the node pack itself).
    AnyFile,
}

/// One model folder as ComfyUI addresses it.
#[derive(Debug, Clone, Copy)]
pub struct ModelFolder {
    /// The folder name plugins and ComfyUI use (`text_encoders`).
    pub name: &'static str,
    /// Directories under the volume root that hold it, in lookup order. ComfyUI's legacy
    /// names (`clip` for text encoders, `unet` for diffusion models) are directories of
    /// the same folder: a file in `clip/` is `text_encoders/<name>` to ComfyUI.
    pub dirs: &'static [&'static str],
    pub filter: FileFilter,
}

/// Every folder of the volume, in the order they are written to `extra_model_paths.yaml`.
pub const MODEL_FOLDERS: &[ModelFolder] = &[
    folder("checkpoints", &["checkpoints"]),
    folder("diffusion_models", &["diffusion_models", "unet"]),
    folder("text_encoders", &["text_encoders", "clip"]),
    folder("vae", &["vae"]),
    folder("loras", &["loras"]),
    folder("controlnet", &["controlnet"]),
    folder("clip_vision", &["clip_vision"]),
    folder("style_models", &["style_models"]),
    folder("embeddings", &["embeddings"]),
    folder("upscale_models", &["upscale_models"]),
    folder("vae_approx", &["vae_approx"]),
    folder("hypernetworks", &["hypernetworks"]),
    folder("gligen", &["gligen"]),
    folder("photomaker", &["photomaker"]),
    folder("model_patches", &["model_patches"]),
    folder("instantid", &["instantid"]),
    folder("pulid", &["pulid"]),
    folder("ipadapter", &["ipadapter"]),
    // PuLID-Flux (ComfyUI_PuLID_Flux_ll) reads facexlib's detection and parsing weights here.
    folder("facexlib", &["facexlib"]),
    ModelFolder {
        name: "insightface",
        dirs: &["insightface"],
        filter: FileFilter::AnyFile,
    },
];

const fn folder(name: &'static str, dirs: &'static [&'static str]) -> ModelFolder {
    ModelFolder {
        name,
        dirs,
        filter: FileFilter::Weights,
    }
}

/// The folder a plugin means by `name`, accepting ComfyUI's legacy aliases
/// (`clip` → `text_encoders`, `unet` → `diffusion_models`). Unknown names → `None`.
pub fn resolve_folder(name: &str) -> Option<&'static ModelFolder> {
    MODEL_FOLDERS
        .iter()
        .find(|folder| folder.name == name || folder.dirs.contains(&name))
}

impl FileFilter {
    /// Whether a file named `file_name` is listed.
    pub fn accepts(self, file_name: &str) -> bool {
        match self {
            FileFilter::AnyFile => true,
            FileFilter::Weights => file_name
                .rsplit_once('.')
                .map(|(_, ext)| {
                    WEIGHT_EXTENSIONS
                        .iter()
                        .any(|known| known.eq_ignore_ascii_case(ext))
                })
                .unwrap_or(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_names_resolve_to_the_folder_comfyui_uses() {
        assert_eq!(
            resolve_folder("clip").map(|f| f.name),
            Some("text_encoders")
        );
        assert_eq!(
            resolve_folder("unet").map(|f| f.name),
            Some("diffusion_models")
        );
        assert_eq!(resolve_folder("loras").map(|f| f.name), Some("loras"));
        assert!(resolve_folder("../etc").is_none());
        assert!(resolve_folder("").is_none());
    }

    #[test]
    fn weight_folders_list_only_weight_files() {
        assert!(FileFilter::Weights.accepts("flux1-dev.safetensors"));
        assert!(FileFilter::Weights.accepts("model.PTH"));
        assert!(!FileFilter::Weights.accepts("flux1-dev.safetensors.part"));
        assert!(!FileFilter::Weights.accepts("README"));
        assert!(FileFilter::AnyFile.accepts("1k3d68.onnx"));
    }
}
