//! A SPIFFE Workload API server for tests, written to the specification independently of
//! the client in [`super`]: its X.509 messages are written here by hand (field numbers from
//! the spec) and served as gRPC over HTTP/2 on a unix socket. As the spec asks, calls
//! without the `workload.spiffe.io: true` header get InvalidArgument, a caller with no
//! identity gets PermissionDenied, and every stream sends the full current state, again on
//! each change.
//!
//! Also here: a small rcgen CA ([`Ca`]) that issues the SVIDs the server hands out.
//!
//! Compiled for this crate's tests and with the `test-support` feature.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::OffsetDateTime;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

// ---------------------------------------------------------------- certificates

/// A self-signed root CA (ECDSA P-256) that issues X.509-SVIDs.
pub struct Ca {
    params: CertificateParams,
    key: KeyPair,
    /// The root certificate, DER.
    pub der: Vec<u8>,
}

fn serial() -> SerialNumber {
    SerialNumber::from(rand::random::<u64>() >> 1)
}

impl Ca {
    /// A new root with `name` as its organization, valid from an hour ago for a day.
    pub fn root(name: &str) -> Ca {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name.push(DnType::OrganizationName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p.not_before = OffsetDateTime::now_utc() - Duration::from_secs(3600);
        p.not_after = OffsetDateTime::now_utc() + Duration::from_secs(86400);
        p.serial_number = Some(serial());
        let der = p.self_signed(&key).unwrap().der().to_vec();
        Ca {
            params: p,
            key,
            der,
        }
    }

    /// An X.509-SVID for `id` (its URI SAN) as SPIRE issues them: (leaf DER, PKCS#8 key DER).
    pub fn svid(&self, id: &str) -> (Vec<u8>, Vec<u8>) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = vec![SanType::URI(
            rcgen::string::Ia5String::try_from(id.to_owned()).unwrap(),
        )];
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.not_before = OffsetDateTime::now_utc() - Duration::from_secs(60);
        p.not_after = OffsetDateTime::now_utc() + Duration::from_secs(3600);
        p.serial_number = Some(serial());
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = p.signed_by(&key, &issuer).unwrap();
        (cert.der().to_vec(), key.serialize_der())
    }
}

/// A new SVID for `id` from `issuer`, announced with the roots of `bundle`.
pub fn svid_entry(id: &str, issuer: &Ca, bundle: &[&Ca]) -> X509Svid {
    let (cert, key) = issuer.svid(id);
    entry(id, cert, key, bundle)
}

/// An SVID announced as `id` with any certificate and key (DER), and the roots of `bundle`.
pub fn entry(id: &str, cert: Vec<u8>, key: Vec<u8>, bundle: &[&Ca]) -> X509Svid {
    X509Svid {
        spiffe_id: id.to_owned(),
        x509_svid: cert,
        x509_svid_key: key,
        bundle: bundle.iter().flat_map(|c| c.der.clone()).collect(),
        hint: String::new(),
    }
}

/// Bundles as FetchX509Bundles sends them: `spiffe://<trust domain>` to concatenated roots.
pub fn bundle_map(entries: &[(&str, &[&Ca])]) -> HashMap<String, Vec<u8>> {
    entries
        .iter()
        .map(|(td, cas)| {
            (
                format!("spiffe://{td}"),
                cas.iter().flat_map(|c| c.der.clone()).collect(),
            )
        })
        .collect()
}

// ---------------------------------------------------------------- messages

/// One X.509-SVID of the Workload API (`X509SVID`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct X509Svid {
    /// The SPIFFE ID the SVID is announced for.
    #[prost(string, tag = "1")]
    pub spiffe_id: String,
    /// Leaf first, then intermediates: concatenated DER.
    #[prost(bytes = "vec", tag = "2")]
    pub x509_svid: Vec<u8>,
    /// PKCS#8 private key, DER.
    #[prost(bytes = "vec", tag = "3")]
    pub x509_svid_key: Vec<u8>,
    /// The roots of the SVID's trust domain: concatenated DER.
    #[prost(bytes = "vec", tag = "4")]
    pub bundle: Vec<u8>,
    /// An operator-chosen label.
    #[prost(string, tag = "5")]
    pub hint: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct X509SvidResponse {
    #[prost(message, repeated, tag = "1")]
    svids: Vec<X509Svid>,
    #[prost(bytes = "vec", repeated, tag = "2")]
    crl: Vec<Vec<u8>>,
    #[prost(map = "string, bytes", tag = "3")]
    federated_bundles: HashMap<String, Vec<u8>>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct X509BundlesResponse {
    #[prost(bytes = "vec", repeated, tag = "1")]
    crl: Vec<Vec<u8>>,
    #[prost(map = "string, bytes", tag = "2")]
    bundles: HashMap<String, Vec<u8>>,
}

// ---------------------------------------------------------------- the server

/// How long [`WorkloadApi::stop`] waits for every stream and connection to close.
const STOP_WAIT: Duration = Duration::from_secs(10);

/// A SPIRE agent's Workload API on a unix socket. The SVIDs and bundles it serves can be
/// changed at any time (streams follow), and it can be stopped and started again on the
/// same path. Dropping it stops it (without waiting).
pub struct WorkloadApi {
    path: PathBuf,
    svids: watch::Sender<Vec<X509Svid>>,
    bundles: watch::Sender<HashMap<String, Vec<u8>>>,
    running: Option<(watch::Sender<bool>, JoinHandle<()>)>,
}

#[derive(Clone)]
struct State {
    svids: watch::Receiver<Vec<X509Svid>>,
    bundles: watch::Receiver<HashMap<String, Vec<u8>>>,
    stop: watch::Receiver<bool>,
}

impl WorkloadApi {
    /// Serves `svids` and `bundles` (see [`bundle_map`]) at `path`, replacing a stale
    /// socket there. Needs a tokio runtime.
    pub fn start(
        path: &Path,
        svids: Vec<X509Svid>,
        bundles: HashMap<String, Vec<u8>>,
    ) -> WorkloadApi {
        let mut server = WorkloadApi {
            path: path.to_owned(),
            svids: watch::channel(svids).0,
            bundles: watch::channel(bundles).0,
            running: None,
        };
        server.restart();
        server
    }

    /// Serves again after [`stop`](Self::stop), at the same path, with the current state.
    pub fn restart(&mut self) {
        assert!(self.running.is_none(), "the Workload API is already up");
        let _ = std::fs::remove_file(&self.path);
        let listener = UnixListener::bind(&self.path).unwrap();
        let (stop, stop_rx) = watch::channel(false);
        let state = State {
            svids: self.svids.subscribe(),
            bundles: self.bundles.subscribe(),
            stop: stop_rx,
        };
        self.running = Some((stop, tokio::spawn(serve(listener, state))));
    }

    /// Ends every stream (status OK), closes every connection, stops accepting and removes
    /// the socket; returns once all of that is done.
    pub async fn stop(&mut self) {
        let (stop, task) = self.running.take().expect("the Workload API is up");
        stop.send_replace(true);
        tokio::time::timeout(STOP_WAIT, task)
            .await
            .expect("the Workload API stops in time")
            .unwrap();
        let _ = std::fs::remove_file(&self.path);
    }

    /// Replaces the SVIDs (the full set); every FetchX509SVID stream sends the new set.
    pub fn set_svids(&self, svids: Vec<X509Svid>) {
        self.svids.send_replace(svids);
    }

    /// Replaces the bundles (the full set); every FetchX509Bundles stream sends the new set.
    pub fn set_bundles(&self, bundles: HashMap<String, Vec<u8>>) {
        self.bundles.send_replace(bundles);
    }
}

impl Drop for WorkloadApi {
    fn drop(&mut self) {
        if let Some((stop, _)) = &self.running {
            stop.send_replace(true);
        }
    }
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

async fn serve(listener: UnixListener, mut state: State) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((io, _)) => {
                    connections.spawn(connection(io, state.clone()));
                }
                Err(_) => break,
            },
            () = stopped(&mut state.stop) => break,
        }
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

async fn connection(io: UnixStream, mut state: State) {
    let mut conn = tokio::select! {
        handshake = h2::server::handshake(io) => match handshake {
            Ok(conn) => conn,
            Err(_) => return,
        },
        () = stopped(&mut state.stop) => return,
    };
    let mut calls = JoinSet::new();
    loop {
        tokio::select! {
            accepted = conn.accept() => match accepted {
                Some(Ok((req, respond))) => {
                    calls.spawn(call(req, respond, state.clone()));
                }
                _ => return,
            },
            () = stopped(&mut state.stop) => break,
        }
    }
    // The calls end their streams; the connection closes once they are gone.
    conn.graceful_shutdown();
    while let Some(Ok(_)) = conn.accept().await {}
}

fn grpc_frame(msg: &impl prost::Message) -> Bytes {
    let body = msg.encode_to_vec();
    let mut out = BytesMut::with_capacity(5 + body.len());
    out.put_u8(0);
    out.put_u32(u32::try_from(body.len()).unwrap());
    out.extend_from_slice(&body);
    out.freeze()
}

fn grpc_status(code: u32, message: &str) -> http::HeaderMap {
    let mut headers = http::HeaderMap::new();
    headers.insert("grpc-status", code.into());
    headers.insert("grpc-message", message.parse().unwrap());
    headers
}

/// A gRPC error without a body ("trailers-only" response).
fn refuse(mut respond: h2::server::SendResponse<Bytes>, code: u32, message: &str) {
    let mut response = http::Response::new(());
    response
        .headers_mut()
        .insert("content-type", "application/grpc".parse().unwrap());
    response.headers_mut().extend(grpc_status(code, message));
    let _ = respond.send_response(response, true);
}

async fn call(
    req: http::Request<h2::RecvStream>,
    respond: h2::server::SendResponse<Bytes>,
    mut state: State,
) {
    // The spec: calls without `workload.spiffe.io: true` get InvalidArgument.
    if req
        .headers()
        .get(super::SECURITY_HEADER)
        .map(|v| v.as_bytes())
        != Some(b"true")
    {
        return refuse(respond, 3, "security header missing from request");
    }
    match req.uri().path() {
        "/SpiffeWorkloadAPI/FetchX509SVID" => {
            // The spec: no identity for the caller -> PermissionDenied.
            if state.svids.borrow().is_empty() {
                return refuse(respond, 7, "no identity issued");
            }
            let to_message = |s: &Vec<X509Svid>| X509SvidResponse {
                svids: s.clone(),
                ..Default::default()
            };
            stream(respond, &mut state.svids, &mut state.stop, to_message).await;
        }
        "/SpiffeWorkloadAPI/FetchX509Bundles" => {
            let to_message = |b: &HashMap<String, Vec<u8>>| X509BundlesResponse {
                bundles: b.clone(),
                ..Default::default()
            };
            stream(respond, &mut state.bundles, &mut state.stop, to_message).await;
        }
        _ => refuse(respond, 12, "unimplemented"),
    }
}

/// Sends the full state, again on every change, until the server stops.
async fn stream<T, M: prost::Message>(
    mut respond: h2::server::SendResponse<Bytes>,
    state: &mut watch::Receiver<T>,
    stop: &mut watch::Receiver<bool>,
    to_message: impl Fn(&T) -> M,
) {
    let mut response = http::Response::new(());
    response
        .headers_mut()
        .insert("content-type", "application/grpc".parse().unwrap());
    let Ok(mut send) = respond.send_response(response, false) else {
        return;
    };
    loop {
        let frame = grpc_frame(&to_message(&state.borrow_and_update()));
        if send.send_data(frame, false).is_err() {
            return;
        }
        tokio::select! {
            changed = state.changed() => if changed.is_err() { break },
            () = stopped(stop) => break,
        }
    }
    let _ = send.send_trailers(grpc_status(0, "stopped"));
}
