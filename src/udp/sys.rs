//! The UDP path's system interface. Batched datagram syscalls: `recvmmsg(2)` and
//! `sendmmsg(2)` move up to a batch of datagrams per call, each with its own length
//! (boundaries kept exactly) and address; a batch of one uses plain `recvfrom(2)` /
//! `sendto(2)`, which is also the measured baseline. Dropping what is queued on a spare
//! upstream socket before it serves another flow. And the registration of a flow table's
//! epoll set with the runtime.
//!
//! This is the one module where the crate allows `unsafe`: raw `libc` calls over headers
//! built on the stack for each call (so no raw pointer outlives a call and the caller's
//! buffers stay `Send`), and tokio's `AsyncFd::register`. Buffers are allocated once per
//! socket, so steady state allocates nothing.

use std::io;
use std::mem::{self, MaybeUninit};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd};

use nix::sys::epoll::Epoll;
use socket2::SockAddr;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// Bytes per datagram slot: the largest UDP payload (65507 over IPv4, 65527 over IPv6)
/// fits, so nothing real is ever truncated.
pub const SLOT: usize = 65536;
/// Most datagrams per call.
pub const MAX_BATCH: usize = 64;

/// One received datagram's metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    pub len: usize,
    pub from: Option<SocketAddr>,
    /// The datagram was longer than [`SLOT`] and was cut (it should be dropped).
    pub truncated: bool,
}

/// Receive slots for one socket, reused for every call.
#[derive(Debug)]
pub struct RecvBuffers {
    data: Box<[u8]>,
    meta: Box<[Received]>,
    batch: usize,
}

impl RecvBuffers {
    /// Room for `batch` datagrams (clamped to 1..=[`MAX_BATCH`]).
    pub fn new(batch: usize) -> RecvBuffers {
        let batch = batch.clamp(1, MAX_BATCH);
        RecvBuffers {
            data: vec![0u8; batch * SLOT].into_boxed_slice(),
            meta: vec![
                Received {
                    len: 0,
                    from: None,
                    truncated: false
                };
                batch
            ]
            .into_boxed_slice(),
            batch,
        }
    }

    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Datagram `i` of the last receive: its bytes and metadata.
    pub fn get(&self, i: usize) -> (&[u8], Received) {
        let meta = self.meta[i];
        let start = i * SLOT;
        (&self.data[start..start + meta.len.min(SLOT)], meta)
    }
}

fn sockaddr(storage: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    if len == 0 {
        return None;
    }
    // SAFETY: `storage` is a fully initialized sockaddr_storage (zeroed, then written by the
    // kernel), and `len` is the length the kernel reported, at most its size.
    let addr = unsafe { SockAddr::new(*storage, len) };
    addr.as_socket()
}

fn zeroed_storage() -> libc::sockaddr_storage {
    // SAFETY: sockaddr_storage is plain integers; all-zero is a valid value.
    unsafe { mem::zeroed() }
}

/// Receives up to `bufs.batch()` datagrams without blocking; returns how many (read them
/// with [`RecvBuffers::get`]). WouldBlock when none is queued.
pub fn recv_batch(fd: BorrowedFd<'_>, bufs: &mut RecvBuffers) -> io::Result<usize> {
    recv_up_to(fd, bufs, bufs.batch)
}

/// [`recv_batch`], for at most `max` datagrams (at least one): a reader that expects one
/// datagram makes one plain receive instead of setting up a batch of headers for a
/// `recvmmsg` that would try a second receive only to find the queue empty.
pub fn recv_up_to(fd: BorrowedFd<'_>, bufs: &mut RecvBuffers, max: usize) -> io::Result<usize> {
    let fd = fd.as_raw_fd();
    let batch = max.clamp(1, bufs.batch);
    if batch == 1 {
        let mut storage = zeroed_storage();
        let mut len = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // SAFETY: the buffer is SLOT writable bytes owned by `bufs`; storage and len are
        // valid for writes for the duration of the call. MSG_TRUNC makes the return value
        // the datagram's real length, so truncation can be detected.
        let n = unsafe {
            libc::recvfrom(
                fd,
                bufs.data.as_mut_ptr().cast(),
                SLOT,
                libc::MSG_DONTWAIT | libc::MSG_TRUNC,
                (&mut storage as *mut libc::sockaddr_storage).cast(),
                &mut len,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        bufs.meta[0] = Received {
            len: n.min(SLOT),
            from: sockaddr(&storage, len),
            truncated: n > SLOT,
        };
        return Ok(1);
    }

    let mut names = [MaybeUninit::<libc::sockaddr_storage>::uninit(); MAX_BATCH];
    let mut iovecs = [MaybeUninit::<libc::iovec>::uninit(); MAX_BATCH];
    let mut headers = [MaybeUninit::<libc::mmsghdr>::uninit(); MAX_BATCH];
    let base = bufs.data.as_mut_ptr();
    for i in 0..batch {
        let name = names[i].write(zeroed_storage());
        let iov = iovecs[i].write(libc::iovec {
            // SAFETY: i < batch <= bufs.batch, so the slot [i*SLOT, (i+1)*SLOT) is inside
            // `data` (bufs.batch slots long).
            iov_base: unsafe { base.add(i * SLOT) }.cast(),
            iov_len: SLOT,
        });
        // SAFETY: mmsghdr is plain integers and pointers; all-zero (null) is valid.
        let mut header: libc::mmsghdr = unsafe { mem::zeroed() };
        header.msg_hdr.msg_name = (name as *mut libc::sockaddr_storage).cast();
        header.msg_hdr.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        header.msg_hdr.msg_iov = iov;
        header.msg_hdr.msg_iovlen = 1;
        headers[i].write(header);
    }
    // SAFETY: the first `batch` headers are initialized and point at live, distinct
    // buffers (names, iovecs, data slots) that outlive the call; the kernel writes at most
    // msg_namelen bytes of name and iov_len bytes per slot. No timeout pointer.
    let n = unsafe {
        libc::recvmmsg(
            fd,
            headers.as_mut_ptr().cast(),
            batch as libc::c_uint,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    for i in 0..n {
        // SAFETY: initialized in the loop above (i < n <= batch), then updated by the kernel.
        let (header, name) = unsafe { (headers[i].assume_init_ref(), names[i].assume_init_ref()) };
        let len = header.msg_len as usize;
        bufs.meta[i] = Received {
            len: len.min(SLOT),
            from: sockaddr(name, header.msg_hdr.msg_namelen),
            truncated: header.msg_hdr.msg_flags & libc::MSG_TRUNC != 0,
        };
    }
    Ok(n)
}

/// Sends each of `msgs` as one datagram, to `to` (or the connected peer when None), without
/// blocking. Returns how many were sent, which may be fewer than asked (send the rest
/// again to learn why); an error means the first could not be sent.
pub fn send_batch(fd: BorrowedFd<'_>, msgs: &[&[u8]], to: Option<&SockAddr>) -> io::Result<usize> {
    let fd = fd.as_raw_fd();
    let (name, namelen) = match to {
        Some(addr) => (addr.as_ptr(), addr.len()),
        None => (std::ptr::null(), 0),
    };
    if msgs.is_empty() {
        return Ok(0);
    }
    if msgs.len() == 1 {
        let msg = msgs[0];
        // SAFETY: msg is a live slice; name is null or a valid sockaddr of namelen bytes
        // borrowed from `to` for the call.
        let n = unsafe {
            libc::sendto(
                fd,
                msg.as_ptr().cast(),
                msg.len(),
                libc::MSG_DONTWAIT,
                name,
                namelen,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        return Ok(1);
    }

    let count = msgs.len().min(MAX_BATCH);
    let mut iovecs = [MaybeUninit::<libc::iovec>::uninit(); MAX_BATCH];
    let mut headers = [MaybeUninit::<libc::mmsghdr>::uninit(); MAX_BATCH];
    for i in 0..count {
        let iov = iovecs[i].write(libc::iovec {
            // The kernel only reads through iov_base on send.
            iov_base: msgs[i].as_ptr().cast_mut().cast(),
            iov_len: msgs[i].len(),
        });
        // SAFETY: mmsghdr is plain integers and pointers; all-zero (null) is valid.
        let mut header: libc::mmsghdr = unsafe { mem::zeroed() };
        header.msg_hdr.msg_name = name.cast_mut().cast();
        header.msg_hdr.msg_namelen = namelen;
        header.msg_hdr.msg_iov = iov;
        header.msg_hdr.msg_iovlen = 1;
        headers[i].write(header);
    }
    // SAFETY: the first `count` headers are initialized and point at live slices and (when
    // given) the caller's address, all of which outlive the call; sendmmsg only reads them.
    let n = unsafe {
        libc::sendmmsg(
            fd,
            headers.as_mut_ptr().cast(),
            count as libc::c_uint,
            libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Receives and drops up to `max` queued datagrams without blocking; returns how many (fewer
/// than `max`: the queue is now empty). A pending socket error (ICMP port unreachable on a
/// connected socket, ...) is returned as the error; reading it clears it.
pub fn discard_queued(fd: BorrowedFd<'_>, max: usize) -> io::Result<usize> {
    let fd = fd.as_raw_fd();
    let mut byte = 0u8;
    for n in 0..max {
        // SAFETY: one writable byte on the stack, live for the call; a longer datagram is
        // cut to it and the rest dropped by the kernel, which is the point.
        let r = unsafe { libc::recv(fd, (&mut byte as *mut u8).cast(), 1, libc::MSG_DONTWAIT) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::WouldBlock {
                Ok(n)
            } else {
                Err(e)
            };
        }
    }
    Ok(max)
}

/// An epoll set owned by the runtime's reactor: readable when any socket in it is.
#[derive(Debug)]
pub struct EpollSet(Epoll);

impl std::os::fd::AsRawFd for EpollSet {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0 .0.as_raw_fd()
    }
}

/// Registers `epoll` with the current runtime for readability.
pub fn register_epoll(epoll: Epoll) -> io::Result<AsyncFd<EpollSet>> {
    // SAFETY: EpollSet owns the descriptor (an OwnedFd inside Epoll) and offers no way to
    // close or replace it, so it stays open and the same for the AsyncFd's whole life.
    unsafe { AsyncFd::register_with_interest(EpollSet(epoll), Interest::READABLE) }
        .map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsFd;

    fn pair() -> (UdpSocket, UdpSocket) {
        let a = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let b = UdpSocket::bind("127.0.0.1:0").expect("bind");
        (a, b)
    }

    #[test]
    fn batches_keep_boundaries_and_addresses() {
        for batch in [1, 4, MAX_BATCH] {
            let (a, b) = pair();
            let to = SockAddr::from(b.local_addr().expect("addr"));
            let payloads: Vec<Vec<u8>> = [0usize, 1, 512, 1500, 9000, 65507]
                .iter()
                .map(|&n| (0..n).map(|i| (i % 251) as u8).collect())
                .collect();
            let msgs: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
            let mut sent = 0;
            while sent < msgs.len() {
                sent += send_batch(a.as_fd(), &msgs[sent..], Some(&to)).expect("send");
            }
            let mut bufs = RecvBuffers::new(batch);
            let mut got = Vec::new();
            while got.len() < payloads.len() {
                let n = recv_batch(b.as_fd(), &mut bufs).expect("recv");
                for i in 0..n {
                    let (bytes, meta) = bufs.get(i);
                    assert_eq!(meta.from, Some(a.local_addr().expect("addr")));
                    assert!(!meta.truncated);
                    got.push(bytes.to_vec());
                }
            }
            assert_eq!(got, payloads, "batch {batch}");
            let e = recv_batch(b.as_fd(), &mut bufs).expect_err("empty");
            assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        }
    }

    #[test]
    fn recv_up_to_takes_no_more_than_asked() {
        let (a, b) = pair();
        let to = SockAddr::from(b.local_addr().expect("addr"));
        let msgs: [&[u8]; 4] = [b"1", b"22", b"333", b"4444"];
        assert_eq!(send_batch(a.as_fd(), &msgs, Some(&to)).expect("send"), 4);
        let mut bufs = RecvBuffers::new(8);
        assert_eq!(recv_up_to(b.as_fd(), &mut bufs, 1).expect("recv"), 1);
        assert_eq!(bufs.get(0).0, b"1");
        assert_eq!(recv_up_to(b.as_fd(), &mut bufs, 2).expect("recv"), 2);
        assert_eq!((bufs.get(0).0, bufs.get(1).0), (&b"22"[..], &b"333"[..]));
        assert_eq!(
            recv_up_to(b.as_fd(), &mut bufs, 0).expect("recv"),
            1,
            "at least one"
        );
        assert_eq!(bufs.get(0).0, b"4444");
    }

    #[test]
    fn discard_drops_queued_datagrams_up_to_max() {
        let (a, b) = pair();
        b.connect(a.local_addr().expect("addr")).expect("connect");
        assert_eq!(discard_queued(b.as_fd(), 8).expect("empty"), 0);
        let to = SockAddr::from(b.local_addr().expect("addr"));
        let big = vec![7u8; 9000];
        let msgs: [&[u8]; 5] = [b"1", b"", &big, b"4", b"5"];
        assert_eq!(send_batch(a.as_fd(), &msgs, Some(&to)).expect("send"), 5);
        assert_eq!(
            discard_queued(b.as_fd(), 3).expect("discard"),
            3,
            "at most max"
        );
        assert_eq!(discard_queued(b.as_fd(), 8).expect("discard"), 2);
        assert_eq!(discard_queued(b.as_fd(), 8).expect("empty"), 0);
        // An ICMP port unreachable pending on a connected socket comes back as the error.
        drop(a);
        send_batch(b.as_fd(), &[b"x"], None).expect("send");
        let mut e = discard_queued(b.as_fd(), 8);
        for _ in 0..100 {
            if e.is_err() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
            e = discard_queued(b.as_fd(), 8);
        }
        let e = e.expect_err("port unreachable");
        assert_eq!(e.raw_os_error(), Some(libc::ECONNREFUSED));
        assert_eq!(discard_queued(b.as_fd(), 8).expect("cleared"), 0);
    }

    #[test]
    fn connected_send_without_address() {
        let (a, b) = pair();
        a.connect(b.local_addr().expect("addr")).expect("connect");
        let n = send_batch(a.as_fd(), &[b"one", b"two"], None).expect("send");
        assert_eq!(n, 2);
        let mut bufs = RecvBuffers::new(8);
        let mut got = Vec::new();
        while got.len() < 2 {
            let n = recv_batch(b.as_fd(), &mut bufs).expect("recv");
            got.extend((0..n).map(|i| bufs.get(i).0.to_vec()));
        }
        assert_eq!(got, [b"one".to_vec(), b"two".to_vec()]);
    }
}
