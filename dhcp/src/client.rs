//! A DHCPv4 client (RFC 2131 §4.4) for the gateway's own uplink address: INIT → SELECTING →
//! REQUESTING → BOUND, renewing at T1 (unicast to the server) and rebinding at T2 (broadcast),
//! starting over when the lease ends or a NAK comes. Pure: the caller sends the messages it is
//! given and hands in what arrives on UDP port 68, with the time.

use std::net::Ipv4Addr;

use crate::message::{opt, reply_options, reply_type, reply_yiaddr};
use crate::{Mac, MessageType};

/// A lease the client holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientLease {
    pub addr: Ipv4Addr,
    pub prefix: u8,
    pub router: Option<Ipv4Addr>,
    pub server: Ipv4Addr,
    pub lease_ms: u64,
    pub t1_ms: u64,
    pub t2_ms: u64,
    pub obtained_ms: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Init,
    Selecting,
    Requesting { offered: Ipv4Addr, server: Ipv4Addr },
    Bound,
    Renewing,
    Rebinding,
}

/// A message to send: its UDP payload and the IPv4 source and destination to use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outgoing {
    pub payload: Vec<u8>,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
}

/// What changed for the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientEvent {
    Bound(ClientLease),
    /// The lease ended without a renewal, or the server refused it: the address is gone.
    Lost,
}

pub struct DhcpClient {
    mac: Mac,
    state: State,
    xid: u32,
    lease: Option<ClientLease>,
    /// When the next message of the current state is due.
    next_ms: u64,
    tries: u32,
}

/// Retransmission interval while selecting or requesting, and how many requests before
/// starting over.
const RETRY_MS: u64 = 3_000;
const REQUEST_TRIES: u32 = 4;

impl DhcpClient {
    /// `seed` varies the transaction ids between runs.
    pub fn new(mac: Mac, seed: u32) -> DhcpClient {
        DhcpClient { mac, state: State::Init, xid: seed | 1, lease: None, next_ms: 0, tries: 0 }
    }

    pub fn lease(&self) -> Option<ClientLease> {
        self.lease
    }

    fn message(&self, t: MessageType, ciaddr: Option<Ipv4Addr>, requested: Option<Ipv4Addr>, server: Option<Ipv4Addr>) -> Vec<u8> {
        let mut b = crate::message::build_client_message(t, self.mac, self.xid, requested, server, Some("vunet"));
        if let Some(c) = ciaddr {
            b[12..16].copy_from_slice(&c.octets());
        }
        b.pop(); // END: the parameter request list goes before it.
        b.extend_from_slice(&[opt::PARAM_LIST, 5, opt::SUBNET_MASK, opt::ROUTER, opt::LEASE_TIME, opt::RENEWAL_T1, opt::REBINDING_T2]);
        b.push(opt::END);
        b
    }

    fn broadcast(&self, payload: Vec<u8>, src: Ipv4Addr) -> Outgoing {
        Outgoing { payload, src, dst: Ipv4Addr::BROADCAST }
    }

    /// Timers: (re)transmissions and the ends of T1, T2 and the lease.
    pub fn poll(&mut self, now: u64) -> (Option<Outgoing>, Option<ClientEvent>) {
        let mut event = None;
        if let Some(l) = self.lease {
            let age = now.saturating_sub(l.obtained_ms);
            if age >= l.lease_ms {
                self.lease = None;
                self.state = State::Init;
                self.next_ms = now;
                event = Some(ClientEvent::Lost);
            } else if age >= l.t2_ms && matches!(self.state, State::Bound | State::Renewing) {
                self.state = State::Rebinding;
                self.next_ms = now;
            } else if age >= l.t1_ms && self.state == State::Bound {
                self.state = State::Renewing;
                self.next_ms = now;
            }
        }
        if now < self.next_ms {
            return (None, event);
        }
        let out = match self.state {
            State::Bound => None,
            State::Init | State::Selecting => {
                self.xid = self.xid.wrapping_mul(1_103_515_245).wrapping_add(12345);
                self.state = State::Selecting;
                self.next_ms = now + RETRY_MS;
                Some(self.broadcast(self.message(MessageType::Discover, None, None, None), Ipv4Addr::UNSPECIFIED))
            }
            State::Requesting { offered, server } => {
                self.tries += 1;
                if self.tries > REQUEST_TRIES {
                    self.state = State::Init;
                    self.next_ms = now;
                    return (None, event);
                }
                self.next_ms = now + RETRY_MS;
                Some(self.broadcast(self.message(MessageType::Request, None, Some(offered), Some(server)), Ipv4Addr::UNSPECIFIED))
            }
            State::Renewing | State::Rebinding => {
                let Some(l) = self.lease else {
                    self.state = State::Init;
                    return (None, event);
                };
                // RFC 2131 4.4.5: retry at half the time left to T2 (or the end), at least 60 s
                // apart, scaled down for short leases.
                let until = if self.state == State::Renewing { l.t2_ms } else { l.lease_ms };
                let left = until.saturating_sub(now.saturating_sub(l.obtained_ms));
                self.next_ms = now + (left / 2).clamp(1_000, 60_000);
                let msg = self.message(MessageType::Request, Some(l.addr), None, None);
                Some(if self.state == State::Renewing {
                    Outgoing { payload: msg, src: l.addr, dst: l.server }
                } else {
                    self.broadcast(msg, l.addr)
                })
            }
        };
        (out, event)
    }

    /// A message that arrived on UDP port 68 (any: others' replies are ignored).
    pub fn input(&mut self, b: &[u8], now: u64) -> (Option<Outgoing>, Option<ClientEvent>) {
        if b.len() < 240 || b[0] != 2 || b[4..8] != self.xid.to_be_bytes() || b[28..34] != self.mac {
            return (None, None);
        }
        let opts = reply_options(b);
        let ip_opt = |code: u8| opts.iter().find(|(c, v)| *c == code && v.len() >= 4).map(|(_, v)| Ipv4Addr::new(v[0], v[1], v[2], v[3]));
        let secs = |code: u8| {
            opts.iter().find(|(c, v)| *c == code && v.len() == 4).map(|(_, v)| u32::from_be_bytes([v[0], v[1], v[2], v[3]]) as u64 * 1000)
        };
        let Some(yiaddr) = reply_yiaddr(b) else { return (None, None) };
        let server = ip_opt(opt::SERVER_ID);
        match (reply_type(b), self.state) {
            (Some(MessageType::Offer), State::Selecting) => {
                let Some(server) = server.filter(|_| !yiaddr.is_unspecified() && !yiaddr.is_broadcast()) else { return (None, None) };
                self.state = State::Requesting { offered: yiaddr, server };
                self.tries = 0;
                self.next_ms = now;
                self.poll(now)
            }
            (Some(MessageType::Ack), State::Requesting { .. } | State::Renewing | State::Rebinding) => {
                let Some(server) = server.or(self.lease.map(|l| l.server)) else { return (None, None) };
                let mask = ip_opt(opt::SUBNET_MASK).map(u32::from).unwrap_or(0xffff_ff00);
                let prefix = if mask.leading_ones() + mask.trailing_zeros() == 32 { mask.leading_ones() as u8 } else { 24 };
                let lease_ms = secs(opt::LEASE_TIME).unwrap_or(3_600_000).max(10_000);
                let t1 = secs(opt::RENEWAL_T1).filter(|&t| t < lease_ms).unwrap_or(lease_ms / 2);
                let t2 = secs(opt::REBINDING_T2).filter(|&t| t < lease_ms && t >= t1).unwrap_or(lease_ms * 7 / 8);
                let lease = ClientLease {
                    addr: yiaddr,
                    prefix,
                    router: ip_opt(opt::ROUTER),
                    server,
                    lease_ms,
                    t1_ms: t1,
                    t2_ms: t2,
                    obtained_ms: now,
                };
                self.lease = Some(lease);
                self.state = State::Bound;
                (None, Some(ClientEvent::Bound(lease)))
            }
            (Some(MessageType::Nak), State::Requesting { .. } | State::Renewing | State::Rebinding) => {
                let had = self.lease.take().is_some();
                self.state = State::Init;
                self.next_ms = now;
                (None, had.then_some(ClientEvent::Lost))
            }
            _ => (None, None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::{DhcpServer, ServerConfig};
    use crate::DhcpMessage;

    const MAC: Mac = [2, 0x76, 0x75, 1, 2, 3];

    fn server() -> DhcpServer {
        let cfg = ServerConfig {
            server_ip: Ipv4Addr::new(10, 9, 0, 1),
            prefix: 24,
            range: (Ipv4Addr::new(10, 9, 0, 100), Ipv4Addr::new(10, 9, 0, 150)),
            hosts: Vec::new(),
            lease_secs: 120,
            router: true,
            dns: None,
            domain: None,
            mtu: None,
        };
        DhcpServer::new(cfg)
    }

    /// Hands a client message to vunet's own DHCP server and returns its answer.
    fn serve(s: &mut DhcpServer, out: &Outgoing, now_s: u64) -> Vec<u8> {
        let m = DhcpMessage::parse(&out.payload).expect("the client's message parses");
        s.handle(&m, now_s).expect("an answer").payload
    }

    #[test]
    fn binds_renews_and_rebinds_against_a_server() {
        let mut s = server();
        let mut c = DhcpClient::new(MAC, 7);
        let (discover, _) = c.poll(0);
        let discover = discover.unwrap();
        assert_eq!((discover.src, discover.dst), (Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST));
        let offer = serve(&mut s, &discover, 0);
        let (request, ev) = c.input(&offer, 10);
        assert_eq!(ev, None);
        let ack = serve(&mut s, &request.unwrap(), 0);
        let (_, ev) = c.input(&ack, 20);
        let Some(ClientEvent::Bound(l)) = ev else { panic!("bound: {ev:?}") };
        assert_eq!((l.addr, l.prefix, l.router, l.lease_ms), (Ipv4Addr::new(10, 9, 0, 100), 24, Some(Ipv4Addr::new(10, 9, 0, 1)), 120_000));
        assert_eq!(c.poll(1_000), (None, None), "nothing to do while bound");
        // T1: a unicast renewal from the leased address.
        let (renew, _) = c.poll(20 + 60_000);
        let renew = renew.unwrap();
        assert_eq!((renew.src, renew.dst), (l.addr, Ipv4Addr::new(10, 9, 0, 1)));
        assert_eq!(&renew.payload[12..16], &l.addr.octets(), "ciaddr is set while renewing");
        // The server is silent until T2: a broadcast rebind.
        let (rebind, _) = c.poll(20 + 105_000);
        assert_eq!(rebind.unwrap().dst, Ipv4Addr::BROADCAST);
        let ack = serve(&mut s, &c.poll(20 + 112_000).0.unwrap_or_else(|| renew.clone()), 112);
        let (_, ev) = c.input(&ack, 112_100);
        assert!(matches!(ev, Some(ClientEvent::Bound(l2)) if l2.addr == l.addr && l2.obtained_ms == 112_100));
    }

    #[test]
    fn a_lease_that_runs_out_is_lost_and_the_client_starts_over() {
        let mut s = server();
        let mut c = DhcpClient::new(MAC, 9);
        let offer = serve(&mut s, &c.poll(0).0.unwrap(), 0);
        let ack = serve(&mut s, &c.input(&offer, 0).0.unwrap(), 0);
        assert!(matches!(c.input(&ack, 0).1, Some(ClientEvent::Bound(_))));
        let (out, ev) = c.poll(120_000);
        assert_eq!(ev, Some(ClientEvent::Lost));
        assert_eq!(
            out.map(|o| crate::message::reply_options(&o.payload).iter().any(|(c, v)| *c == opt::MSG_TYPE && v == &[1])),
            Some(true),
            "a new DISCOVER"
        );
        assert_eq!(c.lease(), None);
    }

    #[test]
    fn foreign_and_garbage_replies_are_ignored() {
        let mut s = server();
        let mut c = DhcpClient::new(MAC, 11);
        let discover = c.poll(0).0.unwrap();
        let mut offer = serve(&mut s, &discover, 0);
        let mut other = offer.clone();
        other[4] ^= 0xff; // another transaction
        assert_eq!(c.input(&other, 0), (None, None));
        for len in [0, 10, 239, 240, 300] {
            let _ = c.input(&vec![2u8; len], 0);
        }
        offer.truncate(241);
        assert_eq!(c.input(&offer, 0), (None, None), "an offer cut short has no server id");
    }
}
