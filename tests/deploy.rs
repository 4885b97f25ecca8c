//! The shipped monitoring files: the Grafana dashboard parses and every metric its queries
//! name is one the binary exports (`metrics::names::ALL`, itself checked against a live
//! scrape in tests/ops.rs); the alert rules name only exported metrics too, and promtool
//! (Debian's `prometheus` package) checks and unit-tests them. The systemd units pass
//! `systemd-analyze verify` and its offline security check, and the sysusers snippet creates
//! the user they run as. Tests whose tool is missing are skipped unless
//! `SWITCHYARD_REQUIRE_TOOLS=1`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use common::missing_tool;
use switchyard::metrics::names;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Metric names in a PromQL expression: identifiers with the project's prefixes (PromQL
/// functions, keywords and label names never carry them).
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        let starts_ident = (c.is_ascii_alphabetic() || c == b'_')
            && (i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_'));
        if starts_ident {
            let start = i;
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                i += 1;
            }
            // Skip label values and strings: an identifier inside quotes is not a metric.
            let quoted = expr[..start].matches('"').count() % 2 == 1;
            let ident = &expr[start..i];
            if !quoted && (ident.starts_with("switchyard_") || ident.starts_with("process_")) {
                out.push(ident.to_string());
            }
        } else {
            i += 1;
        }
    }
    out
}

/// Whether `name` is an exported family, or a histogram's `_bucket`/`_sum`/`_count` series.
fn is_exported(name: &str) -> bool {
    if names::ALL.contains(&name) {
        return true;
    }
    ["_bucket", "_sum", "_count"].iter().any(|suffix| {
        name.strip_suffix(suffix)
            .is_some_and(|base| names::ALL.contains(&base) && base.ends_with("_seconds"))
    })
}

fn collect_exprs(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "definition", serde_json::Value::String(s)) => out.push(s.clone()),
                    ("query", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

#[test]
fn dashboard_queries_name_only_exported_metrics() {
    let text = std::fs::read_to_string(Path::new(ROOT).join("deploy/grafana/switchyard.json"))
        .expect("dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("dashboard is JSON");
    assert_eq!(dashboard["uid"], "switchyard");
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    for p in panels {
        assert!(
            ids.insert(p["id"].as_i64().expect("panel id")),
            "duplicate panel id"
        );
        let grid = &p["gridPos"];
        assert!(grid["x"].as_i64().unwrap() + grid["w"].as_i64().unwrap() <= 24);
    }
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    assert!(exprs.len() > 30, "{} queries", exprs.len());
    let mut used = BTreeSet::new();
    for expr in &exprs {
        for name in metric_names(expr) {
            assert!(
                is_exported(&name),
                "dashboard query names {name}, which the binary does not export: {expr}"
            );
            used.insert(name);
        }
    }
    // The dashboard covers connections, throughput, backend states, check latency,
    // failovers and UDP flows.
    for needed in [
        names::LISTENER_CONNECTIONS_ACTIVE,
        names::LISTENER_BYTES_FROM_CLIENTS,
        names::BACKEND_STATE,
        "switchyard_health_check_duration_seconds_bucket",
        "switchyard_backend_connect_duration_seconds_bucket",
        names::POOL_RETRIES,
        // Failovers as the health checks see them: state changes, why, split brain.
        names::BACKEND_STATE_CHANGES,
        names::BACKEND_DOWN_REASON,
        names::POOL_SPLIT_BRAIN,
        names::POOL_FALLBACK,
        // UDP: flows, datagrams and drops.
        names::UDP_FLOWS_ACTIVE,
        names::UDP_FLOWS_CREATED,
        names::UDP_FLOWS_EXPIRED,
        names::UDP_DATAGRAMS_FROM_CLIENTS,
        names::UDP_DATAGRAMS_TO_CLIENTS,
        names::UDP_BYTES_FROM_CLIENTS,
        names::UDP_DATAGRAMS_DROPPED,
        names::BACKEND_UDP_UNREACHABLE,
    ] {
        assert!(used.contains(needed), "dashboard lacks {needed}");
    }
}

#[test]
fn alert_rules_name_only_exported_metrics() {
    let text = std::fs::read_to_string(Path::new(ROOT).join("deploy/prometheus/alerts.yaml"))
        .expect("alerts");
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).expect("alerts are YAML");
    let mut alerts = BTreeSet::new();
    for group in doc["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            let name = rule["alert"].as_str().expect("alert name");
            let expr = rule["expr"].as_str().expect("expr");
            let found = metric_names(expr);
            assert!(!found.is_empty(), "{name}: no metric in {expr}");
            for m in found {
                assert!(is_exported(&m), "{name} names {m}, which is not exported");
            }
            alerts.insert(name.to_string());
        }
    }
    for needed in [
        "SwitchyardBackendDown",
        "SwitchyardPoolNoBackendUp",
        "SwitchyardHighConnectFailures",
    ] {
        assert!(alerts.contains(needed), "missing alert {needed}");
    }
}

#[test]
fn promtool_checks_and_unit_tests_the_alert_rules() {
    let dir = Path::new(ROOT).join("deploy/prometheus");
    let Ok(version) = Command::new("promtool").arg("--version").output() else {
        missing_tool(
            "promtool_checks_and_unit_tests_the_alert_rules",
            "promtool not found (apt-get install prometheus; .ci/run installs it)",
        );
        return;
    };
    assert!(version.status.success());
    for args in [
        ["check", "rules", "alerts.yaml"],
        ["test", "rules", "alerts.test.yaml"],
    ] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("run promtool");
        assert!(
            out.status.success(),
            "promtool {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A unit file's `Key=value` lines, in order.
fn unit_settings(text: &str) -> Vec<(&str, &str)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .collect()
}

#[test]
fn systemd_units_verify_and_run_as_one_fixed_user() {
    let dir = Path::new(ROOT).join("deploy/systemd");
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).expect(name);
    let (plain, template) = (read("switchyard.service"), read("switchyard@.service"));
    // The template differs only where taking turns needs it.
    let only_in_template = [
        ("Description", "Switchyard L4 load balancer (%i)"),
        ("ExecStart", "/usr/local/bin/switchyard run -c /etc/switchyard/config.yaml --log-format json --takeover-if-running /run/switchyard/upgrade.sock"),
        ("RuntimeDirectoryPreserve", "yes"),
    ];
    let mut expected = unit_settings(&plain);
    expected.retain(|(k, _)| !["Description", "ExecStart"].contains(k));
    let mut shared = unit_settings(&template);
    shared.retain(|s| !only_in_template.contains(s));
    assert_eq!(shared, expected, "the units' shared settings differ");
    for s in only_in_template {
        assert!(
            unit_settings(&template).contains(&s),
            "template lacks {s:?}"
        );
    }
    for s in [
        ("User", "switchyard"),
        ("RuntimeDirectory", "switchyard"),
        ("LogsDirectory", "switchyard"),
        ("AmbientCapabilities", "CAP_NET_BIND_SERVICE"),
        ("Restart", "on-failure"),
    ] {
        assert!(unit_settings(&plain).contains(&s), "unit lacks {s:?}");
    }
    assert!(!plain.contains("DynamicUser"));
    // Longer than the default shutdown_grace (30s), so draining connections are not killed.
    let stop = unit_settings(&plain)
        .into_iter()
        .find(|(k, _)| *k == "TimeoutStopSec")
        .and_then(|(_, v)| v.parse::<u64>().ok())
        .expect("TimeoutStopSec in seconds");
    assert!(stop > 30, "TimeoutStopSec={stop}");

    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        missing_tool(
            "systemd_units_verify_and_run_as_one_fixed_user",
            "systemd-analyze not found (apt-get install systemd; .ci/run installs it)",
        );
        return;
    }
    // systemd-analyze checks that each command exists: point them at the built binary.
    let tmp = tempfile::tempdir().unwrap();
    for (name, text) in [
        ("switchyard.service", &plain),
        ("switchyard@.service", &template),
    ] {
        let path = tmp.path().join(name);
        let text = text.replace(
            "/usr/local/bin/switchyard",
            env!("CARGO_BIN_EXE_switchyard"),
        );
        std::fs::write(&path, text).unwrap();
        for args in [
            &["verify", "--man=no"][..],
            // Exposure 0 (locked down) to 10 (unprotected), times 10.
            &["security", "--offline=true", "--threshold=30"],
        ] {
            let out = Command::new("systemd-analyze")
                .args(args)
                .arg(&path)
                .output()
                .expect("run systemd-analyze");
            let stderr = String::from_utf8_lossy(&out.stderr);
            // verify reports unknown keys and bad values on stderr, yet exits 0.
            assert!(
                out.status.success() && stderr.trim().is_empty(),
                "systemd-analyze {} {name}:\n{stderr}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout)
            );
        }
    }
    // The sysusers snippet creates the user the units name.
    std::fs::create_dir(tmp.path().join("etc")).unwrap();
    let out = Command::new("systemd-sysusers")
        .arg(format!("--root={}", tmp.path().display()))
        .arg("-")
        .stdin(std::fs::File::open(dir.join("switchyard.sysusers.conf")).unwrap())
        .output()
        .expect("run systemd-sysusers");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let passwd = std::fs::read_to_string(tmp.path().join("etc/passwd")).unwrap();
    assert!(passwd.starts_with("switchyard:x:"), "{passwd}");
}

#[test]
fn metric_name_extraction() {
    assert_eq!(
        metric_names(
            r#"sum by (pool) (rate(switchyard_backend_connect_failures_total{state="switchyard_x"}[5m])) / process_open_fds"#
        ),
        [
            "switchyard_backend_connect_failures_total",
            "process_open_fds"
        ]
    );
    assert!(is_exported(
        "switchyard_backend_connect_duration_seconds_bucket"
    ));
    assert!(!is_exported(
        "switchyard_listener_connections_active_bucket"
    ));
    assert!(!is_exported("switchyard_nonexistent_total"));
}
