//! What the agent knows of the cluster: namespaces, pods (and which are enrolled), the
//! authorization policies in force, and Services with their EndpointSlices.
//!
//! The state is an immutable snapshot; sources (a manifest directory, Kubernetes) publish a
//! new snapshot on every change, so readers never see a half-applied update.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use zmesh_proxy::policy::PolicySet;
use zmesh_proxy::Endpoint;

use crate::services::{EndpointSliceInfo, ServiceInfo};

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
    /// The workload the pod belongs to, as Istio names it in telemetry (`workload_name`):
    /// its Deployment, StatefulSet, DaemonSet, Job or CronJob, else the pod itself.
    pub workload_name: String,
    /// `metadata.uid`: tells a pod from an earlier one of the same name, and names its
    /// cgroup on its node (how the agent finds its network namespace). `None` in manifests
    /// that do not set it.
    pub uid: Option<String>,
    /// Node the pod is scheduled on; `None` while unscheduled.
    pub node: Option<String>,
    /// Pod IPs (status.podIPs, or status.podIP); empty until the pod has a network.
    pub ips: Vec<IpAddr>,
    pub service_account: String,
    pub host_network: bool,
    pub labels: BTreeMap<String, String>,
    pub netns_path: Option<PathBuf>,
    pub cgroup_path: Option<PathBuf>,
    /// Whether it may serve Services: its `Ready` condition is `True` and it is not being
    /// deleted (no `metadata.deletionTimestamp`).
    pub ready: bool,
    /// Named TCP container ports (of its containers, then of its sidecars: init containers
    /// with `restartPolicy: Always`), for Services' named `targetPort`s. The first of a name
    /// wins.
    pub ports: BTreeMap<String, u16>,
}

/// Istio's label that names a pod's workload outright.
pub const WORKLOAD_NAME_LABEL: &str = "service.istio.io/workload-name";

/// The name of the workload a pod belongs to, derived as Istio derives it
/// (`GetDeployMetaFromPod`): the label [`WORKLOAD_NAME_LABEL`] if set; else its controller,
/// with a ReplicaSet's `-<pod-template-hash>` taken off (its Deployment) and a Job's
/// `-<schedule>` suffix taken off (its CronJob); else the pod's own name.
pub fn workload_name(
    pod: &str,
    labels: &BTreeMap<String, String>,
    owners: Option<&[k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference]>,
) -> String {
    if let Some(name) = labels.get(WORKLOAD_NAME_LABEL).filter(|n| !n.is_empty()) {
        return name.clone();
    }
    let Some(controller) = owners
        .into_iter()
        .flatten()
        .find(|o| o.controller == Some(true))
    else {
        return pod.to_owned();
    };
    let name = controller.name.as_str();
    match controller.kind.as_str() {
        "ReplicaSet" => labels
            .get("pod-template-hash")
            .filter(|hash| !hash.is_empty())
            .and_then(|hash| name.strip_suffix(hash.as_str()))
            .and_then(|rest| rest.strip_suffix('-'))
            .filter(|deployment| !deployment.is_empty())
            .unwrap_or(name)
            .to_owned(),
        // A CronJob's Jobs are named `<cronjob>-<scheduled time in minutes>`.
        "Job" => match name.rsplit_once('-') {
            Some((cronjob, stamp))
                if !cronjob.is_empty()
                    && stamp.len() >= 8
                    && stamp.bytes().all(|b| b.is_ascii_digit()) =>
            {
                cronjob.to_owned()
            }
            _ => name.to_owned(),
        },
        _ => name.to_owned(),
    }
}

/// Why a Pod object could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PodError {
    #[error("missing {0}")]
    Missing(&'static str),
    #[error("status.podIP {0:?} is not an IP address")]
    BadIp(String),
    #[error("{field}: {value} is not a port number (1-65535)")]
    BadPort { field: String, value: i32 },
}

impl PodInfo {
    /// Keeps the fields of a Kubernetes Pod the agent needs. A missing namespace means
    /// `default`, as kubectl applies it.
    pub fn from_pod(pod: k8s_openapi::api::core::v1::Pod) -> Result<Self, PodError> {
        Self::convert(pod, false)
    }

    /// Like [`PodInfo::from_pod`], for a pod written in a manifest directory: one without
    /// status conditions but with `status.phase: Running` is ready too (nothing runs
    /// readiness probes there; the lab writes the phase alone).
    pub fn from_manifest_pod(pod: k8s_openapi::api::core::v1::Pod) -> Result<Self, PodError> {
        Self::convert(pod, true)
    }

    fn convert(
        pod: k8s_openapi::api::core::v1::Pod,
        running_is_ready: bool,
    ) -> Result<Self, PodError> {
        let meta = pod.metadata;
        let name = meta.name.ok_or(PodError::Missing("metadata.name"))?;
        let spec = pod.spec.ok_or(PodError::Missing("spec"))?;
        let status = pod.status.unwrap_or_default();
        let conditions = status.conditions.unwrap_or_default();
        let ready = meta.deletion_timestamp.is_none()
            && if conditions.is_empty() {
                running_is_ready && status.phase.as_deref() == Some("Running")
            } else {
                conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
            };
        let mut ports = BTreeMap::new();
        let sidecars = spec
            .init_containers
            .iter()
            .flatten()
            .enumerate()
            .filter(|(_, c)| c.restart_policy.as_deref() == Some("Always"));
        let containers = spec
            .containers
            .iter()
            .enumerate()
            .map(|(i, c)| ("spec.containers", i, c))
            .chain(sidecars.map(|(i, c)| ("spec.initContainers", i, c)));
        for (list, i, container) in containers {
            for (j, port) in container.ports.iter().flatten().enumerate() {
                let Some(port_name) = port.name.as_ref().filter(|n| !n.is_empty()) else {
                    continue;
                };
                if !matches!(port.protocol.as_deref(), None | Some("TCP")) {
                    continue;
                }
                let number = u16::try_from(port.container_port)
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| PodError::BadPort {
                        field: format!("{list}[{i}].ports[{j}].containerPort"),
                        value: port.container_port,
                    })?;
                ports.entry(port_name.clone()).or_insert(number);
            }
        }
        let mut ips = Vec::new();
        let all_ips = status.pod_ips.unwrap_or_default().into_iter().map(|p| p.ip);
        for ip in all_ips.chain(status.pod_ip) {
            let parsed: IpAddr = ip.parse().map_err(|_| PodError::BadIp(ip))?;
            if !ips.contains(&parsed) {
                ips.push(parsed);
            }
        }
        let annotations = meta.annotations.unwrap_or_default();
        let labels = meta.labels.unwrap_or_default();
        let workload_name = workload_name(&name, &labels, meta.owner_references.as_deref());
        Ok(Self {
            namespace: meta.namespace.unwrap_or_else(|| "default".into()),
            name,
            workload_name,
            uid: meta.uid.filter(|uid| !uid.is_empty()),
            node: spec.node_name,
            ips,
            service_account: spec
                .service_account_name
                .unwrap_or_else(|| "default".into()),
            host_network: spec.host_network.unwrap_or(false),
            labels,
            netns_path: annotations.get(NETNS_ANNOTATION).map(PathBuf::from),
            cgroup_path: annotations.get(CGROUP_ANNOTATION).map(PathBuf::from),
            ready,
            ports,
        })
    }

    /// Drops what only the pod's own node needs (its node-local netns and cgroup paths).
    /// Labels stay: Service selectors match remote pods by them; so does the UID (small, and
    /// what tells a recreated pod from the old one).
    pub fn compact(mut self) -> Self {
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

/// An AuthorizationPolicy that could not be used as written, and what is enforced in its
/// place (`zmesh config policies` shows them).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PolicyProblem {
    /// `namespace/name`, and the manifest file and document it is in when it came from one.
    pub policy: String,
    /// Its namespace, when the object names one.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Every problem found, with field paths.
    pub reason: String,
    /// What is enforced instead.
    pub enforced: String,
}

/// One consistent view of namespaces, pods, authorization policies, Services and
/// EndpointSlices.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterState {
    namespaces: BTreeMap<String, NamespaceInfo>,
    pods: BTreeMap<PodKey, PodInfo>,
    /// Only ever a whole, valid set: sources keep the last good policies of a bad input.
    policies: Arc<PolicySet>,
    /// The policy objects that are invalid, by name.
    policy_problems: Arc<Vec<PolicyProblem>>,
    /// By (namespace, name).
    services: BTreeMap<(String, String), ServiceInfo>,
    /// By (namespace, name).
    endpoint_slices: BTreeMap<(String, String), EndpointSliceInfo>,
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
            policy_problems: Arc::default(),
            services: BTreeMap::new(),
            endpoint_slices: BTreeMap::new(),
        }
    }

    /// The same state with `services` (and no others). A later one of the same
    /// namespace/name replaces an earlier one.
    pub fn with_services(mut self, services: impl IntoIterator<Item = ServiceInfo>) -> Self {
        self.services = services
            .into_iter()
            .map(|s| ((s.namespace.clone(), s.name.clone()), s))
            .collect();
        self
    }

    /// The same state with `slices` (and no others). A later one of the same namespace/name
    /// replaces an earlier one.
    pub fn with_endpoint_slices(
        mut self,
        slices: impl IntoIterator<Item = EndpointSliceInfo>,
    ) -> Self {
        self.endpoint_slices = slices
            .into_iter()
            .map(|s| ((s.namespace.clone(), s.name.clone()), s))
            .collect();
        self
    }

    /// Sets the addresses of pod `key` (if known): for a node agent that learnt them before
    /// the Pod's status says so (from the CNI chain's result).
    pub fn set_pod_ips(&mut self, key: &PodKey, ips: Vec<IpAddr>) {
        if let Some(pod) = self.pods.get_mut(key) {
            pod.ips = ips;
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

    /// The same state with these invalid policy objects noted.
    pub fn with_policy_problems(
        mut self,
        problems: impl IntoIterator<Item = PolicyProblem>,
    ) -> Self {
        self.policy_problems = Arc::new(problems.into_iter().collect());
        self
    }

    /// The policy objects that could not be used as written.
    pub fn policy_problems(&self) -> &[PolicyProblem] {
        &self.policy_problems
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

    /// Every Service, by namespace then name.
    pub fn services(&self) -> impl Iterator<Item = &ServiceInfo> {
        self.services.values()
    }

    pub fn service(&self, namespace: &str, name: &str) -> Option<&ServiceInfo> {
        self.services.get(&(namespace.to_owned(), name.to_owned()))
    }

    /// Every EndpointSlice, by namespace then name.
    pub fn endpoint_slices(&self) -> impl Iterator<Item = &EndpointSliceInfo> {
        self.endpoint_slices.values()
    }

    /// The endpoints serving `service`, ordered by IP; each with its port for every service
    /// port it serves (an endpoint serving none of them is left out).
    ///
    /// - With a selector: the ready pods of the service's namespace that have IPs and whose
    ///   labels include every pair of the selector, one endpoint per pod IP. A named
    ///   `targetPort` is looked up in the pod's named ports; a pod without it does not serve
    ///   that port.
    /// - Without: the ready addresses of the EndpointSlices labelled with the service's
    ///   name in its namespace, each service port mapped to the slice port of the same name
    ///   (an unnamed one to the unnamed one).
    ///
    /// Should two pods (or slices) claim one IP, the first in namespace/name order gives its
    /// ports; for slices, a port it lacks may come from the next.
    pub fn service_endpoints(&self, service: &ServiceInfo) -> Vec<Endpoint> {
        let mut endpoints: BTreeMap<IpAddr, BTreeMap<u16, u16>> = BTreeMap::new();
        match &service.selector {
            Some(selector) => {
                let pods = self.pods.values().filter(|p| {
                    p.namespace == service.namespace
                        && p.ready
                        && selector.iter().all(|(k, v)| p.labels.get(k) == Some(v))
                });
                for pod in pods {
                    let ports: BTreeMap<u16, u16> = service
                        .ports
                        .iter()
                        .filter_map(|sp| Some((sp.port, sp.target_on(&pod.ports)?)))
                        .collect();
                    if ports.is_empty() {
                        continue;
                    }
                    for ip in &pod.ips {
                        endpoints.entry(*ip).or_insert_with(|| ports.clone());
                    }
                }
            }
            None => {
                let slices = self
                    .endpoint_slices
                    .values()
                    .filter(|s| s.namespace == service.namespace && s.service == service.name);
                for slice in slices {
                    let ports: BTreeMap<u16, u16> = service
                        .ports
                        .iter()
                        .filter_map(|sp| {
                            let (_, target) =
                                slice.ports.iter().find(|(name, _)| *name == sp.name)?;
                            Some((sp.port, *target))
                        })
                        .collect();
                    if ports.is_empty() {
                        continue;
                    }
                    for (ip, _) in slice.endpoints.iter().filter(|(_, ready)| *ready) {
                        let served = endpoints.entry(*ip).or_default();
                        for (port, target) in &ports {
                            served.entry(*port).or_insert(*target);
                        }
                    }
                }
            }
        }
        endpoints
            .into_iter()
            .filter(|(_, ports)| !ports.is_empty())
            .map(|(ip, ports)| Endpoint { ip, ports })
            .collect()
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
            workload_name: name.into(),
            uid: Some(format!("uid-{name}")),
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
            ready: true,
            ports: BTreeMap::new(),
        }
    }

    fn owner(
        kind: &str,
        name: &str,
        controller: bool,
    ) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
        k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
            api_version: "apps/v1".into(),
            kind: kind.into(),
            name: name.into(),
            uid: "u".into(),
            controller: Some(controller),
            block_owner_deletion: None,
        }
    }

    #[test]
    fn workload_names_follow_istio() {
        let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let hash = labels(&[("pod-template-hash", "7c9f8b6d5")]);
        let rs = [owner("ReplicaSet", "web-7c9f8b6d5", true)];
        assert_eq!(
            workload_name("web-7c9f8b6d5-x2k4q", &hash, Some(&rs)),
            "web"
        );
        // A ReplicaSet of its own (no Deployment's hash suffix) is the workload.
        let bare = [owner("ReplicaSet", "cache", true)];
        assert_eq!(workload_name("cache-abcde", &hash, Some(&bare)), "cache");
        let sts = [owner("StatefulSet", "db", true)];
        assert_eq!(workload_name("db-0", &BTreeMap::new(), Some(&sts)), "db");
        let cron = [owner("Job", "backup-29012345", true)];
        assert_eq!(
            workload_name("backup-29012345-abcde", &BTreeMap::new(), Some(&cron)),
            "backup"
        );
        let job = [owner("Job", "migrate-v2", true)];
        assert_eq!(
            workload_name("migrate-v2-abcde", &BTreeMap::new(), Some(&job)),
            "migrate-v2"
        );
        // Only the controller counts; no controller: the pod itself.
        let not_controller = [owner("ReplicaSet", "web-7c9f8b6d5", false)];
        assert_eq!(workload_name("p", &hash, Some(&not_controller)), "p");
        assert_eq!(workload_name("p", &BTreeMap::new(), None), "p");
        // Istio's label wins.
        let named = labels(&[("service.istio.io/workload-name", "frontend")]);
        assert_eq!(workload_name("p", &named, Some(&rs)), "frontend");
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
    fn compact_keeps_labels_for_selectors_and_drops_node_local_paths() {
        let mut full = pod(
            "mesh",
            "a",
            &[("app", "web"), (ISTIO_DATAPLANE_LABEL, "none")],
        );
        full.netns_path = Some("/run/netns/a".into());
        full.cgroup_path = Some("/sys/fs/cgroup/a".into());
        full.ports.insert("http".into(), 8080);
        let compact = full.clone().compact();
        assert_eq!(compact.labels, full.labels);
        assert_eq!(compact.ports, full.ports);
        assert!(compact.ready);
        assert_eq!(compact.uid, full.uid);
        assert_eq!((compact.netns_path, compact.cgroup_path), (None, None));
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
