//! Repeats `snapshot` (or, with `fast`, `snapshot_fast`) over populated 4 KiB pages, for
//! profiling with `perf record`.
//!
//! `cargo run --release -p mirror --example snapshot_profile -- [pages] [reps] [fast|pread[N]|x] [read|readonly]`

use std::time::Instant;

use mirror::{AddressSpace, Config, Mapping};

fn main() {
    let mut args = std::env::args().skip(1);
    let pages: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(16384);
    let reps: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(2000);
    let mode = args.next().unwrap_or_default();
    let fast = mode == "fast";
    let mm = AddressSpace::current(Config::default()).unwrap();
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    let m = Mapping::anonymous_aligned(pages * 4096, 2 << 20, rw).unwrap();
    // SAFETY: NOHUGEPAGE only changes how later faults are backed.
    unsafe { mm.madvise(m.range(), libc::MADV_NOHUGEPAGE) }.unwrap();
    // A fourth argument `read` read-faults the pages instead (all map the shared zero page);
    // `readonly` write-faults them and then makes the mapping read-only.
    let populate = args.next().unwrap_or_default();
    let access = if populate == "read" {
        mirror::Access::Read
    } else {
        mirror::Access::Write
    };
    mm.fault(m.range(), access).unwrap();
    if populate == "readonly" {
        m.protect(0, m.len(), libc::PROT_READ).unwrap();
    }
    if let Some(chunk) = mode.strip_prefix("pread") {
        // Raw pagemap preads of `chunk` entries each (the kernel's floor for `snapshot`).
        let chunk: usize = chunk.parse().unwrap_or(pages);
        let pagemap = std::fs::File::open("/proc/self/pagemap").unwrap();
        let mut buf = vec![0u64; chunk];
        let t = Instant::now();
        for _ in 0..reps {
            let mut done = 0;
            while done < pages {
                let off = (m.addr() / 4096 + done as u64) * 8;
                let n =
                    std::os::unix::fs::FileExt::read_at(&pagemap, bytemuck_bytes(&mut buf), off)
                        .unwrap();
                done += n / 8;
            }
            std::hint::black_box(&buf);
        }
        let ns = t.elapsed().as_nanos() as f64 / (reps * pages) as f64;
        println!("pread chunk {chunk}: {ns:.1} ns/page");
        return;
    }
    let t = Instant::now();
    for _ in 0..reps {
        let s = if fast {
            mm.snapshot_fast(m.range())
        } else {
            mm.snapshot(m.range())
        };
        std::hint::black_box(s.unwrap());
    }
    let ns = t.elapsed().as_nanos() as f64 / (reps * pages) as f64;
    println!(
        "{} {pages} pages: {ns:.1} ns/page",
        if fast { "snapshot_fast" } else { "snapshot" }
    );
}

fn bytemuck_bytes(v: &mut [u64]) -> &mut [u8] {
    // SAFETY: any byte pattern is a valid u64 and the length covers exactly the slice.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast(), v.len() * 8) }
}
