//! The open inbound connections, so that a policy change, or a workload table change that
//! gives a pod other labels, can close the ones now denied (a policy that only applied to
//! new connections would leave long-lived ones open).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use zmesh_identity::SpiffeId;

use crate::authz::{AuthzRequest, Decision};
use crate::policy::Verdict;
use crate::proxy::Shared;
use crate::workloads::{Workload, WorkloadStore};

/// One open inbound connection as authorization saw it.
struct OpenTunnel {
    /// `None` for plaintext.
    source: Option<Arc<SpiffeId>>,
    source_ip: IpAddr,
    target: SocketAddr,
    destination: Arc<Workload>,
    cancel: CancellationToken,
    /// Why it was closed, set before `cancel` fires.
    closed_by: Mutex<Option<Verdict>>,
}

pub(crate) struct Tunnels {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Arc<OpenTunnel>>>,
    workloads: Arc<WorkloadStore>,
    node: String,
    /// Asks for a re-check: a connection registered with a destination older than the
    /// table in force (it may have missed the re-check of that table's change).
    stale: Notify,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section is a single map operation: the data stays consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Tunnels {
    pub fn new(workloads: Arc<WorkloadStore>, node: String) -> Self {
        Self {
            next: AtomicU64::new(0),
            open: Mutex::default(),
            workloads,
            node,
            stale: Notify::new(),
        }
    }

    /// Registers a connection before it is authorized, so that no policy change can slip
    /// between its check and its registration.
    pub fn register(
        &self,
        source: Option<Arc<SpiffeId>>,
        source_ip: IpAddr,
        target: SocketAddr,
        destination: Arc<Workload>,
    ) -> TunnelGuard<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(OpenTunnel {
            source,
            source_ip,
            target,
            destination,
            cancel: CancellationToken::new(),
            closed_by: Mutex::new(None),
        });
        lock(&self.open).insert(id, entry.clone());
        // The caller looked `destination` up before registering: if the table changed in
        // between, the re-check of that change may have run before this entry existed.
        let table = self.workloads.snapshot();
        let current = table.local_workload(target.ip(), &self.node);
        if current.is_some_and(|w| !w.same_for_policies(&entry.destination)) {
            self.stale.notify_one();
        }
        TunnelGuard {
            tunnels: self,
            id,
            entry,
        }
    }

    pub fn len(&self) -> usize {
        lock(&self.open).len()
    }

    /// Resolves when a connection registered with an outdated destination (see
    /// [`Tunnels::register`]); the permit is kept if nobody waits yet.
    pub async fn stale(&self) {
        self.stale.notified().await
    }

    /// Re-authorizes every open connection and closes those now denied; returns how many.
    pub fn recheck(&self, shared: &Shared) -> usize {
        let open: Vec<Arc<OpenTunnel>> = lock(&self.open).values().cloned().collect();
        let table = shared.workloads.snapshot();
        let mut closed = 0;
        for t in open {
            // Current labels if the pod is still here; else what it had.
            let destination = table
                .local_workload(t.target.ip(), &self.node)
                .unwrap_or(&t.destination);
            let request = AuthzRequest {
                source: t.source.as_deref(),
                source_ip: t.source_ip,
                destination,
                port: t.target.port(),
            };
            let (decision, verdict) = shared.authorizer.decide(&request);
            if let Decision::Deny { policy } = decision {
                tracing::info!(
                    src = %t.source.as_deref().map_or("-".to_owned(), ToString::to_string),
                    dst = %t.target,
                    %policy,
                    "closing an open connection: authorization now denies it"
                );
                *lock(&t.closed_by) = verdict;
                t.cancel.cancel();
                closed += 1;
            }
        }
        closed
    }
}

/// Keeps a connection registered while it lives.
pub(crate) struct TunnelGuard<'a> {
    tunnels: &'a Tunnels,
    id: u64,
    entry: Arc<OpenTunnel>,
}

impl TunnelGuard<'_> {
    /// Resolves when a policy or label change denies this connection.
    pub async fn closed_by_policy(&self) {
        self.entry.cancel.cancelled().await
    }

    /// The verdict that closed it.
    pub fn verdict(&self) -> Option<Verdict> {
        lock(&self.entry.closed_by).clone()
    }
}

impl Drop for TunnelGuard<'_> {
    fn drop(&mut self) {
        lock(&self.tunnels.open).remove(&self.id);
    }
}
