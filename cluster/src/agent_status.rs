//! What each node agent reports about itself, and where `zmesh status` finds it: the admin
//! API's `GET /status` on the node, and, on Kubernetes, a Lease per agent
//! (`zmesh-agent-<node>` in the agent's namespace) that the agent renews every
//! [`REPORT_EVERY`] with its status as an annotation. A Lease not renewed for
//! [`LEASE_SECONDS`] is an agent that stopped reporting.

use std::time::{Duration, SystemTime};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// The annotation holding an agent's [`AgentStatus`] as JSON.
pub const STATUS_ANNOTATION: &str = "zmesh.io/agent-status";
/// The label on every agent Lease.
pub const LEASE_LABEL: (&str, &str) = ("app.kubernetes.io/name", "zmesh-agent");
/// How often an agent reports.
pub const REPORT_EVERY: Duration = Duration::from_secs(10);
/// How long a report counts as current.
pub const LEASE_SECONDS: i32 = 30;

/// One agent, as it reports itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStatus {
    pub node: String,
    pub version: String,
    #[serde(default)]
    pub git_commit: Option<String>,
    /// The zmesh CA's version, as it named it in its last answer to this agent.
    #[serde(default)]
    pub ca_version: Option<String>,
    /// Serving: its proxy runs, or ztunnel is fed over ZDS.
    pub ready: bool,
    /// `permissive` or `strict`.
    pub mode: String,
    /// `zmesh` (our proxy and eBPF) or `ztunnel`.
    pub data_plane: String,
    pub kernel: KernelStatus,
    /// Enrolled pods on this node, and how many of them are not in the redirection maps
    /// yet (their network namespace is not found).
    pub enrolled_pods: usize,
    pub pods_waiting: usize,
    pub certificates: CertificateSummary,
    /// What is wrong now, one line each (empty when all is well).
    pub problems: Vec<String>,
    /// When this report was made (RFC 3339).
    #[serde(with = "rfc3339")]
    pub updated: SystemTime,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelStatus {
    /// `uname -r`.
    pub release: String,
    /// How tc ingress is attached: `tcx`, `clsact`, or `none` (no eBPF redirection).
    pub tc_attach: String,
    /// Interfaces whose ingress is steered.
    pub interfaces: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateSummary {
    /// Workload certificates kept.
    pub total: usize,
    /// Valid now.
    pub valid: usize,
    /// Missing or expired: those workloads cannot make new mTLS connections.
    pub unusable: usize,
    /// Whose last renewal failed.
    pub failing: usize,
    /// When the first valid one expires.
    #[serde(default, with = "opt_rfc3339")]
    pub next_expiry: Option<SystemTime>,
}

/// An agent's Lease as `zmesh status` reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportedAgent {
    pub node: String,
    /// `None` when the annotation is missing or unreadable (the reason in `problem`).
    pub status: Option<AgentStatus>,
    pub problem: Option<String>,
    pub renewed: Option<SystemTime>,
}

impl ReportedAgent {
    /// Whether the agent reported within the lease duration before `now`.
    pub fn is_current(&self, now: SystemTime) -> bool {
        self.renewed.is_some_and(|t| {
            now.duration_since(t)
                .map_or(true, |age| age <= Duration::from_secs(LEASE_SECONDS as u64))
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("cannot list the agents' Leases in namespace {namespace}: {source}")]
    List {
        namespace: String,
        source: kube::Error,
    },
}

fn lease_name(node: &str) -> String {
    format!("zmesh-agent-{node}")
}

/// Writes every status `updates` yields (`None` until the first report) to the agent's
/// Lease in `namespace`, until the sender is gone. Failures (e.g. a role without `leases`)
/// are logged and retried with the next report: reporting never stops the agent.
pub async fn publish(
    client: Client,
    namespace: String,
    mut updates: watch::Receiver<Option<AgentStatus>>,
) {
    let api: Api<Lease> = Api::namespaced(client, &namespace);
    let mut failing = false;
    loop {
        if updates.changed().await.is_err() {
            return;
        }
        let Some(status) = updates.borrow_and_update().clone() else {
            continue;
        };
        let lease = serde_json::json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": lease_name(&status.node),
                "namespace": namespace,
                "labels": {LEASE_LABEL.0: LEASE_LABEL.1},
                "annotations": {
                    STATUS_ANNOTATION: serde_json::to_string(&status).unwrap_or_default()
                },
            },
            "spec": {
                "holderIdentity": status.node,
                "leaseDurationSeconds": LEASE_SECONDS,
                "renewTime": MicroTime(chrono_now()),
            },
        });
        let params = PatchParams::apply("zmesh-agent").force();
        match api
            .patch(&lease_name(&status.node), &params, &Patch::Apply(&lease))
            .await
        {
            Ok(_) if failing => {
                tracing::info!(target: "kubernetes", "reporting the agent's status again");
                failing = false;
            }
            Ok(_) => {}
            Err(e) if !failing => {
                tracing::warn!(
                    target: "kubernetes",
                    "cannot report the agent's status in Lease {namespace}/{} (zmesh status will \
                     show this node as not reporting; the agent needs get, create and patch on \
                     leases.coordination.k8s.io in its namespace): {e}",
                    lease_name(&status.node)
                );
                failing = true;
            }
            Err(e) => tracing::debug!(target: "kubernetes", "status report failed again: {e}"),
        }
    }
}

fn chrono_now() -> k8s_openapi::jiff::Timestamp {
    k8s_openapi::jiff::Timestamp::now()
}

/// Every agent Lease in `namespace`.
pub async fn list(client: Client, namespace: &str) -> Result<Vec<ReportedAgent>, StatusError> {
    let api: Api<Lease> = Api::namespaced(client, namespace);
    let selector = format!("{}={}", LEASE_LABEL.0, LEASE_LABEL.1);
    let leases = api
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(|source| StatusError::List {
            namespace: namespace.to_owned(),
            source,
        })?;
    let mut out: Vec<ReportedAgent> = leases.items.into_iter().map(reported).collect();
    out.sort_by(|a, b| a.node.cmp(&b.node));
    Ok(out)
}

fn reported(lease: Lease) -> ReportedAgent {
    let spec = lease.spec.unwrap_or_default();
    let node = spec
        .holder_identity
        .clone()
        .or_else(|| {
            lease
                .metadata
                .name
                .as_deref()
                .and_then(|n| n.strip_prefix("zmesh-agent-"))
                .map(str::to_owned)
        })
        .unwrap_or_default();
    let renewed = spec
        .renew_time
        .map(|t| SystemTime::UNIX_EPOCH + Duration::from_nanos(t.0.as_nanosecond().max(0) as u64));
    let annotation = lease
        .metadata
        .annotations
        .and_then(|mut a| a.remove(STATUS_ANNOTATION));
    let (status, problem) = match annotation
        .as_deref()
        .map(serde_json::from_str::<AgentStatus>)
    {
        Some(Ok(status)) => (Some(status), None),
        Some(Err(e)) => (None, Some(format!("its status report is unreadable: {e}"))),
        None => (None, Some("no status report in its Lease".to_owned())),
    };
    ReportedAgent {
        node,
        status,
        problem,
        renewed,
    }
}

mod rfc3339 {
    use std::time::SystemTime;

    use k8s_openapi::jiff::Timestamp;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        let ts = Timestamp::try_from(*t).map_err(serde::ser::Error::custom)?;
        s.serialize_str(&ts.to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let text = String::deserialize(d)?;
        text.parse::<Timestamp>()
            .map(SystemTime::from)
            .map_err(serde::de::Error::custom)
    }
}

mod opt_rfc3339 {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer};

    #[derive(Deserialize)]
    struct W(#[serde(with = "super::rfc3339")] SystemTime);

    pub fn serialize<S: Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => super::rfc3339::serialize(t, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SystemTime>, D::Error> {
        Ok(Option::<W>::deserialize(d)?.map(|w| w.0))
    }
}
