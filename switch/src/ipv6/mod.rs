//! IPv6 as the gateway speaks it: a bounded, checked walk over Ethernet + IPv6 + extension
//! headers to the upper-layer header ([`parse`]), the ICMPv6 checksum, and frame building.
//! [`nd`] answers neighbour and router solicitations and echo requests, and makes router
//! advertisements. Pure: byte slices in, a verdict and maybe a frame out.

pub mod nd;

use std::net::Ipv6Addr;

use crate::checksum::{finish, pseudo_v6, sum};
use crate::proto::ETH_P_IPV6;
use crate::Mac;

pub const IPPROTO_ICMPV6: u8 = 58;
const IPV6_HDR: usize = 40;
const ETH_HDR: usize = 14;
/// Extension headers walked before giving up: real traffic carries one or two (a hop-by-hop
/// router alert); long chains are how RA-guard evasion hides ND (RFC 7113).
pub const MAX_EXT_HEADERS: usize = 8;

const EXT_HOP_BY_HOP: u8 = 0;
const EXT_ROUTING: u8 = 43;
const EXT_FRAGMENT: u8 = 44;
const EXT_AUTH: u8 = 51;
const EXT_DEST_OPTS: u8 = 60;

/// Why an IPv6 frame meant for the gateway was dropped. Each has its own counter in the
/// service that runs [`nd::Ndp`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum Ipv6Drop {
    /// Truncated IPv6 header, a version other than 6, a payload length beyond the frame or
    /// of zero (jumbograms are not for a gateway's control plane).
    BadHeader,
    /// An extension header chain that is truncated, longer than [`MAX_EXT_HEADERS`], has a
    /// hop-by-hop header not first, or a routing header with segments left.
    BadExtensions,
    /// A fragment header before ICMPv6: ND must not be fragmented (RFC 6980), and the
    /// gateway reassembles nothing.
    Fragmented,
    /// The ICMPv6 checksum does not match.
    BadChecksum,
    /// ND whose IPv6 hop limit is not 255: it crossed a router (RFC 4861 §6.1, §7.1).
    BadHopLimit,
    /// ND failing RFC 4861 validation: non-zero code, too short, an option of length 0 or
    /// running past the end, a multicast target, a multicast source, or a solicitation from
    /// `::` that carries a source link-layer address option or is not sent to a
    /// solicited-node group.
    BadNd,
}

impl Ipv6Drop {
    pub const ALL: [Ipv6Drop; 6] =
        [Ipv6Drop::BadHeader, Ipv6Drop::BadExtensions, Ipv6Drop::Fragmented, Ipv6Drop::BadChecksum, Ipv6Drop::BadHopLimit, Ipv6Drop::BadNd];

    /// Stable name used in logs and listings.
    pub fn name(self) -> &'static str {
        match self {
            Ipv6Drop::BadHeader => "ipv6_bad_header",
            Ipv6Drop::BadExtensions => "ipv6_bad_extensions",
            Ipv6Drop::Fragmented => "ipv6_fragmented",
            Ipv6Drop::BadChecksum => "icmpv6_bad_checksum",
            Ipv6Drop::BadHopLimit => "nd_bad_hop_limit",
            Ipv6Drop::BadNd => "nd_invalid",
        }
    }
}

/// An IPv6 packet in an Ethernet frame, walked to its upper-layer header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packet<'a> {
    pub src_mac: Mac,
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub hop_limit: u8,
    /// The upper-layer protocol after the extension headers.
    pub proto: u8,
    /// Whether a fragment header was on the way (even an atomic one).
    pub fragmented: bool,
    /// The upper-layer header and payload, cut at the IPv6 payload length (no padding).
    pub payload: &'a [u8],
}

/// Reads the IPv6 fixed header of an Ethernet frame: `None` if the frame is not IPv6 at all
/// (another EtherType, or shorter than an Ethernet header), `Some(Err)` if it is IPv6 but
/// broken.
pub fn header(frame: &[u8]) -> Option<Result<(Ipv6Addr, Ipv6Addr), Ipv6Drop>> {
    let eth = frame.get(..ETH_HDR)?;
    if u16::from_be_bytes([eth[12], eth[13]]) != ETH_P_IPV6 {
        return None;
    }
    let Some(ip) = frame.get(ETH_HDR..ETH_HDR + IPV6_HDR) else { return Some(Err(Ipv6Drop::BadHeader)) };
    if ip[0] >> 4 != 6 {
        return Some(Err(Ipv6Drop::BadHeader));
    }
    Some(Ok((addr(&ip[8..24]), addr(&ip[24..40]))))
}

fn addr(b: &[u8]) -> Ipv6Addr {
    let mut o = [0u8; 16];
    o.copy_from_slice(&b[..16]);
    Ipv6Addr::from(o)
}

/// Walks an Ethernet + IPv6 frame to its upper-layer header. The frame must be IPv6 (see
/// [`header`]); Ethernet padding past the payload length is ignored. ESP and "no next
/// header" end the walk with that protocol number and the rest as payload.
pub fn parse(frame: &[u8]) -> Result<Packet<'_>, Ipv6Drop> {
    let ip = frame.get(ETH_HDR..ETH_HDR + IPV6_HDR).ok_or(Ipv6Drop::BadHeader)?;
    if ip[0] >> 4 != 6 || frame[12..14] != ETH_P_IPV6.to_be_bytes() {
        return Err(Ipv6Drop::BadHeader);
    }
    let plen = u16::from_be_bytes([ip[4], ip[5]]) as usize;
    if plen == 0 {
        return Err(Ipv6Drop::BadHeader);
    }
    let body = frame.get(ETH_HDR + IPV6_HDR..ETH_HDR + IPV6_HDR + plen).ok_or(Ipv6Drop::BadHeader)?;
    let mut next = ip[6];
    let mut off = 0usize;
    let mut fragmented = false;
    for i in 0..=MAX_EXT_HEADERS {
        let len = match next {
            EXT_HOP_BY_HOP if i > 0 => return Err(Ipv6Drop::BadExtensions),
            EXT_HOP_BY_HOP | EXT_DEST_OPTS | EXT_ROUTING => {
                let h = body.get(off..off + 2).ok_or(Ipv6Drop::BadExtensions)?;
                (h[1] as usize + 1) * 8
            }
            EXT_FRAGMENT => {
                fragmented = true;
                8
            }
            EXT_AUTH => {
                let h = body.get(off..off + 2).ok_or(Ipv6Drop::BadExtensions)?;
                (h[1] as usize + 2) * 4
            }
            proto => {
                let src_mac = crate::src_mac(frame);
                return Ok(Packet {
                    src_mac,
                    src: addr(&ip[8..24]),
                    dst: addr(&ip[24..40]),
                    hop_limit: ip[7],
                    proto,
                    fragmented,
                    payload: &body[off..],
                });
            }
        };
        let h = body.get(off..off + len).ok_or(Ipv6Drop::BadExtensions)?;
        // A routing header still to be followed names another final destination: the
        // gateway does not forward source routes, and its checksum would be over that address.
        if next == EXT_ROUTING && h[3] != 0 {
            return Err(Ipv6Drop::BadExtensions);
        }
        next = h[0];
        off += len;
    }
    Err(Ipv6Drop::BadExtensions)
}

/// Whether an ICMPv6 message from `src` to `dst` has a correct checksum.
pub fn icmpv6_checksum_ok(src: &Ipv6Addr, dst: &Ipv6Addr, msg: &[u8]) -> bool {
    msg.len() >= 4 && finish(sum(msg, pseudo_v6(&src.octets(), &dst.octets(), IPPROTO_ICMPV6, msg.len() as u32))) == 0
}

/// The MAC of an IPv6 multicast group (RFC 2464 §7): 33:33 and its last 32 bits.
pub fn multicast_mac(group: &Ipv6Addr) -> Mac {
    let o = group.octets();
    [0x33, 0x33, o[12], o[13], o[14], o[15]]
}

/// The solicited-node multicast group of an address (ff02::1:ffXX:XXXX, RFC 4291 §2.7.1).
pub fn solicited_node(ip: &Ipv6Addr) -> Ipv6Addr {
    let o = ip.octets();
    Ipv6Addr::new(0xff02, 0, 0, 0, 0, 1, 0xff00 | o[13] as u16, u16::from_be_bytes([o[14], o[15]]))
}

/// ff02::1, every node on the link.
pub const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
/// ff02::2, every router on the link (where router solicitations go).
pub const ALL_ROUTERS: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 2);

/// Writes Ethernet + IPv6 headers for an ICMPv6 message of `len` bytes into `out` (cleared
/// first); the caller appends the message, then calls [`finish_icmpv6`].
pub fn start_icmpv6(out: &mut Vec<u8>, src_mac: Mac, dst_mac: Mac, src: &Ipv6Addr, dst: &Ipv6Addr, hop_limit: u8, len: u16) {
    out.clear();
    out.extend_from_slice(&dst_mac);
    out.extend_from_slice(&src_mac);
    out.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
    out.extend_from_slice(&[0x60, 0, 0, 0]);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&[IPPROTO_ICMPV6, hop_limit]);
    out.extend_from_slice(&src.octets());
    out.extend_from_slice(&dst.octets());
}

/// Fills in the IPv6 payload length and the ICMPv6 checksum of a frame begun with
/// [`start_icmpv6`] and its message appended, and pads it to the Ethernet minimum.
pub fn finish_icmpv6(out: &mut Vec<u8>) {
    const L4: usize = ETH_HDR + IPV6_HDR;
    if out.len() < L4 + 4 {
        return;
    }
    let len = out.len() - L4;
    out[ETH_HDR + 4..ETH_HDR + 6].copy_from_slice(&(len as u16).to_be_bytes());
    out[L4 + 2..L4 + 4].copy_from_slice(&[0, 0]);
    let (src, dst) = (addr(&out[ETH_HDR + 8..ETH_HDR + 24]), addr(&out[ETH_HDR + 24..ETH_HDR + 40]));
    let c = finish(sum(&out[L4..], pseudo_v6(&src.octets(), &dst.octets(), IPPROTO_ICMPV6, len as u32)));
    out[L4 + 2..L4 + 4].copy_from_slice(&c.to_be_bytes());
    if out.len() < 60 {
        out.resize(60, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{IpNumber, Ipv6FragmentHeader, Ipv6Header, Ipv6RawExtHeader, PacketBuilder};

    const GUEST: Mac = [0x52, 0x54, 0, 0, 0, 7];
    const GW: Mac = [0x02, 0x76, 0x75, 1, 2, 3];

    fn a(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    fn echo(payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        PacketBuilder::ethernet2(GUEST, GW)
            .ipv6(a("fd00::7").octets(), a("fd00::1").octets(), 64)
            .icmpv6_echo_request(1, 2)
            .write(&mut f, payload)
            .unwrap();
        f
    }

    /// An ICMPv6 echo request behind the given extension headers, built by hand: etherparse's
    /// builder writes no extension headers.
    fn with_exts(exts: &[(u8, Vec<u8>)]) -> Vec<u8> {
        let icmp = &echo(b"ping")[54..];
        let mut body = Vec::new();
        for (i, (_, h)) in exts.iter().enumerate() {
            let mut h = h.clone();
            h[0] = exts.get(i + 1).map_or(IPPROTO_ICMPV6, |e| e.0);
            body.extend_from_slice(&h);
        }
        body.extend_from_slice(icmp);
        let ip = Ipv6Header {
            payload_length: body.len() as u16,
            next_header: IpNumber(exts.first().map_or(IPPROTO_ICMPV6, |e| e.0)),
            hop_limit: 64,
            source: a("fd00::7").octets(),
            destination: a("fd00::1").octets(),
            ..Default::default()
        };
        let mut f = Vec::new();
        f.extend_from_slice(&GW);
        f.extend_from_slice(&GUEST);
        f.extend_from_slice(&[0x86, 0xdd]);
        ip.write(&mut f).unwrap();
        f.extend_from_slice(&body);
        f
    }

    fn raw_ext(len8: usize) -> Vec<u8> {
        let h = Ipv6RawExtHeader::new_raw(IpNumber(0), &vec![0u8; len8 * 8 - 2]).unwrap();
        h.to_bytes().to_vec()
    }

    #[test]
    fn walks_a_plain_packet_and_ignores_padding() {
        let mut f = echo(b"hi");
        f.resize(100, 0xee);
        let p = parse(&f).unwrap();
        assert_eq!((p.src, p.dst, p.proto, p.hop_limit, p.fragmented), (a("fd00::7"), a("fd00::1"), IPPROTO_ICMPV6, 64, false));
        assert_eq!(p.payload.len(), 8 + 2, "padding cut off");
        assert!(icmpv6_checksum_ok(&p.src, &p.dst, p.payload));
        assert_eq!(header(&f), Some(Ok((a("fd00::7"), a("fd00::1")))));
        let mut v4 = f.clone();
        v4[13] = 0;
        assert_eq!(header(&v4), None);
    }

    #[test]
    fn walks_extension_headers_to_the_upper_layer() {
        let f = with_exts(&[(0, raw_ext(1)), (60, raw_ext(2))]);
        let p = parse(&f).unwrap();
        assert_eq!(p.proto, IPPROTO_ICMPV6);
        assert!(!p.fragmented);
        assert!(icmpv6_checksum_ok(&p.src, &p.dst, p.payload));
        assert_eq!(p.payload[0], 128);
    }

    #[test]
    fn sees_fragment_headers_even_atomic_ones() {
        let frag = Ipv6FragmentHeader::new(IpNumber(0), etherparse::IpFragOffset::ZERO, false, 7).to_bytes().to_vec();
        let f = with_exts(&[(44, frag)]);
        let p = parse(&f).unwrap();
        assert!(p.fragmented);
        assert_eq!(p.proto, IPPROTO_ICMPV6);
    }

    #[test]
    fn refuses_broken_chains() {
        // Hop-by-hop anywhere but first.
        assert_eq!(parse(&with_exts(&[(60, raw_ext(1)), (0, raw_ext(1))])), Err(Ipv6Drop::BadExtensions));
        // Longer than the bound.
        let long: Vec<(u8, Vec<u8>)> = (0..MAX_EXT_HEADERS + 1).map(|_| (60, raw_ext(1))).collect();
        assert_eq!(parse(&with_exts(&long)), Err(Ipv6Drop::BadExtensions));
        let ok: Vec<(u8, Vec<u8>)> = (0..MAX_EXT_HEADERS).map(|_| (60, raw_ext(1))).collect();
        assert!(parse(&with_exts(&ok)).is_ok());
        // A routing header with segments left.
        let mut rh = raw_ext(1);
        rh[3] = 1;
        assert_eq!(parse(&with_exts(&[(43, rh.clone())])), Err(Ipv6Drop::BadExtensions));
        rh[3] = 0;
        assert!(parse(&with_exts(&[(43, rh)])).is_ok());
        // An extension header whose length runs past the payload.
        let mut f = with_exts(&[(60, raw_ext(1))]);
        f[54 + 1] = 200;
        assert_eq!(parse(&f), Err(Ipv6Drop::BadExtensions));
    }

    #[test]
    fn refuses_bad_fixed_headers_and_never_panics_on_truncation() {
        let f = echo(b"hello");
        let mut v = f.clone();
        v[14] = 0x40;
        assert_eq!(parse(&v), Err(Ipv6Drop::BadHeader));
        let mut long = f.clone();
        long[18..20].copy_from_slice(&100u16.to_be_bytes());
        assert_eq!(parse(&long), Err(Ipv6Drop::BadHeader), "payload length past the frame");
        let mut zero = f.clone();
        zero[18..20].copy_from_slice(&[0, 0]);
        assert_eq!(parse(&zero), Err(Ipv6Drop::BadHeader), "jumbogram");
        let g = with_exts(&[(0, raw_ext(1)), (44, raw_ext(1)), (60, raw_ext(3))]);
        for cut in 0..g.len() {
            let _ = parse(&g[..cut]);
            let _ = header(&g[..cut]);
        }
    }

    #[test]
    fn multicast_helpers() {
        let ip = a("fd00:7675:1::1234:5678");
        assert_eq!(solicited_node(&ip), a("ff02::1:ff34:5678"));
        assert_eq!(multicast_mac(&solicited_node(&ip)), [0x33, 0x33, 0xff, 0x34, 0x56, 0x78]);
        assert_eq!(multicast_mac(&ALL_NODES), [0x33, 0x33, 0, 0, 0, 1]);
    }

    #[test]
    fn built_frames_carry_a_valid_checksum() {
        let mut out = Vec::new();
        start_icmpv6(&mut out, GW, GUEST, &a("fe80::1"), &a("fe80::7"), 255, 0);
        out.extend_from_slice(&[129, 0, 0, 0, 0, 1, 0, 2, b'x']);
        finish_icmpv6(&mut out);
        let p = etherparse::SlicedPacket::from_ethernet(&out).unwrap();
        let Some(etherparse::TransportSlice::Icmpv6(icmp)) = p.transport else { panic!("not ICMPv6") };
        assert_eq!(icmp.icmp_type(), etherparse::Icmpv6Type::EchoReply(etherparse::IcmpEchoHeader { id: 1, seq: 2 }));
        assert_eq!(icmp.payload(), b"x");
        let Some(etherparse::NetSlice::Ipv6(ip)) = p.net else { panic!() };
        assert_eq!(ip.header().hop_limit(), 255);
        assert!(icmpv6_checksum_ok(&a("fe80::1"), &a("fe80::7"), icmp.slice()));
    }
}
