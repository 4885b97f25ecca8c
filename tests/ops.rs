//! Operations end to end on real sockets: the admin API (status, drain, maint, weight,
//! token), the metrics exposition checked against `metrics::names`, hot reload of listeners
//! and pools, and the access log.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::io::Write;

use common::http::{get, post, request};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TOKEN_ENV: &str = "SWITCHYARD_OPS_TEST_TOKEN";
const TOKEN: &str = "test-token-0123456789abcdef";

fn set_token_env() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    // Rust's own environment accesses are serialized; this runs before any config reads it.
    ONCE.call_once(|| std::env::set_var(TOKEN_ENV, TOKEN));
}

/// One listener `l` on port 0, pool `p` of the given backends (by name), admin on port 0.
fn config(backends: &[(&str, std::net::SocketAddr, u32)], extra: &str) -> String {
    let mut yaml = format!(
        "admin:\n  bind: 127.0.0.1:0\n{extra}listeners:\n  - name: l\n    bind: 127.0.0.1:0\n    pool: p\npools:\n  - name: p\n    backends:\n"
    );
    for (name, addr, weight) in backends {
        yaml.push_str(&format!(
            "      - {{ name: {name}, address: \"{addr}\", weight: {weight} }}\n"
        ));
    }
    yaml
}

fn write_file(path: &std::path::Path, text: &str) {
    // Write then rename, so a reload never reads half a file.
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).expect("create");
    f.write_all(text.as_bytes()).expect("write");
    drop(f);
    std::fs::rename(&tmp, path).expect("rename");
}

fn backend<'a>(status: &'a serde_json::Value, pool: &str, name: &str) -> &'a serde_json::Value {
    status["pools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == pool)
        .and_then(|p| {
            p["backends"]
                .as_array()
                .unwrap()
                .iter()
                .find(|b| b["name"] == name)
        })
        .unwrap_or_else(|| panic!("no backend {pool}/{name} in {status}"))
}

/// Sample value of `name{labels...}` in a text exposition.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn health_ready_status_and_page_are_served() {
    let a = Backend::start("a").await;
    let lb = Balancer::start(&config(&[("a", a.addr, 1)], "")).await;
    let admin = lb.admin.expect("admin address");
    assert_eq!(backend_of(lb.addr("l")).await, "a");

    let r = get(admin, "/healthz").await;
    assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));
    let r = get(admin, "/readyz").await;
    assert_eq!((r.status, r.body.as_str()), (200, "ready\n"));

    let s = get(admin, "/api/v1/status").await.json();
    assert_eq!(s["ready"], true);
    assert_eq!(s["admin"]["auth_required"], false);
    let l = &s["listeners"][0];
    assert_eq!(l["name"], "l");
    assert_eq!(l["protocol"], "tcp");
    assert_eq!(l["local_addr"], lb.addr("l").to_string());
    assert_eq!(l["connections"]["accepted"], 1);
    assert!(l["udp"].is_null(), "a tcp listener has no udp block");
    let b = backend(&s, "p", "a");
    assert_eq!(b["address"], a.addr.to_string());
    assert_eq!(b["state"], "up");
    assert_eq!(b["admin_state"], "ready");
    assert_eq!(b["health"]["state"], "up");
    assert!(b["health"]["reason"].is_null());
    assert!(b["health"].get("last_check").is_some());
    assert_eq!(b["connections"]["connect_attempts"], 1);

    let page = get(admin, "/").await;
    assert_eq!(page.status, 200);
    assert!(page
        .header("content-type")
        .unwrap()
        .starts_with("text/html"));
    assert!(page.body.contains("/api/v1/status"));
    for external in ["src=\"http", "href=\"http", "url(http", "@import"] {
        assert!(!page.body.contains(external), "external asset: {external}");
    }
    assert_eq!(get(admin, "/nope").await.status, 404);
}

#[tokio::test]
async fn metrics_export_exactly_the_names_in_names_rs() {
    let a = Backend::start("a").await;
    // With an active check, so its duration and result families have samples too.
    let yaml = config(&[("a", a.addr, 1)], "").replace(
        "  - name: p\n",
        "  - name: p\n    health_check: { type: tcp, interval: 1s, timeout: 1s, initial_state: up }\n",
    );
    // And a UDP listener, so the flow families are exported too.
    let yaml = yaml.replace(
        "pools:\n",
        "  - name: u\n    bind: 127.0.0.1:0\n    protocol: udp\n    pool: p\npools:\n",
    );
    let lb = Balancer::start(&yaml).await;
    wait_for("first health check", || {
        lb.shared
            .backend_state("p", "a")
            .is_some_and(|s| s.last_check().is_some())
    })
    .await;
    // Ready (and `switchyard_ready` 1) once the first checks have run.
    wait_for("ready", || lb.control.is_ready()).await;
    let admin = lb.admin.unwrap();
    let mut s = TcpStream::connect(lb.addr("l")).await.unwrap();
    let (name, mut reader) = greet(s).await;
    assert_eq!(name, "a");
    reader.get_mut().write_all(b"hello").await.unwrap();
    let mut buf = [0u8; 5];
    reader.read_exact(&mut buf).await.unwrap();
    s = reader.into_inner();

    let r = get(admin, "/metrics").await;
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap().starts_with("text/plain"));
    let text = r.body;
    let mut exported = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
            if kind == "counter" {
                assert!(
                    name.ends_with("_total"),
                    "counter {name} must end in _total"
                );
            }
            if name.contains("duration") {
                assert!(name.ends_with("_seconds"), "{name} must be in seconds");
            }
            exported.insert(name.to_string());
        }
    }
    let known: BTreeSet<String> = switchyard::metrics::names::ALL
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(
        exported, known,
        "exported families differ from metrics::names::ALL"
    );
    let ab = [("pool", "p"), ("backend", "a")];
    assert_eq!(
        sample(&text, "switchyard_backend_connections_active", &ab),
        Some(1.0)
    );
    assert_eq!(sample(&text, "switchyard_backend_up", &ab), Some(1.0));
    assert_eq!(
        sample(
            &text,
            "switchyard_backend_state",
            &[("pool", "p"), ("backend", "a"), ("state", "up")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            "switchyard_backend_state",
            &[("pool", "p"), ("backend", "a"), ("state", "drain")]
        ),
        Some(0.0)
    );
    assert_eq!(sample(&text, "switchyard_backend_weight", &ab), Some(1.0));
    assert_eq!(
        sample(&text, "switchyard_backend_bytes_from_clients_total", &ab),
        Some(5.0)
    );
    assert_eq!(
        sample(
            &text,
            "switchyard_listener_connections_active",
            &[("listener", "l")]
        ),
        Some(1.0)
    );
    assert_eq!(sample(&text, "switchyard_ready", &[]), Some(1.0));
    assert!(sample(&text, "process_resident_memory_bytes", &[]).unwrap() > 0.0);
    assert!(sample(&text, "process_open_fds", &[]).unwrap() > 0.0);
    drop(s);
}

#[tokio::test]
async fn drain_keeps_open_connections_and_sends_new_ones_elsewhere() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let lb = Balancer::start(&config(&[("a", a.addr, 1), ("b", b.addr, 1)], "")).await;
    let admin = lb.admin.unwrap();
    let addr = lb.addr("l");
    let (first, mut held) = greet(TcpStream::connect(addr).await.unwrap()).await;
    assert_eq!(first, "a", "round robin starts with a");

    let r = post(
        admin,
        "/api/v1/pools/p/backends/a/state",
        None,
        r#"{"state":"drain"}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["state"], "drain");

    for _ in 0..4 {
        assert_eq!(backend_of(addr).await, "b", "a drained backend takes none");
    }
    // The open connection to a still works both ways.
    held.get_mut().write_all(b"still here").await.unwrap();
    let mut buf = [0u8; 10];
    within("echo", held.read_exact(&mut buf)).await.unwrap();
    assert_eq!(&buf, b"still here");
    let s = get(admin, "/api/v1/status").await.json();
    assert_eq!(backend(&s, "p", "a")["state"], "drain");
    assert_eq!(backend(&s, "p", "a")["connections"]["active"], 1);
    let m = get(admin, "/metrics").await.body;
    assert_eq!(
        sample(
            &m,
            "switchyard_backend_state",
            &[("pool", "p"), ("backend", "a"), ("state", "drain")]
        ),
        Some(1.0)
    );

    let r = post(
        admin,
        "/api/v1/pools/p/backends/a/state",
        None,
        r#"{"state":"ready"}"#,
    )
    .await;
    assert_eq!(r.status, 200);
    let names: Vec<String> = {
        let mut v = Vec::new();
        for _ in 0..4 {
            v.push(backend_of(addr).await);
        }
        v
    };
    assert!(names.iter().any(|n| n == "a"), "ready again: {names:?}");
}

#[tokio::test]
async fn maint_closes_open_connections_with_reason_maint() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let lb = Balancer::start(&config(&[("a", a.addr, 1), ("b", b.addr, 1)], "")).await;
    let admin = lb.admin.unwrap();
    let addr = lb.addr("l");
    let (first, mut to_a) = greet(TcpStream::connect(addr).await.unwrap()).await;
    assert_eq!(first, "a");
    let (second, mut to_b) = greet(TcpStream::connect(addr).await.unwrap()).await;
    assert_eq!(second, "b");

    let r = post(
        admin,
        "/api/v1/pools/p/backends/a/state",
        None,
        r#"{"state":"maint"}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    // The connection to a is closed by the balancer; the one to b is untouched.
    let rest = read_to_end(&mut to_a).await;
    assert!(rest.is_empty());
    to_b.get_mut().write_all(b"ok?").await.unwrap();
    let mut buf = [0u8; 3];
    within("echo", to_b.read_exact(&mut buf)).await.unwrap();
    assert_eq!(&buf, b"ok?");
    wait_for("maint close counted", || {
        lb.counter(
            "switchyard_listener_connections_closed_total",
            &[("reason", "maint")],
        ) == 1
    })
    .await;
    for _ in 0..3 {
        assert_eq!(backend_of(addr).await, "b");
    }
    let s = get(admin, "/api/v1/status").await.json();
    assert_eq!(backend(&s, "p", "a")["state"], "maint");
    assert_eq!(backend(&s, "p", "a")["admin_state"], "maint");
}

#[tokio::test]
async fn weight_and_state_set_through_the_api_survive_a_reload() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let c = Backend::start("c").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("switchyard.yaml");
    write_file(
        &path,
        &config(&[("a", a.addr, 1), ("b", b.addr, 1), ("c", c.addr, 1)], ""),
    );
    let lb = Balancer::start_file(&path).await;
    let admin = lb.admin.unwrap();
    let addr = lb.addr("l");

    let r = post(
        admin,
        "/api/v1/pools/p/backends/a/weight",
        None,
        r#"{"weight":0}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["weight"], 0);
    assert_eq!(r.json()["configured_weight"], 1);
    let r = post(
        admin,
        "/api/v1/pools/p/backends/c/state",
        None,
        r#"{"state":"drain"}"#,
    )
    .await;
    assert_eq!(r.status, 200);
    for _ in 0..4 {
        assert_eq!(backend_of(addr).await, "b");
    }

    // A reload with a changed config (b's weight) keeps both operator settings.
    write_file(
        &path,
        &config(&[("a", a.addr, 1), ("b", b.addr, 2), ("c", c.addr, 1)], ""),
    );
    let r = post(admin, "/api/v1/reload", None, "{}").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let s = get(admin, "/api/v1/status").await.json();
    assert_eq!(backend(&s, "p", "a")["weight"], 0);
    assert_eq!(backend(&s, "p", "a")["weight_overridden"], true);
    assert_eq!(backend(&s, "p", "b")["weight"], 2);
    assert_eq!(backend(&s, "p", "c")["state"], "drain");
    for _ in 0..4 {
        assert_eq!(backend_of(addr).await, "b");
    }

    // null returns to the config's weight.
    let r = post(
        admin,
        "/api/v1/pools/p/backends/a/weight",
        None,
        r#"{"weight":null}"#,
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["weight"], 1);
    assert_eq!(r.json()["weight_overridden"], false);
    let mut seen = BTreeSet::new();
    for _ in 0..6 {
        seen.insert(backend_of(addr).await);
    }
    assert!(seen.contains("a"), "{seen:?}");

    // Bad requests.
    let r = post(
        admin,
        "/api/v1/pools/p/backends/a/weight",
        None,
        r#"{"weight":999}"#,
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(r.json()["error"].as_str().unwrap().contains("out of range"));
    let r = post(
        admin,
        "/api/v1/pools/p/backends/zz/state",
        None,
        r#"{"state":"drain"}"#,
    )
    .await;
    assert_eq!(r.status, 404);
    let r = post(
        admin,
        "/api/v1/pools/p/backends/a/state",
        None,
        r#"{"state":"sleep"}"#,
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(r.json()["error"]
        .as_str()
        .unwrap()
        .contains("expected one of ready, drain, maint"));
    let r = post(admin, "/api/v1/pools/p/backends/a/state", None, "{").await;
    assert_eq!(r.status, 400);
}

#[tokio::test]
async fn changes_need_the_token_when_one_is_configured() {
    set_token_env();
    let a = Backend::start("a").await;
    let lb = Balancer::start(&config(
        &[("a", a.addr, 1)],
        &format!("  token_env: {TOKEN_ENV}\n"),
    ))
    .await;
    let admin = lb.admin.unwrap();
    let path = "/api/v1/pools/p/backends/a/state";
    let body = r#"{"state":"drain"}"#;

    let r = post(admin, path, None, body).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    let r = post(admin, path, Some("test-token-0123456789abcdeX"), body).await;
    assert_eq!(r.status, 401);
    let r = post(admin, path, Some("short"), body).await;
    assert_eq!(r.status, 401);
    assert_eq!(
        lb.counter("switchyard_admin_auth_failures_total", &[]),
        3,
        "refusals are counted"
    );
    let s = get(admin, "/api/v1/status").await.json();
    assert_eq!(s["admin"]["auth_required"], true);
    assert_eq!(backend(&s, "p", "a")["admin_state"], "ready");

    let r = post(admin, path, Some(TOKEN), body).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["admin_state"], "drain");
    // A form post (no JSON content type) is refused even with the token.
    let auth = format!("Bearer {TOKEN}");
    let r = request(
        admin,
        "POST",
        path,
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/x-www-form-urlencoded"),
        ],
        "state=ready",
    )
    .await;
    assert_eq!(r.status, 415);
    // Reads need no token.
    assert_eq!(get(admin, "/metrics").await.status, 200);
    // The token never shows in the config's Debug output.
    let debug = format!("{:?}", lb.shared.snapshot().config);
    assert!(!debug.contains(TOKEN), "token leaked in Debug");
}

#[tokio::test]
async fn invalid_reload_is_rejected_with_its_location_and_the_running_config_stays() {
    let a = Backend::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("switchyard.yaml");
    let good = config(&[("a", a.addr, 1)], "");
    write_file(&path, &good);
    let lb = Balancer::start_file(&path).await;
    let admin = lb.admin.unwrap();
    let addr = lb.addr("l");
    let (_, mut held) = greet(TcpStream::connect(addr).await.unwrap()).await;

    write_file(
        &path,
        &good.replace(
            "pools:\n",
            "pools:\n  - name: p\n    balance: leastconn\n    backends: [{address: 127.0.0.1:1}]\n",
        ),
    );
    let r = post(admin, "/api/v1/reload", None, "").await;
    assert_eq!(r.status, 400, "{}", r.body);
    let message = r.json()["error"].as_str().unwrap().to_string();
    assert!(
        message.starts_with(&format!("{}:", path.display())),
        "{message}"
    );
    assert!(
        message.contains(":9:14: pools[0].balance: unknown value \"leastconn\""),
        "{message}"
    );
    assert_eq!(
        lb.counter("switchyard_config_reloads_total", &[("result", "error")]),
        1
    );
    let s = get(admin, "/api/v1/status").await.json();
    assert_eq!(s["config"]["reloads_failed"], 1);
    assert_eq!(s["config"]["last_reload_error"], message.as_str());
    // Still serving with the old config, old connection intact.
    assert_eq!(backend_of(addr).await, "a");
    held.get_mut().write_all(b"x").await.unwrap();
    let mut buf = [0u8; 1];
    within("echo", held.read_exact(&mut buf)).await.unwrap();

    // A missing file is an error too.
    std::fs::remove_file(&path).unwrap();
    let r = post(admin, "/api/v1/reload", None, "{}").await;
    assert_eq!(r.status, 400);
    assert!(r.json()["error"].as_str().unwrap().contains("cannot read"));
}

#[tokio::test]
async fn reload_adds_removes_and_renames_listeners_without_cutting_connections() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("switchyard.yaml");
    // A free port for the listener that is renamed (its address must stay the same).
    let fixed = free_addr();
    let v1 = format!(
        "listeners:\n  - {{ name: one, bind: \"{fixed}\", pool: pa }}\n  - {{ name: two, bind: 127.0.0.1:0, pool: pa }}\npools:\n  - name: pa\n    backends: [{{ name: a, address: \"{}\" }}]\n  - name: pb\n    backends: [{{ name: b, address: \"{}\" }}]\n",
        a.addr, b.addr
    );
    write_file(&path, &v1);
    let lb = Balancer::start_file(&path).await;
    let two = lb.addr("two");
    let (_, mut via_one) = greet(TcpStream::connect(fixed).await.unwrap()).await;
    let (_, mut via_two) = greet(TcpStream::connect(two).await.unwrap()).await;

    // one -> renamed "uno" on the same address and now routed to pool pb; two removed;
    // three added.
    let v2 = format!(
        "listeners:\n  - {{ name: uno, bind: \"{fixed}\", pool: pb }}\n  - {{ name: three, bind: 127.0.0.1:0, pool: pa }}\npools:\n  - name: pa\n    backends: [{{ name: a, address: \"{}\" }}]\n  - name: pb\n    backends: [{{ name: b, address: \"{}\" }}]\n",
        a.addr, b.addr
    );
    write_file(&path, &v2);
    let changes = lb.control.reload().await.expect("reload");
    assert_eq!(changes.added, vec!["three".to_string()]);
    assert_eq!(changes.removed, vec!["two".to_string()]);
    assert_eq!(changes.kept, vec!["uno".to_string()]);

    assert_eq!(lb.control.local_addr("uno"), Some(fixed));
    assert_eq!(
        backend_of(fixed).await,
        "b",
        "renamed listener uses its new pool"
    );
    assert_eq!(backend_of(lb.addr("three")).await, "a");
    assert!(
        TcpStream::connect(two).await.is_err(),
        "a removed listener's socket is closed"
    );
    // Connections accepted before the reload go on, on both the kept and the removed one.
    for held in [&mut via_one, &mut via_two] {
        held.get_mut().write_all(b"after").await.unwrap();
        let mut buf = [0u8; 5];
        within("echo", held.read_exact(&mut buf)).await.unwrap();
        assert_eq!(&buf, b"after");
    }
    let s = lb.control.reload_status();
    assert_eq!((s.ok, s.failed), (1, 0));
    // Removed and renamed-away names leave /metrics; the new ones are there.
    let text = lb.shared.metrics.encode_text();
    for gone in ["listener=\"one\"", "listener=\"two\""] {
        assert!(!text.contains(gone), "{gone} still exported:\n{text}");
    }
    for kept in ["listener=\"uno\"", "listener=\"three\""] {
        assert!(text.contains(kept), "{kept} missing:\n{text}");
    }
}

/// A UDP echo server on 127.0.0.1:0.
async fn udp_echo() -> std::net::SocketAddr {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let _ = socket.send_to(&buf[..n], from).await;
        }
    });
    addr
}

async fn udp_round_trip(client: &tokio::net::UdpSocket, to: std::net::SocketAddr, msg: &[u8]) {
    client.send_to(msg, to).await.unwrap();
    let mut buf = [0u8; 64];
    let (n, from) = within("udp reply", client.recv_from(&mut buf))
        .await
        .unwrap();
    assert_eq!((&buf[..n], from), (msg, to));
}

#[tokio::test]
async fn reload_adds_and_removes_udp_listeners_without_cutting_flows() {
    let echo = udp_echo().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("switchyard.yaml");
    let yaml = |listeners: &str| {
        format!(
            "listeners:\n{listeners}pools:\n  - name: p\n    backends: [{{ name: e, address: \"{echo}\" }}]\n"
        )
    };
    let kept = "  - { name: kept, bind: 127.0.0.1:0, protocol: udp, pool: p }\n";
    write_file(
        &path,
        &yaml(&format!(
            "{kept}  - {{ name: old, bind: 127.0.0.1:0, protocol: udp, pool: p }}\n"
        )),
    );
    let lb = Balancer::start_file(&path).await;
    let kept_addr = lb.control.local_addr("kept").expect("kept bound");
    let old_addr = lb.control.local_addr("old").expect("old bound");
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    udp_round_trip(&client, kept_addr, b"one").await;
    udp_round_trip(&client, old_addr, b"two").await;

    write_file(
        &path,
        &yaml(&format!(
            "{kept}  - {{ name: new, bind: 127.0.0.1:0, protocol: udp, pool: p }}\n"
        )),
    );
    let changes = lb.control.reload().await.expect("reload");
    assert_eq!(changes.added, vec!["new".to_string()]);
    assert_eq!(changes.removed, vec!["old".to_string()]);
    assert_eq!(changes.kept, vec!["kept".to_string()]);
    assert_eq!(
        lb.control.local_addr("kept"),
        Some(kept_addr),
        "kept socket"
    );
    let new_addr = lb.control.local_addr("new").expect("new bound");
    udp_round_trip(&client, new_addr, b"three").await;
    udp_round_trip(&client, kept_addr, b"four").await;
    // The flow opened through the removed listener goes on until it ends by itself.
    udp_round_trip(&client, old_addr, b"five").await;
}

#[tokio::test]
async fn status_and_backend_bytes_count_udp_flows() {
    let echo = udp_echo().await;
    let lb = Balancer::start(&format!(
        "admin:\n  bind: 127.0.0.1:0\nlisteners:\n  - {{ name: u, bind: 127.0.0.1:0, protocol: udp, pool: p, udp: {{ idle_timeout: 30s, max_flows: 1 }} }}\npools:\n  - name: p\n    backends: [{{ name: e, address: \"{echo}\" }}]\n"
    ))
    .await;
    let admin = lb.admin.unwrap();
    let to = lb.addr("u");
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    udp_round_trip(&client, to, b"hello").await;
    udp_round_trip(&client, to, b"again!").await;
    // A second client would be a second flow, beyond max_flows: dropped.
    let other = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for _ in 0..2 {
        other.send_to(b"x", to).await.unwrap();
    }
    let dropped = [("reason", "max_flows")];
    wait_counter(&lb, "switchyard_udp_datagrams_dropped_total", &dropped, 2).await;
    wait_counter(&lb, "switchyard_udp_bytes_to_clients_total", &[], 11).await;
    // Per-backend bytes are added up per batch too.
    let pe = [("pool", "p"), ("backend", "e")];
    wait_counter(&lb, "switchyard_backend_bytes_from_clients_total", &pe, 11).await;
    wait_counter(&lb, "switchyard_backend_bytes_to_clients_total", &pe, 11).await;

    let s = get(admin, "/api/v1/status").await.json();
    let l = &s["listeners"][0];
    assert_eq!(l["protocol"], "udp");
    assert!(l["max_connections"].is_null(), "TCP-only: {l}");
    assert!(l["idle_timeout_seconds"].is_null(), "TCP-only: {l}");
    let u = &l["udp"];
    assert_eq!(u["max_flows"], 1);
    assert_eq!(u["idle_timeout_seconds"], 30.0);
    assert!(u["responses"].is_null());
    assert_eq!(u["reuse_upstream_sockets"], false, "none without responses");
    assert_eq!(u["flows"]["active"], 1, "{u}");
    assert_eq!(u["flows"]["created"], 1, "{u}");
    assert_eq!(u["flows"]["expired"]["idle_timeout"], 0, "{u}");
    assert_eq!(u["datagrams"]["from_clients"], 2, "{u}");
    assert_eq!(u["datagrams"]["to_clients"], 2, "{u}");
    assert_eq!(u["bytes"]["from_clients"], 11, "{u}");
    assert_eq!(u["bytes"]["to_clients"], 11, "{u}");
    assert_eq!(u["dropped"], 2, "{u}");
    assert_eq!(u["dropped_by_reason"]["max_flows"], 2, "{u}");
    assert_eq!(u["dropped_by_reason"]["no_backend"], 0, "{u}");
    // The listener's bytes are the datagrams' for UDP.
    assert_eq!(l["bytes"]["from_clients"], 11);
    assert_eq!(l["bytes"]["to_clients"], 11);
    // The backend counts the flow and its bytes, in the status and in /metrics.
    let b = backend(&s, "p", "e");
    assert_eq!(b["connections"]["active"], 1);
    assert_eq!(b["bytes"]["from_clients"], 11);
    assert_eq!(b["bytes"]["to_clients"], 11);
    let m = get(admin, "/metrics").await.body;
    assert_eq!(
        sample(&m, "switchyard_backend_bytes_from_clients_total", &pe),
        Some(11.0)
    );
    assert_eq!(
        sample(&m, "switchyard_backend_bytes_to_clients_total", &pe),
        Some(11.0)
    );
}

/// Lines of a text exposition for `name` with `listener="{listener}"`.
fn series_of(text: &str, name: &str, listener: &str) -> usize {
    let label = format!("listener=\"{listener}\"");
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
        .filter(|l| l.contains(&label))
        .count()
}

#[tokio::test]
async fn udp_listeners_export_flow_series_and_no_connection_series() {
    use switchyard::metrics::names::*;
    let a = Backend::start("a").await;
    let echo = udp_echo().await;
    let lb = Balancer::start(&format!(
        "admin:\n  bind: 127.0.0.1:0\nlisteners:\n  - {{ name: db, bind: 127.0.0.1:0, pool: p }}\n  - {{ name: dns, bind: 127.0.0.1:0, protocol: udp, pool: u }}\npools:\n  - name: p\n    backends: [{{ name: a, address: \"{}\" }}]\n  - name: u\n    backends: [{{ name: e, address: \"{echo}\" }}]\n",
        a.addr
    ))
    .await;
    let admin = lb.admin.unwrap();
    // A connection through the TCP listener, a flow through the UDP one.
    let (name, mut reader) = greet(TcpStream::connect(lb.addr("db")).await.unwrap()).await;
    assert_eq!(name, "a");
    reader.get_mut().write_all(b"hello").await.unwrap();
    let mut buf = [0u8; 5];
    reader.read_exact(&mut buf).await.unwrap();
    drop(reader);
    let db = [("listener", "db")];
    wait_counter(&lb, LISTENER_CONNECTIONS_CLOSED, &db, 1).await;
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    udp_round_trip(&client, lb.addr("dns"), b"query").await;
    let dns = [("listener", "dns")];
    wait_counter(&lb, UDP_BYTES_TO_CLIENTS, &dns, 5).await;

    let text = get(admin, "/metrics").await.body;
    let tcp_only = [
        LISTENER_CONNECTIONS_ACCEPTED,
        LISTENER_CONNECTIONS_REJECTED,
        LISTENER_CONNECTIONS_ACTIVE,
        LISTENER_CONNECTIONS_CLOSED,
        LISTENER_ACCEPT_ERRORS,
        LISTENER_BYTES_FROM_CLIENTS,
        LISTENER_BYTES_TO_CLIENTS,
    ];
    let udp_only = [
        UDP_FLOWS_ACTIVE,
        UDP_FLOWS_CREATED,
        UDP_FLOWS_EXPIRED,
        UDP_DATAGRAMS_FROM_CLIENTS,
        UDP_DATAGRAMS_TO_CLIENTS,
        UDP_BYTES_FROM_CLIENTS,
        UDP_BYTES_TO_CLIENTS,
        UDP_DATAGRAMS_DROPPED,
        UDP_UPSTREAM_SOCKETS_REUSED,
        UDP_UPSTREAM_SOCKETS_SPARE,
    ];
    for name in tcp_only {
        assert!(series_of(&text, name, "db") > 0, "{name} of db:\n{text}");
        assert_eq!(series_of(&text, name, "dns"), 0, "{name} of dns:\n{text}");
    }
    for name in udp_only {
        assert!(series_of(&text, name, "dns") > 0, "{name} of dns:\n{text}");
        assert_eq!(series_of(&text, name, "db"), 0, "{name} of db:\n{text}");
    }
    assert_eq!(sample(&text, LISTENER_CONNECTIONS_ACCEPTED, &db), Some(1.0));
    assert_eq!(sample(&text, LISTENER_BYTES_FROM_CLIENTS, &db), Some(5.0));
    assert_eq!(sample(&text, UDP_FLOWS_CREATED, &dns), Some(1.0));
    assert_eq!(sample(&text, UDP_DATAGRAMS_FROM_CLIENTS, &dns), Some(1.0));
    assert_eq!(sample(&text, UDP_BYTES_FROM_CLIENTS, &dns), Some(5.0));

    // The status document: connections for the TCP listener, flows for the UDP one.
    let s = get(admin, "/api/v1/status").await.json();
    let listener = |name: &str| {
        s["listeners"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["name"] == name)
            .unwrap_or_else(|| panic!("no listener {name} in {s}"))
            .clone()
    };
    let (db, dns) = (listener("db"), listener("dns"));
    assert_eq!(db["connections"]["accepted"], 1, "{db}");
    assert!(db["udp"].is_null(), "{db}");
    assert!(dns["connections"].is_null(), "{dns}");
    assert_eq!(dns["udp"]["flows"]["created"], 1, "{dns}");
    assert_eq!(dns["bytes"]["from_clients"], 5, "{dns}");
}

#[tokio::test]
async fn reload_refuses_a_udp_listener_on_the_address_of_one_it_removes() {
    let echo = udp_echo().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("switchyard.yaml");
    // A free port for the listener whose address the reloads try to reuse.
    let fixed = free_addr();
    let yaml = |listeners: &str| {
        format!(
            "listeners:\n{listeners}pools:\n  - name: p\n    backends: [{{ name: e, address: \"{echo}\" }}]\n"
        )
    };
    let other = "  - { name: other, bind: 127.0.0.1:0, protocol: udp, pool: p }\n";
    write_file(
        &path,
        &yaml(&format!(
            "  - {{ name: dns, bind: \"{fixed}\", protocol: udp, pool: p }}\n{other}"
        )),
    );
    let lb = Balancer::start_file(&path).await;
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    udp_round_trip(&client, fixed, b"before").await;

    // Renamed on the same address; and another listener moved to the address dns leaves.
    let renamed = yaml(&format!(
        "  - {{ name: dns2, bind: \"{fixed}\", protocol: udp, pool: p }}\n{other}"
    ));
    let moved = yaml(&format!(
        "  - {{ name: other, bind: \"{fixed}\", protocol: udp, pool: p }}\n"
    ));
    for (text, name) in [(renamed, "dns2"), (moved, "other")] {
        write_file(&path, &text);
        let e = lb
            .control
            .reload()
            .await
            .expect_err("a udp listener on a removed one's address")
            .to_string();
        assert!(
            e.contains(&format!(
                "listener \"{name}\": udp {fixed} is still served by listener \"dns\""
            )),
            "{e}"
        );
        assert!(e.contains("cannot be renamed"), "{e}");
    }
    assert_eq!(lb.control.reload_status().failed, 2);
    // The running config stays: dns serves its address, old and new clients alike.
    assert_eq!(lb.control.local_addr("dns"), Some(fixed));
    assert!(lb.control.local_addr("other").is_some());
    assert!(lb.control.local_addr("dns2").is_none());
    udp_round_trip(&client, fixed, b"after").await;
    let fresh = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    udp_round_trip(&fresh, fixed, b"new").await;
}

#[tokio::test]
async fn reload_refuses_a_udp_listener_on_the_address_of_one_still_draining() {
    let echo = udp_echo().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("switchyard.yaml");
    let fixed = free_addr();
    let yaml = |listeners: &str| {
        format!(
            "listeners:\n{listeners}  - {{ name: other, bind: 127.0.0.1:0, protocol: udp, pool: p }}\npools:\n  - name: p\n    backends: [{{ name: e, address: \"{echo}\" }}]\n"
        )
    };
    let on_fixed = |name: &str| {
        format!("  - {{ name: {name}, bind: \"{fixed}\", protocol: udp, pool: p, udp: {{ idle_timeout: 5s }} }}\n")
    };
    write_file(&path, &yaml(&on_fixed("dns")));
    let lb = Balancer::start_file(&path).await;
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    udp_round_trip(&client, fixed, b"before").await;

    // Reload 1 removes dns; its flow goes on, so its socket stays bound.
    write_file(&path, &yaml(""));
    let changes = lb.control.reload().await.expect("removing dns");
    assert_eq!(changes.removed, vec!["dns".to_string()]);
    udp_round_trip(&client, fixed, b"still relayed").await;

    // Reload 2, well within the flow's idle_timeout, puts a listener on that address.
    write_file(&path, &yaml(&on_fixed("dns2")));
    let e = lb
        .control
        .reload()
        .await
        .expect_err("a udp listener on a draining one's address")
        .to_string();
    assert!(
        e.contains(&format!(
            "listener \"dns2\": udp {fixed} is still served by listener \"dns\", which an earlier reload removed"
        )),
        "{e}"
    );
    assert!(e.contains("at most udp.idle_timeout (5s)"), "{e}");
    assert!(lb.control.local_addr("dns2").is_none());

    // Once the flow has been idle that long, dns's socket closes and the same reload passes.
    let changes = within("dns to drain", async {
        loop {
            match lb.control.reload().await {
                Ok(changes) => break changes,
                Err(e) => {
                    let e = e.to_string();
                    assert!(e.contains("still served by listener \"dns\""), "{e}");
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
            }
        }
    })
    .await;
    assert_eq!(changes.added, vec!["dns2".to_string()]);
    assert_eq!(lb.control.local_addr("dns2"), Some(fixed));
    let fresh = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    udp_round_trip(&fresh, fixed, b"new").await;
}

#[tokio::test]
async fn access_log_records_connections_turned_away_at_max_connections() {
    let a = Backend::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let yaml = config(
        &[("a", a.addr, 1)],
        &format!("access_log:\n  path: {}\n  format: json\n", log.display()),
    )
    .replace(
        "    pool: p\npools:",
        "    pool: p\n    max_connections: 1\npools:",
    );
    let mut lb = Balancer::start(&yaml).await;
    let held = greet(TcpStream::connect(lb.addr("l")).await.unwrap()).await;
    let mut extra = TcpStream::connect(lb.addr("l")).await.unwrap();
    assert!(read_to_end(&mut extra).await.is_empty());
    drop(held);
    wait_for("held connection closed", || {
        lb.counter("switchyard_listener_connections_closed_total", &[]) == 1
    })
    .await;
    lb.begin_shutdown();
    lb.finished().await;
    let text = std::fs::read_to_string(&log).expect("access log");
    let records: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 2, "{text}");
    let refused: Vec<_> = records
        .iter()
        .filter(|r| r["reason"] == "refused")
        .collect();
    assert_eq!(refused.len(), 1, "{text}");
    assert_eq!(refused[0]["refused"], "max_connections");
    assert!(refused[0]["backend"].is_null());
    assert_eq!(
        lb.counter(
            "switchyard_listener_connections_rejected_total",
            &[("reason", "max_connections")]
        ),
        1
    );
}

#[tokio::test]
async fn access_log_writes_one_record_per_connection() {
    let a = Backend::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    for (format, check) in [("json", true), ("text", false)] {
        let log = dir.path().join(format!("access-{format}.log"));
        let mut lb = Balancer::start(&config(
            &[("a", a.addr, 1)],
            &format!(
                "access_log:\n  path: {}\n  format: {format}\n",
                log.display()
            ),
        ))
        .await;
        for i in 0..3u8 {
            let (_, mut s) = greet(TcpStream::connect(lb.addr("l")).await.unwrap()).await;
            s.get_mut()
                .write_all(&vec![i; 10 + i as usize])
                .await
                .unwrap();
            s.get_mut().shutdown().await.unwrap();
            read_to_end(&mut s).await;
        }
        wait_for("connections closed", || {
            lb.counter("switchyard_listener_connections_closed_total", &[]) == 3
        })
        .await;
        lb.begin_shutdown();
        lb.finished().await;
        let text = std::fs::read_to_string(&log).expect("access log");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        if check {
            let r: serde_json::Value = serde_json::from_str(lines[2]).unwrap();
            assert_eq!(r["listener"], "l");
            assert_eq!(r["pool"], "p");
            assert_eq!(r["backend"], "a");
            assert_eq!(r["backend_address"], a.addr.to_string());
            assert_eq!(r["bytes_from_client"], 12);
            assert_eq!(r["bytes_to_client"], 2 + 12);
            assert_eq!(r["reason"], "client_closed");
            assert!(r["client"].as_str().unwrap().starts_with("127.0.0.1:"));
            assert!(r["sni"].is_null());
        } else {
            assert!(lines[0].starts_with("time="), "{}", lines[0]);
            assert!(
                lines[0].contains(" listener=l client=127.0.0.1:"),
                "{}",
                lines[0]
            );
            assert!(
                lines[0].contains(" bytes_from_client=10 bytes_to_client=12 "),
                "{}",
                lines[0]
            );
        }
        assert_eq!(lb.counter("switchyard_access_log_records_total", &[]), 3);
        assert_eq!(lb.counter("switchyard_access_log_dropped_total", &[]), 0);
    }
}

#[tokio::test]
async fn readyz_is_unavailable_once_shutdown_begins() {
    let a = Backend::start("a").await;
    let mut lb = Balancer::start(&format!(
        "global:\n  shutdown_grace: 30s\n{}",
        config(&[("a", a.addr, 1)], "")
    ))
    .await;
    let admin = lb.admin.unwrap();
    let (_, held) = greet(TcpStream::connect(lb.addr("l")).await.unwrap()).await;
    lb.begin_shutdown();
    wait_for("not ready", || !lb.control.is_ready()).await;
    // The admin server still answers while connections drain.
    let r = get(admin, "/readyz").await;
    assert_eq!((r.status, r.body.as_str()), (503, "not ready\n"));
    assert_eq!(get(admin, "/healthz").await.status, 200);
    // A reload now would bind listeners again: refused.
    let r = post(admin, "/api/v1/reload", None, "{}").await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(r.body.contains("shutting down"), "{}", r.body);
    drop(held);
    lb.finished().await;
}

#[tokio::test]
async fn every_weight_zero_through_the_api_refuses_new_connections_cleanly() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    for balance in ["round_robin", "maglev", "least_conn", "random_two"] {
        let lb = Balancer::start(&config(&[("a", a.addr, 1), ("b", b.addr, 1)], "").replace(
            "    backends:\n",
            &format!("    balance: {balance}\n    backends:\n"),
        ))
        .await;
        let admin = lb.admin.unwrap();
        for name in ["a", "b"] {
            let r = post(
                admin,
                &format!("/api/v1/pools/p/backends/{name}/weight"),
                None,
                r#"{"weight":0}"#,
            )
            .await;
            assert_eq!(r.status, 200, "{balance}: {}", r.body);
        }
        let mut s = TcpStream::connect(lb.addr("l")).await.unwrap();
        assert!(read_to_end(&mut s).await.is_empty(), "{balance}");
        wait_for("no_backend counted", || {
            lb.counter(
                "switchyard_listener_connections_closed_total",
                &[("reason", "no_backend")],
            ) == 1
        })
        .await;
        let s = get(admin, "/api/v1/status").await.json();
        assert_eq!(backend(&s, "p", "a")["weight"], 0, "{balance}");
    }
}

#[tokio::test]
async fn reload_closes_connections_of_removed_backends_only_in_close_connections_pools() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let c = Backend::start("c").await;
    let d = Backend::start("d").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("switchyard.yaml");
    let yaml = |close: &[&Backend], keep: &[&Backend]| {
        let list = |bs: &[&Backend]| {
            bs.iter()
                .map(|x| format!("{{ name: {}, address: \"{}\" }}", x.name, x.addr))
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(
            "listeners:\n  - {{ name: lc, bind: 127.0.0.1:0, pool: pc }}\n  - {{ name: lk, bind: 127.0.0.1:0, pool: pk }}\npools:\n  - name: pc\n    on_backend_down: close_connections\n    backends: [{}]\n  - name: pk\n    backends: [{}]\n",
            list(close),
            list(keep)
        )
    };
    write_file(&path, &yaml(&[&a, &b], &[&c, &d]));
    let lb = Balancer::start_file(&path).await;
    let (first, mut to_a) = greet(TcpStream::connect(lb.addr("lc")).await.unwrap()).await;
    assert_eq!(first, "a");
    let (second, mut to_b) = greet(TcpStream::connect(lb.addr("lc")).await.unwrap()).await;
    assert_eq!(second, "b");
    let (third, mut to_c) = greet(TcpStream::connect(lb.addr("lk")).await.unwrap()).await;
    assert_eq!(third, "c");

    // a leaves the close_connections pool, c leaves the keep pool.
    write_file(&path, &yaml(&[&b], &[&d]));
    lb.control.reload().await.expect("reload");

    let rest = read_to_end(&mut to_a).await;
    assert!(
        rest.is_empty(),
        "the removed backend's connection is closed"
    );
    wait_for("backend_down close counted", || {
        lb.counter(
            "switchyard_listener_connections_closed_total",
            &[("reason", "backend_down")],
        ) == 1
    })
    .await;
    // The kept backend of that pool, and the removed one of a keep pool, go on.
    for held in [&mut to_b, &mut to_c] {
        held.get_mut().write_all(b"still").await.unwrap();
        let mut buf = [0u8; 5];
        within("echo", held.read_exact(&mut buf)).await.unwrap();
        assert_eq!(&buf, b"still");
    }
    assert_eq!(backend_of(lb.addr("lc")).await, "b");
    assert_eq!(backend_of(lb.addr("lk")).await, "d");
    // The removed backends' series leave /metrics; the kept one keeps its count.
    let text = lb.shared.metrics.encode_text();
    for gone in ["backend=\"a\"", "backend=\"c\""] {
        assert!(!text.contains(gone), "{gone} still exported:\n{text}");
    }
    assert_eq!(
        lb.counter(
            "switchyard_backend_connect_attempts_total",
            &[("pool", "pc"), ("backend", "b")]
        ),
        2
    );
}

#[tokio::test]
async fn readyz_waits_for_the_first_checks() {
    // Accepts TCP connections and holds them, never answering, until released: the mongodb
    // check of this backend waits for a reply (its timeout is an hour), so its first check
    // cannot end before the test releases it.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        tokio::pin!(released);
        loop {
            tokio::select! {
                _ = &mut released => return,
                accepted = silent.accept() => {
                    if let Ok((stream, _)) = accepted {
                        held.push(stream);
                    }
                }
            }
        }
    });
    let a = Backend::start("a").await;
    let yaml = format!(
        "admin:\n  bind: 127.0.0.1:0\nlisteners:\n  - {{ name: l, bind: 127.0.0.1:0, pool: p }}\npools:\n  - name: p\n    health_check: {{ type: mongodb, interval: 1h, timeout: 1h, mongodb: {{ role: any }} }}\n    backends: [{{ name: silent, address: \"{silent_addr}\" }}]\n  - name: q\n    backends: [{{ name: a, address: \"{}\" }}]\n",
        a.addr
    );
    let lb = Balancer::start(&yaml).await;
    let admin = lb.admin.unwrap();
    let state = lb.shared.backend_state("p", "silent").unwrap();
    let r = get(admin, "/readyz").await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (503, "not ready\n"),
        "ready before the first check"
    );
    assert_eq!(get(admin, "/api/v1/status").await.json()["ready"], false);
    assert!(state.last_check().is_none());
    // Closing the held connections ends the check (failed, but run).
    release.send(()).unwrap();
    holder.await.unwrap();
    wait_for("first check", || state.last_check().is_some()).await;
    wait_for("ready", || lb.control.is_ready()).await;
    let r = get(admin, "/readyz").await;
    assert_eq!((r.status, r.body.as_str()), (200, "ready\n"));
    assert_eq!(get(admin, "/api/v1/status").await.json()["ready"], true);
}

#[tokio::test]
async fn drain_keeps_connections_even_in_a_close_connections_pool() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let yaml = config(&[("a", a.addr, 1), ("b", b.addr, 1)], "").replace(
        "  - name: p\n",
        "  - name: p\n    on_backend_down: close_connections\n",
    );
    let lb = Balancer::start(&yaml).await;
    let admin = lb.admin.unwrap();
    let addr = lb.addr("l");
    let (first, mut to_a) = greet(TcpStream::connect(addr).await.unwrap()).await;
    assert_eq!(first, "a");
    let r = post(
        admin,
        "/api/v1/pools/p/backends/a/state",
        None,
        r#"{"state":"drain"}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    for _ in 0..3 {
        assert_eq!(backend_of(addr).await, "b");
    }
    // Drain is not down: the open connection to a goes on.
    to_a.get_mut().write_all(b"drained").await.unwrap();
    let mut buf = [0u8; 7];
    within("echo", to_a.read_exact(&mut buf)).await.unwrap();
    assert_eq!(&buf, b"drained");
    assert_eq!(
        lb.counter(
            "switchyard_listener_connections_closed_total",
            &[("reason", "backend_down")]
        ),
        0
    );
    // Maint on the same backend closes it.
    let r = post(
        admin,
        "/api/v1/pools/p/backends/a/state",
        None,
        r#"{"state":"maint"}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(read_to_end(&mut to_a).await.is_empty());
}
