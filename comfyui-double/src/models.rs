//! The double's own model folders, resolved the way ComfyUI's `folder_paths` does: a `models_dir` with
//! ComfyUI's folder names and/or an `extra_model_paths.yaml` (the simple subset: `name: {base_path, folder: rel}`,
//! multi-line `|` values). Listing is done afresh on every call, so files added while running are seen.
//!
//! Must never: cache listings, or invent files that are not on disk.

use std::path::{Path, PathBuf};

use anyhow::Context;

/// Folder names `GET /models` reports (as captured from ComfyUI 0.3.64 with the pinned custom nodes:
/// `fixtures/identity-nodes.models.json`; ComfyUI_PuLID_Flux_ll adds `insightface` and `facexlib`).
pub const FOLDER_NAMES: &[&str] = &[
    "checkpoints", "configs", "loras", "vae", "text_encoders", "diffusion_models", "clip_vision", "style_models",
    "embeddings", "diffusers", "vae_approx", "controlnet", "gligen", "upscale_models", "custom_nodes", "hypernetworks",
    "photomaker", "classifiers", "model_patches", "audio_encoders", "instantid", "pulid", "insightface", "facexlib",
];

const MODEL_EXTENSIONS: &[&str] = &["ckpt", "pt", "pt2", "bin", "pth", "safetensors", "pkl", "sft"];

/// Sub-directories of a models dir that feed a folder name (ComfyUI's legacy aliases included).
fn dir_names(folder: &str) -> &[&str] {
    match folder {
        "text_encoders" => &["text_encoders", "clip"],
        "diffusion_models" => &["unet", "diffusion_models"],
        "controlnet" => &["controlnet", "t2i_adapter"],
        "checkpoints" => &["checkpoints"],
        _ => &[],
    }
}

/// Maps the legacy keys of extra_model_paths.yaml to ComfyUI's current folder names.
fn canonical_folder(key: &str) -> &str {
    match key {
        "unet" => "diffusion_models",
        "clip" => "text_encoders",
        "t2i_adapter" => "controlnet",
        other => other,
    }
}

/// Where each model folder's files live.
#[derive(Clone, Debug, Default)]
pub struct ModelPaths {
    /// (folder name, directory) pairs, in search order.
    dirs: Vec<(String, PathBuf)>,
}

impl ModelPaths {
    pub fn new(models_dir: Option<&Path>, extra_model_paths: Option<&Path>) -> anyhow::Result<Self> {
        let mut paths = ModelPaths::default();
        if let Some(root) = models_dir {
            for folder in FOLDER_NAMES {
                let names = dir_names(folder);
                if names.is_empty() {
                    paths.dirs.push((folder.to_string(), root.join(folder)));
                } else {
                    for name in names {
                        paths.dirs.push((folder.to_string(), root.join(name)));
                    }
                }
            }
        }
        if let Some(file) = extra_model_paths {
            let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
            let here = file.parent().unwrap_or(Path::new(".")).to_path_buf();
            for (folder, dir) in parse_extra_model_paths(&text, &here) {
                paths.dirs.push((folder, dir));
            }
        }
        Ok(paths)
    }

    pub fn is_known_folder(&self, folder: &str) -> bool {
        FOLDER_NAMES.contains(&folder) || self.dirs.iter().any(|(f, _)| f == folder)
    }

    /// Sorted relative paths (with `/`) of the files of a folder, like ComfyUI's `get_filename_list`.
    /// Zero-byte files count.
    pub fn list(&self, folder: &str) -> Vec<String> {
        let mut out = Vec::new();
        for (f, dir) in &self.dirs {
            if f == folder {
                walk(dir, "", &mut out, folder);
            }
        }
        out.sort();
        out.dedup();
        out
    }
}

fn accepted(folder: &str, name: &str) -> bool {
    match folder {
        "custom_nodes" => true,
        "configs" => name.ends_with(".yaml"),
        _ => name.rsplit_once('.').is_some_and(|(_, ext)| MODEL_EXTENSIONS.contains(&ext.to_ascii_lowercase().as_str())),
    }
}

fn walk(dir: &Path, prefix: &str, out: &mut Vec<String>, folder: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let rel = if prefix.is_empty() { name.clone() } else { format!("{prefix}/{name}") };
        let path = entry.path();
        if path.is_dir() {
            walk(&path, &rel, out, folder);
        } else if accepted(folder, &name) {
            out.push(rel);
        }
    }
}

fn unquote(s: &str) -> &str {
    let s = s.trim();
    s.strip_prefix('"').and_then(|s| s.strip_suffix('"')).or_else(|| s.strip_prefix('\'').and_then(|s| s.strip_suffix('\''))).unwrap_or(s)
}

/// Parses the simple subset of ComfyUI's extra_model_paths.yaml into (folder, absolute dir) pairs.
/// Relative `base_path`s are taken relative to the yaml file's directory, as ComfyUI does.
pub fn parse_extra_model_paths(text: &str, yaml_dir: &Path) -> Vec<(String, PathBuf)> {
    struct Section {
        base: Option<String>,
        entries: Vec<(String, Vec<String>)>,
    }
    let mut sections: Vec<Section> = Vec::new();
    let mut block: Option<(usize, String)> = None; // (indent of key, key) while reading a `|` block
    for raw in text.lines() {
        let line = match raw.find(" #") {
            Some(i) => &raw[..i],
            None if raw.trim_start().starts_with('#') => "",
            None => raw,
        };
        if line.trim().is_empty() {
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        if let Some((key_indent, key)) = &block {
            if indent > *key_indent {
                if let Some(section) = sections.last_mut()
                    && let Some(entry) = section.entries.iter_mut().rev().find(|(k, _)| k == key)
                {
                    entry.1.push(unquote(line).to_string());
                }
                continue;
            }
            block = None;
        }
        let Some((key, value)) = line.trim().split_once(':') else { continue };
        let key = key.trim().to_string();
        let value = value.trim();
        if indent == 0 {
            sections.push(Section { base: None, entries: Vec::new() });
            continue;
        }
        let Some(section) = sections.last_mut() else { continue };
        match (key.as_str(), value) {
            ("base_path", v) => section.base = Some(unquote(v).to_string()),
            ("is_default", _) => {}
            (_, "|") | (_, "|-") | (_, ">") => {
                section.entries.push((key.clone(), Vec::new()));
                block = Some((indent, key));
            }
            (_, v) if !v.is_empty() => section.entries.push((key, vec![unquote(v).to_string()])),
            _ => {}
        }
    }
    let mut out = Vec::new();
    for section in sections {
        let base = match &section.base {
            Some(b) if Path::new(b).is_absolute() => PathBuf::from(b),
            Some(b) => yaml_dir.join(b),
            None => yaml_dir.to_path_buf(),
        };
        for (key, values) in section.entries {
            for v in values {
                let p = Path::new(&v);
                let dir = if p.is_absolute() { p.to_path_buf() } else { base.join(p) };
                out.push((canonical_folder(&key).to_string(), dir));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_model_paths_simple_subset() {
        let yaml = "# comment\ncomfyui:\n    base_path: /srv/models\n    is_default: true\n    checkpoints: ckpt/\n    clip: te\n    loras: |\n        loras/a\n        /abs/loras\nother:\n    base_path: rel\n    vae: \"v\"\n";
        let got = parse_extra_model_paths(yaml, Path::new("/etc/x"));
        assert_eq!(
            got,
            vec![
                ("checkpoints".to_string(), PathBuf::from("/srv/models/ckpt/")),
                ("text_encoders".to_string(), PathBuf::from("/srv/models/te")),
                ("loras".to_string(), PathBuf::from("/srv/models/loras/a")),
                ("loras".to_string(), PathBuf::from("/abs/loras")),
                ("vae".to_string(), PathBuf::from("/etc/x/rel/v")),
            ]
        );
    }

    #[test]
    fn listing_is_sorted_recursive_and_filtered() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["controlnet/instantid/m.safetensors", "controlnet/b.pth", "controlnet/readme.txt", "clip/c.safetensors", "text_encoders/a.sft"] {
            let p = dir.path().join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, b"").unwrap();
        }
        let paths = ModelPaths::new(Some(dir.path()), None).unwrap();
        assert_eq!(paths.list("controlnet"), vec!["b.pth", "instantid/m.safetensors"]);
        assert_eq!(paths.list("text_encoders"), vec!["a.sft", "c.safetensors"]);
        assert!(paths.list("loras").is_empty());
    }
}
