//! The daemon's wire protocol, version 1 (docs/daemon.md): framing, requests, replies and
//! completion events, little-endian, no I/O here. Everything a peer sends is checked before
//! anything is allocated for it.
//!
//! Frame: a 16-byte header — magic `"MXD1"`, protocol version u16, kind u16, request id u32,
//! payload length u32 — then the payload. File descriptors travel as SCM_RIGHTS on the frame's
//! bytes. A reply has the request's kind with [`REPLY`] set and the request's id; a completion
//! event has kind [`kind::COMPLETION`] and id 0.

use driver::backend::DeviceLost;
use driver::runtime::Op;

/// First four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"MXD1";
/// The protocol version this build speaks.
pub const VERSION: u16 = 1;
/// Header bytes.
pub const HEADER_SIZE: usize = 16;
/// Largest payload either side accepts.
pub const MAX_PAYLOAD: u32 = 4096;
/// Longest error message carried in a reply.
pub const MAX_MESSAGE: usize = 1024;
/// Bit set in a reply's kind.
pub const REPLY: u16 = 0x8000;

/// Message kinds.
pub mod kind {
    /// Client -> daemon: start a session (fds: the uffd, then optionally a pidfd).
    pub const HELLO: u16 = 1;
    /// Register a memfd arena (fd: the memfd).
    pub const REGISTER_ARENA: u16 = 2;
    /// Unregister an arena.
    pub const UNREGISTER_ARENA: u16 = 3;
    /// Submit a device command.
    pub const SUBMIT: u16 = 4;
    /// Ask for statistics.
    pub const STATS: u16 = 5;
    /// End the session.
    pub const GOODBYE: u16 = 6;
    /// Tear down the device's view of a range the client changed in a way no userfaultfd
    /// event reports (`fallocate(PUNCH_HOLE)`, `ftruncate` of an arena's file): this client's,
    /// and every other client's that maps the same file pages as an arena.
    pub const INVALIDATE: u16 = 7;
    /// Daemon -> client: a command completed (id 0).
    pub const COMPLETION: u16 = 0x4001;
    /// Daemon -> client: the device is lost for good (id 0; payload [`super::DeviceLostNotice`]).
    /// Sent once, before the completions of the commands it fails; the daemon then ends the
    /// session and exits.
    pub const DEVICE_LOST: u16 = 0x4002;
}

/// The status of a completion event for a command that never completed because the device
/// was lost (outside `accel_abi::Status`'s range).
pub const STATUS_DEVICE_LOST: u32 = 0xdead_0001;

/// Why a frame or payload was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The frame does not start with the magic: the stream cannot be resynchronised.
    #[error("bad magic {0:02x?} (expected \"MXD1\")")]
    BadMagic([u8; 4]),
    /// A protocol version this build does not speak.
    #[error("protocol version {got} is not spoken here (this side speaks {VERSION})")]
    Version {
        /// What the peer sent.
        got: u16,
    },
    /// The payload is larger than [`MAX_PAYLOAD`].
    #[error("payload of {len} bytes exceeds the {MAX_PAYLOAD}-byte limit")]
    TooLarge {
        /// Announced length.
        len: u32,
    },
    /// An unknown message kind.
    #[error("unknown message kind {0:#06x}")]
    UnknownKind(u16),
    /// A payload of the wrong size for its kind.
    #[error("kind {kind:#06x}: payload of {got} bytes, expected {expected}")]
    BadLength {
        /// Kind.
        kind: u16,
        /// Expected size.
        expected: usize,
        /// Received size.
        got: usize,
    },
    /// An unknown operation code in a submit.
    #[error("unknown operation code {0}")]
    BadOpcode(u32),
    /// A reserved field was not zero.
    #[error("reserved field not zero in kind {0:#06x}")]
    Reserved(u16),
    /// A reply's error message was not UTF-8.
    #[error("error message is not UTF-8")]
    BadText,
}

/// A frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Message kind.
    pub kind: u16,
    /// Request id (replies echo it; events use 0).
    pub id: u32,
    /// Payload bytes that follow.
    pub len: u32,
}

impl Header {
    /// Encode with this build's version.
    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..4].copy_from_slice(&MAGIC);
        b[4..6].copy_from_slice(&VERSION.to_le_bytes());
        b[6..8].copy_from_slice(&self.kind.to_le_bytes());
        b[8..12].copy_from_slice(&self.id.to_le_bytes());
        b[12..16].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    /// Decode and check magic, version and length. A `TooLarge` header still names its kind
    /// and id through [`Header::decode_lenient`] so the peer can be answered.
    pub fn decode(b: &[u8; HEADER_SIZE]) -> Result<Header, DecodeError> {
        let h = Self::decode_lenient(b)?;
        if h.len > MAX_PAYLOAD {
            return Err(DecodeError::TooLarge { len: h.len });
        }
        Ok(h)
    }

    /// Decode checking magic and version only.
    pub fn decode_lenient(b: &[u8; HEADER_SIZE]) -> Result<Header, DecodeError> {
        let magic = [b[0], b[1], b[2], b[3]];
        if magic != MAGIC {
            return Err(DecodeError::BadMagic(magic));
        }
        let version = u16::from_le_bytes([b[4], b[5]]);
        if version != VERSION {
            return Err(DecodeError::Version { got: version });
        }
        Ok(Header {
            kind: u16::from_le_bytes([b[6], b[7]]),
            id: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            len: u32::from_le_bytes([b[12], b[13], b[14], b[15]]),
        })
    }
}

/// A client's request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Start a session, speaking a version in `min_version..=max_version`.
    Hello {
        /// Oldest version the client speaks.
        min_version: u16,
        /// Newest version the client speaks.
        max_version: u16,
    },
    /// Register `len` bytes of the attached memfd at `offset`, mapped by the client at `va`.
    RegisterArena {
        /// Client VA.
        va: u64,
        /// Bytes.
        len: u64,
        /// File offset.
        offset: u64,
    },
    /// Unregister the arena at `va`.
    UnregisterArena {
        /// Client VA.
        va: u64,
    },
    /// Run `op` on the client's device address space; `tag` names its completion.
    Submit {
        /// Client-chosen tag.
        tag: u64,
        /// The operation.
        op: Op,
    },
    /// Statistics.
    Stats,
    /// End the session.
    Goodbye,
    /// Invalidate `[va, va + len)` of the client's device address space, and the same file
    /// pages in every client that maps them as an arena (both 4 KiB aligned, `len` non-zero).
    Invalidate {
        /// Client VA.
        va: u64,
        /// Bytes.
        len: u64,
    },
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn u16(&mut self) -> u16 {
        let v = u16::from_le_bytes([self.b[self.at], self.b[self.at + 1]]);
        self.at += 2;
        v
    }
    fn u32(&mut self) -> u32 {
        let mut a = [0u8; 4];
        a.copy_from_slice(&self.b[self.at..self.at + 4]);
        self.at += 4;
        u32::from_le_bytes(a)
    }
    fn u64(&mut self) -> u64 {
        let mut a = [0u8; 8];
        a.copy_from_slice(&self.b[self.at..self.at + 8]);
        self.at += 8;
        u64::from_le_bytes(a)
    }
}

fn expect_len(kind: u16, payload: &[u8], expected: usize) -> Result<Reader<'_>, DecodeError> {
    if payload.len() != expected {
        return Err(DecodeError::BadLength {
            kind,
            expected,
            got: payload.len(),
        });
    }
    Ok(Reader { b: payload, at: 0 })
}

const OP_COPY: u32 = 1;
const OP_FILL: u32 = 2;
const OP_ATOMIC_ADD: u32 = 3;
const OP_CHECKSUM: u32 = 4;
const OP_PREFETCH: u32 = 5;

fn encode_op(op: &Op, out: &mut Vec<u8>) {
    let (code, a, b, c) = match *op {
        Op::Copy { dst, src, len } => (OP_COPY, dst, src, len),
        Op::Fill { dst, len, pattern } => (OP_FILL, dst, len, pattern),
        Op::AtomicAdd { dst, value } => (OP_ATOMIC_ADD, dst, value, 0),
        Op::Checksum { src, len } => (OP_CHECKSUM, src, len, 0),
        Op::Prefetch { src, len } => (OP_PREFETCH, src, len, 0),
    };
    out.extend_from_slice(&code.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    for v in [a, b, c] {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

fn decode_op(r: &mut Reader<'_>) -> Result<Op, DecodeError> {
    let code = r.u32();
    if r.u32() != 0 {
        return Err(DecodeError::Reserved(kind::SUBMIT));
    }
    let (a, b, c) = (r.u64(), r.u64(), r.u64());
    let unused_zero = |v: u64| {
        if v == 0 {
            Ok(())
        } else {
            Err(DecodeError::Reserved(kind::SUBMIT))
        }
    };
    Ok(match code {
        OP_COPY => Op::Copy {
            dst: a,
            src: b,
            len: c,
        },
        OP_FILL => Op::Fill {
            dst: a,
            len: b,
            pattern: c,
        },
        OP_ATOMIC_ADD => {
            unused_zero(c)?;
            Op::AtomicAdd { dst: a, value: b }
        }
        OP_CHECKSUM => {
            unused_zero(c)?;
            Op::Checksum { src: a, len: b }
        }
        OP_PREFETCH => {
            unused_zero(c)?;
            Op::Prefetch { src: a, len: b }
        }
        other => return Err(DecodeError::BadOpcode(other)),
    })
}

impl Request {
    /// The kind and payload.
    pub fn encode(&self) -> (u16, Vec<u8>) {
        let mut p = Vec::with_capacity(40);
        let k = match *self {
            Request::Hello {
                min_version,
                max_version,
            } => {
                p.extend_from_slice(&min_version.to_le_bytes());
                p.extend_from_slice(&max_version.to_le_bytes());
                p.extend_from_slice(&0u32.to_le_bytes());
                kind::HELLO
            }
            Request::RegisterArena { va, len, offset } => {
                for v in [va, len, offset] {
                    p.extend_from_slice(&v.to_le_bytes());
                }
                kind::REGISTER_ARENA
            }
            Request::UnregisterArena { va } => {
                p.extend_from_slice(&va.to_le_bytes());
                kind::UNREGISTER_ARENA
            }
            Request::Submit { tag, op } => {
                p.extend_from_slice(&tag.to_le_bytes());
                encode_op(&op, &mut p);
                kind::SUBMIT
            }
            Request::Stats => kind::STATS,
            Request::Goodbye => kind::GOODBYE,
            Request::Invalidate { va, len } => {
                p.extend_from_slice(&va.to_le_bytes());
                p.extend_from_slice(&len.to_le_bytes());
                kind::INVALIDATE
            }
        };
        (k, p)
    }

    /// Decode a request payload of kind `k`.
    pub fn decode(k: u16, payload: &[u8]) -> Result<Request, DecodeError> {
        Ok(match k {
            kind::HELLO => {
                let mut r = expect_len(k, payload, 8)?;
                let (min_version, max_version) = (r.u16(), r.u16());
                if r.u32() != 0 {
                    return Err(DecodeError::Reserved(k));
                }
                Request::Hello {
                    min_version,
                    max_version,
                }
            }
            kind::REGISTER_ARENA => {
                let mut r = expect_len(k, payload, 24)?;
                Request::RegisterArena {
                    va: r.u64(),
                    len: r.u64(),
                    offset: r.u64(),
                }
            }
            kind::UNREGISTER_ARENA => {
                let mut r = expect_len(k, payload, 8)?;
                Request::UnregisterArena { va: r.u64() }
            }
            kind::SUBMIT => {
                let mut r = expect_len(k, payload, 40)?;
                let tag = r.u64();
                Request::Submit {
                    tag,
                    op: decode_op(&mut r)?,
                }
            }
            kind::STATS => {
                expect_len(k, payload, 0)?;
                Request::Stats
            }
            kind::GOODBYE => {
                expect_len(k, payload, 0)?;
                Request::Goodbye
            }
            kind::INVALIDATE => {
                let mut r = expect_len(k, payload, 16)?;
                Request::Invalidate {
                    va: r.u64(),
                    len: r.u64(),
                }
            }
            other => return Err(DecodeError::UnknownKind(other)),
        })
    }
}

/// Error codes of a failed request: defined with the driver's error type, which carries them.
pub use driver::DaemonErrorCode as ErrorCode;

impl From<&DecodeError> for ErrorCode {
    fn from(e: &DecodeError) -> Self {
        match e {
            DecodeError::Version { .. } => ErrorCode::Version,
            DecodeError::TooLarge { .. } => ErrorCode::TooLarge,
            _ => ErrorCode::BadMessage,
        }
    }
}

/// Limits the daemon applies to each client (told in the HELLO reply).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientLimits {
    /// Commands in flight at once.
    pub max_in_flight: u32,
    /// Bytes the client's device address space may have mapped (pinned) at once.
    pub max_mapped_bytes: u64,
    /// Arenas registered at once.
    pub max_arenas: u32,
    /// Arena bytes registered at once.
    pub max_arena_bytes: u64,
}

/// Statistics of one client and of the daemon (the STATS reply). Fields are u64s on the wire,
/// preceded by their count: a newer peer may send more, an older fewer (missing ones read 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatsReply {
    /// This client: distinct faulting pages handed to its context.
    pub faults: u64,
    /// This client: 4 KiB pages made device-accessible.
    pub pages_mapped: u64,
    /// This client: bytes mapped (pinned) now.
    pub mapped_bytes: u64,
    /// This client: faults that could not be serviced.
    pub failures: u64,
    /// This client: invalidations run.
    pub invalidations: u64,
    /// This client: commands in flight.
    pub in_flight: u64,
    /// This client: commands submitted.
    pub commands: u64,
    /// This client: arenas registered.
    pub arenas: u64,
    /// This client: arena bytes registered.
    pub arena_bytes: u64,
    /// Daemon: clients connected (sessions past HELLO). The daemon-wide fields are 0 in a reply
    /// to a client of another uid than the daemon's.
    pub clients: u64,
    /// Daemon: bytes mapped (pinned) over every client.
    pub mapped_bytes_total: u64,
    /// Daemon: IOVA bytes allocated (rings included).
    pub iova_bytes: u64,
    /// Daemon: IOVA allocations.
    pub iova_allocations: u64,
    /// Daemon: device address spaces held back after a release whose work did not finish.
    pub quarantined: u64,
    /// Daemon: times a client's faults beyond its fair share of a batch were deferred.
    pub fault_deferrals: u64,
    /// Daemon: clients released so far.
    pub released: u64,
    /// Daemon: bytes of device page-table memory held (a pool, kept for reuse).
    pub table_pool_bytes: u64,
    /// Daemon: device page-table pages in use by live address spaces.
    pub table_pages_in_use: u64,
    /// Daemon: 1 once the device is lost (the daemon is then failing its clients' work and
    /// about to exit).
    pub device_lost: u64,
    /// Daemon: commands failed because the device was lost (in flight at the loss, or
    /// submitted after it).
    pub lost_commands: u64,
}

impl StatsReply {
    fn fields(&self) -> [u64; 20] {
        [
            self.faults,
            self.pages_mapped,
            self.mapped_bytes,
            self.failures,
            self.invalidations,
            self.in_flight,
            self.commands,
            self.arenas,
            self.arena_bytes,
            self.clients,
            self.mapped_bytes_total,
            self.iova_bytes,
            self.iova_allocations,
            self.quarantined,
            self.fault_deferrals,
            self.released,
            self.table_pool_bytes,
            self.table_pages_in_use,
            self.device_lost,
            self.lost_commands,
        ]
    }

    fn from_fields(f: &[u64]) -> StatsReply {
        let g = |i: usize| f.get(i).copied().unwrap_or(0);
        StatsReply {
            faults: g(0),
            pages_mapped: g(1),
            mapped_bytes: g(2),
            failures: g(3),
            invalidations: g(4),
            in_flight: g(5),
            commands: g(6),
            arenas: g(7),
            arena_bytes: g(8),
            clients: g(9),
            mapped_bytes_total: g(10),
            iova_bytes: g(11),
            iova_allocations: g(12),
            quarantined: g(13),
            fault_deferrals: g(14),
            released: g(15),
            table_pool_bytes: g(16),
            table_pages_in_use: g(17),
            device_lost: g(18),
            lost_commands: g(19),
        }
    }
}

/// A reply body (the success case of each request kind).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// HELLO accepted.
    Hello {
        /// The version chosen.
        version: u16,
        /// The daemon's name for this client (logs).
        client_id: u32,
        /// The device address space the client got.
        asid: u16,
        /// Its limits.
        limits: ClientLimits,
    },
    /// Arena registered.
    Arena {
        /// Whether the device may write it.
        writable: bool,
    },
    /// Command accepted; its completion follows as an event.
    Submitted,
    /// Statistics.
    Stats(StatsReply),
    /// Done (unregister, goodbye).
    Done,
    /// The request failed.
    Error {
        /// Code.
        code: ErrorCode,
        /// What went wrong, for people.
        message: String,
    },
}

impl Reply {
    /// An error reply; the message is cut to [`MAX_MESSAGE`] bytes.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Reply {
        let mut message = message.into();
        if message.len() > MAX_MESSAGE {
            let mut cut = MAX_MESSAGE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        Reply::Error { code, message }
    }

    /// The payload: status u32 (0 = success), then the body.
    pub fn encode(&self) -> Vec<u8> {
        let mut p = Vec::with_capacity(32);
        match self {
            Reply::Error { code, message } => {
                p.extend_from_slice(&(*code as u32).to_le_bytes());
                p.extend_from_slice(message.as_bytes());
                return p;
            }
            _ => p.extend_from_slice(&0u32.to_le_bytes()),
        }
        match self {
            Reply::Hello {
                version,
                client_id,
                asid,
                limits,
            } => {
                p.extend_from_slice(&version.to_le_bytes());
                p.extend_from_slice(&asid.to_le_bytes());
                p.extend_from_slice(&client_id.to_le_bytes());
                p.extend_from_slice(&limits.max_in_flight.to_le_bytes());
                p.extend_from_slice(&limits.max_arenas.to_le_bytes());
                p.extend_from_slice(&limits.max_mapped_bytes.to_le_bytes());
                p.extend_from_slice(&limits.max_arena_bytes.to_le_bytes());
            }
            Reply::Arena { writable } => p.extend_from_slice(&u32::from(*writable).to_le_bytes()),
            Reply::Stats(s) => {
                let f = s.fields();
                p.extend_from_slice(&(f.len() as u32).to_le_bytes());
                for v in f {
                    p.extend_from_slice(&v.to_le_bytes());
                }
            }
            Reply::Submitted | Reply::Done | Reply::Error { .. } => {}
        }
        p
    }

    /// Decode the reply to a request of kind `request_kind`.
    pub fn decode(request_kind: u16, payload: &[u8]) -> Result<Reply, DecodeError> {
        let k = request_kind | REPLY;
        if payload.len() < 4 {
            return Err(DecodeError::BadLength {
                kind: k,
                expected: 4,
                got: payload.len(),
            });
        }
        let status = u32::from_le_bytes([payload[0], payload[1], payload[2], payload[3]]);
        let body = &payload[4..];
        if status != 0 {
            if body.len() > MAX_MESSAGE {
                return Err(DecodeError::BadLength {
                    kind: k,
                    expected: MAX_MESSAGE,
                    got: body.len(),
                });
            }
            let message = std::str::from_utf8(body).map_err(|_| DecodeError::BadText)?;
            return Ok(Reply::Error {
                code: ErrorCode::from_u32(status),
                message: message.to_string(),
            });
        }
        Ok(match request_kind {
            kind::HELLO => {
                let mut r = expect_len(k, body, 32)?;
                let version = r.u16();
                let asid = r.u16();
                let client_id = r.u32();
                let max_in_flight = r.u32();
                let max_arenas = r.u32();
                Reply::Hello {
                    version,
                    client_id,
                    asid,
                    limits: ClientLimits {
                        max_in_flight,
                        max_arenas,
                        max_mapped_bytes: r.u64(),
                        max_arena_bytes: r.u64(),
                    },
                }
            }
            kind::REGISTER_ARENA => {
                let mut r = expect_len(k, body, 4)?;
                Reply::Arena {
                    writable: r.u32() != 0,
                }
            }
            kind::SUBMIT => {
                expect_len(k, body, 0)?;
                Reply::Submitted
            }
            kind::STATS => {
                if body.len() < 4 {
                    return Err(DecodeError::BadLength {
                        kind: k,
                        expected: 4,
                        got: body.len(),
                    });
                }
                let n = u32::from_le_bytes([body[0], body[1], body[2], body[3]]) as usize;
                let mut r = expect_len(k, &body[4..], n.saturating_mul(8))?;
                let fields: Vec<u64> = (0..n).map(|_| r.u64()).collect();
                Reply::Stats(StatsReply::from_fields(&fields))
            }
            kind::UNREGISTER_ARENA | kind::GOODBYE => {
                expect_len(k, body, 0)?;
                Reply::Done
            }
            kind::INVALIDATE => {
                expect_len(k, body, 0)?;
                Reply::Done
            }
            other => return Err(DecodeError::UnknownKind(other | REPLY)),
        })
    }
}

/// A command's completion, as the daemon reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompletionEvent {
    /// The submit's tag.
    pub tag: u64,
    /// `accel_abi::Status` as u32.
    pub status: u32,
    /// Result value or detail.
    pub result: u64,
}

impl CompletionEvent {
    /// Payload size.
    pub const SIZE: usize = 24;

    /// Encode.
    pub fn encode(&self) -> Vec<u8> {
        let mut p = Vec::with_capacity(Self::SIZE);
        p.extend_from_slice(&self.tag.to_le_bytes());
        p.extend_from_slice(&self.status.to_le_bytes());
        p.extend_from_slice(&0u32.to_le_bytes());
        p.extend_from_slice(&self.result.to_le_bytes());
        p
    }

    /// Decode.
    pub fn decode(payload: &[u8]) -> Result<CompletionEvent, DecodeError> {
        let mut r = expect_len(kind::COMPLETION, payload, Self::SIZE)?;
        let tag = r.u64();
        let status = r.u32();
        if r.u32() != 0 {
            return Err(DecodeError::Reserved(kind::COMPLETION));
        }
        Ok(CompletionEvent {
            tag,
            status,
            result: r.u64(),
        })
    }
}

/// The [`kind::DEVICE_LOST`] notice: which device was lost and why. Payload: the backend's
/// name length (u32), the device's name length (u32), the backend name, the device name,
/// then the reason to the end, all UTF-8; at most [`MAX_MESSAGE`] bytes of text in all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceLostNotice {
    /// The backend ("vfio-user", "kernel-vfio", "emulated").
    pub backend: String,
    /// The device (a socket path, a PCI address).
    pub device: String,
    /// What happened.
    pub reason: String,
}

fn cut(text: &str, max: usize) -> &str {
    let mut at = text.len().min(max);
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    &text[..at]
}

impl DeviceLostNotice {
    /// From the driver's loss report.
    pub fn new(lost: &DeviceLost) -> DeviceLostNotice {
        DeviceLostNotice {
            backend: lost.backend.to_string(),
            device: lost.device.clone(),
            reason: lost.reason.clone(),
        }
    }

    /// The loss as the driver reports it; a backend name this build does not know reads as
    /// "unknown backend".
    pub fn to_lost(&self) -> DeviceLost {
        let backend = match self.backend.as_str() {
            "vfio-user" => "vfio-user",
            "kernel-vfio" => "kernel-vfio",
            "emulated" => "emulated",
            _ => "unknown backend",
        };
        DeviceLost {
            backend,
            device: self.device.clone(),
            reason: self.reason.clone(),
        }
    }

    /// Encode, cutting the names and the reason to fit [`MAX_MESSAGE`].
    pub fn encode(&self) -> Vec<u8> {
        let backend = cut(&self.backend, 64);
        let device = cut(&self.device, MAX_MESSAGE / 2);
        let reason = cut(&self.reason, MAX_MESSAGE - backend.len() - device.len());
        let mut p = Vec::with_capacity(8 + MAX_MESSAGE);
        p.extend_from_slice(&(backend.len() as u32).to_le_bytes());
        p.extend_from_slice(&(device.len() as u32).to_le_bytes());
        p.extend_from_slice(backend.as_bytes());
        p.extend_from_slice(device.as_bytes());
        p.extend_from_slice(reason.as_bytes());
        p
    }

    /// Decode.
    pub fn decode(payload: &[u8]) -> Result<DeviceLostNotice, DecodeError> {
        let bad = |got| DecodeError::BadLength {
            kind: kind::DEVICE_LOST,
            expected: 8,
            got,
        };
        if payload.len() < 8 || payload.len() > 8 + MAX_MESSAGE {
            return Err(bad(payload.len()));
        }
        let mut r = Reader { b: payload, at: 0 };
        let (b, d) = (r.u32() as usize, r.u32() as usize);
        let text = &payload[8..];
        if b.saturating_add(d) > text.len() {
            return Err(bad(payload.len()));
        }
        let utf8 = |bytes: &[u8]| {
            std::str::from_utf8(bytes)
                .map(str::to_string)
                .map_err(|_| DecodeError::BadText)
        };
        Ok(DeviceLostNotice {
            backend: utf8(&text[..b])?,
            device: utf8(&text[b..b + d])?,
            reason: utf8(&text[b + d..])?,
        })
    }
}

/// A whole frame: header then payload.
pub fn frame(kind: u16, id: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_SIZE + payload.len());
    out.extend_from_slice(
        &Header {
            kind,
            id,
            len: payload.len() as u32,
        }
        .encode(),
    );
    out.extend_from_slice(payload);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn op_strategy() -> impl Strategy<Value = Op> {
        let a = any::<u64>();
        prop_oneof![
            (a, a, a).prop_map(|(dst, src, len)| Op::Copy { dst, src, len }),
            (a, a, a).prop_map(|(dst, len, pattern)| Op::Fill { dst, len, pattern }),
            (a, a).prop_map(|(dst, value)| Op::AtomicAdd { dst, value }),
            (a, a).prop_map(|(src, len)| Op::Checksum { src, len }),
            (a, a).prop_map(|(src, len)| Op::Prefetch { src, len }),
        ]
    }

    fn request_strategy() -> impl Strategy<Value = Request> {
        prop_oneof![
            (any::<u16>(), any::<u16>()).prop_map(|(min_version, max_version)| Request::Hello {
                min_version,
                max_version
            }),
            (any::<u64>(), any::<u64>(), any::<u64>())
                .prop_map(|(va, len, offset)| Request::RegisterArena { va, len, offset }),
            any::<u64>().prop_map(|va| Request::UnregisterArena { va }),
            (any::<u64>(), op_strategy()).prop_map(|(tag, op)| Request::Submit { tag, op }),
            Just(Request::Stats),
            Just(Request::Goodbye),
            (any::<u64>(), any::<u64>()).prop_map(|(va, len)| Request::Invalidate { va, len }),
        ]
    }

    proptest! {
        #[test]
        fn requests_round_trip(req in request_strategy()) {
            let (k, payload) = req.encode();
            prop_assert_eq!(Request::decode(k, &payload), Ok(req));
        }

        #[test]
        fn arbitrary_bytes_never_panic(k in any::<u16>(), payload in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = Request::decode(k, &payload);
            let _ = Reply::decode(k, &payload);
            let _ = CompletionEvent::decode(&payload);
            if payload.len() >= HEADER_SIZE {
                let mut h = [0u8; HEADER_SIZE];
                h.copy_from_slice(&payload[..HEADER_SIZE]);
                let _ = Header::decode(&h);
            }
        }

        #[test]
        fn stats_round_trip(f in proptest::collection::vec(any::<u64>(), 20)) {
            let s = StatsReply::from_fields(&f);
            let r = Reply::Stats(s);
            prop_assert_eq!(Reply::decode(kind::STATS, &r.encode()), Ok(r));
        }
    }

    #[test]
    fn device_lost_notices_round_trip_and_fit_the_message_limit() {
        let lost = DeviceLost {
            backend: "vfio-user",
            device: "/run/mxa.sock".into(),
            reason: "connection to the server lost: ECONNRESET".into(),
        };
        let n = DeviceLostNotice::new(&lost);
        let back = DeviceLostNotice::decode(&n.encode()).unwrap();
        assert_eq!(back, n);
        assert_eq!(back.to_lost(), lost);
        let long = DeviceLostNotice {
            backend: "b".repeat(100),
            device: "d".repeat(5000),
            reason: "é".repeat(5000),
        };
        let p = long.encode();
        assert!(p.len() <= 8 + MAX_MESSAGE);
        let back = DeviceLostNotice::decode(&p).unwrap();
        assert_eq!(back.to_lost().backend, "unknown backend");
        assert!(!back.reason.is_empty() && !back.device.is_empty());
        // Lengths past the payload, bad UTF-8, too short: refused.
        let mut bad = n.encode();
        bad[0] = 0xff;
        assert!(DeviceLostNotice::decode(&bad).is_err());
        let mut bad = n.encode();
        bad[8] = 0xff;
        assert_eq!(DeviceLostNotice::decode(&bad), Err(DecodeError::BadText));
        assert!(DeviceLostNotice::decode(&[0; 7]).is_err());
    }

    #[test]
    fn header_checks_magic_version_and_length() {
        let h = Header {
            kind: kind::SUBMIT,
            id: 7,
            len: 40,
        };
        assert_eq!(Header::decode(&h.encode()), Ok(h));
        let mut bad = h.encode();
        bad[0] = b'X';
        assert!(matches!(
            Header::decode(&bad),
            Err(DecodeError::BadMagic(_))
        ));
        let mut v2 = h.encode();
        v2[4] = 2;
        assert_eq!(Header::decode(&v2), Err(DecodeError::Version { got: 2 }));
        let big = Header {
            len: MAX_PAYLOAD + 1,
            ..h
        };
        assert_eq!(
            Header::decode(&big.encode()),
            Err(DecodeError::TooLarge {
                len: MAX_PAYLOAD + 1
            })
        );
        assert_eq!(Header::decode_lenient(&big.encode()), Ok(big));
    }

    #[test]
    fn replies_round_trip() {
        let limits = ClientLimits {
            max_in_flight: 32,
            max_mapped_bytes: 1 << 28,
            max_arenas: 64,
            max_arena_bytes: 1 << 32,
        };
        for (k, r) in [
            (
                kind::HELLO,
                Reply::Hello {
                    version: 1,
                    client_id: 9,
                    asid: 3,
                    limits,
                },
            ),
            (kind::REGISTER_ARENA, Reply::Arena { writable: true }),
            (kind::SUBMIT, Reply::Submitted),
            (kind::GOODBYE, Reply::Done),
            (kind::INVALIDATE, Reply::Done),
            (
                kind::SUBMIT,
                Reply::error(ErrorCode::Limit, "in-flight commands per client is 32"),
            ),
        ] {
            assert_eq!(Reply::decode(k, &r.encode()), Ok(r));
        }
        let e = CompletionEvent {
            tag: 5,
            status: 2,
            result: 9,
        };
        assert_eq!(CompletionEvent::decode(&e.encode()), Ok(e));
    }

    #[test]
    fn malformed_payloads_are_refused() {
        assert!(matches!(
            Request::decode(kind::SUBMIT, &[0u8; 39]),
            Err(DecodeError::BadLength { .. })
        ));
        let (k, mut p) = Request::Submit {
            tag: 1,
            op: Op::Checksum { src: 0, len: 8 },
        }
        .encode();
        p[8] = 99;
        assert_eq!(Request::decode(k, &p), Err(DecodeError::BadOpcode(99)));
        assert_eq!(
            Request::decode(0x77, &[]),
            Err(DecodeError::UnknownKind(0x77))
        );
        let long = Reply::error(ErrorCode::Internal, "x".repeat(5000));
        assert!(matches!(long, Reply::Error { ref message, .. } if message.len() == MAX_MESSAGE));
    }
}
