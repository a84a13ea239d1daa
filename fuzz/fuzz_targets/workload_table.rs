//! The proxy's workload table in YAML (`zmesh proxy --workloads FILE`):
//! zmesh_proxy::WorkloadTable::from_yaml, then every lookup the proxy makes on it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zmesh_proxy::WorkloadTable;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let table = match WorkloadTable::from_yaml(text) {
        Ok(t) => t,
        Err(e) => {
            let _ = format!("{e:#?}");
            return;
        }
    };
    let _ = table.trust_domain().to_string();
    for w in table.workloads() {
        // The identity is the one the fields name, and every IP leads back to the workload.
        assert_eq!(w.identity.namespace(), w.namespace);
        assert_eq!(w.identity.service_account(), w.service_account);
        assert_eq!(w.identity.trust_domain(), table.trust_domain());
        for ip in &w.ips {
            let found = table.workload_by_ip(*ip).expect("indexed by every IP");
            assert_eq!(found.name, w.name);
            assert!(table.local_workload(*ip, &w.node).is_some());
            assert!(table.service_by_vip(*ip).is_none(), "a VIP is never a workload IP");
        }
        let _ = table.node(&w.node);
        let _ = table.workloads_on(&w.node).count();
    }
    for s in table.services() {
        assert!(table.service(&s.namespace, &s.name).is_some());
        let _ = s.hostname("cluster.local");
        for vip in &s.vips {
            assert_eq!(table.service_by_vip(*vip).map(|v| v.key()), Some(s.key()));
        }
        for p in &s.ports {
            for (ip, port) in s.endpoints_for(p.port) {
                assert_ne!(port, 0, "{} endpoint {ip} on port 0", s.key());
            }
        }
    }
});
