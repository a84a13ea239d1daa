//! Errors of the CA crate, one enum per concern so callers can tell a broken state
//! directory from a refused request.

use std::path::PathBuf;

use zmesh_identity::SpiffeIdError;

/// Problems with the CA's state directory, its keys and certificates.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A key file or the directory holding keys that group or others may use: the fix is
    /// `chmod 700` for a directory, `chmod 600` for a file.
    #[error(
        "{path} is accessible by group or others (mode {mode:o}); run `chmod {fix} {path}`",
        path = .path.display(),
        fix = if *.directory { "700" } else { "600" }
    )]
    InsecurePermissions {
        path: PathBuf,
        mode: u32,
        directory: bool,
    },
    #[error("{} already holds a CA; refusing to overwrite it", .0.display())]
    AlreadyInitialized(PathBuf),
    #[error("{} holds no CA; run `zmesh ca init` first", .0.display())]
    NotInitialized(PathBuf),
    #[error("{path}: invalid state file: {reason}", path = .path.display())]
    BadStateFile { path: PathBuf, reason: String },
    #[error("CA chain {chain}: {reason}")]
    BadChain { chain: u32, reason: String },
    #[error("invalid trust domain: {0}")]
    TrustDomain(#[from] SpiffeIdError),
    #[error("cannot generate certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("root rotation: {0}")]
    Rotation(String),
    #[error("{0}")]
    InvalidArgument(String),
}

impl StoreError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

/// Why a CSR was rejected. The messages go back to the caller as gRPC
/// INVALID_ARGUMENT details, so they say exactly what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    #[error("CSR is not a PEM \"CERTIFICATE REQUEST\"")]
    NotPem,
    #[error("CSR is not valid DER PKCS#10: {0}")]
    Malformed(String),
    #[error("CSR self-signature does not verify")]
    BadSignature,
    #[error("CSR key must be ECDSA P-256 signed with SHA-256, found {0}")]
    UnsupportedKey(String),
    #[error("CSR must carry exactly one URI SAN, found {0}")]
    UriCount(usize),
    #[error("CSR carries a {0} SAN; only one URI SAN (the SPIFFE ID) is allowed")]
    ForbiddenSan(&'static str),
    #[error("CSR URI SAN is not a valid SPIFFE ID: {0}")]
    BadSpiffeId(SpiffeIdError),
    #[error("CSR identity {id} is outside this CA's trust domain {trust_domain}")]
    WrongTrustDomain { id: String, trust_domain: String },
    #[error("CSR identity {0} is not a workload ID (spiffe://<td>/ns/<ns>/sa/<sa>)")]
    NotWorkload(String),
    #[error("CSR identity {got} does not match the expected {want}")]
    IdentityMismatch { got: String, want: String },
}

/// Why a join token could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("unknown join token")]
    Unknown,
    #[error("join token expired")]
    Expired,
    #[error("join token was already used")]
    AlreadyUsed,
}

/// Invalid node name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid node name {0:?}: use 1-253 lowercase letters, digits, '-' or '.', starting and ending with a letter or digit")]
pub struct NodeNameError(pub String);
