//! The agent's report about itself (`zmesh status`): served as `GET /status` on the admin
//! socket and, with `--kubernetes`, renewed in the agent's Lease (see
//! `zmesh_cluster::agent_status`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use zmesh_cluster::agent_status::{AgentStatus, CertificateSummary, KernelStatus};
use zmesh_redirect::{Redirector, TcAttach};

use zmesh_compat::zds::ZdsHandle;

use crate::cni_server::EnrollmentView;
use crate::config_api::BuildInfo;
use crate::credentials::WorkloadCertificates;
use crate::zds::HandoverReport;

/// What the report is made from.
#[derive(Clone)]
pub struct StatusSource {
    pub node: String,
    pub mode: zmesh_dataplane::Mode,
    pub build: BuildInfo,
    /// The zmesh CA's client (`None` with SPIRE, or when ztunnel talks to the CA).
    pub ca: Option<zmesh_certs::IstioCaClient>,
    pub data_plane: DataPlaneSource,
}

/// Where the data plane's half of the report comes from.
#[derive(Clone)]
pub enum DataPlaneSource {
    /// zmesh's proxy and eBPF programs.
    Zmesh {
        certs: Arc<dyn WorkloadCertificates>,
        /// The enrollment the reconcile loop applied last.
        view: watch::Receiver<Arc<EnrollmentView>>,
        /// The eBPF pins, `None` without redirection.
        pin_dir: Option<PathBuf>,
        /// The data path process, when the proxy runs in one.
        link: Option<crate::datapath::link::DataPathLink>,
    },
    /// A stock ztunnel fed over ZDS: it holds the certificates and the traffic.
    Ztunnel {
        zds: ZdsHandle,
        handover: watch::Receiver<HandoverReport>,
    },
}

impl StatusSource {
    /// The report now (zmesh's reads the pins, a few small files: off the runtime).
    pub async fn report(&self) -> Result<AgentStatus, String> {
        match &self.data_plane {
            DataPlaneSource::Zmesh {
                certs,
                view,
                pin_dir,
                link,
            } => {
                let (source, certs, view, pin_dir) =
                    (self.clone(), certs.clone(), view.clone(), pin_dir.clone());
                let link = link.as_ref().map(|l| (l.state(), l.socket().to_owned()));
                let mut report = tokio::task::spawn_blocking(move || {
                    source.zmesh(&*certs, &view.borrow(), pin_dir.as_deref())
                })
                .await
                .map_err(|e| e.to_string())?;
                if let Some((state, socket)) = link {
                    if let Some(problem) = link_problem(&state, &socket) {
                        report.ready = false;
                        report.problems.insert(0, problem);
                    }
                }
                Ok(report)
            }
            DataPlaneSource::Ztunnel { zds, handover } => {
                let connected = *zds.connected().borrow();
                let last_error = zds.status().await.last_error.map(|e| e.to_string());
                let handover = handover.borrow().clone();
                Ok(self.ztunnel(connected, last_error, handover))
            }
        }
    }

    fn zmesh(
        &self,
        certs: &dyn WorkloadCertificates,
        view: &EnrollmentView,
        pin_dir: Option<&std::path::Path>,
    ) -> AgentStatus {
        let now = SystemTime::now();
        let waiting = view.pods.values().filter(|cookie| cookie.is_none()).count();
        let mut problems = Vec::new();
        let mut certificates = CertificateSummary::default();
        for cert in certs.status() {
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
            ready: true,
            data_plane: "zmesh".into(),
            kernel: kernel(pin_dir),
            enrolled_pods: view.pods.len(),
            pods_waiting: waiting,
            certificates,
            problems,
            ..self.common(now)
        }
    }

    /// ztunnel holds the certificates and the connections (`istioctl ztunnel-config`):
    /// this agent reports whether one is connected and what it handed over.
    fn ztunnel(
        &self,
        connected: bool,
        last_error: Option<String>,
        handover: HandoverReport,
    ) -> AgentStatus {
        let mut problems = Vec::new();
        if !connected {
            problems.push(match last_error {
                Some(e) => format!(
                    "no ztunnel is connected over ZDS (last error: {e}): enrolled pods cannot \
                     connect until one is"
                ),
                None => "no ztunnel is connected over ZDS: enrolled pods cannot connect until \
                         one is"
                    .into(),
            });
        }
        problems.extend(handover.failed.iter().cloned());
        AgentStatus {
            ready: connected,
            data_plane: "ztunnel".into(),
            kernel: kernel(None),
            enrolled_pods: handover.enrolled,
            pods_waiting: handover.failed.len().min(handover.enrolled),
            certificates: CertificateSummary::default(),
            problems,
            ..self.common(SystemTime::now())
        }
    }

    /// The fields that do not depend on the data plane (the rest are placeholders).
    fn common(&self, now: SystemTime) -> AgentStatus {
        AgentStatus {
            node: self.node.clone(),
            version: self.build.version.clone(),
            git_commit: self.build.git_commit.clone(),
            ca_version: self.ca.as_ref().and_then(|c| c.ca_version()),
            ready: false,
            mode: match self.mode {
                zmesh_dataplane::Mode::Permissive => "permissive".into(),
                zmesh_dataplane::Mode::Strict => "strict".into(),
            },
            data_plane: String::new(),
            kernel: kernel(None),
            enrolled_pods: 0,
            pods_waiting: 0,
            certificates: CertificateSummary::default(),
            problems: Vec::new(),
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
        match source.report().await {
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

/// What to say when the data path process is not connected: the proxy there keeps serving
/// what it was last given, but this agent's changes do not reach it.
fn link_problem(
    state: &crate::datapath::link::LinkState,
    socket: &std::path::Path,
) -> Option<String> {
    use crate::datapath::link::LinkState;
    match state {
        LinkState::Connected { .. } => None,
        LinkState::Connecting { last_error } => Some(format!(
            "the data path process ({}) is not connected{}: it serves with what it was last \
             sent, if anything, and no change reaches it",
            socket.display(),
            last_error
                .as_ref()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::link::LinkState;

    #[test]
    fn a_data_path_out_of_reach_is_a_problem_with_the_reason() {
        let socket = std::path::Path::new("/var/run/zmesh/datapath.sock");
        assert_eq!(
            link_problem(
                &LinkState::Connected {
                    pid: 7,
                    generation: 1
                },
                socket
            ),
            None
        );
        let problem = link_problem(
            &LinkState::Connecting {
                last_error: Some("cannot connect: No such file or directory".into()),
            },
            socket,
        )
        .expect("a problem");
        assert!(
            problem.contains("/var/run/zmesh/datapath.sock"),
            "{problem}"
        );
        assert!(problem.contains("No such file or directory"), "{problem}");
        assert!(problem.contains("not connected"), "{problem}");
    }
}
