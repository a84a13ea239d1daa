//! What the agent holds now, for `zmesh config ...` (like `istioctl ztunnel-config`), its
//! version, and its log level:
//!
//! - `GET /config/workloads`: the proxy's workload table (pods, their identities, protocol);
//! - `GET /config/services`: Services with their VIPs, ports and resolved endpoints;
//! - `GET /config/policies`: the AuthorizationPolicies in force, and the invalid ones with
//!   their reason and what is enforced instead;
//! - `GET /config/connections`: the connections open now, with both identities;
//! - `GET /version`: this build;
//! - `GET /log`, `PUT /log?level=FILTER`: the log filter (tracing's syntax, e.g. `debug` or
//!   `info,access=debug`), changed without a restart.
//!
//! Every answer is one JSON document with snake_case keys and RFC 3339 times.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use zmesh_cluster::{ClusterState, PolicyProblem};
use zmesh_proxy::policy::Action;
use zmesh_proxy::{Protocol, TargetPort, WorkloadTable};

/// `GET /version`: this build, and the CA's version as the CA last named it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VersionReport {
    #[serde(flatten)]
    pub build: BuildInfo,
    pub ca_version: Option<String>,
}

/// This build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildInfo {
    pub version: String,
    #[serde(default)]
    pub git_commit: Option<String>,
}

impl Default for BuildInfo {
    fn default() -> Self {
        Self {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            git_commit: None,
        }
    }
}

type SetFilter = dyn Fn(&str) -> Result<(), String> + Send + Sync;

/// Changes the process's log filter at run time. The binary builds it around its tracing
/// subscriber's reload handle.
#[derive(Clone)]
pub struct LogControl {
    set: Arc<SetFilter>,
    current: Arc<Mutex<String>>,
}

impl std::fmt::Debug for LogControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogControl")
            .field("current", &self.current())
            .finish()
    }
}

impl LogControl {
    /// `initial` is the filter in force; `set` installs a new one or says why not.
    pub fn new(
        initial: &str,
        set: impl Fn(&str) -> Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        Self {
            set: Arc::new(set),
            current: Arc::new(Mutex::new(initial.to_owned())),
        }
    }

    pub fn current(&self) -> String {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Installs `filter`; a bad one changes nothing.
    pub fn set(&self, filter: &str) -> Result<(), String> {
        let filter = filter.trim();
        if filter.is_empty() {
            return Err("the log level is empty".into());
        }
        (self.set)(filter)?;
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = filter.to_owned();
        Ok(())
    }
}

/// Refuses a log filter that tracing would read as something else than meant: every
/// comma-separated directive is a level (`trace`, `debug`, `info`, `warn`, `error`, `off`)
/// or `target=level`. (A bare word would silently become a target with every level on.)
pub fn check_filter(filter: &str) -> Result<(), String> {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    for directive in filter.split(',').map(str::trim) {
        let level = match directive.rsplit_once('=') {
            Some((target, level)) if !target.is_empty() => level,
            Some(_) => return Err(format!("{directive:?} names no target before '='")),
            None => directive,
        };
        if !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return Err(format!(
                "{directive:?}: {level:?} is not a level (use trace, debug, info, warn, error or off, or target=level)"
            ));
        }
    }
    Ok(())
}

/// `GET /log` and `PUT /log`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLevel {
    pub level: String,
}

/// One workload of the table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadConfig {
    pub namespace: String,
    pub name: String,
    /// Its Deployment (StatefulSet, ...), as Istio names it.
    pub workload_name: String,
    pub node: String,
    pub ips: Vec<IpAddr>,
    /// `hbone` (enrolled: mTLS) or `tcp` (plaintext).
    pub protocol: String,
    pub identity: String,
    pub service_account: String,
}

/// One Service, as the proxy balances over it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceConfig {
    pub namespace: String,
    pub name: String,
    pub vips: Vec<IpAddr>,
    pub ports: Vec<ServicePortConfig>,
    /// Ready endpoints, `namespace/pod` where the address is a known pod.
    pub endpoints: Vec<EndpointConfig>,
    /// `sessionAffinity: ClientIP` timeout, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity_seconds: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePortConfig {
    pub port: u16,
    /// A number, or the name of a container port.
    pub target_port: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointConfig {
    pub ip: IpAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// Service port -> the port this endpoint serves it on (a Service port missing here
    /// is not served by this endpoint).
    pub ports: BTreeMap<u16, u16>,
}

/// The policies in force and the invalid ones.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoliciesConfig {
    /// The root namespace, whose policies apply to every namespace.
    pub root_namespace: String,
    pub policies: Vec<PolicyConfig>,
    pub invalid: Vec<PolicyProblem>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyConfig {
    pub namespace: String,
    pub name: String,
    /// `ALLOW` or `DENY`.
    pub action: String,
    /// `matchLabels` of its selector; `None`: the whole namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<BTreeMap<String, String>>,
    pub rules: usize,
}

pub fn workloads(table: &WorkloadTable) -> Vec<WorkloadConfig> {
    let mut out: Vec<WorkloadConfig> = table
        .workloads()
        .map(|w| WorkloadConfig {
            namespace: w.namespace.clone(),
            name: w.name.clone(),
            workload_name: w.workload_name.clone(),
            node: w.node.clone(),
            ips: w.ips.clone(),
            protocol: match w.protocol {
                Protocol::Hbone => "hbone".into(),
                Protocol::Tcp => "tcp".into(),
            },
            identity: w.identity.to_string(),
            service_account: w.service_account.clone(),
        })
        .collect();
    out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    out
}

pub fn services(table: &WorkloadTable) -> Vec<ServiceConfig> {
    let mut out: Vec<ServiceConfig> = table
        .services()
        .map(|s| ServiceConfig {
            namespace: s.namespace.clone(),
            name: s.name.clone(),
            vips: s.vips.clone(),
            ports: s
                .ports
                .iter()
                .map(|p| ServicePortConfig {
                    port: p.port,
                    target_port: match &p.target {
                        TargetPort::Number(n) => n.to_string(),
                        TargetPort::Named(name) => name.clone(),
                    },
                })
                .collect(),
            endpoints: s
                .endpoints
                .iter()
                .map(|e| EndpointConfig {
                    ip: e.ip,
                    pod: table
                        .workload_by_ip(e.ip)
                        .map(|w| format!("{}/{}", w.namespace, w.name)),
                    ports: e.ports.clone(),
                })
                .collect(),
            affinity_seconds: s.affinity.map(|d| d.as_secs()),
        })
        .collect();
    out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    out
}

pub fn policies(state: &ClusterState) -> PoliciesConfig {
    let set = state.policies();
    PoliciesConfig {
        root_namespace: set.root_namespace().to_owned(),
        policies: set
            .policies()
            .iter()
            .map(|p| PolicyConfig {
                namespace: p.id().namespace.clone(),
                name: p.id().name.clone(),
                action: match p.action() {
                    Action::Allow => "ALLOW".into(),
                    Action::Deny => "DENY".into(),
                },
                selector: p.selector().cloned(),
                rules: p.rule_count(),
            })
            .collect(),
        invalid: state.policy_problems().to_vec(),
    }
}
