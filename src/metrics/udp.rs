//! The UDP metric families, the handles of one UDP listener, and [`GaugeShare`], through
//! which each task of a listener publishes its part of a gauge they share.

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Registry};

use super::{counter_vec, gauge_vec, names, Metrics};
use crate::udp::{DropReason, FlowEnd};

impl Metrics {
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
            upstream_sockets_reused: u.upstream_sockets_reused.with_label_values(l),
            upstream_sockets_spare: u.upstream_sockets_spare.with_label_values(l),
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
    pub upstream_sockets_reused: IntCounter,
    pub upstream_sockets_spare: IntGauge,
}

impl UdpMetrics {
    pub fn flows_expired(&self, reason: FlowEnd) -> &IntCounter {
        &self.flows_expired[reason as usize]
    }

    pub fn dropped(&self, reason: DropReason) -> &IntCounter {
        &self.dropped[reason as usize]
    }
}

/// One task's part of a gauge that several tasks add up to (a listener's tasks with
/// `reuse_port`): each publishes the change since its last publish, so none overwrites
/// another's part, and its remainder is taken off when the share is dropped (the task
/// ended, however it ended).
#[derive(Debug)]
pub struct GaugeShare {
    gauge: IntGauge,
    published: i64,
}

impl GaugeShare {
    pub fn new(gauge: IntGauge) -> GaugeShare {
        GaugeShare {
            gauge,
            published: 0,
        }
    }

    /// Makes this task's part `value`.
    pub fn publish(&mut self, value: i64) {
        if value != self.published {
            self.gauge.add(value - self.published);
            self.published = value;
        }
    }
}

impl Drop for GaugeShare {
    fn drop(&mut self) {
        self.publish(0);
    }
}

/// The UDP metric families.
#[derive(Debug, Clone)]
pub(super) struct UdpFamilies {
    pub(super) flows_active: IntGaugeVec,
    pub(super) flows_created: IntCounterVec,
    pub(super) flows_expired: IntCounterVec,
    pub(super) datagrams_from_clients: IntCounterVec,
    pub(super) datagrams_to_clients: IntCounterVec,
    pub(super) bytes_from_clients: IntCounterVec,
    pub(super) bytes_to_clients: IntCounterVec,
    pub(super) dropped: IntCounterVec,
    pub(super) backend_unreachable: IntCounterVec,
    pub(super) upstream_sockets_reused: IntCounterVec,
    pub(super) upstream_sockets_spare: IntGaugeVec,
}

impl UdpFamilies {
    pub(super) fn new(registry: &Registry) -> UdpFamilies {
        use names::*;
        let listener = &["listener"];
        UdpFamilies {
            flows_active: gauge_vec(
                registry,
                UDP_FLOWS_ACTIVE,
                "UDP flows currently tracked.",
                listener,
            ),
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
            upstream_sockets_reused: counter_vec(
                registry,
                UDP_UPSTREAM_SOCKETS_REUSED,
                "UDP flows started on a spare upstream socket instead of a new one.",
                listener,
            ),
            upstream_sockets_spare: gauge_vec(
                registry,
                UDP_UPSTREAM_SOCKETS_SPARE,
                "Upstream sockets kept open for reuse (not serving a flow).",
                listener,
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauge_shares_add_up_and_leave_with_their_task() {
        let gauge = IntGauge::new("spare", "test").expect("gauge");
        let mut a = GaugeShare::new(gauge.clone());
        let mut b = GaugeShare::new(gauge.clone());
        a.publish(3);
        b.publish(2);
        assert_eq!(gauge.get(), 5);
        a.publish(1);
        assert_eq!(gauge.get(), 3, "a's change, b's part kept");
        a.publish(1);
        assert_eq!(gauge.get(), 3);
        drop(b);
        assert_eq!(gauge.get(), 1, "b ended: its part is gone, a's stays");
        drop(a);
        assert_eq!(gauge.get(), 0);
    }
}
