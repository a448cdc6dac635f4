//! Webhooks checked by the official Standard Webhooks verifier (`standardwebhooks` from
//! PyPI, run by tests/webhooks/receiver.py on loopback): retries keep the `webhook-id` and
//! back off, a delivery pending when the service stops arrives after it starts again over
//! the same database, tampering is caught by the verifier, and a receiver holding only the
//! old secret still verifies during a rotation.
//!
//! The Python interpreter is `$FLOWHOST_TEST_PYTHON` (scripts/test.sh points it at a venv
//! with `standardwebhooks==1.1.0`), else `python3`. A missing package fails the test.

use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use flowhost::events::Analytics;
use flowhost::metrics::Metrics;
use flowhost::webhooks::outbox::SqliteOutbox;
use flowhost::webhooks::signing::WebhookSecret;
use flowhost::webhooks::{JobEventType, Subscription, WebhookArgs, WebhookSettings, Webhooks};
use serde_json::{Value, json};

fn python() -> String {
    std::env::var("FLOWHOST_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Fails (never skips) when the official verifier is not installed.
fn require_standardwebhooks() {
    let out = Command::new(python()).args(["-c", "import importlib.metadata as m; print(m.version('standardwebhooks'))"]).output();
    match out {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "the official Standard Webhooks verifier is missing: `pip install standardwebhooks==1.1.0` into {} (or set FLOWHOST_TEST_PYTHON): {}",
            python(),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(error) => panic!("cannot run {}: {error}", python()),
    }
}

/// The Python receiver, killed on drop.
struct Receiver {
    child: Child,
    log: PathBuf,
    port: u16,
}

impl Receiver {
    fn start(port: u16, secret: &str, fail_first: u32, log: &Path) -> Receiver {
        let script = flowhost_tests::workspace_root().join("tests/webhooks/receiver.py");
        let mut child = Command::new(python())
            .arg(script)
            .args(["--port", &port.to_string(), "--secret", secret, "--log"])
            .arg(log)
            .args(["--fail-first", &fail_first.to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting the receiver");
        let mut line = String::new();
        let stdout = child.stdout.take().expect("receiver stdout");
        std::io::BufReader::new(stdout).read_line(&mut line).expect("reading the receiver's ready line");
        assert_eq!(line.trim(), "ready", "the receiver did not start (standardwebhooks missing?)");
        Receiver { child, log: log.to_owned(), port }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hooks/flowhost", self.port)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the receiver logged, one entry per request.
fn deliveries(log: &Path) -> Vec<Value> {
    std::fs::read_to_string(log).unwrap_or_default().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

async fn wait_for_deliveries(log: &Path, count: usize, limit: Duration) -> Vec<Value> {
    let start = Instant::now();
    loop {
        let seen = deliveries(log);
        if seen.len() >= count || start.elapsed() > limit {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn settings(extra: &[&str]) -> WebhookSettings {
    #[derive(clap::Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: WebhookArgs,
    }
    let mut argv = vec!["flowhost", "--webhook-allow-host", "127.0.0.1"];
    argv.extend_from_slice(extra);
    WebhookSettings::from_args(&<Wrapper as clap::Parser>::try_parse_from(argv).unwrap().args).unwrap()
}

fn job(id: &str) -> Value {
    json!({"id": id, "status": "succeeded", "outputs": [{"id": "a1", "content_type": "image/jpeg"}]})
}

fn subscription(url: String) -> Subscription {
    Subscription { url, events: JobEventType::TERMINAL.to_vec() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_failing_three_times_gets_the_same_verified_message_with_growing_delays() {
    require_standardwebhooks();
    let dir = tempfile::tempdir().unwrap();
    let secret = WebhookSecret::generate();
    let receiver = Receiver::start(free_port(), &secret, 3, &dir.path().join("rx.log"));
    let store = SqliteOutbox::open_standalone(&dir.path().join("state.db")).await.unwrap();
    // Base unit 100 ms: retries after 100 ms, 600 ms, 2.4 s (+0-25 % jitter).
    let hooks = Webhooks::start(settings(&["--webhook-secret", &secret, "--webhook-retry-base-ms", "100"]), Arc::new(store), Metrics::new(Analytics::disabled())).unwrap();
    let messages = hooks.messages_for("job-1", JobEventType::Succeeded, &job("job-1"), Some(&subscription(receiver.url())), SystemTime::now());
    hooks.enqueue(&messages).await.unwrap();

    let seen = wait_for_deliveries(&receiver.log, 4, Duration::from_secs(20)).await;
    hooks.stop();
    assert_eq!(seen.len(), 4, "{seen:#?}");
    for entry in &seen {
        assert_eq!(entry["verified"], true, "the official verifier refused a delivery: {entry}");
        assert_eq!(entry["webhook_id"], messages[0].message_id.as_str(), "every retry carries the same webhook-id");
    }
    let answered: Vec<i64> = seen.iter().map(|e| e["answered"].as_i64().unwrap()).collect();
    assert_eq!(answered, vec![500, 500, 500, 204]);
    let arrived: Vec<f64> = seen.iter().map(|e| e["arrived"].as_f64().unwrap()).collect();
    let gaps: Vec<f64> = arrived.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps[0] >= 0.1 && gaps[1] >= 0.6 && gaps[2] >= 2.4, "delays shorter than the schedule: {gaps:?}");
    assert!(gaps[0] < gaps[1] && gaps[1] < gaps[2], "delays do not grow: {gaps:?}");
    let body: Value = serde_json::from_str(seen[3]["body"].as_str().unwrap()).unwrap();
    assert_eq!(body["type"], "job.succeeded");
    assert_eq!(body["data"], job("job-1"));
    assert!(body["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_body_is_rejected_by_the_official_verifier() {
    require_standardwebhooks();
    let dir = tempfile::tempdir().unwrap();
    let secret = WebhookSecret::generate();
    let receiver = Receiver::start(free_port(), &secret, 0, &dir.path().join("rx.log"));
    let store = SqliteOutbox::open_standalone(&dir.path().join("state.db")).await.unwrap();
    let hooks = Webhooks::start(settings(&["--webhook-secret", &secret]), Arc::new(store), Metrics::new(Analytics::disabled())).unwrap();
    hooks.enqueue(&hooks.messages_for("job-2", JobEventType::Failed, &job("job-2"), Some(&subscription(receiver.url())), SystemTime::now())).await.unwrap();
    let seen = wait_for_deliveries(&receiver.log, 1, Duration::from_secs(10)).await;
    hooks.stop();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0]["verified"], true, "{}", seen[0]);
    assert_eq!(seen[0]["tampered_rejected"], true, "the verifier accepted the headers over a changed body");

    // And a receiver holding another secret refuses the genuine delivery.
    let dir2 = tempfile::tempdir().unwrap();
    let stranger = Receiver::start(free_port(), &WebhookSecret::generate(), 0, &dir2.path().join("rx.log"));
    let store = SqliteOutbox::open_standalone(&dir2.path().join("state.db")).await.unwrap();
    let hooks = Webhooks::start(settings(&["--webhook-secret", &secret, "--webhook-retry-base-ms", "60000"]), Arc::new(store), Metrics::new(Analytics::disabled())).unwrap();
    hooks.enqueue(&hooks.messages_for("job-3", JobEventType::Failed, &job("job-3"), Some(&subscription(stranger.url())), SystemTime::now())).await.unwrap();
    let seen = wait_for_deliveries(&stranger.log, 1, Duration::from_secs(10)).await;
    hooks.stop();
    assert_eq!(seen[0]["verified"], false);
    assert_eq!(seen[0]["answered"], 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_a_rotation_a_receiver_with_only_the_old_secret_verifies() {
    require_standardwebhooks();
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (WebhookSecret::generate(), WebhookSecret::generate());
    let receiver = Receiver::start(free_port(), &old, 0, &dir.path().join("rx.log"));
    let store = SqliteOutbox::open_standalone(&dir.path().join("state.db")).await.unwrap();
    let hooks = Webhooks::start(settings(&["--webhook-secret", &new, "--webhook-secret", &old]), Arc::new(store), Metrics::new(Analytics::disabled())).unwrap();
    hooks.enqueue(&hooks.messages_for("job-4", JobEventType::Canceled, &job("job-4"), Some(&subscription(receiver.url())), SystemTime::now())).await.unwrap();
    let seen = wait_for_deliveries(&receiver.log, 1, Duration::from_secs(10)).await;
    hooks.stop();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0]["verified"], true, "{}", seen[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_down_across_a_restart_gets_the_delivery_afterwards() {
    require_standardwebhooks();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    let secret = WebhookSecret::generate();
    let port = free_port(); // nothing listens there yet: the receiver is down
    let url = format!("http://127.0.0.1:{port}/hooks/flowhost");

    // First run: the message is enqueued, the attempt fails (connection refused), the
    // service stops with the message pending.
    let metrics = Metrics::new(Analytics::disabled());
    let store = SqliteOutbox::open_standalone(&db).await.unwrap();
    let hooks = Webhooks::start(settings(&["--webhook-secret", &secret, "--webhook-retry-base-ms", "200"]), Arc::new(store.clone()), metrics.clone()).unwrap();
    let messages = hooks.messages_for("job-5", JobEventType::Succeeded, &job("job-5"), Some(&subscription(url)), SystemTime::now());
    hooks.enqueue(&messages).await.unwrap();
    let start = Instant::now();
    while !metrics.render().contains("flowhost_webhook_deliveries_total{outcome=\"failed\"}") {
        assert!(start.elapsed() < Duration::from_secs(10), "no failed attempt recorded: {}", metrics.render());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    hooks.stop();
    store.close().await;
    drop(hooks);

    // The receiver comes up; a new service over the same database delivers the message.
    let receiver = Receiver::start(port, &secret, 0, &dir.path().join("rx.log"));
    let store = SqliteOutbox::open_standalone(&db).await.unwrap();
    let hooks = Webhooks::start(settings(&["--webhook-secret", &secret, "--webhook-retry-base-ms", "200"]), Arc::new(store), Metrics::new(Analytics::disabled())).unwrap();
    let seen = wait_for_deliveries(&receiver.log, 1, Duration::from_secs(20)).await;
    hooks.stop();
    assert_eq!(seen.len(), 1, "the pending delivery never arrived after the restart");
    assert_eq!(seen[0]["verified"], true, "{}", seen[0]);
    assert_eq!(seen[0]["webhook_id"], messages[0].message_id.as_str());
}
