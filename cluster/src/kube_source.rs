//! Kubernetes as the cluster state source: watchers on Namespaces, Pods, Services,
//! EndpointSlices and Istio `AuthorizationPolicy` objects.
//!
//! Outbound identity checks need every pod's IP, node, namespace and service account
//! cluster-wide, and Service selectors match remote pods by their labels, so remote pods are
//! kept in compact form (labels, readiness and named ports, but no node-local paths) and
//! only this node's pods in full. A re-list (after a 410 Gone or an outage) is buffered and
//! swapped in whole on `InitDone`: the agent never acts on a half-built cache, and nothing is
//! published before every resource is fully listed.
//!
//! Services (v1) are watched cluster-wide, like pods: a pod dials Services of any namespace.
//! EndpointSlices (`discovery.k8s.io/v1`) give the endpoints of Services without a selector.
//! A Service or slice that cannot be used (ExternalName, FQDN addresses, a bad field) is
//! logged with its namespace/name and field, and left out. An API server that does not
//! serve EndpointSlices (404) is warned about once: the state is published without slices,
//! and the API is asked again with backoff, as for the policy CRD below.
//!
//! Authorization policies (`security.istio.io/v1`, else `v1beta1`) are parsed one object at
//! a time with the proxy's [`Policy`] parser. An object that does not parse is reported
//! (namespace/name and field paths) and never silently weakens enforcement: its last good
//! version stays in force; if it never had one, a fail-closed stand-in takes its place for
//! the workloads it selects (an invalid DENY denies everything, an invalid ALLOW allows
//! nothing, as ztunnel drops the rules it cannot enforce), except AUDIT/CUSTOM objects,
//! which never decide traffic. If the CRD is not installed (404 for both versions), there
//! can be no policies: the state is published without any, and the API is asked again with
//! backoff until the CRD appears. Any other error (403, 500) blocks the first snapshot like
//! a pod listing error would: starting without policies that exist would fail open.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::BoxStream;
use futures::{FutureExt, Stream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, TypeMeta};
use kube::runtime::utils::Backoff;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};
use tokio::sync::{mpsc, watch};
use zmesh_proxy::policy::{Policy, PolicyErrors, PolicySet};

use crate::services::{EndpointSliceInfo, ServiceInfo};
use crate::state::{ClusterState, NamespaceInfo, PodInfo, PolicyProblem};

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

impl JitteredBackoff {
    fn new(policy: &RetryPolicy) -> Self {
        Self {
            next: policy.initial,
            policy: policy.clone(),
        }
    }
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

    /// Applies one event; returns whether the live view changed. `convert` also gets the
    /// live value of the same object, if any.
    fn apply<K: kube::Resource>(
        &mut self,
        event: watcher::Event<K>,
        convert: impl Fn(K, Option<&T>) -> Option<T>,
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
                if let (Some(buffer), Some(value)) =
                    (self.relisting.as_mut(), convert(object, self.live.get(&k)))
                {
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
                match convert(object, self.live.get(&k)) {
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

    /// The resource does not exist in this cluster: an empty, complete listing.
    fn absent(&mut self) -> bool {
        self.relisting = None;
        let changed = !self.synced || !self.live.is_empty();
        self.live.clear();
        self.synced = true;
        changed
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
    let name = pod.metadata.name.clone();
    match PodInfo::from_pod(pod) {
        Ok(info) if info.node.as_deref() == Some(node) => Some(info),
        Ok(info) => Some(info.compact()),
        Err(e) => {
            tracing::warn!(target: "kubernetes", pod = ?name, "pod ignored: {e}");
            None
        }
    }
}

fn object_id(meta: &kube::api::ObjectMeta) -> String {
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or("default"),
        meta.name.as_deref().unwrap_or("")
    )
}

fn service_info(service: Service) -> Option<ServiceInfo> {
    let id = object_id(&service.metadata);
    ServiceInfo::from_service(service)
        .inspect_err(
            |e| tracing::warn!(target: "kubernetes", service = %id, "Service ignored: {e}"),
        )
        .ok()
}

fn endpoint_slice_info(slice: EndpointSlice) -> Option<EndpointSliceInfo> {
    let id = object_id(&slice.metadata);
    EndpointSliceInfo::from_endpoint_slice(slice)
        .inspect_err(|e| {
            tracing::warn!(target: "kubernetes", endpointslice = %id, "EndpointSlice ignored: {e}")
        })
        .ok()
}

/// The versions of Istio's `AuthorizationPolicy` that share the schema, newest first.
const POLICY_VERSIONS: [&str; 2] = ["v1", "v1beta1"];

fn policy_resource(version: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("security.istio.io", version, "AuthorizationPolicy"),
        "authorizationpolicies",
    )
}

/// Every problem of a policy object, with field paths.
fn policy_problems(errors: &PolicyErrors) -> String {
    errors
        .0
        .iter()
        .map(|e| {
            if e.path.is_empty() {
                e.kind.to_string()
            } else {
                format!("{}: {}", e.path, e.kind)
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// A policy object as the agent holds it: what it enforces (`None`: nothing), and what is
/// wrong with the object if it is invalid.
#[derive(Debug, Clone, PartialEq)]
struct PolicyEntry {
    policy: Option<Policy>,
    problem: Option<PolicyProblem>,
}

/// Parses a policy object. An invalid one keeps `last_good`, or else becomes its
/// fail-closed stand-in (see the module docs); either way the problem is noted.
fn policy_info(object: DynamicObject, last_good: Option<&PolicyEntry>) -> Option<PolicyEntry> {
    let last_good = last_good.and_then(|e| e.policy.as_ref());
    let id = format!(
        "{}/{}",
        object.metadata.namespace.as_deref().unwrap_or("default"),
        object.metadata.name.as_deref().unwrap_or("")
    );
    let problem = |reason: &str, enforced: &str| {
        Some(PolicyProblem {
            policy: id.clone(),
            namespace: Some(
                object
                    .metadata
                    .namespace
                    .clone()
                    .unwrap_or_else(|| "default".into()),
            ),
            reason: reason.to_owned(),
            enforced: enforced.to_owned(),
        })
    };
    let value = match serde_json::to_value(&object) {
        Ok(value) => value,
        Err(e) => {
            tracing::warn!(target: "kubernetes", policy = %id, "AuthorizationPolicy cannot be read: {e}");
            return Some(PolicyEntry {
                policy: last_good.cloned(),
                problem: problem(
                    &format!("cannot be read: {e}"),
                    "its last good version, if any",
                ),
            });
        }
    };
    let problems = match Policy::from_json(&value) {
        Ok(policy) => {
            return Some(PolicyEntry {
                policy: Some(policy),
                problem: None,
            })
        }
        Err(errors) => policy_problems(&errors),
    };
    if let Some(last_good) = last_good {
        tracing::warn!(
            target: "kubernetes",
            policy = %id,
            "AuthorizationPolicy is invalid, its last good version stays in force: {problems}"
        );
        return Some(PolicyEntry {
            policy: Some(last_good.clone()),
            problem: problem(&problems, "its last good version"),
        });
    }
    match fail_closed(&value) {
        Some(stand_in) => {
            tracing::warn!(
                target: "kubernetes",
                policy = %id,
                action = ?stand_in.action(),
                "AuthorizationPolicy is invalid; enforcing it fail-closed (DENY: deny all, \
                 ALLOW: allow nothing) for the workloads it selects: {problems}"
            );
            let enforced = match stand_in.action() {
                zmesh_proxy::policy::Action::Deny => "fail-closed: DENY everything it selects",
                _ => "fail-closed: ALLOW nothing for what it selects",
            };
            Some(PolicyEntry {
                policy: Some(stand_in),
                problem: problem(&problems, enforced),
            })
        }
        None => {
            tracing::warn!(
                target: "kubernetes",
                policy = %id,
                "AuthorizationPolicy is invalid and skipped: {problems}"
            );
            Some(PolicyEntry {
                policy: None,
                problem: problem(
                    &problems,
                    "nothing (AUDIT and CUSTOM policies decide no traffic)",
                ),
            })
        }
    }
}

/// The stand-in of an invalid policy that never had a good version: same name and
/// selector (or the whole namespace if the selector is bad too), DENY with a rule that
/// matches everything, or ALLOW without rules. `None` for AUDIT and CUSTOM policies (they
/// never allow or deny traffic) and for objects without a usable name.
fn fail_closed(value: &serde_json::Value) -> Option<Policy> {
    use serde_json::{json, Value};
    let spec = value.get("spec");
    let action = match spec.and_then(|s| s.get("action")) {
        None | Some(Value::Null) => "ALLOW",
        Some(Value::String(a)) if a == "ALLOW" || a == "DENY" => a.as_str(),
        // AUDIT, CUSTOM: they do not decide traffic. A malformed action could be meant
        // either way: denying is the safe reading.
        Some(Value::String(a)) if a == "AUDIT" || a == "CUSTOM" => return None,
        Some(_) => "DENY",
    };
    let meta = value.get("metadata")?;
    let mut stand_in = json!({
        "apiVersion": value.get("apiVersion")?,
        "kind": "AuthorizationPolicy",
        "metadata": {
            "name": meta.get("name")?,
            "namespace": meta.get("namespace").cloned().unwrap_or(Value::Null),
        },
        "spec": {"action": action, "rules": if action == "DENY" { json!([{}]) } else { json!([]) }},
    });
    if let Some(selector) = spec.and_then(|s| s.get("selector")) {
        stand_in["spec"]["selector"] = selector.clone();
        if let Ok(policy) = Policy::from_json(&stand_in) {
            return Some(policy);
        }
        // The selector is what is wrong: cover the whole namespace rather than nothing.
        stand_in["spec"]
            .as_object_mut()
            .map(|spec| spec.remove("selector"));
    }
    Policy::from_json(&stand_in).ok()
}

/// What the watcher of a resource the API server may not serve reports.
enum OptionalUpdate<K> {
    // Boxed: an object is much larger than the other variants.
    Event(Box<watcher::Event<K>>),
    Failed(watcher::Error),
    /// The API server serves none of the resource's versions: there are no such objects
    /// (for now).
    NotServed,
}

/// Whether the initial list failed with 404. A real API server answers a group or version
/// it does not serve (a CRD not installed, EndpointSlice v1 before Kubernetes 1.21) with a
/// plain-text `404 page not found`, not a `Status` with reason NotFound: kube then reports
/// an unparsed status whose code alone says 404.
fn is_not_found(e: &watcher::Error) -> bool {
    matches!(
        e,
        watcher::Error::InitialListFailed(kube::Error::Api(status))
            if status.is_not_found() || status.code == 404
    )
}

type EventStream<K> = BoxStream<'static, Result<watcher::Event<K>, watcher::Error>>;

/// One way to watch a resource: how logs name it, and how to start the watch.
struct Candidate<K> {
    name: String,
    start: Box<dyn Fn() -> EventStream<K> + Send + Sync>,
}

/// Watches the first of `candidates` the API server serves (a 404 on the initial list
/// means not served). While none is, reports [`OptionalUpdate::NotServed`], calls
/// `not_served` the first time, and asks again with backoff.
async fn watch_optional<K: Send + 'static>(
    candidates: Vec<Candidate<K>>,
    retry: RetryPolicy,
    tx: mpsc::UnboundedSender<OptionalUpdate<K>>,
    not_served: impl FnOnce(),
) {
    let mut backoff = JitteredBackoff::new(&retry);
    let mut not_served = Some(not_served);
    'candidates: loop {
        for candidate in &candidates {
            let mut events = (candidate.start)();
            let mut served = false;
            while let Some(event) = events.next().await {
                let update = match event {
                    Err(e) if !served && is_not_found(&e) => break,
                    Err(e) => OptionalUpdate::Failed(e),
                    Ok(event) => {
                        if matches!(
                            event,
                            watcher::Event::InitApply(_) | watcher::Event::InitDone
                        ) && !served
                        {
                            served = true;
                            tracing::info!(target: "kubernetes", "watching {}", candidate.name);
                        }
                        OptionalUpdate::Event(Box::new(event))
                    }
                };
                if tx.send(update).is_err() {
                    return;
                }
            }
            if served {
                // The watcher retries by itself and never ends; should it end anyway,
                // start over from the first candidate (re-listing everything).
                continue 'candidates;
            }
        }
        let delay = backoff.next().unwrap_or(retry.max);
        if let Some(report) = not_served.take() {
            report();
        }
        if tx.send(OptionalUpdate::NotServed).is_err() {
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = tx.closed() => return,
        }
    }
}

/// Watches `AuthorizationPolicy` objects in the first version the API serves. While the
/// CRD is not installed, reports so and asks again with backoff.
async fn watch_policies(
    client: Client,
    retry: RetryPolicy,
    tx: mpsc::UnboundedSender<OptionalUpdate<DynamicObject>>,
) {
    let candidates = POLICY_VERSIONS
        .into_iter()
        .map(|version| {
            let client = client.clone();
            let retry = retry.clone();
            let start = move || {
                let resource = policy_resource(version);
                let types = TypeMeta {
                    api_version: resource.api_version.clone(),
                    kind: resource.kind.clone(),
                };
                watcher(
                    Api::<DynamicObject>::all_with(client.clone(), &resource),
                    watcher::Config::default(),
                )
                .modify(move |object| {
                    object.metadata.managed_fields = None;
                    // List items may come without their type; the parser checks it.
                    object.types.get_or_insert_with(|| types.clone());
                })
                .backoff(JitteredBackoff::new(&retry))
                .boxed()
            };
            Candidate {
                name: format!("security.istio.io/{version} AuthorizationPolicy"),
                start: Box::new(start) as Box<dyn Fn() -> EventStream<DynamicObject> + Send + Sync>,
            }
        })
        .collect();
    watch_optional(candidates, retry, tx, || {
        tracing::info!(
            target: "kubernetes",
            "the AuthorizationPolicy CRD (security.istio.io) is not installed: no \
             authorization policies; checking again with backoff"
        );
    })
    .await;
}

/// Watches `discovery.k8s.io/v1` EndpointSlices. An API server that does not serve them
/// is warned about once and asked again with backoff.
async fn watch_endpoint_slices(
    client: Client,
    retry: RetryPolicy,
    tx: mpsc::UnboundedSender<OptionalUpdate<EndpointSlice>>,
) {
    let watch_retry = retry.clone();
    let start = move || {
        watcher(
            Api::<EndpointSlice>::all(client.clone()),
            watcher::Config::default(),
        )
        .modify(|slice| slice.metadata.managed_fields = None)
        .backoff(JitteredBackoff::new(&watch_retry))
        .boxed()
    };
    let candidates = vec![Candidate {
        name: "discovery.k8s.io/v1 EndpointSlice".to_owned(),
        start: Box::new(start) as Box<dyn Fn() -> EventStream<EndpointSlice> + Send + Sync>,
    }];
    watch_optional(candidates, retry, tx, || {
        tracing::warn!(
            target: "kubernetes",
            "the API server does not serve discovery.k8s.io/v1 EndpointSlice: Services \
             without a selector have no endpoints; checking again with backoff"
        );
    })
    .await;
}

/// Which kinds of objects to watch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kinds {
    /// Namespaces, Pods, Services, EndpointSlices and AuthorizationPolicies.
    All,
    /// Namespaces and Pods.
    PlacementOnly,
}

/// Watches Namespaces, Pods, Services, EndpointSlices and AuthorizationPolicies and
/// returns, once all are fully listed (or the policy CRD, or EndpointSlices, are known not
/// to be served), a receiver of consistent snapshots. Until then this waits (retrying API
/// errors with backoff); afterwards errors keep the last good state while retrying.
pub async fn watch_kubernetes(
    client: Client,
    node: String,
    retry: RetryPolicy,
) -> watch::Receiver<Arc<ClusterState>> {
    watch_cluster(client, node, retry, Kinds::All).await
}

/// Like [`watch_kubernetes`] without policies, Services and EndpointSlices (they stay empty
/// in every snapshot): for the CA, which only places workloads on nodes and may not read
/// them.
pub async fn watch_placement(
    client: Client,
    node: String,
    retry: RetryPolicy,
) -> watch::Receiver<Arc<ClusterState>> {
    watch_cluster(client, node, retry, Kinds::PlacementOnly).await
}

async fn watch_cluster(
    client: Client,
    node: String,
    retry: RetryPolicy,
    kinds: Kinds,
) -> watch::Receiver<Arc<ClusterState>> {
    let namespaces = watcher(
        Api::<Namespace>::all(client.clone()),
        watcher::Config::default(),
    )
    .backoff(JitteredBackoff::new(&retry))
    .map(|event| Resource::Namespace(Box::new(event)))
    .boxed();
    let pods = watcher(Api::<Pod>::all(client.clone()), watcher::Config::default())
        .modify(|pod| pod.metadata.managed_fields = None)
        .backoff(JitteredBackoff::new(&retry))
        .map(|event| Resource::Pod(Box::new(event)))
        .boxed();
    let mut mirrors = Mirrors {
        namespaces: Mirror::new(),
        pods: Mirror::new(),
        policies: Mirror::new(),
        services: Mirror::new(),
        slices: Mirror::new(),
    };
    let mut streams = vec![namespaces, pods];
    match kinds {
        Kinds::All => {
            streams.push(
                watcher(
                    Api::<Service>::all(client.clone()),
                    watcher::Config::default(),
                )
                .modify(|service| service.metadata.managed_fields = None)
                .backoff(JitteredBackoff::new(&retry))
                .map(|event| Resource::Service(Box::new(event)))
                .boxed(),
            );
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(watch_endpoint_slices(client.clone(), retry.clone(), tx));
            streams.push(receiver_stream(rx).map(Resource::EndpointSlice).boxed());
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(watch_policies(client, retry.clone(), tx));
            streams.push(receiver_stream(rx).map(Resource::Policy).boxed());
        }
        Kinds::PlacementOnly => {
            // Never read: complete and empty from the start.
            mirrors.policies.absent();
            mirrors.services.absent();
            mirrors.slices.absent();
        }
    }
    let mut events = futures::stream::select_all(streams);
    let mut sender: Option<watch::Sender<Arc<ClusterState>>> = None;
    let (first_tx, first_rx) = tokio::sync::oneshot::channel();
    let mut first_tx = Some(first_tx);

    tokio::spawn(async move {
        while let Some(event) = events.next().await {
            let mut changed = mirrors.handle(event, &node);
            // Apply everything already queued before publishing one snapshot for it all.
            while let Some(Some(event)) = events.next().now_or_never() {
                changed |= mirrors.handle(event, &node);
            }
            if !(changed && mirrors.synced()) {
                continue;
            }
            let state = Arc::new(mirrors.state());
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

fn receiver_stream<T: Send + 'static>(rx: mpsc::UnboundedReceiver<T>) -> impl Stream<Item = T> {
    futures::stream::unfold(rx, |mut rx| async move {
        let item = rx.recv().await?;
        Some((item, rx))
    })
}

enum Resource {
    // Boxed: events are large and of very different sizes.
    Namespace(Box<Result<watcher::Event<Namespace>, watcher::Error>>),
    Pod(Box<Result<watcher::Event<Pod>, watcher::Error>>),
    Service(Box<Result<watcher::Event<Service>, watcher::Error>>),
    EndpointSlice(OptionalUpdate<EndpointSlice>),
    Policy(OptionalUpdate<DynamicObject>),
}

struct Mirrors {
    namespaces: Mirror<NamespaceInfo>,
    pods: Mirror<PodInfo>,
    policies: Mirror<PolicyEntry>,
    services: Mirror<ServiceInfo>,
    slices: Mirror<EndpointSliceInfo>,
}

impl Mirrors {
    /// Applies one event; returns whether the live state changed.
    fn handle(&mut self, event: Resource, node: &str) -> bool {
        match event {
            Resource::Namespace(event) => match *event {
                Ok(event) => self.namespaces.apply(event, |ns, _| namespace_info(ns)),
                Err(e) => watch_failed("namespaces", e),
            },
            Resource::Pod(event) => match *event {
                Ok(event) => self.pods.apply(event, |p, _| pod_info(p, node)),
                Err(e) => watch_failed("pods", e),
            },
            Resource::Service(event) => match *event {
                Ok(event) => self.services.apply(event, |s, _| service_info(s)),
                Err(e) => watch_failed("services", e),
            },
            Resource::EndpointSlice(update) => match update {
                OptionalUpdate::Event(event) => {
                    self.slices.apply(*event, |s, _| endpoint_slice_info(s))
                }
                OptionalUpdate::Failed(e) => watch_failed("endpointslices", e),
                OptionalUpdate::NotServed => self.slices.absent(),
            },
            Resource::Policy(update) => match update {
                OptionalUpdate::Event(event) => self.policies.apply(*event, policy_info),
                OptionalUpdate::Failed(e) => watch_failed("authorizationpolicies", e),
                OptionalUpdate::NotServed => self.policies.absent(),
            },
        }
    }

    fn synced(&self) -> bool {
        self.namespaces.synced
            && self.pods.synced
            && self.policies.synced
            && self.services.synced
            && self.slices.synced
    }

    fn state(&self) -> ClusterState {
        // Mirror keys are the objects' namespace/name, which the ids repeat; keyed by id
        // again, the set cannot hold a duplicate.
        let policies: BTreeMap<_, _> = self
            .policies
            .live
            .values()
            .filter_map(|e| e.policy.as_ref())
            .map(|p| (p.id().clone(), p.clone()))
            .collect();
        let policies = PolicySet::new(policies.into_values()).expect("policy ids are unique");
        ClusterState::new(
            self.namespaces.live.values().cloned(),
            self.pods.live.values().cloned(),
        )
        .with_policies(policies)
        .with_policy_problems(
            self.policies
                .live
                .values()
                .filter_map(|e| e.problem.clone()),
        )
        .with_services(self.services.live.values().cloned())
        .with_endpoint_slices(self.slices.live.values().cloned())
    }
}

fn watch_failed(resource: &str, e: watcher::Error) -> bool {
    if is_forbidden(&e) {
        // RBAC changed under a running process (a role at start is checked by
        // `crate::access::check_access`): nothing changes until someone grants it again.
        tracing::error!(
            target: "kubernetes",
            resource,
            "RBAC denies reading {resource}, keeping the last state (it will go stale) and \
             retrying: {e}; grant get, list and watch on {resource} \
             (examples/kubernetes/10-rbac.yaml)"
        );
    } else {
        tracing::warn!(target: "kubernetes", resource, "watch failed, keeping the last state and retrying: {e}");
    }
    false
}

/// Whether the API server refused the request (403): RBAC, not an outage.
fn is_forbidden(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status))
        | watcher::Error::WatchFailed(kube::Error::Api(status)) => status.code == 403,
        watcher::Error::WatchError(status) => status.code == 403,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use zmesh_proxy::policy::Action;

    fn invalid(spec: serde_json::Value) -> serde_json::Value {
        json!({
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "p", "namespace": "shop"},
            "spec": spec,
        })
    }

    fn selector(app: &str) -> Option<BTreeMap<String, String>> {
        Some(BTreeMap::from([("app".to_owned(), app.to_owned())]))
    }

    /// What `f` logs, as text.
    fn capture_logs(f: impl FnOnce()) -> String {
        #[derive(Clone, Default)]
        struct Buffer(Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Buffer {
            fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
                self.0
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend_from_slice(data);
                Ok(data.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let bytes = buffer.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    #[test]
    fn invalid_policies_without_a_good_version_fail_closed() {
        let http = json!([{"to": [{"operation": {"methods": ["GET"]}}]}]);
        let cases = [
            // DENY: deny everything to the selected pods.
            (
                json!({"selector": {"matchLabels": {"app": "db"}}, "action": "DENY", "rules": http}),
                Some((Action::Deny, 1, selector("db"))),
            ),
            // ALLOW (explicit or by default): allow nothing.
            (
                json!({"selector": {"matchLabels": {"app": "db"}}, "action": "ALLOW", "rules": http}),
                Some((Action::Allow, 0, selector("db"))),
            ),
            (json!({"rules": http}), Some((Action::Allow, 0, None))),
            // A bad selector: the whole namespace.
            (
                json!({"selector": {"matchLabels": {"app": 5}}, "action": "DENY"}),
                Some((Action::Deny, 1, None)),
            ),
            // An action that cannot be read: the safe reading.
            (json!({"action": 7}), Some((Action::Deny, 1, None))),
            // AUDIT and CUSTOM never decide traffic.
            (json!({"action": "AUDIT", "rules": http}), None),
            (json!({"action": "CUSTOM", "provider": {"name": "x"}}), None),
        ];
        for (spec, expected) in cases {
            let value = invalid(spec.clone());
            assert!(Policy::from_json(&value).is_err(), "{spec} must be invalid");
            let got = fail_closed(&value).map(|p| {
                assert_eq!(p.id().to_string(), "shop/p");
                (p.action(), p.rule_count(), p.selector().cloned())
            });
            assert_eq!(got, expected, "{spec}");
        }
    }

    #[test]
    fn an_invalid_update_keeps_the_last_good_version() {
        let object = |spec: serde_json::Value| -> DynamicObject {
            serde_json::from_value(invalid(spec)).unwrap()
        };
        let good = policy_info(object(json!({"action": "DENY", "rules": [{}]})), None).unwrap();
        assert_eq!(good.problem, None);
        let bad = object(
            json!({"action": "ALLOW", "rules": [{"to": [{"operation": {"paths": ["/"]}}]}]}),
        );
        let logs = capture_logs(|| {
            let kept = policy_info(bad.clone(), Some(&good)).unwrap();
            assert_eq!(kept.policy, good.policy);
            // The object's problem is noted for `zmesh config policies`.
            let problem = kept.problem.unwrap();
            assert_eq!(problem.policy, "shop/p");
            assert!(problem
                .reason
                .contains("spec.rules[0].to[0].operation.paths"));
            assert_eq!(problem.enforced, "its last good version");
        });
        // The operator learns which object and which field.
        assert!(logs.contains("WARN"), "{logs}");
        assert!(logs.contains("shop/p"), "{logs}");
        assert!(
            logs.contains("spec.rules[0].to[0].operation.paths"),
            "{logs}"
        );
        assert!(logs.contains("last good version stays in force"), "{logs}");
        // A valid update replaces it.
        let allow = policy_info(object(json!({"rules": [{}]})), Some(&good)).unwrap();
        assert_eq!(allow.problem, None);
        assert_eq!(allow.policy.unwrap().action(), Action::Allow);
    }
}
