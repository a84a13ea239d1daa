//! The node proxy serving a static workload table: what `zmesh proxy` and
//! `zmesh-datapath proxy` share once each has its certificates.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};

use super::tuning::ProxyTuningArgs;
use super::ModeArg;
use zmesh_proxy::{
    Capture, Proxy, ProxyConfig, ProxyDeps, StaticOriginalDst, TlsCredentials, WorkloadStore,
    WorkloadTable,
};

#[derive(clap::Args, Debug)]
pub struct StaticProxyArgs {
    /// Workload table (YAML: trustDomain, nodes, workloads).
    #[arg(long, value_name = "FILE")]
    pub workloads: PathBuf,
    /// This node's name, as used in the table's `node` fields.
    #[arg(long, env = "NODE_NAME")]
    pub node: String,
    /// IP to listen on (ports 15001, 15006, 15008, 15020, 15021).
    #[arg(long, default_value = "0.0.0.0")]
    pub listen_ip: IpAddr,
    /// What to do with plain TCP to local workloads.
    #[arg(long, value_enum, default_value = "permissive")]
    pub mode: ModeArg,
    /// Run without eBPF capture: clients dial the listeners directly (benchmarks, tests).
    #[arg(long)]
    pub explicit: bool,
    /// With --explicit: send every outbound connection from CLIENT_IP to DST (IP:port),
    /// standing in for the original destination that eBPF capture would record
    /// (benchmarks, tests). Repeatable, one per client IP.
    #[arg(long, value_name = "CLIENT_IP=DST", requires = "explicit", value_parser = parse_static_dst)]
    pub static_dst: Vec<(IpAddr, SocketAddr)>,
    #[command(flatten)]
    pub tuning: ProxyTuningArgs,
}

impl StaticProxyArgs {
    pub fn load_table(&self) -> anyhow::Result<WorkloadTable> {
        Ok(WorkloadTable::load(&self.workloads)?)
    }
}

/// Serves `table` with `credentials` until SIGTERM or Ctrl-C (then drains), or until a
/// listener fails.
pub async fn serve(
    args: StaticProxyArgs,
    table: WorkloadTable,
    credentials: Arc<dyn TlsCredentials>,
) -> anyhow::Result<ExitCode> {
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
    config.mode = args.mode.into();
    config.limits = args.tuning.limits();
    config.cluster_domain = args.tuning.cluster_domain.clone();
    config.cluster_id = args.tuning.cluster_id.clone();
    let mut deps = ProxyDeps::new(Arc::new(WorkloadStore::new(table)), credentials);
    if !args.static_dst.is_empty() {
        let mut seen = std::collections::HashSet::new();
        for (client, _) in &args.static_dst {
            if !seen.insert(*client) {
                bail!("--static-dst gives client IP {client} twice");
            }
        }
        deps.original_dst = Arc::new(StaticOriginalDst::new(args.static_dst));
    }
    let proxy = Proxy::bind(config, deps).await?;
    let drain = proxy.drain_handle();
    let mut running = tokio::spawn(proxy.run());

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let stopped = tokio::select! {
        _ = term.recv() => {
            tracing::info!("SIGTERM: draining");
            None
        }
        _ = tokio::signal::ctrl_c() => {
            tracing::info!("interrupt: draining");
            None
        }
        // A listener failed (the proxy drained on its own): exit non-zero with the reason.
        stopped = &mut running => Some(stopped),
    };
    let stopped = match stopped {
        Some(stopped) => stopped,
        None => {
            drain.drain();
            running.await
        }
    };
    stopped.context("the proxy task failed")??;
    Ok(ExitCode::SUCCESS)
}

/// Parses `CLIENT_IP=IP:PORT` for --static-dst.
fn parse_static_dst(s: &str) -> Result<(IpAddr, SocketAddr), String> {
    let (client, dst) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected CLIENT_IP=DST_IP:PORT"))?;
    let client = client
        .parse()
        .map_err(|_| format!("{client:?} is not an IP address"))?;
    let dst: SocketAddr = dst
        .parse()
        .map_err(|_| format!("{dst:?} is not an IP:port"))?;
    if dst.port() == 0 {
        return Err(format!("{dst}: port 0 is not a destination"));
    }
    Ok((client, dst))
}

#[cfg(test)]
mod tests {
    use super::parse_static_dst;

    #[test]
    fn static_dst_parses_and_rejects() {
        assert_eq!(
            parse_static_dst("127.0.0.11=127.0.0.12:5001").unwrap(),
            (
                "127.0.0.11".parse().unwrap(),
                "127.0.0.12:5001".parse().unwrap()
            )
        );
        assert_eq!(
            parse_static_dst("fd00::1=[fd00::2]:80").unwrap().1,
            "[fd00::2]:80".parse().unwrap()
        );
        for (bad, want) in [
            ("127.0.0.11", "expected CLIENT_IP=DST"),
            ("x=127.0.0.12:1", "not an IP address"),
            ("127.0.0.11=127.0.0.12", "not an IP:port"),
            ("127.0.0.11=127.0.0.12:0", "port 0"),
        ] {
            let err = parse_static_dst(bad).unwrap_err();
            assert!(err.contains(want), "{bad}: {err}");
        }
    }
}
