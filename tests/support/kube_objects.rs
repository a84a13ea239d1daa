//! Kubernetes objects the tests against a real API server create, shared by
//! tests/kube_apiserver.rs and tests/node_e2e.rs (each includes this file with `#[path]`).

#![allow(dead_code)]

use std::collections::BTreeMap;

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use kube::api::{Api, PostParams};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::json;

pub fn from_json<T: DeserializeOwned>(value: serde_json::Value) -> T {
    serde_json::from_value(value).expect("a valid object")
}

/// `prefix-<8 hex digits>`: names that concurrent and earlier runs do not share.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{:08x}", rand::random::<u32>())
}

/// Creates the objects of one of the project's manifests (examples/kubernetes/FILE).
pub async fn apply_example(client: &kube::Client, file: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/kubernetes")
        .join(file);
    let text = std::fs::read_to_string(&path).expect("the example manifest");
    let pp = PostParams::default();
    for doc in serde_yaml_ng::Deserializer::from_str(&text) {
        let value = serde_yaml_ng::Value::deserialize(doc).expect("YAML");
        if value.is_null() {
            continue;
        }
        let kind = value["kind"].as_str().expect("a kind").to_owned();
        let namespace = value["metadata"]["namespace"].as_str().map(str::to_owned);
        let json = serde_json::to_value(&value).expect("JSON");
        let created = match kind.as_str() {
            "Namespace" => Api::<Namespace>::all(client.clone())
                .create(&pp, &from_json(json))
                .await
                .map(drop),
            "ServiceAccount" => Api::<ServiceAccount>::namespaced(
                client.clone(),
                &namespace.expect("a namespaced object"),
            )
            .create(&pp, &from_json(json))
            .await
            .map(drop),
            "ClusterRole" => Api::<ClusterRole>::all(client.clone())
                .create(&pp, &from_json(json))
                .await
                .map(drop),
            "ClusterRoleBinding" => Api::<ClusterRoleBinding>::all(client.clone())
                .create(&pp, &from_json(json))
                .await
                .map(drop),
            "Role" => {
                Api::<Role>::namespaced(client.clone(), &namespace.expect("a namespaced object"))
                    .create(&pp, &from_json(json))
                    .await
                    .map(drop)
            }
            "RoleBinding" => Api::<RoleBinding>::namespaced(
                client.clone(),
                &namespace.expect("a namespaced object"),
            )
            .create(&pp, &from_json(json))
            .await
            .map(drop),
            other => panic!("{file}: unexpected kind {other}"),
        };
        created.unwrap_or_else(|e| panic!("{file}: {kind}: {e}"));
    }
}

/// A ServiceAccount token from the TokenRequest API, valid for an hour, for `audiences`
/// (none: the API server's own) and bound to `pod` if given.
pub async fn service_account_token(
    client: &kube::Client,
    namespace: &str,
    account: &str,
    audiences: &[&str],
    pod: Option<&Pod>,
) -> String {
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: audiences.iter().map(|a| a.to_string()).collect(),
            expiration_seconds: Some(3600),
            bound_object_ref: pod.map(|pod| BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
        },
        ..TokenRequest::default()
    };
    let answer = Api::<ServiceAccount>::namespaced(client.clone(), namespace)
        .create_token_request(account, &PostParams::default(), &request)
        .await
        .unwrap_or_else(|e| panic!("TokenRequest for {namespace}/{account}: {e}"));
    answer.status.expect("a token").token
}

/// Creates ServiceAccount `namespace/name` unless it exists (the controller manager makes
/// `default` too).
pub async fn create_service_account(client: &kube::Client, namespace: &str, name: &str) {
    let accounts = Api::<ServiceAccount>::namespaced(client.clone(), namespace);
    match accounts
        .create(
            &PostParams::default(),
            &from_json(json!({"metadata": {"name": name}})),
        )
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 409 => {}
        Err(e) => panic!("ServiceAccount {namespace}/{name}: {e}"),
    }
}

/// Creates namespace `name` with `labels` and the ServiceAccounts `accounts` in it.
pub async fn create_namespace(
    client: &kube::Client,
    name: &str,
    labels: &[(&str, &str)],
    accounts: &[&str],
) {
    let labels: BTreeMap<_, _> = labels.iter().copied().collect();
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &from_json(json!({"metadata": {"name": name, "labels": labels}})),
        )
        .await
        .unwrap_or_else(|e| panic!("namespace {name}: {e}"));
    for account in accounts {
        create_service_account(client, name, account).await;
    }
}

/// Istio's AuthorizationPolicy API group.
pub const POLICY_GROUP: &str = "security.istio.io";

/// Istio's AuthorizationPolicy CRD as Istio installs it (v1 stored, v1beta1 served),
/// without a schema for `spec` so that the agent sees what users write, invalid or not;
/// returns once the API server reports it Established.
pub async fn install_policy_crd(client: &kube::Client) {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let schema = json!({"openAPIV3Schema": {
        "type": "object",
        "properties": {
            "spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
            "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
        },
    }});
    let name = format!("authorizationpolicies.{POLICY_GROUP}");
    let crd: CustomResourceDefinition = from_json(json!({
        "metadata": {"name": name},
        "spec": {
            "group": POLICY_GROUP,
            "names": {
                "kind": "AuthorizationPolicy",
                "listKind": "AuthorizationPolicyList",
                "plural": "authorizationpolicies",
                "singular": "authorizationpolicy",
            },
            "scope": "Namespaced",
            "versions": [
                {"name": "v1", "served": true, "storage": true, "schema": schema},
                {"name": "v1beta1", "served": true, "storage": false, "schema": schema},
            ],
        },
    }));
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    crds.create(&PostParams::default(), &crd)
        .await
        .expect("the CRD");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let crd = crds.get(&name).await.expect("get CRD");
        let established = crd.status.and_then(|s| s.conditions).is_some_and(|c| {
            c.iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
        });
        if established {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the CRD is not Established after 30 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
