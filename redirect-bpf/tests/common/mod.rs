//! Test fixture: network namespaces, veths, a test-owned cgroup, sockets made inside
//! them. Every resource has a unique name and is removed on drop, even on panic.
#![allow(dead_code)]

use std::{
    fs, io,
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::{AsRawFd, FromRawFd},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicU32, Ordering},
        Mutex, MutexGuard,
    },
    time::Duration,
};

pub const CGROUP2_ROOT: &str = "/sys/fs/cgroup/unified";

static SERIAL: Mutex<()> = Mutex::new(());
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Tests move the whole test process between cgroups (a socket belongs to the cgroup
/// of the process that created it), so they run one at a time.
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// Short unique name (interface names are limited to 15 bytes).
pub fn unique(tag: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("zr{}{}{}", std::process::id() % 100_000, tag, n)
}

pub fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{:?} failed: {}",
        args,
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn sh_out(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{:?} failed: {}",
        args,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A named network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Self {
        let name = unique(tag);
        sh(&["ip", "netns", "add", &name]);
        let ns = Self { name };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    pub fn exec(&self, args: &[&str]) {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        sh(&full);
    }

    pub fn exec_out(&self, args: &[&str]) -> String {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        sh_out(&full)
    }

    /// Runs `f` on a thread that has entered this netns.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = fs::File::open(&path).unwrap();
            // SAFETY: valid fd; setns only affects this thread.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Links two namespaces with a veth pair and addresses `a_ip/24`, `b_ip/24`.
/// Returns the interface names (in a, in b).
pub fn veth(a: &Netns, a_ip: &str, b: &Netns, b_ip: &str) -> (String, String) {
    let ia = unique("a");
    let ib = unique("b");
    sh(&[
        "ip", "link", "add", &ia, "netns", &a.name, "type", "veth", "peer", "name", &ib, "netns",
        &b.name,
    ]);
    a.exec(&["ip", "addr", "add", &format!("{a_ip}/24"), "dev", &ia]);
    b.exec(&["ip", "addr", "add", &format!("{b_ip}/24"), "dev", &ib]);
    a.exec(&["ip", "link", "set", &ia, "up"]);
    b.exec(&["ip", "link", "set", &ib, "up"]);
    (ia, ib)
}

/// A cgroup v2 directory owned by the test; removed on drop.
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    pub fn new() -> Self {
        let path = Path::new(CGROUP2_ROOT).join(unique("cg"));
        fs::create_dir(&path).unwrap();
        Self { path }
    }

    /// Moves the test process into this cgroup until the guard drops.
    pub fn enter(&self) -> CgroupMember {
        let back = fs::read_to_string("/proc/self/cgroup")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("0::").map(str::to_string))
            .expect("process is in a cgroup v2 hierarchy");
        let back = Path::new(CGROUP2_ROOT).join(back.trim_start_matches('/'));
        fs::write(
            self.path.join("cgroup.procs"),
            std::process::id().to_string(),
        )
        .unwrap();
        CgroupMember { back }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Threads that exited while inside keep the cgroup "populated" for a moment:
        // wait (bounded) for cgroup.events to say "populated 0", then remove it.
        let events = self.path.join("cgroup.events");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            if fs::remove_dir(&self.path).is_ok() || !self.path.exists() {
                return;
            }
            let populated = fs::read_to_string(&events).is_ok_and(|e| e.contains("populated 1"));
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let Ok(f) = fs::File::open(&events) else {
                return;
            };
            if !populated || left.is_zero() {
                eprintln!("cgroup {} could not be removed", self.path.display());
                return;
            }
            let mut pfd = libc::pollfd {
                fd: f.as_raw_fd(),
                events: libc::POLLPRI,
                revents: 0,
            };
            // SAFETY: one valid pollfd; cgroup.events signals changes with POLLPRI.
            unsafe { libc::poll(&mut pfd, 1, left.as_millis() as i32) };
        }
    }
}

pub struct CgroupMember {
    back: PathBuf,
}

impl Drop for CgroupMember {
    fn drop(&mut self) {
        let _ = fs::write(
            self.back.join("cgroup.procs"),
            std::process::id().to_string(),
        );
    }
}

/// Uninstalls (inside `netns`, where the policy route lives) on drop.
pub struct Installed {
    pub pin_dir: PathBuf,
    pub netns: String,
}

/// Where the tests' pin directories go, one each.
pub const PIN_PARENT: &str = "/sys/fs/bpf/zmesh-test";

impl Installed {
    pub fn pin_dir(tag: &str) -> PathBuf {
        Path::new(PIN_PARENT).join(unique(tag))
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        if !self.pin_dir.exists() {
            return;
        }
        let pin = self.pin_dir.clone();
        let path = format!("/var/run/netns/{}", self.netns);
        let _ = std::thread::spawn(move || {
            if let Ok(ns) = fs::File::open(&path) {
                // SAFETY: valid fd; affects this thread only.
                unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            }
            let _ = zmesh_redirect::Redirector::uninstall(&pin);
        })
        .join();
        // The shared parent goes with the last test's directory (not while another holds one).
        let _ = fs::remove_dir(PIN_PARENT);
    }
}

/// A TCP listener with IP_TRANSPARENT set before bind (needed for sk_assign'ed traffic).
pub fn transparent_listener(addr: SocketAddr) -> TcpListener {
    // SAFETY: plain socket syscalls on a fresh fd we own.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0);
        let one: libc::c_int = 1;
        let rc = libc::setsockopt(
            fd,
            libc::SOL_IP,
            libc::IP_TRANSPARENT,
            (&one as *const libc::c_int).cast(),
            4,
        );
        assert_eq!(rc, 0, "IP_TRANSPARENT: {}", io::Error::last_os_error());
        let rc = libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&one as *const libc::c_int).cast(),
            4,
        );
        assert_eq!(rc, 0);
        let listener = TcpListener::from_raw_fd(fd);
        let SocketAddr::V4(v4) = addr else {
            panic!("v4 only")
        };
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: v4.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(v4.ip().octets()),
            },
            sin_zero: [0; 8],
        };
        let rc = libc::bind(
            fd,
            (&sin as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        );
        assert_eq!(rc, 0, "bind {addr}: {}", io::Error::last_os_error());
        assert_eq!(libc::listen(fd, 16), 0);
        listener
    }
}

/// A dual-stack (`[::]`, IPV6_V6ONLY off) TCP listener on `port` with IPV6_TRANSPARENT, as
/// the proxy binds it when IPv6 is steered: it takes IPv4 (as v4-mapped) and IPv6.
pub fn transparent_listener_dual(port: u16) -> TcpListener {
    // SAFETY: plain socket syscalls on a fresh fd we own.
    unsafe {
        let fd = libc::socket(libc::AF_INET6, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0);
        let listener = TcpListener::from_raw_fd(fd);
        let (one, zero): (libc::c_int, libc::c_int) = (1, 0);
        for (level, name, value) in [
            (libc::SOL_IPV6, libc::IPV6_TRANSPARENT, &one),
            (libc::SOL_IPV6, libc::IPV6_V6ONLY, &zero),
            (libc::SOL_SOCKET, libc::SO_REUSEADDR, &one),
        ] {
            let rc = libc::setsockopt(fd, level, name, (value as *const libc::c_int).cast(), 4);
            assert_eq!(rc, 0, "setsockopt {name}: {}", io::Error::last_os_error());
        }
        let sin6 = libc::sockaddr_in6 {
            sin6_family: libc::AF_INET6 as u16,
            sin6_port: port.to_be(),
            sin6_flowinfo: 0,
            sin6_addr: libc::in6_addr { s6_addr: [0; 16] },
            sin6_scope_id: 0,
        };
        let rc = libc::bind(
            fd,
            (&sin6 as *const libc::sockaddr_in6).cast(),
            std::mem::size_of::<libc::sockaddr_in6>() as u32,
        );
        assert_eq!(rc, 0, "bind [::]:{port}: {}", io::Error::last_os_error());
        assert_eq!(libc::listen(fd, 16), 0);
        listener
    }
}

/// Accepts with a deadline (poll), so a missing connection fails the test instead of hanging.
pub fn accept_within(l: &TcpListener, timeout: Duration) -> Option<(TcpStream, SocketAddr)> {
    let mut pfd = libc::pollfd {
        fd: l.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
    if n <= 0 {
        return None;
    }
    Some(l.accept().unwrap())
}

/// Whether a connection is already queued on the listener (no waiting).
pub fn has_pending(l: &TcpListener) -> bool {
    accept_within(l, Duration::ZERO).is_some()
}

/// getsockopt(SOL_IP, SO_ORIGINAL_DST) as a proxy calls it.
pub fn so_original_dst(s: &TcpStream) -> io::Result<SocketAddr> {
    let mut sin: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: valid fd and out buffer of the stated length.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_IP,
            80,
            (&mut sin as *mut libc::sockaddr_in).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
    Ok(SocketAddr::new(ip.into(), u16::from_be(sin.sin_port)))
}
