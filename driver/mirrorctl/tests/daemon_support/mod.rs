//! What the daemon test binaries share: a scratch directory, the daemon served on a thread of
//! its own, waiting for its socket. (Each binary uses part of it.)
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use driver::Error;
use mirrord::Daemon;

/// A directory under the temp dir, removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// `mirrord-test-TAG-PID-INSTANT`: unique per test and run.
    pub fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "mirrord-test-{tag}-{}-{:?}",
            std::process::id(),
            Instant::now()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The thread serving a daemon; joins with what `Daemon::serve` returned.
pub type ServeThread = std::thread::JoinHandle<Result<(), Error>>;

/// Serve `daemon` on a thread with a tokio runtime of its own, until the sender fires (or is
/// dropped).
pub fn serve_on_a_thread(daemon: Arc<Daemon>) -> (tokio::sync::oneshot::Sender<()>, ServeThread) {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio");
        rt.block_on(daemon.serve(async {
            let _ = rx.await;
        }))
    });
    (tx, thread)
}

/// Wait (at most 20 s) until `path` exists; `what` names the listener in the failure.
pub fn wait_for_socket(path: &Path, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        assert!(Instant::now() < deadline, "{what} did not bind");
        std::thread::sleep(Duration::from_millis(10));
    }
}
