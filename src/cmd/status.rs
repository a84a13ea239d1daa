//! `zmesh status`: the mesh across the cluster, like `cilium status`: the CA's roots and
//! whether nodes get certificates from it, every node agent (version, ready, mode, kernel
//! attachment, enrolled pods, certificate health, problems) and the enrolled namespaces.
//!
//! Agents are found through the Kubernetes API (the Lease each agent renews with its
//! status, `--kubernetes`) or through their admin sockets (`--admin-socket`, repeatable:
//! one node, or the manifest-directory lab).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use serde::Serialize;
use zmesh_agent::admin::AdminClient;
use zmesh_cluster::agent_status::{self, AgentStatus, ReportedAgent};
use zmesh_cluster::ClusterState;
use zmesh_identity::{TrustBundle, TrustDomain};

use super::config::{age, render_table};

#[derive(clap::Args)]
pub struct StatusArgs {
    /// Find the agents, the enrolled namespaces and the CA's roots through the Kubernetes
    /// API (KUBECONFIG or in-cluster).
    #[arg(long)]
    kubernetes: bool,
    /// With --kubernetes: zmesh's namespace (the agents' Leases, the CA roots ConfigMap).
    #[arg(short = 'n', long, value_name = "NS", default_value = "zmesh-system")]
    namespace: String,
    /// An agent's admin socket. Repeatable (one per node of a lab). Without --kubernetes
    /// and without this: the local agent's, /run/zmesh/agent.sock.
    #[arg(long, value_name = "PATH")]
    admin_socket: Vec<PathBuf>,
    /// A manifest directory (the lab): its enrolled namespaces.
    #[arg(long, value_name = "DIR", conflicts_with = "kubernetes")]
    manifests: Option<PathBuf>,
    /// The CA's roots (PEM), e.g. the `zmesh ca bundle` output; with --kubernetes the
    /// zmesh-ca-roots ConfigMap is read instead.
    #[arg(long, value_name = "FILE")]
    ca_bundle: Option<PathBuf>,
    /// The trust domain of --ca-bundle.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Output {
    Table,
    Json,
}

/// The whole report (`-o json`).
#[derive(Debug, Serialize)]
pub struct MeshStatus {
    /// Every agent current, ready and without problems, every root valid.
    pub healthy: bool,
    pub ca: CaStatus,
    pub agents: Vec<AgentEntry>,
    /// `None` when not known (no manifests, no Kubernetes).
    pub enrolled_namespaces: Option<Vec<String>>,
}

#[derive(Debug, Serialize)]
pub struct CaStatus {
    pub roots: Vec<RootStatus>,
    /// Agents whose every certificate is valid and renewing, out of those reporting.
    pub nodes_issued: usize,
    pub nodes_reporting: usize,
}

#[derive(Debug, Serialize)]
pub struct RootStatus {
    pub trust_domain: String,
    pub fingerprint_sha256: String,
    #[serde(with = "rfc3339")]
    pub not_after: SystemTime,
}

#[derive(Debug, Serialize)]
pub struct AgentEntry {
    pub node: String,
    /// `reporting`, `stale` (no report within the lease) or `unreachable`.
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<AgentStatus>,
}

impl AgentEntry {
    fn healthy(&self) -> bool {
        self.state == "reporting"
            && self
                .status
                .as_ref()
                .is_some_and(|s| s.ready && s.problems.is_empty())
    }

    fn issued(&self) -> bool {
        self.status
            .as_ref()
            .is_some_and(|s| s.certificates.unusable == 0 && s.certificates.failing == 0)
    }
}

pub async fn run(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let now = SystemTime::now();
    let mut agents = Vec::new();
    let mut roots_pem = None;
    let mut enrolled = None;
    if args.kubernetes {
        let client = kube::Client::try_default()
            .await
            .context("cannot configure the Kubernetes client")?;
        for reported in agent_status::list(client.clone(), &args.namespace).await? {
            agents.push(from_lease(reported, now));
        }
        let namespaces: kube::Api<k8s_openapi::api::core::v1::Namespace> =
            kube::Api::all(client.clone());
        let list = namespaces
            .list(&Default::default())
            .await
            .context("cannot list namespaces")?;
        let infos = list.items.into_iter().filter_map(|ns| {
            Some(zmesh_cluster::NamespaceInfo {
                name: ns.metadata.name?,
                labels: ns.metadata.labels.unwrap_or_default(),
            })
        });
        enrolled = Some(enrolled_namespaces(&ClusterState::new(infos, [])));
        if args.ca_bundle.is_none() {
            let maps: kube::Api<k8s_openapi::api::core::v1::ConfigMap> =
                kube::Api::namespaced(client, &args.namespace);
            roots_pem = maps
                .get_opt("zmesh-ca-roots")
                .await
                .context("cannot read ConfigMap zmesh-ca-roots")?
                .and_then(|cm| cm.data?.get("roots.pem").cloned());
        }
    }
    let sockets = if args.admin_socket.is_empty() && !args.kubernetes {
        vec![PathBuf::from("/run/zmesh/agent.sock")]
    } else {
        args.admin_socket.clone()
    };
    for socket in &sockets {
        agents.push(from_socket(socket).await);
    }
    agents.sort_by(|a, b| a.node.cmp(&b.node));
    if let Some(dir) = &args.manifests {
        let (state, errors) = zmesh_cluster::manifests::ManifestDir::new(dir).rescan();
        if let Some(e) = errors.first() {
            anyhow::bail!("the manifest directory {}: {e}", dir.display());
        }
        enrolled = Some(enrolled_namespaces(&state.unwrap_or_default()));
    }
    if let Some(path) = &args.ca_bundle {
        roots_pem = Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?,
        );
    }
    let td = TrustDomain::new(&args.trust_domain).context("--trust-domain")?;
    let roots = match &roots_pem {
        Some(pem) => roots_of(pem, &td)?,
        None => Vec::new(),
    };
    let reporting = agents.iter().filter(|a| a.status.is_some()).count();
    let ca = CaStatus {
        nodes_issued: agents.iter().filter(|a| a.issued()).count(),
        nodes_reporting: reporting,
        roots,
    };
    let healthy = !agents.is_empty()
        && agents.iter().all(AgentEntry::healthy)
        && ca.roots.iter().all(|r| r.not_after > now);
    let status = MeshStatus {
        healthy,
        ca,
        agents,
        enrolled_namespaces: enrolled,
    };
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&status)?),
        Output::Table => print!("{}", render(&status, now)),
    }
    Ok(if status.healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn from_lease(r: ReportedAgent, now: SystemTime) -> AgentEntry {
    let current = r.is_current(now);
    let (state, reason) = match (&r.status, current) {
        (Some(_), true) => ("reporting", None),
        (_, false) => (
            "stale",
            Some(match r.renewed {
                Some(t) => format!(
                    "last report {} ago",
                    age(now.duration_since(t).unwrap_or_default())
                ),
                None => "never reported".to_owned(),
            }),
        ),
        (None, true) => ("stale", r.problem.clone()),
    };
    AgentEntry {
        node: r.node,
        state,
        reason,
        status: r.status,
    }
}

async fn from_socket(socket: &std::path::Path) -> AgentEntry {
    match AdminClient::new(socket)
        .get_json::<AgentStatus>("/status")
        .await
    {
        Ok(status) => AgentEntry {
            node: status.node.clone(),
            state: "reporting",
            reason: None,
            status: Some(status),
        },
        Err(e) => AgentEntry {
            node: socket.display().to_string(),
            state: "unreachable",
            reason: Some(super::error_chain(&anyhow::Error::new(e))),
            status: None,
        },
    }
}

fn enrolled_namespaces(state: &ClusterState) -> Vec<String> {
    state
        .namespaces()
        .filter(|ns| ns.enrolls_pods())
        .map(|ns| ns.name.clone())
        .collect()
}

fn roots_of(pem: &str, td: &TrustDomain) -> anyhow::Result<Vec<RootStatus>> {
    let mut bundle = TrustBundle::new();
    bundle
        .add_pem(td, pem.as_bytes())
        .context("the CA roots are not a PEM bundle of CA certificates")?;
    bundle
        .roots(td)
        .iter()
        .map(|der| {
            let (_, cert) = x509_parser::parse_x509_certificate(der)
                .map_err(|e| anyhow::anyhow!("a CA root does not parse: {e}"))?;
            let secs = cert.validity().not_after.timestamp().max(0) as u64;
            Ok(RootStatus {
                trust_domain: td.to_string(),
                fingerprint_sha256: hex(zmesh_identity::bundle::Fingerprint::of(der).as_bytes()),
                not_after: SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
            })
        })
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.into()
}

/// The human form.
pub fn render(s: &MeshStatus, now: SystemTime) -> String {
    let mut out = String::new();
    out.push_str(if s.healthy {
        "zmesh: healthy\n\n"
    } else {
        "zmesh: NOT healthy (see below)\n\n"
    });
    out.push_str("CA\n");
    if s.ca.roots.is_empty() {
        out.push_str("  roots:        unknown (give --ca-bundle, or --kubernetes)\n");
    }
    for root in &s.ca.roots {
        let left = match root.not_after.duration_since(now) {
            Ok(left) => format!("in {}", age(left)),
            Err(_) => "EXPIRED".into(),
        };
        out.push_str(&format!(
            "  root:         {} sha256:{}… expires {} ({left})\n",
            root.trust_domain,
            &root.fingerprint_sha256[..16],
            zmesh_proxy::flows::FlowEvent::format_time(root.not_after),
        ));
    }
    let mut versions: Vec<&str> = s
        .agents
        .iter()
        .filter_map(|a| a.status.as_ref()?.ca_version.as_deref())
        .collect();
    versions.sort();
    versions.dedup();
    if !versions.is_empty() {
        let shown: Vec<String> = versions.iter().map(|v| format!("zmesh {v}")).collect();
        out.push_str(&format!(
            "  version:      {} (as the CA named it to the nodes)\n",
            shown.join(", ")
        ));
    }
    out.push_str(&format!(
        "  issuing:      every certificate valid and renewing on {}/{} reporting node(s)\n\n",
        s.ca.nodes_issued, s.ca.nodes_reporting
    ));
    out.push_str(&format!("Agents ({})\n", s.agents.len()));
    let headers = [
        "NODE",
        "STATE",
        "READY",
        "VERSION",
        "MODE",
        "DATA PLANE",
        "KERNEL",
        "TC",
        "PODS",
        "CERTS",
    ];
    let rows: Vec<Vec<String>> = s
        .agents
        .iter()
        .map(|a| match &a.status {
            Some(st) => vec![
                a.node.clone(),
                a.state.to_owned(),
                yes_no(st.ready),
                st.version.clone(),
                st.mode.clone(),
                st.data_plane.clone(),
                st.kernel.release.clone(),
                st.kernel.tc_attach.clone(),
                match st.pods_waiting {
                    0 => st.enrolled_pods.to_string(),
                    n => format!("{} ({n} waiting)", st.enrolled_pods),
                },
                if st.data_plane == "ztunnel" {
                    "in ztunnel".to_owned()
                } else {
                    format!("{}/{} valid", st.certificates.valid, st.certificates.total)
                },
            ],
            None => {
                let mut row = vec![a.node.clone(), a.state.to_owned()];
                row.extend(std::iter::repeat_n("-".to_owned(), headers.len() - 2));
                row
            }
        })
        .collect();
    for line in render_table(&headers, &rows).lines() {
        out.push_str("  ");
        out.push_str(line);
        out.push('\n');
    }
    let problems: Vec<String> = s
        .agents
        .iter()
        .flat_map(|a| {
            let own = a.status.iter().flat_map(|st| st.problems.iter().cloned());
            a.reason
                .iter()
                .map(|r| format!("{}: {}", a.node, r))
                .chain(own.map(move |p| format!("{}: {p}", a.node)))
                .collect::<Vec<_>>()
        })
        .collect();
    if !problems.is_empty() {
        out.push_str("\nProblems\n");
        for p in problems {
            out.push_str(&format!("  {p}\n"));
        }
    }
    if let Some(ns) = &s.enrolled_namespaces {
        out.push_str(&format!(
            "\nEnrolled namespaces ({}): {}\n",
            ns.len(),
            if ns.is_empty() {
                "-".into()
            } else {
                ns.join(", ")
            }
        ));
    }
    out
}

mod rfc3339 {
    use std::time::SystemTime;

    use serde::Serializer;

    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&zmesh_proxy::flows::FlowEvent::format_time(*t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zmesh_cluster::agent_status::{CertificateSummary, KernelStatus};

    fn agent(node: &str, data_plane: &str, ready: bool, problems: &[&str]) -> AgentEntry {
        AgentEntry {
            node: node.into(),
            state: "reporting",
            reason: None,
            status: Some(AgentStatus {
                node: node.into(),
                version: "0.1.0".into(),
                git_commit: None,
                ca_version: None,
                ready,
                mode: "strict".into(),
                data_plane: data_plane.into(),
                kernel: KernelStatus {
                    release: "6.1.0".into(),
                    tc_attach: if data_plane == "zmesh" { "tcx" } else { "none" }.into(),
                    interfaces: 2,
                },
                enrolled_pods: 3,
                pods_waiting: 0,
                certificates: CertificateSummary {
                    total: if data_plane == "zmesh" { 2 } else { 0 },
                    valid: if data_plane == "zmesh" { 2 } else { 0 },
                    ..Default::default()
                },
                problems: problems.iter().map(|p| p.to_string()).collect(),
                updated: SystemTime::UNIX_EPOCH,
            }),
        }
    }

    /// A ztunnel node's certificates are ztunnel's: the table says so rather than "0/0
    /// valid", and its problem is listed under its node.
    #[test]
    fn ztunnel_nodes_show_where_their_certificates_are() {
        let status = MeshStatus {
            healthy: false,
            ca: CaStatus {
                roots: vec![],
                nodes_issued: 2,
                nodes_reporting: 2,
            },
            agents: vec![
                agent("node1", "zmesh", true, &[]),
                agent(
                    "node2",
                    "ztunnel",
                    false,
                    &["no ztunnel is connected over ZDS"],
                ),
            ],
            enrolled_namespaces: None,
        };
        let text = render(&status, SystemTime::UNIX_EPOCH);
        let row = |node: &str| {
            text.lines()
                .find(|l| l.trim_start().starts_with(node))
                .unwrap_or_else(|| panic!("no row for {node}:\n{text}"))
                .split_whitespace()
                .collect::<Vec<_>>()
        };
        assert_eq!(
            row("node1"),
            [
                "node1",
                "reporting",
                "yes",
                "0.1.0",
                "strict",
                "zmesh",
                "6.1.0",
                "tcx",
                "3",
                "2/2",
                "valid"
            ]
        );
        assert_eq!(
            row("node2"),
            [
                "node2",
                "reporting",
                "no",
                "0.1.0",
                "strict",
                "ztunnel",
                "6.1.0",
                "none",
                "3",
                "in",
                "ztunnel"
            ]
        );
        assert!(
            text.contains("  node2: no ztunnel is connected over ZDS\n"),
            "{text}"
        );
    }
}
