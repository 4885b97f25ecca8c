//! Database-role routing against real Postgres servers: a primary and a streaming replica
//! behind write and read listeners (SCRAM, md5 and trust logins, TLS required and
//! preferred), wrong passwords, a hung backend, replay lag (replay paused, WAL receiver
//! stopped), the monitoring connection re-opened after the server ended it, a failover
//! (stop the primary, promote the replica) with its time measured, and the split-brain
//! guard: a promoted replica beside a still-running old primary, and two independent
//! primaries in one pool.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "support/postgres.rs"]
mod postgres;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{wait_counter, wait_for, wait_status, within, Balancer, LIMIT};
use postgres::*;
use switchyard::backend::{DownReason, Health, HealthStatus};
use switchyard::metrics::names;
use tokio::net::TcpListener;

fn down(r: DownReason) -> HealthStatus {
    HealthStatus::down(r)
}

/// Polls `whoami` through `addr` until it reports `want`; returns how long that took.
async fn wait_routed(addr: SocketAddr, want: (bool, u16)) -> Duration {
    let start = Instant::now();
    let mut last = None;
    while start.elapsed() < LIMIT {
        match tokio::time::timeout(Duration::from_secs(5), whoami(addr)).await {
            Ok(Ok(got)) if got == want => return start.elapsed(),
            Ok(Ok(got)) => last = Some(format!("{got:?}")),
            Ok(Err(e)) => last = Some(e.to_string()),
            Err(_) => last = Some("timeout".into()),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{addr} never routed to {want:?}; last: {last:?}");
}

/// The first answer of `whoami` through `addr`, retrying while connections are refused (a
/// slow check on a loaded machine may take a backend out for a moment); a wrong answer is
/// returned, not retried.
async fn route_of(addr: SocketAddr) -> (bool, u16) {
    let start = Instant::now();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), whoami(addr)).await {
            Ok(Ok(got)) => return got,
            Ok(Err(e)) if start.elapsed() > LIMIT => panic!("{addr}: {e}"),
            Err(_) if start.elapsed() > LIMIT => panic!("{addr}: no answer"),
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// A listener that accepts connections and never says a word.
async fn hung_backend() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    (addr, task)
}

/// Fast checks, for the failover time; each wait below allows for a slow check.
const CHECK: &str = "interval: 250ms, timeout: 250ms, rise: 2, fall: 2";
/// Checks for the split-brain guard, whose refusals are asserted at one moment: three
/// slow checks in a row would be needed to take a tied primary out and let the other in.
const SLOW_CHECK: &str = "interval: 500ms, timeout: 500ms, rise: 2, fall: 3";
/// CHECK's interval, and its rise and fall, for the failover time's bound.
const INTERVAL: Duration = Duration::from_millis(250);
const RISE_FALL: u32 = 2;

/// Pids of the monitoring sessions `user` has open on `server`.
fn monitor_sessions(server: &PgServer, user: &str) -> Vec<String> {
    server
        .psql(&format!(
            "SELECT pid FROM pg_stat_activity WHERE usename = '{user}' \
             AND application_name = 'switchyard-health' ORDER BY pid"
        ))
        .lines()
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_replica_routing_auth_hung_and_failover() {
    let root = Root::new("pg-roles");
    let mut a = PgServer::primary(&root, "a", true);
    let b = PgServer::replica_of(&root, "b", &a);
    let scram_file = root.path().join("monitor.pass");
    std::fs::write(&scram_file, format!("{MONITOR_PASSWORD}\n")).expect("write");
    let wrong_file = root.path().join("wrong.pass");
    std::fs::write(&wrong_file, "not-the-password").expect("write");
    std::env::set_var("SWITCHYARD_TEST_PG_MD5", MONITOR_MD5_PASSWORD);
    let (hung, _hung_task) = hung_backend().await;
    let (sf, wf) = (scram_file.display(), wrong_file.display());
    let (pa, pb) = (a.addr(), b.addr());

    let yaml = format!(
        r#"
listeners:
  - {{ name: write, bind: "127.0.0.1:0", pool: pg-write }}
  - {{ name: read, bind: "127.0.0.1:0", pool: pg-read }}
  - {{ name: hung, bind: "127.0.0.1:0", pool: pg-hung }}
pools:
  - name: pg-write
    balance: least_conn
    on_backend_down: close_connections
    health_check:
      {{ type: postgres, {CHECK},
         postgres: {{ user: {MONITOR}, password_file: "{sf}", role: primary, sslmode: disable }} }}
    backends: [ {{ name: a, address: "{pa}" }}, {{ name: b, address: "{pb}" }} ]
  - name: pg-read
    fallback_pool: pg-write
    health_check:
      {{ type: postgres, {CHECK},
         postgres: {{ user: {MONITOR_MD5}, password_env: SWITCHYARD_TEST_PG_MD5, role: replica,
                     max_replication_lag: 30s, sslmode: disable }} }}
    backends: [ {{ name: a, address: "{pa}" }}, {{ name: b, address: "{pb}" }} ]
  - name: pg-tls
    health_check:
      {{ type: postgres, {CHECK}, postgres: {{ user: {MONITOR}, password_file: "{sf}", sslmode: require }} }}
    backends: [ {{ name: a, address: "{pa}" }} ]
  - name: pg-wrong-password
    health_check:
      {{ type: postgres, {CHECK}, postgres: {{ user: {MONITOR}, password_file: "{wf}" }} }}
    backends: [ {{ name: a, address: "{pa}" }} ]
  - name: pg-no-password
    health_check: {{ type: postgres, {CHECK}, postgres: {{ user: {MONITOR}, sslmode: disable }} }}
    backends: [ {{ name: a, address: "{pa}" }} ]
  - name: pg-trust
    health_check: {{ type: postgres, {CHECK}, postgres: {{ user: {SUPERUSER}, role: replica, sslmode: disable }} }}
    backends: [ {{ name: a, address: "{pa}" }}, {{ name: b, address: "{pb}" }} ]
  - name: pg-lag
    health_check:
      {{ type: postgres, {CHECK},
         postgres: {{ user: {MONITOR}, password_file: "{sf}", role: replica, max_replication_lag: 1s }} }}
    backends: [ {{ name: b, address: "{pb}" }} ]
  - name: pg-hung
    health_check:
      {{ type: postgres, interval: 300ms, timeout: 300ms, rise: 1, fall: 2,
         postgres: {{ user: {MONITOR}, password_file: "{sf}" }} }}
    backends: [ {{ name: a, address: "{pa}" }}, {{ name: hung, address: "{hung}" }} ]
"#
    );
    let lb = Balancer::start(&yaml).await;
    let up = HealthStatus::UP;
    let standby = HealthStatus::STANDBY;

    // Roles, decided by the databases themselves.
    wait_status(&lb, "pg-write", "a", up).await;
    wait_status(&lb, "pg-write", "b", standby).await;
    wait_status(&lb, "pg-read", "b", up).await;
    wait_status(&lb, "pg-read", "a", standby).await;
    wait_status(&lb, "pg-tls", "a", up).await;
    // Trust auth: the pg_hba line for the superuser over TCP asks for no password.
    wait_status(&lb, "pg-trust", "b", up).await;
    wait_status(&lb, "pg-trust", "a", standby).await;
    let tls_sessions = a.psql(
        "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) \
         WHERE application_name = 'switchyard-health' AND ssl",
    );
    assert_ne!(
        tls_sessions, "0",
        "the sslmode: require check runs over TLS"
    );
    // The monitoring sessions stay open between checks: the same server processes answer
    // over several intervals.
    let sessions = "SELECT string_agg(pid::text, ',' ORDER BY pid) FROM pg_stat_activity \
                    WHERE application_name = 'switchyard-health'";
    // (Without reuse every check is a new process; a reconnect after a slow check under
    // load is allowed, so a few samples are taken.)
    let mut reused = false;
    for _ in 0..5 {
        let before = a.psql(sessions);
        tokio::time::sleep(Duration::from_millis(800)).await;
        if a.psql(sessions) == before && !before.is_empty() {
            reused = true;
            break;
        }
    }
    assert!(reused, "monitoring connections are reused between checks");
    // Wrong and missing credentials: a state, not a crash or a hang.
    wait_status(&lb, "pg-wrong-password", "a", down(DownReason::AuthFailed)).await;
    wait_status(&lb, "pg-no-password", "a", down(DownReason::AuthFailed)).await;
    // A backend that accepts TCP and never answers is down (timeout); the other serves.
    wait_status(&lb, "pg-hung", "hung", down(DownReason::Timeout)).await;
    wait_status(&lb, "pg-hung", "a", up).await;
    for _ in 0..3 {
        assert_eq!(route_of(lb.addr("hung")).await, (false, a.port));
    }

    // Through the balancer, with a real client.
    let write = lb.addr("write");
    let read = lb.addr("read");
    assert_eq!(route_of(write).await, (false, a.port));
    // (A read pool with no replica up falls back to the write pool, so a slow check of b
    // may send one read to the primary: wait for the replica.)
    wait_routed(read, (true, b.port)).await;

    // Standby is its own state label, not "down".
    let state = |pool: &str, backend: &str, s: &str| {
        lb.counter(
            names::BACKEND_STATE,
            &[("pool", pool), ("backend", backend), ("state", s)],
        )
    };
    wait_for("pg-write: b standby (not down), a up", || {
        state("pg-write", "b", "standby") == 1
            && state("pg-write", "b", "down") == 0
            && state("pg-write", "a", "up") == 1
    })
    .await;
    let auth_failed = [("pool", "pg-wrong-password"), ("reason", "auth_failed")];
    wait_counter(&lb, names::BACKEND_DOWN_REASON, &auth_failed, 1).await;
    assert!(
        lb.counter(
            names::HEALTH_CHECKS,
            &[
                ("pool", "pg-hung"),
                ("backend", "hung"),
                ("result", "timeout")
            ]
        ) >= 1
    );

    // A replica that stops replaying while WAL keeps arriving falls behind: down (lagging),
    // and up again once it catches up.
    wait_status(&lb, "pg-lag", "b", up).await;
    // One replayed commit first: with none, the replica cannot tell how far behind it is.
    a.psql("INSERT INTO writes VALUES (-1)");
    within("replica replays a commit", async {
        while b.psql("SELECT count(*) FROM writes WHERE n = -1") != "1" {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    b.psql("SELECT pg_wal_replay_pause()");
    a.psql("INSERT INTO writes VALUES (0)");
    wait_status(&lb, "pg-lag", "b", down(DownReason::Lagging)).await;
    b.psql("SELECT pg_wal_replay_resume()");
    wait_status(&lb, "pg-lag", "b", up).await;

    // A replica whose WAL receiver is gone (its primary unreachable) has replayed all it
    // received, yet serves ever older data: the time since its last replayed commit counts.
    // The check tells a running receiver by its pid, which the plain monitoring role sees.
    assert_eq!(
        b.psql(&format!(
            "SET ROLE {MONITOR}; SELECT count(pid) FROM pg_stat_wal_receiver"
        )),
        "1"
    );
    let conninfo = b.psql("SHOW primary_conninfo");
    b.psql("ALTER SYSTEM SET primary_conninfo = ''");
    b.psql("SELECT pg_reload_conf()");
    wait_status(&lb, "pg-lag", "b", down(DownReason::Lagging)).await;
    assert_eq!(b.psql("SELECT count(*) FROM pg_stat_wal_receiver"), "0");
    b.psql(&format!(
        "ALTER SYSTEM SET primary_conninfo = '{}'",
        conninfo.replace('\'', "''")
    ));
    b.psql("SELECT pg_reload_conf()");
    wait_status(&lb, "pg-lag", "b", up).await;

    // The monitoring connection is re-opened after an error: the server ends the sessions
    // kept open between checks (pg-write, pg-tls and pg-hung each have one on a), and
    // new ones, other server processes, take over while a stays up.
    let ended = monitor_sessions(&a, MONITOR);
    assert!(!ended.is_empty(), "monitoring sessions kept open");
    a.psql(&format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{MONITOR}' \
         AND application_name = 'switchyard-health'"
    ));
    wait_for("new monitoring sessions", || {
        let now = monitor_sessions(&a, MONITOR);
        now.len() >= ended.len() && now.iter().all(|pid| !ended.contains(pid))
    })
    .await;
    wait_status(&lb, "pg-write", "a", up).await;
    wait_status(&lb, "pg-tls", "a", up).await;

    // A session held open to the primary through the close_connections write pool.
    let held = connect_app(write).await.expect("held connection");
    held.execute("INSERT INTO writes VALUES (1)", &[])
        .await
        .expect("write through the balancer");

    // Failover: stop the primary, promote the replica.
    let t0 = Instant::now();
    a.stop();
    b.promote();
    let promoted_after = t0.elapsed();
    let routed = wait_routed(write, (false, b.port)).await;
    let failover = t0.elapsed();
    wait_status(&lb, "pg-write", "b", up).await;
    eprintln!(
        "failover: the write listener reached the new primary {failover:?} after the old \
         primary was stopped, {routed:?} after `pg_ctl promote` returned (stop + promote took \
         {promoted_after:?}; interval 250ms, rise 2, fall 2)"
    );
    // The promoted replica is up after `rise` checks, which start at most one interval
    // after the promotion: (rise + 1) intervals, plus 5 s for a loaded machine.
    let bound = INTERVAL * (RISE_FALL + 1) + Duration::from_secs(5);
    assert!(
        routed < bound,
        "routed to the new primary {routed:?} after the promotion, over {bound:?}"
    );
    // (`pg_ctl stop -m fast` ends the old primary's sessions itself; Switchyard's own close
    // of a session to a backend that keeps running is asserted in `split_brain_guard`.)
    assert!(
        held.execute("INSERT INTO writes VALUES (2)", &[])
            .await
            .is_err(),
        "the session to the old primary is closed"
    );
    // The old primary is down; the read pool has no replica left and falls back.
    wait_status(&lb, "pg-write", "a", down(DownReason::Unreachable)).await;
    wait_status(&lb, "pg-read", "b", standby).await;
    assert_eq!(route_of(read).await, (false, b.port), "read via fallback");
    assert!(lb.counter(names::POOL_FALLBACK, &[("pool", "pg-read")]) >= 1);
    assert!(
        lb.counter(
            names::BACKEND_STATE_CHANGES,
            &[("pool", "pg-write"), ("backend", "b"), ("state", "up")]
        ) >= 1
    );
    drop(lb);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_brain_guard() {
    let root = Root::new("pg-split");
    let mut c = PgServer::primary(&root, "c", false);
    let d = PgServer::replica_of(&root, "d", &c);
    // An unrelated cluster: its own initdb, the same timeline 1 as c.
    let e = PgServer::primary(&root, "e", false);
    let pass = root.path().join("monitor.pass");
    std::fs::write(&pass, MONITOR_PASSWORD).expect("write");
    let pf = pass.display();
    let (pc, pd, pe) = (c.addr(), d.addr(), e.addr());
    let pg = |policy: &str| {
        format!(
            "{{ type: postgres, {SLOW_CHECK}, postgres: {{ user: {MONITOR}, password_file: \"{pf}\", \
             role: primary, sslmode: disable, on_multiple_primaries: {policy} }} }}"
        )
    };
    let (newest, reject) = (pg("newest_timeline"), pg("reject"));
    let yaml = format!(
        r#"
listeners:
  - {{ name: newest, bind: "127.0.0.1:0", pool: promoted-newest }}
  - {{ name: reject, bind: "127.0.0.1:0", pool: promoted-reject }}
  - {{ name: tie, bind: "127.0.0.1:0", pool: independent-newest }}
pools:
  - name: promoted-newest
    on_backend_down: close_connections
    health_check: {newest}
    backends: [ {{ name: c, address: "{pc}" }}, {{ name: d, address: "{pd}" }} ]
  - name: promoted-reject
    health_check: {reject}
    backends: [ {{ name: c, address: "{pc}" }}, {{ name: d, address: "{pd}" }} ]
  - name: independent-newest
    health_check: {newest}
    backends: [ {{ name: c, address: "{pc}" }}, {{ name: e, address: "{pe}" }} ]
  - name: independent-reject
    health_check: {reject}
    backends: [ {{ name: c, address: "{pc}" }}, {{ name: e, address: "{pe}" }} ]
  - name: prefer-plain
    health_check:
      {{ type: postgres, {SLOW_CHECK},
         postgres: {{ user: {MONITOR}, password_file: "{pf}", role: replica }} }}
    backends: [ {{ name: c, address: "{pc}" }}, {{ name: d, address: "{pd}" }} ]
"#
    );
    let lb = Balancer::start(&yaml).await;
    let up = HealthStatus::UP;
    let split = down(DownReason::SplitBrain);

    // The default sslmode (prefer) against servers with ssl = off: logged in over plain TCP.
    wait_status(&lb, "prefer-plain", "d", up).await;
    wait_status(&lb, "prefer-plain", "c", HealthStatus::STANDBY).await;

    // Two independent primaries, both on timeline 1: tied, so neither takes connections.
    for pool in ["independent-newest", "independent-reject"] {
        wait_status(&lb, pool, "c", split).await;
        wait_status(&lb, pool, "e", split).await;
    }
    assert!(
        whoami(lb.addr("tie")).await.is_err(),
        "tied primaries are all refused"
    );
    assert!(lb.counter(names::POOL_SPLIT_BRAIN, &[("pool", "independent-newest")]) >= 1);

    wait_status(&lb, "promoted-newest", "c", up).await;
    wait_status(&lb, "promoted-newest", "d", HealthStatus::STANDBY).await;
    let newest_addr = lb.addr("newest");
    assert_eq!(route_of(newest_addr).await, (false, c.port));
    let held = connect_app(newest_addr).await.expect("held");
    held.execute("INSERT INTO writes VALUES (1)", &[])
        .await
        .expect("write to the old primary");

    // The replica is promoted while the old primary keeps running (its agent died).
    d.promote();
    wait_status(&lb, "promoted-newest", "d", up).await;
    wait_status(&lb, "promoted-newest", "c", split).await;
    // Switchyard closed the session to the old primary itself (c still runs, so no server
    // shutdown did it): this is where on_backend_down: close_connections is proven, with
    // the close counted under reason backend_down.
    within("held session closed", async {
        loop {
            if held.simple_query("SELECT 1").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let closed_by_us = [("listener", "newest"), ("reason", "backend_down")];
    wait_counter(&lb, names::LISTENER_CONNECTIONS_CLOSED, &closed_by_us, 1).await;
    assert_eq!(
        lb.counter(names::LISTENER_CONNECTIONS_CLOSED, &closed_by_us),
        1,
        "the held session, closed by Switchyard"
    );
    assert_eq!(
        c.psql("SELECT pg_is_in_recovery()"),
        "f",
        "c still runs as a primary"
    );
    assert_eq!(route_of(newest_addr).await, (false, d.port));

    // reject: both refused while both claim to be primary ...
    wait_status(&lb, "promoted-reject", "c", split).await;
    wait_status(&lb, "promoted-reject", "d", split).await;
    assert!(whoami(lb.addr("reject")).await.is_err());
    assert!(lb.counter(names::POOL_SPLIT_BRAIN, &[("pool", "promoted-reject")]) >= 1);
    // ... until exactly one remains.
    c.stop();
    wait_status(&lb, "promoted-reject", "d", up).await;
    assert_eq!(route_of(lb.addr("reject")).await, (false, d.port));
    assert_eq!(
        lb.shared
            .backend_state("promoted-reject", "c")
            .expect("c")
            .health(),
        Health::Down
    );
    drop(e);
}
