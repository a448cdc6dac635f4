//! ComfyUI's `extra_model_paths.yaml`, telling ComfyUI where each model folder of the
//! volume is, so ComfyUI reads the volume in place.
//!
//! Owns rendering and (atomically) writing that one file. Must never create symlinks,
//! copy or move model files.
//!
//! One line per directory, the key being the directory name: ComfyUI itself maps the
//! legacy keys `clip` → `text_encoders` and `unet` → `diffusion_models`, so both
//! directories of those folders are registered without YAML block scalars. Custom
//! folders (`instantid`, `pulid`, `insightface`) are registered the same way; the
//! InstantID and PuLID node packs keep a folder already registered.
//!
//! Caveat: the InstantID and PuLID packs load insightface from
//! `<ComfyUI models_dir>/insightface` directly, not through the registered folders.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;

use anyhow::Context as _;

use super::folders::MODEL_FOLDERS;

/// The name of the section flowhost writes.
pub const SECTION: &str = "flowhost";

/// The YAML text for a volume at `volume_root` (made absolute, not resolved through
/// symlinks).
pub fn render_extra_model_paths(volume_root: &Path) -> anyhow::Result<String> {
    let root = std::path::absolute(volume_root).with_context(|| {
        format!(
            "making the model volume path {} absolute",
            volume_root.display()
        )
    })?;
    let root = root.to_str().with_context(|| {
        format!(
            "the model volume path {} is not UTF-8; ComfyUI's YAML cannot name it",
            root.display()
        )
    })?;
    let mut yaml = String::new();
    yaml.push_str("# Written by flowhost at startup: where ComfyUI finds the model volume.\n");
    yaml.push_str("# Regenerated on every start; edit the volume, not this file.\n");
    let _ = writeln!(yaml, "{SECTION}:");
    let _ = writeln!(yaml, "    base_path: {}", yaml_scalar(root));
    for folder in MODEL_FOLDERS {
        for dir in folder.dirs {
            let _ = writeln!(yaml, "    {dir}: {dir}");
        }
    }
    Ok(yaml)
}

/// The section naming the model cache (`--model-cache`): each folder the cache places
/// files in, so ComfyUI lists them as `flowhost-cache/<blake3>.safetensors`.
pub const CACHE_SECTION: &str = "flowhost_model_cache";

/// The YAML text of the model cache's section.
pub fn render_model_cache_section(cache_root: &Path) -> anyhow::Result<String> {
    let root = std::path::absolute(cache_root).with_context(|| format!("making the model cache path {} absolute", cache_root.display()))?;
    let root = root.to_str().with_context(|| format!("the model cache path {} is not UTF-8; ComfyUI's YAML cannot name it", root.display()))?;
    let mut yaml = String::new();
    let _ = writeln!(yaml, "{CACHE_SECTION}:");
    let _ = writeln!(yaml, "    base_path: {}", yaml_scalar(root));
    for folder in super::cache::FOLDERS {
        let _ = writeln!(yaml, "    {folder}: {folder}");
    }
    Ok(yaml)
}

/// Write `extra_model_paths.yaml` for the volume at `volume_root` and the model cache at
/// `cache_root` (either may be absent) to `out_file`, replacing it atomically (temporary
/// file in the same directory, then rename).
pub fn write_extra_model_paths(volume_root: Option<&Path>, cache_root: Option<&Path>, out_file: &Path) -> anyhow::Result<()> {
    let mut yaml = match volume_root {
        Some(root) => render_extra_model_paths(root)?,
        None => String::from("# Written by flowhost at startup.\n"),
    };
    if let Some(cache) = cache_root {
        yaml.push_str(&render_model_cache_section(cache)?);
    }
    let dir = match out_file.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let mut temp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    temp.write_all(yaml.as_bytes())
        .with_context(|| format!("writing {}", temp.path().display()))?;
    temp.persist(out_file)
        .with_context(|| format!("writing ComfyUI's model paths to {}", out_file.display()))?;
    Ok(())
}

/// A YAML scalar for `value`: bare when it is plainly a path, double-quoted otherwise.
fn yaml_scalar(value: &str) -> String {
    let plain = !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '_' | '-' | '.'));
    if plain {
        return value.to_owned();
    }
    let mut quoted = String::from("\"");
    for c in value.chars() {
        match c {
            '"' => quoted.push_str("\\\""),
            '\\' => quoted.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(quoted, "\\u{:04x}", c as u32);
            }
            c => quoted.push(c),
        }
    }
    quoted.push('"');
    quoted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_every_folder_relative_to_the_volume() {
        let yaml = render_extra_model_paths(Path::new("/root/models")).unwrap();
        assert!(
            yaml.contains("flowhost:\n    base_path: /root/models\n    checkpoints: checkpoints\n"),
            "{yaml}"
        );
        for line in [
            "    text_encoders: text_encoders\n",
            "    clip: clip\n",
            "    diffusion_models: diffusion_models\n",
            "    unet: unet\n",
            "    loras: loras\n",
            "    vae: vae\n",
            "    instantid: instantid\n",
            "    insightface: insightface\n",
            "    pulid: pulid\n",
            "    controlnet: controlnet\n",
            "    upscale_models: upscale_models\n",
        ] {
            assert!(yaml.contains(line), "missing {line:?} in\n{yaml}");
        }
    }

    #[test]
    fn the_model_cache_is_a_section_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("extra_model_paths.yaml");
        write_extra_model_paths(Some(Path::new("/root/models")), Some(Path::new("/cache")), &out).unwrap();
        let written = std::fs::read_to_string(&out).unwrap();
        assert!(written.ends_with("flowhost_model_cache:\n    base_path: /cache\n    loras: loras\n"), "{written}");
        assert!(written.starts_with("# Written by flowhost"), "{written}");
    }

    #[test]
    fn a_volume_path_with_spaces_or_quotes_is_quoted() {
        let yaml = render_extra_model_paths(Path::new("/mnt/my models/\"x\"")).unwrap();
        assert!(
            yaml.contains("    base_path: \"/mnt/my models/\\\"x\\\"\"\n"),
            "{yaml}"
        );
    }

    #[test]
    fn writes_the_file_and_replaces_an_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("extra_model_paths.yaml");
        std::fs::write(&out, "stale").unwrap();
        write_extra_model_paths(Some(Path::new("/root/models")), None, &out).unwrap();
        let written = std::fs::read_to_string(&out).unwrap();
        assert_eq!(
            written,
            render_extra_model_paths(Path::new("/root/models")).unwrap()
        );
    }

    #[test]
    fn an_unwritable_destination_names_the_file() {
        let error = write_extra_model_paths(
            Some(Path::new("/root/models")),
            None,
            Path::new("/nonexistent-dir/extra.yaml"),
        )
        .unwrap_err();
        assert!(
            format!("{error:#}").contains("/nonexistent-dir"),
            "{error:#}"
        );
    }
}
