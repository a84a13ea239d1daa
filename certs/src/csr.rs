//! Parsing and checking PKCS#10 CSRs before anything is signed, and building CSRs for
//! clients (node agents, tests).

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateSigningRequestDer;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::cri_attributes::ParsedCriAttribute;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_SIG_ECDSA_WITH_SHA256,
};
use x509_parser::prelude::FromDer;
use zmesh_identity::{SpiffeId, TrustDomain};

use crate::error::CsrError;

/// A CSR whose signature verified, whose key is ECDSA P-256 and which names exactly one
/// SPIFFE ID of the CA's trust domain (and nothing else).
#[derive(Debug, Clone)]
pub struct VerifiedCsr {
    /// DER SubjectPublicKeyInfo of the requester's key.
    pub(crate) spki_der: Vec<u8>,
    /// The one URI SAN.
    pub id: SpiffeId,
}

/// Checks a PEM CSR against the rules every issued certificate relies on.
pub fn verify_csr(pem: &str, trust_domain: &TrustDomain) -> Result<VerifiedCsr, CsrError> {
    let der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .map_err(|_| CsrError::NotPem)?;
    let (rest, csr) = X509CertificationRequest::from_der(der.as_ref())
        .map_err(|e| CsrError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CsrError::Malformed("trailing bytes after the CSR".into()));
    }

    let spki = &csr.certification_request_info.subject_pki;
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok());
    if spki.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY
        || curve.as_ref() != Some(&OID_EC_P256)
    {
        let what = match curve {
            Some(c) if spki.algorithm.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY => {
                format!("EC key on curve {c}")
            }
            _ => format!("key algorithm {}", spki.algorithm.algorithm),
        };
        return Err(CsrError::UnsupportedKey(what));
    }
    if csr.signature_algorithm.algorithm != OID_SIG_ECDSA_WITH_SHA256 {
        return Err(CsrError::UnsupportedKey(format!(
            "signature algorithm {}",
            csr.signature_algorithm.algorithm
        )));
    }
    csr.verify_signature().map_err(|_| CsrError::BadSignature)?;

    let extension_requests = csr
        .certification_request_info
        .iter_attributes()
        .filter(|a| {
            matches!(
                a.parsed_attribute(),
                ParsedCriAttribute::ExtensionRequest(_)
            )
        })
        .count();
    if extension_requests > 1 {
        return Err(CsrError::Malformed(
            "more than one extensionRequest attribute".into(),
        ));
    }
    let mut uris = Vec::new();
    for ext in csr.requested_extensions().into_iter().flatten() {
        match ext {
            ParsedExtension::SubjectAlternativeName(san) => {
                for name in &san.general_names {
                    match name {
                        GeneralName::URI(uri) => uris.push(*uri),
                        GeneralName::DNSName(_) => return Err(CsrError::ForbiddenSan("DNS")),
                        GeneralName::IPAddress(_) => return Err(CsrError::ForbiddenSan("IP")),
                        GeneralName::RFC822Name(_) => return Err(CsrError::ForbiddenSan("email")),
                        _ => return Err(CsrError::ForbiddenSan("non-URI")),
                    }
                }
            }
            ParsedExtension::ParseError { error } => {
                return Err(CsrError::Malformed(format!("requested extension: {error}")))
            }
            _ => {}
        }
    }
    let [uri] = uris.as_slice() else {
        return Err(CsrError::UriCount(uris.len()));
    };
    let id = SpiffeId::parse(uri).map_err(CsrError::BadSpiffeId)?;
    if id.trust_domain() != trust_domain {
        return Err(CsrError::WrongTrustDomain {
            id: id.to_string(),
            trust_domain: trust_domain.to_string(),
        });
    }
    Ok(VerifiedCsr {
        spki_der: spki.raw.to_vec(),
        id,
    })
}

/// A fresh ECDSA P-256 key and a CSR for `id` (empty subject, one URI SAN).
/// Returns `(key_pem, csr_pem)`.
pub fn new_key_and_csr(id: &SpiffeId) -> Result<(String, String), rcgen::Error> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = vec![rcgen::SanType::URI(id.to_string().try_into()?)];
    let csr = params.serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.pem()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr_with(key: &rcgen::KeyPair, sans: Vec<rcgen::SanType>) -> String {
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.subject_alt_names = sans;
        params.serialize_request(key).unwrap().pem().unwrap()
    }

    fn uri(s: &str) -> rcgen::SanType {
        rcgen::SanType::URI(s.to_string().try_into().unwrap())
    }

    const WEB: &str = "spiffe://cluster.local/ns/default/sa/web";

    #[test]
    fn accepts_a_good_csr() {
        let id = SpiffeId::parse(WEB).unwrap();
        let (_key, csr) = new_key_and_csr(&id).unwrap();
        let verified = verify_csr(&csr, &TrustDomain::default()).unwrap();
        assert_eq!(verified.id, id);
    }

    #[test]
    fn rejects_each_bad_csr() {
        let td = TrustDomain::default();
        let p256 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let cases: Vec<(String, CsrError)> = vec![
            ("garbage".into(), CsrError::NotPem),
            (csr_with(&p256, vec![]), CsrError::UriCount(0)),
            (
                csr_with(
                    &p256,
                    vec![uri(WEB), uri("spiffe://cluster.local/ns/a/sa/b")],
                ),
                CsrError::UriCount(2),
            ),
            (
                csr_with(
                    &p256,
                    vec![uri(WEB), rcgen::SanType::DnsName("web".try_into().unwrap())],
                ),
                CsrError::ForbiddenSan("DNS"),
            ),
            (
                csr_with(
                    &p256,
                    vec![uri(WEB), rcgen::SanType::IpAddress([127, 0, 0, 1].into())],
                ),
                CsrError::ForbiddenSan("IP"),
            ),
            (
                csr_with(
                    &p256,
                    vec![
                        uri(WEB),
                        rcgen::SanType::Rfc822Name("a@b.c".try_into().unwrap()),
                    ],
                ),
                CsrError::ForbiddenSan("email"),
            ),
            (
                csr_with(&p256, vec![uri("spiffe://other.org/ns/default/sa/web")]),
                CsrError::WrongTrustDomain {
                    id: "spiffe://other.org/ns/default/sa/web".into(),
                    trust_domain: "cluster.local".into(),
                },
            ),
            (
                csr_with(&p256, vec![uri("https://cluster.local/x")]),
                CsrError::BadSpiffeId(zmesh_identity::SpiffeIdError::WrongScheme),
            ),
        ];
        for (csr, want) in cases {
            assert_eq!(verify_csr(&csr, &td).unwrap_err(), want, "{csr}");
        }
        for key in [&p384, &ed] {
            let csr = csr_with(key, vec![uri(WEB)]);
            assert!(
                matches!(verify_csr(&csr, &td), Err(CsrError::UnsupportedKey(_))),
                "non-P-256 key accepted"
            );
        }
    }

    #[test]
    fn rejects_a_tampered_signature() {
        let id = SpiffeId::parse(WEB).unwrap();
        let (_key, csr) = new_key_and_csr(&id).unwrap();
        let mut der = CertificateSigningRequestDer::from_pem_slice(csr.as_bytes())
            .unwrap()
            .as_ref()
            .to_vec();
        // Flip a bit inside the URI SAN (part of the signed request info).
        let pos = der.windows(3).position(|w| w == b"web").unwrap();
        der[pos] ^= 0x01;
        let text = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der));
        assert_eq!(
            verify_csr(&text, &TrustDomain::default()).unwrap_err(),
            CsrError::BadSignature
        );
    }
}
