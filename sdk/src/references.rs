//! Files a request names by reference (contract 0.3): a model file (a character's LoRA)
//! or an image given as an https URL or an uploaded asset, with optional digests. The
//! plugin only *says* what it needs ([`ModelFetch`], [`ImageSource::File`]); the host
//! fetches through its destination guard, checks the bytes and places the file. A plugin
//! never opens files or sockets.
//!
//! In a request a reference is a JSON object with exactly one of `url` and `asset`, and
//! optionally `sha256` and/or `blake3` ([`FileReference`], its schema [`schema`]):
//!
//! ```json
//! {"url": "https://files.example.com/alice.safetensors", "sha256": "9f86d0…"}
//! {"asset": "3f1c2a9e-…"}                    // an /api/v2/assets upload, by id
//! {"asset": "blake3:5e3c…"}                  // … or by content hash
//! ```

use serde::Deserialize;
use serde_json::json;

use crate::decode::Checks;
use crate::{FileRef, FileSource, ImageSource, ModelFetch};

/// Longest URL or asset reference accepted.
pub const MAX_REFERENCE_CHARS: usize = 2048;

/// A file reference as a request carries it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileReference {
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub asset: Option<String>,
    #[serde(default)]
    pub sha256: Option<String>,
    #[serde(default)]
    pub blake3: Option<String>,
}

fn is_digest(value: &str, algorithm: &str) -> bool {
    let bare = value
        .strip_prefix(algorithm)
        .and_then(|v| v.strip_prefix(':'))
        .unwrap_or(value);
    bare.len() == 64 && bare.chars().all(|c| c.is_ascii_hexdigit())
}

impl FileReference {
    /// Record what is wrong with the reference under `field` (`field/url`, ...). The host
    /// checks the URL's destination and the asset's existence itself.
    pub fn check(&self, field: &str, checks: &mut Checks) {
        match (&self.url, &self.asset) {
            (Some(_), Some(_)) => {
                checks.fail(field, "give either `url` or `asset`, not both");
            }
            (None, None) => {
                checks.fail(
                    field,
                    "give `url` (an https URL) or `asset` (an uploaded asset's id or blake3 hash)",
                );
            }
            (Some(url), None)
                if url.trim().is_empty() || url.chars().count() > MAX_REFERENCE_CHARS =>
            {
                checks.fail(
                    &format!("{field}/url"),
                    format!("must be a URL of 1 to {MAX_REFERENCE_CHARS} characters"),
                );
            }
            (None, Some(asset))
                if asset.trim().is_empty() || asset.chars().count() > MAX_REFERENCE_CHARS =>
            {
                checks.fail(
                    &format!("{field}/asset"),
                    "must be an asset's id (a UUID) or its content hash (blake3:<64 hex>)",
                );
            }
            _ => {}
        }
        for (name, value) in [("sha256", &self.sha256), ("blake3", &self.blake3)] {
            if let Some(value) = value
                && !is_digest(value, name)
            {
                checks.fail(
                    &format!("{field}/{name}"),
                    format!("must be the file's {name} as 64 hexadecimal digits"),
                );
            }
        }
    }

    /// The contract's form (call after [`check`](Self::check) passed).
    pub fn to_file_ref(&self) -> FileRef {
        let source = match (&self.url, &self.asset) {
            (Some(url), _) => FileSource::Url(url.clone()),
            (None, asset) => FileSource::Asset(asset.clone().unwrap_or_default()),
        };
        FileRef {
            source,
            sha256: self.sha256.clone(),
            blake3: self.blake3.clone(),
        }
    }
}

/// The JSON Schema of a file reference field.
pub fn schema(description: &str) -> serde_json::Value {
    let digest = |algorithm: &str| json!({"type": "string", "pattern": format!("^({algorithm}:)?[0-9a-fA-F]{{64}}$"), "description": format!("The file's {algorithm} (64 hex digits); the request fails with 422 if the bytes differ.")});
    json!({
        "type": "object",
        "description": description,
        "properties": {
            "url": {"type": "string", "minLength": 1, "maxLength": MAX_REFERENCE_CHARS, "description": "An https URL the server fetches (once per server; public addresses only)."},
            "asset": {"type": "string", "minLength": 1, "maxLength": MAX_REFERENCE_CHARS, "description": "An asset uploaded to /api/v2/assets: its id or its content hash (blake3:<64 hex>)."},
            "sha256": digest("sha256"),
            "blake3": digest("blake3"),
        },
        "additionalProperties": false,
        "minProperties": 1,
    })
}

/// The placeholder a plugin writes where the host puts a fetched model's name
/// (`{field}@fetch`); [`crate::graph::Graph::model_set`] reads it into the model set, and
/// the host replaces both with the cached file's name.
pub fn placeholder(field: &str) -> String {
    format!("{field}@fetch")
}

/// Ask the host to fetch the model `reference` (from request field `field`) into model
/// folder `folder` and write its name into `workflow[node_id].inputs[input_name]`, where the
/// plugin put [`placeholder`]`(field)`.
pub fn model_fetch(
    field: &str,
    folder: &str,
    reference: &FileReference,
    node_id: &str,
    input_name: &str,
) -> ModelFetch {
    ModelFetch {
        field: field.to_string(),
        folder: folder.to_string(),
        file: reference.to_file_ref(),
        node_id: node_id.to_string(),
        input_name: input_name.to_string(),
    }
}

/// An image the host fetches (an upload's source).
pub fn image_source(reference: &FileReference) -> ImageSource {
    ImageSource::File(reference.to_file_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(url: Option<&str>, asset: Option<&str>, sha256: Option<&str>) -> FileReference {
        FileReference {
            url: url.map(str::to_owned),
            asset: asset.map(str::to_owned),
            sha256: sha256.map(str::to_owned),
            blake3: None,
        }
    }

    fn problems(r: &FileReference) -> Vec<String> {
        let mut checks = Checks::new();
        r.check("lora", &mut checks);
        match checks.finish() {
            Ok(()) => vec![],
            Err(crate::BuildError::InvalidRequest(errors)) => {
                errors.into_iter().map(|e| e.field).collect()
            }
            Err(other) => panic!("{other:?}"),
        }
    }

    #[test]
    fn exactly_one_source_and_well_formed_digests() {
        assert!(
            problems(&reference(
                Some("https://x/y.safetensors"),
                None,
                Some(&"a".repeat(64))
            ))
            .is_empty()
        );
        assert!(
            problems(&reference(
                None,
                Some("blake3:abc"),
                Some(&format!("sha256:{}", "A".repeat(64)))
            ))
            .is_empty()
        );
        assert_eq!(
            problems(&reference(Some("https://x"), Some("y"), None)),
            ["lora"]
        );
        assert_eq!(problems(&reference(None, None, None)), ["lora"]);
        assert_eq!(
            problems(&reference(Some("https://x"), None, Some("abc"))),
            ["lora/sha256"]
        );
    }

    #[test]
    fn the_contract_form_keeps_source_and_digests() {
        let r = reference(
            None,
            Some("3f1c2a9e-0000-4000-8000-000000000000"),
            Some(&"b".repeat(64)),
        );
        let file = r.to_file_ref();
        assert_eq!(
            file.source,
            FileSource::Asset("3f1c2a9e-0000-4000-8000-000000000000".into())
        );
        assert_eq!(file.sha256.as_deref(), Some("b".repeat(64).as_str()));
        let fetch = model_fetch("lora", "loras", &r, "5", "lora_name");
        assert_eq!(
            (
                fetch.node_id.as_str(),
                fetch.input_name.as_str(),
                fetch.folder.as_str()
            ),
            ("5", "lora_name", "loras")
        );
        assert_eq!(placeholder("lora"), "lora@fetch");
    }
}
