//! Version 2: a 16-byte binary header (12-byte signature, version and command, family and
//! transport, length) followed by the addresses and optional TLVs.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use super::{same_family, Decoded, Header, ProxyError, Version};

pub const SIGNATURE: [u8; 12] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
];
const FIXED_LEN: usize = 16;
/// The longest v2 header accepted: addresses plus up to 4 KiB of TLVs.
pub const MAX_LEN: usize = FIXED_LEN + 4096;
const CMD_LOCAL: u8 = 0x0;
const CMD_PROXY: u8 = 0x1;
const AF_UNSPEC: u8 = 0x0;
const AF_INET: u8 = 0x1;
const AF_INET6: u8 = 0x2;
const AF_UNIX: u8 = 0x3;
const PROTO_UNSPEC: u8 = 0x0;
const PROTO_STREAM: u8 = 0x1;
const PROTO_DGRAM: u8 = 0x2;
const INET_LEN: usize = 12;
const INET6_LEN: usize = 36;

pub(super) fn decode(input: &[u8]) -> Result<Decoded, ProxyError> {
    // Check the fixed part as far as it has arrived.
    if let Some(&ver_cmd) = input.get(12) {
        if ver_cmd >> 4 != 2 {
            return Err(ProxyError::UnsupportedVersion(ver_cmd >> 4));
        }
        if !matches!(ver_cmd & 0xF, CMD_LOCAL | CMD_PROXY) {
            return Err(ProxyError::Malformed("command"));
        }
    }
    if let Some(&family) = input.get(13) {
        if family >> 4 > AF_UNIX || family & 0xF > PROTO_DGRAM {
            return Err(ProxyError::Malformed("address family or transport"));
        }
    }
    if input.len() < FIXED_LEN {
        return Ok(Decoded::Incomplete);
    }
    let len = FIXED_LEN + usize::from(u16::from_be_bytes([input[14], input[15]]));
    if len > MAX_LEN {
        return Err(ProxyError::TooLarge);
    }
    let Some(block) = input.get(FIXED_LEN..len) else {
        return Ok(Decoded::Incomplete);
    };
    let (command, family, transport) = (input[12] & 0xF, input[13] >> 4, input[13] & 0xF);
    let address_len = match family {
        AF_INET => INET_LEN,
        AF_INET6 => INET6_LEN,
        AF_UNIX => 216,
        _ => 0,
    };
    if block.len() < address_len {
        return Err(ProxyError::Malformed(
            "address block shorter than its family",
        ));
    }
    check_tlvs(&block[address_len..])?;
    let header = if command == CMD_LOCAL {
        Header::Local
    } else if transport != PROTO_STREAM || family == AF_UNSPEC || family == AF_UNIX {
        Header::Unknown
    } else if family == AF_INET {
        let ip = |at: usize| Ipv4Addr::new(block[at], block[at + 1], block[at + 2], block[at + 3]);
        let port = |at: usize| u16::from_be_bytes([block[at], block[at + 1]]);
        Header::Tcp {
            source: SocketAddr::new(ip(0).into(), port(8)),
            destination: SocketAddr::new(ip(4).into(), port(10)),
        }
    } else {
        let ip = |at: usize| {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&block[at..at + 16]);
            Ipv6Addr::from(octets)
        };
        let port = |at: usize| u16::from_be_bytes([block[at], block[at + 1]]);
        Header::Tcp {
            source: SocketAddr::new(ip(0).into(), port(32)),
            destination: SocketAddr::new(ip(16).into(), port(34)),
        }
    };
    Ok(Decoded::Complete {
        header,
        version: Version::V2,
        len,
    })
}

/// TLVs (type, 16-bit length, value) must tile the rest of the header exactly.
fn check_tlvs(mut tlvs: &[u8]) -> Result<(), ProxyError> {
    while !tlvs.is_empty() {
        if tlvs.len() < 3 {
            return Err(ProxyError::Malformed("truncated TLV"));
        }
        let len = 3 + usize::from(u16::from_be_bytes([tlvs[1], tlvs[2]]));
        if tlvs.len() < len {
            return Err(ProxyError::Malformed("TLV longer than the header"));
        }
        tlvs = &tlvs[len..];
    }
    Ok(())
}

pub(super) fn encode(header: &Header) -> Vec<u8> {
    let mut out = Vec::with_capacity(FIXED_LEN + INET6_LEN);
    out.extend_from_slice(&SIGNATURE);
    match *header {
        Header::Tcp {
            source,
            destination,
        } => {
            out.push(0x20 | CMD_PROXY);
            match same_family(source, destination) {
                (SocketAddr::V4(s), SocketAddr::V4(d)) => {
                    out.push(AF_INET << 4 | PROTO_STREAM);
                    out.extend_from_slice(&(INET_LEN as u16).to_be_bytes());
                    out.extend_from_slice(&s.ip().octets());
                    out.extend_from_slice(&d.ip().octets());
                }
                (s, d) => {
                    out.push(AF_INET6 << 4 | PROTO_STREAM);
                    out.extend_from_slice(&(INET6_LEN as u16).to_be_bytes());
                    out.extend_from_slice(&v6_octets(s));
                    out.extend_from_slice(&v6_octets(d));
                }
            }
            let (s, d) = same_family(source, destination);
            out.extend_from_slice(&s.port().to_be_bytes());
            out.extend_from_slice(&d.port().to_be_bytes());
        }
        Header::Local | Header::Unknown => {
            // LOCAL: the sender's own connection. PROXY over UNSPEC: a relayed connection
            // whose addresses are unknown; either way the receiver uses the real ones.
            let command = if *header == Header::Local {
                CMD_LOCAL
            } else {
                CMD_PROXY
            };
            out.push(0x20 | command);
            out.push(AF_UNSPEC << 4 | PROTO_UNSPEC);
            out.extend_from_slice(&0u16.to_be_bytes());
        }
    }
    out
}

fn v6_octets(a: SocketAddr) -> [u8; 16] {
    match a.ip() {
        std::net::IpAddr::V6(ip) => ip.octets(),
        std::net::IpAddr::V4(ip) => ip.to_ipv6_mapped().octets(),
    }
}
