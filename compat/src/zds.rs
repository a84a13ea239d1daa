//! A ZDS server: the node agent hands its pods to a stock Istio ztunnel, so ztunnel can be
//! the node proxy instead of ours.
//!
//! ZDS (`istio.workload.zds`) runs over a unix SOCK_SEQPACKET socket, one protobuf message
//! per packet. ztunnel connects and sends `ZdsHello`; the agent then sends the snapshot
//! (every current workload as `add`, each with the pod's network namespace fd as
//! SCM_RIGHTS, then `snapshot_sent`) and afterwards `add`/`del` as pods come and go. Each
//! request is answered by an `Ack` whose non-empty `error` is a refusal. Requests are
//! strictly sequential: the next is sent only after the previous one's ack.
//!
//! The socket hands out network namespaces of every pod, so it is created with mode 0600.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::socket::{
    self as sock, AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag,
    SockType, UnixAddr,
};
use prost::Message;
use tokio::io::Interest;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{watch, Mutex};
use tokio::task::JoinHandle;

use crate::pb::zds as pb;

/// ztunnel reads each packet into a 1024-byte buffer and rejects truncated ones.
pub const MAX_MESSAGE_LEN: usize = 1024;
/// How long ztunnel has to say hello after connecting.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Default wait for each ack (ztunnel starts the pod's proxy before acking an add).
pub const DEFAULT_ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a ZDS operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ZdsError {
    #[error("cannot listen on {path}: {reason}")]
    Bind { path: PathBuf, reason: String },
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("the fd given for workload {uid} is not a network namespace")]
    NotNetns { uid: String },
    #[error("workload uid must not be empty")]
    EmptyUid,
    #[error("the ZDS message for {uid} is {len} bytes; ztunnel accepts at most {MAX_MESSAGE_LEN}")]
    TooLarge { uid: String, len: usize },
    #[error("ztunnel refused {request} of workload {uid}: {error}")]
    Nack {
        request: &'static str,
        uid: String,
        error: String,
    },
    #[error("ztunnel refused the end of the snapshot: {0}")]
    SnapshotNack(String),
    #[error("ztunnel did not answer within {0:?}")]
    Timeout(Duration),
    #[error("ztunnel spoke out of turn: {0}")]
    Protocol(String),
    #[error("ztunnel announced ZDS version {0}; only V1 is spoken here")]
    Version(i32),
    #[error("the connection to ztunnel failed: {0}")]
    Io(String),
}

/// Who a workload is, as ztunnel needs it to build the pod's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadInfo {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
}

impl From<&WorkloadInfo> for pb::WorkloadInfo {
    fn from(w: &WorkloadInfo) -> Self {
        Self {
            name: w.name.clone(),
            namespace: w.namespace.clone(),
            service_account: w.service_account.clone(),
        }
    }
}

/// What became of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// ztunnel acknowledged it.
    Acked,
    /// No ztunnel is connected; the change is part of the snapshot it gets on connecting.
    Pending,
}

/// What the server knows now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZdsStatus {
    /// A ztunnel is connected and has acknowledged the snapshot.
    pub connected: bool,
    pub workloads: usize,
    /// The last failure (a refused snapshot entry, a lost connection...).
    pub last_error: Option<ZdsError>,
}

struct Workload {
    info: WorkloadInfo,
    netns: OwnedFd,
}

#[derive(Default)]
struct State {
    workloads: BTreeMap<String, Workload>,
    /// The connected ztunnel, once its snapshot was acknowledged.
    conn: Option<UnixStream>,
    last_error: Option<ZdsError>,
}

struct Inner {
    /// Held across a whole request/ack exchange: ZDS is strictly sequential.
    state: Mutex<State>,
    ack_timeout: Duration,
    connected: watch::Sender<bool>,
}

/// Listens for ztunnel on a SOCK_SEQPACKET unix socket. Dropping it stops listening and
/// removes the socket file.
pub struct ZdsServer {
    handle: ZdsHandle,
    path: PathBuf,
    accept: JoinHandle<()>,
}

impl fmt::Debug for ZdsServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ZdsServer")
            .field("path", &self.path)
            .finish()
    }
}

impl ZdsServer {
    /// Listens on `path` (a stale socket there is replaced; any other file is not).
    /// Must be called within a Tokio runtime.
    pub fn bind(path: impl AsRef<Path>) -> Result<Self, ZdsError> {
        Self::bind_with_ack_timeout(path, DEFAULT_ACK_TIMEOUT)
    }

    pub fn bind_with_ack_timeout(
        path: impl AsRef<Path>,
        ack_timeout: Duration,
    ) -> Result<Self, ZdsError> {
        let path = path.as_ref().to_owned();
        let listener = listen(&path)?;
        let (connected, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            state: Mutex::default(),
            ack_timeout,
            connected,
        });
        let accept = tokio::spawn(accept_loop(listener, Arc::downgrade(&inner)));
        Ok(Self {
            handle: ZdsHandle { inner },
            path,
            accept,
        })
    }

    pub fn handle(&self) -> ZdsHandle {
        self.handle.clone()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ZdsServer {
    fn drop(&mut self) {
        self.accept.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Adds and removes workloads. Cheap to clone.
#[derive(Clone)]
pub struct ZdsHandle {
    inner: Arc<Inner>,
}

impl fmt::Debug for ZdsHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ZdsHandle").finish_non_exhaustive()
    }
}

impl ZdsHandle {
    /// Hands a pod to ztunnel: `netns` is the pod's network namespace (e.g. an open
    /// `/proc/<pid>/ns/net`). Kept for every later snapshot until [`ZdsHandle::del`].
    pub async fn add(
        &self,
        uid: &str,
        info: WorkloadInfo,
        netns: OwnedFd,
    ) -> Result<Delivery, ZdsError> {
        if uid.is_empty() {
            return Err(ZdsError::EmptyUid);
        }
        if !is_netns(netns.as_fd()) {
            return Err(ZdsError::NotNetns {
                uid: uid.to_owned(),
            });
        }
        let msg = add_request(uid, &info);
        check_len(uid, &msg)?;
        let mut state = self.inner.state.lock().await;
        state
            .workloads
            .insert(uid.to_owned(), Workload { info, netns });
        let fd = state.workloads[uid].netns.as_raw_fd();
        self.exchange(&mut state, "add", uid, &msg, Some(fd)).await
    }

    /// Takes a pod away from ztunnel. Unknown uids are still announced (ztunnel may know
    /// them from an earlier agent run).
    pub async fn del(&self, uid: &str) -> Result<Delivery, ZdsError> {
        if uid.is_empty() {
            return Err(ZdsError::EmptyUid);
        }
        let msg = pb::WorkloadRequest {
            payload: Some(pb::workload_request::Payload::Del(pb::DelWorkload {
                uid: uid.to_owned(),
            })),
        };
        check_len(uid, &msg)?;
        let mut state = self.inner.state.lock().await;
        state.workloads.remove(uid);
        self.exchange(&mut state, "del", uid, &msg, None).await
    }

    pub async fn status(&self) -> ZdsStatus {
        let state = self.inner.state.lock().await;
        ZdsStatus {
            connected: state.conn.is_some(),
            workloads: state.workloads.len(),
            last_error: state.last_error.clone(),
        }
    }

    /// Follows whether a ztunnel is connected with its snapshot acknowledged.
    pub fn connected(&self) -> watch::Receiver<bool> {
        self.inner.connected.subscribe()
    }

    /// Sends one request on the live connection (if any) and waits for its ack. A lost
    /// connection is not an error for the caller: the next snapshot carries the change.
    async fn exchange(
        &self,
        state: &mut State,
        request: &'static str,
        uid: &str,
        msg: &pb::WorkloadRequest,
        fd: Option<RawFd>,
    ) -> Result<Delivery, ZdsError> {
        let Some(conn) = state.conn.as_ref() else {
            return Ok(Delivery::Pending);
        };
        match request_ack(conn, msg, fd, self.inner.ack_timeout).await {
            Ok(None) => Ok(Delivery::Acked),
            Ok(Some(error)) => {
                let err = ZdsError::Nack {
                    request,
                    uid: uid.to_owned(),
                    error,
                };
                tracing::warn!(error = %err, "ztunnel refused a workload request");
                state.last_error = Some(err.clone());
                Err(err)
            }
            Err(e) => {
                tracing::warn!(error = %e, "lost the ztunnel connection; it gets a snapshot when it reconnects");
                state.conn = None;
                state.last_error = Some(e);
                self.inner.connected.send_replace(false);
                Ok(Delivery::Pending)
            }
        }
    }
}

fn add_request(uid: &str, info: &WorkloadInfo) -> pb::WorkloadRequest {
    pb::WorkloadRequest {
        payload: Some(pb::workload_request::Payload::Add(pb::AddWorkload {
            uid: uid.to_owned(),
            workload_info: Some(info.into()),
        })),
    }
}

fn check_len(uid: &str, msg: &pb::WorkloadRequest) -> Result<(), ZdsError> {
    let len = msg.encoded_len();
    if len > MAX_MESSAGE_LEN {
        return Err(ZdsError::TooLarge {
            uid: uid.to_owned(),
            len,
        });
    }
    Ok(())
}

fn listen(path: &Path) -> Result<UnixListener, ZdsError> {
    let bind_err = |reason: String| ZdsError::Bind {
        path: path.to_owned(),
        reason,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|e| bind_err(e.to_string()))?;
        }
        Ok(_) => {
            return Err(ZdsError::NotASocket {
                path: path.to_owned(),
            })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(bind_err(e.to_string())),
    }
    let socket = sock::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| bind_err(e.to_string()))?;
    let addr = UnixAddr::new(path).map_err(|e| bind_err(e.to_string()))?;
    sock::bind(socket.as_raw_fd(), &addr).map_err(|e| bind_err(e.to_string()))?;
    // Before listen: nobody but the owner may connect and receive pod namespaces.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| bind_err(e.to_string()))?;
    sock::listen(
        &socket,
        Backlog::new(16).map_err(|e| bind_err(e.to_string()))?,
    )
    .map_err(|e| bind_err(e.to_string()))?;
    UnixListener::from_std(std::os::unix::net::UnixListener::from(socket))
        .map_err(|e| bind_err(e.to_string()))
}

async fn accept_loop(listener: UnixListener, inner: std::sync::Weak<Inner>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a ZDS connection failed");
                // accept errors (EMFILE...) are transient; do not spin on them.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        tokio::spawn(serve_connection(stream, inner.clone()));
    }
}

/// Takes one ztunnel connection through hello and snapshot, then makes it the live one.
async fn serve_connection(stream: UnixStream, inner: std::sync::Weak<Inner>) {
    // The hello is awaited before taking the state lock, so that a silent client cannot
    // hold up add/del or other connections.
    if let Err(e) = read_hello(&stream).await {
        tracing::warn!(error = %e, "ZDS connection dropped before a valid hello");
        if let Some(inner) = inner.upgrade() {
            inner.state.lock().await.last_error = Some(e);
        }
        return;
    }
    let Some(inner) = inner.upgrade() else {
        return;
    };
    // A new ztunnel replaces the old connection (ztunnel reconnects after restarts).
    let mut state = inner.state.lock().await;
    if state.conn.take().is_some() {
        inner.connected.send_replace(false);
    }
    match send_snapshot(&stream, &mut state, inner.ack_timeout).await {
        Ok(()) => {
            tracing::info!(
                workloads = state.workloads.len(),
                "ztunnel connected and acknowledged the snapshot"
            );
            state.conn = Some(stream);
            inner.connected.send_replace(true);
        }
        Err(e) => {
            tracing::warn!(error = %e, "ZDS connection dropped during the snapshot");
            state.last_error = Some(e);
        }
    }
}

/// Reads ztunnel's first message, which must be a V1 hello.
async fn read_hello(stream: &UnixStream) -> Result<(), ZdsError> {
    let (data, fds) = tokio::time::timeout(HELLO_TIMEOUT, recv_packet(stream))
        .await
        .map_err(|_| ZdsError::Timeout(HELLO_TIMEOUT))?
        .map_err(io_error)?
        .ok_or_else(|| ZdsError::Io("ztunnel closed the connection before its hello".into()))?;
    if !fds.is_empty() {
        return Err(ZdsError::Protocol("hello carried file descriptors".into()));
    }
    let hello = pb::ZdsHello::decode(data.as_slice())
        .map_err(|e| ZdsError::Protocol(format!("hello does not decode: {e}")))?;
    if hello.version != pb::Version::V1 as i32 {
        return Err(ZdsError::Version(hello.version));
    }
    Ok(())
}

/// Sends the snapshot. Refused entries are logged and kept (ztunnel retries a pod it
/// could not start); a refused end of snapshot fails.
async fn send_snapshot(
    stream: &UnixStream,
    state: &mut State,
    ack_timeout: Duration,
) -> Result<(), ZdsError> {
    for (uid, w) in &state.workloads {
        let msg = add_request(uid, &w.info);
        if let Some(error) =
            request_ack(stream, &msg, Some(w.netns.as_raw_fd()), ack_timeout).await?
        {
            let err = ZdsError::Nack {
                request: "add",
                uid: uid.clone(),
                error,
            };
            tracing::warn!(error = %err, "ztunnel refused a snapshot entry");
            state.last_error = Some(err);
        }
    }
    let done = pb::WorkloadRequest {
        payload: Some(pb::workload_request::Payload::SnapshotSent(
            pb::SnapshotSent {},
        )),
    };
    if let Some(error) = request_ack(stream, &done, None, ack_timeout).await? {
        return Err(ZdsError::SnapshotNack(error));
    }
    Ok(())
}

/// Sends one request and waits for its ack: `Ok(None)` is an ack, `Ok(Some(e))` a nack.
async fn request_ack(
    stream: &UnixStream,
    msg: &pb::WorkloadRequest,
    fd: Option<RawFd>,
    timeout: Duration,
) -> Result<Option<String>, ZdsError> {
    send_packet(stream, &msg.encode_to_vec(), fd)
        .await
        .map_err(io_error)?;
    let (data, fds) = tokio::time::timeout(timeout, recv_packet(stream))
        .await
        .map_err(|_| ZdsError::Timeout(timeout))?
        .map_err(io_error)?
        .ok_or_else(|| ZdsError::Io("ztunnel closed the connection".into()))?;
    if !fds.is_empty() {
        return Err(ZdsError::Protocol("an ack carried file descriptors".into()));
    }
    let response = pb::WorkloadResponse::decode(data.as_slice())
        .map_err(|e| ZdsError::Protocol(format!("response does not decode: {e}")))?;
    match response.payload {
        Some(pb::workload_response::Payload::Ack(ack)) if ack.error.is_empty() => Ok(None),
        Some(pb::workload_response::Payload::Ack(ack)) => Ok(Some(ack.error)),
        None => Err(ZdsError::Protocol("a response without an ack".into())),
    }
}

fn io_error(e: io::Error) -> ZdsError {
    ZdsError::Io(e.to_string())
}

/// Sends one packet, with `fd` as SCM_RIGHTS when given.
pub(crate) async fn send_packet(
    stream: &UnixStream,
    data: &[u8],
    fd: Option<RawFd>,
) -> io::Result<()> {
    let raw = stream.as_raw_fd();
    let fds: Vec<RawFd> = fd.into_iter().collect();
    stream
        .async_io(Interest::WRITABLE, || {
            let iov = [IoSlice::new(data)];
            let cmsgs: Vec<ControlMessage<'_>> = if fds.is_empty() {
                Vec::new()
            } else {
                vec![ControlMessage::ScmRights(&fds)]
            };
            // MSG_NOSIGNAL: a vanished peer is an EPIPE error, not a process-killing SIGPIPE.
            sock::sendmsg::<()>(raw, &iov, &cmsgs, MsgFlags::MSG_NOSIGNAL, None)
                .map_err(io::Error::from)
        })
        .await
        .map(|_| ())
}

/// Receives one packet and the fds sent with it; `None` at end of stream. Truncated
/// packets are errors (their fds are closed).
pub(crate) async fn recv_packet(
    stream: &UnixStream,
) -> io::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
    let raw = stream.as_raw_fd();
    let mut buf = vec![0u8; MAX_MESSAGE_LEN];
    loop {
        stream.readable().await?;
        let mut cmsg_space = nix::cmsg_space!([RawFd; 4]);
        let attempt = stream.try_io(Interest::READABLE, || {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let msg = sock::recvmsg::<()>(
                raw,
                &mut iov,
                Some(&mut cmsg_space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .map_err(io::Error::from)?;
            let mut fds = Vec::new();
            for cmsg in msg.cmsgs().map_err(io::Error::from)? {
                if let ControlMessageOwned::ScmRights(received) = cmsg {
                    for fd in received {
                        // SAFETY: SCM_RIGHTS fds were just installed in our table for us;
                        // nothing else owns them.
                        fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                    }
                }
            }
            Ok((msg.bytes, msg.flags, fds))
        });
        let (len, flags, fds) = match attempt {
            Ok(v) => v,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        if flags.intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "received a truncated packet",
            ));
        }
        if len == 0 && fds.is_empty() {
            return Ok(None);
        }
        buf.truncate(len);
        return Ok(Some((buf, fds)));
    }
}

/// Whether `fd` is a namespace file (nsfs; /proc/<pid>/ns/* on kernels before nsfs).
fn is_netns(fd: BorrowedFd<'_>) -> bool {
    let Ok(fs) = nix::sys::statfs::fstatfs(fd) else {
        return false;
    };
    if fs.filesystem_type() != nix::sys::statfs::NSFS_MAGIC
        && fs.filesystem_type() != nix::sys::statfs::PROC_SUPER_MAGIC
    {
        return false;
    }
    // NS_GET_NSTYPE (_IO(0xb7, 0x3): no direction, no size) says which kind of namespace.
    const NS_GET_NSTYPE: libc::Ioctl = 0xb703;
    // SAFETY: an ioctl without argument on a valid fd; it only returns a value.
    let kind = unsafe { libc::ioctl(fd.as_raw_fd(), NS_GET_NSTYPE) };
    kind == libc::CLONE_NEWNET
}

#[cfg(test)]
mod tests;
