//! The `zmesh` binary: one CLI for the node agent, the CA, the proxy and operator tools.

mod agent;
mod cmd;

use clap::{Parser, Subcommand};

/// zmesh: sidecar-free mutual TLS with SPIFFE identities for Kubernetes pods.
#[derive(Parser)]
#[command(name = "zmesh", version, about, long_about = None)]
struct Cli {
    /// Log filter (tracing's env-filter syntax), e.g. "info" or "zmesh_proxy=debug".
    #[arg(long, global = true, env = "ZMESH_LOG", default_value = "info")]
    log: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build a local cluster in network namespaces and run the mesh on it (the demo).
    Demo(cmd::demo::DemoArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&cli.log))
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Demo(args) => cmd::demo::run(args).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
