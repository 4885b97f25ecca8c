//! Known ports for servers a test starts itself (dnsmasq, Postgres, nginx, a second balancer
//! process, a listener a reload must put back on the same address).
//!
//! Binding port 0 and letting go is not enough: such a port comes from the kernel's ephemeral
//! range, which is also where every outgoing connection takes its local port, and the tests
//! before this one leave hundreds of those in TIME_WAIT. A client's TIME_WAIT socket blocks a
//! listener's bind to that port even with SO_REUSEADDR, so a server given such a port exits
//! with "Address already in use". The ports here come from below the ephemeral range, which
//! the kernel never hands out by itself; a process walks them from a random start and never
//! gives one out twice, and each is checked free for both TCP (bound as servers bind, with
//! SO_REUSEADDR) and UDP before it is given.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

use socket2::{Domain, Socket, Type};

/// The lowest port handed out.
const FIRST: u16 = 10_000;

/// Where this process's walk starts, and the next step of it.
static START: OnceLock<u32> = OnceLock::new();
static STEP: AtomicU32 = AtomicU32::new(0);

/// The first port of the kernel's ephemeral range (32768 by default).
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// Free for a TCP listener and for a UDP socket on 127.0.0.1 right now.
fn is_free(port: u16) -> bool {
    let addr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port));
    let tcp = Socket::new(Domain::IPV4, Type::STREAM, None)
        .and_then(|s| s.set_reuse_address(true).map(|()| s))
        .and_then(|s| s.bind(&addr.into()).and_then(|()| s.listen(1)));
    let udp = Socket::new(Domain::IPV4, Type::DGRAM, None).and_then(|s| s.bind(&addr.into()));
    tcp.is_ok() && udp.is_ok()
}

/// A port on 127.0.0.1 that is free for TCP and UDP, outside the ephemeral range, and not
/// given out before in this process.
pub fn free_port() -> u16 {
    let low = ephemeral_low();
    if low <= FIRST + 1_000 {
        // No room below the ephemeral range on this machine: fall back to the kernel's pick.
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
        return l.local_addr().expect("local addr").port();
    }
    let span = u32::from(low - FIRST);
    let start = *START.get_or_init(|| fastrand::u32(0..span));
    for _ in 0..span {
        let step = STEP.fetch_add(1, Ordering::Relaxed);
        let port = FIRST + ((start + step) % span) as u16;
        if is_free(port) {
            return port;
        }
    }
    panic!("no free port in {FIRST}..{low}");
}

/// `127.0.0.1:` a [`free_port`].
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}
