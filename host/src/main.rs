//! The `flowhost` binary.

use std::process::ExitCode;

use clap::Parser;
use flowhost::app::cli::{Cli, Command, LogFormat, ModelsCommand};

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,wasmtime=warn,cranelift=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            init_tracing(args.log_format);
            let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(err) => {
                    tracing::error!(error = %err, "cannot start the async runtime");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(flowhost::app::server::run(args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    tracing::error!(error = %format!("{err:#}"), "flowhost stopped");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Models(ModelsCommand::Status(args)) => {
            init_tracing(LogFormat::Text);
            match flowhost::app::models_command::status(&args) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(1),
                Err(err) => {
                    tracing::error!(error = %format!("{err:#}"), "models status failed");
                    ExitCode::from(2)
                }
            }
        }
        Command::Models(ModelsCommand::Pull(args)) => {
            init_tracing(LogFormat::Text);
            let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(err) => {
                    tracing::error!(error = %err, "cannot start the async runtime");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(flowhost::models::pull::run_pull(args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    tracing::error!("{err:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::New(args) => {
            init_tracing(LogFormat::Text);
            let created = std::env::current_dir()
                .map_err(anyhow::Error::from)
                .and_then(|cwd| flowhost::app::new_plugin::create(&args, &cwd));
            match created {
                Ok(created) => {
                    let dir = created.dir.display();
                    let text = format!(
                        "created {dir} (route {route}; depends on flowhost-sdk at {sdk})\n\
                         next:\n  cd {dir}\n  cargo test                                        # native unit tests (FakeHost)\n  \
                         cargo build --release --target wasm32-wasip2      # → target/wasm32-wasip2/release/{artifact}\n  \
                         cargo component build --release                   # or: → target/wasm32-wasip1/release/{artifact}\n",
                        route = created.route,
                        sdk = created.sdk_path.display(),
                        artifact = created.artifact,
                    );
                    use std::io::Write as _;
                    let _ = std::io::stdout().lock().write_all(text.as_bytes());
                    ExitCode::SUCCESS
                }
                Err(err) => {
                    tracing::error!("{err:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::CheckPlugin(args) => {
            init_tracing(LogFormat::Text);
            let models = args.models.clone().map(|root| {
                let lister: std::sync::Arc<dyn flowhost::plugins::ModelLister> =
                    std::sync::Arc::new(flowhost::app::server::VolumeLister(std::sync::Arc::new(
                        flowhost::models::ModelVolume::new(root),
                    )));
                lister
            });
            match flowhost::app::check_plugin::run(&args, models) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(1),
                Err(err) => {
                    tracing::error!(error = %format!("{err:#}"), "check-plugin failed");
                    ExitCode::from(2)
                }
            }
        }
    }
}
