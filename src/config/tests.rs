//! Each rejected case gives a message with file, line, column and key path.

use super::*;

const GOOD: &str = "\
defaults:
  connect_timeout: 250ms
  idle_timeout: 1h
  retries: 2
listeners:
  - name: app
    bind: 127.0.0.1:7000
    pool: app
    max_connections: 10000
pools:
  - name: app
    balance: round_robin
    max_fails: 3
    fail_duration: 10s
    backends:
      - address: 127.0.0.1:8001
        weight: 1
      - address: \"[::1]:8002\"
        weight: 2
";

fn err(text: &str) -> String {
    match Config::from_yaml(text, "config.yaml") {
        Ok(_) => panic!("expected an error for:\n{text}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn good_config_with_defaults_inherited() {
    let c = Config::from_yaml(GOOD, "config.yaml").expect("valid");
    let l = &c.listeners[0];
    assert_eq!(l.bind, "127.0.0.1:7000".parse().expect("addr"));
    assert_eq!(l.idle_timeout, Duration::from_secs(3600));
    let p = &c.pools[0];
    assert_eq!(p.connect_timeout, Duration::from_millis(250));
    assert_eq!(p.retries, 2);
    assert_eq!(p.backends[1].weight, 2);
    assert_eq!(p.backends[1].name, "[::1]:8002");
    assert_eq!(c.global.shutdown_grace, DEFAULT_SHUTDOWN_GRACE);
}

#[test]
fn unknown_balance_value() {
    let text = GOOD.replace("balance: round_robin", "balance: leastconn");
    assert_eq!(
        err(&text),
        "config.yaml:12:14: pools[0].balance: unknown value \"leastconn\", expected one of round_robin, least_conn, maglev, random_two"
    );
}

#[test]
fn unknown_key() {
    let text = GOOD.replace("max_connections: 10000", "max_conections: 10000");
    let e = err(&text);
    assert!(
        e.starts_with(
            "config.yaml:9:5: listeners[0].max_conections: unknown key \"max_conections\""
        ),
        "{e}"
    );
}

#[test]
fn duplicate_names() {
    let text = format!("{GOOD}  - name: app\n    backends: [{{address: 127.0.0.1:1}}]\n");
    assert_eq!(
        err(&text),
        "config.yaml:20:11: pools[1].name: duplicate pool name \"app\""
    );
    let text = GOOD.replace(
        "pools:",
        "  - name: app\n    bind: 127.0.0.1:7001\n    pool: app\npools:",
    );
    assert_eq!(
        err(&text),
        "config.yaml:10:11: listeners[1].name: duplicate listener name \"app\""
    );
}

#[test]
fn missing_pool() {
    let text = GOOD.replace("    pool: app", "    pool: nope");
    assert_eq!(
        err(&text),
        "config.yaml:8:11: listeners[0].pool: no pool named \"nope\", expected one of: app"
    );
}

#[test]
fn pool_without_backends() {
    let text = "listeners: [{name: a, bind: 127.0.0.1:1, pool: p}]\npools:\n  - name: p\n    backends: []\n";
    assert_eq!(
        err(text),
        "config.yaml:4:15: pools[0].backends: no backends, expected at least one"
    );
}

#[test]
fn all_weights_zero() {
    let text = GOOD
        .replace("weight: 1", "weight: 0")
        .replace("weight: 2", "weight: 0");
    let e = err(&text);
    assert!(
        e.starts_with("config.yaml:16:7: pools[0].backends: every backend has weight 0"),
        "{e}"
    );
}

#[test]
fn bad_address() {
    let text = GOOD.replace("127.0.0.1:8001", "127.0.0.1:80x1");
    assert_eq!(
        err(&text),
        "config.yaml:16:18: pools[0].backends[0].address: invalid address \"127.0.0.1:80x1\", expected IP:port such as 127.0.0.1:5432 or [::1]:5432"
    );
}

#[test]
fn bad_duration() {
    let text = GOOD.replace("fail_duration: 10s", "fail_duration: 10 parsecs");
    let e = err(&text);
    assert!(
        e.starts_with("config.yaml:14:20: pools[0].fail_duration: invalid duration \"10 parsecs\""),
        "{e}"
    );
}

#[test]
fn two_listeners_on_one_address() {
    let text = GOOD.replace(
        "pools:",
        "  - name: other\n    bind: 0.0.0.0:7000\n    pool: app\npools:",
    );
    assert_eq!(
        err(&text),
        "config.yaml:11:11: listeners[1].bind: 0.0.0.0:7000 is already used by listener \"app\" (127.0.0.1:7000)"
    );
}

#[test]
fn hash_key_outside_maglev_is_ignored_with_a_note() {
    let text = GOOD.replace(
        "balance: round_robin",
        "balance: round_robin\n    hash_key: client_ip_port",
    );
    let c = Config::from_yaml(&text, "config.yaml").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.pools[0].hash_key, HashKey::ClientIp);
    assert_eq!(c.pools[0].ignored_hash_key, Some(HashKey::ClientIpPort));
    assert_eq!(
        notes(&c),
        ["pools[0].hash_key: hash_key: client_ip_port has no effect with balance: round_robin and is ignored; only maglev pools hash"]
    );
    // On a maglev pool it is used, and nothing is noted.
    let text = GOOD.replace(
        "balance: round_robin",
        "balance: maglev\n    hash_key: client_ip_port",
    );
    let c = Config::from_yaml(&text, "config.yaml").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.pools[0].hash_key, HashKey::ClientIpPort);
    assert_eq!(c.pools[0].ignored_hash_key, None);
    assert!(notes(&c).is_empty());
    assert!(notes(&Config::from_yaml(GOOD, "config.yaml").expect("valid")).is_empty());
}

#[test]
fn out_of_range_values() {
    let e = err(&GOOD.replace("weight: 2", "weight: 1000"));
    assert!(
        e.contains("pools[0].backends[1].weight: 1000 is out of range"),
        "{e}"
    );
    let e = err(&GOOD.replace("retries: 2", "retries: 99"));
    assert!(e.contains("defaults.retries: 99 is out of range"), "{e}");
    let e = err(&GOOD.replace(
        "balance: round_robin",
        "balance: maglev\n    maglev_table_size: 65536",
    ));
    assert!(
        e.contains("pools[0].maglev_table_size: 65536 is not usable, expected a prime"),
        "{e}"
    );
}

#[test]
fn syntax_error_and_empty_file() {
    let e = err("listeners: [\n");
    assert!(e.starts_with("config.yaml:"), "{e}");
    assert_eq!(
        err(""),
        "config.yaml: the file is empty, expected a mapping with listeners and pools"
    );
}

#[test]
fn missing_file_names_it() {
    let e = Config::from_file(Path::new("/nonexistent/switchyard.yaml")).expect_err("missing");
    assert!(
        e.to_string()
            .starts_with("/nonexistent/switchyard.yaml: cannot read:"),
        "{e}"
    );
}

#[test]
fn forward_config_builds() {
    let c = forward_config(
        "127.0.0.1:0",
        &["127.0.0.1:1".into(), "127.0.0.1:2".into()],
        Algorithm::LeastConn,
    )
    .expect("valid");
    assert_eq!(c.pools[0].backends.len(), 2);
    assert_eq!(c.pools[0].balance, Algorithm::LeastConn);
    let e =
        forward_config("127.0.0.1:0", &["nope".into()], Algorithm::RoundRobin).expect_err("bad");
    assert!(e.to_string().contains("invalid address \"nope\""), "{e}");
}
