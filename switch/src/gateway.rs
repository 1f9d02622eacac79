//! The network's own endpoint at its gateway address: it answers ARP requests for that
//! address and ICMP echo requests to it, with its own MAC. Pure: a frame in, maybe a reply
//! frame out.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::checksum::checksum;
use crate::proto::{ETH_P_ARP, ETH_P_IPV4, IPPROTO_ICMP, IPPROTO_UDP};
use crate::Mac;

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;

/// The gateway endpoint of one network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gateway {
    pub mac: Mac,
    pub ip: Ipv4Addr,
    pub prefix: u8,
}

/// The gateway's IPv6 side (`gateway6`): its global (or unique-local) address and on-link
/// prefix, and the link-local address it speaks ND and router advertisements from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gateway6 {
    pub mac: Mac,
    pub ip: Ipv6Addr,
    pub prefix: u8,
    pub link_local: Ipv6Addr,
}

impl Gateway6 {
    pub fn new(mac: Mac, ip: Ipv6Addr, prefix: u8) -> Gateway6 {
        Gateway6 { mac, ip, prefix, link_local: link_local(&mac) }
    }

    /// Whether `ip` is one of the gateway's own IPv6 addresses.
    pub fn is_mine(&self, ip: &Ipv6Addr) -> bool {
        *ip == self.ip || *ip == self.link_local
    }

    /// Whether `ip` is inside the on-link prefix.
    pub fn on_link(&self, ip: &Ipv6Addr) -> bool {
        let mask = if self.prefix == 0 { 0 } else { u128::MAX << (128 - self.prefix as u32) };
        u128::from(*ip) & mask == u128::from(self.ip) & mask
    }
}

/// The modified EUI-64 interface identifier of a MAC (RFC 4291 appendix A): what a Linux
/// guest's SLAAC address and link-local address end with unless it uses privacy or stable
/// addresses.
pub fn eui64(mac: &Mac) -> [u8; 8] {
    [mac[0] ^ 0x02, mac[1], mac[2], 0xff, 0xfe, mac[3], mac[4], mac[5]]
}

/// fe80::/64 with the MAC's EUI-64 identifier.
pub fn link_local(mac: &Mac) -> Ipv6Addr {
    slaac(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), mac)
}

/// The address SLAAC forms from a /64 prefix and a MAC (EUI-64).
pub fn slaac(prefix: Ipv6Addr, mac: &Mac) -> Ipv6Addr {
    let mut o = prefix.octets();
    o[8..].copy_from_slice(&eui64(mac));
    Ipv6Addr::from(o)
}

/// A locally administered MAC derived from the network name, stable across restarts so
/// guests' ARP caches stay valid.
pub fn gateway_mac(network: &str) -> Mac {
    // FNV-1a: any stable spread will do.
    let h = network.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    let b = h.to_be_bytes();
    [0x02, 0x76, 0x75, b[0], b[1], b[2]]
}

impl Gateway {
    /// Whether a frame with this destination MAC concerns the gateway (its own MAC, or
    /// broadcast, where ARP requests arrive). With `gateway6`, IPv6 multicast too
    /// ([`is_ipv6_multicast`]): neighbour and router solicitations and DHCPv6 arrive there.
    pub fn wants(&self, dst: &Mac) -> bool {
        *dst == self.mac || *dst == [0xff; 6]
    }

    /// Handles one frame seen by the gateway. If it calls for an answer, the answer frame is
    /// written to `out` (cleared first) and `true` is returned.
    pub fn handle(&self, frame: &[u8], out: &mut Vec<u8>) -> bool {
        out.clear();
        if frame.len() < 14 {
            return false;
        }
        match u16::from_be_bytes([frame[12], frame[13]]) {
            ETH_P_ARP => self.arp(frame, out),
            ETH_P_IPV4 if frame[0..6] == self.mac => self.icmp_echo(frame, out),
            _ => false,
        }
    }

    /// ARP request (Ethernet/IPv4) for the gateway address → ARP reply.
    fn arp(&self, frame: &[u8], out: &mut Vec<u8>) -> bool {
        let Some(a) = frame.get(14..14 + 28) else {
            return false;
        };
        let is_eth_ipv4 = a[0..2] == [0, 1] && a[2..4] == [0x08, 0x00] && a[4] == 6 && a[5] == 4;
        let is_request = a[6..8] == [0, 1];
        if !is_eth_ipv4 || !is_request || a[24..28] != self.ip.octets() {
            return false;
        }
        let (sha, spa) = (&a[8..14], &a[14..18]);
        if sha[0] & 1 == 1 {
            return false; // A multicast sender hardware address is not someone to answer.
        }
        out.extend_from_slice(sha);
        out.extend_from_slice(&self.mac);
        out.extend_from_slice(&ETH_P_ARP.to_be_bytes());
        out.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 2]);
        out.extend_from_slice(&self.mac);
        out.extend_from_slice(&self.ip.octets());
        out.extend_from_slice(sha);
        out.extend_from_slice(spa);
        out.resize(60, 0); // Minimum Ethernet frame, padded.
        true
    }

    /// ICMP echo request to the gateway address → echo reply with the same identifier,
    /// sequence number and data.
    fn icmp_echo(&self, frame: &[u8], out: &mut Vec<u8>) -> bool {
        let ip = &frame[14..];
        if ip.len() < 20 || ip[0] >> 4 != 4 {
            return false;
        }
        let ihl = (ip[0] & 0xf) as usize * 4;
        let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
        if ihl < 20 || total < ihl + 8 || total > ip.len() || checksum(&ip[..ihl]) != 0 {
            return false;
        }
        let fragmented = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0;
        if fragmented || ip[9] != IPPROTO_ICMP || ip[16..20] != self.ip.octets() {
            return false;
        }
        let icmp = &ip[ihl..total];
        if icmp[0] != ICMP_ECHO_REQUEST || icmp[1] != 0 || checksum(icmp) != 0 {
            return false;
        }
        // Ethernet: back to the sender.
        out.extend_from_slice(&frame[6..12]);
        out.extend_from_slice(&self.mac);
        out.extend_from_slice(&ETH_P_IPV4.to_be_bytes());
        // IPv4 without options: from the gateway to the sender.
        let l3 = out.len();
        let reply_total = (20 + icmp.len()) as u16;
        out.extend_from_slice(&[0x45, 0]);
        out.extend_from_slice(&reply_total.to_be_bytes());
        out.extend_from_slice(&[ip[4], ip[5], 0x40, 0, 64, IPPROTO_ICMP, 0, 0]);
        out.extend_from_slice(&self.ip.octets());
        out.extend_from_slice(&ip[12..16]);
        let c = checksum(&out[l3..l3 + 20]);
        out[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
        // ICMP: echo reply, same id/seq/data.
        let l4 = out.len();
        out.extend_from_slice(icmp);
        out[l4] = ICMP_ECHO_REPLY;
        out[l4 + 2..l4 + 4].copy_from_slice(&[0, 0]);
        let c = checksum(&out[l4..]);
        out[l4 + 2..l4 + 4].copy_from_slice(&c.to_be_bytes());
        if out.len() < 60 {
            out.resize(60, 0);
        }
        true
    }
}

/// If `frame` is an unfragmented IPv4 UDP datagram to `port` with valid IP and UDP
/// checksums, returns its source address and payload.
pub fn udp_payload(frame: &[u8], port: u16) -> Option<(Ipv4Addr, &[u8])> {
    udp_datagram(frame, port).map(|(src, _, payload)| (src, payload))
}

/// Like [`udp_payload`], with the source port too.
pub fn udp_datagram(frame: &[u8], port: u16) -> Option<(Ipv4Addr, u16, &[u8])> {
    if frame.len() < 14 + 20 + 8 || u16::from_be_bytes([frame[12], frame[13]]) != ETH_P_IPV4 {
        return None;
    }
    let ip = &frame[14..];
    let ihl = (ip[0] & 0xf) as usize * 4;
    let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    if ip[0] >> 4 != 4 || ihl < 20 || total < ihl + 8 || total > ip.len() || checksum(&ip[..ihl]) != 0 {
        return None;
    }
    if u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 || ip[9] != IPPROTO_UDP {
        return None;
    }
    let udp = &ip[ihl..total];
    let ulen = u16::from_be_bytes([udp[4], udp[5]]) as usize;
    if u16::from_be_bytes([udp[2], udp[3]]) != port || ulen < 8 || ulen > udp.len() {
        return None;
    }
    let src: [u8; 4] = ip[12..16].try_into().ok()?;
    let dst: [u8; 4] = ip[16..20].try_into().ok()?;
    if udp[6..8] != [0, 0] {
        let pseudo = crate::checksum::pseudo_v4(&src, &dst, IPPROTO_UDP, ulen as u16);
        if crate::checksum::finish(crate::checksum::sum(&udp[..ulen], pseudo)) != 0 {
            return None;
        }
    }
    Some((Ipv4Addr::from(src), u16::from_be_bytes([udp[0], udp[1]]), &udp[8..ulen]))
}

/// The largest payload one IPv4 UDP datagram carries (a 16-bit total length).
pub const MAX_UDP_PAYLOAD: usize = 65535 - 20 - 8;

/// Builds an Ethernet + IPv4 + UDP frame (checksums included) into `out`. Returns false,
/// with `out` empty, if the payload is longer than one datagram holds.
#[allow(clippy::too_many_arguments)]
pub fn build_udp(
    out: &mut Vec<u8>,
    src_mac: Mac,
    dst_mac: Mac,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> bool {
    out.clear();
    let Some(total) = u16::try_from(payload.len() + 28).ok() else { return false };
    let udp_len = total - 20;
    out.extend_from_slice(&dst_mac);
    out.extend_from_slice(&src_mac);
    out.extend_from_slice(&ETH_P_IPV4.to_be_bytes());
    let l3 = out.len();
    out.extend_from_slice(&[0x45, 0]);
    out.extend_from_slice(&total.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0x40, 0, 64, IPPROTO_UDP, 0, 0]);
    out.extend_from_slice(&src.octets());
    out.extend_from_slice(&dst.octets());
    let c = checksum(&out[l3..l3 + 20]);
    out[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
    let l4 = out.len();
    out.extend_from_slice(&sport.to_be_bytes());
    out.extend_from_slice(&dport.to_be_bytes());
    out.extend_from_slice(&udp_len.to_be_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(payload);
    let pseudo = crate::checksum::pseudo_v4(&src.octets(), &dst.octets(), IPPROTO_UDP, udp_len);
    let mut c = crate::checksum::finish(crate::checksum::sum(&out[l4..], pseudo));
    if c == 0 {
        c = 0xffff;
    }
    out[l4 + 6..l4 + 8].copy_from_slice(&c.to_be_bytes());
    if out.len() < 60 {
        out.resize(60, 0);
    }
    true
}

/// 33:33:xx:xx:xx:xx, the MACs of IPv6 multicast groups.
pub fn is_ipv6_multicast(mac: &Mac) -> bool {
    mac[0] == 0x33 && mac[1] == 0x33
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{Icmpv4Type, PacketBuilder, SlicedPacket, TransportSlice};

    const GUEST: Mac = [0x52, 0x54, 0, 0, 0, 7];

    fn gw() -> Gateway {
        Gateway { mac: gateway_mac("default"), ip: Ipv4Addr::new(192, 168, 122, 1), prefix: 24 }
    }

    #[test]
    fn eui64_addresses_are_what_a_linux_guest_forms() {
        // 52:54:00:12:34:56 → fe80::5054:ff:fe12:3456, as `ip -6 addr` shows in a QEMU guest.
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        assert_eq!(link_local(&mac), "fe80::5054:ff:fe12:3456".parse::<Ipv6Addr>().unwrap());
        assert_eq!(slaac("fd00:7675:1::".parse().unwrap(), &mac), "fd00:7675:1:0:5054:ff:fe12:3456".parse::<Ipv6Addr>().unwrap());
        let g = Gateway6::new(gateway_mac("default"), "fd00:7675:1::1".parse().unwrap(), 64);
        assert!(g.is_mine(&g.link_local) && g.is_mine(&"fd00:7675:1::1".parse().unwrap()));
        assert!(g.on_link(&"fd00:7675:1::99".parse().unwrap()) && !g.on_link(&"fd00:7675:2::1".parse().unwrap()));
        assert!(is_ipv6_multicast(&[0x33, 0x33, 0, 0, 0, 1]) && !is_ipv6_multicast(&[0xff; 6]));
    }

    fn arp_request(target: [u8; 4]) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&GUEST);
        f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
        f.extend_from_slice(&GUEST);
        f.extend_from_slice(&[192, 168, 122, 7]);
        f.extend_from_slice(&[0; 6]);
        f.extend_from_slice(&target);
        f.resize(60, 0);
        f
    }

    fn echo_request(dst_mac: Mac, dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        PacketBuilder::ethernet2(GUEST, dst_mac)
            .ipv4([192, 168, 122, 7], dst, 64)
            .icmpv4_echo_request(0x1234, 7)
            .write(&mut f, payload)
            .unwrap();
        f
    }

    #[test]
    fn gateway_mac_is_stable_local_unicast_and_per_network() {
        let m = gateway_mac("default");
        assert_eq!(m, gateway_mac("default"));
        assert_ne!(m, gateway_mac("lab"));
        assert_eq!(m[0] & 0b11, 0b10, "locally administered unicast");
    }

    #[test]
    fn answers_arp_for_its_address_only() {
        let g = gw();
        let mut out = Vec::new();
        assert!(g.handle(&arp_request([192, 168, 122, 1]), &mut out));
        assert_eq!(out.len(), 60);
        assert_eq!(&out[0..6], &GUEST);
        assert_eq!(&out[6..12], &g.mac);
        assert_eq!(&out[12..14], &[0x08, 0x06]);
        assert_eq!(&out[20..22], &[0, 2], "ARP reply");
        assert_eq!(&out[22..28], &g.mac, "sender hardware address");
        assert_eq!(&out[28..32], &[192, 168, 122, 1]);
        assert_eq!(&out[32..38], &GUEST);
        assert_eq!(&out[38..42], &[192, 168, 122, 7]);
        assert!(!g.handle(&arp_request([192, 168, 122, 2]), &mut out));
        let mut reply = arp_request([192, 168, 122, 1]);
        reply[21] = 2;
        assert!(!g.handle(&reply, &mut out), "replies are not answered");
    }

    #[test]
    fn answers_ping_with_a_valid_echo_reply() {
        let g = gw();
        let payload: Vec<u8> = (0..56).collect();
        let mut out = Vec::new();
        assert!(g.handle(&echo_request(g.mac, [192, 168, 122, 1], &payload), &mut out));
        let p = SlicedPacket::from_ethernet(&out).unwrap();
        let Some(etherparse::NetSlice::Ipv4(ip)) = &p.net else { panic!("not IPv4") };
        assert_eq!(ip.header().source(), [192, 168, 122, 1]);
        assert_eq!(ip.header().destination(), [192, 168, 122, 7]);
        assert_eq!(checksum(ip.header().slice()), 0);
        let Some(TransportSlice::Icmpv4(icmp)) = p.transport else { panic!("not ICMP") };
        assert_eq!(icmp.icmp_type(), Icmpv4Type::EchoReply(etherparse::IcmpEchoHeader { id: 0x1234, seq: 7 }));
        assert_eq!(icmp.payload(), &payload[..]);
        assert_eq!(checksum(icmp.slice()), 0);
        assert_eq!(&out[0..6], &GUEST);
    }

    #[test]
    fn ignores_what_is_not_an_echo_to_it() {
        let g = gw();
        let mut out = Vec::new();
        assert!(!g.handle(&echo_request(g.mac, [192, 168, 122, 9], b"x"), &mut out), "other address");
        assert!(!g.handle(&echo_request([0x52, 0, 0, 0, 0, 1], [192, 168, 122, 1], b"x"), &mut out), "other MAC");
        let mut bad = echo_request(g.mac, [192, 168, 122, 1], b"hello");
        bad[24] ^= 0xff;
        assert!(!g.handle(&bad, &mut out), "bad IP checksum");
        let mut frag = echo_request(g.mac, [192, 168, 122, 1], b"hello");
        frag[20] = 0x20;
        assert!(!g.handle(&frag, &mut out), "fragment");
    }

    #[test]
    fn a_udp_payload_over_one_datagram_is_refused_not_wrapped() {
        let (a, b) = (Ipv4Addr::new(192, 168, 122, 1), Ipv4Addr::new(192, 168, 122, 7));
        let mut f = Vec::new();
        let payload = vec![7u8; MAX_UDP_PAYLOAD + 1];
        assert!(!build_udp(&mut f, GUEST, GUEST, a, b, 53, 40000, &payload));
        assert!(f.is_empty());
        assert!(build_udp(&mut f, GUEST, GUEST, a, b, 53, 40000, &payload[1..]));
        assert_eq!(u16::from_be_bytes([f[16], f[17]]), 65535);
        assert_eq!(udp_payload(&f, 40000).map(|(_, p)| p.len()), Some(MAX_UDP_PAYLOAD));
    }

    #[test]
    fn udp_round_trip_and_refusals() {
        let mut f = Vec::new();
        let (a, b) = (Ipv4Addr::new(0, 0, 0, 0), Ipv4Addr::BROADCAST);
        assert!(build_udp(&mut f, GUEST, [0xff; 6], a, b, 68, 67, b"dhcp payload"));
        assert_eq!(udp_payload(&f, 67), Some((a, &b"dhcp payload"[..])));
        assert_eq!(udp_payload(&f, 53), None);
        // Checked by etherparse too.
        let p = SlicedPacket::from_ethernet(&f).unwrap();
        let Some(TransportSlice::Udp(u)) = p.transport else { panic!() };
        assert_eq!(u.payload(), b"dhcp payload");
        let mut bad = f.clone();
        bad[14 + 20 + 8] ^= 1;
        assert_eq!(udp_payload(&bad, 67), None, "UDP checksum");
        let mut nock = f.clone();
        nock[14 + 20 + 8] ^= 1;
        nock[14 + 20 + 6] = 0;
        nock[14 + 20 + 7] = 0;
        assert!(udp_payload(&nock, 67).is_some(), "no UDP checksum is allowed");
        for cut in 0..f.len() {
            let _ = udp_payload(&f[..cut], 67);
        }
    }

    #[test]
    fn truncated_and_garbage_frames_never_panic() {
        let g = gw();
        let mut out = Vec::new();
        let frames = [arp_request([192, 168, 122, 1]), echo_request(g.mac, [192, 168, 122, 1], &[7; 100])];
        for f in &frames {
            for cut in 0..f.len() {
                g.handle(&f[..cut], &mut out);
            }
            let mut x = f.clone();
            for i in 14..x.len() {
                x[i] = x[i].wrapping_mul(31).wrapping_add(i as u8);
                g.handle(&x, &mut out);
            }
        }
        // IP total length larger than the frame, IHL too small or too large.
        let mut f = echo_request(g.mac, [192, 168, 122, 1], b"abc");
        f[16] = 0xff;
        assert!(!g.handle(&f, &mut out));
        let mut f = echo_request(g.mac, [192, 168, 122, 1], b"abc");
        f[14] = 0x41;
        assert!(!g.handle(&f, &mut out));
        f[14] = 0x4f;
        assert!(!g.handle(&f, &mut out));
    }
}
