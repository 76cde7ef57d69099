//! The device TLB: caches leaf translations until told otherwise.
//!
//! It never caches misses. Capacity is bounded; when full, the oldest entry is evicted (FIFO).
//! A walk that started before an invalidation must not install its (possibly stale) result
//! afterwards: every invalidation bumps `inval_seq`, and `insert` refuses an entry whose walk
//! started under an older sequence.
//!
//! The page-walk cache ([`WalkCache`]) and the revision-2 counters live in the same struct, under
//! the same mutex: a TLB miss consults the walk cache in the critical section that counts the
//! miss, and a hit never touches it.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

use accel_abi::pt::Perms;
use accel_abi::{LARGE_PAGE_SIZE, PAGE_SIZE};

use crate::walk_cache::WalkCache;

/// One cached leaf translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TlbEntry {
    /// First VA of the leaf.
    pub(crate) va_base: u64,
    /// 4 KiB or 2 MiB.
    pub(crate) size: u64,
    /// IOVA the leaf maps to.
    pub(crate) iova_base: u64,
    /// Leaf permissions.
    pub(crate) perms: Perms,
    /// The leaf had DIRTY when it was cached (or the walk set it): with PT_CTRL.AD_ENABLE, a
    /// write or atomic hitting an entry without it re-walks to set DIRTY.
    pub(crate) dirty: bool,
}

impl TlbEntry {
    pub(crate) fn iova_of(&self, va: u64) -> u64 {
        self.iova_base + (va - self.va_base)
    }
}

type Key = (u16, u64, bool);

/// A multiply-rotate hasher for the TLB's small integer keys. The keys come from the device's
/// own translations, not from an adversary choosing collisions, so SipHash's flood resistance
/// buys nothing here while its cost sits on every lookup and insert.
#[derive(Default, Clone, Copy)]
pub(crate) struct KeyHasher(u64);

/// An odd constant with well-mixed bits (the 64-bit golden ratio).
const MIX: u64 = 0x9e37_79b9_7f4a_7c15;

impl KeyHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(MIX);
    }
}

impl Hasher for KeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            self.add(u64::from_le_bytes(w));
        }
    }
    fn write_u8(&mut self, v: u8) {
        self.add(v.into());
    }
    fn write_u16(&mut self, v: u16) {
        self.add(v.into());
    }
    fn write_u32(&mut self, v: u32) {
        self.add(v.into());
    }
    fn write_u64(&mut self, v: u64) {
        self.add(v);
    }
    fn write_usize(&mut self, v: usize) {
        self.add(v as u64);
    }
    fn finish(&self) -> u64 {
        // The table indexes by the low bits and probes with the high ones: fold the
        // well-mixed high half down so both are spread. (Page-aligned VAs have their low 12
        // bits zero.)
        self.0 ^ (self.0 >> 29)
    }
}

pub(crate) type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<KeyHasher>>;

fn key(asid: u16, va_base: u64, size: u64) -> Key {
    (asid, va_base, size == LARGE_PAGE_SIZE)
}

pub(crate) struct Tlb {
    cap: usize,
    map: FastMap<Key, (TlbEntry, u64)>,
    order: VecDeque<(Key, u64)>,
    next_stamp: u64,
    inval_seq: u64,
    pub(crate) hits: u64,
    pub(crate) misses: u64,
    /// Non-leaf entries (revision 2).
    pub(crate) walk_cache: WalkCache,
    /// ACCESSED/DIRTY updates written into leaves (AD_UPDATES).
    pub(crate) ad_updates: u64,
}

/// Which entries an invalidation drops.
#[derive(Debug, Clone, Copy)]
pub(crate) enum TlbiTarget {
    Range { asid: u16, va: u64, size: u64 },
    Asid(u16),
    All,
}

impl Tlb {
    /// A TLB of `cap` leaf entries beside a walk cache of `walk_cap` table entries.
    pub(crate) fn new(cap: usize, walk_cap: usize) -> Self {
        Tlb {
            cap,
            // One over: an insert briefly holds `cap + 1` entries before it evicts.
            map: FastMap::with_capacity_and_hasher(cap + 1, Default::default()),
            order: VecDeque::with_capacity(cap),
            next_stamp: 0,
            inval_seq: 0,
            hits: 0,
            misses: 0,
            walk_cache: WalkCache::new(walk_cap),
            ad_updates: 0,
        }
    }

    /// The translation of `va`, if cached. Counts neither hit nor miss (the caller decides
    /// whether the entry is usable).
    pub(crate) fn lookup(&self, asid: u16, va: u64) -> Option<TlbEntry> {
        let small = key(asid, va & !(PAGE_SIZE - 1), PAGE_SIZE);
        let large = key(asid, va & !(LARGE_PAGE_SIZE - 1), LARGE_PAGE_SIZE);
        self.map
            .get(&small)
            .or_else(|| self.map.get(&large))
            .map(|(e, _)| *e)
    }

    pub(crate) fn remove(&mut self, asid: u16, e: &TlbEntry) {
        self.map.remove(&key(asid, e.va_base, e.size));
    }

    pub(crate) fn seq(&self) -> u64 {
        self.inval_seq
    }

    /// Cache `e` unless an invalidation ran since the walk that produced it began.
    pub(crate) fn insert(&mut self, asid: u16, e: TlbEntry, walk_seq: u64) {
        if walk_seq != self.inval_seq || self.cap == 0 {
            return;
        }
        let k = key(asid, e.va_base, e.size);
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        // One probe of the table: insert (or replace), then evict the oldest if that went over
        // capacity. The new entry is the youngest, so it is never the one evicted.
        self.map.insert(k, (e, stamp));
        self.order.push_back((k, stamp));
        if self.map.len() > self.cap {
            self.evict_one();
        }
        // Invalidations leave stale keys in `order`; keep it from growing without bound.
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

    /// Drop the matching leaf entries and, unless `leaf_only`, the walk-cache entries of the
    /// same scope; returns how many leaf entries were dropped.
    pub(crate) fn invalidate(&mut self, target: TlbiTarget, leaf_only: bool) -> usize {
        if !leaf_only {
            self.walk_cache.invalidate(target);
        }
        self.invalidate_leaves(target)
    }

    fn invalidate_leaves(&mut self, target: TlbiTarget) -> usize {
        self.inval_seq += 1;
        let before = self.map.len();
        match target {
            TlbiTarget::All => self.map.clear(),
            TlbiTarget::Asid(a) => self.map.retain(|k, _| k.0 != a),
            TlbiTarget::Range { asid, va, size } => {
                let end = va.saturating_add(size);
                self.map.retain(|k, (e, _)| {
                    k.0 != asid || e.va_base >= end || e.va_base + e.size <= va
                });
            }
        }
        before - self.map.len()
    }

    /// Power-on state. The invalidation sequence keeps counting so that a walk begun before the
    /// reset cannot install its result afterwards.
    pub(crate) fn reset(&mut self) {
        self.map.clear();
        self.order.clear();
        self.inval_seq += 1;
        self.hits = 0;
        self.misses = 0;
        self.walk_cache.reset();
        self.ad_updates = 0;
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(va: u64, size: u64) -> TlbEntry {
        TlbEntry {
            va_base: va,
            size,
            iova_base: 0x1000_0000 + va,
            perms: Perms::RW,
            dirty: false,
        }
    }

    #[test]
    fn key_hasher_spreads_page_keys() {
        use std::hash::{BuildHasher, BuildHasherDefault};
        let b = BuildHasherDefault::<KeyHasher>::default();
        // Consecutive pages of one ASID, and one page in many ASIDs, land in many different
        // buckets of a 1024-bucket table (the low bits) and carry varied high bits.
        let low: std::collections::HashSet<u64> = (0..1024u64)
            .map(|i| b.hash_one(key(1, i * PAGE_SIZE, PAGE_SIZE)) & 1023)
            .collect();
        assert!(low.len() > 512, "only {} distinct buckets", low.len());
        let asids: std::collections::HashSet<u64> = (0..256u16)
            .map(|a| b.hash_one(key(a, 0x40_0000, PAGE_SIZE)) >> 57)
            .collect();
        assert!(asids.len() > 64, "only {} distinct tags", asids.len());
        assert_ne!(
            b.hash_one(key(1, 0x20_0000, PAGE_SIZE)),
            b.hash_one(key(1, 0x20_0000, LARGE_PAGE_SIZE))
        );
    }

    #[test]
    fn lookup_finds_small_and_large() {
        let mut t = Tlb::new(8, 0);
        t.insert(1, entry(0x5000, PAGE_SIZE), t.seq());
        t.insert(1, entry(0x40_0000, LARGE_PAGE_SIZE), t.seq());
        assert_eq!(
            t.lookup(1, 0x5123).map(|e| e.iova_of(0x5123)),
            Some(0x1000_5123)
        );
        assert!(t.lookup(1, 0x5ff_f000).is_none());
        assert!(t.lookup(1, 0x41_2345).is_some());
        assert!(t.lookup(2, 0x5123).is_none(), "entries are per ASID");
    }

    #[test]
    fn bounded_with_fifo_eviction() {
        let mut t = Tlb::new(4, 0);
        for i in 0..6u64 {
            t.insert(0, entry(i * PAGE_SIZE, PAGE_SIZE), t.seq());
        }
        assert_eq!(t.len(), 4);
        assert!(t.lookup(0, 0).is_none() && t.lookup(0, PAGE_SIZE).is_none());
        assert!(t.lookup(0, 5 * PAGE_SIZE).is_some());
    }

    #[test]
    fn walk_racing_an_invalidation_is_not_cached() {
        let mut t = Tlb::new(4, 0);
        let seq = t.seq();
        t.invalidate(TlbiTarget::All, false);
        t.insert(0, entry(0, PAGE_SIZE), seq);
        assert!(t.lookup(0, 0).is_none());
    }

    #[test]
    fn range_invalidation_hits_overlapping_large_leaf() {
        let mut t = Tlb::new(8, 0);
        t.insert(3, entry(0x20_0000, LARGE_PAGE_SIZE), t.seq());
        t.insert(3, entry(0x1000, PAGE_SIZE), t.seq());
        let dropped = t.invalidate(
            TlbiTarget::Range {
                asid: 3,
                va: 0x30_0000,
                size: PAGE_SIZE,
            },
            true,
        );
        assert_eq!(dropped, 1);
        assert!(t.lookup(3, 0x20_0000).is_none());
        assert!(t.lookup(3, 0x1000).is_some());
    }

    #[test]
    fn leaf_only_keeps_the_walk_cache() {
        use crate::walk_cache::TableStep;
        let mut t = Tlb::new(8, 8);
        let step = [TableStep {
            level: 2,
            next_table: 0x9000,
        }];
        t.walk_cache.insert(1, 0x20_0000, &step, t.walk_cache.seq());
        t.invalidate(TlbiTarget::Asid(1), true);
        assert!(t.walk_cache.lookup(1, 0x20_0000).is_some());
        t.invalidate(TlbiTarget::Asid(1), false);
        assert!(t.walk_cache.lookup(1, 0x20_0000).is_none());
    }
}
