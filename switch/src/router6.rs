//! The gateway as an IPv6 router between the guest prefix (`gateway6`) and the uplink, for
//! `nat` and `route` networks whose uplink has an IPv6 address (`address6`). IPv6 is routed,
//! never translated, in both modes, as libvirt does; the modes differ in what comes in:
//! route mode applies the network's firewall rules, nat mode lets in only what belongs to
//! flows guests started (and ICMPv6 errors about them).
//!
//! Pure like [`crate::router`], whose [`Side`], [`Emit`] and [`Verdict`] it shares: frames
//! in (rewritten in place when forwarded), the time passed in, frames to send out. Inside,
//! the gateway's own ND, RA and echo stay with [`crate::ipv6::nd`]; this router adds, on the
//! uplink: neighbour solicitations and echo answered for its uplink address and link-local,
//! ND proxy for the guest prefix when asked, next-hop resolution with a bounded queue; and
//! between the two: hop limit, ICMPv6 errors (time exceeded, packet too big, unreachable),
//! the inbound firewall. Link-local and multicast packets are never forwarded.

use std::net::{IpAddr, Ipv6Addr};

use crate::arp::{Neighbors, Pending, Resolve};
use crate::firewall::{self, Firewall, Tuple};
use crate::gateway::{link_local, Gateway6};
use crate::ipv6::{self, finish_icmpv6, multicast_mac, solicited_node, start_icmpv6, ALL_NODES, IPPROTO_ICMPV6};
use crate::ledger::Owner;
use crate::proto::{ETH_P_IPV6, IPPROTO_TCP, IPPROTO_UDP};
use crate::router::{Emit, RouteMode, Side, Verdict, UPLINK_OWNER};
use crate::vnet::VnetHeader;
use crate::{DropReason, Mac};

pub const ICMP6_DEST_UNREACH: u8 = 1;
pub const ICMP6_PACKET_TOO_BIG: u8 = 2;
pub const ICMP6_TIME_EXCEEDED: u8 = 3;
pub const ICMP6_ECHO_REQUEST: u8 = 128;
pub const ICMP6_ECHO_REPLY: u8 = 129;
pub const ND_NEIGHBOR_SOLICIT: u8 = 135;
pub const ND_NEIGHBOR_ADVERT: u8 = 136;
/// Destination unreachable codes (RFC 4443 §3.1).
pub const UNREACH6_NO_ROUTE: u8 = 0;
pub const UNREACH6_ADDRESS: u8 = 3;
pub const UNREACH6_PORT: u8 = 4;

const OPT_SOURCE_LL: u8 = 1;
const OPT_TARGET_LL: u8 = 2;
const NA_ROUTER: u8 = 0x80;
const NA_SOLICITED: u8 = 0x40;
const NA_OVERRIDE: u8 = 0x20;
/// IPv6's minimum MTU: an ICMPv6 error quotes no more than fits in it (RFC 4443 §2.4 c).
const MIN_MTU: usize = 1280;
const ETH: usize = 14;
const IP6: usize = 40;

#[derive(Clone, Debug)]
pub struct Router6Config {
    pub mode: RouteMode,
    /// The gateway on the guest link (`gateway6`, the gateway's MAC).
    pub inside: Gateway6,
    /// The router's MAC on the uplink.
    pub outside_mac: Mac,
    /// The router's address and on-link prefix on the uplink's LAN (`address6`).
    pub outside: (Ipv6Addr, u8),
    /// The default next hop (`router6`): on the uplink's prefix, or link-local.
    pub next_hop: Option<Ipv6Addr>,
    /// Answer neighbour solicitations on the uplink for addresses of the guest prefix.
    pub proxy_ndp: bool,
    /// Largest IPv6 packet (header included) each side takes: the network's MTU inside, the
    /// uplink interface's outside. Larger packets are answered with "packet too big".
    pub inside_mtu: u16,
    pub outside_mtu: u16,
    /// Route mode's inbound rules and default (nat mode ignores them: replies only).
    pub firewall: Vec<firewall::Rule>,
    pub firewall_default: firewall::Action,
}

pub struct Router6 {
    pub cfg: Router6Config,
    /// The router's link-local address on the uplink (EUI-64 of its uplink MAC).
    outside_ll: Ipv6Addr,
    firewall: Firewall,
    inside_neighbors: Neighbors<Ipv6Addr>,
    outside_neighbors: Neighbors<Ipv6Addr>,
    last_tick: u64,
    last_expire: u64,
}

/// The most flows the firewall remembers as started by guests.
const FIREWALL_FLOWS: usize = 65536;

fn prefix_mask(prefix: u8) -> u128 {
    if prefix == 0 {
        0
    } else {
        u128::MAX << (128 - prefix.min(128) as u32)
    }
}

fn in_prefix(ip: &Ipv6Addr, net: &Ipv6Addr, prefix: u8) -> bool {
    u128::from(*ip) & prefix_mask(prefix) == u128::from(*net) & prefix_mask(prefix)
}

fn is_link_local(ip: &Ipv6Addr) -> bool {
    ip.segments()[0] & 0xffc0 == 0xfe80
}

/// Addresses that are never a routed packet's source or destination: unspecified, loopback,
/// multicast, link-local, IPv4-mapped.
fn unroutable(ip: &Ipv6Addr) -> bool {
    ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() || is_link_local(ip) || ip.to_ipv4_mapped().is_some()
}

fn addr_at(b: &[u8], at: usize) -> Option<Ipv6Addr> {
    let o: [u8; 16] = b.get(at..at + 16)?.try_into().ok()?;
    Some(Ipv6Addr::from(o))
}

/// The ports (or echo identifier, as both) of an upper-layer header, for the firewall.
fn ports(proto: u8, l4: &[u8]) -> Option<(u16, u16)> {
    match proto {
        IPPROTO_TCP | IPPROTO_UDP if l4.len() >= 4 => Some((u16::from_be_bytes([l4[0], l4[1]]), u16::from_be_bytes([l4[2], l4[3]]))),
        IPPROTO_ICMPV6 if l4.len() >= 8 && matches!(l4[0], ICMP6_ECHO_REQUEST | ICMP6_ECHO_REPLY) => {
            let id = u16::from_be_bytes([l4[4], l4[5]]);
            Some((id, id))
        }
        _ => None,
    }
}

/// Parses the source link-layer (or target link-layer) option among ND options: Ok(None)
/// without one, Err for a malformed option list (RFC 4861 §4.6: no zero lengths, none past
/// the end).
fn ll_option(mut opts: &[u8], kind: u8) -> Result<Option<Mac>, ()> {
    let mut found = None;
    while !opts.is_empty() {
        let len = *opts.get(1).ok_or(())? as usize * 8;
        if len == 0 || len > opts.len() {
            return Err(());
        }
        if opts[0] == kind && len >= 8 {
            let mac: Mac = opts[2..8].try_into().map_err(|_| ())?;
            if !crate::is_multicast(&mac) && mac != [0; 6] {
                found = Some(mac);
            }
        }
        opts = &opts[len..];
    }
    Ok(found)
}

/// A validated NS or NA (RFC 4861 §7.1): its target and the link-layer address it carries.
struct Nd {
    kind: u8,
    src: Ipv6Addr,
    dst: Ipv6Addr,
    src_mac: Mac,
    target: Ipv6Addr,
    /// The source (NS) or target (NA) link-layer address option.
    lladdr: Option<Mac>,
    solicited: bool,
}

/// Parses an NS or NA in `frame`; Ok(None) for anything else that is well-formed IPv6,
/// Err(()) for invalid ND.
fn parse_nd(frame: &[u8]) -> Result<Option<Nd>, ()> {
    nd_of(&ipv6::parse(frame).map_err(|_| ())?)
}

/// The NS or NA a parsed packet carries, as [`parse_nd`].
fn nd_of(p: &ipv6::Packet) -> Result<Option<Nd>, ()> {
    if p.proto != IPPROTO_ICMPV6 || !matches!(p.payload.first(), Some(&ND_NEIGHBOR_SOLICIT | &ND_NEIGHBOR_ADVERT)) {
        return Ok(None);
    }
    let m = p.payload;
    if p.fragmented || p.hop_limit != 255 || m.len() < 24 || m[1] != 0 || !ipv6::icmpv6_checksum_ok(&p.src, &p.dst, m) {
        return Err(());
    }
    let target = addr_at(m, 8).ok_or(())?;
    let kind = m[0];
    let lladdr = ll_option(&m[24..], if kind == ND_NEIGHBOR_SOLICIT { OPT_SOURCE_LL } else { OPT_TARGET_LL })?;
    if target.is_multicast() || p.src.is_multicast() {
        return Err(());
    }
    let dad = p.src.is_unspecified();
    if kind == ND_NEIGHBOR_SOLICIT && dad && (lladdr.is_some() || !p.dst.is_multicast()) {
        return Err(());
    }
    if kind == ND_NEIGHBOR_ADVERT && (dad || (m[4] & NA_SOLICITED != 0 && p.dst.is_multicast())) {
        return Err(());
    }
    Ok(Some(Nd { kind, src: p.src, dst: p.dst, src_mac: p.src_mac, target, lladdr, solicited: m[4] & NA_SOLICITED != 0 }))
}

/// Builds a neighbour solicitation for `target` from `src` at `mac`, to its solicited-node
/// group.
fn build_ns(out: &mut Vec<u8>, mac: Mac, src: &Ipv6Addr, target: &Ipv6Addr) {
    let group = solicited_node(target);
    start_icmpv6(out, mac, multicast_mac(&group), src, &group, 255, 32);
    out.extend_from_slice(&[ND_NEIGHBOR_SOLICIT, 0, 0, 0, 0, 0, 0, 0]);
    out.extend_from_slice(&target.octets());
    out.extend_from_slice(&[OPT_SOURCE_LL, 1]);
    out.extend_from_slice(&mac);
    finish_icmpv6(out);
}

/// Builds a neighbour advertisement for `target` at `mac`, answering `ns`.
fn build_na(out: &mut Vec<u8>, mac: Mac, target: &Ipv6Addr, ns: &Nd, flags: u8) {
    let (dst_mac, dst, flags) = if ns.src.is_unspecified() {
        // A duplicate address detection probe: the answer goes to all nodes, unsolicited.
        (multicast_mac(&ALL_NODES), ALL_NODES, flags & !NA_SOLICITED)
    } else {
        (ns.lladdr.unwrap_or(ns.src_mac), ns.src, flags)
    };
    start_icmpv6(out, mac, dst_mac, target, &dst, 255, 32);
    out.extend_from_slice(&[ND_NEIGHBOR_ADVERT, 0, 0, 0, flags, 0, 0, 0]);
    out.extend_from_slice(&target.octets());
    out.extend_from_slice(&[OPT_TARGET_LL, 1]);
    out.extend_from_slice(&mac);
    finish_icmpv6(out);
}

/// Builds an ICMPv6 error (`kind`, `code`, the 32-bit `param`: the MTU for packet too big)
/// about the IPv6 packet `orig` (from its IPv6 header on), from `src` at `src_mac` to the
/// packet's sender at `dst_mac`. It quotes as much of the packet as fits in 1280 bytes.
/// False for packets that must not get an error (RFC 4443 §2.4 e): ICMPv6 errors, and those
/// from an unspecified, multicast or link-local source or to a multicast destination.
#[allow(clippy::too_many_arguments)]
pub fn icmp6_error(out: &mut Vec<u8>, src_mac: Mac, dst_mac: Mac, src: &Ipv6Addr, orig: &[u8], kind: u8, code: u8, param: u32) -> bool {
    out.clear();
    let (Some(osrc), Some(odst)) = (addr_at(orig, 8), addr_at(orig, 24)) else { return false };
    if orig.len() < IP6 || orig[0] >> 4 != 6 || unroutable(&osrc) || odst.is_multicast() {
        return false;
    }
    // An ICMPv6 error (types below 128) right after the fixed header gets none back.
    if orig[6] == IPPROTO_ICMPV6 && orig.get(IP6).is_some_and(|&t| t < 128) {
        return false;
    }
    let quoted = &orig[..orig.len().min(MIN_MTU - IP6 - 8)];
    start_icmpv6(out, src_mac, dst_mac, src, &osrc, 64, 0);
    out.extend_from_slice(&[kind, code, 0, 0]);
    out.extend_from_slice(&param.to_be_bytes());
    out.extend_from_slice(quoted);
    finish_icmpv6(out);
    true
}

impl Router6 {
    pub fn new(cfg: Router6Config) -> Router6 {
        // Nat mode: no rules and a default deny, so only what guests started comes back.
        let firewall = match cfg.mode {
            RouteMode::Nat => Firewall::new(Vec::new(), firewall::Action::Deny, FIREWALL_FLOWS),
            RouteMode::Route => Firewall::new(cfg.firewall.clone(), cfg.firewall_default, FIREWALL_FLOWS),
        };
        Router6 {
            outside_ll: link_local(&cfg.outside_mac),
            cfg,
            firewall,
            inside_neighbors: Neighbors::new(),
            outside_neighbors: Neighbors::new(),
            last_tick: 0,
            last_expire: 0,
        }
    }

    /// The router's link-local address on the uplink.
    pub fn outside_link_local(&self) -> Ipv6Addr {
        self.outside_ll
    }

    /// The MAC of a neighbour on the uplink's LAN, if known.
    pub fn outside_neighbor(&self, ip: Ipv6Addr, now: u64) -> Option<Mac> {
        self.outside_neighbors.lookup(ip, now)
    }

    /// Neighbours known or being resolved on each side (guests, uplink), and frames waiting.
    pub fn neighbor_counts(&self) -> (usize, usize, usize) {
        (self.inside_neighbors.len(), self.outside_neighbors.len(), self.inside_neighbors.queued() + self.outside_neighbors.queued())
    }

    fn is_outside_mine(&self, ip: &Ipv6Addr) -> bool {
        *ip == self.cfg.outside.0 || *ip == self.outside_ll
    }

    /// An address of the guest prefix a guest may hold (not the gateway's, not the
    /// subnet-router anycast address).
    fn guest_addr(&self, ip: &Ipv6Addr) -> bool {
        let g = &self.cfg.inside;
        g.on_link(ip) && !unroutable(ip) && *ip != g.ip && u128::from(*ip) & !prefix_mask(g.prefix) != 0
    }

    fn outside_next_hop(&self, dst: &Ipv6Addr) -> Option<Ipv6Addr> {
        let (me, prefix) = self.cfg.outside;
        if in_prefix(dst, &me, prefix) {
            return Some(*dst);
        }
        self.cfg.next_hop
    }

    #[allow(clippy::too_many_arguments)]
    fn icmp_error(&self, from: Side, eth_src: Mac, ip: &[u8], kind: u8, code: u8, param: u32, emit: &mut Vec<Emit>) {
        let (mac, src) = match from {
            Side::Guests => (self.cfg.inside.mac, self.cfg.inside.ip),
            Side::Uplink => (self.cfg.outside_mac, self.cfg.outside.0),
        };
        let mut f = Vec::new();
        if icmp6_error(&mut f, mac, eth_src, &src, ip, kind, code, param) {
            emit.push(Emit { to: from, hdr: VnetHeader::default(), frame: f });
        }
    }

    fn echo_reply(&self, to: Side, frame: &[u8], emit: &mut Vec<Emit>) {
        let Ok(p) = ipv6::parse(frame) else { return };
        let m = p.payload;
        if p.proto != IPPROTO_ICMPV6 || m.len() < 8 || m[0] != ICMP6_ECHO_REQUEST || m[1] != 0 || p.fragmented {
            return;
        }
        if p.src.is_multicast() || p.src.is_unspecified() || !ipv6::icmpv6_checksum_ok(&p.src, &p.dst, m) {
            return;
        }
        let my_mac = if to == Side::Uplink { self.cfg.outside_mac } else { self.cfg.inside.mac };
        let mut out = Vec::new();
        start_icmpv6(&mut out, my_mac, p.src_mac, &p.dst, &p.src, 64, m.len() as u16);
        let at = out.len();
        out.extend_from_slice(m);
        out[at] = ICMP6_ECHO_REPLY;
        finish_icmpv6(&mut out);
        emit.push(Emit { to, hdr: VnetHeader::default(), frame: out });
    }

    /// Sends a forwarded frame toward `next_hop` on `side`: with its MAC if known, else after
    /// neighbour solicitation (the frame waits in a bounded queue).
    #[allow(clippy::too_many_arguments)]
    fn send_to_next_hop(
        &mut self,
        side: Side,
        next_hop: Ipv6Addr,
        frame: &mut [u8],
        hdr: &VnetHeader,
        now: u64,
        owner: Owner,
        emit: &mut Vec<Emit>,
    ) -> Verdict {
        let (my_mac, my_ip, neighbors) = match side {
            Side::Guests => (self.cfg.inside.mac, self.cfg.inside.link_local, &mut self.inside_neighbors),
            Side::Uplink => {
                let src = if is_link_local(&next_hop) { self.outside_ll } else { self.cfg.outside.0 };
                (self.cfg.outside_mac, src, &mut self.outside_neighbors)
            }
        };
        frame[6..12].copy_from_slice(&my_mac);
        match neighbors.resolve(next_hop, || (*hdr, frame.to_vec()), now, owner) {
            Resolve::Known(mac) => {
                frame[0..6].copy_from_slice(&mac);
                Verdict::Forward(side)
            }
            Resolve::Request => {
                let mut f = Vec::new();
                build_ns(&mut f, my_mac, &my_ip, &next_hop);
                emit.push(Emit { to: side, hdr: VnetHeader::default(), frame: f });
                Verdict::Consumed
            }
            Resolve::Waiting => Verdict::Consumed,
        }
    }

    fn release(side: Side, mac: Mac, frames: Vec<Pending>, emit: &mut Vec<Emit>) {
        for (hdr, mut frame) in frames {
            frame[0..6].copy_from_slice(&mac);
            emit.push(Emit { to: side, hdr, frame });
        }
    }

    /// A neighbour solicitation or advertisement from the guest on port `port` (the gateway
    /// answers solicitations itself, in [`crate::ipv6::nd`]): the router learns the guest's
    /// MAC and releases what waited for it. Anything else is ignored.
    pub fn guest_nd(&mut self, port: Owner, frame: &[u8], now: u64, emit: &mut Vec<Emit>) {
        let Ok(Some(nd)) = parse_nd(frame) else { return };
        let (ip, mac) = match nd.kind {
            ND_NEIGHBOR_SOLICIT => (nd.src, nd.lladdr),
            _ => (nd.target, nd.lladdr.or(Some(nd.src_mac))),
        };
        let Some(mac) = mac else { return };
        if !self.guest_addr(&ip) {
            return;
        }
        let for_us = nd.kind == ND_NEIGHBOR_ADVERT || self.cfg.inside.is_mine(&nd.target);
        let released =
            if for_us { self.inside_neighbors.learn(ip, mac, now, port) } else { self.inside_neighbors.refresh(ip, mac, now, port) };
        Self::release(Side::Guests, mac, released, emit);
    }

    /// An IPv6 frame from the guest on port `port` to the gateway's MAC whose destination is
    /// not one of the gateway's own addresses: route it. What it makes the router remember
    /// (a neighbour, a firewall flow) counts against that port's quota.
    pub fn from_guest(
        &mut self,
        port: Owner,
        frame: &mut [u8],
        hdr: &VnetHeader,
        now: u64,
        emit: &mut Vec<Emit>,
    ) -> Result<Verdict, DropReason> {
        let p = ipv6::parse(frame).map_err(|_| DropReason::BadIpHeader)?;
        let (src, dst, src_mac, proto, hop_limit) = (p.src, p.dst, p.src_mac, p.proto, p.hop_limit);
        let tuple = Tuple { proto, src: IpAddr::V6(src), dst: IpAddr::V6(dst), ports: ports(proto, p.payload) };
        if !self.guest_addr(&src) || unroutable(&dst) || self.cfg.inside.is_mine(&dst) {
            return Err(DropReason::NoRoute);
        }
        if self.inside_neighbors.lookup(src, now) != Some(src_mac) {
            // Replies to this guest need no solicitation.
            let released = self.inside_neighbors.learn(src, src_mac, now, port);
            Self::release(Side::Guests, src_mac, released, emit);
        }
        if self.is_outside_mine(&dst) {
            // A guest pinging the uplink address: the router answers as that address.
            self.echo_reply(Side::Guests, frame, emit);
            return Ok(Verdict::Consumed);
        }
        let (side, next_hop, mtu) = if self.cfg.inside.on_link(&dst) {
            (Side::Guests, dst, self.cfg.inside_mtu)
        } else {
            match self.outside_next_hop(&dst) {
                Some(nh) => (Side::Uplink, nh, self.cfg.outside_mtu),
                None => {
                    self.icmp_error(Side::Guests, src_mac, &frame[ETH..], ICMP6_DEST_UNREACH, UNREACH6_NO_ROUTE, 0, emit);
                    return Err(DropReason::NoRoute);
                }
            }
        };
        if hop_limit <= 1 {
            self.icmp_error(Side::Guests, src_mac, &frame[ETH..], ICMP6_TIME_EXCEEDED, 0, 0, emit);
            return Err(DropReason::TtlExceeded);
        }
        if too_big(frame, hdr, mtu) {
            self.icmp_error(Side::Guests, src_mac, &frame[ETH..], ICMP6_PACKET_TOO_BIG, 0, mtu as u32, emit);
            return Err(DropReason::PacketTooBig);
        }
        if side == Side::Uplink {
            self.firewall.outbound_tuple(&tuple, now, port);
        }
        frame[ETH + 7] = hop_limit - 1;
        Ok(self.send_to_next_hop(side, next_hop, frame, hdr, now, port, emit))
    }

    /// A frame from the uplink's LAN: ND and echo for the router's uplink addresses, ND proxy,
    /// and packets routed to guests through the firewall. `NotMine` for frames that are not
    /// IPv6 or not addressed to the router (another host's, multicast it does not take).
    pub fn from_uplink(&mut self, frame: &mut [u8], hdr: &VnetHeader, now: u64, emit: &mut Vec<Emit>) -> Result<Verdict, DropReason> {
        if frame.len() < ETH || frame[12..14] != ETH_P_IPV6.to_be_bytes() {
            return Ok(Verdict::NotMine);
        }
        let dst_mac = crate::dst_mac(frame);
        let to_me = dst_mac == self.cfg.outside_mac;
        if !to_me && !crate::gateway::is_ipv6_multicast(&dst_mac) {
            return Ok(Verdict::NotMine);
        }
        // Broken IPv6 to our MAC is counted; to a multicast group, it is the LAN's business.
        let p = match ipv6::parse(frame) {
            Ok(p) => p,
            Err(_) if to_me => return Err(DropReason::BadIpHeader),
            Err(_) => return Ok(Verdict::NotMine),
        };
        match nd_of(&p) {
            Ok(Some(nd)) => return Ok(self.outside_nd(&nd, now, emit)),
            Ok(None) => {}
            Err(()) if to_me => return Err(DropReason::BadIpHeader),
            Err(()) => return Ok(Verdict::NotMine),
        }
        if !to_me {
            return Ok(Verdict::NotMine);
        }
        let (src, dst, src_mac, proto, hop_limit) = (p.src, p.dst, p.src_mac, p.proto, p.hop_limit);
        if self.is_outside_mine(&dst) {
            if proto == IPPROTO_ICMPV6 && p.payload.first() == Some(&ICMP6_ECHO_REQUEST) {
                self.echo_reply(Side::Uplink, frame, emit);
                return Ok(Verdict::Consumed);
            }
            return Err(DropReason::NoRoute);
        }
        // Never routed: spoofed guest sources, link-local or multicast either way, the
        // gateway's own guest-side addresses.
        if unroutable(&src) || self.cfg.inside.on_link(&src) || unroutable(&dst) || !self.guest_addr(&dst) {
            return Err(DropReason::NoRoute);
        }
        let tuple = Tuple { proto, src: IpAddr::V6(src), dst: IpAddr::V6(dst), ports: ports(proto, p.payload) };
        let verdict =
            if self.error_about_a_guest_flow(&p, now) { firewall::Action::Allow } else { self.firewall.inbound_tuple(&tuple, now) };
        match verdict {
            firewall::Action::Allow => {}
            firewall::Action::Deny => return Err(DropReason::Firewall),
            firewall::Action::Reject => {
                self.icmp_error(Side::Uplink, src_mac, &frame[ETH..], ICMP6_DEST_UNREACH, UNREACH6_PORT, 0, emit);
                return Err(DropReason::Firewall);
            }
        }
        if hop_limit <= 1 {
            self.icmp_error(Side::Uplink, src_mac, &frame[ETH..], ICMP6_TIME_EXCEEDED, 0, 0, emit);
            return Err(DropReason::TtlExceeded);
        }
        let mtu = self.cfg.inside_mtu;
        if too_big(frame, hdr, mtu) {
            self.icmp_error(Side::Uplink, src_mac, &frame[ETH..], ICMP6_PACKET_TOO_BIG, 0, mtu as u32, emit);
            return Err(DropReason::PacketTooBig);
        }
        frame[ETH + 7] = hop_limit - 1;
        Ok(self.send_to_next_hop(Side::Guests, dst, frame, hdr, now, UPLINK_OWNER, emit))
    }

    /// Whether an inbound ICMPv6 error (unreachable, too big, time exceeded, parameter
    /// problem) quotes a packet of a flow a guest started: path MTU discovery needs those.
    fn error_about_a_guest_flow(&self, p: &ipv6::Packet, now: u64) -> bool {
        let m = p.payload;
        if p.proto != IPPROTO_ICMPV6 || m.len() < 8 + IP6 || !(1..=4).contains(&m[0]) {
            return false;
        }
        let inner = &m[8..];
        let (Some(isrc), Some(idst)) = (addr_at(inner, 8), addr_at(inner, 24)) else { return false };
        if isrc != p.dst || inner[0] >> 4 != 6 {
            return false;
        }
        // The quoted packet went out: its reply would come from `idst` to `isrc`.
        let proto = inner[6];
        let Some((s, d)) = ports(proto, &inner[IP6..]) else { return false };
        let (s, d) = if proto == IPPROTO_ICMPV6 { (s, d) } else { (d, s) };
        self.firewall.is_reply(&Tuple { proto, src: IpAddr::V6(idst), dst: IpAddr::V6(isrc), ports: Some((s, d)) }, now)
    }

    /// ND from the uplink's LAN: solicitations for the router's addresses (or, with ND proxy,
    /// the guest prefix's) are answered; the sender, or an advertised target the router was
    /// resolving, is learned.
    fn outside_nd(&mut self, nd: &Nd, now: u64, emit: &mut Vec<Emit>) -> Verdict {
        if nd.kind == ND_NEIGHBOR_ADVERT {
            if self.is_outside_mine(&nd.target) {
                // Someone else claims our address: nothing to learn.
                return Verdict::Consumed;
            }
            let mac = nd.lladdr.unwrap_or(nd.src_mac);
            // Only an answer to what the router asked for, or a refresh of what it knows.
            let released = self.outside_neighbors.refresh(nd.target, mac, now, UPLINK_OWNER);
            Self::release(Side::Uplink, mac, released, emit);
            return if nd.solicited && self.is_outside_mine(&nd.dst) { Verdict::Consumed } else { Verdict::NotMine };
        }
        let for_me = self.is_outside_mine(&nd.target);
        let proxied = !for_me && self.cfg.proxy_ndp && self.guest_addr(&nd.target);
        // Its sender, at a unicast address (global or link-local), is a neighbour.
        if !unroutable(&nd.src) || is_link_local(&nd.src) {
            if let Some(mac) = nd.lladdr {
                let released = if for_me {
                    self.outside_neighbors.learn(nd.src, mac, now, UPLINK_OWNER)
                } else {
                    self.outside_neighbors.refresh(nd.src, mac, now, UPLINK_OWNER)
                };
                Self::release(Side::Uplink, mac, released, emit);
            }
        }
        if !(for_me || proxied) {
            return Verdict::NotMine;
        }
        // A proxy does not override the owner's own answer (RFC 4861 §7.2.8).
        let flags = NA_ROUTER | NA_SOLICITED | if for_me { NA_OVERRIDE } else { 0 };
        let mut f = Vec::new();
        build_na(&mut f, self.cfg.outside_mac, &nd.target, nd, flags);
        emit.push(Emit { to: Side::Uplink, hdr: VnetHeader::default(), frame: f });
        Verdict::Consumed
    }

    /// Timers: solicitation retries and give-ups (address unreachable to the senders of what
    /// waited), neighbour expiry. Call it every 100 ms or so.
    pub fn tick(&mut self, now: u64, emit: &mut Vec<Emit>) {
        if now.saturating_sub(self.last_tick) < 100 {
            return;
        }
        self.last_tick = now;
        for side in [Side::Guests, Side::Uplink] {
            let n = match side {
                Side::Guests => &mut self.inside_neighbors,
                Side::Uplink => &mut self.outside_neighbors,
            };
            let (ask, failed) = n.tick(now);
            for target in ask {
                let (mac, src) = match side {
                    Side::Guests => (self.cfg.inside.mac, self.cfg.inside.link_local),
                    Side::Uplink => (self.cfg.outside_mac, if is_link_local(&target) { self.outside_ll } else { self.cfg.outside.0 }),
                };
                let mut f = Vec::new();
                build_ns(&mut f, mac, &src, &target);
                emit.push(Emit { to: side, hdr: VnetHeader::default(), frame: f });
            }
            for (_, frame) in failed {
                self.unreachable(&frame, now, emit);
            }
        }
        if now.saturating_sub(self.last_expire) >= 1000 {
            self.last_expire = now;
            self.inside_neighbors.expire(now);
            self.outside_neighbors.expire(now);
        }
    }

    /// Address unreachable for a frame whose next hop never answered, to its sender: a guest
    /// for a frame going out, the LAN sender (through its next hop) for one coming in.
    fn unreachable(&self, frame: &[u8], now: u64, emit: &mut Vec<Emit>) {
        let Some(src) = addr_at(frame, ETH + 8) else { return };
        let (side, via, n) = if self.guest_addr(&src) {
            (Side::Guests, Some(src), &self.inside_neighbors)
        } else {
            (Side::Uplink, self.outside_next_hop(&src), &self.outside_neighbors)
        };
        if let Some(mac) = via.and_then(|v| n.lookup(v, now)) {
            self.icmp_error(side, mac, &frame[ETH..], ICMP6_DEST_UNREACH, UNREACH6_ADDRESS, 0, emit);
        }
    }
}

/// Whether an IPv6 packet is larger than `mtu` on the next link. A TSO frame is cut into
/// segments of `gso_size` after its headers: those are what must fit.
fn too_big(frame: &[u8], hdr: &VnetHeader, mtu: u16) -> bool {
    // The packet's own length, not the frame's (which may be padded).
    let ip_len = IP6 + frame.get(ETH + 4..ETH + 6).map_or(0, |l| u16::from_be_bytes([l[0], l[1]]) as usize);
    if hdr.is_gso() {
        let headers = (hdr.hdr_len as usize).max(hdr.csum_start as usize + 20).saturating_sub(ETH);
        return headers + hdr.gso_size as usize > mtu as usize && ip_len > mtu as usize;
    }
    ip_len > mtu as usize
}

#[cfg(test)]
#[path = "router6_tests.rs"]
mod tests;
