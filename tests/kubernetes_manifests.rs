//! The Kubernetes deployment in examples/kubernetes/ parses with the Kubernetes types and its
//! objects refer to each other consistently (names, ports, volumes, service accounts).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{
    Container, Namespace, PersistentVolumeClaim, PodSpec, PodTemplateSpec, Service, ServiceAccount,
};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Deserialize;

#[derive(Default)]
struct Objects {
    namespaces: Vec<Namespace>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    cluster_role_bindings: Vec<ClusterRoleBinding>,
    deployments: Vec<Deployment>,
    daemon_sets: Vec<DaemonSet>,
    services: Vec<Service>,
    claims: Vec<PersistentVolumeClaim>,
}

fn load(dir: &Path) -> Objects {
    let mut objects = Objects::default();
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in {}", dir.display());
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let value = serde_yaml_ng::Value::deserialize(doc).unwrap();
            if value.is_null() {
                continue;
            }
            let kind = value["kind"].as_str().unwrap().to_owned();
            let api = value["apiVersion"].as_str().unwrap().to_owned();
            let ctx = format!("{} {api}/{kind}", file.display());
            macro_rules! parse {
                ($field:ident) => {
                    objects.$field.push(
                        serde_yaml_ng::from_value(value).unwrap_or_else(|e| panic!("{ctx}: {e}")),
                    )
                };
            }
            match (api.as_str(), kind.as_str()) {
                ("v1", "Namespace") => parse!(namespaces),
                ("v1", "ServiceAccount") => parse!(service_accounts),
                ("v1", "Service") => parse!(services),
                ("v1", "PersistentVolumeClaim") => parse!(claims),
                ("rbac.authorization.k8s.io/v1", "ClusterRole") => parse!(cluster_roles),
                ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                    parse!(cluster_role_bindings)
                }
                ("apps/v1", "Deployment") => parse!(deployments),
                ("apps/v1", "DaemonSet") => parse!(daemon_sets),
                _ => panic!("{ctx}: unexpected kind"),
            }
        }
    }
    objects
}

fn name_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    meta.name.clone().expect("every object has a name")
}

/// Checks a pod template against the objects: service account, volumes, probe ports.
fn check_pod_template(owner: &str, template: &PodTemplateSpec, objects: &Objects) -> PodSpec {
    let spec = template.spec.clone().expect("pod template has a spec");
    let sa = spec
        .service_account_name
        .as_deref()
        .expect("explicit service account");
    assert!(
        objects
            .service_accounts
            .iter()
            .any(|s| name_of(&s.metadata) == sa),
        "{owner}: service account {sa} is not defined"
    );
    let volumes: BTreeSet<String> = spec
        .volumes
        .iter()
        .flatten()
        .map(|v| v.name.clone())
        .collect();
    for volume in spec.volumes.iter().flatten() {
        if let Some(claim) = &volume.persistent_volume_claim {
            assert!(
                objects
                    .claims
                    .iter()
                    .any(|c| name_of(&c.metadata) == claim.claim_name),
                "{owner}: claim {} is not defined",
                claim.claim_name
            );
        }
    }
    let containers: Vec<&Container> = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .collect();
    for container in containers {
        for mount in container.volume_mounts.iter().flatten() {
            assert!(
                volumes.contains(&mount.name),
                "{owner}/{}: volume {} is not defined",
                container.name,
                mount.name
            );
        }
        let port_names: BTreeSet<String> = container
            .ports
            .iter()
            .flatten()
            .filter_map(|p| p.name.clone())
            .collect();
        let probes = [&container.readiness_probe, &container.liveness_probe];
        for probe in probes.into_iter().flatten() {
            let port = probe
                .http_get
                .as_ref()
                .map(|h| h.port.clone())
                .or_else(|| probe.tcp_socket.as_ref().map(|t| t.port.clone()));
            if let Some(IntOrString::String(name)) = port {
                assert!(
                    port_names.contains(&name),
                    "{owner}/{}: probe port {name} is not a container port",
                    container.name
                );
            }
        }
    }
    spec
}

fn labels_match(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

#[test]
fn kubernetes_manifests_are_consistent() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/kubernetes");
    let objects = load(&dir);
    assert_eq!(objects.daemon_sets.len(), 1, "one agent DaemonSet");
    assert_eq!(objects.deployments.len(), 1, "one CA Deployment");

    let namespaces: BTreeSet<String> = objects
        .namespaces
        .iter()
        .map(|n| name_of(&n.metadata))
        .collect();
    let namespaced = objects
        .service_accounts
        .iter()
        .map(|o| &o.metadata)
        .chain(objects.deployments.iter().map(|o| &o.metadata))
        .chain(objects.daemon_sets.iter().map(|o| &o.metadata))
        .chain(objects.services.iter().map(|o| &o.metadata))
        .chain(objects.claims.iter().map(|o| &o.metadata));
    for meta in namespaced {
        let ns = meta
            .namespace
            .as_deref()
            .expect("namespaced objects name their namespace");
        assert!(
            namespaces.contains(ns),
            "{}: namespace {ns} is not defined",
            name_of(meta)
        );
    }

    for binding in &objects.cluster_role_bindings {
        let role = &binding.role_ref.name;
        assert!(
            objects
                .cluster_roles
                .iter()
                .any(|r| &name_of(&r.metadata) == role),
            "binding {}: role {role} is not defined",
            name_of(&binding.metadata)
        );
        for subject in binding.subjects.iter().flatten() {
            assert!(
                objects
                    .service_accounts
                    .iter()
                    .any(|sa| name_of(&sa.metadata) == subject.name
                        && sa.metadata.namespace == subject.namespace),
                "binding {}: subject {} is not a defined service account",
                name_of(&binding.metadata),
                subject.name
            );
        }
    }

    let agent = &objects.daemon_sets[0];
    let agent_spec = agent.spec.as_ref().unwrap();
    let template_labels = agent_spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .clone()
        .unwrap();
    assert!(labels_match(
        agent_spec.selector.match_labels.as_ref().unwrap(),
        &template_labels
    ));
    let pod = check_pod_template("agent", &agent_spec.template, &objects);
    assert_eq!(
        pod.host_network,
        Some(true),
        "the agent serves the node's ports"
    );
    let container = &pod.containers[0];
    let node_env = container
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "NODE_NAME")
        .expect("NODE_NAME from the downward API");
    assert_eq!(
        node_env
            .value_from
            .as_ref()
            .unwrap()
            .field_ref
            .as_ref()
            .unwrap()
            .field_path,
        "spec.nodeName"
    );
    let mounts: BTreeSet<&str> = container
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| m.mount_path.as_str())
        .collect();
    for needed in ["/sys/fs/bpf", "/sys/fs/cgroup"] {
        assert!(mounts.contains(needed), "agent must mount {needed}");
    }
    let caps = container
        .security_context
        .as_ref()
        .and_then(|s| s.capabilities.as_ref())
        .and_then(|c| c.add.clone())
        .unwrap_or_default();
    for cap in ["BPF", "NET_ADMIN"] {
        assert!(caps.iter().any(|c| c == cap), "agent needs CAP_{cap}");
    }

    let ca = &objects.deployments[0];
    let ca_spec = ca.spec.as_ref().unwrap();
    let ca_labels = ca_spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .clone()
        .unwrap();
    assert!(labels_match(
        ca_spec.selector.match_labels.as_ref().unwrap(),
        &ca_labels
    ));
    let ca_pod = check_pod_template("ca", &ca_spec.template, &objects);
    let service = objects
        .services
        .iter()
        .find(|s| name_of(&s.metadata) == "zmesh-ca")
        .expect("CA service");
    let service_spec = service.spec.as_ref().unwrap();
    assert!(labels_match(
        service_spec.selector.as_ref().unwrap(),
        &ca_labels
    ));
    let ca_ports = ca_pod.containers[0].ports.clone().unwrap();
    for port in service_spec.ports.iter().flatten() {
        assert_eq!(port.port, 15012, "Istio's CA port");
        match &port.target_port {
            Some(IntOrString::String(name)) => assert!(
                ca_ports.iter().any(|p| p.name.as_deref() == Some(name)),
                "service targets unknown port {name}"
            ),
            Some(IntOrString::Int(n)) => {
                assert!(ca_ports.iter().any(|p| p.container_port == *n))
            }
            None => assert!(ca_ports.iter().any(|p| p.container_port == port.port)),
        }
    }
    // The agent dials the CA by the service's DNS name and port.
    let args = container.args.clone().unwrap().join(" ");
    assert!(
        args.contains("zmesh-ca.zmesh-system.svc:15012"),
        "agent must dial the CA service: {args}"
    );
}
