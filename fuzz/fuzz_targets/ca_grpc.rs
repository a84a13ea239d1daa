//! The CA's gRPC requests, as zmesh_certs' server reads them: the protobuf bodies of
//! CreateCertificate (Istio's IstioCertificateRequest), Join and Renew, then the checks the
//! server applies to them that are public (verify_csr, the identity shape, the lifetime
//! clamp, the ImpersonatedIdentity metadata), and a node's TLS client certificate chain
//! through Authority::verify_node_chain (the CA authenticates nodes with it).
//!
//! Input: one mode byte (0 CreateCertificate, 1 Join, 2 Renew, 3 client certificate
//! chain), then the request body (or DER certificates separated by `--8<--`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use rustls_pki_types::UnixTime;
use zmesh_certs::pb::istio::IstioCertificateRequest;
use zmesh_certs::pb::zmesh::{JoinRequest, RenewRequest};
use zmesh_certs::{verify_csr, NodeName, IMPERSONATED_IDENTITY};
use zmesh_fuzz::{authority, der_chain, fixed_now, trust_domain};
use zmesh_identity::WorkloadId;

/// What the server's (private) `impersonated_identity` does with the metadata.
fn impersonated(metadata: Option<&prost_types::Struct>) -> Result<Option<String>, String> {
    let Some(value) = metadata.and_then(|m| m.fields.get(IMPERSONATED_IDENTITY)) else {
        return Ok(None);
    };
    match &value.kind {
        Some(prost_types::value::Kind::StringValue(s)) => Ok(Some(s.clone())),
        _ => Err(format!("metadata {IMPERSONATED_IDENTITY} must be a string")),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    let td = trust_domain();
    let node_a = NodeName::new("node-a").unwrap();
    match mode % 4 {
        0 => {
            let Ok(req) = IstioCertificateRequest::decode(body) else {
                return;
            };
            let policy = authority().policy();
            let lifetime = policy.workload_lifetime(req.validity_duration);
            assert!(!lifetime.is_zero() && lifetime <= policy.max_leaf_lifetime);
            let _ = impersonated(req.metadata.as_ref());
            if let Ok(csr) = verify_csr(&req.csr, &td) {
                let _ = WorkloadId::try_from(csr.id);
            }
            let _ = req.encode_to_vec();
        }
        1 => {
            let Ok(req) = JoinRequest::decode(body) else {
                return;
            };
            let _ = NodeName::new(&req.token);
            if let Ok(csr) = verify_csr(&req.csr, &td) {
                let _ = csr.id == node_a.spiffe_id(&td);
            }
        }
        2 => {
            let Ok(req) = RenewRequest::decode(body) else {
                return;
            };
            if let Ok(csr) = verify_csr(&req.csr, &td) {
                let _ = NodeName::from_spiffe_id(&csr.id, &td);
            }
        }
        _ => {
            let chain = der_chain(body);
            let (leaf, intermediates) = chain.split_first().expect("split gives one part");
            let now = UnixTime::since_unix_epoch(
                fixed_now().duration_since(std::time::UNIX_EPOCH).unwrap(),
            );
            if let Ok(node) = authority().verify_node_chain(leaf, intermediates, now) {
                // Only a node identity of the CA's trust domain authenticates.
                let id = node.spiffe_id(authority().trust_domain());
                assert_eq!(NodeName::from_spiffe_id(&id, &td), Some(node));
            }
        }
    }
});
