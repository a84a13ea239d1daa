//! The CA's CSR checks (zmesh_certs::verify_csr), which every CreateCertificate, Join and
//! Renew request goes through before anything is signed.
//!
//! Input: PEM text as a client sends it, or DER, which is wrapped in a PEM block first.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zmesh_certs::{verify_csr, NodeName};
use zmesh_fuzz::{looks_like_pem, trust_domain};
use zmesh_identity::WorkloadId;

fuzz_target!(|data: &[u8]| {
    let text = if looks_like_pem(data) {
        String::from_utf8_lossy(data).into_owned()
    } else {
        pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", data.to_vec()))
    };
    let td = trust_domain();
    match verify_csr(&text, &td) {
        Ok(csr) => {
            // What the CA relies on afterwards.
            assert_eq!(csr.id.trust_domain(), &td);
            let _ = WorkloadId::try_from(csr.id.clone());
            let _ = NodeName::from_spiffe_id(&csr.id, &td);
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
