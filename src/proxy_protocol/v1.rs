//! Version 1: one text line, `PROXY TCP4 <src> <dst> <sport> <dport>\r\n` (or TCP6, or
//! `PROXY UNKNOWN ...\r\n`), at most 107 bytes with the CRLF.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::{same_family, Decoded, Header, ProxyError, Version};

pub const SIGNATURE: &[u8] = b"PROXY ";
/// The longest v1 line, CRLF included (the spec's worst case: `PROXY UNKNOWN` with two full
/// IPv6 addresses and ports).
pub const MAX_LEN: usize = 107;

pub(super) fn decode(input: &[u8]) -> Result<Decoded, ProxyError> {
    let window = &input[..input.len().min(MAX_LEN)];
    let Some(newline) = window.iter().position(|&b| b == b'\n') else {
        return if input.len() >= MAX_LEN {
            Err(ProxyError::TooLarge)
        } else {
            Ok(Decoded::Incomplete)
        };
    };
    if newline == 0 || window[newline - 1] != b'\r' {
        return Err(ProxyError::Malformed("line does not end with CRLF"));
    }
    let line = std::str::from_utf8(&window[SIGNATURE.len()..newline - 1])
        .map_err(|_| ProxyError::Malformed("not ASCII"))?;
    let len = newline + 1;
    let complete = |header| {
        Ok(Decoded::Complete {
            header,
            version: Version::V1,
            len,
        })
    };
    // The spec: after UNKNOWN the receiver ignores the rest of the line.
    if line == "UNKNOWN" || line.starts_with("UNKNOWN ") {
        return complete(Header::Unknown);
    }
    let mut fields = line.split(' ');
    let family = fields.next().unwrap_or_default();
    let (Some(src), Some(dst), Some(sport), Some(dport), None) = (
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
    ) else {
        return Err(ProxyError::Malformed(
            "expected family, two addresses, two ports",
        ));
    };
    let ip = |text: &str| -> Result<IpAddr, ProxyError> {
        match family {
            "TCP4" => text
                .parse::<Ipv4Addr>()
                .map(IpAddr::V4)
                .map_err(|_| ProxyError::Malformed("TCP4 address")),
            "TCP6" => text
                .parse::<Ipv6Addr>()
                .map(IpAddr::V6)
                .map_err(|_| ProxyError::Malformed("TCP6 address")),
            _ => Err(ProxyError::Malformed("family is not TCP4, TCP6 or UNKNOWN")),
        }
    };
    let source = SocketAddr::new(ip(src)?, port(sport)?);
    let destination = SocketAddr::new(ip(dst)?, port(dport)?);
    complete(Header::Tcp {
        source,
        destination,
    })
}

/// A decimal port 0..=65535 without sign or leading zeros.
fn port(text: &str) -> Result<u16, ProxyError> {
    let bad = ProxyError::Malformed("port");
    if text.is_empty()
        || text.len() > 5
        || !text.bytes().all(|b| b.is_ascii_digit())
        || (text.len() > 1 && text.starts_with('0'))
    {
        return Err(bad);
    }
    text.parse().map_err(|_| bad)
}

pub(super) fn encode(header: &Header) -> Vec<u8> {
    match *header {
        Header::Tcp {
            source,
            destination,
        } => {
            let (s, d) = same_family(source, destination);
            let family = if s.is_ipv4() { "TCP4" } else { "TCP6" };
            format!(
                "PROXY {family} {} {} {} {}\r\n",
                s.ip(),
                d.ip(),
                s.port(),
                d.port()
            )
            .into_bytes()
        }
        Header::Local | Header::Unknown => b"PROXY UNKNOWN\r\n".to_vec(),
    }
}
