//! Identity-based authorization and flow observability end to end on the netns cluster:
//! policies from the manifest directory, verdicts and drops seen through `zmesh observe`.
//! Needs root.

mod support;

use std::io::Read;
use std::time::{Duration, Instant};

use support::{lab, observe, secret, serve_echo, wait_flows};
use zmesh_lab::Lab;
use zmesh_proxy::flows::{FlowEvent, FlowVerdict};

fn policy(lab: &mut Lab, file: &str, yaml: &str) {
    let yaml = yaml.to_owned();
    lab.edit_manifest(file, move |t| *t = yaml).unwrap();
}

const ALLOW_FRONTEND: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-frontend, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/shop/sa/frontend", "cluster.local/ns/shop/sa/cart"]}
"#;

#[tokio::test(flavor = "multi_thread")]
async fn allow_and_deny_policies_by_identity_with_flow_events() {
    let mut lab = lab(&[]).await;
    let (web, _server) = serve_echo(&lab, "shop", "web", 8080);

    // ALLOW by principal: frontend only.
    policy(
        &mut lab,
        "policy-allow.yaml",
        &ALLOW_FRONTEND.replace(", \"cluster.local/ns/shop/sa/cart\"", ""),
    );
    let denied_cart = |flows: &[FlowEvent]| {
        flows.iter().any(|f| {
            f.verdict == FlowVerdict::Denied
                && f.source.identity.as_deref() == Some("spiffe://cluster.local/ns/shop/sa/cart")
        })
    };
    // The policy takes effect for new connections once the agent has read it.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let refused = lab
            .pod_client("shop", "cart", web, &secret("cart"))
            .unwrap();
        if refused.output.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "the ALLOW policy never applied");
    }
    let ok = secret("frontend");
    assert_eq!(
        lab.pod_client("shop", "frontend", web, &ok).unwrap().output,
        ok
    );
    let flows = wait_flows(&lab, "node1", &["--verdict", "denied"], denied_cart);
    let denial = flows
        .iter()
        .find(|f| denied_cart(std::slice::from_ref(f)))
        .unwrap();
    let text = serde_json::to_string(&denial.policy).unwrap();
    assert!(
        text.contains("shop/allow-frontend"),
        "the flow names the policy: {text}"
    );

    // DENY by namespace wins over ALLOW, for the otherwise allowed frontend.
    policy(&mut lab, "policy-allow.yaml", ALLOW_FRONTEND);
    policy(
        &mut lab,
        "policy-deny.yaml",
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-shop, namespace: shop}
spec:
  action: DENY
  rules:
  - from:
    - source: {namespaces: ["shop"]}
"#,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let run = lab
            .pod_client("shop", "frontend", web, &secret("deny"))
            .unwrap();
        if run.output.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "the DENY policy never applied");
    }
    wait_flows(
        &lab,
        "node1",
        &["--verdict", "denied", "--pod", "shop/frontend"],
        |flows| {
            flows.iter().any(|f| {
                serde_json::to_string(&f.policy)
                    .unwrap()
                    .contains("shop/deny-shop")
            })
        },
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_policy_added_while_a_connection_is_open_closes_it() {
    let mut lab = lab(&[]).await;
    let (web, _server) = serve_echo(&lab, "shop", "web", 8080);
    let mut client = support::LongLivedClient::open(&lab, "shop", "frontend", web);
    client.roundtrip("ping");
    let support::LongLivedClient {
        mut child,
        mut stdin,
        stdout,
    } = client;
    let mut stdout = stdout.into_inner();

    policy(
        &mut lab,
        "policy-deny.yaml",
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-frontend, namespace: shop}
spec:
  action: DENY
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/shop/sa/frontend"]}
"#,
    );
    // The agent closes the open connection and says why.
    wait_flows(&lab, "node1", &["--verdict", "denied"], |flows| {
        flows.iter().any(|f| {
            f.reason.as_deref() == Some("policy changed")
                && f.source.identity.as_deref()
                    == Some("spiffe://cluster.local/ns/shop/sa/frontend")
        })
    });
    // The client finds its connection gone: nothing is echoed any more, and nc exits once
    // its writes hit the closed socket.
    let reader = std::thread::spawn(move || {
        let mut rest = Vec::new();
        let _ = stdout.read_to_end(&mut rest);
        rest
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "the connection still accepts data"
        );
        if std::io::Write::write_all(&mut stdin, b"again\n").is_err() {
            break; // nc has exited
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    let rest = reader.join().unwrap();
    assert!(
        !String::from_utf8_lossy(&rest).contains("again"),
        "data still flowed after the policy denied the connection"
    );
}

/// With the proxy in a `zmesh datapath` process (as the chart runs it), the agent hands
/// its eBPF drop reports to the data path, whose history `zmesh observe` shows.
#[tokio::test(flavor = "multi_thread")]
async fn observe_shows_strict_drops_with_the_data_path_apart() {
    let mut options = support::options(support::manifests(), &["node1"], vec![]);
    options.datapath_process = true;
    let lab = zmesh_lab::Lab::start(options)
        .await
        .expect("the lab starts");
    let (web, _server) = serve_echo(&lab, "shop", "web", 8080);
    let refused = lab.pod_client("legacy", "batch", web, b"x").unwrap();
    assert!(!refused.success);
    let flows = wait_flows(&lab, "node1", &["--verdict", "dropped"], |f| !f.is_empty());
    assert!(
        flows
            .iter()
            .any(|f| f.reason.as_deref() == Some("plaintext_strict") && f.destination.addr == web),
        "{flows:#?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn observe_shows_strict_drops_and_plaintext_flows() {
    // node1 strict: plaintext to shop/web is dropped in eBPF and reported.
    let strict = lab(&["node1"]).await;
    let (web, _server) = serve_echo(&strict, "shop", "web", 8080);
    let refused = strict.pod_client("legacy", "batch", web, b"x").unwrap();
    assert!(!refused.success);
    let flows = wait_flows(&strict, "node1", &["--verdict", "dropped"], |f| {
        !f.is_empty()
    });
    assert!(
        flows
            .iter()
            .any(|f| f.reason.as_deref() == Some("plaintext_strict")
                && f.destination.addr == web
                && !f.encrypted),
        "{flows:#?}"
    );
    drop(strict);

    // Permissive: --encrypted false lists exactly the plaintext flows.
    let lab = lab(&[]).await;
    let (web, _server) = serve_echo(&lab, "shop", "web", 8080);
    let plain = secret("plain");
    assert_eq!(
        lab.pod_client("legacy", "batch", web, &plain)
            .unwrap()
            .output,
        plain
    );
    let meshed = secret("meshed");
    assert_eq!(
        lab.pod_client("shop", "frontend", web, &meshed)
            .unwrap()
            .output,
        meshed
    );
    let batch_ip = std::net::IpAddr::from(lab.cluster().pod("legacy", "batch").unwrap().ip());
    // Wait until both flows are published, then compare the filtered views.
    wait_flows(&lab, "node1", &[], |f| f.len() >= 2);
    let plaintext = observe(&lab, "node1", &["--encrypted", "false"]);
    assert!(!plaintext.is_empty());
    assert!(
        plaintext
            .iter()
            .all(|f| !f.encrypted && f.source.addr.ip() == batch_ip),
        "{plaintext:#?}"
    );
    let encrypted = observe(&lab, "node1", &["--encrypted", "true"]);
    assert!(encrypted.iter().all(|f| f.encrypted));
    assert!(encrypted.iter().any(
        |f| f.source.identity.as_deref() == Some("spiffe://cluster.local/ns/shop/sa/frontend")
    ));
}
