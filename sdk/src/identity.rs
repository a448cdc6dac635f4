//! The reference-face handling the identity endpoints share (`/flux-instantid`,
//! `/flux-pulid`): the `reference_image` field (schema, parsing, the `LoadImage` node and
//! the upload the host performs), the `face_provider` field, the InsightFace antelopev2
//! models both node packs load, and the 422 a reference without a face becomes.
//!
//! Owns the wording and limits of those two fields for every identity route. Must never
//! open files or fetch URLs: a data URL is decoded here, an inputs-volume path is handed
//! to the host as it is.

use serde::Deserialize;
use serde_json::{Value, json};

use crate::decode::Checks;
use crate::graph::{Graph, Link};
use crate::image::{DEFAULT_MAX_IMAGE_BYTES, ImageInput, parse_image_input};
use crate::{Upload, UserError};

/// The request field holding the reference face.
pub const REFERENCE_FIELD: &str = "reference_image";

/// InsightFace antelopev2, which both packs load from `<ComfyUI>/models/insightface`.
/// Declared for readiness: the host's listing of `insightface/` is the source of truth.
pub const ANTELOPEV2_DETECTOR: &[(&str, &str)] =
    &[("insightface", "models/antelopev2/scrfd_10g_bnkps.onnx")];
pub const ANTELOPEV2_RECOGNITION: &[(&str, &str)] =
    &[("insightface", "models/antelopev2/glintr100.onnx")];
/// The other three antelopev2 files `FaceAnalysis` loads (it runs every model it finds).
pub const ANTELOPEV2_LANDMARKS_3D: &[(&str, &str)] =
    &[("insightface", "models/antelopev2/1k3d68.onnx")];
pub const ANTELOPEV2_LANDMARKS_2D: &[(&str, &str)] =
    &[("insightface", "models/antelopev2/2d106det.onnx")];
pub const ANTELOPEV2_GENDERAGE: &[(&str, &str)] =
    &[("insightface", "models/antelopev2/genderage.onnx")];

/// Which device InsightFace runs on. `GPU` is an alias of `CUDA`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum FaceProvider {
    #[default]
    #[serde(rename = "CPU")]
    Cpu,
    #[serde(rename = "GPU")]
    Gpu,
    #[serde(rename = "CUDA")]
    Cuda,
}

impl FaceProvider {
    /// The value the request used.
    pub fn as_str(self) -> &'static str {
        match self {
            FaceProvider::Cpu => "CPU",
            FaceProvider::Gpu => "GPU",
            FaceProvider::Cuda => "CUDA",
        }
    }

    /// The value both packs' face-analysis loaders take (`CPU` or `CUDA`).
    pub fn node_value(self) -> &'static str {
        match self {
            FaceProvider::Cpu => "CPU",
            FaceProvider::Gpu | FaceProvider::Cuda => "CUDA",
        }
    }
}

/// JSON Schema of `reference_image`.
pub fn reference_schema() -> Value {
    json!({"type": "string", "minLength": 1,
           "description": "The face to keep: a `data:image/(jpeg|png|webp);base64,...` URL (at most 10 MiB decoded), an https URL the server fetches (public addresses only, at most 32 MiB), or a path relative to the inputs volume. With several faces the largest is used."})
}

/// JSON Schema of `face_provider`.
pub fn face_provider_schema() -> Value {
    json!({"type": "string", "enum": ["CPU", "GPU", "CUDA"], "default": "CPU", "description": "Where face analysis runs; GPU means CUDA."})
}

/// Parse `reference_image`; a problem is recorded in `checks` under the field's name.
pub fn parse_reference(checks: &mut Checks, value: &str) -> Option<ImageInput> {
    match parse_image_input(REFERENCE_FIELD, value, DEFAULT_MAX_IMAGE_BYTES) {
        Ok(reference) => Some(reference),
        Err(error) => {
            checks.fail(&error.field, error.message);
            None
        }
    }
}

/// Add the `LoadImage` node of the reference and the upload that fills it (the host
/// uploads the image and writes its name into `image`). Returns the node's IMAGE.
pub fn add_reference(g: &mut Graph, reference: ImageInput) -> (Link, Upload) {
    let node = g.node("LoadImage", json!({"image": "reference.png"}));
    let upload = reference.into_upload(REFERENCE_FIELD, "reference", node.as_str(), "image");
    (node.out(0), upload)
}

/// The 422 for a reference in which the face analysis found no face.
pub fn no_face_error() -> UserError {
    UserError {
        status: 422,
        title: "No face detected".into(),
        detail: "No face was found in reference_image. Send a clear, well-lit photo in which one face is fully visible."
            .into(),
        field: Some(REFERENCE_FIELD.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ImageSource;
    use crate::image::samples::{data_url, png_header};

    #[test]
    fn the_reference_becomes_one_load_image_and_its_upload() {
        let mut g = Graph::new();
        let mut checks = Checks::new();
        let reference =
            parse_reference(&mut checks, &data_url("image/png", &png_header(64, 64))).unwrap();
        let (image, upload) = add_reference(&mut g, reference);
        let graph = g.into_json();
        let id = image.node.clone();
        assert_eq!(graph[&id]["class_type"], "LoadImage");
        assert_eq!(
            (upload.node_id.as_str(), upload.input_name.as_str()),
            (id.as_str(), "image")
        );
        assert_eq!(
            (upload.field.as_str(), upload.filename.as_str()),
            ("reference_image", "reference.png")
        );
        assert!(matches!(upload.source, ImageSource::Bytes(_)));
    }

    #[test]
    fn a_bad_reference_names_the_field() {
        let mut checks = Checks::new();
        assert!(parse_reference(&mut checks, "../x.png").is_none());
        assert_eq!(checks.errors()[0].field, "reference_image");
        assert_eq!(no_face_error().field.as_deref(), Some("reference_image"));
    }
}
