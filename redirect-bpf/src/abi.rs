//! Mirrors of the structs shared with the eBPF programs, and their constants. The source of
//! truth is bpf/abi.h: build.rs prints its layouts and constants (`c` below), the constants
//! are taken from there and every mirror's size and field offsets are checked against it
//! at compile time, so a change on one side only fails the build.

use std::mem::{offset_of, size_of};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

/// bpf/abi.h as the C compiler lays it out.
#[allow(dead_code, non_upper_case_globals)] // Named as in C; some only serve the checks.
mod c {
    include!(concat!(env!("OUT_DIR"), "/abi_layout.rs"));
}

pub(crate) const AF_INET: u16 = 2;
pub(crate) const AF_INET6: u16 = 10;

pub(crate) const CFG_ENABLED: u32 = c::CFG_ENABLED;
pub(crate) const CFG_NODE_STRICT: u32 = c::CFG_NODE_STRICT;
pub(crate) const CFG_REJECT_RST: u32 = c::CFG_REJECT_RST;
pub(crate) const CFG_IPV6: u32 = c::CFG_IPV6;

pub(crate) const POD_STRICT: u32 = c::POD_STRICT;

pub(crate) const MAX_PROXY_PORTS: usize = c::MAX_PROXY_PORTS;

pub(crate) const REASON_STRICT_PLAINTEXT: u32 = c::REASON_STRICT_PLAINTEXT;
pub(crate) const REASON_PROXY_UNAVAILABLE: u32 = c::REASON_PROXY_UNAVAILABLE;
pub(crate) const REASON_FRAGMENT: u32 = c::REASON_FRAGMENT;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Config {
    pub flags: u32,
    pub outbound_ip4: [u8; 4],
    pub outbound_ip6: [u8; 16],
    pub outbound_port: [u8; 2],
    pub inbound_plain_port: [u8; 2],
    pub inbound_hbone_port: [u8; 2],
    pub pad0: u16,
    pub inbound_ip4: [u8; 4],
    pub mark: u32,
    pub route_table: u32,
    pub proxy_ports: [[u8; 2]; MAX_PROXY_PORTS],
}

/// Address + port; IPv4 is stored v4-mapped. Bytes are in network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Addr {
    pub addr: [u8; 16],
    pub port: [u8; 2],
    pub family: u16,
    pub pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Ip {
    pub addr: [u8; 16],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct BridgePort {
    pub bridge_ifindex: u32,
    pub bridge_mac: [u8; 6],
    pub pad: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct DropEvent {
    pub ts_ns: u64,
    pub src: Ip,
    pub dst: Ip,
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub reason: u32,
}

// SAFETY: plain repr(C) data without padding holes that matter; any bit pattern is valid.
unsafe impl aya::Pod for Config {}
// SAFETY: as above.
unsafe impl aya::Pod for Addr {}
// SAFETY: as above.
unsafe impl aya::Pod for Ip {}
// SAFETY: as above.
unsafe impl aya::Pod for BridgePort {}

/// Fails the build unless `$rust` has the C struct's size and each field its C offset.
macro_rules! same_layout {
    ($rust:ty, $size:path, { $($field:ident: $offset:path),+ $(,)? }) => {
        const _: () = assert!(size_of::<$rust>() == $size, "size differs from bpf/abi.h");
        $(
            const _: () = assert!(
                offset_of!($rust, $field) == $offset,
                concat!(stringify!($rust), ".", stringify!($field), " differs from bpf/abi.h")
            );
        )+
    };
}

same_layout!(Config, c::zm_config__SIZE, {
    flags: c::zm_config__flags,
    outbound_ip4: c::zm_config__outbound_ip4,
    outbound_ip6: c::zm_config__outbound_ip6,
    outbound_port: c::zm_config__outbound_port,
    inbound_plain_port: c::zm_config__inbound_plain_port,
    inbound_hbone_port: c::zm_config__inbound_hbone_port,
    pad0: c::zm_config__pad0,
    inbound_ip4: c::zm_config__inbound_ip4,
    mark: c::zm_config__mark,
    route_table: c::zm_config__route_table,
    proxy_ports: c::zm_config__proxy_ports,
});
same_layout!(Addr, c::zm_addr__SIZE, {
    addr: c::zm_addr__addr,
    port: c::zm_addr__port,
    family: c::zm_addr__family,
    pad: c::zm_addr__pad,
});
same_layout!(Ip, c::zm_ip__SIZE, { addr: c::zm_ip__addr });
same_layout!(BridgePort, c::zm_bridge_port__SIZE, {
    bridge_ifindex: c::zm_bridge_port__bridge_ifindex,
    bridge_mac: c::zm_bridge_port__bridge_mac,
    pad: c::zm_bridge_port__pad,
});
same_layout!(DropEvent, c::zm_drop_event__SIZE, {
    ts_ns: c::zm_drop_event__ts_ns,
    src: c::zm_drop_event__src,
    dst: c::zm_drop_event__dst,
    sport: c::zm_drop_event__sport,
    dport: c::zm_drop_event__dport,
    reason: c::zm_drop_event__reason,
});

impl Ip {
    pub fn new(ip: IpAddr) -> Self {
        let addr = match ip {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        };
        Self { addr }
    }

    pub fn to_ip(self) -> IpAddr {
        Ipv6Addr::from(self.addr).to_canonical()
    }
}

impl Addr {
    /// Key of the by-peer map: the client's address as the proxy sees it.
    pub fn peer_key(peer: SocketAddr) -> Self {
        Self {
            addr: Ip::new(peer.ip()).addr,
            port: peer.port().to_be_bytes(),
            family: 0,
            pad: 0,
        }
    }

    /// The original destination, in the family the client used.
    pub fn to_socket_addr(self) -> Option<SocketAddr> {
        let port = u16::from_be_bytes(self.port);
        let v6 = Ipv6Addr::from(self.addr);
        match self.family {
            AF_INET => v6
                .to_ipv4_mapped()
                .map(|v4| SocketAddr::V4(SocketAddrV4::new(v4, port))),
            AF_INET6 => Some(SocketAddr::V6(SocketAddrV6::new(v6, port, 0, 0))),
            _ => None,
        }
    }
}

pub(crate) fn ipv4_bytes(ip: Ipv4Addr) -> [u8; 4] {
    ip.octets()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_peer_key_is_v4_mapped_network_order() {
        let k = Addr::peer_key("10.1.2.3:4660".parse().unwrap());
        assert_eq!(&k.addr[..12], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
        assert_eq!(&k.addr[12..], &[10, 1, 2, 3]);
        assert_eq!(k.port, [0x12, 0x34]);
    }

    #[test]
    fn original_dst_round_trips_both_families() {
        let mut a = Addr::peer_key("192.0.2.7:80".parse().unwrap());
        a.family = AF_INET;
        assert_eq!(a.to_socket_addr(), Some("192.0.2.7:80".parse().unwrap()));
        let mut b = Addr::peer_key("[2001:db8::1]:443".parse().unwrap());
        b.family = AF_INET6;
        assert_eq!(
            b.to_socket_addr(),
            Some("[2001:db8::1]:443".parse().unwrap())
        );
        b.family = 99;
        assert_eq!(b.to_socket_addr(), None);
        // AF_INET family on a non-mapped address is corrupt data, not an address
        b.family = AF_INET;
        assert_eq!(b.to_socket_addr(), None);
    }

    #[test]
    fn ip_key_canonicalises_v4() {
        let ip: IpAddr = "10.0.0.9".parse().unwrap();
        assert_eq!(Ip::new(ip).to_ip(), ip);
    }
}
