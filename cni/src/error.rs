//! Every way the plugin fails, and the CNI error code of each (in [`CniError::code`], the
//! one place codes are chosen).

use crate::client::AgentError;
use crate::protocol::{Command, Pod};
use serde_json::{json, Value};
use std::fmt;
use std::path::PathBuf;

/// CNI's well-known error codes (SPEC.md, "Well-known Error Codes"); 100+ are ours.
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const INVALID_ENV: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE_FAILURE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// The agent answered `error`.
    pub const AGENT_REFUSED: u32 = 100;
}

#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error("CNI version {version:?} is not supported (supported: {supported})", supported = crate::config::SUPPORTED_VERSIONS.join(", "))]
    IncompatibleVersion { version: String },
    #[error("{var} is required for {command}")]
    MissingEnv {
        var: &'static str,
        command: &'static str,
    },
    #[error("{0}")]
    InvalidEnv(String),
    #[error("reading the network configuration from stdin: {0}")]
    Stdin(std::io::Error),
    #[error("the network configuration on stdin is not JSON: {0}")]
    Decode(serde_json::Error),
    #[error("invalid network configuration: {0}")]
    InvalidConfig(String),
    #[error("{0}")]
    AgentUnreachable(Box<Unreachable>),
    #[error("{}", refused_message(*.command, .pod, .message))]
    AgentRefused {
        command: Command,
        pod: Pod,
        message: String,
    },
}

fn refused_message(command: Command, pod: &Pod, message: &str) -> String {
    let (ns, name) = (&pod.namespace, &pod.name);
    match command {
        Command::Check => format!("zmesh agent: pod {ns}/{name} is not as it should be: {message}"),
        _ => format!("zmesh agent could not enroll pod {ns}/{name}: {message}"),
    }
}

impl CniError {
    pub fn code(&self) -> u32 {
        match self {
            CniError::IncompatibleVersion { .. } => code::INCOMPATIBLE_VERSION,
            CniError::MissingEnv { .. } | CniError::InvalidEnv(_) => code::INVALID_ENV,
            CniError::Stdin(_) => code::IO_FAILURE,
            CniError::Decode(_) => code::DECODE_FAILURE,
            CniError::InvalidConfig(_) => code::INVALID_CONFIG,
            // kubelet retries the pod's sandbox; by then the agent may be back.
            CniError::AgentUnreachable(_) => code::TRY_AGAIN_LATER,
            CniError::AgentRefused { .. } => code::AGENT_REFUSED,
        }
    }

    /// The error object CNI wants on stdout.
    pub fn to_json(&self, cni_version: &str) -> Value {
        json!({"cniVersion": cni_version, "code": self.code(), "msg": self.to_string()})
    }
}

/// What the plugin knew about the pod's namespace when the agent could not be reached and
/// the failure policy is `closed`.
#[derive(Debug)]
pub enum NamespaceKnowledge {
    /// The agent's state file lists it as enrolled.
    Enrolled,
    /// No usable state file: the agent may never have run on this node.
    Unknown { state_file: PathBuf, reason: String },
}

/// The agent could not be asked about a pod that may need to be enrolled.
#[derive(Debug)]
pub struct Unreachable {
    pub command: Command,
    pub socket: PathBuf,
    pub reason: AgentError,
    pub pod: Pod,
    pub namespace: NamespaceKnowledge,
}

impl fmt::Display for Unreachable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Unreachable {
            command,
            socket,
            reason,
            pod,
            namespace,
        } = self;
        write!(
            f,
            "zmesh agent not reachable at {}: {reason}; pod {}/{} ",
            socket.display(),
            pod.namespace,
            pod.name
        )?;
        match namespace {
            NamespaceKnowledge::Enrolled => write!(f, "is in an enrolled namespace")?,
            NamespaceKnowledge::Unknown { state_file, reason } => write!(
                f,
                "may be in an enrolled namespace (no readable state file {}: {reason})",
                state_file.display()
            )?,
        }
        match command {
            Command::Check => write!(f, " and its enrollment cannot be checked")?,
            _ => write!(f, " and is not started without mTLS")?,
        }
        write!(f, " (failure_policy closed)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod() -> Pod {
        Pod {
            namespace: "shop".into(),
            name: "web-0".into(),
            uid: "u".into(),
        }
    }

    #[test]
    fn unreachable_message_is_what_kubelet_shows() {
        let error = CniError::AgentUnreachable(Box::new(Unreachable {
            command: Command::Add,
            socket: "/var/run/zmesh/cni.sock".into(),
            reason: AgentError::NoReply,
            pod: pod(),
            namespace: NamespaceKnowledge::Enrolled,
        }));
        assert_eq!(error.code(), 11);
        assert_eq!(
            error.to_string(),
            "zmesh agent not reachable at /var/run/zmesh/cni.sock: it closed the connection \
             without answering; pod shop/web-0 is in an enrolled namespace and is not started \
             without mTLS (failure_policy closed)"
        );
        let json = error.to_json("1.0.0");
        assert_eq!(json["cniVersion"], "1.0.0");
        assert_eq!(json["code"], 11);
        assert_eq!(json["msg"], error.to_string());
    }

    #[test]
    fn codes() {
        let cases: Vec<(CniError, u32)> = vec![
            (
                CniError::IncompatibleVersion {
                    version: "0.2.0".into(),
                },
                1,
            ),
            (
                CniError::MissingEnv {
                    var: "CNI_NETNS",
                    command: "ADD",
                },
                4,
            ),
            (CniError::InvalidEnv("x".into()), 4),
            (CniError::Stdin(std::io::Error::other("x")), 5),
            (
                CniError::Decode(serde_json::from_str::<Value>("{").unwrap_err()),
                6,
            ),
            (CniError::InvalidConfig("x".into()), 7),
            (
                CniError::AgentRefused {
                    command: Command::Add,
                    pod: pod(),
                    message: "no".into(),
                },
                100,
            ),
        ];
        for (error, code) in cases {
            assert_eq!(error.code(), code, "{error}");
        }
    }
}
