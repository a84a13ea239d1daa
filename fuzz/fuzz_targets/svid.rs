//! X.509-SVID validation (zmesh_identity::svid) of a peer's certificate chain, as the TLS
//! verifiers and `zmesh certs inspect` run it, against a bundle trusting the fixture root.
//!
//! Input: DER certificates (leaf first) separated by `--8<--`, or PEM text (a chain file, a
//! bundle, a CA response), which is also tried as a trust bundle.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zmesh_identity::svid::{describe, lint_chain, verify_svid};
use zmesh_identity::TrustBundle;
use zmesh_fuzz::{bundle, der_chain, fixed_now, looks_like_pem, trust_domain};

fuzz_target!(|data: &[u8]| {
    let chain = if looks_like_pem(data) {
        let _ = TrustBundle::new().add_pem(&trust_domain(), data);
        match zmesh_identity::pem::parse_certs(data) {
            Ok(certs) => certs,
            Err(_) => return,
        }
    } else {
        der_chain(data)
    };
    let now = fixed_now();
    let verified = verify_svid(&chain, bundle(), now);
    let findings = lint_chain(&chain, Some(bundle()), now);
    // The two entry points agree: a chain verify_svid accepts has no finding, and one
    // it refuses has at least one.
    match &verified {
        Ok(v) => {
            assert!(findings.is_empty(), "verified {v:?} but lint found {findings:?}");
            assert_eq!(v.id.trust_domain(), &trust_domain());
        }
        Err(e) => assert!(!findings.is_empty(), "verify_svid refused ({e}) but lint found nothing"),
    }
    for e in &findings {
        let _ = (e.rule_name(), e.to_string());
    }
    let _ = lint_chain(&chain, None, now);
    for cert in &chain {
        let _ = describe(cert);
    }
    // Every certificate is also offered as a root, as a CA response's bundle would be.
    if let Some(last) = chain.last() {
        let mut b = TrustBundle::new();
        if b.add_root(&trust_domain(), last.clone()).is_ok() {
            let _ = verify_svid(&chain, &b, now);
        }
    }
});
