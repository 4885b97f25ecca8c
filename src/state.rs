//! Shared live state: an immutable [`Snapshot`] (validated config plus built pools and
//! balancers) behind an `ArcSwap`, and the per-backend atomics it points to. A snapshot is
//! built whole off the hot path and published atomically; connections `load` it once.
//! Backend state is keyed by (pool, backend name) and carried into each new snapshot, so a
//! rebuild resets neither health nor connection counts.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use crate::backend::{Backend, BackendState, Breaker};
use crate::balance::Balancer;
use crate::config::{Config, HashKey, ListenerConfig, PoolConfig, Protocol};
use crate::metrics::{BackendMetrics, ListenerSeries, Metrics, PoolMetrics, Removed};

/// One pool as built from the config: backends in config order, their metric handles
/// (same order), and the balancer over them.
#[derive(Debug)]
pub struct Pool {
    pub config: PoolConfig,
    pub backends: Vec<Backend>,
    pub backend_metrics: Vec<BackendMetrics>,
    pub balancer: Balancer,
    pub breaker: Breaker,
    pub metrics: PoolMetrics,
}

impl Pool {
    pub fn hash_key(&self) -> HashKey {
        self.config.hash_key
    }
}

/// A listener's routing step: where its connections go, with its metric handles.
#[derive(Debug)]
pub struct Route {
    pub config: ListenerConfig,
    pub pool: Arc<Pool>,
    /// Connection and byte counters for TCP, flow and datagram counters for UDP (the
    /// status document reads them).
    pub metrics: ListenerSeries,
    /// PROXY header, ACL and TLS-by-SNI settings, pools resolved.
    pub routing: crate::route::Routing,
}

/// Everything a connection needs to route, frozen at one point in time.
#[derive(Debug)]
pub struct Snapshot {
    pub config: Arc<Config>,
    pub pools: HashMap<String, Arc<Pool>>,
    pub routes: HashMap<String, Arc<Route>>,
}

impl Snapshot {
    pub fn route(&self, listener: &str) -> Option<&Arc<Route>> {
        self.routes.get(listener)
    }
}

/// State shared by every task of one running balancer.
#[derive(Debug)]
pub struct Shared {
    snapshot: ArcSwap<Snapshot>,
    /// Held while a snapshot is published, and while series of what one removed are
    /// forgotten late, so that a forget never races a reload that brings a name back.
    publishing: Mutex<()>,
    backend_states: Mutex<HashMap<(String, String), Arc<BackendState>>>,
    pub metrics: Metrics,
    /// Active health-check probers, kept in line with each published snapshot.
    pub health: crate::health::Supervisor,
}

impl Shared {
    pub fn new(config: Config, metrics: Metrics) -> Arc<Shared> {
        Shared::with_states(config, metrics, HashMap::new())
    }

    /// Like [`Shared::new`], starting from backend states by (pool, backend) taken over
    /// from a previous process; those the config does not have are dropped.
    pub fn with_states(
        config: Config,
        metrics: Metrics,
        states: HashMap<(String, String), Arc<BackendState>>,
    ) -> Arc<Shared> {
        let backend_states = Mutex::new(states);
        let snapshot = build(config, &backend_states, &metrics);
        Arc::new(Shared {
            snapshot: ArcSwap::from_pointee(snapshot),
            publishing: Mutex::new(()),
            backend_states,
            metrics,
            health: crate::health::Supervisor::new(),
        })
    }

    /// The current snapshot; hold it for the life of a connection.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Builds a snapshot of `config` (keeping live backend state) and publishes it; the
    /// metric series of what it no longer has are dropped.
    pub fn publish(self: &Arc<Self>, config: Config) {
        let _publishing = self.publishing.lock().unwrap_or_else(|e| e.into_inner());
        let snapshot = Arc::new(build(config, &self.backend_states, &self.metrics));
        let previous = self.snapshot.swap(Arc::clone(&snapshot));
        crate::health::close_removed(&previous, &snapshot);
        let stopped = self.health.sync(&snapshot, &self.metrics);
        let removed = removed(&previous, &snapshot);
        self.metrics.forget(&removed);
        // A stopped prober may be between its check and its count right now, and would
        // bring a health series back: once they have all ended, forget its pools and
        // backends once more (probers touch no listener series).
        let health = Removed {
            pools: removed.pools,
            backends: removed.backends,
            ..Removed::default()
        };
        if !health.is_empty() && !stopped.is_empty() {
            let shared = Arc::clone(self);
            tokio::spawn(async move {
                for prober in stopped {
                    let _ = prober.await;
                }
                shared.forget_still_gone(health);
            });
        }
    }

    /// Forgets the pools and backends of `removed` that the live snapshot still lacks: a
    /// reload since may have brought one back, and its series are live again.
    fn forget_still_gone(&self, mut removed: Removed) {
        let _publishing = self.publishing.lock().unwrap_or_else(|e| e.into_inner());
        let live = self.snapshot();
        removed.pools.retain(|pool| !live.pools.contains_key(pool));
        removed.backends.retain(|(pool, backend)| {
            live.pools
                .get(pool)
                .is_none_or(|p| p.backends.iter().all(|b| &*b.name != backend))
        });
        self.metrics.forget(&removed);
    }

    /// Live state of a backend, if the current config has it.
    pub fn backend_state(&self, pool: &str, backend: &str) -> Option<Arc<BackendState>> {
        let snapshot = self.snapshot();
        let pool = snapshot.pools.get(pool)?;
        pool.backends
            .iter()
            .find(|b| &*b.name == backend)
            .map(|b| Arc::clone(&b.state))
    }
}

/// Listeners, pools and backends `previous` has and `current` does not; a listener that
/// changed protocol counts as removed from its old protocol's families.
fn removed(previous: &Snapshot, current: &Snapshot) -> Removed {
    let mut removed = Removed::default();
    for (name, route) in &previous.routes {
        let was = route.config.protocol;
        if current.route(name).map(|r| r.config.protocol) != Some(was) {
            match was {
                Protocol::Tcp => removed.tcp_listeners.insert(name.clone()),
                Protocol::Udp => removed.udp_listeners.insert(name.clone()),
            };
        }
    }
    for (name, pool) in &previous.pools {
        let Some(now) = current.pools.get(name) else {
            removed.pools.insert(name.clone());
            continue;
        };
        for b in &pool.backends {
            if !now.backends.iter().any(|n| n.name == b.name) {
                removed.backends.insert((name.clone(), b.name.to_string()));
            }
        }
    }
    removed
}

fn build(
    config: Config,
    states: &Mutex<HashMap<(String, String), Arc<BackendState>>>,
    metrics: &Metrics,
) -> Snapshot {
    // A poisoned lock only means another build panicked; the map itself stays consistent.
    let mut states = states.lock().unwrap_or_else(|e| e.into_inner());
    let mut pools = HashMap::with_capacity(config.pools.len());
    for pc in &config.pools {
        let backends: Vec<Backend> = pc
            .backends
            .iter()
            .map(|bc| {
                let state = states
                    .entry((pc.name.clone(), bc.name.clone()))
                    .or_insert_with(|| {
                        Arc::new(BackendState::with_status(crate::health::initial_status(pc)))
                    });
                Backend {
                    name: Arc::from(bc.name.as_str()),
                    addr: crate::backend::BackendAddr(bc.address),
                    // A weight set through the admin API outlives reloads.
                    weight: state.weight_override().unwrap_or(bc.weight),
                    state: Arc::clone(state),
                }
            })
            .collect();
        let pool = Pool {
            backend_metrics: backends
                .iter()
                .map(|b| metrics.backend(&pc.name, &b.name))
                .collect(),
            balancer: Balancer::build(pc.balance, &backends, pc.maglev_table_size),
            breaker: Breaker {
                max_fails: pc.max_fails,
                fail_duration_ms: pc.fail_duration.as_millis() as u64,
            },
            metrics: metrics.pool(&pc.name),
            backends,
            config: pc.clone(),
        };
        pools.insert(pc.name.clone(), Arc::new(pool));
    }
    // A backend the config no longer has is forgotten: back under its name, it starts fresh.
    states.retain(|(pool, backend), _| {
        config
            .pool(pool)
            .is_some_and(|p| p.backends.iter().any(|b| b.name == *backend))
    });
    let routes = config
        .listeners
        .iter()
        .filter_map(|lc| {
            let pool = Arc::clone(pools.get(&lc.pool)?);
            let route = Route {
                config: lc.clone(),
                pool,
                metrics: metrics.listener_series(&lc.name, lc.protocol),
                routing: crate::route::Routing::build(lc, &pools),
            };
            Some((lc.name.clone(), Arc::new(route)))
        })
        .collect();
    Snapshot {
        config: Arc::new(config),
        pools,
        routes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn config(protocol: &str) -> Config {
        let yaml = format!(
            "listeners:\n  - {{ name: l, bind: 127.0.0.1:0, protocol: {protocol}, pool: p }}\npools:\n  - name: p\n    backends: [{{ address: \"127.0.0.1:9\" }}]\n"
        );
        Config::from_yaml(&yaml, "t.yaml").expect("valid")
    }

    /// Families with a series of listener `l`.
    fn families_of_l(metrics: &Metrics) -> Vec<String> {
        metrics
            .registry
            .gather()
            .iter()
            .filter(|f| {
                f.get_metric().iter().any(|m| {
                    m.get_label()
                        .iter()
                        .any(|l| l.get_name() == "listener" && l.get_value() == "l")
                })
            })
            .map(|f| f.get_name().to_string())
            .collect()
    }

    #[tokio::test]
    async fn a_listener_has_series_of_its_protocol_only_across_reloads() {
        let shared = Shared::new(config("udp"), Metrics::new());
        let udp = families_of_l(&shared.metrics);
        assert!(!udp.is_empty());
        assert!(
            udp.iter().all(|f| f.starts_with("switchyard_udp_")),
            "{udp:?}"
        );
        shared.publish(config("tcp"));
        let tcp = families_of_l(&shared.metrics);
        assert!(
            tcp.contains(&crate::metrics::names::LISTENER_CONNECTIONS_ACTIVE.to_string()),
            "{tcp:?}"
        );
        assert!(
            tcp.iter().all(|f| f.starts_with("switchyard_listener_")),
            "{tcp:?}"
        );
        shared.publish(config("udp"));
        assert_eq!(families_of_l(&shared.metrics), udp, "back to UDP");
    }

    /// The late forget after a reload leaves alone a pool and a backend that a later
    /// reload brought back.
    #[tokio::test]
    async fn a_late_forget_spares_what_a_later_reload_brought_back() {
        let with = |backends: &str| {
            Config::from_yaml(
                &format!("listeners:\n  - {{ name: l, bind: 127.0.0.1:0, pool: p }}\npools:\n  - name: p\n    backends: [{backends}]\n  - name: q\n    backends: [{{ name: x, address: \"127.0.0.1:9\" }}]\n"),
                "t.yaml",
            )
            .expect("valid")
        };
        let both = "{ name: a, address: \"127.0.0.1:9\" }, { name: b, address: \"127.0.0.1:10\" }";
        let shared = Shared::new(with(both), Metrics::new());
        let pool_series = |m: &Metrics, pool: &str, backend: &str| {
            m.registry
                .gather()
                .iter()
                .flat_map(|f| f.get_metric().iter())
                .filter(|m| {
                    let has = |k: &str, v: &str| {
                        m.get_label()
                            .iter()
                            .any(|l| l.get_name() == k && l.get_value() == v)
                    };
                    has("pool", pool) && has("backend", backend)
                })
                .count()
        };
        assert!(pool_series(&shared.metrics, "p", "b") > 0);
        // b goes and comes back before the late forget for its removal runs.
        shared.publish(with("{ name: a, address: \"127.0.0.1:9\" }"));
        assert_eq!(
            pool_series(&shared.metrics, "p", "b"),
            0,
            "forgotten at once"
        );
        shared.publish(with(both));
        let back = pool_series(&shared.metrics, "p", "b");
        assert!(back > 0);
        shared.forget_still_gone(Removed {
            pools: HashSet::from(["p".to_string()]),
            backends: HashSet::from([("p".to_string(), "b".to_string())]),
            ..Removed::default()
        });
        assert_eq!(pool_series(&shared.metrics, "p", "b"), back, "spared");
        // What is still gone is forgotten.
        shared.publish(with("{ name: a, address: \"127.0.0.1:9\" }"));
        shared.forget_still_gone(Removed {
            backends: HashSet::from([("p".to_string(), "b".to_string())]),
            ..Removed::default()
        });
        assert_eq!(pool_series(&shared.metrics, "p", "b"), 0);
    }
}
