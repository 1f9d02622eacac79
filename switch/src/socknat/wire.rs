//! The Ethernet and IP layers of socket NAT: a defensive parse of the TCP, UDP and ICMP
//! frames a guest sends (IPv4 or IPv6), and builders that write the frames going back to it
//! into buffers the caller owns. Addresses travel as `SocketAddr`/`IpAddr` so the flow logic
//! above does not care about the IP version; only this module knows the headers. The one
//! thing a caller must know is where a frame's payload starts, which depends on the version
//! ([`tcp_frame_hdr`], [`udp_frame_hdr`], [`icmp_frame_hdr`]).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::{Drop, FlowKey};
use crate::checksum::{finish, pseudo_v4, pseudo_v6, sum};
use crate::ipv6::IPPROTO_ICMPV6;
use crate::proto::{ETH_P_IPV4, ETH_P_IPV6, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP};
use crate::vnet::{VnetHeader, F_NEEDS_CSUM, GSO_TCPV4, GSO_TCPV6};
use crate::Mac;

pub const ETH_LEN: usize = 14;
pub const IPV4_LEN: usize = 20;
pub const IPV6_LEN: usize = 40;
pub const TCP_LEN: usize = 20;
pub const UDP_LEN: usize = 8;
/// Ethernet + IPv4 + TCP without options: where the payload of a data frame starts.
pub const TCP_FRAME_HDR: usize = ETH_LEN + IPV4_LEN + TCP_LEN;
/// Ethernet + IPv4 + UDP.
pub const UDP_FRAME_HDR: usize = ETH_LEN + IPV4_LEN + UDP_LEN;
/// Ethernet + IPv4: where the ICMP message of a frame starts.
pub const ICMP_FRAME_HDR: usize = ETH_LEN + IPV4_LEN;
/// An ICMP echo header: type, code, checksum, identifier, sequence number.
pub const ICMP_ECHO_LEN: usize = 8;
pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_ECHO_REQUEST: u8 = 8;
/// The same for IPv6: Ethernet + IPv6 + TCP, + UDP, and where an ICMPv6 message starts.
pub const TCP6_FRAME_HDR: usize = ETH_LEN + IPV6_LEN + TCP_LEN;
pub const UDP6_FRAME_HDR: usize = ETH_LEN + IPV6_LEN + UDP_LEN;
pub const ICMP6_FRAME_HDR: usize = ETH_LEN + IPV6_LEN;
pub const ICMPV6_ECHO_REQUEST: u8 = 128;
pub const ICMPV6_ECHO_REPLY: u8 = 129;
/// Extension headers walked before a guest packet is given up on (real traffic has none or
/// one).
const MAX_EXT_HEADERS: usize = 4;
/// The largest IP packet: a frame to a guest never carries more than this after Ethernet.
pub const MAX_IP_PACKET: usize = 65535;

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;

/// The two MAC addresses of every frame to a guest: the guest's (learnt from its SYN or first
/// datagram) and the gateway's, since every NATed peer is off-link, behind the gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Link {
    pub guest_mac: Mac,
    pub gw_mac: Mac,
}

/// A TCP segment from a guest, with every offset checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpSegment<'a> {
    pub link: Link,
    /// The guest's end.
    pub src: SocketAddr,
    /// The remote end the guest wants.
    pub dst: SocketAddr,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
    /// Options, as found (only a SYN's matter).
    pub mss: Option<u16>,
    pub wscale: Option<u8>,
    pub payload: &'a [u8],
}

impl TcpSegment<'_> {
    pub fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    /// Sequence space the segment occupies: payload, plus one each for SYN and FIN.
    pub fn seq_len(&self) -> u32 {
        self.payload.len() as u32 + self.has(SYN) as u32 + self.has(FIN) as u32
    }
}

/// A UDP datagram from a guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpDatagram<'a> {
    pub link: Link,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub payload: &'a [u8],
}

/// An ICMP echo request from a guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcmpEcho<'a> {
    pub link: Link,
    pub src: IpAddr,
    pub dst: IpAddr,
    /// The guest's echo identifier.
    pub ident: u16,
    pub seq: u16,
    /// The whole ICMP message (header and data), checked.
    pub message: &'a [u8],
}

/// The IP header length of a packet between addresses of `ip`'s version.
pub fn ip_len(ip: IpAddr) -> usize {
    if ip.is_ipv6() {
        IPV6_LEN
    } else {
        IPV4_LEN
    }
}

/// Where the payload of a TCP frame (without options) to or from `ip` starts.
pub fn tcp_frame_hdr(ip: IpAddr) -> usize {
    ETH_LEN + ip_len(ip) + TCP_LEN
}

/// Where the payload of a UDP frame to or from `ip` starts.
pub fn udp_frame_hdr(ip: IpAddr) -> usize {
    ETH_LEN + ip_len(ip) + UDP_LEN
}

/// Where the ICMP (or ICMPv6) message of a frame to or from `ip` starts.
pub fn icmp_frame_hdr(ip: IpAddr) -> usize {
    ETH_LEN + ip_len(ip)
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Ethernet and IP (v4 or v6) of a guest frame: the link, the addresses, the protocol and the
/// transport bytes (trimmed to the IP length, which drops Ethernet padding). `gso`: a TSO
/// frame, whose length field the guest may leave stale (the kernel fixes it per segment), so
/// the frame length counts and the IPv4 header checksum is not checked.
fn parse_ip(frame: &[u8], gso: bool) -> Result<(Link, IpAddr, IpAddr, u8, &[u8]), Drop> {
    if frame.len() < ETH_LEN + IPV4_LEN {
        return Err(Drop::ShortFrame);
    }
    match be16(frame, 12) {
        ETH_P_IPV4 => parse_ipv4(frame, gso),
        ETH_P_IPV6 => parse_ipv6(frame, gso),
        _ => Err(Drop::NotIp),
    }
}

fn parse_ipv4(frame: &[u8], gso: bool) -> Result<(Link, IpAddr, IpAddr, u8, &[u8]), Drop> {
    let link = Link { guest_mac: crate::src_mac(frame), gw_mac: crate::dst_mac(frame) };
    let ip = &frame[ETH_LEN..];
    if ip[0] >> 4 != 4 {
        return Err(Drop::BadIpHeader);
    }
    let ihl = (ip[0] & 0xf) as usize * 4;
    let total = if gso { ip.len() } else { be16(ip, 2) as usize };
    if ihl < IPV4_LEN || total < ihl || total > ip.len() {
        return Err(Drop::BadIpHeader);
    }
    if !gso && finish(sum(&ip[..ihl], 0)) != 0 {
        return Err(Drop::BadIpHeader);
    }
    // Fragments: the transport header is absent or incomplete, and socket NAT has nothing to
    // reassemble them with; guests send DF segments anyway.
    if be16(ip, 6) & 0x3fff != 0 {
        return Err(Drop::Fragment);
    }
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    Ok((link, IpAddr::V4(src), IpAddr::V4(dst), ip[9], &ip[ihl..total]))
}

fn v6_at(b: &[u8], at: usize) -> Ipv6Addr {
    let mut o = [0u8; 16];
    o.copy_from_slice(&b[at..at + 16]);
    Ipv6Addr::from(o)
}

/// The IPv6 fixed header and the extension headers a host may send (hop-by-hop first,
/// destination options, a routing header with no segments left), walked to the transport
/// header. A fragment header is a fragment (nothing to reassemble with, as for IPv4); a
/// routing header with segments left names another destination and is refused.
fn parse_ipv6(frame: &[u8], gso: bool) -> Result<(Link, IpAddr, IpAddr, u8, &[u8]), Drop> {
    if frame.len() < ETH_LEN + IPV6_LEN {
        return Err(Drop::ShortFrame);
    }
    let link = Link { guest_mac: crate::src_mac(frame), gw_mac: crate::dst_mac(frame) };
    let ip = &frame[ETH_LEN..];
    if ip[0] >> 4 != 6 {
        return Err(Drop::BadIpHeader);
    }
    let total = if gso { ip.len() } else { IPV6_LEN + be16(ip, 4) as usize };
    if total > ip.len() {
        return Err(Drop::BadIpHeader);
    }
    let body = &ip[IPV6_LEN..total];
    let (mut next, mut off) = (ip[6], 0usize);
    for i in 0..=MAX_EXT_HEADERS {
        let len = match next {
            0 if i > 0 => return Err(Drop::BadIpHeader),
            0 | 43 | 60 => (*body.get(off + 1).ok_or(Drop::BadIpHeader)? as usize + 1) * 8,
            44 => return Err(Drop::Fragment),
            proto => return Ok((link, IpAddr::V6(v6_at(ip, 8)), IpAddr::V6(v6_at(ip, 24)), proto, &body[off..])),
        };
        let h = body.get(off..off + len).ok_or(Drop::BadIpHeader)?;
        if next == 43 && h[3] != 0 {
            return Err(Drop::BadIpHeader);
        }
        next = h[0];
        off += len;
    }
    Err(Drop::BadIpHeader)
}

/// Parses a guest frame as TCP over IPv4 or IPv6. `hdr` is the frame's virtio-net header (already validated
/// by the port): a TSO frame's length comes from the frame. The TCP checksum is not verified:
/// a guest that corrupts its own segments only hurts itself, and verifying would cost a pass
/// over every 64 KiB TSO frame.
pub fn parse_tcp<'a>(frame: &'a [u8], hdr: &VnetHeader) -> Result<TcpSegment<'a>, Drop> {
    let (link, src, dst, proto, l4) = parse_ip(frame, hdr.is_gso())?;
    if proto != IPPROTO_TCP {
        return Err(Drop::NotTcp);
    }
    if l4.len() < TCP_LEN {
        return Err(Drop::BadTcpHeader);
    }
    let doff = (l4[12] >> 4) as usize * 4;
    if doff < TCP_LEN || doff > l4.len() {
        return Err(Drop::BadTcpHeader);
    }
    let (mut mss, mut wscale) = (None, None);
    let opts = &l4[TCP_LEN..doff];
    let mut i = 0;
    while i < opts.len() {
        match opts[i] {
            0 => break,
            1 => i += 1,
            kind => {
                let len = *opts.get(i + 1).ok_or(Drop::BadOptions)? as usize;
                if len < 2 || i + len > opts.len() {
                    return Err(Drop::BadOptions);
                }
                match (kind, len) {
                    (2, 4) => mss = Some(be16(opts, i + 2)),
                    (3, 3) => wscale = Some(opts[i + 2]),
                    (2, _) | (3, _) => return Err(Drop::BadOptions),
                    _ => {}
                }
                i += len;
            }
        }
    }
    Ok(TcpSegment {
        link,
        src: SocketAddr::new(src, be16(l4, 0)),
        dst: SocketAddr::new(dst, be16(l4, 2)),
        seq: be32(l4, 4),
        ack: be32(l4, 8),
        flags: l4[13] & 0x3f,
        window: be16(l4, 14),
        mss,
        wscale,
        payload: &l4[doff..],
    })
}

/// Parses a guest frame as UDP over IPv4 or IPv6 (the UDP length field must fit the packet;
/// the zero checksum IPv6 forbids is not checked, as no TCP or UDP checksum is).
pub fn parse_udp<'a>(frame: &'a [u8], hdr: &VnetHeader) -> Result<UdpDatagram<'a>, Drop> {
    if hdr.is_gso() {
        // vunet never offers HOST_UFO: a UDP GSO frame is a broken or hostile guest.
        return Err(Drop::BadUdpHeader);
    }
    let (link, src, dst, proto, l4) = parse_ip(frame, false)?;
    if proto != IPPROTO_UDP {
        return Err(Drop::NotUdp);
    }
    if l4.len() < UDP_LEN {
        return Err(Drop::BadUdpHeader);
    }
    let len = be16(l4, 4) as usize;
    if len < UDP_LEN || len > l4.len() {
        return Err(Drop::BadUdpHeader);
    }
    Ok(UdpDatagram { link, src: SocketAddr::new(src, be16(l4, 0)), dst: SocketAddr::new(dst, be16(l4, 2)), payload: &l4[UDP_LEN..len] })
}

/// Parses a guest frame as an ICMP echo request (code 0) over IPv4, or an ICMPv6 one over
/// IPv6, with a correct checksum (for ICMPv6 over the pseudo-header). The checksum is checked
/// because the kernel recomputes it when it sends on the ping socket: a corrupt request must
/// not leave as a sound one. Messages are at most an MTU, so the pass is cheap.
pub fn parse_icmp_echo<'a>(frame: &'a [u8], hdr: &VnetHeader) -> Result<IcmpEcho<'a>, Drop> {
    if hdr.is_gso() {
        return Err(Drop::BadIcmp);
    }
    let (link, src, dst, proto, l4) = parse_ip(frame, false)?;
    let (want_proto, request, pseudo) = match (src, dst) {
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            (IPPROTO_ICMPV6, ICMPV6_ECHO_REQUEST, pseudo_v6(&s.octets(), &d.octets(), IPPROTO_ICMPV6, l4.len() as u32))
        }
        _ => (IPPROTO_ICMP, ICMP_ECHO_REQUEST, 0),
    };
    if proto != want_proto {
        return Err(Drop::NotIcmp);
    }
    if l4.len() < ICMP_ECHO_LEN {
        return Err(Drop::BadIcmp);
    }
    if l4[0] != request || l4[1] != 0 {
        return Err(Drop::NotEchoRequest);
    }
    if finish(sum(l4, pseudo)) != 0 {
        return Err(Drop::BadIcmp);
    }
    Ok(IcmpEcho { link, src, dst, ident: be16(l4, 4), seq: be16(l4, 6), message: l4 })
}

/// Writes Ethernet and IP (protocol ICMP, or ICMPv6 between IPv6 addresses) in front of an
/// ICMP message of `icmp_len` bytes the caller already placed at [`icmp_frame_hdr`] (its
/// checksum complete). Returns the frame length, or None when the buffer is too short, the
/// packet too large, or the addresses are of different versions.
pub fn write_icmp_frame(buf: &mut [u8], link: &Link, from: IpAddr, to: IpAddr, icmp_len: usize, id: u16) -> Option<usize> {
    let proto = if from.is_ipv6() { IPPROTO_ICMPV6 } else { IPPROTO_ICMP };
    let len = icmp_frame_hdr(from) + icmp_len;
    if buf.len() < len {
        return None;
    }
    write_eth_ip(buf, link, from, to, proto, icmp_len, id)?;
    Some(len)
}

/// How the transport checksum of a built frame is finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Csum {
    /// Computed here: the guest did not negotiate GUEST_CSUM.
    Full,
    /// Only the pseudo-header sum; the header says NEEDS_CSUM and the guest (or its NIC model)
    /// finishes it, which saves a pass over the payload.
    Partial,
    /// A TSO frame for a guest that negotiated GUEST_TSO4, cut by the guest at this MSS.
    Gso(u16),
}

/// Writes Ethernet and an IP header at the start of `buf`: IPv4 without options, DF, TTL 64;
/// or IPv6, hop limit 64, no extension headers. Returns the IP header length; None when the
/// addresses are of different versions, the packet would be too large for IP, or `buf` is
/// shorter than the headers.
fn write_eth_ip(buf: &mut [u8], link: &Link, src: IpAddr, dst: IpAddr, proto: u8, l4_len: usize, id: u16) -> Option<usize> {
    let ip_len = ip_len(src);
    if buf.len() < ETH_LEN + ip_len {
        return None;
    }
    buf[0..6].copy_from_slice(&link.guest_mac);
    buf[6..12].copy_from_slice(&link.gw_mac);
    let ip = &mut buf[ETH_LEN..ETH_LEN + ip_len];
    match (src, dst) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            if IPV4_LEN + l4_len > MAX_IP_PACKET {
                return None;
            }
            ip[0] = 0x45;
            ip[1] = 0;
            ip[2..4].copy_from_slice(&((IPV4_LEN + l4_len) as u16).to_be_bytes());
            ip[4..6].copy_from_slice(&id.to_be_bytes());
            ip[6..8].copy_from_slice(&0x4000u16.to_be_bytes());
            ip[8] = 64;
            ip[9] = proto;
            ip[10..12].copy_from_slice(&[0, 0]);
            ip[12..16].copy_from_slice(&src.octets());
            ip[16..20].copy_from_slice(&dst.octets());
            let c = finish(sum(ip, 0));
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            buf[12..14].copy_from_slice(&ETH_P_IPV4.to_be_bytes());
        }
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            if l4_len > MAX_IP_PACKET {
                return None;
            }
            ip[0..4].copy_from_slice(&[0x60, 0, 0, 0]);
            ip[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes());
            ip[6] = proto;
            ip[7] = 64;
            ip[8..24].copy_from_slice(&src.octets());
            ip[24..40].copy_from_slice(&dst.octets());
            buf[12..14].copy_from_slice(&ETH_P_IPV6.to_be_bytes());
        }
        _ => return None,
    }
    Some(ip_len)
}

/// The transport checksum's pseudo-header sum for a packet from `src` to `dst`.
fn pseudo(src: IpAddr, dst: IpAddr, proto: u8, l4_len: usize) -> u64 {
    match (src, dst) {
        (IpAddr::V6(s), IpAddr::V6(d)) => pseudo_v6(&s.octets(), &d.octets(), proto, l4_len as u32),
        (IpAddr::V4(s), IpAddr::V4(d)) => pseudo_v4(&s.octets(), &d.octets(), proto, l4_len as u16),
        _ => 0,
    }
}

/// The TCP header fields of a segment to a guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpOut {
    /// The remote end (the segment's source).
    pub from: SocketAddr,
    /// The guest's end.
    pub to: SocketAddr,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
}

/// Builds a TCP frame to a guest in `buf`: headers, then `opts` (a multiple of 4 bytes), then
/// `payload_len` bytes the caller already placed at [`tcp_frame_hdr`]` + opts.len()`. Returns
/// the frame length and its virtio-net header (GSO TCPV4 or TCPV6 by the addresses), or None
/// when the buffer is too short, the packet too large, or the addresses are of different
/// versions.
pub fn write_tcp(
    buf: &mut [u8],
    link: &Link,
    h: &TcpOut,
    opts: &[u8],
    payload_len: usize,
    id: u16,
    csum: Csum,
) -> Option<(usize, VnetHeader)> {
    let (from, to) = (h.from.ip(), h.to.ip());
    let l4_len = TCP_LEN + opts.len() + payload_len;
    let l3 = ETH_LEN + ip_len(from);
    let len = l3 + l4_len;
    if !opts.len().is_multiple_of(4) || opts.len() > 40 || buf.len() < len {
        return None;
    }
    write_eth_ip(buf, link, from, to, IPPROTO_TCP, l4_len, id)?;
    let t = &mut buf[l3..len];
    t[0..2].copy_from_slice(&h.from.port().to_be_bytes());
    t[2..4].copy_from_slice(&h.to.port().to_be_bytes());
    t[4..8].copy_from_slice(&h.seq.to_be_bytes());
    t[8..12].copy_from_slice(&h.ack.to_be_bytes());
    t[12] = (((TCP_LEN + opts.len()) / 4) as u8) << 4;
    t[13] = h.flags;
    t[14..16].copy_from_slice(&h.window.to_be_bytes());
    t[16..20].copy_from_slice(&[0, 0, 0, 0]);
    t[TCP_LEN..TCP_LEN + opts.len()].copy_from_slice(opts);
    let pseudo = pseudo(from, to, IPPROTO_TCP, l4_len);
    let mut vh = VnetHeader::default();
    match csum {
        Csum::Full => {
            let c = finish(sum(t, pseudo));
            t[16..18].copy_from_slice(&c.to_be_bytes());
        }
        Csum::Partial | Csum::Gso(_) => {
            t[16..18].copy_from_slice(&(!finish(pseudo)).to_be_bytes());
            vh.flags = F_NEEDS_CSUM;
            vh.csum_start = l3 as u16;
            vh.csum_offset = 16;
            if let Csum::Gso(mss) = csum {
                vh.gso_type = if from.is_ipv6() { GSO_TCPV6 } else { GSO_TCPV4 };
                vh.gso_size = mss;
                vh.hdr_len = (l3 + TCP_LEN + opts.len()) as u16;
            }
        }
    }
    Some((len, vh))
}

/// Builds a UDP frame to a guest: `payload_len` bytes already at [`udp_frame_hdr`]. The
/// checksum is always complete (datagrams are at most one MTU; not worth a second code path).
pub fn write_udp(buf: &mut [u8], link: &Link, from: SocketAddr, to: SocketAddr, payload_len: usize, id: u16) -> Option<usize> {
    let l4_len = UDP_LEN + payload_len;
    let l3 = ETH_LEN + ip_len(from.ip());
    let len = l3 + l4_len;
    if buf.len() < len || l4_len > MAX_IP_PACKET {
        return None;
    }
    write_eth_ip(buf, link, from.ip(), to.ip(), IPPROTO_UDP, l4_len, id)?;
    let u = &mut buf[l3..len];
    u[0..2].copy_from_slice(&from.port().to_be_bytes());
    u[2..4].copy_from_slice(&to.port().to_be_bytes());
    u[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes());
    u[6..8].copy_from_slice(&[0, 0]);
    let c = match finish(sum(u, pseudo(from.ip(), to.ip(), IPPROTO_UDP, l4_len))) {
        0 => 0xffff,
        c => c,
    };
    u[6..8].copy_from_slice(&c.to_be_bytes());
    Some(len)
}

/// The ICMPv6 destination unreachable code (RFC 4443 §3.1) for an ICMPv4 one: the state
/// machines and the I/O layer speak IPv4's codes, and the IPv6 frame says the same thing.
pub fn icmpv6_unreach_code(v4_code: u8) -> u8 {
    match v4_code {
        0 => 0,  // network unreachable: no route to destination
        1 => 3,  // host unreachable: address unreachable
        3 => 4,  // port unreachable
        13 => 1, // administratively prohibited
        _ => 3,
    }
}

/// Builds an ICMP destination unreachable (`code`, in ICMPv4's numbering; an IPv6 flow gets
/// the ICMPv6 one of the same meaning) to the guest about its TCP or UDP packet of `flow`
/// (guest to remote), sent as if by the remote end. The quoted packet is rebuilt from what the
/// flow kept (IP header and the first 8 transport bytes: ports and, for TCP, the sequence
/// number), which is all a guest stack needs to find the socket the error is for.
pub fn write_icmp_unreach(buf: &mut [u8], link: &Link, flow: &FlowKey, proto: u8, seq: u32, code: u8, id: u16) -> Option<usize> {
    let (g, r) = (flow.guest, flow.remote);
    let ip_len = ip_len(g.ip());
    let quote_len = ip_len + 8;
    let l4_len = 8 + quote_len;
    let l3 = ETH_LEN + ip_len;
    let len = l3 + l4_len;
    if buf.len() < len {
        return None;
    }
    let v6 = g.is_ipv6();
    write_eth_ip(buf, link, r.ip(), g.ip(), if v6 { IPPROTO_ICMPV6 } else { IPPROTO_ICMP }, l4_len, id)?;
    let icmp = &mut buf[l3..len];
    (icmp[0], icmp[1]) = if v6 { (1, icmpv6_unreach_code(code)) } else { (3, code) };
    icmp[2..8].copy_from_slice(&[0; 6]);
    // The quoted packet: the guest's original, as far as it matters.
    let q = &mut icmp[8..];
    let l4_orig: u16 = if proto == IPPROTO_TCP { 20 } else { 8 };
    match (g.ip(), r.ip()) {
        (IpAddr::V4(gi), IpAddr::V4(ri)) => {
            q[..20].fill(0);
            q[0] = 0x45;
            q[2..4].copy_from_slice(&(20 + l4_orig).to_be_bytes());
            q[6] = 0x40;
            q[8] = 64;
            q[9] = proto;
            q[12..16].copy_from_slice(&gi.octets());
            q[16..20].copy_from_slice(&ri.octets());
            let c = finish(sum(&q[..20], 0));
            q[10..12].copy_from_slice(&c.to_be_bytes());
        }
        (IpAddr::V6(gi), IpAddr::V6(ri)) => {
            q[0..4].copy_from_slice(&[0x60, 0, 0, 0]);
            q[4..6].copy_from_slice(&l4_orig.to_be_bytes());
            q[6] = proto;
            q[7] = 64;
            q[8..24].copy_from_slice(&gi.octets());
            q[24..40].copy_from_slice(&ri.octets());
        }
        _ => return None,
    }
    let t = &mut q[ip_len..];
    t[0..2].copy_from_slice(&g.port().to_be_bytes());
    t[2..4].copy_from_slice(&r.port().to_be_bytes());
    if proto == IPPROTO_TCP {
        t[4..8].copy_from_slice(&seq.to_be_bytes());
    } else {
        t[4..6].copy_from_slice(&8u16.to_be_bytes());
        t[6..8].fill(0);
    }
    let ps = if v6 { pseudo(r.ip(), g.ip(), IPPROTO_ICMPV6, l4_len) } else { 0 };
    let c = finish(sum(icmp, ps));
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    Some(len)
}

/// The RST that answers a guest segment no flow takes (no flow, or a SYN over the bounds), as
/// RFC 793 words it: if the segment had ACK, the RST takes its sequence number from that ACK;
/// otherwise it acknowledges the segment. Never an answer to a RST.
pub fn write_rst_reply(buf: &mut [u8], seg: &TcpSegment, id: u16) -> Option<usize> {
    if seg.has(RST) {
        return None;
    }
    let h = if seg.has(ACK) {
        TcpOut { from: seg.dst, to: seg.src, seq: seg.ack, ack: 0, flags: RST, window: 0 }
    } else {
        TcpOut { from: seg.dst, to: seg.src, seq: 0, ack: seg.seq.wrapping_add(seg.seq_len()), flags: RST | ACK, window: 0 }
    };
    write_tcp(buf, &seg.link, &h, &[], 0, id, Csum::Full).map(|(n, _)| n)
}
