//! Health-check settings: each rejection names file:line:col and key path.

use super::*;
use crate::config::Config;

#[test]
fn secret_debug_is_masked() {
    let s = Secret::new("hunter2".into());
    assert_eq!(format!("{s:?}"), "Secret(***)");
    let check = PostgresCheck {
        user: "monitor".into(),
        password: Some(s),
        database: "postgres".into(),
        role: PostgresRole::Primary,
        max_replication_lag: None,
        sslmode: SslMode::Disable,
        on_multiple_primaries: OnMultiplePrimaries::NewestTimeline,
    };
    assert!(!format!("{check:?}").contains("hunter2"));
}

/// One listener and two pools; `extra` is added to pool "app" from line 8 on.
fn config(extra: &str) -> String {
    format!(
        "listeners:\n  - name: app\n    bind: 127.0.0.1:7000\n    pool: app\npools:\n  - name: app\n    backends: [{{address: 127.0.0.1:8001}}]\n{extra}  - name: other\n    backends: [{{address: 127.0.0.1:8002}}]\n"
    )
}

fn err(extra: &str) -> String {
    match Config::from_yaml(&config(extra), "config.yaml") {
        Ok(_) => panic!("expected an error for:\n{extra}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn full_postgres_check_is_read() {
    std::env::set_var("SWITCHYARD_CONFIG_TEST_PW", "s3cret");
    let c = Config::from_yaml(
        &config(
            "    on_backend_down: close_connections\n    fallback_pool: other\n    health_check:\n      type: postgres\n      interval: 1s\n      timeout: 800ms\n      rise: 3\n      fall: 4\n      initial_state: up\n      postgres:\n        user: monitor\n        password_env: SWITCHYARD_CONFIG_TEST_PW\n        role: replica\n        max_replication_lag: 10s\n        sslmode: require\n",
        ),
        "config.yaml",
    )
    .expect("valid");
    let p = &c.pools[0];
    assert_eq!(p.on_backend_down, OnBackendDown::CloseConnections);
    assert_eq!(p.fallback_pool.as_deref(), Some("other"));
    let h = p.health_check.as_ref().expect("check");
    assert_eq!(
        (h.interval, h.timeout, h.rise, h.fall, h.initial_up),
        (
            Duration::from_secs(1),
            Duration::from_millis(800),
            3,
            4,
            true
        )
    );
    let CheckKind::Postgres(pg) = &h.kind else {
        panic!("postgres check expected");
    };
    assert_eq!(pg.password.as_ref().map(Secret::expose), Some("s3cret"));
    assert_eq!(pg.database, "postgres");
    assert_eq!(pg.role, PostgresRole::Replica);
    assert_eq!(pg.max_replication_lag, Some(Duration::from_secs(10)));
    assert!(
        !format!("{c:?}").contains("s3cret"),
        "Debug masks the password"
    );
    // Defaults: no check, keep connections.
    assert!(c.pools[1].health_check.is_none());
    assert_eq!(c.pools[1].on_backend_down, OnBackendDown::Keep);
}

#[test]
fn other_check_types_are_read() {
    let c = Config::from_yaml(
        &config("    health_check: {type: udp, udp: {send_hex: \"de ad:BE ef\", expect_hex_prefix: \"00\"}}\n"),
        "config.yaml",
    )
    .expect("valid");
    let h = c.pools[0].health_check.as_ref().expect("check");
    assert_eq!(
        h.kind,
        CheckKind::Udp(UdpCheck {
            send: vec![0xde, 0xad, 0xbe, 0xef],
            expect_prefix: vec![0]
        })
    );
    assert_eq!(
        (h.interval, h.timeout, h.rise, h.fall),
        (DEFAULT_CHECK_INTERVAL, DEFAULT_CHECK_TIMEOUT, 2, 2)
    );
    let c = Config::from_yaml(
        &config("    health_check: {type: dns, dns: {name: example.com., qtype: aaaa}}\n"),
        "config.yaml",
    )
    .expect("valid");
    assert_eq!(
        c.pools[0].health_check.as_ref().expect("check").kind,
        CheckKind::Dns(DnsCheck {
            name: "example.com".into(),
            qtype: 28
        })
    );
    let c = Config::from_yaml(&config("    health_check: {type: none}\n"), "config.yaml")
        .expect("valid");
    assert!(c.pools[0].health_check.is_none());
}

#[test]
fn unknown_check_type() {
    assert_eq!(
        err("    health_check:\n      type: http\n"),
        "config.yaml:9:13: pools[0].health_check.type: unknown value \"http\", expected one of none, tcp, postgres, mongodb, udp, dns"
    );
}

#[test]
fn role_on_a_tcp_check() {
    assert_eq!(
        err("    health_check:\n      type: tcp\n      role: primary\n"),
        "config.yaml:10:13: pools[0].health_check.role: role is not a setting of a tcp check; roles exist only for type: postgres and type: mongodb"
    );
    assert_eq!(
        err("    health_check:\n      type: tcp\n      postgres: {role: primary}\n"),
        "config.yaml:10:17: pools[0].health_check.postgres: postgres settings apply only to type: postgres, and this check is type: tcp"
    );
    let e = err("    health_check:\n      type: postgres\n      role: primary\n");
    assert!(e.contains("write it under postgres:"), "{e}");
}

#[test]
fn missing_credentials() {
    assert_eq!(
        err("    health_check:\n      type: postgres\n"),
        "config.yaml:9:11: pools[0].health_check: a postgres check needs postgres: settings (at least user)"
    );
    assert_eq!(
        err("    health_check:\n      type: postgres\n      postgres:\n        role: primary\n"),
        "config.yaml:11:13: pools[0].health_check.postgres: missing user, expected the monitoring role to log in as (user: monitor)"
    );
    let e = err("    health_check:\n      type: postgres\n      postgres:\n        user: monitor\n        password_env: SWITCHYARD_TEST_SURELY_UNSET\n");
    assert_eq!(
        e,
        "config.yaml:12:23: pools[0].health_check.postgres.password_env: environment variable SWITCHYARD_TEST_SURELY_UNSET is not set (or not UTF-8), expected it to hold the password"
    );
    let e = err("    health_check:\n      type: postgres\n      postgres:\n        user: monitor\n        password_file: /nonexistent/pw\n");
    assert!(
        e.starts_with("config.yaml:12:24: pools[0].health_check.postgres.password_file: cannot read /nonexistent/pw:"),
        "{e}"
    );
    let e = err("    health_check:\n      type: postgres\n      postgres: {user: m, password_env: A, password_file: B}\n");
    assert!(
        e.contains("pools[0].health_check.postgres.password_file: give password_env or password_file, not both"),
        "{e}"
    );
}

#[test]
fn role_specific_settings() {
    let e = err("    health_check: {type: postgres, postgres: {user: m, role: primary, max_replication_lag: 5s}}\n");
    assert!(
        e.contains("pools[0].health_check.postgres.max_replication_lag: max_replication_lag applies to replicas"),
        "{e}"
    );
    let e = err("    health_check: {type: postgres, postgres: {user: m, role: replica, on_multiple_primaries: reject}}\n");
    assert!(
        e.contains("on_multiple_primaries applies only to role: primary"),
        "{e}"
    );
    let e = err("    health_check: {type: postgres, postgres: {user: m, role: leader}}\n");
    assert!(
        e.contains("pools[0].health_check.postgres.role: unknown value \"leader\", expected one of primary, replica, any"),
        "{e}"
    );
    let e = err("    health_check: {type: mongodb, mongodb: {role: replica}}\n");
    assert!(
        e.contains("unknown value \"replica\", expected one of primary, secondary, any"),
        "{e}"
    );
}

#[test]
fn timing_and_threshold_ranges() {
    let e = err("    health_check: {type: tcp, interval: 1s, timeout: 2s}\n");
    assert!(
        e.contains("pools[0].health_check.timeout: 2s is out of range, expected a positive duration no longer than interval (1s)"),
        "{e}"
    );
    let e = err("    health_check: {type: tcp, rise: 0}\n");
    assert!(
        e.contains("pools[0].health_check.rise: 0 is out of range, expected 1 to 100"),
        "{e}"
    );
    let e = err("    health_check: {type: tcp, interval: 0s}\n");
    assert!(
        e.contains("pools[0].health_check.interval: 0 is not usable"),
        "{e}"
    );
    let e = err("    health_check: {type: none, interval: 1s}\n");
    assert!(
        e.contains("pools[0].health_check.interval: interval has no effect with type: none"),
        "{e}"
    );
}

#[test]
fn udp_and_dns_settings() {
    let e = err("    health_check: {type: udp, udp: {send_hex: \"zz\"}}\n");
    assert!(
        e.contains("pools[0].health_check.udp.send_hex: invalid hex \"zz\""),
        "{e}"
    );
    let e = err("    health_check: {type: udp}\n");
    assert!(
        e.contains("a udp check needs udp: settings (send_hex and expect_hex_prefix)"),
        "{e}"
    );
    let e = err("    health_check: {type: dns, dns: {name: example.com, qtype: AXFR}}\n");
    assert!(
        e.contains(
            "pools[0].health_check.dns.qtype: unknown value \"AXFR\", expected one of A, NS"
        ),
        "{e}"
    );
    let e = err("    health_check: {type: dns, dns: {name: \"a..b\"}}\n");
    assert!(
        e.contains("pools[0].health_check.dns.name: invalid DNS name \"a..b\""),
        "{e}"
    );
}

#[test]
fn fallback_pool_and_on_backend_down() {
    assert_eq!(
        err("    fallback_pool: nope\n"),
        "config.yaml:8:20: pools[0].fallback_pool: no pool named \"nope\", expected one of: other"
    );
    let e = err("    fallback_pool: app\n");
    assert!(
        e.contains("pools[0].fallback_pool: pool \"app\" cannot be its own fallback"),
        "{e}"
    );
    let e = err("    on_backend_down: shutdown\n");
    assert!(
        e.contains("pools[0].on_backend_down: unknown value \"shutdown\", expected keep or close_connections"),
        "{e}"
    );
}

#[test]
fn proxy_protocol_for_checks() {
    use crate::proxy_protocol::Version;
    let check = |extra: &str| {
        Config::from_yaml(&config(extra), "config.yaml")
            .expect("valid")
            .pools[0]
            .health_check
            .clone()
            .expect("check")
    };
    let h = check("    health_check: {type: tcp}\n");
    assert_eq!((h.proxy_protocol, h.proxy_protocol_explicit), (None, false));
    assert_eq!(h.proxy_header(), None);
    let h = check("    health_check: {type: tcp, proxy_protocol: v1}\n");
    assert_eq!(h.proxy_protocol, Some(Version::V1));
    assert_eq!(h.proxy_header().as_deref(), Some(&b"PROXY UNKNOWN\r\n"[..]));
    let h = check("    health_check: {type: mongodb, proxy_protocol: v2}\n");
    let mut local = crate::proxy_protocol::V2_SIGNATURE.to_vec();
    local.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
    assert_eq!(h.proxy_header(), Some(local));
    let h =
        check("    health_check: {type: postgres, proxy_protocol: none, postgres: {user: m}}\n");
    assert_eq!((h.proxy_protocol, h.proxy_protocol_explicit), (None, true));
}

#[test]
fn proxy_protocol_rejections() {
    assert_eq!(
        err("    health_check:\n      type: tcp\n      proxy_protocol: v3\n"),
        "config.yaml:10:23: pools[0].health_check.proxy_protocol: unknown value \"v3\", expected one of none, v1, v2"
    );
    assert_eq!(
        err("    health_check:\n      type: udp\n      proxy_protocol: v2\n      udp: {send_hex: \"00\"}\n"),
        "config.yaml:10:23: pools[0].health_check.proxy_protocol: a udp check sends datagrams, and a PROXY header is sent only on TCP connections (tcp, postgres, mongodb checks); remove it"
    );
    let e = err("    health_check: {type: dns, proxy_protocol: v1, dns: {name: example.com}}\n");
    assert!(
        e.starts_with(
            "config.yaml:8:47: pools[0].health_check.proxy_protocol: a dns check sends datagrams"
        ),
        "{e}"
    );
    let e = err("    health_check: {type: none, proxy_protocol: v1}\n");
    assert!(
        e.contains(
            "pools[0].health_check.proxy_protocol: proxy_protocol has no effect with type: none"
        ),
        "{e}"
    );
}

#[test]
fn checks_behind_a_proxy_protocol_listener_are_noted() {
    let notes = |listener: &str, app: &str| {
        let yaml = format!(
            "listeners:\n  - {{name: app, bind: 127.0.0.1:7000, pool: app{listener}}}\npools:\n  - name: app\n    backends: [{{address: 127.0.0.1:8001}}]\n    fallback_pool: other\n{app}  - name: other\n    backends: [{{address: 127.0.0.1:8002}}]\n    health_check: {{type: postgres, postgres: {{user: m}}}}\n"
        );
        crate::config::proxy_protocol_notes(&Config::from_yaml(&yaml, "c.yaml").expect("valid"))
    };
    // The pool and its fallback get headers; both checks send none.
    let n = notes(", proxy_protocol: v2", "    health_check: {type: tcp}\n");
    assert_eq!(n.len(), 2, "{n:?}");
    assert_eq!(
        n[0],
        "pools[0].health_check: listener \"app\" sends PROXY v2 headers to pool \"app\", and its tcp check sends none; set proxy_protocol: v2 if the backends require the header, or proxy_protocol: none if they accept connections without it"
    );
    assert!(n[1].starts_with("pools[1].health_check: listener \"app\" sends PROXY v2 headers to pool \"other\", and its postgres check"), "{n:?}");
    // A check that says what it sends, either way, is deliberate.
    let n = notes(
        ", proxy_protocol: v1",
        "    health_check: {type: tcp, proxy_protocol: none}\n",
    );
    assert_eq!(n.len(), 1, "{n:?}");
    assert!(n[0].starts_with("pools[1]"), "{n:?}");
    // No header from the listener, or no TCP check: nothing to say.
    assert!(notes("", "    health_check: {type: tcp}\n").is_empty());
    assert!(notes(
        ", proxy_protocol: none",
        "    health_check: {type: udp, udp: {send_hex: \"00\"}}\n"
    )
    .is_empty());
}

#[test]
fn fallback_is_one_hop_for_the_proxy_protocol_notes() {
    // a falls back to b, b to c, c to a: a loop is valid, and connections to a's listener
    // never reach c (a fallback pool's own fallback is not used).
    let yaml = "listeners:\n  - {name: l, bind: 127.0.0.1:7000, pool: a, proxy_protocol: v2}\npools:\n  - name: a\n    backends: [{address: 127.0.0.1:8001}]\n    fallback_pool: b\n    health_check: {type: tcp, proxy_protocol: v2}\n  - name: b\n    backends: [{address: 127.0.0.1:8002}]\n    fallback_pool: c\n    health_check: {type: tcp, proxy_protocol: v2}\n  - name: c\n    backends: [{address: 127.0.0.1:8003}]\n    fallback_pool: a\n    health_check: {type: tcp}\n";
    let config = Config::from_yaml(yaml, "c.yaml").expect("a fallback loop is valid");
    let notes = crate::config::proxy_protocol_notes(&config);
    assert!(notes.is_empty(), "{notes:?}");
}

#[test]
fn mongodb_tls_is_off_unless_asked_for() {
    let kind = |extra: &str| {
        let config = Config::from_yaml(&config(extra), "config.yaml").expect("valid");
        match config.pools[0].health_check.as_ref().map(|h| &h.kind) {
            Some(CheckKind::Mongodb(m)) => m.tls,
            other => panic!("not a mongodb check: {other:?}"),
        }
    };
    assert!(!kind("    health_check: {type: mongodb}\n"));
    assert!(kind(
        "    health_check: {type: mongodb, mongodb: {tls: true}}\n"
    ));
    let e = err("    health_check: {type: mongodb, mongodb: {tls: required}}\n");
    assert!(
        e.contains("pools[0].health_check.mongodb.tls: invalid type: string \"required\", expected a boolean"),
        "{e}"
    );
}
