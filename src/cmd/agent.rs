//! `zmesh agent`: the per-node agent (cluster state -> certificates, redirection, proxy).

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use zmesh::agent::kube_source::{watch_kubernetes, RetryPolicy};
use zmesh::agent::manifests::watch_dir;
use zmesh::agent::run::{run, AgentConfig, RedirectSettings};
use zmesh_identity::TrustDomain;
use zmesh_proxy::Mode;

#[derive(clap::Args, Debug)]
pub struct AgentArgs {
    /// This node's name (in Kubernetes: spec.nodeName, from the downward API).
    #[arg(long, env = "NODE_NAME")]
    node: String,
    /// Read namespaces and pods from a directory of Kubernetes YAML manifests (watched).
    #[arg(
        long,
        value_name = "DIR",
        conflicts_with = "kubernetes",
        required_unless_present = "kubernetes"
    )]
    manifests: Option<PathBuf>,
    /// Watch namespaces and pods in Kubernetes (in-cluster config or KUBECONFIG).
    #[arg(long)]
    kubernetes: bool,
    /// The CA's address, HOST:PORT (Istio's CA API, default port 15012).
    #[arg(long, value_name = "HOST:PORT")]
    ca: String,
    /// Directory with this node's credential from `zmesh ca join` (node.pem, node.key,
    /// ca-bundle.pem).
    #[arg(long, value_name = "DIR", default_value = "/var/lib/zmesh/node")]
    credentials: PathBuf,
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Address on this node that pods reach (their gateway); the outbound listener is here.
    #[arg(long, value_name = "IP")]
    proxy_ip: Ipv4Addr,
    /// Plaintext to enrolled pods from outside the mesh: permissive passes it, strict drops it.
    #[arg(long, value_enum, default_value = "permissive")]
    mode: ModeArg,
    /// The admin API's unix socket (`zmesh certs status`, `zmesh observe`).
    #[arg(long, value_name = "PATH", default_value = "/run/zmesh/agent.sock")]
    admin_socket: PathBuf,
    /// Lifetime asked of the CA for workload certificates (renewed at half of it).
    #[arg(long, default_value = "24h", value_parser = super::parse_duration)]
    cert_lifetime: Duration,
    /// cgroup v2 directory holding this node's pods: the eBPF programs attach there.
    /// Without it the agent runs the proxy without transparent capture.
    #[arg(long, value_name = "DIR")]
    redirect_cgroup: Option<PathBuf>,
    /// bpffs directory for this node's pinned maps and links.
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/zmesh")]
    bpf_pin_dir: PathBuf,
    /// Interfaces whose ingress traffic to enrolled pods is steered to the proxy
    /// (the node's uplink and the pods' host-side veths). Repeatable. Default: every
    /// non-loopback interface of the node, followed as pods come and go.
    #[arg(long = "ingress-interface", value_name = "IFACE")]
    ingress_interfaces: Vec<String>,
    /// Print the effective configuration and exit.
    #[arg(long)]
    dry_run: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum ModeArg {
    Permissive,
    Strict,
}

pub async fn run_agent(args: AgentArgs) -> anyhow::Result<ExitCode> {
    let trust_domain = TrustDomain::new(&args.trust_domain)
        .with_context(|| format!("invalid trust domain {:?}", args.trust_domain))?;
    let config = AgentConfig {
        node: args.node.clone(),
        trust_domain,
        ca_addr: args.ca.clone(),
        credentials_dir: args.credentials.clone(),
        proxy_ip: args.proxy_ip,
        mode: match args.mode {
            ModeArg::Permissive => Mode::Permissive,
            ModeArg::Strict => Mode::Strict,
        },
        admin_socket: args.admin_socket.clone(),
        cert_validity: args.cert_lifetime,
        redirect: args.redirect_cgroup.clone().map(|cgroup| RedirectSettings {
            cgroup,
            pin_dir: args.bpf_pin_dir.clone(),
            ingress_interfaces: args.ingress_interfaces.clone(),
        }),
    };
    if args.dry_run {
        println!("{config:#?}");
        return Ok(ExitCode::SUCCESS);
    }
    let cluster = match (&args.manifests, args.kubernetes) {
        (Some(dir), _) => watch_dir(dir.clone(), Duration::from_millis(200)).0,
        (None, _) => {
            let client = kube::Client::try_default()
                .await
                .context("cannot configure the Kubernetes client")?;
            tracing::info!("waiting for the first complete listing of namespaces and pods");
            watch_kubernetes(client, args.node.clone(), RetryPolicy::default()).await
        }
    };
    run(config, cluster, shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

/// SIGTERM (Kubernetes, systemd) or Ctrl-C.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
