//! Standalone proxies carrying a connection over HBONE: `zmesh proxy --ca`, whose
//! workloads' certificates come from a real zmesh CA (nodes joined with one-time tokens),
//! and `zmesh-datapath proxy --cert-dir`, the small binary with certificates from files.
//! Loopback only (127.0.78.0/24).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_zmesh");
const DATAPATH_BIN: &str = env!("CARGO_BIN_EXE_zmesh-datapath");

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
    spawn_binary(BIN, args, log)
}

fn spawn_binary(binary: &str, args: &[&str], log: &Path) -> Kill {
    let log = std::fs::File::create(log).unwrap();
    Kill(
        Command::new(binary)
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
    let server_addr = echo_server(server_ip);
    std::fs::write(
        d("workloads.yaml"),
        workload_table(client_ip, server_ip, proxy_a, proxy_b),
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

    let echoed = exchange(client_ip, proxy_a, b"certificates from the CA");
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

/// `bench/client` on node-a and `bench/server` on node-b, each node's HBONE on `:15008` of
/// its proxy's IP.
fn workload_table(client_ip: &str, server_ip: &str, proxy_a: &str, proxy_b: &str) -> String {
    format!(
        "nodes:\n- {{name: node-a, hbone: \"{proxy_a}:15008\"}}\n- {{name: node-b, hbone: \"{proxy_b}:15008\"}}\n\
         workloads:\n- {{name: client, namespace: bench, serviceAccount: client, node: node-a, ips: [{client_ip}]}}\n\
         - {{name: server, namespace: bench, serviceAccount: server, node: node-b, ips: [{server_ip}]}}\n"
    )
}

/// Sends `message` from `client_ip` to proxy A's outbound listener (standing in for a
/// captured connection) and returns what comes back once the write side is closed.
fn exchange(client_ip: &str, proxy_a: &str, message: &[u8]) -> Vec<u8> {
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
    stream.write_all(message).unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut echoed = Vec::new();
    // A reset (the mesh refused) reads as what arrived before it.
    let _ = stream.read_to_end(&mut echoed);
    echoed
}

/// An echo server on `ip`, one connection at a time.
fn echo_server(ip: &str) -> SocketAddr {
    let server = TcpListener::bind((ip, 0)).unwrap();
    let addr = server.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in server.incoming() {
            let Ok(mut s) = s else { return };
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf);
            let _ = s.write_all(&buf);
        }
    });
    addr
}

/// `roots.pem` and `bench/<sa>.pem` + `.key` (the layout of `--cert-dir`), signed by `root`.
fn write_cert_dir(dir: &Path, root: &rcgen::CertifiedIssuer<'static, rcgen::KeyPair>, sa: &str) {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir.join("bench")).unwrap();
    std::fs::write(dir.join("roots.pem"), root.pem()).unwrap();
    let mut params = rcgen::CertificateParams::new(vec![]).unwrap();
    let uri = format!("spiffe://cluster.local/ns/bench/sa/{sa}");
    params.subject_alt_names = vec![rcgen::SanType::URI(uri.as_str().try_into().unwrap())];
    params.is_ca = rcgen::IsCa::ExplicitNoCa;
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::DigitalSignature,
        rcgen::KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = params.signed_by(&key, root).unwrap();
    std::fs::write(dir.join(format!("bench/{sa}.pem")), cert.pem()).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dir.join(format!("bench/{sa}.key")))
        .unwrap()
        .write_all(key.serialize_pem().as_bytes())
        .unwrap();
}

fn root(name: &str) -> rcgen::CertifiedIssuer<'static, rcgen::KeyPair> {
    let mut params = rcgen::CertificateParams::new(vec![]).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, name);
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    rcgen::CertifiedIssuer::self_signed(params, key).unwrap()
}

/// `zmesh-datapath proxy` (what the side-by-side benchmark runs) is `zmesh proxy --cert-dir`:
/// the pair carries a connection over mutual TLS, and a server-side proxy holding another
/// root refuses it.
#[test]
fn the_datapath_binary_serves_a_static_table_with_certificates_from_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    let (client_ip, server_ip, proxy_a, proxy_b, foreign_b) = (
        "127.0.78.41",
        "127.0.78.42",
        "127.0.78.51",
        "127.0.78.52",
        "127.0.78.53",
    );
    let server_addr = echo_server(server_ip);
    let table = |hbone_b: &str| workload_table(client_ip, server_ip, proxy_a, hbone_b);
    let (ours, foreign) = (root("zmesh test root"), root("another root"));
    write_cert_dir(&dir.path().join("a"), &ours, "client");
    write_cert_dir(&dir.path().join("b"), &ours, "server");
    write_cert_dir(&dir.path().join("b-foreign"), &foreign, "server");
    let static_dst = format!("{client_ip}={server_addr}");
    let proxy = |node: &str, ip: &str, tables: &str, certs: &str, log: &str| {
        std::fs::write(
            d(tables),
            table(if tables == "foreign.yaml" {
                foreign_b
            } else {
                proxy_b
            }),
        )
        .unwrap();
        spawn_binary(
            DATAPATH_BIN,
            &[
                "proxy",
                "--workloads",
                &d(tables),
                "--node",
                node,
                "--cert-dir",
                &d(certs),
                "--listen-ip",
                ip,
                "--explicit",
                "--static-dst",
                &static_dst,
            ],
            &dir.path().join(log),
        )
    };
    let logs = || {
        ["a.log", "b.log", "a-foreign.log", "b-foreign.log"]
            .map(|l| std::fs::read_to_string(dir.path().join(l)).unwrap_or_default())
            .join("\n")
    };

    let _b = proxy("node-b", proxy_b, "workloads.yaml", "b", "b.log");
    let a = proxy("node-a", proxy_a, "workloads.yaml", "a", "a.log");
    wait_listening(format!("{proxy_b}:15008").parse().unwrap());
    wait_listening(format!("{proxy_a}:15001").parse().unwrap());
    let echoed = exchange(client_ip, proxy_a, b"certificates from files");
    assert_eq!(
        echoed,
        b"certificates from files",
        "proxy logs:\n{}",
        logs()
    );

    // The same client side against a server-side proxy whose certificate chains to another
    // root: no byte reaches the server.
    drop(a);
    let _foreign_b = proxy(
        "node-b",
        foreign_b,
        "foreign.yaml",
        "b-foreign",
        "b-foreign.log",
    );
    let _a = proxy("node-a", proxy_a, "foreign.yaml", "a", "a-foreign.log");
    wait_listening(format!("{foreign_b}:15008").parse().unwrap());
    wait_listening(format!("{proxy_a}:15001").parse().unwrap());
    let echoed = exchange(client_ip, proxy_a, b"to a foreign root");
    assert!(
        echoed.is_empty(),
        "carried to a foreign root: {echoed:?}\n{}",
        logs()
    );
}
