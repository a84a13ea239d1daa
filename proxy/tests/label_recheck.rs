//! Open inbound tunnels are re-checked when the workload table changes a local pod's labels:
//! a DENY policy that now selects the pod closes its tunnels, and only those.

mod common;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use h2::client::SendRequest;
use h2::{RecvStream, SendStream};
use http::{Method, Request, StatusCode};
use rustls::sign::CertifiedKey;
use rustls_pki_types::ServerName;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpSocket};
use tokio_rustls::TlsConnector;
use zmesh_identity::{SharedBundle, TrustDomain, WorkloadId};
use zmesh_proxy::flows::{FlowFilter, FlowVerdict};
use zmesh_proxy::policy::{Denial, PolicyAuthorizer, PolicySet, PolicyStore, TableLabels};
use zmesh_proxy::{Protocol, ProxyConfig, ProxyDeps, Workload, WorkloadStore, WorkloadTable};

const T: Duration = Duration::from_secs(30);
const FRONTEND: &str = "spiffe://cluster.local/ns/web/sa/frontend";

/// Denies everything to pods labelled `lock=true` in prod.
const DENY_LOCKED: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-locked, namespace: prod}
spec:
  selector: {matchLabels: {lock: "true"}}
  action: DENY
  rules: [{}]
"#;

async fn echo_server(ip: IpAddr) -> SocketAddr {
    let listener = TcpListener::bind(SocketAddr::new(ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

fn server(name: &str, ip: IpAddr, labels: &[(&str, &str)]) -> Workload {
    Workload {
        name: name.into(),
        workload_name: name.into(),
        namespace: "prod".into(),
        service_account: "server-sa".into(),
        node: "b".into(),
        ips: vec![ip],
        protocol: Protocol::Hbone,
        identity: WorkloadId::new(&TrustDomain::default(), "prod", "server-sa").unwrap(),
        labels: Arc::new(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
        ),
    }
}

fn table(workloads: Vec<Workload>) -> WorkloadTable {
    WorkloadTable::new(TrustDomain::default(), [], workloads).unwrap()
}

async fn client(
    ca: &Ca,
    server_id: &WorkloadId,
    inbound: SocketAddr,
    from: IpAddr,
) -> SendRequest<Bytes> {
    let (chain, key) = ca.leaf(FRONTEND);
    let provider = zmesh_identity::tls::crypto_provider();
    let cert = Arc::new(CertifiedKey::from_der(chain, key, &provider).unwrap());
    let config = zmesh_identity::tls::client_config(
        cert,
        SharedBundle::new(ca.bundle()),
        vec![server_id.spiffe_id().clone()],
    )
    .unwrap();
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(from, 0)).unwrap();
    let tcp = sock.connect(inbound).await.unwrap();
    let name = ServerName::IpAddress(inbound.ip().into());
    let tls = TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    let (send, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(conn);
    send
}

type Tunnel = (SendStream<Bytes>, RecvStream);

async fn open(send: &SendRequest<Bytes>, target: SocketAddr) -> (StatusCode, Option<Tunnel>) {
    let req = Request::builder()
        .method(Method::CONNECT)
        .uri(target.to_string())
        .body(())
        .unwrap();
    let mut send = send.clone().ready().await.unwrap();
    let (resp, tx) = send.send_request(req, false).unwrap();
    let resp = tokio::time::timeout(T, resp).await.unwrap().unwrap();
    let status = resp.status();
    if status == StatusCode::OK {
        (status, Some((tx, resp.into_body())))
    } else {
        (status, None)
    }
}

async fn echo(tunnel: &mut Tunnel, msg: &[u8]) -> Result<Vec<u8>, String> {
    let (tx, rx) = tunnel;
    tx.send_data(Bytes::copy_from_slice(msg), false)
        .map_err(|e| e.to_string())?;
    let mut got = Vec::new();
    while got.len() < msg.len() {
        match tokio::time::timeout(T, rx.data()).await.unwrap() {
            Some(Ok(chunk)) => {
                let _ = rx.flow_control().release_capacity(chunk.len());
                got.extend_from_slice(&chunk);
            }
            Some(Err(e)) => return Err(e.to_string()),
            None => return Err("end of stream".into()),
        }
    }
    Ok(got)
}

#[tokio::test]
async fn a_label_change_that_brings_a_pod_under_a_deny_policy_closes_its_open_tunnels() {
    let net = 60;
    let ca = Ca::new("cluster.local");
    let api_addr = echo_server(ip(net, 2)).await;
    let db_addr = echo_server(ip(net, 4)).await;
    let api = server("api", ip(net, 2), &[("app", "api")]);
    let db = server("db", ip(net, 4), &[("app", "db")]);
    let workloads = Arc::new(WorkloadStore::new(table(vec![api.clone(), db.clone()])));
    let policies = Arc::new(PolicyStore::new(
        PolicySet::parse_documents(DENY_LOCKED).unwrap(),
    ));
    let mut deps = ProxyDeps::new(workloads.clone(), ca.credentials(&[&api.identity]));
    deps.authorizer = Arc::new(PolicyAuthorizer::new(
        policies.clone(),
        Arc::new(TableLabels),
    ));
    let proxy = Running::start(ProxyConfig::explicit("b", ip(net, 20)), deps).await;

    let send = client(&ca, &api.identity, proxy.addrs.inbound, ip(net, 1)).await;
    let mut to_api = open(&send, api_addr).await.1.expect("api tunnel");
    let mut to_db = open(&send, db_addr).await.1.expect("db tunnel");
    assert_eq!(echo(&mut to_api, b"one").await.unwrap(), b"one");
    assert_eq!(echo(&mut to_db, b"one").await.unwrap(), b"one");

    // Nothing but labels changes: the policies stay the same.
    let mut sub = proxy.flows.subscribe(FlowFilter::default());
    let policy_generation = policies.subscribe();
    workloads.replace(table(vec![
        server("api", ip(net, 2), &[("app", "api"), ("lock", "true")]),
        db.clone(),
    ]));

    let end = tokio::time::timeout(T, to_api.1.data())
        .await
        .expect("the api tunnel must be closed once the DENY policy selects api");
    assert!(
        !matches!(end, Some(Ok(_))),
        "no data may arrive on a closed tunnel: {end:?}"
    );
    let closed = tokio::time::timeout(T, sub.recv())
        .await
        .expect("a flow event for the closed tunnel")
        .expect("the hub is gone");
    assert_eq!(closed.verdict, FlowVerdict::Denied, "{closed}");
    assert_eq!(closed.destination.addr, api_addr);
    assert_eq!(
        closed.denial(),
        Some(&Denial::DenyPolicy {
            policy: "prod/deny-locked".parse().unwrap(),
            rule: 0
        })
    );
    assert!(
        !policy_generation.has_changed().unwrap(),
        "the close came from the label change, not a policy change"
    );

    // The db pod kept its labels: its tunnel is untouched.
    assert_eq!(echo(&mut to_db, b"two").await.unwrap(), b"two");
    // New tunnels to the locked pod are refused, to db still admitted.
    assert_eq!(open(&send, api_addr).await.0, StatusCode::UNAUTHORIZED);
    let (status, tunnel) = open(&send, db_addr).await;
    assert_eq!(status, StatusCode::OK);
    let mut again = tunnel.unwrap();
    assert_eq!(echo(&mut again, b"three").await.unwrap(), b"three");
}

#[tokio::test]
async fn a_label_change_away_from_a_deny_selector_keeps_tunnels_and_admits_new_ones() {
    let net = 61;
    let ca = Ca::new("cluster.local");
    let api_addr = echo_server(ip(net, 2)).await;
    let api = server("api", ip(net, 2), &[("app", "api")]);
    let workloads = Arc::new(WorkloadStore::new(table(vec![api.clone()])));
    let policies = Arc::new(PolicyStore::new(
        PolicySet::parse_documents(DENY_LOCKED).unwrap(),
    ));
    let mut deps = ProxyDeps::new(workloads.clone(), ca.credentials(&[&api.identity]));
    deps.authorizer = Arc::new(PolicyAuthorizer::new(
        policies.clone(),
        Arc::new(TableLabels),
    ));
    let proxy = Running::start(ProxyConfig::explicit("b", ip(net, 20)), deps).await;
    let send = client(&ca, &api.identity, proxy.addrs.inbound, ip(net, 1)).await;
    let mut tunnel = open(&send, api_addr).await.1.expect("api tunnel");

    // A change that does not touch api (a pod elsewhere, another label) keeps it open.
    let mut remote = server("remote", ip(net, 9), &[("lock", "true")]);
    remote.node = "c".into();
    workloads.replace(table(vec![
        server("api", ip(net, 2), &[("app", "api"), ("tier", "1")]),
        remote,
    ]));
    let mut sub = proxy.flows.subscribe(FlowFilter::default());
    assert_eq!(echo(&mut tunnel, b"one").await.unwrap(), b"one");

    // Locked: closed; unlocked again: new tunnels pass.
    workloads.replace(table(vec![server(
        "api",
        ip(net, 2),
        &[("app", "api"), ("lock", "true")],
    )]));
    let end = tokio::time::timeout(T, tunnel.1.data())
        .await
        .expect("the tunnel must be closed");
    assert!(!matches!(end, Some(Ok(_))), "{end:?}");
    let closed = tokio::time::timeout(T, sub.recv()).await.unwrap().unwrap();
    assert_eq!(closed.verdict, FlowVerdict::Denied, "{closed}");
    assert_eq!((closed.bytes_sent, closed.bytes_received), (3, 3));
    workloads.replace(table(vec![api]));
    let (status, tunnel) = open(&send, api_addr).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(echo(&mut tunnel.unwrap(), b"two").await.unwrap(), b"two");
}
