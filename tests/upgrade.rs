//! The binary as operators run it: SIGHUP reloads the config file, and a zero-downtime
//! binary upgrade hands the listening sockets to a new process (`--takeover`) while clients
//! keep connecting: not one connection attempt fails, and not one UDP query is lost.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::http::{get, post};
use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

fn spawn(config: &Path, log: &Path, extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .arg("run")
        .arg("-c")
        .arg(config)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("start switchyard")
}

fn signal(child: &Child, sig: Signal) {
    kill(Pid::from_raw(child.id() as i32), sig).expect("signal");
}

/// Waits (bounded) for the child to exit; returns its exit code.
async fn exited(child: &mut Child) -> Option<i32> {
    within("process exit", async {
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.code();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

async fn ready(admin: SocketAddr, log: &Path) {
    let deadline = Instant::now() + LIMIT;
    loop {
        if let Ok(mut s) = TcpStream::connect(admin).await {
            let _ = s
                .write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await;
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out).await;
            if out.starts_with(b"HTTP/1.1 200") {
                return;
            }
        }
        if Instant::now() > deadline {
            panic!(
                "switchyard not ready; its log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Greeting plus one echo through `addr`.
async fn one_connection(addr: SocketAddr) -> Result<(), String> {
    let s = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (name, mut s) = greet(s).await;
    if name != "a" {
        return Err(format!("greeting {name:?}"));
    }
    s.get_mut()
        .write_all(b"ping")
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf)
        .await
        .map_err(|e| format!("read: {e}"))?;
    if &buf != b"ping" {
        return Err("echo differs".into());
    }
    Ok(())
}

/// Waits (bounded) until `attempt` succeeds once: the backend is up and serving.
async fn served<F, Fut>(attempt: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    within("first success", async {
        while attempt().await.is_err() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

/// Clients repeating an attempt in a loop, bounded in count and time, counting outcomes.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    clients: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// `clients` tasks, each calling `attempt(client, n)` up to `max` times (40 s at most).
    fn start<F, Fut>(clients: u32, max: u32, attempt: F) -> Load
    where
        F: Fn(u32, u32) -> Fut + Clone + Send + 'static,
        Fut: std::future::Future<Output = Result<(), String>> + Send,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let clients = (0..clients)
            .map(|c| {
                let (stop, ok, failed) = (Arc::clone(&stop), Arc::clone(&ok), Arc::clone(&failed));
                let attempt = attempt.clone();
                tokio::spawn(async move {
                    let started = Instant::now();
                    let mut n = 0;
                    while !stop.load(Ordering::Relaxed)
                        && n < max
                        && started.elapsed() < Duration::from_secs(40)
                    {
                        n += 1;
                        match attempt(c, n).await {
                            Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                            Err(e) => {
                                eprintln!("attempt failed: {e}");
                                failed.fetch_add(1, Ordering::Relaxed)
                            }
                        };
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failed,
            clients,
        }
    }

    fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    async fn wait_ok(&self, at_least: u64) {
        within("client progress", async {
            while self.ok() < at_least {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
    }

    /// Stops the clients; (succeeded, failed).
    async fn finish(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for c in std::mem::take(&mut self.clients) {
            within("client", c).await.unwrap();
        }
        (self.ok(), self.failed.load(Ordering::Relaxed))
    }
}

/// The files of an upgrade test, in one temporary directory.
struct Files {
    _dir: tempfile::TempDir,
    config: PathBuf,
    socket: PathBuf,
    old_log: PathBuf,
    new_log: PathBuf,
}

impl Files {
    fn new() -> Files {
        let dir = tempfile::tempdir().unwrap();
        let path = |name: &str| dir.path().join(name);
        Files {
            config: path("switchyard.yaml"),
            socket: path("upgrade.sock"),
            old_log: path("old.log"),
            new_log: path("new.log"),
            _dir: dir,
        }
    }
}

/// With `load` running: a new binary takes over from `old`, which must exit 0 on its own;
/// then the load goes on for a while. Returns the new process and the successes counted
/// when the old one had exited.
async fn switch_under_load(load: &Load, files: &Files, old: &mut Child) -> (Child, u64) {
    load.wait_ok(200).await;
    let takeover = ["--takeover", files.socket.to_str().unwrap()];
    let new = spawn(&files.config, &files.new_log, &takeover);
    let code = exited(old).await;
    assert_eq!(
        code,
        Some(0),
        "old process log:\n{}",
        std::fs::read_to_string(&files.old_log).unwrap_or_default()
    );
    let after_switch = load.ok();
    load.wait_ok(after_switch + 300).await;
    (new, after_switch)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_upgrade_by_socket_takeover_drops_no_connection_attempt() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let files = Files::new();
    let (listen, admin) = (free_addr(), free_addr());
    // Checked every second, up after two passes: a new process that started from scratch
    // would have no backend up for a second or two.
    std::fs::write(
        &files.config,
        format!(
            "admin:\n  bind: \"{admin}\"\n  upgrade_socket: {}\nlisteners:\n  - {{ name: app, bind: \"{listen}\", pool: app, reuse_port: true, accept_tasks: 2 }}\npools:\n  - name: app\n    health_check: {{ type: tcp, interval: 1s, rise: 2 }}\n    backends: [{{ name: a, address: \"{}\" }}, {{ name: b, address: \"{}\" }}]\n",
            files.socket.display(),
            a.addr,
            b.addr
        ),
    )
    .unwrap();
    // Started as deploy/systemd/switchyard@.service starts each instance: with nobody to
    // take over from, it binds its own sockets.
    let if_running = ["--takeover-if-running", files.socket.to_str().unwrap()];
    let mut old = spawn(&files.config, &files.old_log, &if_running);
    ready(admin, &files.old_log).await;
    // b is drained by the operator: only a serves, before the upgrade and after it.
    let r = post(
        admin,
        "/api/v1/pools/app/backends/b/state",
        None,
        r#"{"state":"drain"}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    served(|| one_connection(listen)).await;
    let old_pid = get(admin, "/api/v1/status").await.json()["pid"].clone();
    assert_eq!(old_pid, old.id());

    // Four clients connect in a loop through the whole switch, bounded in count and time.
    let load = Load::start(4, 5_000, move |_, _| one_connection(listen));
    let (mut new, after_switch) = switch_under_load(&load, &files, &mut old).await;
    let (total_ok, total_failed) = load.finish().await;

    let status = get(admin, "/api/v1/status").await.json();
    assert_eq!(status["pid"], new.id(), "the admin socket moved too");
    let backends = &status["pools"][0]["backends"];
    assert_eq!(backends[1]["name"], "b");
    assert_eq!(
        backends[1]["state"], "drain",
        "the operator's drain carried over"
    );
    let old_text = std::fs::read_to_string(&files.old_log).unwrap();
    assert!(
        old_text.contains("a new process took over the listeners"),
        "{old_text}"
    );
    eprintln!(
        "binary upgrade: {total_ok} connections ({after_switch} before the old process exited), {total_failed} failed"
    );
    assert_eq!(total_failed, 0, "no connection attempt failed");
    // The new process can be upgraded again: it serves the upgrade socket itself, which
    // only its user may use.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&files.socket)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    signal(&new, Signal::SIGTERM);
    assert_eq!(exited(&mut new).await, Some(0));
    assert!(
        !files.socket.exists(),
        "a normal stop removes the upgrade socket"
    );
}

#[tokio::test]
async fn sighup_reloads_the_config_file_and_a_bad_file_changes_nothing() {
    let backend = Backend::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    let (first, second, admin) = (free_addr(), free_addr(), free_addr());
    let config = dir.path().join("switchyard.yaml");
    let listener = |name: &str, addr: SocketAddr| {
        format!("  - {{ name: {name}, bind: \"{addr}\", pool: app }}\n")
    };
    let pools = format!(
        "pools:\n  - name: app\n    backends: [{{ address: \"{}\" }}]\n",
        backend.addr
    );
    let head = format!("admin:\n  bind: \"{admin}\"\nlisteners:\n");
    std::fs::write(&config, format!("{head}{}{pools}", listener("one", first))).unwrap();
    let log = dir.path().join("switchyard.log");
    let mut child = spawn(&config, &log, &[]);
    ready(admin, &log).await;
    one_connection(first).await.unwrap();
    assert!(TcpStream::connect(second).await.is_err());

    std::fs::write(
        &config,
        format!(
            "{head}{}{}{pools}",
            listener("one", first),
            listener("two", second)
        ),
    )
    .unwrap();
    signal(&child, Signal::SIGHUP);
    within("second listener", async {
        while one_connection(second).await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    one_connection(first).await.unwrap();

    std::fs::write(&config, "listeners: [").unwrap();
    signal(&child, Signal::SIGHUP);
    within("rejected reload", async {
        loop {
            let s = get(admin, "/api/v1/status").await.json();
            if s["config"]["reloads_failed"] == 1 {
                assert_eq!(s["config"]["reloads_ok"], 1);
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    one_connection(first).await.unwrap();
    one_connection(second).await.unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("config reload rejected"), "{text}");

    signal(&child, Signal::SIGTERM);
    assert_eq!(exited(&mut child).await, Some(0));
}

/// A UDP echo server on a free loopback port.
async fn udp_echo() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let _ = socket.send_to(&buf[..n], from).await;
        }
    });
    (addr, task)
}

/// Sends one query from `socket` and waits for its echo, without resending: a datagram
/// lost anywhere on the way is a failure.
async fn one_query(socket: &UdpSocket, to: SocketAddr, query: &[u8]) -> Result<(), String> {
    socket
        .send_to(query, to)
        .await
        .map_err(|e| format!("send: {e}"))?;
    let mut buf = [0u8; 64];
    match tokio::time::timeout(Duration::from_secs(5), socket.recv(&mut buf)).await {
        Err(_) => Err("no answer within 5s".into()),
        Ok(Err(e)) => Err(format!("recv: {e}")),
        Ok(Ok(n)) if &buf[..n] == query => Ok(()),
        Ok(Ok(n)) => Err(format!("answer differs: {:?}", &buf[..n])),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_upgrade_hands_udp_sockets_over_and_loses_no_datagram() {
    let (backend, _backend_task) = udp_echo().await;
    let files = Files::new();
    let admin = free_addr();
    let listen = free_addr();
    std::fs::write(
        &files.config,
        format!(
            "admin:\n  bind: \"{admin}\"\n  upgrade_socket: {}\nlisteners:\n  - name: dns\n    bind: \"{listen}\"\n    protocol: udp\n    pool: dns\n    reuse_port: true\n    accept_tasks: 2\n    udp: {{ idle_timeout: 1s }}\npools:\n  - name: dns\n    health_check: {{ type: udp, interval: 1s, rise: 2, udp: {{ send_hex: \"70696e67\", expect_hex_prefix: \"70696e67\" }} }}\n    backends: [{{ address: \"{backend}\" }}]\n",
            files.socket.display(),
        ),
    )
    .unwrap();
    let mut old = spawn(&files.config, &files.old_log, &[]);
    ready(admin, &files.old_log).await;
    served(|| async {
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        one_query(&client, listen, b"first").await
    })
    .await;

    // Clients query through the whole switch, bounded in count and time. Three take a new
    // port (a new flow) for every query; one keeps its port, so its flow starts in the old
    // process and its datagrams then go to the new one. A query is sent once: one lost
    // datagram is a failure.
    let kept = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let load = Load::start(4, 20_000, move |c, n| {
        let kept = Arc::clone(&kept);
        async move {
            let client = if c == 0 {
                kept
            } else {
                // Each new port is a flow for a second: paced, so they stay far below
                // max_flows.
                tokio::time::sleep(Duration::from_millis(2)).await;
                Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap())
            };
            let query = format!("client {c} query {n}");
            one_query(&client, listen, query.as_bytes())
                .await
                .map_err(|e| format!("{query}: {e}"))
        }
    });
    let (mut new, after_switch) = switch_under_load(&load, &files, &mut old).await;
    let (total_ok, total_failed) = load.finish().await;

    let old_text = std::fs::read_to_string(&files.old_log).unwrap();
    assert!(
        old_text.contains("udp sockets taken over") && old_text.contains("\"dns\""),
        "{old_text}"
    );
    eprintln!(
        "udp upgrade: {total_ok} queries answered ({after_switch} before the old process exited), {total_failed} lost"
    );
    assert_eq!(total_failed, 0, "no query was lost");
    let status = get(admin, "/api/v1/status").await.json();
    assert_eq!(status["pid"], new.id());
    signal(&new, Signal::SIGTERM);
    assert_eq!(exited(&mut new).await, Some(0));
}
