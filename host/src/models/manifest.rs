//! The model manifest: which files `flowhost models pull` fetches, from a Hugging Face repository
//! (`repo` + `path`) or a direct `url` (facexlib's weights are GitHub release assets), and where
//! each one lands on the models volume (`{models}/{folder}/{name}`).
//!
//! Owns parsing and validation of the manifest (JSON) and the shipped default manifest
//! (`models/manifest.json`, embedded at build time). It must never touch the network or the
//! file system beyond reading a manifest file: downloading is `pull`'s job. Validation refuses
//! anything that could write outside the models directory (`..`, absolute paths), an entry that
//! names both sources or neither, a `url` that is not https (http only to a loopback host, for
//! local mirrors and tests) and a `url` carrying credentials (they would end up in logs).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Deserialize;

/// The manifest shipped with flowhost (Flux Dev, its encoders, InstantID, antelopev2, SDXL base,
/// PuLID-Flux with EVA02-CLIP and facexlib).
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

/// One file: where it is downloaded from and where it goes on the models volume. The source is
/// either a Hugging Face file (`repo` + `path`, optionally `revision`) or a direct `url`, never
/// both (checked by [`Manifest::parse`]).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelFile {
    /// Hugging Face repository, `owner/name`.
    #[serde(default)]
    pub repo: Option<String>,
    /// Path of the file inside the repository (may contain `/`).
    #[serde(default)]
    pub path: Option<String>,
    /// Branch, tag or commit; `main` when absent (see [`ModelFile::revision`]).
    #[serde(default)]
    pub revision: Option<String>,
    /// A direct download URL (https), for files that are not on Hugging Face. The Hugging Face
    /// token is never sent to it.
    #[serde(default)]
    pub url: Option<String>,
    /// Folder under the models directory (`diffusion_models`, `controlnet/instantid`, ...).
    pub folder: String,
    /// Installed file name; the last segment of `path` (or of the URL's path) when absent.
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

impl ModelFile {
    /// The installed file name.
    pub fn file_name(&self) -> &str {
        if let Some(name) = &self.name {
            return name;
        }
        match (&self.url, &self.path) {
            (Some(url), _) => url_last_segment(url),
            (None, Some(path)) => path.rsplit('/').next().unwrap_or(path),
            (None, None) => "",
        }
    }

    /// The Hugging Face revision: `main` when the manifest names none.
    pub fn revision(&self) -> &str {
        self.revision.as_deref().unwrap_or("main")
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

    /// How the source is named in messages: `repo/path@revision`, or the URL (without any
    /// credentials, which validation refuses anyway).
    pub fn source(&self) -> String {
        match &self.url {
            Some(url) => match url::Url::parse(url) {
                Ok(mut parsed) => {
                    let _ = parsed.set_username("");
                    let _ = parsed.set_password(None);
                    parsed.to_string()
                }
                Err(_) => url.clone(),
            },
            None => format!(
                "{}/{}@{}",
                self.repo.as_deref().unwrap_or(""),
                self.path.as_deref().unwrap_or(""),
                self.revision()
            ),
        }
    }

    /// Does `--only SELECTOR` pick this file? Matches the installed name, `folder/name`,
    /// the group, the repository or the URL.
    pub fn matches(&self, selector: &str) -> bool {
        selector == self.file_name()
            || selector == self.destination()
            || self.group.as_deref() == Some(selector)
            || self.repo.as_deref() == Some(selector)
            || self.url.as_deref() == Some(selector)
    }

    fn validate(&self) -> anyhow::Result<()> {
        match (&self.url, &self.repo, &self.path) {
            (Some(url), None, None) => {
                if self.revision.is_some() {
                    bail!("revision applies to repo + path only, not to url");
                }
                check_url(url, self.name.is_some())?;
            }
            (Some(_), _, _) => {
                bail!("gives both url and repo/path: name exactly one source")
            }
            (None, Some(repo), Some(path)) => {
                let mut repo_parts = repo.split('/');
                let (owner, name) = (repo_parts.next(), repo_parts.next());
                let repo_ok = matches!((owner, name, repo_parts.next()), (Some(o), Some(n), None) if is_repo_part(o) && is_repo_part(n));
                if !repo_ok {
                    bail!("repo {repo:?} is not of the form owner/name");
                }
                check_relative(path, "path")?;
                let revision = self.revision();
                if revision.is_empty() || revision.chars().any(char::is_whitespace) {
                    bail!("revision {revision:?} is empty or contains whitespace");
                }
            }
            (None, _, _) => {
                bail!("names no source: give url, or repo and path")
            }
        }
        check_relative(&self.folder, "folder")?;
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

/// The raw last path segment of a URL (no query or fragment); `check_url` makes sure it is the
/// file's name (or that the manifest names the file).
fn url_last_segment(url: &str) -> &str {
    let url = url.split('#').next().unwrap_or(url);
    let url = url.split('?').next().unwrap_or(url);
    match url.split_once("://") {
        Some((_, rest)) => match rest.split_once('/') {
            Some((_, path)) => path.rsplit('/').next().unwrap_or(""),
            None => "",
        },
        None => "",
    }
}

/// A download URL: https, or http to a loopback host (a local mirror or a test server); no
/// credentials; a file name at the end of its path unless the entry names the file.
fn check_url(url: &str, has_name: bool) -> anyhow::Result<()> {
    // The URL is not echoed in these errors: it may carry a password.
    let parsed = url::Url::parse(url).map_err(|err| anyhow::anyhow!("url is not a URL: {err}"))?;
    let loopback = match parsed.host() {
        Some(url::Host::Domain(domain)) => domain.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    };
    match parsed.scheme() {
        "https" if parsed.host().is_some() => {}
        "http" if loopback => {}
        _ => bail!("url must be https (http only to a loopback host)"),
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        bail!("url must not carry credentials (user:password@); they would be logged");
    }
    let last = parsed
        .path_segments()
        .and_then(|mut segments| segments.next_back())
        .unwrap_or("");
    if !has_name {
        if last.is_empty() {
            bail!("url does not end in a file name: set name");
        }
        if url_last_segment(url).contains('%') {
            bail!("url's file name is percent-encoded: set name");
        }
    }
    Ok(())
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
    fn shipped_manifest_pulls_facexlib_from_its_github_releases_in_group_pulid() {
        let manifest = Manifest::shipped().unwrap();
        let pulid = manifest.select(&["pulid".into()]).unwrap();
        for (destination, url) in [
            (
                "facexlib/detection_Resnet50_Final.pth",
                "https://github.com/xinntao/facexlib/releases/download/v0.1.0/detection_Resnet50_Final.pth",
            ),
            (
                "facexlib/parsing_bisenet.pth",
                "https://github.com/xinntao/facexlib/releases/download/v0.2.0/parsing_bisenet.pth",
            ),
        ] {
            let file = pulid
                .iter()
                .find(|f| f.destination() == destination)
                .unwrap_or_else(|| panic!("{destination} missing from group pulid"));
            assert_eq!(file.url.as_deref(), Some(url));
            assert_eq!(file.source(), url);
        }
    }

    #[test]
    fn url_form_is_accepted_named_after_the_url_path_and_selectable_by_url() {
        let url =
            "https://github.com/xinntao/facexlib/releases/download/v0.2.0/parsing_bisenet.pth";
        let m = Manifest::parse(
            &one(&format!(
                r#"{{"url":"{url}","folder":"facexlib","group":"pulid"}}"#
            )),
            "t",
        )
        .unwrap();
        assert_eq!(m.files[0].destination(), "facexlib/parsing_bisenet.pth");
        assert_eq!(m.files[0].source(), url);
        for selector in [
            url,
            "parsing_bisenet.pth",
            "facexlib/parsing_bisenet.pth",
            "pulid",
        ] {
            assert_eq!(m.select(&[selector.into()]).unwrap().len(), 1, "{selector}");
        }
        let with_query = Manifest::parse(
            &one(r#"{"url":"https://h.example/a/w.pth?download=1#x","folder":"f"}"#),
            "t",
        )
        .unwrap();
        assert_eq!(with_query.files[0].destination(), "f/w.pth");
        let named = Manifest::parse(
            &one(r#"{"url":"https://h.example/get/","folder":"f","name":"w.pth"}"#),
            "t",
        )
        .unwrap();
        assert_eq!(named.files[0].destination(), "f/w.pth");
        // Plain http only to a loopback host (a local mirror).
        for local in [
            "http://127.0.0.1:8080/w.pth",
            "http://localhost/w.pth",
            "http://[::1]/w.pth",
        ] {
            let entry = one(&format!(r#"{{"url":"{local}","folder":"f"}}"#));
            assert!(Manifest::parse(&entry, "t").is_ok(), "refused {local}");
        }
    }

    #[test]
    fn url_form_refusals_name_the_entry_and_the_reason() {
        for (bad, reason) in [
            (
                r#"{"url":"https://h.example/w.pth","repo":"a/b","path":"w.pth","folder":"f"}"#,
                "both url and repo/path",
            ),
            (
                r#"{"url":"https://h.example/w.pth","path":"w.pth","folder":"f"}"#,
                "both url and repo/path",
            ),
            (r#"{"folder":"f","name":"w.pth"}"#, "no source"),
            (r#"{"repo":"a/b","folder":"f"}"#, "no source"),
            (
                r#"{"url":"http://h.example/w.pth","folder":"f"}"#,
                "must be https",
            ),
            (
                r#"{"url":"ftp://h.example/w.pth","folder":"f"}"#,
                "must be https",
            ),
            (r#"{"url":"not a url","folder":"f"}"#, "not a URL"),
            (
                r#"{"url":"https://user:s3cret@h.example/w.pth","folder":"f"}"#,
                "credentials",
            ),
            (
                r#"{"url":"https://h.example/dir/","folder":"f"}"#,
                "set name",
            ),
            (
                r#"{"url":"https://h.example/w.pth","revision":"v1","folder":"f"}"#,
                "revision",
            ),
        ] {
            let manifest =
                format!(r#"{{"files":[{{"repo":"a/b","path":"ok.bin","folder":"f"}},{bad}]}}"#);
            let err = format!("{:#}", Manifest::parse(&manifest, "t").unwrap_err());
            assert!(
                err.contains("files[1]") && err.contains(reason),
                "{bad}: {err}"
            );
            assert!(!err.contains("s3cret"), "the password is echoed: {err}");
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
        assert_eq!(m.files[0].revision(), "main");
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
