//! The zmesh node agent, one per node: cluster state in (from `zmesh-cluster`); workload
//! certificates, eBPF redirection and the node proxy's configuration out.
//!
//! - [`run`]: the agent itself, its configuration and the reconcile loop.
//! - `datapath`: the proxy on a thread and runtime of its own, watched.
//! - `steering`: the eBPF programs and enrollment maps (blocking syscalls).
//! - [`discovery`]: where a pod's network namespace is on this node (annotation, registry
//!   fed by the CNI plugin, or a scan of /proc for the pod's cgroup).
//! - [`cni_state`]: the node-local file of enrolled namespaces the CNI plugin reads.
//! - [`cni_install`]: installs the CNI plugin (binary and conflist entry) on the node and
//!   keeps it installed.
//! - [`cni_server`]: answers the CNI plugin's ADD/DEL/CHECK (a starting pod waits until
//!   it is enrolled).
//! - [`table`]: cluster state -> the proxy's workload table.
//! - [`ca`], [`credentials`], [`spire`]: where workload certificates come from (the zmesh
//!   CA with the node's credential, or a SPIRE agent) and the TLS configs built from them.
//! - [`admin`], [`flows_api`], [`config_api`]: the admin API on a unix socket (certificates,
//!   flows, what the agent holds, its version and log level).
//! - [`zds`]: stock ztunnel as the data plane, fed over ZDS.

pub mod admin;
pub mod ca;
pub mod cni_install;
pub mod cni_server;
pub mod cni_state;
pub mod config_api;
pub mod credentials;
pub mod datapath;
pub mod discovery;
pub mod flows_api;
pub mod handover;
pub mod inpod;
mod local_socket;
mod run;
pub mod spire;
pub mod status;
mod steering;
pub mod table;
pub mod zds;

pub use datapath::DataPathError;
pub use run::{run, AgentConfig, AgentError, DataPlane, IdentitySource, RedirectSettings};
pub use steering::netns_cookie;
