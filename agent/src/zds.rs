//! Stock Istio ztunnel as the data plane (`zmesh agent --data-plane ztunnel`): instead of
//! running our proxy and eBPF redirection, the agent serves ZDS (compat's [`ZdsServer`])
//! and hands ztunnel every enrolled pod of this node with its network namespace; ztunnel
//! captures inside the pod and asks the CA for the pod's certificate itself.
//!
//! A pod's ZDS uid is `<namespace>/<name>` (the cluster state carries no Kubernetes UID).
//! A pod recreated under the same name has a new network namespace: it is sent as a `del`
//! of the old one followed by an `add`.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::watch;
use zmesh_compat::zds::{Delivery, WorkloadInfo, ZdsError, ZdsHandle, ZdsServer};
use zmesh_identity::{TrustDomain, WorkloadId};

use crate::admin::{self, AdminState, CertInfo};
use crate::credentials::{RotateError, RotateFuture, WorkloadCertificates};
use crate::flows_api;
use crate::table::local_enrolled;
use zmesh_cluster::{ClusterState, PodInfo};

/// Why a pod could not be handed to ztunnel (it is retried on the next change).
#[derive(Debug, thiserror::Error)]
pub enum PodHandoverError {
    #[error("pod {pod} has no network namespace path (annotation zmesh.io/netns)")]
    NoNetnsPath { pod: String },
    #[error("pod {pod}: cannot open its network namespace {path}: {source}")]
    OpenNetns {
        pod: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("pod {pod}: {source}")]
    Zds { pod: String, source: ZdsError },
}

/// What was handed to ztunnel for one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Sent {
    info: WorkloadInfo,
    /// (device, inode) of the network namespace: a recreated pod has a new one.
    netns: (u64, u64),
    /// ztunnel refused the add: it is sent again on the next reconcile.
    refused: bool,
}

/// Keeps a ZDS server's workloads equal to the enrolled pods of one node.
pub struct ZdsReconciler {
    handle: ZdsHandle,
    trust_domain: TrustDomain,
    node: String,
    sent: BTreeMap<String, Sent>,
}

impl ZdsReconciler {
    pub fn new(handle: ZdsHandle, trust_domain: TrustDomain, node: impl Into<String>) -> Self {
        Self {
            handle,
            trust_domain,
            node: node.into(),
            sent: BTreeMap::new(),
        }
    }

    /// Sends the differences between `state` and what ztunnel has: `del` for pods that
    /// left (or were recreated), `add` for new ones. Returns the pods that could not be
    /// handed over; they are retried on the next call.
    pub async fn apply(&mut self, state: &ClusterState) -> Vec<PodHandoverError> {
        let mut problems = Vec::new();
        let mut want: BTreeMap<String, (&PodInfo, WorkloadId)> = BTreeMap::new();
        for (pod, id) in local_enrolled(state, &self.trust_domain, &self.node) {
            want.insert(pod.key().to_string(), (pod, id));
        }
        // Open every wanted namespace first, so a recreated pod is noticed by its inode.
        let mut opened: BTreeMap<String, (OwnedFd, (u64, u64), WorkloadInfo)> = BTreeMap::new();
        for (uid, (pod, id)) in &want {
            match open_netns(uid, pod) {
                Ok((fd, ns)) => {
                    let info = WorkloadInfo {
                        name: pod.name.clone(),
                        namespace: id.namespace().to_owned(),
                        service_account: id.service_account().to_owned(),
                    };
                    opened.insert(uid.clone(), (fd, ns, info));
                }
                Err(e) => problems.push(e),
            }
        }

        let gone: Vec<String> = self
            .sent
            .iter()
            .filter(|(uid, sent)| match opened.get(*uid) {
                Some((_, ns, info)) => sent.netns != *ns || sent.info != *info,
                // A pod whose namespace cannot be opened any more has gone away too.
                None => true,
            })
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in gone {
            self.sent.remove(&uid);
            tracing::info!(pod = %uid, "taking the pod away from ztunnel");
            match self.handle.del(&uid).await {
                Ok(delivery) => log_delivery("del", &uid, delivery),
                // ztunnel forgot it already; the server dropped it from its snapshot.
                Err(e) => tracing::warn!(pod = %uid, "ztunnel refused the del: {e}"),
            }
        }

        for (uid, (fd, ns, info)) in opened {
            if self.sent.get(&uid).is_some_and(|s| !s.refused) {
                continue;
            }
            tracing::info!(pod = %uid, service_account = %info.service_account, "handing the pod to ztunnel");
            match self.handle.add(&uid, info.clone(), fd).await {
                Ok(delivery) => {
                    log_delivery("add", &uid, delivery);
                    self.sent.insert(
                        uid,
                        Sent {
                            info,
                            netns: ns,
                            refused: false,
                        },
                    );
                }
                // The server keeps a refused pod for the next snapshot: remember it so
                // that it is deleted when it leaves, and retry the add.
                Err(source @ ZdsError::Nack { .. }) => {
                    self.sent.insert(
                        uid.clone(),
                        Sent {
                            info,
                            netns: ns,
                            refused: true,
                        },
                    );
                    problems.push(PodHandoverError::Zds { pod: uid, source });
                }
                Err(source) => problems.push(PodHandoverError::Zds { pod: uid, source }),
            }
        }
        for p in &problems {
            tracing::warn!("{p}");
        }
        problems
    }

    /// Applies every new cluster state until the source goes away.
    pub async fn follow(mut self, mut cluster: watch::Receiver<Arc<ClusterState>>) {
        loop {
            let state = cluster.borrow_and_update().clone();
            self.apply(&state).await;
            if cluster.changed().await.is_err() {
                return;
            }
        }
    }
}

fn log_delivery(request: &str, uid: &str, delivery: Delivery) {
    match delivery {
        Delivery::Acked => tracing::debug!(pod = %uid, request, "ztunnel acknowledged"),
        Delivery::Pending => {
            tracing::info!(pod = %uid, request, "no ztunnel connected: it gets this in its snapshot")
        }
    }
}

/// Opens the pod's network namespace; returns the fd and the namespace's identity.
fn open_netns(uid: &str, pod: &PodInfo) -> Result<(OwnedFd, (u64, u64)), PodHandoverError> {
    let path = pod
        .netns_path
        .as_ref()
        .ok_or_else(|| PodHandoverError::NoNetnsPath {
            pod: uid.to_owned(),
        })?;
    let open_err = |source| PodHandoverError::OpenNetns {
        pod: uid.to_owned(),
        path: path.clone(),
        source,
    };
    let file = std::fs::File::open(path).map_err(open_err)?;
    let meta = file.metadata().map_err(open_err)?;
    Ok((OwnedFd::from(file), (meta.dev(), meta.ino())))
}

/// The admin API's certificate view in ztunnel mode: ztunnel holds the certificates.
struct HeldByZtunnel;

const ZTUNNEL_HOLDS_CERTS: &str = "this agent runs with --data-plane ztunnel: ztunnel requests \
and renews the workload certificates itself (see ztunnel's admin port, 15000, /config_dump)";

impl WorkloadCertificates for HeldByZtunnel {
    fn ensure(&self, _: &WorkloadId) {}

    fn forget(&self, _: &WorkloadId) {}

    fn current(&self, _: &WorkloadId) -> Option<Arc<rustls::sign::CertifiedKey>> {
        None
    }

    fn resolver(&self, _: &WorkloadId) -> Arc<dyn rustls::server::ResolvesServerCert> {
        Arc::new(NoCertificate)
    }

    fn status(&self) -> Vec<CertInfo> {
        Vec::new()
    }

    fn can_rotate(&self) -> Result<(), RotateError> {
        Err(RotateError::NotOurs(ZTUNNEL_HOLDS_CERTS.to_owned()))
    }

    fn rotate<'a>(&'a self, _: &'a WorkloadId) -> RotateFuture<'a> {
        Box::pin(std::future::ready(Err(RotateError::NotOurs(
            ZTUNNEL_HOLDS_CERTS.to_owned(),
        ))))
    }
}

/// Presents nothing: this agent terminates no TLS in ztunnel mode.
#[derive(Debug)]
struct NoCertificate;

impl rustls::server::ResolvesServerCert for NoCertificate {
    fn resolve(
        &self,
        _: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        None
    }
}

/// Why the ztunnel-mode agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum ZtunnelModeError {
    #[error("ZDS: {0}")]
    Zds(#[from] ZdsError),
    #[error("admin API: {0}")]
    Admin(#[from] admin::AdminError),
}

/// Runs the agent in ztunnel mode until `shutdown`: ZDS on `zds_socket`, the admin API on
/// `admin_socket` (it says that certificates are ztunnel's).
pub async fn run_ztunnel(
    zds_socket: &std::path::Path,
    admin_socket: &std::path::Path,
    trust_domain: TrustDomain,
    node: String,
    cluster: watch::Receiver<Arc<ClusterState>>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ZtunnelModeError> {
    let server = ZdsServer::bind(zds_socket)?;
    tracing::info!(socket = %zds_socket.display(), "serving ZDS: waiting for ztunnel to connect");
    let admin_task = admin::serve(
        admin_socket,
        AdminState {
            certs: Arc::new(HeldByZtunnel),
            trust_domain: trust_domain.clone(),
            flows: Arc::new(zmesh_proxy::flows::FlowHub::new(flows_api::FLOW_HISTORY)),
        },
    )
    .await?;
    let admin_inode = admin::socket_inode(admin_socket);
    let reconciler = ZdsReconciler::new(server.handle(), trust_domain, node);
    tokio::select! {
        _ = async {
            reconciler.follow(cluster).await;
            // The source is gone (only at shutdown): ztunnel keeps the last state.
            std::future::pending::<()>().await
        } => {}
        _ = shutdown => {}
    }
    admin_task.abort();
    admin::remove_socket_if_ours(admin_socket, admin_inode);
    // Dropping the server removes its socket; ztunnel keeps its pods until a new agent
    // connects and sends a snapshot.
    drop(server);
    Ok(())
}
