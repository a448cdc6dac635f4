//! The asset API (what v2's `/assets` endpoints call): UUID records over
//! content-addressed blobs, hashed by the server (blake3), deduplicated, with an
//! `expected_hash` check, creation from a hash the server already has, ranged
//! reads, deletion and listing. Inputs uploaded here and outputs of jobs share
//! the one blob store and the one retention.
//!
//! Must never: trust a caller's hash (it is compared, never used as a name
//! before being validated), or delete a blob (the sweeper does, when unreferenced).

use std::time::SystemTime;

use bytes::Bytes;
use uuid::Uuid;

use super::blobs::{BlobError, hash_of, is_valid_hash};
use super::model::{Asset, AssetRole};
use super::service::JobService;

/// Why an asset operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssetError {
    #[error("no such asset")]
    NotFound,
    /// No blob with this hash is stored (v2 `blob_not_found`).
    #[error("no content with hash {0}")]
    BlobNotFound(String),
    /// The bytes do not hash to what the caller said (v2 `hash_mismatch`, 409).
    #[error("the content hashes to {actual}, not {expected}")]
    HashMismatch { expected: String, actual: String },
    /// Not a `blake3:<64 hex>` string.
    #[error("not a blake3 hash (blake3:<64 lowercase hex>)")]
    InvalidHash,
    /// The byte range starts past the end (416).
    #[error("range not satisfiable (size {size})")]
    RangeNotSatisfiable { size: u64 },
    #[error("asset store: {0}")]
    Unavailable(String),
}

fn unavailable(e: impl std::fmt::Display) -> AssetError {
    AssetError::Unavailable(e.to_string())
}

/// How many same-named uploads a name lookup considers (newest first) before giving up.
const NAMED_CANDIDATES: usize = 100;

/// Whether `caller` (an API key's name; `None` without keys) may read `asset`: the one
/// place the rule lives, so file-name references, `from-hash` and the asset routes agree.
/// Today every caller may read every asset (keys authenticate, they do not partition).
pub fn may_read(asset: &Asset, caller: Option<&str>) -> bool {
    let _ = (asset, caller);
    true
}

/// A new asset, and whether its bytes were new to the store (v2 `created_new`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedAsset {
    pub asset: Asset,
    pub created_new: bool,
}

impl JobService {
    /// Store uploaded bytes as a new asset. `expected_hash`, when given, must match.
    pub async fn put_asset(&self, bytes: Bytes, name: Option<String>, content_type: &str, expected_hash: Option<&str>) -> Result<CreatedAsset, AssetError> {
        if let Some(expected) = expected_hash {
            if !is_valid_hash(expected) {
                return Err(AssetError::InvalidHash);
            }
            let actual = hash_of(&bytes);
            if actual != expected {
                return Err(AssetError::HashMismatch { expected: expected.to_string(), actual });
            }
        }
        let size = bytes.len() as u64;
        let (hash, created_new) = self.blobs.put(bytes).await.map_err(unavailable)?;
        let asset = self.new_upload_record(hash, size, content_type, name);
        self.store.insert_asset(&asset).await.map_err(unavailable)?;
        Ok(CreatedAsset { asset, created_new })
    }

    /// A new asset over bytes the server already has (v2 `from-hash`).
    pub async fn asset_from_hash(&self, hash: &str, name: Option<String>, content_type: Option<&str>) -> Result<CreatedAsset, AssetError> {
        if !is_valid_hash(hash) {
            return Err(AssetError::InvalidHash);
        }
        if !self.blobs.exists(hash).await.map_err(unavailable)? {
            return Err(AssetError::BlobNotFound(hash.to_string()));
        }
        let existing = self.store.asset_by_hash(hash).await.map_err(unavailable)?;
        let size = match &existing {
            Some(a) => a.size_bytes,
            None => self.blobs.get(hash).await.map_err(unavailable)?.len() as u64,
        };
        let content_type = content_type.map(str::to_string).or_else(|| existing.as_ref().map(|a| a.content_type.clone())).unwrap_or_else(|| "application/octet-stream".into());
        let asset = self.new_upload_record(hash.to_string(), size, &content_type, name.or_else(|| existing.and_then(|a| a.name)));
        self.store.insert_asset(&asset).await.map_err(unavailable)?;
        Ok(CreatedAsset { asset, created_new: false })
    }

    /// The asset a file name refers to: the newest live upload whose `file_path` is `name`
    /// among those `caller` may read ([`may_read`]). What a plain string in an input-folder
    /// input of a v2 graph resolves to (newest wins: uploading `portrait.png` again
    /// replaces what `"portrait.png"` means, as placing a file under that name would).
    pub async fn upload_named(&self, name: &str, caller: Option<&str>) -> Result<Option<Asset>, AssetError> {
        let now = SystemTime::now();
        let candidates = self.store.uploads_named(name, NAMED_CANDIDATES).await.map_err(unavailable)?;
        Ok(candidates.into_iter().find(|a| a.expires_at.is_none_or(|at| at > now) && may_read(a, caller)))
    }

    /// An upload record over `hash` that `from-hash` with the same `hash` and `file_path`
    /// would duplicate (v2's "an identical reference already existed; returned as-is"):
    /// the newest live one named `name` (any name when `name` is `None`) that `caller` may read.
    pub async fn identical_reference(&self, hash: &str, name: Option<&str>, caller: Option<&str>) -> Result<Option<Asset>, AssetError> {
        if !is_valid_hash(hash) {
            return Err(AssetError::InvalidHash);
        }
        let now = SystemTime::now();
        let candidates = match name {
            Some(name) => self.store.uploads_named(name, NAMED_CANDIDATES).await.map_err(unavailable)?,
            None => self.store.asset_by_hash(hash).await.map_err(unavailable)?.filter(|a| a.role == AssetRole::Upload).into_iter().collect(),
        };
        let found = candidates.into_iter().find(|a| a.hash == hash && a.expires_at.is_none_or(|at| at > now) && may_read(a, caller));
        match found {
            // The blob must still be there (a record outliving its bytes is no reference).
            Some(asset) if self.blobs.exists(hash).await.map_err(unavailable)? => Ok(Some(asset)),
            _ => Ok(None),
        }
    }

    /// Whether bytes with this hash are stored (v2 `HEAD /assets/by-hash/{hash}`).
    pub async fn asset_exists_by_hash(&self, hash: &str) -> Result<bool, AssetError> {
        if !is_valid_hash(hash) {
            return Err(AssetError::InvalidHash);
        }
        let recorded = self.store.asset_by_hash(hash).await.map_err(unavailable)?.is_some();
        Ok(recorded && self.blobs.exists(hash).await.map_err(unavailable)?)
    }

    /// An asset's record.
    pub async fn get_asset(&self, id: Uuid) -> Result<Asset, AssetError> {
        self.store.get_asset(id).await.map_err(unavailable)?.ok_or(AssetError::NotFound)
    }

    /// An asset's bytes: all, or `range = (start, end_inclusive)` clamped to the size.
    pub async fn read_asset(&self, id: Uuid, range: Option<(u64, Option<u64>)>) -> Result<(Asset, Bytes), AssetError> {
        let asset = self.get_asset(id).await?;
        let bytes = match range {
            None => self.blobs.get(&asset.hash).await,
            Some((start, _)) if start >= asset.size_bytes => return Err(AssetError::RangeNotSatisfiable { size: asset.size_bytes }),
            Some((start, end)) => {
                let end = end.unwrap_or(u64::MAX).min(asset.size_bytes.saturating_sub(1));
                self.blobs.get_range(&asset.hash, start, end + 1 - start).await
            }
        };
        match bytes {
            Ok(b) => Ok((asset, b)),
            Err(BlobError::NotFound(h)) => Err(AssetError::BlobNotFound(h)),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// A presigned URL the asset's bytes can be fetched from directly, when the blob
    /// store hands those out (S3 with `--blob-presign`); `None`: stream them through.
    pub async fn asset_download_url(&self, asset: &Asset) -> Result<Option<String>, AssetError> {
        match self.blobs.presigned_get(&asset.hash).await {
            Ok(url) => Ok(url),
            Err(BlobError::NotFound(h)) => Err(AssetError::BlobNotFound(h)),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// Remove an asset record (the blob goes at the next sweep if unreferenced).
    pub async fn delete_asset(&self, id: Uuid) -> Result<(), AssetError> {
        if self.store.delete_asset(id).await.map_err(unavailable)? { Ok(()) } else { Err(AssetError::NotFound) }
    }

    /// Uploaded assets, newest first.
    pub async fn list_assets(&self, limit: usize, offset: usize) -> Result<Vec<Asset>, AssetError> {
        self.store.list_assets(limit, offset).await.map_err(unavailable)
    }

    fn new_upload_record(&self, hash: String, size: u64, content_type: &str, name: Option<String>) -> Asset {
        let now = SystemTime::now();
        Asset {
            id: Uuid::new_v4(),
            hash,
            size_bytes: size,
            content_type: content_type.to_string(),
            name,
            job_id: None,
            node_id: None,
            role: AssetRole::Upload,
            created_at: now,
            expires_at: Some(now + self.config.retention),
        }
    }
}
