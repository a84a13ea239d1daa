//! IPv6 end to end on a dual-stack netns cluster (the demo's manifests, every pod with an
//! IPv4 and an IPv6 address, agents started with `--proxy-ip6`): enrolled pods' IPv6 TCP goes
//! through the node proxies with mTLS, both directions of the eBPF steering (cgroup connect6
//! and tc ingress) and HBONE over IPv6 between nodes; IPv4 keeps working beside it through
//! the same dual-stack listeners; strict mode refuses IPv6 plaintext. Needs root.

mod support;

use std::net::{IpAddr, SocketAddr};

use support::{options, secret, serve_echo};
use zmesh_lab::{access_lines, Lab};

async fn dual_stack_lab(strict_nodes: &[&str]) -> Lab {
    let mut options = options(support::manifests(), strict_nodes, vec![]);
    options.dual_stack = true;
    Lab::start(options)
        .await
        .expect("the dual-stack lab starts")
}

fn addr6(lab: &Lab, ns: &str, pod: &str, port: u16) -> SocketAddr {
    let pod = lab.cluster().pod(ns, pod).expect("pod");
    SocketAddr::new(IpAddr::V6(pod.ip6().expect("dual-stack pod")), port)
}

#[tokio::test(flavor = "multi_thread")]
async fn ipv6_between_enrolled_pods_is_mtls_and_ipv4_still_works() {
    let lab = dual_stack_lab(&[]).await;
    // dual-stack servers: [::] takes both families
    let (web4, _web) = serve_echo(&lab, "shop", "web", 8080);
    let (_, _batch) = serve_echo(&lab, "legacy", "batch", 9090);
    let web6 = addr6(&lab, "shop", "web", 8080);
    let batch6 = addr6(&lab, "legacy", "batch", 9090);
    let capture = lab.cluster().start_capture().unwrap();

    // Cross-node over IPv6 (frontend on node2 -> web on node1).
    let cross = secret("cross6");
    let run = lab.pod_client("shop", "frontend", web6, &cross).unwrap();
    assert_eq!(run.output, cross, "cross-node IPv6: {}", run.stderr);
    // Same node over IPv6 (cart -> web, both on node1).
    let same = secret("same6");
    let run = lab.pod_client("shop", "cart", web6, &same).unwrap();
    assert_eq!(run.output, same, "same-node IPv6: {}", run.stderr);
    // IPv4 between the same pods, through the same dual-stack listeners.
    let cross4 = secret("cross4");
    let run = lab.pod_client("shop", "frontend", web4, &cross4).unwrap();
    assert_eq!(run.output, cross4, "cross-node IPv4: {}", run.stderr);
    // Non-enrolled -> enrolled over IPv6, permissive: works, in plaintext.
    let plain = secret("plain6");
    let run = lab.pod_client("legacy", "batch", web6, &plain).unwrap();
    assert_eq!(run.output, plain, "plaintext IPv6: {}", run.stderr);
    // Enrolled -> non-enrolled over IPv6: passed through.
    let out = secret("out6");
    let run = lab.pod_client("shop", "frontend", batch6, &out).unwrap();
    assert_eq!(run.output, out, "passthrough IPv6: {}", run.stderr);
    let pcap = capture.stop().unwrap();

    // On the underlay the IPv6 mesh connections are TLS to 15008, never the payload, and
    // the enrolled client never reached port 8080 itself.
    assert!(
        !pcap.contains(&cross),
        "cross-node IPv6 payload seen in clear"
    );
    assert!(
        !pcap.contains(&cross4),
        "cross-node IPv4 payload seen in clear"
    );
    let streams = pcap.tcp_streams6();
    let frontend6 = addr6(&lab, "shop", "frontend", 0).ip();
    assert!(
        !streams
            .keys()
            .any(|flow| IpAddr::V6(flow.0) == frontend6 && flow.3 == 8080),
        "the enrolled client reached port 8080 directly: {:?}",
        streams.keys().collect::<Vec<_>>()
    );
    let hbone: Vec<_> = streams
        .iter()
        .filter(|(flow, data)| flow.3 == 15008 && !data.is_empty())
        .collect();
    assert!(!hbone.is_empty(), "no HBONE over IPv6 captured");
    for (flow, data) in &hbone {
        assert_eq!(&data[..2], &[0x16, 0x03], "{flow:?} is not TLS");
        assert_eq!(
            IpAddr::V6(flow.2),
            web6.ip(),
            "HBONE goes to the pod's IPv6 address on 15008"
        );
    }
    // The plaintext case is visible, proving the capture sees IPv6 payloads.
    assert!(pcap.contains(&plain));

    // The proxies verified both identities, and log the IPv6 destination.
    let td = lab.trust_domain().to_string();
    let id = |sa: &str| format!("spiffe://{td}/ns/shop/sa/{sa}");
    let node1 = access_lines(&lab.agent_log("node1"));
    let inbound = |src: &str| {
        node1.iter().any(|l| {
            l.direction == "inbound"
                && l.src_identity == id(src)
                && l.dst_identity == id("web")
                && l.dst_addr == web6.to_string()
                && l.result == "ok"
        })
    };
    assert!(inbound("frontend"), "{node1:#?}");
    assert!(
        inbound("cart"),
        "same-node IPv6 passes the inbound proxy: {node1:#?}"
    );
    assert!(
        node1.iter().any(|l| l.direction == "inbound"
            && l.src_identity == id("frontend")
            && l.dst_addr == web4.to_string()),
        "IPv4 is logged in its own form, not v4-mapped: {node1:#?}"
    );
    assert!(
        node1.iter().any(|l| l.direction == "inbound_plaintext"
            && l.src_identity == "-"
            && l.dst_addr == web6.to_string()),
        "{node1:#?}"
    );
    let node2 = access_lines(&lab.agent_log("node2"));
    assert!(
        node2.iter().any(|l| l.direction == "outbound"
            && l.result == "passthrough"
            && l.dst_addr == batch6.to_string()),
        "{node2:#?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn strict_mode_refuses_ipv6_plaintext_and_keeps_ipv6_mtls() {
    let lab = dual_stack_lab(&["node1"]).await;
    let (_, _web) = serve_echo(&lab, "shop", "web", 8080);
    let web6 = addr6(&lab, "shop", "web", 8080);

    let mtls = secret("mtls6");
    let run = lab.pod_client("shop", "frontend", web6, &mtls).unwrap();
    assert_eq!(run.output, mtls, "mTLS over IPv6 in strict: {}", run.stderr);

    let plain = secret("plain6");
    let run = lab.pod_client("legacy", "batch", web6, &plain).unwrap();
    assert!(
        !run.success && run.output.is_empty(),
        "IPv6 plaintext to a strict node's pod must be refused: {run:?}"
    );
    // Refused by the eBPF program (counted there with its reason), not by the proxy.
    let pins = lab.pin_dir("node1");
    let counts = lab
        .cluster()
        .node("node1")
        .unwrap()
        .run(move || zmesh_redirect::Redirector::open_pinned(&pins).and_then(|r| r.drop_counts()))
        .unwrap()
        .unwrap();
    assert!(counts.strict_plaintext >= 1, "{counts:?}");
    // And mTLS over IPv6 still works after the refusal.
    let again = secret("mtls6-again");
    let run = lab.pod_client("shop", "cart", web6, &again).unwrap();
    assert_eq!(run.output, again, "{}", run.stderr);
}
