//! A launch profile reaches the command line the supervisor really spawns: the
//! ComfyUI double's binary stands in for `python main.py` and reports its argv in
//! `/system_stats`, exactly as ComfyUI does.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use flowhost_comfy::{LaunchProfile, PreviewMethod, ProcessState, Supervisor, SupervisorConfig};
use serde_json::Value;

/// The double's binary, built if needed.
fn double_binary() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target")));
    let binary = target.join("debug").join("comfyui-double");
    if !binary.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = std::process::Command::new(cargo)
            .args(["build", "-p", "comfyui-double", "--bin", "comfyui-double"])
            .env("CARGO_TARGET_DIR", &target)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .unwrap();
        assert!(status.success(), "building comfyui-double failed");
    }
    binary
}

/// Spawn under supervision with `profile`, return the argv the process reports.
async fn spawned_argv(
    profile: LaunchProfile,
    preview: Option<PreviewMethod>,
    extra: &[&str],
) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut config = SupervisorConfig::new(dir.path().to_path_buf(), port);
    // The double takes `main.py` as its first argument and ignores it, like python would run it.
    config.python = double_binary();
    config.profile = profile;
    config.preview = preview;
    config.extra_args = extra.iter().map(|s| s.to_string()).collect();
    config.startup_timeout = Duration::from_secs(30);
    let supervisor = Supervisor::spawn(config.clone());
    let mut state = supervisor.state();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !matches!(*state.borrow(), ProcessState::Running { .. }) {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "never ran: {:?}", *state.borrow());
        let _ = tokio::time::timeout(left, state.changed()).await;
    }
    let stats: Value = reqwest::get(format!("http://127.0.0.1:{port}/system_stats"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    supervisor.shutdown().await;
    let argv: Vec<String> = serde_json::from_value(stats["system"]["argv"].clone()).unwrap();
    assert_eq!(
        argv,
        config.command_args(),
        "the process got the command line the config describes"
    );
    argv
}

fn after_port(argv: &[String]) -> &[String] {
    let at = argv.iter().position(|a| a == "--port").expect("--port");
    &argv[at + 2..]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fp8_profile_adds_its_options_before_the_operators_own() {
    let argv = spawned_argv(
        LaunchProfile::Fp8,
        Some(PreviewMethod::Latent2Rgb),
        &["--disable-metadata"],
    )
    .await;
    assert_eq!(argv[0], "main.py");
    assert_eq!(
        after_port(&argv),
        [
            "--fp8_e4m3fn-unet",
            "--fast",
            "fp8_matrix_mult",
            "--preview-method",
            "latent2rgb",
            "--disable-metadata"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_profile_spawns_comfyui_with_nothing_added() {
    let argv = spawned_argv(LaunchProfile::Default, None, &[]).await;
    assert!(after_port(&argv).is_empty(), "{argv:?}");
    let fast = spawned_argv(LaunchProfile::Fast, None, &[]).await;
    assert_eq!(
        after_port(&fast),
        [
            "--fp8_e4m3fn-unet",
            "--highvram",
            "--fast",
            "fp8_matrix_mult",
            "autotune"
        ]
    );
}
