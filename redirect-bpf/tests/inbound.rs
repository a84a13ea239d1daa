//! Inbound steering (tc ingress + bpf_sk_assign) and strict mode: needs root; builds
//! client -> node -> pod namespaces and removes everything afterwards. Every test runs
//! twice: with tc ingress attached as the kernel prefers (`auto`: TCX from 6.6) and
//! forced to a clsact filter (`clsact`: what kernels before 6.6 get).

mod common;

use std::{
    io::{ErrorKind, Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use common::*;
use zmesh_redirect::{
    DropReason, Mode, ProxyListeners, RedirectConfig, RedirectError, Redirector, RejectMode,
    TcAttach,
};

/// Runs a test body once per tc attach mode, as `<name>::auto` and `<name>::clsact`.
macro_rules! in_both_modes {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn auto() {
                super::$name(zmesh_redirect::TcAttach::Auto)
            }
            #[test]
            fn clsact() {
                super::$name(zmesh_redirect::TcAttach::Netlink)
            }
        }
    )*};
}

in_both_modes!(
    plaintext_and_hbone_to_enrolled_pod_reach_the_proxy_listeners,
    strict_mode_refuses_plaintext_at_once_and_reports_it,
    missing_proxy_listener_fails_closed_and_is_reported,
    strict_mode_refuses_ipv6_plaintext_when_ipv6_is_not_steered,
    steering_never_stops_while_the_programs_are_reloaded,
    ipv6_is_steered_like_ipv4_when_enabled,
    plaintext_between_pods_on_one_bridge_is_steered_too,
    strict_mode_refuses_plaintext_that_a_vip_translation_sent_around_ingress,
);

const WAIT: Duration = Duration::from_secs(5);
const POD: &str = "10.77.0.2";
const POD6: &str = "fd77::2";
/// A second IPv6 address of the pod that is never enrolled.
const POD6_OTHER: &str = "fd77::3";
const CLIENT6: &str = "fd79::2";

struct Topo {
    _inst: Installed,
    node: Netns,
    pod: Netns,
    client: Netns,
    node_if_to_client: String,
    _cg: Cgroup,
    config: RedirectConfig,
    red: Redirector,
}

/// Adds an IPv6 address without duplicate address detection (usable at once).
fn addr6(ns: &Netns, ifname: &str, cidr: &str) {
    ns.exec(&["ip", "-6", "addr", "add", cidr, "dev", ifname, "nodad"]);
}

/// client 10.79.0.2 -> (10.79.0.1) node (10.77.0.1) -> pod 10.77.0.2; tc on the node's
/// interface facing the client. The same over IPv6: client fd79::2 -> (fd79::1) node
/// (fd77::1) -> pod fd77::2 and fd77::3.
fn topo(tc_attach: TcAttach) -> Topo {
    topo_with(tc_attach, None)
}

/// [`topo`], steering IPv6 too when `outbound_v6` is given (the node's fd77::1).
fn topo_with(tc_attach: TcAttach, outbound_v6: Option<&str>) -> Topo {
    let node = Netns::new("n");
    let pod = Netns::new("p");
    let client = Netns::new("c");
    let (node_if_to_pod, pod_if) = veth(&node, "10.77.0.1", &pod, POD);
    let (node_if_to_client, client_if) = veth(&node, "10.79.0.1", &client, "10.79.0.2");
    pod.exec(&["ip", "route", "add", "default", "via", "10.77.0.1"]);
    client.exec(&["ip", "route", "add", "default", "via", "10.79.0.1"]);
    node.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    addr6(&node, &node_if_to_pod, "fd77::1/64");
    addr6(&pod, &pod_if, &format!("{POD6}/64"));
    addr6(&pod, &pod_if, &format!("{POD6_OTHER}/64"));
    addr6(&node, &node_if_to_client, "fd79::1/64");
    addr6(&client, &client_if, &format!("{CLIENT6}/64"));
    pod.exec(&["ip", "-6", "route", "add", "default", "via", "fd77::1"]);
    client.exec(&["ip", "-6", "route", "add", "default", "via", "fd79::1"]);
    node.exec(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
    let cg = Cgroup::new();
    let pin_dir = Installed::pin_dir("i");
    let inst = Installed {
        pin_dir: pin_dir.clone(),
        netns: node.name.clone(),
    };
    let mut proxy = ProxyListeners::new("10.77.0.1:15001".parse().unwrap());
    proxy.route_table = 1337;
    proxy.mark = 0x5390;
    proxy.outbound_v6 = outbound_v6.map(|ip| ip.parse().unwrap());
    let config = RedirectConfig {
        pin_dir,
        cgroup: cg.path.clone(),
        ingress_interfaces: vec![node_if_to_client.clone()],
        proxy,
        tc_attach,
    };
    let cfg = config.clone();
    let red = node.run(move || Redirector::load(&cfg)).expect("load");
    Topo {
        _inst: inst,
        node,
        pod,
        client,
        node_if_to_client,
        _cg: cg,
        config,
        red,
    }
}

fn connect(
    ns: &Netns,
    addr: &str,
    ip_options: bool,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    let addr: SocketAddr = addr.parse().unwrap();
    ns.run(move || {
        if !ip_options {
            return TcpStream::connect_timeout(&addr, timeout);
        }
        // A socket whose packets carry IP options (ihl = 6): NOP NOP NOP EOL.
        // SAFETY: plain socket syscalls on a fresh fd wrapped right away.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        assert!(fd >= 0);
        let s = unsafe { <TcpStream as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let opts = [1u8, 1, 1, 0];
        let rc = unsafe {
            libc::setsockopt(fd, libc::SOL_IP, libc::IP_OPTIONS, opts.as_ptr().cast(), 4)
        };
        assert_eq!(rc, 0);
        let tv = libc::timeval {
            tv_sec: timeout.as_secs() as i64,
            tv_usec: timeout.subsec_micros() as i64,
        };
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_SNDTIMEO,
                (&tv as *const libc::timeval).cast(),
                16,
            )
        };
        let SocketAddr::V4(v4) = addr else {
            unreachable!()
        };
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: v4.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(v4.ip().octets()),
            },
            sin_zero: [0; 8],
        };
        let rc =
            unsafe { libc::connect(s.as_raw_fd(), (&sin as *const libc::sockaddr_in).cast(), 16) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(s)
    })
}

/// An IPv6 connect whose packets carry a destination options header (one PadN option)
/// between the IPv6 and the TCP header.
fn connect6_with_dstopts(ns: &Netns, addr: &str, timeout: Duration) -> std::io::Result<TcpStream> {
    let SocketAddr::V6(v6) = addr.parse().unwrap() else {
        panic!("IPv6 only")
    };
    ns.run(move || {
        // SAFETY: plain socket syscalls on a fresh fd wrapped right away.
        let fd = unsafe { libc::socket(libc::AF_INET6, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        assert!(fd >= 0);
        let s = unsafe { <TcpStream as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        // next header (set by the kernel), length 0 (8 bytes), PadN of 4 zero bytes
        let opts = [0u8, 0, 1, 4, 0, 0, 0, 0];
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_IPV6,
                libc::IPV6_DSTOPTS,
                opts.as_ptr().cast(),
                8,
            )
        };
        assert_eq!(rc, 0, "IPV6_DSTOPTS: {}", std::io::Error::last_os_error());
        let tv = libc::timeval {
            tv_sec: timeout.as_secs() as i64,
            tv_usec: timeout.subsec_micros() as i64,
        };
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_SNDTIMEO,
                (&tv as *const libc::timeval).cast(),
                16,
            )
        };
        let sin6 = libc::sockaddr_in6 {
            sin6_family: libc::AF_INET6 as u16,
            sin6_port: v6.port().to_be(),
            sin6_flowinfo: 0,
            sin6_addr: libc::in6_addr {
                s6_addr: v6.ip().octets(),
            },
            sin6_scope_id: 0,
        };
        let rc = unsafe {
            libc::connect(
                s.as_raw_fd(),
                (&sin6 as *const libc::sockaddr_in6).cast(),
                std::mem::size_of::<libc::sockaddr_in6>() as u32,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(s)
    })
}

/// How many times a just-connected socket retransmitted (its SYN: nothing else was sent).
fn syn_retransmits(s: &TcpStream) -> u32 {
    // SAFETY: a valid fd and an out buffer of the stated length.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
    info.tcpi_total_retrans
}

fn proxy_listeners(node: &Netns) -> (TcpListener, TcpListener) {
    node.run(|| {
        (
            transparent_listener("0.0.0.0:15006".parse().unwrap()),
            transparent_listener("0.0.0.0:15008".parse().unwrap()),
        )
    })
}

fn echo_roundtrip(client: &mut TcpStream, accepted: &mut TcpStream) {
    client.write_all(b"hello").unwrap();
    let mut buf = [0u8; 5];
    accepted.read_exact(&mut buf).unwrap();
    accepted.write_all(&buf).unwrap();
    let mut back = [0u8; 5];
    client.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"hello");
}

fn plaintext_and_hbone_to_enrolled_pod_reach_the_proxy_listeners(tc_attach: TcAttach) {
    let _s = serial();
    let mut t = topo(tc_attach);
    let (plain, hbone) = proxy_listeners(&t.node);
    let pod_app = t.pod.run(|| TcpListener::bind("0.0.0.0:80").unwrap());
    let pod_hbone = t.pod.run(|| TcpListener::bind("0.0.0.0:15008").unwrap());

    // not enrolled yet: straight to the pod
    let _c = connect(&t.client, "10.77.0.2:80", false, WAIT).expect("direct connect");
    assert!(accept_within(&pod_app, WAIT).is_some());
    assert!(!has_pending(&plain));

    t.red
        .enroll_pod_ip(POD.parse().unwrap(), Mode::Permissive)
        .unwrap();
    for ip_options in [false, true] {
        let mut c = connect(&t.client, "10.77.0.2:80", ip_options, WAIT).expect("connect");
        let (mut a, peer) = accept_within(&plain, WAIT).expect("15006 got the connection");
        assert_eq!(
            a.local_addr().unwrap(),
            "10.77.0.2:80".parse().unwrap(),
            "original dst"
        );
        assert_eq!(peer, c.local_addr().unwrap());
        echo_roundtrip(&mut c, &mut a);
        assert!(!has_pending(&pod_app));

        let mut c = connect(&t.client, "10.77.0.2:15008", ip_options, WAIT).expect("connect");
        let (mut a, _) = accept_within(&hbone, WAIT).expect("15008 got the HBONE connection");
        assert_eq!(a.local_addr().unwrap(), "10.77.0.2:15008".parse().unwrap());
        echo_roundtrip(&mut c, &mut a);
        assert!(!has_pending(&pod_hbone));
    }

    // un-enrolled: direct again
    t.red.unenroll_pod_ip(POD.parse().unwrap()).unwrap();
    let _c = connect(&t.client, "10.77.0.2:80", false, WAIT).expect("direct connect");
    assert!(accept_within(&pod_app, WAIT).is_some());
    assert!(!has_pending(&plain));
    assert_eq!(t.red.drop_counts().unwrap(), Default::default());
}

fn strict_mode_refuses_plaintext_at_once_and_reports_it(tc_attach: TcAttach) {
    let _s = serial();
    let mut t = topo(tc_attach);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let mut events = t.red.drop_events().unwrap();
    let (plain, hbone) = proxy_listeners(&t.node);
    t.red
        .enroll_pod_ip(POD.parse().unwrap(), Mode::Strict)
        .unwrap();

    for (i, ip_options) in [false, true].into_iter().enumerate() {
        let start = Instant::now();
        let err = connect(&t.client, "10.77.0.2:80", ip_options, WAIT).expect_err("refused");
        let elapsed = start.elapsed();
        assert_eq!(
            err.kind(),
            ErrorKind::ConnectionRefused,
            "a RST, not a timeout: {err}"
        );
        eprintln!("strict refusal (ip options: {ip_options}) took {elapsed:?}");
        let ev = rt
            .block_on(tokio::time::timeout(WAIT, events.next()))
            .expect("event")
            .unwrap();
        assert_eq!(ev.reason, DropReason::StrictPlaintext);
        assert_eq!(ev.src.ip(), "10.79.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(ev.dst, "10.77.0.2:80".parse().unwrap());
        assert_eq!(t.red.drop_counts().unwrap().strict_plaintext, i as u64 + 1);
    }
    assert!(!has_pending(&plain));

    // HBONE is still accepted in strict mode
    let mut c = connect(&t.client, "10.77.0.2:15008", false, WAIT).expect("hbone connect");
    let (mut a, _) = accept_within(&hbone, WAIT).expect("15008");
    echo_roundtrip(&mut c, &mut a);

    // a mesh proxy's address may send plaintext
    t.red.add_mesh_source("10.79.0.2".parse().unwrap()).unwrap();
    let _c = connect(&t.client, "10.77.0.2:80", false, WAIT).expect("mesh source connect");
    assert!(accept_within(&plain, WAIT).is_some());
    t.red
        .remove_mesh_source("10.79.0.2".parse().unwrap())
        .unwrap();

    // node-wide strict mode applies to permissive pods too
    t.red
        .enroll_pod_ip(POD.parse().unwrap(), Mode::Permissive)
        .unwrap();
    let mut proxy = ProxyListeners::new("10.77.0.1:15001".parse().unwrap());
    proxy.route_table = 1337;
    proxy.mark = 0x5390;
    proxy.node_mode = Mode::Strict;
    t.red.set_proxy(&proxy).unwrap();
    let err = connect(&t.client, "10.77.0.2:80", false, WAIT).expect_err("refused");
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused);
    assert!(
        events.try_next().is_some()
            || rt
                .block_on(tokio::time::timeout(WAIT, events.next()))
                .is_ok()
    );
    assert_eq!(t.red.drop_counts().unwrap().strict_plaintext, 3);

    // silent-drop mode: no RST, the client is left waiting
    proxy.reject = RejectMode::Drop;
    t.red.set_proxy(&proxy).unwrap();
    let err =
        connect(&t.client, "10.77.0.2:80", false, Duration::from_millis(300)).expect_err("dropped");
    assert_ne!(
        err.kind(),
        ErrorKind::ConnectionRefused,
        "no RST in drop mode: {err}"
    );
    assert_eq!(t.red.drop_counts().unwrap().strict_plaintext, 4);

    // mark and table are fixed at install
    proxy.mark = 0x1;
    assert!(matches!(
        t.red.set_proxy(&proxy),
        Err(RedirectError::InvalidConfig(_))
    ));
}

fn missing_proxy_listener_fails_closed_and_is_reported(tc_attach: TcAttach) {
    let _s = serial();
    let mut t = topo(tc_attach);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let mut events = t.red.drop_events().unwrap();
    let pod_app = t.pod.run(|| TcpListener::bind("0.0.0.0:80").unwrap());
    t.red
        .enroll_pod_ip(POD.parse().unwrap(), Mode::Permissive)
        .unwrap();
    // no 15006 listener: the SYN is dropped, never handed to the pod in plaintext
    let err = connect(&t.client, "10.77.0.2:80", false, Duration::from_millis(300))
        .expect_err("no proxy");
    assert_ne!(err.kind(), ErrorKind::ConnectionRefused);
    let ev = rt
        .block_on(tokio::time::timeout(WAIT, events.next()))
        .expect("event")
        .unwrap();
    assert_eq!(ev.reason, DropReason::ProxyUnavailable);
    assert!(!has_pending(&pod_app));
    assert!(t.red.drop_counts().unwrap().proxy_unavailable >= 1);
    let _ = &t.node_if_to_client;
}

fn strict_mode_refuses_ipv6_plaintext_when_ipv6_is_not_steered(tc_attach: TcAttach) {
    let _s = serial();
    let mut t = topo(tc_attach);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let mut events = t.red.drop_events().unwrap();
    let (plain, hbone) = proxy_listeners(&t.node);
    // dual-stack listeners in the pod: whatever gets past tc is accepted, so a refusal
    // below can only come from the tc program
    let pod_app = t.pod.run(|| TcpListener::bind("[::]:80").unwrap());
    let pod_hbone = t.pod.run(|| TcpListener::bind("[::]:15008").unwrap());
    let pod6: IpAddr = POD6.parse().unwrap();
    let client6: IpAddr = CLIENT6.parse().unwrap();

    // not enrolled: IPv6 reaches the pod
    let _c = connect(&t.client, "[fd77::2]:80", false, WAIT).expect("direct v6 connect");
    assert!(accept_within(&pod_app, WAIT).is_some());

    t.red.enroll_pod_ip(pod6, Mode::Strict).unwrap();
    for (i, port) in [80u16, 15008].into_iter().enumerate() {
        let start = Instant::now();
        let err = connect(&t.client, &format!("[{POD6}]:{port}"), false, WAIT)
            .expect_err("IPv6 plaintext to a strict pod is refused");
        let elapsed = start.elapsed();
        assert_eq!(
            err.kind(),
            ErrorKind::ConnectionRefused,
            "a RST, not a timeout: {err}"
        );
        eprintln!("strict IPv6 refusal (port {port}) took {elapsed:?}");
        let ev = rt
            .block_on(tokio::time::timeout(WAIT, events.next()))
            .expect("event")
            .unwrap();
        assert_eq!(ev.reason, DropReason::StrictPlaintext);
        assert_eq!(ev.src.ip(), client6);
        assert_eq!(ev.dst, SocketAddr::new(pod6, port));
        assert_eq!(t.red.drop_counts().unwrap().strict_plaintext, i as u64 + 1);
    }
    assert!(!has_pending(&pod_app), "nothing reached the pod");
    assert!(!has_pending(&pod_hbone), "nothing reached the pod");
    assert!(!has_pending(&plain) && !has_pending(&hbone));

    // another, non-enrolled IPv6 address of the same pod still works
    let mut c = connect(&t.client, "[fd77::3]:80", false, WAIT).expect("non-enrolled v6");
    let (mut a, _) = accept_within(&pod_app, WAIT).expect("the pod got it");
    echo_roundtrip(&mut c, &mut a);

    // a SYN behind an IPv6 extension header (destination options) cannot slip past:
    // dropped (no RST is built behind extension headers), counted and reported
    let err = connect6_with_dstopts(&t.client, "[fd77::2]:80", Duration::from_millis(300))
        .expect_err("dropped");
    assert_ne!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
    let ev = rt
        .block_on(tokio::time::timeout(WAIT, events.next()))
        .expect("event")
        .unwrap();
    assert_eq!(ev.reason, DropReason::StrictPlaintext);
    assert_eq!(ev.dst, SocketAddr::new(pod6, 80));
    assert_eq!(t.red.drop_counts().unwrap().strict_plaintext, 3);
    assert!(!has_pending(&pod_app));

    // IPv4 strict refusal is unchanged next to it
    t.red
        .enroll_pod_ip(POD.parse().unwrap(), Mode::Strict)
        .unwrap();
    let err = connect(&t.client, "10.77.0.2:80", false, WAIT).expect_err("refused");
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused);
    let ev = rt
        .block_on(tokio::time::timeout(WAIT, events.next()))
        .expect("event")
        .unwrap();
    assert_eq!(ev.reason, DropReason::StrictPlaintext);
    assert_eq!(t.red.drop_counts().unwrap().strict_plaintext, 4);

    // silent-drop mode: no RST, the client is left waiting; still counted and reported
    let mut proxy = ProxyListeners::new("10.77.0.1:15001".parse().unwrap());
    proxy.route_table = 1337;
    proxy.mark = 0x5390;
    proxy.reject = RejectMode::Drop;
    t.red.set_proxy(&proxy).unwrap();
    let err =
        connect(&t.client, "[fd77::2]:80", false, Duration::from_millis(300)).expect_err("dropped");
    assert_ne!(
        err.kind(),
        ErrorKind::ConnectionRefused,
        "no RST in drop mode: {err}"
    );
    let ev = rt
        .block_on(tokio::time::timeout(WAIT, events.next()))
        .expect("event")
        .unwrap();
    assert_eq!(ev.reason, DropReason::StrictPlaintext);
    assert_eq!(ev.dst, SocketAddr::new(pod6, 80));
    assert!(t.red.drop_counts().unwrap().strict_plaintext >= 5);
    assert!(!has_pending(&pod_app));

    // permissive: IPv6 plaintext passes to the pod as before (not steered yet)
    t.red.enroll_pod_ip(pod6, Mode::Permissive).unwrap();
    let counts = t.red.drop_counts().unwrap();
    let mut c = connect(&t.client, "[fd77::2]:80", false, WAIT).expect("permissive v6");
    let (mut a, _) = accept_within(&pod_app, WAIT).expect("the pod got it");
    echo_roundtrip(&mut c, &mut a);
    assert!(!has_pending(&plain));
    assert_eq!(t.red.drop_counts().unwrap(), counts);

    // node-wide strict mode covers permissive pods over IPv6 too
    proxy.node_mode = Mode::Strict;
    proxy.reject = RejectMode::Reset;
    t.red.set_proxy(&proxy).unwrap();
    let err = connect(&t.client, "[fd77::2]:80", false, WAIT).expect_err("refused");
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused);
    assert_eq!(
        t.red.drop_counts().unwrap().strict_plaintext,
        counts.strict_plaintext + 1
    );
    assert!(!has_pending(&pod_app));
}

/// With an IPv6 outbound address the agent steers IPv6 exactly as IPv4: plaintext and HBONE
/// SYNs to an enrolled pod's IPv6 address are assigned to the proxy's (dual-stack)
/// listeners, the rest of each connection follows them (the IPv6 policy route), strict mode
/// refuses non-mesh sources and lets mesh sources into the proxy, a missing listener fails
/// closed; IPv4 goes on working through the same dual-stack listeners.
fn ipv6_is_steered_like_ipv4_when_enabled(tc_attach: TcAttach) {
    let _s = serial();
    let mut t = topo_with(tc_attach, Some("fd77::1"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let mut events = t.red.drop_events().unwrap();
    let rules = t.node.exec_out(&["ip", "-6", "rule", "show"]);
    assert!(rules.contains("lookup 1337"), "IPv6 policy rule: {rules}");
    let routes = t
        .node
        .exec_out(&["ip", "-6", "route", "show", "table", "1337"]);
    assert!(routes.contains("local default dev lo"), "{routes}");

    let (plain, hbone) = t.node.run(|| {
        (
            transparent_listener_dual(15006),
            transparent_listener_dual(15008),
        )
    });
    let pod_app = t.pod.run(|| TcpListener::bind("[::]:80").unwrap());
    let pod_hbone = t.pod.run(|| TcpListener::bind("[::]:15008").unwrap());
    let pod6: IpAddr = POD6.parse().unwrap();
    let client6: IpAddr = CLIENT6.parse().unwrap();

    // permissive: plaintext to 15006, HBONE to 15008, each with its original destination
    // as the accepted socket's local address, and a full exchange through the proxy socket
    t.red.enroll_pod_ip(pod6, Mode::Permissive).unwrap();
    let mut c = connect(&t.client, "[fd77::2]:80", false, WAIT).expect("v6 connect");
    let (mut a, peer) = accept_within(&plain, WAIT).expect("15006 got the IPv6 connection");
    assert_eq!(a.local_addr().unwrap(), "[fd77::2]:80".parse().unwrap());
    assert_eq!(peer, c.local_addr().unwrap());
    for _ in 0..3 {
        echo_roundtrip(&mut c, &mut a);
    }
    let mut c = connect(&t.client, "[fd77::2]:15008", false, WAIT).expect("v6 HBONE");
    let (mut a, _) = accept_within(&hbone, WAIT).expect("15008 got the IPv6 HBONE connection");
    assert_eq!(a.local_addr().unwrap(), "[fd77::2]:15008".parse().unwrap());
    echo_roundtrip(&mut c, &mut a);
    assert!(!has_pending(&pod_app) && !has_pending(&pod_hbone));

    // the pod's other, non-enrolled address is not steered
    let mut c = connect(&t.client, "[fd77::3]:80", false, WAIT).expect("non-enrolled v6");
    let (mut a, _) = accept_within(&pod_app, WAIT).expect("the pod got it");
    echo_roundtrip(&mut c, &mut a);
    assert!(!has_pending(&plain));

    // IPv4 through the same dual-stack listener (v4-mapped local address)
    t.red
        .enroll_pod_ip(POD.parse().unwrap(), Mode::Permissive)
        .unwrap();
    let mut c = connect(&t.client, "10.77.0.2:80", false, WAIT).expect("v4 connect");
    let (mut a, _) = accept_within(&plain, WAIT).expect("15006 got the IPv4 connection");
    assert_eq!(
        a.local_addr().unwrap(),
        "[::ffff:10.77.0.2]:80".parse().unwrap()
    );
    echo_roundtrip(&mut c, &mut a);
    assert_eq!(t.red.drop_counts().unwrap(), Default::default());

    // strict: a non-mesh source is refused at once and reported; HBONE still gets in
    t.red.enroll_pod_ip(pod6, Mode::Strict).unwrap();
    let err = connect(&t.client, "[fd77::2]:80", false, WAIT).expect_err("refused");
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
    let ev = rt
        .block_on(tokio::time::timeout(WAIT, events.next()))
        .expect("event")
        .unwrap();
    assert_eq!(ev.reason, DropReason::StrictPlaintext);
    assert_eq!(ev.src.ip(), client6);
    assert_eq!(ev.dst, SocketAddr::new(pod6, 80));
    let mut c = connect(&t.client, "[fd77::2]:15008", false, WAIT).expect("strict HBONE");
    let (mut a, _) = accept_within(&hbone, WAIT).expect("HBONE reaches the proxy in strict");
    echo_roundtrip(&mut c, &mut a);
    // a mesh source (another node's proxy) is let into the proxy's plaintext listener
    t.red.add_mesh_source(client6).unwrap();
    let mut c = connect(&t.client, "[fd77::2]:80", false, WAIT).expect("mesh source");
    let (mut a, _) = accept_within(&plain, WAIT).expect("15006 got the mesh source");
    echo_roundtrip(&mut c, &mut a);
    assert!(!has_pending(&pod_app) && !has_pending(&pod_hbone));
    assert_eq!(t.red.drop_counts().unwrap().strict_plaintext, 1);

    // no listener: the SYN is dropped and reported, never passed to the pod
    drop((plain, hbone));
    t.red.enroll_pod_ip(pod6, Mode::Permissive).unwrap();
    connect(&t.client, "[fd77::2]:80", false, Duration::from_millis(300))
        .expect_err("no proxy listener");
    let ev = rt
        .block_on(tokio::time::timeout(WAIT, events.next()))
        .expect("event")
        .unwrap();
    assert_eq!(ev.reason, DropReason::ProxyUnavailable);
    assert_eq!(ev.dst, SocketAddr::new(pod6, 80));
    assert!(!has_pending(&pod_app));

    // uninstall removes the IPv6 policy rule and route with the IPv4 ones
    let pin_dir = t.config.pin_dir.clone();
    t.node
        .run(move || Redirector::uninstall(&pin_dir))
        .expect("uninstall");
    let rules = t.node.exec_out(&["ip", "-6", "rule", "show"]);
    assert!(!rules.contains("lookup 1337"), "{rules}");
    let rules = t.node.exec_out(&["ip", "-4", "rule", "show"]);
    assert!(!rules.contains("lookup 1337"), "{rules}");
}

/// An agent restart or upgrade reloads the programs over the pins: new programs swap into
/// the pinned TCX link or the clsact filter in place. Connections opened one after the
/// other all through the reloads (and, where the kernel has TCX, through switches between
/// the two modes) must every one reach the proxy at the first SYN: none fails, none needed
/// its SYN retransmitted (TCP_INFO counts it), none slips through to the pod in plaintext.
fn steering_never_stops_while_the_programs_are_reloaded(tc_attach: TcAttach) {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    let _s = serial();
    let mut t = topo(tc_attach);
    let (plain, _hbone) = proxy_listeners(&t.node);
    let plain = Arc::new(plain);
    let pod_app = t.pod.run(|| TcpListener::bind("0.0.0.0:80").unwrap());
    t.red
        .enroll_pod_ip(POD.parse().unwrap(), Mode::Permissive)
        .unwrap();

    let mut modes = vec![tc_attach; 4];
    if zmesh_redirect::kernel_features().has_tcx() {
        // and back: each switch attaches the new mode before the old one goes
        modes.extend([TcAttach::Tcx, TcAttach::Netlink, TcAttach::Tcx, tc_attach]);
        // Adding the clsact qdisc to an interface loses a packet in flight (on 6.18, with
        // a TCX program attached): the first switch from TCX to a clsact filter is the
        // one step that is not hitless (README: Limits). Done before the traffic starts.
        for mode in [TcAttach::Netlink, tc_attach] {
            let mut cfg = t.config.clone();
            cfg.tc_attach = mode;
            t.red = t.node.run(move || Redirector::load(&cfg)).expect("reload");
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let reloading = Arc::new(AtomicBool::new(false));
    let during_reloads = Arc::new(AtomicUsize::new(0));
    std::thread::scope(|scope| {
        let client = {
            let (stop, reloading, during) =
                (stop.clone(), reloading.clone(), during_reloads.clone());
            let plain = plain.clone();
            let ns = &t.client;
            // one connection at a time, each accepted before the next: the proxy's
            // accept queue never overflows, so a slow connect can only be a lost SYN
            scope.spawn(move || {
                ns.run(move || {
                    let addr: SocketAddr = "10.77.0.2:80".parse().unwrap();
                    let mut opened = 0usize;
                    let mut failures = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let during_reload = reloading.load(Ordering::Relaxed);
                        let c = match TcpStream::connect_timeout(&addr, WAIT) {
                            Ok(c) => c,
                            Err(e) => {
                                failures.push(format!("connect #{opened}: {e}"));
                                continue;
                            }
                        };
                        let retransmits = syn_retransmits(&c);
                        if retransmits != 0 {
                            failures.push(format!(
                                "connect #{opened} from {:?}: SYN sent {} times",
                                c.local_addr(),
                                retransmits + 1
                            ));
                        }
                        match accept_within(&plain, WAIT) {
                            Some((mut a, peer))
                                if a.local_addr().ok() == Some(addr)
                                    && Some(peer) == c.local_addr().ok() =>
                            {
                                // The client closes first and the proxy only after the
                                // client's FIN: the TIME_WAIT is the client's, so its
                                // later ports never meet one on the node (a SYN assigned
                                // to the listener for a 4-tuple still in TIME_WAIT there
                                // is dropped by the kernel, reloads or not).
                                drop(c);
                                let mut eof = [0u8; 1];
                                assert_eq!(a.read(&mut eof).unwrap(), 0, "the client's FIN");
                                drop(a);
                                opened += 1;
                                if during_reload {
                                    during.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            Some((a, peer)) => failures
                                .push(format!("proxy accepted {peer} -> {:?}", a.local_addr())),
                            None => failures.push(format!("connect #{opened}: not at the proxy")),
                        }
                    }
                    (opened, failures)
                })
            })
        };
        reloading.store(true, Ordering::Relaxed);
        for mode in &modes {
            let mut cfg = t.config.clone();
            cfg.tc_attach = *mode;
            t.red = t
                .node
                .run(move || Redirector::load(&cfg))
                .unwrap_or_else(|e| panic!("reload in mode {mode}: {e}"));
            let expected =
                if *mode == TcAttach::Netlink || !zmesh_redirect::kernel_features().has_tcx() {
                    TcAttach::Netlink
                } else {
                    TcAttach::Tcx
                };
            assert_eq!(
                Redirector::ingress_attachments(&t.config.pin_dir).unwrap(),
                vec![zmesh_redirect::IngressAttachment {
                    interface: t.node_if_to_client.clone(),
                    mode: expected,
                }],
                "one attachment per interface after a reload in mode {mode}"
            );
        }
        reloading.store(false, Ordering::Relaxed);
        stop.store(true, Ordering::Relaxed);
        let (opened, failures) = client.join().unwrap();
        assert!(failures.is_empty(), "{failures:?}");
        let during = during_reloads.load(Ordering::Relaxed);
        eprintln!(
            "{opened} connections, {during} opened during {} reloads ({modes:?})",
            modes.len()
        );
        assert!(
            during > 0,
            "connections were opened while the programs were reloaded"
        );
    });
    assert!(!has_pending(&pod_app), "nothing reached the pod directly");
}

/// IPv4 as the dual-stack listener's v4-mapped IPv6 addresses show it, as IPv4.
fn unmapped(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), addr.port()),
            None => addr,
        },
        IpAddr::V4(_) => addr,
    }
}

/// A pod on `bridge` (in `node`, 10.78.0.1/24) at `ip`; returns the host-side veth.
fn bridged_pod(node: &Netns, bridge: &str, pod: &Netns, ip: &str, ip6: &str) -> String {
    let (host, peer) = (unique("h"), unique("q"));
    sh(&[
        "ip", "link", "add", &host, "netns", &node.name, "type", "veth", "peer", "name", &peer,
        "netns", &pod.name,
    ]);
    node.exec(&["ip", "link", "set", &host, "master", bridge]);
    node.exec(&["ip", "link", "set", &host, "up"]);
    pod.exec(&["ip", "addr", "add", &format!("{ip}/24"), "dev", &peer]);
    addr6(pod, &peer, &format!("{ip6}/64"));
    pod.exec(&["ip", "link", "set", &peer, "up"]);
    pod.exec(&["ip", "route", "add", "default", "via", "10.78.0.1"]);
    host
}

/// Pods on one bridge (a CNI bridge such as flannel's cni0) reach each other by switching,
/// never through the node's IP stack: plaintext from a pod outside the mesh to an enrolled
/// pod next to it must still reach the proxy (permissive) or be refused (strict).
fn plaintext_between_pods_on_one_bridge_is_steered_too(tc_attach: TcAttach) {
    let _s = serial();
    let node = Netns::new("n");
    let enrolled = Netns::new("e");
    let plain = Netns::new("u");
    let bridge = unique("br");
    node.exec(&["ip", "link", "add", &bridge, "type", "bridge"]);
    node.exec(&["ip", "addr", "add", "10.78.0.1/24", "dev", &bridge]);
    addr6(&node, &bridge, "fd78::1/64");
    node.exec(&["ip", "link", "set", &bridge, "up"]);
    let enrolled_if = bridged_pod(&node, &bridge, &enrolled, "10.78.0.2", "fd78::2");
    let plain_if = bridged_pod(&node, &bridge, &plain, "10.78.0.3", "fd78::3");
    plain.exec(&["ip", "-6", "route", "add", "default", "via", "fd78::1"]);
    let cg = Cgroup::new();
    let pin_dir = Installed::pin_dir("b");
    let _inst = Installed {
        pin_dir: pin_dir.clone(),
        netns: node.name.clone(),
    };
    let mut proxy = ProxyListeners::new("10.78.0.1:15001".parse().unwrap());
    proxy.route_table = 1338;
    proxy.mark = 0x5390;
    proxy.outbound_v6 = Some("fd78::1".parse().unwrap());
    let config = RedirectConfig {
        pin_dir,
        cgroup: cg.path.clone(),
        ingress_interfaces: vec![bridge.clone(), enrolled_if, plain_if],
        proxy: proxy.clone(),
        tc_attach,
    };
    let cfg = config.clone();
    let mut red = node.run(move || Redirector::load(&cfg)).expect("load");
    let plain_listener = node.run(|| transparent_listener_dual(15006));
    let pod_app = enrolled.run(|| TcpListener::bind("[::]:80").unwrap());

    // Not enrolled: switched straight to the pod.
    let _c = connect(&plain, "10.78.0.2:80", false, WAIT).expect("direct connect");
    assert!(accept_within(&pod_app, WAIT).is_some());
    assert!(!has_pending(&plain_listener));

    red.enroll_pod_ip("10.78.0.2".parse().unwrap(), Mode::Permissive)
        .unwrap();
    red.enroll_pod_ip("fd78::2".parse().unwrap(), Mode::Permissive)
        .unwrap();
    for (dst, src) in [("10.78.0.2:80", "10.78.0.3"), ("[fd78::2]:80", "fd78::3")] {
        let mut c = connect(&plain, dst, false, WAIT).expect("connect");
        let (mut a, peer) = accept_within(&plain_listener, WAIT)
            .unwrap_or_else(|| panic!("15006 got the bridged connection to {dst}"));
        assert_eq!(
            unmapped(a.local_addr().unwrap()),
            dst.parse().unwrap(),
            "original dst"
        );
        assert_eq!(unmapped(peer).ip(), src.parse::<IpAddr>().unwrap());
        // Established packets follow the handshake's path (a 64 KiB echo both ways).
        let data = vec![7u8; 64 * 1024];
        let writer = {
            let mut c = c.try_clone().unwrap();
            let data = data.clone();
            std::thread::spawn(move || c.write_all(&data).unwrap())
        };
        let mut got = vec![0u8; data.len()];
        a.read_exact(&mut got).unwrap();
        writer.join().unwrap();
        a.write_all(&got).unwrap();
        let mut back = vec![0u8; data.len()];
        c.read_exact(&mut back).unwrap();
        assert_eq!(back, data);
        assert!(!has_pending(&pod_app), "the pod was reached directly");
    }

    // Strict: refused at the plain pod's port, with a RST.
    red.enroll_pod_ip("10.78.0.2".parse().unwrap(), Mode::Strict)
        .unwrap();
    let err = connect(&plain, "10.78.0.2:80", false, WAIT).expect_err("refused");
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
    assert_eq!(red.drop_counts().unwrap().strict_plaintext, 1);
    assert!(!has_pending(&plain_listener));
    assert!(!has_pending(&pod_app));

    // The ports are recorded, and forgotten once they are no longer steered (the
    // bridge alone has no ports to record).
    let ifindex = |name: &str| -> u32 {
        let text = node.exec_out(&["cat", &format!("/sys/class/net/{name}/ifindex")]);
        text.trim().parse().unwrap()
    };
    let mut recorded = vec![
        ifindex(&config.ingress_interfaces[1]),
        ifindex(&config.ingress_interfaces[2]),
    ];
    recorded.sort_unstable();
    assert_eq!(red.bridge_ports(), recorded);
    red.sync_bridge_ports(std::slice::from_ref(&bridge))
        .expect("sync");
    assert_eq!(red.bridge_ports(), Vec::<u32>::new());
    drop(config);
}

/// kube-proxy translates a Service VIP to a pod after tc ingress has seen the packet (to
/// the VIP, not an enrolled pod): plaintext from a pod on this node, or through a NodePort,
/// reaches an enrolled pod without passing ingress's checks. Egress, the last hop into the
/// pod, refuses it in strict mode; the node's own sockets (the proxy, kubelet's probes)
/// still get through. Routed pods (a point-to-point CNI), an nftables DNAT for the VIP.
fn strict_mode_refuses_plaintext_that_a_vip_translation_sent_around_ingress(tc_attach: TcAttach) {
    let _s = serial();
    let node = Netns::new("n");
    let enrolled = Netns::new("e");
    let plain = Netns::new("u");
    let (node_to_enrolled, _) = veth(&node, "10.76.0.1", &enrolled, "10.76.0.2");
    let (node_to_plain, _) = veth(&node, "10.75.0.1", &plain, "10.75.0.2");
    enrolled.exec(&["ip", "route", "add", "default", "via", "10.76.0.1"]);
    plain.exec(&["ip", "route", "add", "default", "via", "10.75.0.1"]);
    node.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    let rules = "table ip zr_vip {
        chain prerouting {
            type nat hook prerouting priority dstnat;
            ip daddr 10.96.0.10 tcp dport 80 dnat to 10.76.0.2:80
        }
    }";
    let rules_file = std::env::temp_dir().join(unique("nft"));
    std::fs::write(&rules_file, rules).unwrap();
    node.exec(&["nft", "-f", rules_file.to_str().unwrap()]);
    std::fs::remove_file(&rules_file).unwrap();
    let cg = Cgroup::new();
    let pin_dir = Installed::pin_dir("v");
    let _inst = Installed {
        pin_dir: pin_dir.clone(),
        netns: node.name.clone(),
    };
    let mut proxy = ProxyListeners::new("10.76.0.1:15001".parse().unwrap());
    proxy.route_table = 1339;
    proxy.mark = 0x5390;
    let config = RedirectConfig {
        pin_dir,
        cgroup: cg.path.clone(),
        ingress_interfaces: vec![node_to_enrolled, node_to_plain],
        proxy,
        tc_attach,
    };
    let mut red = node.run(move || Redirector::load(&config)).expect("load");
    let pod_app = enrolled.run(|| TcpListener::bind("0.0.0.0:80").unwrap());

    // Permissive: the translated connection reaches the pod (nothing to refuse).
    red.enroll_pod_ip("10.76.0.2".parse().unwrap(), Mode::Permissive)
        .unwrap();
    let _c = connect(&plain, "10.96.0.10:80", false, WAIT).expect("through the VIP");
    assert!(accept_within(&pod_app, WAIT).is_some());

    // Strict: refused with a reset the client sees as coming from the VIP, and reported.
    red.enroll_pod_ip("10.76.0.2".parse().unwrap(), Mode::Strict)
        .unwrap();
    let err = connect(&plain, "10.96.0.10:80", false, WAIT).expect_err("refused");
    assert_eq!(
        err.kind(),
        ErrorKind::ConnectionRefused,
        "a RST, not a timeout: {err}"
    );
    assert!(!has_pending(&pod_app), "the pod was reached in plaintext");
    assert_eq!(red.drop_counts().unwrap().strict_plaintext, 1);
    // Directly to the pod's IP it is ingress that refuses, as before.
    let err = connect(&plain, "10.76.0.2:80", false, WAIT).expect_err("refused");
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
    assert_eq!(red.drop_counts().unwrap().strict_plaintext, 2);

    // A socket of the node itself (the proxy's upstream leg, kubelet's probes) is let in.
    let _c = connect(&node, "10.76.0.2:80", false, WAIT).expect("from the node");
    assert!(accept_within(&pod_app, WAIT).is_some());
    assert_eq!(red.drop_counts().unwrap().strict_plaintext, 2);

    // Silent-drop mode: no RST, the client waits.
    let mut silent = ProxyListeners::new("10.76.0.1:15001".parse().unwrap());
    silent.route_table = 1339;
    silent.mark = 0x5390;
    silent.reject = RejectMode::Drop;
    red.set_proxy(&silent).unwrap();
    let err =
        connect(&plain, "10.96.0.10:80", false, Duration::from_millis(300)).expect_err("dropped");
    assert_ne!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
    assert!(!has_pending(&pod_app));
    assert_eq!(red.drop_counts().unwrap().strict_plaintext, 3);
}
