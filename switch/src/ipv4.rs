//! IPv4 packets as the router sees them: a defensive parse of the header and of the ports (or
//! ICMP identifier) that NAT and the firewall key on, in-place rewrites with incremental
//! checksum updates (RFC 1624), and the ICMP errors a router sends. Pure, over byte slices.

use std::net::Ipv4Addr;

use crate::checksum::{checksum, finish, sum};
use crate::proto::{ETH_P_IPV4, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP};
use crate::{DropReason, Mac};

pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_ECHO_REQUEST: u8 = 8;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
/// Codes of ICMP destination unreachable.
pub const UNREACH_NET: u8 = 0;
pub const UNREACH_HOST: u8 = 1;
pub const UNREACH_PORT: u8 = 3;
pub const UNREACH_ADMIN: u8 = 13;

/// The fields of an IPv4 header the router needs, with `l4` the offset of the transport header
/// within the packet. Only built by [`parse`], which checked every offset it gives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Header {
    pub ihl: usize,
    /// Total length from the header (the packet slice may be longer: Ethernet padding).
    pub total: usize,
    pub ttl: u8,
    pub proto: u8,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    /// More-fragments set or a fragment offset: the transport header may be absent.
    pub fragment: bool,
    /// A non-first fragment: no transport header at all.
    pub later_fragment: bool,
}

/// Parses the IPv4 header at the start of `ip`. `gso` relaxes the total-length check for a
/// TSO frame from a guest, whose length field may be zero or stale (the kernel fixes it per
/// segment). The header checksum is checked unless `gso`.
pub fn parse(ip: &[u8], gso: bool) -> Result<Ipv4Header, DropReason> {
    if ip.len() < 20 || ip[0] >> 4 != 4 {
        return Err(DropReason::BadIpHeader);
    }
    let ihl = (ip[0] & 0xf) as usize * 4;
    let mut total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    if gso {
        total = ip.len();
    }
    if ihl < 20 || total < ihl || total > ip.len() || (!gso && checksum(&ip[..ihl]) != 0) {
        return Err(DropReason::BadIpHeader);
    }
    let frag = u16::from_be_bytes([ip[6], ip[7]]);
    Ok(Ipv4Header {
        ihl,
        total,
        ttl: ip[8],
        proto: ip[9],
        src: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        dst: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
        fragment: frag & 0x3fff != 0,
        later_fragment: frag & 0x1fff != 0,
    })
}

/// The transport ports of a TCP or UDP packet, or the identifier of an ICMP echo (as both
/// ports, the way NAT keys it). None when the transport header is missing or truncated.
pub fn ports(ip: &[u8], h: &Ipv4Header) -> Option<(u16, u16)> {
    if h.later_fragment {
        return None;
    }
    let l4 = ip.get(h.ihl..h.total)?;
    match h.proto {
        IPPROTO_TCP if l4.len() >= 20 => Some((be16(l4, 0), be16(l4, 2))),
        IPPROTO_UDP if l4.len() >= 8 => Some((be16(l4, 0), be16(l4, 2))),
        IPPROTO_ICMP if l4.len() >= 8 && matches!(l4[0], ICMP_ECHO_REQUEST | ICMP_ECHO_REPLY) => Some((be16(l4, 4), be16(l4, 4))),
        _ => None,
    }
}

pub fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// Folds a running sum to 16 bits without complementing it.
fn fold(s: u64) -> u16 {
    !finish(s)
}

/// RFC 1624 incremental update of a checksum field after 16-bit words `old` became `new`.
/// `partial`: the field holds a non-complemented pseudo-header sum that the receiver (or the
/// NIC) completes later (a virtio-net NEEDS_CSUM frame), rather than a finished checksum.
pub fn adjust(field: u16, old: &[u8], new: &[u8], partial: bool) -> u16 {
    let s = if partial { field } else { !field } as u64;
    let removed: u64 = old.chunks(2).map(|w| (!u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)])) as u64).sum();
    let s = fold(sum(new, s + removed));
    if partial {
        s
    } else {
        !s
    }
}

/// Where the transport checksum of a packet lives, if it has one to keep right.
fn l4_checksum_at(h: &Ipv4Header, l4: &[u8]) -> Option<usize> {
    match h.proto {
        IPPROTO_TCP if l4.len() >= 18 => Some(16),
        // UDP checksum 0: the sender sent none; it stays none.
        IPPROTO_UDP if l4.len() >= 8 && l4[6..8] != [0, 0] => Some(6),
        IPPROTO_ICMP if l4.len() >= 4 => Some(2),
        _ => None,
    }
}

/// Rewrites the source (`src = true`) or destination address and port of an IPv4 packet in
/// place, keeping the IP and transport checksums right. `partial`: the transport checksum
/// is a NEEDS_CSUM pseudo-header sum (addresses count, ports do not). For ICMP echo the
/// "port" is the identifier, on both sides.
pub fn rewrite(ip: &mut [u8], h: &Ipv4Header, src: bool, addr: Ipv4Addr, port: u16, partial: bool) {
    let at = if src { 12 } else { 16 };
    let old_addr: [u8; 4] = [ip[at], ip[at + 1], ip[at + 2], ip[at + 3]];
    let new_addr = addr.octets();
    ip[at..at + 4].copy_from_slice(&new_addr);
    let c = adjust(be16(ip, 10), &old_addr, &new_addr, false);
    put16(ip, 10, c);
    if h.later_fragment {
        return;
    }
    let (ihl, total, proto) = (h.ihl, h.total, h.proto);
    let l4 = &mut ip[ihl..total];
    let csum_at = l4_checksum_at(h, l4);
    let port_at = match proto {
        IPPROTO_TCP | IPPROTO_UDP if l4.len() >= 8 => Some(if src { 0 } else { 2 }),
        IPPROTO_ICMP if l4.len() >= 8 && matches!(l4[0], ICMP_ECHO_REQUEST | ICMP_ECHO_REPLY) => Some(4),
        _ => None,
    };
    let old_port = port_at.map(|p| [l4[p], l4[p + 1]]);
    if let Some(p) = port_at {
        put16(l4, p, port);
    }
    let Some(c_at) = csum_at else { return };
    let mut field = be16(l4, c_at);
    // ICMP has no pseudo header: only the identifier counts.
    if proto != IPPROTO_ICMP {
        field = adjust(field, &old_addr, &new_addr, partial);
    }
    if let Some(old) = old_port.filter(|_| !(partial && proto != IPPROTO_ICMP)) {
        field = adjust(field, &old, &port.to_be_bytes(), false);
    }
    if proto == IPPROTO_UDP && field == 0 && !partial {
        field = 0xffff;
    }
    put16(l4, c_at, field);
}

/// Decrements the TTL with an incremental header checksum update. False when the TTL was 0
/// or 1: the packet must not be forwarded (and deserves a time-exceeded).
pub fn decrement_ttl(ip: &mut [u8]) -> bool {
    if ip[8] <= 1 {
        return false;
    }
    let old = [ip[8], ip[9]];
    ip[8] -= 1;
    let c = adjust(be16(ip, 10), &old, &[ip[8], ip[9]], false);
    put16(ip, 10, c);
    true
}

/// Whether `ip` is in the subnet `net/prefix`.
pub fn in_subnet(ip: Ipv4Addr, net: Ipv4Addr, prefix: u8) -> bool {
    let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - prefix.min(32)) };
    u32::from(ip) & mask == u32::from(net) & mask
}

/// Addresses a router must never forward to or from: unspecified, loopback, multicast,
/// broadcast, and the subnet's own network and broadcast addresses are checked by callers.
pub fn is_martian(ip: Ipv4Addr) -> bool {
    ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() || ip.is_broadcast()
}

/// Builds an ICMP error (`kind`, `code`) about the IPv4 packet `orig` (starting at its IP
/// header), from `src` to the original sender, framed from `src_mac` to `dst_mac`. It quotes
/// the original header and up to 548 bytes after it, as Linux does (576-byte datagram).
/// Returns false for packets that must not get an error (RFC 1122 3.2.2: ICMP errors,
/// fragments after the first, broadcast or multicast).
#[allow(clippy::too_many_arguments)]
pub fn icmp_error(out: &mut Vec<u8>, src_mac: Mac, dst_mac: Mac, src: Ipv4Addr, orig: &[u8], kind: u8, code: u8, mtu: u16) -> bool {
    out.clear();
    let Ok(h) = parse(orig, true) else { return false };
    if h.later_fragment || is_martian(h.src) || h.dst.is_multicast() || h.dst.is_broadcast() {
        return false;
    }
    if h.proto == IPPROTO_ICMP && orig.get(h.ihl).is_some_and(|&t| !matches!(t, ICMP_ECHO_REQUEST | ICMP_ECHO_REPLY)) {
        return false;
    }
    let quoted = &orig[..orig.len().min(h.total).min(576 - 28)];
    out.extend_from_slice(&dst_mac);
    out.extend_from_slice(&src_mac);
    out.extend_from_slice(&ETH_P_IPV4.to_be_bytes());
    let l3 = out.len();
    let total = (20 + 8 + quoted.len()) as u16;
    out.extend_from_slice(&[0x45, 0xc0]);
    out.extend_from_slice(&total.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0, 64, IPPROTO_ICMP, 0, 0]);
    out.extend_from_slice(&src.octets());
    out.extend_from_slice(&h.src.octets());
    let c = checksum(&out[l3..l3 + 20]);
    out[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
    let l4 = out.len();
    out.extend_from_slice(&[kind, code, 0, 0, 0, 0]);
    // "Fragmentation needed" carries the next hop's MTU.
    out.extend_from_slice(&if kind == ICMP_DEST_UNREACH && code == 4 { mtu } else { 0 }.to_be_bytes());
    out.extend_from_slice(quoted);
    let c = checksum(&out[l4..]);
    out[l4 + 2..l4 + 4].copy_from_slice(&c.to_be_bytes());
    true
}

/// Builds the TCP RST that refuses the TCP segment `orig` (RFC 793 reset generation), from
/// the address it was sent to, framed from `src_mac` to `dst_mac`. False if `orig` is itself a
/// RST or not a whole TCP header.
pub fn tcp_reset(out: &mut Vec<u8>, src_mac: Mac, dst_mac: Mac, orig: &[u8]) -> bool {
    out.clear();
    let Ok(h) = parse(orig, false) else { return false };
    let Some(tcp) = orig.get(h.ihl..h.total).filter(|t| t.len() >= 20 && h.proto == IPPROTO_TCP && !h.later_fragment) else {
        return false;
    };
    let flags = tcp[13];
    if flags & 0x04 != 0 {
        return false;
    }
    let data_off = ((tcp[12] >> 4) as usize * 4).clamp(20, tcp.len());
    let seg_len = (tcp.len() - data_off) as u32 + (flags & 0x02 != 0) as u32 + (flags & 0x01 != 0) as u32;
    let (seq, ack, rflags) = if flags & 0x10 != 0 {
        (u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]), 0u32, 0x04u8)
    } else {
        (0, u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]).wrapping_add(seg_len), 0x14)
    };
    out.extend_from_slice(&dst_mac);
    out.extend_from_slice(&src_mac);
    out.extend_from_slice(&ETH_P_IPV4.to_be_bytes());
    let l3 = out.len();
    out.extend_from_slice(&[0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, IPPROTO_TCP, 0, 0]);
    out.extend_from_slice(&h.dst.octets());
    out.extend_from_slice(&h.src.octets());
    let c = checksum(&out[l3..l3 + 20]);
    out[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
    let l4 = out.len();
    out.extend_from_slice(&tcp[2..4]);
    out.extend_from_slice(&tcp[0..2]);
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&ack.to_be_bytes());
    out.extend_from_slice(&[0x50, rflags, 0, 0, 0, 0, 0, 0]);
    let pseudo = crate::checksum::pseudo_v4(&h.dst.octets(), &h.src.octets(), IPPROTO_TCP, 20);
    let c = finish(sum(&out[l4..], pseudo));
    out[l4 + 16..l4 + 18].copy_from_slice(&c.to_be_bytes());
    out.resize(60, 0);
    true
}

/// Recomputes a packet's transport checksum from scratch (for tests and for checking).
pub fn l4_checksum_ok(ip: &[u8]) -> bool {
    let Ok(h) = parse(ip, false) else { return false };
    let l4 = &ip[h.ihl..h.total];
    match h.proto {
        IPPROTO_ICMP => checksum(l4) == 0,
        IPPROTO_UDP if l4.len() >= 8 && l4[6..8] == [0, 0] => true,
        IPPROTO_TCP | IPPROTO_UDP => {
            let pseudo = crate::checksum::pseudo_v4(&h.src.octets(), &h.dst.octets(), h.proto, l4.len() as u16);
            finish(sum(l4, pseudo)) == 0
        }
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::PacketBuilder;

    fn udp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
        let mut v = Vec::new();
        PacketBuilder::ipv4(src, dst, 64).udp(sport, dport).write(&mut v, b"hello nat").unwrap();
        v
    }

    fn tcp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, syn: bool) -> Vec<u8> {
        let mut v = Vec::new();
        let b = PacketBuilder::ipv4(src, dst, 64).tcp(sport, dport, 1000, 64240);
        let b = if syn { b.syn() } else { b.ack(77) };
        b.write(&mut v, b"payload!").unwrap();
        v
    }

    #[test]
    fn rewrites_keep_every_checksum_right() {
        for mut p in [udp([192, 168, 122, 10], 40000, [10, 0, 0, 1], 53), tcp([192, 168, 122, 10], 40000, [10, 0, 0, 1], 80, true)] {
            let h = parse(&p, false).unwrap();
            rewrite(&mut p, &h, true, Ipv4Addr::new(10, 10, 11, 50), 1025, false);
            assert_eq!(checksum(&p[..20]), 0);
            assert!(l4_checksum_ok(&p), "transport checksum after source rewrite");
            let h = parse(&p, false).unwrap();
            assert_eq!((h.src, ports(&p, &h)), (Ipv4Addr::new(10, 10, 11, 50), Some((1025, if h.proto == 6 { 80 } else { 53 }))));
            rewrite(&mut p, &h, false, Ipv4Addr::new(172, 16, 0, 9), 8080, false);
            assert!(l4_checksum_ok(&p), "transport checksum after destination rewrite");
        }
        let mut ping = Vec::new();
        PacketBuilder::ipv4([192, 168, 122, 10], [10, 0, 0, 1], 64).icmpv4_echo_request(0x1234, 1).write(&mut ping, b"abcdefgh").unwrap();
        let h = parse(&ping, false).unwrap();
        assert_eq!(ports(&ping, &h), Some((0x1234, 0x1234)));
        rewrite(&mut ping, &h, true, Ipv4Addr::new(10, 10, 11, 50), 7, false);
        assert!(l4_checksum_ok(&ping));
        assert_eq!(ports(&ping, &parse(&ping, false).unwrap()), Some((7, 7)));
    }

    #[test]
    fn partial_checksums_follow_the_addresses_only() {
        // A NEEDS_CSUM TCP packet holds the folded pseudo-header sum; a NIC completes it.
        let mut p = tcp([192, 168, 122, 10], 40000, [10, 0, 0, 1], 80, false);
        let h = parse(&p, false).unwrap();
        let pseudo = |p: &[u8]| {
            let h = parse(p, false).unwrap();
            fold(crate::checksum::pseudo_v4(&h.src.octets(), &h.dst.octets(), 6, (h.total - h.ihl) as u16))
        };
        let v = pseudo(&p);
        p[20 + 16..20 + 18].copy_from_slice(&v.to_be_bytes());
        rewrite(&mut p, &h, true, Ipv4Addr::new(10, 10, 11, 50), 1025, true);
        assert_eq!(be16(&p, 36), pseudo(&p), "the partial sum is the new pseudo header's");
        // Completing it gives a valid checksum.
        let l4 = p[20..].to_vec();
        let mut done = p.clone();
        let c = finish(sum(&l4, 0));
        done[36..38].copy_from_slice(&c.to_be_bytes());
        assert!(l4_checksum_ok(&done));
    }

    #[test]
    fn ttl_and_bad_headers() {
        let mut p = udp([1, 1, 1, 1], 1, [2, 2, 2, 2], 2);
        assert!(decrement_ttl(&mut p));
        assert_eq!((p[8], checksum(&p[..20])), (63, 0));
        p[8] = 1;
        assert!(!decrement_ttl(&mut p));
        for bad in [&p[..19], &[0x65u8; 40][..]] {
            assert_eq!(parse(bad, false), Err(DropReason::BadIpHeader));
        }
        let mut q = p.clone();
        q[3] = 200; // total length beyond the packet
        assert_eq!(parse(&q, false), Err(DropReason::BadIpHeader));
        let mut q = udp([1, 1, 1, 1], 1, [2, 2, 2, 2], 2);
        q[10] ^= 1;
        assert_eq!(parse(&q, false), Err(DropReason::BadIpHeader), "bad header checksum");
        // A UDP header cut short by the IP total length has no ports.
        let mut short = udp([1, 1, 1, 1], 1, [2, 2, 2, 2], 2);
        short[3] = 24;
        short[10..12].copy_from_slice(&[0, 0]);
        let c = checksum(&short[..20]);
        short[10..12].copy_from_slice(&c.to_be_bytes());
        let h = parse(&short, false).unwrap();
        assert_eq!(ports(&short, &h), None);
    }

    #[test]
    fn icmp_errors_and_resets_are_well_formed() {
        let orig = udp([192, 168, 122, 10], 40000, [10, 0, 0, 1], 53);
        let mut out = Vec::new();
        assert!(icmp_error(&mut out, [2; 6], [4; 6], Ipv4Addr::new(192, 168, 122, 1), &orig, ICMP_TIME_EXCEEDED, 0, 1500));
        let ip = &out[14..];
        assert!(l4_checksum_ok(ip) && checksum(&ip[..20]) == 0);
        assert_eq!((ip[20], &ip[16..20], &ip[28..28 + orig.len()]), (ICMP_TIME_EXCEEDED, &[192u8, 168, 122, 10][..], &orig[..]));
        // No error about an error.
        let mut out2 = Vec::new();
        assert!(!icmp_error(&mut out2, [2; 6], [4; 6], Ipv4Addr::new(1, 1, 1, 1), ip, ICMP_DEST_UNREACH, 3, 1500));
        let syn = tcp([10, 0, 0, 9], 5555, [192, 168, 122, 10], 22, true);
        assert!(tcp_reset(&mut out, [2; 6], [4; 6], &syn));
        let r = &out[14..54];
        assert!(l4_checksum_ok(r));
        assert_eq!((&r[12..16], be16(r, 20), be16(r, 22), r[33]), (&[192u8, 168, 122, 10][..], 22, 5555, 0x14));
        assert_eq!(u32::from_be_bytes([r[28], r[29], r[30], r[31]]), 1000 + 1 + 8, "acks the SYN and its 8 bytes");
    }

    #[test]
    fn subnets() {
        assert!(in_subnet(Ipv4Addr::new(10, 1, 2, 3), Ipv4Addr::new(10, 1, 0, 0), 16));
        assert!(!in_subnet(Ipv4Addr::new(10, 2, 2, 3), Ipv4Addr::new(10, 1, 0, 0), 16));
        assert!(in_subnet(Ipv4Addr::new(8, 8, 8, 8), Ipv4Addr::new(0, 0, 0, 0), 0));
    }
}
