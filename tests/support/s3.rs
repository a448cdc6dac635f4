//! An S3-compatible server on loopback for the shared blob store: moto in server mode
//! (`python -m moto.server`, pinned in tests/python-requirements.txt, from the test
//! venv `$FLOWHOST_TEST_PYTHON`). Chosen over s3s-fs because it is an independent
//! implementation of the S3 wire protocol (SigV4 checks, presigned URLs, ranges) that
//! the test venv installs anyway; s3s-fs would be a second Rust S3 stack built into
//! the tests. Killed on drop. A missing moto fails the test: nothing skips.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// A running moto server with one bucket.
pub struct S3Server {
    child: crate::KillOnDrop,
    pub port: u16,
    pub bucket: String,
    /// moto's log (one line per request). A file, never a pipe: a pipe nobody reads fills
    /// after ~64 KB of request lines and moto then blocks mid-request — a test making a few
    /// hundred requests saw a HEAD hang until the client gave up (503 on a download).
    log: tempfile::NamedTempFile,
}

/// The test venv's interpreter (scripts/test.sh sets it), else `python3`.
pub fn test_python() -> String {
    std::env::var("FLOWHOST_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn spawn_moto(port: u16, log: &tempfile::NamedTempFile) -> Result<std::process::Child> {
    let log = std::fs::OpenOptions::new().append(true).open(log.path()).context("moto's log file")?;
    Command::new(test_python())
        .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .context("starting moto (pip install -r tests/python-requirements.txt, or set FLOWHOST_TEST_PYTHON)")
}

impl S3Server {
    /// Start moto on a free port and create `bucket`.
    ///
    /// Tests run in one process, so another test's moto may have been given the same free
    /// port a moment earlier: then ours cannot bind and exits, and the port answers with the
    /// other's buckets. A server is ours only if it was empty when we came and our child is
    /// still alive after creating the bucket; otherwise try another port.
    pub async fn start(bucket: &str) -> Result<S3Server> {
        let mut last = None;
        for _ in 0..5 {
            let port = crate::free_port();
            let log = tempfile::NamedTempFile::new().context("moto's log file")?;
            let child = spawn_moto(port, &log)?;
            let mut server = S3Server { child: crate::KillOnDrop(child), port, bucket: bucket.to_string(), log };
            match server.claim_fresh().await {
                Ok(()) => return Ok(server),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("moto did not start")))
    }

    /// Wait for the port, refuse a server that already holds buckets (not ours), create the
    /// bucket, and check our child is the one still running.
    async fn claim_fresh(&mut self) -> Result<()> {
        let client = reqwest::Client::new();
        let started = Instant::now();
        let listing = loop {
            if let Ok(Some(status)) = self.child.0.try_wait() {
                bail!("moto exited ({status}) before answering on port {}", self.port);
            }
            if let Ok(response) = client.get(format!("{}/", self.endpoint())).send().await {
                if response.status().is_success() {
                    break response.text().await.unwrap_or_default();
                }
            }
            if started.elapsed() > Duration::from_secs(60) {
                bail!("moto did not answer within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        if listing.contains("<Name>") {
            bail!("port {} answers with another test's buckets", self.port);
        }
        self.wait_and_create_bucket().await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        if let Ok(Some(status)) = self.child.0.try_wait() {
            bail!("moto exited ({status}): port {} belongs to another server", self.port);
        }
        Ok(())
    }

    /// Stop the server (an outage): every request to it is refused until [`S3Server::restart`].
    pub fn stop(&mut self) {
        let _ = self.child.0.kill();
        let _ = self.child.0.wait();
    }

    /// Start it again on the same port with the bucket (moto keeps objects in memory: the
    /// bucket comes back empty).
    pub async fn restart(&mut self) -> Result<()> {
        self.stop();
        self.child = crate::KillOnDrop(spawn_moto(self.port, &self.log)?);
        self.wait_and_create_bucket().await
    }

    async fn wait_and_create_bucket(&mut self) -> Result<()> {
        let bucket = self.bucket.clone();
        let client = reqwest::Client::new();
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.0.try_wait() {
                let log = std::fs::read_to_string(self.log.path()).unwrap_or_default();
                let err: String = log.chars().rev().take(2000).collect::<Vec<_>>().into_iter().rev().collect();
                bail!("moto exited ({status}); is moto[server] installed in {}? {err}", test_python());
            }
            // moto accepts any credentials; creating the bucket is a plain PUT.
            if let Ok(response) = client.put(format!("{}/{bucket}", self.endpoint())).send().await {
                if response.status().is_success() {
                    return Ok(());
                }
            }
            if started.elapsed() > Duration::from_secs(60) {
                bail!("moto did not answer within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The AWS_* variables a client of this server needs.
    pub fn aws_vars(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID".into(), "testing".into()),
            ("AWS_SECRET_ACCESS_KEY".into(), "testing".into()),
            ("AWS_REGION".into(), "us-east-1".into()),
            ("AWS_ENDPOINT_URL".into(), self.endpoint()),
        ]
    }

    /// `s3://bucket/prefix`.
    pub fn blob_store_url(&self, prefix: &str) -> String {
        format!("s3://{}/{prefix}", self.bucket)
    }
}
