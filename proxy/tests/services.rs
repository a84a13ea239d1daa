//! Kubernetes Services: a client dials a VIP, proxy A picks one of the service's endpoints
//! (HBONE to an enrolled one, plain TCP to any other), spreads, sticks with ClientIP
//! affinity, retries another endpoint when one fails, and resets the client when no
//! endpoint serves the port. Proxy B resolves HBONE authorities that name a service by
//! hostname (`<name>.<namespace>.svc.<cluster domain>:<port>`) to a local endpoint.

mod common;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use h2::client::SendRequest;
use http::{Method, Request, StatusCode};
use rustls::sign::CertifiedKey;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;
use zmesh_identity::{SharedBundle, TrustDomain, WorkloadId};
use zmesh_proxy::flows::{FlowEvent, FlowFilter, FlowPhase, FlowSubscription, FlowVerdict};

/// How connections ended (what these tests check), without their open events.
fn closed() -> FlowFilter {
    FlowFilter {
        phases: vec![FlowPhase::Close],
        ..FlowFilter::default()
    }
}
use zmesh_proxy::{
    Direction, Endpoint, Outcome, ProxyConfig, ProxyDeps, Service, ServicePort, StaticOriginalDst,
    TargetPort, WorkloadStore, WorkloadTable,
};

const T: Duration = Duration::from_secs(30);

fn id(sa: &str) -> WorkloadId {
    WorkloadId::new(&TrustDomain::default(), "shop", sa).unwrap()
}

/// An endpoint's server: on every connection it says its name and a newline, then echoes.
/// Aborting the handle closes the port.
async fn named_server(ip: IpAddr, port: u16, name: &'static str) -> (u16, JoinHandle<()>) {
    let l = TcpListener::bind(SocketAddr::new(ip, port)).await.unwrap();
    let port = l.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                if s.write_all(format!("{name}\n").as_bytes()).await.is_err() {
                    return;
                }
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    (port, task)
}

/// A port on `ip` that nothing listens on.
async fn closed_port(ip: IpAddr) -> u16 {
    let l = TcpListener::bind(SocketAddr::new(ip, 0)).await.unwrap();
    l.local_addr().unwrap().port()
}

struct Cluster {
    ca: Ca,
    a: Running,
    b: Running,
}

/// Proxy A (node a, certificates for the `a_sas` of namespace shop) taking each client IP
/// of `routes` to its original destination, and proxy B (node b, certificates for
/// `b_sas`), on 127.77.`net`.0/24. The table is `yaml`, where `{B}` stands for B's HBONE
/// address, plus the `extra` services.
async fn cluster(
    net: u8,
    yaml: &str,
    extra: Vec<Service>,
    a_sas: &[&str],
    b_sas: &[&str],
    routes: Vec<(IpAddr, SocketAddr)>,
    b_config: impl Fn(&mut ProxyConfig),
) -> Cluster {
    let ca = Ca::new("cluster.local");
    let store = Arc::new(WorkloadStore::new(WorkloadTable::default()));
    let ids = |sas: &[&str]| sas.iter().map(|s| id(s)).collect::<Vec<_>>();
    let b_ids = ids(b_sas);
    let mut cfg_b = ProxyConfig::explicit("b", ip(net, 20));
    b_config(&mut cfg_b);
    let deps_b = ProxyDeps::new(
        store.clone(),
        ca.credentials(&b_ids.iter().collect::<Vec<_>>()),
    );
    let b = Running::start(cfg_b, deps_b).await;
    let a_ids = ids(a_sas);
    let mut deps_a = ProxyDeps::new(
        store.clone(),
        ca.credentials(&a_ids.iter().collect::<Vec<_>>()),
    );
    deps_a.original_dst = Arc::new(StaticOriginalDst::new(routes));
    let a = Running::start(ProxyConfig::explicit("a", ip(net, 10)), deps_a).await;
    let yaml = yaml.replace("{B}", &b.addrs.inbound.to_string());
    let table = WorkloadTable::from_yaml(&yaml)
        .unwrap()
        .with_services(extra)
        .unwrap();
    store.replace(table);
    Cluster { ca, a, b }
}

/// A connection from `src` through proxy A, once the endpoint said its name.
async fn hello(c: &Cluster, src: IpAddr) -> (TcpStream, String) {
    let mut s = connect_from(src, c.a.addrs.outbound).await;
    let mut name = Vec::new();
    loop {
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(T, s.read(&mut b))
            .await
            .expect("the endpoint said nothing")
            .unwrap_or_else(|e| panic!("read failed after {name:?}: {e}"));
        assert_eq!(n, 1, "closed after {name:?}");
        if b[0] == b'\n' {
            return (s, String::from_utf8(name).unwrap());
        }
        name.push(b[0]);
    }
}

/// Echoes a message, then closes; the proxy then finishes the connection.
async fn bye(mut s: TcpStream) {
    s.write_all(b"ping").await.unwrap();
    let mut got = [0u8; 4];
    tokio::time::timeout(T, s.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got, b"ping");
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert!(rest.is_empty());
}

/// Which endpoint a whole connection from `src` reached.
async fn who(c: &Cluster, src: IpAddr) -> String {
    let (s, name) = hello(c, src).await;
    bye(s).await;
    name
}

/// Which endpoint a connection reached whose client wrote "ping" before proxy A accepted
/// it (connected and written without yielding to the runtime the proxies run on); the
/// echo must come back once, after the endpoint's name.
async fn who_speaking_first(c: &Cluster, src: IpAddr) -> String {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&SocketAddr::new(src, 0).into()).unwrap();
    sock.connect(&c.a.addrs.outbound.into()).unwrap();
    let mut s: std::net::TcpStream = sock.into();
    std::io::Write::write_all(&mut s, b"ping").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    s.set_nonblocking(true).unwrap();
    let mut s = TcpStream::from_std(s).unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    let got = String::from_utf8(got).unwrap();
    let Some(name) = got.strip_suffix("\nping") else {
        panic!("got {got:?}");
    };
    name.to_string()
}

async fn next(sub: &mut FlowSubscription) -> Arc<FlowEvent> {
    tokio::time::timeout(T, sub.recv())
        .await
        .expect("no flow event")
        .expect("hub gone")
}

#[tokio::test]
async fn a_vip_connection_reaches_an_endpoint_over_hbone() {
    let net = 120;
    let (port, _server) = named_server(ip(net, 2), 0, "web-1").await;
    let vip = SocketAddr::new(ip(net, 100), 80);
    let yaml = format!(
        r#"
nodes: [{{name: b, hbone: "{{B}}"}}]
workloads:
  - {{name: client, namespace: shop, serviceAccount: client, node: a, ips: [{client}]}}
  - {{name: web-1, namespace: shop, serviceAccount: web, node: b, ips: [{web1}], labels: {{app: web}}, ports: {{http: {port}}}}}
services:
  - {{name: web, namespace: shop, vips: [{vip}], ports: [{{port: 80, targetPort: http}}], selector: {{app: web}}}}
"#,
        client = ip(net, 1),
        web1 = ip(net, 2),
        vip = vip.ip(),
    );
    let c = cluster(
        net,
        &yaml,
        vec![],
        &["client"],
        &["web"],
        vec![(ip(net, 1), vip)],
        |_| {},
    )
    .await;
    let mut a_flows = c.a.flows.subscribe(closed());
    let mut b_flows = c.b.flows.subscribe(closed());

    assert_eq!(who(&c, ip(net, 1)).await, "web-1");

    let endpoint = SocketAddr::new(ip(net, 2), port);
    let out = next(&mut a_flows).await;
    assert_eq!(out.verdict, FlowVerdict::Forwarded, "{out}");
    assert!(out.encrypted, "over HBONE: {out}");
    assert_eq!(out.service.as_deref(), Some("shop/web"));
    assert_eq!(out.destination.pod.as_deref(), Some("web-1"));
    assert_eq!(
        out.destination.addr, endpoint,
        "the endpoint, never the VIP"
    );
    assert_eq!(
        out.destination.identity.as_deref(),
        Some("spiffe://cluster.local/ns/shop/sa/web")
    );
    assert_eq!(out.source.pod.as_deref(), Some("client"));
    let json = serde_json::to_value(&*out).unwrap();
    assert_eq!(json["service"], "shop/web");
    assert!(out.to_string().contains("-> shop/web-1:"), "{out}");
    assert!(
        out.to_string()
            .contains("(service shop/web) mTLS FORWARDED"),
        "{out}"
    );
    // B saw a tunnel to the endpoint's address (the CONNECT named it, not the VIP).
    let inb = next(&mut b_flows).await;
    assert_eq!(inb.verdict, FlowVerdict::Forwarded, "{inb}");
    assert_eq!(inb.destination.addr, endpoint);
    assert_eq!(inb.destination.pod.as_deref(), Some("web-1"));
    assert_eq!(
        inb.source.identity.as_deref(),
        Some("spiffe://cluster.local/ns/shop/sa/client")
    );
    assert_eq!(inb.service, None, "B only saw the endpoint's address");
    assert_eq!(
        c.a.metrics.closed_count(Direction::Outbound, Outcome::Ok),
        1
    );
    assert_eq!(c.b.metrics.closed_count(Direction::Inbound, Outcome::Ok), 1);
}

/// Two endpoints on node b serving port 80 of shop/web on different target ports; the
/// service's extra YAML (e.g. affinity) is `service_extra`.
fn two_endpoints(net: u8, ports: [u16; 2], service_extra: &str) -> String {
    format!(
        r#"
nodes: [{{name: b, hbone: "{{B}}"}}]
workloads:
  - {{name: client, namespace: shop, serviceAccount: client, node: a, ips: [{c1}]}}
  - {{name: other, namespace: shop, serviceAccount: client, node: a, ips: [{c2}]}}
  - {{name: web-1, namespace: shop, serviceAccount: web, node: b, ips: [{w1}], labels: {{app: web}}, ports: {{http: {p1}}}}}
  - {{name: web-2, namespace: shop, serviceAccount: web, node: b, ips: [{w2}], labels: {{app: web}}, ports: {{http: {p2}}}}}
services:
  - name: web
    namespace: shop
    vips: [{vip}]
    ports: [{{port: 80, targetPort: http}}]
    selector: {{app: web}}
{service_extra}
"#,
        c1 = ip(net, 1),
        c2 = ip(net, 5),
        w1 = ip(net, 2),
        w2 = ip(net, 3),
        p1 = ports[0],
        p2 = ports[1],
        vip = ip(net, 100),
    )
}

#[tokio::test]
async fn connections_spread_over_the_endpoints() {
    let net = 121;
    let (p1, _s1) = named_server(ip(net, 2), 0, "web-1").await;
    let (p2, _s2) = named_server(ip(net, 3), 0, "web-2").await;
    let vip = SocketAddr::new(ip(net, 100), 80);
    let yaml = two_endpoints(net, [p1, p2], "");
    let c = cluster(
        net,
        &yaml,
        vec![],
        &["client"],
        &["web"],
        vec![(ip(net, 1), vip)],
        |_| {},
    )
    .await;
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..40 {
        *seen.entry(who(&c, ip(net, 1)).await).or_default() += 1;
    }
    // Uniform choice: both get some (all 40 on one has probability 2^-39).
    assert_eq!(
        seen.keys().collect::<Vec<_>>(),
        ["web-1", "web-2"],
        "{seen:?}"
    );
}

#[tokio::test]
async fn client_ip_affinity_keeps_a_client_on_its_endpoint_and_repins_when_it_fails() {
    let net = 122;
    let (p1, s1) = named_server(ip(net, 2), 0, "web-1").await;
    let (p2, s2) = named_server(ip(net, 3), 0, "web-2").await;
    let vip = SocketAddr::new(ip(net, 100), 80);
    let yaml = two_endpoints(net, [p1, p2], "    sessionAffinity: ClientIP");
    let routes = vec![(ip(net, 1), vip), (ip(net, 5), vip)];
    let c = cluster(net, &yaml, vec![], &["client"], &["web"], routes, |_| {}).await;
    let first = who(&c, ip(net, 1)).await;
    for i in 0..39 {
        assert_eq!(who(&c, ip(net, 1)).await, first, "connection {i}");
    }
    // Another client has its own pin (whichever it is), kept as well.
    let theirs = who(&c, ip(net, 5)).await;
    for _ in 0..10 {
        assert_eq!(who(&c, ip(net, 5)).await, theirs);
    }

    // The pinned endpoint goes away: the next connection moves, and stays moved even once
    // it is back.
    let (gone, gone_ip, gone_port, other) = if first == "web-1" {
        (s1, ip(net, 2), p1, "web-2")
    } else {
        (s2, ip(net, 3), p2, "web-1")
    };
    gone.abort();
    assert!(gone.await.unwrap_err().is_cancelled());
    for _ in 0..10 {
        assert_eq!(who(&c, ip(net, 1)).await, other);
    }
    let name = if first == "web-1" { "web-1" } else { "web-2" };
    let (_back, _) = named_server(gone_ip, gone_port, name).await;
    for _ in 0..10 {
        assert_eq!(who(&c, ip(net, 1)).await, other, "re-pinned");
    }
    // The client saw every one; the proxy counts each as it ends.
    wait_for("A's connections counted", T, || {
        c.a.metrics.closed_count(Direction::Outbound, Outcome::Ok) == 71
    })
    .await;
    wait_for("B's refused attempt counted", T, || {
        c.b.metrics
            .closed_count(Direction::Inbound, Outcome::ConnectFailed)
            >= 1
    })
    .await;
}

#[tokio::test]
async fn a_failing_endpoint_is_replaced_by_another_before_the_client_sees_it() {
    let net = 123;
    let (good, _server) = named_server(ip(net, 2), 0, "web-1").await;
    // web-2's port is closed (B answers the CONNECT 503); web-3's node refuses HBONE.
    let refused = closed_port(ip(net, 3)).await;
    let no_hbone = SocketAddr::new(ip(net, 30), closed_port(ip(net, 30)).await);
    let vip = SocketAddr::new(ip(net, 100), 80);
    let yaml = format!(
        r#"
nodes: [{{name: b, hbone: "{{B}}"}}, {{name: c, hbone: "{no_hbone}"}}]
workloads:
  - {{name: client, namespace: shop, serviceAccount: client, node: a, ips: [{c1}]}}
  - {{name: web-1, namespace: shop, serviceAccount: web, node: b, ips: [{w1}], labels: {{app: web}}, ports: {{http: {good}}}}}
  - {{name: web-2, namespace: shop, serviceAccount: web, node: b, ips: [{w2}], labels: {{app: web}}, ports: {{http: {refused}}}}}
  - {{name: web-3, namespace: shop, serviceAccount: web, node: c, ips: [{w3}], labels: {{app: web}}, ports: {{http: {good}}}}}
services:
  - {{name: web, namespace: shop, vips: [{vip}], ports: [{{port: 80, targetPort: http}}], selector: {{app: web}}}}
"#,
        c1 = ip(net, 1),
        w1 = ip(net, 2),
        w2 = ip(net, 3),
        w3 = ip(net, 4),
        vip = vip.ip(),
    );
    let c = cluster(
        net,
        &yaml,
        vec![],
        &["client"],
        &["web"],
        vec![(ip(net, 1), vip)],
        |_| {},
    )
    .await;
    let mut flows = c.a.flows.subscribe(closed());
    for i in 0..40 {
        // Every other client speaks first: its bytes, sent with a CONNECT that web-2's
        // node refused, reach web-1 once.
        let name = if i % 2 == 0 {
            who(&c, ip(net, 1)).await
        } else {
            who_speaking_first(&c, ip(net, 1)).await
        };
        assert_eq!(name, "web-1", "connection {i}");
        let f = next(&mut flows).await;
        assert_eq!(f.verdict, FlowVerdict::Forwarded, "{f}");
        assert_eq!(f.destination.pod.as_deref(), Some("web-1"), "{f}");
        assert_eq!(f.destination.addr, SocketAddr::new(ip(net, 2), good));
    }
    assert_eq!(
        c.a.metrics.closed_count(Direction::Outbound, Outcome::Ok),
        40
    );
    // web-2 was tried (and answered 503) at least once; no attempt reached the client.
    wait_for("B's refused attempts counted", T, || {
        c.b.metrics
            .closed_count(Direction::Inbound, Outcome::ConnectFailed)
            >= 1
    })
    .await;
    for o in [
        Outcome::HboneConnectFailed,
        Outcome::Status503,
        Outcome::ConnectFailed,
    ] {
        assert_eq!(c.a.metrics.closed_count(Direction::Outbound, o), 0, "{o}");
    }
}

#[tokio::test]
async fn no_endpoint_for_the_port_resets_the_client_at_once() {
    let net = 124;
    let (port, _server) = named_server(ip(net, 2), 0, "web-1").await;
    let web = ip(net, 100);
    let nobody = ip(net, 101);
    let yaml = format!(
        r#"
nodes: [{{name: b, hbone: "{{B}}"}}]
workloads:
  - {{name: client, namespace: shop, serviceAccount: client, node: a, ips: [{c1}]}}
  - {{name: other, namespace: shop, serviceAccount: client, node: a, ips: [{c2}]}}
  - {{name: web-1, namespace: shop, serviceAccount: web, node: b, ips: [{w1}], labels: {{app: web}}, ports: {{http: {port}}}}}
services:
  - name: web
    namespace: shop
    vips: [{web}]
    ports: [{{port: 80, targetPort: http}}, {{port: 81, targetPort: grpc}}]
    selector: {{app: web}}
  - {{name: nobody, namespace: shop, vips: [{nobody}], ports: [{{port: 80}}], selector: {{app: nothing}}}}
"#,
        c1 = ip(net, 1),
        c2 = ip(net, 5),
        w1 = ip(net, 2),
    );
    // The VIPs' ports are open (were they ever dialed, the client would get a connection).
    let _vip_listeners = [
        TcpListener::bind(SocketAddr::new(nobody, 80))
            .await
            .unwrap(),
        TcpListener::bind(SocketAddr::new(web, 81)).await.unwrap(),
    ];
    let routes = vec![
        (ip(net, 1), SocketAddr::new(nobody, 80)),
        (ip(net, 5), SocketAddr::new(web, 81)),
    ];
    let c = cluster(net, &yaml, vec![], &["client"], &["web"], routes, |_| {}).await;
    let mut flows = c.a.flows.subscribe(closed());
    for (src, vip, service) in [
        (ip(net, 1), SocketAddr::new(nobody, 80), "shop/nobody"),
        (ip(net, 5), SocketAddr::new(web, 81), "shop/web"),
    ] {
        let started = Instant::now();
        let mut s = connect_from(src, c.a.addrs.outbound).await;
        let mut buf = [0u8; 16];
        let r = tokio::time::timeout(T, s.read(&mut buf)).await.unwrap();
        let err = r.expect_err("the connection must be reset, not closed nor served");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
        assert!(started.elapsed() < Duration::from_secs(5), "not at once");
        let f = next(&mut flows).await;
        assert_eq!(f.verdict, FlowVerdict::Error, "{f}");
        assert_eq!(f.reason.as_deref(), Some("no_endpoints"));
        assert_eq!(f.service.as_deref(), Some(service));
        assert_eq!(f.destination.addr, vip);
        assert!(!f.encrypted);
    }
    assert_eq!(
        c.a.metrics
            .closed_count(Direction::Outbound, Outcome::NoEndpoints),
        2
    );
    assert_eq!(c.b.metrics.closed_count(Direction::Inbound, Outcome::Ok), 0);
}

#[tokio::test]
async fn endpoints_outside_the_mesh_are_dialed_in_plaintext() {
    let net = 125;
    // A workload with protocol tcp on node b, and an endpoint that is no workload at all.
    let (legacy_port, _s1) = named_server(ip(net, 4), 0, "legacy").await;
    let (ext_port, _s2) = named_server(ip(net, 7), 0, "external").await;
    let legacy_vip = SocketAddr::new(ip(net, 100), 80);
    let ext_vip = SocketAddr::new(ip(net, 101), 443);
    let yaml = format!(
        r#"
nodes: [{{name: b, hbone: "{{B}}"}}]
workloads:
  - {{name: client, namespace: shop, serviceAccount: client, node: a, ips: [{c1}]}}
  - {{name: other, namespace: shop, serviceAccount: client, node: a, ips: [{c2}]}}
  - {{name: legacy, namespace: shop, serviceAccount: legacy, node: b, ips: [{l}], protocol: tcp, labels: {{app: legacy}}}}
services:
  - {{name: legacy, namespace: shop, vips: [{vip}], ports: [{{port: 80, targetPort: {legacy_port}}}], selector: {{app: legacy}}}}
"#,
        c1 = ip(net, 1),
        c2 = ip(net, 5),
        l = ip(net, 4),
        vip = legacy_vip.ip(),
    );
    let external = Service {
        name: "external".into(),
        namespace: "shop".into(),
        vips: vec![ext_vip.ip()],
        ports: vec![ServicePort {
            name: None,
            port: 443,
            target: TargetPort::Number(ext_port),
        }],
        affinity: None,
        endpoints: vec![Endpoint {
            ip: ip(net, 7),
            ports: [(443, ext_port)].into_iter().collect(),
        }],
    };
    let routes = vec![(ip(net, 1), legacy_vip), (ip(net, 5), ext_vip)];
    let c = cluster(
        net,
        &yaml,
        vec![external],
        &["client"],
        &["web"],
        routes,
        |_| {},
    )
    .await;
    let mut flows = c.a.flows.subscribe(closed());

    assert_eq!(who(&c, ip(net, 1)).await, "legacy");
    let f = next(&mut flows).await;
    assert_eq!(f.verdict, FlowVerdict::Forwarded, "{f}");
    assert!(!f.encrypted, "{f}");
    assert_eq!(f.service.as_deref(), Some("shop/legacy"));
    assert_eq!(f.destination.addr, SocketAddr::new(ip(net, 4), legacy_port));
    assert_eq!(f.destination.pod.as_deref(), Some("legacy"));
    assert_eq!(f.destination.identity, None, "nothing proved it");

    assert_eq!(who(&c, ip(net, 5)).await, "external");
    let f = next(&mut flows).await;
    assert_eq!(f.verdict, FlowVerdict::Forwarded, "{f}");
    assert!(!f.encrypted, "{f}");
    assert_eq!(f.service.as_deref(), Some("shop/external"));
    assert_eq!(f.destination.addr, SocketAddr::new(ip(net, 7), ext_port));
    assert_eq!(f.destination.pod, None);

    assert_eq!(
        c.a.metrics
            .closed_count(Direction::Outbound, Outcome::Passthrough),
        2
    );
    // Directly: B (node b's proxy) saw neither.
    assert_eq!(c.a.metrics.pool_connections_created(), 0);
    assert_eq!(c.b.metrics.inbound_tls_connections(), 0);
}

/// Node b serving shop/web (web-1 on b) and shop/remote (only on node a); the raw client
/// is `client` of shop.
async fn hostname_cluster(net: u8, domain: Option<&str>) -> (Cluster, u16) {
    // Dropping the handle leaves the server running.
    let (port, _) = named_server(ip(net, 2), 0, "web-1").await;
    let yaml = format!(
        r#"
workloads:
  - {{name: client, namespace: shop, serviceAccount: client, node: a, ips: [{c1}], labels: {{app: remote}}, ports: {{http: 8080}}}}
  - {{name: web-1, namespace: shop, serviceAccount: web, node: b, ips: [{w1}], labels: {{app: web}}, ports: {{http: {port}}}}}
services:
  - {{name: web, namespace: shop, vips: [{v1}], ports: [{{port: 80, targetPort: http}}, {{port: 81, targetPort: grpc}}], selector: {{app: web}}}}
  - {{name: remote, namespace: shop, vips: [{v2}], ports: [{{port: 80, targetPort: http}}], selector: {{app: remote}}}}
"#,
        c1 = ip(net, 1),
        w1 = ip(net, 2),
        v1 = ip(net, 100),
        v2 = ip(net, 101),
    );
    let domain = domain.map(str::to_owned);
    let c = cluster(
        net,
        &yaml,
        vec![],
        &["client"],
        &["web"],
        vec![],
        move |cfg| {
            if let Some(d) = &domain {
                cfg.cluster_domain = d.clone();
            }
        },
    )
    .await;
    (c, port)
}

/// A TLS + HTTP/2 connection to B's HBONE port as shop/client.
async fn h2_to_b(c: &Cluster) -> SendRequest<Bytes> {
    let tcp = TcpStream::connect(c.b.addrs.inbound).await.unwrap();
    let (chain, key) = c.ca.leaf(&id("client").to_string());
    let provider = zmesh_identity::tls::crypto_provider();
    let cert = Arc::new(CertifiedKey::from_der(chain, key, &provider).unwrap());
    let bundle = SharedBundle::new(c.ca.bundle());
    let expected = vec![id("web").spiffe_id().clone()];
    let config = zmesh_identity::tls::client_config(cert, bundle, expected).unwrap();
    let name = ServerName::IpAddress(c.b.addrs.inbound.ip().into());
    let tls = TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    let (send, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(conn);
    send
}

/// CONNECTs to `authority`; on 200, checks the endpoint says `web-1` and echoes, then ends
/// the tunnel.
async fn connect_to(send: &SendRequest<Bytes>, authority: &str) -> StatusCode {
    let req = Request::builder()
        .method(Method::CONNECT)
        .uri(authority)
        .body(())
        .unwrap();
    let mut send = send.clone().ready().await.unwrap();
    let (resp, mut tx) = send.send_request(req, false).unwrap();
    let resp = tokio::time::timeout(T, resp).await.unwrap().unwrap();
    if resp.status() != StatusCode::OK {
        return resp.status();
    }
    let mut rx = resp.into_body();
    let mut got = Vec::new();
    tx.send_data(Bytes::from_static(b"ping"), true).unwrap();
    while let Some(chunk) = tokio::time::timeout(T, rx.data()).await.unwrap() {
        let chunk = chunk.unwrap();
        let _ = rx.flow_control().release_capacity(chunk.len());
        got.extend_from_slice(&chunk);
    }
    assert_eq!(got, b"web-1\nping", "{authority}");
    StatusCode::OK
}

#[tokio::test]
async fn inbound_service_hostnames_resolve_to_a_local_endpoint() {
    let net = 126;
    let (c, port) = hostname_cluster(net, None).await;
    let mut flows = c.b.flows.subscribe(closed());
    let send = h2_to_b(&c).await;

    let web = "web.shop.svc.cluster.local:80";
    assert_eq!(connect_to(&send, web).await, StatusCode::OK);
    let f = next(&mut flows).await;
    assert_eq!(f.verdict, FlowVerdict::Forwarded, "{f}");
    assert_eq!(f.service.as_deref(), Some("shop/web"));
    assert_eq!(f.destination.pod.as_deref(), Some("web-1"));
    assert_eq!(f.destination.addr, SocketAddr::new(ip(net, 2), port));
    assert!(f.encrypted);

    let unavailable = [
        (
            "nope.shop.svc.cluster.local:80",
            "unknown_service",
            "shop/nope",
        ),
        // Its only endpoint is on node a.
        (
            "remote.shop.svc.cluster.local:80",
            "no_endpoints",
            "shop/remote",
        ),
        // No endpoint has a `grpc` port; nor is 82 a port of the service.
        ("web.shop.svc.cluster.local:81", "no_endpoints", "shop/web"),
        ("web.shop.svc.cluster.local:82", "no_endpoints", "shop/web"),
    ];
    for (authority, reason, service) in unavailable {
        let status = connect_to(&send, authority).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{authority}");
        let f = next(&mut flows).await;
        assert_eq!(f.reason.as_deref(), Some(reason), "{authority}: {f}");
        assert_eq!(f.service.as_deref(), Some(service), "{authority}");
    }
    let bad = [
        "web.shop.svc.example.com:80",
        "web.shop:80",
        "localhost:80",
        "web_1.shop.svc.cluster.local:80",
        "a.web.shop.svc.cluster.local:80",
        "web.shop.svc.cluster.local:0",
        "web.shop.svc.cluster.local:99999",
        "web.shop.svc.cluster.local",
    ];
    for authority in bad {
        let status = connect_to(&send, authority).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{authority}");
        let f = next(&mut flows).await;
        assert_eq!(f.reason.as_deref(), Some("bad_request"), "{authority}");
        assert_eq!(f.service, None, "{authority}");
    }
    // The connection survived all of it.
    assert_eq!(connect_to(&send, web).await, StatusCode::OK);
    assert_eq!(next(&mut flows).await.service.as_deref(), Some("shop/web"));
    let m = &c.b.metrics;
    assert_eq!(m.closed_count(Direction::Inbound, Outcome::Ok), 2);
    assert_eq!(
        m.closed_count(Direction::Inbound, Outcome::UnknownService),
        1
    );
    assert_eq!(m.closed_count(Direction::Inbound, Outcome::NoEndpoints), 3);
    assert_eq!(
        m.closed_count(Direction::Inbound, Outcome::BadRequest),
        bad.len() as u64
    );
}

#[tokio::test]
async fn the_cluster_domain_is_configurable() {
    let net = 127;
    let (c, _) = hostname_cluster(net, Some("corp.example")).await;
    let send = h2_to_b(&c).await;
    let ok = connect_to(&send, "web.shop.svc.corp.example:80").await;
    assert_eq!(ok, StatusCode::OK);
    let other = connect_to(&send, "web.shop.svc.cluster.local:80").await;
    assert_eq!(other, StatusCode::BAD_REQUEST);
}
