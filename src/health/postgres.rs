//! The `postgres` check: a real protocol login (trust, md5 or SCRAM-SHA-256, optionally over
//! TLS) with tokio-postgres, kept open between checks and re-opened after any error (a
//! check that reuses it first makes sure the server still takes new connections), then
//! one query for the server's role, its timeline (on a primary) and its replay lag (on a
//! replica). The role is matched against the pool's: a healthy server in the other role is
//! `standby`, not down. TLS does not verify the server certificate: a health check only
//! needs the server's answers, and the data path never goes through this connection.
//! With `proxy_protocol`, the check opens the socket itself, writes the PROXY LOCAL header
//! and hands the socket to tokio-postgres (`connect_raw`), TLS negotiation included.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_postgres::error::SqlState;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

use super::Observation;
use crate::backend::{DownReason, HealthStatus};
use crate::config::health::{PostgresCheck, PostgresRole, SslMode};

/// Role, timeline and lag in one round trip. The timeline of a primary is read from the
/// name of its current WAL file, which changes the moment a promotion ends (the timeline in
/// `pg_control_checkpoint()` only follows at the next checkpoint).
///
/// Lag is 0 while a WAL receiver runs (its `pid` in `pg_stat_wal_receiver`, which a plain
/// `LOGIN` role sees) and the replica has replayed everything it received, or has replayed
/// no commit yet since it started: `now() - last replay` then only measures how quiet the
/// primary is. Otherwise (no receiver: the primary is gone or unreachable, or replay is
/// behind) it is the time since the last replayed commit, which grows while the replica
/// serves ever older data; NULL when that is unknown (no receiver and no commit replayed
/// since the server started).
const ROLE_QUERY: &str = "SELECT pg_is_in_recovery(), \
     CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_walfile_name(pg_current_wal_lsn()) END, \
     CASE WHEN NOT pg_is_in_recovery() THEN NULL \
          WHEN EXISTS (SELECT FROM pg_stat_wal_receiver) \
           AND (pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() \
                OR pg_last_xact_replay_timestamp() IS NULL) THEN 0 \
          ELSE EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp()) END";

/// One backend's monitoring connection.
pub struct Probe {
    addr: SocketAddr,
    check: Arc<PostgresCheck>,
    config: tokio_postgres::Config,
    /// `config` without the password, for [`Probe::ping`].
    ping_config: tokio_postgres::Config,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    /// PROXY LOCAL header written before the startup (or SSLRequest) message.
    proxy_header: Option<Vec<u8>>,
    conn: Option<(Client, JoinHandle<()>)>,
}

/// Why a connection with a PROXY header could not be opened.
enum ConnectError {
    /// Connect or header write failed.
    Io(std::io::Error),
    Postgres(tokio_postgres::Error),
}

impl From<tokio_postgres::Error> for ConnectError {
    fn from(e: tokio_postgres::Error) -> ConnectError {
        ConnectError::Postgres(e)
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.reset();
    }
}

impl Probe {
    pub fn new(
        addr: SocketAddr,
        check: Arc<PostgresCheck>,
        timeout: Duration,
        proxy_header: Option<Vec<u8>>,
    ) -> Probe {
        let mut config = tokio_postgres::Config::new();
        config
            .host(addr.ip().to_string())
            .port(addr.port())
            .user(&check.user)
            .dbname(&check.database)
            .application_name("switchyard-health")
            .connect_timeout(timeout)
            .ssl_mode(match check.sslmode {
                SslMode::Disable => tokio_postgres::config::SslMode::Disable,
                SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
                SslMode::Require => tokio_postgres::config::SslMode::Require,
            });
        let mut ping_config = config.clone();
        ping_config.application_name("switchyard-health-ping");
        if let Some(p) = &check.password {
            config.password(p.expose());
        }
        let tls = (check.sslmode != SslMode::Disable)
            .then(|| tokio_postgres_rustls::MakeRustlsConnect::new(super::tls::client_config()));
        Probe {
            addr,
            check,
            config,
            ping_config,
            tls,
            proxy_header,
            conn: None,
        }
    }

    /// Forgets the monitoring connection (after an error or a timeout).
    pub fn reset(&mut self) {
        if let Some((_, task)) = self.conn.take() {
            task.abort();
        }
    }

    pub async fn check(&mut self) -> Observation {
        if self.conn.as_ref().is_some_and(|(c, _)| c.is_closed()) {
            self.reset();
        }
        if self.conn.is_some() {
            if let Err(down) = self.ping().await {
                self.reset();
                return down;
            }
        } else {
            match self.connect(&self.config).await {
                Ok(conn) => self.conn = Some(conn),
                Err(ConnectError::Postgres(e)) => {
                    return Observation::down(classify(&e), format!("login: {}", text(&e)))
                }
                Err(ConnectError::Io(e)) => {
                    return Observation::down(super::io_reason(&e), format!("connect: {e}"))
                }
            }
        }
        let Some((client, _)) = &self.conn else {
            return Observation::down(DownReason::Unreachable, "no connection".to_string());
        };
        let result = client.simple_query(ROLE_QUERY).await;
        match result {
            Ok(messages) => match parse_row(&messages) {
                Some(row) => self.judge(row),
                None => {
                    self.reset();
                    Observation::down(
                        DownReason::CheckError,
                        "unexpected answer to the role query".to_string(),
                    )
                }
            },
            Err(e) => {
                self.reset();
                Observation::down(classify(&e), format!("role query: {}", text(&e)))
            }
        }
    }

    /// Whether the server still takes new connections, which the session kept open cannot
    /// tell: a server in smart shutdown or whose postmaster stopped accepting still answers
    /// it (and a smart shutdown would wait for it forever). As libpq's `PQping`: a new
    /// connection, without the password, that gets as far as the server's authentication
    /// request (or in, with `trust`) is taken; the server refuses one it cannot take
    /// before that (`57P03`: shutting down, starting up), and one that hangs runs into the
    /// check's timeout. A server at `max_connections` (`53300`) is busy, not down: taking
    /// it out would close its sessions under `close_connections`. Leaving at the password
    /// request logs nothing on the server.
    async fn ping(&self) -> Result<(), Observation> {
        match self.connect(&self.ping_config).await {
            Ok((client, task)) => {
                drop(client);
                task.abort();
                Ok(())
            }
            Err(ConnectError::Postgres(e))
                if e.code() == Some(&SqlState::TOO_MANY_CONNECTIONS)
                    || (e.code().is_none() && text(&e).contains("password missing")) =>
            {
                Ok(())
            }
            Err(ConnectError::Postgres(e)) => Err(Observation::down(
                classify(&e),
                format!("new connection: {}", text(&e)),
            )),
            Err(ConnectError::Io(e)) => Err(Observation::down(
                super::io_reason(&e),
                format!("new connection: {e}"),
            )),
        }
    }

    async fn connect(
        &self,
        config: &tokio_postgres::Config,
    ) -> Result<(Client, JoinHandle<()>), ConnectError> {
        let addr = self.addr;
        let on_end = move |e: tokio_postgres::Error| {
            tracing::debug!(backend = %addr, error = %e, "monitoring connection ended");
        };
        if let Some(header) = &self.proxy_header {
            return self.connect_with_header(config, header, on_end).await;
        }
        match &self.tls {
            None => {
                let (client, connection) = config.connect(NoTls).await?;
                let task = tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        on_end(e);
                    }
                });
                Ok((client, task))
            }
            Some(tls) => {
                let (client, connection) = config.connect(tls.clone()).await?;
                let task = tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        on_end(e);
                    }
                });
                Ok((client, task))
            }
        }
    }

    /// Opens the socket, writes `header`, then logs in over it (`sslmode` as configured).
    /// The check's timeout bounds the whole of it, as it does `Config::connect`.
    async fn connect_with_header(
        &self,
        config: &tokio_postgres::Config,
        header: &[u8],
        on_end: impl FnOnce(tokio_postgres::Error) + Send + 'static,
    ) -> Result<(Client, JoinHandle<()>), ConnectError> {
        let mut stream = TcpStream::connect(self.addr)
            .await
            .map_err(ConnectError::Io)?;
        // As `Config::connect` sets up its own socket: no delay, keepalives after 2 hours.
        let _ = stream.set_nodelay(true);
        let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(
            &socket2::TcpKeepalive::new().with_time(Duration::from_secs(2 * 60 * 60)),
        );
        stream.write_all(header).await.map_err(ConnectError::Io)?;
        match &self.tls {
            None => {
                let (client, connection) = config.connect_raw(stream, NoTls).await?;
                let task = tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        on_end(e);
                    }
                });
                Ok((client, task))
            }
            Some(make) => {
                let tls = raw_tls(make, &self.addr.ip().to_string());
                let (client, connection) = config.connect_raw(stream, tls).await?;
                let task = tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        on_end(e);
                    }
                });
                Ok((client, task))
            }
        }
    }

    fn judge(&self, row: Row) -> Observation {
        let want = self.check.role;
        if !row.in_recovery {
            return match want {
                PostgresRole::Replica => Observation::with(
                    HealthStatus::STANDBY,
                    None,
                    Some("primary, and this pool wants replicas".into()),
                ),
                _ => Observation::with(HealthStatus::UP, row.timeline, None),
            };
        }
        if want == PostgresRole::Primary {
            return Observation::with(
                HealthStatus::STANDBY,
                None,
                Some("replica, and this pool wants the primary".into()),
            );
        }
        let Some(max) = self.check.max_replication_lag else {
            return Observation::up();
        };
        match row.lag_seconds {
            Some(lag) if lag <= max.as_secs_f64() => Observation::up(),
            Some(lag) => Observation::down(
                DownReason::Lagging,
                format!(
                    "replication lag {lag:.1}s is above max_replication_lag {}",
                    humantime::format_duration(max)
                ),
            ),
            None => Observation::down(
                DownReason::Lagging,
                "replication lag unknown: no WAL receiver, and no commit replayed since the \
                 server started"
                    .to_string(),
            ),
        }
    }
}

/// The one-connection TLS connector for `host` (what `Config::connect` makes itself).
fn raw_tls(
    make: &tokio_postgres_rustls::MakeRustlsConnect,
    host: &str,
) -> <tokio_postgres_rustls::MakeRustlsConnect as MakeTlsConnect<TcpStream>>::TlsConnect {
    let mut make = make.clone();
    match <tokio_postgres_rustls::MakeRustlsConnect as MakeTlsConnect<TcpStream>>::make_tls_connect(
        &mut make, host,
    ) {
        Ok(tls) => tls,
        Err(never) => match never {},
    }
}

struct Row {
    in_recovery: bool,
    timeline: Option<u64>,
    /// Replay lag of a replica; None on a primary, or when it cannot be told.
    lag_seconds: Option<f64>,
}

fn parse_row(messages: &[SimpleQueryMessage]) -> Option<Row> {
    let row = messages.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(r) => Some(r),
        _ => None,
    })?;
    let in_recovery = match row.try_get(0).ok()?? {
        "t" => true,
        "f" => false,
        _ => return None,
    };
    let timeline = match row.try_get(1).ok()? {
        Some(walfile) => Some(timeline_of(walfile)?),
        None => None,
    };
    let lag_seconds = match row.try_get(2).ok()? {
        // Clocks of primary and replica may differ a little: never below 0.
        Some(text) => Some(text.parse::<f64>().ok()?.max(0.0)),
        None => None,
    };
    Some(Row {
        in_recovery,
        timeline,
        lag_seconds,
    })
}

/// The timeline from a WAL file name (`00000002000000000000000A` is timeline 2).
pub fn timeline_of(walfile: &str) -> Option<u64> {
    u64::from_str_radix(walfile.get(..8)?, 16).ok()
}

/// The error with its causes ("invalid configuration: password missing"); tokio-postgres
/// prints only the outermost one.
fn text(e: &tokio_postgres::Error) -> String {
    let mut out = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Maps a failed login or query to a down reason.
fn classify(e: &tokio_postgres::Error) -> DownReason {
    if let Some(code) = e.code() {
        return if *code == SqlState::INVALID_PASSWORD
            || *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
        {
            DownReason::AuthFailed
        } else if *code == SqlState::ADMIN_SHUTDOWN
            || *code == SqlState::CRASH_SHUTDOWN
            || *code == SqlState::CANNOT_CONNECT_NOW
            || *code == SqlState::TOO_MANY_CONNECTIONS
        {
            DownReason::Unreachable
        } else {
            DownReason::CheckError
        };
    }
    let text = text(e);
    if text.contains("password missing") {
        // The server asked for a password and none is configured.
        return DownReason::AuthFailed;
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return super::io_reason(io);
        }
        source = s.source();
    }
    if text.contains("timeout") {
        DownReason::Timeout
    } else if e.is_closed() || text.contains("connection") {
        DownReason::Unreachable
    } else {
        DownReason::CheckError
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica_pool(max_lag: Option<Duration>) -> Probe {
        let check = PostgresCheck {
            user: "monitor".into(),
            password: None,
            database: "postgres".into(),
            role: PostgresRole::Replica,
            max_replication_lag: max_lag,
            sslmode: SslMode::Disable,
            on_multiple_primaries: crate::config::health::OnMultiplePrimaries::NewestTimeline,
        };
        let addr = "127.0.0.1:5432".parse().expect("addr");
        Probe::new(addr, Arc::new(check), Duration::from_secs(1), None)
    }

    fn replica(lag_seconds: Option<f64>) -> Row {
        Row {
            in_recovery: true,
            timeline: None,
            lag_seconds,
        }
    }

    #[test]
    fn replica_lag_against_max_replication_lag() {
        let strict = replica_pool(Some(Duration::from_secs(10)));
        assert_eq!(strict.judge(replica(Some(0.0))).status, HealthStatus::UP);
        assert_eq!(strict.judge(replica(Some(10.0))).status, HealthStatus::UP);
        let lagging = HealthStatus::down(DownReason::Lagging);
        assert_eq!(strict.judge(replica(Some(10.5))).status, lagging);
        let unknown = strict.judge(replica(None));
        assert_eq!(unknown.status, lagging, "unknown lag is not trusted");
        assert!(unknown.detail.is_some_and(|d| d.contains("unknown")));
        // Without max_replication_lag, lag does not matter.
        let lax = replica_pool(None);
        assert_eq!(lax.judge(replica(None)).status, HealthStatus::UP);
        assert_eq!(lax.judge(replica(Some(1e6))).status, HealthStatus::UP);
    }

    #[test]
    fn timelines_from_wal_file_names() {
        assert_eq!(timeline_of("00000002000000000000000A"), Some(2));
        assert_eq!(timeline_of("0000001F0000000000000001"), Some(31));
        assert_eq!(timeline_of("zz"), None);
    }
}
