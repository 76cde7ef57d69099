//! Prints ns/page for `snapshot` against raw PAGEMAP_SCAN and pagemap reads over the same pages,
//! and the userfaultfd event latency (event read -> all callbacks done) for DONTNEED and munmap.
//!
//! `cargo run --release -p mirror --example walk_bench`

use std::time::{Duration, Instant};

use mirror::{sys::baseline, AddressSpace, Config, Mapping, VaRange};

const MIB: usize = 1 << 20;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn time<F: FnMut()>(reps: usize, mut f: F) -> Duration {
    median(
        (0..reps)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed()
            })
            .collect(),
    )
}

fn per_page(d: Duration, pages: usize) -> f64 {
    d.as_nanos() as f64 / pages as f64
}

fn walk_case(mm: &AddressSpace, name: &str, m: &Mapping) {
    let r = m.range();
    let pages = r.pages();
    let pagemap = std::fs::File::open("/proc/self/pagemap").unwrap();
    let mut buf = Vec::new();
    let snap = time(15, || {
        std::hint::black_box(mm.snapshot(r).unwrap());
    });
    let fast = time(15, || {
        std::hint::black_box(mm.snapshot_fast(r).unwrap());
    });
    let scan = time(15, || {
        std::hint::black_box(baseline::pagemap_scan_present(&pagemap, r).unwrap());
    });
    let read = time(15, || {
        std::hint::black_box(baseline::pagemap_read_present(&pagemap, r, &mut buf).unwrap());
    });
    println!(
        "{name:<32} {pages:>6} pages: snapshot {:>5.1} ns/page, snapshot_fast {:>5.1}, raw PAGEMAP_SCAN {:>5.1}, raw pagemap pread {:>5.1}; snapshot/pread {:>4.2}x, fast/scan {:>4.2}x",
        per_page(snap, pages),
        per_page(fast, pages),
        per_page(scan, pages),
        per_page(read, pages),
        snap.as_secs_f64() / read.as_secs_f64(),
        fast.as_secs_f64() / scan.as_secs_f64()
    );
}

fn main() {
    let mm = AddressSpace::current(Config::default()).unwrap();
    println!("walker caps: {:?}", mm.capabilities().walker);
    let rw = libc::PROT_READ | libc::PROT_WRITE;

    let m = Mapping::anonymous_aligned(256 * MIB, 2 * MIB, rw).unwrap();
    // SAFETY: NOHUGEPAGE only changes how later faults are backed.
    unsafe { mm.madvise(m.range(), libc::MADV_NOHUGEPAGE) }.unwrap();
    mm.fault(m.range(), mirror::Access::Write).unwrap();
    walk_case(&mm, "256 MiB anon, 4 KiB, populated", &m);
    drop(m);

    let m = Mapping::anonymous_aligned(256 * MIB, 2 * MIB, rw).unwrap();
    walk_case(&mm, "256 MiB anon, unpopulated", &m);
    drop(m);

    let m = Mapping::anonymous_aligned(256 * MIB, 2 * MIB, rw).unwrap();
    // SAFETY: HUGEPAGE only changes how later faults are backed.
    unsafe { mm.madvise(m.range(), libc::MADV_HUGEPAGE) }.unwrap();
    mm.fault(m.range(), mirror::Access::Write).unwrap();
    let thp = mm
        .snapshot(m.range())
        .unwrap()
        .pages()
        .iter()
        .filter(|p| p.size == mirror::PageSize::Thp)
        .count();
    println!("(THP case: {thp} of {} pages are THP)", m.range().pages());
    walk_case(&mm, "256 MiB anon, THP, populated", &m);
    drop(m);

    // Event latency: one subscriber doing nothing, so this measures the crate's own path.
    let n = 2000;
    let m = Mapping::anonymous(n * 4096, rw).unwrap();
    let _sub = mm.subscribe(m.range(), (), |_, _| {}).unwrap();
    mm.track(m.range()).unwrap();
    let retrack = time(1001, || mm.track(m.range()).unwrap());
    println!(
        "track() of an already tracked 1-VMA range: {:.2} us median",
        retrack.as_secs_f64() * 1e6
    );
    mm.settle().unwrap();
    let before = mm.stats().event_latency;
    let mut op = Vec::with_capacity(n);
    for i in 0..n {
        m.write_byte(i * 4096, 1);
        let t = Instant::now();
        m.discard(i * 4096, 4096).unwrap();
        op.push(t.elapsed());
    }
    mm.settle().unwrap();
    report_latency("DONTNEED 1 page", &mm, &before, op);

    let before = mm.stats().event_latency;
    let mut rest = Some(m);
    let mut op = Vec::with_capacity(n);
    for _ in 0..n - 1 {
        let (head, tail) = rest.take().unwrap().split_at(4096).unwrap();
        let t = Instant::now();
        drop(head);
        op.push(t.elapsed());
        rest = Some(tail);
    }
    mm.settle().unwrap();
    report_latency("munmap 1 page", &mm, &before, op);
    let _ = VaRange::whole();
}

fn report_latency(
    name: &str,
    mm: &AddressSpace,
    before: &mirror::LatencySummary,
    op: Vec<Duration>,
) {
    let after = mm.stats().event_latency;
    let count = after.count - before.count;
    let mean = Duration::from_nanos((after.total_ns - before.total_ns) / count.max(1));
    let mut d = after.clone();
    for (b, a) in d.buckets.iter_mut().zip(before.buckets.iter()) {
        *b -= a;
    }
    d.count = count;
    println!(
        "{name:<16} events {count:>5}  op median {:>6.1} us  event read->callbacks done: mean {:>6.2} us, p50 <= {:?}, p99 <= {:?}, max (run) {:.1} us",
        median(op).as_secs_f64() * 1e6,
        mean.as_secs_f64() * 1e6,
        d.quantile_bound(0.5).unwrap_or_default(),
        d.quantile_bound(0.99).unwrap_or_default(),
        after.max_ns as f64 / 1000.0
    );
}
