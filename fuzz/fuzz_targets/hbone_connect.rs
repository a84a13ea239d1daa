//! An inbound HBONE CONNECT request head as h2 hands it to the proxy: the method, the
//! `:authority` (already a valid URI, which h2 checks), a `:protocol` or not, and a
//! `forwarded` header: zmesh_proxy::hbone::{parse_connect, forwarded_for}.
//!
//! Input: a flags byte (bit 0: CONNECT, else GET; bit 1: `:protocol` present), then
//! newline-separated URI, `forwarded` value and cluster domain.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zmesh_proxy::hbone::{forwarded_for, parse_connect, service_host, ConnectTarget};

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let mut parts = text.splitn(3, '\n');
    let uri = parts.next().unwrap_or_default();
    let forwarded = parts.next();
    let domain = parts.next().unwrap_or("cluster.local");
    let method = if flags & 1 == 1 {
        http::Method::CONNECT
    } else {
        http::Method::GET
    };
    let Ok(mut req) = http::Request::builder().method(method).uri(uri).body(()) else {
        return;
    };
    if flags & 2 == 2 {
        req.extensions_mut()
            .insert(h2::ext::Protocol::from_static("websocket"));
    }
    if let Some(value) = forwarded.and_then(|f| http::HeaderValue::from_str(f).ok()) {
        req.headers_mut().insert("forwarded", value);
    }
    let _ = forwarded_for(&req);
    match parse_connect(&req, domain) {
        Ok(ConnectTarget::Addr(addr)) => {
            assert_ne!(addr.port(), 0);
            assert_eq!(req.method(), http::Method::CONNECT);
        }
        Ok(ConnectTarget::Service {
            namespace,
            name,
            port,
        }) => {
            assert_ne!(port, 0);
            // What it names is what the hostname says, in Kubernetes' own spelling.
            let authority = req.uri().authority().expect("an authority was parsed");
            let host = authority.as_str().rsplit_once(':').expect("host:port").0;
            assert_eq!(service_host(host, domain), Some((name.clone(), namespace.clone())));
            for label in [&name, &namespace] {
                assert!(
                    (1..=63).contains(&label.len())
                        && label
                            .bytes()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
                    "{label:?}"
                );
            }
        }
        Err(e) => assert!(!e.0.is_empty()),
    }
});
