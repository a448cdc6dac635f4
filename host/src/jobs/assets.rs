//! The asset API (what v2's `/assets` endpoints call): UUID records over
//! content-addressed blobs, hashed by the server (blake3), deduplicated, with an
//! `expected_hash` check, creation from a hash the server already has, ranged
//! reads, deletion and listing. Inputs uploaded here and outputs of jobs share
//! the one blob store and the one retention.
//!
//! Owns: the asset records' rules (tenant, retention, hash checks) over the store and
//! the blob store. Must never: trust a caller's hash (it is compared, never used as a name
//! before being validated), or delete a blob (the sweeper does, when unreferenced).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use uuid::Uuid;

use super::blobs::{BlobError, BlobStore, ByteStream, StreamedPut, is_valid_hash};
use super::model::{Asset, AssetRole};
use super::store::JobStore;
use super::tenant::Viewer;

/// Why an asset operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssetError {
    /// No such asset, or another tenant's (the two read the same).
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
    /// The stream of an upload failed (the caller's side: its error is already known).
    #[error("the upload's bytes stopped arriving")]
    SourceFailed,
    /// The blob store (the bucket) cannot be reached now: a retry may succeed (503).
    #[error("blob store unreachable: {0}")]
    BlobStoreDown(String),
    #[error("asset store: {0}")]
    Unavailable(String),
}

fn unavailable(e: impl std::fmt::Display) -> AssetError {
    AssetError::Unavailable(e.to_string())
}

/// How many same-named uploads a name lookup considers (newest first) before giving up.
const NAMED_CANDIDATES: usize = 100;

/// Whether `viewer` may read `asset`: the tenant rule ([`Viewer::sees`]), in the one place
/// file-name references, `from-hash` and the asset routes all ask.
pub fn may_read(asset: &Asset, viewer: &Viewer) -> bool {
    viewer.sees(asset.tenant.as_deref())
}

fn blob_error(e: BlobError) -> AssetError {
    match e {
        BlobError::NotFound(hash) => AssetError::BlobNotFound(hash),
        BlobError::HashMismatch { expected, actual } => AssetError::HashMismatch { expected, actual },
        BlobError::SourceFailed => AssetError::SourceFailed,
        BlobError::BadHash(_) => AssetError::InvalidHash,
        BlobError::Io(detail) => AssetError::BlobStoreDown(detail),
    }
}

/// A new asset, and whether its bytes were new to the store (v2 `created_new`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedAsset {
    pub asset: Asset,
    pub created_new: bool,
}

/// An asset's bytes on their way out: the record, the (clamped, inclusive) range sent
/// when one was asked, and the stream.
pub struct AssetContent {
    pub asset: Asset,
    pub range: Option<(u64, u64)>,
    pub bytes: ByteStream,
}

/// The job service's part that keeps assets.
pub struct Assets {
    store: Arc<dyn JobStore>,
    blobs: Arc<dyn BlobStore>,
    /// How long a new upload's record is kept.
    retention: Duration,
}

impl Assets {
    pub fn new(store: Arc<dyn JobStore>, blobs: Arc<dyn BlobStore>, retention: Duration) -> Assets {
        Assets { store, blobs, retention }
    }

    /// Store an upload's bytes as they arrive (hashed on the way, never held whole).
    /// `expected_hash`, when given, must match or nothing is kept. The record is made by
    /// [`Assets::record_upload`] once the rest of the form is read.
    pub(super) async fn store_upload(&self, chunks: futures::stream::BoxStream<'_, Result<bytes::Bytes, BlobError>>, expected_hash: Option<&str>) -> Result<StreamedPut, AssetError> {
        if expected_hash.is_some_and(|e| !is_valid_hash(e)) {
            return Err(AssetError::InvalidHash);
        }
        self.blobs.put_stream(chunks, expected_hash).await.map_err(blob_error)
    }

    /// The record of stored upload bytes, owned by `tenant`.
    pub(super) async fn record_upload(&self, put: &StreamedPut, name: Option<String>, content_type: &str, tenant: Option<String>) -> Result<CreatedAsset, AssetError> {
        let asset = self.new_upload_record(put.hash.clone(), put.size, content_type, name, tenant);
        self.store.insert_asset(&asset).await.map_err(unavailable)?;
        Ok(CreatedAsset { asset, created_new: put.created_new })
    }

    /// A new asset over bytes the server already has (v2 `from-hash`). A tenant may only
    /// name bytes it holds an asset of (else `BlobNotFound`, as if they were not stored).
    pub(super) async fn asset_from_hash(&self, hash: &str, name: Option<String>, content_type: Option<&str>, viewer: &Viewer, tenant: Option<String>) -> Result<CreatedAsset, AssetError> {
        if !is_valid_hash(hash) {
            return Err(AssetError::InvalidHash);
        }
        let existing = self.store.asset_by_hash(hash, viewer.only()).await.map_err(unavailable)?;
        if viewer.only().is_some() && existing.is_none() {
            return Err(AssetError::BlobNotFound(hash.to_string()));
        }
        let Some(size) = self.blobs.size(hash).await.map_err(blob_error)? else {
            return Err(AssetError::BlobNotFound(hash.to_string()));
        };
        let content_type = content_type.map(str::to_string).or_else(|| existing.as_ref().map(|a| a.content_type.clone())).unwrap_or_else(|| "application/octet-stream".into());
        let asset = self.new_upload_record(hash.to_string(), size, &content_type, name.or_else(|| existing.and_then(|a| a.name)), tenant);
        self.store.insert_asset(&asset).await.map_err(unavailable)?;
        Ok(CreatedAsset { asset, created_new: false })
    }

    /// The asset a file name refers to: the newest live upload whose `file_path` is `name`
    /// among those `viewer` may read ([`may_read`]). What a plain string in an input-folder
    /// input of a v2 graph resolves to (newest wins: uploading `portrait.png` again
    /// replaces what `"portrait.png"` means, as placing a file under that name would).
    pub(super) async fn upload_named(&self, name: &str, viewer: &Viewer) -> Result<Option<Asset>, AssetError> {
        let now = SystemTime::now();
        let candidates = self.store.uploads_named(name, NAMED_CANDIDATES).await.map_err(unavailable)?;
        Ok(candidates.into_iter().find(|a| a.expires_at.is_none_or(|at| at > now) && may_read(a, viewer)))
    }

    /// An upload record over `hash` that `from-hash` with the same `hash` and `file_path`
    /// would duplicate (v2's "an identical reference already existed; returned as-is"):
    /// the newest live one named `name` (any name when `name` is `None`) that `viewer` may read.
    pub(super) async fn identical_reference(&self, hash: &str, name: Option<&str>, viewer: &Viewer) -> Result<Option<Asset>, AssetError> {
        if !is_valid_hash(hash) {
            return Err(AssetError::InvalidHash);
        }
        let now = SystemTime::now();
        let candidates = match name {
            Some(name) => self.store.uploads_named(name, NAMED_CANDIDATES).await.map_err(unavailable)?,
            None => self.store.asset_by_hash(hash, viewer.only()).await.map_err(unavailable)?.filter(|a| a.role == AssetRole::Upload).into_iter().collect(),
        };
        let found = candidates.into_iter().find(|a| a.hash == hash && a.expires_at.is_none_or(|at| at > now) && may_read(a, viewer));
        match found {
            // The blob must still be there (a record outliving its bytes is no reference).
            Some(asset) if self.blobs.exists(hash).await.map_err(unavailable)? => Ok(Some(asset)),
            _ => Ok(None),
        }
    }

    /// Whether bytes with this hash are stored under an asset the viewer sees (v2 `HEAD
    /// /assets/by-hash/{hash}`).
    pub(super) async fn asset_exists_by_hash(&self, hash: &str, viewer: &Viewer) -> Result<bool, AssetError> {
        if !is_valid_hash(hash) {
            return Err(AssetError::InvalidHash);
        }
        let recorded = self.store.asset_by_hash(hash, viewer.only()).await.map_err(unavailable)?.is_some();
        Ok(recorded && self.blobs.exists(hash).await.map_err(blob_error)?)
    }

    /// An asset's record, when the viewer sees it.
    pub(super) async fn get_asset(&self, id: Uuid, viewer: &Viewer) -> Result<Asset, AssetError> {
        let asset = self.store.get_asset(id).await.map_err(unavailable)?.ok_or(AssetError::NotFound)?;
        if viewer.sees(asset.tenant.as_deref()) { Ok(asset) } else { Err(AssetError::NotFound) }
    }

    /// An asset's bytes as a stream: all, or `range = (start, end_inclusive)` clamped to
    /// the size.
    pub(super) async fn open_asset(&self, asset: Asset, range: Option<(u64, Option<u64>)>) -> Result<AssetContent, AssetError> {
        let size = asset.size_bytes;
        let (start, end) = match range {
            None => (0, size.saturating_sub(1)),
            Some((start, _)) if start >= size => return Err(AssetError::RangeNotSatisfiable { size }),
            Some((start, end)) => (start, end.unwrap_or(u64::MAX).min(size.saturating_sub(1))),
        };
        let len = if size == 0 { 0 } else { end + 1 - start };
        let bytes = self.blobs.get_stream(&asset.hash, start, len).await.map_err(blob_error)?;
        Ok(AssetContent { range: range.map(|_| (start, end)), asset, bytes })
    }

    /// A presigned URL the asset's bytes can be fetched from directly, when the blob
    /// store hands those out (S3 with `--blob-presign`); `None`: stream them through.
    pub(super) async fn asset_download_url(&self, asset: &Asset) -> Result<Option<String>, AssetError> {
        self.blobs.presigned_get(&asset.hash).await.map_err(blob_error)
    }

    /// Remove an asset record (the blob goes at the next sweep if unreferenced).
    pub(super) async fn delete_asset(&self, id: Uuid) -> Result<(), AssetError> {
        if self.store.delete_asset(id).await.map_err(unavailable)? { Ok(()) } else { Err(AssetError::NotFound) }
    }

    /// Uploaded assets, newest first.
    pub(super) async fn list_assets(&self, limit: usize, offset: usize) -> Result<Vec<Asset>, AssetError> {
        self.store.list_assets(limit, offset).await.map_err(unavailable)
    }

    fn new_upload_record(&self, hash: String, size: u64, content_type: &str, name: Option<String>, tenant: Option<String>) -> Asset {
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
            expires_at: Some(now + self.retention),
            tenant,
        }
    }
}
