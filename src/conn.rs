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
use tracing::{debug, info, warn};

use crate::backend::ClientAddr;
use crate::clock;
use crate::config::{HashKey, MAX_RETRIES};
use crate::forward::{self, ByteCounters};
use crate::hash::hash64;
use crate::state::{Pool, Route, Shared};

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
}

impl CloseReason {
    pub const ALL: [CloseReason; 8] = [
        CloseReason::ClientClosed,
        CloseReason::BackendClosed,
        CloseReason::ClientReset,
        CloseReason::BackendReset,
        CloseReason::IdleTimeout,
        CloseReason::ConnectFailed,
        CloseReason::NoBackend,
        CloseReason::Shutdown,
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
}

/// Serves one accepted client connection to completion.
pub async fn serve(
    ctx: Arc<ListenerCtx>,
    client: TcpStream,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
) {
    let _permit = permit;
    let started = Instant::now();
    let snapshot = ctx.shared.snapshot();
    let Some(route) = snapshot.route(&ctx.name) else {
        // The listener was removed by a reload after this connection was accepted.
        debug!(listener = %ctx.name, client = %peer, "listener no longer configured; closing");
        return;
    };
    let client_addr = ClientAddr(peer);
    route.metrics.active.inc();
    let _ = client.set_nodelay(true);

    let pool = &route.pool;
    let (reason, backend, bytes) = match connect(pool, hash_key(pool.hash_key(), client_addr)).await
    {
        Err(reason) => (reason, None, (0, 0)),
        Ok((index, stream)) => {
            let backend = &pool.backends[index];
            let _counted = backend.state.connection_opened();
            let _ = stream.set_nodelay(true);
            let counters = ByteCounters {
                from_client: route.metrics.bytes_from_clients.clone(),
                to_client: route.metrics.bytes_to_clients.clone(),
            };
            let out = forward::forward(
                &client,
                &stream,
                route.config.idle_timeout,
                &ctx.close_all,
                &counters,
            )
            .await;
            (
                out.reason,
                Some(backend.addr),
                (out.bytes_from_client, out.bytes_to_client),
            )
        }
    };
    route.metrics.active.dec();
    route.metrics.closed(reason).inc();
    log_close(
        route,
        client_addr,
        backend.map(|b| b.to_string()),
        bytes,
        started,
        reason,
    );
}

fn log_close(
    route: &Route,
    client: ClientAddr,
    backend: Option<String>,
    (from_client, to_client): (u64, u64),
    started: Instant,
    reason: CloseReason,
) {
    info!(
        listener = %route.config.name,
        client = %client,
        pool = %route.pool.config.name,
        backend = backend.as_deref().unwrap_or("-"),
        bytes_from_client = from_client,
        bytes_to_client = to_client,
        duration_ms = started.elapsed().as_millis() as u64,
        reason = reason.as_str(),
        "connection closed"
    );
}

/// The key a Maglev pool hashes for this client (shared with UDP flows).
pub fn hash_key(kind: HashKey, client: ClientAddr) -> u64 {
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
        HashKey::ClientIp => hash64(&bytes[..len]),
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
            TcpStream::connect(backend.addr.0),
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
        if backend
            .state
            .record_connect_failure(clock::now_ms(), pool.breaker)
        {
            metrics.breaker_opened.inc();
            warn!(
                pool = %pool.config.name,
                backend = %backend.name,
                error = %error,
                max_fails = pool.breaker.max_fails,
                down_for_ms = pool.breaker.fail_duration_ms,
                "backend marked down after consecutive connect failures"
            );
        }
    }
    Err(CloseReason::ConnectFailed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_key_kinds() {
        let a = ClientAddr("10.0.0.1:1000".parse().expect("addr"));
        let b = ClientAddr("10.0.0.1:2000".parse().expect("addr"));
        assert_eq!(
            hash_key(HashKey::ClientIp, a),
            hash_key(HashKey::ClientIp, b)
        );
        assert_ne!(
            hash_key(HashKey::ClientIpPort, a),
            hash_key(HashKey::ClientIpPort, b)
        );
        let v6 = ClientAddr("[::1]:1000".parse().expect("addr"));
        assert_ne!(
            hash_key(HashKey::ClientIp, a),
            hash_key(HashKey::ClientIp, v6)
        );
    }

    #[test]
    fn reasons_are_indexed_in_order() {
        for (i, r) in CloseReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
    }
}
