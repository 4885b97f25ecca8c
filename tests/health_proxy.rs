//! Health checks that send a PROXY protocol LOCAL header first, against real consumers: an
//! nginx `stream` listener with `proxy_protocol` (which refuses and logs anything else) in
//! front of a TCP echo backend and in front of a real Postgres (plain and TLS logins).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "support/nginx.rs"]
mod nginx;
#[path = "support/postgres.rs"]
mod postgres;

use std::time::Duration;

use common::{greet, wait_for, wait_status, within, Backend, Balancer};
use nginx::Nginx;
use switchyard::backend::{DownReason, Health, HealthStatus};
use tokio::net::TcpStream;

/// Lines of nginx's error log about a broken PROXY header on connections to `port`.
fn broken_headers(nginx: &Nginx, port: u16) -> usize {
    nginx
        .error_log()
        .lines()
        .filter(|l| l.contains("broken header") && l.contains(&format!("server: 127.0.0.1:{port}")))
        .count()
}

/// Sessions nginx's stream access log (`$server_port $status`) records for `port`, ended
/// with `status`.
fn sessions(nginx: &Nginx, port: u16, status: &str) -> usize {
    let want = format!("{port} {status}");
    nginx
        .log("access.log")
        .lines()
        .filter(|l| l.starts_with(&want))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_checks_send_local_headers_nginx_accepts() {
    let echo = Backend::start("echo").await;
    let (p1, p2, p0) = (
        postgres::free_port(),
        postgres::free_port(),
        postgres::free_port(),
    );
    let e = echo.addr;
    let Some(nginx) = Nginx::start(
        &format!(
            "stream {{
  log_format pp '$server_port $status \"$proxy_protocol_addr\"';
  access_log {{dir}}/access.log pp;
  server {{ listen 127.0.0.1:{p1} proxy_protocol; proxy_pass {e}; }}
  server {{ listen 127.0.0.1:{p2} proxy_protocol; proxy_pass {e}; }}
  server {{ listen 127.0.0.1:{p0} proxy_protocol; proxy_pass {e}; }}
}}
"
        ),
        &[p1, p2, p0],
    ) else {
        return;
    };
    let check = "type: tcp, interval: 100ms, timeout: 100ms, rise: 1, fall: 1";
    let yaml = format!(
        "listeners:
  - {{ name: v2, bind: 127.0.0.1:0, pool: pv2, proxy_protocol: v2 }}
pools:
  - {{ name: pv1, health_check: {{ {check}, proxy_protocol: v1 }}, backends: [{{ name: n, address: \"127.0.0.1:{p1}\" }}] }}
  - {{ name: pv2, health_check: {{ {check}, proxy_protocol: v2 }}, backends: [{{ name: n, address: \"127.0.0.1:{p2}\" }}] }}
  - {{ name: none, health_check: {{ {check} }}, backends: [{{ name: n, address: \"127.0.0.1:{p0}\" }}] }}
"
    );
    let lb = Balancer::start(&yaml).await;
    for pool in ["pv1", "pv2", "none"] {
        wait_status(&lb, pool, "n", HealthStatus::UP).await;
    }
    // nginx reads each LOCAL header and proxies the check's session ($status 200, no
    // client address taken from it); a check without a header is a broken header to it.
    wait_for("three checked sessions on each port", || {
        sessions(&nginx, p1, "200") >= 3
            && sessions(&nginx, p2, "200") >= 3
            && broken_headers(&nginx, p0) >= 3
    })
    .await;
    assert_eq!(broken_headers(&nginx, p1), 0, "{}", nginx.error_log());
    assert_eq!(broken_headers(&nginx, p2), 0, "{}", nginx.error_log());
    // Neither v2 LOCAL nor v1 UNKNOWN carries a client address ("-" in nginx's log); the
    // sessions without a header ended as bad requests.
    let access = nginx.log("access.log");
    assert!(
        access
            .lines()
            .filter(|l| l.starts_with(&format!("{p1} ")) || l.starts_with(&format!("{p2} ")))
            .all(|l| l.ends_with(" 200 \"-\"")),
        "{access}"
    );
    assert!(sessions(&nginx, p0, "400") >= 1, "{access}");
    // The tcp check without a header still passes: it only connects. nginx's log is the
    // only sign, which is what proxy_protocol on the check is for.
    assert_eq!(
        lb.shared.backend_state("none", "n").unwrap().status(),
        HealthStatus::UP
    );
    // Client connections through the v2 listener reach the echo backend through nginx.
    let client = TcpStream::connect(lb.addr("v2")).await.unwrap();
    let (greeting, _) = within("greeting through nginx", greet(client)).await;
    assert_eq!(greeting, "echo");
    wait_for(
        "nginx to log the client's address from the listener's header",
        || {
            nginx
                .log("access.log")
                .contains(&format!("{p2} 200 \"127.0.0.1\""))
        },
    )
    .await;
    drop(lb);
    drop(nginx);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_checks_log_in_behind_a_proxy_protocol_listener() {
    use postgres::*;
    let root = Root::new("pp");
    let pg = PgServer::primary(&root, "pp", true);
    let port = free_port();
    let Some(nginx) = Nginx::start(
        &format!(
            "stream {{
  server {{ listen 127.0.0.1:{port} proxy_protocol; proxy_pass 127.0.0.1:{}; }}
}}
",
            pg.port
        ),
        &[port],
    ) else {
        return;
    };
    let pass = root.path().join("monitor.pass");
    std::fs::write(&pass, format!("{MONITOR_PASSWORD}\n")).expect("write");
    let pf = pass.display();
    let check = "type: postgres, interval: 1s, timeout: 1s, rise: 1, fall: 1";
    let backend = format!("backends: [{{ name: pg, address: \"127.0.0.1:{port}\" }}]");
    let yaml = format!(
        "listeners:
  - {{ name: db, bind: 127.0.0.1:0, pool: tls-v2, proxy_protocol: v2 }}
pools:
  - name: tls-v2
    health_check: {{ {check}, proxy_protocol: v2,
      postgres: {{ user: {MONITOR}, password_file: \"{pf}\", role: primary, sslmode: require }} }}
    {backend}
  - name: plain-v1
    health_check: {{ {check}, proxy_protocol: v1,
      postgres: {{ user: {MONITOR}, password_file: \"{pf}\", role: primary, sslmode: disable }} }}
    {backend}
  - name: no-header
    health_check: {{ {check},
      postgres: {{ user: {MONITOR}, password_file: \"{pf}\", role: primary, sslmode: disable }} }}
    {backend}
"
    );
    let lb = Balancer::start(&yaml).await;
    wait_status(&lb, "tls-v2", "pg", HealthStatus::UP).await;
    wait_status(&lb, "plain-v1", "pg", HealthStatus::UP).await;
    // Without the header nginx closes the connection at the startup message: down, for a
    // reason other than "no check yet".
    let none = lb.shared.backend_state("no-header", "pg").unwrap();
    wait_for("the check without a header to fail", || {
        let s = none.status();
        s.health == Health::Down && s.reason != Some(DownReason::Pending)
    })
    .await;
    assert!(broken_headers(&nginx, port) > 0, "{}", nginx.error_log());
    // Both monitoring connections are open through nginx, one of them TLS (sslmode:
    // require), and they are kept between checks: the same sessions a few checks later.
    let sessions_now = || {
        pg.psql(
            "SELECT string_agg(s.ssl::text || '@' || a.backend_start::text, ',' ORDER BY s.ssl) \
             FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
             WHERE a.application_name = 'switchyard-health'",
        )
    };
    let first = sessions_now();
    assert!(
        first.starts_with("false@") && first.contains(",true@") && first.matches('@').count() == 2,
        "{first}"
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(sessions_now(), first);
    assert_eq!(
        lb.shared.backend_state("tls-v2", "pg").unwrap().status(),
        HealthStatus::UP
    );
    // Clients through the listener (which sends v2 headers too) log in and reach it.
    let (in_recovery, server_port) = within("login through nginx", async {
        whoami(lb.addr("db"))
            .await
            .expect("login through switchyard and nginx")
    })
    .await;
    assert_eq!((in_recovery, server_port), (false, pg.port));
    drop(lb);
    drop(nginx);
}

/// A MongoDB wire-protocol server (tests/support/mongo_mock.py) in `role`; killed by its
/// PID when dropped.
struct MongoMock(std::process::Child);

impl MongoMock {
    fn start(role: &str) -> (MongoMock, u16) {
        use std::io::BufRead;
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/mongo_mock.py");
        let mut child = std::process::Command::new("python3")
            .arg(script)
            .arg(role)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3 (with mockupdb: pip install mockupdb pymongo)");
        let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        out.read_line(&mut line).expect("read port");
        let port = line
            .trim()
            .strip_prefix("port ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("mongo_mock.py did not start: {line:?}"));
        // Its stdout stays open (the mock writes answers to commands; none are sent).
        std::mem::forget(out);
        (MongoMock(child), port)
    }
}

impl Drop for MongoMock {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongodb_checks_send_the_header_before_op_msg() {
    let (_mongo, mongo_port) = MongoMock::start("primary");
    let port = postgres::free_port();
    let Some(nginx) = Nginx::start(
        &format!(
            "stream {{
  server {{ listen 127.0.0.1:{port} proxy_protocol; proxy_pass 127.0.0.1:{mongo_port}; }}
}}
"
        ),
        &[port],
    ) else {
        return;
    };
    let check = "type: mongodb, interval: 200ms, timeout: 200ms, rise: 1, fall: 1";
    let backend = format!("backends: [{{ name: m, address: \"127.0.0.1:{port}\" }}]");
    let yaml = format!(
        "listeners:
  - {{ name: m, bind: 127.0.0.1:0, pool: v2, proxy_protocol: v2 }}
pools:
  - {{ name: v2, health_check: {{ {check}, proxy_protocol: v2, mongodb: {{ role: primary }} }}, {backend} }}
  - {{ name: no-header, health_check: {{ {check}, proxy_protocol: none, mongodb: {{ role: primary }} }}, {backend} }}
"
    );
    let lb = Balancer::start(&yaml).await;
    wait_status(&lb, "v2", "m", HealthStatus::UP).await;
    let none = lb.shared.backend_state("no-header", "m").unwrap();
    wait_for("the check without a header to fail", || {
        let s = none.status();
        s.health == Health::Down && s.reason != Some(DownReason::Pending)
    })
    .await;
    assert!(broken_headers(&nginx, port) > 0, "{}", nginx.error_log());
    drop(lb);
    drop(nginx);
}
