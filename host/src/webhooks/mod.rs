//! Webhooks: telling a caller (or the operator's backend) when a job ends, with messages
//! signed per Standard Webhooks and delivered from a durable outbox in the job store.
//!
//! Owns delivery of job events to external URLs: who is subscribed ([`Subscription`]:
//! a caller's `Flowhost-Webhook-Url` on an async typed request, and the operator's
//! `--webhook-url` for every job), what is sent (`{"type", "timestamp", "data": <v2 Job>}`),
//! the SSRF policy ([`crate::net::destination`], shared with model and image fetches), signing ([`signing`]), the outbox ([`outbox`]), the
//! retry schedule ([`schedule`]) and the background sender ([`dispatcher`]).
//!
//! Must never delay a generation: the job path only builds messages and inserts rows in
//! the transaction that records the job's state; every network call runs on the
//! dispatcher's own tasks. Must never send to a destination the policy has not vetted,
//! and never store or log a secret.

pub mod delivery;
pub mod dispatcher;
pub mod job_messages;
pub mod schedule;
pub mod signing;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};

/// The outbox table and the events and subscriptions it records belong to the jobs (a
/// state change and its messages commit in one transaction); this room sends them.
pub use crate::jobs::outbox;
pub use crate::jobs::subscription::{JobEventType, Subscription};
use crate::net::destination::{self, DestinationError, DestinationPolicy};
use dispatcher::{DispatcherConfig, DispatcherHandle};
use outbox::{DeadLetter, NewDelivery, OutboxError, OutboxStore};
use signing::{SigningKeys, WebhookSecret};

/// The request header naming a caller's webhook URL (typed routes, async requests).
pub const URL_HEADER: &str = "flowhost-webhook-url";
/// The request header choosing the events sent to it (comma-separated; default: the
/// terminal ones).
pub const EVENTS_HEADER: &str = "flowhost-webhook-events";

/// `flowhost serve`'s webhook options.
#[derive(Debug, Clone, clap::Args)]
pub struct WebhookArgs {
    /// Subscribe this URL to every job's terminal event (job.succeeded, job.failed,
    /// job.canceled). Repeatable.
    #[arg(long = "webhook-url", env = "FLOWHOST_WEBHOOK_URLS", value_delimiter = ',')]
    pub webhook_urls: Vec<String>,
    /// Signing secret, `whsec_<base64 of 24-64 random bytes>`. Repeatable: during a rotation
    /// give the new and the old one; every delivery then carries both signatures. Without
    /// a secret no webhook is sent and `Flowhost-Webhook-Url` is refused.
    #[arg(long = "webhook-secret", env = "FLOWHOST_WEBHOOK_SECRETS", value_delimiter = ',', hide_env_values = true)]
    pub webhook_secrets: Vec<String>,
    /// Only these hosts may receive webhooks (name or IP, exact; any address, http or
    /// https). Repeatable. Without it: https to public addresses only.
    #[arg(long = "webhook-allow-host", env = "FLOWHOST_WEBHOOK_ALLOW_HOSTS", value_delimiter = ',')]
    pub webhook_allow_hosts: Vec<String>,
    /// Webhook attempts in flight at once.
    #[arg(long, env = "FLOWHOST_WEBHOOK_CONCURRENCY", default_value_t = 16)]
    pub webhook_concurrency: usize,
    /// Seconds one delivery attempt may take.
    #[arg(long, env = "FLOWHOST_WEBHOOK_TIMEOUT", default_value_t = 10)]
    pub webhook_timeout: u64,
    /// The retry schedule's unit in milliseconds (5000: 5 s, 30 s, 2 min, ... about a day).
    /// For tests only.
    #[arg(long, hide = true, default_value_t = 5000.0)]
    pub webhook_retry_base_ms: f64,
}

/// Why a request's webhook headers were refused (a 400 naming the header).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum WebhookRequestError {
    #[error("{0}")]
    Destination(#[from] DestinationError),
    #[error("unknown event `{0}`; known: job.started, job.succeeded, job.failed, job.canceled")]
    UnknownEvent(String),
    #[error("name at least one event")]
    NoEvents,
    #[error("the header is not valid text")]
    NotText,
    #[error("Flowhost-Webhook-Events needs Flowhost-Webhook-Url")]
    EventsWithoutUrl,
    #[error("webhooks are sent for async requests only; add `Prefer: respond-async`")]
    NotAsync,
    #[error("this server sends no webhooks (no signing secret is configured)")]
    NotEnabled,
}

impl WebhookRequestError {
    /// The request header at fault.
    pub fn header(&self) -> &'static str {
        match self {
            WebhookRequestError::UnknownEvent(_) | WebhookRequestError::NoEvents | WebhookRequestError::EventsWithoutUrl => "Flowhost-Webhook-Events",
            _ => "Flowhost-Webhook-Url",
        }
    }
}

/// Startup configuration errors (flags), safe to print.
#[derive(Debug, thiserror::Error)]
pub enum WebhookConfigError {
    #[error("--webhook-secret (FLOWHOST_WEBHOOK_SECRETS) entry {position}: {error}")]
    Secret { position: usize, error: signing::SecretError },
    #[error("--webhook-url (FLOWHOST_WEBHOOK_URLS) `{url}`: {error}")]
    Url { url: String, error: DestinationError },
    #[error("--webhook-url needs --webhook-secret: receivers must be able to verify deliveries")]
    UrlWithoutSecret,
    #[error("--webhook-retry-base-ms must be a positive number of milliseconds")]
    RetryBase,
}

/// The parsed, checked options.
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    pub keys: SigningKeys,
    pub policy: DestinationPolicy,
    pub operator_urls: Vec<String>,
    pub dispatcher: DispatcherConfig,
    pub timeout: Duration,
}

impl WebhookSettings {
    pub fn from_args(args: &WebhookArgs) -> Result<Self, WebhookConfigError> {
        let mut secrets = Vec::new();
        for (index, text) in args.webhook_secrets.iter().filter(|s| !s.trim().is_empty()).enumerate() {
            secrets.push(text.parse::<WebhookSecret>().map_err(|error| WebhookConfigError::Secret { position: index + 1, error })?);
        }
        let keys = SigningKeys::new(secrets);
        let policy = DestinationPolicy::new(args.webhook_allow_hosts.iter().cloned());
        let mut operator_urls = Vec::new();
        for url in args.webhook_urls.iter().map(|u| u.trim()).filter(|u| !u.is_empty()) {
            let checked = policy.check_url(url).map_err(|error| WebhookConfigError::Url { url: url.to_owned(), error })?;
            operator_urls.push(checked.to_string());
        }
        if !operator_urls.is_empty() && keys.is_empty() {
            return Err(WebhookConfigError::UrlWithoutSecret);
        }
        if !(args.webhook_retry_base_ms.is_finite() && args.webhook_retry_base_ms > 0.0) {
            return Err(WebhookConfigError::RetryBase);
        }
        let base = Duration::from_secs_f64(args.webhook_retry_base_ms / 1000.0);
        Ok(Self {
            keys,
            policy,
            operator_urls,
            dispatcher: DispatcherConfig { concurrency: args.webhook_concurrency.max(1), schedule: schedule::RetrySchedule::with_base(base), ..DispatcherConfig::default() },
            timeout: Duration::from_secs(args.webhook_timeout.max(1)),
        })
    }
}

/// The running webhook service: vets subscriptions, builds messages, and drives the
/// dispatcher. Cheap to clone.
#[derive(Clone)]
pub struct Webhooks {
    inner: Arc<Inner>,
}

struct Inner {
    settings: WebhookSettings,
    store: Arc<dyn OutboxStore>,
    dispatcher: Option<DispatcherHandle>,
}

impl std::fmt::Debug for Webhooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhooks").field("operator_urls", &self.inner.settings.operator_urls.len()).finish_non_exhaustive()
    }
}

impl Webhooks {
    /// Start the dispatcher over `store` (when signing keys exist; without keys nothing is
    /// ever enqueued, so there is nothing to send).
    pub fn start(settings: WebhookSettings, store: Arc<dyn OutboxStore>, metrics: crate::metrics::Metrics) -> anyhow::Result<Self> {
        let dispatcher = if settings.keys.is_empty() {
            None
        } else {
            let deliverer = delivery::Deliverer::new(settings.policy.clone(), settings.keys.clone(), settings.timeout)?;
            Some(dispatcher::spawn(store.clone(), deliverer, settings.dispatcher.clone(), metrics))
        };
        if let Some(_running) = &dispatcher {
            tracing::info!(operator_subscriptions = settings.operator_urls.len(), allow_list = settings.policy.has_allow_list(), "webhooks enabled");
        }
        Ok(Self { inner: Arc::new(Inner { settings, store, dispatcher }) })
    }

    /// Whether webhooks can be sent (a signing secret is configured).
    pub fn enabled(&self) -> bool {
        !self.inner.settings.keys.is_empty()
    }

    /// Check a request's webhook headers (`url`, `events`: their raw values) at submission:
    /// `Ok(None)` when it names no webhook, `Err` (a 400) when the URL is refused.
    pub async fn subscription_from_headers(&self, url: Option<&[u8]>, events: Option<&[u8]>, respond_async: bool) -> Result<Option<Subscription>, WebhookRequestError> {
        let Some(url) = url else {
            return if events.is_some() { Err(WebhookRequestError::EventsWithoutUrl) } else { Ok(None) };
        };
        let url = std::str::from_utf8(url).map_err(|_| WebhookRequestError::NotText)?.trim();
        if url.len() > destination::MAX_URL_BYTES {
            return Err(DestinationError::TooLong.into());
        }
        if !respond_async {
            return Err(WebhookRequestError::NotAsync);
        }
        if !self.enabled() {
            return Err(WebhookRequestError::NotEnabled);
        }
        let events = match events {
            None => JobEventType::TERMINAL.to_vec(),
            Some(raw) => parse_events(std::str::from_utf8(raw).map_err(|_| WebhookRequestError::NotText)?)?,
        };
        let url = self.inner.settings.policy.vet_for_submission(url).await?;
        Ok(Some(Subscription { url: url.to_string(), events }))
    }

    /// The messages one job event makes: one per subscriber that wants it (the job's own
    /// subscription, then the operator's URLs for terminal events). `job` is the v2 Job
    /// object; the body is built once here and stays byte-identical on every attempt.
    /// Insert them with [`outbox::insert_deliveries`] in the transaction that records the
    /// state change, then call [`committed`](Self::committed).
    pub fn messages_for(&self, job_id: &str, event: JobEventType, job: &Value, subscription: Option<&Subscription>, at: SystemTime) -> Vec<NewDelivery> {
        if !self.enabled() {
            return Vec::new();
        }
        let mut urls: Vec<&str> = Vec::new();
        if let Some(subscription) = subscription.filter(|s| s.events.contains(&event)) {
            urls.push(&subscription.url);
        }
        if JobEventType::TERMINAL.contains(&event) {
            urls.extend(self.inner.settings.operator_urls.iter().map(String::as_str));
        }
        urls.dedup();
        let payload = json!({
            "type": event.as_str(),
            "timestamp": crate::timestamp::rfc3339_utc(at),
            "data": job,
        })
        .to_string();
        let created_at_ms = at.duration_since(SystemTime::UNIX_EPOCH).map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)).unwrap_or(0);
        urls.into_iter()
            .map(|url| NewDelivery {
                message_id: signing::new_message_id(),
                job_id: job_id.to_owned(),
                event_type: event.as_str().to_owned(),
                url: url.to_owned(),
                payload: payload.clone(),
                created_at_ms,
            })
            .collect()
    }

    /// Rows were committed: wake the dispatcher.
    pub fn committed(&self) {
        if let Some(dispatcher) = &self.inner.dispatcher {
            dispatcher.wake();
        }
    }

    /// Enqueue messages outside a job transaction (and wake the dispatcher).
    pub async fn enqueue(&self, messages: &[NewDelivery]) -> Result<(), OutboxError> {
        if messages.is_empty() {
            return Ok(());
        }
        self.inner.store.enqueue(messages).await?;
        self.committed();
        Ok(())
    }

    /// The admin listing.
    pub async fn dead_letters(&self, limit: u32) -> Result<Vec<DeadLetter>, OutboxError> {
        self.inner.store.dead_letters(limit).await
    }

    /// Stop the dispatcher (shutdown).
    pub fn stop(&self) {
        if let Some(dispatcher) = &self.inner.dispatcher {
            dispatcher.stop();
        }
    }
}

fn parse_events(text: &str) -> Result<Vec<JobEventType>, WebhookRequestError> {
    let mut events = Vec::new();
    for name in text.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        if name.len() > 32 {
            return Err(WebhookRequestError::UnknownEvent(format!("{}…", &name[..name.floor_char_boundary(32)])));
        }
        let event = JobEventType::parse(name).ok_or_else(|| WebhookRequestError::UnknownEvent(name.to_owned()))?;
        if !events.contains(&event) {
            events.push(event);
        }
    }
    if events.is_empty() {
        return Err(WebhookRequestError::NoEvents);
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::Analytics;
    use crate::metrics::Metrics;

    fn args(extra: &[&str]) -> WebhookArgs {
        #[derive(clap::Parser)]
        struct Wrapper {
            #[command(flatten)]
            args: WebhookArgs,
        }
        let mut argv = vec!["flowhost"];
        argv.extend_from_slice(extra);
        <Wrapper as clap::Parser>::try_parse_from(argv).unwrap().args
    }

    async fn webhooks(extra: &[&str]) -> (Webhooks, tempfile::TempDir) {
        let (store, dir) = outbox::tests::scratch_outbox().await;
        let settings = WebhookSettings::from_args(&args(extra)).unwrap();
        (Webhooks::start(settings, Arc::new(store), Metrics::new(Analytics::disabled())).unwrap(), dir)
    }

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    #[tokio::test]
    async fn a_private_range_webhook_url_is_refused_at_submission() {
        let (hooks, _dir) = webhooks(&["--webhook-secret", SECRET]).await;
        let refused = hooks.subscription_from_headers(Some(b"https://10.1.2.3/hook"), None, true).await;
        assert_eq!(refused, Err(WebhookRequestError::Destination(DestinationError::ForbiddenAddress("private"))));
        assert_eq!(refused.unwrap_err().header(), "Flowhost-Webhook-Url");
    }

    #[tokio::test]
    async fn headers_parse_into_a_subscription_with_the_terminal_events_by_default() {
        let (hooks, _dir) = webhooks(&["--webhook-secret", SECRET, "--webhook-allow-host", "127.0.0.1"]).await;
        let sub = hooks.subscription_from_headers(Some(b"http://127.0.0.1:9/h"), None, true).await.unwrap().unwrap();
        assert_eq!(sub.events, JobEventType::TERMINAL.to_vec());
        let sub = hooks.subscription_from_headers(Some(b"http://127.0.0.1:9/h"), Some(b"job.started, job.failed"), true).await.unwrap().unwrap();
        assert_eq!(sub.events, vec![JobEventType::Started, JobEventType::Failed]);
        assert_eq!(hooks.subscription_from_headers(None, None, false).await, Ok(None));
    }

    #[tokio::test]
    async fn bad_webhook_headers_name_what_is_wrong() {
        let (hooks, _dir) = webhooks(&["--webhook-secret", SECRET, "--webhook-allow-host", "127.0.0.1"]).await;
        let url = Some(b"http://127.0.0.1:9/h".as_slice());
        assert_eq!(hooks.subscription_from_headers(url, Some(b"job.done"), true).await, Err(WebhookRequestError::UnknownEvent("job.done".into())));
        assert_eq!(hooks.subscription_from_headers(url, Some(b" , "), true).await, Err(WebhookRequestError::NoEvents));
        assert_eq!(hooks.subscription_from_headers(None, Some(b"job.failed"), true).await, Err(WebhookRequestError::EventsWithoutUrl));
        assert_eq!(hooks.subscription_from_headers(url, None, false).await, Err(WebhookRequestError::NotAsync));
        let long = format!("http://127.0.0.1/{}", "a".repeat(destination::MAX_URL_BYTES));
        assert_eq!(hooks.subscription_from_headers(Some(long.as_bytes()), None, true).await, Err(WebhookRequestError::Destination(DestinationError::TooLong)));
        let (off, _dir2) = webhooks(&[]).await;
        assert_eq!(off.subscription_from_headers(url, None, true).await, Err(WebhookRequestError::NotEnabled));
    }

    #[tokio::test]
    async fn one_event_makes_one_message_per_interested_subscriber_with_one_body() {
        let (hooks, _dir) = webhooks(&["--webhook-secret", SECRET, "--webhook-allow-host", "127.0.0.1", "--webhook-url", "http://127.0.0.1:9/operator"]).await;
        let job = json!({"id": "j1", "status": "succeeded"});
        let sub = Subscription { url: "http://127.0.0.1:9/caller".into(), events: vec![JobEventType::Started, JobEventType::Succeeded] };
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let messages = hooks.messages_for("j1", JobEventType::Succeeded, &job, Some(&sub), at);
        assert_eq!(messages.len(), 2);
        assert_eq!(messages[0].url, "http://127.0.0.1:9/caller");
        assert_eq!(messages[1].url, "http://127.0.0.1:9/operator");
        assert_ne!(messages[0].message_id, messages[1].message_id);
        assert_eq!(messages[0].payload, messages[1].payload);
        let body: Value = serde_json::from_str(&messages[0].payload).unwrap();
        assert_eq!(body, json!({"type": "job.succeeded", "timestamp": "2027-01-15T08:00:00.000Z", "data": job}));
        // job.started goes to the caller who asked for it, not to the operator.
        let started = hooks.messages_for("j1", JobEventType::Started, &job, Some(&sub), at);
        assert_eq!(started.iter().map(|m| m.url.as_str()).collect::<Vec<_>>(), vec!["http://127.0.0.1:9/caller"]);
        // A caller who did not ask for job.failed does not get it.
        let failed = hooks.messages_for("j1", JobEventType::Failed, &job, Some(&sub), at);
        assert_eq!(failed.len(), 1);
    }

    #[test]
    fn serve_takes_the_webhook_flags_and_env_lists() {
        let cli = <crate::app::cli::Cli as clap::Parser>::try_parse_from([
            "flowhost",
            "serve",
            "--webhook-secret",
            SECRET,
            "--webhook-secret",
            SECRET,
            "--webhook-allow-host",
            "127.0.0.1,hooks.internal",
            "--webhook-retry-base-ms",
            "0.5",
        ])
        .unwrap();
        let crate::app::cli::Command::Serve(serve) = cli.command else {
            panic!("not serve")
        };
        assert_eq!(serve.webhooks.webhook_secrets.len(), 2);
        assert_eq!(serve.webhooks.webhook_allow_hosts, vec!["127.0.0.1", "hooks.internal"]);
        let settings = WebhookSettings::from_args(&serve.webhooks).unwrap();
        assert_eq!(settings.dispatcher.schedule.nominal_delay(1), Some(Duration::from_micros(500)));
    }

    #[test]
    fn startup_refuses_bad_secrets_and_operator_urls() {
        let err = WebhookSettings::from_args(&args(&["--webhook-secret", "nope"])).unwrap_err().to_string();
        assert!(err.contains("entry 1") && err.contains("whsec_"), "{err}");
        let err = WebhookSettings::from_args(&args(&["--webhook-secret", SECRET, "--webhook-url", "https://169.254.169.254/"])).unwrap_err().to_string();
        assert!(err.contains("link-local"), "{err}");
        let err = WebhookSettings::from_args(&args(&["--webhook-url", "https://hooks.example.com/"])).unwrap_err();
        assert!(matches!(err, WebhookConfigError::UrlWithoutSecret));
    }
}
