//! Small kernel interfaces aya does not wrap: filesystem checks, bpffs mount, link
//! update, netns cookies, cgroup ids, and the policy route through iproute2.

use std::{
    ffi::CString,
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
    os::unix::ffi::OsStrExt,
    path::Path,
    process::Command,
};

use crate::RedirectError;

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
const SO_NETNS_COOKIE: libc::c_int = 71;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;
/// `enum bpf_attach_type` value of `cgroup/getsockopt`.
pub(crate) const BPF_CGROUP_GETSOCKOPT: u32 = 21;
/// `enum bpf_attach_type` value of `cgroup/connect4`.
const BPF_CGROUP_INET4_CONNECT: u32 = 10;
/// `enum bpf_attach_type` value of TCX ingress (Linux 6.6).
const BPF_TCX_INGRESS: u32 = 46;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;

fn statfs_magic(path: &Path) -> io::Result<i64> {
    let c = c_path(path)?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid NUL-terminated string, st a valid out pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)]
    Ok(st.f_type as i64)
}

pub(crate) fn is_bpffs(path: &Path) -> bool {
    statfs_magic(path).is_ok_and(|m| m == BPF_FS_MAGIC)
}

pub(crate) fn is_cgroup2(path: &Path) -> bool {
    statfs_magic(path).is_ok_and(|m| m == CGROUP2_SUPER_MAGIC)
}

/// Mounts bpffs at /sys/fs/bpf when nothing is mounted there yet (it is not by default here).
pub(crate) fn ensure_bpffs() -> Result<(), RedirectError> {
    let root = Path::new("/sys/fs/bpf");
    if is_bpffs(root) {
        return Ok(());
    }
    std::fs::create_dir_all(root).map_err(|source| RedirectError::Io {
        op: "create",
        path: root.into(),
        source,
    })?;
    let src = c"bpf";
    let target = c"/sys/fs/bpf";
    // SAFETY: all pointers are valid NUL-terminated strings; data may be NULL.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            src.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(RedirectError::BpffsMount(io::Error::last_os_error()));
    }
    Ok(())
}

fn bpf<T>(cmd: libc::c_long, attr: &T) -> io::Result<libc::c_long> {
    // SAFETY: attr points to a fully initialised prefix of union bpf_attr for `cmd`;
    // the kernel reads at most size_of::<T>() bytes.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *const T,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc)
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))
}

#[repr(C)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// Opens a pinned object (here: a link).
pub(crate) fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = c_path(path)?;
    let attr = ObjAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    let fd = bpf(BPF_OBJ_GET, &attr)?;
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Pins an object at `path` on bpffs.
pub(crate) fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let c = c_path(path)?;
    let attr = ObjAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        file_flags: 0,
    };
    bpf(BPF_OBJ_PIN, &attr).map(|_| ())
}

/// A cgroup link (exclusive attachment, like `CgroupAttachMode::Single`), for program
/// kinds whose aya link cannot be turned into a pinnable fd link.
pub(crate) fn cgroup_link_create(
    prog: BorrowedFd<'_>,
    cgroup: BorrowedFd<'_>,
    attach_type: u32,
) -> io::Result<OwnedFd> {
    let attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target: cgroup.as_raw_fd() as u32,
        attach_type,
        flags: 0,
    };
    let fd = bpf(BPF_LINK_CREATE, &attr)?;
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Atomically swaps the program behind a pinned link: redirection never stops.
pub(crate) fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    #[repr(C)]
    struct Attr {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let attr = Attr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    bpf(BPF_LINK_UPDATE, &attr).map(|_| ())
}

/// Lifts RLIMIT_MEMLOCK: kernels before 5.11 charge eBPF maps and programs to it (later
/// ones to the memory cgroup), and its default is far below what the maps need.
pub(crate) fn raise_memlock() -> io::Result<()> {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: a valid rlimit struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[repr(C)]
struct LinkCreateAttr {
    prog_fd: u32,
    target: u32,
    attach_type: u32,
    flags: u32,
}

/// Whether BPF_LINK_CREATE exists (Linux 5.7, with cgroup links and BPF_LINK_UPDATE):
/// asked with no program at all, a kernel that knows the command answers EBADF for the
/// program fd, one that does not answers EINVAL. Nothing is created either way.
pub(crate) fn probe_link_create() -> io::Result<bool> {
    let attr = LinkCreateAttr {
        prog_fd: u32::MAX,
        target: u32::MAX,
        attach_type: BPF_CGROUP_INET4_CONNECT,
        flags: 0,
    };
    match bpf(BPF_LINK_CREATE, &attr) {
        Err(e) if e.raw_os_error() == Some(libc::EBADF) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
        Err(e) => Err(e),
        Ok(fd) => {
            // SAFETY: the kernel returned a new fd (it cannot, without a program).
            drop(unsafe { OwnedFd::from_raw_fd(fd as RawFd) });
            Ok(true)
        }
    }
}

/// Loads `r0 = 0; exit` as a tc classifier, for probes that need a program.
fn trivial_sched_cls() -> io::Result<OwnedFd> {
    #[repr(C)]
    struct ProgLoadAttr {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
    }
    // mov64 r0, 0 (BPF_ALU64 | BPF_MOV | BPF_K); exit (BPF_JMP | BPF_EXIT)
    let insns: [u64; 2] = [0xb7, 0x95];
    let license = c"GPL";
    let attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_SCHED_CLS,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
    };
    let fd = bpf(BPF_PROG_LOAD, &attr)?;
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Whether tc programs attach through TCX links (Linux 6.6): a TCX link asked for on an
/// interface index that cannot exist fails with ENODEV where TCX exists (the attach
/// type was accepted and the device looked up) and with EINVAL where it does not.
/// Nothing is attached either way.
pub(crate) fn probe_tcx() -> io::Result<bool> {
    let prog = trivial_sched_cls()?;
    let attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target: u32::MAX,
        attach_type: BPF_TCX_INGRESS,
        flags: 0,
    };
    match bpf(BPF_LINK_CREATE, &attr) {
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
        Err(e) => Err(e),
        Ok(fd) => {
            // SAFETY: a new link fd nothing else owns; closing it detaches the probe.
            drop(unsafe { OwnedFd::from_raw_fd(fd as RawFd) });
            Ok(true)
        }
    }
}

/// The network namespace cookie of a socket (what `bpf_get_netns_cookie` returns).
pub fn netns_cookie_of(socket: BorrowedFd<'_>) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, out pointer and length.
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
}

/// The cookie of the network namespace the calling thread is in.
pub fn current_netns_cookie() -> io::Result<u64> {
    let sock = std::net::UdpSocket::bind("0.0.0.0:0").or_else(|_| {
        // a netns without IPv4 addresses still lets us open an unbound socket
        std::net::UdpSocket::bind("[::]:0")
    })?;
    netns_cookie_of(sock.as_fd())
}

/// Whether the kernel answers SO_NETNS_COOKIE (Linux 5.14): the agent reads each pod's
/// network namespace cookie with it.
pub fn probe_netns_cookie_sockopt() -> io::Result<bool> {
    match current_netns_cookie() {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOPROTOOPT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The id of a cgroup v2 directory (what `bpf_get_current_cgroup_id` returns).
pub fn cgroup_id(path: &Path) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    if !is_cgroup2(path) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not on a cgroup v2 mount", path.display()),
        ));
    }
    Ok(std::fs::metadata(path)?.ino())
}

fn ip(args: &[&str]) -> Result<(), RedirectError> {
    ip_out(args).map(drop)
}

fn ip_out(args: &[&str]) -> Result<String, RedirectError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|source| RedirectError::Io {
            op: "run",
            path: "ip".into(),
            source,
        })?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    Err(RedirectError::Command {
        cmd: format!("ip {}", args.join(" ")),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    })
}

/// A bridge port among the steered interfaces whose bridge is steered too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BridgePort {
    pub port_ifindex: u32,
    pub bridge_ifindex: u32,
    pub bridge_mac: [u8; 6],
}

/// The bridge ports among `interfaces` (in the calling thread's netns, hence `ip` rather
/// than /sys/class/net, which shows the netns sysfs was mounted in).
pub(crate) fn bridge_ports(interfaces: &[String]) -> Result<Vec<BridgePort>, RedirectError> {
    Ok(parse_bridge_ports(
        &ip_out(&["-o", "link", "show"])?,
        interfaces,
    ))
}

/// Parses `ip -o link show`: lines like
/// `7: veth1@if2: <...> mtu 1500 qdisc noqueue master cni0 state UP ...\    link/ether 0a:...`.
fn parse_bridge_ports(text: &str, interfaces: &[String]) -> Vec<BridgePort> {
    struct Link<'a> {
        index: u32,
        name: &'a str,
        master: Option<&'a str>,
        mac: Option<[u8; 6]>,
    }
    let links: Vec<Link> = text
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let index = fields.next()?.strip_suffix(':')?.parse().ok()?;
            let name = fields.next()?.strip_suffix(':')?;
            let name = name.split('@').next().unwrap_or(name);
            let (mut master, mut mac) = (None, None);
            while let Some(field) = fields.next() {
                match field {
                    "master" => master = fields.next(),
                    "link/ether" => mac = fields.next().and_then(parse_mac),
                    _ => {}
                }
            }
            Some(Link {
                index,
                name,
                master,
                mac,
            })
        })
        .collect();
    let steered = |name: &str| interfaces.iter().any(|i| i == name);
    links
        .iter()
        .filter(|port| steered(port.name))
        .filter_map(|port| {
            let bridge = links
                .iter()
                .find(|l| Some(l.name) == port.master && steered(l.name))?;
            Some(BridgePort {
                port_ifindex: port.index,
                bridge_ifindex: bridge.index,
                bridge_mac: bridge.mac?,
            })
        })
        .collect()
}

fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// The address family of a policy rule and route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Family {
    V4,
    V6,
}

impl Family {
    fn flag(self) -> &'static str {
        match self {
            Family::V4 => "-4",
            Family::V6 => "-6",
        }
    }

    fn default_route(self) -> &'static str {
        match self {
            Family::V4 => "0.0.0.0/0",
            Family::V6 => "::/0",
        }
    }
}

fn rule_args(family: Family, mark: u32, table: u32) -> [String; 6] {
    [
        family.flag().into(),
        "rule".into(),
        "fwmark".into(),
        format!("{mark:#x}/{mark:#x}"),
        "lookup".into(),
        table.to_string(),
    ]
}

/// `ip rule add fwmark M/M lookup T` + `ip route replace local 0.0.0.0/0 dev lo table T`
/// (or `::/0` for IPv6) in the calling thread's netns; idempotent. A route already in place
/// is left alone: replacing it, even by an identical one, loses a packet being routed at
/// that moment (seen as a SYN retransmitted a second later on every reload).
pub(crate) fn add_policy_route(family: Family, mark: u32, table: u32) -> Result<(), RedirectError> {
    let table_s = table.to_string();
    let present = match ip_out(&[family.flag(), "route", "show", "table", &table_s]) {
        Ok(routes) => routes
            .lines()
            .any(|l| l.trim().starts_with("local default dev lo ")),
        // a table without routes does not exist yet
        Err(RedirectError::Command { stderr, .. }) if stderr.contains("does not exist") => false,
        Err(e) => return Err(e),
    };
    if !present {
        ip(&[
            family.flag(),
            "route",
            "replace",
            "local",
            family.default_route(),
            "dev",
            "lo",
            "table",
            &table_s,
        ])?;
    }
    let r = rule_args(family, mark, table);
    let mut args: Vec<&str> = r.iter().map(String::as_str).collect();
    args.insert(2, "add");
    match ip(&args) {
        Err(RedirectError::Command { stderr, .. }) if stderr.contains("File exists") => Ok(()),
        other => other,
    }
}

/// Removes what [`add_policy_route`] added; absent entries are not an error, nor is IPv6
/// switched off in the netns (then there is nothing to remove).
pub(crate) fn del_policy_route(family: Family, mark: u32, table: u32) -> Result<(), RedirectError> {
    // IPv6 off in the netns (module absent, or disabled on lo): nothing of ours is there.
    let is_absent = |stderr: &str| {
        is_absent(stderr)
            || (family == Family::V6
                && (stderr.contains("Address family not supported")
                    || stderr.contains("Permission denied")))
    };
    let r = rule_args(family, mark, table);
    let mut args: Vec<&str> = r.iter().map(String::as_str).collect();
    args.insert(2, "del");
    // delete every copy (a crashed agent may have added one more)
    loop {
        match ip(&args) {
            Ok(()) => continue,
            Err(RedirectError::Command { stderr, .. }) if is_absent(&stderr) => break,
            Err(e) => return Err(e),
        }
    }
    let table_s = table.to_string();
    match ip(&[
        family.flag(),
        "route",
        "del",
        "local",
        family.default_route(),
        "dev",
        "lo",
        "table",
        &table_s,
    ]) {
        Err(RedirectError::Command { stderr, .. }) if is_absent(&stderr) => Ok(()),
        other => other,
    }
}

fn is_absent(stderr: &str) -> bool {
    stderr.contains("No such file or directory")
        || stderr.contains("No such process")
        || stderr.contains("not found")
        || stderr.contains("does not exist")
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINKS: &str = "\
1: lo: <LOOPBACK,UP,LOWER_UP> mtu 65536 qdisc noqueue state UNKNOWN mode DEFAULT group default qlen 1000\\    link/loopback 00:00:00:00:00:00 brd 00:00:00:00:00:00
4: eth0: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1400 qdisc pfifo_fast state UP mode DEFAULT group default qlen 1000\\    link/ether 02:fc:00:00:00:01 brd ff:ff:ff:ff:ff:ff
7: cni0: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc noqueue state UP mode DEFAULT group default qlen 1000\\    link/ether 0a:58:0a:f4:00:01 brd ff:ff:ff:ff:ff:ff
9: veth1a@if2: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc noqueue master cni0 state UP mode DEFAULT group default qlen 1000\\    link/ether e6:fa:ff:99:b1:ca brd ff:ff:ff:ff:ff:ff link-netns cni-1
10: veth2b@if2: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc noqueue master cni0 state UP mode DEFAULT group default qlen 1000\\    link/ether e6:fa:ff:99:b1:cb brd ff:ff:ff:ff:ff:ff link-netns cni-2
11: veth3c@if2: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc noqueue master other0 state UP mode DEFAULT group default qlen 1000\\    link/ether e6:fa:ff:99:b1:cc brd ff:ff:ff:ff:ff:ff
";

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn bridge_ports_are_the_steered_ports_of_steered_bridges() {
        let ports = parse_bridge_ports(
            LINKS,
            &names(&["eth0", "cni0", "veth1a", "veth2b", "veth3c", "lo"]),
        );
        let bridge_mac = [0x0a, 0x58, 0x0a, 0xf4, 0x00, 0x01];
        assert_eq!(
            ports,
            [
                BridgePort {
                    port_ifindex: 9,
                    bridge_ifindex: 7,
                    bridge_mac
                },
                BridgePort {
                    port_ifindex: 10,
                    bridge_ifindex: 7,
                    bridge_mac
                },
            ]
        );
        // A port whose bridge is not steered would hand frames to nobody: left alone.
        assert_eq!(parse_bridge_ports(LINKS, &names(&["veth1a", "veth2b"])), []);
        assert_eq!(parse_bridge_ports(LINKS, &names(&["cni0"])), []);
    }

    #[test]
    fn malformed_lines_and_addresses_are_skipped() {
        let text = "garbage\n7: cni0: <UP> link/ether 0a:58:zz:f4:00:01\n9: v@if2: <UP> master cni0 link/ether 01:02:03:04:05:06\n";
        assert_eq!(parse_bridge_ports(text, &names(&["cni0", "v"])), []);
        assert_eq!(parse_mac("01:02:03:04:05:06:07"), None);
        assert_eq!(parse_mac("01:02:03"), None);
        assert_eq!(
            parse_mac("0a:58:0a:f4:00:01"),
            Some([10, 88, 10, 244, 0, 1])
        );
    }
}
