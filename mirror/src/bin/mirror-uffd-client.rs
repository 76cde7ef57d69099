//! Test helper: a "client" process that hands its userfaultfd to a "daemon" (the test) over a
//! Unix socket, then changes its own mappings on command so the daemon sees the events.
//!
//! Usage: `mirror-uffd-client SOCKET_PATH`, or `mirror-uffd-client --unprivileged-report`, which
//! drops to uid/gid 65534, mirrors itself and prints `key=value` lines describing how the crate
//! degraded (for the degradation test). Protocol on the stream: the client sends
//! (uffd, payload = region address and length, 16 bytes little endian); then for each command
//! byte it acts and answers `k` (or `e` on failure):
//! `d` discard page 0, `u` unmap page 1, `m` move pages 2..4 elsewhere (REMAP + UNMAP),
//! `f` fork a child that exits at once, `x` exit.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;

use mirror::{uffd, Mapping, PAGE_SIZE};

const PAGES: usize = 8;

fn main() {
    if let Err(e) = run() {
        eprintln!("mirror-uffd-client: {e}");
        std::process::exit(2);
    }
}

fn unprivileged_report() -> Result<(), Box<dyn std::error::Error>> {
    mirror::sys::process::become_unprivileged(65534, 65534)?;
    let mm = mirror::AddressSpace::current(mirror::Config::default())?;
    let caps = mm.capabilities();
    println!("uffd={}", caps.uffd.is_some());
    if let Some(u) = &caps.uffd {
        println!("fork_events={}", u.fork_events);
        println!("user_mode_only={}", u.user_mode_only);
    }
    println!("pfn_visible={}", caps.walker.pfn_visible);
    for note in &caps.degraded {
        println!("degraded={note}");
    }
    let page = PAGE_SIZE as usize;
    let m = Mapping::anonymous(2 * page, libc::PROT_READ | libc::PROT_WRITE)?;
    let _ = m.read_byte(0);
    m.write_byte(page, 1);
    let snap = mm.snapshot(m.range())?;
    println!("page0={:?}", snap.pages()[0].state);
    println!("page1={:?}", snap.pages()[1].state);
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let l = log.clone();
    let _sub = mm.subscribe(m.range(), (), move |_, inv| {
        l.lock().unwrap().push(inv.kind)
    })?;
    match mm.track(m.range()) {
        Ok(()) => {
            m.discard(page, page)?;
            mm.settle()?;
            println!("events={:?}", log.lock().unwrap());
        }
        Err(e) => println!("track_error={e}"),
    }
    Ok(())
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .ok_or("usage: mirror-uffd-client SOCKET_PATH")?;
    if path == "--unprivileged-report" {
        return unprivileged_report();
    }
    let mut sock = UnixStream::connect(path)?;
    let page = PAGE_SIZE as usize;
    let region = Mapping::anonymous(PAGES * page, libc::PROT_READ | libc::PROT_WRITE)?;
    for i in 0..PAGES {
        region.write_byte(i * page, 0x5a);
    }
    let fd = uffd::create_uninitialised()?;
    let mut payload = [0u8; 16];
    payload[..8].copy_from_slice(&region.addr().to_le_bytes());
    payload[8..].copy_from_slice(&(region.len() as u64).to_le_bytes());
    uffd::send_fd(sock.as_fd(), fd.as_fd(), &payload)?;
    // Keeping a copy would make our munmaps hang forever if the daemon died.
    drop(fd);

    let (head, rest) = region.split_at(page)?; // page 0
    let (unmap_me, rest) = rest.split_at(page)?; // page 1
    let (move_me, _keep) = rest.split_at(2 * page)?; // pages 2..4, then 4..8 stay
    let mut unmap_me = Some(unmap_me);
    let mut move_me = Some(move_me);
    let mut moved = None;
    let mut cmd = [0u8; 1];
    loop {
        sock.read_exact(&mut cmd)?;
        let ok = match cmd[0] {
            b'd' => head.discard(0, page).is_ok(),
            b'u' => {
                drop(unmap_me.take());
                true
            }
            b'm' => match move_me.take().map(|m| m.remap(2 * page)) {
                Some(Ok(m)) => {
                    moved = Some(m);
                    true
                }
                _ => false,
            },
            b'f' => mirror::sys::process::fork_exiting_child(0)
                .and_then(|pid| {
                    nix::sys::wait::waitpid(pid, None).map_err(|e| mirror::Error::Sys {
                        op: "waitpid",
                        errno: e,
                    })
                })
                .is_ok(),
            b'x' => {
                sock.write_all(b"k")?;
                drop(moved);
                std::process::exit(0);
            }
            _ => false,
        };
        sock.write_all(if ok { b"k" } else { b"e" })?;
    }
}
