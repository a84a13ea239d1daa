//! Signing chains (root + intermediate) and a loaded, immutable snapshot of the CA
//! (`Authority`) that issues leaves. The snapshot is replaced, never mutated, when the
//! state directory changes (e.g. a root rotation phase).

use std::collections::BTreeMap;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::{CertificateDer, UnixTime};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};
use zmesh_identity::{SpiffeId, TrustDomain};

use crate::csr::VerifiedCsr;
use crate::error::StoreError;
use crate::node::NodeName;

/// How far NotBefore is set in the past, so that peers with slightly slow clocks accept a
/// fresh certificate.
pub const CLOCK_SKEW: Duration = Duration::from_secs(60);
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 86400);
const INTERMEDIATE_LIFETIME: Duration = Duration::from_secs(5 * 365 * 86400);

/// PEM texts of a freshly generated chain, for persisting.
pub(crate) struct GeneratedChain {
    pub root_pem: String,
    pub root_key_pem: String,
    pub intermediate_pem: String,
    pub intermediate_key_pem: String,
}

pub(crate) fn generate_chain(id: u32, td: &TrustDomain) -> Result<GeneratedChain, StoreError> {
    let now = OffsetDateTime::now_utc();
    let td_uri = SanType::URI(td.id_string().try_into()?);

    let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut root = CertificateParams::default();
    root.distinguished_name = ca_name(&format!("zmesh root CA {id}"), td);
    root.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    root.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    root.subject_alt_names = vec![td_uri.clone()];
    root.serial_number = Some(random_serial());
    root.not_before = now - CLOCK_SKEW;
    root.not_after = now + ROOT_LIFETIME;
    let root_cert = root.self_signed(&root_key)?;
    let root_issuer = Issuer::new(root, &root_key);

    let int_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut int = CertificateParams::default();
    int.distinguished_name = ca_name(&format!("zmesh intermediate CA {id}"), td);
    int.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    int.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    int.subject_alt_names = vec![td_uri];
    int.serial_number = Some(random_serial());
    int.use_authority_key_identifier_extension = true;
    int.not_before = now - CLOCK_SKEW;
    int.not_after = now + INTERMEDIATE_LIFETIME;
    let int_cert = int.signed_by(&int_key, &root_issuer)?;

    Ok(GeneratedChain {
        root_pem: root_cert.pem(),
        root_key_pem: root_key.serialize_pem(),
        intermediate_pem: int_cert.pem(),
        intermediate_key_pem: int_key.serialize_pem(),
    })
}

fn ca_name(cn: &str, td: &TrustDomain) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, td.as_str());
    dn.push(DnType::CommonName, cn);
    dn
}

/// A positive, non-zero 128-bit random serial (RFC 5280 allows up to 20 octets).
fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    // aws-lc's RNG only fails if the OS has no entropy source at all.
    aws_lc_rs::rand::fill(&mut bytes).expect("system RNG failed");
    bytes[0] = (bytes[0] & 0x7f).max(1);
    SerialNumber::from_slice(&bytes)
}

/// SHA-256 of `bytes`, lowercase hex.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes).as_ref())
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One root and the intermediate that signs under it, loaded and checked.
pub(crate) struct Chain {
    pub id: u32,
    pub root_der: CertificateDer<'static>,
    pub root_pem: String,
    pub root_fingerprint: String,
    pub root_not_after: OffsetDateTime,
    pub intermediate_pem: String,
    pub intermediate_not_after: OffsetDateTime,
    issuer: Issuer<'static, KeyPair>,
}

impl Chain {
    /// Parses and checks a chain: both certificates are CAs, the root is self-signed and
    /// signed the intermediate, the intermediate key matches, nothing has expired.
    pub(crate) fn load(
        id: u32,
        td: &TrustDomain,
        root_pem: &str,
        intermediate_pem: &str,
        intermediate_key_pem: &str,
    ) -> Result<Self, StoreError> {
        let bad = |reason: String| StoreError::BadChain { chain: id, reason };
        let root_der = single_pem_cert(root_pem).map_err(|e| bad(format!("root: {e}")))?;
        let int_der =
            single_pem_cert(intermediate_pem).map_err(|e| bad(format!("intermediate: {e}")))?;
        let (_, root) = X509Certificate::from_der(&root_der)
            .map_err(|e| bad(format!("root does not parse: {e}")))?;
        let (_, int) = X509Certificate::from_der(&int_der)
            .map_err(|e| bad(format!("intermediate does not parse: {e}")))?;
        let now = OffsetDateTime::now_utc();
        for (name, cert) in [("root", &root), ("intermediate", &int)] {
            if !cert.is_ca() {
                return Err(bad(format!("{name} is not a CA certificate")));
            }
            if cert.validity().not_after.to_datetime() <= now {
                return Err(bad(format!(
                    "{name} expired at {}",
                    cert.validity().not_after
                )));
            }
        }
        root.verify_signature(None)
            .map_err(|_| bad("root is not validly self-signed".into()))?;
        int.verify_signature(Some(root.public_key()))
            .map_err(|_| bad("intermediate is not signed by the root".into()))?;
        let org = int
            .subject()
            .iter_organization()
            .next()
            .and_then(|o| o.as_str().ok());
        if org != Some(td.as_str()) {
            return Err(bad(format!(
                "intermediate belongs to trust domain {org:?}, expected {td}"
            )));
        }
        let key = KeyPair::from_pem(intermediate_key_pem)
            .map_err(|e| bad(format!("intermediate key does not parse: {e}")))?;
        use rcgen::PublicKeyData;
        if key.subject_public_key_info() != int.public_key().raw {
            return Err(bad("intermediate key does not match its certificate".into()));
        }
        let issuer = Issuer::from_ca_cert_der(&int_der, key)
            .map_err(|e| bad(format!("intermediate unusable as issuer: {e}")))?;
        Ok(Self {
            id,
            root_fingerprint: sha256_hex(&root_der),
            root_not_after: root.validity().not_after.to_datetime(),
            intermediate_not_after: int.validity().not_after.to_datetime(),
            root_der,
            root_pem: root_pem.trim_end().to_owned() + "\n",
            intermediate_pem: intermediate_pem.trim_end().to_owned() + "\n",
            issuer,
        })
    }
}

fn single_pem_cert(pem: &str) -> Result<CertificateDer<'static>, String> {
    let blocks = ::pem::parse_many(pem).map_err(|e| e.to_string())?;
    match blocks.as_slice() {
        [one] if one.tag() == "CERTIFICATE" => Ok(CertificateDer::from(one.contents().to_vec())),
        _ => Err(format!(
            "expected one PEM CERTIFICATE, found {} blocks",
            blocks.len()
        )),
    }
}

/// Which kind of leaf to issue; decides EKU and where its lifetime comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeafKind {
    /// Workload SVID: serverAuth + clientAuth.
    Workload,
    /// Node agent credential: clientAuth only.
    Node,
}

/// A freshly issued leaf with everything the response and the ledger need.
#[derive(Debug, Clone)]
pub struct Issued {
    /// `[leaf, intermediate, all roots concatenated]`, PEM: Istio's `cert_chain`.
    pub cert_chain: Vec<String>,
    pub serial: String,
    pub not_after: OffsetDateTime,
    pub chain_id: u32,
    pub root_fingerprint: String,
}

/// Issuance limits, persisted in the state file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Longest workload certificate lifetime; also the lifetime given when a request
    /// asks for none.
    pub max_leaf_lifetime: Duration,
    /// Lifetime of node agent certificates.
    pub node_cert_lifetime: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            max_leaf_lifetime: Duration::from_secs(24 * 3600),
            node_cert_lifetime: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

impl Policy {
    /// The lifetime to grant for a request of `requested_secs` (Istio's
    /// `validity_duration`): clamped to the maximum; zero or negative means the maximum.
    pub fn workload_lifetime(&self, requested_secs: i64) -> Duration {
        match u64::try_from(requested_secs) {
            Ok(0) | Err(_) => self.max_leaf_lifetime,
            Ok(secs) => Duration::from_secs(secs).min(self.max_leaf_lifetime),
        }
    }
}

/// The rotation phase of the root: which chains are trusted and which one signs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Phase {
    /// One root, trusted and signing.
    Stable { active: u32 },
    /// A new root is published in every bundle; the old one still signs.
    Added { old: u32, new: u32 },
    /// The new root signs; the old one is still trusted for leaves it issued.
    Switched { old: u32, new: u32 },
}

impl Phase {
    /// The chain that signs new leaves.
    pub fn signing(&self) -> u32 {
        match *self {
            Phase::Stable { active } => active,
            Phase::Added { old, .. } => old,
            Phase::Switched { new, .. } => new,
        }
    }

    /// The chains whose roots are in the trust bundle, oldest first.
    pub fn bundle(&self) -> Vec<u32> {
        match *self {
            Phase::Stable { active } => vec![active],
            Phase::Added { old, new } | Phase::Switched { old, new } => vec![old, new],
        }
    }

    /// The root being retired, if a rotation is in progress.
    pub fn retiring(&self) -> Option<u32> {
        match *self {
            Phase::Stable { .. } => None,
            Phase::Added { old, .. } | Phase::Switched { old, .. } => Some(old),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Phase::Stable { .. } => "stable",
            Phase::Added { .. } => "add",
            Phase::Switched { .. } => "switch",
        }
    }
}

/// A loaded, validated CA: what a server answers requests from.
pub struct Authority {
    trust_domain: TrustDomain,
    phase: Phase,
    policy: Policy,
    chains: BTreeMap<u32, Chain>,
    bundle_pem: String,
    roots_der: Vec<CertificateDer<'static>>,
}

impl Authority {
    pub(crate) fn new(
        trust_domain: TrustDomain,
        phase: Phase,
        policy: Policy,
        chains: BTreeMap<u32, Chain>,
    ) -> Result<Self, StoreError> {
        let mut bundle_pem = String::new();
        let mut roots_der = Vec::new();
        for id in phase.bundle() {
            let chain = chains.get(&id).ok_or_else(|| StoreError::BadChain {
                chain: id,
                reason: "named by the state file but not loaded".into(),
            })?;
            bundle_pem.push_str(&chain.root_pem);
            roots_der.push(chain.root_der.clone());
        }
        Ok(Self {
            trust_domain,
            phase,
            policy,
            chains,
            bundle_pem,
            roots_der,
        })
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// All trusted roots, PEM, concatenated (the last entry of every `cert_chain`).
    pub fn bundle_pem(&self) -> &str {
        &self.bundle_pem
    }

    /// A chain of the current bundle (callers pass ids from `phase().bundle()`).
    pub(crate) fn chain(&self, id: u32) -> &Chain {
        &self.chains[&id]
    }

    fn signing_chain(&self) -> &Chain {
        // Authority::new checked that every chain of the phase is loaded.
        &self.chains[&self.phase.signing()]
    }

    /// Issues a leaf for a verified CSR. The caller has already decided that the CSR's
    /// identity may be issued; this only builds the certificate.
    pub(crate) fn issue(
        &self,
        csr: &VerifiedCsr,
        kind: LeafKind,
        lifetime: Duration,
    ) -> Result<Issued, rcgen::Error> {
        let public_key = rcgen::SubjectPublicKeyInfo::from_der(&csr.spki_der)?;
        let san = SanType::URI(csr.id.to_string().try_into()?);
        let eku = match kind {
            LeafKind::Workload => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            LeafKind::Node => vec![ExtendedKeyUsagePurpose::ClientAuth],
        };
        self.sign_leaf(&public_key, vec![san], eku, lifetime)
    }

    /// Issues the CA's own TLS serving certificate for `names` (DNS names or IPs) with a
    /// new key. Returns the issued chain and the key (PKCS#8 DER).
    pub(crate) fn issue_server(
        &self,
        names: &[String],
        lifetime: Duration,
    ) -> Result<(Issued, Vec<u8>), rcgen::Error> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let sans = CertificateParams::new(names.to_vec())?.subject_alt_names;
        let issued = self.sign_leaf(
            &key,
            sans,
            vec![ExtendedKeyUsagePurpose::ServerAuth],
            lifetime,
        )?;
        Ok((issued, key.serialize_der()))
    }

    fn sign_leaf(
        &self,
        public_key: &impl rcgen::PublicKeyData,
        sans: Vec<SanType>,
        eku: Vec<ExtendedKeyUsagePurpose>,
        lifetime: Duration,
    ) -> Result<Issued, rcgen::Error> {
        let chain = self.signing_chain();
        let now = OffsetDateTime::now_utc();
        let serial = random_serial();
        let mut params = CertificateParams::default();
        // Empty subject: the identity is the SAN, which rcgen then marks critical.
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = eku;
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(serial.clone());
        params.not_before = now - CLOCK_SKEW;
        params.not_after = (now + lifetime).min(chain.intermediate_not_after);
        let cert = params.signed_by(public_key, &chain.issuer)?;
        Ok(Issued {
            cert_chain: vec![
                cert.pem(),
                chain.intermediate_pem.clone(),
                self.bundle_pem.clone(),
            ],
            serial: hex(&serial.to_bytes()),
            not_after: params.not_after,
            chain_id: chain.id,
            root_fingerprint: chain.root_fingerprint.clone(),
        })
    }

    /// Checks a client certificate chain against the current bundle and returns the node
    /// it identifies. Used both in the TLS handshake and again per request, so a
    /// connection opened before a root was dropped cannot keep using it.
    pub fn verify_node_chain(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<NodeName, String> {
        let anchors: Vec<_> = self
            .roots_der
            .iter()
            .map(|r| webpki::anchor_from_trusted_cert(r).map_err(|e| e.to_string()))
            .collect::<Result<_, _>>()?;
        let ee = webpki::EndEntityCert::try_from(end_entity).map_err(|e| e.to_string())?;
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(|e| format!("client certificate does not chain to the CA bundle: {e}"))?;
        let (_, cert) = X509Certificate::from_der(end_entity).map_err(|e| e.to_string())?;
        let uris: Vec<&str> = cert
            .subject_alternative_name()
            .ok()
            .flatten()
            .map(|san| {
                san.value
                    .general_names
                    .iter()
                    .filter_map(|n| match n {
                        x509_parser::extensions::GeneralName::URI(u) => Some(*u),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let [uri] = uris.as_slice() else {
            return Err(format!(
                "client certificate has {} URI SANs, expected one",
                uris.len()
            ));
        };
        let id = SpiffeId::parse(uri).map_err(|e| format!("client certificate URI: {e}"))?;
        NodeName::from_spiffe_id(&id, &self.trust_domain)
            .ok_or_else(|| format!("client certificate {id} is not a zmesh node identity"))
    }
}
