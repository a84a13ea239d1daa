//! The CA's placement check backed by cluster state: an identity is issued to a node only
//! while a pod with that namespace and service account is scheduled on it.

use std::sync::Arc;

use tokio::sync::watch;
use zmesh_certs::{NodeName, SourceError, WorkloadPlacement};
use zmesh_identity::WorkloadId;

use crate::state::ClusterState;

pub struct ClusterPlacement {
    state: watch::Receiver<Arc<ClusterState>>,
}

impl ClusterPlacement {
    pub fn new(state: watch::Receiver<Arc<ClusterState>>) -> Self {
        Self { state }
    }
}

impl WorkloadPlacement for ClusterPlacement {
    fn is_scheduled(&self, node: &NodeName, workload: &WorkloadId) -> Result<bool, SourceError> {
        let state = self.state.borrow();
        let scheduled = state.pods().any(|pod| {
            pod.node.as_deref() == Some(node.as_str())
                && pod.namespace == workload.namespace()
                && pod.service_account == workload.service_account()
                && !pod.host_network
        });
        Ok(scheduled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::PodInfo;

    #[test]
    fn issues_only_identities_scheduled_on_the_node() {
        let pod = PodInfo {
            namespace: "shop".into(),
            name: "web-1".into(),
            workload_name: "web-1".into(),
            uid: None,
            node: Some("node1".into()),
            ips: vec![],
            service_account: "web".into(),
            host_network: false,
            labels: Default::default(),
            netns_path: None,
            cgroup_path: None,
            ready: true,
            ports: Default::default(),
        };
        let (tx, rx) = watch::channel(Arc::new(ClusterState::new([], [pod])));
        let placement = ClusterPlacement::new(rx);
        let web: WorkloadId = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        let db: WorkloadId = "spiffe://cluster.local/ns/shop/sa/db".parse().unwrap();
        let node1 = NodeName::new("node1").unwrap();
        let node2 = NodeName::new("node2").unwrap();
        assert!(placement.is_scheduled(&node1, &web).unwrap());
        assert!(!placement.is_scheduled(&node2, &web).unwrap());
        assert!(!placement.is_scheduled(&node1, &db).unwrap());
        // The pod leaves: its identity is no longer issued anywhere.
        tx.send(Arc::new(ClusterState::default())).unwrap();
        assert!(!placement.is_scheduled(&node1, &web).unwrap());
    }
}
