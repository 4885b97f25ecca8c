//! A UDP listener: one socket on the listener address, one task, one flow table. A client's
//! first datagram starts a flow: the pool's balancer picks a backend and the flow gets its
//! own upstream socket connected to it, so the kernel hands back only that backend's
//! replies and each reply maps to one client. Replies leave through the listener's socket,
//! so the client sees the address it sent to.
//!
//! Upstream sockets are not registered with the runtime one by one: they sit in an epoll
//! set of their own, whose descriptor the runtime watches, so a single task serves every
//! flow without waking per socket. A flow that ended cleanly (`responses`) gives its socket
//! back as a spare for a later flow to the same backend (`udp::upstream`, which says what
//! that guarantees about late replies), so short flows such as DNS queries do not each open
//! and close one; with `udp.reuse_upstream_sockets: false` every flow closes its socket.
//! Datagrams move in batches (`udp::sys`), grouped per flow, into buffers allocated once; a
//! datagram costs no allocation.
//!
//! Health is shared with TCP: a flow whose backend went down or into maint moves to another
//! backend on its next datagram (a draining backend keeps its flows, as it keeps its TCP
//! connections), and an ICMP port unreachable (ECONNREFUSED on the connected socket) counts
//! as a passive failure on the backend's breaker. A pool with no backend available hands
//! new flows to its `fallback_pool`.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::io::unix::AsyncFdReadyGuard;
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::access_log::{AccessLog, Record};
use crate::backend::{ActiveGuard, BackendState, ClientAddr};
use crate::clock;
use crate::config::MAX_RETRIES;
use crate::conn::hash_key;
use crate::metrics::{GaugeShare, UdpMetrics};
use crate::state::{Pool, Route, Shared};
use crate::udp::flow::{FlowId, FlowTable, InsertError, ReplyVerdict};
use crate::udp::sys::{self, EpollSet, RecvBuffers, MAX_BATCH};
use crate::udp::upstream::{OpenError, Owner, UpstreamId, Upstreams};
use crate::udp::{DropReason, FlowEnd};

/// Socket buffers asked for the listener socket: room for bursts from many clients.
const LISTENER_BUFFER: usize = 4 * 1024 * 1024;
/// Batches taken from one socket before giving the others a turn.
const ROUNDS: usize = 8;
/// A task keeps at most one spare upstream socket per this many of its `max_flows`, so
/// spares add at most a quarter to the descriptors that setting allows.
const FLOWS_PER_SPARE: usize = 4;

/// Binds a listener socket (non-blocking, ready for the runtime).
pub fn bind(addr: SocketAddr, reuse_port: bool) -> io::Result<std::net::UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    // The kernel caps these at net.core.{r,w}mem_max; a smaller buffer still works.
    let _ = socket.set_recv_buffer_size(LISTENER_BUFFER);
    let _ = socket.set_send_buffer_size(LISTENER_BUFFER);
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Binds `tasks` sockets to `addr`, all with SO_REUSEPORT: with several, the kernel keeps
/// each client address on one socket, so each task's flow table sees all of a client's
/// datagrams; and a process started without `--takeover` can bind next to a running one
/// (HAProxy sets SO_REUSEPORT by default too). With port 0, the first socket's port is used
/// for the others.
pub fn bind_all(addr: SocketAddr, tasks: usize) -> io::Result<Vec<std::net::UdpSocket>> {
    let first = bind(addr, true)?;
    let bound = first.local_addr()?;
    let mut sockets = vec![first];
    for _ in 1..tasks {
        sockets.push(bind(bound, true)?);
    }
    Ok(sockets)
}

/// Everything one UDP listener task needs.
pub struct UdpLoop {
    pub name: Arc<str>,
    pub shared: Arc<Shared>,
    pub socket: std::net::UdpSocket,
    /// Tasks (sockets) of this listener; each tracks its share of `max_flows`.
    pub tasks: usize,
    /// Fires at shutdown: start no new flows; the task ends once the last flow has.
    pub stop: CancellationToken,
    /// Fires when the shutdown grace period ends: every flow ends now.
    pub close_all: CancellationToken,
    /// Fires when a new process has taken the socket over: stop reading it (the new
    /// process reads every datagram from then on) and relay replies until the flows end.
    pub released: CancellationToken,
    /// One record per flow at its end, written off the data path.
    pub access_log: AccessLog,
    /// Held until the loop has ended and closed its socket: the listener set knows a
    /// removed listener's address is free once no loop holds it.
    pub running: Arc<()>,
}

/// One client's flow.
struct Flow {
    upstream: UpstreamId,
    /// The listener's pool, or its fallback pool.
    pool: Arc<Pool>,
    backend: usize,
    _active: ActiveGuard,
    started: Instant,
    datagrams_from_client: u64,
    bytes_from_client: u64,
    datagrams_to_client: u64,
    bytes_to_client: u64,
    /// The backend answered with ICMP port unreachable: move on the next datagram.
    refused: bool,
}

/// What woke the listener task.
enum Wake<'a> {
    Close,
    Stop,
    Released,
    Tick,
    Clients(io::Result<()>),
    Replies(io::Result<AsyncFdReadyGuard<'a, EpollSet>>),
}

/// Counts gathered over one batch, added to the shared counters once per batch.
#[derive(Default)]
struct Tally {
    datagrams_from_clients: u64,
    bytes_from_clients: u64,
    datagrams_to_clients: u64,
    bytes_to_clients: u64,
    dropped: [u64; DropReason::ALL.len()],
    sockets_reused: u64,
    /// Payload bytes per backend (a batch's flows share a few backends); the allocation is
    /// kept from batch to batch.
    backends: Vec<BackendBytes>,
}

/// Payload bytes of one backend over one batch.
struct BackendBytes {
    pool: Arc<Pool>,
    index: usize,
    from_clients: u64,
    to_clients: u64,
}

impl Tally {
    fn drop(&mut self, reason: DropReason, n: u64) {
        self.dropped[reason as usize] += n;
    }

    /// Counts payload bytes of backend `index` of `pool`, each way.
    fn backend_bytes(
        &mut self,
        pool: &Arc<Pool>,
        index: usize,
        from_clients: u64,
        to_clients: u64,
    ) {
        if from_clients == 0 && to_clients == 0 {
            return;
        }
        // Flows in a row often share a backend: look from the latest.
        let found = self
            .backends
            .iter_mut()
            .rev()
            .find(|b| b.index == index && Arc::ptr_eq(&b.pool, pool));
        if let Some(b) = found {
            b.from_clients += from_clients;
            b.to_clients += to_clients;
        } else if self.backends.len() < MAX_BATCH {
            self.backends.push(BackendBytes {
                pool: Arc::clone(pool),
                index,
                from_clients,
                to_clients,
            });
        } else {
            // Many backends in one batch: no search longer than that.
            add_backend_bytes(pool, index, from_clients, to_clients);
        }
    }

    fn flush(&mut self, m: &UdpMetrics) {
        for b in self.backends.drain(..) {
            add_backend_bytes(&b.pool, b.index, b.from_clients, b.to_clients);
        }
        let add = |c: &prometheus::IntCounter, n: u64| {
            if n > 0 {
                c.inc_by(n);
            }
        };
        add(&m.datagrams_from_clients, self.datagrams_from_clients);
        add(&m.bytes_from_clients, self.bytes_from_clients);
        add(&m.datagrams_to_clients, self.datagrams_to_clients);
        add(&m.bytes_to_clients, self.bytes_to_clients);
        for reason in DropReason::ALL {
            add(m.dropped(reason), self.dropped[reason as usize]);
        }
        add(&m.upstream_sockets_reused, self.sockets_reused);
        *self = Tally {
            backends: std::mem::take(&mut self.backends),
            ..Tally::default()
        };
    }
}

fn add_backend_bytes(pool: &Pool, index: usize, from_clients: u64, to_clients: u64) {
    let m = &pool.backend_metrics[index];
    if from_clients > 0 {
        m.bytes_from_clients.inc_by(from_clients);
    }
    if to_clients > 0 {
        m.bytes_to_clients.inc_by(to_clients);
    }
}

/// The flow table and what changes it (everything but the socket buffers).
struct Flows {
    name: Arc<str>,
    shared: Arc<Shared>,
    table: FlowTable<Flow>,
    /// The upstream sockets, in an epoll set (a second descriptor of the one the runtime
    /// watches), and their spares.
    upstreams: Upstreams,
    metrics: UdpMetrics,
    /// This task's part of the listener's spare-socket gauge.
    spares_gauge: GaugeShare,
    tally: Tally,
    /// `udp.reuse_upstream_sockets`: flows that got their `responses` leave their socket as a
    /// spare.
    reuse_sockets: bool,
    draining: bool,
    last_socket_warning: Option<Instant>,
    access_log: AccessLog,
}

impl UdpLoop {
    pub async fn run(self) {
        let name = Arc::clone(&self.name);
        if let Err(e) = self.serve().await {
            warn!(listener = %name, error = %e, "udp listener stopped");
        }
    }

    async fn serve(self) -> io::Result<()> {
        let socket = UdpSocket::from_std(self.socket)?;
        let snapshot = self.shared.snapshot();
        let Some(route) = snapshot.route(&self.name) else {
            return Ok(());
        };
        let udp = route.config.udp;
        drop(snapshot);
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(io::Error::from)?;
        // The runtime watches one descriptor of the set; sockets are added through another.
        let registry = Epoll(epoll.0.try_clone()?);
        let epoll = sys::register_epoll(epoll)?;
        let max_flows = udp.max_flows.div_ceil(self.tasks.max(1));
        let metrics = self.shared.metrics.udp(&self.name);
        let mut flows = Flows {
            name: Arc::clone(&self.name),
            shared: Arc::clone(&self.shared),
            table: FlowTable::new(
                udp.idle_timeout.as_millis() as u64,
                udp.responses,
                max_flows,
            ),
            upstreams: Upstreams::new(registry, max_flows.div_ceil(FLOWS_PER_SPARE)),
            spares_gauge: GaugeShare::new(metrics.upstream_sockets_spare.clone()),
            metrics,
            tally: Tally::default(),
            reuse_sockets: udp.reuse_upstream_sockets,
            draining: false,
            last_socket_warning: None,
            access_log: self.access_log.clone(),
        };
        let mut client_bufs = RecvBuffers::new(udp.batch);
        let mut reply_bufs = RecvBuffers::new(udp.batch);
        let mut events = vec![EpollEvent::empty(); MAX_BATCH];
        let tick = (udp.idle_timeout / 10).clamp(Duration::from_millis(10), Duration::from_secs(1));
        let mut ticker = tokio::time::interval(tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        // One poll function over everything the task waits for: each source keeps a single
        // registered waker (no waiter list to join and leave per wake-up), and the two
        // sockets take turns going first so neither starves the other.
        let closed = self.close_all.cancelled();
        let stopping = self.stop.cancelled();
        let released = self.released.cancelled();
        tokio::pin!(closed, stopping, released);
        let mut replies_first = false;
        let mut reading_clients = true;
        loop {
            replies_first = !replies_first;
            let draining = flows.draining;
            let wake = std::future::poll_fn(|cx| {
                if closed.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Wake::Close);
                }
                if reading_clients && released.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Wake::Released);
                }
                if !draining && stopping.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Wake::Stop);
                }
                if ticker.poll_tick(cx).is_ready() {
                    return Poll::Ready(Wake::Tick);
                }
                for replies in [replies_first, !replies_first] {
                    if replies {
                        if let Poll::Ready(r) = epoll.poll_read_ready(cx) {
                            return Poll::Ready(Wake::Replies(r));
                        }
                    } else if reading_clients {
                        if let Poll::Ready(r) = socket.poll_recv_ready(cx) {
                            return Poll::Ready(Wake::Clients(r));
                        }
                    }
                }
                Poll::Pending
            })
            .await;
            match wake {
                Wake::Close => break,
                Wake::Stop | Wake::Released => {
                    // Taken over: the new process reads the socket from now on.
                    reading_clients = !self.released.is_cancelled();
                    flows.draining = true;
                    if flows.table.is_empty() {
                        break;
                    }
                }
                Wake::Clients(ready) => {
                    ready?;
                    flows.client_datagrams(&socket, &mut client_bufs);
                }
                Wake::Replies(ready) => {
                    let mut guard = ready?;
                    if flows.backend_replies(socket.as_fd(), &mut events, &mut reply_bufs) {
                        guard.clear_ready();
                    }
                }
                Wake::Tick => {
                    let now = clock::now_ms();
                    flows.expire(now);
                    flows.trim_spares(now);
                    if flows.draining && flows.table.is_empty() {
                        break;
                    }
                }
            }
            flows.tally.flush(&flows.metrics);
            flows.spares_gauge.publish(flows.upstreams.spares() as i64);
        }
        for (client, flow) in flows.table.drain() {
            flows.end(client, flow, FlowEnd::Shutdown);
        }
        flows.upstreams.close_spares();
        flows.spares_gauge.publish(0);
        flows.tally.flush(&flows.metrics);
        Ok(())
    }
}

impl Flows {
    /// Reads client datagrams (a few batches) and forwards each to its flow's backend.
    fn client_datagrams(&mut self, socket: &UdpSocket, bufs: &mut RecvBuffers) {
        for _ in 0..ROUNDS {
            let received =
                socket.try_io(Interest::READABLE, || sys::recv_batch(socket.as_fd(), bufs));
            let n = match received {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    // Unconnected UDP sockets report no ICMP errors; anything here is local.
                    debug!(listener = %self.name, error = %e, "udp receive failed");
                    return;
                }
            };
            self.forward_batch(bufs, n);
            if n < bufs.batch() {
                return;
            }
        }
    }

    /// Forwards a batch of client datagrams: each flow's datagrams, in order, go out in one
    /// sendmmsg (clients interleave in a batch, so grouping only neighbours would not do).
    fn forward_batch(&mut self, bufs: &RecvBuffers, n: usize) {
        let now = clock::now_ms();
        let mut ids: [Option<FlowId>; MAX_BATCH] = [None; MAX_BATCH];
        for (i, slot) in ids.iter_mut().enumerate().take(n) {
            let (_, meta) = bufs.get(i);
            if meta.truncated {
                self.tally.drop(DropReason::Truncated, 1);
                continue;
            }
            let Some(client) = meta.from else {
                continue;
            };
            match self.flow_for(client, now) {
                Ok(id) => {
                    self.table.on_request(id, now);
                    *slot = Some(id);
                }
                Err(reason) => self.tally.drop(reason, 1),
            }
        }
        let mut group: [&[u8]; MAX_BATCH] = [&[]; MAX_BATCH];
        for i in 0..n {
            let Some(id) = ids[i] else {
                continue;
            };
            let mut len = 0;
            for (j, other) in ids.iter_mut().enumerate().take(n).skip(i) {
                if *other == Some(id) {
                    group[len] = bufs.get(j).0;
                    len += 1;
                    *other = None;
                }
            }
            self.send_upstream(id, &group[..len], now);
        }
    }

    /// The flow for a client datagram: its current one, or a new one when it has none or
    /// its backend is down, in maint or refused it (a draining backend keeps its flows).
    fn flow_for(&mut self, client: SocketAddr, now: u64) -> Result<FlowId, DropReason> {
        let mut avoid = None;
        if let Some(id) = self.table.lookup(&client) {
            let Some(flow) = self.table.get(id) else {
                return Err(DropReason::NoBackend);
            };
            let backend = &flow.pool.backends[flow.backend];
            if !flow.refused && backend.state.may_keep_traffic(now) {
                return Ok(id);
            }
            let reason = if flow.refused {
                avoid = Some(Arc::clone(&backend.state));
                FlowEnd::BackendRefused
            } else {
                FlowEnd::BackendDown
            };
            if let Some((client, flow)) = self.table.remove(id) {
                self.end(client, flow, reason);
            }
        }
        self.start_flow(client, now, avoid.as_deref())
    }

    /// Starts a flow on the listener's pool; when none of its backends is available, on its
    /// `fallback_pool` (as a TCP connection would).
    fn start_flow(
        &mut self,
        client: SocketAddr,
        now: u64,
        avoid: Option<&BackendState>,
    ) -> Result<FlowId, DropReason> {
        if self.draining {
            return Err(DropReason::Shutdown);
        }
        if self.table.is_full() {
            self.expire(now);
            if self.table.is_full() {
                return Err(DropReason::MaxFlows);
            }
        }
        let snapshot = self.shared.snapshot();
        let route = snapshot.route(&self.name).ok_or(DropReason::NoBackend)?;
        if let Some(id) = self.open_flow(client, &route.pool, now, avoid)? {
            return Ok(id);
        }
        let fallback = route
            .pool
            .config
            .fallback_pool
            .as_ref()
            .and_then(|name| snapshot.pools.get(name))
            .ok_or(DropReason::NoBackend)?;
        route.pool.metrics.fallback.inc();
        self.open_flow(client, fallback, now, avoid)?
            .ok_or(DropReason::NoBackend)
    }

    /// Opens a flow to a backend of `pool` (skipping `avoid`, retrying the next one when
    /// connect fails); None when the pool has no backend available.
    fn open_flow(
        &mut self,
        client: SocketAddr,
        pool: &Arc<Pool>,
        now: u64,
        avoid: Option<&BackendState>,
    ) -> Result<Option<FlowId>, DropReason> {
        let key = hash_key(pool.hash_key(), ClientAddr(client), None);
        let mut tried = [usize::MAX; MAX_RETRIES as usize + 2];
        let mut n = 0;
        if let Some(index) = avoid.and_then(|state| {
            pool.backends
                .iter()
                .position(|b| std::ptr::eq(Arc::as_ptr(&b.state), state))
        }) {
            tried[0] = index;
            n = 1;
        }
        let skipped = n;
        let attempts = n + pool.config.retries as usize + 1;
        while n < attempts {
            let Some(index) = pool.balancer.pick(&pool.backends, key, &tried[..n], now) else {
                break;
            };
            tried[n] = index;
            n += 1;
            let backend = &pool.backends[index];
            let upstream = match self.upstreams.open(backend.addr.0, now) {
                Ok(opened) => {
                    self.tally
                        .drop(DropReason::ExtraReply, opened.discarded as u64);
                    self.tally.sockets_reused += u64::from(opened.reused);
                    opened.id
                }
                Err(OpenError::Local(e)) => {
                    self.warn_socket(&e);
                    return Err(DropReason::SocketError);
                }
                Err(OpenError::Connect(e)) => {
                    debug!(pool = %pool.config.name, backend = %backend.name, error = %e, "udp connect failed");
                    self.passive_failure(pool, index, now);
                    continue;
                }
            };
            let flow = Flow {
                upstream,
                pool: Arc::clone(pool),
                backend: index,
                _active: backend.state.connection_opened(),
                started: Instant::now(),
                datagrams_from_client: 0,
                bytes_from_client: 0,
                datagrams_to_client: 0,
                bytes_to_client: 0,
                refused: false,
            };
            let id = match self.table.insert(client, flow, now) {
                Ok(id) => id,
                Err(InsertError::Full(flow) | InsertError::Exists(flow)) => {
                    self.upstreams.release(flow.upstream, false, now);
                    return Err(DropReason::MaxFlows);
                }
            };
            self.upstreams.lend(upstream, id);
            self.metrics.flows_created.inc();
            self.metrics.flows_active.inc();
            return Ok(Some(id));
        }
        if n == skipped {
            return Ok(None);
        }
        Err(DropReason::NoBackend)
    }

    /// Sends one flow's datagrams to its backend.
    fn send_upstream(&mut self, id: FlowId, msgs: &[&[u8]], now: u64) {
        let found = self
            .table
            .get_mut(id)
            .and_then(|flow| Some((self.upstreams.fd(flow.upstream)?, flow)));
        let Some((upstream, flow)) = found else {
            // Replaced later in the same batch (its backend went down meanwhile).
            self.tally.drop(DropReason::SendError, msgs.len() as u64);
            return;
        };
        let mut sent = 0;
        let mut refused = false;
        while sent < msgs.len() {
            match sys::send_batch(upstream, &msgs[sent..], None) {
                Ok(0) => break,
                Ok(n) => {
                    let bytes: usize = msgs[sent..sent + n].iter().map(|m| m.len()).sum();
                    flow.datagrams_from_client += n as u64;
                    flow.bytes_from_client += bytes as u64;
                    self.tally
                        .backend_bytes(&flow.pool, flow.backend, bytes as u64, 0);
                    self.tally.datagrams_from_clients += n as u64;
                    self.tally.bytes_from_clients += bytes as u64;
                    sent += n;
                }
                Err(e) => {
                    refused = e.raw_os_error() == Some(libc::ECONNREFUSED);
                    break;
                }
            }
        }
        if sent < msgs.len() {
            self.tally
                .drop(DropReason::SendError, (msgs.len() - sent) as u64);
        }
        if refused {
            flow.refused = true;
            let (pool, backend) = (Arc::clone(&flow.pool), flow.backend);
            self.passive_failure(&pool, backend, now);
        }
    }

    /// Drains ready upstream sockets, sending replies to clients. True when nothing was left
    /// ready (the caller then clears the epoll set's readiness).
    fn backend_replies(
        &mut self,
        listener: BorrowedFd<'_>,
        events: &mut [EpollEvent],
        bufs: &mut RecvBuffers,
    ) -> bool {
        for _ in 0..ROUNDS {
            let now = clock::now_ms();
            let n = match self.upstreams.ready(events, now) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    warn!(listener = %self.name, error = %e, "epoll_wait failed");
                    return true;
                }
            };
            if n == 0 {
                return true;
            }
            for event in &events[..n] {
                let upstream = UpstreamId::from_u64(event.data());
                match self.upstreams.owner(upstream) {
                    Some(Owner::Flow(id)) => self.replies(id, upstream, listener, bufs, now),
                    Some(Owner::Spare) => {
                        let late = self.upstreams.discard(upstream);
                        self.tally.drop(DropReason::ExtraReply, late as u64);
                    }
                    None => {}
                }
            }
        }
        false
    }

    /// Reads one flow's replies (a few batches) from its upstream socket and sends them to
    /// its client.
    fn replies(
        &mut self,
        id: FlowId,
        upstream: UpstreamId,
        listener: BorrowedFd<'_>,
        bufs: &mut RecvBuffers,
        now: u64,
    ) {
        let Some(client) = self.table.key(id) else {
            // Lent to a flow that is gone without giving it back: nobody reads it.
            self.upstreams.release(upstream, false, now);
            return;
        };
        let to = SockAddr::from(client);
        for _ in 0..ROUNDS {
            // A DNS flow waits for one reply: one plain receive, not a batch.
            let want = match self.table.replies_owed(id) {
                Some(owed) => (owed as usize).clamp(1, bufs.batch()),
                None => bufs.batch(),
            };
            let received = match self.upstreams.fd(upstream) {
                Some(fd) => sys::recv_up_to(fd, bufs, want),
                None => return,
            };
            let n = match received {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // ECONNREFUSED is ICMP port unreachable; host or network unreachable
                    // and the like arrive the same way. Reading the error clears it.
                    debug!(listener = %self.name, client = %client, error = %e, "udp backend error");
                    self.refused(id, now);
                    return;
                }
            };
            if n > 0 {
                self.first_reply(id);
            }
            let mut group: [&[u8]; MAX_BATCH] = [&[]; MAX_BATCH];
            let mut len = 0;
            let mut ended = false;
            for i in 0..n {
                let (bytes, meta) = bufs.get(i);
                if ended {
                    self.tally.drop(DropReason::ExtraReply, 1);
                    continue;
                }
                if meta.truncated {
                    self.tally.drop(DropReason::Truncated, 1);
                    continue;
                }
                match self.table.on_reply(id, now) {
                    Some(ReplyVerdict::Forward) => {}
                    Some(ReplyVerdict::ForwardAndEnd) => ended = true,
                    None => return,
                }
                group[len] = bytes;
                len += 1;
            }
            self.send_to_client(id, listener, &group[..len], &to);
            if ended {
                if let Some((client, flow)) = self.table.remove(id) {
                    self.end(client, flow, FlowEnd::Responses);
                }
                return;
            }
            if n < want {
                return;
            }
        }
    }

    fn send_to_client(
        &mut self,
        id: FlowId,
        listener: BorrowedFd<'_>,
        msgs: &[&[u8]],
        to: &SockAddr,
    ) {
        let mut sent = 0;
        let mut bytes_sent = 0;
        while sent < msgs.len() {
            match sys::send_batch(listener, &msgs[sent..], Some(to)) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    bytes_sent += msgs[sent..sent + n]
                        .iter()
                        .map(|m| m.len() as u64)
                        .sum::<u64>();
                    sent += n;
                }
            }
        }
        if sent < msgs.len() {
            self.tally
                .drop(DropReason::ClientSendError, (msgs.len() - sent) as u64);
        }
        self.tally.datagrams_to_clients += sent as u64;
        self.tally.bytes_to_clients += bytes_sent;
        if let Some(flow) = self.table.get_mut(id) {
            flow.datagrams_to_client += sent as u64;
            flow.bytes_to_client += bytes_sent;
            self.tally
                .backend_bytes(&flow.pool, flow.backend, 0, bytes_sent);
        }
    }

    /// A flow's first reply shows its backend works: its failure count starts again.
    fn first_reply(&self, id: FlowId) {
        if let Some(flow) = self.table.get(id) {
            if flow.datagrams_to_client == 0 {
                flow.pool.backends[flow.backend]
                    .state
                    .record_connect_success();
            }
        }
    }

    /// The backend refused a flow's datagram (ICMP port unreachable).
    fn refused(&mut self, id: FlowId, now: u64) {
        let Some(flow) = self.table.get_mut(id) else {
            return;
        };
        flow.refused = true;
        let (pool, backend) = (Arc::clone(&flow.pool), flow.backend);
        self.passive_failure(&pool, backend, now);
    }

    fn passive_failure(&self, pool: &Pool, index: usize, now: u64) {
        pool.backend_metrics[index].udp_unreachable.inc();
        crate::health::passive::record_failure(pool, index, now, || {
            format!(
                "{} consecutive udp port unreachable errors",
                pool.breaker.max_fails
            )
        });
    }

    fn expire(&mut self, now: u64) {
        while let Some((client, flow)) = self.table.pop_expired(now) {
            self.end(client, flow, FlowEnd::IdleTimeout);
        }
    }

    /// Closes the spares of backends that can take no new flow (removed from the pool and its
    /// fallback by a reload, or not available), and those unused for a while.
    fn trim_spares(&mut self, now: u64) {
        if self.upstreams.spares() == 0 {
            return;
        }
        let snapshot = self.shared.snapshot();
        let route = snapshot.route(&self.name);
        let fallback = route
            .and_then(|r| r.pool.config.fallback_pool.as_ref())
            .and_then(|name| snapshot.pools.get(name));
        let pools = route.map(|r| &r.pool).into_iter().chain(fallback);
        self.upstreams.trim(now, |addr| {
            pools
                .clone()
                .flat_map(|p| p.backends.iter())
                .any(|b| b.addr.0 == addr && b.is_available(now))
        });
    }

    /// Counts and logs a flow that has left the table, and takes its socket back: kept as a
    /// spare when every expected reply came (and sockets are reused, and the balancer is not
    /// stopping), else closed.
    fn end(&mut self, client: SocketAddr, flow: Flow, reason: FlowEnd) {
        let reuse =
            self.reuse_sockets && reason == FlowEnd::Responses && !flow.refused && !self.draining;
        self.upstreams
            .release(flow.upstream, reuse, clock::now_ms());
        self.metrics.flows_active.dec();
        self.metrics.flows_expired(reason).inc();
        let backend = &flow.pool.backends[flow.backend];
        debug!(
            listener = %self.name,
            client = %client,
            pool = %flow.pool.config.name,
            backend = %backend.addr,
            datagrams_from_client = flow.datagrams_from_client,
            bytes_from_client = flow.bytes_from_client,
            datagrams_to_client = flow.datagrams_to_client,
            bytes_to_client = flow.bytes_to_client,
            duration_ms = flow.started.elapsed().as_millis() as u64,
            reason = reason.as_str(),
            "flow ended"
        );
        self.access_log.log(|| Record {
            time: std::time::SystemTime::now(),
            listener: Arc::clone(&self.name),
            client: ClientAddr(client),
            pool: Arc::from(flow.pool.config.name.as_str()),
            backend: Some((Arc::clone(&backend.name), backend.addr)),
            sni: None,
            alpn: None,
            bytes_from_client: flow.bytes_from_client,
            bytes_to_client: flow.bytes_to_client,
            duration: flow.started.elapsed(),
            reason: reason.as_str(),
            refused: None,
        });
    }

    /// Logs a local socket failure (e.g. out of file descriptors) at most once a second.
    fn warn_socket(&mut self, e: &io::Error) {
        let now = Instant::now();
        if self
            .last_socket_warning
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
        {
            self.last_socket_warning = Some(now);
            warn!(listener = %self.name, error = %e, "cannot open an upstream udp socket; dropping new flows");
        }
    }
}

/// Logs that a UDP listener is serving.
pub fn log_listening(name: &str, route: &Route) {
    info!(listener = %name, bind = %route.config.bind, protocol = "udp", pool = %route.pool.config.name, "listening");
}
