//! The short description a cluster is built from.

use std::collections::HashSet;

use crate::error::{Error, Result};

/// Most nodes a cluster can have: node N owns 10.200.0.N and 10.201.N.0/24.
pub const MAX_NODES: usize = 254;
/// Most pods a node can have: pod P of a node gets 10.201.N.(P+1), .1 is the gateway.
pub const MAX_PODS_PER_NODE: usize = 253;

/// A cluster to build: nodes, each with its pods.
///
/// ```
/// use zmesh_testbed::ClusterSpec;
/// let spec = ClusterSpec::new()
///     .node("node1", |n| n.pod("web", "default", "web").pod("db", "data", "postgres"))
///     .node("node2", |n| n.pod("client", "default", "sleep"));
/// assert_eq!(spec.nodes().len(), 2);
/// ```
#[derive(Debug, Clone, Default)]
pub struct ClusterSpec {
    nodes: Vec<NodeSpec>,
    dual_stack: bool,
}

/// A node of a [`ClusterSpec`].
#[derive(Debug, Clone)]
pub struct NodeSpec {
    name: String,
    pods: Vec<PodSpec>,
}

/// A pod of a [`NodeSpec`]: what a workload identity is made of.
#[derive(Debug, Clone)]
pub struct PodSpec {
    name: String,
    namespace: String,
    service_account: String,
}

impl ClusterSpec {
    /// An empty cluster; add nodes with [`ClusterSpec::node`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a node named `name`, configured by `f` (which adds its pods).
    pub fn node(mut self, name: &str, f: impl FnOnce(NodeSpec) -> NodeSpec) -> Self {
        self.nodes.push(f(NodeSpec {
            name: name.to_owned(),
            pods: Vec::new(),
        }));
        self
    }

    /// Gives every node and pod an IPv6 address too (see [`crate::Pod::ip6`]); without it
    /// IPv6 is switched off in every namespace of the cluster.
    pub fn dual_stack(mut self) -> Self {
        self.dual_stack = true;
        self
    }

    /// Whether [`ClusterSpec::dual_stack`] was asked for.
    pub fn is_dual_stack(&self) -> bool {
        self.dual_stack
    }

    /// The nodes, in the order they were added (node N is `nodes()[N-1]`).
    pub fn nodes(&self) -> &[NodeSpec] {
        &self.nodes
    }

    /// Checks names and sizes so that building cannot fail on the description itself.
    pub(crate) fn validate(&self) -> Result<()> {
        if self.nodes.is_empty() {
            return Err(Error::InvalidSpec(
                "a cluster needs at least one node".into(),
            ));
        }
        if self.nodes.len() > MAX_NODES {
            return Err(Error::InvalidSpec(format!(
                "{} nodes requested, at most {MAX_NODES} are supported",
                self.nodes.len()
            )));
        }
        let mut node_names = HashSet::new();
        let mut pod_names = HashSet::new();
        for node in &self.nodes {
            check_label("node name", &node.name)?;
            if !node_names.insert(node.name.as_str()) {
                return Err(Error::InvalidSpec(format!(
                    "node name {:?} is used twice",
                    node.name
                )));
            }
            if node.pods.len() > MAX_PODS_PER_NODE {
                return Err(Error::InvalidSpec(format!(
                    "node {:?} has {} pods, at most {MAX_PODS_PER_NODE} are supported",
                    node.name,
                    node.pods.len()
                )));
            }
            for pod in &node.pods {
                check_label("pod name", &pod.name)?;
                check_label("namespace", &pod.namespace)?;
                check_label("service account", &pod.service_account)?;
                if !pod_names.insert((pod.namespace.as_str(), pod.name.as_str())) {
                    return Err(Error::InvalidSpec(format!(
                        "pod {}/{} is declared twice",
                        pod.namespace, pod.name
                    )));
                }
            }
        }
        Ok(())
    }
}

impl NodeSpec {
    /// Adds a pod `name` in namespace `namespace` running as service account `service_account`.
    pub fn pod(mut self, name: &str, namespace: &str, service_account: &str) -> Self {
        self.pods.push(PodSpec {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        });
        self
    }

    /// The node's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The node's pods, in the order they were added.
    pub fn pods(&self) -> &[PodSpec] {
        &self.pods
    }
}

impl PodSpec {
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
}

/// Names end up in netns and cgroup names: keep them to RFC 1123 labels, as Kubernetes does,
/// so they can never contain '/', '.', or clash with cgroup interface files.
fn check_label(what: &str, value: &str) -> Result<()> {
    let ok = !value.is_empty()
        && value.len() <= 63
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !value.starts_with('-')
        && !value.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidSpec(format!(
            "{what} {value:?} is not a DNS label (1-63 of a-z, 0-9, '-', not starting or ending with '-')"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(spec: ClusterSpec) -> String {
        match spec.validate() {
            Err(Error::InvalidSpec(msg)) => msg,
            other => panic!("expected InvalidSpec, got {other:?}"),
        }
    }

    #[test]
    fn valid_spec_passes() {
        let spec = ClusterSpec::new()
            .node("node1", |n| n.pod("web", "default", "web"))
            .node("node2", |n| n.pod("web", "other", "web"));
        spec.validate().unwrap();
    }

    #[test]
    fn rejects_empty_cluster() {
        assert!(err(ClusterSpec::new()).contains("at least one node"));
    }

    #[test]
    fn rejects_duplicate_nodes_and_pods() {
        assert!(err(ClusterSpec::new().node("a", |n| n).node("a", |n| n)).contains("used twice"));
        let spec = ClusterSpec::new()
            .node("a", |n| n.pod("web", "default", "sa"))
            .node("b", |n| n.pod("web", "default", "sa"));
        assert!(err(spec).contains("default/web"));
    }

    #[test]
    fn rejects_bad_names() {
        for bad in ["", "Node1", "a/b", "a.b", "-a", "a-", &"x".repeat(64)] {
            let msg = err(ClusterSpec::new().node(bad, |n| n));
            assert!(msg.contains("node name"), "{bad:?}: {msg}");
        }
        let msg = err(ClusterSpec::new().node("n", |n| n.pod("web", "Default", "sa")));
        assert!(msg.contains("namespace"), "{msg}");
        let msg = err(ClusterSpec::new().node("n", |n| n.pod("web", "default", "s_a")));
        assert!(msg.contains("service account"), "{msg}");
    }

    #[test]
    fn rejects_too_many_nodes_or_pods() {
        let mut spec = ClusterSpec::new();
        for i in 0..=MAX_NODES {
            spec = spec.node(&format!("n{i}"), |n| n);
        }
        assert!(err(spec).contains("nodes requested"));
        let spec = ClusterSpec::new().node("n", |mut n| {
            for i in 0..=MAX_PODS_PER_NODE {
                n = n.pod(&format!("p{i}"), "default", "sa");
            }
            n
        });
        assert!(err(spec).contains("pods, at most"));
    }
}
