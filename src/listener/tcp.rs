//! TCP listening sockets and the accept loop. Owns socket options (SO_REUSEADDR, optional
//! SO_REUSEPORT for several accept tasks), the `max_connections` admission rule (beyond it a
//! connection is accepted and closed at once, counted, never left in the backlog) and the
//! accept-error policy: per-connection errors are ignored, resource errors (EMFILE...) back
//! off without spinning and are logged at most once per second.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error};

use crate::access_log::Record;
use crate::backend::ClientAddr;
use crate::conn::{self, CloseReason, ListenerCtx};
use crate::metrics::ListenerMetrics;
use crate::route::Refusal;

const LISTEN_BACKLOG: i32 = 4096;
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// Binds a listening socket (non-blocking, ready for tokio).
pub fn bind(addr: SocketAddr, reuse_port: bool) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// Binds `tasks` sockets to `addr` (SO_REUSEPORT when more than one). With port 0, the
/// first socket's port is used for the others.
pub fn bind_all(
    addr: SocketAddr,
    reuse_port: bool,
    tasks: usize,
) -> io::Result<Vec<std::net::TcpListener>> {
    let first = bind(addr, reuse_port)?;
    let bound = first.local_addr()?;
    let mut sockets = vec![first];
    for _ in 1..tasks {
        sockets.push(bind(bound, true)?);
    }
    Ok(sockets)
}

/// Whether an accept error concerns only the connection being accepted (the listener is fine).
fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
    ) || e.raw_os_error() == Some(libc::EPROTO)
        || e.raw_os_error() == Some(libc::EPERM)
}

/// Everything one accept task needs.
pub struct AcceptLoop {
    pub listener: TcpListener,
    pub ctx: Arc<ListenerCtx>,
    pub metrics: ListenerMetrics,
    /// Admission: one permit per open connection (shared by the listener's accept tasks).
    pub limit: Arc<Semaphore>,
    pub tracker: TaskTracker,
    /// Fires at shutdown: stop accepting and drop the socket.
    pub stop: CancellationToken,
}

impl AcceptLoop {
    /// Accepts until `stop` fires; hands the socket back (a reload may give it to a
    /// renamed listener).
    pub async fn run(self) -> TcpListener {
        let mut backoff = Duration::from_millis(5);
        let mut last_error_log: Option<Instant> = None;
        let mut suppressed = 0u64;
        loop {
            let accepted = tokio::select! {
                biased;
                () = self.stop.cancelled() => return self.listener,
                accepted = self.listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, peer)) => {
                    backoff = Duration::from_millis(5);
                    self.metrics.accepted.inc();
                    match Arc::clone(&self.limit).try_acquire_owned() {
                        Ok(permit) => {
                            self.tracker.spawn(conn::serve(
                                Arc::clone(&self.ctx),
                                stream,
                                peer,
                                permit,
                                self.ctx.shared.snapshot(),
                            ));
                        }
                        Err(_) => {
                            self.metrics.refused(Refusal::MaxConnections).inc();
                            debug!(listener = %self.ctx.name, client = %peer, "max_connections reached; closing");
                            drop(stream);
                            self.ctx.access_log.log(|| Record {
                                time: std::time::SystemTime::now(),
                                listener: Arc::clone(&self.ctx.name),
                                client: ClientAddr(peer),
                                pool: Arc::from("-"),
                                backend: None,
                                sni: None,
                                alpn: None,
                                bytes_from_client: 0,
                                bytes_to_client: 0,
                                duration: Duration::ZERO,
                                reason: CloseReason::Refused.as_str(),
                                refused: Some(Refusal::MaxConnections),
                            });
                        }
                    }
                }
                Err(e) if is_per_connection(&e) => {}
                Err(e) => {
                    self.metrics.accept_errors.inc();
                    let now = Instant::now();
                    if last_error_log
                        .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
                    {
                        error!(
                            listener = %self.ctx.name,
                            error = %e,
                            suppressed,
                            backoff_ms = backoff.as_millis() as u64,
                            "accept failed; backing off"
                        );
                        last_error_log = Some(now);
                        suppressed = 0;
                    } else {
                        suppressed += 1;
                    }
                    tokio::select! {
                        () = self.stop.cancelled() => return self.listener,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
                }
            }
        }
    }
}
