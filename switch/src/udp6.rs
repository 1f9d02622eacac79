//! UDP over IPv6 for the gateway's own services (DNS on `gateway6`): reading a datagram a
//! guest sent, and building one back. Only packets without extension headers are read: a
//! guest's resolver sends none.

use std::net::Ipv6Addr;

use crate::checksum::{finish, pseudo_v6, sum};
use crate::proto::{ETH_P_IPV6, IPPROTO_UDP};
use crate::Mac;

/// A UDP datagram read from an IPv6 frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Udp6<'a> {
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub sport: u16,
    pub payload: &'a [u8],
}

/// If `frame` is an IPv6 UDP datagram (no extension headers) to port `port` with a valid
/// checksum (IPv6 requires one), returns it.
pub fn udp6_datagram(frame: &[u8], port: u16) -> Option<Udp6<'_>> {
    if frame.len() < 14 + 40 + 8 || u16::from_be_bytes([frame[12], frame[13]]) != ETH_P_IPV6 {
        return None;
    }
    let ip = &frame[14..];
    let plen = u16::from_be_bytes([ip[4], ip[5]]) as usize;
    if ip[0] >> 4 != 6 || ip[6] != IPPROTO_UDP || plen < 8 || 40 + plen > ip.len() {
        return None;
    }
    let udp = &ip[40..40 + plen];
    let ulen = u16::from_be_bytes([udp[4], udp[5]]) as usize;
    if u16::from_be_bytes([udp[2], udp[3]]) != port || ulen < 8 || ulen > udp.len() || udp[6..8] == [0, 0] {
        return None;
    }
    let src: [u8; 16] = ip[8..24].try_into().ok()?;
    let dst: [u8; 16] = ip[24..40].try_into().ok()?;
    if finish(sum(&udp[..ulen], pseudo_v6(&src, &dst, IPPROTO_UDP, ulen as u32))) != 0 {
        return None;
    }
    Some(Udp6 { src: src.into(), dst: dst.into(), sport: u16::from_be_bytes([udp[0], udp[1]]), payload: &udp[8..ulen] })
}

/// The largest payload one IPv6 UDP datagram carries (no jumbograms).
pub const MAX_UDP6_PAYLOAD: usize = 65535 - 8;

/// Builds an Ethernet + IPv6 + UDP frame (checksum included) into `out`. Returns false, with
/// `out` empty, if the payload is longer than one datagram holds.
#[allow(clippy::too_many_arguments)]
pub fn build_udp6(
    out: &mut Vec<u8>,
    src_mac: Mac,
    dst_mac: Mac,
    src: Ipv6Addr,
    dst: Ipv6Addr,
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> bool {
    out.clear();
    let Some(udp_len) = u16::try_from(payload.len() + 8).ok() else { return false };
    out.extend_from_slice(&dst_mac);
    out.extend_from_slice(&src_mac);
    out.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
    out.extend_from_slice(&[0x60, 0, 0, 0]);
    out.extend_from_slice(&udp_len.to_be_bytes());
    out.extend_from_slice(&[IPPROTO_UDP, 64]);
    out.extend_from_slice(&src.octets());
    out.extend_from_slice(&dst.octets());
    let l4 = out.len();
    out.extend_from_slice(&sport.to_be_bytes());
    out.extend_from_slice(&dport.to_be_bytes());
    out.extend_from_slice(&udp_len.to_be_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(payload);
    let mut c = finish(sum(&out[l4..], pseudo_v6(&src.octets(), &dst.octets(), IPPROTO_UDP, udp_len as u32)));
    if c == 0 {
        c = 0xffff;
    }
    out[l4 + 6..l4 + 8].copy_from_slice(&c.to_be_bytes());
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};

    const A: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x20);
    const B: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);

    #[test]
    fn reads_what_etherparse_writes_and_writes_what_it_reads() {
        let mut f = Vec::new();
        PacketBuilder::ethernet2([2; 6], [4; 6]).ipv6(A.octets(), B.octets(), 64).udp(4444, 53).write(&mut f, b"query").unwrap();
        let d = udp6_datagram(&f, 53).unwrap();
        assert_eq!((d.src, d.dst, d.sport, d.payload), (A, B, 4444, &b"query"[..]));
        assert_eq!(udp6_datagram(&f, 54), None, "another port");
        let mut bad = f.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert_eq!(udp6_datagram(&bad, 53), None, "bad checksum");
        for cut in 0..f.len() {
            assert_eq!(udp6_datagram(&f[..cut], 53), None);
        }
        let mut out = Vec::new();
        assert!(build_udp6(&mut out, [4; 6], [2; 6], B, A, 53, 4444, b"answer"));
        {
            let p = SlicedPacket::from_ethernet(&out).unwrap();
            let Some(TransportSlice::Udp(u)) = p.transport else { panic!("not UDP") };
            assert_eq!((u.source_port(), u.destination_port(), u.payload()), (53, 4444, &b"answer"[..]));
        }
        assert_eq!(udp6_datagram(&out, 4444).map(|d| d.payload), Some(&b"answer"[..]), "its checksum is right");
        assert!(!build_udp6(&mut out, [4; 6], [2; 6], B, A, 53, 4444, &vec![0; MAX_UDP6_PAYLOAD + 1]));
        assert!(out.is_empty());
    }
}
