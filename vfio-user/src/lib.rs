//! The vfio-user protocol, as specified in QEMU's `docs/interop/vfio-user.rst`, shared by the
//! driver's client backend and the emulated device's server.
//!
//! - [`Header`]: the 16-byte header every message starts with;
//! - [`payload`]: the payload of every message type we use, with encode/decode;
//! - [`version`]: VERSION negotiation and its JSON capabilities;
//! - [`calls`]: outstanding requests matched to replies by message id;
//! - [`framing`]: messages over a `UnixStream` with file descriptors by `SCM_RIGHTS`, the
//!   header's message size always honoured, limits on size and fd count enforced before any
//!   allocation.
//!
//! Decoding never panics on peer input: every length is checked, every error is a value.
#![deny(missing_docs)]

pub mod calls;
pub mod framing;
pub mod json;
pub mod payload;
pub mod version;

pub use calls::{CallError, Calls};
pub use framing::{Connection, Limits, Message, RecvError};

/// Size of the message header.
pub const HEADER_SIZE: usize = 16;

/// Command numbers (spec section "Commands").
pub mod command {
    /// VFIO_USER_VERSION.
    pub const VERSION: u16 = 1;
    /// VFIO_USER_DMA_MAP.
    pub const DMA_MAP: u16 = 2;
    /// VFIO_USER_DMA_UNMAP.
    pub const DMA_UNMAP: u16 = 3;
    /// VFIO_USER_DEVICE_GET_INFO.
    pub const DEVICE_GET_INFO: u16 = 4;
    /// VFIO_USER_DEVICE_GET_REGION_INFO.
    pub const DEVICE_GET_REGION_INFO: u16 = 5;
    /// VFIO_USER_DEVICE_GET_REGION_IO_FDS (not implemented: answered ENOSYS).
    pub const DEVICE_GET_REGION_IO_FDS: u16 = 6;
    /// VFIO_USER_DEVICE_GET_IRQ_INFO.
    pub const DEVICE_GET_IRQ_INFO: u16 = 7;
    /// VFIO_USER_DEVICE_SET_IRQS.
    pub const DEVICE_SET_IRQS: u16 = 8;
    /// VFIO_USER_REGION_READ.
    pub const REGION_READ: u16 = 9;
    /// VFIO_USER_REGION_WRITE.
    pub const REGION_WRITE: u16 = 10;
    /// VFIO_USER_DMA_READ (server -> client).
    pub const DMA_READ: u16 = 11;
    /// VFIO_USER_DMA_WRITE (server -> client).
    pub const DMA_WRITE: u16 = 12;
    /// VFIO_USER_DEVICE_RESET.
    pub const DEVICE_RESET: u16 = 13;
}

/// Message type in the header's flags (bits 0-3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageType {
    /// A command.
    Command,
    /// A reply to a command with the same message id.
    Reply,
    /// Any other value (invalid).
    Other(u8),
}

/// Header flag bits.
pub mod flags {
    /// Mask of the type bits.
    pub const TYPE_MASK: u32 = 0xf;
    /// Type: command.
    pub const TYPE_COMMAND: u32 = 0;
    /// Type: reply.
    pub const TYPE_REPLY: u32 = 1;
    /// The sender wants no reply.
    pub const NO_REPLY: u32 = 1 << 4;
    /// The reply reports an error (errno in the header's error field).
    pub const ERROR: u32 = 1 << 5;
}

/// The 16-byte message header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Message id, chosen by the sender of a command and echoed in its reply.
    pub id: u16,
    /// Command number.
    pub command: u16,
    /// Size of the whole message including this header.
    pub size: u32,
    /// Flags (type, no-reply, error).
    pub flags: u32,
    /// errno of an error reply.
    pub error: u32,
}

impl Header {
    /// The header of a command carrying `payload_len` bytes.
    pub fn command(id: u16, command: u16, payload_len: usize) -> Header {
        Header {
            id,
            command,
            size: (HEADER_SIZE + payload_len) as u32,
            flags: flags::TYPE_COMMAND,
            error: 0,
        }
    }

    /// The header of a successful reply to `request` carrying `payload_len` bytes.
    pub fn reply(request: &Header, payload_len: usize) -> Header {
        Header {
            id: request.id,
            command: request.command,
            size: (HEADER_SIZE + payload_len) as u32,
            flags: flags::TYPE_REPLY,
            error: 0,
        }
    }

    /// A header-only error reply to `request` with `errno`.
    pub fn error_reply(request: &Header, errno: i32) -> Header {
        Header {
            id: request.id,
            command: request.command,
            size: HEADER_SIZE as u32,
            flags: flags::TYPE_REPLY | flags::ERROR,
            error: errno as u32,
        }
    }

    /// Message type.
    pub fn message_type(&self) -> MessageType {
        match self.flags & flags::TYPE_MASK {
            flags::TYPE_COMMAND => MessageType::Command,
            flags::TYPE_REPLY => MessageType::Reply,
            other => MessageType::Other(other as u8),
        }
    }

    /// True if the sender asked for no reply.
    pub fn no_reply(&self) -> bool {
        self.flags & flags::NO_REPLY != 0
    }

    /// True if this is an error reply.
    pub fn is_error(&self) -> bool {
        self.flags & flags::ERROR != 0
    }

    /// Payload length the header declares (None if the size is smaller than a header).
    pub fn payload_len(&self) -> Option<usize> {
        (self.size as usize).checked_sub(HEADER_SIZE)
    }

    /// Encode (host endianness, as the spec prescribes; little-endian on every host we run).
    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..2].copy_from_slice(&self.id.to_ne_bytes());
        b[2..4].copy_from_slice(&self.command.to_ne_bytes());
        b[4..8].copy_from_slice(&self.size.to_ne_bytes());
        b[8..12].copy_from_slice(&self.flags.to_ne_bytes());
        b[12..16].copy_from_slice(&self.error.to_ne_bytes());
        b
    }

    /// Decode.
    pub fn decode(b: &[u8; HEADER_SIZE]) -> Header {
        let u16_at = |o: usize| u16::from_ne_bytes([b[o], b[o + 1]]);
        let u32_at = |o: usize| u32::from_ne_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        Header {
            id: u16_at(0),
            command: u16_at(2),
            size: u32_at(4),
            flags: u32_at(8),
            error: u32_at(12),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn header_round_trips(id: u16, command: u16, size: u32, fl: u32, error: u32) {
            let h = Header { id, command, size, flags: fl, error };
            prop_assert_eq!(Header::decode(&h.encode()), h);
        }
    }

    #[test]
    fn error_reply_is_header_only() {
        let req = Header::command(7, command::REGION_READ, 16);
        let e = Header::error_reply(&req, libc::EINVAL);
        assert_eq!(e.size as usize, HEADER_SIZE);
        assert_eq!(e.message_type(), MessageType::Reply);
        assert!(e.is_error());
        assert_eq!(e.id, 7);
        assert_eq!(e.error, libc::EINVAL as u32);
    }
}
