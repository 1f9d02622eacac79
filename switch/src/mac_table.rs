//! The MAC learning table of one network: source addresses are learned per port, entries age
//! out (300 s by default, like the Linux bridge and OVS), and the table has a hard size limit
//! so a guest spraying random source MACs cannot grow it without bound (it then floods, which
//! is correct, just slower). One port holds at most a quarter of it: a port at its quota
//! replaces its own least recently seen address, never another port's, in O(1) amortized time
//! ([`crate::ledger`]).
//!
//! A guest port with port security *pins* its MAC here ([`MacTable::claim`]): one port per MAC,
//! a pinned entry never ages and never moves, and a frame from any other port (a bridged
//! uplink too) with that source MAC is refused. This is the one place that rule lives, so what
//! may move a pinned MAC (a live migration, on the VMM's request) has one place to go through.

use crate::ledger::{Ledger, Room};
use crate::vlan::Vid;
use crate::{is_multicast, DropReason, Mac};
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// MAC addresses are 48 random-ish bits already: a multiply-and-shift is enough to spread
/// them, and far cheaper per frame than SipHash. (HashDoS is not a concern: the table is
/// bounded and a flood of colliding addresses only makes the lookups slower, not unbounded.)
#[derive(Default)]
struct MacHasher(u64);

impl Hasher for MacHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | b as u64;
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
    fn finish(&self) -> u64 {
        self.0.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(26)
    }
}

type Key = u64;

/// One table serves every VLAN of the network: the VLAN is part of the key (bits 48..60), so
/// a MAC is learned per VLAN and the bounds and per-port quotas hold across all of them.
#[inline]
fn key(vlan: Vid, mac: &Mac) -> Key {
    let [a, b, c, d, e, f] = *mac;
    ((vlan & 0xfff) as u64) << 48 | u64::from_be_bytes([0, 0, a, b, c, d, e, f])
}

/// Index of a port within its network.
pub type PortId = usize;

/// Default aging time, in milliseconds.
pub const DEFAULT_AGING_MS: u64 = 300_000;
/// Default maximum number of learned addresses per network.
pub const DEFAULT_CAPACITY: usize = 8192;

/// Where a frame goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// To exactly this port.
    Unicast(PortId),
    /// To every port except the source.
    Flood,
    /// Nowhere: the destination was learned on the source port itself (hairpin).
    Discard,
}

/// How often a station that keeps sending moves to the back of the eviction order (an entry is
/// re-queued at most this often, not per frame).
const TOUCH_MS: u64 = 1000;

#[derive(Clone, Copy, Debug)]
struct Entry {
    port: PortId,
    seen_ms: u64,
    /// Held by a port with port security: never ages, never moves, not in the ledger.
    pinned: bool,
    /// The stamp of the entry's latest record in the ledger, and when it was made.
    stamp: u64,
    touched_ms: u64,
}

/// MAC address → port, with aging.
#[derive(Debug)]
pub struct MacTable {
    entries: HashMap<Key, Entry, BuildHasherDefault<MacHasher>>,
    /// The MAC each port has pinned (one at most).
    pins: HashMap<PortId, Key>,
    /// The learned (not pinned) entries, oldest first, per port.
    ledger: Ledger<Key>,
    aging_ms: u64,
    capacity: usize,
    /// Most learned entries one port may hold.
    quota: usize,
    /// Bumped by every change to which port a MAC is on (learned, moved, pinned, aged out,
    /// forgotten): read without the table's lock, it tells a [`DecisionCache`] whether what it
    /// remembers still holds.
    version: Arc<AtomicU64>,
}

impl Default for MacTable {
    fn default() -> Self {
        Self::new(DEFAULT_AGING_MS, DEFAULT_CAPACITY)
    }
}

impl MacTable {
    pub fn new(aging_ms: u64, capacity: usize) -> Self {
        let quota = (capacity / 4).max(1);
        MacTable {
            entries: HashMap::default(),
            pins: HashMap::new(),
            ledger: Ledger::default(),
            aging_ms,
            capacity,
            quota,
            version: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The table's version counter, to be read without its lock ([`DecisionCache`]).
    pub fn version(&self) -> Arc<AtomicU64> {
        self.version.clone()
    }

    /// Which port a MAC is on changed: decisions remembered before are stale.
    fn changed(&self) {
        self.version.fetch_add(1, Ordering::Release);
    }

    /// Sets how many learned entries one port may hold.
    pub fn with_quota(mut self, quota: usize) -> Self {
        self.quota = quota.max(1);
        self
    }

    /// Records looked at to evict or expire entries so far (the cost tests read it).
    pub fn eviction_work(&self) -> u64 {
        self.ledger.examined
    }

    /// Removes entry `k` if it is a learned one.
    fn remove_learned(&mut self, k: Key) {
        if let Some(e) = self.entries.get(&k).filter(|e| !e.pinned) {
            let port = e.port;
            self.entries.remove(&k);
            self.ledger.removed(port);
            self.changed();
        }
    }

    /// Pins `mac` to `port` (a port with port security, at its guest's first frame): refused
    /// with [`DropReason::MacInUse`] if another port holds it. A port holds one MAC: pinning
    /// another frees the one it had (a new guest on the port).
    pub fn claim(&mut self, mac: Mac, port: PortId) -> Result<(), DropReason> {
        self.claim_in(0, mac, port)
    }

    /// [`MacTable::claim`] in VLAN `vlan` (the port's own, where its guest's address lives).
    pub fn claim_in(&mut self, vlan: Vid, mac: Mac, port: PortId) -> Result<(), DropReason> {
        let k = key(vlan, &mac);
        match self.entries.get(&k) {
            Some(e) if e.pinned && e.port != port => return Err(DropReason::MacInUse),
            Some(e) if e.pinned => return Ok(()),
            _ => {}
        }
        if let Some(old) = self.pins.insert(port, k) {
            self.entries.remove(&old);
        }
        self.remove_learned(k);
        self.entries.insert(k, Entry { port, seen_ms: 0, pinned: true, stamp: u64::MAX, touched_ms: 0 });
        self.changed();
        Ok(())
    }

    /// Learns `src` on `port` at time `now_ms`. Multicast sources are never learned. A port
    /// at its quota replaces its own least recently seen entry; below it, a full table makes
    /// room from an expired entry, else from the port holding the most; failing that the
    /// address is not learned (frames to it flood).
    /// A MAC pinned to another port is refused ([`DropReason::MacInUse`]): the frame must be
    /// dropped, not just left unlearned.
    pub fn learn(&mut self, src: Mac, port: PortId, now_ms: u64) -> Result<(), DropReason> {
        self.learn_in(0, src, port, now_ms)
    }

    /// [`MacTable::learn`] in VLAN `vlan`.
    pub fn learn_in(&mut self, vlan: Vid, src: Mac, port: PortId, now_ms: u64) -> Result<(), DropReason> {
        if is_multicast(&src) {
            return Ok(());
        }
        let k = key(vlan, &src);
        if let Some(e) = self.entries.get_mut(&k) {
            if e.pinned {
                return if e.port == port { Ok(()) } else { Err(DropReason::MacInUse) };
            }
            if e.port == port {
                e.seen_ms = now_ms;
                if now_ms.saturating_sub(e.touched_ms) >= TOUCH_MS {
                    e.touched_ms = now_ms;
                    e.stamp = self.ledger.touch(k, port);
                    self.compact(port);
                }
                return Ok(());
            }
            // A station that moved to another port is re-learned there at once, within that
            // port's quota.
            self.remove_learned(k);
        }
        let (entries, aging) = (&self.entries, self.aging_ms);
        let room = self.ledger.make_room(
            port,
            self.quota,
            self.capacity,
            |k, s| entries.get(k).is_some_and(|e| !e.pinned && e.stamp == s),
            |k| entries.get(k).is_some_and(|e| now_ms.saturating_sub(e.seen_ms) >= aging),
        );
        match room {
            Room::Full => return Ok(()),
            Room::Evict(old) => self.remove_learned(old),
            Room::Free => {}
        }
        let stamp = self.ledger.add(k, port);
        self.entries.insert(k, Entry { port, seen_ms: now_ms, pinned: false, stamp, touched_ms: now_ms });
        self.changed();
        self.compact(port);
        Ok(())
    }

    fn compact(&mut self, port: PortId) {
        let entries = &self.entries;
        self.ledger.compact(port, |k, s| entries.get(k).is_some_and(|e| !e.pinned && e.stamp == s));
    }

    /// Looks up where a frame to `dst`, received on `src_port`, goes.
    pub fn lookup(&self, dst: Mac, src_port: PortId, now_ms: u64) -> Decision {
        self.lookup_in(0, dst, src_port, now_ms)
    }

    /// [`MacTable::lookup`] in VLAN `vlan`.
    pub fn lookup_in(&self, vlan: Vid, dst: Mac, src_port: PortId, now_ms: u64) -> Decision {
        if is_multicast(&dst) {
            return Decision::Flood;
        }
        match self.entries.get(&key(vlan, &dst)) {
            Some(e) if e.pinned || now_ms.saturating_sub(e.seen_ms) < self.aging_ms => {
                if e.port == src_port {
                    Decision::Discard
                } else {
                    Decision::Unicast(e.port)
                }
            }
            _ => Decision::Flood,
        }
    }

    /// Learn the source and decide on the destination in one step.
    pub fn forward(&mut self, src: Mac, dst: Mac, src_port: PortId, now_ms: u64) -> Result<Decision, DropReason> {
        self.forward_in(0, src, dst, src_port, now_ms)
    }

    /// [`MacTable::forward`] in VLAN `vlan`.
    pub fn forward_in(&mut self, vlan: Vid, src: Mac, dst: Mac, src_port: PortId, now_ms: u64) -> Result<Decision, DropReason> {
        self.learn_in(vlan, src, src_port, now_ms)?;
        Ok(self.lookup_in(vlan, dst, src_port, now_ms))
    }

    /// Removes the entries older than the aging time, oldest first (those seen within the
    /// last second or so of the first one still alive may stay; lookups ignore them).
    pub fn expire(&mut self, now_ms: u64) {
        loop {
            let (entries, aging) = (&self.entries, self.aging_ms);
            let oldest = self.ledger.oldest(None, |k, s| entries.get(k).is_some_and(|e| !e.pinned && e.stamp == s));
            match oldest {
                Some(k) if entries.get(&k).is_some_and(|e| now_ms.saturating_sub(e.seen_ms) >= aging) => self.remove_learned(k),
                _ => return,
            }
        }
    }

    /// Forgets everything learned on `port` (its guest went away). Its pinned MAC stays its
    /// own while the port exists: another port cannot take it meanwhile.
    pub fn forget_port(&mut self, port: PortId) {
        self.entries.retain(|_, e| e.port != port || e.pinned);
        self.ledger.forget(port);
        self.changed();
    }

    /// Forgets `port` altogether (it was removed): what it learned and the MAC it pinned, which
    /// another port may now claim.
    pub fn remove_port(&mut self, port: PortId) {
        self.forget_port(port);
        if let Some(k) = self.pins.remove(&port) {
            self.entries.remove(&k);
        }
        self.changed();
    }

    /// The port `mac` is currently learned on (or pinned to), if it has not aged out.
    pub fn port_of(&self, mac: &Mac, now_ms: u64) -> Option<PortId> {
        self.port_of_in(0, mac, now_ms)
    }

    /// [`MacTable::port_of`] in VLAN `vlan`.
    pub fn port_of_in(&self, vlan: Vid, mac: &Mac, now_ms: u64) -> Option<PortId> {
        self.entries.get(&key(vlan, mac)).filter(|e| e.pinned || now_ms.saturating_sub(e.seen_ms) < self.aging_ms).map(|e| e.port)
    }

    /// The port `mac` is pinned to in VLAN `vlan` (by port security), if any.
    pub fn pinned_port_in(&self, vlan: Vid, mac: &Mac) -> Option<PortId> {
        self.entries.get(&key(vlan, mac)).filter(|e| e.pinned).map(|e| e.port)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Slots of a [`DecisionCache`]: a worker switches frames of a few conversations at a time.
const CACHE_SLOTS: usize = 8;

/// A switching worker's memory of its latest unicast decisions, so a burst of frames between
/// the same two stations takes the table's lock once, not once per frame (OVS's exact-match
/// cache plays this part). A remembered decision is used only while the table's version is the
/// one it was made at (nothing moved, aged out or was forgotten since) and only within the
/// same millisecond: learning again at the same `now_ms` would change nothing (the entry's
/// time is that `now_ms` already, and its ledger touch is not due), so skipping it is exact.
/// Only unicast decisions are kept: learning can only make a flood go direct, never the
/// other way, so a remembered flood could go stale without a version change.
#[derive(Default)]
pub struct DecisionCache {
    slots: [CachedDecision; CACHE_SLOTS],
}

#[derive(Default, Clone, Copy)]
struct CachedDecision {
    /// The table it came from (its version counter's address): a worker may serve several.
    table: usize,
    src: Key,
    dst: Key,
    port: PortId,
    now_ms: u64,
    version: u64,
    to: PortId,
    valid: bool,
}

impl DecisionCache {
    fn slot(src: Key, dst: Key, port: PortId) -> usize {
        let h = (src ^ dst.rotate_left(17) ^ port as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        (h >> 61) as usize % CACHE_SLOTS
    }

    /// The port a frame of `flow` at `now_ms` was last sent to, if that decision still holds
    /// at the table's `version` (read from [`MacTable::version`] before the lookup).
    #[inline]
    pub fn get(&self, table: &Arc<AtomicU64>, flow: &Flow, now_ms: u64, version: u64) -> Option<PortId> {
        let (s, d) = (key(flow.vlan, &flow.src), key(flow.vlan, &flow.dst));
        let c = &self.slots[Self::slot(s, d, flow.port)];
        (c.valid
            && c.src == s
            && c.dst == d
            && c.port == flow.port
            && c.now_ms == now_ms
            && c.version == version
            && c.table == Arc::as_ptr(table) as usize)
            .then_some(c.to)
    }

    /// Remembers that the table, at `version` (read before the decision was made), sent a
    /// frame of `flow` to `to`.
    pub fn put(&mut self, table: &Arc<AtomicU64>, flow: &Flow, now_ms: u64, version: u64, to: PortId) {
        let (s, d) = (key(flow.vlan, &flow.src), key(flow.vlan, &flow.dst));
        self.slots[Self::slot(s, d, flow.port)] =
            CachedDecision { table: Arc::as_ptr(table) as usize, src: s, dst: d, port: flow.port, now_ms, version, to, valid: true };
    }
}

/// What a switching decision depends on besides the table: the frame's VLAN, addresses and
/// the port it came from.
#[derive(Clone, Copy, Debug)]
pub struct Flow {
    pub vlan: Vid,
    pub src: Mac,
    pub dst: Mac,
    pub port: PortId,
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Mac = [0x52, 0x54, 0, 0, 0, 0xa];
    const B: Mac = [0x52, 0x54, 0, 0, 0, 0xb];
    const C: Mac = [0x52, 0x54, 0, 0, 0, 0xc];
    const BCAST: Mac = [0xff; 6];

    #[test]
    fn each_vlan_learns_on_its_own() {
        let mut t = MacTable::default();
        // A learned in VLAN 10 on port 0 is unknown in VLAN 20 and in the untagged VLAN.
        assert_eq!(t.forward_in(10, A, B, 0, 0), Ok(Decision::Flood));
        assert_eq!(t.lookup_in(10, A, 1, 0), Decision::Unicast(0));
        assert_eq!(t.lookup_in(20, A, 1, 0), Decision::Flood);
        assert_eq!(t.lookup(A, 1, 0), Decision::Flood);
        // The same MAC on another port in another VLAN does not move the VLAN 10 entry.
        t.learn_in(20, A, 2, 0).unwrap();
        assert_eq!(t.port_of_in(10, &A, 0), Some(0));
        assert_eq!(t.port_of_in(20, &A, 0), Some(2));
        // A pin holds in its VLAN only.
        t.claim_in(10, B, 3).unwrap();
        assert_eq!(t.learn_in(10, B, 4, 0), Err(DropReason::MacInUse));
        assert_eq!(t.learn_in(20, B, 4, 0), Ok(()));
        assert_eq!(t.len(), 4);
    }

    #[test]
    fn unknown_unicast_floods_then_learned_goes_direct() {
        let mut t = MacTable::default();
        assert_eq!(t.forward(A, B, 0, 0), Ok(Decision::Flood));
        assert_eq!(t.forward(B, A, 1, 10), Ok(Decision::Unicast(0)));
        assert_eq!(t.forward(A, B, 0, 20), Ok(Decision::Unicast(1)));
        assert_eq!(t.forward(A, C, 0, 30), Ok(Decision::Flood));
    }

    #[test]
    fn broadcast_and_multicast_flood_and_are_never_learned() {
        let mut t = MacTable::default();
        t.learn(A, 0, 0).unwrap();
        assert_eq!(t.lookup(BCAST, 1, 0), Decision::Flood);
        assert_eq!(t.lookup([0x01, 0, 0x5e, 0, 0, 1], 1, 0), Decision::Flood);
        t.learn(BCAST, 2, 0).unwrap();
        t.learn([0x33, 0x33, 0, 0, 0, 1], 2, 0).unwrap();
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn entries_age_out_after_300_seconds() {
        let mut t = MacTable::default();
        t.learn(B, 1, 1_000).unwrap();
        assert_eq!(t.lookup(B, 0, 1_000 + 299_999), Decision::Unicast(1));
        assert_eq!(t.lookup(B, 0, 1_000 + 300_000), Decision::Flood);
        t.expire(1_000 + 300_000);
        assert!(t.is_empty());
        // Refreshing keeps it alive.
        t.learn(B, 1, 0).unwrap();
        t.learn(B, 1, 200_000).unwrap();
        assert_eq!(t.lookup(B, 0, 400_000), Decision::Unicast(1));
    }

    #[test]
    fn station_moving_is_relearned_and_hairpin_is_discarded() {
        let mut t = MacTable::default();
        t.learn(B, 1, 0).unwrap();
        t.learn(B, 2, 5).unwrap();
        assert_eq!(t.lookup(B, 0, 6), Decision::Unicast(2));
        assert_eq!(t.lookup(B, 2, 6), Decision::Discard);
    }

    #[test]
    fn capacity_is_a_hard_limit_and_expired_entries_make_room() {
        let mut t = MacTable::new(1000, 4).with_quota(4);
        for i in 0..100u8 {
            t.learn([0x52, 0, 0, 0, 0, i], 0, 0).unwrap();
        }
        assert_eq!(t.len(), 4);
        // After aging, new stations can be learned again.
        t.learn(C, 3, 5_000).unwrap();
        assert_eq!(t.port_of(&C, 5_000), Some(3));
        t.expire(5_000);
        assert_eq!(t.len(), 1);
    }

    fn mac(port: u8, i: u32) -> Mac {
        [0x52, port, (i >> 24) as u8, (i >> 16) as u8, (i >> 8) as u8, i as u8]
    }

    #[test]
    fn filling_the_table_from_one_port_evicts_nothing_of_another_port() {
        let mut t = MacTable::new(DEFAULT_AGING_MS, 64);
        t.learn(B, 1, 0).unwrap();
        t.learn(C, 1, 0).unwrap();
        for i in 0..10_000 {
            t.learn(mac(0, i), 0, 1).unwrap();
        }
        assert_eq!((t.port_of(&B, 2), t.port_of(&C, 2)), (Some(1), Some(1)), "port 1's stations stay");
        assert_eq!(t.port_of(&mac(0, 9_999), 2), Some(0), "port 0 keeps its newest");
        assert_eq!(t.port_of(&mac(0, 0), 2), None, "and loses its oldest");
        // Another port still learns new stations, whatever port 0 sends.
        t.learn(A, 2, 3).unwrap();
        assert_eq!(t.port_of(&A, 3), Some(2));
        // Even with every port at its quota, a port holding little is not the one to pay.
        for p in 3..8u8 {
            for i in 0..100 {
                t.learn(mac(p, i), p as usize, 4).unwrap();
            }
        }
        assert!(t.len() <= 64 + 1);
        assert_eq!((t.port_of(&B, 5), t.port_of(&C, 5), t.port_of(&A, 5)), (Some(1), Some(1), Some(2)));
    }

    #[test]
    fn a_full_table_learns_new_stations_in_constant_time_each() {
        // One port may fill the whole table; M entries, then N new ones.
        const M: u32 = 4096;
        const N: u32 = 20_000;
        let mut t = MacTable::new(DEFAULT_AGING_MS, M as usize).with_quota(M as usize);
        for i in 0..M {
            t.learn(mac(0, i), 0, 0).unwrap();
        }
        let before = t.eviction_work();
        for i in M..M + N {
            t.learn(mac(0, i), 0, 1 + (i - M) as u64).unwrap();
        }
        // Each new entry replaced the oldest, by order, not by searching the table.
        assert_eq!(t.len(), M as usize);
        assert_eq!(t.port_of(&mac(0, M + N - 1), 30_000), Some(0));
        assert_eq!(t.port_of(&mac(0, N - 1), 30_000), None);
        assert_eq!(t.port_of(&mac(0, N), 30_000), Some(0));
        let work = t.eviction_work() - before;
        assert!(work <= 4 * (N + M) as u64, "{work} records looked at for {N} insertions into a table of {M}");
    }

    #[test]
    fn a_pinned_mac_never_moves_and_never_ages() {
        let mut t = MacTable::new(1000, 4);
        t.claim(A, 0).unwrap();
        assert_eq!(t.pinned_port_in(0, &A), Some(0));
        assert_eq!(t.claim(A, 1), Err(DropReason::MacInUse), "another port cannot take it");
        assert_eq!(t.learn(A, 1, 5), Err(DropReason::MacInUse), "nor re-learn it (a bridged uplink, say)");
        assert_eq!(t.forward(A, B, 2, 6), Err(DropReason::MacInUse));
        assert_eq!(t.lookup(A, 2, 1_000_000), Decision::Unicast(0), "traffic to it still goes to its port, however late");
        assert_eq!(t.learn(A, 0, 7), Ok(()));
        // Filling the table does not push it out.
        for i in 0..100u8 {
            t.learn([0x52, 0, 0, 0, 1, i], 3, 2_000_000).unwrap();
        }
        assert_eq!(t.port_of(&A, 2_000_000), Some(0));
        // The guest going away keeps the pin; the port's removal frees it.
        t.forget_port(0);
        assert_eq!(t.claim(A, 1), Err(DropReason::MacInUse));
        t.remove_port(0);
        assert_eq!(t.claim(A, 1), Ok(()));
        assert_eq!(t.port_of(&A, 0), Some(1));
        // A new guest on a port pins its own MAC instead of the old one.
        t.claim(B, 1).unwrap();
        assert_eq!(t.claim(A, 2), Ok(()));
    }

    #[test]
    fn forget_port_removes_only_that_port() {
        let mut t = MacTable::default();
        t.learn(A, 0, 0).unwrap();
        t.learn(B, 1, 0).unwrap();
        t.learn(C, 1, 0).unwrap();
        t.forget_port(1);
        assert_eq!(t.port_of(&A, 0), Some(0));
        assert_eq!(t.port_of(&B, 0), None);
        assert_eq!(t.len(), 1);
    }

    /// A worker's switching step with the cache in front of the table, as the data path
    /// does it.
    fn switch(t: &mut MacTable, c: &mut DecisionCache, src: Mac, dst: Mac, port: PortId, now: u64) -> (Decision, bool) {
        let v = t.version();
        let version = v.load(Ordering::Acquire);
        let flow = Flow { vlan: 0, src, dst, port };
        if let Some(to) = c.get(&v, &flow, now, version) {
            return (Decision::Unicast(to), true);
        }
        let d = t.forward(src, dst, port, now).unwrap();
        if let Decision::Unicast(to) = d {
            c.put(&v, &flow, now, version, to);
        }
        (d, false)
    }

    #[test]
    fn a_remembered_decision_holds_only_while_nothing_moved_within_the_same_millisecond() {
        let mut t = MacTable::new(1000, 64);
        let mut c = DecisionCache::default();
        t.learn(B, 1, 0).unwrap();
        // A's first frame teaches the table A (a change): decided again for the next.
        assert_eq!(switch(&mut t, &mut c, A, B, 0, 5), (Decision::Unicast(1), false));
        assert_eq!(switch(&mut t, &mut c, A, B, 0, 5), (Decision::Unicast(1), false));
        assert_eq!(switch(&mut t, &mut c, A, B, 0, 5), (Decision::Unicast(1), true));
        // Another port, another destination, another millisecond: the table decides.
        assert!(!switch(&mut t, &mut c, A, B, 2, 5).1);
        assert_eq!(switch(&mut t, &mut c, A, C, 0, 5), (Decision::Flood, false));
        assert_eq!(switch(&mut t, &mut c, A, C, 0, 5), (Decision::Flood, false), "floods are never remembered");
        assert_eq!(switch(&mut t, &mut c, A, B, 0, 6), (Decision::Unicast(1), false));
        // B moves to port 3 (a frame from it there): the next frame goes to port 3.
        assert_eq!(switch(&mut t, &mut c, A, B, 0, 6), (Decision::Unicast(1), true));
        t.learn(B, 3, 6).unwrap();
        assert_eq!(switch(&mut t, &mut c, A, B, 0, 6), (Decision::Unicast(3), false));
        // Port 3's guest goes away: B is unknown again, at once.
        assert_eq!(switch(&mut t, &mut c, A, B, 0, 6), (Decision::Unicast(3), true));
        t.forget_port(3);
        assert_eq!(switch(&mut t, &mut c, A, B, 0, 6), (Decision::Flood, false));
        // Aged out: a later millisecond always asks the table.
        t.learn(B, 1, 10).unwrap();
        assert_eq!(switch(&mut t, &mut c, A, B, 0, 10), (Decision::Unicast(1), false));
        assert_eq!(switch(&mut t, &mut c, A, B, 0, 1010), (Decision::Flood, false));
        // A MAC pinned by port security elsewhere: the sender's frames are refused again.
        t.learn(B, 1, 2000).unwrap();
        assert_eq!(switch(&mut t, &mut c, A, B, 0, 2000), (Decision::Unicast(1), false));
        t.claim(A, 4).unwrap();
        let v = t.version();
        assert_eq!(c.get(&v, &Flow { vlan: 0, src: A, dst: B, port: 0 }, 2000, v.load(Ordering::Acquire)), None);
        assert_eq!(t.forward(A, B, 0, 2000), Err(DropReason::MacInUse));
        // Another table (another network) never reads this one's decisions.
        let other = MacTable::new(1000, 64);
        let v2 = other.version();
        t.learn(B, 1, 3000).unwrap();
        switch(&mut t, &mut c, C, B, 0, 3000);
        assert_eq!(switch(&mut t, &mut c, C, B, 0, 3000), (Decision::Unicast(1), false));
        let now = v.load(Ordering::Acquire);
        let flow = Flow { vlan: 0, src: C, dst: B, port: 0 };
        assert_eq!(c.get(&v, &flow, 3000, now), Some(1));
        assert_eq!(c.get(&v2, &flow, 3000, now), None);
        // Nor another VLAN's.
        assert_eq!(c.get(&v, &Flow { vlan: 5, ..flow }, 3000, now), None);
    }
}
