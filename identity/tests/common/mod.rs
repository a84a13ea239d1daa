//! Certificate fixtures built with rcgen at test time.
#![allow(dead_code)] // each test binary uses a different part

use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;
use zmesh_identity::{TrustBundle, TrustDomain};

pub fn td(name: &str) -> TrustDomain {
    TrustDomain::new(name).unwrap()
}

fn serial() -> SerialNumber {
    SerialNumber::from(rand::random::<u64>() >> 1)
}

/// A signing certificate (root or intermediate) and its key.
pub struct Ca {
    pub params: CertificateParams,
    pub key: KeyPair,
    pub der: CertificateDer<'static>,
    pub pem: String,
}

impl Ca {
    pub fn root(name: &str) -> Ca {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let params = ca_params(name);
        let cert = params.self_signed(&key).unwrap();
        Ca {
            der: cert.der().clone(),
            pem: cert.pem(),
            params,
            key,
        }
    }

    pub fn intermediate(&self, name: &str) -> Ca {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let params = ca_params(name);
        let cert = params.signed_by(&key, &self.issuer()).unwrap();
        Ca {
            der: cert.der().clone(),
            pem: cert.pem(),
            params,
            key,
        }
    }

    pub fn issuer(&self) -> Issuer<'_, &KeyPair> {
        Issuer::from_params(&self.params, &self.key)
    }

    /// A bundle trusting this CA for `trust_domain`.
    pub fn bundle(&self, trust_domain: &str) -> TrustBundle {
        let mut b = TrustBundle::new();
        b.add_root(&td(trust_domain), self.der.clone()).unwrap();
        b
    }
}

fn ca_params(name: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::OrganizationName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.not_before = OffsetDateTime::now_utc() - Duration::from_secs(3600);
    p.not_after = OffsetDateTime::now_utc() + Duration::from_secs(365 * 86400);
    p.serial_number = Some(serial());
    p
}

/// Leaf parameters that make a valid X.509-SVID for `id`; tests then break one rule.
pub fn svid_params(id: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.subject_alt_names = vec![uri(id)];
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.not_before = OffsetDateTime::now_utc() - Duration::from_secs(60);
    p.not_after = OffsetDateTime::now_utc() + Duration::from_secs(3600);
    p.serial_number = Some(serial());
    p
}

pub fn uri(s: &str) -> SanType {
    SanType::URI(rcgen::string::Ia5String::try_from(s.to_owned()).unwrap())
}

/// A keyUsage extension with digitalSignature only, not marked critical.
pub fn noncritical_key_usage() -> CustomExtension {
    // BIT STRING, 7 unused bits, 0x80 = digitalSignature.
    CustomExtension::from_oid_content(&[2, 5, 29, 15], vec![0x03, 0x02, 0x07, 0x80])
}

/// A subjectAltName extension with one URI, not marked critical.
pub fn noncritical_uri_san(id: &str) -> CustomExtension {
    let uri = id.as_bytes();
    assert!(uri.len() < 126, "short-form DER lengths only");
    let mut content = vec![0x30, (uri.len() + 2) as u8, 0x86, uri.len() as u8];
    content.extend_from_slice(uri);
    CustomExtension::from_oid_content(&[2, 5, 29, 17], content)
}

pub struct Leaf {
    pub der: CertificateDer<'static>,
    pub pem: String,
    pub key: KeyPair,
}

pub fn sign_leaf(params: &CertificateParams, issuer: &Ca) -> Leaf {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = params.signed_by(&key, &issuer.issuer()).unwrap();
    Leaf {
        der: cert.der().clone(),
        pem: cert.pem(),
        key,
    }
}

pub fn svid(id: &str, issuer: &Ca) -> Leaf {
    sign_leaf(&svid_params(id), issuer)
}

/// The key and chain (leaf + intermediates) a TLS endpoint presents.
pub fn certified_key(leaf: &Leaf, intermediates: &[&Ca]) -> Arc<CertifiedKey> {
    let mut chain = vec![leaf.der.clone()];
    chain.extend(intermediates.iter().map(|c| c.der.clone()));
    let private = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf.key.serialize_der()));
    let provider = zmesh_identity::tls::crypto_provider();
    Arc::new(CertifiedKey::from_der(chain, private, &provider).unwrap())
}
