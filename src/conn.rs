//! One TCP connection from accept to close: take the config snapshot once (a reload never
//! changes routing mid-connection), pick a backend, connect with timeout and retry the next
//! candidate on failure, count the connection on its backend, forward, then log one line and
//! count the close reason. Nothing here touches bytes; see `forward`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::access_log::{AccessLog, Record};
use crate::backend::{BackendAddr, ClientAddr, Health};
use crate::clock;
use crate::config::{HashKey, OnBackendDown, MAX_RETRIES};
use crate::forward::{self, ByteCounters};
use crate::hash::hash64;
use crate::route;
use crate::state::{Pool, Route, Shared, Snapshot};

/// Why a connection ended: a bounded set, used as a metric label and in the close log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client closed its side first (after which the backend finished too).
    ClientClosed,
    /// The backend closed its side first.
    BackendClosed,
    /// The client reset the connection or a write to it failed.
    ClientReset,
    /// The backend reset the connection or a write to it failed.
    BackendReset,
    /// No bytes either way for `idle_timeout`.
    IdleTimeout,
    /// Every backend tried refused or timed out.
    ConnectFailed,
    /// No backend of the pool was available to try.
    NoBackend,
    /// The balancer is shutting down and the grace period ended.
    Shutdown,
    /// An operator put the backend in maintenance (admin API): its connections close.
    Maint,
    /// The backend went down or stopped matching the pool's role, and the pool says
    /// `on_backend_down: close_connections`.
    BackendDown,
    /// The routing step closed it before any backend (ACL, PROXY header, ClientHello, no
    /// route), or the first-bytes check as forwarding started (a PROXY header from an
    /// untrusted peer); the metric `switchyard_listener_connections_rejected_total` says why.
    Refused,
    /// The backend broke the protocol before forwarding (declined the Postgres SSLRequest).
    BackendProtocol,
}

impl CloseReason {
    pub const ALL: [CloseReason; 12] = [
        CloseReason::ClientClosed,
        CloseReason::BackendClosed,
        CloseReason::ClientReset,
        CloseReason::BackendReset,
        CloseReason::IdleTimeout,
        CloseReason::ConnectFailed,
        CloseReason::NoBackend,
        CloseReason::Shutdown,
        CloseReason::Maint,
        CloseReason::BackendDown,
        CloseReason::Refused,
        CloseReason::BackendProtocol,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::ClientClosed => "client_closed",
            CloseReason::BackendClosed => "backend_closed",
            CloseReason::ClientReset => "client_reset",
            CloseReason::BackendReset => "backend_reset",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::ConnectFailed => "connect_failed",
            CloseReason::NoBackend => "no_backend",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Maint => "maint",
            CloseReason::BackendDown => "backend_down",
            CloseReason::Refused => "refused",
            CloseReason::BackendProtocol => "backend_protocol",
        }
    }
}

/// What every connection of one listener shares.
#[derive(Debug)]
pub struct ListenerCtx {
    pub name: Arc<str>,
    pub shared: Arc<Shared>,
    /// Fires when the shutdown grace period ends: open connections close.
    pub close_all: CancellationToken,
    /// One record per connection at its end, written off the data path.
    pub access_log: AccessLog,
}

/// Serves one accepted client connection to completion, routed by `snapshot`: the one
/// current when it was accepted (taken by the accept loop, so a reload that removes or
/// renames the listener before this task first runs does not drop the connection).
pub async fn serve(
    ctx: Arc<ListenerCtx>,
    client: TcpStream,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
    snapshot: Arc<Snapshot>,
) {
    let _permit = permit;
    let started = Instant::now();
    let Some(route) = snapshot.route(&ctx.name) else {
        // Not configured in the snapshot it was accepted under (cannot happen: the accept
        // loop of a listener runs only while a published snapshot has it).
        debug!(listener = %ctx.name, client = %peer, "listener no longer configured; closing");
        return;
    };
    let Some(listener_metrics) = route.metrics.tcp() else {
        // UDP in the snapshot it was accepted under (cannot happen either: a listener that
        // becomes UDP stops accepting before the snapshot saying so is published).
        debug!(listener = %ctx.name, client = %peer, "listener no longer tcp; closing");
        return;
    };
    listener_metrics.active.inc();
    let _ = client.set_nodelay(true);

    let prepared = match route::prepare(&client, peer, route).await {
        Ok(prepared) => prepared,
        Err((refusal, learned)) => {
            listener_metrics.refused(refusal).inc();
            listener_metrics.active.dec();
            listener_metrics.closed(CloseReason::Refused).inc();
            info!(
                listener = %route.config.name,
                client = %learned.client,
                sni = learned.sni().unwrap_or("-"),
                duration_ms = started.elapsed().as_millis() as u64,
                reason = CloseReason::Refused.as_str(),
                refused = refusal.as_str(),
                "connection closed"
            );
            ctx.access_log.log(|| Record {
                time: std::time::SystemTime::now(),
                listener: Arc::clone(&ctx.name),
                client: learned.client,
                pool: Arc::from("-"),
                backend: None,
                sni: learned.sni().map(Box::from),
                alpn: learned.alpn(),
                bytes_from_client: 0,
                bytes_to_client: 0,
                duration: started.elapsed(),
                reason: CloseReason::Refused.as_str(),
                refused: Some(refusal),
            });
            return;
        }
    };
    let client_addr = prepared.client;
    let mut pool = prepared.pool.as_ref().unwrap_or(&route.pool);
    let mut connected = connect(pool, hash_key(pool.hash_key(), client_addr, prepared.sni())).await;
    if let (Err(CloseReason::NoBackend), Some(fallback)) = (
        &connected,
        pool.config
            .fallback_pool
            .as_ref()
            .and_then(|name| snapshot.pools.get(name)),
    ) {
        pool.metrics.fallback.inc();
        pool = fallback;
        connected = connect(pool, hash_key(pool.hash_key(), client_addr, prepared.sni())).await;
    }
    let (reason, backend, bytes) = match connected {
        Err(reason) => (reason, None, (0, 0)),
        Ok((index, stream)) => {
            let backend = &pool.backends[index];
            let _counted = backend.state.connection_opened();
            // Subscribe first, then look for an order given just before (maint).
            let mut close = backend.state.close_signal();
            let _ = stream.set_nodelay(true);
            let metrics = &pool.backend_metrics[index];
            let counters = ByteCounters {
                from_client: listener_metrics.bytes_from_clients.clone(),
                to_client: listener_metrics.bytes_to_clients.clone(),
                backend_from_client: metrics.bytes_from_clients.clone(),
                backend_to_client: metrics.bytes_to_clients.clone(),
            };
            // A backend that left rotation between the pick and the subscription above is
            // closed at once in a close_connections pool.
            let close_on_down = pool.config.on_backend_down == OnBackendDown::CloseConnections;
            let standing = backend.state.standing_close().or_else(|| {
                (close_on_down && backend.state.active_status().health != Health::Up)
                    .then_some(CloseReason::BackendDown)
            });
            let out = match standing {
                Some(reason) => Err(reason),
                None => {
                    route::handshake_backend(&stream, &prepared, pool.config.connect_timeout).await
                }
            };
            match out {
                Err(reason) => (reason, Some(backend), (0, 0)),
                Ok(()) => {
                    let replayed = prepared.replay.len() as u64;
                    counters.from_client.inc_by(replayed);
                    counters.backend_from_client.inc_by(replayed);
                    let out = forward::forward(
                        &client,
                        &stream,
                        route.config.idle_timeout,
                        &ctx.close_all,
                        &mut close,
                        &counters,
                        prepared.first_bytes,
                    )
                    .await;
                    (
                        out.reason,
                        Some(backend),
                        (out.bytes_from_client + replayed, out.bytes_to_client),
                    )
                }
            }
        }
    };
    // Past the routing step, only the first-bytes check refuses: a PROXY header from a peer
    // not trusted to send one.
    let refused = (reason == CloseReason::Refused).then_some(route::Refusal::ProxyUntrusted);
    if let Some(refusal) = refused {
        listener_metrics.refused(refusal).inc();
    }
    listener_metrics.active.dec();
    listener_metrics.closed(reason).inc();
    log_close(
        route,
        pool,
        &prepared,
        backend.map(|b| b.addr),
        bytes,
        started,
        (reason, refused),
    );
    ctx.access_log.log(|| Record {
        time: std::time::SystemTime::now(),
        listener: Arc::clone(&ctx.name),
        client: client_addr,
        pool: Arc::from(pool.config.name.as_str()),
        backend: backend.map(|b| (Arc::clone(&b.name), b.addr)),
        sni: prepared.sni().map(Box::from),
        alpn: prepared.alpn(),
        bytes_from_client: bytes.0,
        bytes_to_client: bytes.1,
        duration: started.elapsed(),
        reason: reason.as_str(),
        refused,
    });
}

fn log_close(
    route: &Route,
    pool: &Pool,
    prepared: &route::Prepared,
    backend: Option<BackendAddr>,
    (from_client, to_client): (u64, u64),
    started: Instant,
    (reason, refused): (CloseReason, Option<route::Refusal>),
) {
    info!(
        listener = %route.config.name,
        client = %prepared.client,
        pool = %pool.config.name,
        sni = prepared.sni().unwrap_or("-"),
        alpn = prepared.alpn().as_deref().unwrap_or("-"),
        // Field values are only built when the line is enabled: no per-connection
        // formatting at --log-level warn.
        backend = backend.map_or_else(|| "-".to_string(), |b| b.to_string()),
        bytes_from_client = from_client,
        bytes_to_client = to_client,
        duration_ms = started.elapsed().as_millis() as u64,
        reason = reason.as_str(),
        refused = refused.map_or("-", route::Refusal::as_str),
        "connection closed"
    );
}

/// The key a Maglev pool hashes for this client (shared with UDP flows, which have no SNI).
pub fn hash_key(kind: HashKey, client: ClientAddr, sni: Option<&str>) -> u64 {
    if let (HashKey::Sni, Some(name)) = (kind, sni) {
        return hash64(name.as_bytes());
    }
    let mut bytes = [0u8; 18];
    let len = match client.0.ip() {
        std::net::IpAddr::V4(ip) => {
            bytes[..4].copy_from_slice(&ip.octets());
            4
        }
        std::net::IpAddr::V6(ip) => {
            bytes[..16].copy_from_slice(&ip.octets());
            16
        }
    };
    match kind {
        HashKey::ClientIp | HashKey::Sni => hash64(&bytes[..len]),
        HashKey::ClientIpPort => {
            bytes[len..len + 2].copy_from_slice(&client.0.port().to_be_bytes());
            hash64(&bytes[..len + 2])
        }
    }
}

/// Tries candidates from the balancer, at most `retries + 1` distinct backends, each within
/// `connect_timeout`. Failures feed the passive circuit breaker.
async fn connect(pool: &Pool, key: u64) -> Result<(usize, TcpStream), CloseReason> {
    let mut tried = [usize::MAX; MAX_RETRIES as usize + 1];
    let attempts = pool.config.retries as usize + 1;
    for n in 0..attempts {
        let Some(index) = pool
            .balancer
            .pick(&pool.backends, key, &tried[..n], clock::now_ms())
        else {
            return Err(if n == 0 {
                CloseReason::NoBackend
            } else {
                CloseReason::ConnectFailed
            });
        };
        tried[n] = index;
        if n > 0 {
            pool.metrics.retries.inc();
        }
        let backend = &pool.backends[index];
        let metrics = &pool.backend_metrics[index];
        metrics.connect_attempts.inc();
        let t0 = Instant::now();
        let error = match tokio::time::timeout(
            pool.config.connect_timeout,
            connect_backend(backend.addr.0),
        )
        .await
        {
            Ok(Ok(stream)) => {
                metrics.connect_duration.observe(t0.elapsed().as_secs_f64());
                backend.state.record_connect_success();
                return Ok((index, stream));
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("timed out after {:?}", pool.config.connect_timeout),
        };
        metrics.connect_failures.inc();
        debug!(pool = %pool.config.name, backend = %backend.name, error = %error, "backend connect failed");
        crate::health::passive::record_failure(pool, index, clock::now_ms(), || {
            format!(
                "{} consecutive connect failures, the last: {error}",
                pool.breaker.max_fails
            )
        });
    }
    Err(CloseReason::ConnectFailed)
}

/// Connects to a backend. On loopback and fast links the handshake has often completed by
/// the time connect(2) returns EINPROGRESS; when the socket already has a peer, forwarding
/// starts without a trip through the event loop for the writable event.
async fn connect_backend(addr: SocketAddr) -> std::io::Result<TcpStream> {
    use socket2::{Domain, Protocol, Socket, Type};
    let domain = Domain::for_address(addr);
    #[cfg(target_os = "linux")]
    let socket = Socket::new(domain, Type::STREAM.nonblocking(), Some(Protocol::TCP))?;
    #[cfg(not(target_os = "linux"))]
    let socket = {
        let socket = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
        socket.set_nonblocking(true)?;
        socket
    };
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let stream = TcpStream::from_std(socket.into())?;
    if stream.peer_addr().is_err() {
        stream.writable().await?;
        if let Some(e) = stream.take_error()? {
            return Err(e);
        }
    }
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_key_kinds() {
        let a = ClientAddr("10.0.0.1:1000".parse().expect("addr"));
        let b = ClientAddr("10.0.0.1:2000".parse().expect("addr"));
        assert_eq!(
            hash_key(HashKey::ClientIp, a, None),
            hash_key(HashKey::ClientIp, b, None)
        );
        assert_ne!(
            hash_key(HashKey::ClientIpPort, a, None),
            hash_key(HashKey::ClientIpPort, b, None)
        );
        let v6 = ClientAddr("[::1]:1000".parse().expect("addr"));
        assert_ne!(
            hash_key(HashKey::ClientIp, a, None),
            hash_key(HashKey::ClientIp, v6, None)
        );
        // SNI: one name, one key whoever connects; no name falls back to the client IP.
        assert_eq!(
            hash_key(HashKey::Sni, a, Some("db.example.com")),
            hash_key(HashKey::Sni, v6, Some("db.example.com"))
        );
        assert_ne!(
            hash_key(HashKey::Sni, a, Some("db.example.com")),
            hash_key(HashKey::Sni, a, Some("api.example.com"))
        );
        assert_eq!(
            hash_key(HashKey::Sni, a, None),
            hash_key(HashKey::ClientIp, a, None)
        );
    }

    #[tokio::test]
    async fn serves_under_the_snapshot_it_was_accepted_with() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let backend = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let backend_addr = backend.local_addr().expect("addr");
        tokio::spawn(async move {
            if let Ok((mut s, _)) = backend.accept().await {
                let _ = s.write_all(b"hi").await;
            }
        });
        let yaml = format!(
            "listeners:\n  - name: l\n    bind: 127.0.0.1:0\n    pool: p\npools:\n  - name: p\n    backends: [{{ address: \"{backend_addr}\" }}]\n"
        );
        let config = |y: &str| crate::config::Config::from_yaml(y, "t.yaml").expect("valid");
        let metrics = crate::metrics::Metrics::new();
        let (access_log, _writer) = AccessLog::new(1, &metrics.ops);
        let shared = Shared::new(config(&yaml), metrics);
        let accepted_under = shared.snapshot();
        // A reload removes the listener before the connection's task first runs.
        shared.publish(config(&yaml.replace("name: l\n", "name: other\n")));

        let front = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let mut client = TcpStream::connect(front.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (accepted, peer) = front.accept().await.expect("accept");
        let ctx = Arc::new(ListenerCtx {
            name: Arc::from("l"),
            shared: Arc::clone(&shared),
            close_all: CancellationToken::new(),
            access_log,
        });
        let permit = Arc::new(tokio::sync::Semaphore::new(1))
            .try_acquire_owned()
            .expect("permit");
        let task = serve(ctx, accepted, peer, permit, accepted_under);
        // Every open connection holds its task, idle or not, and a future is as large as its
        // largest state: a buffer held across an await in the routing step once made each
        // idle connection cost 4 KiB more. (Release builds lay it out smaller still.)
        let size = std::mem::size_of_val(&task);
        assert!(size <= MAX_TASK_SIZE, "connection future: {size} bytes");
        tokio::spawn(task);
        let mut got = [0u8; 2];
        tokio::time::timeout(
            std::time::Duration::from_secs(30),
            client.read_exact(&mut got),
        )
        .await
        .expect("in time")
        .expect("the connection is served, not dropped");
        assert_eq!(&got, b"hi");
    }

    /// Bound on the connection future's size (2 KiB today; see
    /// `serves_under_the_snapshot_it_was_accepted_with`).
    const MAX_TASK_SIZE: usize = 3072;

    #[test]
    fn reasons_are_indexed_in_order() {
        for (i, r) in CloseReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
    }
}
