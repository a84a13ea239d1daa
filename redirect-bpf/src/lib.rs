//! Transparent redirection of pod traffic to the node proxy with eBPF.
//!
//! * Outbound: `cgroup/connect4|6` rewrite TCP connects of enrolled pods to the proxy's
//!   outbound listener; the original destination is answered by
//!   `getsockopt(SOL_IP, SO_ORIGINAL_DST)` or [`Redirector::original_dst`].
//! * Inbound: a tc ingress program assigns TCP to enrolled pod IPs to the proxy's
//!   15006 (plaintext) or 15008 (HBONE) listener; strict mode drops plaintext SYNs,
//!   answers them with a RST and reports every drop. IPv6 is not steered yet: strict mode
//!   refuses every IPv6 SYN to an enrolled pod, permissive mode lets IPv6 pass unsteered.
//!
//! The tc program attaches through a TCX link where the kernel has TCX (6.6+) and as a
//! cls_bpf filter under the interface's clsact qdisc (netlink) where it does not
//! ([`TcAttach`]); [`KernelFeatures`] probes everything else the programs need.
//!
//! Everything is pinned under one bpffs directory so that a restarted agent
//! re-opens it ([`Redirector::open_pinned`]) without interrupting redirection, and
//! [`Redirector::uninstall`] removes all of it.

mod abi;
mod events;
pub mod probe;
mod sys;

use std::{
    fmt, fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4},
    os::fd::AsFd,
    path::{Path, PathBuf},
    sync::OnceLock,
};

use aya::{
    maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, RingBuf},
    programs::{
        links::{FdLink, Link},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcError, TcHandle},
        CgroupAttachMode, CgroupSockAddr, CgroupSockopt, LinkOrder, ProgramError, SchedClassifier,
        SockOps, TcAttachType,
    },
    EbpfLoader,
};

pub use events::{DropEvent, DropEvents, DropReason};
pub use probe::{Feature, KernelFeatures, Probe};
use sys::Family;
pub use sys::{cgroup_id, current_netns_cookie, netns_cookie_of};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/redirect.o"));

const BTF_PATH: &str = "/sys/kernel/btf/vmlinux";

/// Errors of the redirection loader.
#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error("kernel BTF is missing ({BTF_PATH}): the kernel needs CONFIG_DEBUG_INFO_BTF")]
    NoBtf,
    #[error("cannot mount bpffs at /sys/fs/bpf: {0}")]
    BpffsMount(#[source] std::io::Error),
    #[error("pin directory {0} is not on a bpf filesystem")]
    PinDirNotBpffs(PathBuf),
    #[error("{0} is not a cgroup v2 directory")]
    NotCgroup2(PathBuf),
    #[error("the kernel lacks {}", list(.0))]
    MissingFeatures(Vec<Feature>),
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    #[error("nothing is installed at {0}")]
    NotInstalled(PathBuf),
    #[error("loading the eBPF object failed: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("eBPF link of {name}: {source}")]
    Link {
        name: &'static str,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{cmd}` failed: {stderr}")]
    Command { cmd: String, stderr: String },
    #[error("tc ingress on {interface} ({what}): {source}{}", clsact_hint(.source))]
    Tc {
        interface: String,
        what: &'static str,
        #[source]
        source: TcError,
    },
}

fn list(features: &[Feature]) -> String {
    let names: Vec<String> = features.iter().map(ToString::to_string).collect();
    names.join("; ")
}

/// The clsact qdisc and the bpf classifier are modules on many distributions.
fn clsact_hint(e: &TcError) -> &'static str {
    let os = match e {
        TcError::NetlinkError(n) => n.raw_os_error(),
        TcError::IoError(io) => io.raw_os_error(),
        _ => None,
    };
    match os {
        Some(libc::ENOENT | libc::EOPNOTSUPP) => {
            " (the kernel needs the clsact qdisc and the bpf classifier: modules sch_ingress \
             and cls_bpf)"
        }
        _ => "",
    }
}

type Result<T, E = RedirectError> = std::result::Result<T, E>;

/// How a pod (or the whole node) treats plaintext that arrives for it: permissive steers it
/// to the proxy's plaintext listener, strict drops the SYN in tc and reports it.
pub use zmesh_dataplane::Mode;

/// What the sender of a strict-mode drop sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RejectMode {
    /// A TCP RST: the client's connect() fails at once with ECONNREFUSED.
    #[default]
    Reset,
    /// Silent drop: the client times out.
    Drop,
}

/// The node proxy as the eBPF programs see it: where its listeners are (derived by the
/// agent from the proxy's own `ProxyConfig`) and how steered packets are routed to them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyListeners {
    /// Outbound listener that enrolled pods' connects are rewritten to; pods must reach it.
    pub outbound: SocketAddrV4,
    /// IPv6 address of the outbound listener (same port). `Some`: IPv6 is steered like
    /// IPv4, outbound and inbound (the proxy's listeners must take IPv6, on the wildcard
    /// address); `None`: IPv6 is not redirected, and strict mode drops IPv6 to enrolled pods.
    pub outbound_v6: Option<Ipv6Addr>,
    /// Address the inbound listeners are bound to; `None` when they are bound to 0.0.0.0.
    pub inbound_addr: Option<Ipv4Addr>,
    pub inbound_plaintext_port: u16,
    pub inbound_hbone_port: u16,
    /// Further proxy ports that connects are never redirected away from (at most 8).
    pub other_ports: Vec<u16>,
    /// Packet mark for steered packets; the policy rule matches it.
    pub mark: u32,
    /// Routing table holding `local 0.0.0.0/0 dev lo`.
    pub route_table: u32,
    /// Mode of every enrolled pod, on top of the per-pod mode.
    pub node_mode: Mode,
    pub reject: RejectMode,
}

impl ProxyListeners {
    /// Defaults of the Istio ambient ports: 15006 plaintext, 15008 HBONE.
    pub fn new(outbound: SocketAddrV4) -> Self {
        Self {
            outbound,
            outbound_v6: None,
            inbound_addr: None,
            inbound_plaintext_port: zmesh_dataplane::INBOUND_PLAINTEXT_PORT,
            inbound_hbone_port: zmesh_dataplane::HBONE_PORT,
            other_ports: Vec::new(),
            mark: 0x539,
            route_table: 133,
            node_mode: Mode::Permissive,
            reject: RejectMode::Reset,
        }
    }

    /// Whether IPv6 is steered (see [`ProxyListeners::outbound_v6`]).
    pub fn steers_ipv6(&self) -> bool {
        self.outbound_v6.is_some()
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(RedirectError::InvalidConfig(m.to_string()));
        if self.outbound.ip().is_unspecified() || self.outbound.port() == 0 {
            return bad("the outbound listener needs a concrete address and port");
        }
        if self.outbound.ip().is_loopback() {
            return bad("the outbound listener cannot be on loopback: pods cannot reach it");
        }
        if self.inbound_plaintext_port == 0 || self.inbound_hbone_port == 0 {
            return bad("inbound listener ports must not be 0");
        }
        if let Some(v6) = self.outbound_v6 {
            if v6.is_unspecified() || v6.is_loopback() || v6.to_ipv4_mapped().is_some() {
                return bad("the IPv6 outbound listener needs a concrete IPv6 address pods reach");
            }
            if self.inbound_addr.is_some() {
                return bad(
                    "IPv6 steering needs the inbound listeners on the wildcard address \
                     (inbound_addr None)",
                );
            }
        }
        if self.other_ports.len() > abi::MAX_PROXY_PORTS {
            return bad("at most 8 other proxy ports");
        }
        if self.mark == 0 {
            return bad("the packet mark must not be 0");
        }
        if matches!(self.route_table, 0 | 253..=255) {
            return bad("route table must not be 0 or a reserved table (253-255)");
        }
        Ok(())
    }

    fn to_abi(&self) -> abi::Config {
        let mut flags = abi::CFG_ENABLED;
        if self.node_mode == Mode::Strict {
            flags |= abi::CFG_NODE_STRICT;
        }
        if self.reject == RejectMode::Reset {
            flags |= abi::CFG_REJECT_RST;
        }
        if self.steers_ipv6() {
            flags |= abi::CFG_IPV6;
        }
        let mut proxy_ports = [[0u8; 2]; abi::MAX_PROXY_PORTS];
        for (slot, port) in proxy_ports.iter_mut().zip(&self.other_ports) {
            *slot = port.to_be_bytes();
        }
        abi::Config {
            flags,
            outbound_ip4: abi::ipv4_bytes(*self.outbound.ip()),
            outbound_ip6: self.outbound_v6.map(|ip| ip.octets()).unwrap_or_default(),
            outbound_port: self.outbound.port().to_be_bytes(),
            inbound_plain_port: self.inbound_plaintext_port.to_be_bytes(),
            inbound_hbone_port: self.inbound_hbone_port.to_be_bytes(),
            pad0: 0,
            inbound_ip4: self.inbound_addr.map(abi::ipv4_bytes).unwrap_or_default(),
            mark: self.mark,
            route_table: self.route_table,
            proxy_ports,
        }
    }
}

/// How the tc ingress program is attached to an interface.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TcAttach {
    /// TCX where the kernel has it (6.6+), a clsact filter otherwise (probed at load).
    #[default]
    Auto,
    /// A TCX link (Linux 6.6+), pinned as `links/tc_ingress_<if>`.
    Tcx,
    /// A cls_bpf filter in direct-action mode under the interface's clsact qdisc, set up
    /// through netlink (any kernel); the filter lives in the kernel, the program is pinned
    /// as `links/tc_clsact_<if>` to record it. Reloads replace the filter's program
    /// atomically (same priority and handle).
    Netlink,
}

impl TcAttach {
    pub const VALUES: [&'static str; 3] = ["auto", "tcx", "netlink"];
}

impl fmt::Display for TcAttach {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Tcx => "tcx",
            Self::Netlink => "netlink",
        })
    }
}

impl std::str::FromStr for TcAttach {
    type Err = RedirectError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "tcx" => Ok(Self::Tcx),
            "netlink" | "clsact" => Ok(Self::Netlink),
            other => Err(RedirectError::InvalidConfig(format!(
                "tc attach mode {other:?}: expected one of {}",
                Self::VALUES.join(", ")
            ))),
        }
    }
}

/// One interface's tc ingress attachment, as recorded under the pin directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IngressAttachment {
    pub interface: String,
    /// [`TcAttach::Tcx`] or [`TcAttach::Netlink`].
    pub mode: TcAttach,
}

/// What [`Redirector::load`] installs.
#[derive(Clone, Debug)]
pub struct RedirectConfig {
    /// bpffs directory owning every pin, e.g. `/sys/fs/bpf/zmesh/<instance>`.
    pub pin_dir: PathBuf,
    /// cgroup v2 directory the cgroup programs attach to; it must contain the pods and the proxy.
    pub cgroup: PathBuf,
    /// Interfaces (in the calling thread's netns) whose ingress steers inbound traffic.
    pub ingress_interfaces: Vec<String>,
    pub proxy: ProxyListeners,
    /// How tc ingress attaches; [`TcAttach::Auto`] unless testing or working around.
    pub tc_attach: TcAttach,
}

/// Per-reason drop counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropCounts {
    pub strict_plaintext: u64,
    pub proxy_unavailable: u64,
    pub fragment: u64,
}

const MAPS: &str = "maps";
const LINKS: &str = "links";
/// A pinned TCX link.
const TC_PREFIX: &str = "tc_ingress_";
/// The pinned program of a clsact filter (the filter itself is not a bpf object).
const CLSACT_PREFIX: &str = "tc_clsact_";
/// Priority of zmesh's clsact filters: before any other filter of the interface.
const CLSACT_PRIORITY: u16 = 1;

/// One of the two tc hooks on each steered interface: its program and how its pins are
/// named (prefixes that never extend one another).
#[derive(Clone, Copy)]
struct TcHook {
    attach_type: TcAttachType,
    program: &'static str,
    tcx_prefix: &'static str,
    clsact_prefix: &'static str,
}

/// Steering into the proxy, strict mode's refusals.
const INGRESS: TcHook = TcHook {
    attach_type: TcAttachType::Ingress,
    program: "zm_tc_ingress",
    tcx_prefix: TC_PREFIX,
    clsact_prefix: CLSACT_PREFIX,
};
/// Strict mode's last check on the way into a pod (what went around ingress).
const EGRESS: TcHook = TcHook {
    attach_type: TcAttachType::Egress,
    program: "zm_tc_egress",
    tcx_prefix: "tx_tcx_",
    clsact_prefix: "tx_clsact_",
};

/// Handle on installed redirection: the pinned maps. Dropping it changes nothing in the
/// kernel; [`Redirector::uninstall`] removes everything.
pub struct Redirector {
    pin_dir: PathBuf,
    config: Array<MapData, abi::Config>,
    enrolled_netns: HashMap<MapData, u64, u8>,
    enrolled_cgroups: HashMap<MapData, u64, u8>,
    excluded_netns: HashMap<MapData, u64, u8>,
    excluded_cgroups: HashMap<MapData, u64, u8>,
    orig_by_peer: HashMap<MapData, abi::Addr, abi::Addr>,
    enrolled_ips: HashMap<MapData, abi::Ip, u32>,
    mesh_sources: HashMap<MapData, abi::Ip, u8>,
    bridge_ports: HashMap<MapData, u32, abi::BridgePort>,
    drops: PerCpuArray<MapData, u64>,
}

impl std::fmt::Debug for Redirector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redirector")
            .field("pin_dir", &self.pin_dir)
            .finish_non_exhaustive()
    }
}

fn io_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> RedirectError + 'a {
    move |source| RedirectError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

fn prog_err(name: &'static str) -> impl FnOnce(ProgramError) -> RedirectError {
    move |source| RedirectError::Program { name, source }
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> RedirectError {
    move |source| RedirectError::Map { name, source }
}

/// The kernel's features, probed once per process (they do not change while it runs).
pub fn kernel_features() -> &'static KernelFeatures {
    static FEATURES: OnceLock<KernelFeatures> = OnceLock::new();
    FEATURES.get_or_init(KernelFeatures::probe)
}

/// Checks that the kernel has every feature the programs need, and resolves how tc
/// ingress attaches.
fn check_kernel(attach: TcAttach) -> Result<TcAttach> {
    if !Path::new(BTF_PATH).exists() {
        return Err(RedirectError::NoBtf);
    }
    let features = kernel_features();
    let mut missing = features.missing();
    for f in &features.required {
        if let Probe::Unknown(e) = &f.probe {
            tracing::warn!(feature = f.name, error = %e, "cannot probe a kernel feature; trying anyway");
        }
    }
    let mode = match attach {
        TcAttach::Auto if features.has_tcx() => TcAttach::Tcx,
        TcAttach::Auto => TcAttach::Netlink,
        TcAttach::Tcx => {
            if !features.has_tcx() {
                missing.push(features.tcx.clone());
            }
            TcAttach::Tcx
        }
        TcAttach::Netlink => TcAttach::Netlink,
    };
    if !missing.is_empty() {
        return Err(RedirectError::MissingFeatures(missing));
    }
    sys::ensure_bpffs()?;
    Ok(mode)
}

/// The handle of this installation's clsact filters: derived from the pin directory, so
/// that a reload and `uninstall` find them again and two installations on one interface
/// do not collide.
fn clsact_handle(pin_dir: &Path) -> TcHandle {
    use std::os::unix::ffi::OsStrExt;
    let normalized: PathBuf = pin_dir.components().collect();
    // FNV-1a
    let mut hash: u32 = 0x811c_9dc5;
    for byte in normalized.as_os_str().as_bytes() {
        hash ^= u32::from(*byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    TcHandle::from(hash.max(1))
}

/// The OS error behind a failed attach or detach, if any.
fn os_error(e: &ProgramError) -> Option<i32> {
    match e {
        ProgramError::TcError(TcError::NetlinkError(n)) | ProgramError::NetlinkError(n) => {
            n.raw_os_error()
        }
        ProgramError::TcError(TcError::IoError(io)) => io.raw_os_error(),
        ProgramError::SyscallError(s) => s.io_error.raw_os_error(),
        _ => None,
    }
}

fn tc_err<'a>(
    interface: &'a str,
    what: &'static str,
) -> impl FnOnce(TcError) -> RedirectError + 'a {
    move |source| RedirectError::Tc {
        interface: interface.to_string(),
        what,
        source,
    }
}

/// Attaches `prog` to the ingress of `ifname` as zmesh's clsact filter (adding the qdisc
/// if needed), or swaps it into the filter an earlier run left there, atomically: cls_bpf
/// replaces the program of an existing (priority, handle) in place. The program is
/// pinned at `pin` first, so a failure halfway leaves nothing `uninstall` cannot find.
fn attach_clsact(
    prog: &mut SchedClassifier,
    hook: TcHook,
    ifname: &str,
    handle: TcHandle,
    pin: &Path,
) -> Result<()> {
    match tc::qdisc_add_clsact(ifname) {
        Ok(()) => {}
        Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
        Err(e) => return Err(tc_err(ifname, "add the clsact qdisc")(e)),
    }
    if pin.exists() {
        fs::remove_file(pin).map_err(io_err("unpin", pin))?;
    }
    prog.pin(pin).map_err(|e| RedirectError::Io {
        op: "pin program",
        path: pin.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let existing =
        SchedClassifierLink::attached(ifname, hook.attach_type, CLSACT_PRIORITY, handle, None)
            .map_err(|e| tc_err(ifname, "find the interface")(TcError::IoError(e)))?;
    let id = match prog.attach_to_link(existing) {
        Ok(id) => id,
        Err(e) if os_error(&e) == Some(libc::ENOENT) => prog
            .attach_with_options(
                ifname,
                hook.attach_type,
                TcAttachOptions::Netlink(NlOptions {
                    priority: CLSACT_PRIORITY,
                    handle,
                    classid: None,
                }),
            )
            .map_err(prog_err("classifier"))?,
        Err(e) => return Err(prog_err("classifier")(e)),
    };
    // The filter must outlive this process (as a pinned link does): aya's handle on it
    // detaches on drop, so it is forgotten (it holds no resource, only the filter's ids).
    let link = prog.take_link(id).map_err(prog_err("classifier"))?;
    std::mem::forget(link);
    Ok(())
}

/// Deletes zmesh's clsact filter from `hook` of `ifname`; a filter or interface that is
/// already gone is not an error.
fn remove_clsact(hook: TcHook, ifname: &str, handle: TcHandle) -> Result<()> {
    let link = match SchedClassifierLink::attached(
        ifname,
        hook.attach_type,
        CLSACT_PRIORITY,
        handle,
        None,
    ) {
        Ok(link) => link,
        // the interface went away, and its filters with it
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => return Ok(()),
        Err(e) => return Err(tc_err(ifname, "find the interface")(TcError::IoError(e))),
    };
    match link.detach() {
        Ok(()) => Ok(()),
        // no such filter (ENOENT) or no clsact qdisc left (EINVAL)
        Err(e) if matches!(os_error(&e), Some(libc::ENOENT | libc::EINVAL)) => Ok(()),
        Err(e) => Err(prog_err("classifier")(e)),
    }
}

/// Removes one interface's recorded tc attachment: a TCX link goes with its pin, a clsact
/// filter is deleted, then its program's pin.
fn detach_tc(
    hook: TcHook,
    pin: &Path,
    attachment: &IngressAttachment,
    handle: TcHandle,
) -> Result<()> {
    if attachment.mode == TcAttach::Netlink {
        remove_clsact(hook, &attachment.interface, handle)?;
    }
    fs::remove_file(pin).map_err(io_err("unpin", pin))
}

/// The ingress attachments recorded under `links`, with their pins.
fn ingress_pins(links: &Path) -> Result<Vec<(PathBuf, IngressAttachment)>> {
    tc_pins(links, INGRESS)
}

/// The attachments of `hook` recorded under `links`, with their pins.
fn tc_pins(links: &Path, hook: TcHook) -> Result<Vec<(PathBuf, IngressAttachment)>> {
    let mut found = Vec::new();
    if !links.is_dir() {
        return Ok(found);
    }
    for entry in fs::read_dir(links).map_err(io_err("list", links))? {
        let entry = entry.map_err(io_err("list", links))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let attachment = if let Some(ifname) = name.strip_prefix(hook.tcx_prefix) {
            IngressAttachment {
                interface: ifname.to_string(),
                mode: TcAttach::Tcx,
            }
        } else if let Some(ifname) = name.strip_prefix(hook.clsact_prefix) {
            IngressAttachment {
                interface: ifname.to_string(),
                mode: TcAttach::Netlink,
            }
        } else {
            continue;
        };
        found.push((entry.path(), attachment));
    }
    found.sort_by(|a, b| a.1.interface.cmp(&b.1.interface));
    Ok(found)
}

/// Attaches through a fresh link pinned at `pin`, or, when `pin` already holds a link
/// from an earlier run, swaps the new program into it atomically.
fn pin_or_update(
    pin: &Path,
    prog_fd: std::os::fd::BorrowedFd<'_>,
    attach_and_pin: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    if pin.exists() {
        let link = sys::obj_get(pin).map_err(io_err("open pinned link", pin))?;
        return sys::link_update(link.as_fd(), prog_fd).map_err(io_err("update link", pin));
    }
    attach_and_pin(pin)
}

fn pin_fd_link(link: FdLink, pin: &Path) -> Result<()> {
    link.pin(pin).map(drop).map_err(|e| RedirectError::Io {
        op: "pin link",
        path: pin.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    })
}

impl Redirector {
    /// Checks the kernel, loads and attaches every program and pins maps and links
    /// under `config.pin_dir`. Over an existing installation it reuses the pinned maps
    /// (enrollment survives) and swaps the programs in the pinned links atomically.
    pub fn load(config: &RedirectConfig) -> Result<Self> {
        config.proxy.validate()?;
        let tc_mode = check_kernel(config.tc_attach)?;
        if !sys::is_cgroup2(&config.cgroup) {
            return Err(RedirectError::NotCgroup2(config.cgroup.clone()));
        }
        for name in &config.ingress_interfaces {
            if name.is_empty() || name.len() > 15 || name.contains(['/', '\0']) {
                return Err(RedirectError::InvalidConfig(format!(
                    "invalid interface name {name:?}"
                )));
            }
        }
        // nothing is created outside bpffs
        let existing = config
            .pin_dir
            .ancestors()
            .find(|p| p.exists())
            .unwrap_or(Path::new("/"));
        if !config.pin_dir.is_absolute() || !sys::is_bpffs(existing) {
            return Err(RedirectError::PinDirNotBpffs(config.pin_dir.clone()));
        }
        let fresh = !config.pin_dir.join(MAPS).join("zm_config").exists();
        let result = Self::install(config, tc_mode);
        if result.is_err() && fresh && config.pin_dir.exists() {
            // a failed first install leaves nothing behind
            if let Err(e) = Self::uninstall(&config.pin_dir) {
                tracing::warn!(error = %e, "cleaning up a failed install");
            }
        }
        result
    }

    fn install(config: &RedirectConfig, tc_mode: TcAttach) -> Result<Self> {
        let maps_dir = config.pin_dir.join(MAPS);
        let links_dir = config.pin_dir.join(LINKS);
        fs::create_dir_all(&maps_dir).map_err(io_err("create", &maps_dir))?;
        fs::create_dir_all(&links_dir).map_err(io_err("create", &links_dir))?;

        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&maps_dir)
            .load(OBJECT)?;
        {
            let map = ebpf
                .map_mut("zm_config")
                .ok_or_else(|| RedirectError::NotInstalled(maps_dir.join("zm_config")))?;
            let mut cfg: Array<&mut MapData, abi::Config> =
                Array::try_from(map).map_err(map_err("zm_config"))?;
            cfg.set(0, config.proxy.to_abi(), 0)
                .map_err(map_err("zm_config"))?;
        }

        let cgroup = fs::File::open(&config.cgroup).map_err(io_err("open", &config.cgroup))?;
        for (prog_name, link_name) in [("zm_connect4", "connect4"), ("zm_connect6", "connect6")] {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, prog_name)?;
            prog.load().map_err(prog_err(link_name_static(link_name)))?;
            let fd = prog.fd().map_err(prog_err("cgroup/connect"))?.as_fd();
            let fd = fd
                .try_clone_to_owned()
                .map_err(io_err("dup", &config.cgroup))?;
            pin_or_update(&links_dir.join(link_name), fd.as_fd(), |pin| {
                let id = prog
                    .attach(&cgroup, CgroupAttachMode::Single)
                    .map_err(prog_err("cgroup/connect"))?;
                let link = prog.take_link(id).map_err(prog_err("cgroup/connect"))?;
                let link = FdLink::try_from(link).map_err(|e| link_error("cgroup/connect", e))?;
                pin_fd_link(link, pin)
            })?;
        }
        {
            let prog: &mut SockOps = program(&mut ebpf, "zm_sockops")?;
            prog.load().map_err(prog_err("sockops"))?;
            let fd = prog.fd().map_err(prog_err("sockops"))?.as_fd();
            let fd = fd
                .try_clone_to_owned()
                .map_err(io_err("dup", &config.cgroup))?;
            pin_or_update(&links_dir.join("sockops"), fd.as_fd(), |pin| {
                let id = prog
                    .attach(&cgroup, CgroupAttachMode::Single)
                    .map_err(prog_err("sockops"))?;
                let link = prog.take_link(id).map_err(prog_err("sockops"))?;
                let link = FdLink::try_from(link).map_err(|e| link_error("sockops", e))?;
                pin_fd_link(link, pin)
            })?;
        }
        {
            let prog: &mut CgroupSockopt = program(&mut ebpf, "zm_getsockopt")?;
            prog.load().map_err(prog_err("cgroup/getsockopt"))?;
            let fd = prog.fd().map_err(prog_err("cgroup/getsockopt"))?.as_fd();
            let fd = fd
                .try_clone_to_owned()
                .map_err(io_err("dup", &config.cgroup))?;
            pin_or_update(&links_dir.join("getsockopt"), fd.as_fd(), |pin| {
                // aya 0.14 cannot turn a getsockopt link into a pinnable fd link
                let link =
                    sys::cgroup_link_create(fd.as_fd(), cgroup.as_fd(), sys::BPF_CGROUP_GETSOCKOPT)
                        .map_err(io_err("attach cgroup/getsockopt to", &config.cgroup))?;
                sys::obj_pin(link.as_fd(), pin).map_err(io_err("pin link", pin))
            })?;
        }
        for hook in [INGRESS, EGRESS] {
            let prog: &mut SchedClassifier = program(&mut ebpf, hook.program)?;
            prog.load().map_err(prog_err("classifier"))?;
            let fd = prog.fd().map_err(prog_err("classifier"))?.as_fd();
            let fd = fd
                .try_clone_to_owned()
                .map_err(io_err("dup", &config.cgroup))?;
            let handle = clsact_handle(&config.pin_dir);
            // interfaces dropped from the configuration lose their steering
            for (pin, attachment) in tc_pins(&links_dir, hook)? {
                if !config.ingress_interfaces.contains(&attachment.interface) {
                    detach_tc(hook, &pin, &attachment, handle)?;
                }
            }
            for ifname in &config.ingress_interfaces {
                let tcx_pin = links_dir.join(format!("{}{ifname}", hook.tcx_prefix));
                let clsact_pin = links_dir.join(format!("{}{ifname}", hook.clsact_prefix));
                // The new attachment steers before the other mode's (if an earlier run
                // left one) goes: TCX runs before clsact filters and ends tc processing.
                if tc_mode == TcAttach::Tcx {
                    pin_or_update(&tcx_pin, fd.as_fd(), |pin| {
                        let id = prog
                            .attach_with_options(
                                ifname,
                                hook.attach_type,
                                TcAttachOptions::TcxOrder(LinkOrder::default()),
                            )
                            .map_err(prog_err("classifier"))?;
                        let link = prog.take_link(id).map_err(prog_err("classifier"))?;
                        let link =
                            FdLink::try_from(link).map_err(|e| link_error("classifier", e))?;
                        pin_fd_link(link, pin)
                    })?;
                    if clsact_pin.exists() {
                        remove_clsact(hook, ifname, handle)?;
                        fs::remove_file(&clsact_pin).map_err(io_err("unpin", &clsact_pin))?;
                    }
                } else {
                    attach_clsact(prog, hook, ifname, handle, &clsact_pin)?;
                    if tcx_pin.exists() {
                        fs::remove_file(&tcx_pin).map_err(io_err("unpin", &tcx_pin))?;
                    }
                }
            }
        }
        {
            let (mark, table) = (config.proxy.mark, config.proxy.route_table);
            if config.ingress_interfaces.is_empty() {
                // a reload without interfaces takes down what an earlier one set up
                sys::del_policy_route(Family::V4, mark, table)?;
                sys::del_policy_route(Family::V6, mark, table)?;
            } else {
                sys::add_policy_route(Family::V4, mark, table)?;
                if config.proxy.steers_ipv6() {
                    sys::add_policy_route(Family::V6, mark, table)?;
                } else {
                    sys::del_policy_route(Family::V6, mark, table)?;
                }
            }
        }
        drop(ebpf);
        let mut redirector = Self::open_pinned(&config.pin_dir)?;
        redirector.sync_bridge_ports(&config.ingress_interfaces)?;
        Ok(redirector)
    }

    /// The interfaces (ifindex) recorded as bridge ports, sorted.
    pub fn bridge_ports(&self) -> Vec<u32> {
        let mut ports: Vec<u32> = self.bridge_ports.keys().filter_map(|k| k.ok()).collect();
        ports.sort_unstable();
        ports
    }

    /// Records which of the steered `interfaces` are ports of a steered bridge (the
    /// programs hand steered frames from them to the bridge) and forgets the rest. Call
    /// it whenever ports come and go: a bridge's MAC can change as ports join.
    pub fn sync_bridge_ports(&mut self, interfaces: &[String]) -> Result<()> {
        let wanted: std::collections::HashMap<u32, abi::BridgePort> =
            sys::bridge_ports(interfaces)?
                .into_iter()
                .map(|p| {
                    let value = abi::BridgePort {
                        bridge_ifindex: p.bridge_ifindex,
                        bridge_mac: p.bridge_mac,
                        pad: 0,
                    };
                    (p.port_ifindex, value)
                })
                .collect();
        let stale: Vec<u32> = self
            .bridge_ports
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| !wanted.contains_key(k))
            .collect();
        for ifindex in stale {
            remove(&mut self.bridge_ports, &ifindex, "zm_bridge_ports")?;
        }
        for (ifindex, port) in wanted {
            if self.bridge_ports.get(&ifindex, 0).ok() != Some(port) {
                self.bridge_ports
                    .insert(ifindex, port, 0)
                    .map_err(map_err("zm_bridge_ports"))?;
            }
        }
        Ok(())
    }

    /// Opens an installation made by [`Redirector::load`] (possibly by another process)
    /// without touching the programs: redirection continues uninterrupted.
    pub fn open_pinned(pin_dir: &Path) -> Result<Self> {
        let maps = pin_dir.join(MAPS);
        if !maps.join("zm_config").exists() {
            return Err(RedirectError::NotInstalled(pin_dir.to_path_buf()));
        }
        let open = |name: &'static str| -> Result<Map> {
            let data = MapData::from_pin(maps.join(name)).map_err(map_err(name))?;
            Map::from_map_data(data).map_err(map_err(name))
        };
        macro_rules! typed {
            ($name:literal) => {
                open($name)?.try_into().map_err(map_err($name))?
            };
        }
        Ok(Self {
            pin_dir: pin_dir.to_path_buf(),
            config: typed!("zm_config"),
            enrolled_netns: typed!("zm_enrolled_netns"),
            enrolled_cgroups: typed!("zm_enrolled_cgroups"),
            excluded_netns: typed!("zm_excluded_netns"),
            excluded_cgroups: typed!("zm_excluded_cgroups"),
            orig_by_peer: typed!("zm_orig_by_peer"),
            enrolled_ips: typed!("zm_enrolled_ips"),
            mesh_sources: typed!("zm_mesh_sources"),
            bridge_ports: typed!("zm_bridge_ports"),
            drops: typed!("zm_drops"),
        })
    }

    /// The pin directory this handle works on.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Redirect outbound TCP of sockets in the netns with this cookie.
    pub fn enroll_netns(&mut self, cookie: u64) -> Result<()> {
        self.enrolled_netns
            .insert(cookie, 1, 0)
            .map_err(map_err("zm_enrolled_netns"))
    }

    /// Stop redirecting that netns; new connects go direct at once.
    pub fn unenroll_netns(&mut self, cookie: u64) -> Result<()> {
        remove(&mut self.enrolled_netns, &cookie, "zm_enrolled_netns")
    }

    /// Redirect outbound TCP of processes in this cgroup (or below it).
    pub fn enroll_cgroup(&mut self, id: u64) -> Result<()> {
        self.enrolled_cgroups
            .insert(id, 1, 0)
            .map_err(map_err("zm_enrolled_cgroups"))
    }

    pub fn unenroll_cgroup(&mut self, id: u64) -> Result<()> {
        remove(&mut self.enrolled_cgroups, &id, "zm_enrolled_cgroups")
    }

    /// Never redirect processes in this cgroup (or below it), enrolled or not: the proxy.
    pub fn exclude_cgroup(&mut self, id: u64) -> Result<()> {
        self.excluded_cgroups
            .insert(id, 1, 0)
            .map_err(map_err("zm_excluded_cgroups"))
    }

    pub fn unexclude_cgroup(&mut self, id: u64) -> Result<()> {
        remove(&mut self.excluded_cgroups, &id, "zm_excluded_cgroups")
    }

    /// Never redirect sockets of this netns, enrolled or not.
    pub fn exclude_netns(&mut self, cookie: u64) -> Result<()> {
        self.excluded_netns
            .insert(cookie, 1, 0)
            .map_err(map_err("zm_excluded_netns"))
    }

    pub fn unexclude_netns(&mut self, cookie: u64) -> Result<()> {
        remove(&mut self.excluded_netns, &cookie, "zm_excluded_netns")
    }

    /// Steer inbound TCP to this pod IP into the proxy.
    pub fn enroll_pod_ip(&mut self, ip: IpAddr, mode: Mode) -> Result<()> {
        let flags = match mode {
            Mode::Strict => abi::POD_STRICT,
            Mode::Permissive => 0,
        };
        self.enrolled_ips
            .insert(abi::Ip::new(ip), flags, 0)
            .map_err(map_err("zm_enrolled_ips"))
    }

    pub fn unenroll_pod_ip(&mut self, ip: IpAddr) -> Result<()> {
        remove(&mut self.enrolled_ips, &abi::Ip::new(ip), "zm_enrolled_ips")
    }

    /// Plaintext from this address (a mesh proxy) is not refused by strict mode.
    pub fn add_mesh_source(&mut self, ip: IpAddr) -> Result<()> {
        self.mesh_sources
            .insert(abi::Ip::new(ip), 1, 0)
            .map_err(map_err("zm_mesh_sources"))
    }

    pub fn remove_mesh_source(&mut self, ip: IpAddr) -> Result<()> {
        remove(&mut self.mesh_sources, &abi::Ip::new(ip), "zm_mesh_sources")
    }

    /// Changes the proxy's addresses or modes at run time. The mark and route table are
    /// fixed at load (the policy route is built from them).
    pub fn set_proxy(&mut self, proxy: &ProxyListeners) -> Result<()> {
        proxy.validate()?;
        let current = self.config.get(&0, 0).map_err(map_err("zm_config"))?;
        if current.mark != proxy.mark || current.route_table != proxy.route_table {
            return Err(RedirectError::InvalidConfig(
                "mark and route table can only change by reinstalling".into(),
            ));
        }
        self.config
            .set(0, proxy.to_abi(), 0)
            .map_err(map_err("zm_config"))
    }

    /// The original destination of a redirected connection whose client (the accepted
    /// socket's peer) is `peer`. Consumes the entry: a second call returns `None`.
    pub fn original_dst(&mut self, peer: SocketAddr) -> Result<Option<SocketAddr>> {
        let key = abi::Addr::peer_key(peer);
        match self.orig_by_peer.get(&key, 0) {
            Ok(orig) => {
                remove(&mut self.orig_by_peer, &key, "zm_orig_by_peer")?;
                Ok(orig.to_socket_addr())
            }
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err("zm_orig_by_peer")(e)),
        }
    }

    /// Drops counted since install, per reason.
    pub fn drop_counts(&self) -> Result<DropCounts> {
        let sum = |reason: DropReason| -> Result<u64> {
            let values = self
                .drops
                .get(&reason.code(), 0)
                .map_err(map_err("zm_drops"))?;
            Ok(values.iter().sum())
        };
        Ok(DropCounts {
            strict_plaintext: sum(DropReason::StrictPlaintext)?,
            proxy_unavailable: sum(DropReason::ProxyUnavailable)?,
            fragment: sum(DropReason::Fragment)?,
        })
    }

    /// A reader of drop reports. Only one reader should consume them at a time.
    pub fn drop_events(&self) -> Result<DropEvents> {
        let path = self.pin_dir.join(MAPS).join("zm_events");
        let data = MapData::from_pin(&path).map_err(map_err("zm_events"))?;
        let map = Map::from_map_data(data).map_err(map_err("zm_events"))?;
        let ring = RingBuf::try_from(map).map_err(map_err("zm_events"))?;
        DropEvents::new(ring)
    }

    /// Removes every link (detaching all programs), map and pin under `pin_dir`, and the
    /// policy rule and route. Run it in the netns where [`Redirector::load`] ran.
    pub fn uninstall(pin_dir: &Path) -> Result<()> {
        let links = pin_dir.join(LINKS);
        let maps = pin_dir.join(MAPS);
        if !sys::is_bpffs(pin_dir) || !(links.is_dir() || maps.is_dir()) {
            return Err(RedirectError::NotInstalled(pin_dir.to_path_buf()));
        }
        // read the policy route's mark and table before the config map goes away
        let route = match Self::open_config(&maps) {
            Ok(cfg) => Some((cfg.mark, cfg.route_table)),
            Err(e) => {
                tracing::warn!(error = %e, "no readable config map; no policy route to remove");
                None
            }
        };
        // clsact filters are not bpf objects: they go first, found from their pins
        let ingress = ingress_pins(&links)?;
        let handle = clsact_handle(pin_dir);
        for (pin, attachment) in &ingress {
            detach_tc(INGRESS, pin, attachment, handle)?;
        }
        for (pin, attachment) in &tc_pins(&links, EGRESS)? {
            detach_tc(EGRESS, pin, attachment, handle)?;
        }
        let had_tc = !ingress.is_empty();
        for dir in [&links, &maps] {
            if !dir.exists() {
                continue;
            }
            for entry in fs::read_dir(dir).map_err(io_err("list", dir))? {
                let entry = entry.map_err(io_err("list", dir))?;
                fs::remove_file(entry.path()).map_err(io_err("unpin", &entry.path()))?;
            }
            fs::remove_dir(dir).map_err(io_err("remove", dir))?;
        }
        fs::remove_dir(pin_dir).map_err(io_err("remove", pin_dir))?;
        match route {
            Some((mark, table)) if had_tc => sys::del_policy_route(Family::V4, mark, table)
                .and_then(|()| sys::del_policy_route(Family::V6, mark, table)),
            _ => Ok(()),
        }
    }

    /// The tc ingress attachments an installation records (one per interface), e.g. for
    /// `zmesh check`.
    pub fn ingress_attachments(pin_dir: &Path) -> Result<Vec<IngressAttachment>> {
        Ok(ingress_pins(&pin_dir.join(LINKS))?
            .into_iter()
            .map(|(_, attachment)| attachment)
            .collect())
    }

    fn open_config(maps: &Path) -> Result<abi::Config> {
        let data = MapData::from_pin(maps.join("zm_config")).map_err(map_err("zm_config"))?;
        let map = Map::from_map_data(data).map_err(map_err("zm_config"))?;
        let arr: Array<MapData, abi::Config> = map.try_into().map_err(map_err("zm_config"))?;
        arr.get(&0, 0).map_err(map_err("zm_config"))
    }
}

fn remove<K: aya::Pod, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    key: &K,
    name: &'static str,
) -> Result<()> {
    match map.remove(key) {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(e) => Err(map_err(name)(e)),
    }
}

fn program<'a, T>(ebpf: &'a mut aya::Ebpf, name: &'static str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let prog = ebpf.program_mut(name).ok_or(RedirectError::Program {
        name,
        source: ProgramError::UnexpectedProgramType,
    })?;
    prog.try_into().map_err(prog_err(name))
}

fn link_error(name: &'static str, e: aya::programs::links::LinkError) -> RedirectError {
    RedirectError::Link { name, source: e }
}

fn link_name_static(name: &str) -> &'static str {
    match name {
        "connect4" => "cgroup/connect4",
        _ => "cgroup/connect6",
    }
}
