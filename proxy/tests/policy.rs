//! Istio AuthorizationPolicy (L4 subset): parsing, rejection of what we cannot enforce,
//! evaluation as Istio documents it, and safe updates.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use zmesh_identity::{SpiffeId, TrustDomain, WorkloadId};
use zmesh_proxy::policy::{
    Action, Allowed, Denial, LabelSource, NoLabels, Policy, PolicyAuthorizer, PolicyErrorKind,
    PolicyRef, PolicySet, PolicyStore, Request, Verdict,
};
use zmesh_proxy::{Authorizer, AuthzRequest, Decision, Protocol, Workload};

fn set(yaml: &str) -> PolicySet {
    match PolicySet::parse_documents(yaml) {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    }
}

fn err(yaml: &str) -> String {
    PolicySet::parse_documents(yaml)
        .expect_err("policy should be rejected")
        .to_string()
}

fn sid(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

fn pref(s: &str) -> PolicyRef {
    s.parse().unwrap()
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A request builder so table rows stay short.
struct R {
    ns: &'static str,
    labels: BTreeMap<String, String>,
    known_labels: bool,
    id: Option<SpiffeId>,
    ip: Option<IpAddr>,
    port: u16,
}

fn to(ns: &'static str, port: u16) -> R {
    R {
        ns,
        labels: BTreeMap::new(),
        known_labels: true,
        id: None,
        ip: Some("10.0.0.1".parse().unwrap()),
        port,
    }
}

impl R {
    fn from(mut self, id: &str) -> Self {
        self.id = Some(sid(id));
        self
    }
    fn ip(mut self, ip: &str) -> Self {
        self.ip = Some(ip.parse().unwrap());
        self
    }
    fn unknown_ip(mut self) -> Self {
        self.ip = None;
        self
    }
    fn labels(mut self, pairs: &[(&str, &str)]) -> Self {
        self.labels = labels(pairs);
        self
    }
    fn unknown_labels(mut self) -> Self {
        self.known_labels = false;
        self
    }
    fn eval(&self, set: &PolicySet) -> Verdict {
        set.evaluate(&Request {
            destination_namespace: self.ns,
            destination_labels: self.known_labels.then_some(&self.labels),
            source_identity: self.id.as_ref(),
            source_ip: self.ip,
            destination_port: self.port,
        })
    }
}

const FRONTEND: &str = "spiffe://cluster.local/ns/web/sa/frontend";
const OTHER: &str = "spiffe://cluster.local/ns/web/sa/other";
const BATCH: &str = "spiffe://cluster.local/ns/batch/sa/job";

fn allowed_by(policy: &str, rule: usize) -> Verdict {
    Verdict::Allow(Allowed::Policy {
        policy: pref(policy),
        rule,
    })
}

fn denied_by(policy: &str, rule: usize) -> Verdict {
    Verdict::Deny(Denial::DenyPolicy {
        policy: pref(policy),
        rule,
    })
}

fn no_allow_matched(considered: &[&str]) -> Verdict {
    Verdict::Deny(Denial::NoAllowMatched {
        considered: considered.iter().map(|p| pref(p)).collect(),
    })
}

const ALLOW_NOTHING_BY_DEFAULT: Verdict = Verdict::Allow(Allowed::NoAllowPolicy);

fn policy(ns: &str, name: &str, spec: &str) -> String {
    let spec = spec
        .lines()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n");
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n{spec}\n"
    )
}

// ---------------------------------------------------------------------------------------
// Parsing

const EVERY_FIELD: &str = r#"
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata:
  name: every-field
  namespace: prod
  labels: {team: a}              # ordinary metadata is Kubernetes' business
  annotations: {note: x}
  uid: 1234
spec:
  selector:
    matchLabels:
      app: db
      tier: data
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/web/sa/frontend", "*/sa/admin"]
        notPrincipals: ["cluster.local/ns/web/sa/banned"]
        namespaces: ["web", "web-*"]
        notNamespaces: ["web-test"]
        ipBlocks: ["10.0.0.0/8", "fd00::/16", "192.168.1.7"]
        notIpBlocks: ["10.9.0.0/16"]
    to:
    - operation:
        ports: ["5432", "5433"]
        notPorts: ["5433"]
status: {}
"#;

/// How the agent hands policies to a data path in another process: the same set comes
/// back, and what the set's checks refuse is refused on the way in too.
#[test]
fn the_wire_form_round_trips_and_is_checked_on_the_way_in() {
    let s = set(EVERY_FIELD).with_root_namespace("mesh-root");
    let wire = serde_json::to_value(&s).unwrap();
    let back: PolicySet = serde_json::from_value(wire.clone()).unwrap();
    assert_eq!(back, s);

    // The same policy twice: refused, as in manifests.
    let mut twice = wire.clone();
    let policy = twice["policies"][0].clone();
    twice["policies"].as_array_mut().unwrap().push(policy);
    let e = serde_json::from_value::<PolicySet>(twice).unwrap_err();
    assert!(e.to_string().contains("defined twice"), "{e}");

    // An IP block comes back masked and in range, whatever the wire says.
    let mut wide = wire;
    let blocks = &mut wide["policies"][0]["rules"][0]["from"][0]["ip_blocks"];
    assert_eq!(blocks[0], serde_json::json!(["10.0.0.0", 8]), "{blocks}");
    *blocks = serde_json::json!([["10.1.2.3", 99]]);
    let back: PolicySet = serde_json::from_value(wide).unwrap();
    let again = serde_json::to_value(&back).unwrap();
    assert_eq!(
        again["policies"][0]["rules"][0]["from"][0]["ip_blocks"],
        serde_json::json!([["10.1.2.3", 32]])
    );
}

#[test]
fn parses_every_accepted_field() {
    let s = set(EVERY_FIELD);
    assert_eq!(s.policies().len(), 1);
    let p = &s.policies()[0];
    assert_eq!(p.id(), &pref("prod/every-field"));
    assert_eq!(p.action(), Action::Allow);
    assert_eq!(
        p.selector(),
        Some(&labels(&[("app", "db"), ("tier", "data")]))
    );
    assert_eq!(p.rule_count(), 1);

    // Every condition takes part in the decision.
    let db = || to("prod", 5432).labels(&[("app", "db"), ("tier", "data"), ("x", "y")]);
    assert_eq!(
        db().from(FRONTEND).eval(&s),
        allowed_by("prod/every-field", 0)
    );
    // principals: suffix wildcard.
    assert!(db()
        .from("spiffe://td/ns/web/sa/admin")
        .eval(&s)
        .is_allowed());
    // principals: neither listed.
    assert!(!db().from(OTHER).eval(&s).is_allowed());
    // notPrincipals.
    assert!(!db()
        .from("spiffe://cluster.local/ns/web/sa/banned")
        .eval(&s)
        .is_allowed());
    // namespaces (prefix wildcard) and notNamespaces.
    assert!(!db()
        .from("spiffe://x/ns/other/sa/admin")
        .eval(&s)
        .is_allowed());
    assert!(db()
        .from("spiffe://x/ns/web-prod/sa/admin")
        .eval(&s)
        .is_allowed());
    assert!(!db()
        .from("spiffe://x/ns/web-test/sa/admin")
        .eval(&s)
        .is_allowed());
    // ipBlocks (v4 CIDR, v6 CIDR, single IP) and notIpBlocks.
    assert!(db().from(FRONTEND).ip("fd00::5").eval(&s).is_allowed());
    assert!(db().from(FRONTEND).ip("192.168.1.7").eval(&s).is_allowed());
    assert!(!db().from(FRONTEND).ip("192.168.1.8").eval(&s).is_allowed());
    assert!(!db().from(FRONTEND).ip("10.9.1.1").eval(&s).is_allowed());
    // ports and notPorts.
    let mut r = db().from(FRONTEND);
    r.port = 5433;
    assert!(!r.eval(&s).is_allowed(), "notPorts excludes 5433");
    r.port = 80;
    assert!(!r.eval(&s).is_allowed());
    // selector: a pod without tier=data is not selected, so nothing restricts it.
    assert_eq!(
        to("prod", 80).labels(&[("app", "db")]).eval(&s),
        ALLOW_NOTHING_BY_DEFAULT
    );
}

#[test]
fn accepts_v1_deny_and_defaults() {
    let s = set(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
         metadata: {name: d}\nspec: {action: DENY, rules: [{}]}\n",
    );
    let p = &s.policies()[0];
    assert_eq!(
        p.id(),
        &pref("default/d"),
        "namespace defaults like kubectl"
    );
    assert_eq!(p.action(), Action::Deny);
    assert_eq!(p.selector(), None);
    // No action means ALLOW; an empty matchLabels selects everything.
    let s = set(&policy(
        "a",
        "b",
        "selector: {matchLabels: {}}\nrules: [{}]",
    ));
    assert_eq!(s.policies()[0].action(), Action::Allow);
    assert_eq!(s.policies()[0].selector(), None);
}

#[test]
fn parses_from_json_values_and_lists() {
    let v: serde_json::Value = serde_json::json!({
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "j", "namespace": "prod"},
        "spec": {"rules": [{"to": [{"operation": {"ports": ["80"]}}]}]}
    });
    let p = Policy::from_json(&v).unwrap();
    assert_eq!(p.id(), &pref("prod/j"));
    let pod = serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}});
    let s = PolicySet::from_values([&pod, &v]).unwrap();
    assert_eq!(s.policies().len(), 1, "other kinds are skipped");
    assert!(Policy::from_json(&pod).is_err());

    let list = format!(
        "apiVersion: v1\nkind: List\nitems:\n- {}\n- {}",
        policy("a", "one", "rules: [{}]")
            .trim_end()
            .replace('\n', "\n  "),
        policy("a", "two", "rules: [{}]")
            .trim_end()
            .replace('\n', "\n  "),
    );
    let s = set(&list);
    assert_eq!(s.policies().len(), 2);
}

#[test]
fn skips_other_kinds_in_a_manifest() {
    let text = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: prod}}\n---\n\
         apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: p}}\n\
         spec: {{mtls: {{mode: STRICT}}}}\n---\n{}---\n",
        policy("prod", "x", "rules: [{}]")
    );
    let s = set(&text);
    assert_eq!(s.policies().len(), 1);
    assert_eq!(s.policies()[0].id(), &pref("prod/x"));
}

#[test]
fn rejects_what_it_cannot_enforce_naming_the_field() {
    let from = |field: &str| {
        policy(
            "p",
            "x",
            &format!("rules:\n- from:\n  - source:\n      {field}\n"),
        )
    };
    let op = |field: &str| {
        policy(
            "p",
            "x",
            &format!("rules:\n- to:\n  - operation:\n      {field}\n"),
        )
    };
    let http = "HTTP fields are not supported (L4 only)";
    let cases: Vec<(String, String)> = vec![
        (
            from("requestPrincipals: [\"*\"]"),
            format!("spec.rules[0].from[0].source.requestPrincipals: {http}"),
        ),
        (
            from("notRequestPrincipals: [\"*\"]"),
            format!("spec.rules[0].from[0].source.notRequestPrincipals: {http}"),
        ),
        (
            from("remoteIpBlocks: [\"1.2.3.4\"]"),
            format!("spec.rules[0].from[0].source.remoteIpBlocks: {http}"),
        ),
        (
            from("notRemoteIpBlocks: [\"1.2.3.4\"]"),
            format!("spec.rules[0].from[0].source.notRemoteIpBlocks: {http}"),
        ),
        (
            op("methods: [GET]"),
            format!("spec.rules[0].to[0].operation.methods: {http}"),
        ),
        (
            op("paths: [/admin]"),
            format!("spec.rules[0].to[0].operation.paths: {http}"),
        ),
        (
            op("hosts: [a.example]"),
            format!("spec.rules[0].to[0].operation.hosts: {http}"),
        ),
        (
            op("notMethods: [GET]"),
            format!("spec.rules[0].to[0].operation.notMethods: {http}"),
        ),
        (
            policy(
                "p",
                "x",
                "rules:\n- when:\n  - key: source.ip\n    values: [1.2.3.4]",
            ),
            "spec.rules[0].when: conditions are not supported (L4 only)".into(),
        ),
        (
            from("principal: [\"a/b\"]"),
            "spec.rules[0].from[0].source.principal: unknown field".into(),
        ),
        (
            op("port: [\"80\"]"),
            "spec.rules[0].to[0].operation.port: unknown field".into(),
        ),
        (
            policy("p", "x", "rules:\n- from: []\n  too: []"),
            "spec.rules[0].too: unknown field".into(),
        ),
        (
            policy("p", "x", "selector: {matchLabels: {a: b}, matchExpressions: []}"),
            "spec.selector.matchExpressions: unknown field".into(),
        ),
        (
            policy("p", "x", "actions: DENY"),
            "spec.actions: unknown field".into(),
        ),
        (
            format!("{}extra: 1\n", policy("p", "x", "rules: []")),
            "(p/x): extra: unknown field".into(),
        ),
        (
            policy("p", "x", "action: AUDIT"),
            "spec.action: action AUDIT is not supported; use ALLOW or DENY".into(),
        ),
        (
            policy("p", "x", "action: CUSTOM\nprovider: {name: ext}"),
            "spec.action: action CUSTOM is not supported".into(),
        ),
        (
            policy("p", "x", "action: CUSTOM\nprovider: {name: ext}"),
            "spec.provider: CUSTOM providers are not supported".into(),
        ),
        (
            policy("p", "x", "action: allow"),
            "spec.action: unknown action \"allow\"".into(),
        ),
        (
            policy("p", "x", "targetRefs: [{kind: Gateway, name: g}]"),
            "spec.targetRefs: policies attached to gateways or waypoints".into(),
        ),
        (
            policy("p", "x", "targetRef: {kind: Service, name: s}"),
            "spec.targetRef: policies attached".into(),
        ),
        (
            from("principals: [\"spiffe://cluster.local/ns/a/sa/b\"]"),
            "spec.rules[0].from[0].source.principals[0]: invalid principal \"spiffe://cluster.local/ns/a/sa/b\": write principals without the spiffe:// prefix".into(),
        ),
        (
            from("principals: [\"cluster.local/ns/a*/sa/b\"]"),
            "source.principals[0]: invalid principal \"cluster.local/ns/a*/sa/b\": `*` is only allowed".into(),
        ),
        (
            from("notPrincipals: [\"Cluster.local/ns/a/sa/b\"]"),
            "source.notPrincipals[0]: invalid principal \"Cluster.local/ns/a/sa/b\": trust domain has character 'C'".into(),
        ),
        (
            from("principals: [\"cluster.local\"]"),
            "invalid principal \"cluster.local\": names a trust domain".into(),
        ),
        (
            from("principals: [\"\"]"),
            "invalid principal \"\": must not be empty".into(),
        ),
        (
            from("principals: [\"*/sa/b c\"]"),
            "invalid principal \"*/sa/b c\": character ' '".into(),
        ),
        (
            from("principals: [\"a\", \"**\"]"),
            "source.principals[1]: invalid principal \"**\"".into(),
        ),
        (
            from("namespaces: [\"Prod\"]"),
            "source.namespaces[0]: invalid namespace \"Prod\": character 'P'".into(),
        ),
        (
            from("notNamespaces: [\"a_b*\"]"),
            "source.notNamespaces[0]: invalid namespace \"a_b*\"".into(),
        ),
        (
            from("ipBlocks: [\"10.0.0.0/33\"]"),
            "source.ipBlocks[0]: invalid IP block \"10.0.0.0/33\": prefix length must be 0..=32".into(),
        ),
        (
            from("ipBlocks: [\"fd00::/129\"]"),
            "invalid IP block \"fd00::/129\": prefix length must be 0..=128".into(),
        ),
        (
            from("notIpBlocks: [\"10.0.0.x\"]"),
            "source.notIpBlocks[0]: invalid IP block \"10.0.0.x\": not an IP address or CIDR".into(),
        ),
        (
            from("ipBlocks: [\"10.0.0.0/+8\"]"),
            "invalid IP block \"10.0.0.0/+8\"".into(),
        ),
        (
            op("ports: [\"0\"]"),
            "operation.ports[0]: invalid port \"0\": must be a port number 1..65535".into(),
        ),
        (
            op("ports: [\"65536\"]"),
            "invalid port \"65536\"".into(),
        ),
        (op("notPorts: [\"http\"]"), "operation.notPorts[0]: invalid port \"http\"".into()),
        (op("ports: [\"+80\"]"), "invalid port \"+80\"".into()),
        (
            op("ports: [80]"),
            "operation.ports[0]: must be a string".into(),
        ),
        (
            from("principals: cluster.local/ns/a/sa/b"),
            "source.principals: must be a list".into(),
        ),
        (
            policy("p", "x", "rules:\n- from:\n  - source: {}"),
            "spec.rules[0].from[0].source: must not be empty".into(),
        ),
        (
            policy("p", "x", "rules:\n- from:\n  - {}"),
            "spec.rules[0].from[0].source: required field is missing".into(),
        ),
        (
            policy("p", "x", "rules:\n- to:\n  - operation: {}"),
            "spec.rules[0].to[0].operation: must not be empty".into(),
        ),
        (
            policy("p", "x", "rules: []").replace("security.istio.io/v1", "security.istio.io/v1alpha1"),
            "apiVersion \"security.istio.io/v1alpha1\" is not supported".into(),
        ),
        (
            policy("p", "x", "rules: []").replace("  name: x\n", ""),
            "metadata.name: required field is missing".into(),
        ),
        (
            policy("Prod", "x", "rules: []"),
            "metadata.namespace: invalid namespace \"Prod\"".into(),
        ),
        (
            policy("p", "x", "selector: {matchLabels: {app: 1}}"),
            "spec.selector.matchLabels.app: must be a string".into(),
        ),
        (
            format!("{}---\n{}", policy("p", "x", "rules: []"), policy("p", "x", "{}")),
            "p/x: policy is defined twice".into(),
        ),
        ("kind: [unclosed\n".into(), "document 1: invalid YAML".into()),
        ("just a string\n".into(), "document 1: must be an object".into()),
        ("apiVersion: v1\n".into(), "document 1: kind: required field is missing".into()),
    ];
    for (yaml, want) in cases {
        let got = err(&yaml);
        assert!(
            got.contains(&want),
            "want {want:?}\n got {got}\nfor\n{yaml}"
        );
    }
}

#[test]
fn reports_every_error_of_every_document() {
    let text = format!(
        "{}---\n{}",
        policy(
            "p",
            "one",
            "action: AUDIT\nrules:\n- to:\n  - operation: {methods: [GET]}"
        ),
        policy(
            "p",
            "two",
            "rules:\n- from:\n  - source: {ipBlocks: [nope]}"
        )
    );
    let e = PolicySet::parse_documents(&text).unwrap_err();
    assert_eq!(e.0.len(), 3, "{e}");
    assert_eq!(e.0[0].origin, "document 1 (p/one)");
    assert_eq!(e.0[0].path, "spec.action");
    assert_eq!(
        e.0[0].kind,
        PolicyErrorKind::UnsupportedAction("AUDIT".into())
    );
    assert_eq!(e.0[1].path, "spec.rules[0].to[0].operation.methods");
    assert_eq!(e.0[2].origin, "document 2 (p/two)");
    assert_eq!(e.0[2].path, "spec.rules[0].from[0].source.ipBlocks[0]");
    assert!(e
        .to_string()
        .starts_with("3 errors in authorization policies:"));
}

// ---------------------------------------------------------------------------------------
// Evaluation

#[test]
fn allow_by_principal_admits_one_identity_and_refuses_another() {
    let s = set(&policy(
        "prod",
        "allow-frontend",
        "rules:\n- from:\n  - source: {principals: [cluster.local/ns/web/sa/frontend]}",
    ));
    assert_eq!(
        to("prod", 80).from(FRONTEND).eval(&s),
        allowed_by("prod/allow-frontend", 0)
    );
    let denied = to("prod", 80).from(OTHER).eval(&s);
    assert_eq!(denied, no_allow_matched(&["prod/allow-frontend"]));
    assert_eq!(
        denied.to_string(),
        "denied: no ALLOW policy matched (considered: prod/allow-frontend)"
    );
    // Plaintext never matches a principal.
    assert!(!to("prod", 80).eval(&s).is_allowed());
    // Another namespace has no ALLOW policy: allowed.
    assert_eq!(to("dev", 80).from(OTHER).eval(&s), ALLOW_NOTHING_BY_DEFAULT);
    // An identity from another trust domain is another principal.
    assert!(!to("prod", 80)
        .from("spiffe://other.td/ns/web/sa/frontend")
        .eval(&s)
        .is_allowed());
}

#[test]
fn lists_every_allow_policy_considered() {
    let text = format!(
        "{}---\n{}---\n{}",
        policy(
            "prod",
            "b",
            "rules:\n- to:\n  - operation: {ports: [\"1\"]}"
        ),
        policy(
            "prod",
            "a",
            "rules:\n- to:\n  - operation: {ports: [\"2\"]}"
        ),
        policy(
            "istio-system",
            "mesh",
            "rules:\n- to:\n  - operation: {ports: [\"3\"]}"
        ),
    );
    let s = set(&text);
    assert_eq!(
        to("prod", 80).eval(&s),
        no_allow_matched(&["istio-system/mesh", "prod/a", "prod/b"])
    );
    assert_eq!(to("prod", 3).eval(&s), allowed_by("istio-system/mesh", 0));
}

#[test]
fn deny_by_namespace_wins_over_allow() {
    let text = format!(
        "{}---\n{}",
        policy("prod", "allow-all", "rules: [{}]"),
        policy(
            "prod",
            "deny-batch",
            "action: DENY\nrules:\n- to:\n  - operation: {ports: [\"22\"]}\n\
             - from:\n  - source: {namespaces: [batch]}"
        ),
    );
    let s = set(&text);
    let v = to("prod", 80).from(BATCH).eval(&s);
    assert_eq!(v, denied_by("prod/deny-batch", 1));
    assert_eq!(v.to_string(), "denied: DENY policy prod/deny-batch rule 1");
    assert_eq!(
        to("prod", 22).from(FRONTEND).eval(&s),
        denied_by("prod/deny-batch", 0)
    );
    assert_eq!(
        to("prod", 80).from(FRONTEND).eval(&s),
        allowed_by("prod/allow-all", 0)
    );
    // A DENY policy with no rules never matches.
    let s = set(&policy("prod", "deny-none", "action: DENY"));
    assert_eq!(to("prod", 80).eval(&s), ALLOW_NOTHING_BY_DEFAULT);
}

#[test]
fn selector_chooses_the_workloads() {
    let s = set(&policy(
        "prod",
        "db-only-backend",
        "selector:\n  matchLabels: {app: db}\nrules:\n- from:\n  - source: {principals: [\"*/sa/backend\"]}",
    ));
    let backend = "spiffe://cluster.local/ns/prod/sa/backend";
    // Selected: the rule applies.
    assert!(to("prod", 5432)
        .labels(&[("app", "db"), ("v", "2")])
        .from(backend)
        .eval(&s)
        .is_allowed());
    assert_eq!(
        to("prod", 5432)
            .labels(&[("app", "db")])
            .from(FRONTEND)
            .eval(&s),
        no_allow_matched(&["prod/db-only-backend"])
    );
    // Not selected: nothing restricts it.
    assert_eq!(
        to("prod", 80)
            .labels(&[("app", "web")])
            .from(FRONTEND)
            .eval(&s),
        ALLOW_NOTHING_BY_DEFAULT
    );
    assert_eq!(
        to("prod", 80).from(FRONTEND).eval(&s),
        ALLOW_NOTHING_BY_DEFAULT
    );
    // Unknown labels: fail closed, naming the policy.
    let v = to("prod", 80).unknown_labels().from(backend).eval(&s);
    assert_eq!(
        v,
        Verdict::Deny(Denial::UnknownLabels {
            policies: vec![pref("prod/db-only-backend")]
        })
    );
    // ...but only when a selector policy could apply.
    assert_eq!(
        to("dev", 80).unknown_labels().eval(&s),
        ALLOW_NOTHING_BY_DEFAULT
    );
}

#[test]
fn wildcards_in_principals_and_namespaces() {
    let rows: &[(&str, &str, bool)] = &[
        ("principals: [\"*\"]", FRONTEND, true),
        ("principals: [\"*\"]", "", false),
        ("principals: [\"cluster.local/ns/web/*\"]", FRONTEND, true),
        ("principals: [\"cluster.local/ns/web/*\"]", BATCH, false),
        ("principals: [\"*/sa/frontend\"]", FRONTEND, true),
        ("principals: [\"*/sa/frontend\"]", OTHER, false),
        ("principals: [\"*/sa/frontend\"]", "", false),
        ("namespaces: [\"*\"]", BATCH, true),
        ("namespaces: [\"*\"]", "", false),
        ("namespaces: [\"we*\"]", FRONTEND, true),
        ("namespaces: [\"we*\"]", BATCH, false),
        ("namespaces: [\"*tch\"]", BATCH, true),
        ("namespaces: [\"*tch\"]", FRONTEND, false),
        ("namespaces: [web]", FRONTEND, true),
        ("namespaces: [web]", "", false),
        // Namespaces come from /ns/<ns>/sa/<sa> identities only.
        (
            "namespaces: [web]",
            "spiffe://cluster.local/web/ns/web",
            false,
        ),
    ];
    for (source, id, want) in rows {
        let s = set(&policy(
            "prod",
            "w",
            &format!("rules:\n- from:\n  - source: {{{source}}}"),
        ));
        let r = to("prod", 80);
        let r = if id.is_empty() { r } else { r.from(id) };
        assert_eq!(r.eval(&s).is_allowed(), *want, "{source} from {id:?}");
    }
}

#[test]
fn not_principals_and_plaintext_follow_istio() {
    // ALLOW everyone but one: plaintext has no principal, so it is "not" that one.
    let s = set(&policy(
        "prod",
        "not-other",
        "rules:\n- from:\n  - source: {notPrincipals: [cluster.local/ns/web/sa/other]}",
    ));
    assert!(to("prod", 80).from(FRONTEND).eval(&s).is_allowed());
    assert!(!to("prod", 80).from(OTHER).eval(&s).is_allowed());
    assert!(to("prod", 80).eval(&s).is_allowed());

    // Istio's documented way to require mTLS: DENY notPrincipals ["*"].
    let s = set(&policy(
        "prod",
        "require-mtls",
        "action: DENY\nrules:\n- from:\n  - source: {notPrincipals: [\"*\"]}",
    ));
    assert_eq!(to("prod", 80).eval(&s), denied_by("prod/require-mtls", 0));
    assert!(to("prod", 80).from(BATCH).eval(&s).is_allowed());

    // notNamespaces, same rule.
    let s = set(&policy(
        "prod",
        "not-batch",
        "rules:\n- from:\n  - source: {notNamespaces: [batch]}",
    ));
    assert!(!to("prod", 80).from(BATCH).eval(&s).is_allowed());
    assert!(to("prod", 80).from(FRONTEND).eval(&s).is_allowed());
    assert!(to("prod", 80).eval(&s).is_allowed());

    // A plaintext source never matches a positive identity condition, even in DENY.
    let s = set(&policy(
        "prod",
        "deny-web",
        "action: DENY\nrules:\n- from:\n  - source: {namespaces: [\"*\"]}",
    ));
    assert!(to("prod", 80).eval(&s).is_allowed());
    assert!(!to("prod", 80).from(FRONTEND).eval(&s).is_allowed());
}

#[test]
fn ip_blocks() {
    let s = set(&policy(
        "prod",
        "ips",
        "rules:\n- from:\n  - source: {ipBlocks: [10.0.0.0/8, \"fd00::/8\", 192.168.1.5/24], notIpBlocks: [10.9.0.0/16]}",
    ));
    let rows: &[(&str, bool)] = &[
        ("10.1.2.3", true),
        ("10.9.1.1", false),
        ("11.0.0.1", false),
        ("fd12::1", true),
        ("fe80::1", false),
        // Host bits in the block are cleared, as Envoy does.
        ("192.168.1.200", true),
        ("192.168.2.1", false),
        // A v4 client seen through a dual-stack socket.
        ("::ffff:10.1.2.3", true),
        ("::ffff:10.9.0.1", false),
    ];
    for (ip, want) in rows {
        assert_eq!(to("prod", 80).ip(ip).eval(&s).is_allowed(), *want, "{ip}");
    }
    // Unknown source IP fails closed in ALLOW...
    assert_eq!(
        to("prod", 80).unknown_ip().eval(&s),
        no_allow_matched(&["prod/ips"])
    );
    // ...and in DENY, for both ipBlocks and notIpBlocks.
    for field in ["ipBlocks", "notIpBlocks"] {
        let s = set(&policy(
            "prod",
            "deny-ips",
            &format!("action: DENY\nrules:\n- from:\n  - source: {{{field}: [10.0.0.0/8]}}"),
        ));
        assert_eq!(
            to("prod", 80).unknown_ip().eval(&s),
            denied_by("prod/deny-ips", 0),
            "{field}"
        );
    }
    // A DENY rule without IP conditions is unaffected by an unknown IP.
    let s = set(&policy(
        "prod",
        "deny-port",
        "action: DENY\nrules:\n- to:\n  - operation: {ports: [\"22\"]}",
    ));
    assert!(to("prod", 80).unknown_ip().eval(&s).is_allowed());
}

#[test]
fn ports_and_not_ports_and_rule_structure() {
    let s = set(&policy(
        "prod",
        "ports",
        "rules:\n- to:\n  - operation: {ports: [\"8080\"]}\n  - operation: {notPorts: [\"22\", \"8080\", \"9090\"]}",
    ));
    assert_eq!(to("prod", 8080).eval(&s), allowed_by("prod/ports", 0));
    assert!(
        to("prod", 443).eval(&s).is_allowed(),
        "second operation (ORed)"
    );
    assert!(!to("prod", 22).eval(&s).is_allowed());
    assert!(!to("prod", 9090).eval(&s).is_allowed());

    // from AND to; sources ORed; fields of one source ANDed.
    let s = set(&policy(
        "prod",
        "and-or",
        "rules:\n- from:\n  - source: {namespaces: [web], notPrincipals: [cluster.local/ns/web/sa/other]}\n\
         \x20 - source: {principals: [cluster.local/ns/batch/sa/job]}\n  to:\n  - operation: {ports: [\"80\"]}",
    ));
    assert!(to("prod", 80).from(FRONTEND).eval(&s).is_allowed());
    assert!(to("prod", 80).from(BATCH).eval(&s).is_allowed());
    assert!(!to("prod", 81).from(FRONTEND).eval(&s).is_allowed());
    assert!(!to("prod", 80).from(OTHER).eval(&s).is_allowed());
    assert!(!to("prod", 80)
        .from("spiffe://cluster.local/ns/batch/sa/other")
        .eval(&s)
        .is_allowed());
}

#[test]
fn allow_with_no_rules_denies_everything_and_empty_rule_allows_everything() {
    for spec in ["{}", "action: ALLOW", "rules: []"] {
        let s = set(&policy("prod", "allow-nothing", spec));
        for r in [to("prod", 80), to("prod", 80).from(FRONTEND)] {
            assert_eq!(
                r.eval(&s),
                no_allow_matched(&["prod/allow-nothing"]),
                "{spec}"
            );
        }
    }
    // No spec at all is the same as `spec: {}`.
    let s = set(&policy("prod", "x", "{}").replace("spec:\n  {}\n", ""));
    assert!(!to("prod", 80).from(FRONTEND).eval(&s).is_allowed());

    let s = set(&policy("prod", "allow-all", "rules: [{}]"));
    assert_eq!(to("prod", 1).eval(&s), allowed_by("prod/allow-all", 0));
}

#[test]
fn root_namespace_policies_apply_mesh_wide() {
    let text = format!(
        "{}---\n{}",
        policy(
            "istio-system",
            "require-mtls",
            "action: DENY\nrules:\n- from:\n  - source: {notPrincipals: [\"*\"]}"
        ),
        policy(
            "istio-system",
            "db-from-backend",
            "selector: {matchLabels: {app: db}}\nrules:\n- from:\n  - source: {principals: [\"*/sa/backend\"]}"
        ),
    );
    let s = set(&text);
    assert_eq!(s.root_namespace(), "istio-system");
    assert_eq!(
        to("anywhere", 80).eval(&s),
        denied_by("istio-system/require-mtls", 0)
    );
    assert!(to("anywhere", 80).from(FRONTEND).eval(&s).is_allowed());
    // The selector of a root policy picks workloads in every namespace.
    assert_eq!(
        to("anywhere", 5432)
            .labels(&[("app", "db")])
            .from(FRONTEND)
            .eval(&s),
        no_allow_matched(&["istio-system/db-from-backend"])
    );
    // With another root namespace, istio-system is an ordinary namespace.
    let s = s.with_root_namespace("mesh-root");
    assert!(to("anywhere", 80).eval(&s).is_allowed());
    assert!(!to("istio-system", 80).eval(&s).is_allowed());
}

#[test]
fn denies_existing_reevaluates_open_connections() {
    let old = set(&policy("prod", "allow-all", "rules: [{}]"));
    let new = set(&policy(
        "prod",
        "only-frontend",
        "rules:\n- from:\n  - source: {principals: [cluster.local/ns/web/sa/frontend]}",
    ));
    let batch = to("prod", 80).from(BATCH);
    let frontend = to("prod", 80).from(FRONTEND);
    fn req(r: &R) -> Request<'_> {
        Request {
            destination_namespace: r.ns,
            destination_labels: Some(&r.labels),
            source_identity: r.id.as_ref(),
            source_ip: r.ip,
            destination_port: r.port,
        }
    }
    assert_eq!(old.denies_existing(&req(&batch)), None);
    assert_eq!(
        new.denies_existing(&req(&batch)),
        Some(Denial::NoAllowMatched {
            considered: vec![pref("prod/only-frontend")]
        })
    );
    assert_eq!(new.denies_existing(&req(&frontend)), None);
}

// ---------------------------------------------------------------------------------------
// Store and the proxy's Authorizer

fn workload(ns: &str, name: &str) -> Workload {
    Workload {
        name: name.into(),
        workload_name: name.into(),
        namespace: ns.into(),
        service_account: name.into(),
        node: "n1".into(),
        ips: vec!["10.0.0.9".parse().unwrap()],
        protocol: Protocol::Hbone,
        identity: WorkloadId::new(&TrustDomain::default(), ns, name).unwrap(),
        labels: Arc::default(),
    }
}

struct FixedLabels(Arc<BTreeMap<String, String>>);

impl LabelSource for FixedLabels {
    fn labels(&self, _w: &Workload) -> Option<Arc<BTreeMap<String, String>>> {
        Some(self.0.clone())
    }
}

#[test]
fn bad_update_leaves_previous_set_in_force() {
    let store = Arc::new(PolicyStore::default());
    let authz = PolicyAuthorizer::new(store.clone(), Arc::new(NoLabels));
    let db = workload("prod", "db");
    let frontend = sid(FRONTEND);
    let batch = sid(BATCH);
    let ask = |source: &SpiffeId| {
        authz.authorize(&AuthzRequest {
            source: Some(source),
            source_ip: "10.0.0.1".parse().unwrap(),
            destination: &db,
            port: 5432,
        })
    };
    assert_eq!(ask(&batch), Decision::Allow, "no policies: allowed");

    let good = policy(
        "prod",
        "only-frontend",
        "rules:\n- from:\n  - source: {principals: [cluster.local/ns/web/sa/frontend]}",
    );
    store.replace_from_documents(&good).unwrap();
    assert_eq!(ask(&frontend), Decision::Allow);
    assert_eq!(
        ask(&batch),
        Decision::Deny {
            policy: "no ALLOW policy matched (considered: prod/only-frontend)".into()
        }
    );

    // One good document and one bad: the whole update is refused.
    let bad = format!(
        "{}---\n{}",
        policy("prod", "allow-all", "rules: [{}]"),
        policy(
            "prod",
            "bad",
            "rules:\n- to:\n  - operation: {methods: [GET]}"
        ),
    );
    let e = store.replace_from_documents(&bad).unwrap_err();
    assert!(
        e.to_string()
            .contains("spec.rules[0].to[0].operation.methods"),
        "{e}"
    );
    assert_eq!(store.snapshot().policies().len(), 1);
    assert_eq!(
        store.snapshot().policies()[0].id(),
        &pref("prod/only-frontend")
    );
    assert!(matches!(ask(&batch), Decision::Deny { .. }));

    // A good update takes effect and keeps the configured root namespace.
    store.replace(PolicySet::default().with_root_namespace("mesh-root"));
    let old = store
        .replace_from_documents(&policy("prod", "allow-all", "rules: [{}]"))
        .unwrap();
    assert!(old.is_empty());
    assert_eq!(store.snapshot().root_namespace(), "mesh-root");
    assert_eq!(ask(&batch), Decision::Allow);
}

#[test]
fn authorizer_uses_labels_and_fails_closed_without_them() {
    let s = set(&policy(
        "prod",
        "deny-db",
        "selector: {matchLabels: {app: db}}\naction: DENY\nrules: [{}]",
    ));
    let store = Arc::new(PolicyStore::new(s));
    let db = workload("prod", "db");
    let source = sid(FRONTEND);
    let req = AuthzRequest {
        source: Some(&source),
        source_ip: "10.0.0.1".parse().unwrap(),
        destination: &db,
        port: 5432,
    };

    let unknown = PolicyAuthorizer::new(store.clone(), Arc::new(NoLabels));
    assert_eq!(
        unknown.authorize(&req),
        Decision::Deny {
            policy: "destination labels unknown; selector policies apply: prod/deny-db".into()
        }
    );
    let is_db = PolicyAuthorizer::new(
        store.clone(),
        Arc::new(FixedLabels(Arc::new(labels(&[("app", "db")])))),
    );
    assert_eq!(
        is_db.verdict(&req),
        denied_by("prod/deny-db", 0),
        "selected by its labels"
    );
    let is_web = PolicyAuthorizer::new(
        store,
        Arc::new(FixedLabels(Arc::new(labels(&[("app", "web")])))),
    );
    assert_eq!(is_web.authorize(&req), Decision::Allow);
}

#[test]
fn verdicts_serialize_to_json_and_back() {
    let verdicts = [
        allowed_by("prod/a", 2),
        ALLOW_NOTHING_BY_DEFAULT,
        denied_by("prod/d", 0),
        no_allow_matched(&["prod/a", "istio-system/b"]),
        Verdict::Deny(Denial::UnknownLabels {
            policies: vec![pref("prod/s")],
        }),
    ];
    for v in verdicts {
        let json = serde_json::to_string(&v).unwrap();
        let back: Verdict = serde_json::from_str(&json).unwrap();
        assert_eq!(back, v, "{json}");
    }
    let json = serde_json::to_value(denied_by("prod/d", 3)).unwrap();
    assert_eq!(
        json,
        serde_json::json!({"deny": {"reason": "deny_policy", "policy": "prod/d", "rule": 3}})
    );
    assert!(serde_json::from_str::<PolicyRef>("\"no-slash\"").is_err());
}
