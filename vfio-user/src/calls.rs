//! Outstanding requests of one side of a connection: message ids, the threads waiting for
//! their replies, and failing them all when the connection goes.
//!
//! The side's receiving thread hands each reply to [`Calls::complete`]; a caller sends with
//! [`Calls::call`] and blocks only on its own reply, so requests from the peer can be served
//! meanwhile.

use std::collections::HashMap;
use std::os::fd::BorrowedFd;
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender};
use std::sync::Mutex;
use std::time::Duration;

use crate::{Connection, Header, Message};

/// Why a call got no reply message.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The connection is closed (before or while waiting).
    #[error("connection closed")]
    Closed,
    /// Sending failed.
    #[error("send: {0}")]
    Send(std::io::Error),
    /// No reply within the timeout.
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// The reply broke the size or descriptor limits (it was drained).
    #[error("reply over the size or descriptor limit")]
    OverLimit,
}

type Waiter = SyncSender<Result<Message, CallError>>;

#[derive(Default)]
struct State {
    waiters: HashMap<u16, Waiter>,
    next_id: u16,
    closed: bool,
}

/// The outstanding requests of one side.
#[derive(Default)]
pub struct Calls {
    state: Mutex<State>,
}

impl std::fmt::Debug for Calls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.lock();
        f.debug_struct("Calls")
            .field("outstanding", &s.waiters.len())
            .field("closed", &s.closed)
            .finish()
    }
}

impl Calls {
    /// No outstanding request.
    pub fn new() -> Calls {
        Calls::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        sys_util::sync::lock(&self.state)
    }

    /// Send command `cmd` with `body` and `fds` on `conn` and wait for its reply (which may be an
    /// error reply: the caller checks the header).
    pub fn call(
        &self,
        conn: &Connection,
        cmd: u16,
        body: &[u8],
        fds: &[BorrowedFd<'_>],
        timeout: Duration,
    ) -> Result<Message, CallError> {
        let (tx, rx) = mpsc::sync_channel(1);
        let id = {
            let mut s = self.lock();
            if s.closed {
                return Err(CallError::Closed);
            }
            // Skip ids still waiting (after a wrap-around).
            let mut id = s.next_id;
            while s.waiters.contains_key(&id) {
                id = id.wrapping_add(1);
            }
            s.next_id = id.wrapping_add(1);
            s.waiters.insert(id, tx);
            id
        };
        if let Err(e) = conn.send(Header::command(id, cmd, body.len()), body, fds) {
            self.lock().waiters.remove(&id);
            return Err(CallError::Send(e));
        }
        match rx.recv_timeout(timeout) {
            Ok(r) => r,
            Err(RecvTimeoutError::Disconnected) => Err(CallError::Closed),
            Err(RecvTimeoutError::Timeout) => {
                self.lock().waiters.remove(&id);
                Err(CallError::Timeout(timeout))
            }
        }
    }

    /// Hand a reply (or its failure) to the caller waiting for `id`. False if nobody waits.
    pub fn complete(&self, id: u16, reply: Result<Message, CallError>) -> bool {
        let waiter = self.lock().waiters.remove(&id);
        match waiter {
            Some(tx) => {
                let _ = tx.send(reply);
                true
            }
            None => false,
        }
    }

    /// Fail every waiting call and refuse new ones.
    pub fn close(&self) {
        let mut s = self.lock();
        s.closed = true;
        s.waiters.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{command, Limits};
    use std::os::unix::net::UnixStream;
    use std::sync::Arc;

    #[test]
    fn replies_reach_their_callers_and_close_fails_the_rest() {
        let (a, b) = UnixStream::pair().unwrap();
        let a = Arc::new(Connection::new(a, Limits::default()));
        let b = Connection::new(b, Limits::default());
        let calls = Arc::new(Calls::new());
        let caller = {
            let (a, calls) = (Arc::clone(&a), Arc::clone(&calls));
            std::thread::spawn(move || {
                calls.call(&a, command::DEVICE_RESET, &[], &[], Duration::from_secs(60))
            })
        };
        let req = b.recv().unwrap();
        assert!(!calls.complete(req.header.id.wrapping_add(1), Err(CallError::OverLimit)));
        b.reply(&req.header, &[9], &[]).unwrap();
        let reply = a.recv().unwrap();
        assert!(calls.complete(reply.header.id, Ok(reply)));
        assert_eq!(caller.join().unwrap().unwrap().payload, vec![9]);

        let waiting = {
            let (a, calls) = (Arc::clone(&a), Arc::clone(&calls));
            std::thread::spawn(move || {
                calls.call(&a, command::DEVICE_RESET, &[], &[], Duration::from_secs(60))
            })
        };
        let _ = b.recv().unwrap();
        calls.close();
        assert!(matches!(waiting.join().unwrap(), Err(CallError::Closed)));
        assert!(matches!(
            calls.call(&a, command::DEVICE_RESET, &[], &[], Duration::from_secs(60)),
            Err(CallError::Closed)
        ));
    }
}
