//! Operations modules over real sockets on 127.0.0.1: access control in front of a
//! router, and analytics delivery to a local PostHog capture server. (`/metrics` labels are
//! tested through the real router: `runtime.rs`.)

use std::net::SocketAddr;

use axum::Router;

/// Serve `app` on an ephemeral 127.0.0.1 port.
async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    addr
}

mod access_control {
    use super::*;
    use axum::Extension;
    use axum::middleware::from_fn_with_state;
    use axum::routing::{get, post};
    use flowhost::auth::{AccessKeys, Caller};
    use flowhost::http::access::{require_admin_key, require_api_key};
    use reqwest::StatusCode;

    const USER_KEY: &str = "fh_user_4f9c2a7d1e8b";
    const ADMIN_KEY: &str = "fh_admin_b71e0c93d5aa";

    async fn who(caller: Option<Extension<Caller>>) -> String {
        caller.map_or_else(|| "nobody".to_owned(), |Extension(caller)| caller.name)
    }

    async fn service(keys: AccessKeys) -> String {
        let generation = Router::new()
            .route("/flux-dev", post(who))
            .route_layer(from_fn_with_state(keys.clone(), require_api_key));
        let admin = Router::new()
            .route("/metrics", get(who))
            .route("/plugins", get(who))
            .route_layer(from_fn_with_state(keys, require_admin_key));
        let addr = serve(generation.merge(admin)).await;
        format!("http://{addr}")
    }

    async fn configured() -> String {
        service(
            AccessKeys::parse(
                Some(&format!("alice:{USER_KEY}")),
                Some(&format!("ops:{ADMIN_KEY}")),
            )
            .unwrap(),
        )
        .await
    }

    async fn generate(base: &str, authorization: Option<&str>) -> reqwest::Response {
        let mut request = reqwest::Client::new()
            .post(format!("{base}/flux-dev"))
            .body("{}");
        if let Some(value) = authorization {
            request = request.header("Authorization", value);
        }
        request.send().await.unwrap()
    }

    async fn assert_refused(response: reqwest::Response, status: StatusCode, slug: &str) {
        assert_eq!(response.status(), status);
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
        let challenge = response.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(
            challenge.starts_with("Bearer realm=\"flowhost\""),
            "{challenge}"
        );
        let problem: serde_json::Value = response.json().await.unwrap();
        assert_eq!(
            problem["type"],
            format!("https://flowhost.dev/problems/{slug}")
        );
        assert_eq!(problem["status"], status.as_u16());
        assert!(problem["title"].is_string() && problem["detail"].is_string());
        let text = problem.to_string();
        assert!(
            !text.contains(USER_KEY) && !text.contains(ADMIN_KEY),
            "a key leaked: {text}"
        );
    }

    #[tokio::test]
    async fn valid_keys_pass_and_name_the_caller() {
        let base = configured().await;
        let response = generate(&base, Some(&format!("Bearer {USER_KEY}"))).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.text().await.unwrap(), "alice");
        let response = generate(&base, Some(&format!("bearer {ADMIN_KEY}"))).await;
        assert_eq!(
            response.text().await.unwrap(),
            "ops",
            "admin keys also call generation routes"
        );
        let response = reqwest::Client::new()
            .get(format!("{base}/metrics"))
            .bearer_auth(ADMIN_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.text().await.unwrap(), "ops");
    }

    #[tokio::test]
    async fn missing_header() {
        let base = configured().await;
        assert_refused(
            generate(&base, None).await,
            StatusCode::UNAUTHORIZED,
            "missing-api-key",
        )
        .await;
        let response = reqwest::get(format!("{base}/plugins")).await.unwrap();
        assert_refused(response, StatusCode::UNAUTHORIZED, "missing-api-key").await;
    }

    #[tokio::test]
    async fn basic_scheme() {
        let base = configured().await;
        let response = reqwest::Client::new()
            .post(format!("{base}/flux-dev"))
            .basic_auth("alice", Some(USER_KEY))
            .send()
            .await
            .unwrap();
        assert_refused(
            response,
            StatusCode::UNAUTHORIZED,
            "malformed-authorization",
        )
        .await;
        let response = generate(&base, Some(&format!("Basic {USER_KEY}"))).await;
        assert_refused(
            response,
            StatusCode::UNAUTHORIZED,
            "malformed-authorization",
        )
        .await;
    }

    #[tokio::test]
    async fn bearer_with_empty_key() {
        let base = configured().await;
        for value in ["Bearer", "Bearer ", "Bearer  "] {
            let response = generate(&base, Some(value)).await;
            assert_refused(
                response,
                StatusCode::UNAUTHORIZED,
                "malformed-authorization",
            )
            .await;
        }
    }

    #[tokio::test]
    async fn wrong_key() {
        let base = configured().await;
        let response = generate(&base, Some("Bearer fh_user_000000000000")).await;
        assert_refused(response, StatusCode::UNAUTHORIZED, "invalid-api-key").await;
    }

    #[tokio::test]
    async fn key_in_query_string_is_ignored() {
        let base = configured().await;
        for query in ["api_key", "key", "access_token", "token"] {
            let response = reqwest::Client::new()
                .post(format!("{base}/flux-dev?{query}={USER_KEY}"))
                .send()
                .await
                .unwrap();
            assert_refused(response, StatusCode::UNAUTHORIZED, "missing-api-key").await;
        }
    }

    #[tokio::test]
    async fn user_key_on_admin_route() {
        let base = configured().await;
        for route in ["/metrics", "/plugins"] {
            let response = reqwest::Client::new()
                .get(format!("{base}{route}"))
                .bearer_auth(USER_KEY)
                .send()
                .await
                .unwrap();
            assert_refused(response, StatusCode::FORBIDDEN, "admin-key-required").await;
        }
    }

    #[tokio::test]
    async fn prefix_of_a_valid_key() {
        let base = configured().await;
        for presented in [&USER_KEY[..USER_KEY.len() - 1], &USER_KEY[..4], "f"] {
            let response = generate(&base, Some(&format!("Bearer {presented}"))).await;
            assert_refused(response, StatusCode::UNAUTHORIZED, "invalid-api-key").await;
        }
        let extended = format!("Bearer {USER_KEY}0");
        assert_refused(
            generate(&base, Some(&extended)).await,
            StatusCode::UNAUTHORIZED,
            "invalid-api-key",
        )
        .await;
    }

    #[tokio::test]
    async fn case_changed_key() {
        let base = configured().await;
        let response = generate(&base, Some(&format!("Bearer {}", USER_KEY.to_uppercase()))).await;
        assert_refused(response, StatusCode::UNAUTHORIZED, "invalid-api-key").await;
    }

    #[tokio::test]
    async fn whitespace_padding() {
        let base = configured().await;
        // (Trailing whitespace never reaches us: HTTP strips it from header values.)
        for value in [
            format!("Bearer  {USER_KEY}"),
            format!("Bearer \t{USER_KEY}"),
            format!("Bearer {USER_KEY} x"),
            format!("Bearer {USER_KEY}\t{USER_KEY}"),
        ] {
            let response = generate(&base, Some(&value)).await;
            assert_refused(
                response,
                StatusCode::UNAUTHORIZED,
                "malformed-authorization",
            )
            .await;
        }
    }

    #[tokio::test]
    async fn two_authorization_headers() {
        let base = configured().await;
        let response = reqwest::Client::new()
            .post(format!("{base}/flux-dev"))
            .header("Authorization", "Bearer wrong")
            .header("Authorization", format!("Bearer {USER_KEY}"))
            .send()
            .await
            .unwrap();
        assert_refused(
            response,
            StatusCode::UNAUTHORIZED,
            "malformed-authorization",
        )
        .await;
    }

    #[tokio::test]
    async fn without_configured_keys_every_route_is_open() {
        let base = service(AccessKeys::parse(None, None).unwrap()).await;
        let response = generate(&base, None).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.text().await.unwrap(), "nobody");
        assert_eq!(
            reqwest::get(format!("{base}/metrics"))
                .await
                .unwrap()
                .status(),
            StatusCode::OK
        );
    }
}

mod analytics {
    use super::*;
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, UNIX_EPOCH};

    use axum::extract::State;
    use axum::http::StatusCode;
    use axum::routing::post;
    use flowhost::events::{Analytics, AnalyticsConfig, Event};
    use serde_json::{Value, json};

    /// A PostHog stand-in: records every `POST /batch/` body and answers with scripted
    /// statuses (then 200).
    #[derive(Clone, Default)]
    struct CaptureServer {
        bodies: Arc<Mutex<Vec<Value>>>,
        statuses: Arc<Mutex<VecDeque<u16>>>,
    }

    impl CaptureServer {
        async fn start(statuses: &[u16]) -> (Self, String) {
            let server = Self::default();
            server.statuses.lock().unwrap().extend(statuses);
            async fn capture(State(server): State<CaptureServer>, body: String) -> StatusCode {
                server
                    .bodies
                    .lock()
                    .unwrap()
                    .push(serde_json::from_str(&body).unwrap());
                let status = server.statuses.lock().unwrap().pop_front().unwrap_or(200);
                StatusCode::from_u16(status).unwrap()
            }
            let app = Router::new()
                .route("/batch/", post(capture))
                .with_state(server.clone());
            let addr = serve(app).await;
            (server, format!("http://{addr}"))
        }

        fn bodies(&self) -> Vec<Value> {
            self.bodies.lock().unwrap().clone()
        }

        fn event_names(&self) -> Vec<String> {
            self.bodies()
                .iter()
                .flat_map(|body| body["batch"].as_array().unwrap().clone())
                .map(|event| event["event"].as_str().unwrap().to_owned())
                .collect()
        }

        /// Wait (bounded) until `count` events arrived.
        async fn wait_for_events(&self, count: usize) {
            for _ in 0..1000 {
                if self.event_names().len() >= count {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("expected {count} events, got {:?}", self.event_names());
        }
    }

    fn config(host: &str) -> AnalyticsConfig {
        AnalyticsConfig {
            api_key: Some("phc_test_key".into()),
            host: host.to_owned(),
            flush_interval: Duration::from_secs(3600),
            initial_backoff: Duration::from_millis(5),
            max_backoff: Duration::from_millis(20),
            ..AnalyticsConfig::default()
        }
    }

    /// Let the background task run until it idles, waiting for a wake-up or the flush interval.
    async fn let_worker_idle() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    fn event(name: &str) -> Event {
        let mut event = Event::new(name, "alice", serde_json::Map::new());
        event.timestamp = UNIX_EPOCH + Duration::from_millis(1_798_761_599_250);
        event
    }

    fn without_uuids(mut body: Value) -> Value {
        for event in body["batch"].as_array_mut().unwrap() {
            let uuid = event.as_object_mut().unwrap().remove("uuid").unwrap();
            assert!(uuid.as_str().is_some_and(|u| u.len() == 36), "{uuid}");
        }
        body
    }

    #[tokio::test(flavor = "current_thread")]
    async fn sends_posthog_batch_bodies_exactly() {
        let (server, host) = CaptureServer::start(&[]).await;
        let analytics = Analytics::new(config(&format!("{host}/")));
        let mut completed = event("modal_flux_dev_generation_completed");
        completed.properties.insert("steps".into(), 28.into());
        completed
            .properties
            .insert("route".into(), "/flux-dev".into());
        analytics.emit(event("modal_flux_dev_generation_requested"));
        analytics.emit(completed);
        analytics.shutdown().await;
        let bodies = server.bodies();
        assert_eq!(bodies.len(), 1, "both events travel in one batch");
        // flowhost's own version (what `flowhost --version` prints), not this test crate's.
        let cli = <flowhost::app::cli::Cli as clap::CommandFactory>::command();
        let version = cli.get_version().expect("flowhost has a version");
        assert_eq!(
            without_uuids(bodies[0].clone()),
            json!({
                "api_key": "phc_test_key",
                "batch": [
                    {
                        "event": "modal_flux_dev_generation_requested",
                        "properties": {"distinct_id": "alice", "$lib": "flowhost", "$lib_version": version},
                        "timestamp": "2026-12-31T23:59:59.250Z",
                    },
                    {
                        "event": "modal_flux_dev_generation_completed",
                        "properties": {"steps": 28, "route": "/flux-dev", "distinct_id": "alice", "$lib": "flowhost", "$lib_version": version},
                        "timestamp": "2026-12-31T23:59:59.250Z",
                    },
                ],
            })
        );
        assert_eq!(analytics.dropped(), 0);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_full_batch_is_sent_without_waiting_for_the_flush_interval() {
        let (server, host) = CaptureServer::start(&[]).await;
        let analytics = Analytics::new(AnalyticsConfig {
            batch_size: 3,
            ..config(&host)
        });
        let_worker_idle().await;
        for n in 1..=7 {
            analytics.emit(event(&format!("e{n}")));
        }
        server.wait_for_events(7).await;
        let sizes: Vec<usize> = server
            .bodies()
            .iter()
            .map(|b| b["batch"].as_array().unwrap().len())
            .collect();
        assert_eq!(sizes, vec![3, 3, 1]);
        assert_eq!(
            server.event_names(),
            ["e1", "e2", "e3", "e4", "e5", "e6", "e7"]
        );
        analytics.shutdown().await;
    }

    #[tokio::test]
    async fn a_partial_batch_is_sent_at_the_flush_interval() {
        let (server, host) = CaptureServer::start(&[]).await;
        let analytics = Analytics::new(AnalyticsConfig {
            flush_interval: Duration::from_millis(20),
            ..config(&host)
        });
        analytics.emit(event("lonely"));
        server.wait_for_events(1).await;
        assert_eq!(server.event_names(), ["lonely"]);
        analytics.shutdown().await;
    }

    #[tokio::test]
    async fn retries_after_500s_with_the_same_event_ids() {
        let (server, host) = CaptureServer::start(&[500, 503, 429]).await;
        let analytics = Analytics::new(config(&host));
        analytics.emit(event("modal_lora_loaded"));
        analytics.shutdown().await;
        let bodies = server.bodies();
        assert_eq!(bodies.len(), 4, "three refusals, then delivered");
        assert!(
            bodies.windows(2).all(|pair| pair[0] == pair[1]),
            "retries resend the same batch (same uuids)"
        );
        assert_eq!(analytics.dropped(), 0);
    }

    #[tokio::test]
    async fn gives_up_after_max_attempts_and_counts_the_loss() {
        let (server, host) = CaptureServer::start(&[500; 10]).await;
        let analytics = Analytics::new(AnalyticsConfig {
            max_attempts: 3,
            ..config(&host)
        });
        analytics.emit(event("a"));
        analytics.emit(event("b"));
        analytics.shutdown().await;
        assert_eq!(server.bodies().len(), 3);
        assert_eq!(analytics.dropped(), 2);
    }

    #[tokio::test]
    async fn a_rejected_batch_is_not_retried() {
        let (server, host) = CaptureServer::start(&[401]).await;
        let analytics = Analytics::new(config(&host));
        analytics.emit(event("a"));
        analytics.shutdown().await;
        assert_eq!(server.bodies().len(), 1);
        assert_eq!(analytics.dropped(), 1);
    }

    #[tokio::test]
    async fn an_unreachable_posthog_costs_events_not_requests() {
        // A port nothing listens on: bind, learn the port, close.
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let analytics = Analytics::new(AnalyticsConfig {
            max_attempts: 2,
            ..config(&format!("http://{closed}"))
        });
        analytics.emit(event("a"));
        analytics.shutdown().await;
        assert_eq!(analytics.dropped(), 1);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn shutdown_flushes_what_is_buffered() {
        let (server, host) = CaptureServer::start(&[]).await;
        let analytics = Analytics::new(config(&host));
        let_worker_idle().await;
        for n in 1..=5 {
            analytics.emit(event(&format!("e{n}")));
        }
        analytics.shutdown().await;
        assert_eq!(server.event_names(), ["e1", "e2", "e3", "e4", "e5"]);
        analytics.emit(event("too-late"));
        assert_eq!(
            analytics.dropped(),
            1,
            "an event after shutdown is counted as dropped"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_full_buffer_drops_the_oldest_events() {
        let (server, host) = CaptureServer::start(&[]).await;
        let analytics = Analytics::new(AnalyticsConfig {
            buffer_capacity: 3,
            ..config(&host)
        });
        let metrics = flowhost::metrics::Metrics::new(analytics.clone());
        // No await between emits: the background task cannot run, the buffer overflows.
        for n in 1..=5 {
            analytics.emit(event(&format!("e{n}")));
        }
        assert_eq!(analytics.dropped(), 2);
        assert!(
            metrics
                .render()
                .contains("flowhost_analytics_dropped_events_total 2")
        );
        analytics.shutdown().await;
        assert_eq!(server.event_names(), ["e3", "e4", "e5"]);
    }

    #[tokio::test]
    async fn off_without_a_key() {
        let (server, host) = CaptureServer::start(&[]).await;
        let analytics = Analytics::new(AnalyticsConfig {
            api_key: None,
            ..config(&host)
        });
        assert!(!analytics.is_enabled());
        analytics.emit(event("a"));
        analytics.shutdown().await;
        assert!(server.bodies().is_empty());
        assert_eq!(analytics.dropped(), 0);
    }
}
