//! Metric names (in one place, so dashboards and alerts can be checked against them) and
//! pre-resolved handles. Handles are looked up once when a snapshot is built, so the data
//! path only touches atomics, never the registry's label maps. Labels are bounded:
//! listener, pool, backend and a fixed set of reasons; never a client address.

use std::collections::{HashMap, HashSet};

use prometheus::core::{Collector, MetricVec, MetricVecBuilder};
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

use crate::conn::CloseReason;
use crate::route::Refusal;
use crate::udp::{DropReason, FlowEnd};

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
    pub const BACKEND_BYTES_FROM_CLIENTS: &str = "switchyard_backend_bytes_from_clients_total";
    pub const BACKEND_BYTES_TO_CLIENTS: &str = "switchyard_backend_bytes_to_clients_total";
    // Read from live backend state at scrape time (admin::exporter).
    pub const BACKEND_CONNECTIONS_ACTIVE: &str = "switchyard_backend_connections_active";
    pub const BACKEND_UP: &str = "switchyard_backend_up";
    pub const BACKEND_STATE: &str = "switchyard_backend_state";
    pub const BACKEND_WEIGHT: &str = "switchyard_backend_weight";
    pub const CONFIG_RELOADS: &str = "switchyard_config_reloads_total";
    pub const CONFIG_LAST_RELOAD_SUCCESSFUL: &str = "switchyard_config_last_reload_successful";
    pub const CONFIG_LAST_RELOAD_SUCCESS_TIME: &str =
        "switchyard_config_last_reload_success_timestamp_seconds";
    pub const ACCESS_LOG_RECORDS: &str = "switchyard_access_log_records_total";
    pub const ACCESS_LOG_DROPPED: &str = "switchyard_access_log_dropped_total";
    pub const ACCESS_LOG_WRITE_ERRORS: &str = "switchyard_access_log_write_errors_total";
    pub const ADMIN_AUTH_FAILURES: &str = "switchyard_admin_auth_failures_total";
    pub const BUILD_INFO: &str = "switchyard_build_info";
    pub const READY: &str = "switchyard_ready";
    // Process metrics, read from /proc at scrape time; the names every exporter uses.
    pub const PROCESS_CPU: &str = "process_cpu_seconds_total";
    pub const PROCESS_RSS: &str = "process_resident_memory_bytes";
    pub const PROCESS_VSZ: &str = "process_virtual_memory_bytes";
    pub const PROCESS_OPEN_FDS: &str = "process_open_fds";
    pub const PROCESS_MAX_FDS: &str = "process_max_fds";
    pub const PROCESS_START_TIME: &str = "process_start_time_seconds";
    pub const UDP_FLOWS_ACTIVE: &str = "switchyard_udp_flows_active";
    pub const UDP_FLOWS_CREATED: &str = "switchyard_udp_flows_created_total";
    pub const UDP_FLOWS_EXPIRED: &str = "switchyard_udp_flows_expired_total";
    pub const UDP_DATAGRAMS_FROM_CLIENTS: &str = "switchyard_udp_datagrams_from_clients_total";
    pub const UDP_DATAGRAMS_TO_CLIENTS: &str = "switchyard_udp_datagrams_to_clients_total";
    pub const UDP_BYTES_FROM_CLIENTS: &str = "switchyard_udp_bytes_from_clients_total";
    pub const UDP_BYTES_TO_CLIENTS: &str = "switchyard_udp_bytes_to_clients_total";
    pub const UDP_DATAGRAMS_DROPPED: &str = "switchyard_udp_datagrams_dropped_total";
    pub const BACKEND_UDP_UNREACHABLE: &str = "switchyard_backend_udp_unreachable_total";

    /// 1 for the reason of a down backend, 0 for the other reasons (all 0 when not down).
    pub const BACKEND_DOWN_REASON: &str = "switchyard_backend_down_reason";
    pub const BACKEND_STATE_CHANGES: &str = "switchyard_backend_state_changes_total";
    pub const HEALTH_CHECK_DURATION: &str = "switchyard_health_check_duration_seconds";
    pub const HEALTH_CHECKS: &str = "switchyard_health_checks_total";
    pub const POOL_SPLIT_BRAIN: &str = "switchyard_pool_split_brain_total";
    pub const POOL_FALLBACK: &str = "switchyard_pool_fallback_total";

    /// Every metric family the balancer exports (dashboards and alerts are checked against it).
    pub const ALL: &[&str] = &[
        LISTENER_CONNECTIONS_ACCEPTED,
        LISTENER_CONNECTIONS_REJECTED,
        LISTENER_CONNECTIONS_ACTIVE,
        LISTENER_CONNECTIONS_CLOSED,
        LISTENER_ACCEPT_ERRORS,
        LISTENER_BYTES_FROM_CLIENTS,
        LISTENER_BYTES_TO_CLIENTS,
        BACKEND_CONNECT_ATTEMPTS,
        BACKEND_CONNECT_FAILURES,
        BACKEND_CONNECT_DURATION,
        BACKEND_BREAKER_OPENED,
        POOL_RETRIES,
        BACKEND_BYTES_FROM_CLIENTS,
        BACKEND_BYTES_TO_CLIENTS,
        BACKEND_DOWN_REASON,
        BACKEND_STATE_CHANGES,
        HEALTH_CHECK_DURATION,
        HEALTH_CHECKS,
        POOL_SPLIT_BRAIN,
        POOL_FALLBACK,
        BACKEND_CONNECTIONS_ACTIVE,
        BACKEND_UP,
        BACKEND_STATE,
        BACKEND_WEIGHT,
        CONFIG_RELOADS,
        CONFIG_LAST_RELOAD_SUCCESSFUL,
        CONFIG_LAST_RELOAD_SUCCESS_TIME,
        ACCESS_LOG_RECORDS,
        ACCESS_LOG_DROPPED,
        ACCESS_LOG_WRITE_ERRORS,
        ADMIN_AUTH_FAILURES,
        BUILD_INFO,
        READY,
        PROCESS_CPU,
        PROCESS_RSS,
        PROCESS_VSZ,
        PROCESS_OPEN_FDS,
        PROCESS_MAX_FDS,
        PROCESS_START_TIME,
        UDP_FLOWS_ACTIVE,
        UDP_FLOWS_CREATED,
        UDP_FLOWS_EXPIRED,
        UDP_DATAGRAMS_FROM_CLIENTS,
        UDP_DATAGRAMS_TO_CLIENTS,
        UDP_BYTES_FROM_CLIENTS,
        UDP_BYTES_TO_CLIENTS,
        UDP_DATAGRAMS_DROPPED,
        BACKEND_UDP_UNREACHABLE,
    ];
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

/// Handles for one listener.
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
        let reason = to.reason.map_or("-", |r| r.as_str());
        self.state_changes
            .with_label_values(&[pool, backend, to.health.as_str(), reason])
            .inc();
    }
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    registry
        .register(Box::new(g.clone()))
        .unwrap_or_else(|e| panic!("register {name}: {e}"));
    g
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

    /// Handles for one UDP listener.
    pub fn udp(&self, listener: &str) -> UdpMetrics {
        let u = &self.udp;
        let l = &[listener];
        UdpMetrics {
            flows_active: u.flows_active.with_label_values(l),
            flows_created: u.flows_created.with_label_values(l),
            flows_expired: FlowEnd::ALL
                .iter()
                .map(|r| u.flows_expired.with_label_values(&[listener, r.as_str()]))
                .collect(),
            datagrams_from_clients: u.datagrams_from_clients.with_label_values(l),
            datagrams_to_clients: u.datagrams_to_clients.with_label_values(l),
            bytes_from_clients: u.bytes_from_clients.with_label_values(l),
            bytes_to_clients: u.bytes_to_clients.with_label_values(l),
            dropped: DropReason::ALL
                .iter()
                .map(|r| u.dropped.with_label_values(&[listener, r.as_str()]))
                .collect(),
        }
    }

    /// Drops the series of listeners, pools and backends a reload removed, so churn in the
    /// config does not grow the exposition (or memory) without bound. Connections still
    /// open under the old config keep their handles; what they count from now on shows only
    /// in the listener totals. A name that comes back starts from zero (a counter reset).
    pub fn forget(&self, removed: &Removed) {
        if removed.is_empty() {
            return;
        }
        let gone = |labels: &HashMap<&str, &str>| {
            labels
                .get("listener")
                .is_some_and(|l| removed.listeners.contains(*l))
                || labels.get("pool").is_some_and(|p| {
                    removed.pools.contains(*p)
                        || labels.get("backend").is_some_and(|b| {
                            removed.backends.contains(&(p.to_string(), b.to_string()))
                        })
                })
        };
        let u = &self.udp;
        let families: [&dyn Forget; 28] = [
            &self.listener_accepted,
            &self.listener_rejected,
            &self.listener_active,
            &self.listener_closed,
            &self.listener_accept_errors,
            &self.listener_bytes_from_clients,
            &self.listener_bytes_to_clients,
            &self.backend_connect_attempts,
            &self.backend_connect_failures,
            &self.backend_connect_duration,
            &self.backend_breaker_opened,
            &self.pool_retries,
            &self.backend_bytes_from_clients,
            &self.backend_bytes_to_clients,
            &self.health_check_duration,
            &self.health_checks,
            &self.backend_state_changes,
            &self.pool_split_brain,
            &self.pool_fallback,
            &u.flows_active,
            &u.flows_created,
            &u.flows_expired,
            &u.datagrams_from_clients,
            &u.datagrams_to_clients,
            &u.bytes_from_clients,
            &u.bytes_to_clients,
            &u.dropped,
            &u.backend_unreachable,
        ];
        for family in families {
            family.remove_where(&gone);
        }
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

/// What a reload removed, for [`Metrics::forget`].
#[derive(Debug, Default)]
pub struct Removed {
    pub listeners: HashSet<String>,
    pub pools: HashSet<String>,
    /// (pool, backend) of backends removed from pools that remain.
    pub backends: HashSet<(String, String)>,
}

impl Removed {
    pub fn is_empty(&self) -> bool {
        self.listeners.is_empty() && self.pools.is_empty() && self.backends.is_empty()
    }
}

/// A labelled metric family whose series can be dropped by their labels.
trait Forget {
    fn remove_where(&self, gone: &dyn Fn(&HashMap<&str, &str>) -> bool);
}

impl<T: MetricVecBuilder> Forget for MetricVec<T> {
    fn remove_where(&self, gone: &dyn Fn(&HashMap<&str, &str>) -> bool) {
        for family in self.collect() {
            for metric in family.get_metric() {
                let labels: HashMap<&str, &str> = metric
                    .get_label()
                    .iter()
                    .map(|l| (l.get_name(), l.get_value()))
                    .collect();
                if gone(&labels) {
                    // Already gone (a concurrent forget) is fine.
                    let _ = self.remove(&labels);
                }
            }
        }
    }
}

/// Handles for one UDP listener.
#[derive(Debug, Clone)]
pub struct UdpMetrics {
    pub flows_active: IntGauge,
    pub flows_created: IntCounter,
    flows_expired: Vec<IntCounter>,
    pub datagrams_from_clients: IntCounter,
    pub datagrams_to_clients: IntCounter,
    pub bytes_from_clients: IntCounter,
    pub bytes_to_clients: IntCounter,
    dropped: Vec<IntCounter>,
}

impl UdpMetrics {
    pub fn flows_expired(&self, reason: FlowEnd) -> &IntCounter {
        &self.flows_expired[reason as usize]
    }

    pub fn dropped(&self, reason: DropReason) -> &IntCounter {
        &self.dropped[reason as usize]
    }
}

/// The UDP metric families.
#[derive(Debug, Clone)]
struct UdpFamilies {
    flows_active: IntGaugeVec,
    flows_created: IntCounterVec,
    flows_expired: IntCounterVec,
    datagrams_from_clients: IntCounterVec,
    datagrams_to_clients: IntCounterVec,
    bytes_from_clients: IntCounterVec,
    bytes_to_clients: IntCounterVec,
    dropped: IntCounterVec,
    backend_unreachable: IntCounterVec,
}

impl UdpFamilies {
    fn new(registry: &Registry) -> UdpFamilies {
        use names::*;
        let flows_active = IntGaugeVec::new(
            Opts::new(UDP_FLOWS_ACTIVE, "UDP flows currently tracked."),
            &["listener"],
        )
        .unwrap_or_else(|e| panic!("metric {UDP_FLOWS_ACTIVE}: {e}"));
        registry
            .register(Box::new(flows_active.clone()))
            .unwrap_or_else(|e| panic!("register {UDP_FLOWS_ACTIVE}: {e}"));
        let listener = &["listener"];
        UdpFamilies {
            flows_active,
            flows_created: counter_vec(registry, UDP_FLOWS_CREATED, "UDP flows started.", listener),
            flows_expired: counter_vec(
                registry,
                UDP_FLOWS_EXPIRED,
                "UDP flows forgotten, by reason.",
                &["listener", "reason"],
            ),
            datagrams_from_clients: counter_vec(
                registry,
                UDP_DATAGRAMS_FROM_CLIENTS,
                "Datagrams received from clients and sent to a backend.",
                listener,
            ),
            datagrams_to_clients: counter_vec(
                registry,
                UDP_DATAGRAMS_TO_CLIENTS,
                "Datagrams received from backends and sent to clients.",
                listener,
            ),
            bytes_from_clients: counter_vec(
                registry,
                UDP_BYTES_FROM_CLIENTS,
                "Payload bytes of datagrams sent from clients to backends.",
                listener,
            ),
            bytes_to_clients: counter_vec(
                registry,
                UDP_BYTES_TO_CLIENTS,
                "Payload bytes of datagrams sent from backends to clients.",
                listener,
            ),
            dropped: counter_vec(
                registry,
                UDP_DATAGRAMS_DROPPED,
                "Datagrams not forwarded, by reason.",
                &["listener", "reason"],
            ),
            backend_unreachable: counter_vec(
                registry,
                BACKEND_UDP_UNREACHABLE,
                "ICMP port unreachable received from a backend on a UDP flow (a passive failure).",
                &["pool", "backend"],
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{DownReason, HealthStatus};

    /// Every family gets a series for a kept and a removed listener, pool and backend.
    fn touch(m: &Metrics, listener: &str, pool: &str, backend: &str) {
        let l = m.listener(listener);
        l.accepted.inc();
        l.active.inc();
        l.closed(CloseReason::ALL[0]).inc();
        let b = m.backend(pool, backend);
        b.connect_attempts.inc();
        b.connect_duration.observe(0.001);
        b.udp_unreachable.inc();
        m.pool(pool).retries.inc();
        m.split_brain(pool).inc();
        let h = m.health(pool, backend, "tcp");
        h.check_duration.observe(0.001);
        h.check_result(HealthStatus::down(DownReason::Timeout));
        h.state_changed(HealthStatus::UP);
        let u = m.udp(listener);
        u.flows_created.inc();
        u.dropped(DropReason::ALL[0]).inc();
    }

    /// Names of the families with a series that has a label of this value.
    fn series(m: &Metrics, value: &str) -> Vec<String> {
        m.registry
            .gather()
            .iter()
            .flat_map(|f| {
                f.get_metric()
                    .iter()
                    .filter(|s| s.get_label().iter().any(|l| l.get_value() == value))
                    .map(|_| f.get_name().to_string())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn forget_drops_every_series_of_what_a_reload_removed() {
        let m = Metrics::new();
        touch(&m, "kept", "kept", "kept");
        touch(&m, "gone", "gone", "x");
        touch(&m, "kept", "kept", "gone");
        assert!(!series(&m, "gone").is_empty());
        m.forget(&Removed {
            listeners: HashSet::from(["gone".to_string()]),
            pools: HashSet::from(["gone".to_string()]),
            backends: HashSet::from([("kept".to_string(), "gone".to_string())]),
        });
        assert_eq!(
            series(&m, "gone"),
            Vec::<String>::new(),
            "series left behind"
        );
        assert_eq!(
            series(&m, "x"),
            Vec::<String>::new(),
            "a removed pool's backends"
        );
        // The kept listener, pool and backend keep exactly their series, and their counts.
        let only_kept = Metrics::new();
        touch(&only_kept, "kept", "kept", "kept");
        let kept = series(&only_kept, "kept");
        let mut families: Vec<&String> = kept.iter().collect();
        families.dedup();
        assert!(families.len() >= 20, "{families:?}");
        assert_eq!(series(&m, "kept"), kept);
        assert_eq!(m.listener("kept").accepted.get(), 2);
        assert_eq!(m.backend("kept", "kept").connect_attempts.get(), 1);
    }
}
