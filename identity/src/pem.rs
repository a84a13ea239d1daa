//! PEM decoding of certificate lists (chains, bundles).

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

/// Why a PEM text did not yield certificates.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PemError {
    #[error("no PEM CERTIFICATE block found")]
    NoCertificates,
    #[error("malformed PEM: {0}")]
    Malformed(String),
}

/// Decodes every `CERTIFICATE` block of `pem`, in order. Other blocks (keys, CSRs) are
/// skipped so that a combined cert+key file can be read; an empty result is an error.
pub fn parse_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PemError::Malformed(e.to_string()))?;
    if certs.is_empty() {
        return Err(PemError::NoCertificates);
    }
    Ok(certs)
}

/// Encodes one DER certificate as PEM.
pub fn encode_cert(der: &CertificateDer<'_>) -> String {
    ::pem::encode(&::pem::Pem::new("CERTIFICATE", der.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_text_without_certificates() {
        assert_eq!(parse_certs(b"hello"), Err(PemError::NoCertificates));
        let key_only = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
        assert_eq!(
            parse_certs(key_only.as_bytes()),
            Err(PemError::NoCertificates)
        );
        let truncated = "-----BEGIN CERTIFICATE-----\nAAAA\n";
        assert!(matches!(
            parse_certs(truncated.as_bytes()),
            Err(PemError::Malformed(_))
        ));
    }

    #[test]
    fn round_trips() {
        let der = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x01]);
        let pem = encode_cert(&der);
        assert_eq!(parse_certs(pem.as_bytes()).unwrap(), vec![der]);
    }
}
