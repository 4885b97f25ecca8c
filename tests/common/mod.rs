//! Shared test fixtures: real backends on 127.0.0.1:0 and a balancer started in-process.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod http;
pub mod ports;

#[allow(unused_imports)]
pub use ports::{free_addr, free_port};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use switchyard::config::Config;
use switchyard::control::Control;
use switchyard::state::Shared;
use switchyard::Server;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Upper bound for any single wait in a test, so a bug fails the test instead of hanging it.
pub const LIMIT: Duration = Duration::from_secs(30);

pub async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(LIMIT, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: no result within {LIMIT:?}"),
    }
}

/// For a test whose external tool is missing: panics when `SWITCHYARD_REQUIRE_TOOLS=1` (CI
/// sets it, having installed the tools), else says loudly that the test is skipped. The
/// caller returns after it.
pub fn missing_tool(test: &str, what: &str) {
    assert!(
        std::env::var("SWITCHYARD_REQUIRE_TOOLS").as_deref() != Ok("1"),
        "{test}: {what}, and SWITCHYARD_REQUIRE_TOOLS=1 requires it"
    );
    eprintln!("\n!!! SKIPPED {test}: {what} !!!\n");
}

/// A backend that greets each connection with `name\n`, then echoes everything back and
/// half-closes when the client does.
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Backend {
    pub async fn start(name: &str) -> Backend {
        Self::start_on("127.0.0.1:0".parse().expect("addr"), name).await
    }

    pub async fn start_on(addr: SocketAddr, name: &str) -> Backend {
        let listener = TcpListener::bind(addr).await.expect("bind backend");
        let addr = listener.local_addr().expect("addr");
        let greeting = format!("{name}\n");
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                let greeting = greeting.clone();
                tokio::spawn(async move {
                    if s.write_all(greeting.as_bytes()).await.is_err() {
                        return;
                    }
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        Backend {
            name: name.to_string(),
            addr,
            task,
        }
    }

    /// Stops accepting (the port then refuses connections).
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An address on which nothing listens: connecting to it is refused.
pub fn refused_addr() -> SocketAddr {
    ports::free_addr()
}

/// A balancer running in this process.
pub struct Balancer {
    pub shared: Arc<Shared>,
    /// Reload and admin changes (set once the balancer serves).
    pub control: Arc<Control>,
    /// The admin server's address, when the config has an `admin` section.
    pub admin: Option<SocketAddr>,
    addrs: Vec<(String, SocketAddr)>,
    stop: Option<oneshot::Sender<()>>,
    pub task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Balancer {
    pub async fn start(yaml: &str) -> Balancer {
        let config = Config::from_yaml(yaml, "test.yaml").unwrap_or_else(|e| panic!("{e}"));
        Self::start_server(Server::bind(config).expect("bind")).await
    }

    /// Starts from a config file, which reloads re-read.
    pub async fn start_file(path: &std::path::Path) -> Balancer {
        let config = Config::from_file(path).unwrap_or_else(|e| panic!("{e}"));
        Self::start_server(Server::bind(config).expect("bind").with_config_path(path)).await
    }

    async fn start_server(server: Server) -> Balancer {
        let snapshot = server.shared().snapshot();
        let names: Vec<String> = snapshot
            .config
            .listeners
            .iter()
            .map(|l| l.name.clone())
            .collect();
        drop(snapshot);
        let addrs = names
            .iter()
            .map(|n| (n.clone(), server.local_addr(n).expect("listener addr")))
            .collect();
        let shared = server.shared();
        let admin = server.admin_addr();
        let (tx, rx) = oneshot::channel::<()>();
        let (control_tx, control_rx) = oneshot::channel();
        let task = tokio::spawn(server.run_with(
            async move {
                let _ = rx.await;
            },
            move |control| {
                let _ = control_tx.send(control);
            },
        ));
        let control = within("balancer start", control_rx)
            .await
            .expect("balancer started");
        Balancer {
            shared,
            control,
            admin,
            addrs,
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub fn addr(&self, listener: &str) -> SocketAddr {
        self.control
            .local_addr(listener)
            .or_else(|| {
                self.addrs
                    .iter()
                    .find(|(n, _)| n == listener)
                    .map(|(_, a)| *a)
            })
            .expect("listener")
    }

    /// Starts the graceful shutdown; `finished` waits for it.
    pub fn begin_shutdown(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }

    pub async fn finished(&mut self) {
        if let Some(task) = self.task.take() {
            within("balancer shutdown", task)
                .await
                .expect("join")
                .expect("run");
        }
    }

    /// Sum of a counter family's samples whose labels include all of `labels`.
    pub fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        let mut total = 0.0;
        // The registry's families plus those read from live state at scrape time.
        let mut families = self.shared.metrics.registry.gather();
        families.extend(switchyard::admin::exporter::backend_families(
            &self.shared.snapshot(),
        ));
        for family in families {
            if family.get_name() != name {
                continue;
            }
            let is_counter = family.get_field_type() == prometheus::proto::MetricType::COUNTER;
            for m in family.get_metric() {
                let matches = labels.iter().all(|(k, v)| {
                    m.get_label()
                        .iter()
                        .any(|l| l.get_name() == *k && l.get_value() == *v)
                });
                if matches {
                    total += if is_counter {
                        m.get_counter().get_value()
                    } else {
                        m.get_gauge().get_value()
                    };
                }
            }
        }
        total as u64
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Connects from a chosen local IP (127.0.0.0/8 is all loopback on Linux).
pub async fn connect_from(src_ip: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(format!("{src_ip}:0").parse().expect("src"))
        .expect("bind source");
    within("connect", socket.connect(to))
        .await
        .expect("connect")
}

/// Connects and returns the greeting line (the backend's name) with the stream.
pub async fn greet(stream: TcpStream) -> (String, BufReader<TcpStream>) {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    within("greeting", reader.read_line(&mut line))
        .await
        .expect("read greeting");
    (line.trim_end().to_string(), reader)
}

pub async fn backend_of(addr: SocketAddr) -> String {
    let stream = within("connect", TcpStream::connect(addr))
        .await
        .expect("connect");
    greet(stream).await.0
}

/// Reads until EOF; returns the bytes.
pub async fn read_to_end<R: AsyncReadExt + Unpin>(r: &mut R) -> Vec<u8> {
    let mut out = Vec::new();
    within("read to end", r.read_to_end(&mut out))
        .await
        .expect("read");
    out
}

/// A yaml config with one listener on 127.0.0.1:0 and one pool of the given backends.
pub fn one_pool(pool_extra: &str, listener_extra: &str, backends: &[(SocketAddr, u32)]) -> String {
    let mut yaml = format!(
        "listeners:\n  - name: l\n    bind: 127.0.0.1:0\n    pool: p\n{listener_extra}pools:\n  - name: p\n{pool_extra}    backends:\n"
    );
    for (addr, weight) in backends {
        yaml.push_str(&format!(
            "      - address: \"{addr}\"\n        weight: {weight}\n"
        ));
    }
    yaml
}

/// Polls a condition every 10 ms, for at most [`LIMIT`].
pub async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    within(what, async {
        while !f() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

/// Waits (up to [`LIMIT`]) until a metric (see [`Balancer::counter`]) reaches `want`.
/// Counters the data path adds up per batch are published a moment after the datagrams
/// went out, so tests wait for them instead of reading them once.
pub async fn wait_counter(lb: &Balancer, name: &str, labels: &[(&str, &str)], want: u64) {
    wait_for(&format!("{name} {labels:?} to reach {want}"), || {
        lb.counter(name, labels) >= want
    })
    .await
}

/// Waits (up to [`LIMIT`]) until `pool`/`backend` has health `want`; panics with the last
/// state seen.
pub async fn wait_status(
    lb: &Balancer,
    pool: &str,
    backend: &str,
    want: switchyard::backend::HealthStatus,
) {
    let state = lb
        .shared
        .backend_state(pool, backend)
        .unwrap_or_else(|| panic!("no backend {pool}/{backend}"));
    let deadline = std::time::Instant::now() + LIMIT;
    while state.status() != want {
        assert!(
            std::time::Instant::now() < deadline,
            "{pool}/{backend}: still {} after {LIMIT:?}, wanted {}",
            state.status().describe(),
            want.describe()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
