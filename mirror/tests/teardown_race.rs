//! The hmm-tests `anon_teardown` port, alone in its own process: no other test may map memory at
//! the addresses it unmaps, so an entry left for them can only be a missed invalidation.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use mirror::Mapping;

#[test]
fn faults_racing_munmap_leave_no_entry_for_the_unmapped_half() {
    // The hmm-tests anon_teardown port: device faults race a munmap of half the buffer; after the
    // event is handled no device entry may remain for the unmapped half.
    let Some(mm) = uffd_mm() else { return };
    let mm = Arc::new(mm);
    for round in 0..10 {
        let m = Mapping::anonymous(64 * PAGE, RW).unwrap();
        let whole = m.range();
        mm.fault(whole, mirror::Access::Write).unwrap();
        let dev = Arc::new(device(&mm, whole));
        mm.track(whole).unwrap();
        let (keep, gone) = m.split_at(32 * PAGE).unwrap();
        let gone_range = gone.range();
        let (mm2, dev2) = (mm.clone(), dev.clone());
        let faulter = std::thread::spawn(move || {
            for _ in 0..20 {
                let _ = dev2.sub.mirror_range(
                    |_| mm2.snapshot(whole),
                    |ptes, snap| {
                        ptes.clear();
                        for (i, p) in snap.pages().iter().enumerate() {
                            if matches!(p.state, mirror::PageState::Write) {
                                ptes.push(whole.start() + (i * PAGE) as u64);
                            }
                        }
                    },
                );
            }
        });
        std::thread::sleep(Duration::from_micros(200 * round));
        drop(gone);
        faulter.join().unwrap();
        mm.settle().unwrap();
        let stale: Vec<_> = dev
            .sub
            .lock()
            .iter()
            .copied()
            .filter(|a| gone_range.contains(*a))
            .collect();
        assert!(stale.is_empty(), "round {round}: stale entries {stale:x?}");
        drop(keep);
    }
}
