//! The PROXY protocol (HAProxy's `proxy-protocol.txt`), versions 1 (text) and 2 (binary):
//! the header a balancer puts before a connection's bytes to tell the next hop who the
//! client is. [`decode`] reads one from the bytes received so far (incremental, bounded,
//! typed errors; a decision on a prefix never changes with more bytes); [`encode`] writes
//! one. Pure, no I/O, fuzzed (`fuzz/`). When to trust a header is decided in `route`.

mod v1;
mod v2;

use std::fmt;
use std::net::SocketAddr;

use crate::acl::canonical;

pub use v1::MAX_LEN as MAX_V1_LEN;
pub use v2::{MAX_LEN as MAX_V2_LEN, SIGNATURE as V2_SIGNATURE};

/// Which version to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// What a header says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// A TCP connection from `source` to `destination` (the client and the address it reached).
    Tcp {
        source: SocketAddr,
        destination: SocketAddr,
    },
    /// v2 LOCAL: the sender's own connection (a health check); use the real addresses.
    Local,
    /// v1 UNKNOWN, or a v2 PROXY header for another family (UDP, UNIX, unspecified): the
    /// addresses are not usable; use the real ones.
    Unknown,
}

/// The result of looking at the bytes received so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded {
    /// A whole header, `len` bytes long; what follows belongs to the connection.
    Complete {
        header: Header,
        version: Version,
        len: usize,
    },
    /// Could still be a header; read more and call again with every byte.
    Incomplete,
}

/// Why the bytes are not a usable header. The connection should be closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyError {
    /// The bytes do not start with either version's signature.
    NotProxy,
    /// A v2 header with a version nibble other than 2.
    UnsupportedVersion(u8),
    /// Longer than a header may be ([`MAX_V1_LEN`] or [`MAX_V2_LEN`]).
    TooLarge,
    /// Broken; the text says where.
    Malformed(&'static str),
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProxyError::NotProxy => write!(f, "no PROXY protocol signature"),
            ProxyError::UnsupportedVersion(v) => {
                write!(f, "PROXY protocol version {v} is not supported")
            }
            ProxyError::TooLarge => write!(f, "PROXY header too long"),
            ProxyError::Malformed(what) => write!(f, "malformed PROXY header: {what}"),
        }
    }
}

impl std::error::Error for ProxyError {}

/// Decodes a v1 or v2 header from the start of `input`.
pub fn decode(input: &[u8]) -> Result<Decoded, ProxyError> {
    match starts_with_signature(input) {
        Some(Version::V1) => v1::decode(input),
        Some(Version::V2) => v2::decode(input),
        None if input.is_empty() || is_signature_prefix(input) => Ok(Decoded::Incomplete),
        None => Err(ProxyError::NotProxy),
    }
}

/// Which version's signature `input` starts with, if it holds a whole one.
pub fn starts_with_signature(input: &[u8]) -> Option<Version> {
    if input.starts_with(v1::SIGNATURE) {
        Some(Version::V1)
    } else if input.starts_with(&v2::SIGNATURE) {
        Some(Version::V2)
    } else {
        None
    }
}

/// Whether `input` (shorter than a signature) may still become one.
pub fn is_signature_prefix(input: &[u8]) -> bool {
    v1::SIGNATURE.starts_with(input) || v2::SIGNATURE.starts_with(input)
}

/// Encodes `header` in `version`. IPv4-mapped IPv6 addresses (a dual-stack socket's view of
/// an IPv4 peer) count as IPv4, so an IPv4 connection is sent as TCP4; addresses of
/// different families are sent as IPv6 (the IPv4 one mapped). v1 has no LOCAL, so `Local`
/// becomes `PROXY UNKNOWN`.
pub fn encode(version: Version, header: &Header) -> Vec<u8> {
    match version {
        Version::V1 => v1::encode(header),
        Version::V2 => v2::encode(header),
    }
}

/// Both addresses in one family: IPv4 when both are IPv4 or IPv4-mapped, else both IPv6.
fn same_family(source: SocketAddr, destination: SocketAddr) -> (SocketAddr, SocketAddr) {
    fn to_v4(a: SocketAddr) -> SocketAddr {
        SocketAddr::new(canonical(a.ip()), a.port())
    }
    fn to_v6(a: SocketAddr) -> SocketAddr {
        match a {
            SocketAddr::V4(v4) => SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port()),
            v6 => v6,
        }
    }
    let (s, d) = (to_v4(source), to_v4(destination));
    if s.is_ipv4() && d.is_ipv4() {
        (s, d)
    } else {
        (to_v6(source), to_v6(destination))
    }
}

#[cfg(test)]
mod tests;
