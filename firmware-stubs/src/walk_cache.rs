//! The page-walk cache (revision 2, `features::WALK_CACHE`): non-leaf entries the walker read.
//!
//! An entry is a table pointer found at level 4, 3 or 2, keyed by the ASID, its level and the VA
//! prefix it covers (`span(level)` bytes), and names the IOVA of the next-level table. A walk
//! starts below the deepest cached entry covering its VA instead of at the root. Not-present
//! entries and leaves are never cached (leaves are the TLB's). Capacity is bounded; when full,
//! the oldest entry is evicted (FIFO).
//!
//! Like the TLB, a walk that started before an invalidation must not install what it read:
//! every invalidation that reaches this cache (one without `LEAF_ONLY`, an ASID root write, a
//! reset) bumps `inval_seq`, and `insert` refuses entries of a walk begun under an older one.
//!
//! The cache lives inside [`crate::tlb::Tlb`], under the same mutex, so a TLB miss looks it up
//! without taking another lock and a hit never touches it.

use std::collections::VecDeque;

use accel_abi::pt;

use crate::tlb::{FastMap, TlbiTarget};

/// (asid, level, first VA the entry covers).
type Key = (u16, u32, u64);

/// Where a walk may start: the table at `level` (1..=3) found through a cached entry one level
/// up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WalkStart {
    /// Level of the table the walk reads first.
    pub(crate) level: u32,
    /// IOVA of that table.
    pub(crate) table: u64,
}

/// One non-leaf entry a walk read: at `level`, for the VA walked, pointing to `next_table`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TableStep {
    pub(crate) level: u32,
    pub(crate) next_table: u64,
}

fn prefix(va: u64, level: u32) -> u64 {
    va & !(pt::span(level) - 1)
}

pub(crate) struct WalkCache {
    cap: usize,
    map: FastMap<Key, (u64, u64)>,
    order: VecDeque<(Key, u64)>,
    next_stamp: u64,
    inval_seq: u64,
    /// Walks that started below the root (WALK_CACHE_HITS).
    pub(crate) hits: u64,
}

impl WalkCache {
    /// A cache of `cap` entries; 0 caches nothing.
    pub(crate) fn new(cap: usize) -> Self {
        WalkCache {
            cap,
            map: FastMap::with_capacity_and_hasher(cap, Default::default()),
            order: VecDeque::with_capacity(cap),
            next_stamp: 0,
            inval_seq: 0,
            hits: 0,
        }
    }

    pub(crate) fn seq(&self) -> u64 {
        self.inval_seq
    }

    /// The deepest cached entry covering `va` of `asid`, counted as a hit if there is one.
    pub(crate) fn lookup(&mut self, asid: u16, va: u64) -> Option<WalkStart> {
        if self.map.is_empty() {
            return None;
        }
        let found = (2..=4).find_map(|level| {
            self.map
                .get(&(asid, level, prefix(va, level)))
                .map(|&(table, _)| WalkStart {
                    level: level - 1,
                    table,
                })
        });
        if found.is_some() {
            self.hits += 1;
        }
        found
    }

    /// Cache the table pointers a walk of `va` read, unless an invalidation reached this cache
    /// since the walk began (`walk_seq`).
    pub(crate) fn insert(&mut self, asid: u16, va: u64, steps: &[TableStep], walk_seq: u64) {
        if walk_seq != self.inval_seq || self.cap == 0 {
            return;
        }
        for step in steps {
            let k = (asid, step.level, prefix(va, step.level));
            if self.map.len() >= self.cap && !self.map.contains_key(&k) {
                self.evict_one();
            }
            let stamp = self.next_stamp;
            self.next_stamp += 1;
            self.map.insert(k, (step.next_table, stamp));
            self.order.push_back((k, stamp));
        }
        // Invalidations and re-inserts leave stale keys in `order`; keep it bounded.
        if self.order.len() > 4 * self.cap + 16 {
            let map = &self.map;
            self.order
                .retain(|(k, s)| map.get(k).is_some_and(|(_, cur)| cur == s));
        }
    }

    fn evict_one(&mut self) {
        while let Some((k, stamp)) = self.order.pop_front() {
            if self.map.get(&k).is_some_and(|(_, s)| *s == stamp) {
                self.map.remove(&k);
                return;
            }
        }
    }

    /// Drop the entries of `target`: all, an ASID's, or an ASID's entries whose covered span
    /// overlaps the range. Returns how many were dropped.
    pub(crate) fn invalidate(&mut self, target: TlbiTarget) -> usize {
        self.inval_seq += 1;
        let before = self.map.len();
        match target {
            TlbiTarget::All => self.map.clear(),
            TlbiTarget::Asid(a) => self.map.retain(|k, _| k.0 != a),
            TlbiTarget::Range { asid, va, size } => {
                let end = va.saturating_add(size);
                self.map.retain(|&(a, level, base), _| {
                    a != asid || base >= end || base.saturating_add(pt::span(level)) <= va
                });
            }
        }
        before - self.map.len()
    }

    /// Power-on state; the sequence keeps counting (see the module comment).
    pub(crate) fn reset(&mut self) {
        self.map.clear();
        self.order.clear();
        self.inval_seq += 1;
        self.hits = 0;
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VA: u64 = 0x7f00_1234_5000;

    fn steps() -> [TableStep; 3] {
        [
            TableStep {
                level: 4,
                next_table: 0x3000,
            },
            TableStep {
                level: 3,
                next_table: 0x2000,
            },
            TableStep {
                level: 2,
                next_table: 0x1000,
            },
        ]
    }

    #[test]
    fn lookup_returns_the_deepest_level_and_counts() {
        let mut c = WalkCache::new(8);
        assert_eq!(c.lookup(1, VA), None);
        c.insert(1, VA, &steps(), c.seq());
        assert_eq!(
            c.lookup(1, VA + 0x1000),
            Some(WalkStart {
                level: 1,
                table: 0x1000
            })
        );
        // Another 2 MiB region of the same 1 GiB: the level-3 entry covers it.
        assert_eq!(
            c.lookup(1, VA + pt::span(2)),
            Some(WalkStart {
                level: 2,
                table: 0x2000
            })
        );
        assert_eq!(c.lookup(2, VA), None, "entries are per ASID");
        assert_eq!(c.hits, 2);
    }

    #[test]
    fn bounded_fifo_and_zero_capacity() {
        let mut c = WalkCache::new(2);
        c.insert(0, VA, &steps(), c.seq());
        assert_eq!(c.len(), 2);
        // The level-4 entry went first.
        assert_eq!(c.lookup(0, VA + pt::span(3)), None);
        let mut none = WalkCache::new(0);
        none.insert(0, VA, &steps(), none.seq());
        assert_eq!(none.len(), 0);
    }

    #[test]
    fn a_walk_racing_an_invalidation_inserts_nothing() {
        let mut c = WalkCache::new(8);
        let seq = c.seq();
        c.invalidate(TlbiTarget::Asid(5));
        c.insert(0, VA, &steps(), seq);
        assert_eq!(c.len(), 0);
    }

    #[test]
    fn range_drops_entries_whose_span_overlaps() {
        let mut c = WalkCache::new(8);
        c.insert(3, VA, &steps(), c.seq());
        c.insert(4, VA, &steps(), c.seq());
        // One page in another 2 MiB region of the same 1 GiB: the level-4 and level-3
        // entries cover it, the level-2 entry does not.
        let dropped = c.invalidate(TlbiTarget::Range {
            asid: 3,
            va: prefix(VA, 2) + pt::span(2),
            size: 4096,
        });
        assert_eq!(dropped, 2);
        assert_eq!(
            c.lookup(3, VA),
            Some(WalkStart {
                level: 1,
                table: 0x1000
            })
        );
        assert_eq!(c.lookup(3, VA + pt::span(2)), None);
        assert!(c.lookup(4, VA + pt::span(2)).is_some(), "other ASIDs stay");
    }
}
