//! TCP keepalive (and no Nagle delay) on the proxy's sockets, read back from the sockets
//! themselves: the proxy runs in this process, so its sockets are among our own fds (this
//! file is its own test binary, so no other test's sockets are there).

mod common;

use std::net::SocketAddr;
use std::os::fd::{BorrowedFd, RawFd};
use std::time::Duration;

use common::*;
use socket2::SockRef;
use zmesh_proxy::TcpKeepalive;

const T: Duration = Duration::from_secs(30);

/// Our process's socket whose local and peer addresses are these (any peer: None), if any.
fn socket_fd(local: SocketAddr, peer: impl Into<Option<SocketAddr>>) -> Option<RawFd> {
    let peer = peer.into();
    for entry in std::fs::read_dir("/proc/self/fd").unwrap() {
        let Ok(fd) = entry
            .unwrap()
            .file_name()
            .to_string_lossy()
            .parse::<RawFd>()
        else {
            continue;
        };
        // SAFETY: borrowed only for the calls below; the connections under test stay open
        // (and so keep their fds) for the whole test.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        let sock = SockRef::from(&borrowed);
        let (Ok(l), Ok(p)) = (sock.local_addr(), sock.peer_addr()) else {
            continue;
        };
        if l.as_socket() == Some(local) && peer.is_none_or(|peer| p.as_socket() == Some(peer)) {
            return Some(fd);
        }
    }
    None
}

fn keepalive_of(what: &str, local: SocketAddr, peer: SocketAddr) -> Option<TcpKeepalive> {
    let fd =
        socket_fd(local, peer).unwrap_or_else(|| panic!("{what}: no socket {local} -> {peer}"));
    assert!(nodelay_of(fd), "{what}: Nagle's delay is on");
    // SAFETY: as in socket_fd.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let sock = SockRef::from(&borrowed);
    if !sock.keepalive().unwrap() {
        return None;
    }
    Some(TcpKeepalive {
        time: sock.tcp_keepalive_time().unwrap(),
        interval: sock.tcp_keepalive_interval().unwrap(),
        retries: sock.tcp_keepalive_retries().unwrap(),
    })
}

fn nodelay_of(fd: RawFd) -> bool {
    // SAFETY: as in socket_fd.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    SockRef::from(&borrowed).tcp_nodelay().unwrap()
}

#[tokio::test]
async fn app_side_sockets_have_tcp_keepalive() {
    let want = TcpKeepalive {
        time: Duration::from_secs(77),
        interval: Duration::from_secs(13),
        retries: 4,
    };
    let mesh = Mesh::with(
        120,
        MeshOptions {
            config: Box::new(move |c| c.limits.tcp_keepalive = Some(want)),
            ..Default::default()
        },
    )
    .await;
    let server_addr = mesh.server.local_addr().unwrap();

    // Through the mesh: client -> A (outbound) -> HBONE -> B -> server.
    let mut client = mesh.connect().await;
    let (mut server, b_dialed_from) = tokio::time::timeout(T, async {
        tokio::io::AsyncWriteExt::write_all(&mut client, b"x")
            .await
            .unwrap();
        mesh.server.accept().await.unwrap()
    })
    .await
    .unwrap();
    let mut one = [0u8; 1];
    tokio::io::AsyncReadExt::read_exact(&mut server, &mut one)
        .await
        .unwrap();
    let accepted = keepalive_of(
        "outbound accepted",
        mesh.a.addrs.outbound,
        client.local_addr().unwrap(),
    );
    assert_eq!(accepted, Some(want), "outbound listener's accepted socket");
    let upstream = keepalive_of("inbound upstream", b_dialed_from, server_addr);
    assert_eq!(
        upstream,
        Some(want),
        "inbound HBONE's socket to the workload"
    );

    // B's end of the HBONE connection: no Nagle delay, and no TCP keepalive (HTTP/2 PINGs
    // watch proxies).
    let hbone = socket_fd(mesh.b.addrs.inbound, None).expect("B's accepted HBONE socket");
    assert!(
        nodelay_of(hbone),
        "B's accepted HBONE socket has Nagle's delay on"
    );
    // SAFETY: as in socket_fd.
    let hbone = unsafe { BorrowedFd::borrow_raw(hbone) };
    assert!(!SockRef::from(&hbone).keepalive().unwrap());

    // Plain TCP from outside the mesh: ip(net, 9) -> B (plaintext) -> server.
    let mut outsider = connect_from(ip(120, 9), mesh.b.addrs.plaintext).await;
    let (mut server2, b_dialed_from2) = tokio::time::timeout(T, async {
        tokio::io::AsyncWriteExt::write_all(&mut outsider, b"y")
            .await
            .unwrap();
        mesh.server.accept().await.unwrap()
    })
    .await
    .unwrap();
    tokio::io::AsyncReadExt::read_exact(&mut server2, &mut one)
        .await
        .unwrap();
    let accepted = keepalive_of(
        "plaintext accepted",
        mesh.b.addrs.plaintext,
        outsider.local_addr().unwrap(),
    );
    assert_eq!(accepted, Some(want), "plaintext listener's accepted socket");
    let upstream = keepalive_of("plaintext upstream", b_dialed_from2, server_addr);
    assert_eq!(upstream, Some(want), "plaintext's socket to the workload");
    // Our own test sockets were never touched: the option is the proxy's doing.
    assert!(!SockRef::from(&client).keepalive().unwrap());
}

#[tokio::test]
async fn without_tcp_keepalive_accepted_sockets_have_none() {
    let mesh = Mesh::with(
        131,
        MeshOptions {
            config: Box::new(|c| c.limits.tcp_keepalive = None),
            ..Default::default()
        },
    )
    .await;
    let mut client = mesh.connect().await;
    let (mut server, _) = tokio::time::timeout(T, async {
        tokio::io::AsyncWriteExt::write_all(&mut client, b"x")
            .await
            .unwrap();
        mesh.server.accept().await.unwrap()
    })
    .await
    .unwrap();
    let mut one = [0u8; 1];
    tokio::io::AsyncReadExt::read_exact(&mut server, &mut one)
        .await
        .unwrap();
    let accepted = keepalive_of(
        "outbound accepted",
        mesh.a.addrs.outbound,
        client.local_addr().unwrap(),
    );
    assert_eq!(accepted, None, "outbound listener's accepted socket");
}
