//! The running listeners, by name, and how a reload changes them. A listener whose bind
//! address is unchanged keeps its socket (and its accept queue), even when renamed; new
//! listeners are bound before anything changes, so a bind failure leaves the running set
//! as it was; removed listeners stop accepting and close their socket, while connections
//! they accepted go on. Owns the accept tasks; connections belong to the shared tracker.
//! UDP listeners are kept when their name and address are unchanged; a removed one starts
//! no new flow and ends once its open flows have (their loops are in the shared tracker),
//! so a new one may not take its address until then: not in the same reload, nor in a later
//! one while the removed listener is still draining.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::{Arc, Weak};
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::access_log::AccessLog;
use crate::config::{Config, ListenerConfig, Protocol};
use crate::conn::ListenerCtx;
use crate::listener::tcp::{self, AcceptLoop};
use crate::listener::udp::{self, UdpLoop};
use crate::state::Shared;
use crate::upgrade::Handed;

/// Sockets of one listener, bound but not yet accepting.
#[derive(Debug)]
pub struct Bound {
    pub name: String,
    /// The address as configured (port 0 stays 0).
    pub bind: SocketAddr,
    pub local: SocketAddr,
    pub sockets: Vec<std::net::TcpListener>,
}

impl Bound {
    /// Binds the sockets `config` asks for; the error names the listener.
    pub fn bind(config: &ListenerConfig) -> anyhow::Result<Bound> {
        let sockets = tcp::bind_all(config.bind, config.reuse_port, config.accept_tasks)
            .with_context(|| {
                format!("listener \"{}\": cannot bind {}", config.name, config.bind)
            })?;
        Bound::from_sockets(config, sockets)
    }

    /// Wraps sockets bound elsewhere (taken over from a previous process).
    pub fn from_sockets(
        config: &ListenerConfig,
        sockets: Vec<std::net::TcpListener>,
    ) -> anyhow::Result<Bound> {
        let first = sockets
            .first()
            .with_context(|| format!("listener \"{}\": no socket", config.name))?;
        let local = first
            .local_addr()
            .with_context(|| format!("listener \"{}\": local address", config.name))?;
        Ok(Bound {
            name: config.name.clone(),
            bind: config.bind,
            local,
            sockets,
        })
    }
}

/// Sockets of one UDP listener, bound but not yet receiving.
#[derive(Debug)]
pub struct UdpBound {
    pub name: String,
    pub bind: SocketAddr,
    pub local: SocketAddr,
    pub sockets: Vec<std::net::UdpSocket>,
    /// Duplicates, kept for handing the sockets to a new process on upgrade.
    pub dups: Vec<std::net::UdpSocket>,
}

impl UdpBound {
    /// Binds the sockets `config` asks for; the error names the listener.
    pub fn bind(config: &ListenerConfig) -> anyhow::Result<UdpBound> {
        let sockets = udp::bind_all(config.bind, config.accept_tasks).with_context(|| {
            format!(
                "listener \"{}\": cannot bind udp {}",
                config.name, config.bind
            )
        })?;
        UdpBound::from_sockets(config, sockets)
    }

    /// Wraps sockets bound elsewhere (taken over from a previous process).
    pub fn from_sockets(
        config: &ListenerConfig,
        sockets: Vec<std::net::UdpSocket>,
    ) -> anyhow::Result<UdpBound> {
        let local = sockets
            .first()
            .map(|s| s.local_addr())
            .transpose()
            .with_context(|| format!("listener \"{}\": local address", config.name))?
            .with_context(|| format!("listener \"{}\": no socket", config.name))?;
        let dups = sockets
            .iter()
            .map(|s| s.try_clone())
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("listener \"{}\": dup socket", config.name))?;
        Ok(UdpBound {
            name: config.name.clone(),
            bind: config.bind,
            local,
            sockets,
            dups,
        })
    }
}

/// One UDP listener that is receiving.
struct UdpRunning {
    bind: SocketAddr,
    local: SocketAddr,
    /// Fires when the listener is removed or the balancer stops: no new flows.
    stop: CancellationToken,
    /// Fires when a new process has taken the sockets over: stop reading them.
    released: CancellationToken,
    /// Duplicates of the sockets, for handing them to a new process on upgrade.
    dups: Vec<std::net::UdpSocket>,
    /// The loops' `udp.idle_timeout`.
    idle_timeout: Duration,
    /// Alive while any of its loops runs (each holds the `Arc`), so while its sockets are
    /// bound.
    loops: Weak<()>,
}

/// A UDP listener a reload removed, whose loops still relay their open flows: its sockets
/// stay bound to `bind` until the last loop ends.
struct UdpDraining {
    name: String,
    bind: SocketAddr,
    local: SocketAddr,
    idle_timeout: Duration,
    loops: Weak<()>,
}

/// One listener that is accepting.
struct Running {
    bind: SocketAddr,
    local: SocketAddr,
    max_connections: usize,
    limit: Arc<Semaphore>,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<TcpListener>>,
    /// Duplicates of the sockets, for handing them to a new process on upgrade.
    dups: Vec<std::net::TcpListener>,
}

/// What a listener looks like from outside (status page, tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerInfo {
    pub local: SocketAddr,
    pub sockets: usize,
}

/// What [`ListenerSet::apply`] changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub kept: Vec<String>,
}

/// The accepting listeners of one balancer.
pub struct ListenerSet {
    shared: Arc<Shared>,
    tracker: TaskTracker,
    close_all: CancellationToken,
    access_log: AccessLog,
    running: HashMap<String, Running>,
    udp: HashMap<String, UdpRunning>,
    /// Removed UDP listeners whose loops have not ended yet.
    udp_draining: Vec<UdpDraining>,
}

impl ListenerSet {
    pub fn new(
        shared: Arc<Shared>,
        tracker: TaskTracker,
        close_all: CancellationToken,
        access_log: AccessLog,
    ) -> ListenerSet {
        ListenerSet {
            shared,
            tracker,
            close_all,
            access_log,
            running: HashMap::new(),
            udp: HashMap::new(),
            udp_draining: Vec::new(),
        }
    }

    /// Addresses and socket counts by listener name.
    pub fn info(&self) -> HashMap<String, ListenerInfo> {
        let tcp = self.running.iter().map(|(name, r)| {
            (
                name.clone(),
                ListenerInfo {
                    local: r.local,
                    sockets: r.dups.len(),
                },
            )
        });
        let udp = self.udp.iter().map(|(name, r)| {
            (
                name.clone(),
                ListenerInfo {
                    local: r.local,
                    sockets: r.dups.len(),
                },
            )
        });
        tcp.chain(udp).collect()
    }

    /// A new process has taken these UDP listeners' sockets over (by name and configured
    /// bind address): their loops stop reading them and only relay their open flows'
    /// replies. Listeners it did not take keep reading, as on a plain stop.
    pub fn release_udp(&self, taken: &[(String, SocketAddr)]) {
        for (name, bind) in taken {
            if let Some(r) = self.udp.get(name).filter(|r| r.bind == *bind) {
                r.released.cancel();
            }
        }
    }

    /// Starts receiving on a UDP listener's sockets, one flow loop per socket.
    pub fn start_udp(&mut self, bound: UdpBound) {
        let stop = CancellationToken::new();
        let released = CancellationToken::new();
        let tasks = bound.sockets.len();
        let mut idle_timeout = Duration::ZERO;
        if let Some(route) = self.shared.snapshot().route(&bound.name) {
            udp::log_listening(&bound.name, route);
            idle_timeout = route.config.udp.idle_timeout;
        }
        let loops = Arc::new(());
        for socket in bound.sockets {
            // Tracked like connections: at shutdown they stop starting flows and end once
            // their open flows have, or when the grace period is over.
            self.tracker.spawn(
                UdpLoop {
                    name: Arc::from(bound.name.as_str()),
                    shared: Arc::clone(&self.shared),
                    socket,
                    tasks,
                    stop: stop.clone(),
                    close_all: self.close_all.clone(),
                    released: released.clone(),
                    access_log: self.access_log.clone(),
                    running: Arc::clone(&loops),
                }
                .run(),
            );
        }
        self.udp.insert(
            bound.name,
            UdpRunning {
                bind: bound.bind,
                local: bound.local,
                stop,
                released,
                dups: bound.dups,
                idle_timeout,
                loops: Arc::downgrade(&loops),
            },
        );
    }

    /// The listening sockets, TCP and UDP, by listener name and configured bind address
    /// (upgrade).
    pub fn sockets(&self) -> Vec<Handed<'_>> {
        let tcp = self.running.iter().map(|(name, r)| Handed {
            name,
            bind: r.bind,
            protocol: Protocol::Tcp,
            sockets: r.dups.iter().map(|s| s.as_fd()).collect(),
        });
        let udp = self.udp.iter().map(|(name, r)| Handed {
            name,
            bind: r.bind,
            protocol: Protocol::Udp,
            sockets: r.dups.iter().map(|s| s.as_fd()).collect(),
        });
        tcp.chain(udp).collect()
    }

    /// Starts accepting on `bound` with at most `max_connections` open at once.
    /// Must run inside the runtime.
    pub fn start(&mut self, bound: Bound, max_connections: usize) -> anyhow::Result<()> {
        let mut listeners = Vec::with_capacity(bound.sockets.len());
        let mut dups = Vec::with_capacity(bound.sockets.len());
        for socket in bound.sockets {
            dups.push(
                socket
                    .try_clone()
                    .with_context(|| format!("listener \"{}\": dup socket", bound.name))?,
            );
            listeners.push(TcpListener::from_std(socket).with_context(|| {
                format!("listener \"{}\": register with the runtime", bound.name)
            })?);
        }
        let limit = Arc::new(Semaphore::new(max_connections));
        self.spawn(
            &bound.name,
            bound.bind,
            bound.local,
            listeners,
            dups,
            limit,
            max_connections,
        );
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn spawn(
        &mut self,
        name: &str,
        bind: SocketAddr,
        local: SocketAddr,
        listeners: Vec<TcpListener>,
        dups: Vec<std::net::TcpListener>,
        limit: Arc<Semaphore>,
        max_connections: usize,
    ) {
        let ctx = Arc::new(ListenerCtx {
            name: Arc::from(name),
            shared: Arc::clone(&self.shared),
            close_all: self.close_all.clone(),
            access_log: self.access_log.clone(),
        });
        let metrics = self.shared.metrics.listener(name);
        let stop = CancellationToken::new();
        let tasks = listeners
            .into_iter()
            .map(|listener| {
                tokio::spawn(
                    AcceptLoop {
                        listener,
                        ctx: Arc::clone(&ctx),
                        metrics: metrics.clone(),
                        limit: Arc::clone(&limit),
                        tracker: self.tracker.clone(),
                        stop: stop.clone(),
                    }
                    .run(),
                )
            })
            .collect();
        info!(listener = %name, bind = %bind, local = %local, "listening");
        self.running.insert(
            name.to_string(),
            Running {
                bind,
                local,
                max_connections,
                limit,
                stop,
                tasks,
                dups,
            },
        );
    }

    /// Moves the running set to `config`: binds what is new (failing without changing
    /// anything), stops renamed and removed listeners, then calls `publish` (which swaps
    /// the routing snapshot), then starts the new and renamed ones.
    pub async fn apply(
        &mut self,
        config: Config,
        publish: impl FnOnce(Config),
    ) -> anyhow::Result<Changes> {
        // 1. Match each listener to a running one: same name and address, else same address.
        let mut reuse: HashMap<String, String> = HashMap::new(); // new name -> old name
        let mut claimed: HashSet<String> = HashSet::new();
        for l in config
            .listeners
            .iter()
            .filter(|l| l.protocol == Protocol::Tcp)
        {
            if self.running.get(&l.name).is_some_and(|r| r.bind == l.bind) {
                reuse.insert(l.name.clone(), l.name.clone());
                claimed.insert(l.name.clone());
            }
        }
        for l in config
            .listeners
            .iter()
            .filter(|l| l.protocol == Protocol::Tcp)
        {
            if reuse.contains_key(&l.name) || l.bind.port() == 0 {
                continue;
            }
            let old = self
                .running
                .iter()
                .find(|(n, r)| !claimed.contains(*n) && r.bind == l.bind)
                .map(|(n, _)| n.clone());
            if let Some(old) = old {
                claimed.insert(old.clone());
                reuse.insert(l.name.clone(), old);
            }
        }
        // 2. Bind the new ones; any failure returns before anything changed.
        let mut fresh = Vec::new();
        for l in config
            .listeners
            .iter()
            .filter(|l| l.protocol == Protocol::Tcp)
        {
            if reuse.contains_key(&l.name) {
                continue;
            }
            let bound = Bound::bind(l)?;
            let mut listeners = Vec::new();
            let mut dups = Vec::new();
            for socket in bound.sockets {
                dups.push(socket.try_clone().context("dup socket")?);
                listeners.push(TcpListener::from_std(socket).with_context(|| {
                    format!("listener \"{}\": register with the runtime", l.name)
                })?);
            }
            fresh.push((l.clone(), bound.local, listeners, dups));
        }
        // UDP listeners are kept by name and address; the others are bound now, so a bind
        // failure also leaves everything as it was.
        let udp_wanted: HashMap<&str, &ListenerConfig> = config
            .listeners
            .iter()
            .filter(|l| l.protocol == Protocol::Udp)
            .map(|l| (l.name.as_str(), l))
            .collect();
        let udp_kept: HashSet<String> = udp_wanted
            .values()
            .filter(|l| self.udp.get(&l.name).is_some_and(|r| r.bind == l.bind))
            .map(|l| l.name.clone())
            .collect();
        self.udp_draining.retain(|d| d.loops.strong_count() > 0);
        for l in udp_wanted.values() {
            if !udp_kept.contains(&l.name) {
                self.check_udp_address_free(l, &udp_kept)?;
            }
        }
        let mut udp_fresh = Vec::new();
        for l in udp_wanted.values() {
            if !udp_kept.contains(&l.name) {
                udp_fresh.push(UdpBound::bind(l)?);
            }
        }
        // 3. Renamed listeners stop accepting under their old name first (the socket stays
        //    open; new connections wait in its queue), so nothing is accepted unrouted.
        let mut moved = Vec::new();
        for (new, old) in &reuse {
            if new != old {
                if let Some(r) = self.running.remove(old) {
                    let listeners = stop(r.stop, r.tasks).await;
                    moved.push((
                        new.clone(),
                        r.bind,
                        r.local,
                        listeners,
                        r.dups,
                        r.limit,
                        r.max_connections,
                    ));
                }
            }
        }
        let listeners_by_name: HashMap<String, ListenerConfig> = config
            .listeners
            .iter()
            .filter(|l| l.protocol == Protocol::Tcp)
            .map(|l| (l.name.clone(), l.clone()))
            .collect();
        let mut changes = Changes::default();
        // 4. Removed listeners stop accepting before the snapshot without them is published,
        //    so every connection is accepted under a snapshot that routes it.
        let removed: Vec<String> = self
            .running
            .keys()
            .filter(|n| !listeners_by_name.contains_key(*n))
            .cloned()
            .collect();
        for name in removed {
            if let Some(r) = self.running.remove(&name) {
                drop(stop(r.stop, r.tasks).await);
                info!(listener = %name, bind = %r.bind, "listener removed; socket closed, open connections go on");
                changes.removed.push(name);
            }
        }
        let udp_removed: Vec<String> = self
            .udp
            .keys()
            .filter(|n| !udp_kept.contains(*n))
            .cloned()
            .collect();
        for name in udp_removed {
            if let Some(r) = self.udp.remove(&name) {
                r.stop.cancel();
                info!(listener = %name, bind = %r.bind, "udp listener removed; no new flows, open flows go on");
                self.udp_draining.push(UdpDraining {
                    name: name.clone(),
                    bind: r.bind,
                    local: r.local,
                    idle_timeout: r.idle_timeout,
                    loops: r.loops,
                });
                if !udp_wanted.contains_key(name.as_str()) {
                    changes.removed.push(name);
                }
            }
        }
        changes.kept.extend(udp_kept.iter().cloned());
        drop(udp_wanted);
        publish(config);
        for bound in udp_fresh {
            changes.added.push(bound.name.clone());
            self.start_udp(bound);
        }

        for (name, bind, local, listeners, dups, limit, max) in moved {
            let want = listeners_by_name
                .get(&name)
                .map_or(max, |l| l.max_connections);
            resize(&limit, max, want);
            info!(listener = %name, bind = %bind, "listener renamed; socket kept");
            self.spawn(&name, bind, local, listeners, dups, limit, want);
            changes.kept.push(name);
        }
        for (l, local, listeners, dups) in fresh {
            let limit = Arc::new(Semaphore::new(l.max_connections));
            self.spawn(
                &l.name,
                l.bind,
                local,
                listeners,
                dups,
                limit,
                l.max_connections,
            );
            changes.added.push(l.name.clone());
        }
        for (name, r) in &mut self.running {
            if let Some(l) = listeners_by_name.get(name) {
                if l.accept_tasks != r.dups.len() {
                    warn!(
                        listener = %name,
                        running = r.dups.len(),
                        configured = l.accept_tasks,
                        "the listener keeps its sockets; reuse_port/accept_tasks changes take effect on restart"
                    );
                }
                if l.max_connections != r.max_connections {
                    resize(&r.limit, r.max_connections, l.max_connections);
                    r.max_connections = l.max_connections;
                }
                if reuse.get(name).is_some_and(|old| old == name) {
                    changes.kept.push(name.clone());
                }
            }
        }
        changes.added.sort();
        changes.removed.sort();
        changes.kept.sort();
        Ok(changes)
    }

    /// Refuses a new UDP listener on the address of one this reload removes (a rename, or a
    /// move to an address another listener vacates), or of one an earlier reload removed
    /// whose flows have not all ended. A removed listener's socket stays open until its
    /// flows have ended, and with both bound the kernel spreads clients over the two: new
    /// clients landing on the old socket would be dropped for up to its `idle_timeout`.
    fn check_udp_address_free(
        &self,
        new: &ListenerConfig,
        kept: &HashSet<String>,
    ) -> anyhow::Result<()> {
        if new.bind.port() == 0 {
            return Ok(());
        }
        let on_address =
            |bind: SocketAddr, local: SocketAddr| bind == new.bind || local == new.bind;
        let draining = self
            .udp_draining
            .iter()
            .find(|d| d.loops.strong_count() > 0 && on_address(d.bind, d.local));
        if let Some(d) = draining {
            anyhow::bail!(
                "listener \"{}\": udp {} is still served by listener \"{}\", which an earlier reload \
                 removed and which still relays its open flows; its socket closes once they have \
                 ended, at most udp.idle_timeout ({}) after each one's last datagram: add \"{}\" \
                 after that",
                new.name,
                new.bind,
                d.name,
                humantime::format_duration(d.idle_timeout),
                new.name
            );
        }
        let leaving = self
            .udp
            .iter()
            .find(|(name, r)| !kept.contains(*name) && on_address(r.bind, r.local));
        if let Some((old, _)) = leaving {
            anyhow::bail!(
                "listener \"{}\": udp {} is still served by listener \"{old}\", which this reload removes; \
                 its socket stays open until its flows end, so a udp listener cannot be renamed or take \
                 another's address in one reload: reload without \"{old}\" first, and add \"{}\" once \
                 its flows have ended (udp.idle_timeout)",
                new.name,
                new.bind,
                new.name
            );
        }
        Ok(())
    }

    /// Stops every listener (shutdown): sockets close, connections go on.
    pub async fn stop_all(&mut self) {
        for (_, r) in self.running.drain() {
            drop(stop(r.stop, r.tasks).await);
        }
        for (_, r) in self.udp.drain() {
            r.stop.cancel();
        }
    }
}

/// Stops accept tasks and takes their sockets back.
async fn stop(token: CancellationToken, tasks: Vec<JoinHandle<TcpListener>>) -> Vec<TcpListener> {
    token.cancel();
    let mut listeners = Vec::with_capacity(tasks.len());
    for task in tasks {
        if let Ok(listener) = task.await {
            listeners.push(listener);
        }
    }
    listeners
}

/// Changes a listener's `max_connections` in place: more permits now, or fewer as soon as
/// enough connections have closed.
fn resize(limit: &Arc<Semaphore>, old: usize, new: usize) {
    if new > old {
        limit.add_permits(new - old);
    } else if new < old {
        let want = old - new;
        let rest = want - limit.forget_permits(want);
        if rest > 0 {
            let limit = Arc::clone(limit);
            let rest = u32::try_from(rest).unwrap_or(u32::MAX);
            tokio::spawn(async move {
                if let Ok(permits) = limit.acquire_many_owned(rest).await {
                    permits.forget();
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn resize_adds_and_forgets_permits() {
        let limit = Arc::new(Semaphore::new(4));
        let held = Arc::clone(&limit)
            .acquire_many_owned(3)
            .await
            .expect("acquire");
        resize(&limit, 4, 6);
        assert_eq!(limit.available_permits(), 3);
        resize(&limit, 6, 2);
        // 3 free permits forgotten at once; the 4th goes once a held one is released.
        assert_eq!(limit.available_permits(), 0);
        drop(held);
        tokio::task::yield_now().await;
        for _ in 0..10 {
            if limit.available_permits() == 2 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(limit.available_permits(), 2);
    }
}
