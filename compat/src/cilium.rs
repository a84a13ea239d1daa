//! Migration of Cilium mutual-auth policies to zmesh.
//!
//! Cilium's mutual-auth mode marks ingress rules of `CiliumNetworkPolicy` and
//! `CiliumClusterwideNetworkPolicy` (`cilium.io/v2`) with `authentication: {mode:
//! required}`. zmesh enforces the same intent with mTLS on every connection of enrolled
//! namespaces plus Istio `AuthorizationPolicy` objects (`security.istio.io/v1`, action
//! ALLOW) that name the peers by identity. For every such rule this produces the
//! namespaces to enroll (label `io.cilium/mtls-enabled: "true"`), the equivalent
//! AuthorizationPolicy rules, and a report of what cannot be carried over.
//!
//! Translation fails closed: a peer or port that cannot be expressed is left out (so the
//! generated policy allows less, never more) and reported. A policy none of whose rules can
//! be carried becomes an ALLOW policy without rules, which Istio reads as "allow nothing".

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Write as _};

use serde::Serialize;
use serde_json::{json, Map, Value};
use zmesh_identity::TrustDomain;

/// The namespace label that enrolls a namespace (Cilium's, which zmesh honours).
pub const ENROLL_LABEL: &str = "io.cilium/mtls-enabled";
/// The pod label Cilium sets to the pod's namespace.
const NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";
/// The pod label Cilium sets to the pod's service account.
const SERVICE_ACCOUNT_LABEL: &str = "io.cilium.k8s.policy.serviceaccount";
/// Annotation on generated objects naming their source policy.
pub const SOURCE_ANNOTATION: &str = "zmesh.io/migrated-from";

const CNP: &str = "CiliumNetworkPolicy";
const CCNP: &str = "CiliumClusterwideNetworkPolicy";

/// Why the input could not be read at all (as opposed to a [`Finding`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MigrateError {
    #[error("{origin}: not valid YAML: {reason}")]
    Yaml { origin: String, reason: String },
    #[error("{origin}: {path}: {reason}")]
    Malformed {
        origin: String,
        path: String,
        reason: String,
    },
    #[error("cannot write the output: {0}")]
    Output(String),
    /// Nothing to migrate: likely the wrong file, or policies of another apiVersion/kind.
    #[error("no CiliumNetworkPolicy or CiliumClusterwideNetworkPolicy in {inputs} ({documents} document(s) read); nothing to migrate")]
    NoCiliumPolicy { inputs: String, documents: usize },
}

/// What kind of thing could not be carried over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FindingKind {
    /// `fromEntities` (world, cluster, host, ...): not workload identities.
    Entities,
    /// `fromCIDR` / `fromCIDRSet`: addresses, not identities.
    Cidr,
    /// `fromRequires`, `fromGroups`, `fromNodes`.
    OtherPeer,
    /// HTTP/Kafka/DNS rules under `toPorts.rules`.
    L7Rules,
    /// A selector label other than namespace or service account.
    UnmappableLabel,
    MatchExpressions,
    /// Authentication on egress rules.
    Egress,
    /// A port that is not TCP, a named port or a port range.
    Port,
    /// An endpointSelector / nodeSelector that cannot become an AuthorizationPolicy selector.
    Selector,
    /// An authentication mode other than `required`.
    AuthMode,
    /// Ingress without authentication beside authenticated ingress on the same endpoints.
    Unauthenticated,
    /// Every rule of a policy was dropped: the generated policy allows nothing.
    AllowsNothing,
    /// Namespaces that could not be listed for enrollment.
    Enrollment,
}

/// One thing that was not carried over, with where it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// `CiliumNetworkPolicy shop/name` (the file and document it was read from).
    pub policy: String,
    /// The rule's path in the policy, e.g. `spec.ingress[1].fromEntities`.
    pub rule: String,
    pub kind: FindingKind,
    pub reason: String,
}

/// Tunables.
#[derive(Debug, Clone)]
pub struct MigrateOptions {
    /// Trust domain of the principals (`<td>/ns/<ns>/sa/<sa>`).
    pub trust_domain: TrustDomain,
    /// Where policies of cluster-wide scope go (Istio's root namespace).
    pub root_namespace: String,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        Self {
            trust_domain: TrustDomain::default(),
            root_namespace: "istio-system".to_owned(),
        }
    }
}

/// The result of a migration.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Migration {
    /// Namespaces to enroll.
    pub namespaces: BTreeSet<String>,
    /// Generated AuthorizationPolicy objects.
    pub policies: Vec<Value>,
    pub findings: Vec<Finding>,
    /// How many Cilium policies were read, and how many had mutual-auth rules.
    pub policies_read: usize,
    pub policies_with_auth: usize,
}

/// Output encodings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Yaml,
    Json,
}

impl Migration {
    /// Every object to apply: Namespace enrollments first, then the policies.
    pub fn objects(&self) -> Vec<Value> {
        let mut out: Vec<Value> = self
            .namespaces
            .iter()
            .map(|ns| {
                json!({
                    "apiVersion": "v1",
                    "kind": "Namespace",
                    "metadata": {"name": ns, "labels": {ENROLL_LABEL: "true"}},
                })
            })
            .collect();
        out.extend(self.policies.iter().cloned());
        out
    }

    /// The objects as `kubectl apply` input: YAML documents, or a JSON `v1/List`.
    pub fn render(&self, format: Format) -> Result<String, MigrateError> {
        let out = |e: &dyn fmt::Display| MigrateError::Output(e.to_string());
        match format {
            Format::Yaml => {
                let mut text = String::new();
                for obj in self.objects() {
                    text.push_str("---\n");
                    text.push_str(&serde_yaml_ng::to_string(&obj).map_err(|e| out(&e))?);
                }
                Ok(text)
            }
            Format::Json => {
                let list = json!({"apiVersion": "v1", "kind": "List", "items": self.objects()});
                serde_json::to_string_pretty(&list)
                    .map(|s| s + "\n")
                    .map_err(|e| out(&e))
            }
        }
    }

    /// Whether everything was carried over: no finding (among them, no generated policy
    /// that allows nothing).
    pub fn is_complete(&self) -> bool {
        self.findings.is_empty()
    }

    /// The findings of one kind.
    pub fn findings_of(&self, kind: FindingKind) -> impl Iterator<Item = &Finding> {
        self.findings.iter().filter(move |f| f.kind == kind)
    }

    /// The report for humans.
    pub fn report_text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "read {} Cilium policies, {} with mutual-auth rules; generated {} AuthorizationPolicies, {} namespaces to enroll",
            self.policies_read,
            self.policies_with_auth,
            self.policies.len(),
            self.namespaces.len()
        );
        if self.findings.is_empty() {
            let _ = writeln!(s, "everything was carried over");
            return s;
        }
        let _ = writeln!(s, "{} items were NOT carried over:", self.findings.len());
        for f in &self.findings {
            let kind = serde_json::to_value(f.kind)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            let _ = writeln!(s, "- [{kind}] {} {}: {}", f.policy, f.rule, f.reason);
        }
        s
    }
}

/// Reads Cilium policies from YAML texts (`(origin, text)`: origin names the file in
/// messages; several documents per text) and translates their mutual-auth rules. Objects
/// of other kinds are skipped.
pub fn migrate(
    inputs: &[(String, String)],
    options: &MigrateOptions,
) -> Result<Migration, MigrateError> {
    use serde::Deserialize as _;
    let mut m = Migration::default();
    let mut documents = 0;
    for (origin, text) in inputs {
        for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
            documents += 1;
            let origin = format!("{origin}, document {}", i + 1);
            let value = serde_yaml_ng::Value::deserialize(doc)
                .map_err(|e| e.to_string())
                .and_then(|v| serde_json::to_value(v).map_err(|e| e.to_string()))
                .map_err(|reason| MigrateError::Yaml {
                    origin: origin.clone(),
                    reason,
                })?;
            document(&value, &origin, options, &mut m)?;
        }
    }
    if m.policies_read == 0 {
        let names: Vec<&str> = inputs.iter().map(|(origin, _)| origin.as_str()).collect();
        return Err(MigrateError::NoCiliumPolicy {
            inputs: names.join(", "),
            documents,
        });
    }
    Ok(m)
}

fn document(
    value: &Value,
    origin: &str,
    options: &MigrateOptions,
    m: &mut Migration,
) -> Result<(), MigrateError> {
    let malformed = |path: &str, reason: &str| MigrateError::Malformed {
        origin: origin.to_owned(),
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    let Some(obj) = value.as_object() else {
        return if value.is_null() {
            Ok(())
        } else {
            Err(malformed("", "a Kubernetes object must be a mapping"))
        };
    };
    let kind = obj.get("kind").and_then(Value::as_str).unwrap_or_default();
    if kind == "List" || kind.ends_with("List") {
        for (i, item) in array(obj.get("items")).iter().enumerate() {
            document(item, &format!("{origin}, items[{i}]"), options, m)?;
        }
        return Ok(());
    }
    if kind != CNP && kind != CCNP {
        return Ok(());
    }
    let api = obj
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if api != "cilium.io/v2" {
        return Err(malformed(
            "apiVersion",
            &format!("{kind} of apiVersion {api:?}; only cilium.io/v2 is read"),
        ));
    }
    let meta = obj.get("metadata").and_then(Value::as_object);
    let name = meta
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| malformed("metadata.name", "missing"))?;
    let clusterwide = kind == CCNP;
    let namespace = if clusterwide {
        None
    } else {
        let ns = meta
            .and_then(|m| m.get("namespace"))
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .unwrap_or("default");
        if let Some(reason) = namespace_problem(ns) {
            return Err(malformed(
                "metadata.namespace",
                &format!("{ns:?} is not a namespace name: {reason}"),
            ));
        }
        Some(ns.to_owned())
    };
    let label = match &namespace {
        Some(ns) => format!("{kind} {ns}/{name}"),
        None => format!("{kind} {name}"),
    };
    let mut specs: Vec<(String, &Map<String, Value>)> = Vec::new();
    if let Some(spec) = obj.get("spec").filter(|v| !v.is_null()) {
        let spec = spec
            .as_object()
            .ok_or_else(|| malformed("spec", "must be a mapping"))?;
        specs.push(("spec".to_owned(), spec));
    }
    if let Some(list) = obj.get("specs").filter(|v| !v.is_null()) {
        let list = list
            .as_array()
            .ok_or_else(|| malformed("specs", "must be a list"))?;
        for (i, spec) in list.iter().enumerate() {
            let spec = spec
                .as_object()
                .ok_or_else(|| malformed(&format!("specs[{i}]"), "must be a mapping"))?;
            specs.push((format!("specs[{i}]"), spec));
        }
    }
    m.policies_read += 1;
    let mut ctx = PolicyCtx {
        label: format!("{label} ({origin})"),
        namespace,
        options,
        findings: Vec::new(),
        enroll: BTreeSet::new(),
        saw_auth: false,
    };
    let many = specs.len() > 1;
    let mut generated = Vec::new();
    for (i, (path, spec)) in specs.iter().enumerate() {
        let ap_name = match (clusterwide, many) {
            (false, false) => format!("{name}-mtls"),
            (false, true) => format!("{name}-mtls-{i}"),
            (true, false) => format!("ccnp-{name}-mtls"),
            (true, true) => format!("ccnp-{name}-mtls-{i}"),
        };
        if let Some(ap) = ctx.spec(path, spec, &ap_name, &label)? {
            generated.push(ap);
        }
    }
    if ctx.saw_auth {
        m.policies_with_auth += 1;
    }
    m.policies.extend(generated);
    m.namespaces.extend(ctx.enroll);
    m.findings.extend(ctx.findings);
    Ok(())
}

fn array(v: Option<&Value>) -> &[Value] {
    v.and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

struct PolicyCtx<'a> {
    label: String,
    /// The policy's namespace; None for cluster-wide policies.
    namespace: Option<String>,
    options: &'a MigrateOptions,
    findings: Vec<Finding>,
    enroll: BTreeSet<String>,
    /// Some rule of the policy asks for authentication.
    saw_auth: bool,
}

/// A peer as an AuthorizationPolicy source.
enum Source {
    Principal(String),
    Namespace(String),
}

impl PolicyCtx<'_> {
    /// A Cilium label selector as a matchLabels-only mapping (null selects everything), or
    /// `None` after reporting why it cannot be carried over.
    fn label_selector<'v>(
        &mut self,
        path: &str,
        selector: &'v Value,
        empty: &'v Map<String, Value>,
        not_a_mapping: &str,
        has_expressions: &str,
    ) -> Option<&'v Map<String, Value>> {
        let sel = match selector {
            Value::Null => empty,
            Value::Object(o) => o,
            _ => {
                self.report(path, FindingKind::Selector, not_a_mapping);
                return None;
            }
        };
        if !array(sel.get("matchExpressions")).is_empty() {
            self.report(
                format!("{path}.matchExpressions"),
                FindingKind::MatchExpressions,
                has_expressions,
            );
            return None;
        }
        Some(sel)
    }

    fn report(&mut self, rule: impl Into<String>, kind: FindingKind, reason: impl Into<String>) {
        self.findings.push(Finding {
            policy: self.label.clone(),
            rule: rule.into(),
            kind,
            reason: reason.into(),
        });
    }

    fn requires_auth(&mut self, path: &str, rule: &Map<String, Value>) -> bool {
        let Some(auth) = rule.get("authentication").filter(|v| !v.is_null()) else {
            return false;
        };
        match auth.get("mode").and_then(Value::as_str) {
            Some("required") => {
                self.saw_auth = true;
                true
            }
            Some("disabled") | None => false,
            Some(other) => {
                self.saw_auth = true;
                self.report(
                    format!("{path}.authentication"),
                    FindingKind::AuthMode,
                    format!("authentication mode {other:?} has no zmesh equivalent; rule skipped"),
                );
                false
            }
        }
    }

    /// Translates one policy spec; None when it has no mutual-auth ingress rule.
    fn spec(
        &mut self,
        path: &str,
        spec: &Map<String, Value>,
        ap_name: &str,
        source_label: &str,
    ) -> Result<Option<Value>, MigrateError> {
        for key in ["egress", "egressDeny"] {
            for (i, rule) in array(spec.get(key)).iter().enumerate() {
                let rpath = format!("{path}.{key}[{i}]");
                if let Some(rule) = rule.as_object() {
                    if self.requires_auth(&rpath, rule) {
                        self.report(
                            rpath,
                            FindingKind::Egress,
                            "authentication on egress is not translated: zmesh authenticates at the destination, so add the matching ingress policy on the destination's side",
                        );
                    }
                }
            }
        }
        let ingress = array(spec.get("ingress"));
        let mut authed = Vec::new();
        let mut plain = Vec::new();
        for (i, rule) in ingress.iter().enumerate() {
            let rpath = format!("{path}.ingress[{i}]");
            let Some(rule) = rule.as_object() else {
                continue;
            };
            if self.requires_auth(&rpath, rule) {
                authed.push((rpath, rule));
            } else {
                plain.push(rpath);
            }
        }
        if authed.is_empty() {
            return Ok(None);
        }
        if spec.get("nodeSelector").is_some_and(|v| !v.is_null()) {
            self.report(
                format!("{path}.nodeSelector"),
                FindingKind::Selector,
                "host policies (nodeSelector) select nodes, not workloads; not translated",
            );
            return Ok(None);
        }
        let Some((target_ns, selector)) =
            self.endpoint_selector(path, spec.get("endpointSelector"))
        else {
            return Ok(None);
        };
        match &target_ns {
            Some(ns) => {
                self.enroll.insert(ns.clone());
            }
            None => self.report(
                format!("{path}.endpointSelector"),
                FindingKind::Enrollment,
                "cluster-wide policy without a namespace: enroll the namespaces of the selected workloads by hand",
            ),
        }
        for p in plain {
            self.report(
                p,
                FindingKind::Unauthenticated,
                "ingress rule without authentication on endpoints that also require it: the generated ALLOW policy denies this traffic unless its sources are enrolled and added to the policy",
            );
        }
        let mut rules = Vec::new();
        for (rpath, rule) in authed {
            if let Some(r) = self.rule(&rpath, rule) {
                rules.push(r);
            }
        }
        if rules.is_empty() {
            self.report(
                path.to_owned(),
                FindingKind::AllowsNothing,
                format!(
                    "no mutual-auth rule could be carried over: {ap_name} allows nothing until it is completed by hand"
                ),
            );
        }
        let mut spec_out = Map::new();
        if !selector.is_empty() {
            spec_out.insert("selector".into(), json!({"matchLabels": selector}));
        }
        spec_out.insert("action".into(), json!("ALLOW"));
        spec_out.insert("rules".into(), Value::Array(rules));
        let namespace = target_ns.unwrap_or_else(|| self.options.root_namespace.clone());
        Ok(Some(json!({
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {
                "name": ap_name,
                "namespace": namespace,
                "annotations": {SOURCE_ANNOTATION: source_label},
            },
            "spec": spec_out,
        })))
    }

    /// The target: (namespace, pod labels). None (reported) when it cannot be expressed.
    fn endpoint_selector(
        &mut self,
        path: &str,
        selector: Option<&Value>,
    ) -> Option<(Option<String>, BTreeMap<String, String>)> {
        let spath = format!("{path}.endpointSelector");
        let empty = Map::new();
        let sel = self.label_selector(
            &spath,
            selector.unwrap_or(&Value::Null),
            &empty,
            "endpointSelector is not a mapping; policy skipped",
            "AuthorizationPolicy selectors take matchLabels only; policy skipped (translate it by hand)",
        )?;
        let mut namespace = self.namespace.clone();
        let mut labels = BTreeMap::new();
        for (key, value) in sel
            .get("matchLabels")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
        {
            let value = value.as_str().unwrap_or_default().to_owned();
            let Some(key) = strip_source(key) else {
                self.report(
                    format!("{spath}.matchLabels.{key}"),
                    FindingKind::UnmappableLabel,
                    format!("label {key:?} is not a pod label; policy skipped"),
                );
                return None;
            };
            if key == NAMESPACE_LABEL {
                if self.namespace.as_ref().is_some_and(|ns| *ns != value) {
                    // Cilium never selects across namespaces from a namespaced policy.
                    self.report(
                        format!("{spath}.matchLabels.{key}"),
                        FindingKind::Selector,
                        format!("selects namespace {value:?} from a policy in another namespace, which matches nothing; policy skipped"),
                    );
                    return None;
                }
                if let Some(reason) = namespace_problem(&value) {
                    self.report(
                        format!("{spath}.matchLabels.{key}"),
                        FindingKind::Selector,
                        format!("{value:?} is not a namespace name ({reason}); policy skipped"),
                    );
                    return None;
                }
                namespace = Some(value);
            } else if key == SERVICE_ACCOUNT_LABEL || key.starts_with("io.cilium.k8s.") {
                self.report(
                    format!("{spath}.matchLabels.{key}"),
                    FindingKind::UnmappableLabel,
                    format!("AuthorizationPolicy selectors match pod labels; {key:?} is not one; policy skipped"),
                );
                return None;
            } else {
                labels.insert(key.to_owned(), value);
            }
        }
        Some((namespace, labels))
    }

    /// One mutual-auth ingress rule as an AuthorizationPolicy rule; None when nothing of
    /// it can be carried (reported).
    fn rule(&mut self, path: &str, rule: &Map<String, Value>) -> Option<Value> {
        for (key, kind, why) in [
            (
                "fromEntities",
                FindingKind::Entities,
                "entities (world, cluster, host, ...) are not workload identities",
            ),
            (
                "fromCIDR",
                FindingKind::Cidr,
                "CIDR peers are addresses, not identities",
            ),
            (
                "fromCIDRSet",
                FindingKind::Cidr,
                "CIDR peers are addresses, not identities",
            ),
            (
                "fromRequires",
                FindingKind::OtherPeer,
                "fromRequires has no AuthorizationPolicy equivalent",
            ),
            (
                "fromGroups",
                FindingKind::OtherPeer,
                "cloud provider groups are not identities",
            ),
            (
                "fromNodes",
                FindingKind::OtherPeer,
                "nodes are not workload identities",
            ),
        ] {
            if rule.get(key).is_some_and(|v| !v.is_null()) {
                self.report(
                    format!("{path}.{key}"),
                    kind,
                    format!("{why}; these peers are not allowed by the generated policy"),
                );
            }
        }
        // L7 rules are listed whatever becomes of the rule's peers: they are never carried.
        for (i, entry) in array(rule.get("toPorts")).iter().enumerate() {
            if let Some(protocols) = l7_protocols(entry) {
                self.report(
                    format!("{path}.toPorts[{i}].rules"),
                    FindingKind::L7Rules,
                    format!(
                        "L7 rules ({protocols}) are not enforced by an L4 node proxy; dropped, and the ports of this toPorts entry are not allowed by the generated policy"
                    ),
                );
            }
        }
        let mut sources = Vec::new();
        for (i, sel) in array(rule.get("fromEndpoints")).iter().enumerate() {
            let spath = format!("{path}.fromEndpoints[{i}]");
            if let Some(s) = self.peer(&spath, sel) {
                sources.push(s);
            }
        }
        if sources.is_empty() {
            self.report(
                path.to_owned(),
                FindingKind::OtherPeer,
                "no peer of this rule maps to an identity; rule dropped",
            );
            return None;
        }
        let ports = match rule.get("toPorts").filter(|v| !v.is_null()) {
            None => None,
            Some(to_ports) => {
                let ports = self.ports(path, array(Some(to_ports)));
                if ports.is_empty() {
                    self.report(
                        format!("{path}.toPorts"),
                        FindingKind::Port,
                        "no port of this rule can be carried over; rule dropped",
                    );
                    return None;
                }
                Some(ports)
            }
        };
        let from: Vec<Value> = sources
            .into_iter()
            .map(|s| match s {
                Source::Principal(p) => json!({"source": {"principals": [p]}}),
                Source::Namespace(ns) => json!({"source": {"namespaces": [ns]}}),
            })
            .collect();
        let mut out = json!({"from": from});
        // `ports` empty after "0" (all ports) means no port condition.
        if let Some(ports) = ports.filter(|p| !p.contains(&0)) {
            let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
            out["to"] = json!([{"operation": {"ports": ports}}]);
        }
        Some(out)
    }

    /// The TCP ports of `toPorts` (0 = all ports), reporting the rest.
    fn ports(&mut self, path: &str, to_ports: &[Value]) -> BTreeSet<u16> {
        let mut out = BTreeSet::new();
        for (i, entry) in to_ports.iter().enumerate() {
            let epath = format!("{path}.toPorts[{i}]");
            if l7_protocols(entry).is_some() {
                // Reported by `rule`.
                continue;
            }
            for (j, p) in array(entry.get("ports")).iter().enumerate() {
                let ppath = format!("{epath}.ports[{j}]");
                let proto = p
                    .get("protocol")
                    .and_then(Value::as_str)
                    .unwrap_or("ANY")
                    .to_ascii_uppercase();
                if proto != "TCP" && proto != "ANY" {
                    self.report(
                        ppath,
                        FindingKind::Port,
                        format!(
                            "{proto} traffic is not carried by the mesh (TCP only); port dropped"
                        ),
                    );
                    continue;
                }
                if p.get("endPort").is_some_and(|v| !v.is_null()) {
                    self.report(ppath, FindingKind::Port, "port ranges (endPort) are not expressible in AuthorizationPolicy; port dropped");
                    continue;
                }
                let port = match p.get("port") {
                    Some(Value::Number(n)) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
                    Some(Value::String(s)) => s.parse::<u16>().ok(),
                    None | Some(Value::Null) => Some(0),
                    _ => None,
                };
                match port {
                    Some(port) => {
                        out.insert(port);
                    }
                    None => {
                        let shown = p.get("port").map(Value::to_string).unwrap_or_default();
                        self.report(
                            ppath,
                            FindingKind::Port,
                            format!("port {shown} is a named port or out of range; AuthorizationPolicy needs numbers; port dropped"),
                        );
                    }
                }
            }
        }
        out
    }

    /// One `fromEndpoints` selector as a source; None (reported) when it selects by
    /// something other than namespace and service account.
    fn peer(&mut self, path: &str, sel: &Value) -> Option<Source> {
        let empty = Map::new();
        let sel = self.label_selector(
            path,
            sel,
            &empty,
            "selector is not a mapping; peer dropped",
            "matchExpressions do not map to identities; peer dropped",
        )?;
        let mut namespace = self.namespace.clone();
        let mut service_account = None;
        let mut unmapped = Vec::new();
        for (key, value) in sel
            .get("matchLabels")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
        {
            let value = value.as_str().unwrap_or_default().to_owned();
            match strip_source(key) {
                Some(NAMESPACE_LABEL) => namespace = Some(value),
                Some(SERVICE_ACCOUNT_LABEL) => service_account = Some(value),
                _ => unmapped.push(format!("{key}={value}")),
            }
        }
        if !unmapped.is_empty() {
            self.report(
                format!("{path}.matchLabels"),
                FindingKind::UnmappableLabel,
                format!(
                    "labels {} do not map to a namespace or service account (identities are per service account); peer dropped",
                    unmapped.join(", ")
                ),
            );
            return None;
        }
        // Only names Kubernetes could have given are carried over: anything else would make
        // the generated policy invalid, or (a `*`) an Istio wildcard allowing more peers.
        let bad_namespace = namespace.as_deref().and_then(|ns| {
            namespace_problem(ns).map(|r| format!("namespace {ns:?} is not a namespace name ({r})"))
        });
        let bad_service_account = || {
            service_account.as_deref().and_then(|sa| {
                service_account_problem(sa)
                    .map(|r| format!("service account {sa:?} is not a service account name ({r})"))
            })
        };
        if let Some(problem) = bad_namespace.or_else(bad_service_account) {
            self.report(
                format!("{path}.matchLabels"),
                FindingKind::UnmappableLabel,
                format!("{problem}; peer dropped"),
            );
            return None;
        }
        if let Some(ns) = &namespace {
            self.enroll.insert(ns.clone());
        }
        let td = self.options.trust_domain.as_str();
        Some(match (namespace, service_account) {
            (Some(ns), Some(sa)) => Source::Principal(format!("{td}/ns/{ns}/sa/{sa}")),
            (None, Some(sa)) => Source::Principal(format!("*/sa/{sa}")),
            (Some(ns), None) => Source::Namespace(ns),
            (None, None) => {
                self.report(
                    path,
                    FindingKind::Enrollment,
                    "any endpoint of the cluster: allowed as any authenticated identity; enroll the source namespaces by hand",
                );
                Source::Principal("*".to_owned())
            }
        })
    }
}

/// The L7 protocols of a `toPorts` entry's `rules` (`http`, `kafka`, `dns`, `l7proto`...),
/// comma-separated; None when it has none.
fn l7_protocols(entry: &Value) -> Option<String> {
    let rules = entry.get("rules").filter(|r| !r.is_null())?;
    let names: Vec<&str> = match rules.as_object() {
        Some(o) if o.is_empty() => return None,
        Some(o) => o.keys().map(String::as_str).collect(),
        // Not a mapping: still not L4; never carried over.
        None => vec!["unreadable"],
    };
    Some(names.join(", "))
}

/// Why `s` is not a Kubernetes namespace name (an RFC 1123 label), if it is not.
fn namespace_problem(s: &str) -> Option<&'static str> {
    if s.len() > 63 {
        return Some("longer than 63 characters");
    }
    dns_label_problem(s)
}

/// Why `s` is not a Kubernetes service account name (an RFC 1123 subdomain), if it is not.
fn service_account_problem(s: &str) -> Option<&'static str> {
    if s.len() > 253 {
        return Some("longer than 253 characters");
    }
    s.split('.').find_map(dns_label_problem)
}

fn dns_label_problem(s: &str) -> Option<&'static str> {
    if s.is_empty() {
        return Some("empty");
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Some("only lowercase letters, digits and '-' are allowed");
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Some("must start and end with a letter or digit");
    }
    None
}

/// A label key without Cilium's source prefix (`k8s:`, `any:`); None for other sources
/// (`reserved:`, `cidr:`, ...), which are not pod labels.
fn strip_source(key: &str) -> Option<&str> {
    match key.split_once(':') {
        Some(("k8s" | "any", rest)) => Some(rest),
        Some(_) => None,
        None => Some(key),
    }
}

#[cfg(test)]
mod tests;
