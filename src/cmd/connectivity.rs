//! `zmesh connectivity test`, like `cilium connectivity test`: deploys test pods into the
//! local lab (network namespaces, the real CA and agents), runs a matrix of connections
//! (same node, cross node, Service, plaintext in permissive and strict mode, policy allow
//! and deny), checks each against what the agents saw (identities, encryption, verdict),
//! prints the results and can write them as JUnit XML.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use zmesh_agent::admin::AdminClient;
use zmesh_lab::{Lab, LabOptions};
use zmesh_proxy::flows::{FlowEvent, FlowVerdict};

#[derive(clap::Args)]
pub struct ConnectivityArgs {
    #[command(subcommand)]
    what: What,
}

#[derive(clap::Subcommand)]
enum What {
    /// Deploy test pods, run the matrix, report.
    Test(TestArgs),
}

#[derive(clap::Args)]
struct TestArgs {
    /// Run in a local lab built for the test (network namespaces on this machine; root).
    /// The only target today: see README "Connectivity test".
    #[arg(long, required = true)]
    lab: bool,
    /// Only the tests whose name contains this. Repeatable.
    #[arg(long, value_name = "TEXT")]
    test: Vec<String>,
    /// Also write the results as JUnit XML here.
    #[arg(long, value_name = "FILE")]
    junit: Option<PathBuf>,
}

/// The test pods: two echo servers (one per node) behind a Service, an allowed and a
/// refused client in the enrolled namespace, and a client outside the mesh.
const MANIFESTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: cx-mesh, labels: {io.cilium/mtls-enabled: "true"}}
---
apiVersion: v1
kind: Namespace
metadata: {name: cx-plain}
---
apiVersion: v1
kind: Pod
metadata: {name: echo-same, namespace: cx-mesh, labels: {app: echo}}
spec:
  nodeName: node1
  serviceAccountName: echo
  containers: [{name: echo, image: zmesh, ports: [{name: echo, containerPort: 8080}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: echo-other, namespace: cx-mesh, labels: {app: echo}}
spec:
  nodeName: node2
  serviceAccountName: echo
  containers: [{name: echo, image: zmesh, ports: [{name: echo, containerPort: 8080}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: cx-mesh, labels: {app: client}}
spec: {nodeName: node1, serviceAccountName: client, containers: [{name: c, image: zmesh}]}
---
apiVersion: v1
kind: Pod
metadata: {name: intruder, namespace: cx-mesh, labels: {app: intruder}}
spec: {nodeName: node1, serviceAccountName: intruder, containers: [{name: c, image: zmesh}]}
---
apiVersion: v1
kind: Pod
metadata: {name: plain-client, namespace: cx-plain, labels: {app: plain}}
spec: {nodeName: node2, serviceAccountName: plain, containers: [{name: c, image: zmesh}]}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: cx-mesh}
spec:
  clusterIP: 10.96.0.20
  selector: {app: echo}
  ports: [{name: echo, port: 80, targetPort: echo}]
"#;

/// Refuses the intruder's identity at the echo pods; the client (and plaintext from outside
/// the mesh) stay allowed.
const POLICY: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: echo-allow-client, namespace: cx-mesh}
spec:
  selector: {matchLabels: {app: echo}}
  action: DENY
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/cx-mesh/sa/intruder"]}
"#;

const SERVICE_VIP: &str = "10.96.0.20:80";
const SERVICE_TRIES: usize = 12;

/// One test's outcome.
#[derive(Debug)]
pub struct Outcome {
    pub name: &'static str,
    pub passed: bool,
    pub detail: String,
    pub elapsed: Duration,
}

pub async fn run(args: ConnectivityArgs) -> anyhow::Result<ExitCode> {
    let What::Test(args) = args.what;
    if !nix::unistd::Uid::effective().is_root() {
        anyhow::bail!("the lab builds network namespaces and loads eBPF: run it as root");
    }
    let dir = tempfile::tempdir().context("cannot make a directory for the test manifests")?;
    std::fs::write(dir.path().join("connectivity.yaml"), MANIFESTS)
        .context("cannot write the test manifests")?;
    println!("Deploying the test pods into a lab (2 nodes, the CA, one agent per node) ...");
    let mut lab = Lab::start(LabOptions {
        manifests: dir.path().to_owned(),
        zmesh_bin: std::env::current_exe().context("cannot find the zmesh binary")?,
        cert_lifetime: Duration::from_secs(3600),
        strict_nodes: vec![],
        reserved_pods: vec![],
        agent_env: vec![],
        kubelet_cgroups: false,
        dual_stack: false,
        ca_args: vec![],
    })
    .await?;
    let results = matrix(&mut lab, &args.test).await;
    drop(lab);
    let results = results?;
    print!("{}", report(&results));
    if let Some(path) = &args.junit {
        std::fs::write(path, junit(&results))
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("JUnit XML written to {}", path.display());
    }
    Ok(if results.iter().all(|r| r.passed) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn secret(label: &str) -> Vec<u8> {
    format!(
        "zmesh-connectivity-{label}-{:016x}\n",
        rand::random::<u64>()
    )
    .into_bytes()
}

/// The flows `node`'s agent recorded as ended, matching `query`, waiting a moment for the
/// last one (a flow is published as its connection closes).
async fn closed_flows(lab: &Lab, node: &str, query: &str) -> anyhow::Result<Vec<FlowEvent>> {
    let client = AdminClient::new(lab.admin_socket(node));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let flows: Vec<FlowEvent> = {
            use futures::StreamExt;
            let path = format!("/flows?phase=close&since=10m&{query}");
            let mut lines = Box::pin(client.lines(http::Method::GET, &path).await?);
            let mut out = Vec::new();
            while let Some(line) = lines.next().await {
                out.push(serde_json::from_str(&line?)?);
            }
            out
        };
        if !flows.is_empty() || Instant::now() > deadline {
            return Ok(flows);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn addr(lab: &Lab, ns: &str, pod: &str, port: u16) -> anyhow::Result<SocketAddr> {
    let pod = lab
        .cluster()
        .pod(ns, pod)
        .with_context(|| format!("no test pod {ns}/{pod}"))?;
    Ok(SocketAddr::new(pod.ip().into(), port))
}

/// Runs `(ns, pod) -> to` and says whether the payload came back intact.
fn exchange(lab: &Lab, from: (&str, &str), to: SocketAddr, label: &str) -> anyhow::Result<bool> {
    let payload = secret(label);
    let run = lab.pod_client(from.0, from.1, to, &payload)?;
    Ok(run.success && run.output == payload)
}

/// Checks that the last flow matching `query` on `node` ended with `verdict`, encrypted as
/// `encrypted`, from `source` (its SPIFFE ID, `None`: no identity).
async fn flow_is(
    lab: &Lab,
    node: &str,
    query: &str,
    verdict: FlowVerdict,
    encrypted: bool,
    source: Option<&str>,
) -> anyhow::Result<Result<(), String>> {
    let flows = closed_flows(lab, node, query).await?;
    let Some(last) = flows.last() else {
        return Ok(Err(format!("{node} recorded no flow for {query}")));
    };
    let want_source = source.map(|s| format!("spiffe://cluster.local/ns/{s}"));
    if last.verdict != verdict || last.encrypted != encrypted || last.source.identity != want_source
    {
        return Ok(Err(format!("{node} saw: {last}")));
    }
    Ok(Ok(()))
}

async fn matrix(lab: &mut Lab, only: &[String]) -> anyhow::Result<Vec<Outcome>> {
    let wanted = |name: &str| only.is_empty() || only.iter().any(|t| name.contains(t.as_str()));
    let same = addr(lab, "cx-mesh", "echo-same", 8080)?;
    let other = addr(lab, "cx-mesh", "echo-other", 8080)?;
    let _servers = [
        lab.cluster()
            .pod("cx-mesh", "echo-same")
            .context("echo pod")?
            .serve_echo(8080)?,
        lab.cluster()
            .pod("cx-mesh", "echo-other")
            .context("echo pod")?
            .serve_echo(8080)?,
    ];
    let mut results = Vec::new();
    let mut record = |name: &'static str, start: Instant, r: Result<(), String>| {
        let passed = r.is_ok();
        let detail = r.err().unwrap_or_default();
        println!(
            "  [{}] {name}{}",
            if passed { "pass" } else { "FAIL" },
            if passed {
                String::new()
            } else {
                format!(": {detail}")
            }
        );
        results.push(Outcome {
            name,
            passed,
            detail,
            elapsed: start.elapsed(),
        });
    };
    let client = "cx-mesh/sa/client";

    if wanted("pod-to-pod/same-node") {
        let t = Instant::now();
        let r = if exchange(lab, ("cx-mesh", "client"), same, "same")? {
            flow_is(
                lab,
                "node1",
                "direction=inbound&from_pod=cx-mesh/client&to_pod=cx-mesh/echo-same",
                FlowVerdict::Forwarded,
                true,
                Some(client),
            )
            .await?
        } else {
            Err("the echo did not come back".into())
        };
        record("pod-to-pod/same-node (mTLS, identities verified)", t, r);
    }
    if wanted("pod-to-pod/cross-node") {
        let t = Instant::now();
        let r = if exchange(lab, ("cx-mesh", "client"), other, "cross")? {
            flow_is(
                lab,
                "node2",
                "direction=inbound&from_pod=cx-mesh/client",
                FlowVerdict::Forwarded,
                true,
                Some(client),
            )
            .await?
        } else {
            Err("the echo did not come back".into())
        };
        record("pod-to-pod/cross-node (mTLS, identities verified)", t, r);
    }
    if wanted("service") {
        let t = Instant::now();
        let vip: SocketAddr = SERVICE_VIP.parse()?;
        let mut intact = 0;
        for i in 0..SERVICE_TRIES {
            intact += usize::from(exchange(
                lab,
                ("cx-mesh", "client"),
                vip,
                &format!("svc{i}"),
            )?);
        }
        let flows =
            closed_flows(lab, "node1", "direction=outbound&from_pod=cx-mesh/client").await?;
        let mut endpoints: Vec<String> = flows
            .iter()
            .filter(|f| f.service.as_deref() == Some("cx-mesh/echo") && f.encrypted)
            .filter_map(|f| f.destination.pod.clone())
            .collect();
        endpoints.sort();
        endpoints.dedup();
        let r = if intact != SERVICE_TRIES {
            Err(format!(
                "{intact} of {SERVICE_TRIES} connections to {vip} echoed"
            ))
        } else if endpoints != ["echo-other", "echo-same"] {
            Err(format!(
                "endpoints reached inside mTLS: {endpoints:?} (want both)"
            ))
        } else {
            Ok(())
        };
        record(
            "service/cluster-ip (balanced over both endpoints, mTLS)",
            t,
            r,
        );
    }
    if wanted("plaintext/permissive") {
        let t = Instant::now();
        let r = if exchange(lab, ("cx-plain", "plain-client"), other, "plain")? {
            flow_is(
                lab,
                "node2",
                "direction=inbound&from_pod=cx-plain/plain-client",
                FlowVerdict::Forwarded,
                false,
                None,
            )
            .await?
        } else {
            Err("the echo did not come back".into())
        };
        record(
            "plaintext/permissive (from outside the mesh, allowed, logged unencrypted)",
            t,
            r,
        );
    }
    if wanted("policy") {
        lab.edit_manifest("policy.yaml", |t| *t = POLICY.into())?;
        // Applied once the agents read it: the intruder is refused then.
        let t = Instant::now();
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut refused = false;
        while Instant::now() < deadline {
            if !exchange(lab, ("cx-mesh", "intruder"), other, "intruder")? {
                refused = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let r = if !refused {
            Err("the intruder still reached echo-other".into())
        } else {
            flow_is(
                lab,
                "node2",
                "verdict=denied&from_identity=cluster.local/ns/cx-mesh/sa/intruder",
                FlowVerdict::Denied,
                true,
                Some("cx-mesh/sa/intruder"),
            )
            .await?
        };
        record("policy/deny (DENY by principal refuses the intruder)", t, r);
        let t = Instant::now();
        let r = if exchange(lab, ("cx-mesh", "client"), other, "allowed")? {
            Ok(())
        } else {
            Err("the client was refused too".into())
        };
        record(
            "policy/allow (the same policy lets the client through)",
            t,
            r,
        );
        lab.edit_manifest("policy.yaml", |t| t.clear())?;
    }
    if wanted("strict") {
        let t = Instant::now();
        lab.restart_agent("node2", true).await?;
        let plain = exchange(lab, ("cx-plain", "plain-client"), other, "strict-plain")?;
        let mtls = exchange(lab, ("cx-mesh", "client"), other, "strict-mtls")?;
        let r = match (plain, mtls) {
            (false, true) => {
                flow_is(
                    lab,
                    "node2",
                    "verdict=dropped",
                    FlowVerdict::Dropped,
                    false,
                    None,
                )
                .await?
            }
            (true, _) => Err("plaintext reached an enrolled pod in strict mode".into()),
            (false, false) => Err("mTLS failed in strict mode".into()),
        };
        lab.restart_agent("node2", false).await?;
        record(
            "strict (plaintext refused and reported, mTLS still works)",
            t,
            r,
        );
    }
    Ok(results)
}

/// The results as a table and a summary line.
pub fn report(results: &[Outcome]) -> String {
    let mut out = String::from("\nRESULT  TIME     TEST\n");
    for r in results {
        let _ = writeln!(
            out,
            "{:<6}  {:>6}ms  {}{}",
            if r.passed { "pass" } else { "FAIL" },
            r.elapsed.as_millis(),
            r.name,
            if r.passed {
                String::new()
            } else {
                format!("\n                 {}", r.detail)
            }
        );
    }
    let passed = results.iter().filter(|r| r.passed).count();
    let _ = writeln!(out, "\n{passed} of {} tests passed", results.len());
    out
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The results as JUnit XML (one testsuite, one testcase per test, a `<failure>` with the
/// detail for each failed one), as CI systems read it.
pub fn junit(results: &[Outcome]) -> String {
    let failures = results.iter().filter(|r| !r.passed).count();
    let total: f64 = results.iter().map(|r| r.elapsed.as_secs_f64()).sum();
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        out,
        "<testsuites name=\"zmesh connectivity test\" tests=\"{}\" failures=\"{failures}\" time=\"{total:.3}\">",
        results.len()
    );
    let _ = writeln!(
        out,
        "  <testsuite name=\"connectivity\" tests=\"{}\" failures=\"{failures}\" time=\"{total:.3}\">",
        results.len()
    );
    for r in results {
        let name = xml_escape(r.name);
        let time = r.elapsed.as_secs_f64();
        if r.passed {
            let _ = writeln!(
                out,
                "    <testcase classname=\"connectivity\" name=\"{name}\" time=\"{time:.3}\"/>"
            );
        } else {
            let _ = writeln!(
                out,
                "    <testcase classname=\"connectivity\" name=\"{name}\" time=\"{time:.3}\">\n      <failure message=\"{}\"/>\n    </testcase>",
                xml_escape(&r.detail)
            );
        }
    }
    out.push_str("  </testsuite>\n</testsuites>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn junit_is_golden_and_escapes_details() {
        let results = [
            Outcome {
                name: "pod-to-pod/same-node",
                passed: true,
                detail: String::new(),
                elapsed: Duration::from_millis(120),
            },
            Outcome {
                name: "policy/deny",
                passed: false,
                detail: "node2 saw: a -> b \"FORWARDED\" & <more>".into(),
                elapsed: Duration::from_millis(2500),
            },
        ];
        assert_eq!(
            junit(&results),
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
             <testsuites name=\"zmesh connectivity test\" tests=\"2\" failures=\"1\" time=\"2.620\">\n\
             \x20 <testsuite name=\"connectivity\" tests=\"2\" failures=\"1\" time=\"2.620\">\n\
             \x20   <testcase classname=\"connectivity\" name=\"pod-to-pod/same-node\" time=\"0.120\"/>\n\
             \x20   <testcase classname=\"connectivity\" name=\"policy/deny\" time=\"2.500\">\n\
             \x20     <failure message=\"node2 saw: a -&gt; b &quot;FORWARDED&quot; &amp; &lt;more&gt;\"/>\n\
             \x20   </testcase>\n\
             \x20 </testsuite>\n\
             </testsuites>\n"
        );
        let text = report(&results);
        assert!(
            text.contains("pass       120ms  pod-to-pod/same-node"),
            "{text}"
        );
        assert!(text.contains("1 of 2 tests passed"), "{text}");
    }
}
