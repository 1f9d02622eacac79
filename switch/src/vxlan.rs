//! VXLAN (RFC 7348): the 8-byte header, the outer UDP source port chosen from a hash of the
//! inner flow, and the table of which remote tunnel endpoint (VTEP) each inner MAC lives
//! behind. No sockets here: the backend's uplink sends and receives the datagrams.
//!
//! Receive policy for the header (`| flags | reserved(24) | VNI(24) | reserved(8) |`): the I
//! flag must be set; the P bit of VXLAN-GPE (0x04, "next protocol present") is refused,
//! because such a payload need not be Ethernet; every other reserved bit and field is ignored
//! as RFC 7348 asks ("ignored on receipt"), so extensions that keep an Ethernet payload (the
//! Group Based Policy bits, for one) still pass. Sent headers have only the I flag set.
//!
//! The learning table maps (VNI, inner source MAC) to the outer source address it came from,
//! ages entries like the MAC table, and is bounded: each remote holds at most a quota of it,
//! so one remote flooding new source MACs replaces its own oldest entries and never pushes
//! out another remote's ([`crate::ledger`]).

use std::collections::HashMap;
use std::net::Ipv4Addr;

use crate::ledger::{Ledger, Room};
use crate::{is_multicast, DropReason, Mac};

/// The VXLAN header's length.
pub const HEADER_LEN: usize = 8;
/// IANA's VXLAN port.
pub const DEFAULT_PORT: u16 = 4789;
/// What the encapsulation adds to an inner IP packet, as seen by the underlay's MTU: outer
/// IPv4 (20) + UDP (8) + VXLAN (8) + inner Ethernet (14). A network's MTU defaults to the
/// underlay's minus this.
pub const OVERHEAD: u16 = 50;
/// The "I" flag: the VNI is valid.
pub const FLAG_I: u8 = 0x08;
/// VXLAN-GPE's "next protocol" bit: the payload may not be Ethernet.
pub const FLAG_GPE_P: u8 = 0x04;
/// The largest VNI (24 bits).
pub const MAX_VNI: u32 = 0x00ff_ffff;
/// The outer source ports RFC 7348 recommends (the dynamic range).
pub const SRC_PORT_MIN: u16 = 49152;
pub const SRC_PORT_MAX: u16 = 65535;

/// The header of a datagram carrying VNI `vni` (taken modulo 2^24).
pub fn header(vni: u32) -> [u8; HEADER_LEN] {
    let v = (vni & MAX_VNI).to_be_bytes();
    [FLAG_I, 0, 0, 0, v[1], v[2], v[3], 0]
}

/// Checks a received datagram's header and returns its VNI and inner frame. The inner frame
/// must hold an Ethernet header and be at most `max_inner` bytes (the network's MTU plus the
/// Ethernet header and a VLAN tag). The VNI is not checked here: see [`Decap::vni`].
pub fn parse(datagram: &[u8], max_inner: usize) -> Result<(u32, &[u8]), DropReason> {
    if datagram.len() < HEADER_LEN {
        return Err(DropReason::VxlanShort);
    }
    let flags = datagram[0];
    if flags & FLAG_I == 0 || flags & FLAG_GPE_P != 0 {
        return Err(DropReason::VxlanBadFlags);
    }
    let vni = u32::from_be_bytes([0, datagram[4], datagram[5], datagram[6]]);
    let inner = &datagram[HEADER_LEN..];
    if inner.len() < crate::MIN_FRAME_LEN {
        return Err(DropReason::ShortFrame);
    }
    if inner.len() > max_inner {
        return Err(DropReason::Oversize);
    }
    Ok((vni, inner))
}

/// The FNV-1a hash of an inner frame's flow: IPv4 or IPv6 addresses and, for TCP, UDP and
/// SCTP outside fragments, the ports; else the MACs and EtherType. One flow always hashes the
/// same, so its packets take one path through the underlay and arrive in order.
pub fn flow_hash(frame: &[u8]) -> u32 {
    let fnv = |data: &[u8], mut h: u32| {
        for &b in data {
            h = (h ^ b as u32).wrapping_mul(0x0100_0193);
        }
        h
    };
    let h = 0x811c_9dc5;
    if frame.len() < 14 {
        return fnv(frame, h);
    }
    let mut l3 = 14;
    let mut ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    if ethertype == crate::proto::ETH_P_8021Q && frame.len() >= 18 {
        ethertype = u16::from_be_bytes([frame[16], frame[17]]);
        l3 = 18;
    }
    let ports = |at: usize, proto: u8| match proto {
        6 | 17 | 132 => frame.get(at..at + 4).unwrap_or(&[]),
        _ => &[],
    };
    let ip = frame.get(l3..).unwrap_or(&[]);
    match ethertype {
        crate::proto::ETH_P_IPV4 if ip.len() >= 20 && ip[0] >> 4 == 4 => {
            let ihl = (ip[0] & 0x0f) as usize * 4;
            // Later fragments have no ports; the first one's would split the flow.
            let fragment = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0;
            let l4 = if fragment { &[][..] } else { ports(l3 + ihl, ip[9]) };
            fnv(l4, fnv(&[ip[9]], fnv(&ip[12..20], h)))
        }
        crate::proto::ETH_P_IPV6 if ip.len() >= 40 && ip[0] >> 4 == 6 => fnv(ports(l3 + 40, ip[6]), fnv(&[ip[6]], fnv(&ip[8..40], h))),
        _ => fnv(&frame[0..14], h),
    }
}

/// The outer UDP source port for a flow hash, spread over `min..=max` as the kernel does
/// (the hash scaled to the range, not taken modulo it).
pub fn source_port(hash: u32, min: u16, max: u16) -> u16 {
    let (lo, hi) = (min.min(max) as u64, min.max(max) as u64);
    // Mixed first: FNV's high bits depend little on the last bytes (the ports).
    let mut h = hash;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    (lo + ((h as u64 * (hi - lo + 1)) >> 32)) as u16
}

/// Where a frame for a remote goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// To the one remote its destination was learned behind.
    One(Ipv4Addr),
    /// To every remote of the flood list (head-end replication): broadcast, multicast,
    /// unknown unicast.
    Flood,
}

/// What learning a source did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Learned {
    /// A new entry (perhaps in place of the remote's oldest, or an expired one).
    New,
    /// Seen again behind the same remote.
    Refreshed,
    /// The station moved to another remote.
    Moved,
    /// Not learned: a multicast source, or no room (the table then floods to it).
    Skipped,
}

/// How often an entry seen again moves to the back of the eviction order.
const TOUCH_MS: u64 = 1000;

#[derive(Clone, Copy, Debug)]
struct Entry {
    remote: Ipv4Addr,
    seen_ms: u64,
    stamp: u64,
    touched_ms: u64,
}

type Key = (u32, Mac);

fn owner(remote: Ipv4Addr) -> usize {
    u32::from(remote) as usize
}

/// A learned entry as `port-list` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub vni: u32,
    pub mac: Mac,
    pub remote: Ipv4Addr,
    /// Milliseconds since it was last seen.
    pub age_ms: u64,
}

/// The learning table: (VNI, inner MAC) → remote VTEP, aged and bounded.
#[derive(Debug)]
pub struct Table {
    entries: HashMap<Key, Entry>,
    ledger: Ledger<Key>,
    aging_ms: u64,
    capacity: usize,
    quota: usize,
    /// Entries replaced to make room (a remote at its quota, or a full table).
    pub evicted: u64,
}

impl Table {
    /// A table of at most `capacity` entries, of which one remote may hold `quota`.
    pub fn new(aging_ms: u64, capacity: usize, quota: usize) -> Table {
        let capacity = capacity.max(1);
        Table { entries: HashMap::new(), ledger: Ledger::default(), aging_ms, capacity, quota: quota.clamp(1, capacity), evicted: 0 }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Entries learned behind `remote`.
    pub fn count(&self, remote: Ipv4Addr) -> usize {
        self.ledger.count(owner(remote))
    }

    fn remove(&mut self, k: &Key) {
        if let Some(e) = self.entries.remove(k) {
            self.ledger.removed(owner(e.remote));
        }
    }

    fn compact(&mut self, remote: Ipv4Addr) {
        let entries = &self.entries;
        self.ledger.compact(owner(remote), |k, s| entries.get(k).is_some_and(|e| e.stamp == s));
    }

    /// Learns that `src` (of VNI `vni`) is behind `remote`, at `now_ms`.
    pub fn learn(&mut self, vni: u32, src: Mac, remote: Ipv4Addr, now_ms: u64) -> Learned {
        if is_multicast(&src) || src == [0; 6] {
            return Learned::Skipped;
        }
        let k = (vni, src);
        let mut moved = false;
        if let Some(e) = self.entries.get_mut(&k) {
            if e.remote == remote {
                e.seen_ms = now_ms;
                if now_ms.saturating_sub(e.touched_ms) >= TOUCH_MS {
                    e.touched_ms = now_ms;
                    e.stamp = self.ledger.touch(k, owner(remote));
                    self.compact(remote);
                }
                return Learned::Refreshed;
            }
            moved = true;
            self.remove(&k);
        }
        let (entries, aging) = (&self.entries, self.aging_ms);
        let room = self.ledger.make_room(
            owner(remote),
            self.quota,
            self.capacity,
            |k, s| entries.get(k).is_some_and(|e| e.stamp == s),
            |k| entries.get(k).is_some_and(|e| now_ms.saturating_sub(e.seen_ms) >= aging),
        );
        match room {
            Room::Full => return Learned::Skipped,
            Room::Evict(old) => {
                self.remove(&old);
                self.evicted += 1;
            }
            Room::Free => {}
        }
        let stamp = self.ledger.add(k, owner(remote));
        self.entries.insert(k, Entry { remote, seen_ms: now_ms, stamp, touched_ms: now_ms });
        self.compact(remote);
        if moved {
            Learned::Moved
        } else {
            Learned::New
        }
    }

    /// Where a frame of VNI `vni` to `dst` goes.
    pub fn lookup(&self, vni: u32, dst: &Mac, now_ms: u64) -> Target {
        if is_multicast(dst) {
            return Target::Flood;
        }
        match self.entries.get(&(vni, *dst)) {
            Some(e) if now_ms.saturating_sub(e.seen_ms) < self.aging_ms => Target::One(e.remote),
            _ => Target::Flood,
        }
    }

    /// Removes the entries older than the aging time, oldest first.
    pub fn expire(&mut self, now_ms: u64) {
        loop {
            let (entries, aging) = (&self.entries, self.aging_ms);
            match self.ledger.oldest(None, |k, s| entries.get(k).is_some_and(|e| e.stamp == s)) {
                Some(k) if entries.get(&k).is_some_and(|e| now_ms.saturating_sub(e.seen_ms) >= aging) => self.remove(&k),
                _ => return,
            }
        }
    }

    /// The live entries, by VNI and MAC.
    pub fn endpoints(&self, now_ms: u64) -> Vec<Endpoint> {
        let mut v: Vec<Endpoint> = self
            .entries
            .iter()
            .filter(|(_, e)| now_ms.saturating_sub(e.seen_ms) < self.aging_ms)
            .map(|(&(vni, mac), e)| Endpoint { vni, mac, remote: e.remote, age_ms: now_ms.saturating_sub(e.seen_ms) })
            .collect();
        v.sort_by_key(|e| (e.vni, e.mac));
        v
    }
}

/// Receive-side state of one VNI: checks a datagram and learns its inner source.
#[derive(Debug)]
pub struct Decap {
    pub vni: u32,
    /// The largest inner frame accepted.
    pub max_inner: usize,
}

impl Decap {
    /// Checks a datagram from `from` and learns its inner source in `table`; returns the inner
    /// frame's offset and length within `datagram`.
    pub fn input(&self, datagram: &[u8], from: Ipv4Addr, table: &mut Table, now_ms: u64) -> Result<(usize, usize), DropReason> {
        let (vni, inner) = parse(datagram, self.max_inner)?;
        if vni != self.vni {
            return Err(DropReason::VxlanUnknownVni);
        }
        let src = crate::src_mac(inner);
        if is_multicast(&src) || src == [0; 6] {
            return Err(DropReason::BadSourceMac);
        }
        table.learn(vni, src, from, now_ms);
        Ok((HEADER_LEN, inner.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
    const B: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

    fn mac(i: u32) -> Mac {
        let b = i.to_be_bytes();
        [0x52, 0x54, b[0], b[1], b[2], b[3]]
    }

    fn datagram(vni: u32, inner_len: usize) -> Vec<u8> {
        let mut d = header(vni).to_vec();
        let mut inner = vec![0u8; inner_len];
        if inner_len >= 14 {
            inner[0..6].copy_from_slice(&[0xff; 6]);
            inner[6..12].copy_from_slice(&mac(7));
            inner[12..14].copy_from_slice(&[0x08, 0x06]);
        }
        d.extend_from_slice(&inner);
        d
    }

    #[test]
    fn header_round_trips_and_reserved_bits_are_ignored_on_receipt() {
        assert_eq!(header(42), [0x08, 0, 0, 0, 0, 0, 42, 0]);
        assert_eq!(header(0x0123_4567), [0x08, 0, 0, 0, 0x23, 0x45, 0x67, 0], "24 bits of VNI");
        let d = datagram(0xabcdef, 60);
        assert_eq!(parse(&d, 1518).map(|(v, i)| (v, i.len())), Ok((0xabcdef, 60)));
        // RFC 7348: reserved fields are ignored on receipt (GBP's bits among them).
        let mut r = d.clone();
        r[0] |= 0x80;
        r[1] = 0xff;
        r[2] = 0x12;
        r[3] = 0x34;
        r[7] = 0x99;
        assert_eq!(parse(&r, 1518).map(|(v, _)| v), Ok(0xabcdef));
    }

    #[test]
    fn bad_datagrams_are_dropped_with_their_reason() {
        assert_eq!(parse(&[], 1518), Err(DropReason::VxlanShort));
        assert_eq!(parse(&header(1)[..7], 1518), Err(DropReason::VxlanShort));
        let mut no_i = datagram(1, 60);
        no_i[0] = 0;
        assert_eq!(parse(&no_i, 1518), Err(DropReason::VxlanBadFlags));
        let mut gpe = datagram(1, 60);
        gpe[0] |= FLAG_GPE_P;
        assert_eq!(parse(&gpe, 1518), Err(DropReason::VxlanBadFlags), "a GPE payload need not be Ethernet");
        assert_eq!(parse(&datagram(1, 13), 1518), Err(DropReason::ShortFrame));
        assert_eq!(parse(&datagram(1, 0), 1518), Err(DropReason::ShortFrame));
        assert_eq!(parse(&datagram(1, 1519), 1518), Err(DropReason::Oversize));
        assert!(parse(&datagram(1, 1518), 1518).is_ok());
        let d = Decap { vni: 42, max_inner: 1518 };
        let mut t = Table::new(300_000, 16, 4);
        assert_eq!(d.input(&datagram(43, 60), A, &mut t, 0), Err(DropReason::VxlanUnknownVni));
        assert!(t.is_empty(), "nothing learned from a dropped datagram");
        let mut mcast_src = datagram(42, 60);
        mcast_src[8 + 6] = 0x01;
        assert_eq!(d.input(&mcast_src, A, &mut t, 0), Err(DropReason::BadSourceMac));
        let mut zero_src = datagram(42, 60);
        zero_src[8 + 6..8 + 12].fill(0);
        assert_eq!(d.input(&zero_src, A, &mut t, 0), Err(DropReason::BadSourceMac));
        assert_eq!(d.input(&datagram(42, 60), A, &mut t, 0), Ok((8, 60)));
        assert_eq!(t.lookup(42, &mac(7), 1), Target::One(A), "the inner source was learned behind its sender");
        assert_eq!(t.lookup(43, &mac(7), 1), Target::Flood, "per VNI");
    }

    #[test]
    fn flows_hash_stably_and_spread_over_the_source_port_range() {
        let frame = |sport: u16| {
            let mut f = vec![0u8; 14 + 20 + 20];
            f[12..14].copy_from_slice(&[0x08, 0x00]);
            f[14] = 0x45;
            f[23] = 6;
            f[26..30].copy_from_slice(&[10, 0, 0, 1]);
            f[30..34].copy_from_slice(&[10, 0, 0, 2]);
            f[34..36].copy_from_slice(&sport.to_be_bytes());
            f[36..38].copy_from_slice(&5201u16.to_be_bytes());
            f
        };
        assert_eq!(flow_hash(&frame(1000)), flow_hash(&frame(1000)));
        let mut ports = std::collections::HashSet::new();
        for s in 1000..1256 {
            let p = source_port(flow_hash(&frame(s)), SRC_PORT_MIN, SRC_PORT_MAX);
            assert!(p >= SRC_PORT_MIN);
            ports.insert(p);
        }
        assert!(ports.len() > 200, "256 flows take {} source ports", ports.len());
        // A payload change is the same flow.
        let (mut a, b) = (frame(1000), frame(1000));
        a.extend_from_slice(b"payload");
        assert_eq!(flow_hash(&a), flow_hash(&b));
        // Later fragments carry no ports: the flow is the addresses.
        let mut frag = frame(1000);
        frag[20] = 0x00;
        frag[21] = 0x10;
        let mut frag2 = frame(2000);
        frag2[20] = 0x00;
        frag2[21] = 0x10;
        assert_eq!(flow_hash(&frag), flow_hash(&frag2));
        assert_eq!(source_port(0, 100, 100), 100);
        assert_eq!(source_port(u32::MAX, 100, 101).max(100), source_port(u32::MAX, 100, 101));
        assert!(flow_hash(&[1, 2, 3]) != flow_hash(&[1, 2, 4]));
    }

    #[test]
    fn learned_entries_age_out_and_stations_move() {
        let mut t = Table::new(300_000, 16, 8);
        assert_eq!(t.learn(42, mac(1), A, 0), Learned::New);
        assert_eq!(t.learn(42, mac(1), A, 10), Learned::Refreshed);
        assert_eq!(t.lookup(42, &mac(1), 299_000), Target::One(A));
        assert_eq!(t.lookup(42, &mac(1), 300_010), Target::Flood, "aged");
        assert_eq!(t.lookup(42, &[0xff; 6], 0), Target::Flood);
        assert_eq!(t.learn(42, [0x01, 0, 0x5e, 0, 0, 1], A, 0), Learned::Skipped, "never a multicast source");
        assert_eq!(t.learn(42, mac(1), B, 20), Learned::Moved);
        assert_eq!(t.lookup(42, &mac(1), 30), Target::One(B));
        assert_eq!((t.count(A), t.count(B)), (0, 1));
        assert_eq!(t.endpoints(30), vec![Endpoint { vni: 42, mac: mac(1), remote: B, age_ms: 10 }]);
        t.learn(42, mac(2), A, 100_000);
        t.expire(300_050);
        assert_eq!(t.len(), 1, "the entry last seen at 20 expired, the one at 100 000 did not");
        t.expire(400_000);
        assert!(t.is_empty());
    }

    /// What the fuzz target checks, over pseudo-random datagrams (valid headers mostly, from a
    /// few remotes): never a panic, the bounds hold, an accepted source is found behind its
    /// sender at once.
    #[test]
    fn random_datagrams_keep_the_table_within_bounds() {
        let mut t = Table::new(300_000, 64, 16);
        let d = Decap { vni: 42, max_inner: 1518 };
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut accepted = 0;
        for i in 0..50_000u64 {
            let r = next();
            let len = (r % 100) as usize;
            let mut dgram: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if r & 0x300 != 0 && len >= 8 {
                dgram[..8].copy_from_slice(&header(42));
            }
            let from = Ipv4Addr::new(10, 0, 0, (r >> 16) as u8 % 8);
            if let Ok((at, n)) = d.input(&dgram, from, &mut t, i * 10) {
                accepted += 1;
                let src: Mac = dgram[at + 6..at + 12].try_into().unwrap();
                assert_eq!(t.lookup(42, &src, i * 10), Target::One(from));
                assert!(n >= 14 && source_port(flow_hash(&dgram[at..at + n]), SRC_PORT_MIN, SRC_PORT_MAX) >= SRC_PORT_MIN);
            }
            assert!(t.len() <= 64 && t.count(from) <= 16);
        }
        assert!(accepted > 10_000, "most valid headers were accepted ({accepted})");
    }

    #[test]
    fn a_source_mac_flood_from_one_remote_stays_within_its_quota() {
        let mut t = Table::new(300_000, 64, 16);
        for i in 0..8 {
            t.learn(42, mac(i), B, 0);
        }
        for i in 1000..101_000 {
            t.learn(42, mac(i), A, 1 + i as u64 / 100);
        }
        assert!(t.len() <= 64);
        assert_eq!(t.count(A), 16, "the flooding remote holds its quota");
        assert_eq!(t.count(B), 8, "the other remote lost nothing");
        assert!((0..8).all(|i| t.lookup(42, &mac(i), 1000) == Target::One(B)));
        assert!((100_984..101_000).all(|i| t.lookup(42, &mac(i), 1000) == Target::One(A)), "the flood keeps its newest");
        assert_eq!(t.evicted, 100_000 - 16);
        // A full table of many remotes each below quota still makes room.
        let mut t = Table::new(300_000, 8, 8);
        for r in 0..16u32 {
            t.learn(1, mac(r), Ipv4Addr::from(0x0a00_0100 + r), r as u64);
        }
        assert_eq!(t.len(), 8);
    }
}
