//! The agent's report about itself (`zmesh status`): served as `GET /status` on the admin
//! socket and, with `--kubernetes`, renewed in the agent's Lease (see
//! `zmesh_cluster::agent_status`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use zmesh_cluster::agent_status::{AgentStatus, CertificateSummary, KernelStatus};
use zmesh_redirect::{Redirector, TcAttach};

use crate::cni_server::EnrollmentView;
use crate::config_api::BuildInfo;
use crate::credentials::WorkloadCertificates;

/// What the report is made from.
#[derive(Clone)]
pub struct StatusSource {
    pub node: String,
    pub mode: zmesh_dataplane::Mode,
    pub build: BuildInfo,
    pub certs: Arc<dyn WorkloadCertificates>,
    /// The enrollment the reconcile loop applied last.
    pub view: watch::Receiver<Arc<EnrollmentView>>,
    /// The eBPF pins, `None` without redirection.
    pub pin_dir: Option<PathBuf>,
    /// The zmesh CA's client (`None` with SPIRE).
    pub ca: Option<zmesh_certs::IstioCaClient>,
}

impl StatusSource {
    /// The report now. Reads the pins (a few small files): call it off the data path.
    pub fn current(&self) -> AgentStatus {
        let now = SystemTime::now();
        let view = self.view.borrow().clone();
        let waiting = view.pods.values().filter(|cookie| cookie.is_none()).count();
        let mut problems = Vec::new();
        let mut certificates = CertificateSummary::default();
        for cert in self.certs.status() {
            certificates.total += 1;
            let expiry = cert
                .not_after
                .map(|secs| SystemTime::UNIX_EPOCH + Duration::from_secs(secs));
            match expiry {
                Some(at) if at > now => {
                    certificates.valid += 1;
                    certificates.next_expiry =
                        Some(certificates.next_expiry.map_or(at, |next| next.min(at)));
                }
                _ => {
                    certificates.unusable += 1;
                    problems.push(format!("no valid certificate for {}", cert.workload));
                }
            }
            if let Some(error) = &cert.last_error {
                certificates.failing += 1;
                problems.push(format!(
                    "renewing {} failed {} time(s): {error}",
                    cert.workload, cert.consecutive_failures
                ));
            }
        }
        if waiting > 0 {
            problems.push(format!(
                "{waiting} enrolled pod(s) not redirected yet (network namespace not found)"
            ));
        }
        let invalid = view.state.policy_problems().len();
        if invalid > 0 {
            problems.push(format!(
                "{invalid} invalid AuthorizationPolicy object(s) (zmesh config policies)"
            ));
        }
        AgentStatus {
            node: self.node.clone(),
            version: self.build.version.clone(),
            git_commit: self.build.git_commit.clone(),
            ca_version: self.ca.as_ref().and_then(|c| c.ca_version()),
            ready: true,
            mode: match self.mode {
                zmesh_dataplane::Mode::Permissive => "permissive".into(),
                zmesh_dataplane::Mode::Strict => "strict".into(),
            },
            data_plane: "zmesh".into(),
            kernel: kernel(self.pin_dir.as_deref()),
            enrolled_pods: view.pods.len(),
            pods_waiting: waiting,
            certificates,
            problems,
            updated: now,
        }
    }
}

fn kernel(pin_dir: Option<&std::path::Path>) -> KernelStatus {
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into());
    let attachments = pin_dir
        .and_then(|dir| Redirector::ingress_attachments(dir).ok())
        .unwrap_or_default();
    let mut modes: Vec<&str> = attachments
        .iter()
        .map(|a| match a.mode {
            TcAttach::Tcx => "tcx",
            _ => "clsact",
        })
        .collect();
    modes.sort();
    modes.dedup();
    KernelStatus {
        release,
        tc_attach: if modes.is_empty() {
            "none".into()
        } else {
            modes.join("+")
        },
        interfaces: attachments.len(),
    }
}

/// Sends a fresh report every `every` (and at once) until the receivers are gone.
pub async fn refresh(
    source: StatusSource,
    sink: watch::Sender<Option<AgentStatus>>,
    every: Duration,
) {
    loop {
        let s = source.clone();
        match tokio::task::spawn_blocking(move || s.current()).await {
            Ok(status) => {
                if sink.send(Some(status)).is_err() {
                    return;
                }
            }
            Err(e) => tracing::warn!("cannot make the status report: {e}"),
        }
        tokio::time::sleep(every).await;
    }
}
