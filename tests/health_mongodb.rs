//! The mongodb check against a real wire-protocol server: mockupdb (PyPI), driven as a child
//! process that plays a replica-set member and switches role while the test runs; pymongo,
//! the real driver, checks the path through the balancer. `hello` and the legacy `isMaster`
//! fallback are both exercised.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use common::{read_to_end, wait_for, wait_status, Balancer, LIMIT};
use switchyard::backend::{DownReason, HealthStatus};
use switchyard::metrics::names;
use tokio::net::TcpStream;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/mongo_mock.py");

/// One mockupdb member, stopped (by its PID) when dropped.
struct Member {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    addr: SocketAddr,
}

impl Member {
    fn start(role: &str, legacy: bool) -> Member {
        Member::start_with(role, if legacy { &["--legacy"] } else { &[] })
    }

    fn start_with(role: &str, flags: &[&str]) -> Member {
        let mut cmd = Command::new("python3");
        cmd.arg(SCRIPT).arg(role).args(flags);
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 (with mockupdb: pip install mockupdb pymongo)");
        let stdin = child.stdin.take().expect("stdin");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("read port");
        let port: u16 = line
            .trim()
            .strip_prefix("port ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| {
                panic!("mongo_mock.py did not start (is mockupdb installed?): {line:?}")
            });
        Member {
            child,
            stdin,
            stdout,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }

    fn ask(&mut self, command: &str) -> String {
        writeln!(self.stdin, "{command}").expect("write command");
        self.stdin.flush().expect("flush");
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("read answer");
        line.trim().to_string()
    }

    fn switch(&mut self, role: &str) {
        assert_eq!(self.ask(role), "ok");
    }

    /// (hello, isMaster) commands answered so far.
    fn stats(&mut self) -> (u64, u64) {
        let line = self.ask("stats");
        let mut n = line
            .split(' ')
            .filter_map(|kv| kv.split_once('=')?.1.parse::<u64>().ok());
        (n.next().expect("hello"), n.next().expect("ismaster"))
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// pymongo's `hello` through `addr`: (isWritablePrimary, setName) as printed by Python.
async fn pymongo_hello(addr: SocketAddr) -> String {
    pymongo_hello_with(addr, "").await
}

/// [`pymongo_hello`] with more `MongoClient` arguments.
async fn pymongo_hello_with(addr: SocketAddr, client_args: &str) -> String {
    let program = format!(
        "import pymongo\n\
         c = pymongo.MongoClient('{addr}', directConnection=True, serverSelectionTimeoutMS=10000{client_args})\n\
         r = c.admin.command('hello')\n\
         print(r.get('isWritablePrimary'), r.get('secondary'), r.get('setName'))\n"
    );
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg("-c")
            .arg(program)
            .output()
            .expect("python3")
    })
    .await
    .expect("join");
    assert!(
        out.status.success(),
        "pymongo through {addr}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongodb_roles_switch_and_legacy_ismaster() {
    let mut m1 = Member::start("primary", false);
    let mut m2 = Member::start("secondary", false);
    let mut legacy = Member::start("primary", true);
    let arbiter = Member::start("arbiter", false);
    let check = "interval: 1s, timeout: 1s, rise: 1, fall: 2";
    let (a1, a2, a3, a4) = (m1.addr, m2.addr, legacy.addr, arbiter.addr);
    let yaml = format!(
        r#"
listeners:
  - {{ name: write, bind: "127.0.0.1:0", pool: rs-write }}
  - {{ name: read, bind: "127.0.0.1:0", pool: rs-read }}
pools:
  - name: rs-write
    on_backend_down: close_connections
    health_check: {{ type: mongodb, {check}, mongodb: {{ role: primary, replica_set: rs0 }} }}
    backends: [ {{ name: m1, address: "{a1}" }}, {{ name: m2, address: "{a2}" }} ]
  - name: rs-read
    health_check: {{ type: mongodb, {check}, mongodb: {{ role: secondary }} }}
    backends: [ {{ name: m1, address: "{a1}" }}, {{ name: m2, address: "{a2}" }} ]
  - name: legacy
    health_check: {{ type: mongodb, {check}, mongodb: {{ role: primary }} }}
    backends: [ {{ name: old, address: "{a3}" }} ]
  - name: other-set
    health_check: {{ type: mongodb, {check}, mongodb: {{ replica_set: rs9 }} }}
    backends: [ {{ name: m1, address: "{a1}" }} ]
  - name: any
    health_check: {{ type: mongodb, {check} }}
    backends: [ {{ name: arbiter, address: "{a4}" }}, {{ name: m2, address: "{a2}" }} ]
"#
    );
    let lb = Balancer::start(&yaml).await;
    let (up, standby) = (HealthStatus::UP, HealthStatus::STANDBY);

    wait_status(&lb, "rs-write", "m1", up).await;
    wait_status(&lb, "rs-write", "m2", standby).await;
    wait_status(&lb, "rs-read", "m2", up).await;
    wait_status(&lb, "rs-read", "m1", standby).await;
    wait_status(&lb, "legacy", "old", up).await;
    wait_status(
        &lb,
        "other-set",
        "m1",
        HealthStatus::down(DownReason::WrongRole),
    )
    .await;
    wait_status(&lb, "any", "m2", up).await;
    wait_status(
        &lb,
        "any",
        "arbiter",
        HealthStatus::down(DownReason::WrongRole),
    )
    .await;

    // The legacy member refused hello and is checked with isMaster from then on: more
    // isMaster checks come, and no more hello. (A first hello cut short by the timeout
    // before its answer came is asked again, so the count itself may be above 1.)
    let (hello, ismaster) = legacy.stats();
    assert!(
        hello >= 1 && ismaster >= 1,
        "hello={hello} ismaster={ismaster}"
    );
    wait_for("more isMaster checks", || legacy.stats().1 >= ismaster + 3).await;
    assert_eq!(legacy.stats().0, hello, "hello is not retried once refused");
    let (hello, _) = m1.stats();
    assert!(hello >= 1, "a current member is checked with hello");

    // The real driver through the balancer reaches the right member.
    assert_eq!(pymongo_hello(lb.addr("write")).await, "True False rs0");
    assert_eq!(pymongo_hello(lb.addr("read")).await, "False True rs0");

    // A connection held to the primary through the close_connections pool.
    let mut held = TcpStream::connect(lb.addr("write")).await.expect("connect");
    let opened = Instant::now();
    while lb
        .shared
        .backend_state("rs-write", "m1")
        .expect("m1")
        .active()
        == 0
    {
        assert!(opened.elapsed() < LIMIT, "held connection never reached m1");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // The replica set elects m2; m1 steps down.
    m1.switch("secondary");
    m2.switch("primary");
    wait_status(&lb, "rs-write", "m2", up).await;
    wait_status(&lb, "rs-write", "m1", standby).await;
    wait_status(&lb, "rs-read", "m1", up).await;
    wait_status(&lb, "rs-read", "m2", standby).await;
    assert!(
        read_to_end(&mut held).await.is_empty(),
        "the held connection is closed"
    );
    assert!(
        lb.counter(
            names::LISTENER_CONNECTIONS_CLOSED,
            &[("listener", "write"), ("reason", "backend_down")]
        ) >= 1
    );
    assert_eq!(pymongo_hello(lb.addr("write")).await, "True False rs0");
    assert_eq!(pymongo_hello(lb.addr("read")).await, "False True rs0");
    assert!(
        lb.counter(
            names::BACKEND_STATE_CHANGES,
            &[
                ("pool", "rs-write"),
                ("backend", "m1"),
                ("state", "standby")
            ]
        ) >= 1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongodb_check_speaks_tls_to_members_that_require_it() {
    let secure = Member::start_with("primary", &["--tls"]);
    let plain = Member::start("primary", false);
    let check = "interval: 1s, timeout: 1s, rise: 1, fall: 2";
    let (a1, a2) = (secure.addr, plain.addr);
    let yaml = format!(
        r#"
listeners:
  - {{ name: write, bind: "127.0.0.1:0", pool: rs-tls }}
pools:
  - name: rs-tls
    health_check: {{ type: mongodb, {check}, mongodb: {{ role: primary, replica_set: rs0, tls: true }} }}
    backends: [ {{ name: secure, address: "{a1}" }} ]
  - name: tls-to-plain
    health_check: {{ type: mongodb, {check}, mongodb: {{ tls: true }} }}
    backends: [ {{ name: plain, address: "{a2}" }} ]
"#
    );
    let lb = Balancer::start(&yaml).await;
    wait_status(&lb, "rs-tls", "secure", HealthStatus::UP).await;
    // A TLS check against a plaintext member fails its handshake: down, for a reason
    // other than "not checked yet".
    let state = lb
        .shared
        .backend_state("tls-to-plain", "plain")
        .expect("plain");
    let deadline = Instant::now() + LIMIT;
    while state.status() == HealthStatus::down(DownReason::Pending) {
        assert!(
            Instant::now() < deadline,
            "the plaintext member was never checked"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let seen = state.status();
    eprintln!("tls check against a plaintext member: {}", seen.describe());
    assert_eq!(
        seen.health,
        switchyard::backend::Health::Down,
        "{}",
        seen.describe()
    );
    // The balancer passes TLS through: the driver's own TLS session reaches the member.
    assert_eq!(
        pymongo_hello_with(
            lb.addr("write"),
            ", tls=True, tlsAllowInvalidCertificates=True"
        )
        .await,
        "True False rs0"
    );
}
