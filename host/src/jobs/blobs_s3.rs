//! Blobs in an S3-compatible bucket (AWS S3, Cloudflare R2, MinIO, …) behind the same
//! [`BlobStore`] trait as the folder store, so many flowhost instances read and write
//! the same outputs (issue #12). Objects are `<prefix>/<2 hex>/<64 hex>`, named by the
//! blake3 hash exactly as on disk.
//!
//! Owns: talking to the bucket (through `object_store`'s S3 client) and presigning GET
//! URLs. Must never: take an object name from a caller (names are hashes it checked),
//! put credentials, endpoints or bucket names into an error a user can see, or keep
//! records (that is the job store).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::signer::Signer;
use object_store::{GetOptions, ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};

use super::blobs::{BlobError, BlobStore, ByteStream, PassingHash, StreamedPut, hash_of, is_valid_hash};

/// The part size of streamed uploads (S3's smallest part but the last): what one upload
/// holds in memory besides the part in flight.
const UPLOAD_PART: usize = 5 << 20;

/// Where the bucket is and how to reach it. Credentials come from the usual AWS
/// environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
/// `AWS_REGION`, `AWS_ENDPOINT_URL`), read by [`S3BlobStore::from_env`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Location {
    pub bucket: String,
    /// Key prefix without leading or trailing `/` (may be empty).
    pub prefix: String,
}

impl S3Location {
    /// Parse `s3://bucket/prefix…`. The error says what is wrong with the value only.
    pub fn parse(value: &str) -> Result<S3Location, String> {
        let rest = value.strip_prefix("s3://").ok_or_else(|| "the blob store must be s3://bucket[/prefix]".to_string())?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let bucket_ok = (3..=63).contains(&bucket.len()) && bucket.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !bucket_ok {
            return Err("the bucket name must be 3-63 characters of a-z, 0-9, '-' and '.'".into());
        }
        let prefix = prefix.trim_matches('/').to_string();
        if prefix.split('/').any(|part| part == ".." || part == ".") || prefix.contains("//") {
            return Err("the blob store prefix must not contain '.', '..' or empty segments".into());
        }
        Ok(S3Location { bucket: bucket.to_string(), prefix })
    }
}

/// How an S3 client is built beyond the environment.
#[derive(Debug, Clone, Default)]
pub struct S3Options {
    /// Path-style requests (`endpoint/bucket/key`), which MinIO and most self-hosted
    /// servers need; R2 and AWS accept both. `None` leaves the environment's choice
    /// (`AWS_VIRTUAL_HOSTED_STYLE_REQUEST`), else path style.
    pub path_style: Option<bool>,
    /// Presigned GET URLs live this long (asset downloads answer 302 to one).
    pub presign_for: Option<Duration>,
}

/// The bucket as a [`BlobStore`].
#[derive(Debug, Clone)]
pub struct S3BlobStore {
    s3: Arc<AmazonS3>,
    prefix: String,
    presign_for: Option<Duration>,
    /// The last readiness probe (when, reachable), so health polls do not each cost a request.
    checked: Arc<std::sync::Mutex<Option<(std::time::Instant, bool)>>>,
}

/// How long a readiness probe's answer is reused.
const CHECK_FOR: Duration = Duration::from_secs(2);
/// How long a readiness probe waits for the bucket.
const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

impl S3BlobStore {
    /// A client for `location` from the AWS environment plus `options`.
    pub fn from_env(location: &S3Location, options: &S3Options) -> Result<S3BlobStore, BlobError> {
        let vars: Vec<(String, String)> = std::env::vars().filter(|(k, _)| k.starts_with("AWS_")).collect();
        Self::from_vars(location, options, &vars)
    }

    /// A client from explicit `AWS_*` variables (what [`S3BlobStore::from_env`] reads;
    /// tests pass their own so parallel tests don't share one process environment).
    /// Plain-HTTP endpoints (a loopback MinIO or moto) are allowed when
    /// `AWS_ENDPOINT_URL` says `http://`.
    pub fn from_vars(location: &S3Location, options: &S3Options, vars: &[(String, String)]) -> Result<S3BlobStore, BlobError> {
        let var = |name: &str| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
        let mut builder = AmazonS3Builder::new().with_bucket_name(&location.bucket);
        for (key, value) in vars {
            if let Ok(config_key) = key.to_ascii_lowercase().parse::<object_store::aws::AmazonS3ConfigKey>() {
                builder = builder.with_config(config_key, value);
            }
        }
        if var("AWS_ENDPOINT_URL").or(var("AWS_ENDPOINT")).is_some_and(|e| e.starts_with("http://")) {
            builder = builder.with_allow_http(true);
        }
        if var("AWS_REGION").is_none() && var("AWS_DEFAULT_REGION").is_none() {
            // R2 and MinIO ignore the region but the signature needs one.
            builder = builder.with_region("us-east-1");
        }
        match options.path_style {
            Some(path_style) => builder = builder.with_virtual_hosted_style_request(!path_style),
            None if var("AWS_VIRTUAL_HOSTED_STYLE_REQUEST").is_none() => builder = builder.with_virtual_hosted_style_request(false),
            None => {}
        }
        // Fail within seconds while the bucket is down (the default retries for 3 minutes):
        // a download answers 503 + Retry-After and an output store is retried by the runner.
        // A refused connection fails after four quick retries (100 ms doubling: ~1.5 s); a
        // request that hangs to the client's 30 s timeout is still retried within 90 s.
        builder = builder.with_retry(object_store::RetryConfig { backoff: Default::default(), max_retries: 4, retry_timeout: Duration::from_secs(90) });
        let s3 = builder.build().map_err(|e| BlobError::Io(format!("configuring the S3 client: {}", scrub(&e))))?;
        Ok(S3BlobStore { s3: Arc::new(s3), prefix: location.prefix.clone(), presign_for: options.presign_for, checked: Arc::default() })
    }

    fn path_of(&self, hash: &str) -> Result<ObjectPath, BlobError> {
        if !is_valid_hash(hash) {
            return Err(BlobError::BadHash(hash.chars().take(80).collect()));
        }
        let hex = &hash["blake3:".len()..];
        let key = if self.prefix.is_empty() { format!("{}/{hex}", &hex[..2]) } else { format!("{}/{}/{hex}", self.prefix, &hex[..2]) };
        Ok(ObjectPath::from(key))
    }

    /// Where a streamed upload lands before its hash is known (`<prefix>/tmp/<uuid>`; the
    /// sweeper never lists it as a blob, and a bucket lifecycle rule on `tmp/` may expire
    /// the leftovers of an instance killed mid-upload).
    fn upload_path(&self) -> ObjectPath {
        let name = uuid::Uuid::new_v4().simple().to_string();
        if self.prefix.is_empty() { ObjectPath::from(format!("tmp/{name}")) } else { ObjectPath::from(format!("{}/tmp/{name}", self.prefix)) }
    }

    fn hash_of_path(&self, path: &ObjectPath) -> Option<String> {
        let hex = path.filename()?;
        let hash = format!("blake3:{hex}");
        is_valid_hash(&hash).then_some(hash)
    }
}

/// An `object_store` error as text without endpoint, bucket or key material: the
/// kind of failure only (the detail goes to the log at debug level).
fn scrub(e: &object_store::Error) -> &'static str {
    tracing::debug!(error = %e, "S3 request failed");
    match e {
        object_store::Error::NotFound { .. } => "not found",
        object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. } => "access denied (check the AWS credentials)",
        object_store::Error::Precondition { .. } | object_store::Error::AlreadyExists { .. } => "conflicting write",
        _ => "the bucket could not be reached or answered an error",
    }
}

fn s3_error(hash: &str, e: object_store::Error) -> BlobError {
    match e {
        object_store::Error::NotFound { .. } => BlobError::NotFound(hash.to_string()),
        other => BlobError::Io(format!("S3: {}", scrub(&other))),
    }
}

#[async_trait]
impl BlobStore for S3BlobStore {
    async fn put(&self, bytes: Bytes) -> Result<(String, bool), BlobError> {
        let hash = hash_of(&bytes);
        let path = self.path_of(&hash)?;
        // Content-addressed: an existing object already holds these bytes. Two instances
        // racing on the same new content both write identical bytes (an S3 PUT is atomic).
        match self.s3.head(&path).await {
            Ok(_) => return Ok((hash, false)),
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(s3_error(&hash, e)),
        }
        self.s3.put(&path, PutPayload::from_bytes(bytes)).await.map_err(|e| s3_error(&hash, e))?;
        Ok((hash, true))
    }

    async fn put_stream(&self, mut chunks: BoxStream<'_, Result<Bytes, BlobError>>, expected: Option<&str>) -> Result<StreamedPut, BlobError> {
        // The key is the hash, known only at the end: the bytes go to a temporary key by
        // multipart upload (one part buffered, one in flight), then are copied in place.
        let tmp = self.upload_path();
        let upload = self.s3.put_multipart(&tmp).await.map_err(|e| s3_error("(upload)", e))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, UPLOAD_PART);
        let mut hash = PassingHash::default();
        while let Some(chunk) = chunks.next().await {
            let chunk = match chunk {
                Ok(chunk) => chunk,
                Err(e) => {
                    let _ = writer.abort().await;
                    return Err(e);
                }
            };
            hash.update(&chunk);
            if let Err(e) = writer.wait_for_capacity(1).await {
                let _ = writer.abort().await;
                return Err(s3_error("(upload)", e));
            }
            writer.put(chunk);
        }
        writer.finish().await.map_err(|e| s3_error("(upload)", e))?;
        let settled = self.settle_upload(&tmp, hash.finish(expected)).await;
        if let Err(e) = self.s3.delete(&tmp).await {
            tracing::warn!(error = scrub(&e), "could not remove a temporary upload object");
        }
        settled
    }

    async fn size(&self, hash: &str) -> Result<Option<u64>, BlobError> {
        let path = self.path_of(hash)?;
        match self.s3.head(&path).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(s3_error(hash, e)),
        }
    }

    async fn get_stream(&self, hash: &str, offset: u64, len: u64) -> Result<ByteStream, BlobError> {
        let path = self.path_of(hash)?;
        let size = self.size(hash).await?.ok_or_else(|| BlobError::NotFound(hash.to_string()))?;
        let start = offset.min(size);
        let end = start.saturating_add(len).min(size);
        if start == end {
            return Ok(futures::stream::empty().boxed());
        }
        let got = self.s3.get_opts(&path, GetOptions::new().with_range(Some(start..end))).await.map_err(|e| s3_error(hash, e))?;
        let hash = hash.to_string();
        Ok(got.into_stream().map_err(move |e| s3_error(&hash, e)).boxed())
    }

    async fn exists(&self, hash: &str) -> Result<bool, BlobError> {
        let path = self.path_of(hash)?;
        match self.s3.head(&path).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(s3_error(hash, e)),
        }
    }

    async fn get(&self, hash: &str) -> Result<Bytes, BlobError> {
        let path = self.path_of(hash)?;
        let got = self.s3.get(&path).await.map_err(|e| s3_error(hash, e))?;
        got.bytes().await.map_err(|e| s3_error(hash, e))
    }

    async fn get_range(&self, hash: &str, offset: u64, len: u64) -> Result<Bytes, BlobError> {
        let path = self.path_of(hash)?;
        let size = self.s3.head(&path).await.map_err(|e| s3_error(hash, e))?.size;
        let start = offset.min(size);
        let end = start.saturating_add(len).min(size);
        if start == end {
            return Ok(Bytes::new());
        }
        self.s3.get_range(&path, start..end).await.map_err(|e| s3_error(hash, e))
    }

    async fn delete(&self, hash: &str) -> Result<bool, BlobError> {
        let existed = self.exists(hash).await?;
        if existed {
            let path = self.path_of(hash)?;
            match self.s3.delete(&path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(s3_error(hash, e)),
            }
        }
        Ok(existed)
    }

    async fn list(&self) -> Result<Vec<(String, SystemTime)>, BlobError> {
        let prefix = (!self.prefix.is_empty()).then(|| ObjectPath::from(self.prefix.as_str()));
        let metas: Vec<object_store::ObjectMeta> = self.s3.list(prefix.as_ref()).try_collect().await.map_err(|e| s3_error("(listing)", e))?;
        Ok(metas.into_iter().filter_map(|m| self.hash_of_path(&m.location).map(|h| (h, SystemTime::from(m.last_modified)))).collect())
    }

    async fn presigned_get(&self, hash: &str) -> Result<Option<String>, BlobError> {
        let path = self.path_of(hash)?;
        let Some(expires_in) = self.presign_for else { return Ok(None) };
        let url = self.s3.signed_url(http::Method::GET, &path, expires_in).await.map_err(|e| s3_error(hash, e))?;
        Ok(Some(url.to_string()))
    }

    async fn check(&self) -> Result<(), BlobError> {
        if let Some((at, reachable)) = *self.checked.lock().unwrap_or_else(|p| p.into_inner()) {
            if at.elapsed() < CHECK_FOR {
                return if reachable { Ok(()) } else { Err(BlobError::Io("S3: the bucket could not be reached".into())) };
            }
        }
        let probe = if self.prefix.is_empty() { ObjectPath::from("flowhost-readiness-probe") } else { ObjectPath::from(format!("{}/flowhost-readiness-probe", self.prefix)) };
        let answer = match tokio::time::timeout(CHECK_TIMEOUT, self.s3.head(&probe)).await {
            Ok(Ok(_)) | Ok(Err(object_store::Error::NotFound { .. })) => Ok(()),
            Ok(Err(e)) => Err(BlobError::Io(format!("S3: {}", scrub(&e)))),
            Err(_) => Err(BlobError::Io("S3: the bucket did not answer in time".into())),
        };
        *self.checked.lock().unwrap_or_else(|p| p.into_inner()) = Some((std::time::Instant::now(), answer.is_ok()));
        answer
    }

    fn kind(&self) -> &'static str {
        "s3"
    }
}

impl S3BlobStore {
    /// At start: the bucket exists and these credentials may list it (a listing of the
    /// prefix; a HEAD cannot tell a missing bucket from a missing object). The error says
    /// which, without endpoint or keys.
    pub async fn verify_bucket(&self) -> Result<(), String> {
        let prefix = (!self.prefix.is_empty()).then(|| ObjectPath::from(self.prefix.as_str()));
        match tokio::time::timeout(Duration::from_secs(20), self.s3.list_with_delimiter(prefix.as_ref())).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(object_store::Error::NotFound { .. })) => Err("the bucket does not exist (create it first)".into()),
            // A listing's 404 comes back as a generic error carrying S3's code.
            Ok(Err(e)) if e.to_string().contains("NoSuchBucket") => Err("the bucket does not exist (create it first)".into()),
            Ok(Err(e)) => Err(scrub(&e).to_string()),
            Err(_) => Err("the bucket did not answer within 20 s".into()),
        }
    }

    /// A finished temporary upload copied to its content address (unless those bytes are
    /// already there, or they hash to something else than the caller said).
    async fn settle_upload(&self, tmp: &ObjectPath, hashed: Result<(String, u64), BlobError>) -> Result<StreamedPut, BlobError> {
        let (hash, size) = hashed?;
        if self.exists(&hash).await? {
            return Ok(StreamedPut { hash, size, created_new: false });
        }
        let path = self.path_of(&hash)?;
        self.s3.copy(tmp, &path).await.map_err(|e| s3_error(&hash, e))?;
        Ok(StreamedPut { hash, size, created_new: true })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_url_is_parsed_into_bucket_and_prefix() {
        assert_eq!(S3Location::parse("s3://flow-out/prod/blobs/").unwrap(), S3Location { bucket: "flow-out".into(), prefix: "prod/blobs".into() });
        assert_eq!(S3Location::parse("s3://flow-out").unwrap(), S3Location { bucket: "flow-out".into(), prefix: String::new() });
    }

    #[test]
    fn a_bad_bucket_url_is_refused_with_what_is_wrong() {
        assert!(S3Location::parse("https://flow-out/x").unwrap_err().contains("s3://"));
        assert!(S3Location::parse("s3://Flow_Out").unwrap_err().contains("bucket name"));
        assert!(S3Location::parse("s3://flow-out/a/../b").unwrap_err().contains("prefix"));
    }
}
