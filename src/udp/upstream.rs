//! The upstream sockets of one UDP listener task: each is connected to one backend and sits
//! in the task's epoll set from when it is opened until it is closed. A flow borrows one; when
//! the flow ends cleanly (every expected reply came) and the listener reuses sockets
//! (`udp.reuse_upstream_sockets`), the socket rests as a spare (`udp::spare`) and then serves
//! a later flow to the same backend, still registered: a DNS query then costs no socket(2),
//! connect(2), epoll_ctl(2) or close(2). The epoll event of a socket carries its
//! [`UpstreamId`], not a flow's, so lending it to another flow changes a field here rather
//! than the registration.
//!
//! A late reply (a datagram the backend sends beyond `responses`, after the flow ended) looks
//! like any other, so reuse guards against it by time and ownership only:
//! - one that arrives while the socket is a spare and whose epoll event the task handles
//!   before a flow takes the socket is dropped (counted as `extra_reply`);
//! - one that arrives within the rest ([`REST_MS`] on the millisecond clock: at least 9 ms
//!   after the flow ended) is always dropped: no flow takes a resting spare, and taking one
//!   drops what is queued on it (one receive), unless a sweep of the set (every ready
//!   socket reported and handled, so every spare emptied) ran after the rest ended and had
//!   already dropped it;
//! - one that arrives later can reach the socket once another flow holds it, or after that
//!   sweep and before the taking: it is then passed to that flow's client as a reply.
//!
//! So a backend that sends no more than `responses` replies per datagram never has a reply
//! passed to the wrong client; one that breaks that contract later than the rest can. With
//! `udp.reuse_upstream_sockets: false` the listener releases no socket for reuse, and every
//! socket closes at its flow's end: a late reply then meets a closed port. Flows that end by
//! idleness, error, refusal, a backend going down or shutdown close their socket either
//! way. What this module does not do: pick backends, or decide which flows may give their
//! socket back (the listener, `listener::udp`).

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd};

use nix::sys::epoll::{Epoll, EpollEvent, EpollFlags, EpollTimeout};
use socket2::{Domain, Protocol, Socket, Type};

use super::flow::FlowId;
use super::slots::{SlotId, Slots};
use super::spare::{Spares, REST_MS};
use super::sys;

/// Datagrams dropped from a spare at once; more than this queued and the spare is closed
/// instead (its backend is sending what nobody asked for).
const DISCARD_MAX: usize = 64;

/// Handle to one upstream socket; stale once the socket is closed (its slot's generation
/// moves on). Fits in a `u64`, the epoll event's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamId(SlotId);

impl UpstreamId {
    pub fn to_u64(self) -> u64 {
        self.0.to_u64()
    }

    pub fn from_u64(v: u64) -> UpstreamId {
        UpstreamId(SlotId::from_u64(v))
    }
}

/// Whom an open upstream socket serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    Flow(FlowId),
    /// Nobody: it is a spare (or being opened).
    Spare,
}

/// A socket handed to a new flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    pub id: UpstreamId,
    /// A spare was reused (no new socket).
    pub reused: bool,
    /// Datagrams found queued on spares taken for it, dropped.
    pub discarded: usize,
}

/// Why no socket could be opened.
#[derive(Debug)]
pub enum OpenError {
    /// The socket itself could not be made or registered (a local resource problem).
    Local(io::Error),
    /// connect(2) to the backend failed (no route, ...).
    Connect(io::Error),
}

#[derive(Debug)]
struct Upstream {
    socket: Socket,
    backend: SocketAddr,
    flow: Option<FlowId>,
}

/// A task's upstream sockets, their epoll set and their spares.
#[derive(Debug)]
pub struct Upstreams {
    sockets: Slots<Upstream>,
    /// The set every open socket is registered in (a second descriptor of the one the
    /// runtime watches).
    epoll: Epoll,
    spares: Spares<SocketAddr, UpstreamId>,
    /// When [`ready`](Self::ready) last reported every ready socket (fewer events than
    /// room), taken before the call; 0: never.
    swept_ms: u64,
}

impl Upstreams {
    /// No sockets yet; at most `max_spares` kept as spares.
    pub fn new(epoll: Epoll, max_spares: usize) -> Upstreams {
        Upstreams {
            sockets: Slots::default(),
            epoll,
            spares: Spares::new(max_spares),
            swept_ms: 0,
        }
    }

    /// Ready sockets, without waiting; each event's data is an [`UpstreamId`]. The caller
    /// handles every event before it takes a spare again (replies read, spares emptied), so
    /// fewer events than room mark `now_ms` as a sweep.
    pub fn ready(&mut self, events: &mut [EpollEvent], now_ms: u64) -> nix::Result<usize> {
        let n = self.epoll.wait(events, EpollTimeout::ZERO)?;
        if n < events.len() {
            self.swept_ms = self.swept_ms.max(now_ms);
        }
        Ok(n)
    }

    /// A socket connected to `backend` for a new flow: a rested spare, emptied first unless
    /// the set was swept after its rest, or a new one. [`lend`](Self::lend) it to the flow
    /// once the flow has an id.
    pub fn open(&mut self, backend: SocketAddr, now_ms: u64) -> Result<Opened, OpenError> {
        let mut discarded = 0;
        while let Some((since, id)) = self.spares.take(&backend, now_ms) {
            // Clock readings are whole milliseconds: one more keeps the sweep after the rest.
            if self.swept_ms > since + REST_MS && self.get(id).is_some() {
                return Ok(Opened {
                    id,
                    reused: true,
                    discarded,
                });
            }
            match self.fd(id).map(|fd| sys::discard_queued(fd, DISCARD_MAX)) {
                Some(Ok(n)) if n < DISCARD_MAX => {
                    return Ok(Opened {
                        id,
                        reused: true,
                        discarded: discarded + n,
                    });
                }
                Some(Ok(n)) => {
                    discarded += n;
                    self.close(id);
                }
                // A pending error (a late ICMP unreachable): not worth keeping.
                Some(Err(_)) | None => self.close(id),
            }
        }
        let socket = match new_socket(backend) {
            Err(e) if is_out_of_descriptors(&e) && !self.spares.is_empty() => {
                // Spares are not worth a dropped flow: close the oldest and try again.
                if let Some(id) = self.spares.pop_oldest() {
                    self.close(id);
                }
                new_socket(backend)
            }
            other => other,
        }
        .map_err(OpenError::Local)?;
        socket
            .connect(&backend.into())
            .map_err(OpenError::Connect)?;
        let id = UpstreamId(self.sockets.insert(Upstream {
            socket,
            backend,
            flow: None,
        }));
        let registered = match self.fd(id) {
            Some(fd) => self
                .epoll
                .add(fd, EpollEvent::new(EpollFlags::EPOLLIN, id.to_u64())),
            None => Ok(()),
        };
        if let Err(e) = registered {
            self.close(id);
            return Err(OpenError::Local(io::Error::from(e)));
        }
        Ok(Opened {
            id,
            reused: false,
            discarded,
        })
    }

    /// Gives an opened socket to `flow`: its replies are that flow's from now on.
    pub fn lend(&mut self, id: UpstreamId, flow: FlowId) {
        if let Some(u) = self.get_mut(id) {
            u.flow = Some(flow);
        }
    }

    /// Takes a socket back from its flow: kept as a spare when `reuse` and there is room
    /// (resting from `now_ms`), closed otherwise.
    pub fn release(&mut self, id: UpstreamId, reuse: bool, now_ms: u64) {
        let Some(u) = self.get_mut(id) else {
            return;
        };
        u.flow = None;
        let backend = u.backend;
        if !reuse || self.spares.put(backend, id, now_ms).is_err() {
            self.close(id);
        }
    }

    pub fn fd(&self, id: UpstreamId) -> Option<BorrowedFd<'_>> {
        self.get(id).map(|u| u.socket.as_fd())
    }

    /// Whom a socket serves; None once it is closed.
    pub fn owner(&self, id: UpstreamId) -> Option<Owner> {
        self.get(id).map(|u| match u.flow {
            Some(flow) => Owner::Flow(flow),
            None => Owner::Spare,
        })
    }

    /// Drops what reached a spare (replies of a flow that has ended); returns how many. A
    /// spare with a pending error, or receiving more than it is worth, is closed.
    pub fn discard(&mut self, id: UpstreamId) -> usize {
        let Some(u) = self.get(id) else {
            return 0;
        };
        let backend = u.backend;
        match sys::discard_queued(u.socket.as_fd(), DISCARD_MAX) {
            Ok(n) if n < DISCARD_MAX => n,
            result => {
                self.spares.remove(&backend, &id);
                self.close(id);
                result.unwrap_or(0)
            }
        }
    }

    /// Closes the spares of backends `keep` rejects (removed by a reload, or down) and those
    /// unused for [`MAX_REST_MS`](super::spare::MAX_REST_MS).
    pub fn trim(&mut self, now_ms: u64, keep: impl Fn(SocketAddr) -> bool) {
        let sockets = &mut self.sockets;
        self.spares.trim(
            now_ms,
            |b| keep(*b),
            |id| {
                sockets.remove(id.0);
            },
        );
    }

    /// Spares held now.
    pub fn spares(&self) -> usize {
        self.spares.len()
    }

    /// Closes every spare (shutdown; flows give their sockets back through `release`).
    pub fn close_spares(&mut self) {
        for id in self.spares.drain() {
            self.sockets.remove(id.0);
        }
    }

    fn get(&self, id: UpstreamId) -> Option<&Upstream> {
        self.sockets.get(id.0)
    }

    fn get_mut(&mut self, id: UpstreamId) -> Option<&mut Upstream> {
        self.sockets.get_mut(id.0)
    }

    /// Closes a socket (closing its last descriptor also takes it out of the epoll set).
    fn close(&mut self, id: UpstreamId) {
        self.sockets.remove(id.0);
    }
}

/// A non-blocking UDP socket (not yet connected) for `backend`'s address family.
fn new_socket(backend: SocketAddr) -> io::Result<Socket> {
    Socket::new(
        Domain::for_address(backend),
        Type::DGRAM.nonblocking(),
        Some(Protocol::UDP),
    )
}

fn is_out_of_descriptors(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::udp::spare::{MAX_REST_MS, REST_MS};
    use nix::sys::epoll::EpollCreateFlags;
    use std::net::UdpSocket;

    fn upstreams(max_spares: usize) -> Upstreams {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).expect("epoll");
        Upstreams::new(epoll, max_spares)
    }

    fn backend() -> (UdpSocket, SocketAddr) {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let addr = socket.local_addr().expect("addr");
        (socket, addr)
    }

    fn flow(n: u64) -> FlowId {
        FlowId::from_u64(n)
    }

    /// The address the backend sees `id`'s datagrams come from.
    fn source(u: &Upstreams, id: UpstreamId, backend: &UdpSocket) -> SocketAddr {
        let fd = u.fd(id).expect("open");
        sys::send_batch(fd, &[b"q"], None).expect("send");
        let mut buf = [0u8; 16];
        let (_, from) = backend.recv_from(&mut buf).expect("recv");
        from
    }

    /// Ready sockets, as a sweep at `now` when fewer than 8.
    fn events(u: &mut Upstreams, now: u64) -> Vec<u64> {
        let mut events = vec![EpollEvent::empty(); 8];
        let n = u.ready(&mut events, now).expect("epoll_wait");
        events[..n].iter().map(|e| e.data()).collect()
    }

    #[test]
    fn a_cleanly_ended_flows_socket_serves_the_next_flow_after_resting() {
        let (b, addr) = backend();
        let mut u = upstreams(8);
        let first = u.open(addr, 0).expect("open");
        assert!(!first.reused);
        u.lend(first.id, flow(1));
        assert_eq!(u.owner(first.id), Some(Owner::Flow(flow(1))));
        let port = source(&u, first.id, &b);
        u.release(first.id, true, 10);
        assert_eq!(u.owner(first.id), Some(Owner::Spare));
        assert_eq!(u.spares(), 1);

        let resting = u.open(addr, 10 + REST_MS - 1).expect("open");
        assert!(!resting.reused, "a spare still resting is not lent");
        u.release(resting.id, false, 10);
        let again = u.open(addr, 10 + REST_MS).expect("open");
        assert_eq!(
            again,
            Opened {
                id: first.id,
                reused: true,
                discarded: 0
            }
        );
        u.lend(again.id, flow(2));
        assert_eq!(u.owner(again.id), Some(Owner::Flow(flow(2))));
        assert_eq!(source(&u, again.id, &b), port, "the same socket");
        assert_eq!(u.spares(), 0);
    }

    #[test]
    fn late_replies_to_a_spare_are_dropped_never_lent_on() {
        let (b, addr) = backend();
        let mut u = upstreams(8);
        let a = u.open(addr, 0).expect("open").id;
        u.lend(a, flow(1));
        let port = source(&u, a, &b);
        u.release(a, true, 0);
        // A late reply while it rests: the epoll event names the spare, and it is dropped.
        b.send_to(b"late 1", port).expect("send");
        assert_eq!(events(&mut u, 0), [a.to_u64()]);
        assert_eq!(u.discard(a), 1);
        assert!(events(&mut u, 0).is_empty(), "nothing left to read");
        // Another arrives after the last event was handled: taking the spare drops it.
        b.send_to(b"late 2", port).expect("send");
        b.send_to(b"late 3", port).expect("send");
        let again = u.open(addr, REST_MS).expect("open");
        assert_eq!((again.id, again.reused, again.discarded), (a, true, 2));
        let fd = u.fd(a).expect("open");
        let mut bufs = sys::RecvBuffers::new(4);
        let e = sys::recv_batch(fd, &mut bufs).expect_err("empty");
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        // The next flow's own reply is what it reads.
        assert_eq!(source(&u, a, &b), port);
        b.send_to(b"mine", port).expect("send");
        assert_eq!(sys::recv_batch(fd, &mut bufs).expect("recv"), 1);
        assert_eq!(bufs.get(0).0, b"mine");
    }

    #[test]
    fn a_sweep_after_the_rest_spares_the_drain_and_one_during_it_does_not() {
        let (b, addr) = backend();
        let mut u = upstreams(8);
        let a = u.open(addr, 0).expect("open").id;
        let port = source(&u, a, &b);
        u.release(a, true, 100);
        // Queued during the rest, with only a sweep inside the rest since: dropped on taking.
        b.send_to(b"late", port).expect("send");
        assert!(events(&mut u, 100 + REST_MS).contains(&a.to_u64()));
        let again = u.open(addr, 100 + REST_MS).expect("open");
        assert_eq!((again.id, again.reused, again.discarded), (a, true, 1));

        // A sweep after the rest found nothing queued: taking it makes no receive, so what
        // arrives after that sweep (later than the rest allows for) is the next flow's.
        u.release(a, true, 200);
        assert!(events(&mut u, 200 + REST_MS + 1).is_empty());
        b.send_to(b"after the sweep", port).expect("send");
        let again = u.open(addr, 200 + REST_MS + 1).expect("open");
        assert_eq!((again.id, again.reused, again.discarded), (a, true, 0));
        let mut bufs = sys::RecvBuffers::new(4);
        let fd = u.fd(a).expect("open");
        assert_eq!(sys::recv_up_to(fd, &mut bufs, 1).expect("queued"), 1);
        assert_eq!(bufs.get(0).0, b"after the sweep");
    }

    #[test]
    fn only_clean_ends_with_room_keep_a_spare_and_trim_closes_them() {
        let (_b1, one) = backend();
        let (_b2, two) = backend();
        let mut u = upstreams(2);
        let ids: Vec<UpstreamId> = (0..4)
            .map(|i| {
                u.open(if i % 2 == 0 { one } else { two }, 0)
                    .expect("open")
                    .id
            })
            .collect();
        u.release(ids[0], false, 0);
        assert_eq!(u.owner(ids[0]), None, "an unclean end closes the socket");
        u.release(ids[1], true, 0);
        u.release(ids[2], true, 0);
        u.release(ids[3], true, 0);
        assert_eq!(u.owner(ids[3]), None, "beyond max_spares it is closed");
        assert_eq!(u.spares(), 2);
        // Backend `two` left the pool (or went down): its spare goes at once; `one`'s once
        // it has rested too long.
        u.trim(1, |b| b == one);
        assert_eq!((u.owner(ids[1]), u.spares()), (None, 1));
        u.trim(MAX_REST_MS, |_| true);
        assert_eq!((u.owner(ids[2]), u.spares()), (None, 0));
        let fresh = u.open(one, MAX_REST_MS).expect("open");
        assert!(!fresh.reused);
        u.release(fresh.id, true, MAX_REST_MS);
        u.close_spares();
        assert_eq!((u.owner(fresh.id), u.spares()), (None, 0));
    }

    #[test]
    fn a_spare_with_a_pending_error_is_closed_not_lent() {
        let (b, addr) = backend();
        let mut u = upstreams(8);
        let a = u.open(addr, 0).expect("open").id;
        u.release(a, true, 0);
        drop(b);
        // Port unreachable for a datagram sent now (as if a late ICMP error came back); the
        // error shows as an epoll event.
        if let Some(fd) = u.fd(a) {
            let _ = sys::send_batch(fd, &[b"q"], None);
        }
        for _ in 0..100 {
            if !events(&mut u, 0).is_empty() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(events(&mut u, 0), [a.to_u64()]);
        let next = u.open(addr, REST_MS).expect("open");
        assert!(!next.reused, "a new socket instead");
        assert_eq!(u.owner(a), None);
    }
}
