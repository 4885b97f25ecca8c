//! The `tcp` check: a connect that completes within the check's timeout; with
//! `proxy_protocol`, the PROXY LOCAL header is then written, so a backend that requires one
//! sees a well-formed connection (and logs no broken header) before the check closes it.

use std::net::SocketAddr;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::{io_reason, Observation};

pub async fn check(addr: SocketAddr, proxy_header: Option<&[u8]>) -> Observation {
    let mut stream = match TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) => return Observation::down(io_reason(&e), format!("connect: {e}")),
    };
    if let Some(header) = proxy_header {
        if let Err(e) = stream.write_all(header).await {
            return Observation::down(io_reason(&e), format!("send PROXY header: {e}"));
        }
        // Closed once the header is on its way: the FIN follows it.
        let _ = stream.shutdown().await;
    }
    Observation::up()
}
