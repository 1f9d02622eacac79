//! ARP for the router: parsing and building Ethernet/IPv4 ARP packets, and a neighbor cache
//! with a bounded queue of frames waiting for their next hop to answer. The cache is bounded,
//! and the neighbors one port causes (by sending from an address, answering ARP, or sending
//! to a next hop) take at most a quarter of it: at its quota a port replaces its own oldest.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::Ipv4Addr;

use crate::ledger::{Ledger, Owner, Room};
use crate::proto::ETH_P_ARP;
use crate::vnet::VnetHeader;
use crate::Mac;

pub const OP_REQUEST: u16 = 1;
pub const OP_REPLY: u16 = 2;

/// An Ethernet/IPv4 ARP packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arp {
    pub op: u16,
    pub sender_mac: Mac,
    pub sender_ip: Ipv4Addr,
    pub target_mac: Mac,
    pub target_ip: Ipv4Addr,
}

/// Parses the ARP packet of an Ethernet frame; None for anything else or anything odd.
pub fn parse(frame: &[u8]) -> Option<Arp> {
    if frame.len() < 14 + 28 || frame[12..14] != ETH_P_ARP.to_be_bytes() {
        return None;
    }
    let a = &frame[14..42];
    if a[0..2] != [0, 1] || a[2..4] != [0x08, 0x00] || a[4] != 6 || a[5] != 4 {
        return None;
    }
    let op = u16::from_be_bytes([a[6], a[7]]);
    let sender_mac: Mac = a[8..14].try_into().ok()?;
    if !matches!(op, OP_REQUEST | OP_REPLY) || crate::is_multicast(&sender_mac) {
        return None;
    }
    Some(Arp {
        op,
        sender_mac,
        sender_ip: Ipv4Addr::new(a[14], a[15], a[16], a[17]),
        target_mac: a[18..24].try_into().ok()?,
        target_ip: Ipv4Addr::new(a[24], a[25], a[26], a[27]),
    })
}

/// Builds an ARP frame (padded to the Ethernet minimum). Requests go to broadcast.
pub fn build(out: &mut Vec<u8>, a: &Arp) {
    out.clear();
    let dst = if a.op == OP_REQUEST { [0xff; 6] } else { a.target_mac };
    out.extend_from_slice(&dst);
    out.extend_from_slice(&a.sender_mac);
    out.extend_from_slice(&ETH_P_ARP.to_be_bytes());
    out.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4]);
    out.extend_from_slice(&a.op.to_be_bytes());
    out.extend_from_slice(&a.sender_mac);
    out.extend_from_slice(&a.sender_ip.octets());
    out.extend_from_slice(&a.target_mac);
    out.extend_from_slice(&a.target_ip.octets());
    out.resize(60, 0);
}

/// A frame waiting for its next hop's MAC.
pub type Pending = (VnetHeader, Vec<u8>);

struct Neighbor {
    mac: Option<Mac>,
    /// When the MAC was learned, or when the last request went out.
    at_ms: u64,
    tries: u8,
    queue: Vec<Pending>,
    /// The port that caused the entry, and its place in the eviction order.
    owner: Owner,
    stamp: u64,
    touched: u64,
}

impl Neighbor {
    /// Neither waiting for an answer nor heard from for a long time.
    fn stale(&self, now: u64) -> bool {
        !(self.mac.is_none() && self.tries > 0) && now.saturating_sub(self.at_ms) > 2 * REACHABLE_MS
    }
}

/// What to do about a next hop.
#[derive(Debug, PartialEq, Eq)]
pub enum Resolve {
    Known(Mac),
    /// Unknown: the frame is queued (if there was room) and an ARP request is due.
    Request,
    /// Unknown and a request is already out: the frame is queued (if there was room).
    Waiting,
}

/// The neighbors of one side of the router, by address: IPv4 (ARP) or IPv6 (neighbour
/// discovery, the same bounds and quotas).
pub struct Neighbors<A = Ipv4Addr> {
    table: HashMap<A, Neighbor>,
    ledger: Ledger<A>,
    queued: usize,
    capacity: usize,
    /// Most neighbors one port may cause.
    quota: usize,
}

/// How long a learned MAC is trusted without being heard again.
pub const REACHABLE_MS: u64 = 300_000;
/// Interval between ARP requests, and how many before giving up.
pub const RETRY_MS: u64 = 1_000;
pub const MAX_TRIES: u8 = 3;
/// Bounds: neighbors per side, frames waiting per neighbor and in all.
pub const MAX_NEIGHBORS: usize = 4096;
pub const QUEUE_PER_NEIGHBOR: usize = 8;
pub const QUEUE_TOTAL: usize = 256;
/// How often a neighbor in use moves to the back of the eviction order.
const TOUCH_MS: u64 = 1000;

impl<A: Copy + Eq + Hash> Default for Neighbors<A> {
    fn default() -> Self {
        Self::new()
    }
}

impl<A: Copy + Eq + Hash> Neighbors<A> {
    pub fn new() -> Neighbors<A> {
        Neighbors::with_limits(MAX_NEIGHBORS, MAX_NEIGHBORS / 4)
    }

    /// A cache of `capacity` neighbors, of which one port may cause `quota`.
    pub fn with_limits(capacity: usize, quota: usize) -> Neighbors<A> {
        Neighbors { table: HashMap::new(), ledger: Ledger::default(), queued: 0, capacity, quota: quota.max(1) }
    }

    /// Records looked at to evict neighbors so far (the cost tests read it).
    pub fn eviction_work(&self) -> u64 {
        self.ledger.examined
    }

    fn remove(&mut self, ip: &A) {
        if let Some(n) = self.table.remove(ip) {
            self.queued -= n.queue.len();
            self.ledger.removed(n.owner);
        }
    }

    /// Adds `ip` for `owner`, making room first; false if there is none.
    fn insert(&mut self, ip: A, owner: Owner, at_ms: u64, now: u64) -> bool {
        let table = &self.table;
        let room = self.ledger.make_room(
            owner,
            self.quota,
            self.capacity,
            |k, s| table.get(k).is_some_and(|n| n.stamp == s),
            |k| table.get(k).is_some_and(|n| n.stale(now)),
        );
        match room {
            Room::Full => return false,
            Room::Evict(old) => self.remove(&old),
            Room::Free => {}
        }
        let stamp = self.ledger.add(ip, owner);
        self.table.insert(ip, Neighbor { mac: None, at_ms, tries: 0, queue: Vec::new(), owner, stamp, touched: now });
        self.compact(owner);
        true
    }

    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// The MAC of `ip` if it is known and fresh.
    pub fn lookup(&self, ip: A, now: u64) -> Option<Mac> {
        self.table.get(&ip).filter(|n| now.saturating_sub(n.at_ms) <= REACHABLE_MS).and_then(|n| n.mac)
    }

    /// Learns (or refreshes) `ip` at `mac`, heard from port `owner`; returns the frames that
    /// were waiting for it.
    pub fn learn(&mut self, ip: A, mac: Mac, now: u64, owner: Owner) -> Vec<Pending> {
        if !self.table.contains_key(&ip) && !self.insert(ip, owner, now, now) {
            return Vec::new();
        }
        let Some(n) = self.table.get_mut(&ip) else { return Vec::new() };
        n.mac = Some(mac);
        n.at_ms = now;
        n.tries = 0;
        self.queued -= n.queue.len();
        let waiting = std::mem::take(&mut n.queue);
        if now.saturating_sub(n.touched) >= TOUCH_MS {
            n.touched = now;
            let owner = n.owner;
            n.stamp = self.ledger.touch(ip, owner);
            self.compact(owner);
        }
        waiting
    }

    fn compact(&mut self, owner: Owner) {
        let table = &self.table;
        self.ledger.compact(owner, |k, s| table.get(k).is_some_and(|n| n.stamp == s));
    }

    /// Only refreshes `ip` if it is already a neighbor (what a router learns from a request
    /// that was not for it).
    pub fn refresh(&mut self, ip: A, mac: Mac, now: u64, owner: Owner) -> Vec<Pending> {
        if self.table.get(&ip).is_some_and(|n| n.mac.is_some() || !n.queue.is_empty()) {
            return self.learn(ip, mac, now, owner);
        }
        Vec::new()
    }

    /// Resolves `ip` for a frame from port `owner`: its MAC, or the frame is kept until the
    /// answer comes.
    pub fn resolve(&mut self, ip: A, frame: impl FnOnce() -> Pending, now: u64, owner: Owner) -> Resolve {
        if let Some(mac) = self.lookup(ip, now) {
            return Resolve::Known(mac);
        }
        if !self.table.contains_key(&ip) && !self.insert(ip, owner, 0, now) {
            return Resolve::Waiting;
        }
        let Some(n) = self.table.get_mut(&ip) else { return Resolve::Waiting };
        if n.mac.is_some() {
            // Stale: ask again, as for a new one.
            n.mac = None;
            n.tries = 0;
            n.at_ms = 0;
        }
        if n.queue.len() < QUEUE_PER_NEIGHBOR && self.queued < QUEUE_TOTAL {
            n.queue.push(frame());
            self.queued += 1;
        }
        if n.tries == 0 {
            n.tries = 1;
            n.at_ms = now;
            Resolve::Request
        } else {
            Resolve::Waiting
        }
    }

    /// Retries due requests (their targets are returned) and gives up on neighbors that never
    /// answered (their waiting frames are returned, to be answered with host unreachable).
    pub fn tick(&mut self, now: u64) -> (Vec<A>, Vec<Pending>) {
        let mut ask = Vec::new();
        let mut failed = Vec::new();
        let ledger = &mut self.ledger;
        self.table.retain(|ip, n| {
            if n.mac.is_some() || n.tries == 0 || now.saturating_sub(n.at_ms) < RETRY_MS {
                return true;
            }
            if n.tries >= MAX_TRIES {
                failed.append(&mut n.queue);
                ledger.removed(n.owner);
                return false;
            }
            n.tries += 1;
            n.at_ms = now;
            ask.push(*ip);
            true
        });
        self.queued -= failed.len();
        (ask, failed)
    }

    /// Forgets neighbors not heard from for a long time (the router's timer, once a second:
    /// a full table does not call it per new entry).
    pub fn expire(&mut self, now: u64) {
        let mut dropped = 0;
        let ledger = &mut self.ledger;
        self.table.retain(|_, n| {
            if n.stale(now) {
                dropped += n.queue.len();
                ledger.removed(n.owner);
                return false;
            }
            true
        });
        self.queued -= dropped;
    }

    pub fn queued(&self) -> usize {
        self.queued
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: Mac = [2, 0, 0, 0, 0, 1];
    const HIM: Mac = [2, 0, 0, 0, 0, 2];

    #[test]
    fn arp_round_trip_and_garbage() {
        let a = Arp {
            op: OP_REQUEST,
            sender_mac: ME,
            sender_ip: Ipv4Addr::new(10, 0, 0, 1),
            target_mac: [0; 6],
            target_ip: Ipv4Addr::new(10, 0, 0, 2),
        };
        let mut f = Vec::new();
        build(&mut f, &a);
        assert_eq!((f.len(), &f[0..6]), (60, &[0xffu8; 6][..]));
        assert_eq!(parse(&f), Some(a));
        let mut bad = f.clone();
        bad[21] = 9; // unknown operation
        assert_eq!(parse(&bad), None);
        assert_eq!(parse(&f[..41]), None);
        let mut mc = f.clone();
        mc[22] = 1; // multicast sender
        assert_eq!(parse(&mc), None);
    }

    #[test]
    fn resolution_queues_then_releases_or_gives_up() {
        let mut n = Neighbors::new();
        let ip = Ipv4Addr::new(10, 0, 0, 2);
        let frame = || (VnetHeader::default(), vec![1u8; 60]);
        assert_eq!(n.resolve(ip, frame, 0, 0), Resolve::Request);
        assert_eq!(n.resolve(ip, frame, 10, 0), Resolve::Waiting);
        assert_eq!(n.queued(), 2);
        let released = n.learn(ip, HIM, 20, 0);
        assert_eq!((released.len(), n.queued()), (2, 0));
        assert_eq!(n.resolve(ip, frame, 30, 0), Resolve::Known(HIM));

        let silent = Ipv4Addr::new(10, 0, 0, 3);
        for _ in 0..100 {
            n.resolve(silent, frame, 0, 0);
        }
        assert_eq!(n.queued(), QUEUE_PER_NEIGHBOR, "bounded per neighbor");
        let (ask, failed) = n.tick(1_000);
        assert_eq!((ask, failed.len()), (vec![silent], 0));
        let (ask, _) = n.tick(2_000);
        assert_eq!(ask, vec![silent]);
        let (ask, failed) = n.tick(3_000);
        assert_eq!((ask.len(), failed.len(), n.queued()), (0, QUEUE_PER_NEIGHBOR, 0), "given up after 3 requests");
    }

    #[test]
    fn the_table_and_its_queue_are_bounded() {
        let mut n = Neighbors::new();
        for i in 0..(MAX_NEIGHBORS as u32 + 500) {
            n.resolve(Ipv4Addr::from(0x0a00_0000 + i), || (VnetHeader::default(), vec![0; 60]), 0, i as usize % 8);
        }
        assert!(n.len() <= MAX_NEIGHBORS);
        assert!(n.queued() <= QUEUE_TOTAL);
        // A request that was not for us only refreshes what we know.
        assert!(n.refresh(Ipv4Addr::new(192, 168, 9, 9), HIM, 0, 0).is_empty());
        assert_eq!(n.lookup(Ipv4Addr::new(192, 168, 9, 9), 0), None);
    }

    #[test]
    fn neighbors_one_port_causes_do_not_push_out_anothers() {
        let mut n = Neighbors::with_limits(64, 16);
        let (gw, peer) = (Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2));
        n.learn(gw, HIM, 0, 1);
        n.learn(peer, HIM, 0, 1);
        // Port 0 sends to 10,000 next hops, and answers ARP for as many addresses.
        for i in 0..10_000u32 {
            n.resolve(Ipv4Addr::from(0x0b00_0000 + i), || (VnetHeader::default(), vec![0; 60]), 1, 0);
            n.learn(Ipv4Addr::from(0x0c00_0000 + i), ME, 1, 0);
        }
        assert_eq!((n.lookup(gw, 2), n.lookup(peer, 2)), (Some(HIM), Some(HIM)), "port 1's neighbors stay");
        assert_eq!(n.lookup(Ipv4Addr::from(0x0c00_0000 + 9_999), 2), Some(ME), "port 0 keeps its newest");
        // Another port still gets its next hop resolved.
        let third = Ipv4Addr::new(10, 0, 0, 3);
        assert_eq!(n.resolve(third, || (VnetHeader::default(), vec![0; 60]), 3, 2), Resolve::Request);
        assert_eq!(n.learn(third, HIM, 4, 2).len(), 1, "its frame waited for the answer");
        assert!(n.len() <= 64);
        assert!(n.queued() <= QUEUE_TOTAL);
    }

    #[test]
    fn a_full_cache_takes_new_neighbors_in_constant_time_each() {
        const M: u32 = 4096;
        const N: u32 = 20_000;
        let mut n = Neighbors::with_limits(M as usize, M as usize);
        for i in 0..M {
            n.learn(Ipv4Addr::from(0x0a00_0000 + i), HIM, 0, 0);
        }
        let before = n.eviction_work();
        for i in M..M + N {
            n.learn(Ipv4Addr::from(0x0a00_0000 + i), HIM, 1, 0);
        }
        assert_eq!(n.len(), M as usize);
        assert_eq!(n.lookup(Ipv4Addr::from(0x0a00_0000 + M + N - 1), 2), Some(HIM), "the newest is learned");
        assert_eq!(n.lookup(Ipv4Addr::from(0x0a00_0000), 2), None, "in place of the oldest");
        let work = n.eviction_work() - before;
        assert!(work <= 4 * (N + M) as u64, "{work} records looked at for {N} neighbors into a cache of {M}");
    }
}
