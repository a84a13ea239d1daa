//! Authorization policies enforced by the running proxy, and the flow events it publishes:
//! ALLOW/DENY through HBONE with 401 and a flow naming the policy, labels from the
//! workload table, `ipBlocks` on the peer address (never the `forwarded` header), open
//! tunnels closed when a new policy denies them, and forwarded / plaintext flows.

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
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket};
use tokio_rustls::TlsConnector;
use zmesh_identity::{SharedBundle, TrustDomain, WorkloadId};
use zmesh_proxy::flows::{
    FlowDirection, FlowEvent, FlowFilter, FlowPhase, FlowSubscription, FlowVerdict,
};
use zmesh_proxy::policy::{
    Allowed, Denial, PolicyAuthorizer, PolicySet, PolicyStore, TableLabels, Verdict,
};
use zmesh_proxy::{
    Direction, Outcome, Protocol, ProxyConfig, ProxyDeps, Workload, WorkloadStore, WorkloadTable,
};

const T: Duration = Duration::from_secs(30);
const FRONTEND: &str = "spiffe://cluster.local/ns/web/sa/frontend";
const BATCH: &str = "spiffe://cluster.local/ns/batch/sa/job";

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

fn policies(docs: &[String]) -> PolicySet {
    PolicySet::parse_documents(&docs.join("---\n")).unwrap()
}

/// Proxy "b" serving one echo workload, prod/server (labels app=server), with policies.
struct Node {
    ca: Ca,
    net: u8,
    proxy: Running,
    store: Arc<PolicyStore>,
    server_id: WorkloadId,
    echo_addr: SocketAddr,
}

async fn start(net: u8) -> Node {
    let ca = Ca::new("cluster.local");
    let server_ip = ip(net, 2);
    let echo = TcpListener::bind(SocketAddr::new(server_ip, 0))
        .await
        .unwrap();
    let echo_addr = echo.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = echo.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    let labels: BTreeMap<String, String> = [("app".to_owned(), "server".to_owned())].into();
    let server = Workload {
        name: "server".into(),
        workload_name: "server".into(),
        namespace: "prod".into(),
        service_account: "server-sa".into(),
        node: "b".into(),
        ips: vec![server_ip],
        protocol: Protocol::Hbone,
        identity: WorkloadId::new(&TrustDomain::default(), "prod", "server-sa").unwrap(),
        labels: Arc::new(labels),
    };
    // The frontend pod, so that its flows can be attributed to it.
    let frontend = Workload {
        name: "frontend-1".into(),
        workload_name: "frontend-1".into(),
        namespace: "web".into(),
        service_account: "frontend".into(),
        node: "a".into(),
        ips: vec![ip(net, 1)],
        protocol: Protocol::Hbone,
        identity: WorkloadId::new(&TrustDomain::default(), "web", "frontend").unwrap(),
        labels: Arc::default(),
    };
    let table = WorkloadTable::new(TrustDomain::default(), [], [server.clone(), frontend]).unwrap();
    let store = Arc::new(PolicyStore::default());
    let mut deps = ProxyDeps::new(
        Arc::new(WorkloadStore::new(table)),
        ca.credentials(&[&server.identity]),
    );
    deps.authorizer = Arc::new(PolicyAuthorizer::new(store.clone(), Arc::new(TableLabels)));
    let proxy = Running::start(ProxyConfig::explicit("b", ip(net, 20)), deps).await;
    Node {
        ca,
        net,
        proxy,
        store,
        server_id: server.identity,
        echo_addr,
    }
}

/// An HBONE client holding `identity`, connecting from `from`.
async fn client(node: &Node, identity: &str, from: IpAddr) -> SendRequest<Bytes> {
    let (chain, key) = node.ca.leaf(identity);
    let provider = zmesh_identity::tls::crypto_provider();
    let cert = Arc::new(CertifiedKey::from_der(chain, key, &provider).unwrap());
    let config = zmesh_identity::tls::client_config(
        cert,
        SharedBundle::new(node.ca.bundle()),
        vec![node.server_id.spiffe_id().clone()],
    )
    .unwrap();
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(from, 0)).unwrap();
    let tcp = sock.connect(node.proxy.addrs.inbound).await.unwrap();
    let name = ServerName::IpAddress(node.proxy.addrs.inbound.ip().into());
    let tls = TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    let (send, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(conn);
    send
}

/// Opens a tunnel to the echo server; the status, and the stream if it is 200.
async fn open(
    send: &SendRequest<Bytes>,
    target: SocketAddr,
    forwarded_for: Option<SocketAddr>,
) -> (StatusCode, Option<(SendStream<Bytes>, RecvStream)>) {
    let mut req = Request::builder()
        .method(Method::CONNECT)
        .uri(target.to_string());
    if let Some(f) = forwarded_for {
        req = req.header("forwarded", format!("for=\"{f}\""));
    }
    let mut send = send.clone().ready().await.unwrap();
    let (resp, tx) = send.send_request(req.body(()).unwrap(), false).unwrap();
    let resp = tokio::time::timeout(T, resp).await.unwrap().unwrap();
    let status = resp.status();
    if status == StatusCode::OK {
        (status, Some((tx, resp.into_body())))
    } else {
        (status, None)
    }
}

/// Sends `msg` through the tunnel and reads the echo.
async fn echo(tunnel: &mut (SendStream<Bytes>, RecvStream), msg: &[u8]) -> Result<Vec<u8>, String> {
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

/// The next flow event, within the test timeout.
async fn next(sub: &mut FlowSubscription) -> Arc<FlowEvent> {
    tokio::time::timeout(T, sub.recv())
        .await
        .expect("timed out waiting for a flow event")
        .expect("the hub is gone")
}

/// The Prometheus text served on :15020/metrics.
async fn scrape(addr: SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    tokio::time::timeout(T, s.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    out
}

fn sid(s: &str) -> String {
    s.to_owned()
}

#[tokio::test]
async fn allow_by_principal_admits_one_identity_and_refuses_the_other() {
    let node = start(40).await;
    node.store.replace(policies(&[policy(
        "prod",
        "allow-frontend",
        "rules:\n- from:\n  - source: {principals: [cluster.local/ns/web/sa/frontend]}",
    )]));
    let mut sub = node.proxy.flows.subscribe(FlowFilter::default());

    let frontend = client(&node, FRONTEND, ip(node.net, 1)).await;
    // The header names the pod's own address: the flow is attributed to that pod.
    let src = SocketAddr::new(ip(node.net, 1), 40123);
    let (status, tunnel) = open(&frontend, node.echo_addr, Some(src)).await;
    assert_eq!(status, StatusCode::OK);
    let (mut tx, rx) = tunnel.unwrap();
    tx.send_data(Bytes::from_static(b"ping"), true).unwrap();
    let mut t = (tx, rx);
    // Read the echo to its end: the tunnel then finishes and publishes.
    let mut got = Vec::new();
    while let Some(chunk) = tokio::time::timeout(T, t.1.data()).await.unwrap() {
        let chunk = chunk.unwrap();
        let _ = t.1.flow_control().release_capacity(chunk.len());
        got.extend_from_slice(&chunk);
    }
    assert_eq!(got, b"ping");
    // First the tunnel's open event, then its close with the final counts.
    let opened = next(&mut sub).await;
    assert_eq!(opened.phase, FlowPhase::Open, "{opened}");
    assert_eq!(opened.direction, Some(FlowDirection::Inbound));
    assert_eq!(
        opened.source.identity.as_deref(),
        Some(sid(FRONTEND).as_str())
    );
    assert_eq!(opened.destination.addr, node.echo_addr);
    let ok = next(&mut sub).await;
    assert_eq!(ok.phase, FlowPhase::Close, "{ok}");
    assert_eq!(ok.verdict, FlowVerdict::Forwarded, "{ok}");
    assert!(ok.encrypted);
    assert_eq!(ok.source.identity.as_deref(), Some(sid(FRONTEND).as_str()));
    assert_eq!(ok.source.pod.as_deref(), Some("frontend-1"));
    assert_eq!(ok.source.addr, src);
    assert_eq!(ok.destination.pod.as_deref(), Some("server"));
    assert_eq!(ok.destination.addr, node.echo_addr);
    assert_eq!((ok.bytes_sent, ok.bytes_received), (4, 4));
    assert_eq!(
        ok.policy,
        Some(Verdict::Allow(Allowed::Policy {
            policy: "prod/allow-frontend".parse().unwrap(),
            rule: 0
        }))
    );

    let batch = client(&node, BATCH, ip(node.net, 3)).await;
    let (status, _) = open(&batch, node.echo_addr, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let denied = next(&mut sub).await;
    assert_eq!(denied.verdict, FlowVerdict::Denied);
    assert!(denied.encrypted);
    assert_eq!(denied.source.identity.as_deref(), Some(sid(BATCH).as_str()));
    assert_eq!(denied.source.pod, None, "no pod holds the batch identity");
    assert_eq!(
        denied.denial(),
        Some(&Denial::NoAllowMatched {
            considered: vec!["prod/allow-frontend".parse().unwrap()]
        })
    );
    assert!(
        denied.to_string().contains("prod/allow-frontend"),
        "{denied}"
    );
    assert_eq!(
        node.proxy
            .metrics
            .closed_count(Direction::Inbound, Outcome::Denied),
        1
    );
    let metrics = scrape(node.proxy.addrs.metrics).await;
    for line in [
        r#"zmesh_policy_verdicts_total{action="allow",policy="prod/allow-frontend",reason="allow_policy"} 1"#,
        r#"zmesh_policy_verdicts_total{action="deny",policy="",reason="no_allow_matched"} 1"#,
        r#"zmesh_flows_total{verdict="denied",encrypted="true"} 1"#,
    ] {
        assert!(metrics.contains(line), "missing {line} in\n{metrics}");
    }
}

#[tokio::test]
async fn deny_by_namespace_wins_over_allow_and_selects_by_labels() {
    let node = start(41).await;
    node.store.replace(policies(&[
        policy("prod", "allow-all", "rules: [{}]"),
        policy(
            "prod",
            "deny-batch",
            "selector: {matchLabels: {app: server}}\naction: DENY\nrules:\n- from:\n  - source: {namespaces: [batch]}",
        ),
    ]));
    let mut sub = node.proxy.flows.subscribe(FlowFilter {
        verdicts: vec![FlowVerdict::Denied],
        ..FlowFilter::default()
    });
    let frontend = client(&node, FRONTEND, ip(node.net, 1)).await;
    assert_eq!(
        open(&frontend, node.echo_addr, None).await.0,
        StatusCode::OK
    );
    let batch = client(&node, BATCH, ip(node.net, 3)).await;
    assert_eq!(
        open(&batch, node.echo_addr, None).await.0,
        StatusCode::UNAUTHORIZED
    );
    let denied = next(&mut sub).await;
    assert_eq!(
        denied.denial(),
        Some(&Denial::DenyPolicy {
            policy: "prod/deny-batch".parse().unwrap(),
            rule: 0
        })
    );
    assert_eq!(denied.source.identity.as_deref(), Some(sid(BATCH).as_str()));

    // A selector that does not match the pod's labels leaves it alone.
    node.store.replace(policies(&[policy(
        "prod",
        "deny-batch-db",
        "selector: {matchLabels: {app: db}}\naction: DENY\nrules:\n- from:\n  - source: {namespaces: [batch]}",
    )]));
    assert_eq!(open(&batch, node.echo_addr, None).await.0, StatusCode::OK);
}

#[tokio::test]
async fn ip_blocks_match_the_peer_address_never_the_forwarded_header() {
    let node = start(42).await;
    let client_ip = ip(node.net, 1);
    let claimed = SocketAddr::new(ip(node.net, 7), 1234);
    let frontend = client(&node, FRONTEND, client_ip).await;
    let deny_ip = |ip: IpAddr| {
        policies(&[policy(
            "prod",
            "deny-ip",
            &format!("action: DENY\nrules:\n- from:\n  - source: {{ipBlocks: [\"{ip}/32\"]}}"),
        )])
    };
    // Claiming another address in the header does not escape a DENY on the real one.
    node.store.replace(deny_ip(client_ip));
    assert_eq!(
        open(&frontend, node.echo_addr, Some(claimed)).await.0,
        StatusCode::UNAUTHORIZED
    );
    // And a DENY on the claimed address does not hit the real one.
    node.store.replace(deny_ip(claimed.ip()));
    assert_eq!(
        open(&frontend, node.echo_addr, Some(claimed)).await.0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn a_new_deny_policy_closes_open_tunnels_it_denies_and_spares_the_others() {
    let node = start(43).await;
    let frontend = client(&node, FRONTEND, ip(node.net, 1)).await;
    let batch = client(&node, BATCH, ip(node.net, 3)).await;
    let (_, t) = open(&frontend, node.echo_addr, None).await;
    let mut kept = t.expect("frontend tunnel");
    let (_, t) = open(&batch, node.echo_addr, None).await;
    let mut doomed = t.expect("batch tunnel");
    assert_eq!(echo(&mut kept, b"one").await.unwrap(), b"one");
    assert_eq!(echo(&mut doomed, b"one").await.unwrap(), b"one");

    let mut sub = node.proxy.flows.subscribe(FlowFilter::default());
    node.store.replace(policies(&[policy(
        "prod",
        "deny-batch",
        "action: DENY\nrules:\n- from:\n  - source: {namespaces: [batch]}",
    )]));
    // The batch tunnel ends: its stream is reset (or ends) without any further echo.
    let end = tokio::time::timeout(T, doomed.1.data())
        .await
        .expect("the denied tunnel must be closed");
    assert!(
        !matches!(end, Some(Ok(_))),
        "no data may arrive on a closed tunnel: {end:?}"
    );
    let closed = next(&mut sub).await;
    assert_eq!(closed.verdict, FlowVerdict::Denied, "{closed}");
    assert_eq!(closed.reason.as_deref(), Some("policy changed"));
    assert_eq!(closed.source.identity.as_deref(), Some(sid(BATCH).as_str()));
    assert_eq!(
        closed.denial(),
        Some(&Denial::DenyPolicy {
            policy: "prod/deny-batch".parse().unwrap(),
            rule: 0
        })
    );
    assert_eq!((closed.bytes_sent, closed.bytes_received), (3, 3));
    // The frontend tunnel is untouched.
    assert_eq!(echo(&mut kept, b"two").await.unwrap(), b"two");
    assert_eq!(
        node.proxy
            .metrics
            .closed_count(Direction::Inbound, Outcome::PolicyChanged),
        1
    );
    // New batch tunnels are refused too.
    assert_eq!(
        open(&batch, node.echo_addr, None).await.0,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn forwarded_and_plaintext_flows_say_whether_they_were_encrypted() {
    let mesh = Mesh::new(44).await;
    let mut a_sub = mesh.a.flows.subscribe(FlowFilter::default());
    let mut b_sub = mesh.b.flows.subscribe(FlowFilter::default());
    let server = async {
        for _ in 0..2 {
            let (mut s, _) = mesh.server.accept().await.unwrap();
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).await.unwrap();
            s.write_all(&buf).await.unwrap();
            s.shutdown().await.unwrap();
        }
    };
    let clients = async {
        // Through the mesh: A's outbound, HBONE, B's inbound.
        let mut c = mesh.connect().await;
        c.write_all(b"hello").await.unwrap();
        let mut back = Vec::new();
        c.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"hello");
        drop(c);
        // Plain TCP from outside the mesh to B's plaintext listener.
        let mut p = connect_from(ip(mesh.net, 9), mesh.b.addrs.plaintext).await;
        p.write_all(b"plain").await.unwrap();
        let mut back = Vec::new();
        p.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"plain");
    };
    tokio::time::timeout(T, futures::future::join(server, clients))
        .await
        .unwrap();

    let opened = next(&mut a_sub).await;
    assert_eq!(
        (opened.phase, opened.direction),
        (FlowPhase::Open, Some(FlowDirection::Outbound)),
        "{opened}"
    );
    let out = next(&mut a_sub).await;
    assert_eq!(out.phase, FlowPhase::Close, "{out}");
    assert_eq!(out.verdict, FlowVerdict::Forwarded, "{out}");
    assert!(out.encrypted, "outbound over HBONE is encrypted: {out}");
    assert_eq!(out.source.pod.as_deref(), Some("client"));
    assert_eq!(out.destination.pod.as_deref(), Some("server"));
    assert_eq!((out.bytes_sent, out.bytes_received), (5, 5));

    // B saw two connections, each opened then closed; the HBONE tunnel's close may come
    // after the plaintext one opened.
    let mut b_events = Vec::new();
    for _ in 0..4 {
        b_events.push(next(&mut b_sub).await);
    }
    let pick = |phase: FlowPhase, encrypted: bool| {
        let found: Vec<_> = b_events
            .iter()
            .filter(|e| e.phase == phase && e.encrypted == encrypted)
            .collect();
        assert_eq!(
            found.len(),
            1,
            "{phase:?} encrypted={encrypted}: {b_events:#?}"
        );
        found[0].clone()
    };
    for encrypted in [true, false] {
        let opened = pick(FlowPhase::Open, encrypted);
        assert_eq!(opened.direction, Some(FlowDirection::Inbound), "{opened}");
        assert_eq!(opened.destination.pod.as_deref(), Some("server"));
        // Opened before it closed.
        let at = |e: &FlowEvent| b_events.iter().position(|x| std::ptr::eq(&**x, e));
        assert!(at(&opened) < at(&pick(FlowPhase::Close, encrypted)));
    }
    let inb = pick(FlowPhase::Close, true);
    assert_eq!(inb.verdict, FlowVerdict::Forwarded, "{inb}");
    assert!(inb.encrypted);
    assert_eq!(
        inb.source.identity.as_deref(),
        Some("spiffe://cluster.local/ns/default/sa/client-sa")
    );
    // Attributed to the client pod through the forwarded header, which A wrote.
    assert_eq!(inb.source.pod.as_deref(), Some("client"));
    assert_eq!(inb.source.addr.ip(), mesh.client_ip);
    assert_eq!(inb.policy, None, "allow-all has no verdict to give");

    let plain = pick(FlowPhase::Close, false);
    assert_eq!(plain.verdict, FlowVerdict::Forwarded, "{plain}");
    assert!(
        !plain.encrypted,
        "plaintext inbound is not encrypted: {plain}"
    );
    assert_eq!(plain.source.identity, None);
    assert_eq!(plain.source.addr.ip(), ip(mesh.net, 9));
    assert_eq!(plain.destination.pod.as_deref(), Some("server"));
    assert_eq!((plain.bytes_sent, plain.bytes_received), (5, 5));
    assert!(plain.to_string().contains("plaintext FORWARDED"), "{plain}");
}

#[tokio::test]
async fn strict_mode_plaintext_is_a_dropped_flow() {
    let mesh = Mesh::with(
        45,
        MeshOptions {
            config: Box::new(|c| c.mode = zmesh_proxy::Mode::Strict),
            ..MeshOptions::default()
        },
    )
    .await;
    let mut sub = mesh.b.flows.subscribe(FlowFilter::default());
    let mut p = connect_from(ip(mesh.net, 9), mesh.b.addrs.plaintext).await;
    let mut buf = [0u8; 1];
    let _ = tokio::time::timeout(T, p.read(&mut buf)).await.unwrap();
    let e = next(&mut sub).await;
    assert_eq!(e.verdict, FlowVerdict::Dropped, "{e}");
    assert!(!e.encrypted);
    assert_eq!(e.reason.as_deref(), Some("plaintext_strict"));
    assert_eq!(e.destination.pod.as_deref(), Some("server"));
    let metrics = scrape(mesh.b.addrs.metrics).await;
    assert!(
        metrics.contains(r#"zmesh_flow_drops_total{reason="plaintext_strict"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn policies_apply_to_plaintext_sources_too() {
    // Without this, permissive mode would let plaintext around an ALLOW-by-principal.
    let mesh = Mesh::with(
        46,
        MeshOptions {
            authorizer: Some(Arc::new(PolicyAuthorizer::new(
                Arc::new(PolicyStore::new(policies(&[policy(
                    "default",
                    "mtls-only",
                    "action: DENY\nrules:\n- from:\n  - source: {notPrincipals: [\"*\"]}",
                )]))),
                Arc::new(TableLabels),
            ))),
            ..MeshOptions::default()
        },
    )
    .await;
    let mut sub = mesh.b.flows.subscribe(FlowFilter::default());
    let mut p = connect_from(ip(mesh.net, 9), mesh.b.addrs.plaintext).await;
    let mut buf = [0u8; 1];
    let r = tokio::time::timeout(T, p.read(&mut buf)).await.unwrap();
    assert!(!matches!(r, Ok(n) if n > 0), "no data may pass: {r:?}");
    let e = next(&mut sub).await;
    assert_eq!(e.verdict, FlowVerdict::Denied, "{e}");
    assert!(!e.encrypted);
    assert_eq!(
        e.denial(),
        Some(&Denial::DenyPolicy {
            policy: "default/mtls-only".parse().unwrap(),
            rule: 0
        })
    );
    // mTLS through the mesh is still allowed.
    let server = async {
        let (mut s, _) = mesh.server.accept().await.unwrap();
        s.write_all(b"x").await.unwrap();
    };
    let client = async {
        let mut c = mesh.connect().await;
        let mut b = [0u8; 1];
        c.read_exact(&mut b).await.unwrap();
    };
    tokio::time::timeout(T, futures::future::join(server, client))
        .await
        .unwrap();
}
