//! Trust bundles: the root certificates trusted for each SPIFFE trust domain.
//!
//! A trust domain holds several roots at once so that a root rotation (old and new root
//! trusted side by side) never breaks traffic.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use rustls_pki_types::{CertificateDer, TrustAnchor};
use x509_parser::extensions::GeneralName;

use crate::pem::{parse_certs, PemError};
use crate::{SpiffeId, TrustDomain};

/// Why a root was not accepted into a bundle.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    #[error(transparent)]
    Pem(#[from] PemError),
    #[error("root certificate is not valid X.509: {0}")]
    Malformed(String),
    #[error(
        "certificate {0} is not a CA certificate (basicConstraints cA=true is required of a root)"
    )]
    NotCa(Fingerprint),
    #[error(
        "root {fingerprint} carries SPIFFE ID {id}, which is not the trust domain {trust_domain}"
    )]
    ForeignTrustDomain {
        fingerprint: Fingerprint,
        id: String,
        trust_domain: TrustDomain,
    },
    #[error("the new root set for trust domain {0} is empty; refusing to trust nothing")]
    EmptyRootSet(TrustDomain),
}

/// SHA-256 of a certificate's DER encoding; shown as lowercase hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    pub fn of(der: &[u8]) -> Self {
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der);
        let mut out = [0u8; 32];
        out.copy_from_slice(digest.as_ref());
        Self(out)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

/// A fingerprint string was not 64 hex digits (colons allowed, as openssl prints them).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a SHA-256 fingerprint is 64 hex digits (colons allowed)")]
pub struct BadFingerprint;

impl FromStr for Fingerprint {
    type Err = BadFingerprint;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex: Vec<u8> = s.bytes().filter(|b| *b != b':').collect();
        if hex.len() != 64 {
            return Err(BadFingerprint);
        }
        let mut out = [0u8; 32];
        for (i, pair) in hex.chunks(2).enumerate() {
            let text = std::str::from_utf8(pair).map_err(|_| BadFingerprint)?;
            out[i] = u8::from_str_radix(text, 16).map_err(|_| BadFingerprint)?;
        }
        Ok(Self(out))
    }
}

#[derive(Debug, Clone)]
struct Root {
    der: CertificateDer<'static>,
    fingerprint: Fingerprint,
}

/// Roots of one trust domain; `anchors[i]` is parsed from `roots[i]`. Kept side by side
/// so path validation gets a slice without re-parsing.
#[derive(Debug, Clone, Default)]
struct DomainRoots {
    roots: Vec<Root>,
    anchors: Vec<TrustAnchor<'static>>,
}

/// Roots trusted per trust domain.
#[derive(Debug, Clone, Default)]
pub struct TrustBundle {
    domains: BTreeMap<TrustDomain, DomainRoots>,
}

impl TrustBundle {
    pub fn new() -> Self {
        Self::default()
    }

    /// Trusts `der` as a root of `trust_domain`. Returns false when it was already there.
    pub fn add_root(
        &mut self,
        trust_domain: &TrustDomain,
        der: CertificateDer<'static>,
    ) -> Result<bool, BundleError> {
        let (root, anchor) = check_root(trust_domain, der)?;
        let entry = self.domains.entry(trust_domain.clone()).or_default();
        if entry
            .roots
            .iter()
            .any(|r| r.fingerprint == root.fingerprint)
        {
            return Ok(false);
        }
        entry.roots.push(root);
        entry.anchors.push(anchor);
        Ok(true)
    }

    /// Adds every certificate of a PEM text as a root of `trust_domain`; all or nothing.
    /// Returns how many were new.
    pub fn add_pem(
        &mut self,
        trust_domain: &TrustDomain,
        pem: &[u8],
    ) -> Result<usize, BundleError> {
        let certs = parse_certs(pem)?;
        let checked = certs
            .into_iter()
            .map(|der| check_root(trust_domain, der))
            .collect::<Result<Vec<_>, _>>()?;
        let entry = self.domains.entry(trust_domain.clone()).or_default();
        let mut added = 0;
        for (root, anchor) in checked {
            if entry
                .roots
                .iter()
                .all(|r| r.fingerprint != root.fingerprint)
            {
                entry.roots.push(root);
                entry.anchors.push(anchor);
                added += 1;
            }
        }
        Ok(added)
    }

    /// Replaces the roots of `trust_domain` (a CA's word on its own current bundle); all
    /// or nothing, and never with an empty set.
    pub fn set_roots(
        &mut self,
        trust_domain: &TrustDomain,
        roots: impl IntoIterator<Item = CertificateDer<'static>>,
    ) -> Result<(), BundleError> {
        let mut fresh = DomainRoots::default();
        for der in roots {
            let (root, anchor) = check_root(trust_domain, der)?;
            if fresh
                .roots
                .iter()
                .all(|r| r.fingerprint != root.fingerprint)
            {
                fresh.roots.push(root);
                fresh.anchors.push(anchor);
            }
        }
        if fresh.roots.is_empty() {
            return Err(BundleError::EmptyRootSet(trust_domain.clone()));
        }
        self.domains.insert(trust_domain.clone(), fresh);
        Ok(())
    }

    /// Stops trusting one root. Returns whether it was present.
    pub fn remove_root(&mut self, trust_domain: &TrustDomain, fingerprint: &Fingerprint) -> bool {
        let Some(entry) = self.domains.get_mut(trust_domain) else {
            return false;
        };
        let Some(i) = entry
            .roots
            .iter()
            .position(|r| &r.fingerprint == fingerprint)
        else {
            return false;
        };
        entry.roots.remove(i);
        entry.anchors.remove(i);
        if entry.roots.is_empty() {
            self.domains.remove(trust_domain);
        }
        true
    }

    /// The roots of one trust domain, in the order they were added.
    pub fn roots(&self, trust_domain: &TrustDomain) -> Vec<CertificateDer<'static>> {
        self.domains
            .get(trust_domain)
            .map(|d| d.roots.iter().map(|r| r.der.clone()).collect())
            .unwrap_or_default()
    }

    /// Every trusted root as (trust domain, SHA-256 fingerprint), sorted by trust domain.
    pub fn fingerprints(&self) -> Vec<(TrustDomain, Fingerprint)> {
        self.domains
            .iter()
            .flat_map(|(td, d)| d.roots.iter().map(move |r| (td.clone(), r.fingerprint)))
            .collect()
    }

    pub fn trust_domains(&self) -> impl Iterator<Item = &TrustDomain> {
        self.domains.keys()
    }

    pub fn is_empty(&self) -> bool {
        self.domains.is_empty()
    }

    pub(crate) fn anchors(&self, trust_domain: &TrustDomain) -> Option<&[TrustAnchor<'static>]> {
        self.domains
            .get(trust_domain)
            .map(|d| d.anchors.as_slice())
            .filter(|a| !a.is_empty())
    }
}

fn check_root(
    trust_domain: &TrustDomain,
    der: CertificateDer<'static>,
) -> Result<(Root, TrustAnchor<'static>), BundleError> {
    let fingerprint = Fingerprint::of(&der);
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| BundleError::Malformed(e.to_string()))?;
    let is_ca = cert
        .basic_constraints()
        .map_err(|e| BundleError::Malformed(e.to_string()))?
        .is_some_and(|bc| bc.value.ca);
    if !is_ca {
        return Err(BundleError::NotCa(fingerprint));
    }
    let sans = cert
        .subject_alternative_name()
        .map_err(|e| BundleError::Malformed(e.to_string()))?;
    for name in sans.iter().flat_map(|s| s.value.general_names.iter()) {
        if let GeneralName::URI(uri) = name {
            if !uri.starts_with("spiffe://") {
                continue;
            }
            let same_domain =
                SpiffeId::parse(uri).is_ok_and(|id| id.trust_domain() == trust_domain);
            if !same_domain {
                return Err(BundleError::ForeignTrustDomain {
                    fingerprint,
                    id: (*uri).to_owned(),
                    trust_domain: trust_domain.clone(),
                });
            }
        }
    }
    let anchor = webpki::anchor_from_trusted_cert(&der)
        .map_err(|e| BundleError::Malformed(format!("{e:?}")))?
        .to_owned();
    Ok((Root { der, fingerprint }, anchor))
}

/// A trust bundle shared by the TLS verifiers and the certificate manager. Readers take a
/// lock-free snapshot; writers are serialized so that no update is lost.
#[derive(Debug, Clone, Default)]
pub struct SharedBundle {
    current: Arc<ArcSwap<TrustBundle>>,
    writer: Arc<Mutex<()>>,
}

impl SharedBundle {
    pub fn new(bundle: TrustBundle) -> Self {
        Self {
            current: Arc::new(ArcSwap::from_pointee(bundle)),
            writer: Arc::default(),
        }
    }

    /// The bundle as of now; later updates do not change the returned value.
    pub fn snapshot(&self) -> Arc<TrustBundle> {
        self.current.load_full()
    }

    /// Applies `f` to a copy of the bundle and publishes the copy only if `f` succeeds.
    pub fn update<R, E>(&self, f: impl FnOnce(&mut TrustBundle) -> Result<R, E>) -> Result<R, E> {
        // A poisoned lock only means another writer panicked; the published bundle is
        // still consistent because publishing is a single atomic store.
        let _guard = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = TrustBundle::clone(&self.current.load());
        let out = f(&mut next)?;
        self.current.store(Arc::new(next));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_parses_both_spellings() {
        let fp = Fingerprint::of(b"x");
        let plain = fp.to_string();
        assert_eq!(plain.len(), 64);
        assert_eq!(plain.parse::<Fingerprint>(), Ok(fp));
        let colons = plain
            .as_bytes()
            .chunks(2)
            .map(|c| std::str::from_utf8(c).unwrap().to_uppercase())
            .collect::<Vec<_>>()
            .join(":");
        assert_eq!(colons.parse::<Fingerprint>(), Ok(fp));
        assert_eq!("abc".parse::<Fingerprint>(), Err(BadFingerprint));
        assert_eq!("zz".repeat(32).parse::<Fingerprint>(), Err(BadFingerprint));
    }
}
