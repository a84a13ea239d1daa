//! `zmesh-datapath`: the same data path process as `zmesh datapath`, as a binary that holds
//! only the proxy (no agent, CA or CLI), so that the pages of code it maps stay few.
//! `zmesh-datapath proxy` is `zmesh proxy --cert-dir` in that same small binary.

/// The few CLI modules this binary shares with `zmesh` (files in src/cmd/).
mod cmd {
    mod args;
    pub mod static_proxy;
    pub mod tuning;
    pub use args::{parse_duration, ModeArg};
}

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;

#[derive(Parser, Debug)]
#[command(name = "zmesh-datapath", version = env!("ZMESH_VERSION_LINE"))]
struct Args {
    /// The unix socket the node agent connects to (created mode 0600; it carries the
    /// workloads' private keys).
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/var/run/zmesh/datapath.sock"
    )]
    socket: PathBuf,
    /// Log filter (tracing's EnvFilter syntax).
    #[arg(long, env = "ZMESH_LOG", default_value = "info")]
    log: String,
    /// Threads serving traffic.
    #[arg(long, env = "ZMESH_WORKER_THREADS", value_name = "N")]
    worker_threads: Option<usize>,
    /// Print the configuration and exit.
    #[arg(long)]
    dry_run: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Serve a static workload table with certificates from a directory, as
    /// `zmesh proxy --cert-dir` does (benchmarks, tests).
    Proxy(StaticProxy),
}

#[derive(clap::Args, Debug)]
struct StaticProxy {
    #[command(flatten)]
    table: cmd::static_proxy::StaticProxyArgs,
    /// Directory with roots.pem and <namespace>/<service-account>.pem + .key.
    #[arg(long, value_name = "DIR")]
    cert_dir: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.dry_run {
        println!("{args:#?}");
        return ExitCode::SUCCESS;
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&args.log))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let threads = args
        .worker_threads
        .unwrap_or(zmesh_proxy::runtime::DEFAULT_WORKER_THREADS);
    let runtime = match zmesh_proxy::runtime::build(threads) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        zmesh_proxy::runtime::tune_malloc();
        match args.command {
            None => serve_agent_socket(&args.socket).await,
            Some(Command::Proxy(proxy)) => serve_static(proxy).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The data path process proper: configured by the node agent over `socket`.
async fn serve_agent_socket(socket: &std::path::Path) -> anyhow::Result<ExitCode> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM"),
            _ = tokio::signal::ctrl_c() => tracing::info!("interrupt"),
        }
    };
    zmesh_agent::datapath::server::serve(socket, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}

async fn serve_static(proxy: StaticProxy) -> anyhow::Result<ExitCode> {
    let table = proxy.table.load_table()?;
    let credentials =
        zmesh_proxy::StaticCredentials::load_dir(&proxy.cert_dir, table.trust_domain())
            .with_context(|| format!("loading certificates from {}", proxy.cert_dir.display()))?;
    cmd::static_proxy::serve(proxy.table, table, Arc::new(credentials)).await
}
