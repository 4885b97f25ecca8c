//! TLS passthrough by SNI end to end: real TLS backends (rustls, certificates from one test
//! CA), verifying clients (rustls and `openssl s_client`) through the balancer, hellos split
//! into 1-byte segments, no SNI, no default pool, slow and malformed clients.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod tls_support;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use switchyard::tls::sni::{build_client_hello, resplit_records};
use tls_support::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const REJECTED: &str = "switchyard_listener_connections_rejected_total";

struct Setup {
    pki: Pki,
    lb: Balancer,
    _db: TlsBackend,
    _api: TlsBackend,
}

/// Two TLS backends (db.example.com, api.example.com) behind one passthrough listener.
async fn setup(tls_extra: &str, default_pool: Option<&str>) -> Setup {
    let pki = Pki::new();
    let db = TlsBackend::start("db", &pki.issue("db.example.com")).await;
    let api = TlsBackend::start("api", &pki.issue("api.example.com")).await;
    let default = default_pool
        .map(|p| format!("      default_pool: {p}\n"))
        .unwrap_or_default();
    let yaml = format!(
        "listeners:
  - name: tls
    bind: 127.0.0.1:0
    tls_passthrough:
      routes:
        - sni: [db.example.com]
          pool: db
        - sni: [\"*.example.com\"]
          pool: api
{default}{tls_extra}pools:
  - name: db
    backends: [{{ address: \"{}\" }}]
  - name: api
    backends: [{{ address: \"{}\" }}]
",
        db.addr, api.addr
    );
    let lb = Balancer::start(&yaml).await;
    Setup {
        pki,
        lb,
        _db: db,
        _api: api,
    }
}

/// Connects through the balancer with a verifying client; returns the greeting and checks
/// that 64 KiB of data come back intact.
async fn round_trip(s: &Setup, name: &str, send_sni: bool) -> String {
    let tcp = TcpStream::connect(s.lb.addr("tls")).await.expect("connect");
    let tls = within(
        "handshake",
        tls_connect(&s.pki.client(&[], send_sni), name, tcp),
    )
    .await
    .expect("TLS handshake with a verified certificate");
    echo_check(tls).await
}

async fn echo_check<S>(tls: S) -> String
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut reader = BufReader::new(tls);
    let greeting = read_greeting(&mut reader).await;
    let payload: Vec<u8> = (0..64 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
    let (mut r, mut w) = tokio::io::split(reader);
    let sent = payload.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await.expect("write");
        w.shutdown().await.expect("close_notify");
    });
    let mut echoed = Vec::new();
    within("echo", r.read_to_end(&mut echoed))
        .await
        .expect("read echo");
    writer.await.expect("writer");
    assert_eq!(echoed, payload, "data intact through the balancer");
    greeting
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_sni_and_client_verifies_the_right_certificate() {
    let s = setup("", None).await;
    assert_eq!(round_trip(&s, "db.example.com", true).await, "db");
    assert_eq!(round_trip(&s, "api.example.com", true).await, "api");
    // The wildcard route: api's certificate is for api.example.com only, so a client asking
    // for www.example.com reaches api's backend and refuses its certificate.
    let tcp = TcpStream::connect(s.lb.addr("tls")).await.expect("connect");
    let err = within(
        "handshake",
        tls_connect(&s.pki.client(&[], true), "www.example.com", tcp),
    )
    .await
    .expect_err("name mismatch");
    assert!(err.to_string().contains("certificate"), "{err}");
    assert_eq!(
        s.lb.counter(
            "switchyard_backend_connect_attempts_total",
            &[("pool", "api")]
        ),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_hello_in_one_byte_writes() {
    let s = setup("", None).await;
    let tcp = TcpStream::connect(s.lb.addr("tls")).await.expect("connect");
    // Every byte of the hello (and a little more) in its own write, 2 ms apart.
    let trickle = Trickle::new(tcp, 400, Duration::from_millis(2));
    let tls = within(
        "handshake",
        tls_connect(&s.pki.client(&[b"h2"], true), "db.example.com", trickle),
    )
    .await
    .expect("handshake");
    // The whole ClientHello (a few hundred bytes) went out one byte per write.
    assert!(
        tls.get_ref().0.tiny_writes >= 200,
        "{}",
        tls.get_ref().0.tiny_writes
    );
    assert_eq!(echo_check(tls).await, "db");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_split_over_many_records_and_segments() {
    // The same handshake bytes in 1-byte TLS records, each sent in its own write.
    let db = Backend::start("db-plain").await;
    let yaml = format!(
        "listeners:
  - name: tls
    bind: 127.0.0.1:0
    tls_passthrough:
      routes: [{{ sni: [db.example.com], pool: db }}]
pools:
  - {{ name: db, backends: [{{ address: \"{}\" }}] }}
",
        db.addr
    );
    let lb = Balancer::start(&yaml).await;
    let records = resplit_records(&build_client_hello(Some("db.example.com"), &[], 0), 1);
    let mut tcp = TcpStream::connect(lb.addr("tls")).await.expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    for chunk in records.chunks(3) {
        tcp.write_all(chunk).await.expect("write");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let (greeting, mut reader) = greet(tcp).await;
    assert_eq!(greeting, "db-plain");
    // The backend got exactly the client's bytes (it echoes them after the greeting).
    let mut echoed = vec![0u8; records.len()];
    within("echo", reader.read_exact(&mut echoed))
        .await
        .expect("echo");
    assert_eq!(echoed, records);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_sni_goes_to_the_default_pool() {
    let s = setup("", Some("api")).await;
    // Without SNI the client still verifies the certificate for the name it expects.
    assert_eq!(round_trip(&s, "api.example.com", false).await, "api");
    assert_eq!(round_trip(&s, "db.example.com", true).await, "db");
    // An unknown name also falls back to the default pool: the client asks for other.test
    // and gets api's certificate and greeting.
    let tcp = TcpStream::connect(s.lb.addr("tls")).await.expect("connect");
    let tls = within(
        "handshake",
        tls_connect(
            &s.pki.client_expecting("api.example.com"),
            "other.test",
            tcp,
        ),
    )
    .await
    .expect("TLS handshake with api's certificate");
    assert_eq!(echo_check(tls).await, "api");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_default_pool_unrouted_connections_are_closed() {
    let s = setup("", None).await;
    let tcp = TcpStream::connect(s.lb.addr("tls")).await.expect("connect");
    let result = within(
        "handshake",
        tls_connect(&s.pki.client(&[], false), "api.example.com", tcp),
    )
    .await;
    assert!(result.is_err(), "no SNI and no default pool: closed");
    let mut tcp = TcpStream::connect(s.lb.addr("tls")).await.expect("connect");
    tcp.write_all(&build_client_hello(Some("other.test"), &[], 0))
        .await
        .expect("write");
    assert!(read_to_end(&mut tcp).await.is_empty());
    assert_eq!(s.lb.counter(REJECTED, &[("reason", "no_route")]), 2);
    assert_eq!(
        s.lb.counter("switchyard_backend_connect_attempts_total", &[]),
        0
    );
}

/// Whether the balancer still holds `s` open: no byte and no EOF to read yet (a peek on
/// the non-blocking socket itself, not the runtime's idea of its readiness).
fn still_open(s: &TcpStream) -> bool {
    let mut byte = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    let peeked = socket2::SockRef::from(s).peek(&mut byte);
    matches!(peeked, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_slow_clients_time_out_while_others_are_served() {
    let s = setup("      client_hello_timeout: 5s\n", None).await;
    let mut silent = TcpStream::connect(s.lb.addr("tls")).await.expect("connect");
    let mut slow = TcpStream::connect(s.lb.addr("tls")).await.expect("connect");
    let hello = build_client_hello(Some("db.example.com"), &[], 0);
    slow.write_all(&hello[..20]).await.expect("write");
    // Served meanwhile, several times over...
    for _ in 0..3 {
        assert_eq!(round_trip(&s, "db.example.com", true).await, "db");
    }
    // ...while both stalled clients are still held, waiting for their hellos.
    assert!(still_open(&silent), "the silent client was closed too soon");
    assert!(still_open(&slow), "the slow client was closed too soon");
    assert_eq!(s.lb.counter(REJECTED, &[]), 0);
    // Then both are closed (EOF) at the timeout.
    assert!(read_to_end(&mut silent).await.is_empty());
    assert!(read_to_end(&mut slow).await.is_empty());
    assert_eq!(s.lb.counter(REJECTED, &[("reason", "hello_timeout")]), 2);
    assert_eq!(
        s.lb.counter(
            "switchyard_listener_connections_closed_total",
            &[("reason", "refused")]
        ),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_closing_mid_hello_is_counted_and_others_are_served() {
    let s = setup("", None).await;
    let hello = build_client_hello(Some("db.example.com"), &[], 0);
    let mut tcp = TcpStream::connect(s.lb.addr("tls")).await.expect("connect");
    tcp.write_all(&hello[..40]).await.expect("write");
    tcp.shutdown().await.expect("half-close");
    assert!(read_to_end(&mut tcp).await.is_empty());
    assert_eq!(s.lb.counter(REJECTED, &[("reason", "closed_early")]), 1);
    assert_eq!(
        s.lb.counter(REJECTED, &[]),
        1,
        "counted once, as closed_early"
    );
    assert_eq!(
        s.lb.counter("switchyard_backend_connect_attempts_total", &[]),
        0
    );
    assert_eq!(round_trip(&s, "db.example.com", true).await, "db");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_is_closed_and_counted_by_reason() {
    let s = setup("", Some("api")).await;
    let hello = build_client_hello(Some("db.example.com"), &[], 0);
    let mut broken = hello.clone();
    broken[9] = 2; // the client version's major byte
    let huge = build_client_hello(Some("db.example.com"), &[], 17_000);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("not_tls", vec![23, 3, 3, 0, 5, 1, 2, 3, 4, 5]), // application data record
        ("not_tls", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        ("not_tls", vec![21, 3, 3, 0, 2, 2, 40]), // an alert
        ("hello_malformed", broken),
        ("hello_malformed", vec![22, 3, 3, 0, 4, 2, 0, 0, 0]), // ServerHello
        ("hello_too_large", huge),
    ];
    for (_, bytes) in &cases {
        let mut tcp = TcpStream::connect(s.lb.addr("tls")).await.expect("connect");
        // The balancer may close before reading everything; a reset is fine here.
        let _ = tcp.write_all(bytes).await;
        let mut out = Vec::new();
        let _ = within("closed", tcp.read_to_end(&mut out)).await;
        assert!(out.is_empty(), "nothing forwarded back");
    }
    for reason in ["not_tls", "hello_malformed", "hello_too_large"] {
        let wanted = cases.iter().filter(|(r, _)| *r == reason).count() as u64;
        assert_eq!(
            s.lb.counter(REJECTED, &[("reason", reason)]),
            wanted,
            "{reason}"
        );
    }
    assert_eq!(
        s.lb.counter("switchyard_backend_connect_attempts_total", &[]),
        0,
        "no backend connect for malformed input"
    );
    // The listener still serves.
    assert_eq!(round_trip(&s, "db.example.com", true).await, "db");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maglev_hash_key_sni_keeps_a_name_on_one_backend() {
    let backends = [
        Backend::start("m0").await,
        Backend::start("m1").await,
        Backend::start("m2").await,
    ];
    let mut yaml = String::from(
        "listeners:
  - name: tls
    bind: 127.0.0.1:0
    tls_passthrough:
      default_pool: m
pools:
  - name: m
    balance: maglev
    hash_key: sni
    backends:
",
    );
    for b in &backends {
        yaml.push_str(&format!(
            "      - {{ name: {}, address: \"{}\" }}\n",
            b.name, b.addr
        ));
    }
    let lb = Balancer::start(&yaml).await;
    let mut seen = std::collections::HashSet::new();
    for i in 0..24 {
        let name = format!("tenant{i}.example.com");
        let mut first = None;
        for src in ["127.0.0.1", "127.0.0.2", "127.0.0.3"] {
            let mut tcp = connect_from(src, lb.addr("tls")).await;
            tcp.write_all(&build_client_hello(Some(&name), &[], 0))
                .await
                .expect("write");
            let (greeting, _) = greet(tcp).await;
            match &first {
                None => first = Some(greeting.clone()),
                Some(f) => assert_eq!(f, &greeting, "{name} from {src}"),
            }
            seen.insert(greeting);
        }
    }
    assert_eq!(seen.len(), 3, "names spread over every backend");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_s_client_through_the_balancer() {
    if std::process::Command::new("openssl")
        .arg("version")
        .output()
        .is_err()
    {
        missing_tool(
            "openssl_s_client_through_the_balancer",
            "openssl is not installed",
        );
        return;
    }
    let s = setup("", None).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = s.pki.write_ca(dir.path());
    for (name, wanted) in [("db.example.com", "db"), ("api.example.com", "api")] {
        let lines = s_client(s.lb.addr("tls"), name, &ca).await;
        assert!(
            lines
                .iter()
                .any(|l| l.contains("Verify return code: 0 (ok)")),
            "{name}: {lines:?}"
        );
        assert!(
            lines.iter().any(|l| l.contains(&format!("CN = {name}"))),
            "{name}: certificate subject in {lines:?}"
        );
        assert!(
            lines.iter().any(|l| l == wanted),
            "greeting {wanted}: {lines:?}"
        );
    }
}

/// Runs `openssl s_client -servername NAME`, sends a line, and returns stdout up to its echo.
async fn s_client(addr: SocketAddr, name: &str, ca: &std::path::Path) -> Vec<String> {
    let mut child = tokio::process::Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &addr.to_string(),
            "-servername",
            name,
        ])
        .args(["-verify_return_error", "-verify_hostname", name, "-CAfile"])
        .arg(ca)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn openssl");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin
        .write_all(b"ping-through-switchyard\n")
        .await
        .expect("write");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut lines = Vec::new();
    within("s_client echo", async {
        while let Some(line) = stdout.next_line().await.expect("read") {
            let done = line == "ping-through-switchyard";
            lines.push(line);
            if done {
                break;
            }
        }
    })
    .await;
    drop(stdin);
    let _ = child.kill().await;
    lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_records_sni_and_why_a_connection_was_refused() {
    let db = Backend::start("db-plain").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("access.log");
    let yaml = format!(
        "access_log: {{ path: \"{}\", format: json }}
listeners:
  - name: tls
    bind: 127.0.0.1:0
    tls_passthrough:
      client_hello_timeout: 5s
      routes: [{{ sni: [db.example.com], pool: db }}]
pools:
  - {{ name: db, backends: [{{ address: \"{}\" }}] }}
",
        log.display(),
        db.addr
    );
    let lb = Balancer::start(&yaml).await;
    let addr = lb.addr("tls");
    // Routed: the record names the pool, the server name and the protocols offered.
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(&build_client_hello(
        Some("db.example.com"),
        &[b"h2", b"http/1.1"],
        0,
    ))
    .await
    .expect("hello");
    let (greeting, reader) = greet(tcp).await;
    assert_eq!(greeting, "db-plain");
    drop(reader);
    // No route for this name, and no default pool: refused, with the name it asked for.
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(&build_client_hello(Some("other.example.org"), &[], 0))
        .await
        .expect("hello");
    assert!(read_to_end(&mut tcp).await.is_empty());
    // Not TLS at all.
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(b"GET / HTTP/1.0\r\n\r\n")
        .await
        .expect("write");
    assert!(read_to_end(&mut tcp).await.is_empty());

    let records = within("three access log records", async {
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let records: Vec<serde_json::Value> = text
                .lines()
                .map(|l| serde_json::from_str(l).expect("JSON record"))
                .collect();
            if records.len() == 3 {
                return records;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let by_sni = |sni: &str| {
        records
            .iter()
            .find(|r| r["sni"] == sni)
            .unwrap_or_else(|| panic!("no record for {sni}: {records:?}"))
    };
    let routed = by_sni("db.example.com");
    assert_eq!(routed["pool"], "db");
    assert_eq!(routed["alpn"], "h2,http/1.1");
    assert_eq!(routed["refused"], serde_json::Value::Null);
    let no_route = by_sni("other.example.org");
    assert_eq!(no_route["alpn"], serde_json::Value::Null, "no ALPN offered");
    assert_eq!(no_route["reason"], "refused");
    assert_eq!(no_route["refused"], "no_route");
    assert_eq!(no_route["backend"], serde_json::Value::Null);
    let not_tls = records
        .iter()
        .find(|r| r["refused"] == "not_tls")
        .unwrap_or_else(|| panic!("no not_tls record: {records:?}"));
    assert_eq!(not_tls["sni"], serde_json::Value::Null);
    assert_eq!(not_tls["reason"], "refused");

    // The status document shows the routes, that unrouted names are closed, and the
    // refusals by reason.
    let status =
        serde_json::to_value(switchyard::admin::status::status(&lb.control, false)).expect("json");
    let l = &status["listeners"][0];
    assert_eq!(l["pool"], "-");
    assert_eq!(l["tls"]["default_pool"], serde_json::Value::Null);
    assert_eq!(l["tls"]["routes"][0]["sni"][0], "db.example.com");
    assert_eq!(l["tls"]["routes"][0]["pool"], "db");
    assert_eq!(l["connections"]["rejected"], 2);
    assert_eq!(l["connections"]["rejected_by_reason"]["no_route"], 1);
    assert_eq!(l["connections"]["rejected_by_reason"]["not_tls"], 1);
    assert_eq!(l["connections"]["rejected_by_reason"]["max_connections"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_reroutes_tls_keeps_open_sessions_and_restarts_probers() {
    let db = Backend::start("db").await;
    let api = Backend::start("api").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("switchyard.yaml");
    let yaml = |route_to: &str, interval: &str, default: &str| {
        format!(
            "listeners:
  - name: tls
    bind: 127.0.0.1:0
    tls_passthrough:
      routes: [{{ sni: [db.example.com], pool: {route_to} }}]
{default}pools:
  - name: db
    health_check: {{ type: tcp, interval: {interval}, timeout: 1s, rise: 1, fall: 3 }}
    backends: [{{ name: db, address: \"{}\" }}]
  - name: api
    health_check: {{ type: tcp, interval: {interval}, timeout: 1s, rise: 1, fall: 3 }}
    backends: [{{ name: api, address: \"{}\" }}]
",
            db.addr, api.addr
        )
    };
    std::fs::write(&path, yaml("db", "1s", "")).expect("write");
    let lb = Balancer::start_file(&path).await;
    wait_status(&lb, "db", "db", switchyard::backend::HealthStatus::UP).await;
    wait_status(&lb, "api", "api", switchyard::backend::HealthStatus::UP).await;
    let addr = lb.addr("tls");
    let hello = |name: &str| build_client_hello(Some(name), &[], 0);
    let mut held = TcpStream::connect(addr).await.expect("connect");
    held.write_all(&hello("db.example.com"))
        .await
        .expect("hello");
    let (greeting, mut held) = greet(held).await;
    assert_eq!(greeting, "db");
    let mut echoed = vec![0u8; hello("db.example.com").len()];
    within("echo", held.read_exact(&mut echoed))
        .await
        .expect("echo");

    // The name now goes to api, unrouted names to api too, and the checks change.
    std::fs::write(&path, yaml("api", "2s", "      default_pool: api\n")).expect("write");
    lb.control.reload().await.expect("reload");
    // Health carried over: no flap to pending while the restarted probers start.
    for (pool, name) in [("db", "db"), ("api", "api")] {
        assert_eq!(
            lb.shared.backend_state(pool, name).expect("state").status(),
            switchyard::backend::HealthStatus::UP
        );
    }
    assert_eq!(lb.shared.health.probers(), 2, "one prober per backend");

    // The session opened before the reload goes on, to db.
    held.get_mut()
        .write_all(b"still here")
        .await
        .expect("write");
    let mut buf = [0u8; 10];
    within("echo after reload", held.read_exact(&mut buf))
        .await
        .expect("echo");
    assert_eq!(&buf, b"still here");
    // New sessions follow the new routes.
    for name in ["db.example.com", "unknown.example.org"] {
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        tcp.write_all(&hello(name)).await.expect("hello");
        assert_eq!(greet(tcp).await.0, "api", "{name}");
    }
}
