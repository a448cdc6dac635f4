//! Files a request names by reference: model files a plugin asks the host to fetch
//! (`job.fetches`, contract 0.3+) and images by URL or asset (`image-source.file`). The
//! reference is checked (its form, its digests, the destination guard, the asset and the
//! tenant rule), the file fetched through the model cache (models) or the guarded fetcher
//! (images), and every failure becomes a [`JobFailure::Fetch`] naming the request field.
//!
//! Owns: turning a caller's reference into a [`ModelSource`] and a failure into its
//! [`FetchReason`]. Must never: open a URL itself (the [`Fetcher`] does, under the guard),
//! name in an error an address or a path the caller did not send, or read an asset another
//! tenant owns (it reads as absent).

use std::sync::Arc;

use tokio::time::Instant;
use uuid::Uuid;

use super::assets::Assets;
use super::blobs::BlobStore;
use super::failure::{FetchReason, JobFailure};
use super::model::{ModelFileSpec, StoredSource};
use super::store::JobStore;
use super::tenant::Viewer;
use crate::models::cache::{CacheError, Expected, ModelCache, ModelSource, Pinned};
use crate::net::destination::DestinationError;
use crate::net::fetch::{FetchError, Fetcher};
use crate::plugins::{FileRef, FileSource, ModelFetch};

/// The service's fetching side: the guarded fetcher (images by URL) and the model cache
/// (models by reference; `None`: the server runs without `--model-cache`).
#[derive(Debug, Clone)]
pub struct References {
    pub fetcher: Fetcher,
    pub cache: Option<ModelCache>,
    /// Counts refused destinations of image fetches (the cache counts its own).
    pub stats: Arc<crate::models::cache::CacheStats>,
    /// Refreshes the model volume on a miss (`--models-refresh-url`).
    pub volume_refresh: Option<Arc<crate::models::refresh::VolumeRefresh>>,
}

/// The job service's part that fetches the files a request names by reference.
pub struct ReferencedFiles {
    /// The fetcher and the model cache (none: a reference is refused as unsupported here).
    references: Option<References>,
    store: Arc<dyn JobStore>,
    blobs: Arc<dyn BlobStore>,
    /// Reads an asset a reference names by its id, by the tenant rule.
    assets: Arc<Assets>,
}

fn failure(field: &str, reason: FetchReason, message: impl Into<String>) -> JobFailure {
    JobFailure::Fetch { field: field.to_owned(), message: message.into(), reason }
}

fn is_hex64(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A digest as the caller wrote it (64 hex digits, optionally `name:`-prefixed), lowercased.
fn digest(name: &str, value: &str) -> Option<String> {
    let bare = value.strip_prefix(&format!("{name}:")).unwrap_or(value).to_ascii_lowercase();
    is_hex64(&bare).then_some(bare)
}

/// The digests a reference names, checked for form (`{field}/sha256`, `{field}/blake3`).
#[allow(clippy::result_large_err)] // JobFailure is the service's one failure type
fn expected(field: &str, file: &FileRef) -> Result<Expected, JobFailure> {
    let mut checked = Expected::default();
    for (name, value, slot) in [("sha256", &file.sha256, &mut checked.sha256), ("blake3", &file.blake3, &mut checked.blake3)] {
        if let Some(value) = value {
            *slot =
                Some(digest(name, value).ok_or_else(|| {
                    failure(&format!("{field}/{name}"), FetchReason::Malformed, format!("must be the file's {name} as 64 hexadecimal digits"))
                })?);
        }
    }
    Ok(checked)
}

/// A refusal of the caller's own URL: malformed (its form) or refused (where it points).
fn url_refusal(field: &str, error: &DestinationError) -> JobFailure {
    let reason = match error {
        DestinationError::ForbiddenAddress(_) | DestinationError::ResolvesToForbidden(_) | DestinationError::NotAllowListed(_) => FetchReason::Refused,
        _ => FetchReason::Malformed,
    };
    failure(field, reason, error.to_string())
}

/// A fetch or cache failure for `field`.
fn cache_failure(field: &str, error: CacheError) -> JobFailure {
    let reason = match &error {
        CacheError::Fetch(FetchError::Refused(e)) => return url_refusal(field, e),
        CacheError::Fetch(FetchError::RedirectRefused(_)) => FetchReason::Refused,
        CacheError::Fetch(FetchError::TooLarge { .. }) => FetchReason::TooLarge,
        CacheError::Fetch(FetchError::Upstream(_)) => FetchReason::Upstream,
        CacheError::Fetch(FetchError::Timeout(_)) | CacheError::Deadline => FetchReason::Timeout,
        CacheError::Fetch(FetchError::Local(detail)) => {
            tracing::error!(field, %detail, "storing a fetched file failed");
            return failure(field, FetchReason::Internal, "the file could not be stored on this server");
        }
        CacheError::HashMismatch { .. } | CacheError::NotSafetensors(_) => FetchReason::Unusable,
        CacheError::BlobMissing => FetchReason::NotFound,
        CacheError::BlobStoreDown => FetchReason::Unavailable,
    };
    failure(field, reason, error.to_string())
}

impl ReferencedFiles {
    pub fn new(references: Option<References>, store: Arc<dyn JobStore>, blobs: Arc<dyn BlobStore>, assets: Arc<Assets>) -> ReferencedFiles {
        ReferencedFiles { references, store, blobs, assets }
    }

    pub(super) fn references(&self) -> Option<&References> {
        self.references.as_ref()
    }

    /// The model cache, when the server has one.
    pub(super) fn model_cache(&self) -> Option<&ModelCache> {
        self.references.as_ref().and_then(|r| r.cache.as_ref())
    }

    /// The asset a reference names (its id or its content hash), as `viewer` may read it:
    /// its blob hash, or a 404 naming `field`.
    async fn asset_hash(&self, field: &str, reference: &str, viewer: &Viewer) -> Result<String, JobFailure> {
        let not_found = || failure(field, FetchReason::NotFound, format!("no asset `{}`", reference.chars().take(80).collect::<String>()));
        let asset = if let Ok(id) = Uuid::parse_str(reference) {
            match self.assets.get_asset(id, viewer).await {
                Ok(asset) => asset,
                Err(super::AssetError::NotFound) => return Err(not_found()),
                Err(e) => return Err(failure(field, FetchReason::Unavailable, e.to_string())),
            }
        } else if super::blobs::is_valid_hash(reference) {
            match self.store.asset_by_hash(reference, viewer.only()).await {
                Ok(Some(asset)) => asset,
                Ok(None) => return Err(not_found()),
                Err(e) => return Err(failure(field, FetchReason::Unavailable, e.to_string())),
            }
        } else {
            return Err(failure(field, FetchReason::Malformed, "an asset is named by its id (a UUID) or its content hash (blake3:<64 lowercase hex>)"));
        };
        if asset.expires_at.is_some_and(|at| at <= std::time::SystemTime::now()) {
            return Err(not_found());
        }
        Ok(asset.hash)
    }

    /// The cache source of a reference (asset looked up, URL checked) and its digests; a
    /// blake3 the caller names that differs from an asset's own hash fails at once.
    async fn model_source(&self, field: &str, file: &FileRef, viewer: &Viewer, fetcher: &Fetcher) -> Result<(ModelSource, Expected), JobFailure> {
        let expected = expected(field, file)?;
        let source = match &file.source {
            FileSource::Url(text) => ModelSource::Url(fetcher.check(text).map_err(|e| url_refusal(field, &e))?),
            FileSource::Asset(reference) => {
                let hash = self.asset_hash(field, reference, viewer).await?;
                if let Some(want) = &expected.blake3
                    && hash.strip_prefix("blake3:") != Some(want.as_str())
                {
                    return Err(failure(
                        field,
                        FetchReason::Unusable,
                        format!("the asset's blake3 is {}, not the {want} the request names", hash.trim_start_matches("blake3:")),
                    ));
                }
                ModelSource::Blob(hash)
            }
        };
        Ok((source, expected))
    }

    /// Fetch (or find in the cache) the job's model files, each pinned until the returned
    /// values are dropped, before `deadline`.
    pub(super) async fn place_models(&self, fetches: &[ModelFetch], viewer: &Viewer, deadline: Instant) -> Result<Vec<(ModelFileSpec, Pinned)>, JobFailure> {
        if fetches.is_empty() {
            return Ok(Vec::new());
        }
        let Some((references, cache)) = self.references.as_ref().and_then(|r| Some((r, r.cache.as_ref()?))) else {
            let field = &fetches[0].field;
            return Err(failure(
                field,
                FetchReason::Malformed,
                "this server takes no model files by reference (it runs without --model-cache); name a file of its model volume",
            ));
        };
        let mut sources = Vec::with_capacity(fetches.len());
        for fetch in fetches {
            sources.push(self.model_source(&fetch.field, &fetch.file, viewer, &references.fetcher).await?);
        }
        let folder = |name: &str| crate::models::cache::FOLDERS.iter().copied().find(|f| *f == name).unwrap_or("loras");
        let placed = futures::future::join_all(
            fetches.iter().zip(&sources).map(|(fetch, (source, expected))| cache.place(folder(&fetch.folder), source, expected, deadline)),
        )
        .await;
        let mut out = Vec::with_capacity(fetches.len());
        for ((fetch, (source, _)), result) in fetches.iter().zip(sources).zip(placed) {
            let pinned = result.map_err(|e| cache_failure(&fetch.field, e))?;
            let spec = ModelFileSpec {
                field: fetch.field.clone(),
                folder: fetch.folder.clone(),
                node_id: fetch.node_id.clone(),
                input_name: fetch.input_name.clone(),
                blake3: pinned.blake3.clone(),
                source: match source {
                    ModelSource::Url(url) => StoredSource::Url { url: url.to_string() },
                    ModelSource::Blob(hash) => StoredSource::Blob { hash },
                },
            };
            out.push((spec, pinned));
        }
        Ok(out)
    }

    /// A stored job's model files placed again before it runs (a cache hit normally; a
    /// fetch on an instance that never had the file, or after it was evicted across a restart).
    pub(super) async fn replace_models(&self, files: &[ModelFileSpec], deadline: Instant) -> Result<Vec<Pinned>, JobFailure> {
        let Some(cache) = self.model_cache() else {
            let field = files.first().map(|f| f.field.as_str()).unwrap_or("model");
            return Err(failure(field, FetchReason::Malformed, "this server takes no model files by reference (it runs without --model-cache)"));
        };
        let mut pins = Vec::with_capacity(files.len());
        for file in files {
            let source = match &file.source {
                StoredSource::Url { url } => match url::Url::parse(url) {
                    Ok(url) => ModelSource::Url(url),
                    Err(_) => return Err(failure(&file.field, FetchReason::Malformed, "the stored URL no longer parses")),
                },
                StoredSource::Blob { hash } => ModelSource::Blob(hash.clone()),
            };
            let folder = crate::models::cache::FOLDERS.iter().copied().find(|f| *f == file.folder).unwrap_or("loras");
            let expected = Expected { blake3: Some(file.blake3.clone()), sha256: None };
            pins.push(cache.place_again(folder, &source, &expected, deadline).await.map_err(|e| cache_failure(&file.field, e))?);
        }
        Ok(pins)
    }

    /// An image named by reference: an asset's bytes, or a URL fetched through the guard,
    /// at most `max_bytes`, before `deadline`.
    pub(super) async fn fetch_image(&self, field: &str, file: &FileRef, viewer: &Viewer, max_bytes: u64, deadline: Instant) -> Result<Vec<u8>, JobFailure> {
        let expected = expected(field, file)?;
        let bytes = match &file.source {
            FileSource::Asset(reference) => {
                let hash = self.asset_hash(field, reference, viewer).await?;
                match self.blobs.size(&hash).await {
                    Ok(Some(size)) if size > max_bytes => {
                        return Err(failure(field, FetchReason::TooLarge, format!("the file is larger than the {max_bytes} bytes allowed")));
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => return Err(failure(field, FetchReason::NotFound, "the asset's content is no longer stored")),
                    Err(_) => return Err(failure(field, FetchReason::Unavailable, "the blob store could not be read")),
                }
                self.blobs.get(&hash).await.map_err(|_| failure(field, FetchReason::Unavailable, "the blob store could not be read"))?.to_vec()
            }
            FileSource::Url(text) => {
                let Some(references) = self.references.as_ref() else {
                    return Err(failure(field, FetchReason::Malformed, "this server fetches no URLs"));
                };
                let url = references.fetcher.check(text).map_err(|e| url_refusal(field, &e))?;
                match references.fetcher.to_memory(&url, max_bytes, deadline).await {
                    Ok(bytes) => bytes.to_vec(),
                    Err(error) => {
                        if matches!(error, FetchError::Refused(_) | FetchError::RedirectRefused(_)) {
                            references.stats.refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        return Err(cache_failure(field, CacheError::Fetch(error)));
                    }
                }
            }
        };
        let blake3 = blake3::hash(&bytes).to_hex().to_string();
        let sha256 = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes));
        for (name, want, actual) in [("sha256", &expected.sha256, &sha256), ("blake3", &expected.blake3, &blake3)] {
            if let Some(want) = want
                && want != actual
            {
                return Err(failure(field, FetchReason::Unusable, format!("the file's {name} is {actual}, not the {want} the request names")));
            }
        }
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(sha256: Option<&str>) -> FileRef {
        FileRef { source: FileSource::Url("https://example.com/x".into()), sha256: sha256.map(str::to_owned), blake3: None }
    }

    #[test]
    fn digests_are_64_hex_digits_with_or_without_their_prefix() {
        let hex = "ab".repeat(32);
        assert_eq!(expected("lora", &file(Some(&hex))).unwrap().sha256.as_deref(), Some(hex.as_str()));
        assert_eq!(expected("lora", &file(Some(&format!("sha256:{}", hex.to_uppercase())))).unwrap().sha256.as_deref(), Some(hex.as_str()));
        let error = expected("lora", &file(Some("abc"))).unwrap_err();
        assert!(matches!(&error, JobFailure::Fetch { field, reason: FetchReason::Malformed, .. } if field == "lora/sha256"), "{error:?}");
    }

    #[test]
    fn a_refused_destination_says_why_and_a_malformed_url_is_malformed() {
        let refused = url_refusal("lora", &DestinationError::ForbiddenAddress("private"));
        assert!(matches!(&refused, JobFailure::Fetch { reason: FetchReason::Refused, message, .. } if message.contains("private address")), "{refused:?}");
        assert!(matches!(url_refusal("lora", &DestinationError::NotHttps), JobFailure::Fetch { reason: FetchReason::Malformed, .. }));
    }
}
