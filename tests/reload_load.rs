//! Hot reload under load: 200 long-lived connections push checksummed data and a client
//! opens new connections in a loop, while 20 reloads happen (half through the admin API,
//! half direct), one of them an invalid config and one a change of the pool's backends.
//! Zero connection failures and zero corrupted bytes. Bounded in count and time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::http::post;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const LONG_LIVED: usize = 200;
const RELOADS: usize = 20;
const INVALID_AT: usize = 6;
const SWITCH_AT: usize = 11;
const MAX_NEW_CONNECTIONS: u64 = 20_000;

fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

fn config(n: usize, backends: &[(&str, SocketAddr)], valid: bool) -> String {
    let mut yaml = String::from("admin:\n  bind: 127.0.0.1:0\n");
    // Vary something on every reload: retries, limits, and an extra listener coming and going.
    yaml.push_str(&format!(
        "defaults:\n  retries: {}\nlisteners:\n  - name: l\n    bind: 127.0.0.1:0\n    pool: p\n    max_connections: {}\n",
        n % 3,
        5000 + n
    ));
    if n % 2 == 1 {
        yaml.push_str("  - name: extra\n    bind: 127.0.0.1:0\n    pool: p\n");
    }
    yaml.push_str("pools:\n  - name: p\n");
    if !valid {
        yaml.push_str("    balance: fastest\n");
    }
    yaml.push_str("    backends:\n");
    for (name, addr) in backends {
        yaml.push_str(&format!(
            "      - {{ name: {name}, address: \"{addr}\" }}\n"
        ));
    }
    yaml
}

fn write_file(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

/// xorshift bytes, so each side can regenerate what the other sent.
fn fill(buf: &mut [u8], state: &mut u64) {
    for b in buf.iter_mut() {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *b = *state as u8;
    }
}

#[derive(Default)]
struct Tally {
    failures: AtomicU64,
    corrupt: AtomicU64,
    bytes: AtomicU64,
    new_ok: AtomicU64,
    new_to_removed_after_switch: AtomicU64,
}

/// One long-lived connection: echo round trips until `stop`, every byte compared and
/// checksummed both ways.
async fn long_lived(addr: SocketAddr, seed: u64, stop: Arc<AtomicBool>, tally: Arc<Tally>) {
    let result: Result<(), String> = async {
        let s = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let (name, mut s) = greet(s).await;
        if name.is_empty() {
            return Err("no greeting".into());
        }
        let mut state = seed;
        let mut out = vec![0u8; 8192];
        let mut back = vec![0u8; 8192];
        let (mut sent_crc, mut got_crc) = (crc32fast::Hasher::new(), crc32fast::Hasher::new());
        let mut round = 0usize;
        while !stop.load(Ordering::Relaxed) {
            let n = 512 + (round * 977) % 7680;
            round += 1;
            fill(&mut out[..n], &mut state);
            sent_crc.update(&out[..n]);
            s.get_mut()
                .write_all(&out[..n])
                .await
                .map_err(|e| format!("write: {e}"))?;
            s.read_exact(&mut back[..n])
                .await
                .map_err(|e| format!("read: {e}"))?;
            got_crc.update(&back[..n]);
            if back[..n] != out[..n] {
                tally.corrupt.fetch_add(1, Ordering::Relaxed);
            }
            tally.bytes.fetch_add(n as u64, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        s.get_mut()
            .shutdown()
            .await
            .map_err(|e| format!("shutdown: {e}"))?;
        let mut rest = Vec::new();
        s.read_to_end(&mut rest)
            .await
            .map_err(|e| format!("read to end: {e}"))?;
        if !rest.is_empty() || sent_crc.finalize() != got_crc.finalize() {
            tally.corrupt.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
    .await;
    if let Err(e) = result {
        eprintln!("long-lived connection failed: {e}");
        tally.failures.fetch_add(1, Ordering::Relaxed);
    }
}

/// New connections in a loop: greeting, one echo, close.
async fn new_connections(
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    switched: Arc<AtomicBool>,
    removed: String,
    tally: Arc<Tally>,
) {
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) && n < MAX_NEW_CONNECTIONS {
        n += 1;
        let after_switch = switched.load(Ordering::SeqCst);
        let result: Result<String, String> = async {
            let s = TcpStream::connect(addr)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let (name, mut s) = greet(s).await;
            s.get_mut()
                .write_all(b"0123456789abcdef")
                .await
                .map_err(|e| format!("write: {e}"))?;
            let mut buf = [0u8; 16];
            s.read_exact(&mut buf)
                .await
                .map_err(|e| format!("read: {e}"))?;
            if &buf != b"0123456789abcdef" {
                return Err("echo differs".into());
            }
            Ok(name)
        }
        .await;
        match result {
            Ok(name) => {
                tally.new_ok.fetch_add(1, Ordering::Relaxed);
                if after_switch && name == removed {
                    tally
                        .new_to_removed_after_switch
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(e) => {
                eprintln!("new connection {n} failed: {e}");
                tally.failures.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_load_cut_nothing_and_corrupt_nothing() {
    raise_fd_limit();
    let started = Instant::now();
    let backends = [
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("c").await,
    ];
    let before = [("a", backends[0].addr), ("b", backends[1].addr)];
    let after = [("b", backends[1].addr), ("c", backends[2].addr)];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("switchyard.yaml");
    write_file(&path, &config(0, &before, true));
    let lb = Balancer::start_file(&path).await;
    let admin = lb.admin.unwrap();
    let addr = lb.addr("l");

    let stop = Arc::new(AtomicBool::new(false));
    let switched = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let mut tasks = Vec::new();
    for i in 0..LONG_LIVED {
        tasks.push(tokio::spawn(long_lived(
            addr,
            0x9E37_79B9_7F4A_7C15 ^ (i as u64 + 1),
            Arc::clone(&stop),
            Arc::clone(&tally),
        )));
    }
    let looper = tokio::spawn(new_connections(
        addr,
        Arc::clone(&stop),
        Arc::clone(&switched),
        "a".to_string(),
        Arc::clone(&tally),
    ));
    // Every long-lived connection is up and moving data before the first reload.
    within("long-lived connections up", async {
        while lb.counter(
            "switchyard_listener_connections_active",
            &[("listener", "l")],
        ) < LONG_LIVED as u64
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    let mut rejected = 0;
    for n in 1..=RELOADS {
        let valid = n != INVALID_AT;
        let pool = if n >= SWITCH_AT { &after } else { &before };
        write_file(&path, &config(n, pool, valid));
        let ok = if n % 2 == 0 {
            let r = post(admin, "/api/v1/reload", None, "{}").await;
            if !valid {
                assert_eq!(r.status, 400, "{}", r.body);
                assert!(
                    r.body
                        .contains("pools[0].balance: unknown value \\\"fastest\\\""),
                    "{}",
                    r.body
                );
            }
            r.status == 200
        } else {
            let r = lb.control.reload().await;
            if let Err(e) = &r {
                assert!(!valid, "reload {n} failed: {e}");
            }
            r.is_ok()
        };
        assert_eq!(ok, valid, "reload {n}");
        if !ok {
            rejected += 1;
        }
        if n == SWITCH_AT {
            switched.store(true, Ordering::SeqCst);
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert_eq!(rejected, 1);
    // Let traffic run a little past the last reload, then stop everything.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    within("new-connection loop", looper).await.unwrap();
    for t in tasks {
        within("long-lived connection", t).await.unwrap();
    }

    let failures = tally.failures.load(Ordering::Relaxed);
    let corrupt = tally.corrupt.load(Ordering::Relaxed);
    let new_ok = tally.new_ok.load(Ordering::Relaxed);
    eprintln!(
        "reload under load: {} reloads, {} MiB echoed on {LONG_LIVED} long-lived connections, {new_ok} new connections, {failures} failures, {corrupt} corrupted, {:.1}s",
        RELOADS,
        tally.bytes.load(Ordering::Relaxed) / (1024 * 1024),
        started.elapsed().as_secs_f64()
    );
    assert_eq!(failures, 0, "no connection failed");
    assert_eq!(corrupt, 0, "no byte corrupted");
    assert!(new_ok > 20, "the loop kept connecting ({new_ok})");
    assert_eq!(
        tally.new_to_removed_after_switch.load(Ordering::Relaxed),
        0,
        "new connections after the pool change never reach the removed backend"
    );
    let s = lb.control.reload_status();
    assert_eq!((s.ok, s.failed), (RELOADS as u64 - 1, 1));
    let snapshot = lb.shared.snapshot();
    let names: Vec<&str> = snapshot.pools["p"]
        .backends
        .iter()
        .map(|b| &*b.name)
        .collect();
    assert_eq!(names, ["b", "c"], "the pool now holds b and c");
}
