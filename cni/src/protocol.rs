//! What the CNI plugin and the node agent say to each other.
//!
//! # Transport
//!
//! A unix stream socket, by default [`DEFAULT_AGENT_SOCKET`], served by the node agent.
//! One request per connection:
//!
//! 1. the plugin connects and writes one [`Request`] as a single line of JSON ending in
//!    `\n`;
//! 2. the agent answers with one [`Reply`], also one line of JSON ending in `\n`, and
//!    closes the connection.
//!
//! A message is at most [`MAX_MESSAGE_BYTES`] bytes, the `\n` included. Unknown fields are
//! ignored on both sides, so either may add fields later.
//!
//! The plugin keeps its side of the connection open until it has the reply. If it gives
//! up first (its `agent_timeout_seconds` passed) it closes the connection: the agent then
//! sees EOF or EPIPE, and should still finish what it started (the runtime will retry the
//! ADD, or send a DEL).
//!
//! # When the agent answers
//!
//! - `add`: only once the pod is enrolled in redirection, i.e. its connections are
//!   captured from its first packet ([`Outcome::Enrolled`]), or once the agent knows that
//!   the pod is not to be enrolled ([`Outcome::NotEnrolled`]). The plugin, and with it the
//!   pod's start, waits for this answer: this is what closes the start-up race, where a pod
//!   could open connections before the agent had seen it and send them in plaintext.
//!   [`Outcome::Error`] fails the pod's start with the message (kubelet retries).
//! - `del`: once the agent has forgotten the pod (or never knew it); the plugin waits only a
//!   few seconds and ignores the outcome, since a DEL must succeed.
//! - `check`: [`Outcome::Enrolled`] if the pod should be enrolled and is,
//!   [`Outcome::NotEnrolled`] if it should not be and is not, [`Outcome::Error`] with a
//!   message saying what differs otherwise (the pod should be enrolled and is not, or the
//!   reverse).
//!
//! # The enrolled-namespaces file
//!
//! When the agent cannot be reached, the plugin decides from [`EnrolledNamespaces`], a
//! JSON file the agent keeps up to date (by default [`DEFAULT_STATE_FILE`]). The agent
//! should write it atomically (a temporary file in the same directory, then `rename`): a
//! file the plugin cannot parse counts as no file, and with `failure_policy: closed` no file
//! means pods wait for the agent.

use serde::{Deserialize, Serialize};
use std::io::{self, BufRead};
use std::net::IpAddr;

/// Where the agent listens unless the plugin's configuration says otherwise.
pub const DEFAULT_AGENT_SOCKET: &str = "/var/run/zmesh/cni.sock";

/// Where the agent writes [`EnrolledNamespaces`] unless the configuration says otherwise.
pub const DEFAULT_STATE_FILE: &str = "/var/run/zmesh/enrolled-namespaces.json";

/// The longest request or reply line, `\n` included.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// The CNI operation a request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    Add,
    Del,
    Check,
}

/// The Kubernetes pod, from the runtime's `CNI_ARGS` (`K8S_POD_NAMESPACE`, `K8S_POD_NAME`,
/// `K8S_POD_UID`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    /// `metadata.uid`; empty if the runtime did not send `K8S_POD_UID` (runtimes before
    /// containerd 1.x / CRI-O 1.x), in which case the agent goes by namespace and name.
    #[serde(default)]
    pub uid: String,
}

/// One request from the plugin.
///
/// ```json
/// {"command":"add","container_id":"8f1c…","netns":"/var/run/netns/cni-6a0c…","ifname":"eth0",
///  "pod":{"namespace":"shop","name":"web-0","uid":"4f5e…"},"ips":["10.22.0.5"]}
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub command: Command,
    /// `CNI_CONTAINERID`: the pod sandbox's ID.
    pub container_id: String,
    /// `CNI_NETNS`: the path of the pod's network namespace. May be empty on `del` (the
    /// runtime may have removed it already).
    #[serde(default)]
    pub netns: String,
    /// `CNI_IFNAME`: the pod's interface (usually `eth0`).
    pub ifname: String,
    pub pod: Pod,
    /// The pod's addresses, without prefix length, from the previous plugin's result
    /// (`prevResult.ips[].address`). Set on `add` and `check`; on `del` set if the runtime
    /// sent the cached result, empty otherwise.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
}

/// The agent's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The pod is enrolled: its traffic is redirected into the mesh.
    Enrolled,
    /// The pod is not to be enrolled (its namespace is not enrolled, or it opted out).
    NotEnrolled,
    /// The agent cannot do what was asked; `message` says why. Fails ADD and CHECK.
    Error,
}

/// One reply from the agent.
///
/// ```json
/// {"outcome":"enrolled","message":"shop/web-0 enrolled (netns cookie 4099)"}
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub outcome: Outcome,
    /// For people: logged by the plugin, and for `error` shown in the pod's events.
    #[serde(default)]
    pub message: String,
}

/// The agent's enrolled-namespaces file (see the module documentation).
///
/// ```json
/// {"enrolled_namespaces":["shop","payments"],"written_at":"2026-05-01T10:00:00Z"}
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrolledNamespaces {
    pub enrolled_namespaces: Vec<String>,
    /// RFC 3339; logged by the plugin so that a stale file can be recognised.
    #[serde(default)]
    pub written_at: String,
}

/// A failure to read one message.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("the connection was closed before a message")]
    Closed,
    #[error("message longer than {MAX_MESSAGE_BYTES} bytes")]
    TooLong,
    #[error("invalid message: {0}")]
    Invalid(#[from] serde_json::Error),
}

/// `message` as one line: JSON and `\n`.
pub fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    // Our message types are plain structs of strings and enums: serialising them cannot fail.
    let mut line = serde_json::to_vec(message).expect("protocol messages always serialise");
    line.push(b'\n');
    line
}

/// Reads one message: a line of JSON up to `\n`, or up to EOF if the peer closed without
/// one, at most [`MAX_MESSAGE_BYTES`].
pub fn read_message<T: for<'de> Deserialize<'de>, R: BufRead>(reader: R) -> Result<T, ReadError> {
    let mut line = Vec::new();
    // One byte past the limit tells a full-length line from a longer one.
    reader
        .take(MAX_MESSAGE_BYTES as u64 + 1)
        .read_until(b'\n', &mut line)?;
    if line.len() > MAX_MESSAGE_BYTES {
        return Err(ReadError::TooLong);
    }
    if line.iter().all(u8::is_ascii_whitespace) {
        return Err(ReadError::Closed);
    }
    Ok(serde_json::from_slice(&line)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn request_wire_shape() {
        let request = Request {
            command: Command::Add,
            container_id: "c1".into(),
            netns: "/var/run/netns/cni-1".into(),
            ifname: "eth0".into(),
            pod: Pod {
                namespace: "shop".into(),
                name: "web-0".into(),
                uid: "u-1".into(),
            },
            ips: vec!["10.22.0.5".parse().unwrap(), "fd00::5".parse().unwrap()],
        };
        let line = encode(&request);
        assert_eq!(line.last(), Some(&b'\n'));
        assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1);
        let value: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(
            value,
            json!({"command": "add", "container_id": "c1", "netns": "/var/run/netns/cni-1",
                   "ifname": "eth0", "pod": {"namespace": "shop", "name": "web-0", "uid": "u-1"},
                   "ips": ["10.22.0.5", "fd00::5"]})
        );
        let back: Request = read_message(&line[..]).unwrap();
        assert_eq!(back, request);
    }

    #[test]
    fn reply_wire_shape_and_leniency() {
        for (outcome, text) in [
            (Outcome::Enrolled, "enrolled"),
            (Outcome::NotEnrolled, "not_enrolled"),
            (Outcome::Error, "error"),
        ] {
            let line = encode(&Reply {
                outcome,
                message: "m".into(),
            });
            let value: serde_json::Value = serde_json::from_slice(&line).unwrap();
            assert_eq!(value, json!({"outcome": text, "message": "m"}));
        }
        // No message, unknown fields, no final newline: all accepted.
        let reply: Reply = read_message(&br#"{"outcome":"enrolled","later":1}"#[..]).unwrap();
        assert_eq!(reply.outcome, Outcome::Enrolled);
        assert_eq!(reply.message, "");
        // An unknown outcome is not.
        assert!(matches!(
            read_message::<Reply, _>(&br#"{"outcome":"maybe"}"#[..]),
            Err(ReadError::Invalid(_))
        ));
    }

    #[test]
    fn read_message_limits() {
        assert!(matches!(
            read_message::<Reply, _>(&b""[..]),
            Err(ReadError::Closed)
        ));
        let mut long = br#"{"outcome":"enrolled","message":""#.to_vec();
        long.resize(MAX_MESSAGE_BYTES + 10, b'x');
        assert!(matches!(
            read_message::<Reply, _>(&long[..]),
            Err(ReadError::TooLong)
        ));
        // Only the first line is read.
        let two = b"{\"outcome\":\"error\",\"message\":\"a\"}\n{\"outcome\":\"enrolled\"}\n";
        let reply: Reply = read_message(&two[..]).unwrap();
        assert_eq!(reply.outcome, Outcome::Error);
    }

    #[test]
    fn del_request_may_lack_netns_and_ips() {
        let request: Request = serde_json::from_str(
            r#"{"command":"del","container_id":"c","ifname":"eth0",
                "pod":{"namespace":"n","name":"p"}}"#,
        )
        .unwrap();
        assert_eq!(request.netns, "");
        assert!(request.ips.is_empty());
        assert_eq!(request.pod.uid, "");
    }
}
