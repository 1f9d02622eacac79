//! Inbound filtering for routed networks, ufw-like: an ordered list of rules, the first match
//! wins, a default policy for the rest. Stateful like ufw: packets of a flow a guest started
//! (its replies) are not filtered.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use crate::ipv4::{self, Ipv4Header};
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
    /// Source subnet; None: anywhere.
    pub from: Option<(Ipv4Addr, u8)>,
    /// Destination subnet (a guest, or all); None: any.
    pub to: Option<(Ipv4Addr, u8)>,
}

impl Rule {
    fn matches(&self, h: &Ipv4Header, dport: Option<u16>) -> bool {
        let proto_ok = match self.proto {
            Proto::Any => true,
            Proto::Tcp => h.proto == IPPROTO_TCP,
            Proto::Udp => h.proto == IPPROTO_UDP,
            Proto::Icmp => h.proto == IPPROTO_ICMP,
        };
        let ports_ok = match self.ports {
            None => true,
            Some((lo, hi)) => dport.is_some_and(|p| (lo..=hi).contains(&p)),
        };
        let from_ok = self.from.is_none_or(|(n, p)| ipv4::in_subnet(h.src, n, p));
        let to_ok = self.to.is_none_or(|(n, p)| ipv4::in_subnet(h.dst, n, p));
        proto_ok && ports_ok && from_ok && to_ok
    }
}

/// (proto, guest address, guest port, remote address, remote port).
type FlowKey = (u8, Ipv4Addr, u16, Ipv4Addr, u16);

pub struct Firewall {
    pub rules: Vec<Rule>,
    pub default: Action,
    /// Flows guests started, with when they were last seen going out.
    started: HashMap<FlowKey, u64>,
    max_flows: usize,
}

/// How long a flow a guest started lets its replies in after its last outbound packet.
pub const FLOW_IDLE_MS: u64 = 300_000;

impl Firewall {
    pub fn new(rules: Vec<Rule>, default: Action, max_flows: usize) -> Firewall {
        Firewall { rules, default, started: HashMap::new(), max_flows }
    }

    /// Whether there is anything to check at all (no rules and "allow": everything routes).
    pub fn is_open(&self) -> bool {
        self.rules.is_empty() && self.default == Action::Allow
    }

    /// Notes a packet a guest sends out, so its replies come back in.
    pub fn outbound(&mut self, ip: &[u8], h: &Ipv4Header, now: u64) {
        if self.is_open() {
            return;
        }
        let Some((s, d)) = ipv4::ports(ip, h) else { return };
        let key = (h.proto, h.src, s, h.dst, if h.proto == IPPROTO_ICMP { s } else { d });
        if self.started.len() >= self.max_flows && !self.started.contains_key(&key) {
            self.started.retain(|_, &mut t| now.saturating_sub(t) <= FLOW_IDLE_MS);
            if self.started.len() >= self.max_flows {
                return; // Full of live flows: this one's replies meet the rules.
            }
        }
        self.started.insert(key, now);
    }

    /// The verdict on a packet coming in from outside.
    pub fn inbound(&self, ip: &[u8], h: &Ipv4Header, now: u64) -> Action {
        if self.is_open() {
            return Action::Allow;
        }
        let ports = ipv4::ports(ip, h);
        if let Some((s, d)) = ports {
            let key = (h.proto, h.dst, d, h.src, if h.proto == IPPROTO_ICMP { d } else { s });
            if self.started.get(&key).is_some_and(|&t| now.saturating_sub(t) <= FLOW_IDLE_MS) {
                return Action::Allow;
            }
        }
        let dport = ports.filter(|_| matches!(h.proto, IPPROTO_TCP | IPPROTO_UDP)).map(|p| p.1);
        self.rules.iter().find(|r| r.matches(h, dport)).map_or(self.default, |r| r.action)
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
                    from: Some((Ipv4Addr::new(10, 10, 11, 7), 32)),
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

    #[test]
    fn replies_to_what_guests_started_pass_a_default_deny() {
        let mut fw = Firewall::new(vec![], Action::Deny, 2);
        let guest = [192, 168, 100, 10];
        let out = tcp(guest, 40000, [10, 10, 11, 1], 80);
        fw.outbound(&out, &ipv4::parse(&out, false).unwrap(), 0);
        assert_eq!(verdict(&fw, &tcp([10, 10, 11, 1], 80, guest, 40000)), Action::Allow);
        assert_eq!(verdict(&fw, &tcp([10, 10, 11, 1], 80, guest, 40001)), Action::Deny);
        // Bounded: a third flow is not remembered while two live ones fill the table.
        for p in [40001, 40002] {
            let o = tcp(guest, p, [10, 10, 11, 1], 80);
            fw.outbound(&o, &ipv4::parse(&o, false).unwrap(), 1);
        }
        assert_eq!(fw.started.len(), 2);
    }
}
