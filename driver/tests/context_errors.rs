//! In-process errors that name their limit, its value and what changes it (issue 15, item 12):
//! a command over the device's maximum transfer, a fault over the context's mapped-bytes quota.

use driver::context::ContextOptions;
use driver::runtime::{AcceleratorConfig, DeviceSpec, Runtime, RuntimeOptions};
use driver::Error;

fn open(max_transfer: u32) -> std::sync::Arc<Runtime> {
    let device = AcceleratorConfig {
        max_transfer,
        ..Default::default()
    };
    Runtime::open(DeviceSpec::Emulated(device), RuntimeOptions::default()).expect("open")
}

#[test]
fn a_command_over_the_devices_maximum_transfer_is_refused_naming_it() {
    let rt = open(64 << 10);
    let ctx = rt.create_context().unwrap();
    let mut buf = vec![0u8; 128 << 10];
    let e = ctx.fill(&mut buf, 7).unwrap_err();
    assert!(
        matches!(e, Error::CommandTooLong { len, max } if len == 128 << 10 && max == 64 << 10),
        "{e:?}"
    );
    let text = e.to_string();
    assert!(
        text.contains("131072") && text.contains("65536") && text.contains("CAP_MAX_TRANSFER"),
        "{text}"
    );
    // Nothing ran, and a command within the limit still does.
    assert!(buf.iter().all(|&b| b == 0));
    ctx.fill(&mut buf[..64 << 10], 0x0707_0707_0707_0707)
        .unwrap();
    assert!(buf[..64 << 10].iter().all(|&b| b == 7));
}

#[test]
fn a_fault_over_the_mapped_bytes_quota_names_the_quota_its_value_and_the_option() {
    let rt = open(64 << 20);
    let ctx = rt
        .create_context_with(ContextOptions {
            max_mapped_bytes: Some(64 << 10),
            ..Default::default()
        })
        .unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let e = ctx.fill(&mut buf, 1).unwrap_err();
    assert!(
        matches!(e, Error::QuotaExceeded { limit, .. } if limit == 64 << 10),
        "{e:?}"
    );
    let text = e.to_string();
    assert!(
        text.contains("65536") && text.contains("ContextOptions::max_mapped_bytes"),
        "{text}"
    );
}
