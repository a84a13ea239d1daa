//! The Kubernetes deployment in examples/kubernetes/ parses with the Kubernetes types, its
//! objects refer to each other consistently (names, ports, volumes, service accounts,
//! ConfigMaps, token audiences), and its containers' arguments are accepted by the real
//! `zmesh` binary.

#[path = "support/pod_args.rs"]
mod pod_args;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Namespace, PersistentVolumeClaim, PodSpec, PodTemplateSpec, Service,
    ServiceAccount,
};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use pod_args::{expand_args, flag, zmesh};
use serde::Deserialize;

#[derive(Default)]
struct Objects {
    namespaces: Vec<Namespace>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    cluster_role_bindings: Vec<ClusterRoleBinding>,
    roles: Vec<Role>,
    role_bindings: Vec<RoleBinding>,
    deployments: Vec<Deployment>,
    daemon_sets: Vec<DaemonSet>,
    services: Vec<Service>,
    claims: Vec<PersistentVolumeClaim>,
    config_maps: Vec<ConfigMap>,
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
                ("v1", "ConfigMap") => parse!(config_maps),
                ("rbac.authorization.k8s.io/v1", "ClusterRole") => parse!(cluster_roles),
                ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                    parse!(cluster_role_bindings)
                }
                ("rbac.authorization.k8s.io/v1", "Role") => parse!(roles),
                ("rbac.authorization.k8s.io/v1", "RoleBinding") => parse!(role_bindings),
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
        if let Some(config_map) = &volume.config_map {
            assert!(
                objects
                    .config_maps
                    .iter()
                    .any(|c| name_of(&c.metadata) == config_map.name),
                "{owner}: ConfigMap {} is not defined",
                config_map.name
            );
        }
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
        .chain(objects.claims.iter().map(|o| &o.metadata))
        .chain(objects.config_maps.iter().map(|o| &o.metadata));
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
    for needed in [
        "/sys/fs/bpf",
        "/sys/fs/cgroup",
        "/host/proc",
        "/var/run/zmesh",
    ] {
        assert!(mounts.contains(needed), "agent must mount {needed}");
    }
    let caps = container
        .security_context
        .as_ref()
        .and_then(|s| s.capabilities.as_ref())
        .and_then(|c| c.add.clone())
        .unwrap_or_default();
    // SYS_PTRACE: pods' /proc/PID/ns/net belong to other users.
    for cap in ["BPF", "NET_ADMIN", "SYS_PTRACE"] {
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

/// The volume mounted at the directory holding `path`, and the file name within it.
fn volume_for<'a>(
    spec: &'a PodSpec,
    container: &Container,
    path: &'a str,
) -> (&'a k8s_openapi::api::core::v1::Volume, &'a str) {
    let (dir, file) = path.rsplit_once('/').expect("an absolute path");
    let mount = container
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path.trim_end_matches('/') == dir)
        .unwrap_or_else(|| panic!("{}: nothing is mounted at {dir}", container.name));
    let volume = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .expect("mounted volumes are defined");
    (volume, file)
}

#[test]
fn container_args_are_accepted_by_the_real_cli() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/kubernetes");
    let objects = load(&dir);

    // The agent: real flags, parsed and printed by --dry-run without touching anything.
    let agent = &objects.daemon_sets[0];
    let agent_pod = agent.spec.as_ref().unwrap().template.spec.clone().unwrap();
    let agent_container = &agent_pod.containers[0];
    let agent_args = expand_args(agent_container);
    assert_eq!(agent_args[0], "agent");
    let mut dry_run = agent_args.clone();
    dry_run.push("--dry-run".into());
    let printed = zmesh(&dry_run);
    for expected in [
        "node-1",
        "10.0.0.5",
        "zmesh-ca.zmesh-system.svc:15012",
        "/var/run/secrets/zmesh/token",
        "/etc/zmesh/ca/roots.pem",
        "/host/proc",
        "/var/run/zmesh/enrolled-namespaces.json",
        "/host/opt/cni/bin",
        "/host/etc/cni/net.d",
        "failure_policy: Closed",
        // Next to the zmesh binary unless --cni-plugin-binary says otherwise.
        "zmesh-cni",
    ] {
        assert!(
            printed.contains(expected),
            "agent config lacks {expected}:\n{printed}"
        );
    }

    // The node's /proc, and a host directory for the CNI plugin's state file.
    let host_proc = flag(&agent_args, "host-proc").expect("--host-proc");
    let pid_1 = format!("{host_proc}/1");
    let (volume, _) = volume_for(&agent_pod, agent_container, &pid_1);
    assert_eq!(
        volume.host_path.as_ref().map(|h| h.path.as_str()),
        Some("/proc"),
        "--host-proc is the host's /proc"
    );
    // The CNI plugin runs on the host and finds the agent's socket and state file at the
    // paths the agent writes into its entry: each must be a host directory mounted at the
    // same path.
    for name in ["cni-state-file", "cni-socket"] {
        let path = flag(&agent_args, name).unwrap_or_else(|| panic!("--{name}"));
        let (volume, _) = volume_for(&agent_pod, agent_container, path);
        let dir = path.rsplit_once('/').unwrap().0;
        assert_eq!(
            volume.host_path.as_ref().map(|h| h.path.as_str()),
            Some(dir),
            "the CNI plugin looks for {path} on the host"
        );
    }
    // The agent installs the plugin into the host's CNI directories.
    for (name, host_dir) in [
        ("cni-bin-dir", "/opt/cni/bin"),
        ("cni-conf-dir", "/etc/cni/net.d"),
    ] {
        let dir = flag(&agent_args, name).unwrap_or_else(|| panic!("--{name}"));
        let file = format!("{dir}/file");
        let (volume, _) = volume_for(&agent_pod, agent_container, &file);
        assert_eq!(
            volume.host_path.as_ref().map(|h| h.path.as_str()),
            Some(host_dir),
            "--{name} is the host's {host_dir}"
        );
        let mount = agent_container
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == volume.name)
            .unwrap();
        assert_ne!(mount.read_only, Some(true), "--{name} is written to");
    }
    assert_eq!(flag(&agent_args, "cni-failure-policy"), Some("closed"));

    // Its token is a projected ServiceAccount token for the audience the CA requires.
    let token_path = flag(&agent_args, "ca-token-file").expect("--ca-token-file");
    let (volume, file) = volume_for(&agent_pod, agent_container, token_path);
    let sources = &volume
        .projected
        .as_ref()
        .expect("a projected volume")
        .sources;
    let token = sources
        .iter()
        .flatten()
        .filter_map(|s| s.service_account_token.as_ref())
        .find(|t| t.path == file)
        .unwrap_or_else(|| panic!("no serviceAccountToken at {file}"));
    let audience = token.audience.as_deref().expect("an audience-bound token");
    assert!(
        token.expiration_seconds.unwrap_or(3600) <= 3600,
        "short-lived token"
    );

    // Its CA bundle is a key of a defined ConfigMap.
    let bundle_path = flag(&agent_args, "ca-bundle").expect("--ca-bundle");
    let (volume, file) = volume_for(&agent_pod, agent_container, bundle_path);
    let config_map_name = &volume.config_map.as_ref().expect("a ConfigMap volume").name;
    let config_map = objects
        .config_maps
        .iter()
        .find(|c| &name_of(&c.metadata) == config_map_name)
        .expect("the ConfigMap is defined");
    assert_eq!(config_map.metadata.namespace, agent.metadata.namespace);
    assert!(
        config_map
            .data
            .as_ref()
            .is_some_and(|d| d.contains_key(file)),
        "ConfigMap {config_map_name} has no key {file}"
    );

    // The CA: real flags, and it accepts exactly the agent's tokens.
    let ca = &objects.deployments[0];
    let ca_pod = ca.spec.as_ref().unwrap().template.spec.clone().unwrap();
    let ca_args = expand_args(&ca_pod.containers[0]);
    assert_eq!(ca_args[..2], ["ca", "serve"]);
    let mut dry_run = ca_args.clone();
    dry_run.push("--dry-run".into());
    let printed = zmesh(&dry_run);
    for expected in ["TokenReview", "Kubernetes", "zmesh-system/zmesh-agent"] {
        assert!(
            printed.contains(expected),
            "CA config lacks {expected}:\n{printed}"
        );
    }
    assert_eq!(flag(&ca_args, "bearer"), Some("kubernetes"));
    assert!(ca_args.iter().any(|a| a == "--kubernetes"));
    assert_eq!(
        flag(&ca_args, "token-audience").unwrap_or("zmesh-ca"),
        audience,
        "the CA must require the audience the agent's token is minted for"
    );
    let agent_sa = format!(
        "{}/{}",
        agent.metadata.namespace.as_deref().unwrap(),
        agent_pod.service_account_name.as_deref().unwrap()
    );
    assert_eq!(
        flag(&ca_args, "agent-service-account").unwrap_or("zmesh-system/zmesh-agent"),
        agent_sa
    );
    // The name the agent dials is on the CA's serving certificate.
    let ca_host = flag(&agent_args, "ca").unwrap().rsplit_once(':').unwrap().0;
    assert!(
        ca_args.iter().any(|a| a == &format!("--san={ca_host}")),
        "the CA's certificate must name {ca_host}"
    );
    // The CA may create TokenReviews and watch what placement reads.
    let role = |name: &str| {
        objects
            .cluster_roles
            .iter()
            .find(|r| name_of(&r.metadata) == name)
            .unwrap_or_else(|| panic!("ClusterRole {name}"))
    };
    let allows = |role: &ClusterRole, group: &str, resource: &str, verb: &str| {
        role.rules.iter().flatten().any(|rule| {
            rule.api_groups.iter().flatten().any(|g| g == group)
                && rule.resources.iter().flatten().any(|r| r == resource)
                && rule.verbs.iter().any(|v| v == verb)
        })
    };
    let ca_role = role("zmesh-ca");
    assert!(allows(
        ca_role,
        "authentication.k8s.io",
        "tokenreviews",
        "create"
    ));
    for resource in ["namespaces", "pods"] {
        for verb in ["list", "watch"] {
            assert!(
                allows(ca_role, "", resource, verb),
                "CA cannot {verb} {resource}"
            );
        }
    }
    // The agent may watch everything its cluster state holds (a watch it may not make
    // would keep it from ever becoming ready).
    let agent_role = role("zmesh-agent");
    for (group, resource) in [
        ("", "namespaces"),
        ("", "pods"),
        ("", "services"),
        ("discovery.k8s.io", "endpointslices"),
        ("security.istio.io", "authorizationpolicies"),
    ] {
        for verb in ["list", "watch"] {
            assert!(
                allows(agent_role, group, resource, verb),
                "the agent cannot {verb} {resource}"
            );
        }
    }

    // The agent may write its status Lease in its own namespace, and nothing else: the Role
    // is namespaced and bound to the agent's ServiceAccount there.
    let status_role = objects
        .roles
        .iter()
        .find(|r| name_of(&r.metadata) == "zmesh-agent-status")
        .expect("Role zmesh-agent-status");
    assert_eq!(
        status_role.metadata.namespace.as_deref(),
        Some("zmesh-system")
    );
    let rules = status_role.rules.as_deref().unwrap_or_default();
    assert_eq!(rules.len(), 1);
    assert_eq!(
        rules[0].api_groups.as_deref(),
        Some(&["coordination.k8s.io".to_owned()][..])
    );
    assert_eq!(
        rules[0].resources.as_deref(),
        Some(&["leases".to_owned()][..])
    );
    for verb in ["get", "create", "patch"] {
        assert!(rules[0].verbs.iter().any(|v| v == verb), "{verb} leases");
    }
    let binding = objects
        .role_bindings
        .iter()
        .find(|b| name_of(&b.metadata) == "zmesh-agent-status")
        .expect("RoleBinding zmesh-agent-status");
    assert_eq!(binding.role_ref.kind, "Role");
    let subject = &binding.subjects.as_deref().unwrap()[0];
    assert_eq!(
        (subject.name.as_str(), subject.namespace.as_deref()),
        ("zmesh-agent", Some("zmesh-system"))
    );

    // The init container really creates the CA, and a restart leaves it alone.
    let init = &ca_pod.init_containers.as_ref().expect("an init container")[0];
    let init_args = expand_args(init);
    assert_eq!(
        flag(&init_args, "state-dir"),
        flag(&ca_args, "state-dir"),
        "init and serve share the state directory"
    );
    let scratch = tempfile::tempdir().unwrap();
    let state = scratch.path().join("state");
    let local: Vec<String> = init_args
        .iter()
        .map(|a| match a.strip_prefix("--state-dir=") {
            Some(_) => format!("--state-dir={}", state.display()),
            None => a.clone(),
        })
        .collect();
    zmesh(&local);
    let first = std::fs::read(state.join("state.json")).unwrap();
    let again = zmesh(&local);
    assert!(again.contains("unchanged"), "{again}");
    assert_eq!(std::fs::read(state.join("state.json")).unwrap(), first);
    let bundle = zmesh(&[
        "ca".into(),
        "bundle".into(),
        format!("--state-dir={}", state.display()),
    ]);
    assert!(
        bundle.starts_with("-----BEGIN CERTIFICATE-----"),
        "{bundle}"
    );
}
