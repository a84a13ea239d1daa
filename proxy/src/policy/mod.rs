//! Identity-based L4 authorization: Istio's `AuthorizationPolicy` (`security.istio.io/v1`
//! and `v1beta1`), the subset a node proxy can enforce without reading HTTP.
//!
//! Accepted: `metadata.name/namespace`, `spec.selector.matchLabels`, `spec.action`
//! (ALLOW or DENY), and in `spec.rules[]`: `from[].source` with `principals`,
//! `notPrincipals`, `namespaces`, `notNamespaces`, `ipBlocks`, `notIpBlocks`, and
//! `to[].operation` with `ports`, `notPorts`. Everything else is rejected with the field
//! path, never ignored: a policy that silently lost a condition would allow (ALLOW) or
//! miss (DENY) traffic its author did not intend.
//!
//! Evaluation follows Istio: a matching DENY policy denies; otherwise, if no ALLOW policy
//! applies to the destination, the request is allowed; otherwise one ALLOW rule must match.
//! A source without a verified identity (plaintext) never matches `principals` or
//! `namespaces`, and always satisfies `notPrincipals` / `notNamespaces`, exactly as
//! ztunnel treats the absent identity as the empty string (so Istio's documented
//! "DENY notPrincipals: ['*']" rejects plaintext).

mod parse;

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use zmesh_identity::SpiffeId;

use crate::authz::{Authorizer, AuthzRequest, Decision};
use crate::workloads::Workload;

/// Istio's default root namespace: policies there apply to the whole mesh.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

/// `namespace/name` of a policy.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyRef {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for PolicyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl FromStr for PolicyRef {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(Self {
                    namespace: ns.to_owned(),
                    name: name.to_owned(),
                })
            }
            _ => Err(format!("policy {s:?} is not of the form namespace/name")),
        }
    }
}

impl Serialize for PolicyRef {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PolicyRef {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What a policy does when one of its rules matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    #[default]
    Allow,
    Deny,
}

/// Why a policy document was rejected: where, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{origin}: {}{kind}", if .path.is_empty() { String::new() } else { format!("{}: ", .path) })]
pub struct PolicyError {
    /// Which document: `document 2 (prod/allow-web)`.
    pub origin: String,
    /// The field, e.g. `spec.rules[0].to[0].operation.methods`; empty for the document.
    pub path: String,
    pub kind: PolicyErrorKind,
}

/// The problem with one field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyErrorKind {
    #[error("invalid YAML: {0}")]
    Yaml(String),
    #[error("unknown field")]
    UnknownField,
    #[error("required field is missing")]
    Missing,
    #[error("must be {expected}")]
    WrongType { expected: &'static str },
    #[error("must not be empty (it would match everything)")]
    Empty,
    #[error("{0}")]
    Unsupported(&'static str),
    #[error(
        "apiVersion {0:?} is not supported; use security.istio.io/v1 or security.istio.io/v1beta1"
    )]
    BadApiVersion(String),
    #[error("action {0} is not supported; use ALLOW or DENY")]
    UnsupportedAction(String),
    #[error("unknown action {0:?}; use ALLOW or DENY")]
    BadAction(String),
    #[error("invalid principal {value:?}: {reason}")]
    BadPrincipal { value: String, reason: String },
    #[error("invalid namespace {value:?}: {reason}")]
    BadNamespace { value: String, reason: String },
    #[error("invalid IP block {value:?}: {reason}")]
    BadIpBlock { value: String, reason: String },
    #[error("invalid port {value:?}: {reason}")]
    BadPort { value: String, reason: String },
    #[error("policy is defined twice")]
    Duplicate,
}

/// Every problem found in a set of policy documents; none of them was applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.as_slice() {
            [one] => write!(f, "invalid authorization policy: {one}"),
            many => {
                write!(f, "{} errors in authorization policies:", many.len())?;
                for e in many {
                    write!(f, "\n  {e}")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for PolicyErrors {}

/// A string condition with Istio's wildcards.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    /// `*`: any non-empty value, i.e. "has an identity".
    Any,
}

impl StringMatch {
    fn literal(&self) -> &str {
        match self {
            Self::Exact(s) | Self::Prefix(s) | Self::Suffix(s) => s,
            Self::Any => "",
        }
    }

    /// `value` is empty when the source has no verified identity: nothing matches it.
    fn matches(&self, value: &str) -> bool {
        if value.is_empty() {
            return false;
        }
        match self {
            Self::Exact(s) => value == s,
            Self::Prefix(s) => value.starts_with(s.as_str()),
            Self::Suffix(s) => value.ends_with(s.as_str()),
            Self::Any => true,
        }
    }
}

/// An IP block, with the host bits cleared (as Envoy and ztunnel do).
/// Read back through [`Cidr::new`], so a read CIDR is always masked and in range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "(IpAddr, u8)", from = "(IpAddr, u8)")]
struct Cidr {
    addr: IpAddr,
    len: u8,
}

impl From<(IpAddr, u8)> for Cidr {
    fn from((addr, len): (IpAddr, u8)) -> Self {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        Self::new(addr, len.min(max))
    }
}

impl From<Cidr> for (IpAddr, u8) {
    fn from(cidr: Cidr) -> Self {
        (cidr.addr, cidr.len)
    }
}

impl Cidr {
    fn new(addr: IpAddr, len: u8) -> Self {
        let addr = match addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
                IpAddr::V4((u32::from(a) & mask).into())
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
                IpAddr::V6((u128::from(a) & mask).into())
            }
        };
        Self { addr, len }
    }

    fn contains(&self, ip: IpAddr) -> bool {
        // A v4 client seen through a dual-stack socket is ::ffff:a.b.c.d.
        let ip = ip.to_canonical();
        ip.is_ipv4() == self.addr.is_ipv4() && Self::new(ip, self.len).addr == self.addr
    }
}

/// `from[].source`: all present fields must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Source {
    principals: Vec<StringMatch>,
    not_principals: Vec<StringMatch>,
    namespaces: Vec<StringMatch>,
    not_namespaces: Vec<StringMatch>,
    ip_blocks: Vec<Cidr>,
    not_ip_blocks: Vec<Cidr>,
}

impl Source {
    fn is_empty(&self) -> bool {
        self.principals.is_empty()
            && self.not_principals.is_empty()
            && self.namespaces.is_empty()
            && self.not_namespaces.is_empty()
            && self.ip_blocks.is_empty()
            && self.not_ip_blocks.is_empty()
    }
}

/// `to[].operation`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Operation {
    ports: Vec<u16>,
    not_ports: Vec<u16>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Rule {
    from: Vec<Source>,
    to: Vec<Operation>,
}

/// One parsed, valid `AuthorizationPolicy`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    id: PolicyRef,
    /// `None`: every workload of the namespace (or the mesh, in the root namespace).
    selector: Option<BTreeMap<String, String>>,
    action: Action,
    rules: Vec<Rule>,
}

impl Policy {
    /// Parses one `AuthorizationPolicy` object, e.g. from the Kubernetes API.
    pub fn from_json(value: &serde_json::Value) -> Result<Self, PolicyErrors> {
        let mut errors = Vec::new();
        let parsed = parse::document(value, "document 1", &mut errors);
        if !errors.is_empty() {
            return Err(PolicyErrors(errors));
        }
        match parsed {
            parse::Parsed::Policies(mut p) if p.len() == 1 => Ok(p.remove(0)),
            _ => Err(PolicyErrors(vec![PolicyError {
                origin: "document 1".into(),
                path: "kind".into(),
                kind: PolicyErrorKind::WrongType {
                    expected: "AuthorizationPolicy",
                },
            }])),
        }
    }

    pub fn id(&self) -> &PolicyRef {
        &self.id
    }

    pub fn action(&self) -> Action {
        self.action
    }

    /// `spec.selector.matchLabels`; `None` when the policy selects every workload.
    pub fn selector(&self) -> Option<&BTreeMap<String, String>> {
        self.selector.as_ref()
    }

    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }
}

/// The connection being authorized.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub destination_namespace: &'a str,
    /// The destination pod's labels; `None` if unknown, which denies whenever a policy
    /// with a selector could apply (fail closed).
    pub destination_labels: Option<&'a BTreeMap<String, String>>,
    /// The verified identity of the client; `None` for plaintext.
    pub source_identity: Option<&'a SpiffeId>,
    /// `None` if the caller cannot tell: `ipBlocks`/`notIpBlocks` then count as matching
    /// in DENY rules and as not matching in ALLOW rules (fail closed).
    pub source_ip: Option<IpAddr>,
    pub destination_port: u16,
}

/// Why a request was allowed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Allowed {
    /// No ALLOW policy applies to the destination.
    NoAllowPolicy,
    /// This ALLOW policy's rule matched.
    Policy { policy: PolicyRef, rule: usize },
}

/// Why a request was denied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Denial {
    /// This DENY policy's rule matched.
    DenyPolicy { policy: PolicyRef, rule: usize },
    /// ALLOW policies apply to the destination but none of their rules matched.
    NoAllowMatched { considered: Vec<PolicyRef> },
    /// The destination's labels are unknown and these policies have selectors.
    UnknownLabels { policies: Vec<PolicyRef> },
}

impl Denial {
    /// The policy to blame in metrics: the DENY policy, or `None`.
    pub fn policy(&self) -> Option<&PolicyRef> {
        match self {
            Denial::DenyPolicy { policy, .. } => Some(policy),
            _ => None,
        }
    }
}

fn join(refs: &[PolicyRef]) -> String {
    refs.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Denial::DenyPolicy { policy, rule } => {
                write!(f, "DENY policy {policy} rule {rule}")
            }
            Denial::NoAllowMatched { considered } => write!(
                f,
                "no ALLOW policy matched (considered: {})",
                join(considered)
            ),
            Denial::UnknownLabels { policies } => write!(
                f,
                "destination labels unknown; selector policies apply: {}",
                join(policies)
            ),
        }
    }
}

impl fmt::Display for Allowed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Allowed::NoAllowPolicy => f.write_str("no ALLOW policy applies"),
            Allowed::Policy { policy, rule } => write!(f, "ALLOW policy {policy} rule {rule}"),
        }
    }
}

/// The outcome of [`PolicySet::evaluate`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Allow(Allowed),
    Deny(Denial),
}

impl Verdict {
    pub fn is_allowed(&self) -> bool {
        matches!(self, Verdict::Allow(_))
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Allow(a) => write!(f, "allowed: {a}"),
            Verdict::Deny(d) => write!(f, "denied: {d}"),
        }
    }
}

/// The source of a request as policies see it.
struct Peer {
    /// The SPIFFE ID without `spiffe://` (Istio's principal form); empty for plaintext.
    principal: String,
    /// From `/ns/<namespace>/sa/<sa>`; empty for plaintext or other ID shapes.
    namespace: String,
    ip: Option<IpAddr>,
    port: u16,
}

impl Peer {
    fn new(r: &Request<'_>) -> Self {
        let (principal, namespace) = match r.source_identity {
            None => (String::new(), String::new()),
            Some(id) => {
                let segs: Vec<&str> = id.segments().collect();
                let ns = match segs.as_slice() {
                    ["ns", ns, "sa", _] => (*ns).to_owned(),
                    _ => String::new(),
                };
                (format!("{}{}", id.trust_domain(), id.path()), ns)
            }
        };
        Self {
            principal,
            namespace,
            ip: r.source_ip,
            port: r.destination_port,
        }
    }
}

/// `positive` (if set) has a match and `negative` (if set) has none.
fn both<T>(positive: &[T], negative: &[T], mut hit: impl FnMut(&T) -> bool) -> bool {
    (positive.is_empty() || positive.iter().any(&mut hit))
        && (negative.is_empty() || !negative.iter().any(&mut hit))
}

impl Source {
    /// `unknown_ip`: what an IP condition evaluates to when the source IP is unknown.
    fn matches(&self, p: &Peer, unknown_ip: bool) -> bool {
        let ips = match p.ip {
            Some(ip) => both(&self.ip_blocks, &self.not_ip_blocks, |c| c.contains(ip)),
            None => (self.ip_blocks.is_empty() && self.not_ip_blocks.is_empty()) || unknown_ip,
        };
        ips && both(&self.principals, &self.not_principals, |m| {
            m.matches(&p.principal)
        }) && both(&self.namespaces, &self.not_namespaces, |m| {
            m.matches(&p.namespace)
        })
    }
}

impl Rule {
    fn matches(&self, p: &Peer, unknown_ip: bool) -> bool {
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(p, unknown_ip)))
            && (self.to.is_empty()
                || self
                    .to
                    .iter()
                    .any(|o| both(&o.ports, &o.not_ports, |port| *port == p.port)))
    }
}

impl Policy {
    /// The index of the first matching rule. Unknown source IPs resolve toward denial.
    fn matching_rule(&self, p: &Peer) -> Option<usize> {
        let unknown_ip = self.action == Action::Deny;
        self.rules.iter().position(|r| r.matches(p, unknown_ip))
    }
}

/// An immutable, valid set of policies and the root namespace they are read against.
/// Read back through [`PolicySet::new`]'s checks (sorted, no duplicates).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "PolicySetWire")]
pub struct PolicySet {
    root_namespace: String,
    /// Sorted by namespace/name so verdicts are deterministic.
    policies: Vec<Policy>,
}

#[derive(Deserialize)]
struct PolicySetWire {
    root_namespace: String,
    policies: Vec<Policy>,
}

impl TryFrom<PolicySetWire> for PolicySet {
    type Error = PolicyErrors;
    fn try_from(wire: PolicySetWire) -> Result<Self, PolicyErrors> {
        Ok(Self::new(wire.policies)?.with_root_namespace(wire.root_namespace))
    }
}

impl Default for PolicySet {
    fn default() -> Self {
        Self {
            root_namespace: DEFAULT_ROOT_NAMESPACE.to_owned(),
            policies: Vec::new(),
        }
    }
}

impl PolicySet {
    /// A set of policies; the same namespace/name twice is an error.
    pub fn new(policies: impl IntoIterator<Item = Policy>) -> Result<Self, PolicyErrors> {
        let mut policies: Vec<Policy> = policies.into_iter().collect();
        policies.sort_by(|a, b| a.id.cmp(&b.id));
        let errors: Vec<PolicyError> = policies
            .windows(2)
            .filter(|w| w[0].id == w[1].id)
            .map(|w| PolicyError {
                origin: w[1].id.to_string(),
                path: String::new(),
                kind: PolicyErrorKind::Duplicate,
            })
            .collect();
        if !errors.is_empty() {
            return Err(PolicyErrors(errors));
        }
        Ok(Self {
            policies,
            ..Self::default()
        })
    }

    /// Parses a multi-document YAML text (a manifest file). Objects of other kinds (Pods,
    /// Namespaces, ...) are skipped; `List` objects are read item by item. Every problem
    /// in every document is reported, and any problem rejects the whole set.
    pub fn parse_documents(text: &str) -> Result<Self, PolicyErrors> {
        use serde::Deserialize as _;
        let mut errors = Vec::new();
        let mut policies = Vec::new();
        for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
            let origin = format!("document {}", i + 1);
            let value = serde_yaml_ng::Value::deserialize(doc)
                .map_err(|e| e.to_string())
                .and_then(|v| serde_json::to_value(v).map_err(|e| e.to_string()));
            match value {
                Ok(v) => {
                    if let parse::Parsed::Policies(p) = parse::document(&v, &origin, &mut errors) {
                        policies.extend(p);
                    }
                }
                Err(e) => {
                    errors.push(PolicyError {
                        origin,
                        path: String::new(),
                        kind: PolicyErrorKind::Yaml(e),
                    });
                    // The YAML stream cannot be resynchronized after a syntax error.
                    break;
                }
            }
        }
        if !errors.is_empty() {
            return Err(PolicyErrors(errors));
        }
        Self::new(policies)
    }

    /// Parses Kubernetes objects (from the API or a decoded manifest); other kinds are
    /// skipped, as in [`PolicySet::parse_documents`].
    pub fn from_values<'a>(
        values: impl IntoIterator<Item = &'a serde_json::Value>,
    ) -> Result<Self, PolicyErrors> {
        let mut errors = Vec::new();
        let mut policies = Vec::new();
        for (i, v) in values.into_iter().enumerate() {
            let origin = format!("document {}", i + 1);
            if let parse::Parsed::Policies(p) = parse::document(v, &origin, &mut errors) {
                policies.extend(p);
            }
        }
        if !errors.is_empty() {
            return Err(PolicyErrors(errors));
        }
        Self::new(policies)
    }

    /// Sets the namespace whose policies apply mesh-wide (Istio's `rootNamespace`).
    pub fn with_root_namespace(mut self, namespace: impl Into<String>) -> Self {
        self.root_namespace = namespace.into();
        self
    }

    pub fn root_namespace(&self) -> &str {
        &self.root_namespace
    }

    pub fn policies(&self) -> &[Policy] {
        &self.policies
    }

    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// Whether `policy` applies to the destination: `Some(false/true)`, or `None` when
    /// it depends on labels we do not know.
    fn applies(&self, policy: &Policy, r: &Request<'_>) -> Option<bool> {
        if policy.id.namespace != r.destination_namespace
            && policy.id.namespace != self.root_namespace
        {
            return Some(false);
        }
        let Some(selector) = &policy.selector else {
            return Some(true);
        };
        let labels = r.destination_labels?;
        Some(selector.iter().all(|(k, v)| labels.get(k) == Some(v)))
    }

    /// Decides a request, Istio's way: DENY first, then ALLOW if any applies.
    pub fn evaluate(&self, r: &Request<'_>) -> Verdict {
        let mut unknown = Vec::new();
        let mut applicable = Vec::new();
        for policy in &self.policies {
            match self.applies(policy, r) {
                Some(true) => applicable.push(policy),
                Some(false) => {}
                None => unknown.push(policy.id.clone()),
            }
        }
        if !unknown.is_empty() {
            return Verdict::Deny(Denial::UnknownLabels { policies: unknown });
        }
        let peer = Peer::new(r);
        for policy in applicable.iter().filter(|p| p.action == Action::Deny) {
            if let Some(rule) = policy.matching_rule(&peer) {
                return Verdict::Deny(Denial::DenyPolicy {
                    policy: policy.id.clone(),
                    rule,
                });
            }
        }
        let mut considered = Vec::new();
        for policy in applicable.iter().filter(|p| p.action == Action::Allow) {
            if let Some(rule) = policy.matching_rule(&peer) {
                return Verdict::Allow(Allowed::Policy {
                    policy: policy.id.clone(),
                    rule,
                });
            }
            considered.push(policy.id.clone());
        }
        if considered.is_empty() {
            Verdict::Allow(Allowed::NoAllowPolicy)
        } else {
            Verdict::Deny(Denial::NoAllowMatched { considered })
        }
    }

    /// For re-checking an open connection after a policy change: why it must now be
    /// closed, or `None` if it may stay.
    pub fn denies_existing(&self, r: &Request<'_>) -> Option<Denial> {
        match self.evaluate(r) {
            Verdict::Allow(_) => None,
            Verdict::Deny(d) => Some(d),
        }
    }
}

/// The policies in force, swappable while the proxy runs. A new set is only ever stored
/// whole and valid: a bad update leaves the previous set in force.
#[derive(Debug)]
pub struct PolicyStore {
    current: ArcSwap<PolicySet>,
    /// Bumped on every replace: the proxy re-checks open connections against the new set.
    generation: watch::Sender<u64>,
}

impl Default for PolicyStore {
    fn default() -> Self {
        Self::new(PolicySet::default())
    }
}

impl PolicyStore {
    pub fn new(set: PolicySet) -> Self {
        Self {
            current: ArcSwap::from_pointee(set),
            generation: watch::Sender::new(0),
        }
    }

    /// The current set; cheap and lock-free.
    pub fn snapshot(&self) -> Arc<PolicySet> {
        self.current.load_full()
    }

    /// Puts `set` in force for new connections and has open ones re-checked; returns the
    /// set it replaced.
    pub fn replace(&self, set: PolicySet) -> Arc<PolicySet> {
        let old = self.current.swap(Arc::new(set));
        self.generation.send_modify(|g| *g = g.wrapping_add(1));
        old
    }

    /// Parses `text` and, only if every document is valid, puts it in force (keeping the
    /// current root namespace). On error nothing changes.
    pub fn replace_from_documents(&self, text: &str) -> Result<Arc<PolicySet>, PolicyErrors> {
        let root = self.snapshot().root_namespace.clone();
        let set = PolicySet::parse_documents(text)?.with_root_namespace(root);
        Ok(self.replace(set))
    }

    /// Changes on every [`PolicyStore::replace`].
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }
}

/// Where [`PolicyAuthorizer`] finds a destination pod's labels.
pub trait LabelSource: Send + Sync + 'static {
    /// The pod's labels, or `None` if unknown (selector policies then deny).
    fn labels(&self, workload: &Workload) -> Option<Arc<BTreeMap<String, String>>>;
}

/// Knows no labels: policies with selectors deny (fail closed).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoLabels;

impl LabelSource for NoLabels {
    fn labels(&self, _workload: &Workload) -> Option<Arc<BTreeMap<String, String>>> {
        None
    }
}

/// The labels the workload table carries for each pod (filled by the agent from the pod
/// objects): the source the proxy uses.
#[derive(Debug, Default, Clone, Copy)]
pub struct TableLabels;

impl LabelSource for TableLabels {
    fn labels(&self, workload: &Workload) -> Option<Arc<BTreeMap<String, String>>> {
        Some(workload.labels.clone())
    }
}

/// The proxy's [`Authorizer`] backed by a [`PolicyStore`]. `ipBlocks` are matched against
/// the connection's peer address, never against a header.
pub struct PolicyAuthorizer {
    store: Arc<PolicyStore>,
    labels: Arc<dyn LabelSource>,
}

impl fmt::Debug for PolicyAuthorizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PolicyAuthorizer")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl PolicyAuthorizer {
    pub fn new(store: Arc<PolicyStore>, labels: Arc<dyn LabelSource>) -> Self {
        Self { store, labels }
    }

    /// The full verdict for a proxy request (for flow events and logs).
    pub fn verdict(&self, request: &AuthzRequest<'_>) -> Verdict {
        let labels = self.labels.labels(request.destination);
        let set = self.store.snapshot();
        set.evaluate(&Request {
            destination_namespace: &request.destination.namespace,
            destination_labels: labels.as_deref(),
            source_identity: request.source,
            source_ip: Some(request.source_ip),
            destination_port: request.port,
        })
    }
}

fn decision(verdict: &Verdict) -> Decision {
    match verdict {
        Verdict::Allow(_) => Decision::Allow,
        Verdict::Deny(d) => Decision::Deny {
            policy: d.to_string(),
        },
    }
}

impl Authorizer for PolicyAuthorizer {
    fn authorize(&self, request: &AuthzRequest<'_>) -> Decision {
        decision(&self.verdict(request))
    }

    fn decide(&self, request: &AuthzRequest<'_>) -> (Decision, Option<Verdict>) {
        let verdict = self.verdict(request);
        (decision(&verdict), Some(verdict))
    }

    fn changes(&self) -> Option<watch::Receiver<u64>> {
        Some(self.store.subscribe())
    }
}
