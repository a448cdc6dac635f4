//! The S3 bucket down (issue #22: a 30 s outage failed 86 of 100 jobs `internal` while the
//! instances said ready, and downloads answered 500): readiness says the blob store is
//! unreachable (without host or port), downloads answer 503 + Retry-After, and a job
//! whose output cannot be stored is retried within its deadline and succeeds once the
//! bucket is back. Also the start-up checks: a missing bucket and a missing `--plugins`
//! folder refuse to start, naming what is wrong. The AWS variables are read at start-up,
//! so the binary runs as a child with them.

use std::process::{Command, Stdio};
use std::time::Duration;

use flowhost_tests::contract::V2Client;
use flowhost_tests::s3::S3Server;
use flowhost_tests::{KillOnDrop, eventually, free_port};
use serde_json::{Value, json};

fn serve(dir: &std::path::Path, port: u16, s3: &S3Server, bucket_url: &str) -> Command {
    std::fs::create_dir_all(dir.join("plugins")).unwrap();
    serve_with_plugins(dir, &dir.join("plugins"), port, s3, bucket_url)
}

fn serve_with_plugins(dir: &std::path::Path, plugins: &std::path::Path, port: u16, s3: &S3Server, bucket_url: &str) -> Command {
    let mut command = Command::new(flowhost_tests::flowhost_binary());
    command
        .args(["serve", "--simulate", "--warm-up", "off", "--listen", &format!("127.0.0.1:{port}"), "--job-timeout", "120", "--plugins"])
        .arg(plugins)
        .arg("--cache-dir")
        .arg(dir.join("cache"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .args(["--blob-store", bucket_url])
        .env_remove("FLOWHOST_API_KEYS")
        .env_remove("FLOWHOST_ADMIN_KEYS")
        .envs(s3.aws_vars())
        .stdout(Stdio::null());
    command
}

/// Run a command that must exit (a refused start) within a minute; its stderr.
fn refused_start(mut command: Command) -> String {
    let mut child = command.stderr(Stdio::piped()).spawn().unwrap();
    let started = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(!status.success(), "the start is refused");
            let mut err = String::new();
            use std::io::Read;
            child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
            return err;
        }
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("flowhost did not refuse to start");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_bucket_down_readiness_says_so_downloads_answer_503_and_jobs_finish_once_it_is_back() {
    let mut s3 = S3Server::start("flowhost-outage").await.expect("moto starts");
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _child = KillOnDrop(serve(dir.path(), port, &s3, &s3.blob_store_url("blobs")).stderr(Stdio::null()).spawn().unwrap());
    let base = format!("http://127.0.0.1:{port}");
    let client = V2Client::new(&base);
    let http = reqwest::Client::new();
    let ready = eventually(Duration::from_secs(60), || async {
        let r = http.get(format!("{base}/health")).send().await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    assert!(ready.is_some(), "ready with the bucket up");
    let part = reqwest::multipart::Part::bytes(b"outage bytes".to_vec()).file_name("a.txt").mime_str("text/plain").unwrap();
    let form = reqwest::multipart::Form::new().part("file", part).text("content_type", "text/plain").text("file_path", "a.txt");
    let uploaded: Value = http.post(format!("{base}/api/v2/assets")).multipart(form).send().await.unwrap().json().await.unwrap();
    let asset = uploaded["id"].as_str().expect("uploaded").to_string();

    s3.stop();
    let health = eventually(Duration::from_secs(20), || async {
        let r = http.get(format!("{base}/health")).send().await.ok()?;
        (r.status() == 503).then_some(r.text().await.ok()?)
    })
    .await
    .expect("/health is not ready while the bucket is down");
    let body: Value = serde_json::from_str(&health).unwrap();
    assert_eq!(body["status"], "blob_store_unreachable", "{body}");
    assert_eq!(body["blob_store"]["reachable"], false);
    assert!(!health.contains("127.0.0.1") && !health.contains(&s3.port.to_string()), "no host or port: {health}");
    let v2_health = http.get(format!("{base}/api/v2/health")).send().await.unwrap();
    assert_eq!(v2_health.status(), 503);
    let v2_health: Value = v2_health.json().await.unwrap();
    assert_eq!((v2_health["status"].as_str(), v2_health["blob_store"]["reachable"].as_bool()), (Some("degraded"), Some(false)));

    let download = http.get(format!("{base}/api/v2/assets/{asset}/content")).send().await.unwrap();
    assert_eq!(download.status(), 503, "a download during the outage is a 503, not a 500");
    assert!(download.headers().get("retry-after").is_some());
    let text = download.text().await.unwrap();
    assert!(!text.contains("127.0.0.1"), "{text}");

    // A job whose output cannot be stored now: retried, and done once the bucket is back.
    let workflow = json!({
        "5": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "outage"}}
    });
    let created = client.post_json("/api/v2/jobs", &json!({"workflow": workflow})).await;
    assert_eq!(created.status, 201, "{}", created.json());
    let id = created.json()["id"].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let during = client.get(&format!("/api/v2/jobs/{id}")).await.json();
    assert!(during["status"] == "running" || during["status"] == "queued", "not failed while the bucket is down: {during}");
    s3.restart().await.expect("moto restarts");
    let done = eventually(Duration::from_secs(60), || async {
        let job = client.get(&format!("/api/v2/jobs/{id}")).await.json();
        job["status"].as_str().is_some_and(|s| s != "running" && s != "queued").then_some(job)
    })
    .await
    .expect("the job ends");
    assert_eq!(done["status"], "succeeded", "{done}");
    let ready_again = eventually(Duration::from_secs(20), || async {
        let r = http.get(format!("{base}/health")).send().await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    assert!(ready_again.is_some(), "ready again once the bucket is back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_bucket_or_plugin_folder_refuses_to_start_naming_it() {
    let s3 = S3Server::start("flowhost-present").await.expect("moto starts");
    let dir = tempfile::tempdir().unwrap();
    let err = refused_start(serve(dir.path(), free_port(), &s3, "s3://flowhost-no-such-bucket/x"));
    assert!(err.contains("flowhost-no-such-bucket") && err.contains("does not exist"), "{err}");
    assert!(!err.contains(&s3.port.to_string()), "no endpoint in the error: {err}");

    let missing = dir.path().join("plugins-typo");
    let err = refused_start(serve_with_plugins(dir.path(), &missing, free_port(), &s3, &s3.blob_store_url("x")));
    assert!(err.contains("--plugins") && err.contains("plugins-typo") && err.contains("no such folder"), "{err}");
    assert!(!missing.exists(), "the mistyped folder is not created");
}
