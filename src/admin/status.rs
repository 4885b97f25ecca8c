//! The status document (`GET /api/v1/status`, and the data behind the status page): every
//! listener, pool and backend with its state, reason, weight, connections and counters.
//! Built from the current snapshot and live atomics; never locks the data path.
//!
//! A backend's `state` is one of up, down, standby, drain, maint. Its `health` object
//! (`{state, reason, last_check}`) is what checking concluded: today the passive breaker
//! and the health atomic; active checks fill `last_check`. Listeners carry a `protocol` and
//! per-protocol fields (`connections` for TCP; `tls` for TLS passthrough: routes by SNI and
//! the default pool; `udp` for UDP: flows, datagrams and drops), each null otherwise.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::backend::{AdminState, Backend, Health};
use crate::clock;
use crate::config::{SniPattern, TlsPassthrough, UdpConfig};
use crate::conn::CloseReason;
use crate::control::{admin_state_name, unix_seconds, Control};
use crate::metrics::{ListenerMetrics, ListenerSeries, UdpMetrics};
use crate::route::Refusal;
use crate::state::{Pool, Route};
use crate::udp::{DropReason, FlowEnd};

/// Overall backend states, as used in the status document and `switchyard_backend_state`.
pub const BACKEND_STATES: [&str; 5] = ["up", "down", "standby", "drain", "maint"];

#[derive(Debug, Serialize)]
pub struct Status {
    pub version: &'static str,
    pub pid: u32,
    pub uptime_seconds: f64,
    pub ready: bool,
    pub config: ConfigStatus,
    pub admin: AdminStatus,
    pub listeners: Vec<ListenerStatus>,
    pub pools: Vec<PoolStatus>,
}

#[derive(Debug, Serialize)]
pub struct ConfigStatus {
    pub source: String,
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    pub last_reload_error: Option<String>,
    pub last_load_unix: Option<i64>,
}

#[derive(Debug, Serialize)]
pub struct AdminStatus {
    /// Whether mutating calls need a bearer token.
    pub auth_required: bool,
}

#[derive(Debug, Serialize)]
pub struct ListenerStatus {
    pub name: String,
    pub protocol: &'static str,
    pub bind: String,
    /// Where it is bound now (differs from `bind` with port 0); None when not accepting.
    pub local_addr: Option<String>,
    pub sockets: usize,
    /// The pool connections go to; for TLS passthrough, the default pool ("-": none, so
    /// unrouted connections are closed) while `tls.routes` say where the others go.
    pub pool: String,
    /// TLS passthrough settings, when the listener routes by SNI.
    pub tls: Option<TlsStatus>,
    /// TCP only (a UDP listener's limits are under `udp`).
    pub max_connections: Option<usize>,
    /// TCP only.
    pub idle_timeout_seconds: Option<f64>,
    /// Connections, when the listener is TCP (a UDP listener has `udp.flows` instead).
    pub connections: Option<ListenerConnections>,
    /// Bytes each way, whatever the protocol (for UDP, datagram payloads).
    pub bytes: Bytes,
    /// Flows, datagrams and drops, when the listener is UDP.
    pub udp: Option<UdpStatus>,
}

#[derive(Debug, Serialize)]
pub struct UdpStatus {
    pub idle_timeout_seconds: f64,
    pub responses: Option<u32>,
    /// Flows that got their `responses` hand their upstream socket to later flows.
    pub reuse_upstream_sockets: bool,
    pub max_flows: usize,
    pub flows: UdpFlows,
    pub datagrams: Datagrams,
    pub bytes: Bytes,
    /// Datagrams not forwarded: the total, and by reason (`max_flows`, `no_backend`, ...).
    pub dropped: u64,
    pub dropped_by_reason: BTreeMap<&'static str, u64>,
}

#[derive(Debug, Serialize)]
pub struct UdpFlows {
    pub active: i64,
    pub created: u64,
    /// Flows ended, by reason (`idle_timeout`, `responses`, `backend_down`, ...).
    pub expired: BTreeMap<&'static str, u64>,
}

#[derive(Debug, Serialize)]
pub struct Datagrams {
    pub from_clients: u64,
    pub to_clients: u64,
}

#[derive(Debug, Serialize)]
pub struct TlsStatus {
    pub client_hello_timeout_seconds: f64,
    pub postgres: bool,
    pub require_tls: bool,
    pub default_pool: Option<String>,
    pub routes: Vec<TlsRouteStatus>,
}

#[derive(Debug, Serialize)]
pub struct TlsRouteStatus {
    /// Server names as configured (`*.example.com` for a wildcard).
    pub sni: Vec<String>,
    pub alpn: Vec<String>,
    pub pool: String,
}

#[derive(Debug, Serialize)]
pub struct ListenerConnections {
    pub active: i64,
    pub accepted: u64,
    /// Turned away: at `max_connections`, or refused by the routing step.
    pub rejected: u64,
    /// `rejected` by reason (`max_connections`, `acl_denied`, `no_route`, ...).
    pub rejected_by_reason: BTreeMap<&'static str, u64>,
    pub closed: BTreeMap<&'static str, u64>,
}

#[derive(Debug, Serialize)]
pub struct Bytes {
    pub from_clients: u64,
    pub to_clients: u64,
}

#[derive(Debug, Serialize)]
pub struct PoolStatus {
    pub name: String,
    pub balance: &'static str,
    pub backends_total: usize,
    /// Backends whose state is `up` (taking new connections).
    pub backends_up: usize,
    pub connect_retries: u64,
    pub backends: Vec<BackendStatus>,
}

#[derive(Debug, Serialize)]
pub struct BackendStatus {
    pub name: String,
    pub address: String,
    /// The weight in effect (an admin override, or the config's).
    pub weight: u32,
    pub configured_weight: u32,
    pub weight_overridden: bool,
    /// Operator state: ready, drain, maint.
    pub admin_state: &'static str,
    /// Overall: up, down, standby, drain, maint.
    pub state: &'static str,
    pub health: HealthStatus,
    pub connections: BackendConnections,
    pub bytes: Bytes,
}

#[derive(Debug, Serialize)]
pub struct HealthStatus {
    /// up, down or standby.
    pub state: &'static str,
    pub reason: Option<String>,
    /// The last active check, once active checks run.
    pub last_check: Option<CheckStatus>,
}

#[derive(Debug, Serialize)]
pub struct CheckStatus {
    /// What this one check found: up, standby or down (before rise/fall).
    pub state: &'static str,
    /// `up`, `standby`, or the down reason.
    pub result: &'static str,
    pub age_seconds: f64,
    pub duration_seconds: f64,
    pub message: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct BackendConnections {
    pub active: u64,
    pub connect_attempts: u64,
    pub connect_failures: u64,
}

/// What checking concluded about a backend at `now_ms`: state and reason.
pub fn health(backend: &Backend, now_ms: u64) -> (&'static str, Option<String>) {
    if let Some(until) = backend.state.passive_down_until(now_ms) {
        let left = (until - now_ms) as f64 / 1000.0;
        return (
            "down",
            Some(format!(
                "passive: consecutive connect failures; retried in {left:.1}s"
            )),
        );
    }
    let status = backend.state.active_status();
    match status.health {
        Health::Up => ("up", None),
        Health::Standby => (
            "standby",
            Some("reachable and healthy; its role does not match this pool".to_string()),
        ),
        Health::Down => (
            "down",
            Some(
                status
                    .reason
                    .map_or("health check failed", |r| r.as_str())
                    .to_string(),
            ),
        ),
    }
}

fn last_check(backend: &Backend, now_ms: u64) -> Option<CheckStatus> {
    let check = backend.state.last_check()?;
    Some(CheckStatus {
        state: check.result.health.as_str(),
        result: check
            .result
            .reason
            .map_or(check.result.health.as_str(), |r| r.as_str()),
        age_seconds: now_ms.saturating_sub(check.at_ms) as f64 / 1000.0,
        duration_seconds: check.duration_us as f64 / 1_000_000.0,
        message: Some(check.result.describe()),
    })
}

/// The overall state: operator state first, then health.
pub fn overall(backend: &Backend, health_state: &'static str) -> &'static str {
    match backend.state.admin() {
        AdminState::Maint => "maint",
        AdminState::Drain => "drain",
        AdminState::Ready => health_state,
    }
}

fn backend_status(pool: &Pool, index: usize, now_ms: u64) -> BackendStatus {
    let b = &pool.backends[index];
    let m = &pool.backend_metrics[index];
    let configured = pool
        .config
        .backends
        .get(index)
        .map_or(b.weight, |c| c.weight);
    let (health_state, reason) = health(b, now_ms);
    BackendStatus {
        name: b.name.to_string(),
        address: b.addr.to_string(),
        weight: b.weight,
        configured_weight: configured,
        weight_overridden: b.state.weight_override().is_some(),
        admin_state: admin_state_name(b.state.admin()),
        state: overall(b, health_state),
        health: HealthStatus {
            state: health_state,
            reason,
            last_check: last_check(b, now_ms),
        },
        connections: BackendConnections {
            active: b.state.active(),
            connect_attempts: m.connect_attempts.get(),
            connect_failures: m.connect_failures.get(),
        },
        bytes: Bytes {
            from_clients: m.bytes_from_clients.get(),
            to_clients: m.bytes_to_clients.get(),
        },
    }
}

pub fn pool_status(pool: &Pool, now_ms: u64) -> PoolStatus {
    let backends: Vec<BackendStatus> = (0..pool.backends.len())
        .map(|i| backend_status(pool, i, now_ms))
        .collect();
    PoolStatus {
        name: pool.config.name.clone(),
        balance: pool.config.balance.name(),
        backends_total: backends.len(),
        backends_up: backends.iter().filter(|b| b.state == "up").count(),
        connect_retries: pool.metrics.retries.get(),
        backends,
    }
}

fn tls_status(t: &TlsPassthrough) -> TlsStatus {
    TlsStatus {
        client_hello_timeout_seconds: t.client_hello_timeout.as_secs_f64(),
        postgres: t.postgres,
        require_tls: t.require_tls,
        default_pool: t.default_pool.clone(),
        routes: t
            .routes
            .iter()
            .map(|r| TlsRouteStatus {
                sni: r
                    .sni
                    .iter()
                    .map(|p| match p {
                        SniPattern::Exact(n) => n.clone(),
                        SniPattern::Wildcard(n) => format!("*.{n}"),
                    })
                    .collect(),
                alpn: r
                    .alpn
                    .iter()
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect(),
                pool: r.pool.clone(),
            })
            .collect(),
    }
}

fn udp_status(config: &UdpConfig, m: &UdpMetrics) -> UdpStatus {
    let dropped_by_reason: BTreeMap<&'static str, u64> = DropReason::ALL
        .iter()
        .map(|r| (r.as_str(), m.dropped(*r).get()))
        .collect();
    UdpStatus {
        idle_timeout_seconds: config.idle_timeout.as_secs_f64(),
        responses: config.responses,
        reuse_upstream_sockets: config.responses.is_some() && config.reuse_upstream_sockets,
        max_flows: config.max_flows,
        flows: UdpFlows {
            active: m.flows_active.get(),
            created: m.flows_created.get(),
            expired: FlowEnd::ALL
                .iter()
                .map(|r| (r.as_str(), m.flows_expired(*r).get()))
                .collect(),
        },
        datagrams: Datagrams {
            from_clients: m.datagrams_from_clients.get(),
            to_clients: m.datagrams_to_clients.get(),
        },
        bytes: Bytes {
            from_clients: m.bytes_from_clients.get(),
            to_clients: m.bytes_to_clients.get(),
        },
        dropped: dropped_by_reason.values().sum(),
        dropped_by_reason,
    }
}

fn tcp_connections(m: &ListenerMetrics) -> ListenerConnections {
    let rejected_by_reason: BTreeMap<&'static str, u64> = Refusal::ALL
        .iter()
        .map(|r| (r.as_str(), m.refused(*r).get()))
        .collect();
    ListenerConnections {
        active: m.active.get(),
        accepted: m.accepted.get(),
        rejected: rejected_by_reason.values().sum(),
        rejected_by_reason,
        closed: CloseReason::ALL
            .iter()
            .map(|r| (r.as_str(), m.closed(*r).get()))
            .collect(),
    }
}

fn listener_status(route: &Route, control: &Control) -> ListenerStatus {
    let running = control.listeners();
    let info = running.get(&route.config.name);
    let tls = route.config.tls_passthrough.as_ref();
    let (connections, bytes, udp) = match &route.metrics {
        ListenerSeries::Tcp(m) => (
            Some(tcp_connections(m)),
            Bytes {
                from_clients: m.bytes_from_clients.get(),
                to_clients: m.bytes_to_clients.get(),
            },
            None,
        ),
        ListenerSeries::Udp(m) => {
            let udp = udp_status(&route.config.udp, m);
            let bytes = Bytes {
                from_clients: udp.bytes.from_clients,
                to_clients: udp.bytes.to_clients,
            };
            (None, bytes, Some(udp))
        }
    };
    let tcp = route.config.protocol == crate::config::Protocol::Tcp;
    ListenerStatus {
        name: route.config.name.clone(),
        protocol: match route.config.protocol {
            crate::config::Protocol::Tcp => "tcp",
            crate::config::Protocol::Udp => "udp",
        },
        bind: route.config.bind.to_string(),
        local_addr: info.map(|i| i.local.to_string()),
        sockets: info.map_or(0, |i| i.sockets),
        pool: match tls {
            Some(t) => t.default_pool.clone().unwrap_or_else(|| "-".to_string()),
            None => route.pool.config.name.clone(),
        },
        tls: tls.map(tls_status),
        max_connections: tcp.then_some(route.config.max_connections),
        idle_timeout_seconds: tcp.then_some(route.config.idle_timeout.as_secs_f64()),
        connections,
        bytes,
        udp,
    }
}

/// The whole status document, in config order.
pub fn status(control: &Control, auth_required: bool) -> Status {
    let snapshot = control.shared.snapshot();
    let now_ms = clock::now_ms();
    let reloads = control.reload_status();
    Status {
        version: env!("CARGO_PKG_VERSION"),
        pid: std::process::id(),
        uptime_seconds: control.uptime().as_secs_f64(),
        ready: control.is_ready(),
        config: ConfigStatus {
            source: snapshot.config.source.clone(),
            reloads_ok: reloads.ok,
            reloads_failed: reloads.failed,
            last_reload_error: reloads.last_error,
            last_load_unix: reloads.last_success.map(unix_seconds),
        },
        admin: AdminStatus { auth_required },
        listeners: snapshot
            .config
            .listeners
            .iter()
            .filter_map(|l| snapshot.route(&l.name))
            .map(|r| listener_status(r, control))
            .collect(),
        pools: snapshot
            .config
            .pools
            .iter()
            .filter_map(|p| snapshot.pools.get(&p.name))
            .map(|p| pool_status(p, now_ms))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Breaker;

    #[test]
    fn state_and_reason_from_breaker_health_and_admin() {
        let b = Backend::new("db-1", "127.0.0.1:5432".parse().expect("addr"), 1);
        assert_eq!(health(&b, 10), ("up", None));
        assert_eq!(overall(&b, "up"), "up");

        let breaker = Breaker {
            max_fails: 1,
            fail_duration_ms: 5_000,
        };
        assert!(b.state.record_connect_failure(1_000, breaker).is_some());
        let (state, reason) = health(&b, 3_500);
        assert_eq!(state, "down");
        assert_eq!(
            reason.as_deref(),
            Some("passive: consecutive connect failures; retried in 2.5s")
        );
        assert_eq!(health(&b, 6_000).0, "up", "breaker closed again");

        b.state.set_health(Health::Down);
        assert_eq!(health(&b, 6_000).0, "down");
        // The operator's state wins over health.
        b.state.set_admin(AdminState::Drain);
        assert_eq!(overall(&b, "down"), "drain");
        b.state.set_admin(AdminState::Maint);
        assert_eq!(overall(&b, "down"), "maint");
        for s in ["up", "down", "drain", "maint"] {
            assert!(BACKEND_STATES.contains(&s));
        }
    }
}
