//! The server against a ZDS client written here as ztunnel behaves: it connects over
//! SOCK_SEQPACKET, says hello, receives requests with SCM_RIGHTS fds, acks or nacks.

use std::fs::File;
use std::os::fd::AsFd;

use nix::sys::stat::fstat;

use super::*;

const WAIT: Duration = Duration::from_secs(10);

/// ztunnel's side of the socket.
struct Client {
    stream: UnixStream,
}

impl Client {
    async fn connect(path: &Path) -> Client {
        let socket = sock::socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        sock::connect(socket.as_raw_fd(), &UnixAddr::new(path).unwrap()).unwrap();
        let std = std::os::unix::net::UnixStream::from(socket);
        std.set_nonblocking(true).unwrap();
        Client {
            stream: UnixStream::from_std(std).unwrap(),
        }
    }

    async fn hello(path: &Path) -> Client {
        let client = Client::connect(path).await;
        client.send_hello(pb::Version::V1 as i32).await;
        client
    }

    async fn send_hello(&self, version: i32) {
        let hello = pb::ZdsHello { version };
        send_packet(&self.stream, &hello.encode_to_vec(), None)
            .await
            .unwrap();
    }

    /// The next request and the fds that came with it.
    async fn next(&self) -> (pb::workload_request::Payload, Vec<OwnedFd>) {
        let (data, fds) = tokio::time::timeout(WAIT, recv_packet(&self.stream))
            .await
            .expect("no request from the server")
            .unwrap()
            .expect("server closed the connection");
        let req = pb::WorkloadRequest::decode(data.as_slice()).unwrap();
        (req.payload.expect("request without payload"), fds)
    }

    /// Expects an add; returns (uid, info, the one netns fd).
    async fn expect_add(&self) -> (String, pb::WorkloadInfo, OwnedFd) {
        match self.next().await {
            (pb::workload_request::Payload::Add(add), mut fds) => {
                assert_eq!(fds.len(), 1, "an add carries exactly one fd");
                (add.uid, add.workload_info.unwrap(), fds.pop().unwrap())
            }
            other => panic!("expected add, got {:?}", other.0),
        }
    }

    async fn expect_snapshot_sent(&self) {
        let (payload, fds) = self.next().await;
        assert!(matches!(
            payload,
            pb::workload_request::Payload::SnapshotSent(_)
        ));
        assert!(fds.is_empty());
    }

    async fn expect_del(&self) -> String {
        match self.next().await {
            (pb::workload_request::Payload::Del(del), fds) => {
                assert!(fds.is_empty(), "a del carries no fd");
                del.uid
            }
            other => panic!("expected del, got {:?}", other.0),
        }
    }

    async fn ack(&self, error: &str) {
        let resp = pb::WorkloadResponse {
            payload: Some(pb::workload_response::Payload::Ack(pb::Ack {
                error: error.to_owned(),
            })),
        };
        send_packet(&self.stream, &resp.encode_to_vec(), None)
            .await
            .unwrap();
    }

    /// Whether the server closed the connection.
    async fn closed(&self) -> bool {
        matches!(
            tokio::time::timeout(WAIT, recv_packet(&self.stream)).await,
            Ok(Ok(None)) | Ok(Err(_))
        )
    }
}

fn info(name: &str) -> WorkloadInfo {
    WorkloadInfo {
        name: name.to_owned(),
        namespace: "shop".to_owned(),
        service_account: format!("{name}-sa"),
    }
}

fn own_netns() -> OwnedFd {
    File::open("/proc/self/ns/net").unwrap().into()
}

/// A fresh network namespace (made on a throwaway thread), alive while the fd is open.
fn new_netns() -> OwnedFd {
    std::thread::spawn(|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare needs root");
        OwnedFd::from(File::open("/proc/thread-self/ns/net").unwrap())
    })
    .join()
    .unwrap()
}

/// (device, inode): the identity of a namespace.
fn ns_id(fd: BorrowedFd<'_>) -> (u64, u64) {
    let st = fstat(fd).unwrap();
    (st.st_dev, st.st_ino)
}

async fn wait_connected(handle: &ZdsHandle, want: bool) {
    let mut rx = handle.connected();
    tokio::time::timeout(WAIT, rx.wait_for(|c| *c == want))
        .await
        .expect("connection state did not change")
        .unwrap();
}

fn socket_path(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("ztunnel.sock")
}

#[tokio::test]
async fn snapshot_then_add_and_del_with_real_netns_fds() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_path(&dir);
    let server = ZdsServer::bind(&path).unwrap();
    let handle = server.handle();

    // Before ztunnel connects: kept for the snapshot.
    let own = ns_id(own_netns().as_fd());
    assert_eq!(
        handle.add("uid-web", info("web"), own_netns()).await,
        Ok(Delivery::Pending)
    );

    let client = Client::hello(&path).await;
    let (uid, winfo, fd) = client.expect_add().await;
    assert_eq!(uid, "uid-web");
    assert_eq!(winfo.name, "web");
    assert_eq!(winfo.namespace, "shop");
    assert_eq!(winfo.service_account, "web-sa");
    assert!(
        is_netns(fd.as_fd()),
        "received fd is not a network namespace"
    );
    assert_eq!(ns_id(fd.as_fd()), own, "received fd is another namespace");
    client.ack("").await;
    client.expect_snapshot_sent().await;
    client.ack("").await;
    wait_connected(&handle, true).await;

    // A live add: the fd received is the pod's namespace, not ours.
    let pod_ns = new_netns();
    let pod = ns_id(pod_ns.as_fd());
    assert_ne!(pod, own);
    let adder = {
        let handle = handle.clone();
        tokio::spawn(async move { handle.add("uid-db", info("db"), pod_ns).await })
    };
    let (uid, winfo, fd) = client.expect_add().await;
    assert_eq!((uid.as_str(), winfo.name.as_str()), ("uid-db", "db"));
    assert_eq!(ns_id(fd.as_fd()), pod);
    client.ack("").await;
    assert_eq!(adder.await.unwrap(), Ok(Delivery::Acked));

    let deleter = {
        let handle = handle.clone();
        tokio::spawn(async move { handle.del("uid-web").await })
    };
    assert_eq!(client.expect_del().await, "uid-web");
    client.ack("").await;
    assert_eq!(deleter.await.unwrap(), Ok(Delivery::Acked));

    let status = handle.status().await;
    assert!(status.connected);
    assert_eq!(status.workloads, 1);
    assert_eq!(status.last_error, None);
}

#[tokio::test]
async fn nacks_are_surfaced_as_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_path(&dir);
    let server = ZdsServer::bind(&path).unwrap();
    let handle = server.handle();
    let client = Client::hello(&path).await;
    client.expect_snapshot_sent().await;
    client.ack("").await;
    wait_connected(&handle, true).await;

    let adder = {
        let handle = handle.clone();
        tokio::spawn(async move { handle.add("uid-1", info("web"), new_netns()).await })
    };
    client.expect_add().await;
    client.ack("failure to start proxy: no such pod").await;
    let err = adder.await.unwrap().unwrap_err();
    assert_eq!(
        err,
        ZdsError::Nack {
            request: "add",
            uid: "uid-1".into(),
            error: "failure to start proxy: no such pod".into()
        }
    );
    assert!(err
        .to_string()
        .contains("ztunnel refused add of workload uid-1"));

    let deleter = {
        let handle = handle.clone();
        tokio::spawn(async move { handle.del("uid-1").await })
    };
    client.expect_del().await;
    client.ack("unknown workload").await;
    assert!(matches!(
        deleter.await.unwrap(),
        Err(ZdsError::Nack { request: "del", .. })
    ));
    // A nack is not a broken connection.
    assert!(handle.status().await.connected);
}

#[tokio::test]
async fn reconnecting_ztunnel_gets_the_snapshot_again() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_path(&dir);
    let server = ZdsServer::bind(&path).unwrap();
    let handle = server.handle();
    let a = new_netns();
    let a_id = ns_id(a.as_fd());
    handle.add("uid-a", info("a"), a).await.unwrap();
    handle.add("uid-b", info("b"), new_netns()).await.unwrap();

    let first = Client::hello(&path).await;
    for _ in 0..2 {
        first.expect_add().await;
        first.ack("").await;
    }
    first.expect_snapshot_sent().await;
    first.ack("").await;
    wait_connected(&handle, true).await;

    // ztunnel restarts; the agent learns it on the next request.
    drop(first);
    assert_eq!(
        handle.add("uid-c", info("c"), new_netns()).await,
        Ok(Delivery::Pending)
    );
    assert!(!handle.status().await.connected);
    assert_eq!(handle.del("uid-b").await, Ok(Delivery::Pending));

    let second = Client::hello(&path).await;
    let mut seen = Vec::new();
    for _ in 0..2 {
        let (uid, _, fd) = second.expect_add().await;
        if uid == "uid-a" {
            assert_eq!(
                ns_id(fd.as_fd()),
                a_id,
                "snapshot resends the same namespace"
            );
        }
        seen.push(uid);
        second.ack("").await;
    }
    second.expect_snapshot_sent().await;
    second.ack("").await;
    assert_eq!(seen, ["uid-a", "uid-c"]);
    wait_connected(&handle, true).await;

    // A third ztunnel replaces the second.
    let third = Client::hello(&path).await;
    for _ in 0..2 {
        third.expect_add().await;
        third.ack("").await;
    }
    third.expect_snapshot_sent().await;
    third.ack("").await;
    wait_connected(&handle, true).await;
    assert!(second.closed().await, "replaced connection was not closed");
}

#[tokio::test]
async fn snapshot_entry_nack_is_recorded_and_snapshot_nack_drops_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_path(&dir);
    let server = ZdsServer::bind(&path).unwrap();
    let handle = server.handle();
    handle.add("uid-a", info("a"), new_netns()).await.unwrap();

    let client = Client::hello(&path).await;
    client.expect_add().await;
    client.ack("proxy failed").await;
    client.expect_snapshot_sent().await;
    client.ack("cannot reconcile").await;
    assert!(client.closed().await);
    let status = handle.status().await;
    assert!(!status.connected);
    assert_eq!(
        status.last_error,
        Some(ZdsError::SnapshotNack("cannot reconcile".into()))
    );

    // The next ztunnel gets the entry again.
    let client = Client::hello(&path).await;
    assert_eq!(client.expect_add().await.0, "uid-a");
}

#[tokio::test]
async fn rejects_bad_input_and_wrong_hello() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_path(&dir);
    let server = ZdsServer::bind(&path).unwrap();
    let handle = server.handle();

    // Only the owner may connect: the socket hands out pod namespaces.
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    let not_ns: OwnedFd = File::open("/dev/null").unwrap().into();
    assert_eq!(
        handle.add("uid-x", info("x"), not_ns).await,
        Err(ZdsError::NotNetns {
            uid: "uid-x".into()
        })
    );
    // Another kind of namespace is not a network namespace either.
    let uts: OwnedFd = File::open("/proc/self/ns/uts").unwrap().into();
    assert!(matches!(
        handle.add("uid-x", info("x"), uts).await,
        Err(ZdsError::NotNetns { .. })
    ));
    assert_eq!(
        handle.add("", info("x"), own_netns()).await,
        Err(ZdsError::EmptyUid)
    );
    let huge = WorkloadInfo {
        name: "n".repeat(2000),
        ..info("x")
    };
    assert!(matches!(
        handle.add("uid-x", huge, own_netns()).await,
        Err(ZdsError::TooLarge { .. })
    ));
    assert_eq!(
        handle.status().await.workloads,
        0,
        "refused adds are not kept"
    );

    // A client that never says hello holds up neither requests nor other clients.
    let silent = Client::connect(&path).await;
    let client = Client::hello(&path).await;
    client.expect_snapshot_sent().await;
    client.ack("").await;
    wait_connected(&handle, true).await;
    drop((silent, client));

    // A ztunnel speaking an unknown version is dropped.
    let client = Client::connect(&path).await;
    client.send_hello(7).await;
    assert!(client.closed().await);
    assert_eq!(handle.status().await.last_error, Some(ZdsError::Version(7)));
}

#[tokio::test]
async fn bind_replaces_stale_sockets_but_not_other_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_path(&dir);
    drop(ZdsServer::bind(&path).unwrap());
    assert!(!path.exists(), "dropping the server removes its socket");

    // A stale socket left by a crashed agent is replaced.
    let stale = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let server = ZdsServer::bind(&path).unwrap();
    drop(stale);
    let client = Client::hello(&path).await;
    client.expect_snapshot_sent().await;
    drop(server);

    let file = dir.path().join("regular");
    std::fs::write(&file, b"keep me").unwrap();
    assert_eq!(
        ZdsServer::bind(&file).unwrap_err(),
        ZdsError::NotASocket { path: file.clone() }
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
}
