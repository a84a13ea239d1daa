//! `zmesh agent`: the per-node agent (cluster state -> certificates, redirection, proxy).

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use zmesh_agent::ca::CaTokenCredential;
use zmesh_agent::cni_install::{
    CniInstall, PluginEntry, AGENT_TIMEOUT_SECONDS, PLUGIN_TYPE as CNI_PLUGIN_TYPE,
};
use zmesh_agent::discovery::NetnsRegistry;
use zmesh_agent::{run, AgentConfig, DataPlane, IdentitySource, RedirectSettings};
use zmesh_cluster::kube_source::{watch_kubernetes, RetryPolicy};
use zmesh_cluster::manifests::watch_dir;
use zmesh_cni::config::FailurePolicy;
use zmesh_identity::TrustDomain;

use super::ModeArg;

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
    /// With --kubernetes: the namespace of the Lease the agent reports its status in
    /// (`zmesh status`); default: the agent's own (its ServiceAccount's).
    #[arg(long, value_name = "NS", requires = "kubernetes")]
    status_namespace: Option<String>,
    /// The CA's address, HOST:PORT (Istio's CA API, default port 15012). Needed unless
    /// certificates come from SPIRE or ztunnel carries the traffic.
    #[arg(long, value_name = "HOST:PORT")]
    ca: Option<String>,
    /// Who issues workload certificates: the zmesh CA (--ca), or a SPIRE agent
    /// (--spire-socket; SPIRE needs a registration entry per workload identity).
    #[arg(long, value_enum, default_value = "zmesh")]
    identity_source: IdentitySourceArg,
    /// The SPIRE agent's Workload API socket.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/run/spire/sockets/agent.sock"
    )]
    spire_socket: PathBuf,
    /// Who carries the traffic: zmesh's proxy and eBPF redirection, or a stock Istio
    /// ztunnel that this agent feeds the node's pods over ZDS (--zds-socket).
    #[arg(long, value_enum, default_value = "zmesh")]
    data_plane: DataPlaneArg,
    /// Where to serve ZDS for ztunnel (ztunnel's default path; mode 0600).
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/var/run/ztunnel/ztunnel.sock"
    )]
    zds_socket: PathBuf,
    /// Run zmesh's proxy in the data path process serving PATH (`zmesh datapath
    /// --socket PATH`) instead of on a thread of the agent: the connections it carries
    /// then outlive the agent (a crash, an OOM kill, an upgrade), and a new agent takes
    /// the data path over.
    #[arg(long, value_name = "PATH")]
    datapath_socket: Option<PathBuf>,
    /// Directory with this node's credential from `zmesh ca join` (node.pem, node.key,
    /// ca-bundle.pem).
    #[arg(long, value_name = "DIR", default_value = "/var/lib/zmesh/node")]
    credentials: PathBuf,
    /// Authenticate to the CA with this projected ServiceAccount token (re-read for every
    /// request, as the kubelet rotates it) instead of a node credential from `zmesh ca join`.
    /// The CA must run with `--bearer kubernetes`.
    #[arg(
        long,
        value_name = "PATH",
        requires = "ca_bundle",
        conflicts_with = "credentials"
    )]
    ca_token_file: Option<PathBuf>,
    /// PEM file with the CA's root(s) (`zmesh ca bundle`; in Kubernetes the zmesh-ca-roots
    /// ConfigMap), for --ca-token-file.
    #[arg(long, value_name = "FILE", requires = "ca_token_file")]
    ca_bundle: Option<PathBuf>,
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Address on this node that pods reach (their gateway); the outbound listener is here.
    /// Needed with the zmesh data plane.
    #[arg(long, value_name = "IP")]
    proxy_ip: Option<Ipv4Addr>,
    /// IPv6 address on this node that pods reach (dual-stack pods): with it the agent steers
    /// IPv6 as well, inbound and outbound, and the proxy listens on both families. Without
    /// it IPv6 is not steered, and strict mode drops IPv6 to enrolled pods.
    #[arg(long, value_name = "IPV6", requires = "proxy_ip")]
    proxy_ip6: Option<Ipv6Addr>,
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
    /// (the node's uplink and the pods' host-side veths). Repeatable; a value ending in
    /// `*` selects by prefix (`veth*`), followed as pods come and go. Default: every
    /// non-loopback interface of the node, followed likewise.
    #[arg(long = "ingress-interface", value_name = "IFACE")]
    ingress_interfaces: Vec<String>,
    /// The node's /proc, where pods' network namespaces are found by their cgroups:
    /// `/proc` when the agent runs with hostPID, else the host's /proc mounted into the
    /// agent's container (e.g. at /host/proc).
    #[arg(long, value_name = "DIR", default_value = "/proc")]
    host_proc: PathBuf,
    /// Where to keep the list of namespaces that enroll pods (JSON), for the zmesh CNI
    /// plugin to refuse such pods while the agent is down. `none`: not written.
    #[arg(
        long,
        value_name = "PATH|none",
        default_value = "/var/run/zmesh/enrolled-namespaces.json"
    )]
    cni_state_file: PathBuf,
    /// Where the zmesh CNI plugin asks to enroll a starting pod (a unix socket, mode 0600);
    /// the pod's start waits until it is enrolled. `none`: not served.
    #[arg(long, value_name = "PATH|none", default_value = zmesh_cni::protocol::DEFAULT_AGENT_SOCKET)]
    cni_socket: PathBuf,
    /// Install the zmesh CNI plugin's binary here and keep it installed: the runtime's
    /// plugin directory (the host's /opt/cni/bin, mounted into the agent's container).
    /// With --cni-conf-dir; neither: the plugin is not installed by the agent.
    #[arg(long, value_name = "DIR", requires = "cni_conf_dir")]
    cni_bin_dir: Option<PathBuf>,
    /// Add the zmesh CNI plugin at the end of the node's primary CNI configuration in this
    /// directory (the host's /etc/cni/net.d), and put it back when the network plugin
    /// rewrites it. With --cni-bin-dir.
    #[arg(long, value_name = "DIR", requires = "cni_bin_dir")]
    cni_conf_dir: Option<PathBuf>,
    /// The `zmesh-cni` binary to install. Default: `zmesh-cni` next to this executable.
    #[arg(long, value_name = "PATH")]
    cni_plugin_binary: Option<PathBuf>,
    /// What the installed CNI plugin does when this agent cannot be asked: `closed` holds
    /// pods of enrolled namespaces (and every pod if it finds no state file), `open`
    /// starts them unprotected.
    #[arg(long, value_enum, default_value = "closed")]
    cni_failure_policy: FailurePolicyArg,
    #[command(flatten)]
    tuning: super::tuning::ProxyTuningArgs,
    /// How tc ingress programs attach: `tcx` (Linux 6.6+), `netlink` (a cls_bpf filter
    /// under the interface's clsact qdisc, any kernel), or `auto` (TCX where the kernel
    /// has it).
    #[arg(
        long,
        env = "ZMESH_TC_ATTACH",
        value_name = "MODE",
        default_value = "auto"
    )]
    tc_attach: zmesh_redirect::TcAttach,
    /// Print the effective configuration and exit.
    #[arg(long)]
    dry_run: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum IdentitySourceArg {
    /// The zmesh CA.
    Zmesh,
    /// A SPIRE agent's Workload API.
    Spire,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum FailurePolicyArg {
    Closed,
    Open,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum DataPlaneArg {
    /// zmesh's node proxy and eBPF redirection.
    Zmesh,
    /// A stock Istio ztunnel, over ZDS.
    Ztunnel,
}

pub async fn run_agent(
    args: AgentArgs,
    proxy_threads: usize,
    log: zmesh_agent::config_api::LogControl,
) -> anyhow::Result<ExitCode> {
    let trust_domain = TrustDomain::new(&args.trust_domain)
        .with_context(|| format!("invalid trust domain {:?}", args.trust_domain))?;
    let ztunnel = args.data_plane == DataPlaneArg::Ztunnel;
    let spire = args.identity_source == IdentitySourceArg::Spire;
    if ztunnel && args.datapath_socket.is_some() {
        anyhow::bail!(
            "--datapath-socket runs zmesh's own proxy in a process of its own; it does not \
             apply with --data-plane ztunnel"
        );
    }
    if ztunnel && spire {
        anyhow::bail!(
            "--identity-source spire does not apply with --data-plane ztunnel: ztunnel asks \
             the CA for its workloads' certificates itself"
        );
    }
    let ca_addr = match (&args.ca, ztunnel || spire) {
        (Some(ca), _) => ca.clone(),
        (None, true) => String::new(),
        (None, false) => anyhow::bail!(
            "--ca HOST:PORT is required: workload certificates come from the zmesh CA \
             (or use --identity-source spire)"
        ),
    };
    let proxy_ip = match (args.proxy_ip, ztunnel) {
        (Some(ip), _) => ip,
        (None, true) => Ipv4Addr::UNSPECIFIED,
        (None, false) => anyhow::bail!(
            "--proxy-ip IP is required: the node proxy listens there \
             (or use --data-plane ztunnel)"
        ),
    };
    if let Some(ip6) = args.proxy_ip6 {
        if ztunnel {
            anyhow::bail!(
                "--proxy-ip6 configures zmesh's own data plane, not --data-plane ztunnel"
            );
        }
        if ip6.is_unspecified() || ip6.is_loopback() || ip6.to_ipv4_mapped().is_some() {
            anyhow::bail!("--proxy-ip6 {ip6}: give the node's IPv6 address that pods reach");
        }
    }
    let cni_socket = Some(args.cni_socket.clone())
        .filter(|path| path.as_os_str() != "none" && !path.as_os_str().is_empty());
    let cni_state_file = Some(args.cni_state_file.clone())
        .filter(|path| path.as_os_str() != "none" && !path.as_os_str().is_empty());
    let cni_install = match (&args.cni_bin_dir, &args.cni_conf_dir) {
        (Some(bin_dir), Some(conf_dir)) => {
            let Some(agent_socket) = cni_socket.clone().filter(|_| !ztunnel) else {
                anyhow::bail!(
                    "--cni-bin-dir/--cni-conf-dir install a plugin that asks this agent's \
                     --cni-socket, which is not served (--cni-socket none, or --data-plane \
                     ztunnel)"
                );
            };
            let plugin_binary = match &args.cni_plugin_binary {
                Some(path) => path.clone(),
                None => std::env::current_exe()
                    .context("cannot find this executable, for the default --cni-plugin-binary")?
                    .with_file_name(CNI_PLUGIN_TYPE),
            };
            Some(CniInstall {
                bin_dir: bin_dir.clone(),
                conf_dir: conf_dir.clone(),
                plugin_binary,
                entry: PluginEntry {
                    agent_socket,
                    state_file: cni_state_file.clone(),
                    failure_policy: match args.cni_failure_policy {
                        FailurePolicyArg::Closed => FailurePolicy::Closed,
                        FailurePolicyArg::Open => FailurePolicy::Open,
                    },
                    agent_timeout_seconds: AGENT_TIMEOUT_SECONDS,
                },
            })
        }
        _ => None,
    };
    let config = AgentConfig {
        node: args.node.clone(),
        trust_domain,
        ca_addr,
        credentials_dir: args.credentials.clone(),
        ca_token: args.ca_token_file.clone().zip(args.ca_bundle.clone()).map(
            |(token_file, ca_bundle)| CaTokenCredential {
                token_file,
                ca_bundle,
            },
        ),
        proxy_ip,
        proxy_ip6: args.proxy_ip6,
        identity: if spire {
            IdentitySource::Spire {
                socket: args.spire_socket.clone(),
            }
        } else {
            IdentitySource::ZmeshCa
        },
        data_plane: match (ztunnel, &args.datapath_socket) {
            (true, _) => DataPlane::Ztunnel {
                zds_socket: args.zds_socket.clone(),
            },
            (false, Some(socket)) => DataPlane::ZmeshProcess {
                socket: socket.clone(),
            },
            (false, None) => DataPlane::Zmesh,
        },
        mode: args.mode.into(),
        proxy_limits: args.tuning.limits(),
        cluster_domain: args.tuning.cluster_domain.clone(),
        cluster_id: args.tuning.cluster_id.clone(),
        proxy_threads,
        build: zmesh_agent::config_api::BuildInfo {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            git_commit: crate::cmd::version::GIT_COMMIT.map(str::to_owned),
        },
        log: Some(log),
        status_reports: None,
        admin_socket: args.admin_socket.clone(),
        cert_validity: args.cert_lifetime,
        redirect: args.redirect_cgroup.clone().map(|cgroup| RedirectSettings {
            cgroup,
            pin_dir: args.bpf_pin_dir.clone(),
            ingress_interfaces: args.ingress_interfaces.clone(),
            tc_attach: args.tc_attach,
        }),
        host_proc: args.host_proc.clone(),
        netns_registry: NetnsRegistry::default(),
        cni_state_file,
        cni_socket,
        cni_install,
    };
    if args.dry_run {
        println!("{config:#?}");
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(install) = &config.cni_install {
        // A packaging mistake, better said now than by every pass of the installer.
        anyhow::ensure!(
            install.plugin_binary.is_file(),
            "the CNI plugin's binary {} does not exist (--cni-plugin-binary)",
            install.plugin_binary.display()
        );
    }
    let mut config = config;
    let cluster = match (&args.manifests, args.kubernetes) {
        (Some(dir), _) => watch_dir(dir.clone(), Duration::from_millis(200)).0,
        (None, _) => {
            let client = kube::Client::try_default()
                .await
                .context("cannot configure the Kubernetes client")?;
            super::check_kube_access(&client, zmesh_cluster::access::AGENT).await?;
            // The agent's status goes to a Lease in its own namespace, for `zmesh status`.
            let namespace = args
                .status_namespace
                .clone()
                .unwrap_or_else(|| client.default_namespace().to_owned());
            let (reports, updates) = tokio::sync::watch::channel(None);
            config.status_reports = Some(reports);
            tokio::spawn(zmesh_cluster::agent_status::publish(
                client.clone(),
                namespace,
                updates,
            ));
            tracing::info!("waiting for the first complete listing of namespaces and pods");
            watch_kubernetes(client, args.node.clone(), RetryPolicy::default()).await
        }
    };
    run(config, cluster, super::shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}
