//! The SPIRE identity source (zmesh_compat::spire): what SpireSource does with the
//! SPIFFE Workload API's X509SVIDResponse and X509BundlesResponse (concatenated-DER
//! splitting, bundle checks, SVID validation, key loading). That code is private, so the
//! target runs a SpireSource against the crate's own Workload API test server
//! (feature test-support) and has it serve the input.
//!
//! Input: a protobuf `{repeated X509SVID svids = 1; map<string, bytes> bundles = 2;}`
//! (zmesh_fuzz::SpireInput).
//! Each input adds a sentinel SVID and bundle that are always refused, to tell when the
//! source has applied that input.
#![no_main]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::LazyLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use prost::Message;
use zmesh_compat::spire::test_server::{WorkloadApi, X509Svid};
use zmesh_compat::spire::{SpireConfig, SpireError, SpireSource};
use zmesh_fuzz::SpireInput;
use zmesh_identity::{SharedBundle, TrustBundle, WorkloadId};

struct Env {
    rt: tokio::runtime::Runtime,
    api: WorkloadApi,
    source: SpireSource,
}

static ENV: LazyLock<Env> = LazyLock::new(|| {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let dir: PathBuf = tempfile::Builder::new()
        .prefix("zmesh-fuzz-spire")
        .tempdir()
        .unwrap()
        .keep();
    let path = dir.join("agent.sock");
    let (api, source) = rt.block_on(async {
        let api = WorkloadApi::start(&path, vec![sentinel(0)], HashMap::new());
        let mut config = SpireConfig::new(&path);
        config.backoff_base = Duration::from_millis(10);
        config.backoff_cap = Duration::from_millis(100);
        let source = SpireSource::start(config, SharedBundle::new(TrustBundle::new()));
        (api, source)
    });
    // The fixture workload is served, so that a valid SVID for it is taken all the way.
    source.expect(&"spiffe://cluster.local/ns/default/sa/web".parse::<WorkloadId>().unwrap());
    Env { rt, api, source }
});

/// An SVID announced under an ID that never parses: always refused, naming `n`.
fn sentinel(n: u64) -> X509Svid {
    X509Svid {
        spiffe_id: format!("seq {n}"),
        ..X509Svid::default()
    }
}

static SEQ: AtomicU64 = AtomicU64::new(1);

fuzz_target!(|data: &[u8]| {
    let Ok(mut input) = SpireInput::decode(data) else {
        return;
    };
    let env = &*ENV;
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    let tag = format!("seq {n}");
    input.svids.push(sentinel(n));
    input.bundles.insert(tag.clone(), Vec::new());
    let mut changes = env.source.changes();
    env.api.set_svids(input.svids);
    env.api.set_bundles(input.bundles);
    let applied = |refused: &[SpireError]| {
        let svids = refused
            .iter()
            .any(|e| matches!(e, SpireError::BadSpiffeId { announced, .. } if *announced == tag));
        let bundles = refused
            .iter()
            .any(|e| matches!(e, SpireError::BadBundle { trust_domain, .. } if *trust_domain == tag));
        svids && bundles
    };
    env.rt.block_on(async {
        loop {
            let status = env.source.status();
            if applied(&status.refused) {
                for e in &status.refused {
                    let _ = e.to_string();
                }
                break;
            }
            if tokio::time::timeout(Duration::from_secs(20), changes.changed())
                .await
                .is_err()
            {
                panic!("the SPIRE source did not apply input {n}: {status:#?}");
            }
        }
    });
    let web = "spiffe://cluster.local/ns/default/sa/web".parse::<WorkloadId>().unwrap();
    let _ = env.source.current(&web);
});
