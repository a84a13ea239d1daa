//! The agent's hands on the kernel: the eBPF programs (loaded over their pins, following
//! the node's interfaces), the enrollment maps kept in step with the cluster state, and the
//! original-destination lookup the proxy does in those maps. Everything here makes
//! syscalls: the agent calls it from blocking threads, never from the data path's runtime.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use zmesh_cluster::ClusterState;
use zmesh_identity::{TrustDomain, WorkloadId};
use zmesh_proxy::{OriginalDst, ProxyConfig};
use zmesh_redirect::{Mode, ProxyListeners, RedirectConfig, RedirectError, Redirector};

use crate::credentials::{ManagedCredentials, WorkloadCertificates};
use crate::discovery::{NetnsCookies, PodNetnsDiscovery};
use crate::run::RedirectSettings;
use crate::table::local_enrolled;

/// The proxy's listeners as the eBPF programs need them, derived from the proxy's own
/// configuration so the two never disagree: connects are rewritten to the outbound
/// listener at `proxy_ip` (the address pods reach; `proxy_ip6` for IPv6, which turns IPv6
/// steering on), inbound traffic is assigned to the plaintext and HBONE listeners, and the
/// proxy's other ports are never redirected.
pub(crate) fn listeners_of(
    proxy_ip: Ipv4Addr,
    proxy_ip6: Option<Ipv6Addr>,
    proxy: &ProxyConfig,
) -> ProxyListeners {
    let mut listeners =
        ProxyListeners::new(SocketAddrV4::new(proxy_ip, proxy.outbound_addr.port()));
    listeners.outbound_v6 = proxy_ip6;
    listeners.inbound_plaintext_port = proxy.plaintext_addr.port();
    listeners.inbound_hbone_port = proxy.inbound_addr.port();
    listeners.node_mode = proxy.mode;
    listeners.other_ports = vec![
        zmesh_dataplane::ZTUNNEL_ADMIN_PORT,
        proxy.metrics_addr.port(),
        proxy.readiness_addr.port(),
    ];
    listeners
}

/// The original destination of a captured connection, from the eBPF map (keyed by the
/// client's address), so the proxy needs no cgroup/getsockopt hook in its own cgroup.
pub(crate) struct MapOriginalDst(pub Arc<Mutex<Redirector>>);

impl OriginalDst for MapOriginalDst {
    fn original_dst(
        &self,
        _stream: &tokio::net::TcpStream,
        peer: SocketAddr,
    ) -> std::io::Result<SocketAddr> {
        let mut redirector = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match redirector.original_dst(peer) {
            Ok(Some(dst)) => Ok(dst),
            Ok(None) => Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no original destination recorded for {peer}"),
            )),
            Err(e) => Err(std::io::Error::other(e.to_string())),
        }
    }
}

/// The installed eBPF programs and which interfaces steer inbound traffic.
pub(crate) struct Steering {
    config: RedirectConfig,
    pub redirector: Arc<Mutex<Redirector>>,
    /// Attach to every matching interface, following changes.
    follow: bool,
    /// `--ingress-interface` values: names, or prefixes ending in `*`; none: all but lo.
    patterns: Vec<String>,
}

impl Steering {
    /// Installs (or takes over) the programs, steering to the listeners of `proxy`.
    pub fn load(
        (proxy_ip, proxy_ip6): (Ipv4Addr, Option<Ipv6Addr>),
        proxy: &ProxyConfig,
        settings: &RedirectSettings,
    ) -> Result<Self, RedirectError> {
        let listeners = listeners_of(proxy_ip, proxy_ip6, proxy);
        let patterns = settings.ingress_interfaces.clone();
        let follow = patterns.is_empty() || patterns.iter().any(|p| p.ends_with('*'));
        let ingress_interfaces = if follow {
            node_interfaces(&patterns).unwrap_or_default()
        } else {
            patterns.clone()
        };
        let redirect_config = RedirectConfig {
            pin_dir: settings.pin_dir.clone(),
            cgroup: settings.cgroup.clone(),
            ingress_interfaces,
            proxy: listeners,
            tc_attach: settings.tc_attach,
        };
        // Over an existing installation this reuses the pinned maps: enrollment survives.
        let redirector = Redirector::load(&redirect_config)?;
        Ok(Self {
            config: redirect_config,
            redirector: Arc::new(Mutex::new(redirector)),
            follow,
            patterns,
        })
    }

    /// Attaches tc ingress to interfaces that appeared (new pods' veths) and lets go of
    /// those that left, by reloading over the pins: maps and enrollment are kept. The
    /// bridge ports are recorded again every time, also with a fixed list of interfaces
    /// (a bridge's MAC moves as ports join and leave).
    pub fn follow_interfaces(&mut self) {
        let interfaces = if self.follow {
            match node_interfaces(&self.patterns) {
                Ok(list) => list,
                Err(e) => {
                    tracing::warn!("cannot list the node's interfaces: {e}");
                    return;
                }
            }
        } else {
            self.config.ingress_interfaces.clone()
        };
        if interfaces == self.config.ingress_interfaces {
            let mut redirector = self.redirector.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = redirector.sync_bridge_ports(&interfaces) {
                tracing::warn!("cannot record the node's bridge ports: {e}");
            }
            return;
        }
        let mut config = self.config.clone();
        config.ingress_interfaces = interfaces;
        match Redirector::load(&config) {
            Ok(redirector) => {
                tracing::info!(interfaces = ?config.ingress_interfaces, "steering inbound traffic on");
                *self.redirector.lock().unwrap_or_else(|p| p.into_inner()) = redirector;
                self.config = config;
            }
            Err(e) => tracing::error!("cannot attach to the node's new interfaces: {e}"),
        }
    }
}

/// Whether `--ingress-interface` values select `name`: no values select every interface
/// but loopback; `veth*` selects by prefix.
fn selected(patterns: &[String], name: &str) -> bool {
    if patterns.is_empty() {
        return name != "lo";
    }
    patterns.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => name == p,
    })
}

/// The node's interfaces (in this process's network namespace) that `patterns` select,
/// sorted.
fn node_interfaces(patterns: &[String]) -> std::io::Result<Vec<String>> {
    let output = std::process::Command::new("ip")
        .args(["-o", "link", "show"])
        .output()?;
    if !output.status.success() {
        return Err(std::io::Error::other(
            String::from_utf8_lossy(&output.stderr).into_owned(),
        ));
    }
    let mut names: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split(": ").nth(1))
        .map(|name| name.split('@').next().unwrap_or(name).to_owned())
        .filter(|name| selected(patterns, name))
        .collect();
    names.sort();
    names.dedup();
    Ok(names)
}

/// What this agent has enrolled so far, to apply only the differences.
pub(crate) struct Enrolled {
    workloads: BTreeSet<WorkloadId>,
    /// Pod (namespace/name) -> (netns cookie, pod IPs) as put into the maps.
    pods: BTreeMap<String, (Option<u64>, Vec<IpAddr>)>,
    /// Where the pods' network namespaces are, found once per pod.
    netns: NetnsCookies,
}

/// What one [`Enrolled::apply`] left undone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Applied {
    /// Enrolled pods whose network namespace is not found yet (their containers have not
    /// started): worth another look soon, without a change of the cluster state.
    pub unresolved: usize,
}

impl Enrolled {
    pub fn new(discovery: PodNetnsDiscovery) -> Self {
        Self {
            workloads: BTreeSet::new(),
            pods: BTreeMap::new(),
            netns: NetnsCookies::new(discovery),
        }
    }

    /// Enrolled pods of this node (`namespace/name`) -> their network namespace cookie in
    /// the maps (`None`: not found yet).
    pub fn netns_cookies(&self) -> BTreeMap<String, Option<u64>> {
        self.pods
            .iter()
            .map(|(key, (cookie, _))| (key.clone(), *cookie))
            .collect()
    }

    /// Blocking (netns reads, a scan of /proc, bpf syscalls): run it off the async workers.
    pub fn apply(
        &mut self,
        state: &ClusterState,
        trust_domain: &TrustDomain,
        node: &str,
        certs: &dyn WorkloadCertificates,
        tls: &ManagedCredentials,
        redirector: Option<&Mutex<Redirector>>,
    ) -> Applied {
        let mut want_workloads = BTreeSet::new();
        let mut local_pods = Vec::new();
        for (pod, id) in local_enrolled(state, trust_domain, node) {
            want_workloads.insert(id);
            local_pods.push(pod);
        }
        // Without redirection nothing needs the namespaces: do not look for them.
        let cookies = if redirector.is_some() {
            self.netns
                .cookies(&local_pods, Instant::now(), &|path| netns_cookie(path))
        } else {
            BTreeMap::new()
        };
        let want_pods: BTreeMap<String, (Option<u64>, Vec<IpAddr>)> = local_pods
            .iter()
            .map(|pod| {
                let key = pod.key().to_string();
                let cookie = cookies.get(&key).copied().flatten();
                (key, (cookie, pod.ips.clone()))
            })
            .collect();
        for id in want_workloads.difference(&self.workloads) {
            tracing::info!(workload = %id, "enrolled: fetching its certificate");
            certs.ensure(id);
        }
        for id in self.workloads.difference(&want_workloads) {
            tracing::info!(workload = %id, "left the mesh on this node: forgetting its certificate");
            certs.forget(id);
            tls.forget(id);
        }
        self.workloads = want_workloads;

        if let Some(redirector) = redirector {
            let mut r = redirector.lock().unwrap_or_else(|p| p.into_inner());
            // Only what changed leaves the maps (and first, so that an IP or a namespace
            // that moved to another pod is then entered for that one), so a pod whose
            // namespace is found late keeps its IPs steered throughout.
            for (key, (cookie, ips)) in &self.pods {
                let (new_cookie, new_ips) = match want_pods.get(key) {
                    Some((c, i)) => (*c, i.as_slice()),
                    None => (None, &[][..]),
                };
                let gone_cookie = cookie.filter(|c| new_cookie != Some(*c));
                let gone_ips: Vec<&IpAddr> =
                    ips.iter().filter(|ip| !new_ips.contains(ip)).collect();
                if gone_cookie.is_none() && gone_ips.is_empty() {
                    continue;
                }
                tracing::info!(pod = %key, cookie = ?gone_cookie, ips = ?gone_ips, "un-enrolling from redirection");
                if let Some(cookie) = gone_cookie {
                    log_err(key, r.unenroll_netns(cookie));
                }
                for ip in gone_ips {
                    log_err(key, r.unenroll_pod_ip(*ip));
                }
            }
            for (key, (cookie, ips)) in &want_pods {
                let (old_cookie, old_ips) = match self.pods.get(key) {
                    Some((c, i)) => (*c, i.as_slice()),
                    None => (None, &[][..]),
                };
                let new_cookie = cookie.filter(|c| old_cookie != Some(*c));
                let new_ips: Vec<&IpAddr> = ips.iter().filter(|ip| !old_ips.contains(ip)).collect();
                if new_cookie.is_none() && new_ips.is_empty() {
                    continue;
                }
                tracing::info!(pod = %key, cookie = ?new_cookie, ips = ?new_ips, "enrolling in redirection");
                if let Some(cookie) = new_cookie {
                    log_err(key, r.enroll_netns(cookie));
                }
                for ip in new_ips {
                    log_err(key, r.enroll_pod_ip(*ip, Mode::Permissive));
                }
            }
        }
        self.pods = want_pods;
        Applied {
            unresolved: self.netns.pending(),
        }
    }
}

fn log_err(pod: &str, result: Result<(), zmesh_redirect::RedirectError>) {
    if let Err(e) = result {
        tracing::error!(%pod, "redirect map update failed: {e}");
    }
}

/// The cookie of the network namespace at `path` (e.g. /run/netns/NAME), read from a
/// socket created inside it on a short-lived thread.
pub fn netns_cookie(path: &Path) -> std::io::Result<u64> {
    let file = std::fs::File::open(path)?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)?;
                zmesh_redirect::current_netns_cookie()
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("netns thread panicked")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ingress_interface_patterns_select_by_name_or_prefix() {
        let patterns = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(selected(&[], "eth0"));
        assert!(!selected(&[], "lo"));
        let chosen = patterns(&["cni0", "veth*"]);
        assert!(selected(&chosen, "cni0"));
        assert!(selected(&chosen, "veth0a1b2c"));
        assert!(!selected(&chosen, "eth0"));
        assert!(!selected(&chosen, "cni01"));
        assert!(!selected(&patterns(&["veth*"]), "lo"));
    }

    #[test]
    fn listeners_follow_the_proxy_config() {
        let mut proxy = ProxyConfig::new("node1", IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        proxy.mode = Mode::Strict;
        let listeners = listeners_of(Ipv4Addr::new(10, 0, 0, 1), None, &proxy);
        assert_eq!(listeners.outbound, "10.0.0.1:15001".parse().unwrap());
        assert!(!listeners.steers_ipv6());
        assert_eq!(listeners.inbound_plaintext_port, 15006);
        assert_eq!(listeners.inbound_hbone_port, 15008);
        assert_eq!(listeners.node_mode, Mode::Strict);
        assert_eq!(listeners.other_ports, vec![15000, 15020, 15021]);

        proxy.outbound_addr.set_port(25001);
        proxy.readiness_addr.set_port(25021);
        let ip6 = "fd00::1".parse().unwrap();
        let listeners = listeners_of(Ipv4Addr::new(10, 0, 0, 1), Some(ip6), &proxy);
        assert_eq!(listeners.outbound.port(), 25001);
        assert!(listeners.other_ports.contains(&25021));
        assert_eq!(listeners.outbound_v6, Some(ip6));
        assert!(listeners.steers_ipv6());
    }
}
