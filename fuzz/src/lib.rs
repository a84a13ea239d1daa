//! What the fuzz targets share: a fixed CA (root and intermediate of `cluster.local`,
//! committed under `fixtures/` so that seeds signed by it stay valid), a fixed "now", and
//! the small framings the targets use to carry several values in one input.
//!
//! The fixture keys are test keys, published here on purpose: nothing trusts them.

use std::path::Path;
use std::sync::LazyLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::CertificateDer;
use zmesh_certs::{Authority, CaStore};
use zmesh_identity::{TrustBundle, TrustDomain};

/// The fixture CA's trust domain (zmesh's default).
pub const TRUST_DOMAIN: &str = "cluster.local";

/// The fixture chain (valid 2020-01-01 to 2099-12-31). `examples/gen_corpus.rs` wrote them.
pub const ROOT_PEM: &str = include_str!("../fixtures/root.pem");
pub const ROOT_KEY_PEM: &str = include_str!("../fixtures/root.key");
pub const INTERMEDIATE_PEM: &str = include_str!("../fixtures/intermediate.pem");
pub const INTERMEDIATE_KEY_PEM: &str = include_str!("../fixtures/intermediate.key");

/// Separates the certificates of a chain (and other parts) in an input: `--8<--`.
pub const SEP: &[u8] = b"--8<--";

/// The time every target validates at: 2026-06-01T00:00:00Z, inside the seeds' validity,
/// so that a crash reproduces whatever day it is replayed.
pub fn fixed_now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_780_272_000)
}

pub fn trust_domain() -> TrustDomain {
    TrustDomain::new(TRUST_DOMAIN).expect("fixture trust domain")
}

fn single_der(pem: &str) -> CertificateDer<'static> {
    let mut certs = zmesh_identity::pem::parse_certs(pem.as_bytes()).expect("fixture PEM");
    assert_eq!(certs.len(), 1, "one certificate per fixture file");
    certs.remove(0)
}

pub fn root_der() -> CertificateDer<'static> {
    single_der(ROOT_PEM)
}

pub fn intermediate_der() -> CertificateDer<'static> {
    single_der(INTERMEDIATE_PEM)
}

/// A bundle trusting the fixture root for `cluster.local`.
pub fn bundle() -> &'static TrustBundle {
    static BUNDLE: LazyLock<TrustBundle> = LazyLock::new(|| {
        let mut b = TrustBundle::new();
        b.add_root(&trust_domain(), root_der())
            .expect("fixture root is a valid root");
        b
    });
    &BUNDLE
}

/// The CA as `zmesh ca serve` loads it, from a state directory holding the fixture chain
/// (written once per process into a private temporary directory, kept until exit).
pub fn authority() -> &'static Authority {
    static AUTHORITY: LazyLock<Authority> = LazyLock::new(|| {
        let dir = tempfile::Builder::new()
            .prefix("zmesh-fuzz-ca")
            .tempdir()
            .expect("temp dir")
            .keep();
        write_ca_state(&dir);
        CaStore::open(&dir)
            .and_then(|s| s.load())
            .expect("the fixture CA state loads")
    });
    &AUTHORITY
}

fn write_ca_state(dir: &Path) {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let private_dir = |p: &Path| {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(p)
            .expect("create CA dir");
        std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .expect("chmod CA dir");
    };
    let write = |p: &Path, text: &str| {
        use std::io::Write;
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(p)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .expect("write CA file");
    };
    private_dir(dir);
    let chain = dir.join("chains").join("1");
    private_dir(&dir.join("chains"));
    private_dir(&chain);
    write(&chain.join("root.pem"), ROOT_PEM);
    write(&chain.join("root.key"), ROOT_KEY_PEM);
    write(&chain.join("intermediate.pem"), INTERMEDIATE_PEM);
    write(&chain.join("intermediate.key"), INTERMEDIATE_KEY_PEM);
    write(
        &dir.join("state.json"),
        r#"{"version":1,"trust_domain":"cluster.local","next_chain":2,"phase":"stable","active":1,"max_leaf_lifetime_secs":86400,"node_cert_lifetime_secs":2592000}"#,
    );
}

/// The `spire` target's input: what the Workload API test server is to send.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SpireInput {
    /// FetchX509SVID's SVIDs.
    #[prost(message, repeated, tag = "1")]
    pub svids: Vec<zmesh_compat::spire::test_server::X509Svid>,
    /// FetchX509Bundles' bundles: `spiffe://<trust domain>` to concatenated DER roots.
    #[prost(map = "string, bytes", tag = "2")]
    pub bundles: std::collections::HashMap<String, Vec<u8>>,
}

/// Splits `data` at every [`SEP`].
pub fn split(data: &[u8]) -> Vec<&[u8]> {
    let mut parts = Vec::new();
    let mut rest = data;
    while let Some(i) = rest.windows(SEP.len()).position(|w| w == SEP) {
        parts.push(&rest[..i]);
        rest = &rest[i + SEP.len()..];
    }
    parts.push(rest);
    parts
}

/// A chain of DER certificates separated by [`SEP`].
pub fn der_chain(data: &[u8]) -> Vec<CertificateDer<'static>> {
    split(data)
        .into_iter()
        .map(|d| CertificateDer::from(d.to_vec()))
        .collect()
}

/// Joins parts with [`SEP`] (for writing seeds).
pub fn join(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(SEP);
        }
        out.extend_from_slice(p);
    }
    out
}

/// Whether the input is PEM text rather than DER.
pub fn looks_like_pem(data: &[u8]) -> bool {
    data.starts_with(b"-----BEGIN")
}
