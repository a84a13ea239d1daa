//! `zmesh compat migrate-mutual-auth`: its exit status tells a complete migration from a
//! partial one and from an error.

use std::process::{Command, Output};

fn migrate(input: &str, extra: &[&str]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policies.yaml");
    std::fs::write(&file, input).unwrap();
    Command::new(env!("CARGO_BIN_EXE_zmesh"))
        .args(["compat", "migrate-mutual-auth"])
        .arg(&file)
        .args(extra)
        .output()
        .unwrap()
}

const COMPLETE: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: echo, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: echo}}
  ingress:
  - fromEndpoints: [{matchLabels: {io.cilium.k8s.policy.serviceaccount: web}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
    authentication: {mode: required}
"#;

const WITH_L7: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: api, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - fromEndpoints: [{matchLabels: {io.cilium.k8s.policy.serviceaccount: web}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules: {http: [{method: GET, path: /}]}
    authentication: {mode: required}
"#;

#[test]
fn a_complete_migration_exits_zero() {
    let out = migrate(COMPLETE, &[]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("everything was carried over"), "{stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("kind: AuthorizationPolicy"));
}

#[test]
fn a_partial_migration_exits_3_unless_allowed() {
    let out = migrate(WITH_L7, &[]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("[l7-rules] CiliumNetworkPolicy shop/api")
            && stderr.contains("spec.ingress[0].toPorts[0].rules: L7 rules (http)"),
        "{stderr}"
    );
    // the only rule is gone: the policy allows nothing, and says so
    assert!(stderr.contains("[allows-nothing]"), "{stderr}");
    assert!(stderr.contains("--allow-partial"), "{stderr}");
    // the objects are still written, for review
    assert!(String::from_utf8_lossy(&out.stdout).contains("kind: AuthorizationPolicy"));

    let out = migrate(WITH_L7, &["--allow-partial"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");

    let out = migrate(WITH_L7, &["--report", "json"]);
    assert_eq!(out.status.code(), Some(3));
    let report: serde_json::Value = serde_json::from_slice(&out.stderr).unwrap();
    assert_eq!(report["complete"], false);
    assert_eq!(report["notCarriedOver"][0]["kind"], "l7-rules");
}

#[test]
fn input_without_a_cilium_policy_is_an_error() {
    let out = migrate(
        "apiVersion: v1\nkind: Service\nmetadata: {name: echo}\n",
        &[],
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no CiliumNetworkPolicy or CiliumClusterwideNetworkPolicy in"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
}
