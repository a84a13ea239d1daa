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
use zmesh_agent::flows_api::FlowQuery;
use zmesh_dataplane::Mode;
use zmesh_identity::{TrustDomain, WorkloadId};
use zmesh_proxy::flows::{FlowEvent, FlowFilter, FlowPhase, FlowVerdict};
use zmesh_proxy::{Capture, ProxyConfig, WorkloadTable};
use zmesh_redirect::{DropEvent, DropReason};

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

/// The next message (flow events come only when asked for).
async fn next(stream: &mut UnixStream) -> FromDataPath {
    tokio::time::timeout(Duration::from_secs(10), read_message(stream))
        .await
        .expect("an answer")
        .unwrap()
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

/// A plaintext connection to the proxy, which it closes (no original destination without
/// a capture): one flow event, published before the client sees the end.
async fn refused_plaintext(config: &ProxyConfig) {
    use tokio::io::AsyncReadExt;
    let mut tcp = tokio::net::TcpStream::connect(config.plaintext_addr)
        .await
        .unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut rest))
        .await
        .expect("the proxy closes it");
}

/// The data path's `/metrics` page.
async fn get_metrics(config: &ProxyConfig) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(config.metrics_addr)
        .await
        .unwrap();
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut page = String::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_string(&mut page))
        .await
        .expect("the metrics page")
        .unwrap();
    page
}

/// The flow events answering request `id`, up to its end (or `count` of them).
async fn flows(agent: &mut UnixStream, want: u64, count: Option<usize>) -> Vec<FlowEvent> {
    let mut events = Vec::new();
    while count.is_none_or(|n| events.len() < n) {
        match next(agent).await {
            FromDataPath::Flow { id, event } if id == want => events.push(*event),
            FromDataPath::FlowsEnd { id } if id == want && count.is_none() => break,
            other => panic!("expected flows of request {want}, got {other:?}"),
        }
    }
    events
}

fn query(follow: bool, last: Option<usize>) -> FlowQuery {
    FlowQuery {
        filter: FlowFilter::default(),
        follow,
        last,
    }
}

/// The data path's hub is the node's: the agent's drop reports go into it (and its
/// metrics). Flow events cross to the agent only when it asks (nobody observing costs
/// nothing per connection): a history ends with its end; a follow gets the last N, then
/// live ones until it is stopped.
#[tokio::test(flavor = "multi_thread")]
async fn flow_events_cross_only_when_asked_history_then_live_until_stopped() {
    let server = Server::start().await;
    let config = config();
    let mut agent = server.connect().await;
    assert_eq!(generation(say(&mut agent, &hello(&config)).await), 1);
    // The agent hands over what its eBPF programs dropped: the data path's hub is the
    // node's.
    let dropped = zmesh_agent::flows_api::drop_flow(
        &DropEvent {
            time: std::time::SystemTime::now(),
            src: "10.9.9.9:40000".parse().unwrap(),
            dst: "10.0.0.2:8080".parse().unwrap(),
            reason: DropReason::StrictPlaintext,
        },
        &WorkloadTable::default(),
    );
    write_message(&mut agent, &ToDataPath::Flow(Box::new(dropped.clone())))
        .await
        .unwrap();
    // Messages are handled in order: once this is answered, the drop is in the hub.
    assert!(matches!(
        say(&mut agent, &ToDataPath::Connections).await,
        FromDataPath::Connections(_)
    ));
    for _ in 0..3 {
        refused_plaintext(&config).await;
    }
    // Nothing was sent unasked: the next message is the answer to this request.
    match say(&mut agent, &ToDataPath::Connections).await {
        FromDataPath::Connections(_) => {}
        other => panic!("expected the connections, got {other:?}"),
    }

    let ask = ToDataPath::Flows {
        id: 7,
        query: Box::new(query(false, None)),
    };
    write_message(&mut agent, &ask).await.unwrap();
    let history = flows(&mut agent, 7, None).await;
    assert_eq!(history.len(), 4, "{history:#?}");
    assert_eq!(history[0], dropped);
    assert!(history[1..]
        .iter()
        .all(|e| e.phase == FlowPhase::Close && e.verdict == FlowVerdict::Error));
    // ... and counts it on the node's /metrics.
    let metrics = get_metrics(&config).await;
    assert!(
        metrics.contains(r#"zmesh_flow_drops_total{reason="plaintext_strict"} 1"#),
        "{metrics}"
    );

    let follow = ToDataPath::Flows {
        id: 8,
        query: Box::new(query(true, Some(1))),
    };
    write_message(&mut agent, &follow).await.unwrap();
    let last = flows(&mut agent, 8, Some(1)).await;
    assert_eq!(last, history[3..], "the last one of the history first");
    refused_plaintext(&config).await;
    let live = flows(&mut agent, 8, Some(1)).await;
    assert!(live[0].time >= history[3].time, "{live:#?}");

    // Stopped: later connections send nothing (the answer to Connections comes after the
    // stop was read, in order).
    write_message(&mut agent, &ToDataPath::StopFlows { id: 8 })
        .await
        .unwrap();
    assert!(matches!(
        say(&mut agent, &ToDataPath::Connections).await,
        FromDataPath::Connections(_)
    ));
    refused_plaintext(&config).await;
    match say(&mut agent, &ToDataPath::Connections).await {
        FromDataPath::Connections(_) => {}
        other => panic!("a stopped follow sent {other:?}"),
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
