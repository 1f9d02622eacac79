//! The MAC learning table of one network: source addresses are learned per port, entries age
//! out (300 s by default, like the Linux bridge and OVS), and the table has a hard size limit
//! so a guest spraying random source MACs cannot grow it without bound (it then floods, which
//! is correct, just slower).
//!
//! A guest port with port security *pins* its MAC here ([`MacTable::claim`]): one port per MAC,
//! a pinned entry never ages and never moves, and a frame from any other port (a bridged
//! uplink too) with that source MAC is refused. This is the one place that rule lives, so what
//! may move a pinned MAC (a live migration, on the VMM's request) has one place to go through.

use crate::{is_multicast, DropReason, Mac};
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

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

fn key(mac: &Mac) -> Key {
    mac.iter().fold(0u64, |k, &b| (k << 8) | b as u64)
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

#[derive(Clone, Copy, Debug)]
struct Entry {
    port: PortId,
    seen_ms: u64,
    /// Held by a port with port security: never ages, never moves.
    pinned: bool,
}

/// MAC address → port, with aging.
#[derive(Debug)]
pub struct MacTable {
    entries: HashMap<Key, Entry, BuildHasherDefault<MacHasher>>,
    /// The MAC each port has pinned (one at most).
    pins: HashMap<PortId, Key>,
    aging_ms: u64,
    capacity: usize,
}

impl Default for MacTable {
    fn default() -> Self {
        Self::new(DEFAULT_AGING_MS, DEFAULT_CAPACITY)
    }
}

impl MacTable {
    pub fn new(aging_ms: u64, capacity: usize) -> Self {
        MacTable { entries: HashMap::default(), pins: HashMap::new(), aging_ms, capacity }
    }

    /// Pins `mac` to `port` (a port with port security, at its guest's first frame): refused
    /// with [`DropReason::MacInUse`] if another port holds it. A port holds one MAC: pinning
    /// another frees the one it had (a new guest on the port).
    pub fn claim(&mut self, mac: Mac, port: PortId) -> Result<(), DropReason> {
        let k = key(&mac);
        match self.entries.get(&k) {
            Some(e) if e.pinned && e.port != port => return Err(DropReason::MacInUse),
            Some(e) if e.pinned => return Ok(()),
            _ => {}
        }
        if let Some(old) = self.pins.insert(port, k) {
            self.entries.remove(&old);
        }
        self.entries.insert(k, Entry { port, seen_ms: 0, pinned: true });
        Ok(())
    }

    /// Learns `src` on `port` at time `now_ms`. Multicast sources are never learned. A full
    /// table first drops its expired entries; if it is still full the address is not learned.
    /// A MAC pinned to another port is refused ([`DropReason::MacInUse`]): the frame must be
    /// dropped, not just left unlearned.
    pub fn learn(&mut self, src: Mac, port: PortId, now_ms: u64) -> Result<(), DropReason> {
        if is_multicast(&src) {
            return Ok(());
        }
        if let Some(e) = self.entries.get_mut(&key(&src)) {
            if e.pinned {
                return if e.port == port { Ok(()) } else { Err(DropReason::MacInUse) };
            }
            // A station that moved to another port is re-learned there at once.
            e.port = port;
            e.seen_ms = now_ms;
            return Ok(());
        }
        if self.entries.len() - self.pins.len() >= self.capacity {
            self.expire(now_ms);
            if self.entries.len() - self.pins.len() >= self.capacity {
                return Ok(());
            }
        }
        self.entries.insert(key(&src), Entry { port, seen_ms: now_ms, pinned: false });
        Ok(())
    }

    /// Looks up where a frame to `dst`, received on `src_port`, goes.
    pub fn lookup(&self, dst: Mac, src_port: PortId, now_ms: u64) -> Decision {
        if is_multicast(&dst) {
            return Decision::Flood;
        }
        match self.entries.get(&key(&dst)) {
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
        self.learn(src, src_port, now_ms)?;
        Ok(self.lookup(dst, src_port, now_ms))
    }

    /// Removes every entry older than the aging time.
    pub fn expire(&mut self, now_ms: u64) {
        let aging = self.aging_ms;
        self.entries.retain(|_, e| e.pinned || now_ms.saturating_sub(e.seen_ms) < aging);
    }

    /// Forgets everything learned on `port` (its guest went away). Its pinned MAC stays its
    /// own while the port exists: another port cannot take it meanwhile.
    pub fn forget_port(&mut self, port: PortId) {
        self.entries.retain(|_, e| e.port != port || e.pinned);
    }

    /// Forgets `port` altogether (it was removed): what it learned and the MAC it pinned, which
    /// another port may now claim.
    pub fn remove_port(&mut self, port: PortId) {
        self.forget_port(port);
        if let Some(k) = self.pins.remove(&port) {
            self.entries.remove(&k);
        }
    }

    /// The port `mac` is currently learned on (or pinned to), if it has not aged out.
    pub fn port_of(&self, mac: &Mac, now_ms: u64) -> Option<PortId> {
        self.entries.get(&key(mac)).filter(|e| e.pinned || now_ms.saturating_sub(e.seen_ms) < self.aging_ms).map(|e| e.port)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Mac = [0x52, 0x54, 0, 0, 0, 0xa];
    const B: Mac = [0x52, 0x54, 0, 0, 0, 0xb];
    const C: Mac = [0x52, 0x54, 0, 0, 0, 0xc];
    const BCAST: Mac = [0xff; 6];

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
        let mut t = MacTable::new(1000, 4);
        for i in 0..100u8 {
            t.learn([0x52, 0, 0, 0, 0, i], 0, 0).unwrap();
        }
        assert_eq!(t.len(), 4);
        // After aging, new stations can be learned again.
        t.learn(C, 3, 5_000).unwrap();
        assert_eq!(t.port_of(&C, 5_000), Some(3));
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn a_pinned_mac_never_moves_and_never_ages() {
        let mut t = MacTable::new(1000, 4);
        t.claim(A, 0).unwrap();
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
}
