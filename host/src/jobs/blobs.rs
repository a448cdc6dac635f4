//! Content-addressed bytes behind one trait, [`BlobStore`]: a blob is named by
//! the blake3 hash of its bytes (`blake3:<hex>`), so the same bytes are stored
//! once however many assets refer to them. The default is a folder under the
//! state directory ([`FsBlobStore`]); an S3-compatible bucket is the other
//! ([`super::blobs_s3::S3BlobStore`]), for many instances sharing outputs.
//!
//! Owns: bytes on disk, written atomically (temp file + rename), and their
//! names. Must never: take a file name from a caller (names are hashes it made
//! and checked), or keep records (that is the job store).

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;

/// `blake3:<64 hex>` of `bytes`.
pub fn hash_of(bytes: &[u8]) -> String {
    format!("blake3:{}", blake3::hash(bytes).to_hex())
}

/// Whether `hash` is a well-formed `blake3:<64 lowercase hex>`.
pub fn is_valid_hash(hash: &str) -> bool {
    hash.strip_prefix("blake3:").is_some_and(|hex| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
}

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("not a blake3 hash: {0:?}")]
    BadHash(String),
    #[error("no blob {0}")]
    NotFound(String),
    #[error("blob store I/O: {0}")]
    Io(String),
}

/// Where bytes live.
#[async_trait]
pub trait BlobStore: Send + Sync {
    /// Store `bytes`; returns (hash, created_new). Idempotent.
    async fn put(&self, bytes: Bytes) -> Result<(String, bool), BlobError>;
    async fn exists(&self, hash: &str) -> Result<bool, BlobError>;
    /// The whole blob.
    async fn get(&self, hash: &str) -> Result<Bytes, BlobError>;
    /// `len` bytes from `offset` (clamped to the blob's end).
    async fn get_range(&self, hash: &str, offset: u64, len: u64) -> Result<Bytes, BlobError>;
    async fn delete(&self, hash: &str) -> Result<bool, BlobError>;
    /// Every stored hash with its last write time (for the sweeper).
    async fn list(&self) -> Result<Vec<(String, SystemTime)>, BlobError>;
    /// A short-lived URL a client can GET the blob from directly, when this store
    /// hands those out (S3 with presigning on); `None`: stream the bytes through.
    async fn presigned_get(&self, _hash: &str) -> Result<Option<String>, BlobError> {
        Ok(None)
    }
    /// `local` (this instance's disk) or `s3` (a bucket every instance reads).
    fn kind(&self) -> &'static str {
        "local"
    }
}

/// Blobs as files `root/<2 hex>/<64 hex>`.
#[derive(Debug, Clone)]
pub struct FsBlobStore {
    root: PathBuf,
}

impl FsBlobStore {
    pub fn new(root: impl Into<PathBuf>) -> std::io::Result<FsBlobStore> {
        let root = root.into();
        std::fs::create_dir_all(&root)?;
        Ok(FsBlobStore { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path_of(&self, hash: &str) -> Result<PathBuf, BlobError> {
        if !is_valid_hash(hash) {
            return Err(BlobError::BadHash(hash.chars().take(80).collect()));
        }
        let hex = &hash["blake3:".len()..];
        Ok(self.root.join(&hex[..2]).join(hex))
    }
}

fn io(e: std::io::Error) -> BlobError {
    BlobError::Io(e.to_string())
}

#[async_trait]
impl BlobStore for FsBlobStore {
    async fn put(&self, bytes: Bytes) -> Result<(String, bool), BlobError> {
        let root = self.root.clone();
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let hash = hash_of(&bytes);
            let path = this.path_of(&hash)?;
            if path.exists() {
                return Ok((hash, false));
            }
            let dir = path.parent().unwrap_or(&root);
            std::fs::create_dir_all(dir).map_err(io)?;
            let tmp = dir.join(format!(".{}.tmp", uuid::Uuid::new_v4()));
            std::fs::write(&tmp, &bytes).map_err(io)?;
            std::fs::rename(&tmp, &path).map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                io(e)
            })?;
            Ok((hash, true))
        })
        .await
        .map_err(|e| BlobError::Io(e.to_string()))?
    }

    async fn exists(&self, hash: &str) -> Result<bool, BlobError> {
        let path = self.path_of(hash)?;
        Ok(tokio::fs::try_exists(&path).await.unwrap_or(false))
    }

    async fn get(&self, hash: &str) -> Result<Bytes, BlobError> {
        let path = self.path_of(hash)?;
        match tokio::fs::read(&path).await {
            Ok(bytes) => Ok(bytes.into()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(BlobError::NotFound(hash.to_string())),
            Err(e) => Err(io(e)),
        }
    }

    async fn get_range(&self, hash: &str, offset: u64, len: u64) -> Result<Bytes, BlobError> {
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        let path = self.path_of(hash)?;
        let mut file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(BlobError::NotFound(hash.to_string())),
            Err(e) => return Err(io(e)),
        };
        let size = file.metadata().await.map_err(io)?.len();
        let start = offset.min(size);
        let take = len.min(size - start);
        file.seek(std::io::SeekFrom::Start(start)).await.map_err(io)?;
        let mut buf = vec![0u8; take as usize];
        file.read_exact(&mut buf).await.map_err(io)?;
        Ok(buf.into())
    }

    async fn delete(&self, hash: &str) -> Result<bool, BlobError> {
        let path = self.path_of(hash)?;
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io(e)),
        }
    }

    async fn list(&self) -> Result<Vec<(String, SystemTime)>, BlobError> {
        let root = self.root.clone();
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            let Ok(dirs) = std::fs::read_dir(&root) else { return Ok(out) };
            for dir in dirs.flatten() {
                let Ok(files) = std::fs::read_dir(dir.path()) else { continue };
                for file in files.flatten() {
                    let name = file.file_name().to_string_lossy().to_string();
                    let hash = format!("blake3:{name}");
                    if is_valid_hash(&hash) {
                        let modified = file.metadata().and_then(|m| m.modified()).unwrap_or(SystemTime::UNIX_EPOCH);
                        out.push((hash, modified));
                    }
                }
            }
            Ok(out)
        })
        .await
        .map_err(|e| BlobError::Io(e.to_string()))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_same_bytes_are_stored_once_and_read_back_by_range() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobStore::new(dir.path()).unwrap();
        let (hash, new) = store.put(Bytes::from_static(b"hello world")).await.unwrap();
        assert!(new);
        assert_eq!(hash, hash_of(b"hello world"));
        let (again, new) = store.put(Bytes::from_static(b"hello world")).await.unwrap();
        assert_eq!((again.as_str(), new), (hash.as_str(), false));
        assert_eq!(&store.get_range(&hash, 6, 100).await.unwrap()[..], b"world");
        assert_eq!(store.list().await.unwrap().into_iter().map(|(h, _)| h).collect::<Vec<_>>(), vec![hash.clone()]);
        assert!(store.delete(&hash).await.unwrap());
        assert!(matches!(store.get(&hash).await, Err(BlobError::NotFound(_))));
    }

    #[tokio::test]
    async fn path_traversal_through_a_hash_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobStore::new(dir.path()).unwrap();
        for bad in ["blake3:../../etc/passwd", "../x", "blake3:ZZ", "sha256:abcd"] {
            assert!(matches!(store.get(bad).await, Err(BlobError::BadHash(_))), "{bad}");
        }
    }
}
