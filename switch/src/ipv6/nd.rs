//! The gateway's neighbour discovery (RFC 4861) and ICMPv6 echo: it answers neighbour
//! solicitations for its link-local and global addresses, router solicitations with a router
//! advertisement, and echo requests to its addresses; and it makes the unsolicited router
//! advertisements the run-time layer sends on a timer. Every ND message is validated as
//! RFC 4861 §6.1.1/§7.1.1 asks (hop limit 255, checksum, code, option lengths) and an ND
//! message behind a fragment header is dropped (RFC 6980).
//!
//! What the advertisement says (docs/ipv6.md):
//! - M and O set when the network runs DHCPv6, both clear otherwise;
//! - router lifetime 1800 s, 0 on an isolated network (not a default router, as libvirt
//!   configures dnsmasq there);
//! - the prefix on-link (L), and autonomous (A) only without DHCPv6 and only for a /64,
//!   dnsmasq's default for a range with `enable-ra`;
//! - source link-layer address, MTU, RDNSS (the gateway's global address) and DNSSL (the
//!   network's DNS domain, if any).

use std::net::Ipv6Addr;

use super::{finish_icmpv6, header, multicast_mac, parse, start_icmpv6, Ipv6Drop, ALL_NODES, ALL_ROUTERS, IPPROTO_ICMPV6};
use crate::gateway::Gateway6;
use crate::Mac;

const ECHO_REQUEST: u8 = 128;
const ECHO_REPLY: u8 = 129;
const ROUTER_SOLICITATION: u8 = 133;
const ROUTER_ADVERTISEMENT: u8 = 134;
const NEIGHBOR_SOLICITATION: u8 = 135;
const NEIGHBOR_ADVERTISEMENT: u8 = 136;

const OPT_SOURCE_LL: u8 = 1;
const OPT_TARGET_LL: u8 = 2;
const OPT_PREFIX: u8 = 3;
const OPT_MTU: u8 = 5;
const OPT_RDNSS: u8 = 25;
const OPT_DNSSL: u8 = 31;

/// RFC 4861 §6.2.1 MaxRtrAdvInterval default: unsolicited advertisements are at most this far
/// apart, and the RDNSS/DNSSL lifetimes are three times it (RFC 8106 §5.1).
pub const MAX_RTR_ADV_INTERVAL_S: u32 = 600;
/// Its MinRtrAdvInterval: a third of the maximum, 200 s.
pub const MIN_RTR_ADV_INTERVAL_S: u32 = MAX_RTR_ADV_INTERVAL_S / 3;

/// What the gateway's router advertisements carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RaConfig {
    /// Seconds guests may use the gateway as their default router; 0: not a default router.
    pub router_lifetime: u16,
    /// M: addresses come from DHCPv6.
    pub managed: bool,
    /// O: other configuration (DNS) comes from DHCPv6.
    pub other: bool,
    /// A in the prefix option: guests form addresses from the prefix themselves (SLAAC).
    pub autonomous: bool,
    /// The link MTU to advertise (None: leave it out).
    pub mtu: Option<u32>,
    pub valid_lifetime: u32,
    pub preferred_lifetime: u32,
    /// Lifetime of the RDNSS and DNSSL options.
    pub dns_lifetime: u32,
}

impl RaConfig {
    /// The advertisement of a network: `isolated` (no route out), `dhcp6` (it runs a DHCPv6
    /// server), its MTU and the length of the `gateway6` prefix.
    pub fn new(isolated: bool, dhcp6: bool, mtu: u16, prefix_len: u8) -> RaConfig {
        RaConfig {
            router_lifetime: if isolated { 0 } else { 1800 },
            managed: dhcp6,
            other: dhcp6,
            // SLAAC needs a 64-bit interface identifier on Ethernet (RFC 4862 §5.5.3 d).
            autonomous: !dhcp6 && prefix_len == 64,
            // Linux ignores an MTU option below IPv6's minimum (RFC 8200 §5).
            mtu: (mtu >= 1280).then_some(mtu as u32),
            valid_lifetime: 86400,
            preferred_lifetime: 14400,
            dns_lifetime: 3 * MAX_RTR_ADV_INTERVAL_S,
        }
    }
}

/// What [`Ndp::handle`] did with a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Not addressed to the gateway's ND or echo: another service's, or a guest's.
    NotMine,
    /// Taken; the answer is in `out`.
    Reply,
    /// Addressed to the gateway but invalid: dropped, to be counted under this reason.
    Drop(Ipv6Drop),
    /// Valid and for the gateway, but nothing to answer (an echo reply, an advertisement).
    Ignored,
}

/// The gateway's ND and echo responder for one network.
#[derive(Clone, Debug)]
pub struct Ndp {
    gw: Gateway6,
    cfg: RaConfig,
    /// The DNSSL option's domain names in wire form, padded to the option's 8-byte units;
    /// empty when the network has no domain (or one that cannot be encoded).
    dnssl: Vec<u8>,
}

/// Fixed part of a neighbour advertisement: R (the gateway routes), S, O.
const NA_ROUTER: u8 = 0x80;
const NA_SOLICITED: u8 = 0x40;
const NA_OVERRIDE: u8 = 0x20;

impl Ndp {
    /// `domain`: the network's DNS domain, advertised as DNSSL.
    pub fn new(gw: Gateway6, cfg: RaConfig, domain: Option<&str>) -> Ndp {
        Ndp { gw, cfg, dnssl: domain.and_then(encode_domain).unwrap_or_default() }
    }

    pub fn config(&self) -> &RaConfig {
        &self.cfg
    }

    /// Whether a packet to `dst` may be ND or echo for the gateway: its own addresses, their
    /// solicited-node groups, all-routers.
    fn wants(&self, dst: &Ipv6Addr) -> bool {
        self.gw.is_mine(dst)
            || *dst == ALL_ROUTERS
            || *dst == super::solicited_node(&self.gw.ip)
            || *dst == super::solicited_node(&self.gw.link_local)
    }

    /// Handles one frame a guest sent (to the gateway's MAC or an IPv6 multicast MAC). An
    /// answer is written to `out` (cleared first) when it returns [`Verdict::Reply`].
    pub fn handle(&self, frame: &[u8], out: &mut Vec<u8>) -> Verdict {
        out.clear();
        let dst = match header(frame) {
            None => return Verdict::NotMine,
            Some(Ok((_, dst))) => dst,
            // Broken IPv6 on a multicast MAC is the guests' business; to our MAC, ours.
            Some(Err(e)) => return if frame[0..6] == self.gw.mac { Verdict::Drop(e) } else { Verdict::NotMine },
        };
        if !self.wants(&dst) {
            return Verdict::NotMine;
        }
        let p = match parse(frame) {
            Ok(p) => p,
            Err(e) => return Verdict::Drop(e),
        };
        if p.proto != IPPROTO_ICMPV6 {
            return Verdict::NotMine;
        }
        if p.fragmented {
            return Verdict::Drop(Ipv6Drop::Fragmented);
        }
        if !super::icmpv6_checksum_ok(&p.src, &p.dst, p.payload) {
            return Verdict::Drop(if p.payload.len() < 4 { Ipv6Drop::BadHeader } else { Ipv6Drop::BadChecksum });
        }
        match p.payload[0] {
            NEIGHBOR_SOLICITATION => self.neighbor_solicitation(&p, out),
            ROUTER_SOLICITATION => self.router_solicitation(&p, out),
            ECHO_REQUEST if self.gw.is_mine(&p.dst) => self.echo(&p, out),
            ECHO_REPLY | NEIGHBOR_ADVERTISEMENT => Verdict::Ignored,
            _ => Verdict::NotMine,
        }
    }

    /// NS for one of the gateway's addresses → NA with its MAC (RFC 4861 §7.2.4).
    fn neighbor_solicitation(&self, p: &super::Packet, out: &mut Vec<u8>) -> Verdict {
        let msg = p.payload;
        if p.hop_limit != 255 {
            return Verdict::Drop(Ipv6Drop::BadHopLimit);
        }
        if msg[1] != 0 || msg.len() < 24 {
            return Verdict::Drop(Ipv6Drop::BadNd);
        }
        let target = super::addr(&msg[8..24]);
        let Ok(slla) = source_ll_option(&msg[24..]) else { return Verdict::Drop(Ipv6Drop::BadNd) };
        let dad = p.src.is_unspecified();
        if target.is_multicast() || p.src.is_multicast() || (dad && (slla.is_some() || !is_solicited_node(&p.dst))) {
            return Verdict::Drop(Ipv6Drop::BadNd);
        }
        if !self.gw.is_mine(&target) {
            return Verdict::NotMine;
        }
        // A duplicate address detection probe for an address the gateway holds: the prober
        // has no address to answer to, so the answer goes to all nodes, not solicited.
        let (dst_mac, dst, flags) = if dad {
            (multicast_mac(&ALL_NODES), ALL_NODES, NA_ROUTER | NA_OVERRIDE)
        } else {
            (reply_mac(slla, p.src_mac), p.src, NA_ROUTER | NA_SOLICITED | NA_OVERRIDE)
        };
        start_icmpv6(out, self.gw.mac, dst_mac, &target, &dst, 255, 32);
        out.extend_from_slice(&[NEIGHBOR_ADVERTISEMENT, 0, 0, 0, flags, 0, 0, 0]);
        out.extend_from_slice(&target.octets());
        out.extend_from_slice(&[OPT_TARGET_LL, 1]);
        out.extend_from_slice(&self.gw.mac);
        finish_icmpv6(out);
        Verdict::Reply
    }

    /// RS → RA, unicast to a sender with an address, to all nodes for one from `::`.
    fn router_solicitation(&self, p: &super::Packet, out: &mut Vec<u8>) -> Verdict {
        let msg = p.payload;
        if p.hop_limit != 255 {
            return Verdict::Drop(Ipv6Drop::BadHopLimit);
        }
        if msg[1] != 0 || msg.len() < 8 {
            return Verdict::Drop(Ipv6Drop::BadNd);
        }
        let Ok(slla) = source_ll_option(&msg[8..]) else { return Verdict::Drop(Ipv6Drop::BadNd) };
        if p.src.is_multicast() || (p.src.is_unspecified() && slla.is_some()) {
            return Verdict::Drop(Ipv6Drop::BadNd);
        }
        if p.src.is_unspecified() {
            self.router_advertisement(multicast_mac(&ALL_NODES), &ALL_NODES, out);
        } else {
            self.router_advertisement(reply_mac(slla, p.src_mac), &p.src, out);
        }
        Verdict::Reply
    }

    /// Echo request to one of the gateway's addresses → echo reply from that address.
    fn echo(&self, p: &super::Packet, out: &mut Vec<u8>) -> Verdict {
        let msg = p.payload;
        if msg[1] != 0 || msg.len() < 8 || p.src.is_multicast() || p.src.is_unspecified() {
            return Verdict::Drop(Ipv6Drop::BadHeader);
        }
        start_icmpv6(out, self.gw.mac, p.src_mac, &p.dst, &p.src, 64, msg.len() as u16);
        let l4 = out.len();
        out.extend_from_slice(msg);
        out[l4] = ECHO_REPLY;
        finish_icmpv6(out);
        Verdict::Reply
    }

    /// An unsolicited router advertisement to all nodes (ff02::1), for the timer.
    pub fn unsolicited_ra(&self, out: &mut Vec<u8>) {
        self.router_advertisement(multicast_mac(&ALL_NODES), &ALL_NODES, out);
    }

    /// A router advertisement from the gateway's link-local address to `dst` (at `dst_mac`),
    /// written to `out` (cleared first).
    pub fn router_advertisement(&self, dst_mac: Mac, dst: &Ipv6Addr, out: &mut Vec<u8>) {
        let c = &self.cfg;
        start_icmpv6(out, self.gw.mac, dst_mac, &self.gw.link_local, dst, 255, 0);
        let flags = if c.managed { 0x80 } else { 0 } | if c.other { 0x40 } else { 0 };
        out.extend_from_slice(&[ROUTER_ADVERTISEMENT, 0, 0, 0, 64, flags]);
        out.extend_from_slice(&c.router_lifetime.to_be_bytes());
        out.extend_from_slice(&[0; 8]); // Reachable time, retrans timer: unspecified.
        out.extend_from_slice(&[OPT_SOURCE_LL, 1]);
        out.extend_from_slice(&self.gw.mac);
        if let Some(mtu) = c.mtu {
            out.extend_from_slice(&[OPT_MTU, 1, 0, 0]);
            out.extend_from_slice(&mtu.to_be_bytes());
        }
        let mask = if self.gw.prefix == 0 { 0 } else { u128::MAX << (128 - self.gw.prefix.min(128) as u32) };
        let prefix = Ipv6Addr::from(u128::from(self.gw.ip) & mask);
        out.extend_from_slice(&[OPT_PREFIX, 4, self.gw.prefix, 0x80 | if c.autonomous { 0x40 } else { 0 }]);
        out.extend_from_slice(&c.valid_lifetime.to_be_bytes());
        out.extend_from_slice(&c.preferred_lifetime.min(c.valid_lifetime).to_be_bytes());
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&prefix.octets());
        out.extend_from_slice(&[OPT_RDNSS, 3, 0, 0]);
        out.extend_from_slice(&c.dns_lifetime.to_be_bytes());
        out.extend_from_slice(&self.gw.ip.octets());
        if !self.dnssl.is_empty() {
            out.extend_from_slice(&[OPT_DNSSL, ((8 + self.dnssl.len()) / 8) as u8, 0, 0]);
            out.extend_from_slice(&c.dns_lifetime.to_be_bytes());
            out.extend_from_slice(&self.dnssl);
        }
        finish_icmpv6(out);
    }
}

/// The destination MAC of a unicast answer: the solicitation's source link-layer address
/// option if it names a unicast MAC, else the frame's source.
fn reply_mac(slla: Option<Mac>, src_mac: Mac) -> Mac {
    slla.filter(|m| !crate::is_multicast(m)).unwrap_or(src_mac)
}

fn is_solicited_node(ip: &Ipv6Addr) -> bool {
    let o = ip.octets();
    o[..13] == [0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff]
}

/// Walks ND options (RFC 4861 §4.6): every option must have a non-zero length that stays
/// inside the message. Returns the source link-layer address option's MAC, if one is there.
fn source_ll_option(mut opts: &[u8]) -> Result<Option<Mac>, ()> {
    let mut slla = None;
    while !opts.is_empty() {
        let len = *opts.get(1).ok_or(())? as usize * 8;
        if len == 0 || len > opts.len() {
            return Err(());
        }
        if opts[0] == OPT_SOURCE_LL && len == 8 {
            slla = Some([opts[2], opts[3], opts[4], opts[5], opts[6], opts[7]]);
        }
        opts = &opts[len..];
    }
    Ok(slla)
}

/// A domain in DNS wire form, padded with zeros to a multiple of 8 bytes counting the DNSSL
/// option's 8-byte header (RFC 8106 §5.2). None for a name that is not a valid DNS name.
fn encode_domain(domain: &str) -> Option<Vec<u8>> {
    let domain = domain.strip_suffix('.').unwrap_or(domain);
    let mut w = Vec::new();
    for label in domain.split('.') {
        if label.is_empty() || label.len() > 63 {
            return None;
        }
        w.push(label.len() as u8);
        w.extend_from_slice(label.as_bytes());
    }
    w.push(0);
    if w.len() > 255 {
        return None;
    }
    w.resize(w.len().div_ceil(8) * 8, 0);
    Some(w)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::{gateway_mac, link_local};
    use etherparse::{Icmpv6Type, IpNumber, Ipv6FragmentHeader, Ipv6Header, NetSlice, SlicedPacket, TransportSlice};

    const GUEST: Mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

    fn a(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    fn gw6() -> Gateway6 {
        Gateway6::new(gateway_mac("default"), a("fd00:7675:1::1"), 64)
    }

    fn ndp(isolated: bool, dhcp6: bool) -> Ndp {
        Ndp::new(gw6(), RaConfig::new(isolated, dhcp6, 1500, 64), Some("example.test"))
    }

    /// An ICMPv6 message in an Ethernet + IPv6 frame, checksummed by etherparse.
    fn icmp6(dst_mac: Mac, src: Ipv6Addr, dst: Ipv6Addr, hop: u8, msg: &[u8]) -> Vec<u8> {
        let mut msg = msg.to_vec();
        msg[2..4].copy_from_slice(&[0, 0]);
        let ip = Ipv6Header {
            payload_length: msg.len() as u16,
            next_header: IpNumber::IPV6_ICMP,
            hop_limit: hop,
            source: src.octets(),
            destination: dst.octets(),
            ..Default::default()
        };
        let c = etherparse::checksum::Sum16BitWords::new()
            .add_16bytes(src.octets())
            .add_16bytes(dst.octets())
            .add_4bytes((msg.len() as u32).to_be_bytes())
            .add_2bytes([0, 58])
            .add_slice(&msg)
            .ones_complement()
            .to_be();
        msg[2..4].copy_from_slice(&c.to_be_bytes());
        let mut f = Vec::new();
        f.extend_from_slice(&dst_mac);
        f.extend_from_slice(&GUEST);
        f.extend_from_slice(&[0x86, 0xdd]);
        ip.write(&mut f).unwrap();
        f.extend_from_slice(&msg);
        f
    }

    fn ns_msg(target: Ipv6Addr, slla: Option<Mac>) -> Vec<u8> {
        let mut m = vec![135, 0, 0, 0, 0, 0, 0, 0];
        m.extend_from_slice(&target.octets());
        if let Some(mac) = slla {
            m.extend_from_slice(&[1, 1]);
            m.extend_from_slice(&mac);
        }
        m
    }

    fn rs_msg(slla: Option<Mac>) -> Vec<u8> {
        let mut m = vec![133, 0, 0, 0, 0, 0, 0, 0];
        if let Some(mac) = slla {
            m.extend_from_slice(&[1, 1]);
            m.extend_from_slice(&mac);
        }
        m
    }

    fn guest_ll() -> Ipv6Addr {
        link_local(&GUEST)
    }

    /// Parses an answer with etherparse (which checks the ICMPv6 checksum's presence, not its
    /// value; we check that ourselves) and returns the IPv6 header and ICMPv6 message.
    fn answer(out: &[u8]) -> (etherparse::Ipv6Header, Vec<u8>) {
        let p = SlicedPacket::from_ethernet(out).unwrap();
        let Some(NetSlice::Ipv6(ip)) = &p.net else { panic!("not IPv6") };
        let h = ip.header().to_header();
        let Some(TransportSlice::Icmpv6(icmp)) = &p.transport else { panic!("not ICMPv6") };
        assert!(super::super::icmpv6_checksum_ok(&h.source_addr(), &h.destination_addr(), icmp.slice()), "checksum");
        (h, icmp.slice().to_vec())
    }

    #[test]
    fn answers_ns_for_both_addresses_with_a_solicited_override_na() {
        let n = ndp(false, false);
        let g = gw6();
        let mut out = Vec::new();
        for target in [g.ip, g.link_local] {
            let sn = super::super::solicited_node(&target);
            let f = icmp6(multicast_mac(&sn), guest_ll(), sn, 255, &ns_msg(target, Some(GUEST)));
            assert_eq!(n.handle(&f, &mut out), Verdict::Reply);
            assert_eq!(&out[0..6], &GUEST);
            assert_eq!(&out[6..12], &g.mac);
            let (h, m) = answer(&out);
            assert_eq!((h.source_addr(), h.destination_addr(), h.hop_limit), (target, guest_ll(), 255));
            assert_eq!(m[0], 136);
            assert_eq!(m[4], 0xe0, "R, S and O");
            assert_eq!(&m[8..24], &target.octets());
            assert_eq!(&m[24..26], &[2, 1], "target link-layer address option");
            assert_eq!(&m[26..32], &g.mac);
        }
        // Unicast NS (neighbour unreachability detection), no SLLA: back to the frame's source.
        let f = icmp6(g.mac, a("fd00:7675:1::99"), g.ip, 255, &ns_msg(g.ip, None));
        assert_eq!(n.handle(&f, &mut out), Verdict::Reply);
        assert_eq!(&out[0..6], &GUEST);
        assert_eq!(answer(&out).0.destination_addr(), a("fd00:7675:1::99"));
    }

    #[test]
    fn dad_for_its_address_is_answered_to_all_nodes_unsolicited() {
        let n = ndp(false, false);
        let g = gw6();
        let sn = super::super::solicited_node(&g.ip);
        let mut out = Vec::new();
        let f = icmp6(multicast_mac(&sn), Ipv6Addr::UNSPECIFIED, sn, 255, &ns_msg(g.ip, None));
        assert_eq!(n.handle(&f, &mut out), Verdict::Reply);
        assert_eq!(&out[0..6], &[0x33, 0x33, 0, 0, 0, 1]);
        let (h, m) = answer(&out);
        assert_eq!(h.destination_addr(), ALL_NODES);
        assert_eq!(m[4], 0xa0, "R and O, not S");
        // From :: with a source link-layer option, or to a non-solicited-node group: invalid.
        let f = icmp6(multicast_mac(&sn), Ipv6Addr::UNSPECIFIED, sn, 255, &ns_msg(g.ip, Some(GUEST)));
        assert_eq!(n.handle(&f, &mut out), Verdict::Drop(Ipv6Drop::BadNd));
        let f = icmp6(g.mac, Ipv6Addr::UNSPECIFIED, g.ip, 255, &ns_msg(g.ip, None));
        assert_eq!(n.handle(&f, &mut out), Verdict::Drop(Ipv6Drop::BadNd));
    }

    #[test]
    fn ns_for_others_is_not_mine_and_invalid_ns_is_dropped() {
        let n = ndp(false, false);
        let g = gw6();
        let mut out = Vec::new();
        let other = a("fd00:7675:1::7");
        let sn = super::super::solicited_node(&other);
        // A guest asking for another guest: not even looked at (another group).
        let f = icmp6(multicast_mac(&sn), guest_ll(), sn, 255, &ns_msg(other, Some(GUEST)));
        assert_eq!(n.handle(&f, &mut out), Verdict::NotMine);
        // To the gateway's group but for someone else (groups are shared by 24 bits).
        let gsn = super::super::solicited_node(&g.ip);
        let f = icmp6(multicast_mac(&gsn), guest_ll(), gsn, 255, &ns_msg(a("fd00:7675:2::1"), None));
        assert_eq!(n.handle(&f, &mut out), Verdict::NotMine);
        let good = icmp6(multicast_mac(&gsn), guest_ll(), gsn, 255, &ns_msg(g.ip, Some(GUEST)));
        // Hop limit below 255: it crossed a router.
        let f = icmp6(multicast_mac(&gsn), guest_ll(), gsn, 254, &ns_msg(g.ip, Some(GUEST)));
        assert_eq!(n.handle(&f, &mut out), Verdict::Drop(Ipv6Drop::BadHopLimit));
        // Bad checksum.
        let mut f = good.clone();
        *f.last_mut().unwrap() ^= 1;
        assert_eq!(n.handle(&f, &mut out), Verdict::Drop(Ipv6Drop::BadChecksum));
        // Non-zero code, a zero-length option, a multicast target, a multicast source.
        let mut m = ns_msg(g.ip, Some(GUEST));
        m[1] = 1;
        assert_eq!(n.handle(&icmp6(multicast_mac(&gsn), guest_ll(), gsn, 255, &m), &mut out), Verdict::Drop(Ipv6Drop::BadNd));
        let mut m = ns_msg(g.ip, Some(GUEST));
        m[25] = 0;
        assert_eq!(n.handle(&icmp6(multicast_mac(&gsn), guest_ll(), gsn, 255, &m), &mut out), Verdict::Drop(Ipv6Drop::BadNd));
        let mut m = ns_msg(g.ip, Some(GUEST));
        m[25] = 2;
        assert_eq!(
            n.handle(&icmp6(multicast_mac(&gsn), guest_ll(), gsn, 255, &m), &mut out),
            Verdict::Drop(Ipv6Drop::BadNd),
            "option past the end"
        );
        let m = ns_msg(ALL_NODES, None);
        assert_eq!(n.handle(&icmp6(multicast_mac(&gsn), guest_ll(), gsn, 255, &m), &mut out), Verdict::Drop(Ipv6Drop::BadNd));
        let m = ns_msg(g.ip, None);
        assert_eq!(n.handle(&icmp6(multicast_mac(&gsn), ALL_NODES, gsn, 255, &m), &mut out), Verdict::Drop(Ipv6Drop::BadNd));
        assert_eq!(n.handle(&good[..good.len() - 1], &mut out), Verdict::Drop(Ipv6Drop::BadHeader), "truncated");
        assert_eq!(n.handle(&good, &mut out), Verdict::Reply);
    }

    #[test]
    fn fragmented_nd_is_dropped() {
        let n = ndp(false, false);
        let g = gw6();
        let gsn = super::super::solicited_node(&g.ip);
        let good = icmp6(multicast_mac(&gsn), guest_ll(), gsn, 255, &ns_msg(g.ip, Some(GUEST)));
        // The same NS behind an atomic fragment header (RFC 6980 drops even those).
        let mut f = good[..54].to_vec();
        f[20] = 44;
        f.extend_from_slice(&Ipv6FragmentHeader::new(IpNumber::IPV6_ICMP, etherparse::IpFragOffset::ZERO, false, 1).to_bytes());
        f.extend_from_slice(&good[54..]);
        let plen = (f.len() - 54) as u16;
        f[18..20].copy_from_slice(&plen.to_be_bytes());
        let mut out = Vec::new();
        assert_eq!(n.handle(&f, &mut out), Verdict::Drop(Ipv6Drop::Fragmented));
        assert!(out.is_empty());
    }

    fn opts(m: &[u8], from: usize) -> Vec<(u8, Vec<u8>)> {
        let mut v = Vec::new();
        let mut o = &m[from..];
        while !o.is_empty() {
            let len = o[1] as usize * 8;
            assert!(len > 0 && len <= o.len(), "option lengths");
            v.push((o[0], o[..len].to_vec()));
            o = &o[len..];
        }
        v
    }

    #[test]
    fn rs_from_link_local_gets_a_unicast_ra_with_every_option() {
        let n = ndp(false, false);
        let g = gw6();
        let mut out = Vec::new();
        let f = icmp6(multicast_mac(&ALL_ROUTERS), guest_ll(), ALL_ROUTERS, 255, &rs_msg(Some(GUEST)));
        assert_eq!(n.handle(&f, &mut out), Verdict::Reply);
        assert_eq!(&out[0..6], &GUEST);
        let (h, m) = answer(&out);
        assert_eq!((h.source_addr(), h.destination_addr(), h.hop_limit), (g.link_local, guest_ll(), 255));
        assert_eq!((m[0], m[1]), (134, 0), "router advertisement");
        assert_eq!(m[4], 64, "cur hop limit");
        assert_eq!(m[5], 0, "neither M nor O without DHCPv6");
        assert_eq!(u16::from_be_bytes([m[6], m[7]]), 1800, "router lifetime");
        let o = opts(&m, 16);
        let kinds: Vec<u8> = o.iter().map(|(t, _)| *t).collect();
        assert_eq!(kinds, vec![1, 5, 3, 25, 31]);
        assert_eq!(&o[0].1[2..8], &g.mac);
        assert_eq!(u32::from_be_bytes(o[1].1[4..8].try_into().unwrap()), 1500);
        let pio = &o[2].1;
        assert_eq!(pio[2], 64);
        assert_eq!(pio[3], 0xc0, "L and A");
        assert_eq!(u32::from_be_bytes(pio[4..8].try_into().unwrap()), 86400);
        assert_eq!(u32::from_be_bytes(pio[8..12].try_into().unwrap()), 14400);
        assert_eq!(&pio[16..32], &a("fd00:7675:1::").octets());
        let rdnss = &o[3].1;
        assert_eq!(u32::from_be_bytes(rdnss[4..8].try_into().unwrap()), 1800);
        assert_eq!(&rdnss[8..24], &g.ip.octets());
        let dnssl = &o[4].1;
        assert_eq!(&dnssl[8..22], b"\x07example\x04test\x00");
        assert!(dnssl[22..].iter().all(|&b| b == 0));
    }

    #[test]
    fn rs_from_unspecified_is_answered_to_all_nodes() {
        let n = ndp(false, false);
        let mut out = Vec::new();
        let f = icmp6(multicast_mac(&ALL_ROUTERS), Ipv6Addr::UNSPECIFIED, ALL_ROUTERS, 255, &rs_msg(None));
        assert_eq!(n.handle(&f, &mut out), Verdict::Reply);
        assert_eq!(&out[0..6], &[0x33, 0x33, 0, 0, 0, 1]);
        assert_eq!(answer(&out).0.destination_addr(), ALL_NODES);
        let f = icmp6(multicast_mac(&ALL_ROUTERS), Ipv6Addr::UNSPECIFIED, ALL_ROUTERS, 255, &rs_msg(Some(GUEST)));
        assert_eq!(n.handle(&f, &mut out), Verdict::Drop(Ipv6Drop::BadNd), "SLLA from ::");
        let f = icmp6(multicast_mac(&ALL_ROUTERS), guest_ll(), ALL_ROUTERS, 64, &rs_msg(None));
        assert_eq!(n.handle(&f, &mut out), Verdict::Drop(Ipv6Drop::BadHopLimit));
    }

    #[test]
    fn isolated_and_dhcp6_networks_advertise_accordingly() {
        let mut out = Vec::new();
        ndp(true, false).unsolicited_ra(&mut out);
        let (h, m) = answer(&out);
        assert_eq!((h.source_addr(), h.destination_addr(), h.hop_limit), (gw6().link_local, ALL_NODES, 255));
        assert_eq!(&out[0..6], &[0x33, 0x33, 0, 0, 0, 1]);
        assert_eq!(u16::from_be_bytes([m[6], m[7]]), 0, "isolated: not a default router");
        assert_eq!(opts(&m, 16)[2].1[3], 0xc0);
        ndp(false, true).unsolicited_ra(&mut out);
        let (_, m) = answer(&out);
        assert_eq!(m[5], 0xc0, "M and O with DHCPv6");
        assert_eq!(u16::from_be_bytes([m[6], m[7]]), 1800);
        assert_eq!(opts(&m, 16)[2].1[3], 0x80, "L only: addresses come from DHCPv6");
        // No SLAAC for a prefix that is not a /64; no MTU option below 1280; no DNSSL
        // without a (valid) domain.
        let g = Gateway6::new(gateway_mac("x"), a("fd00:1::1"), 56);
        Ndp::new(g, RaConfig::new(false, false, 1000, 56), Some("bad..name")).unsolicited_ra(&mut out);
        let (_, m) = answer(&out);
        let o = opts(&m, 16);
        assert_eq!(o.iter().map(|(t, _)| *t).collect::<Vec<_>>(), vec![1, 3, 25]);
        assert_eq!(o[1].1[3], 0x80);
        assert_eq!(&o[1].1[16..32], &a("fd00:1::").octets());
    }

    #[test]
    fn answers_echo_to_its_addresses() {
        let n = ndp(false, false);
        let g = gw6();
        let mut out = Vec::new();
        for dst in [g.ip, g.link_local] {
            let mut f = Vec::new();
            etherparse::PacketBuilder::ethernet2(GUEST, g.mac)
                .ipv6(a("fd00:7675:1::99").octets(), dst.octets(), 64)
                .icmpv6_echo_request(0x1234, 9)
                .write(&mut f, b"abcdefgh")
                .unwrap();
            assert_eq!(n.handle(&f, &mut out), Verdict::Reply);
            assert_eq!(&out[0..6], &GUEST);
            let p = SlicedPacket::from_ethernet(&out).unwrap();
            let Some(NetSlice::Ipv6(ip)) = &p.net else { panic!() };
            assert_eq!(ip.header().source_addr(), dst);
            assert_eq!(ip.header().destination_addr(), a("fd00:7675:1::99"));
            let Some(TransportSlice::Icmpv6(icmp)) = p.transport else { panic!() };
            assert_eq!(icmp.icmp_type(), Icmpv6Type::EchoReply(etherparse::IcmpEchoHeader { id: 0x1234, seq: 9 }));
            assert_eq!(icmp.payload(), b"abcdefgh");
            answer(&out);
        }
        // To another address: not the gateway's.
        let mut f = Vec::new();
        etherparse::PacketBuilder::ethernet2(GUEST, [0x52, 0, 0, 0, 0, 1])
            .ipv6(a("fd00:7675:1::99").octets(), a("fd00:7675:1::98").octets(), 64)
            .icmpv6_echo_request(1, 1)
            .write(&mut f, b"x")
            .unwrap();
        assert_eq!(n.handle(&f, &mut out), Verdict::NotMine);
        // IPv4 and other upper layers (DNS over UDP to the gateway) are not ND's either.
        let mut f = Vec::new();
        etherparse::PacketBuilder::ethernet2(GUEST, g.mac)
            .ipv6(a("fd00:7675:1::99").octets(), g.ip.octets(), 64)
            .udp(5000, 53)
            .write(&mut f, b"q")
            .unwrap();
        assert_eq!(n.handle(&f, &mut out), Verdict::NotMine);
        assert_eq!(n.handle(&[0u8; 60], &mut out), Verdict::NotMine);
    }

    #[test]
    fn never_panics_on_truncated_or_mangled_frames() {
        let n = ndp(false, true);
        let g = gw6();
        let gsn = super::super::solicited_node(&g.ip);
        let frames = [
            icmp6(multicast_mac(&gsn), guest_ll(), gsn, 255, &ns_msg(g.ip, Some(GUEST))),
            icmp6(multicast_mac(&ALL_ROUTERS), guest_ll(), ALL_ROUTERS, 255, &rs_msg(Some(GUEST))),
            icmp6(g.mac, guest_ll(), g.ip, 64, &[128, 0, 0, 0, 0, 1, 0, 1, 9, 9]),
        ];
        let mut out = Vec::new();
        for f in &frames {
            for cut in 0..f.len() {
                let _ = n.handle(&f[..cut], &mut out);
            }
            for i in 14..f.len() {
                let mut m = f.clone();
                m[i] ^= 0xff;
                let _ = n.handle(&m, &mut out);
            }
        }
    }

    #[test]
    fn domains_encode_as_dns_names() {
        assert_eq!(encode_domain("a.b.").unwrap(), b"\x01a\x01b\x00\x00\x00\x00");
        assert_eq!(encode_domain("example.test").unwrap().len(), 16);
        assert!(encode_domain("").is_none());
        assert!(encode_domain(&"x".repeat(64)).is_none());
    }
}
