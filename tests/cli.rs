//! The `switchyard` binary as a user runs it: `check`, `forward`, `run`, SIGTERM, accept
//! errors under a low open-file limit; and the demo example.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

fn switchyard() -> Command {
    Command::new(env!("CARGO_BIN_EXE_switchyard"))
}

fn write_config(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new()
        .suffix(".yaml")
        .tempfile()
        .expect("temp file");
    f.write_all(text.as_bytes()).expect("write config");
    f
}

/// Runs `switchyard check -c path`.
fn check_file(path: &std::path::Path) -> std::process::Output {
    switchyard()
        .arg("check")
        .arg("-c")
        .arg(path)
        .output()
        .expect("run")
}

#[test]
fn check_accepts_the_example_config_and_prints_a_summary() {
    let out = switchyard()
        .args([
            "check",
            "-c",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.yaml"),
        ])
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("configuration is valid (5 listeners, 4 pools, 9 backends)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("-> pool dns (udp, idle_timeout 30s, responses 1, max_flows 100000, reuse_upstream_sockets true)"),
        "{stdout}"
    );
    assert!(stdout.contains("127.0.0.1:8002 weight 2"), "{stdout}");
    assert!(stdout.contains("maglev"), "{stdout}");
    assert!(
        stdout.contains("sni *.example.com alpn h2,http/1.1 -> pool web"),
        "{stdout}"
    );
}

/// A valid config that each rejected case below breaks in one place.
const VALID: &str = "\
listeners:
  - name: app
    bind: 127.0.0.1:7000
    pool: app
pools:
  - name: app
    balance: round_robin
    fail_duration: 10s
    backends:
      - address: 127.0.0.1:8001
        weight: 1
      - address: 127.0.0.1:8002
        weight: 2
";

#[test]
fn check_rejects_each_bad_config_with_file_line_column_and_key() {
    let second_listener = |name: &str, bind: &str| {
        format!("  - name: {name}\n    bind: {bind}\n    pool: app\npools:")
    };
    let cases: [(&str, String, &str); 9] = [
        (
            "duplicate pool name",
            format!("{VALID}  - name: app\n    backends: [{{address: 127.0.0.1:1}}]\n"),
            "14:11: pools[1].name: duplicate pool name \"app\"",
        ),
        (
            "duplicate listener name",
            VALID.replace("pools:", &second_listener("app", "127.0.0.1:7001")),
            "5:11: listeners[1].name: duplicate listener name \"app\"",
        ),
        (
            "listener naming a missing pool",
            VALID.replace("    pool: app", "    pool: nope"),
            "4:11: listeners[0].pool: no pool named \"nope\", expected one of: app",
        ),
        (
            "pool with no backends",
            format!("{}    backends: []\n", &VALID[..VALID.find("    backends:").expect("backends")]),
            "9:15: pools[0].backends: no backends, expected at least one",
        ),
        (
            "weight 0 on every backend",
            VALID.replace("weight: 1", "weight: 0").replace("weight: 2", "weight: 0"),
            "10:7: pools[0].backends: every backend has weight 0, so nothing can be chosen; expected at least one weight above 0",
        ),
        (
            "unparsable address",
            VALID.replace("127.0.0.1:8001", "127.0.0.1:80x1"),
            "10:18: pools[0].backends[0].address: invalid address \"127.0.0.1:80x1\", expected IP:port such as 127.0.0.1:5432 or [::1]:5432",
        ),
        (
            "unparsable duration",
            VALID.replace("fail_duration: 10s", "fail_duration: 10 parsecs"),
            "8:20: pools[0].fail_duration: invalid duration \"10 parsecs\", expected a number with a unit such as 250ms, 2s or 1h",
        ),
        (
            "two listeners on one address",
            VALID.replace("pools:", &second_listener("other", "0.0.0.0:7000")),
            "6:11: listeners[1].bind: 0.0.0.0:7000 is already used by listener \"app\" (127.0.0.1:7000)",
        ),
        (
            "unknown balance value",
            VALID.replace("balance: round_robin", "balance: leastconn"),
            "7:14: pools[0].balance: unknown value \"leastconn\", expected one of round_robin, least_conn, maglev, random_two",
        ),
    ];
    let valid = write_config(VALID);
    let out = check_file(valid.path());
    assert!(out.status.success(), "the base config is valid: {out:?}");
    for (case, text, expected) in cases {
        let f = write_config(&text);
        let out = check_file(f.path());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{case}: {stderr}");
        assert_eq!(
            stderr.trim_end(),
            format!("switchyard: {}:{expected}", f.path().display()),
            "{case}"
        );
        assert!(out.stdout.is_empty(), "{case}: no summary for a bad config");
    }
}

#[test]
fn check_notes_checks_without_the_header_their_listener_sends() {
    let f = write_config(
        "listeners:\n  - {name: a, bind: 127.0.0.1:7000, pool: p, proxy_protocol: v1}\npools:\n  - name: p\n    health_check: {type: tcp}\n    backends: [{address: 127.0.0.1:1}]\n  - name: q\n    health_check: {type: tcp, proxy_protocol: v2}\n    backends: [{address: 127.0.0.1:2}]\n",
    );
    let out = check_file(f.path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("note: pools[0].health_check: listener \"a\" sends PROXY v1 headers to pool \"p\", and its tcp check sends none; set proxy_protocol: v1"),
        "{stdout}"
    );
    assert!(
        stdout.contains("health: tcp every 2s (timeout 1s, rise 2, fall 2, PROXY v2 LOCAL header)"),
        "{stdout}"
    );
    assert!(!stdout.contains("pools[1].health_check"), "{stdout}");
}

#[test]
fn check_notes_a_hash_key_that_only_maglev_uses() {
    let f = write_config(
        "listeners:\n  - {name: a, bind: 127.0.0.1:7000, pool: p}\npools:\n  - name: p\n    balance: round_robin\n    hash_key: client_ip\n    backends: [{address: 127.0.0.1:1}]\n",
    );
    let out = check_file(f.path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("note: pools[0].hash_key: hash_key: client_ip has no effect with balance: round_robin and is ignored"),
        "{stdout}"
    );
}

#[test]
fn check_reports_a_missing_file() {
    let out = switchyard()
        .args(["check", "-c", "/nonexistent.yaml"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent.yaml: cannot read"));
}

/// Kills a child we started, by its PID, when the test fails before it was stopped; forget
/// the guard once the child has been waited for (its PID may then be reused).
struct KillOnPanic(u32);

impl Drop for KillOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let pid = nix::unistd::Pid::from_raw(self.0 as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// Sends SIGTERM to a child we started, by its PID.
fn terminate(child: &std::process::Child) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("kill");
}

/// Waits for a child to exit; returns its status and what it wrote to (piped) stderr.
fn wait_with_log(mut child: std::process::Child) -> (std::process::ExitStatus, String) {
    let status = child.wait().expect("wait");
    let mut log = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut log);
    }
    (status, log)
}

async fn wait_listening(addr: std::net::SocketAddr) {
    within("listener up", async {
        while TcpStream::connect(addr).await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

#[tokio::test]
async fn forward_mode_balances_over_the_given_backends_and_exits_0_on_sigterm() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let listen = free_addr();
    let child = switchyard()
        .args(["forward", "--listen", &listen.to_string(), "--to"])
        .arg(format!("{},{}", a.addr, b.addr))
        .args(["--log-format", "json", "--log-level", "info"])
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let guard = KillOnPanic(child.id());
    wait_listening(listen).await;
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(backend_of(listen).await);
    }
    // The readiness probe above also took a turn, racing with these on two workers, so
    // only the spread is certain: round robin over two backends serves both in four.
    assert!(
        seen.contains(&"a".to_string()) && seen.contains(&"b".to_string()),
        "{seen:?}"
    );
    terminate(&child);
    let status = within(
        "exit",
        tokio::task::spawn_blocking(move || wait_with_log(child)),
    )
    .await
    .expect("join");
    std::mem::forget(guard);
    assert!(status.0.success(), "exit status {:?}", status.0);
    // One JSON line per connection at close, with the fields an operator greps for.
    let closes: Vec<&str> = status
        .1
        .lines()
        .filter(|l| l.contains("connection closed"))
        .collect();
    assert!(closes.len() >= 4, "{}", status.1);
    let backends = [a.addr.to_string(), b.addr.to_string()];
    let mut greeted = 0;
    for line in closes {
        let close: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
        let text = |key: &str| {
            close[key]
                .as_str()
                .unwrap_or_else(|| panic!("no {key}: {line}"))
        };
        let number = |key: &str| {
            close[key]
                .as_u64()
                .unwrap_or_else(|| panic!("no {key}: {line}"))
        };
        assert_eq!(text("listener"), "forward", "{line}");
        assert!(text("client").starts_with("127.0.0.1:"), "{line}");
        assert!(backends.iter().any(|b| b == text("backend")), "{line}");
        assert!(!text("reason").is_empty(), "{line}");
        number("duration_ms");
        // Each client read its backend's greeting ("a\n" or "b\n") and sent nothing.
        if (number("bytes_from_client"), number("bytes_to_client")) == (0, 2) {
            greeted += 1;
        }
    }
    assert!(greeted >= 4, "{}", status.1);
}

#[tokio::test]
async fn run_subcommand_serves_a_config_file() {
    let a = Backend::start("a").await;
    let listen = free_addr();
    let f = write_config(&format!(
        "listeners:\n  - name: app\n    bind: {listen}\n    pool: p\npools:\n  - name: p\n    hash_key: client_ip\n    backends:\n      - address: {}\n",
        a.addr
    ));
    for args in [vec!["run", "-c"], vec!["-c"]] {
        let child = switchyard()
            .args(&args)
            .arg(f.path())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let guard = KillOnPanic(child.id());
        wait_listening(listen).await;
        let (name, mut s) = greet(TcpStream::connect(listen).await.expect("connect")).await;
        assert_eq!(name, "a");
        s.shutdown().await.expect("close");
        terminate(&child);
        let (status, log) = tokio::task::spawn_blocking(move || wait_with_log(child))
            .await
            .expect("join");
        std::mem::forget(guard);
        assert!(status.success(), "{log}");
        // The pool's hash_key is ignored by round robin, and startup says so.
        assert!(
            log.contains("WARN") && log.contains("pools[0].hash_key: hash_key: client_ip has no effect with balance: round_robin"),
            "{log}"
        );
    }
}

/// Accept errors (EMFILE: every descriptor the open-file limit allows is taken) neither spin
/// the CPU nor flood the log, and once descriptors are free again the connections that
/// waited in the backlog are served.
#[tokio::test]
async fn accept_errors_back_off_without_spinning_and_serving_resumes() {
    const HELD: usize = 6;
    const WAITING: usize = 4;
    if Command::new("prlimit").arg("--version").output().is_err() {
        missing_tool(
            "accept_errors_back_off_without_spinning_and_serving_resumes",
            "prlimit not found (apt-get install util-linux; .ci/run installs it)",
        );
        return;
    }
    let a = Backend::start("a").await;
    let f = write_config(&format!(
        "listeners:\n  - name: app\n    bind: 127.0.0.1:0\n    pool: p\npools:\n  - name: p\n    max_fails: 0\n    backends:\n      - address: {}\n",
        a.addr
    ));
    let mut child = switchyard()
        .args(["run", "--log-format", "json", "--log-level", "info", "-c"])
        .arg(f.path())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let guard = KillOnPanic(child.id());
    let pid = child.id();
    let log = LogLines::collect(child.stderr.take().expect("stderr"));
    let mut listen = None;
    wait_for("the listening line", || {
        listen = log.listening();
        listen.is_some()
    })
    .await;
    let listen = listen.expect("listening");

    let mut held = Vec::new();
    for _ in 0..HELD {
        held.push(greet(TcpStream::connect(listen).await.expect("connect")).await);
    }
    // Once the descriptor table has held still for a while, a limit at its lowest free
    // number leaves not one descriptor to be made (inherited ones above it stay open).
    let lowest_free = within("a steady descriptor table", async {
        let mut steady = 0;
        let mut before = open_fds(pid);
        while steady < 5 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = open_fds(pid);
            steady = if now == before { steady + 1 } else { 0 };
            before = now;
        }
        (0..).find(|n| !before.contains(n)).unwrap_or(0)
    })
    .await;
    let limited = Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={lowest_free}:{lowest_free}"))
        .status()
        .expect("run prlimit");
    assert!(limited.success(), "prlimit: {limited:?}");

    // These wait in the listen backlog while accept fails.
    let mut waiting = Vec::new();
    for _ in 0..WAITING {
        waiting.push(TcpStream::connect(listen).await.expect("connect"));
    }
    const ACCEPT_FAILED: &str = "accept failed; backing off";
    let logged = tokio::time::timeout(LIMIT, async {
        while log.count(ACCEPT_FAILED) == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        logged.is_ok(),
        "no accept error within {LIMIT:?}; limit {lowest_free}, open {:?}; log:\n{}",
        open_fds(pid),
        log.all()
    );
    let (cpu_before, logged_before) = (cpu_time(pid), log.count(ACCEPT_FAILED));
    let started = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (cpu, logged) = (
        cpu_time(pid) - cpu_before,
        log.count(ACCEPT_FAILED) - logged_before,
    );
    let elapsed = started.elapsed();
    assert!(
        cpu < elapsed / 2,
        "{cpu:?} of CPU in {elapsed:?} while accept kept failing"
    );
    let at_most = elapsed.as_secs() as usize + 2;
    assert!(
        logged <= at_most,
        "{logged} accept errors logged in {elapsed:?}:\n{}",
        log.all()
    );

    drop(held);
    for stream in waiting {
        assert_eq!(greet(stream).await.0, "a", "{}", log.all());
    }
    assert_eq!(backend_of(listen).await, "a");
    terminate(&child);
    let status = within(
        "exit",
        tokio::task::spawn_blocking(move || child.wait().expect("wait")),
    )
    .await
    .expect("join");
    std::mem::forget(guard);
    assert!(status.success(), "exit status {status:?}");
}

/// The numbers of a process's open descriptors.
fn open_fds(pid: u32) -> std::collections::BTreeSet<u64> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("list open fds")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// CPU time (user and system) a process has used so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read stat");
    // After the command name (in parentheses) comes field 3; utime and stime are 14 and 15.
    let after_name = &stat[stat.rfind(')').expect("command name") + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    let per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100, |n| n as u64);
    Duration::from_millis(ticks * 1000 / per_second)
}

/// A child's stderr lines, collected by a thread as they are written.
struct LogLines(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl LogLines {
    fn collect(stderr: std::process::ChildStderr) -> LogLines {
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = std::sync::Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)) {
                let Ok(line) = line else { return };
                sink.lock().expect("log lines").push(line);
            }
        });
        LogLines(lines)
    }

    fn count(&self, needle: &str) -> usize {
        let lines = self.0.lock().expect("log lines");
        lines.iter().filter(|l| l.contains(needle)).count()
    }

    /// The address of the first listener the (JSON) log says is listening.
    fn listening(&self) -> Option<std::net::SocketAddr> {
        let lines = self.0.lock().expect("log lines");
        lines.iter().find_map(|line| {
            let entry: serde_json::Value = serde_json::from_str(line).ok()?;
            if entry["message"] != "listening" {
                return None;
            }
            entry["local"].as_str()?.parse().ok()
        })
    }

    fn all(&self) -> String {
        self.0.lock().expect("log lines").join("\n")
    }
}

/// The demo, README's first command, in its scripted mode. `cargo test` builds it with the
/// other examples, into `examples/` beside this test binary's `deps/`.
#[test]
fn demo_reaches_every_backend_then_fails_over() {
    let exe = std::env::current_exe().expect("test binary");
    let demo = exe
        .parent()
        .and_then(std::path::Path::parent)
        .expect("target dir")
        .join("examples")
        .join(format!("demo{}", std::env::consts::EXE_SUFFIX));
    let stale = newer_sources(&demo);
    // `cargo test --test cli` alone does not rebuild examples: refuse to judge an old build.
    assert!(
        stale.is_empty(),
        "{} is older than {stale:?}; `cargo test` rebuilds it, as does `cargo build --example demo`",
        demo.display()
    );
    let child = Command::new(&demo)
        .arg("--once")
        .env("RUST_BACKTRACE", "0")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the demo");
    let guard = KillOnPanic(child.id());
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(child.wait_with_output());
    });
    let out = done_rx
        .recv_timeout(LIMIT)
        .unwrap_or_else(|_| panic!("the demo did not finish within {LIMIT:?}"))
        .expect("wait for the demo");
    std::mem::forget(guard);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let all = format!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{all}");
    // "  client  7 -> alpha: message 7"
    let answers: Vec<(usize, &str)> = stdout
        .lines()
        .filter_map(|l| {
            let (client, reply) = l.trim().strip_prefix("client")?.split_once(" -> ")?;
            Some((client.trim().parse().ok()?, reply.split_once(':')?.0))
        })
        .collect();
    assert_eq!(answers.len(), 12, "{all}");
    let answered = |first: usize, last: usize| -> std::collections::BTreeSet<&str> {
        answers
            .iter()
            .filter(|(n, _)| (first..=last).contains(n))
            .map(|(_, name)| *name)
            .collect()
    };
    assert_eq!(
        answered(1, 6),
        ["alpha", "bravo", "charlie"].into(),
        "{all}"
    );
    assert_eq!(answered(7, 12), ["alpha", "charlie"].into(), "{all}");
}

/// The sources a built binary is older than, from the dep-info file cargo writes beside it
/// (`demo.d`: "BINARY: SOURCE SOURCE ...", spaces in paths escaped).
fn newer_sources(binary: &std::path::Path) -> Vec<std::path::PathBuf> {
    let modified = |path: &std::path::Path| std::fs::metadata(path).and_then(|m| m.modified());
    let built = modified(binary)
        .unwrap_or_else(|e| panic!("{}: {e}; `cargo test` builds it", binary.display()));
    let dep_info = binary.with_extension("d");
    let text = std::fs::read_to_string(&dep_info)
        .unwrap_or_else(|e| panic!("{}: {e}", dep_info.display()));
    let line = text.lines().next().unwrap_or_default().replace("\\ ", "\0");
    let (_, sources) = line.split_once(": ").expect("dep-info line");
    sources
        .split_whitespace()
        .map(|s| std::path::PathBuf::from(s.replace('\0', " ")))
        // A source gone since the build counts as changed.
        .filter(|source| modified(source).map_or(true, |t| t > built))
        .collect()
}
