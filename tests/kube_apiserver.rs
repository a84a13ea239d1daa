//! The Kubernetes code against a real control plane (etcd, kube-apiserver and
//! kube-controller-manager 1.20 on 127.0.0.1, built by scripts/control-plane.sh; see
//! tests/support/control_plane.rs): the agent's cluster source (list/watch of namespaces,
//! pods, Services and AuthorizationPolicies; relabelling, deletions, an API server restart,
//! RBAC) and the CA's TokenReview authentication with real ServiceAccount tokens.
//!
//! There is no kubelet: tests write pod status through the status subresource as a kubelet
//! would, and finish graceful deletions of scheduled pods the way it does (grace period 0).

#[path = "support/control_plane.rs"]
mod control_plane;
#[path = "support/kube_objects.rs"]
mod kube_objects;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use control_plane::{ControlPlane, Options};
use k8s_openapi::api::core::v1::{Endpoints, Namespace, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::ClusterRole;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
};
use kube_objects::{
    apply_example, create_service_account, from_json, install_policy_crd, service_account_token,
    unique, POLICY_GROUP,
};
use serde_json::json;
use tokio::sync::watch;
use zmesh_agent::ca::CaTokenCredential;
use zmesh_certs::{
    new_key_and_csr, BearerError, BearerValidator, CaServer, CaStore, CachedBearer, InitOptions,
    IstioCaClient, NodeName, Policy as CaPolicy, ServerOptions, DEFAULT_CLUSTER_ID,
};
use zmesh_cluster::access::{self, check_access, AccessError};
use zmesh_cluster::kube_source::{watch_kubernetes, watch_placement, RetryPolicy};
use zmesh_cluster::placement::ClusterPlacement;
use zmesh_cluster::state::{ClusterState, PodKey};
use zmesh_cluster::token_review::{
    TokenReviewValidator, DEFAULT_AGENT_SERVICE_ACCOUNT, DEFAULT_AUDIENCE, DEFAULT_CACHE_TTL,
};
use zmesh_identity::{SpiffeId, TrustDomain};
use zmesh_proxy::policy::{Action, Request as PolicyRequest};

const NODE: &str = "node-a";
const OTHER_NODE: &str = "node-b";
const DEADLINE: Duration = Duration::from_secs(30);

/// The control plane, or `None` when the test is to be skipped (see the harness).
async fn control_plane(options: Options) -> Option<ControlPlane> {
    // What zmesh logs (RUST_LOG=kubernetes=debug for more) shows next to a failure.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "kubernetes=info".into()),
        )
        .with_test_writer()
        .try_init();
    match ControlPlane::start(options).await {
        Ok(plane) => {
            if let Some(plane) = &plane {
                eprintln!("control plane ready in {:?}", plane.startup);
            }
            plane
        }
        Err(e) => panic!("{e}"),
    }
}

fn fast_retry() -> RetryPolicy {
    RetryPolicy {
        initial: Duration::from_millis(100),
        max: Duration::from_secs(1),
    }
}

/// Creates a namespace with `labels` and its `default` ServiceAccount (which the
/// controller manager would create, if it runs, and pods need).
async fn create_namespace(client: &kube::Client, name: &str, labels: &[(&str, &str)]) {
    kube_objects::create_namespace(client, name, labels, &["default"]).await;
}

/// A pod as a Deployment would create it, scheduled on `node`.
fn pod(
    name: &str,
    node: Option<&str>,
    account: &str,
    labels: &[(&str, &str)],
    ports: &[(&str, u16)],
) -> Pod {
    let labels: BTreeMap<_, _> = labels.iter().copied().collect();
    let ports: Vec<_> = ports
        .iter()
        .map(|(name, port)| json!({"name": name, "containerPort": port}))
        .collect();
    from_json(json!({
        "metadata": {
            "name": name,
            "labels": labels,
            "annotations": {"zmesh.io/netns": format!("/run/netns/{name}")},
        },
        "spec": {
            "nodeName": node,
            "serviceAccountName": account,
            "automountServiceAccountToken": false,
            "containers": [{"name": "app", "image": "registry.invalid/app:1", "ports": ports}],
        },
    }))
}

async fn create_pod(client: &kube::Client, namespace: &str, pod: Pod) -> Pod {
    Api::<Pod>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &pod)
        .await
        .unwrap_or_else(|e| panic!("pod {namespace}/{:?}: {e}", pod.metadata.name))
}

/// What a kubelet reports once the pod's sandbox has its IP: Running, the IP, and the
/// Ready condition.
async fn set_pod_status(client: &kube::Client, namespace: &str, name: &str, ip: &str, ready: bool) {
    let status = json!({"status": {
        "phase": "Running",
        "hostIP": "192.0.2.10",
        "podIP": ip,
        "podIPs": [{"ip": ip}],
        "conditions": [
            {"type": "Ready", "status": if ready { "True" } else { "False" }},
            {"type": "ContainersReady", "status": if ready { "True" } else { "False" }},
        ],
    }});
    Api::<Pod>::namespaced(client.clone(), namespace)
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap_or_else(|e| panic!("status of {namespace}/{name}: {e}"));
}

/// Deletes a pod the way the kubelet finishes it: at once (grace period 0).
async fn force_delete_pod(client: &kube::Client, namespace: &str, name: &str) {
    Api::<Pod>::namespaced(client.clone(), namespace)
        .delete(
            name,
            &DeleteParams {
                grace_period_seconds: Some(0),
                ..DeleteParams::default()
            },
        )
        .await
        .unwrap_or_else(|e| panic!("deleting {namespace}/{name}: {e}"));
}

async fn label_namespace(client: &kube::Client, name: &str, labels: serde_json::Value) {
    Api::<Namespace>::all(client.clone())
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(&json!({"metadata": {"labels": labels}})),
        )
        .await
        .unwrap_or_else(|e| panic!("labelling {name}: {e}"));
}

/// Waits (up to [`DEADLINE`]) for a published state that satisfies `done`.
async fn wait_state(
    rx: &mut watch::Receiver<Arc<ClusterState>>,
    what: &str,
    done: impl Fn(&ClusterState) -> bool,
) -> Arc<ClusterState> {
    let result = tokio::time::timeout(DEADLINE, async {
        loop {
            let state = rx.borrow_and_update().clone();
            if done(&state) {
                return state;
            }
            rx.changed().await.expect("the source stopped");
        }
    })
    .await;
    match result {
        Ok(state) => state,
        Err(_) => panic!(
            "timed out waiting for {what}; last state: {:#?}",
            rx.borrow()
        ),
    }
}

/// Polls `probe` until it returns `Some` (up to [`DEADLINE`]).
async fn poll<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    mut probe: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn key(namespace: &str, name: &str) -> PodKey {
    PodKey {
        namespace: namespace.into(),
        name: name.into(),
    }
}

fn enrolled_on(state: &ClusterState, node: &str) -> BTreeSet<String> {
    state
        .enrolled_on(node)
        .map(|p| format!("{}/{}", p.namespace, p.name))
        .collect()
}

fn names(items: &[(&str, &str)]) -> BTreeSet<String> {
    items.iter().map(|(ns, n)| format!("{ns}/{n}")).collect()
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("an IP")
}

/// The agent's source, as the agent's ServiceAccount with the project's RBAC, follows
/// namespaces and pods: enrollment by either label, pod opt-outs, this node's pods in full
/// and others compact, status updates, relabelling both ways, graceful and final pod
/// deletion, and namespace deletion.
#[tokio::test]
async fn agent_source_follows_namespaces_pods_and_enrollment() {
    let Some(plane) = control_plane(Options {
        controller_manager: true,
        ..Options::default()
    })
    .await
    else {
        return;
    };
    let admin = plane.client().await.expect("admin client");
    apply_example(&admin, "00-namespace.yaml").await;
    apply_example(&admin, "10-rbac.yaml").await;
    let token = service_account_token(&admin, "zmesh-system", "zmesh-agent", &[], None).await;
    let agent = plane.client_with_token(&token).await.expect("agent client");

    let (cilium, istio, plain) = (unique("cilium"), unique("istio"), unique("plain"));
    create_namespace(&admin, &cilium, &[("io.cilium/mtls-enabled", "true")]).await;
    create_namespace(&admin, &istio, &[("istio.io/dataplane-mode", "ambient")]).await;
    create_namespace(&admin, &plain, &[]).await;
    let pods = [
        (&cilium, "web-1", NODE, "10.244.1.11", &[("app", "web")][..]),
        (
            &cilium,
            "web-2",
            OTHER_NODE,
            "10.244.2.12",
            &[("app", "web")][..],
        ),
        (
            &cilium,
            "opted-out",
            NODE,
            "10.244.1.13",
            &[("app", "legacy"), ("istio.io/dataplane-mode", "none")][..],
        ),
        (&istio, "db-0", NODE, "10.244.1.14", &[("app", "db")][..]),
        (
            &plain,
            "batch",
            NODE,
            "10.244.1.15",
            &[("app", "batch")][..],
        ),
    ];
    for (ns, name, node, address, labels) in pods {
        create_pod(&admin, ns, pod(name, Some(node), "default", labels, &[])).await;
        set_pod_status(&admin, ns, name, address, true).await;
    }

    let mut rx = watch_kubernetes(agent, NODE.into(), fast_retry()).await;
    let state = wait_state(&mut rx, "every pod with its IP", |s| {
        pods.iter()
            .all(|(ns, name, ..)| s.pod(&key(ns, name)).is_some_and(|p| !p.ips.is_empty()))
    })
    .await;
    assert_eq!(
        enrolled_on(&state, NODE),
        names(&[(&cilium, "web-1"), (&istio, "db-0")])
    );
    assert_eq!(
        enrolled_on(&state, OTHER_NODE),
        names(&[(&cilium, "web-2")])
    );
    let local = state.pod(&key(&cilium, "web-1")).expect("web-1");
    assert_eq!(local.ips, [ip("10.244.1.11")]);
    assert_eq!(local.node.as_deref(), Some(NODE));
    assert_eq!(local.service_account, "default");
    assert!(local.ready);
    assert_eq!(
        local.netns_path.as_deref(),
        Some(std::path::Path::new("/run/netns/web-1")),
        "this node's pods are kept in full"
    );
    let remote = state.pod(&key(&cilium, "web-2")).expect("web-2");
    assert_eq!(remote.netns_path, None, "other nodes' pods are compact");
    assert_eq!(remote.labels.get("app").map(String::as_str), Some("web"));

    // The kubelet reports a new IP (sandbox recreated): followed.
    set_pod_status(&admin, &istio, "db-0", "10.244.1.24", true).await;
    wait_state(&mut rx, "db-0's new IP", |s| {
        s.pod(&key(&istio, "db-0"))
            .is_some_and(|p| p.ips == [ip("10.244.1.24")])
    })
    .await;

    // Relabelling: cilium's namespace leaves the mesh, plain joins it through Istio's label.
    label_namespace(&admin, &cilium, json!({"io.cilium/mtls-enabled": "false"})).await;
    label_namespace(
        &admin,
        &plain,
        json!({"istio.io/dataplane-mode": "ambient"}),
    )
    .await;
    let state = wait_state(&mut rx, "relabelled namespaces", |s| {
        enrolled_on(s, NODE) == names(&[(&istio, "db-0"), (&plain, "batch")])
    })
    .await;
    assert!(enrolled_on(&state, OTHER_NODE).is_empty());
    // Removing the label altogether (JSON merge patch null) keeps it out; putting it back
    // brings the namespace's pods back.
    label_namespace(&admin, &cilium, json!({"io.cilium/mtls-enabled": null})).await;
    wait_state(&mut rx, "the label removed", |s| {
        s.namespace(&cilium)
            .is_some_and(|n| !n.labels.contains_key("io.cilium/mtls-enabled"))
    })
    .await;
    label_namespace(&admin, &cilium, json!({"io.cilium/mtls-enabled": "true"})).await;
    wait_state(&mut rx, "cilium enrolled again", |s| {
        enrolled_on(s, NODE).contains(&format!("{cilium}/web-1"))
    })
    .await;

    // Deleting a scheduled pod is graceful: it stays, terminating and no longer ready,
    // until its kubelet finishes the deletion.
    Api::<Pod>::namespaced(admin.clone(), &cilium)
        .delete("web-1", &DeleteParams::default())
        .await
        .expect("graceful delete");
    let state = wait_state(&mut rx, "web-1 terminating", |s| {
        s.pod(&key(&cilium, "web-1")).is_some_and(|p| !p.ready)
    })
    .await;
    assert!(state.pod(&key(&cilium, "web-2")).is_some_and(|p| p.ready));
    force_delete_pod(&admin, &cilium, "web-1").await;
    wait_state(&mut rx, "web-1 gone", |s| {
        s.pod(&key(&cilium, "web-1")).is_none()
    })
    .await;

    // A deleted namespace goes once its pods are gone (the namespace controller deletes
    // them; the test finishes each as its kubelet would).
    Api::<Namespace>::all(admin.clone())
        .delete(&istio, &DeleteParams::default())
        .await
        .expect("delete namespace");
    poll("db-0 to be terminating", || async {
        let pod = Api::<Pod>::namespaced(admin.clone(), &istio)
            .get_opt("db-0")
            .await
            .expect("get db-0");
        match pod {
            Some(pod) if pod.metadata.deletion_timestamp.is_some() => Some(()),
            Some(_) => None,
            None => Some(()),
        }
    })
    .await;
    match Api::<Pod>::namespaced(admin.clone(), &istio)
        .delete(
            "db-0",
            &DeleteParams {
                grace_period_seconds: Some(0),
                ..DeleteParams::default()
            },
        )
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 404 => {}
        Err(e) => panic!("finishing db-0: {e}"),
    }
    let state = wait_state(&mut rx, "the namespace gone", |s| {
        s.namespace(&istio).is_none()
    })
    .await;
    assert!(state.pods().all(|p| p.namespace != istio));
    assert_eq!(enrolled_on(&state, NODE), names(&[(&plain, "batch")]));
}

fn service(name: &str, spec: serde_json::Value) -> Service {
    from_json(json!({"metadata": {"name": name}, "spec": spec}))
}

async fn create_service(client: &kube::Client, namespace: &str, service: Service) -> Service {
    Api::<Service>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &service)
        .await
        .unwrap_or_else(|e| panic!("Service {namespace}/{:?}: {e}", service.metadata.name))
}

/// The endpoints the agent would send `namespace/name`'s connections to: (IP, [(service
/// port, target port)]).
fn endpoints(state: &ClusterState, namespace: &str, name: &str) -> Vec<(IpAddr, Vec<(u16, u16)>)> {
    let Some(service) = state.service(namespace, name) else {
        return Vec::new();
    };
    state
        .service_endpoints(service)
        .into_iter()
        .map(|e| (e.ip, e.ports.into_iter().collect()))
        .collect()
}

/// The ready addresses the endpoints controller wrote for `namespace/name` (core/v1
/// Endpoints), with their ports.
async fn controller_endpoints(
    client: &kube::Client,
    namespace: &str,
    name: &str,
) -> Option<BTreeSet<(IpAddr, u16)>> {
    let endpoints = Api::<Endpoints>::namespaced(client.clone(), namespace)
        .get_opt(name)
        .await
        .expect("get Endpoints")?;
    let mut ready = BTreeSet::new();
    for subset in endpoints.subsets.unwrap_or_default() {
        for address in subset.addresses.unwrap_or_default() {
            for port in subset.ports.iter().flatten() {
                ready.insert((ip(&address.ip), port.port as u16));
            }
        }
    }
    Some(ready)
}

/// Services: a selector Service's endpoints are its namespace's ready pods with the named
/// target port resolved per pod, the same ones the endpoints controller computes; a
/// terminating pod leaves them; on Kubernetes 1.20 (no EndpointSlice v1) a Service without
/// a selector has none; an ExternalName Service is left out; a deleted Service goes.
#[tokio::test]
async fn services_get_their_endpoints_from_ready_pods() {
    let Some(plane) = control_plane(Options {
        controller_manager: true,
        ..Options::default()
    })
    .await
    else {
        return;
    };
    let admin = plane.client().await.expect("admin client");
    let shop = unique("shop");
    create_namespace(&admin, &shop, &[("io.cilium/mtls-enabled", "true")]).await;
    let web = [("app", "web")];
    create_pod(
        &admin,
        &shop,
        pod("web-1", Some(NODE), "default", &web, &[("http", 8080)]),
    )
    .await;
    create_pod(
        &admin,
        &shop,
        pod(
            "web-2",
            Some(OTHER_NODE),
            "default",
            &web,
            &[("http", 9090)],
        ),
    )
    .await;
    create_pod(
        &admin,
        &shop,
        pod(
            "db-0",
            Some(NODE),
            "default",
            &[("app", "db")],
            &[("http", 5432)],
        ),
    )
    .await;
    set_pod_status(&admin, &shop, "web-1", "10.244.1.21", true).await;
    set_pod_status(&admin, &shop, "web-2", "10.244.2.22", false).await;
    set_pod_status(&admin, &shop, "db-0", "10.244.1.23", true).await;
    let created = create_service(
        &admin,
        &shop,
        service(
            "web",
            json!({"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}),
        ),
    )
    .await;
    let cluster_ip = ip(created
        .spec
        .and_then(|s| s.cluster_ip)
        .as_deref()
        .expect("a ClusterIP was allocated"));
    create_service(
        &admin,
        &shop,
        service(
            "ext",
            json!({"ports": [{"name": "https", "port": 443, "targetPort": 8443}]}),
        ),
    )
    .await;
    create_service(
        &admin,
        &shop,
        service(
            "mail",
            json!({"type": "ExternalName", "externalName": "mail.example.com"}),
        ),
    )
    .await;

    let mut rx = watch_kubernetes(admin.clone(), NODE.into(), fast_retry()).await;
    let state = wait_state(&mut rx, "web with web-1 as its endpoint", |s| {
        endpoints(s, &shop, "web") == [(ip("10.244.1.21"), vec![(80, 8080)])]
    })
    .await;
    let web_service = state.service(&shop, "web").expect("web");
    assert_eq!(
        web_service.cluster_ips,
        [cluster_ip],
        "the allocated ClusterIP"
    );
    assert!(state.service(&shop, "ext").is_some());
    assert!(
        endpoints(&state, &shop, "ext").is_empty(),
        "1.20 serves no EndpointSlice v1: no endpoints for a Service without selector"
    );
    assert!(
        state.service(&shop, "mail").is_none(),
        "ExternalName is left out"
    );
    assert_eq!(state.endpoint_slices().count(), 0);

    // The endpoints controller agrees (named port resolved on the ready pod only).
    let expected: BTreeSet<_> = [(ip("10.244.1.21"), 8080)].into();
    poll("the endpoints controller's Endpoints", || async {
        (controller_endpoints(&admin, &shop, "web").await == Some(expected.clone())).then_some(())
    })
    .await;

    // web-2 becomes ready (on its node, its own named port): both serve.
    set_pod_status(&admin, &shop, "web-2", "10.244.2.22", true).await;
    wait_state(&mut rx, "web-2 serving too", |s| {
        endpoints(s, &shop, "web")
            == [
                (ip("10.244.1.21"), vec![(80, 8080)]),
                (ip("10.244.2.22"), vec![(80, 9090)]),
            ]
    })
    .await;
    let expected: BTreeSet<_> = [(ip("10.244.1.21"), 8080), (ip("10.244.2.22"), 9090)].into();
    poll("the controller to agree", || async {
        (controller_endpoints(&admin, &shop, "web").await == Some(expected.clone())).then_some(())
    })
    .await;

    // web-1 is being deleted: it stops serving at once, before its kubelet is done.
    Api::<Pod>::namespaced(admin.clone(), &shop)
        .delete("web-1", &DeleteParams::default())
        .await
        .expect("graceful delete");
    wait_state(&mut rx, "web-1 no longer an endpoint", |s| {
        endpoints(s, &shop, "web") == [(ip("10.244.2.22"), vec![(80, 9090)])]
    })
    .await;

    // A new port on the Service, targeting a number: every ready endpoint serves it.
    Api::<Service>::namespaced(admin.clone(), &shop)
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"ports": [
                {"name": "http", "port": 80, "targetPort": "http"},
                {"name": "admin", "port": 81, "targetPort": 15000},
            ]}})),
        )
        .await
        .expect("patch web");
    wait_state(&mut rx, "the new port", |s| {
        endpoints(s, &shop, "web") == [(ip("10.244.2.22"), vec![(80, 9090), (81, 15000)])]
    })
    .await;

    Api::<Service>::namespaced(admin.clone(), &shop)
        .delete("web", &DeleteParams::default())
        .await
        .expect("delete web");
    let state = wait_state(&mut rx, "web deleted", |s| {
        s.service(&shop, "web").is_none()
    })
    .await;
    assert!(state.service(&shop, "ext").is_some());
}

fn policies_api(client: &kube::Client, namespace: &str) -> Api<DynamicObject> {
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(POLICY_GROUP, "v1", "AuthorizationPolicy"),
        "authorizationpolicies",
    );
    Api::namespaced_with(client.clone(), namespace, &resource)
}

async fn create_policy(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    spec: serde_json::Value,
) {
    let object: DynamicObject = from_json(json!({
        "apiVersion": format!("{POLICY_GROUP}/v1"),
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }));
    policies_api(client, namespace)
        .create(&PostParams::default(), &object)
        .await
        .unwrap_or_else(|e| panic!("policy {namespace}/{name}: {e}"));
}

/// The policies in force: id -> (action, rule count).
fn policies(state: &ClusterState) -> BTreeMap<String, (Action, usize)> {
    state
        .policies()
        .policies()
        .iter()
        .map(|p| (p.id().to_string(), (p.action(), p.rule_count())))
        .collect()
}

/// AuthorizationPolicies: the agent starts without the CRD and without policies, picks them
/// up once the CRD is installed, enforces valid ones, fails closed on one that was never
/// valid, keeps the last good version of one edited into an invalid one, and drops deleted
/// ones.
#[tokio::test]
async fn authorization_policies_follow_the_crd_and_its_objects() {
    let Some(plane) = control_plane(Options::default()).await else {
        return;
    };
    let admin = plane.client().await.expect("admin client");
    apply_example(&admin, "00-namespace.yaml").await;
    apply_example(&admin, "10-rbac.yaml").await;
    let token = service_account_token(&admin, "zmesh-system", "zmesh-agent", &[], None).await;
    let agent = plane.client_with_token(&token).await.expect("agent client");
    let shop = unique("shop");
    create_namespace(&admin, &shop, &[("istio.io/dataplane-mode", "ambient")]).await;

    let mut rx = watch_kubernetes(agent, NODE.into(), fast_retry()).await;
    assert!(
        rx.borrow_and_update().policies().is_empty(),
        "no CRD, no policies, and the agent runs"
    );

    install_policy_crd(&admin).await;
    let web = format!("cluster.local/ns/{shop}/sa/web");
    create_policy(
        &admin,
        &shop,
        "allow-web",
        json!({
            "selector": {"matchLabels": {"app": "db"}},
            "action": "ALLOW",
            "rules": [{"from": [{"source": {"principals": [web]}}], "to": [{"operation": {"ports": ["5432"]}}]}],
        }),
    )
    .await;
    let allow = format!("{shop}/allow-web");
    let state = wait_state(&mut rx, "the first policy", |s| {
        policies(s).contains_key(&allow)
    })
    .await;
    assert_eq!(policies(&state)[&allow], (Action::Allow, 1));
    let verdict = |state: &ClusterState, principal: &str, port: u16| {
        let labels = BTreeMap::from([("app".to_owned(), "db".to_owned())]);
        let id = zmesh_identity::SpiffeId::parse(principal).expect("a SPIFFE ID");
        state
            .policies()
            .evaluate(&PolicyRequest {
                destination_namespace: &shop,
                destination_labels: Some(&labels),
                source_identity: Some(&id),
                source_ip: Some(ip("10.244.9.9")),
                destination_port: port,
            })
            .is_allowed()
    };
    assert!(verdict(&state, &format!("spiffe://{web}"), 5432));
    assert!(!verdict(&state, &format!("spiffe://{web}"), 80));
    assert!(!verdict(
        &state,
        &format!("spiffe://cluster.local/ns/{shop}/sa/batch"),
        5432
    ));

    // A DENY policy with an HTTP field (outside the L4 subset), never valid: enforced
    // fail-closed, denying everything to the pods it selects.
    create_policy(
        &admin,
        &shop,
        "deny-get",
        json!({
            "selector": {"matchLabels": {"app": "db"}},
            "action": "DENY",
            "rules": [{"to": [{"operation": {"methods": ["GET"]}}]}],
        }),
    )
    .await;
    let deny = format!("{shop}/deny-get");
    let state = wait_state(&mut rx, "the fail-closed stand-in", |s| {
        policies(s).contains_key(&deny)
    })
    .await;
    assert_eq!(policies(&state)[&deny], (Action::Deny, 1));
    assert!(
        !verdict(&state, &format!("spiffe://{web}"), 5432),
        "denied by the stand-in"
    );

    // The valid policy edited into an invalid one: its last good version stays in force.
    policies_api(&admin, &shop)
        .patch(
            "allow-web",
            &PatchParams::default(),
            &Patch::Merge(
                &json!({"spec": {"rules": [{"to": [{"operation": {"paths": ["/admin"]}}]}]}}),
            ),
        )
        .await
        .expect("patch allow-web");
    // Fix the DENY one meanwhile, so that the ALLOW one decides again.
    policies_api(&admin, &shop)
        .patch(
            "deny-get",
            &PatchParams::default(),
            &Patch::Merge(
                &json!({"spec": {"rules": [{"to": [{"operation": {"ports": ["9999"]}}]}]}}),
            ),
        )
        .await
        .expect("patch deny-get");
    let state = wait_state(&mut rx, "deny-get fixed", |s| {
        verdict(s, &format!("spiffe://{web}"), 5432)
    })
    .await;
    assert_eq!(
        policies(&state)[&allow],
        (Action::Allow, 1),
        "last good version"
    );

    // The same objects are served as v1beta1 too; deleting one removes it.
    policies_api(&admin, &shop)
        .delete("deny-get", &DeleteParams::default())
        .await
        .expect("delete deny-get");
    let state = wait_state(&mut rx, "deny-get deleted", |s| {
        !policies(s).contains_key(&deny)
    })
    .await;
    assert_eq!(policies(&state).len(), 1);
}

/// An API server restart mid-watch: the source keeps its last state while the server is
/// away (never publishing a partial or empty one), and catches up afterwards with what
/// changed meanwhile (written through a second API server on the same etcd).
#[tokio::test]
async fn the_source_survives_an_api_server_restart_and_catches_up() {
    let Some(mut plane) = control_plane(Options::default()).await else {
        return;
    };
    let other = plane.add_apiserver().await.expect("a second API server");
    let admin = plane.client().await.expect("admin client");
    let (shop, batch) = (unique("shop"), unique("batch"));
    create_namespace(&admin, &shop, &[("io.cilium/mtls-enabled", "true")]).await;
    create_namespace(&admin, &batch, &[]).await;
    for (ns, name, address) in [
        (&shop, "web-1", "10.244.1.31"),
        (&shop, "web-2", "10.244.1.32"),
        (&batch, "job", "10.244.1.33"),
    ] {
        create_pod(&admin, ns, pod(name, Some(NODE), "default", &[], &[])).await;
        set_pod_status(&admin, ns, name, address, true).await;
    }
    let watched = plane
        .admin_client_on(0)
        .await
        .expect("client of API server 0");
    let mut rx = watch_kubernetes(watched, NODE.into(), fast_retry()).await;
    let before = wait_state(&mut rx, "the three pods", |s| {
        enrolled_on(s, NODE) == names(&[(&shop, "web-1"), (&shop, "web-2")])
            && s.pod(&key(&batch, "job"))
                .is_some_and(|p| !p.ips.is_empty())
    })
    .await;

    // Every state published from now on.
    let published = Arc::new(std::sync::Mutex::new(Vec::new()));
    let recorder = {
        let mut rx = rx.clone();
        let published = published.clone();
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let state = rx.borrow_and_update().clone();
                published
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(state);
            }
        })
    };

    plane.stop_apiserver(0);
    let writer = plane
        .admin_client_on(other)
        .await
        .expect("client of API server 1");
    force_delete_pod(&writer, &shop, "web-1").await;
    label_namespace(
        &writer,
        &batch,
        json!({"istio.io/dataplane-mode": "ambient"}),
    )
    .await;
    create_pod(
        &writer,
        &shop,
        pod("web-3", Some(NODE), "default", &[], &[]),
    )
    .await;
    set_pod_status(&writer, &shop, "web-3", "10.244.1.34", true).await;
    // The source cannot see any of it: it keeps what it had.
    assert_eq!(
        *rx.borrow(),
        before,
        "the last state is kept while the API is away"
    );

    plane
        .start_apiserver(0)
        .await
        .expect("API server 0 restarted");
    let after = wait_state(&mut rx, "the changes made during the outage", |s| {
        enrolled_on(s, NODE) == names(&[(&shop, "web-2"), (&shop, "web-3"), (&batch, "job")])
            && s.pod(&key(&shop, "web-3"))
                .is_some_and(|p| !p.ips.is_empty())
    })
    .await;
    assert!(after.pod(&key(&shop, "web-1")).is_none());

    // Watching again: a change through the restarted server arrives.
    force_delete_pod(&admin, &shop, "web-2").await;
    wait_state(&mut rx, "web-2 deleted", |s| {
        s.pod(&key(&shop, "web-2")).is_none()
    })
    .await;
    recorder.abort();
    // Nothing ever published lost what existed throughout (no partial re-list).
    let published = published.lock().unwrap_or_else(|e| e.into_inner());
    assert!(!published.is_empty());
    for state in published.iter() {
        assert!(state.namespace(&shop).is_some() && state.namespace(&batch).is_some());
        assert!(state.pod(&key(&batch, "job")).is_some(), "{state:#?}");
    }
}

/// What the code under test logs on this thread (the test's runtime is single-threaded,
/// so every task of the source runs here).
#[derive(Clone, Default)]
struct Logs(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn capture(&self) -> tracing::subscriber::DefaultGuard {
        let writer = self.clone();
        tracing::subscriber::set_default(
            tracing_subscriber::fmt()
                .with_writer(move || writer.clone())
                .with_ansi(false)
                .finish(),
        )
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }
}

/// RBAC: with the project's roles the agent and the CA have what they need; with a role
/// missing a verb, the check they run before starting names each missing verb and
/// resource. A role reduced under a running agent is reported as an RBAC error naming the
/// verb and resource, and the last state is kept.
#[tokio::test]
async fn rbac_missing_a_verb_is_named() {
    let logs = Logs::default();
    let _capture = logs.capture();
    let Some(mut plane) = control_plane(Options::default()).await else {
        return;
    };
    let admin = plane.client().await.expect("admin client");
    apply_example(&admin, "00-namespace.yaml").await;
    apply_example(&admin, "10-rbac.yaml").await;
    let agent_token = service_account_token(&admin, "zmesh-system", "zmesh-agent", &[], None).await;
    let agent = plane
        .client_with_token(&agent_token)
        .await
        .expect("agent client");
    let ca_token = service_account_token(&admin, "zmesh-system", "zmesh-ca", &[], None).await;
    let ca = plane.client_with_token(&ca_token).await.expect("CA client");
    let ca_needs = [access::CA_PLACEMENT, access::CA_TOKEN_REVIEW].concat();

    // The project's roles are enough (RBAC reaches the authorizer within moments).
    poll("the agent's role to be in force", || async {
        check_access(&agent, access::AGENT).await.ok()
    })
    .await;
    poll("the CA's role to be in force", || async {
        check_access(&ca, &ca_needs).await.ok()
    })
    .await;

    // An agent already running with the full role.
    let shop = unique("shop");
    create_namespace(&admin, &shop, &[("io.cilium/mtls-enabled", "true")]).await;
    create_pod(&admin, &shop, pod("web-1", Some(NODE), "default", &[], &[])).await;
    let mut rx = watch_kubernetes(agent.clone(), NODE.into(), fast_retry()).await;
    let before = wait_state(&mut rx, "web-1", |s| s.pod(&key(&shop, "web-1")).is_some()).await;

    // The agent's role loses `watch` on pods and `list` on policies.
    let roles = Api::<ClusterRole>::all(admin.clone());
    roles
        .patch(
            "zmesh-agent",
            &PatchParams::default(),
            &Patch::Merge(&json!({"rules": [
                {"apiGroups": [""], "resources": ["namespaces", "services"], "verbs": ["get", "list", "watch"]},
                {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]},
                {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]},
                {"apiGroups": [POLICY_GROUP], "resources": ["authorizationpolicies"], "verbs": ["get", "watch"]},
            ]})),
        )
        .await
        .expect("reduce the agent's role");
    let error = poll("the reduced role to be in force", || async {
        match check_access(&agent, access::AGENT).await {
            Err(e @ AccessError::Denied(_)) if e.denied().len() == 2 => Some(e),
            _ => None,
        }
    })
    .await;
    let names: Vec<String> = error.denied().iter().map(ToString::to_string).collect();
    assert_eq!(
        names,
        ["watch pods", "list authorizationpolicies.security.istio.io"]
    );
    let message = error.to_string();
    assert!(
        message.contains("may not watch pods, list authorizationpolicies.security.istio.io"),
        "{message}"
    );

    // The running agent's open watches outlive the change; an API server restart makes
    // it ask again, and be refused.
    plane.stop_apiserver(0);
    plane
        .start_apiserver(0)
        .await
        .expect("API server restarted");
    let denied = "cannot watch resource \"pods\"";
    poll("the agent to report the RBAC denial", || async {
        logs.text()
            .lines()
            .any(|l| {
                l.contains("ERROR") && l.contains("RBAC denies reading pods") && l.contains(denied)
            })
            .then_some(())
    })
    .await;
    // What it may no longer read is kept as last seen; namespaces and Services are still
    // watched (the API server creates `default` and its Service at start, in the race).
    let now = rx.borrow().clone();
    assert_eq!(
        now.pods().collect::<Vec<_>>(),
        before.pods().collect::<Vec<_>>(),
        "the last pods are kept"
    );
    assert_eq!(
        now.policies(),
        before.policies(),
        "the last policies are kept"
    );

    // The CA's role loses TokenReview.
    roles
        .patch(
            "zmesh-ca",
            &PatchParams::default(),
            &Patch::Merge(&json!({"rules": [
                {"apiGroups": [""], "resources": ["namespaces", "pods"], "verbs": ["get", "list", "watch"]},
            ]})),
        )
        .await
        .expect("reduce the CA's role");
    let error = poll("the CA's reduced role to be in force", || async {
        check_access(&ca, &ca_needs).await.err()
    })
    .await;
    assert!(
        error
            .to_string()
            .contains("may not create tokenreviews.authentication.k8s.io"),
        "{error}"
    );
    check_access(&ca, access::CA_PLACEMENT)
        .await
        .expect("placement alone is still allowed");

    // The real commands refuse to start, with that message.
    let dir = tempfile::tempdir().expect("a temporary directory");
    let kubeconfig = |name: &str, token: &str| {
        let path = dir.path().join(format!("{name}.kubeconfig"));
        std::fs::write(&path, plane.kubeconfig_yaml(0, token)).expect("kubeconfig");
        path
    };
    let agent_config = kubeconfig("agent", &agent_token);
    let stderr = refused_start(
        zmesh(&agent_config)
            .args([
                "agent",
                "--kubernetes",
                "--node",
                NODE,
                "--data-plane",
                "ztunnel",
            ])
            .arg("--zds-socket")
            .arg(dir.path().join("zds.sock"))
            .arg("--admin-socket")
            .arg(dir.path().join("admin.sock")),
    )
    .await;
    assert!(
        stderr.contains("may not watch pods, list authorizationpolicies.security.istio.io"),
        "{stderr}"
    );
    let state_dir = dir.path().join("ca");
    let init = zmesh(&agent_config)
        .args(["ca", "init", "--state-dir"])
        .arg(&state_dir)
        .output()
        .await
        .expect("zmesh ca init");
    assert!(init.status.success(), "{init:?}");
    let stderr = refused_start(
        zmesh(&kubeconfig("ca", &ca_token))
            .args(["ca", "serve", "--kubernetes", "--bearer", "kubernetes"])
            .args(["--listen", "127.0.0.1:0", "--state-dir"])
            .arg(&state_dir),
    )
    .await;
    assert!(
        stderr.contains("may not create tokenreviews.authentication.k8s.io"),
        "{stderr}"
    );
}

/// The `zmesh` binary with `kubeconfig` as its Kubernetes configuration.
fn zmesh(kubeconfig: &std::path::Path) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_zmesh"));
    command
        .env("KUBECONFIG", kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .kill_on_drop(true);
    command
}

/// Runs a command that must exit with an error on its own; returns its standard error.
async fn refused_start(command: &mut tokio::process::Command) -> String {
    let output = tokio::time::timeout(DEADLINE, command.output())
        .await
        .expect("the command exits by itself")
        .expect("the command runs");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!output.status.success(), "it started: {stderr}");
    eprintln!("refused to start: {stderr}");
    stderr
}

/// An agent pod of the DaemonSet on `node` (in zmesh-system, as the agent's account).
async fn agent_pod(client: &kube::Client, name: &str, node: &str) -> Pod {
    create_pod(
        client,
        "zmesh-system",
        pod(
            name,
            Some(node),
            "zmesh-agent",
            &[("app", "zmesh-agent")],
            &[],
        ),
    )
    .await
}

fn rejected(result: Result<NodeName, BearerError>) -> String {
    match result {
        Err(BearerError::Rejected(reason)) => {
            eprintln!("refused: {reason}");
            reason
        }
        other => panic!("not rejected: {other:?}"),
    }
}

/// Claims as the API server (1.20) writes them into a pod-bound token of
/// zmesh-system/zmesh-agent, valid from `from` to `until` (Unix seconds).
fn agent_claims(
    account_uid: &str,
    pod: &Pod,
    audience: &str,
    from: i64,
    until: i64,
) -> serde_json::Value {
    json!({
        "aud": [audience],
        "exp": until,
        "iat": from,
        "nbf": from,
        "iss": control_plane::ISSUER,
        "sub": "system:serviceaccount:zmesh-system:zmesh-agent",
        "kubernetes.io": {
            "namespace": "zmesh-system",
            "serviceaccount": {"name": "zmesh-agent", "uid": account_uid},
            "pod": {"name": pod.metadata.name, "uid": pod.metadata.uid},
        },
    })
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The CA's TokenReview authentication (as `zmesh ca serve --bearer kubernetes` builds it,
/// the CA running as its own ServiceAccount with the project's RBAC) with tokens the API
/// server really issued: the agent's projected token, bound to its pod, is accepted for the
/// pod's node (Kubernetes 1.20 names no node in the review, so the node is read from the
/// pod); a token for another audience, of another account, bound to no pod, the legacy
/// Secret token, an expired token, the token of a deleted or replaced pod, and the token of
/// a deleted account are refused; an unreachable API server is "unavailable".
#[tokio::test]
async fn token_review_with_real_service_account_tokens() {
    let Some(mut plane) = control_plane(Options {
        controller_manager: true,
        ..Options::default()
    })
    .await
    else {
        return;
    };
    let admin = plane.client().await.expect("admin client");
    apply_example(&admin, "00-namespace.yaml").await;
    apply_example(&admin, "10-rbac.yaml").await;
    let ca_token = service_account_token(&admin, "zmesh-system", "zmesh-ca", &[], None).await;
    let ca = plane.client_with_token(&ca_token).await.expect("CA client");
    poll("the CA's role to be in force", || async {
        check_access(&ca, access::CA_TOKEN_REVIEW).await.ok()
    })
    .await;
    let validator = TokenReviewValidator::new(
        ca,
        DEFAULT_AUDIENCE,
        DEFAULT_AGENT_SERVICE_ACCOUNT.parse().expect("account"),
    );
    let agent_a = agent_pod(&admin, "zmesh-agent-a", NODE).await;

    // The agent's projected token: for the CA's audience, bound to its pod.
    let token = service_account_token(
        &admin,
        "zmesh-system",
        "zmesh-agent",
        &[DEFAULT_AUDIENCE],
        Some(&agent_a),
    )
    .await;
    let node = validator.validate(&token).await.expect("the agent's token");
    assert_eq!(node.as_str(), NODE);

    // For the API server's audience (what a pod gets by default): refused.
    let reason = rejected(
        validator
            .validate(
                &service_account_token(&admin, "zmesh-system", "zmesh-agent", &[], Some(&agent_a))
                    .await,
            )
            .await,
    );
    assert!(reason.contains("did not authenticate"), "{reason}");
    // Another account's token, bound to its own pod, for our audience: refused.
    let shop = unique("shop");
    create_namespace(&admin, &shop, &[]).await;
    create_service_account(&admin, &shop, "web").await;
    let web = create_pod(&admin, &shop, pod("web-1", Some(NODE), "web", &[], &[])).await;
    let reason = rejected(
        validator
            .validate(
                &service_account_token(&admin, &shop, "web", &[DEFAULT_AUDIENCE], Some(&web)).await,
            )
            .await,
    );
    assert!(
        reason.contains("not the node agent's service account zmesh-system/zmesh-agent"),
        "{reason}"
    );
    // The agent's account, our audience, but bound to no pod: no node to give it.
    let reason = rejected(
        validator
            .validate(
                &service_account_token(
                    &admin,
                    "zmesh-system",
                    "zmesh-agent",
                    &[DEFAULT_AUDIENCE],
                    None,
                )
                .await,
            )
            .await,
    );
    assert!(reason.contains("names no node and no pod"), "{reason}");
    // The legacy Secret token the tokens controller made for the account: no audience of
    // ours, refused.
    let secrets = Api::<Secret>::namespaced(admin.clone(), "zmesh-system");
    let legacy = poll("the agent account's token Secret", || async {
        let list = secrets
            .list(&Default::default())
            .await
            .expect("list secrets");
        list.items.into_iter().find_map(|secret| {
            let annotations = secret.metadata.annotations.unwrap_or_default();
            (secret.type_.as_deref() == Some("kubernetes.io/service-account-token")
                && annotations
                    .get("kubernetes.io/service-account.name")
                    .map(String::as_str)
                    == Some("zmesh-agent"))
            .then(|| secret.data?.get("token").cloned())
            .flatten()
        })
    })
    .await;
    let legacy = String::from_utf8(legacy.0).expect("a text token");
    let reason = rejected(validator.validate(&legacy).await);
    assert!(reason.contains("did not authenticate"), "{reason}");

    // Tokens signed with the cluster's key but not issued by the API server: first one it
    // would issue (so the forgery itself is right), then the same, expired.
    let account_uid = Api::<ServiceAccount>::namespaced(admin.clone(), "zmesh-system")
        .get("zmesh-agent")
        .await
        .expect("the agent's account")
        .metadata
        .uid
        .expect("a UID");
    let t = now();
    let valid = plane
        .sign_service_account_token(&agent_claims(
            &account_uid,
            &agent_a,
            DEFAULT_AUDIENCE,
            t - 60,
            t + 600,
        ))
        .expect("sign");
    assert_eq!(
        validator
            .validate(&valid)
            .await
            .expect("a well-formed token")
            .as_str(),
        NODE
    );
    let expired = plane
        .sign_service_account_token(&agent_claims(
            &account_uid,
            &agent_a,
            DEFAULT_AUDIENCE,
            t - 7200,
            t - 3600,
        ))
        .expect("sign");
    let reason = rejected(validator.validate(&expired).await);
    assert!(reason.contains("expired"), "{reason}");

    // The agent pod is deleted: its token dies with it. A new pod of the same name on
    // another node does not revive it; the new pod's token names the new node.
    // The API server checks the bound pod against its informer cache, which may lag
    // behind the deletion: the CA reads the pod itself, so that the refusal is immediate.
    force_delete_pod(&admin, "zmesh-system", "zmesh-agent-a").await;
    let reason = rejected(validator.validate(&token).await);
    assert!(
        reason.contains("did not authenticate")
            || reason.contains("the token's pod zmesh-system/zmesh-agent-a no longer exists"),
        "{reason}"
    );
    let replaced = agent_pod(&admin, "zmesh-agent-a", OTHER_NODE).await;
    let reason = rejected(validator.validate(&token).await);
    assert!(
        reason.contains("did not authenticate")
            || reason.contains("the token's pod zmesh-system/zmesh-agent-a was replaced"),
        "{reason}"
    );
    let token = service_account_token(
        &admin,
        "zmesh-system",
        "zmesh-agent",
        &[DEFAULT_AUDIENCE],
        Some(&replaced),
    )
    .await;
    assert_eq!(
        validator.validate(&token).await.expect("new pod").as_str(),
        OTHER_NODE
    );

    // The account is deleted: none of its tokens is valid any more.
    Api::<ServiceAccount>::namespaced(admin.clone(), "zmesh-system")
        .delete("zmesh-agent", &DeleteParams::default())
        .await
        .expect("delete the account");
    // (Through the API server's cache: within moments.)
    let reason = poll("the deleted account's token to be refused", || async {
        match validator.validate(&token).await {
            Err(BearerError::Rejected(reason)) => Some(reason),
            _ => None,
        }
    })
    .await;
    assert!(reason.contains("did not authenticate"), "{reason}");

    // No API server: no verdict.
    plane.stop_apiserver(0);
    match validator.validate(&token).await {
        Err(BearerError::Unavailable(reason)) => {
            assert!(reason.contains("TokenReview"), "{reason}")
        }
        other => panic!("an unreachable API must not decide: {other:?}"),
    }
}

/// A gRPC refusal's code name, or the chain issued.
async fn request_certificate(client: &IstioCaClient, id: &str) -> Result<Vec<String>, String> {
    let csr = new_key_and_csr(&SpiffeId::parse(id).expect("a SPIFFE ID"))
        .expect("a CSR")
        .1;
    client
        .create_certificate(&csr, Some(id), 3600)
        .await
        .map_err(|status| format!("{:?}: {}", status.code(), status.message()))
}

/// The whole CA as `zmesh ca serve --kubernetes --bearer kubernetes` assembles it, running
/// as its ServiceAccount with the project's RBAC against the real API server: agents
/// authenticate with their projected tokens (read from a file, as the agent does) and get
/// only identities of pods scheduled on their own node, following pod deletions.
#[tokio::test]
async fn the_ca_issues_only_to_the_node_of_the_agents_token() {
    let Some(plane) = control_plane(Options::default()).await else {
        return;
    };
    let admin = plane.client().await.expect("admin client");
    apply_example(&admin, "00-namespace.yaml").await;
    apply_example(&admin, "10-rbac.yaml").await;
    let shop = unique("shop");
    create_namespace(&admin, &shop, &[("io.cilium/mtls-enabled", "true")]).await;
    for account in ["web", "db"] {
        create_service_account(&admin, &shop, account).await;
    }
    create_pod(&admin, &shop, pod("web-1", Some(NODE), "web", &[], &[])).await;
    create_pod(&admin, &shop, pod("db-0", Some(OTHER_NODE), "db", &[], &[])).await;
    let agent_a = agent_pod(&admin, "zmesh-agent-a", NODE).await;
    let agent_b = agent_pod(&admin, "zmesh-agent-b", OTHER_NODE).await;

    let ca_token = service_account_token(&admin, "zmesh-system", "zmesh-ca", &[], None).await;
    let client = plane.client_with_token(&ca_token).await.expect("CA client");
    let needed = [access::CA_PLACEMENT, access::CA_TOKEN_REVIEW].concat();
    poll("the CA's role to be in force", || async {
        check_access(&client, &needed).await.ok()
    })
    .await;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let store = CaStore::init(
        &dir.path().join("ca"),
        &InitOptions {
            trust_domain: TrustDomain::default(),
            policy: CaPolicy::default(),
        },
    )
    .expect("CA init");
    let state = watch_placement(client.clone(), String::new(), fast_retry()).await;
    let review = TokenReviewValidator::new(
        client,
        DEFAULT_AUDIENCE,
        DEFAULT_AGENT_SERVICE_ACCOUNT.parse().expect("account"),
    );
    let server = CaServer::bind(
        store.clone(),
        ServerOptions {
            listen: "127.0.0.1:0".parse().expect("an address"),
            serving_names: vec!["127.0.0.1".into()],
            placement: Arc::new(ClusterPlacement::new(state)),
            bearer: Some(Arc::new(CachedBearer::new(review, DEFAULT_CACHE_TTL))),
            cluster_id: DEFAULT_CLUSTER_ID.into(),
        },
    )
    .await
    .expect("CA bind");
    let addr = server.local_addr().expect("CA address").to_string();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.serve(async {
        let _ = stopped.await;
    }));
    let roots = dir.path().join("roots.pem");
    std::fs::write(&roots, store.load().expect("CA").bundle_pem()).expect("roots");
    let agent = |name: &str, token: String| {
        let token_file = dir.path().join(format!("{name}.token"));
        std::fs::write(&token_file, token).expect("token file");
        CaTokenCredential {
            token_file,
            ca_bundle: roots.clone(),
        }
        .client(&addr)
        .expect("CA client")
        .0
    };
    let token = |pod: Pod, audiences: &'static [&'static str]| {
        let admin = admin.clone();
        async move {
            service_account_token(&admin, "zmesh-system", "zmesh-agent", audiences, Some(&pod))
                .await
        }
    };
    let node_a = agent("node-a", token(agent_a.clone(), &[DEFAULT_AUDIENCE]).await);
    let node_b = agent("node-b", token(agent_b, &[DEFAULT_AUDIENCE]).await);
    let web_id = format!("spiffe://cluster.local/ns/{shop}/sa/web");
    let db_id = format!("spiffe://cluster.local/ns/{shop}/sa/db");

    let chain = request_certificate(&node_a, &web_id)
        .await
        .expect("web on node-a");
    assert_eq!(chain.len(), 3, "leaf, intermediate, roots");
    let refused = request_certificate(&node_a, &db_id)
        .await
        .expect_err("db is on node-b");
    assert!(refused.starts_with("PermissionDenied"), "{refused}");
    request_certificate(&node_b, &db_id)
        .await
        .expect("db on node-b");
    let refused = request_certificate(&node_b, &web_id)
        .await
        .expect_err("web is on node-a");
    assert!(refused.starts_with("PermissionDenied"), "{refused}");
    // The agent's pod token for the API server's audience is not a CA credential.
    let wrong = agent("wrong", token(agent_a, &[]).await);
    let refused = request_certificate(&wrong, &web_id)
        .await
        .expect_err("wrong audience");
    assert!(refused.starts_with("Unauthenticated"), "{refused}");

    // web-1 goes away: node-a gets its identity no more.
    force_delete_pod(&admin, &shop, "web-1").await;
    poll("web's identity to be refused on node-a", || async {
        match request_certificate(&node_a, &web_id).await {
            Err(refused) if refused.starts_with("PermissionDenied") => Some(()),
            _ => None,
        }
    })
    .await;
    let _ = stop.send(());
    tokio::time::timeout(DEADLINE, serving)
        .await
        .expect("the CA stops")
        .expect("the CA task")
        .expect("the CA served");
}

/// The harness looks for the binaries where scripts/control-plane.sh puts them.
#[test]
fn the_script_builds_the_version_the_harness_looks_for() {
    let script = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/control-plane.sh"),
    )
    .expect("scripts/control-plane.sh");
    let line = format!("KUBE_VERSION={}\n", control_plane::KUBE_VERSION);
    assert!(script.contains(&line), "the script does not build {line}");
    assert!(script.contains("CACHE=$CACHE_ROOT/kubernetes-$KUBE_VERSION\n"));
    assert!(script.contains("${ZMESH_KUBE_CACHE:-/var/cache/zmesh}"));
}

fn sample_status(node: &str) -> zmesh_cluster::agent_status::AgentStatus {
    serde_json::from_value(json!({
        "node": node, "version": "0.1.0", "git_commit": "abc", "ready": true,
        "mode": "strict", "data_plane": "zmesh",
        "kernel": {"release": "6.18.0", "tc_attach": "tcx", "interfaces": 3},
        "enrolled_pods": 4, "pods_waiting": 0,
        "certificates": {"total": 4, "valid": 4, "unusable": 0, "failing": 0,
                         "next_expiry": "2030-01-01T00:00:00Z"},
        "problems": [], "updated": "2026-12-06T10:00:00Z"
    }))
    .unwrap()
}

/// Agents report their status in Leases, with the project's RBAC, and `zmesh status
/// --kubernetes` reads them: a reporting agent, a stale one (its Lease not renewed), the
/// enrolled namespaces; exit 1 while one is stale.
#[tokio::test]
async fn agents_report_status_in_leases_that_zmesh_status_reads() {
    let Some(plane) = control_plane(Options::default()).await else {
        return;
    };
    let admin = plane.client().await.expect("admin client");
    apply_example(&admin, "00-namespace.yaml").await;
    apply_example(&admin, "10-rbac.yaml").await;
    let token = service_account_token(&admin, "zmesh-system", "zmesh-agent", &[], None).await;
    let agent = plane.client_with_token(&token).await.expect("agent client");
    let shop = unique("shop");
    create_namespace(&admin, &shop, &[("istio.io/dataplane-mode", "ambient")]).await;

    // The agent's publisher, as the agent's ServiceAccount.
    let (reports, updates) = watch::channel(None);
    let publisher = tokio::spawn(zmesh_cluster::agent_status::publish(
        agent,
        "zmesh-system".into(),
        updates,
    ));
    let sent = sample_status("node-a");
    reports.send(Some(sent.clone())).unwrap();
    let listed = poll("the agent's Lease", || async {
        let all = zmesh_cluster::agent_status::list(admin.clone(), "zmesh-system")
            .await
            .ok()?;
        all.into_iter().find(|a| a.status.is_some())
    })
    .await;
    assert_eq!(listed.node, "node-a");
    assert_eq!(listed.status.as_ref(), Some(&sent));
    assert!(listed.is_current(std::time::SystemTime::now()));

    let status = |kubeconfig: &std::path::Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_zmesh"))
            .args(["status", "--kubernetes", "-n", "zmesh-system", "-o", "json"])
            .env("KUBECONFIG", kubeconfig)
            .output()
            .unwrap()
    };
    let out = status(&plane.admin_kubeconfig());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert!(out.status.success(), "{report:#}");
    assert_eq!(report["healthy"], true);
    assert_eq!(report["agents"][0]["node"], "node-a");
    assert_eq!(report["agents"][0]["state"], "reporting");
    assert_eq!(report["agents"][0]["status"]["kernel"]["tc_attach"], "tcx");
    let enrolled = report["enrolled_namespaces"].as_array().unwrap();
    assert!(enrolled.iter().any(|ns| ns == &json!(shop)), "{report:#}");

    // An agent that stopped reporting: its Lease is an hour old.
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(admin.clone(), "zmesh-system");
    let mut stale = json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "zmesh-agent-node-b", "namespace": "zmesh-system",
                     "labels": {"app.kubernetes.io/name": "zmesh-agent"},
                     "annotations": {"zmesh.io/agent-status":
                         serde_json::to_string(&sample_status("node-b")).unwrap()}},
        "spec": {"holderIdentity": "node-b", "leaseDurationSeconds": 30,
                 "renewTime": "2026-12-06T09:00:00.000000Z"}
    });
    let hour_ago =
        k8s_openapi::jiff::Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_hours(1);
    stale["spec"]["renewTime"] = json!(hour_ago.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string());
    leases
        .create(
            &PostParams::default(),
            &serde_json::from_value(stale).unwrap(),
        )
        .await
        .unwrap();
    let out = status(&plane.admin_kubeconfig());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        !out.status.success(),
        "a stale agent is unhealthy: {report:#}"
    );
    assert_eq!(report["agents"][1]["node"], "node-b");
    assert_eq!(report["agents"][1]["state"], "stale");
    assert!(
        report["agents"][1]["reason"]
            .as_str()
            .unwrap()
            .starts_with("last report 1h"),
        "{report:#}"
    );
    drop(reports);
    publisher.await.unwrap();
}
