//! Install / restart / upgrade / uninstall in both tc attach modes, the kernel feature
//! probes, and the loader's rejection paths. Root.

mod common;

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    time::Duration,
};

use aya::programs::{tc::TcAttachType, SchedClassifier};
use common::*;
use zmesh_redirect::{
    current_netns_cookie, kernel_features, IngressAttachment, Probe, ProxyListeners,
    RedirectConfig, RedirectError, Redirector, TcAttach,
};

const WAIT: Duration = Duration::from_secs(5);

fn proxy() -> ProxyListeners {
    let mut p = ProxyListeners::new("10.77.0.1:15001".parse().unwrap());
    p.route_table = 1338;
    p.mark = 0x5391;
    p
}

fn listen(ns: &Netns, addr: &str) -> TcpListener {
    let addr: SocketAddr = addr.parse().unwrap();
    ns.run(move || TcpListener::bind(addr).unwrap())
}

fn connect(ns: &Netns, addr: &str) -> TcpStream {
    let addr: SocketAddr = addr.parse().unwrap();
    ns.run(move || TcpStream::connect_timeout(&addr, WAIT).unwrap())
}

/// Ids of the programs attached directly to the cgroup.
fn cgroup_prog_ids(cg: &Path) -> Vec<String> {
    let out = sh_out(&["bpftool", "-j", "cgroup", "show", cg.to_str().unwrap()]);
    out.split("\"id\":")
        .skip(1)
        .map(|r| {
            r.split(|c: char| !c.is_ascii_digit())
                .next()
                .unwrap()
                .to_string()
        })
        .collect()
}

/// Number of programs attached directly to the cgroup (any attach type).
fn cgroup_attachments(cg: &Path) -> usize {
    let out = sh_out(&["bpftool", "-j", "cgroup", "show", cg.to_str().unwrap()]);
    out.matches("\"attach_type\"").count()
}

/// Programs attached to the interface's ingress (or egress) through TCX (none where the
/// kernel has no TCX).
fn tcx_programs(ns: &Netns, ifname: &str, attach_type: TcAttachType) -> usize {
    if !kernel_features().has_tcx() {
        return 0;
    }
    let ifname = ifname.to_string();
    ns.run(move || {
        SchedClassifier::query_tcx(&ifname, attach_type)
            .unwrap()
            .1
            .len()
    })
}

/// The bpf filters under the interface's clsact ingress, as `tc` lists them: one line
/// per filter, with its program id.
fn clsact_filters(ns: &Netns, ifname: &str) -> Vec<String> {
    clsact_filters_on(ns, ifname, "ingress")
}

fn clsact_filters_on(ns: &Netns, ifname: &str, direction: &str) -> Vec<String> {
    ns.exec_out(&["tc", "filter", "show", "dev", ifname, direction])
        .lines()
        .filter(|l| l.contains(" bpf ") && l.contains("direct-action"))
        .map(str::to_string)
        .collect()
}

/// How `mode` resolves on this kernel.
fn resolved(mode: TcAttach) -> TcAttach {
    match mode {
        TcAttach::Auto if kernel_features().has_tcx() => TcAttach::Tcx,
        TcAttach::Auto => TcAttach::Netlink,
        other => other,
    }
}

/// (TCX programs, clsact filters) on the interface's ingress.
fn tc_ingress(ns: &Netns, ifname: &str) -> (usize, usize) {
    (
        tcx_programs(ns, ifname, TcAttachType::Ingress),
        clsact_filters(ns, ifname).len(),
    )
}

/// (TCX programs, clsact filters) on the interface's egress.
fn tc_egress(ns: &Netns, ifname: &str) -> (usize, usize) {
    (
        tcx_programs(ns, ifname, TcAttachType::Egress),
        clsact_filters_on(ns, ifname, "egress").len(),
    )
}

fn expected_tc(mode: TcAttach) -> (usize, usize) {
    match resolved(mode) {
        TcAttach::Tcx => (1, 0),
        _ => (0, 1),
    }
}

#[test]
fn pins_survive_restart_upgrade_swaps_in_place_and_uninstall_leaves_nothing_auto() {
    lifecycle(TcAttach::Auto);
}

#[test]
fn pins_survive_restart_upgrade_swaps_in_place_and_uninstall_leaves_nothing_clsact() {
    lifecycle(TcAttach::Netlink);
}

fn lifecycle(tc_attach: TcAttach) {
    let _s = serial();
    let node = Netns::new("n");
    let pod = Netns::new("p");
    let (node_if, _) = veth(&node, "10.77.0.1", &pod, "10.77.0.2");
    pod.exec(&["ip", "route", "add", "default", "via", "10.77.0.1"]);
    let cg = Cgroup::new();
    let pin_dir = Installed::pin_dir("l");
    let _inst = Installed {
        pin_dir: pin_dir.clone(),
        netns: node.name.clone(),
    };
    let config = RedirectConfig {
        pin_dir: pin_dir.clone(),
        cgroup: cg.path.clone(),
        ingress_interfaces: vec![node_if.clone()],
        proxy: proxy(),
        tc_attach,
    };
    let cookie = pod.run(|| current_netns_cookie().unwrap());
    let _in = cg.enter();
    let proxy_l = listen(&node, "10.77.0.1:15001");
    let direct = listen(&node, "10.77.0.1:80");

    let cfg = config.clone();
    let mut red = node.run(move || Redirector::load(&cfg)).expect("load");
    red.enroll_netns(cookie).unwrap();
    assert_eq!(
        cgroup_attachments(&cg.path),
        4,
        "connect4, connect6, sockops, getsockopt"
    );
    assert_eq!(tc_ingress(&node, &node_if), expected_tc(tc_attach));
    assert_eq!(tc_egress(&node, &node_if), expected_tc(tc_attach));
    assert_eq!(
        Redirector::ingress_attachments(&pin_dir).unwrap(),
        vec![IngressAttachment {
            interface: node_if.clone(),
            mode: resolved(tc_attach),
        }]
    );
    let filters_before = clsact_filters(&node, &node_if);
    assert!(node.exec_out(&["ip", "rule"]).contains("lookup 1338"));
    assert!(node
        .exec_out(&["ip", "route", "show", "table", "1338"])
        .contains("local default dev lo"));

    // the agent goes away: redirection goes on
    drop(red);
    let _c = connect(&pod, "10.77.0.1:80");
    assert!(
        accept_within(&proxy_l, WAIT).is_some(),
        "still redirected after the handle dropped"
    );

    // a restarted agent re-opens the pins; enrollment is still there
    let mut red = Redirector::open_pinned(&pin_dir).expect("open_pinned");
    red.unenroll_netns(cookie).unwrap();
    let _c = connect(&pod, "10.77.0.1:80");
    assert!(accept_within(&direct, WAIT).is_some());
    red.enroll_netns(cookie).unwrap();
    drop(red);

    // load over an existing install: programs are swapped inside the pinned links,
    // maps (and so enrollment) are kept, nothing is attached twice
    let before = cgroup_prog_ids(&cg.path);
    let cfg = config.clone();
    let red = node.run(move || Redirector::load(&cfg)).expect("reload");
    assert_eq!(cgroup_attachments(&cg.path), 4);
    let after = cgroup_prog_ids(&cg.path);
    assert_eq!(before.len(), 4);
    assert!(
        before.iter().all(|id| !after.contains(id)),
        "new programs swapped in: {before:?} -> {after:?}"
    );
    assert_eq!(tc_ingress(&node, &node_if), expected_tc(tc_attach));
    assert_eq!(
        tc_egress(&node, &node_if),
        expected_tc(tc_attach),
        "not twice"
    );
    if resolved(tc_attach) == TcAttach::Netlink {
        // the same filter (priority and handle), with the new program in it
        let filters_after = clsact_filters(&node, &node_if);
        let id_of = |line: &str| line.split(" id ").nth(1).map(str::to_string);
        let head = |line: &str| line.split(" zm_tc_ingress").next().map(str::to_string);
        assert_eq!(
            filters_before.iter().map(|l| head(l)).collect::<Vec<_>>(),
            filters_after.iter().map(|l| head(l)).collect::<Vec<_>>(),
            "same filter: {filters_before:?} -> {filters_after:?}"
        );
        assert_ne!(
            id_of(&filters_before[0]),
            id_of(&filters_after[0]),
            "new program in the filter: {filters_before:?} -> {filters_after:?}"
        );
    }
    let _c = connect(&pod, "10.77.0.1:80");
    assert!(
        accept_within(&proxy_l, WAIT).is_some(),
        "enrollment survived the reload"
    );
    assert!(!has_pending(&direct));
    drop(red);

    let pd = pin_dir.clone();
    node.run(move || Redirector::uninstall(&pd))
        .expect("uninstall");
    assert!(!pin_dir.exists(), "pin directory removed");
    assert_eq!(cgroup_attachments(&cg.path), 0, "no cgroup attachment left");
    assert_eq!(
        tc_ingress(&node, &node_if),
        (0, 0),
        "no tcx attachment or clsact filter left"
    );
    assert_eq!(tc_egress(&node, &node_if), (0, 0), "none on egress either");
    assert!(
        !node.exec_out(&["ip", "rule"]).contains("lookup 1338"),
        "policy rule removed"
    );
    assert!(node
        .exec_out(&["ip", "route", "show", "table", "1338"])
        .trim()
        .is_empty());
    let _c = connect(&pod, "10.77.0.1:80");
    assert!(
        accept_within(&direct, WAIT).is_some(),
        "traffic is direct after uninstall"
    );
    assert!(!has_pending(&proxy_l));

    // and once more is an error, not a silent success
    let pd = pin_dir.clone();
    assert!(matches!(
        Redirector::uninstall(&pd),
        Err(RedirectError::NotInstalled(_))
    ));
    assert!(matches!(
        Redirector::open_pinned(&pd),
        Err(RedirectError::NotInstalled(_))
    ));
}

#[test]
fn load_rejects_bad_environment_and_configuration_without_leaving_anything() {
    let _s = serial();
    let cg = Cgroup::new();
    let good = |pin_dir: PathBuf| RedirectConfig {
        pin_dir,
        cgroup: cg.path.clone(),
        ingress_interfaces: vec![],
        proxy: proxy(),
        tc_attach: TcAttach::Auto,
    };

    let mut c = good(Installed::pin_dir("e"));
    c.cgroup = "/tmp".into();
    assert!(matches!(
        Redirector::load(&c),
        Err(RedirectError::NotCgroup2(_))
    ));
    assert!(!c.pin_dir.exists());

    let c = good(std::env::temp_dir().join(unique("notbpffs")));
    assert!(matches!(
        Redirector::load(&c),
        Err(RedirectError::PinDirNotBpffs(_))
    ));
    assert!(!c.pin_dir.exists(), "nothing created outside bpffs");

    for bad in [
        |p: &mut ProxyListeners| p.outbound = "0.0.0.0:15001".parse().unwrap(),
        |p: &mut ProxyListeners| p.outbound = "127.0.0.1:15001".parse().unwrap(),
        |p: &mut ProxyListeners| p.mark = 0,
        |p: &mut ProxyListeners| p.route_table = 254,
        |p: &mut ProxyListeners| p.inbound_plaintext_port = 0,
        |p: &mut ProxyListeners| p.other_ports = vec![1; 9],
        |p: &mut ProxyListeners| p.outbound_v6 = Some("::".parse().unwrap()),
        |p: &mut ProxyListeners| p.outbound_v6 = Some("::1".parse().unwrap()),
        |p: &mut ProxyListeners| p.outbound_v6 = Some("::ffff:10.0.0.1".parse().unwrap()),
        |p: &mut ProxyListeners| {
            // IPv6 lookups use the packet's destination: a bound inbound address cannot work
            p.outbound_v6 = Some("fd00::1".parse().unwrap());
            p.inbound_addr = Some("10.0.0.1".parse().unwrap());
        },
    ] {
        let mut c = good(Installed::pin_dir("e"));
        bad(&mut c.proxy);
        assert!(
            matches!(Redirector::load(&c), Err(RedirectError::InvalidConfig(_))),
            "{:?}",
            c.proxy
        );
        assert!(!c.pin_dir.exists());
    }

    let mut c = good(Installed::pin_dir("e"));
    c.ingress_interfaces = vec!["bad/name".into()];
    assert!(matches!(
        Redirector::load(&c),
        Err(RedirectError::InvalidConfig(_))
    ));

    // an interface that does not exist fails the load and rolls the install back
    let mut c = good(Installed::pin_dir("e"));
    let _inst = Installed {
        pin_dir: c.pin_dir.clone(),
        netns: String::new(),
    };
    c.ingress_interfaces = vec![unique("nodev")];
    for mode in [TcAttach::Auto, TcAttach::Netlink] {
        c.tc_attach = mode;
        let err = Redirector::load(&c).expect_err("missing interface");
        assert!(
            matches!(
                err,
                RedirectError::Program { .. } | RedirectError::Tc { .. }
            ),
            "{err}"
        );
        assert!(!c.pin_dir.exists(), "failed first install is rolled back");
        assert_eq!(cgroup_attachments(&cg.path), 0);
    }

    assert!(matches!(
        Redirector::open_pinned(Path::new("/sys/fs/bpf/zmesh-test/none")),
        Err(RedirectError::NotInstalled(_))
    ));
    assert!(matches!(
        Redirector::uninstall(Path::new("/tmp")),
        Err(RedirectError::NotInstalled(_))
    ));
}

/// The probes find everything the programs need on every kernel this runs on, and find
/// TCX exactly where it exists (6.6 and later): a cross-check of the probe, not a rule
/// the loader uses.
#[test]
fn kernel_probes_find_every_feature_and_tcx_from_6_6() {
    let features = kernel_features();
    for f in &features.required {
        assert_eq!(f.probe, Probe::Present, "{f}");
    }
    assert!(features.missing().is_empty());
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap());
    let version = (parts.next().unwrap(), parts.next().unwrap());
    assert_eq!(
        features.has_tcx(),
        version >= (6, 6),
        "TCX probe on {release}: {:?}",
        features.tcx
    );
    assert_eq!(features.tcx.since, "6.6");
}

/// Forcing TCX where the kernel has it attaches a TCX link; where it has not, the load is
/// refused up front, naming TCX and the kernel that has it, and nothing is left behind.
#[test]
fn forced_tcx_attaches_a_link_or_is_refused_naming_the_feature() {
    let _s = serial();
    let node = Netns::new("n");
    let pod = Netns::new("p");
    let (node_if, _) = veth(&node, "10.77.0.1", &pod, "10.77.0.2");
    let cg = Cgroup::new();
    let pin_dir = Installed::pin_dir("x");
    let _inst = Installed {
        pin_dir: pin_dir.clone(),
        netns: node.name.clone(),
    };
    let config = RedirectConfig {
        pin_dir: pin_dir.clone(),
        cgroup: cg.path.clone(),
        ingress_interfaces: vec![node_if.clone()],
        proxy: proxy(),
        tc_attach: TcAttach::Tcx,
    };
    let result = node.run(move || Redirector::load(&config));
    if kernel_features().has_tcx() {
        result.expect("load with TCX");
        assert_eq!(tc_ingress(&node, &node_if), (1, 0));
    } else {
        let err = result.expect_err("no TCX on this kernel");
        let RedirectError::MissingFeatures(missing) = &err else {
            panic!("expected MissingFeatures, got {err}");
        };
        assert_eq!(missing.len(), 1, "{err}");
        assert_eq!(missing[0].since, "6.6");
        let message = err.to_string();
        assert!(
            message.contains("TCX") && message.contains("Linux 6.6 has it"),
            "{message}"
        );
        assert!(!pin_dir.exists(), "nothing installed");
        assert_eq!(cgroup_attachments(&cg.path), 0);
        assert_eq!(tc_ingress(&node, &node_if), (0, 0));
    }
}
