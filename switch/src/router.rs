//! The gateway as a router between the guest subnet ("inside") and the uplink ("outside"),
//! for `nat` and `route` networks. Pure: the caller hands in frames (rewritten in place when
//! they are forwarded) and the time, and sends what it is told to send.
//!
//! Inside, the gateway already answers ARP and ping at its address ([`crate::gateway`]); the
//! router adds, outside: ARP and ping for the uplink address, proxy ARP for the guest subnet
//! when asked, next-hop resolution with a bounded queue; and between the two: TTL, ICMP
//! errors, NAT (masquerade and port forwards) or plain routing with an inbound firewall.

use std::net::Ipv4Addr;

use crate::arp::{self, Arp, Neighbors, Resolve, OP_REPLY, OP_REQUEST};
use crate::firewall::{self, Firewall};
use crate::gateway::Gateway;
use crate::ipv4::{self, in_subnet, ICMP_DEST_UNREACH, ICMP_ECHO_REQUEST, ICMP_TIME_EXCEEDED, UNREACH_HOST, UNREACH_NET, UNREACH_PORT};
use crate::ledger::Owner;
use crate::nat::{NatConfig, NatTable};
use crate::proto::{ETH_P_ARP, ETH_P_IPV4, IPPROTO_ICMP, IPPROTO_TCP};
use crate::vnet::VnetHeader;
use crate::{DropReason, Mac};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteMode {
    /// Guests go out behind the uplink address; only replies and port forwards come in.
    Nat,
    /// Guests keep their addresses; the outside reaches them, through the firewall.
    Route,
}

/// A network behind a guest (libvirt `<route address prefix gateway/>`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StaticRoute {
    pub net: Ipv4Addr,
    pub prefix: u8,
    pub via: Ipv4Addr,
}

#[derive(Clone, Debug)]
pub struct RouterConfig {
    pub mode: RouteMode,
    /// The gateway on the guest subnet.
    pub inside: Gateway,
    /// The router's MAC on the uplink.
    pub outside_mac: Mac,
    /// The default next hop on the uplink's LAN.
    pub next_hop: Option<Ipv4Addr>,
    pub routes: Vec<StaticRoute>,
    /// Answer ARP on the uplink for addresses of the guest subnet (and static routes).
    pub proxy_arp: bool,
    pub nat: NatConfig,
    pub firewall: Vec<firewall::Rule>,
    pub firewall_default: firewall::Action,
}

/// Where a frame goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Guests,
    Uplink,
}

/// A frame the router made or released (an ARP packet, an ICMP error, a frame whose next hop
/// just answered), to be sent to `to`.
#[derive(Debug)]
pub struct Emit {
    pub to: Side,
    pub hdr: VnetHeader,
    pub frame: Vec<u8>,
}

/// What became of a frame handed to the router.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Rewritten in place; send it to this side.
    Forward(Side),
    /// Answered, queued or otherwise taken care of.
    Consumed,
    /// Not addressed to the router (a LAN frame between other hosts): ignore, do not count.
    NotMine,
}

pub struct Router {
    pub cfg: RouterConfig,
    /// The uplink address and prefix, once known (static, or leased over the uplink).
    outside: Option<(Ipv4Addr, u8)>,
    pub nat: NatTable,
    firewall: Firewall,
    inside_neighbors: Neighbors,
    outside_neighbors: Neighbors,
    last_tick: u64,
    last_expire: u64,
}

/// The most flows the route-mode firewall remembers as started by guests.
const FIREWALL_FLOWS: usize = 65536;

/// The owner, for the router's bounded tables, of what the uplink's side causes (guests'
/// ports are owners by their index).
pub const UPLINK_OWNER: Owner = Owner::MAX;

fn ethertype(frame: &[u8]) -> u16 {
    u16::from_be_bytes([frame[12], frame[13]])
}

impl Router {
    pub fn new(cfg: RouterConfig, outside: Option<(Ipv4Addr, u8)>) -> Router {
        let nat = NatTable::new(cfg.nat.clone(), outside.map_or(Ipv4Addr::UNSPECIFIED, |o| o.0));
        let firewall = Firewall::new(cfg.firewall.clone(), cfg.firewall_default, FIREWALL_FLOWS);
        Router {
            cfg,
            outside,
            nat,
            firewall,
            inside_neighbors: Neighbors::new(),
            outside_neighbors: Neighbors::new(),
            last_tick: 0,
            last_expire: 0,
        }
    }

    pub fn outside(&self) -> Option<(Ipv4Addr, u8)> {
        self.outside
    }

    /// The MAC of a neighbor on the uplink's LAN, if known.
    pub fn outside_neighbor(&self, ip: Ipv4Addr, now: u64) -> Option<Mac> {
        self.outside_neighbors.lookup(ip, now)
    }

    /// Sets (or clears) the uplink address, as a DHCP lease comes or goes, and announces it
    /// with a gratuitous ARP.
    pub fn set_outside(&mut self, addr: Option<(Ipv4Addr, u8)>, next_hop: Option<Ipv4Addr>, emit: &mut Vec<Emit>) {
        if addr != self.outside {
            self.outside_neighbors = Neighbors::new();
        }
        self.outside = addr;
        self.cfg.next_hop = next_hop;
        self.nat.set_external(addr.map_or(Ipv4Addr::UNSPECIFIED, |a| a.0));
        if let Some((ip, _)) = addr {
            let mut f = Vec::new();
            arp::build(&mut f, &Arp { op: OP_REQUEST, sender_mac: self.cfg.outside_mac, sender_ip: ip, target_mac: [0; 6], target_ip: ip });
            emit.push(Emit { to: Side::Uplink, hdr: VnetHeader::default(), frame: f });
        }
    }

    fn inside_net(&self, ip: Ipv4Addr) -> bool {
        let g = &self.cfg.inside;
        in_subnet(ip, g.ip, g.prefix)
    }

    /// The inside next hop for `dst`: itself on the guest subnet, a guest for a static route.
    fn inside_next_hop(&self, dst: Ipv4Addr) -> Option<Ipv4Addr> {
        if self.inside_net(dst) {
            return Some(dst);
        }
        self.cfg.routes.iter().filter(|r| in_subnet(dst, r.net, r.prefix)).max_by_key(|r| r.prefix).map(|r| r.via)
    }

    fn outside_next_hop(&self, dst: Ipv4Addr) -> Option<Ipv4Addr> {
        let (ip, prefix) = self.outside?;
        if in_subnet(dst, ip, prefix) {
            return Some(dst);
        }
        self.cfg.next_hop
    }

    /// An ICMP error about `ip` (the offending packet) back to its sender, from the router's
    /// address on the side it came from.
    fn icmp_error(&mut self, from: Side, eth_src: Mac, ip: &[u8], kind: u8, code: u8, emit: &mut Vec<Emit>) {
        let (my_mac, my_ip) = match from {
            Side::Guests => (self.cfg.inside.mac, self.cfg.inside.ip),
            Side::Uplink => match self.outside {
                Some((ip, _)) => (self.cfg.outside_mac, ip),
                None => return,
            },
        };
        let mut f = Vec::new();
        if ipv4::icmp_error(&mut f, my_mac, eth_src, my_ip, ip, kind, code, 1500) {
            emit.push(Emit { to: from, hdr: VnetHeader::default(), frame: f });
        }
    }

    /// Sends a forwarded frame toward `next_hop` on `side`: with its MAC if known, else after
    /// ARP (the frame waits in a bounded queue).
    #[allow(clippy::too_many_arguments)]
    fn send_to_next_hop(
        &mut self,
        side: Side,
        next_hop: Ipv4Addr,
        frame: &mut [u8],
        hdr: &VnetHeader,
        now: u64,
        owner: Owner,
        emit: &mut Vec<Emit>,
    ) -> Verdict {
        let (my_mac, my_ip, neighbors) = match side {
            Side::Guests => (self.cfg.inside.mac, self.cfg.inside.ip, &mut self.inside_neighbors),
            Side::Uplink => (self.cfg.outside_mac, self.outside.map_or(Ipv4Addr::UNSPECIFIED, |o| o.0), &mut self.outside_neighbors),
        };
        frame[6..12].copy_from_slice(&my_mac);
        match neighbors.resolve(next_hop, || (*hdr, frame.to_vec()), now, owner) {
            Resolve::Known(mac) => {
                frame[0..6].copy_from_slice(&mac);
                Verdict::Forward(side)
            }
            Resolve::Request => {
                let mut f = Vec::new();
                arp::build(&mut f, &Arp { op: OP_REQUEST, sender_mac: my_mac, sender_ip: my_ip, target_mac: [0; 6], target_ip: next_hop });
                emit.push(Emit { to: side, hdr: VnetHeader::default(), frame: f });
                Verdict::Consumed
            }
            Resolve::Waiting => Verdict::Consumed,
        }
    }

    fn release(side: Side, mac: Mac, frames: Vec<arp::Pending>, emit: &mut Vec<Emit>) {
        for (hdr, mut frame) in frames {
            frame[0..6].copy_from_slice(&mac);
            emit.push(Emit { to: side, hdr, frame });
        }
    }

    /// An ARP packet from the guest on port `port` (any: the gateway's own replies are handled
    /// elsewhere): the router learns the sender and releases what waited for it.
    pub fn guest_arp(&mut self, port: Owner, frame: &[u8], now: u64, emit: &mut Vec<Emit>) {
        let Some(a) = arp::parse(frame) else { return };
        if !self.inside_net(a.sender_ip) || a.sender_ip == self.cfg.inside.ip {
            return;
        }
        let released = if a.target_ip == self.cfg.inside.ip {
            self.inside_neighbors.learn(a.sender_ip, a.sender_mac, now, port)
        } else {
            self.inside_neighbors.refresh(a.sender_ip, a.sender_mac, now, port)
        };
        Self::release(Side::Guests, a.sender_mac, released, emit);
    }

    /// An IPv4 frame from the guest on port `port` to the gateway's MAC, not for the
    /// gateway's own address: route it (and translate it, in NAT mode). What it makes the
    /// router remember (a neighbor, a firewall flow) counts against that port's quota.
    pub fn from_guest(
        &mut self,
        port: Owner,
        frame: &mut [u8],
        hdr: &VnetHeader,
        now: u64,
        emit: &mut Vec<Emit>,
    ) -> Result<Verdict, DropReason> {
        if frame.len() < 14 + 20 || ethertype(frame) != ETH_P_IPV4 {
            return Err(DropReason::BadIpHeader);
        }
        let src_mac: Mac = frame[6..12].try_into().unwrap_or([0; 6]);
        let gso = hdr.is_gso();
        let h = ipv4::parse(&frame[14..], gso)?;
        if ipv4::is_martian(h.src) || ipv4::is_martian(h.dst) || !self.inside_net(h.src) && self.inside_next_hop(h.src).is_none() {
            return Err(DropReason::NoRoute);
        }
        if self.inside_net(h.src) && self.inside_neighbors.lookup(h.src, now) != Some(src_mac) {
            // Replies to this guest need no ARP.
            let released = self.inside_neighbors.learn(h.src, src_mac, now, port);
            Self::release(Side::Guests, src_mac, released, emit);
        }
        if let Some((out_ip, out_prefix)) = self.outside.filter(|o| o.0 == h.dst) {
            // A guest pinging the uplink address: the router answers as that address.
            let me = Gateway { mac: self.cfg.inside.mac, ip: out_ip, prefix: out_prefix };
            let mut reply = Vec::new();
            if me.handle(frame, &mut reply) {
                emit.push(Emit { to: Side::Guests, hdr: VnetHeader::default(), frame: reply });
            }
            return Ok(Verdict::Consumed);
        }
        let (side, next_hop) = match self.inside_next_hop(h.dst) {
            Some(nh) => (Side::Guests, nh),
            None => match self.outside_next_hop(h.dst) {
                Some(nh) => (Side::Uplink, nh),
                None => {
                    self.icmp_error(Side::Guests, src_mac, &frame[14..], ICMP_DEST_UNREACH, UNREACH_NET, emit);
                    return Err(DropReason::NoRoute);
                }
            },
        };
        if !ipv4::decrement_ttl(&mut frame[14..]) {
            self.icmp_error(Side::Guests, src_mac, &frame[14..], ICMP_TIME_EXCEEDED, 0, emit);
            return Err(DropReason::TtlExceeded);
        }
        if side == Side::Uplink {
            match self.cfg.mode {
                RouteMode::Nat => self.nat.outbound(&mut frame[14..], hdr.needs_csum(), now)?,
                RouteMode::Route => self.firewall.outbound(&frame[14..], &h, now, port),
            }
        }
        Ok(self.send_to_next_hop(side, next_hop, frame, hdr, now, port, emit))
    }

    /// A frame from the uplink's LAN: ARP and ping for the uplink address, proxy ARP, NAT
    /// replies and port forwards, or packets routed to guests.
    pub fn from_uplink(&mut self, frame: &mut [u8], hdr: &VnetHeader, now: u64, emit: &mut Vec<Emit>) -> Result<Verdict, DropReason> {
        if frame.len() < 14 {
            return Err(DropReason::ShortFrame);
        }
        let dst: Mac = frame[0..6].try_into().unwrap_or([0; 6]);
        let src_mac: Mac = frame[6..12].try_into().unwrap_or([0; 6]);
        let Some((my_ip, my_prefix)) = self.outside else { return Ok(Verdict::NotMine) };
        match ethertype(frame) {
            ETH_P_ARP => return Ok(self.outside_arp(frame, my_ip, now, emit)),
            ETH_P_IPV4 if dst == self.cfg.outside_mac => {}
            _ => return Ok(Verdict::NotMine),
        }
        let gso = hdr.is_gso();
        let h = ipv4::parse(&frame[14..], gso)?;
        if ipv4::is_martian(h.src) || self.inside_net(h.src) {
            return Err(DropReason::NoRoute);
        }
        let inbound_nat = h.dst == my_ip && self.cfg.mode == RouteMode::Nat;
        if h.dst == my_ip {
            let is_echo = h.proto == IPPROTO_ICMP && frame.get(14 + h.ihl) == Some(&ICMP_ECHO_REQUEST);
            if is_echo {
                let me = Gateway { mac: self.cfg.outside_mac, ip: my_ip, prefix: my_prefix };
                let mut reply = Vec::new();
                if me.handle(frame, &mut reply) {
                    emit.push(Emit { to: Side::Uplink, hdr: VnetHeader::default(), frame: reply });
                }
                return Ok(Verdict::Consumed);
            }
            if !inbound_nat {
                return Err(DropReason::NoRoute);
            }
        } else if self.inside_next_hop(h.dst).is_none() {
            return Err(DropReason::NoRoute);
        } else if self.cfg.mode == RouteMode::Nat {
            // In NAT mode the LAN reaches guests only through the uplink address.
            return Err(DropReason::NatNoConnection);
        } else {
            match self.firewall.inbound(&frame[14..], &h, now) {
                firewall::Action::Allow => {}
                firewall::Action::Deny => return Err(DropReason::Firewall),
                firewall::Action::Reject => {
                    let mut f = Vec::new();
                    let made = if h.proto == IPPROTO_TCP {
                        ipv4::tcp_reset(&mut f, self.cfg.outside_mac, src_mac, &frame[14..14 + h.total])
                    } else {
                        ipv4::icmp_error(&mut f, self.cfg.outside_mac, src_mac, my_ip, &frame[14..], ICMP_DEST_UNREACH, UNREACH_PORT, 1500)
                    };
                    if made {
                        emit.push(Emit { to: Side::Uplink, hdr: VnetHeader::default(), frame: f });
                    }
                    return Err(DropReason::Firewall);
                }
            }
        }
        if !ipv4::decrement_ttl(&mut frame[14..]) {
            self.icmp_error(Side::Uplink, src_mac, &frame[14..], ICMP_TIME_EXCEEDED, 0, emit);
            return Err(DropReason::TtlExceeded);
        }
        if inbound_nat {
            self.nat.inbound(&mut frame[14..], hdr.needs_csum(), now)?;
        }
        let guest = ipv4::parse(&frame[14..], true).map(|h| h.dst)?;
        let next_hop = self.inside_next_hop(guest).ok_or(DropReason::NoRoute)?;
        Ok(self.send_to_next_hop(Side::Guests, next_hop, frame, hdr, now, UPLINK_OWNER, emit))
    }

    fn outside_arp(&mut self, frame: &[u8], my_ip: Ipv4Addr, now: u64, emit: &mut Vec<Emit>) -> Verdict {
        let Some(a) = arp::parse(frame) else { return Verdict::NotMine };
        if a.sender_ip == my_ip || self.inside_net(a.sender_ip) {
            return Verdict::NotMine;
        }
        let for_me = a.target_ip == my_ip;
        let proxied = !for_me
            && self.cfg.proxy_arp
            && a.op == OP_REQUEST
            && self.inside_next_hop(a.target_ip).is_some()
            && !a.sender_ip.is_unspecified();
        let released = if for_me {
            self.outside_neighbors.learn(a.sender_ip, a.sender_mac, now, UPLINK_OWNER)
        } else {
            self.outside_neighbors.refresh(a.sender_ip, a.sender_mac, now, UPLINK_OWNER)
        };
        Self::release(Side::Uplink, a.sender_mac, released, emit);
        if a.op == OP_REQUEST && (for_me || proxied) {
            let mut f = Vec::new();
            let reply = Arp {
                op: OP_REPLY,
                sender_mac: self.cfg.outside_mac,
                sender_ip: a.target_ip,
                target_mac: a.sender_mac,
                target_ip: a.sender_ip,
            };
            arp::build(&mut f, &reply);
            emit.push(Emit { to: Side::Uplink, hdr: VnetHeader::default(), frame: f });
        }
        if for_me || proxied {
            Verdict::Consumed
        } else {
            Verdict::NotMine
        }
    }

    /// Timers: ARP retries and give-ups (host unreachable to the senders of what waited),
    /// NAT and neighbor expiry. Call it every 100 ms or so.
    pub fn tick(&mut self, now: u64, emit: &mut Vec<Emit>) {
        if now.saturating_sub(self.last_tick) < 100 {
            return;
        }
        self.last_tick = now;
        for side in [Side::Guests, Side::Uplink] {
            let (my_mac, my_ip) = match side {
                Side::Guests => (self.cfg.inside.mac, self.cfg.inside.ip),
                Side::Uplink => match self.outside {
                    Some((ip, _)) => (self.cfg.outside_mac, ip),
                    None => continue,
                },
            };
            let n = match side {
                Side::Guests => &mut self.inside_neighbors,
                Side::Uplink => &mut self.outside_neighbors,
            };
            let (ask, failed) = n.tick(now);
            for target in ask {
                let mut f = Vec::new();
                arp::build(&mut f, &Arp { op: OP_REQUEST, sender_mac: my_mac, sender_ip: my_ip, target_mac: [0; 6], target_ip: target });
                emit.push(Emit { to: side, hdr: VnetHeader::default(), frame: f });
            }
            for (_, frame) in failed {
                self.unreachable(&frame, now, emit);
            }
        }
        if now.saturating_sub(self.last_expire) >= 1000 {
            self.last_expire = now;
            self.nat.expire(now);
            self.inside_neighbors.expire(now);
            self.outside_neighbors.expire(now);
        }
    }

    /// Host unreachable for a frame whose next hop never answered, to its original sender
    /// (a guest, when the frame was going out; the LAN sender, when it was coming in).
    fn unreachable(&mut self, frame: &[u8], now: u64, emit: &mut Vec<Emit>) {
        let Some(h) = frame.get(14..).and_then(|ip| ipv4::parse(ip, true).ok()) else { return };
        let going_out = frame[6..12] == self.cfg.outside_mac;
        let (side, sender) = if going_out && self.inside_net(h.src) { (Side::Guests, h.src) } else { (Side::Uplink, h.src) };
        let n = match side {
            Side::Guests => &self.inside_neighbors,
            Side::Uplink => &self.outside_neighbors,
        };
        let via = if side == Side::Uplink { self.outside_next_hop(sender) } else { Some(sender) };
        if let Some(mac) = via.and_then(|v| n.lookup(v, now)) {
            self.icmp_error(side, mac, &frame[14..], ICMP_DEST_UNREACH, UNREACH_HOST, emit);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firewall::{Action, Proto, Rule};
    use crate::ipv4::l4_checksum_ok;
    use crate::nat::PortForward;
    use crate::proto::IPPROTO_UDP;
    use etherparse::PacketBuilder;

    const GW_MAC: Mac = [2, 0x76, 0x75, 0, 0, 1];
    const UP_MAC: Mac = [2, 0x76, 0x75, 0, 0, 2];
    const GUEST_MAC: Mac = [0x52, 0x54, 0, 0, 0, 10];
    const LAN_MAC: Mac = [0x52, 0x54, 0, 0, 0, 99];
    const GUEST: [u8; 4] = [192, 168, 122, 10];
    const UPLINK_IP: [u8; 4] = [10, 10, 11, 50];
    const LAN_HOST: [u8; 4] = [10, 10, 11, 1];
    const FAR: [u8; 4] = [8, 8, 8, 8];

    fn router(mode: RouteMode) -> Router {
        let cfg = RouterConfig {
            mode,
            inside: Gateway { mac: GW_MAC, ip: Ipv4Addr::new(192, 168, 122, 1), prefix: 24 },
            outside_mac: UP_MAC,
            next_hop: Some(LAN_HOST.into()),
            routes: vec![StaticRoute { net: Ipv4Addr::new(172, 20, 0, 0), prefix: 16, via: GUEST.into() }],
            proxy_arp: false,
            nat: NatConfig {
                forwards: vec![PortForward { proto: IPPROTO_UDP, external: (5353, 5353), guest: GUEST.into(), guest_port: 53 }],
                ..NatConfig::default()
            },
            firewall: vec![
                Rule { action: Action::Reject, proto: Proto::Tcp, ports: Some((22, 22)), from: None, to: None },
                Rule { action: Action::Deny, proto: Proto::Tcp, ports: Some((23, 23)), from: None, to: None },
            ],
            firewall_default: Action::Allow,
        };
        let mut emit = Vec::new();
        let mut r = Router::new(cfg, None);
        r.set_outside(Some((UPLINK_IP.into(), 24)), Some(LAN_HOST.into()), &mut emit);
        assert_eq!(emit.len(), 1, "a gratuitous ARP announces the uplink address");
        r
    }

    fn eth(dst: Mac, src: Mac, ip: Vec<u8>) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&dst);
        f.extend_from_slice(&src);
        f.extend_from_slice(&ETH_P_IPV4.to_be_bytes());
        f.extend_from_slice(&ip);
        f
    }

    fn udp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, ttl: u8) -> Vec<u8> {
        let mut v = Vec::new();
        PacketBuilder::ipv4(src, dst, ttl).udp(sport, dport).write(&mut v, b"data").unwrap();
        v
    }

    fn tcp_syn(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
        let mut v = Vec::new();
        PacketBuilder::ipv4(src, dst, 64).tcp(sport, dport, 1, 100).syn().write(&mut v, &[]).unwrap();
        v
    }

    /// Answers the router's ARP request on the uplink for the LAN host.
    fn lan_answers(r: &mut Router, emit: &mut Vec<Emit>) {
        let req = emit.iter().find(|e| {
            e.to == Side::Uplink && arp::parse(&e.frame).is_some_and(|a| a.op == OP_REQUEST && a.target_ip == Ipv4Addr::from(LAN_HOST))
        });
        assert!(req.is_some(), "the router asks for the next hop");
        emit.clear();
        let mut reply = Vec::new();
        arp::build(
            &mut reply,
            &Arp { op: OP_REPLY, sender_mac: LAN_MAC, sender_ip: LAN_HOST.into(), target_mac: UP_MAC, target_ip: UPLINK_IP.into() },
        );
        assert_eq!(r.from_uplink(&mut reply, &VnetHeader::default(), 1, emit), Ok(Verdict::Consumed));
    }

    #[test]
    fn nat_out_waits_for_arp_then_goes_masqueraded_and_replies_come_back() {
        let mut r = router(RouteMode::Nat);
        let mut emit = Vec::new();
        let mut f = eth(GW_MAC, GUEST_MAC, udp(GUEST, 40000, FAR, 53, 64));
        assert_eq!(r.from_guest(0, &mut f, &VnetHeader::default(), 0, &mut emit), Ok(Verdict::Consumed), "queued for ARP");
        lan_answers(&mut r, &mut emit);
        assert_eq!(emit.len(), 1, "the waiting frame is released");
        let out = &emit[0];
        assert_eq!((out.to, &out.frame[0..6], &out.frame[6..12]), (Side::Uplink, &LAN_MAC[..], &UP_MAC[..]));
        let ip = &out.frame[14..];
        assert_eq!((&ip[12..16], ip[8]), (&UPLINK_IP[..], 63), "masqueraded, TTL decremented");
        assert!(l4_checksum_ok(ip));
        let sport = u16::from_be_bytes([ip[20], ip[21]]);
        emit.clear();
        // Now the next hop is known: straight through.
        let mut f2 = eth(GW_MAC, GUEST_MAC, udp(GUEST, 40000, FAR, 53, 64));
        assert_eq!(r.from_guest(0, &mut f2, &VnetHeader::default(), 2, &mut emit), Ok(Verdict::Forward(Side::Uplink)));
        // The reply.
        let mut back = eth(UP_MAC, LAN_MAC, udp(FAR, 53, UPLINK_IP, sport, 50));
        assert_eq!(r.from_uplink(&mut back, &VnetHeader::default(), 3, &mut emit), Ok(Verdict::Forward(Side::Guests)));
        assert_eq!(
            (&back[0..6], &back[6..12], &back[14 + 16..14 + 20]),
            (&GUEST_MAC[..], &GW_MAC[..], &GUEST[..]),
            "known from its own packets"
        );
        assert!(l4_checksum_ok(&back[14..]));
        // The LAN cannot reach the guest subnet directly, nor a port without a forward.
        let mut direct = eth(UP_MAC, LAN_MAC, udp(LAN_HOST, 1, GUEST, 53, 64));
        assert_eq!(r.from_uplink(&mut direct, &VnetHeader::default(), 4, &mut emit), Err(DropReason::NatNoConnection));
        let mut stranger = eth(UP_MAC, LAN_MAC, udp(LAN_HOST, 1, UPLINK_IP, 9999, 64));
        assert_eq!(r.from_uplink(&mut stranger, &VnetHeader::default(), 4, &mut emit), Err(DropReason::NatNoConnection));
        // A port forward does.
        let mut fwd = eth(UP_MAC, LAN_MAC, udp(LAN_HOST, 1, UPLINK_IP, 5353, 64));
        assert_eq!(r.from_uplink(&mut fwd, &VnetHeader::default(), 5, &mut emit), Ok(Verdict::Forward(Side::Guests)));
        assert_eq!(&fwd[14 + 16..14 + 20], &GUEST);
    }

    #[test]
    fn the_uplink_address_answers_arp_and_ping_and_frames_for_others_are_not_ours() {
        let mut r = router(RouteMode::Nat);
        let mut emit = Vec::new();
        let mut req = Vec::new();
        arp::build(
            &mut req,
            &Arp { op: OP_REQUEST, sender_mac: LAN_MAC, sender_ip: LAN_HOST.into(), target_mac: [0; 6], target_ip: UPLINK_IP.into() },
        );
        assert_eq!(r.from_uplink(&mut req, &VnetHeader::default(), 0, &mut emit), Ok(Verdict::Consumed));
        let a = arp::parse(&emit[0].frame).unwrap();
        assert_eq!((a.op, a.sender_mac, a.sender_ip), (OP_REPLY, UP_MAC, UPLINK_IP.into()));
        emit.clear();
        let mut ping = Vec::new();
        PacketBuilder::ethernet2(LAN_MAC, UP_MAC).ipv4(LAN_HOST, UPLINK_IP, 64).icmpv4_echo_request(1, 1).write(&mut ping, b"hi").unwrap();
        assert_eq!(r.from_uplink(&mut ping, &VnetHeader::default(), 0, &mut emit), Ok(Verdict::Consumed));
        assert_eq!(emit[0].frame[14 + 20], 0, "echo reply");
        let mut other = eth(LAN_MAC, [0x52, 0, 0, 0, 0, 1], udp(LAN_HOST, 1, [10, 10, 11, 2], 2, 64));
        assert_eq!(r.from_uplink(&mut other, &VnetHeader::default(), 0, &mut emit), Ok(Verdict::NotMine));
        // No proxy ARP unless asked.
        let mut req = Vec::new();
        arp::build(
            &mut req,
            &Arp { op: OP_REQUEST, sender_mac: LAN_MAC, sender_ip: LAN_HOST.into(), target_mac: [0; 6], target_ip: GUEST.into() },
        );
        assert_eq!(r.from_uplink(&mut req, &VnetHeader::default(), 0, &mut emit), Ok(Verdict::NotMine));
        r.cfg.proxy_arp = true;
        emit.clear();
        assert_eq!(r.from_uplink(&mut req, &VnetHeader::default(), 0, &mut emit), Ok(Verdict::Consumed));
        let a = arp::parse(&emit[0].frame).unwrap();
        assert_eq!((a.sender_mac, a.sender_ip), (UP_MAC, GUEST.into()), "proxy ARP for a guest address");
    }

    #[test]
    fn route_mode_keeps_addresses_and_applies_the_firewall() {
        let mut r = router(RouteMode::Route);
        let mut emit = Vec::new();
        // The guest is known from a packet it sent.
        let mut hello = eth(GW_MAC, GUEST_MAC, udp(GUEST, 1000, LAN_HOST, 1000, 64));
        r.from_guest(0, &mut hello, &VnetHeader::default(), 0, &mut emit).unwrap();
        lan_answers(&mut r, &mut emit);
        assert_eq!(&emit[0].frame[14 + 12..14 + 16], &GUEST, "source kept");
        emit.clear();
        let mut web = eth(UP_MAC, LAN_MAC, tcp_syn(LAN_HOST, 5000, GUEST, 80));
        assert_eq!(r.from_uplink(&mut web, &VnetHeader::default(), 2, &mut emit), Ok(Verdict::Forward(Side::Guests)));
        assert_eq!((&web[0..6], &web[14 + 12..14 + 16]), (&GUEST_MAC[..], &LAN_HOST[..]));
        let mut ssh = eth(UP_MAC, LAN_MAC, tcp_syn(LAN_HOST, 5000, GUEST, 22));
        assert_eq!(r.from_uplink(&mut ssh, &VnetHeader::default(), 2, &mut emit), Err(DropReason::Firewall));
        let rst = &emit.pop().expect("reject answers").frame;
        assert_eq!((rst[14 + 9], rst[14 + 33] & 0x04), (IPPROTO_TCP, 0x04), "a TCP RST");
        let mut telnet = eth(UP_MAC, LAN_MAC, tcp_syn(LAN_HOST, 5000, GUEST, 23));
        assert_eq!(r.from_uplink(&mut telnet, &VnetHeader::default(), 2, &mut emit), Err(DropReason::Firewall));
        assert!(emit.is_empty(), "deny is silent");
        // A static route behind the guest.
        let mut behind = eth(UP_MAC, LAN_MAC, udp(LAN_HOST, 1, [172, 20, 1, 1], 1, 64));
        assert_eq!(r.from_uplink(&mut behind, &VnetHeader::default(), 3, &mut emit), Ok(Verdict::Forward(Side::Guests)));
        assert_eq!(&behind[0..6], &GUEST_MAC, "to the guest that routes it");
    }

    #[test]
    fn ttl_expiry_and_no_route_answer_with_icmp() {
        let mut r = router(RouteMode::Nat);
        let mut emit = Vec::new();
        let mut f = eth(GW_MAC, GUEST_MAC, udp(GUEST, 40000, FAR, 33434, 1));
        assert_eq!(r.from_guest(0, &mut f, &VnetHeader::default(), 0, &mut emit), Err(DropReason::TtlExceeded));
        let e = &emit[0];
        assert_eq!((e.to, &e.frame[0..6], e.frame[14 + 20]), (Side::Guests, &GUEST_MAC[..], ICMP_TIME_EXCEEDED));
        emit.clear();
        r.set_outside(Some((UPLINK_IP.into(), 24)), None, &mut emit);
        emit.clear();
        let mut f = eth(GW_MAC, GUEST_MAC, udp(GUEST, 40000, FAR, 53, 64));
        assert_eq!(r.from_guest(0, &mut f, &VnetHeader::default(), 0, &mut emit), Err(DropReason::NoRoute));
        assert_eq!((emit[0].frame[14 + 20], emit[0].frame[14 + 21]), (ICMP_DEST_UNREACH, UNREACH_NET));
    }

    #[test]
    fn a_silent_next_hop_gives_host_unreachable_and_bounded_queues() {
        let mut r = router(RouteMode::Route);
        let mut emit = Vec::new();
        for i in 0..1000u16 {
            let mut f = eth(GW_MAC, GUEST_MAC, udp(GUEST, i, [10, 10, 11, 77], 9, 64));
            let _ = r.from_guest(0, &mut f, &VnetHeader::default(), 0, &mut emit);
        }
        assert!(r.outside_neighbors.queued() <= arp::QUEUE_PER_NEIGHBOR);
        emit.clear();
        for t in [1000, 2000, 3000] {
            r.tick(t, &mut emit);
        }
        let unreach = emit.iter().filter(|e| e.to == Side::Guests && e.frame.get(14 + 20) == Some(&ICMP_DEST_UNREACH)).count();
        assert_eq!(unreach, arp::QUEUE_PER_NEIGHBOR, "each waiting frame's sender hears host unreachable");
    }

    #[test]
    fn hostile_frames_never_panic() {
        let mut x = 0x9e37_79b9u32;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        for mode in [RouteMode::Nat, RouteMode::Route] {
            let mut r = router(mode);
            let mut emit = Vec::new();
            for len in 0..400usize {
                let mut f: Vec<u8> = (0..len).map(|_| next() as u8).collect();
                if len >= 34 {
                    f[0..6].copy_from_slice(&if len % 2 == 0 { GW_MAC } else { UP_MAC });
                    f[12..14].copy_from_slice(&if len % 5 == 0 { ETH_P_ARP } else { ETH_P_IPV4 }.to_be_bytes());
                    f[14] = 0x45;
                }
                let hdr = VnetHeader { flags: (len % 2) as u8, gso_type: if len % 3 == 0 { 1 } else { 0 }, ..VnetHeader::default() };
                let _ = r.from_guest(0, &mut f.clone(), &hdr, len as u64, &mut emit);
                let _ = r.from_uplink(&mut f, &hdr, len as u64, &mut emit);
                r.guest_arp(0, &f, len as u64, &mut emit);
                r.tick(len as u64 * 100, &mut emit);
            }
        }
    }
}
