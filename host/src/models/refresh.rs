//! Asking the platform to refresh the model volume when a request names a model file the
//! volume does not show (`--models-refresh-url`). On Modal a volume mounted in a running
//! container shows only what was committed before the container's last `reload()`: a LoRA a
//! trainer committed a minute ago is invisible until then. deploy/modal/app.py serves this URL
//! on loopback and reloads the volume when it is called; flowhost calls it on a miss and builds
//! the request once more.
//!
//! Owns: the one refresh call, shared by concurrent misses. Must never: call anything but the
//! operator's loopback URL, hold a request longer than its bound, or call more often than the
//! misses ask (a miss that began before the last refresh finished reuses it).

use std::time::Duration;

use tokio::time::Instant;

/// How long a miss waits for the refresh.
pub const REFRESH_TIMEOUT: Duration = Duration::from_secs(30);

/// The refresh hook. Cheap to share (`Arc`).
#[derive(Debug)]
pub struct VolumeRefresh {
    url: url::Url,
    client: reqwest::Client,
    /// When the last successful refresh finished.
    last: tokio::sync::Mutex<Option<Instant>>,
}

impl VolumeRefresh {
    /// `url` must be http(s) to a loopback address: it is the operator's own sidecar.
    pub fn new(url: &str) -> anyhow::Result<Self> {
        let parsed = url::Url::parse(url).map_err(|e| anyhow::anyhow!("--models-refresh-url {url:?}: {e}"))?;
        let loopback = match parsed.host() {
            Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
            Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
            Some(url::Host::Domain(name)) => name == "localhost",
            None => false,
        };
        if !matches!(parsed.scheme(), "http" | "https") || !loopback {
            anyhow::bail!("--models-refresh-url must be an http URL on this machine's loopback (e.g. http://127.0.0.1:8001/reload)");
        }
        let client = reqwest::Client::builder().no_proxy().timeout(REFRESH_TIMEOUT).build()?;
        Ok(Self { url: parsed, client, last: tokio::sync::Mutex::new(None) })
    }

    /// Refresh the volume for a miss seen at `missed_at`; `true` when the volume was refreshed
    /// after it (by this call or a concurrent one), so looking again is worth it.
    pub async fn refresh(&self, missed_at: Instant) -> bool {
        let mut last = self.last.lock().await;
        if last.is_some_and(|at| at >= missed_at) {
            return true;
        }
        let started = std::time::Instant::now();
        match self.client.post(self.url.clone()).send().await {
            Ok(response) if response.status().is_success() => {
                tracing::info!(ms = started.elapsed().as_millis() as u64, "model volume refreshed after a miss");
                *last = Some(Instant::now());
                true
            }
            Ok(response) => {
                tracing::warn!(status = response.status().as_u16(), "the model volume refresh was refused");
                false
            }
            Err(error) => {
                tracing::warn!(error = %error, "the model volume refresh failed");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn only_a_loopback_url_is_accepted() {
        assert!(VolumeRefresh::new("http://127.0.0.1:8001/reload").is_ok());
        assert!(VolumeRefresh::new("http://localhost:8001/reload").is_ok());
        assert!(VolumeRefresh::new("http://10.0.0.1/reload").is_err());
        assert!(VolumeRefresh::new("file:///reload").is_err());
    }

    #[tokio::test]
    async fn concurrent_misses_share_one_refresh() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let app = axum::Router::new().route(
            "/reload",
            axum::routing::post(move || {
                let counted = counted.clone();
                async move {
                    counted.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    "ok"
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/reload", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let refresh = VolumeRefresh::new(&url).unwrap();
        let missed = Instant::now();
        let all = futures::future::join_all((0..5).map(|_| refresh.refresh(missed))).await;
        assert!(all.iter().all(|ok| *ok));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // A miss after that refresh asks again.
        assert!(refresh.refresh(Instant::now()).await);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }
}
