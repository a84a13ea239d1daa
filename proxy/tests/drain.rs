//! Connections the proxy cuts (at the drain deadline, or by dropping their task) are still
//! logged, counted and published, with what they carried.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::net::TcpStream;
use zmesh_proxy::flows::{FlowEvent, FlowFilter, FlowHub, FlowVerdict};
use zmesh_proxy::{Direction, Node, Outcome, Protocol, WorkloadTable};

const T: Duration = Duration::from_secs(30);

/// A mesh whose proxies give open tunnels 200 ms once a drain starts.
async fn mesh(net: u8) -> Mesh {
    Mesh::with(
        net,
        MeshOptions {
            config: Box::new(|c| c.limits.drain_deadline = Duration::from_millis(200)),
            ..Default::default()
        },
    )
    .await
}

/// A connection through the mesh to its server, with `up` and `down` exchanged; the
/// server end is returned open (and is never closed by the test).
async fn open(mesh: &Mesh, client: TcpStream, up: &[u8], down: &[u8]) -> (TcpStream, TcpStream) {
    let mut client = client;
    let (mut server, _) = tokio::time::timeout(T, mesh.server.accept())
        .await
        .unwrap()
        .unwrap();
    tokio::time::timeout(T, exchange(&mut client, &mut server, up, down))
        .await
        .unwrap();
    (client, server)
}

/// The published events with `outcome`'s reason.
fn events(flows: &FlowHub, outcome: Outcome) -> Vec<Arc<FlowEvent>> {
    flows
        .recent(&FlowFilter::default(), 256)
        .into_iter()
        .filter(|e| e.reason.as_deref() == outcome.reason())
        .collect()
}

/// Checks the one event of `events` that is (or is not) encrypted: an error with what
/// the client sent and received, to the server.
fn check(events: &[Arc<FlowEvent>], encrypted: bool, sent: u64, received: u64, server: SocketAddr) {
    let matching: Vec<_> = events.iter().filter(|e| e.encrypted == encrypted).collect();
    assert_eq!(matching.len(), 1, "encrypted={encrypted}: {events:#?}");
    let e = matching[0];
    assert_eq!(e.verdict, FlowVerdict::Error, "{e}");
    assert_eq!((e.bytes_sent, e.bytes_received), (sent, received), "{e}");
    assert_eq!(e.destination.addr, server, "{e}");
}

#[tokio::test]
async fn inbound_connections_cut_at_the_drain_deadline_are_logged_and_counted() {
    let mesh = mesh(90).await;
    let server = mesh.server.local_addr().unwrap();
    // An HBONE tunnel into B, and plain TCP into B.
    let tunnel = open(&mesh, mesh.connect().await, b"ping", b"pong!").await;
    let plain = connect_from(ip(90, 9), mesh.b.addrs.plaintext).await;
    let plain = open(&mesh, plain, b"abc", b"de").await;

    mesh.b.drain.drain();
    let Mesh { a, b, .. } = mesh;
    let r = tokio::time::timeout(T, b.task).await.unwrap().unwrap();
    r.expect("a drain asked for ends in Ok");

    let m = &b.metrics;
    assert_eq!(
        m.closed_count(Direction::Inbound, Outcome::DrainDeadline),
        1
    );
    let plaintext = Direction::InboundPlaintext;
    assert_eq!(m.closed_count(plaintext, Outcome::DrainDeadline), 1);
    let cut = events(&b.flows, Outcome::DrainDeadline);
    assert_eq!(cut.len(), 2, "{cut:#?}");
    check(&cut, true, 4, 5, server);
    check(&cut, false, 3, 2, server);
    drop((a, tunnel, plain));
}

#[tokio::test]
async fn outbound_connections_cut_at_the_drain_deadline_are_logged_and_counted() {
    let mesh = mesh(91).await;
    let server = mesh.server.local_addr().unwrap();
    let tunnel = open(&mesh, mesh.connect().await, b"ping", b"pong!").await;
    // The server leaves the mesh: A's next connection to it passes through as plain TCP.
    let mut workloads: Vec<_> = mesh
        .store
        .snapshot()
        .workloads()
        .map(|w| (**w).clone())
        .collect();
    for w in &mut workloads {
        if w.name == "server" {
            w.protocol = Protocol::Tcp;
        }
    }
    let nodes = [Node {
        name: "b".into(),
        hbone: Some(mesh.b.addrs.inbound),
    }];
    mesh.store
        .replace(WorkloadTable::new(Default::default(), nodes, workloads).unwrap());
    let plain = open(&mesh, mesh.connect().await, b"abc", b"de").await;
    assert_eq!(mesh.a.metrics.pool_connections_created(), 1);

    mesh.a.drain.drain();
    let Mesh { a, b, .. } = mesh;
    let r = tokio::time::timeout(T, a.task).await.unwrap().unwrap();
    r.expect("a drain asked for ends in Ok");

    let m = &a.metrics;
    assert_eq!(
        m.closed_count(Direction::Outbound, Outcome::DrainDeadline),
        2
    );
    let cut = events(&a.flows, Outcome::DrainDeadline);
    assert_eq!(cut.len(), 2, "{cut:#?}");
    check(&cut, true, 4, 5, server);
    check(&cut, false, 3, 2, server);
    drop((b, tunnel, plain));
}

/// A connection whose task is dropped (here by the runtime shutting down) is recorded
/// as cancelled.
#[test]
fn connections_dropped_unfinished_are_logged_as_cancelled() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (mesh, conns) = rt.block_on(async {
        let mesh = mesh(92).await;
        let tunnel = open(&mesh, mesh.connect().await, b"ping", b"pong!").await;
        (mesh, tunnel)
    });
    let server = mesh.server.local_addr().unwrap();
    drop(rt);
    let cancelled = |r: &Running, d| r.metrics.closed_count(d, Outcome::Cancelled);
    assert_eq!(cancelled(&mesh.a, Direction::Outbound), 1);
    assert_eq!(cancelled(&mesh.b, Direction::Inbound), 1);
    for r in [&mesh.a, &mesh.b] {
        let e = events(&r.flows, Outcome::Cancelled);
        check(&e, true, 4, 5, server);
    }
    drop(conns);
}

/// A tunnel the destination's proxy cuts (here at its drain deadline; a crash or a reset
/// stream does the same) reaches the client as a reset, not an EOF: an EOF would pass a
/// truncated answer off as a complete one, and a client that keeps its own side open would
/// never notice.
#[tokio::test]
async fn a_tunnel_cut_by_the_far_side_resets_the_client() {
    use tokio::io::AsyncReadExt;
    let mesh = mesh(91).await;
    let (mut client, _server) = open(&mesh, mesh.connect().await, b"ping", b"pong!").await;
    mesh.b.drain.drain();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(T, client.read(&mut buf))
        .await
        .unwrap();
    match read {
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        Ok(n) => panic!("the client read {n} bytes (an EOF when 0) instead of a reset"),
    }
}
