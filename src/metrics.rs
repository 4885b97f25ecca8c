//! Metric names (in one place, so dashboards and alerts can be checked against them) and
//! pre-resolved handles. Handles are looked up once when a snapshot is built, so the data
//! path only touches atomics, never the registry's label maps. Labels are bounded:
//! listener, pool, backend and a fixed set of reasons; never a client address.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

use crate::conn::CloseReason;
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
    pub const UDP_FLOWS_ACTIVE: &str = "switchyard_udp_flows_active";
    pub const UDP_FLOWS_CREATED: &str = "switchyard_udp_flows_created_total";
    pub const UDP_FLOWS_EXPIRED: &str = "switchyard_udp_flows_expired_total";
    pub const UDP_DATAGRAMS_FROM_CLIENTS: &str = "switchyard_udp_datagrams_from_clients_total";
    pub const UDP_DATAGRAMS_TO_CLIENTS: &str = "switchyard_udp_datagrams_to_clients_total";
    pub const UDP_BYTES_FROM_CLIENTS: &str = "switchyard_udp_bytes_from_clients_total";
    pub const UDP_BYTES_TO_CLIENTS: &str = "switchyard_udp_bytes_to_clients_total";
    pub const UDP_DATAGRAMS_DROPPED: &str = "switchyard_udp_datagrams_dropped_total";
    pub const BACKEND_UDP_UNREACHABLE: &str = "switchyard_backend_udp_unreachable_total";
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
    udp: UdpFamilies,
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
    /// ICMP port unreachable seen on a UDP flow to this backend.
    pub udp_unreachable: IntCounter,
}

/// Handles for one pool.
#[derive(Debug, Clone)]
pub struct PoolMetrics {
    pub retries: IntCounter,
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
        Metrics {
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
            udp_unreachable: self.udp.backend_unreachable.with_label_values(l),
        }
    }

    pub fn pool(&self, pool: &str) -> PoolMetrics {
        PoolMetrics {
            retries: self.pool_retries.with_label_values(&[pool]),
        }
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
