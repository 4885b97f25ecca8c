//! Zero-copy forwarding on Linux: socket → pipe → socket with `splice(2)`, driven by tokio
//! readiness, so payload bytes never enter user space. Each direction holds a pipe only
//! while bytes are moving: it takes one from a small process-wide pool when its socket turns
//! readable and gives it back, empty, as soon as the socket has nothing more to read, so idle
//! connections hold none.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::Mutex;

use nix::errno::Errno;
use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::{half_close, Progress, PumpError};

/// Requested pipe capacity; the kernel may grant less (pipe-max-size, per-user limits).
const PIPE_SIZE: i32 = 256 * 1024;
/// Pipes kept for reuse once their connection ends.
const POOL_MAX: usize = 1024;

static POOL: Mutex<Vec<Pipe>> = Mutex::new(Vec::new());

struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

impl Pipe {
    fn take() -> io::Result<Pipe> {
        if let Some(pipe) = POOL.lock().ok().and_then(|mut pool| pool.pop()) {
            return Ok(pipe);
        }
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        let capacity = fcntl(&write, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE))
            .or_else(|_| fcntl(&write, FcntlArg::F_GETPIPE_SZ))
            .map_or(64 * 1024, |n| n as usize);
        Ok(Pipe {
            read,
            write,
            capacity,
        })
    }

    /// Returns an empty pipe to the pool (a pipe with bytes left in it is simply closed).
    fn give_back(self) {
        if let Ok(mut pool) = POOL.lock() {
            if pool.len() < POOL_MAX {
                pool.push(self);
            }
        }
    }
}

fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error().map(Errno::from_raw),
        Some(Errno::EINVAL | Errno::ENOSYS | Errno::EOPNOTSUPP)
    )
}

pub(super) async fn pump(
    src: &TcpStream,
    dst: &TcpStream,
    progress: &Progress<'_>,
) -> Result<(), PumpError> {
    let flags = SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE;
    let mut pipe: Option<Pipe> = None;
    loop {
        // Socket → pipe. The pipe is empty here, so EAGAIN means the socket has no data.
        src.readable().await.map_err(PumpError::Read)?;
        let p = match pipe.as_ref() {
            Some(p) => p,
            None => pipe.insert(Pipe::take().map_err(PumpError::Read)?),
        };
        let filled = match src.try_io(Interest::READABLE, || {
            splice(src, None, &p.write, None, p.capacity, flags).map_err(io::Error::from)
        }) {
            Ok(0) => {
                half_close(dst);
                if let Some(p) = pipe.take() {
                    p.give_back();
                }
                return Ok(());
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Nothing to read and the pipe is empty: an idle direction holds no pipe.
                if let Some(p) = pipe.take() {
                    p.give_back();
                }
                continue;
            }
            Err(e) if progress.moved() == 0 && is_unsupported(&e) => {
                return Err(PumpError::Unsupported(e))
            }
            Err(e) => return Err(PumpError::Read(e)),
        };
        // Pipe → socket. The pipe holds `left` bytes, so EAGAIN means the socket is full.
        let mut left = filled;
        while left > 0 {
            dst.writable().await.map_err(PumpError::Write)?;
            match dst.try_io(Interest::WRITABLE, || {
                splice(&p.read, None, dst, None, left, flags).map_err(io::Error::from)
            }) {
                Ok(0) => {
                    return Err(PumpError::Write(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "backend or client accepted no bytes",
                    )))
                }
                Ok(n) => {
                    left -= n;
                    progress.add(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(PumpError::Write(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;
    use std::time::Duration;

    use prometheus::IntCounter;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::super::{Activity, Progress};
    use super::*;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let near = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (far, _) = listener.accept().await.expect("accept");
        (near, far)
    }

    fn pooled() -> usize {
        POOL.lock().map(|pool| pool.len()).unwrap_or(0)
    }

    /// After moving bytes, a direction with nothing more to read returns its pipe to the
    /// pool while the connection stays open, and still forwards EOF afterwards.
    #[tokio::test]
    async fn idle_direction_holds_no_pipe() {
        let (mut client, src) = pair().await;
        let (dst, mut receiver) = pair().await;
        let counter = IntCounter::new("bytes", "bytes").expect("counter");
        let activity = Activity {
            started: tokio::time::Instant::now(),
            last_ns: AtomicU64::new(0),
        };
        let progress = Progress {
            moved: AtomicU64::new(0),
            counter: &counter,
            activity: &activity,
        };
        let before = pooled();
        let pump = pump(&src, &dst, &progress);
        tokio::pin!(pump);

        client.write_all(b"hello").await.expect("write");
        let mut got = [0u8; 5];
        tokio::select! {
            done = &mut pump => panic!("pump ended early: {done:?}"),
            read = receiver.read_exact(&mut got) => { read.expect("read"); }
        }
        assert_eq!(&got, b"hello");

        let mut waited = Duration::ZERO;
        while pooled() <= before {
            assert!(
                waited < Duration::from_secs(10),
                "pipe not returned while idle"
            );
            tokio::select! {
                done = &mut pump => panic!("pump ended early: {done:?}"),
                () = tokio::time::sleep(Duration::from_millis(10)) => waited += Duration::from_millis(10),
            }
        }

        drop(client);
        let done = tokio::time::timeout(Duration::from_secs(10), &mut pump)
            .await
            .expect("pump ends after EOF");
        assert!(done.is_ok(), "{done:?}");
        let mut rest = Vec::new();
        receiver.read_to_end(&mut rest).await.expect("read to EOF");
        assert!(rest.is_empty());
        assert_eq!(progress.moved(), 5);
    }
}
