//! A running balancer: binds every listener, spawns accept tasks, connections and UDP flow
//! loops, and shuts down gracefully (stop accepting, let connections finish for
//! `shutdown_grace`, then close them). `main`, the tests, the benches and the demo all drive this same type.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::{Config, Protocol};
use crate::conn::ListenerCtx;
use crate::listener::tcp::{self, AcceptLoop};
use crate::listener::udp::{self, UdpLoop};
use crate::metrics::Metrics;
use crate::state::Shared;

/// Bound listeners, not yet serving.
pub struct Server {
    shared: Arc<Shared>,
    sockets: Vec<(String, Vec<std::net::TcpListener>)>,
    udp_sockets: Vec<(String, Vec<std::net::UdpSocket>)>,
    local_addrs: HashMap<String, SocketAddr>,
}

impl Server {
    /// Binds every listener of `config`; fails, naming the listener, if any cannot be bound.
    pub fn bind(config: Config) -> anyhow::Result<Server> {
        let mut sockets = Vec::with_capacity(config.listeners.len());
        let mut local_addrs = HashMap::new();
        let mut udp_sockets = Vec::new();
        for l in &config.listeners {
            if l.protocol == Protocol::Udp {
                let sockets =
                    udp::bind_all(l.bind, l.reuse_port, l.accept_tasks).with_context(|| {
                        format!("listener \"{}\": cannot bind udp {}", l.name, l.bind)
                    })?;
                let addr = sockets[0]
                    .local_addr()
                    .with_context(|| format!("listener \"{}\": local address", l.name))?;
                local_addrs.insert(l.name.clone(), addr);
                udp_sockets.push((l.name.clone(), sockets));
                continue;
            }
            let bound = tcp::bind_all(l.bind, l.reuse_port, l.accept_tasks)
                .with_context(|| format!("listener \"{}\": cannot bind {}", l.name, l.bind))?;
            let addr = bound[0]
                .local_addr()
                .with_context(|| format!("listener \"{}\": local address", l.name))?;
            local_addrs.insert(l.name.clone(), addr);
            sockets.push((l.name.clone(), bound));
        }
        Ok(Server {
            shared: Shared::new(config, Metrics::new()),
            sockets,
            udp_sockets,
            local_addrs,
        })
    }

    /// The address a listener is bound to (useful with port 0).
    pub fn local_addr(&self, listener: &str) -> Option<SocketAddr> {
        self.local_addrs.get(listener).copied()
    }

    /// Live state shared with every task: snapshot, backend states, metrics.
    pub fn shared(&self) -> Arc<Shared> {
        Arc::clone(&self.shared)
    }

    /// Serves until `shutdown` completes, then drains within `shutdown_grace`.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let stop_accepting = CancellationToken::new();
        let close_all = CancellationToken::new();
        let tracker = TaskTracker::new();
        let mut accept_tasks = JoinSet::new();
        let snapshot = self.shared.snapshot();
        for (name, sockets) in self.sockets {
            let Some(route) = snapshot.route(&name) else {
                continue;
            };
            let ctx = Arc::new(ListenerCtx {
                name: Arc::from(name.as_str()),
                shared: Arc::clone(&self.shared),
                close_all: close_all.clone(),
            });
            let limit = Arc::new(Semaphore::new(route.config.max_connections));
            for socket in sockets {
                let listener = tokio::net::TcpListener::from_std(socket)
                    .with_context(|| format!("listener \"{name}\": register with the runtime"))?;
                info!(listener = %name, bind = %route.config.bind, pool = %route.pool.config.name, "listening");
                accept_tasks.spawn(
                    AcceptLoop {
                        listener,
                        ctx: Arc::clone(&ctx),
                        metrics: route.metrics.clone(),
                        limit: Arc::clone(&limit),
                        tracker: tracker.clone(),
                        stop: stop_accepting.clone(),
                    }
                    .run(),
                );
            }
        }
        for (name, sockets) in self.udp_sockets {
            let Some(route) = snapshot.route(&name) else {
                continue;
            };
            udp::log_listening(&name, route);
            let tasks = sockets.len();
            // Tracked like connections: at shutdown they stop starting flows and end once
            // their open flows have, or when the grace period is over.
            for socket in sockets {
                tracker.spawn(
                    UdpLoop {
                        name: Arc::from(name.as_str()),
                        shared: Arc::clone(&self.shared),
                        socket,
                        tasks,
                        stop: stop_accepting.clone(),
                        close_all: close_all.clone(),
                    }
                    .run(),
                );
            }
        }
        let grace = snapshot.config.global.shutdown_grace;
        drop(snapshot);

        shutdown.await;
        stop_accepting.cancel();
        while accept_tasks.join_next().await.is_some() {}
        tracker.close();
        info!(
            open_connections = tracker.len(),
            grace_ms = grace.as_millis() as u64,
            "shutting down: listeners closed, waiting for open connections"
        );
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            warn!(
                open_connections = tracker.len(),
                "shutdown grace period over; closing remaining connections"
            );
            close_all.cancel();
            tracker.wait().await;
        }
        info!("shutdown complete");
        Ok(())
    }
}

/// Binds and serves `config` until `shutdown` completes.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    Server::bind(config)?.run(shutdown).await
}
