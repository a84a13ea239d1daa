//! Building a cluster from a [`ClusterSpec`], and the handles tests use.

use std::ffi::OsStr;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::capture::Capture;
use crate::error::Result;
use crate::netns::Netns;
use crate::run::{self, RunGuard};
use crate::servers::{self, HttpResponse, Server};
use crate::spec::ClusterSpec;
use crate::{cgroup, cmd};

/// An IPv4 prefix such as 10.201.1.0/24.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv4Cidr {
    /// The network address.
    pub addr: Ipv4Addr,
    /// The prefix length.
    pub prefix_len: u8,
}

impl Ipv4Cidr {
    /// Whether `ip` lies inside this prefix.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = u32::MAX
            .checked_shl(32 - u32::from(self.prefix_len))
            .unwrap_or(0);
        u32::from(ip) & mask == u32::from(self.addr) & mask
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// A running cluster: every namespace, link, route and cgroup of one run.
///
/// Dropping it kills all processes started in it and removes everything, also when a test
/// panics. Use [`Cluster::teardown`] to see teardown errors instead of having them logged.
#[derive(Debug)]
pub struct Cluster {
    // Declared first so it is dropped first: teardown runs before the fds below close.
    run: RunGuard,
    underlay: Netns,
    bridge: String,
    nodes: Vec<Node>,
    cgroup_path: PathBuf,
    capture_cgroup: PathBuf,
    captures: AtomicU32,
}

/// A node: a network namespace on the underlay that routes for its pods.
#[derive(Debug)]
pub struct Node {
    name: String,
    index: u8,
    netns: Netns,
    underlay_ip: Ipv4Addr,
    underlay_iface: String,
    bridge_port: String,
    pod_cidr: Ipv4Cidr,
    gateway_ip: Ipv4Addr,
    /// Dual-stack clusters only: fd00:200::N on the underlay, fd00:201:N::1 for pods.
    underlay_ip6: Option<Ipv6Addr>,
    gateway_ip6: Option<Ipv6Addr>,
    cgroup_path: PathBuf,
    cgroup_id: u64,
    pods_cgroup_path: PathBuf,
    pods_cgroup_id: u64,
    pods: Vec<Pod>,
}

/// A pod: its own network namespace and cgroup, wired to its node by a veth pair.
#[derive(Debug)]
pub struct Pod {
    name: String,
    namespace: String,
    service_account: String,
    node: String,
    ip: Ipv4Addr,
    ip6: Option<Ipv6Addr>,
    gateway_ip: Ipv4Addr,
    netns: Netns,
    netns_cookie: u64,
    veth_pod: String,
    veth_host: String,
    cgroup_path: PathBuf,
    cgroup_id: u64,
}

/// The pod side of every pod's veth is called what Kubernetes pods see.
const POD_IFACE: &str = "eth0";

/// Dual-stack pods' IPv6 next hop: the same link-local address on every node-side veth
/// (as Calico does), so a node needs no IPv6 address per pod link.
const POD_GATEWAY_LINK_LOCAL: &str = "fe80::1";

/// Node N's IPv6 address on the underlay (dual-stack clusters).
fn underlay_ip6(index: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, u16::from(index))
}

/// Address `host` of node N's IPv6 pod prefix fd00:201:N::/64 (1 is the node's own).
fn pod_ip6(index: u8, host: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x201, u16::from(index), 0, 0, 0, 0, u16::from(host))
}

impl Cluster {
    /// Builds the cluster described by `spec`, after removing leftovers of crashed runs.
    ///
    /// On error everything created so far is removed again.
    pub fn build(spec: &ClusterSpec) -> Result<Cluster> {
        spec.validate()?;
        let cgroup_base = cgroup::cgroup2_mount()?.join(run::CGROUP_DIR);
        std::fs::create_dir_all(&cgroup_base)
            .map_err(|e| crate::Error::io("creating cgroup", &cgroup_base, e))?;
        match run::cleanup_leftovers_in(&cgroup_base) {
            Ok(removed) if !removed.is_empty() => {
                tracing::info!(?removed, "removed leftovers of dead runs")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("could not remove all leftovers of dead runs: {e}"),
        }
        let run = RunGuard::reserve(cgroup_base.clone())?;
        let id = run.id().to_owned();
        tracing::debug!(run_id = %id, "building cluster");

        let cgroup_path = cgroup_base.join(&id);
        cgroup::create(&cgroup_path)?;
        let capture_cgroup = cgroup_path.join("capture");
        cgroup::create(&capture_cgroup)?;
        let nodes_cgroup = cgroup_path.join("nodes");
        cgroup::create(&nodes_cgroup)?;

        let dual_stack = spec.is_dual_stack();
        let underlay = Netns::add(&format!("{id}-underlay"))?;
        // The bridge only switches frames: it needs no IPv6 of its own in either mode.
        quiet_ipv6(&underlay)?;
        let bridge = format!("{id}-br");
        cmd::ip_batch(
            underlay.name(),
            &format!(
                "link set lo up\nlink add {bridge} type bridge mcast_snooping 0\n\
                 link set {bridge} up\n"
            ),
        )?;

        let mut nodes = Vec::with_capacity(spec.nodes().len());
        for (i, node_spec) in spec.nodes().iter().enumerate() {
            // validate() caps the node count at 254, so the index fits and is never 0.
            let index = u8::try_from(i + 1).expect("node count validated");
            let node_cgroup = nodes_cgroup.join(node_spec.name());
            cgroup::create(&node_cgroup)?;
            let cgroup_path = node_cgroup.join("system");
            let cgroup_id = cgroup::create(&cgroup_path)?;
            let pods_cgroup_path = node_cgroup.join("pods");
            let pods_cgroup_id = cgroup::create(&pods_cgroup_path)?;

            let mut netns = Netns::add(&format!("{id}-node-{}", node_spec.name()))?;
            ipv6_for(&mut netns, dual_stack)?;
            netns.sysctl("net.ipv4.ip_forward", "1")?;
            if dual_stack {
                netns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
            }
            // Pod veths have no address of their own; strict reverse-path checks would drop
            // their traffic on some kernels' defaults.
            netns.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
            netns.sysctl("net.ipv4.conf.default.rp_filter", "0")?;

            let pod_cidr = Ipv4Cidr {
                addr: Ipv4Addr::new(10, 201, index, 0),
                prefix_len: 24,
            };
            let mut node = Node {
                name: node_spec.name().to_owned(),
                index,
                netns,
                underlay_ip: Ipv4Addr::new(10, 200, 0, index),
                underlay_iface: format!("{id}-n{index}"),
                bridge_port: format!("{id}-u{index}"),
                pod_cidr,
                gateway_ip: Ipv4Addr::new(10, 201, index, 1),
                underlay_ip6: dual_stack.then(|| underlay_ip6(index)),
                gateway_ip6: dual_stack.then(|| pod_ip6(index, 1)),
                cgroup_path,
                cgroup_id,
                pods_cgroup_path,
                pods_cgroup_id,
                pods: Vec::with_capacity(node_spec.pods().len()),
            };
            for (j, pod_spec) in node_spec.pods().iter().enumerate() {
                // validate() caps pods per node at 253: addresses .2 to .254.
                let slot = u8::try_from(j + 2).expect("pod count validated");
                let cgroup_path = node.pods_cgroup_path.join(format!(
                    "{}_{}",
                    pod_spec.namespace(),
                    pod_spec.name()
                ));
                let cgroup_id = cgroup::create(&cgroup_path)?;
                let mut netns = Netns::add(&format!(
                    "{id}-pod-{}.{}",
                    pod_spec.namespace(),
                    pod_spec.name()
                ))?;
                ipv6_for(&mut netns, dual_stack)?;
                let netns_cookie = netns.cookie()?;
                node.pods.push(Pod {
                    name: pod_spec.name().to_owned(),
                    namespace: pod_spec.namespace().to_owned(),
                    service_account: pod_spec.service_account().to_owned(),
                    node: node.name.clone(),
                    ip: Ipv4Addr::new(10, 201, index, slot),
                    ip6: dual_stack.then(|| pod_ip6(index, slot)),
                    gateway_ip: node.gateway_ip,
                    netns,
                    netns_cookie,
                    veth_pod: POD_IFACE.to_owned(),
                    veth_host: format!("{id}h{index}p{}", j + 1),
                    cgroup_path,
                    cgroup_id,
                });
            }
            nodes.push(node);
        }

        wire(&underlay, &bridge, &nodes)?;
        let cluster = Cluster {
            run,
            underlay,
            bridge,
            nodes,
            cgroup_path,
            capture_cgroup,
            captures: AtomicU32::new(0),
        };
        tracing::info!(run_id = %id, nodes = cluster.nodes.len(), "cluster ready");
        Ok(cluster)
    }

    /// The run id: every namespace, link and cgroup of this cluster has it in its name.
    pub fn run_id(&self) -> &str {
        self.run.id()
    }

    /// The nodes, in spec order (node N has underlay address 10.200.0.N).
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The node called `name`.
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// All pods of all nodes.
    pub fn pods(&self) -> impl Iterator<Item = &Pod> {
        self.nodes.iter().flat_map(|n| n.pods.iter())
    }

    /// The pod `name` in Kubernetes namespace `namespace`.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<&Pod> {
        self.pods()
            .find(|p| p.namespace == namespace && p.name == name)
    }

    /// The namespace holding the underlay bridge (where captures run).
    pub fn underlay_netns(&self) -> &Netns {
        &self.underlay
    }

    /// The underlay bridge's name (inside [`Cluster::underlay_netns`]).
    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// The run's cgroup; every process the cluster started is below it.
    pub fn cgroup_path(&self) -> &Path {
        &self.cgroup_path
    }

    /// Starts capturing all underlay traffic (every frame crossing the bridge) to a pcap.
    pub fn start_capture(&self) -> Result<Capture<'_>> {
        let seq = self.captures.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("zmesh-testbed-{}-{seq}.pcap", self.run_id()));
        Capture::start(self, path)
    }

    pub(crate) fn capture_cgroup(&self) -> &Path {
        &self.capture_cgroup
    }

    /// Tears the cluster down now and reports what could not be removed.
    pub fn teardown(mut self) -> Result<()> {
        self.run.teardown()
    }
}

/// Keeps a namespace quiet (no IPv6 autoconfiguration, router solicitations or MLD), so
/// captures hold only the traffic tests make: IPv6 off.
fn quiet_ipv6(netns: &Netns) -> Result<()> {
    netns.sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
    netns.sysctl("net.ipv6.conf.default.disable_ipv6", "1")
}

/// A node's or pod's IPv6: off, or (dual-stack) on with static addresses only: no router
/// advertisements or autoconfiguration, and no duplicate address detection. (Addresses are
/// still added with `nodad`: without it an address stays tentative until a work item runs,
/// and a route naming it as source in the same batch is refused.)
fn ipv6_for(netns: &mut Netns, dual_stack: bool) -> Result<()> {
    if !dual_stack {
        return quiet_ipv6(netns);
    }
    for conf in ["all", "default"] {
        for (key, value) in [
            ("disable_ipv6", "0"),
            ("accept_ra", "0"),
            ("autoconf", "0"),
            ("accept_dad", "0"),
            ("router_solicitations", "0"),
        ] {
            netns.sysctl(&format!("net.ipv6.conf.{conf}.{key}"), value)?;
        }
    }
    netns.set_dual_stack();
    Ok(())
}

/// Creates the links, addresses and routes of every node and pod.
fn wire(underlay: &Netns, bridge: &str, nodes: &[Node]) -> Result<()> {
    let mut underlay_script = String::new();
    for node in nodes {
        let mut script = format!(
            "link set lo up\n\
             addr add {gw}/32 dev lo\n\
             link add {up} type veth peer name {port} netns {underlay}\n\
             addr add {ip}/24 dev {up}\n\
             link set {up} up\n",
            gw = node.gateway_ip,
            up = node.underlay_iface,
            port = node.bridge_port,
            underlay = underlay.name(),
            ip = node.underlay_ip,
        );
        if let (Some(ip6), Some(gw6)) = (node.underlay_ip6, node.gateway_ip6) {
            script += &format!(
                "addr add {gw6}/128 dev lo nodad\naddr add {ip6}/64 dev {up} nodad\n",
                up = node.underlay_iface
            );
        }
        for other in nodes.iter().filter(|o| o.index != node.index) {
            script += &format!(
                "route add {} via {} dev {}\n",
                other.pod_cidr, other.underlay_ip, node.underlay_iface
            );
            if let Some(via) = other.underlay_ip6 {
                script += &format!(
                    "route add {}/64 via {via} dev {}\n",
                    pod_ip6(other.index, 0),
                    node.underlay_iface
                );
            }
        }
        for pod in &node.pods {
            script += &format!(
                "link add {host} type veth peer name {podif} netns {podns}\n\
                 link set {host} up\n\
                 route add {ip}/32 dev {host} scope link src {gw}\n",
                host = pod.veth_host,
                podif = pod.veth_pod,
                podns = pod.netns.name(),
                ip = pod.ip,
                gw = node.gateway_ip,
            );
            if let (Some(ip6), Some(gw6)) = (pod.ip6, node.gateway_ip6) {
                script += &format!(
                    "addr add {POD_GATEWAY_LINK_LOCAL}/64 dev {host} nodad\n\
                     route add {ip6}/128 dev {host} src {gw6}\n",
                    host = pod.veth_host,
                );
            }
        }
        cmd::ip_batch(node.netns.name(), &script)?;
        underlay_script += &format!(
            "link set {port} master {bridge}\nlink set {port} up\n",
            port = node.bridge_port
        );
        for pod in &node.pods {
            let mut script = format!(
                "link set lo up\n\
                 addr add {ip}/32 dev {podif}\n\
                 link set {podif} up\n\
                 route add {gw}/32 dev {podif} scope link\n\
                 route add default via {gw} dev {podif} src {ip}\n",
                ip = pod.ip,
                podif = pod.veth_pod,
                gw = pod.gateway_ip,
            );
            if let Some(ip6) = pod.ip6 {
                script += &format!(
                    "addr add {ip6}/128 dev {podif} nodad\n\
                     route add default via {POD_GATEWAY_LINK_LOCAL} dev {podif} src {ip6}\n",
                    podif = pod.veth_pod,
                );
            }
            cmd::ip_batch(pod.netns.name(), &script)?;
        }
    }
    cmd::ip_batch(underlay.name(), &underlay_script)
}

/// Socket and process helpers shared by nodes and pods (both are a netns plus a cgroup).
macro_rules! place_helpers {
    () => {
        /// A command whose process runs inside this namespace and cgroup.
        ///
        /// It is killed when the cluster is dropped, if still running.
        pub fn command(&self, program: impl AsRef<OsStr>) -> Result<Command> {
            self.netns.command(program, &self.cgroup_path)
        }

        /// Runs `f` on a thread inside this network namespace (see [`Netns::run`]).
        pub fn run<F, R>(&self, f: F) -> Result<R>
        where
            F: FnOnce() -> R + Send,
            R: Send,
        {
            self.netns.run(f)
        }

        /// A TCP listener on 0.0.0.0:`port` inside this namespace (0 picks a free port).
        pub fn tcp_listener(&self, port: u16) -> Result<TcpListener> {
            self.netns.tcp_listener(port)
        }

        /// A UDP socket on 0.0.0.0:`port` inside this namespace.
        pub fn udp_socket(&self, port: u16) -> Result<UdpSocket> {
            self.netns.udp_socket(port)
        }

        /// A TCP connection from inside this namespace to `addr`.
        pub fn tcp_connect(&self, addr: SocketAddr) -> Result<TcpStream> {
            self.netns.tcp_connect(addr)
        }

        /// Sends `payload` to a TCP echo server at `addr` from inside this namespace and
        /// returns what came back (everything until the server closed).
        pub fn echo(&self, addr: SocketAddr, payload: &[u8]) -> Result<Vec<u8>> {
            servers::echo_roundtrip(&self.netns, addr, payload)
        }

        /// `GET path` over HTTP/1.1 from inside this namespace.
        pub fn http_get(&self, addr: SocketAddr, path: &str) -> Result<HttpResponse> {
            servers::http_get(&self.netns, addr, path)
        }
    };
}

impl Node {
    place_helpers!();

    /// The node's name from the spec.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The node's network namespace.
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// The node's underlay address, 10.200.0.N.
    pub fn underlay_ip(&self) -> Ipv4Addr {
        self.underlay_ip
    }

    /// The node's interface on the underlay (inside the node namespace), `<run>-nN`.
    pub fn underlay_iface(&self) -> &str {
        &self.underlay_iface
    }

    /// The bridge port the node is plugged into (inside the underlay namespace), `<run>-uN`.
    pub fn bridge_port(&self) -> &str {
        &self.bridge_port
    }

    /// The node's IPv6 address on the underlay, fd00:200::N (dual-stack clusters only).
    pub fn underlay_ip6(&self) -> Option<Ipv6Addr> {
        self.underlay_ip6
    }

    /// The node's IPv6 address that its pods reach, fd00:201:N::1 (dual-stack clusters
    /// only; pods route to it through the link-local fe80::1 on their veth).
    pub fn pod_gateway_ip6(&self) -> Option<Ipv6Addr> {
        self.gateway_ip6
    }

    /// The node's pod CIDR, 10.201.N.0/24; other nodes route it via this node's underlay IP.
    pub fn pod_cidr(&self) -> Ipv4Cidr {
        self.pod_cidr
    }

    /// 10.201.N.1: the node's own address that its pods use as default gateway. It sits on
    /// the node's loopback, so a node proxy can listen on it and every pod can reach it.
    pub fn pod_gateway_ip(&self) -> Ipv4Addr {
        self.gateway_ip
    }

    /// The cgroup for node processes (agent, proxy): `.../nodes/<node>/system`.
    pub fn cgroup_path(&self) -> &Path {
        &self.cgroup_path
    }

    /// The id of [`Node::cgroup_path`].
    pub fn cgroup_id(&self) -> u64 {
        self.cgroup_id
    }

    /// The parent cgroup of this node's pods (`.../nodes/<node>/pods`): where a node agent
    /// attaches cgroup programs so that they see the pods and not itself.
    pub fn pods_cgroup_path(&self) -> &Path {
        &self.pods_cgroup_path
    }

    /// The id of [`Node::pods_cgroup_path`].
    pub fn pods_cgroup_id(&self) -> u64 {
        self.pods_cgroup_id
    }

    /// The node's pods, in spec order (pod P has address 10.201.N.(P+1)).
    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// Starts a TCP echo server on 0.0.0.0:`port` in the node namespace.
    pub fn serve_echo(&self, port: u16) -> Result<Server> {
        servers::serve_echo(&self.netns, self.underlay_ip, port)
    }
}

impl Pod {
    place_helpers!();

    /// The pod's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The pod's Kubernetes namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The pod's service account.
    pub fn service_account(&self) -> &str {
        &self.service_account
    }

    /// The name of the node the pod runs on.
    pub fn node_name(&self) -> &str {
        &self.node
    }

    /// The pod's address, 10.201.N.(P+1).
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// The pod's IPv6 address, fd00:201:N::(P+1) (dual-stack clusters only).
    pub fn ip6(&self) -> Option<Ipv6Addr> {
        self.ip6
    }

    /// The pod's default gateway: its node's [`Node::pod_gateway_ip`].
    pub fn gateway_ip(&self) -> Ipv4Addr {
        self.gateway_ip
    }

    /// The pod's network namespace.
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// The pod namespace's cookie (`SO_NETNS_COOKIE`, `bpf_get_netns_cookie`).
    pub fn netns_cookie(&self) -> u64 {
        self.netns_cookie
    }

    /// The pod side of its veth (inside the pod namespace): always `eth0`.
    pub fn veth_pod(&self) -> &str {
        &self.veth_pod
    }

    /// The node side of its veth (inside the node namespace), `<run>hNpP`.
    pub fn veth_host(&self) -> &str {
        &self.veth_host
    }

    /// The pod's cgroup: `.../nodes/<node>/pods/<namespace>_<name>`.
    pub fn cgroup_path(&self) -> &Path {
        &self.cgroup_path
    }

    /// A command whose process runs in this pod's namespace and in the cgroup `relative`
    /// below the pod's own (created if missing), e.g. named the way kubelet names a pod's
    /// cgroup. Killed, and the cgroups removed, when the cluster is dropped.
    pub fn command_in_cgroup(
        &self,
        program: impl AsRef<OsStr>,
        relative: &Path,
    ) -> Result<Command> {
        let below = relative
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
        if !below || relative.as_os_str().is_empty() {
            return Err(crate::Error::io(
                "creating cgroup",
                relative,
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "must be a relative path below the pod's cgroup",
                ),
            ));
        }
        let cgroup = self.cgroup_path.join(relative);
        std::fs::create_dir_all(&cgroup)
            .map_err(|e| crate::Error::io("creating cgroup", &cgroup, e))?;
        self.netns.command(program, &cgroup)
    }

    /// The pod's cgroup id (`bpf_get_current_cgroup_id` of its processes).
    pub fn cgroup_id(&self) -> u64 {
        self.cgroup_id
    }

    /// Starts a TCP echo server on 0.0.0.0:`port` in the pod.
    pub fn serve_echo(&self, port: u16) -> Result<Server> {
        servers::serve_echo(&self.netns, self.ip, port)
    }

    /// Starts an HTTP/1.1 server on 0.0.0.0:`port` in the pod that answers every request
    /// with 200, header `x-served-by: <namespace>/<name>` and body `<namespace>/<name>`.
    pub fn serve_http(&self, port: u16) -> Result<Server> {
        servers::serve_http(
            &self.netns,
            self.ip,
            port,
            format!("{}/{}", self.namespace, self.name),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_contains() {
        let cidr = Ipv4Cidr {
            addr: Ipv4Addr::new(10, 201, 3, 0),
            prefix_len: 24,
        };
        assert!(cidr.contains(Ipv4Addr::new(10, 201, 3, 77)));
        assert!(!cidr.contains(Ipv4Addr::new(10, 201, 4, 1)));
        assert_eq!(cidr.to_string(), "10.201.3.0/24");
        let all = Ipv4Cidr {
            addr: Ipv4Addr::UNSPECIFIED,
            prefix_len: 0,
        };
        assert!(all.contains(Ipv4Addr::new(1, 2, 3, 4)));
    }
}
