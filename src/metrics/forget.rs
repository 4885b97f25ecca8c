//! Dropping the series of what a reload removed: listeners, pools and backends.

use std::collections::{HashMap, HashSet};

use prometheus::core::{Collector, MetricVec, MetricVecBuilder};

use super::Metrics;

impl Metrics {
    /// Drops the series of listeners, pools and backends a reload removed, so churn in the
    /// config does not grow the exposition (or memory) without bound; a listener that
    /// changed protocol loses its old protocol's series and keeps its new ones. Connections
    /// and flows still open under the old config keep their handles, but what they count
    /// from now on under a removed name is not exported (a kept listener's totals still
    /// count it). A name that comes back starts from zero (a counter reset).
    pub fn forget(&self, removed: &Removed) {
        if removed.is_empty() {
            return;
        }
        let listener_in = |listeners: &HashSet<String>, labels: &HashMap<&str, &str>| {
            labels
                .get("listener")
                .is_some_and(|l| listeners.contains(*l))
        };
        let tcp_gone = |labels: &HashMap<&str, &str>| listener_in(&removed.tcp_listeners, labels);
        let udp_gone = |labels: &HashMap<&str, &str>| listener_in(&removed.udp_listeners, labels);
        let pool_gone = |labels: &HashMap<&str, &str>| {
            labels.get("pool").is_some_and(|p| {
                removed.pools.contains(*p)
                    || labels
                        .get("backend")
                        .is_some_and(|b| removed.backends.contains(&(p.to_string(), b.to_string())))
            })
        };
        let u = &self.udp;
        let tcp_listener: [&dyn Forget; 7] = [
            &self.listener_accepted,
            &self.listener_rejected,
            &self.listener_active,
            &self.listener_closed,
            &self.listener_accept_errors,
            &self.listener_bytes_from_clients,
            &self.listener_bytes_to_clients,
        ];
        let udp_listener: [&dyn Forget; 10] = [
            &u.flows_active,
            &u.flows_created,
            &u.flows_expired,
            &u.datagrams_from_clients,
            &u.datagrams_to_clients,
            &u.bytes_from_clients,
            &u.bytes_to_clients,
            &u.dropped,
            &u.upstream_sockets_reused,
            &u.upstream_sockets_spare,
        ];
        let pools_and_backends: [&dyn Forget; 13] = [
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
            &u.backend_unreachable,
        ];
        for family in tcp_listener {
            family.remove_where(&tcp_gone);
        }
        for family in udp_listener {
            family.remove_where(&udp_gone);
        }
        for family in pools_and_backends {
            family.remove_where(&pool_gone);
        }
    }
}

/// What a reload removed, for [`Metrics::forget`].
#[derive(Debug, Default)]
pub struct Removed {
    /// TCP listeners the config no longer has, or that are UDP now.
    pub tcp_listeners: HashSet<String>,
    /// UDP listeners the config no longer has, or that are TCP now.
    pub udp_listeners: HashSet<String>,
    pub pools: HashSet<String>,
    /// (pool, backend) of backends removed from pools that remain.
    pub backends: HashSet<(String, String)>,
}

impl Removed {
    pub fn is_empty(&self) -> bool {
        self.tcp_listeners.is_empty()
            && self.udp_listeners.is_empty()
            && self.pools.is_empty()
            && self.backends.is_empty()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{DownReason, HealthStatus};
    use crate::config::Protocol;
    use crate::conn::CloseReason;
    use crate::udp::DropReason;

    /// Every family gets a series for a TCP and a UDP listener, a pool and a backend.
    fn touch(m: &Metrics, tcp_listener: &str, udp_listener: &str, pool: &str, backend: &str) {
        let l = m.listener(tcp_listener);
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
        let u = m.udp(udp_listener);
        u.flows_created.inc();
        u.dropped(DropReason::ALL[0]).inc();
        u.upstream_sockets_reused.inc();
        u.upstream_sockets_spare.set(1);
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
        touch(&m, "kept", "kept-udp", "kept", "kept");
        touch(&m, "gone", "gone-udp", "gone", "x");
        touch(&m, "kept", "kept-udp", "kept", "gone");
        assert!(!series(&m, "gone").is_empty());
        assert!(!series(&m, "gone-udp").is_empty());
        m.forget(&Removed {
            tcp_listeners: HashSet::from(["gone".to_string()]),
            udp_listeners: HashSet::from(["gone-udp".to_string()]),
            pools: HashSet::from(["gone".to_string()]),
            backends: HashSet::from([("kept".to_string(), "gone".to_string())]),
        });
        assert_eq!(
            series(&m, "gone"),
            Vec::<String>::new(),
            "series left behind"
        );
        assert_eq!(
            series(&m, "gone-udp"),
            Vec::<String>::new(),
            "a removed UDP listener's series left behind"
        );
        assert_eq!(
            series(&m, "x"),
            Vec::<String>::new(),
            "a removed pool's backends"
        );
        // The kept listener, pool and backend keep exactly their series, and their counts.
        let only_kept = Metrics::new();
        touch(&only_kept, "kept", "kept-udp", "kept", "kept");
        assert_eq!(series(&m, "kept-udp"), series(&only_kept, "kept-udp"));
        let kept = series(&only_kept, "kept");
        let mut families: Vec<&String> = kept.iter().collect();
        families.dedup();
        assert!(families.len() >= 14, "{families:?}");
        assert_eq!(series(&m, "kept"), kept);
        assert_eq!(m.listener("kept").accepted.get(), 2);
        assert_eq!(m.backend("kept", "kept").connect_attempts.get(), 1);
    }

    #[test]
    fn a_listener_that_changed_protocol_keeps_only_its_new_protocols_series() {
        let m = Metrics::new();
        let was = m.listener_series("dns", Protocol::Tcp);
        if let Some(tcp) = was.tcp() {
            tcp.accepted.inc();
            tcp.closed(CloseReason::ALL[0]).inc();
        }
        // The snapshot that makes it UDP takes its handles before the forget.
        let now = m.listener_series("dns", Protocol::Udp);
        m.forget(&Removed {
            tcp_listeners: HashSet::from(["dns".to_string()]),
            ..Removed::default()
        });
        let left = series(&m, "dns");
        assert!(!left.is_empty(), "the UDP series stay");
        assert!(
            left.iter().all(|f| f.starts_with("switchyard_udp_")),
            "{left:?}"
        );
        // And back to TCP: the UDP series go, the TCP ones start from zero.
        let back = m.listener_series("dns", Protocol::Tcp);
        m.forget(&Removed {
            udp_listeners: HashSet::from(["dns".to_string()]),
            ..Removed::default()
        });
        let left = series(&m, "dns");
        assert!(!left.is_empty(), "the TCP series stay");
        assert!(
            left.iter().all(|f| f.starts_with("switchyard_listener_")),
            "{left:?}"
        );
        assert_eq!(back.tcp().map(|m| m.accepted.get()), Some(0));
        drop((was, now));
    }
}
