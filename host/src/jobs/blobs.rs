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
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use futures::stream::BoxStream;

/// `blake3:<64 hex>` of `bytes`.
pub fn hash_of(bytes: &[u8]) -> String {
    format!("blake3:{}", blake3::hash(bytes).to_hex())
}

/// Whether `hash` is a well-formed `blake3:<64 lowercase hex>`.
pub fn is_valid_hash(hash: &str) -> bool {
    hash.strip_prefix("blake3:").is_some_and(|hex| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
}

/// Bytes on their way in or out, one bounded chunk at a time.
pub type ByteStream = BoxStream<'static, Result<Bytes, BlobError>>;

/// The chunk a streamed read hands on: what one transfer holds of a blob at a time
/// (plus the socket's own buffers), whatever the blob's size.
pub const READ_CHUNK: usize = 64 << 10;

/// A streamed write, done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamedPut {
    pub hash: String,
    pub size: u64,
    /// False when the store already held these bytes.
    pub created_new: bool,
}

/// Hashes bytes as they pass through a streamed write (the one place a stream's hash
/// is made, for both stores).
#[derive(Default)]
pub(crate) struct PassingHash {
    hasher: blake3::Hasher,
    size: u64,
}

impl PassingHash {
    pub(crate) fn update(&mut self, chunk: &[u8]) {
        self.hasher.update(chunk);
        self.size += chunk.len() as u64;
    }

    /// The hash and size, or a mismatch against `expected` (then nothing may be kept).
    pub(crate) fn finish(self, expected: Option<&str>) -> Result<(String, u64), BlobError> {
        let hash = format!("blake3:{}", self.hasher.finalize().to_hex());
        match expected {
            Some(expected) if expected != hash => Err(BlobError::HashMismatch { expected: expected.to_string(), actual: hash }),
            _ => Ok((hash, self.size)),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("not a blake3 hash: {0:?}")]
    BadHash(String),
    #[error("no blob {0}")]
    NotFound(String),
    #[error("blob store I/O: {0}")]
    Io(String),
    /// A streamed write's bytes hash to something else than the caller said; nothing was kept.
    #[error("the content hashes to {actual}, not {expected}")]
    HashMismatch { expected: String, actual: String },
    /// The stream feeding a write failed (the client went away, sent too much, or a
    /// malformed body); the caller knows why, nothing was kept.
    #[error("the source of the bytes failed")]
    SourceFailed,
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
    /// Store bytes as they arrive, hashing them on the way, holding one chunk (and at most
    /// the store's upload part) at a time; with `expected`, bytes hashing otherwise are not
    /// kept ([`BlobError::HashMismatch`]).
    async fn put_stream(&self, chunks: BoxStream<'_, Result<Bytes, BlobError>>, expected: Option<&str>) -> Result<StreamedPut, BlobError>;
    /// The blob's size, `None` when it is not stored.
    async fn size(&self, hash: &str) -> Result<Option<u64>, BlobError>;
    /// `len` bytes from `offset` (clamped to the blob's end) as a stream of chunks of at
    /// most [`READ_CHUNK`] bytes.
    async fn get_stream(&self, hash: &str, offset: u64, len: u64) -> Result<ByteStream, BlobError>;
    async fn delete(&self, hash: &str) -> Result<bool, BlobError>;
    /// Every stored hash with its last write time (for the sweeper).
    async fn list(&self) -> Result<Vec<(String, SystemTime)>, BlobError>;
    /// A short-lived URL a client can GET the blob from directly, when this store
    /// hands those out (S3 with presigning on); `None`: stream the bytes through.
    async fn presigned_get(&self, _hash: &str) -> Result<Option<String>, BlobError> {
        Ok(None)
    }
    /// Whether the store answers now (readiness: a bucket that cannot be reached makes
    /// the instance not ready). The error says what is wrong without hosts or keys.
    async fn check(&self) -> Result<(), BlobError> {
        Ok(())
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

/// A temporary file removed when dropped, unless it was renamed into place.
struct TempFile(Option<PathBuf>);

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
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

    async fn put_stream(&self, mut chunks: BoxStream<'_, Result<Bytes, BlobError>>, expected: Option<&str>) -> Result<StreamedPut, BlobError> {
        use tokio::io::AsyncWriteExt;
        // In the root (one file system with the blob's folder, so the rename is atomic);
        // the sweeper's listing only reads the two-hex folders.
        let tmp = self.root.join(format!(".{}.upload.tmp", uuid::Uuid::new_v4().simple()));
        let mut guard = TempFile(Some(tmp.clone()));
        let mut file = tokio::fs::File::create(&tmp).await.map_err(io)?;
        let mut hash = PassingHash::default();
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk?;
            hash.update(&chunk);
            file.write_all(&chunk).await.map_err(io)?;
        }
        file.flush().await.map_err(io)?;
        drop(file);
        let (hash, size) = hash.finish(expected)?;
        let path = self.path_of(&hash)?;
        if tokio::fs::try_exists(&path).await.unwrap_or(false) {
            return Ok(StreamedPut { hash, size, created_new: false });
        }
        if let Some(dir) = path.parent() {
            tokio::fs::create_dir_all(dir).await.map_err(io)?;
        }
        tokio::fs::rename(&tmp, &path).await.map_err(io)?;
        guard.0 = None;
        Ok(StreamedPut { hash, size, created_new: true })
    }

    async fn size(&self, hash: &str) -> Result<Option<u64>, BlobError> {
        let path = self.path_of(hash)?;
        match tokio::fs::metadata(&path).await {
            Ok(meta) => Ok(Some(meta.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(e)),
        }
    }

    async fn get_stream(&self, hash: &str, offset: u64, len: u64) -> Result<ByteStream, BlobError> {
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        let path = self.path_of(hash)?;
        let mut file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(BlobError::NotFound(hash.to_string())),
            Err(e) => return Err(io(e)),
        };
        let size = file.metadata().await.map_err(io)?.len();
        let start = offset.min(size);
        file.seek(std::io::SeekFrom::Start(start)).await.map_err(io)?;
        let reader = file.take(len.min(size - start));
        let stream = futures::stream::try_unfold(reader, |mut reader| async move {
            let mut buf = BytesMut::with_capacity(READ_CHUNK);
            let n = reader.read_buf(&mut buf).await.map_err(io)?;
            Ok((n > 0).then(|| (buf.freeze(), reader)))
        });
        Ok(stream.boxed())
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

/// A blob store as the model cache reads uploaded model assets through it
/// ([`crate::models::cache::AssetBytes`]).
pub struct BlobAssets<B: ?Sized>(pub std::sync::Arc<B>);

#[async_trait]
impl<B: BlobStore + ?Sized> crate::models::cache::AssetBytes for BlobAssets<B> {
    async fn size(&self, hash: &str) -> Result<Option<u64>, ()> {
        self.0.size(hash).await.map_err(|_| ())
    }

    async fn stream(&self, hash: &str, len: u64) -> Result<BoxStream<'static, Result<Bytes, ()>>, ()> {
        let stream = self.0.get_stream(hash, 0, len).await.map_err(|_| ())?;
        Ok(stream.map(|chunk| chunk.map_err(|_| ())).boxed())
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

    fn chunks(parts: &[&'static [u8]]) -> ByteStream {
        futures::stream::iter(parts.iter().map(|p| Ok(Bytes::from_static(p))).collect::<Vec<_>>()).boxed()
    }

    async fn collect(stream: ByteStream) -> Vec<u8> {
        let parts: Vec<Bytes> = futures::TryStreamExt::try_collect(stream).await.unwrap();
        parts.concat()
    }

    #[tokio::test]
    async fn a_streamed_write_hashes_as_it_goes_and_reads_back_by_range() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobStore::new(dir.path()).unwrap();
        let put = store.put_stream(chunks(&[b"hello ", b"world"]), Some(&hash_of(b"hello world"))).await.unwrap();
        assert_eq!(put, StreamedPut { hash: hash_of(b"hello world"), size: 11, created_new: true });
        assert!(!store.put_stream(chunks(&[b"hello world"]), None).await.unwrap().created_new);
        assert_eq!(collect(store.get_stream(&put.hash, 6, 100).await.unwrap()).await, b"world");
        assert_eq!(store.size(&put.hash).await.unwrap(), Some(11));
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().filter(|e| e.as_ref().unwrap().path().is_file()).count(), 0);
    }

    #[tokio::test]
    async fn a_streamed_write_with_the_wrong_hash_or_a_failing_source_keeps_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobStore::new(dir.path()).unwrap();
        let wrong = hash_of(b"other");
        assert!(matches!(store.put_stream(chunks(&[b"abc"]), Some(&wrong)).await, Err(BlobError::HashMismatch { .. })));
        let failing = futures::stream::iter(vec![Ok(Bytes::from_static(b"abc")), Err(BlobError::SourceFailed)]).boxed();
        assert!(matches!(store.put_stream(failing, None).await, Err(BlobError::SourceFailed)));
        assert!(store.list().await.unwrap().is_empty());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
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
