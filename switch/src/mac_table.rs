//! The MAC learning table of one network: source addresses are learned per port, entries age
//! out (300 s by default, like the Linux bridge and OVS), and the table has a hard size limit
//! so a guest spraying random source MACs cannot grow it without bound (it then floods, which
//! is correct, just slower).

use crate::{is_multicast, Mac};
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
}

/// MAC address → port, with aging.
#[derive(Debug)]
pub struct MacTable {
    entries: HashMap<Key, Entry, BuildHasherDefault<MacHasher>>,
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
        MacTable { entries: HashMap::default(), aging_ms, capacity }
    }

    /// Learns `src` on `port` at time `now_ms`. Multicast sources are never learned. A full
    /// table first drops its expired entries; if it is still full the address is not learned.
    pub fn learn(&mut self, src: Mac, port: PortId, now_ms: u64) {
        if is_multicast(&src) {
            return;
        }
        if let Some(e) = self.entries.get_mut(&key(&src)) {
            // A station that moved to another port is re-learned there at once.
            e.port = port;
            e.seen_ms = now_ms;
            return;
        }
        if self.entries.len() >= self.capacity {
            self.expire(now_ms);
            if self.entries.len() >= self.capacity {
                return;
            }
        }
        self.entries.insert(key(&src), Entry { port, seen_ms: now_ms });
    }

    /// Looks up where a frame to `dst`, received on `src_port`, goes.
    pub fn lookup(&self, dst: Mac, src_port: PortId, now_ms: u64) -> Decision {
        if is_multicast(&dst) {
            return Decision::Flood;
        }
        match self.entries.get(&key(&dst)) {
            Some(e) if now_ms.saturating_sub(e.seen_ms) < self.aging_ms => {
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
    pub fn forward(&mut self, src: Mac, dst: Mac, src_port: PortId, now_ms: u64) -> Decision {
        self.learn(src, src_port, now_ms);
        self.lookup(dst, src_port, now_ms)
    }

    /// Removes every entry older than the aging time.
    pub fn expire(&mut self, now_ms: u64) {
        let aging = self.aging_ms;
        self.entries.retain(|_, e| now_ms.saturating_sub(e.seen_ms) < aging);
    }

    /// Forgets everything learned on `port` (the port went down or was removed).
    pub fn forget_port(&mut self, port: PortId) {
        self.entries.retain(|_, e| e.port != port);
    }

    /// The port `mac` is currently learned on, if it has not aged out.
    pub fn port_of(&self, mac: &Mac, now_ms: u64) -> Option<PortId> {
        self.entries.get(&key(mac)).filter(|e| now_ms.saturating_sub(e.seen_ms) < self.aging_ms).map(|e| e.port)
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
        assert_eq!(t.forward(A, B, 0, 0), Decision::Flood);
        assert_eq!(t.forward(B, A, 1, 10), Decision::Unicast(0));
        assert_eq!(t.forward(A, B, 0, 20), Decision::Unicast(1));
        assert_eq!(t.forward(A, C, 0, 30), Decision::Flood);
    }

    #[test]
    fn broadcast_and_multicast_flood_and_are_never_learned() {
        let mut t = MacTable::default();
        t.learn(A, 0, 0);
        assert_eq!(t.lookup(BCAST, 1, 0), Decision::Flood);
        assert_eq!(t.lookup([0x01, 0, 0x5e, 0, 0, 1], 1, 0), Decision::Flood);
        t.learn(BCAST, 2, 0);
        t.learn([0x33, 0x33, 0, 0, 0, 1], 2, 0);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn entries_age_out_after_300_seconds() {
        let mut t = MacTable::default();
        t.learn(B, 1, 1_000);
        assert_eq!(t.lookup(B, 0, 1_000 + 299_999), Decision::Unicast(1));
        assert_eq!(t.lookup(B, 0, 1_000 + 300_000), Decision::Flood);
        t.expire(1_000 + 300_000);
        assert!(t.is_empty());
        // Refreshing keeps it alive.
        t.learn(B, 1, 0);
        t.learn(B, 1, 200_000);
        assert_eq!(t.lookup(B, 0, 400_000), Decision::Unicast(1));
    }

    #[test]
    fn station_moving_is_relearned_and_hairpin_is_discarded() {
        let mut t = MacTable::default();
        t.learn(B, 1, 0);
        t.learn(B, 2, 5);
        assert_eq!(t.lookup(B, 0, 6), Decision::Unicast(2));
        assert_eq!(t.lookup(B, 2, 6), Decision::Discard);
    }

    #[test]
    fn capacity_is_a_hard_limit_and_expired_entries_make_room() {
        let mut t = MacTable::new(1000, 4);
        for i in 0..100u8 {
            t.learn([0x52, 0, 0, 0, 0, i], 0, 0);
        }
        assert_eq!(t.len(), 4);
        // After aging, new stations can be learned again.
        t.learn(C, 3, 5_000);
        assert_eq!(t.port_of(&C, 5_000), Some(3));
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn forget_port_removes_only_that_port() {
        let mut t = MacTable::default();
        t.learn(A, 0, 0);
        t.learn(B, 1, 0);
        t.learn(C, 1, 0);
        t.forget_port(1);
        assert_eq!(t.port_of(&A, 0), Some(0));
        assert_eq!(t.port_of(&B, 0), None);
        assert_eq!(t.len(), 1);
    }
}
