//! The cluster as zmesh sees it, and where that view comes from.
//!
//! - [`state`]: namespaces, pods, authorization policies and Services ([`ClusterState`]),
//!   the enrollment rule (who is in the mesh) and which endpoints serve a Service.
//! - [`services`]: Services and EndpointSlices as the state keeps them.
//! - [`manifests`] and [`kube_source`]: the two sources of that state, a directory of
//!   Kubernetes YAML (watched) or the Kubernetes API (list/watch). Both publish snapshots on
//!   a `tokio::sync::watch` channel.
//! - [`placement`] and [`token_review`]: what the CA needs of the cluster, which workloads
//!   run on which node, and which node a ServiceAccount token belongs to.
//! - [`enroll`]: `zmesh enroll` / `unenroll` in a manifest directory.
//! - [`access`]: the Kubernetes permissions the agent and the CA need, checked at start.
//!
//! No eBPF and no data path here: the agent (`zmesh-agent`) turns this state into them.

pub mod access;
pub mod agent_status;
pub mod enroll;
pub mod kube_source;
pub mod manifests;
pub mod placement;
pub mod services;
pub mod state;
pub mod token_review;

pub use services::{
    EndpointSliceError, EndpointSliceInfo, ServiceError, ServiceInfo, SERVICE_NAME_LABEL,
};
pub use state::{
    ClusterState, NamespaceInfo, PodError, PodInfo, PodKey, PolicyProblem, CGROUP_ANNOTATION,
    CILIUM_MTLS_LABEL, ISTIO_DATAPLANE_LABEL, NETNS_ANNOTATION,
};
