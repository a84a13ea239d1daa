//! Faults a node survives, end to end on a netns cluster with the real CA and agents: a
//! node's agent (and so its proxy) killed mid-stream, on either side of a tunnel; the
//! agents killed while their proxies run in `zmesh datapath` processes; and the CA down for
//! longer than the workload certificates live. Needs root.

mod support;

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use support::{
    certs, lab, manifests, observe, secret, serve_echo, wait_flows, LongLivedClient, Roundtrip,
};
use zmesh_lab::{Lab, LabOptions};
use zmesh_proxy::flows::FlowVerdict;

/// How long a client may wait for its connection to end once the proxy carrying it died;
/// far more than it takes (a dead process's sockets are closed by the kernel at once).
const END_WITHIN: Duration = Duration::from_secs(15);

/// web runs on node1, frontend on node2 (examples/demo/pods.yaml).
async fn kill_mid_stream(node: &str) {
    let mut lab = lab(&[]).await;
    let (web, _server) = serve_echo(&lab, "shop", "web", 8080);
    let mut client = LongLivedClient::open(&lab, "shop", "frontend", web);
    client.roundtrip("before the kill");

    lab.kill_agent(node).unwrap();
    // The application sees its connection end, not a hang.
    let outcome = client.try_roundtrip("after the kill", END_WITHIN);
    if outcome != Roundtrip::Ended {
        // Seen three times in CI before the proxy reset (instead of closing) the client's
        // side of a broken tunnel: nc keeps running after an EOF while its stdin is open.
        // Keep what the living agent knew, should it come back.
        let other = if node == "node1" { "node2" } else { "node1" };
        panic!(
            "the connection through {node}'s dead proxy: {outcome:?}; {other}'s log:\n{}",
            tail(&lab.agent_log(other))
        );
    }

    // While the agent is down, redirection stays pinned: new connections fail closed,
    // nothing goes out in plaintext.
    let capture = lab.cluster().start_capture().unwrap();
    let leaked = secret("while-down");
    let run = lab.pod_client("shop", "frontend", web, &leaked).unwrap();
    let pcap = capture.stop().unwrap();
    assert!(
        run.output.is_empty(),
        "a connection got through while {node}'s agent was dead: {:?}",
        String::from_utf8_lossy(&run.output)
    );
    assert!(
        !pcap.contains(&leaked),
        "plaintext on the wire while {node}'s agent was dead"
    );

    // A new agent takes over the pinned state: traffic flows again, encrypted.
    lab.start_agent(node, false).unwrap();
    lab.wait_ready(node, Duration::from_secs(60)).await.unwrap();
    let capture = lab.cluster().start_capture().unwrap();
    let fresh = secret("after-restart");
    let run = lab.pod_client("shop", "frontend", web, &fresh).unwrap();
    let pcap = capture.stop().unwrap();
    assert_eq!(
        run.output,
        fresh,
        "after the restart: {}; node1's log:\n{}\nnode2's log:\n{}",
        run.stderr,
        tail(&lab.agent_log("node1")),
        tail(&lab.agent_log("node2"))
    );
    assert!(
        !pcap.contains(&fresh),
        "after the restart: plaintext on the wire"
    );
    let mut client = LongLivedClient::open(&lab, "shop", "frontend", web);
    client.roundtrip("a long-lived connection after the restart");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_server_side_proxy_killed_mid_stream_ends_the_connection_and_fails_closed() {
    kill_mid_stream("node1").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_client_side_agent_killed_mid_stream_ends_the_connection_and_fails_closed() {
    kill_mid_stream("node2").await;
}

/// With each node's proxy in a `zmesh datapath` process, SIGKILL of the agents (a crash,
/// an OOM kill) takes no connection with it: open tunnels keep flowing, new ones are made
/// with what the data paths were last given, and a new agent takes its data path over
/// (what changes after it started reaches the proxy).
#[tokio::test(flavor = "multi_thread")]
async fn agents_killed_while_the_proxies_run_apart_keep_connections_and_new_agents_take_over() {
    let mut options = support::options(manifests(), &[], vec![]);
    options.datapath_process = true;
    let mut lab = Lab::start(options).await.expect("the lab starts");
    let (web, _server) = serve_echo(&lab, "shop", "web", 8080);
    // The agents hold their certificates; the data paths get them a moment later.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let hello = secret("first");
        if lab
            .pod_client("shop", "frontend", web, &hello)
            .unwrap()
            .output
            == hello
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no connection through the data paths; node1's:\n{}\nnode2's:\n{}",
            tail(&lab.datapath_log("node1")),
            tail(&lab.datapath_log("node2"))
        );
    }
    let mut client = LongLivedClient::open(&lab, "shop", "frontend", web);
    client.roundtrip("before the kill");

    let killed_at = SystemTime::now();
    lab.kill_agent("node1").unwrap();
    lab.kill_agent("node2").unwrap();
    // The open connection carries on through both proxies.
    assert_eq!(
        client.try_roundtrip("after both agents were killed", END_WITHIN),
        Roundtrip::Echoed,
        "node1's data path:\n{}\nnode2's:\n{}",
        tail(&lab.datapath_log("node1")),
        tail(&lab.datapath_log("node2"))
    );
    // New connections too, still in mTLS.
    let capture = lab.cluster().start_capture().unwrap();
    let fresh = secret("agents-dead");
    let run = lab.pod_client("shop", "frontend", web, &fresh).unwrap();
    let pcap = capture.stop().unwrap();
    assert_eq!(
        run.output, fresh,
        "a new connection with the agents dead: {}",
        run.stderr
    );
    assert!(
        !pcap.contains(&fresh),
        "plaintext on the wire with the agents dead"
    );

    // New agents take over the running data paths (the same processes: they say so).
    lab.start_agent("node1", false).unwrap();
    lab.start_agent("node2", false).unwrap();
    lab.wait_ready("node1", Duration::from_secs(60))
        .await
        .unwrap();
    lab.wait_ready("node2", Duration::from_secs(60))
        .await
        .unwrap();
    client.roundtrip("after the new agents started");
    // The data paths keep their flow history: the new agents show the connection made
    // while no agent ran.
    let while_dead = |flows: &[zmesh_proxy::flows::FlowEvent]| {
        flows.iter().any(|f| {
            f.time >= killed_at
                && f.source.pod.as_deref() == Some("frontend")
                && f.verdict == FlowVerdict::Forwarded
        })
    };
    wait_flows(&lab, "node1", &["--to-port", "8080"], while_dead);
    wait_flows(&lab, "node2", &["--to-port", "8080"], while_dead);
    for node in ["node1", "node2"] {
        let log = lab.datapath_log(node);
        assert_eq!(
            log.matches("a node agent connected").count(),
            2,
            "{node}'s data path:\n{}",
            tail(&log)
        );
    }
    // What the new agent is told reaches its data path: a DENY for frontend closes the
    // open connection and refuses new ones, and the data path's flow events reach the
    // agent's API.
    lab.edit_manifest("policy-deny.yaml", |t| {
        *t = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-frontend, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  action: DENY
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/shop/sa/frontend"]}
"#
        .to_owned()
    })
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let denied = lab
            .pod_client("shop", "frontend", web, &secret("denied"))
            .unwrap();
        if denied.output.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "the DENY never applied");
    }
    assert_eq!(
        client.try_roundtrip("after the DENY", END_WITHIN),
        Roundtrip::Ended,
        "the open connection outlived a DENY given to the new agent"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !observe(&lab, "node1", &["--verdict", "denied"])
        .iter()
        .any(|f| f.verdict == FlowVerdict::Denied)
    {
        assert!(
            Instant::now() < deadline,
            "no denied flow reached node1's agent from its data path"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn tail(log: &str) -> String {
    let lines: Vec<_> = log.lines().collect();
    lines[lines.len().saturating_sub(25)..].join("\n")
}

fn now_epoch() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test(flavor = "multi_thread")]
async fn ca_down_past_certificate_expiry_fails_closed_with_the_reason_and_recovers() {
    const LIFETIME: Duration = Duration::from_secs(20);
    let mut lab = Lab::start(LabOptions {
        cert_lifetime: LIFETIME,
        ..LabOptions::new(manifests(), PathBuf::from(env!("CARGO_BIN_EXE_zmesh")))
    })
    .await
    .expect("the lab starts");
    let (web, _server) = serve_echo(&lab, "shop", "web", 8080);
    let first = secret("before");
    assert_eq!(
        lab.pod_client("shop", "frontend", web, &first)
            .unwrap()
            .output,
        first
    );

    lab.stop_ca();
    // Every certificate of node2 (frontend's) runs out while the CA is away.
    let deadline = Instant::now() + 3 * LIFETIME;
    loop {
        let held = certs(&lab, "node2").await;
        let frontend = held
            .iter()
            .find(|c| c.workload.ends_with("/ns/shop/sa/frontend"))
            .unwrap_or_else(|| panic!("node2 keeps no certificate for frontend: {held:?}"));
        if frontend.not_after.is_some_and(|t| t < now_epoch()) {
            let error = frontend.last_error.as_deref().unwrap_or_default();
            assert!(
                frontend.consecutive_failures > 0 && !error.is_empty(),
                "expired without a failed renewal on record: {frontend:?}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "frontend's certificate still valid {:?} after the CA stopped: {frontend:?}",
            3 * LIFETIME
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Without a valid certificate nothing is sent, in plaintext or otherwise.
    let capture = lab.cluster().start_capture().unwrap();
    let refused = secret("expired");
    let run = lab.pod_client("shop", "frontend", web, &refused).unwrap();
    let pcap = capture.stop().unwrap();
    assert!(
        run.output.is_empty(),
        "served with an expired certificate: {:?}",
        String::from_utf8_lossy(&run.output)
    );
    assert!(!pcap.contains(&refused), "plaintext on the wire");
    let log = lab.agent_log("node2");
    assert!(
        log.lines().any(|l| l.contains(
            "no valid certificate for spiffe://cluster.local/ns/shop/sa/frontend: expired at"
        ) && l.contains("the CA is unavailable")),
        "node2's log does not say why the connection failed:\n{}",
        log.lines().rev().take(20).collect::<Vec<_>>().join("\n")
    );

    // The CA comes back: certificates are issued again, traffic flows without a restart.
    lab.resume_ca().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let again = secret("recovered");
        let run = lab.pod_client("shop", "frontend", web, &again).unwrap();
        if run.output == again {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no recovery 240 s after the CA returned; node2's certificates: {:?}",
            certs(&lab, "node2").await
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
