//! The agent's unix sockets (the admin API, the CNI plugin's): bound with mode 0600 in place
//! of a stale one, each connection handed to its own task, and removed at exit unless a
//! newer agent (an upgrade) has bound the path since.

use std::future::Future;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use tokio::net::{UnixListener, UnixStream};

/// Binds `path` (creating its directory; replacing a socket a crashed agent left), readable
/// and writable by root only.
pub(crate) fn bind_private(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Accepts connections until the task is dropped, each served by `handle` on a task of its
/// own.
pub(crate) fn accept_each<F, Fut>(
    listener: UnixListener,
    what: &'static str,
    handle: F,
) -> tokio::task::JoinHandle<()>
where
    F: Fn(UnixStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(handle(stream));
                }
                Err(e) => {
                    // Out of descriptors, most likely: wait instead of spinning on it.
                    tracing::warn!("{what} socket: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    })
}

/// Removes the socket at shutdown, unless another agent (a replacement started during an
/// upgrade) has bound the path since: `bound` is the inode we created.
pub fn remove_socket_if_ours(path: &Path, bound: u64) {
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.ino() == bound) {
        let _ = std::fs::remove_file(path);
    }
}

/// The inode of the socket file just bound at `path` (0 if it cannot be read).
pub fn socket_inode(path: &Path) -> u64 {
    std::fs::symlink_metadata(path)
        .map(|m| m.ino())
        .unwrap_or(0)
}
