//! What a stock ztunnel in in-pod mode needs from a cluster built by the testbed, for the
//! tests and the benchmark that run one: its static workload table, and the pods as
//! manifests carrying their network namespace and cgroup (which `zmesh agent --data-plane
//! ztunnel` reads to hand each pod's namespace to ztunnel over ZDS, without a lab).

use std::fmt::Write;

use zmesh_cluster::state::{CGROUP_ANNOTATION, NETNS_ANNOTATION};
use zmesh_testbed::Cluster;

/// ztunnel's static workload table (its `LOCAL_XDS_PATH` format): every pod, HBONE for
/// those in `enrolled_namespace`, plain TCP for the rest, each with the uid the agent uses
/// over ZDS (`<namespace>/<name>`).
pub fn local_xds(cluster: &Cluster, enrolled_namespace: &str) -> String {
    let mut out = String::from("workloads:\n");
    for pod in cluster.pods() {
        let protocol = if pod.namespace() == enrolled_namespace {
            "HBONE"
        } else {
            "TCP"
        };
        let _ = write!(
            out,
            "- uid: {ns}/{name}\n  name: {name}\n  namespace: {ns}\n  serviceAccount: {sa}\n  \
             trustDomain: cluster.local\n  workloadIps: [\"{ip}\"]\n  protocol: {protocol}\n  \
             node: {node}\n  network: \"\"\n  services: {{}}\n",
            ns = pod.namespace(),
            name = pod.name(),
            sa = pod.service_account(),
            ip = pod.ip(),
            node = pod.node_name(),
        );
    }
    out
}

/// Every pod as a running Pod manifest with its IP, and its network namespace and cgroup
/// as the annotations the agent reads.
pub fn annotated_pods(cluster: &Cluster) -> String {
    let mut out = String::new();
    for pod in cluster.pods() {
        let _ = write!(
            out,
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  \
             annotations:\n    {NETNS_ANNOTATION}: {netns}\n    {CGROUP_ANNOTATION}: {cgroup}\n\
             spec:\n  nodeName: {node}\n  serviceAccountName: {sa}\n  \
             containers: [{{name: app, image: x}}]\n\
             status:\n  phase: Running\n  podIP: {ip}\n",
            name = pod.name(),
            ns = pod.namespace(),
            netns = pod.netns().path().display(),
            cgroup = pod.cgroup_path().display(),
            node = pod.node_name(),
            sa = pod.service_account(),
            ip = pod.ip(),
        );
    }
    out
}
