//! The control plane of one running balancer: config reload (SIGHUP, admin API), admin
//! changes that rebuild a pool (weights), readiness, listener addresses for the status page,
//! and the hand-over to a new process on binary upgrade. Every change is serialized by one
//! async mutex and publishes a whole new snapshot; nothing here runs on the data path.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::access_log::AccessLog;
use crate::backend::AdminState;
use crate::config::{Config, ConfigError};
use crate::listener::set::{Changes, ListenerInfo, ListenerSet};
use crate::state::Shared;

/// Why a reload did not take effect.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("no config file to reload (the balancer was started without -c FILE)")]
    NoConfigFile,
    #[error("the balancer is shutting down")]
    ShuttingDown,
    #[error("{0}")]
    Invalid(#[from] ConfigError),
    #[error("{0:#}")]
    Apply(anyhow::Error),
}

/// Why an admin change was refused.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("no backend \"{backend}\" in pool \"{pool}\"")]
    NotFound { pool: String, backend: String },
    #[error("weight {0} is out of range, expected 0 to {max}", max = crate::config::MAX_WEIGHT)]
    BadWeight(u32),
}

/// The outcome of the last reload, for the status page.
#[derive(Debug, Clone, Default)]
pub struct ReloadStatus {
    pub ok: u64,
    pub failed: u64,
    pub last_error: Option<String>,
    pub last_success: Option<SystemTime>,
}

/// Shared by the server, the admin API and the signal handlers.
pub struct Control {
    pub shared: Arc<Shared>,
    config_path: Option<PathBuf>,
    pub(crate) listeners: tokio::sync::Mutex<ListenerSet>,
    addrs: ArcSwap<HashMap<String, ListenerInfo>>,
    ready: AtomicBool,
    /// Set once shutdown (or a hand-over) begins: reloads no longer bind anything.
    stopping: AtomicBool,
    started: Instant,
    reloads: Mutex<ReloadStatus>,
    pub access_log: AccessLog,
    /// Fires when a new process has taken over the listening sockets: this one drains.
    pub(crate) handed_over: CancellationToken,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("config_path", &self.config_path)
            .field("ready", &self.is_ready())
            .finish()
    }
}

impl Control {
    pub(crate) fn new(
        shared: Arc<Shared>,
        config_path: Option<PathBuf>,
        listeners: ListenerSet,
        access_log: AccessLog,
    ) -> Control {
        shared
            .metrics
            .ops
            .last_reload_success_time
            .set(unix_seconds(SystemTime::now()));
        Control {
            shared,
            config_path,
            listeners: tokio::sync::Mutex::new(listeners),
            addrs: ArcSwap::from_pointee(HashMap::new()),
            ready: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            started: Instant::now(),
            reloads: Mutex::new(ReloadStatus {
                last_success: Some(SystemTime::now()),
                ..ReloadStatus::default()
            }),
            access_log,
            handed_over: CancellationToken::new(),
        }
    }

    pub fn config_path(&self) -> Option<&PathBuf> {
        self.config_path.as_ref()
    }

    /// Whether every listener is bound and serving (and the balancer is not stopping).
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// Marks the balancer as stopping: not ready, and reloads are refused.
    pub(crate) fn begin_stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.set_ready(false);
    }

    pub(crate) fn set_ready(&self, ready: bool) {
        if ready && self.stopping.load(Ordering::SeqCst) {
            return;
        }
        self.ready.store(ready, Ordering::Relaxed);
        self.shared.metrics.ops.ready.set(i64::from(ready));
    }

    /// Marks the balancer ready once the first active check of every checked backend has
    /// run (at once when no pool has a check): `/readyz` then tells whether routing is
    /// decided, not merely whether sockets are bound. Call once the listeners are bound.
    pub(crate) async fn become_ready(&self) {
        while !self.try_ready() {
            if self.stopping.load(Ordering::SeqCst) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Marks the balancer ready if the first checks have run; returns whether it did.
    pub(crate) fn try_ready(&self) -> bool {
        let ran = first_checks_ran(&self.shared.snapshot());
        if ran {
            self.set_ready(true);
        }
        ran
    }

    pub fn uptime(&self) -> std::time::Duration {
        self.started.elapsed()
    }

    /// Running listeners: local address and socket count, by name (read without locking).
    pub fn listeners(&self) -> Arc<HashMap<String, ListenerInfo>> {
        self.addrs.load_full()
    }

    /// The address a listener is bound to now.
    pub fn local_addr(&self, listener: &str) -> Option<SocketAddr> {
        self.addrs.load().get(listener).map(|i| i.local)
    }

    pub(crate) fn refresh_addrs(&self, set: &ListenerSet) {
        self.addrs.store(Arc::new(set.info()));
    }

    pub fn reload_status(&self) -> ReloadStatus {
        self.reloads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Re-reads the config file and, when it is valid, swaps it in: new listeners bound,
    /// removed ones closed for new connections, changed pools used by new connections.
    /// Open connections are never cut. An invalid file changes nothing.
    pub async fn reload(&self) -> Result<Changes, ReloadError> {
        let result = self.try_reload().await;
        let metrics = &self.shared.metrics.ops;
        let mut status = self.reloads.lock().unwrap_or_else(|e| e.into_inner());
        match &result {
            Ok(changes) => {
                metrics.reloads_ok.inc();
                metrics.last_reload_successful.set(1);
                metrics
                    .last_reload_success_time
                    .set(unix_seconds(SystemTime::now()));
                status.ok += 1;
                status.last_error = None;
                status.last_success = Some(SystemTime::now());
                info!(
                    added = ?changes.added,
                    removed = ?changes.removed,
                    kept = ?changes.kept,
                    "config reloaded"
                );
            }
            Err(e) => {
                metrics.reloads_failed.inc();
                metrics.last_reload_successful.set(0);
                status.failed += 1;
                status.last_error = Some(e.to_string());
                warn!(error = %e, "config reload rejected; the running config stays");
            }
        }
        result
    }

    async fn try_reload(&self) -> Result<Changes, ReloadError> {
        if self.stopping.load(Ordering::SeqCst) {
            return Err(ReloadError::ShuttingDown);
        }
        let path = self.config_path.as_ref().ok_or(ReloadError::NoConfigFile)?;
        let mut set = self.listeners.lock().await;
        // Checked again under the lock: shutdown may have begun while waiting for it.
        if self.stopping.load(Ordering::SeqCst) {
            return Err(ReloadError::ShuttingDown);
        }
        let config = Config::from_file(path)?;
        for note in crate::config::notes(&config) {
            warn!("{note}");
        }
        let current = self.shared.snapshot();
        if config.admin != current.config.admin {
            warn!("the admin section changed; it takes effect on restart");
        }
        let access_log = config.access_log.clone();
        let changed_log = access_log != current.config.access_log;
        drop(current);
        let changes = set
            .apply(config, |c| self.shared.publish(c))
            .await
            .map_err(ReloadError::Apply)?;
        self.refresh_addrs(&set);
        // Reopened on every reload, so `kill -HUP` after log rotation lets the old file go.
        if changed_log || access_log.is_some() {
            self.access_log.configure(access_log).await;
        }
        Ok(changes)
    }

    /// Sets a backend's admin state. `Maint` also closes its open connections.
    pub fn set_admin_state(
        &self,
        pool: &str,
        backend: &str,
        state: AdminState,
    ) -> Result<(), AdminError> {
        let s = self
            .shared
            .backend_state(pool, backend)
            .ok_or_else(|| not_found(pool, backend))?;
        s.set_admin(state);
        if state == AdminState::Maint {
            s.close_connections(crate::conn::CloseReason::Maint);
        }
        info!(
            pool,
            backend,
            state = admin_state_name(state),
            "backend admin state set"
        );
        Ok(())
    }

    /// Sets (Some) or clears (None, back to the config's) a backend's weight and rebuilds
    /// the pool's balancer. The weight outlives reloads.
    pub async fn set_weight(
        &self,
        pool: &str,
        backend: &str,
        weight: Option<u32>,
    ) -> Result<(), AdminError> {
        if let Some(w) = weight {
            if w > crate::config::MAX_WEIGHT {
                return Err(AdminError::BadWeight(w));
            }
        }
        // Held so a concurrent reload cannot be overwritten by this republish.
        let _set = self.listeners.lock().await;
        let s = self
            .shared
            .backend_state(pool, backend)
            .ok_or_else(|| not_found(pool, backend))?;
        s.set_weight_override(weight);
        let config = (*self.shared.snapshot().config).clone();
        self.shared.publish(config);
        info!(pool, backend, weight = ?weight, "backend weight set");
        Ok(())
    }
}

/// Whether every backend of every pool with an active check has been checked once.
fn first_checks_ran(snapshot: &crate::state::Snapshot) -> bool {
    snapshot
        .pools
        .values()
        .filter(|p| p.config.health_check.is_some())
        .flat_map(|p| &p.backends)
        .all(|b| b.state.last_check().is_some())
}

fn not_found(pool: &str, backend: &str) -> AdminError {
    AdminError::NotFound {
        pool: pool.to_string(),
        backend: backend.to_string(),
    }
}

pub fn admin_state_name(state: AdminState) -> &'static str {
    match state {
        AdminState::Ready => "ready",
        AdminState::Drain => "drain",
        AdminState::Maint => "maint",
    }
}

pub fn unix_seconds(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}
