//! Where a pod's network namespace is on this node, found without help from the pod.
//!
//! The Kubernetes API does not say where a pod's network namespace is: that is a fact of
//! its node. Three sources, in order of precedence:
//!
//! 1. the `zmesh.io/netns` annotation (the lab writes it; an explicit override);
//! 2. the [`NetnsRegistry`]: paths handed to the agent by whoever created the namespace
//!    (the CNI plugin, on pod ADD);
//! 3. a scan of the node's processes: kubelet puts every process of a pod in a cgroup named
//!    after the pod's UID (`pod<uid>` with the cgroupfs driver,
//!    `kubepods[-<qos>]-pod<uid with _ for ->.slice` with the systemd driver), so any process
//!    whose `/proc/<pid>/cgroup` names that cgroup is in the pod, and its `/proc/<pid>/ns/net`
//!    is the pod's network namespace.
//!
//! The scan reads the node's /proc, which may be mounted elsewhere (a DaemonSet without
//! hostPID mounts the host's at /host/proc): its root is a parameter, which also lets the
//! tests hand it a fake tree. It blocks (one pass over every process): call it from a
//! blocking thread.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use zmesh_cluster::state::PodKey;
use zmesh_cluster::{ClusterState, PodInfo};

/// How a pod's network namespace was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetnsSource {
    /// The pod's `zmesh.io/netns` annotation.
    Annotation,
    /// The [`NetnsRegistry`] (the CNI plugin told us).
    Registry,
    /// A process of the pod, found by its cgroup.
    Proc,
}

impl std::fmt::Display for NetnsSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Annotation => "annotation",
            Self::Registry => "registry",
            Self::Proc => "proc",
        })
    }
}

/// Network namespace paths by pod UID, as told by whoever created them (the CNI plugin on
/// pod ADD). Cheap to clone: clones share one table.
#[derive(Debug, Clone, Default)]
pub struct NetnsRegistry {
    pods: Arc<Mutex<HashMap<String, Registered>>>,
}

#[derive(Debug, Clone, Default)]
struct Registered {
    netns: PathBuf,
    /// The pod's addresses from the CNI result: known before kubelet reports them in the
    /// Pod's status, which the agent sees later.
    ips: Vec<IpAddr>,
}

impl NetnsRegistry {
    /// Records that the pod `uid` has its network namespace at `netns_path`; replaces an
    /// earlier path of the same UID.
    pub fn register(&self, uid: impl Into<String>, netns_path: impl Into<PathBuf>) {
        self.register_with_ips(uid, netns_path, Vec::new());
    }

    /// [`Self::register`], with the pod's addresses as the CNI chain assigned them.
    pub fn register_with_ips(
        &self,
        uid: impl Into<String>,
        netns_path: impl Into<PathBuf>,
        ips: Vec<IpAddr>,
    ) {
        self.lock().insert(
            normalize_uid(&uid.into()),
            Registered {
                netns: netns_path.into(),
                ips,
            },
        );
    }

    /// Forgets the pod `uid` (pod DEL).
    pub fn forget(&self, uid: &str) {
        self.lock().remove(&normalize_uid(uid));
    }

    /// The registered path of the pod `uid`.
    pub fn get(&self, uid: &str) -> Option<PathBuf> {
        self.lock()
            .get(&normalize_uid(uid))
            .map(|r| r.netns.clone())
    }

    /// The addresses registered for the pod `uid` (empty if none).
    pub fn ips(&self, uid: &str) -> Vec<IpAddr> {
        self.lock()
            .get(&normalize_uid(uid))
            .map(|r| r.ips.clone())
            .unwrap_or_default()
    }

    /// `state` with the registered addresses filled in for its pods that have none yet (a
    /// pod started a moment ago, before kubelet reported its IP); the same `Arc` when there
    /// is nothing to fill in.
    pub fn fill_pod_ips(&self, state: Arc<ClusterState>) -> Arc<ClusterState> {
        let fill: Vec<(PodKey, Vec<IpAddr>)> = {
            let pods = self.lock();
            if pods.is_empty() {
                return state;
            }
            state
                .pods()
                .filter(|pod| pod.ips.is_empty())
                .filter_map(|pod| {
                    let registered = pods.get(&normalize_uid(pod.uid.as_deref()?))?;
                    (!registered.ips.is_empty()).then(|| (pod.key(), registered.ips.clone()))
                })
                .collect()
        };
        if fill.is_empty() {
            return state;
        }
        let mut filled = (*state).clone();
        for (key, ips) in fill {
            filled.set_pod_ips(&key, ips);
        }
        Arc::new(filled)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Registered>> {
        // A panic while holding the lock cannot leave a HashMap half-updated for readers.
        self.pods.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Why (part of) a scan of /proc failed. A process that exits while it is read is not an
/// error: that race is normal.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("cannot list the processes in {path}: {source}")]
    ListProcesses { path: PathBuf, source: io::Error },
    #[error("cannot read {path}: {source}")]
    ReadProcess { path: PathBuf, source: io::Error },
}

/// What one pass over /proc found.
#[derive(Debug, Default)]
pub struct Scan {
    /// Pod UID (as asked) -> the network namespace of one of its processes.
    pub found: HashMap<String, PathBuf>,
    /// Processes that could not be read for another reason than their exit (e.g. the agent
    /// lacks CAP_SYS_PTRACE for `ns/net`): pods among them may stay unresolved.
    pub problems: Vec<DiscoveryError>,
}

/// What [`PodNetnsDiscovery::resolve`] found for a set of pods.
#[derive(Debug, Default)]
pub struct Resolution {
    /// Pod (`namespace/name`) -> its network namespace path and how it was found.
    pub found: BTreeMap<String, (PathBuf, NetnsSource)>,
    /// See [`Scan::problems`].
    pub problems: Vec<DiscoveryError>,
}

/// Resolves pods to their network namespace on this node.
#[derive(Debug, Clone)]
pub struct PodNetnsDiscovery {
    proc_root: PathBuf,
    registry: NetnsRegistry,
}

impl PodNetnsDiscovery {
    /// Discovery over the node's processes at `proc_root` (`/proc`, or the host's /proc
    /// mounted elsewhere), consulting `registry` first.
    pub fn new(proc_root: impl Into<PathBuf>, registry: NetnsRegistry) -> Self {
        Self {
            proc_root: proc_root.into(),
            registry,
        }
    }

    pub fn registry(&self) -> &NetnsRegistry {
        &self.registry
    }

    /// Each pod's network namespace, by annotation, else registry, else /proc (one scan
    /// for all the pods that need it). Pods found by none are absent.
    pub fn resolve<'a>(&self, pods: impl IntoIterator<Item = &'a PodInfo>) -> Resolution {
        let mut resolution = Resolution::default();
        let mut scan_for: Vec<(String, &str)> = Vec::new();
        for pod in pods {
            let key = pod.key().to_string();
            if let Some(path) = &pod.netns_path {
                resolution
                    .found
                    .insert(key, (path.clone(), NetnsSource::Annotation));
            } else if let Some(uid) = pod.uid.as_deref() {
                match self.registry.get(uid) {
                    Some(path) => {
                        resolution.found.insert(key, (path, NetnsSource::Registry));
                    }
                    None => scan_for.push((key, uid)),
                }
            }
        }
        if scan_for.is_empty() {
            return resolution;
        }
        match self.scan(scan_for.iter().map(|(_, uid)| *uid)) {
            Ok(scan) => {
                for (key, uid) in scan_for {
                    if let Some(path) = scan.found.get(uid) {
                        resolution
                            .found
                            .insert(key, (path.clone(), NetnsSource::Proc));
                    }
                }
                resolution.problems = scan.problems;
            }
            Err(e) => resolution.problems.push(e),
        }
        resolution
    }

    /// One pass over the processes: for every UID in `uids` with a process in the pod's
    /// cgroup and a network namespace of its own (not the node's: that would be a
    /// hostNetwork pod), the path of that namespace (`<proc>/<pid>/ns/net`).
    pub fn scan<'a>(
        &self,
        uids: impl IntoIterator<Item = &'a str>,
    ) -> Result<Scan, DiscoveryError> {
        // Kubernetes writes UIDs in lowercase, cgroup names keep them as they are; compare
        // without case so neither side's spelling matters.
        let wanted: HashMap<String, &str> = uids
            .into_iter()
            .map(|uid| (normalize_uid(uid), uid))
            .collect();
        let mut scan = Scan::default();
        if wanted.is_empty() {
            return Ok(scan);
        }
        let host_netns = self.host_netns();
        let entries =
            std::fs::read_dir(&self.proc_root).map_err(|source| DiscoveryError::ListProcesses {
                path: self.proc_root.clone(),
                source,
            })?;
        for entry in entries {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) if vanished(&e) => continue,
                Err(source) => {
                    return Err(DiscoveryError::ListProcesses {
                        path: self.proc_root.clone(),
                        source,
                    })
                }
            };
            let name = entry.file_name();
            let Some(pid) = name
                .to_str()
                .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
            else {
                continue; // not a process (self, sys, meminfo, ...)
            };
            let cgroup_path = entry.path().join("cgroup");
            let cgroups = match std::fs::read_to_string(&cgroup_path) {
                Ok(text) => text,
                Err(e) if vanished(&e) => continue,
                Err(source) => {
                    scan.problems.push(DiscoveryError::ReadProcess {
                        path: cgroup_path,
                        source,
                    });
                    continue;
                }
            };
            let Some(uid) = pod_uids_in(&cgroups).find_map(|uid| wanted.get(&uid).copied()) else {
                continue;
            };
            if scan.found.contains_key(uid) {
                continue; // every process of a pod shares its network namespace
            }
            let netns_path = self.proc_root.join(pid).join("ns").join("net");
            let netns = match std::fs::metadata(&netns_path) {
                Ok(meta) => (meta.dev(), meta.ino()),
                // A zombie has no namespaces left; an exited process no directory.
                Err(e) if vanished(&e) => continue,
                Err(source) => {
                    scan.problems.push(DiscoveryError::ReadProcess {
                        path: netns_path,
                        source,
                    });
                    continue;
                }
            };
            if host_netns.contains(&netns) {
                continue; // a hostNetwork container: not the pod's own namespace
            }
            scan.found.insert(uid.to_owned(), netns_path);
        }
        Ok(scan)
    }

    /// The node's network namespace(s), which no enrollable pod has: the one of PID 1 of
    /// the scanned /proc (the host's init), and the agent's own (the agent runs with the
    /// node's network).
    fn host_netns(&self) -> Vec<(u64, u64)> {
        [
            self.proc_root.join("1/ns/net"),
            PathBuf::from("/proc/self/ns/net"),
        ]
        .iter()
        .filter_map(|path| std::fs::metadata(path).ok())
        .map(|meta| (meta.dev(), meta.ino()))
        .collect()
    }
}

/// A process that exited between listing and reading: ENOENT for its files, ESRCH for
/// some of its links.
fn vanished(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(nix::libc::ESRCH)
}

fn normalize_uid(uid: &str) -> String {
    uid.to_ascii_lowercase()
}

/// The pod UIDs named by the cgroup paths of a `/proc/<pid>/cgroup` file (normalized), for
/// cgroup v1 lines (`N:controllers:/path`), v2 lines (`0::/path`) and both mixed (hybrid).
/// Lines that are not `a:b:/path` are skipped.
pub fn pod_uids_in(cgroup_file: &str) -> impl Iterator<Item = String> + '_ {
    cgroup_file
        .lines()
        .filter_map(|line| {
            let mut fields = line.splitn(3, ':');
            let (_hierarchy, _controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
            path.starts_with('/').then_some(path)
        })
        .flat_map(|path| {
            let components: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
            (0..components.len())
                .filter_map(|i| {
                    let parent = i.checked_sub(1).map(|p| components[p]);
                    pod_uid_of(components[i], parent)
                })
                .collect::<Vec<_>>()
        })
}

/// The pod UID a cgroup directory is named after, if it is a kubelet pod cgroup:
///
/// - cgroupfs driver: `pod<uid>`, directly under `kubepods` (Guaranteed) or under its QoS
///   directory `besteffort` / `burstable`;
/// - systemd driver: `kubepods-pod<uid>.slice` (Guaranteed) or
///   `kubepods-<besteffort|burstable>-pod<uid>.slice`, the UID's dashes written as
///   underscores (a dash in a slice name means nesting); a prefix ending in `-` before
///   `kubepods` is allowed (kind's `kubelet-kubepods-...`).
///
/// The whole name must have that form, so one UID that starts with another never matches
/// the shorter one.
fn pod_uid_of(component: &str, parent: Option<&str>) -> Option<String> {
    if let Some(uid) = component.strip_prefix("pod") {
        let under_kubepods = matches!(parent, Some("kubepods" | "besteffort" | "burstable"));
        return (under_kubepods && is_uid(uid)).then(|| normalize_uid(uid));
    }
    let stem = component.strip_suffix(".slice")?;
    let (prefix, escaped) = stem.rsplit_once("-pod")?;
    let slice = ["kubepods", "kubepods-besteffort", "kubepods-burstable"]
        .iter()
        .any(|s| {
            prefix == *s
                || prefix
                    .strip_suffix(s)
                    .is_some_and(|outer| outer.ends_with('-'))
        });
    if !slice || escaped.contains('-') {
        return None;
    }
    let uid = escaped.replace('_', "-");
    is_uid(&uid).then(|| normalize_uid(&uid))
}

/// What a pod UID can look like: not empty, letters, digits and dashes (RFC 4122 UUIDs in
/// practice; static pods have a hex hash).
fn is_uid(uid: &str) -> bool {
    !uid.is_empty() && uid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// After this long without a network namespace, a pod's wait is logged as a warning.
pub(crate) const UNRESOLVED_WARNING_AFTER: Duration = Duration::from_secs(30);

/// The netns cookies of the node's enrolled pods, resolved once per pod (per UID: a pod
/// recreated under the same name is resolved again) and kept: the network namespace of a
/// running pod does not change.
pub(crate) struct NetnsCookies {
    discovery: PodNetnsDiscovery,
    pods: BTreeMap<String, Known>,
    /// The scan problems logged last, so that a retry does not log them again.
    logged_problems: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Known {
    Resolved {
        uid: Option<String>,
        cookie: u64,
        /// What it was resolved from: a CNI ADD registering another path for the same UID
        /// (the runtime made the pod a new sandbox) makes it resolve again.
        path: PathBuf,
    },
    Pending {
        uid: Option<String>,
        since: Instant,
        warned: bool,
        /// The last error reading a namespace that was found (warned about once).
        error: Option<String>,
    },
    /// Neither an annotation nor a UID: nothing can find its namespace, retrying is
    /// useless until the pod changes.
    Unfindable { uid: Option<String> },
}

impl Known {
    fn uid(&self) -> &Option<String> {
        match self {
            Known::Resolved { uid, .. }
            | Known::Pending { uid, .. }
            | Known::Unfindable { uid } => uid,
        }
    }
}

impl NetnsCookies {
    pub fn new(discovery: PodNetnsDiscovery) -> Self {
        Self {
            discovery,
            pods: BTreeMap::new(),
            logged_problems: Vec::new(),
        }
    }

    /// The cookie of every pod in `pods` (keyed `namespace/name`), `None` while its
    /// namespace is not found; pods not listed are forgotten. `cookie_of` reads a
    /// namespace's cookie (`steering::netns_cookie`; the tests read fake ones).
    pub fn cookies(
        &mut self,
        pods: &[&PodInfo],
        now: Instant,
        cookie_of: &dyn Fn(&Path) -> io::Result<u64>,
    ) -> BTreeMap<String, Option<u64>> {
        let mut known: BTreeMap<String, Known> = BTreeMap::new();
        let mut to_resolve: Vec<&PodInfo> = Vec::new();
        for pod in pods {
            let key = pod.key().to_string();
            let previous = self.pods.remove(&key);
            let entry = match previous {
                // Same pod (same UID, or no UID either time): keep what we know.
                Some(previous @ Known::Resolved { .. })
                    if previous.uid() == &pod.uid && !self.registered_elsewhere(&previous) =>
                {
                    previous
                }
                Some(previous @ Known::Pending { .. }) if previous.uid() == &pod.uid => {
                    to_resolve.push(pod);
                    previous
                }
                _ if pod.netns_path.is_none() && pod.uid.is_none() => {
                    if previous != Some(Known::Unfindable { uid: None }) {
                        tracing::warn!(pod = %key, "cannot find the pod's network namespace: it has no UID (metadata.uid) and no zmesh.io/netns annotation; its connections are not captured");
                    }
                    Known::Unfindable { uid: None }
                }
                _ => {
                    to_resolve.push(pod);
                    Known::Pending {
                        uid: pod.uid.clone(),
                        since: now,
                        warned: false,
                        error: None,
                    }
                }
            };
            known.insert(key, entry);
        }
        // Pods that left are dropped; recreated ones were replaced above.
        self.pods = known;

        if !to_resolve.is_empty() {
            let resolution = self.discovery.resolve(to_resolve.iter().copied());
            self.log_problems(&resolution.problems);
            for (key, (path, source)) in resolution.found {
                let Some(entry) = self.pods.get_mut(&key) else {
                    continue;
                };
                match cookie_of(&path) {
                    Ok(cookie) => {
                        tracing::info!(pod = %key, path = %path.display(), how = %source, cookie, "found the pod's network namespace");
                        *entry = Known::Resolved {
                            uid: entry.uid().clone(),
                            cookie,
                            path,
                        };
                    }
                    Err(e) => {
                        // The process may have exited since the scan (then another of the
                        // pod's is found next time); a bad annotation stays bad. Warn
                        // once, retry anyway.
                        if let Known::Pending { error, .. } = entry {
                            let message = format!("{}: {e}", path.display());
                            if error.is_none() {
                                tracing::warn!(pod = %key, how = %source, "cannot read the pod's network namespace {message}");
                            } else {
                                tracing::debug!(pod = %key, how = %source, "cannot read the pod's network namespace {message}");
                            }
                            *error = Some(message);
                        }
                    }
                }
            }
        }

        for (key, entry) in &mut self.pods {
            if let Known::Pending {
                since,
                warned,
                error,
                uid,
            } = entry
            {
                if !*warned && now.saturating_duration_since(*since) >= UNRESOLVED_WARNING_AFTER {
                    *warned = true;
                    tracing::warn!(
                        pod = %key,
                        uid = uid.as_deref().unwrap_or("none"),
                        last_error = error.as_deref().unwrap_or("none"),
                        "network namespace still not found after {}s (no process in the pod's cgroup, not registered by the CNI plugin, no zmesh.io/netns annotation): its connections are not captured yet",
                        UNRESOLVED_WARNING_AFTER.as_secs()
                    );
                }
            }
        }
        self.pods
            .iter()
            .map(|(key, entry)| {
                let cookie = match entry {
                    Known::Resolved { cookie, .. } => Some(*cookie),
                    Known::Pending { .. } | Known::Unfindable { .. } => None,
                };
                (key.clone(), cookie)
            })
            .collect()
    }

    /// Whether the CNI plugin registered a namespace for this pod's UID other than the
    /// one it was resolved from.
    fn registered_elsewhere(&self, known: &Known) -> bool {
        let Known::Resolved {
            uid: Some(uid),
            path,
            ..
        } = known
        else {
            return false;
        };
        self.discovery
            .registry()
            .get(uid)
            .is_some_and(|registered| &registered != path)
    }

    /// How many pods wait for their network namespace and may still find it (worth
    /// looking again soon).
    pub fn pending(&self) -> usize {
        self.pods
            .values()
            .filter(|entry| matches!(entry, Known::Pending { .. }))
            .count()
    }

    fn log_problems(&mut self, problems: &[DiscoveryError]) {
        let messages: Vec<String> = problems.iter().map(ToString::to_string).collect();
        if messages != self.logged_problems {
            if let Some(first) = messages.first() {
                tracing::warn!(
                    more = messages.len() - 1,
                    "looking for pods' network namespaces: {first}"
                );
            }
            self.logged_problems = messages;
        }
    }
}

#[cfg(test)]
mod tests;
