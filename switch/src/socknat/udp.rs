//! UDP through host sockets: one connected host socket per guest flow, as passt and libslirp
//! do. A flow is keyed by the guest's (address, port) and the remote (address, port), so a
//! reply read from the socket goes back to exactly the guest port that sent, and the kernel's
//! connected-socket filtering keeps strangers out. Flows expire when idle; the table is
//! bounded in all and per guest, and a full table drops new flows (counted), never old ones.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use super::wire::{self, Link};
use super::{Counters, Drop, FlowId, FlowKey};
use crate::proto::IPPROTO_UDP;
use crate::vnet::VnetHeader;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpConfig {
    pub max_flows: usize,
    pub max_per_guest: usize,
    /// Idle time-out (ms): passt's 180 s.
    pub idle_ms: u64,
    /// Idle time-out for flows to port 53 (ms): a query and its answer, then gone (libslirp's
    /// 10 s), so resolvers that use a new source port per query do not fill the table.
    pub dns_idle_ms: u64,
}

impl Default for UdpConfig {
    fn default() -> Self {
        UdpConfig { max_flows: 4096, max_per_guest: 1024, idle_ms: 180_000, dns_idle_ms: 10_000 }
    }
}

/// What the I/O layer does with a guest datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UdpOp<'a> {
    /// A new flow: open a UDP socket, `connect()` it to `remote`, then send `payload` on it.
    Open { id: FlowId, remote: SocketAddr, payload: &'a [u8] },
    /// An existing flow: `send()` on its socket.
    Send { id: FlowId, payload: &'a [u8] },
}

#[derive(Clone, Copy, Debug)]
struct Flow {
    key: FlowKey,
    link: Link,
    last_ms: u64,
    idle_ms: u64,
}

/// The UDP flows of one network.
pub struct UdpTable {
    cfg: UdpConfig,
    slots: Vec<Option<Flow>>,
    free: Vec<FlowId>,
    by_key: HashMap<FlowKey, FlowId>,
    per_guest: HashMap<IpAddr, usize>,
    live: usize,
    ip_id: u16,
    pub counters: Counters,
}

impl UdpTable {
    pub fn new(cfg: UdpConfig) -> UdpTable {
        UdpTable {
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

    /// The flow's guest and remote ends.
    pub fn key(&self, id: FlowId) -> Option<FlowKey> {
        Some(self.slots.get(id)?.as_ref()?.key)
    }

    /// A UDP frame from a guest: which socket its payload goes out on.
    pub fn input<'a>(&mut self, frame: &'a [u8], hdr: &VnetHeader, now: u64) -> Result<UdpOp<'a>, Drop> {
        let d = wire::parse_udp(frame, hdr).inspect_err(|&why| self.counters.drop(why))?;
        let key = FlowKey { guest: d.src, remote: d.dst };
        self.counters.bytes_to_host += d.payload.len() as u64;
        if let Some(&id) = self.by_key.get(&key) {
            if let Some(f) = self.slots[id].as_mut() {
                f.last_ms = now;
                // A guest that moved to another MAC (a new NIC) gets its replies there.
                f.link = d.link;
            }
            return Ok(UdpOp::Send { id, payload: d.payload });
        }
        match self.open(key, d.link, now) {
            Ok(id) => Ok(UdpOp::Open { id, remote: d.dst, payload: d.payload }),
            Err(why) => {
                self.counters.bytes_to_host -= d.payload.len() as u64;
                Err(why)
            }
        }
    }

    fn open(&mut self, key: FlowKey, link: Link, now: u64) -> Result<FlowId, Drop> {
        let why = if self.live >= self.cfg.max_flows {
            Drop::TableFull
        } else if self.guest_flows(key.guest.ip()) >= self.cfg.max_per_guest {
            Drop::ShareExceeded
        } else {
            let idle_ms = if key.remote.port() == 53 { self.cfg.dns_idle_ms } else { self.cfg.idle_ms };
            let id = super::place(&mut self.slots, &mut self.free, Flow { key, link, last_ms: now, idle_ms });
            self.by_key.insert(key, id);
            *self.per_guest.entry(key.guest.ip()).or_insert(0) += 1;
            self.live += 1;
            return Ok(id);
        };
        self.counters.drop(why);
        Err(why)
    }

    /// A datagram from `remote` came in on a forwarded host port for `guest`: the flow its
    /// replies belong to, made now if there is none (bounded like the guest's own flows). The
    /// I/O layer sends what the guest answers on this flow from the forwarded port's socket.
    pub fn open_inbound(&mut self, link: Link, guest: SocketAddr, remote: SocketAddr, now: u64) -> Result<FlowId, Drop> {
        let key = FlowKey { guest, remote };
        if let Some(&id) = self.by_key.get(&key) {
            return Ok(id);
        }
        self.open(key, link, now)
    }

    /// The flow of a guest's end and a remote end, if there is one.
    pub fn get(&self, key: &FlowKey) -> Option<FlowId> {
        self.by_key.get(key).copied()
    }

    /// A datagram the flow's socket received: the caller put `len` payload bytes at
    /// `wire::UDP_FRAME_HDR` in `buf`; this writes the headers in front, from the remote to the
    /// guest's own port. Returns the frame length, or None for an unknown flow or a datagram
    /// that does not fit `buf` or an IP packet.
    pub fn reply(&mut self, id: FlowId, len: usize, buf: &mut [u8], now: u64) -> Option<usize> {
        let f = self.slots.get_mut(id)?.as_mut()?;
        f.last_ms = now;
        let (link, key) = (f.link, f.key);
        self.ip_id = self.ip_id.wrapping_add(1);
        let n = wire::write_udp(buf, &link, key.remote, key.guest, len, self.ip_id)?;
        self.counters.bytes_to_guest += len as u64;
        Some(n)
    }

    /// The socket reported an error for what the guest sent (`ECONNREFUSED` from an ICMP port
    /// unreachable, `EHOSTUNREACH`, ...): an ICMP destination unreachable with `code` for the
    /// guest, built in `buf`. Returns its length.
    pub fn unreachable(&mut self, id: FlowId, code: u8, buf: &mut [u8]) -> Option<usize> {
        let f = self.slots.get(id)?.as_ref()?;
        let (link, key) = (f.link, f.key);
        self.counters.unreachable += 1;
        self.ip_id = self.ip_id.wrapping_add(1);
        wire::write_icmp_unreach(buf, &link, &key, IPPROTO_UDP, 0, code, self.ip_id)
    }

    /// Removes the flows idle too long and passes each id to `closed`, for the I/O layer to
    /// close its socket.
    pub fn tick(&mut self, now: u64, mut closed: impl FnMut(FlowId)) {
        for id in 0..self.slots.len() {
            let expired = matches!(&self.slots[id], Some(f) if now.saturating_sub(f.last_ms) >= f.idle_ms);
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
        if let Some(n) = self.per_guest.get_mut(&f.key.guest.ip()) {
            *n -= 1;
            if *n == 0 {
                self.per_guest.remove(&f.key.guest.ip());
            }
        }
        self.free.push(id);
        self.live -= 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddrV4};

    use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};

    use super::*;
    use crate::checksum::{finish, pseudo_v4, sum};

    const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0x10];
    const GW_MAC: [u8; 6] = [2, 0x76, 0x75, 0, 0, 1];

    fn dgram(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        PacketBuilder::ethernet2(GUEST_MAC, GW_MAC).ipv4(src, dst, 64).udp(sport, dport).write(&mut v, payload).unwrap();
        v
    }

    fn sa(ip: [u8; 4], port: u16) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(ip), port))
    }

    const G: [u8; 4] = [192, 168, 122, 10];
    const R: [u8; 4] = [10, 9, 8, 7];

    #[test]
    fn open_send_reply_and_expire() {
        let mut t = UdpTable::new(UdpConfig::default());
        let none = VnetHeader::default();
        let f = dgram(G, 5000, R, 7, b"hello");
        let Ok(UdpOp::Open { id, remote, payload }) = t.input(&f, &none, 0) else { panic!() };
        assert_eq!(remote, sa(R, 7));
        assert_eq!(payload, b"hello");
        let f2 = dgram(G, 5000, R, 7, b"again");
        assert_eq!(t.input(&f2, &none, 1000), Ok(UdpOp::Send { id, payload: b"again" }));
        // Another source port is another flow (another socket).
        assert!(matches!(t.input(&dgram(G, 5001, R, 7, b"x"), &none, 1000), Ok(UdpOp::Open { .. })));
        // A reply comes back to the guest's port 5000, from the remote.
        let mut buf = vec![0u8; 2048];
        buf[wire::UDP_FRAME_HDR..wire::UDP_FRAME_HDR + 5].copy_from_slice(b"world");
        let n = t.reply(id, 5, &mut buf, 2000).unwrap();
        let p = SlicedPacket::from_ethernet(&buf[..n]).unwrap();
        let Some(NetSlice::Ipv4(ip)) = &p.net else { panic!() };
        assert_eq!((ip.header().source(), ip.header().destination()), (R, G));
        let Some(TransportSlice::Udp(u)) = &p.transport else { panic!() };
        assert_eq!((u.source_port(), u.destination_port()), (7, 5000));
        assert_eq!(u.payload(), b"world");
        let l4 = &buf[34..n];
        assert_eq!(finish(sum(l4, pseudo_v4(&R, &G, 17, l4.len() as u16))), 0);
        assert_eq!(&buf[0..6], &GUEST_MAC);
        // Idle: both flows go after 180 s without traffic; the replied one counts from 2 s.
        let mut closed = Vec::new();
        t.tick(181_000, |id| closed.push(id));
        assert_eq!(closed.len(), 1);
        t.tick(182_000, |id| closed.push(id));
        assert_eq!(closed.len(), 2);
        assert!(t.is_empty());
        assert_eq!(t.reply(id, 5, &mut vec![0u8; 2048], 0), None);
    }

    #[test]
    fn a_forwarded_datagram_makes_the_flow_the_guests_answer_belongs_to() {
        let mut t = UdpTable::new(UdpConfig { max_flows: 2, max_per_guest: 2, ..UdpConfig::default() });
        let link = Link { guest_mac: GUEST_MAC, gw_mac: GW_MAC };
        let id = t.open_inbound(link, sa(G, 53), sa(R, 4000), 0).unwrap();
        // Again from the same peer: the same flow.
        assert_eq!(t.open_inbound(link, sa(G, 53), sa(R, 4000), 10), Ok(id));
        // The guest's answer, from its port 53 to the peer, is that flow's.
        let none = VnetHeader::default();
        assert_eq!(t.input(&dgram(G, 53, R, 4000, b"answer"), &none, 20), Ok(UdpOp::Send { id, payload: b"answer" }));
        assert_eq!(t.get(&FlowKey { guest: sa(G, 53), remote: sa(R, 4000) }), Some(id));
        // Bounded like the guest's own flows.
        t.open_inbound(link, sa(G, 53), sa(R, 4001), 0).unwrap();
        assert_eq!(t.open_inbound(link, sa(G, 53), sa(R, 4002), 0), Err(Drop::TableFull));
    }

    #[test]
    fn dns_flows_expire_sooner() {
        let mut t = UdpTable::new(UdpConfig::default());
        t.input(&dgram(G, 5000, R, 53, b"q"), &VnetHeader::default(), 0).unwrap();
        let mut closed = 0;
        t.tick(10_000, |_| closed += 1);
        assert_eq!(closed, 1);
    }

    #[test]
    fn bounded_per_guest_and_in_all_without_eviction() {
        let mut t = UdpTable::new(UdpConfig { max_flows: 5, max_per_guest: 3, ..UdpConfig::default() });
        let none = VnetHeader::default();
        for p in 0..3 {
            assert!(t.input(&dgram(G, 6000 + p, R, 9, b"x"), &none, 0).is_ok());
        }
        assert_eq!(t.input(&dgram(G, 7000, R, 9, b"x"), &none, 0), Err(Drop::ShareExceeded));
        // The existing flows still work.
        assert!(matches!(t.input(&dgram(G, 6000, R, 9, b"x"), &none, 0), Ok(UdpOp::Send { .. })));
        let other = [192, 168, 122, 11];
        for p in 0..2 {
            assert!(t.input(&dgram(other, 6000 + p, R, 9, b"x"), &none, 0).is_ok());
        }
        assert_eq!(t.input(&dgram(other, 7000, R, 9, b"x"), &none, 0), Err(Drop::TableFull));
        assert_eq!(t.len(), 5);
        assert_eq!(t.counters.dropped(Drop::ShareExceeded), 1);
        assert_eq!(t.counters.dropped(Drop::TableFull), 1);
    }

    #[test]
    fn port_unreachable_goes_back_as_icmp() {
        let mut t = UdpTable::new(UdpConfig::default());
        let Ok(UdpOp::Open { id, .. }) = t.input(&dgram(G, 5000, R, 9, b"x"), &VnetHeader::default(), 0) else { panic!() };
        let mut buf = vec![0u8; 128];
        let n = t.unreachable(id, 3, &mut buf).unwrap();
        let p = SlicedPacket::from_ethernet(&buf[..n]).unwrap();
        let Some(TransportSlice::Icmpv4(i)) = &p.transport else { panic!() };
        assert_eq!((i.slice()[0], i.slice()[1]), (3, 3));
        assert_eq!(finish(sum(&buf[34..n], 0)), 0);
        // The quote names the guest's port and the remote's.
        let q = &buf[34 + 8..n];
        assert_eq!(u16::from_be_bytes([q[20], q[21]]), 5000);
        assert_eq!(u16::from_be_bytes([q[22], q[23]]), 9);
    }

    #[test]
    fn malformed_datagrams_are_counted() {
        let mut t = UdpTable::new(UdpConfig::default());
        let none = VnetHeader::default();
        let good = dgram(G, 5000, R, 9, b"payload");
        let mut f = good.clone();
        f[34 + 4..34 + 6].copy_from_slice(&100u16.to_be_bytes()); // UDP length past the packet
        assert_eq!(t.input(&f, &none, 0), Err(Drop::BadUdpHeader));
        let mut f = good.clone();
        f[34 + 4..34 + 6].copy_from_slice(&4u16.to_be_bytes()); // shorter than the header
        assert_eq!(t.input(&f, &none, 0), Err(Drop::BadUdpHeader));
        assert_eq!(t.input(&good[..40], &none, 0), Err(Drop::BadIpHeader));
        let gso = VnetHeader { gso_type: crate::vnet::GSO_UDP, ..VnetHeader::default() };
        assert_eq!(t.input(&good, &gso, 0), Err(Drop::BadUdpHeader));
        for len in 0..good.len() {
            let _ = t.input(&good[..len], &none, 0);
        }
        assert!(t.is_empty());
        assert_eq!(t.counters.dropped(Drop::BadUdpHeader), 3);
    }
}
