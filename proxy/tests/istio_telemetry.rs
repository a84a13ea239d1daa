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

    // Both proxies list it among their open connections, with its bytes so far.
    for (proxy, direction) in [(&mesh.a, "outbound"), (&mesh.b, "inbound")] {
        let open = proxy.connections.snapshot();
        assert_eq!(open.len(), 1, "{open:?}");
        let c = serde_json::to_value(&open[0]).unwrap();
        assert_eq!(c["direction"], direction);
        assert_eq!(c["encrypted"], true);
        assert_eq!(c["bytes_sent"], up.len());
        assert_eq!(c["bytes_received"], down.len());
        assert_eq!(c["destination"]["pod"], "server-5c4b-fghij");
        assert_eq!(c["destination"]["identity"], SERVER_ID);
        assert_eq!(c["source"]["identity"], CLIENT_ID);
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
        assert!(proxy.connections.is_empty(), "{reporter}");
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

/// Every PromQL query of the Grafana dashboard (examples/grafana), panels and variables.
fn dashboard_queries() -> Vec<String> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/grafana/zmesh-dashboard.json"
    );
    let text = std::fs::read_to_string(path).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut exprs = Vec::new();
    for panel in dash["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            exprs.push(target["expr"].as_str().unwrap().to_string());
        }
    }
    for var in dash["templating"]["list"].as_array().unwrap() {
        if let Some(q) = var["query"]["query"].as_str() {
            exprs.push(q.to_string());
        }
    }
    exprs
}

/// Identifiers of `expr` outside quoted strings, with whether each sits inside `{}` or a
/// label list (`by (...)`, `on (...)`, `group_left (...)`, `label_values(m, label)`).
fn tokens(expr: &str) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    let (mut in_quotes, mut braces) = (false, 0);
    let mut label_list = false;
    let mut word = String::new();
    let mut prev_word = String::new();
    let flush = |word: &mut String, is_label: bool, out: &mut Vec<(String, bool)>| {
        if !word.is_empty() {
            out.push((std::mem::take(word), is_label));
        }
    };
    for c in expr.chars() {
        if in_quotes {
            in_quotes = c != '"';
            continue;
        }
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' || c == '$' {
            word.push(c);
            continue;
        }
        let is_label = braces > 0 || label_list;
        if !word.is_empty() {
            prev_word = word.clone();
        }
        flush(&mut word, is_label, &mut out);
        match c {
            '"' => in_quotes = true,
            '{' => braces += 1,
            '}' => braces -= 1,
            '(' => {
                label_list = [
                    "by",
                    "on",
                    "ignoring",
                    "group_left",
                    "group_right",
                    "without",
                ]
                .contains(&prev_word.as_str())
            }
            ')' => label_list = false,
            ',' if prev_word.starts_with("istio_") || prev_word.starts_with("zmesh_") => {
                // label_values(metric, label)
                label_list = expr.starts_with("label_values(");
            }
            _ => {}
        }
        if c != ' ' && c != ',' {
            prev_word.clear();
        }
    }
    let is_label = braces > 0 || label_list;
    flush(&mut word, is_label, &mut out);
    out
}

/// A scrape of proxies that saw every kind of event the dashboard charts: a tunnel, a
/// policy refusal, a TLS handshake failure, a stream refused at a limit, and an eBPF drop
/// and a policy verdict published as the agent publishes them.
async fn busy_scrape() -> String {
    let mesh = labelled_mesh(64, MeshOptions::default()).await;
    let mut client = mesh.connect().await;
    let (mut server, _) = tokio::time::timeout(T, mesh.server.accept())
        .await
        .unwrap()
        .unwrap();
    exchange(&mut client, &mut server, b"ping", b"pong").await;
    drop((client, server));
    wait_for("tunnel closed", T, || {
        mesh.b.metrics.closed_count(Direction::Inbound, Outcome::Ok) == 1
    })
    .await;
    // Not TLS at all.
    let mut garbage = tokio::net::TcpStream::connect(mesh.b.addrs.inbound)
        .await
        .unwrap();
    garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let _ = garbage.read(&mut [0; 16]).await;
    let event: zmesh_proxy::flows::FlowEvent = serde_json::from_value(serde_json::json!({
        "time": "2026-12-06T00:00:00Z",
        "source": {"addr": "10.0.0.1:1234"},
        "destination": {"addr": "10.0.0.2:80"},
        "bytes_sent": 0, "bytes_received": 0, "duration_us": 0,
        "verdict": "dropped", "encrypted": false, "reason": "plaintext_strict",
    }))
    .unwrap();
    let event = zmesh_proxy::flows::FlowEvent {
        policy: Some(zmesh_proxy::policy::Verdict::Allow(
            zmesh_proxy::policy::Allowed::NoAllowPolicy,
        )),
        ..event
    };
    mesh.b.flows.publish(event);
    wait_for("handshake failure counted", T, || {
        mesh.b.metrics.inbound_tls_connections() == 1
    })
    .await;

    let denied = labelled_mesh(
        65,
        MeshOptions {
            authorizer: Some(Arc::new(DenyAll)),
            ..MeshOptions::default()
        },
    )
    .await;
    let mut c = denied.connect().await;
    let _ = c.read(&mut [0; 1]).await;
    wait_for("denial counted", T, || {
        denied
            .b
            .metrics
            .closed_count(Direction::Inbound, Outcome::Denied)
            == 1
    })
    .await;

    let limited = labelled_mesh(
        66,
        MeshOptions {
            config: Box::new(|c| c.limits.max_tunnels_per_identity = 0),
            ..MeshOptions::default()
        },
    )
    .await;
    let mut c = limited.connect().await;
    let _ = c.read(&mut [0; 1]).await;
    wait_for("refusal counted", T, || {
        limited.b.metrics.refused_stream_count("identity_limit") >= 1
    })
    .await;

    let mut pages = String::new();
    for addr in [
        mesh.a.addrs.metrics,
        mesh.b.addrs.metrics,
        denied.b.addrs.metrics,
        limited.b.addrs.metrics,
    ] {
        let page = http_get(addr, "/metrics").await;
        pages.push_str(page.split("\r\n\r\n").nth(1).unwrap());
    }
    pages
}

#[tokio::test]
async fn the_grafana_dashboard_queries_metrics_the_proxy_serves() {
    let page = busy_scrape().await;
    // Names as PromQL sees them: counters get `_total`.
    let mut served = std::collections::BTreeSet::new();
    for line in page.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            served.insert(match kind {
                "counter" => format!("{name}_total"),
                _ => name.to_string(),
            });
        }
    }
    let all = samples(&page);
    // Every metric a query names (`istio_*`, `zmesh_*`, `process_*` outside quotes) is
    // served, and every label it groups or filters by is on its samples.
    let queries = dashboard_queries();
    assert!(queries.len() >= 10, "{queries:?}");
    for expr in &queries {
        let toks = tokens(expr);
        let metrics: Vec<&String> = toks
            .iter()
            .filter(|(t, is_label)| {
                !is_label
                    && ["istio_", "zmesh_", "process_"]
                        .iter()
                        .any(|p| t.starts_with(p))
            })
            .map(|(t, _)| t)
            .collect();
        assert!(
            !metrics.is_empty(),
            "no zmesh/istio/process metric in {expr}"
        );
        for m in &metrics {
            assert!(
                served.contains(*m),
                "{m} (in {expr}) is not served; served: {served:?}"
            );
        }
        // Labels, where the scrape has samples to check them against. `instance` is
        // Prometheus's own.
        let with_samples: Vec<&Sample> =
            all.iter().filter(|s| metrics.contains(&&s.name)).collect();
        if with_samples.is_empty() {
            continue;
        }
        for (label, _) in toks
            .iter()
            .filter(|(t, is_label)| *is_label && !t.starts_with('$'))
        {
            if label == "instance" {
                continue;
            }
            assert!(
                with_samples.iter().any(|s| s.labels.contains_key(label)),
                "label {label} (in {expr}) is on no sample of {metrics:?}"
            );
        }
    }
}
