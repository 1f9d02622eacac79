//! The order a bounded table's entries were last touched in, per owner (the port that caused
//! them), so that a full table finds what to evict in O(1) amortized time and no port holds
//! more than its quota.
//!
//! The MAC table, the firewall's flows and the ARP neighbours keep their entries in a hash map
//! and, in each entry, the stamp of its latest record here. Records are never searched for: a
//! record whose stamp is not its entry's current one is stale and is dropped when it reaches
//! the front of its queue. Each record is pushed once and popped at most once, and a queue is
//! compacted when its stale records outnumber its live ones, so adding, touching and evicting
//! cost O(1) amortized whatever the table's size.

use std::collections::{HashMap, VecDeque};

/// Who caused an entry: a port's index in its network (or a reserved value, e.g. the uplink).
pub type Owner = usize;

#[derive(Debug)]
struct Queue<K> {
    /// Live entries of this owner.
    live: usize,
    order: VecDeque<(K, u64)>,
}

/// What a table must do before an owner adds an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Room<K> {
    /// There is room.
    Free,
    /// Remove this entry first (then call [`Ledger::removed`]).
    Evict(K),
    /// No room: the entry is not added.
    Full,
}

/// The order of a table's entries (keys `K`), oldest first, in all and per owner.
#[derive(Debug)]
pub struct Ledger<K> {
    next: u64,
    all: VecDeque<(K, u64)>,
    owners: HashMap<Owner, Queue<K>>,
    live: usize,
    /// Records looked at to find what to evict or to compact a queue. Tests count it: it grows
    /// with the entries added and evicted, never with the table's size times that.
    pub examined: u64,
}

impl<K> Default for Ledger<K> {
    fn default() -> Self {
        Ledger { next: 0, all: VecDeque::new(), owners: HashMap::new(), live: 0, examined: 0 }
    }
}

impl<K: Copy> Ledger<K> {
    /// Live entries.
    pub fn len(&self) -> usize {
        self.live
    }

    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Live entries of `owner`.
    pub fn count(&self, owner: Owner) -> usize {
        self.owners.get(&owner).map_or(0, |q| q.live)
    }

    fn push(&mut self, key: K, owner: Owner) -> u64 {
        let stamp = self.next;
        self.next += 1;
        self.all.push_back((key, stamp));
        self.owners.entry(owner).or_insert_with(|| Queue { live: 0, order: VecDeque::new() }).order.push_back((key, stamp));
        stamp
    }

    /// A new entry of `owner`; returns the stamp to keep in it.
    pub fn add(&mut self, key: K, owner: Owner) -> u64 {
        let stamp = self.push(key, owner);
        self.live += 1;
        if let Some(q) = self.owners.get_mut(&owner) {
            q.live += 1;
        }
        stamp
    }

    /// An entry of `owner` used again: it becomes the newest. Returns its new stamp. (Tables
    /// call it at most once a second or so per entry, not per frame.)
    pub fn touch(&mut self, key: K, owner: Owner) -> u64 {
        self.push(key, owner)
    }

    /// The table removed an entry of `owner`.
    pub fn removed(&mut self, owner: Owner) {
        self.live = self.live.saturating_sub(1);
        if let Some(q) = self.owners.get_mut(&owner) {
            q.live = q.live.saturating_sub(1);
            if q.live == 0 {
                // Only stale records are left.
                self.owners.remove(&owner);
            }
        }
    }

    /// The table removed every entry of `owner` itself.
    pub fn forget(&mut self, owner: Owner) {
        if let Some(q) = self.owners.remove(&owner) {
            self.live = self.live.saturating_sub(q.live);
        }
    }

    /// The oldest live entry, of `owner` or of all (None), left in place. `current(key,
    /// stamp)` says whether a record is its entry's latest.
    pub fn oldest(&mut self, owner: Option<Owner>, current: impl Fn(&K, u64) -> bool) -> Option<K> {
        let q = match owner {
            Some(o) => &mut self.owners.get_mut(&o)?.order,
            None => &mut self.all,
        };
        while let Some(&(k, s)) = q.front() {
            self.examined += 1;
            if current(&k, s) {
                return Some(k);
            }
            q.pop_front();
        }
        None
    }

    /// Drops stale records of all and of `owner` once they outnumber the live ones (amortized:
    /// a queue is rebuilt only after as many pushes as it has live records).
    pub fn compact(&mut self, owner: Owner, current: impl Fn(&K, u64) -> bool) {
        if self.all.len() > 2 * self.live + 64 {
            self.examined += self.all.len() as u64;
            self.all.retain(|(k, s)| current(k, *s));
        }
        if let Some(q) = self.owners.get_mut(&owner) {
            if q.order.len() > 2 * q.live + 16 {
                self.examined += q.order.len() as u64;
                q.order.retain(|(k, s)| current(k, *s));
            }
        }
    }

    /// What to do before `owner` adds an entry to a table of at most `capacity` entries, of
    /// which one owner may hold `quota`: at its quota, an owner evicts its own oldest entry,
    /// never another's. Below it, in a full table, the oldest entry goes if it has `expired`;
    /// else the oldest of whoever holds the most (several owners each near their quota): a
    /// port that holds little is never the one to pay.
    pub fn make_room(
        &mut self,
        owner: Owner,
        quota: usize,
        capacity: usize,
        current: impl Fn(&K, u64) -> bool,
        expired: impl Fn(&K) -> bool,
    ) -> Room<K> {
        if self.count(owner) >= quota {
            return self.oldest(Some(owner), &current).map_or(Room::Full, Room::Evict);
        }
        if self.live < capacity {
            return Room::Free;
        }
        if let Some(k) = self.oldest(None, &current).filter(|k| expired(k)) {
            return Room::Evict(k);
        }
        // Owners are ports: a handful, so this is not a scan of the table.
        let hog = self.owners.iter().max_by_key(|(_, q)| q.live).map(|(&o, _)| o);
        hog.and_then(|h| self.oldest(Some(h), &current)).map_or(Room::Full, Room::Evict)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A toy table over the ledger: key → (owner, stamp).
    #[derive(Default)]
    struct Table {
        map: HashMap<u32, (Owner, u64)>,
        ledger: Ledger<u32>,
    }

    impl Table {
        fn insert(&mut self, k: u32, owner: Owner, quota: usize, capacity: usize) -> bool {
            let map = &self.map;
            match self.ledger.make_room(owner, quota, capacity, |k, s| map.get(k).is_some_and(|e| e.1 == s), |_| false) {
                Room::Full => return false,
                Room::Evict(old) => {
                    let (o, _) = self.map.remove(&old).unwrap();
                    self.ledger.removed(o);
                }
                Room::Free => {}
            }
            let s = self.ledger.add(k, owner);
            self.map.insert(k, (owner, s));
            true
        }
    }

    #[test]
    fn an_owner_at_its_quota_evicts_its_own_oldest() {
        let mut t = Table::default();
        for k in 0..3 {
            assert!(t.insert(k, 1, 10, 16));
        }
        for k in 100..200 {
            assert!(t.insert(k, 2, 10, 16));
        }
        assert_eq!((t.ledger.count(1), t.ledger.count(2)), (3, 10));
        assert!((0..3).all(|k| t.map.contains_key(&k)), "owner 1 kept everything");
        assert!((190..200).all(|k| t.map.contains_key(&k)), "owner 2 kept its newest");
    }

    #[test]
    fn touching_makes_an_entry_the_newest_and_stale_records_are_skipped() {
        let mut t = Table::default();
        for k in 0..4 {
            t.insert(k, 1, 4, 16);
        }
        let s = t.ledger.touch(0, 1);
        t.map.get_mut(&0).unwrap().1 = s;
        t.insert(4, 1, 4, 16);
        assert!(t.map.contains_key(&0) && !t.map.contains_key(&1), "1 was the oldest once 0 was touched");
    }
}
