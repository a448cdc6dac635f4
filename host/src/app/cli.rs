//! Command-line interface: `flowhost serve`, `flowhost check-plugin`,
//! `flowhost new`, `flowhost models ...`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(name = "flowhost", version, about = "Serve ComfyUI workflows as HTTP endpoints; each endpoint is a sandboxed WebAssembly plugin.")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP service.
    Serve(ServeArgs),
    /// Load a plugin in the same sandbox the service uses, print its manifest and,
    /// with --request, the job it builds (or its errors). Exits non-zero on failure.
    CheckPlugin(CheckPluginArgs),
    /// The model volume: what the plugins need and what is there.
    #[command(subcommand)]
    Models(ModelsCommand),
    /// Write a new plugin crate (`NAME/`, served as `/NAME`) that builds with
    /// `cargo build --target wasm32-wasip2` or `cargo component build`.
    New(NewArgs),
}

#[derive(Debug, Clone, Args)]
pub struct NewArgs {
    /// Plugin, crate and route name (`[a-z][a-z0-9-]*`).
    pub name: String,
    /// Folder to create (default: ./NAME).
    #[arg(long)]
    pub path: Option<PathBuf>,
    /// The flowhost-sdk crate to depend on (default: the `sdk/` of the flowhost
    /// checkout the current folder is in, else of the one flowhost was built from).
    #[arg(long)]
    pub sdk_path: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum ModelsCommand {
    /// Per plugin: which model files it needs, which are present (size), which are
    /// missing. Exits 1 when something is missing.
    Status(ModelsStatusArgs),
    /// Download what a manifest lists from Hugging Face (resumable, sha256-verified).
    Pull(crate::models::pull::PullArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ModelsStatusArgs {
    /// Model volume.
    #[arg(long, env = "FLOWHOST_MODELS")]
    pub models: PathBuf,
    /// Plugin folder whose plugins' requirements are checked.
    #[arg(long, env = "FLOWHOST_PLUGINS", default_value = ".flowhost/plugins")]
    pub plugins: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// How images a job wants as JPEG leave ComfyUI (`--output-transport`).
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq, Default)]
pub enum OutputTransport {
    /// Raw pixels over the websocket through flowhost's `FlowhostImageOutput` node when
    /// ComfyUI lists it (flowhost installs it into a ComfyUI it supervises), else files.
    #[default]
    Auto,
    /// Always ComfyUI's own `SaveImage` PNG files, fetched over `/view`.
    Files,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "FLOWHOST_LISTEN", default_value = "127.0.0.1:8000")]
    pub listen: SocketAddr,
    /// Plugin folder, watched for .wasm files (hot reload).
    #[arg(long, env = "FLOWHOST_PLUGINS", default_value = ".flowhost/plugins")]
    pub plugins: PathBuf,
    /// Model volume (checkpoints/, diffusion_models/, loras/, ...).
    #[arg(long, env = "FLOWHOST_MODELS")]
    pub models: Option<PathBuf>,
    /// Inputs volume: request fields may name images by a path relative to it.
    #[arg(long, env = "FLOWHOST_INPUTS")]
    pub inputs: Option<PathBuf>,
    /// Host-owned folder for compiled plugins (never the plugin folder).
    #[arg(long, env = "FLOWHOST_CACHE_DIR", default_value = ".flowhost/cache")]
    pub cache_dir: PathBuf,
    /// Use a running ComfyUI at this URL. Repeat it (or give a comma-separated list in
    /// the env var) for a pool of workers: one prompt slot set per ComfyUI, jobs dispatched
    /// by model affinity (see --dispatch).
    #[arg(long, env = "FLOWHOST_COMFYUI_URL", value_delimiter = ',', conflicts_with_all = ["comfyui_dir", "simulate"])]
    pub comfyui_url: Vec<url::Url>,
    /// Spawn and supervise ComfyUI from this folder (`python main.py ...`).
    #[arg(long, env = "FLOWHOST_COMFYUI_DIR", conflicts_with = "simulate")]
    pub comfyui_dir: Option<PathBuf>,
    /// With --comfyui-dir: spawn one supervised ComfyUI per GPU listed (`0,1,2,3`), each
    /// with `CUDA_VISIBLE_DEVICES` set to its GPU, its own port and input/output/temp
    /// folders (under --state-dir) and the shared model volume. Unset: one ComfyUI that
    /// sees every GPU.
    #[arg(long, env = "FLOWHOST_GPUS", value_delimiter = ',', requires = "comfyui_dir")]
    pub gpus: Vec<String>,
    /// With --simulate: how many embedded ComfyUI doubles to run as a pool.
    #[arg(long, env = "FLOWHOST_SIMULATE_WORKERS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub workers: u16,
    /// How a free ComfyUI worker picks its next job: `affinity` (the oldest job of the model
    /// set it has loaded — no LoRA/model switch — unless a job has waited past
    /// --affinity-wait-bound) or `fifo` (oldest first).
    #[arg(long, env = "FLOWHOST_DISPATCH", default_value = "affinity")]
    pub dispatch: crate::jobs::DispatchPolicy,
    /// Seconds a job may be passed over by affinity dispatch; after that the next free
    /// worker takes it whatever it has loaded.
    #[arg(long, env = "FLOWHOST_AFFINITY_WAIT_BOUND", default_value_t = 30.0, value_parser = parse_seconds)]
    pub affinity_wait_bound: f64,
    /// Extra argument for ComfyUI's main.py (repeatable).
    #[arg(long = "comfyui-arg", allow_hyphen_values = true)]
    pub comfyui_args: Vec<String>,
    /// Named bundle of ComfyUI speed options for --comfyui-dir: default (none),
    /// highvram, fp8 (changes images), fast (fp8 + highvram + autotune), speed (a step
    /// cache on every job: 1.83x), speed-compiled (fp8 + torch.compile: 1.33x; 1.93x with
    /// --speed-step-cache 0.3).
    /// See docs/operations.md.
    #[arg(long, requires = "comfyui_dir", conflicts_with_all = ["comfyui_url", "simulate"])]
    pub comfyui_profile: Option<flowhost_comfy::LaunchProfile>,
    /// With `--comfyui-profile speed`: EasyCache's reuse threshold (0 to 3; 0 turns the step
    /// cache off; default 0.25). With `speed-compiled`: adds a step cache at this threshold
    /// (LazyCache, outside the compiled model; default none). Higher skips more sampling
    /// steps and changes the image more.
    #[arg(long, requires = "comfyui_profile", value_parser = parse_step_cache)]
    pub speed_step_cache: Option<f64>,
    /// With `--comfyui-profile speed` or `speed-compiled`: the routes whose jobs get the speed
    /// graph transform (comma-separated, e.g. /flux-dev); unset: every route and /api/v2
    /// prompt. speed-compiled's launch options (fp8 weights) still apply to the whole ComfyUI.
    #[arg(long, requires = "comfyui_profile", value_delimiter = ',')]
    pub speed_routes: Vec<String>,
    /// ComfyUI's --preview-method for latent previews while sampling
    /// (none, auto, latent2rgb, taesd); unset leaves ComfyUI's default (none).
    #[arg(long, requires = "comfyui_dir", conflicts_with_all = ["comfyui_url", "simulate"])]
    pub comfyui_preview_method: Option<flowhost_comfy::PreviewMethod>,
    /// Python interpreter for --comfyui-dir.
    #[arg(long, env = "FLOWHOST_COMFYUI_PYTHON", default_value = "python3")]
    pub comfyui_python: String,
    /// Seconds ComfyUI may take to answer /system_stats after (re)start.
    #[arg(long, default_value_t = 600)]
    pub comfyui_startup_timeout: u64,
    /// Run against the embedded ComfyUI test double (no GPU needed; outputs are
    /// synthetic). One of --comfyui-url, --comfyui-dir or --simulate is required.
    /// Only in builds with the `simulate` cargo feature (the default; release and
    /// Modal builds leave it out).
    #[arg(long, env = "FLOWHOST_SIMULATE")]
    pub simulate: bool,
    /// Prompts in each ComfyUI worker at once; further jobs wait in flowhost's queue.
    /// ComfyUI runs one prompt at a time, so with a pool and affinity dispatch 1 keeps the
    /// choice of the next job in flowhost (where it can follow the loaded models).
    #[arg(long, env = "FLOWHOST_MAX_IN_FLIGHT", default_value_t = 5)]
    pub max_in_flight: usize,
    /// Jobs that may wait in the queue beyond the running ones; beyond that 503 (typed
    /// routes) / 429 (/api/v2) with a Retry-After estimated from recent job durations.
    #[arg(long, env = "FLOWHOST_QUEUE_DEPTH", default_value_t = 100)]
    pub queue_depth: usize,
    /// Durable state: the job database (SQLite) and the blob store of outputs and inputs.
    #[arg(long, env = "FLOWHOST_STATE_DIR", default_value = ".flowhost/state")]
    pub state_dir: PathBuf,
    /// How long jobs and their assets are kept, in hours.
    #[arg(long, env = "FLOWHOST_RETENTION_HOURS", default_value_t = 24.0)]
    pub retention_hours: f64,
    /// ComfyUI's input directory as seen from here (with --comfyui-url), so each job's
    /// uploads can be deleted when it ends. Supervised and simulated modes know it.
    /// Repeatable: the n-th applies to the n-th --comfyui-url.
    #[arg(long, env = "FLOWHOST_COMFYUI_INPUT_DIR", value_delimiter = ',')]
    pub comfyui_input_dir: Vec<PathBuf>,
    /// ComfyUI's output directory as seen from here (with --comfyui-url), so each job's
    /// output files can be deleted when it ends (flowhost keeps the bytes).
    /// Repeatable: the n-th applies to the n-th --comfyui-url.
    #[arg(long, env = "FLOWHOST_COMFYUI_OUTPUT_DIR", value_delimiter = ',')]
    pub comfyui_output_dir: Vec<PathBuf>,
    /// Per-job deadline in seconds; then the prompt is interrupted and 504 returned.
    #[arg(long, env = "FLOWHOST_JOB_TIMEOUT", default_value_t = 120)]
    pub job_timeout: u64,
    /// JPEG quality for image outputs (1-100).
    #[arg(long, default_value_t = 90, value_parser = clap::value_parser!(u8).range(1..=100))]
    pub jpeg_quality: u8,
    /// How JPEG outputs leave ComfyUI: `auto` takes raw pixels over the websocket from
    /// flowhost's own output node when ComfyUI has it (no PNG, no disk, no /view; installed
    /// automatically with --comfyui-dir), `files` always uses SaveImage's PNG files.
    #[arg(long, value_enum, env = "FLOWHOST_OUTPUT_TRANSPORT", default_value = "auto")]
    pub output_transport: OutputTransport,
    /// Log format.
    #[arg(long, value_enum, env = "FLOWHOST_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,
    /// Allow listening on a non-loopback address without API keys.
    #[arg(long)]
    pub insecure_no_auth: bool,
    /// Memory limit per plugin call, MiB.
    #[arg(long, default_value_t = 64)]
    pub plugin_memory_mb: usize,
    /// Wall-time limit per plugin call, milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub plugin_timeout_ms: u64,
    /// Most concurrent calls of one plugin (503 + Retry-After beyond).
    #[arg(long, default_value_t = crate::plugins::call_slots::DEFAULT_PER_PLUGIN)]
    pub plugin_concurrency: usize,
    /// Most concurrent plugin calls in all (kept below the instance pool's 256 slots).
    #[arg(long, default_value_t = crate::plugins::call_slots::DEFAULT_TOTAL)]
    pub plugin_concurrency_total: usize,
    /// Host memory all plugin calls in flight may hold together, MiB: their instances' memory
    /// plus what the host copies out of them. A call that would pass it gets 503 plugin_busy.
    #[arg(long, env = "FLOWHOST_PLUGIN_MEMORY_BUDGET_MB", default_value_t = crate::plugins::budget::DEFAULT_BYTES >> 20)]
    pub plugin_memory_budget_mb: usize,
    /// Largest request body, bytes.
    #[arg(long, default_value_t = 16 << 20)]
    pub max_body_bytes: usize,
    /// Seconds a client has to send a complete request head (request line and headers) once it
    /// has started one; the connection is closed after.
    #[arg(long, default_value_t = 10)]
    pub header_read_timeout: u64,
    /// Seconds a client has to send the whole request body (408 after).
    #[arg(long, default_value_t = 30)]
    pub body_read_timeout: u64,
    /// Most concurrent asset transfers (`/api/v2/assets` uploads and streamed downloads),
    /// each holding a bounded buffer (503 + Retry-After beyond).
    #[arg(long, default_value_t = crate::http::v2::transfers::DEFAULT_MAX_TRANSFERS)]
    pub max_transfers: usize,
    /// Most concurrent `/api/v2/jobs/{id}/events` streams in all (429 `too_many_streams`
    /// beyond; a plain GET of the job stays available).
    #[arg(long, default_value_t = crate::http::v2::events::DEFAULT_MAX_STREAMS)]
    pub max_event_streams: usize,
    /// Most concurrent event streams of one job.
    #[arg(long, default_value_t = crate::http::v2::events::DEFAULT_MAX_STREAMS_PER_JOB)]
    pub max_event_streams_per_job: usize,
    /// Seconds between plugin-folder rescans (network volumes send no events).
    #[arg(long, default_value_t = 2)]
    pub rescan_interval: u64,
    /// Warm-up before ready: `auto` runs one cheap job per route whose plugin declares a
    /// warm-up request (weights on the GPU before traffic; again after a ComfyUI restart);
    /// `off` is ready as soon as ComfyUI answers. See docs/operations.md.
    #[arg(long, value_enum, env = "FLOWHOST_WARM_UP", default_value = "auto")]
    pub warm_up: crate::warm_up::WarmUpMode,
    /// ROUTE=FILE.json: warm ROUTE with this request body instead of the plugin's own
    /// warm-up request (also for a plugin that declares none). Repeatable.
    #[arg(long = "warm-up-request", value_name = "ROUTE=FILE.json")]
    pub warm_up_requests: Vec<crate::warm_up::WarmUpOverride>,
    /// Webhooks (signing secrets, operator subscriptions, SSRF allow-list).
    #[command(flatten)]
    pub webhooks: crate::webhooks::WebhookArgs,
    /// Shared state for many instances (PostgreSQL job store, S3 blob store).
    #[command(flatten)]
    pub backing: crate::app::backing::BackingArgs,
    /// Files requests name by reference (the model cache, fetch limits and allow-list).
    #[command(flatten)]
    pub fetch: crate::models::cache::ModelCacheArgs,
}

/// A non-negative, finite number of seconds (at most a year).
fn parse_step_cache(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && (0.0..=flowhost_comfy::speed::STEP_CACHE_MAX).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} is not a step-cache threshold between 0 and {}", flowhost_comfy::speed::STEP_CACHE_MAX)),
    }
}

fn parse_seconds(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && (0.0..=31_536_000.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} is not a number of seconds between 0 and 31536000")),
    }
}

#[derive(Debug, Clone, Args)]
pub struct CheckPluginArgs {
    /// The component to check.
    pub file: PathBuf,
    /// A request body (JSON text, or @FILE) to build a job for.
    #[arg(long)]
    pub request: Option<String>,
    /// Model volume the plugin may list (default: the files the manifest
    /// declares are taken as present, and the output says so).
    #[arg(long)]
    pub models: Option<PathBuf>,
    /// Memory limit per plugin call, MiB.
    #[arg(long, default_value_t = 64)]
    pub plugin_memory_mb: usize,
    /// Wall-time limit per plugin call, milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub plugin_timeout_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve(args: &[&str]) -> Result<ServeArgs, clap::Error> {
        let argv = ["flowhost", "serve"].into_iter().chain(args.iter().copied());
        match Cli::try_parse_from(argv)?.command {
            Command::Serve(args) => Ok(args),
            _ => unreachable!("serve parses as serve"),
        }
    }

    #[test]
    fn a_launch_profile_is_parsed_by_name() {
        let args = serve(&["--comfyui-dir", "/opt/ComfyUI", "--comfyui-profile", "fp8", "--comfyui-preview-method", "taesd"]).unwrap();
        assert_eq!(args.comfyui_profile, Some(flowhost_comfy::LaunchProfile::Fp8));
        assert_eq!(args.comfyui_preview_method, Some(flowhost_comfy::PreviewMethod::Taesd));
        assert_eq!(serve(&["--comfyui-dir", "/opt/ComfyUI"]).unwrap().comfyui_profile, None, "opt-in");
    }

    #[test]
    fn a_pool_is_several_urls_or_gpus_and_dispatch_is_named() {
        let args = serve(&["--comfyui-url", "http://127.0.0.1:8188", "--comfyui-url", "http://127.0.0.1:8189", "--dispatch", "fifo"]).unwrap();
        assert_eq!(args.comfyui_url.len(), 2);
        assert_eq!(args.dispatch, crate::jobs::DispatchPolicy::Fifo);
        let args = serve(&["--comfyui-dir", "/opt/ComfyUI", "--gpus", "0,1,2,3"]).unwrap();
        assert_eq!(args.gpus, ["0", "1", "2", "3"]);
        assert_eq!((args.dispatch, args.affinity_wait_bound), (crate::jobs::DispatchPolicy::Affinity, 30.0), "defaults");
        let err = serve(&["--simulate", "--dispatch", "random"]).unwrap_err().to_string();
        assert!(err.contains("fifo or affinity"), "{err}");
        assert_eq!(serve(&["--gpus", "0,1"]).unwrap_err().kind(), clap::error::ErrorKind::MissingRequiredArgument, "GPUs need a ComfyUI to spawn");
        for bad in ["-1", "NaN", "inf", "soon"] {
            let arg = format!("--affinity-wait-bound={bad}");
            let err = serve(&["--simulate", &arg]).unwrap_err().to_string();
            assert!(err.contains("number of seconds"), "{bad}: {err}");
        }
    }

    #[test]
    fn an_unknown_profile_is_refused_naming_the_known_ones() {
        let err = serve(&["--comfyui-dir", "/opt/ComfyUI", "--comfyui-profile", "turbo"]).unwrap_err().to_string();
        assert!(err.contains("turbo") && err.contains("default, highvram, fp8, fast, speed"), "{err}");
    }

    #[test]
    fn the_speed_profile_takes_a_step_cache_threshold_and_routes() {
        let args = serve(&["--comfyui-dir", "/opt/ComfyUI", "--comfyui-profile", "speed", "--speed-step-cache", "0.3", "--speed-routes", "/flux-dev,/flux-lora"]).unwrap();
        assert_eq!(args.comfyui_profile, Some(flowhost_comfy::LaunchProfile::Speed));
        assert_eq!(args.speed_step_cache, Some(0.3));
        assert_eq!(args.speed_routes, ["/flux-dev", "/flux-lora"]);
        for bad in ["-0.1", "3.5", "NaN", "lots"] {
            let arg = format!("--speed-step-cache={bad}");
            let err = serve(&["--comfyui-dir", "/opt/ComfyUI", "--comfyui-profile", "speed", &arg]).unwrap_err().to_string();
            assert!(err.contains("between 0 and 3"), "{bad}: {err}");
        }
        let err = serve(&["--comfyui-dir", "/opt/ComfyUI", "--speed-step-cache", "0.2"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument, "{err}");
    }

    #[test]
    fn a_profile_without_a_supervised_comfyui_is_refused() {
        // With --comfyui-url flowhost does not start ComfyUI, so a profile could not apply.
        let err = serve(&["--comfyui-url", "http://127.0.0.1:8188", "--comfyui-profile", "fp8"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ArgumentConflict, "{err}");
        let err = serve(&["--comfyui-preview-method", "taesd"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument, "{err}");
    }
}
