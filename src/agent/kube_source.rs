//! Kubernetes as the cluster state source: watchers on Namespaces and Pods.
//!
//! Outbound identity checks need every pod's IP, node, namespace and service account
//! cluster-wide, so remote pods are kept in compact form (no labels but the opt-out ones, no
//! annotations) and only this node's pods in full. A re-list (after a 410 Gone or an
//! outage) is buffered and swapped in whole on `InitDone`: the agent never acts on a
//! half-built cache, and nothing is published before both resources are fully listed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::runtime::utils::Backoff;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};
use tokio::sync::watch;

use super::cluster_state::{
    ClusterState, NamespaceInfo, PodInfo, CGROUP_ANNOTATION, CILIUM_MTLS_LABEL,
    ISTIO_DATAPLANE_LABEL, NETNS_ANNOTATION,
};

/// How long to wait before retrying after an API error: jittered exponential backoff.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(800),
            max: Duration::from_secs(30),
        }
    }
}

struct JitteredBackoff {
    policy: RetryPolicy,
    next: Duration,
}

impl Iterator for JitteredBackoff {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        let current = self.next;
        self.next = (current * 2).min(self.policy.max);
        // Up to 25% less, so that all nodes do not retry in lockstep after an outage.
        let jitter = rand::random_range(0.75..=1.0);
        Some(current.mul_f64(jitter))
    }
}

impl Backoff for JitteredBackoff {
    fn reset(&mut self) {
        self.next = self.policy.initial;
    }
}

/// A mirror of one resource kind, with the atomic re-list the watcher's events allow.
struct Mirror<T> {
    live: BTreeMap<(String, String), T>,
    relisting: Option<BTreeMap<(String, String), T>>,
    synced: bool,
}

impl<T: PartialEq> Mirror<T> {
    fn new() -> Self {
        Self {
            live: BTreeMap::new(),
            relisting: None,
            synced: false,
        }
    }

    /// Applies one event; returns whether the live view changed.
    fn apply<K: kube::Resource>(
        &mut self,
        event: watcher::Event<K>,
        convert: impl Fn(K) -> Option<T>,
    ) -> bool {
        let key = |k: &K| {
            let meta = k.meta();
            (
                meta.namespace.clone().unwrap_or_default(),
                meta.name.clone().unwrap_or_default(),
            )
        };
        match event {
            watcher::Event::Init => {
                self.relisting = Some(BTreeMap::new());
                false
            }
            watcher::Event::InitApply(object) => {
                let k = key(&object);
                if let (Some(buffer), Some(value)) = (self.relisting.as_mut(), convert(object)) {
                    buffer.insert(k, value);
                }
                false
            }
            watcher::Event::InitDone => {
                let fresh = self.relisting.take().unwrap_or_default();
                let changed = !self.synced || fresh != self.live;
                self.live = fresh;
                self.synced = true;
                changed
            }
            watcher::Event::Apply(object) => {
                let k = key(&object);
                match convert(object) {
                    Some(value) => {
                        let changed = self.live.get(&k) != Some(&value);
                        self.live.insert(k, value);
                        changed
                    }
                    None => self.live.remove(&k).is_some(),
                }
            }
            watcher::Event::Delete(object) => self.live.remove(&key(&object)).is_some(),
        }
    }
}

fn namespace_info(ns: Namespace) -> Option<NamespaceInfo> {
    Some(NamespaceInfo {
        name: ns.metadata.name?,
        labels: ns.metadata.labels.unwrap_or_default(),
    })
}

/// Converts a Pod, keeping full detail only for pods of `node`.
fn pod_info(pod: Pod, node: &str) -> Option<PodInfo> {
    let meta = pod.metadata;
    let spec = pod.spec?;
    let status = pod.status.unwrap_or_default();
    let mut ips = Vec::new();
    for ip in status
        .pod_ips
        .unwrap_or_default()
        .into_iter()
        .map(|p| p.ip)
        .chain(status.pod_ip)
    {
        match ip.parse() {
            Ok(ip) if !ips.contains(&ip) => ips.push(ip),
            Ok(_) => {}
            Err(_) => tracing::warn!(pod = ?meta.name, %ip, "ignoring an unparsable pod IP"),
        }
    }
    let local = spec.node_name.as_deref() == Some(node);
    let mut labels = meta.labels.unwrap_or_default();
    if !local {
        labels.retain(|k, _| k == CILIUM_MTLS_LABEL || k == ISTIO_DATAPLANE_LABEL);
    }
    let annotations = if local {
        meta.annotations.unwrap_or_default()
    } else {
        BTreeMap::new()
    };
    Some(PodInfo {
        namespace: meta.namespace?,
        name: meta.name?,
        node: spec.node_name,
        ips,
        service_account: spec
            .service_account_name
            .unwrap_or_else(|| "default".into()),
        host_network: spec.host_network.unwrap_or(false),
        labels,
        netns_path: annotations.get(NETNS_ANNOTATION).map(Into::into),
        cgroup_path: annotations.get(CGROUP_ANNOTATION).map(Into::into),
    })
}

/// Watches Namespaces and Pods and returns, once both are fully listed, a receiver of
/// consistent snapshots. Until the first complete listing this waits (retrying API errors
/// with backoff); afterwards errors keep the last good state while retrying.
pub async fn watch_kubernetes(
    client: Client,
    node: String,
    retry: RetryPolicy,
) -> watch::Receiver<Arc<ClusterState>> {
    let backoff = || JitteredBackoff {
        next: retry.initial,
        policy: retry.clone(),
    };
    let namespaces = watcher(
        Api::<Namespace>::all(client.clone()),
        watcher::Config::default(),
    )
    .backoff(backoff())
    .map(|event| Resource::Namespace(Box::new(event)))
    .boxed();
    let pods = watcher(Api::<Pod>::all(client), watcher::Config::default())
        .modify(|pod| pod.metadata.managed_fields = None)
        .backoff(backoff())
        .map(|event| Resource::Pod(Box::new(event)))
        .boxed();
    let mut events = futures::stream::select(namespaces, pods);
    let mut namespace_mirror = Mirror::new();
    let mut pod_mirror = Mirror::new();
    let mut sender: Option<watch::Sender<Arc<ClusterState>>> = None;
    let (first_tx, first_rx) = tokio::sync::oneshot::channel();
    let mut first_tx = Some(first_tx);

    tokio::spawn(async move {
        while let Some(event) = events.next().await {
            let mut changed = handle(event, &node, &mut namespace_mirror, &mut pod_mirror);
            // Apply everything already queued before publishing one snapshot for it all.
            while let Some(Some(event)) = events.next().now_or_never() {
                changed |= handle(event, &node, &mut namespace_mirror, &mut pod_mirror);
            }
            if !(changed && namespace_mirror.synced && pod_mirror.synced) {
                continue;
            }
            let state = Arc::new(ClusterState::new(
                namespace_mirror.live.values().cloned(),
                pod_mirror.live.values().cloned(),
            ));
            match (&sender, first_tx.take()) {
                (Some(tx), _) => {
                    if tx.send(state).is_err() {
                        return;
                    }
                }
                (None, Some(first)) => {
                    let (tx, rx) = watch::channel(state);
                    sender = Some(tx);
                    if first.send(rx).is_err() {
                        return;
                    }
                }
                (None, None) => return,
            }
        }
    });
    // The task only ends before its first send if the runtime shuts down.
    match first_rx.await {
        Ok(rx) => rx,
        Err(_) => std::future::pending().await,
    }
}

enum Resource {
    // Boxed: events are large and of very different sizes.
    Namespace(Box<Result<watcher::Event<Namespace>, watcher::Error>>),
    Pod(Box<Result<watcher::Event<Pod>, watcher::Error>>),
}

fn handle(
    event: Resource,
    node: &str,
    namespaces: &mut Mirror<NamespaceInfo>,
    pods: &mut Mirror<PodInfo>,
) -> bool {
    match event {
        Resource::Namespace(event) => match *event {
            Ok(event) => namespaces.apply(event, namespace_info),
            Err(e) => watch_failed(e),
        },
        Resource::Pod(event) => match *event {
            Ok(event) => pods.apply(event, |p| pod_info(p, node)),
            Err(e) => watch_failed(e),
        },
    }
}

fn watch_failed(e: watcher::Error) -> bool {
    tracing::warn!(target: "kubernetes", "watch failed, keeping the last state and retrying: {e}");
    false
}
