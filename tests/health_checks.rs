//! tcp, udp and dns checks against real sockets on loopback; `initial_state: up`;
//! `fallback_pool`; and probers following published snapshots (what a reload does).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use switchyard::backend::{DownReason, HealthStatus};
use switchyard::config::Config;
use switchyard::metrics::names;
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

fn down(r: DownReason) -> HealthStatus {
    HealthStatus::down(r)
}

/// A UDP server answering each datagram with `reply(datagram)` (None: stay silent).
async fn udp_server(reply: fn(&[u8]) -> Option<Vec<u8>>) -> (SocketAddr, JoinHandle<()>) {
    let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind udp");
    let addr = socket.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
            if let Some(answer) = reply(&buf[..n]) {
                let _ = socket.send_to(&answer, peer).await;
            }
        }
    });
    (addr, task)
}

fn pong(datagram: &[u8]) -> Option<Vec<u8>> {
    (datagram == b"PING").then(|| b"PONG from test".to_vec())
}

fn wrong(_: &[u8]) -> Option<Vec<u8>> {
    Some(b"NOPE".to_vec())
}

/// A tiny authoritative server for example.com: NOERROR (with one A record) for it,
/// NXDOMAIN for any other name. Questions are read from the wire as a resolver sends them.
fn dns(query: &[u8]) -> Option<Vec<u8>> {
    if query.len() < 12 || query[2] & 0x80 != 0 {
        return None;
    }
    let mut at = 12;
    let mut labels = Vec::new();
    while at < query.len() && query[at] != 0 {
        let len = query[at] as usize;
        labels.push(String::from_utf8_lossy(query.get(at + 1..at + 1 + len)?).to_lowercase());
        at += 1 + len;
    }
    let question_end = at + 5;
    let question = query.get(12..question_end)?;
    let known = labels.join(".") == "example.com";
    let mut r = query[..2].to_vec();
    r.push(0x81 | (query[2] & 0x01)); // QR, AA-less, RD copied
    r.push(if known { 0x80 } else { 0x83 }); // RA, rcode 0 or 3
    r.extend_from_slice(&[0, 1, 0, u8::from(known), 0, 0, 0, 0]);
    r.extend_from_slice(question);
    if known {
        r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 127, 0, 0, 1]);
    }
    Some(r)
}

#[tokio::test]
async fn udp_and_dns_checks_against_real_servers() {
    let (pong_addr, _a) = udp_server(pong).await;
    let (wrong_addr, _b) = udp_server(wrong).await;
    let closed = free_addr();
    let (dns_addr, _c) = udp_server(dns).await;
    let fast = "interval: 200ms, timeout: 200ms, rise: 1, fall: 1";
    let yaml = format!(
        r#"
listeners: [ {{ name: l, bind: "127.0.0.1:0", pool: udp }} ]
pools:
  - name: udp
    health_check: {{ type: udp, {fast}, udp: {{ send_hex: "50494e47", expect_hex_prefix: "504f4e47" }} }}
    backends:
      - {{ name: pong, address: "{pong_addr}" }}
      - {{ name: wrong, address: "{wrong_addr}" }}
      - {{ name: closed, address: "{closed}" }}
  - name: dns
    health_check: {{ type: dns, {fast}, dns: {{ name: Example.COM, qtype: A }} }}
    backends: [ {{ name: ok, address: "{dns_addr}" }} ]
  - name: dns-nx
    health_check: {{ type: dns, {fast}, dns: {{ name: missing.example, qtype: AAAA }} }}
    backends: [ {{ name: nx, address: "{dns_addr}" }} ]
"#
    );
    let lb = Balancer::start(&yaml).await;
    wait_status(&lb, "udp", "pong", HealthStatus::UP).await;
    // A reply with other bytes is no answer: the check runs out of time.
    wait_status(&lb, "udp", "wrong", down(DownReason::Timeout)).await;
    // Nothing listens: the kernel's ICMP port-unreachable surfaces as refused.
    wait_status(&lb, "udp", "closed", down(DownReason::Unreachable)).await;
    wait_status(&lb, "dns", "ok", HealthStatus::UP).await;
    wait_status(&lb, "dns-nx", "nx", down(DownReason::CheckError)).await;
    assert!(
        lb.counter(
            names::HEALTH_CHECKS,
            &[("pool", "dns"), ("check", "dns"), ("result", "up")]
        ) >= 1
    );
}

#[tokio::test]
async fn tcp_check_rise_fall_initial_state_and_fallback() {
    let a = Backend::start("a").await;
    let spare = Backend::start("spare").await;
    let gone = refused_addr();
    let yaml = format!(
        r#"
listeners: [ {{ name: l, bind: "127.0.0.1:0", pool: main }} ]
pools:
  - name: main
    fallback_pool: spare
    health_check: {{ type: tcp, interval: 500ms, timeout: 500ms, rise: 2, fall: 2 }}
    backends: [ {{ name: a, address: "{}" }} ]
  - name: optimistic
    health_check: {{ type: tcp, interval: 1h, timeout: 1s, fall: 2, initial_state: up }}
    backends: [ {{ name: gone, address: "{gone}" }} ]
  - name: spare
    backends: [ {{ name: spare, address: "{}" }} ]
"#,
        a.addr, spare.addr
    );
    let lb = Balancer::start(&yaml).await;
    // initial_state: up holds until `fall` failures; one has happened, one interval (1h) away.
    let optimistic = lb.shared.backend_state("optimistic", "gone").expect("gone");
    let t = Instant::now();
    while optimistic.last_check().is_none() {
        assert!(t.elapsed() < LIMIT, "first check never ran");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        optimistic.last_check().expect("check").result,
        down(DownReason::Unreachable)
    );
    assert_eq!(optimistic.status(), HealthStatus::UP);

    wait_status(&lb, "main", "a", HealthStatus::UP).await;
    assert_eq!(backend_of(lb.addr("l")).await, "a");
    a.stop();
    wait_status(&lb, "main", "a", down(DownReason::Unreachable)).await;
    // No backend of main is up: the fallback pool serves.
    assert_eq!(backend_of(lb.addr("l")).await, "spare");
    assert_eq!(lb.counter(names::POOL_FALLBACK, &[("pool", "main")]), 1);
    let state = |s: &str| {
        lb.counter(
            names::BACKEND_STATE,
            &[("pool", "main"), ("backend", "a"), ("state", s)],
        )
    };
    assert_eq!((state("up"), state("down"), state("standby")), (0, 1, 0));
    assert_eq!(
        lb.counter(
            names::BACKEND_DOWN_REASON,
            &[
                ("pool", "main"),
                ("backend", "a"),
                ("reason", "unreachable")
            ]
        ),
        1
    );
    // It comes back on the same address after `rise` passes.
    let _a2 = Backend::start_on(a.addr, "a-again").await;
    wait_status(&lb, "main", "a", HealthStatus::UP).await;
    assert_eq!(backend_of(lb.addr("l")).await, "a-again");
}

#[tokio::test]
async fn probers_follow_published_snapshots() {
    let gone = refused_addr();
    let up = Backend::start("up").await;
    let with_check = |interval: &str| {
        format!(
            r#"
listeners: [ {{ name: l, bind: "127.0.0.1:0", pool: p }} ]
pools:
  - name: p
    health_check: {{ type: tcp, interval: {interval}, timeout: 500ms, rise: 1, fall: 1 }}
    backends: [ {{ name: gone, address: "{gone}" }}, {{ name: up, address: "{}" }} ]
"#,
            up.addr
        )
    };
    let lb = Balancer::start(&with_check("500ms")).await;
    wait_status(&lb, "p", "gone", down(DownReason::Unreachable)).await;
    wait_status(&lb, "p", "up", HealthStatus::UP).await;
    assert_eq!(lb.shared.health.probers(), 2);

    // The same config again: probers keep running, state is kept.
    let config = |yaml: &str| Config::from_yaml(yaml, "reload.yaml").expect("valid");
    lb.shared.publish(config(&with_check("500ms")));
    assert_eq!(lb.shared.health.probers(), 2);
    assert_eq!(
        lb.shared.backend_state("p", "gone").expect("gone").status(),
        down(DownReason::Unreachable)
    );

    // The check removed: nothing keeps the backend down any more.
    let without = with_check("500ms").replace(
        "health_check: { type: tcp, interval: 500ms, timeout: 500ms, rise: 1, fall: 1 }",
        "health_check: { type: none }",
    );
    lb.shared.publish(config(&without));
    assert_eq!(lb.shared.health.probers(), 0);
    assert_eq!(
        lb.shared.backend_state("p", "gone").expect("gone").status(),
        HealthStatus::UP
    );
    let came_up = [("pool", "p"), ("backend", "gone"), ("state", "up")];
    assert_eq!(
        lb.counter(names::BACKEND_STATE_CHANGES, &came_up),
        1,
        "the change made by the reload is counted"
    );

    // Back again with another interval: new probers find it down.
    lb.shared.publish(config(&with_check("750ms")));
    wait_status(&lb, "p", "gone", down(DownReason::Unreachable)).await;
    assert_eq!(lb.shared.health.probers(), 2);
    assert_eq!(backend_of(lb.addr("l")).await, "up");
}

#[test]
fn readme_postgres_cluster_config_is_valid() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let section = readme
        .split("## Front a Postgres cluster")
        .nth(1)
        .expect("the README has a \"Front a Postgres cluster\" section");
    let yaml = section
        .split("```yaml\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("a yaml block");
    std::env::set_var("PG_MONITOR_PASSWORD", "example");
    let config = Config::from_yaml(yaml, "README.md").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.listeners.len(), 2);
    assert_eq!(config.pools.len(), 2);
    assert!(config
        .pools
        .iter()
        .all(|p| p.health_check.is_some() && p.backends.len() == 3));
    assert_eq!(config.pools[1].fallback_pool.as_deref(), Some("pg-write"));
}

/// Every YAML example in README.md is a valid config. A block the text calls a fragment
/// (or says leaves something out) is completed first: a listener when it has none, a pool
/// for each pool it names but does not define, a backend for `backends: [...]`. A block
/// the text presents as whole must be valid as it is.
#[test]
fn readme_yaml_examples_are_valid_configs() {
    use serde_yaml::Value;
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    std::env::set_var("PG_MONITOR_PASSWORD", "example");
    std::env::set_var("SWITCHYARD_ADMIN_TOKEN", "an-example-admin-token");
    let mut checked = 0;
    let mut rest = readme.as_str();
    while let Some(start) = rest.find("```yaml\n") {
        // The paragraph that introduces the block, on one line.
        let intro = rest[..start].trim_end().rsplit("\n\n").next().unwrap_or("");
        let intro = intro.split_whitespace().collect::<Vec<_>>().join(" ");
        let body = &rest[start + "```yaml\n".len()..];
        let end = body.find("```").expect("a closed yaml block");
        let block = &body[..end];
        rest = &body[end + 3..];
        checked += 1;
        let fragment = ["fragment", "left out", "added to a config"]
            .iter()
            .any(|w| intro.contains(w));
        let mut yaml = block.replace("[...]", "[{ address: \"127.0.0.1:9\" }]");
        let mut filled = Vec::new();
        let result = loop {
            let error = match Config::from_yaml(&yaml, "README.md") {
                Ok(config) => break Ok(config),
                Err(e) => e.to_string(),
            };
            if !fragment || filled.len() > 10 {
                break Err(error);
            }
            let mut doc: Value = serde_yaml::from_str(&yaml).expect("README yaml parses");
            let map = doc.as_mapping_mut().expect("a mapping");
            let missing_pool = error
                .split("no pool named \"")
                .nth(1)
                .and_then(|s| s.split('"').next())
                .map(str::to_string);
            let (key, entry) = if error.contains("no listeners") {
                (
                    "listeners",
                    "{ name: filled, bind: \"127.0.0.1:0\", pool: filled }".to_string(),
                )
            } else if let Some(pool) = missing_pool {
                (
                    "pools",
                    format!("{{ name: \"{pool}\", backends: [{{ address: \"127.0.0.1:9\" }}] }}"),
                )
            } else {
                break Err(error);
            };
            filled.push(format!("{key}: {entry}"));
            let entry: Value = serde_yaml::from_str(&entry).expect("filler");
            match map
                .entry(Value::from(key))
                .or_insert_with(|| Value::Sequence(Vec::new()))
            {
                Value::Sequence(items) => items.push(entry),
                other => panic!("{key} is not a list: {other:?}"),
            }
            yaml = serde_yaml::to_string(&doc).expect("yaml");
        };
        if let Err(e) = result {
            panic!(
                "README yaml block {checked} (fragment: {fragment}, filled {filled:?}) is not a valid config: {e}\n{block}"
            );
        }
    }
    assert!(checked >= 6, "found {checked} yaml blocks in README.md");
}
