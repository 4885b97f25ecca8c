//! The `tcp` check: a connect that completes within the check's timeout.

use std::net::SocketAddr;

use tokio::net::TcpStream;

use super::{io_reason, Observation};

pub async fn check(addr: SocketAddr) -> Observation {
    match TcpStream::connect(addr).await {
        Ok(_) => Observation::up(),
        Err(e) => Observation::down(io_reason(&e), format!("connect: {e}")),
    }
}
