//! `zmesh connectivity test --lab`: the test pods in a local lab (network namespaces, the
//! real CA and agents); each connection is checked against the flows the agents recorded
//! (identities, encryption, verdict).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use zmesh_agent::admin::AdminClient;
use zmesh_lab::{Lab, LabOptions};
use zmesh_proxy::flows::{FlowEvent, FlowVerdict};

use super::{Outcome, Recorder};

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

/// Builds the lab, runs the matrix (tests whose name contains one of `only`), tears the lab
/// down.
pub async fn run(only: &[String]) -> anyhow::Result<Vec<Outcome>> {
    if !nix::unistd::Uid::effective().is_root() {
        anyhow::bail!("the lab builds network namespaces and loads eBPF: run it as root");
    }
    let dir = tempfile::tempdir().context("cannot make a directory for the test manifests")?;
    std::fs::write(dir.path().join("connectivity.yaml"), MANIFESTS)
        .context("cannot write the test manifests")?;
    println!("Deploying the test pods into a lab (2 nodes, the CA, one agent per node) ...");
    let zmesh_bin = std::env::current_exe().context("cannot find the zmesh binary")?;
    let mut lab = Lab::start(LabOptions::new(dir.path().to_owned(), zmesh_bin)).await?;
    let results = matrix(&mut lab, only).await;
    drop(lab);
    results
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
    if last.verdict != verdict
        || last.encrypted != encrypted
        || last.source.identity.as_deref() != want_source.as_deref()
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
    let mut results = Recorder::default();
    let mut record = |name: &'static str, start: Instant, r: Result<(), String>| {
        results.record(name, start, r);
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
            .filter_map(|f| f.destination.pod.as_deref().map(str::to_owned))
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
    Ok(results.into_outcomes())
}
