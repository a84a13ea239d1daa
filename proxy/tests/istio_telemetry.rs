//! Istio's TCP telemetry as the running proxies serve it on /metrics: the series Kiali and
//! Istio's dashboards query (`istio_tcp_*`), with workload labels from the workload table,
//! the identities mTLS proved, bytes counted while the connection is open, and Istio's
//! response flags on refusal; plus the per-certificate expiry, build and process metrics.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use zmesh_proxy::{
    Authorizer, AuthzRequest, Decision, Direction, Node, Outcome, Workload, WorkloadTable,
};

const T: Duration = Duration::from_secs(30);
const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client-sa";
const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/server-sa";

/// One sample of a scraped page.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the text exposition (enough of it for these metrics: no escaped quotes).
fn samples(page: &str) -> Vec<Sample> {
    let body = page.split("\r\n\r\n").nth(1).unwrap_or(page);
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("sample has a value");
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => {
                    let inner = rest.strip_suffix('}').expect("closing brace");
                    let labels = inner
                        .split("\",")
                        .filter(|kv| !kv.is_empty())
                        .map(|kv| {
                            let (k, v) = kv.split_once("=\"").expect("label=\"value\"");
                            (k.to_string(), v.trim_end_matches('"').to_string())
                        })
                        .collect();
                    (name.to_string(), labels)
                }
                None => (series.to_string(), BTreeMap::new()),
            };
            Sample {
                name,
                labels,
                value: value.parse().expect("numeric value"),
            }
        })
        .collect()
}

/// The only sample of `name` whose labels include `want`; panics if there is not exactly one.
fn one<'a>(all: &'a [Sample], name: &str, want: &[(&str, &str)]) -> &'a Sample {
    let found: Vec<&Sample> = all
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            want.iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .collect();
    assert_eq!(found.len(), 1, "{name} {want:?}: {found:#?}\nall: {all:#?}");
    found[0]
}

fn count(all: &[Sample], name: &str) -> usize {
    all.iter().filter(|s| s.name == name).count()
}

async fn scrape(addr: SocketAddr) -> Vec<Sample> {
    let page = http_get(addr, "/metrics").await;
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    samples(&page)
}

fn labelled(mut w: Workload, workload_name: &str, app: &str, version: &str) -> Workload {
    w.workload_name = workload_name.into();
    w.labels = Arc::new(
        [("app", app), ("version", version)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    );
    w
}

/// The mesh of `common`, its workloads given a Deployment name and app/version labels.
async fn labelled_mesh(net: u8, opts: MeshOptions) -> Mesh {
    let mesh = Mesh::with(net, opts).await;
    let client = labelled(
        workload("client-7d9f-abcde", "client-sa", "a", mesh.client_ip),
        "client",
        "shop-client",
        "v1",
    );
    let server = labelled(
        workload("server-5c4b-fghij", "server-sa", "b", mesh.server_ip),
        "server",
        "shop-server",
        "v2",
    );
    let nodes = [Node {
        name: "b".into(),
        hbone: Some(mesh.b.addrs.inbound),
    }];
    let table = WorkloadTable::new(Default::default(), nodes, [client, server]).unwrap();
    mesh.store.replace(table);
    mesh
}

/// The labels both proxies give the client -> server tunnel, reporter aside.
fn tunnel_labels() -> Vec<(&'static str, &'static str)> {
    vec![
        ("source_workload", "client"),
        ("source_workload_namespace", "default"),
        ("source_canonical_service", "shop-client"),
        ("source_canonical_revision", "v1"),
        ("source_app", "shop-client"),
        ("source_version", "v1"),
        ("source_principal", CLIENT_ID),
        ("source_cluster", "Kubernetes"),
        ("destination_workload", "server"),
        ("destination_workload_namespace", "default"),
        ("destination_canonical_service", "shop-server"),
        ("destination_canonical_revision", "v2"),
        ("destination_app", "shop-server"),
        ("destination_version", "v2"),
        ("destination_principal", SERVER_ID),
        ("destination_cluster", "Kubernetes"),
        ("destination_service", "unknown"),
        ("request_protocol", "tcp"),
        ("connection_security_policy", "mutual_tls"),
    ]
}

#[tokio::test]
async fn tunnels_are_counted_with_istio_labels_and_live_bytes() {
    let mesh = labelled_mesh(61, MeshOptions::default()).await;
    let mut client = mesh.connect().await;
    let (mut server, _) = tokio::time::timeout(T, mesh.server.accept())
        .await
        .unwrap()
        .unwrap();
    let up = vec![7u8; 1000];
    let down = vec![9u8; 300];
    exchange(&mut client, &mut server, &up, &down).await;

    // While the connection is open: opened, not closed, its bytes already counted.
    for (proxy, reporter) in [(&mesh.a, "source"), (&mesh.b, "destination")] {
        let mut want = tunnel_labels();
        want.push(("reporter", reporter));
        let all = scrape(proxy.addrs.metrics).await;
        let opened = one(&all, "istio_tcp_connections_opened_total", &want);
        assert_eq!(opened.value, 1.0, "{reporter}");
        assert_eq!(opened.labels["response_flags"], "-");
        assert_eq!(
            count(&all, "istio_tcp_connections_closed_total"),
            0,
            "{reporter}"
        );
        let received = one(&all, "istio_tcp_received_bytes_total", &want);
        let sent = one(&all, "istio_tcp_sent_bytes_total", &want);
        // Istio's meaning for both reporters: received from the client, sent back to it.
        assert_eq!(received.value, up.len() as f64, "{reporter}");
        assert_eq!(sent.value, down.len() as f64, "{reporter}");
    }

    // More bytes, then the end of the connection.
    client.write_all(&up).await.unwrap();
    let mut got = vec![0; up.len()];
    server.read_exact(&mut got).await.unwrap();
    drop(client);
    drop(server);
    wait_for("both ends closed", T, || {
        mesh.a
            .metrics
            .closed_count(Direction::Outbound, Outcome::Ok)
            == 1
            && mesh.b.metrics.closed_count(Direction::Inbound, Outcome::Ok) == 1
    })
    .await;
    for (proxy, reporter) in [(&mesh.a, "source"), (&mesh.b, "destination")] {
        let mut want = tunnel_labels();
        want.push(("reporter", reporter));
        let all = scrape(proxy.addrs.metrics).await;
        let closed = one(&all, "istio_tcp_connections_closed_total", &want);
        assert_eq!(closed.value, 1.0, "{reporter}");
        assert_eq!(closed.labels["response_flags"], "-");
        let received = one(&all, "istio_tcp_received_bytes_total", &want);
        assert_eq!(received.value, 2.0 * up.len() as f64, "{reporter}");
        assert_eq!(count(&all, "istio_tcp_connections_failed_total"), 0);
    }
}

struct DenyAll;

impl Authorizer for DenyAll {
    fn authorize(&self, _: &AuthzRequest<'_>) -> Decision {
        Decision::Deny {
            policy: "default/deny-all".into(),
        }
    }
}

#[tokio::test]
async fn a_denied_tunnel_is_opened_and_closed_with_the_deny_flag() {
    let opts = MeshOptions {
        authorizer: Some(Arc::new(DenyAll)),
        ..MeshOptions::default()
    };
    let mesh = labelled_mesh(62, opts).await;
    let mut client = mesh.connect().await;
    let mut buf = [0u8; 1];
    // The client's connection ends without a byte.
    let n = tokio::time::timeout(T, client.read(&mut buf))
        .await
        .unwrap();
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    wait_for("both ends counted", T, || {
        mesh.b
            .metrics
            .closed_count(Direction::Inbound, Outcome::Denied)
            == 1
            && mesh
                .a
                .metrics
                .closed_count(Direction::Outbound, Outcome::Status401)
                == 1
    })
    .await;
    for (proxy, reporter) in [(&mesh.b, "destination"), (&mesh.a, "source")] {
        let mut want = tunnel_labels();
        want.push(("reporter", reporter));
        let all = scrape(proxy.addrs.metrics).await;
        assert_eq!(
            one(&all, "istio_tcp_connections_opened_total", &want).value,
            1.0
        );
        let mut deny = want.clone();
        deny.push(("response_flags", "DENY"));
        assert_eq!(
            one(&all, "istio_tcp_connections_closed_total", &deny).value,
            1.0
        );
        assert_eq!(
            one(&all, "istio_tcp_connections_failed_total", &deny).value,
            1.0
        );
        assert_eq!(
            one(&all, "istio_tcp_received_bytes_total", &want).value,
            0.0
        );
    }
}

#[tokio::test]
async fn certificate_build_and_process_metrics() {
    let mesh = labelled_mesh(63, MeshOptions::default()).await;
    let all = scrape(mesh.a.addrs.metrics).await;
    // common::Ca issues leaves valid for 24 h from now.
    let expires = one(
        &all,
        "zmesh_certificate_expiration_timestamp_seconds",
        &[("identity", CLIENT_ID)],
    );
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as f64;
    let day = 24.0 * 3600.0;
    assert!(
        (expires.value - (now + day)).abs() < 300.0,
        "expiry {} vs now + 24 h {}",
        expires.value,
        now + day
    );
    let left = one(&all, "zmesh_certificate_expiry_seconds", &[]);
    assert!((left.value - day).abs() < 300.0, "{left:?}");
    let build = one(&all, "zmesh_build_info", &[]);
    assert_eq!(build.labels["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(build.value, 1.0);
    assert!(one(&all, "process_resident_memory_bytes", &[]).value > 1e6);
    assert!(one(&all, "process_open_fds", &[]).value >= 3.0);
    assert!(one(&all, "process_max_fds", &[]).value >= one(&all, "process_open_fds", &[]).value);
    assert!(one(&all, "process_threads", &[]).value >= 1.0);
    let started = one(&all, "process_start_time_seconds", &[]).value;
    assert!(
        started <= now + 1.0 && started > now - 3600.0,
        "{started} vs {now}"
    );
    assert!(one(&all, "process_cpu_seconds_total", &[]).value > 0.0);
}
