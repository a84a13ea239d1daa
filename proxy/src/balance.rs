//! Choosing a Service's endpoint for one connection, as kube-proxy (and ztunnel) would:
//! uniformly at random among the endpoints serving the port, or, with
//! `sessionAffinity: ClientIP`, the endpoint the client had last time.
//!
//! A connection tries at most [`MAX_ATTEMPTS`] endpoints, never one twice: the caller
//! passes the ones already tried, and gets another until none is left.

use std::collections::hash_map::{Entry, RandomState};
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::services::Service;

/// How many endpoints one connection tries before giving up (fewer if the port has fewer).
pub(crate) const MAX_ATTEMPTS: usize = 3;

/// At most this many (service, client IP) affinity pins are kept. Clients are this node's
/// pods, so a real node stays far below it; past it, expired pins go first, then the one
/// closest to expiring.
pub(crate) const AFFINITY_CAPACITY: usize = 65_536;

/// A uniformly random number in `0..n` (`n > 0`), without a dependency: every
/// `RandomState` is seeded differently (randomly per thread, then incremented), and SipHash
/// of a counter under that key is as good as random for spreading connections. The bias of
/// `% n` is below n / 2^64.
pub(crate) fn random_below(n: usize) -> usize {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    // n <= usize::MAX, so the remainder fits.
    (h.finish() % n as u64) as usize
}

/// Where `service` serves port `vip.port()`: each endpoint's address and port for it.
/// Endpoints of the VIP's address family come first (a dual-stack pod is two endpoints,
/// one per family, and kube-proxy balances a family's VIP over that family's endpoints);
/// when the port has none of that family, all of them.
pub(crate) fn candidates(service: &Service, vip: SocketAddr) -> Vec<SocketAddr> {
    let all: Vec<SocketAddr> = service
        .endpoints_for(vip.port())
        .map(SocketAddr::from)
        .collect();
    let same: Vec<SocketAddr> = all
        .iter()
        .copied()
        .filter(|a| a.is_ipv4() == vip.is_ipv4())
        .collect();
    if same.is_empty() {
        all
    } else {
        same
    }
}

/// A candidate not yet `tried`, uniformly at random (`random(n)` must return a number
/// below `n`); `None` when every one was tried.
pub(crate) fn pick(
    candidates: &[SocketAddr],
    tried: &[SocketAddr],
    random: &mut impl FnMut(usize) -> usize,
) -> Option<SocketAddr> {
    let left: Vec<SocketAddr> = candidates
        .iter()
        .copied()
        .filter(|c| !tried.contains(c))
        .collect();
    match left.len() {
        0 => None,
        n => left.get(random(n)).copied(),
    }
}

/// `sessionAffinity: ClientIP`: which endpoint each client of each service sticks to.
#[derive(Debug)]
pub(crate) struct Affinity {
    pins: Mutex<HashMap<(String, IpAddr), Pin>>,
    capacity: usize,
}

#[derive(Debug, Clone, Copy)]
struct Pin {
    /// The endpoint's address (it serves each port of the service on its own target port).
    endpoint: IpAddr,
    /// `timeout` after the client's last connection to the service.
    expires: Instant,
}

impl Affinity {
    pub fn new(capacity: usize) -> Self {
        Self {
            pins: Mutex::default(),
            capacity: capacity.max(1),
        }
    }

    fn pins(&self) -> MutexGuard<'_, HashMap<(String, IpAddr), Pin>> {
        // Every critical section leaves the map consistent (single inserts and removes).
        self.pins.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The endpoint for a connection from `client` to `service` (its `key()`) at `now`:
    /// the client's pinned endpoint if the pin has not expired and that endpoint is a
    /// candidate not yet tried; otherwise a random untried candidate, which becomes the
    /// pin. Either way the pin now expires `timeout` after `now` (a client keeps its
    /// endpoint while it keeps connecting). `None` when every candidate was tried.
    ///
    /// Choosing and pinning happen under one lock, so concurrent first connections of a
    /// client agree on its endpoint.
    #[allow(clippy::too_many_arguments)]
    pub fn choose(
        &self,
        service: &str,
        client: IpAddr,
        timeout: Duration,
        now: Instant,
        candidates: &[SocketAddr],
        tried: &[SocketAddr],
        random: &mut impl FnMut(usize) -> usize,
    ) -> Option<SocketAddr> {
        let mut pins = self.pins();
        let key = (service.to_owned(), client);
        let pinned = pins
            .get(&key)
            .filter(|p| p.expires > now)
            .and_then(|p| {
                candidates
                    .iter()
                    .find(|c| c.ip() == p.endpoint && !tried.contains(c))
            })
            .copied();
        let chosen = match pinned {
            Some(c) => c,
            None => pick(candidates, tried, random)?,
        };
        let pin = Pin {
            endpoint: chosen.ip(),
            expires: now + timeout,
        };
        let len = pins.len();
        match pins.entry(key) {
            Entry::Occupied(mut e) => {
                e.insert(pin);
            }
            Entry::Vacant(e) if len < self.capacity => {
                e.insert(pin);
            }
            Entry::Vacant(e) => {
                let key = e.into_key();
                make_room(&mut pins, now);
                pins.insert(key, pin);
            }
        }
        Some(chosen)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.pins().len()
    }
}

/// Frees at least one slot of a full map: every expired pin, or if none has, the one
/// closest to expiring.
fn make_room(pins: &mut HashMap<(String, IpAddr), Pin>, now: Instant) {
    let before = pins.len();
    pins.retain(|_, p| p.expires > now);
    if pins.len() < before {
        return;
    }
    let soonest = pins
        .iter()
        .min_by_key(|(_, p)| p.expires)
        .map(|(k, _)| k.clone());
    if let Some(k) = soonest {
        pins.remove(&k);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashSet};

    use super::*;
    use crate::services::Endpoint;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn three() -> Vec<SocketAddr> {
        ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:8080"]
            .map(addr)
            .to_vec()
    }

    #[test]
    fn random_below_stays_in_range_and_varies() {
        let seen: HashSet<usize> = (0..1000).map(|_| random_below(7)).collect();
        assert!(seen.iter().all(|&i| i < 7));
        assert_eq!(seen.len(), 7, "1000 draws should hit all of 0..7: {seen:?}");
        assert_eq!(random_below(1), 0);
    }

    #[test]
    fn pick_spreads_over_every_candidate() {
        let eps = three();
        let mut counts: HashMap<SocketAddr, usize> = HashMap::new();
        for _ in 0..3000 {
            let a = pick(&eps, &[], &mut random_below).unwrap();
            *counts.entry(a).or_default() += 1;
        }
        assert_eq!(counts.len(), 3, "{counts:?}");
        // Uniform: about 1000 each; 700 is more than 10 standard deviations away.
        assert!(counts.values().all(|&n| n > 700), "{counts:?}");
    }

    #[test]
    fn pick_never_returns_a_tried_endpoint() {
        let eps = three();
        for _ in 0..200 {
            let got = pick(&eps, &eps[..2], &mut random_below);
            assert_eq!(got, Some(eps[2]));
        }
        // The random index is over the untried ones only.
        assert_eq!(pick(&eps, &[eps[0]], &mut |_| 0), Some(eps[1]));
        assert_eq!(pick(&eps, &[eps[0]], &mut |_| 1), Some(eps[2]));
        assert_eq!(pick(&eps, &eps, &mut random_below), None);
        assert_eq!(pick(&[], &[], &mut random_below), None);
    }

    #[test]
    fn candidates_prefer_the_vips_family() {
        let v4: IpAddr = "10.0.0.1".parse().unwrap();
        let v6: IpAddr = "fd00::1".parse().unwrap();
        let v4_only: IpAddr = "10.0.0.2".parse().unwrap();
        let ports = |p: &[(u16, u16)]| p.iter().copied().collect::<BTreeMap<u16, u16>>();
        let service = Service {
            name: "web".into(),
            namespace: "shop".into(),
            vips: vec![],
            ports: vec![],
            affinity: None,
            endpoints: vec![
                Endpoint {
                    ip: v4,
                    ports: ports(&[(80, 8080), (443, 8443)]),
                },
                Endpoint {
                    ip: v6,
                    ports: ports(&[(80, 8080), (443, 8443)]),
                },
                Endpoint {
                    ip: v4_only,
                    ports: ports(&[(80, 9090)]),
                },
            ],
        };
        let mut got = candidates(&service, addr("10.96.0.1:80"));
        got.sort();
        assert_eq!(got, [addr("10.0.0.1:8080"), addr("10.0.0.2:9090")]);
        assert_eq!(
            candidates(&service, addr("[fd00:96::1]:443")),
            [addr("[fd00::1]:8443")]
        );
        // No endpoint of the VIP's family: the others rather than none.
        let v4_service = Service {
            endpoints: service.endpoints[2..].to_vec(),
            ..service.clone()
        };
        assert_eq!(
            candidates(&v4_service, addr("[fd00:96::1]:80")),
            [addr("10.0.0.2:9090")]
        );
        assert!(candidates(&service, addr("10.96.0.1:81")).is_empty());
    }

    #[test]
    fn affinity_keeps_a_client_on_its_endpoint_until_it_expires() {
        let eps = three();
        let a = Affinity::new(16);
        let t0 = Instant::now();
        let ttl = Duration::from_secs(60);
        let client: IpAddr = "10.1.0.1".parse().unwrap();
        let other: IpAddr = "10.1.0.2".parse().unwrap();
        let first = a
            .choose("shop/web", client, ttl, t0, &eps, &[], &mut random_below)
            .unwrap();
        // Whatever the random source says, the pin wins while it lasts; each connection
        // pushes the expiry back.
        for i in 1..=10u64 {
            let now = t0 + Duration::from_secs(50 * i);
            let got = a.choose("shop/web", client, ttl, now, &eps, &[], &mut |n| n - 1);
            assert_eq!(got, Some(first), "connection {i}");
        }
        // Pins are per client and per service.
        let i = eps.iter().position(|e| *e != first).unwrap();
        let mut not_first = |_| i;
        let got = a.choose("shop/web", other, ttl, t0, &eps, &[], &mut not_first);
        assert_eq!(got, Some(eps[i]));
        let got = a.choose("shop/db", client, ttl, t0, &eps, &[], &mut not_first);
        assert_eq!(got, Some(eps[i]));
        // The last connection was at t0 + 500 s: the pin holds until t0 + 560 s.
        let j = eps.iter().position(|e| *e != first).unwrap();
        let t559 = t0 + Duration::from_secs(559);
        let got = a.choose("shop/web", client, ttl, t559, &eps, &[], &mut |_| j);
        assert_eq!(got, Some(first), "not expired yet");
        // That connection pushed the expiry to t0 + 619 s.
        let t560 = t0 + Duration::from_secs(560);
        let got = a.choose("shop/web", client, ttl, t560, &eps, &[], &mut |_| j);
        assert_eq!(got, Some(first), "refreshed by the connection at 559 s");
        // Expired: chosen afresh, and the new choice is the new pin.
        let t620 = t0 + Duration::from_secs(620);
        let got = a.choose("shop/web", client, ttl, t620, &eps, &[], &mut |_| j);
        assert_eq!(got, Some(eps[j]), "expired: chosen afresh");
        let t621 = t0 + Duration::from_secs(621);
        let got = a.choose("shop/web", client, ttl, t621, &eps, &[], &mut |_| {
            (j + 1) % 3
        });
        assert_eq!(got, Some(eps[j]), "the new choice is the new pin");
    }

    #[test]
    fn affinity_moves_off_an_endpoint_that_failed_or_left() {
        let eps = three();
        let a = Affinity::new(16);
        let t0 = Instant::now();
        let ttl = Duration::from_secs(60);
        let client: IpAddr = "10.1.0.1".parse().unwrap();
        let first = a
            .choose("shop/web", client, ttl, t0, &eps, &[], &mut |_| 0)
            .unwrap();
        assert_eq!(first, eps[0]);
        // Its dial failed: another endpoint, which becomes the pin.
        let second = a
            .choose("shop/web", client, ttl, t0, &eps, &[first], &mut |_| 0)
            .unwrap();
        assert_eq!(second, eps[1]);
        let next = a.choose("shop/web", client, ttl, t0, &eps, &[], &mut |_| 2);
        assert_eq!(next, Some(second), "re-pinned to the one that was used");
        // The pinned endpoint no longer serves the port.
        let left = [eps[0], eps[2]];
        let got = a.choose("shop/web", client, ttl, t0, &left, &[], &mut |_| 1);
        assert_eq!(got, Some(eps[2]));
        // Same endpoint IP, another port of the service: still that endpoint.
        let other_port = [addr("10.0.0.1:9000"), addr("10.0.0.3:9001")];
        let got = a.choose("shop/web", client, ttl, t0, &other_port, &[], &mut |_| 0);
        assert_eq!(got, Some(other_port[1]));
        // Everything tried.
        let got = a.choose("shop/web", client, ttl, t0, &eps, &eps, &mut |_| 0);
        assert_eq!(got, None);
    }

    #[test]
    fn affinity_map_is_bounded() {
        let eps = three();
        let a = Affinity::new(4);
        let t0 = Instant::now();
        let client = |i: u8| IpAddr::from([10, 1, 0, i]);
        let ttl = |s: u64| Duration::from_secs(s);
        let mut first = |_| 0;
        for i in 0..4u8 {
            a.choose(
                "s",
                client(i),
                ttl(10 + u64::from(i)),
                t0,
                &eps,
                &[],
                &mut first,
            );
        }
        assert_eq!(a.len(), 4);
        // Full, none expired: the pin closest to expiring (client 0) goes.
        a.choose("s", client(4), ttl(100), t0, &eps, &[], &mut first);
        assert_eq!(a.len(), 4);
        let mut last = |n: usize| n - 1;
        let got = a.choose("s", client(0), ttl(100), t0, &eps, &[], &mut last);
        assert_eq!(got, Some(eps[2]), "client 0 lost its pin");
        // Pinning client 0 again evicted client 1 (the soonest to expire).
        let got = a.choose("s", client(1), ttl(100), t0, &eps, &[], &mut last);
        assert_eq!(got, Some(eps[2]), "client 1 lost its pin");
        // That evicted client 2: now clients 3 (until t0 + 13 s), 4, 0 and 1 (t0 + 100 s)
        // are pinned. Refreshing a pin takes no new slot.
        let got = a.choose("s", client(3), ttl(12), t0, &eps, &[], &mut last);
        assert_eq!(got, Some(eps[0]), "client 3 kept its pin");
        assert_eq!(a.len(), 4);
        // Later, client 3's pin (and only it) expired: it goes, nothing else does.
        let later = t0 + Duration::from_secs(50);
        a.choose("s", client(5), ttl(100), later, &eps, &[], &mut first);
        assert_eq!(a.len(), 4);
        let got = a.choose("s", client(4), ttl(100), later, &eps, &[], &mut last);
        assert_eq!(got, Some(eps[0]), "client 4 kept its pin");
        // Much later every pin expired: all go at once to make room for one.
        let much_later = t0 + Duration::from_secs(1000);
        a.choose("s", client(6), ttl(100), much_later, &eps, &[], &mut first);
        assert_eq!(a.len(), 1, "expired pins are swept when the map is full");
    }
}
