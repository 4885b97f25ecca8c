//! Active health checks. One prober task per (pool, backend), apart from the data path, each
//! check bounded by its own `timeout`, so a hung backend never delays another's check or
//! any connection. A prober feeds its results through the rise/fall [`machine`] to the
//! pool's [`arbiter`], which applies the split-brain guard and publishes the final state to
//! the backend's `BackendState` (read by the balancers, the metrics and the admin view).
//!
//! The [`Supervisor`] starts and stops probers from config snapshots: [`Supervisor::sync`]
//! compares each pool's check settings and backends with what runs, keeps the probers of
//! unchanged pools, and restarts the others. Backend state lives on across restarts.
//! Check kinds: [`tcp`], [`postgres`], [`mongodb`], [`udp`] (udp and dns).
//!
//! Every change of a backend's state as readers see it (active checks and the passive
//! breaker combined) is logged once by [`log_change`] and counted in
//! `switchyard_backend_state_changes_total`: by the arbiter for the checks' verdicts, by
//! [`passive`] for the breaker, and by the supervisor when a reload removes a check.

pub mod arbiter;
pub mod machine;
pub mod mongodb;
pub mod passive;
pub mod postgres;
pub mod tcp;
mod tls;
pub mod udp;

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::backend::{BackendState, DownReason, Health, HealthStatus};
use crate::clock;
use crate::config::health::{CheckKind, HealthCheckConfig, PostgresRole};
use crate::config::{OnBackendDown, PoolConfig};
use crate::metrics::{HealthMetrics, Metrics};
use crate::state::{Pool, Snapshot};
use arbiter::{PoolArbiter, Slot};
use machine::Machine;

/// What one check found.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    pub status: HealthStatus,
    /// Timeline of a Postgres server that reports itself primary.
    pub timeline: Option<u64>,
    /// Why it failed (or which role it has), for the state-change log.
    pub detail: Option<String>,
}

impl Observation {
    pub fn up() -> Observation {
        Observation::with(HealthStatus::UP, None, None)
    }

    pub fn down(reason: DownReason, detail: String) -> Observation {
        Observation::with(HealthStatus::down(reason), None, Some(detail))
    }

    pub fn with(
        status: HealthStatus,
        timeline: Option<u64>,
        detail: Option<String>,
    ) -> Observation {
        Observation {
            status,
            timeline,
            detail,
        }
    }
}

/// Down reason for a socket error.
pub fn io_reason(e: &io::Error) -> DownReason {
    match e.kind() {
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => DownReason::Timeout,
        io::ErrorKind::InvalidData => DownReason::CheckError,
        _ => DownReason::Unreachable,
    }
}

/// Logs one change of a backend's state as readers see it: a warning when it goes down,
/// info otherwise. `detail` says why (the failing check's error, the breaker, a reload).
/// The caller counts the change.
pub fn log_change(pool: &str, backend: &str, from: HealthStatus, to: HealthStatus, detail: &str) {
    let (down, from, to) = (to.health == Health::Down, from.describe(), to.describe());
    if down {
        tracing::warn!(pool, backend, from = %from, to = %to, detail, "backend state changed");
    } else {
        tracing::info!(pool, backend, from = %from, to = %to, detail, "backend state changed");
    }
}

/// The state a backend first seen in `pool` starts in: down (pending) until its checks
/// pass `rise` times, unless the pool has no check or says `initial_state: up`.
pub fn initial_status(pool: &PoolConfig) -> HealthStatus {
    match &pool.health_check {
        Some(h) if !h.initial_up => HealthStatus::down(DownReason::Pending),
        _ => HealthStatus::UP,
    }
}

/// After a reload: closes the open connections of every backend that `previous` had and
/// `current` no longer has (removed, its pool removed, or its address changed), when its
/// pool said `on_backend_down: close_connections`. Other connections are never cut.
pub fn close_removed(previous: &Snapshot, current: &Snapshot) {
    for (name, old) in &previous.pools {
        if old.config.on_backend_down != OnBackendDown::CloseConnections {
            continue;
        }
        let new = current.pools.get(name);
        for b in &old.backends {
            let same_name = new.and_then(|p| p.backends.iter().find(|n| n.name == b.name));
            match same_name {
                Some(n) if n.addr == b.addr => continue,
                // Same name, new address: the state lives on for the new address.
                Some(_) => b
                    .state
                    .close_connections(crate::conn::CloseReason::BackendDown),
                None => b.state.retire(),
            }
            let open = b.state.active();
            if open > 0 {
                tracing::warn!(pool = %name, backend = %b.name, open_connections = open, "backend removed by reload; closing its open connections (on_backend_down: close_connections)");
            }
        }
    }
}

/// What a pool's probers were started from; a change restarts them.
#[derive(Debug, Clone, PartialEq)]
struct PoolSpec {
    check: Option<HealthCheckConfig>,
    on_backend_down: OnBackendDown,
    backends: Vec<(String, SocketAddr)>,
}

impl PoolSpec {
    fn of(pool: &Pool) -> PoolSpec {
        PoolSpec {
            check: pool.config.health_check.clone(),
            on_backend_down: pool.config.on_backend_down,
            backends: pool
                .backends
                .iter()
                .map(|b| (b.name.to_string(), b.addr.0))
                .collect(),
        }
    }
}

struct RunningPool {
    spec: PoolSpec,
    /// The pool's arbiter, when it has a check (handed to the probers that replace these).
    arbiter: Option<Arc<PoolArbiter>>,
    /// The backend states the probers write (a rebuild carries the same ones).
    states: Vec<Arc<BackendState>>,
    cancel: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningPool {
    /// Stops the probers; the handles tell when each has ended.
    fn stop(self) -> Vec<JoinHandle<()>> {
        self.cancel.cancel();
        for t in &self.tasks {
            t.abort();
        }
        self.tasks
    }
}

/// Starts, keeps and stops the probers of a running balancer.
#[derive(Default)]
pub struct Supervisor {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    running: bool,
    pools: HashMap<String, RunningPool>,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        f.debug_struct("Supervisor")
            .field("running", &inner.running)
            .field("pools", &inner.pools.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Supervisor {
    pub fn new() -> Supervisor {
        Supervisor::default()
    }

    /// Starts probing `snapshot` (called once the server runs, inside the runtime).
    pub fn start(&self, snapshot: &Snapshot, metrics: &Metrics) {
        self.lock().running = true;
        // Nothing runs yet, so nothing is stopped.
        drop(self.sync(snapshot, metrics));
    }

    /// Brings the probers in line with `snapshot`: pools whose check settings or backends
    /// changed are restarted, removed ones stopped, unchanged ones left running. Does
    /// nothing before [`Supervisor::start`] or after [`Supervisor::stop`]. Must be called
    /// inside the tokio runtime (reload calls it through `Shared::publish`). Returns the
    /// task handles of the probers it stopped.
    pub fn sync(&self, snapshot: &Snapshot, metrics: &Metrics) -> Vec<JoinHandle<()>> {
        let mut inner = self.lock();
        let mut stopped = Vec::new();
        if !inner.running {
            return stopped;
        }
        let gone: Vec<String> = inner
            .pools
            .keys()
            .filter(|name| !snapshot.pools.contains_key(*name))
            .cloned()
            .collect();
        for name in gone {
            if let Some(running) = inner.pools.remove(&name) {
                stopped.extend(running.stop());
            }
        }
        for (name, pool) in &snapshot.pools {
            let spec = PoolSpec::of(pool);
            let states: Vec<Arc<BackendState>> =
                pool.backends.iter().map(|b| Arc::clone(&b.state)).collect();
            let mut previous = None;
            if let Some(running) = inner.pools.get(name) {
                let same_states = running
                    .states
                    .iter()
                    .zip(&states)
                    .all(|(a, b)| Arc::ptr_eq(a, b));
                if running.spec == spec && same_states {
                    continue;
                }
            }
            if let Some(running) = inner.pools.remove(name) {
                previous = running
                    .arbiter
                    .as_ref()
                    .map(|a| (Arc::clone(a), running.spec.backends.clone()));
                stopped.extend(running.stop());
            }
            if spec.check.is_none() {
                // No active check (any more): only the passive breaker and the admin state
                // decide, so nothing may stay down on an old check's word.
                for (b, m) in pool.backends.iter().zip(&pool.backend_metrics) {
                    let from = b.state.status();
                    b.state.set_status(HealthStatus::UP);
                    let to = b.state.status();
                    if from != to {
                        let counter = if to == HealthStatus::UP {
                            &m.back_up
                        } else {
                            &m.passive_down
                        };
                        counter.inc();
                        log_change(name, &b.name, from, to, "health check removed by reload");
                    }
                }
            }
            let running = spawn_pool(pool, spec, states, metrics, previous);
            inner.pools.insert(name.clone(), running);
        }
        stopped
    }

    /// Stops every prober; later syncs do nothing.
    pub fn stop(&self) {
        let mut inner = self.lock();
        inner.running = false;
        for (_, running) in inner.pools.drain() {
            running.stop();
        }
    }

    /// Number of prober tasks running (for tests and the admin view).
    pub fn probers(&self) -> usize {
        self.lock()
            .pools
            .values()
            .map(|p| p.tasks.iter().filter(|t| !t.is_finished()).count())
            .sum()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A poisoned lock means a panic mid-sync; the map itself is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An arbiter being replaced and the backends (name, address) it judged.
type Previous = (Arc<PoolArbiter>, Vec<(String, SocketAddr)>);

/// Starts the probers of `pool`. `previous`: the verdicts to carry over.
fn spawn_pool(
    pool: &Pool,
    spec: PoolSpec,
    states: Vec<Arc<BackendState>>,
    metrics: &Metrics,
    previous: Option<Previous>,
) -> RunningPool {
    let cancel = CancellationToken::new();
    let mut tasks = Vec::new();
    let mut running_arbiter = None;
    if let Some(check) = &spec.check {
        let pool_name: Arc<str> = Arc::from(pool.config.name.as_str());
        let split_brain = match &check.kind {
            CheckKind::Postgres(pg) if pg.role == PostgresRole::Primary => {
                Some(pg.on_multiple_primaries)
            }
            _ => None,
        };
        let slot_metrics: Vec<HealthMetrics> = pool
            .backends
            .iter()
            .map(|b| metrics.health(&pool.config.name, &b.name, check.kind.name()))
            .collect();
        let slots = pool
            .backends
            .iter()
            .zip(slot_metrics.iter().cloned())
            .map(|(b, m)| Slot::new(Arc::clone(&b.name), Arc::clone(&b.state), m))
            .collect();
        let arbiter = Arc::new(PoolArbiter::new(
            Arc::clone(&pool_name),
            split_brain,
            spec.on_backend_down == OnBackendDown::CloseConnections,
            metrics.split_brain(&pool.config.name),
            slots,
        ));
        if let Some((old, judged)) = &previous {
            let same: Vec<&str> = spec
                .backends
                .iter()
                .filter(|b| judged.contains(b))
                .map(|(name, _)| name.as_str())
                .collect();
            arbiter.carry_over(old, &same);
        }
        running_arbiter = Some(Arc::clone(&arbiter));
        for (index, (backend, m)) in pool.backends.iter().zip(slot_metrics).enumerate() {
            let prober = Prober {
                pool: Arc::clone(&pool_name),
                backend: Arc::clone(&backend.name),
                addr: backend.addr.0,
                index,
                check: check.clone(),
                state: Arc::clone(&backend.state),
                arbiter: Arc::clone(&arbiter),
                metrics: m,
                cancel: cancel.clone(),
            };
            tasks.push(tokio::spawn(prober.run()));
        }
    }
    RunningPool {
        spec,
        arbiter: running_arbiter,
        states,
        cancel,
        tasks,
    }
}

/// The check of one backend, by kind.
enum Probe {
    Tcp(SocketAddr, Option<Vec<u8>>),
    Postgres(Box<postgres::Probe>),
    Mongodb(mongodb::Probe),
    Udp(SocketAddr, crate::config::health::UdpCheck),
    Dns(SocketAddr, crate::config::health::DnsCheck),
}

impl Probe {
    fn new(addr: SocketAddr, check: &HealthCheckConfig) -> Probe {
        match &check.kind {
            CheckKind::Tcp => Probe::Tcp(addr, check.proxy_header()),
            CheckKind::Postgres(pg) => Probe::Postgres(Box::new(postgres::Probe::new(
                addr,
                Arc::new(pg.clone()),
                check.timeout,
                check.proxy_header(),
            ))),
            CheckKind::Mongodb(m) => {
                Probe::Mongodb(mongodb::Probe::new(addr, m.clone(), check.proxy_header()))
            }
            CheckKind::Udp(u) => Probe::Udp(addr, u.clone()),
            CheckKind::Dns(d) => Probe::Dns(addr, d.clone()),
        }
    }

    async fn check(&mut self) -> Observation {
        match self {
            Probe::Tcp(addr, header) => tcp::check(*addr, header.as_deref()).await,
            Probe::Postgres(p) => p.check().await,
            Probe::Mongodb(p) => p.check().await,
            Probe::Udp(addr, u) => udp::check_udp(*addr, u).await,
            Probe::Dns(addr, d) => udp::check_dns(*addr, d).await,
        }
    }

    /// Drops any connection kept between checks (after a timeout cut a check short).
    fn reset(&mut self) {
        match self {
            Probe::Postgres(p) => p.reset(),
            Probe::Mongodb(p) => p.reset(),
            Probe::Tcp(..) | Probe::Udp(..) | Probe::Dns(..) => {}
        }
    }
}

struct Prober {
    pool: Arc<str>,
    backend: Arc<str>,
    addr: SocketAddr,
    index: usize,
    check: HealthCheckConfig,
    state: Arc<BackendState>,
    arbiter: Arc<PoolArbiter>,
    metrics: HealthMetrics,
    cancel: CancellationToken,
}

impl Prober {
    async fn run(self) {
        let mut probe = Probe::new(self.addr, &self.check);
        // Start from what the backend is now (pending when new), so a restart after a
        // reload neither flaps a healthy backend nor trusts a failing one. A split-brain
        // verdict is the arbiter's, not this backend's own result.
        let mut start = self.state.active_status();
        if start.reason == Some(DownReason::SplitBrain) {
            start = HealthStatus::UP;
        }
        let mut machine = Machine::new(self.check.rise, self.check.fall, start);
        let mut last_timeline = None;
        let mut ticker = tokio::time::interval(self.check.interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        tracing::debug!(pool = %self.pool, backend = %self.backend, check = self.check.kind.name(), "prober started");
        loop {
            tokio::select! {
                biased;
                () = self.cancel.cancelled() => break,
                _ = ticker.tick() => {}
            }
            let started = Instant::now();
            let observed = tokio::select! {
                biased;
                () = self.cancel.cancelled() => break,
                r = tokio::time::timeout(self.check.timeout, probe.check()) => r,
            };
            let observation = match observed {
                Ok(o) => o,
                Err(_) => {
                    probe.reset();
                    Observation::down(
                        DownReason::Timeout,
                        format!(
                            "no answer within {}",
                            humantime::format_duration(self.check.timeout)
                        ),
                    )
                }
            };
            let took = started.elapsed();
            self.metrics.check_duration.observe(took.as_secs_f64());
            self.metrics.check_result(observation.status);
            self.state
                .record_check(clock::now_ms(), took.as_micros() as u64, observation.status);
            let decided = machine.observe(observation.status);
            tracing::trace!(pool = %self.pool, backend = %self.backend, result = %observation.status.describe(), decided = %decided.describe(), "check");
            if observation.timeline.is_some() {
                last_timeline = observation.timeline;
            }
            let timeline = if decided.health == Health::Up {
                last_timeline
            } else {
                None
            };
            self.arbiter
                .report(self.index, decided, timeline, observation.detail);
        }
        tracing::debug!(pool = %self.pool, backend = %self.backend, "prober stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::state::Shared;

    #[tokio::test]
    async fn a_reload_that_removes_the_check_announces_the_backends_it_brings_up() {
        let logs = crate::log::capture();
        let gone = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr")
        };
        let yaml = |check: &str| {
            format!(
                "listeners: [ {{ name: l, bind: \"127.0.0.1:0\", pool: p }} ]\n\
                 pools:\n  - name: p\n    health_check: {check}\n    \
                 backends: [ {{ name: b, address: \"{gone}\" }} ]\n"
            )
        };
        let config = |check: &str| Config::from_yaml(&yaml(check), "t.yaml").expect("valid");
        let shared = Shared::new(
            config("{ type: tcp, interval: 1h, timeout: 1s }"),
            Metrics::new(),
        );
        shared.health.start(&shared.snapshot(), &shared.metrics);
        let state = shared.backend_state("p", "b").expect("b");
        assert_eq!(state.status(), HealthStatus::down(DownReason::Pending));

        shared.publish(config("{ type: none }"));
        assert_eq!(state.status(), HealthStatus::UP);
        assert_eq!(shared.metrics.backend("p", "b").back_up.get(), 1);
        let changes = logs.events("backend state changed");
        assert_eq!(changes.len(), 1, "{changes:?}");
        assert_eq!(changes[0]["from"], "down (pending)");
        assert_eq!(changes[0]["to"], "up");
        assert_eq!(changes[0]["detail"], "health check removed by reload");

        // Published again without a check: nothing changes, nothing is announced.
        shared.publish(config("{ type: none }"));
        assert_eq!(shared.metrics.backend("p", "b").back_up.get(), 1);
        assert_eq!(logs.events("backend state changed").len(), 1);
        shared.health.stop();
    }
}
