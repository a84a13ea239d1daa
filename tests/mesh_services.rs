//! Kubernetes Services end to end on the netns cluster: clients dial a ClusterIP, enrolled
//! clients' connections go through the mesh to one of the Service's endpoints (the VIP is
//! never dialed), legacy clients go through the lab's stand-in for kube-proxy. Real CA, real
//! agents, eBPF redirection, captures. Needs root.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::{lab, secret, serve_echo, wait_flows, LongLivedClient};
use zmesh_lab::Lab;
use zmesh_proxy::flows::{FlowEvent, FlowVerdict};

/// shop/web's ClusterIP and port (examples/demo/services.yaml): endpoints shop/web on node1
/// and shop/web-2 on node2, both serving the named port `http` (8080).
fn web_vip() -> SocketAddr {
    "10.96.0.10:80".parse().unwrap()
}

/// Flows of `node` that went to `service`.
fn to_service<'a>(flows: &'a [FlowEvent], service: &str) -> Vec<&'a FlowEvent> {
    flows
        .iter()
        .filter(|f| f.service.as_deref() == Some(service))
        .collect()
}

fn echoes(lab: &Lab, ns: &str, pod: &str, addr: SocketAddr, label: &str) -> bool {
    let payload = secret(label);
    let run = lab.pod_client(ns, pod, addr, &payload).unwrap();
    run.success && run.output == payload
}

#[tokio::test(flavor = "multi_thread")]
async fn clients_reach_a_service_by_its_cluster_ip_through_the_mesh() {
    let lab = lab(&[]).await;
    let (_, _web) = serve_echo(&lab, "shop", "web", 8080);
    let (_, _web2) = serve_echo(&lab, "shop", "web-2", 8080);

    let capture = lab.cluster().start_capture().unwrap();
    let payload = secret("service");
    const CONNECTIONS: usize = 20;
    for _ in 0..CONNECTIONS {
        let run = lab
            .pod_client("shop", "frontend", web_vip(), &payload)
            .unwrap();
        assert_eq!(
            run.output,
            payload,
            "frontend -> {}: {}",
            web_vip(),
            run.stderr
        );
    }
    let pcap = capture.stop().unwrap();
    assert!(
        !pcap.contains(&payload),
        "an enrolled client's traffic to a Service crosses the wire only inside mTLS"
    );
    assert!(pcap.tcp_ports().contains_key(&15008));
    assert!(
        !pcap.tcp_ports().contains_key(&80),
        "the ClusterIP is never dialed"
    );

    // frontend's node chose the endpoints: both replicas, the local one and the remote one.
    let flows = wait_flows(&lab, "node2", &[], |f| {
        to_service(f, "shop/web").len() >= CONNECTIONS
    });
    let outbound = to_service(&flows, "shop/web");
    for f in &outbound {
        assert!(f.encrypted, "{f:#?}");
        assert_eq!(f.verdict, FlowVerdict::Forwarded, "{f:#?}");
        assert_eq!(
            f.destination.identity.as_deref(),
            Some("spiffe://cluster.local/ns/shop/sa/web"),
            "the endpoint's identity: {f:#?}"
        );
    }
    for pod in ["web", "web-2"] {
        assert!(
            outbound
                .iter()
                .any(|f| f.destination.pod.as_deref() == Some(pod)),
            "{CONNECTIONS} connections spread over both endpoints; none reached {pod}: {outbound:#?}"
        );
    }
    // The remote endpoint's node saw the verified client identity for the Service.
    wait_flows(&lab, "node1", &[], |f| {
        f.iter().any(|f| {
            f.encrypted
                && f.source.identity.as_deref()
                    == Some("spiffe://cluster.local/ns/shop/sa/frontend")
                && f.destination.pod.as_deref() == Some("web")
        })
    });

    // A client on the other node, and a legacy client through kube-proxy (permissive).
    assert!(echoes(&lab, "shop", "cart", web_vip(), "service-cart"));
    assert!(echoes(&lab, "legacy", "batch", web_vip(), "service-legacy"));
}

#[tokio::test(flavor = "multi_thread")]
async fn endpoints_follow_the_cluster_and_non_mesh_endpoints_get_plain_tcp() {
    let mut lab = lab(&[]).await;
    let (_, _web) = serve_echo(&lab, "shop", "web", 8080);
    let (_, _web2) = serve_echo(&lab, "shop", "web-2", 8080);
    let (_, _batch) = serve_echo(&lab, "legacy", "batch", 9090);

    // A Service whose endpoint is not enrolled: the proxy dials it in plain TCP.
    lab.edit_manifest("batch-service.yaml", |text| {
        *text = "apiVersion: v1\nkind: Service\nmetadata: {name: batch, namespace: legacy}\n\
                 spec:\n  clusterIP: 10.96.0.20\n  selector: {app: batch}\n  \
                 ports: [{port: 90, targetPort: 9090}]\n"
            .into();
    })
    .unwrap();
    let batch_vip: SocketAddr = "10.96.0.20:90".parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !echoes(&lab, "shop", "frontend", batch_vip, "to-batch") {
        assert!(Instant::now() < deadline, "legacy/batch never served");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let flows = wait_flows(&lab, "node2", &[], |f| {
        !to_service(f, "legacy/batch").is_empty()
    });
    let f = to_service(&flows, "legacy/batch")[0];
    assert!(
        !f.encrypted,
        "a non-enrolled endpoint gets plain TCP: {f:#?}"
    );
    assert_eq!(f.destination.pod.as_deref(), Some("batch"));
    assert_eq!(
        f.destination.addr.port(),
        9090,
        "the endpoint's target port"
    );

    // Every endpoint goes unready (as in a rollout gone wrong): an open connection through
    // the Service stays; new ones are refused at once, with a flow event saying why.
    let mut open = LongLivedClient::open(&lab, "shop", "frontend", web_vip());
    open.roundtrip("before");
    let pods = std::fs::read_to_string(support::manifests().join("pods.yaml")).unwrap();
    let unready: String = pods
        .split("\n---\n")
        .map(|doc| {
            if doc.contains("labels: {app: web}") {
                format!(
                    "{}\nstatus:\n  conditions: [{{type: Ready, status: \"False\"}}]\n",
                    doc.trim_end()
                )
            } else {
                doc.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n---\n");
    lab.edit_manifest("pods.yaml", |text| *text = unready)
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let run = lab
            .pod_client("shop", "frontend", web_vip(), b"anyone?")
            .unwrap();
        if !run.success {
            assert!(
                run.elapsed < Duration::from_secs(2),
                "no endpoint: refused at once, not after a timeout ({:?})",
                run.elapsed
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still served with no ready endpoint"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_flows(&lab, "node2", &[], |f| {
        to_service(f, "shop/web").iter().any(|f| {
            f.reason
                .as_deref()
                .is_some_and(|r| r.contains("no_endpoints"))
        })
    });
    open.roundtrip("still open with no ready endpoint");

    // Ready again: served again.
    lab.edit_manifest("pods.yaml", |text| *text = pods.clone())
        .unwrap();
    wait_served(&lab, "ready-again").await;

    // Scaled to zero (the endpoint pods deleted), then back up.
    let scaled_to_zero: String = pods
        .split("\n---\n")
        .filter(|doc| !doc.contains("labels: {app: web}"))
        .collect::<Vec<_>>()
        .join("\n---\n");
    lab.edit_manifest("pods.yaml", |text| *text = scaled_to_zero)
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let run = lab
            .pod_client("shop", "frontend", web_vip(), b"anyone?")
            .unwrap();
        if !run.success {
            assert!(run.elapsed < Duration::from_secs(2), "{:?}", run.elapsed);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still served after scaling to zero"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    lab.edit_manifest("pods.yaml", |text| *text = pods).unwrap();
    wait_served(&lab, "scaled-up").await;
}

/// Waits until frontend reaches shop/web through its ClusterIP.
async fn wait_served(lab: &Lab, label: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !echoes(lab, "shop", "frontend", web_vip(), label) {
        assert!(Instant::now() < deadline, "{label}: never served");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn strict_mode_serves_enrolled_clients_of_a_service() {
    let lab = lab(&["node1", "node2"]).await;
    let (_, _web) = serve_echo(&lab, "shop", "web", 8080);
    let (_, _web2) = serve_echo(&lab, "shop", "web-2", 8080);
    let capture = lab.cluster().start_capture().unwrap();
    let payload = secret("strict-service");
    for _ in 0..6 {
        let run = lab
            .pod_client("shop", "frontend", web_vip(), &payload)
            .unwrap();
        assert_eq!(run.output, payload, "{}", run.stderr);
    }
    let pcap = capture.stop().unwrap();
    assert!(!pcap.contains(&payload));
}
