//! Feed arbitrary bytes to the receiving side of a connection and to every payload decoder:
//! nothing may panic or hang, every message is consumed by its declared size, and after a
//! recoverable error the next message is still found.
#![no_main]

use std::io::Write;
use std::os::unix::net::UnixStream;

use libfuzzer_sys::fuzz_target;
use vfio_user_protocol::payload::{
    sparse_mmap_areas, DeviceInfo, DmaAccess, DmaMap, DmaUnmap, IrqInfo, RegionAccess, RegionInfo, SetIrqs,
};
use vfio_user_protocol::version::Version;
use vfio_user_protocol::{json, Connection, Limits};

fn decode_all(p: &[u8]) {
    let _ = DmaMap::decode(p);
    let _ = DmaUnmap::decode(p);
    let _ = DeviceInfo::decode(p);
    let _ = RegionInfo::decode(p);
    let _ = IrqInfo::decode(p);
    let _ = SetIrqs::decode(p);
    let _ = RegionAccess::decode(p, true);
    let _ = RegionAccess::decode(p, false);
    let _ = DmaAccess::decode(p, true);
    let _ = DmaAccess::decode(p, false);
    let _ = Version::decode(p);
    let _ = sparse_mmap_areas(p);
}

fuzz_target!(|data: &[u8]| {
    decode_all(data);
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = json::parse(s);
    }
    // The stream decoder: small limits so the oversized path is exercised too.
    let Ok((mut tx, rx)) = UnixStream::pair() else {
        return;
    };
    let conn = Connection::new(
        rx,
        Limits {
            max_msg_size: 256,
            max_fds: 1,
        },
    );
    // The socket buffer holds far more than a fuzz input; write everything, then hang up.
    let bytes = &data[..data.len().min(64 * 1024)];
    if tx.write_all(bytes).is_err() {
        return;
    }
    drop(tx);
    let mut consumed = 0usize;
    loop {
        match conn.recv() {
            Ok(m) => {
                assert_eq!(m.payload.len() + 16, m.header.size as usize);
                consumed += m.header.size as usize;
                decode_all(&m.payload);
            }
            Err(e) if e.recoverable() => {}
            Err(_) => break,
        }
        assert!(consumed <= bytes.len());
    }
});
