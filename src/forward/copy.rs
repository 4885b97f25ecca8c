//! The portable byte path: read into a buffer, write it out. Used where splice(2) is not
//! available. The buffer is allocated on the first readable event, so an idle connection
//! holds none.

use std::io;

use tokio::io::Interest;
use tokio::net::TcpStream;

use super::{half_close, Progress, PumpError};

const COPY_BUFFER: usize = 64 * 1024;

pub(super) async fn pump(
    src: &TcpStream,
    dst: &TcpStream,
    progress: &Progress<'_>,
) -> Result<(), PumpError> {
    let mut buffer: Vec<u8> = Vec::new();
    loop {
        src.readable().await.map_err(PumpError::Read)?;
        if buffer.is_empty() {
            buffer = vec![0; COPY_BUFFER];
        }
        let n = match src.try_read(&mut buffer) {
            Ok(0) => {
                half_close(dst);
                return Ok(());
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(PumpError::Read(e)),
        };
        write_rest(dst, &buffer[..n], 0, progress).await?;
    }
}

/// Writes `bytes[written..]` to `dst`, waiting for writability as needed.
pub(super) async fn write_rest(
    dst: &TcpStream,
    bytes: &[u8],
    mut written: usize,
    progress: &Progress<'_>,
) -> Result<(), PumpError> {
    while written < bytes.len() {
        dst.writable().await.map_err(PumpError::Write)?;
        match dst.try_io(Interest::WRITABLE, || dst_write(dst, &bytes[written..])) {
            Ok(m) => {
                written += m;
                progress.add(m);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(PumpError::Write(e)),
        }
    }
    Ok(())
}

fn dst_write(dst: &TcpStream, bytes: &[u8]) -> io::Result<usize> {
    match dst.try_write(bytes) {
        Ok(0) => Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "peer accepted no bytes",
        )),
        other => other,
    }
}
