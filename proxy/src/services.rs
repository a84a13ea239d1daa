//! Kubernetes Services as the proxy needs them: the virtual IPs (ClusterIPs) clients dial,
//! and behind each service port the endpoints that serve it. Whoever builds the table
//! resolves the endpoints (the agent from ready pods or EndpointSlices, the YAML loader from
//! its workloads): the proxy only picks one.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

/// One Service.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    /// Its ClusterIPs (one per family when dual-stack).
    pub vips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    /// `sessionAffinity: ClientIP`: a client keeps its endpoint for this long after its
    /// last connection. `None`: every connection is balanced on its own.
    pub affinity: Option<Duration>,
    /// The ready endpoints.
    pub endpoints: Vec<Endpoint>,
}

/// One port of a Service.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ServicePort {
    /// The port's name (EndpointSlices name their ports after it).
    pub name: Option<String>,
    /// What clients dial on the VIP.
    pub port: u16,
    /// Where endpoints serve it.
    pub target: TargetPort,
}

/// A Service port's `targetPort`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum TargetPort {
    Number(u16),
    /// A container port name, resolved per endpoint pod (pods may use different numbers).
    Named(String),
}

/// One endpoint of a Service: an address, and its port for each service port it serves.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Endpoint {
    pub ip: IpAddr,
    /// Service port -> this endpoint's port for it. A service port missing here is not
    /// served by this endpoint (e.g. its pod has no container port of that name).
    pub ports: BTreeMap<u16, u16>,
}

impl ServicePort {
    /// This port's target on a pod whose named container ports are `named`.
    pub fn target_on(&self, named: &BTreeMap<String, u16>) -> Option<u16> {
        match &self.target {
            TargetPort::Number(port) => Some(*port),
            TargetPort::Named(name) => named.get(name).copied(),
        }
    }
}

impl Service {
    /// `namespace/name`, as flows and access logs name it.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Its DNS name, `<name>.<namespace>.svc.<cluster domain>`.
    pub fn hostname(&self, cluster_domain: &str) -> String {
        format!("{}.{}.svc.{}", self.name, self.namespace, cluster_domain)
    }

    /// The endpoints serving service port `port`, with their port for it.
    pub fn endpoints_for(&self, port: u16) -> impl Iterator<Item = (IpAddr, u16)> + '_ {
        self.endpoints
            .iter()
            .filter_map(move |e| e.ports.get(&port).map(|target| (e.ip, *target)))
    }
}
