//! The data path process's side of the agent protocol (`zmesh datapath`), spoken to
//! directly: what it refuses, how a newer agent with another configuration replaces the
//! proxy on the same listening sockets, and that bad input from an agent changes nothing
//! else. The end-to-end behaviour (agents killed, connections kept) is in
//! tests/mesh_faults.rs.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::UnixStream;
use zmesh_agent::datapath::protocol::{
    read_message, write_message, Credentials, FromDataPath, ToDataPath, WorkloadCredential,
    PROTOCOL_VERSION,
};
use zmesh_dataplane::Mode;
use zmesh_identity::{TrustDomain, WorkloadId};
use zmesh_proxy::{Capture, ProxyConfig};

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn config() -> ProxyConfig {
    let mut config = ProxyConfig::new("node1", Ipv4Addr::LOCALHOST.into());
    let at = |port| SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    config.inbound_addr = at(free_port());
    config.outbound_addr = at(free_port());
    config.plaintext_addr = at(free_port());
    config.metrics_addr = at(free_port());
    config.readiness_addr = at(free_port());
    config.capture = Capture::Explicit;
    config.ip_transparent = false;
    config
}

fn hello(config: &ProxyConfig) -> ToDataPath {
    ToDataPath::Hello {
        protocol: PROTOCOL_VERSION,
        agent_version: "test".into(),
        config: Box::new(config.clone()),
        pin_dir: None,
    }
}

struct Server {
    socket: PathBuf,
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<Result<(), zmesh_agent::datapath::server::DataPathServerError>>,
    _dir: tempfile::TempDir,
}

impl Server {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("datapath.sock");
        let stop = tokio_util::sync::CancellationToken::new();
        let (path, token) = (socket.clone(), stop.clone());
        let task = tokio::spawn(async move {
            zmesh_agent::datapath::server::serve(&path, token.cancelled_owned()).await
        });
        while !socket.exists() {
            tokio::task::yield_now().await;
        }
        Server {
            socket,
            stop,
            task,
            _dir: dir,
        }
    }

    async fn connect(&self) -> UnixStream {
        UnixStream::connect(&self.socket).await.unwrap()
    }

    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(40), self.task)
            .await
            .expect("the data path drains and stops")
            .unwrap()
            .unwrap();
    }
}

async fn say(stream: &mut UnixStream, message: &ToDataPath) -> FromDataPath {
    write_message(stream, message).await.unwrap();
    next(stream).await
}

/// The next message that is not a flow event.
async fn next(stream: &mut UnixStream) -> FromDataPath {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), read_message(stream))
            .await
            .expect("an answer")
            .unwrap()
        {
            FromDataPath::Flow(_) => continue,
            other => return other,
        }
    }
}

fn generation(answer: FromDataPath) -> u64 {
    match answer {
        FromDataPath::Welcome { generation, .. } => generation,
        other => panic!("expected a welcome, got {other:?}"),
    }
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread")]
async fn another_protocol_or_no_hello_first_is_refused_with_the_reason() {
    let server = Server::start().await;
    let mut agent = server.connect().await;
    let answer = say(
        &mut agent,
        &ToDataPath::Hello {
            protocol: PROTOCOL_VERSION + 1,
            agent_version: "future".into(),
            config: Box::new(config()),
            pin_dir: None,
        },
    )
    .await;
    match answer {
        FromDataPath::Refused { reason } => assert!(reason.contains("protocol"), "{reason}"),
        other => panic!("{other:?}"),
    }
    // It carries private keys: root only.
    assert_eq!(mode(&server.socket), 0o600);

    let mut agent = server.connect().await;
    match say(&mut agent, &ToDataPath::Connections).await {
        FromDataPath::Refused { reason } => {
            assert!(reason.contains("expected a hello first"), "{reason}")
        }
        other => panic!("{other:?}"),
    }

    // Pins that are not there: refused, nothing started.
    let mut agent = server.connect().await;
    let answer = say(
        &mut agent,
        &ToDataPath::Hello {
            protocol: PROTOCOL_VERSION,
            agent_version: "test".into(),
            config: Box::new(config()),
            pin_dir: Some("/nonexistent/zmesh-pins".into()),
        },
    )
    .await;
    match answer {
        FromDataPath::Refused { reason } => assert!(reason.contains("eBPF pins"), "{reason}"),
        other => panic!("{other:?}"),
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_agent_is_adopted_and_another_configuration_takes_over_the_same_sockets() {
    let server = Server::start().await;
    let first = config();
    let mut agent = server.connect().await;
    assert_eq!(generation(say(&mut agent, &hello(&first)).await), 1);
    // The agent dies; a new one with the same configuration is adopted as it is.
    drop(agent);
    let mut agent = server.connect().await;
    assert_eq!(generation(say(&mut agent, &hello(&first)).await), 1);

    // Bad input from the agent is refused and changes nothing else: a certificate that is
    // not an SVID is left out, and the connection keeps answering.
    let td = TrustDomain::new("cluster.local").unwrap();
    let bogus = Credentials {
        trust_domain: td.clone(),
        roots: vec![],
        certs: vec![WorkloadCredential {
            workload: WorkloadId::new(&td, "shop", "web").unwrap(),
            chain_pem: "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".into(),
            key_pem: "not a key".into(),
        }],
    };
    write_message(&mut agent, &ToDataPath::Credentials(bogus))
        .await
        .unwrap();
    match say(&mut agent, &ToDataPath::Connections).await {
        FromDataPath::Connections(_) => {}
        other => panic!("{other:?}"),
    }

    // Another configuration (strict mode): a new proxy on the same listening sockets (a
    // fresh bind would fail: the old proxy still holds them while it drains).
    let mut second = first.clone();
    second.mode = Mode::Strict;
    let mut newer = server.connect().await;
    assert_eq!(generation(say(&mut newer, &hello(&second)).await), 2);
    tokio::net::TcpStream::connect(first.outbound_addr)
        .await
        .expect("the same port still accepts");
    // The older agent's connection was left for the newer one.
    let mut older = agent;
    let closed = tokio::time::timeout(
        Duration::from_secs(10),
        read_message::<_, FromDataPath>(&mut older),
    )
    .await
    .expect("the older agent's connection closes");
    assert!(closed.is_err(), "{closed:?}");
    server.stop().await;
}
