//! The `flowhost` command line. (Minimal wiring of `models pull` in the `modal` branch; the lead
//! owns this file and merges the full CLI.)

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "flowhost",
    version,
    about = "Serve ComfyUI workflows as HTTP endpoints"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Model files on the models volume.
    Models {
        #[command(subcommand)]
        command: ModelsCommand,
    },
}

#[derive(Subcommand)]
enum ModelsCommand {
    /// Download what a manifest lists from Hugging Face.
    Pull(flowhost::models::pull::PullArgs),
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Models {
            command: ModelsCommand::Pull(args),
        } => flowhost::models::pull::run_pull(args).await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
