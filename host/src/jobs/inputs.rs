//! Resolving the images a job uploads: bytes a plugin decoded, or a path on the
//! inputs volume that the *host* opens, because plugins never touch files.
//! Paths are confined to the volume: absolute paths, `..`, and symlinks leading
//! out are refused; absent files are `not_found` naming the request field.

use std::path::{Component, Path, PathBuf};

use super::failure::JobFailure;
use crate::media::sniff_media_type;
use crate::plugins::{PluginUpload, UploadSource};

/// Largest image read from the inputs volume.
pub const MAX_INPUT_IMAGE_BYTES: u64 = 32 << 20;

/// The bytes of an upload, checked to be an image.
pub fn upload_bytes(upload: &PluginUpload, inputs: Option<&Path>) -> Result<Vec<u8>, JobFailure> {
    let bytes = match &upload.source {
        UploadSource::Bytes(bytes) => bytes.clone(),
        UploadSource::InputPath(relative) => {
            let path = resolve_input_path(inputs, relative, &upload.field)?;
            let meta = std::fs::metadata(&path).map_err(|_| missing(&upload.field, relative))?;
            if meta.len() > MAX_INPUT_IMAGE_BYTES {
                return Err(invalid(&upload.field, format!("{relative} is {} bytes; the limit is {MAX_INPUT_IMAGE_BYTES}", meta.len())));
            }
            std::fs::read(&path).map_err(|_| missing(&upload.field, relative))?
        }
        // Fetched by the host before (`JobService::fetch_image`), never read from here.
        UploadSource::File(_) => return Err(JobFailure::internal(format!("{}: a fetched image reached the file reader", upload.field))),
    };
    check_image(&upload.field, bytes)
}

/// `bytes` if they are an image, else a 400 naming `field`.
pub fn check_image(field: &str, bytes: Vec<u8>) -> Result<Vec<u8>, JobFailure> {
    if !sniff_media_type(&bytes).starts_with("image/") {
        return Err(invalid(field, "is not a PNG, JPEG, WEBP or GIF image".to_string()));
    }
    Ok(bytes)
}

/// `relative` inside `inputs`, or a 400/404 naming `field`.
pub fn resolve_input_path(inputs: Option<&Path>, relative: &str, field: &str) -> Result<PathBuf, JobFailure> {
    let Some(root) = inputs else {
        return Err(invalid(field, "paths need an inputs volume, and none is configured (--inputs); send a data: URL instead".into()));
    };
    let candidate = Path::new(relative);
    let lexically_safe = !relative.is_empty()
        && !relative.contains('\0')
        && candidate.components().all(|c| matches!(c, Component::Normal(_)));
    if !lexically_safe {
        return Err(invalid(field, format!("{relative:?} must be a relative path inside the inputs volume, without '..'")));
    }
    let joined = root.join(candidate);
    // Symlinks may point anywhere: compare real paths.
    let real_root = root.canonicalize().map_err(|_| missing(field, relative))?;
    let real = joined.canonicalize().map_err(|_| missing(field, relative))?;
    if !real.starts_with(&real_root) {
        return Err(invalid(field, format!("{relative:?} leads outside the inputs volume")));
    }
    if !real.is_file() {
        return Err(missing(field, relative));
    }
    Ok(real)
}

fn missing(field: &str, relative: &str) -> JobFailure {
    JobFailure::Input { field: field.to_string(), message: format!("{relative} does not exist in the inputs volume"), not_found: true }
}

fn invalid(field: &str, message: String) -> JobFailure {
    JobFailure::Input { field: field.to_string(), message, not_found: false }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_traversal_out_of_the_inputs_volume_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret.png"), b"\x89PNG....").unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink(outside.path().join("secret.png"), root.path().join("link.png")).unwrap();
        for bad in ["../secret.png", "/etc/passwd", "a/../../secret.png", "", "link.png"] {
            let err = resolve_input_path(Some(root.path()), bad, "reference_image").unwrap_err();
            assert!(matches!(&err, JobFailure::Input { field, not_found: false, .. } if field == "reference_image"), "{bad}: {err:?}");
        }
    }

    #[test]
    fn absent_file_is_a_404_naming_the_field() {
        let root = tempfile::tempdir().unwrap();
        let err = resolve_input_path(Some(root.path()), "faces/nobody.png", "reference_image").unwrap_err();
        assert!(matches!(&err, JobFailure::Input { not_found: true, message, .. } if message.contains("faces/nobody.png")), "{err:?}");
    }

    #[test]
    fn a_file_inside_resolves_and_must_be_an_image() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("faces")).unwrap();
        std::fs::write(root.path().join("faces/a.png"), b"\x89PNG\r\n\x1a\n").unwrap();
        std::fs::write(root.path().join("faces/a.txt"), b"hello").unwrap();
        assert!(resolve_input_path(Some(root.path()), "faces/a.png", "f").is_ok());
        let upload = |p: &str| PluginUpload {
            field: "f".into(),
            filename: "x.png".into(),
            source: UploadSource::InputPath(p.into()),
            node_id: "1".into(),
            input_name: "image".into(),
        };
        assert!(upload_bytes(&upload("faces/a.png"), Some(root.path())).is_ok());
        let err = upload_bytes(&upload("faces/a.txt"), Some(root.path())).unwrap_err();
        assert!(matches!(err, JobFailure::Input { not_found: false, .. }));
    }
}
