//! The node agent end to end, driven only through the manifest directory: namespace labels,
//! new pods and bad manifests. Real CA, real agents, eBPF redirection, captures. Needs root.

mod support;

use std::time::{Duration, Instant};

use support::{certs, lab, lab_from, manifests, secret, serve_echo, wait_for_cert};
use zmesh_agent::admin::CertInfo;
use zmesh_lab::{access_lines, ReservedPod};

fn zmesh(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_zmesh"))
        .args(args)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn namespace_labels_in_the_manifest_directory_drive_enrollment() {
    let lab = lab(&[]).await;
    let (web, _server) = serve_echo(&lab, "shop", "web", 8080);
    let dir = lab.manifests_dir();
    let td = lab.trust_domain().to_string();

    // Label the legacy namespace: its pod's traffic becomes mTLS.
    let out = zmesh(&["enroll", "legacy", "--manifests", dir.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let batch_id = format!("spiffe://{td}/ns/legacy/sa/batch");
    wait_for_cert(&lab, "node2", &batch_id, true).await;
    let capture = lab.cluster().start_capture().unwrap();
    let payload = secret("enrolled-legacy");
    let run = lab.pod_client("legacy", "batch", web, &payload).unwrap();
    assert_eq!(run.output, payload, "{}", run.stderr);
    let pcap = capture.stop().unwrap();
    assert!(
        !pcap.contains(&payload),
        "legacy/batch is enrolled: no plaintext on the wire"
    );
    assert!(pcap.tcp_ports().contains_key(&15008));
    assert!(
        access_lines(&lab.agent_log("node1"))
            .iter()
            .any(|l| l.direction == "inbound" && l.src_identity == batch_id),
        "node1 saw legacy/batch's verified identity"
    );

    // Remove the shop label: shop's pods talk plain TCP again.
    let out = zmesh(&["unenroll", "shop", "--manifests", dir.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for_cert(
        &lab,
        "node1",
        &format!("spiffe://{td}/ns/shop/sa/web"),
        false,
    )
    .await;
    wait_for_cert(
        &lab,
        "node2",
        &format!("spiffe://{td}/ns/shop/sa/frontend"),
        false,
    )
    .await;
    let capture = lab.cluster().start_capture().unwrap();
    let payload = secret("unenrolled-shop");
    let run = lab.pod_client("shop", "frontend", web, &payload).unwrap();
    assert_eq!(run.output, payload, "{}", run.stderr);
    let pcap = capture.stop().unwrap();
    assert!(
        pcap.contains(&payload),
        "shop is no longer enrolled: plain TCP"
    );

    // Unknown namespaces are refused with a clear message and change nothing.
    let out = zmesh(&["enroll", "nope", "--manifests", dir.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("namespace \"nope\" is not defined"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_pod_in_an_enrolled_namespace_is_enrolled() {
    let mut lab = lab_from(
        manifests(),
        &[],
        vec![ReservedPod {
            node: "node2".into(),
            namespace: "shop".into(),
            name: "checkout".into(),
            service_account: "checkout".into(),
        }],
    )
    .await;
    let (web, _server) = serve_echo(&lab, "shop", "web", 8080);
    let id = format!("spiffe://{}/ns/shop/sa/checkout", lab.trust_domain());
    assert!(!certs(&lab, "node2").await.iter().any(|c| c.workload == id));

    lab.edit_manifest("checkout.yaml", |text| {
        *text = "apiVersion: v1\nkind: Pod\nmetadata: {name: checkout, namespace: shop}\nspec:\n  nodeName: node2\n  serviceAccountName: checkout\n  containers: [{name: c, image: c}]\n".into();
    })
    .unwrap();
    wait_for_cert(&lab, "node2", &id, true).await;
    let capture = lab.cluster().start_capture().unwrap();
    let payload = secret("new-pod");
    let run = lab.pod_client("shop", "checkout", web, &payload).unwrap();
    assert_eq!(run.output, payload, "{}", run.stderr);
    let pcap = capture.stop().unwrap();
    assert!(!pcap.contains(&payload));
    assert!(access_lines(&lab.agent_log("node1"))
        .iter()
        .any(|l| l.direction == "inbound" && l.src_identity == id));
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_manifests_are_reported_and_change_nothing() {
    let mut lab = lab(&[]).await;
    let (web, _server) = serve_echo(&lab, "shop", "web", 8080);
    let before = certs(&lab, "node1").await;
    assert!(!before.is_empty());

    // A new file with invalid YAML, one with an unknown kind, and a broken edit of the file
    // that defines the running pods.
    lab.edit_manifest("typo.yaml", |t| {
        *t = "apiVersion: v1\nkind: Pod\nmetadata: {name: [oops\n".into()
    })
    .unwrap();
    lab.edit_manifest("deploy.yaml", |t| {
        *t = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n".into()
    })
    .unwrap();
    lab.edit_manifest("pods.yaml", |t| {
        t.push_str(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {name: broken, namespace: shop}\nspec: 42\n",
        )
    })
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = lab.agent_log("node1");
        let reported = ["typo.yaml", "deploy.yaml", "pods.yaml"]
            .iter()
            .all(|f| log.lines().any(|l| l.contains("skipped") && l.contains(f)));
        if reported {
            assert!(log.contains("apps/v1/Deployment"), "the reason is given");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "bad manifests not reported:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Nothing else changed: the same certificates, traffic still mTLS.
    let after = certs(&lab, "node1").await;
    let serials = |c: &[CertInfo]| {
        c.iter()
            .map(|c| (c.workload.clone(), c.serial.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(serials(&before), serials(&after));
    let capture = lab.cluster().start_capture().unwrap();
    let payload = secret("still-mtls");
    assert_eq!(
        lab.pod_client("shop", "frontend", web, &payload)
            .unwrap()
            .output,
        payload
    );
    assert!(!capture.stop().unwrap().contains(&payload));
}

#[tokio::test(flavor = "multi_thread")]
async fn certs_status_and_rotate_through_the_cli() {
    let mut lab = lab(&[]).await;
    let socket = lab.admin_socket("node1");
    let socket = socket.to_str().unwrap();
    let td = lab.trust_domain().to_string();
    let web = format!("spiffe://{td}/ns/shop/sa/web");

    let out = zmesh(&[
        "certs",
        "status",
        "--admin-socket",
        socket,
        "--output",
        "json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let before: Vec<CertInfo> = serde_json::from_slice(&out.stdout).unwrap();
    let serial = |certs: &[CertInfo], id: &str| {
        certs
            .iter()
            .find(|c| c.workload == id)
            .and_then(|c| c.serial.clone())
    };
    let old_serial = serial(&before, &web).expect("web has a certificate");
    let human = zmesh(&["certs", "status", "--admin-socket", socket]);
    assert!(String::from_utf8_lossy(&human.stdout).contains(&web));

    // One workload: renewed now, with a new serial.
    let out = zmesh(&[
        "certs",
        "rotate",
        "--workload",
        "shop/web",
        "--admin-socket",
        socket,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("renewed {web}")));
    let after = certs(&lab, "node1").await;
    assert_ne!(serial(&after, &web), Some(old_serial));

    // Unknown workload: a clear error, nothing renewed.
    let out = zmesh(&[
        "certs",
        "rotate",
        "--workload",
        "shop/nope",
        "--admin-socket",
        socket,
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("holds no certificate for shop/nope"));

    // With the CA down, --all reports the CA's error per workload and keeps the old certs.
    let held = certs(&lab, "node1").await;
    lab.stop_ca();
    let out = zmesh(&["certs", "rotate", "--all", "--admin-socket", socket]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("FAILED"), "{text}");
    assert!(text.contains("0 of 2 renewed"), "{text}");
    let still = certs(&lab, "node1").await;
    let serials = |c: &[CertInfo]| c.iter().map(|c| c.serial.clone()).collect::<Vec<_>>();
    assert_eq!(
        serials(&held),
        serials(&still),
        "the old certificates stay in use"
    );
}

/// Waits until `node`'s agent logs that it found `pod`'s network namespace; returns that
/// line.
async fn wait_for_netns_found(lab: &zmesh_lab::Lab, node: &str, pod: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = lab.agent_log(node);
        if let Some(line) = log.lines().find(|l| {
            l.contains("found the pod's network namespace") && l.contains(&format!("pod={pod} "))
        }) {
            return line.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "{node}: no network namespace found for {pod}; its log:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A real node has no `zmesh.io/netns` annotations: the agent finds each pod's network
/// namespace through the pod's processes in kubelet-named cgroups (by its UID), and one
/// whose sandbox starts after its manifest appeared is found by retrying, with no other
/// change to wake the agent.
#[tokio::test(flavor = "multi_thread")]
async fn pods_without_netns_annotations_are_found_through_their_cgroups() {
    let mut options = support::options(
        manifests(),
        &[],
        vec![ReservedPod {
            node: "node2".into(),
            namespace: "shop".into(),
            name: "checkout".into(),
            service_account: "checkout".into(),
        }],
    );
    options.kubelet_cgroups = true;
    let mut lab = zmesh_lab::Lab::start(options)
        .await
        .expect("the lab starts");
    for entry in std::fs::read_dir(lab.manifests_dir()).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        assert!(
            !text.contains("zmesh.io/netns") && !text.contains("zmesh.io/cgroup"),
            "the lab writes no node-local facts:\n{text}"
        );
    }
    let frontend_uid = lab.pod_uid("shop", "frontend");
    assert!(
        std::fs::read_to_string(lab.manifests_dir().join("pods.yaml"))
            .unwrap()
            .contains(&frontend_uid),
        "pods carry their UID"
    );
    let found = wait_for_netns_found(&lab, "node2", "shop/frontend").await;
    assert!(found.contains("how=proc"), "{found}");

    // frontend's connections are captured on node2: mTLS on the wire.
    let (web, _server) = serve_echo(&lab, "shop", "web", 8080);
    let capture = lab.cluster().start_capture().unwrap();
    let payload = secret("found-through-cgroups");
    let run = lab.pod_client("shop", "frontend", web, &payload).unwrap();
    assert_eq!(run.output, payload, "{}", run.stderr);
    let pcap = capture.stop().unwrap();
    assert!(
        !pcap.contains(&payload),
        "frontend's netns is enrolled: no plaintext on the wire"
    );
    assert!(pcap.tcp_ports().contains_key(&15008));

    // The CNI plugin's view: shop enrolls pods, legacy does not.
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(lab.cni_state_path("node2")).unwrap()).unwrap();
    assert_eq!(state["enrolled_namespaces"], serde_json::json!(["shop"]));

    // A pod scheduled before its sandbox runs: pending, then found once the sandbox starts
    // (nothing in the manifests changes in between).
    let checkout_id = format!("spiffe://{}/ns/shop/sa/checkout", lab.trust_domain());
    lab.edit_manifest("checkout.yaml", |text| {
        *text = "apiVersion: v1\nkind: Pod\nmetadata: {name: checkout, namespace: shop}\nspec:\n  nodeName: node2\n  serviceAccountName: checkout\n  containers: [{name: c, image: c}]\n".into();
    })
    .unwrap();
    wait_for_cert(&lab, "node2", &checkout_id, true).await;
    assert!(
        !lab.agent_log("node2").contains("pod=shop/checkout path="),
        "no sandbox yet: nothing to find"
    );
    lab.start_sandbox("shop", "checkout").unwrap();
    let found = wait_for_netns_found(&lab, "node2", "shop/checkout").await;
    assert!(found.contains("how=proc"), "{found}");
    let capture = lab.cluster().start_capture().unwrap();
    let payload = secret("found-on-retry");
    let run = lab.pod_client("shop", "checkout", web, &payload).unwrap();
    assert_eq!(run.output, payload, "{}", run.stderr);
    assert!(!capture.stop().unwrap().contains(&payload));
}

/// Sends one CNI plugin request (zmesh_cni's protocol) to `node`'s agent.
async fn cni_request(
    lab: &zmesh_lab::Lab,
    node: &str,
    request: &zmesh_cni::protocol::Request,
) -> zmesh_cni::protocol::Reply {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let mut stream = tokio::net::UnixStream::connect(lab.cni_socket_path(node))
        .await
        .expect("the agent serves the CNI socket");
    stream
        .write_all(&zmesh_cni::protocol::encode(request))
        .await
        .expect("send the request");
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(30),
        tokio::io::BufReader::new(stream).read_line(&mut line),
    )
    .await
    .expect("an answer within 30 s")
    .expect("read the answer");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"))
}

/// What the CNI plugin does for a starting pod: the pod has no process yet (the sandbox
/// is not started), so only the plugin's ADD can say where its network namespace is; the
/// answer comes once it is enrolled, and its first connection is already mTLS.
#[tokio::test(flavor = "multi_thread")]
async fn a_cni_add_enrolls_a_pod_before_it_has_a_process() {
    use zmesh_cni::protocol::{Command, Outcome, Pod, Request};
    let mut options = support::options(
        manifests(),
        &[],
        vec![ReservedPod {
            node: "node2".into(),
            namespace: "shop".into(),
            name: "basket".into(),
            service_account: "basket".into(),
        }],
    );
    options.kubelet_cgroups = true;
    let mut lab = zmesh_lab::Lab::start(options)
        .await
        .expect("the lab starts");
    let basket_id = format!("spiffe://{}/ns/shop/sa/basket", lab.trust_domain());
    let uid = lab.pod_uid("shop", "basket");
    lab.edit_manifest("basket.yaml", |text| {
        *text = format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: basket, namespace: shop, uid: {uid}}}\nspec:\n  nodeName: node2\n  serviceAccountName: basket\n  containers: [{{name: c, image: c}}]\n");
    })
    .unwrap();
    wait_for_cert(&lab, "node2", &basket_id, true).await;
    let netns = lab
        .cluster()
        .pod("shop", "basket")
        .expect("the reserved pod")
        .netns()
        .path()
        .display()
        .to_string();
    let add = Request {
        command: Command::Add,
        container_id: "sandbox-1".into(),
        netns: netns.clone(),
        ifname: "eth0".into(),
        pod: Pod {
            namespace: "shop".into(),
            name: "basket".into(),
            uid: uid.clone(),
        },
        ips: vec![],
    };
    let reply = cni_request(&lab, "node2", &add).await;
    assert_eq!(reply.outcome, Outcome::Enrolled, "{}", reply.message);
    let found = wait_for_netns_found(&lab, "node2", "shop/basket").await;
    assert!(found.contains("how=registry"), "{found}");

    let (web, _server) = serve_echo(&lab, "shop", "web", 8080);
    let capture = lab.cluster().start_capture().unwrap();
    let payload = secret("enrolled-by-cni-add");
    let run = lab.pod_client("shop", "basket", web, &payload).unwrap();
    assert_eq!(run.output, payload, "{}", run.stderr);
    let pcap = capture.stop().unwrap();
    assert!(!pcap.contains(&payload), "basket is enrolled: no plaintext");
    assert!(pcap.tcp_ports().contains_key(&15008));

    // A pod of a namespace that is not enrolled is answered at once.
    let mut other = add.clone();
    other.pod.namespace = "legacy".into();
    other.pod.name = "old".into();
    let reply = cni_request(&lab, "node2", &other).await;
    assert_eq!(reply.outcome, Outcome::NotEnrolled, "{}", reply.message);
    // CHECK agrees; DEL is acknowledged.
    let mut check = add.clone();
    check.command = Command::Check;
    assert_eq!(
        cni_request(&lab, "node2", &check).await.outcome,
        Outcome::Enrolled
    );
    let mut del = add;
    del.command = Command::Del;
    assert_eq!(
        cni_request(&lab, "node2", &del).await.outcome,
        Outcome::NotEnrolled
    );
}
