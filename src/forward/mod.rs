//! The byte path between a client and its backend: two directions pumped independently in
//! one task, each half-closing on its own (EOF from one side becomes a FIN to the other while
//! the reverse direction keeps flowing; a reset from one side becomes a reset to the other),
//! an idle timer over both, and a cancel for shutdown.
//! Linux uses `splice(2)` ([`splice`]); a buffered copy ([`copy`]) serves elsewhere and where
//! splice is refused. A caller may have the client's first bytes checked before any is
//! forwarded ([`FirstBytes`]); the check itself is the caller's. This module owns no routing
//! decisions and no logging per byte.

mod copy;
#[cfg(target_os = "linux")]
mod splice;

use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus::IntCounter;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backend::CloseSignal;
use crate::conn::CloseReason;

/// What a finished forwarding reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub reason: CloseReason,
    pub bytes_from_client: u64,
    pub bytes_to_client: u64,
}

/// A check on the first bytes the client sends, made before any of them reaches the backend,
/// on the client→backend direction only: the backend→client direction flows meanwhile, so a
/// protocol where the server speaks first is not held up.
#[derive(Debug, Clone, Copy)]
pub struct FirstBytes {
    /// Judges the bytes received so far (at least one, at most [`FIRST_BYTES_MAX`]).
    pub check: fn(&[u8]) -> Screen,
    /// How long to wait for more bytes once the check asked for them; then the connection
    /// is refused (bytes that might still become what the check refuses never go on).
    pub wait: Duration,
}

/// The most bytes held back for a [`FirstBytes`] check.
pub const FIRST_BYTES_MAX: usize = 16;

/// A [`FirstBytes`] check's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Screen {
    /// Forward these bytes and everything after them.
    Forward,
    /// Close the connection (reason `refused`); nothing is forwarded.
    Refuse,
    /// Cannot tell yet: wait for more bytes.
    NeedMore,
}

/// Per-listener byte counters, bumped as bytes move (one relaxed add per chunk).
#[derive(Debug, Clone)]
pub struct ByteCounters {
    pub from_client: IntCounter,
    pub to_client: IntCounter,
    /// The same bytes, counted on the backend.
    pub backend_from_client: IntCounter,
    pub backend_to_client: IntCounter,
}

/// Which end of a direction failed.
#[derive(Debug)]
pub(crate) enum PumpError {
    /// Reading from the source socket failed.
    Read(io::Error),
    /// Writing to the destination socket failed.
    Write(io::Error),
    /// splice(2) cannot serve this pair of sockets; nothing was moved yet.
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    Unsupported(io::Error),
    /// The [`FirstBytes`] check refused the client's first bytes.
    Refused,
}

/// Bytes moved in one direction and the connection's last activity, shared by both pumps and
/// the idle timer. Atomics (uncontended: one task) keep the connection future `Send`.
pub(crate) struct Progress<'a> {
    moved: AtomicU64,
    counter: &'a IntCounter,
    backend_counter: &'a IntCounter,
    activity: &'a Activity,
}

impl Progress<'_> {
    pub(crate) fn add(&self, n: usize) {
        self.moved.fetch_add(n as u64, Ordering::Relaxed);
        self.counter.inc_by(n as u64);
        self.backend_counter.inc_by(n as u64);
        self.activity.touch();
    }

    pub(crate) fn moved(&self) -> u64 {
        self.moved.load(Ordering::Relaxed)
    }
}

/// Time of the last byte moved either way, as nanoseconds since the connection started.
struct Activity {
    started: Instant,
    last_ns: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        self.last_ns
            .store(self.started.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.started + Duration::from_nanos(self.last_ns.load(Ordering::Relaxed))
    }
}

/// Forwards both directions until both have ended, one fails, the connection idles past
/// `idle_timeout`, `cancel` fires, or `close` orders the backend's connections closed. With
/// `first_bytes`, the client's first bytes pass its check before any is forwarded; a refusal
/// ends the connection with [`CloseReason::Refused`].
pub async fn forward(
    client: &TcpStream,
    backend: &TcpStream,
    idle_timeout: Duration,
    cancel: &CancellationToken,
    close: &mut CloseSignal,
    counters: &ByteCounters,
    first_bytes: Option<FirstBytes>,
) -> Outcome {
    let activity = Activity {
        started: Instant::now(),
        last_ns: AtomicU64::new(0),
    };
    let up = Progress {
        moved: AtomicU64::new(0),
        counter: &counters.from_client,
        backend_counter: &counters.backend_from_client,
        activity: &activity,
    };
    let down = Progress {
        moved: AtomicU64::new(0),
        counter: &counters.to_client,
        backend_counter: &counters.backend_to_client,
        activity: &activity,
    };
    let up_pump = async {
        if let Some(first) = first_bytes {
            screen(client, backend, &up, first).await?;
        }
        pump(client, backend, &up).await
    };
    let down_pump = pump(backend, client, &down);
    tokio::pin!(up_pump, down_pump);

    let (mut up_done, mut down_done) = (false, false);
    let mut first_close = None;
    let reason = loop {
        let idle_deadline = activity.last() + idle_timeout;
        tokio::select! {
            result = &mut up_pump, if !up_done => match result {
                Ok(()) => {
                    up_done = true;
                    let first = *first_close.get_or_insert(CloseReason::ClientClosed);
                    if down_done {
                        break first;
                    }
                }
                Err(e) => break failure_reason(e, CloseReason::ClientReset, CloseReason::BackendReset),
            },
            result = &mut down_pump, if !down_done => match result {
                Ok(()) => {
                    down_done = true;
                    let first = *first_close.get_or_insert(CloseReason::BackendClosed);
                    if up_done {
                        break first;
                    }
                }
                Err(e) => break failure_reason(e, CloseReason::BackendReset, CloseReason::ClientReset),
            },
            () = tokio::time::sleep_until(idle_deadline) => {
                if activity.last() + idle_timeout <= Instant::now() {
                    break CloseReason::IdleTimeout;
                }
            }
            () = cancel.cancelled() => break CloseReason::Shutdown,
            reason = close.recv() => break reason,
        }
    };
    if matches!(reason, CloseReason::ClientReset | CloseReason::BackendReset) {
        // A reset cut the stream: each side whose incoming stream had not reached its end
        // gets a reset too, not a FIN that would pass the cut off as the end of the data.
        if !down_done {
            reset_on_close(client);
        }
        if !up_done {
            reset_on_close(backend);
        }
    }
    Outcome {
        reason,
        bytes_from_client: up.moved(),
        bytes_to_client: down.moved(),
    }
}

/// Maps a failed direction to the side that failed: its source (`read_side`) or its
/// destination (`write_side`); the socket error itself goes to the debug log.
fn failure_reason(
    error: PumpError,
    read_side: CloseReason,
    write_side: CloseReason,
) -> CloseReason {
    let (reason, e) = match error {
        PumpError::Read(e) | PumpError::Unsupported(e) => (read_side, e),
        PumpError::Write(e) => (write_side, e),
        PumpError::Refused => return CloseReason::Refused,
    };
    tracing::debug!(error = %e, reason = reason.as_str(), "forwarding ended by a socket error");
    reason
}

/// Reads `src`'s first bytes (a few, never past [`FIRST_BYTES_MAX`]) until `first.check`
/// decides, then writes them to `dst` unless refused. The wait for more bytes starts at the
/// first byte (before it, the idle timer applies). When it runs out the connection is
/// refused: forwarding the held bytes would let a pause split what the check refuses. At
/// EOF the bytes read so far are forwarded (nothing can follow them) and the pump that
/// follows sees the EOF again.
async fn screen(
    src: &TcpStream,
    dst: &TcpStream,
    progress: &Progress<'_>,
    first: FirstBytes,
) -> Result<(), PumpError> {
    let mut held = [0u8; FIRST_BYTES_MAX];
    let mut len = 0;
    let mut deadline = None;
    while len < held.len() {
        let ready = match deadline {
            None => Ok(src.readable().await),
            Some(at) => tokio::time::timeout_at(at, src.readable()).await,
        };
        match ready {
            Err(_) => return Err(PumpError::Refused),
            Ok(r) => r.map_err(PumpError::Read)?,
        }
        match src.try_read(&mut held[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(PumpError::Read(e)),
        }
        match (first.check)(&held[..len]) {
            Screen::Forward => break,
            Screen::Refuse => return Err(PumpError::Refused),
            Screen::NeedMore => {
                deadline.get_or_insert_with(|| Instant::now() + first.wait);
            }
        }
    }
    copy::write_rest(dst, &held[..len], 0, progress).await
}

/// Moves bytes from `src` to `dst` until EOF, then half-closes `dst`.
async fn pump(src: &TcpStream, dst: &TcpStream, progress: &Progress<'_>) -> Result<(), PumpError> {
    #[cfg(target_os = "linux")]
    match splice::pump(src, dst, progress).await {
        Err(PumpError::Unsupported(e)) => note_fallback(&e),
        done => return done,
    }
    copy::pump(src, dst, progress).await
}

/// Says once per process, at debug level, that splice(2) gave way to the buffered copy:
/// refused for a socket pair (for the rest of that connection), or no pipe could be made
/// (for the transfer under way).
#[cfg(target_os = "linux")]
fn note_fallback(error: &io::Error) {
    use std::sync::Once;
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        tracing::debug!(%error, "splice(2) not usable; using buffered copy where it is not");
    });
}

/// Makes the coming close of `stream` send RST instead of FIN (SO_LINGER 0), discarding
/// whatever it has not sent yet. A socket already reset is not an error here.
fn reset_on_close(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// Sends FIN to `dst` once its source reached EOF. A peer that is already gone is not an
/// error here: the other direction will report it.
pub(crate) fn half_close(dst: &TcpStream) {
    let _ = socket2::SockRef::from(dst).shutdown(Shutdown::Write);
}
