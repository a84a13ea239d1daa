//! Turning `AuthorizationPolicy` documents into [`Policy`] values.
//!
//! The documents are walked by hand rather than through `#[derive(Deserialize)]` so that
//! every error names the exact field path (`spec.rules[0].to[0].operation.methods`) and so
//! that all problems of a document are reported at once.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde_json::{Map, Value};
use zmesh_identity::SpiffeId;

use super::{
    Action, Cidr, Operation, Policy, PolicyError, PolicyErrorKind, PolicyRef, Rule, Source,
    StringMatch,
};

/// The group all Istio security resources live in.
const GROUP: &str = "security.istio.io";
const KIND: &str = "AuthorizationPolicy";
/// Versions of the API that share the schema we accept.
const VERSIONS: [&str; 2] = ["v1", "v1beta1"];
/// Namespace kubectl assumes when a manifest names none.
const DEFAULT_NAMESPACE: &str = "default";

const L4_ONLY: &str = "HTTP fields are not supported (L4 only)";

/// What a document turned out to be.
pub(super) enum Parsed {
    Policies(Vec<Policy>),
    /// Some other kind of object (a Pod, a Namespace, a PeerAuthentication): not ours.
    Skipped,
}

/// Collects the errors of one document.
struct Ctx<'e> {
    origin: String,
    errors: &'e mut Vec<PolicyError>,
}

impl Ctx<'_> {
    fn err(&mut self, path: impl Into<String>, kind: PolicyErrorKind) {
        self.errors.push(PolicyError {
            origin: self.origin.clone(),
            path: path.into(),
            kind,
        });
    }
}

/// Parses one Kubernetes object (or a `List` of them). Errors go to `errors`.
pub(super) fn document(value: &Value, origin: &str, errors: &mut Vec<PolicyError>) -> Parsed {
    let mut ctx = Ctx {
        origin: origin.to_owned(),
        errors,
    };
    if value.is_null() {
        // An empty YAML document (`---` at the end of a file).
        return Parsed::Skipped;
    }
    let Some(obj) = value.as_object() else {
        ctx.err(
            "",
            PolicyErrorKind::WrongType {
                expected: "an object",
            },
        );
        return Parsed::Policies(Vec::new());
    };
    let kind = obj.get("kind").and_then(Value::as_str);
    let api_version = obj.get("apiVersion").and_then(Value::as_str);
    match kind {
        None => {
            ctx.err("kind", PolicyErrorKind::Missing);
            return Parsed::Policies(Vec::new());
        }
        Some("List") | Some("AuthorizationPolicyList") => {
            let Some(items) = obj.get("items").and_then(Value::as_array) else {
                ctx.err("items", PolicyErrorKind::Missing);
                return Parsed::Policies(Vec::new());
            };
            let mut out = Vec::new();
            for (i, item) in items.iter().enumerate() {
                let origin = format!("{origin}, items[{i}]");
                if let Parsed::Policies(p) = document(item, &origin, ctx.errors) {
                    out.extend(p);
                }
            }
            return Parsed::Policies(out);
        }
        Some(k) if k != KIND => return Parsed::Skipped,
        Some(_) => {}
    }
    match api_version.and_then(|v| v.split_once('/')) {
        Some((GROUP, v)) if VERSIONS.contains(&v) => {}
        _ => {
            ctx.err(
                "apiVersion",
                PolicyErrorKind::BadApiVersion(api_version.unwrap_or("").to_owned()),
            );
            return Parsed::Policies(Vec::new());
        }
    }
    let id = metadata(&mut ctx, obj.get("metadata"));
    if let Some(id) = &id {
        ctx.origin = format!("{origin} ({id})");
    }
    for key in obj.keys() {
        if !matches!(
            key.as_str(),
            "apiVersion" | "kind" | "metadata" | "spec" | "status"
        ) {
            ctx.err(key.clone(), PolicyErrorKind::UnknownField);
        }
    }
    let before = ctx.errors.len();
    let spec = match obj.get("spec") {
        // No spec at all is `spec: {}`: ALLOW with no rules, Istio's "allow-nothing".
        None | Some(Value::Null) => Some(Spec::default()),
        Some(v) => spec(&mut ctx, v),
    };
    match (id, spec) {
        (Some(id), Some(spec)) if ctx.errors.len() == before => Parsed::Policies(vec![Policy {
            id,
            selector: spec.selector,
            action: spec.action,
            rules: spec.rules,
        }]),
        _ => Parsed::Policies(Vec::new()),
    }
}

fn metadata(ctx: &mut Ctx<'_>, value: Option<&Value>) -> Option<PolicyRef> {
    let Some(value) = value else {
        ctx.err("metadata", PolicyErrorKind::Missing);
        return None;
    };
    let Some(meta) = value.as_object() else {
        ctx.err(
            "metadata",
            PolicyErrorKind::WrongType {
                expected: "an object",
            },
        );
        return None;
    };
    // Other metadata (labels, annotations, uid, managedFields...) is Kubernetes' business.
    let name = match meta.get("name") {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(Value::String(_)) | None | Some(Value::Null) => {
            ctx.err("metadata.name", PolicyErrorKind::Missing);
            None
        }
        Some(_) => {
            ctx.err(
                "metadata.name",
                PolicyErrorKind::WrongType {
                    expected: "a string",
                },
            );
            None
        }
    };
    let namespace = match meta.get("namespace") {
        None | Some(Value::Null) => Some(DEFAULT_NAMESPACE.to_owned()),
        Some(Value::String(s)) => match namespace_problem(s) {
            None => Some(s.clone()),
            Some(reason) => {
                ctx.err(
                    "metadata.namespace",
                    PolicyErrorKind::BadNamespace {
                        value: s.clone(),
                        reason,
                    },
                );
                None
            }
        },
        Some(_) => {
            ctx.err(
                "metadata.namespace",
                PolicyErrorKind::WrongType {
                    expected: "a string",
                },
            );
            None
        }
    };
    Some(PolicyRef {
        namespace: namespace?,
        name: name?,
    })
}

#[derive(Default)]
struct Spec {
    selector: Option<BTreeMap<String, String>>,
    action: Action,
    rules: Vec<Rule>,
}

fn object<'v>(ctx: &mut Ctx<'_>, path: &str, value: &'v Value) -> Option<&'v Map<String, Value>> {
    match value {
        Value::Object(m) => Some(m),
        _ => {
            ctx.err(
                path,
                PolicyErrorKind::WrongType {
                    expected: "an object",
                },
            );
            None
        }
    }
}

fn array<'v>(ctx: &mut Ctx<'_>, path: &str, value: &'v Value) -> &'v [Value] {
    match value {
        Value::Array(a) => a,
        // `field: ~` is the same as leaving it out.
        Value::Null => &[],
        _ => {
            ctx.err(path, PolicyErrorKind::WrongType { expected: "a list" });
            &[]
        }
    }
}

fn spec(ctx: &mut Ctx<'_>, value: &Value) -> Option<Spec> {
    let spec = object(ctx, "spec", value)?;
    let mut out = Spec::default();
    for (key, value) in spec {
        let path = format!("spec.{key}");
        match key.as_str() {
            "selector" => out.selector = selector(ctx, &path, value),
            "action" => match value.as_str() {
                Some("ALLOW") => out.action = Action::Allow,
                Some("DENY") => out.action = Action::Deny,
                Some(a @ ("AUDIT" | "CUSTOM")) => {
                    ctx.err(path, PolicyErrorKind::UnsupportedAction(a.to_owned()))
                }
                Some(a) => ctx.err(path, PolicyErrorKind::BadAction(a.to_owned())),
                None => ctx.err(
                    path,
                    PolicyErrorKind::WrongType {
                        expected: "a string",
                    },
                ),
            },
            "rules" => {
                for (i, rule_value) in array(ctx, &path, value).iter().enumerate() {
                    if let Some(r) = rule(ctx, &format!("{path}[{i}]"), rule_value) {
                        out.rules.push(r);
                    }
                }
            }
            "provider" => ctx.err(
                path,
                PolicyErrorKind::Unsupported("CUSTOM providers are not supported"),
            ),
            "targetRef" | "targetRefs" => ctx.err(
                path,
                PolicyErrorKind::Unsupported(
                    "policies attached to gateways or waypoints are not supported; \
                     use spec.selector",
                ),
            ),
            _ => ctx.err(path, PolicyErrorKind::UnknownField),
        }
    }
    Some(out)
}

fn selector(ctx: &mut Ctx<'_>, path: &str, value: &Value) -> Option<BTreeMap<String, String>> {
    if value.is_null() {
        return None;
    }
    let sel = object(ctx, path, value)?;
    let mut labels = BTreeMap::new();
    for (key, value) in sel {
        let path = format!("{path}.{key}");
        if key != "matchLabels" {
            ctx.err(path, PolicyErrorKind::UnknownField);
            continue;
        }
        if value.is_null() {
            continue;
        }
        let Some(map) = object(ctx, &path, value) else {
            continue;
        };
        for (k, v) in map {
            match v.as_str() {
                Some(v) => {
                    labels.insert(k.clone(), v.to_owned());
                }
                None => ctx.err(
                    format!("{path}.{k}"),
                    PolicyErrorKind::WrongType {
                        expected: "a string",
                    },
                ),
            }
        }
    }
    // An empty selector selects every workload, as no selector does.
    (!labels.is_empty()).then_some(labels)
}

fn rule(ctx: &mut Ctx<'_>, path: &str, value: &Value) -> Option<Rule> {
    let obj = object(ctx, path, value)?;
    let mut out = Rule::default();
    for (key, value) in obj {
        let path = format!("{path}.{key}");
        match key.as_str() {
            "from" => {
                for (i, v) in array(ctx, &path, value).iter().enumerate() {
                    let path = format!("{path}[{i}]");
                    if let Some(s) =
                        wrapped(ctx, &path, v, "source").and_then(|(p, v)| source(ctx, &p, v))
                    {
                        out.from.push(s);
                    }
                }
            }
            "to" => {
                for (i, v) in array(ctx, &path, value).iter().enumerate() {
                    let path = format!("{path}[{i}]");
                    if let Some(o) =
                        wrapped(ctx, &path, v, "operation").and_then(|(p, v)| operation(ctx, &p, v))
                    {
                        out.to.push(o);
                    }
                }
            }
            "when" => ctx.err(
                path,
                PolicyErrorKind::Unsupported("conditions are not supported (L4 only)"),
            ),
            _ => ctx.err(path, PolicyErrorKind::UnknownField),
        }
    }
    Some(out)
}

/// `{source: {...}}` / `{operation: {...}}`: the one field these list items have.
fn wrapped<'v>(
    ctx: &mut Ctx<'_>,
    path: &str,
    value: &'v Value,
    field: &str,
) -> Option<(String, &'v Map<String, Value>)> {
    let obj = object(ctx, path, value)?;
    for key in obj.keys() {
        if key != field {
            ctx.err(format!("{path}.{key}"), PolicyErrorKind::UnknownField);
        }
    }
    let inner_path = format!("{path}.{field}");
    match obj.get(field) {
        None | Some(Value::Null) => {
            ctx.err(inner_path, PolicyErrorKind::Missing);
            None
        }
        Some(v) => object(ctx, &inner_path, v).map(|o| (inner_path, o)),
    }
}

fn source(ctx: &mut Ctx<'_>, path: &str, obj: &Map<String, Value>) -> Option<Source> {
    let mut out = Source::default();
    let before = ctx.errors.len();
    for (key, value) in obj {
        let path = format!("{path}.{key}");
        match key.as_str() {
            "principals" => out.principals = list(ctx, &path, value, principal),
            "notPrincipals" => out.not_principals = list(ctx, &path, value, principal),
            "namespaces" => out.namespaces = list(ctx, &path, value, namespace_match),
            "notNamespaces" => out.not_namespaces = list(ctx, &path, value, namespace_match),
            "ipBlocks" => out.ip_blocks = list(ctx, &path, value, cidr),
            "notIpBlocks" => out.not_ip_blocks = list(ctx, &path, value, cidr),
            "requestPrincipals"
            | "notRequestPrincipals"
            | "remoteIpBlocks"
            | "notRemoteIpBlocks" => ctx.err(path, PolicyErrorKind::Unsupported(L4_ONLY)),
            "serviceAccounts" | "notServiceAccounts" => ctx.err(
                path,
                PolicyErrorKind::Unsupported("not supported yet; use principals"),
            ),
            _ => ctx.err(path, PolicyErrorKind::UnknownField),
        }
    }
    if ctx.errors.len() != before {
        return None;
    }
    if out.is_empty() {
        // Istio rejects an empty source: it would silently match everyone.
        ctx.err(path, PolicyErrorKind::Empty);
        return None;
    }
    Some(out)
}

fn operation(ctx: &mut Ctx<'_>, path: &str, obj: &Map<String, Value>) -> Option<Operation> {
    let mut out = Operation::default();
    let before = ctx.errors.len();
    for (key, value) in obj {
        let path = format!("{path}.{key}");
        match key.as_str() {
            "ports" => out.ports = list(ctx, &path, value, port),
            "notPorts" => out.not_ports = list(ctx, &path, value, port),
            "hosts" | "notHosts" | "methods" | "notMethods" | "paths" | "notPaths" => {
                ctx.err(path, PolicyErrorKind::Unsupported(L4_ONLY))
            }
            _ => ctx.err(path, PolicyErrorKind::UnknownField),
        }
    }
    if ctx.errors.len() != before {
        return None;
    }
    if out.ports.is_empty() && out.not_ports.is_empty() {
        ctx.err(path, PolicyErrorKind::Empty);
        return None;
    }
    Some(out)
}

/// A list of strings, each checked by `parse`.
fn list<T>(
    ctx: &mut Ctx<'_>,
    path: &str,
    value: &Value,
    parse: fn(&str) -> Result<T, (ValueKind, String)>,
) -> Vec<T> {
    let mut out = Vec::new();
    for (i, item) in array(ctx, path, value).iter().enumerate() {
        let path = format!("{path}[{i}]");
        let Some(s) = item.as_str() else {
            ctx.err(
                path,
                PolicyErrorKind::WrongType {
                    expected: "a string",
                },
            );
            continue;
        };
        match parse(s) {
            Ok(v) => out.push(v),
            Err((kind, reason)) => {
                let value = s.to_owned();
                let kind = match kind {
                    ValueKind::Principal => PolicyErrorKind::BadPrincipal { value, reason },
                    ValueKind::Namespace => PolicyErrorKind::BadNamespace { value, reason },
                    ValueKind::IpBlock => PolicyErrorKind::BadIpBlock { value, reason },
                    ValueKind::Port => PolicyErrorKind::BadPort { value, reason },
                };
                ctx.err(path, kind);
            }
        }
    }
    out
}

enum ValueKind {
    Principal,
    Namespace,
    IpBlock,
    Port,
}

/// Splits Istio's `*` wildcard: alone, as a prefix, or as a suffix.
fn wildcard(s: &str) -> Result<StringMatch, String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s == "*" {
        return Ok(StringMatch::Any);
    }
    let m = if let Some(rest) = s.strip_prefix('*') {
        StringMatch::Suffix(rest.to_owned())
    } else if let Some(rest) = s.strip_suffix('*') {
        StringMatch::Prefix(rest.to_owned())
    } else {
        StringMatch::Exact(s.to_owned())
    };
    if m.literal().contains('*') {
        return Err("`*` is only allowed alone, at the start or at the end".into());
    }
    Ok(m)
}

fn principal(s: &str) -> Result<StringMatch, (ValueKind, String)> {
    let bad = |r: String| (ValueKind::Principal, r);
    if s.starts_with("spiffe://") {
        return Err(bad(
            "write principals without the spiffe:// prefix, as Istio does \
             (<trust-domain>/ns/<namespace>/sa/<service-account>)"
                .into(),
        ));
    }
    let m = wildcard(s).map_err(bad)?;
    match &m {
        StringMatch::Any => {}
        StringMatch::Exact(p) => {
            let id = SpiffeId::parse(&format!("spiffe://{p}")).map_err(|e| bad(e.to_string()))?;
            if id.path().is_empty() {
                return Err(bad("names a trust domain, not a workload; \
                     expected <trust-domain>/ns/<namespace>/sa/<service-account>"
                    .into()));
            }
        }
        StringMatch::Prefix(p) | StringMatch::Suffix(p) => {
            if let Some(c) = p
                .chars()
                .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '/')))
            {
                return Err(bad(format!(
                    "character {c:?} cannot appear in a SPIFFE ID (letters, digits, \
                     '.', '-', '_' and '/' only)"
                )));
            }
        }
    }
    Ok(m)
}

/// Why `s` is not a Kubernetes namespace name (an RFC 1123 label), if it is not.
fn namespace_problem(s: &str) -> Option<String> {
    if s.is_empty() {
        return Some("must not be empty".into());
    }
    if s.len() > 63 {
        return Some("longer than 63 characters".into());
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Some(format!(
            "character {c:?} is not allowed (lowercase letters, digits and '-' only)"
        ));
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Some("must start and end with a letter or digit".into());
    }
    None
}

fn namespace_match(s: &str) -> Result<StringMatch, (ValueKind, String)> {
    let bad = |r: String| (ValueKind::Namespace, r);
    let m = wildcard(s).map_err(bad)?;
    match &m {
        StringMatch::Any => {}
        StringMatch::Exact(n) => {
            if let Some(r) = namespace_problem(n) {
                return Err(bad(r));
            }
        }
        StringMatch::Prefix(p) | StringMatch::Suffix(p) => {
            if let Some(c) = p
                .chars()
                .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
            {
                return Err(bad(format!(
                    "character {c:?} is not allowed (lowercase letters, digits and '-' only)"
                )));
            }
        }
    }
    Ok(m)
}

fn cidr(s: &str) -> Result<Cidr, (ValueKind, String)> {
    let bad = |r: String| (ValueKind::IpBlock, r);
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (s, None),
    };
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| bad("not an IP address or CIDR (e.g. 10.0.0.0/16)".into()))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len = match len {
        None => max,
        Some(l) => match l.parse::<u8>() {
            Ok(n) if n <= max && l.bytes().all(|b| b.is_ascii_digit()) => n,
            _ => return Err(bad(format!("prefix length must be 0..={max}"))),
        },
    };
    Ok(Cidr::new(addr, len))
}

fn port(s: &str) -> Result<u16, (ValueKind, String)> {
    let bad = || (ValueKind::Port, "must be a port number 1..65535".to_owned());
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    match s.parse::<u16>() {
        Ok(p) if p >= 1 => Ok(p),
        _ => Err(bad()),
    }
}
