//! ICMP echo (ping) through unprivileged ping sockets (`socket(AF_INET, SOCK_DGRAM,
//! IPPROTO_ICMP)`, or `AF_INET6` and `IPPROTO_ICMPV6` for ICMPv6 echo; both allowed by
//! `net.ipv4.ping_group_range`). One socket per flow, a flow being
//! a guest address, its echo identifier and the remote address, so a reply read from the
//! socket goes back to exactly the guest and identifier that asked. The kernel gives each ping
//! socket an identifier of its own and rewrites the one the guest chose, both ways round: the
//! reply's identifier is restored here, and its checksum fixed. Flows expire when idle; the
//! table is bounded in all and per guest, and a full table drops new flows (counted), never
//! old ones.

use std::collections::HashMap;
use std::net::IpAddr;

use super::wire::{self, Link, ICMPV6_ECHO_REPLY, ICMP_ECHO_LEN, ICMP_ECHO_REPLY};
use super::{Counters, Drop, FlowId};
use crate::checksum::{finish, pseudo_v6, sum};
use crate::ipv6::IPPROTO_ICMPV6;
use crate::vnet::VnetHeader;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcmpConfig {
    /// All flows (ping sockets) of the network.
    pub max_flows: usize,
    /// Flows of one guest address.
    pub max_per_guest: usize,
    /// Idle time-out (ms). A ping sends every second; a minute of silence means it stopped.
    pub idle_ms: u64,
}

impl Default for IcmpConfig {
    fn default() -> Self {
        IcmpConfig { max_flows: 1024, max_per_guest: 256, idle_ms: 60_000 }
    }
}

/// A flow's identity: who pings whom, with which echo identifier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IcmpKey {
    pub guest: IpAddr,
    /// The identifier the guest put in its echo requests.
    pub ident: u16,
    pub remote: IpAddr,
}

/// What the I/O layer does with a guest echo request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IcmpOp<'a> {
    /// A new flow: open a ping socket (`SOCK_DGRAM`, `IPPROTO_ICMP`), `connect()` it to
    /// `remote`, then `send()` `message` (the whole ICMP message; the kernel sets its own
    /// identifier and the checksum).
    Open { id: FlowId, remote: IpAddr, message: &'a [u8] },
    /// An existing flow: `send()` `message` on its socket.
    Send { id: FlowId, message: &'a [u8] },
}

#[derive(Clone, Copy, Debug)]
struct Flow {
    key: IcmpKey,
    link: Link,
    last_ms: u64,
}

/// The ICMP echo flows of one network.
pub struct IcmpTable {
    cfg: IcmpConfig,
    slots: Vec<Option<Flow>>,
    free: Vec<FlowId>,
    by_key: HashMap<IcmpKey, FlowId>,
    per_guest: HashMap<IpAddr, usize>,
    live: usize,
    ip_id: u16,
    pub counters: Counters,
}

impl IcmpTable {
    pub fn new(cfg: IcmpConfig) -> IcmpTable {
        IcmpTable {
            cfg,
            slots: Vec::new(),
            free: Vec::new(),
            by_key: HashMap::new(),
            per_guest: HashMap::new(),
            live: 0,
            ip_id: 0,
            counters: Counters::default(),
        }
    }

    pub fn len(&self) -> usize {
        self.live
    }

    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    pub fn guest_flows(&self, guest: IpAddr) -> usize {
        self.per_guest.get(&guest).copied().unwrap_or(0)
    }

    pub fn key(&self, id: FlowId) -> Option<IcmpKey> {
        Some(self.slots.get(id)?.as_ref()?.key)
    }

    /// An ICMP frame from a guest: an echo request goes out on its flow's ping socket, to any
    /// address (the I/O layer decides which destinations it lets through). Anything else, or a
    /// new flow beyond the bounds, is dropped and counted.
    pub fn input<'a>(&mut self, frame: &'a [u8], hdr: &VnetHeader, now: u64) -> Result<IcmpOp<'a>, Drop> {
        let e = wire::parse_icmp_echo(frame, hdr).inspect_err(|&why| self.counters.drop(why))?;
        let key = IcmpKey { guest: e.src, ident: e.ident, remote: e.dst };
        if let Some(&id) = self.by_key.get(&key) {
            if let Some(f) = self.slots[id].as_mut() {
                f.last_ms = now;
                f.link = e.link;
            }
            self.counters.bytes_to_host += e.message.len() as u64;
            return Ok(IcmpOp::Send { id, message: e.message });
        }
        let why = if self.live >= self.cfg.max_flows {
            Drop::TableFull
        } else if self.guest_flows(e.src) >= self.cfg.max_per_guest {
            Drop::ShareExceeded
        } else {
            let id = super::place(&mut self.slots, &mut self.free, Flow { key, link: e.link, last_ms: now });
            self.by_key.insert(key, id);
            *self.per_guest.entry(e.src).or_insert(0) += 1;
            self.live += 1;
            self.counters.bytes_to_host += e.message.len() as u64;
            return Ok(IcmpOp::Open { id, remote: e.dst, message: e.message });
        };
        self.counters.drop(why);
        Err(why)
    }

    /// A message the flow's ping socket received: the caller put its `len` bytes (ICMP header
    /// and data, as `recv` on a ping socket gives them) at [`wire::icmp_frame_hdr`] of the
    /// flow's remote address in `buf`. For an echo reply (ICMPv6 echo reply for an IPv6 flow)
    /// this restores the guest's identifier (the kernel's is in it), fixes the checksum (over
    /// the pseudo-header for ICMPv6) and writes the headers in front, from the remote to the
    /// guest. Returns the
    /// frame length; None for an unknown flow, a message that is no echo reply or does not
    /// fit `buf` (counted as `bad_icmp`), or a packet too large for IP.
    pub fn reply(&mut self, id: FlowId, len: usize, buf: &mut [u8], now: u64) -> Option<usize> {
        let f = self.slots.get_mut(id)?.as_mut()?;
        let at = wire::icmp_frame_hdr(f.key.remote);
        let Some(m) = buf.get_mut(at..at.saturating_add(len)) else {
            self.counters.drop(Drop::BadIcmp);
            return None;
        };
        if m.len() < ICMP_ECHO_LEN {
            self.counters.drop(Drop::BadIcmp);
            return None;
        }
        let reply_type = if f.key.remote.is_ipv6() { ICMPV6_ECHO_REPLY } else { ICMP_ECHO_REPLY };
        if m[0] != reply_type || m[1] != 0 {
            // A ping socket delivers only echo replies (errors come on its error queue).
            self.counters.drop(Drop::BadIcmp);
            return None;
        }
        f.last_ms = now;
        let (link, key) = (f.link, f.key);
        m[4..6].copy_from_slice(&key.ident.to_be_bytes());
        m[2..4].copy_from_slice(&[0, 0]);
        let pseudo = match (key.remote, key.guest) {
            (IpAddr::V6(r), IpAddr::V6(g)) => pseudo_v6(&r.octets(), &g.octets(), IPPROTO_ICMPV6, len as u32),
            _ => 0,
        };
        let c = finish(sum(m, pseudo));
        m[2..4].copy_from_slice(&c.to_be_bytes());
        self.ip_id = self.ip_id.wrapping_add(1);
        let n = wire::write_icmp_frame(buf, &link, key.remote, key.guest, len, self.ip_id)?;
        self.counters.bytes_to_guest += len as u64;
        Some(n)
    }

    /// Removes the flows idle too long and passes each id to `closed`, for the I/O layer to
    /// close its socket.
    pub fn tick(&mut self, now: u64, mut closed: impl FnMut(FlowId)) {
        for id in 0..self.slots.len() {
            let expired = matches!(&self.slots[id], Some(f) if now.saturating_sub(f.last_ms) >= self.cfg.idle_ms);
            if expired {
                self.remove(id);
                self.counters.idle_timeouts += 1;
                closed(id);
            }
        }
    }

    /// Removes a flow (its socket failed for good, or the network goes away).
    pub fn remove(&mut self, id: FlowId) -> bool {
        let Some(f) = self.slots.get_mut(id).and_then(Option::take) else { return false };
        self.by_key.remove(&f.key);
        if let Some(n) = self.per_guest.get_mut(&f.key.guest) {
            *n -= 1;
            if *n == 0 {
                self.per_guest.remove(&f.key.guest);
            }
        }
        self.free.push(id);
        self.live -= 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use etherparse::{Icmpv4Type, NetSlice, PacketBuilder, SlicedPacket, TransportSlice};

    use super::*;
    use crate::socknat::wire::ICMP_FRAME_HDR;

    const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0x10];
    const GW_MAC: [u8; 6] = [2, 0x76, 0x75, 0, 0, 1];
    const G: [u8; 4] = [192, 168, 122, 10];
    const R: [u8; 4] = [10, 9, 8, 7];

    fn echo(src: [u8; 4], dst: [u8; 4], ident: u16, seq: u16, data: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        PacketBuilder::ethernet2(GUEST_MAC, GW_MAC).ipv4(src, dst, 64).icmpv4_echo_request(ident, seq).write(&mut v, data).unwrap();
        v
    }

    fn ip(a: [u8; 4]) -> IpAddr {
        IpAddr::from(a)
    }

    /// What a ping socket's `recv` gives: the echo reply with the kernel's identifier and a
    /// checksum over that identifier.
    fn kernel_reply(ident: u16, seq: u16, data: &[u8]) -> Vec<u8> {
        let mut m = vec![ICMP_ECHO_REPLY, 0, 0, 0];
        m.extend_from_slice(&ident.to_be_bytes());
        m.extend_from_slice(&seq.to_be_bytes());
        m.extend_from_slice(data);
        let c = finish(sum(&m, 0));
        m[2..4].copy_from_slice(&c.to_be_bytes());
        m
    }

    #[test]
    fn echo_goes_out_and_the_reply_gets_the_guests_identifier_back() {
        let mut t = IcmpTable::new(IcmpConfig::default());
        let none = VnetHeader::default();
        let f = echo(G, R, 0x4242, 1, b"abcdefgh");
        let Ok(IcmpOp::Open { id, remote, message }) = t.input(&f, &none, 0) else { panic!() };
        assert_eq!(remote, ip(R));
        assert_eq!(message, &f[34..], "the whole ICMP message, for the ping socket");
        assert_eq!(t.key(id), Some(IcmpKey { guest: ip(G), ident: 0x4242, remote: ip(R) }));
        // The next request of the same ping: the same socket.
        let f2 = echo(G, R, 0x4242, 2, b"abcdefgh");
        assert_eq!(t.input(&f2, &none, 1000), Ok(IcmpOp::Send { id, message: &f2[34..] }));
        // Another identifier (another ping process), or another remote: another socket.
        assert!(matches!(t.input(&echo(G, R, 0x4243, 1, b""), &none, 0), Ok(IcmpOp::Open { .. })));
        assert!(matches!(t.input(&echo(G, [10, 9, 8, 6], 0x4242, 1, b""), &none, 0), Ok(IcmpOp::Open { .. })));
        assert_eq!(t.len(), 3);
        // The reply, with the kernel's identifier 0x0007.
        let m = kernel_reply(7, 2, b"abcdefgh");
        let mut buf = vec![0u8; 2048];
        buf[ICMP_FRAME_HDR..ICMP_FRAME_HDR + m.len()].copy_from_slice(&m);
        let n = t.reply(id, m.len(), &mut buf, 1500).unwrap();
        assert_eq!(n, ICMP_FRAME_HDR + m.len());
        let p = SlicedPacket::from_ethernet(&buf[..n]).unwrap();
        let Some(NetSlice::Ipv4(iph)) = &p.net else { panic!() };
        assert_eq!((iph.header().source(), iph.header().destination()), (R, G));
        assert_eq!(finish(sum(&buf[14..34], 0)), 0, "IP header checksum");
        let Some(TransportSlice::Icmpv4(i)) = &p.transport else { panic!() };
        let Icmpv4Type::EchoReply(e) = i.icmp_type() else { panic!("{:?}", i.icmp_type()) };
        assert_eq!((e.id, e.seq), (0x4242, 2));
        assert_eq!(i.payload(), b"abcdefgh");
        assert_eq!(finish(sum(&buf[34..n], 0)), 0, "ICMP checksum fixed");
        assert_eq!(&buf[0..6], &GUEST_MAC);
        assert_eq!(&buf[6..12], &GW_MAC);
        assert_eq!(t.counters.bytes_to_guest, 16);
    }

    #[test]
    fn idle_flows_expire_after_a_minute() {
        let mut t = IcmpTable::new(IcmpConfig::default());
        let none = VnetHeader::default();
        let Ok(IcmpOp::Open { id, .. }) = t.input(&echo(G, R, 1, 1, b""), &none, 0) else { panic!() };
        t.input(&echo(G, R, 2, 1, b""), &none, 30_000).unwrap();
        let mut closed = Vec::new();
        t.tick(59_999, |id| closed.push(id));
        assert!(closed.is_empty());
        t.tick(60_000, |id| closed.push(id));
        assert_eq!(closed, vec![id]);
        assert_eq!(t.len(), 1);
        assert_eq!(t.counters.idle_timeouts, 1);
        // A reply keeps a flow alive too.
        let m = kernel_reply(9, 1, b"");
        let mut buf = vec![0u8; 128];
        buf[ICMP_FRAME_HDR..ICMP_FRAME_HDR + 8].copy_from_slice(&m);
        assert!(t.reply(id, 8, &mut buf, 60_000).is_none(), "the flow is gone");
        assert!(t.key(1).is_some(), "the second flow is id 1");
        assert!(t.reply(1, 8, &mut buf, 80_000).is_some());
        t.tick(139_999, |id| closed.push(id));
        assert_eq!(closed.len(), 1);
        t.tick(140_000, |id| closed.push(id));
        assert_eq!(closed.len(), 2);
        assert!(t.is_empty());
    }

    #[test]
    fn bounded_per_guest_and_in_all_without_eviction() {
        let mut t = IcmpTable::new(IcmpConfig { max_flows: 3, max_per_guest: 2, ..IcmpConfig::default() });
        let none = VnetHeader::default();
        t.input(&echo(G, R, 1, 1, b""), &none, 0).unwrap();
        t.input(&echo(G, R, 2, 1, b""), &none, 0).unwrap();
        assert_eq!(t.input(&echo(G, R, 3, 1, b""), &none, 0), Err(Drop::ShareExceeded));
        assert!(matches!(t.input(&echo(G, R, 1, 2, b""), &none, 0), Ok(IcmpOp::Send { .. })));
        let other = [192, 168, 122, 11];
        t.input(&echo(other, R, 1, 1, b""), &none, 0).unwrap();
        assert_eq!(t.input(&echo(other, R, 2, 1, b""), &none, 0), Err(Drop::TableFull));
        assert_eq!(t.len(), 3);
        assert_eq!(t.guest_flows(ip(G)), 2);
        assert_eq!((t.counters.dropped(Drop::ShareExceeded), t.counters.dropped(Drop::TableFull)), (1, 1));
        assert!(t.remove(0));
        assert!(t.input(&echo(other, R, 2, 1, b""), &none, 0).is_ok());
    }

    #[test]
    fn malformed_icmp_is_dropped_and_counted() {
        let mut t = IcmpTable::new(IcmpConfig::default());
        let none = VnetHeader::default();
        let good = echo(G, R, 1, 1, b"data");
        let fix_ip = |f: &mut Vec<u8>| {
            f[24..26].copy_from_slice(&[0, 0]);
            let c = finish(sum(&f[14..34], 0));
            f[24..26].copy_from_slice(&c.to_be_bytes());
        };
        let fix_icmp = |f: &mut Vec<u8>| {
            f[36..38].copy_from_slice(&[0, 0]);
            let c = finish(sum(&f[34..], 0));
            f[36..38].copy_from_slice(&c.to_be_bytes());
        };
        // Not an echo request: an echo reply, a timestamp request, a request with a code.
        for (ty, code) in [(0u8, 0u8), (13, 0), (8, 1)] {
            let mut f = good.clone();
            f[34] = ty;
            f[35] = code;
            fix_icmp(&mut f);
            assert_eq!(t.input(&f, &none, 0), Err(Drop::NotEchoRequest));
        }
        // A bad ICMP checksum.
        let mut f = good.clone();
        f[40] ^= 1;
        assert_eq!(t.input(&f, &none, 0), Err(Drop::BadIcmp));
        // Shorter than an echo header (the IP total length says so).
        let mut f = good[..34 + 6].to_vec();
        f[16..18].copy_from_slice(&26u16.to_be_bytes());
        fix_ip(&mut f);
        assert_eq!(t.input(&f, &none, 0), Err(Drop::BadIcmp));
        // An IP total length past the frame; a fragment; UDP; a GSO frame.
        let mut f = good.clone();
        f[16..18].copy_from_slice(&1000u16.to_be_bytes());
        fix_ip(&mut f);
        assert_eq!(t.input(&f, &none, 0), Err(Drop::BadIpHeader));
        let mut f = good.clone();
        f[20] = 0x20;
        fix_ip(&mut f);
        assert_eq!(t.input(&f, &none, 0), Err(Drop::Fragment));
        let mut f = good.clone();
        f[23] = 17;
        fix_ip(&mut f);
        assert_eq!(t.input(&f, &none, 0), Err(Drop::NotIcmp));
        let gso = VnetHeader { gso_type: crate::vnet::GSO_TCPV4, ..VnetHeader::default() };
        assert_eq!(t.input(&good, &gso, 0), Err(Drop::BadIcmp));
        for len in 0..good.len() {
            let _ = t.input(&good[..len], &none, 0);
        }
        assert!(t.is_empty());
        assert_eq!(t.counters.dropped(Drop::NotEchoRequest), 3);
        assert_eq!(t.counters.dropped(Drop::NotIcmp), 1);
        assert_eq!(t.counters.dropped(Drop::Fragment), 1);
        assert!(t.counters.dropped(Drop::BadIcmp) >= 3);
    }

    #[test]
    fn replies_that_are_not_echo_replies_or_do_not_fit_are_dropped() {
        let mut t = IcmpTable::new(IcmpConfig::default());
        let Ok(IcmpOp::Open { id, .. }) = t.input(&echo(G, R, 1, 1, b""), &VnetHeader::default(), 0) else { panic!() };
        let mut buf = vec![0u8; 64];
        let mut m = kernel_reply(5, 1, b"");
        m[0] = 3;
        buf[ICMP_FRAME_HDR..ICMP_FRAME_HDR + 8].copy_from_slice(&m);
        assert_eq!(t.reply(id, 8, &mut buf, 0), None);
        assert_eq!(t.reply(id, 7, &mut buf, 0), None, "shorter than an echo header");
        assert_eq!(t.reply(id, 64, &mut buf, 0), None, "past the buffer");
        assert_eq!(t.reply(id, usize::MAX, &mut buf, 0), None);
        assert_eq!(t.reply(99, 8, &mut buf, 0), None, "no such flow");
        assert_eq!(t.counters.dropped(Drop::BadIcmp), 4);
        assert_eq!(t.counters.bytes_to_guest, 0);
    }
}
