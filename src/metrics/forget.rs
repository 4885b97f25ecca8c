//! Dropping the series of what a reload removed: listeners, pools and backends.

use std::collections::{HashMap, HashSet};

use prometheus::core::{Collector, MetricVec, MetricVecBuilder};

use super::Metrics;

impl Metrics {
    /// Drops the series of listeners, pools and backends a reload removed, so churn in the
    /// config does not grow the exposition (or memory) without bound. Connections still
    /// open under the old config keep their handles, but what they count from now on under
    /// a removed name is not exported (a kept listener's totals still count it). A name
    /// that comes back starts from zero (a counter reset).
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
        let families: [&dyn Forget; 30] = [
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
            &u.upstream_sockets_reused,
            &u.upstream_sockets_spare,
        ];
        for family in families {
            family.remove_where(&gone);
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{DownReason, HealthStatus};
    use crate::conn::CloseReason;
    use crate::udp::DropReason;

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
