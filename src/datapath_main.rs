//! `zmesh-datapath`: the same data path process as `zmesh datapath`, as a binary that holds
//! only the proxy (no agent, CA or CLI), so that the pages of code it maps stay few.

use std::path::PathBuf;
use std::process::ExitCode;

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
    let result: anyhow::Result<()> = runtime.block_on(async {
        zmesh_proxy::runtime::tune_malloc();
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM"),
                _ = tokio::signal::ctrl_c() => tracing::info!("interrupt"),
            }
        };
        zmesh_agent::datapath::server::serve(&args.socket, shutdown).await?;
        Ok(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
