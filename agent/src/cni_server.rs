//! The agent's side of the zmesh CNI plugin (`cni/`; the protocol is
//! [`zmesh_cni::protocol`]). The runtime runs the plugin when it creates a pod's sandbox,
//! before any container of the pod starts; the plugin asks us over a unix socket and the
//! pod's start waits for our answer. We answer ADD only once the pod's network namespace is
//! in the redirection maps (or once we know the pod is not to be enrolled), so that no
//! connection of a starting pod leaves in plaintext.
//!
//! ADD also tells us where the pod's network namespace is (`CNI_NETNS`): it goes into the
//! [`NetnsRegistry`], which takes precedence over the scan of /proc (the pod has no process
//! yet at this point), and the reconcile loop is woken to enroll it at once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::{watch, Notify};
use zmesh_cluster::state::PodKey;
use zmesh_cluster::ClusterState;
use zmesh_cni::protocol::{self, Command, Outcome, Reply, Request};

use crate::discovery::NetnsRegistry;
use crate::local_socket;

/// How long an ADD may wait for the pod to be enrolled: less than the plugin's default
/// `agent_timeout_seconds` (30), so that the plugin gets our reason rather than a timeout.
pub const ADD_WAIT: Duration = Duration::from_secs(25);
/// How long a client may take to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// What the reconcile loop last applied, for the CNI server to answer from.
#[derive(Debug, Clone)]
pub struct EnrollmentView {
    pub state: Arc<ClusterState>,
    /// Enrolled pods of this node (`namespace/name`) -> the network namespace cookie in the
    /// redirection maps (`None`: its namespace is not found yet).
    pub pods: BTreeMap<String, Option<u64>>,
    /// Whether this agent redirects traffic (without it there is no namespace to wait for).
    pub redirecting: bool,
    /// The reconcile pass that published this view (its number in [`CniServer::passes`]).
    pub pass: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum CniServerError {
    #[error("cannot serve the CNI plugin's socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What the server needs from the rest of the agent.
#[derive(Clone)]
pub struct CniServer {
    pub node: String,
    pub registry: NetnsRegistry,
    /// Published by the reconcile loop after each pass.
    pub view: watch::Receiver<Arc<EnrollmentView>>,
    /// Wakes the reconcile loop (a new namespace was registered).
    pub wake: Arc<Notify>,
    /// How many reconcile passes have started: a pass that starts after a request sees
    /// the pod's host-side interface, which the runtime made before calling us.
    pub passes: Arc<AtomicU64>,
}

/// Serves the plugin on `path` (mode 0600: only root, which the runtime runs plugins as)
/// until the task is dropped. A stale socket from a crashed agent is replaced.
pub fn serve(
    path: &Path,
    server: CniServer,
) -> Result<tokio::task::JoinHandle<()>, CniServerError> {
    let listener = local_socket::bind_private(path).map_err(|source| CniServerError::Bind {
        path: path.to_owned(),
        source,
    })?;
    Ok(local_socket::accept_each(listener, "CNI", move |stream| {
        handle(stream, server.clone())
    }))
}

async fn handle(stream: UnixStream, server: CniServer) {
    let (read, mut write) = stream.into_split();
    let reply = match tokio::time::timeout(REQUEST_TIMEOUT, read_request(read)).await {
        Ok(Ok(request)) => answer(&server, request).await,
        Ok(Err(why)) => reply(Outcome::Error, format!("bad request: {why}")),
        Err(_) => reply(Outcome::Error, "no request within 5 s".into()),
    };
    // The plugin may have given up meanwhile: nothing to do about a failed write.
    let _ = write.write_all(&protocol::encode(&reply)).await;
    let _ = write.shutdown().await;
}

async fn read_request(read: tokio::net::unix::OwnedReadHalf) -> Result<Request, String> {
    let mut line = Vec::new();
    let mut limited = BufReader::new(read).take(protocol::MAX_MESSAGE_BYTES as u64);
    limited
        .read_until(b'\n', &mut line)
        .await
        .map_err(|e| e.to_string())?;
    if line.last() != Some(&b'\n') {
        return Err(if line.len() >= protocol::MAX_MESSAGE_BYTES {
            format!("longer than {} bytes", protocol::MAX_MESSAGE_BYTES)
        } else {
            "no complete line".into()
        });
    }
    serde_json::from_slice(&line).map_err(|e| e.to_string())
}

fn reply(outcome: Outcome, message: String) -> Reply {
    Reply { outcome, message }
}

async fn answer(server: &CniServer, request: Request) -> Reply {
    let pod = &request.pod;
    let key = format!("{}/{}", pod.namespace, pod.name);
    if pod.namespace.is_empty() || pod.name.is_empty() {
        return reply(Outcome::Error, "the request names no pod".into());
    }
    match request.command {
        Command::Add => {
            if request.netns.is_empty() {
                return reply(Outcome::Error, format!("ADD for {key} without a netns"));
            }
            if !pod.uid.is_empty() {
                server.registry.register_with_ips(
                    pod.uid.clone(),
                    request.netns.clone(),
                    request.ips.clone(),
                );
            }
            tracing::info!(pod = %key, netns = %request.netns, uid = %pod.uid, "CNI ADD: enrolling before the pod starts");
            let passes_before = server.passes.load(Ordering::SeqCst);
            server.wake.notify_one();
            let started = tokio::time::Instant::now();
            let answer = wait_for_decision(server, pod, passes_before, ADD_WAIT).await;
            tracing::info!(pod = %key, outcome = ?answer.outcome, waited_ms = started.elapsed().as_millis() as u64, "CNI ADD answered: {}", answer.message);
            answer
        }
        Command::Check => {
            let view = server.view.borrow().clone();
            match decide(&view, pod, &server.node) {
                Decision::Enrolled(m) => reply(Outcome::Enrolled, m),
                Decision::NotEnrolled(m) => reply(Outcome::NotEnrolled, m),
                Decision::Pending(m) => reply(Outcome::Error, m),
            }
        }
        Command::Del => {
            if !pod.uid.is_empty() {
                server.registry.forget(&pod.uid);
            }
            tracing::info!(pod = %key, "CNI DEL: forgot the pod's network namespace");
            server.wake.notify_one();
            reply(Outcome::NotEnrolled, format!("{key} forgotten"))
        }
    }
}

/// Waits until the pod is enrolled or known not to be, at most `wait`. A pod outside the
/// mesh still waits for a pass that started after `passes_before`: that pass steers its
/// host-side interface, so its plaintext to enrolled pods on this node is steered (and in
/// strict mode refused) from its first packet.
async fn wait_for_decision(
    server: &CniServer,
    pod: &protocol::Pod,
    passes_before: u64,
    wait: Duration,
) -> Reply {
    let mut view = server.view.clone();
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let current = view.borrow_and_update().clone();
        let why = match decide(&current, pod, &server.node) {
            Decision::Enrolled(m) => return reply(Outcome::Enrolled, m),
            Decision::NotEnrolled(m) if !current.redirecting || current.pass > passes_before => {
                return reply(Outcome::NotEnrolled, m)
            }
            Decision::NotEnrolled(m) => format!("{m}, and its interface is not steered yet"),
            Decision::Pending(why) => why,
        };
        match tokio::time::timeout_at(deadline, view.changed()).await {
            Ok(Ok(())) => continue,
            Ok(Err(_)) => return reply(Outcome::Error, "the agent is shutting down".into()),
            Err(_) => {
                return reply(
                    Outcome::Error,
                    format!("not enrolled within {}s: {why}", wait.as_secs()),
                )
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Decision {
    Enrolled(String),
    NotEnrolled(String),
    /// Not yet known either way; why.
    Pending(String),
}

fn decide(view: &EnrollmentView, pod: &protocol::Pod, node: &str) -> Decision {
    let key = format!("{}/{}", pod.namespace, pod.name);
    match view.state.namespace(&pod.namespace) {
        None => {
            return Decision::Pending(format!(
                "namespace {} is not known to the agent yet",
                pod.namespace
            ))
        }
        Some(ns) if !ns.enrolls_pods() => {
            return Decision::NotEnrolled(format!("namespace {} is not enrolled", pod.namespace))
        }
        Some(_) => {}
    }
    let pod_key = PodKey {
        namespace: pod.namespace.clone(),
        name: pod.name.clone(),
    };
    let Some(info) = view.state.pod(&pod_key) else {
        return Decision::Pending(format!("pod {key} is not known to the agent yet"));
    };
    if let Some(known) = info.uid.as_deref() {
        if !pod.uid.is_empty() && known != pod.uid {
            return Decision::Pending(format!(
                "the agent still knows an older pod {key} (uid {known}, not {})",
                pod.uid
            ));
        }
    }
    if !view.state.is_enrolled(info) {
        return Decision::NotEnrolled(format!("pod {key} opted out or uses the host network"));
    }
    if info.node.as_deref() != Some(node) {
        return Decision::Pending(format!(
            "pod {key} is scheduled on {}, not on this node ({node})",
            info.node.as_deref().unwrap_or("no node")
        ));
    }
    match view.pods.get(&key) {
        Some(Some(cookie)) => Decision::Enrolled(format!("{key} enrolled (netns cookie {cookie})")),
        Some(None) if !view.redirecting => {
            Decision::Enrolled(format!("{key} enrolled (this node does not redirect)"))
        }
        _ => Decision::Pending(format!("{key}'s network namespace is not enrolled yet")),
    }
}

#[cfg(test)]
mod tests;
