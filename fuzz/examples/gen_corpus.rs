//! Writes the binary seeds of the committed corpus (svid, csr, ca_grpc, zds) and, with
//! `--fixtures`, a new fixture CA (which invalidates every seed signed by the old one: run
//! it again without the flag afterwards).
//!
//! ```text
//! cd fuzz && cargo +nightly run --example gen_corpus [-- --fixtures]
//! ```
//!
//! The text seeds (YAML, SPIFFE IDs...) are plain files under corpus/ edited by hand.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use prost::Message;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
    IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::OffsetDateTime;
use zmesh_certs::pb::istio::IstioCertificateRequest;
use zmesh_certs::pb::zmesh::{JoinRequest, RenewRequest};
use zmesh_compat::spire::test_server::X509Svid;
use zmesh_fuzz::{join, SpireInput, INTERMEDIATE_KEY_PEM, INTERMEDIATE_PEM, ROOT_PEM};

/// Concatenated DER, as the Workload API carries chains and bundles.
fn join_der(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

fn at(unix: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(unix).unwrap()
}

/// 2020-01-01 and 2099-12-31: the fixture CA's validity.
const FROM: i64 = 1_577_836_800;
const UNTIL: i64 = 4_102_358_400;

fn fuzz_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.to_string().try_into().unwrap())
}

fn ca_params(cn: &str, path_len: u8) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name
        .push(DnType::OrganizationName, zmesh_fuzz::TRUST_DOMAIN);
    p.distinguished_name.push(DnType::CommonName, cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.subject_alt_names = vec![uri("spiffe://cluster.local")];
    p.not_before = at(FROM);
    p.not_after = at(UNTIL);
    p
}

fn write_fixtures(dir: &Path) {
    let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut root = ca_params("zmesh fuzz root", 1);
    root.serial_number = Some(SerialNumber::from(1u64));
    let root_cert = root.self_signed(&root_key).unwrap();
    let root_issuer = Issuer::new(root, &root_key);
    let int_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut int = ca_params("zmesh fuzz intermediate", 0);
    int.serial_number = Some(SerialNumber::from(2u64));
    int.use_authority_key_identifier_extension = true;
    let int_cert = int.signed_by(&int_key, &root_issuer).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("root.pem"), root_cert.pem()).unwrap();
    std::fs::write(dir.join("root.key"), root_key.serialize_pem()).unwrap();
    std::fs::write(dir.join("intermediate.pem"), int_cert.pem()).unwrap();
    std::fs::write(dir.join("intermediate.key"), int_key.serialize_pem()).unwrap();
    println!("wrote a new fixture CA to {}", dir.display());
}

struct Leaf {
    sans: Vec<SanType>,
    ca: bool,
    key_usage: bool,
    eku: Vec<ExtendedKeyUsagePurpose>,
    not_before: i64,
    not_after: i64,
}

impl Leaf {
    fn workload(id: &str) -> Leaf {
        Leaf {
            sans: vec![uri(id)],
            ca: false,
            key_usage: true,
            eku: vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            // 2026-05-31 to 2026-06-02, around zmesh_fuzz::fixed_now().
            not_before: 1_780_185_600,
            not_after: 1_780_358_400,
        }
    }

    fn node(name: &str) -> Leaf {
        Leaf {
            eku: vec![ExtendedKeyUsagePurpose::ClientAuth],
            ..Leaf::workload(&format!("spiffe://cluster.local/zmesh/node/{name}"))
        }
    }

    /// Signed by the fixture intermediate; DER.
    fn sign(self) -> Vec<u8> {
        self.sign_with_key().0
    }

    /// The certificate (DER) and its PKCS#8 key (DER).
    fn sign_with_key(self) -> (Vec<u8>, Vec<u8>) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = self.sans;
        p.is_ca = if self.ca {
            IsCa::Ca(BasicConstraints::Unconstrained)
        } else {
            IsCa::ExplicitNoCa
        };
        if self.key_usage {
            p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        }
        p.extended_key_usages = self.eku;
        p.use_authority_key_identifier_extension = true;
        p.serial_number = Some(SerialNumber::from(rand_serial()));
        p.not_before = at(self.not_before);
        p.not_after = at(self.not_after);
        let int_key = KeyPair::from_pem(INTERMEDIATE_KEY_PEM).unwrap();
        let issuer = Issuer::from_ca_cert_pem(INTERMEDIATE_PEM, int_key).unwrap();
        let cert = p.signed_by(&key, &issuer).unwrap().der().to_vec();
        (cert, key.serialize_der())
    }
}

fn rand_serial() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    (t >> 1) | 1
}

fn pem_cert(der: &[u8]) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()))
}

fn csr(alg: &'static rcgen::SignatureAlgorithm, sans: Vec<SanType>) -> Vec<u8> {
    let key = KeyPair::generate_for(alg).unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.subject_alt_names = sans;
    p.serialize_request(&key).unwrap().der().to_vec()
}

fn csr_pem(der: &[u8]) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der.to_vec()))
}

struct Out(PathBuf);

impl Out {
    fn target(name: &str) -> Out {
        let dir = fuzz_dir().join("corpus").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        Out(dir)
    }

    fn put(&self, name: &str, bytes: impl AsRef<[u8]>) {
        std::fs::write(self.0.join(name), bytes).unwrap();
    }
}

const WEB: &str = "spiffe://cluster.local/ns/default/sa/web";

fn main() {
    if std::env::args().any(|a| a == "--fixtures") {
        write_fixtures(&fuzz_dir().join("fixtures"));
        println!("now run this again without --fixtures (the seeds must be signed by it)");
        return;
    }
    let root = pem::parse(ROOT_PEM).unwrap().into_contents();
    let int = pem::parse(INTERMEDIATE_PEM).unwrap().into_contents();

    // svid: DER chains (leaf first) separated by --8<--, or PEM text.
    let svid = Out::target("svid");
    let good = Leaf::workload(WEB).sign();
    svid.put("good-chain", join(&[&good, &int]));
    svid.put("good-chain-with-root", join(&[&good, &int, &root]));
    svid.put("leaf-only", &good);
    svid.put(
        "expired",
        join(&[
            &Leaf {
                not_before: 1_700_000_000,
                not_after: 1_700_086_400,
                ..Leaf::workload(WEB)
            }
            .sign(),
            &int,
        ]),
    );
    svid.put(
        "leaf-is-ca",
        join(&[
            &Leaf {
                ca: true,
                ..Leaf::workload(WEB)
            }
            .sign(),
            &int,
        ]),
    );
    svid.put(
        "no-key-usage",
        join(&[
            &Leaf {
                key_usage: false,
                eku: vec![],
                ..Leaf::workload(WEB)
            }
            .sign(),
            &int,
        ]),
    );
    svid.put(
        "two-uris",
        join(&[
            &Leaf {
                sans: vec![uri(WEB), uri("spiffe://cluster.local/ns/a/sa/b")],
                ..Leaf::workload(WEB)
            }
            .sign(),
            &int,
        ]),
    );
    svid.put(
        "foreign-td",
        join(&[&Leaf::workload("spiffe://other.org/ns/x/sa/y").sign(), &int]),
    );
    svid.put("node-cert", join(&[&Leaf::node("node-a").sign(), &int]));
    svid.put("pem-chain", pem_cert(&good) + &pem_cert(&int));
    svid.put("truncated", &good[..good.len() / 2]);

    // csr: DER, or PEM text.
    let csrs = Out::target("csr");
    let web = csr(&rcgen::PKCS_ECDSA_P256_SHA256, vec![uri(WEB)]);
    csrs.put("good.der", &web);
    csrs.put("good.pem", csr_pem(&web));
    csrs.put(
        "dns-san.der",
        csr(
            &rcgen::PKCS_ECDSA_P256_SHA256,
            vec![uri(WEB), SanType::DnsName("web".try_into().unwrap())],
        ),
    );
    csrs.put(
        "p384.der",
        csr(&rcgen::PKCS_ECDSA_P384_SHA384, vec![uri(WEB)]),
    );
    csrs.put(
        "ed25519.der",
        csr(&rcgen::PKCS_ED25519, vec![uri(WEB)]),
    );
    csrs.put(
        "wrong-td.der",
        csr(
            &rcgen::PKCS_ECDSA_P256_SHA256,
            vec![uri("spiffe://other.org/ns/default/sa/web")],
        ),
    );
    csrs.put(
        "two-uris.der",
        csr(
            &rcgen::PKCS_ECDSA_P256_SHA256,
            vec![uri(WEB), uri("spiffe://cluster.local/ns/a/sa/b")],
        ),
    );
    csrs.put("no-san.der", csr(&rcgen::PKCS_ECDSA_P256_SHA256, vec![]));

    // ca_grpc: one mode byte (0 CreateCertificate, 1 Join, 2 Renew, 3 a node's client
    // certificate chain), then the protobuf request body (or the DER chain).
    let grpc = Out::target("ca_grpc");
    let with_mode = |mode: u8, body: Vec<u8>| [vec![mode], body].concat();
    let web_pem = csr_pem(&web);
    let node_csr = csr_pem(&csr(
        &rcgen::PKCS_ECDSA_P256_SHA256,
        vec![uri("spiffe://cluster.local/zmesh/node/node-a")],
    ));
    let metadata = |v: prost_types::value::Kind| prost_types::Struct {
        fields: [(
            "ImpersonatedIdentity".to_string(),
            prost_types::Value { kind: Some(v) },
        )]
        .into(),
    };
    grpc.put(
        "create",
        with_mode(
            0,
            IstioCertificateRequest {
                csr: web_pem.clone(),
                validity_duration: 3600,
                metadata: Some(metadata(prost_types::value::Kind::StringValue(WEB.into()))),
            }
            .encode_to_vec(),
        ),
    );
    grpc.put(
        "create-bad-metadata",
        with_mode(
            0,
            IstioCertificateRequest {
                csr: web_pem.clone(),
                validity_duration: -1,
                metadata: Some(metadata(prost_types::value::Kind::NumberValue(1.0))),
            }
            .encode_to_vec(),
        ),
    );
    grpc.put(
        "join",
        with_mode(
            1,
            JoinRequest {
                token: "zmj_0123456789abcdef".into(),
                csr: node_csr.clone(),
            }
            .encode_to_vec(),
        ),
    );
    grpc.put(
        "renew",
        with_mode(2, RenewRequest { csr: node_csr }.encode_to_vec()),
    );
    grpc.put(
        "node-chain",
        with_mode(3, join(&[&Leaf::node("node-a").sign(), &int])),
    );
    grpc.put("workload-chain", with_mode(3, join(&[&good, &int])));

    // zds: packets from "ztunnel", each a length byte (bit 7: attach an fd) and the bytes.
    // Hello V1 = 08 01; an empty ack = 0a 00; an ack with error "no" = 0a 04 0a 02 6e 6f.
    let zds = Out::target("zds");
    zds.put("accepted", [2, 0x08, 0x01, 2, 0x0a, 0x00, 2, 0x0a, 0x00]);
    zds.put("bad-version", [2, 0x08, 0x02]);
    zds.put(
        "nack-add",
        [2, 0x08, 0x01, 6, 0x0a, 0x04, 0x0a, 0x02, b'n', b'o', 2, 0x0a, 0x00],
    );
    zds.put(
        "nack-snapshot",
        [2, 0x08, 0x01, 2, 0x0a, 0x00, 6, 0x0a, 0x04, 0x0a, 0x02, b'n', b'o'],
    );
    zds.put("ack-with-fd", [2, 0x08, 0x01, 0x82, 0x0a, 0x00]);
    zds.put("no-ack", [2, 0x08, 0x01, 1, 0x10]);
    zds.put("hangs-up", [2, 0x08, 0x01]);
    // spire: what the Workload API serves (zmesh_fuzz::SpireInput). SVIDs are checked at
    // the real time here, so these are valid for the fixture CA's whole lifetime.
    let spire = Out::target("spire");
    let long = |l: Leaf| Leaf {
        not_before: FROM,
        not_after: UNTIL,
        ..l
    };
    let (cert, key) = long(Leaf::workload(WEB)).sign_with_key();
    let svid = |id: &str, cert: &[u8], key: &[u8]| X509Svid {
        spiffe_id: id.into(),
        x509_svid: join_der(&[cert, &int]),
        x509_svid_key: key.to_vec(),
        bundle: root.clone(),
        hint: String::new(),
    };
    let bundles: HashMap<String, Vec<u8>> =
        [("spiffe://cluster.local".to_string(), root.clone())].into();
    let input = |svids: Vec<X509Svid>, bundles: HashMap<String, Vec<u8>>| {
        SpireInput { svids, bundles }.encode_to_vec()
    };
    spire.put("good", input(vec![svid(WEB, &cert, &key)], bundles.clone()));
    let (_, other_key) = long(Leaf::workload(WEB)).sign_with_key();
    spire.put(
        "key-mismatch",
        input(vec![svid(WEB, &cert, &other_key)], bundles.clone()),
    );
    spire.put(
        "id-mismatch",
        input(
            vec![svid("spiffe://cluster.local/ns/default/sa/api", &cert, &key)],
            HashMap::new(),
        ),
    );
    let mut two_roots = root.clone();
    two_roots.extend_from_slice(&int);
    spire.put(
        "bundles-only",
        input(
            vec![],
            [
                ("spiffe://cluster.local".to_string(), two_roots),
                ("spiffe://other.org".to_string(), root[..root.len() - 3].to_vec()),
                ("not a trust domain".to_string(), root.clone()),
            ]
            .into(),
        ),
    );
    println!("wrote the binary seeds under {}", fuzz_dir().join("corpus").display());
}
