//! ARP for the router: parsing and building Ethernet/IPv4 ARP packets, and a neighbor cache
//! with a bounded queue of frames waiting for their next hop to answer.

use std::collections::HashMap;
use std::net::Ipv4Addr;

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

/// The neighbors of one side of the router.
pub struct Neighbors {
    table: HashMap<Ipv4Addr, Neighbor>,
    queued: usize,
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

impl Default for Neighbors {
    fn default() -> Self {
        Self::new()
    }
}

impl Neighbors {
    pub fn new() -> Neighbors {
        Neighbors { table: HashMap::new(), queued: 0 }
    }

    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// The MAC of `ip` if it is known and fresh.
    pub fn lookup(&self, ip: Ipv4Addr, now: u64) -> Option<Mac> {
        self.table.get(&ip).filter(|n| now.saturating_sub(n.at_ms) <= REACHABLE_MS).and_then(|n| n.mac)
    }

    /// Learns (or refreshes) `ip` at `mac`; returns the frames that were waiting for it.
    pub fn learn(&mut self, ip: Ipv4Addr, mac: Mac, now: u64) -> Vec<Pending> {
        if self.table.len() >= MAX_NEIGHBORS && !self.table.contains_key(&ip) {
            self.expire(now);
            if self.table.len() >= MAX_NEIGHBORS {
                return Vec::new();
            }
        }
        let n = self.table.entry(ip).or_insert(Neighbor { mac: None, at_ms: now, tries: 0, queue: Vec::new() });
        n.mac = Some(mac);
        n.at_ms = now;
        n.tries = 0;
        self.queued -= n.queue.len();
        std::mem::take(&mut n.queue)
    }

    /// Only refreshes `ip` if it is already a neighbor (what a router learns from a request
    /// that was not for it).
    pub fn refresh(&mut self, ip: Ipv4Addr, mac: Mac, now: u64) -> Vec<Pending> {
        if self.table.get(&ip).is_some_and(|n| n.mac.is_some() || !n.queue.is_empty()) {
            return self.learn(ip, mac, now);
        }
        Vec::new()
    }

    /// Resolves `ip` for a frame: its MAC, or the frame is kept until the answer comes.
    pub fn resolve(&mut self, ip: Ipv4Addr, frame: impl FnOnce() -> Pending, now: u64) -> Resolve {
        if let Some(mac) = self.lookup(ip, now) {
            return Resolve::Known(mac);
        }
        if self.table.len() >= MAX_NEIGHBORS && !self.table.contains_key(&ip) {
            self.expire(now);
            if self.table.len() >= MAX_NEIGHBORS {
                return Resolve::Waiting;
            }
        }
        let n = self.table.entry(ip).or_insert(Neighbor { mac: None, at_ms: 0, tries: 0, queue: Vec::new() });
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
    pub fn tick(&mut self, now: u64) -> (Vec<Ipv4Addr>, Vec<Pending>) {
        let mut ask = Vec::new();
        let mut failed = Vec::new();
        self.table.retain(|ip, n| {
            if n.mac.is_some() || n.tries == 0 || now.saturating_sub(n.at_ms) < RETRY_MS {
                return true;
            }
            if n.tries >= MAX_TRIES {
                failed.append(&mut n.queue);
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

    /// Forgets neighbors not heard from for a long time.
    pub fn expire(&mut self, now: u64) {
        let mut dropped = 0;
        self.table.retain(|_, n| {
            let keep = n.mac.is_none() && n.tries > 0 || now.saturating_sub(n.at_ms) <= 2 * REACHABLE_MS;
            if !keep {
                dropped += n.queue.len();
            }
            keep
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
        assert_eq!(n.resolve(ip, frame, 0), Resolve::Request);
        assert_eq!(n.resolve(ip, frame, 10), Resolve::Waiting);
        assert_eq!(n.queued(), 2);
        let released = n.learn(ip, HIM, 20);
        assert_eq!((released.len(), n.queued()), (2, 0));
        assert_eq!(n.resolve(ip, frame, 30), Resolve::Known(HIM));

        let silent = Ipv4Addr::new(10, 0, 0, 3);
        for _ in 0..100 {
            n.resolve(silent, frame, 0);
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
            n.resolve(Ipv4Addr::from(0x0a00_0000 + i), || (VnetHeader::default(), vec![0; 60]), 0);
        }
        assert!(n.len() <= MAX_NEIGHBORS);
        assert!(n.queued() <= QUEUE_TOTAL);
        // A request that was not for us only refreshes what we know.
        assert!(n.refresh(Ipv4Addr::new(192, 168, 9, 9), HIM, 0).is_empty());
        assert_eq!(n.lookup(Ipv4Addr::new(192, 168, 9, 9), 0), None);
    }
}
