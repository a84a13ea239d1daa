//! Reading classic pcap files (what `tcpdump -w` writes): Ethernet or Linux cooked
//! captures carrying IPv4 or IPv6, with TCP and UDP decoded.

use std::collections::{BTreeMap, HashSet};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;

use crate::error::{Error, Result};
use crate::servers::find;

const LINKTYPE_ETHERNET: u32 = 1;
const LINKTYPE_RAW: u32 = 101;
const LINKTYPE_LINUX_SLL: u32 = 113;
const LINKTYPE_IPV4: u32 = 228;
const LINKTYPE_LINUX_SLL2: u32 = 276;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const ETHERTYPE_VLAN: u16 = 0x8100;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

/// A parsed capture.
#[derive(Debug, Clone)]
pub struct Pcap {
    link_type: u32,
    packets: Vec<Packet>,
}

/// One captured frame, decoded as far as IPv4 or IPv6 + TCP/UDP.
#[derive(Debug, Clone)]
pub struct Packet {
    /// The captured bytes, link-layer header included.
    pub frame: Vec<u8>,
    /// The IPv4 header, if the frame carries IPv4.
    pub ipv4: Option<Ipv4Header>,
    /// The IPv6 header, if the frame carries IPv6.
    pub ipv6: Option<Ipv6Header>,
    /// The TCP segment, if it carries TCP (first fragment only).
    pub tcp: Option<TcpSegment>,
    /// The UDP datagram, if it carries UDP (first fragment only).
    pub udp: Option<UdpDatagram>,
}

/// The IPv4 fields tests look at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Header {
    /// Source address.
    pub src: Ipv4Addr,
    /// Destination address.
    pub dst: Ipv4Addr,
    /// The protocol number (6 TCP, 17 UDP).
    pub protocol: u8,
}

/// The IPv6 fields tests look at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv6Header {
    /// Source address.
    pub src: Ipv6Addr,
    /// Destination address.
    pub dst: Ipv6Addr,
    /// The fixed header's next header (6 TCP, 17 UDP; extension headers are not walked).
    pub next_header: u8,
}

/// A TCP segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpSegment {
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
    /// Sequence number.
    pub seq: u32,
    /// Flags byte (FIN 0x01, SYN 0x02, RST 0x04, PSH 0x08, ACK 0x10).
    pub flags: u8,
    /// The segment's payload (as captured).
    pub payload: Vec<u8>,
}

/// A UDP datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpDatagram {
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
    /// The payload (as captured).
    pub payload: Vec<u8>,
}

/// A TCP direction: (source address, source port, destination address, destination port).
pub type TcpFlow = (Ipv4Addr, u16, Ipv4Addr, u16);

/// [`TcpFlow`] for IPv6.
pub type TcpFlow6 = (Ipv6Addr, u16, Ipv6Addr, u16);

impl Pcap {
    /// Parses a complete pcap file.
    pub fn parse(data: &[u8]) -> Result<Pcap> {
        match parse(data)? {
            (pcap, None) => Ok(pcap),
            (_, Some(offset)) => Err(Error::Pcap(format!(
                "truncated record at byte {offset} of {}",
                data.len()
            ))),
        }
    }

    /// Parses a file that may still be being written: a partial last record is ignored.
    pub(crate) fn parse_partial(data: &[u8]) -> Result<Pcap> {
        parse(data).map(|(pcap, _)| pcap)
    }

    /// Reads and parses a pcap file.
    pub fn from_file(path: &Path) -> Result<Pcap> {
        let data = std::fs::read(path).map_err(|e| Error::io("reading pcap", path, e))?;
        Pcap::parse(&data)
    }

    /// The link-layer type (1 Ethernet, 113/276 Linux cooked).
    pub fn link_type(&self) -> u32 {
        self.link_type
    }

    /// All packets in capture order.
    pub fn packets(&self) -> &[Packet] {
        &self.packets
    }

    /// Whether `needle` was on the wire: inside any single frame, or inside any TCP byte
    /// stream even when it was split across segments (so "must not appear" checks cannot
    /// be fooled by segmentation).
    pub fn contains(&self, needle: &[u8]) -> bool {
        self.packets
            .iter()
            .any(|p| find(&p.frame, needle).is_some())
            || self
                .tcp_streams()
                .values()
                .any(|stream| find(stream, needle).is_some())
            || self
                .tcp_streams6()
                .values()
                .any(|stream| find(stream, needle).is_some())
    }

    /// Per TCP port, how many packets had it as source or destination port.
    pub fn tcp_ports(&self) -> BTreeMap<u16, usize> {
        let mut ports = BTreeMap::new();
        for tcp in self.packets.iter().filter_map(|p| p.tcp.as_ref()) {
            *ports.entry(tcp.src_port).or_insert(0) += 1;
            if tcp.dst_port != tcp.src_port {
                *ports.entry(tcp.dst_port).or_insert(0) += 1;
            }
        }
        ports
    }

    /// The ports that received a TCP SYN (connection attempts): the servers' ports.
    pub fn tcp_syn_ports(&self) -> HashSet<u16> {
        self.packets
            .iter()
            .filter_map(|p| p.tcp.as_ref())
            .filter(|t| t.flags & 0x12 == 0x02)
            .map(|t| t.dst_port)
            .collect()
    }

    /// [`Pcap::tcp_streams`] for IPv6.
    pub fn tcp_streams6(&self) -> BTreeMap<TcpFlow6, Vec<u8>> {
        let mut streams: BTreeMap<TcpFlow6, Vec<u8>> = BTreeMap::new();
        let mut seen: HashSet<(TcpFlow6, u32)> = HashSet::new();
        for p in &self.packets {
            let (Some(ip), Some(tcp)) = (&p.ipv6, &p.tcp) else {
                continue;
            };
            let flow = (ip.src, tcp.src_port, ip.dst, tcp.dst_port);
            if !tcp.payload.is_empty() && seen.insert((flow, tcp.seq)) {
                streams
                    .entry(flow)
                    .or_default()
                    .extend_from_slice(&tcp.payload);
            }
        }
        streams
    }

    /// Each TCP direction's payload bytes in capture order, retransmissions dropped (IPv4).
    pub fn tcp_streams(&self) -> BTreeMap<TcpFlow, Vec<u8>> {
        let mut streams: BTreeMap<TcpFlow, Vec<u8>> = BTreeMap::new();
        let mut seen: HashSet<(TcpFlow, u32)> = HashSet::new();
        for p in &self.packets {
            let (Some(ip), Some(tcp)) = (&p.ipv4, &p.tcp) else {
                continue;
            };
            if tcp.payload.is_empty() {
                continue;
            }
            let flow = (ip.src, tcp.src_port, ip.dst, tcp.dst_port);
            if seen.insert((flow, tcp.seq)) {
                streams
                    .entry(flow)
                    .or_default()
                    .extend_from_slice(&tcp.payload);
            }
        }
        streams
    }
}

/// Returns the packets and, if the data ends inside a record, that record's offset.
fn parse(data: &[u8]) -> Result<(Pcap, Option<usize>)> {
    let header = data.get(..24).ok_or_else(|| {
        Error::Pcap(format!(
            "{} bytes is shorter than a pcap header",
            data.len()
        ))
    })?;
    let magic = [header[0], header[1], header[2], header[3]];
    let big_endian = match magic {
        [0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1] => false,
        [0xa1, 0xb2, 0xc3, 0xd4] | [0xa1, 0xb2, 0x3c, 0x4d] => true,
        _ => {
            return Err(Error::Pcap(format!(
                "bad magic {magic:02x?} (pcapng is not supported)"
            )))
        }
    };
    let u32_at = |bytes: &[u8], at: usize| {
        let b = [bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]];
        if big_endian {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        }
    };
    // The top bits of the link-type field may carry FCS information.
    let link_type = u32_at(header, 20) & 0x0fff_ffff;
    let mut packets = Vec::new();
    let mut offset = 24;
    while offset < data.len() {
        let Some(record) = data.get(offset..offset + 16) else {
            return Ok((Pcap { link_type, packets }, Some(offset)));
        };
        let captured = u32_at(record, 8) as usize;
        if captured > 256 * 1024 * 1024 {
            return Err(Error::Pcap(format!(
                "record at byte {offset} claims {captured} bytes"
            )));
        }
        let Some(frame) = data.get(offset + 16..offset + 16 + captured) else {
            return Ok((Pcap { link_type, packets }, Some(offset)));
        };
        packets.push(decode(link_type, frame));
        offset += 16 + captured;
    }
    Ok((Pcap { link_type, packets }, None))
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// Decodes what it can; anything malformed or not IP is kept as a bare frame.
fn decode(link_type: u32, frame: &[u8]) -> Packet {
    let mut packet = Packet {
        frame: frame.to_vec(),
        ipv4: None,
        ipv6: None,
        tcp: None,
        udp: None,
    };
    let ethertype = match link_type {
        LINKTYPE_ETHERNET => {
            let mut at = 12;
            let mut ethertype = be16(frame, at);
            while ethertype == Some(ETHERTYPE_VLAN) {
                at += 4;
                ethertype = be16(frame, at);
            }
            ethertype.map(|t| (t, at + 2))
        }
        LINKTYPE_LINUX_SLL => be16(frame, 14).map(|t| (t, 16)),
        LINKTYPE_LINUX_SLL2 => be16(frame, 0).map(|t| (t, 20)),
        _ => None,
    };
    if let Some((ETHERTYPE_IPV6, at)) = ethertype {
        if let Some(ip6) = frame.get(at..) {
            decode_ipv6(&mut packet, ip6);
        }
        return packet;
    }
    let ip = match link_type {
        LINKTYPE_ETHERNET => {
            let mut at = 12;
            let mut ethertype = be16(frame, at);
            while ethertype == Some(ETHERTYPE_VLAN) {
                at += 4;
                ethertype = be16(frame, at);
            }
            (ethertype == Some(ETHERTYPE_IPV4))
                .then(|| frame.get(at + 2..))
                .flatten()
        }
        LINKTYPE_LINUX_SLL => (be16(frame, 14) == Some(ETHERTYPE_IPV4))
            .then(|| frame.get(16..))
            .flatten(),
        LINKTYPE_LINUX_SLL2 => (be16(frame, 0) == Some(ETHERTYPE_IPV4))
            .then(|| frame.get(20..))
            .flatten(),
        LINKTYPE_RAW | LINKTYPE_IPV4 => Some(frame),
        _ => None,
    };
    let Some(ip) = ip else { return packet };
    if ip.len() < 20 || ip[0] >> 4 != 4 {
        return packet;
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = be16(ip, 2).map_or(ip.len(), usize::from).min(ip.len());
    if ihl < 20 || total < ihl {
        return packet;
    }
    let protocol = ip[9];
    packet.ipv4 = Some(Ipv4Header {
        src: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        dst: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
        protocol,
    });
    let fragment_offset = be16(ip, 6).unwrap_or(0) & 0x1fff;
    if fragment_offset != 0 {
        return packet;
    }
    decode_l4(&mut packet, protocol, &ip[ihl..total]);
    packet
}

/// The fixed IPv6 header and what directly follows it (no extension headers).
fn decode_ipv6(packet: &mut Packet, ip: &[u8]) {
    if ip.len() < 40 || ip[0] >> 4 != 6 {
        return;
    }
    let octets = |at: usize| -> [u8; 16] {
        let mut a = [0; 16];
        a.copy_from_slice(&ip[at..at + 16]);
        a
    };
    let next_header = ip[6];
    packet.ipv6 = Some(Ipv6Header {
        src: Ipv6Addr::from(octets(8)),
        dst: Ipv6Addr::from(octets(24)),
        next_header,
    });
    let payload_len = be16(ip, 4).map_or(0, usize::from);
    let l4 = &ip[40..(40 + payload_len).min(ip.len())];
    decode_l4(packet, next_header, l4);
}

fn decode_l4(packet: &mut Packet, protocol: u8, l4: &[u8]) {
    match protocol {
        IPPROTO_TCP if l4.len() >= 20 => {
            let data_offset = usize::from(l4[12] >> 4) * 4;
            if data_offset >= 20 && data_offset <= l4.len() {
                packet.tcp = Some(TcpSegment {
                    src_port: be16(l4, 0).unwrap_or(0),
                    dst_port: be16(l4, 2).unwrap_or(0),
                    seq: u32::from_be_bytes([l4[4], l4[5], l4[6], l4[7]]),
                    flags: l4[13],
                    payload: l4[data_offset..].to_vec(),
                });
            }
        }
        IPPROTO_UDP if l4.len() >= 8 => {
            packet.udp = Some(UdpDatagram {
                src_port: be16(l4, 0).unwrap_or(0),
                dst_port: be16(l4, 2).unwrap_or(0),
                payload: l4[8..].to_vec(),
            });
        }
        _ => {}
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An Ethernet/IPv4/TCP frame.
    pub(crate) fn tcp_frame(
        sport: u16,
        dport: u16,
        seq: u32,
        flags: u8,
        payload: &[u8],
    ) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        let total = (20 + 20 + payload.len()) as u16;
        f.extend_from_slice(&[0x45, 0]);
        f.extend_from_slice(&total.to_be_bytes());
        f.extend_from_slice(&[0, 0, 0x40, 0, 64, IPPROTO_TCP, 0, 0]);
        f.extend_from_slice(&[10, 201, 1, 2, 10, 201, 2, 2]);
        f.extend_from_slice(&sport.to_be_bytes());
        f.extend_from_slice(&dport.to_be_bytes());
        f.extend_from_slice(&seq.to_be_bytes());
        f.extend_from_slice(&[0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
        f.extend_from_slice(payload);
        f
    }

    /// An Ethernet + IPv6 + TCP frame fd00:201:1::2 -> fd00:201:2::2.
    pub(crate) fn tcp6_frame(sport: u16, dport: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
        f.extend_from_slice(&[0x60, 0, 0, 0]);
        f.extend_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
        f.extend_from_slice(&[IPPROTO_TCP, 64]);
        f.extend_from_slice(&Ipv6Addr::new(0xfd00, 0x201, 1, 0, 0, 0, 0, 2).octets());
        f.extend_from_slice(&Ipv6Addr::new(0xfd00, 0x201, 2, 0, 0, 0, 0, 2).octets());
        f.extend_from_slice(&sport.to_be_bytes());
        f.extend_from_slice(&dport.to_be_bytes());
        f.extend_from_slice(&seq.to_be_bytes());
        f.extend_from_slice(&[0, 0, 0, 0, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0]);
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn decodes_ipv6_tcp_and_finds_split_payload() {
        let data = file(&[
            tcp6_frame(40000, 15008, 1, b"secret-"),
            tcp6_frame(40000, 15008, 8, b"payload"),
            tcp6_frame(40000, 15008, 8, b"payload"), // retransmitted
        ]);
        let pcap = Pcap::parse(&data).unwrap();
        let ip6 = pcap.packets()[0].ipv6.unwrap();
        assert_eq!(ip6.dst, Ipv6Addr::new(0xfd00, 0x201, 2, 0, 0, 0, 0, 2));
        assert_eq!(ip6.next_header, IPPROTO_TCP);
        assert!(pcap.packets()[0].ipv4.is_none());
        assert_eq!(pcap.tcp_ports().get(&15008), Some(&3));
        assert!(pcap.contains(b"secret-payload"));
        let streams = pcap.tcp_streams6();
        assert_eq!(streams.values().next().unwrap(), b"secret-payload");
    }

    pub(crate) fn file(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&0xa1b2c3d4u32.to_le_bytes());
        d.extend_from_slice(&[2, 0, 4, 0]);
        d.extend_from_slice(&[0; 8]);
        d.extend_from_slice(&65535u32.to_le_bytes());
        d.extend_from_slice(&LINKTYPE_ETHERNET.to_le_bytes());
        for f in frames {
            d.extend_from_slice(&[0; 8]);
            d.extend_from_slice(&(f.len() as u32).to_le_bytes());
            d.extend_from_slice(&(f.len() as u32).to_le_bytes());
            d.extend_from_slice(f);
        }
        d
    }

    #[test]
    fn decodes_tcp_and_summarises_ports() {
        let data = file(&[
            tcp_frame(40000, 8080, 1, 0x02, b""),
            tcp_frame(8080, 40000, 9, 0x12, b""),
            tcp_frame(40000, 8080, 2, 0x18, b"hello"),
        ]);
        let pcap = Pcap::parse(&data).unwrap();
        assert_eq!(pcap.link_type(), LINKTYPE_ETHERNET);
        assert_eq!(pcap.packets().len(), 3);
        let tcp = pcap.packets()[2].tcp.as_ref().unwrap();
        assert_eq!(
            (tcp.src_port, tcp.dst_port, tcp.payload.as_slice()),
            (40000, 8080, &b"hello"[..])
        );
        assert_eq!(
            pcap.packets()[0].ipv4.unwrap().dst,
            Ipv4Addr::new(10, 201, 2, 2)
        );
        assert_eq!(pcap.tcp_ports().get(&8080), Some(&3));
        assert_eq!(pcap.tcp_syn_ports(), HashSet::from([8080]));
        assert!(pcap.contains(b"hello"));
        assert!(!pcap.contains(b"absent"));
    }

    #[test]
    fn finds_payload_split_across_segments_and_ignores_retransmits() {
        let data = file(&[
            tcp_frame(1, 2, 100, 0x18, b"sec"),
            tcp_frame(1, 2, 100, 0x18, b"sec"),
            tcp_frame(1, 2, 103, 0x18, b"ret"),
        ]);
        let pcap = Pcap::parse(&data).unwrap();
        assert!(pcap.contains(b"secret"));
        assert_eq!(pcap.tcp_streams().values().next().unwrap(), b"secret");
    }

    #[test]
    fn big_endian_files_parse() {
        let mut d = Vec::new();
        d.extend_from_slice(&0xa1b2c3d4u32.to_be_bytes());
        d.extend_from_slice(&[0, 2, 0, 4]);
        d.extend_from_slice(&[0; 12]);
        d.extend_from_slice(&LINKTYPE_ETHERNET.to_be_bytes());
        let f = tcp_frame(5, 6, 0, 0x02, b"");
        d.extend_from_slice(&[0; 8]);
        d.extend_from_slice(&(f.len() as u32).to_be_bytes());
        d.extend_from_slice(&(f.len() as u32).to_be_bytes());
        d.extend_from_slice(&f);
        let pcap = Pcap::parse(&d).unwrap();
        assert_eq!(pcap.packets()[0].tcp.as_ref().unwrap().dst_port, 6);
    }

    #[test]
    fn rejects_garbage_and_truncation() {
        assert!(matches!(Pcap::parse(b"short"), Err(Error::Pcap(_))));
        assert!(matches!(Pcap::parse(&[0u8; 24]), Err(Error::Pcap(m)) if m.contains("magic")));
        let mut data = file(&[tcp_frame(1, 2, 0, 0x02, b"x")]);
        data.truncate(data.len() - 1);
        assert!(matches!(Pcap::parse(&data), Err(Error::Pcap(m)) if m.contains("truncated")));
        assert_eq!(Pcap::parse_partial(&data).unwrap().packets().len(), 0);
    }

    #[test]
    fn malformed_frames_do_not_panic() {
        let mut frames = vec![vec![], vec![0; 13], vec![0xff; 60]];
        let mut bad_ihl = tcp_frame(1, 2, 0, 0, b"");
        bad_ihl[14] = 0x4f; // ihl 60 > packet
        frames.push(bad_ihl);
        let mut bad_offset = tcp_frame(1, 2, 0, 0, b"");
        bad_offset[14 + 20 + 12] = 0xf0; // TCP data offset 60 > segment
        frames.push(bad_offset);
        let pcap = Pcap::parse(&file(&frames)).unwrap();
        assert_eq!(pcap.packets().len(), 5);
        assert!(pcap.packets().iter().all(|p| p.tcp.is_none()));
    }
}
