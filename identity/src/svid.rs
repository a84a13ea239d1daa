//! X.509-SVID validation: the SPIFFE rules on the leaf (x509-parser) and RFC 5280 path
//! validation to a root of the leaf's trust domain (webpki).
//!
//! Two entry points: [`verify_svid`] stops at the first violation (TLS handshakes), and
//! [`lint_chain`] reports every violation (the `zmesh certs inspect` command).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::{CertificateDer, UnixTime};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use crate::bundle::TrustBundle;
use crate::{SpiffeId, SpiffeIdError, TrustDomain};

/// One violated X.509-SVID rule. Each variant has a stable [`SvidError::rule_name`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SvidError {
    #[error("the certificate chain is empty")]
    EmptyChain,
    #[error("certificate #{index} of the chain is not valid X.509: {reason}")]
    Malformed { index: usize, reason: String },
    #[error("the leaf has {0} URI SANs; an X.509-SVID has exactly one")]
    UriSanCount(usize),
    #[error("the leaf's URI SAN {uri:?} is not a valid SPIFFE ID: {source}")]
    InvalidSpiffeId { uri: String, source: SpiffeIdError },
    #[error(
        "the leaf's SPIFFE ID {0} has no path; only signing certificates carry a trust-domain ID"
    )]
    IdWithoutPath(SpiffeId),
    #[error("the leaf is a CA certificate (basicConstraints cA=true)")]
    LeafIsCa,
    #[error("the leaf has no keyUsage extension")]
    KeyUsageMissing,
    #[error("the leaf's keyUsage extension is not critical")]
    KeyUsageNotCritical,
    #[error("the leaf's keyUsage lacks digitalSignature")]
    KeyUsageNoDigitalSignature,
    #[error(
        "the leaf's keyUsage has keyCertSign or cRLSign, which only signing certificates may have"
    )]
    KeyUsageCertSign,
    #[error("the leaf's extendedKeyUsage lacks {0}")]
    ExtKeyUsageMissing(&'static str),
    #[error("the leaf's subject is empty but its subjectAltName extension is not critical")]
    SanNotCritical,
    #[error("the leaf expired at {}", fmt_time(*.not_after))]
    Expired { not_after: SystemTime },
    #[error("the leaf is not valid before {}", fmt_time(*.not_before))]
    NotYetValid { not_before: SystemTime },
    #[error("signing certificate #{index} carries SPIFFE ID {id:?}, which must have no path")]
    SigningCertIdHasPath { index: usize, id: String },
    #[error("the trust bundle has no roots for trust domain {0}")]
    UnknownTrustDomain(TrustDomain),
    #[error("the chain does not lead to a trusted root of {trust_domain}: {reason}")]
    Untrusted {
        trust_domain: TrustDomain,
        reason: String,
    },
    #[error("peer {id} is not in trust domain {expected}")]
    WrongTrustDomain { id: SpiffeId, expected: TrustDomain },
    #[error("peer {id} is not one of the identities expected here ({expected})")]
    UnexpectedIdentity { id: SpiffeId, expected: String },
}

impl SvidError {
    /// A stable name for the rule, for CLI output, metrics and logs.
    pub fn rule_name(&self) -> &'static str {
        match self {
            Self::EmptyChain => "svid.empty-chain",
            Self::Malformed { .. } => "svid.malformed",
            Self::UriSanCount(_) => "svid.uri-san-count",
            Self::InvalidSpiffeId { .. } => "svid.spiffe-id",
            Self::IdWithoutPath(_) => "svid.spiffe-id-path",
            Self::LeafIsCa => "svid.leaf-is-ca",
            Self::KeyUsageMissing => "svid.key-usage-missing",
            Self::KeyUsageNotCritical => "svid.key-usage-critical",
            Self::KeyUsageNoDigitalSignature => "svid.key-usage-digital-signature",
            Self::KeyUsageCertSign => "svid.key-usage-cert-sign",
            Self::ExtKeyUsageMissing(_) => "svid.ext-key-usage",
            Self::SanNotCritical => "svid.san-critical",
            Self::Expired { .. } => "svid.expired",
            Self::NotYetValid { .. } => "svid.not-yet-valid",
            Self::SigningCertIdHasPath { .. } => "svid.signing-cert-id-path",
            Self::UnknownTrustDomain(_) => "svid.trust-domain-unknown",
            Self::Untrusted { .. } => "svid.untrusted-chain",
            Self::WrongTrustDomain { .. } => "svid.wrong-trust-domain",
            Self::UnexpectedIdentity { .. } => "svid.unexpected-identity",
        }
    }
}

/// A leaf that passed every rule and chains to the bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedSvid {
    pub id: SpiffeId,
    pub not_after: SystemTime,
}

/// Which extended key usage path validation demands (webpki checks it on every
/// certificate of the path that has the extension).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Usage {
    ServerAuth,
    ClientAuth,
}

/// Verifies `chain` (leaf first, then intermediates; a trailing root is tolerated) as an
/// X.509-SVID at `now` and returns its SPIFFE ID. Stops at the first violated rule.
pub fn verify_svid(
    chain: &[CertificateDer<'_>],
    bundle: &TrustBundle,
    now: SystemTime,
) -> Result<VerifiedSvid, SvidError> {
    verify_for(chain, bundle, now, Usage::ClientAuth)
}

pub(crate) fn verify_for(
    chain: &[CertificateDer<'_>],
    bundle: &TrustBundle,
    now: SystemTime,
    usage: Usage,
) -> Result<VerifiedSvid, SvidError> {
    let leaf_der = chain.first().ok_or(SvidError::EmptyChain)?;
    let leaf = parse(leaf_der, 0)?;
    let facts = leaf_rules(&leaf, now);
    if let Some(first) = facts.violations.into_iter().next() {
        return Err(first);
    }
    // leaf_rules reports a violation whenever it finds no usable ID.
    let id = facts.id.ok_or(SvidError::UriSanCount(0))?;
    for (i, der) in chain.iter().enumerate().skip(1) {
        let cert = parse(der, i)?;
        if let Some(v) = signing_cert_violation(&cert, i) {
            return Err(v);
        }
    }
    verify_path(chain, id.trust_domain(), bundle, now, usage)
        .map_err(|e| e.into_svid(id.trust_domain()))?;
    Ok(VerifiedSvid {
        id,
        not_after: facts.not_after,
    })
}

/// Every violation found in `chain`: all leaf rules, the signing certificates' ID rule,
/// and (when a bundle is given and the leaf has a usable ID) path validation.
pub fn lint_chain(
    chain: &[CertificateDer<'_>],
    bundle: Option<&TrustBundle>,
    now: SystemTime,
) -> Vec<SvidError> {
    let Some(leaf_der) = chain.first() else {
        return vec![SvidError::EmptyChain];
    };
    let leaf = match parse(leaf_der, 0) {
        Ok(c) => c,
        Err(e) => return vec![e],
    };
    let LeafFacts {
        id,
        not_before,
        not_after,
        violations,
    } = leaf_rules(&leaf, now);
    let mut out = violations;
    let mut intermediates_ok = true;
    for (i, der) in chain.iter().enumerate().skip(1) {
        match parse(der, i) {
            Ok(cert) => out.extend(signing_cert_violation(&cert, i)),
            Err(e) => {
                intermediates_ok = false;
                out.push(e);
            }
        }
    }
    if let (Some(bundle), Some(id)) = (bundle, id) {
        if intermediates_ok {
            // The leaf's own validity is reported by the leaf rules; judge the path at a
            // time the leaf is valid so that the two findings stay independent.
            let at = if now < not_before {
                not_before
            } else if now > not_after && not_after >= not_before {
                not_after
            } else {
                now
            };
            match verify_path(chain, id.trust_domain(), bundle, at, Usage::ClientAuth) {
                Ok(()) => {}
                // webpki restating a leaf rule already reported adds nothing.
                Err(PathError::Webpki(webpki::Error::CaUsedAsEndEntity))
                    if out.contains(&SvidError::LeafIsCa) => {}
                Err(PathError::Webpki(webpki::Error::RequiredEkuNotFoundContext(_)))
                    if out
                        .iter()
                        .any(|e| matches!(e, SvidError::ExtKeyUsageMissing(_))) => {}
                Err(e) => out.push(e.into_svid(id.trust_domain())),
            }
        }
    }
    out
}

/// What one certificate says, for display.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub subject: String,
    pub issuer: String,
    /// Colon-separated hex, as openssl prints it.
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub is_ca: bool,
    pub uri_sans: Vec<String>,
}

/// Describes one certificate (any certificate, not only SVIDs).
pub fn describe(der: &CertificateDer<'_>) -> Result<CertInfo, SvidError> {
    let cert = parse(der, 0)?;
    let uri_sans = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some((*u).to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(CertInfo {
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        serial: cert.raw_serial_as_string(),
        not_before: to_system_time(cert.validity().not_before.timestamp()),
        not_after: to_system_time(cert.validity().not_after.timestamp()),
        is_ca: cert.is_ca(),
        uri_sans,
    })
}

/// The SPIFFE ID of an already verified leaf (e.g. a TLS peer's), without re-checking
/// the other rules.
pub(crate) fn leaf_spiffe_id(der: &CertificateDer<'_>) -> Option<SpiffeId> {
    let cert = parse(der, 0).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    let uri = uris.next()?;
    if uris.next().is_some() {
        return None;
    }
    SpiffeId::parse(uri).ok()
}

fn parse<'a>(der: &'a CertificateDer<'_>, index: usize) -> Result<X509Certificate<'a>, SvidError> {
    match x509_parser::parse_x509_certificate(der) {
        Ok((rest, _)) if !rest.is_empty() => Err(SvidError::Malformed {
            index,
            reason: format!("{} trailing bytes after the certificate", rest.len()),
        }),
        Ok((_, cert)) => Ok(cert),
        Err(e) => Err(SvidError::Malformed {
            index,
            reason: e.to_string(),
        }),
    }
}

struct LeafFacts {
    id: Option<SpiffeId>,
    not_before: SystemTime,
    not_after: SystemTime,
    violations: Vec<SvidError>,
}

/// Checks every leaf rule. `id` is set only when the URI SAN rules all pass.
fn leaf_rules(cert: &X509Certificate<'_>, now: SystemTime) -> LeafFacts {
    let mut v = Vec::new();
    let malformed = |reason: x509_parser::error::X509Error| SvidError::Malformed {
        index: 0,
        reason: reason.to_string(),
    };

    // URI SAN: exactly one, a SPIFFE ID with a path.
    let mut id = None;
    match cert.subject_alternative_name() {
        Err(e) => v.push(malformed(e)),
        Ok(san) => {
            let uris: Vec<&str> = san
                .iter()
                .flat_map(|s| s.value.general_names.iter())
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect();
            match uris.as_slice() {
                [uri] => match SpiffeId::parse(uri) {
                    Ok(parsed) if parsed.path().is_empty() => {
                        v.push(SvidError::IdWithoutPath(parsed))
                    }
                    Ok(parsed) => id = Some(parsed),
                    Err(source) => v.push(SvidError::InvalidSpiffeId {
                        uri: (*uri).to_owned(),
                        source,
                    }),
                },
                other => v.push(SvidError::UriSanCount(other.len())),
            }
            let subject_empty = cert.subject().iter().next().is_none();
            if subject_empty && san.as_ref().is_some_and(|s| !s.critical) {
                v.push(SvidError::SanNotCritical);
            }
        }
    }

    match cert.basic_constraints() {
        Err(e) => v.push(malformed(e)),
        Ok(Some(bc)) if bc.value.ca => v.push(SvidError::LeafIsCa),
        Ok(_) => {}
    }

    match cert.key_usage() {
        Err(e) => v.push(malformed(e)),
        Ok(None) => v.push(SvidError::KeyUsageMissing),
        Ok(Some(ku)) => {
            if !ku.critical {
                v.push(SvidError::KeyUsageNotCritical);
            }
            if !ku.value.digital_signature() {
                v.push(SvidError::KeyUsageNoDigitalSignature);
            }
            if ku.value.key_cert_sign() || ku.value.crl_sign() {
                v.push(SvidError::KeyUsageCertSign);
            }
        }
    }

    match cert.extended_key_usage() {
        Err(e) => v.push(malformed(e)),
        Ok(None) => {}
        Ok(Some(eku)) => match (eku.value.server_auth, eku.value.client_auth) {
            (true, true) => {}
            (true, false) => v.push(SvidError::ExtKeyUsageMissing("clientAuth")),
            (false, true) => v.push(SvidError::ExtKeyUsageMissing("serverAuth")),
            (false, false) => v.push(SvidError::ExtKeyUsageMissing("serverAuth and clientAuth")),
        },
    }

    let not_before = to_system_time(cert.validity().not_before.timestamp());
    let not_after = to_system_time(cert.validity().not_after.timestamp());
    if now < not_before {
        v.push(SvidError::NotYetValid { not_before });
    } else if now > not_after {
        v.push(SvidError::Expired { not_after });
    }

    LeafFacts {
        id: if v.iter().any(is_id_rule) { None } else { id },
        not_before,
        not_after,
        violations: v,
    }
}

fn is_id_rule(e: &SvidError) -> bool {
    matches!(
        e,
        SvidError::UriSanCount(_) | SvidError::InvalidSpiffeId { .. } | SvidError::IdWithoutPath(_)
    )
}

/// A signing certificate may carry a SPIFFE ID, but only a trust-domain ID (no path).
fn signing_cert_violation(cert: &X509Certificate<'_>, index: usize) -> Option<SvidError> {
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        GeneralName::URI(u) if u.starts_with("spiffe://") => {
            let has_path = SpiffeId::parse(u).map_or(true, |id| !id.path().is_empty());
            has_path.then(|| SvidError::SigningCertIdHasPath {
                index,
                id: (*u).to_owned(),
            })
        }
        _ => None,
    })
}

/// Why path validation failed, before it becomes an [`SvidError`].
enum PathError {
    UnknownTrustDomain,
    Webpki(webpki::Error),
}

impl PathError {
    fn into_svid(self, trust_domain: &TrustDomain) -> SvidError {
        match self {
            Self::UnknownTrustDomain => SvidError::UnknownTrustDomain(trust_domain.clone()),
            Self::Webpki(e) => SvidError::Untrusted {
                trust_domain: trust_domain.clone(),
                reason: webpki_reason(&e),
            },
        }
    }
}

fn verify_path(
    chain: &[CertificateDer<'_>],
    trust_domain: &TrustDomain,
    bundle: &TrustBundle,
    now: SystemTime,
    usage: Usage,
) -> Result<(), PathError> {
    let anchors = bundle
        .anchors(trust_domain)
        .ok_or(PathError::UnknownTrustDomain)?;
    let leaf = webpki::EndEntityCert::try_from(&chain[0]).map_err(PathError::Webpki)?;
    let provider = crate::tls::crypto_provider();
    let eku = match usage {
        Usage::ServerAuth => webpki::KeyUsage::server_auth(),
        Usage::ClientAuth => webpki::KeyUsage::client_auth(),
    };
    let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    leaf.verify_for_usage(
        provider.signature_verification_algorithms.all,
        anchors,
        &chain[1..],
        UnixTime::since_unix_epoch(since_epoch),
        eku,
        None,
        None,
    )
    .map(|_| ())
    .map_err(PathError::Webpki)
}

fn webpki_reason(e: &webpki::Error) -> String {
    match e {
        webpki::Error::UnknownIssuer => "no path to a root of the bundle (unknown issuer)".into(),
        webpki::Error::CertExpired { .. } => "a certificate of the chain has expired".into(),
        webpki::Error::CertNotValidYet { .. } => {
            "a certificate of the chain is not valid yet".into()
        }
        webpki::Error::CaUsedAsEndEntity => "the leaf is a CA certificate".into(),
        webpki::Error::InvalidSignatureForPublicKey => "a signature in the chain is invalid".into(),
        other => format!("{other}"),
    }
}

fn to_system_time(unix: i64) -> SystemTime {
    if unix >= 0 {
        UNIX_EPOCH + Duration::from_secs(unix.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(unix.unsigned_abs())
    }
}

/// RFC 3339 in UTC, for messages.
pub fn fmt_time(t: SystemTime) -> String {
    let dt = time::OffsetDateTime::from(t);
    dt.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| format!("{dt}"))
}
