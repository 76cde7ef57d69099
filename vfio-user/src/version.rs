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
    /// Twin-socket mode supported (we never use it).
    pub twin_socket: bool,
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
        }
    }
}

impl Capabilities {
    fn to_json(self) -> String {
        format!(
            "{{\"capabilities\":{{\"max_msg_fds\":{},\"max_data_xfer_size\":{},\"pgsizes\":{},\"max_dma_maps\":{}}}}}",
            self.max_msg_fds, self.max_data_xfer_size, self.pgsizes, self.max_dma_maps
        )
    }

    fn from_json(v: &Value) -> Result<Capabilities, DecodeError> {
        let mut c = Capabilities::default();
        let Some(caps) = v.get("capabilities") else {
            return Ok(c);
        };
        if !matches!(caps, Value::Object(_)) {
            return Err(DecodeError::Invalid("capabilities"));
        }
        let num = |name: &'static str, max: u64| -> Result<Option<u64>, DecodeError> {
            match caps.get(name) {
                None => Ok(None),
                Some(v) => v
                    .as_u64()
                    .filter(|n| *n <= max)
                    .map(Some)
                    .ok_or(DecodeError::Invalid(name)),
            }
        };
        if let Some(n) = num("max_msg_fds", u32::MAX.into())? {
            c.max_msg_fds = n as u32;
        }
        if let Some(n) = num("max_data_xfer_size", u32::MAX.into())? {
            c.max_data_xfer_size = n as u32;
        }
        if let Some(n) = num("pgsizes", u64::MAX)? {
            c.pgsizes = n;
        }
        if let Some(n) = num("max_dma_maps", u32::MAX.into())? {
            c.max_dma_maps = n as u32;
        }
        c.write_multiple = caps
            .get("write_multiple")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        c.twin_socket = caps
            .get("twin_socket")
            .and_then(|t| t.get("supported"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        Ok(c)
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
}

impl Version {
    /// Our proposal (client) with `caps`.
    pub fn ours(caps: Capabilities) -> Version {
        Version {
            major: MAJOR,
            minor: MINOR,
            caps,
        }
    }

    /// Encode with the JSON capabilities and its terminating NUL.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&self.major.to_ne_bytes());
        v.extend_from_slice(&self.minor.to_ne_bytes());
        v.extend_from_slice(self.caps.to_json().as_bytes());
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
        let caps = if text.is_empty() {
            Capabilities::default()
        } else {
            let s = std::str::from_utf8(text).map_err(|_| DecodeError::Invalid("version data"))?;
            let v = json::parse(s).map_err(|_| DecodeError::Invalid("version data"))?;
            Capabilities::from_json(&v)?
        };
        Ok(Version { major, minor, caps })
    }
}

/// Server side: the reply to a client's `proposed` version, given what we can receive
/// (`ours`), or the errno to refuse with (then close the connection).
///
/// `max_dma_maps` is the smaller of ours (the server's map limit) and the proposal: a client's
/// proposal is the most it accepts (QEMU proposes 65535 and closes the connection on a larger
/// answer), so the answer never exceeds what the server enforces nor what the client takes.
pub fn server_reply(ours: &Capabilities, proposed: &Version) -> Result<Version, i32> {
    if proposed.major != MAJOR {
        return Err(libc::ENOTSUP);
    }
    let pgsizes = ours.pgsizes & proposed.caps.pgsizes;
    if pgsizes == 0 {
        return Err(libc::ENOTSUP);
    }
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
            twin_socket: false,
        },
    })
}

/// Client side: check the server's `reply` to `proposed`.
pub fn check_reply(proposed: &Version, reply: &Version) -> Result<(), String> {
    if reply.major != proposed.major {
        return Err(format!("server answered major version {}", reply.major));
    }
    if reply.minor > proposed.minor {
        return Err(format!(
            "server answered minor version {} > proposed {}",
            reply.minor, proposed.minor
        ));
    }
    if reply.caps.twin_socket {
        return Err("server enabled twin-socket mode, which we did not propose".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_defaults() {
        let caps = Capabilities {
            max_msg_fds: 8,
            max_data_xfer_size: 65536,
            pgsizes: 4096,
            max_dma_maps: 1000,
            write_multiple: false,
            twin_socket: false,
        };
        let v = Version::ours(caps);
        assert_eq!(Version::decode(&v.encode()).unwrap(), v);
        // A 0.1 peer without JSON: spec defaults.
        let bare = Version::decode(&[0, 0, 1, 0]).unwrap();
        assert_eq!((bare.major, bare.minor), (0, 1));
        assert_eq!(bare.caps, Capabilities::default());
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
        let old = Version {
            major: 0,
            minor: 1,
            caps: Capabilities::default(),
        };
        let r = server_reply(&ours, &old).unwrap();
        assert_eq!(r.minor, 1);
        assert!(check_reply(&old, &r).is_ok());
        let newer = Version {
            major: 0,
            minor: 9,
            caps: Capabilities::default(),
        };
        assert_eq!(server_reply(&ours, &newer).unwrap().minor, MINOR);
        let other_major = Version { major: 1, ..old };
        assert_eq!(server_reply(&ours, &other_major), Err(libc::ENOTSUP));
        let too_new = Version { minor: 3, ..r };
        assert!(check_reply(&old, &too_new).is_err());
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
        // A client that takes more is told the server's limit.
        let big = server_reply(&ours, &propose(u32::MAX)).unwrap();
        assert_eq!(big.caps.max_dma_maps, 1 << 20);
        assert_eq!(
            Version::decode(&big.encode()).unwrap().caps.max_dma_maps,
            1 << 20
        );
    }

    #[test]
    fn malformed_capabilities_are_refused() {
        let mut b = vec![0, 0, 2, 0];
        b.extend_from_slice(br#"{"capabilities":{"max_msg_fds":-1}}"#);
        assert!(Version::decode(&b).is_err());
        let mut b = vec![0, 0, 2, 0];
        b.extend_from_slice(b"{not json");
        assert!(Version::decode(&b).is_err());
    }
}
