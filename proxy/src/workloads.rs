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
//! ```
//!
//! Unknown fields are errors, so that a typo never silently disables mTLS.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use serde::Deserialize;
use tokio::sync::watch;
use zmesh_identity::{SpiffeIdError, TrustDomain, WorkloadId};

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
}

/// Whether traffic to a workload goes through HBONE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Enrolled in the mesh: reached over HBONE with mTLS.
    #[default]
    Hbone,
    /// Not enrolled: reached over plain TCP.
    Tcp,
}

/// One pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub name: String,
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
#[derive(Debug, Clone, PartialEq, Eq)]
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
}

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
}

/// An immutable snapshot of all workloads, indexed by IP.
#[derive(Debug, Default)]
pub struct WorkloadTable {
    trust_domain: TrustDomain,
    nodes: HashMap<String, Node>,
    by_ip: HashMap<IpAddr, Arc<Workload>>,
    workloads: Vec<Arc<Workload>>,
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
            workloads.push(Workload {
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
        Self::new(trust_domain, nodes, workloads)
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
        self.current.store(Arc::new(table));
        self.generation.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// Changes on every [`WorkloadStore::replace`].
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }
}

impl Workload {
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
