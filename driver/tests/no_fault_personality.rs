//! A device without page faults (the edu shape): the same mirror, mapped on submit at
//! IOVA == VA through the IOMMU alone, torn down when the CPU mapping changes. Runs on the
//! emulator's IOMMU, whose mapping table is checked directly.

use std::sync::Arc;

use driver::backend::emulated::EmulatedBackend;
use driver::context::{ContextCore, ContextOptions};
use driver::dma::DmaSpace;
use driver::fault::CancelReason;
use driver::view::IommuView;
use driver::Error;
use firmware_stubs::Accelerator;
use mirror::{AddressSpace, Config, Mapping};

const PAGE: u64 = 4096;
const RW: libc::c_int = libc::PROT_READ | libc::PROT_WRITE;

fn exact() -> ContextOptions {
    ContextOptions {
        fault_around: 0,
        ..Default::default()
    }
}

struct Setup {
    device: Arc<Accelerator>,
    dma: Arc<DmaSpace>,
    mm: Arc<AddressSpace>,
    edu: ContextCore,
}

/// The emulator used as a bare IOMMU, and a no-fault mirror (IommuView) over it.
fn setup(config: Config) -> Setup {
    let device = Arc::new(Accelerator::new(Default::default()).unwrap());
    let dma = Arc::new(DmaSpace::new(Box::new(EmulatedBackend::from_device(
        device.clone(),
    ))));
    let mm = Arc::new(AddressSpace::current(config).unwrap());
    let edu = ContextCore::new(
        dma.clone(),
        0,
        mm.clone(),
        Box::new(IommuView::new()),
        exact(),
    )
    .unwrap();
    Setup {
        device,
        dma,
        mm,
        edu,
    }
}

#[test]
fn mapped_on_submit_and_torn_down_on_cpu_change() {
    let Setup {
        device,
        dma,
        mm,
        edu,
    } = setup(Config::default());
    let baseline = device.dma_stats();

    // Submit: the range is faulted in and mapped at IOVA == VA.
    let m = Mapping::anonymous(4 * PAGE as usize, RW).unwrap();
    let iova = edu.map_for_device(m.addr(), m.len() as u64, true).unwrap();
    assert_eq!(iova, m.addr());
    let mapped = device.dma_stats();
    assert_eq!(mapped.mappings, baseline.mappings + 1);
    assert_eq!(mapped.mapped_bytes, baseline.mapped_bytes + m.len() as u64);
    assert!(edu.translate(m.addr() + 3 * PAGE).is_some());

    // A second mirror of the same memory cannot take the same IOVA: a clear error.
    let other = ContextCore::new(
        dma.clone(),
        1,
        mm.clone(),
        Box::new(IommuView::new()),
        exact(),
    )
    .unwrap();
    let err = other.map_for_device(m.addr(), PAGE, false).unwrap_err();
    assert!(matches!(err, Error::IdentityUnavailable { .. }), "{err}");

    // Permission: a read-only mapping cannot be mapped for device writes.
    let ro = Mapping::anonymous(PAGE as usize, libc::PROT_READ).unwrap();
    let err = edu.map_for_device(ro.addr(), PAGE, true).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Cancelled {
                reason: CancelReason::Permission
            }
        ),
        "{err}"
    );
    edu.map_for_device(ro.addr(), PAGE, false).unwrap();

    // The CPU unmaps part of it: the IOMMU mapping is gone when the strict wrapper returns.
    let range = m.forget();
    let head = mirror::VaRange::new(range.start(), PAGE).unwrap();
    // SAFETY: ours; nothing refers into it.
    unsafe { mm.munmap(head).unwrap() };
    assert!(
        edu.translate(range.start() + PAGE).is_none(),
        "the whole DMA mapping went"
    );
    let after = device.dma_stats();
    assert_eq!(
        after.mappings,
        baseline.mappings + 1,
        "only the read-only page stays mapped"
    );
    // The rest of the buffer is mapped again on the next submit.
    edu.map_for_device(range.start() + PAGE, 3 * PAGE, true)
        .unwrap();
    assert_eq!(device.dma_stats().mappings, baseline.mappings + 2);

    // Shutting down unmaps everything.
    edu.shut_down();
    assert_eq!(device.dma_stats().mappings, baseline.mappings);
    assert_eq!(dma.iova().allocations(), 0);
    // SAFETY: the tail is ours.
    unsafe {
        mm.munmap(mirror::VaRange::new(range.start() + PAGE, 3 * PAGE).unwrap())
            .unwrap()
    };
}

#[test]
fn overlapping_submits_share_and_replace_identity_mappings() {
    let Setup {
        device, mm, edu, ..
    } = setup(Config::explicit_only());
    let m = Mapping::anonymous(4 * PAGE as usize, RW).unwrap();
    // Two buffers sharing a page, like two malloc'd buffers: the second submit overlaps the first.
    edu.map_for_device(m.addr(), 2 * PAGE, true).unwrap();
    edu.map_for_device(m.addr() + PAGE + 100, 2 * PAGE, true)
        .unwrap();
    // The first buffer stays mapped; only the gap was added.
    for page in 0..4 {
        let t = edu.translate(m.addr() + page * PAGE).expect("mapped");
        assert_eq!(t.iova, m.addr() + page * PAGE, "IOVA == VA");
    }
    assert_eq!(device.dma_stats().mappings, 2);
    // A range already covered costs nothing: no new mapping.
    let before = device.dma_stats().mappings;
    edu.map_for_device(m.addr() + 2 * PAGE, 10, false).unwrap();
    assert_eq!(device.dma_stats().mappings, before);
    // A write over a read-only mapping replaces it.
    let ro = Mapping::anonymous(2 * PAGE as usize, libc::PROT_READ).unwrap();
    edu.map_for_device(ro.addr(), PAGE, false).unwrap();
    assert_eq!(
        edu.translate(ro.addr()).unwrap().perms,
        accel_abi::pt::Perms::R
    );
    // SAFETY: the mapping is ours and reached only through raw pointers.
    unsafe { mm.mprotect(ro.range(), mirror::Perms::READ_WRITE).unwrap() };
    edu.map_for_device(ro.addr(), 2 * PAGE, true).unwrap();
    assert_eq!(
        edu.translate(ro.addr()).unwrap().perms,
        accel_abi::pt::Perms::RW
    );
    assert!(edu.translate(ro.addr() + PAGE).is_some());
    edu.shut_down();
    assert_eq!(device.dma_stats().mappings, 0);
}
