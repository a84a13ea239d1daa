//! Istio AuthorizationPolicy documents (zmesh_proxy::policy): PolicySet::parse_documents on
//! a manifest text, Policy::from_json / PolicySet::from_values on an object as the Kubernetes
//! API gives it, then verdicts for a spread of requests on whatever parsed.
#![no_main]

use std::collections::BTreeMap;
use std::net::IpAddr;

use libfuzzer_sys::fuzz_target;
use zmesh_identity::SpiffeId;
use zmesh_proxy::policy::{Policy, PolicySet, Request, Verdict};

fn exercise(set: &PolicySet) {
    let ids: Vec<SpiffeId> = [
        "spiffe://cluster.local/ns/default/sa/web",
        "spiffe://other.org/ns/shop/sa/client",
    ]
    .iter()
    .map(|s| SpiffeId::parse(s).unwrap())
    .collect();
    let labels: BTreeMap<String, String> = [("app", "web"), ("version", "v1")]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let ips: [Option<IpAddr>; 3] = [
        None,
        Some("10.0.0.1".parse().unwrap()),
        Some("fd00::1".parse().unwrap()),
    ];
    // The namespaces that matter: the default one and that of the first policies.
    let mut namespaces: Vec<&str> = vec!["default"];
    for p in set.policies() {
        if namespaces.len() == 3 {
            break;
        }
        if !namespaces.contains(&p.id().namespace.as_str()) {
            namespaces.push(&p.id().namespace);
        }
    }
    let ports = [80u16, 8080];
    for ns in &namespaces {
        for source_identity in ids.iter().map(Some).chain([None]) {
            for source_ip in ips {
                for destination_labels in [Some(&labels), None] {
                    for &destination_port in &ports {
                        let r = Request {
                            destination_namespace: ns,
                            destination_labels,
                            source_identity,
                            source_ip,
                            destination_port,
                        };
                        let verdict = set.evaluate(&r);
                        // Re-checking an open connection agrees with the first decision.
                        assert_eq!(set.denies_existing(&r).is_none(), verdict.is_allowed());
                        if let Verdict::Deny(d) = &verdict {
                            let _ = (d.to_string(), d.policy());
                        }
                    }
                }
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(set) = PolicySet::parse_documents(text) {
        exercise(&set);
        exercise(&set.clone().with_root_namespace("default"));
    }
    if let Ok(value) = serde_json::from_str::<serde_json::Value>(text) {
        if let Ok(policy) = Policy::from_json(&value) {
            let _ = (policy.action(), policy.selector(), policy.id().to_string());
            let set = PolicySet::new([policy]).expect("one policy is never a duplicate");
            exercise(&set);
        }
        let _ = PolicySet::from_values([&value]);
    }
});
