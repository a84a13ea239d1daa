//! `zmesh proxy --ca`: two standalone proxies get their workloads' certificates from a real
//! zmesh CA (nodes joined with one-time tokens) and carry a connection over HBONE.
//! Loopback only (127.0.78.0/24).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_zmesh");

/// Kills a child process when dropped (also on panic).
struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn zmesh(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "zmesh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn spawn(args: &[&str], log: &Path) -> Kill {
    let log = std::fs::File::create(log).unwrap();
    Kill(
        Command::new(BIN)
            .args(args)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

fn wait_listening(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {addr}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn standalone_proxies_with_certificates_from_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let d = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    let (client_ip, server_ip, proxy_a, proxy_b, ca_ip) = (
        "127.0.78.11",
        "127.0.78.12",
        "127.0.78.21",
        "127.0.78.22",
        "127.0.78.30",
    );

    // The CA, placing `client` on node-a and `server` on node-b.
    std::fs::write(
        d("placement.yaml"),
        "node-a: [bench/client]\nnode-b: [bench/server]\n",
    )
    .unwrap();
    zmesh(&["ca", "init", "--state-dir", &d("ca")]);
    let ca_addr = format!("{ca_ip}:15012");
    let _ca = spawn(
        &[
            "ca",
            "serve",
            "--state-dir",
            &d("ca"),
            "--listen",
            &ca_addr,
            "--san",
            ca_ip,
            "--placement",
            &d("placement.yaml"),
        ],
        &dir.path().join("ca.log"),
    );
    wait_listening(ca_addr.parse().unwrap());
    std::fs::write(
        d("roots.pem"),
        zmesh(&["ca", "bundle", "--state-dir", &d("ca")]),
    )
    .unwrap();
    for node in ["node-a", "node-b"] {
        let token = zmesh(&[
            "ca",
            "token",
            "create",
            "--state-dir",
            &d("ca"),
            "--node",
            node,
        ]);
        let token = token
            .lines()
            .find(|l| !l.trim().is_empty())
            .unwrap()
            .trim()
            .to_owned();
        let out = Command::new(BIN)
            .args([
                "ca",
                "join",
                "--ca",
                &ca_addr,
                "--node",
                node,
                "--out",
                &d(node),
                "--ca-bundle",
                &d("roots.pem"),
            ])
            .env("ZMESH_JOIN_TOKEN", token)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "join {node}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // The server workload and the workload table.
    let server = TcpListener::bind((server_ip, 0)).unwrap();
    let server_addr = server.local_addr().unwrap();
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = server.accept() {
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf);
            let _ = s.write_all(&buf);
        }
    });
    std::fs::write(
        d("workloads.yaml"),
        format!(
            "nodes:\n- {{name: node-a, hbone: \"{proxy_a}:15008\"}}\n- {{name: node-b, hbone: \"{proxy_b}:15008\"}}\n\
             workloads:\n- {{name: client, namespace: bench, serviceAccount: client, node: node-a, ips: [{client_ip}]}}\n\
             - {{name: server, namespace: bench, serviceAccount: server, node: node-b, ips: [{server_ip}]}}\n"
        ),
    )
    .unwrap();
    let static_dst = format!("{client_ip}={server_addr}");
    let proxy = |node: &str, ip: &str, log: &str| {
        spawn(
            &[
                "proxy",
                "--workloads",
                &d("workloads.yaml"),
                "--node",
                node,
                "--ca",
                &ca_addr,
                "--credentials",
                &d(node),
                "--listen-ip",
                ip,
                "--explicit",
                "--static-dst",
                &static_dst,
            ],
            &dir.path().join(log),
        )
    };
    let _b = proxy("node-b", proxy_b, "b.log");
    let _a = proxy("node-a", proxy_a, "a.log");
    // Ready means certificates are in: readiness answers once the proxy serves.
    wait_listening(format!("{proxy_b}:15008").parse().unwrap());
    wait_listening(format!("{proxy_a}:15001").parse().unwrap());

    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&SocketAddr::new(client_ip.parse().unwrap(), 0).into())
        .unwrap();
    socket
        .connect(
            &format!("{proxy_a}:15001")
                .parse::<SocketAddr>()
                .unwrap()
                .into(),
        )
        .unwrap();
    let mut stream: TcpStream = socket.into();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(b"certificates from the CA").unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut echoed = Vec::new();
    stream.read_to_end(&mut echoed).unwrap();
    assert_eq!(
        echoed,
        b"certificates from the CA",
        "proxy logs:\n{}\n{}",
        std::fs::read_to_string(dir.path().join("a.log")).unwrap_or_default(),
        std::fs::read_to_string(dir.path().join("b.log")).unwrap_or_default()
    );
    // The CA issued both identities (one per node), as its audit log records.
    let audit = std::fs::read_to_string(dir.path().join("ca/audit.jsonl")).unwrap();
    for id in ["ns/bench/sa/client", "ns/bench/sa/server"] {
        assert!(
            audit
                .lines()
                .any(|l| l.contains(id) && l.contains("issued")),
            "{id} not issued:\n{audit}"
        );
    }
}
