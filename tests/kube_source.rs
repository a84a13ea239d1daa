//! The Kubernetes cluster state source against recorded API server responses (list, watch
//! events, a 410 Gone that forces a re-list, and API outages). No live API server was
//! available here: the fake below replays responses captured in tests/fixtures/kube.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use tokio::sync::{mpsc, watch};
use zmesh::agent::cluster_state::ClusterState;
use zmesh::agent::kube_source::{watch_kubernetes, RetryPolicy};

type Body = BoxBody<Bytes, Infallible>;

enum Reply {
    Json(StatusCode, &'static str),
    /// A watch stream whose lines the test sends one by one; it ends when the sender drops.
    Stream(mpsc::UnboundedReceiver<String>),
}

#[derive(Default)]
struct FakeApi {
    /// Replies per (resource, is_watch), consumed in order. When none is left, lists fail
    /// with 500 and watches hang open.
    script: Mutex<HashMap<(String, bool), VecDeque<Reply>>>,
    requests: Mutex<Vec<String>>,
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

    fn count(&self, resource: &str, watch: bool) -> usize {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| {
                r.contains(&format!("/api/v1/{resource}?")) && r.contains("watch=true") == watch
            })
            .count()
    }

    fn serve(&self, request: Request<kube::client::Body>) -> Response<Body> {
        let uri = request.uri().to_string();
        self.requests.lock().unwrap().push(uri.clone());
        let resource = request
            .uri()
            .path()
            .trim_start_matches("/api/v1/")
            .to_owned();
        let is_watch = request.uri().query().unwrap_or("").contains("watch=true");
        let reply = self
            .script
            .lock()
            .unwrap()
            .get_mut(&(resource, is_watch))
            .and_then(VecDeque::pop_front);
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
    assert_eq!(
        web.netns_path.as_deref(),
        Some(std::path::Path::new("/var/run/netns/cni-1234"))
    );
    assert_eq!(web.labels.get("app").map(String::as_str), Some("web"));
    // A remote pod keeps what outbound checks need and the opt-out label, nothing more.
    let api_pod = state.pods().find(|p| p.name == "api-5c4b").unwrap();
    assert_eq!(api_pod.node.as_deref(), Some("node2"));
    assert_eq!(
        api_pod.ips,
        vec!["10.201.2.7".parse::<std::net::IpAddr>().unwrap()]
    );
    assert_eq!(api_pod.service_account, "api");
    assert_eq!(api_pod.netns_path, None);
    assert_eq!(api_pod.labels.len(), 1);
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
