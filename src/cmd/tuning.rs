//! The proxy's timeouts and limits as flags, shared by `zmesh proxy` and `zmesh agent` so
//! that both name and default them alike (defaults: `zmesh_proxy::Limits::default()`).

use std::time::Duration;

use zmesh_proxy::{Limits, TcpKeepalive};

use super::parse_duration;

#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "Limits and timeouts")]
pub struct ProxyTuningArgs {
    /// How long open tunnels may take to finish after SIGTERM (`--drain-seconds N` is the
    /// same in seconds).
    #[arg(long, alias = "drain-seconds", default_value = "30s", value_parser = parse_duration)]
    pub drain_deadline: Duration,
    /// Timeout for the TCP connect to a workload (or a passthrough destination).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// Time an inbound HBONE peer has for each of its TLS handshake and its HTTP/2
    /// preface before it is disconnected.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub handshake_timeout: Duration,
    /// Concurrent tunnels on one inbound HBONE connection (advertised as
    /// SETTINGS_MAX_CONCURRENT_STREAMS); more are refused with REFUSED_STREAM.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_tunnels_per_connection: u32,
    /// Concurrent inbound tunnels from one peer identity over all its connections; more
    /// are refused with REFUSED_STREAM.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_tunnels_per_identity: u32,
    /// Tunnels an inbound HBONE client may reset before using them; past this the
    /// connection gets GOAWAY ENHANCE_YOUR_CALM (HTTP/2 rapid reset).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_client_resets_per_connection: u32,
    /// Idle time before TCP keepalive probes on sockets to and from applications (then
    /// every as long, 9 probes), or `off`.
    #[arg(long, default_value = "180s", value_parser = parse_keepalive)]
    pub tcp_keepalive: Keepalive,
    /// The cluster's DNS domain: HBONE requests may name a Service as
    /// `<name>.<namespace>.svc.<domain>:<port>`.
    #[arg(long, default_value = "cluster.local")]
    pub cluster_domain: String,
    /// This cluster's id (Istio's `clusterid`), sent in the `baggage` of HBONE requests and
    /// answers as ztunnel does.
    #[arg(long, default_value = zmesh_proxy::hbone::DEFAULT_CLUSTER_ID, value_parser = parse_cluster_id)]
    pub cluster_id: String,
}

/// `--cluster-id`: a name that can go into a `baggage` value as it is.
fn parse_cluster_id(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "{s:?} is not a cluster id: use 1-253 letters, digits, '-', '_' or '.'"
        ))
    }
}

/// `--tcp-keepalive`: an idle time, or off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive(Option<Duration>);

fn parse_keepalive(s: &str) -> Result<Keepalive, String> {
    if s == "off" {
        return Ok(Keepalive(None));
    }
    parse_duration(s).map(|d| Keepalive(Some(d)))
}

impl ProxyTuningArgs {
    pub fn limits(&self) -> Limits {
        Limits {
            drain_deadline: self.drain_deadline,
            connect_timeout: self.connect_timeout,
            handshake_timeout: self.handshake_timeout,
            max_tunnels_per_connection: self.max_tunnels_per_connection as usize,
            max_tunnels_per_identity: self.max_tunnels_per_identity as usize,
            max_client_resets_per_connection: self.max_client_resets_per_connection as usize,
            tcp_keepalive: self.tcp_keepalive.0.map(|idle| TcpKeepalive {
                time: idle,
                interval: idle,
                ..TcpKeepalive::default()
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ProxyTuningArgs;
    use clap::Parser;
    use std::time::Duration;
    use zmesh_proxy::Limits;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        tuning: ProxyTuningArgs,
    }

    fn parse(args: &[&str]) -> Result<ProxyTuningArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("zmesh").chain(args.iter().copied())).map(|c| c.tuning)
    }

    #[test]
    fn the_defaults_are_the_proxys() {
        assert_eq!(parse(&[]).unwrap().limits(), Limits::default());
    }

    #[test]
    fn flags_set_every_limit() {
        let t = parse(&[
            "--drain-seconds",
            "5",
            "--connect-timeout",
            "2s",
            "--handshake-timeout",
            "3s",
            "--max-tunnels-per-connection",
            "10",
            "--max-tunnels-per-identity",
            "20",
            "--max-client-resets-per-connection",
            "30",
            "--tcp-keepalive",
            "off",
            "--cluster-domain",
            "example.org",
            "--cluster-id",
            "east-1",
        ])
        .unwrap();
        let l = t.limits();
        assert_eq!(l.drain_deadline, Duration::from_secs(5));
        assert_eq!(l.connect_timeout, Duration::from_secs(2));
        assert_eq!(l.handshake_timeout, Duration::from_secs(3));
        assert_eq!(
            (
                l.max_tunnels_per_connection,
                l.max_tunnels_per_identity,
                l.max_client_resets_per_connection
            ),
            (10, 20, 30)
        );
        assert_eq!(l.tcp_keepalive, None);
        assert_eq!(t.cluster_domain, "example.org");
        assert_eq!(t.cluster_id, "east-1");
        assert!(parse(&["--cluster-id", "a,b=c"]).is_err());
        assert!(parse(&["--cluster-id", ""]).is_err());
        assert_eq!(parse(&[]).unwrap().cluster_id, "Kubernetes");
        let k = parse(&["--tcp-keepalive", "1m"])
            .unwrap()
            .limits()
            .tcp_keepalive;
        assert_eq!(
            k.map(|k| (k.time, k.interval)),
            Some((Duration::from_secs(60), Duration::from_secs(60)))
        );
    }

    #[test]
    fn nonsense_is_refused() {
        for bad in [
            &["--max-tunnels-per-connection", "0"][..],
            &["--max-tunnels-per-identity", "-1"],
            &["--handshake-timeout", "0s"],
            &["--tcp-keepalive", "never"],
            &["--drain-deadline", "soon"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
