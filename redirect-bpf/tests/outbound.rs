//! Outbound redirection (cgroup connect hooks): needs root, creates its own netns,
//! veths, cgroup and bpffs pins, and removes them all.

mod common;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::Duration,
};

use common::*;
use zmesh_redirect::{current_netns_cookie, ProxyListeners, RedirectConfig, Redirector};

const WAIT: Duration = Duration::from_secs(5);

struct Topo {
    _inst: Installed,
    node: Netns,
    pod: Netns,
    cg: Cgroup,
    red: Redirector,
    pod_cookie: u64,
    node_if: String,
    pod_if: String,
}

/// node 10.77.0.1 <-veth-> pod 10.77.0.2; proxy outbound listener at 10.77.0.1:15001.
fn topo() -> Topo {
    topo_with(None)
}

/// [`topo`]; with `outbound_v6` (fd77::1) the link is dual-stack (pod fd77::2) and IPv6
/// connects are redirected to that address.
fn topo_with(outbound_v6: Option<&str>) -> Topo {
    let node = Netns::new("n");
    let pod = Netns::new("p");
    let (node_if, pod_if) = veth(&node, "10.77.0.1", &pod, "10.77.0.2");
    pod.exec(&["ip", "route", "add", "default", "via", "10.77.0.1"]);
    if outbound_v6.is_some() {
        node.exec(&[
            "ip",
            "-6",
            "addr",
            "add",
            "fd77::1/64",
            "dev",
            &node_if,
            "nodad",
        ]);
        pod.exec(&[
            "ip",
            "-6",
            "addr",
            "add",
            "fd77::2/64",
            "dev",
            &pod_if,
            "nodad",
        ]);
    }
    let mut proxy = ProxyListeners::new("10.77.0.1:15001".parse().unwrap());
    proxy.outbound_v6 = outbound_v6.map(|ip| ip.parse().unwrap());
    let cg = Cgroup::new();
    let pin_dir = Installed::pin_dir("o");
    let inst = Installed {
        pin_dir: pin_dir.clone(),
        netns: node.name.clone(),
    };
    let config = RedirectConfig {
        pin_dir,
        cgroup: cg.path.clone(),
        ingress_interfaces: vec![],
        proxy,
        tc_attach: Default::default(),
    };
    let red = node.run(move || Redirector::load(&config)).expect("load");
    let pod_cookie = pod.run(|| current_netns_cookie().unwrap());
    Topo {
        _inst: inst,
        node,
        pod,
        cg,
        red,
        pod_cookie,
        node_if,
        pod_if,
    }
}

fn listen(ns: &Netns, addr: &str) -> TcpListener {
    let addr: SocketAddr = addr.parse().unwrap();
    ns.run(move || TcpListener::bind(addr).unwrap())
}

fn connect(ns: &Netns, addr: &str) -> std::io::Result<TcpStream> {
    let addr: SocketAddr = addr.parse().unwrap();
    ns.run(move || TcpStream::connect_timeout(&addr, WAIT))
}

#[test]
fn enrolled_pod_connect_lands_on_proxy_with_original_dst() {
    let _s = serial();
    let mut t = topo();
    t.red.enroll_netns(t.pod_cookie).unwrap();
    let _in = t.cg.enter();
    let proxy = listen(&t.node, "10.77.0.1:15001");
    let direct = listen(&t.node, "10.77.0.1:80");

    // getsockopt(SO_ORIGINAL_DST) on the proxy's accepted socket
    let mut client = connect(&t.pod, "10.77.0.1:80").expect("connect");
    let (mut accepted, peer) = accept_within(&proxy, WAIT).expect("proxy got the connection");
    assert_eq!(peer, client.local_addr().unwrap());
    assert_eq!(peer.ip().to_string(), "10.77.0.2");
    assert_eq!(
        so_original_dst(&accepted).unwrap(),
        "10.77.0.1:80".parse().unwrap()
    );
    // the entry is consumed: nothing leaks, a second ask finds nothing
    assert!(so_original_dst(&accepted).is_err());
    assert!(
        !has_pending(&direct),
        "the direct listener must not see redirected traffic"
    );
    client.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    accepted.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");

    // the userspace fallback reads the same map
    let client2 = connect(&t.pod, "10.77.0.1:80").expect("connect");
    let (_a2, peer2) = accept_within(&proxy, WAIT).expect("proxy got the 2nd connection");
    assert_eq!(peer2, client2.local_addr().unwrap());
    assert_eq!(
        t.red.original_dst(peer2).unwrap(),
        Some("10.77.0.1:80".parse().unwrap())
    );
    assert_eq!(t.red.original_dst(peer2).unwrap(), None);
}

#[test]
fn ipv6_connects_are_redirected_when_ipv6_is_steered() {
    let _s = serial();
    let mut t = topo_with(Some("fd77::1"));
    t.red.enroll_netns(t.pod_cookie).unwrap();
    let _in = t.cg.enter();
    let proxy = listen(&t.node, "[fd77::1]:15001");
    let direct = listen(&t.node, "[fd77::1]:80");
    let mut client = connect(&t.pod, "[fd77::1]:80").expect("connect");
    let (mut accepted, peer) = accept_within(&proxy, WAIT).expect("proxy got the v6 connection");
    assert_eq!(peer, client.local_addr().unwrap());
    assert_eq!(
        t.red.original_dst(peer).unwrap(),
        Some("[fd77::1]:80".parse().unwrap())
    );
    assert!(!has_pending(&direct));
    client.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    accepted.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
}

#[test]
fn ipv6_connects_are_left_alone_when_ipv6_is_not_steered() {
    let _s = serial();
    let mut t = topo();
    // a dual-stack link, but no IPv6 outbound address in the config
    t.node.exec(&[
        "ip",
        "-6",
        "addr",
        "add",
        "fd77::1/64",
        "dev",
        &t.node_if,
        "nodad",
    ]);
    t.pod.exec(&[
        "ip",
        "-6",
        "addr",
        "add",
        "fd77::2/64",
        "dev",
        &t.pod_if,
        "nodad",
    ]);
    t.red.enroll_netns(t.pod_cookie).unwrap();
    let _in = t.cg.enter();
    let proxy = listen(&t.node, "[fd77::1]:15001");
    let direct = listen(&t.node, "[fd77::1]:80");
    let _client = connect(&t.pod, "[fd77::1]:80").expect("connect");
    assert!(
        accept_within(&direct, WAIT).is_some(),
        "straight to the destination"
    );
    assert!(!has_pending(&proxy));
}

#[test]
fn v4_mapped_connect6_is_redirected_too() {
    let _s = serial();
    let mut t = topo();
    t.red.enroll_netns(t.pod_cookie).unwrap();
    let _in = t.cg.enter();
    let proxy = listen(&t.node, "10.77.0.1:15001");
    let _client = connect(&t.pod, "[::ffff:10.77.0.1]:8080").expect("connect");
    let (_a, peer) = accept_within(&proxy, WAIT).expect("proxy got the v4-mapped connection");
    assert_eq!(
        t.red.original_dst(peer).unwrap(),
        Some("10.77.0.1:8080".parse().unwrap())
    );
}

#[test]
fn non_enrolled_udp_and_unenrolled_traffic_is_untouched() {
    let _s = serial();
    let mut t = topo();
    let other = Netns::new("q");
    veth(&t.node, "10.78.0.1", &other, "10.78.0.2");
    other.exec(&["ip", "route", "add", "default", "via", "10.78.0.1"]);
    t.red.enroll_netns(t.pod_cookie).unwrap();
    let _in = t.cg.enter();
    let proxy = listen(&t.node, "10.77.0.1:15001");
    let direct = listen(&t.node, "10.77.0.1:80");

    // a pod that is not enrolled (same cgroup, other netns) goes direct
    let _c = connect(&other, "10.77.0.1:80").expect("connect");
    assert!(accept_within(&direct, WAIT).is_some());
    assert!(!has_pending(&proxy));

    // UDP from the enrolled pod is not redirected
    let udp_direct = t.node.run(|| UdpSocket::bind("10.77.0.1:80").unwrap());
    let udp_proxy = t.node.run(|| UdpSocket::bind("10.77.0.1:15001").unwrap());
    t.pod.run(|| {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.connect("10.77.0.1:80").unwrap();
        s.send(b"dgram").unwrap();
    });
    udp_direct.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = [0u8; 16];
    let n = udp_direct
        .recv(&mut buf)
        .expect("datagram reached its real destination");
    assert_eq!(&buf[..n], b"dgram");
    udp_proxy.set_nonblocking(true).unwrap();
    assert!(udp_proxy.recv(&mut buf).is_err(), "proxy must not get UDP");

    // loopback is never redirected
    let lo = listen(&t.pod, "127.0.0.1:80");
    let _c = connect(&t.pod, "127.0.0.1:80").expect("loopback connect");
    assert!(accept_within(&lo, WAIT).is_some());

    // connects to the proxy's own ports are not rewritten (no loop)
    let inbound = listen(&t.node, "10.77.0.1:15008");
    let _c = connect(&t.pod, "10.77.0.1:15008").expect("connect");
    assert!(accept_within(&inbound, WAIT).is_some());
    assert!(!has_pending(&proxy));

    // enrolled: redirected; un-enrolled at run time: direct again
    let _c = connect(&t.pod, "10.77.0.1:80").expect("connect");
    assert!(accept_within(&proxy, WAIT).is_some());
    t.red.unenroll_netns(t.pod_cookie).unwrap();
    let _c = connect(&t.pod, "10.77.0.1:80").expect("connect");
    assert!(accept_within(&direct, WAIT).is_some());
    assert!(!has_pending(&proxy));
}

#[test]
fn excluded_cgroup_wins_over_enrollment_and_cgroup_enrollment_works() {
    let _s = serial();
    let mut t = topo();
    let cg_id = zmesh_redirect::cgroup_id(&t.cg.path).unwrap();
    let _in = t.cg.enter();
    let proxy = listen(&t.node, "10.77.0.1:15001");
    let direct = listen(&t.node, "10.77.0.1:80");

    t.red.enroll_cgroup(cg_id).unwrap();
    let _c = connect(&t.pod, "10.77.0.1:80").expect("connect");
    assert!(
        accept_within(&proxy, WAIT).is_some(),
        "cgroup enrollment redirects"
    );

    t.red.exclude_cgroup(cg_id).unwrap();
    t.red.enroll_netns(t.pod_cookie).unwrap();
    let _c = connect(&t.pod, "10.77.0.1:80").expect("connect");
    assert!(
        accept_within(&direct, WAIT).is_some(),
        "exclusion is checked first"
    );
    assert!(!has_pending(&proxy));

    t.red.unexclude_cgroup(cg_id).unwrap();
    t.red.unenroll_cgroup(cg_id).unwrap();
    let node_cookie = t.node.run(|| current_netns_cookie().unwrap());
    t.red.exclude_netns(t.pod_cookie).unwrap();
    let _c = connect(&t.pod, "10.77.0.1:80").expect("connect");
    assert!(
        accept_within(&direct, WAIT).is_some(),
        "netns exclusion is checked first"
    );
    t.red.unexclude_netns(t.pod_cookie).unwrap();
    assert_ne!(node_cookie, t.pod_cookie);
}
