//! From cluster state to what the proxy and the redirect maps need.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use zmesh_identity::{TrustDomain, WorkloadId};
use zmesh_proxy::{Node, Protocol, Service, Workload, WorkloadTable};

use zmesh_cluster::{ClusterState, PodInfo};

/// The proxy's view of the cluster: every pod with an IP (enrolled ones reached over HBONE,
/// others as plain TCP), every Service with a ClusterIP and its ready endpoints, and this
/// node's own HBONE address for same-node traffic.
pub fn workload_table(
    state: &ClusterState,
    trust_domain: &TrustDomain,
    node: &str,
    own_hbone: SocketAddr,
) -> WorkloadTable {
    let mut seen_ips: HashSet<IpAddr> = HashSet::new();
    let mut workloads = Vec::new();
    for pod in state.pods() {
        let (Some(pod_node), false) = (&pod.node, pod.ips.is_empty()) else {
            continue; // not scheduled or no network yet: nothing can reach it
        };
        if pod.host_network {
            continue; // its IP is the node's: not a workload address
        }
        let identity = match WorkloadId::new(trust_domain, &pod.namespace, &pod.service_account) {
            Ok(id) => id,
            Err(e) => {
                tracing::warn!(pod = %pod.key(), "pod skipped: no valid SPIFFE identity: {e}");
                continue;
            }
        };
        if let Some(ip) = pod.ips.iter().find(|ip| !seen_ips.insert(**ip)) {
            tracing::warn!(pod = %pod.key(), %ip, "pod skipped: its IP belongs to another pod");
            continue;
        }
        workloads.push(Workload {
            name: pod.name.clone(),
            workload_name: pod.workload_name.clone(),
            namespace: pod.namespace.clone(),
            service_account: pod.service_account.clone(),
            node: pod_node.clone(),
            ips: pod.ips.clone(),
            protocol: if state.is_enrolled(pod) {
                Protocol::Hbone
            } else {
                Protocol::Tcp
            },
            identity,
            // Policies select destinations by these.
            labels: Arc::new(pod.labels.clone()),
        });
    }
    let own = Node {
        name: node.to_owned(),
        hbone: Some(own_hbone),
    };
    let services = services(state, &seen_ips);
    // Duplicates were filtered above, so the table cannot refuse them.
    WorkloadTable::new(trust_domain.clone(), [own], workloads)
        .and_then(|table| table.with_services(services))
        .unwrap_or_else(|e| {
            tracing::error!("workload table rejected, serving an empty one: {e}");
            WorkloadTable::default()
        })
}

/// The Services clients can dial (those with a ClusterIP), endpoints resolved. A Service
/// whose ClusterIP is a pod's or another Service's is skipped with a warning.
fn services(state: &ClusterState, pod_ips: &HashSet<IpAddr>) -> Vec<Service> {
    let mut vips: HashSet<IpAddr> = HashSet::new();
    let mut services = Vec::new();
    for info in state.services() {
        if info.cluster_ips.is_empty() {
            continue; // headless: clients dial the pods themselves
        }
        if let Some(ip) = info
            .cluster_ips
            .iter()
            .find(|ip| pod_ips.contains(ip) || vips.contains(ip))
        {
            tracing::warn!(service = %info.key(), %ip, "service skipped: its ClusterIP is already another's");
            continue;
        }
        vips.extend(info.cluster_ips.iter().copied());
        services.push(Service {
            name: info.name.clone(),
            namespace: info.namespace.clone(),
            vips: info.cluster_ips.clone(),
            ports: info.ports.clone(),
            affinity: info.affinity,
            endpoints: state.service_endpoints(info),
        });
    }
    services
}

/// The enrolled pods of this node, with the identity each needs a certificate for.
pub fn local_enrolled<'a>(
    state: &'a ClusterState,
    trust_domain: &'a TrustDomain,
    node: &'a str,
) -> impl Iterator<Item = (&'a PodInfo, WorkloadId)> + 'a {
    state.enrolled_on(node).filter_map(move |pod| {
        WorkloadId::new(trust_domain, &pod.namespace, &pod.service_account)
            .ok()
            .map(|id| (pod, id))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use zmesh_cluster::state::{NamespaceInfo, CILIUM_MTLS_LABEL};

    fn pod(ns: &str, name: &str, node: &str, ip: &str) -> PodInfo {
        PodInfo {
            namespace: ns.into(),
            name: name.into(),
            workload_name: name.into(),
            uid: None,
            node: Some(node.into()),
            ips: vec![ip.parse().unwrap()],
            service_account: name.into(),
            host_network: false,
            labels: BTreeMap::new(),
            netns_path: None,
            cgroup_path: None,
            ready: true,
            ports: BTreeMap::new(),
        }
    }

    #[test]
    fn table_marks_enrolled_pods_and_skips_conflicts() {
        let mut host = pod("mesh", "host", "n1", "10.0.0.9");
        let mut a = pod("mesh", "a", "n1", "10.0.0.1");
        a.labels.insert("app".into(), "a".into());
        host.host_network = true;
        let state = ClusterState::new(
            [NamespaceInfo {
                name: "mesh".into(),
                labels: [(CILIUM_MTLS_LABEL.to_string(), "true".to_string())].into(),
            }],
            [
                a,
                pod("plain", "b", "n2", "10.0.0.2"),
                pod("plain", "dup", "n2", "10.0.0.2"),
                host,
            ],
        );
        let td = TrustDomain::default();
        let hbone: SocketAddr = "10.0.0.254:15008".parse().unwrap();
        let table = workload_table(&state, &td, "n1", hbone);
        let a = table.workload_by_ip("10.0.0.1".parse().unwrap()).unwrap();
        assert_eq!(a.protocol, Protocol::Hbone);
        assert_eq!(
            a.identity.to_string(),
            "spiffe://cluster.local/ns/mesh/sa/a"
        );
        assert_eq!(
            a.labels.get("app").map(String::as_str),
            Some("a"),
            "pod labels reach the proxy"
        );
        let b = table.workload_by_ip("10.0.0.2".parse().unwrap()).unwrap();
        assert_eq!((b.name.as_str(), b.protocol), ("b", Protocol::Tcp));
        assert!(table.workload_by_ip("10.0.0.9".parse().unwrap()).is_none());
        assert_eq!(table.node("n1").unwrap().hbone, Some(hbone));
        let local: Vec<_> = local_enrolled(&state, &td, "n1")
            .map(|(p, _)| p.name.clone())
            .collect();
        assert_eq!(local, ["a"]);
    }

    #[test]
    fn services_get_their_ready_endpoints_and_conflicts_are_skipped() {
        use zmesh_cluster::ServiceInfo;
        use zmesh_proxy::{ServicePort, TargetPort};

        let mut web = pod("shop", "web", "n1", "10.0.0.1");
        web.labels.insert("app".into(), "web".into());
        web.ports.insert("http".into(), 8080);
        let mut unready = pod("shop", "web-2", "n2", "10.0.0.2");
        unready.labels.insert("app".into(), "web".into());
        unready.ready = false;
        let service = |name: &str, vip: &str| ServiceInfo {
            namespace: "shop".into(),
            name: name.into(),
            cluster_ips: if vip.is_empty() {
                vec![]
            } else {
                vec![vip.parse().unwrap()]
            },
            ports: vec![ServicePort {
                name: None,
                port: 80,
                target: TargetPort::Named("http".into()),
            }],
            selector: Some([("app".to_string(), "web".to_string())].into()),
            affinity: None,
        };
        let state = ClusterState::new([], [web, unready]).with_services([
            service("web", "10.96.0.10"),
            service("x-clash", "10.96.0.10"),
            service("on-a-pod", "10.0.0.1"),
            service("headless", ""),
        ]);
        let table = workload_table(
            &state,
            &TrustDomain::default(),
            "n1",
            "10.0.0.254:15008".parse().unwrap(),
        );
        let web = table.service_by_vip("10.96.0.10".parse().unwrap()).unwrap();
        assert_eq!(
            web.key(),
            "shop/web",
            "the first service (by namespace/name) keeps its VIP"
        );
        assert_eq!(
            web.endpoints_for(80).collect::<Vec<_>>(),
            [("10.0.0.1".parse().unwrap(), 8080)],
            "only the ready pod, at its named port"
        );
        assert_eq!(
            table.services().count(),
            1,
            "x-clash, on-a-pod, headless skipped"
        );
        assert!(table.workload_by_ip("10.0.0.1".parse().unwrap()).is_some());
    }
}
