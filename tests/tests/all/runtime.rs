//! The plugin runtime and the HTTP surface, end to end: real wasm components
//! (built from `tests/fixture-plugins`), a real `flowhost serve` on loopback,
//! real HTTP. Limit tests come in pairs (`..._obeyed` / `..._violated`); attack
//! tests are named after the attack.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use flowhost_tests::{TestServer, build_component, eventually, problem, publish_atomically};
use serde_json::{Value, json};

fn fixture(package: &str) -> PathBuf {
    static ECHO: OnceLock<PathBuf> = OnceLock::new();
    static MISBEHAVE: OnceLock<PathBuf> = OnceLock::new();
    static WRONG_WORLD: OnceLock<PathBuf> = OnceLock::new();
    static WRONG_VERSION: OnceLock<PathBuf> = OnceLock::new();
    static V0_1: OnceLock<PathBuf> = OnceLock::new();
    static V0_2: OnceLock<PathBuf> = OnceLock::new();
    let cell = match package {
        "fixture-v0-1-plugin" => &V0_1,
        "fixture-v0-2-plugin" => &V0_2,
        "fixture-echo" => &ECHO,
        "fixture-misbehave" => &MISBEHAVE,
        "fixture-wrong-world" => &WRONG_WORLD,
        "fixture-wrong-version" => &WRONG_VERSION,
        other => panic!("unknown fixture {other}"),
    };
    cell.get_or_init(|| build_component(package, &[]).expect("fixture builds")).clone()
}

fn echo_v2() -> PathBuf {
    static V2: OnceLock<PathBuf> = OnceLock::new();
    V2.get_or_init(|| build_component("fixture-echo", &[("FIXTURE_VERSION", "2.0.0")]).expect("echo v2 builds")).clone()
}

async fn echo_version(server: &TestServer) -> Option<String> {
    let response = server.post_json("/echo?dry_run=true", &json!({"prompt": "x"})).await.ok()?;
    if !response.status().is_success() {
        return None;
    }
    let body: Value = response.json().await.ok()?;
    body["plugin"]["version"].as_str().map(str::to_string)
}

mod sandbox {
    use super::*;

    async fn misbehave_server() -> TestServer {
        TestServer::start(&[("misbehave.wasm", &fixture("fixture-misbehave"))], &["--plugin-timeout-ms", "300"]).await.unwrap()
    }

    async fn still_serves(server: &TestServer) {
        let ok = server.post_json("/misbehave?dry_run=true", &json!({"mode": "ok"})).await.unwrap();
        assert_eq!(ok.status(), 200, "the next request after a failure must succeed");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn infinite_loop_is_stopped_at_its_deadline_and_the_next_request_is_fine() {
        let server = misbehave_server().await;
        let started = std::time::Instant::now();
        let (status, body) = problem(server.post_json("/misbehave?dry_run=true", &json!({"mode": "loop"})).await.unwrap()).await.unwrap();
        let took = started.elapsed();
        assert_eq!(status, 500);
        assert_eq!(body["type"], "https://flowhost.dev/problems/plugin_failed");
        assert_eq!(body["failure"], "timeout");
        assert_eq!(body["plugin"], "misbehave");
        assert_eq!(body["version"], "0.1.0");
        assert!(body["detail"].as_str().unwrap().contains("300 ms"), "{body}");
        // Stopped, not abandoned: the call returned (a loose bound; speed is for benchmarks).
        assert!(took < Duration::from_secs(20), "loop was not stopped: {took:?}");
        still_serves(&server).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn memory_limit_obeyed() {
        let server = misbehave_server().await;
        let ok = server.post_json("/misbehave?dry_run=true", &json!({"mode": "memory-some", "megabytes": 8})).await.unwrap();
        assert_eq!(ok.status(), 200, "8 MiB is within the 64 MiB default");
    }

    /// 16 MiB = 256 wasm pages of 64 KiB.
    const LIMIT_PAGES: u64 = 256;

    async fn sixteen_mib_server() -> TestServer {
        TestServer::start(&[("misbehave.wasm", &fixture("fixture-misbehave"))], &["--plugin-memory-mb", "16"]).await.unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn memory_limit_obeyed_one_page_below_the_limit() {
        let server = sixteen_mib_server().await;
        let response = server.post_json("/misbehave?dry_run=true", &json!({"mode": "memory-pages", "pages": LIMIT_PAGES - 1})).await.unwrap();
        assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn memory_limit_violated_one_page_above_the_limit() {
        let server = sixteen_mib_server().await;
        let response = server.post_json("/misbehave?dry_run=true", &json!({"mode": "memory-pages", "pages": LIMIT_PAGES + 1})).await.unwrap();
        let (status, body) = problem(response).await.unwrap();
        assert_eq!(status, 500);
        assert_eq!(body["failure"], "memory_limit", "classified by the limiter's flag: {body}");
        assert!(body["detail"].as_str().unwrap().contains("16 MiB"), "{body}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn memory_limit_violated_by_a_memory_bomb() {
        let server = misbehave_server().await;
        let (status, body) = problem(server.post_json("/misbehave?dry_run=true", &json!({"mode": "memory-bomb"})).await.unwrap()).await.unwrap();
        assert_eq!(status, 500);
        assert_eq!(body["failure"], "memory_limit", "{body}");
        assert!(body["detail"].as_str().unwrap().contains("64 MiB"), "{body}");
        still_serves(&server).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn panic_becomes_plugin_failed_with_the_panic_message() {
        let server = misbehave_server().await;
        let (status, body) = problem(server.post_json("/misbehave?dry_run=true", &json!({"mode": "panic"})).await.unwrap()).await.unwrap();
        assert_eq!(status, 500);
        assert_eq!(body["failure"], "panic", "reported by the SDK's panic hook: {body}");
        assert!(body["detail"].as_str().unwrap().contains("the plugin panicked on purpose"), "{body}");
        still_serves(&server).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn garbage_job_is_a_plugin_failure() {
        let server = misbehave_server().await;
        let (status, body) = problem(server.post_json("/misbehave?dry_run=true", &json!({"mode": "garbage-json"})).await.unwrap()).await.unwrap();
        assert_eq!(status, 500);
        assert_eq!(body["failure"], "invalid_job");
        assert!(body["detail"].as_str().unwrap().contains("not valid JSON"), "{body}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn plugin_reading_host_files_finds_nothing() {
        let server = misbehave_server().await;
        let response = server.post_json("/misbehave?dry_run=true", &json!({"mode": "open-file"})).await.unwrap();
        let (status, body) = problem(response).await.unwrap();
        assert_eq!(status, 500);
        let detail = body["detail"].as_str().unwrap();
        assert!(!detail.contains("root:"), "host file content leaked: {detail}");
        assert!(detail.contains("open-file:"), "the plugin's own error should come through: {detail}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn plugin_reading_the_environment_sees_nothing() {
        // The test process has a PATH; the plugin must not see it (or anything).
        assert!(std::env::var_os("PATH").is_some());
        let server = misbehave_server().await;
        let (_, body) = problem(server.post_json("/misbehave?dry_run=true", &json!({"mode": "read-env"})).await.unwrap()).await.unwrap();
        assert!(body["detail"].as_str().unwrap().ends_with("env: []"), "{body}");
    }
}


mod contract {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn component_of_another_world_is_rejected_naming_the_expected_contract() {
        let server = TestServer::start(&[("calc.wasm", &fixture("fixture-wrong-world"))], &[]).await.unwrap();
        let status = server.plugin_status("calc.wasm").await.unwrap().expect("listed");
        assert_eq!(status["status"], "rejected");
        let reason = status["reason"].as_str().unwrap();
        assert!(reason.contains("not a flowhost plugin"), "{reason}");
        assert!(reason.contains("flowhost:plugin/endpoint@<version>") && reason.contains("0.1.0–0.3.x"), "{reason}");
        assert!(reason.contains("exports [add]"), "{reason}");
        assert_eq!(status["rejection"], "contract");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn plugin_built_for_an_incompatible_contract_version_is_rejected_naming_both() {
        let server = TestServer::start(&[("future.wasm", &fixture("fixture-wrong-version"))], &[]).await.unwrap();
        let status = server.plugin_status("future.wasm").await.unwrap().expect("listed");
        assert_eq!(status["status"], "rejected");
        let reason = status["reason"].as_str().unwrap();
        assert!(
            reason.starts_with("exports flowhost:plugin/endpoint@0.4.0; this host supports flowhost:plugin 0.1.0–0.3.x"),
            "names its version and the supported range: {reason}"
        );
        assert_eq!(status["rejection"], "contract");
        let response = server.post_json("/future?dry_run=true", &json!({})).await.unwrap();
        assert_eq!(response.status(), 404, "a rejected plugin serves nothing");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_v0_1_a_v0_2_and_a_v0_3_plugin_are_served_side_by_side() {
        let server = TestServer::start(
            &[("legacy.wasm", &fixture("fixture-v0-1-plugin")), ("legacy2.wasm", &fixture("fixture-v0-2-plugin")), ("echo.wasm", &fixture("fixture-echo"))],
            &[],
        )
        .await
        .unwrap();
        let legacy = server.plugin_status("legacy.wasm").await.unwrap().expect("listed");
        let legacy2 = server.plugin_status("legacy2.wasm").await.unwrap().expect("listed");
        let echo = server.plugin_status("echo.wasm").await.unwrap().expect("listed");
        assert_eq!((legacy["status"].as_str(), legacy["contract"].as_str()), (Some("loaded"), Some("0.1.0")), "{legacy}");
        assert_eq!((legacy2["status"].as_str(), legacy2["contract"].as_str()), (Some("loaded"), Some("0.2.0")), "{legacy2}");
        assert_eq!((echo["status"].as_str(), echo["contract"].as_str()), (Some("loaded"), Some("0.3.0")), "{echo}");
        // Both generate a real image through the (simulated) ComfyUI, once it is up.
        let ready = eventually(Duration::from_secs(20), || async {
            let health = server.get_json("/health").await.ok()?;
            (health["comfyui"]["status"] == "ready").then_some(())
        })
        .await;
        assert!(ready.is_some(), "the simulated ComfyUI never became ready");
        for route in ["/legacy", "/legacy2", "/echo"] {
            let response = server.post_json(route, &json!({"prompt": "side by side"})).await.unwrap();
            assert_eq!(response.status(), 200, "{route}");
            assert_eq!(response.headers()["content-type"], "image/jpeg", "{route}");
            assert_eq!(response.headers()["x-flowhost-simulated"], "true", "{route}");
            let bytes = response.bytes().await.unwrap();
            assert_eq!(&bytes[..3], &[0xFF, 0xD8, 0xFF], "{route} serves a JPEG");
        }
        // A 0.1 or 0.2 plugin's refusal is adapted into the same 400 as a 0.3 one's.
        for (route, version) in [("/legacy", "0.1"), ("/legacy2", "0.2")] {
            let (status, body) = problem(server.post_json(route, &json!({"prompt": "forbidden"})).await.unwrap()).await.unwrap();
            assert_eq!(status, 400);
            assert_eq!(body["errors"][0]["field"], "prompt", "{body}");
            assert_eq!(body["errors"][0]["message"], format!("forbidden by the {version} plugin"), "{body}");
        }
        // The dry run of a 0.1 job carries the (inferred) model set; 0.2 declares it.
        let legacy_job: Value = server.post_json("/legacy?dry_run=true", &json!({"prompt": "x"})).await.unwrap().json().await.unwrap();
        assert_eq!(legacy_job["models"]["source"], "inferred", "{legacy_job}");
        let echo_job: Value = server.post_json("/echo?dry_run=true", &json!({"prompt": "x"})).await.unwrap().json().await.unwrap();
        assert_eq!(echo_job["models"]["source"], "declared", "{echo_job}");
        let legacy2_job: Value = server.post_json("/legacy2?dry_run=true", &json!({"prompt": "x"})).await.unwrap().json().await.unwrap();
        assert_eq!(legacy2_job["models"]["source"], "declared", "{legacy2_job}");
        assert_eq!(legacy2_job["fetches"], json!([]), "a 0.2 job fetches nothing: {legacy2_job}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn second_plugin_with_the_same_name_is_rejected() {
        let other_route = build_component("fixture-echo", &[("FIXTURE_ROUTE", "/echo-again"), ("FIXTURE_NAME", "echo")]).unwrap();
        let server = TestServer::start(&[("a-echo.wasm", &fixture("fixture-echo")), ("b-echo.wasm", &other_route)], &[]).await.unwrap();
        let b = server.plugin_status("b-echo.wasm").await.unwrap().unwrap();
        assert_eq!(b["status"], "rejected", "{b}");
        assert_eq!(b["rejection"], "duplicate_name", "{b}");
        assert!(b["reason"].as_str().unwrap().starts_with("plugin name echo is already served by a-echo.wasm (echo@1.0.0)"), "{b}");
        let openapi = server.get_json("/openapi.json").await.unwrap();
        // The plugins' paths (the Comfy API v2 paths under /api/v2 have operationIds of their own).
        let ids: Vec<&str> =
            openapi["paths"].as_object().unwrap().iter().filter(|(path, _)| !path.starts_with("/api/")).filter_map(|(_, p)| p["post"]["operationId"].as_str()).collect();
        assert_eq!(ids, vec!["echo"], "one operationId per name");
        assert_eq!(server.post_json("/echo-again?dry_run=true", &json!({"prompt": "x"})).await.unwrap().status(), 404);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn route_conflict_rejects_the_second_file_and_keeps_the_first() {
        let echo = fixture("fixture-echo");
        let server = TestServer::start(&[("a-echo.wasm", &echo), ("b-echo.wasm", &echo)], &[]).await.unwrap();
        let a = server.plugin_status("a-echo.wasm").await.unwrap().unwrap();
        let b = server.plugin_status("b-echo.wasm").await.unwrap().unwrap();
        assert_eq!(a["status"], "loaded");
        assert_eq!(b["status"], "rejected");
        assert!(b["reason"].as_str().unwrap().contains("route /echo is already served by a-echo.wasm"), "{b}");
        assert_eq!(echo_version(&server).await.as_deref(), Some("1.0.0"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn newcomer_cannot_hijack_a_live_route_even_if_it_sorts_first() {
        let echo = fixture("fixture-echo");
        let server = TestServer::start(&[("b-echo.wasm", &echo)], &[]).await.unwrap();
        assert_eq!(server.plugin_status("b-echo.wasm").await.unwrap().unwrap()["status"], "loaded");
        publish_atomically(server.plugins.path(), "a-echo.wasm", &std::fs::read(&echo).unwrap()).unwrap();
        let a = eventually(Duration::from_secs(15), || async { server.plugin_status("a-echo.wasm").await.ok()? })
            .await
            .expect("the newcomer is listed");
        assert_eq!(a["status"], "rejected", "{a}");
        assert!(a["reason"].as_str().unwrap().contains("already served by b-echo.wasm"), "{a}");
        assert_eq!(server.plugin_status("b-echo.wasm").await.unwrap().unwrap()["status"], "loaded");
    }
}

mod hot_reload {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn new_file_is_served_without_restart_and_removed_file_route_is_gone() {
        let server = TestServer::start(&[], &[]).await.unwrap();
        assert_eq!(server.post_json("/echo?dry_run=true", &json!({"prompt": "x"})).await.unwrap().status(), 404);
        let bytes = std::fs::read(fixture("fixture-echo")).unwrap();
        publish_atomically(server.plugins.path(), "echo.wasm", &bytes).unwrap();
        let seen = eventually(Duration::from_secs(15), || async { echo_version(&server).await }).await;
        assert_eq!(seen.as_deref(), Some("1.0.0"), "a dropped-in plugin must be served");

        std::fs::remove_file(server.plugins.path().join("echo.wasm")).unwrap();
        let gone = eventually(Duration::from_secs(15), || async {
            let r = server.post_json("/echo?dry_run=true", &json!({"prompt": "x"})).await.ok()?;
            (r.status() == 404).then_some(())
        })
        .await;
        assert!(gone.is_some(), "route must disappear with its file");
        assert!(server.plugin_status("echo.wasm").await.unwrap().is_none());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn corrupt_replacement_is_rejected_and_the_old_version_keeps_serving() {
        let echo = fixture("fixture-echo");
        let server = TestServer::start(&[("echo.wasm", &echo)], &[]).await.unwrap();
        let bytes = std::fs::read(&echo).unwrap();
        // A half-written file: the first third of a valid component.
        std::fs::write(server.plugins.path().join("echo.wasm"), &bytes[..bytes.len() / 3]).unwrap();
        let rejected = eventually(Duration::from_secs(15), || async {
            let s = server.plugin_status("echo.wasm").await.ok()??;
            (s["status"] == "rejected").then_some(s)
        })
        .await
        .expect("the corrupt file is reported");
        assert_eq!(rejected["still_serving"], "1.0.0", "{rejected}");
        assert_eq!(rejected["rejection"], "compile", "a truncated component fails to compile: {rejected}");
        assert!(rejected["reason"].as_str().unwrap().starts_with("compiling the component: "), "{rejected}");
        for _ in 0..5 {
            assert_eq!(echo_version(&server).await.as_deref(), Some("1.0.0"));
        }
        // Writing the rest of the file heals it.
        std::fs::write(server.plugins.path().join("echo.wasm"), &bytes).unwrap();
        let healed = eventually(Duration::from_secs(15), || async {
            let s = server.plugin_status("echo.wasm").await.ok()??;
            (s["status"] == "loaded").then_some(())
        })
        .await;
        assert!(healed.is_some());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replace_while_serving_twenty_swaps_zero_failures() {
        let v1 = std::fs::read(fixture("fixture-echo")).unwrap();
        let v2 = std::fs::read(echo_v2()).unwrap();
        let server = std::sync::Arc::new(TestServer::start(&[], &[]).await.unwrap());
        publish_atomically(server.plugins.path(), "echo.wasm", &v1).unwrap();
        assert!(eventually(Duration::from_secs(15), || async { echo_version(&server).await }).await.is_some());

        // A steady stream of requests while the file is swapped 20 times.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let load = {
            let (server, stop) = (server.clone(), stop.clone());
            tokio::spawn(async move {
                let (mut ok, mut failed) = (0u32, Vec::new());
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let r = server.post_json("/echo?dry_run=true", &json!({"prompt": "during swap"})).await;
                    match r {
                        Ok(r) if r.status() == 200 => ok += 1,
                        Ok(r) => failed.push(format!("status {}", r.status())),
                        Err(e) => failed.push(e.to_string()),
                    }
                }
                (ok, failed)
            })
        };
        for i in 0..20 {
            let (bytes, want) = if i % 2 == 0 { (&v2, "2.0.0") } else { (&v1, "1.0.0") };
            publish_atomically(server.plugins.path(), "echo.wasm", bytes).unwrap();
            let seen = eventually(Duration::from_secs(15), || async {
                (echo_version(&server).await.as_deref() == Some(want)).then_some(())
            })
            .await;
            assert!(seen.is_some(), "swap {i}: version {want} never became visible");
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (ok, failed) = load.await.unwrap();
        assert!(failed.is_empty(), "requests failed during swaps: {failed:?}");
        assert!(ok > 20, "the load loop must actually have run ({ok} requests)");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn restart_with_warm_compiled_cache_skips_compilation() {
        let echo = fixture("fixture-echo");
        let plugins = tempfile::tempdir().unwrap();
        std::fs::copy(&echo, plugins.path().join("echo.wasm")).unwrap();
        let cache = tempfile::tempdir().unwrap();
        let cache_path = cache.path().to_path_buf();
        let first = TestServer::start_in(plugins, cache, &[]).await.unwrap();
        let entries = std::fs::read_dir(&cache_path).unwrap().count();
        assert_eq!(entries, 1, "one compiled entry written");
        let TestServer { server, plugins, cache, .. } = first;
        server.shutdown().await.unwrap();
        let second = TestServer::start_in(plugins, cache, &[]).await.unwrap();
        let snapshot = second.server.state.registry.snapshot();
        let plugin = snapshot.get("/echo").expect("served after restart");
        assert_eq!(plugin.cache, flowhost::plugins::compiled_cache::CacheOutcome::Hit);
        // A corrupt cache entry is a miss, never a failure.
        for entry in std::fs::read_dir(&cache_path).unwrap() {
            std::fs::write(entry.unwrap().path(), b"garbage").unwrap();
        }
        let TestServer { server, plugins, cache, .. } = second;
        server.shutdown().await.unwrap();
        let third = TestServer::start_in(plugins, cache, &[]).await.unwrap();
        assert_eq!(third.server.state.registry.snapshot().get("/echo").unwrap().cache, flowhost::plugins::compiled_cache::CacheOutcome::Miss);
        assert_eq!(echo_version(&third).await.as_deref(), Some("1.0.0"));
    }
}

mod http_surface {
    use super::*;

    async fn echo_server() -> TestServer {
        TestServer::start(&[("echo.wasm", &fixture("fixture-echo"))], &["--max-body-bytes", "4096"]).await.unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dry_run_returns_the_built_workflow_and_the_seed() {
        let server = echo_server().await;
        let response = server.post_json("/echo?dry_run=true", &json!({"prompt": "a cat", "width": 128, "seed": 7})).await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-seed"], "7");
        assert!(response.headers().contains_key("x-request-id"));
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["workflow"]["1"]["inputs"]["width"], 128);
        assert_eq!(body["outputs"], json!(["2"]));
        assert_eq!(body["seed"], 7);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn absent_seed_is_random_and_reported() {
        let server = echo_server().await;
        let mut seeds = std::collections::HashSet::new();
        for _ in 0..3 {
            let body: Value = server.post_json("/echo?dry_run=true", &json!({"prompt": "a"})).await.unwrap().json().await.unwrap();
            seeds.insert(body["seed"].as_u64().expect("seed reported"));
        }
        assert!(seeds.len() > 1, "seeds must be random, got {seeds:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn schema_errors_name_every_field_and_suggest_unknown_ones() {
        let server = echo_server().await;
        let (status, body) = problem(server.post_json("/echo", &json!({"width": 1, "heigth": 64})).await.unwrap()).await.unwrap();
        assert_eq!(status, 400);
        assert_eq!(body["type"], "https://flowhost.dev/problems/invalid_request");
        let errors = body["errors"].as_array().unwrap();
        let field = |f: &str| errors.iter().find(|e| e["field"] == f).map(|e| e["message"].as_str().unwrap().to_string());
        assert_eq!(field("prompt").as_deref(), Some("is required"));
        assert_eq!(field("width").as_deref(), Some("1 is less than the minimum of 8"), "{errors:?}");
        assert!(field("heigth").unwrap().contains("did you mean `height`"), "{errors:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn plugin_refusal_names_its_field() {
        let server = echo_server().await;
        let (status, body) = problem(server.post_json("/echo?dry_run=true", &json!({"prompt": "forbidden"})).await.unwrap()).await.unwrap();
        assert_eq!(status, 400);
        assert_eq!(body["errors"][0]["field"], "prompt");
        assert_eq!(body["plugin"], "echo");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn malformed_json_is_a_400_with_position() {
        let server = echo_server().await;
        let response = server.client.post(server.url("/echo")).header("content-type", "application/json").body("{\"prompt\": ").send().await.unwrap();
        let (status, body) = problem(response).await.unwrap();
        assert_eq!(status, 400);
        assert_eq!(body["type"], "https://flowhost.dev/problems/invalid_json");
        assert!(body["detail"].as_str().unwrap().contains("line 1"), "{body}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn body_limit_obeyed() {
        let server = echo_server().await;
        let prompt = "a".repeat(3000);
        let response = server.post_json("/echo?dry_run=true", &json!({"prompt": prompt})).await.unwrap();
        assert_eq!(response.status(), 200);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn body_limit_violated_by_a_huge_body() {
        let server = echo_server().await;
        let prompt = "a".repeat(10_000);
        let (status, body) = problem(server.post_json("/echo?dry_run=true", &json!({"prompt": prompt})).await.unwrap()).await.unwrap();
        assert_eq!(status, 413);
        assert!(body["detail"].as_str().unwrap().contains("4096"), "{body}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn path_traversal_in_the_route_finds_nothing() {
        let server = echo_server().await;
        for path in ["/../echo", "/echo/../health", "/%2e%2e/echo", "/echo%2F..", "/ECHO", "/echo/x"] {
            let status = flowhost_tests::raw_request_status(
                server.server.addr,
                &format!("POST {path}?dry_run=true HTTP/1.1\r\ncontent-type: application/json"),
                r#"{"prompt":"x"}"#,
            )
            .await
            .unwrap();
            assert!(matches!(status, 404 | 400), "{path}: {status}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn wrong_content_type_is_a_415() {
        let server = echo_server().await;
        let response = server.client.post(server.url("/echo")).header("content-type", "text/plain").body("prompt=x").send().await.unwrap();
        let (status, _) = problem(response).await.unwrap();
        assert_eq!(status, 415);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn openapi_and_plugin_list_describe_the_loaded_plugins() {
        let server = echo_server().await;
        let doc = server.get_json("/openapi.json").await.unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
        let op = &doc["paths"]["/echo"]["post"];
        assert_eq!(op["requestBody"]["content"]["application/json"]["schema"]["required"], json!(["prompt"]));
        let list = server.get_json("/plugins").await.unwrap();
        let echo = &list["plugins"][0];
        assert_eq!(echo["name"], "echo");
        assert_eq!(echo["status"], "loaded");
        assert_eq!(echo["sha256"].as_str().unwrap().len(), 64);
        assert!(echo["loaded_at"].as_str().unwrap().ends_with('Z'));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn http_metrics_label_plugin_routes_by_their_route_and_others_as_other() {
        let server = echo_server().await;
        assert_eq!(server.post_json("/echo?dry_run=true", &json!({"prompt": "x"})).await.unwrap().status(), 200);
        assert_eq!(server.post_json("/no-such-plugin", &json!({"prompt": "x"})).await.unwrap().status(), 404);
        let text = server.client.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
        let http: Vec<&str> = text.lines().filter(|l| l.starts_with("flowhost_http_requests_total{")).collect();
        assert!(http.iter().any(|l| l.contains("route=\"/echo\"") && l.contains("status=\"200\"")), "{http:?}");
        assert!(http.iter().any(|l| l.contains("route=\"other\"") && l.contains("status=\"404\"")), "{http:?}");
        assert!(!text.contains("route=\"/{route}\""), "no catch-all series: {http:?}");
        assert!(!text.contains("no-such-plugin"), "unknown paths never become labels: {http:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unknown_route_is_a_problem_404() {
        let server = echo_server().await;
        let (status, body) = problem(server.post_json("/nope", &json!({})).await.unwrap()).await.unwrap();
        assert_eq!(status, 404);
        assert!(body["detail"].as_str().unwrap().contains("/nope"));
    }
}

mod check_plugin_cli {
    use super::*;
    use std::process::Command;

    fn flowhost_bin() -> PathBuf {
        flowhost_tests::flowhost_binary()
    }

    fn run(args: &[&str]) -> (i32, Value) {
        let out = Command::new(flowhost_bin()).args(args).output().expect("flowhost binary runs (cargo build -p flowhost)");
        let text = String::from_utf8_lossy(&out.stdout);
        // stdout holds one or two pretty JSON documents; take the last.
        let last = text.rfind("\n{").map(|i| &text[i + 1..]).unwrap_or(&text);
        (out.status.code().unwrap_or(-1), serde_json::from_str(last).unwrap_or(Value::Null))
    }

    #[test]
    fn prints_the_built_job_and_exits_zero() {
        let echo = fixture("fixture-echo");
        let (code, doc) = run(&["check-plugin", echo.to_str().unwrap(), "--request", r#"{"prompt":"hi","seed":3}"#]);
        assert_eq!(code, 0, "{doc}");
        assert_eq!(doc["stage"], "build");
        assert_eq!(doc["job"]["seed"], 3);
    }

    #[test]
    fn schema_errors_exit_non_zero() {
        let echo = fixture("fixture-echo");
        let (code, doc) = run(&["check-plugin", echo.to_str().unwrap(), "--request", r#"{"promt":"hi"}"#]);
        assert_eq!(code, 1);
        assert_eq!(doc["stage"], "schema");
        assert!(doc["errors"].to_string().contains("did you mean `prompt`"), "{doc}");
    }

    #[test]
    fn wrong_world_fails_to_load() {
        let (code, doc) = run(&["check-plugin", fixture("fixture-wrong-world").to_str().unwrap()]);
        assert_eq!(code, 1);
        assert_eq!(doc["stage"], "load");
    }
}

mod served_binary {
    //! The real `flowhost` binary, configured through its environment.
    use super::*;
    use flowhost_tests::{KillOnDrop as Child, free_port};
    use std::process::{Command, Stdio};


    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn api_keys_guard_generation_and_admin_routes() {
        let plugins = tempfile::tempdir().unwrap();
        std::fs::copy(fixture("fixture-echo"), plugins.path().join("echo.wasm")).unwrap();
        let cache = tempfile::tempdir().unwrap();
        let port = free_port();
        let _child = Child(
            Command::new(flowhost_tests::flowhost_binary())
                .args(["serve", "--simulate", "--listen", &format!("127.0.0.1:{port}"), "--plugins"])
                .arg(plugins.path())
                .arg("--cache-dir")
                .arg(cache.path())
                // Its own state dir: the default one is locked by whichever flowhost holds it.
                .arg("--state-dir")
                .arg(cache.path().join("state"))
                .env("FLOWHOST_API_KEYS", "app:user-secret-1")
                .env("FLOWHOST_ADMIN_KEYS", "ops:admin-secret-2")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let base = format!("http://127.0.0.1:{port}");
        let client = reqwest::Client::new();
        let up = eventually(Duration::from_secs(60), || async { client.get(format!("{base}/health")).send().await.ok().map(|_| ()) }).await;
        assert!(up.is_some(), "the binary did not come up");

        let post = |key: Option<&'static str>, path: &'static str| {
            let mut req = client.post(format!("{base}{path}")).json(&json!({"prompt": "x"}));
            if let Some(key) = key {
                req = req.bearer_auth(key);
            }
            req.send()
        };
        assert_eq!(post(None, "/echo?dry_run=true").await.unwrap().status(), 401, "missing key");
        assert_eq!(post(Some("wrong"), "/echo?dry_run=true").await.unwrap().status(), 401, "wrong key");
        assert_eq!(post(Some("user-secret-1"), "/echo?dry_run=true").await.unwrap().status(), 200, "user key");
        assert_eq!(post(Some("admin-secret-2"), "/echo?dry_run=true").await.unwrap().status(), 200, "admin key works everywhere");
        let key_in_query = client.post(format!("{base}/echo?dry_run=true&api_key=user-secret-1&access_token=user-secret-1")).json(&json!({"prompt": "x"})).send().await.unwrap();
        assert_eq!(key_in_query.status(), 401, "a key in the query string is ignored");
        let plugins_as_user = client.get(format!("{base}/plugins")).bearer_auth("user-secret-1").send().await.unwrap();
        assert_eq!(plugins_as_user.status(), 403);
        let metrics_as_admin = client.get(format!("{base}/metrics")).bearer_auth("admin-secret-2").send().await.unwrap();
        assert_eq!(metrics_as_admin.status(), 200);
        assert!(metrics_as_admin.text().await.unwrap().contains("flowhost_http_requests_total"));
        assert_eq!(client.get(format!("{base}/health")).send().await.unwrap().status().as_u16() / 100 != 4, true, "/health stays open");
        let unauthorized = post(None, "/echo").await.unwrap();
        assert_eq!(unauthorized.headers().get("content-type").unwrap(), "application/problem+json");
    }

    #[test]
    fn serve_without_a_backend_refuses_naming_the_three_choices() {
        let plugins = tempfile::tempdir().unwrap();
        let out = Command::new(flowhost_tests::flowhost_binary())
            .args(["serve", "--listen", "127.0.0.1:0", "--plugins"])
            .arg(plugins.path())
            .env_remove("FLOWHOST_COMFYUI_URL")
            .env_remove("FLOWHOST_COMFYUI_DIR")
            .env_remove("FLOWHOST_SIMULATE")
            .output()
            .unwrap();
        assert!(!out.status.success(), "simulation is never the silent default");
        let stderr = String::from_utf8_lossy(&out.stderr);
        for choice in ["--comfyui-url", "--comfyui-dir", "--simulate"] {
            assert!(stderr.contains(choice), "the refusal names {choice}: {stderr}");
        }
    }

    #[test]
    fn refuses_a_public_address_without_keys() {
        let out = Command::new(flowhost_tests::flowhost_binary())
            .args(["serve", "--listen", "0.0.0.0:0", "--plugins", "/nonexistent-flowhost-test"])
            .env_remove("FLOWHOST_API_KEYS")
            .env_remove("FLOWHOST_ADMIN_KEYS")
            .output()
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("--insecure-no-auth"), "the refusal says how to override: {stderr}");
    }
}

mod author_path {
    //! Plugin authors build with `cargo component build`; the result must load.
    use super::*;
    use std::process::Command;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cargo_component_built_plugin_loads_and_builds_its_graph() {
        let available = Command::new("cargo").args(["component", "--version"]).output().map(|o| o.status.success()).unwrap_or(false);
        assert!(available, "cargo-component is not installed (cargo install cargo-component@0.21.1 --locked; .ci/run installs it): the cargo-component author path cannot be tested");
        let target = flowhost_tests::target_dir().join("cargo-component");
        let status = Command::new("cargo")
            .current_dir(flowhost_tests::workspace_root().join("plugins/flux-dev"))
            .args(["component", "build", "--release", "--quiet"])
            .env("CARGO_TARGET_DIR", &target)
            .status()
            .expect("cargo component runs");
        assert!(status.success(), "cargo component build failed");
        let wasm = target.join("wasm32-wasip1/release/flux_dev.wasm");
        assert!(wasm.exists(), "no component at {}", wasm.display());
        let comfy = flowhost_tests::ExternalComfy::start().await.unwrap();
        let args = comfy.args();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let server = TestServer::start(&[("flux-dev.wasm", &wasm)], &args).await.unwrap();
        let status = server.plugin_status("flux-dev.wasm").await.unwrap().expect("listed");
        assert_eq!(status["status"], "loaded", "{status}");
        let response = server.post_json("/flux-dev?dry_run=true", &json!({"prompt": "a cat", "seed": 1})).await.unwrap();
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        let classes: Vec<&str> = body["workflow"].as_object().unwrap().values().filter_map(|n| n["class_type"].as_str()).collect();
        assert!(classes.contains(&"UNETLoader") && classes.contains(&"KSampler"), "{classes:?}");
    }
}

mod check_plugin_models {
    use super::*;
    use std::process::Command;

    fn check(flux: &std::path::Path, models: Option<&std::path::Path>) -> (Option<i32>, Value) {
        let mut cmd = Command::new(flowhost_tests::flowhost_binary());
        cmd.args(["check-plugin", flux.to_str().unwrap(), "--request", r#"{"prompt":"a cat"}"#]);
        if let Some(models) = models {
            cmd.arg("--models").arg(models);
        }
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let last = text.rfind("\n{").map(|i| &text[i + 1..]).unwrap_or(&text);
        (out.status.code(), serde_json::from_str(last).unwrap_or(Value::Null))
    }

    #[test]
    fn check_plugin_takes_the_declared_models_as_present_and_says_so() {
        let flux = flowhost_tests::build_component("flux-dev", &[]).unwrap();
        let (code, doc) = check(&flux, None);
        assert_eq!(code, Some(0), "the guide's example builds: {doc}");
        assert_eq!(doc["stage"], "build");
        assert_eq!(doc["models"]["source"], "declared", "{doc}");
        assert!(doc["models"]["note"].as_str().unwrap().contains("--models DIR"), "{doc}");
        assert_eq!(doc["job"]["models"]["base"], json!({"folder": "diffusion_models", "name": "flux1-dev.safetensors"}), "{doc}");
        assert_eq!(flowhost_tests::nodes_of_class(&doc["job"]["workflow"], "KSampler"), 1, "{doc}");
    }

    #[test]
    fn check_plugin_lists_models_from_the_given_volume() {
        let flux = flowhost_tests::build_component("flux-dev", &[]).unwrap();
        let empty = tempfile::tempdir().unwrap();
        let (code, doc) = check(&flux, Some(empty.path()));
        assert_eq!(code, Some(1), "no models on the volume: {doc}");
        assert_eq!(doc["stage"], "build");
        assert_eq!(doc["models"]["source"], "volume");
        assert_eq!(doc["problem"]["status"], 503, "{doc}");
        assert_eq!(doc["problem"]["type"], "https://flowhost.dev/problems/unavailable", "{doc}");
        assert!(doc["problem"]["detail"].as_str().unwrap().contains("flux1-dev"), "names the missing model: {doc}");
        let models = tempfile::tempdir().unwrap();
        for (folder, name) in [("diffusion_models", "flux1-dev.safetensors"), ("text_encoders", "clip_l.safetensors"), ("text_encoders", "t5xxl_fp16.safetensors"), ("vae", "ae.safetensors")] {
            std::fs::create_dir_all(models.path().join(folder)).unwrap();
            std::fs::write(models.path().join(folder).join(name), b"weights").unwrap();
        }
        let (code, doc) = check(&flux, Some(models.path()));
        assert_eq!(code, Some(0), "{doc}");
        assert_eq!(doc["job"]["models"]["others"].as_array().map(Vec::len), Some(3), "{doc}");
    }
}

mod models_status_cli {
    use super::*;
    use std::process::Command;

    #[test]
    fn names_present_and_missing_files_per_plugin() {
        let plugins = tempfile::tempdir().unwrap();
        std::fs::copy(flowhost_tests::build_component("flux-dev", &[]).unwrap(), plugins.path().join("flux-dev.wasm")).unwrap();
        let models = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(models.path().join("vae")).unwrap();
        std::fs::write(models.path().join("vae/ae.safetensors"), b"weights").unwrap();
        std::fs::create_dir_all(models.path().join("text_encoders")).unwrap();
        // A zero-byte file counts as missing.
        std::fs::write(models.path().join("text_encoders/clip_l.safetensors"), b"").unwrap();
        let out = Command::new(flowhost_tests::flowhost_binary())
            .args(["models", "status", "--json", "--plugins"])
            .arg(plugins.path())
            .arg("--models")
            .arg(models.path())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "something is missing");
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report["ready"], false);
        let requirements = report["plugins"][0]["requirements"].as_array().unwrap();
        let by_purpose = |needle: &str| requirements.iter().find(|r| r["purpose"].as_str().unwrap().contains(needle)).unwrap_or_else(|| panic!("{needle}: {report}"));
        let vae = by_purpose("VAE");
        assert_eq!((vae["status"].as_str(), vae["name"].as_str()), (Some("present"), Some("ae.safetensors")), "{report}");
        // The zero-byte clip_l is as good as absent: the requirement is missing and says what it looked for.
        let clip = requirements.iter().find(|r| r["looked_for"].to_string().contains("clip_l.safetensors")).expect("a clip_l requirement");
        assert_eq!(clip["status"], "missing", "a zero-byte file counts as missing: {report}");
    }
}
