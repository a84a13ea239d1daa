//! Named network namespaces: entering them from a thread or a child process.

use std::ffi::{CString, OsStr};
use std::fs::{File, OpenOptions};
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::error::{Error, Result};

/// Where iproute2 keeps named network namespaces (bind mounts of /proc/<pid>/ns/net).
pub(crate) const NETNS_DIR: &str = "/run/netns";

/// How long socket helpers wait for a connection or a read before giving up.
pub(crate) const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// `SO_NETNS_COOKIE` (Linux 5.14+); not exported by the libc crate yet.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// A named network namespace (`ip netns` style), kept open so it can be entered.
#[derive(Debug)]
pub struct Netns {
    name: String,
    path: PathBuf,
    file: File,
    /// Listeners bind `[::]` (both families) instead of 0.0.0.0.
    dual_stack: bool,
}

impl Netns {
    /// Creates the namespace with `ip netns add` and opens it.
    pub(crate) fn add(name: &str) -> Result<Netns> {
        crate::cmd::ip(&["netns", "add", name])?;
        let path = Path::new(NETNS_DIR).join(name);
        let file = File::open(&path).map_err(|e| Error::io("opening netns", &path, e))?;
        Ok(Netns {
            name: name.to_owned(),
            path,
            file,
            dual_stack: false,
        })
    }

    /// Makes [`Netns::tcp_listener`] accept IPv6 as well as IPv4.
    pub(crate) fn set_dual_stack(&mut self) {
        self.dual_stack = true;
    }

    /// The namespace's name, as `ip netns list` shows it (use with `ip -n NAME`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bind-mounted namespace file (/run/netns/NAME), e.g. for `setns` or `nsenter --net=`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on a fresh thread that has entered this namespace, and returns its result.
    ///
    /// Sockets created inside `f` stay in this namespace for their whole life, so this is how
    /// tests get std or tokio sockets "inside" a pod. A panic in `f` is propagated.
    pub fn run<F, R>(&self, f: F) -> Result<R>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        let fd = self.file.as_raw_fd();
        std::thread::scope(|s| {
            let handle = s.spawn(move || {
                // SAFETY: setns on a valid namespace fd only changes this thread's namespace.
                if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(f())
            });
            match handle.join() {
                Ok(result) => result.map_err(|source| Error::Setns {
                    netns: self.name.clone(),
                    source,
                }),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// The namespace's cookie, as eBPF programs see it (`bpf_get_netns_cookie`).
    pub fn cookie(&self) -> Result<u64> {
        self.run(|| {
            let socket = UdpSocket::bind("127.0.0.1:0")?;
            let mut cookie: u64 = 0;
            let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
            // SAFETY: cookie and len are valid for writes of the sizes given.
            let rc = unsafe {
                libc::getsockopt(
                    socket.as_raw_fd(),
                    libc::SOL_SOCKET,
                    SO_NETNS_COOKIE,
                    (&mut cookie as *mut u64).cast(),
                    &mut len,
                )
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(cookie)
        })?
        .map_err(|source| self.socket_error("reading SO_NETNS_COOKIE".into(), source))
    }

    /// A TCP listener on 0.0.0.0:`port` in this namespace (port 0 picks a free port); in a
    /// dual-stack cluster on `[::]:port`, which takes IPv4 too.
    pub fn tcp_listener(&self, port: u16) -> Result<TcpListener> {
        let any = if self.dual_stack { "::" } else { "0.0.0.0" };
        self.run(|| TcpListener::bind((any, port)))?
            .map_err(|e| self.socket_error(format!("binding TCP {any} port {port}"), e))
    }

    /// A UDP socket bound to 0.0.0.0:`port` in this namespace.
    pub fn udp_socket(&self, port: u16) -> Result<UdpSocket> {
        self.run(|| UdpSocket::bind(("0.0.0.0", port)))?
            .map_err(|e| self.socket_error(format!("binding UDP 0.0.0.0:{port}"), e))
    }

    /// A TCP connection from this namespace to `addr` (10 s connect timeout).
    pub fn tcp_connect(&self, addr: SocketAddr) -> Result<TcpStream> {
        self.run(|| TcpStream::connect_timeout(&addr, IO_TIMEOUT))?
            .map_err(|e| self.socket_error(format!("connecting to {addr}"), e))
    }

    /// A command whose process runs in this namespace and in `cgroup`.
    ///
    /// The child enters the namespace with `setns` and moves itself into the cgroup before
    /// `exec`, so it never runs a single instruction outside them. Unlike `ip netns exec`,
    /// /sys is not remounted (netlink-based tools such as `ip` and `ss` are unaffected).
    pub(crate) fn command(&self, program: impl AsRef<OsStr>, cgroup: &Path) -> Result<Command> {
        let netns_fd: OwnedFd = self
            .file
            .try_clone()
            .map_err(|e| Error::io("duplicating netns fd", &self.path, e))?
            .into();
        let procs = cgroup.join("cgroup.procs");
        let procs_fd: OwnedFd = OpenOptions::new()
            .write(true)
            .open(&procs)
            .map_err(|e| Error::io("opening", &procs, e))?
            .into();
        let mut command = Command::new(program);
        // SAFETY: the closure only makes async-signal-safe system calls (write, setns) on
        // descriptors it owns, and builds io::Error values that do not allocate.
        unsafe {
            command.pre_exec(move || {
                // "0" moves the writing process, i.e. this child.
                if libc::write(procs_fd.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(io::Error::last_os_error());
                }
                if libc::setns(netns_fd.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(command)
    }

    /// Sets a /proc/sys/net value inside this namespace (/proc/sys/net follows the caller's
    /// namespace, so writing from a thread inside it is enough).
    pub(crate) fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
        self.run(|| std::fs::write(&path, value))?
            .map_err(|e| Error::io("writing sysctl", &path, e))
    }

    fn socket_error(&self, action: String, source: io::Error) -> Error {
        Error::Socket {
            action,
            netns: self.name.clone(),
            source,
        }
    }
}

/// Removes a named namespace the way `ip netns delete` does: detach the bind mount, unlink.
///
/// The namespace itself dies once no process, socket or open fd refers to it any more.
pub(crate) fn delete(name: &str) -> Result<()> {
    let path = Path::new(NETNS_DIR).join(name);
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| Error::io("deleting netns", &path, io::ErrorKind::InvalidInput.into()))?;
    // SAFETY: c_path is a valid NUL-terminated string.
    if unsafe { libc::umount2(c_path.as_ptr(), libc::MNT_DETACH) } != 0 {
        let e = io::Error::last_os_error();
        // EINVAL: not a mount point (half-created namespace); still unlink it.
        if e.raw_os_error() != Some(libc::EINVAL) && e.kind() != io::ErrorKind::NotFound {
            return Err(Error::io("unmounting netns", &path, e));
        }
    }
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("removing netns file", &path, e)),
    }
}

/// Names of all named namespaces (empty if /run/netns does not exist yet).
pub(crate) fn list() -> Result<Vec<String>> {
    match std::fs::read_dir(NETNS_DIR) {
        Ok(entries) => Ok(entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(Error::io("listing", NETNS_DIR, e)),
    }
}
