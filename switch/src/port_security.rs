//! Port security, as libvirt's `clean-traffic` filter: a guest port sends only with its own
//! MAC (the configured one, else the first one it uses), only with its own IPv4 address once it
//! holds a DHCP lease (ARP included), never with an address someone else holds (the gateway's,
//! another client's lease or reservation; with or without a lease of its own), and never as a
//! DHCP server. Pure: the frame's first bytes and the port's state in, a verdict out.
//!
//! IPv6 ([`check_ipv6`]): RA guard (RFC 6105/7113), no DHCPv6 server, and first-come
//! source validation in the spirit of FCFS SAVI (RFC 6620): a guest sends from `::` (DAD and
//! MLD only), from its MAC's EUI-64 addresses under any prefix (its link-local and SLAAC
//! addresses), or from addresses it claimed first (by DAD or by using them) that nobody else
//! holds; its neighbour advertisements speak only for those addresses and its own MAC.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::gateway::eui64;
use crate::proto::{ETH_P_ARP, ETH_P_IPV4, ETH_P_IPV6, IPPROTO_UDP};
use crate::{DropReason, Mac};

/// Most IPv6 extension headers [`check_ipv6`] follows before it gives up on a packet.
pub const MAX_EXT_HEADERS: usize = 8;

/// How many bytes of a frame [`check`] and [`check_ipv6`] need to see: for IPv4, Ethernet,
/// the IPv4 header with options and the UDP ports (78 bytes); for IPv6, Ethernet, the fixed
/// header, 64 bytes of extension headers and 64 of an ICMPv6 neighbour-discovery message with
/// its options (182 bytes). An IPv6 packet whose headers do not fit is dropped.
pub const HEADER_BYTES: usize = 14 + 40 + 64 + 64;

/// Checks a frame sent by a guest. `head` is the frame's first bytes (up to
/// [`HEADER_BYTES`]); `mac` the port's MAC; `ip` its leased address, if any; `taken` says
/// whether an address belongs to someone else (the gateway, another MAC's lease or static
/// host). `taken` is asked only about a source that is not the port's own lease, so a guest
/// sending from its lease pays nothing for it.
pub fn check(head: &[u8], mac: &Mac, ip: Option<Ipv4Addr>, taken: impl Fn(Ipv4Addr) -> bool) -> Result<(), DropReason> {
    if head.len() < 14 {
        return Err(DropReason::ShortFrame);
    }
    if head[6..12] != mac[..] {
        return Err(DropReason::SpoofedMac);
    }
    match u16::from_be_bytes([head[12], head[13]]) {
        ETH_P_ARP => {
            // Sender hardware address must be the port's; sender protocol address its lease
            // (or 0.0.0.0, an address probe).
            let Some(a) = head.get(14..42) else { return Ok(()) };
            if a[8..14] != mac[..] {
                return Err(DropReason::SpoofedMac);
            }
            let spa = Ipv4Addr::new(a[14], a[15], a[16], a[17]);
            if Some(spa) == ip || spa.is_unspecified() {
                return Ok(());
            }
            if ip.is_some() || taken(spa) {
                return Err(DropReason::SpoofedIp);
            }
            Ok(())
        }
        ETH_P_IPV4 => {
            let Some(h) = head.get(14..34) else { return Ok(()) };
            let src = Ipv4Addr::new(h[12], h[13], h[14], h[15]);
            let ihl = (h[0] & 0xf) as usize * 4;
            let udp_ports = if h[9] == IPPROTO_UDP && u16::from_be_bytes([h[6], h[7]]) & 0x1fff == 0 {
                head.get(14 + ihl..14 + ihl + 4).map(|p| (u16::from_be_bytes([p[0], p[1]]), u16::from_be_bytes([p[2], p[3]])))
            } else {
                None
            };
            if let Some((sport, _)) = udp_ports {
                if sport == 67 {
                    return Err(DropReason::RogueDhcpServer);
                }
            }
            if Some(src) == ip {
                return Ok(());
            }
            match ip {
                // Before it has an address a client talks DHCP from 0.0.0.0.
                Some(_) if !(src.is_unspecified() && udp_ports == Some((68, 67))) => Err(DropReason::SpoofedIp),
                // Without a lease any address nobody else holds (a static configuration).
                _ if taken(src) => Err(DropReason::SpoofedIp),
                _ => Ok(()),
            }
        }
        _ => Ok(()),
    }
}

const IPPROTO_ICMPV6: u8 = 58;
const ND_ROUTER_SOLICIT: u8 = 133;
const ND_ROUTER_ADVERT: u8 = 134;
const ND_NEIGHBOR_SOLICIT: u8 = 135;
const ND_NEIGHBOR_ADVERT: u8 = 136;
const ND_REDIRECT: u8 = 137;
/// MLDv1 report and done, MLDv2 report: what a host sends from `::` besides DAD.
const MLD_TYPES: [u8; 3] = [131, 132, 143];
const ND_OPT_SOURCE_LLADDR: u8 = 1;
const ND_OPT_TARGET_LLADDR: u8 = 2;

/// Checks an IPv6 frame sent by a guest whose frame already passed [`check`] (which checks
/// the source MAC); any other frame passes. `head` is the frame's first bytes (up to
/// [`HEADER_BYTES`]), `mac` the port's MAC. `may_use` is asked about an address that is
/// neither `::` nor one of the MAC's EUI-64 addresses: whether the port holds it, or nobody
/// else does and the port now claims it (a source address, a DAD probe's or an
/// advertisement's target).
///
/// Refused: router advertisements and redirects ([`DropReason::RogueRouterAdvert`]), DHCPv6
/// server messages (UDP from port 547, [`DropReason::RogueDhcpServer`]), sources and
/// advertised targets the port may not use ([`DropReason::SpoofedIp`]), link-layer address
/// options that are not its MAC ([`DropReason::SpoofedMac`]), and packets whose headers
/// cannot be followed to the upper layer within `head` or within [`MAX_EXT_HEADERS`]
/// extension headers, or fragmented neighbour discovery (RFC 6980), which could hide an
/// advertisement ([`DropReason::UncheckedIpv6`]).
pub fn check_ipv6(head: &[u8], mac: &Mac, mut may_use: impl FnMut(Ipv6Addr) -> bool) -> Result<(), DropReason> {
    if head.len() < 14 || u16::from_be_bytes([head[12], head[13]]) != ETH_P_IPV6 {
        return Ok(());
    }
    let Some(h) = head.get(14..54) else { return Err(DropReason::UncheckedIpv6) };
    if h[0] >> 4 != 6 {
        return Err(DropReason::UncheckedIpv6);
    }
    let src = addr(&h[8..24]);
    // Where the IPv6 payload ends (a jumbogram's length of 0 is not followed: no MTU here
    // carries one).
    let end = 54 + u16::from_be_bytes([h[4], h[5]]) as usize;
    let upper = upper_layer(head, h[6])?;
    let own = |a: &Ipv6Addr| a.octets()[8..] == eui64(mac) && a.octets()[0] != 0xff;
    // What the packet is, as far as port security cares, before whose it is: a rogue router
    // counts as one whatever address it forges.
    let mut icmp_type = None;
    if let Some((proto, off, fragmented)) = upper {
        match proto {
            IPPROTO_ICMPV6 => {
                let ty = *head.get(off).ok_or(DropReason::UncheckedIpv6)?;
                if matches!(ty, ND_ROUTER_ADVERT | ND_REDIRECT) {
                    return Err(DropReason::RogueRouterAdvert);
                }
                if fragmented && (ND_ROUTER_SOLICIT..=ND_REDIRECT).contains(&ty) {
                    return Err(DropReason::UncheckedIpv6);
                }
                icmp_type = Some((ty, off, fragmented));
            }
            IPPROTO_UDP => {
                let p = head.get(off..off + 2).ok_or(DropReason::UncheckedIpv6)?;
                if u16::from_be_bytes([p[0], p[1]]) == 547 {
                    return Err(DropReason::RogueDhcpServer);
                }
            }
            _ => {}
        }
    }
    if src.is_unspecified() {
        // Only duplicate address detection and MLD speak before having an address.
        if !matches!(icmp_type, Some((ty, _, false)) if ty == ND_NEIGHBOR_SOLICIT || MLD_TYPES.contains(&ty)) {
            return Err(DropReason::SpoofedIp);
        }
    } else if !own(&src) && (!claimable(&src) || !may_use(src)) {
        return Err(DropReason::SpoofedIp);
    }
    let Some((ty, off, _)) = icmp_type else { return Ok(()) };
    let (options, lladdr) = match ty {
        ND_ROUTER_SOLICIT => (off + 8, ND_OPT_SOURCE_LLADDR),
        ND_NEIGHBOR_SOLICIT | ND_NEIGHBOR_ADVERT => {
            let t = head.get(off + 8..off + 24).ok_or(DropReason::UncheckedIpv6)?;
            let target = addr(t);
            // An advertisement speaks for its target; a DAD probe claims it. Either only for an
            // address the port may use. (A plain solicitation asks about anybody.)
            if (ty == ND_NEIGHBOR_ADVERT || src.is_unspecified()) && !own(&target) && (!claimable(&target) || !may_use(target)) {
                return Err(DropReason::SpoofedIp);
            }
            (off + 24, if ty == ND_NEIGHBOR_ADVERT { ND_OPT_TARGET_LLADDR } else { ND_OPT_SOURCE_LLADDR })
        }
        _ => return Ok(()),
    };
    // Every link-layer address option must be the port's MAC: the whole message must be seen.
    let opts = head.get(options..end).ok_or(DropReason::UncheckedIpv6)?;
    let mut o = opts;
    while o.len() >= 2 {
        let len = o[1] as usize * 8;
        if len == 0 || len > o.len() {
            return Err(DropReason::UncheckedIpv6);
        }
        if o[0] == lladdr && (len < 8 || o[2..8] != mac[..]) {
            return Err(DropReason::SpoofedMac);
        }
        o = &o[len..];
    }
    Ok(())
}

/// Whether a guest could ever hold `a`: not multicast, loopback, unspecified or an
/// IPv4-mapped address (none is a source on the wire).
fn claimable(a: &Ipv6Addr) -> bool {
    !(a.is_multicast() || a.is_loopback() || a.is_unspecified() || a.to_ipv4_mapped().is_some())
}

fn addr(b: &[u8]) -> Ipv6Addr {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[..16]);
    Ipv6Addr::from(a)
}

/// Follows the extension-header chain from `next` (the fixed header's next header) to the
/// upper-layer header: its protocol, offset in the frame, and whether the packet is a first
/// fragment. None for a later fragment (no upper-layer header to see). An error when the chain
/// is longer than [`MAX_EXT_HEADERS`] or runs past `head`.
fn upper_layer(head: &[u8], mut next: u8) -> Result<Option<(u8, usize, bool)>, DropReason> {
    let mut off = 54;
    let mut fragmented = false;
    for _ in 0..MAX_EXT_HEADERS {
        // Every extension header starts with its next header; its length is in 8-byte units
        // past the first 8 (AH: 4-byte units past the first 8); a fragment header is 8 bytes.
        let len = match next {
            0 | 43 | 60 | 135 | 139 | 140 => (*head.get(off + 1).ok_or(DropReason::UncheckedIpv6)? as usize + 1) * 8,
            51 => (*head.get(off + 1).ok_or(DropReason::UncheckedIpv6)? as usize + 2) * 4,
            44 => {
                let f = head.get(off..off + 8).ok_or(DropReason::UncheckedIpv6)?;
                if u16::from_be_bytes([f[2], f[3]]) & !7 != 0 {
                    return Ok(None);
                }
                fragmented = true;
                8
            }
            _ => return Ok(Some((next, off, fragmented))),
        };
        next = head[off];
        off += len;
    }
    // The last header may be the upper layer itself.
    match next {
        0 | 43 | 44 | 51 | 60 | 135 | 139 | 140 => Err(DropReason::UncheckedIpv6),
        _ => Ok(Some((next, off, fragmented))),
    }
}

/// Most addresses a port keeps beyond its EUI-64 ones (privacy addresses, static ones): the
/// oldest goes when a new one comes.
pub const MAX_CLAIMS6: usize = 8;

/// The IPv6 addresses a port claimed (first to probe or use them), oldest first out. Bounded.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Claims6 {
    addrs: [Option<Ipv6Addr>; MAX_CLAIMS6],
    next: usize,
}

impl Claims6 {
    pub fn contains(&self, ip: &Ipv6Addr) -> bool {
        self.addrs.iter().any(|a| a.as_ref() == Some(ip))
    }

    /// Adds `ip` (if it is not there); returns the address it displaced when the set was full.
    pub fn insert(&mut self, ip: Ipv6Addr) -> Option<Ipv6Addr> {
        if self.contains(&ip) {
            return None;
        }
        let old = self.addrs[self.next].replace(ip);
        self.next = (self.next + 1) % MAX_CLAIMS6;
        old
    }

    pub fn iter(&self) -> impl Iterator<Item = Ipv6Addr> + '_ {
        self.addrs.iter().flatten().copied()
    }

    /// Drops `ip` (a DHCPv6 lease of another MAC took it); true if it was there.
    pub fn remove(&mut self, ip: &Ipv6Addr) -> bool {
        let before = self.addrs.iter().flatten().count();
        self.addrs.iter_mut().filter(|a| a.as_ref() == Some(ip)).for_each(|a| *a = None);
        before != self.addrs.iter().flatten().count()
    }

    pub fn clear(&mut self) {
        *self = Claims6::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::PacketBuilder;

    const M: Mac = [0x52, 0x54, 0, 0, 0, 1];
    const OTHER: Mac = [0x52, 0x54, 0, 0, 0, 2];
    const IP: Ipv4Addr = Ipv4Addr::new(192, 168, 122, 5);
    const GW: Ipv4Addr = Ipv4Addr::new(192, 168, 122, 1);
    const OTHERS: Ipv4Addr = Ipv4Addr::new(192, 168, 122, 6);

    /// The gateway and another guest's lease are taken.
    fn taken(a: Ipv4Addr) -> bool {
        a == GW || a == OTHERS
    }

    fn check(head: &[u8], mac: &Mac, ip: Option<Ipv4Addr>) -> Result<(), DropReason> {
        super::check(head, mac, ip, taken)
    }

    fn udp(src_mac: Mac, src: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        let mut f = Vec::new();
        PacketBuilder::ethernet2(src_mac, [0xff; 6]).ipv4(src, [255; 4], 64).udp(sport, dport).write(&mut f, &[0; 20]).unwrap();
        f
    }

    fn arp(sha: Mac, spa: [u8; 4]) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&M);
        f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
        f.extend_from_slice(&sha);
        f.extend_from_slice(&spa);
        f.extend_from_slice(&[0; 10]);
        f
    }

    #[test]
    fn own_mac_and_ip_pass() {
        assert_eq!(check(&udp(M, IP.octets(), 5000, 53), &M, Some(IP)), Ok(()));
        assert_eq!(check(&arp(M, IP.octets()), &M, Some(IP)), Ok(()));
        assert_eq!(check(&udp(M, [10, 9, 9, 9], 5000, 53), &M, None), Ok(()), "no lease yet: any address");
        assert_eq!(check(&udp(M, [0; 4], 68, 67), &M, Some(IP)), Ok(()), "DHCP from 0.0.0.0");
        assert_eq!(check(&arp(M, [0; 4]), &M, Some(IP)), Ok(()), "ARP probe");
    }

    #[test]
    fn spoofing_is_refused() {
        assert_eq!(check(&udp(OTHER, IP.octets(), 5000, 53), &M, Some(IP)), Err(DropReason::SpoofedMac));
        assert_eq!(check(&udp(M, [192, 168, 122, 6], 5000, 53), &M, Some(IP)), Err(DropReason::SpoofedIp));
        assert_eq!(check(&udp(M, [0; 4], 5000, 53), &M, Some(IP)), Err(DropReason::SpoofedIp));
        assert_eq!(check(&arp(OTHER, IP.octets()), &M, Some(IP)), Err(DropReason::SpoofedMac), "ARP with a foreign sender MAC");
        assert_eq!(check(&arp(M, [192, 168, 122, 1]), &M, Some(IP)), Err(DropReason::SpoofedIp), "ARP claiming the gateway");
        assert_eq!(check(&udp(M, IP.octets(), 67, 68), &M, Some(IP)), Err(DropReason::RogueDhcpServer));
        assert_eq!(check(&udp(M, [10, 0, 0, 9], 67, 68), &M, None), Err(DropReason::RogueDhcpServer));
    }

    #[test]
    fn without_a_lease_addresses_others_hold_are_refused() {
        assert_eq!(check(&udp(M, GW.octets(), 5000, 53), &M, None), Err(DropReason::SpoofedIp), "the gateway's address");
        assert_eq!(check(&udp(M, OTHERS.octets(), 5000, 53), &M, None), Err(DropReason::SpoofedIp), "another guest's lease");
        assert_eq!(check(&arp(M, GW.octets()), &M, None), Err(DropReason::SpoofedIp), "ARP claiming the gateway");
        assert_eq!(check(&arp(M, OTHERS.octets()), &M, None), Err(DropReason::SpoofedIp), "ARP claiming another guest");
        // What a guest without a lease needs: DHCP from 0.0.0.0, ARP probes, a static address.
        assert_eq!(check(&udp(M, [0; 4], 68, 67), &M, None), Ok(()));
        assert_eq!(check(&arp(M, [0; 4]), &M, None), Ok(()));
        assert_eq!(check(&arp(M, [192, 168, 122, 77]), &M, None), Ok(()));
        // The port's own lease is not asked about at all.
        assert_eq!(super::check(&udp(M, IP.octets(), 5000, 53), &M, Some(IP), |_| panic!("asked")), Ok(()));
    }

    #[test]
    fn short_headers_do_not_panic() {
        let f = udp(M, IP.octets(), 67, 68);
        for cut in 0..f.len() {
            let _ = check(&f[..cut], &M, Some(IP));
        }
        let a = arp(M, [1, 2, 3, 4]);
        for cut in 0..a.len() {
            let _ = check(&a[..cut], &M, Some(IP));
        }
    }

    // ---- IPv6 ----

    const LL: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0x5054, 0xff, 0xfe00, 1);
    const SLAAC: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x7675, 1, 0, 0x5054, 0xff, 0xfe00, 1);
    const PRIVACY: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x7675, 1, 0, 0x1234, 0x5678, 0x9abc, 0xdef0);
    const OTHERS6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x7675, 1, 0, 0, 0, 0, 0x21);
    const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);

    /// The port may use PRIVACY (it claimed it); OTHERS6 is someone else's.
    fn check6(head: &[u8]) -> Result<(), DropReason> {
        check_ipv6(head, &M, |a| a == PRIVACY)
    }

    /// An Ethernet + IPv6 frame with `ext` (already chained: `next` is the first header's
    /// protocol) and `payload`.
    fn ipv6(src: Ipv6Addr, next: u8, ext: &[u8], payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0x33, 0x33, 0, 0, 0, 1];
        f.extend_from_slice(&M);
        f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
        f.extend_from_slice(&((ext.len() + payload.len()) as u16).to_be_bytes());
        f.extend_from_slice(&[next, 255]);
        f.extend_from_slice(&src.octets());
        f.extend_from_slice(&ALL_NODES.octets());
        f.extend_from_slice(ext);
        f.extend_from_slice(payload);
        f
    }

    fn icmp6(ty: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![ty, 0, 0, 0];
        m.extend_from_slice(body);
        m
    }

    /// A neighbour solicitation or advertisement for `target` with a link-layer option.
    fn nd(ty: u8, target: Ipv6Addr, opt: Option<(u8, Mac)>) -> Vec<u8> {
        let mut b = vec![0x60, 0, 0, 0];
        b.extend_from_slice(&target.octets());
        if let Some((t, m)) = opt {
            b.extend_from_slice(&[t, 1]);
            b.extend_from_slice(&m);
        }
        icmp6(ty, &b)
    }

    fn udp6(src: Ipv6Addr, sport: u16, dport: u16) -> Vec<u8> {
        let mut u = sport.to_be_bytes().to_vec();
        u.extend_from_slice(&dport.to_be_bytes());
        u.extend_from_slice(&[0, 12, 0, 0, 1, 2, 3, 4]);
        ipv6(src, 17, &[], &u)
    }

    #[test]
    fn ipv6_router_advertisements_and_redirects_are_refused() {
        let ra = icmp6(134, &[64, 0, 0x07, 0x08, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(check6(&ipv6(LL, 58, &[], &ra)), Err(DropReason::RogueRouterAdvert));
        assert_eq!(check6(&ipv6(OTHERS6, 58, &[], &ra)), Err(DropReason::RogueRouterAdvert), "whatever its source");
        assert_eq!(check6(&ipv6(LL, 58, &[], &icmp6(137, &[0; 36]))), Err(DropReason::RogueRouterAdvert), "redirect");
        // Behind a hop-by-hop and a destination-options header: still found.
        let ext = [60, 0, 1, 4, 0, 0, 0, 0, 58, 0, 1, 4, 0, 0, 0, 0];
        assert_eq!(check6(&ipv6(LL, 0, &ext, &ra)), Err(DropReason::RogueRouterAdvert));
        // A router solicitation and an echo request are fine.
        assert_eq!(check6(&ipv6(LL, 58, &[], &icmp6(133, &[0; 4]))), Ok(()));
        assert_eq!(check6(&ipv6(SLAAC, 58, &[], &icmp6(128, &[0, 1, 0, 1]))), Ok(()));
    }

    #[test]
    fn ipv6_unclassifiable_nd_is_refused() {
        let ra = icmp6(134, &[64, 0, 0x07, 0x08, 0, 0, 0, 0, 0, 0, 0, 0]);
        // RA in a first fragment (RFC 6980: ND is never fragmented).
        let frag = [58, 0, 0, 1, 0, 0, 0, 9];
        assert_eq!(check6(&ipv6(LL, 44, &frag, &ra)), Err(DropReason::RogueRouterAdvert));
        let ns = nd(135, SLAAC, None);
        assert_eq!(check6(&ipv6(LL, 44, &frag, &ns)), Err(DropReason::UncheckedIpv6), "fragmented NS");
        // A fragmented echo request passes; so does a later fragment (no header to see).
        assert_eq!(check6(&ipv6(LL, 44, &frag, &icmp6(128, &[0; 1200]))), Ok(()));
        assert_eq!(check6(&ipv6(LL, 44, &[58, 0, 0x05, 0x01, 0, 0, 0, 9], &[0; 64])), Ok(()));
        // Too many extension headers: one more than MAX_EXT_HEADERS destination options.
        let mut chain = Vec::new();
        for i in 0..=MAX_EXT_HEADERS {
            chain.extend_from_slice(&[if i == MAX_EXT_HEADERS { 58 } else { 60 }, 0, 1, 4, 0, 0, 0, 0]);
        }
        assert_eq!(check6(&ipv6(LL, 60, &chain, &icmp6(128, &[0; 4]))), Err(DropReason::UncheckedIpv6));
        assert_eq!(check6(&ipv6(LL, 60, &chain[8..], &icmp6(128, &[0; 4]))), Ok(()), "MAX_EXT_HEADERS are followed");
        // A header that runs past what is checked: the ICMPv6 type would be unseen.
        let long = [58, 15, 1, 126, 0, 0, 0, 0];
        let mut l = long.to_vec();
        l.extend_from_slice(&[0; 120]);
        assert_eq!(check6(&ipv6(LL, 60, &l, &ra)[..HEADER_BYTES]), Err(DropReason::UncheckedIpv6));
        // A truncated IPv6 header, a version that is not 6.
        assert_eq!(check6(&ipv6(LL, 58, &[], &ra)[..40]), Err(DropReason::UncheckedIpv6));
        let mut v4 = ipv6(LL, 58, &[], &icmp6(128, &[0; 4]));
        v4[14] = 0x40;
        assert_eq!(check6(&v4), Err(DropReason::UncheckedIpv6));
    }

    #[test]
    fn ipv6_dhcp_servers_are_refused() {
        assert_eq!(check6(&udp6(LL, 547, 546)), Err(DropReason::RogueDhcpServer));
        assert_eq!(check6(&udp6(LL, 546, 547)), Ok(()), "a DHCPv6 client");
        assert_eq!(check6(&udp6(SLAAC, 5353, 53)), Ok(()));
    }

    #[test]
    fn ipv6_sources_are_the_ports_own() {
        assert_eq!(check6(&udp6(LL, 5000, 53)), Ok(()), "link-local EUI-64");
        assert_eq!(check6(&udp6(SLAAC, 5000, 53)), Ok(()), "SLAAC under the prefix");
        let elsewhere = Ipv6Addr::new(0x2001, 0xdb8, 7, 7, 0x5054, 0xff, 0xfe00, 1);
        assert_eq!(check6(&udp6(elsewhere, 5000, 53)), Ok(()), "EUI-64 under any prefix");
        assert_eq!(check6(&udp6(PRIVACY, 5000, 53)), Ok(()), "an address it claimed");
        assert_eq!(check6(&udp6(OTHERS6, 5000, 53)), Err(DropReason::SpoofedIp));
        let others_ll = Ipv6Addr::new(0xfe80, 0, 0, 0, 0x5054, 0xff, 0xfe00, 2);
        assert_eq!(check6(&udp6(others_ll, 5000, 53)), Err(DropReason::SpoofedIp), "another MAC's link-local");
        let mcast = Ipv6Addr::new(0xff02, 0, 0, 0, 0x5054, 0xff, 0xfe00, 1);
        assert_eq!(check6(&udp6(mcast, 5000, 53)), Err(DropReason::SpoofedIp), "a multicast source");
        for odd in [Ipv6Addr::LOCALHOST, Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped()] {
            assert_eq!(check_ipv6(&udp6(odd, 5000, 53), &M, |_| true), Err(DropReason::SpoofedIp), "{odd} is never claimable");
        }
        // `::` only for DAD and MLD.
        assert_eq!(check6(&udp6(Ipv6Addr::UNSPECIFIED, 546, 547)), Err(DropReason::SpoofedIp));
        assert_eq!(check6(&ipv6(Ipv6Addr::UNSPECIFIED, 58, &[], &nd(135, SLAAC, None))), Ok(()), "DAD");
        let hbh = [58, 0, 5, 2, 0, 0, 1, 0];
        assert_eq!(check6(&ipv6(Ipv6Addr::UNSPECIFIED, 0, &hbh, &icmp6(143, &[0; 4]))), Ok(()), "MLDv2 report");
        assert_eq!(check6(&ipv6(Ipv6Addr::UNSPECIFIED, 58, &[], &icmp6(128, &[0; 4]))), Err(DropReason::SpoofedIp));
        // The EUI-64 sources never ask.
        assert_eq!(check_ipv6(&udp6(SLAAC, 5000, 53), &M, |_| panic!("asked")), Ok(()));
        // Not IPv6: not this check's business.
        assert_eq!(check_ipv6(&udp(M, IP.octets(), 67, 68), &M, |_| false), Ok(()));
    }

    #[test]
    fn ipv6_dad_claims_and_advertisements_speak_for_the_port() {
        // A DAD probe asks whether the port may take its target.
        let mut asked = Vec::new();
        let probe = ipv6(Ipv6Addr::UNSPECIFIED, 58, &[], &nd(135, OTHERS6, None));
        assert_eq!(
            check_ipv6(&probe, &M, |a| {
                asked.push(a);
                false
            }),
            Err(DropReason::SpoofedIp)
        );
        assert_eq!(asked, [OTHERS6]);
        assert_eq!(check6(&ipv6(Ipv6Addr::UNSPECIFIED, 58, &[], &nd(135, PRIVACY, None))), Ok(()));
        // A plain solicitation may ask about anybody, with its own MAC as source option.
        assert_eq!(check6(&ipv6(LL, 58, &[], &nd(135, OTHERS6, Some((1, M))))), Ok(()));
        assert_eq!(check6(&ipv6(LL, 58, &[], &nd(135, OTHERS6, Some((1, OTHER))))), Err(DropReason::SpoofedMac));
        // Advertisements: own targets with its own MAC only.
        assert_eq!(check6(&ipv6(LL, 58, &[], &nd(136, SLAAC, Some((2, M))))), Ok(()));
        assert_eq!(check6(&ipv6(LL, 58, &[], &nd(136, PRIVACY, Some((2, M))))), Ok(()));
        assert_eq!(check6(&ipv6(LL, 58, &[], &nd(136, OTHERS6, Some((2, M))))), Err(DropReason::SpoofedIp));
        assert_eq!(check6(&ipv6(LL, 58, &[], &nd(136, SLAAC, Some((2, OTHER))))), Err(DropReason::SpoofedMac));
        assert_eq!(check6(&ipv6(Ipv6Addr::UNSPECIFIED, 58, &[], &nd(136, SLAAC, None))), Err(DropReason::SpoofedIp));
        // A router solicitation's source option too.
        let mut rs = vec![0, 0, 0, 0, 1, 1];
        rs.extend_from_slice(&OTHER);
        assert_eq!(check6(&ipv6(LL, 58, &[], &icmp6(133, &rs))), Err(DropReason::SpoofedMac));
        // An option of length 0 is malformed (receivers drop it; so do we).
        let mut bad = nd(136, SLAAC, None);
        bad.extend_from_slice(&[2, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(check6(&ipv6(LL, 58, &[], &bad)), Err(DropReason::UncheckedIpv6));
    }

    #[test]
    fn ipv6_short_headers_do_not_panic() {
        let frames = [
            ipv6(LL, 58, &[], &nd(136, SLAAC, Some((2, M)))),
            ipv6(LL, 0, &[60, 0, 1, 4, 0, 0, 0, 0, 44, 0, 1, 4, 0, 0, 0, 0, 58, 0, 0, 1, 0, 0, 0, 9], &icmp6(128, &[0; 8])),
            ipv6(LL, 51, &[58, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], &icmp6(134, &[0; 12])),
            udp6(LL, 547, 546),
        ];
        for f in &frames {
            for cut in 0..f.len() {
                let _ = check6(&f[..cut]);
            }
        }
        assert_eq!(check6(&frames[2]), Err(DropReason::RogueRouterAdvert), "behind AH");
    }

    #[test]
    fn claims_are_bounded_oldest_out() {
        let mut c = Claims6::default();
        let a = |i: u16| Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, i);
        for i in 0..MAX_CLAIMS6 as u16 {
            assert_eq!(c.insert(a(i)), None);
        }
        assert_eq!(c.insert(a(0)), None, "already there");
        assert_eq!(c.insert(a(100)), Some(a(0)));
        assert!(c.contains(&a(100)) && !c.contains(&a(0)) && c.contains(&a(1)));
        assert_eq!(c.iter().count(), MAX_CLAIMS6);
        c.clear();
        assert_eq!(c.iter().count(), 0);
    }
}
