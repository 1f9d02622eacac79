//! UDP over IPv6 in an Ethernet frame, for DHCPv6: parsed with every length and the UDP
//! checksum checked (IPv6 makes it mandatory), and built with it.

use std::net::Ipv6Addr;

use crate::Mac;

const ETH_HDR: usize = 14;
const IP6_HDR: usize = 40;
const UDP_HDR: usize = 8;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const NEXT_UDP: u8 = 17;

/// A UDP datagram over IPv6, borrowed from its frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Udp6<'a> {
    pub src_mac: Mac,
    pub dst_mac: Mac,
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub src_port: u16,
    pub dst_port: u16,
    pub payload: &'a [u8],
}

/// Why a frame that looked like UDP over IPv6 was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Udp6Error {
    /// Not IPv6 carrying UDP directly (other protocols, extension headers): not ours.
    NotUdp,
    /// IPv6 UDP whose lengths disagree with the frame or whose checksum is wrong.
    Malformed,
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([b[i], b[i + 1]])
}

/// The UDP checksum over the IPv6 pseudo-header and `udp` (header and payload, with the
/// checksum field as it is): 0 when a received datagram's checksum is right.
fn checksum(src: &Ipv6Addr, dst: &Ipv6Addr, udp: &[u8]) -> u16 {
    let mut sum: u64 = 0;
    for a in [src.octets(), dst.octets()] {
        for c in a.chunks_exact(2) {
            sum += u16::from_be_bytes([c[0], c[1]]) as u64;
        }
    }
    sum += udp.len() as u64 + NEXT_UDP as u64;
    let mut chunks = udp.chunks_exact(2);
    for c in &mut chunks {
        sum += u16::from_be_bytes([c[0], c[1]]) as u64;
    }
    if let [last] = chunks.remainder() {
        sum += (*last as u64) << 8;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Parses an Ethernet frame as UDP over IPv6 (no VLAN tag, no extension headers: DHCPv6
/// clients send neither). Ethernet padding after the IPv6 payload is allowed.
pub fn parse_udp6(frame: &[u8]) -> Result<Udp6<'_>, Udp6Error> {
    if frame.len() < ETH_HDR + IP6_HDR || u16_at(frame, 12) != ETHERTYPE_IPV6 {
        return Err(Udp6Error::NotUdp);
    }
    let ip = &frame[ETH_HDR..];
    if ip[0] >> 4 != 6 || ip[6] != NEXT_UDP {
        return Err(Udp6Error::NotUdp);
    }
    let plen = u16_at(ip, 4) as usize;
    if plen < UDP_HDR || IP6_HDR + plen > ip.len() {
        return Err(Udp6Error::Malformed);
    }
    let udp = &ip[IP6_HDR..IP6_HDR + plen];
    if u16_at(udp, 4) as usize != plen {
        return Err(Udp6Error::Malformed);
    }
    let mut a = [0u8; 16];
    a.copy_from_slice(&ip[8..24]);
    let src = Ipv6Addr::from(a);
    a.copy_from_slice(&ip[24..40]);
    let dst = Ipv6Addr::from(a);
    // A zero checksum is not allowed over IPv6 (RFC 8200 §8.1).
    if u16_at(udp, 6) == 0 || checksum(&src, &dst, udp) != 0 {
        return Err(Udp6Error::Malformed);
    }
    let mut dst_mac = [0u8; 6];
    let mut src_mac = [0u8; 6];
    dst_mac.copy_from_slice(&frame[0..6]);
    src_mac.copy_from_slice(&frame[6..12]);
    Ok(Udp6 { src_mac, dst_mac, src, dst, src_port: u16_at(udp, 0), dst_port: u16_at(udp, 2), payload: &udp[UDP_HDR..] })
}

/// Writes an Ethernet frame carrying `payload` in UDP over IPv6 into `out` (cleared first);
/// false, with nothing written, if the payload does not fit one datagram.
#[allow(clippy::too_many_arguments)]
pub fn build_udp6(
    out: &mut Vec<u8>,
    src_mac: Mac,
    dst_mac: Mac,
    src: Ipv6Addr,
    dst: Ipv6Addr,
    src_port: u16,
    dst_port: u16,
    payload: &[u8],
) -> bool {
    out.clear();
    let ulen = UDP_HDR + payload.len();
    let Ok(ulen16) = u16::try_from(ulen) else { return false };
    out.extend_from_slice(&dst_mac);
    out.extend_from_slice(&src_mac);
    out.extend_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
    out.extend_from_slice(&[0x60, 0, 0, 0]);
    out.extend_from_slice(&ulen16.to_be_bytes());
    // Hop limit 255, as for on-link messages that must not have been forwarded.
    out.extend_from_slice(&[NEXT_UDP, 255]);
    out.extend_from_slice(&src.octets());
    out.extend_from_slice(&dst.octets());
    let u = out.len();
    out.extend_from_slice(&src_port.to_be_bytes());
    out.extend_from_slice(&dst_port.to_be_bytes());
    out.extend_from_slice(&ulen16.to_be_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(payload);
    let c = match checksum(&src, &dst, &out[u..]) {
        0 => 0xffff,
        c => c,
    };
    out[u + 6..u + 8].copy_from_slice(&c.to_be_bytes());
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_built_datagram_parses_back_and_any_flipped_bit_is_refused() {
        let (a, b): (Ipv6Addr, Ipv6Addr) = ("fe80::1".parse().unwrap(), "ff02::1:2".parse().unwrap());
        let mut f = Vec::new();
        assert!(build_udp6(&mut f, [2, 0, 0, 0, 0, 1], [0x33, 0x33, 0, 1, 0, 2], a, b, 546, 547, b"hello"));
        let u = parse_udp6(&f).unwrap();
        assert_eq!((u.src, u.dst, u.src_port, u.dst_port, u.payload), (a, b, 546, 547, &b"hello"[..]));
        assert_eq!(u.src_mac, [2, 0, 0, 0, 0, 1]);
        // Ethernet padding is fine.
        let mut padded = f.clone();
        padded.extend_from_slice(&[0; 10]);
        assert_eq!(parse_udp6(&padded).unwrap().payload, b"hello");
        // Any change in the addresses, ports or payload breaks the checksum.
        for i in 22..f.len() {
            let mut bad = f.clone();
            bad[i] ^= 0x10;
            assert!(parse_udp6(&bad).is_err(), "byte {i}");
        }
        assert_eq!(parse_udp6(&f[..f.len() - 1]), Err(Udp6Error::Malformed));
        let mut zero = f.clone();
        zero[60..62].copy_from_slice(&[0, 0]);
        assert_eq!(parse_udp6(&zero), Err(Udp6Error::Malformed));
        let mut tcp = f.clone();
        tcp[20] = 6;
        assert_eq!(parse_udp6(&tcp), Err(Udp6Error::NotUdp));
        assert_eq!(parse_udp6(&f[..30]), Err(Udp6Error::NotUdp));
    }
}
