//! The fault service's own CPU-time accounting (`FaultService::set_cpu_accounting`): off by
//! default, and when on, every named phase of a real fault is counted.

use driver::{DeviceSpec, Runtime, RuntimeOptions};

fn fill_fresh_pages(ctx: &driver::Context, pages: usize) {
    let mut buf = vec![0u8; pages * 4096];
    ctx.fill(&mut buf, 0x1122_3344_5566_7788).expect("fill");
    assert!(buf
        .chunks(8)
        .all(|c| c == 0x1122_3344_5566_7788u64.to_le_bytes()));
}

#[test]
fn accounting_is_off_by_default_and_counts_every_phase_of_a_fault_when_on() {
    let rt = Runtime::open(DeviceSpec::emulated(), RuntimeOptions::default()).expect("open");
    let ctx = rt.create_context().expect("context");
    fill_fresh_pages(&ctx, 4);
    let off = rt.service().cpu_cost();
    assert_eq!(off, Default::default(), "nothing is measured while off");
    assert!(
        rt.service()
            .stats()
            .batches
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );

    rt.service().set_cpu_accounting(true);
    fill_fresh_pages(&ctx, 64);
    let on = rt.service().cpu_cost();
    assert!(on.batches > 0, "{on:?}");
    assert!(on.walk_ns > 0, "the CPU mappings were walked: {on:?}");
    assert!(on.dma_map_ns > 0, "the pages were DMA-mapped: {on:?}");
    assert!(on.page_table_ns > 0, "device PTEs were written: {on:?}");
    assert!(on.replay_ns > 0, "the device was told to replay: {on:?}");
    assert!(
        on.total_ns >= on.walk_ns + on.dma_map_ns + on.page_table_ns + on.replay_ns,
        "the phases are parts of the total: {on:?}"
    );

    rt.service().set_cpu_accounting(false);
    fill_fresh_pages(&ctx, 4);
    assert_eq!(rt.service().cpu_cost(), on, "nothing more once turned off");
}
