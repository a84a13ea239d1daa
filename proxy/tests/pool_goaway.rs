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

/// What the server does with the next CONNECT it receives (then it answers as usual).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Next {
    Answer,
    /// RST_STREAM(REFUSED_STREAM): not processed, so the client may try it again.
    Refuse,
    /// Reset the whole connection instead of answering (a node that died mid-request).
    ResetConnection,
}

/// What the test server knows of one accepted connection.
struct ConnState {
    cmd: mpsc::UnboundedSender<Cmd>,
    /// CONNECT requests answered on it.
    tunnels: AtomicUsize,
    /// The header blocks of those requests, in arrival order.
    requests: Mutex<Vec<http::HeaderMap>>,
    /// Per CONNECT received (answered or not), the bytes that had arrived with it, before
    /// any answer.
    early: Mutex<Vec<Bytes>>,
    /// How its h2 connection future ended; `None` while it runs.
    end: Mutex<Option<Result<(), String>>>,
}

/// A raw HBONE server: the destination's SVID, client certificates required, h2, CONNECT
/// answered with 200 and the stream's bytes echoed back (END_STREAM answered with END_STREAM).
struct HboneServer {
    addr: SocketAddr,
    /// In accept order (TLS and h2 handshakes done).
    conns: Arc<Mutex<Vec<Arc<ConnState>>>>,
    next: Arc<Mutex<Next>>,
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
        let next = Arc::new(Mutex::new(Next::Answer));
        let (list, then) = (conns.clone(), next.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                tokio::spawn(serve_conn(
                    tcp,
                    acceptor.clone(),
                    list.clone(),
                    then.clone(),
                ));
            }
        });
        Self { addr, conns, next }
    }

    /// Sets what happens to the next CONNECT (on any connection).
    fn on_next_connect(&self, next: Next) {
        *self.next.lock().unwrap() = next;
    }

    /// The bytes that came with each CONNECT on connection `i`, before it was answered.
    fn early(&self, i: usize) -> Vec<Bytes> {
        self.conn(i).early.lock().unwrap().clone()
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

async fn serve_conn(
    tcp: TcpStream,
    acceptor: TlsAcceptor,
    conns: Arc<Mutex<Vec<Arc<ConnState>>>>,
    next: Arc<Mutex<Next>>,
) {
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
        early: Mutex::default(),
        end: Mutex::new(None),
    });
    conns.lock().unwrap().push(state.clone());
    let end = loop {
        tokio::select! {
            req = conn.accept() => match req {
                Some(Ok((mut req, mut respond))) => {
                    state.requests.lock().unwrap().push(req.headers().clone());
                    let early = arrived(req.body_mut());
                    state.early.lock().unwrap().push(early.clone());
                    match std::mem::replace(&mut *next.lock().unwrap(), Next::Answer) {
                        Next::Answer => {
                            state.tunnels.fetch_add(1, Ordering::SeqCst);
                            tokio::spawn(echo(req, respond, early));
                        }
                        Next::Refuse => respond.send_reset(h2::Reason::REFUSED_STREAM),
                        Next::ResetConnection => {
                            socket2::SockRef::from(&raw)
                                .set_linger(Some(Duration::ZERO))
                                .unwrap();
                            drop(conn);
                            drop(raw);
                            *state.end.lock().unwrap() = Some(Err("reset by the test".into()));
                            return;
                        }
                    }
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

/// What the stream has received so far (h2 read it with the request), without waiting. The
/// bytes stay counted against the stream's window: the echo releases them when it reads.
fn arrived(body: &mut RecvStream) -> Bytes {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let mut got = Vec::new();
    while let std::task::Poll::Ready(Some(Ok(chunk))) = body.poll_data(&mut cx) {
        got.extend_from_slice(&chunk);
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    Bytes::from(got)
}

/// Answers 200 and echoes the stream, starting with what arrived with the CONNECT.
async fn echo(req: Request<RecvStream>, mut respond: SendResponse<Bytes>, early: Bytes) {
    if req.method() != Method::CONNECT {
        let mut bad = Response::new(());
        *bad.status_mut() = StatusCode::BAD_REQUEST;
        let _ = respond.send_response(bad, true);
        return;
    }
    let Ok(mut send) = respond.send_response(Response::new(()), false) else {
        return;
    };
    if !early.is_empty() && send.send_data(early, false).is_err() {
        return;
    }
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

    /// A client that speaks first: `first` is in the socket before the proxy can accept it
    /// (connected and written without yielding to the runtime the proxy runs on).
    fn tunnel_sending(&self, first: &[u8]) -> TcpStream {
        use std::io::Write;
        let sock =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        sock.bind(&SocketAddr::new(self.client.ips[0], 0).into())
            .unwrap();
        sock.connect(&self.proxy.addrs.outbound.into()).unwrap();
        let mut std_stream: std::net::TcpStream = sock.into();
        std_stream.write_all(first).unwrap();
        std_stream.set_nonblocking(true).unwrap();
        TcpStream::from_std(std_stream).unwrap()
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

    /// One whole tunnel whose client speaks first ("t1"): it opens the pooled connection.
    async fn first_tunnel(&self) {
        let mut t1 = self.tunnel_sending(b"t1");
        read_echo_ok(self, &mut t1, b"t1").await;
        finish(t1).await;
        self.wait_ok(1).await;
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
    try_read_echo(t, msg).await
}

/// Reads back the echo of `msg`, sent already.
async fn try_read_echo(t: &mut TcpStream, msg: &[u8]) -> Result<(), String> {
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

async fn read_echo_ok(s: &Setup, t: &mut TcpStream, msg: &[u8]) {
    if let Err(e) = try_read_echo(t, msg).await {
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
    // The CONNECT goes alone (see the first-bytes tests for when the client's bytes go too).
    let pool = PoolConfig {
        first_bytes_within: Duration::ZERO,
        ..PoolConfig::default()
    };
    let s = Setup::new(73, pool).await;
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

/// A client that speaks first (HTTP, TLS) has its first bytes sent with the CONNECT on a
/// connection whose peer has just answered: the destination has them before it answers,
/// one round trip sooner. They arrive once, before anything sent later. A client that
/// sends nothing first gets the CONNECT alone.
#[tokio::test]
async fn first_bytes_go_with_the_connect_on_a_connection_that_just_answered() {
    let s = Setup::new(75, PoolConfig::default()).await;
    // The first tunnel opens the connection: its handshake counts as an answer.
    let mut t1 = s.tunnel_sending(b"GET / HTTP/1.1");
    read_echo_ok(&s, &mut t1, b"GET / HTTP/1.1").await;
    echo_ok(&s, &mut t1, b" and the rest").await;
    finish(t1).await;
    let mut t2 = s.tunnel_sending(b"second");
    read_echo_ok(&s, &mut t2, b"second").await;
    finish(t2).await;
    s.wait_ok(2).await;

    // A server-first protocol: the client waits for the tunnel before it writes.
    let mut t3 = s.tunnel().await;
    wait_for("the third CONNECT", T, || s.server.tunnels(0) == 3).await;
    echo_ok(&s, &mut t3, b"third").await;
    finish(t3).await;
    s.wait_ok(3).await;

    assert_eq!(s.server.accepted(), 1);
    let early = s.server.early(0);
    assert_eq!(early, [&b"GET / HTTP/1.1"[..], b"second", b""], "{early:?}");
    assert_eq!(s.proxy.metrics.connects_with_first_bytes(), 2);
}

/// A refused stream was not processed (RFC 9113, 8.7): its CONNECT and the bytes that went
/// with it are sent again on a new connection, and the server gets them once.
#[tokio::test]
async fn first_bytes_refused_with_their_connect_go_again_on_a_new_connection() {
    let s = Setup::new(76, PoolConfig::default()).await;
    s.first_tunnel().await;

    s.server.on_next_connect(Next::Refuse);
    let mut t2 = s.tunnel_sending(b"t2 once");
    read_echo_ok(&s, &mut t2, b"t2 once").await;
    echo_ok(&s, &mut t2, b" then more").await;
    finish(t2).await;
    s.wait_ok(2).await;
    assert_eq!(s.server.accepted(), 2, "{}", s.results());
    assert_eq!(s.server.early(0), [&b"t1"[..], b"t2 once"], "refused");
    assert_eq!(s.server.tunnels(0), 1, "refused, not answered");
    assert_eq!(s.server.early(1), [&b"t2 once"[..]], "sent again");
}

/// A connection that dies under a CONNECT may have delivered the client's bytes that went
/// with it: the tunnel fails (the client is reset) instead of sending them again elsewhere.
#[tokio::test]
async fn first_bytes_are_not_sent_twice_when_their_connection_dies_unanswered() {
    let s = Setup::new(77, PoolConfig::default()).await;
    s.first_tunnel().await;

    s.server.on_next_connect(Next::ResetConnection);
    let mut t2 = s.tunnel_sending(b"t2 at most once");
    let mut buf = [0u8; 32];
    let read = tokio::time::timeout(T, t2.read(&mut buf)).await.unwrap();
    assert_eq!(
        read.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset),
        "the client must see its tunnel fail ({})",
        s.results()
    );
    wait_for("the failed tunnel to be logged", T, || {
        s.outbound(Outcome::HboneStreamFailed) == 1
    })
    .await;
    assert_eq!(s.server.accepted(), 1, "not retried: {}", s.results());
    assert_eq!(s.server.early(0), [&b"t1"[..], b"t2 at most once"]);
}

/// A connection whose peer has been quiet for longer than `first_bytes_within` sends the
/// CONNECT alone, so that a peer that vanished meanwhile costs the client nothing: the
/// CONNECT is retried on a new connection (where the bytes go with it: its handshake has
/// just finished).
#[tokio::test]
async fn quiet_connection_sends_the_connect_alone_and_a_vanished_peer_is_retried() {
    let window = Duration::from_millis(100);
    let pool = PoolConfig {
        first_bytes_within: window,
        ..PoolConfig::default()
    };
    let s = Setup::new(78, pool).await;
    let relay = Relay::start(ip(78, 21), s.server.addr).await;
    s.route_via(relay.addr);
    s.first_tunnel().await;

    relay.vanish();
    wait_for("the server side of the relay to close", T, || {
        s.server.end(0).is_some()
    })
    .await;
    // What this test is about: the connection's peer has been quiet for the window.
    tokio::time::sleep(window).await;
    let mut t2 = s.tunnel_sending(b"t2");
    read_echo_ok(&s, &mut t2, b"t2").await;
    finish(t2).await;
    s.wait_ok(2).await;
    assert_eq!(s.server.accepted(), 2);
    assert_eq!(s.server.early(0), [&b"t1"[..]]);
    assert_eq!(
        s.server.early(1),
        [&b"t2"[..]],
        "once, on the new connection"
    );
}
