//! `zmesh demo`: the README's main command. Builds a small cluster in network namespaces
//! from examples/demo, runs the real CA and one real agent per node, sends traffic between
//! pods with an unmodified client (`nc`), and shows — from the proxies' own logs, a capture
//! of the underlay and the agents' admin APIs — what the mesh did. Every claim it prints is
//! checked; the exit status is non-zero if one does not hold.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use zmesh_agent::admin::{epoch_seconds, AdminClient, CertInfo};
use zmesh_lab::{Lab, LabOptions};
use zmesh_proxy::flows::{FlowEvent, FlowVerdict};

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Namespace and Pod manifests describing the demo cluster.
    #[arg(long, value_name = "DIR", default_value = "examples/demo")]
    manifests: PathBuf,
    /// Lifetime of workload certificates in the demo.
    #[arg(long, default_value = "1h", value_parser = super::parse_duration)]
    cert_lifetime: Duration,
}

struct Checks {
    failed: Vec<String>,
}

impl Checks {
    fn check(&mut self, ok: bool, claim: &str) {
        println!("  [{}] {claim}", if ok { "ok" } else { "FAILED" });
        if !ok {
            self.failed.push(claim.to_owned());
        }
    }
}

pub async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    if !nix::unistd::Uid::effective().is_root() {
        anyhow::bail!("the demo builds network namespaces and loads eBPF: run it as root");
    }
    // A kernel below the floor is named up front, not by whatever step trips over it.
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_else(|_| "the running kernel".into());
    let kernel = super::check::kernel_features(&release, zmesh_redirect::kernel_features());
    if kernel.status == super::check::Status::Fail {
        let hint = kernel.hint.unwrap_or_default();
        anyhow::bail!("{}: {} ({hint})", kernel.name, kernel.detail);
    }
    // Before anything is built: from here on these signals clean up instead of killing.
    let mut interrupts = Interrupts::new()?;
    let zmesh_bin = std::env::current_exe().context("cannot find the zmesh binary")?;
    println!(
        "Starting a local cluster from {} ...",
        args.manifests.display()
    );
    let lab = Lab::start(LabOptions {
        cert_lifetime: args.cert_lifetime,
        // Every pod has an IPv4 and an IPv6 address; the agents steer both.
        dual_stack: true,
        ..LabOptions::new(args.manifests.clone(), zmesh_bin)
    });
    let mut lab = tokio::select! {
        lab = lab => lab?,
        signal = interrupts.next() => {
            println!("{signal}: cleaned up");
            return Ok(ExitCode::FAILURE);
        }
    };
    let result = tokio::select! {
        result = demo(&mut lab) => result,
        signal = interrupts.next() => {
            println!("\n{signal}");
            Ok(vec![signal.to_owned()])
        }
    };
    println!("\nCleaning up (agents, CA, eBPF programs and pins, namespaces, cgroups) ...");
    drop(lab);
    let failed = result?;
    if failed.is_empty() {
        println!("Done: every claim above was checked.");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("{} claim(s) failed: {failed:?}", failed.len());
        Ok(ExitCode::FAILURE)
    }
}

async fn demo(lab: &mut Lab) -> anyhow::Result<Vec<String>> {
    let mut checks = Checks { failed: vec![] };
    let cluster = lab.cluster();
    println!("\nCluster (run {}):", cluster.run_id());
    for node in cluster.nodes() {
        if node.pods().is_empty() {
            println!(
                "  {:<14} {:<12} CA on {}",
                node.name(),
                node.underlay_ip(),
                lab.ca_addr()
            );
            continue;
        }
        let pods: Vec<String> = node
            .pods()
            .iter()
            .map(|p| match p.ip6() {
                Some(ip6) => format!("{}/{} {} {ip6}", p.namespace(), p.name(), p.ip()),
                None => format!("{}/{} {}", p.namespace(), p.name(), p.ip()),
            })
            .collect();
        println!(
            "  {:<14} {:<12} {}",
            node.name(),
            node.underlay_ip(),
            pods.join(", ")
        );
    }
    println!("  namespace shop is enrolled (io.cilium/mtls-enabled=true); legacy is not");
    println!(
        "  Service shop/web: ClusterIP {SERVICE_VIP}, endpoints shop/web (node1) and shop/web-2 (node2)"
    );
    println!("  each node's agent joined the CA with a one-time token and runs the proxy + eBPF");

    let web = pod_addr(lab, "shop", "web", 8080)?;
    let web6 = lab
        .cluster()
        .pod("shop", "web")
        .and_then(|p| p.ip6())
        .map(|ip6| SocketAddr::new(ip6.into(), 8080))
        .context("pod shop/web has no IPv6 address")?;
    let batch = pod_addr(lab, "legacy", "batch", 9090)?;
    let _web_server = lab
        .cluster()
        .pod("shop", "web")
        .context("pod shop/web")?
        .serve_echo(8080)?;
    let _web2_server = lab
        .cluster()
        .pod("shop", "web-2")
        .context("pod shop/web-2")?
        .serve_echo(8080)?;
    let _batch_server = lab
        .cluster()
        .pod("legacy", "batch")
        .context("pod legacy/batch")?
        .serve_echo(9090)?;

    let nonce: u64 = rand::random();
    let secret = |label: &str| format!("zmesh-demo-{label}-{nonce:016x}").into_bytes();
    let capture = lab.cluster().start_capture()?;
    println!(
        "\n1. Traffic (nc in the pods, unmodified; echo servers in shop/web and legacy/batch)"
    );
    let cases = [
        (
            "shop",
            "frontend",
            web,
            "cross-node, both enrolled",
            "cross",
        ),
        ("shop", "cart", web, "same node, both enrolled", "same"),
        (
            "shop",
            "frontend",
            web6,
            "cross-node over IPv6, both enrolled",
            "cross6",
        ),
        (
            "legacy",
            "batch",
            web,
            "from a non-enrolled pod (permissive)",
            "plain",
        ),
        (
            "shop",
            "frontend",
            batch,
            "to a non-enrolled pod (passthrough)",
            "out",
        ),
    ];
    for (ns, pod, addr, what, label) in cases {
        let payload = secret(label);
        let run = lab.pod_client(ns, pod, addr, &payload)?;
        checks.check(
            run.success && run.output == payload,
            &format!(
                "{ns}/{pod} -> {addr}: {what}: {} bytes echoed intact in {:?}",
                payload.len(),
                run.elapsed
            ),
        );
    }
    let vip: SocketAddr = SERVICE_VIP.parse()?;
    let mut served = 0;
    for i in 0..SERVICE_CONNECTIONS {
        let payload = secret(&format!("service-{i}"));
        let run = lab.pod_client("shop", "frontend", vip, &payload)?;
        served += usize::from(run.success && run.output == payload);
    }
    checks.check(
        served == SERVICE_CONNECTIONS,
        &format!(
            "shop/frontend -> {vip} (the Service's ClusterIP): {served} of {SERVICE_CONNECTIONS} connections echoed intact"
        ),
    );
    let legacy_payload = secret("service-legacy");
    let legacy = lab.pod_client("legacy", "batch", vip, &legacy_payload)?;
    checks.check(
        legacy.success && legacy.output == legacy_payload,
        &format!("legacy/batch -> {vip}: a non-enrolled client still reaches the Service (through kube-proxy's DNAT, permissive)"),
    );
    let pcap = capture.stop()?;

    println!("\n2. Flows seen by the node agents, as each ended (`zmesh observe --phase close --since 5m` on each node)");
    let mut all_flows = Vec::new();
    for node in ["node1", "node2"] {
        for flow in flows(lab, node, "phase=close&since=5m").await? {
            println!("  {node}  {flow}");
            all_flows.push(flow);
        }
    }
    let td = lab.trust_domain().to_string();
    let id = |ns: &str, sa: &str| format!("spiffe://{td}/ns/{ns}/sa/{sa}");
    let verified_to_web = |src: &str| {
        all_flows.iter().any(|f| {
            f.encrypted
                && f.verdict == FlowVerdict::Forwarded
                && f.source.identity.as_deref() == Some(src)
                && f.destination.identity.as_deref() == Some(id("shop", "web").as_str())
        })
    };
    checks.check(
        verified_to_web(&id("shop", "frontend")),
        "shop/frontend -> shop/web was mTLS, with shop/frontend's identity verified by node1",
    );
    checks.check(
        verified_to_web(&id("shop", "cart")),
        "same-node traffic shop/cart -> shop/web also went through the proxy with mTLS",
    );
    checks.check(
        all_flows
            .iter()
            .any(|f| !f.encrypted && f.source.identity.is_none() && f.destination.addr == web),
        "legacy/batch -> shop/web is flagged as plaintext, with no identity",
    );
    // frontend's node (node2) chose an endpoint for each connection to the Service.
    let to_service: Vec<&FlowEvent> = all_flows
        .iter()
        .filter(|f| {
            f.service.as_deref() == Some("shop/web") && f.source.pod.as_deref() == Some("frontend")
        })
        .collect();
    let endpoint_count = |pod: &str| {
        to_service
            .iter()
            .filter(|f| f.destination.pod.as_deref() == Some(pod))
            .count()
    };
    println!(
        "  Service shop/web: {} connection(s) to shop/web (node1), {} to shop/web-2 (node2)",
        endpoint_count("web"),
        endpoint_count("web-2")
    );
    checks.check(
        to_service.len() >= SERVICE_CONNECTIONS
            && to_service.iter().all(|f| {
                f.encrypted
                    && f.destination.identity.as_deref() == Some(id("shop", "web").as_str())
            }),
        "every connection to the Service's ClusterIP went to one of its endpoints over mTLS, and its flow names the Service",
    );

    println!("\n3. On the wire (tcpdump on the underlay bridge)");
    let ports = pcap.tcp_ports();
    println!("  TCP ports seen: {ports:?}");
    let hbone_streams: Vec<_> = pcap
        .tcp_streams()
        .into_iter()
        .filter(|(flow, data)| flow.3 == 15008 && !data.is_empty())
        .collect();
    let all_tls = !hbone_streams.is_empty()
        && hbone_streams
            .iter()
            .all(|(_, data)| data.starts_with(&[0x16, 0x03]));
    checks.check(
        all_tls,
        &format!(
            "{} IPv4 connection(s) to port 15008, each starting with a TLS handshake record",
            hbone_streams.len()
        ),
    );
    let hbone6 = pcap
        .tcp_streams6()
        .into_iter()
        .filter(|(flow, data)| flow.3 == 15008 && !data.is_empty())
        .collect::<Vec<_>>();
    checks.check(
        !hbone6.is_empty() && hbone6.iter().all(|(_, d)| d.starts_with(&[0x16, 0x03])),
        &format!(
            "{} IPv6 connection(s) to port 15008, each starting with a TLS handshake record",
            hbone6.len()
        ),
    );
    checks.check(
        !pcap.contains(&secret("cross")) && !pcap.contains(&secret("cross6")),
        "the cross-node payloads (IPv4 and IPv6) never appear in clear on the underlay",
    );
    checks.check(
        pcap.contains(&secret("plain")),
        "the payload from the non-enrolled pod does appear in clear (permissive mode, plaintext)",
    );
    checks.check(
        !ports.contains_key(&8080) || !pcap.contains(&secret("cross")),
        "no plaintext connection from an enrolled pod to shop/web's port 8080 crossed the underlay",
    );

    println!("\n4. Workload certificates (from each agent's admin API, as `zmesh certs status`)");
    let now = epoch_seconds(SystemTime::now());
    for node in ["node1", "node2"] {
        let certs: Vec<CertInfo> = AdminClient::new(lab.admin_socket(node))
            .get_json("/certs")
            .await?;
        for cert in &certs {
            let left = cert.not_after.map(|t| t.saturating_sub(now)).unwrap_or(0);
            let renew = cert
                .next_attempt
                .map(|t| t.saturating_sub(now))
                .unwrap_or(0);
            println!(
                "  {node} {:<44} serial {:<12} expires in {:>5}s, renews in {:>5}s",
                cert.workload,
                cert.serial
                    .as_deref()
                    .map(|s| &s[..s.len().min(11)])
                    .unwrap_or("-"),
                left,
                renew
            );
        }
        checks.check(
            certs.iter().all(|c| c.not_after.is_some_and(|t| t > now)),
            &format!("{node}: every enrolled workload holds a valid certificate"),
        );
    }

    println!(
        "\n5. Strict mode: node1's agent restarted with --mode strict (pinned eBPF state kept)"
    );
    lab.restart_agent("node1", true).await?;
    let refused = lab.pod_client("legacy", "batch", web, &secret("strict"))?;
    checks.check(
        !refused.success && refused.elapsed < Duration::from_secs(1),
        &format!(
            "legacy/batch -> shop/web is refused in {:?} (plaintext to an enrolled pod is dropped, sender told at once)",
            refused.elapsed
        ),
    );
    // The agent reads drop reports from the eBPF ring buffer on its own: the report may
    // land a moment after the client was refused (longer on a loaded or emulated machine).
    let reported = |flows: &[FlowEvent]| {
        flows
            .iter()
            .any(|f| f.destination.addr == web && f.reason.as_deref() == Some("plaintext_strict"))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut dropped = flows(lab, "node1", "verdict=dropped&since=5m").await?;
    while !reported(&dropped) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        dropped = flows(lab, "node1", "verdict=dropped&since=5m").await?;
    }
    for flow in &dropped {
        println!("  node1  {flow}");
    }
    checks.check(
        reported(&dropped),
        "the drop is reported by the eBPF program with its reason (zmesh observe --verdict dropped)",
    );
    let allowed = lab.pod_client("shop", "frontend", web, &secret("strict-ok"))?;
    checks.check(
        allowed.success && allowed.output == secret("strict-ok"),
        "shop/frontend -> shop/web still works over mTLS",
    );
    let mut served = 0;
    for i in 0..SERVICE_CONNECTIONS {
        let payload = secret(&format!("strict-service-{i}"));
        let run = lab.pod_client("shop", "frontend", vip, &payload)?;
        served += usize::from(run.success && run.output == payload);
    }
    checks.check(
        served == SERVICE_CONNECTIONS,
        &format!("shop/frontend -> {vip} (the Service) still works: {served} of {SERVICE_CONNECTIONS} connections"),
    );
    Ok(checks.failed)
}

/// Ctrl-C, SIGTERM (`kill`, systemd, CI timeouts) and SIGHUP (a closed terminal): the demo
/// removes everything it made on any of them.
struct Interrupts {
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Interrupts {
    fn new() -> anyhow::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            hup: signal(SignalKind::hangup()).context("installing the SIGHUP handler")?,
        })
    }

    /// The next interrupt's name.
    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => "interrupted",
            _ = self.term.recv() => "terminated (SIGTERM)",
            _ = self.hup.recv() => "hung up (SIGHUP)",
        }
    }
}

/// shop/web's ClusterIP and port (examples/demo/services.yaml).
const SERVICE_VIP: &str = "10.96.0.10:80";
/// Connections to the Service per step: enough to see both endpoints chosen, most runs.
const SERVICE_CONNECTIONS: usize = 8;

fn pod_addr(lab: &Lab, ns: &str, name: &str, port: u16) -> anyhow::Result<SocketAddr> {
    let pod = lab
        .cluster()
        .pod(ns, name)
        .with_context(|| format!("the demo manifests need pod {ns}/{name}"))?;
    Ok(SocketAddr::new(pod.ip().into(), port))
}

/// A node agent's flows, as `zmesh observe` gets them, once they are published (a flow is
/// published when its connection has ended, a moment after the client saw the end).
async fn flows(lab: &Lab, node: &str, query: &str) -> anyhow::Result<Vec<FlowEvent>> {
    let client = AdminClient::new(lab.admin_socket(node));
    let mut last = Vec::new();
    for _ in 0..20 {
        let mut lines = Box::pin(
            client
                .lines(http::Method::GET, &format!("/flows?{query}"))
                .await?,
        );
        let mut flows = Vec::new();
        while let Some(line) = futures::StreamExt::next(&mut lines).await {
            flows.push(serde_json::from_str::<FlowEvent>(&line?)?);
        }
        if !flows.is_empty() && flows.len() == last.len() {
            return Ok(flows);
        }
        last = flows;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(last)
}
