//! The benchmark's throwaway PKI and the files `zmesh proxy` reads: a root, one X.509-SVID
//! per workload in the layout of `--cert-dir` (roots.pem, <ns>/<sa>.pem, <ns>/<sa>.key with
//! mode 0600), and the workload table.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;

pub const TRUST_DOMAIN: &str = "cluster.local";
pub const NAMESPACE: &str = "bench";

/// A root CA that lives only as long as the benchmark.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    pub fn new() -> Result<Self> {
        let mut params = CertificateParams::new(vec![])?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "zmesh-bench root");
        params.distinguished_name = dn;
        let (not_before, not_after) = validity();
        params.not_before = not_before;
        params.not_after = not_after;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let issuer = CertifiedIssuer::self_signed(params, key).context("signing the root")?;
        Ok(Self { issuer })
    }

    /// Writes `dir/roots.pem` and the SVID of `bench/<sa>` (leaf + key, key mode 0600).
    pub fn write_cert_dir(&self, dir: &Path, service_account: &str) -> Result<()> {
        let ns_dir = dir.join(NAMESPACE);
        std::fs::create_dir_all(&ns_dir)
            .with_context(|| format!("creating {}", ns_dir.display()))?;
        write_file(&dir.join("roots.pem"), self.issuer.pem().as_bytes(), 0o644)?;

        let uri = format!("spiffe://{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/{service_account}");
        let mut params = CertificateParams::new(vec![])?;
        params.subject_alt_names = vec![SanType::URI(uri.as_str().try_into()?)];
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "zmesh-bench workload");
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let (not_before, not_after) = validity();
        params.not_before = not_before;
        params.not_after = not_after;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .with_context(|| format!("signing the SVID for {uri}"))?;
        write_file(
            &ns_dir.join(format!("{service_account}.pem")),
            cert.pem().as_bytes(),
            0o644,
        )?;
        write_file(
            &ns_dir.join(format!("{service_account}.key")),
            key.serialize_pem().as_bytes(),
            0o600,
        )
    }
}

/// Valid from an hour ago (clock skew) for a day: longer than any run.
fn validity() -> (OffsetDateTime, OffsetDateTime) {
    let now = OffsetDateTime::now_utc();
    (
        now - time::Duration::hours(1),
        now + time::Duration::hours(24),
    )
}

/// Creates `path` with `mode` from the start, so a key is never readable by others even
/// briefly; refuses to overwrite.
fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(data)
        .with_context(|| format!("writing {}", path.display()))
}

/// Where everything listens.
#[derive(Debug, Clone, Copy)]
pub struct Topology {
    pub client_ip: IpAddr,
    pub server_ip: IpAddr,
    pub proxy_a_ip: IpAddr,
    pub proxy_b_ip: IpAddr,
    /// The plain TCP relays of the "relay" path (no certificates, not in the table).
    pub relay_a_ip: IpAddr,
    pub relay_b_ip: IpAddr,
}

impl Topology {
    /// 127.0.<net>.11 client, .12 server, .21 proxy A (node bench-a), .22 proxy B,
    /// .31 relay A, .32 relay B.
    pub fn loopback(net: u8) -> Self {
        let ip = |host| IpAddr::from([127, 0, net, host]);
        Self {
            client_ip: ip(11),
            server_ip: ip(12),
            proxy_a_ip: ip(21),
            proxy_b_ip: ip(22),
            relay_a_ip: ip(31),
            relay_b_ip: ip(32),
        }
    }

    /// The workload table both proxies load: client on node bench-a, server on bench-b,
    /// each node's HBONE server at its proxy's address.
    pub fn workload_table(&self) -> String {
        let hbone = |ip: IpAddr| SocketAddr::new(ip, 15008);
        format!(
            "trustDomain: {TRUST_DOMAIN}
nodes:
  - name: bench-a
    hbone: \"{a}\"
  - name: bench-b
    hbone: \"{b}\"
workloads:
  - name: client
    namespace: {NAMESPACE}
    serviceAccount: client
    node: bench-a
    ips: [\"{client}\"]
  - name: server
    namespace: {NAMESPACE}
    serviceAccount: server
    node: bench-b
    ips: [\"{server}\"]
",
            a = hbone(self.proxy_a_ip),
            b = hbone(self.proxy_b_ip),
            client = self.client_ip,
            server = self.server_ip,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use zmesh_identity::{TrustDomain, WorkloadId};
    use zmesh_proxy::{StaticCredentials, TlsCredentials, WorkloadTable};

    /// The files are exactly what `zmesh proxy --cert-dir` accepts, keys are 0600, and each
    /// directory holds only its own workload's key.
    #[test]
    fn cert_dirs_load_in_the_proxy() {
        let ca = Ca::new().unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let a = tmp.path().join("a");
        ca.write_cert_dir(&a, "client").unwrap();
        let key = a.join("bench/client.key");
        let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);

        let td = TrustDomain::new(TRUST_DOMAIN).unwrap();
        let creds = StaticCredentials::load_dir(&a, &td).unwrap();
        let client = WorkloadId::new(&td, NAMESPACE, "client").unwrap();
        let server = WorkloadId::new(&td, NAMESPACE, "server").unwrap();
        assert!(creds.server_config(&client).is_ok());
        assert!(creds.server_config(&server).is_err());
        // Writing twice must not silently replace a key.
        assert!(ca.write_cert_dir(&a, "client").is_err());
    }

    #[test]
    fn workload_table_parses_with_both_nodes() {
        let topo = Topology::loopback(0);
        let table = WorkloadTable::from_yaml(&topo.workload_table()).unwrap();
        let client = table.local_workload(topo.client_ip, "bench-a").unwrap();
        assert_eq!(
            client.identity.to_string(),
            "spiffe://cluster.local/ns/bench/sa/client"
        );
        assert!(table.local_workload(topo.server_ip, "bench-b").is_some());
        assert_eq!(
            table.node("bench-b").unwrap().hbone,
            Some(SocketAddr::new(topo.proxy_b_ip, 15008))
        );
    }
}
