//! Pods and nodes can talk the way a Kubernetes pod network lets them (needs root).

mod common;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::MetadataExt;

use zmesh_testbed::Error;

/// A payload big enough to need many segments and to fill socket buffers.
fn payload() -> Vec<u8> {
    (0..1_000_000u32).map(|i| (i * 7 % 251) as u8).collect()
}

#[test]
fn pod_to_pod_across_nodes_echoes_intact() {
    let cluster = common::build();
    let web = cluster.pod("default", "web").unwrap();
    let client = cluster.pod("default", "client").unwrap();
    assert_ne!(web.node_name(), client.node_name());
    let server = web.serve_echo(8080).unwrap();
    assert_eq!(server.addr(), SocketAddr::from((web.ip(), 8080)));
    let data = payload();
    assert_eq!(client.echo(server.addr(), &data).unwrap(), data);
}

#[test]
fn pod_to_pod_on_one_node_echoes_intact() {
    let cluster = common::build();
    let web = cluster.pod("default", "web").unwrap();
    let db = cluster.pod("data", "db").unwrap();
    assert_eq!(web.node_name(), db.node_name());
    let server = db.serve_echo(5432).unwrap();
    let data = payload();
    assert_eq!(web.echo(server.addr(), &data).unwrap(), data);
}

#[test]
fn server_sees_the_real_pod_address_as_source() {
    let cluster = common::build();
    let web = cluster.pod("default", "web").unwrap();
    let client = cluster.pod("default", "client").unwrap();
    let listener = web.tcp_listener(0).unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut conn = client.tcp_connect((web.ip(), port).into()).unwrap();
    let (mut accepted, peer) = listener.accept().unwrap();
    assert_eq!(peer.ip(), client.ip(), "no NAT between pods");
    assert_eq!(conn.local_addr().unwrap().ip(), client.ip());
    conn.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    accepted.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
}

#[test]
fn pod_reaches_its_node_gateway_address() {
    let cluster = common::build();
    for node in cluster.nodes() {
        let server = node.serve_echo(0).unwrap();
        let at_gateway = SocketAddr::from((node.pod_gateway_ip(), server.port()));
        for pod in node.pods() {
            assert_eq!(pod.gateway_ip(), node.pod_gateway_ip());
            assert_eq!(
                pod.echo(at_gateway, b"to the node").unwrap(),
                b"to the node"
            );
        }
    }
}

#[test]
fn nothing_listens_where_it_should_not() {
    let cluster = common::build();
    let client = cluster.pod("default", "client").unwrap();
    let web = cluster.pod("default", "web").unwrap();
    // Routed but closed port: refused, not timed out (the packet got there).
    match client.tcp_connect((web.ip(), 9).into()) {
        Err(Error::Socket { source, .. }) => {
            assert_eq!(
                source.kind(),
                std::io::ErrorKind::ConnectionRefused,
                "{source}"
            )
        }
        other => panic!("expected a refused connection, got {other:?}"),
    }
}

#[test]
fn http_helpers_identify_the_serving_pod() {
    let cluster = common::build();
    let web = cluster.pod("default", "web").unwrap();
    let client = cluster.pod("default", "client").unwrap();
    let server = web.serve_http(80).unwrap();
    let response = client.http_get(server.addr(), "/hello").unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(response.header("x-served-by"), Some("default/web"));
    assert_eq!(response.body, b"default/web");
}

#[test]
fn addresses_and_names_follow_the_documented_plan() {
    let cluster = common::build();
    let id = cluster.run_id().to_owned();
    let node1 = cluster.node("node1").unwrap();
    let node2 = cluster.node("node2").unwrap();
    assert!(cluster.node("node3").is_none());
    assert!(cluster.pod("default", "nope").is_none());
    assert_eq!(node1.underlay_ip(), Ipv4Addr::new(10, 200, 0, 1));
    assert_eq!(node2.underlay_ip(), Ipv4Addr::new(10, 200, 0, 2));
    assert_eq!(node2.pod_cidr().to_string(), "10.201.2.0/24");
    assert_eq!(node1.pod_gateway_ip(), Ipv4Addr::new(10, 201, 1, 1));
    assert_eq!(node1.underlay_iface(), format!("{id}-n1"));
    assert_eq!(node1.bridge_port(), format!("{id}-u1"));
    assert_eq!(cluster.bridge(), format!("{id}-br"));
    let ips: Vec<_> = node1.pods().iter().map(|p| p.ip()).collect();
    assert_eq!(
        ips,
        [Ipv4Addr::new(10, 201, 1, 2), Ipv4Addr::new(10, 201, 1, 3)]
    );
    let db = cluster.pod("data", "db").unwrap();
    assert_eq!(db.service_account(), "postgres");
    assert_eq!(db.veth_pod(), "eth0");
    assert_eq!(db.veth_host(), format!("{id}h1p2"));
    assert!(db.veth_host().len() <= 15);
    assert_eq!(db.netns().name(), format!("{id}-pod-data.db"));
    assert!(db.netns().path().exists());
    assert!(node1.pod_cidr().contains(db.ip()));

    // The links really are where the accessors say.
    let show = |netns: &str, dev: &str| {
        std::process::Command::new("ip")
            .args(["-n", netns, "-o", "addr", "show", "dev", dev])
            .output()
            .unwrap()
    };
    let out = show(db.netns().name(), "eth0");
    assert!(String::from_utf8_lossy(&out.stdout).contains("10.201.1.3/32"));
    let out = show(node1.netns().name(), node1.underlay_iface());
    assert!(String::from_utf8_lossy(&out.stdout).contains("10.200.0.1/24"));
    assert!(show(node1.netns().name(), db.veth_host()).status.success());
    assert!(show(cluster.underlay_netns().name(), node1.bridge_port())
        .status
        .success());
}

#[test]
fn cgroups_and_netns_cookies_are_per_pod() {
    let cluster = common::build();
    let base = common::cgroup2()
        .join("zmesh-testbed")
        .join(cluster.run_id());
    assert_eq!(cluster.cgroup_path(), base);
    let mut cookies = HashSet::new();
    let mut cgroup_ids = HashSet::new();
    for pod in cluster.pods() {
        let expected = base
            .join("nodes")
            .join(pod.node_name())
            .join("pods")
            .join(format!("{}_{}", pod.namespace(), pod.name()));
        assert_eq!(pod.cgroup_path(), expected);
        assert_eq!(pod.cgroup_id(), std::fs::metadata(&expected).unwrap().ino());
        assert!(cgroup_ids.insert(pod.cgroup_id()));
        assert_ne!(pod.netns_cookie(), 0);
        assert!(cookies.insert(pod.netns_cookie()), "cookies must differ");
        assert_eq!(pod.netns().cookie().unwrap(), pod.netns_cookie());
    }
    let node = cluster.node("node1").unwrap();
    assert!(node.pods_cgroup_path().ends_with("nodes/node1/pods"));
    assert!(node.cgroup_path().ends_with("nodes/node1/system"));
    assert_ne!(node.cgroup_id(), node.pods_cgroup_id());
}

#[test]
fn commands_run_inside_the_pod_netns_and_cgroup() {
    let cluster = common::build();
    let pod = cluster.pod("data", "db").unwrap();
    let out = pod
        .command("sh")
        .unwrap()
        .args([
            "-c",
            "cat /proc/self/cgroup; readlink /proc/self/ns/net; ip -o -4 addr show",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let relative = pod
        .cgroup_path()
        .strip_prefix(common::cgroup2())
        .unwrap()
        .display()
        .to_string();
    assert!(stdout.contains(&format!("0::/{relative}\n")), "{stdout}");
    let netns_inode = std::fs::metadata(pod.netns().path()).unwrap().ino();
    assert!(stdout.contains(&format!("net:[{netns_inode}]")), "{stdout}");
    assert!(stdout.contains("10.201.1.3/32"), "{stdout}");
    assert!(
        !stdout.contains("10.200.0."),
        "pod must not see the underlay: {stdout}"
    );

    let node = cluster.node("node2").unwrap();
    let out = node
        .command("sh")
        .unwrap()
        .args(["-c", "cat /proc/sys/net/ipv4/ip_forward /proc/self/cgroup"])
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.starts_with("1\n"), "nodes forward: {stdout}");
    assert!(stdout.contains("/nodes/node2/system\n"), "{stdout}");
}

#[test]
fn closures_run_inside_the_namespace() {
    let cluster = common::build();
    let pod = cluster.pod("default", "client").unwrap();
    let inode = pod
        .run(|| std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino())
        .unwrap();
    assert_eq!(inode, std::fs::metadata(pod.netns().path()).unwrap().ino());
    // The calling thread itself stays where it was.
    let own = std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino();
    assert_ne!(own, inode);
}

#[test]
fn parallel_clusters_in_one_process_do_not_collide() {
    let handles: Vec<_> = (0..3)
        .map(|_| {
            std::thread::spawn(|| {
                let cluster = common::build();
                let web = cluster.pod("default", "web").unwrap();
                let server = web.serve_echo(8080).unwrap();
                let client = cluster.pod("default", "client").unwrap();
                assert_eq!(client.echo(server.addr(), b"mine").unwrap(), b"mine");
                cluster.run_id().to_owned()
            })
        })
        .collect();
    let ids: HashSet<String> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(ids.len(), 3);
}

#[test]
fn dual_stack_wildcard_listeners_accept_ipv4_clients() {
    // Proxies often bind [::]; IPv6 is disabled in the testbed but such sockets still work.
    let cluster = common::build();
    let web = cluster.pod("default", "web").unwrap();
    let client = cluster.pod("default", "client").unwrap();
    let listener = web
        .run(|| std::net::TcpListener::bind("[::]:0"))
        .unwrap()
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let _conn = client.tcp_connect((web.ip(), port).into()).unwrap();
    let (_accepted, peer) = listener.accept().unwrap();
    assert_eq!(peer.ip().to_canonical(), std::net::IpAddr::V4(client.ip()));
}

#[test]
fn dual_stack_pods_talk_over_ipv6_across_nodes_and_on_one_node() {
    let spec = common::two_node_spec().dual_stack();
    let cluster = zmesh_testbed::Cluster::build(&spec).unwrap();
    let web = cluster.pod("default", "web").unwrap();
    let client = cluster.pod("default", "client").unwrap();
    let db = cluster.pod("data", "db").unwrap();
    let server = web.serve_echo(8080).unwrap();
    let data = payload();
    let web6 = SocketAddr::new(web.ip6().unwrap().into(), 8080);
    // across nodes and on one node, over IPv6; IPv4 to the same dual-stack server
    assert_eq!(client.echo(web6, &data).unwrap(), data);
    assert_eq!(db.echo(web6, &data).unwrap(), data);
    assert_eq!(client.echo(server.addr(), &data).unwrap(), data);
    // no NAT: the server sees the client's own IPv6 address
    let listener = web.tcp_listener(0).unwrap();
    let port = listener.local_addr().unwrap().port();
    let _conn = client
        .tcp_connect(SocketAddr::new(web.ip6().unwrap().into(), port))
        .unwrap();
    let (_accepted, peer) = listener.accept().unwrap();
    assert_eq!(peer.ip(), std::net::IpAddr::V6(client.ip6().unwrap()));
    // the node's IPv6 pod gateway is reachable from its pods
    let node = cluster.node(web.node_name()).unwrap();
    let gw = node.pod_gateway_ip6().unwrap();
    let node_listener = node.tcp_listener(0).unwrap();
    let port = node_listener.local_addr().unwrap().port();
    let _conn = web.tcp_connect(SocketAddr::new(gw.into(), port)).unwrap();
    assert!(node_listener.accept().is_ok());
}

#[test]
fn single_stack_clusters_have_no_ipv6() {
    let cluster = common::build();
    let web = cluster.pod("default", "web").unwrap();
    assert_eq!(web.ip6(), None);
    assert_eq!(cluster.nodes()[0].pod_gateway_ip6(), None);
}
