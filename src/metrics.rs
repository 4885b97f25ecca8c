//! Metric names (in one place, so dashboards and alerts can be checked against them) and
//! pre-resolved handles. Handles are looked up once when a snapshot is built, so the data
//! path only touches atomics, never the registry's label maps. Labels are bounded:
//! listener, pool, backend and a fixed set of reasons; never a client address.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

use crate::conn::CloseReason;

pub mod names {
    pub const LISTENER_CONNECTIONS_ACCEPTED: &str =
        "switchyard_listener_connections_accepted_total";
    pub const LISTENER_CONNECTIONS_REJECTED: &str =
        "switchyard_listener_connections_rejected_total";
    pub const LISTENER_CONNECTIONS_ACTIVE: &str = "switchyard_listener_connections_active";
    pub const LISTENER_CONNECTIONS_CLOSED: &str = "switchyard_listener_connections_closed_total";
    pub const LISTENER_ACCEPT_ERRORS: &str = "switchyard_listener_accept_errors_total";
    pub const LISTENER_BYTES_FROM_CLIENTS: &str = "switchyard_listener_bytes_from_clients_total";
    pub const LISTENER_BYTES_TO_CLIENTS: &str = "switchyard_listener_bytes_to_clients_total";
    pub const BACKEND_CONNECT_ATTEMPTS: &str = "switchyard_backend_connect_attempts_total";
    pub const BACKEND_CONNECT_FAILURES: &str = "switchyard_backend_connect_failures_total";
    pub const BACKEND_CONNECT_DURATION: &str = "switchyard_backend_connect_duration_seconds";
    pub const BACKEND_BREAKER_OPENED: &str = "switchyard_backend_passive_down_total";
    pub const POOL_RETRIES: &str = "switchyard_pool_connect_retries_total";
    /// 1 for the backend's current state (`state`: up, down, standby), 0 for the others.
    pub const BACKEND_STATE: &str = "switchyard_backend_state";
    /// 1 for the reason of a down backend, 0 for the other reasons (all 0 when not down).
    pub const BACKEND_DOWN_REASON: &str = "switchyard_backend_down_reason";
    pub const BACKEND_STATE_CHANGES: &str = "switchyard_backend_state_changes_total";
    pub const HEALTH_CHECK_DURATION: &str = "switchyard_health_check_duration_seconds";
    pub const HEALTH_CHECKS: &str = "switchyard_health_checks_total";
    pub const POOL_SPLIT_BRAIN: &str = "switchyard_pool_split_brain_total";
    pub const POOL_FALLBACK: &str = "switchyard_pool_fallback_total";
}

/// Why a listener turned a connection away before any backend was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    MaxConnections,
}

impl RejectReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::MaxConnections => "max_connections",
        }
    }
}

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
    health_check_duration: HistogramVec,
    health_checks: IntCounterVec,
    backend_state_changes: IntCounterVec,
    pool_split_brain: IntCounterVec,
    pool_fallback: IntCounterVec,
    /// Backend state gauges, computed from live state at scrape time.
    pub backend_states: crate::health::gauges::StateGauges,
}

/// Handles for one listener.
#[derive(Debug, Clone)]
pub struct ListenerMetrics {
    pub accepted: IntCounter,
    pub rejected_max_connections: IntCounter,
    pub active: IntGauge,
    pub accept_errors: IntCounter,
    pub bytes_from_clients: IntCounter,
    pub bytes_to_clients: IntCounter,
    closed: Vec<IntCounter>,
}

impl ListenerMetrics {
    pub fn closed(&self, reason: CloseReason) -> &IntCounter {
        &self.closed[reason as usize]
    }
}

/// Handles for one backend of one pool.
#[derive(Debug, Clone)]
pub struct BackendMetrics {
    pub connect_attempts: IntCounter,
    pub connect_failures: IntCounter,
    pub connect_duration: Histogram,
    pub breaker_opened: IntCounter,
    /// The state change the opening breaker makes (down, passive), in the shared count.
    pub passive_down: IntCounter,
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
        let reason = to.reason.map_or("-", |r| r.as_str());
        self.state_changes
            .with_label_values(&[pool, backend, to.health.as_str(), reason])
            .inc();
    }
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
        let backend_states = crate::health::gauges::StateGauges::new();
        registry
            .register(Box::new(backend_states.clone()))
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
            backend_states,
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
            registry,
        }
    }

    pub fn listener(&self, listener: &str) -> ListenerMetrics {
        let l = &[listener];
        ListenerMetrics {
            accepted: self.listener_accepted.with_label_values(l),
            rejected_max_connections: self
                .listener_rejected
                .with_label_values(&[listener, RejectReason::MaxConnections.as_str()]),
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
        }
    }

    pub fn backend(&self, pool: &str, backend: &str) -> BackendMetrics {
        let l = &[pool, backend];
        BackendMetrics {
            connect_attempts: self.backend_connect_attempts.with_label_values(l),
            connect_failures: self.backend_connect_failures.with_label_values(l),
            connect_duration: self.backend_connect_duration.with_label_values(l),
            breaker_opened: self.backend_breaker_opened.with_label_values(l),
            passive_down: self.backend_state_changes.with_label_values(&[
                pool,
                backend,
                crate::backend::Health::Down.as_str(),
                crate::backend::DownReason::Passive.as_str(),
            ]),
        }
    }

    pub fn pool(&self, pool: &str) -> PoolMetrics {
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
