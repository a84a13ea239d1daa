//! Root rotation on a running server: add publishes the new root, switch signs with it,
//! drop waits for old leaves; leaves of both roots validate during the overlap.

mod common;

use std::time::Duration;

use common::*;
use tonic::Code;
use zmesh_certs::{
    join, new_key_and_csr, ClientCredential, IstioCaClient, NodeName, Phase, Policy, RotationStep,
    StoreError,
};
use zmesh_identity::{SpiffeId, TrustDomain};

async fn node_client(ca: &Ca, node: &str) -> IstioCaClient {
    let name = NodeName::new(node).unwrap();
    let token = ca
        .store
        .create_join_token(&name, Duration::from_secs(600))
        .unwrap();
    let creds = join(
        &ca.addr,
        &ca.bundle_pem(),
        &token,
        &name,
        &TrustDomain::default(),
        &ca.node_dir(node),
    )
    .await
    .unwrap();
    IstioCaClient::new(
        &ca.addr,
        &creds.roots_pem.clone(),
        ClientCredential::NodeCert(creds),
    )
    .unwrap()
}

async fn issue(client: &IstioCaClient, id: &str) -> Vec<String> {
    let csr = new_key_and_csr(&SpiffeId::parse(id).unwrap()).unwrap().1;
    client.create_certificate(&csr, Some(id), 0).await.unwrap()
}

#[tokio::test]
async fn rotation_phases_on_a_running_server() {
    let ca = Ca::start(Policy::default()).await;
    let client = node_client(&ca, "node-a").await;
    let old_root = ca.bundle_pem();
    let old_leaf = issue(&client, WEB).await;
    assert_eq!(old_leaf[2], old_root);

    // add: every response carries both roots; the old chain still signs.
    assert_eq!(
        ca.store.rotate(RotationStep::Add, false).unwrap(),
        Phase::Added { old: 1, new: 2 }
    );
    let during_add = issue(&client, WEB).await;
    assert_eq!(certs(&during_add[2]).len(), 2, "both roots in the bundle");
    assert!(during_add[2].starts_with(&old_root));
    let new_root = during_add[2][old_root.len()..].to_string();
    assert_eq!(during_add[1], old_leaf[1], "old intermediate still signs");
    assert_eq!(
        chains_to(&during_add[..2], &old_root),
        chains_to(&old_leaf[..2], &old_root)
    );
    assert!(chains_to(&during_add[..2], &new_root).is_none());
    assert_eq!(ca.store.status().unwrap().phase, "add");

    // switch: new leaves chain to the new root only.
    assert_eq!(
        ca.store.rotate(RotationStep::Next, false).unwrap(),
        Phase::Switched { old: 1, new: 2 }
    );
    let new_leaf = issue(&client, WEB).await;
    assert_eq!(certs(&new_leaf[2]).len(), 2);
    assert_ne!(new_leaf[1], old_leaf[1], "new intermediate signs");
    assert!(chains_to(&new_leaf[..2], &new_root).is_some());
    assert!(chains_to(&new_leaf[..2], &old_root).is_none());
    // Traffic keeps working: a peer holding an old-root leaf and one holding a new-root
    // leaf both validate against the switch-phase bundle.
    let bundle = new_leaf[2].clone();
    assert_eq!(
        verify_with_identity(&old_leaf[..2], &bundle),
        Ok(WEB.to_string())
    );
    assert_eq!(
        verify_with_identity(&new_leaf[..2], &bundle),
        Ok(WEB.to_string())
    );

    // drop: refused while old-root leaves (the node cert, two workload leaves) live.
    let status = ca.store.status().unwrap();
    assert_eq!(status.phase, "switch");
    assert_eq!(status.leaves_on_old_root.len(), 3);
    assert_eq!(status.roots.iter().filter(|r| r.signing).count(), 1);
    match ca.store.rotate(RotationStep::Drop, false) {
        Err(StoreError::Rotation(msg)) => assert!(msg.contains("3 unexpired"), "{msg}"),
        other => panic!("drop allowed with live old leaves: {other:?}"),
    }
    assert_eq!(
        ca.store.rotate(RotationStep::Drop, true).unwrap(),
        Phase::Stable { active: 2 }
    );
    assert_eq!(ca.bundle_pem(), new_root);

    // The node certificate came from the dropped root: the CA no longer accepts it.
    let csr = new_key_and_csr(&SpiffeId::parse(WEB).unwrap()).unwrap().1;
    let err = client
        .create_certificate(&csr, Some(WEB), 0)
        .await
        .unwrap_err();
    assert_ne!(err.code(), Code::Ok);
    // A node that re-joins, trusting only the new root, gets new-root leaves; the
    // server's own certificate was re-issued from the new chain.
    let rejoined = node_client(&ca, "node-a").await;
    assert_eq!(rejoined.roots_pem().concat(), new_root);
    let after = issue(&rejoined, WEB).await;
    assert_eq!(after[2], new_root);
    assert_eq!(
        verify_with_identity(&after[..2], &new_root),
        Ok(WEB.to_string())
    );
    assert!(verify_with_identity(&old_leaf[..2], &new_root).is_err());
    ca.stop().await;
}

#[tokio::test]
async fn drop_is_allowed_once_old_leaves_expired() {
    let short = Duration::from_secs(3);
    let ca = Ca::start(Policy {
        max_leaf_lifetime: short,
        node_cert_lifetime: short,
    })
    .await;
    let client = node_client(&ca, "node-a").await;
    issue(&client, WEB).await;
    ca.store.rotate(RotationStep::Add, false).unwrap();
    ca.store.rotate(RotationStep::Switch, false).unwrap();
    assert!(matches!(
        ca.store.rotate(RotationStep::Drop, false),
        Err(StoreError::Rotation(_))
    ));
    // Wait for the condition itself: the ledger reports no live old-root leaf.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !ca.store.status().unwrap().leaves_on_old_root.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "old leaves never expired"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        ca.store.rotate(RotationStep::Drop, false).unwrap(),
        Phase::Stable { active: 2 }
    );
    ca.stop().await;
}
