//! The model manifest: which files `flowhost models pull` fetches from Hugging Face and where
//! each one lands on the models volume (`{models}/{folder}/{name}`).
//!
//! Owns parsing and validation of the manifest (JSON) and the shipped default manifest
//! (`models/manifest.json`, embedded at build time). It must never touch the network or the
//! file system beyond reading a manifest file: downloading is `pull`'s job. Validation refuses
//! anything that could write outside the models directory (`..`, absolute paths).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Deserialize;

/// The manifest shipped with flowhost (Flux Dev, its encoders, InstantID, antelopev2, SDXL base).
pub const SHIPPED_MANIFEST: &str = include_str!("../../../models/manifest.json");

/// Where a manifest came from, for error messages.
pub const SHIPPED_MANIFEST_NAME: &str = "<shipped models/manifest.json>";

/// A list of files to download.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Free text for people reading the file; ignored.
    #[serde(default, rename = "$comment")]
    pub comment: Option<serde_json::Value>,
    pub files: Vec<ModelFile>,
}

/// One file: where it lives on Hugging Face and where it goes on the models volume.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelFile {
    /// Hugging Face repository, `owner/name`.
    pub repo: String,
    /// Path of the file inside the repository (may contain `/`).
    pub path: String,
    /// Branch, tag or commit; `main` when absent.
    #[serde(default = "default_revision")]
    pub revision: String,
    /// Folder under the models directory (`diffusion_models`, `controlnet/instantid`, ...).
    pub folder: String,
    /// Installed file name; the last segment of `path` when absent.
    #[serde(default)]
    pub name: Option<String>,
    /// Expected SHA-256 (hex). Absent when nobody has verified it; the server's LFS object id
    /// is then used when it advertises one.
    #[serde(default)]
    pub sha256: Option<String>,
    /// Expected size in bytes, when known.
    #[serde(default)]
    pub size: Option<u64>,
    /// A set this file belongs to (`flux-dev`, `instantid`, ...), selectable with `--only`.
    #[serde(default)]
    pub group: Option<String>,
    /// Free text (licence, provenance); ignored by the puller.
    #[serde(default)]
    pub note: Option<String>,
}

fn default_revision() -> String {
    "main".to_owned()
}

impl ModelFile {
    /// The installed file name.
    pub fn file_name(&self) -> &str {
        match &self.name {
            Some(name) => name,
            None => self.path.rsplit('/').next().unwrap_or(&self.path),
        }
    }

    /// `folder/name`, relative to the models directory; how the file is named in messages.
    pub fn destination(&self) -> String {
        format!("{}/{}", self.folder.trim_end_matches('/'), self.file_name())
    }

    /// Absolute destination under `models_dir`.
    pub fn destination_in(&self, models_dir: &Path) -> PathBuf {
        let mut path = models_dir.to_path_buf();
        for segment in self.folder.split('/').filter(|s| !s.is_empty()) {
            path.push(segment);
        }
        path.push(self.file_name());
        path
    }

    /// `repo/path@revision`, how the source is named in messages.
    pub fn source(&self) -> String {
        format!("{}/{}@{}", self.repo, self.path, self.revision)
    }

    /// Does `--only SELECTOR` pick this file? Matches the installed name, `folder/name`,
    /// the group, or the repository.
    pub fn matches(&self, selector: &str) -> bool {
        selector == self.file_name()
            || selector == self.destination()
            || self.group.as_deref() == Some(selector)
            || selector == self.repo
    }

    fn validate(&self) -> anyhow::Result<()> {
        let mut repo_parts = self.repo.split('/');
        let (owner, name) = (repo_parts.next(), repo_parts.next());
        let repo_ok = matches!((owner, name, repo_parts.next()), (Some(o), Some(n), None) if is_repo_part(o) && is_repo_part(n));
        if !repo_ok {
            bail!("repo {:?} is not of the form owner/name", self.repo);
        }
        check_relative(&self.path, "path")?;
        check_relative(&self.folder, "folder")?;
        if self.revision.is_empty() || self.revision.chars().any(char::is_whitespace) {
            bail!(
                "revision {:?} is empty or contains whitespace",
                self.revision
            );
        }
        let file_name = self.file_name();
        if file_name.is_empty()
            || file_name == "."
            || file_name == ".."
            || file_name.contains(['/', '\\'])
        {
            bail!("name {file_name:?} is not a plain file name");
        }
        if file_name.ends_with(".part") {
            bail!("name {file_name:?} ends with .part, which pull reserves for partial downloads");
        }
        if let Some(sha) = &self.sha256
            && !(sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            bail!("sha256 {sha:?} is not 64 hex digits");
        }
        Ok(())
    }
}

fn is_repo_part(part: &str) -> bool {
    !part.is_empty()
        && part != "."
        && part != ".."
        && part
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// A relative path of plain segments: no leading `/`, no `..`, no `.`, no empty segment.
fn check_relative(value: &str, field: &str) -> anyhow::Result<()> {
    let trimmed = value.strip_suffix('/').unwrap_or(value);
    if trimmed.is_empty() || trimmed.starts_with('/') || trimmed.contains('\\') {
        bail!("{field} {value:?} must be a non-empty relative path");
    }
    if trimmed
        .split('/')
        .any(|seg| seg.is_empty() || seg == "." || seg == "..")
    {
        bail!("{field} {value:?} must not contain empty, '.' or '..' segments");
    }
    Ok(())
}

impl Manifest {
    /// Parse and validate a manifest; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> anyhow::Result<Manifest> {
        let mut manifest: Manifest = serde_json::from_str(text)
            .with_context(|| format!("parsing model manifest {origin}"))?;
        let mut destinations = HashSet::new();
        for (index, file) in manifest.files.iter_mut().enumerate() {
            if let Some(sha) = &mut file.sha256 {
                *sha = sha.to_ascii_lowercase();
            }
            file.validate().with_context(|| {
                format!(
                    "model manifest {origin}: files[{index}] ({})",
                    file.source()
                )
            })?;
            if !destinations.insert(file.destination()) {
                bail!(
                    "model manifest {origin}: files[{index}] installs {} a second time",
                    file.destination()
                );
            }
        }
        Ok(manifest)
    }

    /// The manifest shipped with flowhost.
    pub fn shipped() -> anyhow::Result<Manifest> {
        Manifest::parse(SHIPPED_MANIFEST, SHIPPED_MANIFEST_NAME)
    }

    /// Read and validate a manifest file.
    pub fn load(path: &Path) -> anyhow::Result<Manifest> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading model manifest {}", path.display()))?;
        Manifest::parse(&text, &path.display().to_string())
    }

    /// The files picked by `--only` selectors (all files when `selectors` is empty). A selector
    /// that matches nothing is an error listing what exists, so a typo never silently pulls nothing.
    pub fn select(&self, selectors: &[String]) -> anyhow::Result<Vec<ModelFile>> {
        if selectors.is_empty() {
            return Ok(self.files.clone());
        }
        let unknown: Vec<&str> = selectors
            .iter()
            .filter(|sel| !self.files.iter().any(|f| f.matches(sel)))
            .map(String::as_str)
            .collect();
        if !unknown.is_empty() {
            let mut groups: Vec<&str> = self
                .files
                .iter()
                .filter_map(|f| f.group.as_deref())
                .collect();
            groups.dedup();
            let names: Vec<&str> = self.files.iter().map(ModelFile::file_name).collect();
            bail!(
                "--only {} matches no file in the manifest; groups: {}; files: {}",
                unknown.join(", "),
                groups.join(", "),
                names.join(", ")
            );
        }
        Ok(self
            .files
            .iter()
            .filter(|f| selectors.iter().any(|s| f.matches(s)))
            .cloned()
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(file: &str) -> String {
        format!(r#"{{"files": [{file}]}}"#)
    }

    #[test]
    fn shipped_manifest_is_valid_and_covers_the_seed_models() {
        let manifest = Manifest::shipped().unwrap();
        let destinations: Vec<String> = manifest.files.iter().map(ModelFile::destination).collect();
        for expected in [
            "diffusion_models/flux1-dev.safetensors",
            "vae/ae.safetensors",
            "text_encoders/clip_l.safetensors",
            "text_encoders/t5xxl_fp16.safetensors",
            "instantid/ip-adapter.bin",
            "controlnet/instantid/diffusion_pytorch_model.safetensors",
            "insightface/models/antelopev2/glintr100.onnx",
            "insightface/models/antelopev2/scrfd_10g_bnkps.onnx",
            "checkpoints/sd_xl_base_1.0.safetensors",
        ] {
            assert!(
                destinations.iter().any(|d| d == expected),
                "{expected} missing from {destinations:?}"
            );
        }
    }

    #[test]
    fn name_defaults_to_last_path_segment() {
        let m = Manifest::parse(
            &one(r#"{"repo":"a/b","path":"x/y.bin","folder":"f/g"}"#),
            "t",
        )
        .unwrap();
        assert_eq!(m.files[0].destination(), "f/g/y.bin");
        assert_eq!(m.files[0].revision, "main");
        assert_eq!(
            m.files[0].destination_in(Path::new("/m")),
            PathBuf::from("/m/f/g/y.bin")
        );
    }

    #[test]
    fn paths_escaping_the_models_dir_are_refused() {
        for bad in [
            r#"{"repo":"a/b","path":"y.bin","folder":"../etc"}"#,
            r#"{"repo":"a/b","path":"y.bin","folder":"/abs"}"#,
            r#"{"repo":"a/b","path":"y.bin","folder":"f","name":"../y"}"#,
            r#"{"repo":"a/b","path":"../y.bin","folder":"f"}"#,
            r#"{"repo":"a/../b","path":"y.bin","folder":"f"}"#,
        ] {
            assert!(Manifest::parse(&one(bad), "t").is_err(), "accepted {bad}");
        }
    }

    #[test]
    fn bad_sha_and_duplicates_are_refused() {
        let bad_sha = one(r#"{"repo":"a/b","path":"y.bin","folder":"f","sha256":"abc"}"#);
        assert!(format!("{:#}", Manifest::parse(&bad_sha, "t").unwrap_err()).contains("64 hex"));
        let dup = r#"{"files":[{"repo":"a/b","path":"y.bin","folder":"f"},{"repo":"c/d","path":"z/y.bin","folder":"f"}]}"#;
        assert!(format!("{:#}", Manifest::parse(dup, "t").unwrap_err()).contains("f/y.bin"));
    }

    #[test]
    fn select_by_group_name_or_destination_and_unknown_is_an_error() {
        let m = Manifest::parse(
            r#"{"files":[{"repo":"a/b","path":"y.bin","folder":"f","group":"g1"},{"repo":"a/b","path":"z.bin","folder":"f"}]}"#,
            "t",
        )
        .unwrap();
        assert_eq!(m.select(&["g1".into()]).unwrap().len(), 1);
        assert_eq!(
            m.select(&["f/z.bin".into()]).unwrap()[0].file_name(),
            "z.bin"
        );
        assert_eq!(m.select(&[]).unwrap().len(), 2);
        let err = format!("{:#}", m.select(&["nope".into()]).unwrap_err());
        assert!(
            err.contains("nope") && err.contains("g1") && err.contains("z.bin"),
            "{err}"
        );
    }
}
