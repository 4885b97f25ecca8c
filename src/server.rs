//! A running balancer: binds every listener (and the admin server), spawns accept tasks,
//! connections and UDP flow loops, and shuts down gracefully (stop accepting, let connections finish for
//! `shutdown_grace`, then close them). Reloads and admin changes go through [`Control`].
//! `main`, the tests, the benches and the demo all drive this same type.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::access_log::AccessLog;
use crate::config::Config;
use crate::config::Protocol;
use crate::control::Control;
use crate::listener::set::{Bound, ListenerSet, UdpBound};
use crate::metrics::{ListenerSeries, Metrics};
use crate::state::Shared;
use crate::upgrade;

/// Bound listeners, not yet serving.
pub struct Server {
    shared: Arc<Shared>,
    bound: Vec<Bound>,
    udp_bound: Vec<UdpBound>,
    local_addrs: HashMap<String, SocketAddr>,
    admin: Option<std::net::TcpListener>,
    config_path: Option<PathBuf>,
    tracker: TaskTracker,
    close_all: CancellationToken,
    access_log: AccessLog,
    access_log_thread: Option<std::thread::JoinHandle<()>>,
    takeover: Option<upgrade::Takeover>,
}

impl Server {
    /// Binds every listener of `config`; fails, naming the listener, if any cannot be bound.
    pub fn bind(config: Config) -> anyhow::Result<Server> {
        Server::bind_with(config, None)
    }

    /// Like [`Server::bind`], but takes listening sockets over from a running process
    /// instead of binding them (binary upgrade; see `upgrade`).
    pub fn bind_with(
        config: Config,
        mut takeover: Option<upgrade::Takeover>,
    ) -> anyhow::Result<Server> {
        let mut bound = Vec::with_capacity(config.listeners.len());
        let mut local_addrs = HashMap::new();
        let mut udp_bound = Vec::new();
        for l in &config.listeners {
            if l.protocol == Protocol::Udp {
                let b = match takeover.as_mut().and_then(|t| t.take_udp(l)) {
                    Some(sockets) => UdpBound::from_sockets(l, sockets)?,
                    None => UdpBound::bind(l)?,
                };
                local_addrs.insert(l.name.clone(), b.local);
                udp_bound.push(b);
                continue;
            }
            let b = match takeover.as_mut().and_then(|t| t.take_listener(l)) {
                Some(sockets) => Bound::from_sockets(l, sockets)?,
                None => Bound::bind(l)?,
            };
            local_addrs.insert(l.name.clone(), b.local);
            bound.push(b);
        }
        let admin = match &config.admin {
            None => None,
            Some(a) => Some(match takeover.as_mut().and_then(|t| t.take_admin(a.bind)) {
                Some(socket) => socket,
                None => crate::admin::bind(a.bind)
                    .with_context(|| format!("admin: cannot bind {}", a.bind))?,
            }),
        };
        let metrics = Metrics::new();
        let (access_log, access_log_thread) =
            AccessLog::start(config.access_log.as_ref(), &metrics.ops)
                .context("access log: cannot start the writer thread")?;
        // After an upgrade, backends start from the old process's verdicts.
        let states = takeover
            .as_ref()
            .map(|t| t.backend_states())
            .unwrap_or_default();
        Ok(Server {
            shared: Shared::with_states(config, metrics, states),
            bound,
            udp_bound,
            local_addrs,
            admin,
            config_path: None,
            tracker: TaskTracker::new(),
            close_all: CancellationToken::new(),
            access_log,
            access_log_thread: Some(access_log_thread),
            takeover,
        })
    }

    /// The file reloads re-read (SIGHUP, `POST /api/v1/reload`).
    pub fn with_config_path(mut self, path: impl Into<PathBuf>) -> Server {
        self.config_path = Some(path.into());
        self
    }

    /// The address a listener is bound to (useful with port 0).
    pub fn local_addr(&self, listener: &str) -> Option<SocketAddr> {
        self.local_addrs.get(listener).copied()
    }

    /// The admin server's address, when the config has an `admin` section.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|a| a.local_addr().ok())
    }

    /// Live state shared with every task: snapshot, backend states, metrics.
    pub fn shared(&self) -> Arc<Shared> {
        Arc::clone(&self.shared)
    }

    /// Serves until `shutdown` completes (or a new process takes over), then drains within
    /// `shutdown_grace`.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        self.run_with(shutdown, |_| {}).await
    }

    /// [`Server::run`], handing the [`Control`] (reload, admin changes) to `on_control`
    /// once every listener accepts.
    pub async fn run_with(
        mut self,
        shutdown: impl Future<Output = ()>,
        on_control: impl FnOnce(Arc<Control>),
    ) -> anyhow::Result<()> {
        let set = ListenerSet::new(
            Arc::clone(&self.shared),
            self.tracker.clone(),
            self.close_all.clone(),
            self.access_log.clone(),
        );
        let control = Arc::new(Control::new(
            Arc::clone(&self.shared),
            self.config_path.take(),
            set,
            self.access_log.clone(),
        ));
        {
            let mut set = control.listeners.lock().await;
            let snapshot = self.shared.snapshot();
            for bound in self.bound.drain(..) {
                let Some(route) = snapshot.route(&bound.name) else {
                    continue;
                };
                set.start(bound, route.config.max_connections)?;
            }
            for bound in self.udp_bound.drain(..) {
                set.start_udp(bound);
            }
            control.refresh_addrs(&set);
        }
        self.shared
            .health
            .start(&self.shared.snapshot(), &self.shared.metrics);
        let _probers = StopProbers(Arc::clone(&self.shared));
        let admin_stop = CancellationToken::new();
        let mut admin_dup = None;
        let admin_task = match self.admin.take() {
            Some(socket) => {
                admin_dup = Some(socket.try_clone().context("admin: dup socket")?);
                Some(tokio::spawn(crate::admin::serve(
                    socket,
                    Arc::clone(&control),
                    admin_stop.clone(),
                )?))
            }
            None => None,
        };
        let handover = upgrade::serve_handover(&control, self.takeover.take(), admin_dup)?;
        // Ready now when nothing is checked; else once every backend was checked once.
        let becoming_ready = (!control.try_ready()).then(|| {
            let control = Arc::clone(&control);
            tokio::spawn(async move { control.become_ready().await })
        });
        on_control(Arc::clone(&control));

        tokio::select! {
            () = shutdown => {}
            () = control.handed_over.cancelled() => info!("a new process took over the listeners"),
        }
        control.begin_stop();
        if let Some(task) = becoming_ready {
            task.abort();
        }
        if control.handed_over.is_cancelled() {
            // The new process answers on the same admin socket from now on.
            admin_stop.cancel();
        }
        control.listeners.lock().await.stop_all().await;
        control.refresh_addrs(&*control.listeners.lock().await);
        if let Some(handover) = handover {
            handover.close(control.handed_over.is_cancelled());
        }
        let grace = self.shared.snapshot().config.global.shutdown_grace;
        self.tracker.close();
        let (open_connections, udp_flows) = open_work(&self.shared);
        info!(
            open_connections,
            udp_flows,
            grace_ms = grace.as_millis() as u64,
            "shutting down: listeners closed, waiting for open connections and UDP flows"
        );
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            let (open_connections, udp_flows) = open_work(&self.shared);
            warn!(
                open_connections,
                udp_flows, "shutdown grace period over; closing remaining connections and flows"
            );
            self.close_all.cancel();
            self.tracker.wait().await;
        }
        admin_stop.cancel();
        if let Some(task) = admin_task {
            let _ = task.await;
        }
        self.access_log.stop().await;
        if let Some(thread) = self.access_log_thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        info!("shutdown complete");
        Ok(())
    }
}

/// TCP connections open and UDP flows relayed on the listeners of the live config, for
/// the shutdown lines (the tracker also counts each UDP listener's own loop).
fn open_work(shared: &Shared) -> (i64, i64) {
    let snapshot = shared.snapshot();
    snapshot
        .routes
        .values()
        .fold((0, 0), |(tcp, udp), route| match &route.metrics {
            ListenerSeries::Tcp(m) => (tcp + m.active.get(), udp),
            ListenerSeries::Udp(m) => (tcp, udp + m.flows_active.get()),
        })
}

/// Stops the health probers when `run` ends, however it ends (returns or is dropped).
struct StopProbers(Arc<Shared>);

impl Drop for StopProbers {
    fn drop(&mut self) {
        self.0.health.stop();
    }
}

/// Binds and serves `config` until `shutdown` completes.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    Server::bind(config)?.run(shutdown).await
}
