//! VERSION negotiation: the client proposes a version and capabilities, the server answers with
//! the same major, a minor no higher than proposed and capabilities it accepts.

use crate::json::{self, Value};
use crate::payload::DecodeError;

/// Major version we speak.
pub const MAJOR: u16 = 0;
/// Highest minor version we speak (0.2); 0.1 and 0.0 peers are accepted.
pub const MINOR: u16 = 2;
/// Default `max_data_xfer_size` (spec).
pub const DEFAULT_MAX_DATA_XFER: u32 = 1 << 20;
/// Default `max_dma_maps` (spec). Also the most QEMU's client accepts in a VERSION reply
/// (`hw/vfio-user/proxy.c`, `check_max_dma`: "max_dma_maps too large"), and what it proposes.
pub const DEFAULT_MAX_DMA_MAPS: u32 = 65535;
/// Longest capabilities JSON we accept.
pub const MAX_JSON: usize = 4096;

/// Which capabilities a VERSION message names. A reply may name only what the proposal named
/// (spec: "The capability list must be a subset of those proposed"); a capability a message
/// leaves out takes the spec's default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CapSet(u8);

impl CapSet {
    /// `max_msg_fds`.
    pub const MAX_MSG_FDS: CapSet = CapSet(1 << 0);
    /// `max_data_xfer_size`.
    pub const MAX_DATA_XFER_SIZE: CapSet = CapSet(1 << 1);
    /// `pgsizes`.
    pub const PGSIZES: CapSet = CapSet(1 << 2);
    /// `max_dma_maps`.
    pub const MAX_DMA_MAPS: CapSet = CapSet(1 << 3);
    /// `twin_socket`.
    pub const TWIN_SOCKET: CapSet = CapSet(1 << 4);
    /// `write_multiple`.
    pub const WRITE_MULTIPLE: CapSet = CapSet(1 << 5);
    /// The four numbers.
    pub const NUMBERS: CapSet = CapSet(0b1111);

    /// No capability.
    pub const fn empty() -> CapSet {
        CapSet(0)
    }

    /// True if every capability of `other` is in `self`.
    pub const fn contains(self, other: CapSet) -> bool {
        self.0 & other.0 == other.0
    }

    /// Both sets.
    pub const fn union(self, other: CapSet) -> CapSet {
        CapSet(self.0 | other.0)
    }

    /// What both sets hold.
    pub const fn intersection(self, other: CapSet) -> CapSet {
        CapSet(self.0 & other.0)
    }

    /// `self` with `other` added if `add`.
    const fn with_if(self, other: CapSet, add: bool) -> CapSet {
        if add {
            self.union(other)
        } else {
            self
        }
    }
}

/// Capabilities one side announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Most fds the sender can receive in one message (default 1).
    pub max_msg_fds: u32,
    /// Largest `count` of a REGION/DMA read or write (default 1 MiB).
    pub max_data_xfer_size: u32,
    /// DMA page sizes, or'ed (default 4 KiB).
    pub pgsizes: u64,
    /// Most DMA mappings at once (default 65535).
    pub max_dma_maps: u32,
    /// REGION_WRITE_MULTI supported (we never use it).
    pub write_multiple: bool,
    /// `twin_socket.supported`: in a proposal, the client takes server-to-client commands on a
    /// second socket; in a reply, the server enabled that mode.
    pub twin_socket: bool,
    /// `twin_socket.fd_index` (a reply only): the index, in the reply's descriptors, of the
    /// client end of the server-to-client command socket.
    pub twin_socket_fd_index: Option<u32>,
}

impl Default for Capabilities {
    /// The spec's defaults when a capability is absent.
    fn default() -> Self {
        Capabilities {
            max_msg_fds: 1,
            max_data_xfer_size: DEFAULT_MAX_DATA_XFER,
            pgsizes: 4096,
            max_dma_maps: DEFAULT_MAX_DMA_MAPS,
            write_multiple: false,
            twin_socket: false,
            twin_socket_fd_index: None,
        }
    }
}

impl Capabilities {
    /// The JSON naming the capabilities in `named`.
    fn to_json(self, named: CapSet) -> String {
        let mut fields = Vec::new();
        if named.contains(CapSet::MAX_MSG_FDS) {
            fields.push(format!("\"max_msg_fds\":{}", self.max_msg_fds));
        }
        if named.contains(CapSet::MAX_DATA_XFER_SIZE) {
            fields.push(format!(
                "\"max_data_xfer_size\":{}",
                self.max_data_xfer_size
            ));
        }
        if named.contains(CapSet::PGSIZES) {
            fields.push(format!("\"pgsizes\":{}", self.pgsizes));
        }
        if named.contains(CapSet::MAX_DMA_MAPS) {
            fields.push(format!("\"max_dma_maps\":{}", self.max_dma_maps));
        }
        if named.contains(CapSet::TWIN_SOCKET) {
            let index = self
                .twin_socket_fd_index
                .map(|i| format!(",\"fd_index\":{i}"))
                .unwrap_or_default();
            fields.push(format!(
                "\"twin_socket\":{{\"supported\":{}{index}}}",
                self.twin_socket
            ));
        }
        if named.contains(CapSet::WRITE_MULTIPLE) {
            fields.push(format!("\"write_multiple\":{}", self.write_multiple));
        }
        format!("{{\"capabilities\":{{{}}}}}", fields.join(","))
    }

    /// The capabilities in `v` and which of them it names.
    fn from_json(v: &Value) -> Result<(Capabilities, CapSet), DecodeError> {
        let mut c = Capabilities::default();
        let mut named = CapSet::empty();
        let Some(caps) = v.get("capabilities") else {
            return Ok((c, named));
        };
        if !matches!(caps, Value::Object(_)) {
            return Err(DecodeError::Invalid("capabilities"));
        }
        let num = |obj: &Value, name: &'static str, max: u64| -> Result<Option<u64>, DecodeError> {
            match obj.get(name) {
                None => Ok(None),
                Some(v) => v
                    .as_u64()
                    .filter(|n| *n <= max)
                    .map(Some)
                    .ok_or(DecodeError::Invalid(name)),
            }
        };
        if let Some(n) = num(caps, "max_msg_fds", u32::MAX.into())? {
            c.max_msg_fds = n as u32;
            named = named.union(CapSet::MAX_MSG_FDS);
        }
        if let Some(n) = num(caps, "max_data_xfer_size", u32::MAX.into())? {
            c.max_data_xfer_size = n as u32;
            named = named.union(CapSet::MAX_DATA_XFER_SIZE);
        }
        if let Some(n) = num(caps, "pgsizes", u64::MAX)? {
            c.pgsizes = n;
            named = named.union(CapSet::PGSIZES);
        }
        if let Some(n) = num(caps, "max_dma_maps", u32::MAX.into())? {
            c.max_dma_maps = n as u32;
            named = named.union(CapSet::MAX_DMA_MAPS);
        }
        if let Some(w) = caps.get("write_multiple") {
            c.write_multiple = w.as_bool().ok_or(DecodeError::Invalid("write_multiple"))?;
            named = named.union(CapSet::WRITE_MULTIPLE);
        }
        if let Some(twin) = caps.get("twin_socket") {
            if !matches!(twin, Value::Object(_)) {
                return Err(DecodeError::Invalid("twin_socket"));
            }
            c.twin_socket = match twin.get("supported") {
                None => false,
                Some(s) => s
                    .as_bool()
                    .ok_or(DecodeError::Invalid("twin_socket.supported"))?,
            };
            c.twin_socket_fd_index = num(twin, "fd_index", u32::MAX.into())?.map(|i| i as u32);
            named = named.union(CapSet::TWIN_SOCKET);
        }
        Ok((c, named))
    }
}

/// The VERSION payload (request and reply).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Version {
    /// Major.
    pub major: u16,
    /// Minor.
    pub minor: u16,
    /// Capabilities (spec defaults where the JSON is absent or omits them).
    pub caps: Capabilities,
    /// The capabilities the message names (decoded: those its JSON has; encoded: those its
    /// JSON gets).
    pub named: CapSet,
}

impl Version {
    /// Our proposal (client) with `caps`: every number, and `twin_socket` and
    /// `write_multiple` when they are true.
    pub fn ours(caps: Capabilities) -> Version {
        Version {
            major: MAJOR,
            minor: MINOR,
            caps,
            named: CapSet::NUMBERS
                .with_if(CapSet::TWIN_SOCKET, caps.twin_socket)
                .with_if(CapSet::WRITE_MULTIPLE, caps.write_multiple),
        }
    }

    /// Encode with the JSON capabilities and its terminating NUL.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&self.major.to_ne_bytes());
        v.extend_from_slice(&self.minor.to_ne_bytes());
        v.extend_from_slice(self.caps.to_json(self.named).as_bytes());
        v.push(0);
        v
    }

    /// Decode; the JSON is optional (absent, empty or only NULs), must be UTF-8 JSON otherwise.
    pub fn decode(b: &[u8]) -> Result<Version, DecodeError> {
        if b.len() < 4 {
            return Err(DecodeError::Short {
                got: b.len(),
                need: 4,
            });
        }
        let major = u16::from_ne_bytes([b[0], b[1]]);
        let minor = u16::from_ne_bytes([b[2], b[3]]);
        let mut text = &b[4..];
        if text.len() > MAX_JSON {
            return Err(DecodeError::Invalid("version data too long"));
        }
        while let [rest @ .., 0] = text {
            text = rest;
        }
        let (caps, named) = if text.is_empty() {
            (Capabilities::default(), CapSet::empty())
        } else {
            let s = std::str::from_utf8(text).map_err(|_| DecodeError::Invalid("version data"))?;
            let v = json::parse(s).map_err(|_| DecodeError::Invalid("version data"))?;
            Capabilities::from_json(&v)?
        };
        Ok(Version {
            major,
            minor,
            caps,
            named,
        })
    }
}

/// Server side: the reply to a client's `proposed` version, given what we can receive and do
/// (`ours`; `ours.twin_socket`: we can run twin-socket mode), or the errno to refuse with (then
/// close the connection).
///
/// The reply names only capabilities the proposal named (a subset, as the spec requires); one
/// the client left out keeps its default on both sides. `max_dma_maps` is the smaller of ours
/// (the server's map limit) and the proposal: a client's proposal is the most it accepts (QEMU
/// proposes 65535 and closes the connection on a larger answer), so the answer never exceeds
/// what the server enforces nor what the client takes. Twin-socket mode is enabled when both
/// sides support it; the reply's `twin_socket.fd_index` is then 0: the caller sends the client
/// end of the new socket pair as the reply's first (only) descriptor.
pub fn server_reply(ours: &Capabilities, proposed: &Version) -> Result<Version, i32> {
    if proposed.major != MAJOR {
        return Err(libc::ENOTSUP);
    }
    let pgsizes = ours.pgsizes & proposed.caps.pgsizes;
    if pgsizes == 0 {
        return Err(libc::ENOTSUP);
    }
    let twin = ours.twin_socket && proposed.caps.twin_socket;
    Ok(Version {
        major: MAJOR,
        minor: proposed.minor.min(MINOR),
        caps: Capabilities {
            max_msg_fds: ours.max_msg_fds,
            max_data_xfer_size: ours
                .max_data_xfer_size
                .min(proposed.caps.max_data_xfer_size),
            pgsizes,
            max_dma_maps: ours.max_dma_maps.min(proposed.caps.max_dma_maps),
            write_multiple: false,
            twin_socket: twin,
            twin_socket_fd_index: twin.then_some(0),
        },
        named: proposed
            .named
            .intersection(CapSet::NUMBERS.union(CapSet::TWIN_SOCKET)),
    })
}

/// Client side: check the server's `reply` to `proposed`, which came with `reply_fds`
/// descriptors. `Ok(Some(i))`: twin-socket mode was negotiated and descriptor `i` of the reply
/// is the server-to-client command socket.
pub fn check_reply(
    proposed: &Version,
    reply: &Version,
    reply_fds: usize,
) -> Result<Option<usize>, String> {
    if reply.major != proposed.major {
        return Err(format!("server answered major version {}", reply.major));
    }
    if reply.minor > proposed.minor {
        return Err(format!(
            "server answered minor version {} > proposed {}",
            reply.minor, proposed.minor
        ));
    }
    if !reply.caps.twin_socket {
        return Ok(None);
    }
    if !proposed.caps.twin_socket {
        return Err("server enabled twin-socket mode, which we did not propose".into());
    }
    // The spec: supported but no valid fd_index is inconsistent, and the client must close
    // the connection (it could not receive the server's commands).
    match reply.caps.twin_socket_fd_index {
        Some(i) if (i as usize) < reply_fds => Ok(Some(i as usize)),
        index => Err(format!(
            "server enabled twin-socket mode without a valid descriptor (fd_index {index:?}, \
             {reply_fds} descriptor(s) in the reply)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proposal(minor: u16, caps: Capabilities) -> Version {
        Version {
            minor,
            ..Version::ours(caps)
        }
    }

    /// The capability names in an encoded VERSION's JSON.
    fn names_in(v: &Version) -> Vec<&'static str> {
        let text = String::from_utf8(v.encode()[4..].to_vec()).unwrap();
        [
            "max_msg_fds",
            "max_data_xfer_size",
            "pgsizes",
            "max_dma_maps",
            "twin_socket",
            "write_multiple",
        ]
        .into_iter()
        .filter(|n| text.contains(&format!("\"{n}\"")))
        .collect()
    }

    #[test]
    fn round_trip_and_defaults() {
        let caps = Capabilities {
            max_msg_fds: 8,
            max_data_xfer_size: 65536,
            pgsizes: 4096,
            max_dma_maps: 1000,
            ..Default::default()
        };
        let v = Version::ours(caps);
        assert_eq!(Version::decode(&v.encode()).unwrap(), v);
        let twin = Version::ours(Capabilities {
            twin_socket: true,
            twin_socket_fd_index: Some(2),
            ..caps
        });
        assert_eq!(Version::decode(&twin.encode()).unwrap(), twin);
        // A 0.1 peer without JSON: spec defaults, nothing named.
        let bare = Version::decode(&[0, 0, 1, 0]).unwrap();
        assert_eq!((bare.major, bare.minor), (0, 1));
        assert_eq!(bare.caps, Capabilities::default());
        assert_eq!(bare.named, CapSet::empty());
        assert_eq!(
            Version::decode(&[0, 0, 1, 0, 0]).unwrap().caps,
            Capabilities::default()
        );
    }

    #[test]
    fn negotiation_rules() {
        let ours = Capabilities {
            max_msg_fds: 8,
            ..Default::default()
        };
        let old = proposal(1, Capabilities::default());
        let r = server_reply(&ours, &old).unwrap();
        assert_eq!(r.minor, 1);
        assert_eq!(check_reply(&old, &r, 0), Ok(None));
        let newer = proposal(9, Capabilities::default());
        assert_eq!(server_reply(&ours, &newer).unwrap().minor, MINOR);
        let other_major = Version { major: 1, ..old };
        assert_eq!(server_reply(&ours, &other_major), Err(libc::ENOTSUP));
        let too_new = Version { minor: 3, ..r };
        assert!(check_reply(&old, &too_new, 0).is_err());
    }

    /// The reply names a subset of what was proposed: a client naming only `max_msg_fds` is
    /// told only that; a bare 0.1 proposal gets no capability at all.
    #[test]
    fn the_reply_names_only_proposed_capabilities() {
        let ours = Capabilities {
            max_msg_fds: 8,
            max_dma_maps: 1 << 20,
            twin_socket: true,
            ..Default::default()
        };
        let mut b = vec![0, 0, 2, 0];
        b.extend_from_slice(br#"{"capabilities":{"max_msg_fds":4}}"#);
        let only_fds = Version::decode(&b).unwrap();
        assert_eq!(only_fds.named, CapSet::MAX_MSG_FDS);
        let r = server_reply(&ours, &only_fds).unwrap();
        assert_eq!(names_in(&r), ["max_msg_fds"]);
        assert_eq!(Version::decode(&r.encode()).unwrap().caps.max_msg_fds, 8);
        let bare = Version::decode(&[0, 0, 1, 0]).unwrap();
        assert!(names_in(&server_reply(&ours, &bare).unwrap()).is_empty());
        // Our own proposal names every number, so our client hears them all.
        let full = server_reply(&ours, &Version::ours(Capabilities::default())).unwrap();
        assert_eq!(
            names_in(&full),
            [
                "max_msg_fds",
                "max_data_xfer_size",
                "pgsizes",
                "max_dma_maps"
            ]
        );
        // A proposal's write_multiple is not answered (we do not support it).
        let wm = Version::ours(Capabilities {
            write_multiple: true,
            ..Default::default()
        });
        assert!(!names_in(&server_reply(&ours, &wm).unwrap()).contains(&"write_multiple"));
    }

    #[test]
    fn twin_socket_is_enabled_only_when_proposed() {
        let server = Capabilities {
            twin_socket: true,
            ..Default::default()
        };
        let plain = Version::ours(Capabilities::default());
        let r = server_reply(&server, &plain).unwrap();
        assert!(!r.caps.twin_socket);
        assert!(!names_in(&r).contains(&"twin_socket"));
        let twin = Version::ours(Capabilities {
            twin_socket: true,
            ..Default::default()
        });
        let r = server_reply(&server, &twin).unwrap();
        assert!(r.caps.twin_socket);
        assert_eq!(r.caps.twin_socket_fd_index, Some(0));
        let r = Version::decode(&r.encode()).unwrap();
        assert_eq!(check_reply(&twin, &r, 1), Ok(Some(0)));
        // A server that cannot: the client proposing it is told "not supported".
        let r = server_reply(&Capabilities::default(), &twin).unwrap();
        assert!(!r.caps.twin_socket);
        assert_eq!(check_reply(&twin, &r, 0), Ok(None));
    }

    #[test]
    fn inconsistent_twin_socket_replies_are_refused() {
        let twin = Version::ours(Capabilities {
            twin_socket: true,
            ..Default::default()
        });
        let reply = |fd_index| Version {
            caps: Capabilities {
                twin_socket: true,
                twin_socket_fd_index: fd_index,
                ..Default::default()
            },
            ..twin
        };
        // Supported without an index, or an index past the descriptors sent: abort.
        assert!(check_reply(&twin, &reply(None), 1).is_err());
        assert!(check_reply(&twin, &reply(Some(1)), 1).is_err());
        assert!(check_reply(&twin, &reply(Some(0)), 0).is_err());
        // Enabled although we did not propose it.
        let plain = Version::ours(Capabilities::default());
        let err = check_reply(&plain, &reply(Some(0)), 1).unwrap_err();
        assert!(err.contains("did not propose"), "{err}");
    }

    #[test]
    fn max_dma_maps_answer_is_the_smaller_limit() {
        let ours = Capabilities {
            max_dma_maps: 1 << 20,
            ..Default::default()
        };
        let propose = |max_dma_maps| {
            Version::ours(Capabilities {
                max_dma_maps,
                ..Default::default()
            })
        };
        // QEMU's proposal: it is told its own ceiling.
        let qemu = server_reply(&ours, &propose(DEFAULT_MAX_DMA_MAPS)).unwrap();
        assert_eq!(qemu.caps.max_dma_maps, DEFAULT_MAX_DMA_MAPS);
        assert_eq!(
            Version::decode(&qemu.encode()).unwrap().caps.max_dma_maps,
            DEFAULT_MAX_DMA_MAPS
        );
        // A client that takes more is told the server's limit.
        let big = server_reply(&ours, &propose(u32::MAX)).unwrap();
        assert_eq!(big.caps.max_dma_maps, 1 << 20);
        assert_eq!(
            Version::decode(&big.encode()).unwrap().caps.max_dma_maps,
            1 << 20
        );
        // A client that does not name it assumes 65535 and is not told more.
        let mut b = vec![0, 0, 2, 0];
        b.extend_from_slice(br#"{"capabilities":{"pgsizes":4096}}"#);
        let silent = server_reply(&ours, &Version::decode(&b).unwrap()).unwrap();
        assert_eq!(
            Version::decode(&silent.encode()).unwrap().caps.max_dma_maps,
            DEFAULT_MAX_DMA_MAPS
        );
    }

    #[test]
    fn malformed_capabilities_are_refused() {
        for bad in [
            &br#"{"capabilities":{"max_msg_fds":-1}}"#[..],
            b"{not json",
            br#"{"capabilities":{"twin_socket":true}}"#,
            br#"{"capabilities":{"twin_socket":{"supported":1}}}"#,
            br#"{"capabilities":{"twin_socket":{"supported":true,"fd_index":-1}}}"#,
        ] {
            let mut b = vec![0, 0, 2, 0];
            b.extend_from_slice(bad);
            assert!(
                Version::decode(&b).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
