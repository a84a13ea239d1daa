//! The migration's output read by zmesh's own AuthorizationPolicy engine (zmesh-proxy):
//! it parses, and it allows exactly the identities and ports the Cilium rules named.

use std::collections::BTreeMap;

use zmesh_compat::cilium::{migrate, Format, MigrateOptions};
use zmesh_identity::SpiffeId;
use zmesh_proxy::policy::{PolicySet, Request};

const POLICIES: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: echo, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: echo}}
  ingress:
  - fromEndpoints:
    - matchLabels: {io.cilium.k8s.policy.serviceaccount: pod-worker}
    - matchLabels: {k8s:io.kubernetes.pod.namespace: monitoring}
    - matchLabels: {app: legacy}
    toPorts:
    - ports: [{port: "3000", protocol: TCP}]
    - ports: [{port: "8080", protocol: TCP}]
      rules: {http: [{method: GET}]}
    authentication: {mode: required}
---
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: db}
spec:
  endpointSelector: {matchLabels: {k8s:io.kubernetes.pod.namespace: data, app: postgres}}
  ingress:
  - fromEndpoints: [{matchLabels: {io.cilium.k8s.policy.serviceaccount: api}}]
    authentication: {mode: required}
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: gateway, namespace: edge}
spec:
  endpointSelector: {matchLabels: {app: gateway}}
  ingress:
  - fromEntities: [world]
    authentication: {mode: required}
"#;

fn policies() -> PolicySet {
    let m = migrate(
        &[("p.yaml".to_owned(), POLICIES.to_owned())],
        &MigrateOptions::default(),
    )
    .unwrap();
    assert_eq!(m.policies.len(), 3);
    let yaml = m.render(Format::Yaml).unwrap();
    let set = PolicySet::parse_documents(&yaml)
        .unwrap_or_else(|e| panic!("generated YAML rejected: {e:?}\n{yaml}"));
    assert_eq!(set.policies().len(), 3, "Namespace objects are skipped");
    set
}

fn allowed(set: &PolicySet, ns: &str, app: &str, from: Option<&str>, port: u16) -> bool {
    let labels = BTreeMap::from([("app".to_owned(), app.to_owned())]);
    let id = from.map(|s| SpiffeId::parse(s).unwrap());
    set.evaluate(&Request {
        destination_namespace: ns,
        destination_labels: Some(&labels),
        source_identity: id.as_ref(),
        source_ip: None,
        destination_port: port,
    })
    .is_allowed()
}

#[test]
fn generated_policies_allow_exactly_the_translated_peers_and_ports() {
    let set = policies();
    let worker = "spiffe://cluster.local/ns/shop/sa/pod-worker";
    let other = "spiffe://cluster.local/ns/shop/sa/other";
    let prom = "spiffe://cluster.local/ns/monitoring/sa/prometheus";
    assert!(allowed(&set, "shop", "echo", Some(worker), 3000));
    assert!(allowed(&set, "shop", "echo", Some(prom), 3000));
    assert!(
        !allowed(&set, "shop", "echo", Some(other), 3000),
        "unlisted SA"
    );
    assert!(
        !allowed(&set, "shop", "echo", Some(worker), 9999),
        "unlisted port"
    );
    assert!(
        !allowed(&set, "shop", "echo", Some(worker), 8080),
        "L7 port not carried"
    );
    assert!(!allowed(&set, "shop", "echo", None, 3000), "plaintext");

    // Cluster-wide: the api service account of any namespace, on any port.
    let api_a = "spiffe://cluster.local/ns/a/sa/api";
    let api_b = "spiffe://cluster.local/ns/b/sa/api";
    assert!(allowed(&set, "data", "postgres", Some(api_a), 5432));
    assert!(allowed(&set, "data", "postgres", Some(api_b), 1));
    assert!(!allowed(&set, "data", "postgres", Some(worker), 5432));

    // Nothing could be carried: allow-nothing, not allow-everything.
    assert!(!allowed(&set, "edge", "gateway", Some(worker), 443));
    // Workloads no policy selects are untouched.
    assert!(allowed(&set, "shop", "other-app", Some(other), 1));
}
