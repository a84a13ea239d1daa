//! `zmesh uninstall`: removes everything the agent's eBPF redirection installed on this node.

use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct UninstallArgs {
    /// The agent's bpffs pin directory (its --bpf-pin-dir).
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/zmesh")]
    bpf_pin_dir: PathBuf,
}

/// Detaches every program and removes every map, pin, policy rule and route of the
/// installation. Run it in the network namespace the agent ran in, after stopping the agent.
pub fn run(args: UninstallArgs) -> anyhow::Result<ExitCode> {
    zmesh_redirect::Redirector::uninstall(&args.bpf_pin_dir)?;
    println!(
        "removed zmesh's eBPF programs, maps, pins, rule and route ({})",
        args.bpf_pin_dir.display()
    );
    Ok(ExitCode::SUCCESS)
}
