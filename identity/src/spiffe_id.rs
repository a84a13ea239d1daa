//! SPIFFE IDs, parsed strictly per the SPIFFE-ID specification.
//!
//! `spiffe://<trust-domain>/<path>`: no query, fragment, userinfo or port; the trust domain
//! is lowercase `[a-z0-9._-]`; path segments are `[A-Za-z0-9._-]`, never empty, `.` or `..`;
//! no percent-encoding. IDs up to 2048 bytes are accepted.

use std::fmt;
use std::str::FromStr;

/// Longest SPIFFE ID we accept (the spec asks validators to accept at least 2048 bytes
/// and generators never to exceed it).
pub const MAX_SPIFFE_ID_LEN: usize = 2048;
/// Longest trust domain name.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;
/// Trust domain zmesh uses when none is configured, as Istio does.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

const SCHEME: &str = "spiffe://";

/// Why a string is not a valid SPIFFE ID or trust domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("SPIFFE ID is empty")]
    Empty,
    #[error("SPIFFE ID is {0} bytes, longer than the 2048 allowed")]
    TooLong(usize),
    #[error("SPIFFE ID must start with \"spiffe://\"")]
    WrongScheme,
    #[error("trust domain is missing")]
    MissingTrustDomain,
    #[error("trust domain is {0} bytes, longer than the 255 allowed")]
    TrustDomainTooLong(usize),
    #[error("trust domain has character {0:?}; only lowercase letters, digits, '.', '-' and '_' are allowed")]
    BadTrustDomainChar(char),
    #[error("path has an empty segment (\"//\" or a trailing '/')")]
    EmptySegment,
    #[error("path has a '.' or '..' segment")]
    DotSegment,
    #[error("path has character {0:?}; only letters, digits, '.', '-' and '_' are allowed (no percent-encoding)")]
    BadPathChar(char),
    #[error("a workload ID must have the form spiffe://<td>/ns/<namespace>/sa/<service-account>")]
    NotWorkloadId,
}

/// A SPIFFE trust domain, e.g. `cluster.local`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Parses a bare trust domain name (`cluster.local`) or a SPIFFE ID with no path
    /// (`spiffe://cluster.local`).
    pub fn new(name: &str) -> Result<Self, SpiffeIdError> {
        let name = name.strip_prefix(SCHEME).unwrap_or(name);
        validate_trust_domain(name)?;
        Ok(Self(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `spiffe://<td>`, the ID a signing certificate of this trust domain may carry.
    pub fn id_string(&self) -> String {
        format!("{SCHEME}{}", self.0)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl Default for TrustDomain {
    fn default() -> Self {
        Self(DEFAULT_TRUST_DOMAIN.to_owned())
    }
}

/// A SPIFFE ID. The path may be empty (the ID of a trust domain itself); leaf
/// certificates need a non-empty path, which the SVID validator checks.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: TrustDomain,
    /// The whole ID, `spiffe://<trust domain><path>`, the path either empty or starting
    /// with '/'. Whole because every connection shows its peers' IDs (logs, flows,
    /// metrics), which would otherwise format them again and again.
    uri: String,
}

impl SpiffeId {
    pub fn parse(id: &str) -> Result<Self, SpiffeIdError> {
        if id.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if id.len() > MAX_SPIFFE_ID_LEN {
            return Err(SpiffeIdError::TooLong(id.len()));
        }
        let rest = id.strip_prefix(SCHEME).ok_or(SpiffeIdError::WrongScheme)?;
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        validate_trust_domain(td)?;
        validate_path(path)?;
        Ok(Self {
            trust_domain: TrustDomain(td.to_owned()),
            uri: id.to_owned(),
        })
    }

    /// Builds an ID from a trust domain and path segments, validating each segment.
    pub fn from_segments<'a>(
        trust_domain: &TrustDomain,
        segments: impl IntoIterator<Item = &'a str>,
    ) -> Result<Self, SpiffeIdError> {
        let mut path = String::new();
        for segment in segments {
            path.push('/');
            path.push_str(segment);
        }
        let id = format!("{SCHEME}{}{path}", trust_domain.as_str());
        Self::parse(&id)
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The whole ID, as [`fmt::Display`] shows it.
    pub fn as_str(&self) -> &str {
        &self.uri
    }

    /// The path, empty or starting with '/'.
    pub fn path(&self) -> &str {
        &self.uri[SCHEME.len() + self.trust_domain.as_str().len()..]
    }

    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.path().split('/').skip(1)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// The identity of a Kubernetes workload: `spiffe://<td>/ns/<namespace>/sa/<service-account>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkloadId {
    id: SpiffeId,
    namespace: String,
    service_account: String,
}

impl WorkloadId {
    pub fn new(
        trust_domain: &TrustDomain,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        // Re-parsing through try_from rejects names that smuggle in a '/'.
        SpiffeId::from_segments(trust_domain, ["ns", namespace, "sa", service_account])?.try_into()
    }

    pub fn spiffe_id(&self) -> &SpiffeId {
        &self.id
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        self.id.trust_domain()
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

impl TryFrom<SpiffeId> for WorkloadId {
    type Error = SpiffeIdError;
    fn try_from(id: SpiffeId) -> Result<Self, Self::Error> {
        let segments: Vec<&str> = id.segments().collect();
        match segments.as_slice() {
            ["ns", ns, "sa", sa] => {
                let (namespace, service_account) = (ns.to_string(), sa.to_string());
                Ok(Self {
                    id,
                    namespace,
                    service_account,
                })
            }
            _ => Err(SpiffeIdError::NotWorkloadId),
        }
    }
}

impl FromStr for WorkloadId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SpiffeId::parse(s)?.try_into()
    }
}

impl fmt::Display for WorkloadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.id.fmt(f)
    }
}

fn validate_trust_domain(td: &str) -> Result<(), SpiffeIdError> {
    if td.is_empty() {
        return Err(SpiffeIdError::MissingTrustDomain);
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdError::TrustDomainTooLong(td.len()));
    }
    match td
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_')))
    {
        Some(c) => Err(SpiffeIdError::BadTrustDomainChar(c)),
        None => Ok(()),
    }
}

fn validate_path(path: &str) -> Result<(), SpiffeIdError> {
    if path.is_empty() {
        return Ok(());
    }
    for segment in path.split('/').skip(1) {
        match segment {
            "" => return Err(SpiffeIdError::EmptySegment),
            "." | ".." => return Err(SpiffeIdError::DotSegment),
            _ => {}
        }
        if let Some(c) = segment
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
        {
            return Err(SpiffeIdError::BadPathChar(c));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_workload_ids() {
        let id: WorkloadId = "spiffe://cluster.local/ns/default/sa/web".parse().unwrap();
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "web");
        assert_eq!(id.trust_domain().as_str(), "cluster.local");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/web");
        let built = WorkloadId::new(&TrustDomain::default(), "default", "web").unwrap();
        assert_eq!(built, id);
        assert_eq!(built.spiffe_id().as_str(), id.to_string());
        assert_eq!(built.spiffe_id().path(), "/ns/default/sa/web");
    }

    #[test]
    fn trust_domain_only_ids_have_empty_path() {
        let id = SpiffeId::parse("spiffe://example.org").unwrap();
        assert_eq!(id.path(), "");
        assert_eq!(id.as_str(), "spiffe://example.org");
        assert_eq!(id.segments().count(), 0);
    }

    #[test]
    fn rejects_each_rule() {
        let cases: &[(&str, SpiffeIdError)] = &[
            ("", SpiffeIdError::Empty),
            ("http://cluster.local/ns/a", SpiffeIdError::WrongScheme),
            ("SPIFFE://cluster.local/ns/a", SpiffeIdError::WrongScheme),
            ("spiffe:///ns/a", SpiffeIdError::MissingTrustDomain),
            (
                "spiffe://Cluster.local/ns/a",
                SpiffeIdError::BadTrustDomainChar('C'),
            ),
            (
                "spiffe://user@td/ns/a",
                SpiffeIdError::BadTrustDomainChar('@'),
            ),
            (
                "spiffe://td:8080/ns/a",
                SpiffeIdError::BadTrustDomainChar(':'),
            ),
            ("spiffe://td/ns//a", SpiffeIdError::EmptySegment),
            ("spiffe://td/ns/a/", SpiffeIdError::EmptySegment),
            ("spiffe://td/", SpiffeIdError::EmptySegment),
            ("spiffe://td/ns/../a", SpiffeIdError::DotSegment),
            ("spiffe://td/./a", SpiffeIdError::DotSegment),
            ("spiffe://td/ns/a%20b", SpiffeIdError::BadPathChar('%')),
            ("spiffe://td/ns/a?x=1", SpiffeIdError::BadPathChar('?')),
            ("spiffe://td/ns/a#frag", SpiffeIdError::BadPathChar('#')),
        ];
        for (input, want) in cases {
            assert_eq!(
                SpiffeId::parse(input).as_ref(),
                Err(want),
                "input {input:?}"
            );
        }
    }

    #[test]
    fn enforces_lengths() {
        let long_path = "a".repeat(MAX_SPIFFE_ID_LEN - "spiffe://td/".len());
        let ok = format!("spiffe://td/{long_path}");
        assert_eq!(ok.len(), MAX_SPIFFE_ID_LEN);
        assert!(SpiffeId::parse(&ok).is_ok());
        let too_long = format!("{ok}b");
        assert_eq!(
            SpiffeId::parse(&too_long),
            Err(SpiffeIdError::TooLong(MAX_SPIFFE_ID_LEN + 1))
        );
        let td = "a".repeat(256);
        assert_eq!(
            TrustDomain::new(&td),
            Err(SpiffeIdError::TrustDomainTooLong(256))
        );
    }

    #[test]
    fn workload_ids_need_ns_and_sa() {
        for bad in [
            "spiffe://td/ns/a",
            "spiffe://td/ns/a/sa/b/c",
            "spiffe://td/namespace/a/sa/b",
            "spiffe://td",
        ] {
            assert_eq!(
                bad.parse::<WorkloadId>(),
                Err(SpiffeIdError::NotWorkloadId),
                "{bad}"
            );
        }
        assert!(WorkloadId::new(&TrustDomain::default(), "a/b", "c").is_err());
    }
}

/// Serialized as their string form and validated again when read back (the data path gets
/// its workload table and certificates this way from the agent).
macro_rules! serde_as_string {
    ($ty:ty, $parse:expr) => {
        impl serde::Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> serde::Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                $parse(&text).map_err(serde::de::Error::custom)
            }
        }
    };
}

serde_as_string!(TrustDomain, TrustDomain::new);
serde_as_string!(SpiffeId, SpiffeId::parse);
serde_as_string!(WorkloadId, <WorkloadId as FromStr>::from_str);
