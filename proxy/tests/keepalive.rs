//! HTTP/2 PING keepalive on HBONE connections, both directions: a peer that stops answering
//! is dropped with its tunnels (counted in `zmesh_hbone_keepalive_failures_total`), a peer
//! that answers keeps its connection. The silent peers are raw TLS endpoints that speak just
//! enough HTTP/2 by hand, since an h2 library would answer PINGs on its own.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use zmesh_identity::TrustDomain;
use zmesh_proxy::{
    Direction, Keepalive, Node, ProxyConfig, ProxyDeps, StaticOriginalDst, TlsCredentials,
    WorkloadStore, WorkloadTable,
};

const T: Duration = Duration::from_secs(30);

/// Short enough for a test, long enough that a healthy loopback peer always answers.
const FAST: Keepalive = Keepalive {
    interval: Duration::from_millis(50),
    timeout: Duration::from_millis(500),
};

const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const HEADERS: u8 = 0x1;
const GOAWAY: u8 = 0x7;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

/// The next frame, or `None` once the peer closed the connection.
async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Option<Frame> {
    let mut head = [0u8; 9];
    r.read_exact(&mut head).await.ok()?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await.ok()?;
    Some(Frame {
        kind: head[3],
        flags: head[4],
        stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
        payload,
    })
}

fn hpack_literal(out: &mut Vec<u8>, name: &str, value: &str) {
    out.push(0x00);
    out.push(name.len() as u8);
    out.extend_from_slice(name.as_bytes());
    out.push(value.len() as u8);
    out.extend_from_slice(value.as_bytes());
}

/// Sends a CONNECT to `target` on `stream` and waits for its 200, acknowledging the
/// proxy's SETTINGS and answering its PINGs meanwhile.
async fn open_tunnel<S: AsyncRead + AsyncWriteExt + Unpin>(
    tls: &mut S,
    stream: u32,
    target: SocketAddr,
) {
    let mut block = Vec::new();
    hpack_literal(&mut block, ":method", "CONNECT");
    hpack_literal(&mut block, ":authority", &target.to_string());
    tls.write_all(&frame(HEADERS, END_HEADERS, stream, &block))
        .await
        .unwrap();
    loop {
        let f = tokio::time::timeout(T, read_frame(tls))
            .await
            .unwrap()
            .expect("the proxy closed the connection before answering the CONNECT");
        match (f.kind, f.flags & ACK) {
            (SETTINGS, 0) => tls.write_all(&frame(SETTINGS, ACK, 0, &[])).await.unwrap(),
            (PING, 0) => tls
                .write_all(&frame(PING, ACK, 0, &f.payload))
                .await
                .unwrap(),
            (HEADERS, _) if f.stream == stream => {
                // HPACK static index 8: `:status: 200`.
                assert_eq!(f.payload.first(), Some(&0x88), "CONNECT refused");
                return;
            }
            _ => {}
        }
    }
}

/// Our inbound proxy (node "b") with a fast keepalive, and an upstream that reports when
/// the tunnel's connection to it ends.
struct Inbound {
    ca: Ca,
    proxy: Running,
    client_id: zmesh_identity::WorkloadId,
    server_id: zmesh_identity::WorkloadId,
    upstream: SocketAddr,
    upstream_closed: tokio::sync::mpsc::UnboundedReceiver<()>,
}

impl Inbound {
    async fn start(net: u8) -> Self {
        let ca = Ca::new("cluster.local");
        let client = workload("client", "client-sa", "a", ip(net, 1));
        let server = workload("server", "server-sa", "b", ip(net, 2));
        let upstream = TcpListener::bind(SocketAddr::new(ip(net, 2), 0))
            .await
            .unwrap();
        let upstream_addr = upstream.local_addr().unwrap();
        let (closed, upstream_closed) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = upstream.accept().await {
                let closed = closed.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
                    let _ = closed.send(());
                });
            }
        });
        let store = Arc::new(WorkloadStore::new(
            WorkloadTable::new(TrustDomain::default(), [], [client.clone(), server.clone()])
                .unwrap(),
        ));
        let deps = ProxyDeps::new(store, ca.credentials(&[&server.identity]));
        let mut config = ProxyConfig::explicit("b", ip(net, 20));
        config.keepalive = FAST;
        let proxy = Running::start(config, deps).await;
        Self {
            ca,
            proxy,
            client_id: client.identity,
            server_id: server.identity,
            upstream: upstream_addr,
            upstream_closed,
        }
    }

    /// mTLS to the HBONE port with the client's SVID, the HTTP/2 preface and our SETTINGS
    /// sent, and one CONNECT tunnel to the upstream answered 200.
    async fn connect_with_tunnel(&self) -> tokio_rustls::client::TlsStream<TcpStream> {
        let creds = self.ca.credentials(&[&self.client_id]);
        let config = creds
            .client_config(&self.client_id, &[self.server_id.spiffe_id().clone()])
            .unwrap();
        let tcp = TcpStream::connect(self.proxy.addrs.inbound).await.unwrap();
        let name = rustls_pki_types::ServerName::IpAddress(self.proxy.addrs.inbound.ip().into());
        let mut tls = TlsConnector::from(config).connect(name, tcp).await.unwrap();
        tls.write_all(PREFACE).await.unwrap();
        tls.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
        open_tunnel(&mut tls, 1, self.upstream).await;
        tls
    }
}

#[tokio::test]
async fn inbound_drops_a_peer_that_stops_answering_pings_and_its_tunnels() {
    let mut s = Inbound::start(80).await;
    let mut tls = s.connect_with_tunnel().await;

    // Read everything, answer nothing: the proxy pings, gives up, and closes.
    let mut pings = 0;
    let outcome = tokio::time::timeout(T, async {
        while let Some(f) = read_frame(&mut tls).await {
            if f.kind == PING && f.flags & ACK == 0 {
                pings += 1;
            }
            if f.kind == GOAWAY {
                return "goaway";
            }
        }
        "closed"
    })
    .await
    .expect("the proxy kept a silent peer's connection open");
    assert!(pings >= 1, "closed ({outcome}) without pinging first");
    assert_eq!(
        s.proxy.metrics.keepalive_failure_count(Direction::Inbound),
        1
    );
    // The tunnel it carried is gone too: the workload's side of it was closed.
    tokio::time::timeout(T, s.upstream_closed.recv())
        .await
        .expect("the tunnel to the workload stayed open")
        .unwrap();
}

#[tokio::test]
async fn inbound_keeps_a_peer_that_answers_pings() {
    let s = Inbound::start(81).await;
    let mut tls = s.connect_with_tunnel().await;

    // Answer three PINGs, each within the timeout, then prove the connection still works.
    let mut answered = 0;
    while answered < 3 {
        let f = tokio::time::timeout(T, read_frame(&mut tls))
            .await
            .unwrap()
            .expect("the proxy closed a connection whose peer answers its PINGs");
        assert_ne!(f.kind, GOAWAY, "GOAWAY to a peer that answers PINGs");
        if f.kind == PING && f.flags & ACK == 0 {
            tls.write_all(&frame(PING, ACK, 0, &f.payload))
                .await
                .unwrap();
            answered += 1;
        }
    }
    open_tunnel(&mut tls, 3, s.upstream).await;
    assert_eq!(
        s.proxy.metrics.keepalive_failure_count(Direction::Inbound),
        0
    );
}

/// A raw HBONE server (node "b") that answers one CONNECT with 200 and then goes silent:
/// it keeps the connection open but never answers a PING.
async fn silent_hbone_server(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    pinged: tokio::sync::mpsc::UnboundedSender<()>,
) {
    let (tcp, _) = listener.accept().await.unwrap();
    let mut tls = acceptor.accept(tcp).await.unwrap();
    let mut preface = [0u8; PREFACE.len()];
    tls.read_exact(&mut preface).await.unwrap();
    assert_eq!(&preface, PREFACE);
    tls.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
    while let Some(f) = read_frame(&mut tls).await {
        match (f.kind, f.flags & ACK) {
            (SETTINGS, 0) => tls.write_all(&frame(SETTINGS, ACK, 0, &[])).await.unwrap(),
            (HEADERS, _) => tls
                .write_all(&frame(HEADERS, END_HEADERS, f.stream, &[0x88]))
                .await
                .unwrap(),
            (PING, 0) => {
                let _ = pinged.send(());
            }
            _ => {}
        }
    }
}

#[tokio::test]
async fn outbound_pool_drops_a_peer_that_stops_answering_pings_and_its_tunnels() {
    let net = 82;
    let ca = Ca::new("cluster.local");
    let client = workload("client", "client-sa", "a", ip(net, 1));
    let server = workload("server", "server-sa", "b", ip(net, 2));
    let listener = TcpListener::bind(SocketAddr::new(ip(net, 30), 0))
        .await
        .unwrap();
    let hbone = listener.local_addr().unwrap();
    let server_config = ca
        .credentials(&[&server.identity])
        .server_config(&server.identity)
        .unwrap();
    let (pinged, mut pings) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(silent_hbone_server(
        listener,
        TlsAcceptor::from(server_config),
        pinged,
    ));

    let nodes = [Node {
        name: "b".into(),
        hbone: Some(hbone),
    }];
    let table = WorkloadTable::new(
        TrustDomain::default(),
        nodes,
        [client.clone(), server.clone()],
    )
    .unwrap();
    let mut deps = ProxyDeps::new(
        Arc::new(WorkloadStore::new(table)),
        ca.credentials(&[&client.identity]),
    );
    deps.original_dst = Arc::new(StaticOriginalDst::new([(
        client.ips[0],
        SocketAddr::new(server.ips[0], 7000),
    )]));
    let mut config = ProxyConfig::explicit("a", ip(net, 10));
    config.keepalive = FAST;
    let proxy = Running::start(config, deps).await;

    let mut app = connect_from(client.ips[0], proxy.addrs.outbound).await;
    wait_for("the pooled HBONE connection", T, || {
        proxy.metrics.pool_connections() == 1
    })
    .await;
    tokio::time::timeout(T, pings.recv())
        .await
        .expect("the pool never pinged its peer")
        .unwrap();

    // The peer never answers: the pool drops the connection, and the app's tunnel ends.
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(T, app.read(&mut buf))
        .await
        .expect("the app's tunnel stayed open over a dead HBONE connection");
    assert!(matches!(read, Ok(0) | Err(_)), "unexpected data: {read:?}");
    wait_for("the dead connection to leave the pool", T, || {
        proxy.metrics.pool_connections() == 0
    })
    .await;
    assert_eq!(
        proxy.metrics.keepalive_failure_count(Direction::Outbound),
        1
    );
}
