//! `flowhost models pull` against a local stand-in for Hugging Face on 127.0.0.1: resolve URLs
//! answer HEAD with a redirect carrying `X-Linked-Size`/`X-Linked-ETag` (as huggingface.co does
//! for LFS files) and GET with a redirect to a "CDN" path that serves bytes with Range support.
//! The server can cut connections mid-body, require a token, serve wrong bytes, ignore Range,
//! and hold downloads to observe how many run at once. It also stands in for GitHub releases:
//! `/{owner}/{repo}/releases/download/{tag}/{name}` answers with a bare redirect to the CDN path
//! (no size, no checksum), as github.com does for `url` entries.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use flowhost::models::manifest::{Manifest, ModelFile};
use flowhost::models::pull::{PullOptions, PullOutcome, PullReport, Verification, pull};
use sha2::{Digest, Sha256};

const REPO: &str = "acme/diffusion";

fn content(len: usize, seed: u32) -> Vec<u8> {
    let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            (state >> 16) as u8
        })
        .collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[derive(Debug, Clone)]
struct Logged {
    method: Method,
    path: String,
    range: Option<String>,
    authorization: Option<String>,
}

#[derive(Default)]
struct Hub {
    /// Repo path (`model.bin`) → bytes actually served.
    files: Mutex<HashMap<String, Vec<u8>>>,
    /// Repo path → SHA-256 advertised in `X-Linked-ETag`.
    advertised_sha: Mutex<HashMap<String, String>>,
    required_token: Option<String>,
    /// How many upcoming CDN GETs are cut, and after how many bytes.
    cuts_left: AtomicUsize,
    cut_after: usize,
    ignore_range: bool,
    /// Host (with port) the resolve redirect points at; the request's own host when `None`.
    cdn_host: Option<String>,
    /// Hold each CDN GET until this many are in flight (0: never hold).
    hold_until_in_flight: usize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    log: Mutex<Vec<Logged>>,
}

impl Hub {
    fn serve_file(&self, path: &str, bytes: Vec<u8>) {
        self.files.lock().unwrap().insert(path.to_owned(), bytes);
    }
    fn advertise_sha(&self, path: &str, sha: &str) {
        self.advertised_sha
            .lock()
            .unwrap()
            .insert(path.to_owned(), sha.to_owned());
    }
    fn gets(&self) -> Vec<Logged> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.method == Method::GET && l.path.starts_with("/cdn/"))
            .cloned()
            .collect()
    }
    fn clear_log(&self) {
        self.log.lock().unwrap().clear();
    }
}

async fn hub_handler(
    State(hub): State<Arc<Hub>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let cdn_prefix = match &hub.cdn_host {
        Some(host) => format!("http://{host}/cdn/"),
        None => "/cdn/".to_owned(),
    };
    let header_text = |name: header::HeaderName| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    hub.log.lock().unwrap().push(Logged {
        method: method.clone(),
        path: uri.path().to_owned(),
        range: header_text(header::RANGE),
        authorization: header_text(header::AUTHORIZATION),
    });
    let path = uri.path();
    if let Some(file) = path.strip_prefix("/cdn/") {
        return serve_cdn(&hub, file, header_text(header::RANGE)).await;
    }
    if let Some((_tag, name)) = path
        .split_once("/releases/download/")
        .and_then(|(_, rest)| rest.split_once('/'))
    {
        if !hub.files.lock().unwrap().contains_key(name) {
            return (StatusCode::NOT_FOUND, "Not Found").into_response();
        }
        return Response::builder()
            .status(StatusCode::FOUND)
            .header(header::LOCATION, format!("{cdn_prefix}{name}"))
            .body(Body::empty())
            .unwrap();
    }
    let prefix = format!("/{REPO}/resolve/main/");
    let Some(file) = path.strip_prefix(prefix.as_str()) else {
        return (StatusCode::NOT_FOUND, "Repository not found").into_response();
    };
    if let Some(token) = &hub.required_token
        && header_text(header::AUTHORIZATION).as_deref() != Some(format!("Bearer {token}").as_str())
    {
        let status = if headers.contains_key(header::AUTHORIZATION) {
            StatusCode::FORBIDDEN
        } else {
            StatusCode::UNAUTHORIZED
        };
        return (status, "Access to model acme/diffusion is restricted.").into_response();
    }
    let Some(len) = hub.files.lock().unwrap().get(file).map(Vec::len) else {
        return (StatusCode::NOT_FOUND, "Entry not found").into_response();
    };
    let mut response = Response::builder()
        .status(StatusCode::FOUND)
        .header(header::LOCATION, format!("{cdn_prefix}{file}"))
        .header("x-linked-size", len.to_string());
    if let Some(sha) = hub.advertised_sha.lock().unwrap().get(file) {
        response = response.header("x-linked-etag", format!("\"{sha}\""));
    }
    response.body(Body::empty()).unwrap()
}

async fn serve_cdn(hub: &Hub, file: &str, range: Option<String>) -> Response {
    let Some(bytes) = hub.files.lock().unwrap().get(file).cloned() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let now = hub.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    hub.max_in_flight.fetch_max(now, Ordering::SeqCst);
    if hub.hold_until_in_flight > 0 {
        // Fallback deadline so a broken bound fails the assertion instead of hanging the test.
        for _ in 0..300 {
            if hub.in_flight.load(Ordering::SeqCst) >= hub.hold_until_in_flight {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    hub.in_flight.fetch_sub(1, Ordering::SeqCst);

    let total = bytes.len();
    let start = range.filter(|_| !hub.ignore_range).and_then(|r| {
        r.strip_prefix("bytes=")
            .and_then(|r| r.strip_suffix('-'))
            .and_then(|n| n.parse::<usize>().ok())
    });
    let (status, body) = match start {
        Some(start) if start >= total => {
            return Response::builder()
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header(header::CONTENT_RANGE, format!("bytes */{total}"))
                .body(Body::empty())
                .unwrap();
        }
        Some(start) => (StatusCode::PARTIAL_CONTENT, bytes[start..].to_vec()),
        None => (StatusCode::OK, bytes),
    };
    let mut response = Response::builder()
        .status(status)
        .header(header::CONTENT_LENGTH, body.len().to_string());
    if let Some(start) = start {
        response = response.header(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{total}", total - 1),
        );
    }
    let cut = hub
        .cuts_left
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    if cut && body.len() > hub.cut_after {
        let head = Bytes::copy_from_slice(&body[..hub.cut_after]);
        let stream = futures::stream::unfold(0u8, move |step| {
            let head = head.clone();
            async move {
                match step {
                    0 => Some((Ok::<Bytes, std::io::Error>(head), 1)),
                    1 => {
                        // Let the first bytes reach the client before the connection dies.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        Some((Err(std::io::Error::other("connection cut by test")), 2))
                    }
                    _ => None,
                }
            }
        });
        return response.body(Body::from_stream(stream)).unwrap();
    }
    response.body(Body::from(body)).unwrap()
}

async fn start_hub(hub: Hub) -> (Arc<Hub>, String) {
    let hub = Arc::new(hub);
    let app = axum::Router::new()
        .fallback(hub_handler)
        .with_state(hub.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (hub, format!("http://{address}"))
}

fn entry(path: &str, folder: &str, sha256: Option<&str>) -> ModelFile {
    let mut json = serde_json::json!({"repo": REPO, "path": path, "folder": folder});
    if let Some(sha) = sha256 {
        json["sha256"] = sha.into();
    }
    serde_json::from_value(json).unwrap()
}

fn options(models: &Path, endpoint: &str) -> PullOptions {
    PullOptions {
        models_dir: models.to_path_buf(),
        concurrency: 4,
        retries: 0,
        endpoint: endpoint.to_owned(),
        token: None,
        progress: false,
    }
}

fn only_outcome(report: &PullReport) -> &anyhow::Result<PullOutcome> {
    assert_eq!(report.files.len(), 1);
    &report.files[0].outcome
}

fn error_text(report: &PullReport) -> String {
    match only_outcome(report) {
        Err(err) => format!("{err:#}"),
        Ok(outcome) => panic!("expected a failure, got {outcome:?}"),
    }
}

mod resume {
    use super::*;

    #[tokio::test]
    async fn second_run_completes_from_the_part_file_with_a_range_request() {
        let bytes = content(1 << 20, 1);
        let hub = Hub {
            cut_after: 300_000,
            ..Hub::default()
        };
        hub.cuts_left.store(1, Ordering::SeqCst);
        let (hub, endpoint) = start_hub(hub).await;
        hub.serve_file("unet/model.safetensors", bytes.clone());
        let models = tempfile::tempdir().unwrap();
        let files = [entry(
            "unet/model.safetensors",
            "diffusion_models",
            Some(&sha256_hex(&bytes)),
        )];
        let destination = models.path().join("diffusion_models/model.safetensors");
        let part = models
            .path()
            .join("diffusion_models/model.safetensors.part");

        let first = pull(&files, &options(models.path(), &endpoint))
            .await
            .unwrap();
        let message = error_text(&first);
        assert!(
            message.contains("interrupted") && message.contains("resume"),
            "{message}"
        );
        assert!(
            !destination.exists(),
            "a cut download must not be installed"
        );
        let kept = std::fs::metadata(&part)
            .expect(".part kept after the cut")
            .len();
        assert!(kept > 0 && kept < bytes.len() as u64, "kept {kept} bytes");

        hub.clear_log();
        let second = pull(&files, &options(models.path(), &endpoint))
            .await
            .unwrap();
        assert_eq!(
            only_outcome(&second).as_ref().unwrap(),
            &PullOutcome::Installed {
                bytes: bytes.len() as u64,
                resumed_from: kept,
                verified: Verification::ManifestSha256
            }
        );
        let gets = hub.gets();
        assert_eq!(gets.len(), 1, "{gets:?}");
        assert_eq!(
            gets[0].range.as_deref(),
            Some(format!("bytes={kept}-").as_str())
        );
        assert_eq!(std::fs::read(&destination).unwrap(), bytes);
        assert!(!part.exists(), ".part must be gone once installed");
    }

    #[tokio::test]
    async fn a_cut_is_resumed_within_the_same_run_when_retries_allow() {
        let bytes = content(600_000, 2);
        let hub = Hub {
            cut_after: 100_000,
            ..Hub::default()
        };
        hub.cuts_left.store(2, Ordering::SeqCst);
        let (hub, endpoint) = start_hub(hub).await;
        hub.serve_file("m.bin", bytes.clone());
        hub.advertise_sha("m.bin", &sha256_hex(&bytes));
        let models = tempfile::tempdir().unwrap();
        let files = [entry("m.bin", "checkpoints", None)];

        let report = pull(
            &files,
            &PullOptions {
                retries: 2,
                ..options(models.path(), &endpoint)
            },
        )
        .await
        .unwrap();
        assert!(
            matches!(
                only_outcome(&report),
                Ok(PullOutcome::Installed {
                    verified: Verification::ServerChecksum,
                    ..
                })
            ),
            "{report:?}"
        );
        let ranges: Vec<Option<String>> = hub.gets().into_iter().map(|g| g.range).collect();
        assert_eq!(
            ranges,
            vec![
                None,
                Some("bytes=100000-".into()),
                Some("bytes=200000-".into())
            ]
        );
        assert_eq!(
            std::fs::read(models.path().join("checkpoints/m.bin")).unwrap(),
            bytes
        );
    }

    #[tokio::test]
    async fn a_server_that_ignores_range_still_yields_the_right_file() {
        let bytes = content(400_000, 3);
        let hub = Hub {
            cut_after: 50_000,
            ignore_range: true,
            ..Hub::default()
        };
        hub.cuts_left.store(1, Ordering::SeqCst);
        let (hub, endpoint) = start_hub(hub).await;
        hub.serve_file("m.bin", bytes.clone());
        hub.advertise_sha("m.bin", &sha256_hex(&bytes));
        let models = tempfile::tempdir().unwrap();
        let files = [entry("m.bin", "vae", None)];

        let report = pull(
            &files,
            &PullOptions {
                retries: 1,
                ..options(models.path(), &endpoint)
            },
        )
        .await
        .unwrap();
        assert!(
            matches!(
                only_outcome(&report),
                Ok(PullOutcome::Installed {
                    verified: Verification::ServerChecksum,
                    ..
                })
            ),
            "{report:?}"
        );
        assert_eq!(
            std::fs::read(models.path().join("vae/m.bin")).unwrap(),
            bytes
        );
    }
}

mod checksum {
    use super::*;

    #[tokio::test]
    async fn wrong_bytes_against_the_manifest_sha256_are_not_installed() {
        let good = content(200_000, 4);
        let mut served = good.clone();
        served[123_456] ^= 0xff;
        let (hub, endpoint) = start_hub(Hub::default()).await;
        hub.serve_file("m.bin", served);
        let models = tempfile::tempdir().unwrap();
        let files = [entry("m.bin", "loras", Some(&sha256_hex(&good)))];

        let report = pull(&files, &options(models.path(), &endpoint))
            .await
            .unwrap();
        let message = error_text(&report);
        assert!(
            message.contains("checksum mismatch") && message.contains(&sha256_hex(&good)),
            "{message}"
        );
        assert!(!models.path().join("loras/m.bin").exists());
        assert!(
            !models.path().join("loras/m.bin.part").exists(),
            "bad .part must be removed"
        );
        assert!(report.into_result().is_err());
    }

    #[tokio::test]
    async fn wrong_bytes_against_the_checksum_hugging_face_advertises_are_not_installed() {
        let good = content(200_000, 5);
        let (hub, endpoint) = start_hub(Hub::default()).await;
        hub.serve_file("m.bin", content(200_000, 6));
        hub.advertise_sha("m.bin", &sha256_hex(&good));
        let models = tempfile::tempdir().unwrap();

        let report = pull(
            &[entry("m.bin", "loras", None)],
            &options(models.path(), &endpoint),
        )
        .await
        .unwrap();
        assert!(error_text(&report).contains("checksum mismatch"));
        assert!(!models.path().join("loras/m.bin").exists());
    }
}

mod auth {
    use super::*;

    fn gated_hub() -> Hub {
        Hub {
            required_token: Some("hf_good".into()),
            ..Hub::default()
        }
    }

    #[tokio::test]
    async fn gated_repo_without_token_names_the_repo_and_hf_token() {
        let (hub, endpoint) = start_hub(gated_hub()).await;
        hub.serve_file("m.bin", content(1000, 7));
        let models = tempfile::tempdir().unwrap();

        let report = pull(
            &[entry("m.bin", "vae", None)],
            &options(models.path(), &endpoint),
        )
        .await
        .unwrap();
        let message = error_text(&report);
        for needle in [REPO, "401", "HF_TOKEN", "licence"] {
            assert!(
                message.contains(needle),
                "{needle:?} missing from: {message}"
            );
        }
        assert!(!models.path().join("vae/m.bin").exists());
    }

    #[tokio::test]
    async fn rejected_token_says_the_token_was_refused() {
        let (hub, endpoint) = start_hub(gated_hub()).await;
        hub.serve_file("m.bin", content(1000, 7));
        let models = tempfile::tempdir().unwrap();
        let opts = PullOptions {
            token: Some("hf_wrong".into()),
            ..options(models.path(), &endpoint)
        };

        let message = error_text(&pull(&[entry("m.bin", "vae", None)], &opts).await.unwrap());
        assert!(
            message.contains("403")
                && message.contains("token in HF_TOKEN")
                && message.contains(REPO),
            "{message}"
        );
    }

    #[tokio::test]
    async fn valid_token_is_sent_as_bearer_and_the_file_installs() {
        let bytes = content(5000, 8);
        let (hub, endpoint) = start_hub(gated_hub()).await;
        hub.serve_file("m.bin", bytes.clone());
        let models = tempfile::tempdir().unwrap();
        let opts = PullOptions {
            token: Some("hf_good".into()),
            ..options(models.path(), &endpoint)
        };

        let report = pull(&[entry("m.bin", "vae", None)], &opts).await.unwrap();
        assert!(only_outcome(&report).is_ok(), "{report:?}");
        assert_eq!(
            std::fs::read(models.path().join("vae/m.bin")).unwrap(),
            bytes
        );
        let resolve_requests: Vec<Logged> = hub
            .log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.path.contains("/resolve/"))
            .cloned()
            .collect();
        assert!(
            resolve_requests
                .iter()
                .all(|l| l.authorization.as_deref() == Some("Bearer hf_good")),
            "{resolve_requests:?}"
        );
    }
}

mod token_leak {
    use super::*;

    #[tokio::test]
    async fn token_is_not_forwarded_when_hugging_face_redirects_to_another_host() {
        let bytes = content(4000, 11);
        // Same socket, different host name: the client must treat "localhost" as a foreign host.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let hub = Arc::new(Hub {
            required_token: Some("hf_secret".into()),
            cdn_host: Some(format!("localhost:{port}")),
            ..Hub::default()
        });
        hub.serve_file("m.bin", bytes.clone());
        let app = axum::Router::new()
            .fallback(hub_handler)
            .with_state(hub.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let models = tempfile::tempdir().unwrap();
        let opts = PullOptions {
            token: Some("hf_secret".into()),
            ..options(models.path(), &format!("http://127.0.0.1:{port}"))
        };

        let report = pull(&[entry("m.bin", "vae", None)], &opts).await.unwrap();
        assert!(only_outcome(&report).is_ok(), "{report:?}");
        let gets = hub.gets();
        assert_eq!(gets.len(), 1, "{gets:?}");
        assert_eq!(
            gets[0].authorization, None,
            "the HF token leaked to the redirect host"
        );
        assert_eq!(
            std::fs::read(models.path().join("vae/m.bin")).unwrap(),
            bytes
        );
    }
}

mod url_entry {
    use super::*;

    const ASSET: &str = "detection_Resnet50_Final.pth";

    /// A `url` entry on `host` (GitHub-style release path), as the manifest parses it.
    fn url_entry(host: &str, name: &str) -> ModelFile {
        let manifest = serde_json::json!({"files": [{
            "url": format!("http://{host}/xinntao/facexlib/releases/download/v0.1.0/{name}"),
            "folder": "facexlib",
            "group": "pulid",
        }]});
        Manifest::parse(&manifest.to_string(), "test")
            .unwrap()
            .files
            .remove(0)
    }

    /// The hub's requests for `name` (the release URL and the CDN path it redirects to).
    fn requests_for(hub: &Hub, name: &str) -> Vec<Logged> {
        let log = hub.log.lock().unwrap();
        log.iter()
            .filter(|l| l.path.ends_with(&format!("/{name}")))
            .cloned()
            .collect()
    }

    #[tokio::test]
    async fn a_url_entry_is_pulled_through_a_redirect_and_never_gets_the_hf_token() {
        let asset = content(70_000, 40);
        let hf_file = content(3000, 41);
        let hub = Hub {
            required_token: Some("hf_secret".into()),
            ..Hub::default()
        };
        let (hub, endpoint) = start_hub(hub).await;
        hub.serve_file(ASSET, asset.clone());
        hub.serve_file("m.bin", hf_file.clone());
        // The release host is "localhost" (the same server): a host that is not the HF endpoint.
        let port = endpoint.rsplit(':').next().unwrap();
        let files = [
            entry("m.bin", "vae", None),
            url_entry(&format!("localhost:{port}"), ASSET),
        ];
        let models = tempfile::tempdir().unwrap();
        let opts = PullOptions {
            token: Some("hf_secret".into()),
            ..options(models.path(), &endpoint)
        };

        let report = pull(&files, &opts).await.unwrap();
        assert!(report.files.iter().all(|f| f.outcome.is_ok()), "{report:?}");
        assert_eq!(
            report.files[1].outcome.as_ref().unwrap(),
            &PullOutcome::Installed {
                bytes: asset.len() as u64,
                resumed_from: 0,
                verified: Verification::Size
            }
        );
        assert_eq!(
            std::fs::read(models.path().join("facexlib").join(ASSET)).unwrap(),
            asset
        );
        assert!(
            !models
                .path()
                .join("facexlib")
                .join(format!("{ASSET}.part"))
                .exists()
        );
        let asset_requests = requests_for(&hub, ASSET);
        assert!(
            asset_requests.iter().any(|l| l.path.starts_with("/cdn/")),
            "the redirect was followed: {asset_requests:?}"
        );
        assert!(
            asset_requests.iter().all(|l| l.authorization.is_none()),
            "the HF token was sent for the url entry: {asset_requests:?}"
        );
        // The token is set and does go to Hugging Face.
        let resolve: Vec<Logged> = requests_for(&hub, "m.bin")
            .into_iter()
            .filter(|l| l.path.contains("/resolve/"))
            .collect();
        assert!(
            !resolve.is_empty()
                && resolve
                    .iter()
                    .all(|l| l.authorization.as_deref() == Some("Bearer hf_secret")),
            "{resolve:?}"
        );

        // A second run finds it installed and downloads nothing.
        hub.clear_log();
        let again = pull(&files[1..], &opts).await.unwrap();
        assert!(
            matches!(only_outcome(&again), Ok(PullOutcome::AlreadyPresent { .. })),
            "{again:?}"
        );
        assert!(hub.gets().is_empty(), "{:?}", hub.gets());
    }

    #[tokio::test]
    async fn a_missing_url_file_names_its_host_and_file_not_hugging_face() {
        let (_hub, endpoint) = start_hub(Hub::default()).await;
        let host = endpoint.trim_start_matches("http://").to_owned();
        let models = tempfile::tempdir().unwrap();

        let report = pull(
            &[url_entry(&host, "parsing_bisenet.pth")],
            &options(models.path(), &endpoint),
        )
        .await
        .unwrap();
        let message = error_text(&report);
        assert!(
            message.contains("127.0.0.1")
                && message.contains("facexlib/parsing_bisenet.pth")
                && message.contains("404"),
            "{message}"
        );
        assert!(!message.contains("Hugging Face"), "{message}");
        assert!(!models.path().join("facexlib/parsing_bisenet.pth").exists());
    }
}

mod present {
    use super::*;

    #[tokio::test]
    async fn file_with_the_manifest_checksum_is_skipped_without_any_request() {
        let bytes = content(10_000, 9);
        let (hub, endpoint) = start_hub(Hub::default()).await;
        hub.serve_file("m.bin", bytes.clone());
        let models = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(models.path().join("vae")).unwrap();
        std::fs::write(models.path().join("vae/m.bin"), &bytes).unwrap();

        let report = pull(
            &[entry("m.bin", "vae", Some(&sha256_hex(&bytes)))],
            &options(models.path(), &endpoint),
        )
        .await
        .unwrap();
        assert_eq!(
            only_outcome(&report).as_ref().unwrap(),
            &PullOutcome::AlreadyPresent {
                verified: Verification::ManifestSha256
            }
        );
        assert!(hub.log.lock().unwrap().is_empty(), "no request expected");
    }

    #[tokio::test]
    async fn file_with_the_advertised_size_is_skipped_and_a_wrong_size_is_replaced() {
        let bytes = content(10_000, 10);
        let (hub, endpoint) = start_hub(Hub::default()).await;
        hub.serve_file("a.bin", bytes.clone());
        hub.serve_file("b.bin", bytes.clone());
        let models = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(models.path().join("vae")).unwrap();
        std::fs::write(models.path().join("vae/a.bin"), &bytes).unwrap();
        std::fs::write(models.path().join("vae/b.bin"), b"truncated").unwrap();

        let report = pull(
            &[entry("a.bin", "vae", None), entry("b.bin", "vae", None)],
            &options(models.path(), &endpoint),
        )
        .await
        .unwrap();
        assert_eq!(
            report.files[0].outcome.as_ref().unwrap(),
            &PullOutcome::AlreadyPresent {
                verified: Verification::Size
            }
        );
        assert!(
            matches!(report.files[1].outcome, Ok(PullOutcome::Installed { .. })),
            "{report:?}"
        );
        let gets = hub.gets();
        assert_eq!(gets.len(), 1, "only b.bin is downloaded: {gets:?}");
        assert_eq!(
            std::fs::read(models.path().join("vae/b.bin")).unwrap(),
            bytes
        );
    }
}

mod concurrency {
    use super::*;

    async fn run_with_bound(bound: usize) -> (usize, PullReport) {
        let hub = Hub {
            hold_until_in_flight: bound,
            ..Hub::default()
        };
        let (hub, endpoint) = start_hub(hub).await;
        let files: Vec<ModelFile> = (0..5)
            .map(|i| {
                hub.serve_file(&format!("f{i}.bin"), content(20_000, 20 + i));
                entry(&format!("f{i}.bin"), "checkpoints", None)
            })
            .collect();
        let models = tempfile::tempdir().unwrap();
        let report = pull(
            &files,
            &PullOptions {
                concurrency: bound,
                ..options(models.path(), &endpoint)
            },
        )
        .await
        .unwrap();
        (hub.max_in_flight.load(Ordering::SeqCst), report)
    }

    #[tokio::test]
    async fn concurrency_bound_obeyed() {
        let (max, report) = run_with_bound(2).await;
        assert!(report.into_result().is_ok());
        assert_eq!(
            max, 2,
            "at most (and, with 5 files, exactly) 2 downloads at once"
        );
    }

    #[tokio::test]
    async fn zero_concurrency_is_refused() {
        let models = tempfile::tempdir().unwrap();
        let opts = PullOptions {
            concurrency: 0,
            ..options(models.path(), "http://127.0.0.1:9")
        };
        assert!(pull(&[], &opts).await.is_err());
    }
}

mod cli {
    use super::*;

    fn write_manifest(dir: &Path, files: serde_json::Value) -> PathBuf {
        let path = dir.join("manifest.json");
        std::fs::write(&path, serde_json::json!({ "files": files }).to_string()).unwrap();
        Manifest::load(&path).unwrap();
        path
    }

    #[tokio::test]
    async fn exit_is_non_zero_and_lists_what_failed_using_hf_endpoint() {
        let (hub, endpoint) = start_hub(Hub::default()).await;
        hub.serve_file("ok.bin", content(3000, 30));
        let work = tempfile::tempdir().unwrap();
        let manifest = write_manifest(
            work.path(),
            serde_json::json!([
                {"repo": REPO, "path": "ok.bin", "folder": "vae"},
                {"repo": REPO, "path": "missing.bin", "folder": "loras"}
            ]),
        );
        let models = work.path().join("models");
        let output = tokio::process::Command::new(flowhost_tests::flowhost_binary())
            .args(["models", "pull", "--manifest"])
            .arg(&manifest)
            .arg("--models")
            .arg(&models)
            .env("HF_ENDPOINT", &endpoint)
            .env_remove("HF_TOKEN")
            .env("NO_COLOR", "1")
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{stderr}");
        assert!(
            stderr.contains("1 of 2")
                && stderr.contains("loras/missing.bin")
                && stderr.contains("404"),
            "{stderr}"
        );
        assert!(
            models.join("vae/ok.bin").exists(),
            "the good file is still installed"
        );
    }

    #[tokio::test]
    async fn only_selects_files_and_an_unknown_selector_fails() {
        let (hub, endpoint) = start_hub(Hub::default()).await;
        hub.serve_file("a.bin", content(100, 31));
        hub.serve_file("b.bin", content(100, 32));
        let work = tempfile::tempdir().unwrap();
        let manifest = write_manifest(
            work.path(),
            serde_json::json!([
                {"repo": REPO, "path": "a.bin", "folder": "vae", "group": "first"},
                {"repo": REPO, "path": "b.bin", "folder": "vae"}
            ]),
        );
        let models = work.path().join("models");
        let run = |only: &'static str| {
            let mut command = tokio::process::Command::new(flowhost_tests::flowhost_binary());
            command
                .args(["models", "pull", "--manifest"])
                .arg(&manifest)
                .arg("--models")
                .arg(&models)
                .args(["--only", only])
                .env("HF_ENDPOINT", &endpoint);
            command
        };
        let ok = run("first").output().await.unwrap();
        assert!(
            ok.status.success(),
            "{}",
            String::from_utf8_lossy(&ok.stderr)
        );
        assert!(models.join("vae/a.bin").exists() && !models.join("vae/b.bin").exists());
        let unknown = run("nope").output().await.unwrap();
        assert!(!unknown.status.success());
        assert!(String::from_utf8_lossy(&unknown.stderr).contains("nope"));
    }

    #[tokio::test]
    async fn a_url_entry_picked_by_group_installs_with_hf_token_set_and_never_receives_it() {
        let (hub, endpoint) = start_hub(Hub::default()).await;
        let asset = content(5000, 42);
        hub.serve_file("parsing_bisenet.pth", asset.clone());
        hub.serve_file("b.bin", content(100, 43));
        let work = tempfile::tempdir().unwrap();
        let url =
            format!("{endpoint}/xinntao/facexlib/releases/download/v0.2.0/parsing_bisenet.pth");
        let manifest = write_manifest(
            work.path(),
            serde_json::json!([
                {"url": url, "folder": "facexlib", "group": "pulid"},
                {"repo": REPO, "path": "b.bin", "folder": "vae"}
            ]),
        );
        let models = work.path().join("models");
        let output = tokio::process::Command::new(flowhost_tests::flowhost_binary())
            .args(["models", "pull", "--manifest"])
            .arg(&manifest)
            .arg("--models")
            .arg(&models)
            .args(["--only", "pulid"])
            // The HF endpoint is elsewhere: the url entry's host is not Hugging Face.
            .env("HF_ENDPOINT", "http://127.0.0.1:9")
            .env("HF_TOKEN", "hf_secret")
            .output()
            .await
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(
            std::fs::read(models.join("facexlib/parsing_bisenet.pth")).unwrap(),
            asset
        );
        assert!(
            !models.join("vae/b.bin").exists(),
            "--only pulid picked only the url entry"
        );
        let log = hub.log.lock().unwrap().clone();
        assert!(
            !log.is_empty() && log.iter().all(|l| l.authorization.is_none()),
            "HF_TOKEN reached the url's host: {log:?}"
        );
    }
}
