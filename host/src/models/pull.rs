//! `flowhost models pull`: download what a model manifest lists (from Hugging Face, or from a
//! direct URL such as a GitHub release asset) onto the models volume.
//!
//! Owns the download protocol: `{endpoint}/{repo}/resolve/{revision}/{path}` (endpoint from
//! `HF_ENDPOINT`, token from `HF_TOKEN`) or the entry's `url`, resuming from `{name}.part` with
//! `Range`, SHA-256 and size verification, the rename that installs a file, skipping files
//! already present, the concurrency bound and the progress display. It must never leave a file
//! under its final name unless it was completely downloaded and verified, never send the token
//! anywhere but the configured endpoint (`url` entries go without it; redirects to other hosts
//! drop it), and never write outside `--models`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use reqwest::StatusCode;
use reqwest::header::{CONTENT_LENGTH, CONTENT_RANGE, HeaderMap, RANGE};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::sync::Semaphore;

use super::manifest::{Manifest, ModelFile};

/// Public Hugging Face, used when `HF_ENDPOINT` is not set.
pub const DEFAULT_HF_ENDPOINT: &str = "https://huggingface.co";

/// `flowhost models pull` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct PullArgs {
    /// Manifest (JSON) listing the files to download; the manifest shipped with flowhost when absent.
    #[arg(long, value_name = "FILE")]
    pub manifest: Option<PathBuf>,
    /// Models directory (ComfyUI's `models/`); files land in `{models}/{folder}/{name}`.
    #[arg(long, value_name = "DIR")]
    pub models: PathBuf,
    /// How many files download at once.
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub concurrency: usize,
    /// Pull only these files: a file name, `folder/name`, a group (`flux-dev`, `instantid`, ...),
    /// a repository or a URL. Repeatable.
    #[arg(long, value_name = "NAME")]
    pub only: Vec<String>,
    /// How many times an interrupted download is resumed within this run before giving up
    /// (the `.part` file stays, so the next run resumes too).
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub retries: u32,
    /// Hugging Face base URL.
    #[arg(long, value_name = "URL", env = "HF_ENDPOINT", default_value = DEFAULT_HF_ENDPOINT)]
    pub hf_endpoint: String,
    /// Access token; not a flag (it would show in `ps`): taken from `HF_TOKEN` when `None`.
    #[arg(skip)]
    pub hf_token: Option<String>,
}

/// What happened to one file that did not fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullOutcome {
    /// Downloaded, verified and renamed into place. `resumed_from` is the size of the `.part`
    /// that an earlier attempt left (0 for a fresh download).
    Installed {
        bytes: u64,
        resumed_from: u64,
        verified: Verification,
    },
    /// Already present under its final name and left alone.
    AlreadyPresent { verified: Verification },
}

/// How a file was checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verification {
    /// SHA-256 from the manifest matched.
    ManifestSha256,
    /// SHA-256 advertised by Hugging Face for the LFS object matched (for an install), or the
    /// size it advertises matched (for a file already present).
    ServerChecksum,
    /// Only the size could be checked.
    Size,
    /// Nothing to check against.
    Unverified,
}

/// One manifest entry and its result.
#[derive(Debug)]
pub struct FilePullResult {
    /// `folder/name` under the models directory.
    pub destination: String,
    /// `repo/path@revision`, or the URL.
    pub source: String,
    pub outcome: anyhow::Result<PullOutcome>,
}

/// Everything `pull` did, in manifest order.
#[derive(Debug)]
pub struct PullReport {
    pub files: Vec<FilePullResult>,
}

impl PullReport {
    pub fn failures(&self) -> impl Iterator<Item = &FilePullResult> {
        self.files.iter().filter(|f| f.outcome.is_err())
    }

    /// `Ok` when every file succeeded, else an error listing each failure and its cause.
    pub fn into_result(self) -> anyhow::Result<()> {
        let total = self.files.len();
        let failures: Vec<String> = self
            .failures()
            .map(|f| match &f.outcome {
                Err(err) => format!("  {} (from {}): {err:#}", f.destination, f.source),
                Ok(_) => String::new(),
            })
            .collect();
        if failures.is_empty() {
            return Ok(());
        }
        bail!(
            "{} of {total} model files failed:\n{}",
            failures.len(),
            failures.join("\n")
        )
    }
}

/// Settings for [`pull`], resolved from [`PullArgs`] and the environment.
#[derive(Debug, Clone)]
pub struct PullOptions {
    pub models_dir: PathBuf,
    pub concurrency: usize,
    pub retries: u32,
    pub endpoint: String,
    pub token: Option<String>,
    /// Draw progress bars on stderr (only when it is a terminal).
    pub progress: bool,
}

/// `flowhost models pull`: pull, print a summary, fail listing every file that failed.
pub async fn run_pull(args: PullArgs) -> anyhow::Result<()> {
    let manifest = match &args.manifest {
        Some(path) => Manifest::load(path)?,
        None => Manifest::shipped()?,
    };
    let files = manifest.select(&args.only)?;
    let token = args
        .hf_token
        .clone()
        .or_else(|| std::env::var("HF_TOKEN").ok())
        .filter(|t| !t.trim().is_empty());
    let options = PullOptions {
        models_dir: args.models.clone(),
        concurrency: args.concurrency,
        retries: args.retries,
        endpoint: args.hf_endpoint.clone(),
        token,
        progress: std::io::stderr().is_terminal(),
    };
    let report = pull(&files, &options).await?;
    for file in &report.files {
        match &file.outcome {
            Ok(PullOutcome::Installed {
                bytes,
                resumed_from,
                verified,
            }) => tracing::info!(
                destination = %file.destination, bytes, resumed_from, verified = ?verified, "installed"
            ),
            Ok(PullOutcome::AlreadyPresent { verified }) => {
                tracing::info!(destination = %file.destination, verified = ?verified, "already present")
            }
            Err(err) => {
                tracing::error!(destination = %file.destination, source = %file.source, "{err:#}")
            }
        }
    }
    report.into_result()
}

/// Download `files` into `options.models_dir`, at most `options.concurrency` at once. Errors
/// only for a bad setup (endpoint, models directory); per-file failures are in the report.
pub async fn pull(files: &[ModelFile], options: &PullOptions) -> anyhow::Result<PullReport> {
    if options.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    let endpoint = url::Url::parse(&options.endpoint)
        .with_context(|| format!("HF_ENDPOINT {:?} is not a URL", options.endpoint))?;
    if !matches!(endpoint.scheme(), "http" | "https") {
        bail!("HF_ENDPOINT {:?} must be an http(s) URL", options.endpoint);
    }
    tokio::fs::create_dir_all(&options.models_dir)
        .await
        .with_context(|| format!("creating models directory {}", options.models_dir.display()))?;
    let user_agent = concat!("flowhost/", env!("CARGO_PKG_VERSION"));
    let download_client = reqwest::Client::builder()
        .user_agent(user_agent)
        .connect_timeout(Duration::from_secs(30))
        .read_timeout(Duration::from_secs(120))
        .build()
        .context("building the HTTP client")?;
    let probe_client = reqwest::Client::builder()
        .user_agent(user_agent)
        .connect_timeout(Duration::from_secs(30))
        .timeout(Duration::from_secs(60))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .context("building the HTTP client")?;
    let progress = MultiProgress::with_draw_target(if options.progress {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    });
    let shared = Arc::new(Puller {
        endpoint,
        token: options.token.clone(),
        models_dir: options.models_dir.clone(),
        retries: options.retries,
        download_client,
        probe_client,
        progress,
    });
    let permits = Arc::new(Semaphore::new(options.concurrency));
    let mut tasks = Vec::with_capacity(files.len());
    for file in files {
        let (shared, permits, file) = (shared.clone(), permits.clone(), file.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = permits
                .acquire_owned()
                .await
                .context("download queue closed")?;
            shared.pull_one(&file).await
        }));
    }
    let mut results = Vec::with_capacity(files.len());
    for (file, task) in files.iter().zip(tasks) {
        let outcome = match task.await {
            Ok(outcome) => outcome,
            Err(join_error) => Err(anyhow!("download task failed: {join_error}")),
        };
        results.push(FilePullResult {
            destination: file.destination(),
            source: file.source(),
            outcome,
        });
    }
    Ok(PullReport { files: results })
}

/// What Hugging Face says about a file before we download it.
#[derive(Debug, Default)]
struct RemoteInfo {
    size: Option<u64>,
    sha256: Option<String>,
}

struct Puller {
    endpoint: url::Url,
    token: Option<String>,
    models_dir: PathBuf,
    retries: u32,
    download_client: reqwest::Client,
    probe_client: reqwest::Client,
    progress: MultiProgress,
}

/// How one GET attempt ended.
enum Attempt {
    /// The `.part` file holds the whole file.
    Complete,
    /// The connection broke; what was received is kept in `.part`.
    Interrupted(anyhow::Error),
    /// The `.part` was unusable (server disagrees about its range) and was removed.
    Restart(String),
}

impl Puller {
    fn url_for(&self, file: &ModelFile) -> anyhow::Result<url::Url> {
        if let Some(direct) = &file.url {
            return url::Url::parse(direct)
                .map_err(|err| anyhow!("url of {} is not a URL: {err}", file.destination()));
        }
        let (Some(repo), Some(path)) = (&file.repo, &file.path) else {
            bail!(
                "{} names no source (url, or repo and path)",
                file.destination()
            );
        };
        let mut url = self.endpoint.clone();
        if let Ok(mut segments) = url.path_segments_mut() {
            segments.pop_if_empty();
            segments.extend(repo.split('/'));
            segments.push("resolve");
            segments.push(file.revision());
            segments.extend(path.split('/'));
        }
        Ok(url)
    }

    /// Adds the Hugging Face token, to Hugging Face requests only: a `url` entry points at some
    /// other host (GitHub releases), which must never see it.
    fn authorised(
        &self,
        file: &ModelFile,
        request: reqwest::RequestBuilder,
    ) -> reqwest::RequestBuilder {
        match &self.token {
            Some(token) if file.url.is_none() => request.bearer_auth(token),
            _ => request,
        }
    }

    /// Who serves `file`, for messages: the URL's host, or Hugging Face.
    fn server_name(&self, file: &ModelFile) -> String {
        match &file.url {
            Some(direct) => url::Url::parse(direct)
                .ok()
                .and_then(|u| u.host_str().map(str::to_owned))
                .unwrap_or_else(|| "the url's server".to_owned()),
            None => "Hugging Face".to_owned(),
        }
    }

    /// The error for a refused or failed response, naming the repo (or the URL's host and the
    /// file) and what to do.
    fn status_error(&self, file: &ModelFile, status: StatusCode) -> anyhow::Error {
        if file.url.is_some() {
            let host = self.server_name(file);
            let destination = file.destination();
            return match status {
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => anyhow!(
                    "{host} refused {destination} (HTTP {}); pull sends no credentials to a url \
                     entry: check the url in the manifest",
                    status.as_u16()
                ),
                StatusCode::NOT_FOUND => anyhow!(
                    "{destination} not found at {host} (HTTP 404): check the url in the manifest"
                ),
                other => anyhow!("{host} answered HTTP {} for {destination}", other.as_u16()),
            };
        }
        let repo = file.repo.as_deref().unwrap_or("");
        let path = file.path.as_deref().unwrap_or("");
        let licence_page = format!("{}/{repo}", self.endpoint.as_str().trim_end_matches('/'));
        match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN if self.token.is_none() => anyhow!(
                "Hugging Face refused {} (HTTP {}) for {}: the repository is gated or private. \
                 Set HF_TOKEN to a read token (https://huggingface.co/settings/tokens) of an account \
                 that accepted the model licence at {licence_page}",
                repo,
                status.as_u16(),
                path
            ),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => anyhow!(
                "Hugging Face refused {} (HTTP {}) for {} with the token in HF_TOKEN: check that HF_TOKEN \
                 is a valid read token and that its account accepted the model licence at {licence_page}",
                repo,
                status.as_u16(),
                path
            ),
            StatusCode::NOT_FOUND => anyhow!(
                "{} not found on Hugging Face (HTTP 404): check repo, path and revision in the manifest",
                file.source()
            ),
            other => anyhow!(
                "Hugging Face answered HTTP {} for {}",
                other.as_u16(),
                file.source()
            ),
        }
    }

    /// HEAD without following redirects: Hugging Face answers LFS files with a redirect that
    /// carries `X-Linked-Size` and `X-Linked-ETag` (the object's SHA-256). Other servers (GitHub
    /// releases) redirect with no size: nothing is known then, and the download's
    /// `Content-Length` is the size checked.
    async fn probe(&self, file: &ModelFile) -> anyhow::Result<RemoteInfo> {
        let url = self.url_for(file)?;
        let response = self
            .authorised(file, self.probe_client.head(url.clone()))
            .send()
            .await
            .with_context(|| format!("asking {url} for the file size"))?;
        let status = response.status();
        if file.url.is_some()
            && matches!(
                status,
                StatusCode::METHOD_NOT_ALLOWED | StatusCode::NOT_IMPLEMENTED
            )
        {
            // A plain web server need not answer HEAD; the GET still can.
            return Ok(RemoteInfo::default());
        }
        if !(status.is_success() || status.is_redirection()) {
            return Err(self.status_error(file, status));
        }
        let headers = response.headers();
        let linked_size = header_u64(headers, "x-linked-size");
        let size = linked_size.or_else(|| {
            if status.is_success() {
                header_u64(headers, CONTENT_LENGTH.as_str())
            } else {
                None
            }
        });
        let sha256 = headers
            .get("x-linked-etag")
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                v.trim_start_matches("W/")
                    .trim_matches('"')
                    .to_ascii_lowercase()
            })
            .filter(|v| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()));
        Ok(RemoteInfo { size, sha256 })
    }

    async fn pull_one(&self, file: &ModelFile) -> anyhow::Result<PullOutcome> {
        let destination = file.destination_in(&self.models_dir);
        let part = part_path(&destination);
        let present = tokio::fs::metadata(&destination)
            .await
            .ok()
            .filter(|m| m.is_file());

        // A file already installed with a manifest checksum needs no network to be confirmed.
        if let (Some(meta), Some(sha)) = (&present, &file.sha256) {
            let size_ok = file.size.is_none_or(|size| size == meta.len());
            if size_ok && sha256_of(&destination).await? == *sha {
                return Ok(PullOutcome::AlreadyPresent {
                    verified: Verification::ManifestSha256,
                });
            }
            tracing::warn!(file = %file.destination(), "present but its checksum or size differs; downloading again");
        }

        let remote = match self.probe(file).await {
            Ok(remote) => remote,
            Err(err) => match &present {
                Some(_) if file.sha256.is_none() => {
                    tracing::warn!(file = %file.destination(), server = %self.server_name(file), "present; could not ask its server to check it: {err:#}");
                    return Ok(PullOutcome::AlreadyPresent {
                        verified: Verification::Unverified,
                    });
                }
                _ => return Err(err),
            },
        };
        let expected_size = file.size.or(remote.size);
        let expected_sha = file.sha256.clone().or(remote.sha256.clone());

        if let (Some(meta), None) = (&present, &file.sha256) {
            match expected_size {
                Some(size) if size == meta.len() => {
                    let verified = if remote.sha256.is_some() {
                        Verification::ServerChecksum
                    } else {
                        Verification::Size
                    };
                    return Ok(PullOutcome::AlreadyPresent { verified });
                }
                Some(size) => tracing::warn!(
                    file = %file.destination(), present = meta.len(), expected = size,
                    "present with the wrong size; downloading again"
                ),
                None => {
                    return Ok(PullOutcome::AlreadyPresent {
                        verified: Verification::Unverified,
                    });
                }
            }
        }

        if let Some(parent) = destination.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        let bar = self
            .progress
            .add(ProgressBar::new(expected_size.unwrap_or(0)));
        bar.set_style(
            ProgressStyle::with_template(
                "{msg:40!} {bar:30} {bytes:>10}/{total_bytes:10} {bytes_per_sec:>12} {eta:>4}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_message(file.destination());
        let result = self
            .download_and_install(
                file,
                &destination,
                &part,
                expected_size,
                expected_sha.as_deref(),
                &bar,
            )
            .await;
        bar.finish_and_clear();
        self.progress.remove(&bar);
        let (bytes, resumed_from, size_checked) = result?;
        let verified = match (&file.sha256, &expected_sha, size_checked) {
            (Some(_), _, _) => Verification::ManifestSha256,
            (None, Some(_), _) => Verification::ServerChecksum,
            (None, None, Some(_)) => Verification::Size,
            (None, None, None) => Verification::Unverified,
        };
        Ok(PullOutcome::Installed {
            bytes,
            resumed_from,
            verified,
        })
    }

    /// Fill `.part` (resuming), verify it, rename it to `destination`. Returns the final size,
    /// how many bytes the `.part` held when this run started, and the size it was checked
    /// against (the probe's, or else the download's `Content-Length`: a GitHub release redirect
    /// tells no size).
    async fn download_and_install(
        &self,
        file: &ModelFile,
        destination: &Path,
        part: &Path,
        mut expected_size: Option<u64>,
        expected_sha: Option<&str>,
        bar: &ProgressBar,
    ) -> anyhow::Result<(u64, u64, Option<u64>)> {
        let resumed_from = file_len(part).await;
        // Hash while downloading; a `.part` left by an earlier run is hashed at the end instead.
        let mut running_hash = None;
        let (mut interruptions, mut restarts) = (0u32, 0u32);
        loop {
            let hash = expected_sha.is_some().then_some(&mut running_hash);
            match self
                .fetch_into_part(file, part, &mut expected_size, hash, bar)
                .await?
            {
                Attempt::Complete => break,
                Attempt::Restart(reason) => {
                    restarts += 1;
                    if restarts > 2 {
                        bail!("gave up on {}: {reason}", file.source());
                    }
                    tracing::warn!(file = %file.destination(), "starting over: {reason}");
                }
                Attempt::Interrupted(err) => {
                    let held = file_len(part).await;
                    if interruptions >= self.retries {
                        return Err(err.context(format!(
                            "download of {} interrupted with {held} bytes kept in {}; run pull again to resume",
                            file.source(),
                            part.display()
                        )));
                    }
                    interruptions += 1;
                    tracing::warn!(file = %file.destination(), held, "download interrupted, resuming: {err:#}");
                    tokio::time::sleep(Duration::from_millis(500 * u64::from(interruptions))).await;
                }
            }
        }

        let size = file_len(part).await;
        if let Some(expected) = expected_size
            && expected != size
        {
            remove_quietly(part).await;
            bail!(
                "{} is {size} bytes, expected {expected}; not installed",
                file.source()
            );
        }
        if let Some(expected) = expected_sha {
            let actual = match running_hash {
                Some(RunningHash { hasher, len }) if len == size => hex::encode(hasher.finalize()),
                _ => sha256_of(part).await?,
            };
            if actual != expected {
                remove_quietly(part).await;
                bail!(
                    "checksum mismatch for {}: expected sha256 {expected}, got {actual}; not installed, partial file removed",
                    file.source()
                );
            }
        }
        tokio::fs::rename(part, destination)
            .await
            .with_context(|| format!("renaming {} to {}", part.display(), destination.display()))?;
        Ok((size, resumed_from, expected_size))
    }

    /// One GET, appending to `.part` from where it ends.
    async fn fetch_into_part(
        &self,
        file: &ModelFile,
        part: &Path,
        expected_size: &mut Option<u64>,
        mut hash: Option<&mut Option<RunningHash>>,
        bar: &ProgressBar,
    ) -> anyhow::Result<Attempt> {
        let mut offset = file_len(part).await;
        if let Some(size) = *expected_size {
            if offset == size && offset > 0 {
                return Ok(Attempt::Complete);
            }
            if offset > size {
                remove_quietly(part).await;
                offset = 0;
            }
        }
        let url = self.url_for(file)?;
        let mut request = self.authorised(file, self.download_client.get(url.clone()));
        if offset > 0 {
            request = request.header(RANGE, format!("bytes={offset}-"));
        }
        let mut response = match request.send().await {
            Ok(response) => response,
            Err(err) => {
                return Ok(Attempt::Interrupted(
                    anyhow!(err).context(format!("requesting {url}")),
                ));
            }
        };
        let status = response.status();
        let append = match status {
            StatusCode::PARTIAL_CONTENT if offset > 0 => {
                let range = response
                    .headers()
                    .get(CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_content_range);
                match range {
                    Some((start, total)) if start == offset => {
                        if let Some(total) = total {
                            expected_size.get_or_insert(total);
                        }
                        true
                    }
                    _ => {
                        remove_quietly(part).await;
                        return Ok(Attempt::Restart(format!(
                            "server answered a range other than bytes={offset}-"
                        )));
                    }
                }
            }
            StatusCode::OK => {
                if let Some(len) = header_u64(response.headers(), CONTENT_LENGTH.as_str()) {
                    expected_size.get_or_insert(len);
                }
                false
            }
            StatusCode::RANGE_NOT_SATISFIABLE if offset > 0 => {
                let total = response
                    .headers()
                    .get(CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("bytes */"))
                    .and_then(|v| v.trim().parse::<u64>().ok());
                if total == Some(offset) {
                    expected_size.get_or_insert(offset);
                    return Ok(Attempt::Complete);
                }
                remove_quietly(part).await;
                return Ok(Attempt::Restart(format!(
                    "server cannot serve bytes={offset}- (HTTP 416)"
                )));
            }
            other => return Err(self.status_error(file, other)),
        };
        if !append && offset > 0 {
            tracing::info!(file = %file.destination(), "server ignored the Range request; downloading from the start");
        }
        let mut out = tokio::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(part)
            .await
            .with_context(|| format!("opening {}", part.display()))?;
        let mut written = if append { offset } else { 0 };
        if let Some(running) = hash.as_deref_mut() {
            if !append {
                *running = Some(RunningHash {
                    hasher: Sha256::new(),
                    len: 0,
                });
            } else if running.as_ref().is_some_and(|r| r.len != written) {
                *running = None;
            }
        }
        bar.set_length(expected_size.unwrap_or(0));
        bar.set_position(written);
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    out.write_all(&chunk)
                        .await
                        .with_context(|| format!("writing {}", part.display()))?;
                    written += chunk.len() as u64;
                    if let Some(Some(running)) = hash.as_deref_mut() {
                        running.hasher.update(&chunk);
                        running.len += chunk.len() as u64;
                    }
                    bar.set_position(written);
                }
                Ok(None) => break,
                Err(err) => {
                    out.flush()
                        .await
                        .with_context(|| format!("writing {}", part.display()))?;
                    return Ok(Attempt::Interrupted(
                        anyhow!(err).context(format!("reading {url} after {written} bytes")),
                    ));
                }
            }
        }
        out.flush()
            .await
            .with_context(|| format!("writing {}", part.display()))?;
        out.sync_all()
            .await
            .with_context(|| format!("syncing {}", part.display()))?;
        Ok(Attempt::Complete)
    }
}

/// SHA-256 of the first `len` bytes of a `.part`, kept up to date while they are written.
struct RunningHash {
    hasher: Sha256,
    len: u64,
}

/// `{destination}.part`: where a download accumulates until verified.
pub fn part_path(destination: &Path) -> PathBuf {
    let mut name = destination
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".part");
    destination.with_file_name(name)
}

fn header_u64(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

/// `bytes START-END/TOTAL` → (START, TOTAL) (`TOTAL` may be `*`).
fn parse_content_range(value: &str) -> Option<(u64, Option<u64>)> {
    let rest = value.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, _end) = range.split_once('-')?;
    Some((start.trim().parse().ok()?, total.trim().parse().ok()))
}

async fn file_len(path: &Path) -> u64 {
    tokio::fs::metadata(path)
        .await
        .map(|m| m.len())
        .unwrap_or(0)
}

async fn remove_quietly(path: &Path) {
    if let Err(err) = tokio::fs::remove_file(path).await
        && err.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), "could not remove: {err}");
    }
}

/// SHA-256 (lower-case hex) of a file, read on a blocking thread.
pub async fn sha256_of(path: &Path) -> anyhow::Result<String> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || -> anyhow::Result<String> {
        use std::io::Read;
        let mut reader =
            std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        let mut hasher = Sha256::new();
        let mut buffer = vec![0u8; 1 << 20];
        loop {
            let n = reader
                .read(&mut buffer)
                .with_context(|| format!("reading {}", path.display()))?;
            if n == 0 {
                break;
            }
            hasher.update(&buffer[..n]);
        }
        Ok(hex::encode(hasher.finalize()))
    })
    .await
    .context("checksum task failed")?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_parsing() {
        assert_eq!(
            parse_content_range("bytes 100-199/200"),
            Some((100, Some(200)))
        );
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, None)));
        assert_eq!(parse_content_range("items 1-2/3"), None);
    }

    #[test]
    fn part_file_sits_beside_the_destination() {
        assert_eq!(
            part_path(Path::new("/m/vae/ae.safetensors")),
            PathBuf::from("/m/vae/ae.safetensors.part")
        );
    }

    #[test]
    fn resolve_url_encodes_segments_and_keeps_endpoint_prefix() {
        let file: ModelFile = serde_json::from_str(
            r#"{"repo":"InstantX/InstantID","path":"ControlNetModel/diffusion pytorch.safetensors","folder":"c"}"#,
        )
        .unwrap();
        let puller = Puller {
            endpoint: url::Url::parse("http://127.0.0.1:9/mirror/").unwrap(),
            token: None,
            models_dir: PathBuf::new(),
            retries: 0,
            download_client: reqwest::Client::new(),
            probe_client: reqwest::Client::new(),
            progress: MultiProgress::with_draw_target(ProgressDrawTarget::hidden()),
        };
        assert_eq!(
            puller.url_for(&file).unwrap().as_str(),
            "http://127.0.0.1:9/mirror/InstantX/InstantID/resolve/main/ControlNetModel/diffusion%20pytorch.safetensors"
        );
    }
}
