//! Hostile inputs end to end (issue 10): a real `flowhost serve --simulate` on loopback, real
//! plugins (the bundled `/workflow`, the `echo`, `misbehave` and `hostile` fixtures), raw sockets
//! where a well-behaved client would not do what an attacker does. Tests are named after the
//! attack; limit tests come in `_obeyed` / `_violated` pairs.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use flowhost_tests::{TestServer, build_component, eventually, problem, publish_atomically};
use serde_json::{Map, Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Hang protection for waits that must end on their own (never a speed assertion).
const FAILSAFE: Duration = Duration::from_secs(30);

fn fixture(package: &str) -> PathBuf {
    static ECHO: OnceLock<PathBuf> = OnceLock::new();
    static MISBEHAVE: OnceLock<PathBuf> = OnceLock::new();
    static HOSTILE: OnceLock<PathBuf> = OnceLock::new();
    static WORKFLOW: OnceLock<PathBuf> = OnceLock::new();
    let cell = match package {
        "fixture-echo" => &ECHO,
        "fixture-misbehave" => &MISBEHAVE,
        "fixture-hostile" => &HOSTILE,
        "workflow" => &WORKFLOW,
        other => panic!("unknown fixture {other}"),
    };
    cell.get_or_init(|| build_component(package, &[]).expect("fixture builds")).clone()
}

async fn server(plugins: &[(&str, &str)], extra: &[&str]) -> TestServer {
    let built: Vec<(String, PathBuf)> = plugins.iter().map(|(file, package)| (file.to_string(), fixture(package))).collect();
    let refs: Vec<(&str, &std::path::Path)> = built.iter().map(|(n, p)| (n.as_str(), p.as_path())).collect();
    let mut args = vec!["--simulate"];
    args.extend_from_slice(extra);
    let server = TestServer::start(&refs, &args).await.unwrap();
    let ready = eventually(FAILSAFE, || async {
        let h = server.get_json("/health").await.ok()?;
        (h["comfyui"]["status"] == "ready").then_some(())
    })
    .await;
    assert!(ready.is_some(), "ComfyUI never became ready");
    server
}

/// Raw HTTP/1.1 over a fresh connection: send `head` (and `body`), read until the server closes
/// or `FAILSAFE` passes; the response text.
async fn raw(server: &TestServer, head: &str, body: &[u8]) -> String {
    let mut stream = tokio::net::TcpStream::connect(server.server.addr).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let mut response = Vec::new();
    let _ = tokio::time::timeout(FAILSAFE, stream.read_to_end(&mut response)).await;
    String::from_utf8_lossy(&response).to_string()
}

fn status_of(response: &str) -> u16 {
    response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

fn header_of<'r>(response: &'r str, name: &str) -> Option<&'r str> {
    response
        .split("\r\n\r\n")
        .next()?
        .lines()
        .find_map(|l| l.split_once(':').filter(|(k, _)| k.trim().eq_ignore_ascii_case(name)).map(|(_, v)| v.trim()))
}

fn body_of(response: &str) -> Value {
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
    serde_json::from_str(body).unwrap_or(Value::Null)
}

/// EmptyImage → `n - 1` ImageInvert → SaveImage, as a `/workflow` body.
fn chain_workflow(n: usize) -> Value {
    let mut g = Map::new();
    g.insert("0".into(), json!({"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}}));
    for i in 1..n {
        g.insert(i.to_string(), json!({"class_type": "ImageInvert", "inputs": {"image": [(i - 1).to_string(), 0]}}));
    }
    g.insert("save".into(), json!({"class_type": "SaveImage", "inputs": {"images": [(n - 1).to_string(), 0], "filename_prefix": "chain"}}));
    json!({"workflow": Value::Object(g)})
}

mod graphs {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn thousand_node_chain_is_a_400_and_the_process_survives() {
        let server = server(&[("workflow.wasm", "workflow")], &[]).await;
        let (status, body) = problem(server.post_json("/workflow", &chain_workflow(1_000)).await.unwrap()).await.unwrap();
        assert_eq!(status, 400, "{body}");
        assert!(body["detail"].as_str().unwrap().contains("at most 500"), "{body}");
        assert_eq!(body["nodes"][0]["kind"], "graph_too_deep", "{body}");
        // Still serving: a short chain runs.
        let ok = server.post_json("/workflow", &chain_workflow(5)).await.unwrap();
        assert_eq!(ok.status(), 200);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cyclic_workflow_is_a_400_naming_the_nodes_of_the_cycle() {
        let server = server(&[("workflow.wasm", "workflow")], &[]).await;
        let workflow = json!({
            "1": {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}},
            "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}}
        });
        let (status, body) = problem(server.post_json("/workflow", &json!({"workflow": workflow})).await.unwrap()).await.unwrap();
        assert_eq!(status, 400, "{body}");
        let detail = body["detail"].as_str().unwrap();
        assert!(detail.contains("cycle") && (detail.contains("2 → 1 → 2") || detail.contains("1 → 2 → 1")), "{body}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn filename_prefix_traversal_is_a_400_naming_the_node() {
        let server = server(&[("workflow.wasm", "workflow")], &[]).await;
        let mut body = chain_workflow(2);
        body["workflow"]["save"]["inputs"]["filename_prefix"] = json!("../../../../tmp/owned");
        let (status, problem) = problem(server.post_json("/workflow", &body).await.unwrap()).await.unwrap();
        assert_eq!(status, 400, "{problem}");
        assert_eq!(problem["errors"][0]["field"], "workflow/save/inputs/filename_prefix", "{problem}");
        body["workflow"]["save"]["inputs"]["filename_prefix"] = json!("p".repeat(1 << 20));
        let (status, _) = flowhost_tests::problem(server.post_json("/workflow", &body).await.unwrap()).await.unwrap();
        assert_eq!(status, 400);
    }
}

mod amplification {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn million_unknown_keys_get_a_short_400() {
        let server = server(&[("echo.wasm", "fixture-echo")], &[]).await;
        let mut body = String::from("{\"prompt\": \"x\"");
        for i in 0..1_000_000 {
            body.push_str(&format!(",\"k{i}\":0"));
        }
        body.push('}');
        let response = server.client.post(server.url("/echo?dry_run=true")).header("content-type", "application/json").body(body).send().await.unwrap();
        let (status, problem) = problem(response).await.unwrap();
        assert_eq!(status, 400);
        assert_eq!(problem["type"], "https://flowhost.dev/problems/body_too_complex", "{problem}");
        assert!(problem.to_string().len() < 4096, "{} bytes", problem.to_string().len());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_unknown_keys_list_fifty_and_count_the_rest() {
        let server = server(&[("echo.wasm", "fixture-echo")], &[]).await;
        let mut body = Map::new();
        body.insert("prompt".into(), json!("x"));
        for i in 0..5_000 {
            body.insert(format!("unknown_{i}"), json!(0));
        }
        let (status, problem) = problem(server.post_json("/echo?dry_run=true", &Value::Object(body)).await.unwrap()).await.unwrap();
        assert_eq!(status, 400);
        assert_eq!(problem["errors"].as_array().unwrap().len(), 50);
        assert_eq!(problem["errors_omitted"], 4_950);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ten_megabyte_prompt_is_not_echoed_back() {
        let server = server(&[("echo.wasm", "fixture-echo")], &[]).await;
        // A 10 MB string where a number belongs: the error names it without repeating it.
        let (status, problem) = problem(server.post_json("/echo?dry_run=true", &json!({"prompt": "x", "width": "a".repeat(10 << 20)})).await.unwrap()).await.unwrap();
        assert_eq!(status, 400);
        assert!(problem.to_string().len() < 4096, "{} bytes", problem.to_string().len());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn plugin_error_text_of_ten_megabytes_is_cut() {
        let server = server(&[("hostile.wasm", "fixture-hostile")], &[]).await;
        let (status, problem) = problem(server.post_json("/hostile?dry_run=true", &json!({"mode": "huge-error", "n": 10 << 20})).await.unwrap()).await.unwrap();
        assert_eq!(status, 400);
        assert!(problem.to_string().len() < 8192, "{} bytes", problem.to_string().len());
    }
}

mod plugin_bounds {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn slow_plugin_flood_gets_503s_while_other_plugins_still_answer() {
        let server = server(
            &[("hostile.wasm", "fixture-hostile"), ("echo.wasm", "fixture-echo")],
            &["--plugin-concurrency", "2", "--plugin-concurrency-total", "3", "--plugin-timeout-ms", "3000"],
        )
        .await;
        let slow: Vec<_> = (0..6)
            .map(|_| {
                let (client, url) = (server.client.clone(), server.url("/hostile?dry_run=true"));
                tokio::spawn(async move { client.post(url).json(&json!({"mode": "slow"})).send().await.unwrap() })
            })
            .collect();
        // While the slow calls hold their slots, the other plugin still has one.
        let mut echo_ok = false;
        for _ in 0..20 {
            let r = server.post_json("/echo?dry_run=true", &json!({"prompt": "x"})).await.unwrap();
            assert_ne!(r.status(), 500, "{}", r.text().await.unwrap());
            echo_ok |= r.status() == 200;
        }
        assert!(echo_ok, "the echo plugin never answered while the slow one was flooded");
        let mut busy = 0;
        for handle in slow {
            let r = handle.await.unwrap();
            if r.status() == 503 {
                assert_eq!(r.headers().get("retry-after").and_then(|v| v.to_str().ok()), Some("1"));
                let (_, p) = problem(r).await.unwrap();
                assert_eq!(p["type"], "https://flowhost.dev/problems/plugin_busy", "{p}");
                busy += 1;
            }
        }
        assert!(busy >= 4, "only {busy} of 6 slow calls were refused with 2 slots");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn plugin_asking_for_100k_uploads_is_refused_even_in_a_dry_run() {
        let server = server(&[("hostile.wasm", "fixture-hostile")], &[]).await;
        for path in ["/hostile?dry_run=true", "/hostile"] {
            let (status, p) = problem(server.post_json(path, &json!({"mode": "uploads", "n": 100_000})).await.unwrap()).await.unwrap();
            assert_eq!(status, 500, "{p}");
            assert_eq!(p["failure"], "invalid_job", "{p}");
            assert!(p["detail"].as_str().unwrap().contains("at most 16"), "{p}");
        }
    }

    /// Asserts `r` is a 503 `plugin_busy` naming the hostile plugin, with Retry-After.
    async fn assert_busy(r: reqwest::Response) {
        assert_eq!(r.headers().get("retry-after").and_then(|v| v.to_str().ok()), Some("1"));
        let (status, p) = problem(r).await.unwrap();
        assert_eq!(status, 503, "{p}");
        assert_eq!(p["type"], "https://flowhost.dev/problems/plugin_busy", "{p}");
        assert_eq!(p["plugin"], "hostile", "{p}");
        assert!(p["detail"].as_str().unwrap().contains("memory budget"), "{p}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn plugin_memory_budget_obeyed() {
        let server = server(&[("hostile.wasm", "fixture-hostile")], &["--plugin-memory-budget-mb", "48"]).await;
        for mode in ["big-log", "big-upload"] {
            let r = server.post_json("/hostile?dry_run=true", &json!({"mode": mode, "n": 8 << 20})).await.unwrap();
            assert_eq!(r.status(), 200, "{mode}: {}", r.text().await.unwrap());
        }
    }

    /// One call alone needing more than the whole budget is stopped before its memory grows
    /// (a log message) or before its answer is copied (an upload): a 503, not an OOM.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn plugin_memory_budget_violated() {
        let server = server(&[("hostile.wasm", "fixture-hostile")], &["--plugin-memory-budget-mb", "48"]).await;
        for mode in ["big-log", "big-upload"] {
            assert_busy(server.post_json("/hostile?dry_run=true", &json!({"mode": mode, "n": 50 << 20})).await.unwrap()).await;
        }
        // The refused calls gave back what they held: a call within the budget still runs.
        let r = server.post_json("/hostile?dry_run=true", &json!({"mode": "big-upload", "n": 8 << 20})).await.unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    }

    /// 32 calls at once, each making the host copy 50 MiB: each is served or refused with a
    /// 503, and once they are done the whole budget is free again (a call needing most of it
    /// runs) and the service answers as before.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn thirty_two_calls_copying_50_mib_each_are_refused_or_bounded_and_the_service_stays_healthy() {
        let server = server(
            &[("hostile.wasm", "fixture-hostile"), ("echo.wasm", "fixture-echo")],
            &["--plugin-concurrency", "64", "--plugin-memory-budget-mb", "256", "--plugin-timeout-ms", "20000"],
        )
        .await;
        let calls: Vec<_> = (0..32)
            .map(|i| {
                let (client, url) = (server.client.clone(), server.url("/hostile?dry_run=true"));
                let mode = if i % 2 == 0 { "big-upload" } else { "big-log" };
                tokio::spawn(async move { client.post(url).json(&json!({"mode": mode, "n": 50 << 20})).send().await.unwrap() })
            })
            .collect();
        for call in calls {
            let r = call.await.unwrap();
            match r.status().as_u16() {
                200 => {}
                503 => assert_busy(r).await,
                other => panic!("a call ended {other}: {}", r.text().await.unwrap()),
            }
        }
        // Nothing is still held: a call needing about 110 MiB of the 256 fits.
        let r = server.post_json("/hostile?dry_run=true", &json!({"mode": "big-upload", "n": 50 << 20})).await.unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
        assert_eq!(server.post_json("/echo?dry_run=true", &json!({"prompt": "x"})).await.unwrap().status(), 200);
        assert_eq!(server.client.get(server.url("/health")).send().await.unwrap().status(), 200);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn plugin_returning_a_50_mib_workflow_is_refused_before_it_is_copied() {
        let server = server(&[("hostile.wasm", "fixture-hostile")], &[]).await;
        let (status, p) = problem(server.post_json("/hostile?dry_run=true", &json!({"mode": "big-workflow", "n": 50 << 20})).await.unwrap()).await.unwrap();
        assert_eq!(status, 500, "{p}");
        assert_eq!(p["plugin"], "hostile", "{p}");
        assert_eq!(p["failure"], "invalid_job", "{p}");
        assert!(p["detail"].as_str().unwrap().contains("workflow"), "{p}");
    }

    /// A plugin printing a 100 MiB dump to stderr is not failed by a broken pipe: the excess is
    /// dropped (and counted in the log), the request succeeds.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn plugin_writing_100_mib_to_stderr_still_succeeds() {
        let server = server(&[("hostile.wasm", "fixture-hostile")], &["--plugin-timeout-ms", "30000"]).await;
        let r = server.post_json("/hostile?dry_run=true", &json!({"mode": "stderr-flood", "n": 100 << 20})).await.unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn upload_count_limit_obeyed() {
        let server = server(&[("hostile.wasm", "fixture-hostile")], &[]).await;
        let r = server.post_json("/hostile?dry_run=true", &json!({"mode": "uploads", "n": 16})).await.unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    }
}

mod route_ownership {
    use super::*;

    /// Overwrite the owner's file with a plugin for another route: the old version keeps
    /// serving, the other (rejected) file claiming the route cannot take it, and restoring the
    /// owner's right file is accepted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn overwriting_the_owner_with_the_wrong_plugin_cannot_hand_its_route_to_an_impostor() {
        let echo = std::fs::read(fixture("fixture-echo")).unwrap();
        let wrong = std::fs::read(fixture("fixture-misbehave")).unwrap();
        let server = server(&[("a-echo.wasm", "fixture-echo"), ("b-impostor.wasm", "fixture-echo")], &[]).await;
        assert_eq!(server.plugin_status("a-echo.wasm").await.unwrap().unwrap()["status"], "loaded");
        assert_eq!(server.plugin_status("b-impostor.wasm").await.unwrap().unwrap()["status"], "rejected");

        publish_atomically(server.plugins.path(), "a-echo.wasm", &wrong).unwrap();
        let a = eventually(FAILSAFE, || async {
            let s = server.plugin_status("a-echo.wasm").await.ok()??;
            (s["status"] == "rejected").then_some(s)
        })
        .await
        .expect("the wrong content is rejected");
        assert!(a["reason"].as_str().unwrap().contains("keeps its route"), "{a}");
        assert_eq!(a["still_serving"], "1.0.0", "{a}");
        let b = server.plugin_status("b-impostor.wasm").await.unwrap().unwrap();
        assert_eq!(b["status"], "rejected", "the impostor took the route: {b}");
        assert_eq!(server.post_json("/echo?dry_run=true", &json!({"prompt": "x"})).await.unwrap().status(), 200);

        publish_atomically(server.plugins.path(), "a-echo.wasm", &echo).unwrap();
        let restored = eventually(FAILSAFE, || async {
            let s = server.plugin_status("a-echo.wasm").await.ok()??;
            (s["status"] == "loaded").then_some(s)
        })
        .await;
        assert!(restored.is_some(), "restoring the right file was refused: {:?}", server.plugin_status("a-echo.wasm").await);
        assert_eq!(server.plugin_status("b-impostor.wasm").await.unwrap().unwrap()["status"], "rejected");
    }
}

/// The route-ownership tests' plugins: `flux_dev.wasm` serving `/flux-dev`, and an impostor
/// (another plugin, a file name that sorts first) claiming the same route.
fn owner_and_impostor() -> (PathBuf, PathBuf) {
    static OWNER: OnceLock<PathBuf> = OnceLock::new();
    static IMPOSTOR: OnceLock<PathBuf> = OnceLock::new();
    let env = |name: &'static str| [("FIXTURE_ROUTE", "/flux-dev"), ("FIXTURE_NAME", name)];
    (
        OWNER.get_or_init(|| build_component("fixture-echo", &env("flux-dev")).expect("owner builds")).clone(),
        IMPOSTOR.get_or_init(|| build_component("fixture-echo", &env("impostor")).expect("impostor builds")).clone(),
    )
}

/// `flowhost_plugin_rejections_total{reason="<reason>"}`, 0 when absent.
async fn rejections(server: &TestServer, reason: &str) -> u64 {
    let text = server.client.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let prefix = format!("flowhost_plugin_rejections_total{{reason=\"{reason}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&prefix)).map(|n| n.trim().parse().unwrap()).unwrap_or(0)
}

/// Wait until `file` has the `status` in `/plugins`; its entry.
async fn status_becomes(server: &TestServer, file: &str, status: &str) -> Value {
    let reached = eventually(FAILSAFE, || async {
        let s = server.plugin_status(file).await.ok()??;
        (s["status"] == status).then_some(s)
    })
    .await;
    match reached {
        Some(s) => s,
        None => panic!("{file} never became {status}: {:?}", server.plugin_status(file).await),
    }
}

mod route_ownership_across_restarts {
    use super::*;

    /// The owner serves, an impostor sorting first arrives and is rejected; after a restart on
    /// the same folder and state, the owner still serves and the impostor is still rejected.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_impostor_sorting_first_is_still_rejected_after_a_restart() {
        let (owner, impostor) = owner_and_impostor();
        let state = tempfile::tempdir().unwrap();
        let state_arg = state.path().to_string_lossy().to_string();
        let args = ["--simulate", "--state-dir", state_arg.as_str()];
        let first = TestServer::start(&[("flux_dev.wasm", owner.as_path())], &args).await.unwrap();
        status_becomes(&first, "flux_dev.wasm", "loaded").await;
        publish_atomically(first.plugins.path(), "aaa-impostor.wasm", &std::fs::read(&impostor).unwrap()).unwrap();
        let rejected = status_becomes(&first, "aaa-impostor.wasm", "rejected").await;
        let reason = rejected["reason"].as_str().unwrap();
        assert!(reason.contains("flux_dev.wasm") && reason.contains("remove flux_dev.wasm"), "{rejected}");
        assert_eq!(rejected["rejection"], "route_conflict", "{rejected}");

        let TestServer { server, plugins, cache, .. } = first;
        server.shutdown().await.unwrap();
        let second = TestServer::start_in(plugins, cache, &args).await.unwrap();
        let owner_status = second.plugin_status("flux_dev.wasm").await.unwrap().unwrap();
        assert_eq!(owner_status["status"], "loaded", "{owner_status}");
        let impostor_status = second.plugin_status("aaa-impostor.wasm").await.unwrap().unwrap();
        assert_eq!(impostor_status["status"], "rejected", "the impostor took the route on restart: {impostor_status}");
        let served = second.post_json("/flux-dev?dry_run=true", &json!({"prompt": "x"})).await.unwrap();
        assert_eq!(served.status(), 200);
        assert_eq!(served.json::<Value>().await.unwrap()["plugin"]["name"], "flux-dev");
    }

    /// A file rejected for a route conflict is reported once for its content, however many
    /// scans see it again (each junk file below shows one more scan ran).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_conflicting_file_is_reported_once_not_on_every_scan() {
        let (owner, impostor) = owner_and_impostor();
        let server = TestServer::start(&[("flux_dev.wasm", owner.as_path())], &["--simulate", "--rescan-interval", "1"]).await.unwrap();
        status_becomes(&server, "flux_dev.wasm", "loaded").await;
        publish_atomically(server.plugins.path(), "aaa-impostor.wasm", &std::fs::read(&impostor).unwrap()).unwrap();
        status_becomes(&server, "aaa-impostor.wasm", "rejected").await;
        for junk in ["junk-1.wasm", "junk-2.wasm", "junk-3.wasm"] {
            publish_atomically(server.plugins.path(), junk, b"not a component").unwrap();
            status_becomes(&server, junk, "rejected").await;
        }
        assert_eq!(rejections(&server, "route_conflict").await, 1);
        // New content is a new report.
        let mut changed = std::fs::read(&impostor).unwrap();
        changed.extend_from_slice(&[0x00, 0x06, 0x05, b'x', b'y', b'z', b'!', b'!']);
        publish_atomically(server.plugins.path(), "aaa-impostor.wasm", &changed).unwrap();
        let counted = eventually(FAILSAFE, || async { (rejections(&server, "route_conflict").await == 2).then_some(()) }).await;
        assert!(counted.is_some(), "new content of the conflicting file was not reported");
    }
}

mod slow_clients {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connection_stalled_in_its_headers_is_closed() {
        let server = server(&[("echo.wasm", "fixture-echo")], &["--header-read-timeout", "1"]).await;
        let mut stream = tokio::net::TcpStream::connect(server.server.addr).await.unwrap();
        stream.write_all(b"POST /echo HTTP/1.1\r\nhost: x\r\n").await.unwrap();
        let mut buf = Vec::new();
        let closed = tokio::time::timeout(FAILSAFE, stream.read_to_end(&mut buf)).await;
        assert!(closed.is_ok(), "a connection stalled in its headers was still open after {FAILSAFE:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connection_stalled_mid_body_gets_408() {
        let server = server(&[("echo.wasm", "fixture-echo")], &["--body-read-timeout", "1"]).await;
        let mut stream = tokio::net::TcpStream::connect(server.server.addr).await.unwrap();
        stream
            .write_all(b"POST /echo?dry_run=true HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"prompt\"")
            .await
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(FAILSAFE, stream.read(&mut buf)).await.expect("no answer to a stalled body").unwrap();
        let response = String::from_utf8_lossy(&buf[..n]).to_string();
        assert_eq!(status_of(&response), 408, "{response}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn declared_99_gb_body_gets_an_immediate_413() {
        let server = server(&[("echo.wasm", "fixture-echo")], &[]).await;
        let mut stream = tokio::net::TcpStream::connect(server.server.addr).await.unwrap();
        stream
            .write_all(b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 99000000000\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(FAILSAFE, stream.read(&mut buf)).await.expect("no answer without the body").unwrap();
        let response = String::from_utf8_lossy(&buf[..n]).to_string();
        assert_eq!(status_of(&response), 413, "{response}");
        assert_eq!(header_of(&response, "content-type"), Some("application/problem+json"));
    }
}

mod protocol_edges {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn wrong_methods_unknown_paths_and_oversized_heads_get_problem_bodies() {
        let server = server(&[("echo.wasm", "fixture-echo")], &[]).await;
        let r = raw(&server, "POST /health HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\nconnection: close\r\n\r\n", b"").await;
        assert_eq!(status_of(&r), 405, "{r}");
        assert_eq!(header_of(&r, "content-type"), Some("application/problem+json"), "{r}");
        assert!(header_of(&r, "allow").is_some_and(|a| a.contains("GET")), "{r}");

        let r = raw(&server, "GET /echo HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n", b"").await;
        assert_eq!(status_of(&r), 405, "{r}");
        assert_eq!(header_of(&r, "allow"), Some("POST"), "{r}");
        assert_eq!(body_of(&r)["status"], 405, "{r}");

        let r = raw(&server, "GET /anything HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n", b"").await;
        assert_eq!(status_of(&r), 404, "{r}");
        assert_eq!(header_of(&r, "content-type"), Some("application/problem+json"), "{r}");

        let long = "a".repeat(10 << 10);
        let r = raw(&server, &format!("GET /health?q={long} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"), b"").await;
        assert_eq!(status_of(&r), 414, "{r}");
        assert_eq!(body_of(&r)["status"], 414, "{r}");

        let big = "b".repeat(40 << 10);
        let r = raw(&server, &format!("GET /health HTTP/1.1\r\nhost: x\r\nx-big: {big}\r\nconnection: close\r\n\r\n"), b"").await;
        assert_eq!(status_of(&r), 431, "{r}");
        assert_eq!(body_of(&r)["status"], 431, "{r}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn content_type_smuggling_is_a_415_and_a_broken_body_a_400() {
        let server = server(&[("echo.wasm", "fixture-echo")], &[]).await;
        for ct in ["application/jsonp", "text/html; x=+json"] {
            let r = server.client.post(server.url("/echo?dry_run=true")).header("content-type", ct).body(r#"{"prompt": "x"}"#).send().await.unwrap();
            assert_eq!(r.status(), 415, "{ct}");
        }
        let r = server.client.post(server.url("/echo?dry_run=true")).header("content-type", "application/json; charset=utf-8").body(r#"{"prompt": "x"}"#).send().await.unwrap();
        assert_eq!(r.status(), 200);
        // Broken chunked encoding: a chunk size that is not hex.
        let r = raw(
            &server,
            "POST /echo?dry_run=true HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n",
            b"5\r\n{\"pro\r\nzz\r\n",
        )
        .await;
        assert_eq!(status_of(&r), 400, "{r}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn empty_dry_run_is_a_400_and_whole_floats_pass_as_integers() {
        let server = server(&[("echo.wasm", "fixture-echo")], &[]).await;
        let (status, _) = problem(server.post_json("/echo?dry_run=", &json!({"prompt": "x"})).await.unwrap()).await.unwrap();
        assert_eq!(status, 400);
        let r = server.post_json("/echo?dry_run=true", &json!({"prompt": "x", "width": 320.0})).await.unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn openapi_documents_every_status_and_the_dry_run_answer() {
        let server = server(&[("echo.wasm", "fixture-echo")], &[]).await;
        let doc = server.get_json("/openapi.json").await.unwrap();
        let responses = &doc["paths"]["/echo"]["post"]["responses"];
        for status in ["401", "403", "405", "415", "502"] {
            assert!(responses.get(status).is_some(), "{status} undocumented");
        }
        assert!(responses["200"]["content"].get("application/json").is_some());
    }
}
