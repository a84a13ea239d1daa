//! End to end on a netns cluster (2 nodes, pods in an enrolled and a non-enrolled
//! namespace, the real CA and agents with eBPF redirection): enrolled pods' TCP goes through
//! the node proxies with mTLS; everything else is untouched. Needs root.

mod support;

use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

use support::{addr, lab, lab_with_env, secret, serve_echo, wait_for_cert, LongLivedClient};
use zmesh_lab::access_lines;

#[tokio::test(flavor = "multi_thread")]
async fn enrolled_traffic_is_mtls_and_the_rest_is_untouched() {
    let lab = lab(&[]).await;
    let web = addr(&lab, "shop", "web", 8080);
    let batch = addr(&lab, "legacy", "batch", 9090);
    let _web_server = lab
        .cluster()
        .pod("shop", "web")
        .unwrap()
        .serve_echo(8080)
        .unwrap();
    let _batch_server = lab
        .cluster()
        .pod("legacy", "batch")
        .unwrap()
        .serve_echo(9090)
        .unwrap();
    let capture = lab.cluster().start_capture().unwrap();

    // Cross-node, both enrolled: data intact.
    let cross = secret("cross");
    let run = lab.pod_client("shop", "frontend", web, &cross).unwrap();
    assert!(run.success, "nc failed: {}", run.stderr);
    assert_eq!(run.output, cross);
    // Same node, both enrolled.
    let same = secret("same");
    let run = lab.pod_client("shop", "cart", web, &same).unwrap();
    assert_eq!(run.output, same, "{}", run.stderr);
    // Non-enrolled -> enrolled, permissive: works, in plaintext.
    let plain = secret("plain");
    let run = lab.pod_client("legacy", "batch", web, &plain).unwrap();
    assert_eq!(run.output, plain, "{}", run.stderr);
    // Enrolled -> non-enrolled: passthrough.
    let out = secret("out");
    let run = lab.pod_client("shop", "frontend", batch, &out).unwrap();
    assert_eq!(run.output, out, "{}", run.stderr);
    let pcap = capture.stop().unwrap();

    // On the underlay the mesh connection is TLS to 15008 only, never the payload.
    assert!(!pcap.contains(&cross), "cross-node payload seen in clear");
    let streams = pcap.tcp_streams();
    let to_web: Vec<_> = streams
        .iter()
        .filter(|(flow, _)| flow.0 == lab.cluster().pod("shop", "frontend").unwrap().ip())
        .collect();
    assert!(
        to_web.iter().all(|(flow, _)| flow.3 != 8080),
        "the enrolled client reached port 8080 directly: {to_web:?}"
    );
    let hbone: Vec<_> = streams
        .iter()
        .filter(|(f, d)| f.3 == 15008 && !d.is_empty())
        .collect();
    assert!(!hbone.is_empty(), "no HBONE traffic captured");
    for (flow, data) in &hbone {
        assert_eq!(
            &data[..2],
            &[0x16, 0x03],
            "{flow:?} does not start with a TLS record"
        );
    }
    // The plaintext case (node2 -> node1) is visible, proving the capture sees payloads.
    // (frontend -> batch stays on node2 and never reaches the underlay.)
    assert!(pcap.contains(&plain));

    // The proxies' access logs name both verified identities.
    let td = lab.trust_domain().to_string();
    let id = |sa: &str| format!("spiffe://{td}/ns/shop/sa/{sa}");
    let node1 = access_lines(&lab.agent_log("node1"));
    let inbound = |src: &str| {
        node1.iter().any(|l| {
            l.direction == "inbound"
                && l.src_identity == id(src)
                && l.dst_identity == id("web")
                && l.result == "ok"
        })
    };
    assert!(inbound("frontend"), "{node1:#?}");
    assert!(
        inbound("cart"),
        "same-node traffic must pass the inbound proxy: {node1:#?}"
    );
    assert!(
        node1.iter().any(|l| l.direction == "inbound_plaintext"
            && l.src_identity == "-"
            && l.dst_workload == "shop/web"),
        "plaintext from legacy/batch is logged as such: {node1:#?}"
    );
    let node2 = access_lines(&lab.agent_log("node2"));
    assert!(
        node2.iter().any(|l| l.direction == "outbound"
            && l.result == "passthrough"
            && l.dst_addr == batch.to_string()),
        "{node2:#?}"
    );

    // After the lab, nothing it attached or created is left.
    let pins = [lab.pin_dir("node1"), lab.pin_dir("node2")];
    let run_id = lab.cluster().run_id().to_owned();
    drop(lab);
    for pin in &pins {
        assert!(!pin.exists(), "{} left behind", pin.display());
    }
    let netns = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&netns.stdout).contains(&run_id),
        "namespaces left behind"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn udp_between_enrolled_pods_is_untouched() {
    let lab = lab(&[]).await;
    let web_pod = lab.cluster().pod("shop", "web").unwrap();
    let socket = web_pod.udp_socket(5353).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let payload = secret("udp");
    let mut nc = lab
        .cluster()
        .pod("shop", "frontend")
        .unwrap()
        .command("nc")
        .unwrap();
    nc.args(["-u", "-w", "1", &web_pod.ip().to_string(), "5353"])
        .stdin(Stdio::piped());
    let mut child = nc.spawn().unwrap();
    child.stdin.take().unwrap().write_all(&payload).unwrap();
    let mut buf = [0u8; 256];
    let (n, from) = socket
        .recv_from(&mut buf)
        .expect("the datagram arrives directly");
    let _ = child.wait();
    assert_eq!(&buf[..n], &payload[..]);
    assert_eq!(
        from.ip(),
        std::net::IpAddr::from(lab.cluster().pod("shop", "frontend").unwrap().ip()),
        "UDP must come straight from the client pod, not via a proxy"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn strict_mode_refuses_plaintext_fast_and_reports_the_drop() {
    let lab = lab(&["node1"]).await;
    let (web, _server) = serve_echo(&lab, "shop", "web", 8080);

    let refused = lab.pod_client("legacy", "batch", web, b"hello").unwrap();
    assert!(
        !refused.success,
        "plaintext to an enrolled pod must be refused in strict mode"
    );
    assert!(
        refused.elapsed < Duration::from_secs(1),
        "the client must fail fast, took {:?}",
        refused.elapsed
    );
    // The mesh still works.
    let ok = secret("strict-mesh");
    assert_eq!(
        lab.pod_client("shop", "frontend", web, &ok).unwrap().output,
        ok
    );
    // The drop was counted with its reason by the eBPF side.
    let pins = lab.pin_dir("node1");
    let counts = lab
        .cluster()
        .node("node1")
        .unwrap()
        .run(move || zmesh_redirect::Redirector::open_pinned(&pins).and_then(|r| r.drop_counts()))
        .unwrap()
        .unwrap();
    assert!(counts.strict_plaintext >= 1, "{counts:?}");
}

/// During an upgrade the old agent drains (here: for as long as a connection stays open)
/// while the new one runs; the new one must get every eBPF drop report, not the old.
#[tokio::test(flavor = "multi_thread")]
async fn drops_during_an_upgrade_are_reported_by_the_new_agent() {
    let mut lab = lab(&[]).await;
    let (web, _server) = serve_echo(&lab, "shop", "web", 8080);
    // Keeps the old agent of node1 draining (alive) through the whole test.
    let mut lingering = LongLivedClient::open(&lab, "shop", "frontend", web);
    lingering.roundtrip("keeps the old agent draining");
    lab.restart_agent("node1", true).await.unwrap();
    const ATTEMPTS: usize = 10;
    for i in 0..ATTEMPTS {
        let refused = lab
            .pod_client("legacy", "batch", web, format!("strict-{i}").as_bytes())
            .unwrap();
        assert!(!refused.success, "attempt {i} was not refused");
    }
    let batch = lab.cluster().pod("legacy", "batch").unwrap().ip();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let reported = support::observe(&lab, "node1", &["--verdict", "dropped"])
            .iter()
            .filter(|f| {
                f.destination.addr == web && f.source.addr.ip() == std::net::IpAddr::from(batch)
            })
            .count();
        if reported >= ATTEMPTS {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the new agent reported {reported} of {ATTEMPTS} drops"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    lingering.roundtrip("the old agent still carries its connection");
}

#[tokio::test(flavor = "multi_thread")]
async fn unenroll_and_reenroll_at_run_time() {
    let mut lab = lab(&[]).await;
    let (web, _server) = serve_echo(&lab, "shop", "web", 8080);

    let web_id = format!("spiffe://{}/ns/shop/sa/web", lab.trust_domain());
    // Opt shop/web out of the mesh with Istio's pod label.
    lab.edit_manifest("pods.yaml", |text| {
        *text = text.replacen(
            "labels: {app: web}",
            "labels: {app: web, istio.io/dataplane-mode: none}",
            1,
        );
    })
    .unwrap();
    wait_for_cert(&lab, "node1", &web_id, false).await;
    // node2's agent learns of the change on its own (within about a second): until then
    // a new connection may still take the old way.
    eventually(
        &lab,
        "un-enrolled: A -> B goes direct, in plaintext",
        |lab| {
            let capture = lab.cluster().start_capture().unwrap();
            let direct = secret("direct");
            let run = lab.pod_client("shop", "frontend", web, &direct).unwrap();
            let pcap = capture.stop().unwrap();
            run.output == direct && pcap.contains(&direct)
        },
    );

    // Enroll again: back through the mesh.
    lab.edit_manifest("pods.yaml", |text| {
        *text = text.replacen(", istio.io/dataplane-mode: none}", "}", 1);
    })
    .unwrap();
    wait_for_cert(&lab, "node1", &web_id, true).await;
    eventually(&lab, "enrolled again: encrypted, over 15008", |lab| {
        let capture = lab.cluster().start_capture().unwrap();
        let meshed = secret("meshed");
        let run = lab.pod_client("shop", "frontend", web, &meshed).unwrap();
        let pcap = capture.stop().unwrap();
        run.output == meshed && !pcap.contains(&meshed) && pcap.tcp_ports().contains_key(&15008)
    });
}

/// Retries a fresh exchange until `attempt` holds, for at most 10 s.
fn eventually(lab: &zmesh_lab::Lab, what: &str, attempt: impl Fn(&zmesh_lab::Lab) -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !attempt(lab) {
        assert!(std::time::Instant::now() < deadline, "never: {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_restart_keeps_established_connections() {
    let mut lab = lab(&[]).await;
    let (web, _server) = serve_echo(&lab, "shop", "web", 8080);
    let mut client = LongLivedClient::open(&lab, "shop", "frontend", web);
    client.roundtrip("before the restart");
    let sockets = listening_sockets(&lab, "node1");
    assert_eq!(sockets.len(), 5, "the proxy's five listeners: {sockets:?}");
    lab.restart_agent("node1", false).await.unwrap();
    lab.restart_agent("node2", false).await.unwrap();
    client.roundtrip("after both agents restarted");
    // the new agent serves on its predecessor's sockets (handed over, never unbound)
    assert_eq!(listening_sockets(&lab, "node1"), sockets);
    // New connections work too, through the new agents.
    let fresh = secret("fresh");
    assert_eq!(
        lab.pod_client("shop", "frontend", web, &fresh)
            .unwrap()
            .output,
        fresh
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn uninstall_removes_redirection_and_traffic_goes_direct() {
    let mut lab = lab(&[]).await;
    let (web, _server) = serve_echo(&lab, "shop", "web", 8080);
    lab.stop_agent("node2").unwrap();
    let pins = lab.pin_dir("node2");
    assert!(pins.exists(), "pins outlive the agent");
    let mut uninstall = lab
        .cluster()
        .node("node2")
        .unwrap()
        .command(env!("CARGO_BIN_EXE_zmesh"))
        .unwrap();
    let out = uninstall
        .args(["uninstall", "--bpf-pin-dir"])
        .arg(&pins)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!pins.exists());
    let rules = lab
        .cluster()
        .node("node2")
        .unwrap()
        .command("ip")
        .unwrap()
        .args(["rule", "show"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&rules.stdout).contains("fwmark"),
        "policy rule left"
    );
    // No redirection any more: the client reaches the server directly, in plaintext.
    let capture = lab.cluster().start_capture().unwrap();
    let payload = secret("after-uninstall");
    assert_eq!(
        lab.pod_client("shop", "frontend", web, &payload)
            .unwrap()
            .output,
        payload
    );
    assert!(capture.stop().unwrap().contains(&payload));
}

/// The agents forced to attach tc ingress as clsact filters (what kernels before 6.6 get):
/// mTLS across nodes and strict mode work, an open connection survives both agents'
/// restarts (the filters stay, their programs are swapped in place), and uninstall takes
/// every filter away.
#[tokio::test(flavor = "multi_thread")]
async fn clsact_filters_carry_the_mesh_through_restarts_and_uninstall() {
    let mut lab = lab_with_env(&["node1"], &[("ZMESH_TC_ATTACH", "netlink")]).await;
    let (web, _server) = serve_echo(&lab, "shop", "web", 8080);
    for node in ["node1", "node2"] {
        let attachments = zmesh_redirect::Redirector::ingress_attachments(&lab.pin_dir(node))
            .expect("pins readable");
        assert!(!attachments.is_empty(), "{node}: no tc attachment");
        assert!(
            attachments
                .iter()
                .all(|a| a.mode == zmesh_redirect::TcAttach::Netlink),
            "{node}: {attachments:?}"
        );
        assert_eq!(
            bpf_filters(&lab, node).len(),
            attachments.len(),
            "{node}: one zmesh filter per attached interface"
        );
    }
    let capture = lab.cluster().start_capture().unwrap();
    let cross = secret("clsact-cross");
    assert_eq!(
        lab.pod_client("shop", "frontend", web, &cross)
            .unwrap()
            .output,
        cross
    );
    let pcap = capture.stop().unwrap();
    assert!(!pcap.contains(&cross), "cross-node payload seen in clear");
    assert!(pcap.tcp_ports().contains_key(&15008));
    let refused = lab.pod_client("legacy", "batch", web, b"hello").unwrap();
    assert!(!refused.success, "strict node1 refuses plaintext");

    let mut client = LongLivedClient::open(&lab, "shop", "frontend", web);
    client.roundtrip("before the restarts");
    let filters_before = bpf_filters(&lab, "node1");
    lab.restart_agent("node1", true).await.unwrap();
    lab.restart_agent("node2", false).await.unwrap();
    client.roundtrip("after both agents restarted");
    let filters_after = bpf_filters(&lab, "node1");
    assert_eq!(
        filters_before.len(),
        filters_after.len(),
        "{filters_before:?} -> {filters_after:?}"
    );
    assert_ne!(filters_before, filters_after, "the programs were swapped");
    drop(client);

    lab.stop_agent("node2").unwrap();
    let pins = lab.pin_dir("node2");
    let out = lab
        .cluster()
        .node("node2")
        .unwrap()
        .command(env!("CARGO_BIN_EXE_zmesh"))
        .unwrap()
        .args(["uninstall", "--bpf-pin-dir"])
        .arg(&pins)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!pins.exists());
    assert!(
        bpf_filters(&lab, "node2").is_empty(),
        "filters left on node2"
    );
}

/// zmesh's tc filters on every interface of `node` (`tc filter show`, one line each, with
/// the program's id).
fn bpf_filters(lab: &zmesh_lab::Lab, node: &str) -> Vec<String> {
    let node = lab.cluster().node(node).unwrap();
    let links = node
        .command("ip")
        .unwrap()
        .args(["-o", "link", "show"])
        .output()
        .unwrap();
    let mut filters = Vec::new();
    for line in String::from_utf8_lossy(&links.stdout).lines() {
        let Some(name) = line.split(": ").nth(1) else {
            continue;
        };
        let name = name.split('@').next().unwrap_or(name);
        let out = node
            .command("tc")
            .unwrap()
            .args(["filter", "show", "dev", name, "ingress"])
            .output()
            .unwrap();
        filters.extend(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| l.contains("zm_tc_ingress"))
                .map(|l| format!("{name}: {l}")),
        );
    }
    filters
}

/// The listening sockets of the proxy on `node`: (local address, socket inode), sorted.
fn listening_sockets(lab: &zmesh_lab::Lab, node: &str) -> Vec<(String, String)> {
    let out = lab
        .cluster()
        .node(node)
        .unwrap()
        .command("ss")
        .unwrap()
        .args(["-Hltne"])
        .output()
        .unwrap();
    let mut sockets: Vec<(String, String)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            let local = fields.get(3)?.to_string();
            let inode = fields
                .iter()
                .find_map(|f| f.strip_prefix("ino:"))?
                .to_string();
            let port = local.rsplit(':').next()?;
            ["15001", "15006", "15008", "15020", "15021"]
                .contains(&port)
                .then_some((local, inode))
        })
        .collect();
    sockets.sort();
    sockets
}
