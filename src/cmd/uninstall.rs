//! `zmesh uninstall`: removes everything the agent installed on this node: its eBPF
//! redirection, the in-pod captures it installed for ztunnel (`--data-plane ztunnel`) and,
//! given the directories, the CNI plugin.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

#[derive(clap::Args)]
pub struct UninstallArgs {
    /// The agent's bpffs pin directory (its --bpf-pin-dir).
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/zmesh")]
    bpf_pin_dir: PathBuf,
    /// The agent's --cni-bin-dir: the CNI plugin's binary is removed from it.
    #[arg(long, value_name = "DIR", requires = "cni_conf_dir")]
    cni_bin_dir: Option<PathBuf>,
    /// The agent's --cni-conf-dir: the plugin's entry is removed from every CNI
    /// configuration there (the rest of each file is kept).
    #[arg(long, value_name = "DIR", requires = "cni_bin_dir")]
    cni_conf_dir: Option<PathBuf>,
    /// The node's /proc (the agent's --host-proc): the in-pod captures are looked for in
    /// the network namespace of every process there...
    #[arg(long, value_name = "DIR", default_value = "/proc")]
    host_proc: PathBuf,
    /// ...and of every named network namespace here.
    #[arg(long, value_name = "DIR", default_value = "/run/netns")]
    netns_dir: PathBuf,
}

/// Detaches every program and removes every map, pin, policy rule and route of the
/// installation, every in-pod capture, and the CNI plugin if its directories are given. Run it in the network
/// namespace the agent ran in, after stopping the agent.
pub fn run(args: UninstallArgs) -> anyhow::Result<ExitCode> {
    // The CNI plugin first: once redirection is gone, the plugin would hold pods' starts
    // for an agent that no longer enrolls them.
    if let (Some(bin_dir), Some(conf_dir)) = (&args.cni_bin_dir, &args.cni_conf_dir) {
        let removed = zmesh_agent::cni_install::uninstall(bin_dir, conf_dir)
            .context("removing the CNI plugin")?;
        for path in &removed.configs {
            println!("removed the zmesh CNI plugin from {}", path.display());
        }
        if removed.binary {
            println!(
                "removed {}",
                bin_dir
                    .join(zmesh_agent::cni_install::PLUGIN_TYPE)
                    .display()
            );
        }
    }
    let captures = zmesh_agent::inpod::remove_everywhere(&args.host_proc, &args.netns_dir)
        .context("removing the in-pod captures installed for ztunnel")?;
    for netns in &captures {
        println!(
            "removed the in-pod capture (nftables table {}) from {netns}",
            zmesh_agent::inpod::TABLE
        );
    }
    match zmesh_redirect::Redirector::uninstall(&args.bpf_pin_dir) {
        Ok(()) => println!(
            "removed zmesh's eBPF programs, maps, pins, rule and route ({})",
            args.bpf_pin_dir.display()
        ),
        // An agent with --data-plane ztunnel installs no eBPF: the captures were all.
        Err(zmesh_redirect::RedirectError::NotInstalled(dir)) if !captures.is_empty() => {
            println!("no eBPF installation at {}", dir.display())
        }
        Err(e) => return Err(e.into()),
    }
    Ok(ExitCode::SUCCESS)
}
