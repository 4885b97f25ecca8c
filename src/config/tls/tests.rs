//! TLS passthrough, PROXY protocol and ACL keys: the good config, and each rejection with
//! file, line, column and key path.

use super::super::Config;
use super::*;

const GOOD: &str = "\
listeners:
  - name: tls
    bind: 127.0.0.1:8443
    tls_passthrough:
      client_hello_timeout: 2s
      postgres: true
      require_tls: true
      routes:
        - sni: [DB.example.com.]
          alpn: [postgresql]
          pool: pg
        - sni: [\"*.example.com\"]
          pool: web
      default_pool: web
    proxy_protocol: v2
    accept_proxy_protocol:
      from: [10.0.0.0/8, \"::1\"]
      timeout: 1s
    allow: [0.0.0.0/0]
    deny: [192.0.2.0/24]
  - name: plain
    bind: 127.0.0.1:8000
    pool: pg
pools:
  - name: pg
    backends: [{ address: 127.0.0.1:5432 }]
  - name: web
    balance: maglev
    hash_key: sni
    backends: [{ address: 127.0.0.1:8080 }]
";

fn err(text: &str) -> String {
    match Config::from_yaml(text, "config.yaml") {
        Ok(_) => panic!("expected an error for:\n{text}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn good_config() {
    let c = Config::from_yaml(GOOD, "config.yaml").unwrap_or_else(|e| panic!("{e}"));
    let l = &c.listeners[0];
    let t = l.tls_passthrough.as_ref().expect("tls");
    assert_eq!(t.client_hello_timeout, Duration::from_secs(2));
    assert!(t.postgres && t.require_tls);
    assert_eq!(
        t.routes[0].sni,
        [SniPattern::Exact("db.example.com".into())]
    );
    assert_eq!(t.routes[0].alpn, [b"postgresql".to_vec()]);
    assert_eq!(
        t.routes[1].sni,
        [SniPattern::Wildcard("example.com".into())]
    );
    assert_eq!(t.default_pool.as_deref(), Some("web"));
    assert_eq!(l.pool, "web", "the default pool is the listener's own");
    assert_eq!(l.proxy_protocol, ProxyProtocolMode::V2);
    let a = l.accept_proxy_protocol.as_ref().expect("accept");
    assert_eq!(a.from.len(), 2);
    assert_eq!(a.timeout, Duration::from_secs(1));
    assert_eq!(l.acl.allow.len(), 1);
    assert_eq!(l.acl.deny[0].to_string(), "192.0.2.0/24");
    assert_eq!(c.pools[1].hash_key, HashKey::Sni);
    // Defaults.
    let p = &c.listeners[1];
    assert!(p.tls_passthrough.is_none() && p.accept_proxy_protocol.is_none());
    assert_eq!(p.proxy_protocol, ProxyProtocolMode::None);
    assert!(p.acl.is_empty());
    assert!(super::super::unused_pools(&c).is_empty());
}

#[test]
fn default_timeouts() {
    let text = GOOD
        .replace("      client_hello_timeout: 2s\n", "")
        .replace("      timeout: 1s\n", "");
    let c = Config::from_yaml(&text, "config.yaml").unwrap_or_else(|e| panic!("{e}"));
    let l = &c.listeners[0];
    assert_eq!(
        l.tls_passthrough.as_ref().map(|t| t.client_hello_timeout),
        Some(DEFAULT_CLIENT_HELLO_TIMEOUT)
    );
    assert_eq!(
        l.accept_proxy_protocol.as_ref().map(|a| a.timeout),
        Some(DEFAULT_PROXY_HEADER_TIMEOUT)
    );
}

#[test]
fn unknown_pool_in_a_route() {
    let text = GOOD.replace("          pool: pg\n", "          pool: pgg\n");
    assert_eq!(
        err(&text),
        "config.yaml:11:17: listeners[0].tls_passthrough.routes[0].pool: no pool named \"pgg\", expected one of: pg, web"
    );
    let text = GOOD.replace("default_pool: web", "default_pool: nope");
    assert_eq!(
        err(&text),
        "config.yaml:14:21: listeners[0].tls_passthrough.default_pool: no pool named \"nope\", expected one of: pg, web"
    );
}

#[test]
fn bad_wildcards_and_names() {
    for (bad, wanted) in [
        ("\"*\"", "invalid wildcard \"*\""),
        ("\"a.*.example.com\"", "invalid wildcard"),
        ("\"*a.example.com\"", "invalid wildcard"),
        ("\"*.*.example.com\"", "invalid wildcard"),
        (
            "\"bad name\"",
            "invalid server name \"bad name\", expected a DNS name",
        ),
        ("\"*.\"", "invalid server name"),
    ] {
        let text = GOOD.replace("\"*.example.com\"", bad);
        let e = err(&text);
        assert!(
            e.starts_with("config.yaml:12:17: listeners[0].tls_passthrough.routes[1].sni[0]: "),
            "{e}"
        );
        assert!(e.contains(wanted), "{bad}: {e}");
    }
}

#[test]
fn duplicate_sni() {
    let text = GOOD.replace(
        "[\"*.example.com\"]",
        "[\"*.example.com\", \"*.EXAMPLE.com.\"]",
    );
    assert_eq!(
        err(&text),
        "config.yaml:12:34: listeners[0].tls_passthrough.routes[1].sni[1]: \"*.EXAMPLE.com.\" is already routed by an earlier entry; each name goes to one pool"
    );
    // The same name with different ALPN lists is fine.
    let text = GOOD.replace("[\"*.example.com\"]", "[db.example.com]");
    assert!(Config::from_yaml(&text, "config.yaml").is_ok());
}

#[test]
fn bad_cidrs() {
    assert_eq!(
        err(&GOOD.replace("deny: [192.0.2.0/24]", "deny: [192.0.2.1/24]")),
        "config.yaml:20:12: listeners[0].deny[0]: \"192.0.2.1/24\" has host bits set, expected the network address 192.0.2.0/24"
    );
    assert_eq!(
        err(&GOOD.replace("allow: [0.0.0.0/0]", "allow: [0.0.0.0/40]")),
        "config.yaml:19:13: listeners[0].allow[0]: invalid prefix length in \"0.0.0.0/40\", expected 0 to 32"
    );
    let e = err(&GOOD.replace(
        "from: [10.0.0.0/8, \"::1\"]",
        "from: [10.0.0.0/8, localhost]",
    ));
    assert!(
        e.starts_with("config.yaml:17:26: listeners[0].accept_proxy_protocol.from[1]: invalid CIDR \"localhost\""),
        "{e}"
    );
    let e = err(&GOOD.replace("from: [10.0.0.0/8, \"::1\"]", "from: []"));
    assert!(
        e.contains("accept_proxy_protocol.from: no trusted peers"),
        "{e}"
    );
}

#[test]
fn other_rejections() {
    let e = err(&GOOD.replace("proxy_protocol: v2", "proxy_protocol: v3"));
    assert!(
        e.starts_with("config.yaml:15:21: listeners[0].proxy_protocol: unknown value \"v3\", expected one of none, v1, v2"),
        "{e}"
    );
    let e = err(&GOOD.replace("client_hello_timeout: 2s", "client_hello_timeout: 0s"));
    assert!(e.starts_with("config.yaml:5:29: listeners[0].tls_passthrough.client_hello_timeout: 0 would close every connection"), "{e}");
    let e = err(&GOOD.replace("      postgres: true\n", ""));
    assert!(e.starts_with("config.yaml:6:20: listeners[0].tls_passthrough.require_tls: require_tls applies to postgres: true"), "{e}");
    let e = err(&GOOD.replace(
        "    tls_passthrough:\n",
        "    pool: pg\n    tls_passthrough:\n",
    ));
    assert!(
        e.starts_with(
            "config.yaml:4:11: listeners[0].pool: a tls_passthrough listener chooses pools by SNI"
        ),
        "{e}"
    );
    let e = err(&GOOD.replace(
        "    bind: 127.0.0.1:8000\n    pool: pg\n",
        "    bind: 127.0.0.1:8000\n",
    ));
    assert!(
        e.starts_with("config.yaml:21:9: listeners[1]: missing key \"pool\""),
        "{e}"
    );
    let e = err(&GOOD.replace("          alpn: [postgresql]\n", "          alpn: [\"\"]\n"));
    assert!(e.starts_with("config.yaml:10:18: listeners[0].tls_passthrough.routes[0].alpn[0]: invalid ALPN protocol"), "{e}");
    let e = err(&GOOD.replace("        - sni: [DB.example.com.]\n", "        - sni: []\n"));
    assert!(e.contains("routes[0].sni: no server names"), "{e}");
    let e = err(&GOOD.replace(
        "      default_pool: web\n",
        "      default_pool: web\n      sni: x\n",
    ));
    assert!(e.starts_with("config.yaml:15:7: listeners[0].tls_passthrough.sni: unknown key \"sni\", expected one of client_hello_timeout"), "{e}");
    let no_routes = "listeners:\n  - name: t\n    bind: 127.0.0.1:1\n    tls_passthrough: {postgres: true}\npools:\n  - {name: p, backends: [{address: 127.0.0.1:2}]}\n";
    let e = err(no_routes);
    assert!(
        e.starts_with(
            "config.yaml:4:22: listeners[0].tls_passthrough: no routes and no default_pool"
        ),
        "{e}"
    );
}

#[test]
fn sni_hash_key_needs_a_tls_listener() {
    let text = GOOD.replace("    pool: pg\npools:", "    pool: web\npools:");
    assert_eq!(
        err(&text),
        "config.yaml:29:15: pools[1].hash_key: hash_key: sni needs a server name, but listener \"plain\" forwards to this pool without tls_passthrough; expected client_ip or client_ip_port"
    );
    // Outside maglev, hash_key: sni is ignored (and noted), so nothing needs a server name.
    let text = GOOD
        .replace("    pool: pg\npools:", "    pool: web\npools:")
        .replace("    balance: maglev\n", "");
    let c = Config::from_yaml(&text, "config.yaml").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.pools[1].hash_key, HashKey::ClientIp);
    assert_eq!(c.pools[1].ignored_hash_key, Some(HashKey::Sni));
}
