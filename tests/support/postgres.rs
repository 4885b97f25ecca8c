//! Real Postgres servers for the health-check tests: initdb, streaming replicas made with
//! `pg_basebackup -R`, run as the `postgres` user in temp dirs on free loopback ports, with
//! a SCRAM-SHA-256 and an md5 monitoring role. Servers are stopped by their data dir (the
//! postmaster PID in it) when dropped.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub const SUPERUSER: &str = "postgres";
pub const APP_USER: &str = "app";
pub const APP_PASSWORD: &str = "app-secret";
/// SCRAM-SHA-256 monitoring role.
pub const MONITOR: &str = "monitor";
pub const MONITOR_PASSWORD: &str = "monitor-secret";
/// md5 monitoring role (its password is stored as md5 and pg_hba asks for md5).
pub const MONITOR_MD5: &str = "monitor_md5";
pub const MONITOR_MD5_PASSWORD: &str = "md5-secret";

/// The newest installed server's bin directory (/usr/lib/postgresql/N/bin).
pub fn bin_dir() -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("Postgres server binaries under /usr/lib/postgresql (apt-get install postgresql)")
        .filter_map(|e| {
            let e = e.ok()?;
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().expect("an installed Postgres version").1
}

/// A temp dir the postgres user owns, under /tmp (whose parents are world-searchable).
pub struct Root {
    pub dir: tempfile::TempDir,
}

impl Root {
    pub fn new(label: &str) -> Root {
        let dir = tempfile::Builder::new()
            .prefix(&format!("switchyard-{label}-"))
            .tempdir_in("/tmp")
            .expect("temp dir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        run_checked(
            Command::new("chown")
                .arg("postgres:postgres")
                .arg(dir.path()),
        );
        Root { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// Runs a command, panicking with its output when it fails.
fn run_checked(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn as_postgres(bin: &Path, tool: &str) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", "postgres", "--"]).arg(bin.join(tool));
    c
}

pub use crate::common::free_port;

/// One Postgres server.
pub struct PgServer {
    pub name: String,
    pub data: PathBuf,
    pub port: u16,
    bin: PathBuf,
    running: bool,
}

impl PgServer {
    /// initdb a new cluster with the monitoring and app roles; `ssl` turns TLS on with a
    /// self-signed certificate. Returns it running.
    pub fn primary(root: &Root, name: &str, ssl: bool) -> PgServer {
        let bin = bin_dir();
        let data = root.path().join(name);
        run_checked(
            as_postgres(&bin, "initdb")
                .args(["-U", SUPERUSER, "-A", "trust", "--no-sync", "-D"])
                .arg(&data),
        );
        let port = free_port();
        let mut conf = format!(
            "\nlisten_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{}'\n\
             wal_level = replica\nmax_wal_senders = 8\nhot_standby = on\nfsync = off\n\
             synchronous_commit = off\nfull_page_writes = off\nshared_buffers = 16MB\n\
             max_connections = 40\nwal_keep_size = 64MB\nlog_min_messages = warning\n",
            data.display()
        );
        if ssl {
            let cert = data.join("server.crt");
            let key = data.join("server.key");
            run_checked(
                as_postgres(Path::new("/usr/bin"), "openssl")
                    .args([
                        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    ])
                    .args(["-subj", "/CN=localhost", "-keyout"])
                    .arg(&key)
                    .arg("-out")
                    .arg(&cert),
            );
            run_checked(
                as_postgres(Path::new("/usr/bin"), "chmod")
                    .arg("600")
                    .arg(&key),
            );
            conf.push_str("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
        }
        append(&data.join("postgresql.conf"), &conf);
        std::fs::write(
            data.join("pg_hba.conf"),
            format!(
                "local all all trust\n\
                 host replication {SUPERUSER} 127.0.0.1/32 trust\n\
                 host all {SUPERUSER} 127.0.0.1/32 trust\n\
                 host all {MONITOR_MD5} 127.0.0.1/32 md5\n\
                 host all all 127.0.0.1/32 scram-sha-256\n"
            ),
        )
        .expect("write pg_hba.conf");
        let mut server = PgServer {
            name: name.to_string(),
            data,
            port,
            bin,
            running: false,
        };
        server.start();
        server.psql(&format!(
            "SET password_encryption = 'scram-sha-256';\
             CREATE ROLE {MONITOR} LOGIN PASSWORD '{MONITOR_PASSWORD}';\
             CREATE ROLE {APP_USER} LOGIN PASSWORD '{APP_PASSWORD}';\
             SET password_encryption = 'md5';\
             CREATE ROLE {MONITOR_MD5} LOGIN PASSWORD '{MONITOR_MD5_PASSWORD}';\
             CREATE TABLE IF NOT EXISTS writes (n int); GRANT ALL ON writes TO {APP_USER};"
        ));
        server
    }

    /// A streaming replica of `primary` (pg_basebackup -R), running.
    pub fn replica_of(root: &Root, name: &str, primary: &PgServer) -> PgServer {
        let bin = bin_dir();
        let data = root.path().join(name);
        run_checked(
            as_postgres(&bin, "pg_basebackup")
                .args([
                    "-h",
                    "127.0.0.1",
                    "-U",
                    SUPERUSER,
                    "-R",
                    "-X",
                    "stream",
                    "-c",
                    "fast",
                ])
                .args(["-p", &primary.port.to_string(), "-D"])
                .arg(&data),
        );
        let port = free_port();
        append(
            &data.join("postgresql.conf"),
            &format!(
                "\nport = {port}\nunix_socket_directories = '{}'\n",
                data.display()
            ),
        );
        let mut server = PgServer {
            name: name.to_string(),
            data,
            port,
            bin,
            running: false,
        };
        server.start();
        server
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn start(&mut self) {
        let log = self.data.with_extension("log");
        run_checked(
            as_postgres(&self.bin, "pg_ctl")
                .args(["-w", "-t", "60", "-D"])
                .arg(&self.data)
                .arg("-l")
                .arg(&log)
                .arg("start"),
        );
        self.running = true;
    }

    /// Stops the server (`pg_ctl stop -m fast`: sessions are terminated).
    pub fn stop(&mut self) {
        if self.running {
            run_checked(
                as_postgres(&self.bin, "pg_ctl")
                    .args(["-w", "-t", "60", "-m", "fast", "-D"])
                    .arg(&self.data)
                    .arg("stop"),
            );
            self.running = false;
        }
    }

    /// Promotes a replica and waits until it accepts writes.
    pub fn promote(&self) {
        run_checked(
            as_postgres(&self.bin, "pg_ctl")
                .args(["-w", "-t", "60", "-D"])
                .arg(&self.data)
                .arg("promote"),
        );
    }

    /// Runs SQL as the superuser over the server's unix socket; returns psql's output.
    pub fn psql(&self, sql: &str) -> String {
        run_checked(
            as_postgres(&self.bin, "psql")
                .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h"])
                .arg(&self.data)
                .args([
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    SUPERUSER,
                    "-d",
                    "postgres",
                    "-c",
                    sql,
                ]),
        )
        .trim()
        .to_string()
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if self.running {
            let _ = as_postgres(&self.bin, "pg_ctl")
                .args(["-w", "-t", "30", "-m", "immediate", "-D"])
                .arg(&self.data)
                .arg("stop")
                .output();
        }
    }
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .expect("open for append");
    f.write_all(text.as_bytes()).expect("append");
}

/// A client through `addr` as the app user: (in recovery?, server port).
pub async fn whoami(addr: std::net::SocketAddr) -> Result<(bool, u16), tokio_postgres::Error> {
    let client = connect_app(addr).await?;
    let row = client
        .query_one("SELECT pg_is_in_recovery(), inet_server_port()", &[])
        .await?;
    Ok((row.get(0), row.get::<_, i32>(1) as u16))
}

/// Connects as the app user through `addr`, without TLS; the connection task is spawned.
pub async fn connect_app(
    addr: std::net::SocketAddr,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut config = tokio_postgres::Config::new();
    config
        .host(addr.ip().to_string())
        .port(addr.port())
        .user(APP_USER)
        .password(APP_PASSWORD)
        .dbname("postgres")
        .connect_timeout(Duration::from_secs(10))
        .ssl_mode(tokio_postgres::config::SslMode::Disable);
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}
