//! Zero-downtime binary upgrade by handing the listening sockets to the new process.
//!
//! The running process serves a unix socket (`admin.upgrade_socket`). A new process started
//! with `--takeover PATH` (or `--takeover-if-running PATH`, which binds its own sockets when
//! no process serves PATH) connects to it and receives every listening socket, TCP and UDP
//! (and the admin socket), as file descriptors (SCM_RIGHTS), with a JSON header naming them
//! and carrying every backend's live state (health verdict, admin state, weight), so the new
//! process routes as the old one did from its first connection instead of waiting for its
//! checks to rise. It starts accepting and receiving on those very sockets, then answers
//! `ready` with the UDP listeners it took; only then does the old process stop accepting and
//! drain like on SIGTERM. The sockets never close and their accept queues and receive
//! buffers are shared, so no connection attempt is refused or reset and no datagram is lost
//! during the switch. A taken UDP listener of the old process stops reading its socket
//! (datagrams of its open flows go to the new process, which starts flows for them) and
//! relays backend replies until its flows end; one the new process did not take is read on,
//! as on a plain stop.
//! Only the same user (or root) may connect: the socket file is mode 0600 and the peer's
//! credentials are checked. This module owns the hand-over protocol and the one `unsafe`
//! conversion it needs.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, IoSlice, IoSliceMut, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use nix::sys::socket::{
    getsockopt, recvmsg, sendmsg, sockopt, ControlMessage, ControlMessageOwned, MsgFlags, SockType,
};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::backend::{BackendState, Carried};
use crate::config::{ListenerConfig, Protocol};
use crate::control::Control;

/// Most descriptors sent in one message (the kernel allows 253).
const FDS_PER_MESSAGE: usize = 200;
/// How long the old process waits for the new one to say it is ready.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    pid: u32,
    listeners: Vec<Entry>,
    admin: Option<Entry>,
    /// Live backend state, so the new process starts from the running one's verdicts.
    #[serde(default)]
    backends: Vec<BackendEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct BackendEntry {
    pool: String,
    backend: String,
    #[serde(flatten)]
    state: Carried,
}

/// The new process's answer once it accepts: `ready` and this, as JSON, on one line.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Ready {
    /// UDP listeners (name, bind as the old process named them) whose sockets it took.
    #[serde(default)]
    udp_taken: Vec<(String, SocketAddr)>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Entry {
    name: String,
    bind: SocketAddr,
    #[serde(default)]
    protocol: Protocol,
    fds: usize,
}

/// One listener's sockets, as sent to a new process.
pub struct Handed<'a> {
    pub name: &'a str,
    /// The address as configured (port 0 stays 0).
    pub bind: SocketAddr,
    pub protocol: Protocol,
    pub sockets: Vec<BorrowedFd<'a>>,
}

/// One listener's sockets, as received from the old process.
#[derive(Debug)]
struct Received {
    name: String,
    bind: SocketAddr,
    protocol: Protocol,
    sockets: Vec<OwnedFd>,
}

/// Sockets received from the previous process, waiting to be claimed by listeners.
#[derive(Debug)]
pub struct Takeover {
    stream: UnixStream,
    from_pid: u32,
    listeners: Vec<Received>,
    admin: Option<(SocketAddr, std::net::TcpListener)>,
    backends: Vec<BackendEntry>,
    udp_taken: Vec<(String, SocketAddr)>,
}

impl Takeover {
    /// Connects to a running process's upgrade socket and receives its listening sockets.
    pub fn connect(path: &Path) -> anyhow::Result<Takeover> {
        let stream = UnixStream::connect(path)
            .with_context(|| format!("takeover: cannot connect to {}", path.display()))?;
        Self::receive_from(stream)
    }

    /// Like [`Takeover::connect`], but `None` when no process serves `path`: the file is
    /// absent, or nothing listens on it (left by a process that died). For service units
    /// whose instances take turns: whichever starts takes over if the other runs.
    pub fn connect_if_running(path: &Path) -> anyhow::Result<Option<Takeover>> {
        use std::io::ErrorKind;
        match UnixStream::connect(path) {
            Ok(stream) => Self::receive_from(stream).map(Some),
            Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused) => {
                Ok(None)
            }
            Err(e) => {
                Err(e).with_context(|| format!("takeover: cannot connect to {}", path.display()))
            }
        }
    }

    fn receive_from(stream: UnixStream) -> anyhow::Result<Takeover> {
        stream.set_read_timeout(Some(READY_TIMEOUT))?;
        let (header, mut fds) = receive(&stream)?;
        let mut take = |e: &Entry| -> anyhow::Result<Vec<OwnedFd>> {
            if fds.len() < e.fds {
                bail!("takeover: fewer sockets received than announced");
            }
            let sockets: Vec<OwnedFd> = fds.drain(..e.fds).collect();
            for s in &sockets {
                let kind = getsockopt(s, sockopt::SockType)
                    .with_context(|| format!("takeover: socket of listener {:?}", e.name))?;
                if kind != sock_type(e.protocol) {
                    bail!(
                        "takeover: listener {:?} announced {:?} sockets, received {kind:?}",
                        e.name,
                        e.protocol
                    );
                }
            }
            Ok(sockets)
        };
        let mut listeners = Vec::new();
        for e in &header.listeners {
            listeners.push(Received {
                sockets: take(e)?,
                name: e.name.clone(),
                bind: e.bind,
                protocol: e.protocol,
            });
        }
        let admin = match &header.admin {
            Some(e) => take(e)?
                .pop()
                .map(|s| (e.bind, std::net::TcpListener::from(s))),
            None => None,
        };
        info!(
            from_pid = header.pid,
            listeners = listeners.len(),
            "received listening sockets"
        );
        Ok(Takeover {
            stream,
            from_pid: header.pid,
            listeners,
            admin,
            backends: header.backends,
            udp_taken: Vec::new(),
        })
    }

    /// The TCP sockets of the old listener with this name and bind address, or else of one
    /// with the same (non-zero-port) bind address.
    pub fn take_listener(&mut self, l: &ListenerConfig) -> Option<Vec<std::net::TcpListener>> {
        let sockets = self.take(l, Protocol::Tcp)?;
        Some(
            sockets
                .into_iter()
                .map(std::net::TcpListener::from)
                .collect(),
        )
    }

    /// The UDP sockets of the old listener with this name and bind address, or else of one
    /// with the same (non-zero-port) bind address.
    pub fn take_udp(&mut self, l: &ListenerConfig) -> Option<Vec<std::net::UdpSocket>> {
        let sockets = self.take(l, Protocol::Udp)?;
        Some(sockets.into_iter().map(std::net::UdpSocket::from).collect())
    }

    fn take(&mut self, l: &ListenerConfig, protocol: Protocol) -> Option<Vec<OwnedFd>> {
        let same = |r: &Received| r.protocol == protocol && r.bind == l.bind;
        let i = self
            .listeners
            .iter()
            .position(|r| same(r) && r.name == l.name)
            .or_else(|| {
                self.listeners
                    .iter()
                    .position(|r| same(r) && l.bind.port() != 0)
            })?;
        let taken = self.listeners.remove(i);
        if protocol == Protocol::Udp {
            self.udp_taken.push((taken.name, taken.bind));
        }
        let sockets = taken.sockets;
        for s in &sockets {
            // Shared with the old process; tokio needs it non-blocking (it already is).
            let _ = socket2::SockRef::from(s).set_nonblocking(true);
        }
        Some(sockets)
    }

    /// The old process's backend states by (pool, backend), to start from.
    pub fn backend_states(&self) -> HashMap<(String, String), Arc<BackendState>> {
        self.backends
            .iter()
            .map(|b| {
                let state = Arc::new(BackendState::from_carried(&b.state));
                ((b.pool.clone(), b.backend.clone()), state)
            })
            .collect()
    }

    /// The old admin socket, when it was bound to the same address.
    pub fn take_admin(&mut self, bind: SocketAddr) -> Option<std::net::TcpListener> {
        match self.admin.take() {
            Some((b, s)) if b == bind => {
                let _ = s.set_nonblocking(true);
                Some(s)
            }
            other => {
                self.admin = other;
                None
            }
        }
    }

    /// Tells the old process that this one accepts; it then stops accepting and drains.
    fn finish(mut self) -> anyhow::Result<()> {
        if !self.listeners.is_empty() {
            let names: Vec<&str> = self.listeners.iter().map(|r| r.name.as_str()).collect();
            info!(
                ?names,
                "sockets of listeners no longer configured are closed"
            );
        }
        let ready = Ready {
            udp_taken: std::mem::take(&mut self.udp_taken),
        };
        let mut line = b"ready ".to_vec();
        line.extend(serde_json::to_vec(&ready)?);
        line.push(b'\n');
        self.stream
            .write_all(&line)
            .context("takeover: tell the old process")?;
        info!(old_pid = self.from_pid, "took over; the old process drains");
        Ok(())
    }
}

/// The new process's answer: `ready`, then what it took as JSON. A bare `ready` (from a
/// binary before UDP hand-over) took no UDP socket: it bound its own.
fn parse_ready(line: &str) -> anyhow::Result<Ready> {
    let Some(rest) = line.trim().strip_prefix("ready") else {
        bail!("the new process did not confirm (it said {line:?})");
    };
    match rest.trim() {
        "" => Ok(Ready::default()),
        json => serde_json::from_str(json).context("the new process's ready line"),
    }
}

fn sock_type(protocol: Protocol) -> SockType {
    match protocol {
        Protocol::Tcp => SockType::Stream,
        Protocol::Udp => SockType::Datagram,
    }
}

/// Reads the header line and every announced descriptor.
fn receive(stream: &UnixStream) -> anyhow::Result<(Header, Vec<OwnedFd>)> {
    let mut data = Vec::new();
    let mut fds = Vec::new();
    let mut header: Option<Header> = None;
    loop {
        if let Some(h) = &header {
            let want = h.listeners.iter().map(|e| e.fds).sum::<usize>()
                + h.admin.as_ref().map_or(0, |e| e.fds);
            if fds.len() >= want {
                break;
            }
        }
        let mut buf = [0u8; 64 * 1024];
        let mut cmsg = nix::cmsg_space!([RawFd; FDS_PER_MESSAGE]);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .context("takeover: receive sockets")?;
        let n = msg.bytes;
        for c in msg.cmsgs().context("takeover: control message")? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                for fd in raw {
                    // SAFETY: the kernel has just installed `fd` in this process for this
                    // message (SCM_RIGHTS); nothing else refers to it, so owning it is sound.
                    #[allow(unsafe_code)]
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        if n == 0 {
            bail!("takeover: the old process closed the connection early");
        }
        data.extend_from_slice(&buf[..n]);
        if header.is_none() {
            if let Some(end) = data.iter().position(|b| *b == b'\n') {
                header =
                    Some(serde_json::from_slice(&data[..end]).context("takeover: bad header")?);
            }
        }
    }
    header
        .map(|h| (h, fds))
        .context("takeover: no header received")
}

/// Sends the header and the descriptors of every running listener and the admin socket.
fn send(
    stream: &UnixStream,
    listeners: &[Handed<'_>],
    admin: Option<&std::net::TcpListener>,
    backends: Vec<BackendEntry>,
) -> anyhow::Result<()> {
    let mut fds: Vec<RawFd> = Vec::new();
    let mut header = Header {
        pid: std::process::id(),
        listeners: Vec::new(),
        admin: None,
        backends,
    };
    for l in listeners {
        header.listeners.push(Entry {
            name: l.name.to_string(),
            bind: l.bind,
            protocol: l.protocol,
            fds: l.sockets.len(),
        });
        fds.extend(l.sockets.iter().map(|s| s.as_raw_fd()));
    }
    if let Some(a) = admin {
        header.admin = Some(Entry {
            name: "admin".into(),
            bind: a.local_addr()?,
            protocol: Protocol::Tcp,
            fds: 1,
        });
        fds.push(a.as_raw_fd());
    }
    let mut line = serde_json::to_vec(&header)?;
    line.push(b'\n');
    let mut chunks = fds.chunks(FDS_PER_MESSAGE);
    let first: &[RawFd] = chunks.next().unwrap_or(&[]);
    send_part(stream, &line, first)?;
    for chunk in chunks {
        send_part(stream, b" ", chunk)?;
    }
    Ok(())
}

fn send_part(stream: &UnixStream, bytes: &[u8], fds: &[RawFd]) -> anyhow::Result<()> {
    let iov = [IoSlice::new(bytes)];
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
    let sent = sendmsg::<()>(stream.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None)
        .context("takeover: send sockets")?;
    if sent != bytes.len() {
        bail!("takeover: short send");
    }
    Ok(())
}

/// The upgrade socket of a running process.
pub struct Handover {
    task: JoinHandle<()>,
    path: PathBuf,
}

impl Handover {
    /// Stops serving; removes the socket file unless a new process now owns it.
    pub fn close(self, handed_over: bool) {
        self.task.abort();
        if !handed_over {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Finishes a takeover (the old process starts draining), then serves the upgrade socket
/// when the config names one. Call once every listener accepts.
pub fn serve_handover(
    control: &Arc<Control>,
    takeover: Option<Takeover>,
    admin_socket: Option<std::net::TcpListener>,
) -> anyhow::Result<Option<Handover>> {
    if let Some(t) = takeover {
        t.finish()?;
    }
    let snapshot = control.shared.snapshot();
    let Some(path) = snapshot
        .config
        .admin
        .as_ref()
        .and_then(|a| a.upgrade_socket.clone())
    else {
        return Ok(None);
    };
    // A previous process's file (it has handed over, or died) is replaced.
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)
        .with_context(|| format!("upgrade socket: cannot bind {}", path.display()))?;
    // Whoever connects gets the listening sockets: only this user may.
    let owner = {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("upgrade socket: cannot restrict {}", path.display()))?;
        std::fs::metadata(&path)
            .with_context(|| format!("upgrade socket: {}", path.display()))?
            .uid()
    };
    info!(path = %path.display(), "upgrade socket ready");
    let control = Arc::clone(control);
    let admin_socket = admin_socket.map(Arc::new);
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            match hand_over(&control, owner, stream, admin_socket.clone()).await {
                Ok(()) => {
                    control.handed_over.cancel();
                    return;
                }
                Err(e) => {
                    warn!(error = %format!("{e:#}"), "takeover by a new process failed; still serving")
                }
            }
        }
    });
    Ok(Some(Handover { task, path }))
}

async fn hand_over(
    control: &Control,
    owner: u32,
    stream: tokio::net::UnixStream,
    admin: Option<Arc<std::net::TcpListener>>,
) -> anyhow::Result<()> {
    let peer = nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
        .context("upgrade socket: peer credentials")?;
    if peer.uid() != owner && peer.uid() != 0 {
        bail!(
            "upgrade socket: refused a process of uid {} (pid {})",
            peer.uid(),
            peer.pid()
        );
    }
    let stream = stream.into_std()?;
    stream.set_nonblocking(false)?;
    {
        // Held while sending, so a reload cannot close a socket being sent.
        let set = control.listeners.lock().await;
        let listeners = set.sockets();
        let snapshot = control.shared.snapshot();
        let backends = snapshot
            .pools
            .iter()
            .flat_map(|(pool, p)| {
                p.backends.iter().map(|b| BackendEntry {
                    pool: pool.clone(),
                    backend: b.name.to_string(),
                    state: b.state.carried(),
                })
            })
            .collect();
        send(&stream, &listeners, admin.as_deref(), backends)?;
        let names: HashMap<&str, usize> = listeners
            .iter()
            .map(|l| (l.name, l.sockets.len()))
            .collect();
        info!(
            ?names,
            "listening sockets sent to a new process; waiting for it to accept"
        );
    }
    let line = tokio::task::spawn_blocking(move || -> anyhow::Result<String> {
        stream.set_read_timeout(Some(READY_TIMEOUT))?;
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line)?;
        Ok(line)
    })
    .await??;
    let ready = parse_ready(&line)?;
    control.listeners.lock().await.release_udp(&ready.udp_taken);
    if !ready.udp_taken.is_empty() {
        let names: Vec<&str> = ready.udp_taken.iter().map(|(n, _)| n.as_str()).collect();
        info!(listeners = ?names, "udp sockets taken over; no longer read here");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn fds(sockets: &[std::net::TcpListener]) -> Vec<BorrowedFd<'_>> {
        sockets.iter().map(|s| s.as_fd()).collect()
    }

    #[test]
    fn sockets_and_header_cross_a_unix_socket_in_several_messages() {
        let (a, b) = UnixStream::pair().expect("pair");
        // More sockets than one message carries, to exercise the chunking.
        let sockets: Vec<std::net::TcpListener> = (0..FDS_PER_MESSAGE + 10)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind"))
            .collect();
        let datagram = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind udp");
        let admin = std::net::TcpListener::bind("127.0.0.1:0").expect("bind admin");
        let bind: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let handed = |name, protocol, sockets| Handed {
            name,
            bind,
            protocol,
            sockets,
        };
        let listeners = vec![
            handed("one", Protocol::Tcp, fds(&sockets[..3])),
            handed("dns", Protocol::Udp, vec![datagram.as_fd()]),
            handed("many", Protocol::Tcp, fds(&sockets[3..])),
        ];
        let (header, fds) = std::thread::scope(|scope| {
            let backends = vec![BackendEntry {
                pool: "pg".into(),
                backend: "db1".into(),
                state: Carried {
                    status: 5,
                    admin: 1,
                    weight: Some(3),
                },
            }];
            scope.spawn(|| send(&a, &listeners, Some(&admin), backends).expect("send"));
            receive(&b).expect("receive")
        });
        assert_eq!(header.pid, std::process::id());
        let b = &header.backends[0];
        assert_eq!((b.pool.as_str(), b.backend.as_str()), ("pg", "db1"));
        assert_eq!(b.state.weight, Some(3));
        let entries: Vec<(&str, Protocol, usize)> = header
            .listeners
            .iter()
            .map(|e| (e.name.as_str(), e.protocol, e.fds))
            .collect();
        assert_eq!(
            entries,
            [
                ("one", Protocol::Tcp, 3),
                ("dns", Protocol::Udp, 1),
                ("many", Protocol::Tcp, FDS_PER_MESSAGE + 7)
            ]
        );
        assert_eq!(fds.len(), FDS_PER_MESSAGE + 12);
        // Each received descriptor is the same socket as the one sent, in order.
        let addr = |fd: &OwnedFd| {
            nix::sys::socket::getsockname::<nix::sys::socket::SockaddrIn>(fd.as_raw_fd())
                .expect("getsockname")
                .port()
        };
        let sent_ports: Vec<u16> = sockets[..3]
            .iter()
            .map(|s| s.local_addr().expect("addr").port())
            .chain([datagram.local_addr().expect("addr").port()])
            .chain(
                sockets[3..]
                    .iter()
                    .map(|s| s.local_addr().expect("addr").port()),
            )
            .chain([admin.local_addr().expect("addr").port()])
            .collect();
        let got_ports: Vec<u16> = fds.iter().map(addr).collect();
        assert_eq!(got_ports, sent_ports);
        assert_eq!(
            getsockopt(&fds[3], sockopt::SockType).expect("type"),
            SockType::Datagram
        );
        assert_eq!(
            header.admin.expect("admin entry").bind,
            admin.local_addr().expect("addr")
        );
    }

    #[test]
    fn takeover_if_running_starts_fresh_when_nobody_serves_the_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("upgrade.sock");
        assert!(Takeover::connect_if_running(&path)
            .expect("absent")
            .is_none());
        // A file left by a process that died: nothing listens on it.
        drop(std::os::unix::net::UnixListener::bind(&path).expect("bind"));
        assert!(path.exists());
        assert!(Takeover::connect_if_running(&path)
            .expect("stale")
            .is_none());
        assert!(Takeover::connect(&path).is_err());
        // A running process answers with its sockets.
        std::fs::remove_file(&path).expect("remove");
        let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        let served = std::thread::spawn(move || {
            let (stream, _) = listener.accept().expect("accept");
            send(&stream, &[], None, Vec::new()).expect("send");
        });
        let taken = Takeover::connect_if_running(&path).expect("served");
        assert_eq!(taken.expect("a takeover").from_pid, std::process::id());
        served.join().expect("server thread");
    }

    #[test]
    fn ready_line_names_the_udp_listeners_taken() {
        let bind: SocketAddr = "127.0.0.1:53".parse().expect("addr");
        let ready =
            parse_ready("ready {\"udp_taken\":[[\"dns\",\"127.0.0.1:53\"]]}\n").expect("parses");
        assert_eq!(ready.udp_taken, vec![("dns".to_string(), bind)]);
        // An older binary says only `ready`: it took no UDP socket.
        assert!(parse_ready("ready\n").expect("bare").udp_taken.is_empty());
        assert!(parse_ready("").is_err());
        assert!(parse_ready("ready {not json").is_err());
    }
}
