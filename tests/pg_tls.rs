//! Postgres TLS by SNI: two real Postgres servers with `ssl=on` and certificates for
//! different names, one Switchyard listener in front. Real `psql` reaches each by name
//! (SSLRequest, then the ClientHello), a plaintext client goes to the default pool or is
//! refused with an ErrorResponse under `require_tls`, and a PostgreSQL 17 style direct-TLS
//! client (rustls, ALPN `postgresql`) is routed the same way; whether the server selects the
//! ALPN (PostgreSQL 17 and later do, as libpq's `sslnegotiation=direct` requires) is the
//! server's answer, passed through.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod tls_support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;
use tls_support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The newest Postgres server binaries on the machine.
fn pg_bin() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists() && p.join("psql").exists())
        .collect();
    dirs.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    dirs.pop()
}

fn postgres_ids() -> Option<(u32, u32)> {
    let id = |flag: &str| -> Option<u32> {
        let out = Command::new("id").args([flag, "postgres"]).output().ok()?;
        String::from_utf8(out.stdout).ok()?.trim().parse().ok()
    };
    Some((id("-u")?, id("-g")?))
}

fn run_as_postgres(args: &[&str]) -> Output {
    let out = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .args(args)
        .output()
        .expect("runuser");
    assert!(
        out.status.success(),
        "{args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A Postgres server in a temp dir, with TLS, started by pg_ctl and stopped (by the PID in
/// its postmaster.pid) when dropped.
struct Postgres {
    _dir: tempfile::TempDir,
    data: PathBuf,
    bin: PathBuf,
    port: u16,
}

impl Postgres {
    fn start(bin: &Path, issued: &Issued, (uid, gid): (u32, u32)) -> Postgres {
        let dir = tempfile::tempdir().expect("tempdir");
        std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("chown");
        let data = dir.path().join("data");
        let initdb = bin.join("initdb");
        run_as_postgres(&[
            initdb.to_str().expect("path"),
            "-D",
            data.to_str().expect("path"),
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
        ]);
        for (file, text) in [
            ("server.crt", &issued.cert_pem),
            ("server.key", &issued.key_pem),
        ] {
            let path = data.join(file);
            std::fs::write(&path, text).expect("write cert");
            std::os::unix::fs::chown(&path, Some(uid), Some(gid)).expect("chown");
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        }
        let port = free_port();
        let conf = format!(
            "\nport = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\nfsync = off\nmax_connections = 20\nshared_buffers = 16MB\n",
            dir.path().display()
        );
        let conf_path = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf_path).expect("read conf");
        text.push_str(&conf);
        std::fs::write(&conf_path, text).expect("write conf");
        let pg_ctl = bin.join("pg_ctl");
        let log = dir.path().join("log");
        std::fs::write(&log, "").expect("log");
        std::os::unix::fs::chown(&log, Some(uid), Some(gid)).expect("chown");
        run_as_postgres(&[
            pg_ctl.to_str().expect("path"),
            "-D",
            data.to_str().expect("path"),
            "-l",
            log.to_str().expect("path"),
            "-w",
            "-t",
            "60",
            "start",
        ]);
        Postgres {
            _dir: dir,
            data,
            bin: bin.to_path_buf(),
            port,
        }
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let pg_ctl = self.bin.join("pg_ctl");
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(pg_ctl)
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }
}

/// Runs `psql CONNINFO -Atc SQL`; returns (success, stdout, stderr).
async fn psql(bin: &Path, conninfo: &str, sql: &str) -> (bool, String, String) {
    let out = within(
        "psql",
        tokio::process::Command::new(bin.join("psql"))
            .arg(conninfo)
            .args(["-X", "-Atc", sql])
            .env("PGCONNECT_TIMEOUT", "20")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("run psql");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_tls_by_sni_with_real_servers_and_psql() {
    let (Some(bin), Some(ids)) = (pg_bin(), postgres_ids()) else {
        missing_tool(
            "postgres_tls_by_sni_with_real_servers_and_psql",
            "Postgres server binaries or the postgres user are missing",
        );
        return;
    };
    if !nix_is_root() {
        missing_tool(
            "postgres_tls_by_sni_with_real_servers_and_psql",
            "must run as root to start Postgres as the postgres user",
        );
        return;
    }
    let pki = Pki::new();
    let a = Postgres::start(&bin, &pki.issue("pg-a.example.com"), ids);
    let b = Postgres::start(&bin, &pki.issue("pg-b.example.com"), ids);
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = pki.write_ca(dir.path());
    let yaml = format!(
        "listeners:
  - name: pg
    bind: 127.0.0.1:0
    tls_passthrough:
      postgres: true
      routes:
        - {{ sni: [pg-a.example.com], pool: a }}
        - {{ sni: [pg-b.example.com], pool: b }}
      default_pool: a
  - name: strict
    bind: 127.0.0.1:0
    tls_passthrough:
      postgres: true
      require_tls: true
      routes:
        - {{ sni: [pg-a.example.com], pool: a }}
        - {{ sni: [pg-b.example.com], pool: b }}
pools:
  - {{ name: a, backends: [{{ address: \"{}\" }}] }}
  - {{ name: b, backends: [{{ address: \"{}\" }}] }}
",
        a.addr(),
        b.addr()
    );
    let lb = Balancer::start(&yaml).await;
    let conninfo = |listener: &str, host: &str, sslmode: &str| {
        format!(
            "host={host} hostaddr=127.0.0.1 port={} user=postgres dbname=postgres sslmode={sslmode} sslrootcert={}",
            lb.addr(listener).port(),
            ca.display()
        )
    };

    // psql with sslmode=verify-full: SNI picks the server, libpq checks its certificate.
    for (host, pg) in [("pg-a.example.com", &a), ("pg-b.example.com", &b)] {
        for listener in ["pg", "strict"] {
            let (ok, out, err) = psql(
                &bin,
                &conninfo(listener, host, "verify-full"),
                "SELECT current_setting('port') || ' ' || ssl::text FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            )
            .await;
            assert!(ok, "{listener} {host}: {err}");
            assert_eq!(out, format!("{} true", pg.port), "{listener} {host}");
        }
    }

    // A plaintext StartupMessage goes to the default pool...
    let (ok, out, err) = psql(
        &bin,
        &format!("host=127.0.0.1 port={} user=postgres dbname=postgres sslmode=disable", lb.addr("pg").port()),
        "SELECT current_setting('port') || ' ' || ssl::text FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
    )
    .await;
    assert!(ok, "plain to the default pool: {err}");
    assert_eq!(out, format!("{} false", a.port));
    // ...TLS without SNI (an IP host) too...
    let (ok, out, err) = psql(
        &bin,
        &format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres sslmode=require",
            lb.addr("pg").port()
        ),
        "SHOW port",
    )
    .await;
    assert!(ok, "TLS without SNI: {err}");
    assert_eq!(out, a.port.to_string());
    // ...and with require_tls a plaintext client gets an ErrorResponse.
    let (ok, _, err) = psql(
        &bin,
        &format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres sslmode=disable",
            lb.addr("strict").port()
        ),
        "SELECT 1",
    )
    .await;
    assert!(!ok);
    assert!(err.contains("TLS is required on this listener"), "{err}");
    assert_eq!(
        lb.counter(
            "switchyard_listener_connections_rejected_total",
            &[("listener", "strict"), ("reason", "tls_required")]
        ),
        1
    );

    // PostgreSQL 17 direct TLS: a ClientHello at once, ALPN "postgresql". The balancer
    // routes it and the backend is sent an SSLRequest first, but the ServerHello is the
    // backend's own: only a 17+ server selects the ALPN libpq 17's `sslnegotiation=direct`
    // insists on; an older one selects none (libpq then gives up, a client that does not
    // insist carries on).
    for (host, pg) in [("pg-b.example.com", &b), ("pg-a.example.com", &a)] {
        let d = direct_tls_session(&pki, lb.addr("strict"), host).await;
        assert_eq!(d.port, pg.port.to_string(), "direct TLS to {host}");
        let wanted: Option<&[u8]> = (d.version_num >= 170_000).then_some(b"postgresql");
        assert_eq!(
            d.alpn.as_deref(),
            wanted,
            "ALPN selected by server version {}",
            d.version_num
        );
    }
    drop(lb);
    drop(a);
    drop(b);
}

fn nix_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// What a direct-TLS session learned.
struct DirectTls {
    /// The port the server reports.
    port: String,
    /// `server_version_num`, e.g. 150008.
    version_num: u32,
    /// The ALPN protocol the server selected.
    alpn: Option<Vec<u8>>,
}

/// Direct TLS with a verifying rustls client, then the Postgres protocol over it:
/// StartupMessage, `SHOW port; SHOW server_version_num`, Terminate.
async fn direct_tls_session(pki: &Pki, lb: SocketAddr, host: &str) -> DirectTls {
    let tcp = TcpStream::connect(lb).await.expect("connect");
    let mut tls = within(
        "handshake",
        tls_connect(&pki.client(&[b"postgresql"], true), host, tcp),
    )
    .await
    .expect("direct TLS handshake");
    let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    let mut startup = Vec::new();
    startup.extend_from_slice(&196_608u32.to_be_bytes()); // protocol 3.0
    startup.extend_from_slice(b"user\0postgres\0database\0postgres\0\0");
    let mut msg = ((startup.len() + 4) as u32).to_be_bytes().to_vec();
    msg.extend_from_slice(&startup);
    tls.write_all(&msg).await.expect("startup");
    read_until_ready(&mut tls).await;
    let sql = b"SHOW port; SHOW server_version_num\0";
    let mut q = vec![b'Q'];
    q.extend_from_slice(&((sql.len() + 4) as u32).to_be_bytes());
    q.extend_from_slice(sql);
    tls.write_all(&q).await.expect("query");
    let rows = read_until_ready(&mut tls).await;
    tls.write_all(&[b'X', 0, 0, 0, 4]).await.expect("terminate");
    let [port, version] = <[String; 2]>::try_from(rows).expect("two rows");
    DirectTls {
        port,
        version_num: version.parse().expect("server_version_num"),
        alpn,
    }
}

/// Reads backend messages up to ReadyForQuery; returns the first column of each DataRow.
async fn read_until_ready<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Vec<String> {
    let mut rows = Vec::new();
    within("postgres messages", async {
        loop {
            let mut head = [0u8; 5];
            s.read_exact(&mut head).await.expect("message header");
            let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
            let mut body = vec![0u8; len - 4];
            s.read_exact(&mut body).await.expect("message body");
            match head[0] {
                b'E' => panic!("ErrorResponse: {}", String::from_utf8_lossy(&body)),
                b'R' => assert_eq!(&body[..4], &[0, 0, 0, 0], "AuthenticationOk (trust)"),
                b'D' => {
                    let n = u32::from_be_bytes([body[2], body[3], body[4], body[5]]) as usize;
                    rows.push(String::from_utf8_lossy(&body[6..6 + n]).into_owned());
                }
                b'Z' => return,
                _ => {}
            }
        }
    })
    .await;
    rows
}

/// A stand-in Postgres backend: answers the SSLRequest with `answer`, then records every
/// byte until the client half-closes and sends them back.
async fn fake_backend(answer: u8) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut request = [0u8; 8];
                if s.read_exact(&mut request).await.is_err() {
                    return;
                }
                let _ = s.write_all(&[answer]).await;
                let mut rest = Vec::new();
                let _ = s.read_to_end(&mut rest).await;
                let mut all = request.to_vec();
                all.extend_from_slice(&rest);
                let _ = s.write_all(&all).await;
                let _ = s.shutdown().await;
            });
        }
    });
    (addr, task)
}

fn one_route(backend: SocketAddr) -> String {
    format!(
        "listeners:
  - name: pg
    bind: 127.0.0.1:0
    tls_passthrough:
      postgres: true
      routes: [{{ sni: [db.example.com], pool: p }}]
pools:
  - {{ name: p, backends: [{{ address: \"{backend}\" }}] }}
"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_gets_its_own_ssl_request_then_the_exact_hello() {
    use switchyard::tls::postgres::{GSSENC_REQUEST, SSL_REQUEST};
    use switchyard::tls::sni::build_client_hello;
    let (backend, _task) = fake_backend(b'S').await;
    let lb = Balancer::start(&one_route(backend)).await;
    let hello = build_client_hello(Some("db.example.com"), &[], 0);
    let mut wanted = SSL_REQUEST.to_vec();
    wanted.extend_from_slice(&hello);

    // libpq's way: SSLRequest, `S`, ClientHello. With a GSSENCRequest first: `N`, then that.
    for gss_first in [false, true] {
        let mut c = TcpStream::connect(lb.addr("pg")).await.expect("connect");
        if gss_first {
            c.write_all(&GSSENC_REQUEST).await.expect("write");
            let mut n = [0u8; 1];
            within("N", c.read_exact(&mut n)).await.expect("read");
            assert_eq!(&n, b"N");
        }
        c.write_all(&SSL_REQUEST).await.expect("write");
        let mut s = [0u8; 1];
        within("S", c.read_exact(&mut s)).await.expect("read");
        assert_eq!(&s, b"S");
        c.write_all(&hello).await.expect("write");
        c.shutdown().await.expect("half-close");
        assert_eq!(read_to_end(&mut c).await, wanted, "gss first: {gss_first}");
    }
    // Direct TLS: no SSLRequest from the client, the backend still gets one.
    let mut c = TcpStream::connect(lb.addr("pg")).await.expect("connect");
    c.write_all(&hello).await.expect("write");
    c.shutdown().await.expect("half-close");
    assert_eq!(read_to_end(&mut c).await, wanted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_that_declines_tls_closes_the_client() {
    use switchyard::tls::postgres::SSL_REQUEST;
    use switchyard::tls::sni::build_client_hello;
    let (backend, _task) = fake_backend(b'N').await;
    let lb = Balancer::start(&one_route(backend)).await;
    let mut c = TcpStream::connect(lb.addr("pg")).await.expect("connect");
    c.write_all(&SSL_REQUEST).await.expect("write");
    let mut s = [0u8; 1];
    within("S", c.read_exact(&mut s)).await.expect("read");
    c.write_all(&build_client_hello(Some("db.example.com"), &[], 0))
        .await
        .expect("write");
    assert!(read_to_end(&mut c).await.is_empty());
    assert_eq!(
        lb.counter(
            "switchyard_listener_connections_closed_total",
            &[("reason", "backend_protocol")]
        ),
        1
    );
    // A plaintext client without a default pool: no route.
    let mut c = TcpStream::connect(lb.addr("pg")).await.expect("connect");
    c.write_all(&[0, 0, 0, 9, 0, 3, 0, 0, 0])
        .await
        .expect("write");
    // Closed: EOF, or a reset when the balancer closed with the last byte unread.
    let mut rest = Vec::new();
    let closed = within("closed", c.read_to_end(&mut rest)).await;
    assert!(closed.is_err() || rest.is_empty(), "{closed:?}");
    assert_eq!(
        lb.counter(
            "switchyard_listener_connections_rejected_total",
            &[("reason", "no_route")]
        ),
        1
    );
}
