//! The C entry points: every `extern "C"` function of `mirrordrv.h`. The only module of this
//! crate with `unsafe`: it reads and writes the caller's structs and out-parameters, and lends
//! the caller's raw pointers to the device. Each entry runs its body under `catch_unwind`, so no
//! panic unwinds into C (it comes back as `MDRV_ERR_PANIC`), and records an error's message in
//! the calling thread's last-error slot.
// The C names are the header's names.
#![allow(non_camel_case_types)]

use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use driver::context::ContextOptions;
use driver::fault::ServiceMode;
use driver::{DeviceSpec, Op, Runtime, RuntimeOptions};
use mirrord_client::{checked_default_socket_path, ConnectOptions, DaemonClient};

use crate::registry::{
    self, check_buffer, check_out, check_pages, local, Arena, Command, ContextEntry, ContextInner,
    DeviceEntry, DeviceKind,
};
use crate::status::{mdrv_status, Failure, Outcome};

/// The ABI version this library implements: `mdrv_abi_version()` returns it. A caller built
/// against a header with a higher version must not assume calls or fields that version added.
/// Version 2 added `mdrv_open_options.pin_budget` and the eviction counters of `mdrv_stats`.
pub const MDRV_ABI_VERSION: u32 = 2;

/// How long `mdrv_wait` may block, and a submit wait for a free queue slot, unless
/// `mdrv_open_options.timeout_ms` says otherwise (30 s).
pub const MDRV_DEFAULT_TIMEOUT_MS: u64 = 30_000;

/// An open device. Opaque: only ever used through a pointer this library returned, which it
/// never dereferences (it is a number looked up in a table), so a wrong or closed handle is
/// refused with `MDRV_ERR_BAD_HANDLE`.
pub struct mdrv_device {
    _opaque: [u8; 0],
}

/// A context: one device address space mirroring the calling process. Opaque, like
/// `mdrv_device`.
pub struct mdrv_context {
    _opaque: [u8; 0],
}

/// Which device `mdrv_device_open` opens (`mdrv_open_options.kind`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum mdrv_device_kind {
    /// The MXA-1 emulator, inside this process (`path` unused: NULL).
    MDRV_DEVICE_EMULATED = 1,
    /// A vfio-user server's socket (`path`: its path; for example a server started with
    /// `mirrorctl emulate --socket PATH`).
    MDRV_DEVICE_VFIO_USER = 2,
    /// A device bound to vfio-pci (`path`: its PCI address, `0000:00:03.0`).
    MDRV_DEVICE_KERNEL_VFIO = 3,
    /// The daemon (`mirrorctl serve`; `path`: its socket, or NULL for the default socket
    /// path). Each context is a daemon session; the device reaches only arenas
    /// (`mdrv_arena_alloc`).
    MDRV_DEVICE_DAEMON = 4,
}

/// Options of `mdrv_device_open`. Fill it with `mdrv_open_options_init(&o, sizeof o)`, then
/// change fields.
/// `size` (first) is `sizeof(mdrv_open_options)` as the caller was compiled: a larger struct
/// from a newer header is accepted as long as the fields this library does not know are zero.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct mdrv_open_options {
    /// `sizeof(mdrv_open_options)`.
    pub size: u32,
    /// An `mdrv_device_kind`.
    pub kind: u32,
    /// The socket path or PCI address (see `mdrv_device_kind`), NUL-terminated; read during
    /// the call only.
    pub path: *const c_char,
    /// 0: the fault service sleeps on the device's interrupts; 1: it busy-polls (lower latency,
    /// a core kept busy). In-process kinds only.
    pub polling: u32,
    /// Must be 0.
    pub reserved: u32,
    /// How long `mdrv_wait` may block before it takes the command's memory away from the
    /// device (in-process) or ends the session (daemon: the longest wait for any one reply);
    /// also how long a submit waits for a free command-queue slot. 0: 30000.
    pub timeout_ms: u64,
    /// Most bytes each context may have DMA-mapped (pinned, on kernel VFIO) at once; a device
    /// access past it fails with `MDRV_ERR_LIMIT`. 0: no limit of ours (kernel VFIO still has
    /// RLIMIT_MEMLOCK). In-process kinds only (the daemon has its own quotas).
    pub max_mapped_bytes: u64,
    /// Pin budget of each context: past it the context's cold mappings are evicted (the device
    /// faults them back when it uses them again) instead of accesses failing; only a single
    /// run larger than the budget fails with `MDRV_ERR_LIMIT`. 0: none. In-process kinds only
    /// (the daemon sets its clients' budget itself: `mirrorctl serve --pin-budget-mib`).
    pub pin_budget: u64,
}

/// A context's statistics (`mdrv_context_stats`). Set `size` to `sizeof(mdrv_stats)` before the
/// call; the library writes at most that many bytes and sets `size` to how many it wrote.
/// Daemon contexts fill `faults`, `pages_mapped`, `mapped_bytes`, `failures`, `invalidations`,
/// `commands` and `in_flight`; the others read 0.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct mdrv_stats {
    /// `sizeof(mdrv_stats)` in; bytes written out.
    pub size: u32,
    /// 0.
    pub reserved: u32,
    /// Distinct faulting pages serviced for this context.
    pub faults: u64,
    /// Fault batches (device stall round trips) serviced.
    pub fault_batches: u64,
    /// 4 KiB pages made device-accessible.
    pub pages_mapped: u64,
    /// 2 MiB device leaves written.
    pub large_mappings: u64,
    /// Device accesses that could not be serviced (their commands were cancelled).
    pub failures: u64,
    /// Invalidations run (CPU changes that reached this context).
    pub invalidations: u64,
    /// Device TLB fences issued.
    pub tlb_fences: u64,
    /// Live DMA mappings.
    pub mappings: u64,
    /// Bytes DMA-mapped now.
    pub mapped_bytes: u64,
    /// Bytes pinned now (equal to `mapped_bytes` on backends that pin, else 0).
    pub pinned_bytes: u64,
    /// Device 4 KiB leaves.
    pub small_leaves: u64,
    /// Device 2 MiB leaves.
    pub large_leaves: u64,
    /// Device page-table pages.
    pub table_pages: u64,
    /// Walks retried because an invalidation collided (whole process).
    pub retries: u64,
    /// Waits that timed out and took their command's memory away from the device.
    pub revocations: u64,
    /// Of those, commands not collected by the device yet.
    pub revoked_in_flight: u64,
    /// Commands submitted (in-process: on the whole device; daemon: this session).
    pub commands: u64,
    /// This context's commands in flight (submitted, not collected by a wait or poll).
    pub in_flight: u64,
    /// Mappings evicted to stay under the pin budget.
    pub evictions: u64,
    /// Mappings installed again over a range evicted shortly before.
    pub refaults: u64,
    /// Mappings protected from eviction as thrashing.
    pub thrash_protections: u64,
    /// Device page-table pages freed back to the pool.
    pub table_pages_freed: u64,
}

/// The device's page-table entry for one address (`mdrv_get_device_entry`). Set `size` to
/// `sizeof(mdrv_device_entry)` before the call; it is set to the bytes written.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct mdrv_device_entry {
    /// `sizeof(mdrv_device_entry)` in; bytes written out.
    pub size: u32,
    /// 1 if the device has an entry for the address (it can access it without a fault), else
    /// 0 (and the fields below are 0).
    pub present: u32,
    /// The IOVA of the byte at the address.
    pub iova: u64,
    /// The entry's page size in bytes (4096 or 2097152).
    pub page_size: u64,
    /// 1 if the entry allows device reads.
    pub readable: u32,
    /// 1 if it allows device writes (and atomics).
    pub writable: u32,
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(message: &str) {
    let text = CString::new(message.replace('\0', "\\0")).unwrap_or_default();
    // Not `with`: called from a thread-local destructor after ours was torn down, it would
    // panic outside any catch_unwind and abort the process. There the message is dropped.
    let _ = LAST_ERROR.try_with(|slot| {
        if let Ok(mut slot) = slot.try_borrow_mut() {
            *slot = text;
        }
    });
}

/// Run an entry point's body: its error (or panic) becomes a code and the thread's last error.
fn guard(body: impl FnOnce() -> Outcome<mdrv_status>) -> c_int {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(status)) => status as c_int,
        Ok(Err(failure)) => {
            set_last_error(&failure.message);
            failure.status as c_int
        }
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic with no message".into());
            set_last_error(&format!(
                "internal error in libmirrordrv (a Rust panic, caught before it reached the \
                 caller; please report it): {what}"
            ));
            mdrv_status::MDRV_ERR_PANIC as c_int
        }
    }
}

fn ok(_: ()) -> mdrv_status {
    mdrv_status::MDRV_OK
}

/// Read a caller's versioned input struct (its `u32 size` first).
///
/// # Safety
/// `p` is NULL or points to at least `size` readable bytes, `size` being its first field.
/// The most a versioned struct's `size` may say: far above any struct of this ABI, so an
/// uninitialised `size` is an error instead of a read or write far past the caller's struct.
const MAX_STRUCT_SIZE: usize = 4096;

fn check_struct_size(what: &str, size: usize) -> Outcome<()> {
    if size > MAX_STRUCT_SIZE {
        return Err(Failure::new(
            mdrv_status::MDRV_ERR_INVALID_ARGUMENT,
            format!(
                "{what}->size is {size}, more than the {MAX_STRUCT_SIZE} bytes a struct of this \
                 ABI may have: set it to sizeof the struct (is it initialised?)"
            ),
        ));
    }
    Ok(())
}

unsafe fn read_sized<T: Copy>(p: *const T, what: &str) -> Outcome<T> {
    check_out(what, p.is_null())?;
    // SAFETY: non-NULL, and every versioned struct starts with its u32 size.
    let size = unsafe { p.cast::<u32>().read_unaligned() } as usize;
    check_struct_size(what, size)?;
    let ours = size_of::<T>();
    if size < ours {
        return Err(Failure::new(
            mdrv_status::MDRV_ERR_INVALID_ARGUMENT,
            format!(
                "{what}->size is {size}, smaller than this library's struct ({ours} bytes): set \
                 it to sizeof (mdrv_open_options_init(&o, sizeof o) does)"
            ),
        ));
    }
    if size > ours {
        // SAFETY: the caller promised `size` readable bytes.
        let tail = unsafe { std::slice::from_raw_parts(p.cast::<u8>().add(ours), size - ours) };
        if tail.iter().any(|b| *b != 0) {
            return Err(Failure::new(
                mdrv_status::MDRV_ERR_UNSUPPORTED,
                format!(
                    "{what} is {size} bytes and sets fields past the {ours} this library \
                     (ABI version {MDRV_ABI_VERSION}) knows: link a newer library or leave them 0"
                ),
            ));
        }
    }
    // SAFETY: at least `ours` readable bytes, checked above.
    Ok(unsafe { p.read_unaligned() })
}

/// Write a versioned output struct: at most the caller's `size` bytes, then `size` = written.
///
/// # Safety
/// `p` is NULL or points to at least `size` writable bytes, `size` being its first field.
unsafe fn write_sized<T: Copy>(p: *mut T, value: T, what: &str) -> Outcome<()> {
    check_out(what, p.is_null())?;
    // SAFETY: non-NULL; the struct starts with its u32 size.
    let size = unsafe { p.cast::<u32>().read_unaligned() } as usize;
    check_struct_size(what, size)?;
    if size < size_of::<u64>() {
        return Err(Failure::new(
            mdrv_status::MDRV_ERR_INVALID_ARGUMENT,
            format!("{what}->size is {size}: set it to sizeof the struct before the call"),
        ));
    }
    // Whole 8-byte units only (every versioned struct is made of them): a size between two
    // fields gets neither half of a u64.
    let n = size.min(size_of::<T>()) & !(size_of::<u64>() - 1);
    // SAFETY: `value` is a plain repr(C) struct of at least `n` bytes; the caller's has `size`
    // writable bytes, at least `n`.
    unsafe {
        std::ptr::copy_nonoverlapping((&value as *const T).cast::<u8>(), p.cast::<u8>(), n);
        p.cast::<u32>().write_unaligned(n as u32);
    }
    Ok(())
}

/// Store an out-parameter.
///
/// # Safety
/// `p` is NULL or valid for a write of `T`.
unsafe fn put<T>(p: *mut T, value: T, what: &str) -> Outcome<()> {
    check_out(what, p.is_null())?;
    // SAFETY: non-NULL and, by the caller's promise, writable.
    unsafe { p.write_unaligned(value) };
    Ok(())
}

/// Read a NUL-terminated string argument.
///
/// # Safety
/// `p` is NULL or a NUL-terminated string.
unsafe fn string(p: *const c_char) -> Outcome<Option<String>> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: the caller's promise.
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str().map(|s| Some(s.to_owned())).map_err(|_| {
        Failure::new(
            mdrv_status::MDRV_ERR_INVALID_ARGUMENT,
            "the path is not valid UTF-8",
        )
    })
}

fn context_of(ctx: *mut mdrv_context) -> Outcome<std::sync::Arc<ContextEntry>> {
    registry::context(ctx as usize as u64)
}

/// The body of a strict wrapper: the in-process context's address space and the checked range.
fn strict(
    ctx: *mut mdrv_context,
    addr: *const c_void,
    len: usize,
    what: &str,
    body: impl FnOnce(&mirror::AddressSpace, mirror::VaRange) -> Outcome<()>,
) -> Outcome<mdrv_status> {
    let entry = context_of(ctx)?;
    let range = check_pages("addr", addr as u64, len as u64)?;
    body(local(&entry, what)?.address_space(), range)?;
    Ok(mdrv_status::MDRV_OK)
}

fn defaults() -> mdrv_open_options {
    mdrv_open_options {
        size: size_of::<mdrv_open_options>() as u32,
        kind: mdrv_device_kind::MDRV_DEVICE_EMULATED as u32,
        path: std::ptr::null(),
        polling: 0,
        reserved: 0,
        timeout_ms: MDRV_DEFAULT_TIMEOUT_MS,
        max_mapped_bytes: 0,
        pin_budget: 0,
    }
}

/// The ABI version of the library linked at run time (`MDRV_ABI_VERSION` of its header).
#[no_mangle]
pub extern "C" fn mdrv_abi_version() -> u32 {
    MDRV_ABI_VERSION
}

/// The message of the last call that failed on the calling thread (what failed, the values
/// involved, what changes them); "" if none has. Never NULL. The string belongs to the library
/// and stays valid until the next failing call on the same thread: copy it to keep it.
#[no_mangle]
pub extern "C" fn mdrv_last_error() -> *const c_char {
    catch_unwind(|| LAST_ERROR.try_with(|slot| slot.borrow().as_ptr()))
        .ok()
        .and_then(Result::ok)
        .unwrap_or(c"".as_ptr())
}

/// The name of a status code ("MDRV_ERR_BAD_HANDLE"), or "MDRV_UNKNOWN_STATUS". A static
/// string: never freed, never NULL.
#[no_mangle]
pub extern "C" fn mdrv_status_name(status: c_int) -> *const c_char {
    mdrv_status::ALL
        .iter()
        .find(|s| **s as c_int == status)
        .map(|s| s.name().as_ptr())
        .unwrap_or(c"MDRV_UNKNOWN_STATUS".as_ptr())
}

/// Fill `*opts` with the defaults: the embedded emulator, interrupt-driven fault service, a
/// 30 s timeout, no mapped-bytes limit. `size` is `sizeof(mdrv_open_options)` as the caller was
/// compiled: the library writes that many bytes (fields it does not know, from a newer header,
/// are zeroed) and stores it in `opts->size`. `MDRV_ERR_INVALID_ARGUMENT` if it is smaller than
/// this library's struct.
///
/// # Safety
/// `opts` is NULL (`MDRV_ERR_NULL_POINTER`) or points to `size` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn mdrv_open_options_init(
    opts: *mut mdrv_open_options,
    size: usize,
) -> c_int {
    guard(|| {
        check_out("opts", opts.is_null())?;
        let ours = size_of::<mdrv_open_options>();
        if size < ours || size > u32::MAX as usize {
            return Err(Failure::new(
                mdrv_status::MDRV_ERR_INVALID_ARGUMENT,
                format!(
                    "size {size}: pass sizeof(mdrv_open_options), at least this library's {ours}"
                ),
            ));
        }
        let value = mdrv_open_options {
            size: size as u32,
            ..defaults()
        };
        // SAFETY: the caller promised `size` writable bytes at `opts`, at least `ours`.
        unsafe {
            std::ptr::write_bytes(opts.cast::<u8>().add(ours), 0, size - ours);
            opts.write_unaligned(value);
        }
        Ok(mdrv_status::MDRV_OK)
    })
}

/// Open a device and start its fault service (in-process kinds), or record the daemon's
/// socket path (daemon: each context is a session of its own, so a daemon that is not there is
/// reported by `mdrv_context_create`). On success `*out` is the device.
///
/// Errors: `MDRV_ERR_NULL_POINTER` (`opts` or `out` NULL, or a kind that needs a path without
/// one), `MDRV_ERR_INVALID_ARGUMENT` (`size` too small, unknown `kind`, `reserved` not 0),
/// `MDRV_ERR_DEVICE` (the device could not be opened: the message names it and why),
/// `MDRV_ERR_DAEMON` (no usable default socket directory).
///
/// # Safety
/// `opts` points to an `mdrv_open_options` of at least its `size` bytes whose `path` is NULL or
/// a NUL-terminated string; `out` points to a writable `mdrv_device *`.
#[no_mangle]
pub unsafe extern "C" fn mdrv_device_open(
    opts: *const mdrv_open_options,
    out: *mut *mut mdrv_device,
) -> c_int {
    guard(|| {
        check_out("out", out.is_null())?;
        // SAFETY: the caller's promise.
        let o = unsafe { read_sized(opts, "opts")? };
        // SAFETY: the caller's promise about `path`.
        let path = unsafe { string(o.path)? };
        let invalid = |m: String| Failure::new(mdrv_status::MDRV_ERR_INVALID_ARGUMENT, m);
        if o.reserved != 0 {
            return Err(invalid(format!(
                "opts->reserved is {}: it must be 0",
                o.reserved
            )));
        }
        if o.polling > 1 {
            return Err(invalid(format!("opts->polling is {}: 0 or 1", o.polling)));
        }
        let timeout = Duration::from_millis(match o.timeout_ms {
            0 => MDRV_DEFAULT_TIMEOUT_MS,
            t => t,
        });
        let need_path = |what: &str| {
            path.clone().ok_or_else(|| {
                Failure::new(
                    mdrv_status::MDRV_ERR_NULL_POINTER,
                    format!("opts->path is NULL: this kind needs {what}"),
                )
            })
        };
        let spec = match o.kind {
            k if k == mdrv_device_kind::MDRV_DEVICE_EMULATED as u32 => DeviceSpec::emulated(),
            k if k == mdrv_device_kind::MDRV_DEVICE_VFIO_USER as u32 => {
                DeviceSpec::VfioUser(need_path("the vfio-user server's socket path")?.into())
            }
            k if k == mdrv_device_kind::MDRV_DEVICE_KERNEL_VFIO as u32 => {
                DeviceSpec::KernelVfio(need_path("the device's PCI address")?)
            }
            k if k == mdrv_device_kind::MDRV_DEVICE_DAEMON as u32 => {
                let socket = match path {
                    Some(p) => PathBuf::from(p),
                    None => checked_default_socket_path()?,
                };
                let handle = registry::add_device(DeviceEntry {
                    kind: DeviceKind::Daemon { socket, timeout },
                    contexts: AtomicUsize::new(0),
                });
                // SAFETY: checked non-NULL; the caller's promise.
                unsafe { put(out, handle as usize as *mut mdrv_device, "out")? };
                return Ok(mdrv_status::MDRV_OK);
            }
            k => {
                return Err(invalid(format!(
                    "opts->kind is {k}: not an mdrv_device_kind"
                )))
            }
        };
        let options = RuntimeOptions {
            mode: if o.polling == 1 {
                ServiceMode::Polling
            } else {
                ServiceMode::Interrupt
            },
            timeout,
            context: ContextOptions {
                max_mapped_bytes: (o.max_mapped_bytes != 0).then_some(o.max_mapped_bytes),
                pin_budget: (o.pin_budget != 0).then_some(o.pin_budget),
                ..ContextOptions::default()
            },
            ..RuntimeOptions::default()
        };
        let runtime = Runtime::open(spec.clone(), options).map_err(|e| {
            let f = Failure::from(e);
            Failure::new(
                mdrv_status::MDRV_ERR_DEVICE,
                format!("opening {spec:?}: {}", f.message),
            )
        })?;
        let handle = registry::add_device(DeviceEntry {
            kind: DeviceKind::Local(runtime),
            contexts: AtomicUsize::new(0),
        });
        // SAFETY: checked non-NULL; the caller's promise.
        unsafe { put(out, handle as usize as *mut mdrv_device, "out")? };
        Ok(mdrv_status::MDRV_OK)
    })
}

/// Close a device. Refused with `MDRV_ERR_BUSY` while it has contexts (destroy them first).
/// Otherwise the handle is invalid from now on and the device is released: reset (which ends
/// any work left over from destroyed contexts) and its rings and page-table memory freed,
/// at once or, if another thread is inside a call on it, when that call returns.
///
/// # Safety
/// None beyond passing any pointer value: a wrong one is `MDRV_ERR_BAD_HANDLE`.
#[no_mangle]
pub unsafe extern "C" fn mdrv_device_close(dev: *mut mdrv_device) -> c_int {
    guard(|| registry::close_device(dev as usize as u64).map(ok))
}

/// Create a context on `dev`: a fresh device address space mirroring the calling process
/// (in-process kinds: any of its memory is reachable by address; daemon: a new session, and
/// only its arenas are reachable). On success `*out` is the context.
///
/// Errors: `MDRV_ERR_BAD_HANDLE`, `MDRV_ERR_NULL_POINTER`, `MDRV_ERR_LIMIT` (every device
/// address space in use), `MDRV_ERR_DAEMON` (the daemon refused the session or is not there),
/// `MDRV_ERR_DEVICE_LOST`, `MDRV_ERR_OS` (userfaultfd could not be set up).
///
/// # Safety
/// `out` points to a writable `mdrv_context *`.
#[no_mangle]
pub unsafe extern "C" fn mdrv_context_create(
    dev: *mut mdrv_device,
    out: *mut *mut mdrv_context,
) -> c_int {
    guard(|| {
        check_out("out", out.is_null())?;
        let handle = registry::add_context(dev as usize as u64, |device| match &device.kind {
            DeviceKind::Local(rt) => Ok(ContextInner::Local(rt.create_context()?)),
            DeviceKind::Daemon { socket, timeout } => {
                let options = ConnectOptions::default().timeout(*timeout);
                Ok(ContextInner::Daemon(DaemonClient::connect_with_options(
                    socket, &options,
                )?))
            }
        })?;
        // SAFETY: checked non-NULL; the caller's promise.
        unsafe { put(out, handle as usize as *mut mdrv_context, "out")? };
        Ok(mdrv_status::MDRV_OK)
    })
}

/// Destroy a context. The handle, its tickets and its arenas are invalid from now on.
///
/// In-process: the device's view of the address space is torn down first (page-table entries
/// cleared, TLB fenced, DMA unmapped and unpinned), so commands still in flight fault on the
/// empty table and are cancelled; the call then waits up to 5 s for them to end. If some have
/// not, the device address space is quarantined (never reused until they end) rather than
/// waited for; a device that does not confirm the tear-down's fence gets it retired. When this
/// returns the device has no translation of the process's memory left through this context and
/// the context's arenas are unmapped; destroy is not a wait, though: the memory of commands
/// still in flight stays the caller's to keep (see `mdrv_wait`). If another thread is
/// inside a call on this context (a wait), the release happens when that call returns, and
/// this call returns after it.
///
/// Daemon: the session is closed; the daemon then releases it the same way (tear-down and
/// fence, leftover work cancelled or quarantined) on its side; arenas are unregistered first.
///
/// # Safety
/// None beyond passing any pointer value: a wrong one is `MDRV_ERR_BAD_HANDLE`.
#[no_mangle]
pub unsafe extern "C" fn mdrv_context_destroy(ctx: *mut mdrv_context) -> c_int {
    guard(|| registry::destroy_context(ctx as usize as u64).map(ok))
}

/// Submit `op` on the context; the caller's ticket.
///
/// # Safety
/// As `Context::submit`: the device reads and writes the memory `op` names until a wait or
/// poll on the ticket returns something other than `MDRV_PENDING`.
unsafe fn submit(ctx: *mut mdrv_context, op: Op, ticket: *mut u64) -> Outcome<mdrv_status> {
    check_out("ticket", ticket.is_null())?;
    let entry = context_of(ctx)?;
    let command = match &entry.inner {
        // SAFETY: forwarded to the C caller (see the header's lifetime rules).
        ContextInner::Local(c) => Command::Local(unsafe { c.submit(op)? }),
        // SAFETY: as above.
        ContextInner::Daemon(c) => Command::Daemon(unsafe { c.submit(op)? }),
    };
    let issued = entry.issued(command);
    // SAFETY: checked non-NULL; the caller's promise.
    unsafe { put(ticket, issued, "ticket")? };
    Ok(mdrv_status::MDRV_OK)
}

/// Submit a command that only reads `[src, src + len)`.
///
/// # Safety
/// As [`submit`].
unsafe fn submit_read(
    ctx: *mut mdrv_context,
    src: *const c_void,
    len: usize,
    ticket: *mut u64,
    op: fn(u64, u64) -> Op,
) -> Outcome<mdrv_status> {
    let (src, len) = (src as u64, len as u64);
    check_buffer("src", src, len)?;
    // SAFETY: forwarded to the caller.
    unsafe { submit(ctx, op(src, len), ticket) }
}

/// Submit: the device fills `len` bytes at `dst` with the 8-byte `pattern` (its little-endian
/// bytes repeated from `dst` on; `len` need not be a multiple of 8). `*ticket` identifies the command for
/// `mdrv_wait`/`mdrv_wait_for`/`mdrv_poll`.
///
/// Errors: `MDRV_ERR_NULL_POINTER` (`dst` or `ticket`), `MDRV_ERR_INVALID_ARGUMENT` (`len`
/// 0), `MDRV_ERR_OUT_OF_RANGE` (the range leaves the user address space), `MDRV_ERR_TOO_LONG`
/// (past the device's maximum transfer), `MDRV_ERR_BAD_HANDLE`, `MDRV_ERR_BUSY` (queue full for
/// the whole timeout), `MDRV_ERR_TIMEOUT` (CPU changes not caught up within the settle
/// timeout: nothing submitted), `MDRV_ERR_DEVICE_LOST`. An address with no CPU mapping is
/// not an error here: the command's wait returns `MDRV_ERR_NO_MAPPING`.
///
/// # Safety
/// The memory `[dst, dst + len)` is lent to the device: it stays allocated and mapped, and the
/// caller neither frees nor reuses it, until a wait or poll on the ticket has returned anything
/// other than `MDRV_PENDING` (the device writes it concurrently with the caller until then).
#[no_mangle]
pub unsafe extern "C" fn mdrv_submit_fill(
    ctx: *mut mdrv_context,
    dst: *mut c_void,
    len: usize,
    pattern: u64,
    ticket: *mut u64,
) -> c_int {
    guard(|| {
        let (dst, len) = (dst as u64, len as u64);
        check_buffer("dst", dst, len)?;
        // SAFETY: forwarded to the caller.
        unsafe { submit(ctx, Op::Fill { dst, len, pattern }, ticket) }
    })
}

/// Submit: the device copies `len` bytes from `src` to `dst`. Errors as `mdrv_submit_fill`.
///
/// # Safety
/// Both ranges are lent to the device as in `mdrv_submit_fill` (`src` only read) until a wait
/// or poll on the ticket returns anything other than `MDRV_PENDING`.
#[no_mangle]
pub unsafe extern "C" fn mdrv_submit_copy(
    ctx: *mut mdrv_context,
    dst: *mut c_void,
    src: *const c_void,
    len: usize,
    ticket: *mut u64,
) -> c_int {
    guard(|| {
        let (dst, src, len) = (dst as u64, src as u64, len as u64);
        check_buffer("dst", dst, len)?;
        check_buffer("src", src, len)?;
        // SAFETY: forwarded to the caller.
        unsafe { submit(ctx, Op::Copy { dst, src, len }, ticket) }
    })
}

/// Submit: the device atomically adds `value` to the `uint64_t` at `target`; the wait's result
/// is the old value. `target` must be 8-byte aligned (`MDRV_ERR_UNALIGNED`); otherwise errors
/// as `mdrv_submit_fill`.
///
/// # Safety
/// `target` is lent to the device as in `mdrv_submit_fill`; CPU accesses to it meanwhile must be
/// atomic.
#[no_mangle]
pub unsafe extern "C" fn mdrv_submit_atomic_add(
    ctx: *mut mdrv_context,
    target: *mut u64,
    value: u64,
    ticket: *mut u64,
) -> c_int {
    guard(|| {
        let dst = target as u64;
        check_buffer("target", dst, 8)?;
        if dst % 8 != 0 {
            return Err(Failure::new(
                mdrv_status::MDRV_ERR_UNALIGNED,
                format!("target {dst:#x} is not 8-byte aligned (the device's atomics need it)"),
            ));
        }
        // SAFETY: forwarded to the caller.
        unsafe { submit(ctx, Op::AtomicAdd { dst, value }, ticket) }
    })
}

/// Submit: the device computes the FNV-1a 64 checksum of `len` bytes at `src` (the wait's
/// result). Errors as `mdrv_submit_fill`.
///
/// # Safety
/// `[src, src + len)` is lent to the device (read only) as in `mdrv_submit_fill`.
#[no_mangle]
pub unsafe extern "C" fn mdrv_submit_checksum(
    ctx: *mut mdrv_context,
    src: *const c_void,
    len: usize,
    ticket: *mut u64,
) -> c_int {
    // SAFETY: forwarded to the caller.
    guard(|| unsafe { submit_read(ctx, src, len, ticket, |src, len| Op::Checksum { src, len }) })
}

/// Submit: the device faults in and caches translations for `len` bytes at `src` without
/// transferring data, so later commands there do not stall. Errors as `mdrv_submit_fill`.
///
/// # Safety
/// As `mdrv_submit_checksum`.
#[no_mangle]
pub unsafe extern "C" fn mdrv_submit_prefetch(
    ctx: *mut mdrv_context,
    src: *const c_void,
    len: usize,
    ticket: *mut u64,
) -> c_int {
    // SAFETY: forwarded to the caller.
    guard(|| unsafe { submit_read(ctx, src, len, ticket, |src, len| Op::Prefetch { src, len }) })
}

/// Wait for a command: the releasing wait. Whatever it returns, when it returns the device can
/// no longer access the command's memory, and the ticket is collected (a second wait on it is
/// `MDRV_ERR_BAD_TICKET`). On success `*result` (if `result` is not NULL) is the command's
/// value: the old value for an atomic add, the checksum, 0 otherwise.
///
/// Bounded by the device's `timeout_ms`. In-process, when it passes the command's pages are
/// first taken away from the device (entries torn down, TLB fenced; the command is cancelled
/// when it touches them next, and they stay unreachable for this context until it has), then
/// `MDRV_ERR_TIMEOUT` is returned: the memory may be freed. Daemon: the session is ended and
/// the daemon's release awaited before `MDRV_ERR_TIMEOUT` returns; every later call on the
/// context fails with `MDRV_ERR_DAEMON`.
///
/// Errors: `MDRV_ERR_BAD_HANDLE`, `MDRV_ERR_BAD_TICKET`, `MDRV_ERR_BUSY` (another thread is
/// waiting for the ticket), `MDRV_ERR_TIMEOUT`, the command's failure (`MDRV_ERR_NO_MAPPING`,
/// `MDRV_ERR_PERMISSION`, `MDRV_ERR_CANCELLED`, `MDRV_ERR_LIMIT`, `MDRV_ERR_COMMAND_FAILED`),
/// `MDRV_ERR_DEVICE_LOST`, `MDRV_ERR_DAEMON`.
///
/// # Safety
/// `result` is NULL or points to a writable `uint64_t`.
#[no_mangle]
pub unsafe extern "C" fn mdrv_wait(ctx: *mut mdrv_context, ticket: u64, result: *mut u64) -> c_int {
    guard(|| {
        let value = context_of(ctx)?.wait(ticket)?;
        if !result.is_null() {
            // SAFETY: non-NULL; the caller's promise.
            unsafe { put(result, value, "result")? };
        }
        Ok(mdrv_status::MDRV_OK)
    })
}

/// Wait up to `timeout_ms` milliseconds for a command (in-process and daemon contexts; on a
/// daemon context a completion frame that has begun to arrive is read whole, within the
/// session's reply timeout). Returns
/// `MDRV_PENDING` if it has not completed by then: the ticket stays in flight and the device
/// may still access the command's memory, which must stay valid (wait again, poll, or use
/// `mdrv_wait`, which gives the memory back even if the command never ends). Anything else is
/// as `mdrv_wait` (the ticket collected, the memory no longer reachable by the device).
///
/// # Safety
/// As `mdrv_wait`.
#[no_mangle]
pub unsafe extern "C" fn mdrv_wait_for(
    ctx: *mut mdrv_context,
    ticket: u64,
    timeout_ms: u64,
    result: *mut u64,
) -> c_int {
    guard(|| {
        let entry = context_of(ctx)?;
        match entry.wait_for(ticket, Duration::from_millis(timeout_ms))? {
            None => Ok(mdrv_status::MDRV_PENDING),
            Some(value) => {
                if !result.is_null() {
                    // SAFETY: non-NULL; the caller's promise.
                    unsafe { put(result, value, "result")? };
                }
                Ok(mdrv_status::MDRV_OK)
            }
        }
    })
}

/// Look whether a command has completed, without blocking: `mdrv_wait_for` with a 0 timeout.
///
/// # Safety
/// As `mdrv_wait`.
#[no_mangle]
pub unsafe extern "C" fn mdrv_poll(ctx: *mut mdrv_context, ticket: u64, result: *mut u64) -> c_int {
    // SAFETY: forwarded.
    unsafe { mdrv_wait_for(ctx, ticket, 0, result) }
}

/// munmap(2) with strict coherence: every context of this process drops its device entries for
/// the range (TLB fenced) before the memory is unmapped; a later device access there fails with
/// `MDRV_ERR_NO_MAPPING`. `addr` and `len` 4096-byte aligned. In-process contexts
/// (`MDRV_ERR_UNSUPPORTED` on a daemon context: a plain munmap reaches the daemon as an event).
///
/// # Safety
/// As for munmap(2): nothing uses the range afterwards.
#[no_mangle]
pub unsafe extern "C" fn mdrv_munmap(
    ctx: *mut mdrv_context,
    addr: *mut c_void,
    len: usize,
) -> c_int {
    guard(|| {
        let entry = context_of(ctx)?;
        // In-process contexts only (a daemon context is refused by `strict` as unsupported).
        local(&entry, "mdrv_munmap")?;
        entry.refuse_arena_overlap(addr as u64, len as u64, "mdrv_munmap")?;
        strict(ctx, addr, len, "mdrv_munmap", |mm, range| {
            // SAFETY: the caller's promise, as for munmap(2).
            unsafe { mm.munmap(range) }.map_err(Into::into)
        })
    })
}

/// mremap(2) with strict coherence for the old range (and a MREMAP_FIXED target). `flags` as
/// mremap(2) takes them (MREMAP_MAYMOVE, MREMAP_FIXED, MREMAP_DONTUNMAP; others are
/// `MDRV_ERR_UNSUPPORTED`); `new_addr` is used with MREMAP_FIXED (or as DONTUNMAP's hint), else
/// NULL. `*out` is the new address. In-process contexts.
///
/// # Safety
/// As for mremap(2): nothing uses the old range afterwards (nor a fixed target before); `out`
/// points to a writable `void *`.
#[no_mangle]
pub unsafe extern "C" fn mdrv_mremap(
    ctx: *mut mdrv_context,
    old_addr: *mut c_void,
    old_len: usize,
    new_len: usize,
    flags: c_int,
    new_addr: *mut c_void,
    out: *mut *mut c_void,
) -> c_int {
    guard(|| {
        check_out("out", out.is_null())?;
        let entry = context_of(ctx)?;
        let old = check_pages("old_addr", old_addr as u64, old_len as u64)?;
        local(&entry, "mdrv_mremap")?;
        entry.refuse_arena_overlap(old_addr as u64, old_len as u64, "mdrv_mremap")?;
        if flags & libc::MREMAP_FIXED != 0 {
            entry.refuse_arena_overlap(new_addr as u64, new_len as u64, "mdrv_mremap (target)")?;
        }
        let c = local(&entry, "mdrv_mremap")?;
        // SAFETY: the caller's promise, as for mremap(2).
        let moved = unsafe {
            c.address_space()
                .mremap_with_flags(old, new_len as u64, flags, new_addr as u64)?
        };
        // SAFETY: checked non-NULL; the caller's promise.
        unsafe { put(out, moved as usize as *mut c_void, "out")? };
        Ok(mdrv_status::MDRV_OK)
    })
}

/// madvise(2) with strict coherence for advice that discards or moves pages (MADV_DONTNEED,
/// MADV_FREE, MADV_REMOVE, ...): the device's entries go before the call. Harmless advice
/// passes straight through. In-process contexts.
///
/// # Safety
/// As for madvise(2): discarding advice only for memory whose contents nothing relies on.
#[no_mangle]
pub unsafe extern "C" fn mdrv_madvise(
    ctx: *mut mdrv_context,
    addr: *mut c_void,
    len: usize,
    advice: c_int,
) -> c_int {
    guard(|| {
        strict(ctx, addr, len, "mdrv_madvise", |mm, range| {
            // SAFETY: the caller's promise, as for madvise(2).
            unsafe { mm.madvise(range, advice) }.map_err(Into::into)
        })
    })
}

/// mprotect(2) with strict coherence (mprotect has no userfaultfd event at all): the device's
/// entries for the range are downgraded or dropped before the call. `prot` is PROT_NONE or a
/// combination of PROT_READ, PROT_WRITE, PROT_EXEC. In-process contexts.
///
/// # Safety
/// As for mprotect(2): nothing relies on the access being removed.
#[no_mangle]
pub unsafe extern "C" fn mdrv_mprotect(
    ctx: *mut mdrv_context,
    addr: *mut c_void,
    len: usize,
    prot: c_int,
) -> c_int {
    guard(|| {
        let known = libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC;
        if prot & !known != 0 {
            return Err(Failure::new(
                mdrv_status::MDRV_ERR_INVALID_ARGUMENT,
                format!("prot {prot:#x} has bits other than PROT_READ, PROT_WRITE, PROT_EXEC"),
            ));
        }
        strict(ctx, addr, len, "mdrv_mprotect", |mm, range| {
            // SAFETY: the caller's promise, as for mprotect(2).
            unsafe { mm.mprotect(range, mirror::Perms::from_prot(prot)) }.map_err(Into::into)
        })
    })
}

/// Tear the device's view of `[addr, addr + len)` down (4096-byte aligned): when this returns
/// no device entry for it is left (cleared, TLB fenced); the next device access faults it in
/// again. For CPU changes no event reports (a hole punched in a shared file, a write through
/// another mapping of the same pages). In-process: every context of this process; daemon: this
/// session and every client mapping the same file pages as an arena.
///
/// # Safety
/// None beyond the handle (the memory is not touched).
#[no_mangle]
pub unsafe extern "C" fn mdrv_invalidate(
    ctx: *mut mdrv_context,
    addr: *const c_void,
    len: usize,
) -> c_int {
    guard(|| {
        let entry = context_of(ctx)?;
        let range = check_pages("addr", addr as u64, len as u64)?;
        match &entry.inner {
            ContextInner::Local(c) => c.address_space().invalidate(range)?,
            ContextInner::Daemon(c) => c.invalidate(range.start(), range.len())?,
        }
        Ok(mdrv_status::MDRV_OK)
    })
}

/// Return once every CPU change the kernel has reported so far (userfaultfd events of plain
/// munmap, madvise, mremap) has reached every context: eventual coherence reached for every
/// change made before the call. In-process contexts. `MDRV_ERR_TIMEOUT` past the mirror's
/// settle timeout (10 s).
///
/// # Safety
/// None beyond the handle.
#[no_mangle]
pub unsafe extern "C" fn mdrv_settle(ctx: *mut mdrv_context) -> c_int {
    guard(|| {
        let entry = context_of(ctx)?;
        local(&entry, "mdrv_settle")?.address_space().settle()?;
        Ok(mdrv_status::MDRV_OK)
    })
}

/// The context's statistics into `*out` (set `out->size` first).
///
/// # Safety
/// `out` points to a writable `mdrv_stats` of at least `out->size` bytes.
#[no_mangle]
pub unsafe extern "C" fn mdrv_context_stats(ctx: *mut mdrv_context, out: *mut mdrv_stats) -> c_int {
    guard(|| {
        let entry = context_of(ctx)?;
        let in_flight = entry_in_flight(&entry);
        let stats = match &entry.inner {
            ContextInner::Local(c) => {
                let s = c.stats();
                mdrv_stats {
                    size: 0,
                    reserved: 0,
                    faults: s.faults,
                    fault_batches: s.fault_batches,
                    pages_mapped: s.pages_mapped,
                    large_mappings: s.large_mappings,
                    failures: s.failures,
                    invalidations: s.invalidations,
                    tlb_fences: s.tlb_fences,
                    mappings: s.mappings as u64,
                    mapped_bytes: s.mapped_bytes,
                    pinned_bytes: s.pinned_bytes,
                    small_leaves: s.small_leaves,
                    large_leaves: s.large_leaves,
                    table_pages: s.table_pages as u64,
                    retries: s.retries,
                    revocations: s.revocations,
                    revoked_in_flight: s.revoked_in_flight as u64,
                    commands: c.runtime().commands_submitted(),
                    in_flight,
                    evictions: s.evictions,
                    refaults: s.refaults,
                    thrash_protections: s.thrash_protections,
                    table_pages_freed: s.table_pages_freed,
                }
            }
            ContextInner::Daemon(c) => {
                let s = c.stats()?;
                mdrv_stats {
                    faults: s.faults,
                    pages_mapped: s.pages_mapped,
                    mapped_bytes: s.mapped_bytes,
                    failures: s.failures,
                    invalidations: s.invalidations,
                    commands: s.commands,
                    in_flight,
                    ..mdrv_stats::default()
                }
            }
        };
        // SAFETY: the caller's promise.
        unsafe { write_sized(out, stats, "out")? };
        Ok(mdrv_status::MDRV_OK)
    })
}

fn entry_in_flight(entry: &ContextEntry) -> u64 {
    entry.in_flight() as u64
}

/// The device's page-table entry for `addr` into `*out` (set `out->size` first): whether the
/// device can access it without a fault, where, and with which page size and permissions.
/// In-process contexts.
///
/// # Safety
/// `out` points to a writable `mdrv_device_entry` of at least `out->size` bytes (`addr` is not
/// dereferenced).
#[no_mangle]
pub unsafe extern "C" fn mdrv_get_device_entry(
    ctx: *mut mdrv_context,
    addr: *const c_void,
    out: *mut mdrv_device_entry,
) -> c_int {
    guard(|| {
        let entry = context_of(ctx)?;
        let c = local(&entry, "mdrv_get_device_entry")?;
        let found = c
            .device_translation(addr as u64)
            .map(|t| mdrv_device_entry {
                size: 0,
                present: 1,
                iova: t.iova,
                page_size: t.size.bytes(),
                readable: t.perms.read as u32,
                writable: t.perms.write as u32,
            })
            .unwrap_or_default();
        // SAFETY: the caller's promise.
        unsafe { write_sized(out, found, "out")? };
        Ok(mdrv_status::MDRV_OK)
    })
}

/// Allocate `len` bytes (rounded up to 4096) of zeroed memory the context's device can reach,
/// page aligned; `*out` is its address. Daemon contexts: the only memory their device can
/// reach (shared with the daemon). In-process contexts: an anonymous mapping (any memory is
/// reachable there; arenas let the same code run on both). Freed by `mdrv_arena_free` or with
/// the context.
///
/// # Safety
/// `out` points to a writable `void *`.
#[no_mangle]
pub unsafe extern "C" fn mdrv_arena_alloc(
    ctx: *mut mdrv_context,
    len: usize,
    out: *mut *mut c_void,
) -> c_int {
    guard(|| {
        check_out("out", out.is_null())?;
        let entry = context_of(ctx)?;
        if len == 0 {
            return Err(Failure::new(
                mdrv_status::MDRV_ERR_INVALID_ARGUMENT,
                "arena length is 0",
            ));
        }
        let arena = match &entry.inner {
            ContextInner::Local(_) => {
                let len = len.checked_next_multiple_of(4096).ok_or_else(|| {
                    Failure::new(
                        mdrv_status::MDRV_ERR_OUT_OF_RANGE,
                        format!("arena length {len:#x} overflows"),
                    )
                })?;
                let map = memmap2::MmapMut::map_anon(len).map_err(|e| {
                    Failure::new(
                        mdrv_status::MDRV_ERR_OS,
                        format!("mmap of a {len}-byte arena failed: {e}"),
                    )
                })?;
                Arena::Local(map)
            }
            ContextInner::Daemon(c) => Arena::Daemon(c.alloc_arena(len)?),
        };
        let va = match &arena {
            Arena::Local(m) => m.as_ptr() as u64,
            Arena::Daemon(a) => a.va(),
        };
        entry.arenas().insert(va, arena);
        // SAFETY: checked non-NULL; the caller's promise.
        unsafe { put(out, va as usize as *mut c_void, "out")? };
        Ok(mdrv_status::MDRV_OK)
    })
}

/// Free an arena of this context (its address as `mdrv_arena_alloc` returned it). The device's
/// entries for it go first (in-process: a strict munmap; daemon: unregistered, the daemon tears
/// its view down). `MDRV_ERR_INVALID_ARGUMENT` if `ptr` is not one of the context's arenas.
///
/// # Safety
/// No command in flight uses the arena, and nothing uses it afterwards.
#[no_mangle]
pub unsafe extern "C" fn mdrv_arena_free(ctx: *mut mdrv_context, ptr: *mut c_void) -> c_int {
    guard(|| {
        let entry = context_of(ctx)?;
        let va = ptr as u64;
        let arena = entry.arenas().remove(&va).ok_or_else(|| {
            Failure::new(
                mdrv_status::MDRV_ERR_INVALID_ARGUMENT,
                format!("{va:#x} is not an arena of this context"),
            )
        })?;
        match (arena, &entry.inner) {
            (Arena::Local(map), ContextInner::Local(c)) => {
                let range = check_pages("arena", va, map.len() as u64)?;
                // The strict munmap unmaps it; the mapping object must not unmap it again.
                std::mem::forget(map);
                // SAFETY: the caller promised nothing uses the arena any more, and its owner
                // was forgotten above.
                unsafe { c.address_space().munmap(range)? };
            }
            (arena, _) => drop(arena),
        }
        Ok(mdrv_status::MDRV_OK)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_an_error_code_and_a_message() {
        let code = guard(|| panic!("boom"));
        assert_eq!(code, mdrv_status::MDRV_ERR_PANIC as c_int);
        // SAFETY: mdrv_last_error returns a NUL-terminated string owned by this thread's slot.
        let msg = unsafe { CStr::from_ptr(mdrv_last_error()) }
            .to_str()
            .unwrap();
        assert!(msg.contains("boom") && msg.contains("panic"), "{msg}");
    }

    #[test]
    fn the_last_error_is_per_thread() {
        set_last_error("here");
        std::thread::spawn(|| {
            // SAFETY: as above.
            let msg = unsafe { CStr::from_ptr(mdrv_last_error()) };
            assert_eq!(msg.to_bytes(), b"");
        })
        .join()
        .unwrap();
        // SAFETY: as above.
        let msg = unsafe { CStr::from_ptr(mdrv_last_error()) };
        assert_eq!(msg.to_bytes(), b"here");
    }

    #[test]
    fn status_names() {
        // SAFETY: static NUL-terminated strings.
        let name = |c| {
            unsafe { CStr::from_ptr(mdrv_status_name(c)) }
                .to_str()
                .unwrap()
        };
        assert_eq!(name(-5), "MDRV_ERR_BAD_HANDLE");
        assert_eq!(name(12345), "MDRV_UNKNOWN_STATUS");
    }
}
