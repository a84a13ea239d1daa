//! The certificate manager against an in-test CA with short lifetimes.

mod common;

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use common::*;
use rcgen::{CertificateSigningRequestParams, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose};
use time::OffsetDateTime;
use zmesh_identity::manager::{CertError, CertManager, CertManagerConfig};
use zmesh_identity::{
    AuthorityError, CertificateAuthority, Fingerprint, IssuedChain, SharedBundle, SignFuture,
    TrustBundle, WorkloadId,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Good,
    WrongIdentity,
    ForeignKey,
    UnlistedRoot,
}

/// Signs CSRs with rcgen: root -> intermediate -> leaf, returning the root as the bundle.
struct TestCa {
    root: Mutex<Arc<Ca>>,
    inter: Mutex<Arc<Ca>>,
    /// Extra roots to advertise (the old root during a rotation).
    extra_roots: Mutex<Vec<String>>,
    lifetime: Duration,
    mode: Mutex<Mode>,
    down: AtomicBool,
    calls: AtomicUsize,
    failures: AtomicUsize,
}

impl TestCa {
    fn new(lifetime: Duration) -> Arc<Self> {
        let root = Ca::root("test root");
        let inter = root.intermediate("test intermediate");
        Arc::new(Self {
            root: Mutex::new(Arc::new(root)),
            inter: Mutex::new(Arc::new(inter)),
            extra_roots: Mutex::default(),
            lifetime,
            mode: Mutex::new(Mode::Good),
            down: AtomicBool::new(false),
            calls: AtomicUsize::new(0),
            failures: AtomicUsize::new(0),
        })
    }

    fn set_mode(&self, m: Mode) {
        *self.mode.lock().unwrap() = m;
    }

    fn root_der(&self) -> rustls_pki_types::CertificateDer<'static> {
        self.root.lock().unwrap().der.clone()
    }

    /// Starts a root rotation: a new root signs from now on; both roots are advertised.
    fn rotate_root(&self) {
        let old_pem = self.root.lock().unwrap().pem.clone();
        let root = Ca::root("test root 2");
        let inter = root.intermediate("test intermediate 2");
        *self.root.lock().unwrap() = Arc::new(root);
        *self.inter.lock().unwrap() = Arc::new(inter);
        self.extra_roots.lock().unwrap().push(old_pem);
    }

    fn issue(&self, csr_pem: &str, identity: &WorkloadId) -> Result<IssuedChain, AuthorityError> {
        let mode = *self.mode.lock().unwrap();
        if self.down.load(Ordering::SeqCst) {
            return Err(AuthorityError::Unavailable("test CA is down".into()));
        }
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| AuthorityError::Malformed(e.to_string()))?;
        // A real CA checks the CSR names the identity it is asked for.
        let want = uri(&identity.to_string());
        if csr.params.subject_alt_names != vec![want] {
            return Err(AuthorityError::Refused("CSR SAN mismatch".into()));
        }
        // zmesh's CSRs: empty subject, ECDSA P-256.
        assert!(
            csr.params.distinguished_name.iter().next().is_none(),
            "CSR subject must be empty"
        );
        assert_eq!(csr.public_key.algorithm(), &rcgen::PKCS_ECDSA_P256_SHA256);
        if mode == Mode::WrongIdentity {
            csr.params.subject_alt_names = vec![uri("spiffe://cluster.local/ns/evil/sa/x")];
        }
        let p = &mut csr.params;
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = OffsetDateTime::now_utc();
        p.not_before = now;
        p.not_after = now + self.lifetime;
        p.serial_number = Some(rcgen::SerialNumber::from(rand::random::<u64>() >> 1));
        let inter = self.inter.lock().unwrap().clone();
        let leaf_pem = if mode == Mode::ForeignKey {
            sign_leaf(&csr.params, &inter).pem
        } else {
            csr.signed_by(&inter.issuer()).unwrap().pem()
        };
        let mut roots_pem = vec![self.root.lock().unwrap().pem.clone()];
        roots_pem.extend(self.extra_roots.lock().unwrap().iter().cloned());
        if mode == Mode::UnlistedRoot {
            roots_pem = vec![Ca::root("unrelated").pem];
        }
        Ok(IssuedChain {
            chain_pem: vec![leaf_pem, inter.pem.clone()],
            roots_pem,
        })
    }
}

impl CertificateAuthority for TestCa {
    fn sign<'a>(
        &'a self,
        csr_pem: &'a str,
        identity: &'a WorkloadId,
        _validity: Duration,
    ) -> SignFuture<'a> {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let out = self.issue(csr_pem, identity);
            if out.is_err() {
                self.failures.fetch_add(1, Ordering::SeqCst);
            }
            out
        })
    }
}

fn workload(sa: &str) -> WorkloadId {
    WorkloadId::new(&td("cluster.local"), "default", sa).unwrap()
}

fn fast_config() -> CertManagerConfig {
    CertManagerConfig {
        validity: Duration::from_secs(4),
        backoff_base: Duration::from_millis(50),
        backoff_cap: Duration::from_millis(400),
    }
}

fn manager(ca: &Arc<TestCa>, bundle: &SharedBundle) -> CertManager {
    CertManager::new(ca.clone(), bundle.clone(), fast_config())
}

/// Polls `cond` until it holds; fails the test after `limit`.
async fn wait_for<F, Fut>(what: &str, limit: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn serial_of(m: &CertManager, w: &WorkloadId) -> Option<String> {
    m.status()
        .into_iter()
        .find(|s| &s.workload == w)
        .and_then(|s| s.serial)
}

#[tokio::test]
async fn issues_validates_and_renews_at_half_life() {
    let ca = TestCa::new(Duration::from_secs(4));
    let bundle = SharedBundle::default();
    let m = manager(&ca, &bundle);
    let w = workload("web");
    let key = tokio::time::timeout(Duration::from_secs(10), m.certificate(&w))
        .await
        .unwrap()
        .unwrap();
    // The certificate is a valid SVID of the workload, chained to the CA's root, which the
    // node learned from the CA's answer.
    assert_eq!(
        zmesh_identity::verify_svid(&key.cert, &bundle.snapshot(), SystemTime::now())
            .unwrap()
            .id,
        *w.spiffe_id()
    );
    assert_eq!(
        bundle.snapshot().fingerprints(),
        vec![(td("cluster.local"), Fingerprint::of(&ca.root_der()))]
    );
    let status = m.status();
    assert_eq!(status.len(), 1);
    let first = status[0].clone();
    let not_after = first.not_after.unwrap();
    let not_before = not_after - Duration::from_secs(4);
    let next = first.next_attempt.unwrap();
    // Renewal is scheduled at half of the lifetime.
    assert_eq!(next, not_before + Duration::from_secs(2));
    assert!(first.last_error.is_none());
    // The renewal happens on its own, with a new certificate.
    let first_serial = first.serial.unwrap();
    wait_for("renewal", Duration::from_secs(10), || async {
        serial_of(&m, &w).is_some_and(|s| s != first_serial)
    })
    .await;
    assert!(ca.calls.load(Ordering::SeqCst) >= 2);
    let renewed = m.current(&w).unwrap();
    assert_ne!(renewed.cert[0], key.cert[0]);
}

#[tokio::test]
async fn keeps_old_certificate_while_ca_is_down_then_recovers() {
    let ca = TestCa::new(Duration::from_secs(4));
    let bundle = SharedBundle::default();
    let m = manager(&ca, &bundle);
    let w = workload("web");
    m.ensure(&w);
    m.ensure(&w); // idempotent
    wait_for("first certificate", Duration::from_secs(10), || async {
        m.current(&w).is_some()
    })
    .await;
    let first = m.current(&w).unwrap();
    ca.down.store(true, Ordering::SeqCst);

    // Renewal fails repeatedly; the old certificate keeps being served meanwhile.
    wait_for("three failed renewals", Duration::from_secs(10), || async {
        m.status()[0].consecutive_failures >= 3
    })
    .await;
    let s = m.status()[0].clone();
    if SystemTime::now() + Duration::from_millis(200) < s.not_after.unwrap() {
        let cur = m
            .current(&w)
            .expect("the old certificate must still be served");
        assert_eq!(cur.cert[0], first.cert[0]);
    }
    assert_eq!(
        s.last_error,
        Some(CertError::Authority(AuthorityError::Unavailable(
            "test CA is down".into()
        )))
    );

    // Once expired it is no longer served: fail closed.
    let not_after = s.not_after.unwrap();
    wait_for("expiry", Duration::from_secs(10), || async {
        SystemTime::now() > not_after + Duration::from_millis(10)
    })
    .await;
    assert!(m.current(&w).is_none());
    let err = m.certificate(&w).await.unwrap_err();
    assert!(
        matches!(err, CertError::Authority(AuthorityError::Unavailable(_))),
        "{err}"
    );

    // Retries are capped at 400 ms, so the CA's return is noticed quickly.
    ca.down.store(false, Ordering::SeqCst);
    wait_for("recovery", Duration::from_secs(10), || async {
        m.current(&w).is_some()
    })
    .await;
    let s = m.status()[0].clone();
    assert_eq!(s.consecutive_failures, 0);
    assert!(s.last_error.is_none());
    assert_ne!(m.current(&w).unwrap().cert[0], first.cert[0]);
}

#[tokio::test]
async fn backoff_spaces_out_retries() {
    let ca = TestCa::new(Duration::from_secs(60));
    ca.down.store(true, Ordering::SeqCst);
    let bundle = SharedBundle::default();
    let config = CertManagerConfig {
        validity: Duration::from_secs(60),
        backoff_base: Duration::from_millis(100),
        backoff_cap: Duration::from_millis(200),
    };
    let m = CertManager::new(ca.clone(), bundle, config);
    let w = workload("web");
    m.ensure(&w);
    let start = tokio::time::Instant::now();
    wait_for("four failures", Duration::from_secs(10), || async {
        ca.failures.load(Ordering::SeqCst) >= 4
    })
    .await;
    // Attempt 1 is immediate, then waits of at least 50, 100, 100 ms (jitter keeps at
    // least half of 100, 200, 200). A lower bound only: slow machines just take longer.
    assert!(
        start.elapsed() >= Duration::from_millis(250),
        "{:?}",
        start.elapsed()
    );
    let s = m.status()[0].clone();
    let next = s.next_attempt.unwrap();
    assert!(
        next <= SystemTime::now() + Duration::from_millis(200),
        "capped at 200 ms"
    );
}

#[tokio::test]
async fn force_renew_reports_outcome() {
    let ca = TestCa::new(Duration::from_secs(3600));
    let bundle = SharedBundle::default();
    let m = manager(&ca, &bundle);
    let w = workload("web");
    assert_eq!(
        m.force_renew(&w).await,
        Err(CertError::UnknownWorkload(w.clone()))
    );
    m.certificate(&w).await.unwrap();
    let before = serial_of(&m, &w).unwrap();
    let after = m.force_renew(&w).await.unwrap();
    assert_ne!(after.serial.as_deref(), Some(before.as_str()));
    assert_eq!(serial_of(&m, &w), after.serial);

    ca.down.store(true, Ordering::SeqCst);
    let err = m.force_renew(&w).await.unwrap_err();
    assert!(matches!(
        err,
        CertError::Authority(AuthorityError::Unavailable(_))
    ));
    // The failed rotation leaves the current certificate in place.
    assert_eq!(serial_of(&m, &w), after.serial);
    assert!(m.current(&w).is_some());
}

#[tokio::test]
async fn forget_stops_management_and_drops_the_key() {
    let ca = TestCa::new(Duration::from_secs(3600));
    let bundle = SharedBundle::default();
    let m = manager(&ca, &bundle);
    let (a, b) = (workload("a"), workload("b"));
    m.certificate(&a).await.unwrap();
    m.certificate(&b).await.unwrap();
    let resolver_a = m.resolver(&a);
    let resolver_b = m.resolver(&b);
    // While managed, the resolver serves the workload's certificate.
    let server =
        zmesh_identity::tls::server_config(resolver_b, bundle.clone(), td("cluster.local"))
            .unwrap();
    let client = zmesh_identity::tls::client_config(
        m.current(&a).unwrap(),
        bundle.clone(),
        vec![b.spiffe_id().clone()],
    )
    .unwrap();
    handshake(server, client).await.unwrap();
    assert_eq!(
        m.status()
            .iter()
            .map(|s| s.workload.clone())
            .collect::<Vec<_>>(),
        vec![a.clone(), b.clone()]
    );
    assert!(m.forget(&a));
    assert!(!m.forget(&a));
    assert!(m.current(&a).is_none());
    assert_eq!(m.status().len(), 1);
    assert_eq!(
        m.force_renew(&a).await,
        Err(CertError::UnknownWorkload(a.clone()))
    );
    assert!(m.current(&b).is_some());
    // A server using the forgotten workload's resolver has no certificate to present.
    let server =
        zmesh_identity::tls::server_config(resolver_a, bundle.clone(), td("cluster.local"))
            .unwrap();
    let client = zmesh_identity::tls::client_config(
        m.current(&b).unwrap(),
        bundle.clone(),
        vec![a.spiffe_id().clone()],
    )
    .unwrap();
    assert!(handshake(server, client).await.is_err());
}

/// Client side of one loopback handshake; Ok when both sides complete it.
async fn handshake(
    server: rustls::ServerConfig,
    client: rustls::ClientConfig,
) -> std::io::Result<()> {
    use std::net::{IpAddr, Ipv4Addr};
    let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let listener = tokio::net::TcpListener::bind((ip, 0)).await?;
    let addr = listener.local_addr()?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let accept = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        acceptor.accept(tcp).await.map(|_| ())
    });
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let dial = connector.connect(zmesh_identity::tls::server_name(ip), tcp);
    let dialed = tokio::time::timeout(Duration::from_secs(10), dial).await?;
    let accepted = tokio::time::timeout(Duration::from_secs(10), accept)
        .await?
        .unwrap();
    dialed.map(|_| ())?;
    accepted
}

#[tokio::test]
async fn rejects_invalid_ca_answers() {
    let cases = [
        (Mode::WrongIdentity, "wrong identity"),
        (Mode::ForeignKey, "foreign key"),
        (Mode::UnlistedRoot, "unlisted root"),
    ];
    for (mode, what) in cases {
        let ca = TestCa::new(Duration::from_secs(3600));
        ca.set_mode(mode);
        let bundle = SharedBundle::default();
        let m = manager(&ca, &bundle);
        let w = workload("web");
        let err = m.certificate(&w).await.unwrap_err();
        match mode {
            Mode::WrongIdentity => assert!(
                matches!(&err, CertError::WrongIdentity { got, .. } if got.to_string() == "spiffe://cluster.local/ns/evil/sa/x"),
                "{what}: {err}"
            ),
            Mode::ForeignKey => assert_eq!(err, CertError::KeyMismatch, "{what}"),
            Mode::UnlistedRoot => assert!(
                matches!(&err, CertError::InvalidSvid(e) if e.rule_name() == "svid.untrusted-chain"),
                "{what}: {err}"
            ),
            _ => unreachable!(),
        }
        assert!(m.current(&w).is_none(), "{what}: nothing may be served");
        // A rejected answer must not change the node's roots.
        assert!(bundle.snapshot().is_empty(), "{what}");
    }
}

#[tokio::test]
async fn learns_rotated_roots_from_the_ca() {
    let ca = TestCa::new(Duration::from_secs(3600));
    let old_root = ca.root_der();
    let mut initial = TrustBundle::new();
    initial
        .add_root(&td("cluster.local"), old_root.clone())
        .unwrap();
    let bundle = SharedBundle::new(initial);
    let m = manager(&ca, &bundle);
    let w = workload("web");
    m.certificate(&w).await.unwrap();
    ca.rotate_root();
    m.force_renew(&w).await.unwrap();
    let fps: Vec<Fingerprint> = bundle
        .snapshot()
        .fingerprints()
        .into_iter()
        .map(|(_, f)| f)
        .collect();
    assert_eq!(
        fps,
        vec![Fingerprint::of(&ca.root_der()), Fingerprint::of(&old_root)]
    );
    // The new leaf chains to the new root.
    let key = m.current(&w).unwrap();
    assert!(zmesh_identity::verify_svid(&key.cert, &bundle.snapshot(), SystemTime::now()).is_ok());
}
