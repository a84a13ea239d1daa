//! SPIFFE IDs, trust domains and workload IDs (zmesh_identity::spiffe_id): from URI SANs of
//! peer certificates and CSRs, policy principals, configuration.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zmesh_identity::{SpiffeId, TrustDomain, WorkloadId};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(id) = SpiffeId::parse(text) {
        // Parsing is strict, so printing gives back the input, which parses the same.
        assert_eq!(id.to_string(), text);
        assert_eq!(SpiffeId::parse(&id.to_string()).as_ref(), Ok(&id));
        let segments: Vec<&str> = id.segments().collect();
        let rebuilt = SpiffeId::from_segments(id.trust_domain(), segments.iter().copied());
        assert_eq!(rebuilt.as_ref(), Ok(&id));
        if let Ok(w) = WorkloadId::try_from(id.clone()) {
            let again = WorkloadId::new(w.trust_domain(), w.namespace(), w.service_account());
            assert_eq!(again.as_ref(), Ok(&w));
            assert_eq!(w.to_string(), text);
        }
    }
    if let Ok(td) = TrustDomain::new(text) {
        assert_eq!(TrustDomain::new(td.as_str()).as_ref(), Ok(&td));
        assert_eq!(TrustDomain::new(&td.id_string()).as_ref(), Ok(&td));
        // Any trust domain with a valid path segment makes a valid ID.
        let id = SpiffeId::from_segments(&td, ["ns", "a"]).expect("valid segments");
        assert_eq!(id.trust_domain(), &td);
    }
    let _ = text.parse::<WorkloadId>();
});
