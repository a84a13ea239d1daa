//! End to end on the shared `zmesh-testbed` cluster: a process of an enrolled pod
//! (running in the pod's netns and cgroup) reaches the node proxy instead of its
//! destination, and the proxy learns the original destination. Root.

use std::{
    io::{Read, Write},
    net::{SocketAddr, SocketAddrV4, TcpListener},
    os::fd::AsRawFd,
    time::Duration,
};

use zmesh_redirect::{ProxyListeners, RedirectConfig, Redirector};
use zmesh_testbed::{Cluster, ClusterSpec};

fn accept_within(l: &TcpListener, timeout: Duration) -> Option<(std::net::TcpStream, SocketAddr)> {
    let mut pfd = libc::pollfd {
        fd: l.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    if unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) } <= 0 {
        return None;
    }
    l.accept().ok()
}

struct Uninstall(std::path::PathBuf);

impl Drop for Uninstall {
    fn drop(&mut self) {
        let _ = Redirector::uninstall(&self.0);
        // The shared parent, unless another test's pins are still in it.
        if let Some(parent) = self.0.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

#[test]
fn enrolled_pod_process_is_proxied_with_its_original_destination() {
    let cluster = Cluster::build(&ClusterSpec::new().node("node1", |n| {
        n.pod("web", "default", "web")
            .pod("client", "default", "sleep")
    }))
    .expect("testbed cluster");
    let node = cluster.node("node1").unwrap();
    let web = cluster.pod("default", "web").unwrap();
    let client = cluster.pod("default", "client").unwrap();
    let server = web.serve_echo(8080).unwrap();

    let pin_dir = std::path::Path::new("/sys/fs/bpf/zmesh-test").join(cluster.run_id());
    let _cleanup = Uninstall(pin_dir.clone());
    let outbound = SocketAddrV4::new(node.pod_gateway_ip(), 15001);
    let mut red = Redirector::load(&RedirectConfig {
        pin_dir,
        cgroup: node.pods_cgroup_path().to_path_buf(),
        ingress_interfaces: vec![],
        proxy: ProxyListeners::new(outbound),
        tc_attach: Default::default(),
    })
    .expect("load");
    let proxy = node
        .run(move || TcpListener::bind(outbound).unwrap())
        .unwrap();

    // the client reads exactly n bytes, so it never waits on an open connection
    let script = |n: usize| {
        format!(
            "exec 3<>/dev/tcp/{}/{} && printf ping >&3 && head -c {n} <&3",
            server.addr().ip(),
            server.addr().port()
        )
    };
    // not enrolled: the echo server answers
    let out = client
        .command("bash")
        .unwrap()
        .args(["-c", &script(4)])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ping", "{out:?}");

    red.enroll_netns(client.netns_cookie()).unwrap();
    let child = client
        .command("bash")
        .unwrap()
        .args(["-c", &script(7)])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (mut conn, peer) =
        accept_within(&proxy, Duration::from_secs(10)).expect("proxy got the pod's connection");
    assert_eq!(peer.ip(), std::net::IpAddr::V4(client.ip()));
    assert_eq!(red.original_dst(peer).unwrap(), Some(server.addr()));
    let mut buf = [0u8; 4];
    conn.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
    conn.write_all(b"proxied").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "proxied");
}
