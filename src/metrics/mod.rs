//! The metric families of one balancer and their pre-resolved handles. Handles are looked
//! up once when a snapshot is built, so the data path only touches atomics, never the
//! registry's label maps. Labels are bounded: listener, pool, backend and a fixed set of
//! reasons; never a client address. A listener gets series of its own protocol's families
//! only ([`ListenerSeries`]): connections and bytes for TCP, flows and datagrams for UDP.
//! Names live in `names`, UDP families in `udp`, and dropping what a reload removed in
//! `forget`.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

use crate::config::Protocol;
use crate::conn::CloseReason;
use crate::route::Refusal;

mod forget;
pub mod names;
mod udp;

pub use forget::Removed;
use udp::UdpFamilies;
pub use udp::{GaugeShare, UdpMetrics};

/// The registry and metric families of one running balancer.
#[derive(Debug, Clone)]
pub struct Metrics {
    pub registry: Registry,
    listener_accepted: IntCounterVec,
    listener_rejected: IntCounterVec,
    listener_active: IntGaugeVec,
    listener_closed: IntCounterVec,
    listener_accept_errors: IntCounterVec,
    listener_bytes_from_clients: IntCounterVec,
    listener_bytes_to_clients: IntCounterVec,
    backend_connect_attempts: IntCounterVec,
    backend_connect_failures: IntCounterVec,
    backend_connect_duration: HistogramVec,
    backend_breaker_opened: IntCounterVec,
    pool_retries: IntCounterVec,
    backend_bytes_from_clients: IntCounterVec,
    backend_bytes_to_clients: IntCounterVec,
    health_check_duration: HistogramVec,
    health_checks: IntCounterVec,
    backend_state_changes: IntCounterVec,
    pool_split_brain: IntCounterVec,
    pool_fallback: IntCounterVec,
    udp: UdpFamilies,
    /// Handles for the operations side: reloads, access log, admin API.
    pub ops: OpsMetrics,
}

/// Handles for reloads, the access log and the admin API.
#[derive(Debug, Clone)]
pub struct OpsMetrics {
    pub reloads_ok: IntCounter,
    pub reloads_failed: IntCounter,
    pub last_reload_successful: IntGauge,
    pub last_reload_success_time: IntGauge,
    pub access_log_records: IntCounter,
    pub access_log_dropped: IntCounter,
    pub access_log_write_errors: IntCounter,
    pub admin_auth_failures: IntCounter,
    pub ready: IntGauge,
}

/// Handles for one TCP listener: its connections and the bytes they carry.
#[derive(Debug, Clone)]
pub struct ListenerMetrics {
    pub accepted: IntCounter,
    pub active: IntGauge,
    pub accept_errors: IntCounter,
    pub bytes_from_clients: IntCounter,
    pub bytes_to_clients: IntCounter,
    closed: Vec<IntCounter>,
    /// `rejected_total` by routing-step refusal, indexed like [`Refusal::ALL`].
    refused: Vec<IntCounter>,
}

impl ListenerMetrics {
    pub fn closed(&self, reason: CloseReason) -> &IntCounter {
        &self.closed[reason as usize]
    }

    pub fn refused(&self, reason: Refusal) -> &IntCounter {
        &self.refused[reason as usize]
    }
}

/// The handles of one listener, by its protocol. Only these families have series for it, so
/// a UDP listener exports no connection counts that would stay 0 next to its traffic.
#[derive(Debug, Clone)]
pub enum ListenerSeries {
    /// `switchyard_listener_*`: connections accepted, open, refused and closed, bytes.
    Tcp(ListenerMetrics),
    /// `switchyard_udp_*`: flows, datagrams, payload bytes and drops.
    Udp(UdpMetrics),
}

impl ListenerSeries {
    /// A TCP listener's handles; None for UDP.
    pub fn tcp(&self) -> Option<&ListenerMetrics> {
        match self {
            ListenerSeries::Tcp(m) => Some(m),
            ListenerSeries::Udp(_) => None,
        }
    }
}

/// Handles for one backend of one pool.
#[derive(Debug, Clone)]
pub struct BackendMetrics {
    pub connect_attempts: IntCounter,
    pub connect_failures: IntCounter,
    pub connect_duration: Histogram,
    pub breaker_opened: IntCounter,
    pub bytes_from_clients: IntCounter,
    pub bytes_to_clients: IntCounter,
    /// The state change the opening breaker makes (down, passive), in the shared count.
    pub passive_down: IntCounter,
    /// A change back to up made outside the active checks (the breaker closing, a reload
    /// removing the pool's check), in the shared count.
    pub back_up: IntCounter,
    /// ICMP port unreachable seen on a UDP flow to this backend.
    pub udp_unreachable: IntCounter,
}

/// Handles for one pool.
#[derive(Debug, Clone)]
pub struct PoolMetrics {
    pub retries: IntCounter,
    /// Connections this pool handed to its `fallback_pool`.
    pub fallback: IntCounter,
}

/// Handles for one backend's active check (used by its prober, off the data path).
#[derive(Debug, Clone)]
pub struct HealthMetrics {
    pub check_duration: Histogram,
    checks: IntCounterVec,
    state_changes: IntCounterVec,
    labels: [String; 3],
}

impl HealthMetrics {
    /// Counts one check by what it found: `up`, `standby`, or the down reason.
    pub fn check_result(&self, result: crate::backend::HealthStatus) {
        let [pool, backend, check] = &self.labels;
        let label = result.reason.map_or(result.health.as_str(), |r| r.as_str());
        self.checks
            .with_label_values(&[pool, backend, check, label])
            .inc();
    }

    /// Counts one state change by the state entered and its reason (`-` when not down).
    pub fn state_changed(&self, to: crate::backend::HealthStatus) {
        let [pool, backend, _] = &self.labels;
        let reason = to.reason.map_or(NO_REASON, |r| r.as_str());
        self.state_changes
            .with_label_values(&[pool, backend, to.health.as_str(), reason])
            .inc();
    }
}

/// The `reason` label of a state change into up or standby.
const NO_REASON: &str = "-";

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    registry
        .register(Box::new(g.clone()))
        .unwrap_or_else(|e| panic!("register {name}: {e}"));
    g
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let vec = IntGaugeVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    registry
        .register(Box::new(vec.clone()))
        .unwrap_or_else(|e| panic!("register {name}: {e}"));
    vec
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let vec = IntCounterVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    registry
        .register(Box::new(vec.clone()))
        .unwrap_or_else(|e| panic!("register {name}: {e}"));
    vec
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates the families in a fresh registry. Panics only on a malformed name or a
    /// duplicate registration, both fixed at compile time by the constants above.
    pub fn new() -> Metrics {
        use names::*;
        let registry = Registry::new();
        let listener_active = IntGaugeVec::new(
            Opts::new(
                LISTENER_CONNECTIONS_ACTIVE,
                "Client connections open on a listener.",
            ),
            &["listener"],
        )
        .unwrap_or_else(|e| panic!("metric: {e}"));
        registry
            .register(Box::new(listener_active.clone()))
            .unwrap_or_else(|e| panic!("register: {e}"));
        let backend_connect_duration = HistogramVec::new(
            HistogramOpts::new(
                BACKEND_CONNECT_DURATION,
                "Time to establish a backend connection.",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5,
            ]),
            &["pool", "backend"],
        )
        .unwrap_or_else(|e| panic!("metric: {e}"));
        registry
            .register(Box::new(backend_connect_duration.clone()))
            .unwrap_or_else(|e| panic!("register: {e}"));
        let reloads = counter_vec(
            &registry,
            CONFIG_RELOADS,
            "Config reloads (SIGHUP or admin API), by result.",
            &["result"],
        );
        let build_info = IntGaugeVec::new(
            Opts::new(BUILD_INFO, "Always 1; the version as a label."),
            &["version"],
        )
        .unwrap_or_else(|e| panic!("metric: {e}"));
        registry
            .register(Box::new(build_info.clone()))
            .unwrap_or_else(|e| panic!("register: {e}"));
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let ops = OpsMetrics {
            reloads_ok: reloads.with_label_values(&["ok"]),
            reloads_failed: reloads.with_label_values(&["error"]),
            last_reload_successful: gauge(
                &registry,
                CONFIG_LAST_RELOAD_SUCCESSFUL,
                "1 when the last reload succeeded (or none was tried), 0 when it was rejected.",
            ),
            last_reload_success_time: gauge(
                &registry,
                CONFIG_LAST_RELOAD_SUCCESS_TIME,
                "Unix time of the last config load that took effect.",
            ),
            access_log_records: IntCounter::new(ACCESS_LOG_RECORDS, "Access log records written.")
                .unwrap_or_else(|e| panic!("metric: {e}")),
            access_log_dropped: IntCounter::new(
                ACCESS_LOG_DROPPED,
                "Access log records dropped because the writer fell behind.",
            )
            .unwrap_or_else(|e| panic!("metric: {e}")),
            access_log_write_errors: IntCounter::new(
                ACCESS_LOG_WRITE_ERRORS,
                "Access log writes or reopens that failed.",
            )
            .unwrap_or_else(|e| panic!("metric: {e}")),
            admin_auth_failures: IntCounter::new(
                ADMIN_AUTH_FAILURES,
                "Admin API calls refused for a missing or wrong token.",
            )
            .unwrap_or_else(|e| panic!("metric: {e}")),
            ready: gauge(
                &registry,
                READY,
                "1 once every listener is bound and serving; 0 while starting or stopping.",
            ),
        };
        for c in [
            &ops.access_log_records,
            &ops.access_log_dropped,
            &ops.access_log_write_errors,
            &ops.admin_auth_failures,
        ] {
            registry
                .register(Box::new(c.clone()))
                .unwrap_or_else(|e| panic!("register: {e}"));
        }
        ops.last_reload_successful.set(1);
        let health_check_duration = HistogramVec::new(
            HistogramOpts::new(
                HEALTH_CHECK_DURATION,
                "Time an active health check took, timeouts included.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
            &["pool", "backend", "check"],
        )
        .unwrap_or_else(|e| panic!("metric: {e}"));
        registry
            .register(Box::new(health_check_duration.clone()))
            .unwrap_or_else(|e| panic!("register: {e}"));
        Metrics {
            health_check_duration,
            health_checks: counter_vec(
                &registry,
                HEALTH_CHECKS,
                "Active health checks, by what they found (up, standby, or the down reason).",
                &["pool", "backend", "check", "result"],
            ),
            backend_state_changes: counter_vec(
                &registry,
                BACKEND_STATE_CHANGES,
                "Backend state changes, by the state entered and its reason.",
                &["pool", "backend", "state", "reason"],
            ),
            pool_split_brain: counter_vec(
                &registry,
                POOL_SPLIT_BRAIN,
                "Times more than one backend of a role: primary pool reported itself primary.",
                &["pool"],
            ),
            pool_fallback: counter_vec(
                &registry,
                POOL_FALLBACK,
                "Connections sent to the fallback pool because no backend of this pool was available.",
                &["pool"],
            ),
            backend_bytes_from_clients: counter_vec(
                &registry,
                BACKEND_BYTES_FROM_CLIENTS,
                "Bytes received from clients and forwarded to a backend.",
                &["pool", "backend"],
            ),
            backend_bytes_to_clients: counter_vec(
                &registry,
                BACKEND_BYTES_TO_CLIENTS,
                "Bytes from a backend sent to clients.",
                &["pool", "backend"],
            ),
            ops,
            listener_accepted: counter_vec(
                &registry,
                LISTENER_CONNECTIONS_ACCEPTED,
                "Client connections accepted.",
                &["listener"],
            ),
            listener_rejected: counter_vec(
                &registry,
                LISTENER_CONNECTIONS_REJECTED,
                "Client connections closed at once, by reason.",
                &["listener", "reason"],
            ),
            listener_active,
            listener_closed: counter_vec(
                &registry,
                LISTENER_CONNECTIONS_CLOSED,
                "Client connections ended, by termination reason.",
                &["listener", "reason"],
            ),
            listener_accept_errors: counter_vec(
                &registry,
                LISTENER_ACCEPT_ERRORS,
                "accept(2) errors other than per-connection ones.",
                &["listener"],
            ),
            listener_bytes_from_clients: counter_vec(
                &registry,
                LISTENER_BYTES_FROM_CLIENTS,
                "Bytes received from clients and forwarded.",
                &["listener"],
            ),
            listener_bytes_to_clients: counter_vec(
                &registry,
                LISTENER_BYTES_TO_CLIENTS,
                "Bytes sent to clients.",
                &["listener"],
            ),
            backend_connect_attempts: counter_vec(
                &registry,
                BACKEND_CONNECT_ATTEMPTS,
                "Connects attempted to a backend.",
                &["pool", "backend"],
            ),
            backend_connect_failures: counter_vec(
                &registry,
                BACKEND_CONNECT_FAILURES,
                "Connects to a backend that failed or timed out.",
                &["pool", "backend"],
            ),
            backend_connect_duration,
            backend_breaker_opened: counter_vec(
                &registry,
                BACKEND_BREAKER_OPENED,
                "Times a backend was marked down by consecutive connect failures.",
                &["pool", "backend"],
            ),
            pool_retries: counter_vec(
                &registry,
                POOL_RETRIES,
                "Connects retried on another backend.",
                &["pool"],
            ),
            udp: UdpFamilies::new(&registry),
            registry,
        }
    }

    /// Handles for a listener of `protocol`, creating series in its protocol's families only.
    pub fn listener_series(&self, listener: &str, protocol: Protocol) -> ListenerSeries {
        match protocol {
            Protocol::Tcp => ListenerSeries::Tcp(self.listener(listener)),
            Protocol::Udp => ListenerSeries::Udp(self.udp(listener)),
        }
    }

    /// Handles for one TCP listener (a UDP listener's are [`Metrics::udp`]).
    pub fn listener(&self, listener: &str) -> ListenerMetrics {
        let l = &[listener];
        ListenerMetrics {
            accepted: self.listener_accepted.with_label_values(l),
            active: self.listener_active.with_label_values(l),
            accept_errors: self.listener_accept_errors.with_label_values(l),
            bytes_from_clients: self.listener_bytes_from_clients.with_label_values(l),
            bytes_to_clients: self.listener_bytes_to_clients.with_label_values(l),
            closed: CloseReason::ALL
                .iter()
                .map(|r| {
                    self.listener_closed
                        .with_label_values(&[listener, r.as_str()])
                })
                .collect(),
            refused: Refusal::ALL
                .iter()
                .map(|r| {
                    self.listener_rejected
                        .with_label_values(&[listener, r.as_str()])
                })
                .collect(),
        }
    }

    pub fn backend(&self, pool: &str, backend: &str) -> BackendMetrics {
        let l = &[pool, backend];
        BackendMetrics {
            connect_attempts: self.backend_connect_attempts.with_label_values(l),
            connect_failures: self.backend_connect_failures.with_label_values(l),
            connect_duration: self.backend_connect_duration.with_label_values(l),
            breaker_opened: self.backend_breaker_opened.with_label_values(l),
            bytes_from_clients: self.backend_bytes_from_clients.with_label_values(l),
            bytes_to_clients: self.backend_bytes_to_clients.with_label_values(l),
            passive_down: self.backend_state_changes.with_label_values(&[
                pool,
                backend,
                crate::backend::Health::Down.as_str(),
                crate::backend::DownReason::Passive.as_str(),
            ]),
            back_up: self.backend_state_changes.with_label_values(&[
                pool,
                backend,
                crate::backend::Health::Up.as_str(),
                NO_REASON,
            ]),
            udp_unreachable: self.udp.backend_unreachable.with_label_values(l),
        }
    }

    pub fn pool(&self, pool: &str) -> PoolMetrics {
        // Exported at 0 from the start, so alerts on increase() see the first split brain.
        self.pool_split_brain.with_label_values(&[pool]);
        PoolMetrics {
            retries: self.pool_retries.with_label_values(&[pool]),
            fallback: self.pool_fallback.with_label_values(&[pool]),
        }
    }

    pub fn health(&self, pool: &str, backend: &str, check: &str) -> HealthMetrics {
        HealthMetrics {
            check_duration: self
                .health_check_duration
                .with_label_values(&[pool, backend, check]),
            checks: self.health_checks.clone(),
            state_changes: self.backend_state_changes.clone(),
            labels: [pool.to_string(), backend.to_string(), check.to_string()],
        }
    }

    pub fn split_brain(&self, pool: &str) -> IntCounter {
        self.pool_split_brain.with_label_values(&[pool])
    }

    /// Prometheus text exposition of everything registered.
    pub fn encode_text(&self) -> String {
        use prometheus::Encoder;
        let mut out = Vec::new();
        let encoder = prometheus::TextEncoder::new();
        // Encoding into a Vec cannot fail for I/O reasons; a family that cannot be encoded
        // is skipped rather than failing the scrape.
        let _ = encoder.encode(&self.registry.gather(), &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }
}
