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

/// The same checks through a real `flowhost serve --simulate`: an async typed request names
/// its webhook in headers; the message is written with the job's terminal state.
mod serve {
    use super::*;
    use flowhost_tests::{TestServer, build_component, eventually, problem};
    use std::sync::OnceLock;

    fn flux_dev() -> PathBuf {
        static BUILT: OnceLock<PathBuf> = OnceLock::new();
        BUILT.get_or_init(|| build_component("flux-dev", &[]).expect("flux-dev builds")).clone()
    }

    async fn start(args: &[&str]) -> TestServer {
        let plugin = flux_dev();
        let mut argv = vec!["--simulate"];
        argv.extend_from_slice(args);
        let server = TestServer::start(&[("flux-dev.wasm", plugin.as_path())], &argv).await.unwrap();
        let ready = eventually(Duration::from_secs(20), || async {
            let h = server.get_json("/health").await.ok()?;
            (h["comfyui"]["status"] == "ready").then_some(())
        })
        .await;
        assert!(ready.is_some(), "ComfyUI never became ready");
        server
    }

    async fn submit(server: &TestServer, webhook: &str) -> reqwest::Response {
        server
            .client
            .post(server.url("/flux-dev"))
            .header("prefer", "respond-async")
            .header("flowhost-webhook-url", webhook)
            .json(&json!({"prompt": "a lighthouse", "width": 256, "height": 256, "steps": 2}))
            .send()
            .await
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_async_typed_request_is_told_its_job_succeeded_after_three_failed_attempts() {
        require_standardwebhooks();
        let dir = tempfile::tempdir().unwrap();
        let secret = WebhookSecret::generate();
        let receiver = Receiver::start(free_port(), &secret, 3, &dir.path().join("rx.log"));
        let server = start(&["--webhook-secret", &secret, "--webhook-allow-host", "127.0.0.1", "--webhook-retry-base-ms", "100"]).await;
        let response = submit(&server, &receiver.url()).await;
        assert_eq!(response.status(), 202);
        let job: Value = response.json().await.unwrap();
        let seen = wait_for_deliveries(&receiver.log, 4, Duration::from_secs(40)).await;
        assert_eq!(seen.len(), 4, "{seen:#?}");
        let id = seen[0]["webhook_id"].as_str().unwrap().to_owned();
        for entry in &seen {
            assert_eq!(entry["verified"], true, "{entry}");
            assert_eq!(entry["webhook_id"], id.as_str());
            assert_eq!(entry["tampered_rejected"], true);
        }
        let arrived: Vec<f64> = seen.iter().map(|e| e["arrived"].as_f64().unwrap()).collect();
        let gaps: Vec<f64> = arrived.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps[0] >= 0.1 && gaps[1] >= 0.6 && gaps[2] >= 2.4 && gaps[0] < gaps[1] && gaps[1] < gaps[2], "{gaps:?}");
        let body: Value = serde_json::from_str(seen[3]["body"].as_str().unwrap()).unwrap();
        assert_eq!(body["type"], "job.succeeded");
        assert_eq!(body["data"]["id"], job["id"]);
        assert_eq!(body["data"]["status"], "succeeded");
        assert!(body["data"]["outputs"].as_array().is_some_and(|o| !o.is_empty()), "{body}");
        let metrics = server.server.state.jobs.metrics.render();
        assert!(metrics.contains("flowhost_webhook_deliveries_total{outcome=\"failed\"} 3"), "{metrics}");
        server.server.shutdown().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_private_range_webhook_url_is_refused_at_submission() {
        let secret = WebhookSecret::generate();
        let server = start(&["--webhook-secret", &secret]).await;
        for url in ["https://10.0.0.7/hook", "https://169.254.169.254/latest/meta-data/", "https://[::ffff:127.0.0.1]/x", "http://hooks.example.com/"] {
            let (status, body) = problem(submit(&server, url).await).await.unwrap();
            assert_eq!(status, 400, "{url}: {body}");
            assert_eq!(body["header"], "Flowhost-Webhook-Url", "{body}");
            assert!(body["detail"].as_str().unwrap().starts_with("Flowhost-Webhook-Url: "), "{body}");
        }
        // Without Prefer: respond-async the header is refused too (a sync caller gets the bytes).
        let response = server.client.post(server.url("/flux-dev")).header("flowhost-webhook-url", "https://hooks.example.com/").json(&json!({"prompt": "x"})).send().await.unwrap();
        assert_eq!(response.status(), 400);
        server.server.shutdown().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_receiver_down_across_a_flowhost_restart_gets_the_delivery_afterwards() {
        require_standardwebhooks();
        let dir = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let state_dir = state.path().to_string_lossy().to_string();
        let secret = WebhookSecret::generate();
        let port = free_port(); // the receiver is down
        let url = format!("http://127.0.0.1:{port}/hooks/flowhost");
        let args = ["--state-dir", state_dir.as_str(), "--webhook-secret", secret.as_str(), "--webhook-allow-host", "127.0.0.1", "--webhook-retry-base-ms", "300"];
        let server = start(&args).await;
        let job: Value = submit(&server, &url).await.json().await.unwrap();
        let metrics = server.server.state.jobs.metrics.clone();
        let failed = eventually(Duration::from_secs(30), || {
            let metrics = metrics.clone();
            async move { metrics.render().contains("flowhost_webhook_deliveries_total{outcome=\"failed\"}").then_some(()) }
        })
        .await;
        assert!(failed.is_some(), "no failed attempt: {}", metrics.render());
        server.server.shutdown().await.unwrap();

        let receiver = Receiver::start(port, &secret, 0, &dir.path().join("rx.log"));
        let server = start(&args).await;
        let seen = wait_for_deliveries(&receiver.log, 1, Duration::from_secs(30)).await;
        assert_eq!(seen.len(), 1, "the pending delivery never arrived after the restart");
        assert_eq!(seen[0]["verified"], true, "{}", seen[0]);
        let body: Value = serde_json::from_str(seen[0]["body"].as_str().unwrap()).unwrap();
        assert_eq!(body["data"]["id"], job["id"]);
        assert_eq!(body["type"], "job.succeeded");
        server.server.shutdown().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_message_out_of_attempts_is_listed_as_a_dead_letter_and_counted() {
        require_standardwebhooks();
        let dir = tempfile::tempdir().unwrap();
        let secret = WebhookSecret::generate();
        let receiver = Receiver::start(free_port(), &secret, 1000, &dir.path().join("rx.log"));
        // The whole schedule at 1 µs per unit: eleven attempts in a few milliseconds.
        let server = start(&["--webhook-secret", &secret, "--webhook-allow-host", "127.0.0.1", "--webhook-retry-base-ms", "0.001"]).await;
        let job: Value = submit(&server, &format!("{}?token=receiver-secret", receiver.url())).await.json().await.unwrap();
        let listed = eventually(Duration::from_secs(30), || async {
            let list = server.get_json("/admin/webhooks/dead-letters").await.ok()?;
            (list["dead_letters"].as_array()?.len() == 1).then_some(list)
        })
        .await
        .expect("never dead-lettered");
        let letter = &listed["dead_letters"][0];
        assert_eq!(letter["job_id"], job["id"]);
        assert_eq!(letter["event_type"], "job.succeeded");
        assert_eq!(letter["attempts"], 11);
        assert_eq!(letter["last_status"], 500);
        assert_eq!(letter["destination"], receiver.url(), "the query string (a receiver's token) is not shown");
        assert_eq!(deliveries(&receiver.log).len(), 11);
        assert!(deliveries(&receiver.log).iter().all(|d| d["verified"] == true));
        let metrics = eventually(Duration::from_secs(5), || async {
            let text = server.client.get(server.url("/metrics")).send().await.ok()?.text().await.ok()?;
            (text.contains("flowhost_webhook_dead_letters 1") && text.contains("flowhost_webhook_pending 0")).then_some(text)
        })
        .await
        .expect("the dead-letter and pending gauges never showed 1 and 0");
        assert!(metrics.contains("flowhost_webhook_deliveries_total{outcome=\"dead_lettered\"} 1"), "{metrics}");
        server.server.shutdown().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_operator_gets_terminal_events_and_a_caller_the_events_it_asked_for() {
        require_standardwebhooks();
        let dir = tempfile::tempdir().unwrap();
        let secret = WebhookSecret::generate();
        let operator = Receiver::start(free_port(), &secret, 0, &dir.path().join("operator.log"));
        let caller = Receiver::start(free_port(), &secret, 0, &dir.path().join("caller.log"));
        let server = start(&["--webhook-secret", &secret, "--webhook-allow-host", "127.0.0.1", "--webhook-url", &operator.url()]).await;
        let response = server
            .client
            .post(server.url("/flux-dev"))
            .header("prefer", "respond-async")
            .header("flowhost-webhook-url", caller.url())
            .header("flowhost-webhook-events", "job.started, job.succeeded")
            .json(&json!({"prompt": "a lighthouse", "width": 256, "height": 256, "steps": 2}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
        let job: Value = response.json().await.unwrap();
        // A plain sync request makes a job too: the operator hears of it, no caller does.
        let sync = server.post_json("/flux-dev", &json!({"prompt": "a sync one", "width": 256, "height": 256, "steps": 2})).await.unwrap();
        assert_eq!(sync.status(), 200);
        let to_caller = wait_for_deliveries(&caller.log, 2, Duration::from_secs(30)).await;
        let to_operator = wait_for_deliveries(&operator.log, 2, Duration::from_secs(30)).await;
        tokio::time::sleep(Duration::from_millis(300)).await; // nothing more may come
        let types = |log: &Path| -> Vec<(String, String)> {
            deliveries(log)
                .iter()
                .map(|d| {
                    assert_eq!(d["verified"], true, "{d}");
                    let body: Value = serde_json::from_str(d["body"].as_str().unwrap()).unwrap();
                    (body["type"].as_str().unwrap().to_owned(), body["data"]["id"].as_str().unwrap().to_owned())
                })
                .collect()
        };
        let id = job["id"].as_str().unwrap().to_owned();
        assert_eq!(to_caller.len(), 2);
        // Messages are independent (no ordering promise): compare as a set.
        let mut caller_types = types(&caller.log);
        caller_types.sort();
        assert_eq!(caller_types, vec![("job.started".to_owned(), id.clone()), ("job.succeeded".to_owned(), id.clone())]);
        assert_eq!(to_operator.len(), 2);
        let operator_types = types(&operator.log);
        assert!(operator_types.iter().all(|(t, _)| t == "job.succeeded"), "{operator_types:?}");
        assert!(operator_types.iter().any(|(_, j)| *j == id), "{operator_types:?}");
        server.server.shutdown().await.unwrap();
    }
}
