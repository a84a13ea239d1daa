//! The outbound pool when the peer ends pooled connections: against a test-side HBONE server
//! (mTLS + h2, answering CONNECT with 200 and echoing) that can send a graceful GOAWAY or
//! reset a chosen connection. Open tunnels survive a GOAWAY, new tunnels go on a new
//! connection, and a connection the peer closed is replaced without the user noticing.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use h2::server::SendResponse;
use h2::RecvStream;
use http::{Method, Request, Response, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_rustls::TlsAcceptor;
use zmesh_identity::TrustDomain;
use zmesh_proxy::{
    Direction, Node, Outcome, PoolConfig, ProxyConfig, ProxyDeps, StaticOriginalDst,
    TlsCredentials, Workload, WorkloadStore, WorkloadTable,
};

const T: Duration = Duration::from_secs(30);

/// Where the client's connections are headed (the server workload's IP, any port).
const DST_PORT: u16 = 7000;

enum Cmd {
    /// `graceful_shutdown()`: GOAWAY(2^31-1) + PING, then GOAWAY(last stream) on the ack.
    GoAway(oneshot::Sender<()>),
    /// Close the socket with SO_LINGER 0 (TCP RST), no TLS close_notify, no GOAWAY.
    Reset(oneshot::Sender<()>),
}

/// What the test server knows of one accepted connection.
struct ConnState {
    cmd: mpsc::UnboundedSender<Cmd>,
    /// CONNECT requests answered on it.
    tunnels: AtomicUsize,
    /// The header blocks of those requests, in arrival order.
    requests: Mutex<Vec<http::HeaderMap>>,
    /// How its h2 connection future ended; `None` while it runs.
    end: Mutex<Option<Result<(), String>>>,
}

/// A raw HBONE server: the destination's SVID, client certificates required, h2, CONNECT
/// answered with 200 and the stream's bytes echoed back (END_STREAM answered with END_STREAM).
struct HboneServer {
    addr: SocketAddr,
    /// In accept order (TLS and h2 handshakes done).
    conns: Arc<Mutex<Vec<Arc<ConnState>>>>,
}

impl HboneServer {
    async fn start(bind: IpAddr, ca: &Ca, server: &Workload) -> Self {
        let config = ca
            .credentials(&[&server.identity])
            .server_config(&server.identity)
            .unwrap();
        let acceptor = TlsAcceptor::from(config);
        let listener = TcpListener::bind(SocketAddr::new(bind, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conns: Arc<Mutex<Vec<Arc<ConnState>>>> = Arc::default();
        let list = conns.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                tokio::spawn(serve_conn(tcp, acceptor.clone(), list.clone()));
            }
        });
        Self { addr, conns }
    }

    fn conn(&self, i: usize) -> Arc<ConnState> {
        self.conns.lock().unwrap()[i].clone()
    }

    /// TLS connections accepted so far.
    fn accepted(&self) -> usize {
        self.conns.lock().unwrap().len()
    }

    /// Tunnels carried by connection `i` (in accept order).
    fn tunnels(&self, i: usize) -> usize {
        self.conn(i).tunnels.load(Ordering::SeqCst)
    }

    fn end(&self, i: usize) -> Option<Result<(), String>> {
        self.conn(i).end.lock().unwrap().clone()
    }

    /// Starts a graceful shutdown of connection `i`; returns once `graceful_shutdown()` ran,
    /// so that everything the server sends afterwards on it follows the GOAWAY frame.
    async fn goaway(&self, i: usize) {
        let (done, wait) = oneshot::channel();
        self.conn(i).cmd.send(Cmd::GoAway(done)).ok().unwrap();
        tokio::time::timeout(T, wait).await.unwrap().unwrap();
    }

    /// Resets connection `i`; returns once the socket is closed.
    async fn reset(&self, i: usize) {
        let (done, wait) = oneshot::channel();
        self.conn(i).cmd.send(Cmd::Reset(done)).ok().unwrap();
        tokio::time::timeout(T, wait).await.unwrap().unwrap();
    }
}

async fn serve_conn(tcp: TcpStream, acceptor: TlsAcceptor, conns: Arc<Mutex<Vec<Arc<ConnState>>>>) {
    // A second handle on the socket, to reset it while h2 owns the stream.
    let raw = tcp.as_fd().try_clone_to_owned().unwrap();
    let Ok(tls) = acceptor.accept(tcp).await else {
        return;
    };
    let Ok(mut conn) = h2::server::handshake(tls).await else {
        return;
    };
    let (cmd, mut commands) = mpsc::unbounded_channel();
    let state = Arc::new(ConnState {
        cmd,
        tunnels: AtomicUsize::new(0),
        requests: Mutex::default(),
        end: Mutex::new(None),
    });
    conns.lock().unwrap().push(state.clone());
    let end = loop {
        tokio::select! {
            req = conn.accept() => match req {
                Some(Ok((req, respond))) => {
                    state.requests.lock().unwrap().push(req.headers().clone());
                    state.tunnels.fetch_add(1, Ordering::SeqCst);
                    tokio::spawn(echo(req, respond));
                }
                Some(Err(e)) => break Err(e.to_string()),
                None => break Ok(()),
            },
            // `state` holds the sender: the channel never closes while this runs.
            Some(c) = commands.recv() => match c {
                Cmd::GoAway(done) => {
                    conn.graceful_shutdown();
                    let _ = done.send(());
                }
                Cmd::Reset(done) => {
                    socket2::SockRef::from(&raw)
                        .set_linger(Some(Duration::ZERO))
                        .unwrap();
                    drop(conn);
                    drop(raw);
                    *state.end.lock().unwrap() = Some(Err("reset by the test".into()));
                    let _ = done.send(());
                    return;
                }
            },
        }
    };
    *state.end.lock().unwrap() = Some(end);
}

async fn echo(req: Request<RecvStream>, mut respond: SendResponse<Bytes>) {
    if req.method() != Method::CONNECT {
        let mut bad = Response::new(());
        *bad.status_mut() = StatusCode::BAD_REQUEST;
        let _ = respond.send_response(bad, true);
        return;
    }
    let Ok(mut send) = respond.send_response(Response::new(()), false) else {
        return;
    };
    let mut body = req.into_body();
    while let Some(chunk) = body.data().await {
        let Ok(chunk) = chunk else {
            return;
        };
        let _ = body.flow_control().release_capacity(chunk.len());
        // Small test messages: h2 buffers them until the window allows.
        if send.send_data(chunk, false).is_err() {
            return;
        }
    }
    let _ = send.send_data(Bytes::new(), true);
}

/// A TCP relay in front of the server that can make the server vanish without a word:
/// it drops its upstream side and resets the client's side on the next bytes the client
/// sends (a peer node that rebooted, or a NAT/conntrack entry that expired).
struct Relay {
    addr: SocketAddr,
    /// Bumped by `vanish`: connections opened before that vanish, later ones are relayed.
    vanish: watch::Sender<u64>,
}

impl Relay {
    async fn start(bind: IpAddr, upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind(SocketAddr::new(bind, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (vanish, watching) = watch::channel(0u64);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(relay_conn(client, upstream, watching.clone()));
            }
        });
        Self { addr, vanish }
    }

    fn vanish(&self) {
        self.vanish.send_modify(|generation| *generation += 1);
    }
}

async fn relay_conn(mut client: TcpStream, upstream: SocketAddr, mut vanish: watch::Receiver<u64>) {
    let born = *vanish.borrow_and_update();
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        return;
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => return,
        _ = vanish.wait_for(|generation| *generation > born) => {}
    }
    drop(server);
    let mut buf = [0u8; 1];
    let _ = client.read(&mut buf).await;
    let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
}

/// Our outbound proxy (node "a") in front of the test server (node "b").
struct Setup {
    server: HboneServer,
    proxy: Running,
    store: Arc<WorkloadStore>,
    client: Workload,
    server_w: Workload,
}

impl Setup {
    async fn new(net: u8, pool: PoolConfig) -> Self {
        let ca = Ca::new("cluster.local");
        let client = workload("client", "client-sa", "a", ip(net, 1));
        let server_w = workload("server", "server-sa", "b", ip(net, 2));
        let server = HboneServer::start(ip(net, 20), &ca, &server_w).await;
        let store = Arc::new(WorkloadStore::new(table(&client, &server_w, server.addr)));
        let mut config = ProxyConfig::explicit("a", ip(net, 10));
        config.pool = pool;
        let mut deps = ProxyDeps::new(store.clone(), ca.credentials(&[&client.identity]));
        deps.original_dst = Arc::new(StaticOriginalDst::new([(
            client.ips[0],
            SocketAddr::new(server_w.ips[0], DST_PORT),
        )]));
        let proxy = Running::start(config, deps).await;
        Self {
            server,
            proxy,
            store,
            client,
            server_w,
        }
    }

    /// Makes node b's HBONE address `addr` (e.g. a relay in front of the server).
    fn route_via(&self, addr: SocketAddr) {
        self.store
            .replace(table(&self.client, &self.server_w, addr));
    }

    /// A client connection through the outbound proxy (a new tunnel).
    async fn tunnel(&self) -> TcpStream {
        connect_from(self.client.ips[0], self.proxy.addrs.outbound).await
    }

    fn outbound(&self, outcome: Outcome) -> u64 {
        self.proxy
            .metrics
            .closed_count(Direction::Outbound, outcome)
    }

    /// The outbound results so far, for failure messages.
    fn results(&self) -> String {
        Outcome::ALL
            .iter()
            .map(|&o| (o, self.outbound(o)))
            .filter(|&(o, n)| n > 0 || o == Outcome::Ok)
            .map(|(o, n)| format!("{o}={n}"))
            .collect::<Vec<_>>()
            .join(" ")
            + &format!(
                "; pool connections created={}, server accepted={}",
                self.proxy.metrics.pool_connections_created(),
                self.server.accepted()
            )
    }

    async fn wait_ok(&self, n: u64) {
        wait_for(&format!("{n} tunnels logged ok"), T, || {
            self.outbound(Outcome::Ok) == n
        })
        .await;
    }
}

fn table(client: &Workload, server: &Workload, hbone: SocketAddr) -> WorkloadTable {
    let nodes = [Node {
        name: "b".into(),
        hbone: Some(hbone),
    }];
    WorkloadTable::new(
        TrustDomain::default(),
        nodes,
        [client.clone(), server.clone()],
    )
    .unwrap()
}

/// Sends `msg` and reads back its echo.
async fn try_echo(t: &mut TcpStream, msg: &[u8]) -> Result<(), String> {
    t.write_all(msg).await.map_err(|e| format!("write: {e}"))?;
    let mut buf = vec![0u8; msg.len()];
    tokio::time::timeout(T, t.read_exact(&mut buf))
        .await
        .map_err(|_| "no echo in time".to_string())?
        .map_err(|e| format!("read: {e}"))?;
    if buf != msg {
        return Err(format!("echoed {buf:?}, sent {msg:?}"));
    }
    Ok(())
}

async fn echo_ok(s: &Setup, t: &mut TcpStream, msg: &[u8]) {
    if let Err(e) = try_echo(t, msg).await {
        panic!(
            "tunnel failed on {:?}: {e} (outbound results: {})",
            String::from_utf8_lossy(msg),
            s.results()
        );
    }
}

/// Half-closes our side and expects the tunnel to end cleanly: EOF, nothing more.
async fn finish(mut t: TcpStream) {
    t.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(T, t.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert!(
        rest.is_empty(),
        "unexpected bytes after half-close: {rest:?}"
    );
}

#[tokio::test]
async fn connects_carry_forwarded_traceparent_and_the_sources_baggage_as_ztunnels() {
    let s = Setup::new(69, PoolConfig::default()).await;
    for msg in [&b"one"[..], b"two"] {
        let mut t = s.tunnel().await;
        echo_ok(&s, &mut t, msg).await;
        finish(t).await;
    }
    let requests = s.server.conn(0).requests.lock().unwrap().clone();
    assert_eq!(requests.len(), 2);
    let header = |i: usize, name: &str| {
        requests[i]
            .get(name)
            .unwrap_or_else(|| panic!("no {name} header: {:?}", requests[i]))
            .to_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(
        header(0, "baggage"),
        "k8s.cluster.name=Kubernetes,k8s.namespace.name=default,k8s.pod.name=client"
    );
    assert!(header(0, "forwarded").starts_with(&format!("for=\"{}:", s.client.ips[0])));
    // W3C trace context: version 00, 16-byte trace id, 8-byte span id, not sampled; a new
    // trace per tunnel.
    let traces: Vec<String> = (0..2).map(|i| header(i, "traceparent")).collect();
    for t in &traces {
        let parts: Vec<&str> = t.split('-').collect();
        assert_eq!(parts.len(), 4, "{t}");
        assert_eq!((parts[0], parts[3]), ("00", "00"), "{t}");
        assert_eq!((parts[1].len(), parts[2].len()), (32, 16), "{t}");
        assert!(parts[1..3].iter().all(|p| p
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
            && p.bytes().any(|b| b != b'0')));
    }
    assert_ne!(traces[0], traces[1]);
}

#[tokio::test]
async fn goaway_keeps_the_open_tunnel_and_new_tunnels_get_a_new_connection() {
    let s = Setup::new(70, PoolConfig::default()).await;
    let mut t1 = s.tunnel().await;
    echo_ok(&s, &mut t1, b"t1 before goaway").await;
    assert_eq!(s.server.accepted(), 1);

    s.server.goaway(0).await;
    // The server's GOAWAY precedes this echo on the wire: once it is back, the proxy's h2
    // connection has processed the GOAWAY.
    echo_ok(&s, &mut t1, b"t1 after goaway").await;

    let mut t2 = s.tunnel().await;
    echo_ok(&s, &mut t2, b"t2").await;
    assert_eq!(s.server.accepted(), 2, "t2 needs a new TLS connection");
    assert_eq!(
        s.server.tunnels(0),
        1,
        "nothing new on the goaway'd connection"
    );
    assert_eq!(s.server.tunnels(1), 1);

    // T1 still works both ways, then ends cleanly.
    echo_ok(&s, &mut t1, b"t1 after t2").await;
    finish(t1).await;
    s.wait_ok(1).await;
    echo_ok(&s, &mut t2, b"t2 again").await;
    finish(t2).await;
    s.wait_ok(2).await;
    assert_eq!(s.proxy.metrics.pool_connections_created(), 2);
    assert_eq!(s.outbound(Outcome::HboneStreamFailed), 0);
}

#[tokio::test]
async fn goaway_connection_closes_after_its_last_tunnel_and_the_pool_goes_on() {
    let s = Setup::new(71, PoolConfig::default()).await;
    let mut t1 = s.tunnel().await;
    echo_ok(&s, &mut t1, b"t1").await;
    s.server.goaway(0).await;
    echo_ok(&s, &mut t1, b"t1 after goaway").await;
    finish(t1).await;
    s.wait_ok(1).await;

    // Both sides close the connection: the server's h2 connection future completes
    // cleanly, and the proxy's connection task ends (the pool forgets it).
    wait_for("the server's connection to end", T, || {
        s.server.end(0).is_some()
    })
    .await;
    assert_eq!(s.server.end(0), Some(Ok(())));
    wait_for("the proxy to close its connection", T, || {
        s.proxy.metrics.pool_connections() == 0
    })
    .await;

    // The pool works as before: T3 on a new connection, T4 pooled on the same one.
    let mut t3 = s.tunnel().await;
    echo_ok(&s, &mut t3, b"t3").await;
    assert_eq!(s.server.accepted(), 2);
    finish(t3).await;
    s.wait_ok(2).await;
    let mut t4 = s.tunnel().await;
    echo_ok(&s, &mut t4, b"t4").await;
    finish(t4).await;
    s.wait_ok(3).await;
    assert_eq!(s.server.accepted(), 2, "t4 reuses t3's pooled connection");
    assert_eq!(s.server.tunnels(1), 2);
    assert_eq!(s.proxy.metrics.pool_connections(), 1);
}

#[tokio::test]
async fn reset_idle_connection_is_replaced() {
    let s = Setup::new(72, PoolConfig::default()).await;
    let mut t1 = s.tunnel().await;
    echo_ok(&s, &mut t1, b"t1").await;
    finish(t1).await;
    s.wait_ok(1).await;
    assert_eq!(
        s.proxy.metrics.pool_connections(),
        1,
        "t1's connection is pooled"
    );

    s.server.reset(0).await;
    wait_for("the proxy to drop the reset connection", T, || {
        s.proxy.metrics.pool_connections() == 0
    })
    .await;

    let mut t2 = s.tunnel().await;
    echo_ok(&s, &mut t2, b"t2").await;
    assert_eq!(s.server.accepted(), 2);
    assert_eq!(s.server.tunnels(1), 1);
    finish(t2).await;
    s.wait_ok(2).await;
}

/// The retry path: the pooled connection looks fine to the proxy (it heard nothing), and
/// fails only when the next tunnel's CONNECT is written to it.
#[tokio::test]
async fn idle_connection_whose_peer_vanished_is_retried_on_a_new_one() {
    let s = Setup::new(73, PoolConfig::default()).await;
    let relay = Relay::start(ip(73, 21), s.server.addr).await;
    s.route_via(relay.addr);
    let mut t1 = s.tunnel().await;
    echo_ok(&s, &mut t1, b"t1").await;
    finish(t1).await;
    s.wait_ok(1).await;

    relay.vanish();
    wait_for("the server side of the relay to close", T, || {
        s.server.end(0).is_some()
    })
    .await;
    assert_eq!(
        s.proxy.metrics.pool_connections(),
        1,
        "the proxy heard nothing"
    );

    let mut t2 = s.tunnel().await;
    echo_ok(&s, &mut t2, b"t2").await;
    assert_eq!(s.server.accepted(), 2);
    finish(t2).await;
    s.wait_ok(2).await;
}

/// A draining peer sends GOAWAY on every connection at once; with more than one pooled
/// connection for the key, a new tunnel must still get through (on a new connection).
#[tokio::test]
async fn goaway_on_two_pooled_connections_still_lets_new_tunnels_through() {
    let pool = PoolConfig {
        max_streams: 2,
        ..PoolConfig::default()
    };
    let s = Setup::new(74, pool).await;
    // Two tunnels per connection: t[0], t[1] on connection 0; t[2], t[3] on connection 1.
    let mut t = Vec::new();
    for i in 0..4 {
        let mut c = s.tunnel().await;
        echo_ok(&s, &mut c, format!("t{i}").as_bytes()).await;
        t.push(c);
    }
    assert_eq!(s.server.accepted(), 2);
    assert_eq!((s.server.tunnels(0), s.server.tunnels(1)), (2, 2));

    s.server.goaway(0).await;
    s.server.goaway(1).await;
    // Echoes after the GOAWAYs: the proxy has seen both.
    for (i, c) in t.iter_mut().enumerate() {
        echo_ok(&s, c, format!("t{i} after goaway").as_bytes()).await;
    }
    // One tunnel ends on each connection: both have a free slot, both are goaway'd.
    let t3 = t.pop().unwrap();
    let t2 = t.pop().unwrap();
    let t1 = t.pop().unwrap();
    finish(t1).await;
    finish(t3).await;
    s.wait_ok(2).await;

    let mut new = s.tunnel().await;
    echo_ok(&s, &mut new, b"new tunnel during the peer's drain").await;
    assert_eq!(s.server.accepted(), 3);
    finish(new).await;
    // The old tunnels are unaffected.
    let mut t0 = t.pop().unwrap();
    echo_ok(&s, &mut t0, b"t0 at the end").await;
    let mut t2 = t2;
    echo_ok(&s, &mut t2, b"t2 at the end").await;
    finish(t0).await;
    finish(t2).await;
    s.wait_ok(5).await;
}
