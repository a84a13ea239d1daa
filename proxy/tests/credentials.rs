//! Loading workload certificates from a directory (`zmesh proxy --cert-dir`).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::Ca;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use zmesh_identity::{TrustDomain, WorkloadId};
use zmesh_proxy::{CredentialsError, StaticCredentials, TlsCredentials};

fn pem(label: &str, der: &[u8]) -> String {
    use std::fmt::Write;
    const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b = String::new();
    for chunk in der.chunks(3) {
        let n = chunk.iter().fold(0u32, |a, &x| (a << 8) | x as u32) << (8 * (3 - chunk.len()));
        for i in 0..4 {
            if i <= chunk.len() {
                b.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                b.push('=');
            }
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b.as_bytes().chunks(64) {
        let _ = writeln!(out, "{}", std::str::from_utf8(line).unwrap());
    }
    let _ = writeln!(out, "-----END {label}-----");
    out
}

fn write_workload(
    dir: &Path,
    ns: &str,
    sa: &str,
    chain: &[CertificateDer<'_>],
    key: &PrivateKeyDer<'_>,
    mode: u32,
) {
    let ns_dir = dir.join(ns);
    std::fs::create_dir_all(&ns_dir).unwrap();
    let chain_pem: String = chain.iter().map(|c| pem("CERTIFICATE", c)).collect();
    std::fs::write(ns_dir.join(format!("{sa}.pem")), chain_pem).unwrap();
    let key_path = ns_dir.join(format!("{sa}.key"));
    std::fs::write(&key_path, pem("PRIVATE KEY", key.secret_der())).unwrap();
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn setup(ca: &Ca) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("roots.pem"), pem("CERTIFICATE", &ca.root())).unwrap();
    dir
}

#[test]
fn loads_a_certificate_directory() {
    let ca = Ca::new("cluster.local");
    let dir = setup(&ca);
    let (chain, key) = ca.leaf("spiffe://cluster.local/ns/shop/sa/web");
    write_workload(dir.path(), "shop", "web", &chain, &key, 0o600);
    let td = TrustDomain::default();
    let creds = StaticCredentials::load_dir(dir.path(), &td).unwrap();
    let web = WorkloadId::new(&td, "shop", "web").unwrap();
    assert_eq!(creds.workloads().collect::<Vec<_>>(), vec![&web]);
    assert!(creds.server_config(&web).is_ok());
    let other = WorkloadId::new(&td, "shop", "db").unwrap();
    assert!(creds.server_config(&other).is_err());
    assert!(creds
        .client_config(&other, &[web.spiffe_id().clone()])
        .is_err());
    let expiries = creds.expiries();
    assert_eq!(expiries.len(), 1);
    assert_eq!(expiries[0].0, "spiffe://cluster.local/ns/shop/sa/web");
}

#[test]
fn refuses_group_readable_keys() {
    let ca = Ca::new("cluster.local");
    let dir = setup(&ca);
    let (chain, key) = ca.leaf("spiffe://cluster.local/ns/shop/sa/web");
    write_workload(dir.path(), "shop", "web", &chain, &key, 0o640);
    let err = StaticCredentials::load_dir(dir.path(), &TrustDomain::default()).unwrap_err();
    assert!(
        matches!(err, CredentialsError::KeyPermissions { mode: 0o640, .. }),
        "{err}"
    );
}

#[test]
fn refuses_a_certificate_for_another_identity() {
    let ca = Ca::new("cluster.local");
    let dir = setup(&ca);
    let (chain, key) = ca.leaf("spiffe://cluster.local/ns/shop/sa/admin");
    write_workload(dir.path(), "shop", "web", &chain, &key, 0o600);
    let err = StaticCredentials::load_dir(dir.path(), &TrustDomain::default()).unwrap_err();
    assert!(
        matches!(err, CredentialsError::WrongIdentity { .. }),
        "{err}"
    );
}

#[test]
fn refuses_an_untrusted_certificate_and_an_empty_directory() {
    let ca = Ca::new("cluster.local");
    let dir = setup(&ca);
    let err = StaticCredentials::load_dir(dir.path(), &TrustDomain::default()).unwrap_err();
    assert!(matches!(err, CredentialsError::Empty(_)), "{err}");
    let stranger = Ca::new("cluster.local");
    let (chain, key) = stranger.leaf("spiffe://cluster.local/ns/shop/sa/web");
    write_workload(dir.path(), "shop", "web", &chain, &key, 0o600);
    let err = StaticCredentials::load_dir(dir.path(), &TrustDomain::default()).unwrap_err();
    assert!(matches!(err, CredentialsError::Invalid { .. }), "{err}");
    let missing =
        StaticCredentials::load_dir(Path::new("/nonexistent/zmesh"), &TrustDomain::default());
    assert!(matches!(missing, Err(CredentialsError::Read { .. })));
}
