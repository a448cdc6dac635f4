//! One delivery attempt over HTTP: sign the stored body with the current keys, POST it,
//! follow redirects by hand (each hop re-vetted), and classify the answer.
//!
//! Owns the delivery client (no proxy, no automatic redirects, names resolved only through
//! [`VettingResolver`], bounded timeouts) and the `webhook-*` headers. Must never read more
//! than [`MAX_RESPONSE_BYTES`] of a receiver's answer, never retry on its own (the
//! dispatcher schedules retries from the durable outbox), and never run on a generation's
//! path.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt as _;
use reqwest::header::{CONTENT_TYPE, HeaderValue, LOCATION, USER_AGENT};

use crate::net::destination::{DestinationError, DestinationPolicy, VettingResolver, refusal_in};
use super::signing::SigningKeys;

/// Longest one attempt may take (connect, send, answer headers).
pub const DEFAULT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a TCP/TLS connect may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Redirects followed per attempt (each re-vetted).
pub const MAX_REDIRECTS: usize = 3;
/// At most this much of a receiver's answer is read (and then only to drain it).
pub const MAX_RESPONSE_BYTES: usize = 4096;

/// The outcome of one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// A 2xx answer.
    Delivered { status: u16 },
    /// Worth another try later (non-2xx answer, timeout, connection failure, DNS).
    Failed { status: Option<u16>, reason: String },
    /// The destination (or a redirect's) breaks the policy: never contacted, give up.
    Refused(DestinationError),
}

/// Sends messages. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Deliverer {
    client: reqwest::Client,
    policy: DestinationPolicy,
    keys: SigningKeys,
}

impl Deliverer {
    /// A client that resolves through `policy`, with `timeout` per attempt.
    pub fn new(policy: DestinationPolicy, keys: SigningKeys, timeout: Duration) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .dns_resolver(std::sync::Arc::new(VettingResolver::new(policy.clone())))
            // A proxy would resolve the destination itself, past the vetting resolver.
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(CONNECT_TIMEOUT.min(timeout))
            .timeout(timeout)
            .pool_idle_timeout(Duration::from_secs(30))
            .build()?;
        Ok(Self { client, policy, keys })
    }

    /// One attempt of message `message_id` with body `payload` to `url`, signed now.
    pub async fn attempt(&self, url: &str, message_id: &str, payload: &str) -> AttemptOutcome {
        let mut target = match self.policy.check_url(url) {
            Ok(url) => url,
            Err(refusal) => return AttemptOutcome::Refused(refusal),
        };
        let timestamp = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let signature = self.keys.signature_header(message_id, timestamp, payload.as_bytes());
        for _hop in 0..=MAX_REDIRECTS {
            let response = self
                .client
                .post(target.clone())
                .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
                .header(USER_AGENT, concat!("flowhost/", env!("CARGO_PKG_VERSION")))
                .header("webhook-id", message_id)
                .header("webhook-timestamp", timestamp.to_string())
                .header("webhook-signature", signature.as_str())
                .body(payload.to_owned())
                .send()
                .await;
            let response = match response {
                Ok(response) => response,
                Err(error) => return classify_error(&error),
            };
            let status = response.status();
            if status.is_redirection() {
                let next = response.headers().get(LOCATION).and_then(|v| v.to_str().ok()).and_then(|location| target.join(location).ok());
                drain(response).await;
                let Some(next) = next else {
                    return AttemptOutcome::Failed { status: Some(status.as_u16()), reason: format!("redirect {} without a usable Location", status.as_u16()) };
                };
                if let Err(refusal) = self.policy.check_parsed(&next) {
                    return AttemptOutcome::Refused(refusal);
                }
                target = next;
                continue;
            }
            drain(response).await;
            return if status.is_success() {
                AttemptOutcome::Delivered { status: status.as_u16() }
            } else {
                AttemptOutcome::Failed { status: Some(status.as_u16()), reason: format!("answered {}", status.as_u16()) }
            };
        }
        AttemptOutcome::Failed { status: None, reason: format!("more than {MAX_REDIRECTS} redirects") }
    }
}

/// Read at most [`MAX_RESPONSE_BYTES`] of the answer, so a small answer leaves the
/// connection reusable and a large one costs nothing more.
async fn drain(response: reqwest::Response) {
    let mut stream = response.bytes_stream();
    let mut read = 0usize;
    while let Some(Ok(chunk)) = stream.next().await {
        read += chunk.len();
        if read >= MAX_RESPONSE_BYTES {
            break;
        }
    }
}

fn classify_error(error: &reqwest::Error) -> AttemptOutcome {
    if let Some(refusal) = refusal_in(error) {
        // A name that does not resolve may resolve later; one that resolves to a
        // forbidden address is refused for good.
        return if refusal == DestinationError::Unresolvable {
            AttemptOutcome::Failed { status: None, reason: "the host could not be resolved".into() }
        } else {
            AttemptOutcome::Refused(refusal)
        };
    }
    let reason = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "could not connect"
    } else {
        "the request failed"
    };
    AttemptOutcome::Failed { status: None, reason: reason.into() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::webhooks::signing::WebhookSecret;
    use std::sync::{Arc, Mutex};

    use axum::http::{HeaderMap, StatusCode};
    use axum::response::IntoResponse;

    /// A loopback receiver answering from `script` (status, optional Location) in turn and
    /// recording each request's headers and body.
    struct Receiver {
        base: String,
        seen: Arc<Mutex<Vec<(HeaderMap, String)>>>,
    }

    async fn receiver(script: Vec<(u16, Option<String>)>) -> Receiver {
        let seen: Arc<Mutex<Vec<(HeaderMap, String)>>> = Arc::default();
        let script = Arc::new(Mutex::new(script.into_iter()));
        let app = {
            let seen = seen.clone();
            axum::Router::new().fallback(move |headers: HeaderMap, body: String| {
                let (seen, script) = (seen.clone(), script.clone());
                async move {
                    seen.lock().unwrap().push((headers, body));
                    let (status, location) = script.lock().unwrap().next().unwrap_or((200, None));
                    let mut response = StatusCode::from_u16(status).unwrap().into_response();
                    if let Some(location) = location {
                        response.headers_mut().insert(LOCATION, location.parse().unwrap());
                    }
                    response
                }
            })
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver { base, seen }
    }

    fn deliverer(allow: &[&str]) -> (Deliverer, WebhookSecret) {
        let secret: WebhookSecret = WebhookSecret::generate().parse().unwrap();
        let policy = DestinationPolicy::new(allow.iter().map(|h| h.to_string()));
        (Deliverer::new(policy, SigningKeys::new(vec![secret.clone()]), Duration::from_secs(2)).unwrap(), secret)
    }

    #[tokio::test]
    async fn a_delivery_carries_the_standard_webhooks_headers_over_the_exact_body() {
        let rx = receiver(vec![(204, None)]).await;
        let (deliverer, secret) = deliverer(&["127.0.0.1"]);
        let body = r#"{"type":"job.succeeded","data":{"id":"j1"}}"#;
        let outcome = deliverer.attempt(&format!("{}/hook", rx.base), "msg_abc", body).await;
        assert_eq!(outcome, AttemptOutcome::Delivered { status: 204 });
        let seen = rx.seen.lock().unwrap();
        let (headers, got) = &seen[0];
        assert_eq!(got, body);
        assert_eq!(headers["webhook-id"], "msg_abc");
        assert_eq!(headers["content-type"], "application/json");
        let timestamp: u64 = headers["webhook-timestamp"].to_str().unwrap().parse().unwrap();
        assert_eq!(headers["webhook-signature"].to_str().unwrap(), secret.sign("msg_abc", timestamp, body.as_bytes()));
    }

    #[tokio::test]
    async fn a_non_2xx_answer_is_a_failure_to_retry() {
        let rx = receiver(vec![(500, None)]).await;
        let (deliverer, _) = deliverer(&["127.0.0.1"]);
        let outcome = deliverer.attempt(&format!("{}/hook", rx.base), "msg_1", "{}").await;
        assert_eq!(outcome, AttemptOutcome::Failed { status: Some(500), reason: "answered 500".into() });
    }

    #[tokio::test]
    async fn a_redirect_to_an_allowed_host_is_followed_with_the_same_message() {
        let rx = receiver(vec![(307, Some("/moved".into())), (200, None)]).await;
        let (deliverer, _) = deliverer(&["127.0.0.1"]);
        let outcome = deliverer.attempt(&format!("{}/hook", rx.base), "msg_1", "{\"a\":1}").await;
        assert_eq!(outcome, AttemptOutcome::Delivered { status: 200 });
        let seen = rx.seen.lock().unwrap();
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[1].0["webhook-id"], "msg_1");
        assert_eq!(seen[1].1, "{\"a\":1}");
    }

    #[tokio::test]
    async fn ssrf_via_redirect_to_a_host_off_the_allow_list_is_refused_without_contacting_it() {
        let target = receiver(vec![]).await;
        let port = target.base.rsplit(':').next().unwrap().to_owned();
        let rx = receiver(vec![(302, Some(format!("http://localhost:{port}/internal")))]).await;
        let (deliverer, _) = deliverer(&["127.0.0.1"]);
        let outcome = deliverer.attempt(&format!("{}/hook", rx.base), "msg_1", "{}").await;
        assert_eq!(outcome, AttemptOutcome::Refused(DestinationError::NotAllowListed("localhost".into())));
        assert!(target.seen.lock().unwrap().is_empty(), "the redirect target must never be contacted");
    }

    #[tokio::test]
    async fn ssrf_via_redirect_to_the_metadata_address_is_refused_without_an_allow_list() {
        // A public-https-only policy: the first hop is refused before any connection
        // (loopback), which is the same check every redirect gets.
        let (deliverer, _) = deliverer(&[]);
        let outcome = deliverer.attempt("https://169.254.169.254/latest/meta-data/", "msg_1", "{}").await;
        assert_eq!(outcome, AttemptOutcome::Refused(DestinationError::ForbiddenAddress("link-local (cloud metadata)")));
        let outcome = deliverer.attempt("https://localhost/x", "msg_1", "{}").await;
        assert_eq!(outcome, AttemptOutcome::Refused(DestinationError::ForbiddenAddress("loopback")));
    }

    #[tokio::test]
    async fn redirects_are_limited() {
        let rx = receiver(vec![(302, Some("/a".into())), (302, Some("/b".into())), (302, Some("/c".into())), (302, Some("/d".into())), (200, None)]).await;
        let (deliverer, _) = deliverer(&["127.0.0.1"]);
        let outcome = deliverer.attempt(&format!("{}/hook", rx.base), "msg_1", "{}").await;
        assert_eq!(outcome, AttemptOutcome::Failed { status: None, reason: format!("more than {MAX_REDIRECTS} redirects") });
        assert_eq!(rx.seen.lock().unwrap().len(), MAX_REDIRECTS + 1);
    }

    #[tokio::test]
    async fn a_receiver_that_never_answers_times_out_within_the_bound() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket); // accept and never answer
            }
        });
        let policy = DestinationPolicy::new(["127.0.0.1".to_owned()]);
        let keys = SigningKeys::new(vec![WebhookSecret::generate().parse().unwrap()]);
        let deliverer = Deliverer::new(policy, keys, Duration::from_millis(300)).unwrap();
        let outcome = deliverer.attempt(&format!("http://{addr}/hook"), "msg_1", "{}").await;
        assert_eq!(outcome, AttemptOutcome::Failed { status: None, reason: "timed out".into() });
    }

    #[tokio::test]
    async fn a_receiver_that_is_down_is_a_failure_to_retry() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let (deliverer, _) = deliverer(&["127.0.0.1"]);
        let outcome = deliverer.attempt(&format!("http://127.0.0.1:{port}/hook"), "msg_1", "{}").await;
        assert_eq!(outcome, AttemptOutcome::Failed { status: None, reason: "could not connect".into() });
    }
}
