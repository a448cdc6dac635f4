//! The plugin author's path as the README tells it: `scripts/plugin-quickstart.sh`
//! (which the README embeds verbatim) against a real `flowhost serve --simulate`,
//! from `flowhost new` to a served JPEG and a hot-reloaded change, once with
//! `cargo build --target wasm32-wasip2` and once with `cargo component build`.
//! A missing `cargo-component` fails these tests; it never skips them.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use flowhost_tests::{KillOnDrop as Child, eventually, free_port, workspace_root};
use serde_json::Value;

#[test]
fn the_readme_embeds_the_quickstart_script_verbatim() {
    let readme = std::fs::read_to_string(workspace_root().join("README.md")).unwrap();
    let script = std::fs::read_to_string(workspace_root().join("scripts/plugin-quickstart.sh")).unwrap();
    let start = readme.find("<!-- scripts/plugin-quickstart.sh -->\n```bash\n").expect("the README's quickstart marker");
    let body = &readme[start..];
    let body = &body[body.find("```bash\n").unwrap() + "```bash\n".len()..];
    let end = body.find("```\n<!-- end scripts/plugin-quickstart.sh -->").expect("the README's end marker");
    assert_eq!(&body[..end], script, "README.md's 'Write a plugin' block and scripts/plugin-quickstart.sh differ");
}

/// Serve an empty plugin folder with the real binary, run the quickstart
/// script against it, and check what it produced.
async fn quickstart(build: &str, name: &str) {
    let plugins = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    // Its own job store: the two build paths run at once, and two services must not share one.
    let state = tempfile::tempdir().unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let _service = Child(
        Command::new(flowhost_tests::flowhost_binary())
            .args(["serve", "--simulate", "--rescan-interval", "1", "--listen", &format!("127.0.0.1:{port}"), "--plugins"])
            .arg(plugins.path())
            .arg("--cache-dir")
            .arg(cache.path())
            .arg("--state-dir")
            .arg(state.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let client = reqwest::Client::new();
    let up = eventually(Duration::from_secs(60), || async { client.get(format!("{base}/health")).send().await.ok().map(|_| ()) }).await;
    assert!(up.is_some(), "flowhost serve --simulate did not come up");

    let dir = work.path().join(name);
    let script = workspace_root().join("scripts/plugin-quickstart.sh");
    let (plugins_dir, dir_for_script, base_for_script) = (plugins.path().to_path_buf(), dir.clone(), base.clone());
    let (build_owned, name_owned) = (build.to_string(), name.to_string());
    let out = tokio::task::spawn_blocking(move || {
        Command::new("bash")
            .arg(&script)
            .env("FLOWHOST_URL", &base_for_script)
            .env("FLOWHOST_PLUGINS", &plugins_dir)
            .env("PLUGIN_NAME", &name_owned)
            .env("PLUGIN_DIR", &dir_for_script)
            .env("BUILD", &build_owned)
            .env("CARGO_TARGET_DIR", flowhost_tests::target_dir())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let log = format!("stdout:\n{}\nstderr:\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the quickstart failed with BUILD={build}\n{log}");

    let jpeg = std::fs::read(dir.join("cat.jpg")).unwrap();
    let image = image::load_from_memory_with_format(&jpeg, image::ImageFormat::Jpeg).expect("cat.jpg is a real JPEG");
    assert_eq!((image.width(), image.height()), (512, 512));
    let list: Value = client.get(format!("{base}/plugins")).send().await.unwrap().json().await.unwrap();
    let file = format!("{}.wasm", name.replace('-', "_"));
    let status = list["plugins"].as_array().unwrap().iter().find(|p| p["file"] == file.as_str()).cloned().unwrap_or(Value::Null);
    assert_eq!(status["status"], "loaded", "{list}");
    assert_eq!(status["version"], "0.1.1", "the changed build is what serves: {list}");
    assert_eq!(status["contract"], "0.3.0", "flowhost new writes a contract 0.3.0 plugin: {list}");
    assert!(Path::new(&dir).join("Cargo.toml").is_file());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quickstart_with_cargo_build_for_wasm32_wasip2() {
    quickstart("wasip2", "sdxl-turbo").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quickstart_with_cargo_component_build() {
    let version = Command::new("cargo").args(["component", "--version"]).output();
    assert!(
        version.map(|o| o.status.success()).unwrap_or(false),
        "cargo-component is not installed (cargo install cargo-component@0.21.1 --locked): the cargo-component author path cannot be tested"
    );
    quickstart("component", "sdxl-component").await;
}
