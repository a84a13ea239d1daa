//! Interoperability with a stock Istio ztunnel, one CA for both: the lab's cluster with
//! node1 on zmesh's own data plane and node2 switched to a stock ztunnel (the agent with
//! `--data-plane ztunnel`, ztunnel in shared in-pod mode). ztunnel gets its workload
//! certificates from the zmesh CA (Istio's CA API, a static bearer token mapped to node2);
//! HBONE must then work both ways between a zmesh node and a ztunnel node, and each side must
//! verify the other's SPIFFE identity.
//!
//! Needs root and `ZTUNNEL_BIN` (a ztunnel built with its `testing` feature; never built or
//! downloaded by this project); skipped, saying so, without it. ztunnel's workload table
//! comes from `LOCAL_XDS_PATH` in place of istiod.

mod support;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{addr, manifests, options, secret, serve_echo};
use zmesh_lab::{access_lines, Lab};

const WAIT: Duration = Duration::from_secs(30);

fn ztunnel_bin() -> Option<PathBuf> {
    match std::env::var_os("ZTUNNEL_BIN") {
        Some(path) if !path.is_empty() => Some(PathBuf::from(path)),
        _ => {
            eprintln!(
                "skipped: set ZTUNNEL_BIN to a stock ztunnel binary to run the interop tests"
            );
            None
        }
    }
}

/// Kills its processes on drop (also when the test panics).
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn sha256_hex(text: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t");
    std::fs::write(&path, text).unwrap();
    let out = Command::new("sha256sum").arg(&path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

fn eventually_echo(
    lab: &Lab,
    from: (&str, &str),
    to: std::net::SocketAddr,
    logs: &dyn Fn() -> String,
) -> Vec<u8> {
    let deadline = Instant::now() + WAIT;
    loop {
        let payload = secret("interop");
        let run = lab.pod_client(from.0, from.1, to, &payload).unwrap();
        if run.output == payload {
            return payload;
        }
        assert!(
            Instant::now() < deadline,
            "{from:?} -> {to} never worked\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

#[tokio::test(flavor = "multi_thread")]
async fn zmesh_and_stock_ztunnel_nodes_carry_hbone_both_ways_with_the_zmesh_ca() {
    let Some(ztunnel) = ztunnel_bin() else { return };
    let work = tempfile::tempdir().unwrap();
    // ztunnel authenticates to the CA with a static bearer token, mapped to node2.
    let token = format!("{:032x}", rand::random::<u128>());
    let token_file = work.path().join("ztunnel-token");
    std::fs::write(&token_file, &token).unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let bearer = work.path().join("bearer-tokens");
    std::fs::write(&bearer, format!("node2 {}\n", sha256_hex(&token))).unwrap();
    let mut opts = options(manifests(), &[], vec![]);
    opts.ca_args = vec!["--bearer-tokens".into(), bearer.display().to_string()];
    let mut lab = Lab::start(opts).await.expect("the lab starts");
    let (web, _web) = serve_echo(&lab, "shop", "web", 8080);
    let web2 = addr(&lab, "shop", "web-2", 8080);
    let _web2 = lab
        .cluster()
        .pod("shop", "web-2")
        .unwrap()
        .serve_echo(8080)
        .unwrap();

    // node2 leaves zmesh's data plane: agent stopped, its eBPF taken out (the uninstall
    // scoped to no pod namespace: there are no in-pod captures yet).
    lab.stop_agent("node2").unwrap();
    let node2 = lab.cluster().node("node2").unwrap();
    let empty = tempfile::tempdir().unwrap();
    let zmesh = PathBuf::from(env!("CARGO_BIN_EXE_zmesh"));
    let out = node2
        .command(&zmesh)
        .unwrap()
        .arg("uninstall")
        .arg("--bpf-pin-dir")
        .arg(lab.pin_dir("node2"))
        .arg("--host-proc")
        .arg(empty.path())
        .arg("--netns-dir")
        .arg(empty.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // ... and gets the agent in ztunnel mode and a stock ztunnel.
    let mut procs = Procs(Vec::new());
    let zds = work.path().join("ztunnel.sock");
    let agent_log = work.path().join("agent-node2.log");
    let ztunnel_log = work.path().join("ztunnel-node2.log");
    let child = node2
        .command(&zmesh)
        .unwrap()
        .args(["agent", "--node", "node2", "--data-plane", "ztunnel"])
        .arg("--manifests")
        .arg(lab.manifests_dir())
        .arg("--zds-socket")
        .arg(&zds)
        .arg("--admin-socket")
        .arg(work.path().join("agent.sock"))
        .args(["--cni-socket", "none", "--cni-state-file", "none"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&agent_log).unwrap())
        .spawn()
        .unwrap();
    procs.0.push(child);
    let xds = work.path().join("xds.yaml");
    std::fs::write(&xds, zmesh_lab::ztunnel::local_xds(lab.cluster(), "shop")).unwrap();
    let roots = work.path().join("ca-roots.pem");
    let bundle = Command::new(&zmesh)
        .args(["ca", "bundle", "--state-dir"])
        .arg(lab.ca_state_dir())
        .output()
        .unwrap();
    assert!(
        bundle.status.success(),
        "{}",
        String::from_utf8_lossy(&bundle.stderr)
    );
    std::fs::write(&roots, &bundle.stdout).unwrap();
    let log = std::fs::File::create(&ztunnel_log).unwrap();
    let child = node2
        .command(&ztunnel)
        .unwrap()
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("INPOD_UDS", &zds)
        .env("LOCAL_XDS_PATH", &xds)
        .env("XDS_ADDRESS", "")
        .env("CA_ADDRESS", format!("https://{}", lab.ca_addr()))
        .env("CA_ROOT_CA", &roots)
        .env("AUTH_TOKEN", &token_file)
        .env("NODE_NAME", "node2")
        .env("RUST_LOG", "info")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    procs.0.push(child);
    let logs = || {
        format!(
            "--- node2 agent:\n{}\n--- ztunnel:\n{}\n--- node1 agent:\n{}",
            tail(&agent_log),
            tail(&ztunnel_log),
            lab.agent_log("node1")
                .lines()
                .rev()
                .take(20)
                .collect::<Vec<_>>()
                .join("\n")
        )
    };

    // Until the agent installed the captures (after ztunnel took the pods), node2's pods
    // talk plaintext: no eBPF there any more.
    let deadline = Instant::now() + WAIT;
    for name in ["frontend", "web-2"] {
        let netns = lab
            .cluster()
            .pod("shop", name)
            .unwrap()
            .netns()
            .path()
            .to_owned();
        while !zmesh_agent::inpod::is_installed(std::os::fd::AsFd::as_fd(
            &std::fs::File::open(&netns).unwrap(),
        ))
        .unwrap()
        {
            assert!(
                Instant::now() < deadline,
                "no capture in shop/{name}\n{}",
                logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    // ztunnel client -> zmesh server, and zmesh client -> ztunnel server.
    let capture = lab.cluster().start_capture().unwrap();
    let to_zmesh = eventually_echo(&lab, ("shop", "frontend"), web, &logs);
    let to_ztunnel = eventually_echo(&lab, ("shop", "cart"), web2, &logs);
    let pcap = capture.stop().unwrap();
    assert!(
        !pcap.contains(&to_zmesh) && !pcap.contains(&to_ztunnel),
        "payload in clear"
    );
    let hbone: Vec<_> = pcap
        .tcp_streams()
        .into_iter()
        .filter(|(f, d)| f.3 == 15008 && !d.is_empty())
        .collect();
    assert!(hbone.len() >= 2, "HBONE both ways: {hbone:?}\n{}", logs());
    assert!(hbone.iter().all(|(_, d)| d.starts_with(&[0x16, 0x03])));

    // Each side verified the other: zmesh logs ztunnel's client identity (inbound) and
    // ztunnel logs zmesh's (inbound on its side).
    let id = |sa: &str| format!("spiffe://cluster.local/ns/shop/sa/{sa}");
    let node1 = access_lines(&lab.agent_log("node1"));
    assert!(
        node1.iter().any(|l| l.direction == "inbound"
            && l.src_identity == id("frontend")
            && l.dst_identity == id("web")
            && l.result == "ok"),
        "zmesh verified the ztunnel client: {node1:#?}"
    );
    let zt = std::fs::read_to_string(&ztunnel_log).unwrap();
    assert!(
        zt.lines().any(|l| l.contains("direction=\"inbound\"")
            && l.contains(&id("cart"))
            && l.contains(&id("web"))),
        "ztunnel verified the zmesh client:\n{}",
        logs()
    );

    // Telemetry parity: the istio_tcp_* series carry ztunnel's label names, and for the
    // tunnel frontend (ztunnel) -> web (zmesh) both sides agree on its identities.
    let scrape = |node: &str| {
        let out = lab
            .cluster()
            .node(node)
            .unwrap()
            .command("curl")
            .unwrap()
            .args(["-s", "--max-time", "5", "http://127.0.0.1:15020/metrics"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let series = |page: &str, reporter: &str| -> Vec<BTreeMap<String, String>> {
        page.lines()
            .filter(|l| l.starts_with("istio_tcp_connections_opened_total{"))
            .map(|l| {
                let inner = &l[l.find('{').unwrap() + 1..l.rfind('}').unwrap()];
                inner
                    .split("\",")
                    .filter_map(|kv| kv.split_once("=\""))
                    .map(|(k, v)| (k.to_owned(), v.trim_end_matches('"').to_owned()))
                    .collect::<BTreeMap<_, _>>()
            })
            .filter(|labels| labels.get("reporter").map(String::as_str) == Some(reporter))
            .collect()
    };
    let (zmesh_page, ztunnel_page) = (scrape("node1"), scrape("node2"));
    let zmesh_in = series(&zmesh_page, "destination");
    let ztunnel_out = series(&ztunnel_page, "source");
    let keys = |s: &BTreeMap<String, String>| s.keys().cloned().collect::<Vec<_>>();
    let (Some(ours), Some(theirs)) = (
        zmesh_in
            .iter()
            .find(|l| l["source_principal"] == id("frontend")),
        ztunnel_out
            .iter()
            .find(|l| l["destination_principal"] == id("web")),
    ) else {
        panic!("no istio_tcp series for frontend -> web:\nzmesh:\n{zmesh_page}\nztunnel:\n{ztunnel_page}")
    };
    assert_eq!(
        keys(ours),
        keys(theirs),
        "label names: zmesh {ours:#?}\nztunnel {theirs:#?}"
    );
    for label in [
        "source_principal",
        "destination_principal",
        "source_workload_namespace",
        "destination_workload_namespace",
        "connection_security_policy",
        "request_protocol",
        "response_flags",
    ] {
        assert_eq!(
            ours[label], theirs[label],
            "{label}: zmesh {ours:#?}\nztunnel {theirs:#?}"
        );
    }

    // zmesh sends a client's first bytes right behind its CONNECT (README, "Istio /
    // ztunnel users"); ztunnel must buffer them until it answers. Whether a client's bytes
    // were there when zmesh opened the tunnel depends on timing: exchange until one that
    // carried them is seen, each one intact.
    let with_first_bytes = |page: &str| -> u64 {
        page.lines()
            .find_map(|l| l.strip_prefix("zmesh_hbone_connects_with_first_bytes_total "))
            .map(|v| v.trim().parse().unwrap())
            .unwrap_or_else(|| panic!("no first-bytes counter:\n{page}"))
    };
    let deadline = Instant::now() + WAIT;
    loop {
        let before = with_first_bytes(&scrape("node1"));
        let payload = secret("first-bytes");
        let run = lab.pod_client("shop", "cart", web2, &payload).unwrap();
        assert_eq!(run.output, payload, "zmesh -> ztunnel\n{}", logs());
        if with_first_bytes(&scrape("node1")) > before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no exchange carried its first bytes with the CONNECT\n{}",
            logs()
        );
    }

    // The same ztunnel with certificates from another root (its fake CA): refused both
    // ways, nothing in clear.
    if let Some(mut old) = procs.0.pop() {
        let _ = old.kill();
        let _ = old.wait();
    }
    let log = std::fs::File::create(work.path().join("ztunnel-foreign.log")).unwrap();
    let child = node2
        .command(&ztunnel)
        .unwrap()
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("INPOD_UDS", &zds)
        .env("LOCAL_XDS_PATH", &xds)
        .env("XDS_ADDRESS", "")
        .env("FAKE_CA", "true")
        .env("NODE_NAME", "node2")
        .env("RUST_LOG", "info")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    procs.0.push(child);
    let foreign_log = work.path().join("ztunnel-foreign.log");
    let capture = lab.cluster().start_capture().unwrap();
    let mut attempts = Vec::new();
    let deadline = Instant::now() + WAIT;
    // Until each side has refused the other's certificate for its root (not merely
    // failed while the new ztunnel was starting), every exchange fails.
    loop {
        for (from, to) in [(("shop", "frontend"), web), (("shop", "cart"), web2)] {
            let payload = secret("foreign");
            let run = lab.pod_client(from.0, from.1, to, &payload).unwrap();
            assert_ne!(run.output, payload, "{from:?} -> {to} crossed roots");
            attempts.push(payload);
        }
        let zmesh_refused = lab.agent_log("node1").contains("UnknownIssuer");
        let ztunnel_refused = std::fs::read_to_string(&foreign_log)
            .unwrap_or_default()
            .lines()
            .any(|l| l.contains("src.workload=\"frontend\"") && l.contains("UnknownIssuer"));
        if zmesh_refused && ztunnel_refused {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no refusal for the root seen (zmesh: {zmesh_refused}, ztunnel: {ztunnel_refused})\n{}",
            tail(&foreign_log)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let pcap = capture.stop().unwrap();
    assert!(
        attempts.iter().all(|p| !pcap.contains(p)),
        "plaintext on the wire"
    );
}
