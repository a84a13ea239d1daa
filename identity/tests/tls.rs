//! Real mutual-TLS handshakes over loopback with the SVID verifiers.

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use rustls::sign::CertifiedKey;
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use zmesh_identity::tls::{
    client_config, crypto_provider, peer_identity, server_config, server_name, svid_error,
    FixedCert, SvidServerVerifier,
};
use zmesh_identity::{SharedBundle, SpiffeId, SvidError, TrustBundle};

const SERVER_ID: &str = "spiffe://cluster.local/ns/db/sa/postgres";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/web";
const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

struct Pki {
    root: Ca,
    inter: Ca,
    bundle: SharedBundle,
}

fn pki() -> Pki {
    let root = Ca::root("cluster root");
    let inter = root.intermediate("cluster intermediate");
    let bundle = SharedBundle::new(root.bundle("cluster.local"));
    Pki {
        root,
        inter,
        bundle,
    }
}

fn key_for(pki: &Pki, spiffe_id: &str) -> Arc<CertifiedKey> {
    certified_key(&svid(spiffe_id, &pki.inter), &[&pki.inter])
}

struct Outcome {
    client: Result<Option<SpiffeId>, std::io::Error>,
    server: Result<Option<SpiffeId>, std::io::Error>,
}

/// One handshake plus an echo round trip; each side reports the peer it saw.
async fn handshake(server_cfg: rustls::ServerConfig, client_cfg: rustls::ClientConfig) -> Outcome {
    let listener = TcpListener::bind((LOOPBACK, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(server_cfg));
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        let mut tls = acceptor.accept(tcp).await?;
        let (_, conn) = tls.get_ref();
        assert_eq!(conn.alpn_protocol(), Some(&b"h2"[..]));
        assert_eq!(
            conn.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        assert!(conn.server_name().is_none(), "the client must send no SNI");
        assert_eq!(
            conn.negotiated_key_exchange_group().map(|g| g.name()),
            Some(rustls::NamedGroup::X25519MLKEM768)
        );
        let peer = peer_identity(conn);
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await?;
        tls.write_all(&buf).await?;
        tls.shutdown().await?;
        Ok::<_, std::io::Error>(peer)
    });
    let client = async {
        let tcp = TcpStream::connect(addr).await?;
        let connector = TlsConnector::from(Arc::new(client_cfg));
        let mut tls = connector.connect(server_name(LOOPBACK), tcp).await?;
        let peer = peer_identity(tls.get_ref().1);
        tls.write_all(b"ping").await?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await?;
        assert_eq!(&buf, b"ping");
        Ok::<_, std::io::Error>(peer)
    };
    let client = tokio::time::timeout(Duration::from_secs(10), client)
        .await
        .expect("client timed out");
    let server = tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("server timed out")
        .unwrap();
    Outcome { client, server }
}

fn tls_error(err: &std::io::Error) -> &rustls::Error {
    err.get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
        .unwrap_or_else(|| panic!("not a TLS error: {err:?}"))
}

fn svid_rule(err: &std::io::Error) -> Option<SvidError> {
    let rustls_err = err.get_ref()?.downcast_ref::<rustls::Error>()?;
    svid_error(rustls_err).cloned()
}

fn server_cfg(pki: &Pki) -> rustls::ServerConfig {
    server_config(
        Arc::new(FixedCert(key_for(pki, SERVER_ID))),
        pki.bundle.clone(),
        td("cluster.local"),
    )
    .unwrap()
}

#[tokio::test]
async fn mutual_auth_succeeds_with_right_identities() {
    let pki = pki();
    let client = client_config(
        key_for(&pki, CLIENT_ID),
        pki.bundle.clone(),
        vec![id(SERVER_ID)],
    )
    .unwrap();
    let out = handshake(server_cfg(&pki), client).await;
    assert_eq!(out.client.unwrap(), Some(id(SERVER_ID)));
    assert_eq!(out.server.unwrap(), Some(id(CLIENT_ID)));
}

#[tokio::test]
async fn client_rejects_unexpected_server_identity() {
    let pki = pki();
    let expected = vec![id("spiffe://cluster.local/ns/db/sa/mysql")];
    let client = client_config(key_for(&pki, CLIENT_ID), pki.bundle.clone(), expected).unwrap();
    let out = handshake(server_cfg(&pki), client).await;
    let err = out.client.expect_err("client must refuse the server");
    let rule = svid_rule(&err).expect("an SVID rule error");
    assert!(
        matches!(&rule, SvidError::UnexpectedIdentity { id: got, .. } if got.to_string() == SERVER_ID),
        "{rule:?}"
    );
    assert!(out.server.is_err());
}

#[tokio::test]
async fn server_rejects_client_from_another_trust_domain() {
    let pki = pki();
    // The server trusts other.org's root too, so the chain is fine: only the trust
    // domain is wrong.
    let other_root = Ca::root("other root");
    pki.bundle
        .update(|b| b.add_root(&td("other.org"), other_root.der.clone()))
        .unwrap();
    let foreign = certified_key(
        &svid("spiffe://other.org/ns/default/sa/web", &other_root),
        &[],
    );
    let client = client_config(foreign, pki.bundle.clone(), vec![id(SERVER_ID)]).unwrap();
    let out = handshake(server_cfg(&pki), client).await;
    let err = out.server.expect_err("server must refuse the client");
    let rule = svid_rule(&err).expect("an SVID rule error");
    assert_eq!(rule.rule_name(), "svid.wrong-trust-domain", "{rule}");
    assert!(
        out.client.is_err(),
        "the client must see the handshake fail"
    );
}

#[tokio::test]
async fn server_rejects_client_without_certificate() {
    let pki = pki();
    let verifier = SvidServerVerifier::new(pki.bundle.clone(), vec![id(SERVER_ID)]).unwrap();
    let mut client = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    client.alpn_protocols = vec![b"h2".to_vec()];
    let out = handshake(server_cfg(&pki), client).await;
    let err = out
        .server
        .expect_err("server must require a client certificate");
    let rustls_err = err
        .get_ref()
        .unwrap()
        .downcast_ref::<rustls::Error>()
        .unwrap();
    assert_eq!(rustls_err, &rustls::Error::NoCertificatesPresented);
}

#[tokio::test]
async fn server_rejects_expired_client_certificate() {
    let pki = pki();
    let mut p = svid_params(CLIENT_ID);
    p.not_before = OffsetDateTime::now_utc() - Duration::from_secs(7200);
    p.not_after = OffsetDateTime::now_utc() - Duration::from_secs(60);
    let expired = certified_key(&sign_leaf(&p, &pki.inter), &[&pki.inter]);
    let client = client_config(expired, pki.bundle.clone(), vec![id(SERVER_ID)]).unwrap();
    let out = handshake(server_cfg(&pki), client).await;
    let err = out
        .server
        .expect_err("server must refuse an expired client");
    assert!(
        matches!(
            tls_error(&err),
            rustls::Error::InvalidCertificate(rustls::CertificateError::ExpiredContext { .. })
        ),
        "{err:?}"
    );
    // The client is told why, with the alert ztunnel sends.
    let client_err = out.client.expect_err("the client sees the refusal");
    assert_eq!(
        tls_error(&client_err),
        &rustls::Error::AlertReceived(rustls::AlertDescription::CertificateExpired)
    );
}

#[tokio::test]
async fn client_rejects_server_with_untrusted_root() {
    let pki = pki();
    let rogue = Ca::root("rogue");
    let rogue_server = certified_key(&svid(SERVER_ID, &rogue), &[]);
    let server = server_config(
        Arc::new(FixedCert(rogue_server)),
        pki.bundle.clone(),
        td("cluster.local"),
    )
    .unwrap();
    let client = client_config(
        key_for(&pki, CLIENT_ID),
        pki.bundle.clone(),
        vec![id(SERVER_ID)],
    )
    .unwrap();
    let out = handshake(server, client).await;
    let err = out.client.expect_err("client must refuse the rogue server");
    assert_eq!(
        tls_error(&err),
        &rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)
    );
    // ztunnel refuses an untrusted chain with unknown_ca; so do we.
    let server_err = out.server.expect_err("the server sees the refusal");
    assert_eq!(
        tls_error(&server_err),
        &rustls::Error::AlertReceived(rustls::AlertDescription::UnknownCA)
    );
}

#[tokio::test]
async fn root_rotation_keeps_both_generations_talking() {
    // Server still on the old root, client already on the new one; both trust both.
    let old = Ca::root("old root");
    let new = Ca::root("new root");
    let mut bundle = TrustBundle::new();
    bundle
        .add_root(&td("cluster.local"), old.der.clone())
        .unwrap();
    bundle
        .add_root(&td("cluster.local"), new.der.clone())
        .unwrap();
    let bundle = SharedBundle::new(bundle);
    let server = server_config(
        Arc::new(FixedCert(certified_key(&svid(SERVER_ID, &old), &[]))),
        bundle.clone(),
        td("cluster.local"),
    )
    .unwrap();
    let client = client_config(
        certified_key(&svid(CLIENT_ID, &new), &[]),
        bundle.clone(),
        vec![id(SERVER_ID)],
    )
    .unwrap();
    let out = handshake(server, client).await;
    assert_eq!(out.client.unwrap(), Some(id(SERVER_ID)));
    assert_eq!(out.server.unwrap(), Some(id(CLIENT_ID)));
}

#[test]
fn client_config_needs_expected_identities() {
    let pki = pki();
    let err = client_config(key_for(&pki, CLIENT_ID), pki.bundle.clone(), vec![]).unwrap_err();
    assert!(matches!(
        err,
        zmesh_identity::tls::TlsConfigError::NoExpectedIdentities
    ));
    let _ = &pki.root;
}

#[test]
fn provider_has_ztunnel_suites_and_groups() {
    let p = crypto_provider();
    let suites: Vec<_> = p.cipher_suites.iter().map(|s| s.suite()).collect();
    assert_eq!(
        suites,
        [
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384,
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        ]
    );
    let groups: Vec<_> = p.kx_groups.iter().map(|g| g.name()).collect();
    assert_eq!(
        groups,
        [
            rustls::NamedGroup::X25519MLKEM768,
            rustls::NamedGroup::X25519,
            rustls::NamedGroup::secp256r1,
            rustls::NamedGroup::secp384r1
        ]
    );
}
