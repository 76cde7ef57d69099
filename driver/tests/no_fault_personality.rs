//! A device without page faults (the edu shape): the same mirror, mapped on submit at
//! IOVA == VA through the IOMMU alone, torn down when the CPU mapping changes. Runs on the
//! emulator's IOMMU, whose mapping table is checked directly, opened through the same
//! `Runtime` path as an MXA-1 with a personality of its own ([`BareIommu`]).

use std::sync::Arc;

use driver::backend::emulated::EmulatedBackend;
use driver::backend::Backend;
use driver::context::ContextOptions;
use driver::dma::DmaSpace;
use driver::edu::Edu;
use driver::fault::CancelReason;
use driver::runtime::{Context, DeviceSpec, NoFaults, Personality, Runtime, RuntimeOptions};
use driver::view::{DeviceView, IommuView};
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

/// The edu shape without edu's registers, so it runs without the QEMU guest: any backend's
/// DMA space used as a bare IOMMU (no bring-up beyond it), no fault source, identity views.
/// Implemented here, outside the driver, as a device of one's own would be.
struct BareIommu;

impl Personality for BareIommu {
    type Device = Arc<DmaSpace>;
    type Faults = NoFaults;

    fn bring_up(
        backend: Box<dyn Backend>,
        _options: &RuntimeOptions,
    ) -> Result<Arc<DmaSpace>, Error> {
        Ok(Arc::new(DmaSpace::new(backend)))
    }

    fn dma(device: &Arc<DmaSpace>) -> &Arc<DmaSpace> {
        device
    }

    /// Two, so a test can show a second identity mirror of the same memory colliding.
    fn address_spaces(_device: &Arc<DmaSpace>) -> usize {
        2
    }

    fn fault_source(
        _device: &Arc<Arc<DmaSpace>>,
        _options: &RuntimeOptions,
    ) -> Result<NoFaults, Error> {
        Ok(NoFaults)
    }

    fn view(
        _device: &Arc<Arc<DmaSpace>>,
        _space: u16,
        _options: &ContextOptions,
    ) -> Result<Box<dyn DeviceView>, Error> {
        Ok(Box::new(IommuView::new()))
    }
}

/// The emulator (held, to read its IOMMU's table) opened as a [`BareIommu`].
fn open() -> (Arc<Accelerator>, Arc<Runtime<BareIommu>>) {
    let device = Arc::new(Accelerator::new(Default::default()).unwrap());
    let backend = Box::new(EmulatedBackend::from_device(device.clone()));
    let rt = Runtime::<BareIommu>::open_backend_with(backend, RuntimeOptions::default()).unwrap();
    (device, rt)
}

#[test]
fn mapped_on_submit_and_torn_down_on_cpu_change() {
    let (device, rt) = open();
    // The process's own mirror, as every runtime context gets.
    let edu = rt.create_context_with(exact()).unwrap();
    let mm = edu.address_space().clone();
    let baseline = device.dma_stats();

    // Submit: the range is faulted in and mapped at IOVA == VA.
    let m = Mapping::anonymous(4 * PAGE as usize, RW).unwrap();
    let iova = edu
        .core()
        .map_for_device(m.addr(), m.len() as u64, true)
        .unwrap();
    assert_eq!(iova, m.addr());
    let mapped = device.dma_stats();
    assert_eq!(mapped.mappings, baseline.mappings + 1);
    assert_eq!(mapped.mapped_bytes, baseline.mapped_bytes + m.len() as u64);
    assert!(edu.core().translate(m.addr() + 3 * PAGE).is_some());

    // A second mirror of the same memory cannot take the same IOVA: a clear error.
    let other = rt.create_context_with(exact()).unwrap();
    let err = other
        .core()
        .map_for_device(m.addr(), PAGE, false)
        .unwrap_err();
    assert!(matches!(err, Error::IdentityUnavailable { .. }), "{err}");

    // Permission: a read-only mapping cannot be mapped for device writes.
    let ro = Mapping::anonymous(PAGE as usize, libc::PROT_READ).unwrap();
    let err = edu
        .core()
        .map_for_device(ro.addr(), PAGE, true)
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Cancelled {
                reason: CancelReason::Permission
            }
        ),
        "{err}"
    );
    edu.core().map_for_device(ro.addr(), PAGE, false).unwrap();

    // The CPU unmaps part of it: the IOMMU mapping is gone when the strict wrapper returns.
    let range = m.forget();
    let head = mirror::VaRange::new(range.start(), PAGE).unwrap();
    // SAFETY: ours; nothing refers into it.
    unsafe { mm.munmap(head).unwrap() };
    assert!(
        edu.core().translate(range.start() + PAGE).is_none(),
        "the whole DMA mapping went"
    );
    let after = device.dma_stats();
    assert_eq!(
        after.mappings,
        baseline.mappings + 1,
        "only the read-only page stays mapped"
    );
    // The rest of the buffer is mapped again on the next submit.
    edu.core()
        .map_for_device(range.start() + PAGE, 3 * PAGE, true)
        .unwrap();
    assert_eq!(device.dma_stats().mappings, baseline.mappings + 2);

    // Releasing the context unmaps everything.
    drop(edu);
    assert_eq!(device.dma_stats().mappings, baseline.mappings);
    assert_eq!(rt.device().iova().allocations(), 0);
    // SAFETY: the tail is ours.
    unsafe {
        mm.munmap(mirror::VaRange::new(range.start() + PAGE, 3 * PAGE).unwrap())
            .unwrap()
    };
}

#[test]
fn overlapping_submits_share_and_replace_identity_mappings() {
    let (device, rt) = open();
    let mm = Arc::new(AddressSpace::current(Config::explicit_only()).unwrap());
    let edu = rt.create_context_in(mm.clone(), exact()).unwrap();
    let m = Mapping::anonymous(4 * PAGE as usize, RW).unwrap();
    // Two buffers sharing a page, like two malloc'd buffers: the second submit overlaps the first.
    edu.core().map_for_device(m.addr(), 2 * PAGE, true).unwrap();
    edu.core()
        .map_for_device(m.addr() + PAGE + 100, 2 * PAGE, true)
        .unwrap();
    // The first buffer stays mapped; only the gap was added.
    for page in 0..4 {
        let t = edu
            .core()
            .translate(m.addr() + page * PAGE)
            .expect("mapped");
        assert_eq!(t.iova, m.addr() + page * PAGE, "IOVA == VA");
    }
    assert_eq!(device.dma_stats().mappings, 2);
    // A range already covered costs nothing: no new mapping.
    let before = device.dma_stats().mappings;
    edu.core()
        .map_for_device(m.addr() + 2 * PAGE, 10, false)
        .unwrap();
    assert_eq!(device.dma_stats().mappings, before);
    // A write over a read-only mapping replaces it.
    let ro = Mapping::anonymous(2 * PAGE as usize, libc::PROT_READ).unwrap();
    edu.core().map_for_device(ro.addr(), PAGE, false).unwrap();
    assert_eq!(
        edu.core().translate(ro.addr()).unwrap().perms,
        accel_abi::pt::Perms::R
    );
    // SAFETY: the mapping is ours and reached only through raw pointers.
    unsafe { mm.mprotect(ro.range(), mirror::Perms::READ_WRITE).unwrap() };
    edu.core()
        .map_for_device(ro.addr(), 2 * PAGE, true)
        .unwrap();
    assert_eq!(
        edu.core().translate(ro.addr()).unwrap().perms,
        accel_abi::pt::Perms::RW
    );
    assert!(edu.core().translate(ro.addr() + PAGE).is_some());
    drop(edu);
    assert_eq!(device.dma_stats().mappings, 0);
}

#[test]
fn mxa_and_no_fault_devices_open_through_the_same_runtime_path() {
    let options = RuntimeOptions::default();
    let mxa = Runtime::open(DeviceSpec::emulated(), options.clone()).unwrap();
    let bare = Runtime::<BareIommu>::open_with(DeviceSpec::emulated(), options.clone()).unwrap();
    // edu's bring-up runs on the same path and identifies the device first: the emulator is
    // an MXA-1, not an edu.
    let err = Runtime::<Edu>::open_with(DeviceSpec::emulated(), options)
        .err()
        .expect("an MXA-1 is no edu");
    assert!(
        err.to_string().contains("not a QEMU edu device: PCI ID"),
        "{err}"
    );

    let on_mxa: Context = mxa.create_context().unwrap();
    let on_bare: Context<BareIommu> = bare.create_context().unwrap();
    // One mirror of this process serves every context of every runtime, whatever the device.
    assert!(Arc::ptr_eq(on_mxa.address_space(), on_bare.address_space()));

    // MXA-1: the device faults the buffer in through its fault service and writes it.
    let mut buf = vec![0u8; 64 << 10];
    on_mxa.fill(&mut buf, 0x5a5a_5a5a_5a5a_5a5a).unwrap();
    assert!(buf.iter().all(|b| *b == 0x5a));
    assert!(on_mxa.stats().faults > 0);
    assert!(on_mxa.device_translation(buf.as_ptr() as u64).is_some());

    // No faults: mapped on submit, at IOVA == VA, in the IOMMU alone.
    let m = Mapping::anonymous(4 * PAGE as usize, RW).unwrap();
    let iova = on_bare
        .core()
        .map_for_device(m.addr(), 4 * PAGE, true)
        .unwrap();
    assert_eq!(iova, m.addr());
    let t = on_bare.device_translation(m.addr() + PAGE).expect("mapped");
    assert_eq!(t.iova, m.addr() + PAGE, "IOVA == VA");
    let stats = on_bare.stats();
    assert_eq!(stats.faults, 0, "nothing faults on a device without faults");
    assert_eq!((stats.mappings, stats.mapped_bytes), (1, 4 * PAGE));
    assert_eq!(
        (stats.table_pages, stats.large_leaves),
        (0, 0),
        "no page table"
    );

    // The release is the runtime's for both: the address space comes back free, and the
    // no-fault device's mappings are gone with its context.
    let (mxa_space, bare_space) = (on_mxa.asid(), on_bare.asid());
    drop(on_bare);
    drop(on_mxa);
    assert_eq!(bare.device().iova().allocations(), 0);
    assert_eq!(bare.create_context().unwrap().asid(), bare_space);
    assert_eq!(mxa.create_context().unwrap().asid(), mxa_space);
    assert_eq!(mxa.quarantined_address_spaces(), 0);
}
