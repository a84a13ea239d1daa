//! `zmesh datapath`: the node proxy in a process of its own, configured by the node agent
//! (`zmesh agent --datapath-socket`), so that the connections it carries outlive the agent.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

#[derive(clap::Args, Debug)]
pub struct DatapathArgs {
    /// The unix socket the node agent connects to (created mode 0600; it carries the
    /// workloads' private keys).
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/var/run/zmesh/datapath.sock"
    )]
    pub socket: PathBuf,
    /// Print the configuration and exit.
    #[arg(long)]
    pub dry_run: bool,
}

pub async fn run(args: DatapathArgs) -> anyhow::Result<ExitCode> {
    if args.dry_run {
        println!("{args:#?}");
        return Ok(ExitCode::SUCCESS);
    }
    zmesh_proxy::runtime::tune_malloc();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM"),
            _ = tokio::signal::ctrl_c() => tracing::info!("interrupt"),
        }
    };
    zmesh_agent::datapath::server::serve(&args.socket, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}
