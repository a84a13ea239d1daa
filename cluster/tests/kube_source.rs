//! The Kubernetes cluster state source against recorded API server responses (list, watch
//! events, a 410 Gone that forces a re-list, and API outages), for Namespaces, Pods,
//! Services, EndpointSlices (including an API server that does not serve them) and Istio
//! AuthorizationPolicies (including a CRD that is not installed). The fake below replays
//! responses in tests/fixtures/kube (the Service and EndpointSlice ones are written in the
//! API server's list/watch format; the plain-text 404 is what a real 1.20 API server
//! answers). The same source against a real API server: tests/kube_apiserver.rs at the
//! workspace root.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use tokio::sync::{mpsc, watch};
use zmesh_cluster::kube_source::{watch_kubernetes, watch_placement, RetryPolicy};
use zmesh_cluster::state::ClusterState;
use zmesh_proxy::policy::{Action, Denial, Request as PolicyRequest, Verdict};

type Body = BoxBody<Bytes, Infallible>;

enum Reply {
    Json(StatusCode, &'static str),
    /// A watch stream whose lines the test sends one by one; it ends when the sender drops.
    Stream(mpsc::UnboundedReceiver<String>),
}

/// The resources, as the fake names them: the path after `/api/v1/` or `/apis/`.
const POLICIES_V1: &str = "security.istio.io/v1/authorizationpolicies";
const POLICIES_V1BETA1: &str = "security.istio.io/v1beta1/authorizationpolicies";
const SERVICES: &str = "services";
const SLICES: &str = "discovery.k8s.io/v1/endpointslices";

/// A fixed JSON reply: status and body.
type Canned = (StatusCode, &'static str);

#[derive(Default)]
struct FakeApi {
    /// Replies per (resource, is_watch), consumed in order. When none is left, the
    /// default reply for the resource is used if there is one; else lists fail with 500
    /// and watches hang open.
    script: Mutex<HashMap<(String, bool), VecDeque<Reply>>>,
    defaults: Mutex<HashMap<(String, bool), Canned>>,
    /// (resource, is_watch) of every request, in order.
    requests: Mutex<Vec<(String, bool)>>,
}

impl FakeApi {
    fn push(&self, resource: &str, watch: bool, reply: Reply) {
        self.script
            .lock()
            .unwrap()
            .entry((resource.to_owned(), watch))
            .or_default()
            .push_back(reply);
    }

    fn watch_stream(&self, resource: &str) -> mpsc::UnboundedSender<String> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.push(resource, true, Reply::Stream(rx));
        tx
    }

    /// Answers every request for `resource` with this once the script is used up.
    fn default_reply(&self, resource: &str, watch: bool, status: StatusCode, body: &'static str) {
        self.defaults
            .lock()
            .unwrap()
            .insert((resource.to_owned(), watch), (status, body));
    }

    fn count(&self, resource: &str, watch: bool) -> usize {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|(r, w)| r == resource && *w == watch)
            .count()
    }

    fn serve(&self, request: Request<kube::client::Body>) -> Response<Body> {
        let path = request.uri().path();
        let resource = path
            .strip_prefix("/api/v1/")
            .or_else(|| path.strip_prefix("/apis/"))
            .unwrap_or(path)
            .to_owned();
        let is_watch = request.uri().query().unwrap_or("").contains("watch=true");
        let key = (resource, is_watch);
        self.requests.lock().unwrap().push(key.clone());
        let reply = self
            .script
            .lock()
            .unwrap()
            .get_mut(&key)
            .and_then(VecDeque::pop_front)
            .or_else(|| {
                let defaults = self.defaults.lock().unwrap();
                let (status, body) = defaults.get(&key)?;
                Some(Reply::Json(*status, body))
            });
        match reply {
            Some(Reply::Json(status, body)) => json(status, body),
            Some(Reply::Stream(lines)) => {
                let body =
                    StreamBody::new(futures::stream::unfold(lines, |mut lines| async move {
                        let line = lines.recv().await?;
                        Some((Ok(Frame::data(Bytes::from(line + "\n"))), lines))
                    }));
                Response::new(BodyExt::boxed(body))
            }
            None if is_watch => {
                Response::new(BodyExt::boxed(StreamBody::new(futures::stream::pending::<
                    Result<Frame<Bytes>, Infallible>,
                >())))
            }
            None => json(StatusCode::INTERNAL_SERVER_ERROR, STATUS_500),
        }
    }
}

fn json(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())).boxed());
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    response
}

const NAMESPACES_LIST: &str = include_str!("fixtures/kube/namespaces-list.json");
const NAMESPACES_WATCH: &str = include_str!("fixtures/kube/namespaces-watch.jsonl");
const PODS_LIST: &str = include_str!("fixtures/kube/pods-list.json");
const PODS_WATCH: &str = include_str!("fixtures/kube/pods-watch.jsonl");
const PODS_LIST_AFTER_GONE: &str = include_str!("fixtures/kube/pods-list-after-gone.json");
const STATUS_500: &str = include_str!("fixtures/kube/status-500.json");
const STATUS_404: &str = include_str!("fixtures/kube/status-404.json");
/// What a real API server (1.20) answers for a group or version it does not serve: plain
/// text, not a Status.
const NOT_SERVED_404: &str = include_str!("fixtures/kube/not-served-404.txt");
const STATUS_403_POLICIES: &str = include_str!("fixtures/kube/status-403-policies.json");
const POLICIES_LIST: &str = include_str!("fixtures/kube/policies-list.json");
const POLICIES_LIST_V1BETA1: &str = include_str!("fixtures/kube/policies-list-v1beta1.json");
const POLICIES_WATCH: &str = include_str!("fixtures/kube/policies-watch.jsonl");
const SERVICES_LIST: &str = include_str!("fixtures/kube/services-list.json");
const SERVICES_LIST_EMPTY: &str = include_str!("fixtures/kube/services-list-empty.json");
const SERVICES_WATCH: &str = include_str!("fixtures/kube/services-watch.jsonl");
const SLICES_LIST: &str = include_str!("fixtures/kube/endpointslices-list.json");
const SLICES_LIST_EMPTY: &str = include_str!("fixtures/kube/endpointslices-list-empty.json");
const SLICES_WATCH: &str = include_str!("fixtures/kube/endpointslices-watch.jsonl");

fn client(api: Arc<FakeApi>) -> kube::Client {
    let service = tower::service_fn(move |request| {
        let api = api.clone();
        async move { Ok::<_, Infallible>(api.serve(request)) }
    });
    kube::Client::new(service, "default")
}

fn pod_names(state: &ClusterState) -> BTreeSet<String> {
    state.pods().map(|p| p.name.clone()).collect()
}

/// Waits for the next published state that satisfies `done`, returning every state seen.
async fn wait_for(
    rx: &mut watch::Receiver<Arc<ClusterState>>,
    done: impl Fn(&ClusterState) -> bool,
) -> Vec<Arc<ClusterState>> {
    let mut seen = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let state = rx.borrow_and_update().clone();
            seen.push(state.clone());
            if done(&state) {
                return;
            }
            rx.changed().await.expect("the source stopped");
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out; last state: {:?}", seen.last()));
    seen
}

fn lines(jsonl: &str) -> Vec<String> {
    jsonl
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect()
}

/// Neither version of the AuthorizationPolicy API is served (the group is unknown: the
/// API server's plain-text 404).
fn crd_not_installed(api: &FakeApi) {
    for resource in [POLICIES_V1, POLICIES_V1BETA1] {
        api.default_reply(resource, false, StatusCode::NOT_FOUND, NOT_SERVED_404);
    }
}

/// Every list of Services and EndpointSlices is empty (unless the test scripts one).
fn no_services(api: &FakeApi) {
    api.default_reply(SERVICES, false, StatusCode::OK, SERVICES_LIST_EMPTY);
    api.default_reply(SLICES, false, StatusCode::OK, SLICES_LIST_EMPTY);
}

/// Namespaces and pods list fine and their watches stay quiet; no Services.
fn cluster_without_changes(api: &FakeApi) {
    no_services(api);
    api.push(
        "namespaces",
        false,
        Reply::Json(StatusCode::OK, NAMESPACES_LIST),
    );
    api.push("pods", false, Reply::Json(StatusCode::OK, PODS_LIST));
}

fn fast_retry() -> RetryPolicy {
    RetryPolicy {
        initial: Duration::from_millis(5),
        max: Duration::from_millis(20),
    }
}

async fn start(api: &Arc<FakeApi>) -> watch::Receiver<Arc<ClusterState>> {
    tokio::time::timeout(
        Duration::from_secs(10),
        watch_kubernetes(client(api.clone()), "node1".into(), fast_retry()),
    )
    .await
    .expect("the source becomes ready")
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

fn expect(entries: &[(&str, Action, usize)]) -> BTreeMap<String, (Action, usize)> {
    entries
        .iter()
        .map(|(id, action, rules)| (id.to_string(), (*action, *rules)))
        .collect()
}

/// The verdict for a connection from `principal` to a pod of `namespace` with `labels`.
fn verdict(
    state: &ClusterState,
    namespace: &str,
    labels: &[(&str, &str)],
    principal: &str,
) -> Verdict {
    let labels: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let id = zmesh_identity::SpiffeId::parse(principal).unwrap();
    state.policies().evaluate(&PolicyRequest {
        destination_namespace: namespace,
        destination_labels: Some(&labels),
        source_identity: Some(&id),
        source_ip: Some("10.9.9.9".parse().unwrap()),
        destination_port: 8080,
    })
}

const WEB_SA: &str = "spiffe://cluster.local/ns/shop/sa/web";
const BATCH_SA: &str = "spiffe://cluster.local/ns/batch/sa/job";

#[tokio::test]
async fn list_watch_gone_and_outages() {
    let api = Arc::new(FakeApi::default());
    api.push(
        "namespaces",
        false,
        Reply::Json(StatusCode::OK, NAMESPACES_LIST),
    );
    let namespace_events = api.watch_stream("namespaces");
    // The API server is down when the agent starts: nothing may be published until it is
    // back and both resources are fully listed.
    api.push(
        "pods",
        false,
        Reply::Json(StatusCode::INTERNAL_SERVER_ERROR, STATUS_500),
    );
    api.push(
        "pods",
        false,
        Reply::Json(StatusCode::INTERNAL_SERVER_ERROR, STATUS_500),
    );
    api.push("pods", false, Reply::Json(StatusCode::OK, PODS_LIST));
    let pod_events = api.watch_stream("pods");
    api.push(
        "pods",
        false,
        Reply::Json(StatusCode::OK, PODS_LIST_AFTER_GONE),
    );
    let pod_events_after_relist = api.watch_stream("pods");
    crd_not_installed(&api);
    no_services(&api);

    let retry = RetryPolicy {
        initial: Duration::from_millis(5),
        max: Duration::from_millis(20),
    };
    let mut rx = tokio::time::timeout(
        Duration::from_secs(10),
        watch_kubernetes(client(api.clone()), "node1".into(), retry),
    )
    .await
    .expect("the source becomes ready once the API answers");
    assert_eq!(
        api.count("pods", false),
        3,
        "two failed lists, then one good"
    );

    // The first snapshot is the complete listing.
    let state = rx.borrow_and_update().clone();
    assert_eq!(
        pod_names(&state),
        BTreeSet::from(["web-7d9f".into(), "api-5c4b".into(), "pending-0".into()])
    );
    let local: Vec<_> = state.enrolled_on("node1").map(|p| p.name.clone()).collect();
    assert_eq!(local, ["web-7d9f"]);
    let web = state.pods().find(|p| p.name == "web-7d9f").unwrap();
    assert_eq!(web.service_account, "web");
    assert_eq!(web.uid.as_deref(), Some("a1"));
    assert_eq!(
        web.netns_path.as_deref(),
        Some(std::path::Path::new("/var/run/netns/cni-1234"))
    );
    assert_eq!(web.labels.get("app").map(String::as_str), Some("web"));
    // A remote pod keeps what outbound checks and Service selectors need, and no node-local
    // paths.
    let api_pod = state.pods().find(|p| p.name == "api-5c4b").unwrap();
    assert_eq!(api_pod.node.as_deref(), Some("node2"));
    assert_eq!(
        api_pod.ips,
        vec!["10.201.2.7".parse::<std::net::IpAddr>().unwrap()]
    );
    assert_eq!(api_pod.service_account, "api");
    assert_eq!(api_pod.netns_path, None);
    assert_eq!(api_pod.uid.as_deref(), Some("a2"), "compact keeps the UID");
    assert_eq!(
        api_pod.labels,
        BTreeMap::from([
            ("app".to_string(), "api".to_string()),
            ("istio.io/dataplane-mode".to_string(), "none".to_string()),
        ])
    );
    assert!(!state.is_enrolled(api_pod), "the pod opted out");
    assert!(!state.namespace("legacy").unwrap().enrolls_pods());

    // Watch events apply one by one.
    let [added, deleted, gone] = <[String; 3]>::try_from(lines(PODS_WATCH)).unwrap();
    pod_events.send(added).unwrap();
    wait_for(&mut rx, |s| pod_names(s).contains("cart-1")).await;
    pod_events.send(deleted).unwrap();
    wait_for(&mut rx, |s| !pod_names(s).contains("web-7d9f")).await;
    for line in lines(NAMESPACES_WATCH) {
        namespace_events.send(line).unwrap();
    }
    wait_for(&mut rx, |s| {
        s.namespace("legacy").is_some_and(|n| n.enrolls_pods())
    })
    .await;

    // 410 Gone: the watcher re-lists, and the new listing replaces the old one at once.
    let before = pod_names(&rx.borrow());
    let after = BTreeSet::from(["cart-1".to_string(), "db-0".to_string()]);
    pod_events.send(gone).unwrap();
    let seen = wait_for(&mut rx, |s| pod_names(s) == after).await;
    for state in &seen {
        let names = pod_names(state);
        assert!(
            names == before || names == after,
            "half-built state published: {names:?}"
        );
    }
    assert_eq!(api.count("pods", false), 4, "one re-list after the 410");

    // Outage after the initial sync: the watch stream breaks and lists fail; the last good
    // state stays published and nothing is torn down.
    for _ in 0..5 {
        api.push(
            "pods",
            true,
            Reply::Json(StatusCode::INTERNAL_SERVER_ERROR, STATUS_500),
        );
    }
    drop(pod_events);
    drop(pod_events_after_relist);
    let requests_before = api.count("pods", false) + api.count("pods", true);
    tokio::time::timeout(Duration::from_secs(10), async {
        while api.count("pods", false) + api.count("pods", true) < requests_before + 3 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the source keeps retrying during the outage");
    assert!(
        !rx.has_changed().unwrap(),
        "an outage must not publish a new state"
    );
    assert_eq!(pod_names(&rx.borrow()), after);
}

#[tokio::test]
async fn policies_are_listed_and_watched_and_a_bad_edit_keeps_the_last_good_version() {
    let api = Arc::new(FakeApi::default());
    cluster_without_changes(&api);
    api.push(
        POLICIES_V1,
        false,
        Reply::Json(StatusCode::OK, POLICIES_LIST),
    );
    let events = api.watch_stream(POLICIES_V1);
    let mut rx = start(&api).await;

    // The first snapshot has namespaces, pods and policies together.
    let state = rx.borrow_and_update().clone();
    assert_eq!(pod_names(&state).len(), 3);
    assert_eq!(
        policies(&state),
        expect(&[
            // Valid, as listed (this list item came without apiVersion/kind).
            ("legacy/allow-nothing", Action::Allow, 0),
            ("shop/allow-web", Action::Allow, 1),
            // HTTP methods cannot be enforced at L4 and the policy never had a good
            // version: it denies everything to the pods it selects instead of nothing.
            ("shop/deny-get", Action::Deny, 1),
            // shop/audit-all (AUDIT) never decides traffic: skipped.
        ])
    );
    let stand_in = state
        .policies()
        .policies()
        .iter()
        .find(|p| p.id().name == "deny-get")
        .unwrap();
    assert_eq!(
        stand_in.selector(),
        Some(&BTreeMap::from([("app".to_string(), "api".to_string())])),
        "the stand-in keeps the selector"
    );
    assert!(matches!(
        verdict(&state, "shop", &[("app", "api")], WEB_SA),
        Verdict::Deny(Denial::DenyPolicy { .. })
    ));
    assert!(verdict(&state, "shop", &[("app", "web")], WEB_SA).is_allowed());
    assert!(!verdict(&state, "shop", &[("app", "web")], BATCH_SA).is_allowed());
    assert_eq!(api.count(POLICIES_V1BETA1, false), 0, "v1 is served");

    let [added, to_deny, invalid, deleted, deleted_web] =
        <[String; 5]>::try_from(lines(POLICIES_WATCH)).unwrap();
    // Added.
    events.send(added).unwrap();
    let state = wait_for(&mut rx, |s| policies(s).contains_key("shop/deny-batch"))
        .await
        .pop()
        .unwrap();
    assert_eq!(policies(&state)["shop/deny-batch"], (Action::Deny, 1));
    // Modified into a DENY.
    events.send(to_deny).unwrap();
    let state = wait_for(&mut rx, |s| {
        policies(s).get("shop/allow-web") == Some(&(Action::Deny, 1))
    })
    .await
    .pop()
    .unwrap();
    assert!(matches!(
        verdict(&state, "shop", &[("app", "web")], BATCH_SA),
        Verdict::Deny(Denial::DenyPolicy { .. })
    ));
    // An invalid edit (HTTP paths), then a good event behind it: once the good event is
    // in, the invalid edit must have left the DENY version in force.
    events.send(invalid).unwrap();
    events.send(deleted).unwrap();
    let seen = wait_for(&mut rx, |s| !policies(s).contains_key("shop/deny-batch")).await;
    for state in &seen {
        assert_eq!(
            policies(state)["shop/allow-web"],
            (Action::Deny, 1),
            "an invalid edit must not replace the last good version"
        );
    }
    // Deleted, even though its latest version was invalid.
    events.send(deleted_web).unwrap();
    let state = wait_for(&mut rx, |s| !policies(s).contains_key("shop/allow-web"))
        .await
        .pop()
        .unwrap();
    assert_eq!(
        policies(&state),
        expect(&[
            ("legacy/allow-nothing", Action::Allow, 0),
            ("shop/deny-get", Action::Deny, 1),
        ])
    );
}

#[tokio::test]
async fn a_missing_crd_publishes_no_policies_and_its_policies_arrive_once_installed() {
    let api = Arc::new(FakeApi::default());
    cluster_without_changes(&api);
    crd_not_installed(&api);
    let mut rx = start(&api).await;
    let state = rx.borrow_and_update().clone();
    assert_eq!(
        pod_names(&state).len(),
        3,
        "namespaces and pods are not held up"
    );
    assert!(state.policies().is_empty());
    assert!(api.count(POLICIES_V1, false) >= 1);
    assert!(
        api.count(POLICIES_V1BETA1, false) >= 1,
        "v1beta1 is tried too"
    );

    // The source keeps asking with backoff; once the CRD is installed, its policies arrive.
    let asked = api.count(POLICIES_V1, false);
    tokio::time::timeout(Duration::from_secs(10), async {
        while api.count(POLICIES_V1, false) < asked + 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the source keeps checking for the CRD");
    api.push(
        POLICIES_V1,
        false,
        Reply::Json(StatusCode::OK, POLICIES_LIST),
    );
    let events = api.watch_stream(POLICIES_V1);
    let seen = wait_for(&mut rx, |s| !s.policies().is_empty()).await;
    assert_eq!(policies(seen.last().unwrap()).len(), 3);
    for state in &seen {
        assert_eq!(pod_names(state).len(), 3, "pods stay while policies arrive");
    }
    // ...and are watched from then on.
    events.send(lines(POLICIES_WATCH).remove(0)).unwrap();
    wait_for(&mut rx, |s| policies(s).contains_key("shop/deny-batch")).await;
}

#[tokio::test]
async fn v1beta1_is_used_when_v1_is_not_served() {
    let api = Arc::new(FakeApi::default());
    cluster_without_changes(&api);
    api.default_reply(POLICIES_V1, false, StatusCode::NOT_FOUND, STATUS_404);
    api.push(
        POLICIES_V1BETA1,
        false,
        Reply::Json(StatusCode::OK, POLICIES_LIST_V1BETA1),
    );
    let mut rx = start(&api).await;
    let state = rx.borrow_and_update().clone();
    assert_eq!(
        policies(&state),
        expect(&[
            ("legacy/allow-nothing", Action::Allow, 0),
            ("shop/allow-web", Action::Allow, 1),
            ("shop/deny-get", Action::Deny, 1),
        ])
    );
    assert!(api.count(POLICIES_V1, false) >= 1, "v1 is asked first");
}

#[tokio::test]
async fn policies_that_cannot_be_read_hold_the_first_snapshot_back() {
    // Forbidden (missing RBAC) and server errors are not "no policies": starting without
    // them would fail open. The first snapshot waits for the policies.
    let api = Arc::new(FakeApi::default());
    cluster_without_changes(&api);
    api.push(
        POLICIES_V1,
        false,
        Reply::Json(StatusCode::FORBIDDEN, STATUS_403_POLICIES),
    );
    api.push(
        POLICIES_V1,
        false,
        Reply::Json(StatusCode::INTERNAL_SERVER_ERROR, STATUS_500),
    );
    api.push(
        POLICIES_V1,
        false,
        Reply::Json(StatusCode::OK, POLICIES_LIST),
    );
    let mut rx = start(&api).await;
    assert_eq!(
        api.count(POLICIES_V1, false),
        3,
        "two failed lists, then one good"
    );
    assert_eq!(
        api.count(POLICIES_V1BETA1, false),
        0,
        "only a 404 means not served"
    );
    let state = rx.borrow_and_update().clone();
    assert_eq!(
        policies(&state).len(),
        3,
        "the first snapshot has the policies"
    );
}

#[tokio::test]
async fn the_placement_source_does_not_read_policies() {
    let api = Arc::new(FakeApi::default());
    cluster_without_changes(&api);
    // Would hold back a source that reads policies (or Services) forever.
    api.default_reply(
        POLICIES_V1,
        false,
        StatusCode::FORBIDDEN,
        STATUS_403_POLICIES,
    );
    api.default_reply(
        SERVICES,
        false,
        StatusCode::INTERNAL_SERVER_ERROR,
        STATUS_500,
    );
    let mut rx = tokio::time::timeout(
        Duration::from_secs(10),
        watch_placement(client(api.clone()), String::new(), fast_retry()),
    )
    .await
    .expect("the placement source is ready without policies");
    let state = rx.borrow_and_update().clone();
    assert_eq!(pod_names(&state).len(), 3);
    assert!(state.policies().is_empty());
    assert_eq!(api.count(POLICIES_V1, false), 0);
    assert_eq!(state.services().count(), 0);
    assert_eq!(api.count(SERVICES, false), 0, "nor Services");
    assert_eq!(api.count(SLICES, false), 0, "nor EndpointSlices");
}

fn ip(s: &str) -> std::net::IpAddr {
    s.parse().unwrap()
}

fn service_names(state: &ClusterState) -> BTreeSet<String> {
    state.services().map(|s| s.key()).collect()
}

fn slice_names(state: &ClusterState) -> BTreeSet<String> {
    state
        .endpoint_slices()
        .map(|s| format!("{}/{}", s.namespace, s.name))
        .collect()
}

/// The endpoints of `namespace/name`: IP -> (service port -> endpoint port).
fn endpoints(
    state: &ClusterState,
    namespace: &str,
    name: &str,
) -> Vec<(std::net::IpAddr, Vec<(u16, u16)>)> {
    let service = state.service(namespace, name).expect("the service");
    state
        .service_endpoints(service)
        .into_iter()
        .map(|e| (e.ip, e.ports.into_iter().collect()))
        .collect()
}

#[tokio::test]
async fn services_and_endpoint_slices_are_listed_and_watched() {
    let api = Arc::new(FakeApi::default());
    cluster_without_changes(&api);
    crd_not_installed(&api);
    api.push(SERVICES, false, Reply::Json(StatusCode::OK, SERVICES_LIST));
    let service_events = api.watch_stream(SERVICES);
    api.push(SLICES, false, Reply::Json(StatusCode::OK, SLICES_LIST));
    let slice_events = api.watch_stream(SLICES);
    let mut rx = start(&api).await;

    // The first snapshot has the Services of every namespace but the ExternalName one, and
    // the IP slices (not the FQDN one).
    let state = rx.borrow_and_update().clone();
    assert_eq!(
        service_names(&state),
        BTreeSet::from([
            "kube-system/kube-dns".to_string(),
            "shop/ext".to_string(),
            "shop/web".to_string(),
        ])
    );
    assert_eq!(
        slice_names(&state),
        BTreeSet::from(["shop/ext-1".to_string(), "shop/web-x7k2p".to_string()])
    );
    let dns = state.service("kube-system", "kube-dns").unwrap();
    assert_eq!(dns.cluster_ips, [ip("10.96.0.10")]);
    let dns_ports: Vec<_> = dns
        .ports
        .iter()
        .map(|p| (p.name.as_deref(), p.port))
        .collect();
    assert_eq!(
        dns_ports,
        [(Some("dns-tcp"), 53), (Some("metrics"), 9153)],
        "TCP ports only"
    );
    let web = state.service("shop", "web").unwrap();
    assert_eq!(web.affinity, Some(Duration::from_secs(10800)));
    // Selector app=web: web-7d9f, ready by its condition, serves "http" on 80.
    assert_eq!(
        endpoints(&state, "shop", "web"),
        [(ip("10.201.1.5"), vec![(80, 80)])]
    );
    // Running but without a Ready condition: not ready when Kubernetes is the source.
    assert!(!state.pods().find(|p| p.name == "api-5c4b").unwrap().ready);
    // No selector: the ready addresses of its slice.
    assert_eq!(
        endpoints(&state, "shop", "ext"),
        [(ip("192.168.50.1"), vec![(443, 8443)])]
    );

    // The slice changes: the second endpoint became ready.
    let [modified, deleted] = <[String; 2]>::try_from(lines(SLICES_WATCH)).unwrap();
    slice_events.send(modified).unwrap();
    let state = wait_for(&mut rx, |s| endpoints(s, "shop", "ext").len() == 2)
        .await
        .pop()
        .unwrap();
    assert_eq!(
        endpoints(&state, "shop", "ext"),
        [
            (ip("192.168.50.1"), vec![(443, 8443)]),
            (ip("192.168.50.2"), vec![(443, 8443)]),
        ]
    );
    // The slice is deleted: the service stays, without endpoints.
    slice_events.send(deleted).unwrap();
    let state = wait_for(&mut rx, |s| !slice_names(s).contains("shop/ext-1"))
        .await
        .pop()
        .unwrap();
    assert!(endpoints(&state, "shop", "ext").is_empty());

    // A Service is added, another deleted.
    let [added, deleted, to_external] = <[String; 3]>::try_from(lines(SERVICES_WATCH)).unwrap();
    service_events.send(added).unwrap();
    let state = wait_for(&mut rx, |s| s.service("shop", "cart").is_some())
        .await
        .pop()
        .unwrap();
    assert_eq!(
        state.service("shop", "cart").unwrap().cluster_ips,
        [ip("10.96.10.4")]
    );
    service_events.send(deleted).unwrap();
    wait_for(&mut rx, |s| s.service("shop", "ext").is_none()).await;
    // A Service turned ExternalName can no longer be served: it goes, and only it.
    service_events.send(to_external).unwrap();
    let state = wait_for(&mut rx, |s| s.service("shop", "web").is_none())
        .await
        .pop()
        .unwrap();
    assert_eq!(
        service_names(&state),
        BTreeSet::from(["kube-system/kube-dns".to_string(), "shop/cart".to_string(),])
    );
    assert_eq!(
        slice_names(&state),
        BTreeSet::from(["shop/web-x7k2p".to_string()])
    );
    assert_eq!(pod_names(&state).len(), 3);
}

/// What the source logs from here on (this test's runtime runs on this thread).
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

#[tokio::test]
async fn without_endpoint_slices_the_state_has_none_and_a_warning_says_so_once() {
    let logs = Logs::default();
    let writer = logs.clone();
    let _guard = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish(),
    );
    let api = Arc::new(FakeApi::default());
    cluster_without_changes(&api);
    crd_not_installed(&api);
    api.push(SERVICES, false, Reply::Json(StatusCode::OK, SERVICES_LIST));
    // What Kubernetes 1.20 answers: the group is served (v1beta1), v1 is not.
    api.default_reply(SLICES, false, StatusCode::NOT_FOUND, NOT_SERVED_404);
    let mut rx = start(&api).await;
    let state = rx.borrow_and_update().clone();
    assert_eq!(service_names(&state).len(), 3, "services are not held up");
    assert_eq!(state.endpoint_slices().count(), 0);
    assert!(endpoints(&state, "shop", "ext").is_empty());

    // The source keeps asking, and warns only the first time.
    let asked = api.count(SLICES, false);
    tokio::time::timeout(Duration::from_secs(10), async {
        while api.count(SLICES, false) < asked + 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the source keeps checking for EndpointSlices");
    let text = logs.text();
    let warning = "does not serve discovery.k8s.io/v1 EndpointSlice";
    assert_eq!(text.matches(warning).count(), 1, "{text}");
    assert!(
        text.lines()
            .any(|l| l.contains(warning) && l.contains("WARN")),
        "{text}"
    );

    // Once served, the slices arrive.
    api.push(SLICES, false, Reply::Json(StatusCode::OK, SLICES_LIST));
    let state = wait_for(&mut rx, |s| s.endpoint_slices().count() > 0)
        .await
        .pop()
        .unwrap();
    assert_eq!(
        endpoints(&state, "shop", "ext"),
        [(ip("192.168.50.1"), vec![(443, 8443)])]
    );
}
