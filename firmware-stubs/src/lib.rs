//! The emulated MXA-1 accelerator, as specified in `docs/device.md`.
//!
//! [`Accelerator`] looks like a PCI device: configuration space and BAR0 are accessed by offset
//! and bytes, DMA goes through mappings the host establishes with [`Accelerator::dma_map`]
//! (an IOMMU), interrupts are delivered through eventfds. All state is behind `&self` and
//! thread-safe, so a vfio-user server can be a thin layer over it.
//!
//! ```
//! use firmware_stubs::{Accelerator, AcceleratorConfig};
//! use accel_abi::{config, regs};
//!
//! let dev = Accelerator::new(AcceleratorConfig::default()).unwrap();
//! dev.config_write(config::off::COMMAND as u64, &config::command::MEMORY.to_le_bytes());
//! let mut id = [0u8; 4];
//! dev.bar_read(0, regs::ID, &mut id);
//! assert_eq!(u32::from_le_bytes(id), regs::ID_VALUE);
//! ```
#![deny(missing_docs)]

mod config_space;
mod device;
mod iommu;
mod irq;
mod memory;
mod mmu;
mod tlb;
mod tlbi_queue;
pub mod vfio_user_server;
mod walk_cache;

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::thread::JoinHandle;

pub use iommu::{DmaError, DmaPerms, DmaStats, IommuFaultEntry, IommuFaultReason};
pub use memory::{DmaAccessError, DmaMemory, ProcessMemory, SharedRegion};

use device::Inner;
use sys_util::sync::{lock, read, write};

/// Device parameters (what the capability registers report).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceleratorConfig {
    /// Address spaces (CAP_ASIDS), `1..=accel_abi::regs::MAX_ASIDS`.
    pub asids: u32,
    /// Worker threads running work items, `1..=64`.
    pub workers: usize,
    /// TLB capacity in entries (4 KiB or 2 MiB leaves), `1..=65536`.
    pub tlb_entries: usize,
    /// CAP_FAULT_ENTRIES: a power of two, `2..=1 << 20`.
    pub fault_entries_max: u32,
    /// CAP_CMDQ_ENTRIES: a power of two, `2..=1 << 20`.
    pub cmdq_entries_max: u32,
    /// CAP_MAX_TRANSFER in bytes, at least 4096.
    pub max_transfer: u32,
    /// How long an idle worker keeps watching for work before it parks, in microseconds,
    /// `0..=10_000` (0 = park at once). At most one worker watches at a time: it spins briefly,
    /// then yields the CPU between looks, so a doorbell, replay or re-enable that arrives while
    /// it watches is picked up without a thread wake-up (the writer makes no syscall). Parked
    /// workers are woken through a condition variable, which costs a cross-thread wake-up.
    pub idle_spin_us: u32,
    /// CAP_FAULT_LOOKAHEAD: further pages of the stalled operand an engine checks and reports
    /// when the driver set FAULT_BUF_CTRL.LOOKAHEAD, `0..=512` (0 = no lookahead).
    pub fault_lookahead: u32,
    /// The device's MSI writes reach their eventfds (default). `false` models a platform where
    /// MSI was not really enabled (a guest whose hypervisor failed to enable the device's MSI):
    /// INTR_STATUS latches as always, interrupt routing is accepted, and no eventfd is ever
    /// signalled.
    pub deliver_msi: bool,
    /// The device implements ACCESSED/DIRTY maintenance (CAP_FEATURES.ACCESSED_DIRTY; the
    /// driver turns it on with PT_CTRL.AD_ENABLE). Default true; false models a revision-2
    /// device without it, whose PT_CTRL refuses AD_ENABLE.
    pub accessed_dirty: bool,
    /// Page-walk cache capacity in non-leaf entries, `0..=65536` (default
    /// [`DEFAULT_WALK_CACHE_ENTRIES`]). 0: no walk cache, CAP_FEATURES.WALK_CACHE clear, every
    /// walk starts at the root.
    pub walk_cache_entries: usize,
    /// Revision 3: FAULT_REPLAY accepts an address-space-scoped value
    /// (CAP_FEATURES.SCOPED_REPLAY). Default true; false models a device without it, where every
    /// replay value retries every stalled item.
    pub scoped_replay: bool,
    /// Revision 3: FAULT_LOOKAHEAD_DEPTH is writable (CAP_FEATURES.LOOKAHEAD_DEPTH). Default
    /// true; false models a device whose lookahead always checks CAP_FAULT_LOOKAHEAD pages.
    pub lookahead_depth_writable: bool,
    /// Revision 3: CAP_TLBIQ_ENTRIES, the invalidation-queue capacity (CAP_FEATURES.TLBI_QUEUE).
    /// 0: no queue; else a power of two in `2..=65536` (default
    /// [`DEFAULT_TLBI_QUEUE_ENTRIES`]).
    pub tlbi_queue_entries: u32,
}

/// Default [`AcceleratorConfig::tlbi_queue_entries`].
pub const DEFAULT_TLBI_QUEUE_ENTRIES: u32 = 256;

/// Default [`AcceleratorConfig::walk_cache_entries`].
pub const DEFAULT_WALK_CACHE_ENTRIES: usize = 64;

/// Default [`AcceleratorConfig::fault_lookahead`]: a 64 KiB operand faults in one batch.
pub const DEFAULT_FAULT_LOOKAHEAD: u32 = 15;

/// Default [`AcceleratorConfig::idle_spin_us`] (the trade-off is measured in
/// `docs/performance.md`).
pub const DEFAULT_IDLE_SPIN_US: u32 = 50;

impl Default for AcceleratorConfig {
    fn default() -> Self {
        AcceleratorConfig {
            asids: 64,
            workers: 2,
            tlb_entries: 1024,
            fault_entries_max: 4096,
            cmdq_entries_max: 1024,
            max_transfer: 64 << 20,
            idle_spin_us: DEFAULT_IDLE_SPIN_US,
            fault_lookahead: DEFAULT_FAULT_LOOKAHEAD,
            deliver_msi: true,
            accessed_dirty: true,
            walk_cache_entries: DEFAULT_WALK_CACHE_ENTRIES,
            scoped_replay: true,
            lookahead_depth_writable: true,
            tlbi_queue_entries: DEFAULT_TLBI_QUEUE_ENTRIES,
        }
    }
}

/// An invalid [`AcceleratorConfig`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid accelerator configuration: `{field}` = {value} ({rule})")]
pub struct ConfigError {
    /// The field.
    pub field: &'static str,
    /// Its value.
    pub value: u64,
    /// What it must satisfy.
    pub rule: &'static str,
}

impl AcceleratorConfig {
    /// CAP_FEATURES as this configuration reports it.
    pub fn features(&self) -> u32 {
        use accel_abi::regs::features;
        let mut f = 0;
        if self.accessed_dirty {
            f |= features::ACCESSED_DIRTY;
        }
        if self.walk_cache_entries > 0 {
            f |= features::WALK_CACHE;
        }
        if self.tlbi_queue_entries > 0 {
            f |= features::TLBI_QUEUE;
        }
        if self.scoped_replay {
            f |= features::SCOPED_REPLAY;
        }
        if self.lookahead_depth_writable {
            f |= features::LOOKAHEAD_DEPTH;
        }
        f
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let fail = |field, value: u64, rule| Err(ConfigError { field, value, rule });
        if !(1..=accel_abi::regs::MAX_ASIDS).contains(&self.asids) {
            return fail("asids", self.asids.into(), "1..=MAX_ASIDS");
        }
        if !(1..=64).contains(&self.workers) {
            return fail("workers", self.workers as u64, "1..=64");
        }
        if !(1..=65536).contains(&self.tlb_entries) {
            return fail("tlb_entries", self.tlb_entries as u64, "1..=65536");
        }
        let ring = |v: u32| v.is_power_of_two() && (2..=1 << 20).contains(&v);
        if !ring(self.fault_entries_max) {
            return fail(
                "fault_entries_max",
                self.fault_entries_max.into(),
                "a power of two in 2..=2^20",
            );
        }
        if !ring(self.cmdq_entries_max) {
            return fail(
                "cmdq_entries_max",
                self.cmdq_entries_max.into(),
                "a power of two in 2..=2^20",
            );
        }
        if self.fault_lookahead > 512 {
            return fail("fault_lookahead", self.fault_lookahead.into(), "0..=512");
        }
        if self.max_transfer < 4096 {
            return fail("max_transfer", self.max_transfer.into(), ">= 4096");
        }
        if self.walk_cache_entries > 65536 {
            return fail(
                "walk_cache_entries",
                self.walk_cache_entries as u64,
                "0..=65536",
            );
        }
        let q = self.tlbi_queue_entries;
        if q != 0 && !(q.is_power_of_two() && (2..=65536).contains(&q)) {
            return fail(
                "tlbi_queue_entries",
                q.into(),
                "0 (no queue) or a power of two in 2..=65536",
            );
        }
        if self.idle_spin_us > 10_000 {
            return fail("idle_spin_us", self.idle_spin_us.into(), "0..=10000");
        }
        Ok(())
    }
}

/// Why [`Accelerator::set_irq`] refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IrqError {
    /// The device has vectors `0..accel_abi::vector::COUNT`.
    #[error("no interrupt vector {0}")]
    NoSuchVector(u32),
}

/// One emulated MXA-1 device.
///
/// `Send + Sync`; every method takes `&self`. Dropping it stops the worker threads (after at
/// most one in-flight chunk of work each); it never waits for stalled work.
pub struct Accelerator {
    inner: Arc<Inner>,
    workers: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Accelerator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accelerator")
            .field("workers", &self.workers.len())
            .finish_non_exhaustive()
    }
}

impl Accelerator {
    /// Power on a device with `cfg` and start its worker threads.
    pub fn new(cfg: AcceleratorConfig) -> Result<Accelerator, ConfigError> {
        cfg.validate()?;
        let n = cfg.workers;
        let inner = Arc::new(Inner::new(cfg));
        let mut workers = Vec::with_capacity(n);
        for i in 0..n {
            let w = Arc::clone(&inner);
            let spawned = std::thread::Builder::new()
                .name(format!("mxa1-worker-{i}"))
                .spawn(move || w.worker_loop());
            match spawned {
                Ok(h) => workers.push(h),
                Err(e) => {
                    // Stop the ones already running before reporting.
                    let dev = Accelerator { inner, workers };
                    drop(dev);
                    return Err(ConfigError {
                        field: "workers",
                        value: i as u64,
                        rule: if e.kind() == std::io::ErrorKind::OutOfMemory {
                            "thread spawn failed: out of memory"
                        } else {
                            "thread spawn failed"
                        },
                    });
                }
            }
        }
        Ok(Accelerator { inner, workers })
    }

    /// Test knob: while `hold` is true, every work item (fetched, replayed or newly fetched)
    /// pauses before its next step and makes no memory access, like an engine that is stuck;
    /// register writes, TLB invalidations and DMA unmaps still complete. Lets a test make a
    /// command outlast its submitter's timeout deterministically.
    pub fn hold_work(&self, hold: bool) {
        self.inner.set_held(hold);
    }

    /// Test companion of [`Accelerator::hold_work`]: wait until the device has no fetched work
    /// left, neither running nor stalled (STATUS has neither BUSY nor STALLED), polling every
    /// 5 ms for at most `patience`. Returns whether it went idle.
    pub fn wait_idle(&self, patience: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + patience;
        loop {
            let mut raw = [0u8; 4];
            self.bar_read(0, accel_abi::regs::STATUS, &mut raw);
            let status = u32::from_le_bytes(raw);
            if status & (accel_abi::regs::status::BUSY | accel_abi::regs::status::STALLED) == 0 {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// Read PCI configuration space. Bytes beyond the 256-byte space read 0xff.
    pub fn config_read(&self, offset: u64, data: &mut [u8]) {
        self.inner.config_read(offset, data);
    }

    /// Write PCI configuration space. Read-only bits and bytes beyond the space are ignored.
    pub fn config_write(&self, offset: u64, data: &[u8]) {
        self.inner.config_write(offset, data);
    }

    /// Read a BAR register. `data.len()` must be the register's width (4 or 8). A bad access
    /// sets ERROR_CODE = BAD_REGISTER_ACCESS and fills `data` with 0xff; with memory-space
    /// decoding off, `data` is filled with 0xff and nothing else happens.
    pub fn bar_read(&self, bar: u32, offset: u64, data: &mut [u8]) {
        self.inner.bar_read(bar, offset, data);
    }

    /// Write a BAR register (see [`Accelerator::bar_read`] for access rules). A
    /// `TLBI_TRIGGER` write returns only after the invalidation completed; a `RESET` write
    /// only after the reset completed.
    pub fn bar_write(&self, bar: u32, offset: u64, data: &[u8]) {
        self.inner.bar_write(bar, offset, data);
    }

    /// Map `[iova, iova + len)` to `mem` (offset 0 of `mem` at `iova`) with IOMMU permissions
    /// `perms`. Page aligned; overlapping an existing mapping is an error.
    pub fn dma_map(
        &self,
        iova: u64,
        len: u64,
        mem: Arc<dyn DmaMemory>,
        perms: DmaPerms,
    ) -> Result<(), DmaError> {
        write(self.inner.iommu()).map(iova, len, mem, perms)
    }

    /// Unmap every mapping lying entirely inside `[iova, iova + len)` (VFIO TYPE1v2): a
    /// mapping straddling either end makes the call fail with nothing changed. Returns the
    /// bytes unmapped. When it returns, no device access is using the removed mappings.
    pub fn dma_unmap(&self, iova: u64, len: u64) -> Result<u64, DmaError> {
        let (bytes, removed) = write(self.inner.iommu()).unmap(iova, len)?;
        // The memory objects are released after the lock, as the last device user is gone.
        drop(removed);
        Ok(bytes)
    }

    /// Route interrupt `vector` to `eventfd` (the device writes a u64 1 to it), or stop
    /// signalling it with `None`. Routing survives device resets.
    pub fn set_irq(&self, vector: u32, eventfd: Option<OwnedFd>) -> Result<(), IrqError> {
        if vector >= accel_abi::vector::COUNT {
            return Err(IrqError::NoSuchVector(vector));
        }
        self.inner.set_irq(vector, eventfd);
        Ok(())
    }

    /// Function-level reset as seen through VFIO: BAR0 state, the TLB and all queued, running
    /// and stalled work return to power-on state. Configuration space (restored by VFIO around
    /// a reset), DMA mappings (host IOMMU state) and interrupt routing stay. When it returns, no
    /// pre-reset work touches memory again.
    pub fn reset(&self) {
        self.inner.reset();
    }

    /// The host-side IOMMU fault log: the most recent faults (at most 256), oldest first.
    pub fn iommu_faults(&self) -> Vec<IommuFaultEntry> {
        lock(self.inner.iommu_log()).snapshot()
    }

    /// Number of IOMMU faults ever recorded (including those that left the bounded log).
    pub fn iommu_fault_count(&self) -> u64 {
        lock(self.inner.iommu_log()).total()
    }

    /// Mapping counters.
    pub fn dma_stats(&self) -> DmaStats {
        read(self.inner.iommu()).stats()
    }
}

impl Drop for Accelerator {
    fn drop(&mut self) {
        self.inner.stop();
        for h in self.workers.drain(..) {
            if h.join().is_err() {
                tracing::error!("an MXA-1 worker thread panicked");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_validated() {
        assert!(AcceleratorConfig::default().validate().is_ok());
        let bad = [
            AcceleratorConfig {
                asids: 0,
                ..Default::default()
            },
            AcceleratorConfig {
                asids: accel_abi::regs::MAX_ASIDS + 1,
                ..Default::default()
            },
            AcceleratorConfig {
                workers: 0,
                ..Default::default()
            },
            AcceleratorConfig {
                fault_entries_max: 3000,
                ..Default::default()
            },
            AcceleratorConfig {
                cmdq_entries_max: 1,
                ..Default::default()
            },
            AcceleratorConfig {
                idle_spin_us: 10_001,
                ..Default::default()
            },
            AcceleratorConfig {
                walk_cache_entries: 65537,
                ..Default::default()
            },
            AcceleratorConfig {
                tlbi_queue_entries: 1,
                ..Default::default()
            },
            AcceleratorConfig {
                tlbi_queue_entries: 48,
                ..Default::default()
            },
            AcceleratorConfig {
                tlbi_queue_entries: 1 << 17,
                ..Default::default()
            },
        ];
        for cfg in bad {
            assert!(Accelerator::new(cfg.clone()).is_err(), "{cfg:?}");
        }
    }

    /// Commands are picked up whether the idle workers park at once, watch for a long time, or
    /// have parked after watching (no timing is asserted: a lost wake-up would show as a stall
    /// of the 50 ms safety poll at most, so the test bounds nothing but completion).
    #[test]
    fn doorbells_reach_parked_and_watching_workers() {
        use accel_abi::{config, regs, Command};
        for idle_spin_us in [0, 200, 10_000] {
            let dev = Accelerator::new(AcceleratorConfig {
                idle_spin_us,
                ..Default::default()
            })
            .unwrap();
            let ring = SharedRegion::anonymous(4096).unwrap();
            dev.dma_map(0x10_0000, 4096, ring.clone(), DmaPerms::RW)
                .unwrap();
            let cmd = config::command::MEMORY | config::command::BUS_MASTER;
            dev.config_write(config::off::COMMAND as u64, &cmd.to_le_bytes());
            let w32 = |off: u64, v: u32| dev.bar_write(0, off, &v.to_le_bytes());
            dev.bar_write(0, regs::CMDQ_BASE, &0x10_0000u64.to_le_bytes());
            w32(regs::CMDQ_ENTRIES, 64);
            w32(regs::CMDQ_CTRL, regs::cmdq_ctrl::ENABLE);
            w32(regs::CONTROL, regs::control::ENABLE);
            for i in 0..40u32 {
                let slot = u64::from(i % 64) * Command::SIZE as u64;
                let value = u64::from(i) + 1;
                ring.write_bytes(slot, &Command::fence(value).encode())
                    .unwrap();
                w32(regs::CMDQ_TAIL, i + 1);
                let start = std::time::Instant::now();
                loop {
                    let mut b = [0u8; 8];
                    dev.bar_read(0, regs::FENCE_DONE, &mut b);
                    if u64::from_le_bytes(b) == value {
                        break;
                    }
                    assert!(
                        start.elapsed().as_secs() < 10,
                        "fence {value} never retired"
                    );
                    std::thread::yield_now();
                }
                if i % 8 == 7 {
                    // Let the workers run out of watching and park.
                    std::thread::sleep(std::time::Duration::from_micros(300));
                }
            }
            // Dropping stops watching and parked workers alike.
            drop(dev);
        }
    }

    #[test]
    fn accelerator_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Accelerator>();
    }
}
