//! The `udp` and `dns` checks, for services with no TCP port. `udp` sends a configured
//! datagram and wants a reply starting with configured bytes; `dns` sends a real query
//! (one question, recursion desired) and wants a reply with the same id and rcode NOERROR.
//! Each check uses a fresh connected socket, so an ICMP port-unreachable surfaces as a
//! refused receive. Replies that do not match (a stray or late datagram) are skipped until
//! the check's timeout, which the caller enforces.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::net::UdpSocket;

use super::{io_reason, Observation};
use crate::backend::DownReason;
use crate::config::health::{DnsCheck, UdpCheck};

/// Largest reply read; longer ones are truncated, which prefix matching does not mind.
const MAX_REPLY: usize = 4096;

async fn connected(addr: SocketAddr) -> io::Result<UdpSocket> {
    let local: SocketAddr = if addr.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(addr).await?;
    Ok(socket)
}

pub async fn check_udp(addr: SocketAddr, check: &UdpCheck) -> Observation {
    let result: io::Result<Observation> = async {
        let socket = connected(addr).await?;
        socket.send(&check.send).await?;
        let mut buf = [0u8; MAX_REPLY];
        loop {
            let n = socket.recv(&mut buf).await?;
            if buf[..n].starts_with(&check.expect_prefix) {
                return Ok(Observation::up());
            }
            tracing::debug!(%addr, len = n, "udp check: reply does not start with the expected bytes");
        }
    }
    .await;
    result.unwrap_or_else(|e| Observation::down(io_reason(&e), format!("udp: {e}")))
}

pub async fn check_dns(addr: SocketAddr, check: &DnsCheck) -> Observation {
    let id = fastrand::u16(..);
    let query = encode_query(id, &check.name, check.qtype);
    let result: io::Result<Observation> = async {
        let socket = connected(addr).await?;
        socket.send(&query).await?;
        let mut buf = [0u8; MAX_REPLY];
        loop {
            let n = socket.recv(&mut buf).await?;
            match parse_reply(&buf[..n], id) {
                None => continue,
                Some(0) => return Ok(Observation::up()),
                Some(rcode) => {
                    return Ok(Observation::down(
                        DownReason::CheckError,
                        format!(
                            "dns: {} {} answered rcode {rcode} ({})",
                            check.name,
                            check.qtype,
                            rcode_name(rcode)
                        ),
                    ))
                }
            }
        }
    }
    .await;
    result.unwrap_or_else(|e| Observation::down(io_reason(&e), format!("dns: {e}")))
}

/// A standard query: header with RD set, one question of class IN. `name` was validated
/// (ASCII labels of 1 to 63 bytes, at most 253 in all).
pub fn encode_query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut q = Vec::with_capacity(18 + name.len());
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00]); // flags: RD
    q.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]); // QDCOUNT 1
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&1u16.to_be_bytes()); // class IN
    q
}

/// The rcode of a reply to query `id`; None for anything else (too short, another id, a query).
pub fn parse_reply(reply: &[u8], id: u16) -> Option<u8> {
    if reply.len() < 12 || reply[0..2] != id.to_be_bytes() || reply[2] & 0x80 == 0 {
        return None;
    }
    Some(reply[3] & 0x0f)
}

fn rcode_name(rcode: u8) -> &'static str {
    match rcode {
        1 => "FORMERR",
        2 => "SERVFAIL",
        3 => "NXDOMAIN",
        4 => "NOTIMP",
        5 => "REFUSED",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_layout() {
        let q = encode_query(0x1234, "example.com", 1);
        assert_eq!(
            q,
            [
                0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 7, b'e', b'x', b'a', b'm', b'p',
                b'l', b'e', 3, b'c', b'o', b'm', 0, 0, 1, 0, 1
            ]
        );
    }

    #[test]
    fn reply_matching() {
        let mut r = encode_query(7, "a.b", 28);
        assert_eq!(parse_reply(&r, 7), None, "a query is no reply");
        r[2] |= 0x80;
        assert_eq!(parse_reply(&r, 7), Some(0));
        assert_eq!(parse_reply(&r, 8), None, "another id");
        r[3] |= 3;
        assert_eq!(parse_reply(&r, 7), Some(3));
        assert_eq!(parse_reply(&r[..5], 7), None);
    }
}
