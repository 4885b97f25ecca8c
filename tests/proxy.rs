//! PROXY protocol out (v1, v2; byte-exact, and parsed by a real nginx), PROXY protocol in
//! from trusted peers only (v1, v2, LOCAL, malformed, silent, untrusted), and source ACLs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "support/nginx.rs"]
mod nginx;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use nginx::Nginx;
use switchyard::proxy_protocol::{self, Header, Version};
use switchyard::tls::sni::build_client_hello;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

const REJECTED: &str = "switchyard_listener_connections_rejected_total";

/// A backend that reads everything until the client half-closes, keeps a copy, sends it all
/// back, closes.
struct Capture {
    addr: SocketAddr,
    /// What each connection sent, once it ended.
    seen: Arc<Mutex<Vec<Vec<u8>>>>,
    task: JoinHandle<()>,
}

impl Capture {
    async fn start() -> Capture {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let kept = Arc::clone(&seen);
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                let kept = Arc::clone(&kept);
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    let _ = s.read_to_end(&mut got).await;
                    kept.lock().unwrap().push(got.clone());
                    let _ = s.write_all(&got).await;
                    let _ = s.shutdown().await;
                });
            }
        });
        Capture { addr, seen, task }
    }

    /// Whether any connection so far carried `needle`.
    fn saw(&self, needle: &[u8]) -> bool {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .any(|got| got.windows(needle.len()).any(|w| w == needle))
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Sends `bytes` from `src_ip`, half-closes, returns what the backend saw.
async fn send_from(src_ip: &str, to: SocketAddr, bytes: &[u8]) -> (Vec<u8>, SocketAddr) {
    let mut s = connect_from(src_ip, to).await;
    let local = s.local_addr().expect("local");
    let _ = s.write_all(bytes).await;
    let _ = s.shutdown().await;
    let mut out = Vec::new();
    let _ = within("backend reply", s.read_to_end(&mut out)).await;
    (out, local)
}

fn tcp(source: SocketAddr, destination: SocketAddr) -> Header {
    Header::Tcp {
        source,
        destination,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_v1_and_v2_headers_byte_exact() {
    let backend = Capture::start().await;
    let yaml = format!(
        "listeners:
  - {{ name: v1, bind: 127.0.0.1:0, pool: p, proxy_protocol: v1 }}
  - {{ name: v2, bind: 127.0.0.1:0, pool: p, proxy_protocol: v2 }}
  - {{ name: none, bind: 127.0.0.1:0, pool: p, proxy_protocol: none }}
pools:
  - {{ name: p, backends: [{{ address: \"{}\" }}] }}
",
        backend.addr
    );
    let lb = Balancer::start(&yaml).await;
    let (seen, client) = send_from("127.0.0.2", lb.addr("v1"), b"hello").await;
    let line = format!(
        "PROXY TCP4 127.0.0.2 127.0.0.1 {} {}\r\nhello",
        client.port(),
        lb.addr("v1").port()
    );
    assert_eq!(String::from_utf8_lossy(&seen), line);

    let (seen, client) = send_from("127.0.0.3", lb.addr("v2"), b"hello").await;
    let mut wanted = proxy_protocol::encode(Version::V2, &tcp(client, lb.addr("v2")));
    assert_eq!(
        &wanted[..16],
        &[13, 10, 13, 10, 0, 13, 10, 81, 85, 73, 84, 10, 0x21, 0x11, 0, 12]
    );
    assert_eq!(&wanted[16..20], &[127, 0, 0, 3]);
    wanted.extend_from_slice(b"hello");
    assert_eq!(seen, wanted);

    let (seen, _) = send_from("127.0.0.1", lb.addr("none"), b"hello").await;
    assert_eq!(seen, b"hello");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_clients_get_tcp6_headers() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("\n\n*** SKIPPED: no IPv6 loopback (::1) ***\n");
        return;
    }
    let backend = Capture::start().await;
    let yaml = format!(
        "listeners:
  - {{ name: v1, bind: \"[::1]:0\", pool: p, proxy_protocol: v1 }}
  - {{ name: v2, bind: \"[::1]:0\", pool: p, proxy_protocol: v2 }}
pools:
  - {{ name: p, backends: [{{ address: \"{}\" }}] }}
",
        backend.addr
    );
    let lb = Balancer::start(&yaml).await;
    for (listener, version) in [("v1", Version::V1), ("v2", Version::V2)] {
        let addr = lb.addr(listener);
        let mut s = within("connect", TcpStream::connect(addr))
            .await
            .expect("connect");
        let client = s.local_addr().expect("local");
        s.write_all(b"six").await.expect("write");
        s.shutdown().await.expect("shutdown");
        let seen = read_to_end(&mut s).await;
        let mut wanted = proxy_protocol::encode(version, &tcp(client, addr));
        wanted.extend_from_slice(b"six");
        assert_eq!(seen, wanted, "{listener}");
        if version == Version::V1 {
            assert!(
                seen.starts_with(b"PROXY TCP6 ::1 ::1 "),
                "{}",
                String::from_utf8_lossy(&seen)
            );
        } else {
            assert_eq!(
                &seen[12..16],
                &[0x21, 0x21, 0x00, 0x24],
                "PROXY, TCP over IPv6, 36 bytes"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_reads_our_v1_and_v2_headers() {
    let (p1, p2) = (free_port(), free_port());
    let Some(nginx) = Nginx::start(
        &format!(
            "http {{
  access_log {{dir}}/access.log;
  client_body_temp_path {{dir}}/body;
  proxy_temp_path {{dir}}/proxy;
  fastcgi_temp_path {{dir}}/fastcgi;
  uwsgi_temp_path {{dir}}/uwsgi;
  scgi_temp_path {{dir}}/scgi;
  server {{
    listen 127.0.0.1:{p1} proxy_protocol;
    listen 127.0.0.1:{p2} proxy_protocol;
    location / {{ return 200 \"addr=$proxy_protocol_addr port=$proxy_protocol_port\\n\"; }}
  }}
}}
"
        ),
        &[p1, p2],
    ) else {
        return;
    };
    let yaml = format!(
        "listeners:
  - {{ name: v1, bind: 127.0.0.1:0, pool: n1, proxy_protocol: v1 }}
  - {{ name: v2, bind: 127.0.0.1:0, pool: n2, proxy_protocol: v2 }}
pools:
  - {{ name: n1, backends: [{{ address: \"127.0.0.1:{p1}\" }}] }}
  - {{ name: n2, backends: [{{ address: \"127.0.0.1:{p2}\" }}] }}
"
    );
    let lb = Balancer::start(&yaml).await;
    for (listener, src) in [("v1", "127.0.0.4"), ("v2", "127.0.0.5")] {
        let (reply, client) = send_from(
            src,
            lb.addr(listener),
            b"GET / HTTP/1.0\r\nHost: test\r\n\r\n",
        )
        .await;
        let reply = String::from_utf8_lossy(&reply);
        assert!(reply.starts_with("HTTP/1.1 200"), "{listener}: {reply}");
        assert!(
            reply.ends_with(&format!("addr={src} port={}\n", client.port())),
            "{listener}: nginx saw the client through the header: {reply}"
        );
    }
    // Stopped by its PID.
    drop(nginx);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepts_headers_from_trusted_peers_only() {
    let backend = Capture::start().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let yaml = format!(
        "access_log: {{ path: \"{}\", format: json }}
listeners:
  - name: in
    bind: 127.0.0.1:0
    pool: p
    proxy_protocol: v1
    accept_proxy_protocol:
      from: [127.0.0.2/32]
      timeout: 5s
  - name: silent
    bind: 127.0.0.1:0
    pool: p
    accept_proxy_protocol:
      from: [127.0.0.2/32]
      timeout: 300ms
  - name: tls
    bind: 127.0.0.1:0
    proxy_protocol: v2
    tls_passthrough: {{ default_pool: p }}
    accept_proxy_protocol:
      from: [127.0.0.2/32]
  - name: pg
    bind: 127.0.0.1:0
    tls_passthrough: {{ postgres: true, default_pool: p }}
    accept_proxy_protocol:
      from: [127.0.0.2/32]
pools:
  - {{ name: p, backends: [{{ address: \"{}\" }}] }}
",
        log.display(),
        backend.addr
    );
    let lb = Balancer::start(&yaml).await;
    let addr = lb.addr("in");

    // Trusted v1: the header's client goes on, in our own header, and the data follows.
    let (seen, _) = send_from(
        "127.0.0.2",
        addr,
        b"PROXY TCP4 203.0.113.7 198.51.100.1 5555 443\r\nhello",
    )
    .await;
    assert_eq!(
        String::from_utf8_lossy(&seen),
        "PROXY TCP4 203.0.113.7 198.51.100.1 5555 443\r\nhello"
    );

    // Trusted v2 (TCP6) in, v1 out.
    let mut v2 = proxy_protocol::encode(
        Version::V2,
        &tcp(
            "[2001:db8::7]:4000".parse().unwrap(),
            "[2001:db8::1]:443".parse().unwrap(),
        ),
    );
    v2.extend_from_slice(b"data");
    let (seen, _) = send_from("127.0.0.2", addr, &v2).await;
    assert_eq!(
        String::from_utf8_lossy(&seen),
        "PROXY TCP6 2001:db8::7 2001:db8::1 4000 443\r\ndata"
    );

    // Trusted v2 LOCAL (a health check): the real addresses are used.
    let mut local = proxy_protocol::encode(Version::V2, &Header::Local);
    local.extend_from_slice(b"hc");
    let (seen, client) = send_from("127.0.0.2", addr, &local).await;
    assert_eq!(
        String::from_utf8_lossy(&seen),
        format!(
            "PROXY TCP4 127.0.0.2 127.0.0.1 {} {}\r\nhc",
            client.port(),
            addr.port()
        )
    );

    // Trusted but malformed, or no header at all: closed, counted.
    let (seen, _) = send_from("127.0.0.2", addr, b"GET / HTTP/1.0\r\n\r\n").await;
    assert!(seen.is_empty());
    let (seen, _) = send_from("127.0.0.2", addr, b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 1\r\n").await;
    assert!(seen.is_empty());
    assert_eq!(
        lb.counter(
            REJECTED,
            &[("listener", "in"), ("reason", "proxy_malformed")]
        ),
        2
    );

    // Trusted and silent: closed after the header timeout (a listener of its own, with a
    // short one; nothing else is sent there).
    let mut silent = connect_from("127.0.0.2", lb.addr("silent")).await;
    assert!(read_to_end(&mut silent).await.is_empty());
    assert_eq!(
        lb.counter(
            REJECTED,
            &[("listener", "silent"), ("reason", "proxy_timeout")]
        ),
        1
    );

    // Untrusted: a direct client; its data goes on under its real address...
    let (seen, client) = send_from("127.0.0.3", addr, b"PROXIES\r\nx").await;
    assert_eq!(
        String::from_utf8_lossy(&seen),
        format!(
            "PROXY TCP4 127.0.0.3 127.0.0.1 {} {}\r\nPROXIES\r\nx",
            client.port(),
            addr.port()
        )
    );
    // ...but a PROXY header from it is refused, whole or split across segments, on every
    // kind of listener, and never reaches a backend.
    let spoofed = b"PROXY TCP4 9.9.9.9 9.9.9.9 1 1\r\nx";
    let (seen, _) = send_from("127.0.0.3", addr, spoofed).await;
    assert!(seen.is_empty(), "{}", String::from_utf8_lossy(&seen));
    let mut split = connect_from("127.0.0.3", addr).await;
    split.set_nodelay(true).unwrap();
    split.write_all(b"\r\n\r").await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let v2 = proxy_protocol::encode(
        Version::V2,
        &tcp("9.9.9.9:1".parse().unwrap(), "9.9.9.9:2".parse().unwrap()),
    );
    let _ = split.write_all(&v2[3..]).await;
    let mut rest = Vec::new();
    let _ = within("closed", split.read_to_end(&mut rest)).await;
    assert!(rest.is_empty());
    for listener in ["tls", "pg"] {
        let (seen, _) = send_from("127.0.0.3", lb.addr(listener), spoofed).await;
        assert!(seen.is_empty(), "{listener}");
    }
    for listener in ["in", "tls", "pg"] {
        let wanted = if listener == "in" { 2 } else { 1 };
        assert_eq!(
            lb.counter(
                REJECTED,
                &[("listener", listener), ("reason", "proxy_untrusted")]
            ),
            wanted,
            "{listener}"
        );
    }
    // Every backend connection has ended (the refused ones included) before looking.
    wait_for("backend connections end", || {
        backend.seen.lock().unwrap().len() as u64
            >= lb.counter("switchyard_backend_connect_attempts_total", &[])
    })
    .await;
    assert!(
        !backend.saw(b"9.9.9.9"),
        "a spoofed header reached the backend"
    );
    assert!(
        !backend.saw(&[9, 9, 9, 9]),
        "a spoofed header reached the backend"
    );
    // A trusted one is consumed and the ClientHello behind it routed; v2 goes out.
    let hello = build_client_hello(Some("db.example.com"), &[], 0);
    let mut bytes = b"PROXY TCP4 203.0.113.9 198.51.100.2 6000 443\r\n".to_vec();
    bytes.extend_from_slice(&hello);
    let (seen, _) = send_from("127.0.0.2", lb.addr("tls"), &bytes).await;
    let mut wanted = proxy_protocol::encode(
        Version::V2,
        &tcp(
            "203.0.113.9:6000".parse().unwrap(),
            "198.51.100.2:443".parse().unwrap(),
        ),
    );
    wanted.extend_from_slice(&hello);
    assert_eq!(seen, wanted);

    // The access log names the client the trusted PROXY headers gave, refused or not, and
    // the peer itself for the untrusted ones (four refused above).
    let wanted = ["203.0.113.7:5555", "[2001:db8::7]:4000", "203.0.113.9:6000"];
    let read_records = || -> Vec<serde_json::Value> {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let is_untrusted = |r: &&serde_json::Value| r["refused"] == "proxy_untrusted";
    wait_for("access log records", || {
        let records = read_records();
        wanted
            .iter()
            .all(|c| records.iter().any(|r| r["client"] == *c))
            && records.iter().filter(is_untrusted).count() == 4
    })
    .await;
    let records = read_records();
    for client in wanted {
        let r = records.iter().find(|r| r["client"] == client).unwrap();
        assert_ne!(r["reason"], "refused", "{r}");
    }
    // The spoofed header of an untrusted peer names no client.
    assert!(!records
        .iter()
        .any(|r| r["client"].as_str().unwrap().starts_with("9.9.9.9")));
    let untrusted: Vec<_> = records.iter().filter(is_untrusted).collect();
    for r in &untrusted {
        assert!(
            r["client"].as_str().unwrap().starts_with("127.0.0.3:"),
            "{r}"
        );
        assert_eq!(r["reason"], "refused", "{r}");
    }
}

/// A listener that trusts PROXY headers from 127.0.0.2 only (header `timeout` as given), in
/// front of a backend that greets first and then echoes.
async fn greeter_behind_screening_listener(timeout: &str) -> (Balancer, Backend) {
    let backend = Backend::start("greeter").await;
    let yaml = one_pool(
        "",
        &format!("    accept_proxy_protocol: {{ from: [127.0.0.2/32], timeout: {timeout} }}\n"),
        &[(backend.addr, 1)],
    );
    (Balancer::start(&yaml).await, backend)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_peers_are_screened_without_delaying_a_backend_that_speaks_first() {
    let (lb, _backend) = greeter_behind_screening_listener("5s").await;
    // The backend greets a client that has sent nothing (as MySQL and SMTP servers do)...
    let s = connect_from("127.0.0.3", lb.addr("l")).await;
    let (greeting, mut s) = greet(s).await;
    assert_eq!(greeting, "greeter");
    // ...and the client's answer is forwarded.
    s.get_mut().write_all(b"HELO x\r\n").await.unwrap();
    let mut echo = [0u8; 8];
    within("echo", s.read_exact(&mut echo)).await.unwrap();
    assert_eq!(&echo, b"HELO x\r\n");
    // A PROXY header as its first bytes, even after the greeting, closes it.
    let s = connect_from("127.0.0.3", lb.addr("l")).await;
    let (greeting, mut s) = greet(s).await;
    assert_eq!(greeting, "greeter");
    let _ = s
        .get_mut()
        .write_all(b"PROXY TCP4 9.9.9.9 9.9.9.9 1 1\r\n")
        .await;
    let mut rest = Vec::new();
    let _ = within("closed", s.read_to_end(&mut rest)).await;
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    assert_eq!(lb.counter(REJECTED, &[("reason", "proxy_untrusted")]), 1);
    assert_eq!(
        lb.counter(
            "switchyard_listener_connections_closed_total",
            &[("reason", "refused")]
        ),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_inside_an_untrusted_signature_closes_instead_of_forwarding() {
    let (lb, _backend) = greeter_behind_screening_listener("300ms").await;
    let s = connect_from("127.0.0.3", lb.addr("l")).await;
    let (greeting, mut s) = greet(s).await;
    assert_eq!(greeting, "greeter");
    // The start of a v1 signature, then silence past the timeout: had the held bytes gone
    // on, the rest of a header sent afterwards would reach the backend whole.
    s.get_mut().write_all(b"PROX").await.unwrap();
    let mut rest = Vec::new();
    let _ = within("closed", s.read_to_end(&mut rest)).await;
    assert!(
        rest.is_empty(),
        "the held bytes were forwarded and echoed: {}",
        String::from_utf8_lossy(&rest)
    );
    wait_counter(&lb, REJECTED, &[("reason", "proxy_untrusted")], 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maglev_client_ip_hashes_the_address_a_trusted_header_names() {
    let backends = [
        Backend::start("m0").await,
        Backend::start("m1").await,
        Backend::start("m2").await,
    ];
    let list: Vec<_> = backends.iter().map(|b| (b.addr, 1)).collect();
    let lb = Balancer::start(&one_pool(
        "    balance: maglev\n    hash_key: client_ip\n",
        "    accept_proxy_protocol: { from: [127.0.0.2/32], timeout: 5s }\n",
        &list,
    ))
    .await;
    let addr = lb.addr("l");
    // Clients behind one trusted balancer (127.0.0.2): each keeps its backend, whatever its
    // source port, round after round; together they spread over the backends.
    let sources: Vec<String> = (1..=12).map(|i| format!("203.0.113.{i}")).collect();
    let mut first: Vec<Option<String>> = vec![None; sources.len()];
    for round in 0..3u16 {
        for (i, src) in sources.iter().enumerate() {
            let mut s = connect_from("127.0.0.2", addr).await;
            let port = 40_000 + round * 100 + i as u16;
            s.write_all(format!("PROXY TCP4 {src} 198.51.100.1 {port} 80\r\n").as_bytes())
                .await
                .expect("write");
            let (greeting, _) = greet(s).await;
            match &first[i] {
                None => first[i] = Some(greeting),
                Some(f) => assert_eq!(f, &greeting, "{src} in round {round}"),
            }
        }
    }
    let seen: std::collections::HashSet<_> = first.iter().flatten().collect();
    assert!(
        seen.len() >= 2,
        "the header's address is hashed, not the peer's: {first:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_most_specific_block_wins_before_any_connect() {
    let backend = Backend::start("ok").await;
    let yaml = format!(
        "listeners:
  - name: l
    bind: 127.0.0.1:0
    pool: p
    allow: [127.0.0.0/8, 127.0.1.128/25]
    deny: [127.0.0.5, 127.0.1.0/24]
  - name: proxied
    bind: 127.0.0.1:0
    pool: p
    accept_proxy_protocol: {{ from: [127.0.0.2/32] }}
    deny: [192.0.2.0/24]
pools:
  - {{ name: p, backends: [{{ address: \"{}\" }}] }}
",
        backend.addr
    );
    let lb = Balancer::start(&yaml).await;
    let addr = lb.addr("l");
    let mut allowed = 0;
    for (src, ok) in [
        ("127.0.0.1", true),
        ("127.0.0.5", false),
        ("127.0.0.6", true),
        ("127.0.1.3", false),
        ("127.0.1.200", true),
    ] {
        let mut s = connect_from(src, addr).await;
        if ok {
            allowed += 1;
            let (greeting, _) = greet(s).await;
            assert_eq!(greeting, "ok", "{src} allowed");
        } else {
            assert!(read_to_end(&mut s).await.is_empty(), "{src} denied");
        }
    }
    assert_eq!(
        lb.counter(REJECTED, &[("listener", "l"), ("reason", "acl_denied")]),
        2
    );
    assert_eq!(
        lb.counter("switchyard_backend_connect_attempts_total", &[]),
        allowed,
        "denied connections never reach a backend"
    );

    // Behind a trusted balancer, the ACL judges the address in the PROXY header.
    let p = lb.addr("proxied");
    let mut denied = connect_from("127.0.0.2", p).await;
    denied
        .write_all(b"PROXY TCP4 192.0.2.9 127.0.0.1 1000 80\r\n")
        .await
        .expect("write");
    assert!(read_to_end(&mut denied).await.is_empty());
    let mut ok = connect_from("127.0.0.2", p).await;
    ok.write_all(b"PROXY TCP4 203.0.113.9 127.0.0.1 1000 80\r\n")
        .await
        .expect("write");
    assert_eq!(greet(ok).await.0, "ok");
    assert_eq!(
        lb.counter(
            REJECTED,
            &[("listener", "proxied"), ("reason", "acl_denied")]
        ),
        1
    );
}
