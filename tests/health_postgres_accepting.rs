//! The postgres check keeps its session open between checks, but a server can go on
//! answering that session while it takes no new connection: its postmaster stopped
//! (SIGSTOP, as a hung one), or a smart shutdown under way (which waits for every session,
//! the monitoring ones included, to end). Clients sent there hang or are refused; the
//! check must see it: down, and the smart shutdown completes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "support/postgres.rs"]
mod postgres;

use std::process::Command;

use common::{wait_for, wait_status, within, Balancer};
use postgres::*;
use switchyard::backend::{DownReason, HealthStatus};

/// The postmaster's pid, from the first line of `postmaster.pid`.
fn postmaster_pid(server: &PgServer) -> String {
    let text = std::fs::read_to_string(server.data.join("postmaster.pid")).expect("pid file");
    text.lines().next().expect("pid line").trim().to_string()
}

fn signal(pid: &str, sig: &str) {
    let status = Command::new("kill")
        .args([sig, pid])
        .status()
        .expect("kill");
    assert!(status.success(), "kill {sig} {pid}");
}

/// Stops a postmaster (SIGSTOP); lets it go on (SIGCONT) when dropped, panics included.
struct Stopped(String);

impl Stopped {
    fn new(server: &PgServer) -> Stopped {
        let pid = postmaster_pid(server);
        signal(&pid, "-STOP");
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-CONT", &self.0]).status();
    }
}

async fn reads_go_to(lb: &Balancer, port: u16) {
    for _ in 0..4 {
        let got = within("a read", whoami(lb.addr("read"))).await;
        assert_eq!(got.expect("read"), (true, port));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_taking_no_new_connections_is_down() {
    let root = Root::new("pg-accepting");
    let a = PgServer::primary(&root, "a", false);
    let b = PgServer::replica_of(&root, "b", &a);
    let c = PgServer::replica_of(&root, "c", &a);
    let sf = root.path().join("monitor.pass");
    std::fs::write(&sf, format!("{MONITOR_PASSWORD}\n")).expect("write");
    let yaml = format!(
        r#"
listeners:
  - {{ name: read, bind: "127.0.0.1:0", pool: pg-read }}
pools:
  - name: pg-read
    health_check:
      {{ type: postgres, interval: 2s, timeout: 2s, rise: 2, fall: 2,
         postgres: {{ user: {MONITOR}, password_file: "{}", role: replica, sslmode: disable }} }}
    backends: [ {{ name: b, address: "{}" }}, {{ name: c, address: "{}" }} ]
"#,
        sf.display(),
        b.addr(),
        c.addr()
    );
    let lb = Balancer::start(&yaml).await;
    wait_status(&lb, "pg-read", "b", HealthStatus::UP).await;
    wait_status(&lb, "pg-read", "c", HealthStatus::UP).await;

    // A postmaster that stops accepting: the kept session still answers, a new
    // connection does not.
    let stopped = Stopped::new(&b);
    wait_status(&lb, "pg-read", "b", HealthStatus::down(DownReason::Timeout)).await;
    reads_go_to(&lb, c.port).await;
    drop(stopped);
    wait_status(&lb, "pg-read", "b", HealthStatus::UP).await;

    // A smart shutdown: new connections are refused ("the database system is shutting
    // down") while sessions may finish; the monitoring ones must not keep it waiting.
    let out = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(bin_dir().join("pg_ctl"))
        .args(["-W", "-m", "smart", "-D"])
        .arg(&b.data)
        .arg("stop")
        .output()
        .expect("pg_ctl stop -m smart");
    assert!(out.status.success(), "{out:?}");
    wait_status(
        &lb,
        "pg-read",
        "b",
        HealthStatus::down(DownReason::Unreachable),
    )
    .await;
    reads_go_to(&lb, c.port).await;
    wait_for("b's smart shutdown ends", || {
        !b.data.join("postmaster.pid").exists()
    })
    .await;
    wait_status(&lb, "pg-read", "c", HealthStatus::UP).await;
}
