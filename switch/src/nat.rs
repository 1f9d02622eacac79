//! NAPT of TCP, UDP and ICMP echo to one external address (libvirt's masquerade), and the
//! port forwards that let the outside in. Pure: IPv4 packets in, rewritten in place, with the
//! time passed in by the caller.
//!
//! A connection is keyed twice: by its guest-side 5-tuple (outbound packets) and by its
//! external port and remote endpoint (inbound packets), so one external port serves many
//! remotes as conntrack does. The table is bounded: when it is full, the oldest connection
//! that never saw a reply (a SYN flood, a UDP scan) goes first, and only when there is none
//! the oldest of the rest, so a flooding guest evicts its own entries, not the established
//! connections of the others.

use std::collections::{HashMap, VecDeque};
use std::net::Ipv4Addr;

use crate::ipv4::{self, Ipv4Header, ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST};
use crate::proto::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP};
use crate::DropReason;

/// Idle timeouts, in milliseconds, per protocol and state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP before the handshake completes.
    pub tcp_new: u64,
    /// TCP established (RFC 5382 asks for at least 2 h 4 min).
    pub tcp_established: u64,
    /// TCP after a FIN or RST.
    pub tcp_closing: u64,
    /// UDP until the first reply, and after it.
    pub udp: u64,
    pub udp_replied: u64,
    pub icmp: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts { tcp_new: 120_000, tcp_established: 7_440_000, tcp_closing: 120_000, udp: 30_000, udp_replied: 180_000, icmp: 30_000 }
    }
}

/// An inbound port forward: `external` ports (a range) of `proto` on the external address to
/// `guest`, port `guest_port` and up (the n-th port of the range to the n-th guest port).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortForward {
    pub proto: u8,
    pub external: (u16, u16),
    pub guest: Ipv4Addr,
    pub guest_port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatConfig {
    /// Source ports (and ICMP identifiers) handed out on the external address.
    pub ports: (u16, u16),
    pub max_entries: usize,
    pub timeouts: Timeouts,
    pub forwards: Vec<PortForward>,
}

impl Default for NatConfig {
    fn default() -> Self {
        NatConfig { ports: (1024, 65535), max_entries: 65536, timeouts: Timeouts::default(), forwards: Vec::new() }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct OutKey {
    proto: u8,
    guest: Ipv4Addr,
    guest_port: u16,
    remote: Ipv4Addr,
    remote_port: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct InKey {
    proto: u8,
    port: u16,
    remote: Ipv4Addr,
    remote_port: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TcpState {
    SynSent,
    Established,
    Closing,
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    key: OutKey,
    port: u16,
    last_ms: u64,
    /// Traffic seen in both directions.
    replied: bool,
    tcp: TcpState,
    fins: u8,
    generation: u32,
}

/// What a flow is, seen from the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowInfo {
    pub proto: u8,
    pub guest: (Ipv4Addr, u16),
    pub external_port: u16,
    pub remote: (Ipv4Addr, u16),
}

/// The connection table of one network.
pub struct NatTable {
    cfg: NatConfig,
    external: Ipv4Addr,
    slots: Vec<Option<Entry>>,
    free: Vec<u32>,
    by_out: HashMap<OutKey, u32>,
    by_in: HashMap<InKey, u32>,
    /// Creation order, for eviction: (slot, generation); stale pairs are skipped.
    unreplied: VecDeque<(u32, u32)>,
    replied: VecDeque<(u32, u32)>,
    next_port: u16,
    generation: u32,
}

const PORT_TRIES: usize = 64;

/// The connection key fields of a packet: (remote-facing port or ICMP id, the other port).
fn l4_ports(ip: &[u8], h: &Ipv4Header) -> Option<(u16, u16)> {
    let p = ipv4::ports(ip, h)?;
    Some(if h.proto == IPPROTO_ICMP { (p.0, 0) } else { p })
}

fn tcp_flags(ip: &[u8], h: &Ipv4Header) -> u8 {
    if h.proto == IPPROTO_TCP {
        ip.get(h.ihl + 13).copied().unwrap_or(0)
    } else {
        0
    }
}

const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const ACK: u8 = 0x10;

impl NatTable {
    pub fn new(cfg: NatConfig, external: Ipv4Addr) -> NatTable {
        let next_port = cfg.ports.0;
        NatTable {
            cfg,
            external,
            slots: Vec::new(),
            free: Vec::new(),
            by_out: HashMap::new(),
            by_in: HashMap::new(),
            unreplied: VecDeque::new(),
            replied: VecDeque::new(),
            next_port,
            generation: 0,
        }
    }

    pub fn external(&self) -> Ipv4Addr {
        self.external
    }

    /// A new external address (a DHCP lease changed it): every connection is void.
    pub fn set_external(&mut self, ip: Ipv4Addr) {
        if ip != self.external {
            self.external = ip;
            self.clear();
        }
    }

    pub fn clear(&mut self) {
        self.slots.clear();
        self.free.clear();
        self.by_out.clear();
        self.by_in.clear();
        self.unreplied.clear();
        self.replied.clear();
    }

    /// Connections in the table.
    pub fn len(&self) -> usize {
        self.by_out.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_out.is_empty()
    }

    pub fn flows(&self) -> impl Iterator<Item = FlowInfo> + '_ {
        self.slots.iter().flatten().map(|e| FlowInfo {
            proto: e.key.proto,
            guest: (e.key.guest, e.key.guest_port),
            external_port: e.port,
            remote: (e.key.remote, e.key.remote_port),
        })
    }

    fn timeout(&self, e: &Entry) -> u64 {
        let t = &self.cfg.timeouts;
        match e.key.proto {
            IPPROTO_TCP => match e.tcp {
                TcpState::SynSent => t.tcp_new,
                TcpState::Established => t.tcp_established,
                TcpState::Closing => t.tcp_closing,
            },
            IPPROTO_UDP if e.replied => t.udp_replied,
            IPPROTO_UDP => t.udp,
            _ => t.icmp,
        }
    }

    fn alive(&self, slot: u32, now: u64) -> Option<Entry> {
        let e = self.slots.get(slot as usize).copied().flatten()?;
        (now.saturating_sub(e.last_ms) <= self.timeout(&e)).then_some(e)
    }

    fn remove(&mut self, slot: u32) {
        if let Some(e) = self.slots.get_mut(slot as usize).and_then(Option::take) {
            self.by_out.remove(&e.key);
            self.by_in.remove(&InKey { proto: e.key.proto, port: e.port, remote: e.key.remote, remote_port: e.key.remote_port });
            self.free.push(slot);
        }
    }

    /// Removes every connection idle for longer than its timeout.
    pub fn expire(&mut self, now: u64) {
        let dead: Vec<u32> =
            (0..self.slots.len() as u32).filter(|&s| self.slots[s as usize].is_some() && self.alive(s, now).is_none()).collect();
        for s in dead {
            self.remove(s);
        }
        // The eviction queues hold at most what is alive.
        let slots = &self.slots;
        let live = |&(s, g): &(u32, u32), replied: bool| slots[s as usize].is_some_and(|e| e.generation == g && e.replied == replied);
        self.unreplied.retain(|x| live(x, false));
        self.replied.retain(|x| live(x, true));
    }

    /// Makes room for one more connection: evicts the oldest that never saw a reply, else the
    /// oldest of all.
    fn make_room(&mut self) {
        while self.by_out.len() >= self.cfg.max_entries.max(1) {
            let victim = loop {
                let from_unreplied = !self.unreplied.is_empty();
                let q = if from_unreplied { &mut self.unreplied } else { &mut self.replied };
                let Some((s, g)) = q.pop_front() else { break None };
                if self.slots[s as usize].is_some_and(|e| e.generation == g && e.replied != from_unreplied) {
                    break Some(s);
                }
            };
            match victim {
                Some(s) => self.remove(s),
                None => return,
            }
        }
    }

    fn is_forwarded_port(&self, proto: u8, port: u16) -> bool {
        self.cfg.forwards.iter().any(|f| f.proto == proto && (f.external.0..=f.external.1).contains(&port))
    }

    /// An external port for a new connection to `remote`: the guest's own port if it is free
    /// and in the range (as Linux does), else the next free one after the last given.
    fn pick_port(&mut self, key: &OutKey) -> Option<u16> {
        let (lo, hi) = self.cfg.ports;
        let free = |t: &NatTable, p: u16| {
            !t.by_in.contains_key(&InKey { proto: key.proto, port: p, remote: key.remote, remote_port: key.remote_port })
                && !t.is_forwarded_port(key.proto, p)
        };
        if (lo..=hi).contains(&key.guest_port) && free(self, key.guest_port) {
            return Some(key.guest_port);
        }
        for _ in 0..PORT_TRIES {
            let p = self.next_port;
            self.next_port = if p >= hi || p < lo { lo } else { p + 1 };
            if (lo..=hi).contains(&p) && free(self, p) {
                return Some(p);
            }
        }
        None
    }

    fn insert(&mut self, key: OutKey, port: u16, now: u64) -> u32 {
        self.make_room();
        self.generation = self.generation.wrapping_add(1);
        let e = Entry { key, port, last_ms: now, replied: false, tcp: TcpState::SynSent, fins: 0, generation: self.generation };
        let slot = match self.free.pop() {
            Some(s) => {
                self.slots[s as usize] = Some(e);
                s
            }
            None => {
                self.slots.push(Some(e));
                (self.slots.len() - 1) as u32
            }
        };
        self.by_out.insert(key, slot);
        self.by_in.insert(InKey { proto: key.proto, port, remote: key.remote, remote_port: key.remote_port }, slot);
        self.unreplied.push_back((slot, self.generation));
        if self.unreplied.len() > 2 * self.cfg.max_entries.max(16) {
            let slots = &self.slots;
            self.unreplied.retain(|&(s, g)| slots[s as usize].is_some_and(|e| e.generation == g && !e.replied));
        }
        slot
    }

    /// Notes a packet of a connection: its time, its direction, its TCP flags.
    fn touch(&mut self, slot: u32, inbound: bool, flags: u8, now: u64) {
        let Some(e) = self.slots[slot as usize].as_mut() else { return };
        e.last_ms = now;
        let newly_replied = inbound && !e.replied && !(e.key.proto == IPPROTO_TCP && flags & RST != 0);
        if newly_replied {
            e.replied = true;
        }
        if e.key.proto == IPPROTO_TCP {
            if flags & RST != 0 {
                e.tcp = TcpState::Closing;
                e.fins = 3;
            } else if flags & FIN != 0 {
                e.fins |= if inbound { 2 } else { 1 };
                e.tcp = TcpState::Closing;
            } else if e.tcp == TcpState::SynSent && e.replied && flags & ACK != 0 {
                e.tcp = TcpState::Established;
            }
        }
        if newly_replied {
            let g = e.generation;
            self.replied.push_back((slot, g));
            if self.replied.len() > 2 * self.cfg.max_entries.max(16) {
                let slots = &self.slots;
                self.replied.retain(|&(s, g)| slots[s as usize].is_some_and(|e| e.generation == g && e.replied));
            }
        }
    }

    fn lookup_out(&mut self, key: &OutKey, now: u64) -> Option<u32> {
        let slot = *self.by_out.get(key)?;
        if self.alive(slot, now).is_some() {
            return Some(slot);
        }
        self.remove(slot);
        None
    }

    fn lookup_in(&mut self, key: &InKey, now: u64) -> Option<u32> {
        let slot = *self.by_in.get(key)?;
        if self.alive(slot, now).is_some() {
            return Some(slot);
        }
        self.remove(slot);
        None
    }

    /// Translates a packet from a guest to the outside: its source becomes the external
    /// address and port. `ip` is the IPv4 packet; `partial`: its transport checksum is a
    /// NEEDS_CSUM partial sum (a TSO frame's always is). A new TCP connection must start with
    /// a SYN; UDP and ICMP echo requests start one with any packet.
    pub fn outbound(&mut self, ip: &mut [u8], partial: bool, now: u64) -> Result<(), DropReason> {
        let h = ipv4::parse(ip, partial)?;
        if h.proto == IPPROTO_ICMP && ip.get(h.ihl).is_some_and(|&t| !matches!(t, ICMP_ECHO_REQUEST | ICMP_ECHO_REPLY)) {
            return self.icmp_error_out(ip, &h, now);
        }
        if !matches!(h.proto, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_ICMP) || h.fragment {
            return Err(DropReason::NatNoConnection);
        }
        let (sport, dport) = l4_ports(ip, &h).ok_or(DropReason::BadIpHeader)?;
        let key = OutKey { proto: h.proto, guest: h.src, guest_port: sport, remote: h.dst, remote_port: dport };
        let flags = tcp_flags(ip, &h);
        let slot = match self.lookup_out(&key, now) {
            Some(s) => s,
            None => {
                let starts = match h.proto {
                    IPPROTO_TCP => flags & (SYN | ACK | RST) == SYN,
                    IPPROTO_ICMP => ip[h.ihl] == ICMP_ECHO_REQUEST,
                    _ => true,
                };
                if !starts {
                    return Err(DropReason::NatNoConnection);
                }
                let port = self.pick_port(&key).ok_or(DropReason::NatTableFull)?;
                self.insert(key, port, now)
            }
        };
        self.touch(slot, false, flags, now);
        let Some(e) = self.slots[slot as usize] else { return Err(DropReason::NatNoConnection) };
        ipv4::rewrite(ip, &h, true, self.external, e.port, partial);
        Ok(())
    }

    /// Translates a packet from the outside to the external address: a reply of a known
    /// connection, a new connection to a port forward, or an ICMP error about a connection.
    /// Everything else is refused (`NatNoConnection`): the outside reaches guests only
    /// through port forwards.
    pub fn inbound(&mut self, ip: &mut [u8], partial: bool, now: u64) -> Result<(), DropReason> {
        let h = ipv4::parse(ip, partial)?;
        if h.dst != self.external {
            return Err(DropReason::NatNoConnection);
        }
        if h.proto == IPPROTO_ICMP && ip.get(h.ihl).is_some_and(|&t| !matches!(t, ICMP_ECHO_REQUEST | ICMP_ECHO_REPLY)) {
            return self.icmp_error_in(ip, &h, now);
        }
        if !matches!(h.proto, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_ICMP) || h.fragment {
            return Err(DropReason::NatNoConnection);
        }
        let (sport, dport) = l4_ports(ip, &h).ok_or(DropReason::BadIpHeader)?;
        // An echo reply's identifier is the port it came back to.
        let (dport, sport) = if h.proto == IPPROTO_ICMP { (sport, 0) } else { (dport, sport) };
        let key = InKey { proto: h.proto, port: dport, remote: h.src, remote_port: sport };
        let flags = tcp_flags(ip, &h);
        let slot = match self.lookup_in(&key, now) {
            Some(s) => s,
            None => {
                // Echo requests to the external address are the gateway's to answer, not NAT's.
                let fwd = self
                    .cfg
                    .forwards
                    .iter()
                    .find(|f| f.proto == h.proto && h.proto != IPPROTO_ICMP && (f.external.0..=f.external.1).contains(&dport));
                let Some(f) = fwd.copied() else { return Err(DropReason::NatNoConnection) };
                if h.proto == IPPROTO_TCP && flags & (SYN | ACK | RST) != SYN {
                    return Err(DropReason::NatNoConnection);
                }
                let guest_port = f.guest_port.wrapping_add(dport - f.external.0);
                let out = OutKey { proto: h.proto, guest: f.guest, guest_port, remote: h.src, remote_port: sport };
                if self.lookup_out(&out, now).is_some() {
                    return Err(DropReason::NatNoConnection);
                }
                self.insert(out, dport, now)
            }
        };
        self.touch(slot, true, flags, now);
        let Some(e) = self.slots[slot as usize] else { return Err(DropReason::NatNoConnection) };
        ipv4::rewrite(ip, &h, false, e.key.guest, e.key.guest_port, partial);
        Ok(())
    }

    /// An ICMP error from the outside about a packet a guest sent through NAT: the quoted
    /// packet's source and the error's destination go back to the guest's.
    fn icmp_error_in(&mut self, ip: &mut [u8], h: &Ipv4Header, now: u64) -> Result<(), DropReason> {
        let (q_at, q) = quoted(ip, h)?;
        if q.src != self.external {
            return Err(DropReason::NatNoConnection);
        }
        let (sport, dport) = l4_ports(&ip[q_at..], &q).ok_or(DropReason::NatNoConnection)?;
        let key = InKey { proto: q.proto, port: sport, remote: q.dst, remote_port: dport };
        let slot = self.lookup_in(&key, now).ok_or(DropReason::NatNoConnection)?;
        let e = self.slots[slot as usize].ok_or(DropReason::NatNoConnection)?;
        ipv4::rewrite(&mut ip[q_at..h.total], &q, true, e.key.guest, e.key.guest_port, false);
        ipv4::rewrite(ip, h, false, e.key.guest, 0, false);
        fix_icmp_checksum(ip, h);
        Ok(())
    }

    /// An ICMP error from a guest about a packet that came in through NAT (a port forward's
    /// UDP to a closed port): the quoted destination and the error's source become external.
    fn icmp_error_out(&mut self, ip: &mut [u8], h: &Ipv4Header, now: u64) -> Result<(), DropReason> {
        let (q_at, q) = quoted(ip, h)?;
        let (sport, dport) = l4_ports(&ip[q_at..], &q).ok_or(DropReason::NatNoConnection)?;
        let (remote_port, guest_port) = if q.proto == IPPROTO_ICMP { (0, sport) } else { (sport, dport) };
        let key = OutKey { proto: q.proto, guest: q.dst, guest_port, remote: q.src, remote_port };
        let slot = self.lookup_out(&key, now).ok_or(DropReason::NatNoConnection)?;
        let e = self.slots[slot as usize].ok_or(DropReason::NatNoConnection)?;
        ipv4::rewrite(&mut ip[q_at..h.total], &q, false, self.external, e.port, false);
        ipv4::rewrite(ip, h, true, self.external, 0, false);
        fix_icmp_checksum(ip, h);
        Ok(())
    }
}

/// The packet quoted in an ICMP error (its IP header and at least 8 bytes after it).
fn quoted(ip: &[u8], h: &Ipv4Header) -> Result<(usize, Ipv4Header), DropReason> {
    if h.fragment {
        return Err(DropReason::NatNoConnection);
    }
    let at = h.ihl + 8;
    let q = ip.get(at..h.total).ok_or(DropReason::BadIpHeader)?;
    let qh = ipv4::parse(q, true)?;
    if q.len() < qh.ihl + 8 || !matches!(qh.proto, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_ICMP) {
        return Err(DropReason::BadIpHeader);
    }
    Ok((at, qh))
}

fn fix_icmp_checksum(ip: &mut [u8], h: &Ipv4Header) {
    let icmp = &mut ip[h.ihl..h.total];
    icmp[2..4].copy_from_slice(&[0, 0]);
    let c = crate::checksum::checksum(icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
}

/// The ICMP identifier or ports of a packet, for callers that log or test (guest side first).
pub fn flow_of(ip: &[u8]) -> Option<(u8, Ipv4Addr, u16, Ipv4Addr, u16)> {
    let h = ipv4::parse(ip, true).ok()?;
    let (s, d) = l4_ports(ip, &h)?;
    Some((h.proto, h.src, s, h.dst, d))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipv4::{icmp_error, l4_checksum_ok, ICMP_DEST_UNREACH};
    use etherparse::PacketBuilder;

    const GUEST: [u8; 4] = [192, 168, 122, 10];
    const GUEST2: [u8; 4] = [192, 168, 122, 11];
    const EXT: Ipv4Addr = Ipv4Addr::new(10, 10, 11, 50);
    const SERVER: [u8; 4] = [10, 10, 11, 1];

    fn udp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
        let mut v = Vec::new();
        PacketBuilder::ipv4(src, dst, 64).udp(sport, dport).write(&mut v, b"query").unwrap();
        v
    }

    fn tcp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, flags: u8) -> Vec<u8> {
        let mut v = Vec::new();
        let mut b = PacketBuilder::ipv4(src, dst, 64).tcp(sport, dport, 1, 64240);
        if flags & SYN != 0 {
            b = b.syn();
        }
        if flags & ACK != 0 {
            b = b.ack(1);
        }
        if flags & FIN != 0 {
            b = b.fin();
        }
        if flags & RST != 0 {
            b = b.rst();
        }
        b.write(&mut v, &[]).unwrap();
        v
    }

    fn flow(p: &[u8]) -> (Ipv4Addr, u16, Ipv4Addr, u16) {
        let f = flow_of(p).unwrap();
        (f.1, f.2, f.3, f.4)
    }

    fn table() -> NatTable {
        NatTable::new(NatConfig::default(), EXT)
    }

    #[test]
    fn udp_goes_out_masqueraded_and_the_reply_comes_back() {
        let mut t = table();
        let mut q = udp(GUEST, 40000, SERVER, 53);
        t.outbound(&mut q, false, 0).unwrap();
        assert_eq!(flow(&q), (EXT, 40000, SERVER.into(), 53), "the guest's port is kept when free");
        assert!(l4_checksum_ok(&q));
        let mut r = udp(SERVER, 53, EXT.octets(), 40000);
        t.inbound(&mut r, false, 10).unwrap();
        assert_eq!(flow(&r), (SERVER.into(), 53, GUEST.into(), 40000));
        assert!(l4_checksum_ok(&r));
        // A stranger's packet to the same port is not a reply.
        let mut s = udp([10, 10, 11, 9], 53, EXT.octets(), 40000);
        assert_eq!(t.inbound(&mut s, false, 10), Err(DropReason::NatNoConnection));
    }

    #[test]
    fn two_guests_with_the_same_source_port_get_different_external_ports() {
        let mut t = table();
        let (mut a, mut b) = (tcp(GUEST, 5000, SERVER, 80, SYN), tcp(GUEST2, 5000, SERVER, 80, SYN));
        t.outbound(&mut a, false, 0).unwrap();
        t.outbound(&mut b, false, 0).unwrap();
        let (pa, pb) = (flow(&a).1, flow(&b).1);
        assert_ne!(pa, pb);
        let mut ra = tcp(SERVER, 80, EXT.octets(), pa, SYN | ACK);
        let mut rb = tcp(SERVER, 80, EXT.octets(), pb, SYN | ACK);
        t.inbound(&mut ra, false, 1).unwrap();
        t.inbound(&mut rb, false, 1).unwrap();
        assert_eq!((flow(&ra).2, flow(&rb).2), (GUEST.into(), GUEST2.into()));
        assert!(l4_checksum_ok(&ra) && l4_checksum_ok(&rb));
    }

    #[test]
    fn tcp_needs_a_syn_to_start_and_inbound_needs_a_forward() {
        let mut t = table();
        let mut ack = tcp(GUEST, 5000, SERVER, 80, ACK);
        assert_eq!(t.outbound(&mut ack, false, 0), Err(DropReason::NatNoConnection));
        let mut syn = tcp(SERVER, 5000, EXT.octets(), 22, SYN);
        assert_eq!(t.inbound(&mut syn, false, 0), Err(DropReason::NatNoConnection));
        let mut ping = Vec::new();
        PacketBuilder::ipv4(SERVER, EXT.octets(), 64).icmpv4_echo_request(1, 1).write(&mut ping, b"x").unwrap();
        assert_eq!(t.inbound(&mut ping, false, 0), Err(DropReason::NatNoConnection));
        assert!(t.is_empty());
    }

    #[test]
    fn port_forwards_let_the_outside_in_and_the_replies_out() {
        let cfg = NatConfig {
            forwards: vec![
                PortForward { proto: IPPROTO_TCP, external: (2222, 2222), guest: GUEST.into(), guest_port: 22 },
                PortForward { proto: IPPROTO_UDP, external: (6000, 6009), guest: GUEST2.into(), guest_port: 7000 },
            ],
            ..NatConfig::default()
        };
        let mut t = NatTable::new(cfg, EXT);
        let mut syn = tcp(SERVER, 33333, EXT.octets(), 2222, SYN);
        t.inbound(&mut syn, false, 0).unwrap();
        assert_eq!(flow(&syn), (SERVER.into(), 33333, GUEST.into(), 22));
        let mut synack = tcp(GUEST, 22, SERVER, 33333, SYN | ACK);
        t.outbound(&mut synack, false, 1).unwrap();
        assert_eq!(flow(&synack), (EXT, 2222, SERVER.into(), 33333));
        let mut d = udp(SERVER, 1234, EXT.octets(), 6003);
        t.inbound(&mut d, false, 2).unwrap();
        assert_eq!(flow(&d), (SERVER.into(), 1234, GUEST2.into(), 7003), "the range maps port by port");
        // A forwarded port is never handed to an outbound connection.
        let mut o = udp(GUEST, 6005, SERVER, 9);
        t.outbound(&mut o, false, 3).unwrap();
        assert_ne!(flow(&o).1, 6005);
        // A non-SYN to a forward does not open it.
        let mut ack = tcp(SERVER, 40000, EXT.octets(), 2222, ACK);
        assert_eq!(t.inbound(&mut ack, false, 4), Err(DropReason::NatNoConnection));
    }

    #[test]
    fn icmp_echo_and_errors_are_translated_with_their_quoted_headers() {
        let mut t = table();
        let mut ping = Vec::new();
        PacketBuilder::ipv4(GUEST, SERVER, 64).icmpv4_echo_request(0x77, 1).write(&mut ping, b"ping").unwrap();
        t.outbound(&mut ping, false, 0).unwrap();
        let (_, id, _, _) = flow(&ping);
        assert!(l4_checksum_ok(&ping));
        let mut pong = Vec::new();
        PacketBuilder::ipv4(SERVER, EXT.octets(), 64).icmpv4_echo_reply(id, 1).write(&mut pong, b"ping").unwrap();
        t.inbound(&mut pong, false, 1).unwrap();
        assert_eq!(flow(&pong), (SERVER.into(), 0x77, GUEST.into(), 0));
        assert!(l4_checksum_ok(&pong));

        // The LAN says port unreachable about a translated UDP packet.
        let mut q = udp(GUEST, 40000, SERVER, 9999);
        t.outbound(&mut q, false, 2).unwrap();
        let mut err = Vec::new();
        assert!(icmp_error(&mut err, [1; 6], [2; 6], SERVER.into(), &q, ICMP_DEST_UNREACH, 3, 1500));
        let mut err = err[14..].to_vec();
        t.inbound(&mut err, false, 3).unwrap();
        assert_eq!(&err[16..20], &GUEST, "the error goes to the guest");
        assert!(l4_checksum_ok(&err) && crate::checksum::checksum(&err[..20]) == 0);
        let quoted = &err[28..];
        assert_eq!(flow(quoted), (GUEST.into(), 40000, SERVER.into(), 9999), "the quoted packet is the guest's own");
        assert_eq!(crate::checksum::checksum(&quoted[..20]), 0);
        assert!(l4_checksum_ok(quoted), "the quoted UDP checksum is fixed too");
    }

    #[test]
    fn connections_time_out_per_protocol_and_state() {
        let mut t = table();
        let mut q = udp(GUEST, 40000, SERVER, 53);
        t.outbound(&mut q, false, 0).unwrap();
        let mut syn = tcp(GUEST, 5000, SERVER, 80, SYN);
        t.outbound(&mut syn, false, 0).unwrap();
        let p = flow(&syn).1;
        let mut sa = tcp(SERVER, 80, EXT.octets(), p, SYN | ACK);
        t.inbound(&mut sa, false, 1).unwrap();
        let mut a = tcp(GUEST, 5000, SERVER, 80, ACK);
        t.outbound(&mut a, false, 2).unwrap();
        t.expire(31_000);
        assert_eq!(t.len(), 1, "the unreplied UDP flow is gone after 30 s, the TCP connection stays");
        t.expire(2 + 7_000_000);
        assert_eq!(t.len(), 1, "an established connection lives for hours");
        let mut fin = tcp(GUEST, 5000, SERVER, 80, FIN | ACK);
        t.outbound(&mut fin, false, 7_000_000).unwrap();
        t.expire(7_000_000 + 121_000);
        assert!(t.is_empty(), "a closing connection goes after 2 minutes");
    }

    #[test]
    fn a_flood_fills_the_table_to_its_limit_and_evicts_its_own_entries_first() {
        let cfg = NatConfig { max_entries: 1000, ..NatConfig::default() };
        let mut t = NatTable::new(cfg, EXT);
        // An established connection of another guest.
        let mut syn = tcp(GUEST2, 5000, SERVER, 80, SYN);
        t.outbound(&mut syn, false, 0).unwrap();
        let p = flow(&syn).1;
        let mut sa = tcp(SERVER, 80, EXT.octets(), p, SYN | ACK);
        t.inbound(&mut sa, false, 0).unwrap();
        // 100 000 UDP flows from one guest.
        for i in 0..100_000u32 {
            let mut q = udp(GUEST, 1024 + (i % 60000) as u16, [10, 20, (i >> 8) as u8, i as u8], 53);
            t.outbound(&mut q, false, 1).unwrap();
            assert!(t.len() <= 1000);
        }
        assert_eq!(t.len(), 1000);
        let mut more = tcp(SERVER, 80, EXT.octets(), p, ACK);
        t.inbound(&mut more, false, 2).expect("the other guest's connection survived the flood");
        assert_eq!(flow(&more).2, Ipv4Addr::from(GUEST2));
        assert!(t.unreplied.len() <= 2 * 1000 && t.replied.len() <= 2 * 1000);
    }

    #[test]
    fn gso_frames_translate_with_partial_checksums() {
        let mut t = table();
        let mut syn = tcp(GUEST, 5000, SERVER, 80, SYN);
        t.outbound(&mut syn, false, 0).unwrap();
        // A 64 KiB TSO segment: its total length field may be 0, its checksum partial.
        let mut big = tcp(GUEST, 5000, SERVER, 80, ACK);
        big.resize(60_000, 0xab);
        big[2..4].copy_from_slice(&[0, 0]);
        t.outbound(&mut big, true, 1).unwrap();
        assert_eq!(flow(&big), (EXT, flow(&syn).1, SERVER.into(), 80));
    }

    #[test]
    fn garbage_never_panics() {
        let mut t = table();
        let mut x = 0x1234_5678u32;
        for len in 0..200usize {
            let mut p: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            if len > 20 {
                p[0] = 0x45;
                p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
                p[9] = [1, 6, 17][len % 3];
            }
            let _ = t.outbound(&mut p.clone(), len % 2 == 0, 0);
            let _ = t.inbound(&mut p, len % 2 == 1, 0);
        }
    }
}
