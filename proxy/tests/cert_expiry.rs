//! A connection authenticated with a certificate that has since expired carries no new
//! tunnels, on either side: the inbound proxy refuses new streams of a client whose
//! certificate expired (and sends GOAWAY), and the outbound pool stops reusing a
//! connection whose server's certificate expired. New handshakes then need valid
//! certificates, so an expired identity fails closed.

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::*;
use http::{Method, Request, StatusCode};
use rustls::sign::CertifiedKey;
use rustls_pki_types::ServerName;
use time::OffsetDateTime;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use zmesh_identity::SharedBundle;
use zmesh_proxy::{StaticCredentials, TlsCredentials};

const T: Duration = Duration::from_secs(30);
/// How long the short-lived certificates live.
const LIFE: i64 = 3;

fn short_lived(
    ca: &Ca,
    uri: &str,
) -> (
    Vec<rustls_pki_types::CertificateDer<'static>>,
    rustls_pki_types::PrivateKeyDer<'static>,
    SystemTime,
) {
    let now = OffsetDateTime::now_utc();
    let not_after = now + time::Duration::seconds(LIFE);
    let (chain, key) = ca.leaf_valid(uri, now - time::Duration::hours(1), not_after);
    // X.509 times have whole seconds.
    let expiry = SystemTime::UNIX_EPOCH + Duration::from_secs(not_after.unix_timestamp() as u64);
    (chain, key, expiry)
}

/// Waits until `t` has passed (the certificates' expiry is the condition itself).
async fn until_past(t: SystemTime) {
    let wait =
        t.duration_since(SystemTime::now()).unwrap_or_default() + Duration::from_millis(1100);
    tokio::time::sleep(wait).await;
}

fn connect(authority: &str) -> Request<()> {
    Request::builder()
        .method(Method::CONNECT)
        .uri(authority)
        .body(())
        .unwrap()
}

#[tokio::test]
async fn a_client_whose_certificate_expired_gets_no_new_tunnels_on_its_connection() {
    let mesh = Mesh::new(140).await;
    let server = mesh.server.local_addr().unwrap().to_string();
    let server_id = mesh
        .store
        .snapshot()
        .workloads()
        .find(|w| w.name == "server")
        .unwrap()
        .identity
        .clone();
    let (chain, key, expiry) =
        short_lived(&mesh.ca, "spiffe://cluster.local/ns/default/sa/client-sa");
    let provider = zmesh_identity::tls::crypto_provider();
    let cert = Arc::new(CertifiedKey::from_der(chain, key, &provider).unwrap());
    let config = zmesh_identity::tls::client_config(
        cert,
        SharedBundle::new(mesh.ca.bundle()),
        vec![server_id.spiffe_id().clone()],
    )
    .unwrap();
    let tcp = TcpStream::connect(mesh.b.addrs.inbound).await.unwrap();
    let name = ServerName::IpAddress(mesh.b.addrs.inbound.ip().into());
    let tls = TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    let (send, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(conn);

    // While the certificate is valid: a tunnel.
    let mut ready = send.clone().ready().await.unwrap();
    let (resp, _open) = ready.send_request(connect(&server), false).unwrap();
    let resp = tokio::time::timeout(T, resp).await.unwrap().unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let (_accepted, _) = tokio::time::timeout(T, mesh.server.accept())
        .await
        .unwrap()
        .unwrap();

    until_past(expiry).await;
    let mut ready = send.clone().ready().await.unwrap();
    let (resp, _) = ready.send_request(connect(&server), false).unwrap();
    let err = tokio::time::timeout(T, resp).await.unwrap().unwrap_err();
    assert_eq!(err.reason(), Some(h2::Reason::REFUSED_STREAM), "{err}");
    assert_eq!(
        mesh.b
            .metrics
            .refused_stream_count("peer_certificate_expired"),
        1
    );
    // And GOAWAY: the connection takes no more streams; the client must handshake anew,
    // which an expired certificate cannot.
    let refused = tokio::time::timeout(T, send.clone().ready()).await.unwrap();
    assert!(
        refused.is_err(),
        "the connection still takes streams after GOAWAY"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(200), mesh.server.accept())
            .await
            .is_err(),
        "the refused stream reached the server"
    );
}

#[tokio::test]
async fn a_pooled_connection_is_not_reused_once_the_servers_certificate_expired() {
    let expiry = Arc::new(std::sync::Mutex::new(None));
    let seen = expiry.clone();
    let mesh = Mesh::with(
        141,
        MeshOptions {
            b_credentials: Some(Box::new(move |ca, server| {
                let (chain, key, t) = short_lived(ca, &server.identity.to_string());
                *seen.lock().unwrap() = Some(t);
                let creds = StaticCredentials::new(
                    ca.trust_domain.clone(),
                    ca.bundle(),
                    [(server.identity.clone(), chain, key)],
                )
                .unwrap();
                Arc::new(creds) as Arc<dyn TlsCredentials>
            })),
            ..Default::default()
        },
    )
    .await;
    let expiry = expiry.lock().unwrap().unwrap();

    let mut client = mesh.connect().await;
    let (mut server, _) = tokio::time::timeout(T, mesh.server.accept())
        .await
        .unwrap()
        .unwrap();
    exchange(&mut client, &mut server, b"ping", b"pong").await;
    assert_eq!(mesh.a.metrics.pool_connections_created(), 1);

    until_past(expiry).await;
    // A new tunnel: the pooled connection (to a server whose certificate expired) is not
    // used, and a new handshake fails on the expired certificate.
    let mut late = mesh.connect().await;
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(T, late.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(
        n, 0,
        "a tunnel was opened to a server with an expired certificate"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(200), mesh.server.accept())
            .await
            .is_err(),
        "the server got a connection"
    );
    // The tunnel opened before the expiry is not cut.
    exchange(&mut client, &mut server, b"still", b"here").await;
}
