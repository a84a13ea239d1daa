//! The plugin's side of the [protocol](crate::protocol): one request, one reply, within a
//! deadline.

use crate::protocol::{encode, read_message, ReadError, Reply, Request};
use std::io::{self, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Why the agent gave no answer. Every one of these counts as "agent not reachable" for the
/// failure policy: the pod cannot be known to be enrolled.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot connect: {0}")]
    Connect(io::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Io(io::Error),
    #[error("it closed the connection without answering")]
    NoReply,
    #[error("invalid answer: {0}")]
    BadReply(String),
}

/// Sends `request` to the agent at `socket` and waits at most `timeout` for its reply.
pub fn call(socket: &Path, request: &Request, timeout: Duration) -> Result<Reply, AgentError> {
    let deadline = Instant::now() + timeout;
    let line = encode(request);
    let socket: PathBuf = socket.to_owned();
    // The exchange runs on a thread so that the deadline also bounds `connect`, which blocks
    // without limit on a unix socket whose backlog is full (an agent that stopped accepting).
    // If the deadline passes, the thread is left behind: the process is about to exit, and
    // the socket timeouts below end it soon anyway.
    let (tx, rx) = mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name("zmesh-cni-agent".into())
        .spawn(move || {
            // The receiver is gone only if the deadline passed: nobody wants the answer.
            let _ = tx.send(exchange(&socket, &line, deadline, timeout));
        })
        .map_err(AgentError::Io)?;
    match rx.recv_timeout(timeout) {
        Ok(result) => result,
        Err(_) => Err(AgentError::Timeout(timeout)),
    }
}

fn exchange(
    socket: &Path,
    line: &[u8],
    deadline: Instant,
    timeout: Duration,
) -> Result<Reply, AgentError> {
    let stream = UnixStream::connect(socket).map_err(AgentError::Connect)?;
    let timed_out = |e: io::Error| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => AgentError::Timeout(timeout),
        _ => AgentError::Io(e),
    };
    stream
        .set_write_timeout(Some(remaining(deadline)))
        .map_err(AgentError::Io)?;
    (&stream).write_all(line).map_err(timed_out)?;
    stream
        .set_read_timeout(Some(remaining(deadline)))
        .map_err(AgentError::Io)?;
    match read_message::<Reply, _>(BufReader::new(&stream)) {
        Ok(reply) => Ok(reply),
        Err(ReadError::Io(e)) => Err(timed_out(e)),
        Err(ReadError::Closed) => Err(AgentError::NoReply),
        Err(e @ (ReadError::TooLong | ReadError::Invalid(_))) => {
            Err(AgentError::BadReply(e.to_string()))
        }
    }
}

/// Time left before `deadline`, never zero (a zero socket timeout is refused by std).
fn remaining(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1))
}
