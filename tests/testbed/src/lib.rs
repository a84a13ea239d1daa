//! A Kubernetes-like cluster on one machine, built from network namespaces and cgroups, for
//! end-to-end tests and `zmesh demo`. Needs root, iproute2, cgroup v2 and (for captures)
//! tcpdump.
//!
//! ```no_run
//! use zmesh_testbed::{Cluster, ClusterSpec};
//! let cluster = Cluster::build(
//!     &ClusterSpec::new()
//!         .node("node1", |n| n.pod("web", "default", "web"))
//!         .node("node2", |n| n.pod("client", "default", "sleep")),
//! )?;
//! let server = cluster.pod("default", "web").unwrap().serve_echo(8080)?;
//! let echoed = cluster.pod("default", "client").unwrap().echo(server.addr(), b"hi")?;
//! assert_eq!(echoed, b"hi");
//! # Ok::<(), zmesh_testbed::Error>(())
//! ```
//!
//! Sockets made by [`Pod::tcp_listener`], [`Pod::tcp_connect`] or inside [`Pod::run`] are
//! std sockets that stay in the pod's namespace; for async code, set them non-blocking and
//! hand them to `tokio::net::TcpStream::from_std` (or `TcpListener::from_std`).
//!
//! # Topology
//!
//! With run id `R` (`zt` + 5 base36 characters, unique per cluster), node N (1-based, in
//! spec order) and pod P of that node (1-based):
//!
//! | what | where | name / address |
//! |---|---|---|
//! | underlay | netns `R-underlay` | bridge `R-br`, no address |
//! | node N | netns `R-node-<node>` | `R-nN` = 10.200.0.N/24, plugged into bridge port `R-uN` |
//! | node N gateway | node netns, on `lo` | 10.201.N.1/32 ([`Node::pod_gateway_ip`]) |
//! | node N pod CIDR | | 10.201.N.0/24, routed by every other node via 10.200.0.N |
//! | pod P of node N | netns `R-pod-<namespace>.<name>` | `eth0` = 10.201.N.(P+1)/32 |
//! | pod veth, node side | node netns | `RhNpP`, route 10.201.N.(P+1)/32 dev `RhNpP` src 10.201.N.1 |
//! | pod routes | pod netns | 10.201.N.1 dev eth0 scope link; default via 10.201.N.1 |
//!
//! Nodes forward (`ip_forward=1`, `rp_filter=0`); IPv6 is disabled everywhere so captures
//! only hold the test's IPv4 traffic. Links are created directly inside their namespaces,
//! so nothing of a run ever appears in the root namespace.
//!
//! cgroups live under the cgroup2 mount (found in /proc/self/mounts):
//! `<cgroup2>/zmesh-testbed/R/` holds `capture/` (tcpdump), and per node
//! `nodes/<node>/system/` (node processes, e.g. the agent) and `nodes/<node>/pods/` with one
//! `<namespace>_<name>/` per pod.
//!
//! # Lifetime
//!
//! Dropping a [`Cluster`] (also while unwinding from a panic) kills every process in the
//! run's cgroups, deletes its namespaces (which removes their links and routes) and removes
//! its cgroups. The owning process is recorded in `/run/zmesh-testbed/R`; each build first
//! removes runs whose owner died without cleaning up, and never touches a live run.

mod capture;
mod cgroup;
mod cluster;
mod cmd;
mod error;
mod netns;
mod pcap;
mod run;
mod servers;
mod spec;

pub use capture::Capture;
pub use cgroup::{cgroup2_mount, unescape_mount_path};
pub use cluster::{Cluster, Ipv4Cidr, Node, Pod};
pub use error::{Error, Result};
pub use netns::Netns;
pub use pcap::{Ipv4Header, Ipv6Header, Packet, Pcap, TcpFlow, TcpFlow6, TcpSegment, UdpDatagram};
pub use run::{cleanup_leftovers, run_is_recorded, RUN_ID_PREFIX};
pub use servers::{HttpResponse, Server};
pub use spec::{ClusterSpec, NodeSpec, PodSpec, MAX_NODES, MAX_PODS_PER_NODE};
