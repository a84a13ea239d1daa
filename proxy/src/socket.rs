//! Listening sockets and original-destination lookup.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::time::Duration;

use socket2::{Domain, Socket, Type};
use tokio::net::{TcpListener, TcpStream};

/// Binds a listener. With `transparent`, sets IP_TRANSPARENT so that connections steered
/// to it by eBPF (sk_assign) for addresses that are not local are accepted.
pub fn bind_listener(addr: SocketAddr, transparent: bool) -> io::Result<TcpListener> {
    listener(addr, transparent, &mut Vec::new())
}

/// The listener for `addr`: the one of `inherited` bound to exactly `addr` (taken out of
/// it), or a fresh one. A restarted agent inherits its predecessor's listening sockets
/// (zmesh-agent's handover): one socket then serves both processes, the old one until it
/// drains, so no connection is refused or lost in between.
///
/// Fresh sockets do not set SO_REUSEPORT: before Linux 6.5, tc's bpf_sk_assign refuses a
/// socket that has it, and inbound steering would drop every SYN. Only when the port is
/// held by a process that set it (an agent from before the handover) does the socket
/// set it too, to share the port with that process.
pub fn listener(
    addr: SocketAddr,
    transparent: bool,
    inherited: &mut Vec<std::net::TcpListener>,
) -> io::Result<TcpListener> {
    if addr.port() != 0 {
        if let Some(at) = inherited
            .iter()
            .position(|l| l.local_addr().is_ok_and(|a| a == addr))
        {
            let listener = inherited.swap_remove(at);
            listener.set_nonblocking(true)?;
            return TcpListener::from_std(listener);
        }
    }
    match fresh_listener(addr, transparent, false) {
        Err(e) if e.kind() == io::ErrorKind::AddrInUse && addr.port() != 0 => {
            let listener = fresh_listener(addr, transparent, true).map_err(|_| e)?;
            tracing::warn!(
                %addr,
                "the port is shared with SO_REUSEPORT (held by an agent without the listener \
                 handover?); tc cannot steer to this socket before Linux 6.5"
            );
            Ok(listener)
        }
        other => other,
    }
}

fn fresh_listener(
    addr: SocketAddr,
    transparent: bool,
    reuse_port: bool,
) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    if let SocketAddr::V6(v6) = addr {
        // `[::]` takes IPv4 too (one socket per port for both families), whatever the
        // system's net.ipv6.bindv6only says; a concrete IPv6 address only IPv6.
        socket.set_only_v6(!v6.ip().is_unspecified())?;
    }
    if transparent {
        match addr {
            SocketAddr::V4(_) => socket.set_ip_transparent_v4(true)?,
            SocketAddr::V6(_) => socket.set_ip_transparent_v6(true)?,
        }
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// `addr` with an IPv4-mapped IPv6 address (what a dual-stack `[::]` listener reports for
/// IPv4 peers) turned back into IPv4, so that workload lookups, policies and logs see one
/// form of every address.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

/// The local address of an accepted socket, canonical (see [`canonical`]).
pub(crate) fn local_addr(stream: &TcpStream) -> io::Result<SocketAddr> {
    stream.local_addr().map(canonical)
}

/// TCP keepalive on the proxy's sockets to and from applications, so that a peer that
/// vanished (its node died, a NAT forgot the flow) is noticed on an idle connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TcpKeepalive {
    /// Idle time before the first probe.
    pub time: Duration,
    /// Time between probes.
    pub interval: Duration,
    /// Unanswered probes before the connection is dropped.
    pub retries: u32,
}

impl Default for TcpKeepalive {
    /// ztunnel's: first probe after 180 s idle, then every 180 s, 9 probes.
    fn default() -> Self {
        Self {
            time: Duration::from_secs(180),
            interval: Duration::from_secs(180),
            retries: 9,
        }
    }
}

/// Applies `keepalive` (none: leaves the socket as it is).
pub(crate) fn set_tcp_keepalive(
    stream: &impl std::os::fd::AsFd,
    keepalive: Option<TcpKeepalive>,
) -> io::Result<()> {
    let Some(k) = keepalive else {
        return Ok(());
    };
    let params = socket2::TcpKeepalive::new()
        .with_time(k.time)
        .with_interval(k.interval)
        .with_retries(k.retries);
    socket2::SockRef::from(stream).set_tcp_keepalive(&params)
}

/// No Nagle delay and `keepalive` (or none) on a listener, for every socket it accepts:
/// Linux copies both into the accepted socket. A listener inherited from a predecessor is
/// set to this configuration too.
pub(crate) fn tune_listener(
    listener: &TcpListener,
    keepalive: Option<TcpKeepalive>,
) -> io::Result<()> {
    let socket = socket2::SockRef::from(listener);
    socket.set_tcp_nodelay(true)?;
    match keepalive {
        Some(_) => set_tcp_keepalive(listener, keepalive),
        None => socket.set_keepalive(false),
    }
}

/// Finds where a captured outbound connection was headed.
pub trait OriginalDst: Send + Sync + 'static {
    /// `peer` is the client's address as the listener accepted it (no need to ask the
    /// socket again: one syscall per connection).
    fn original_dst(&self, stream: &TcpStream, peer: SocketAddr) -> io::Result<SocketAddr>;
}

/// `getsockopt(SO_ORIGINAL_DST)`, which zmesh's eBPF cgroup/getsockopt program answers
/// (and which netfilter REDIRECT answers too).
#[derive(Debug, Default, Clone, Copy)]
pub struct SoOriginalDst;

const SO_ORIGINAL_DST: libc::c_int = 80;
const IP6T_SO_ORIGINAL_DST: libc::c_int = 80;

impl OriginalDst for SoOriginalDst {
    fn original_dst(&self, stream: &TcpStream, _peer: SocketAddr) -> io::Result<SocketAddr> {
        let fd = stream.as_raw_fd();
        match stream.local_addr()? {
            SocketAddr::V4(_) => {
                // SAFETY: sockaddr_in is plain data; the kernel writes at most `len` bytes.
                let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
                let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
                // SAFETY: fd is a valid socket for the duration of the call.
                let rc = unsafe {
                    libc::getsockopt(
                        fd,
                        libc::SOL_IP,
                        SO_ORIGINAL_DST,
                        (&mut sa as *mut libc::sockaddr_in).cast(),
                        &mut len,
                    )
                };
                if rc != 0 {
                    return Err(io::Error::last_os_error());
                }
                let ip = Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr));
                Ok(SocketAddrV4::new(ip, u16::from_be(sa.sin_port)).into())
            }
            SocketAddr::V6(_) => {
                // SAFETY: as above, for sockaddr_in6.
                let mut sa: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
                let mut len = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
                // SAFETY: fd is a valid socket for the duration of the call.
                let rc = unsafe {
                    libc::getsockopt(
                        fd,
                        libc::SOL_IPV6,
                        IP6T_SO_ORIGINAL_DST,
                        (&mut sa as *mut libc::sockaddr_in6).cast(),
                        &mut len,
                    )
                };
                if rc != 0 {
                    return Err(io::Error::last_os_error());
                }
                let ip = Ipv6Addr::from(sa.sin6_addr.s6_addr);
                let addr = SocketAddrV6::new(ip, u16::from_be(sa.sin6_port), 0, 0);
                Ok(canonical(addr.into()))
            }
        }
    }
}

/// A fixed table from the client's IP to the destination, for running without eBPF
/// (tests, benchmarks): every connection from that IP goes to that destination.
#[derive(Debug, Default, Clone)]
pub struct StaticOriginalDst(HashMap<IpAddr, SocketAddr>);

impl StaticOriginalDst {
    pub fn new(routes: impl IntoIterator<Item = (IpAddr, SocketAddr)>) -> Self {
        Self(routes.into_iter().collect())
    }
}

impl OriginalDst for StaticOriginalDst {
    fn original_dst(&self, _stream: &TcpStream, peer: SocketAddr) -> io::Result<SocketAddr> {
        let peer = canonical(peer);
        self.0.get(&peer.ip()).copied().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("no original destination configured for {}", peer.ip()),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn so_original_dst_fails_without_redirect() {
        let l = bind_listener("127.0.0.1:0".parse().unwrap(), false).unwrap();
        let addr = l.local_addr().unwrap();
        let c = TcpStream::connect(addr).await.unwrap();
        let (s, peer) = l.accept().await.unwrap();
        // No netfilter/eBPF redirect: the kernel has no original destination to report.
        assert!(SoOriginalDst.original_dst(&s, peer).is_err());
        drop(c);
    }

    #[tokio::test]
    async fn an_inherited_listener_is_taken_for_its_exact_address_else_a_fresh_one() {
        let first = bind_listener("127.0.0.1:0".parse().unwrap(), false).unwrap();
        let addr = first.local_addr().unwrap();
        let held = first.into_std().unwrap();
        let copy = held.try_clone().unwrap();
        let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let other_addr = other.local_addr().unwrap();
        let mut inherited = vec![other, copy];
        // the same socket: a connection queued on it is accepted through the new handle
        let taken = listener(addr, false, &mut inherited).unwrap();
        assert_eq!(inherited.len(), 1, "taken out of the inherited ones");
        let _c = TcpStream::connect(addr).await.unwrap();
        let (s, _) = taken.accept().await.unwrap();
        assert_eq!(s.local_addr().unwrap(), addr);
        drop(held);
        // no inherited socket for this address, and the port is free: a fresh one
        drop(inherited);
        let fresh = listener(other_addr, false, &mut Vec::new()).unwrap();
        assert_eq!(fresh.local_addr().unwrap(), other_addr);
        // a port held without SO_REUSEPORT cannot be shared
        let err = listener(other_addr, false, &mut Vec::new()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
    }

    #[tokio::test]
    async fn static_routes_by_client_ip() {
        let l = bind_listener("127.0.0.1:0".parse().unwrap(), true).unwrap();
        let addr = l.local_addr().unwrap();
        let dst: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let table = StaticOriginalDst::new([("127.0.0.1".parse().unwrap(), dst)]);
        let _c = TcpStream::connect(addr).await.unwrap();
        let (s, peer) = l.accept().await.unwrap();
        assert_eq!(table.original_dst(&s, peer).unwrap(), dst);
        let empty = StaticOriginalDst::default();
        assert_eq!(
            empty.original_dst(&s, peer).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
    }
}
