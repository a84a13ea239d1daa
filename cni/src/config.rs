//! The network configuration the runtime gives on stdin: CNI's fields, ours (the plugin's
//! entry in the conflist) and the previous plugin's result.

use crate::error::CniError;
use crate::protocol::{DEFAULT_AGENT_SOCKET, DEFAULT_STATE_FILE};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

/// The CNI versions this plugin speaks: results have had today's `ips` shape since 0.3.0
/// (CHECK came in 0.4.0; runtimes send none under 0.3.x). 0.3.1 is what Calico's and
/// Flannel's default configurations still say.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The version of errors written before the configuration's own version is known.
pub const FALLBACK_VERSION: &str = "1.0.0";

/// A DEL waits this long for the agent at most: it must not hold up the pod's teardown.
pub const MAX_DEL_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailurePolicy {
    /// Agent down: pods that may be in an enrolled namespace do not start.
    Closed,
    /// Agent down: pods start anyway, unprotected until the agent is back.
    Open,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub cni_version: String,
    pub agent_socket: PathBuf,
    pub failure_policy: FailurePolicy,
    pub state_file: PathBuf,
    pub exclude_namespaces: Vec<String>,
    pub agent_timeout: Duration,
    pub log_file: Option<PathBuf>,
    /// `prevResult`, if the runtime sent one (`null` counts as none).
    pub prev_result: Option<Value>,
}

/// Only the keys we read; everything else in the configuration (name, type, runtimeConfig,
/// args, capabilities...) is ignored.
#[derive(Deserialize)]
struct Raw {
    #[serde(rename = "cniVersion")]
    cni_version: Option<String>,
    #[serde(rename = "prevResult")]
    prev_result: Option<Value>,
    agent_socket: Option<PathBuf>,
    failure_policy: Option<FailurePolicy>,
    state_file: Option<PathBuf>,
    exclude_namespaces: Option<Vec<String>>,
    agent_timeout_seconds: Option<f64>,
    log_file: Option<PathBuf>,
}

impl Config {
    pub fn parse(stdin: &[u8]) -> Result<Config, CniError> {
        let value: Value = serde_json::from_slice(stdin).map_err(CniError::Decode)?;
        let raw: Raw =
            serde_json::from_value(value).map_err(|e| CniError::InvalidConfig(e.to_string()))?;
        let cni_version = raw
            .cni_version
            .ok_or_else(|| CniError::InvalidConfig("cniVersion is missing".into()))?;
        if !SUPPORTED_VERSIONS.contains(&cni_version.as_str()) {
            return Err(CniError::IncompatibleVersion {
                version: cni_version,
            });
        }
        let agent_timeout = match raw.agent_timeout_seconds {
            None => Duration::from_secs(30),
            Some(seconds) => Duration::try_from_secs_f64(seconds)
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| {
                    CniError::InvalidConfig(format!(
                        "agent_timeout_seconds must be a positive number of seconds, not {seconds}"
                    ))
                })?,
        };
        Ok(Config {
            cni_version,
            agent_socket: raw
                .agent_socket
                .unwrap_or_else(|| DEFAULT_AGENT_SOCKET.into()),
            failure_policy: raw.failure_policy.unwrap_or(FailurePolicy::Closed),
            state_file: raw.state_file.unwrap_or_else(|| DEFAULT_STATE_FILE.into()),
            exclude_namespaces: raw
                .exclude_namespaces
                .unwrap_or_else(|| vec!["kube-system".into()]),
            agent_timeout,
            log_file: raw.log_file,
            prev_result: raw.prev_result.filter(|v| !v.is_null()),
        })
    }

    /// `cniVersion` of `stdin` if it is one we speak, for error objects written before (or
    /// without) a valid configuration.
    pub fn version_of(stdin: &[u8]) -> String {
        serde_json::from_slice::<Value>(stdin)
            .ok()
            .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_owned))
            .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
            .unwrap_or_else(|| FALLBACK_VERSION.to_owned())
    }

    /// The previous result, which a chained plugin must have on ADD and CHECK.
    pub fn require_prev_result(&self) -> Result<&Map<String, Value>, CniError> {
        match &self.prev_result {
            None => Err(CniError::InvalidConfig(
                "prevResult is missing: zmesh-cni is a chained plugin and must come after the \
                 plugin that gives the pod its addresses"
                    .into(),
            )),
            Some(Value::Object(result)) => Ok(result),
            Some(_) => Err(CniError::InvalidConfig(
                "prevResult is not a JSON object".into(),
            )),
        }
    }

    /// What ADD prints: the previous result unchanged, in the configuration's version.
    pub fn add_result(&self) -> Result<Value, CniError> {
        let mut result = self.require_prev_result()?.clone();
        result.insert("cniVersion".into(), Value::String(self.cni_version.clone()));
        Ok(Value::Object(result))
    }

    /// How long a DEL waits for the agent.
    pub fn del_timeout(&self) -> Duration {
        self.agent_timeout.min(MAX_DEL_TIMEOUT)
    }
}

/// The addresses of a result (`ips[].address`, CIDR notation), without prefix length.
pub fn result_ips(result: &Map<String, Value>) -> Result<Vec<IpAddr>, CniError> {
    let invalid = |what: String| CniError::InvalidConfig(format!("prevResult: {what}"));
    let ips = match result.get("ips") {
        // A result may carry no addresses (a plugin that only creates interfaces).
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(ips)) => ips,
        Some(_) => return Err(invalid("ips is not a list".into())),
    };
    ips.iter()
        .enumerate()
        .map(|(i, ip)| {
            let address = ip
                .get("address")
                .and_then(Value::as_str)
                .ok_or_else(|| invalid(format!("ips[{i}].address is missing")))?;
            parse_cidr_address(address)
                .ok_or_else(|| invalid(format!("ips[{i}].address {address:?} is not IP/prefix")))
        })
        .collect()
}

fn parse_cidr_address(cidr: &str) -> Option<IpAddr> {
    let (ip, prefix) = cidr.split_once('/')?;
    let ip: IpAddr = ip.parse().ok()?;
    let prefix: u8 = prefix.parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    (prefix <= max).then_some(ip)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(value: Value) -> Result<Config, CniError> {
        Config::parse(value.to_string().as_bytes())
    }

    #[test]
    fn defaults() {
        let config =
            parse(json!({"cniVersion": "1.0.0", "name": "k8s", "type": "zmesh-cni"})).unwrap();
        assert_eq!(
            config.agent_socket,
            PathBuf::from("/var/run/zmesh/cni.sock")
        );
        assert_eq!(config.failure_policy, FailurePolicy::Closed);
        assert_eq!(
            config.state_file,
            PathBuf::from("/var/run/zmesh/enrolled-namespaces.json")
        );
        assert_eq!(config.exclude_namespaces, vec!["kube-system".to_owned()]);
        assert_eq!(config.agent_timeout, Duration::from_secs(30));
        assert_eq!(config.del_timeout(), Duration::from_secs(5));
        assert_eq!(config.log_file, None);
        assert_eq!(config.prev_result, None);
    }

    #[test]
    fn every_key() {
        let config = parse(json!({
            "cniVersion": "0.4.0", "agent_socket": "/s", "failure_policy": "open",
            "state_file": "/f", "exclude_namespaces": [], "agent_timeout_seconds": 0.25,
            "log_file": "/l", "prevResult": null, "runtimeConfig": {"x": 1}
        }))
        .unwrap();
        assert_eq!(config.agent_socket, PathBuf::from("/s"));
        assert_eq!(config.failure_policy, FailurePolicy::Open);
        assert!(config.exclude_namespaces.is_empty());
        assert_eq!(config.agent_timeout, Duration::from_millis(250));
        assert_eq!(config.del_timeout(), Duration::from_millis(250));
        assert_eq!(config.log_file, Some(PathBuf::from("/l")));
        assert_eq!(config.prev_result, None);
    }

    #[test]
    fn invalid() {
        let code = |v: Value| parse(v).unwrap_err().code();
        assert_eq!(
            code(json!({"cniVersion": "1.0.0", "failure_policy": "ajar"})),
            7
        );
        assert_eq!(code(json!({"cniVersion": "1.0.0", "failure_policy": 1})), 7);
        assert_eq!(
            code(json!({"cniVersion": "1.0.0", "exclude_namespaces": "a"})),
            7
        );
        for timeout in [json!(0), json!(-1), json!(1e300), json!("5")] {
            assert_eq!(
                code(json!({"cniVersion": "1.0.0", "agent_timeout_seconds": timeout})),
                7
            );
        }
        assert_eq!(code(json!({"name": "x"})), 7);
        assert_eq!(code(json!(["cniVersion"])), 7);
        assert_eq!(code(json!({"cniVersion": "0.2.0"})), 1);
        assert_eq!(code(json!({"cniVersion": 1})), 7);
        assert_eq!(Config::parse(b"{").unwrap_err().code(), 6);
        assert_eq!(Config::parse(b"").unwrap_err().code(), 6);
    }

    #[test]
    fn version_of() {
        assert_eq!(Config::version_of(br#"{"cniVersion":"0.4.0"}"#), "0.4.0");
        assert_eq!(Config::version_of(br#"{"cniVersion":"9.9.9"}"#), "1.0.0");
        assert_eq!(Config::version_of(b"nonsense"), "1.0.0");
    }

    #[test]
    fn ips_of_a_result() {
        let result = json!({"ips": [
            {"address": "10.22.0.5/16", "gateway": "10.22.0.1", "interface": 2},
            {"version": "6", "address": "fd00::5/64"}
        ]});
        let ips = result_ips(result.as_object().unwrap()).unwrap();
        assert_eq!(
            ips,
            vec![
                "10.22.0.5".parse::<IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );
        assert!(result_ips(json!({}).as_object().unwrap())
            .unwrap()
            .is_empty());
        for bad in [
            json!({"ips": "10.0.0.1/8"}),
            json!({"ips": [{"address": "10.0.0.1"}]}),
            json!({"ips": [{"address": "10.0.0.1/33"}]}),
            json!({"ips": [{"address": "fd00::1/129"}]}),
            json!({"ips": [{"address": "ten/8"}]}),
            json!({"ips": [{"gateway": "10.0.0.1"}]}),
            json!({"ips": [{"address": 5}]}),
        ] {
            assert_eq!(
                result_ips(bad.as_object().unwrap()).unwrap_err().code(),
                7,
                "{bad}"
            );
        }
    }

    #[test]
    fn add_result_passes_through_in_the_configured_version() {
        let prev = json!({"cniVersion": "1.0.0", "interfaces": [{"name": "eth0"}],
                          "ips": [{"address": "10.0.0.2/24"}], "extra": {"kept": true}});
        let config = parse(json!({"cniVersion": "1.1.0", "prevResult": prev.clone()})).unwrap();
        let mut expected = prev;
        expected["cniVersion"] = json!("1.1.0");
        assert_eq!(config.add_result().unwrap(), expected);
        let none = parse(json!({"cniVersion": "1.0.0"})).unwrap();
        assert_eq!(none.add_result().unwrap_err().code(), 7);
        let scalar = parse(json!({"cniVersion": "1.0.0", "prevResult": 3})).unwrap();
        assert_eq!(scalar.add_result().unwrap_err().code(), 7);
    }
}
