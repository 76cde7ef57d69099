//! The revision-3 invalidation queue (CAP_FEATURES.TLBI_QUEUE): its registers and descriptor
//! decoding. The device model (`device.rs`) performs a batch outside the state lock.
//!
//! The ring is `TLBIQ_ENTRIES` descriptors of [`TlbiDescriptor::SIZE`] bytes at `TLBIQ_BASE`.
//! `TLBIQ_TAIL` (driver-owned) and `TLBIQ_HEAD` (device-owned) are free-running 32-bit indices,
//! like the command queue's. A doorbell performs `HEAD..TAIL`, fences once, then sets
//! `HEAD = TAIL`.

use accel_abi::regs::{tlbiq_ctrl, TlbiScope};
use accel_abi::{TlbiDescriptor, PAGE_SIZE};

use crate::device::range_canonical;
use crate::tlb::TlbiTarget;

/// The queue's registers.
#[derive(Default)]
pub(crate) struct TlbiQueue {
    pub(crate) base: u64,
    pub(crate) entries: u32,
    pub(crate) ctrl: u32,
    pub(crate) tail: u32,
    pub(crate) head: u32,
    pub(crate) performed: u64,
    pub(crate) fences: u64,
    /// Bumped whenever ENABLE changes, so a batch that ran across a disable (which reset HEAD
    /// and TAIL) does not move the new HEAD.
    epoch: u64,
}

/// The descriptors one doorbell asked for, with the geometry they were posted under.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Batch {
    base: u64,
    entries: u32,
    /// First descriptor's free-running index.
    pub(crate) head: u32,
    tail: u32,
    epoch: u64,
}

impl Batch {
    /// Number of descriptors.
    pub(crate) fn len(&self) -> u32 {
        self.tail.wrapping_sub(self.head)
    }

    /// IOVA of the descriptor with free-running index `index`.
    pub(crate) fn slot_iova(&self, index: u32) -> u64 {
        let slot = u64::from(index % self.entries.max(1));
        self.base.wrapping_add(slot * TlbiDescriptor::SIZE as u64)
    }
}

impl TlbiQueue {
    pub(crate) fn enabled(&self) -> bool {
        self.ctrl & tlbiq_ctrl::ENABLE != 0
    }

    /// A TLBIQ_CTRL write the caller validated (defined bits only; enabling only with a ring
    /// that fits). Clearing ENABLE resets HEAD and TAIL.
    pub(crate) fn set_ctrl(&mut self, v: u32) {
        if (v & tlbiq_ctrl::ENABLE != 0) != self.enabled() {
            self.epoch += 1;
        }
        self.ctrl = v;
        if !self.enabled() {
            self.head = 0;
            self.tail = 0;
        }
    }

    /// A TLBIQ_TAIL write: `false` if it is a bad doorbell (the queue is disabled, the index
    /// moved backwards or more than ENTRIES ahead of HEAD), and nothing changed.
    pub(crate) fn doorbell(&mut self, tail: u32) -> bool {
        let pending = tail.wrapping_sub(self.head);
        let old_pending = self.tail.wrapping_sub(self.head);
        if !self.enabled() || pending > self.entries || pending < old_pending {
            return false;
        }
        self.tail = tail;
        true
    }

    /// The descriptors waiting to be performed, if any.
    pub(crate) fn batch(&self) -> Option<Batch> {
        (self.enabled() && self.tail != self.head).then_some(Batch {
            base: self.base,
            entries: self.entries,
            head: self.head,
            tail: self.tail,
            epoch: self.epoch,
        })
    }

    /// `batch` was performed and fenced: count it and, unless the queue was disabled (or
    /// disabled and re-enabled) meanwhile, move HEAD past it.
    pub(crate) fn complete(&mut self, batch: &Batch) {
        self.performed = self.performed.wrapping_add(u64::from(batch.len()));
        self.fences = self.fences.wrapping_add(1);
        if self.epoch == batch.epoch && self.head == batch.head {
            self.head = batch.tail;
        }
    }
}

/// What a descriptor invalidates and whether it keeps walk-cache entries (`LEAF_ONLY`), or
/// `None` if it is malformed: a reserved field or bit set, an unknown scope, an ASID at or
/// beyond `asids`, an `All` descriptor with a non-zero ASID, a non-`Range` descriptor with a
/// non-zero VA or size, or a `Range` that is misaligned, empty or beyond the VA space.
pub(crate) fn descriptor_target(
    raw: &[u8; TlbiDescriptor::SIZE],
    asids: u32,
) -> Option<(TlbiTarget, bool)> {
    let d = TlbiDescriptor::decode(raw).ok()?;
    let (scope, leaf_only) = TlbiScope::decode(u32::from(d.scope))?;
    let asid_ok = u32::from(d.asid) < asids;
    let target = match scope {
        TlbiScope::All if d.asid == 0 && d.va == 0 && d.size == 0 => TlbiTarget::All,
        TlbiScope::Asid if asid_ok && d.va == 0 && d.size == 0 => TlbiTarget::Asid(d.asid),
        TlbiScope::Range
            if asid_ok
                && d.va % PAGE_SIZE == 0
                && d.size != 0
                && d.size % PAGE_SIZE == 0
                && range_canonical(d.va, d.size) =>
        {
            TlbiTarget::Range {
                asid: d.asid,
                va: d.va,
                size: d.size,
            }
        }
        _ => return None,
    };
    Some((target, leaf_only))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(asid: u16, scope: u16, va: u64, size: u64) -> [u8; 32] {
        TlbiDescriptor {
            asid,
            scope,
            va,
            size,
        }
        .encode()
    }

    #[test]
    fn descriptors_decode_and_malformed_ones_are_refused() {
        let range = TlbiScope::Range as u16;
        let asid = TlbiScope::Asid as u16;
        let all = TlbiScope::All as u16;
        let leaf = accel_abi::regs::tlbi_scope::LEAF_ONLY as u16;
        assert!(matches!(
            descriptor_target(&raw(3, range | leaf, 0x1000, 0x2000), 64),
            Some((
                TlbiTarget::Range {
                    asid: 3,
                    va: 0x1000,
                    size: 0x2000
                },
                true
            ))
        ));
        assert!(matches!(
            descriptor_target(&raw(63, asid, 0, 0), 64),
            Some((TlbiTarget::Asid(63), false))
        ));
        assert!(matches!(
            descriptor_target(&raw(0, all, 0, 0), 64),
            Some((TlbiTarget::All, false))
        ));
        let mut reserved = raw(1, asid, 0, 0);
        reserved[5] = 1;
        for bad in [
            reserved,
            raw(64, asid, 0, 0),
            raw(1, 3, 0, 0),
            raw(1, asid | 1 << 4, 0, 0),
            raw(1, all, 0, 0),
            raw(1, asid, 0x1000, 0),
            raw(1, range, 0x1001, 0x1000),
            raw(1, range, 0x1000, 0),
            raw(1, range, 0x1000, 0x800),
            raw(1, range, 1 << 48, 0x1000),
            raw(1, range, (1 << 48) - 0x1000, 0x2000),
        ] {
            assert!(descriptor_target(&bad, 64).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn doorbells_move_forward_within_the_ring() {
        let mut q = TlbiQueue {
            entries: 4,
            ..Default::default()
        };
        assert!(!q.doorbell(1), "disabled");
        q.set_ctrl(tlbiq_ctrl::ENABLE);
        assert!(!q.doorbell(5), "beyond ENTRIES");
        assert!(q.doorbell(4));
        assert!(!q.doorbell(3), "backwards");
        let b = q.batch().unwrap();
        assert_eq!(b.len(), 4);
        q.complete(&b);
        assert_eq!((q.head, q.tail, q.performed, q.fences), (4, 4, 4, 1));
        assert!(q.batch().is_none());
        assert!(q.doorbell(6));
        let b = q.batch().unwrap();
        q.set_ctrl(0);
        q.set_ctrl(tlbiq_ctrl::ENABLE);
        q.complete(&b);
        assert_eq!(
            (q.head, q.tail),
            (0, 0),
            "a disable in between keeps the new HEAD"
        );
    }
}
