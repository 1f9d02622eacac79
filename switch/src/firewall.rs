//! Inbound filtering for routed networks, ufw-like: an ordered list of rules, the first match
//! wins, a default policy for the rest. Stateful like ufw: packets of a flow a guest started
//! (its replies) are not filtered. The flows are bounded, and one port's flows at most a
//! quarter of them: a guest at its quota replaces its own oldest flow, so a guest opening
//! flows without end does not stop the others' from being recorded.
//!
//! One firewall serves either family: IPv4 packets through [`Firewall::inbound`] and
//! [`Firewall::outbound`], IPv6 (the router6's) through the `_tuple` forms. A rule naming an
//! IPv4 subnet matches IPv4 packets only, one naming an IPv6 prefix IPv6 packets only.

use std::collections::HashMap;
use std::net::IpAddr;

use crate::ipv4::{self, Ipv4Header};
use crate::ipv6::IPPROTO_ICMPV6;
use crate::ledger::{Ledger, Owner, Room};
use crate::proto::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Allow,
    /// Dropped silently: the sender times out.
    Deny,
    /// Refused: a TCP RST or an ICMP port unreachable goes back.
    Reject,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Any,
    Tcp,
    Udp,
    Icmp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rule {
    pub action: Action,
    pub proto: Proto,
    /// Destination ports (TCP, UDP), inclusive; None: any.
    pub ports: Option<(u16, u16)>,
    /// Source subnet (IPv4 or IPv6); None: anywhere.
    pub from: Option<(IpAddr, u8)>,
    /// Destination subnet (a guest, or all); None: any.
    pub to: Option<(IpAddr, u8)>,
}

/// Whether `ip` is inside `net`/`prefix` of the same family.
pub fn in_prefix(ip: IpAddr, net: IpAddr, prefix: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => ipv4::in_subnet(a, n, prefix),
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = if prefix == 0 { 0 } else { u128::MAX << (128 - prefix.min(128) as u32) };
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// What the firewall keys on in a packet of either family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuple {
    pub proto: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    /// TCP/UDP ports, or an ICMP(v6) echo identifier as both; None without them.
    pub ports: Option<(u16, u16)>,
}

impl Tuple {
    fn of_v4(ip: &[u8], h: &Ipv4Header) -> Tuple {
        Tuple { proto: h.proto, src: h.src.into(), dst: h.dst.into(), ports: ipv4::ports(ip, h) }
    }

    fn is_icmp(&self) -> bool {
        self.proto == IPPROTO_ICMP || self.proto == IPPROTO_ICMPV6
    }
}

impl Rule {
    fn matches(&self, t: &Tuple, dport: Option<u16>) -> bool {
        let proto_ok = match self.proto {
            Proto::Any => true,
            Proto::Tcp => t.proto == IPPROTO_TCP,
            Proto::Udp => t.proto == IPPROTO_UDP,
            Proto::Icmp => t.is_icmp(),
        };
        let ports_ok = match self.ports {
            None => true,
            Some((lo, hi)) => dport.is_some_and(|p| (lo..=hi).contains(&p)),
        };
        let from_ok = self.from.is_none_or(|(n, p)| in_prefix(t.src, n, p));
        let to_ok = self.to.is_none_or(|(n, p)| in_prefix(t.dst, n, p));
        proto_ok && ports_ok && from_ok && to_ok
    }
}

/// (proto, guest address, guest port, remote address, remote port).
type FlowKey = (u8, IpAddr, u16, IpAddr, u16);

/// A flow a guest started.
struct Flow {
    /// When it was last seen going out.
    seen: u64,
    /// The port it came from, and its place in the eviction order.
    owner: Owner,
    stamp: u64,
    touched: u64,
}

/// How often a flow in use moves to the back of the eviction order.
const TOUCH_MS: u64 = 1000;

pub struct Firewall {
    pub rules: Vec<Rule>,
    pub default: Action,
    /// Flows guests started.
    started: HashMap<FlowKey, Flow>,
    ledger: Ledger<FlowKey>,
    max_flows: usize,
    /// Most flows one port may hold.
    quota: usize,
}

/// How long a flow a guest started lets its replies in after its last outbound packet.
pub const FLOW_IDLE_MS: u64 = 300_000;

impl Firewall {
    pub fn new(rules: Vec<Rule>, default: Action, max_flows: usize) -> Firewall {
        let quota = (max_flows / 4).max(1);
        Firewall { rules, default, started: HashMap::new(), ledger: Ledger::default(), max_flows, quota }
    }

    /// Sets how many flows one port may hold.
    pub fn with_quota(mut self, quota: usize) -> Firewall {
        self.quota = quota.max(1);
        self
    }

    /// Records looked at to evict flows so far (the cost tests read it).
    pub fn eviction_work(&self) -> u64 {
        self.ledger.examined
    }

    fn remove(&mut self, key: &FlowKey) {
        if let Some(f) = self.started.remove(key) {
            self.ledger.removed(f.owner);
        }
    }

    /// Whether there is anything to check at all (no rules and "allow": everything routes).
    pub fn is_open(&self) -> bool {
        self.rules.is_empty() && self.default == Action::Allow
    }

    /// Notes an IPv4 packet a guest sends out from port `owner`, so its replies come back in.
    pub fn outbound(&mut self, ip: &[u8], h: &Ipv4Header, now: u64, owner: Owner) {
        self.outbound_tuple(&Tuple::of_v4(ip, h), now, owner)
    }

    /// Notes a packet (of either family) a guest sends out from port `owner`.
    pub fn outbound_tuple(&mut self, t: &Tuple, now: u64, owner: Owner) {
        if self.is_open() {
            return;
        }
        let Some((s, d)) = t.ports else { return };
        let key = (t.proto, t.src, s, t.dst, if t.is_icmp() { s } else { d });
        if let Some(f) = self.started.get_mut(&key) {
            f.seen = now;
            if f.owner == owner {
                if now.saturating_sub(f.touched) >= TOUCH_MS {
                    f.touched = now;
                    f.stamp = self.ledger.touch(key, owner);
                    self.compact(owner);
                }
                return;
            }
            // The same flow from another port (its address moved): now that port's.
            self.remove(&key);
        }
        let started = &self.started;
        let room = self.ledger.make_room(
            owner,
            self.quota,
            self.max_flows,
            |k, s| started.get(k).is_some_and(|f| f.stamp == s),
            |k| started.get(k).is_some_and(|f| now.saturating_sub(f.seen) > FLOW_IDLE_MS),
        );
        match room {
            // Nothing to give way: this one's replies meet the rules.
            Room::Full => return,
            Room::Evict(old) => self.remove(&old),
            Room::Free => {}
        }
        let stamp = self.ledger.add(key, owner);
        self.started.insert(key, Flow { seen: now, owner, stamp, touched: now });
        self.compact(owner);
    }

    fn compact(&mut self, owner: Owner) {
        let started = &self.started;
        self.ledger.compact(owner, |k, s| started.get(k).is_some_and(|f| f.stamp == s));
    }

    /// The verdict on an IPv4 packet coming in from outside.
    pub fn inbound(&self, ip: &[u8], h: &Ipv4Header, now: u64) -> Action {
        self.inbound_tuple(&Tuple::of_v4(ip, h), now)
    }

    /// Whether `t`, coming in, belongs to a flow a guest started (a reply).
    pub fn is_reply(&self, t: &Tuple, now: u64) -> bool {
        let Some((s, d)) = t.ports else { return false };
        let key = (t.proto, t.dst, d, t.src, if t.is_icmp() { d } else { s });
        self.started.get(&key).is_some_and(|f| now.saturating_sub(f.seen) <= FLOW_IDLE_MS)
    }

    /// The verdict on a packet (of either family) coming in from outside.
    pub fn inbound_tuple(&self, t: &Tuple, now: u64) -> Action {
        if self.is_open() || self.is_reply(t, now) {
            return Action::Allow;
        }
        let dport = t.ports.filter(|_| matches!(t.proto, IPPROTO_TCP | IPPROTO_UDP)).map(|p| p.1);
        self.rules.iter().find(|r| r.matches(t, dport)).map_or(self.default, |r| r.action)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::PacketBuilder;

    fn tcp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
        let mut v = Vec::new();
        PacketBuilder::ipv4(src, dst, 64).tcp(sport, dport, 1, 100).syn().write(&mut v, &[]).unwrap();
        v
    }

    fn verdict(fw: &Firewall, p: &[u8]) -> Action {
        fw.inbound(p, &ipv4::parse(p, false).unwrap(), 0)
    }

    #[test]
    fn first_match_wins_then_the_default() {
        let fw = Firewall::new(
            vec![
                Rule {
                    action: Action::Allow,
                    proto: Proto::Tcp,
                    ports: Some((22, 22)),
                    from: Some((std::net::Ipv4Addr::new(10, 10, 11, 7).into(), 32)),
                    to: None,
                },
                Rule { action: Action::Reject, proto: Proto::Tcp, ports: Some((22, 22)), from: None, to: None },
                Rule { action: Action::Deny, proto: Proto::Tcp, ports: Some((8000, 8999)), from: None, to: None },
            ],
            Action::Allow,
            1024,
        );
        let guest = [192, 168, 100, 10];
        assert_eq!(verdict(&fw, &tcp([10, 10, 11, 7], 5000, guest, 22)), Action::Allow);
        assert_eq!(verdict(&fw, &tcp([10, 10, 11, 8], 5000, guest, 22)), Action::Reject);
        assert_eq!(verdict(&fw, &tcp([10, 10, 11, 8], 5000, guest, 8080)), Action::Deny);
        assert_eq!(verdict(&fw, &tcp([10, 10, 11, 8], 5000, guest, 80)), Action::Allow);
    }

    /// Guest `guest` on port `owner` sends to 10.10.11.1:80 from port `sport`.
    fn out(fw: &mut Firewall, guest: [u8; 4], sport: u16, owner: Owner, now: u64) {
        let o = tcp(guest, sport, [10, 10, 11, 1], 80);
        fw.outbound(&o, &ipv4::parse(&o, false).unwrap(), now, owner);
    }

    /// Whether the reply to that comes in.
    fn reply_passes(fw: &Firewall, guest: [u8; 4], sport: u16) -> bool {
        verdict(fw, &tcp([10, 10, 11, 1], 80, guest, sport)) == Action::Allow
    }

    #[test]
    fn replies_to_what_guests_started_pass_a_default_deny() {
        let mut fw = Firewall::new(vec![], Action::Deny, 2).with_quota(2);
        let guest = [192, 168, 100, 10];
        out(&mut fw, guest, 40000, 0, 0);
        assert!(reply_passes(&fw, guest, 40000));
        assert!(!reply_passes(&fw, guest, 40001));
        // Bounded: a third flow replaces the guest's oldest.
        out(&mut fw, guest, 40001, 0, 1);
        out(&mut fw, guest, 40002, 0, 1);
        assert_eq!(fw.started.len(), 2);
        assert!(!reply_passes(&fw, guest, 40000) && reply_passes(&fw, guest, 40002));
    }

    #[test]
    fn a_guest_filling_the_flow_table_does_not_stop_the_others_flows() {
        let mut fw = Firewall::new(vec![], Action::Deny, 64);
        let (noisy, quiet, late) = ([192, 168, 100, 10], [192, 168, 100, 11], [192, 168, 100, 12]);
        out(&mut fw, quiet, 1000, 1, 0);
        for i in 0..10_000u32 {
            out(&mut fw, noisy, 2000 + (i % 60_000) as u16, 0, 1);
        }
        assert!(reply_passes(&fw, quiet, 1000), "the quiet guest's flow was kept");
        out(&mut fw, late, 3000, 2, 2);
        assert!(reply_passes(&fw, late, 3000), "a new guest's flow is still recorded");
        assert!(fw.started.len() <= 64);
    }

    #[test]
    fn a_full_flow_table_records_new_flows_in_constant_time_each() {
        const M: u32 = 4096;
        const N: u32 = 20_000;
        let mut fw = Firewall::new(vec![], Action::Deny, M as usize).with_quota(M as usize);
        let guest = |i: u32| [10, 1, (i >> 16) as u8, (i >> 8) as u8];
        let sport = |i: u32| 1024 + (i & 0xff) as u16;
        for i in 0..M {
            out(&mut fw, guest(i), sport(i), 0, 0);
        }
        let before = fw.eviction_work();
        for i in M..M + N {
            out(&mut fw, guest(i), sport(i), 0, 1);
        }
        assert_eq!(fw.started.len(), M as usize);
        assert!(reply_passes(&fw, guest(M + N - 1), sport(M + N - 1)), "the newest flow is recorded");
        assert!(!reply_passes(&fw, guest(0), sport(0)), "in place of the oldest");
        let work = fw.eviction_work() - before;
        assert!(work <= 4 * (N + M) as u64, "{work} records looked at for {N} flows into a table of {M}");
    }
}
