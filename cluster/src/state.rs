//! What the agent knows of the cluster: namespaces, pods (and which are enrolled), and the
//! authorization policies in force.
//!
//! The state is an immutable snapshot; sources (a manifest directory, Kubernetes) publish a
//! new snapshot on every change, so readers never see a half-applied update.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use zmesh_proxy::policy::PolicySet;

/// Namespace label that enrolls a namespace (Cilium's).
pub const CILIUM_MTLS_LABEL: &str = "io.cilium/mtls-enabled";
/// Namespace label that enrolls a namespace (Istio ambient's), and pod label that opts out.
pub const ISTIO_DATAPLANE_LABEL: &str = "istio.io/dataplane-mode";
/// Pod annotation giving the pod's network namespace path on its node (manifest mode only:
/// the Kubernetes API does not hold node-local facts).
pub const NETNS_ANNOTATION: &str = "zmesh.io/netns";
/// Pod annotation giving the pod's cgroup v2 directory on its node (manifest mode only).
pub const CGROUP_ANNOTATION: &str = "zmesh.io/cgroup";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceInfo {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

impl NamespaceInfo {
    /// Whether the namespace asks for the mesh through either project's label.
    pub fn enrolls_pods(&self) -> bool {
        self.labels.get(CILIUM_MTLS_LABEL).map(String::as_str) == Some("true")
            || self.labels.get(ISTIO_DATAPLANE_LABEL).map(String::as_str) == Some("ambient")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    /// Node the pod is scheduled on; `None` while unscheduled.
    pub node: Option<String>,
    /// Pod IPs (status.podIPs, or status.podIP); empty until the pod has a network.
    pub ips: Vec<IpAddr>,
    pub service_account: String,
    pub host_network: bool,
    pub labels: BTreeMap<String, String>,
    pub netns_path: Option<PathBuf>,
    pub cgroup_path: Option<PathBuf>,
}

/// Why a Pod object could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PodError {
    #[error("missing {0}")]
    Missing(&'static str),
    #[error("status.podIP {0:?} is not an IP address")]
    BadIp(String),
}

impl PodInfo {
    /// Keeps the fields of a Kubernetes Pod the agent needs. A missing namespace means
    /// `default`, as kubectl applies it.
    pub fn from_pod(pod: k8s_openapi::api::core::v1::Pod) -> Result<Self, PodError> {
        let meta = pod.metadata;
        let name = meta.name.ok_or(PodError::Missing("metadata.name"))?;
        let spec = pod.spec.ok_or(PodError::Missing("spec"))?;
        let status = pod.status.unwrap_or_default();
        let mut ips = Vec::new();
        let all_ips = status.pod_ips.unwrap_or_default().into_iter().map(|p| p.ip);
        for ip in all_ips.chain(status.pod_ip) {
            let parsed: IpAddr = ip.parse().map_err(|_| PodError::BadIp(ip))?;
            if !ips.contains(&parsed) {
                ips.push(parsed);
            }
        }
        let annotations = meta.annotations.unwrap_or_default();
        Ok(Self {
            namespace: meta.namespace.unwrap_or_else(|| "default".into()),
            name,
            node: spec.node_name,
            ips,
            service_account: spec
                .service_account_name
                .unwrap_or_else(|| "default".into()),
            host_network: spec.host_network.unwrap_or(false),
            labels: meta.labels.unwrap_or_default(),
            netns_path: annotations.get(NETNS_ANNOTATION).map(PathBuf::from),
            cgroup_path: annotations.get(CGROUP_ANNOTATION).map(PathBuf::from),
        })
    }

    /// Drops what only the pod's own node needs (labels other than the opt-out ones,
    /// node-local paths): remote pods are kept this small so memory scales with the cluster.
    pub fn compact(mut self) -> Self {
        self.labels
            .retain(|k, _| k == CILIUM_MTLS_LABEL || k == ISTIO_DATAPLANE_LABEL);
        self.netns_path = None;
        self.cgroup_path = None;
        self
    }

    pub fn key(&self) -> PodKey {
        PodKey {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }

    /// Whether the pod opted out of the mesh with either project's label.
    pub fn opted_out(&self) -> bool {
        self.labels.get(ISTIO_DATAPLANE_LABEL).map(String::as_str) == Some("none")
            || self.labels.get(CILIUM_MTLS_LABEL).map(String::as_str) == Some("false")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodKey {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for PodKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One consistent view of namespaces, pods and authorization policies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterState {
    namespaces: BTreeMap<String, NamespaceInfo>,
    pods: BTreeMap<PodKey, PodInfo>,
    /// Only ever a whole, valid set: sources keep the last good policies of a bad input.
    policies: Arc<PolicySet>,
}

impl ClusterState {
    pub fn new(
        namespaces: impl IntoIterator<Item = NamespaceInfo>,
        pods: impl IntoIterator<Item = PodInfo>,
    ) -> Self {
        Self {
            namespaces: namespaces
                .into_iter()
                .map(|n| (n.name.clone(), n))
                .collect(),
            pods: pods.into_iter().map(|p| (p.key(), p)).collect(),
            policies: Arc::default(),
        }
    }

    /// The same state with `policies` in force.
    pub fn with_policies(mut self, policies: PolicySet) -> Self {
        self.policies = Arc::new(policies);
        self
    }

    /// The authorization policies in force (the proxy's `PolicyStore` follows them).
    pub fn policies(&self) -> &Arc<PolicySet> {
        &self.policies
    }

    pub fn namespace(&self, name: &str) -> Option<&NamespaceInfo> {
        self.namespaces.get(name)
    }

    pub fn namespaces(&self) -> impl Iterator<Item = &NamespaceInfo> {
        self.namespaces.values()
    }

    pub fn pods(&self) -> impl Iterator<Item = &PodInfo> {
        self.pods.values()
    }

    pub fn pod(&self, key: &PodKey) -> Option<&PodInfo> {
        self.pods.get(key)
    }

    pub fn pod_by_ip(&self, ip: IpAddr) -> Option<&PodInfo> {
        self.pods.values().find(|p| p.ips.contains(&ip))
    }

    /// A pod is enrolled when its namespace carries an enrolling label, it did not opt out,
    /// and it does not share the host's network (its traffic cannot be told apart).
    pub fn is_enrolled(&self, pod: &PodInfo) -> bool {
        !pod.host_network
            && !pod.opted_out()
            && self
                .namespaces
                .get(&pod.namespace)
                .is_some_and(NamespaceInfo::enrolls_pods)
    }

    /// Enrolled pods scheduled on `node`.
    pub fn enrolled_on<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a PodInfo> + 'a {
        self.pods
            .values()
            .filter(move |p| p.node.as_deref() == Some(node) && self.is_enrolled(p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(name: &str, labels: &[(&str, &str)]) -> NamespaceInfo {
        NamespaceInfo {
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn pod(ns: &str, name: &str, labels: &[(&str, &str)]) -> PodInfo {
        PodInfo {
            namespace: ns.into(),
            name: name.into(),
            node: Some("node1".into()),
            ips: vec!["10.0.0.1".parse().unwrap()],
            service_account: "default".into(),
            host_network: false,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            netns_path: None,
            cgroup_path: None,
        }
    }

    #[test]
    fn enrollment_follows_namespace_labels_and_pod_opt_outs() {
        let state = ClusterState::new(
            [
                ns("cilium", &[(CILIUM_MTLS_LABEL, "true")]),
                ns("istio", &[(ISTIO_DATAPLANE_LABEL, "ambient")]),
                ns("plain", &[]),
                ns("wrong-value", &[(CILIUM_MTLS_LABEL, "yes")]),
            ],
            [],
        );
        assert!(state.is_enrolled(&pod("cilium", "a", &[])));
        assert!(state.is_enrolled(&pod("istio", "a", &[])));
        assert!(!state.is_enrolled(&pod("plain", "a", &[])));
        assert!(!state.is_enrolled(&pod("wrong-value", "a", &[])));
        assert!(!state.is_enrolled(&pod("missing-namespace", "a", &[])));
        assert!(!state.is_enrolled(&pod("istio", "a", &[(ISTIO_DATAPLANE_LABEL, "none")])));
        assert!(!state.is_enrolled(&pod("cilium", "a", &[(CILIUM_MTLS_LABEL, "false")])));
        let mut host = pod("cilium", "a", &[]);
        host.host_network = true;
        assert!(!state.is_enrolled(&host));
    }

    #[test]
    fn enrolled_on_filters_by_node() {
        let mut other = pod("mesh", "b", &[]);
        other.node = Some("node2".into());
        let state = ClusterState::new(
            [ns("mesh", &[(CILIUM_MTLS_LABEL, "true")])],
            [pod("mesh", "a", &[]), other],
        );
        let names: Vec<_> = state.enrolled_on("node1").map(|p| p.name.clone()).collect();
        assert_eq!(names, ["a"]);
    }
}
