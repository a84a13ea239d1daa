//! Underlay captures see the traffic between nodes (needs root and tcpdump).

mod common;

use std::net::Ipv4Addr;

#[test]
fn plaintext_payload_between_nodes_shows_up_in_the_capture() {
    let cluster = common::build();
    let web = cluster.pod("default", "web").unwrap();
    let client = cluster.pod("default", "client").unwrap();
    let server = web.serve_echo(8080).unwrap();

    let capture = cluster.start_capture().unwrap();
    let path = capture.path().to_owned();
    let payload = b"zmesh-secret-payload-0123456789".repeat(100);
    assert_eq!(client.echo(server.addr(), &payload).unwrap(), payload);
    let pcap = capture.stop().unwrap();
    assert!(!path.exists(), "the pcap file is removed after stop");

    assert!(pcap.contains(b"zmesh-secret-payload-0123456789"));
    assert!(pcap.contains(&payload), "whole stream is reassembled");
    assert!(!pcap.contains(b"never-sent-on-the-wire"));
    let ports = pcap.tcp_ports();
    assert!(ports.contains_key(&8080), "{ports:?}");
    assert!(pcap.tcp_syn_ports().contains(&8080));
    // Pod addresses travel unchanged over the underlay (plain routing, no tunnel, no NAT).
    assert!(pcap
        .packets()
        .iter()
        .filter_map(|p| p.ipv4)
        .any(|ip| { ip.src == client.ip() && ip.dst == web.ip() }));
    assert_eq!(pcap.link_type(), 1, "Ethernet");
}

#[test]
fn traffic_inside_one_node_never_reaches_the_underlay() {
    let cluster = common::build();
    let web = cluster.pod("default", "web").unwrap();
    let db = cluster.pod("data", "db").unwrap();
    let server = db.serve_echo(5432).unwrap();
    let capture = cluster.start_capture().unwrap();
    assert_eq!(
        web.echo(server.addr(), b"local-only-bytes").unwrap(),
        b"local-only-bytes"
    );
    let pcap = capture.stop().unwrap();
    assert!(!pcap.contains(b"local-only-bytes"));
    assert!(
        !pcap.tcp_ports().contains_key(&5432),
        "{:?}",
        pcap.tcp_ports()
    );
    // IPv6 is off: no neighbour discovery or MLD noise, only IPv4 and ARP on the wire.
    for p in pcap.packets() {
        let ethertype = u16::from_be_bytes([p.frame[12], p.frame[13]]);
        assert!(
            matches!(ethertype, 0x0800 | 0x0806),
            "unexpected frame {:02x?}",
            p.frame
        );
    }
    // The capture was working all along: it holds the flush marker from node1.
    assert!(pcap.packets().iter().any(|p| p
        .ipv4
        .is_some_and(|ip| ip.src == Ipv4Addr::new(10, 200, 0, 1))
        && p.udp.is_some()));
}

#[test]
fn dropping_a_running_capture_stops_tcpdump_and_removes_the_file() {
    let cluster = common::build();
    let capture = cluster.start_capture().unwrap();
    let path = capture.path().to_owned();
    let procs = cluster.cgroup_path().join("capture/cgroup.procs");
    assert_eq!(
        std::fs::read_to_string(&procs).unwrap().lines().count(),
        1,
        "tcpdump runs in the capture cgroup"
    );
    drop(capture);
    assert!(!path.exists());
    assert_eq!(std::fs::read_to_string(&procs).unwrap(), "");
}
