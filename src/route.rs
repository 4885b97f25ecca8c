//! The routing step of a connection, before any backend is chosen: read a PROXY header from
//! a trusted peer, apply the source ACL, then (TLS passthrough) read the ClientHello, answering
//! a Postgres SSLRequest first when asked to, and choose the pool by SNI. Bytes are read, not
//! peeked, and handed back as `replay`, so the backend later receives exactly what the client
//! sent (minus the PROXY header and the SSLRequest, which are consumed here and re-sent by
//! [`handshake_backend`]). Every read has a deadline; malformed input ends in a [`Refusal`]
//! the caller counts. A PROXY header from a peer not trusted to send one is refused: here when
//! the listener reads the client first (TLS), else by a [`FirstBytes`] check as forwarding
//! starts, so a backend that speaks first is not kept waiting. The parsers themselves are pure
//! (`tls`, `proxy_protocol`, `acl`).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::debug;

use crate::acl::{self, Acl, Verdict};
use crate::backend::ClientAddr;
use crate::config::{AcceptProxy, ListenerConfig, SniPattern, TlsPassthrough};
use crate::conn::CloseReason;
use crate::forward::{FirstBytes, Screen};
use crate::proxy_protocol::{self, Decoded, Header};
use crate::state::{Pool, Route};
use crate::tls::postgres::{self, Opening};
use crate::tls::sni::{self, ClientHello, HelloError, Parsed};

/// Why the routing step closed a connection: a bounded set, used as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The listener already has `max_connections` open (turned away at accept).
    MaxConnections,
    /// The source address is denied by the listener's ACL.
    AclDenied,
    /// A peer not in `accept_proxy_protocol.from` sent a PROXY header (on a plain listener,
    /// found while forwarding: the header is held back and the connection closed).
    ProxyUntrusted,
    /// A trusted peer sent a broken PROXY header, or none.
    ProxyMalformed,
    /// A trusted peer did not send its whole PROXY header in time.
    ProxyTimeout,
    /// The first bytes on a TLS passthrough listener are not a TLS handshake.
    NotTls,
    /// A broken ClientHello (or a handshake message other than ClientHello).
    HelloMalformed,
    /// A ClientHello over 16 KiB.
    HelloTooLarge,
    /// No whole ClientHello within `client_hello_timeout`.
    HelloTimeout,
    /// The client closed or reset the connection before routing was done.
    ClosedEarly,
    /// No route matches and there is no `default_pool`.
    NoRoute,
    /// A plaintext Postgres client on a `require_tls` listener.
    TlsRequired,
}

impl Refusal {
    pub const ALL: [Refusal; 12] = [
        Refusal::MaxConnections,
        Refusal::AclDenied,
        Refusal::ProxyUntrusted,
        Refusal::ProxyMalformed,
        Refusal::ProxyTimeout,
        Refusal::NotTls,
        Refusal::HelloMalformed,
        Refusal::HelloTooLarge,
        Refusal::HelloTimeout,
        Refusal::ClosedEarly,
        Refusal::NoRoute,
        Refusal::TlsRequired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::MaxConnections => "max_connections",
            Refusal::AclDenied => "acl_denied",
            Refusal::ProxyUntrusted => "proxy_untrusted",
            Refusal::ProxyMalformed => "proxy_malformed",
            Refusal::ProxyTimeout => "proxy_timeout",
            Refusal::NotTls => "not_tls",
            Refusal::HelloMalformed => "hello_malformed",
            Refusal::HelloTooLarge => "hello_too_large",
            Refusal::HelloTimeout => "hello_timeout",
            Refusal::ClosedEarly => "closed_early",
            Refusal::NoRoute => "no_route",
            Refusal::TlsRequired => "tls_required",
        }
    }
}

/// A listener's routing settings, built with each snapshot (pools resolved).
#[derive(Debug, Default)]
pub struct Routing {
    acl: Acl,
    accept_proxy: Option<AcceptProxy>,
    tls: Option<SniRouter>,
    proxy_out: Option<proxy_protocol::Version>,
}

impl Routing {
    pub fn build(listener: &ListenerConfig, pools: &HashMap<String, Arc<Pool>>) -> Routing {
        Routing {
            acl: listener.acl.clone(),
            accept_proxy: listener.accept_proxy_protocol.clone(),
            tls: listener
                .tls_passthrough
                .as_ref()
                .map(|t| SniRouter::build(t, pools)),
            proxy_out: listener.proxy_protocol.version(),
        }
    }

    /// Whether connections need the routing step at all (a plain listener skips it).
    pub fn is_active(&self) -> bool {
        !self.acl.is_empty() || self.accept_proxy.is_some() || self.tls.is_some()
    }
}

/// Chooses a pool from a ClientHello: exact names before `*.` wildcards, routes in config
/// order within each, a route's ALPN list (if any) must intersect the client's.
#[derive(Debug)]
pub struct SniRouter {
    exact: HashMap<String, Vec<usize>>,
    wildcard: HashMap<String, Vec<usize>>,
    routes: Vec<(Vec<Vec<u8>>, Arc<Pool>)>,
    default: Option<Arc<Pool>>,
    timeout: Duration,
    postgres: bool,
    require_tls: bool,
}

impl SniRouter {
    fn build(t: &TlsPassthrough, pools: &HashMap<String, Arc<Pool>>) -> SniRouter {
        let mut router = SniRouter {
            exact: HashMap::new(),
            wildcard: HashMap::new(),
            routes: Vec::with_capacity(t.routes.len()),
            default: t.default_pool.as_ref().and_then(|p| pools.get(p)).cloned(),
            timeout: t.client_hello_timeout,
            postgres: t.postgres,
            require_tls: t.require_tls,
        };
        for r in &t.routes {
            // Validation guarantees the pool exists; a route without one is skipped.
            let Some(pool) = pools.get(&r.pool) else {
                continue;
            };
            let index = router.routes.len();
            router.routes.push((r.alpn.clone(), Arc::clone(pool)));
            for pattern in &r.sni {
                let (map, name) = match pattern {
                    SniPattern::Exact(n) => (&mut router.exact, n),
                    SniPattern::Wildcard(n) => (&mut router.wildcard, n),
                };
                map.entry(name.clone()).or_default().push(index);
            }
        }
        router
    }

    /// The route index for a server name (already normalized) and ALPN offer.
    pub fn select(&self, sni: &str, alpn: &[Vec<u8>]) -> Option<usize> {
        let fits = |candidates: Option<&Vec<usize>>| {
            candidates?.iter().copied().find(|&i| {
                let wanted = &self.routes[i].0;
                wanted.is_empty() || wanted.iter().any(|w| alpn.contains(w))
            })
        };
        fits(self.exact.get(sni)).or_else(|| {
            let (_, parent) = sni.split_once('.')?;
            fits(self.wildcard.get(parent))
        })
    }

    fn choose(&self, hello: Option<&ClientHello>) -> Option<Arc<Pool>> {
        let routed = hello.and_then(|h| {
            let sni = h.sni.as_deref()?;
            self.select(sni, &h.alpn)
        });
        match routed {
            Some(i) => Some(Arc::clone(&self.routes[i].1)),
            None => self.default.clone(),
        }
    }
}

/// What the routing step learned and kept.
#[derive(Debug)]
pub struct Prepared {
    /// The client: the peer, or the source a trusted PROXY header named.
    pub client: ClientAddr,
    /// The address the client connected to (from the PROXY header when there was one).
    pub destination: SocketAddr,
    /// The pool chosen by SNI; None: the listener's own pool.
    pub pool: Option<Arc<Pool>>,
    pub hello: Option<ClientHello>,
    /// Client bytes already read, to send to the backend before forwarding.
    pub replay: Vec<u8>,
    /// The backend must be sent a Postgres SSLRequest (and answer `S`) before `replay`.
    pub postgres_ssl_request: bool,
    /// PROXY header to send the backend first.
    pub proxy_out: Option<proxy_protocol::Version>,
    /// Check on the client's first bytes while forwarding: set for a peer that may not send
    /// a PROXY header on a listener that reads nothing before connecting.
    pub first_bytes: Option<FirstBytes>,
}

impl Prepared {
    /// The server name the client asked for, if any.
    pub fn sni(&self) -> Option<&str> {
        self.hello.as_ref()?.sni.as_deref()
    }

    /// The ALPN protocols the client offered, comma-separated, if it offered any.
    pub fn alpn(&self) -> Option<Box<str>> {
        let hello = self.hello.as_ref().filter(|h| !h.alpn.is_empty())?;
        Some(hello.alpn_list().into_boxed_str())
    }

    fn new(client: SocketAddr, destination: SocketAddr, routing: &Routing) -> Prepared {
        Prepared {
            client: ClientAddr(client),
            destination,
            pool: None,
            hello: None,
            replay: Vec::new(),
            postgres_ssl_request: false,
            proxy_out: routing.proxy_out,
            first_bytes: None,
        }
    }
}

/// Why a bounded read stopped early.
enum ReadFail {
    Timeout,
    Closed,
    Full,
}

/// Runs the routing step for one accepted connection. On refusal, also returns what was
/// learned so far (the PROXY header's source, the ClientHello), for the logs.
pub async fn prepare(
    stream: &TcpStream,
    peer: SocketAddr,
    route: &Route,
) -> Result<Prepared, (Refusal, Box<Prepared>)> {
    let routing = &route.routing;
    let local = if routing.proxy_out.is_some() {
        stream.local_addr().unwrap_or(peer)
    } else {
        peer
    };
    let mut prepared = Prepared::new(peer, local, routing);
    if !routing.is_active() {
        return Ok(prepared);
    }
    match read_prelude(stream, peer, route, &mut prepared).await {
        Ok(()) => Ok(prepared),
        Err(refusal) => Err((refusal, Box::new(prepared))),
    }
}

/// The reads of the routing step: PROXY header, ACL, Postgres opening, ClientHello.
async fn read_prelude(
    stream: &TcpStream,
    peer: SocketAddr,
    route: &Route,
    prepared: &mut Prepared,
) -> Result<(), Refusal> {
    let routing = &route.routing;
    let mut buf: Vec<u8> = Vec::new();
    let mut start = 0;
    // The PROXY header timeout, for a peer that must not send one.
    let mut untrusted_peer = None;

    if let Some(accept) = &routing.accept_proxy {
        if acl::any_contains(&accept.from, peer.ip()) {
            let deadline = Instant::now() + accept.timeout;
            loop {
                match proxy_protocol::decode(&buf) {
                    Ok(Decoded::Complete { header, len, .. }) => {
                        start = len;
                        if let Header::Tcp {
                            source,
                            destination,
                        } = header
                        {
                            prepared.client = ClientAddr(source);
                            prepared.destination = destination;
                        }
                        break;
                    }
                    Ok(Decoded::Incomplete) => {
                        read_more(stream, &mut buf, proxy_protocol::MAX_V2_LEN, deadline)
                            .await
                            .map_err(|f| match f {
                                ReadFail::Timeout => Refusal::ProxyTimeout,
                                ReadFail::Closed => Refusal::ClosedEarly,
                                ReadFail::Full => Refusal::ProxyMalformed,
                            })?;
                    }
                    Err(e) => {
                        debug!(listener = %route.config.name, client = %peer, error = %e, "bad PROXY header");
                        return Err(Refusal::ProxyMalformed);
                    }
                }
            }
        } else {
            untrusted_peer = Some(accept.timeout);
        }
    }

    if routing.acl.check(prepared.client.0.ip()) == Verdict::Deny {
        return Err(Refusal::AclDenied);
    }

    let Some(tls) = &routing.tls else {
        // Nothing is read before connecting (the backend may speak first): the first bytes
        // are checked as they are forwarded.
        prepared.first_bytes = untrusted_peer.map(|wait| FirstBytes {
            check: untrusted_first_bytes,
            wait,
        });
        prepared.replay = buf.split_off(start);
        return Ok(());
    };
    let deadline = Instant::now() + tls.timeout;
    let hello_fail = |f: ReadFail| match f {
        ReadFail::Timeout => Refusal::HelloTimeout,
        ReadFail::Closed => Refusal::ClosedEarly,
        ReadFail::Full => Refusal::HelloTooLarge,
    };

    if untrusted_peer.is_some() {
        // The client speaks first here: a PROXY header is refused before any backend. The
        // reads take what the hello's would (the check needs at most a signature's length),
        // so the hello usually arrives with the first one instead of in a second read.
        loop {
            match untrusted_first_bytes(&buf) {
                Screen::Forward => break,
                Screen::Refuse => return Err(Refusal::ProxyUntrusted),
                Screen::NeedMore => {
                    read_more(stream, &mut buf, start + sni::MAX_INPUT, deadline)
                        .await
                        .map_err(hello_fail)?;
                }
            }
        }
    }

    if tls.postgres {
        let mut declined_gss = false;
        loop {
            match postgres::classify(&buf[start..]) {
                Opening::Incomplete => {
                    read_more(stream, &mut buf, start + 8, deadline)
                        .await
                        .map_err(hello_fail)?;
                }
                Opening::SslRequest => {
                    write_all(stream, &[postgres::SSL_ACCEPTED], deadline)
                        .await
                        .map_err(hello_fail)?;
                    start += postgres::SSL_REQUEST.len();
                    prepared.postgres_ssl_request = true;
                    break;
                }
                Opening::GssEncRequest if !declined_gss => {
                    write_all(stream, &[postgres::DECLINED], deadline)
                        .await
                        .map_err(hello_fail)?;
                    start += postgres::GSSENC_REQUEST.len();
                    declined_gss = true;
                }
                Opening::DirectTls => {
                    // The backend may predate direct TLS: it is sent an SSLRequest instead.
                    prepared.postgres_ssl_request = true;
                    break;
                }
                Opening::Plain | Opening::GssEncRequest => {
                    if tls.require_tls {
                        let refusal = postgres::error_response(
                            "TLS is required on this listener; connect with sslmode=require",
                        );
                        let _ = write_all(stream, &refusal, deadline).await;
                        return Err(Refusal::TlsRequired);
                    }
                    prepared.pool = Some(tls.default.clone().ok_or(Refusal::NoRoute)?);
                    prepared.replay = buf.split_off(start);
                    return Ok(());
                }
            }
        }
    }

    let hello = loop {
        match sni::parse(&buf[start..]) {
            Ok(Parsed::Complete(hello)) => break hello,
            Ok(Parsed::Incomplete) => {
                read_more(stream, &mut buf, start + sni::MAX_INPUT, deadline)
                    .await
                    .map_err(hello_fail)?;
            }
            Err(e) => {
                debug!(listener = %route.config.name, client = %prepared.client, error = %e, "bad ClientHello");
                return Err(hello_refusal(e));
            }
        }
    };
    let pool = tls.choose(Some(&hello));
    // Kept before the route is known, so a refusal is logged with the name asked for.
    prepared.hello = Some(hello);
    prepared.pool = Some(pool.ok_or(Refusal::NoRoute)?);
    prepared.replay = buf.split_off(start);
    Ok(())
}

fn hello_refusal(e: HelloError) -> Refusal {
    match e {
        _ if e.is_not_tls() => Refusal::NotTls,
        HelloError::TooLarge => Refusal::HelloTooLarge,
        _ => Refusal::HelloMalformed,
    }
}

/// The first bytes of a peer not trusted to send a PROXY header: refused when they start
/// with a v1 or v2 signature, held while they are a strict prefix of one.
pub fn untrusted_first_bytes(bytes: &[u8]) -> Screen {
    if proxy_protocol::starts_with_signature(bytes).is_some() {
        Screen::Refuse
    } else if proxy_protocol::is_signature_prefix(bytes) {
        Screen::NeedMore
    } else {
        Screen::Forward
    }
}

/// Reads what is available (at least one byte) into `buf`, never past `cap` bytes in all.
async fn read_more(
    stream: &TcpStream,
    buf: &mut Vec<u8>,
    cap: usize,
    deadline: Instant,
) -> Result<(), ReadFail> {
    let room = cap.saturating_sub(buf.len());
    if room == 0 {
        return Err(ReadFail::Full);
    }
    // Read straight into `buf`: a chunk array here would live in every connection's future
    // (the task's size is its largest state), idle or not.
    let want = room.min(READ_CHUNK);
    let filled = buf.len();
    loop {
        match tokio::time::timeout_at(deadline, stream.readable()).await {
            Err(_) => return Err(ReadFail::Timeout),
            Ok(Err(_)) => return Err(ReadFail::Closed),
            Ok(Ok(())) => {}
        }
        buf.resize(filled + want, 0);
        let read = stream.try_read(&mut buf[filled..]);
        let got = read.as_ref().map_or(0, |&n| n);
        buf.truncate(filled + got);
        match read {
            Ok(0) => return Err(ReadFail::Closed),
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(_) => return Err(ReadFail::Closed),
        }
    }
}

/// The most one read of the routing step takes.
const READ_CHUNK: usize = 4096;

/// Writes all of `bytes` before `deadline`.
async fn write_all(
    stream: &TcpStream,
    mut bytes: &[u8],
    deadline: Instant,
) -> Result<(), ReadFail> {
    while !bytes.is_empty() {
        match tokio::time::timeout_at(deadline, stream.writable()).await {
            Err(_) => return Err(ReadFail::Timeout),
            Ok(Err(_)) => return Err(ReadFail::Closed),
            Ok(Ok(())) => {}
        }
        match stream.try_write(bytes) {
            Ok(0) => return Err(ReadFail::Closed),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(_) => return Err(ReadFail::Closed),
        }
    }
    Ok(())
}

/// Before forwarding: send the backend the PROXY header, then (Postgres) an SSLRequest and
/// check its `S`, then the client bytes read during routing. Bounded by `timeout`.
pub async fn handshake_backend(
    backend: &TcpStream,
    prepared: &Prepared,
    timeout: Duration,
) -> Result<(), CloseReason> {
    let deadline = Instant::now() + timeout;
    let mut first = match prepared.proxy_out {
        Some(version) => proxy_protocol::encode(
            version,
            &Header::Tcp {
                source: prepared.client.0,
                destination: prepared.destination,
            },
        ),
        None => Vec::new(),
    };
    if prepared.postgres_ssl_request {
        first.extend_from_slice(&postgres::SSL_REQUEST);
        write_all(backend, &first, deadline)
            .await
            .map_err(|_| CloseReason::BackendReset)?;
        first.clear();
        let mut answer = Vec::with_capacity(1);
        read_more(backend, &mut answer, 1, deadline)
            .await
            .map_err(|f| match f {
                ReadFail::Closed => CloseReason::BackendReset,
                ReadFail::Timeout | ReadFail::Full => CloseReason::BackendProtocol,
            })?;
        if answer.first() != Some(&postgres::SSL_ACCEPTED) {
            debug!(answer = ?answer, "backend declined the Postgres SSLRequest");
            return Err(CloseReason::BackendProtocol);
        }
    }
    first.extend_from_slice(&prepared.replay);
    if !first.is_empty() {
        write_all(backend, &first, deadline)
            .await
            .map_err(|_| CloseReason::BackendReset)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
