//! The operator's commands against real agents on the netns lab: `zmesh config` (what an
//! agent holds: workloads, services, policies with the invalid ones, open connections,
//! certificates), `zmesh observe` (a flow when a connection opens and when it closes, by
//! direction, with source/destination filters and `--last`), `zmesh log` (the log level
//! changed at run time) and `zmesh version` (the agent's own). Needs root.

mod support;

use std::io::{Read, Write};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{lab, secret, serve_echo};
use zmesh_lab::Lab;

fn zmesh(args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_zmesh"))
        .args(args)
        .output()
        .unwrap()
}

/// `zmesh <args> --admin-socket <node's>`, which must succeed; its stdout.
fn run(lab: &Lab, node: &str, args: &[&str]) -> String {
    let socket = lab.admin_socket(node);
    let mut all = args.to_vec();
    all.extend(["--admin-socket", socket.to_str().unwrap()]);
    let out = zmesh(&all);
    assert!(
        out.status.success(),
        "zmesh {all:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn json(lab: &Lab, node: &str, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    let text = run(lab, node, &all);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{all:?}: {e}: {text}"))
}

/// Polls `check` on fresh output until it holds (the agent applies manifests a moment
/// after they are written).
fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !check() {
        assert!(Instant::now() < deadline, "never: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A long-lived client connection from a pod: `nc` with its stdin kept open.
struct OpenClient(Child);

impl OpenClient {
    fn start(lab: &Lab, ns: &str, pod: &str, to: std::net::SocketAddr, hello: &[u8]) -> Self {
        let mut child = lab
            .cluster()
            .pod(ns, pod)
            .unwrap()
            .command("nc")
            .unwrap()
            .arg(to.ip().to_string())
            .arg(to.port().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.as_mut().unwrap().write_all(hello).unwrap();
        // The echo proves the connection is established end to end.
        let mut echo = vec![0; hello.len()];
        child
            .stdout
            .as_mut()
            .unwrap()
            .read_exact(&mut echo)
            .unwrap();
        assert_eq!(echo, hello);
        Self(child)
    }
}

impl Drop for OpenClient {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const VALID_POLICY: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-shop, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules:
  - from:
    - source: {namespaces: [shop]}
"#;

const INVALID_POLICY: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: http-only, namespace: shop}
spec:
  action: ALLOW
  rules:
  - to:
    - operation: {methods: [GET]}
"#;

#[tokio::test(flavor = "multi_thread")]
async fn config_shows_what_the_agent_holds() {
    let mut lab = lab(&[]).await;
    let (web, _server) = serve_echo(&lab, "shop", "web", 8080);
    lab.edit_manifest("policy-ok.yaml", |t| *t = VALID_POLICY.into())
        .unwrap();
    lab.edit_manifest("policy-bad.yaml", |t| *t = INVALID_POLICY.into())
        .unwrap();

    // Workloads: every pod of the cluster, enrolled ones as HBONE with their identity.
    let workloads = json(&lab, "node1", &["config", "workloads"]);
    let find = |ns: &str, name: &str| {
        workloads
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["namespace"] == ns && w["name"] == name)
            .unwrap_or_else(|| panic!("{ns}/{name} missing: {workloads:#}"))
            .clone()
    };
    let w = find("shop", "web");
    assert_eq!(w["protocol"], "hbone");
    assert_eq!(w["node"], "node1");
    assert_eq!(w["identity"], "spiffe://cluster.local/ns/shop/sa/web");
    assert_eq!(w["ips"][0], web.ip().to_string());
    assert_eq!(find("legacy", "batch")["protocol"], "tcp");
    let only_legacy = json(&lab, "node1", &["config", "workloads", "-n", "legacy"]);
    assert_eq!(only_legacy.as_array().unwrap().len(), 1, "{only_legacy:#}");
    let table = run(&lab, "node1", &["config", "workloads"]);
    assert!(table.starts_with("NAMESPACE  NAME"), "{table}");
    assert!(
        table.contains("spiffe://cluster.local/ns/shop/sa/web"),
        "{table}"
    );

    // Services: shop/web with an endpoint on each node.
    let services = json(&lab, "node1", &["config", "services", "-n", "shop"]);
    let web_svc = &services[0];
    assert_eq!(web_svc["name"], "web", "{services:#}");
    let mut pods: Vec<String> = web_svc["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["pod"].as_str().unwrap().to_owned())
        .collect();
    pods.sort();
    assert_eq!(pods, ["shop/web", "shop/web-2"]);
    assert_eq!(web_svc["ports"][0]["port"], 80);
    assert_eq!(web_svc["ports"][0]["target_port"], "http");

    // Policies: the valid one in force, the invalid one listed with its reason.
    eventually("both policy files are read", || {
        let p = json(&lab, "node1", &["config", "policies"]);
        p["policies"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "allow-shop")
            && !p["invalid"].as_array().unwrap().is_empty()
    });
    let policies = json(&lab, "node1", &["config", "policies", "-n", "shop"]);
    let valid = &policies["policies"][0];
    assert_eq!(valid["action"], "ALLOW");
    assert_eq!(valid["selector"]["app"], "web");
    let invalid = &policies["invalid"][0];
    assert!(
        invalid["policy"]
            .as_str()
            .unwrap()
            .contains("policy-bad.yaml"),
        "{policies:#}"
    );
    assert!(
        invalid["reason"]
            .as_str()
            .unwrap()
            .contains("operation.methods"),
        "{policies:#}"
    );
    let wide = run(&lab, "node1", &["config", "policies", "-o", "wide"]);
    assert!(wide.contains("INVALID (1)"), "{wide}");
    assert!(wide.contains("operation.methods"), "{wide}");

    // Connections: one open from frontend (node2) to web (node1), seen inbound on node1
    // with both identities and its bytes so far; gone when it closes.
    let hello = secret("config");
    let client = OpenClient::start(&lab, "shop", "frontend", web, &hello);
    let conns = json(&lab, "node1", &["config", "connections"]);
    let conns = conns.as_array().unwrap();
    assert_eq!(conns.len(), 1, "{conns:#?}");
    let c = &conns[0];
    assert_eq!(c["direction"], "inbound");
    assert_eq!(c["encrypted"], true);
    assert_eq!(
        c["source"]["identity"],
        "spiffe://cluster.local/ns/shop/sa/frontend"
    );
    assert_eq!(
        c["destination"]["identity"],
        "spiffe://cluster.local/ns/shop/sa/web"
    );
    assert_eq!(c["destination"]["addr"], web.to_string());
    assert_eq!(c["bytes_sent"], hello.len());
    let outbound = json(&lab, "node2", &["config", "connections", "-n", "shop"]);
    assert_eq!(outbound[0]["direction"], "outbound", "{outbound:#}");
    assert!(
        json(&lab, "node1", &["config", "connections", "-n", "legacy"])
            .as_array()
            .unwrap()
            .is_empty()
    );
    let table = run(&lab, "node1", &["config", "connections", "-o", "wide"]);
    assert!(table.contains("shop/frontend"), "{table}");
    assert!(table.contains("cluster.local/ns/shop/sa/web"), "{table}");
    drop(client);
    eventually("the connection is gone", || {
        json(&lab, "node1", &["config", "connections"])
            .as_array()
            .unwrap()
            .is_empty()
    });

    // Certificates: node1 holds its own pods' identities.
    let certs = json(&lab, "node1", &["config", "certificates", "-n", "shop"]);
    let ids: Vec<&str> = certs
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["workload"].as_str().unwrap())
        .collect();
    assert!(
        ids.contains(&"spiffe://cluster.local/ns/shop/sa/web"),
        "{ids:?}"
    );
    assert!(
        !ids.iter().any(|id| id.contains("/sa/frontend")),
        "node2's pod: {ids:?}"
    );
    let table = run(&lab, "node1", &["config", "certificates"]);
    assert!(table.contains("valid ("), "{table}");
}

#[tokio::test(flavor = "multi_thread")]
async fn observe_shows_opens_and_closes_with_end_filters() {
    let lab = lab(&[]).await;
    let (web, _server) = serve_echo(&lab, "shop", "web", 8080);
    let hello = secret("observe");
    let client = OpenClient::start(&lab, "shop", "frontend", web, &hello);
    let flows = |node: &str, extra: &[&str]| -> Vec<Value> {
        let mut args = vec!["observe", "--since", "5m", "-o", "json"];
        args.extend_from_slice(extra);
        run(&lab, node, &args)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    // While it is open: an open event on each side, labelled by direction, no close yet.
    let opens = flows("node1", &["--phase", "open", "--from-pod", "shop/frontend"]);
    assert_eq!(opens.len(), 1, "{opens:#?}");
    assert_eq!(opens[0]["direction"], "inbound");
    assert_eq!(opens[0]["encrypted"], true);
    let out = flows("node2", &["--direction", "outbound", "--to-port", "8080"]);
    assert_eq!(out.len(), 1, "{out:#?}");
    assert_eq!(out[0]["phase"], "open");
    assert!(flows(
        "node1",
        &["--phase", "close", "--from-pod", "shop/frontend"]
    )
    .is_empty());
    // The other end's filters exclude it.
    assert!(flows("node1", &["--from-pod", "shop/web"]).is_empty());
    assert!(flows("node1", &["--to-namespace", "legacy"]).is_empty());

    drop(client);
    eventually("the close event", || {
        flows(
            "node1",
            &["--phase", "close", "--from-pod", "shop/frontend"],
        )
        .len()
            == 1
    });
    let both = flows(
        "node1",
        &["--from-identity", "cluster.local/ns/shop/sa/frontend"],
    );
    let phases: Vec<&str> = both.iter().map(|f| f["phase"].as_str().unwrap()).collect();
    assert_eq!(phases, ["open", "close"], "{both:#?}");
    assert_eq!(both[1]["bytes_sent"], hello.len());
    // --last keeps the newest.
    let last = flows("node1", &["--from-pod", "shop/frontend", "--last", "1"]);
    assert_eq!(last.len(), 1);
    assert_eq!(last[0]["phase"], "close");
    // --until before the connection: nothing.
    assert!(flows("node1", &["--from-pod", "shop/frontend", "--until", "10m"]).is_empty());

    // The table: a header, one row per event, directions labelled.
    let table = run(
        &lab,
        "node1",
        &["observe", "--since", "5m", "--from-pod", "shop/frontend"],
    );
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("TIME"), "{table}");
    assert_eq!(lines.len(), 3, "{table}");
    assert!(
        lines[1].contains(" in ") && lines[1].contains("OPEN"),
        "{table}"
    );
    assert!(lines[2].contains("CLOSED"), "{table}");
}

#[tokio::test(flavor = "multi_thread")]
async fn log_level_and_version_of_a_running_agent() {
    let lab = lab(&[]).await;
    assert_eq!(run(&lab, "node1", &["log"]).trim(), "info");
    // A level that tracing would misread is refused before it is sent...
    let socket = lab.admin_socket("node1");
    let out = zmesh(&[
        "log",
        "--level",
        "verbose",
        "--admin-socket",
        socket.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not a level"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // ... and by the agent itself.
    let refused = zmesh_agent::admin::AdminClient::new(&socket)
        .send_json::<Value>(http::Method::PUT, "/log?level=verbose")
        .await;
    assert!(refused.is_err(), "{refused:?}");
    assert_eq!(run(&lab, "node1", &["log"]).trim(), "info", "unchanged");

    // `warn` filters out the agent's own info line about the change; back at `info` the
    // next change is logged: the filter in force really changed.
    assert_eq!(
        run(&lab, "node1", &["log", "--level", "warn"]).trim(),
        "warn"
    );
    let changed = |log: &str, level: &str| {
        log.lines()
            .any(|l| l.contains("log level changed") && l.contains(&format!("level={level}")))
    };
    assert!(!changed(&lab.agent_log("node1"), "warn"));
    assert_eq!(
        run(&lab, "node1", &["log", "--level", "info,access=debug"]).trim(),
        "info,access=debug"
    );
    eventually("the change is logged", || {
        changed(&lab.agent_log("node1"), "info,access=debug")
    });

    // The agent's version, as `zmesh version` reads it.
    let v = json(&lab, "node1", &["version"]);
    assert_eq!(v["agent"]["state"], "reported", "{v:#}");
    assert_eq!(v["agent"]["version"], v["client"]["version"]);
    // The CA named its version to the agent when it issued the agent's certificates.
    assert_eq!(v["agent"]["ca_version"], v["client"]["version"], "{v:#}");
    let human = run(&lab, "node1", &["version"]);
    assert!(human.contains("ca:     zmesh "), "{human}");
}

#[tokio::test(flavor = "multi_thread")]
async fn status_shows_the_mesh_across_nodes() {
    let mut lab = lab(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("roots.pem");
    let pem = zmesh(&[
        "ca",
        "bundle",
        "--state-dir",
        lab.ca_state_dir().to_str().unwrap(),
    ]);
    assert!(
        pem.status.success(),
        "{}",
        String::from_utf8_lossy(&pem.stderr)
    );
    std::fs::write(&bundle, &pem.stdout).unwrap();
    let (n1, n2) = (lab.admin_socket("node1"), lab.admin_socket("node2"));
    let manifests = lab.manifests_dir();
    let status = |extra: &[&str]| {
        let mut args = vec![
            "status",
            "--admin-socket",
            n1.to_str().unwrap(),
            "--admin-socket",
            n2.to_str().unwrap(),
            "--manifests",
            manifests.to_str().unwrap(),
            "--ca-bundle",
            bundle.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        zmesh(&args)
    };
    // Every node's certificates are issued once the agents are up.
    let mut report = Value::Null;
    eventually("a healthy mesh", || {
        let out = status(&["-o", "json"]);
        report = serde_json::from_slice(&out.stdout).unwrap();
        out.status.success()
    });
    assert_eq!(report["healthy"], true);
    let agents = report["agents"].as_array().unwrap();
    let nodes: Vec<&str> = agents.iter().map(|a| a["node"].as_str().unwrap()).collect();
    assert_eq!(nodes, ["node1", "node2"]);
    for a in agents {
        assert_eq!(a["state"], "reporting");
        let s = &a["status"];
        assert_eq!(s["ready"], true);
        assert_eq!(s["data_plane"], "zmesh");
        assert_ne!(s["kernel"]["tc_attach"], "none", "{a:#}");
        assert!(s["enrolled_pods"].as_u64().unwrap() >= 2, "{a:#}");
        assert_eq!(s["certificates"]["valid"], s["certificates"]["total"]);
        assert_eq!(s["ca_version"], s["version"], "{a:#}");
    }
    assert_eq!(report["enrolled_namespaces"], serde_json::json!(["shop"]));
    assert_eq!(report["ca"]["roots"].as_array().unwrap().len(), 1);
    assert_eq!(report["ca"]["nodes_issued"], 2);
    let table = String::from_utf8(status(&[]).stdout).unwrap();
    assert!(table.starts_with("zmesh: healthy"), "{table}");
    assert!(table.contains("Enrolled namespaces (1): shop"), "{table}");
    assert!(table.contains("  version:      zmesh "), "{table}");
    assert!(table.contains("node2  reporting  yes"), "{table}");

    // A node whose agent is gone: unhealthy, exit 1, named with the reason.
    lab.kill_agent("node2").unwrap();
    let out = status(&["-o", "json"]);
    assert!(!out.status.success());
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["healthy"], false);
    let gone = report["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["state"] == "unreachable")
        .unwrap_or_else(|| panic!("{report:#}"));
    assert!(
        gone["reason"]
            .as_str()
            .unwrap()
            .contains("cannot reach the agent"),
        "{gone:#}"
    );
    let table = String::from_utf8(status(&[]).stdout).unwrap();
    assert!(table.starts_with("zmesh: NOT healthy"), "{table}");
    assert!(table.contains("Problems"), "{table}");
}
