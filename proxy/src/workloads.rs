//! The workload table: which pods exist, their identities, IPs and nodes.
//!
//! The proxy looks up both ends of every connection here by IP. The node agent replaces the
//! whole table when pods come and go ([`WorkloadStore::replace`]); connections already
//! running keep the snapshot they started with.
//!
//! `zmesh proxy --workloads FILE` reads the YAML form:
//!
//! ```yaml
//! trustDomain: cluster.local        # optional, default cluster.local
//! nodes:                            # optional; only nodes with an explicit HBONE address
//!   - name: node-a
//!     hbone: 192.168.1.10:15008     # optional: dial this instead of <pod ip>:15008
//! workloads:
//!   - name: web-7d4f                # pod name
//!     namespace: default
//!     serviceAccount: web           # identity: spiffe://<td>/ns/<namespace>/sa/<sa>
//!     node: node-a
//!     ips: [10.0.1.5]
//!     protocol: hbone               # hbone (enrolled in the mesh, default) or tcp
//!     labels: {app: web}            # optional: the pod's labels, for policy selectors
//!     ports: {http: 8080}           # optional: named container ports, for named targetPorts
//! services:                         # optional: Kubernetes Services (ClusterIP)
//!   - name: web
//!     namespace: default
//!     vips: [10.96.0.10]            # what clients dial (one per family when dual-stack)
//!     ports: [{port: 80, targetPort: 8080}]   # targetPort: a number or a named port
//!     selector: {app: web}          # endpoints: workloads of the namespace with these labels
//!     sessionAffinity: ClientIP     # optional: a client keeps its endpoint (3 h by default,
//!     affinityTimeoutSeconds: 600   #   or this long after its last connection)
//! ```
//!
//! Unknown fields are errors, so that a typo never silently disables mTLS.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use zmesh_identity::{SpiffeIdError, TrustDomain, WorkloadId};

use crate::services::{Endpoint, Service, ServicePort, TargetPort};

/// Why a workload table was rejected.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("cannot read workload table {path}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid workload table")]
    Parse(#[from] serde_yaml_ng::Error),
    #[error("invalid trust domain {name:?}")]
    TrustDomain { name: String, source: SpiffeIdError },
    #[error("workload {namespace}/{name}: invalid identity")]
    Identity {
        namespace: String,
        name: String,
        source: SpiffeIdError,
    },
    #[error("workload {namespace}/{name}: field `ips` is empty")]
    NoIps { namespace: String, name: String },
    #[error("workload {namespace}/{name}: field `{field}` is empty")]
    EmptyField {
        namespace: String,
        name: String,
        field: &'static str,
    },
    #[error("workload {namespace}/{name}: named port {port:?} is 0")]
    NamedPortZero {
        namespace: String,
        name: String,
        port: String,
    },
    #[error("IP {ip} belongs to both {first} and {second}")]
    DuplicateIp {
        ip: IpAddr,
        first: String,
        second: String,
    },
    #[error("workload {0} is listed twice")]
    DuplicateWorkload(String),
    #[error("node {0:?} is listed twice")]
    DuplicateNode(String),
    #[error("service {0} is listed twice")]
    DuplicateService(String),
    #[error("service {service}: {reason}")]
    InvalidService { service: String, reason: String },
    #[error("VIP {ip} belongs to both {first} and {second}")]
    DuplicateVip {
        ip: IpAddr,
        first: String,
        second: String,
    },
}

/// Whether traffic to a workload goes through HBONE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Enrolled in the mesh: reached over HBONE with mTLS.
    #[default]
    Hbone,
    /// Not enrolled: reached over plain TCP.
    Tcp,
}

/// One pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workload {
    pub name: String,
    /// The Deployment (StatefulSet, ...) the pod belongs to, Istio's `workload_name`; the
    /// pod's own name when it has none.
    pub workload_name: String,
    pub namespace: String,
    pub service_account: String,
    pub node: String,
    pub ips: Vec<IpAddr>,
    pub protocol: Protocol,
    pub identity: WorkloadId,
    /// The pod's labels: authorization policies select their targets by them.
    pub labels: Arc<BTreeMap<String, String>>,
}

/// One node, as far as the proxy cares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub name: String,
    /// Where to dial this node's HBONE server instead of `<pod ip>:15008`
    /// (for nodes that do not capture traffic to pod IPs, e.g. benchmarks on loopback).
    pub hbone: Option<SocketAddr>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TableFile {
    #[serde(default)]
    trust_domain: Option<String>,
    #[serde(default)]
    nodes: Vec<NodeFile>,
    #[serde(default)]
    workloads: Vec<WorkloadFile>,
    #[serde(default)]
    services: Vec<ServiceFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ServiceFile {
    name: String,
    namespace: String,
    vips: Vec<IpAddr>,
    ports: Vec<ServicePortFile>,
    /// Endpoints: the namespace's workloads with all these labels.
    selector: BTreeMap<String, String>,
    #[serde(default)]
    session_affinity: Option<AffinityFile>,
    #[serde(default)]
    affinity_timeout_seconds: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ServicePortFile {
    #[serde(default)]
    name: Option<String>,
    port: u16,
    #[serde(default)]
    target_port: Option<TargetPortFile>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum TargetPortFile {
    Number(u16),
    Name(String),
}

#[derive(Deserialize, PartialEq, Eq)]
enum AffinityFile {
    None,
    ClientIP,
}

/// Kubernetes' default `sessionAffinityConfig.clientIP.timeoutSeconds`.
pub const DEFAULT_AFFINITY_TIMEOUT: Duration = Duration::from_secs(10800);

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct NodeFile {
    name: String,
    #[serde(default)]
    hbone: Option<SocketAddr>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WorkloadFile {
    name: String,
    namespace: String,
    service_account: String,
    node: String,
    ips: Vec<IpAddr>,
    #[serde(default)]
    protocol: Protocol,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    ports: BTreeMap<String, u16>,
    /// Defaults to `name`.
    #[serde(default)]
    workload_name: Option<String>,
}

/// An immutable snapshot of all workloads, indexed by IP, and of the Services.
#[derive(Debug, Default)]
pub struct WorkloadTable {
    trust_domain: TrustDomain,
    nodes: HashMap<String, Node>,
    by_ip: HashMap<IpAddr, Arc<Workload>>,
    workloads: Vec<Arc<Workload>>,
    services: Vec<Arc<Service>>,
    service_by_vip: HashMap<IpAddr, Arc<Service>>,
    /// `namespace/name` -> the service.
    service_by_key: HashMap<String, Arc<Service>>,
}

/// A table as it travels from the agent to a data path in another process: what
/// [`WorkloadTable::new`] and [`WorkloadTable::with_services`] take, checked again on the
/// way in.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TableWire {
    trust_domain: TrustDomain,
    nodes: Vec<Node>,
    workloads: Vec<Arc<Workload>>,
    services: Vec<Arc<Service>>,
}

impl Serialize for WorkloadTable {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut nodes: Vec<Node> = self.nodes.values().cloned().collect();
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        TableWire {
            trust_domain: self.trust_domain.clone(),
            nodes,
            workloads: self.workloads.clone(),
            services: self.services.clone(),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for WorkloadTable {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let wire = TableWire::deserialize(d)?;
        let unwrap = |w: Arc<Workload>| Arc::try_unwrap(w).unwrap_or_else(|w| (*w).clone());
        let unwrap_service = |s: Arc<Service>| Arc::try_unwrap(s).unwrap_or_else(|s| (*s).clone());
        WorkloadTable::new(
            wire.trust_domain,
            wire.nodes,
            wire.workloads.into_iter().map(unwrap),
        )
        .and_then(|table| table.with_services(wire.services.into_iter().map(unwrap_service)))
        .map_err(serde::de::Error::custom)
    }
}

impl WorkloadTable {
    /// Builds a table, checking that no IP belongs to two workloads.
    pub fn new(
        trust_domain: TrustDomain,
        nodes: impl IntoIterator<Item = Node>,
        workloads: impl IntoIterator<Item = Workload>,
    ) -> Result<Self, TableError> {
        let mut table = Self {
            trust_domain,
            ..Self::default()
        };
        for node in nodes {
            if table.nodes.contains_key(&node.name) {
                return Err(TableError::DuplicateNode(node.name));
            }
            table.nodes.insert(node.name.clone(), node);
        }
        let mut names = std::collections::HashSet::new();
        for workload in workloads {
            let key = format!("{}/{}", workload.namespace, workload.name);
            if !names.insert(key.clone()) {
                return Err(TableError::DuplicateWorkload(key));
            }
            if workload.ips.is_empty() {
                return Err(TableError::NoIps {
                    namespace: workload.namespace,
                    name: workload.name,
                });
            }
            let workload = Arc::new(workload);
            for ip in &workload.ips {
                if let Some(other) = table.by_ip.insert(*ip, workload.clone()) {
                    return Err(TableError::DuplicateIp {
                        ip: *ip,
                        first: format!("{}/{}", other.namespace, other.name),
                        second: key,
                    });
                }
            }
            table.workloads.push(workload);
        }
        Ok(table)
    }

    /// The same table with these Services. A VIP may not be a workload's IP nor another
    /// service's; a service port may not be listed twice.
    pub fn with_services(
        mut self,
        services: impl IntoIterator<Item = Service>,
    ) -> Result<Self, TableError> {
        for service in services {
            let key = service.key();
            if self.service_by_key.contains_key(&key) {
                return Err(TableError::DuplicateService(key));
            }
            let invalid = |reason: String| TableError::InvalidService {
                service: key.clone(),
                reason,
            };
            let mut ports = std::collections::HashSet::new();
            for port in &service.ports {
                if port.port == 0 {
                    return Err(invalid("port 0 is not a service port".into()));
                }
                if !ports.insert(port.port) {
                    return Err(invalid(format!("port {} is listed twice", port.port)));
                }
            }
            if let Some(vip) = service.vips.iter().find(|ip| self.by_ip.contains_key(ip)) {
                return Err(invalid(format!("VIP {vip} is a workload's IP")));
            }
            let service = Arc::new(service);
            for vip in &service.vips {
                if let Some(other) = self.service_by_vip.insert(*vip, service.clone()) {
                    return Err(TableError::DuplicateVip {
                        ip: *vip,
                        first: other.key(),
                        second: key,
                    });
                }
            }
            self.service_by_key.insert(key, service.clone());
            self.services.push(service);
        }
        Ok(self)
    }

    /// Parses the YAML form (see the module docs).
    pub fn from_yaml(text: &str) -> Result<Self, TableError> {
        let file: TableFile = serde_yaml_ng::from_str(text)?;
        let trust_domain = match file.trust_domain {
            None => TrustDomain::default(),
            Some(name) => TrustDomain::new(&name)
                .map_err(|source| TableError::TrustDomain { name, source })?,
        };
        let nodes = file.nodes.into_iter().map(|n| Node {
            name: n.name,
            hbone: n.hbone,
        });
        let mut workloads = Vec::with_capacity(file.workloads.len());
        let mut named_ports = Vec::with_capacity(file.workloads.len());
        for w in file.workloads {
            for (field, value) in [("name", &w.name), ("node", &w.node)] {
                if value.is_empty() {
                    return Err(TableError::EmptyField {
                        namespace: w.namespace.clone(),
                        name: w.name.clone(),
                        field,
                    });
                }
            }
            let identity = WorkloadId::new(&trust_domain, &w.namespace, &w.service_account)
                .map_err(|source| TableError::Identity {
                    namespace: w.namespace.clone(),
                    name: w.name.clone(),
                    source,
                })?;
            // A Service's named targetPort resolving to 0 would send traffic nowhere.
            if let Some((port, _)) = w.ports.iter().find(|(_, &number)| number == 0) {
                return Err(TableError::NamedPortZero {
                    namespace: w.namespace.clone(),
                    name: w.name.clone(),
                    port: port.clone(),
                });
            }
            named_ports.push(w.ports);
            workloads.push(Workload {
                workload_name: w.workload_name.unwrap_or_else(|| w.name.clone()),
                name: w.name,
                namespace: w.namespace,
                service_account: w.service_account,
                node: w.node,
                ips: w.ips,
                protocol: w.protocol,
                identity,
                labels: Arc::new(w.labels),
            });
        }
        let services = file
            .services
            .into_iter()
            .map(|s| service_from_file(s, &workloads, &named_ports))
            .collect::<Result<Vec<_>, _>>()?;
        Self::new(trust_domain, nodes, workloads)?.with_services(services)
    }

    /// Reads and parses a YAML file.
    pub fn load(path: &Path) -> Result<Self, TableError> {
        let text = std::fs::read_to_string(path).map_err(|source| TableError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_yaml(&text)
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.by_ip.get(&ip)
    }

    /// The workload with this IP, only if it runs on `node`.
    pub fn local_workload(&self, ip: IpAddr, node: &str) -> Option<&Arc<Workload>> {
        self.by_ip.get(&ip).filter(|w| w.node == node)
    }

    /// The Service one of whose VIPs is `ip`.
    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&Arc<Service>> {
        self.service_by_vip.get(&ip)
    }

    pub fn service(&self, namespace: &str, name: &str) -> Option<&Arc<Service>> {
        self.service_by_key.get(&format!("{namespace}/{name}"))
    }

    pub fn services(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.services.iter()
    }

    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.get(name)
    }

    pub fn workloads(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.workloads.iter()
    }

    /// Workloads scheduled on `node`.
    pub fn workloads_on<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Arc<Workload>> {
        self.workloads.iter().filter(move |w| w.node == node)
    }
}

/// A Service of the YAML form, its endpoints resolved from the table's workloads (every
/// workload of the file counts as ready).
fn service_from_file(
    file: ServiceFile,
    workloads: &[Workload],
    named_ports: &[BTreeMap<String, u16>],
) -> Result<Service, TableError> {
    let key = format!("{}/{}", file.namespace, file.name);
    let invalid = |reason: String| TableError::InvalidService {
        service: key.clone(),
        reason,
    };
    if file.name.is_empty() || file.namespace.is_empty() {
        return Err(invalid("`name` and `namespace` must not be empty".into()));
    }
    if file.vips.is_empty() {
        return Err(invalid("field `vips` is empty".into()));
    }
    if file.ports.is_empty() {
        return Err(invalid("field `ports` is empty".into()));
    }
    if file.selector.is_empty() {
        return Err(invalid(
            "field `selector` is empty (it would select every workload of the namespace)".into(),
        ));
    }
    let ports: Vec<ServicePort> = file
        .ports
        .into_iter()
        .map(|p| ServicePort {
            name: p.name,
            port: p.port,
            target: match p.target_port {
                None => TargetPort::Number(p.port),
                Some(TargetPortFile::Number(n)) => TargetPort::Number(n),
                Some(TargetPortFile::Name(name)) => TargetPort::Named(name),
            },
        })
        .collect();
    if let Some(port) = ports
        .iter()
        .find(|p| matches!(p.target, TargetPort::Number(0)))
    {
        return Err(invalid(format!("port {}: targetPort 0", port.port)));
    }
    let affinity = match file.session_affinity {
        Some(AffinityFile::ClientIP) => Some(
            file.affinity_timeout_seconds
                .map_or(DEFAULT_AFFINITY_TIMEOUT, Duration::from_secs),
        ),
        None | Some(AffinityFile::None) => {
            if file.affinity_timeout_seconds.is_some() {
                return Err(invalid(
                    "affinityTimeoutSeconds needs sessionAffinity: ClientIP".into(),
                ));
            }
            None
        }
    };
    let mut endpoints = Vec::new();
    for (w, named) in workloads.iter().zip(named_ports) {
        let selected = w.namespace == file.namespace
            && file
                .selector
                .iter()
                .all(|(k, v)| w.labels.get(k) == Some(v));
        if !selected {
            continue;
        }
        let targets: BTreeMap<u16, u16> = ports
            .iter()
            .filter_map(|p| p.target_on(named).map(|t| (p.port, t)))
            .collect();
        if targets.is_empty() {
            continue;
        }
        for ip in &w.ips {
            endpoints.push(Endpoint {
                ip: *ip,
                ports: targets.clone(),
            });
        }
    }
    Ok(Service {
        name: file.name,
        namespace: file.namespace,
        vips: file.vips,
        ports,
        affinity,
        endpoints,
    })
}

/// The current table, swappable while the proxy runs.
#[derive(Debug)]
pub struct WorkloadStore {
    current: ArcSwap<WorkloadTable>,
    /// Bumped on every replace: a pod's new labels can change which policies select it,
    /// so the proxy re-checks open connections.
    generation: watch::Sender<u64>,
}

impl WorkloadStore {
    pub fn new(table: WorkloadTable) -> Self {
        Self {
            current: ArcSwap::from_pointee(table),
            generation: watch::Sender::new(0),
        }
    }

    /// The current snapshot; cheap, lock-free.
    pub fn snapshot(&self) -> Arc<WorkloadTable> {
        self.current.load_full()
    }

    /// Replaces the table; new connections see it at once, open ones are re-checked.
    pub fn replace(&self, table: WorkloadTable) {
        self.replace_shared(Arc::new(table));
    }

    /// [`WorkloadStore::replace`] with a table already shared.
    pub fn replace_shared(&self, table: Arc<WorkloadTable>) {
        self.current.store(table);
        self.generation.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// Changes on every [`WorkloadStore::replace`].
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }
}

impl Workload {
    /// Istio's canonical service (`app` in telemetry): the first of the labels
    /// `service.istio.io/canonical-name`, `app.kubernetes.io/name`, `app`, else the
    /// workload's name.
    pub fn canonical_service(&self) -> &str {
        [
            "service.istio.io/canonical-name",
            "app.kubernetes.io/name",
            "app",
        ]
        .iter()
        .find_map(|key| self.labels.get(*key).filter(|v| !v.is_empty()))
        .map_or(&self.workload_name, |v| v)
    }

    /// Istio's canonical revision (`version` in telemetry): the first of the labels
    /// `service.istio.io/canonical-revision`, `app.kubernetes.io/version`, `version`, else
    /// `latest`.
    pub fn canonical_revision(&self) -> &str {
        [
            "service.istio.io/canonical-revision",
            "app.kubernetes.io/version",
            "version",
        ]
        .iter()
        .find_map(|key| self.labels.get(*key).filter(|v| !v.is_empty()))
        .map_or("latest", |v| v)
    }

    /// Whether policies see both the same: same namespace and labels.
    pub(crate) fn same_for_policies(&self, other: &Workload) -> bool {
        self.namespace == other.namespace && self.labels == other.labels
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The message with its causes, as the CLI prints it.
    fn chain(e: &dyn std::error::Error) -> String {
        let mut out = e.to_string();
        let mut cur = e.source();
        while let Some(s) = cur {
            out.push_str(": ");
            out.push_str(&s.to_string());
            cur = s.source();
        }
        out
    }

    const GOOD: &str = r#"
trustDomain: example.org
nodes:
  - name: n1
    hbone: 127.0.0.2:15008
workloads:
  - name: web
    namespace: default
    serviceAccount: web-sa
    node: n1
    ips: [10.0.0.1, "fd00::1"]
    labels: {app: web, tier: "1"}
  - name: legacy
    namespace: old
    serviceAccount: default
    node: n2
    ips: [10.0.0.2]
    protocol: tcp
"#;

    /// How the agent hands a table to a data path in another process: everything comes
    /// back, and the checks run again on the way in.
    #[test]
    fn the_wire_form_round_trips_and_is_checked_on_the_way_in() {
        let table = WorkloadTable::from_yaml(GOOD).unwrap();
        let wire = serde_json::to_value(&table).unwrap();
        let back: WorkloadTable = serde_json::from_value(wire.clone()).unwrap();
        assert_eq!(serde_json::to_value(&back).unwrap(), wire);
        let web = back.workload_by_ip("fd00::1".parse().unwrap()).unwrap();
        assert_eq!(
            web.identity.to_string(),
            "spiffe://example.org/ns/default/sa/web-sa"
        );
        assert_eq!(
            back.node("n1").unwrap().hbone,
            table.node("n1").unwrap().hbone
        );

        // Two workloads on one IP: refused, as from a file.
        let mut twice = wire.clone();
        twice["workloads"][1]["ips"] = serde_json::json!(["10.0.0.1"]);
        let err = serde_json::from_value::<WorkloadTable>(twice).unwrap_err();
        assert!(err.to_string().contains("10.0.0.1"), "{err}");
        // An identity that is not a SPIFFE ID: refused.
        let mut bad_id = wire.clone();
        bad_id["workloads"][0]["identity"] = serde_json::json!("https://example.org/x");
        assert!(serde_json::from_value::<WorkloadTable>(bad_id).is_err());
        // Unknown fields: refused.
        let mut extra = wire;
        extra["surprise"] = serde_json::json!(1);
        assert!(serde_json::from_value::<WorkloadTable>(extra).is_err());
    }

    #[test]
    fn parses_and_indexes_by_ip() {
        let t = WorkloadTable::from_yaml(GOOD).unwrap();
        let web = t.workload_by_ip("fd00::1".parse().unwrap()).unwrap();
        assert_eq!(web.name, "web");
        assert_eq!(
            web.identity.to_string(),
            "spiffe://example.org/ns/default/sa/web-sa"
        );
        assert_eq!(web.protocol, Protocol::Hbone);
        let want: BTreeMap<String, String> = [("app", "web"), ("tier", "1")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        assert_eq!(*web.labels, want);
        assert_eq!(
            t.node("n1").unwrap().hbone,
            Some("127.0.0.2:15008".parse().unwrap())
        );
        let legacy = t.workload_by_ip("10.0.0.2".parse().unwrap()).unwrap();
        assert_eq!(legacy.protocol, Protocol::Tcp);
        assert!(legacy.labels.is_empty(), "labels are optional");
        assert!(t
            .local_workload("10.0.0.2".parse().unwrap(), "n1")
            .is_none());
        assert!(t
            .local_workload("10.0.0.1".parse().unwrap(), "n1")
            .is_some());
        assert!(t.workload_by_ip("10.0.0.3".parse().unwrap()).is_none());
        assert_eq!(t.workloads_on("n1").count(), 1);
    }

    #[test]
    fn unknown_fields_name_the_field() {
        let text = GOOD.replace("serviceAccount: web-sa", "serviceAcount: web-sa");
        let err = chain(&WorkloadTable::from_yaml(&text).unwrap_err());
        assert!(err.contains("serviceAcount"), "{err}");
        let err = chain(&WorkloadTable::from_yaml("workloads: []\nextra: 1\n").unwrap_err());
        assert!(err.contains("extra"), "{err}");
    }

    #[test]
    fn rejects_bad_values() {
        let cases = [
            (GOOD.replace("10.0.0.2]", "10.0.0.1]"), "belongs to both"),
            (GOOD.replace("[10.0.0.2]", "[]"), "`ips` is empty"),
            (GOOD.replace("10.0.0.2]", "not-an-ip]"), "invalid"),
            (GOOD.replace("web-sa", "a/b"), "invalid identity"),
            (GOOD.replace("example.org", "Example.org"), "trust domain"),
            (GOOD.replace("protocol: tcp", "protocol: udp"), "udp"),
            (GOOD.replace("name: legacy", "name: web\n    x: 1"), "x"),
            (GOOD.replace("127.0.0.2:15008", "127.0.0.2"), "hbone"),
            (
                GOOD.replace(
                    "name: legacy\n    namespace: old",
                    "name: web\n    namespace: default",
                ),
                "listed twice",
            ),
            (GOOD.replace("node: n2", "node: \"\""), "`node` is empty"),
            (GOOD.replace("tier: \"1\"", "tier: [1]"), "labels"),
        ];
        for (text, want) in cases {
            let err = chain(&WorkloadTable::from_yaml(&text).unwrap_err());
            assert!(err.contains(want), "want {want:?} in {err}");
        }
    }

    const SERVICES: &str = r#"
workloads:
  - {name: web-1, namespace: shop, serviceAccount: web, node: n1, ips: [10.0.1.1, "fd00::1"], labels: {app: web}, ports: {http: 8080}}
  - {name: web-2, namespace: shop, serviceAccount: web, node: n2, ips: [10.0.2.1], labels: {app: web}, ports: {http: 9090}}
  - {name: web-3, namespace: shop, serviceAccount: web, node: n2, ips: [10.0.2.2], labels: {app: web}}
  - {name: web-x, namespace: other, serviceAccount: web, node: n2, ips: [10.0.2.3], labels: {app: web}, ports: {http: 8080}}
  - {name: db, namespace: shop, serviceAccount: db, node: n1, ips: [10.0.1.2], labels: {app: db}}
services:
  - name: web
    namespace: shop
    vips: [10.96.0.10, "fd00:96::10"]
    ports: [{name: http, port: 80, targetPort: http}, {port: 81, targetPort: 7070}, {port: 82}]
    selector: {app: web}
    sessionAffinity: ClientIP
  - name: db
    namespace: shop
    vips: [10.96.0.11]
    ports: [{port: 5432}]
    selector: {app: db}
    sessionAffinity: ClientIP
    affinityTimeoutSeconds: 60
"#;

    #[test]
    fn services_resolve_endpoints_from_workloads() {
        let t = WorkloadTable::from_yaml(SERVICES).unwrap();
        let web = t.service_by_vip("fd00:96::10".parse().unwrap()).unwrap();
        assert_eq!(web.key(), "shop/web");
        assert_eq!(web.hostname("cluster.local"), "web.shop.svc.cluster.local");
        assert!(std::ptr::eq(
            &**web,
            &**t.service_by_vip("10.96.0.10".parse().unwrap()).unwrap()
        ));
        // Named target: each pod's own number; a pod without the name does not serve it.
        let mut http: Vec<_> = web
            .endpoints_for(80)
            .map(|(ip, p)| (ip.to_string(), p))
            .collect();
        http.sort();
        assert_eq!(
            http,
            [
                ("10.0.1.1".to_string(), 8080),
                ("10.0.2.1".to_string(), 9090),
                ("fd00::1".to_string(), 8080)
            ]
        );
        // Numeric target (and none: the port itself) on every selected pod of the namespace.
        assert_eq!(web.endpoints_for(81).count(), 4);
        assert!(web.endpoints_for(82).all(|(_, p)| p == 82));
        assert_eq!(web.endpoints_for(83).count(), 0, "not a service port");
        assert_eq!(web.affinity, Some(DEFAULT_AFFINITY_TIMEOUT));
        let db = t.service("shop", "db").unwrap();
        assert_eq!(db.affinity, Some(Duration::from_secs(60)));
        assert_eq!(
            db.endpoints_for(5432).collect::<Vec<_>>(),
            [("10.0.1.2".parse().unwrap(), 5432)]
        );
        assert!(t.service_by_vip("10.0.1.1".parse().unwrap()).is_none());
    }

    #[test]
    fn bad_services_are_refused_with_the_reason() {
        let cases = [
            (
                SERVICES.replace("[10.96.0.11]", "[10.96.0.10]"),
                "belongs to both",
            ),
            (
                SERVICES.replace("[10.96.0.11]", "[10.0.1.2]"),
                "is a workload's IP",
            ),
            (SERVICES.replace("[10.96.0.11]", "[]"), "`vips` is empty"),
            (SERVICES.replace("[{port: 5432}]", "[]"), "`ports` is empty"),
            (
                SERVICES.replace("[{port: 5432}]", "[{port: 5432}, {port: 5432}]"),
                "listed twice",
            ),
            (SERVICES.replace("[{port: 5432}]", "[{port: 0}]"), "port 0"),
            (
                // found by the fuzzer: a named port 0 made a Service endpoint on port 0
                SERVICES.replace("ports: {http: 9090}", "ports: {http: 0}"),
                "web-2: named port \"http\" is 0",
            ),
            (
                SERVICES.replace("[{port: 5432}]", "[{port: 5432, targetPort: 0}]"),
                "targetPort 0",
            ),
            (
                SERVICES.replace("selector: {app: db}", "selector: {}"),
                "`selector` is empty",
            ),
            (
                SERVICES.replace(
                    "    sessionAffinity: ClientIP
    affinityTimeoutSeconds",
                    "    affinityTimeoutSeconds",
                ),
                "needs sessionAffinity",
            ),
            (
                SERVICES.replace(
                    "sessionAffinity: ClientIP
  - name: db",
                    "sessionAffinity: Cookie
  - name: db",
                ),
                "Cookie",
            ),
            (
                SERVICES.replace(
                    "vips: [10.96.0.11]",
                    "vips: [10.96.0.11]
    type: NodePort",
                ),
                "type",
            ),
            (
                SERVICES.replace(
                    "name: db
    namespace: shop
    vips",
                    "name: web
    namespace: shop
    vips",
                ),
                "listed twice",
            ),
        ];
        for (text, want) in cases {
            let err = chain(&WorkloadTable::from_yaml(&text).unwrap_err());
            assert!(err.contains(want), "want {want:?} in {err}");
        }
    }

    #[test]
    fn store_swaps_snapshots() {
        let store = WorkloadStore::new(WorkloadTable::default());
        let changes = store.subscribe();
        let old = store.snapshot();
        assert!(!changes.has_changed().unwrap());
        store.replace(WorkloadTable::from_yaml(GOOD).unwrap());
        assert!(changes.has_changed().unwrap(), "a replace is announced");
        assert!(old.workload_by_ip("10.0.0.1".parse().unwrap()).is_none());
        assert!(store
            .snapshot()
            .workload_by_ip("10.0.0.1".parse().unwrap())
            .is_some());
    }
}
