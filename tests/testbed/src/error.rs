//! The testbed's error type.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong while building, using or tearing down a cluster.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The cluster description cannot be built (bad name, duplicate, too many nodes or pods).
    #[error("invalid cluster spec: {0}")]
    InvalidSpec(String),

    /// No cgroup v2 hierarchy is mounted, so pods cannot get their own cgroup.
    #[error("no cgroup2 mount found in /proc/self/mounts (pods need cgroup v2)")]
    NoCgroup2,

    /// An external command (ip, tcpdump) could not be started at all.
    #[error("could not start `{command}`: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// Why it could not start.
        #[source]
        source: io::Error,
    },

    /// An external command ran and failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// What it printed on stderr (trimmed).
        stderr: String,
    },

    /// A file-system or system-call operation on a path failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done ("creating cgroup", "opening netns", ...).
        action: &'static str,
        /// The path it was done on.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// Entering a network namespace failed.
    #[error("entering network namespace {netns}: {source}")]
    Setns {
        /// The namespace name.
        netns: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// A socket operation inside a namespace failed.
    #[error("{action} in network namespace {netns}: {source}")]
    Socket {
        /// What was being done ("binding 0.0.0.0:80", "connecting to ...").
        action: String,
        /// The namespace name.
        netns: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// Something we wait for did not happen in time.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// What we waited for.
        what: String,
        /// How long we waited.
        after: Duration,
    },

    /// tcpdump did not start capturing or did not stop cleanly.
    #[error("packet capture: {0}")]
    Capture(String),

    /// A pcap file is malformed.
    #[error("malformed pcap data: {0}")]
    Pcap(String),

    /// An HTTP exchange with a test server went wrong.
    #[error("http: {0}")]
    Http(String),

    /// Tearing a run down left something behind; each entry says what.
    #[error("teardown of run {run_id} left resources behind: {}", problems.join("; "))]
    Teardown {
        /// The run being torn down.
        run_id: String,
        /// One line per failed step.
        problems: Vec<String>,
    },
}

impl Error {
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io {
            action,
            path: path.into(),
            source,
        }
    }
}

/// Result with the testbed's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
