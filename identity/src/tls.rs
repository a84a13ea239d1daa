//! rustls configuration for HBONE mutual TLS, with ztunnel's settings: TLS 1.3 only, AES-GCM
//! suites, X25519MLKEM768/X25519/P-256/P-384, ALPN `h2`, no client resumption, no SNI.
//!
//! Peers are authenticated by their X.509-SVID (see [`crate::svid`]), never by DNS name.

use std::net::IpAddr;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, Resumption};
use rustls::crypto::{aws_lc_rs, CryptoProvider};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, NoServerSessionStorage, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, CommonState, DigitallySignedStruct, DistinguishedName,
    OtherError, ServerConfig, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::bundle::SharedBundle;
use crate::svid::{self, SvidError, Usage};
use crate::{SpiffeId, TrustDomain};

/// The ALPN protocol HBONE speaks.
pub const ALPN_H2: &[u8] = b"h2";

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("rustls rejected the configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("no expected peer identities: a client must know whom it dials")]
    NoExpectedIdentities,
}

static PROVIDER: LazyLock<Arc<CryptoProvider>> = LazyLock::new(|| {
    let base = aws_lc_rs::default_provider();
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384,
            aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256,
        ],
        kx_groups: vec![
            aws_lc_rs::kx_group::X25519MLKEM768,
            aws_lc_rs::kx_group::X25519,
            aws_lc_rs::kx_group::SECP256R1,
            aws_lc_rs::kx_group::SECP384R1,
        ],
        ..base
    })
});

/// The aws-lc-rs provider restricted to ztunnel's suites and key exchange groups.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    PROVIDER.clone()
}

/// Seeds the provider's random generator now, at start-up. aws-lc gathers jitter entropy on
/// first use (30-45 ms on our 2-vCPU test machine), which would otherwise delay the first TLS
/// handshake after a (re)start.
pub fn warm_up() {
    let mut seed = [0u8; 32];
    // A failure shows up again, with its error, in the first handshake.
    let _ = crypto_provider().secure_random.fill(&mut seed);
}

/// Server-side mTLS config: a client SVID of `trust_domain` is mandatory. The server's own
/// certificate comes from `resolver` on every handshake, so rotations need no new config.
pub fn server_config(
    resolver: Arc<dyn ResolvesServerCert>,
    bundle: SharedBundle,
    trust_domain: TrustDomain,
) -> Result<ServerConfig, TlsConfigError> {
    let verifier = Arc::new(SvidClientVerifier::new(bundle, trust_domain));
    let mut config = ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // Clients never resume (ztunnel doesn't either): keep no session state, send no tickets.
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// Client-side mTLS config for one (source certificate, expected destination identities)
/// pair: the server's SVID must carry one of `expected` exactly.
pub fn client_config(
    source: Arc<CertifiedKey>,
    bundle: SharedBundle,
    expected: Vec<SpiffeId>,
) -> Result<ClientConfig, TlsConfigError> {
    let verifier = Arc::new(SvidServerVerifier::new(bundle, expected)?);
    let mut config = ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(FixedCert(source)));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.resumption = Resumption::disabled();
    config.enable_sni = false;
    Ok(config)
}

/// The name to dial a peer by: its IP, so rustls sends no SNI and checks no DNS name.
pub fn server_name(ip: IpAddr) -> ServerName<'static> {
    ServerName::IpAddress(ip.into())
}

/// The SPIFFE ID of the peer of a finished handshake (its leaf was verified by one of the
/// verifiers here). None before the handshake completes or without a peer certificate.
pub fn peer_identity(conn: &CommonState) -> Option<SpiffeId> {
    if conn.is_handshaking() {
        return None;
    }
    svid::leaf_spiffe_id(conn.peer_certificates()?.first()?)
}

/// When the chain the peer presented in a finished handshake stops being valid: the
/// earliest `notAfter` in it. A connection authenticated with that chain must not carry
/// new tunnels past it. None before the handshake completes, without a peer certificate,
/// or if one of them does not parse (callers fail closed).
pub fn peer_valid_until(conn: &CommonState) -> Option<SystemTime> {
    if conn.is_handshaking() {
        return None;
    }
    let mut earliest: Option<SystemTime> = None;
    for der in conn.peer_certificates()? {
        let not_after = svid::describe(der).ok()?.not_after;
        earliest = Some(earliest.map_or(not_after, |e| e.min(not_after)));
    }
    earliest
}

/// Always presents the same certified key (a client's source identity, or a test server).
#[derive(Debug, Clone)]
pub struct FixedCert(pub Arc<CertifiedKey>);

impl ResolvesClientCert for FixedCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl ResolvesServerCert for FixedCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// Verifies clients (used by servers): a valid SVID of the configured trust domain.
#[derive(Debug)]
pub struct SvidClientVerifier {
    bundle: SharedBundle,
    trust_domain: TrustDomain,
    provider: Arc<CryptoProvider>,
}

impl SvidClientVerifier {
    pub fn new(bundle: SharedBundle, trust_domain: TrustDomain) -> Self {
        Self {
            bundle,
            trust_domain,
            provider: crypto_provider(),
        }
    }

    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<SpiffeId, SvidError> {
        let chain = full_chain(end_entity, intermediates);
        let svid = svid::verify_for(
            &chain,
            &self.bundle.snapshot(),
            system_time(now),
            Usage::ClientAuth,
        )?;
        if svid.id.trust_domain() != &self.trust_domain {
            return Err(SvidError::WrongTrustDomain {
                id: svid.id,
                expected: self.trust_domain.clone(),
            });
        }
        Ok(svid.id)
    }
}

impl ClientCertVerifier for SvidClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        match self.check(end_entity, intermediates, now) {
            Ok(id) => {
                tracing::trace!(peer = %id, "client SVID verified");
                Ok(ClientCertVerified::assertion())
            }
            Err(e) => {
                tracing::debug!(rule = e.rule_name(), error = %e, "client SVID rejected");
                Err(to_rustls(e, now))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Verifies servers (used by clients): a valid SVID whose ID is one of those expected for
/// this destination. The name dialed (an IP) plays no part.
#[derive(Debug)]
pub struct SvidServerVerifier {
    bundle: SharedBundle,
    expected: Vec<SpiffeId>,
    provider: Arc<CryptoProvider>,
}

impl SvidServerVerifier {
    pub fn new(bundle: SharedBundle, expected: Vec<SpiffeId>) -> Result<Self, TlsConfigError> {
        if expected.is_empty() {
            return Err(TlsConfigError::NoExpectedIdentities);
        }
        Ok(Self {
            bundle,
            expected,
            provider: crypto_provider(),
        })
    }

    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<SpiffeId, SvidError> {
        let chain = full_chain(end_entity, intermediates);
        let svid = svid::verify_for(
            &chain,
            &self.bundle.snapshot(),
            system_time(now),
            Usage::ServerAuth,
        )?;
        if !self.expected.contains(&svid.id) {
            let expected = self
                .expected
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ");
            return Err(SvidError::UnexpectedIdentity {
                id: svid.id,
                expected,
            });
        }
        Ok(svid.id)
    }
}

impl ServerCertVerifier for SvidServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.check(end_entity, intermediates, now) {
            Ok(id) => {
                tracing::trace!(peer = %id, "server SVID verified");
                Ok(ServerCertVerified::assertion())
            }
            Err(e) => {
                tracing::debug!(rule = e.rule_name(), error = %e, "server SVID rejected");
                Err(to_rustls(e, now))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The SVID rule that failed a handshake, if the failure came from our verifiers and is
/// not one of the standard cases `to_rustls` maps to rustls' own variants (untrusted
/// chains: `UnknownIssuer`; validity: `ExpiredContext`/`NotValidYetContext`).
pub fn svid_error(err: &rustls::Error) -> Option<&SvidError> {
    match err {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => {
            inner.downcast_ref::<SvidError>()
        }
        _ => None,
    }
}

/// The peer learns why from the TLS alert, which rustls derives from the variant: a chain
/// we do not trust gets `unknown_ca` and a leaf out of its validity `certificate_expired`,
/// as from ztunnel (webpki); every other SVID rule `certificate_unknown`.
fn to_rustls(e: SvidError, now: UnixTime) -> rustls::Error {
    let unix = |t: SystemTime| {
        UnixTime::since_unix_epoch(t.duration_since(UNIX_EPOCH).unwrap_or_default())
    };
    rustls::Error::InvalidCertificate(match e {
        SvidError::Untrusted { .. } | SvidError::UnknownTrustDomain(_) => {
            CertificateError::UnknownIssuer
        }
        SvidError::Expired { not_after } => CertificateError::ExpiredContext {
            time: now,
            not_after: unix(not_after),
        },
        SvidError::NotYetValid { not_before } => CertificateError::NotValidYetContext {
            time: now,
            not_before: unix(not_before),
        },
        other => CertificateError::Other(OtherError(Arc::new(other))),
    })
}

fn full_chain<'a>(
    end_entity: &CertificateDer<'a>,
    intermediates: &[CertificateDer<'a>],
) -> Vec<CertificateDer<'a>> {
    let mut chain = Vec::with_capacity(1 + intermediates.len());
    chain.push(end_entity.clone());
    chain.extend(intermediates.iter().cloned());
    chain
}

fn system_time(now: UnixTime) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(now.as_secs())
}
