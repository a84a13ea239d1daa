//! `zmesh proxy`: runs the node proxy alone, from a static workload table and certificates
//! read from a directory (see zmesh_proxy::workloads and zmesh_proxy::StaticCredentials for
//! the formats).

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use zmesh_proxy::{
    Capture, Mode, Proxy, ProxyConfig, ProxyDeps, StaticCredentials, TlsCredentials, WorkloadStore,
    WorkloadTable,
};

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum ModeArg {
    /// Plain TCP from outside the mesh reaches local workloads.
    Permissive,
    /// Only mTLS reaches local workloads; plain TCP is reset.
    Strict,
}

#[derive(clap::Args)]
pub struct ProxyArgs {
    /// Workload table (YAML: trustDomain, nodes, workloads).
    #[arg(long, value_name = "FILE")]
    pub workloads: PathBuf,
    /// This node's name, as used in the table's `node` fields.
    #[arg(long, env = "NODE_NAME")]
    pub node: String,
    /// Directory with roots.pem and <namespace>/<service-account>.pem + .key.
    #[arg(long, value_name = "DIR", required_unless_present = "ca")]
    pub cert_dir: Option<PathBuf>,
    /// Address of a CA speaking Istio's CA API (not supported yet; use --cert-dir).
    #[arg(long, value_name = "ADDR", conflicts_with = "cert_dir")]
    pub ca: Option<String>,
    /// IP to listen on (ports 15001, 15006, 15008, 15020, 15021).
    #[arg(long, default_value = "0.0.0.0")]
    pub listen_ip: IpAddr,
    /// What to do with plain TCP to local workloads.
    #[arg(long, value_enum, default_value = "permissive")]
    pub mode: ModeArg,
    /// Run without eBPF capture: clients dial the listeners directly (benchmarks, tests).
    #[arg(long)]
    pub explicit: bool,
    /// Seconds open tunnels may take to finish after SIGTERM.
    #[arg(long, default_value_t = 30)]
    pub drain_seconds: u64,
}

pub async fn run(args: ProxyArgs) -> anyhow::Result<ExitCode> {
    let table = WorkloadTable::load(&args.workloads)?;
    let Some(cert_dir) = &args.cert_dir else {
        bail!("--ca is not supported yet; give certificates with --cert-dir");
    };
    let credentials = StaticCredentials::load_dir(cert_dir, table.trust_domain())
        .with_context(|| format!("loading certificates from {}", cert_dir.display()))?;
    let mut local = 0;
    for w in table.workloads_on(&args.node) {
        local += 1;
        if credentials.server_config(&w.identity).is_err() {
            tracing::warn!(
                workload = %format!("{}/{}", w.namespace, w.name),
                identity = %w.identity,
                "no certificate for this local workload: its traffic will fail"
            );
        }
    }
    if local == 0 {
        tracing::warn!(node = %args.node, "no workload of the table runs on this node");
    }

    let mut config = ProxyConfig::new(args.node, args.listen_ip);
    if args.explicit {
        config.capture = Capture::Explicit;
        config.ip_transparent = false;
    }
    config.mode = match args.mode {
        ModeArg::Permissive => Mode::Permissive,
        ModeArg::Strict => Mode::Strict,
    };
    config.drain_deadline = Duration::from_secs(args.drain_seconds);
    let deps = ProxyDeps::new(Arc::new(WorkloadStore::new(table)), Arc::new(credentials));
    let proxy = Proxy::bind(config, deps).await?;
    let drain = proxy.drain_handle();
    let running = tokio::spawn(proxy.run());

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupt: draining"),
    }
    drain.drain();
    running.await.context("the proxy task failed")?;
    Ok(ExitCode::SUCCESS)
}
