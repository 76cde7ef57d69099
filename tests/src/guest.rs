//! What the guest test binaries share: which MXA-1 devices the guest has (named by
//! `tests/qemu/mxa-init` in the environment), opening a runtime on one of them through the
//! kernel's vfio-pci, and the pin check every case ends with.
//!
//! These binaries run only inside the guest booted by `tests/qemu/mxa-run.sh`; on a host they
//! stop at once with an error that says so (never a silent pass).

use std::sync::Arc;

use driver::fault::ServiceMode;
use driver::runtime::{DeviceSpec, Runtime, RuntimeOptions};

/// PCI addresses of the MXA-1 devices behind PCIe root ports (comma-separated).
pub const DEVICES_ENV: &str = "MXA_GUEST_DEVICES";
/// PCI address of the MXA-1 device on the guest's root bus (no reset method).
pub const ROOT_BUS_DEVICE_ENV: &str = "MXA_GUEST_ROOT_BUS_DEVICE";
/// The case a test binary runs in a child process it started itself (it does nothing in a
/// process without a role; the guest's init does not list it).
pub const CHILD_ROLE_CASE: &str = "child_role_entry";
/// The `mirrorctl` binary inside the guest.
pub const MIRRORCTL_ENV: &str = "MXA_GUEST_MIRRORCTL";

fn not_in_guest(var: &str) -> ! {
    panic!(
        "{var} is not set: this test binary runs inside the QEMU guest booted by \
         tests/qemu/mxa-run.sh (MXA-1 bound to vfio-pci), not on the host"
    )
}

/// Whether this process runs in the MXA-1 guest (its init names the devices).
pub fn in_guest() -> bool {
    std::env::var_os(DEVICES_ENV).is_some()
}

/// The MXA-1 devices that can be reset (behind root ports), in PCI address order.
pub fn devices() -> Vec<String> {
    let list = std::env::var(DEVICES_ENV).unwrap_or_else(|_| not_in_guest(DEVICES_ENV));
    let devices: Vec<String> = list
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    assert!(!devices.is_empty(), "{DEVICES_ENV} names no device");
    devices
}

/// The MXA-1 device on the root bus.
pub fn root_bus_device() -> String {
    std::env::var(ROOT_BUS_DEVICE_ENV).unwrap_or_else(|_| not_in_guest(ROOT_BUS_DEVICE_ENV))
}

/// The `mirrorctl` binary.
pub fn mirrorctl() -> String {
    std::env::var(MIRRORCTL_ENV).unwrap_or_else(|_| not_in_guest(MIRRORCTL_ENV))
}

/// Open a runtime on device `index` of [`devices`].
pub fn open_nth(index: usize, mode: ServiceMode) -> Result<Arc<Runtime>, driver::Error> {
    let options = RuntimeOptions {
        mode,
        ..Default::default()
    };
    Runtime::open(DeviceSpec::KernelVfio(devices()[index].clone()), options)
}

/// Open a runtime on the first device not held open already (a case that needs two mirrors,
/// like `double_map`, gets two devices, and so does a fork child beside its parent: a VFIO group
/// is opened once at a time). A device that fails for any other reason than being busy fails
/// the case.
pub fn open(mode: ServiceMode) -> Arc<Runtime> {
    let mut busy = Vec::new();
    for (i, bdf) in devices().iter().enumerate() {
        match open_nth(i, mode) {
            Ok(rt) => return rt,
            Err(e) if e.to_string().contains("busy") => busy.push(format!("{bdf}: {e}")),
            Err(e) => panic!("opening the MXA-1 at {bdf}: {e}"),
        }
    }
    panic!("every MXA-1 is busy: {}", busy.join("; "))
}

/// Bytes this process has locked (VmLck: the kernel's type1 IOMMU driver accounts every pinned
/// page there).
pub fn locked_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmLck:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmLck in /proc/self/status");
    kib << 10
}

/// The check every guest case ends with: nothing holds the case's runtime any more, and once it
/// is dropped every pin it took is released (VmLck back at zero: the guest's test processes lock
/// nothing else).
pub fn pins_released(rt: Arc<Runtime>) {
    let holders = Arc::strong_count(&rt);
    assert_eq!(
        holders, 1,
        "{holders} holders of the case's runtime after the case (a leaked runtime keeps its pins)"
    );
    drop(rt);
    let locked = locked_bytes();
    assert_eq!(
        locked, 0,
        "VmLck is {locked} bytes after the case's runtime was dropped"
    );
}

pub use sys::{drop_capability, drop_from_bounding_set};

/// The unsafe part: capset(2).
mod sys {
    #[repr(C)]
    struct CapHeader {
        version: u32,
        pid: libc::c_int,
    }

    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct CapData {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }

    /// Drop `cap` from this thread's effective and permitted sets; threads it starts afterwards
    /// (a runtime's fault service, which pins) inherit that.
    pub fn drop_capability(cap: u32) -> Result<(), String> {
        const VERSION_3: u32 = 0x2008_0522;
        let mut header = CapHeader {
            version: VERSION_3,
            pid: 0,
        };
        let mut data = [CapData::default(); 2];
        // SAFETY: header and a two-element data array, as version 3 requires; the kernel
        // writes only within them.
        let rc = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
        if rc != 0 {
            return Err(format!("capget: {}", std::io::Error::last_os_error()));
        }
        let (word, bit) = ((cap / 32) as usize, 1u32 << (cap % 32));
        data[word].effective &= !bit;
        data[word].permitted &= !bit;
        // SAFETY: as above; the kernel only reads.
        let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
        if rc != 0 {
            return Err(format!("capset: {}", std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Drop `cap` from this thread's bounding set: a program it executes afterwards, even as
    /// root, has `cap` in none of its threads (capabilities are per thread, and a runtime pins
    /// from its own threads).
    pub fn drop_from_bounding_set(cap: u32) -> Result<(), String> {
        // SAFETY: PR_CAPBSET_DROP takes the capability number and no pointer.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        if rc != 0 {
            return Err(format!(
                "prctl(PR_CAPBSET_DROP): {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(())
    }
}
