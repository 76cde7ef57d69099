use driver::runtime::{DeviceSpec, Runtime, RuntimeOptions};

#[test]
fn fill_and_checksum_malloc_memory() {
    let rt = Runtime::open(DeviceSpec::emulated(), RuntimeOptions::default()).unwrap();
    let ctx = rt.create_context().unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    ctx.fill(&mut buf, 0x5a5a_5a5a_5a5a_5a5a).unwrap();
    assert!(buf.iter().all(|b| *b == 0x5a));
    let sum = ctx.checksum(&buf).unwrap();
    assert_eq!(sum, accel_abi::fnv1a_update(accel_abi::FNV_OFFSET, &buf));
    let s = ctx.stats();
    eprintln!("{s:?}");
    assert!(s.faults > 0);
}
