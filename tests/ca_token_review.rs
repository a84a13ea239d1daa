//! The CA authenticating node agents by Kubernetes ServiceAccount token: the real CA over
//! gRPC + TLS on 127.0.0.1, its TokenReview validator (cached, as `zmesh ca serve --bearer
//! kubernetes` builds it) talking to a fake API server that answers with TokenReview
//! responses in the API server's format (cluster/tests/fixtures/kube/tokenreview-*.json; written
//! from the API's documented behaviour, not captured from a live cluster), and the agent's
//! token-file credential. tests/kube_apiserver.rs does the same with real ServiceAccount
//! tokens and a real API server.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use k8s_openapi::api::authentication::v1::TokenReview;
use tokio::sync::{oneshot, watch};
use zmesh_agent::ca::CaTokenCredential;
use zmesh_certs::{
    new_key_and_csr, CaServer, CaStore, CachedBearer, InitOptions, IstioCaClient, Policy,
    ServerOptions, DEFAULT_CLUSTER_ID,
};
use zmesh_cluster::placement::ClusterPlacement;
use zmesh_cluster::state::{ClusterState, PodInfo};
use zmesh_cluster::token_review::{ServiceAccountRef, TokenReviewValidator, DEFAULT_CACHE_TTL};
use zmesh_identity::{SpiffeId, TrustDomain};

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const DB: &str = "spiffe://cluster.local/ns/shop/sa/db";

// Tokens as the agent would present them (JWT-shaped), one per recorded answer.
const NODE_A_TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.bm9kZS1hLWFnZW50.c2lnLWE";
const NODE_B_TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.bm9kZS1iLWFnZW50.c2lnLWI";
const EXPIRED_TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.ZXhwaXJlZA.c2lnLWM";
const WEB_POD_TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.d2ViLXBvZA.c2lnLWQ";
const LEGACY_SECRET_TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.bGVnYWN5.c2lnLWU";
const API_AUDIENCE_TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.YXBpLWF1ZA.c2lnLWY";
const ALL_TOKENS: [&str; 6] = [
    NODE_A_TOKEN,
    NODE_B_TOKEN,
    EXPIRED_TOKEN,
    WEB_POD_TOKEN,
    LEGACY_SECRET_TOKEN,
    API_AUDIENCE_TOKEN,
];

/// A fake API server answering `POST /apis/authentication.k8s.io/v1/tokenreviews` from
/// recorded responses, echoing the token as the real one does.
struct FakeApi {
    answers: HashMap<&'static str, (&'static str, &'static str)>,
    /// While set, every review fails with 500 (etcd timeout).
    down: AtomicBool,
    /// (token, requested audiences) of every review received.
    reviews: Mutex<Vec<(String, Vec<String>)>>,
}

impl FakeApi {
    fn new() -> Arc<Self> {
        let answers = HashMap::from([
            (
                NODE_A_TOKEN,
                (
                    "NODE_A_TOKEN",
                    include_str!("../cluster/tests/fixtures/kube/tokenreview-node-a.json"),
                ),
            ),
            (
                NODE_B_TOKEN,
                (
                    "NODE_B_TOKEN",
                    include_str!("../cluster/tests/fixtures/kube/tokenreview-node-b.json"),
                ),
            ),
            (
                EXPIRED_TOKEN,
                (
                    "EXPIRED_TOKEN",
                    include_str!("../cluster/tests/fixtures/kube/tokenreview-unauthenticated.json"),
                ),
            ),
            (
                WEB_POD_TOKEN,
                (
                    "WEB_POD_TOKEN",
                    include_str!(
                        "../cluster/tests/fixtures/kube/tokenreview-wrong-service-account.json"
                    ),
                ),
            ),
            (
                LEGACY_SECRET_TOKEN,
                (
                    "LEGACY_SECRET_TOKEN",
                    include_str!("../cluster/tests/fixtures/kube/tokenreview-no-node-name.json"),
                ),
            ),
            (
                API_AUDIENCE_TOKEN,
                (
                    "API_AUDIENCE_TOKEN",
                    include_str!("../cluster/tests/fixtures/kube/tokenreview-wrong-audience.json"),
                ),
            ),
        ]);
        Arc::new(Self {
            answers,
            down: AtomicBool::new(false),
            reviews: Mutex::new(Vec::new()),
        })
    }

    fn reviews_of(&self, token: &str) -> usize {
        let reviews = self.reviews.lock().unwrap();
        reviews.iter().filter(|(t, _)| t == token).count()
    }

    async fn serve(&self, request: Request<kube::client::Body>) -> Response<Full<Bytes>> {
        if request.method() != http::Method::POST
            || request.uri().path() != "/apis/authentication.k8s.io/v1/tokenreviews"
        {
            return json(StatusCode::NOT_FOUND, NOT_FOUND.to_owned());
        }
        let body = request.into_body().collect().await.unwrap().to_bytes();
        let review: TokenReview = serde_json::from_slice(&body).expect("a TokenReview");
        let token = review.spec.token.clone().unwrap_or_default();
        self.reviews.lock().unwrap().push((
            token.clone(),
            review.spec.audiences.clone().unwrap_or_default(),
        ));
        if self.down.load(Ordering::SeqCst) {
            return json(
                StatusCode::INTERNAL_SERVER_ERROR,
                include_str!("../cluster/tests/fixtures/kube/status-500.json").to_owned(),
            );
        }
        match self.answers.get(token.as_str()) {
            Some((placeholder, body)) => json(
                StatusCode::CREATED,
                body.replace(&format!("\"{placeholder}\""), &format!("\"{token}\"")),
            ),
            None => panic!("the test sent an unscripted token"),
        }
    }
}

const NOT_FOUND: &str = r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"the server could not find the requested resource","reason":"NotFound","code":404}"#;

fn json(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    response
}

fn kube_client(api: Arc<FakeApi>) -> kube::Client {
    let service = tower::service_fn(move |request| {
        let api = api.clone();
        async move { Ok::<_, Infallible>(api.serve(request).await) }
    });
    kube::Client::new(service, "default")
}

fn pod(name: &str, node: &str, service_account: &str) -> PodInfo {
    PodInfo {
        namespace: "shop".into(),
        name: name.into(),
        workload_name: name.into(),
        uid: None,
        node: Some(node.into()),
        ips: vec![],
        service_account: service_account.into(),
        host_network: false,
        labels: Default::default(),
        netns_path: None,
        cgroup_path: None,
        ready: true,
        ports: Default::default(),
    }
}

/// The CA as `zmesh ca serve --kubernetes --bearer kubernetes` assembles it.
struct Ca {
    dir: tempfile::TempDir,
    store: CaStore,
    addr: String,
    _placement: watch::Sender<Arc<ClusterState>>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Ca {
    async fn start(api: Arc<FakeApi>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = CaStore::init(
            &dir.path().join("ca"),
            &InitOptions {
                trust_domain: TrustDomain::default(),
                policy: Policy::default(),
            },
        )
        .unwrap();
        // web runs on node-a, db on node-b.
        let (placement, state) = watch::channel(Arc::new(ClusterState::new(
            [],
            [pod("web-1", "node-a", "web"), pod("db-0", "node-b", "db")],
        )));
        let review = TokenReviewValidator::new(
            kube_client(api),
            "zmesh-ca",
            "zmesh-system/zmesh-agent"
                .parse::<ServiceAccountRef>()
                .unwrap(),
        );
        let server = CaServer::bind(
            store.clone(),
            ServerOptions {
                listen: "127.0.0.1:0".parse().unwrap(),
                serving_names: vec!["localhost".into(), "127.0.0.1".into()],
                placement: Arc::new(ClusterPlacement::new(state)),
                bearer: Some(Arc::new(CachedBearer::new(review, DEFAULT_CACHE_TTL))),
                cluster_id: DEFAULT_CLUSTER_ID.into(),
            },
        )
        .await
        .unwrap();
        let addr = server.local_addr().unwrap().to_string();
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(async move {
            server
                .serve(async {
                    let _ = rx.await;
                })
                .await
                .unwrap();
        });
        Self {
            dir,
            store,
            addr,
            _placement: placement,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    fn lines(&self, file: &str) -> Vec<String> {
        match std::fs::read_to_string(self.store.dir().join(file)) {
            Ok(text) => text.lines().map(str::to_owned).collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => vec![],
            Err(e) => panic!("{file}: {e}"),
        }
    }

    fn issued(&self) -> usize {
        self.lines("issued.jsonl").len()
    }

    fn last_audit(&self) -> serde_json::Value {
        let lines = self.lines("audit.jsonl");
        serde_json::from_str(lines.last().expect("an audit line")).unwrap()
    }

    /// An agent whose projected token file holds `token`, trusting the CA's roots from a
    /// bundle file, exactly as `zmesh agent --ca-token-file --ca-bundle` does.
    fn agent(&self, name: &str, token: &str) -> (IstioCaClient, std::path::PathBuf) {
        let token_file = self.dir.path().join(format!("{name}-token"));
        std::fs::write(&token_file, format!("{token}\n")).unwrap();
        let ca_bundle = self.dir.path().join("roots.pem");
        std::fs::write(&ca_bundle, self.store.load().unwrap().bundle_pem()).unwrap();
        let credential = CaTokenCredential {
            token_file: token_file.clone(),
            ca_bundle,
        };
        let (client, roots) = credential.client(&self.addr).unwrap();
        assert!(roots.contains("BEGIN CERTIFICATE"));
        (client, token_file)
    }

    async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("the CA stops")
                .unwrap();
        }
    }
}

/// A gRPC refusal: the status code's name and the message.
#[derive(Debug)]
struct Refused {
    code: String,
    message: String,
}

async fn request(client: &IstioCaClient, id: &str) -> Result<Vec<String>, Refused> {
    let csr = new_key_and_csr(&SpiffeId::parse(id).unwrap()).unwrap().1;
    client
        .create_certificate(&csr, Some(id), 3600)
        .await
        .map_err(|status| Refused {
            code: format!("{:?}", status.code()),
            message: status.message().to_owned(),
        })
}

/// Asserts a refusal: the status code, nothing issued, and an audit line naming `reason`.
async fn assert_refused(ca: &Ca, token: &str, code: &str, reason: &str) {
    let (client, _) = ca.agent("refused", token);
    let issued = ca.issued();
    let status = request(&client, WEB).await.expect_err("must be refused");
    assert_eq!(status.code, code, "{status:?}");
    assert_eq!(ca.issued(), issued, "nothing may be issued");
    let audit = ca.last_audit();
    assert_eq!(audit["decision"], "refused");
    assert_eq!(audit["auth"], "bearer");
    assert_eq!(audit["code"], code);
    let logged = audit["reason"].as_str().unwrap();
    assert!(
        logged.contains(reason),
        "audit reason {logged:?} lacks {reason:?}"
    );
    assert!(status.message.contains(reason), "{status:?}");
}

#[tokio::test]
async fn token_review_authenticates_nodes() {
    let api = FakeApi::new();
    let ca = Ca::start(api.clone()).await;

    // A workload scheduled on the token's node is issued, to that node.
    let (node_a, _) = ca.agent("node-a", NODE_A_TOKEN);
    let chain = request(&node_a, WEB).await.expect("web on node-a");
    assert_eq!(chain.len(), 3, "leaf, intermediate, roots");
    assert_eq!(ca.issued(), 1);
    let audit = ca.last_audit();
    assert_eq!(audit["decision"], "issued");
    assert_eq!(audit["auth"], "bearer");
    assert_eq!(audit["caller_node"], "node-a");
    assert_eq!(audit["identity"], WEB);

    // The node comes from the token: node-a's agent cannot get db, which runs on node-b.
    let status = request(&node_a, DB).await.expect_err("db is not on node-a");
    assert_eq!(status.code, "PermissionDenied", "{status:?}");
    assert_eq!(ca.issued(), 1);
    assert_eq!(ca.last_audit()["caller_node"], "node-a");

    // Accepted tokens are cached: three requests, one review.
    request(&node_a, WEB).await.expect("web again");
    assert_eq!(api.reviews_of(NODE_A_TOKEN), 1, "one TokenReview per token");

    // Every way a token can be wrong is UNAUTHENTICATED, with the reason audited.
    assert_refused(
        &ca,
        EXPIRED_TOKEN,
        "Unauthenticated",
        "service account token has expired",
    )
    .await;
    assert_refused(
        &ca,
        WEB_POD_TOKEN,
        "Unauthenticated",
        "not the node agent's service account zmesh-system/zmesh-agent",
    )
    .await;
    assert_refused(&ca, LEGACY_SECRET_TOKEN, "Unauthenticated", "names no node").await;
    assert_refused(
        &ca,
        API_AUDIENCE_TOKEN,
        "Unauthenticated",
        "not for audience \"zmesh-ca\"",
    )
    .await;
    // Refusals are not cached: a second try is reviewed again.
    assert_refused(
        &ca,
        EXPIRED_TOKEN,
        "Unauthenticated",
        "did not authenticate",
    )
    .await;
    assert_eq!(api.reviews_of(EXPIRED_TOKEN), 2);

    // The API server is down: UNAVAILABLE (retryable), not a verdict on the token.
    api.down.store(true, Ordering::SeqCst);
    let (node_b, _) = ca.agent("node-b", NODE_B_TOKEN);
    let issued = ca.issued();
    let status = request(&node_b, DB).await.expect_err("API outage");
    assert_eq!(status.code, "Unavailable", "{status:?}");
    assert_eq!(ca.issued(), issued);
    let audit = ca.last_audit();
    assert_eq!(audit["code"], "Unavailable");
    assert!(
        audit["reason"]
            .as_str()
            .unwrap()
            .contains("cannot validate bearer tokens"),
        "{audit}"
    );
    // A token accepted before the outage still works from the cache.
    request(&node_a, WEB).await.expect("cached acceptance");
    // Back up: the same token is reviewed again and accepted.
    api.down.store(false, Ordering::SeqCst);
    request(&node_b, DB).await.expect("db on node-b");
    assert_eq!(ca.last_audit()["caller_node"], "node-b");

    // Every review asked for our audience, and no token ever reached the audit log.
    for (_, audiences) in api.reviews.lock().unwrap().iter() {
        assert_eq!(audiences, &["zmesh-ca"]);
    }
    let audit_log = ca.lines("audit.jsonl").join("\n");
    for token in ALL_TOKENS {
        assert!(
            !audit_log.contains(token),
            "a token leaked into the audit log"
        );
    }
    ca.stop().await;
}

#[tokio::test]
async fn agent_reads_the_rotated_token_for_each_request() {
    let api = FakeApi::new();
    let ca = Ca::start(api.clone()).await;
    // The kubelet has not refreshed the token yet: refused.
    let (agent, token_file) = ca.agent("node-a", EXPIRED_TOKEN);
    let status = request(&agent, WEB).await.expect_err("expired token");
    assert_eq!(status.code, "Unauthenticated", "{status:?}");
    // The kubelet rotates the projected token in place: the same client now succeeds.
    std::fs::write(&token_file, NODE_A_TOKEN).unwrap();
    request(&agent, WEB).await.expect("the fresh token is used");
    assert_eq!(ca.last_audit()["caller_node"], "node-a");
    // The file vanishes: the request fails locally as UNAVAILABLE, nothing is sent.
    std::fs::remove_file(&token_file).unwrap();
    let reviews = api.reviews.lock().unwrap().len();
    let status = request(&agent, WEB).await.expect_err("no token");
    assert_eq!(status.code, "Unavailable", "{status:?}");
    assert_eq!(api.reviews.lock().unwrap().len(), reviews);
    ca.stop().await;
}
