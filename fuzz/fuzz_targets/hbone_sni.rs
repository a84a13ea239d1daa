//! The SNI an HBONE client sends (`ip4-10-0-0-1.hbone.zmesh.internal`), which the inbound
//! side reads to pick the local workload's certificate: zmesh_proxy::tls::parse_destination_sni.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rustls_pki_types::ServerName;
use zmesh_proxy::tls::{destination_sni, parse_destination_sni};

fuzz_target!(|data: &[u8]| {
    let Ok(sni) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(ip) = parse_destination_sni(sni) {
        // Whatever parses names an address whose own SNI parses back to it.
        let ServerName::DnsName(name) = destination_sni(ip) else {
            panic!("destination_sni({ip}) is not a DNS name");
        };
        assert_eq!(parse_destination_sni(name.as_ref()), Some(ip));
    }
});
