//! A directory of ordinary Kubernetes YAML manifests (Namespace, Pod, Service, EndpointSlice
//! and Istio AuthorizationPolicy objects, several per file) as the cluster state source: the
//! default for running without a cluster.
//!
//! Nothing runs readiness probes here: a pod written with `status.phase: Running` and no
//! status conditions is ready to serve Services (see [`PodInfo::from_manifest_pod`]).
//!
//! A file is accepted or rejected whole. A rejected file is reported with its path and
//! reason, and the objects it held the last time it was valid stay in force, so a typo never
//! un-enrolls a namespace or forgets a pod.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::Deserialize;
use tokio::sync::{mpsc, watch};
use zmesh_proxy::policy::{Policy, PolicyErrors, PolicySet};

use crate::services::{EndpointSliceError, EndpointSliceInfo, ServiceError, ServiceInfo};
use crate::state::{ClusterState, NamespaceInfo, PodError, PodInfo, PolicyProblem};

/// Why a manifest file (or one object in it) was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("{file}: cannot read: {reason}")]
    Unreadable { file: PathBuf, reason: String },
    #[error("{file}: document {document}: invalid YAML: {reason}")]
    InvalidYaml {
        file: PathBuf,
        document: usize,
        reason: String,
    },
    #[error("{file}: document {document}: kind {kind:?} is not supported (only v1 Namespace, Pod and Service, discovery.k8s.io/v1 EndpointSlice, and security.istio.io AuthorizationPolicy)")]
    UnknownKind {
        file: PathBuf,
        document: usize,
        kind: String,
    },
    #[error("{file}: document {document}: {kind} is invalid: {reason}")]
    InvalidObject {
        file: PathBuf,
        document: usize,
        kind: &'static str,
        reason: String,
    },
    #[error("{file}: document {document}: {kind} is missing {field}")]
    MissingField {
        file: PathBuf,
        document: usize,
        kind: &'static str,
        field: &'static str,
    },
    #[error("{file}: document {document}: AuthorizationPolicy is invalid (the file's previous policies stay in force): {reason}")]
    InvalidPolicy {
        file: PathBuf,
        document: usize,
        reason: String,
        /// `(namespace, name)` from its metadata, when they can be read.
        name: Option<(String, String)>,
    },
    #[error("{file}: {kind} {name} is also defined in {other_file}; the first definition is kept")]
    Duplicate {
        file: PathBuf,
        other_file: PathBuf,
        kind: &'static str,
        name: String,
    },
    #[error(
        "{file}: pod {pod} has IP {ip}, already used by pod {other_pod}; pod {pod} is skipped"
    )]
    DuplicateIp {
        file: PathBuf,
        pod: String,
        ip: IpAddr,
        other_pod: String,
    },
}

#[derive(Debug, Clone, Default, PartialEq)]
struct FileObjects {
    namespaces: Vec<NamespaceInfo>,
    pods: Vec<PodInfo>,
    policies: Vec<Policy>,
    services: Vec<ServiceInfo>,
    endpoint_slices: Vec<EndpointSliceInfo>,
}

/// Every problem of a policy document, with field paths (its origin is the file's).
fn policy_reason(errors: &PolicyErrors) -> String {
    errors
        .0
        .iter()
        .map(|e| {
            if e.path.is_empty() {
                e.kind.to_string()
            } else {
                format!("{}: {}", e.path, e.kind)
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Parses one manifest file's text. All-or-nothing: any bad document rejects the file.
fn parse_file(file: &Path, text: &str) -> Result<FileObjects, ManifestError> {
    let mut objects = FileObjects::default();
    for (index, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let document_number = index + 1;
        let value = serde_yaml_ng::Value::deserialize(document).map_err(|e| {
            ManifestError::InvalidYaml {
                file: file.to_owned(),
                document: document_number,
                reason: e.to_string(),
            }
        })?;
        if value.is_null() {
            continue; // an empty document, e.g. after a trailing "---"
        }
        let api_version = value.get("apiVersion").and_then(|v| v.as_str());
        let kind = value.get("kind").and_then(|v| v.as_str()).unwrap_or("");
        let invalid = |kind: &'static str, e: serde_yaml_ng::Error| ManifestError::InvalidObject {
            file: file.to_owned(),
            document: document_number,
            kind,
            reason: e.to_string(),
        };
        let rejected = |kind: &'static str, reason: String| ManifestError::InvalidObject {
            file: file.to_owned(),
            document: document_number,
            kind,
            reason,
        };
        let missing = |kind: &'static str, field: &'static str| ManifestError::MissingField {
            file: file.to_owned(),
            document: document_number,
            kind,
            field,
        };
        match (api_version, kind) {
            (Some("v1"), "Namespace") => {
                let ns: Namespace =
                    serde_yaml_ng::from_value(value).map_err(|e| invalid("Namespace", e))?;
                let name = ns
                    .metadata
                    .name
                    .ok_or_else(|| missing("Namespace", "metadata.name"))?;
                objects.namespaces.push(NamespaceInfo {
                    name,
                    labels: ns.metadata.labels.unwrap_or_default(),
                });
            }
            (Some("v1"), "Pod") => {
                let pod: Pod = serde_yaml_ng::from_value(value).map_err(|e| invalid("Pod", e))?;
                objects
                    .pods
                    .push(PodInfo::from_manifest_pod(pod).map_err(|e| match e {
                        PodError::Missing(field) => missing("Pod", field),
                        PodError::BadIp(_) => missing("Pod", "a valid status.podIP"),
                        e @ PodError::BadPort { .. } => rejected("Pod", e.to_string()),
                    })?);
            }
            (Some("v1"), "Service") => {
                let service: Service =
                    serde_yaml_ng::from_value(value).map_err(|e| invalid("Service", e))?;
                objects
                    .services
                    .push(ServiceInfo::from_service(service).map_err(|e| match e {
                        ServiceError::Missing(field) => missing("Service", field),
                        e => rejected("Service", e.to_string()),
                    })?);
            }
            (Some("discovery.k8s.io/v1"), "EndpointSlice") => {
                let slice: EndpointSlice =
                    serde_yaml_ng::from_value(value).map_err(|e| invalid("EndpointSlice", e))?;
                objects.endpoint_slices.push(
                    EndpointSliceInfo::from_endpoint_slice(slice).map_err(|e| match e {
                        EndpointSliceError::Missing(field) => missing("EndpointSlice", field),
                        e => rejected("EndpointSlice", e.to_string()),
                    })?,
                );
            }
            (Some(v), "AuthorizationPolicy") if v.starts_with("security.istio.io/") => {
                let meta = |key: &str| value.get("metadata")?.get(key)?.as_str().map(str::to_owned);
                let name = meta("name")
                    .map(|n| (meta("namespace").unwrap_or_else(|| "default".into()), n));
                let policy_error = |reason| ManifestError::InvalidPolicy {
                    file: file.to_owned(),
                    document: document_number,
                    reason,
                    name: name.clone(),
                };
                let json = serde_json::to_value(&value).map_err(|e| policy_error(e.to_string()))?;
                let policy =
                    Policy::from_json(&json).map_err(|e| policy_error(policy_reason(&e)))?;
                objects.policies.push(policy);
            }
            _ => {
                return Err(ManifestError::UnknownKind {
                    file: file.to_owned(),
                    document: document_number,
                    kind: match api_version {
                        Some(v) => format!("{v}/{kind}"),
                        None => format!("(no apiVersion)/{kind}"),
                    },
                })
            }
        }
    }
    Ok(objects)
}

#[derive(Debug, Clone, PartialEq)]
struct FileEntry {
    fingerprint: (SystemTime, u64),
    /// The objects of the last valid version of the file.
    last_good: Option<FileObjects>,
    /// Set while the file holds an invalid AuthorizationPolicy.
    policy_problem: Option<PolicyProblem>,
}

/// Reads a manifest directory incrementally: only changed files are parsed again.
#[derive(Debug, Default)]
pub struct ManifestDir {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileEntry>,
}

impl ManifestDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            files: BTreeMap::new(),
        }
    }

    /// Rescans the directory. Returns the new state (or `None` when nothing changed) and the
    /// problems found in files that changed since the last scan.
    pub fn rescan(&mut self) -> (Option<ClusterState>, Vec<ManifestError>) {
        let mut errors = Vec::new();
        let mut changed = false;
        let present = match list_manifests(&self.dir) {
            Ok(files) => files,
            Err(reason) => {
                // The directory itself is gone or unreadable: keep the last good state.
                errors.push(ManifestError::Unreadable {
                    file: self.dir.clone(),
                    reason,
                });
                return (None, errors);
            }
        };
        let before = self.files.len();
        self.files.retain(|path, _| present.contains_key(path));
        changed |= self.files.len() != before;
        for (path, fingerprint) in present {
            if self
                .files
                .get(&path)
                .is_some_and(|e| e.fingerprint == fingerprint)
            {
                continue;
            }
            let parsed = std::fs::read_to_string(&path)
                .map_err(|e| ManifestError::Unreadable {
                    file: path.clone(),
                    reason: e.to_string(),
                })
                .and_then(|text| parse_file(&path, &text));
            let entry = self.files.entry(path).or_insert(FileEntry {
                fingerprint,
                last_good: None,
                policy_problem: None,
            });
            entry.fingerprint = fingerprint;
            let problem = match &parsed {
                Err(ManifestError::InvalidPolicy {
                    file,
                    document,
                    reason,
                    name,
                }) => Some(PolicyProblem {
                    policy: match name {
                        Some((ns, n)) => {
                            format!("{ns}/{n} ({}, document {document})", file.display())
                        }
                        None => format!("{} (document {document})", file.display()),
                    },
                    namespace: name.as_ref().map(|(ns, _)| ns.clone()),
                    reason: reason.clone(),
                    enforced: "the file's previous policies, if any".into(),
                }),
                _ => None,
            };
            if entry.policy_problem != problem {
                entry.policy_problem = problem;
                changed = true;
            }
            match parsed {
                Ok(objects) => {
                    if entry.last_good.as_ref() != Some(&objects) {
                        entry.last_good = Some(objects);
                        changed = true;
                    }
                }
                Err(e) => errors.push(e),
            }
        }
        if !changed {
            return (None, errors);
        }
        let (state, merge_errors) = self.merge();
        errors.extend(merge_errors);
        (Some(state), errors)
    }

    /// Combines all files' last good objects; the first definition (in path order) wins.
    fn merge(&self) -> (ClusterState, Vec<ManifestError>) {
        let mut errors = Vec::new();
        let mut namespaces: BTreeMap<String, (NamespaceInfo, &Path)> = BTreeMap::new();
        let mut pods: BTreeMap<(String, String), (PodInfo, &Path)> = BTreeMap::new();
        let mut ip_owner: HashMap<IpAddr, String> = HashMap::new();
        let mut policies: BTreeMap<String, (Policy, &Path)> = BTreeMap::new();
        let mut services: BTreeMap<(String, String), (ServiceInfo, &Path)> = BTreeMap::new();
        let mut slices: BTreeMap<(String, String), (EndpointSliceInfo, &Path)> = BTreeMap::new();
        for (path, entry) in &self.files {
            let Some(objects) = &entry.last_good else {
                continue;
            };
            for policy in &objects.policies {
                let name = policy.id().to_string();
                if let Some((_, other)) = policies.get(&name) {
                    errors.push(ManifestError::Duplicate {
                        file: path.clone(),
                        other_file: other.to_path_buf(),
                        kind: "AuthorizationPolicy",
                        name,
                    });
                    continue;
                }
                policies.insert(name, (policy.clone(), path));
            }
            for ns in &objects.namespaces {
                if let Some((_, other)) = namespaces.get(&ns.name) {
                    errors.push(ManifestError::Duplicate {
                        file: path.clone(),
                        other_file: other.to_path_buf(),
                        kind: "Namespace",
                        name: ns.name.clone(),
                    });
                    continue;
                }
                namespaces.insert(ns.name.clone(), (ns.clone(), path));
            }
            for pod in &objects.pods {
                let key = (pod.namespace.clone(), pod.name.clone());
                let pod_name = format!("{}/{}", pod.namespace, pod.name);
                if let Some((_, other)) = pods.get(&key) {
                    errors.push(ManifestError::Duplicate {
                        file: path.clone(),
                        other_file: other.to_path_buf(),
                        kind: "Pod",
                        name: pod_name,
                    });
                    continue;
                }
                if let Some((ip, owner)) = pod
                    .ips
                    .iter()
                    .find_map(|ip| ip_owner.get(ip).map(|owner| (*ip, owner)))
                {
                    errors.push(ManifestError::DuplicateIp {
                        file: path.clone(),
                        pod: pod_name,
                        ip,
                        other_pod: owner.clone(),
                    });
                    continue;
                }
                for ip in &pod.ips {
                    ip_owner.insert(*ip, pod_name.clone());
                }
                pods.insert(key, (pod.clone(), path));
            }
            for service in &objects.services {
                let key = (service.namespace.clone(), service.name.clone());
                if let Some((_, other)) = services.get(&key) {
                    errors.push(ManifestError::Duplicate {
                        file: path.clone(),
                        other_file: other.to_path_buf(),
                        kind: "Service",
                        name: service.key(),
                    });
                    continue;
                }
                services.insert(key, (service.clone(), path));
            }
            for slice in &objects.endpoint_slices {
                let key = (slice.namespace.clone(), slice.name.clone());
                if let Some((_, other)) = slices.get(&key) {
                    errors.push(ManifestError::Duplicate {
                        file: path.clone(),
                        other_file: other.to_path_buf(),
                        kind: "EndpointSlice",
                        name: format!("{}/{}", slice.namespace, slice.name),
                    });
                    continue;
                }
                slices.insert(key, (slice.clone(), path));
            }
        }
        // Names are unique after the loop above, so the set cannot be refused.
        let policies = PolicySet::new(policies.into_values().map(|(p, _)| p)).unwrap_or_else(|e| {
            tracing::error!(target: "manifests", "authorization policies rejected: {e}");
            PolicySet::default()
        });
        let state = ClusterState::new(
            namespaces.into_values().map(|(n, _)| n),
            pods.into_values().map(|(p, _)| p),
        )
        .with_policies(policies)
        .with_policy_problems(self.files.values().filter_map(|e| e.policy_problem.clone()))
        .with_services(services.into_values().map(|(s, _)| s))
        .with_endpoint_slices(slices.into_values().map(|(s, _)| s));
        (state, errors)
    }
}

fn list_manifests(dir: &Path) -> Result<BTreeMap<PathBuf, (SystemTime, u64)>, String> {
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(dir).map_err(|e| e.to_string())? {
        let entry = entry.map_err(|e| e.to_string())?;
        let path = entry.path();
        let is_yaml = matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        );
        // Editors write temporary and hidden files next to the real ones.
        let hidden = entry.file_name().to_string_lossy().starts_with('.');
        if !is_yaml || hidden {
            continue;
        }
        let Ok(meta) = entry.metadata() else { continue };
        if meta.is_file() {
            let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            files.insert(path, (modified, meta.len()));
        }
    }
    Ok(files)
}

/// Watches a manifest directory and publishes each new state. Problems are sent on `errors`
/// (with file and reason) and logged; the last good state stays published.
pub fn watch_dir(
    dir: PathBuf,
    poll: Duration,
) -> (
    watch::Receiver<std::sync::Arc<ClusterState>>,
    mpsc::UnboundedReceiver<ManifestError>,
) {
    let mut manifests = ManifestDir::new(dir);
    let (initial, initial_errors) = manifests.rescan();
    let (state_tx, state_rx) = watch::channel(std::sync::Arc::new(initial.unwrap_or_default()));
    let (error_tx, error_rx) = mpsc::unbounded_channel();
    let report = move |errors: Vec<ManifestError>| {
        for e in errors {
            tracing::warn!(target: "manifests", "skipped: {e}");
            let _ = error_tx.send(e);
        }
    };
    report(initial_errors);
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(poll);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let (state, errors) = manifests.rescan();
            report(errors);
            if let Some(state) = state {
                if state_tx.send(std::sync::Arc::new(state)).is_err() {
                    return; // nobody listens any more
                }
            }
        }
    });
    (state_rx, error_rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels:
    io.cilium/mtls-enabled: "true"
---
apiVersion: v1
kind: Pod
metadata:
  name: web
  namespace: shop
  uid: 6f1c0b9e-2f6d-4a57-9c1e-3b8f2d7a5e10
  annotations:
    zmesh.io/netns: /run/netns/web
spec:
  nodeName: node1
  serviceAccountName: web-sa
  containers: [{name: app, image: app}]
status:
  podIP: 10.1.0.5
---
"#;

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).unwrap();
    }

    /// Makes the next write visible even when it lands in the same mtime tick.
    fn touch_later(dir: &Path, name: &str, text: &str) {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        let t = SystemTime::now() + Duration::from_secs(5);
        let f = std::fs::File::options().write(true).open(&path).unwrap();
        f.set_modified(t).unwrap();
    }

    #[test]
    fn loads_namespaces_and_pods() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.yaml", GOOD);
        let mut m = ManifestDir::new(dir.path());
        let (state, errors) = m.rescan();
        assert!(errors.is_empty(), "{errors:?}");
        let state = state.unwrap();
        let pod = state.pods().next().unwrap();
        assert_eq!(pod.name, "web");
        assert_eq!(pod.service_account, "web-sa");
        assert_eq!(pod.node.as_deref(), Some("node1"));
        assert_eq!(pod.ips, vec!["10.1.0.5".parse::<IpAddr>().unwrap()]);
        assert_eq!(pod.netns_path, Some(PathBuf::from("/run/netns/web")));
        assert_eq!(
            pod.uid.as_deref(),
            Some("6f1c0b9e-2f6d-4a57-9c1e-3b8f2d7a5e10")
        );
        assert!(state.is_enrolled(pod));
        // Unchanged directory: nothing new to publish.
        assert_eq!(m.rescan(), (None, vec![]));
    }

    #[test]
    fn each_bad_file_is_reported_and_the_last_good_version_stays() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.yaml", GOOD);
        let mut m = ManifestDir::new(dir.path());
        let good = m.rescan().0.unwrap();

        type Expect = fn(&ManifestError) -> bool;
        let cases: &[(&str, Expect)] = &[
            ("kind: Pod\napiVersion: v1\nmetadata: {name: [unclosed", |e| {
                matches!(e, ManifestError::InvalidYaml { .. })
            }),
            ("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\n", |e| {
                matches!(e, ManifestError::UnknownKind { kind, .. } if kind == "apps/v1/Deployment")
            }),
            ("apiVersion: v1\nkind: Pod\nmetadata: {namespace: shop}\nspec: {containers: []}\n", |e| {
                matches!(e, ManifestError::MissingField { field: "metadata.name", .. })
            }),
            ("apiVersion: v1\nkind: Pod\nmetadata: {name: x}\n", |e| {
                matches!(e, ManifestError::MissingField { field: "spec", .. })
            }),
            ("apiVersion: v1\nkind: Pod\nmetadata: {name: x}\nspec: {containers: 5}\n", |e| {
                matches!(e, ManifestError::InvalidObject { kind: "Pod", .. })
            }),
            ("apiVersion: v1\nkind: Pod\nmetadata: {name: x}\nspec: {containers: []}\nstatus: {podIP: not-an-ip}\n", |e| {
                matches!(e, ManifestError::MissingField { field: "a valid status.podIP", .. })
            }),
        ];
        for (text, expected) in cases {
            // Break the file that holds the good objects: they must stay in force.
            touch_later(dir.path(), "a.yaml", text);
            let (state, errors) = m.rescan();
            assert_eq!(state, None, "state must not change for {text:?}");
            assert_eq!(errors.len(), 1, "{text:?}: {errors:?}");
            assert!(expected(&errors[0]), "{text:?}: {:?}", errors[0]);
            assert!(errors[0].to_string().contains("a.yaml"));
            touch_later(dir.path(), "a.yaml", GOOD);
            assert_eq!(m.rescan(), (None, vec![]));
        }
        // After all that, the state is the good one.
        let (state, _) = m.merge();
        assert_eq!(state, good);
    }

    const POLICY: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-web, namespace: shop}
spec:
  rules:
  - from:
    - source: {principals: [cluster.local/ns/shop/sa/web-sa]}
"#;

    #[test]
    fn loads_authorization_policies_and_keeps_them_through_a_bad_edit() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.yaml", GOOD);
        write(dir.path(), "policy.yaml", POLICY);
        let mut m = ManifestDir::new(dir.path());
        let (state, errors) = m.rescan();
        assert!(errors.is_empty(), "{errors:?}");
        let state = state.unwrap();
        let ids: Vec<String> = state
            .policies()
            .policies()
            .iter()
            .map(|p| p.id().to_string())
            .collect();
        assert_eq!(ids, ["shop/allow-web"]);

        // v1beta1 is accepted too; an unsupported field rejects the file with its path.
        let bad = format!(
            "{}---\n{}",
            POLICY
                .replace("security.istio.io/v1", "security.istio.io/v1beta1")
                .replace("allow-web", "other"),
            POLICY.replace("allow-web", "bad").replace(
                "- from:",
                "- to:\n    - operation: {methods: [GET]}\n    from:"
            )
        );
        touch_later(dir.path(), "policy.yaml", &bad);
        let (changed, errors) = m.rescan();
        // The policies in force do not change; the bad file is noted.
        let changed = changed.expect("the problem is part of the state");
        assert_eq!(
            changed.policies(),
            state.policies(),
            "a bad policy file changes no policy"
        );
        match changed.policy_problems() {
            [p] => {
                assert!(p.policy.starts_with("shop/bad ("), "{p:?}");
                assert!(p.policy.ends_with("policy.yaml, document 2)"), "{p:?}");
                assert_eq!(p.namespace.as_deref(), Some("shop"));
                assert!(
                    p.reason.contains("spec.rules[0].to[0].operation.methods"),
                    "{p:?}"
                );
            }
            other => panic!("{other:?}"),
        }
        match &errors[..] {
            [e @ ManifestError::InvalidPolicy {
                document: 2,
                reason,
                ..
            }] => {
                assert!(
                    reason.contains("spec.rules[0].to[0].operation.methods"),
                    "{reason}"
                );
                assert!(e.to_string().contains("policy.yaml"), "{e}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            m.merge().0.policies().policies().len(),
            1,
            "the last good policy stays"
        );

        // A wrong apiVersion for the kind is reported, not skipped.
        touch_later(
            dir.path(),
            "policy.yaml",
            &POLICY.replace("security.istio.io/v1", "security.istio.io/v2"),
        );
        let (_, errors) = m.rescan();
        assert!(
            matches!(&errors[..], [ManifestError::InvalidPolicy { reason, .. }] if reason.contains("v2")),
            "{errors:?}"
        );

        // The same policy in two files: the first one is kept and the second reported.
        touch_later(dir.path(), "policy.yaml", POLICY);
        write(dir.path(), "policy2.yaml", POLICY);
        let (state, errors) = m.rescan();
        assert!(
            matches!(
                &errors[..],
                [ManifestError::Duplicate {
                    kind: "AuthorizationPolicy",
                    ..
                }]
            ),
            "{errors:?}"
        );
        let state = state.unwrap();
        assert_eq!(state.policies().policies().len(), 1);
        assert!(
            state.policy_problems().is_empty(),
            "a fixed file is no problem any more"
        );

        // Removing the files removes the policies.
        std::fs::remove_file(dir.path().join("policy.yaml")).unwrap();
        std::fs::remove_file(dir.path().join("policy2.yaml")).unwrap();
        assert!(m.rescan().0.unwrap().policies().is_empty());
    }

    #[test]
    fn duplicate_pod_ips_keep_the_first_pod() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.yaml", GOOD);
        write(
            dir.path(),
            "b.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: thief, namespace: shop}\nspec: {containers: []}\nstatus: {podIP: 10.1.0.5}\n",
        );
        let mut m = ManifestDir::new(dir.path());
        let (state, errors) = m.rescan();
        let state = state.unwrap();
        assert_eq!(state.pods().count(), 1);
        assert_eq!(state.pods().next().unwrap().name, "web");
        assert!(
            matches!(&errors[..], [ManifestError::DuplicateIp { pod, other_pod, .. }] if pod == "shop/thief" && other_pod == "shop/web"),
            "{errors:?}"
        );
    }

    const SHOP: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web, tier: front}}
spec:
  containers:
  - name: app
    image: app
    ports:
    - {name: http, containerPort: 8080}
    - {name: metrics, containerPort: 9090, protocol: TCP}
    - {name: dns, containerPort: 5353, protocol: UDP}
  initContainers:
  - {name: sidecar, image: s, restartPolicy: Always, ports: [{name: admin, containerPort: 15000}]}
  - {name: setup, image: s, ports: [{name: setup, containerPort: 7000}]}
status: {phase: Running, podIPs: [{ip: 10.1.0.1}, {ip: "fd00::1"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-2, namespace: shop, labels: {app: web}}
spec:
  containers:
  - {name: app, image: app, ports: [{name: http, containerPort: 8081}]}
status: {phase: Running, podIP: 10.1.0.2}
---
# Lacks the named port "metrics": it serves only port 80.
apiVersion: v1
kind: Pod
metadata: {name: web-old, namespace: shop, labels: {app: web}}
spec:
  containers:
  - {name: app, image: app, ports: [{name: http, containerPort: 80}]}
status: {phase: Running, podIP: 10.1.0.3}
---
# Not ready: its Ready condition says so.
apiVersion: v1
kind: Pod
metadata: {name: web-unready, namespace: shop, labels: {app: web}}
spec:
  containers:
  - {name: app, image: app, ports: [{name: http, containerPort: 8080}]}
status:
  phase: Running
  podIP: 10.1.0.4
  conditions: [{type: Ready, status: "False"}]
---
# Not ready: being deleted.
apiVersion: v1
kind: Pod
metadata: {name: web-leaving, namespace: shop, labels: {app: web}, deletionTimestamp: "2026-01-01T00:00:00Z"}
spec:
  containers:
  - {name: app, image: app, ports: [{name: http, containerPort: 8080}]}
status: {phase: Running, podIP: 10.1.0.5}
---
# Not ready: not running yet.
apiVersion: v1
kind: Pod
metadata: {name: web-pending, namespace: shop, labels: {app: web}}
spec:
  containers:
  - {name: app, image: app, ports: [{name: http, containerPort: 8080}]}
status: {phase: Pending, podIP: 10.1.0.6}
---
# Ready by its condition, but another namespace.
apiVersion: v1
kind: Pod
metadata: {name: web-elsewhere, namespace: other, labels: {app: web}}
spec:
  containers:
  - {name: app, image: app, ports: [{name: http, containerPort: 8080}]}
status:
  podIP: 10.1.0.7
  conditions: [{type: Ready, status: "True"}]
---
# Ready, but the selector wants app=web.
apiVersion: v1
kind: Pod
metadata: {name: api-1, namespace: shop, labels: {app: api}}
spec:
  containers:
  - {name: app, image: app, ports: [{name: http, containerPort: 8080}]}
status: {phase: Running, podIP: 10.1.0.8}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, "fd00:96::10"]
  ipFamilyPolicy: PreferDualStack
  selector: {app: web}
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}
  ports:
  - {name: http, port: 80, targetPort: http}
  - {name: metrics, port: 9090, targetPort: metrics}
  - {name: admin, port: 15000, targetPort: 15000}
  - {name: dns, port: 53, protocol: UDP}
"#;

    const EXTERNAL: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec:
  clusterIP: 10.96.0.20
  ports:
  - {name: sql, port: 5432, targetPort: 15432}
  - {port: 6000}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: db-a
  namespace: shop
  labels: {kubernetes.io/service-name: db}
addressType: IPv4
ports: [{name: sql, port: 15432}, {port: 6001}]
endpoints:
- addresses: [192.168.5.1]
- addresses: [192.168.5.2]
  conditions: {ready: false}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: db-b
  namespace: shop
  labels: {kubernetes.io/service-name: db}
addressType: IPv4
ports: [{name: sql, port: 25432}]
endpoints:
- addresses: [192.168.5.3]
  conditions: {ready: true}
---
# Same service name, other namespace: not db's.
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: db-x
  namespace: other
  labels: {kubernetes.io/service-name: db}
addressType: IPv4
ports: [{name: sql, port: 5432}]
endpoints:
- addresses: [192.168.9.9]
"#;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn endpoint(address: &str, ports: &[(u16, u16)]) -> zmesh_proxy::Endpoint {
        zmesh_proxy::Endpoint {
            ip: ip(address),
            ports: ports.iter().copied().collect(),
        }
    }

    #[test]
    fn loads_services_and_resolves_their_endpoints_from_pods() {
        use zmesh_proxy::{ServicePort, TargetPort};
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "shop.yaml", SHOP);
        let mut m = ManifestDir::new(dir.path());
        let (state, errors) = m.rescan();
        assert!(errors.is_empty(), "{errors:?}");
        let state = state.unwrap();

        let web = state.pods().find(|p| p.name == "web-1").unwrap();
        assert!(web.ready, "phase Running without conditions is ready here");
        assert_eq!(
            web.ports,
            BTreeMap::from([
                ("admin".to_string(), 15000),
                ("http".to_string(), 8080),
                ("metrics".to_string(), 9090),
            ]),
            "named TCP ports of containers and sidecars only"
        );
        let ready: Vec<_> = state
            .pods()
            .filter(|p| p.ready)
            .map(|p| p.name.as_str())
            .collect();
        assert_eq!(
            ready,
            ["web-elsewhere", "api-1", "web-1", "web-2", "web-old"]
        );

        let service = state.service("shop", "web").unwrap();
        assert_eq!(state.services().count(), 1);
        assert_eq!(service.cluster_ips, [ip("10.96.0.10"), ip("fd00:96::10")]);
        assert_eq!(
            service.ports,
            [
                ServicePort {
                    name: Some("http".into()),
                    port: 80,
                    target: TargetPort::Named("http".into())
                },
                ServicePort {
                    name: Some("metrics".into()),
                    port: 9090,
                    target: TargetPort::Named("metrics".into())
                },
                ServicePort {
                    name: Some("admin".into()),
                    port: 15000,
                    target: TargetPort::Number(15000)
                },
            ],
            "UDP ports are left out"
        );
        assert_eq!(service.affinity, Some(Duration::from_secs(600)));
        assert_eq!(
            state.service_endpoints(service),
            [
                endpoint("10.1.0.1", &[(80, 8080), (9090, 9090), (15000, 15000)]),
                endpoint("10.1.0.2", &[(80, 8081), (15000, 15000)]),
                endpoint("10.1.0.3", &[(80, 80), (15000, 15000)]),
                endpoint("fd00::1", &[(80, 8080), (9090, 9090), (15000, 15000)]),
            ]
        );

        // Every pair of the selector must match.
        let mut front = service.clone();
        front.selector = Some(BTreeMap::from([
            ("app".to_string(), "web".to_string()),
            ("tier".to_string(), "front".to_string()),
        ]));
        let ips: Vec<IpAddr> = state
            .service_endpoints(&front)
            .iter()
            .map(|e| e.ip)
            .collect();
        assert_eq!(ips, [ip("10.1.0.1"), ip("fd00::1")]);

        // A pod that serves none of the service's ports is no endpoint.
        let mut metrics_only = service.clone();
        metrics_only.ports.retain(|p| p.port == 9090);
        let ips: Vec<IpAddr> = state
            .service_endpoints(&metrics_only)
            .iter()
            .map(|e| e.ip)
            .collect();
        assert_eq!(ips, [ip("10.1.0.1"), ip("fd00::1")]);
    }

    #[test]
    fn a_service_without_selector_takes_the_ready_addresses_of_its_slices() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "db.yaml", EXTERNAL);
        let mut m = ManifestDir::new(dir.path());
        let (state, errors) = m.rescan();
        assert!(errors.is_empty(), "{errors:?}");
        let state = state.unwrap();
        assert_eq!(state.endpoint_slices().count(), 3);
        let db = state.service("shop", "db").unwrap();
        assert_eq!(db.selector, None);
        assert_eq!(db.affinity, None);
        assert_eq!(
            state.service_endpoints(db),
            [
                // Named port to the slice port of that name, unnamed to unnamed.
                endpoint("192.168.5.1", &[(5432, 15432), (6000, 6001)]),
                endpoint("192.168.5.3", &[(5432, 25432)]),
            ]
        );
    }

    #[test]
    fn a_bad_service_rejects_its_file_only() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "db.yaml", EXTERNAL);
        write(dir.path(), "shop.yaml", SHOP);
        let mut m = ManifestDir::new(dir.path());
        let good = m.rescan().0.unwrap();
        assert_eq!(good.services().count(), 2);

        let cases = [
            (
                SHOP.replace("port: 9090, targetPort", "port: 0, targetPort"),
                "spec.ports[1].port: 0 is not a port number (1-65535)",
            ),
            (
                SHOP.replace("targetPort: 15000", "targetPort: 65536"),
                "spec.ports[2].targetPort: 65536 is not a port number (1-65535)",
            ),
            (
                SHOP.replace(
                    "clusterIP: 10.96.0.10\n",
                    "type: ExternalName\n  externalName: web.example.com\n",
                ),
                "spec.type: ExternalName services are not supported",
            ),
            (
                SHOP.replace("containerPort: 8081", "containerPort: 0"),
                "spec.containers[0].ports[0].containerPort: 0 is not a port number (1-65535)",
            ),
        ];
        for (text, reason) in cases {
            touch_later(dir.path(), "shop.yaml", &text);
            let (state, errors) = m.rescan();
            assert_eq!(state, None, "a bad file changes nothing: {reason}");
            match &errors[..] {
                [e @ ManifestError::InvalidObject { file, .. }] => {
                    assert!(file.ends_with("shop.yaml"), "{e}");
                    let message = e.to_string();
                    assert!(message.contains("document"), "{message}");
                    assert!(message.contains(reason), "{message}");
                }
                other => panic!("{reason}: {other:?}"),
            }
            assert_eq!(m.merge().0, good, "the last good objects stay");
        }

        // A bad slice, in the other file: the first file's objects stay.
        touch_later(
            dir.path(),
            "db.yaml",
            &EXTERNAL.replace("[192.168.5.3]", "[not-an-ip]"),
        );
        let (state, errors) = m.rescan();
        assert_eq!(state, None);
        assert!(
            matches!(&errors[..], [ManifestError::InvalidObject { kind: "EndpointSlice", reason, .. }]
                if reason == "endpoints[0].addresses[0]: \"not-an-ip\" is not an IPv4 address"),
            "{errors:?}"
        );
        touch_later(
            dir.path(),
            "db.yaml",
            &EXTERNAL.replace("labels: {kubernetes.io/service-name: db}", "labels: {}"),
        );
        let (_, errors) = m.rescan();
        assert!(
            matches!(&errors[..], [e @ ManifestError::MissingField { kind: "EndpointSlice", .. }]
                if e.to_string().contains("db.yaml: document 2: EndpointSlice is missing metadata.labels[\"kubernetes.io/service-name\"]")),
            "{errors:?}"
        );
        assert_eq!(m.merge().0, good);

        // A file with only an ExternalName service is rejected, the others load.
        write(
            dir.path(),
            "ext.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: ext}\nspec: {type: ExternalName, externalName: example.com}\n",
        );
        let (state, errors) = m.rescan();
        assert_eq!(state, None);
        assert!(
            matches!(&errors[..], [e @ ManifestError::InvalidObject { kind: "Service", .. }]
                if e.to_string().contains("ext.yaml: document 1: Service is invalid: spec.type: ExternalName services are not supported")),
            "{errors:?}"
        );
    }

    #[test]
    fn a_service_or_slice_defined_twice_keeps_the_first() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.yaml", EXTERNAL);
        write(
            dir.path(),
            "b.yaml",
            &EXTERNAL.replace("10.96.0.20", "10.96.0.99"),
        );
        let mut m = ManifestDir::new(dir.path());
        let (state, errors) = m.rescan();
        let state = state.unwrap();
        let duplicates: Vec<(&str, &str)> = errors
            .iter()
            .map(|e| match e {
                ManifestError::Duplicate {
                    kind, name, file, ..
                } => {
                    assert!(file.ends_with("b.yaml"), "{e}");
                    (*kind, name.as_str())
                }
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            duplicates,
            [
                ("Service", "shop/db"),
                ("EndpointSlice", "shop/db-a"),
                ("EndpointSlice", "shop/db-b"),
                ("EndpointSlice", "other/db-x"),
            ]
        );
        assert_eq!(
            state.service("shop", "db").unwrap().cluster_ips,
            [ip("10.96.0.20")]
        );
    }

    #[test]
    fn removing_a_file_removes_its_objects() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.yaml", GOOD);
        let mut m = ManifestDir::new(dir.path());
        m.rescan();
        std::fs::remove_file(dir.path().join("a.yaml")).unwrap();
        let state = m.rescan().0.unwrap();
        assert_eq!(state.pods().count(), 0);
    }
}
