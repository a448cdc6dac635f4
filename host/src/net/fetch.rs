//! Bounded downloads of caller-named URLs (a LoRA, a reference image): every hop vetted
//! by the destination guard, the connection pinned to the vetted addresses, redirects
//! followed by hand and re-vetted, connect and idle-read timeouts inside the caller's
//! deadline, a byte cap enforced on the declared length and on the bytes that arrive, and
//! the body streamed to a temporary file while it is hashed (blake3 always, sha256 when
//! asked), so memory stays bounded whatever the file's size.
//!
//! Owns: the fetch client and the classification of what went wrong ([`FetchError`]).
//! Must never: read a body into memory unbounded, connect where [`DestinationPolicy`] did not
//! allow, follow a redirect without re-vetting it, or name in an error an address or host
//! the caller did not send (a redirect's target stays unnamed).

use std::path::Path;
use std::time::Duration;

use futures::StreamExt as _;
use reqwest::header::{CONTENT_LENGTH, LOCATION, USER_AGENT};
use sha2::Digest as _;
use tokio::io::AsyncWriteExt as _;
use tokio::time::Instant;
use url::Url;

use super::destination::{DestinationError, DestinationPolicy, VettingResolver, refusal_in};

/// Redirects followed per fetch (each re-vetted).
pub const MAX_REDIRECTS: usize = 5;
/// Default longest TCP/TLS connect.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default longest wait for the next bytes of a body (or for the answer's headers).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes buffered before a write to disk.
const WRITE_BUFFER: usize = 1 << 20;

/// Why a fetch failed. Messages are safe to show to the caller: they name the rule or the
/// upstream status, never a resolved address or a redirect's target.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    /// The URL the caller sent breaks the destination policy.
    #[error("{0}")]
    Refused(DestinationError),
    /// A redirect pointed somewhere the policy refuses (the target is not named).
    #[error("the server redirected to a destination this server refuses ({})", redirect_reason(.0))]
    RedirectRefused(DestinationError),
    /// The declared or received body is larger than the cap.
    #[error("the file is larger than the {cap} bytes allowed")]
    TooLarge { cap: u64 },
    /// The upstream server answered an error, nonsense, or could not be reached.
    #[error("{0}")]
    Upstream(String),
    /// The deadline (or the idle-read bound) passed before the body was complete.
    #[error("the download did not finish in time ({0})")]
    Timeout(String),
    /// A local failure (disk): not the caller's fault.
    #[error("storing the download failed: {0}")]
    Local(String),
}

/// A refusal's reason in words without the host it names.
fn redirect_reason(error: &DestinationError) -> String {
    match error {
        DestinationError::NotAllowListed(_) => "its host is not on this server's allow-list".into(),
        DestinationError::ForbiddenAddress(why) | DestinationError::ResolvesToForbidden(why) => format!("a {why} address"),
        other => other.to_string(),
    }
}

/// The fetcher's bounds.
#[derive(Debug, Clone, Copy)]
pub struct FetchLimits {
    pub connect_timeout: Duration,
    /// Longest wait for the answer's headers or for the next chunk of the body.
    pub idle_timeout: Duration,
}

impl Default for FetchLimits {
    fn default() -> Self {
        Self { connect_timeout: DEFAULT_CONNECT_TIMEOUT, idle_timeout: DEFAULT_IDLE_TIMEOUT }
    }
}

/// A completed download in a temporary file (removed when dropped unless persisted).
#[derive(Debug)]
pub struct Downloaded {
    pub file: tempfile::TempPath,
    pub size: u64,
    /// Lowercase hex.
    pub blake3: String,
    /// Lowercase hex, when asked for.
    pub sha256: Option<String>,
}

/// The hashes computed while bytes stream through.
pub struct Hashing {
    blake3: blake3::Hasher,
    sha256: Option<sha2::Sha256>,
    size: u64,
}

impl Hashing {
    pub fn new(sha256: bool) -> Self {
        Self { blake3: blake3::Hasher::new(), sha256: sha256.then(sha2::Sha256::new), size: 0 }
    }

    pub fn update(&mut self, chunk: &[u8]) {
        self.blake3.update(chunk);
        if let Some(sha) = &mut self.sha256 {
            sha.update(chunk);
        }
        self.size += chunk.len() as u64;
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// (size, blake3 hex, sha256 hex).
    pub fn finish(self) -> (u64, String, Option<String>) {
        (self.size, self.blake3.finalize().to_hex().to_string(), self.sha256.map(|s| hex::encode(s.finalize())))
    }
}

/// Downloads URLs under a policy. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Fetcher {
    client: reqwest::Client,
    policy: DestinationPolicy,
    limits: FetchLimits,
}

impl Fetcher {
    pub fn new(policy: DestinationPolicy, limits: FetchLimits) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .dns_resolver(std::sync::Arc::new(VettingResolver::new(policy.clone())))
            // A proxy would resolve the destination itself, past the vetting resolver.
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(limits.connect_timeout)
            .pool_idle_timeout(Duration::from_secs(30))
            .build()?;
        Ok(Self { client, policy, limits })
    }

    pub fn policy(&self) -> &DestinationPolicy {
        &self.policy
    }

    /// The request-time check of a caller's URL (no DNS: every connection vets again).
    pub fn check(&self, url: &str) -> Result<Url, DestinationError> {
        self.policy.check_url(url)
    }

    /// Open `url`, following vetted redirects, up to an answer with a 2xx status and a body
    /// no larger than `max_bytes` as far as its headers say.
    async fn open(&self, url: &Url, max_bytes: u64, deadline: Instant) -> Result<reqwest::Response, FetchError> {
        self.policy.check_parsed(url).map_err(FetchError::Refused)?;
        let mut target = url.clone();
        for hop in 0..=MAX_REDIRECTS {
            let wait = self.limits.idle_timeout.min(deadline.saturating_duration_since(Instant::now()));
            let sent = self.client.get(target.clone()).header(USER_AGENT, concat!("flowhost/", env!("CARGO_PKG_VERSION"))).send();
            let response = match tokio::time::timeout(wait, sent).await {
                Err(_) => return Err(timeout_error(deadline, self.limits.idle_timeout, "waiting for the server's answer")),
                Ok(Err(error)) => return Err(classify(&error, hop > 0, deadline, self.limits)),
                Ok(Ok(response)) => response,
            };
            let status = response.status();
            if status.is_redirection() {
                let next = response.headers().get(LOCATION).and_then(|v| v.to_str().ok()).and_then(|location| target.join(location).ok());
                let Some(next) = next else {
                    return Err(FetchError::Upstream(format!("the server answered {} without a usable Location", status.as_u16())));
                };
                self.policy.check_parsed(&next).map_err(FetchError::RedirectRefused)?;
                target = next;
                continue;
            }
            if !status.is_success() {
                return Err(FetchError::Upstream(format!("the server answered {}", status.as_u16())));
            }
            let declared = response.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
            if declared.is_some_and(|len| len > max_bytes) {
                return Err(FetchError::TooLarge { cap: max_bytes });
            }
            return Ok(response);
        }
        Err(FetchError::Upstream(format!("the server redirected more than {MAX_REDIRECTS} times")))
    }

    /// Stream `url`'s body into a new temporary file in `dir`, at most `max_bytes`, before
    /// `deadline`, hashing it on the way (sha256 too when `sha256`). Nothing of a failed
    /// download is left in `dir`.
    pub async fn to_file(&self, url: &Url, dir: &Path, max_bytes: u64, deadline: Instant, sha256: bool) -> Result<Downloaded, FetchError> {
        let response = self.open(url, max_bytes, deadline).await?;
        let temp = tempfile::Builder::new().prefix("fetch-").suffix(".part").tempfile_in(dir).map_err(|e| FetchError::Local(e.to_string()))?;
        let (file, path) = temp.into_parts();
        let mut out = tokio::io::BufWriter::with_capacity(WRITE_BUFFER, tokio::fs::File::from_std(file));
        let mut hashing = Hashing::new(sha256);
        let mut body = response.bytes_stream();
        loop {
            let wait = self.limits.idle_timeout.min(deadline.saturating_duration_since(Instant::now()));
            let chunk = match tokio::time::timeout(wait, body.next()).await {
                Err(_) => return Err(timeout_error(deadline, self.limits.idle_timeout, "reading the body")),
                Ok(None) => break,
                Ok(Some(Err(error))) => return Err(classify(&error, false, deadline, self.limits)),
                Ok(Some(Ok(chunk))) => chunk,
            };
            if hashing.size() + chunk.len() as u64 > max_bytes {
                return Err(FetchError::TooLarge { cap: max_bytes });
            }
            hashing.update(&chunk);
            out.write_all(&chunk).await.map_err(|e| FetchError::Local(e.to_string()))?;
        }
        out.flush().await.map_err(|e| FetchError::Local(e.to_string()))?;
        let file = out.into_inner();
        file.sync_data().await.map_err(|e| FetchError::Local(e.to_string()))?;
        let (size, blake3, sha256) = hashing.finish();
        Ok(Downloaded { file: path, size, blake3, sha256 })
    }

    /// `url`'s body in memory, at most `max_bytes` (for small files: reference images).
    pub async fn to_memory(&self, url: &Url, max_bytes: u64, deadline: Instant) -> Result<bytes::Bytes, FetchError> {
        let response = self.open(url, max_bytes, deadline).await?;
        let mut body = response.bytes_stream();
        let mut bytes = bytes::BytesMut::new();
        loop {
            let wait = self.limits.idle_timeout.min(deadline.saturating_duration_since(Instant::now()));
            match tokio::time::timeout(wait, body.next()).await {
                Err(_) => return Err(timeout_error(deadline, self.limits.idle_timeout, "reading the body")),
                Ok(None) => return Ok(bytes.freeze()),
                Ok(Some(Err(error))) => return Err(classify(&error, false, deadline, self.limits)),
                Ok(Some(Ok(chunk))) => {
                    if (bytes.len() + chunk.len()) as u64 > max_bytes {
                        return Err(FetchError::TooLarge { cap: max_bytes });
                    }
                    bytes.extend_from_slice(&chunk);
                }
            }
        }
    }
}

/// The deadline or the idle bound, whichever ran out.
fn timeout_error(deadline: Instant, idle: Duration, doing: &str) -> FetchError {
    if Instant::now() >= deadline {
        FetchError::Timeout(format!("the request's deadline passed while {doing}"))
    } else {
        FetchError::Timeout(format!("no bytes for {} s while {doing}", idle.as_secs()))
    }
}

fn classify(error: &reqwest::Error, redirected: bool, deadline: Instant, limits: FetchLimits) -> FetchError {
    if let Some(refusal) = refusal_in(error) {
        return match refusal {
            DestinationError::Unresolvable => FetchError::Upstream("the host could not be resolved".into()),
            refusal if redirected => FetchError::RedirectRefused(refusal),
            refusal => FetchError::Refused(refusal),
        };
    }
    if error.is_timeout() {
        return if error.is_connect() {
            FetchError::Timeout(format!("no connection within {} s", limits.connect_timeout.as_secs()))
        } else {
            timeout_error(deadline, limits.idle_timeout, "downloading")
        };
    }
    if error.is_connect() {
        return FetchError::Upstream("could not connect to the server".into());
    }
    if error.is_body() || error.is_decode() {
        return FetchError::Upstream("the server's answer broke off".into());
    }
    FetchError::Upstream("the request to the server failed".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use axum::body::Body;
    use axum::http::StatusCode;
    use axum::response::{IntoResponse, Response};
    use axum::routing::get;

    struct Server {
        base: String,
        hits: Arc<AtomicUsize>,
    }

    async fn server() -> Server {
        let hits = Arc::new(AtomicUsize::new(0));
        let counted = hits.clone();
        let app = axum::Router::new()
            .route("/file", get(|| async { vec![7u8; 300_000] }))
            .route("/redirect-private", get(|| async { (StatusCode::FOUND, [("location", "http://10.1.2.3/file")]).into_response() }))
            .route("/redirect-name", get(|| async { (StatusCode::FOUND, [("location", "http://internal.example/file")]).into_response() }))
            .route("/redirect-loop", get(|| async { (StatusCode::FOUND, [("location", "/redirect-loop")]).into_response() }))
            .route("/missing", get(|| async { StatusCode::NOT_FOUND }))
            .route(
                "/endless",
                get(|| async {
                    let chunks = futures::stream::repeat_with(|| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![1u8; 64 << 10])));
                    Response::new(Body::from_stream(chunks))
                }),
            )
            .route(
                "/stall",
                get(|| async {
                    let first = futures::stream::once(async { Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"begin")) });
                    Response::new(Body::from_stream(first.chain(futures::stream::pending())))
                }),
            )
            .layer(axum::middleware::from_fn(move |request: axum::extract::Request, next: axum::middleware::Next| {
                let counted = counted.clone();
                async move {
                    counted.fetch_add(1, Ordering::SeqCst);
                    next.run(request).await
                }
            }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Server { base, hits }
    }

    fn fetcher(idle: Duration) -> Fetcher {
        Fetcher::new(DestinationPolicy::new(["127.0.0.1".to_owned()]), FetchLimits { connect_timeout: Duration::from_secs(2), idle_timeout: idle }).unwrap()
    }

    fn url(server: &Server, path: &str) -> Url {
        Url::parse(&format!("{}{path}", server.base)).unwrap()
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(20)
    }

    #[tokio::test]
    async fn a_file_is_streamed_to_disk_and_hashed() {
        let server = server().await;
        let dir = tempfile::tempdir().unwrap();
        let got = fetcher(DEFAULT_IDLE_TIMEOUT).to_file(&url(&server, "/file"), dir.path(), 1 << 20, soon(), true).await.unwrap();
        let bytes = std::fs::read(&got.file).unwrap();
        assert_eq!((got.size, bytes.len()), (300_000, 300_000));
        assert_eq!(got.blake3, blake3::hash(&bytes).to_hex().to_string());
        assert_eq!(got.sha256.as_deref(), Some(hex::encode(sha2::Sha256::digest(&bytes)).as_str()));
    }

    #[tokio::test]
    async fn over_the_cap_by_declared_length_or_by_what_arrives_fails_and_leaves_nothing() {
        let server = server().await;
        let dir = tempfile::tempdir().unwrap();
        let f = fetcher(DEFAULT_IDLE_TIMEOUT);
        assert_eq!(f.to_file(&url(&server, "/file"), dir.path(), 1000, soon(), false).await.unwrap_err(), FetchError::TooLarge { cap: 1000 });
        // An endless chunked body declares no length: the count stops it.
        assert_eq!(f.to_file(&url(&server, "/endless"), dir.path(), 1 << 20, soon(), false).await.unwrap_err(), FetchError::TooLarge { cap: 1 << 20 });
        assert_eq!(f.to_memory(&url(&server, "/endless"), 1 << 20, soon()).await.unwrap_err(), FetchError::TooLarge { cap: 1 << 20 });
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "a failed download leaves no file");
    }

    #[tokio::test]
    async fn a_stalled_body_is_bounded_by_the_idle_timeout_and_by_the_deadline() {
        let server = server().await;
        let dir = tempfile::tempdir().unwrap();
        let error = fetcher(Duration::from_millis(300)).to_file(&url(&server, "/stall"), dir.path(), 1 << 20, soon(), false).await.unwrap_err();
        assert!(matches!(&error, FetchError::Timeout(why) if why.contains("no bytes for")), "{error:?}");
        let deadline = Instant::now() + Duration::from_millis(300);
        let error = fetcher(DEFAULT_IDLE_TIMEOUT).to_file(&url(&server, "/stall"), dir.path(), 1 << 20, deadline, false).await.unwrap_err();
        assert!(matches!(&error, FetchError::Timeout(why) if why.contains("deadline")), "{error:?}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn ssrf_via_redirect_to_a_private_address_or_an_unlisted_host_is_refused_without_naming_it() {
        let server = server().await;
        let dir = tempfile::tempdir().unwrap();
        let f = fetcher(DEFAULT_IDLE_TIMEOUT);
        let error = f.to_file(&url(&server, "/redirect-private"), dir.path(), 1 << 20, soon(), false).await.unwrap_err();
        assert_eq!(error, FetchError::RedirectRefused(DestinationError::ForbiddenAddress("private")));
        let error = f.to_file(&url(&server, "/redirect-name"), dir.path(), 1 << 20, soon(), false).await.unwrap_err();
        let text = error.to_string();
        assert!(matches!(error, FetchError::RedirectRefused(_)) && !text.contains("internal.example"), "{text}");
        assert!(text.contains("allow-list"), "{text}");
    }

    #[tokio::test]
    async fn upstream_errors_and_redirect_loops_are_upstream_failures() {
        let server = server().await;
        let dir = tempfile::tempdir().unwrap();
        let f = fetcher(DEFAULT_IDLE_TIMEOUT);
        assert_eq!(
            f.to_file(&url(&server, "/missing"), dir.path(), 1 << 20, soon(), false).await.unwrap_err(),
            FetchError::Upstream("the server answered 404".into())
        );
        let error = f.to_file(&url(&server, "/redirect-loop"), dir.path(), 1 << 20, soon(), false).await.unwrap_err();
        assert_eq!(error, FetchError::Upstream(format!("the server redirected more than {MAX_REDIRECTS} times")));
        assert_eq!(server.hits.load(Ordering::SeqCst), 2 + MAX_REDIRECTS);
    }

    #[tokio::test]
    async fn plain_http_to_a_public_name_and_internal_literals_are_refused_before_connecting() {
        let f = Fetcher::new(DestinationPolicy::default(), FetchLimits::default()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        for (text, refusal) in [
            ("http://example.com/lora.safetensors", DestinationError::NotHttps),
            ("https://169.254.169.254/latest/meta-data/", DestinationError::ForbiddenAddress("link-local (cloud metadata)")),
            ("https://127.0.0.1/x", DestinationError::ForbiddenAddress("loopback")),
        ] {
            let error = f.to_file(&Url::parse(text).unwrap(), dir.path(), 1 << 20, soon(), false).await.unwrap_err();
            assert_eq!(error, FetchError::Refused(refusal), "{text}");
        }
    }
}
