//! Choosing model files from what the host's volume holds.
//!
//! Candidates are `(folder, name)` pairs in order of preference. Whether a file
//! counts as present (zero-byte files and broken links do not) is the host's rule:
//! this module only reads `Host::list_models`. It never guesses names that were not
//! listed.

use crate::{Host, ModelFile, ModelRef, ModelRequirement};

/// The file `folder/name` if the host lists it.
pub fn find_model(host: &dyn Host, folder: &str, name: &str) -> Option<ModelFile> {
    host.list_models(folder)
        .into_iter()
        .find(|f| f.name == name)
}

/// Whether the host lists `folder/name`.
pub fn has_model(host: &dyn Host, folder: &str, name: &str) -> bool {
    find_model(host, folder, name).is_some()
}

/// The first candidate the host lists (each folder is listed once).
pub fn pick_model(host: &dyn Host, candidates: &[(&str, &str)]) -> Option<ModelRef> {
    let mut listed: Vec<(&str, Vec<ModelFile>)> = Vec::new();
    for &(folder, name) in candidates {
        let position = match listed.iter().position(|(f, _)| *f == folder) {
            Some(p) => p,
            None => {
                listed.push((folder, host.list_models(folder)));
                listed.len() - 1
            }
        };
        if listed[position].1.iter().any(|f| f.name == name) {
            return Some(model_ref(folder, name));
        }
    }
    None
}

/// A [`ModelRef`] from its parts.
pub fn model_ref(folder: &str, name: &str) -> ModelRef {
    ModelRef {
        folder: folder.to_string(),
        name: name.to_string(),
    }
}

/// A manifest requirement met by any of `candidates`.
pub fn requirement(purpose: &str, candidates: &[(&str, &str)]) -> ModelRequirement {
    ModelRequirement {
        purpose: purpose.to_string(),
        any_of: candidates
            .iter()
            .map(|&(folder, name)| model_ref(folder, name))
            .collect(),
    }
}

/// `folder/a or folder/b` for messages.
pub fn describe_candidates(candidates: &[(&str, &str)]) -> String {
    candidates
        .iter()
        .map(|(folder, name)| format!("{folder}/{name}"))
        .collect::<Vec<_>>()
        .join(" or ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::FakeHost;

    #[test]
    fn pick_model_prefers_the_first_listed_candidate() {
        let host = FakeHost::new()
            .with_model("text_encoders", "t5xxl_fp8_e4m3fn.safetensors", 5)
            .with_model("text_encoders", "t5xxl_fp16.safetensors", 9);
        let candidates = [
            ("text_encoders", "t5xxl_fp16.safetensors"),
            ("text_encoders", "t5xxl_fp8_e4m3fn.safetensors"),
        ];
        assert_eq!(
            pick_model(&host, &candidates),
            Some(model_ref("text_encoders", "t5xxl_fp16.safetensors"))
        );
        let only_fp8 = FakeHost::new().with_model("clip", "t5xxl_fp8_e4m3fn.safetensors", 5);
        let candidates = [
            ("text_encoders", "t5xxl_fp16.safetensors"),
            ("text_encoders", "t5xxl_fp8_e4m3fn.safetensors"),
            ("clip", "t5xxl_fp8_e4m3fn.safetensors"),
        ];
        assert_eq!(
            pick_model(&only_fp8, &candidates),
            Some(model_ref("clip", "t5xxl_fp8_e4m3fn.safetensors"))
        );
    }

    #[test]
    fn nothing_listed_picks_nothing() {
        let host = FakeHost::new().with_model("vae", "other.safetensors", 1);
        assert_eq!(pick_model(&host, &[("vae", "ae.safetensors")]), None);
        assert!(!has_model(&host, "vae", "ae.safetensors"));
        assert!(has_model(&host, "vae", "other.safetensors"));
        assert_eq!(
            find_model(&host, "vae", "other.safetensors").map(|f| f.size),
            Some(1)
        );
    }

    #[test]
    fn requirements_and_descriptions_keep_the_order() {
        let candidates = [
            ("vae", "ae.safetensors"),
            ("checkpoints", "flux1-dev-fp8.safetensors"),
        ];
        let r = requirement("Flux VAE", &candidates);
        assert_eq!(r.purpose, "Flux VAE");
        assert_eq!(r.any_of[1].folder, "checkpoints");
        assert_eq!(
            describe_candidates(&candidates),
            "vae/ae.safetensors or checkpoints/flux1-dev-fp8.safetensors"
        );
    }
}
