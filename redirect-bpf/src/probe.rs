//! What the programs need from the kernel, probed one feature at a time (a program type
//! loaded, a map created, a helper called, an attach command tried), never read from the
//! version string: distribution kernels backport features (RHEL 9's 5.14) and leave
//! others out. A missing feature is named with the first Linux release that has it.

use std::fmt;

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{is_helper_supported, is_map_supported, is_program_supported, BpfHelper},
};

use crate::sys;

/// What a probe found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    Present,
    Absent,
    /// The probe itself failed (e.g. not permitted): nothing is known.
    Unknown(String),
}

/// One kernel feature the redirection uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Feature {
    /// What it is, e.g. "bpf_sk_assign() in tc programs".
    pub name: &'static str,
    /// What zmesh needs it for.
    pub needed_for: &'static str,
    /// The first Linux release that has it, e.g. "5.7".
    pub since: &'static str,
    pub probe: Probe,
}

impl fmt::Display for Feature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}; Linux {} has it)",
            self.name, self.needed_for, self.since
        )
    }
}

/// The release whose features everything below (TCX aside) is within.
pub const FLOOR: &str = "5.14";
/// The release that attaches tc programs through TCX links; older ones get a clsact filter.
pub const TCX_SINCE: &str = "6.6";

/// Every feature the programs need, and whether TCX is there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelFeatures {
    pub required: Vec<Feature>,
    /// TCX links for tc programs (optional: without them tc ingress is a clsact filter).
    pub tcx: Feature,
}

type Check = fn() -> Result<bool, String>;

fn program(ty: ProgramType) -> Result<bool, String> {
    is_program_supported(ty).map_err(|e| e.to_string())
}

fn map(ty: MapType) -> Result<bool, String> {
    is_map_supported(ty).map_err(|e| e.to_string())
}

fn helper(ty: ProgramType, helper: BpfHelper) -> Result<bool, String> {
    is_helper_supported(ty, helper).map_err(|e| e.to_string())
}

const SCHED_CLS: ProgramType = ProgramType::SchedClassifier;
const SOCK_ADDR: ProgramType = ProgramType::CgroupSockAddr;

/// (name, needed for, since, probe)
const REQUIRED: &[(&str, &str, &str, Check)] = &[
    (
        "cgroup/connect4 and connect6 programs (BPF_PROG_TYPE_CGROUP_SOCK_ADDR)",
        "outbound capture",
        "4.17",
        || program(SOCK_ADDR),
    ),
    (
        "sockops programs (BPF_PROG_TYPE_SOCK_OPS)",
        "original destinations",
        "4.13",
        || program(ProgramType::SockOps),
    ),
    (
        "cgroup/getsockopt programs (BPF_PROG_TYPE_CGROUP_SOCKOPT)",
        "SO_ORIGINAL_DST",
        "5.3",
        || program(ProgramType::CgroupSockopt),
    ),
    (
        "tc classifier programs (BPF_PROG_TYPE_SCHED_CLS)",
        "inbound steering",
        "4.1",
        || program(SCHED_CLS),
    ),
    ("LRU hash maps", "original destinations", "4.10", || {
        map(MapType::LruHash)
    }),
    (
        "ring buffer maps (BPF_MAP_TYPE_RINGBUF)",
        "drop reports",
        "5.8",
        || map(MapType::RingBuf),
    ),
    (
        "bpf links (BPF_LINK_CREATE, BPF_LINK_UPDATE)",
        "pinned attachments replaced in place",
        "5.7",
        || sys::probe_link_create().map_err(|e| e.to_string()),
    ),
    (
        "bpf_get_netns_cookie() in cgroup/connect",
        "enrollment by network namespace",
        "5.7",
        || helper(SOCK_ADDR, BpfHelper::BPF_FUNC_get_netns_cookie),
    ),
    (
        "the SO_NETNS_COOKIE socket option",
        "reading each pod's network namespace cookie",
        "5.14",
        || sys::probe_netns_cookie_sockopt().map_err(|e| e.to_string()),
    ),
    (
        "bpf_get_current_ancestor_cgroup_id() in cgroup/connect",
        "enrollment by cgroup",
        "5.7",
        || {
            helper(
                SOCK_ADDR,
                BpfHelper::BPF_FUNC_get_current_ancestor_cgroup_id,
            )
        },
    ),
    (
        "bpf_get_socket_cookie() in cgroup/connect",
        "original destinations",
        "5.7",
        || helper(SOCK_ADDR, BpfHelper::BPF_FUNC_get_socket_cookie),
    ),
    (
        "bpf_get_socket_cookie() in sockops",
        "original destinations",
        "5.7",
        || helper(ProgramType::SockOps, BpfHelper::BPF_FUNC_get_socket_cookie),
    ),
    (
        "bpf_skc_lookup_tcp() in tc programs",
        "inbound steering",
        "5.2",
        || helper(SCHED_CLS, BpfHelper::BPF_FUNC_skc_lookup_tcp),
    ),
    (
        "bpf_sk_assign() in tc programs",
        "inbound steering (TPROXY without iptables)",
        "5.7",
        || helper(SCHED_CLS, BpfHelper::BPF_FUNC_sk_assign),
    ),
    (
        "bpf_skb_change_tail() in tc programs",
        "strict mode's resets",
        "4.9",
        || helper(SCHED_CLS, BpfHelper::BPF_FUNC_skb_change_tail),
    ),
    (
        "bpf_ringbuf_reserve() in tc programs",
        "drop reports",
        "5.8",
        || helper(SCHED_CLS, BpfHelper::BPF_FUNC_ringbuf_reserve),
    ),
];

fn run(check: impl FnOnce() -> Result<bool, String>) -> Probe {
    match check() {
        Ok(true) => Probe::Present,
        Ok(false) => Probe::Absent,
        Err(e) => Probe::Unknown(e),
    }
}

impl KernelFeatures {
    /// Probes the running kernel (needs CAP_BPF/CAP_SYS_ADMIN; loads a few trivial
    /// programs and maps, attaches nothing). Lifts RLIMIT_MEMLOCK first, as loading does.
    pub fn probe() -> Self {
        if let Err(e) = sys::raise_memlock() {
            tracing::debug!(error = %e, "cannot lift RLIMIT_MEMLOCK");
        }
        let required = REQUIRED
            .iter()
            .map(|&(name, needed_for, since, check)| Feature {
                name,
                needed_for,
                since,
                probe: run(check),
            })
            .collect();
        let tcx = Feature {
            name: "TCX links for tc programs (BPF_TCX_INGRESS)",
            needed_for: "tc ingress as a link; without it, a cls_bpf filter under clsact",
            since: TCX_SINCE,
            probe: run(|| sys::probe_tcx().map_err(|e| e.to_string())),
        };
        Self { required, tcx }
    }

    /// The required features the kernel lacks.
    pub fn missing(&self) -> Vec<Feature> {
        self.required
            .iter()
            .filter(|f| f.probe == Probe::Absent)
            .cloned()
            .collect()
    }

    /// Whether tc ingress can attach through TCX.
    pub fn has_tcx(&self) -> bool {
        self.tcx.probe == Probe::Present
    }
}
