//! Policies of the kinds Cilium documents for mutual authentication, translated and
//! checked field by field; untranslatable parts must show up in the report.

use serde_json::json;

use super::*;

fn run(yaml: &str) -> Migration {
    migrate(
        &[("policy.yaml".to_owned(), yaml.to_owned())],
        &MigrateOptions::default(),
    )
    .unwrap()
}

fn kinds(m: &Migration) -> Vec<FindingKind> {
    m.findings.iter().map(|f| f.kind).collect()
}

fn finding(m: &Migration, kind: FindingKind) -> &Finding {
    m.findings
        .iter()
        .find(|f| f.kind == kind)
        .unwrap_or_else(|| panic!("no {kind:?} finding in {:#?}", m.findings))
}

/// Cilium's mutual-auth example, with peers by service account and by namespace.
const ECHO: &str = r#"
apiVersion: "cilium.io/v2"
kind: CiliumNetworkPolicy
metadata:
  name: echo
  namespace: shop
spec:
  endpointSelector:
    matchLabels:
      k8s:app: echo
  ingress:
  - fromEndpoints:
    - matchLabels:
        io.cilium.k8s.policy.serviceaccount: pod-worker
    - matchLabels:
        k8s:io.kubernetes.pod.namespace: monitoring
    - matchLabels:
        k8s:io.kubernetes.pod.namespace: batch
        k8s:io.cilium.k8s.policy.serviceaccount: cron
    toPorts:
    - ports:
      - port: "3000"
        protocol: TCP
      - port: 3001
    authentication:
      mode: "required"
"#;

#[test]
fn translates_service_account_and_namespace_peers() {
    let m = run(ECHO);
    assert!(m.findings.is_empty(), "{:#?}", m.findings);
    assert_eq!((m.policies_read, m.policies_with_auth), (1, 1));
    assert_eq!(
        m.namespaces.iter().map(String::as_str).collect::<Vec<_>>(),
        ["batch", "monitoring", "shop"]
    );
    assert_eq!(
        m.policies,
        vec![json!({
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {
                "name": "echo-mtls",
                "namespace": "shop",
                "annotations": {SOURCE_ANNOTATION: "CiliumNetworkPolicy shop/echo"},
            },
            "spec": {
                "selector": {"matchLabels": {"app": "echo"}},
                "action": "ALLOW",
                "rules": [{
                    "from": [
                        {"source": {"principals": ["cluster.local/ns/shop/sa/pod-worker"]}},
                        {"source": {"namespaces": ["monitoring"]}},
                        {"source": {"principals": ["cluster.local/ns/batch/sa/cron"]}},
                    ],
                    "to": [{"operation": {"ports": ["3000", "3001"]}}],
                }],
            },
        })]
    );
}

#[test]
fn yaml_output_is_kubectl_ready_and_parses_back() {
    use serde::Deserialize as _;
    let m = run(ECHO);
    let text = m.render(Format::Yaml).unwrap();
    let docs: Vec<Value> = serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| serde_json::to_value(serde_yaml_ng::Value::deserialize(d).unwrap()).unwrap())
        .collect();
    assert_eq!(docs.len(), 4, "3 namespaces + 1 policy:\n{text}");
    assert_eq!(docs[0]["kind"], "Namespace");
    // The label value must stay a string ("true"), as Kubernetes requires.
    assert_eq!(docs[0]["metadata"]["labels"][ENROLL_LABEL], json!("true"));
    assert_eq!(docs[3], m.policies[0]);

    let list: Value = serde_json::from_str(&m.render(Format::Json).unwrap()).unwrap();
    assert_eq!(list["kind"], "List");
    assert_eq!(list["items"].as_array().unwrap().len(), 4);
}

#[test]
fn reports_what_cannot_be_carried_and_keeps_the_rest_narrow() {
    let m = run(r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: api, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - fromEndpoints:
    - matchLabels: {app: frontend}
    - matchLabels: {io.cilium.k8s.policy.serviceaccount: web}
    - matchExpressions: [{key: team, operator: In, values: [a]}]
    fromEntities: [world, cluster]
    fromCIDR: [10.0.0.0/8]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http: [{method: GET, path: "/"}]
    - ports: [{port: "53", protocol: UDP}, {port: "8443", protocol: TCP}, {port: http, protocol: TCP}]
    - ports: [{port: "9000", endPort: 9010, protocol: TCP}]
    authentication: {mode: required}
  - fromEndpoints: [{matchLabels: {app: legacy}}]
  egress:
  - toEndpoints: [{matchLabels: {app: db}}]
    authentication: {mode: required}
"#);
    let ks = kinds(&m);
    for k in [
        FindingKind::UnmappableLabel,
        FindingKind::MatchExpressions,
        FindingKind::Entities,
        FindingKind::Cidr,
        FindingKind::L7Rules,
        FindingKind::Port,
        FindingKind::Unauthenticated,
        FindingKind::Egress,
    ] {
        assert!(ks.contains(&k), "missing {k:?} in {ks:?}");
    }
    // UDP, named port, range.
    assert_eq!(ks.iter().filter(|k| **k == FindingKind::Port).count(), 3);
    let l7 = finding(&m, FindingKind::L7Rules);
    assert_eq!(l7.rule, "spec.ingress[0].toPorts[0].rules");
    assert!(l7
        .policy
        .starts_with("CiliumNetworkPolicy shop/api (policy.yaml, document 1)"));
    assert_eq!(finding(&m, FindingKind::Egress).rule, "spec.egress[0]");
    assert!(finding(&m, FindingKind::UnmappableLabel)
        .reason
        .contains("app=frontend"));

    // What remains is narrower than the Cilium rule, never wider: only the web SA, only 8443.
    assert_eq!(
        m.policies[0]["spec"]["rules"],
        json!([{
            "from": [{"source": {"principals": ["cluster.local/ns/shop/sa/web"]}}],
            "to": [{"operation": {"ports": ["8443"]}}],
        }])
    );
    let report = m.report_text();
    assert!(report.contains("items were NOT carried over"));
    assert!(report.contains("[l7-rules] CiliumNetworkPolicy shop/api"));
}

#[test]
fn a_policy_with_nothing_translatable_allows_nothing() {
    let m = run(r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: ingress-from-world, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: gateway}}
  ingress:
  - fromEntities: [world]
    authentication: {mode: required}
  - fromEndpoints: [{matchLabels: {io.cilium.k8s.policy.serviceaccount: x}}]
    toPorts: [{ports: [{port: "80"}], rules: {http: [{}]}}]
    authentication: {mode: required}
"#);
    assert_eq!(m.policies.len(), 1);
    // An ALLOW policy without rules: Istio's allow-nothing (fail closed).
    assert_eq!(m.policies[0]["spec"]["rules"], json!([]));
    assert_eq!(m.policies[0]["spec"]["action"], "ALLOW");
    assert!(kinds(&m).contains(&FindingKind::AllowsNothing));
}

#[test]
fn rule_without_ports_allows_all_ports_and_empty_peer_means_own_namespace() {
    let m = run(r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: same-ns}
spec:
  endpointSelector: {}
  ingress:
  - fromEndpoints: [{}]
    authentication: {mode: required}
"#);
    assert!(m.findings.is_empty(), "{:#?}", m.findings);
    let ap = &m.policies[0];
    assert_eq!(ap["metadata"]["namespace"], "default");
    assert!(
        ap["spec"].get("selector").is_none(),
        "empty selector = whole namespace"
    );
    assert_eq!(
        ap["spec"]["rules"],
        json!([{"from": [{"source": {"namespaces": ["default"]}}]}])
    );
}

#[test]
fn clusterwide_policies_go_to_the_root_namespace_or_their_selected_namespace() {
    let m = run(r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: db}
specs:
- endpointSelector:
    matchLabels: {k8s:io.kubernetes.pod.namespace: data, app: postgres}
  ingress:
  - fromEndpoints:
    - matchLabels: {io.cilium.k8s.policy.serviceaccount: api}
    toPorts: [{ports: [{port: "5432", protocol: TCP}]}]
    authentication: {mode: required}
- endpointSelector: {matchLabels: {app: metrics}}
  ingress:
  - fromEndpoints:
    - matchLabels: {k8s:io.kubernetes.pod.namespace: monitoring, io.cilium.k8s.policy.serviceaccount: prometheus}
    authentication: {mode: required}
"#);
    assert_eq!(m.policies.len(), 2);
    let db = &m.policies[0];
    assert_eq!(db["metadata"]["name"], "ccnp-db-mtls-0");
    assert_eq!(db["metadata"]["namespace"], "data");
    assert_eq!(
        db["spec"]["selector"],
        json!({"matchLabels": {"app": "postgres"}})
    );
    // No namespace on a cluster-wide peer: the service account in any namespace.
    assert_eq!(
        db["spec"]["rules"][0]["from"],
        json!([{"source": {"principals": ["*/sa/api"]}}])
    );
    let metrics = &m.policies[1];
    assert_eq!(metrics["metadata"]["namespace"], "istio-system");
    assert_eq!(
        metrics["spec"]["rules"][0]["from"],
        json!([{"source": {"principals": ["cluster.local/ns/monitoring/sa/prometheus"]}}])
    );
    assert!(m.namespaces.contains("data") && m.namespaces.contains("monitoring"));
    // The mesh-wide target's namespaces cannot be listed.
    assert_eq!(kinds(&m), [FindingKind::Enrollment]);
}

#[test]
fn policies_without_mutual_auth_and_other_kinds_are_left_alone() {
    let m = run(r#"
apiVersion: v1
kind: Service
metadata: {name: echo}
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: plain, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: echo}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: x}}]
    authentication: {mode: disabled}
---
"#);
    assert_eq!((m.policies_read, m.policies_with_auth), (1, 0));
    assert!(m.policies.is_empty() && m.namespaces.is_empty() && m.findings.is_empty());
}

#[test]
fn selectors_that_cannot_target_workloads_skip_the_policy() {
    let m = run(r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: a, namespace: shop}
spec:
  endpointSelector:
    matchExpressions: [{key: app, operator: In, values: [a, b]}]
  ingress:
  - fromEndpoints: [{}]
    authentication: {mode: required}
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: b, namespace: shop}
spec:
  endpointSelector: {matchLabels: {"reserved:host": ""}}
  ingress:
  - fromEndpoints: [{}]
    authentication: {mode: required}
---
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: host}
spec:
  nodeSelector: {}
  ingress:
  - fromEndpoints: [{}]
    authentication: {mode: test-always-fail}
  - fromEndpoints: [{}]
    authentication: {mode: required}
"#);
    assert!(m.policies.is_empty());
    assert_eq!(
        kinds(&m),
        [
            FindingKind::MatchExpressions,
            FindingKind::UnmappableLabel,
            FindingKind::AuthMode,
            FindingKind::Selector
        ]
    );
    assert_eq!(m.policies_with_auth, 3);
}

#[test]
fn malformed_input_is_an_error_with_its_location() {
    let err = migrate(
        &[("bad.yaml".into(), "a: [unclosed".into())],
        &MigrateOptions::default(),
    )
    .unwrap_err();
    assert!(
        matches!(err, MigrateError::Yaml { ref origin, .. } if origin == "bad.yaml, document 1")
    );

    let err = migrate(
        &[(
            "p.yaml".into(),
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: x}\nspec: [1]\n"
                .into(),
        )],
        &MigrateOptions::default(),
    )
    .unwrap_err();
    assert_eq!(
        err,
        MigrateError::Malformed {
            origin: "p.yaml, document 1".into(),
            path: "spec".into(),
            reason: "must be a mapping".into()
        }
    );
    let err = migrate(
        &[(
            "p.yaml".into(),
            "apiVersion: cilium.io/v3\nkind: CiliumNetworkPolicy\nmetadata: {name: x}\n".into(),
        )],
        &MigrateOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(err, MigrateError::Malformed { ref path, .. } if path == "apiVersion"));
}

#[test]
fn trust_domain_is_configurable() {
    let options = MigrateOptions {
        trust_domain: TrustDomain::new("prod.example").unwrap(),
        ..MigrateOptions::default()
    };
    let m = migrate(&[("p".into(), ECHO.into())], &options).unwrap();
    assert_eq!(
        m.policies[0]["spec"]["rules"][0]["from"][0]["source"]["principals"][0],
        "prod.example/ns/shop/sa/pod-worker"
    );
}

/// Found by fuzzing (fuzz/ cilium_policy): names that are not valid Kubernetes names were
/// copied into the generated policy, which zmesh (and the API server) then refused, so the
/// whole generated file was rejected; and a `*` in a label value became an Istio wildcard,
/// allowing more peers than the Cilium rule named. Such values are refused or reported now,
/// and everything generated is a policy zmesh accepts.
#[test]
fn names_that_are_not_kubernetes_names_are_never_carried_over() {
    let accepted = |m: &Migration| {
        for p in &m.policies {
            if let Err(e) = zmesh_proxy::policy::Policy::from_json(p) {
                panic!("generated policy refused: {e}\n{p:#}");
            }
        }
    };
    let err = migrate(
        &[(
            "p.yaml".into(),
            ECHO.replace("namespace: shop", "namespace: sHop"),
        )],
        &MigrateOptions::default(),
    )
    .unwrap_err();
    assert!(
        matches!(err, MigrateError::Malformed { ref path, .. } if path == "metadata.namespace"),
        "{err:?}"
    );

    let m = run(r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: echo, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: echo}}
  ingress:
  - fromEndpoints:
    - matchLabels: {k8s:io.kubernetes.pod.namespace: "prod-*"}
    - matchLabels: {io.cilium.k8s.policy.serviceaccount: "*"}
    - matchLabels: {io.kubernetes.pod.namespace: "", io.cilium.k8s.policy.serviceaccount: web}
    - matchLabels: {io.kubernetes.pod.namespace: batch, io.cilium.k8s.policy.serviceaccount: Cron_1}
    - matchLabels: {io.kubernetes.pod.namespace: batch, io.cilium.k8s.policy.serviceaccount: cron}
    authentication: {mode: required}
"#);
    accepted(&m);
    assert_eq!(
        m.policies[0]["spec"]["rules"][0]["from"],
        json!([{"source": {"principals": ["cluster.local/ns/batch/sa/cron"]}}])
    );
    assert_eq!(kinds(&m), vec![FindingKind::UnmappableLabel; 4]);
    assert_eq!(
        m.namespaces.iter().map(String::as_str).collect::<Vec<_>>(),
        ["batch", "shop"]
    );

    let m = run(r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: all}
spec:
  endpointSelector: {matchLabels: {k8s:io.kubernetes.pod.namespace: Bad_NS}}
  ingress:
  - fromEndpoints: [{}]
    authentication: {mode: required}
"#);
    accepted(&m);
    assert!(m.policies.is_empty(), "{:#?}", m.policies);
    assert_eq!(kinds(&m), vec![FindingKind::Selector]);
    assert!(m.namespaces.is_empty());
}

#[test]
fn l7_rules_are_listed_with_policy_and_rule_index_even_when_the_rule_is_dropped() {
    let m = run(r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: kafka-api, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: broker}}
  ingress:
  - fromEndpoints: [{matchLabels: {io.cilium.k8s.policy.serviceaccount: web}}]
    toPorts:
    - ports: [{port: "8443", protocol: TCP}]
    authentication: {mode: required}
  - fromEntities: [world]
    toPorts:
    - ports: [{port: "9092", protocol: TCP}]
      rules: {kafka: [{role: produce, topic: orders}]}
    - ports: [{port: "80", protocol: TCP}]
      rules: {http: [{method: GET}]}
    authentication: {mode: required}
---
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: dns}
spec:
  endpointSelector: {matchLabels: {k8s:io.kubernetes.pod.namespace: kube-system}}
  ingress:
  - fromEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: shop}}]
    toPorts:
    - ports: [{port: "53", protocol: ANY}]
      rules: {dns: [{matchPattern: "*"}]}
    authentication: {mode: required}
"#);
    let l7: Vec<(&str, &str, &str)> = m
        .findings_of(FindingKind::L7Rules)
        .map(|f| (f.policy.as_str(), f.rule.as_str(), f.reason.as_str()))
        .collect();
    assert_eq!(l7.len(), 3, "{l7:#?}");
    // The second rule has no identity peer, so it is dropped whole: its L7 rules are still
    // listed, each with its index.
    assert!(l7[0].0.starts_with("CiliumNetworkPolicy shop/kafka-api"));
    assert_eq!(l7[0].1, "spec.ingress[1].toPorts[0].rules");
    assert!(l7[0].2.contains("(kafka)"), "{}", l7[0].2);
    assert_eq!(l7[1].1, "spec.ingress[1].toPorts[1].rules");
    assert!(l7[1].2.contains("(http)"), "{}", l7[1].2);
    assert!(l7[2].0.starts_with("CiliumClusterwideNetworkPolicy dns"));
    assert_eq!(l7[2].1, "spec.ingress[0].toPorts[0].rules");
    assert!(l7[2].2.contains("(dns)"), "{}", l7[2].2);
    assert!(!m.is_complete());
    let report = m.report_text();
    assert!(
        report.contains("[l7-rules] CiliumNetworkPolicy shop/kafka-api (policy.yaml, document 1) spec.ingress[1].toPorts[0].rules: L7 rules (kafka)"),
        "{report}"
    );
    // The first rule stays, without the dropped ports.
    assert_eq!(
        m.policies[0]["spec"]["rules"],
        json!([{
            "from": [{"source": {"principals": ["cluster.local/ns/shop/sa/web"]}}],
            "to": [{"operation": {"ports": ["8443"]}}],
        }])
    );
}

#[test]
fn input_without_a_cilium_policy_is_an_error() {
    for text in [
        "apiVersion: v1\nkind: Service\nmetadata: {name: echo}\n",
        "",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: np}\n",
    ] {
        let e = migrate(
            &[("in.yaml".to_owned(), text.to_owned())],
            &MigrateOptions::default(),
        )
        .unwrap_err();
        assert!(matches!(e, MigrateError::NoCiliumPolicy { .. }), "{e}");
        assert!(e.to_string().contains("no CiliumNetworkPolicy"), "{e}");
        assert!(e.to_string().contains("in.yaml"), "{e}");
    }
}

#[test]
fn complete_only_when_nothing_was_left_out() {
    assert!(run(ECHO).is_complete());
    let none = run(r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: w, namespace: shop}
spec:
  endpointSelector: {}
  ingress:
  - fromEntities: [world]
    authentication: {mode: required}
"#);
    assert!(!none.is_complete());
    assert_eq!(none.findings_of(FindingKind::AllowsNothing).count(), 1);
}
