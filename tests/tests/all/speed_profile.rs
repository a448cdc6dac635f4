//! The opt-in speed profiles (issue 26): under `--comfyui-profile speed` the jobs of the routes
//! it covers (their warm-up too) reach ComfyUI with an `EasyCache` step cache between the model
//! and the sampler, ComfyUI's launch untouched; `speed-compiled` launches ComfyUI with fp8 and
//! its Inductor/Triton caches under the state dir and puts `TorchCompileModel` there instead
//! (with `--speed-step-cache`, after a `LazyCache`, never an `EasyCache`);
//! without either the plugin's graph goes untouched and nothing is added to ComfyUI's
//! environment. Real `flowhost serve` supervising the ComfyUI
//! double (which validates against ComfyUI 0.3.64's captured node catalogue), real plugins.

use std::path::Path;
use std::time::Duration;

use flowhost_tests::{ExternalComfy, TestServer, component, eventually, nodes_of_class};
use serde_json::{Value, json};
use uuid::Uuid;

/// A ComfyUI checkout whose main.py notes its command line and compile-cache variables
/// (`launch.json` in its own folder), then runs the double.
fn noting_comfyui() -> tempfile::TempDir {
    let comfyui = tempfile::tempdir().unwrap();
    let bin = flowhost_tests::double_binary();
    let main = format!(
        "import json, os, sys\n\
         json.dump({{'argv': sys.argv[1:], 'inductor': os.environ.get('TORCHINDUCTOR_CACHE_DIR'), 'triton': os.environ.get('TRITON_CACHE_DIR')}}, open('launch.json', 'w'))\n\
         binary = {:?}\nos.execv(binary, [binary] + sys.argv[1:])\n",
        bin.to_string_lossy()
    );
    std::fs::write(comfyui.path().join("main.py"), main).unwrap();
    comfyui
}

struct Served {
    server: TestServer,
    comfyui: tempfile::TempDir,
    state: tempfile::TempDir,
    _models: ExternalComfy,
}

async fn serve(extra: &[&str]) -> Served {
    let comfyui = noting_comfyui();
    let state = tempfile::tempdir().unwrap();
    let models = ExternalComfy::start().await.unwrap(); // only for its provisioned models folder
    let (dir, state_dir, models_dir) = (
        comfyui.path().to_string_lossy().to_string(),
        state.path().to_string_lossy().to_string(),
        models.models.path().to_string_lossy().to_string(),
    );
    let mut args = vec!["--comfyui-dir", &dir, "--comfyui-python", "python3", "--models", &models_dir, "--state-dir", &state_dir, "--comfyui-startup-timeout", "60", "--warm-up", "auto"];
    args.extend_from_slice(extra);
    let server = TestServer::start(&[("flux-dev.wasm", &component("flux-dev"))], &args).await.unwrap();
    let ready = eventually(Duration::from_secs(60), || async {
        let r = server.client.get(server.url("/health")).send().await.ok()?;
        let code = r.status().as_u16();
        let h: Value = r.json().await.ok()?;
        (code == 200).then_some(h)
    })
    .await;
    let health = ready.expect("the supervised service becomes ready");
    assert_eq!(health["warm_up"]["state"], "done", "{health}");
    Served { server, comfyui, state, _models: models }
}

fn launch(comfyui: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(comfyui.join("launch.json")).unwrap()).unwrap()
}

/// `/flux-dev` once; the executed graph ComfyUI got (the job's recorded workflow).
async fn flux_dev_graph(s: &Served) -> Value {
    let body = json!({"prompt": "a lighthouse at dawn", "width": 256, "height": 256, "steps": 4, "seed": 5});
    let response = s.server.post_json("/flux-dev", &body).await.unwrap();
    assert_eq!(response.status(), 200, "{:?}", response.headers());
    let id = Uuid::parse_str(response.headers()["x-job-id"].to_str().unwrap()).unwrap();
    s.server.server.state.jobs.get(id).await.unwrap().expect("the job is kept").workflow
}

/// The same Flux graph sent as a Comfy API v2 prompt (no route).
async fn v2_graph(s: &Served) -> Value {
    let dry = s.server.client.post(s.server.url("/flux-dev?dry_run=true")).json(&json!({"prompt": "v2", "width": 256, "height": 256, "steps": 2, "seed": 3})).send().await.unwrap();
    assert_eq!(dry.status(), 200);
    let dry: Value = dry.json().await.unwrap();
    let workflow = match dry.get("workflow").or_else(|| dry["job"].get("workflow")) {
        Some(Value::String(text)) => serde_json::from_str(text).unwrap(),
        Some(v) => v.clone(),
        None => panic!("the dry run answers the graph: {dry}"),
    };
    assert!(workflow.is_object(), "{dry}");
    let response = s.server.client.post(s.server.url("/api/v2/jobs")).json(&json!({"workflow": workflow})).send().await.unwrap();
    assert_eq!(response.status(), 201, "{:?}", response.text().await);
    let job: Value = response.json().await.unwrap();
    let id = Uuid::parse_str(job["id"].as_str().unwrap()).unwrap();
    let jobs = s.server.server.state.jobs.clone();
    let job = eventually(Duration::from_secs(60), || async { jobs.get(id).await.ok().flatten().filter(|j| j.status.is_terminal()) }).await.expect("the job ends");
    assert_eq!(job.status, flowhost::jobs::JobStatus::Succeeded);
    job.workflow
}

fn sampler_model_class(graph: &Value) -> String {
    let nodes = graph.as_object().unwrap();
    let sampler = nodes.values().find(|n| n["class_type"] == "KSampler").expect("a KSampler");
    let source = sampler["inputs"]["model"][0].as_str().unwrap();
    graph[source]["class_type"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speed_profile_step_caches_every_flux_job_and_leaves_the_launch_alone() {
    let s = serve(&["--comfyui-profile", "speed", "--speed-step-cache", "0.3"]).await;
    let noted = launch(s.comfyui.path());
    let argv: Vec<&str> = noted["argv"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert!(!argv.iter().any(|a| a.contains("fp8") || *a == "--highvram"), "ComfyUI's own bf16 launch: {argv:?}");
    assert!(!s.state.path().join("compile-cache").exists(), "nothing compiles");

    let graph = flux_dev_graph(&s).await;
    assert_eq!(sampler_model_class(&graph), "EasyCache", "{graph}");
    assert_eq!(nodes_of_class(&graph, "TorchCompileModel"), 0);
    assert_eq!(nodes_of_class(&graph, "EasyCache"), 1);
    let cache_node = graph.as_object().unwrap().values().find(|n| n["class_type"] == "EasyCache").unwrap();
    assert_eq!(cache_node["inputs"]["reuse_threshold"], json!(0.3));
    assert_eq!(graph[cache_node["inputs"]["model"][0].as_str().unwrap()]["class_type"], "UNETLoader");

    // Without --speed-routes the v2 API's prompts get it too.
    assert_eq!(sampler_model_class(&v2_graph(&s).await), "EasyCache");
    s.server.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speed_compiled_launches_fp8_compiles_every_flux_job_and_keeps_its_caches_in_the_state_dir() {
    let s = serve(&["--comfyui-profile", "speed-compiled"]).await;
    let noted = launch(s.comfyui.path());
    let argv: Vec<&str> = noted["argv"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    for flag in ["--fp8_e4m3fn-unet", "fp8_matrix_mult", "--highvram"] {
        assert!(argv.contains(&flag), "{flag} missing from {argv:?}");
    }
    let cache = s.state.path().join("compile-cache");
    assert_eq!(noted["inductor"], cache.join("inductor").to_string_lossy().as_ref());
    assert_eq!(noted["triton"], cache.join("triton").to_string_lossy().as_ref());
    assert!(cache.is_dir(), "the compile cache folder exists before ComfyUI starts");

    let graph = flux_dev_graph(&s).await;
    assert_eq!(sampler_model_class(&graph), "TorchCompileModel", "{graph}");
    assert_eq!(nodes_of_class(&graph, "TorchCompileModel"), 1);
    assert_eq!(nodes_of_class(&graph, "EasyCache"), 0, "never a step cache inside a compiled model");
    s.server.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speed_compiled_with_a_step_cache_puts_lazy_cache_before_the_compile_never_easy_cache() {
    let s = serve(&["--comfyui-profile", "speed-compiled", "--speed-step-cache", "0.3"]).await;
    let graph = flux_dev_graph(&s).await;
    assert_eq!(sampler_model_class(&graph), "TorchCompileModel", "{graph}");
    let compile = graph.as_object().unwrap().values().find(|n| n["class_type"] == "TorchCompileModel").unwrap();
    let cache_id = compile["inputs"]["model"][0].as_str().unwrap();
    assert_eq!(graph[cache_id]["class_type"], "LazyCache", "the step cache decides outside the compiled model: {graph}");
    assert_eq!(graph[cache_id]["inputs"]["reuse_threshold"], json!(0.3));
    let source = graph[cache_id]["inputs"]["model"][0].as_str().unwrap();
    assert_eq!(graph[source]["class_type"], "UNETLoader", "the loader's model is cached, then compiled");
    assert_eq!(nodes_of_class(&graph, "EasyCache"), 0, "never EasyCache inside a compiled model");
    s.server.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speed_routes_limit_the_transform_and_the_default_profile_changes_nothing() {
    let s = serve(&["--comfyui-profile", "speed", "--speed-routes", "/flux-dev"]).await;
    let graph = flux_dev_graph(&s).await;
    assert_eq!(sampler_model_class(&graph), "EasyCache");
    let cache_node = graph.as_object().unwrap().values().find(|n| n["class_type"] == "EasyCache").unwrap();
    assert_eq!(cache_node["inputs"]["reuse_threshold"], json!(0.25), "the speed profile's measured threshold (1.8x needs more than ComfyUI's 0.2)");
    assert_eq!(sampler_model_class(&v2_graph(&s).await), "UNETLoader", "a route not named goes untouched");
    s.server.server.shutdown().await.unwrap();

    let d = serve(&[]).await;
    let noted = launch(d.comfyui.path());
    let argv: Vec<&str> = noted["argv"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert!(!argv.iter().any(|a| a.contains("fp8") || *a == "--highvram"), "{argv:?}");
    // Whatever the test's own environment holds passes through; flowhost adds nothing.
    assert_eq!(noted["inductor"].as_str(), std::env::var("TORCHINDUCTOR_CACHE_DIR").ok().as_deref());
    assert!(!d.state.path().join("compile-cache").exists());
    let graph = flux_dev_graph(&d).await;
    assert_eq!(sampler_model_class(&graph), "UNETLoader");
    assert_eq!(nodes_of_class(&graph, "TorchCompileModel") + nodes_of_class(&graph, "EasyCache"), 0);
    d.server.server.shutdown().await.unwrap();
}
