//! Unit tests of the routing step: the SNI router (exact before wildcard, ALPN, default
//! pool), refusal labels, and telling an untrusted PROXY header apart.

use super::*;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::state::Shared;
use crate::tls::sni::build_client_hello;

const YAML: &str = r#"
listeners:
  - name: tls
    bind: 127.0.0.1:0
    tls_passthrough:
      routes:
        - sni: [db.example.com]
          alpn: [postgresql]
          pool: pg
        - sni: [db.example.com, "*.db.example.com"]
          pool: db
        - sni: ["*.example.com"]
          pool: web
        - sni: [API.example.com.]
          pool: api
      default_pool: fallback
pools:
  - { name: pg, backends: [{ address: "127.0.0.1:1" }] }
  - { name: db, backends: [{ address: "127.0.0.1:2" }] }
  - { name: web, backends: [{ address: "127.0.0.1:3" }] }
  - { name: api, backends: [{ address: "127.0.0.1:4" }] }
  - { name: fallback, backends: [{ address: "127.0.0.1:5" }] }
"#;

fn with_router(f: impl FnOnce(&SniRouter)) {
    let config = Config::from_yaml(YAML, "t.yaml").unwrap_or_else(|e| panic!("{e}"));
    let shared = Shared::new(config, Metrics::new());
    let snapshot = shared.snapshot();
    let route = snapshot.route("tls").expect("route");
    assert!(route.routing.is_active());
    f(route.routing.tls.as_ref().expect("tls router"));
}

fn pool_for(router: &SniRouter, sni: Option<&str>, alpn: &[&[u8]]) -> String {
    let hello = crate::tls::sni::parse(&build_client_hello(sni, alpn, 0));
    let Ok(Parsed::Complete(hello)) = hello else {
        panic!("hello: {hello:?}")
    };
    router
        .choose(Some(&hello))
        .map(|p| p.config.name.clone())
        .unwrap_or_else(|| "-".into())
}

#[test]
fn exact_before_wildcard_alpn_and_default() {
    with_router(|r| {
        assert_eq!(pool_for(r, Some("db.example.com"), &[]), "db");
        assert_eq!(pool_for(r, Some("DB.EXAMPLE.COM."), &[b"h2"]), "db");
        assert_eq!(pool_for(r, Some("db.example.com"), &[b"postgresql"]), "pg");
        assert_eq!(
            pool_for(r, Some("api.example.com"), &[]),
            "api",
            "exact beats *.example.com"
        );
        assert_eq!(pool_for(r, Some("www.example.com"), &[]), "web");
        assert_eq!(
            pool_for(r, Some("r1.db.example.com"), &[]),
            "db",
            "nearest wildcard"
        );
        assert_eq!(
            pool_for(r, Some("a.b.c.example.com"), &[]),
            "fallback",
            "one label only"
        );
        assert_eq!(pool_for(r, Some("example.com"), &[]), "fallback");
        assert_eq!(pool_for(r, Some("other.org"), &[]), "fallback");
        assert_eq!(pool_for(r, None, &[]), "fallback", "no SNI");
        assert_eq!(r.select("nothing.test", &[]), None);
    });
}

#[test]
fn no_default_pool_means_no_route() {
    let yaml = YAML.replace("      default_pool: fallback\n", "");
    let config = Config::from_yaml(&yaml, "t.yaml").unwrap_or_else(|e| panic!("{e}"));
    let shared = Shared::new(config, Metrics::new());
    let snapshot = shared.snapshot();
    let router = snapshot
        .route("tls")
        .and_then(|r| r.routing.tls.as_ref())
        .expect("router");
    assert_eq!(pool_for(router, Some("other.org"), &[]), "-");
    assert_eq!(pool_for(router, None, &[]), "-");
    // The listener's own pool (for logs) is the first route's.
    assert_eq!(snapshot.route("tls").expect("route").pool.config.name, "pg");
}

#[test]
fn refusal_labels_are_indexed_in_order() {
    for (i, r) in Refusal::ALL.iter().enumerate() {
        assert_eq!(*r as usize, i);
        assert!(!r.as_str().is_empty());
    }
}

#[test]
fn untrusted_proxy_header_is_told_apart_from_other_garbage() {
    let v1 = b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n";
    let v2 = crate::proxy_protocol::encode(crate::proxy_protocol::Version::V2, &Header::Local);
    assert_eq!(untrusted_first_bytes(v1), Screen::Refuse);
    assert_eq!(untrusted_first_bytes(&v2), Screen::Refuse);
    assert_eq!(untrusted_first_bytes(&v1[..6]), Screen::Refuse);
    // A part of a signature: wait for more.
    assert_eq!(untrusted_first_bytes(&v1[..3]), Screen::NeedMore);
    assert_eq!(untrusted_first_bytes(&v2[..11]), Screen::NeedMore);
    // Anything else is data: at once, on its first byte.
    assert_eq!(untrusted_first_bytes(b"PROXX"), Screen::Forward);
    assert_eq!(untrusted_first_bytes(b"G"), Screen::Forward);
    assert_eq!(untrusted_first_bytes(&[22]), Screen::Forward);
    assert_eq!(
        untrusted_first_bytes(&crate::tls::postgres::SSL_REQUEST),
        Screen::Forward
    );
    assert_eq!(
        hello_refusal(HelloError::NotHandshake(b'G')),
        Refusal::NotTls
    );
    assert_eq!(hello_refusal(HelloError::TooLarge), Refusal::HelloTooLarge);
    assert_eq!(
        hello_refusal(HelloError::Malformed("x")),
        Refusal::HelloMalformed
    );
}
