//! Listener handover between an agent and its successor (a restart, an upgrade): the new
//! agent asks the running one for its listening sockets over a unix socket (mode 0600,
//! next to the admin socket) and serves on the very same sockets, while the old agent
//! drains its open tunnels. No port is ever unbound, so no connection is refused, and no
//! socket needs SO_REUSEPORT, which tc's bpf_sk_assign refuses before Linux 6.5.
//!
//! Protocol: the successor connects; the agent sends one byte with every listening socket
//! as SCM_RIGHTS and closes. The successor matches them by their bound address.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

use crate::local_socket;

/// At most this many sockets are handed over (the proxy has five).
const MAX_FDS: usize = 16;

/// Why a handover failed (the agent then binds fresh sockets).
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("handover socket {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> HandoverError + '_ {
    move |source| HandoverError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The handover socket of an agent whose admin socket is `admin_socket`.
pub fn socket_path(admin_socket: &Path) -> PathBuf {
    admin_socket.with_extension("listeners")
}

/// The listening sockets of the agent serving `path`; none when nobody serves it (the
/// first start, or a predecessor that crashed). Blocking, bounded by a timeout.
pub fn receive(path: &Path) -> Result<Vec<std::net::TcpListener>, HandoverError> {
    let stream = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(Vec::new())
        }
        Err(e) => return Err(io_err(path)(e)),
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(io_err(path))?;
    let mut byte = [0u8; 1];
    let mut iov = [IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let msg = recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(|e| io_err(path)(e.into()))?;
    let mut listeners = Vec::new();
    for cmsg in msg.cmsgs().map_err(|e| io_err(path)(e.into()))? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            for fd in fds {
                // SAFETY: the kernel installed this fd for us; nothing else owns it.
                let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                listeners.push(std::net::TcpListener::from(fd));
            }
        }
    }
    Ok(listeners)
}

/// Serves `fds` to successors at `path` (replacing whatever socket file is there) until
/// the returned task is aborted or the agent exits; `replaced` runs after each handover
/// (the successor now does what only one agent may do, such as reading drop reports).
pub fn serve(
    path: &Path,
    fds: Vec<OwnedFd>,
    replaced: impl Fn() + Send + Sync + 'static,
) -> Result<tokio::task::JoinHandle<()>, HandoverError> {
    let listener = local_socket::bind_private(path).map_err(io_err(path))?;
    let fds = Arc::new(fds);
    let replaced = Arc::new(replaced);
    Ok(local_socket::accept_each(
        listener,
        "listener handover",
        move |stream| {
            let fds = fds.clone();
            let replaced = replaced.clone();
            async move {
                let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
                // One small datagram-sized write on a fresh socket: it does not block.
                let sent = stream.into_std().and_then(|s| {
                    s.set_nonblocking(false)?;
                    s.set_write_timeout(Some(Duration::from_secs(5)))?;
                    sendmsg::<()>(
                        s.as_raw_fd(),
                        &[IoSlice::new(b"L")],
                        &[ControlMessage::ScmRights(&raw)],
                        MsgFlags::empty(),
                        None,
                    )
                    .map_err(std::io::Error::from)
                });
                match sent {
                    Ok(_) => {
                        tracing::info!("handed the proxy's listening sockets to a successor");
                        replaced();
                    }
                    Err(e) => tracing::warn!("listener handover failed: {e}"),
                }
            }
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[tokio::test]
    async fn listeners_pass_to_a_successor_which_then_accepts_on_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path(&dir.path().join("agent.sock"));
        assert!(receive(&path).unwrap().is_empty(), "nobody serves yet");

        let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addrs = [a.local_addr().unwrap(), b.local_addr().unwrap()];
        let handed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = handed.clone();
        let task = serve(&path, vec![OwnedFd::from(a), OwnedFd::from(b)], move || {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        })
        .unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        let p = path.clone();
        let got = tokio::task::spawn_blocking(move || receive(&p))
            .await
            .unwrap()
            .unwrap();
        let mut got_addrs: Vec<_> = got.iter().map(|l| l.local_addr().unwrap()).collect();
        got_addrs.sort();
        let mut want = addrs.to_vec();
        want.sort();
        assert_eq!(got_addrs, want);
        assert_eq!(
            handed.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "told once"
        );
        // the same sockets: a connection to the old address is accepted by the new handle
        let c = std::net::TcpStream::connect(addrs[0]).unwrap();
        let l = got
            .iter()
            .find(|l| l.local_addr().unwrap() == addrs[0])
            .unwrap();
        let (s, peer) = l.accept().unwrap();
        assert_eq!(peer, c.local_addr().unwrap());
        drop(s);

        // a stale socket file (its agent gone) is not an error: nothing to inherit
        task.abort();
        let _ = task.await;
        assert!(path.exists());
        assert!(receive(&path).unwrap().is_empty());
    }
}
