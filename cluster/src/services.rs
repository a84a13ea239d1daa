//! Kubernetes Services and EndpointSlices as the cluster state keeps them: what the proxy's
//! Service table ([`zmesh_proxy::Service`]) is built from.
//!
//! A Service keeps its ClusterIPs (none when headless), its TCP ports (UDP and SCTP ports are
//! not proxied and left out), its selector and its ClientIP affinity. Its endpoints are not
//! part of it: [`ClusterState::service_endpoints`](crate::ClusterState::service_endpoints)
//! resolves them from the ready pods its selector matches or, for a Service without a
//! selector, from the EndpointSlices labelled with its name.
//!
//! Objects the API server would refuse (a port out of range, an address that does not
//! parse) and kinds the proxy cannot serve (ExternalName Services, FQDN slices) are errors
//! naming the field; the caller skips that one object.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use zmesh_proxy::{ServicePort, TargetPort};

/// EndpointSlice label naming the Service the slice belongs to.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// `sessionAffinityConfig.clientIP.timeoutSeconds` when absent (Kubernetes' default, 3 h).
pub const DEFAULT_AFFINITY_TIMEOUT: Duration = Duration::from_secs(10_800);

/// The largest ClientIP affinity timeout Kubernetes accepts (one day).
const MAX_AFFINITY_TIMEOUT_SECONDS: i32 = 86_400;

/// One Service, without its endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceInfo {
    pub namespace: String,
    pub name: String,
    /// `spec.clusterIPs` (else `spec.clusterIP`); empty for a headless Service.
    pub cluster_ips: Vec<IpAddr>,
    /// The TCP ports, in spec order.
    pub ports: Vec<ServicePort>,
    /// `None` when the selector is absent or empty: the endpoints come from EndpointSlices.
    pub selector: Option<BTreeMap<String, String>>,
    /// `sessionAffinity: ClientIP`, with its timeout.
    pub affinity: Option<Duration>,
}

/// Why a Service object could not be used. Each names the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {
    #[error("missing {0}")]
    Missing(&'static str),
    #[error("spec.type: ExternalName services are not supported")]
    ExternalName,
    #[error("{field}: {value:?} is not an IP address")]
    BadIp { field: String, value: String },
    #[error("{field}: {value} is not a port number (1-65535)")]
    BadPort { field: String, value: i64 },
    #[error("{field}: {value:?} is neither a port number nor a port name")]
    BadTargetPort { field: String, value: String },
    #[error("{field}: TCP port {port} is listed twice")]
    DuplicatePort { field: String, port: u16 },
    #[error("spec.sessionAffinity: {0:?} is not supported (only None and ClientIP)")]
    BadAffinity(String),
    #[error("spec.sessionAffinityConfig.clientIP.timeoutSeconds: {0} is out of range (1-86400)")]
    BadAffinityTimeout(i32),
}

/// `value` as a port number, if it is one (1-65535).
fn port_number(value: i64) -> Option<u16> {
    u16::try_from(value).ok().filter(|p| *p != 0)
}

/// Protocol absent means TCP, as the API server defaults it.
fn is_tcp(protocol: Option<&str>) -> bool {
    matches!(protocol, None | Some("TCP"))
}

/// An empty port name is no name (Kubernetes treats them alike).
fn port_name(name: Option<String>) -> Option<String> {
    name.filter(|n| !n.is_empty())
}

impl ServiceInfo {
    /// Keeps what the mesh needs of a v1 Service. A missing namespace means `default`, as
    /// kubectl applies it.
    pub fn from_service(service: Service) -> Result<Self, ServiceError> {
        let meta = service.metadata;
        let name = meta.name.ok_or(ServiceError::Missing("metadata.name"))?;
        let spec = service.spec.ok_or(ServiceError::Missing("spec"))?;
        if spec.type_.as_deref() == Some("ExternalName") {
            return Err(ServiceError::ExternalName);
        }

        let (ip_field, ip_values) = match spec.cluster_ips {
            Some(ips) if !ips.is_empty() => ("spec.clusterIPs", ips),
            _ => ("spec.clusterIP", spec.cluster_ip.into_iter().collect()),
        };
        let single = ip_field == "spec.clusterIP";
        let mut cluster_ips = Vec::new();
        for (i, value) in ip_values.into_iter().enumerate() {
            if value.is_empty() || value == "None" {
                continue; // headless
            }
            let ip: IpAddr = value.parse().map_err(|_| ServiceError::BadIp {
                field: if single {
                    ip_field.to_owned()
                } else {
                    format!("{ip_field}[{i}]")
                },
                value: value.clone(),
            })?;
            if !cluster_ips.contains(&ip) {
                cluster_ips.push(ip);
            }
        }

        let mut ports: Vec<ServicePort> = Vec::new();
        for (i, port) in spec.ports.unwrap_or_default().into_iter().enumerate() {
            if !is_tcp(port.protocol.as_deref()) {
                continue; // UDP and SCTP are not proxied
            }
            let number = port_number(port.port.into()).ok_or_else(|| ServiceError::BadPort {
                field: format!("spec.ports[{i}].port"),
                value: port.port.into(),
            })?;
            if ports.iter().any(|p| p.port == number) {
                return Err(ServiceError::DuplicatePort {
                    field: format!("spec.ports[{i}].port"),
                    port: number,
                });
            }
            let target = target_port(port.target_port, number, i)?;
            ports.push(ServicePort {
                name: port_name(port.name),
                port: number,
                target,
            });
        }

        let affinity = match spec.session_affinity.as_deref() {
            None | Some("None") => None,
            Some("ClientIP") => {
                let timeout = spec
                    .session_affinity_config
                    .and_then(|c| c.client_ip)
                    .and_then(|c| c.timeout_seconds);
                Some(match timeout {
                    None => DEFAULT_AFFINITY_TIMEOUT,
                    Some(seconds @ 1..=MAX_AFFINITY_TIMEOUT_SECONDS) => {
                        Duration::from_secs(seconds.unsigned_abs().into())
                    }
                    Some(seconds) => return Err(ServiceError::BadAffinityTimeout(seconds)),
                })
            }
            Some(other) => return Err(ServiceError::BadAffinity(other.to_owned())),
        };

        Ok(Self {
            namespace: meta.namespace.unwrap_or_else(|| "default".into()),
            name,
            cluster_ips,
            ports,
            selector: spec.selector.filter(|s| !s.is_empty()),
            affinity,
        })
    }

    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// `spec.ports[index].targetPort`: absent means the service port itself; a string that
/// reads as a number is that number.
fn target_port(
    target: Option<IntOrString>,
    port: u16,
    index: usize,
) -> Result<TargetPort, ServiceError> {
    let field = || format!("spec.ports[{index}].targetPort");
    let number = |value: i64| {
        port_number(value)
            .map(TargetPort::Number)
            .ok_or_else(|| ServiceError::BadPort {
                field: field(),
                value,
            })
    };
    match target {
        None => Ok(TargetPort::Number(port)),
        Some(IntOrString::Int(value)) => number(value.into()),
        Some(IntOrString::String(value)) => {
            if let Ok(parsed) = value.parse::<i64>() {
                number(parsed)
            } else if value.is_empty() || value.bytes().all(|b| b.is_ascii_digit()) {
                // Empty, or digits too many for any number.
                Err(ServiceError::BadTargetPort {
                    field: field(),
                    value,
                })
            } else {
                Ok(TargetPort::Named(value))
            }
        }
    }
}

/// One EndpointSlice: endpoints of the Service named by its `kubernetes.io/service-name`
/// label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSliceInfo {
    pub namespace: String,
    pub name: String,
    /// The Service it belongs to (same namespace).
    pub service: String,
    /// Its TCP ports: (name, number). Ports without a number are left out.
    pub ports: Vec<(Option<String>, u16)>,
    /// Each endpoint's address (its first one: the others are the same endpoint) and
    /// whether it is ready (`conditions.ready` is not `false`).
    pub endpoints: Vec<(IpAddr, bool)>,
}

/// Why an EndpointSlice object could not be used. Each names the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointSliceError {
    #[error("missing {0}")]
    Missing(&'static str),
    #[error("addressType: {0:?} slices are not supported (only IPv4 and IPv6)")]
    AddressType(String),
    #[error("{field}: {value:?} is not an {family} address")]
    BadIp {
        field: String,
        value: String,
        family: &'static str,
    },
    #[error("{0}: an endpoint needs at least one address")]
    NoAddress(String),
    #[error("{field}: {value} is not a port number (1-65535)")]
    BadPort { field: String, value: i32 },
}

impl EndpointSliceInfo {
    /// Keeps what the mesh needs of a `discovery.k8s.io/v1` EndpointSlice. A missing
    /// namespace means `default`.
    pub fn from_endpoint_slice(slice: EndpointSlice) -> Result<Self, EndpointSliceError> {
        let meta = slice.metadata;
        let name = meta
            .name
            .ok_or(EndpointSliceError::Missing("metadata.name"))?;
        let service = meta
            .labels
            .and_then(|mut labels| labels.remove(SERVICE_NAME_LABEL))
            .filter(|s| !s.is_empty())
            .ok_or(EndpointSliceError::Missing(
                "metadata.labels[\"kubernetes.io/service-name\"]",
            ))?;
        let family = match slice.address_type.as_str() {
            "IPv4" => "IPv4",
            "IPv6" => "IPv6",
            other => return Err(EndpointSliceError::AddressType(other.to_owned())),
        };

        let mut ports = Vec::new();
        for (i, port) in slice.ports.unwrap_or_default().into_iter().enumerate() {
            if !is_tcp(port.protocol.as_deref()) {
                continue;
            }
            // No number: "all ports", which cannot be mapped to a service port.
            let Some(value) = port.port else { continue };
            let number = port_number(value.into()).ok_or_else(|| EndpointSliceError::BadPort {
                field: format!("ports[{i}].port"),
                value,
            })?;
            ports.push((port_name(port.name), number));
        }

        let mut endpoints = Vec::new();
        for (i, endpoint) in slice.endpoints.into_iter().enumerate() {
            let mut addresses = Vec::new();
            for (j, value) in endpoint.addresses.into_iter().enumerate() {
                let ip = value
                    .parse::<IpAddr>()
                    .ok()
                    .filter(|ip| ip.is_ipv4() == (family == "IPv4"))
                    .ok_or_else(|| EndpointSliceError::BadIp {
                        field: format!("endpoints[{i}].addresses[{j}]"),
                        value: value.clone(),
                        family,
                    })?;
                addresses.push(ip);
            }
            let ip = addresses.first().copied().ok_or_else(|| {
                EndpointSliceError::NoAddress(format!("endpoints[{i}].addresses"))
            })?;
            let ready = endpoint.conditions.and_then(|c| c.ready) != Some(false);
            endpoints.push((ip, ready));
        }

        Ok(Self {
            namespace: meta.namespace.unwrap_or_else(|| "default".into()),
            name,
            service,
            ports,
            endpoints,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn service(spec: serde_json::Value) -> Result<ServiceInfo, ServiceError> {
        let object: Service = serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": spec,
        }))
        .unwrap();
        ServiceInfo::from_service(object)
    }

    fn slice(object: serde_json::Value) -> Result<EndpointSliceInfo, EndpointSliceError> {
        EndpointSliceInfo::from_endpoint_slice(serde_json::from_value(object).unwrap())
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_service_keeps_vips_tcp_ports_selector_and_affinity() {
        let info = service(json!({
            "clusterIP": "10.96.0.10",
            "clusterIPs": ["10.96.0.10", "fd00::10"],
            "selector": {"app": "web"},
            "sessionAffinity": "ClientIP",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}},
            "ports": [
                {"name": "http", "port": 80, "targetPort": "http"},
                {"name": "dns", "port": 53, "protocol": "UDP"},
                {"name": "admin", "port": 9000, "targetPort": "9001", "protocol": "TCP"},
                {"name": "", "port": 8443},
            ],
        }))
        .unwrap();
        assert_eq!(info.key(), "shop/web");
        assert_eq!(info.cluster_ips, [ip("10.96.0.10"), ip("fd00::10")]);
        assert_eq!(
            info.ports,
            [
                ServicePort {
                    name: Some("http".into()),
                    port: 80,
                    target: TargetPort::Named("http".into()),
                },
                ServicePort {
                    name: Some("admin".into()),
                    port: 9000,
                    target: TargetPort::Number(9001),
                },
                ServicePort {
                    name: None,
                    port: 8443,
                    target: TargetPort::Number(8443),
                },
            ]
        );
        assert_eq!(
            info.selector,
            Some(BTreeMap::from([("app".into(), "web".into())]))
        );
        assert_eq!(info.affinity, Some(Duration::from_secs(60)));
    }

    #[test]
    fn headless_selectorless_and_default_affinity() {
        let info = service(json!({
            "clusterIP": "None",
            "clusterIPs": ["None"],
            "selector": {},
            "sessionAffinity": "ClientIP",
            "ports": [{"port": 80, "targetPort": 8080}],
        }))
        .unwrap();
        assert!(info.cluster_ips.is_empty());
        assert_eq!(info.selector, None);
        assert_eq!(info.affinity, Some(DEFAULT_AFFINITY_TIMEOUT));
        assert_eq!(info.ports[0].target, TargetPort::Number(8080));
        // clusterIP alone (older objects).
        let info = service(json!({"clusterIP": "10.96.0.11", "sessionAffinity": "None"})).unwrap();
        assert_eq!(info.cluster_ips, [ip("10.96.0.11")]);
        assert_eq!(info.affinity, None);
        assert!(info.ports.is_empty());
    }

    #[test]
    fn bad_services_name_the_field() {
        let cases = [
            (
                json!({"ports": [{"port": 80}, {"port": 0}]}),
                "spec.ports[1].port: 0 is not a port number (1-65535)",
            ),
            (
                json!({"ports": [{"port": 70000}]}),
                "spec.ports[0].port: 70000 is not a port number (1-65535)",
            ),
            (
                json!({"ports": [{"port": 80, "targetPort": 0}]}),
                "spec.ports[0].targetPort: 0 is not a port number (1-65535)",
            ),
            (
                json!({"ports": [{"port": 80, "targetPort": "65536"}]}),
                "spec.ports[0].targetPort: 65536 is not a port number (1-65535)",
            ),
            (
                json!({"ports": [{"port": 80, "targetPort": ""}]}),
                "spec.ports[0].targetPort: \"\" is neither a port number nor a port name",
            ),
            (
                json!({"ports": [{"port": 80}, {"port": 80, "name": "again"}]}),
                "spec.ports[1].port: TCP port 80 is listed twice",
            ),
            (
                json!({"clusterIPs": ["10.96.0.1", "nope"]}),
                "spec.clusterIPs[1]: \"nope\" is not an IP address",
            ),
            (
                json!({"clusterIP": "nope"}),
                "spec.clusterIP: \"nope\" is not an IP address",
            ),
            (
                json!({"type": "ExternalName", "externalName": "example.com"}),
                "spec.type: ExternalName services are not supported",
            ),
            (
                json!({"sessionAffinity": "Cookie"}),
                "spec.sessionAffinity: \"Cookie\" is not supported (only None and ClientIP)",
            ),
            (
                json!({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 0}}}),
                "spec.sessionAffinityConfig.clientIP.timeoutSeconds: 0 is out of range (1-86400)",
            ),
        ];
        for (spec, message) in cases {
            let error = service(spec.clone()).expect_err(&spec.to_string());
            assert_eq!(error.to_string(), message, "{spec}");
        }
        // A UDP port is skipped, not checked against the TCP ones.
        assert!(service(json!({"ports": [{"port": 53}, {"port": 53, "protocol": "UDP"}]})).is_ok());
        let no_spec: Service = serde_json::from_value(json!({"metadata": {"name": "x"}})).unwrap();
        assert_eq!(
            ServiceInfo::from_service(no_spec),
            Err(ServiceError::Missing("spec"))
        );
    }

    fn slice_object(address_type: &str, labels: serde_json::Value) -> serde_json::Value {
        json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {"name": "ext-abc", "namespace": "shop", "labels": labels},
            "addressType": address_type,
            "ports": [
                {"name": "http", "port": 8080},
                {"name": "dns", "port": 53, "protocol": "UDP"},
                {"name": "any"},
            ],
            "endpoints": [
                {"addresses": ["10.2.0.1", "10.2.0.9"]},
                {"addresses": ["10.2.0.2"], "conditions": {"ready": false}},
                {"addresses": ["10.2.0.3"], "conditions": {"ready": true, "serving": true}},
            ],
        })
    }

    #[test]
    fn an_endpoint_slice_keeps_tcp_ports_and_readiness() {
        let info = slice(slice_object("IPv4", json!({SERVICE_NAME_LABEL: "ext"}))).unwrap();
        assert_eq!(info.service, "ext");
        assert_eq!(info.namespace, "shop");
        assert_eq!(info.ports, [(Some("http".to_string()), 8080)]);
        assert_eq!(
            info.endpoints,
            [
                (ip("10.2.0.1"), true),
                (ip("10.2.0.2"), false),
                (ip("10.2.0.3"), true)
            ]
        );
    }

    #[test]
    fn bad_endpoint_slices_name_the_field() {
        let labels = json!({SERVICE_NAME_LABEL: "ext"});
        assert_eq!(
            slice(slice_object("IPv4", json!({})))
                .unwrap_err()
                .to_string(),
            "missing metadata.labels[\"kubernetes.io/service-name\"]"
        );
        assert_eq!(
            slice(slice_object("FQDN", labels.clone())).unwrap_err(),
            EndpointSliceError::AddressType("FQDN".into())
        );
        assert_eq!(
            slice(slice_object("IPv6", labels.clone()))
                .unwrap_err()
                .to_string(),
            "endpoints[0].addresses[0]: \"10.2.0.1\" is not an IPv6 address"
        );
        let mut bad_port = slice_object("IPv4", labels.clone());
        bad_port["ports"][1]["port"] = json!(0);
        bad_port["ports"][1]["protocol"] = json!("TCP");
        assert_eq!(
            slice(bad_port).unwrap_err().to_string(),
            "ports[1].port: 0 is not a port number (1-65535)"
        );
        let mut empty = slice_object("IPv4", labels);
        empty["endpoints"][2]["addresses"] = json!([]);
        assert_eq!(
            slice(empty).unwrap_err().to_string(),
            "endpoints[2].addresses: an endpoint needs at least one address"
        );
    }
}
