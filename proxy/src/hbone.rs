//! The request side of HBONE: what an inbound CONNECT may look like and what it names,
//! and the telemetry headers ztunnel puts on CONNECTs and their answers. Pure functions
//! over the request head, so they can be tested and fuzzed alone
//! (`fuzz/fuzz_targets/hbone_connect.rs`); `inbound` answers a [`MalformedConnect`] with 400.

use std::net::SocketAddr;

use http::header::{HeaderMap, HeaderValue};
use http::{Method, Request};

use crate::workloads::Workload;

/// Cluster id in `baggage` when none is configured: Istio's default (`clusterid`).
pub const DEFAULT_CLUSTER_ID: &str = "Kubernetes";

/// A W3C `traceparent` for a CONNECT we send, as ztunnel sends one: a new trace, not
/// sampled (zmesh records no spans), so that the two ends' logs can name the same trace.
pub fn traceparent() -> HeaderValue {
    let trace = rand::random::<u128>().max(1);
    let span = rand::random::<u64>().max(1);
    let value = format!("00-{trace:032x}-{span:016x}-00");
    // Only hex digits and dashes.
    let mut value = HeaderValue::try_from(value).expect("traceparent is ASCII");
    never_indexed(&mut value);
    value
}

/// The `forwarded` header naming the client (`for="<ip:port>"`) on a CONNECT we send.
pub fn forwarded(client: SocketAddr) -> HeaderValue {
    let mut value =
        HeaderValue::try_from(format!("for=\"{client}\"")).expect("an address is ASCII");
    never_indexed(&mut value);
    value
}

/// Marks a value that is new on every CONNECT (a trace ID, a client port) as never to be
/// put in HPACK's table: it would never be referenced again, and each insertion would evict
/// the entries that are (`:authority`, `baggage`), which then go over the wire in full.
fn never_indexed(value: &mut HeaderValue) {
    value.set_sensitive(true);
}

/// The W3C `baggage` ztunnel sends about a workload (the source on a CONNECT, the
/// destination on its 200), with what zmesh knows of it: cluster, namespace, pod.
pub fn baggage(cluster_id: &str, workload: &Workload) -> Option<HeaderValue> {
    let value = format!(
        "k8s.cluster.name={cluster_id},k8s.namespace.name={},k8s.pod.name={}",
        workload.namespace, workload.name
    );
    // Names from the API are header-safe; anything else is left out, not sent mangled.
    HeaderValue::try_from(value).ok()
}

/// Adds `baggage` for `workload` to `headers` (when it can be expressed).
pub fn add_baggage(headers: &mut HeaderMap, cluster_id: &str, workload: &Workload) {
    if let Some(value) = baggage(cluster_id, workload) {
        headers.insert("baggage", value);
    }
}

/// Why a CONNECT request is malformed; answered with 400 Bad Request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct MalformedConnect(pub &'static str);

/// What a CONNECT's `:authority` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectTarget {
    Addr(SocketAddr),
    /// `<name>.<namespace>.svc.<cluster domain>:<port>`: a port of a Service.
    Service {
        namespace: String,
        name: String,
        port: u16,
    },
}

/// Checks an HBONE CONNECT request (ztunnel's rules: CONNECT, no `:protocol`, `:scheme`
/// or `:path`, an `:authority` of IP:port or a Service hostname:port, port not 0) and
/// returns what it names.
pub fn parse_connect<B>(
    req: &Request<B>,
    cluster_domain: &str,
) -> Result<ConnectTarget, MalformedConnect> {
    let bad = MalformedConnect;
    if req.method() != Method::CONNECT {
        return Err(bad("not CONNECT"));
    }
    if req.extensions().get::<h2::ext::Protocol>().is_some() {
        return Err(bad(":protocol present"));
    }
    let uri = req.uri();
    if uri.scheme().is_some() || uri.path_and_query().is_some() {
        return Err(bad(":scheme or :path present"));
    }
    let authority = uri.authority().ok_or(bad("no :authority"))?;
    if let Ok(target) = authority.as_str().parse::<SocketAddr>() {
        if target.port() == 0 {
            return Err(bad("port 0"));
        }
        return Ok(ConnectTarget::Addr(target));
    }
    let not_ours = bad("authority is neither IP:port nor a service hostname:port");
    let (host, port) = authority.as_str().rsplit_once(':').ok_or(not_ours)?;
    // Digits only: u16's parser would also take a leading `+`.
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(not_ours);
    }
    let port: u16 = port.parse().map_err(|_| not_ours)?;
    if port == 0 {
        return Err(bad("port 0"));
    }
    let (name, namespace) = service_host(host, cluster_domain).ok_or(not_ours)?;
    Ok(ConnectTarget::Service {
        namespace,
        name,
        port,
    })
}

/// `(name, namespace)` from `<name>.<namespace>.svc.<cluster domain>` (DNS names ignore
/// case; one trailing dot is allowed), or `None` if `host` is not of that form.
pub fn service_host(host: &str, cluster_domain: &str) -> Option<(String, String)> {
    let host = host.to_ascii_lowercase();
    let host = host.strip_suffix('.').unwrap_or(&host);
    let domain = cluster_domain.to_ascii_lowercase();
    let domain = domain.strip_suffix('.').unwrap_or(&domain);
    let rest = host.strip_suffix(domain)?.strip_suffix(".svc.")?;
    let (name, namespace) = rest.split_once('.')?;
    // Service names and namespaces are DNS labels (RFC 1123).
    let label = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    (label(name) && label(namespace)).then(|| (name.to_owned(), namespace.to_owned()))
}

/// The client address from a `forwarded: for=` header (RFC 7239), for logs only: it is
/// whatever the peer wrote, so it never feeds authorization.
pub fn forwarded_for<B>(req: &Request<B>) -> Option<SocketAddr> {
    let value = req.headers().get("forwarded")?.to_str().ok()?;
    let element = value.split(',').next()?;
    let node = element.split(';').find_map(|pair| {
        let (k, v) = pair.trim().split_once('=')?;
        k.eq_ignore_ascii_case("for").then_some(v)
    })?;
    let node = node.trim().trim_matches('"');
    if let Ok(addr) = node.parse::<SocketAddr>() {
        return Some(addr);
    }
    let ip = node.trim_start_matches('[').trim_end_matches(']');
    ip.parse().ok().map(|ip| SocketAddr::new(ip, 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_hostnames() {
        let ok = |host: &str, domain: &str| service_host(host, domain);
        let web = Some(("web".to_string(), "shop".to_string()));
        assert_eq!(ok("web.shop.svc.cluster.local", "cluster.local"), web);
        assert_eq!(ok("Web.Shop.SVC.Cluster.Local.", "cluster.local"), web);
        assert_eq!(ok("web.shop.svc.corp.example", "corp.example"), web);
        assert_eq!(
            ok("web-2.a1.svc.cluster.local", "cluster.local.")
                .unwrap()
                .0,
            "web-2"
        );
        for bad in [
            "web.shop.svc.example.com",
            "web.shop.cluster.local",
            "shop.svc.cluster.local",
            ".shop.svc.cluster.local",
            "web..svc.cluster.local",
            "a.web.shop.svc.cluster.local",
            "web_1.shop.svc.cluster.local",
            "-web.shop.svc.cluster.local",
            "web.shop-.svc.cluster.local",
            "web.shop.svcxcluster.local",
            "web.shop.svc.xcluster.local",
            "cluster.local",
            "",
        ] {
            assert_eq!(ok(bad, "cluster.local"), None, "{bad:?}");
        }
        let long = "a".repeat(64);
        assert_eq!(
            ok(&format!("{long}.shop.svc.cluster.local"), "cluster.local"),
            None
        );
        let max = "a".repeat(63);
        assert!(ok(&format!("{max}.shop.svc.cluster.local"), "cluster.local").is_some());
    }

    fn connect(uri: &str) -> Request<()> {
        Request::builder()
            .method(Method::CONNECT)
            .uri(uri)
            .body(())
            .unwrap()
    }

    #[test]
    fn connect_targets() {
        let parse = |uri: &str| parse_connect(&connect(uri), "cluster.local");
        assert_eq!(
            parse("10.0.0.1:8080"),
            Ok(ConnectTarget::Addr("10.0.0.1:8080".parse().unwrap()))
        );
        assert_eq!(
            parse("[fd00::1]:80"),
            Ok(ConnectTarget::Addr("[fd00::1]:80".parse().unwrap()))
        );
        assert_eq!(
            parse("web.shop.svc.cluster.local:80"),
            Ok(ConnectTarget::Service {
                namespace: "shop".into(),
                name: "web".into(),
                port: 80
            })
        );
    }

    #[test]
    fn every_malformed_connect_is_refused_with_its_reason() {
        let parse = |req: &Request<()>| parse_connect(req, "cluster.local").map_err(|e| e.0);
        let get = Request::builder().uri("10.0.0.1:80").body(()).unwrap();
        assert_eq!(parse(&get), Err("not CONNECT"));
        let mut extended = connect("10.0.0.1:80");
        extended
            .extensions_mut()
            .insert(h2::ext::Protocol::from_static("websocket"));
        assert_eq!(parse(&extended), Err(":protocol present"));
        assert_eq!(
            parse(&connect("http://10.0.0.1:80/")),
            Err(":scheme or :path present")
        );
        assert_eq!(parse(&connect("/path")), Err(":scheme or :path present"));
        assert_eq!(parse(&connect("10.0.0.1:0")), Err("port 0"));
        assert_eq!(
            parse(&connect("web.shop.svc.cluster.local:0")),
            Err("port 0")
        );
        for not_ours in [
            "example.com:80",
            "web.shop.svc.cluster.local:+80",
            "web.shop.svc.cluster.local:65536",
            "web.shop.svc.cluster.local:",
            "10.0.0.1",
        ] {
            assert_eq!(
                parse(&connect(not_ours)),
                Err("authority is neither IP:port nor a service hostname:port"),
                "{not_ours}"
            );
        }
    }

    #[test]
    fn forwarded_for_takes_the_first_for_and_nothing_else() {
        let with = |value: &str| {
            let mut req = connect("10.0.0.1:80");
            req.headers_mut()
                .insert("forwarded", value.parse().unwrap());
            forwarded_for(&req)
        };
        assert_eq!(
            with("for=10.1.2.3:4567"),
            Some("10.1.2.3:4567".parse().unwrap())
        );
        assert_eq!(
            with("for=\"[fd00::1]:80\""),
            Some("[fd00::1]:80".parse().unwrap())
        );
        assert_eq!(
            with("proto=http;For=10.1.2.3"),
            Some("10.1.2.3:0".parse().unwrap())
        );
        assert_eq!(
            with("for=10.1.2.3, for=10.9.9.9"),
            Some("10.1.2.3:0".parse().unwrap())
        );
        assert_eq!(with("for=unknown"), None);
        assert_eq!(with("by=10.1.2.3"), None);
        assert_eq!(forwarded_for(&connect("10.0.0.1:80")), None);
    }

    #[test]
    fn the_per_connection_headers_we_send_read_back_and_stay_out_of_the_hpack_table() {
        for client in ["10.1.2.3:4567", "[fd00::1]:80"] {
            let client: SocketAddr = client.parse().unwrap();
            let mut req = connect("10.0.0.1:80");
            req.headers_mut().insert("forwarded", forwarded(client));
            assert_eq!(forwarded_for(&req), Some(client));
            assert!(req.headers()["forwarded"].is_sensitive());
        }
        let (a, b) = (traceparent(), traceparent());
        assert_ne!(a, b);
        assert!(a.is_sensitive() && b.is_sensitive());
        // version-trace-span-flags, W3C's lengths.
        let parts: Vec<usize> = a.to_str().unwrap().split('-').map(str::len).collect();
        assert_eq!(parts, [2, 32, 16, 2]);
    }
}
