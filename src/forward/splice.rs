//! Zero-copy forwarding on Linux: socket → pipe → socket with `splice(2)`, driven by tokio
//! readiness, so payload bytes never enter user space. Each direction holds a pipe only
//! while bytes are moving: it takes one from a small process-wide pool when its socket turns
//! readable and gives it back, empty, as soon as the socket has nothing more to read, so idle
//! connections hold none.
//!
//! Small messages (requests, replies, handshakes) take a cheaper road, as HAProxy's
//! `splice-auto` does: a read that fits in [`SMALL_READ`] bytes is received into a pooled
//! buffer and sent on. A short `recv` proves the socket drained, which saves the extra
//! `EAGAIN` probe a splice read needs, and a message costs two syscalls instead of three. A
//! read that fills the buffer means a transfer is under way: the direction switches to splice
//! until a splice read comes back small again. When no pipe can be made (the open-file limit
//! reached, say), that transfer goes on through the buffer, and the next one tries splice again.

use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::sync::Mutex;

use nix::errno::Errno;
use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::copy::write_rest;
use super::{half_close, Progress, PumpError};

/// Requested pipe capacity; the kernel may grant less (pipe-max-size, per-user limits).
const PIPE_SIZE: i32 = 256 * 1024;
/// Pipes kept for reuse once their connection ends.
const POOL_MAX: usize = 1024;

static POOL: Mutex<Vec<Pipe>> = Mutex::new(Vec::new());

/// Reads up to this size are copied through a buffer; a read that fills it switches to splice.
const SMALL_READ: usize = 16 * 1024;
/// Buffers kept for reuse. A buffer is held only between a read and the end of its write,
/// which usually happens without waiting.
const BUFFERS_MAX: usize = 64;

static BUFFERS: Mutex<Vec<Box<[u8]>>> = Mutex::new(Vec::new());

fn take_buffer() -> Box<[u8]> {
    BUFFERS
        .lock()
        .ok()
        .and_then(|mut pool| pool.pop())
        .unwrap_or_else(|| vec![0; SMALL_READ].into_boxed_slice())
}

fn give_buffer(buffer: Box<[u8]>) {
    if let Ok(mut pool) = BUFFERS.lock() {
        if pool.len() < BUFFERS_MAX {
            pool.push(buffer);
        }
    }
}

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

/// What one buffered read found.
enum Received {
    /// The source reached EOF.
    Eof,
    /// The socket had nothing to read after all.
    Nothing,
    /// `n` bytes; `full` when they filled the buffer, so more is probably waiting.
    Data { n: usize, full: bool },
}

/// Receives once into `buffer`. A short read clears the read readiness in the same step
/// (tokio's `try_io` clears with the readiness observed before the read, so data arriving
/// after it still wakes the task).
fn receive(src: &TcpStream, buffer: &mut [u8]) -> Result<Received, PumpError> {
    let mut short = 0;
    let read = src.try_io(Interest::READABLE, || {
        let n = (&*socket2::SockRef::from(src)).read(buffer)?;
        if n > 0 && n < buffer.len() {
            short = n;
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match read {
        Ok(0) => Ok(Received::Eof),
        Ok(n) => Ok(Received::Data { n, full: true }),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && short > 0 => Ok(Received::Data {
            n: short,
            full: false,
        }),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Received::Nothing),
        Err(e) => Err(PumpError::Read(e)),
    }
}

/// Sends at once, without waiting for tokio to report the socket writable: a freshly
/// connected backend has no readiness recorded yet, and a socket with room takes the whole
/// message, so the buffer usually goes back to the pool before any await. Returns the bytes
/// sent (0 when the socket is full).
fn send_now(dst: &TcpStream, bytes: &[u8]) -> Result<usize, PumpError> {
    match (&*socket2::SockRef::from(dst)).write(bytes) {
        Ok(0) => Err(PumpError::Write(io::Error::new(
            io::ErrorKind::WriteZero,
            "peer accepted no bytes",
        ))),
        Ok(n) => Ok(n),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            ) =>
        {
            Ok(0)
        }
        Err(e) => Err(PumpError::Write(e)),
    }
}

pub(super) async fn pump(
    src: &TcpStream,
    dst: &TcpStream,
    progress: &Progress<'_>,
) -> Result<(), PumpError> {
    let flags = SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE;
    let mut pipe: Option<Pipe> = None;
    let mut splicing = false;
    let mut spliced_any = false;
    // No pipe could be made (EMFILE, ENFILE...): the transfer under way goes on buffered; the
    // next one tries splice again.
    let mut pipeless = false;
    loop {
        src.readable().await.map_err(PumpError::Read)?;
        if !splicing {
            let mut buffer = take_buffer();
            let (n, full) = match receive(src, &mut buffer)? {
                Received::Eof => {
                    give_buffer(buffer);
                    half_close(dst);
                    return Ok(());
                }
                Received::Nothing => {
                    give_buffer(buffer);
                    pipeless = false;
                    continue;
                }
                Received::Data { n, full } => (n, full),
            };
            let written = send_now(dst, &buffer[..n])?;
            progress.add(written);
            write_rest(dst, &buffer[..n], written, progress).await?;
            give_buffer(buffer);
            // A full buffer means a transfer is under way: splice it (pipes permitting). A
            // short read means the socket drained: that transfer is over.
            splicing = full && !pipeless;
            pipeless &= full;
            continue;
        }
        // Socket → pipe. The pipe is empty here, so EAGAIN means the socket has no data.
        let p = match pipe.as_ref() {
            Some(p) => p,
            None => match Pipe::take() {
                Ok(taken) => pipe.insert(taken),
                Err(e) => {
                    // Nothing was read yet: the buffered path takes this transfer over.
                    super::note_fallback(&e);
                    splicing = false;
                    pipeless = true;
                    continue;
                }
            },
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
            // Nothing was consumed from the socket: the buffered copy can take over.
            Err(e) if !spliced_any && is_unsupported(&e) => {
                if let Some(p) = pipe.take() {
                    p.give_back();
                }
                return Err(PumpError::Unsupported(e));
            }
            Err(e) => return Err(PumpError::Read(e)),
        };
        spliced_any = true;
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
        if filled < SMALL_READ {
            // The transfer has slowed to small messages: back to buffered reads.
            splicing = false;
            if let Some(p) = pipe.take() {
                p.give_back();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::atomic::AtomicU64;
    use std::time::Duration;

    use prometheus::IntCounter;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::super::{Activity, Progress};
    use super::*;

    /// Upper bound for any wait here, so a bug fails the test instead of hanging it.
    const LIMIT: Duration = Duration::from_secs(30);

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

    /// What a [`Progress`] borrows.
    struct Meter {
        counter: IntCounter,
        activity: Activity,
    }

    impl Meter {
        fn new() -> Meter {
            Meter {
                counter: IntCounter::new("bytes", "bytes").expect("counter"),
                activity: Activity {
                    started: tokio::time::Instant::now(),
                    last_ns: AtomicU64::new(0),
                },
            }
        }

        fn progress(&self) -> Progress<'_> {
            Progress {
                moved: AtomicU64::new(0),
                counter: &self.counter,
                backend_counter: &self.counter,
                activity: &self.activity,
            }
        }
    }

    type Pump<'a> = Pin<&'a mut dyn Future<Output = Result<(), PumpError>>>;

    /// Writes `len` patterned bytes into `client` and checks that `receiver` gets exactly
    /// them, while `pump` (which must keep running) moves them.
    async fn send_through(
        pump: &mut Pump<'_>,
        client: &mut TcpStream,
        receiver: &mut TcpStream,
        len: usize,
    ) {
        let sent: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let mut got = vec![0u8; len];
        let transfer = async {
            client.write_all(&sent).await?;
            receiver.read_exact(&mut got).await
        };
        tokio::select! {
            done = pump.as_mut() => panic!("pump ended early: {done:?}"),
            moved = tokio::time::timeout(LIMIT, transfer) => {
                moved.expect("transfer within the limit").expect("transfer");
            }
        }
        assert!(got == sent, "bytes differ");
    }

    /// Keeps `pump` running until the pipe pool holds more than `than` pipes.
    async fn wait_pooled_above(pump: &mut Pump<'_>, than: usize) {
        let mut waited = Duration::ZERO;
        while pooled() <= than {
            assert!(waited < LIMIT, "no pipe returned to the pool while idle");
            tokio::select! {
                done = pump.as_mut() => panic!("pump ended early: {done:?}"),
                () = tokio::time::sleep(Duration::from_millis(10)) => waited += Duration::from_millis(10),
            }
        }
    }

    /// Drops the client and checks that the pump forwards its EOF and ends cleanly.
    async fn finish(mut pump: Pump<'_>, client: TcpStream, receiver: &mut TcpStream) {
        drop(client);
        let done = tokio::time::timeout(LIMIT, pump.as_mut())
            .await
            .expect("pump ends after EOF");
        assert!(done.is_ok(), "{done:?}");
        let mut rest = Vec::new();
        receiver.read_to_end(&mut rest).await.expect("read to EOF");
        assert!(rest.is_empty());
    }

    /// After a transfer large enough to be spliced, a direction with nothing more to read
    /// returns its pipe to the pool while the connection stays open, and still forwards EOF.
    #[tokio::test]
    async fn idle_direction_holds_no_pipe() {
        let (mut client, src) = pair().await;
        let (dst, mut receiver) = pair().await;
        let meter = Meter::new();
        let progress = meter.progress();
        let before = pooled();
        let pump = pump(&src, &dst, &progress);
        tokio::pin!(pump);
        let mut pump: Pump<'_> = pump;

        send_through(&mut pump, &mut client, &mut receiver, 4 * SMALL_READ).await;
        wait_pooled_above(&mut pump, before).await;
        finish(pump, client, &mut receiver).await;
        assert_eq!(progress.moved(), 4 * SMALL_READ as u64);
    }

    /// Runs only in the child process of [`no_pipe_falls_back_to_buffered_copy`].
    const NO_PIPE_CHILD: &str = "SWITCHYARD_TEST_NO_PIPE_CHILD";

    /// When no pipe can be made (here the real EMFILE of a full file table), the connection
    /// does not die: the transfer goes on buffered with every byte intact, and once pipes
    /// can be made again a later large transfer is spliced. The open-file limit is lowered
    /// in a child process (this test binary, run again for this test alone), so no other
    /// test sees it.
    #[test]
    fn no_pipe_falls_back_to_buffered_copy() {
        if std::env::var_os(NO_PIPE_CHILD).is_some() {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(no_pipe_child());
            return;
        }
        let path = module_path!().split_once("::").map_or("", |(_, p)| p);
        let name = format!("{path}::no_pipe_falls_back_to_buffered_copy");
        let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
            .args([
                name.as_str(),
                "--exact",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(NO_PIPE_CHILD, "1")
            .output()
            .expect("run the child");
        let output = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{output}");
        assert!(
            output.contains("1 passed"),
            "the child ran no test: {output}"
        );
        assert!(output.contains("no pipe while the limit held"), "{output}");
    }

    async fn no_pipe_child() {
        let (mut client, src) = pair().await;
        let (dst, mut receiver) = pair().await;
        let meter = Meter::new();
        let progress = meter.progress();
        let pump = pump(&src, &dst, &progress);
        tokio::pin!(pump);
        let mut pump: Pump<'_> = pump;

        let full = FullFileTable::new();
        let refused = nix::unistd::pipe2(OFlag::O_CLOEXEC).map(drop);
        assert_eq!(refused, Err(Errno::EMFILE), "pipes cannot be made");
        send_through(&mut pump, &mut client, &mut receiver, 64 * SMALL_READ).await;
        assert_eq!(pooled(), 0, "a pipe was made under the limit");
        println!("no pipe while the limit held");
        drop(full);

        send_through(&mut pump, &mut client, &mut receiver, 64 * SMALL_READ).await;
        // The pipe that spliced the second transfer goes back to the pool once idle.
        wait_pooled_above(&mut pump, 0).await;
        finish(pump, client, &mut receiver).await;
        assert_eq!(progress.moved(), 2 * 64 * SMALL_READ as u64);
    }

    /// The open-file limit lowered to the highest open descriptor, and every free number
    /// below it taken, so no new descriptor can be made; restored on drop.
    struct FullFileTable {
        soft: u64,
        hard: u64,
        _fillers: Vec<std::fs::File>,
    }

    impl FullFileTable {
        fn new() -> FullFileTable {
            use nix::sys::resource::{getrlimit, setrlimit, Resource};
            let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
            let highest = std::fs::read_dir("/proc/self/fd")
                .expect("list open fds")
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
                .max()
                .expect("some fd is open");
            setrlimit(Resource::RLIMIT_NOFILE, highest + 1, hard).expect("lower the limit");
            let fillers: Vec<std::fs::File> = (0..=highest)
                .map_while(|_| std::fs::File::open("/dev/null").ok())
                .collect();
            FullFileTable {
                soft,
                hard,
                _fillers: fillers,
            }
        }
    }

    impl Drop for FullFileTable {
        fn drop(&mut self) {
            use nix::sys::resource::{setrlimit, Resource};
            let _ = setrlimit(Resource::RLIMIT_NOFILE, self.soft, self.hard);
        }
    }
}
